// kvblk info: describes an image (qemu-img info), as text or JSON.
#include <cstdio>
#include <ctime>
#include <string>
#include <vector>

#include "kvblk/block_device.h"
#include "tools/backing_chain.h"
#include "tools/cli_util.h"
#include "tools/commands.h"
#include "tools/image_options.h"
#include "tools/json_writer.h"

namespace kvblk::cli {

namespace {

constexpr const char* kCmd = "info";

std::vector<OptionSpec> InfoSpecs() {
  return {
      {'f', "", "FMT", "image format: qcow2 or raw (default: probed from the file)"},
      {0, "output", "FMT", "output format: human (default) or json"},
      {0, "backing-chain", "", "also describe every backing file, top image first"},
      HelpOption(),
  };
}

void PrintHelp() {
  std::printf(
      "usage: kvblk info [-f FMT] [--output=human|json] [--backing-chain] FILE\n"
      "\n"
      "Prints the format, virtual size, disk usage, backing file, snapshots and format\n"
      "settings of FILE in qemu-img info's layout. The image is opened read-only and its\n"
      "backing file is not opened unless --backing-chain is given.\n"
      "\n"
      "%s",
      FormatOptionHelp(InfoSpecs()).c_str());
}

bool IsV3(const ImageInfo& info) { return info.compat != "0.10"; }

std::string FormatDate(uint64_t sec) {
  time_t t = static_cast<time_t>(sec);
  struct tm tm_buf;
  char buf[32] = "";
  if (localtime_r(&t, &tm_buf) != nullptr) {
    std::strftime(buf, sizeof(buf), "%Y-%m-%d %H:%M:%S", &tm_buf);
  }
  return buf;
}

std::string FormatVmClock(uint64_t nsec) {
  uint64_t ms = nsec / 1000000;
  char buf[48];
  std::snprintf(buf, sizeof(buf), "%02llu:%02llu:%02llu.%03llu",
                static_cast<unsigned long long>(ms / 3600000),
                static_cast<unsigned long long>(ms / 60000 % 60),
                static_cast<unsigned long long>(ms / 1000 % 60),
                static_cast<unsigned long long>(ms % 1000));
  return buf;
}

}  // namespace

void WriteSnapshotsJson(const std::vector<SnapshotInfo>& snapshots, JsonWriter& json) {
  json.BeginArray();
  for (const SnapshotInfo& s : snapshots) {
    json.BeginObject();
    if (s.icount) {
      json.Key("icount");
      json.Uint(*s.icount);
    }
    json.Key("vm-clock-nsec");
    json.Uint(s.vm_clock_nsec % 1000000000);
    json.Key("name");
    json.String(s.name);
    json.Key("date-sec");
    json.Uint(s.date_sec);
    json.Key("date-nsec");
    json.Uint(s.date_nsec);
    json.Key("vm-clock-sec");
    json.Uint(s.vm_clock_nsec / 1000000000);
    json.Key("id");
    json.String(s.id);
    json.Key("vm-state-size");
    json.Uint(s.vm_state_size);
    json.EndObject();
  }
  json.EndArray();
}

std::string FormatSnapshotTable(const std::vector<SnapshotInfo>& snapshots) {
  std::string out = "Snapshot list:\n";
  char line[128];
  std::snprintf(line, sizeof(line), "%-9s %-17s %7s%20s%13s%11s\n", "ID", "TAG", "VM SIZE", "DATE",
                "VM CLOCK", "ICOUNT");
  out += line;
  for (const SnapshotInfo& s : snapshots) {
    std::string icount = s.icount ? std::to_string(*s.icount) : "";
    // Long IDs and names widen their column, as in qemu-img.
    std::vector<char> buf(s.id.size() + s.name.size() + 128);
    std::snprintf(buf.data(), buf.size(), "%-9s %-17s %7s%20s%13s%11s\n", s.id.c_str(),
                  s.name.c_str(), FormatHumanSize(s.vm_state_size).c_str(),
                  FormatDate(s.date_sec).c_str(), FormatVmClock(s.vm_clock_nsec).c_str(),
                  icount.c_str());
    out += buf.data();
  }
  return out;
}

namespace {

void PrintHuman(const ChainImage& image) {
  const ImageInfo& info = image.info;
  std::printf("image: %s\n", image.path.c_str());
  std::printf("file format: %s\n", info.format.c_str());
  std::printf("virtual size: %s (%llu bytes)\n", FormatHumanSize(info.virtual_size).c_str(),
              static_cast<unsigned long long>(info.virtual_size));
  std::printf("disk size: %s\n", FormatHumanSize(info.actual_size).c_str());
  if (info.cluster_size != 0) std::printf("cluster_size: %u\n", info.cluster_size);
  if (info.dirty) std::printf("cleanly shut down: no\n");
  if (!info.backing_filename.empty()) {
    std::printf("backing file: %s", info.backing_filename.c_str());
    if (!info.full_backing_filename.empty() &&
        info.full_backing_filename != info.backing_filename) {
      std::printf(" (actual path: %s)", info.full_backing_filename.c_str());
    }
    std::printf("\n");
    if (!info.backing_format.empty()) {
      std::printf("backing file format: %s\n", info.backing_format.c_str());
    }
  }
  if (!info.snapshots.empty()) std::fputs(FormatSnapshotTable(info.snapshots).c_str(), stdout);
  if (info.format == "qcow2") {
    std::printf("Format specific information:\n");
    std::printf("    compat: %s\n", info.compat.c_str());
    std::printf("    compression type: %s\n", info.compression_type.c_str());
    if (IsV3(info)) std::printf("    lazy refcounts: %s\n", info.lazy_refcounts ? "true" : "false");
    std::printf("    refcount bits: %d\n", info.refcount_bits);
    if (IsV3(info)) {
      std::printf("    corrupt: %s\n", info.corrupt ? "true" : "false");
      std::printf("    extended l2: %s\n", info.extended_l2 ? "true" : "false");
    }
  }
}

// One image as a JSON object, members in the order qemu-img prints them.
void WriteJson(const ChainImage& image, JsonWriter& json) {
  const ImageInfo& info = image.info;
  json.BeginObject();
  if (!info.backing_filename.empty() && !info.backing_format.empty()) {
    json.Key("backing-filename-format");
    json.String(info.backing_format);
  }
  if (!info.snapshots.empty()) {
    json.Key("snapshots");
    WriteSnapshotsJson(info.snapshots, json);
  }
  json.Key("virtual-size");
  json.Uint(info.virtual_size);
  json.Key("filename");
  json.String(image.path);
  if (info.cluster_size != 0) {
    json.Key("cluster-size");
    json.Uint(info.cluster_size);
  }
  json.Key("format");
  json.String(info.format);
  json.Key("actual-size");
  json.Uint(info.actual_size);
  if (info.format == "qcow2") {
    json.Key("format-specific");
    json.BeginObject();
    json.Key("type");
    json.String("qcow2");
    json.Key("data");
    json.BeginObject();
    json.Key("compat");
    json.String(info.compat);
    json.Key("compression-type");
    json.String(info.compression_type);
    if (IsV3(info)) {
      json.Key("lazy-refcounts");
      json.Bool(info.lazy_refcounts);
    }
    json.Key("refcount-bits");
    json.Int(info.refcount_bits);
    if (IsV3(info)) {
      json.Key("corrupt");
      json.Bool(info.corrupt);
      json.Key("extended-l2");
      json.Bool(info.extended_l2);
    }
    json.EndObject();
    json.EndObject();
  }
  if (!info.backing_filename.empty()) {
    json.Key("full-backing-filename");
    json.String(info.full_backing_filename.empty() ? info.backing_filename
                                                   : info.full_backing_filename);
    json.Key("backing-filename");
    json.String(info.backing_filename);
  }
  json.Key("dirty-flag");
  json.Bool(info.dirty);
  json.EndObject();
}

}  // namespace

int RunInfo(const std::vector<std::string>& args) {
  Result<ParsedArgs> parsed = ParseArgs(args, InfoSpecs());
  if (!parsed.ok()) return Fail(kCmd, parsed.status());
  const ParsedArgs& a = *parsed;
  if (a.Has("help")) {
    PrintHelp();
    return 0;
  }
  std::string format = a.Get("f");
  if (a.Has("f")) {
    Status ok = CheckFormatName(format, "format");
    if (!ok.ok()) return Fail(kCmd, ok);
  }
  std::string output = a.Get("output", "human");
  if (output != "human" && output != "json") {
    return Fail(kCmd, "unknown output format '" + output + "' (expected human or json)");
  }
  const std::vector<std::string>& pos = a.positional();
  if (pos.empty()) return Fail(kCmd, "missing FILE (see 'kvblk info --help')");
  if (pos.size() > 1) return Fail(kCmd, "unexpected argument '" + pos[1] + "'");

  std::vector<ChainImage> chain;
  if (a.Has("backing-chain")) {
    Result<std::vector<ChainImage>> all = ReadBackingChain(pos[0], format);
    if (!all.ok()) return Fail(kCmd, all.status());
    chain = std::move(*all);
  } else {
    Result<ImageInfo> info = ReadImageInfo(pos[0], format);
    if (!info.ok()) return Fail(kCmd, info.status());
    chain.push_back({pos[0], std::move(*info)});
  }

  if (output == "json") {
    JsonWriter json;
    if (a.Has("backing-chain")) json.BeginArray();
    for (const ChainImage& image : chain) WriteJson(image, json);
    if (a.Has("backing-chain")) json.EndArray();
    std::printf("%s\n", json.str().c_str());
  } else {
    for (size_t i = 0; i < chain.size(); ++i) {
      if (i > 0) std::printf("\n");
      PrintHuman(chain[i]);
    }
  }
  return 0;
}

}  // namespace kvblk::cli
