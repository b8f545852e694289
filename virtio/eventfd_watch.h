// EventfdWatch: runs a callback on an event loop each time an eventfd is
// signalled, by keeping a read of the eventfd submitted in that loop's
// io_uring.
//
// This is how a queue's loop hears the driver's kicks. The read completes in
// the same ring as the queue's disk I/O, so a kick wakes the queue's thread
// directly. Through the FdPoller it took two wake-ups (the poller thread,
// then the loop it posted to) and a read() system call per kick.
//
// Usable when Supported(): the loop's engine polls descriptors (io_uring,
// not the thread pool) and the descriptor is an eventfd. The destructor
// ends a pending read by writing to the eventfd, which only an eventfd
// allows.
//
// Threads: Start() and the destructor run on any thread that has a loop (the
// vhost-user server's); the callbacks run on the watched loop's thread,
// inside one of its passes. The destructor must not run inside a callback.
#ifndef KVBLK_VIRTIO_EVENTFD_WATCH_H_
#define KVBLK_VIRTIO_EVENTFD_WATCH_H_

#include <functional>
#include <memory>

#include "kvblk/event_loop.h"
#include "kvblk/status.h"

namespace kvblk {

// Whether `fd` is an eventfd (read from /proc/self/fd; false without /proc).
bool IsEventfd(int fd);

class EventfdWatch {
 public:
  // Runs once per completed read: every signal since the last one is
  // coalesced into it.
  using SignalCallback = std::function<void()>;
  // Runs once if a read fails (errno value; EAGAIN from a kernel that does
  // not poll the descriptor for io_uring). The watch has then ended: no
  // signal callback runs again, and the owner should watch the descriptor
  // some other way.
  using ErrorCallback = std::function<void(int err)>;

  // Whether `fd` can be watched on `loop`.
  static bool Supported(EventLoop& loop, int fd);

  // Starts watching `fd` on `loop`. The watch reads a duplicate of `fd`, so
  // the caller may close its own copy at any time. IoError if `fd` cannot be
  // duplicated. The caller checks Supported() first.
  static Result<std::unique_ptr<EventfdWatch>> Start(EventLoop& loop, int fd,
                                                     SignalCallback on_signal,
                                                     ErrorCallback on_error);

  // Stops the watch and returns once its read is over and no callback
  // runs or will run; runs the calling thread's loop meanwhile (as
  // VirtioBlkDevice::Drain does).
  ~EventfdWatch();
  EventfdWatch(const EventfdWatch&) = delete;
  EventfdWatch& operator=(const EventfdWatch&) = delete;

 private:
  struct State;
  explicit EventfdWatch(State* state) : state_(state) {}

  State* const state_;  // owned; freed by the destructor once finished
};

}  // namespace kvblk

#endif  // KVBLK_VIRTIO_EVENTFD_WATCH_H_
