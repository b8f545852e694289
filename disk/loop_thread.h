// LoopThread: an I/O thread that runs its own EventLoop (default I/O engine,
// created on that thread) until stopped. Used for extra I/O threads
// (kvblk serve --iothreads) and by tests.
//
// The loop outlives the thread: Stop() wakes it and joins, and only the
// destructor frees it, so a Wake() or Post() racing with the stop never
// meets a destroyed loop.
#ifndef KVBLK_DISK_LOOP_THREAD_H_
#define KVBLK_DISK_LOOP_THREAD_H_

#include <atomic>
#include <memory>
#include <thread>

#include "kvblk/event_loop.h"
#include "kvblk/status.h"

namespace kvblk {

class LoopThread {
 public:
  // Starts the thread and waits until its loop runs. IoError if the thread
  // or the loop's engine cannot be created.
  static Result<std::unique_ptr<LoopThread>> Start();
  ~LoopThread();
  LoopThread(const LoopThread&) = delete;
  LoopThread& operator=(const LoopThread&) = delete;

  // Ends the loop (work still queued on it is not run) and joins the
  // thread. Idempotent; not from the thread itself.
  void Stop();

  EventLoop& loop() const { return *loop_; }
  std::thread::id id() const { return id_; }

 private:
  LoopThread() = default;

  std::atomic<bool> stop_ = false;
  std::unique_ptr<EventLoop> loop_;
  std::thread thread_;
  std::thread::id id_;
};

}  // namespace kvblk

#endif  // KVBLK_DISK_LOOP_THREAD_H_
