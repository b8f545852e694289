// kvblk create: makes a new, empty qcow2 or raw image (qemu-img create).
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "kvblk/block_device.h"
#include "kvblk/image_create.h"
#include "tools/cli_util.h"
#include "tools/commands.h"
#include "tools/image_options.h"

namespace kvblk::cli {

namespace {

constexpr const char* kCmd = "create";

std::vector<OptionSpec> CreateSpecs() {
  return {
      {'f', "", "FMT", "image format: qcow2 (default) or raw"},
      {'o', "", "OPTIONS",
       "comma-separated format options (name=value,...); may be repeated; '-o help' lists them"},
      {'b', "", "BACKING",
       "backing file of the new qcow2 image (relative names are relative to FILE's directory)"},
      {'F', "", "BACKING_FMT", "format of the backing file: qcow2 or raw (default: probed)"},
      {'q', "", "", "quiet: do not print the 'Formatting ...' line"},
      HelpOption(),
  };
}

void PrintHelp() {
  std::printf(
      "usage: kvblk create [-q] [-f FMT] [-o OPTIONS] [-b BACKING [-F BACKING_FMT]] FILE [SIZE]\n"
      "\n"
      "Creates FILE as an empty image of SIZE bytes (or truncates an existing file).\n"
      "SIZE takes an optional k, M, G, T, P or E suffix (powers of 1024); it may also be\n"
      "given as -o size=SIZE, and defaults to the backing file's size when -b is used.\n"
      "Every option is validated before anything is written.\n"
      "\n"
      "%s"
      "\n"
      "qcow2 options (-o): cluster_size, compat (0.10|v2|1.1|v3), refcount_bits,\n"
      "lazy_refcounts (on|off), extended_l2 (on|off), compression_type (zlib|zstd),\n"
      "backing_file, backing_fmt, preallocation (off|metadata|falloc|full), size.\n"
      "raw options (-o): preallocation (off|falloc|full), size.\n",
      FormatOptionHelp(CreateSpecs()).c_str());
}

// Fills in the backing file's format (probed when not given) and, when no
// size was given, its size. Fails if the backing file cannot be opened, so no
// image is created on top of a missing or broken base.
Status ResolveBacking(const std::string& path, ImageOptions& options) {
  CreateOptions& create = options.create;
  std::string backing_path = ResolveRelativeTo(create.backing_file, path);
  OpenOptions open_opts;
  open_opts.format = create.backing_format;
  open_opts.read_only = true;
  open_opts.open_backing = false;
  Result<std::unique_ptr<BlockDevice>> backing = OpenImage(backing_path, open_opts);
  if (!backing.ok()) {
    return backing.status().WithContext("could not open backing file '" + backing_path + "'");
  }
  Result<ImageInfo> info = (*backing)->Info();
  uint64_t backing_size = (*backing)->size();
  Status closed = CloseImage(std::move(*backing));
  if (!info.ok()) return info.status();
  if (!closed.ok()) return closed;
  if (create.backing_format.empty()) create.backing_format = info->format;
  if (options.given.count("size") == 0) create.size = backing_size;
  return Status::Ok();
}

}  // namespace

int RunCreate(const std::vector<std::string>& args) {
  Result<ParsedArgs> parsed = ParseArgs(args, CreateSpecs());
  if (!parsed.ok()) return Fail(kCmd, parsed.status());
  const ParsedArgs& a = *parsed;
  if (a.Has("help")) {
    PrintHelp();
    return 0;
  }
  std::string format = a.Get("f", "qcow2");
  Status format_ok = CheckFormatName(format, "format");
  if (!format_ok.ok()) return Fail(kCmd, format_ok);
  std::vector<std::string> option_strings = a.GetAll("o");
  if (WantsOptionHelp(option_strings)) {
    std::fputs(ImageOptionHelp(format).c_str(), stdout);
    return 0;
  }
  Result<ImageOptions> options = ParseImageOptions(format, option_strings);
  if (!options.ok()) return Fail(kCmd, options.status());
  CreateOptions& create = options->create;

  if (a.Has("b")) {
    std::string backing = a.Get("b");
    if (backing.empty()) return Fail(kCmd, "the backing file name (-b) is empty");
    if (!create.backing_file.empty() && create.backing_file != backing) {
      return Fail(kCmd, "-b and -o backing_file name different files");
    }
    create.backing_file = backing;
  }
  if (a.Has("F")) {
    std::string backing_format = a.Get("F");
    Status ok = CheckFormatName(backing_format, "backing format");
    if (!ok.ok()) return Fail(kCmd, ok);
    if (!create.backing_format.empty() && create.backing_format != backing_format) {
      return Fail(kCmd, "-F and -o backing_fmt name different formats");
    }
    create.backing_format = backing_format;
  }
  if (create.backing_file.empty() && !create.backing_format.empty()) {
    return Fail(kCmd, "a backing format was given without a backing file (-b)");
  }
  if (format == "raw" && !create.backing_file.empty()) {
    return Fail(kCmd, "raw images cannot have a backing file");
  }

  const std::vector<std::string>& pos = a.positional();
  if (pos.empty()) return Fail(kCmd, "missing FILE (see 'kvblk create --help')");
  if (pos.size() > 2) return Fail(kCmd, "unexpected argument '" + pos[2] + "'");
  const std::string& path = pos[0];
  if (path.empty()) return Fail(kCmd, "the image file name is empty");
  if (pos.size() == 2) {
    Result<uint64_t> size = ParseSize(pos[1]);
    if (!size.ok()) return Fail(kCmd, size.status());
    create.size = *size;
    options->given["size"] = pos[1];
  }
  if (!create.backing_file.empty()) {
    Status st = ResolveBacking(path, *options);
    if (!st.ok()) return Fail(kCmd, st);
  } else if (options->given.count("size") == 0) {
    return Fail(kCmd, "the image size must be given (SIZE or -o size=SIZE)");
  }

  if (!a.Has("q")) std::printf("%s\n", FormattingLine(path, *options).c_str());
  std::fflush(stdout);
  Status st = CreateImage(path, create);
  if (!st.ok()) return Fail(kCmd, st);
  return 0;
}

}  // namespace kvblk::cli
