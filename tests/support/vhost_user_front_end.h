// A minimal vhost-user front end for tests: guest RAM shared as a memfd, a
// driver-side split virtqueue laid out in it, a protocol client over a
// socket, and the queue's kick/call eventfds. It drives a VhostUserServer the
// way QEMU does (see tests/virtio/vhost_user_server_test.cc).
//
// Not thread-safe: one test thread drives it; the server runs elsewhere.
#ifndef KVBLK_TESTS_SUPPORT_VHOST_USER_FRONT_END_H_
#define KVBLK_TESTS_SUPPORT_VHOST_USER_FRONT_END_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "virtio/vhost_user_memory.h"
#include "virtio/vhost_user_protocol.h"

namespace kvblk::testing {

// Guest physical address of guest RAM, and its default size.
inline constexpr uint64_t kGuestBase = 0x40000000;
inline constexpr size_t kGuestSize = 4 << 20;
// Entries of every queue the front end sets up.
inline constexpr uint16_t kQueueSize = 16;
// How long the front end waits for a reply or a used entry.
inline constexpr int kTimeoutMs = 5000;

// `size` bytes of guest RAM at kGuestBase in a memfd, mapped here.
class GuestRam {
 public:
  explicit GuestRam(size_t size = kGuestSize);
  ~GuestRam();
  GuestRam(const GuestRam&) = delete;
  GuestRam& operator=(const GuestRam&) = delete;

  uint8_t* Host(uint64_t gpa) { return mem_ + (gpa - kGuestBase); }
  uint64_t Uva(uint64_t gpa) { return reinterpret_cast<uint64_t>(Host(gpa)); }
  // The region as a front end describes it: its own mapping is the user address.
  vhost_user::MemoryRegionDesc Region() const {
    return {kGuestBase, size_, reinterpret_cast<uint64_t>(mem_), 0};
  }
  // A duplicate of the memfd, to send along with a memory table.
  vhost_user::UniqueFd Fd() const;

 private:
  size_t size_;
  vhost_user::UniqueFd fd_;
  uint8_t* mem_ = nullptr;
};

// Where a submitted virtio-blk request's data and status byte live.
struct BlkReq {
  uint64_t data_gpa = 0;
  uint64_t status_gpa = 0;
  uint32_t len = 0;
};

// One split virtqueue of kQueueSize entries at `base` (desc, avail at
// +0x1000, used at +0x2000, request buffers from +0x10000). Each request
// uses three descriptors of one of five slots.
class DriverRing {
 public:
  DriverRing(GuestRam& ram, uint64_t base) : ram_(ram), base_(base) {}

  // The ring's addresses for SET_VRING_ADDR of queue `index`.
  vhost_user::VringAddr Addr(uint32_t index) const;

  // Builds a request (header, data, status) and publishes it. `out` is the
  // data of a write; a read asks for `in_len` bytes.
  BlkReq Submit(uint32_t type, uint64_t sector, const std::vector<uint8_t>& out, uint32_t in_len);

  // Makes descriptor chain `head` available to the device.
  void Publish(uint16_t head);

  uint16_t UsedIdx();
  // VIRTIO_F_EVENT_IDX: interrupt me once the used index passes `idx`.
  void SetUsedEvent(uint16_t idx);

  uint8_t Status(const BlkReq& r) { return *ram_.Host(r.status_gpa); }
  std::vector<uint8_t> Data(const BlkReq& r) {
    return std::vector<uint8_t>(ram_.Host(r.data_gpa), ram_.Host(r.data_gpa) + r.len);
  }
  uint16_t avail_idx() const { return avail_idx_; }

 private:
  void WriteDesc(uint16_t i, uint64_t addr, uint32_t len, uint16_t flags, uint16_t next);

  GuestRam& ram_;
  uint64_t base_;
  uint16_t avail_idx_ = 0;
  uint16_t next_slot_ = 0;
};

// The protocol side of the front end: messages over the connected socket.
// Failures to send are test failures.
class FrontEnd {
 public:
  explicit FrontEnd(vhost_user::UniqueFd sock) : sock_(std::move(sock)) {}

  int fd() const { return sock_.get(); }
  void Close() { sock_.Reset(); }

  void Send(vhost_user::Request r, std::vector<uint8_t> payload = {},
            std::vector<vhost_user::UniqueFd> fds = {}, bool need_reply = false);
  // A hand-made message header and payload, for framing errors.
  void SendRaw(uint32_t request, uint32_t flags, const std::vector<uint8_t>& payload);

  // The reply to `expected`; an empty Message (and a test failure) if none
  // arrives within kTimeoutMs or it is not that reply.
  vhost_user::Message Recv(vhost_user::Request expected);

  // Sends `r` and decodes its u64 reply (all ones if there is none).
  uint64_t GetU64(vhost_user::Request r);

  // Sends with need_reply set (REPLY_ACK) and returns the status: 0 is success.
  uint64_t Ack(vhost_user::Request r, std::vector<uint8_t> payload = {},
               std::vector<vhost_user::UniqueFd> fds = {});

  // True once the server has closed the connection.
  bool SeesClose();

 private:
  vhost_user::UniqueFd sock_;
};

// A socket connected to the server listening at `path`.
vhost_user::UniqueFd Connect(const std::string& path);

// `fd` as the one-element fd list of a message.
std::vector<vhost_user::UniqueFd> One(vhost_user::UniqueFd fd);

// A queue's eventfds, front-end side.
struct QueueFds {
  vhost_user::UniqueFd kick;
  vhost_user::UniqueFd call;
  QueueFds();
  void Kick();
};

// Waits until `ring`'s used index reaches `n`, re-arming used_event and
// sleeping on the call eventfd as a driver does. False on timeout.
bool WaitUsed(DriverRing& ring, QueueFds& fds, uint16_t n);

}  // namespace kvblk::testing

#endif  // KVBLK_TESTS_SUPPORT_VHOST_USER_FRONT_END_H_
