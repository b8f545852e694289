// Reference counts of host clusters (docs/interop/qcow2.rst, "Host cluster
// management"): the refcount table in memory, refcount blocks through a
// TableCache, creation of refcount blocks and growth of the table.
//
// Ordering rules kept here:
//  - a new refcount block is written (and synced) before the table entry
//    that points to it;
//  - a grown table is written and synced before the header switches to it,
//    and the old table is freed only after that.
// Callers that make an L2 entry point to a cluster first call
// EnsureDurable(seq()) so the cluster's refcount is on disk before the entry.
#ifndef KVBLK_DISK_REFCOUNT_H_
#define KVBLK_DISK_REFCOUNT_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "disk/async_lock.h"
#include "disk/file.h"
#include "disk/overlap_guard.h"
#include "disk/table_cache.h"
#include "kvblk/status.h"
#include "kvblk/task.h"

namespace kvblk::qcow2 {

// Refcount arithmetic on one refcount block. `order` is refcount_order
// (width = 1 << order bits). Widths below 8 bits are packed LSB first within
// each byte; wider ones are big-endian integers.
uint64_t GetRefcountEntry(const uint8_t* block, uint64_t index, uint32_t order);
void SetRefcountEntry(uint8_t* block, uint64_t index, uint32_t order, uint64_t value);
inline uint64_t MaxRefcount(uint32_t order) {
  return order >= 6 ? ~uint64_t{0} : (uint64_t{1} << (1u << order)) - 1;
}

class Refcounts {
 public:
  struct Config {
    File* file = nullptr;
    uint32_t cluster_bits = 16;
    uint32_t refcount_order = 4;
    uint64_t table_offset = 0;
    uint32_t table_clusters = 0;
    size_t cache_tables = 16;
    // Rewrites the header's refcount_table_offset/clusters and syncs.
    std::function<Task<Status>(uint64_t offset, uint32_t clusters)> switch_table;
    // Metadata overlap protection (null: off). Refcounts adds the refcount
    // blocks and tables it creates to `guard` (in the same step as its
    // table_ changes, and removes an old table once replaced) and checks
    // each of its writes against it: a new block or table against all
    // metadata, a block or table entry write against all but its own kind.
    // A refused write goes to `refuse` (which marks the image corrupt and
    // returns the error), and its status is returned.
    OverlapGuard* guard = nullptr;
    std::function<Task<Status>(Status)> refuse;
  };

  // Reads and validates the refcount table (entries aligned, inside the
  // file); the table itself is trusted no further than that.
  static Task<Result<std::unique_ptr<Refcounts>>> Load(const Config& cfg, uint64_t file_size);

  // The refcount of `cluster` (0 when no block covers it).
  Task<Result<uint64_t>> Get(uint64_t cluster);
  // Adds `delta` to the refcount of `cluster`. Corruption if the result
  // would be negative or exceed the width, or if no block covers a cluster
  // whose count is raised (blocks are created only by EnsureBlock).
  Task<Status> Add(uint64_t cluster, int64_t delta);

  enum class BlockState { kPresent, kPlacedAt, kTableGrew };
  // Makes sure a refcount block covers `cluster`, for the allocator:
  //  kPresent  - a block exists;
  //  kPlacedAt - a new block was put in `cluster` itself (now refcount 1);
  //  kTableGrew- the table was grown at the end of the file; rescan.
  Task<Result<BlockState>> EnsureBlock(uint64_t cluster);

  // Sequence number of the latest refcount change.
  uint64_t seq() const { return seq_; }
  // Returns once every change up to `seq` is written and synced. If
  // `synced` is given, it is set to whether this call itself synced the file
  // (a sync that began after the call, covering every write completed
  // before it).
  Task<Status> EnsureDurable(uint64_t seq, bool* synced = nullptr);
  // Writes back dirty blocks (no sync).
  Task<Status> Flush() { return cache_->Flush(); }

  // Clusters in the file as far as allocation is concerned (grows with
  // appends; never shrinks).
  uint64_t file_clusters() const { return file_clusters_; }
  void NoteFileClusters(uint64_t n) {
    if (n > file_clusters_) file_clusters_ = n;
  }
  uint64_t table_offset() const { return table_offset_; }
  uint32_t table_clusters() const { return table_clusters_; }
  const std::vector<uint64_t>& table() const { return table_; }
  uint64_t entries_per_block() const { return entries_per_block_; }
  uint32_t order() const { return order_; }
  TableCache& cache() { return *cache_; }

 private:
  explicit Refcounts(const Config& cfg);
  Task<Status> GrowTable(uint64_t need_index);
  // file_->Write, after the overlap check (see Config::guard).
  Task<Status> GuardedWrite(const void* buf, size_t len, uint64_t offset, MetadataMask ignore,
                            const char* what);
  Status CheckBlockOffset(uint64_t index, uint64_t off) const;

  File* file_;
  uint32_t cluster_bits_;
  uint64_t cluster_size_;
  uint32_t order_;
  uint64_t entries_per_block_;
  uint64_t table_offset_;
  uint32_t table_clusters_;
  std::vector<uint64_t> table_;
  std::unique_ptr<TableCache> cache_;
  std::function<Task<Status>(uint64_t, uint32_t)> switch_table_;
  OverlapGuard* guard_;
  std::function<Task<Status>(Status)> refuse_;
  uint64_t file_clusters_ = 0;
  uint64_t seq_ = 0;
  uint64_t durable_seq_ = 0;
  AsyncMutex durable_mu_;
};

}  // namespace kvblk::qcow2

#endif  // KVBLK_DISK_REFCOUNT_H_
