// FutexMutex's slow paths: sleeping on and waking the state word.
#include "disk/futex_mutex.h"

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace kvblk {
namespace {

// The kernel compares the word with `expected` and sleeps only if they are
// equal, so a wake between our read and the sleep is never lost. It may
// also return early (a signal, a spurious wake): callers re-check.
void FutexWait(std::atomic<uint32_t>* word, uint32_t expected) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT_PRIVATE, expected, nullptr,
          nullptr, 0);
}

}  // namespace

void FutexMutex::LockContended(uint32_t seen) {
  // Announce a waiter (2) before sleeping; whoever held it will wake us.
  // Taking the lock by exchanging in 2 (not 1) is conservative: if other
  // sleepers remain, our unlock must wake one of them.
  if (seen != 2) seen = state_.exchange(2, std::memory_order_acquire);
  while (seen != 0) {
    FutexWait(&state_, 2);
    seen = state_.exchange(2, std::memory_order_acquire);
  }
}

// Its result needs no check: FUTEX_WAKE on our own word cannot fail, and
// waking nobody (the sleeper already left) is fine.
void FutexMutex::WakeOne() {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&state_), FUTEX_WAKE_PRIVATE, 1, nullptr, nullptr,
          0);
}

}  // namespace kvblk
