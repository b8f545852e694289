// Cluster compression for qcow2: raw deflate (compression_type zlib, no
// zlib header, 4 KiB window as QEMU writes it) and zstd.
#ifndef KVBLK_DISK_COMPRESS_H_
#define KVBLK_DISK_COMPRESS_H_

#include <cstdint>
#include <vector>

#include "kvblk/status.h"

namespace kvblk::qcow2 {

// Decompresses `in` into exactly `out_len` bytes at `out`. Corruption if the
// stream is invalid or yields fewer bytes. Trailing input bytes are ignored
// (the compressed size on disk is rounded up to sectors).
Status Decompress(uint8_t type, const uint8_t* in, size_t in_len, uint8_t* out, size_t out_len);

// Compresses `in`; returns an empty vector when the result would not be
// smaller than `max_out` bytes (the caller then writes the cluster as is).
Result<std::vector<uint8_t>> Compress(uint8_t type, const uint8_t* in, size_t in_len,
                                      size_t max_out);

}  // namespace kvblk::qcow2

#endif  // KVBLK_DISK_COMPRESS_H_
