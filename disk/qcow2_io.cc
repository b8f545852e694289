// Qcow2Device data path: read, write (in place and allocating), discard,
// write zeroes, block status and compressed writes.
#include <algorithm>
#include <cstring>

#include "disk/compress.h"
#include "disk/iov.h"
#include "disk/qcow2_device.h"
#include "disk/raw_device.h"

namespace kvblk::qcow2 {

namespace {

// Enough zeros for any cluster (2 MiB), shared read-only.
const std::vector<uint8_t>& ZeroBuffer() {
  static const std::vector<uint8_t> zeros(uint64_t{1} << kMaxClusterBits, 0);
  return zeros;
}

iovec ZeroIovec(size_t len) {
  return {const_cast<uint8_t*>(ZeroBuffer().data()), len};
}

}  // namespace

// --- reads ----------------------------------------------------------------

Task<Status> Qcow2Device::ReadBacking(uint64_t pos, const std::vector<iovec>& iov) {
  const size_t len = IovTotal(iov);
  uint64_t bsize = backing_ ? backing_->size() : 0;
  size_t avail = pos >= bsize ? 0 : static_cast<size_t>(std::min<uint64_t>(len, bsize - pos));
  if (avail > 0) {
    std::vector<iovec> part;
    SliceIov(iov, 0, avail, &part);
    KVBLK_CO_RETURN_IF_ERROR(co_await backing_->Read(pos, part.data(), static_cast<int>(part.size())));
  }
  if (avail < len) {
    std::vector<iovec> rest;
    SliceIov(iov, avail, len - avail, &rest);
    ZeroIov(rest);
  }
  co_return Status::Ok();
}

Task<Status> Qcow2Device::ReadCompressed(const Mapping& m, uint64_t pos,
                                         const std::vector<iovec>& iov) {
  std::vector<uint8_t> in(m.comp_length);
  KVBLK_CO_RETURN_IF_ERROR(co_await file_->Read(in.data(), in.size(), m.comp_offset));
  std::vector<uint8_t> out(cluster_size_);
  Status st = Decompress(header_.compression_type, in.data(), in.size(), out.data(), out.size());
  if (!st.ok()) {
    co_return st.WithContext(file_->path() + ": compressed cluster at host offset " +
                             std::to_string(m.comp_offset));
  }
  CopyToIov(iov, out.data() + (pos & (cluster_size_ - 1)));
  co_return Status::Ok();
}

Task<Status> Qcow2Device::ReadMapped(const Mapping& m, uint64_t pos,
                                     const std::vector<iovec>& iov) {
  switch (m.type) {
    case Mapping::Type::kUnallocated:
      co_return co_await ReadBacking(pos, iov);
    case Mapping::Type::kZero:
      ZeroIov(iov);
      co_return Status::Ok();
    case Mapping::Type::kCompressed:
      co_return co_await ReadCompressed(m, pos, iov);
    case Mapping::Type::kNormal:
      co_return co_await file_->ReadV(iov.data(), static_cast<int>(iov.size()),
                                      m.host + (pos & (cluster_size_ - 1)));
    case Mapping::Type::kSubclusters:
      co_return co_await ReadSubclusters(m, pos, iov);
  }
  co_return Status::Ok();
}

Task<Status> Qcow2Device::Read(uint64_t offset, const iovec* iov, int iovcnt) {
  const size_t len = IovTotal(iov, iovcnt);
  co_await image_lock_.LockShared();
  SharedGuard g(&image_lock_);
  KVBLK_CO_RETURN_IF_ERROR(CheckRequest(offset, len, false));
  const uint64_t end = offset + len;
  uint64_t pos = offset;
  std::vector<iovec> part;
  while (pos < end) {
    uint64_t gc = pos >> cluster_bits_;
    size_t n = static_cast<size_t>(std::min(cluster_size_ - (pos & (cluster_size_ - 1)), end - pos));
    IoPins pins(alloc_.get());
    Mapping m;
    if (!TryLookupCached(gc, &m, &pins)) {
      KVBLK_CO_ASSIGN_OR_RETURN(m, co_await Lookup(gc, &pins));
    }
    // Merge clusters that are contiguous on the host into one read. Only
    // cached tables are merged over; a miss ends the run and the next round
    // loads the table.
    if (m.type == Mapping::Type::kNormal) n = ExtendCachedRun(pos, end, n, m, &pins);
    if (n == len && m.type == Mapping::Type::kNormal) {
      // The whole request is one host extent (the common case): read into
      // the caller's iovec as it is.
      co_return co_await file_->ReadV(iov, iovcnt, m.host + (pos & (cluster_size_ - 1)));
    }
    part.clear();
    SliceIov(iov, iovcnt, pos - offset, n, &part);
    KVBLK_CO_RETURN_IF_ERROR(co_await ReadMapped(m, pos, part));
    pos += n;
  }
  co_return Status::Ok();
}

// --- writes ---------------------------------------------------------------

void Qcow2Device::FreeOldEntry(uint64_t entry, uint64_t bitmap, uint64_t gc,
                               uint64_t keep_host) {
  auto m = Decode(entry, bitmap, gc);
  if (!m.ok()) return;  // an invalid old entry references nothing we may free
  if (m->type == Mapping::Type::kCompressed) {
    uint64_t first = m->comp_offset >> cluster_bits_;
    uint64_t last = (m->comp_offset + m->comp_length - 1) >> cluster_bits_;
    alloc_->DeferFree(first << cluster_bits_, last - first + 1);
  } else if (m->host != 0 && m->host != keep_host) {
    known_zero_.Forget(m->host);  // it may be handed out (and written) again
    alloc_->DeferFree(m->host, 1);
  }
}

bool Qcow2Device::ReadsAsZero(const Mapping& m, uint64_t pos) const {
  if (m.type == Mapping::Type::kZero) return true;
  if (m.type != Mapping::Type::kUnallocated) return false;
  // Unallocated: zeros unless a backing image has data from `pos` on.
  return !backing_ || pos >= backing_->size();
}

Task<Result<size_t>> Qcow2Device::AllocatingWrite(uint64_t pos, size_t len,
                                                  const std::vector<iovec>& data) {
  const uint64_t gc0 = pos >> cluster_bits_;
  uint64_t k = ((pos + len - 1) >> cluster_bits_) - gc0 + 1;
  ClusterLocks::Guard guard = co_await cluster_locks_.Lock(gc0, k);
  // Someone may have allocated while we waited: look again.
  IoPins pins(alloc_.get());  // the old clusters copy-on-write reads from
  std::vector<Mapping> old;
  for (uint64_t i = 0; i < k; ++i) {
    KVBLK_CO_ASSIGN_OR_RETURN(Mapping m, co_await LookupHome(gc0 + i, nullptr));
    if (m.type == Mapping::Type::kNormal && m.copied) break;
    pins.Add(m, cluster_bits_);
    old.push_back(m);
  }
  if (old.empty()) co_return size_t{0};
  k = old.size();

  const uint64_t l1i = gc0 >> l2_bits_;
  KVBLK_CO_ASSIGN_OR_RETURN(TableCache::Handle h, co_await GetL2ForWrite(l1i));
  KVBLK_CO_ASSIGN_OR_RETURN(Allocator::Run run, co_await alloc_->Allocate(k));
  k = run.count;
  len = static_cast<size_t>(std::min<uint64_t>(len, ((gc0 + k) << cluster_bits_) - pos));

  // One write: copy-on-write head, the guest's data, copy-on-write tail.
  const uint64_t head = pos & (cluster_size_ - 1);
  const uint64_t end = pos + len;
  const uint64_t tail = ((gc0 + k) << cluster_bits_) - end;
  // A fresh run already reads as zeros: copy-on-write of zeros is skipped
  // (with 2 MiB clusters this turns a 2 MiB write into the guest's 4 KiB).
  const bool skip_head = run.fresh && ReadsAsZero(old[0], gc0 << cluster_bits_);
  const bool skip_tail = run.fresh && ReadsAsZero(old[k - 1], end);
  std::vector<uint8_t> head_buf(skip_head ? 0 : head), tail_buf(skip_tail ? 0 : tail);
  std::vector<iovec> w;
  if (head > 0 && !skip_head) {
    std::vector<iovec> v{{head_buf.data(), head}};
    KVBLK_CO_RETURN_IF_ERROR(co_await ReadMapped(old[0], gc0 << cluster_bits_, v));
    w.push_back(v[0]);
  }
  SliceIov(data, 0, len, &w);
  if (tail > 0 && !skip_tail) {
    std::vector<iovec> v{{tail_buf.data(), tail}};
    KVBLK_CO_RETURN_IF_ERROR(co_await ReadMapped(old[k - 1], end, v));
    w.push_back(v[0]);
  }
  const uint64_t write_at = run.offset + (skip_head ? head : 0);
  if (Status ov = GuardCheck("data write", run.offset, k << cluster_bits_, kIgnoreNone);
      !ov.ok()) {
    co_return co_await RefuseWrite(std::move(ov));
  }
  Status wst = co_await file_->WriteV(w.data(), static_cast<int>(w.size()), write_at);
  if (!wst.ok()) {
    alloc_->DeferFree(run.offset, k);  // nothing refers to the run: give it back
    co_return wst;
  }
  ++data_written_seq_;  // synced before an L2 table mapping the run is written

  const uint64_t mask = (uint64_t{1} << l2_bits_) - 1;
  for (uint64_t i = 0; i < k; ++i) {
    uint64_t idx = (gc0 + i) & mask;
    uint64_t prev = L2Entry(h, idx);
    uint64_t prev_bitmap = L2Bitmap(h, idx);
    SetL2Entry(h, idx, (run.offset + (i << cluster_bits_)) | kOflagCopied,
               SubclusterBitmap(kSubclusterAll, 0));
    FreeOldEntry(prev, prev_bitmap, gc0 + i, 0);
  }
  co_return len;
}

Task<Status> Qcow2Device::WriteLocked(uint64_t offset, const std::vector<iovec>& data) {
  const size_t len = IovTotal(data);
  const uint64_t end = offset + len;
  const uint64_t mask = (uint64_t{1} << l2_bits_) - 1;
  uint64_t pos = offset;
  std::vector<iovec> part;
  while (pos < end) {
    uint64_t gc = pos >> cluster_bits_;
    size_t n = static_cast<size_t>(std::min(cluster_size_ - (pos & (cluster_size_ - 1)), end - pos));
    IoPins pins(alloc_.get());
    Mapping m;
    if (!TryLookupCached(gc, &m, &pins)) {
      KVBLK_CO_ASSIGN_OR_RETURN(m, co_await Lookup(gc, &pins));
    }
    uint64_t k = 1;
    if (WritableInPlace(m, pos, n)) {
      // In place: no cluster lock, merged over host-contiguous clusters
      // whose tables are cached.
      while (pos + n < end) {
        Mapping next;
        if (!TryLookupCached(gc + k, &next, &pins)) break;
        const size_t add = static_cast<size_t>(std::min(cluster_size_, end - pos - n));
        if (!WritableInPlace(next, (gc + k) << cluster_bits_, add) ||
            next.host != m.host + k * cluster_size_) {
          break;
        }
        n += add;
        ++k;
      }
      part.clear();
      SliceIov(data, pos - offset, n, &part);
      const uint64_t host = m.host + (pos & (cluster_size_ - 1));
      if (Status ov = GuardCheck("data write", host, n, kIgnoreNone); !ov.ok()) {
        co_return co_await RefuseWrite(std::move(ov));
      }
      KVBLK_CO_RETURN_IF_ERROR(
          co_await file_->WriteV(part.data(), static_cast<int>(part.size()), host));
      pos += n;
      continue;
    }
    if (header_.extended_l2()) {
      // Subclusters: allocating what each cluster's part touches, for the
      // following clusters that are not writable in place too (one hop).
      while (pos + n < end && k < 256) {
        Mapping next;
        if (!TryLookupCached(gc + k, &next, nullptr)) break;
        const size_t add = static_cast<size_t>(std::min(cluster_size_, end - pos - n));
        if (WritableInPlace(next, (gc + k) << cluster_bits_, add)) break;
        n += add;
        ++k;
      }
      part.clear();
      SliceIov(data, pos - offset, n, &part);
      size_t done;
      if (&EventLoop::Current() == home_) {
        KVBLK_CO_ASSIGN_OR_RETURN(done, co_await SubclusterWriteRun(pos, part));
      } else {
        KVBLK_CO_ASSIGN_OR_RETURN(done, co_await OnHome(SubclusterWriteRun(pos, part)));
      }
      pos += done;  // short: writable in place now; go round again
      continue;
    }
    // Gather following clusters of the same L2 table that also need
    // allocation, so they can share one host run and one write.
    while (pos + n < end && ((gc + k) & mask) != 0 && k < 256) {
      Mapping next;
      if (!TryLookupCached(gc + k, &next, nullptr)) break;
      if (next.type == Mapping::Type::kNormal && next.copied) break;
      n += static_cast<size_t>(std::min(cluster_size_, end - pos - n));
      ++k;
    }
    part.clear();
    SliceIov(data, pos - offset, n, &part);
    size_t done;
    if (&EventLoop::Current() == home_) {
      KVBLK_CO_ASSIGN_OR_RETURN(done, co_await AllocatingWrite(pos, n, part));
    } else {
      KVBLK_CO_ASSIGN_OR_RETURN(done, co_await OnHome(AllocatingWrite(pos, n, part)));
    }
    pos += done;  // 0: the cluster became writable in place; go round again
  }
  co_return Status::Ok();
}

Task<Status> Qcow2Device::Write(uint64_t offset, const iovec* iov, int iovcnt) {
  const size_t len = IovTotal(iov, iovcnt);
  co_await image_lock_.LockShared();
  SharedGuard g(&image_lock_);
  KVBLK_CO_RETURN_IF_ERROR(CheckRequest(offset, len, true));
  if (len == 0) co_return Status::Ok();
  co_return co_await WriteLocked(offset, std::vector<iovec>(iov, iov + iovcnt));
}

// --- discard and write zeroes ----------------------------------------------

Task<Status> Qcow2Device::ZeroOrDiscardCluster(uint64_t gc, bool discard, bool may_unmap,
                                               bool* done) {
  *done = true;
  ClusterLocks::Guard guard = co_await cluster_locks_.Lock(gc, 1);
  KVBLK_CO_ASSIGN_OR_RETURN(Mapping m, co_await LookupHome(gc, nullptr));
  const bool v3 = header_.version >= 3;
  // What an unallocated cluster means on disk depends on the image having a
  // backing file, whether or not this open follows it.
  const bool has_backing = !header_.backing_file.empty();
  uint64_t entry;
  uint64_t bitmap = 0;  // extended L2 entries only
  uint64_t keep = 0;
  if (header_.extended_l2()) {
    // No zero flag: the bitmap says "reads as zero" per subcluster
    // (qcow2.rst, "Extended L2 Entries"); version 3 is implied.
    const uint64_t all_zero = SubclusterBitmap(0, kSubclusterAll);
    entry = 0;
    if (discard) {
      bitmap = (has_backing || m.type != Mapping::Type::kUnallocated) ? all_zero : 0;
      if (m.host == 0 && (m.type == Mapping::Type::kZero ||
                          (m.type == Mapping::Type::kUnallocated && bitmap == 0))) {
        co_return Status::Ok();
      }
    } else {
      if (m.type == Mapping::Type::kZero && (m.host == 0 || !may_unmap)) co_return Status::Ok();
      if (m.type == Mapping::Type::kUnallocated && !has_backing) co_return Status::Ok();
      bitmap = all_zero;
      if (!may_unmap && m.copied && m.host != 0 && m.type != Mapping::Type::kCompressed) {
        entry = m.host | kOflagCopied;  // keep the allocation
        keep = m.host;
      }
    }
  } else if (discard) {
    bool allocated = m.type != Mapping::Type::kUnallocated;
    entry = (v3 && (has_backing || allocated)) ? kOflagZero : 0;
    if (m.type == Mapping::Type::kUnallocated && entry == 0) co_return Status::Ok();
    if (m.type == Mapping::Type::kZero && m.host == 0) co_return Status::Ok();
  } else if (!v3) {
    if (has_backing) {
      *done = false;  // no zero flag in v2: the caller writes zeros
      co_return Status::Ok();
    }
    if (m.type == Mapping::Type::kUnallocated) co_return Status::Ok();
    entry = 0;
  } else {
    if (m.type == Mapping::Type::kZero && (m.host == 0 || !may_unmap)) co_return Status::Ok();
    if (m.type == Mapping::Type::kUnallocated && !has_backing) co_return Status::Ok();
    entry = kOflagZero;
    if (!may_unmap && m.type == Mapping::Type::kNormal && m.copied) {
      entry = m.host | kOflagZero | kOflagCopied;  // keep the allocation
      keep = m.host;
    }
  }
  KVBLK_CO_ASSIGN_OR_RETURN(TableCache::Handle h, co_await GetL2ForWrite(gc >> l2_bits_));
  uint64_t idx = gc & ((uint64_t{1} << l2_bits_) - 1);
  uint64_t prev = L2Entry(h, idx);
  uint64_t prev_bitmap = L2Bitmap(h, idx);
  SetL2Entry(h, idx, entry, bitmap);
  FreeOldEntry(prev, prev_bitmap, gc, keep);
  co_return Status::Ok();
}

Task<Status> Qcow2Device::Discard(uint64_t offset, uint64_t length) {
  return OnHome(DiscardOnHome(offset, length));
}

Task<Status> Qcow2Device::DiscardOnHome(uint64_t offset, uint64_t length) {
  {
    co_await image_lock_.LockShared();
    SharedGuard g(&image_lock_);
    KVBLK_CO_RETURN_IF_ERROR(CheckRequest(offset, length, true));
    // A v2 image has no zero flag: unmapping a cluster would expose the
    // backing file's (stale) data. Discards are advisory, so do nothing.
    if (header_.version < 3 && !header_.backing_file.empty()) co_return Status::Ok();
    uint64_t end = offset + length;
    uint64_t first = (offset + cluster_size_ - 1) >> cluster_bits_;
    // The partial last cluster of the disk counts as whole.
    uint64_t last = end == header_.size ? (end + cluster_size_ - 1) >> cluster_bits_
                                        : end >> cluster_bits_;
    if (header_.extended_l2() && length > 0) {
      // The partial clusters at the edges, subcluster by subcluster.
      const uint64_t head_end = std::min(end, first << cluster_bits_);
      if (offset < head_end) {
        KVBLK_CO_RETURN_IF_ERROR(co_await ZeroOrDiscardPartial(offset, head_end, true, true));
      }
      if (last >= first && (last << cluster_bits_) < end) {
        KVBLK_CO_RETURN_IF_ERROR(
            co_await ZeroOrDiscardPartial(last << cluster_bits_, end, true, true));
      }
    }
    for (uint64_t gc = first; gc < last; ++gc) {
      bool done;
      KVBLK_CO_RETURN_IF_ERROR(co_await ZeroOrDiscardCluster(gc, true, true, &done));
    }
  }
  // Bound the clusters waiting to be freed.
  if (alloc_->deferred_count() > 4096) {
    co_await flush_mu_.Lock();
    ExclusiveGuard f(&flush_mu_);
    KVBLK_CO_RETURN_IF_ERROR(co_await FlushMetadata());
  }
  co_return Status::Ok();
}

Task<Status> Qcow2Device::WriteZeroes(uint64_t offset, uint64_t length, bool may_unmap) {
  return OnHome(WriteZeroesOnHome(offset, length, may_unmap));
}

Task<Status> Qcow2Device::WriteZeroesOnHome(uint64_t offset, uint64_t length, bool may_unmap) {
  co_await image_lock_.LockShared();
  SharedGuard g(&image_lock_);
  KVBLK_CO_RETURN_IF_ERROR(CheckRequest(offset, length, true));
  const uint64_t end = offset + length;
  uint64_t pos = offset;
  while (pos < end) {
    uint64_t gc = pos >> cluster_bits_;
    uint64_t cend = std::min(end, (gc + 1) << cluster_bits_);
    bool whole = (pos & (cluster_size_ - 1)) == 0 &&
                 (cend == ((gc + 1) << cluster_bits_) || cend == header_.size);
    bool done = false;
    if (whole) {
      KVBLK_CO_RETURN_IF_ERROR(co_await ZeroOrDiscardCluster(gc, false, may_unmap, &done));
    } else if (header_.extended_l2()) {
      KVBLK_CO_RETURN_IF_ERROR(co_await ZeroOrDiscardPartial(pos, cend, false, may_unmap));
      done = true;
    }
    if (!done) {
      std::vector<iovec> z{ZeroIovec(static_cast<size_t>(cend - pos))};
      KVBLK_CO_RETURN_IF_ERROR(co_await WriteLocked(pos, z));
    }
    pos = cend;
  }
  co_return Status::Ok();
}

// --- block status ------------------------------------------------------------

Task<Result<BlockStatus>> Qcow2Device::GetBlockStatus(uint64_t offset, uint64_t max_length) {
  return OnHome(GetBlockStatusOnHome(offset, max_length));
}

Task<Result<BlockStatus>> Qcow2Device::GetBlockStatusOnHome(uint64_t offset,
                                                            uint64_t max_length) {
  co_await image_lock_.LockShared();
  SharedGuard g(&image_lock_);
  if (offset >= header_.size) {
    co_return Status::InvalidArgument(file_->path() + ": offset " + std::to_string(offset) +
                                      " is past the end of the disk");
  }
  const uint64_t limit = offset + std::min(max_length, header_.size - offset);
  uint64_t gc = offset >> cluster_bits_;
  KVBLK_CO_ASSIGN_OR_RETURN(Mapping m, co_await LookupHome(gc, nullptr));
  uint64_t len = std::min(limit, (gc + 1) << cluster_bits_) - offset;
  if (m.type == Mapping::Type::kSubclusters) {
    // The run of subclusters in the same state, reported as a cluster of
    // that state would be.
    const uint32_t scb = subcluster_bits();
    const uint32_t s = static_cast<uint32_t>((offset & (cluster_size_ - 1)) >> scb);
    auto state = [&](uint32_t i) { return ((m.sub_alloc >> i) & 1) | (((m.sub_zero >> i) & 1) << 1); };
    uint32_t e = s + 1;
    while (e < kSubclustersPerCluster && state(e) == state(s)) ++e;
    len = std::min(limit, (gc << cluster_bits_) + (uint64_t{e} << scb)) - offset;
    Mapping sub;
    if (state(s) & 1) {
      sub.type = Mapping::Type::kNormal;
      sub.host = m.host;
    } else if (state(s) & 2) {
      sub.type = Mapping::Type::kZero;
    }
    m = sub;
  } else if (m.type != Mapping::Type::kCompressed) {
    for (uint64_t k = 1; offset + len < limit; ++k) {
      KVBLK_CO_ASSIGN_OR_RETURN(Mapping next, co_await LookupHome(gc + k, nullptr));
      if (next.type != m.type) break;
      bool m_has_host = m.host != 0;
      if (m_has_host != (next.host != 0)) break;
      if (m_has_host && next.host != m.host + k * cluster_size_) break;
      len = std::min(limit, (gc + k + 1) << cluster_bits_) - offset;
    }
  }
  BlockStatus bs;
  bs.length = len;
  const uint64_t in = offset & (cluster_size_ - 1);
  switch (m.type) {
    case Mapping::Type::kNormal: {
      bs.present = bs.data = true;
      bs.host_offset = m.host + in;
      bs.host_file = file_->path();
      // A hole in the host file reads as zeros (e.g. metadata preallocation).
      KVBLK_CO_ASSIGN_OR_RETURN(File::Extent ext, file_->DataExtent(m.host + in, len));
      bs.zero = !ext.data;
      bs.length = ext.length;
      break;
    }
    case Mapping::Type::kZero:
      bs.present = bs.zero = true;
      if (m.host) {
        bs.host_offset = m.host + in;
        bs.host_file = file_->path();
      }
      break;
    case Mapping::Type::kCompressed:
      bs.present = bs.data = true;
      bs.compressed = true;
      bs.host_file = file_->path();
      break;
    case Mapping::Type::kSubclusters:  // replaced above
      break;
    case Mapping::Type::kUnallocated:
      if (backing_ && offset < backing_->size()) {
        KVBLK_CO_ASSIGN_OR_RETURN(BlockStatus b, co_await backing_->GetBlockStatus(offset, len));
        b.depth += 1;
        co_return b;
      }
      bs.zero = true;
      if (backing_) bs.depth = 1;
      break;
  }
  co_return bs;
}

// --- compressed writes -------------------------------------------------------

Task<Status> Qcow2Device::WriteCompressed(uint64_t offset, const void* buf, size_t len) {
  return OnHome(WriteCompressedOnHome(offset, buf, len));
}

Task<Status> Qcow2Device::WriteCompressedOnHome(uint64_t offset, const void* buf, size_t len) {
  co_await image_lock_.LockShared();
  SharedGuard g(&image_lock_);
  KVBLK_CO_RETURN_IF_ERROR(CheckRequest(offset, len, true));
  if ((offset & (cluster_size_ - 1)) != 0 ||
      (len != cluster_size_ && offset + len != header_.size) || len > cluster_size_) {
    co_return Status::InvalidArgument(file_->path() +
                                      ": compressed writes must cover exactly one cluster");
  }
  const uint64_t gc = offset >> cluster_bits_;
  std::vector<uint8_t> clear(cluster_size_, 0);
  std::memcpy(clear.data(), buf, len);
  KVBLK_CO_ASSIGN_OR_RETURN(std::vector<uint8_t> packed,
                            Compress(header_.compression_type, clear.data(), cluster_size_,
                                     cluster_size_ - 1));
  if (packed.empty()) {  // incompressible: store it as a normal cluster
    std::vector<iovec> v{{const_cast<void*>(buf), len}};
    co_return co_await WriteLocked(offset, v);
  }
  ClusterLocks::Guard guard = co_await cluster_locks_.Lock(gc, 1);
  KVBLK_CO_ASSIGN_OR_RETURN(Mapping m, co_await LookupHome(gc, nullptr));
  if (m.type == Mapping::Type::kNormal || m.type == Mapping::Type::kCompressed ||
      m.sub_alloc != 0) {
    co_return Status::InvalidArgument(file_->path() + ": cluster at guest offset " +
                                      std::to_string(offset) +
                                      " is already allocated; compressed writes need an "
                                      "unallocated cluster");
  }
  KVBLK_CO_ASSIGN_OR_RETURN(TableCache::Handle h, co_await GetL2ForWrite(gc >> l2_bits_));
  KVBLK_CO_ASSIGN_OR_RETURN(uint64_t host, co_await alloc_->AllocateBytes(packed.size()));
  if (Status ov = GuardCheck("compressed data write", host, packed.size(), kIgnoreNone);
      !ov.ok()) {
    co_return co_await RefuseWrite(std::move(ov));
  }
  KVBLK_CO_RETURN_IF_ERROR(co_await file_->Write(packed.data(), packed.size(), host));
  ++data_written_seq_;  // synced before an L2 table mapping it is written
  const int x = CompressedOffsetBits(cluster_bits_);
  uint64_t extra_sectors = ((host + packed.size() - 1) >> 9) - (host >> 9);
  uint64_t entry = host | (extra_sectors << x) | kOflagCompressed;
  uint64_t idx = gc & ((uint64_t{1} << l2_bits_) - 1);
  uint64_t prev = L2Entry(h, idx);
  uint64_t prev_bitmap = L2Bitmap(h, idx);
  SetL2Entry(h, idx, entry, 0);  // compressed clusters have no subclusters
  FreeOldEntry(prev, prev_bitmap, gc, 0);
  co_return Status::Ok();
}

}  // namespace kvblk::qcow2
