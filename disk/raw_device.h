// RawDevice: a BlockDevice over a raw image (regular file or block device).
#ifndef KVBLK_DISK_RAW_DEVICE_H_
#define KVBLK_DISK_RAW_DEVICE_H_

#include <memory>

#include "disk/file.h"
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

  using BlockDevice::Read;
  using BlockDevice::Write;

 private:
  RawDevice(std::unique_ptr<File> file, uint64_t size) : file_(std::move(file)), size_(size) {}
  Status CheckRange(uint64_t offset, uint64_t length) const;

  std::unique_ptr<File> file_;
  uint64_t size_;
};

}  // namespace kvblk

#endif  // KVBLK_DISK_RAW_DEVICE_H_
