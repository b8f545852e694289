// The qcow2 snapshot table (docs/interop/qcow2.rst, "Snapshots"): decoding
// for listing and for reference tracking, encoding for snapshot create and
// delete, and qemu-img's rules for naming and finding snapshots.
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
Result<std::vector<Snapshot>> DecodeSnapshotTable(const std::vector<uint8_t>& buf, uint32_t count,
                                                  uint32_t cluster_bits, uint64_t file_size,
                                                  const std::string& file);

// Size of the extra data kvblk writes for a new snapshot: the 64-bit VM
// state size, the virtual disk size and the icount (24 bytes, as qemu).
constexpr uint32_t kSnapshotExtraBytes = 24;
// Longest snapshot ID and name accepted for a new snapshot (qemu keeps
// 127 and 255 bytes).
constexpr size_t kMaxSnapshotIdBytes = 127;
constexpr size_t kMaxSnapshotNameBytes = 255;

// Encodes `snapshots` as an on-disk snapshot table: each entry's fixed part,
// its extra data (`extra` verbatim), ID and name, padded to 8 bytes. The
// 32-bit VM state size field holds the low 32 bits of info.vm_state_size.
// Inverse of DecodeSnapshotTable for the entries it accepts.
std::vector<uint8_t> EncodeSnapshotTable(const std::vector<Snapshot>& snapshots);

// The extra data of a new snapshot: 64-bit VM state size, disk size and
// icount (all big-endian; an absent icount is stored as all ones).
std::vector<uint8_t> EncodeSnapshotExtra(const SnapshotInfo& info);

// The ID qemu gives the next snapshot: one more than the largest ID that is
// a decimal number (IDs that are not numbers are ignored), as a string.
std::string NextSnapshotId(const std::vector<Snapshot>& snapshots);

// Lookup orders of qemu-img 7.2: `snapshot -a` tries the IDs first, then the
// names; `snapshot -d` finds by name. Delete through the device API also
// accepts an ID when no name matches (kNameThenId).
enum class SnapshotLookup { kIdThenName, kNameThenId, kNameOnly };

// Index of the first snapshot matching `name_or_id` in `order`, or -1.
int FindSnapshot(const std::vector<Snapshot>& snapshots, const std::string& name_or_id,
                 SnapshotLookup order);

}  // namespace kvblk::qcow2

#endif  // KVBLK_DISK_QCOW2_SNAPSHOT_H_
