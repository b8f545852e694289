// Qcow2Device's read fast path: StartRead without a coroutine.
//
// A guest read costs Read() four coroutine frames (the caller's, Read's,
// the file's and the I/O wait) and their hand-offs. Most reads of a running
// guest lie in one host extent of normal clusters whose L2 tables are
// cached; for those, StartRead does what Read() would do in a plain
// function: it takes image_lock_ shared (TryLockShared: a waiting snapshot
// or L1 growth sends the read down the slow path, so it cannot starve),
// checks the request, looks the clusters up in the cache and pins them,
// and hands the read to the file with a FastRead, a FileRead
// (disk/file_read.h: a short or failed transfer is finished exactly as
// ReadV would finish it). The completion, on the same loop, releases the
// pins and the lock before it calls the caller's `done`, as Read's guards
// do before it returns.
//
// Everything the fast path does not take (zero, unallocated, compressed or
// subcluster mappings, a table miss, an extent that breaks on the host, an
// O_DIRECT request that needs a bounce buffer, a lock that is not free)
// runs Read(), so the fast path changes the cost of a read, never its
// result.
#include <algorithm>
#include <new>

#include "disk/file_read.h"
#include "disk/hot.h"
#include "disk/io_engine.h"
#include "disk/iov.h"
#include "disk/qcow2_device.h"

namespace kvblk::qcow2 {

// Lives in the request's device_state from StartRead until `done`: a read
// allocates nothing. FileRead does the I/O and the short-transfer handling.
struct Qcow2Device::FastRead : FileRead {
  explicit FastRead(Qcow2Device* d) : dev(d), pins(d->alloc_.get()) {}

  static FastRead* Create(Qcow2Device* d, ReadRequest* r) {
    static_assert(sizeof(FastRead) <= ReadRequest::kDeviceStateSize);
    static_assert(alignof(FastRead) <= 16);  // device_state is alignas(16)
    return new (r->device_state) FastRead(d);
  }
  // Ends `f`'s lifetime (releasing its pins).
  static void Destroy(FastRead* f) { f->~FastRead(); }

  // FileRead's `finish`: releases the pins and the lock, then reports `st`.
  KVBLK_HOT static void Finish(FileRead* r, Status st) {
    auto* f = static_cast<FastRead*>(r);
    ReadRequest* req = f->req;
    Qcow2Device* dev = f->dev;
    Destroy(f);
    dev->image_lock_.UnlockShared();
    req->done(req, std::move(st));
  }

  Qcow2Device* dev;
  IoPins pins;
};

KVBLK_HOT void Qcow2Device::StartRead(ReadRequest* req) {
  bool started = false;
  try {
    started = TryStartFastRead(req);
  } catch (const std::bad_alloc&) {  // nothing held; Read() reports it
  }
  if (!started) BlockDevice::StartRead(req);
}

KVBLK_HOT bool Qcow2Device::TryStartFastRead(ReadRequest* req) {
  if (!image_lock_.TryLockShared()) return false;
  const size_t len = IovTotal(req->iov, req->iovcnt);
  const uint64_t pos = req->offset;
  // Errors (a closed device, a request past the end) are Read's to report.
  if (len == 0 || !RequestValid(pos, len, false)) {
    image_lock_.UnlockShared();
    return false;
  }
  FastRead* f = FastRead::Create(this, req);
  Mapping m;
  bool ok;
  try {  // pinning more than a few clusters allocates
    ok = TryLookupCached(pos >> cluster_bits_, &m, &f->pins) && m.type == Mapping::Type::kNormal;
    if (ok) {
      const size_t first =
          static_cast<size_t>(std::min<uint64_t>(cluster_size_ - (pos & (cluster_size_ - 1)), len));
      ok = first == len || ExtendCachedRun(pos, pos + len, first, m, &f->pins) == len;
    }
  } catch (...) {
    FastRead::Destroy(f);
    image_lock_.UnlockShared();
    throw;
  }
  if (ok)
    ok = f->Start(file_.get(), req, m.host + (pos & (cluster_size_ - 1)), len, &FastRead::Finish);
  if (!ok) {
    FastRead::Destroy(f);  // unpins
    image_lock_.UnlockShared();
    return false;
  }
  fast_reads_.fetch_add(1, std::memory_order_relaxed);
  return true;  // FastRead::Finish ends f
}

}  // namespace kvblk::qcow2
