// PosixFile: a regular file or block device driven through the thread's
// IoEngine, with O_DIRECT bounce buffers for unaligned requests.
#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "disk/async_lock.h"
#include "disk/file.h"
#include "disk/hot.h"
#include "disk/io_engine.h"
#include "disk/iov.h"
#include "kvblk/event_loop.h"

namespace kvblk {

Task<Status> File::Read(void* buf, size_t len, uint64_t offset) {
  iovec v{buf, len};
  co_return co_await ReadV(&v, 1, offset);
}

Task<Status> File::Write(const void* buf, size_t len, uint64_t offset) {
  iovec v{const_cast<void*>(buf), len};
  co_return co_await WriteV(&v, 1, offset);
}

// Only files whose StartReadV can return true have reads to finish.
Task<Status> File::FinishReadV(const iovec*, int, uint64_t offset, int64_t) {
  co_return Status::InvalidArgument(path() + ": FinishReadV at offset " + std::to_string(offset) +
                                    " without a read started by StartReadV");
}

namespace {

struct AlignedBuffer {
  void* p = nullptr;
  explicit AlignedBuffer(size_t len, size_t align) {
    if (posix_memalign(&p, align, len) != 0) p = nullptr;
  }
  ~AlignedBuffer() { std::free(p); }
};

class PosixFile final : public File {
 public:
  PosixFile(int fd, std::string path, bool ro, bool direct, bool blockdev, uint32_t align)
      : fd_(fd), path_(std::move(path)), ro_(ro), direct_(direct), blockdev_(blockdev),
        align_(align) {}
  ~PosixFile() override { close(fd_); }

  // ReadV and WriteV are not coroutines themselves: they hand back the
  // task that does the work, so a request costs one coroutine frame here.
  Task<Status> ReadV(const iovec* iov, int iovcnt, uint64_t offset) override {
    if (direct_ && !Aligned(iov, iovcnt, offset)) return BounceRead(iov, iovcnt, offset);
    return RawReadV(iov, iovcnt, offset);
  }

  KVBLK_HOT bool StartReadV(const iovec* iov, int iovcnt, uint64_t offset, IoOp* op) override {
    if (iovcnt < 1 || iovcnt > IOV_MAX) return false;
    if (direct_ && !Aligned(iov, iovcnt, offset)) return false;
    op->kind = IoOp::Kind::kReadv;
    op->fd = fd_;
    op->iov = iov;
    op->iovcnt = iovcnt;
    op->offset = offset;
    EventLoop::Current().engine().Submit(op);
    return true;
  }

  Task<Status> FinishReadV(const iovec* iov, int iovcnt, uint64_t offset,
                           int64_t result) override {
    return RawIo(false, iov, iovcnt, offset, result);
  }

  Task<Status> WriteV(const iovec* iov, int iovcnt, uint64_t offset) override {
    if (ro_) return Fail(Status::ReadOnly(path_ + ": file opened read-only"));
    if (direct_ && !Aligned(iov, iovcnt, offset)) return BounceWrite(iov, iovcnt, offset);
    return RawWriteV(iov, iovcnt, offset);
  }

  Task<Status> Flush() override {
    if (ro_) co_return Status::Ok();
    if (Status failed = FlushFailed(); !failed.ok()) co_return failed;
    IoOp op;
    op.kind = IoOp::Kind::kFdatasync;
    op.fd = fd_;
    int64_t r = co_await IoAwaiter{&EventLoop::Current().engine(), &op};
    if (r < 0) {
      // After a failed sync the kernel may have dropped the dirty pages, so
      // a later sync could succeed without the data: fail every later flush.
      std::lock_guard<std::mutex> l(flush_mu_);
      if (flush_failed_.ok()) {
        flush_failed_ = Status::FromErrno(static_cast<int>(-r), path_ + ": flush failed");
      }
    }
    co_return FlushFailed();
  }

  Task<Status> Discard(uint64_t offset, uint64_t length) override {
    if (ro_) co_return Status::ReadOnly(path_ + ": file opened read-only");
    int64_t r = co_await Fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
    if (r == -EOPNOTSUPP || r == -EINVAL) co_return Status::Ok();  // advisory
    if (r < 0) co_return Status::FromErrno(static_cast<int>(-r), Where("discard", offset));
    co_return Status::Ok();
  }

  Task<Status> WriteZeroes(uint64_t offset, uint64_t length, bool allocate) override {
    if (ro_) co_return Status::ReadOnly(path_ + ": file opened read-only");
    int64_t r;
    if (allocate) {
      r = co_await Fallocate(FALLOC_FL_ZERO_RANGE, offset, length);
    } else {
      r = co_await Fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
      if (r == 0) {
        // Punching does not extend the file; a range past EOF must exist.
        auto size = Size();
        if (size.ok() && *size < offset + length) {
          r = co_await Fallocate(FALLOC_FL_ZERO_RANGE, offset, length);
        }
      }
    }
    if (r == 0) co_return Status::Ok();
    if (r != -EOPNOTSUPP && r != -EINVAL) {
      co_return Status::FromErrno(static_cast<int>(-r), Where("write zeroes", offset));
    }
    // The host cannot zero in place: write zeros.
    constexpr size_t kChunk = 1 << 20;
    AlignedBuffer zeros(kChunk, 4096);
    if (zeros.p == nullptr) co_return Status(StatusCode::kNoSpace, "out of memory");
    std::memset(zeros.p, 0, kChunk);
    while (length > 0) {
      size_t n = static_cast<size_t>(std::min<uint64_t>(length, kChunk));
      iovec v{zeros.p, n};
      KVBLK_CO_RETURN_IF_ERROR(co_await WriteV(&v, 1, offset));
      offset += n;
      length -= n;
    }
    co_return Status::Ok();
  }

  Result<uint64_t> Size() override {
    if (blockdev_) {
      uint64_t bytes = 0;
      if (ioctl(fd_, BLKGETSIZE64, &bytes) < 0) return Status::FromErrno(errno, path_);
      return bytes;
    }
    struct stat st;
    if (fstat(fd_, &st) < 0) return Status::FromErrno(errno, path_);
    return static_cast<uint64_t>(st.st_size);
  }

  Status Truncate(uint64_t size) override {
    if (ro_) return Status::ReadOnly(path_ + ": file opened read-only");
    if (blockdev_) return Status::NotSupported(path_ + ": cannot resize a block device");
    if (ftruncate(fd_, static_cast<off_t>(size)) < 0) {
      return Status::FromErrno(errno, path_ + ": truncate");
    }
    return Status::Ok();
  }

  Result<uint64_t> AllocatedBytes() override {
    struct stat st;
    if (fstat(fd_, &st) < 0) return Status::FromErrno(errno, path_);
    if (blockdev_) return Size();
    return static_cast<uint64_t>(st.st_blocks) * 512;
  }

  Result<Extent> DataExtent(uint64_t offset, uint64_t max) override {
    if (blockdev_) return Extent{true, max};
    off_t data = lseek(fd_, static_cast<off_t>(offset), SEEK_DATA);
    if (data < 0) {
      if (errno == ENXIO) return Extent{false, max};  // only holes from here to EOF
      return Extent{true, max};  // the filesystem cannot tell
    }
    if (static_cast<uint64_t>(data) > offset) {
      return Extent{false, std::min<uint64_t>(max, static_cast<uint64_t>(data) - offset)};
    }
    off_t hole = lseek(fd_, static_cast<off_t>(offset), SEEK_HOLE);
    if (hole < 0 || static_cast<uint64_t>(hole) <= offset) return Extent{true, max};
    return Extent{true, std::min<uint64_t>(max, static_cast<uint64_t>(hole) - offset)};
  }

  const std::string& path() const override { return path_; }
  bool read_only() const override { return ro_; }
  uint32_t alignment() const override { return direct_ ? align_ : 1; }

 private:
  std::string Where(const char* what, uint64_t offset) const {
    return path_ + ": " + what + " at offset " + std::to_string(offset);
  }

  bool Aligned(const iovec* iov, int n, uint64_t offset) const {
    // align_ is a power of two: masks, not divisions (this runs per request).
    const uint64_t mask = align_ - 1;
    if ((offset & mask) != 0) return false;
    for (int i = 0; i < n; ++i) {
      if (((reinterpret_cast<uintptr_t>(iov[i].iov_base) | iov[i].iov_len) & mask) != 0)
        return false;
    }
    return true;
  }

  Task<int64_t> Fallocate(int mode, uint64_t offset, uint64_t length) {
    IoOp op;
    op.kind = IoOp::Kind::kFallocate;
    op.fd = fd_;
    op.mode = mode;
    op.offset = offset;
    op.length = length;
    co_return co_await IoAwaiter{&EventLoop::Current().engine(), &op};
  }

  static Task<Status> Fail(Status st) { co_return st; }

  // RawIo's `first` when the first attempt is still to be submitted.
  static constexpr int64_t kNotSubmitted = INT64_MIN;

  // Transfers the whole iovec, resubmitting after short transfers. A read
  // that reaches the end of the file fills the rest with zeros. The first
  // attempt uses the caller's iovec; only a short transfer copies it (to
  // advance past what was done). `first`, if given, is the result of a
  // first attempt already made (StartReadV) with the whole iovec.
  Task<Status> RawIo(bool write, const iovec* iov, int iovcnt, uint64_t offset,
                     int64_t first = kNotSubmitted) {
    std::vector<iovec> rest;
    const iovec* cur = iov;
    size_t curcnt = static_cast<size_t>(iovcnt);
    size_t want = IovTotal(iov, iovcnt);
    while (want > 0) {
      int64_t r = first;
      first = kNotSubmitted;
      if (r == kNotSubmitted) {
        IoOp op;
        op.kind = write ? IoOp::Kind::kWritev : IoOp::Kind::kReadv;
        op.fd = fd_;
        op.iov = cur;
        op.iovcnt = static_cast<int>(std::min<size_t>(curcnt, IOV_MAX));
        op.offset = offset;
        r = co_await IoAwaiter{&EventLoop::Current().engine(), &op};
      }
      if (r == -EINTR || r == -EAGAIN) continue;
      if (r < 0) {
        co_return Status::FromErrno(static_cast<int>(-r), Where(write ? "write" : "read", offset));
      }
      if (r == 0) {
        if (write) co_return Status(StatusCode::kIoError, Where("write made no progress", offset));
        for (size_t i = 0; i < curcnt; ++i) std::memset(cur[i].iov_base, 0, cur[i].iov_len);
        break;  // end of file
      }
      const size_t done = static_cast<size_t>(r);
      if (done == want) break;
      if (cur == iov) rest.assign(iov, iov + iovcnt);
      AdvanceIov(&rest, done);
      cur = rest.data();
      curcnt = rest.size();
      offset += done;
      want -= done;
    }
    co_return Status::Ok();
  }
  Task<Status> RawReadV(const iovec* iov, int iovcnt, uint64_t offset) {
    return RawIo(false, iov, iovcnt, offset);
  }
  Task<Status> RawWriteV(const iovec* iov, int iovcnt, uint64_t offset) {
    return RawIo(true, iov, iovcnt, offset);
  }

  // O_DIRECT with an unaligned request: read the covering aligned span.
  Task<Status> BounceRead(const iovec* iov, int iovcnt, uint64_t offset) {
    size_t len = IovTotal(iov, iovcnt);
    uint64_t start = offset / align_ * align_;
    uint64_t end = (offset + len + align_ - 1) / align_ * align_;
    AlignedBuffer buf(end - start, std::max<uint32_t>(align_, 4096));
    if (buf.p == nullptr) co_return Status(StatusCode::kNoSpace, "out of memory");
    iovec v{buf.p, end - start};
    KVBLK_CO_RETURN_IF_ERROR(co_await RawReadV(&v, 1, start));
    const char* src = static_cast<const char*>(buf.p) + (offset - start);
    for (int i = 0; i < iovcnt; ++i) {
      std::memcpy(iov[i].iov_base, src, iov[i].iov_len);
      src += iov[i].iov_len;
    }
    co_return Status::Ok();
  }

  // O_DIRECT with an unaligned request: read-modify-write of the aligned
  // span, serialised so that two partial-block writes cannot undo each other.
  Task<Status> BounceWrite(const iovec* iov, int iovcnt, uint64_t offset) {
    size_t len = IovTotal(iov, iovcnt);
    uint64_t start = offset / align_ * align_;
    uint64_t end = (offset + len + align_ - 1) / align_ * align_;
    bool rmw = start != offset || end != offset + len;
    co_await rmw_mu_.Lock();
    ExclusiveGuard g(&rmw_mu_);
    AlignedBuffer buf(end - start, std::max<uint32_t>(align_, 4096));
    if (buf.p == nullptr) co_return Status(StatusCode::kNoSpace, "out of memory");
    iovec v{buf.p, end - start};
    if (rmw) KVBLK_CO_RETURN_IF_ERROR(co_await RawReadV(&v, 1, start));
    char* dst = static_cast<char*>(buf.p) + (offset - start);
    for (int i = 0; i < iovcnt; ++i) {
      std::memcpy(dst, iov[i].iov_base, iov[i].iov_len);
      dst += iov[i].iov_len;
    }
    co_return co_await RawWriteV(&v, 1, start);
  }

  int fd_;
  std::string path_;
  bool ro_;
  bool direct_;
  bool blockdev_;
  uint32_t align_;
  AsyncMutex rmw_mu_;
  Status FlushFailed() const {
    std::lock_guard<std::mutex> l(flush_mu_);
    return flush_failed_;
  }
  // Flushes may come from any I/O thread (a raw device has no home loop).
  mutable std::mutex flush_mu_;
  Status flush_failed_;  // sticky: set by the first failed sync; guarded by flush_mu_
};

}  // namespace

Result<std::unique_ptr<File>> OpenPosixFile(const std::string& path, const FileOptions& opts) {
  int flags = O_CLOEXEC | (opts.read_only ? O_RDONLY : O_RDWR);
  if (opts.create) flags |= O_CREAT;
  if (opts.truncate) flags |= O_TRUNC;
  if (opts.direct) flags |= O_DIRECT;
  int fd = open(path.c_str(), flags, 0644);
  if (fd < 0) return Status::FromErrno(errno, path);
  struct stat st;
  if (fstat(fd, &st) < 0) {
    int e = errno;
    close(fd);
    return Status::FromErrno(e, path);
  }
  bool blockdev = S_ISBLK(st.st_mode);
  if (!blockdev && !S_ISREG(st.st_mode)) {
    close(fd);
    return Status::InvalidArgument(path + ": not a regular file or block device");
  }
  uint32_t align = 512;
  if (opts.direct) {
    if (blockdev) {
      int lbs = 0;
      if (ioctl(fd, BLKSSZGET, &lbs) == 0 && lbs > 0) {
        // Logical block sizes are powers of two; Aligned() relies on it, so
        // anything else falls back to the 4096 that suits every device.
        align = std::has_single_bit(static_cast<uint32_t>(lbs)) ? static_cast<uint32_t>(lbs) : 4096;
      }
    } else {
      align = 4096;  // safe for every filesystem and device we run on
    }
  }
  return std::unique_ptr<File>(
      new PosixFile(fd, path, opts.read_only, opts.direct, blockdev, align));
}

}  // namespace kvblk
