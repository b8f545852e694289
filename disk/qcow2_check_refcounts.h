// The stored side of the qcow2 checker (disk/qcow2_check.h): reading the
// refcount table and blocks as they are on disk, changing refcounts in
// place, and writing a complete new refcount structure when the old one is
// beyond repair (qcow2.rst, "Host cluster management").
#ifndef KVBLK_DISK_QCOW2_CHECK_REFCOUNTS_H_
#define KVBLK_DISK_QCOW2_CHECK_REFCOUNTS_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <unordered_set>
#include <utility>
#include <vector>

#include "disk/qcow2_check_scan.h"
#include "disk/sync_file.h"
#include "kvblk/status.h"

namespace kvblk::qcow2::check {

class StoredRefcounts {
 public:
  // Reads the refcount table (`table_clusters` clusters at `table_offset`,
  // already validated by DecodeHeader) and the refcount blocks that cover
  // clusters [0, preload_clusters). Blocks past the end of the file read as
  // zeros (so their refcounts are 0), as they do for qemu.
  static Result<std::unique_ptr<StoredRefcounts>> Load(const SyncFile& file, const Geometry& geo,
                                                       uint64_t table_offset,
                                                       uint32_t table_clusters,
                                                       uint64_t preload_clusters);

  // The stored refcount of `cluster`: 0 where the table has no block for
  // it; nullopt where its block offset is not cluster aligned or the block
  // cannot be read (qemu fails such lookups with EIO). Thread-safe.
  std::optional<uint64_t> Get(uint64_t cluster) const;
  // Whether a block with an aligned offset covers `cluster`, so that its
  // refcount can be changed in place.
  bool Covered(uint64_t cluster) const;
  // Sets the stored refcounts of the given clusters (each Covered() and
  // below the preload limit), writing every changed block once. Not synced.
  Status Apply(SyncFile* file, const std::vector<std::pair<uint64_t, uint64_t>>& changes);

  // The raw table entries (reserved bits included).
  const std::vector<uint64_t>& table() const { return table_; }
  uint64_t entries_per_block() const { return entries_per_block_; }

 private:
  StoredRefcounts(const SyncFile& file, const Geometry& geo)
      : file_(file), geo_(geo), entries_per_block_((geo.cluster_size * 8) >> geo.refcount_order) {}
  uint64_t BlockOffset(uint64_t index) const;

  const SyncFile& file_;
  const Geometry geo_;
  uint64_t entries_per_block_;
  std::vector<uint64_t> table_;
  std::vector<std::vector<uint8_t>> blocks_;  // preloaded, by table index (empty: none)
  std::unordered_set<uint64_t> unreadable_;   // table indexes whose block read failed
};

// A refcount structure written from scratch at the end of the file.
struct NewRefcountStructure {
  uint64_t table_offset = 0;
  uint32_t table_clusters = 0;
  uint64_t prefix_offset = 0;  // where `prefix` went (0 if it was empty)
  uint64_t end_offset = 0;     // the file's new end
};

// Writes, starting at cluster `end_cluster` (the first cluster past
// everything in use): `prefix` (e.g. a new snapshot table, cluster aligned),
// then refcount blocks for every block range that has a cluster in use,
// then the refcount table. Refcounts come from `refcount(cluster)` for the
// clusters below `end_cluster`; every new cluster gets refcount 1. Nothing
// refers to the new structure until the caller switches the header to it
// (after syncing). NotSupported if the table would exceed the format's
// limit; I/O errors as they come.
Result<NewRefcountStructure> WriteNewRefcountStructure(
    SyncFile* file, const Geometry& geo, uint64_t end_cluster,
    const std::function<uint64_t(uint64_t)>& refcount, const std::vector<uint8_t>& prefix);

}  // namespace kvblk::qcow2::check

#endif  // KVBLK_DISK_QCOW2_CHECK_REFCOUNTS_H_
