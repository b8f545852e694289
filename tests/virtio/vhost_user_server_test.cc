// VhostUserServer end to end: a minimal front end in the test talks the
// vhost-user protocol over a socket (socketpair, or the server's listening
// socket), shares guest RAM as a memfd, lays out a split virtqueue in it,
// kicks through an eventfd and waits for the call eventfd, while the server
// runs on its own thread over a RawDevice on a MemFile.
#include "virtio/vhost_user_server.h"

#include <gtest/gtest.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <future>
#include <mutex>
#include <thread>

#include "disk/mem_file.h"
#include "disk/raw_device.h"
#include "tests/support/test_util.h"

namespace kvblk {
namespace {

using testing::PatternBytes;
using testing::TempDir;
using vblk::FeatureBit;
using vhost_user::ConfigAccess;
using vhost_user::DecodeConfig;
using vhost_user::DecodeU64;
using vhost_user::DecodeVringState;
using vhost_user::EncodeConfig;
using vhost_user::EncodeMemTable;
using vhost_user::EncodeSingleRegion;
using vhost_user::EncodeU64;
using vhost_user::EncodeVringAddr;
using vhost_user::EncodeVringState;
using vhost_user::MemoryRegionDesc;
using vhost_user::Message;
using vhost_user::Request;
using vhost_user::UniqueFd;
using vhost_user::VhostUserError;
using vhost_user::VringAddr;

constexpr uint64_t kDiskSize = 1 << 20;
constexpr uint64_t kGuestBase = 0x40000000;
constexpr size_t kGuestSize = 4 << 20;
constexpr uint16_t kQueueSize = 16;
constexpr int kTimeoutMs = 5000;
constexpr uint16_t kDescFNext = 1;
constexpr uint16_t kDescFWrite = 2;

// ---- Guest RAM and a driver-side split ring -------------------------------------

class GuestRam {
 public:
  explicit GuestRam(size_t size = kGuestSize) : size_(size) {
    fd_.Reset(memfd_create("vhost-user-test-guest", MFD_CLOEXEC));
    EXPECT_TRUE(fd_.valid());
    EXPECT_EQ(ftruncate(fd_.get(), static_cast<off_t>(size)), 0);
    void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd_.get(), 0);
    EXPECT_NE(p, MAP_FAILED);
    mem_ = static_cast<uint8_t*>(p);
  }
  ~GuestRam() { munmap(mem_, size_); }

  uint8_t* Host(uint64_t gpa) { return mem_ + (gpa - kGuestBase); }
  uint64_t Uva(uint64_t gpa) { return reinterpret_cast<uint64_t>(Host(gpa)); }
  // The region as a front end describes it: its own mapping is the user address.
  MemoryRegionDesc Region() const {
    return {kGuestBase, size_, reinterpret_cast<uint64_t>(mem_), 0};
  }
  UniqueFd Fd() const { return UniqueFd(dup(fd_.get())); }

 private:
  size_t size_;
  UniqueFd fd_;
  uint8_t* mem_ = nullptr;
};

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

  VringAddr Addr(uint32_t index) const {
    VringAddr a;
    a.index = index;
    a.desc_user_addr = ram_.Uva(base_);
    a.avail_user_addr = ram_.Uva(base_ + 0x1000);
    a.used_user_addr = ram_.Uva(base_ + 0x2000);
    return a;
  }

  // Builds a request (header, data, status) and publishes it.
  BlkReq Submit(uint32_t type, uint64_t sector, const std::vector<uint8_t>& out, uint32_t in_len) {
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

  void Publish(uint16_t head) {
    uint8_t* avail = ram_.Host(base_ + 0x1000);
    std::memcpy(avail + 4 + 2 * (avail_idx_ % kQueueSize), &head, 2);
    ++avail_idx_;
    __atomic_store_n(reinterpret_cast<uint16_t*>(avail + 2), avail_idx_, __ATOMIC_RELEASE);
  }

  uint16_t UsedIdx() {
    return __atomic_load_n(reinterpret_cast<uint16_t*>(ram_.Host(base_ + 0x2000 + 2)),
                           __ATOMIC_ACQUIRE);
  }
  // VIRTIO_F_EVENT_IDX: interrupt me once the used index passes `idx`.
  void SetUsedEvent(uint16_t idx) {
    __atomic_store_n(reinterpret_cast<uint16_t*>(ram_.Host(base_ + 0x1000 + 4 + 2 * kQueueSize)),
                     idx, __ATOMIC_SEQ_CST);
  }

  uint8_t Status(const BlkReq& r) { return *ram_.Host(r.status_gpa); }
  std::vector<uint8_t> Data(const BlkReq& r) {
    return std::vector<uint8_t>(ram_.Host(r.data_gpa), ram_.Host(r.data_gpa) + r.len);
  }
  uint16_t avail_idx() const { return avail_idx_; }

 private:
  void WriteDesc(uint16_t i, uint64_t addr, uint32_t len, uint16_t flags, uint16_t next) {
    uint8_t* p = ram_.Host(base_ + 16 * i);
    std::memcpy(p, &addr, 8);
    std::memcpy(p + 8, &len, 4);
    std::memcpy(p + 12, &flags, 2);
    std::memcpy(p + 14, &next, 2);
  }

  GuestRam& ram_;
  uint64_t base_;
  uint16_t avail_idx_ = 0;
  uint16_t next_slot_ = 0;
};

// ---- The front end ----------------------------------------------------------------

class FrontEnd {
 public:
  explicit FrontEnd(UniqueFd sock) : sock_(std::move(sock)) {}

  int fd() const { return sock_.get(); }
  void Close() { sock_.Reset(); }

  void Send(Request r, std::vector<uint8_t> payload = {}, std::vector<UniqueFd> fds = {},
            bool need_reply = false) {
    Message m;
    m.request = static_cast<uint32_t>(r);
    m.flags = vhost_user::kVersion | (need_reply ? vhost_user::kFlagNeedReply : 0);
    m.payload = std::move(payload);
    m.fds = std::move(fds);
    ASSERT_TRUE(vhost_user::SendMessage(sock_.get(), m).ok());
  }
  void SendRaw(uint32_t request, uint32_t flags, const std::vector<uint8_t>& payload) {
    std::vector<uint8_t> bytes(12);
    uint32_t size = static_cast<uint32_t>(payload.size());
    std::memcpy(bytes.data(), &request, 4);
    std::memcpy(bytes.data() + 4, &flags, 4);
    std::memcpy(bytes.data() + 8, &size, 4);
    bytes.insert(bytes.end(), payload.begin(), payload.end());
    ASSERT_EQ(send(sock_.get(), bytes.data(), bytes.size(), MSG_NOSIGNAL),
              static_cast<ssize_t>(bytes.size()));
  }

  Message Recv(Request expected) {
    auto m = vhost_user::ReadMessageBlocking(sock_.get(), kTimeoutMs);
    EXPECT_TRUE(m.ok()) << "no reply to "
                        << vhost_user::RequestName(static_cast<uint32_t>(expected));
    if (!m.ok()) return Message();
    EXPECT_EQ(m->request, static_cast<uint32_t>(expected));
    EXPECT_EQ(m->flags, vhost_user::kVersion | vhost_user::kFlagReply);
    return std::move(*m);
  }

  uint64_t GetU64(Request r) {
    Send(r);
    auto v = DecodeU64(Recv(r));
    EXPECT_TRUE(v.ok());
    return v.ok() ? *v : ~uint64_t{0};
  }

  // Sends with need_reply set (REPLY_ACK) and returns the status: 0 is success.
  uint64_t Ack(Request r, std::vector<uint8_t> payload = {}, std::vector<UniqueFd> fds = {}) {
    Send(r, std::move(payload), std::move(fds), /*need_reply=*/true);
    auto v = DecodeU64(Recv(r));
    EXPECT_TRUE(v.ok());
    return v.ok() ? *v : ~uint64_t{0};
  }

  // True once the server has closed the connection.
  bool SeesClose() {
    auto m = vhost_user::ReadMessageBlocking(sock_.get(), kTimeoutMs);
    return !m.ok() && m.error() == VhostUserError::kPeerClosed;
  }

 private:
  UniqueFd sock_;
};

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

// A queue's eventfds, front-end side.
struct QueueFds {
  UniqueFd kick{eventfd(0, EFD_CLOEXEC)};
  UniqueFd call{eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)};
  void Kick() {
    uint64_t one = 1;
    ASSERT_EQ(write(kick.get(), &one, 8), 8);
  }
};

// Waits until `ring`'s used index reaches `n`, re-arming used_event and
// sleeping on the call eventfd as a driver does. False on timeout.
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

// ---- The server on its own thread ---------------------------------------------

class ServerThread {
 public:
  explicit ServerThread(std::shared_ptr<MemFileData> data) : data_(std::move(data)) {}
  ~ServerThread() {
    if (thread_.joinable()) StopAndJoin();
  }

  // Creates the server (on the new thread, whose loop then serves it);
  // returns Create()'s status.
  Status Start(VhostUserServerOptions opts) {
    std::promise<Status> created;
    auto created_f = created.get_future();
    thread_ = std::thread([this, opts = std::move(opts), &created]() mutable {
      auto disk = RawDevice::Open(std::make_unique<MemFile>(data_, "disk.img"));
      if (!disk.ok()) {
        created.set_value(disk.status());
        return;
      }
      opts.log = [this](const std::string& line) {
        std::lock_guard<std::mutex> l(mu_);
        logs_.push_back(line);
      };
      auto server = VhostUserServer::Create(**disk, std::move(opts));
      if (!server.ok()) {
        created.set_value(server.status());
        return;
      }
      server_ = server->get();
      created.set_value(Status::Ok());
      Status st = (*server)->Run();
      served_ = (*server)->connections_served();
      run_done_.set_value(st);
      release_.get_future().wait();  // Stop() may still be called until then
      server->reset();
    });
    Status st = created_f.get();
    if (!st.ok()) {
      thread_.join();
      run_done_.set_value(st);
    }
    return st;
  }

  // Run()'s status once it returned (or a timeout error).
  Status WaitRun() {
    if (run_done_f_.wait_for(std::chrono::milliseconds(kTimeoutMs)) != std::future_status::ready) {
      return Status(StatusCode::kIoError, "Run() did not return");
    }
    return run_done_f_.get();
  }

  void StopAndJoin() {
    if (!thread_.joinable()) return;
    if (server_ != nullptr) server_->Stop();
    release_.set_value();
    thread_.join();
  }

  bool HasLog(const std::string& needle) {
    std::lock_guard<std::mutex> l(mu_);
    for (const std::string& line : logs_) {
      if (line.find(needle) != std::string::npos) return true;
    }
    return false;
  }
  std::string Logs() {
    std::lock_guard<std::mutex> l(mu_);
    std::string out;
    for (const std::string& line : logs_) out += line + "\n";
    return out;
  }
  int served() const { return served_; }
  void NotifyConfigChange() { server_->NotifyConfigChange(); }

 private:
  std::shared_ptr<MemFileData> data_;
  std::thread thread_;
  VhostUserServer* server_ = nullptr;
  std::promise<Status> run_done_;
  std::shared_future<Status> run_done_f_ = run_done_.get_future().share();
  std::promise<void> release_;
  std::atomic<int> served_{0};
  std::mutex mu_;
  std::vector<std::string> logs_;
};

class VhostUserServerTest : public ::testing::Test {
 protected:
  VhostUserServerTest() : data_(std::make_shared<MemFileData>()), server_(data_) {
    data_->bytes = PatternBytes(kDiskSize, 3);
  }

  // Starts a server over a socketpair; the test end becomes `fe_`.
  void StartPair(int num_queues = 1) {
    int sv[2];
    ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    VhostUserServerOptions opts;
    opts.connection_fd = sv[1];
    opts.device.num_queues = num_queues;
    opts.device.serial = "vhost-user-serial";
    ASSERT_TRUE(server_.Start(std::move(opts)).ok());
    fe_ = std::make_unique<FrontEnd>(UniqueFd(sv[0]));
  }

  // The usual front-end sequence up to a running queue 0 (QEMU's order),
  // every state change acknowledged through REPLY_ACK.
  void Handshake(FrontEnd& fe, DriverRing& ring, QueueFds& fds, bool ack_protocol_bit = true,
                 bool send_enable = true, bool add_mem_reg = false) {
    features_ = fe.GetU64(Request::kGetFeatures);
    ASSERT_TRUE(features_ & (uint64_t{1} << vhost_user::kFProtocolFeatures));
    uint64_t proto = fe.GetU64(Request::kGetProtocolFeatures);
    fe.Send(Request::kSetProtocolFeatures, EncodeU64(proto));
    fe.Send(Request::kSetOwner);
    uint64_t acked = features_;
    if (!ack_protocol_bit) acked &= ~(uint64_t{1} << vhost_user::kFProtocolFeatures);
    ASSERT_EQ(fe.Ack(Request::kSetFeatures, EncodeU64(acked)), 0u);
    if (add_mem_reg) {
      ASSERT_EQ(fe.Ack(Request::kAddMemReg, EncodeSingleRegion(mem_->Region()), One(mem_->Fd())),
                0u);
    } else {
      ASSERT_EQ(fe.Ack(Request::kSetMemTable, EncodeMemTable({mem_->Region()}), One(mem_->Fd())),
                0u);
    }
    SetUpRing(fe, 0, ring, fds, 0, send_enable);
  }

  void SetUpRing(FrontEnd& fe, uint32_t q, DriverRing& ring, QueueFds& fds, uint32_t base,
                 bool send_enable = true) {
    ASSERT_EQ(fe.Ack(Request::kSetVringNum, EncodeVringState({q, kQueueSize})), 0u);
    ASSERT_EQ(fe.Ack(Request::kSetVringBase, EncodeVringState({q, base})), 0u);
    ASSERT_EQ(fe.Ack(Request::kSetVringAddr, EncodeVringAddr(ring.Addr(q))), 0u);
    ASSERT_EQ(fe.Ack(Request::kSetVringCall, EncodeU64(q), One(UniqueFd(dup(fds.call.get())))), 0u);
    ASSERT_EQ(fe.Ack(Request::kSetVringKick, EncodeU64(q), One(UniqueFd(dup(fds.kick.get())))), 0u);
    if (send_enable) {
      ASSERT_EQ(fe.Ack(Request::kSetVringEnable, EncodeVringState({q, 1})), 0u);
    }
  }

  // Runs one request to completion; returns its status byte.
  uint8_t RunOne(DriverRing& ring, QueueFds& fds, BlkReq& r, uint32_t type, uint64_t sector,
                 const std::vector<uint8_t>& out, uint32_t in_len) {
    r = ring.Submit(type, sector, out, in_len);
    fds.Kick();
    EXPECT_TRUE(WaitUsed(ring, fds, ring.avail_idx())) << server_.Logs();
    return ring.Status(r);
  }

  std::vector<uint8_t> Disk(uint64_t offset, size_t len) {
    std::lock_guard<std::mutex> l(data_->mu);
    return std::vector<uint8_t>(data_->bytes.begin() + offset, data_->bytes.begin() + offset + len);
  }

  std::shared_ptr<MemFileData> data_;
  ServerThread server_;
  GuestRam ram_;
  GuestRam* mem_ = &ram_;  // the memory Handshake() shares
  std::unique_ptr<FrontEnd> fe_;
  uint64_t features_ = 0;
};

// ---- Negotiation and configuration ---------------------------------------------

TEST_F(VhostUserServerTest, NegotiatesFeaturesQueuesAndSlots) {
  StartPair(/*num_queues=*/3);
  uint64_t f = fe_->GetU64(Request::kGetFeatures);
  EXPECT_TRUE(f & (uint64_t{1} << vhost_user::kFProtocolFeatures));
  EXPECT_TRUE(f & FeatureBit(vblk::kFVersion1));
  EXPECT_TRUE(f & FeatureBit(vblk::kFFlush));
  EXPECT_TRUE(f & FeatureBit(vblk::kFMq));
  uint64_t proto = fe_->GetU64(Request::kGetProtocolFeatures);
  const uint64_t want = (1u << vhost_user::kProtocolFMq) | (1u << vhost_user::kProtocolFReplyAck) |
                        (1u << vhost_user::kProtocolFBackendReq) |
                        (1u << vhost_user::kProtocolFConfig) |
                        (1u << vhost_user::kProtocolFResetDevice) |
                        (1u << vhost_user::kProtocolFConfigureMemSlots);
  EXPECT_EQ(proto, want);
  fe_->Send(Request::kSetProtocolFeatures, EncodeU64(proto));
  EXPECT_EQ(fe_->GetU64(Request::kGetQueueNum), 3u);
  EXPECT_EQ(fe_->GetU64(Request::kGetMaxMemSlots), 32u);
  EXPECT_EQ(fe_->Ack(Request::kSetOwner), 0u);
}

TEST_F(VhostUserServerTest, ServesConfigSpaceAndTheWritebackField) {
  StartPair(2);
  uint64_t f = fe_->GetU64(Request::kGetFeatures);
  fe_->Send(Request::kSetProtocolFeatures, EncodeU64(fe_->GetU64(Request::kGetProtocolFeatures)));
  fe_->Send(Request::kGetConfig, EncodeConfig({0, 0, std::vector<uint8_t>(60)}));
  auto c = DecodeConfig(fe_->Recv(Request::kGetConfig));
  ASSERT_TRUE(c.ok());
  ASSERT_EQ(c->data.size(), 60u);
  uint64_t capacity;
  std::memcpy(&capacity, c->data.data() + vblk::kCfgCapacity, 8);
  EXPECT_EQ(capacity, kDiskSize / 512);
  uint16_t nq;
  std::memcpy(&nq, c->data.data() + vblk::kCfgNumQueues, 2);
  EXPECT_EQ(nq, 2u);
  EXPECT_EQ(c->data[vblk::kCfgWriteback], 1u);

  // Past the protocol's 256 bytes: the spec's error reply, an empty payload.
  fe_->Send(Request::kGetConfig, EncodeConfig({200, 0, std::vector<uint8_t>(100)}));
  EXPECT_TRUE(fe_->Recv(Request::kGetConfig).payload.empty());
  EXPECT_TRUE(server_.HasLog("GET_CONFIG refused: BadConfigAccess"));

  // Writeback is writable once CONFIG_WCE is negotiated; capacity never is.
  ASSERT_EQ(fe_->Ack(Request::kSetFeatures, EncodeU64(f)), 0u);
  EXPECT_EQ(fe_->Ack(Request::kSetConfig, EncodeConfig({vblk::kCfgWriteback, 0, {0}})), 0u);
  fe_->Send(Request::kGetConfig, EncodeConfig({vblk::kCfgWriteback, 0, {0xaa}}));
  auto wb = DecodeConfig(fe_->Recv(Request::kGetConfig));
  ASSERT_TRUE(wb.ok());
  EXPECT_EQ(wb->data, std::vector<uint8_t>{0});
  EXPECT_EQ(fe_->Ack(Request::kSetConfig, EncodeConfig({vblk::kCfgCapacity, 0, {1}})), 1u);
  EXPECT_TRUE(server_.HasLog("SET_CONFIG refused: DeviceRejected"));
}

TEST_F(VhostUserServerTest, ConfigChangeIsSentOnTheBackendChannel) {
  StartPair();
  const uint64_t proto = fe_->GetU64(Request::kGetProtocolFeatures);
  ASSERT_TRUE(proto & (1u << vhost_user::kProtocolFBackendReq));
  fe_->Send(Request::kSetProtocolFeatures, EncodeU64(proto));
  int sv[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  UniqueFd ours(sv[0]);
  ASSERT_EQ(fe_->Ack(Request::kSetBackendReqFd, {}, One(UniqueFd(sv[1]))), 0u);
  server_.NotifyConfigChange();
  auto m = vhost_user::ReadMessageBlocking(ours.get(), kTimeoutMs);
  ASSERT_TRUE(m.ok()) << vhost_user::VhostUserErrorName(m.error());
  EXPECT_EQ(m->request, vhost_user::kBackendConfigChangeMsg);
  EXPECT_EQ(m->flags, vhost_user::kVersion);  // no NEED_REPLY
  EXPECT_TRUE(m->payload.empty());
  EXPECT_TRUE(m->fds.empty());
}

TEST_F(VhostUserServerTest, BackendChannelNeedsItsProtocolFeature) {
  StartPair();
  fe_->Send(Request::kSetProtocolFeatures, EncodeU64((1u << vhost_user::kProtocolFReplyAck) |
                                                     (1u << vhost_user::kProtocolFConfig)));
  int sv[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  UniqueFd ours(sv[0]);
  EXPECT_EQ(fe_->Ack(Request::kSetBackendReqFd, {}, One(UniqueFd(sv[1]))), 1u);
  EXPECT_TRUE(server_.HasLog("SET_BACKEND_REQ_FD refused: ProtocolFeatureNotNegotiated"));
  // Without a channel a config change goes nowhere, and nothing breaks.
  server_.NotifyConfigChange();
  EXPECT_EQ(fe_->GetU64(Request::kGetQueueNum), 1u);
}

TEST_F(VhostUserServerTest, ConfigNeedsTheConfigProtocolFeature) {
  StartPair();
  fe_->Send(Request::kSetProtocolFeatures, EncodeU64(1u << vhost_user::kProtocolFReplyAck));
  fe_->Send(Request::kGetConfig, EncodeConfig({0, 0, std::vector<uint8_t>(8)}));
  EXPECT_TRUE(fe_->Recv(Request::kGetConfig).payload.empty());
  EXPECT_TRUE(server_.HasLog("GET_CONFIG refused: ProtocolFeatureNotNegotiated"));
}

// ---- The data path -------------------------------------------------------------------

TEST_F(VhostUserServerTest, WritesReadsAndFlushesThroughTheRing) {
  StartPair();
  DriverRing ring(ram_, kGuestBase);
  QueueFds fds;
  Handshake(*fe_, ring, fds);

  std::vector<uint8_t> pattern = PatternBytes(4096, 11);
  BlkReq r;
  EXPECT_EQ(RunOne(ring, fds, r, vblk::kTypeOut, 8, pattern, 0), vblk::kStatusOk);
  EXPECT_EQ(Disk(8 * 512, 4096), pattern);

  EXPECT_EQ(RunOne(ring, fds, r, vblk::kTypeIn, 8, {}, 4096), vblk::kStatusOk);
  EXPECT_EQ(ring.Data(r), pattern);

  EXPECT_EQ(RunOne(ring, fds, r, vblk::kTypeGetId, 0, {}, vblk::kIdBytes), vblk::kStatusOk);
  std::vector<uint8_t> id = ring.Data(r);
  EXPECT_EQ(std::string(id.begin(), id.begin() + 17), "vhost-user-serial");

  EXPECT_EQ(RunOne(ring, fds, r, vblk::kTypeFlush, 0, {}, 0), vblk::kStatusOk);
  // A request past the end is the guest's problem: IOERR, and the ring goes on.
  EXPECT_EQ(RunOne(ring, fds, r, vblk::kTypeIn, kDiskSize / 512, {}, 512), vblk::kStatusIoErr);
  EXPECT_EQ(RunOne(ring, fds, r, vblk::kTypeIn, 0, {}, 512), vblk::kStatusOk);
}

TEST_F(VhostUserServerTest, AddMemRegBuildsTheTableAndRemMemRegChecksIt) {
  StartPair();
  DriverRing ring(ram_, kGuestBase);
  QueueFds fds;
  Handshake(*fe_, ring, fds, true, true, /*add_mem_reg=*/true);
  std::vector<uint8_t> pattern = PatternBytes(1024, 5);
  BlkReq r;
  EXPECT_EQ(RunOne(ring, fds, r, vblk::kTypeOut, 0, pattern, 0), vblk::kStatusOk);
  EXPECT_EQ(Disk(0, 1024), pattern);

  MemoryRegionDesc other{0x80000000, 4096, 0x1000, 0};
  EXPECT_EQ(fe_->Ack(Request::kRemMemReg, EncodeSingleRegion(other)), 1u);
  EXPECT_TRUE(server_.HasLog("REM_MEM_REG refused: RegionNotFound"));
  // Overlapping the mapped region in guest physical space.
  MemoryRegionDesc overlap = ram_.Region();
  overlap.userspace_addr += kGuestSize;
  EXPECT_EQ(fe_->Ack(Request::kAddMemReg, EncodeSingleRegion(overlap), One(ram_.Fd())), 1u);
  EXPECT_TRUE(server_.HasLog("ADD_MEM_REG refused: RegionOverlap"));
  // The ring still works.
  EXPECT_EQ(RunOne(ring, fds, r, vblk::kTypeIn, 0, {}, 1024), vblk::kStatusOk);
  EXPECT_EQ(ring.Data(r), pattern);
}

TEST_F(VhostUserServerTest, GetVringBaseStopsTheRingAndReturnsTheNextAvailIndex) {
  StartPair();
  DriverRing ring(ram_, kGuestBase);
  QueueFds fds;
  Handshake(*fe_, ring, fds);
  BlkReq r;
  for (int i = 0; i < 3; ++i) {
    ASSERT_EQ(RunOne(ring, fds, r, vblk::kTypeIn, i, {}, 512), vblk::kStatusOk);
  }
  fe_->Send(Request::kGetVringBase, EncodeVringState({0, 0}));
  auto base = DecodeVringState(fe_->Recv(Request::kGetVringBase));
  ASSERT_TRUE(base.ok());
  EXPECT_EQ(base->index, 0u);
  EXPECT_EQ(base->num, 3u);

  // Stopped: a request and a kick on the old fd are not processed.
  r = ring.Submit(vblk::kTypeIn, 5, {}, 512);
  fds.Kick();
  EXPECT_EQ(fe_->GetU64(Request::kGetQueueNum), 1u);  // a round trip through the loop
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_EQ(ring.UsedIdx(), 3u);

  // Restarted where it stopped: the pending request completes.
  QueueFds fds2;
  SetUpRing(*fe_, 0, ring, fds2, static_cast<uint32_t>(base->num));
  EXPECT_TRUE(WaitUsed(ring, fds2, 4)) << server_.Logs();
  EXPECT_EQ(ring.Status(r), vblk::kStatusOk);
  fe_->Send(Request::kGetVringBase, EncodeVringState({0, 0}));
  EXPECT_EQ(DecodeVringState(fe_->Recv(Request::kGetVringBase))->num, 4u);
}

TEST_F(VhostUserServerTest, RingWaitsForEnableWhenProtocolFeaturesAreAcked) {
  StartPair();
  DriverRing ring(ram_, kGuestBase);
  QueueFds fds;
  Handshake(*fe_, ring, fds, /*ack_protocol_bit=*/true, /*send_enable=*/false);
  BlkReq r = ring.Submit(vblk::kTypeIn, 0, {}, 512);
  fds.Kick();
  EXPECT_EQ(fe_->GetU64(Request::kGetQueueNum), 1u);
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_EQ(ring.UsedIdx(), 0u);  // started but disabled: untouched
  ASSERT_EQ(fe_->Ack(Request::kSetVringEnable, EncodeVringState({0, 1})), 0u);
  EXPECT_TRUE(WaitUsed(ring, fds, 1)) << server_.Logs();
  EXPECT_EQ(ring.Status(r), vblk::kStatusOk);
}

TEST_F(VhostUserServerTest, RingStartsAtKickWithoutProtocolFeatures) {
  StartPair();
  DriverRing ring(ram_, kGuestBase);
  QueueFds fds;
  Handshake(*fe_, ring, fds, /*ack_protocol_bit=*/false, /*send_enable=*/false);
  BlkReq r;
  EXPECT_EQ(RunOne(ring, fds, r, vblk::kTypeIn, 0, {}, 512), vblk::kStatusOk);
}

TEST_F(VhostUserServerTest, ServesSeveralQueues) {
  StartPair(/*num_queues=*/2);
  DriverRing ring0(ram_, kGuestBase);
  DriverRing ring1(ram_, kGuestBase + 0x100000);
  QueueFds fds0, fds1;
  Handshake(*fe_, ring0, fds0);
  SetUpRing(*fe_, 1, ring1, fds1, 0);
  std::vector<uint8_t> a = PatternBytes(512, 1), b = PatternBytes(512, 2);
  BlkReq r0 = ring0.Submit(vblk::kTypeOut, 0, a, 0);
  BlkReq r1 = ring1.Submit(vblk::kTypeOut, 1, b, 0);
  fds0.Kick();
  fds1.Kick();
  EXPECT_TRUE(WaitUsed(ring0, fds0, 1));
  EXPECT_TRUE(WaitUsed(ring1, fds1, 1));
  EXPECT_EQ(ring0.Status(r0), vblk::kStatusOk);
  EXPECT_EQ(ring1.Status(r1), vblk::kStatusOk);
  EXPECT_EQ(Disk(0, 512), a);
  EXPECT_EQ(Disk(512, 512), b);
}

TEST_F(VhostUserServerTest, ResetDeviceStopsRingsAndAllowsANewSetup) {
  StartPair();
  DriverRing ring(ram_, kGuestBase);
  QueueFds fds;
  Handshake(*fe_, ring, fds);
  BlkReq r;
  ASSERT_EQ(RunOne(ring, fds, r, vblk::kTypeIn, 0, {}, 512), vblk::kStatusOk);
  ASSERT_EQ(fe_->Ack(Request::kResetDevice), 0u);
  fe_->Send(Request::kGetVringBase, EncodeVringState({0, 0}));
  EXPECT_EQ(DecodeVringState(fe_->Recv(Request::kGetVringBase))->num, 0u);  // forgotten
  // Set up again from scratch, continuing the driver's ring indices.
  ASSERT_EQ(fe_->Ack(Request::kSetFeatures, EncodeU64(features_)), 0u);
  QueueFds fds2;
  SetUpRing(*fe_, 0, ring, fds2, ring.avail_idx());
  EXPECT_EQ(RunOne(ring, fds2, r, vblk::kTypeIn, 0, {}, 512), vblk::kStatusOk);
}

// ---- Refusals ----------------------------------------------------------------------

TEST_F(VhostUserServerTest, RefusedRequestsAreNackedAndTheConnectionGoesOn) {
  StartPair();
  fe_->Send(Request::kSetProtocolFeatures, EncodeU64(fe_->GetU64(Request::kGetProtocolFeatures)));
  struct Case {
    Request request;
    std::vector<uint8_t> payload;
    int fds;
    const char* log;
  };
  MemoryRegionDesc too_big = ram_.Region();
  too_big.memory_size = kGuestSize * 2;  // larger than the memfd
  MemoryRegionDesc a{kGuestBase, 0x100000, 0x10000000, 0};
  MemoryRegionDesc b{kGuestBase + 0x80000, 0x100000, 0x20000000, 0};  // overlaps a in gpa
  VringAddr logged;
  logged.flags = vhost_user::kVringFLog;
  std::vector<Case> cases = {
      {Request::kSetVringNum, EncodeVringState({5, 16}), 0,
       "SET_VRING_NUM refused: InvalidQueueIndex"},
      {Request::kSetVringNum, EncodeVringState({0, 24}), 0,
       "SET_VRING_NUM refused: InvalidQueueSize"},
      {Request::kSetVringNum, EncodeVringState({0, 65536}), 0,
       "SET_VRING_NUM refused: InvalidQueueSize"},
      {Request::kSetVringBase, {0, 0, 0, 0}, 0, "SET_VRING_BASE refused: WrongPayloadSize"},
      {Request::kSetVringBase, EncodeVringState({0, 0x10000}), 0,
       "SET_VRING_BASE refused: InvalidValue"},
      {Request::kSetVringEnable, EncodeVringState({0, 2}), 0,
       "SET_VRING_ENABLE refused: InvalidValue"},
      {Request::kSetVringAddr, EncodeVringAddr(logged), 0,
       "SET_VRING_ADDR refused: LoggingNotSupported"},
      {Request::kSetVringKick, EncodeU64(vhost_user::kVringNoFdMask), 0,
       "SET_VRING_KICK refused: PollingNotSupported"},
      {Request::kSetVringCall, EncodeU64(0), 0, "SET_VRING_CALL refused: WrongFdCount"},
      {Request::kSetVringCall, EncodeU64(0x200), 1, "SET_VRING_CALL refused: InvalidValue"},
      {Request::kSetFeatures, EncodeU64(uint64_t{1} << 63), 0,
       "SET_FEATURES refused: FeatureNotOffered"},
      {Request::kSetFeatures, EncodeU64(0), 0, "SET_FEATURES refused: DeviceRejected"},
      {Request::kSetProtocolFeatures, EncodeU64(1u << vhost_user::kProtocolFLogShmfd), 0,
       "SET_PROTOCOL_FEATURES refused: FeatureNotOffered"},
      {Request::kSetLogBase, EncodeU64(0), 1, "SET_LOG_BASE refused: UnsupportedRequest"},
      {Request::kSetMemTable, EncodeMemTable({too_big}), 1, "SET_MEM_TABLE refused: BadRegion"},
      {Request::kSetMemTable, EncodeMemTable({a, b}), 2, "SET_MEM_TABLE refused: RegionOverlap"},
      {Request::kSetMemTable, EncodeMemTable({}), 0, "SET_MEM_TABLE refused: EmptyMemoryTable"},
  };
  for (Case& c : cases) {
    std::vector<UniqueFd> fds;
    for (int i = 0; i < c.fds; ++i) fds.push_back(ram_.Fd());
    EXPECT_EQ(fe_->Ack(c.request, c.payload, std::move(fds)), 1u) << c.log;
    EXPECT_TRUE(server_.HasLog(c.log)) << c.log << "\n" << server_.Logs();
  }
  // Without need_reply a refusal is only logged, and the connection goes on.
  fe_->Send(Request::kSetVringNum, EncodeVringState({7, 16}));
  EXPECT_EQ(fe_->GetU64(Request::kGetQueueNum), 1u);
}

TEST_F(VhostUserServerTest, UnknownRequestClosesTheConnection) {
  StartPair();
  fe_->Send(Request::kSetProtocolFeatures, EncodeU64(fe_->GetU64(Request::kGetProtocolFeatures)));
  fe_->SendRaw(99, vhost_user::kVersion | vhost_user::kFlagNeedReply, {});
  EXPECT_TRUE(fe_->SeesClose());
  EXPECT_TRUE(server_.WaitRun().ok());
  EXPECT_TRUE(server_.HasLog("UNKNOWN refused: UnknownRequest (request 99)")) << server_.Logs();
}

TEST_F(VhostUserServerTest, RefusedRequestWithReplyBodyClosesTheConnection) {
  StartPair();
  fe_->Send(Request::kGetVringBase, EncodeVringState({9, 0}));
  EXPECT_TRUE(fe_->SeesClose());
  EXPECT_TRUE(server_.HasLog("GET_VRING_BASE refused: InvalidQueueIndex")) << server_.Logs();
}

TEST_F(VhostUserServerTest, FramingErrorClosesTheConnection) {
  StartPair();
  fe_->SendRaw(1, /*flags=*/2, {});
  EXPECT_TRUE(fe_->SeesClose());
  EXPECT_TRUE(server_.HasLog("closing the connection: BadVersion")) << server_.Logs();
}

TEST_F(VhostUserServerTest, DisconnectWithRequestsQueuedEndsCleanly) {
  StartPair();
  DriverRing ring(ram_, kGuestBase);
  QueueFds fds;
  Handshake(*fe_, ring, fds);
  std::vector<uint8_t> pattern = PatternBytes(4096, 9);
  ring.Submit(vblk::kTypeOut, 16, pattern, 0);
  ring.Submit(vblk::kTypeOut, 24, pattern, 0);
  fds.Kick();
  fe_->Close();
  EXPECT_TRUE(server_.WaitRun().ok());
  EXPECT_TRUE(server_.HasLog("front end disconnected"));
}

// ---- Listening, reconnecting, stopping ----------------------------------------------

TEST_F(VhostUserServerTest, ServesOneFrontEndAfterAnotherAndRemovesTheSocket) {
  TempDir dir;
  const std::string path = dir.File("vhost.sock");
  VhostUserServerOptions opts;
  opts.socket_path = path;
  ASSERT_TRUE(server_.Start(std::move(opts)).ok());
  struct stat st;
  ASSERT_EQ(stat(path.c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));

  std::vector<uint8_t> pattern = PatternBytes(2048, 21);
  {
    FrontEnd fe(Connect(path));
    DriverRing ring(ram_, kGuestBase);
    QueueFds fds;
    Handshake(fe, ring, fds);
    BlkReq r;
    EXPECT_EQ(RunOne(ring, fds, r, vblk::kTypeOut, 100, pattern, 0), vblk::kStatusOk);
  }  // disconnects
  {
    GuestRam ram2;  // a new front end, new memory
    mem_ = &ram2;
    FrontEnd fe(Connect(path));
    DriverRing ring(ram2, kGuestBase);
    QueueFds fds;
    Handshake(fe, ring, fds);
    BlkReq r;
    EXPECT_EQ(RunOne(ring, fds, r, vblk::kTypeIn, 100, {}, 2048), vblk::kStatusOk);
    EXPECT_EQ(ring.Data(r), pattern);
    mem_ = &ram_;
  }
  server_.StopAndJoin();
  EXPECT_TRUE(server_.WaitRun().ok());
  EXPECT_EQ(server_.served(), 2);
  EXPECT_NE(stat(path.c_str(), &st), 0);  // removed
}

TEST_F(VhostUserServerTest, StopEndsAConnectedSession) {
  TempDir dir;
  VhostUserServerOptions opts;
  opts.socket_path = dir.File("s.sock");
  ASSERT_TRUE(server_.Start(std::move(opts)).ok());
  FrontEnd fe(Connect(dir.File("s.sock")));
  DriverRing ring(ram_, kGuestBase);
  QueueFds fds;
  Handshake(fe, ring, fds);
  server_.StopAndJoin();
  EXPECT_TRUE(fe.SeesClose());
  EXPECT_TRUE(server_.WaitRun().ok());
}

TEST_F(VhostUserServerTest, OnceReturnsAfterTheFirstConnection) {
  TempDir dir;
  VhostUserServerOptions opts;
  opts.socket_path = dir.File("once.sock");
  opts.once = true;
  ASSERT_TRUE(server_.Start(std::move(opts)).ok());
  {
    FrontEnd fe(Connect(dir.File("once.sock")));
    EXPECT_EQ(fe.GetU64(Request::kGetQueueNum), 1u);
  }
  EXPECT_TRUE(server_.WaitRun().ok());
}

TEST(VhostUserServerCreate, RefusesASocketPathInUseOrNotASocket) {
  TempDir dir;
  auto data = std::make_shared<MemFileData>();
  data->bytes.resize(kDiskSize);
  auto disk = RawDevice::Open(std::make_unique<MemFile>(data, "d.img"));
  ASSERT_TRUE(disk.ok());
  VhostUserServerOptions opts;
  opts.log = [](const std::string&) {};
  opts.socket_path = dir.File("a.sock");
  auto first = VhostUserServer::Create(**disk, opts);
  ASSERT_TRUE(first.ok()) << first.status().ToString();
  auto second = VhostUserServer::Create(**disk, opts);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), StatusCode::kBusy);

  opts.socket_path = dir.File("file");
  ASSERT_EQ(testing::Sh("touch " + opts.socket_path).exit_code, 0);
  auto third = VhostUserServer::Create(**disk, opts);
  ASSERT_FALSE(third.ok());
  EXPECT_EQ(third.status().code(), StatusCode::kInvalidArgument);

  // A stale socket (nobody listening) is replaced.
  opts.socket_path = dir.File("stale.sock");
  {
    UniqueFd s(socket(AF_UNIX, SOCK_STREAM, 0));
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, opts.socket_path.c_str(), sizeof addr.sun_path - 1);
    ASSERT_EQ(bind(s.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  }
  auto fourth = VhostUserServer::Create(**disk, opts);
  EXPECT_TRUE(fourth.ok()) << fourth.status().ToString();

  opts.socket_path = dir.File("q.sock");
  opts.device.num_queues = 257;
  auto fifth = VhostUserServer::Create(**disk, opts);
  ASSERT_FALSE(fifth.ok());
  EXPECT_EQ(fifth.status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvblk
