// kvblk check: checks (and repairs) a qcow2 image's metadata the way
// `qemu-img check` does, with its output formats and exit statuses.
#include <unistd.h>

#include <cinttypes>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "disk/qcow2_check.h"
#include "kvblk/block_device.h"
#include "tools/cli_util.h"
#include "tools/commands.h"
#include "tools/image_options.h"
#include "tools/json_writer.h"

namespace kvblk::cli {

namespace {

constexpr const char* kCmd = "check";
// qemu-img's exit status for a format without checks.
constexpr int kExitNotSupported = 63;

std::vector<OptionSpec> CheckSpecs() {
  return {
      {'f', "", "FMT", "image format: qcow2 or raw (default: probed from the file)"},
      {'r', "", "MODE", "repair: 'leaks' (lower leaked refcounts) or 'all' (everything)"},
      {0, "output", "FMT", "output format: human (default) or json"},
      {'q', "", "", "quiet: print no summary and no progress"},
      HelpOption(),
  };
}

void PrintHelp() {
  std::printf(
      "usage: kvblk check [-f FMT] [-r leaks|all] [--output=human|json] [-q] FILE\n"
      "\n"
      "Checks the metadata of the qcow2 image FILE like qemu-img check: every cluster's\n"
      "reference count is rebuilt from the L1/L2 tables of the image and its snapshots, the\n"
      "refcount structure, the snapshot table and the bitmaps, and compared with the stored\n"
      "refcounts; COPIED flags, alignment and reserved bits are checked too. Findings go to\n"
      "stderr, one per line; the summary goes to stdout.\n"
      "\n"
      "-r leaks  lowers the refcounts of leaked clusters.\n"
      "-r all    also raises refcounts that are too low, fixes COPIED flags, clears entries\n"
      "          that point outside the file or into metadata (reporting the data lost),\n"
      "          removes snapshots whose L1 table is unusable, rebuilds a broken refcount\n"
      "          structure at the end of the file, and clears the dirty and corrupt bits.\n"
      "          A repaired image is checked again and that result is reported.\n"
      "\n"
      "Exit status: 0 no problems, 1 the check could not be completed, 2 corruptions,\n"
      "3 leaked clusters only, 63 the format (raw) has no checks.\n"
      "\n"
      "%s",
      FormatOptionHelp(CheckSpecs()).c_str());
}

void PrintHuman(const qcow2::CheckResult& r) {
  if (r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0) {
    std::printf("No errors were found on the image.\n");
  } else {
    if (r.corruptions) {
      std::printf("\n%" PRIu64
                  " errors were found on the image.\n"
                  "Data may be corrupted, or further writes to the image may corrupt it.\n",
                  r.corruptions);
    }
    if (r.leaks) {
      std::printf("\n%" PRIu64
                  " leaked clusters were found on the image.\n"
                  "This means waste of disk space, but no harm to data.\n",
                  r.leaks);
    }
    if (r.check_errors) {
      std::printf("\n%" PRIu64 " internal errors have occurred during the check.\n",
                  r.check_errors);
    }
  }
  if (r.total_clusters != 0 && r.allocated_clusters != 0) {
    const double allocated = static_cast<double>(r.allocated_clusters);
    std::printf("%" PRIu64 "/%" PRIu64
                " = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% "
                "compressed clusters\n",
                r.allocated_clusters, r.total_clusters,
                allocated * 100.0 / static_cast<double>(r.total_clusters),
                static_cast<double>(r.fragmented_clusters) * 100.0 / allocated,
                static_cast<double>(r.compressed_clusters) * 100.0 / allocated);
  }
  if (r.image_end_offset != 0) {
    std::printf("Image end offset: %" PRIu64 "\n", r.image_end_offset);
  }
}

// Members in the order qemu-img prints them; optional ones only when not 0.
void PrintJson(const qcow2::CheckResult& r, const std::string& path) {
  JsonWriter json;
  json.BeginObject();
  auto optional = [&](const char* key, uint64_t v) {
    if (v == 0) return;
    json.Key(key);
    json.Uint(v);
  };
  optional("image-end-offset", r.image_end_offset);
  optional("compressed-clusters", r.compressed_clusters);
  optional("total-clusters", r.total_clusters);
  optional("corruptions", r.corruptions);
  optional("corruptions-fixed", r.corruptions_fixed);
  json.Key("check-errors");
  json.Uint(r.check_errors);
  optional("leaks", r.leaks);
  optional("leaks-fixed", r.leaks_fixed);
  optional("allocated-clusters", r.allocated_clusters);
  json.Key("filename");
  json.String(path);
  json.Key("format");
  json.String("qcow2");
  optional("fragmented-clusters", r.fragmented_clusters);
  json.EndObject();
  std::printf("%s\n", json.str().c_str());
}

}  // namespace

int RunCheck(const std::vector<std::string>& args) {
  Result<ParsedArgs> parsed = ParseArgs(args, CheckSpecs());
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
  qcow2::CheckOptions opts;
  if (a.Has("r")) {
    const std::string mode = a.Get("r");
    if (mode == "leaks") {
      opts.repair = qcow2::RepairMode::kLeaks;
    } else if (mode == "all") {
      opts.repair = qcow2::RepairMode::kAll;
    } else {
      return Fail(kCmd, "unknown repair mode '" + mode + "' (expected leaks or all)");
    }
  }
  const std::string output = a.Get("output", "human");
  if (output != "human" && output != "json") {
    return Fail(kCmd, "unknown output format '" + output + "' (expected human or json)");
  }
  const bool quiet = a.Has("q");
  const std::vector<std::string>& pos = a.positional();
  if (pos.empty()) return Fail(kCmd, "missing FILE (see 'kvblk check --help')");
  if (pos.size() > 1) return Fail(kCmd, "unexpected argument '" + pos[1] + "'");
  const std::string& path = pos[0];

  if (format.empty()) {
    Result<std::string> probed = ProbeFormat(path);
    if (!probed.ok()) return Fail(kCmd, probed.status());
    format = *probed;
  }
  if (format != "qcow2") {
    Fail(kCmd, path + ": this image format (" + format + ") does not support checks");
    return kExitNotSupported;
  }

  // Progress on a terminal only; findings clear the progress line first.
  const bool tty = isatty(STDERR_FILENO) == 1;
  std::unique_ptr<ProgressBar> bar;
  uint64_t reported = 0;
  if (tty && !quiet) {
    opts.on_progress = [&](uint64_t done, uint64_t total) {
      if (!bar) bar = std::make_unique<ProgressBar>(true, total);
      bar->Add(done - reported);
      reported = done;
    };
  }
  opts.on_message = [&](const std::string& m) {
    if (bar) std::fputs("\r\033[K", stderr);
    std::fprintf(stderr, "%s\n", m.c_str());
  };
  Result<qcow2::CheckResult> result = qcow2::CheckImage(path, opts);
  if (bar) bar->Finish();
  if (!result.ok()) return Fail(kCmd, result.status().WithContext("check failed"));
  const qcow2::CheckResult& r = *result;

  if (!quiet) {
    if (output == "json") {
      PrintJson(r, path);
    } else {
      if (r.double_checked) {
        std::printf(
            "The following inconsistencies were found and repaired:\n\n"
            "    %" PRIu64
            " leaked clusters\n"
            "    %" PRIu64
            " corruptions\n\n"
            "Double checking the fixed image now...\n",
            r.leaks_fixed, r.corruptions_fixed);
      }
      PrintHuman(r);
    }
  }
  std::fflush(stdout);
  if (r.check_errors) {
    return Fail(kCmd, path + ": check failed: " + std::to_string(r.check_errors) +
                          " internal errors occurred");
  }
  return r.ExitCode();
}

}  // namespace kvblk::cli
