// Qcow2Device: a BlockDevice over a qcow2 image (docs/interop/qcow2.rst).
//
// Structure: the header and L1 table live in memory; L2 tables and refcount
// blocks go through TableCaches; the Allocator hands out clusters.
//
// Concurrency. Requests may come from coroutines on any number of event
// loops (one per I/O thread). The device has a home loop, the one it was
// opened on; all metadata state (refcounts, allocator, cluster locks, table
// loading and write-back, header) belongs to it. A request's fast path runs
// on its own loop: a lookup that hits the L2 cache (TableCache::Peek, under
// the cache's short mutex), then the data I/O on the caller's io_uring. An
// L2 miss, an allocating write, a discard, write zeroes, flush and the rest
// hop to the home loop (EventLoop::Enter) and back. So reads and in-place
// overwrites scale over threads while metadata changes stay single-threaded.
//  - image_lock_: every request holds it shared; changes of the L1 table
//    layout (growth, snapshot copy, resize) take it exclusive.
//  - cluster locks: an allocating write, copy on write, discard or write
//    zeroes holds the locks of the guest clusters whose mapping it changes.
//    Reads and in-place overwrites of clusters with COPIED set take none.
//  - l1_mu_: allocation and copy on write of L2 tables (rare).
//  - l1_ entries are read by fast paths with atomic loads; they change on
//    the home loop (atomic stores) or under image_lock_ exclusive.
//  - a host cluster a request reads or writes is pinned with the allocator
//    (IoPins) inside the same critical section as its lookup, so a racing
//    discard can never get it reused while the I/O is in flight.
//
// On-disk ordering (crash may leak, never corrupt):
//  - a cluster's refcount is durable before an L2 table pointing to it is
//    written (the L2 cache's writer waits for Refcounts::EnsureDurable);
//  - so is the data of a newly allocated cluster (the guest's data and the
//    copy-on-write parts): the L2 cache's writer syncs first when data was
//    written since the last sync (like qemu's "L2 cache depends on flush");
//  - an L2 table is written and synced before the L1 entry pointing to it;
//  - a reference removed from an L2/L1 table is durable before the
//    cluster's refcount is dropped (Allocator deferred frees, applied on
//    Flush);
//  - nothing else is synced except on the guest's Flush.
//
// Metadata overlap protection (OpenOptions::overlap_check, qcow2_guard.cc):
// on a writable image every host write is checked against guard_, which
// knows where all metadata lives. Data writes may touch none of it; a
// metadata write may touch only its own kind. A refused write fails with
// IoError and marks the image corrupt (SignalCorruption). guard_ is kept
// current two ways:
//  - incrementally, where metadata appears or goes during normal I/O: a new
//    or copied L2 table (GetL2ForWrite, in the same step as the l1_ store),
//    a new refcount block or table (Refcounts, with its table_ update), the
//    snapshot table and L1 copies a snapshot writes before requests resume;
//  - rebuilt from the in-memory state and the snapshots' L1 tables
//    (RebuildOverlapGuard) at open and at the end of every snapshot and
//    resize operation, before requests that could reuse freed clusters run.
#ifndef KVBLK_DISK_QCOW2_DEVICE_H_
#define KVBLK_DISK_QCOW2_DEVICE_H_

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "disk/allocator.h"
#include "disk/async_lock.h"
#include "disk/cluster_lock.h"
#include "disk/file.h"
#include "disk/hot.h"
#include "disk/known_zero.h"
#include "disk/overlap_guard.h"
#include "disk/qcow2_header.h"
#include "disk/qcow2_snapshot.h"
#include "disk/refcount.h"
#include "disk/table_cache.h"
#include "kvblk/block_device.h"
#include "kvblk/event_loop.h"
#include "kvblk/image_create.h"

namespace kvblk {

// Opens any image asynchronously (used for backing files); depth counts the
// backing chain so far.
Task<Result<std::unique_ptr<BlockDevice>>> OpenImageAsync(const std::string& path,
                                                          const OpenOptions& opts, int depth);

namespace qcow2 {

class Qcow2Device final : public BlockDevice {
 public:
  // Opens the qcow2 image in `file`. `depth` is this image's position in a
  // backing chain (0 for the top). Errors: see DecodeHeader, plus
  // Corruption for a marked-corrupt image opened writable, NotSupported for
  // an image left dirty when opened writable (until repair exists),
  // NotFound/... for a backing file. Images with extended L2 entries
  // (subclusters, qcow2.rst "Extended L2 Entries") are read and written.
  static Task<Result<std::unique_ptr<Qcow2Device>>> Open(std::unique_ptr<File> file,
                                                         const OpenOptions& opts, int depth);
  ~Qcow2Device() override;

  Task<Status> Read(uint64_t offset, const iovec* iov, int iovcnt) override;
  Task<Status> Write(uint64_t offset, const iovec* iov, int iovcnt) override;
  Task<Status> Flush() override;
  Task<Status> Discard(uint64_t offset, uint64_t length) override;
  Task<Status> WriteZeroes(uint64_t offset, uint64_t length, bool may_unmap) override;
  Task<Result<BlockStatus>> GetBlockStatus(uint64_t offset, uint64_t max_length) override;
  Task<Status> WriteCompressed(uint64_t offset, const void* buf, size_t len) override;
  Task<Status> Close() override;
  // Any thread (virtio reads the capacity while a resize may run).
  uint64_t size() const override {
    return std::atomic_ref<uint64_t>(const_cast<uint64_t&>(header_.size))
        .load(std::memory_order_relaxed);
  }
  Capabilities capabilities() const override;
  Result<ImageInfo> Info() override;
  uint64_t l2_cache_bytes() const override { return l2_cache_->capacity() * cluster_size_; }

  using BlockDevice::Read;
  using BlockDevice::Write;

  // The read fast path (qcow2_fast_read.cc): a read that lies in one host
  // extent of normal clusters whose L2 tables are cached goes to the file
  // with File::StartReadV, holding image_lock_ shared and its clusters
  // pinned exactly as Read() does. Any other read runs Read().
  void StartRead(ReadRequest* req) override;
  // For tests and benchmarks: reads StartRead sent down the fast path.
  uint64_t fast_reads() const { return fast_reads_.load(std::memory_order_relaxed); }

  // Allocates every cluster (see Qcow2Preallocate).
  Task<Status> Preallocate(Preallocation mode);

  // --- internal snapshots and resize (qcow2_snapshot_ops.cc, qcow2_resize.cc) ---
  // Each runs on the device's home loop (callers on other loops hop there), takes image_lock_ exclusive (so no
  // request runs meanwhile) and flush_mu_, starts by flushing metadata and
  // leaves everything it changed durable. Ordering: new structures are
  // written and synced, refcounts raised and synced, then one small synced
  // header write switches to them, and only then are references dropped, so
  // a crash at any point leaves at most leaked clusters (repaired by
  // `qemu-img check -r leaks`). Errors: ReadOnly on a read-only image,
  // NotFound for an unknown snapshot, InvalidArgument for a bad name or
  // size, NotSupported where qemu refuses too, Corruption/IoError from the
  // tables. On error the in-memory state matches what is on disk.

  // Creates an internal snapshot of the active image (qcow2.rst,
  // "Snapshots"): the L1 table is copied, every L2 table and data cluster
  // it reaches gets one more reference, COPIED is cleared in the active
  // tables and the new snapshot table is switched in. Unlike the other
  // operations here, requests are held back only while that happens in
  // memory (tables and refcount blocks are loaded beforehand, under the
  // shared lock); the writes and syncs follow with flush_mu_ held. The ID is the
  // largest numeric ID + 1. `date_sec`/`date_nsec` 0/0 means now. Refused:
  // an empty, over-long or duplicate `name` (InvalidArgument "... a
  // snapshot named 'x' already exists"), a refcount that would exceed the
  // image's refcount width (NotSupported), more than 65536 snapshots.
  Task<Status> CreateSnapshot(const std::string& name, uint64_t vm_state_size = 0,
                              uint64_t date_sec = 0, uint32_t date_nsec = 0,
                              uint64_t vm_clock_nsec = 0);
  // The snapshots, in table order (as Info() reports them).
  std::vector<SnapshotInfo> ListSnapshots() const;
  // Reverts the active image to snapshot `name_or_id` (ID first, then
  // name, like qemu-img snapshot -a): a new active L1 holding the
  // snapshot's entries and sized for its disk size is switched in together
  // with the disk size; then the old active tree loses its references.
  Task<Status> ApplySnapshot(const std::string& name_or_id);
  // Deletes snapshot `name_or_id` (name first, then ID): the entry leaves
  // the table, then its L1 table and everything it reaches lose one
  // reference; clusters left only to the active image get COPIED again.
  Task<Status> DeleteSnapshot(const std::string& name_or_id);
  // Changes the virtual size to `new_size` (a multiple of 512, > 0).
  // Growing may move the L1 table (new table synced, header switched, old
  // one freed); bytes newly exposed in a partial last cluster or over a
  // backing file read as zeros. Shrinking needs `allow_shrink`
  // (InvalidArgument otherwise); it frees every cluster past the new end.
  // v2 images with snapshots are refused (NotSupported), as qemu does.
  Task<Status> Resize(uint64_t new_size, bool allow_shrink);

 private:
  // The bodies of the above, on the home loop. Arguments by value: the
  // caller's references may not outlive the hop.
  Task<Status> CreateSnapshotOnHome(std::string name, uint64_t vm_state_size, uint64_t date_sec,
                                    uint32_t date_nsec, uint64_t vm_clock_nsec);
  Task<Status> ApplySnapshotOnHome(std::string name_or_id);
  Task<Status> DeleteSnapshotOnHome(std::string name_or_id);
  Task<Status> ResizeOnHome(uint64_t new_size, bool allow_shrink);
  // Host cluster number -> references to add or drop.
  using RefDelta = std::map<uint64_t, uint64_t>;
  // Adds to `refs` one reference per path from `l1` (entries as on disk):
  // each L2 table, and each normal, preallocated-zero or compressed
  // cluster its entries name. With `clear_copied`, COPIED bits found in the
  // L2 tables are cleared (in the cache). Corruption for bad entries.
  Task<Status> CountTreeRefs(const std::vector<uint64_t>& l1, bool clear_copied, RefDelta* refs);
  // NotSupported naming `what` unless every cluster in `add` can take its
  // extra references within the refcount width.
  Task<Status> CheckRefcountRoom(const RefDelta& add, const std::string& what);
  // The snapshot-and-resize operations' bodies, with image_lock_ exclusive
  // and flush_mu_ held (the *OnHome callers rebuild the guard after them).
  Task<Status> ApplySnapshotLocked(const std::string& name_or_id);
  // The second half of CreateSnapshotOnHome, with flush_mu_ held and
  // requests running: refcounts durable, COPIED flags written, the L1 copy
  // `copy` written, the snapshot table switched.
  Task<Status> WriteSnapshot(std::string name, std::vector<uint64_t> copy, bool l1_dirty,
                             uint64_t disk_size, uint64_t vm_state_size, uint64_t date_sec,
                             uint32_t date_nsec, uint64_t vm_clock_nsec);
  Task<Status> DeleteSnapshotLocked(const std::string& name_or_id);
  // Adds `add` to the refcounts and makes them durable.
  Task<Status> RaiseRefcounts(const RefDelta& add);
  // Drops `drop` (after the tables that held the references are durable);
  // L2 tables that become free leave the cache.
  Task<Status> DropRefcounts(const RefDelta& drop);
  // Sets COPIED in the active L1/L2 tables exactly where the refcount
  // minus `pending` is 1, writes the changed tables and syncs.
  Task<Status> UpdateCopiedFlags(const RefDelta& pending);
  // The two halves of UpdateCopiedFlags: the change in memory (L1 entries
  // and cached L2 tables; returns whether the active L1 changed), and the
  // write-back of the tables and (if `l1_dirty`) the active L1, then a sync.
  Task<Result<bool>> SetCopiedFlagsInCache(const RefDelta& pending);
  Task<Status> WriteCopiedFlags(bool l1_dirty);
  // Adds one reference for each cluster of the L1 table of `entries` entries
  // at `offset` (none for an empty table).
  void AddL1TableRefs(uint64_t offset, uint32_t entries, RefDelta* refs) const;
  struct SnapshotTree {
    int index = 0;  // in snapshots_
    Snapshot snapshot;
    std::vector<uint64_t> l1;  // its L1 table, as on disk
  };
  // With image_lock_ exclusive and flush_mu_ held: the snapshot `name_or_id`
  // (looked up in `order`; NotFound naming the order otherwise) and its L1
  // table, read after the active metadata was flushed.
  Task<Result<SnapshotTree>> LoadSnapshotTree(const std::string& name_or_id,
                                              SnapshotLookup order);
  // Reads an L1 table of `entries` entries at `offset`.
  Task<Result<std::vector<uint64_t>>> ReadL1(uint64_t offset, uint32_t entries);
  // Allocates clusters for `l1`, writes it (zero padded) and syncs it with
  // the refcounts; the overlap guard protects it as `kind` from before the
  // write. Returns its offset (0 for an empty table).
  Task<Result<uint64_t>> WriteNewL1(const std::vector<uint64_t>& l1, MetadataKind kind);
  // Writes `snaps` as a new snapshot table (synced), switches the header to
  // it (nb_snapshots, snapshots_offset) and frees the old table.
  Task<Status> SwitchSnapshotTable(std::vector<Snapshot> snaps);
  // Switches size, l1_size and l1_table_offset in one synced header write.
  Task<Status> SwitchL1(uint64_t size, const std::vector<uint64_t>& l1, uint64_t l1_offset);
  // L1 entries needed for `size` bytes.
  uint64_t L1EntriesFor(uint64_t size) const;
  // Resize with the locks held; `zero_from`/`zero_to` receive the guest
  // range to zero once the locks are released (growth only).
  Task<Status> ResizeLocked(uint64_t new_size, uint64_t* zero_from, uint64_t* zero_to);
  Task<Status> ShrinkLocked(uint64_t new_size);

 public:

  const Header& header() const { return header_; }
  TableCache& l2_cache() { return *l2_cache_; }
  Refcounts& refcounts() { return *refcounts_; }

 private:
  // How one guest cluster is mapped (decoded L2 entry). With extended L2
  // entries the type sums up the subcluster bitmap: kNormal = every
  // subcluster allocated, kZero = every one reads as zero, kUnallocated =
  // none allocated nor zero (`host` may still name a reserved cluster),
  // kSubclusters = a mix, read subcluster by subcluster.
  struct Mapping {
    enum class Type : uint8_t { kUnallocated, kZero, kNormal, kCompressed, kSubclusters };
    Type type = Type::kUnallocated;
    uint64_t host = 0;      // normal: cluster offset; zero: kept allocation or 0
    bool copied = false;    // refcount is exactly 1: writable in place
    uint64_t comp_offset = 0;  // compressed: byte offset and length on disk
    uint64_t comp_length = 0;
    // Subclusters allocated / reading as zeros (extended L2 bitmap; for
    // standard entries all or nothing by type).
    uint32_t sub_alloc = 0;
    uint32_t sub_zero = 0;
  };

  // Host clusters with data I/O in flight for one request (see Allocator::
  // BeginIo); released when it goes out of scope.
  class IoPins {
   public:
    explicit IoPins(Allocator* a) : a_(a) {}
    ~IoPins() {
      for (size_t i = 0; i < inline_count_; ++i) a_->EndIo(inline_[i]);
      for (uint64_t c : more_) a_->EndIo(c);
    }
    IoPins(const IoPins&) = delete;
    IoPins& operator=(const IoPins&) = delete;
    // Pins the host clusters that mapping `m` reads from.
    void Add(const Mapping& m, uint32_t cluster_bits) {
      if (m.type == Mapping::Type::kNormal) {
        Pin(m.host >> cluster_bits);
      } else {
        AddOther(m, cluster_bits);
      }
    }

   private:
    void AddOther(const Mapping& m, uint32_t cluster_bits);
    KVBLK_HOT void Pin(uint64_t cluster) {
      a_->BeginIo(cluster);
      if (inline_count_ < kInline) {
        inline_[inline_count_++] = cluster;
      } else {
        more_.push_back(cluster);
      }
    }
    // Most requests pin one or two clusters: no allocation for those.
    static constexpr size_t kInline = 4;
    Allocator* a_;
    uint64_t inline_[kInline];
    size_t inline_count_ = 0;
    std::vector<uint64_t> more_;
  };

  Qcow2Device(std::unique_ptr<File> file, Header header, const OpenOptions& opts);
  Task<Status> Load(uint64_t file_size, int depth);
  // Checks a request against the device state. Callers hold image_lock_
  // shared, so that the size cannot change under them.
  Status CheckRequest(uint64_t offset, uint64_t length, bool write) const;
  // CheckRequest(...).ok() without building a Status (the read fast path's).
  bool RequestValid(uint64_t offset, uint64_t length, bool write) const {
    return !closed_.load() && !(write && read_only_) && offset <= header_.size &&
           length <= header_.size - offset;
  }

  // Runs `t` on the home loop and resumes the caller on its own loop.
  template <typename T>
  Task<T> OnHome(Task<T> t) {
    EventLoop* origin = &EventLoop::Current();
    co_await home_->Enter();
    T r = co_await std::move(t);
    co_await origin->Enter();
    co_return r;
  }
  // The public operations that run wholly on the home loop.
  Task<Status> FlushOnHome();
  Task<Status> CloseOnHome();
  Task<Status> DiscardOnHome(uint64_t offset, uint64_t length);
  Task<Status> WriteZeroesOnHome(uint64_t offset, uint64_t length, bool may_unmap);
  Task<Result<BlockStatus>> GetBlockStatusOnHome(uint64_t offset, uint64_t max_length);
  Task<Status> WriteCompressedOnHome(uint64_t offset, const void* buf, size_t len);
  Task<Status> PreallocateOnHome(Preallocation mode);

  // --- metadata (qcow2_device.cc) ---
  // The L2 table for `l1_index`; an empty handle when the L1 entry is 0.
  Task<Result<TableCache::Handle>> GetL2(uint64_t l1_index);
  // An L2 table for `l1_index` that may be modified: allocated if missing,
  // copied if shared with a snapshot. Takes l1_mu_.
  Task<Result<TableCache::Handle>> GetL2ForWrite(uint64_t l1_index);
  Task<Status> WriteL1Entry(uint64_t l1_index, uint64_t value);
  Task<Status> WriteL2Table(uint64_t offset, const uint8_t* table);
  // Decodes L2 entry `entry` with subcluster bitmap `bitmap` (0 for
  // standard entries) of guest cluster `guest_cluster`. Corruption (not yet
  // signalled) for reserved bits, a misaligned host offset, and with
  // extended entries a subcluster both allocated and zero, allocated
  // subclusters without a host cluster or a compressed cluster with a
  // non-zero bitmap.
  Result<Mapping> Decode(uint64_t entry, uint64_t bitmap, uint64_t guest_cluster) const;
  // Decode()'s result for the commonest entry, an allocated cluster with no
  // flag but COPIED (extended: every subcluster allocated). Returns false,
  // leaving `m` alone, for any other entry: Decode() handles those.
  bool DecodeNormal(uint64_t entry, uint64_t bitmap, Mapping* m) const {
    if (header_.extended_l2()) {
      if (SubclusterAllocBits(bitmap) != kSubclusterAll || SubclusterZeroBits(bitmap) != 0)
        return false;
      entry &= ~kOflagZero;  // no meaning with extended entries
    }
    const uint64_t host = entry & kL2OffsetMask;
    if ((entry & ~(kOflagCopied | kL2OffsetMask)) != 0 || host == 0 ||
        (host & (cluster_size_ - 1)) != 0) {
      return false;
    }
    *m = Mapping{};
    m->type = Mapping::Type::kNormal;
    m->host = host;
    m->copied = (entry & kOflagCopied) != 0;
    m->sub_alloc = kSubclusterAll;
    return true;
  }
  // The descriptor / the subcluster bitmap (0 for standard entries) of entry
  // `index` of table `h`.
  uint64_t L2Entry(const TableCache::Handle& h, uint64_t index) const;
  uint64_t L2Bitmap(const TableCache::Handle& h, uint64_t index) const;
  // Sets entry `index` to descriptor `value` and, with extended L2 entries,
  // subcluster bitmap `bitmap` (ignored for standard entries).
  void SetL2Entry(TableCache::Handle& h, uint64_t index, uint64_t value, uint64_t bitmap);
  // Any thread: the mapping of guest cluster `gc` if its L2 table is cached
  // (pinning its host clusters into `pins` when not null); false on a miss
  // or an entry that needs the home loop's attention (it may be corrupt).
  bool TryLookupCached(uint64_t gc, Mapping* m, IoPins* pins) const;
  // Any thread: extends the run of `n` bytes at guest `pos`, mapped by the
  // normal mapping `m`, over the following clusters while their L2 tables
  // are cached and they continue `m` on the host (pinning them), up to guest
  // offset `end`. Returns the new length.
  size_t ExtendCachedRun(uint64_t pos, uint64_t end, size_t n, const Mapping& m,
                         IoPins* pins) const;
  // Any thread: the mapping of `gc`, from the cache or via the home loop.
  Task<Result<Mapping>> Lookup(uint64_t gc, IoPins* pins);
  // Home loop: the mapping of `gc`, loading its L2 table on a miss.
  Task<Result<Mapping>> LookupHome(uint64_t gc, IoPins* pins);
  // Changes the virtual size; requires image_lock_ exclusive.
  void SetDiskSize(uint64_t size) {
    std::atomic_ref<uint64_t>(header_.size).store(size, std::memory_order_relaxed);
  }
  uint64_t L1Entry(uint64_t l1_index) const {
    return std::atomic_ref<uint64_t>(const_cast<uint64_t&>(l1_[l1_index]))
        .load(std::memory_order_acquire);
  }
  // Flushes L2 tables and syncs, then applies the frees that were pending
  // before it started.
  Task<Status> FlushMetadata();
  // Flush() once corruption was found: syncs data, fails if metadata
  // changes could not be written.
  Task<Status> FlushCorrupted();
  Task<Status> UpdateHeaderField(uint64_t offset, const uint8_t* bytes, size_t len);
  // Writes header_.incompatible_features (bytes 72..79) and syncs.
  Task<Status> WriteIncompatibleFeatures();
  Task<Status> RewriteHeader();
  // Marks the image corrupt on disk (writable images) and returns `why`.
  // Home loop.
  Task<Status> SignalCorruption(Status why);

  // --- metadata overlap protection (qcow2_guard.cc) ---
  // Any thread: Ok, or the IoError naming `what` (e.g. "data write") for a
  // write of `bytes` at host offset `host` that would overwrite metadata of
  // a kind not in `ignore`. Ok when protection is off.
  Status GuardCheck(const char* what, uint64_t host, uint64_t bytes, MetadataMask ignore) const;
  // Any loop: marks the image corrupt (on the home loop) and returns `why`,
  // a refusal from GuardCheck.
  Task<Status> RefuseWrite(Status why);
  // Home loop: one more / one less reference of `kind` on the clusters of
  // host bytes [host, host + bytes). No-ops when protection is off. An
  // error is a bookkeeping bug (a reference that is not there).
  Status GuardAdd(uint64_t host, uint64_t bytes, MetadataKind kind);
  Status GuardRemove(uint64_t host, uint64_t bytes, MetadataKind kind);
  // Home loop, with flush_mu_ held (the snapshot table cannot change): a
  // guard built from scratch out of the header, l1_, the refcount table,
  // the snapshot table and each snapshot's L1 table (read from disk)
  // replaces guard_'s contents in one step.
  Task<Status> RebuildOverlapGuard();
  // Adds every metadata extent to `g`; `snapshot_l1s[i]` is the L1 table
  // of snapshots_[i]. Entries that are misaligned or lie past the end of
  // the file are left out (they are reported as corruption where used).
  Status FillOverlapGuard(OverlapGuard* g,
                          const std::vector<std::vector<uint64_t>>& snapshot_l1s) const;

 public:
  // Null when protection is off (read-only image or overlap_check false).
  const OverlapGuard* overlap_guard() const { return guard_.get(); }
  // For tests: a guard built from scratch from the image as it is now
  // (home loop, no metadata operation running).
  Task<Result<std::unique_ptr<OverlapGuard>>> BuildFreshOverlapGuard();

 private:
  Status CorruptionAt(uint64_t gc, const std::string& what) const;

  // --- data path (qcow2_io.cc) ---
  // Reads guest bytes [pos, pos + total(iov)) that all lie in one guest
  // cluster mapped by `m`. The caller has pinned m's host clusters.
  Task<Status> ReadMapped(const Mapping& m, uint64_t pos, const std::vector<iovec>& iov);
  Task<Status> ReadBacking(uint64_t pos, const std::vector<iovec>& iov);
  Task<Status> ReadCompressed(const Mapping& m, uint64_t pos, const std::vector<iovec>& iov);
  // Writes `data` at guest offset `pos`. Caller holds image_lock_ shared.
  Task<Status> WriteLocked(uint64_t pos, const std::vector<iovec>& data);
  // Allocates clusters for a prefix of [pos, pos + len) and writes it
  // (merged with copy-on-write data at the edges). Returns the bytes done;
  // 0 means the first cluster turned out to be writable in place.
  Task<Result<size_t>> AllocatingWrite(uint64_t pos, size_t len, const std::vector<iovec>& data);
  // Discards or zeroes whole guest cluster `gc`. Returns false in `*done`
  // when a v2 image with a backing file needs explicit zeros instead.
  Task<Status> ZeroOrDiscardCluster(uint64_t gc, bool discard, bool may_unmap, bool* done);
  // Whether cluster-mapping `m` reads as zeros from guest offset `pos` to
  // the end of its cluster.
  bool ReadsAsZero(const Mapping& m, uint64_t pos) const;
  // Queues the host clusters an old L2 entry (descriptor and bitmap)
  // referenced for freeing, except `keep_host`.
  void FreeOldEntry(uint64_t entry, uint64_t bitmap, uint64_t gc, uint64_t keep_host);

  // --- subclusters (qcow2_subcluster.cc; extended L2 entries only) ---
  // Whether guest bytes [pos, pos + len) of the one cluster mapped by `m`
  // may be written in place: COPIED and every subcluster they touch
  // allocated (standard entries: COPIED normal clusters).
  bool WritableInPlace(const Mapping& m, uint64_t pos, uint64_t len) const;
  // Reads guest bytes [pos, pos + total(iov)) of one kSubclusters cluster,
  // each subcluster from the host, as zeros or from the backing file.
  Task<Status> ReadSubclusters(const Mapping& m, uint64_t pos, const std::vector<iovec>& iov);
  // Home loop, image_lock_ shared: writes `data` at guest `pos` (within one
  // cluster, len = total(data)), allocating only the subclusters it touches:
  // into the cluster's own host cluster when it is COPIED, else into a new
  // host cluster (a shared or compressed cluster's data is copied whole).
  // Copy-on-write fills only the partial subclusters at the edges. Takes the
  // cluster lock; returns the bytes done (len), or 0 when the range turned
  // out to be writable in place.
  Task<Result<size_t>> SubclusterWrite(uint64_t pos, size_t len, const std::vector<iovec>& data);
  // Home loop: SubclusterWrite over each cluster of [pos, pos + total(data))
  // in turn (one hop for a run of clusters). Returns the bytes done; stops
  // early (fewer bytes, 0 for the first cluster) where a cluster turned out
  // to be writable in place.
  Task<Result<size_t>> SubclusterWriteRun(uint64_t pos, const std::vector<iovec>& data);
  // Home loop, image_lock_ shared: zeroes (`discard` false) or discards the
  // subclusters `mask` of guest cluster `gc` in the bitmap. Zeroing sets
  // their zero bits; discarding clears their allocation and sets the zero
  // bits only over a backing file. A host cluster left with no allocated
  // subcluster is freed when `may_unmap` (discard implies it). `*done` is
  // false when the cluster is compressed (the caller writes zeros instead;
  // a discard just skips it).
  Task<Status> ZeroSubclusters(uint64_t gc, uint32_t mask, bool discard, bool may_unmap,
                               bool* done);
  // Zeroes or discards guest bytes [pos, end) within one cluster (not the
  // whole cluster): subcluster-aligned parts in the bitmap, the unaligned
  // rest written as zeros (write zeroes) or left alone (discard).
  Task<Status> ZeroOrDiscardPartial(uint64_t pos, uint64_t end, bool discard, bool may_unmap);
  uint32_t subcluster_bits() const { return cluster_bits_ - 5; }
  // Home loop: subclusters of recently allocated host clusters whose host
  // bytes still read as zeros (see KnownZeroSubclusters and the invariant
  // in qcow2_subcluster.cc). Bounded; losing an entry costs a zero fill.
  static constexpr size_t kKnownZeroEntries = 65536;
  KnownZeroSubclusters known_zero_{kKnownZeroEntries};

  // What a cached read uses comes first, together, down to header_'s size
  // and feature bits, so that it spans a page boundary less often (see
  // disk/hot.h).
  AsyncSharedMutex image_lock_;
  std::atomic<uint64_t> fast_reads_{0};
  std::unique_ptr<File> file_;
  std::atomic<bool> read_only_;
  std::atomic<bool> closed_ = false;
  std::atomic<bool> corrupted_ = false;  // corruption found while open: writes disabled
  uint32_t cluster_bits_;
  uint64_t cluster_size_;
  uint32_t l2_bits_;  // log2(entries per L2 table)
  std::vector<uint64_t> l1_;
  std::unique_ptr<OverlapGuard> guard_;  // see "Metadata overlap protection"
  std::unique_ptr<Refcounts> refcounts_;
  std::unique_ptr<Allocator> alloc_;
  std::unique_ptr<TableCache> l2_cache_;
  Header header_;
  OpenOptions opts_;
  EventLoop* home_;  // the loop the device was opened on
  std::unique_ptr<BlockDevice> backing_;
  std::string backing_path_;
  std::vector<Snapshot> snapshots_;
  // Counts the data writes into newly allocated clusters (bumped when one
  // completes, before the L2 entry mapping it is set) and the latest count
  // known to be synced; see WriteL2Table.
  uint64_t data_written_seq_ = 0;
  uint64_t data_synced_seq_ = 0;
  // Lazy refcounts (compatible bit 0, on a writable image): refcount changes
  // need not be durable before the L2 tables that depend on them. Instead,
  // before the first such table write the image is marked dirty on disk
  // (MarkDirty); a clean close writes the refcounts, syncs and clears the
  // bit (MarkClean). A crash leaves the bit set and the next writable open
  // rebuilds the refcounts from the tables (RepairRefcountsIfDirty).
  bool lazy_refcounts_ = false;
  bool marked_dirty_ = false;  // home loop: the dirty bit is durable on disk
  // Home loop: sets the dirty bit in the header and syncs it (once).
  Task<Status> MarkDirty();
  // Home loop, with the refcounts durable: clears the dirty bit and syncs.
  Task<Status> MarkClean();

  // The fast path's state for one read (qcow2_fast_read.cc).
  struct FastRead;
  // Starts `req` on the fast path; false (nothing started, nothing held)
  // when it does not qualify.
  bool TryStartFastRead(ReadRequest* req);

  AsyncMutex l1_mu_;
  AsyncMutex flush_mu_;
  ClusterLocks cluster_locks_;
};

}  // namespace qcow2
}  // namespace kvblk

#endif  // KVBLK_DISK_QCOW2_DEVICE_H_
