// kvblk map: where an image's data is (qemu-img map), as text or JSON.
#include <cinttypes>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "kvblk/block_device.h"
#include "kvblk/event_loop.h"
#include "tools/cli_util.h"
#include "tools/commands.h"
#include "tools/image_options.h"

namespace kvblk::cli {

namespace {

constexpr const char* kCmd = "map";

std::vector<OptionSpec> MapSpecs() {
  return {
      {'f', "", "FMT", "image format: qcow2 or raw (default: probed from the file)"},
      {0, "output", "FMT", "output format: human (default) or json"},
      HelpOption(),
  };
}

void PrintHelp() {
  std::printf(
      "usage: kvblk map [-f FMT] [--output=human|json] FILE\n"
      "\n"
      "Describes every range of FILE's virtual disk, through the whole backing chain, in\n"
      "qemu-img map's formats. Adjacent ranges with the same attributes (and contiguous\n"
      "host offsets) are merged.\n"
      "\n"
      "human: one line per range that holds data, with the host offset and the file the\n"
      "       data is in.\n"
      "json:  every range, as {\"start\", \"length\", \"depth\" (backing chain level, 0 = FILE),\n"
      "       \"present\" (allocated somewhere in the chain), \"zero\" (reads as zeros),\n"
      "       \"data\" (backed by file data), \"offset\" (host offset, when known)}.\n"
      "\n"
      "%s",
      FormatOptionHelp(MapSpecs()).c_str());
}

struct MapEntry {
  uint64_t start;
  uint64_t length;
  int depth;
  bool present;
  bool zero;
  bool data;
  std::optional<uint64_t> offset;
  std::string file;
};

// True if `next` continues `prev` with the same attributes (and, for mapped
// runs, the next host bytes of the same file).
bool Mergeable(const MapEntry& prev, const MapEntry& next) {
  if (prev.depth != next.depth || prev.present != next.present || prev.zero != next.zero ||
      prev.data != next.data || prev.offset.has_value() != next.offset.has_value() ||
      prev.file != next.file) {
    return false;
  }
  return !prev.offset || *prev.offset + prev.length == *next.offset;
}

Result<std::vector<MapEntry>> CollectMap(BlockDevice& dev, const std::string& path) {
  std::vector<MapEntry> entries;
  const uint64_t size = dev.size();
  uint64_t offset = 0;
  while (offset < size) {
    Result<BlockStatus> st = RunSync(dev.GetBlockStatus(offset, size - offset));
    if (!st.ok()) return st.status();
    if (st->length == 0 || st->length > size - offset) {
      return Status::Corruption("block status at offset " + std::to_string(offset) + " of '" +
                                path + "' has an invalid length " + std::to_string(st->length));
    }
    MapEntry entry{offset,   st->length, st->depth,       st->present,
                   st->zero, st->data,   st->host_offset, st->data ? st->host_file : ""};
    if (entry.data && entry.file.empty()) entry.file = path;
    if (!entries.empty() && Mergeable(entries.back(), entry)) {
      entries.back().length += entry.length;
    } else {
      entries.push_back(std::move(entry));
    }
    offset += st->length;
  }
  return entries;
}

void PrintHuman(const std::vector<MapEntry>& entries) {
  std::printf("%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File");
  for (const MapEntry& e : entries) {
    if (!e.data || e.zero || !e.offset) continue;
    std::printf("%#-16" PRIx64 "%#-16" PRIx64 "%#-16" PRIx64 "%s\n", e.start, e.length, *e.offset,
                e.file.c_str());
  }
}

void PrintJson(const std::vector<MapEntry>& entries) {
  std::printf("[");
  for (size_t i = 0; i < entries.size(); ++i) {
    const MapEntry& e = entries[i];
    if (i > 0) std::printf(",\n");
    std::printf("{ \"start\": %" PRIu64 ", \"length\": %" PRIu64
                ", \"depth\": %d, \"present\": %s, \"zero\": %s, \"data\": %s",
                e.start, e.length, e.depth, e.present ? "true" : "false", e.zero ? "true" : "false",
                e.data ? "true" : "false");
    if (e.offset) std::printf(", \"offset\": %" PRIu64, *e.offset);
    std::printf("}");
  }
  std::printf("]\n");
}

}  // namespace

int RunMap(const std::vector<std::string>& args) {
  Result<ParsedArgs> parsed = ParseArgs(args, MapSpecs());
  if (!parsed.ok()) return Fail(kCmd, parsed.status());
  const ParsedArgs& a = *parsed;
  if (a.Has("help")) {
    PrintHelp();
    return 0;
  }
  OpenOptions opts;
  opts.read_only = true;
  opts.format = a.Get("f");
  if (a.Has("f")) {
    Status ok = CheckFormatName(opts.format, "format");
    if (!ok.ok()) return Fail(kCmd, ok);
  }
  std::string output = a.Get("output", "human");
  if (output != "human" && output != "json") {
    return Fail(kCmd, "unknown output format '" + output + "' (expected human or json)");
  }
  const std::vector<std::string>& pos = a.positional();
  if (pos.empty()) return Fail(kCmd, "missing FILE (see 'kvblk map --help')");
  if (pos.size() > 1) return Fail(kCmd, "unexpected argument '" + pos[1] + "'");

  Result<std::unique_ptr<BlockDevice>> dev = OpenImage(pos[0], opts);
  if (!dev.ok()) return Fail(kCmd, dev.status());
  Result<std::vector<MapEntry>> entries = CollectMap(**dev, pos[0]);
  Status closed = CloseImage(std::move(*dev));
  if (!entries.ok()) return Fail(kCmd, entries.status());
  if (!closed.ok()) return Fail(kCmd, closed);
  if (output == "json") {
    PrintJson(*entries);
  } else {
    PrintHuman(*entries);
  }
  return 0;
}

}  // namespace kvblk::cli
