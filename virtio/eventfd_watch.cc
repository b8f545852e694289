#include "virtio/eventfd_watch.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <mutex>
#include <string_view>

#include "disk/io_engine.h"

namespace kvblk {

// The read in flight is the IoOp itself. Its life: Start() posts Arm() to
// the watched loop; each completion (OnDone, on that loop) runs a callback
// and arms the next read, until the owner's destructor sets `stop` and
// writes to the eventfd so that a pending read completes. Finish() then
// tells the owner, which frees the state.
struct EventfdWatch::State : IoOp {
  EventLoop* loop = nullptr;
  uint64_t counter = 0;  // the eventfd's value lands here
  iovec vec{};
  SignalCallback on_signal;
  ErrorCallback on_error;

  std::mutex mu;
  bool stop = false;            // guarded by mu: the owner is going away
  bool armed = false;           // guarded by mu: a read is submitted, not completed
  bool finished = false;        // guarded by mu: nothing runs any more
  EventLoop* waiter = nullptr;  // guarded by mu: the owner's loop, once it waits

  // On the watched loop.
  void Arm();
  void Finish();
  static void OnDone(IoOp* op);
};

void EventfdWatch::State::Arm() {
  {
    std::lock_guard<std::mutex> l(mu);
    armed = !stop;
  }
  if (!armed) {
    Finish();
    return;
  }
  kind = IoOp::Kind::kReadv;
  iov = &vec;
  iovcnt = 1;
  offset = 0;
  on_done = &State::OnDone;
  loop->engine().Submit(this);
}

void EventfdWatch::State::Finish() {
  std::lock_guard<std::mutex> l(mu);
  finished = true;
  // Under the lock: once the owner sees `finished` it frees this state, and
  // its loop is alive until then.
  if (waiter != nullptr) waiter->Wake();
}

void EventfdWatch::State::OnDone(IoOp* op) {
  auto* s = static_cast<State*>(op);
  bool stopping;
  {
    std::lock_guard<std::mutex> l(s->mu);
    s->armed = false;
    stopping = s->stop;
  }
  if (stopping) {
    s->Finish();
  } else if (op->result >= 0) {
    s->on_signal();
    s->Arm();
  } else if (op->result == -EINTR) {
    s->Arm();
  } else {
    s->on_error(static_cast<int>(-op->result));
    s->Finish();
  }
}

bool IsEventfd(int fd) {
  char link[48];
  std::snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
  char target[64];
  const ssize_t n = readlink(link, target, sizeof target);
  return n > 0 && std::string_view(target, static_cast<size_t>(n)) == "anon_inode:[eventfd]";
}

bool EventfdWatch::Supported(EventLoop& loop, int fd) {
  return loop.engine().polls_descriptors() && IsEventfd(fd);
}

Result<std::unique_ptr<EventfdWatch>> EventfdWatch::Start(EventLoop& loop, int fd,
                                                          SignalCallback on_signal,
                                                          ErrorCallback on_error) {
  const int copy = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (copy < 0) return Status::FromErrno(errno, "eventfd watch: duplicating fd " + std::to_string(fd));
  auto* s = new State;
  s->loop = &loop;
  s->fd = copy;
  s->vec = {&s->counter, sizeof s->counter};
  s->on_signal = std::move(on_signal);
  s->on_error = std::move(on_error);
  std::unique_ptr<EventfdWatch> w(new EventfdWatch(s));
  loop.PostFunction([s] { s->Arm(); });
  return w;
}

EventfdWatch::~EventfdWatch() {
  State* s = state_;
  EventLoop& here = EventLoop::Current();
  {
    std::lock_guard<std::mutex> l(s->mu);
    s->stop = true;
    s->waiter = &here;
    if (s->armed) {
      // Completes the pending read. EAGAIN: the counter is full, so the read
      // completes anyway.
      uint64_t one = 1;
      ssize_t r = write(s->fd, &one, sizeof one);
      (void)r;
    }
  }
  here.RunUntil([s] {
    std::lock_guard<std::mutex> l(s->mu);
    return s->finished;
  });
  close(s->fd);
  delete s;
}

}  // namespace kvblk
