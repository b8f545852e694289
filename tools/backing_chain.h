// Walking an image's backing chain one file at a time, for `info
// --backing-chain` and for convert's "destination is a source" check.
#ifndef KVBLK_TOOLS_BACKING_CHAIN_H_
#define KVBLK_TOOLS_BACKING_CHAIN_H_

#include <string>
#include <vector>

#include "kvblk/block_device.h"
#include "kvblk/status.h"

namespace kvblk::cli {

struct ChainImage {
  std::string path;  // as given for the top image, resolved for backing files
  ImageInfo info;
};

// The ImageInfo of `path` alone (opened read-only, backing file not opened).
// `format` "" probes.
Result<ImageInfo> ReadImageInfo(const std::string& path, const std::string& format);

// ReadImageInfo for `path` and then for each backing file in turn, top
// first. Each backing file is found through the full backing file name its
// overlay reports (relative names resolved against the overlay's directory)
// and opened with the recorded backing format (probed if none). Fails with
// the error of the first image that cannot be read, or InvalidArgument if the
// chain is longer than `max_depth` backing files (which also stops loops).
Result<std::vector<ChainImage>> ReadBackingChain(const std::string& path, const std::string& format,
                                                 int max_depth = 16);

}  // namespace kvblk::cli

#endif  // KVBLK_TOOLS_BACKING_CHAIN_H_
