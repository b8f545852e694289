#include "disk/allocator.h"

#include <algorithm>

namespace kvblk::qcow2 {

Task<Result<bool>> Allocator::IsFree(uint64_t cluster) {
  // Past the end of the file too: a crash can leave a refcount for a cluster
  // whose append was lost (a leak), and it must not be counted twice.
  KVBLK_CO_ASSIGN_OR_RETURN(uint64_t rc, co_await rc_->Get(cluster));
  if (rc != 0) co_return false;
  std::atomic<uint32_t>& pin = pins_.count[cluster % kPinSlots];
  if (pin.load(std::memory_order_seq_cst) == 0) co_return true;
  std::lock_guard<std::mutex> l(pin_mu_);
  // Announce the passed-over cluster before looking again: an EndIo that
  // empties the counter after this look sees passed_any and releases it.
  pins_.passed_any.store(true, std::memory_order_seq_cst);
  if (pin.load(std::memory_order_seq_cst) == 0) co_return true;
  passed_over_.insert(cluster);  // EndIo brings the cursor back to it
  co_return false;
}

void Allocator::ReleasePassedOver(size_t slot) {
  std::lock_guard<std::mutex> l(pin_mu_);
  if (pins_.count[slot].load(std::memory_order_seq_cst) != 0) return;  // pinned again
  for (auto it = passed_over_.begin(); it != passed_over_.end();) {
    if (*it % kPinSlots != slot) {
      ++it;
      continue;
    }
    released_min_ = std::min(released_min_, *it);
    it = passed_over_.erase(it);
  }
  if (passed_over_.empty()) pins_.passed_any.store(false, std::memory_order_seq_cst);
}

void Allocator::EnablePool(uint64_t max_clusters) {
  pool_on_ = max_clusters > 0;
  pool_max_ = max_clusters;
  high_ = std::min<uint64_t>(pool_max_, 16);
}

Task<Result<Allocator::Run>> Allocator::Allocate(uint64_t n) {
  co_await mu_.Lock();
  ExclusiveGuard g(&mu_);
  {
    std::lock_guard<std::mutex> l(pin_mu_);
    cursor_ = std::min(cursor_, released_min_);
    released_min_ = std::numeric_limits<uint64_t>::max();
  }
  if (!pool_on_) co_return co_await AllocateLocked(n);
  if (!refill_status_.ok()) {
    Status st = refill_status_;
    refill_status_ = Status::Ok();
    co_return st;
  }
  if (pool_.empty()) {
    ran_dry_ = true;
    KVBLK_CO_RETURN_IF_ERROR(co_await RefillLocked(std::max(high_, n)));
  }
  Run& front = pool_.front();
  Run out{front.offset, std::min(n, front.count), front.fresh};
  front.offset += out.count << cluster_bits_;
  front.count -= out.count;
  if (front.count == 0) pool_.pop_front();
  pool_clusters_ -= out.count;
  if (pool_clusters_ < high_ / 4 && !refilling_) {
    refilling_ = true;
    Spawn(BackgroundRefill(), [] {});
  }
  co_return out;
}

Task<Status> Allocator::RefillLocked(uint64_t target) {
  // Adapt the marks to demand: grow when allocations had to wait, shrink
  // when the pool stayed half full through a whole refill period.
  if (ran_dry_) {
    high_ = std::min(pool_max_, high_ * 2);
  } else if (pool_clusters_ > high_ / 2) {
    high_ = std::max<uint64_t>(4, high_ / 2);
  }
  ran_dry_ = false;
  target = std::max(target, high_);
  while (pool_clusters_ < target) {
    KVBLK_CO_ASSIGN_OR_RETURN(Run r, co_await AllocateLocked(target - pool_clusters_));
    // Merge with the last run when contiguous (appends at the file end).
    if (!pool_.empty() && pool_.back().offset + (pool_.back().count << cluster_bits_) == r.offset &&
        pool_.back().fresh == r.fresh) {
      pool_.back().count += r.count;
    } else {
      pool_.push_back(r);
    }
    pool_clusters_ += r.count;
  }
  co_return Status::Ok();
}

Task<void> Allocator::BackgroundRefill() {
  AsyncEvent done;
  refill_done_ = &done;
  co_await mu_.Lock();
  ExclusiveGuard g(&mu_);
  if (pool_on_ && pool_clusters_ < high_) {
    Status st = co_await RefillLocked(high_);
    if (!st.ok()) refill_status_ = st;
  }
  refilling_ = false;
  refill_done_ = nullptr;
  g.Release();
  done.Set();
}

Task<Status> Allocator::ReleasePool() {
  if (refill_done_ != nullptr) co_await refill_done_->Wait();
  co_await mu_.Lock();
  ExclusiveGuard g(&mu_);
  pool_on_ = false;
  while (!pool_.empty()) {
    Run r = pool_.front();
    for (uint64_t i = 0; i < r.count; ++i) {
      KVBLK_CO_RETURN_IF_ERROR(co_await rc_->Add((r.offset >> cluster_bits_) + i, -1));
    }
    cursor_ = std::min(cursor_, r.offset >> cluster_bits_);
    pool_clusters_ -= r.count;
    pool_.pop_front();
  }
  co_await TrimExtension();
  co_return Status::Ok();
}

uint64_t Allocator::ExtendFrom() const {
  // Nothing at or past this was handed out (see the header).
  return std::max(extended_to_, rc_->file_clusters() << cluster_bits_);
}

uint64_t Allocator::ExtendStep(uint64_t from) const {
  const uint64_t cs = uint64_t{1} << cluster_bits_;
  // Grow by 1/8 of the file: few extensions (each one waits for the
  // file's in-flight direct I/O) while small images stay small; at most
  // 256 MiB, so a crash leaves little unused space behind.
  const uint64_t step = std::clamp(from / 8, kExtendMinBytes, kExtendMaxBytes);
  return std::max(cs, step & ~(cs - 1));
}

bool Allocator::ExtendDue(uint64_t end) const {
  if (!extend_on_) return false;
  const uint64_t from = ExtendFrom();
  return end + ExtendStep(from) / 2 > from;
}

Task<void> Allocator::ExtendAhead(uint64_t end) {
  if (!ExtendDue(end)) co_return;
  const uint64_t from = ExtendFrom();
  const uint64_t to = std::max(from, end) + ExtendStep(from);
  if (extended_to_ == 0) {
    // Already longer than its logical end before any extension of ours: a
    // block device (or a file someone preallocated); nothing to gain.
    Result<uint64_t> size = file_->Size();
    if (!size.ok() || *size > from) {
      extend_on_ = false;
      co_return;
    }
    extend_base_ = *size;
  }
  Status st = co_await file_->WriteZeroes(from, to - from, /*allocate=*/true);
  if (!st.ok()) {
    extend_on_ = false;  // advisory: appends just extend the file as they land
    co_return;
  }
  if (extended_to_ == 0) {
    // A host without zero range wrote the zeros: too costly to go on with.
    Result<File::Extent> ext = file_->DataExtent(from, to - from);
    if (!ext.ok() || ext->data) extend_on_ = false;
  }
  extended_to_ = to;
}

Task<void> Allocator::TrimExtension() {
  if (extended_to_ == 0) co_return;
  const uint64_t cs = uint64_t{1} << cluster_bits_;
  const uint64_t per_block = rc_->entries_per_block();
  const uint64_t floor = (extend_base_ + cs - 1) >> cluster_bits_;
  // The end of the last cluster in use: scan down from the logical end
  // (normally just past the released pool), a missing block at a time.
  uint64_t end = rc_->file_clusters();
  while (end > floor) {
    const uint64_t idx = (end - 1) / per_block;
    if (idx >= rc_->table().size() || rc_->table()[idx] == 0) {
      end = std::max(floor, idx * per_block);
      continue;
    }
    Result<uint64_t> rc = co_await rc_->Get(end - 1);
    if (!rc.ok() || *rc != 0) break;  // on error keep the cluster
    --end;
  }
  const uint64_t target = std::max(extend_base_, end << cluster_bits_);
  Result<uint64_t> size = file_->Size();
  if (size.ok() && *size > target) {
    Status st = file_->Truncate(target);
    (void)st.ok();  // advisory: a failure leaves unused zeros at the end
  }
  extended_to_ = 0;
}

Task<Result<Allocator::Run>> Allocator::AllocateLocked(uint64_t n) {
  const uint64_t start = cursor_;
  uint64_t c = cursor_;
  for (;;) {
    KVBLK_CO_ASSIGN_OR_RETURN(bool free, co_await IsFree(c));
    if (!free) {
      ++c;
      continue;
    }
    KVBLK_CO_ASSIGN_OR_RETURN(Refcounts::BlockState bs, co_await rc_->EnsureBlock(c));
    if (bs == Refcounts::BlockState::kTableGrew) {
      c = cursor_;
      continue;
    }
    if (bs == Refcounts::BlockState::kPlacedAt) {
      ++c;
      continue;
    }
    uint64_t len = 1;
    const uint64_t per_block = rc_->entries_per_block();
    while (len < n) {
      uint64_t next = c + len;
      // Stay within ranges that already have a block.
      if (next % per_block == 0) {
        uint64_t idx = next / per_block;
        if (idx >= rc_->table().size() || rc_->table()[idx] == 0) break;
      }
      KVBLK_CO_ASSIGN_OR_RETURN(bool f, co_await IsFree(next));
      if (!f) break;
      ++len;
    }
    const bool fresh = c >= rc_->file_clusters();
    if (ExtendDue((c + len) << cluster_bits_)) co_await ExtendAhead((c + len) << cluster_bits_);
    for (uint64_t i = 0; i < len; ++i) KVBLK_CO_RETURN_IF_ERROR(co_await rc_->Add(c + i, 1));
    // Advance the hint unless a free or EndIo moved it back meanwhile.
    if (cursor_ == start) cursor_ = c + len;
    rc_->NoteFileClusters(c + len);
    co_return Run{c << cluster_bits_, len, fresh};
  }
}

Task<Result<uint64_t>> Allocator::AllocateContiguous(uint64_t n) {
  co_await mu_.Lock();
  ExclusiveGuard g(&mu_);
  for (;;) {
    uint64_t start = rc_->file_clusters();
    bool restart = false;
    for (uint64_t i = 0; i < n && !restart; ++i) {
      KVBLK_CO_ASSIGN_OR_RETURN(Refcounts::BlockState bs, co_await rc_->EnsureBlock(start + i));
      if (bs != Refcounts::BlockState::kPresent) {
        restart = true;
        break;
      }
      // A leaked cluster past the end of the file: start after it.
      KVBLK_CO_ASSIGN_OR_RETURN(bool free, co_await IsFree(start + i));
      if (!free) {
        rc_->NoteFileClusters(start + i + 1);
        restart = true;
      }
    }
    if (restart) continue;
    if (ExtendDue((start + n) << cluster_bits_)) co_await ExtendAhead((start + n) << cluster_bits_);
    for (uint64_t i = 0; i < n; ++i) KVBLK_CO_RETURN_IF_ERROR(co_await rc_->Add(start + i, 1));
    rc_->NoteFileClusters(start + n);
    co_return start << cluster_bits_;
  }
}

Task<Result<uint64_t>> Allocator::AllocateBytes(uint64_t len) {
  const uint64_t cs = uint64_t{1} << cluster_bits_;
  if (compressed_next_ != 0) {
    uint64_t in = compressed_next_ & (cs - 1);
    if (in != 0 && in + len <= cs) {
      uint64_t off = compressed_next_;
      uint64_t cluster = off >> cluster_bits_;
      co_await mu_.Lock();
      ExclusiveGuard g(&mu_);
      KVBLK_CO_ASSIGN_OR_RETURN(uint64_t rc, co_await rc_->Get(cluster));
      // A cluster whose refcount is at the maximum the width allows (1 with
      // refcount_bits=1) cannot be shared further: start a new one.
      if (rc > 0 && rc < MaxRefcount(rc_->order()) && compressed_next_ == off) {
        KVBLK_CO_RETURN_IF_ERROR(co_await rc_->Add(cluster, 1));
        compressed_next_ = off + len;
        co_return off;
      }
    }
  }
  uint64_t n = (len + cs - 1) >> cluster_bits_;
  KVBLK_CO_ASSIGN_OR_RETURN(uint64_t off, co_await AllocateContiguous(n));
  compressed_next_ = off + len;
  co_return off;
}

void Allocator::DeferFree(uint64_t offset, uint64_t count) {
  deferred_.emplace_back(offset, count);
}

Task<Status> Allocator::ApplyFrees(FreeList todo) {
  co_await mu_.Lock();
  ExclusiveGuard g(&mu_);
  const uint64_t cs = uint64_t{1} << cluster_bits_;
  for (auto [off, count] : todo) {
    for (uint64_t i = 0; i < count; ++i) {
      uint64_t cluster = (off >> cluster_bits_) + i;
      KVBLK_CO_RETURN_IF_ERROR(co_await rc_->Add(cluster, -1));
      KVBLK_CO_ASSIGN_OR_RETURN(uint64_t rc, co_await rc_->Get(cluster));
      if (rc != 0) continue;
      if (cluster < cursor_) cursor_ = cluster;
      if ((compressed_next_ >> cluster_bits_) == cluster) compressed_next_ = 0;
      // Advisory: return the space to the host.
      Status st = co_await file_->Discard(cluster << cluster_bits_, cs);
      (void)st.ok();  // a failed punch only costs space, never correctness
    }
  }
  co_return Status::Ok();
}

}  // namespace kvblk::qcow2
