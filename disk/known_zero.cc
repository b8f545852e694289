// KnownZeroSubclusters: a bounded LRU map from host cluster to the
// subclusters known to read as zeros.
#include "disk/known_zero.h"

namespace kvblk::qcow2 {

void KnownZeroSubclusters::Set(uint64_t host, uint64_t gc, uint32_t mask) {
  Forget(host);
  if (mask == 0 || capacity_ == 0) return;
  if (map_.size() >= capacity_) {
    map_.erase(lru_.back().host);
    lru_.pop_back();
  }
  lru_.push_front(Entry{host, gc, mask});
  map_.emplace(host, lru_.begin());
}

uint32_t KnownZeroSubclusters::Get(uint64_t host, uint64_t gc) {
  auto it = map_.find(host);
  if (it == map_.end() || it->second->gc != gc) return 0;
  lru_.splice(lru_.begin(), lru_, it->second);
  return it->second->mask;
}

void KnownZeroSubclusters::Clear(uint64_t host, uint32_t mask) {
  auto it = map_.find(host);
  if (it == map_.end()) return;
  it->second->mask &= ~mask;
  if (it->second->mask == 0) {
    lru_.erase(it->second);
    map_.erase(it);
  }
}

void KnownZeroSubclusters::Forget(uint64_t host) {
  auto it = map_.find(host);
  if (it == map_.end()) return;
  lru_.erase(it->second);
  map_.erase(it);
}

void KnownZeroSubclusters::ForgetAll() {
  lru_.clear();
  map_.clear();
}

void KnownZeroSubclusters::SyncTree(uint64_t l1_offset, uint64_t size) {
  if (l1_offset == l1_offset_ && size == size_) return;
  ForgetAll();
  l1_offset_ = l1_offset;
  size_ = size;
}

}  // namespace kvblk::qcow2
