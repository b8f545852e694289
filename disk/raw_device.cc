#include "disk/raw_device.h"

#include <fcntl.h>
#include <unistd.h>

#include <new>

#include "disk/hot.h"
#include "kvblk/event_loop.h"

namespace kvblk {

Task<Status> BlockDevice::Read(uint64_t offset, void* buf, size_t len) {
  iovec v{buf, len};
  co_return co_await Read(offset, &v, 1);
}

Task<Status> BlockDevice::Write(uint64_t offset, const void* buf, size_t len) {
  iovec v{const_cast<void*>(buf), len};
  co_return co_await Write(offset, &v, 1);
}

namespace {
// Read() for StartRead: an exception (out of memory) becomes an I/O error
// instead of escaping the detached coroutine.
Task<Status> ReadForStartRead(BlockDevice* dev, ReadRequest* req) {
  try {
    co_return co_await dev->Read(req->offset, req->iov, req->iovcnt);
  } catch (const std::bad_alloc&) {
    co_return Status(StatusCode::kIoError, "out of memory during a read");
  }
}
}  // namespace

void BlockDevice::StartRead(ReadRequest* req) {
  try {
    Spawn(ReadForStartRead(this, req), [req](Status st) { req->done(req, std::move(st)); });
  } catch (const std::bad_alloc&) {  // no coroutine frame: nothing started
    req->done(req, Status(StatusCode::kIoError, "out of memory starting a read"));
  }
}

Task<Status> BlockDevice::WriteCompressed(uint64_t, const void*, size_t) {
  co_return Status::NotSupported("compressed writes need a qcow2 image");
}

Result<std::unique_ptr<RawDevice>> RawDevice::Open(std::unique_ptr<File> file) {
  KVBLK_ASSIGN_OR_RETURN(uint64_t size, file->Size());
  return std::unique_ptr<RawDevice>(new RawDevice(std::move(file), size));
}

Status RawDevice::CheckRange(uint64_t offset, uint64_t length) const {
  if (offset > size_ || length > size_ - offset) {
    return Status::InvalidArgument(file_->path() + ": request at offset " +
                                   std::to_string(offset) + " length " + std::to_string(length) +
                                   " is past the end of the device (" + std::to_string(size_) +
                                   " bytes)");
  }
  return Status::Ok();
}

Task<Status> RawDevice::Read(uint64_t offset, const iovec* iov, int iovcnt) {
  KVBLK_CO_RETURN_IF_ERROR(CheckRange(offset, IovTotal(iov, iovcnt)));
  co_return co_await file_->ReadV(iov, iovcnt, offset);
}

KVBLK_HOT void RawDevice::StartRead(ReadRequest* req) {
  static_assert(sizeof(FileRead) <= ReadRequest::kDeviceStateSize);
  static_assert(alignof(FileRead) <= 16);  // device_state is alignas(16)
  const size_t len = IovTotal(req->iov, req->iovcnt);
  // Empty and out-of-range requests are Read()'s to answer.
  if (len > 0 && req->offset <= size_ && len <= size_ - req->offset) {
    auto* r = new (req->device_state) FileRead;
    bool started = false;
    try {  // the thread's first read may create its loop
      started = r->Start(file_.get(), req, req->offset, len, &FinishFastRead);
    } catch (const std::bad_alloc&) {  // nothing started; Read() reports it
    }
    if (started) {
      fast_reads_.fetch_add(1, std::memory_order_relaxed);
      return;
    }
    r->~FileRead();
  }
  BlockDevice::StartRead(req);
}

// FileRead's `finish` for StartRead: ends the FileRead, then reports.
KVBLK_HOT void RawDevice::FinishFastRead(FileRead* r, Status st) {
  ReadRequest* req = r->req;
  r->~FileRead();
  req->done(req, std::move(st));
}

Task<Status> RawDevice::Write(uint64_t offset, const iovec* iov, int iovcnt) {
  if (file_->read_only()) co_return Status::ReadOnly(file_->path() + ": image is read-only");
  KVBLK_CO_RETURN_IF_ERROR(CheckRange(offset, IovTotal(iov, iovcnt)));
  co_return co_await file_->WriteV(iov, iovcnt, offset);
}

Task<Status> RawDevice::Flush() { co_return co_await file_->Flush(); }

Task<Status> RawDevice::Discard(uint64_t offset, uint64_t length) {
  if (file_->read_only()) co_return Status::ReadOnly(file_->path() + ": image is read-only");
  KVBLK_CO_RETURN_IF_ERROR(CheckRange(offset, length));
  co_return co_await file_->Discard(offset, length);
}

Task<Status> RawDevice::WriteZeroes(uint64_t offset, uint64_t length, bool may_unmap) {
  if (file_->read_only()) co_return Status::ReadOnly(file_->path() + ": image is read-only");
  KVBLK_CO_RETURN_IF_ERROR(CheckRange(offset, length));
  co_return co_await file_->WriteZeroes(offset, length, !may_unmap);
}

Task<Result<BlockStatus>> RawDevice::GetBlockStatus(uint64_t offset, uint64_t max_length) {
  KVBLK_CO_RETURN_IF_ERROR(CheckRange(offset, 0));
  if (offset >= size_) {
    co_return Status::InvalidArgument(file_->path() + ": offset " + std::to_string(offset) +
                                      " is past the end of the device");
  }
  KVBLK_CO_ASSIGN_OR_RETURN(File::Extent ext,
                            file_->DataExtent(offset, std::min<uint64_t>(max_length, size_ - offset)));
  BlockStatus bs;
  bs.length = ext.length;
  bs.present = true;
  bs.data = ext.data;
  bs.zero = !ext.data;
  bs.host_offset = offset;
  bs.host_file = file_->path();
  co_return bs;
}

Task<Status> RawDevice::Close() { co_return co_await file_->Flush(); }

Capabilities RawDevice::capabilities() const {
  Capabilities c;
  c.read_only = file_->read_only();
  c.logical_block_size = 512;
  c.discard_granularity = 4096;
  c.optimal_io_size = 0;
  return c;
}

Result<ImageInfo> RawDevice::Info() {
  ImageInfo info;
  info.filename = file_->path();
  info.format = "raw";
  info.virtual_size = size_;
  KVBLK_ASSIGN_OR_RETURN(info.actual_size, file_->AllocatedBytes());
  return info;
}

}  // namespace kvblk
