// Qcow2Device: a BlockDevice over a qcow2 image (docs/interop/qcow2.rst).
//
// Structure: the header and L1 table live in memory; L2 tables and refcount
// blocks go through TableCaches; the Allocator hands out clusters.
//
// Concurrency (all requests run as coroutines on one event loop):
//  - image_lock_: every request holds it shared; changes of the L1 table
//    layout (growth, snapshot copy) take it exclusive.
//  - cluster locks: an allocating write, copy on write, discard or write
//    zeroes holds the locks of the guest clusters whose mapping it changes.
//    Reads and in-place overwrites of clusters with COPIED set take none.
//  - l1_mu_: allocation and copy on write of L2 tables (rare).
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
#ifndef KVBLK_DISK_QCOW2_DEVICE_H_
#define KVBLK_DISK_QCOW2_DEVICE_H_

#include <memory>
#include <string>
#include <vector>

#include "disk/allocator.h"
#include "disk/async_lock.h"
#include "disk/cluster_lock.h"
#include "disk/file.h"
#include "disk/qcow2_header.h"
#include "disk/qcow2_snapshot.h"
#include "disk/refcount.h"
#include "disk/table_cache.h"
#include "kvblk/block_device.h"
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
  // an image left dirty when opened writable (until repair exists) and for
  // extended L2 entries, NotFound/... for a backing file.
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
  uint64_t size() const override { return header_.size; }
  Capabilities capabilities() const override;
  Result<ImageInfo> Info() override;

  using BlockDevice::Read;
  using BlockDevice::Write;

  // Allocates every cluster (see Qcow2Preallocate).
  Task<Status> Preallocate(Preallocation mode);

  const Header& header() const { return header_; }
  TableCache& l2_cache() { return *l2_cache_; }
  Refcounts& refcounts() { return *refcounts_; }

 private:
  // How one guest cluster is mapped (decoded L2 entry).
  struct Mapping {
    enum class Type : uint8_t { kUnallocated, kZero, kNormal, kCompressed };
    Type type = Type::kUnallocated;
    uint64_t host = 0;      // normal: cluster offset; zero: kept allocation or 0
    bool copied = false;    // refcount is exactly 1: writable in place
    uint64_t comp_offset = 0;  // compressed: byte offset and length on disk
    uint64_t comp_length = 0;
  };

  Qcow2Device(std::unique_ptr<File> file, Header header, const OpenOptions& opts);
  Task<Status> Load(uint64_t file_size, int depth);
  Status CheckRequest(uint64_t offset, uint64_t length, bool write) const;

  // --- metadata (qcow2_device.cc) ---
  // The L2 table for `l1_index`; an empty handle when the L1 entry is 0.
  Task<Result<TableCache::Handle>> GetL2(uint64_t l1_index);
  // An L2 table for `l1_index` that may be modified: allocated if missing,
  // copied if shared with a snapshot. Takes l1_mu_.
  Task<Result<TableCache::Handle>> GetL2ForWrite(uint64_t l1_index);
  Task<Status> WriteL1Entry(uint64_t l1_index, uint64_t value);
  Task<Status> WriteL2Table(uint64_t offset, const uint8_t* table);
  Result<Mapping> Decode(uint64_t entry, uint64_t guest_cluster) const;
  uint64_t L2Entry(const TableCache::Handle& h, uint64_t index) const;
  void SetL2Entry(TableCache::Handle& h, uint64_t index, uint64_t value);
  // Mapping of guest cluster `gc`.
  Task<Result<Mapping>> Lookup(uint64_t gc);
  // Flushes L2 tables and syncs, then applies the frees that were pending
  // before it started.
  Task<Status> FlushMetadata();
  // Flush() once corruption was found: syncs data, fails if metadata
  // changes could not be written.
  Task<Status> FlushCorrupted();
  Task<Status> UpdateHeaderField(uint64_t offset, const uint8_t* bytes, size_t len);
  Task<Status> RewriteHeader();
  // Marks the image corrupt on disk (writable images) and returns `why`.
  Task<Status> SignalCorruption(Status why);
  Status CorruptionAt(uint64_t gc, const std::string& what) const;

  // --- data path (qcow2_io.cc) ---
  // Reads guest bytes [pos, pos + total(iov)) that all lie in one guest
  // cluster mapped by `m`.
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
  // Queues the host clusters an old L2 entry referenced for freeing.
  void FreeOldEntry(uint64_t entry, uint64_t gc, uint64_t keep_host);

  std::unique_ptr<File> file_;
  Header header_;
  OpenOptions opts_;
  bool read_only_;
  bool closed_ = false;
  bool corrupted_ = false;  // corruption found while open: writes disabled
  uint32_t cluster_bits_;
  uint64_t cluster_size_;
  uint32_t l2_bits_;  // log2(entries per L2 table)
  std::vector<uint64_t> l1_;
  std::unique_ptr<Refcounts> refcounts_;
  std::unique_ptr<Allocator> alloc_;
  std::unique_ptr<TableCache> l2_cache_;
  std::unique_ptr<BlockDevice> backing_;
  std::string backing_path_;
  std::vector<Snapshot> snapshots_;
  // Counts the data writes into newly allocated clusters (bumped when one
  // completes, before the L2 entry mapping it is set) and the latest count
  // known to be synced; see WriteL2Table.
  uint64_t data_written_seq_ = 0;
  uint64_t data_synced_seq_ = 0;

  AsyncSharedMutex image_lock_;
  AsyncMutex l1_mu_;
  AsyncMutex flush_mu_;
  ClusterLocks cluster_locks_;
};

}  // namespace qcow2
}  // namespace kvblk

#endif  // KVBLK_DISK_QCOW2_DEVICE_H_
