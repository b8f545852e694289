// Allocator: hands out host clusters (and byte ranges for compressed
// clusters) with their refcounts raised, and frees clusters once the
// metadata that referred to them is on disk.
//
// Free clusters are found by scanning refcounts from a cursor (lowered by
// every free) and otherwise appended at the end of the file. Clusters with
// data I/O in flight (BeginIo/EndIo) are never handed out, so a read or an
// in-place write that races with a discard can never land in a cluster that
// was already given to someone else.
//
// Pre-allocation (EnablePool): Allocate() serves runs from a volatile pool
// of clusters whose refcounts were raised in one batch, so concurrent
// allocating writes share one refcount update and rarely wait on the
// refcount blocks. When the pool falls below its low mark a background
// refill (on the home loop) tops it up to the high mark; the marks double
// when allocations found the pool empty and halve when a refill finds it
// still half full. ReleasePool() returns every pooled cluster (clean close:
// no leaks); after a crash pooled clusters are leaks, never corruption
// (nothing points to them).
//
// Pre-extension (issue 7): ext4 cannot issue an O_DIRECT write that moves
// the end of the file without punting it to a worker and serialising it, so
// allocating writes into appended clusters would not scale with queue depth.
// On a writable O_DIRECT file (alignment() > 1) the allocator therefore
// keeps the host file physically longer than the clusters it hands out:
// before a run ending within half a step of the extended end is handed out,
// the file is extended with File::WriteZeroes(allocate=true) (fallocate
// zero range: unwritten extents that read as zeros, the size moves). Steps
// are max(8 MiB, 1/8 of the file), at most 256 MiB, whole clusters.
//  - Extension only ever covers bytes at or past both the end of the last
//    extension and file_clusters(): nothing was handed out there, so zeroing
//    them destroys nothing, even with writes in flight elsewhere.
//  - `fresh` stays tied to file_clusters() (the logical end), not to the
//    physical size: the pre-extended space reads as zeros.
//  - A failed extension, or one the host did with ordinary writes (the range
//    then reads back as data), turns pre-extension off; it is advisory and
//    never fails an allocation.
//  - ReleasePool() (clean close) truncates the file back to the end of the
//    last cluster in use, but never below the size it had before the first
//    extension. After a crash the extended tail is part of the file: its
//    clusters have refcount 0, are reused by later allocations (not fresh)
//    and are neither leaks nor corruption. Pooled clusters there are leaks,
//    as before, now visible to checks (they lie inside the file).
//  - Read-only files, MemFile and the other test files (alignment 1) are
//    never extended, nor is a file already longer than its logical end
//    before the first extension (a block device).
//
// Frees are deferred: DeferFree() records a cluster whose last reference was
// removed from an L2 or L1 table in memory; ApplyDeferredFrees() drops the
// refcounts, and must only be called once those table changes are durable
// (the "L2 entry cleared before refcount drops" rule).
#ifndef KVBLK_DISK_ALLOCATOR_H_
#define KVBLK_DISK_ALLOCATOR_H_

#include <atomic>
#include <cstdint>
#include <deque>
#include <limits>
#include <memory>
#include <mutex>
#include <unordered_set>
#include <utility>
#include <vector>

#include "disk/async_lock.h"
#include "disk/refcount.h"

namespace kvblk::qcow2 {

class Allocator {
 public:
  // Pre-extends `file` (see above) when it is writable and O_DIRECT.
  Allocator(Refcounts* refcounts, File* file, uint32_t cluster_bits)
      : rc_(refcounts),
        file_(file),
        cluster_bits_(cluster_bits),
        extend_on_(!file->read_only() && file->alignment() > 1) {}

  struct Run {
    uint64_t offset;  // host byte offset of the first cluster
    uint64_t count;   // clusters, >= 1
    // The run lies past every cluster the image ever used: its bytes read
    // as zeros without being written.
    bool fresh = false;
  };
  // Allocates a run of 1..n contiguous clusters, each with refcount 1.
  Task<Result<Run>> Allocate(uint64_t n);

  // Turns pre-allocation on, keeping at most `max_clusters` pooled.
  void EnablePool(uint64_t max_clusters);
  // Drops the refcount of every pooled cluster (they are referenced by
  // nothing) and turns pre-allocation off. Waits for a running refill.
  // Then, if this allocator pre-extended the file, truncates it to the end
  // of the last cluster with a non-zero refcount (at least the size before
  // the first extension); the truncation is advisory (a failure only costs
  // space). Call it on close only: with no data I/O in flight and after the
  // last allocation. Returns the first refcount error.
  Task<Status> ReleasePool();
  uint64_t pooled_clusters() const { return pool_clusters_; }
  uint64_t pool_high_mark() const { return high_; }
  // Allocates exactly n contiguous clusters (for tables), at the file end.
  Task<Result<uint64_t>> AllocateContiguous(uint64_t n);

  // Pre-extension (see the top of this file). One past the last byte this
  // allocator made the file extend to; 0 before the first extension (and
  // after ReleasePool trimmed the file).
  uint64_t extended_to() const { return extended_to_; }
  // Whether runs at the end are still pre-extended (false once an
  // extension failed or was done with writes; always false for files that
  // are read-only or not O_DIRECT).
  bool extending() const { return extend_on_; }
  static constexpr uint64_t kExtendMinBytes = uint64_t{8} << 20;
  static constexpr uint64_t kExtendMaxBytes = uint64_t{256} << 20;
  // Allocates `len` bytes (<= one cluster) for a compressed cluster; the
  // host clusters it touches get one more reference each.
  Task<Result<uint64_t>> AllocateBytes(uint64_t len);

  // Records a reference dropped from in-memory metadata: `count` clusters
  // from host byte offset `offset` each lose one reference later.
  void DeferFree(uint64_t offset, uint64_t count);
  size_t deferred_count() const { return deferred_.size(); }
  using FreeList = std::vector<std::pair<uint64_t, uint64_t>>;  // (host offset, clusters)
  // Takes the frees recorded so far (to be applied once durable).
  FreeList TakeDeferred() {
    FreeList l;
    l.swap(deferred_);
    return l;
  }
  // Applies frees taken by TakeDeferred(). Precondition: every table change
  // that dropped those references is durable. Clusters that reach refcount 0
  // are punched out of the host file.
  Task<Status> ApplyFrees(FreeList frees);

  // Thread-safe and lock-free: mark data I/O on a host cluster as started /
  // finished. Every request pins the clusters it reads or writes in place.
  //
  // Pins are counted in kPinSlots counters indexed by the cluster number
  // modulo kPinSlots. Two clusters kPinSlots apart share a counter, so a
  // free cluster may look pinned while the other one has I/O in flight:
  // allocation then passes it over and comes back later (as for a real
  // pin). The reverse, a pinned cluster that looks free, cannot happen.
  // The counters and the passed-over flag fill one 4 KiB page of the
  // allocator, so that a read pinning and another unpinning touch that page
  // and nothing else of it (see disk/hot.h). With a few dozen requests in
  // flight, a free cluster looks pinned a few percent of the time.
  static constexpr size_t kPinSlots = 1023;
  void BeginIo(uint64_t host_cluster) {
    pins_.count[host_cluster % kPinSlots].fetch_add(1, std::memory_order_seq_cst);
  }
  void EndIo(uint64_t host_cluster) {
    const size_t slot = host_cluster % kPinSlots;
    if (pins_.count[slot].fetch_sub(1, std::memory_order_seq_cst) != 1) return;
    // Seq_cst pairs with IsFree(): either it sees this counter at zero, or
    // this load sees its passed_any and the lock waits for its insertion.
    if (!pins_.passed_any.load(std::memory_order_seq_cst)) return;
    ReleasePassedOver(slot);
  }

 private:
  // Whether `cluster` can be handed out.
  Task<Result<bool>> IsFree(uint64_t cluster);
  // Allocate() without the pool. Requires mu_.
  Task<Result<Run>> AllocateLocked(uint64_t n);
  // Tops the pool up to `target` clusters. Requires mu_.
  Task<Status> RefillLocked(uint64_t target);
  // The background refill started when the pool runs low.
  Task<void> BackgroundRefill();
  // Pre-extends the file so that it reaches at least half a step past
  // `end` (one past the last byte about to be handed out). Advisory: turns
  // pre-extension off on failure. Requires mu_, and must run before
  // NoteFileClusters() covers the run (the run itself is extended too).
  Task<void> ExtendAhead(uint64_t end);
  // Whether ExtendAhead(end) has anything to do: checked inline by the
  // allocation paths so that the common case costs no coroutine frame.
  bool ExtendDue(uint64_t end) const;
  // Where the next extension starts, and how far it goes past that.
  uint64_t ExtendFrom() const;
  uint64_t ExtendStep(uint64_t from) const;
  // ReleasePool()'s truncation. Requires mu_.
  Task<void> TrimExtension();

  Refcounts* rc_;
  File* file_;
  uint32_t cluster_bits_;
  AsyncMutex mu_;
  uint64_t cursor_ = 0;
  uint64_t compressed_next_ = 0;  // next free byte in the compressed cluster, or 0
  FreeList deferred_;
  // Pre-allocation; all of it the home loop's.
  bool pool_on_ = false;
  std::deque<Run> pool_;
  uint64_t pool_clusters_ = 0;
  uint64_t pool_max_ = 0;
  uint64_t high_ = 0;          // refill target
  bool ran_dry_ = false;       // an Allocate() found the pool empty since the last refill
  bool refilling_ = false;
  AsyncEvent* refill_done_ = nullptr;  // set while a background refill runs
  Status refill_status_;       // a failed background refill, reported by the next Allocate
  // Pre-extension; the home loop's, under mu_.
  bool extend_on_ = false;    // set by the constructor for writable O_DIRECT files
  uint64_t extended_to_ = 0;  // end of the last extension, bytes; 0: none yet
  uint64_t extend_base_ = 0;  // file size before the first extension
  // EndIo() found counter `slot` at zero with clusters passed over: those
  // of that slot are usable again (the cursor comes back to them).
  void ReleasePassedOver(size_t slot);

  // Pins may be taken and released on any I/O thread; everything above is
  // the home loop's.
  struct alignas(4096) Pins {
    std::atomic<uint32_t> count[kPinSlots] = {};
    std::atomic<bool> passed_any{false};  // passed_over_ may be non-empty
  };
  static_assert(sizeof(Pins) == 4096);
  Pins pins_;
  std::mutex pin_mu_;
  std::unordered_set<uint64_t> passed_over_;                    // guarded by pin_mu_
  uint64_t released_min_ = std::numeric_limits<uint64_t>::max();  // guarded by pin_mu_
};

}  // namespace kvblk::qcow2

#endif  // KVBLK_DISK_ALLOCATOR_H_
