#include "tools/backing_chain.h"

#include <memory>
#include <utility>

#include "tools/cli_util.h"

namespace kvblk::cli {

Result<ImageInfo> ReadImageInfo(const std::string& path, const std::string& format) {
  OpenOptions opts;
  opts.format = format;
  opts.read_only = true;
  opts.open_backing = false;
  Result<std::unique_ptr<BlockDevice>> dev = OpenImage(path, opts);
  if (!dev.ok()) return dev.status();
  Result<ImageInfo> info = (*dev)->Info();
  Status closed = CloseImage(std::move(*dev));
  if (!info.ok()) return info.status();
  if (!closed.ok()) return closed;
  return info;
}

Result<std::vector<ChainImage>> ReadBackingChain(const std::string& path, const std::string& format,
                                                 int max_depth) {
  std::vector<ChainImage> chain;
  std::string next_path = path;
  std::string next_format = format;
  while (true) {
    Result<ImageInfo> info = ReadImageInfo(next_path, next_format);
    if (!info.ok()) return info.status();
    chain.push_back({next_path, std::move(*info)});
    const ImageInfo& top = chain.back().info;
    if (top.backing_filename.empty()) break;
    if (static_cast<int>(chain.size()) > max_depth) {
      return Status::InvalidArgument("backing chain of '" + path + "' is longer than " +
                                     std::to_string(max_depth) + " images (or has a loop)");
    }
    next_path = top.full_backing_filename.empty()
                    ? ResolveRelativeTo(top.backing_filename, chain.back().path)
                    : top.full_backing_filename;
    next_format = top.backing_format;
  }
  return chain;
}

}  // namespace kvblk::cli
