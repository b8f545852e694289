// RawDevice: a BlockDevice over a raw image (regular file or block device).
#ifndef KVBLK_DISK_RAW_DEVICE_H_
#define KVBLK_DISK_RAW_DEVICE_H_

#include <atomic>
#include <memory>

#include "disk/file.h"
#include "disk/file_read.h"
#include "disk/iov.h"
#include "kvblk/block_device.h"

namespace kvblk {

class RawDevice final : public BlockDevice {
 public:
  // Takes ownership of `file`; the device size is the file size at open.
  static Result<std::unique_ptr<RawDevice>> Open(std::unique_ptr<File> file);

  Task<Status> Read(uint64_t offset, const iovec* iov, int iovcnt) override;
  Task<Status> Write(uint64_t offset, const iovec* iov, int iovcnt) override;
  Task<Status> Flush() override;
  Task<Status> Discard(uint64_t offset, uint64_t length) override;
  Task<Status> WriteZeroes(uint64_t offset, uint64_t length, bool may_unmap) override;
  Task<Result<BlockStatus>> GetBlockStatus(uint64_t offset, uint64_t max_length) override;
  Task<Status> Close() override;
  uint64_t size() const override { return size_; }
  Capabilities capabilities() const override;
  Result<ImageInfo> Info() override;
  // Reads without a coroutine: a valid request whose buffers the file can
  // take as they are (see File::StartReadV) goes straight to the calling
  // thread's I/O engine (disk/file_read.h); anything else, and every error,
  // is Read()'s, so the result is always the one Read() gives.
  void StartRead(ReadRequest* req) override;
  // Reads that took that path (for tests).
  uint64_t fast_reads() const { return fast_reads_.load(std::memory_order_relaxed); }

  using BlockDevice::Read;
  using BlockDevice::Write;

 private:
  RawDevice(std::unique_ptr<File> file, uint64_t size) : file_(std::move(file)), size_(size) {}
  Status CheckRange(uint64_t offset, uint64_t length) const;

  static void FinishFastRead(FileRead* read, Status st);

  std::unique_ptr<File> file_;
  uint64_t size_;
  std::atomic<uint64_t> fast_reads_{0};
};

}  // namespace kvblk

#endif  // KVBLK_DISK_RAW_DEVICE_H_
