// VhostUserServer end to end, sessions: requests it refuses (with a NACK
// and the connection going on, or by closing it), disconnects, serving one
// front end after another on a listening socket, Stop() and `once`, and the
// checks Create() makes on the socket path. The front end and the server
// thread are those of tests/support/vhost_user_*; negotiation and the data
// path: vhost_user_server_test.cc.
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "disk/mem_file.h"
#include "disk/raw_device.h"
#include "tests/support/test_util.h"
#include "tests/support/vhost_user_front_end.h"
#include "tests/support/vhost_user_server_fixture.h"
#include "virtio/vhost_user_server.h"

namespace kvblk {
namespace {

using testing::BlkReq;
using testing::Connect;
using testing::DriverRing;
using testing::FrontEnd;
using testing::GuestRam;
using testing::kDiskSize;
using testing::kGuestBase;
using testing::kGuestSize;
using testing::PatternBytes;
using testing::QueueFds;
using testing::TempDir;
using testing::VhostUserServerTest;
using vhost_user::EncodeMemTable;
using vhost_user::EncodeU64;
using vhost_user::EncodeVringAddr;
using vhost_user::EncodeVringState;
using vhost_user::MemoryRegionDesc;
using vhost_user::Request;
using vhost_user::UniqueFd;
using vhost_user::VringAddr;

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
