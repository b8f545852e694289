// kvblk resize: changes the virtual size of an image (qemu-img resize).
//
// As in qemu-img, the size is always the last argument and is taken before
// the options are parsed, so "-1G" is a size, not an option.
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "disk/qcow2_device.h"
#include "kvblk/block_device.h"
#include "kvblk/event_loop.h"
#include "kvblk/image_create.h"
#include "tools/cli_util.h"
#include "tools/commands.h"
#include "tools/image_options.h"

namespace kvblk::cli {

namespace {

constexpr const char* kCmd = "resize";

std::vector<OptionSpec> ResizeSpecs() {
  return {
      {'f', "", "FMT", "image format: qcow2 or raw (default: probed from the file)"},
      {0, "shrink", "", "allow the image to shrink (data past the new end is deleted)"},
      {'q', "", "", "quiet: do not print 'Image resized.'"},
      HelpOption(),
  };
}

void PrintHelp() {
  std::printf(
      "usage: kvblk resize [-q] [-f FMT] [--shrink] FILE [+|-]SIZE\n"
      "\n"
      "Sets the virtual size of FILE to SIZE, or grows (+SIZE) or shrinks (-SIZE) it by\n"
      "that much. SIZE takes an optional k, M, G, T, P or E suffix (powers of 1024) and\n"
      "must come out as a positive multiple of 512. Shrinking deletes every byte past\n"
      "the new end and is refused unless --shrink is given. A qcow2 image's internal\n"
      "snapshots keep their own size (a compat=0.10 image with snapshots cannot be\n"
      "resized). A raw image is truncated or extended. The image must not be in use.\n"
      "\n"
      "%s",
      FormatOptionHelp(ResizeSpecs()).c_str());
}

// The new size from the SIZE argument and the current size.
Result<uint64_t> NewSize(const std::string& text, uint64_t current) {
  char sign = 0;
  std::string digits = text;
  if (!text.empty() && (text[0] == '+' || text[0] == '-')) {
    sign = text[0];
    digits = text.substr(1);
  }
  Result<uint64_t> value = ParseSize(digits);
  if (digits.empty() || !value.ok()) {
    return Status::InvalidArgument(
        "Parameter 'size' expects a non-negative number below 2^64; optional suffix k, M, G, "
        "T, P or E means kilo-, mega-, giga-, tera-, peta- and exabytes, respectively");
  }
  uint64_t size = *value;
  if (sign == '+') {
    if (size > UINT64_MAX - current) return Status::InvalidArgument("The new size is too large");
    size = current + size;
  } else if (sign == '-') {
    if (size >= current) return Status::InvalidArgument("New image size must be positive");
    size = current - size;
  }
  if (size == 0) return Status::InvalidArgument("New image size must be positive");
  return size;
}

}  // namespace

int RunResize(const std::vector<std::string>& all_args) {
  for (const std::string& arg : all_args) {
    if (arg == "--help" || arg == "-h") {
      PrintHelp();
      return 0;
    }
  }
  if (all_args.size() < 2) return Fail(kCmd, "Not enough arguments (see 'kvblk resize --help')");
  const std::string size_text = all_args.back();
  std::vector<std::string> args(all_args.begin(), all_args.end() - 1);
  Result<ParsedArgs> parsed = ParseArgs(args, ResizeSpecs());
  if (!parsed.ok()) return Fail(kCmd, parsed.status());
  const ParsedArgs& a = *parsed;
  const std::vector<std::string>& pos = a.positional();
  if (pos.empty()) return Fail(kCmd, "Expecting image file name and size");
  if (pos.size() > 1) return Fail(kCmd, "unexpected argument '" + pos[1] + "'");
  const std::string& path = pos[0];
  std::string format = a.Get("f");
  if (a.Has("f")) {
    Status ok = CheckFormatName(format, "format");
    if (!ok.ok()) return Fail(kCmd, ok);
  }
  const bool shrink = a.Has("shrink");

  OpenOptions o;
  o.format = format;
  Result<std::unique_ptr<BlockDevice>> dev = OpenImage(path, o);
  if (!dev.ok()) return Fail(kCmd, dev.status());
  const uint64_t current = (*dev)->size();
  Result<ImageInfo> info = (*dev)->Info();
  Result<uint64_t> size = NewSize(size_text, current);
  Status st = info.ok() ? Status::Ok() : info.status();
  if (st.ok() && !size.ok()) st = size.status();
  if (st.ok() && *size % 512 != 0) {
    st = Status::InvalidArgument("The new size must be a multiple of 512");
  }
  if (st.ok() && *size < current && !shrink) {
    st = Status::InvalidArgument(
        "Use the --shrink option to perform a shrink operation (shrinking deletes all data "
        "past the new end)");
  }
  const bool raw = info.ok() && info->format == "raw";
  if (st.ok() && !raw) {
    st = RunSync(static_cast<qcow2::Qcow2Device*>(dev->get())->Resize(*size, shrink));
  }
  Status closed = CloseImage(std::move(*dev));
  if (st.ok()) st = closed;
  if (st.ok() && raw && ::truncate(path.c_str(), static_cast<off_t>(*size)) != 0) {
    st = Status::FromErrno(errno,
                           path + ": could not truncate to " + std::to_string(*size) + " bytes");
  }
  if (!st.ok()) return Fail(kCmd, st);
  if (!a.Has("q")) std::printf("Image resized.\n");
  return 0;
}

}  // namespace kvblk::cli
