#include "disk/allocator.h"

namespace kvblk::qcow2 {

Task<Result<bool>> Allocator::IsFree(uint64_t cluster) {
  // Past the end of the file too: a crash can leave a refcount for a cluster
  // whose append was lost (a leak), and it must not be counted twice.
  KVBLK_CO_ASSIGN_OR_RETURN(uint64_t rc, co_await rc_->Get(cluster));
  if (rc != 0) co_return false;
  if (inflight_.count(cluster)) {
    passed_over_.insert(cluster);  // EndIo brings the cursor back to it
    co_return false;
  }
  co_return true;
}

Task<Result<Allocator::Run>> Allocator::Allocate(uint64_t n) {
  co_await mu_.Lock();
  ExclusiveGuard g(&mu_);
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
