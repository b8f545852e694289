#include "tests/support/vhost_user_front_end.h"

#include <gtest/gtest.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cstring>

namespace kvblk::testing {

using vhost_user::Message;
using vhost_user::Request;
using vhost_user::UniqueFd;

namespace {
constexpr uint16_t kDescFNext = 1;
constexpr uint16_t kDescFWrite = 2;
}  // namespace

// ---- Guest RAM and a driver-side split ring -------------------------------------

GuestRam::GuestRam(size_t size) : size_(size) {
  fd_.Reset(memfd_create("vhost-user-test-guest", MFD_CLOEXEC));
  EXPECT_TRUE(fd_.valid());
  EXPECT_EQ(ftruncate(fd_.get(), static_cast<off_t>(size)), 0);
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd_.get(), 0);
  EXPECT_NE(p, MAP_FAILED);
  mem_ = static_cast<uint8_t*>(p);
}

GuestRam::~GuestRam() { munmap(mem_, size_); }

UniqueFd GuestRam::Fd() const { return UniqueFd(dup(fd_.get())); }

vhost_user::VringAddr DriverRing::Addr(uint32_t index) const {
  vhost_user::VringAddr a;
  a.index = index;
  a.desc_user_addr = ram_.Uva(base_);
  a.avail_user_addr = ram_.Uva(base_ + 0x1000);
  a.used_user_addr = ram_.Uva(base_ + 0x2000);
  return a;
}

BlkReq DriverRing::Submit(uint32_t type, uint64_t sector, const std::vector<uint8_t>& out,
                          uint32_t in_len) {
  const uint16_t slot = next_slot_++ % 5;
  const uint16_t head = slot * 3;
  const uint64_t hdr = base_ + 0x10000 + slot * 0x3000;
  BlkReq r;
  r.data_gpa = hdr + 0x1000;
  r.status_gpa = hdr + 0x2000;
  r.len = out.empty() ? in_len : static_cast<uint32_t>(out.size());
  uint32_t reserved = 0;
  std::memcpy(ram_.Host(hdr), &type, 4);
  std::memcpy(ram_.Host(hdr + 4), &reserved, 4);
  std::memcpy(ram_.Host(hdr + 8), &sector, 8);
  *ram_.Host(r.status_gpa) = 0xff;
  uint16_t d = head;
  WriteDesc(d, hdr, 16, kDescFNext, d + 1);
  ++d;
  if (r.len > 0) {
    if (!out.empty()) std::memcpy(ram_.Host(r.data_gpa), out.data(), out.size());
    WriteDesc(d, r.data_gpa, r.len, (out.empty() ? kDescFWrite : 0) | kDescFNext, d + 1);
    ++d;
  }
  WriteDesc(d, r.status_gpa, 1, kDescFWrite, 0);
  Publish(head);
  return r;
}

void DriverRing::Publish(uint16_t head) {
  uint8_t* avail = ram_.Host(base_ + 0x1000);
  std::memcpy(avail + 4 + 2 * (avail_idx_ % kQueueSize), &head, 2);
  ++avail_idx_;
  __atomic_store_n(reinterpret_cast<uint16_t*>(avail + 2), avail_idx_, __ATOMIC_RELEASE);
}

uint16_t DriverRing::UsedIdx() {
  return __atomic_load_n(reinterpret_cast<uint16_t*>(ram_.Host(base_ + 0x2000 + 2)),
                         __ATOMIC_ACQUIRE);
}

void DriverRing::SetUsedEvent(uint16_t idx) {
  __atomic_store_n(reinterpret_cast<uint16_t*>(ram_.Host(base_ + 0x1000 + 4 + 2 * kQueueSize)), idx,
                   __ATOMIC_SEQ_CST);
}

void DriverRing::WriteDesc(uint16_t i, uint64_t addr, uint32_t len, uint16_t flags, uint16_t next) {
  uint8_t* p = ram_.Host(base_ + 16 * i);
  std::memcpy(p, &addr, 8);
  std::memcpy(p + 8, &len, 4);
  std::memcpy(p + 12, &flags, 2);
  std::memcpy(p + 14, &next, 2);
}

// ---- The front end ----------------------------------------------------------------

void FrontEnd::Send(Request r, std::vector<uint8_t> payload, std::vector<UniqueFd> fds,
                    bool need_reply) {
  Message m;
  m.request = static_cast<uint32_t>(r);
  m.flags = vhost_user::kVersion | (need_reply ? vhost_user::kFlagNeedReply : 0);
  m.payload = std::move(payload);
  m.fds = std::move(fds);
  ASSERT_TRUE(vhost_user::SendMessage(sock_.get(), m).ok());
}

void FrontEnd::SendRaw(uint32_t request, uint32_t flags, const std::vector<uint8_t>& payload) {
  std::vector<uint8_t> bytes(12);
  uint32_t size = static_cast<uint32_t>(payload.size());
  std::memcpy(bytes.data(), &request, 4);
  std::memcpy(bytes.data() + 4, &flags, 4);
  std::memcpy(bytes.data() + 8, &size, 4);
  bytes.insert(bytes.end(), payload.begin(), payload.end());
  ASSERT_EQ(send(sock_.get(), bytes.data(), bytes.size(), MSG_NOSIGNAL),
            static_cast<ssize_t>(bytes.size()));
}

Message FrontEnd::Recv(Request expected) {
  auto m = vhost_user::ReadMessageBlocking(sock_.get(), kTimeoutMs);
  EXPECT_TRUE(m.ok()) << "no reply to " << vhost_user::RequestName(static_cast<uint32_t>(expected));
  if (!m.ok()) return Message();
  EXPECT_EQ(m->request, static_cast<uint32_t>(expected));
  EXPECT_EQ(m->flags, vhost_user::kVersion | vhost_user::kFlagReply);
  return std::move(*m);
}

uint64_t FrontEnd::GetU64(Request r) {
  Send(r);
  auto v = vhost_user::DecodeU64(Recv(r));
  EXPECT_TRUE(v.ok());
  return v.ok() ? *v : ~uint64_t{0};
}

uint64_t FrontEnd::Ack(Request r, std::vector<uint8_t> payload, std::vector<UniqueFd> fds) {
  Send(r, std::move(payload), std::move(fds), /*need_reply=*/true);
  auto v = vhost_user::DecodeU64(Recv(r));
  EXPECT_TRUE(v.ok());
  return v.ok() ? *v : ~uint64_t{0};
}

bool FrontEnd::SeesClose() {
  auto m = vhost_user::ReadMessageBlocking(sock_.get(), kTimeoutMs);
  return !m.ok() && m.error() == vhost_user::VhostUserError::kPeerClosed;
}

UniqueFd Connect(const std::string& path) {
  UniqueFd fd(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof addr.sun_path - 1);
  EXPECT_EQ(connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  return fd;
}

std::vector<UniqueFd> One(UniqueFd fd) {
  std::vector<UniqueFd> v;
  v.push_back(std::move(fd));
  return v;
}

QueueFds::QueueFds()
    : kick(eventfd(0, EFD_CLOEXEC)), call(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) {}

void QueueFds::Kick() {
  uint64_t one = 1;
  ASSERT_EQ(write(kick.get(), &one, 8), 8);
}

bool WaitUsed(DriverRing& ring, QueueFds& fds, uint16_t n) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(kTimeoutMs);
  for (;;) {
    uint16_t u = ring.UsedIdx();
    if (static_cast<int16_t>(u - n) >= 0) return true;
    ring.SetUsedEvent(u);
    if (static_cast<int16_t>(ring.UsedIdx() - n) >= 0) return true;
    pollfd p{fds.call.get(), POLLIN, 0};
    int left = static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                    deadline - std::chrono::steady_clock::now())
                                    .count());
    if (left <= 0 || poll(&p, 1, left) <= 0) return false;
    uint64_t v;
    (void)!read(fds.call.get(), &v, 8);
  }
}

}  // namespace kvblk::testing
