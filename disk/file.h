// File: the I/O seam below every image format.
//
// The qcow2 and raw layers talk to their image files only through this
// interface. PosixFile sends operations to the calling thread's IoEngine
// (io_uring or the thread pool); the test engines (an in-memory file, one that
// records the order of writes and syncs, one that injects errors, one that
// simulates power loss) implement it too.
//
// Contract for all implementations:
//  - ReadV fills the whole iovec; bytes past the end of the file read as zero.
//  - WriteV writes the whole iovec or fails; the file grows as needed.
//  - Flush makes every write that completed before it durable.
//  - Errors are Status values with the path and offset in the message.
#ifndef KVBLK_DISK_FILE_H_
#define KVBLK_DISK_FILE_H_

#include <sys/uio.h>

#include <cstdint>
#include <memory>
#include <string>

#include "kvblk/status.h"
#include "kvblk/task.h"

namespace kvblk {

struct IoOp;

class File {
 public:
  virtual ~File() = default;

  virtual Task<Status> ReadV(const iovec* iov, int iovcnt, uint64_t offset) = 0;
  virtual Task<Status> WriteV(const iovec* iov, int iovcnt, uint64_t offset) = 0;
  // Makes completed writes durable (fdatasync; fsync when the size changed).
  virtual Task<Status> Flush() = 0;
  // Deallocates the range in the host file (punch hole); it reads as zeros.
  virtual Task<Status> Discard(uint64_t offset, uint64_t length) = 0;
  // Makes the range read as zeros, allocating it if `allocate` (zero range),
  // otherwise deallocating it where the host can.
  virtual Task<Status> WriteZeroes(uint64_t offset, uint64_t length, bool allocate) = 0;
  // Current size in bytes.
  virtual Result<uint64_t> Size() = 0;
  // Sets the size (synchronous; not on the request path).
  virtual Status Truncate(uint64_t size) = 0;
  // Bytes the host actually allocated for the file (for "actual-size").
  virtual Result<uint64_t> AllocatedBytes() = 0;

  // Whether the host file holds data at `offset` (false: a hole that reads
  // as zeros), and for how many bytes (at most `max`) that stays true.
  // Files that cannot tell report data.
  struct Extent {
    bool data = true;
    uint64_t length = 0;
  };
  virtual Result<Extent> DataExtent(uint64_t /*offset*/, uint64_t max) {
    return Extent{true, max};
  }

  virtual const std::string& path() const = 0;
  virtual bool read_only() const = 0;
  // Alignment that buffers, offsets and lengths must have (1 unless O_DIRECT);
  // PosixFile bounces unaligned requests itself, so callers may ignore it.
  virtual uint32_t alignment() const { return 1; }

  // Single-buffer conveniences.
  Task<Status> Read(void* buf, size_t len, uint64_t offset);
  Task<Status> Write(const void* buf, size_t len, uint64_t offset);

  // The callback form of ReadV, for the read fast path. If the file can
  // hand the read straight to the calling thread's IoEngine (PosixFile,
  // with a request that needs no O_DIRECT bounce buffer), fills in `op`'s
  // request fields, submits it and returns true: `op` completes through
  // the engine (see IoOp::Complete) with the raw result. A result equal to
  // the iovec's total length is a complete read; any other result must be
  // passed to FinishReadV. Otherwise returns false and leaves `op` alone;
  // the caller uses ReadV. The iovec must stay valid until the read is
  // finished.
  virtual bool StartReadV(const iovec* /*iov*/, int /*iovcnt*/, uint64_t /*offset*/,
                          IoOp* /*op*/) {
    return false;
  }
  // Finishes a read that StartReadV started and whose op completed with
  // `result` short of the whole iovec: retries after EINTR/EAGAIN,
  // continues after a short transfer, zero-fills past the end of the file
  // and reports errors, all as ReadV does.
  virtual Task<Status> FinishReadV(const iovec* iov, int iovcnt, uint64_t offset,
                                   int64_t result);
};

struct FileOptions {
  bool read_only = false;
  bool direct = false;  // O_DIRECT (cache=none)
  bool create = false;  // O_CREAT
  bool truncate = false;  // O_TRUNC
};

// Opens a regular file or block device. NotFound / ReadOnly / IoError with the
// path in the message.
Result<std::unique_ptr<File>> OpenPosixFile(const std::string& path, const FileOptions& opts);

}  // namespace kvblk

#endif  // KVBLK_DISK_FILE_H_
