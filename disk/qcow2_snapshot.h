// The qcow2 snapshot table (docs/interop/qcow2.rst, "Snapshots"): decoding
// for listing and for reference tracking.
#ifndef KVBLK_DISK_QCOW2_SNAPSHOT_H_
#define KVBLK_DISK_QCOW2_SNAPSHOT_H_

#include <cstdint>
#include <string>
#include <vector>

#include "kvblk/block_device.h"
#include "kvblk/status.h"

namespace kvblk::qcow2 {

struct Snapshot {
  uint64_t l1_table_offset = 0;
  uint32_t l1_size = 0;
  SnapshotInfo info;
  std::vector<uint8_t> extra;  // extra data, kept verbatim
};

// Decodes `count` entries from `buf` (the table, read from the image).
// Corruption if an entry overruns the buffer, has a misaligned L1 offset or an
// L1 table larger than the limits; `file_size` bounds the L1 tables.
Result<std::vector<Snapshot>> DecodeSnapshotTable(const std::vector<uint8_t>& buf,
                                                  uint32_t count, uint32_t cluster_bits,
                                                  uint64_t file_size, const std::string& file);

}  // namespace kvblk::qcow2

#endif  // KVBLK_DISK_QCOW2_SNAPSHOT_H_
