#include "disk/mem_file.h"

#include <algorithm>
#include <cstring>

#include "disk/iov.h"
#include "kvblk/event_loop.h"

namespace kvblk {

MemFile::MemFile(std::shared_ptr<MemFileData> data, std::string name, bool read_only)
    : data_(std::move(data)), name_(std::move(name)), ro_(read_only) {}

std::unique_ptr<MemFile> MemFile::Create(std::string name) {
  return std::make_unique<MemFile>(std::make_shared<MemFileData>(), std::move(name));
}

Task<Status> MemFile::Begin(const MemFileEvent& ev) {
  if (yield_) co_await EventLoop::Current().Yield();
  if (hook_) {
    int err = hook_(ev);
    if (err != 0) co_return Status::FromErrno(err, name_ + ": injected error");
  }
  co_return Status::Ok();
}

Task<Status> MemFile::ReadV(const iovec* iov, int iovcnt, uint64_t offset) {
  const size_t len = IovTotal(iov, iovcnt);
  KVBLK_CO_RETURN_IF_ERROR(co_await Begin({MemFileEvent::Kind::kRead, offset, len}));
  std::lock_guard<std::mutex> l(data_->mu);
  const auto& b = data_->bytes;
  uint64_t pos = offset;
  for (int i = 0; i < iovcnt; ++i) {
    auto* dst = static_cast<uint8_t*>(iov[i].iov_base);
    size_t n = iov[i].iov_len;
    size_t avail = pos < b.size() ? std::min<uint64_t>(n, b.size() - pos) : 0;
    if (avail) std::memcpy(dst, b.data() + pos, avail);
    if (n > avail) std::memset(dst + avail, 0, n - avail);
    pos += n;
  }
  co_return Status::Ok();
}

Task<Status> MemFile::WriteV(const iovec* iov, int iovcnt, uint64_t offset) {
  if (ro_) co_return Status::ReadOnly(name_ + ": read-only");
  const size_t len = IovTotal(iov, iovcnt);
  KVBLK_CO_RETURN_IF_ERROR(co_await Begin({MemFileEvent::Kind::kWrite, offset, len}));
  std::lock_guard<std::mutex> l(data_->mu);
  auto& b = data_->bytes;
  if (b.size() < offset + len) b.resize(offset + len);
  uint64_t pos = offset;
  for (int i = 0; i < iovcnt; ++i) {
    if (iov[i].iov_len == 0) continue;  // iov_base may be null
    std::memcpy(b.data() + pos, iov[i].iov_base, iov[i].iov_len);
    pos += iov[i].iov_len;
  }
  co_return Status::Ok();
}

Task<Status> MemFile::Flush() {
  co_return co_await Begin({MemFileEvent::Kind::kFlush, 0, 0});
}

Task<Status> MemFile::Discard(uint64_t offset, uint64_t length) {
  if (ro_) co_return Status::ReadOnly(name_ + ": read-only");
  KVBLK_CO_RETURN_IF_ERROR(co_await Begin({MemFileEvent::Kind::kDiscard, offset, length}));
  std::lock_guard<std::mutex> l(data_->mu);
  auto& b = data_->bytes;
  if (offset < b.size()) {
    uint64_t end = std::min<uint64_t>(b.size(), offset + length);
    std::memset(b.data() + offset, 0, end - offset);
  }
  co_return Status::Ok();
}

Task<Status> MemFile::WriteZeroes(uint64_t offset, uint64_t length, bool /*allocate*/) {
  if (ro_) co_return Status::ReadOnly(name_ + ": read-only");
  KVBLK_CO_RETURN_IF_ERROR(co_await Begin({MemFileEvent::Kind::kWriteZeroes, offset, length}));
  std::lock_guard<std::mutex> l(data_->mu);
  auto& b = data_->bytes;
  if (b.size() < offset + length) b.resize(offset + length);
  std::memset(b.data() + offset, 0, length);
  co_return Status::Ok();
}

Result<uint64_t> MemFile::Size() {
  std::lock_guard<std::mutex> l(data_->mu);
  return static_cast<uint64_t>(data_->bytes.size());
}

Status MemFile::Truncate(uint64_t size) {
  if (ro_) return Status::ReadOnly(name_ + ": read-only");
  std::lock_guard<std::mutex> l(data_->mu);
  data_->bytes.resize(size);
  return Status::Ok();
}

}  // namespace kvblk
