// Coroutine frame pool: see AllocFrame() in kvblk/task.h.
//
// Each thread keeps a free list per size class (64-byte steps up to
// kMaxPooled). A frame goes back to the list of the thread that frees it,
// which need not be the thread that allocated it (a request may finish on
// another event loop); the lists are thread-local, so nothing is shared and
// no lock is taken. A list holds at most kMaxPerClass frames; beyond that,
// and for frames larger than kMaxPooled, the global allocator is used. The
// lists are released when their thread exits; frames freed after that (by
// other thread-local destructors) go to the global allocator.
#include <cstddef>
#include <cstdint>
#include <new>

#include "kvblk/task.h"

namespace kvblk::internal {
namespace {

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
// Sanitizers see use-after-free and races through malloc/free: keep them.
constexpr bool kPoolFrames = false;
#else
constexpr bool kPoolFrames = true;
#endif

constexpr size_t kStep = 64;
constexpr size_t kMaxPooled = 1024;
constexpr size_t kClasses = kMaxPooled / kStep;
constexpr int kMaxPerClass = 256;

struct FreeFrame {
  FreeFrame* next;
};

struct Pool {
  FreeFrame* head[kClasses] = {};
  int count[kClasses] = {};
  ~Pool();
};

thread_local Pool tl_pool;
// &tl_pool once this thread has used it, kDestroyed after its destructor;
// initial-exec TLS, as for EventLoop::Current(): a plain load per call.
Pool* const kDestroyed = reinterpret_cast<Pool*>(uintptr_t{1});
thread_local Pool* tl_pool_ptr __attribute__((tls_model("initial-exec"))) = nullptr;

Pool::~Pool() {
  tl_pool_ptr = kDestroyed;
  for (size_t c = 0; c < kClasses; ++c) {
    while (head[c] != nullptr) {
      FreeFrame* f = head[c];
      head[c] = f->next;
      ::operator delete(f);
    }
  }
}

// This thread's pool, or null once it has been destroyed.
Pool* ThisThreadsPool() {
  Pool* p = tl_pool_ptr;
  if (p == nullptr) p = tl_pool_ptr = &tl_pool;
  return p == kDestroyed ? nullptr : p;
}

// Size class of an n-byte frame: 0 for 1..64 bytes, 1 for 65..128, ...
size_t ClassOf(size_t n) { return (n - 1) / kStep; }

}  // namespace

void* AllocFrame(size_t n) {
  if (!kPoolFrames || n == 0 || n > kMaxPooled) return ::operator new(n);
  const size_t c = ClassOf(n);
  Pool* p = ThisThreadsPool();
  if (p != nullptr && p->head[c] != nullptr) {
    FreeFrame* f = p->head[c];
    p->head[c] = f->next;
    --p->count[c];
    return f;
  }
  return ::operator new((c + 1) * kStep);
}

void FreeFrameMemory(void* frame, size_t n) noexcept {
  if (!kPoolFrames || n == 0 || n > kMaxPooled) {
    ::operator delete(frame);
    return;
  }
  const size_t c = ClassOf(n);
  Pool* p = ThisThreadsPool();
  if (p == nullptr || p->count[c] >= kMaxPerClass) {
    ::operator delete(frame);
    return;
  }
  auto* f = static_cast<FreeFrame*>(frame);
  f->next = p->head[c];
  p->head[c] = f;
  ++p->count[c];
}

}  // namespace kvblk::internal
