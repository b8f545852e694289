#include "disk/cluster_lock.h"

namespace kvblk::qcow2 {

ClusterLocks::Guard& ClusterLocks::Guard::operator=(Guard&& o) noexcept {
  if (this != &o) {
    Release();
    locks_ = o.locks_;
    first_ = o.first_;
    count_ = o.count_;
    o.locks_ = nullptr;
  }
  return *this;
}

void ClusterLocks::Guard::Release() {
  if (locks_ == nullptr) return;
  for (uint64_t i = 0; i < count_; ++i) locks_->Unlock(first_ + i);
  locks_ = nullptr;
}

Task<ClusterLocks::Guard> ClusterLocks::Lock(uint64_t first, uint64_t count) {
  for (uint64_t i = 0; i < count; ++i) {
    auto& slot = locks_[first + i];
    if (!slot) slot = std::make_unique<Slot>();
    Slot* s = slot.get();
    ++s->refs;
    co_await s->mu.Lock();
  }
  co_return Guard(this, first, count);
}

void ClusterLocks::Unlock(uint64_t cluster) {
  auto it = locks_.find(cluster);
  Slot* s = it->second.get();
  s->mu.Unlock();
  if (--s->refs == 0) locks_.erase(it);
}

}  // namespace kvblk::qcow2
