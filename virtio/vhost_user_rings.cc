// VhostUserServer, its rings: starting and stopping the device queue that
// serves each vring, the kick eventfds (read in the queue loop's ring, or
// watched by the poller and handed to the queue's loop) and the call/err
// eventfds (signalled from the queue's loop).
// The rest of the server is in vhost_user_server.cc.
#include <sys/epoll.h>
#include <unistd.h>

#include <cstring>

#include "virtio/eventfd_watch.h"
#include "virtio/vhost_user_server.h"

namespace kvblk {

using vhost_user::Hex;
using vhost_user::UniqueFd;
using vhost_user::VhostUserError;
using vhost_user::VuStatus;

namespace {

// Notifies through an eventfd the front end gave us (call or err).
void Signal(const UniqueFd& fd) {
  if (!fd.valid()) return;
  uint64_t one = 1;
  ssize_t r = write(fd.get(), &one, sizeof one);
  (void)r;  // EAGAIN: the counter is saturated, the front end is notified anyway
}

}  // namespace

VuStatus VhostUserServer::UpdateRing(int q) {
  Vring& v = vrings_[static_cast<size_t>(q)];
  const bool want = v.started && (v.enabled || !protocol_features_acked_) && !memory_.empty() &&
                    v.addr.has_value() && v.num != 0;
  if (want == v.running) return {};
  if (!want) {
    StopRing(q);
    return {};
  }
  const uint64_t n = v.num;
  auto desc = memory_.UserToGuest(v.addr->desc_user_addr, 16 * n);
  auto avail = memory_.UserToGuest(v.addr->avail_user_addr, 6 + 2 * n);
  auto used = memory_.UserToGuest(v.addr->used_user_addr, 6 + 8 * n);
  if (!desc.ok() || !avail.ok() || !used.ok()) {
    error_detail_ = "vring " + std::to_string(q) + " rings at " + Hex(v.addr->desc_user_addr) +
                    "/" + Hex(v.addr->avail_user_addr) + "/" + Hex(v.addr->used_user_addr);
    return VhostUserError::kAddressNotMapped;
  }
  VirtqueueAddress qa;
  qa.size = v.num;
  qa.desc_gpa = *desc;
  qa.avail_gpa = *avail;
  qa.used_gpa = *used;
  qa.next_avail = v.base;
  Status st = device_->SetQueue(q, qa);
  if (st.ok()) st = device_->EnableQueue(q);
  if (!st.ok()) {
    error_detail_ = st.message();
    return VhostUserError::kDeviceRejected;
  }
  v.running = true;
  v.err_signalled = false;
  device_->PostKick(q);  // whatever the driver queued before the ring started
  return {};
}

void VhostUserServer::StopRing(int q) {
  Vring& v = vrings_[static_cast<size_t>(q)];
  if (!v.running) return;
  auto next = device_->StopQueue(q);
  // Requests already popped still complete into the used ring; wait for
  // them so the ring is quiet and `base` is exact.
  device_->Drain();
  if (next.ok()) v.base = *next;
  v.running = false;
}

void VhostUserServer::StopAllRings() {
  for (size_t q = 0; q < vrings_.size(); ++q) StopRing(static_cast<int>(q));
}

VuStatus VhostUserServer::SetKickFd(int q, UniqueFd fd) {
  DropKickFd(q);
  Vring& v = vrings_[static_cast<size_t>(q)];
  v.kick = std::move(fd);
  EventLoop& queue_loop = device_->queue_loop(q);
  if (EventfdWatch::Supported(queue_loop, v.kick.get())) {
    // The queue's loop reads its kicks in its own ring and kicks the device
    // there. The device outlives the watch (DropKickFd comes first).
    VirtioBlkDevice* device = device_.get();
    const uint64_t id = ++kick_ids_;
    std::weak_ptr<VhostUserServer*> weak = alive_;
    EventLoop* loop = loop_;
    auto watch = EventfdWatch::Start(
        queue_loop, v.kick.get(), [device, q] { device->Kick(q); },
        [weak, loop, q, id](int err) {
          loop->PostFunction([weak, q, id, err] {
            if (auto s = weak.lock()) (*s)->OnKickReadFailed(q, id, err);
          });
        });
    if (watch.ok()) {
      v.kick_reader = std::move(*watch);
      v.kick_id = id;
      return {};
    }
    LogLimited("queue " + std::to_string(q) + ": " + watch.status().message() +
               "; watching its kicks on the poller thread");
  }
  return WatchKickOnPoller(q);
}

VuStatus VhostUserServer::WatchKickOnPoller(int q) {
  Vring& v = vrings_[static_cast<size_t>(q)];
  std::weak_ptr<VhostUserServer*> weak = alive_;
  EventLoop* loop = loop_;
  std::atomic<bool>* pending = &kick_pending_[q];
  const int kfd = v.kick.get();
  // Poller thread: consume the notification, post at most one Kick per
  // queue until the loop has run it.
  auto watch = poller_->Add(kfd, false, [weak, loop, pending, kfd, q](uint32_t events) {
    if (events & EPOLLIN) {
      uint64_t count;
      ssize_t r = read(kfd, &count, sizeof count);  // readable, so it does not block
      (void)r;
    }
    if (!pending->exchange(true)) {
      loop->PostFunction([weak, q] {
        if (auto s = weak.lock()) (*s)->OnKick(q);
      });
    }
  });
  if (!watch.ok()) {
    error_detail_ = watch.status().message();
    v.kick.Reset();
    return VhostUserError::kInvalidValue;
  }
  v.kick_watch = *watch;
  return {};
}

void VhostUserServer::OnKickReadFailed(int q, uint64_t id, int err) {
  if (q < 0 || static_cast<size_t>(q) >= vrings_.size()) return;
  Vring& v = vrings_[static_cast<size_t>(q)];
  if (v.kick_id != id || !v.kick_reader) return;  // that watch is already gone
  LogLimited("queue " + std::to_string(q) + ": reading its kick eventfd in the ring failed (" +
             std::strerror(err) + "); watching it on the poller thread");
  v.kick_reader.reset();  // it has finished: returns at once
  if (!WatchKickOnPoller(q).ok()) {
    LogLimited("queue " + std::to_string(q) + ": cannot watch its kick eventfd: " +
               error_detail_);
    return;
  }
  // A kick may have come while neither watched.
  if (v.running) device_->PostKick(q);
}

void VhostUserServer::DropKickFd(int q) {
  Vring& v = vrings_[static_cast<size_t>(q)];
  v.kick_reader.reset();  // waits until its read is over
  if (v.kick_watch != 0 && poller_) poller_->Remove(v.kick_watch);
  v.kick_watch = 0;
  v.kick.Reset();
}

void VhostUserServer::OnKick(int q) {
  if (q < 0 || q >= opts_.device.num_queues) return;
  kick_pending_[q].store(false);
  if (device_ && connected_ && static_cast<size_t>(q) < vrings_.size() &&
      vrings_[static_cast<size_t>(q)].running) {
    // On the queue's own loop (at once when that is this one).
    if (&device_->queue_loop(q) == loop_) {
      device_->Kick(q);
    } else {
      device_->PostKick(q);
    }
  }
}

void VhostUserServer::OnInterrupt(int q) {
  if (q == vblk::kConfigInterrupt) {
    if (&EventLoop::Current() != loop_) {  // a queue's loop: the vring state is ours
      std::weak_ptr<VhostUserServer*> weak = alive_;
      loop_->PostFunction([weak] {
        if (auto s = weak.lock()) (*s)->OnInterrupt(vblk::kConfigInterrupt);
      });
      return;
    }
    for (size_t i = 0; i < vrings_.size(); ++i) {
      Vring& v = vrings_[i];
      if (!device_->queue_broken(static_cast<int>(i)) || v.err_signalled) continue;
      v.err_signalled = true;
      LogLimited("queue " + std::to_string(i) + " stopped: the driver broke its ring");
      Signal(v.err);
    }
    return;
  }
  // vrings_ is not resized while a queue runs (rings are stopped first).
  if (q >= 0 && static_cast<size_t>(q) < vrings_.size()) {
    std::lock_guard<std::mutex> l(call_mu_);
    Signal(vrings_[static_cast<size_t>(q)].call);
  }
}

}  // namespace kvblk
