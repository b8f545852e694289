// FdPoller: one thread that waits (epoll) for file descriptors to become
// readable and runs a short callback for each on that thread.
//
// The event loop of an I/O thread blocks in its IoEngine and cannot wait for
// sockets itself; a transport that must hear from some (the vhost-user
// server: its listening socket, the front end's socket, and the kick
// eventfds its queue loops cannot read through io_uring, see
// eventfd_watch.h) watches them here and has the callbacks hand the work
// over to the loop with EventLoop::PostFunction().
//
// Contract for callbacks: they run on the poller thread with the poller's
// lock held, so they must be short, must not block, and must not call
// Add/Rearm/Remove. Remove() waits for a running callback of that watch, so
// once it returns the callback neither runs nor will run again, and the
// caller may close the descriptor.
//
// Thread-safety: every method is thread-safe except from inside a callback.
#ifndef KVBLK_VIRTIO_FD_POLLER_H_
#define KVBLK_VIRTIO_FD_POLLER_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <thread>

#include "kvblk/status.h"

namespace kvblk {

class FdPoller {
 public:
  // `events` is the epoll event mask (EPOLLIN, EPOLLHUP, EPOLLERR).
  using Callback = std::function<void(uint32_t events)>;

  // Creates the epoll instance and starts the thread. IoError if the
  // kernel refuses.
  static Result<std::unique_ptr<FdPoller>> Start();
  // Stop() and join.
  ~FdPoller();
  FdPoller(const FdPoller&) = delete;
  FdPoller& operator=(const FdPoller&) = delete;

  // Watches `fd` (not owned) for readability and returns the watch id. With
  // `oneshot` the watch reports once and then stays quiet until Rearm(). A
  // level-triggered watch whose descriptor reports only HUP/ERR is reported
  // once and then disarmed (so a dead pipe cannot spin the thread).
  Result<uint64_t> Add(int fd, bool oneshot, Callback cb);
  // Re-enables a oneshot (or disarmed) watch. Unknown ids are ignored.
  void Rearm(uint64_t id);
  // Stops watching; see the class comment. Unknown ids are ignored.
  void Remove(uint64_t id);
  // Ends the thread (callbacks no longer run). Idempotent.
  void Stop();

 private:
  struct Watch {
    int fd;
    bool oneshot;
    Callback cb;
  };

  FdPoller(int epoll_fd, int wake_fd);
  void ThreadMain();

  const int epoll_fd_;
  const int wake_fd_;  // eventfd that interrupts epoll_wait for Stop()
  std::atomic<bool> stop_{false};
  std::mutex mu_;
  std::map<uint64_t, Watch> watches_;  // guarded by mu_
  uint64_t next_id_ = 1;               // guarded by mu_; 0 is the wake fd
  std::thread thread_;
};

}  // namespace kvblk

#endif  // KVBLK_VIRTIO_FD_POLLER_H_
