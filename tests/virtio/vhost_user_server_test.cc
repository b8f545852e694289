// VhostUserServer end to end, negotiation and the data path: a minimal front
// end in the test talks the vhost-user protocol over a socketpair, shares
// guest RAM as a memfd, lays out a split virtqueue in it, kicks through an
// eventfd and waits for the call eventfd, while the server runs on its own
// thread over a RawDevice on a MemFile (tests/support/vhost_user_*).
// Refusals and connection handling: vhost_user_server_session_test.cc.
#include "virtio/vhost_user_server.h"

#include <gtest/gtest.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "disk/io_engine.h"
#include "tests/support/test_util.h"
#include "tests/support/vhost_user_front_end.h"
#include "tests/support/vhost_user_server_fixture.h"
#include "virtio/eventfd_watch.h"

namespace kvblk {
namespace {

using testing::BlkReq;
using testing::DriverRing;
using testing::kDiskSize;
using testing::kGuestBase;
using testing::kGuestSize;
using testing::kTimeoutMs;
using testing::One;
using testing::PatternBytes;
using testing::QueueFds;
using testing::VhostUserServerTest;
using testing::WaitUsed;
using vblk::FeatureBit;
using vhost_user::DecodeConfig;
using vhost_user::DecodeVringState;
using vhost_user::EncodeConfig;
using vhost_user::EncodeSingleRegion;
using vhost_user::EncodeU64;
using vhost_user::EncodeVringState;
using vhost_user::MemoryRegionDesc;
using vhost_user::Request;
using vhost_user::UniqueFd;

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
  ASSERT_NO_FATAL_FAILURE(ReadSectors(ring, fds, 3));
  fe_->Send(Request::kGetVringBase, EncodeVringState({0, 0}));
  auto base = DecodeVringState(fe_->Recv(Request::kGetVringBase));
  ASSERT_TRUE(base.ok());
  EXPECT_EQ(base->index, 0u);
  EXPECT_EQ(base->num, 3u);

  // Stopped: a request and a kick on the old fd are not processed.
  BlkReq r = ring.Submit(vblk::kTypeIn, 5, {}, 512);
  ExpectKickIgnored(fds, ring, 3);

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
  ExpectKickIgnored(fds, ring, 0);  // started but disabled: untouched
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

// Each queue's kicks are read in its own I/O thread's ring.
TEST_F(VhostUserServerTest, ServesQueuesOnSeveralIoThreads) {
  StartPair(/*num_queues=*/3, /*iothreads=*/2);
  DriverRing ring0(ram_, kGuestBase);
  DriverRing ring1(ram_, kGuestBase + 0x100000);
  DriverRing ring2(ram_, kGuestBase + 0x200000);
  QueueFds fds0, fds1, fds2;
  Handshake(*fe_, ring0, fds0);
  SetUpRing(*fe_, 1, ring1, fds1, 0);
  SetUpRing(*fe_, 2, ring2, fds2, 0);
  for (int round = 0; round < 3; ++round) {
    std::vector<uint8_t> a = PatternBytes(512, 10 + round), b = PatternBytes(512, 20 + round),
                         c = PatternBytes(512, 30 + round);
    BlkReq r0 = ring0.Submit(vblk::kTypeOut, 0, a, 0);
    BlkReq r1 = ring1.Submit(vblk::kTypeOut, 1, b, 0);
    BlkReq r2 = ring2.Submit(vblk::kTypeOut, 2, c, 0);
    fds0.Kick();
    fds1.Kick();
    fds2.Kick();
    const uint16_t n = static_cast<uint16_t>(round + 1);
    ASSERT_TRUE(WaitUsed(ring0, fds0, n)) << server_.Logs();
    ASSERT_TRUE(WaitUsed(ring1, fds1, n)) << server_.Logs();
    ASSERT_TRUE(WaitUsed(ring2, fds2, n)) << server_.Logs();
    EXPECT_EQ(ring0.Status(r0), vblk::kStatusOk);
    EXPECT_EQ(ring1.Status(r1), vblk::kStatusOk);
    EXPECT_EQ(ring2.Status(r2), vblk::kStatusOk);
    EXPECT_EQ(Disk(0, 512), a);
    EXPECT_EQ(Disk(512, 512), b);
    EXPECT_EQ(Disk(1024, 512), c);
  }
}

// SET_VRING_KICK on a running ring: the new eventfd is heard and the old
// one no longer is.
TEST_F(VhostUserServerTest, ReplacedKickFdIsNoLongerHeard) {
  StartPair(/*num_queues=*/1, /*iothreads=*/2);
  DriverRing ring(ram_, kGuestBase);
  QueueFds fds;
  Handshake(*fe_, ring, fds);
  BlkReq r;
  ASSERT_EQ(RunOne(ring, fds, r, vblk::kTypeIn, 0, {}, 512), vblk::kStatusOk);
  QueueFds fresh;
  ASSERT_EQ(fe_->Ack(Request::kSetVringKick, EncodeU64(0), One(UniqueFd(dup(fresh.kick.get())))),
            0u);
  r = ring.Submit(vblk::kTypeIn, 1, {}, 512);
  ExpectKickIgnored(fds, ring, 1);  // the old eventfd
  fresh.Kick();
  EXPECT_TRUE(WaitUsed(ring, fds, 2)) << server_.Logs();
  EXPECT_EQ(ring.Status(r), vblk::kStatusOk);
}

// A kick descriptor that is not an eventfd (a pipe) is watched by the
// poller thread instead, and works the same.
TEST_F(VhostUserServerTest, KickThroughAPipeWorks) {
  StartPair();
  DriverRing ring(ram_, kGuestBase);
  QueueFds fds;
  int p[2];
  ASSERT_EQ(pipe2(p, O_CLOEXEC), 0);
  fds.kick.Reset(p[0]);  // what Handshake sends
  Handshake(*fe_, ring, fds);
  fds.kick.Reset(p[1]);  // what Kick() writes to
  ASSERT_NO_FATAL_FAILURE(ReadSectors(ring, fds, 3));
}

// The io_uring engine, except that every read of an eventfd fails with
// EAGAIN, as on a kernel that will not poll one for io_uring.
class EventfdReadsFail final : public IoEngine {
 public:
  EventfdReadsFail() : inner_(MakeUringEngine(64, nullptr)) {}
  void Submit(IoOp* op) override {
    if (op->kind == IoOp::Kind::kReadv && IsEventfd(op->fd)) {
      failed_.push_back(op);
      ++reads_failed;
      return;
    }
    inner_->Submit(op);
  }
  int Reap(bool wait) override {
    if (failed_.empty()) return inner_->Reap(wait);
    std::vector<IoOp*> ops;
    ops.swap(failed_);
    for (IoOp* op : ops) {
      op->result = -EAGAIN;
      op->Complete();
    }
    return static_cast<int>(ops.size()) + inner_->Reap(false);
  }
  void Wake() override { inner_->Wake(); }
  int inflight() const override { return inner_->inflight() + static_cast<int>(failed_.size()); }
  const char* name() const override { return "io_uring, eventfd reads failing"; }
  bool polls_descriptors() const override { return true; }

  static inline std::atomic<int> reads_failed{0};

 private:
  std::unique_ptr<IoEngine> inner_;
  std::vector<IoOp*> failed_;
};

// A kick eventfd the queue's ring cannot read: the server says so and
// watches it on the poller thread, and the ring is served as before.
TEST_F(VhostUserServerTest, KickReadFailureMovesTheQueueToThePoller) {
  EventfdReadsFail::reads_failed = 0;
  server_.SetEngine([] { return std::make_unique<EventfdReadsFail>(); });
  StartPair();
  DriverRing ring(ram_, kGuestBase);
  QueueFds fds;
  Handshake(*fe_, ring, fds);
  ASSERT_NO_FATAL_FAILURE(ReadSectors(ring, fds, 3));
  EXPECT_EQ(EventfdReadsFail::reads_failed, 1);
  EXPECT_TRUE(server_.HasLog("queue 0: reading its kick eventfd in the ring failed")) << server_.Logs();
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

}  // namespace
}  // namespace kvblk
