// Task<T>: the coroutine type of every asynchronous kvblk operation.
//
// A Task is lazy: it starts when awaited. The awaiter runs it inline; if it
// finishes before suspending, the awaiter simply continues (no nesting, so a
// loop over tasks that complete at once does not grow the stack even where
// the compiler does not turn symmetric transfer into a tail call, e.g. at
// -O1 with sanitizers). If it suspends, whoever finishes it resumes the
// awaiter by symmetric transfer. An atomic flag decides which of the two
// happened, as the task may finish on another thread (a hop to another
// event loop) while the awaiter is still returning from await_suspend.
// A Task must be awaited (or handed to Spawn / RunSync) exactly once.
// An exception escaping a coroutine body is stored in the promise and
// rethrown by the awaiter; kvblk code reports errors as Status values and
// does not use exceptions for control flow.
#ifndef KVBLK_TASK_H_
#define KVBLK_TASK_H_

#include <atomic>
#include <coroutine>
#include <cstddef>
#include <cstdlib>
#include <exception>
#include <optional>
#include <utility>

namespace kvblk {

template <typename T = void>
class Task;

namespace internal {

struct FinalAwaiter {
  bool await_ready() const noexcept { return false; }
  template <typename P>
  std::coroutine_handle<> await_suspend(std::coroutine_handle<P> h) noexcept {
    auto& p = h.promise();
    // First to arrive: the awaiter is still in await_suspend and will carry
    // on by itself. Second: the awaiter has suspended; resume it.
    if (!p.handoff.exchange(true, std::memory_order_acq_rel)) return std::noop_coroutine();
    return p.continuation ? p.continuation : std::noop_coroutine();
  }
  void await_resume() const noexcept {}
};

// Coroutine frames come from a per-thread pool of recently freed frames
// (disk/frame_pool.cc): a request allocates and frees several frames, and
// the pool makes each a few loads and stores instead of a malloc and a
// free. `n` must be the size passed to AllocFrame.
void* AllocFrame(size_t n);
void FreeFrameMemory(void* frame, size_t n) noexcept;

struct PromiseBase {
  static void* operator new(size_t n) { return AllocFrame(n); }
  static void operator delete(void* frame, size_t n) noexcept { FreeFrameMemory(frame, n); }

  std::coroutine_handle<> continuation;
  std::atomic<bool> handoff = false;  // see FinalAwaiter and Task's Awaiter
  std::exception_ptr exception;
  std::suspend_always initial_suspend() const noexcept { return {}; }
  FinalAwaiter final_suspend() const noexcept { return {}; }
  void unhandled_exception() noexcept { exception = std::current_exception(); }
};

template <typename T>
struct Promise : PromiseBase {
  std::optional<T> value;
  Task<T> get_return_object() noexcept;
  template <typename U>
  void return_value(U&& v) {
    value.emplace(std::forward<U>(v));
  }
  T Take() {
    if (exception) std::rethrow_exception(exception);
    return std::move(*value);
  }
};

template <>
struct Promise<void> : PromiseBase {
  Task<void> get_return_object() noexcept;
  void return_void() noexcept {}
  void Take() {
    if (exception) std::rethrow_exception(exception);
  }
};

}  // namespace internal

template <typename T>
class [[nodiscard]] Task {
 public:
  using promise_type = internal::Promise<T>;
  using Handle = std::coroutine_handle<promise_type>;

  Task() = default;
  explicit Task(Handle h) : h_(h) {}
  Task(Task&& o) noexcept : h_(std::exchange(o.h_, {})) {}
  Task& operator=(Task&& o) noexcept {
    if (this != &o) {
      if (h_) h_.destroy();
      h_ = std::exchange(o.h_, {});
    }
    return *this;
  }
  Task(const Task&) = delete;
  Task& operator=(const Task&) = delete;
  ~Task() {
    if (h_) h_.destroy();
  }

  bool valid() const { return static_cast<bool>(h_); }

  auto operator co_await() && noexcept {
    struct Awaiter {
      Handle h;
      bool await_ready() const noexcept { return false; }
      bool await_suspend(std::coroutine_handle<> awaiting) noexcept {
        h.promise().continuation = awaiting;
        h.resume();
        // True: the task is still running and will resume us when done.
        return !h.promise().handoff.exchange(true, std::memory_order_acq_rel);
      }
      T await_resume() { return h.promise().Take(); }
    };
    return Awaiter{h_};
  }

  // For Spawn/RunSync: releases the frame to a driver that destroys it.
  Handle Release() { return std::exchange(h_, {}); }

 private:
  Handle h_;
};

namespace internal {
template <typename T>
Task<T> Promise<T>::get_return_object() noexcept {
  return Task<T>(std::coroutine_handle<Promise<T>>::from_promise(*this));
}
inline Task<void> Promise<void>::get_return_object() noexcept {
  return Task<void>(std::coroutine_handle<Promise<void>>::from_promise(*this));
}

// A self-destroying coroutine used to run a Task without an awaiter.
struct Detached {
  struct promise_type {
    static void* operator new(size_t n) { return AllocFrame(n); }
    static void operator delete(void* frame, size_t n) noexcept { FreeFrameMemory(frame, n); }
    Detached get_return_object() noexcept { return {}; }
    std::suspend_never initial_suspend() const noexcept { return {}; }
    std::suspend_never final_suspend() const noexcept { return {}; }
    void return_void() noexcept {}
    // A detached task has no one to report to: an escaped exception is a bug.
    void unhandled_exception() noexcept { std::abort(); }
  };
};
}  // namespace internal

// Starts `task` now and lets it run to completion on its own; `on_done`
// (if any) is invoked with the task's result on the thread that finishes it.
template <typename T, typename F>
void Spawn(Task<T> task, F on_done) {
  [](Task<T> t, F done) -> internal::Detached {
    if constexpr (std::is_void_v<T>) {
      co_await std::move(t);
      done();
    } else {
      done(co_await std::move(t));
    }
  }(std::move(task), std::move(on_done));
}

inline void Spawn(Task<void> task) {
  Spawn(std::move(task), [] {});
}

}  // namespace kvblk

#endif  // KVBLK_TASK_H_
