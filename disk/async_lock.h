// Coroutine-aware locks: a waiter suspends and is resumed on its own event
// loop when the lock is granted. No thread ever blocks on them, and the
// short std::mutex inside is never held across a suspension point.
//
// Grants are FIFO. AsyncSharedMutex queues new readers behind a waiting
// writer so that exclusive users (L1 growth, snapshot copy) cannot starve.
//
// AsyncSharedMutex keeps its state in one atomic word: the reader count,
// a writer bit and a waiters bit (set exactly while the queue is
// non-empty). Every request takes it shared, so a shared lock and unlock
// with nobody waiting are one compare-and-swap each; everything else goes
// through mu_, and changes the word with compare-and-swap too, so that a
// decision made under mu_ holds against readers coming and going.
#ifndef KVBLK_DISK_ASYNC_LOCK_H_
#define KVBLK_DISK_ASYNC_LOCK_H_

#include <atomic>
#include <coroutine>
#include <cstdint>
#include <deque>
#include <mutex>
#include <vector>

#include "kvblk/event_loop.h"

namespace kvblk {

struct LockWaiter {
  std::coroutine_handle<> handle;
  EventLoop* loop;
  bool exclusive;
};

// Resumes `w` on its loop: directly queued when that is the calling
// thread's loop, posted otherwise.
void ResumeWaiter(const LockWaiter& w);

class AsyncSharedMutex {
 public:
  AsyncSharedMutex() = default;
  AsyncSharedMutex(const AsyncSharedMutex&) = delete;
  AsyncSharedMutex& operator=(const AsyncSharedMutex&) = delete;

  // co_await LockShared() / LockExclusive(): resumes holding the lock.
  auto LockShared() { return Awaiter{this, false}; }
  auto LockExclusive() { return Awaiter{this, true}; }
  bool TryLockShared();
  bool TryLockExclusive();
  void UnlockShared();
  void UnlockExclusive();

  // For tests and assertions.
  int readers() const;
  bool held_exclusive() const;

 private:
  struct Awaiter {
    AsyncSharedMutex* m;
    bool exclusive;
    bool await_ready() { return exclusive ? m->TryLockExclusive() : m->TryLockShared(); }
    bool await_suspend(std::coroutine_handle<> h) { return m->Enqueue(h, exclusive); }
    void await_resume() const noexcept {}
  };
  // Returns false (do not suspend) if the lock was granted meanwhile.
  bool Enqueue(std::coroutine_handle<> h, bool exclusive);
  // Grants the queue's head (and the readers right behind it) what the
  // state allows. Requires mu_.
  void GrantLocked(std::vector<LockWaiter>* to_resume);
  // UnlockShared/UnlockExclusive when someone waits: `release` is what the
  // caller gives back (one reader or the writer bit).
  void UnlockSlow(uint32_t release);

  static constexpr uint32_t kWriter = 1u << 31;
  static constexpr uint32_t kWaiters = 1u << 30;
  static constexpr uint32_t kReaderMask = kWaiters - 1;

  std::atomic<uint32_t> state_{0};
  std::mutex mu_;                   // guards waiters_; see the file comment
  std::deque<LockWaiter> waiters_;  // empty exactly when kWaiters is clear
};

// An exclusive-only coroutine mutex.
class AsyncMutex {
 public:
  auto Lock() { return m_.LockExclusive(); }
  bool TryLock() { return m_.TryLockExclusive(); }
  void Unlock() { m_.UnlockExclusive(); }
  bool locked() const { return m_.held_exclusive(); }

 private:
  AsyncSharedMutex m_;
};

// RAII holders for use inside coroutines, after the co_await.
class SharedGuard {
 public:
  SharedGuard() = default;
  explicit SharedGuard(AsyncSharedMutex* m) : m_(m) {}
  SharedGuard(SharedGuard&& o) noexcept : m_(o.m_) { o.m_ = nullptr; }
  SharedGuard& operator=(SharedGuard&& o) noexcept {
    Release();
    m_ = o.m_;
    o.m_ = nullptr;
    return *this;
  }
  ~SharedGuard() { Release(); }
  void Release() {
    if (m_) m_->UnlockShared();
    m_ = nullptr;
  }

 private:
  AsyncSharedMutex* m_ = nullptr;
};

class ExclusiveGuard {
 public:
  ExclusiveGuard() = default;
  explicit ExclusiveGuard(AsyncSharedMutex* m) : m_(m) {}
  explicit ExclusiveGuard(AsyncMutex* m) : am_(m) {}
  ExclusiveGuard(ExclusiveGuard&& o) noexcept : m_(o.m_), am_(o.am_) {
    o.m_ = nullptr;
    o.am_ = nullptr;
  }
  ExclusiveGuard& operator=(ExclusiveGuard&&) = delete;
  ~ExclusiveGuard() { Release(); }
  void Release() {
    if (m_) m_->UnlockExclusive();
    if (am_) am_->Unlock();
    m_ = nullptr;
    am_ = nullptr;
  }

 private:
  AsyncSharedMutex* m_ = nullptr;
  AsyncMutex* am_ = nullptr;
};

// A one-shot event: waiters suspend until Set(); after Set() co_await Wait()
// does not suspend.
class AsyncEvent {
 public:
  auto Wait() { return Awaiter{this}; }
  void Set();
  bool is_set() const;

 private:
  struct Awaiter {
    AsyncEvent* e;
    bool await_ready() const { return e->is_set(); }
    bool await_suspend(std::coroutine_handle<> h);
    void await_resume() const noexcept {}
  };
  mutable std::mutex mu_;
  bool set_ = false;
  std::vector<LockWaiter> waiters_;
};

}  // namespace kvblk

#endif  // KVBLK_DISK_ASYNC_LOCK_H_
