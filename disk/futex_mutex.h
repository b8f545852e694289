// FutexMutex: a mutex for short critical sections on hot paths.
//
// Same contract as std::mutex (lock, try_lock, unlock; use it with
// std::lock_guard), but an uncontended lock or unlock is one inline atomic
// instruction, where std::mutex calls into glibc each way (about 25
// instructions). A thread that finds it held sleeps on a futex; nothing
// spins. The state word follows the classic three-state futex mutex:
// 0 free, 1 held, 2 held and maybe waited on (an unlock that sees 2 wakes
// one sleeper, which takes the lock as 2 so that the waiters left behind
// are woken in turn).
#ifndef KVBLK_DISK_FUTEX_MUTEX_H_
#define KVBLK_DISK_FUTEX_MUTEX_H_

#include <atomic>
#include <cstdint>

namespace kvblk {

class FutexMutex {
 public:
  FutexMutex() = default;
  FutexMutex(const FutexMutex&) = delete;
  FutexMutex& operator=(const FutexMutex&) = delete;

  void lock() {
    uint32_t c = 0;
    if (!state_.compare_exchange_strong(c, 1, std::memory_order_acquire,
                                        std::memory_order_relaxed)) {
      LockContended(c);
    }
  }
  bool try_lock() {
    uint32_t c = 0;
    return state_.compare_exchange_strong(c, 1, std::memory_order_acquire,
                                          std::memory_order_relaxed);
  }
  void unlock() {
    if (state_.exchange(0, std::memory_order_release) == 2) WakeOne();
  }

 private:
  // `seen` is the state lock() found (1 or 2).
  void LockContended(uint32_t seen);
  void WakeOne();

  std::atomic<uint32_t> state_{0};
  // The futex calls pass the word's address as a plain 32-bit integer.
  static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t) &&
                std::atomic<uint32_t>::is_always_lock_free);
};

}  // namespace kvblk

#endif  // KVBLK_DISK_FUTEX_MUTEX_H_
