#include "disk/async_lock.h"

namespace kvblk {

void ResumeWaiter(const LockWaiter& w) {
  if (w.loop == &EventLoop::Current()) {
    w.loop->Schedule(w.handle);
  } else {
    w.loop->Post(w.handle);
  }
}

bool AsyncSharedMutex::TryLockShared() {
  std::lock_guard<std::mutex> l(mu_);
  if (writer_ || !waiters_.empty()) return false;
  ++readers_;
  return true;
}

bool AsyncSharedMutex::TryLockExclusive() {
  std::lock_guard<std::mutex> l(mu_);
  if (writer_ || readers_ > 0 || !waiters_.empty()) return false;
  writer_ = true;
  return true;
}

bool AsyncSharedMutex::Enqueue(std::coroutine_handle<> h, bool exclusive) {
  std::lock_guard<std::mutex> l(mu_);
  if (waiters_.empty()) {
    if (exclusive && !writer_ && readers_ == 0) {
      writer_ = true;
      return false;
    }
    if (!exclusive && !writer_) {
      ++readers_;
      return false;
    }
  }
  waiters_.push_back(LockWaiter{h, &EventLoop::Current(), exclusive});
  return true;
}

void AsyncSharedMutex::GrantLocked(std::vector<LockWaiter>* to_resume) {
  while (!waiters_.empty()) {
    LockWaiter& w = waiters_.front();
    if (w.exclusive) {
      if (writer_ || readers_ > 0) return;
      writer_ = true;
      to_resume->push_back(w);
      waiters_.pop_front();
      return;
    }
    if (writer_) return;
    ++readers_;
    to_resume->push_back(w);
    waiters_.pop_front();
  }
}

void AsyncSharedMutex::UnlockShared() {
  std::vector<LockWaiter> wake;  // empty: no allocation (a deque would allocate)
  {
    std::lock_guard<std::mutex> l(mu_);
    --readers_;
    GrantLocked(&wake);
  }
  for (auto& w : wake) ResumeWaiter(w);
}

void AsyncSharedMutex::UnlockExclusive() {
  std::vector<LockWaiter> wake;
  {
    std::lock_guard<std::mutex> l(mu_);
    writer_ = false;
    GrantLocked(&wake);
  }
  for (auto& w : wake) ResumeWaiter(w);
}

int AsyncSharedMutex::readers() const {
  std::lock_guard<std::mutex> l(mu_);
  return readers_;
}

bool AsyncSharedMutex::held_exclusive() const {
  std::lock_guard<std::mutex> l(mu_);
  return writer_;
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
