#include "disk/async_lock.h"
#include "disk/hot.h"

namespace kvblk {

void ResumeWaiter(const LockWaiter& w) {
  if (w.loop == &EventLoop::Current()) {
    w.loop->Schedule(w.handle);
  } else {
    w.loop->Post(w.handle);
  }
}

KVBLK_HOT bool AsyncSharedMutex::TryLockShared() {
  uint32_t s = state_.load(std::memory_order_relaxed);
  do {
    if (s & (kWriter | kWaiters)) return false;
  } while (!state_.compare_exchange_weak(s, s + 1, std::memory_order_acquire,
                                         std::memory_order_relaxed));
  return true;
}

bool AsyncSharedMutex::TryLockExclusive() {
  uint32_t expected = 0;  // no readers, no writer, nobody queued
  return state_.compare_exchange_strong(expected, kWriter, std::memory_order_acquire,
                                        std::memory_order_relaxed);
}

bool AsyncSharedMutex::Enqueue(std::coroutine_handle<> h, bool exclusive) {
  std::lock_guard<std::mutex> l(mu_);
  // Queued first, so that a failed allocation leaves the state untouched
  // (a waiters bit with nobody queued would stop every reader).
  waiters_.push_back(LockWaiter{h, &EventLoop::Current(), exclusive});
  uint32_t s = state_.load(std::memory_order_relaxed);
  while (!(s & kWaiters)) {
    // Nobody queued: take the lock if the state allows, else raise the
    // waiters bit. The compare-and-swap fails if a reader came or went.
    const bool grant = exclusive ? s == 0 : !(s & kWriter);
    const uint32_t next = grant ? (exclusive ? kWriter : s + 1) : (s | kWaiters);
    if (state_.compare_exchange_weak(s, next, std::memory_order_acq_rel,
                                     std::memory_order_relaxed)) {
      if (!grant) break;
      waiters_.pop_back();
      return false;
    }
  }
  return true;
}

void AsyncSharedMutex::GrantLocked(std::vector<LockWaiter>* to_resume) {
  // While the waiters bit is set, the word changes only under mu_.
  uint32_t s = state_.load(std::memory_order_acquire);
  while (!waiters_.empty()) {
    const LockWaiter w = waiters_.front();
    if (w.exclusive) {
      if (s & (kWriter | kReaderMask)) break;
      s = state_.fetch_or(kWriter, std::memory_order_acq_rel) | kWriter;
    } else {
      if (s & kWriter) break;
      s = state_.fetch_add(1, std::memory_order_acq_rel) + 1;
    }
    to_resume->push_back(w);
    waiters_.pop_front();
    if (w.exclusive) break;
  }
  if (waiters_.empty()) state_.fetch_and(~kWaiters, std::memory_order_acq_rel);
}

KVBLK_HOT void AsyncSharedMutex::UnlockShared() {
  uint32_t s = state_.load(std::memory_order_relaxed);
  while (!(s & kWaiters)) {
    if (state_.compare_exchange_weak(s, s - 1, std::memory_order_release,
                                     std::memory_order_relaxed)) {
      return;
    }
  }
  UnlockSlow(1);
}

void AsyncSharedMutex::UnlockExclusive() {
  uint32_t expected = kWriter;  // nobody queued
  if (state_.compare_exchange_strong(expected, 0, std::memory_order_release,
                                     std::memory_order_relaxed)) {
    return;
  }
  UnlockSlow(kWriter);
}

void AsyncSharedMutex::UnlockSlow(uint32_t release) {
  std::vector<LockWaiter> wake;  // empty: no allocation (a deque would allocate)
  {
    std::lock_guard<std::mutex> l(mu_);
    state_.fetch_sub(release, std::memory_order_acq_rel);
    GrantLocked(&wake);
  }
  for (auto& w : wake) ResumeWaiter(w);
}

int AsyncSharedMutex::readers() const {
  return static_cast<int>(state_.load(std::memory_order_acquire) & kReaderMask);
}

bool AsyncSharedMutex::held_exclusive() const {
  return (state_.load(std::memory_order_acquire) & kWriter) != 0;
}

void AsyncEvent::Set() {
  std::vector<LockWaiter> wake;
  {
    std::lock_guard<std::mutex> l(mu_);
    set_ = true;
    wake.swap(waiters_);
  }
  for (auto& w : wake) ResumeWaiter(w);
}

bool AsyncEvent::is_set() const {
  std::lock_guard<std::mutex> l(mu_);
  return set_;
}

bool AsyncEvent::Awaiter::await_suspend(std::coroutine_handle<> h) {
  std::lock_guard<std::mutex> l(e->mu_);
  if (e->set_) return false;
  e->waiters_.push_back(LockWaiter{h, &EventLoop::Current(), false});
  return true;
}

}  // namespace kvblk
