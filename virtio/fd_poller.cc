#include "virtio/fd_poller.h"

#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>

namespace kvblk {
namespace {

constexpr uint64_t kWakeId = 0;
constexpr int kMaxEvents = 64;

uint32_t EventsFor(bool oneshot) { return EPOLLIN | (oneshot ? EPOLLONESHOT : 0u); }

}  // namespace

Result<std::unique_ptr<FdPoller>> FdPoller::Start() {
  int ep = epoll_create1(EPOLL_CLOEXEC);
  if (ep < 0) return Status::FromErrno(errno, "fd poller: epoll_create1");
  int wake = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (wake < 0) {
    int err = errno;
    close(ep);
    return Status::FromErrno(err, "fd poller: eventfd");
  }
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = kWakeId;
  if (epoll_ctl(ep, EPOLL_CTL_ADD, wake, &ev) < 0) {
    int err = errno;
    close(ep);
    close(wake);
    return Status::FromErrno(err, "fd poller: epoll_ctl");
  }
  std::unique_ptr<FdPoller> p(new FdPoller(ep, wake));
  p->thread_ = std::thread([raw = p.get()] { raw->ThreadMain(); });
  return p;
}

FdPoller::FdPoller(int epoll_fd, int wake_fd) : epoll_fd_(epoll_fd), wake_fd_(wake_fd) {}

FdPoller::~FdPoller() {
  Stop();
  close(epoll_fd_);
  close(wake_fd_);
}

void FdPoller::Stop() {
  stop_.store(true, std::memory_order_release);
  uint64_t one = 1;
  ssize_t r = write(wake_fd_, &one, sizeof one);
  (void)r;  // the counter cannot overflow with one write per Stop()
  if (thread_.joinable() && thread_.get_id() != std::this_thread::get_id()) thread_.join();
}

Result<uint64_t> FdPoller::Add(int fd, bool oneshot, Callback cb) {
  std::lock_guard<std::mutex> l(mu_);
  uint64_t id = next_id_++;
  epoll_event ev{};
  ev.events = EventsFor(oneshot);
  ev.data.u64 = id;
  if (epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, fd, &ev) < 0) {
    return Status::FromErrno(errno, "fd poller: watch fd " + std::to_string(fd));
  }
  watches_.emplace(id, Watch{fd, oneshot, std::move(cb)});
  return id;
}

void FdPoller::Rearm(uint64_t id) {
  std::lock_guard<std::mutex> l(mu_);
  auto it = watches_.find(id);
  if (it == watches_.end()) return;
  epoll_event ev{};
  ev.events = EventsFor(it->second.oneshot);
  ev.data.u64 = id;
  // ENOENT: disarmed after HUP/ERR (deleted from the set); add it back.
  if (epoll_ctl(epoll_fd_, EPOLL_CTL_MOD, it->second.fd, &ev) < 0 && errno == ENOENT) {
    (void)epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, it->second.fd, &ev);
  }
}

void FdPoller::Remove(uint64_t id) {
  std::lock_guard<std::mutex> l(mu_);
  auto it = watches_.find(id);
  if (it == watches_.end()) return;
  (void)epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, it->second.fd, nullptr);
  watches_.erase(it);
}

void FdPoller::ThreadMain() {
  epoll_event events[kMaxEvents];
  while (!stop_.load(std::memory_order_acquire)) {
    int n = epoll_wait(epoll_fd_, events, kMaxEvents, -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      return;  // EBADF/EINVAL: nothing sensible left to do
    }
    std::lock_guard<std::mutex> l(mu_);
    for (int i = 0; i < n; ++i) {
      if (stop_.load(std::memory_order_acquire)) return;
      const uint64_t id = events[i].data.u64;
      if (id == kWakeId) continue;
      // A watch removed after epoll_wait returned is gone from the map.
      auto it = watches_.find(id);
      if (it == watches_.end()) continue;
      const uint32_t ev = events[i].events;
      if (!it->second.oneshot && !(ev & EPOLLIN) && (ev & (EPOLLHUP | EPOLLERR))) {
        (void)epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, it->second.fd, nullptr);
      }
      it->second.cb(ev);
    }
  }
}

}  // namespace kvblk
