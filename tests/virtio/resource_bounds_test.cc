// Resource bounds on the device side: what a guest or a vhost-user front
// end controls cannot make kvblk allocate without bound, and a guest that
// floods one virtqueue cannot starve another.
//
// Caps: descriptors per chain (max(queue size, seg_max + 2)), whatever the
// size of an indirect table; bytes per chain (4 GiB - 1); DISCARD /
// WRITE_ZEROES segments per request (max_*_seg); vhost-user payloads
// (kMaxPayloadSize, checked before the payload is read; tested in
// vhost_user_protocol_test.cc), descriptors per message (kMaxFds), regions
// per memory table (8) and memory slots (max_mem_slots), config accesses
// (256 bytes), the 96-byte config space.
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>

#include "disk/mem_file.h"
#include "disk/raw_device.h"
#include "kvblk/event_loop.h"
#include "tests/support/test_util.h"
#include "tests/support/virtio_fake_driver.h"
#include "virtio/blk_device.h"
#include "virtio/blk_request.h"
#include "virtio/guest_memory.h"
#include "virtio/vhost_user_memory.h"
#include "virtio/vhost_user_protocol.h"
#include "virtio/virtqueue.h"

namespace kvblk {
namespace {

using testing::BlkSegment;
using testing::BlkStatus;
using testing::FakeBlkRequest;
using testing::FakeGuest;
using testing::FakeVirtqueue;
using testing::SubmitBlk;
using vhost_user::MemoryRegionDesc;
using vhost_user::Message;
using vhost_user::Request;
using vhost_user::UniqueFd;
using vhost_user::VhostUserError;
using vhost_user::VhostUserMemory;

constexpr uint16_t kQueueSize = 16;

class ChainBounds : public ::testing::Test {
 protected:
  void SetUp() override {
    auto mem = GuestMemory::Create({guest_.region()});
    ASSERT_TRUE(mem.ok());
    mem_ = *mem;
  }

  // Pops one chain from `q` with a chain limit of `max_chain`.
  DescriptorChain PopOne(uint32_t max_chain) {
    auto vq = Virtqueue::Create(mem_, q_.address(), /*indirect_desc=*/true,
                                /*event_idx=*/false, max_chain);
    EXPECT_TRUE(vq.ok());
    auto popped = vq->Pop();
    EXPECT_TRUE(popped.ok());
    EXPECT_TRUE(popped->has_value());
    return std::move(**popped);
  }

  FakeGuest guest_;
  FakeVirtqueue q_{guest_, kQueueSize};
  std::shared_ptr<const GuestMemory> mem_;
};

TEST_F(ChainBounds, IndirectTableOfFourThousandDescriptorsStopsAtTheChainLimit) {
  // A loop-free chain of 4096 descriptors in one indirect table: the walk
  // keeps at most max_chain segments.
  constexpr uint32_t kEntries = 4096;
  const uint64_t table = q_.AllocTable(kEntries);
  const uint64_t buf = guest_.Alloc(512);
  for (uint32_t i = 0; i < kEntries; ++i) {
    q_.WriteTableDesc(table, i, buf, 512, i + 1 < kEntries ? 1 : 2, static_cast<uint16_t>(i + 1));
  }
  const uint16_t d = q_.AllocDesc();
  q_.WriteDesc(d, table, kEntries * 16, 4, 0);
  q_.Publish(d);
  DescriptorChain chain = PopOne(/*max_chain=*/32);
  ASSERT_TRUE(chain.error.has_value());
  EXPECT_EQ(*chain.error, VirtioError::kDescriptorChainTooLong);
  EXPECT_EQ(chain.segments.size(), 32u);
  EXPECT_FALSE(chain.complete);
}

TEST_F(ChainBounds, ChainOfMoreThanFourGiBIsTooLarge) {
  // 4 KiB, then 4 GiB - 1: refused on the byte count before the second
  // buffer's address (it cannot be in guest memory) is looked at.
  const uint64_t buf = guest_.Alloc(4096);
  const uint16_t a = q_.AllocDesc();
  const uint16_t b = q_.AllocDesc();
  q_.WriteDesc(a, buf, 4096, 1, b);
  q_.WriteDesc(b, buf, 0xffffffff, 2, 0);
  q_.Publish(a);
  DescriptorChain chain = PopOne(0);
  ASSERT_TRUE(chain.error.has_value());
  EXPECT_EQ(*chain.error, VirtioError::kDescriptorChainTooLarge);
  EXPECT_EQ(chain.segments.size(), 1u);
  EXPECT_FALSE(chain.complete);
}

TEST_F(ChainBounds, IndirectTableLargerThanGuestMemoryIsOutsideGuestMemory) {
  const uint16_t d = q_.AllocDesc();
  q_.WriteDesc(d, guest_.base(), 0xfffffff0, 4, 0);  // 268 million descriptors
  q_.Publish(d);
  DescriptorChain chain = PopOne(0);
  ASSERT_TRUE(chain.error.has_value());
  EXPECT_EQ(*chain.error, VirtioError::kAddressOutsideGuestMemory);
  EXPECT_TRUE(chain.segments.empty());
}

TEST(RequestBounds, DiscardWithMoreSegmentsThanOfferedIsRefusedBeforeCopying) {
  FakeGuest guest;
  FakeVirtqueue q(guest, kQueueSize);
  std::vector<uint8_t> segs;
  for (int i = 0; i < 17; ++i) {
    std::vector<uint8_t> s = BlkSegment(i * 8, 8, 0);
    segs.insert(segs.end(), s.begin(), s.end());
  }
  SubmitBlk(guest, q, vblk::kTypeDiscard, 0, segs, 0);
  auto mem = GuestMemory::Create({guest.region()});
  ASSERT_TRUE(mem.ok());
  auto vq = Virtqueue::Create(*mem, q.address(), false, false);
  ASSERT_TRUE(vq.ok());
  auto popped = vq->Pop();
  ASSERT_TRUE(popped.ok() && popped->has_value());
  BlkLimits limits;
  limits.capacity_sectors = 1 << 20;
  limits.discard = true;
  limits.seg_max = 16;
  limits.max_discard_seg = 16;
  limits.max_discard_sectors = 1 << 22;
  BlkRequest req = ParseBlkRequest(**popped, limits);
  ASSERT_TRUE(req.error.has_value());
  EXPECT_EQ(*req.error, VirtioError::kTooManySegments);
  EXPECT_EQ(req.error_status, vblk::kStatusIoErr);
  EXPECT_TRUE(req.ranges.empty());
}

// ---- vhost-user ------------------------------------------------------------------

Message Msg(Request r, std::vector<uint8_t> payload) {
  Message m;
  m.request = static_cast<uint32_t>(r);
  m.payload = std::move(payload);
  return m;
}

void PutLe32(std::vector<uint8_t>* b, size_t off, uint32_t v) { std::memcpy(&(*b)[off], &v, 4); }

TEST(VhostUserBounds, ConfigAccessClaimingFourGiBIsWrongPayloadSize) {
  std::vector<uint8_t> p(vhost_user::kConfigHeaderSize + 8, 0);
  PutLe32(&p, 4, 0xffffffff);  // size
  EXPECT_EQ(vhost_user::DecodeConfig(Msg(Request::kGetConfig, p)).error(),
            VhostUserError::kWrongPayloadSize);
}

TEST(VhostUserBounds, MemoryTableClaimingFourBillionRegionsIsRefused) {
  std::vector<uint8_t> p = vhost_user::EncodeMemTable({{0, 4096, 0, 0}});
  PutLe32(&p, 0, 0xffffffff);  // nregions
  Message m = Msg(Request::kSetMemTable, p);
  m.fds.emplace_back(dup(0));
  EXPECT_EQ(vhost_user::DecodeMemTable(m).error(), VhostUserError::kTooManyRegions);
}

TEST(VhostUserBounds, AddMemRegBeyondTheSlotsIsTooManyRegions) {
  constexpr size_t kRegion = 1 << 16;
  VhostUserMemory memory(/*max_regions=*/2);
  for (uint64_t i = 0; i < 3; ++i) {
    UniqueFd fd(memfd_create("slot", MFD_CLOEXEC));
    ASSERT_TRUE(fd.valid());
    ASSERT_EQ(ftruncate(fd.get(), kRegion), 0);
    MemoryRegionDesc r{i * kRegion, kRegion, 0x7f0000000000 + i * kRegion, 0};
    auto st = memory.Add(r, std::move(fd));
    if (i < 2) {
      EXPECT_TRUE(st.ok()) << "region " << i;
    } else {
      EXPECT_EQ(st.error(), VhostUserError::kTooManyRegions);
    }
  }
  EXPECT_EQ(memory.size(), 2u);
}

// ---- the device: config space and fairness ---------------------------------------------

class DeviceBounds : public ::testing::Test {
 protected:
  void SetUp() override {
    auto file = MemFile::Create("disk.img");
    ASSERT_TRUE(file->Truncate(1 << 20).ok());
    auto disk = RawDevice::Open(std::move(file));
    ASSERT_TRUE(disk.ok());
    disk_ = std::move(*disk);
    VirtioBlkOptions opts;
    opts.num_queues = 2;
    opts.max_queue_size = kQueueSize;
    opts.serial = "bounds";
    auto dev = BlkDevice::Create(*disk_, opts);
    ASSERT_TRUE(dev.ok());
    dev_ = std::move(*dev);
    ASSERT_TRUE(dev_->SetGuestMemory({guest_.region()}).ok());
    ASSERT_TRUE(
        dev_->SetDriverFeatures(dev_->features() & ~vblk::FeatureBit(vblk::kFEventIdx)).ok());
    for (int i = 0; i < 2; ++i) {
      queues_.push_back(std::make_unique<FakeVirtqueue>(guest_, kQueueSize));
      ASSERT_TRUE(dev_->SetQueue(i, queues_.back()->address()).ok());
      ASSERT_TRUE(dev_->EnableQueue(i).ok());
    }
  }

  FakeGuest guest_{8 << 20};
  std::unique_ptr<BlockDevice> disk_;
  std::unique_ptr<BlkDevice> dev_;
  std::vector<std::unique_ptr<FakeVirtqueue>> queues_;
};

TEST_F(DeviceBounds, ConfigAccessPastTheConfigSpaceIsOutOfRange) {
  std::vector<uint8_t> buf(256);
  EXPECT_EQ(dev_->ReadConfigChecked(0, buf.data(), 97).error(),
            VirtioError::kConfigAccessOutOfRange);
  EXPECT_EQ(dev_->ReadConfigChecked(0xffffffff, buf.data(), 2).error(),
            VirtioError::kConfigAccessOutOfRange);
  EXPECT_EQ(dev_->ReadConfigChecked(90, buf.data(), 0xfffffff0).error(),
            VirtioError::kConfigAccessOutOfRange);
  EXPECT_TRUE(dev_->ReadConfigChecked(0, buf.data(), 96).ok());
}

TEST_F(DeviceBounds, FloodedQueueDoesNotStarveAnother) {
  // Queue 0 is kept full: whatever completes is resubmitted at once and the
  // queue notified again, as a guest that floods it would. Queue 1 gets one
  // read. It must complete while queue 0 completes at most a few rings' worth
  // of requests (each kick processes at most one ring's worth, and kicks of
  // the two queues are served in turn).
  auto submit0 = [&] { SubmitBlk(guest_, *queues_[0], vblk::kTypeIn, 0, {}, 512); };
  for (int i = 0; i < kQueueSize / 3; ++i) submit0();
  dev_->PostKick(0);
  FakeBlkRequest victim = SubmitBlk(guest_, *queues_[1], vblk::kTypeIn, 8, {}, 512);
  dev_->PostKick(1);
  int flood_completions = 0;
  EventLoop& loop = EventLoop::Current();
  while (BlkStatus(guest_, victim) == 0xff && flood_completions < 2000) {
    loop.RunOnce();
    auto used = queues_[0]->TakeUsed();
    flood_completions += static_cast<int>(used.size());
    for (size_t i = 0; i < used.size(); ++i) submit0();
    if (!used.empty()) dev_->PostKick(0);
  }
  EXPECT_EQ(BlkStatus(guest_, victim), vblk::kStatusOk);
  EXPECT_LE(flood_completions, 4 * kQueueSize);
  dev_->StopQueue(0).ok();
  dev_->Drain();
}

}  // namespace
}  // namespace kvblk
