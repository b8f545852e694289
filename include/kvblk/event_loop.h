// EventLoop: one per I/O thread. It owns the thread's IoEngine, runs
// coroutines that are ready, and reaps I/O completions.
//
// EventLoop::Current() is the calling thread's loop, created on first use.
// Coroutines resumed by another thread (a lock handed over, a request
// posted by a virtqueue) arrive through Post(), which is thread-safe.
#ifndef KVBLK_EVENT_LOOP_H_
#define KVBLK_EVENT_LOOP_H_

#include <atomic>
#include <coroutine>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "kvblk/task.h"

namespace kvblk {

class IoEngine;

class alignas(64) EventLoop {
 public:
  explicit EventLoop(std::unique_ptr<IoEngine> engine);
  ~EventLoop();
  EventLoop(const EventLoop&) = delete;
  EventLoop& operator=(const EventLoop&) = delete;

  // The calling thread's loop: the one installed with SetCurrent(), else a
  // loop with the default engine created on first use.
  static EventLoop& Current();
  // Installs `loop` (not owned; nullptr to uninstall) as the calling
  // thread's loop. I/O started on this thread then goes to its engine.
  static void SetCurrent(EventLoop* loop);

  IoEngine& engine() { return *engine_; }

  // Queues `h` to be resumed by this loop. Must be called on the loop's
  // thread.
  void Schedule(std::coroutine_handle<> h) { ready_.push_back(h); }
  // Thread-safe Schedule().
  void Post(std::coroutine_handle<> h);
  // Thread-safe: runs `fn` on the loop's thread.
  void PostFunction(std::function<void()> fn);

  // Runs ready coroutines and completions until `done()` is true; blocks in
  // the engine when there is nothing else to do.
  void RunUntil(const std::function<bool()>& done);
  // One pass: resumes what is ready and reaps completions without blocking.
  // Returns true if any work was done.
  bool RunOnce();
  // Wakes a thread blocked in RunUntil (thread-safe).
  void Wake();

  // Runs `fn` when the loop's current pass ends: after the coroutines and
  // I/O completions the pass resumes, before the loop looks for more work
  // or blocks. Called outside a pass (code driving a device directly), it
  // runs `fn` at once. Loop thread only. A device uses it to send one
  // notification for a whole batch of completions.
  void AtPassEnd(std::function<void()> fn);
  // Whether the loop is inside a pass (RunOnce, or RunUntil's wait).
  bool in_pass() const { return pass_depth_ > 0; }

  // co_await loop.Enter(): the coroutine continues on this loop's thread
  // (at once when that is the calling thread's loop, else posted to it).
  auto Enter() {
    struct A {
      EventLoop* loop;
      bool await_ready() const noexcept { return &Current() == loop; }
      void await_suspend(std::coroutine_handle<> h) { loop->Post(h); }
      void await_resume() const noexcept {}
    };
    return A{this};
  }

  // co_await loop.Yield(): lets other ready coroutines run first.
  auto Yield() {
    struct A {
      EventLoop* loop;
      bool await_ready() const noexcept { return false; }
      void await_suspend(std::coroutine_handle<> h) { loop->Schedule(h); }
      void await_resume() const noexcept {}
    };
    return A{this};
  }

 private:
  bool DrainPosted();
  // Runs what AtPassEnd() queued; returns whether there was any.
  bool RunPassEnd();

  // What every pass reads comes first: with the class aligned, these share
  // two cache lines (a pass that only reaps I/O touches nothing else here).
  std::unique_ptr<IoEngine> engine_;
  int pass_depth_ = 0;  // passes running (nested when a pass runs the loop)
  // Whether posted_ or posted_fns_ may be non-empty: set under posted_mu_,
  // read without it so that a pass with nothing posted takes no lock.
  std::atomic<bool> posted_any_{false};
  std::vector<std::function<void()>> pass_end_;
  std::deque<std::coroutine_handle<>> ready_;

  std::mutex posted_mu_;
  std::vector<std::coroutine_handle<>> posted_;  // guarded by posted_mu_
  std::vector<std::function<void()>> posted_fns_;  // guarded by posted_mu_
  // Emptied lists kept for their capacity (the loop thread's).
  std::vector<std::coroutine_handle<>> spare_posted_;
  std::vector<std::function<void()>> spare_fns_;
};

// Runs `task` on the calling thread's loop until it finishes and returns its
// result. For tools, tests and setup code; never call it from a coroutine.
template <typename T>
T RunSync(Task<T> task) {
  EventLoop& loop = EventLoop::Current();
  bool done = false;
  if constexpr (std::is_void_v<T>) {
    Spawn(std::move(task), [&] { done = true; });
    loop.RunUntil([&] { return done; });
  } else {
    std::optional<T> out;
    Spawn(std::move(task), [&](T v) {
      out.emplace(std::move(v));
      done = true;
    });
    loop.RunUntil([&] { return done; });
    return std::move(*out);
  }
}

}  // namespace kvblk

#endif  // KVBLK_EVENT_LOOP_H_
