// ForwardingDevice: a BlockDevice that passes every call to another one, for
// tests that override a few calls to delay, record or fail them.
#ifndef KVBLK_TESTS_SUPPORT_FORWARDING_DEVICE_H_
#define KVBLK_TESTS_SUPPORT_FORWARDING_DEVICE_H_

#include "kvblk/block_device.h"

namespace kvblk::testing {

class ForwardingDevice : public BlockDevice {
 public:
  // `inner` must outlive this device.
  explicit ForwardingDevice(BlockDevice& inner) : inner_(inner) {}

  Task<Status> Read(uint64_t offset, const iovec* iov, int iovcnt) override {
    return inner_.Read(offset, iov, iovcnt);
  }
  Task<Status> Write(uint64_t offset, const iovec* iov, int iovcnt) override {
    return inner_.Write(offset, iov, iovcnt);
  }
  Task<Status> Flush() override { return inner_.Flush(); }
  Task<Status> Discard(uint64_t offset, uint64_t length) override {
    return inner_.Discard(offset, length);
  }
  Task<Status> WriteZeroes(uint64_t offset, uint64_t length, bool may_unmap) override {
    return inner_.WriteZeroes(offset, length, may_unmap);
  }
  Task<Result<BlockStatus>> GetBlockStatus(uint64_t offset, uint64_t max_length) override {
    return inner_.GetBlockStatus(offset, max_length);
  }
  Task<Status> Close() override { return inner_.Close(); }
  uint64_t size() const override { return inner_.size(); }
  Capabilities capabilities() const override { return inner_.capabilities(); }
  Result<ImageInfo> Info() override { return inner_.Info(); }
  uint64_t l2_cache_bytes() const override { return inner_.l2_cache_bytes(); }

 protected:
  BlockDevice& inner_;
};

}  // namespace kvblk::testing

#endif  // KVBLK_TESTS_SUPPORT_FORWARDING_DEVICE_H_
