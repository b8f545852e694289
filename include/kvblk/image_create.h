// Creating images: `kvblk create` and the API behind it.
#ifndef KVBLK_IMAGE_CREATE_H_
#define KVBLK_IMAGE_CREATE_H_

#include <cstdint>
#include <string>

#include "kvblk/status.h"

namespace kvblk {

enum class Preallocation : uint8_t { kOff, kMetadata, kFalloc, kFull };

struct CreateOptions {
  std::string format = "qcow2";  // "qcow2" or "raw"
  uint64_t size = 0;             // virtual size in bytes (0: take the backing file's)
  // qcow2 only
  uint32_t cluster_size = 65536;
  bool compat_v3 = true;  // compat=1.1 (v3); false = 0.10 (v2)
  int refcount_bits = 16;
  bool lazy_refcounts = false;
  bool extended_l2 = false;
  std::string compression_type = "zlib";
  std::string backing_file;
  std::string backing_format;
  Preallocation preallocation = Preallocation::kOff;
};

// Parses a size with an optional k/M/G/T/P/E suffix (powers of 1024; "b" or
// nothing = bytes). InvalidArgument on garbage, overflow or a negative value.
Result<uint64_t> ParseSize(const std::string& text);

// Creates (or truncates) `path` as an empty image with `opts`. Validates every
// option first: nothing is written if an option is invalid.
Status CreateImage(const std::string& path, const CreateOptions& opts);

}  // namespace kvblk

#endif  // KVBLK_IMAGE_CREATE_H_
