#include "tests/support/vhost_user_server_fixture.h"

#include <sys/socket.h>
#include <unistd.h>

#include <chrono>

#include "disk/raw_device.h"
#include "tests/support/test_util.h"

namespace kvblk::testing {

using vhost_user::EncodeMemTable;
using vhost_user::EncodeSingleRegion;
using vhost_user::EncodeU64;
using vhost_user::EncodeVringAddr;
using vhost_user::EncodeVringState;
using vhost_user::Request;
using vhost_user::UniqueFd;

// ---- The server on its own thread ---------------------------------------------

ServerThread::~ServerThread() {
  if (thread_.joinable()) StopAndJoin();
}

Status ServerThread::Start(VhostUserServerOptions opts) {
  std::promise<Status> created;
  auto created_f = created.get_future();
  thread_ = std::thread([this, opts = std::move(opts), &created]() mutable {
    // Declared first, so it outlives the server and the disk.
    std::unique_ptr<EventLoop> loop;
    if (make_engine_) {
      loop = std::make_unique<EventLoop>(make_engine_());
      EventLoop::SetCurrent(loop.get());
    }
    struct Uninstall {
      bool installed;
      ~Uninstall() {
        if (installed) EventLoop::SetCurrent(nullptr);
      }
    } uninstall{loop != nullptr};
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

Status ServerThread::WaitRun() {
  if (run_done_f_.wait_for(std::chrono::milliseconds(kTimeoutMs)) != std::future_status::ready) {
    return Status(StatusCode::kIoError, "Run() did not return");
  }
  return run_done_f_.get();
}

void ServerThread::StopAndJoin() {
  if (!thread_.joinable()) return;
  if (server_ != nullptr) server_->Stop();
  release_.set_value();
  thread_.join();
}

bool ServerThread::HasLog(const std::string& needle) {
  std::lock_guard<std::mutex> l(mu_);
  for (const std::string& line : logs_) {
    if (line.find(needle) != std::string::npos) return true;
  }
  return false;
}

std::string ServerThread::Logs() {
  std::lock_guard<std::mutex> l(mu_);
  std::string out;
  for (const std::string& line : logs_) out += line + "\n";
  return out;
}

// ---- The fixture ------------------------------------------------------------------

VhostUserServerTest::VhostUserServerTest()
    : data_(std::make_shared<MemFileData>()), server_(data_) {
  data_->bytes = PatternBytes(kDiskSize, 3);
}

void VhostUserServerTest::StartPair(int num_queues, int iothreads) {
  int sv[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  VhostUserServerOptions opts;
  opts.connection_fd = sv[1];
  opts.device.num_queues = num_queues;
  opts.iothreads = iothreads;
  opts.device.serial = "vhost-user-serial";
  ASSERT_TRUE(server_.Start(std::move(opts)).ok());
  fe_ = std::make_unique<FrontEnd>(UniqueFd(sv[0]));
}

void VhostUserServerTest::Handshake(FrontEnd& fe, DriverRing& ring, QueueFds& fds,
                                    bool ack_protocol_bit, bool send_enable, bool add_mem_reg) {
  features_ = fe.GetU64(Request::kGetFeatures);
  ASSERT_TRUE(features_ & (uint64_t{1} << vhost_user::kFProtocolFeatures));
  uint64_t proto = fe.GetU64(Request::kGetProtocolFeatures);
  fe.Send(Request::kSetProtocolFeatures, EncodeU64(proto));
  fe.Send(Request::kSetOwner);
  uint64_t acked = features_;
  if (!ack_protocol_bit) acked &= ~(uint64_t{1} << vhost_user::kFProtocolFeatures);
  ASSERT_EQ(fe.Ack(Request::kSetFeatures, EncodeU64(acked)), 0u);
  if (add_mem_reg) {
    ASSERT_EQ(fe.Ack(Request::kAddMemReg, EncodeSingleRegion(mem_->Region()), One(mem_->Fd())), 0u);
  } else {
    ASSERT_EQ(fe.Ack(Request::kSetMemTable, EncodeMemTable({mem_->Region()}), One(mem_->Fd())), 0u);
  }
  SetUpRing(fe, 0, ring, fds, 0, send_enable);
}

void VhostUserServerTest::SetUpRing(FrontEnd& fe, uint32_t q, DriverRing& ring, QueueFds& fds,
                                    uint32_t base, bool send_enable) {
  ASSERT_EQ(fe.Ack(Request::kSetVringNum, EncodeVringState({q, kQueueSize})), 0u);
  ASSERT_EQ(fe.Ack(Request::kSetVringBase, EncodeVringState({q, base})), 0u);
  ASSERT_EQ(fe.Ack(Request::kSetVringAddr, EncodeVringAddr(ring.Addr(q))), 0u);
  ASSERT_EQ(fe.Ack(Request::kSetVringCall, EncodeU64(q), One(UniqueFd(dup(fds.call.get())))), 0u);
  ASSERT_EQ(fe.Ack(Request::kSetVringKick, EncodeU64(q), One(UniqueFd(dup(fds.kick.get())))), 0u);
  if (send_enable) {
    ASSERT_EQ(fe.Ack(Request::kSetVringEnable, EncodeVringState({q, 1})), 0u);
  }
}

uint8_t VhostUserServerTest::RunOne(DriverRing& ring, QueueFds& fds, BlkReq& r, uint32_t type,
                                    uint64_t sector, const std::vector<uint8_t>& out,
                                    uint32_t in_len) {
  r = ring.Submit(type, sector, out, in_len);
  fds.Kick();
  EXPECT_TRUE(WaitUsed(ring, fds, ring.avail_idx())) << server_.Logs();
  return ring.Status(r);
}

void VhostUserServerTest::ReadSectors(DriverRing& ring, QueueFds& fds, int n) {
  BlkReq r;
  for (int i = 0; i < n; ++i) {
    ASSERT_EQ(RunOne(ring, fds, r, vblk::kTypeIn, static_cast<uint64_t>(i), {}, 512),
              vblk::kStatusOk)
        << "read " << i << "\n" << server_.Logs();
  }
}

void VhostUserServerTest::ExpectKickIgnored(QueueFds& kick, DriverRing& ring, uint16_t used) {
  kick.Kick();
  EXPECT_EQ(fe_->GetU64(Request::kGetQueueNum), 1u);  // a round trip through the loop
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_EQ(ring.UsedIdx(), used);
}

std::vector<uint8_t> VhostUserServerTest::Disk(uint64_t offset, size_t len) {
  std::lock_guard<std::mutex> l(data_->mu);
  return std::vector<uint8_t>(data_->bytes.begin() + offset, data_->bytes.begin() + offset + len);
}

}  // namespace kvblk::testing
