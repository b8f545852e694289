// The qcow2 checker's view of the snapshot table and of the persistent
// bitmap directory (qcow2.rst, "Snapshots" and "Bitmaps"). Unlike
// DecodeSnapshotTable (which refuses an image with any bad entry), these
// readers only refuse what makes the table unreadable; per-entry problems
// (a misaligned or oversized snapshot L1 table) are left for the checker
// to report and repair.
#ifndef KVBLK_DISK_QCOW2_CHECK_TABLES_H_
#define KVBLK_DISK_QCOW2_CHECK_TABLES_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "disk/qcow2_check_scan.h"
#include "disk/qcow2_header.h"
#include "disk/sync_file.h"
#include "kvblk/status.h"

namespace kvblk::qcow2::check {

struct SnapshotEntry {
  uint64_t l1_offset = 0;
  uint32_t l1_size = 0;
  uint32_t extra_size = 0;  // bytes of extra data
  std::string id;
  std::string name;
  std::vector<uint8_t> raw;  // the whole entry as stored, padding included

  // qcow2.rst: version 3 entries carry extra data up to byte 55 (the 64-bit
  // VM state size and the disk size); qemu calls shorter ones incomplete.
  bool Incomplete(uint32_t version) const { return version >= 3 && extra_size < 16; }
  // More extra data than qemu accepts (1024 bytes).
  bool ExcessExtra() const;

  // "snapshot ID (NAME)", as qemu names snapshots in messages.
  std::string Label() const { return "snapshot " + id + " (" + name + ")"; }
};

struct SnapshotTable {
  std::vector<SnapshotEntry> entries;
  uint64_t bytes = 0;  // size of the table on disk
};

// Reads the `h.nb_snapshots` entries at `h.snapshots_offset`. Corruption if
// the table runs past 64 MiB; I/O errors as they come.
Result<SnapshotTable> ReadSnapshotTable(const SyncFile& file, const Header& h);

// `e` as a repair writes it back: extra data cut to 1024 bytes and, when
// incomplete in a version 3 image, completed with the 64-bit VM state size
// (from the 32-bit field) and `disk_size`.
std::vector<uint8_t> RepairedSnapshotEntry(const SnapshotEntry& e, uint32_t version,
                                           uint64_t disk_size);

// The persistent bitmaps the image declares (only when the bitmaps
// autoclear bit says they are valid, as qemu does).
struct BitmapDirectory {
  uint64_t offset = 0;
  uint64_t size = 0;
  struct Bitmap {
    uint64_t table_offset = 0;
    uint32_t table_size = 0;  // entries
  };
  std::vector<Bitmap> bitmaps;
};

// nullopt when the image has no (valid) bitmaps extension. Corruption for
// an extension or directory that cannot be parsed.
Result<std::optional<BitmapDirectory>> ReadBitmapDirectory(const SyncFile& file, const Header& h,
                                                           const Geometry& geo);

// Counts the bitmap directory, each bitmap table and the clusters its
// entries name, as qemu does; an entry with reserved bits or a misaligned
// offset is a corruption. I/O errors reading the tables.
Status CountBitmapReferences(const ScanContext& ctx, const BitmapDirectory& dir, Findings* out);

// Marks the clusters of the bitmap directory, tables and data in `meta`.
Status MarkBitmapClusters(const SyncFile& file, const Geometry& geo, const BitmapDirectory& dir,
                          std::vector<uint8_t>* meta);

}  // namespace kvblk::qcow2::check

#endif  // KVBLK_DISK_QCOW2_CHECK_TABLES_H_
