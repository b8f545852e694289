// BlockDevice: the one interface the device model talks to.
//
// Offsets and lengths are in bytes. Every operation is asynchronous (a Task)
// and may be issued concurrently with others from the same event loop; the
// implementation orders what must be ordered. A request past the end of the
// device fails with InvalidArgument; a write to a read-only device with
// ReadOnly. A Status other than OK means the request failed as a whole (the
// guest sees IOERR), and the device stays usable.
#ifndef KVBLK_BLOCK_DEVICE_H_
#define KVBLK_BLOCK_DEVICE_H_

#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "kvblk/status.h"
#include "kvblk/task.h"

namespace kvblk {

struct Capabilities {
  bool read_only = false;
  uint32_t logical_block_size = 512;
  // Discard/write-zeroes work at this granularity (bytes); smaller or
  // unaligned discards are advisory and may do nothing.
  uint32_t discard_granularity = 512;
  bool discard = true;
  bool write_zeroes = true;
  // Preferred I/O size (the cluster size for qcow2).
  uint32_t optimal_io_size = 0;
};

// What `map` reports for a run of the guest address space.
struct BlockStatus {
  uint64_t length = 0;  // bytes, starting at the queried offset
  bool present = false;  // allocated in this image or some backing image
  bool zero = false;     // reads as zeros
  bool data = false;     // backed by data in a file
  int depth = 0;         // which layer of the backing chain answers (0 = top)
  std::optional<uint64_t> host_offset;  // where the data is, if contiguous
  std::string host_file;  // file holding the data (when data)
  bool compressed = false;
};

struct SnapshotInfo {
  std::string id;
  std::string name;
  uint64_t vm_state_size = 0;
  uint64_t date_sec = 0;
  uint32_t date_nsec = 0;
  uint64_t vm_clock_nsec = 0;
  std::optional<uint64_t> icount;
  uint64_t disk_size = 0;
};

struct ImageInfo {
  std::string filename;
  std::string format;  // "raw" or "qcow2"
  uint64_t virtual_size = 0;
  uint64_t actual_size = 0;  // bytes allocated on the host
  uint32_t cluster_size = 0;  // 0 for raw
  bool dirty = false;
  std::string backing_filename;       // as stored in the image
  std::string full_backing_filename;  // resolved path
  std::string backing_format;
  // qcow2 format-specific
  std::string compat;  // "0.10" or "1.1"
  bool lazy_refcounts = false;
  int refcount_bits = 0;
  bool corrupt = false;
  bool extended_l2 = false;
  std::string compression_type;  // "zlib" or "zstd"
  std::vector<SnapshotInfo> snapshots;
  // qcow2: what the L2 table cache holds, in bytes (whole tables; see
  // OpenOptions::l2_cache_bytes). 0 for raw.
  uint64_t l2_cache_bytes = 0;
};

// A read in callback form: BlockDevice::StartRead. The caller fills in the
// first four fields and owns the request; it and the iovec's buffers must
// stay valid until `done` is called.
struct ReadRequest {
  uint64_t offset = 0;
  const iovec* iov = nullptr;
  int iovcnt = 0;
  // Called once, on the thread that called StartRead (from its event loop,
  // or from inside StartRead when the read needs no I/O), with the result
  // Read() would have given.
  void (*done)(ReadRequest* req, Status st) = nullptr;
  void* user = nullptr;  // the caller's; kvblk does not touch it
  // The device's, from StartRead until `done` is called: the qcow2 read
  // fast path keeps its I/O operation and cluster pins here instead of
  // allocating them per read. The caller neither reads nor writes it.
  static constexpr size_t kDeviceStateSize = 256;
  alignas(16) unsigned char device_state[kDeviceStateSize];
};

class BlockDevice {
 public:
  virtual ~BlockDevice() = default;

  virtual Task<Status> Read(uint64_t offset, const iovec* iov, int iovcnt) = 0;
  virtual Task<Status> Write(uint64_t offset, const iovec* iov, int iovcnt) = 0;
  // Completes once every write that completed before it was submitted is
  // durable, together with the metadata that makes it reachable.
  virtual Task<Status> Flush() = 0;
  // The range may read back as zeros or as its old data afterwards (qemu's
  // discard semantics); space is returned to the host where possible.
  virtual Task<Status> Discard(uint64_t offset, uint64_t length) = 0;
  // The range reads back as zeros; with `may_unmap` its space may be freed.
  virtual Task<Status> WriteZeroes(uint64_t offset, uint64_t length, bool may_unmap) = 0;
  // Describes the run starting at `offset` (at most `max_length` bytes) whose
  // blocks all have the same status.
  virtual Task<Result<BlockStatus>> GetBlockStatus(uint64_t offset, uint64_t max_length) = 0;
  // Writes one whole cluster compressed (qcow2 only; NotSupported elsewhere).
  // `offset` must be cluster-aligned and `len` the cluster size (or the
  // remainder at the end of the disk). The cluster must not be allocated yet.
  virtual Task<Status> WriteCompressed(uint64_t offset, const void* buf, size_t len);
  // Flushes and marks the image clean. Afterwards only destruction is allowed.
  virtual Task<Status> Close() = 0;

  virtual uint64_t size() const = 0;
  virtual Capabilities capabilities() const = 0;
  virtual Result<ImageInfo> Info() = 0;
  // What the qcow2 L2 table cache holds, in bytes (whole tables); 0 for a
  // format without one.
  virtual uint64_t l2_cache_bytes() const { return 0; }

  // Single-buffer conveniences.
  Task<Status> Read(uint64_t offset, void* buf, size_t len);
  Task<Status> Write(uint64_t offset, const void* buf, size_t len);

  // Read() in callback form, for callers that start many small reads
  // (a virtqueue, fio's engine): same result and the same guarantees, but
  // a qcow2 read of data that lies in one host extent with its L2 table
  // cached goes straight to the event loop's io_uring, without a coroutine.
  // Anything else runs Read(). Never throws: running out of memory on the
  // way is an IoError passed to `done`. The calling thread must run its
  // EventLoop.
  virtual void StartRead(ReadRequest* req);
};

// The largest OpenOptions::l2_cache_bytes: OpenImage refuses more with
// InvalidArgument (kvblk serve also checks it while parsing its options, to
// name the option; tables are allocated as they are used, and this bounds
// the growth).
inline constexpr uint64_t kMaxL2CacheBytes = uint64_t{64} << 30;

struct OpenOptions {
  std::string format;  // "raw", "qcow2", or "" to probe
  bool read_only = false;
  bool direct = false;  // O_DIRECT (cache=none)
  // L2 cache size in bytes; 0 picks a cache that covers the whole disk,
  // up to 32 MiB of tables.
  uint64_t l2_cache_bytes = 0;
  uint64_t refcount_cache_bytes = 0;  // 0 = default (1 MiB)
  int max_backing_depth = 16;
  bool open_backing = true;  // false: reads of unallocated clusters are zero
  // qcow2, writable: every host write is checked against the image's
  // metadata (header, active and snapshot L1/L2 tables, refcount table and
  // blocks, snapshot table); one that would overwrite any of it fails with
  // IoError and marks the image corrupt. Off only to measure what it costs.
  bool overlap_check = true;
};

// Opens an image file (and its backing chain). Performs I/O on the calling
// thread's event loop; not for use inside a coroutine.
Result<std::unique_ptr<BlockDevice>> OpenImage(const std::string& path, const OpenOptions& opts);

// Closes `dev` (flush, mark clean) on the calling thread's loop.
Status CloseImage(std::unique_ptr<BlockDevice> dev);

// Returns "qcow2" or "raw" for an existing file, probing its first bytes.
Result<std::string> ProbeFormat(const std::string& path);

}  // namespace kvblk

#endif  // KVBLK_BLOCK_DEVICE_H_
