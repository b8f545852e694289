// BlkDevice end to end: a fake guest driver writes real rings and requests
// into guest memory, the device runs them on a RawDevice over a MemFile (one
// test: over a real file, for the read fast path), and the test checks the
// data on the disk, the data in guest memory, the status bytes, the used ring
// and the interrupts.
#include "virtio/blk_device.h"

#include <gtest/gtest.h>

#include <cstring>
#include <set>

#include "disk/mem_file.h"
#include "disk/raw_device.h"
#include "kvblk/event_loop.h"
#include "tests/support/forwarding_device.h"
#include "tests/support/qemu_util.h"
#include "tests/support/test_util.h"
#include "tests/support/virtio_fake_driver.h"

namespace kvblk {
namespace {

using testing::BlkLayout;
using testing::BlkSegment;
using testing::BlkStatus;
using testing::FakeBlkRequest;
using testing::FakeGuest;
using testing::FakeVirtqueue;
using testing::PatternBytes;
using testing::SubmitBlk;
using testing::UsedElem;
using vblk::FeatureBit;

constexpr uint64_t kDiskSize = 1 << 20;
constexpr uint16_t kQueueSize = 64;

// Delays reads that start at `slow_offset` by `yields` loop passes, so a
// request submitted first can complete last. Counts concurrent requests.
class SlowReadDevice final : public testing::ForwardingDevice {
 public:
  SlowReadDevice(BlockDevice& inner, uint64_t slow_offset, int yields)
      : ForwardingDevice(inner), slow_offset_(slow_offset), yields_(yields) {}

  Task<Status> Read(uint64_t offset, const iovec* iov, int iovcnt) override {
    ++active_;
    max_active_ = std::max(max_active_, active_);
    if (offset == slow_offset_) {
      for (int i = 0; i < yields_; ++i) co_await EventLoop::Current().Yield();
    }
    Status st = co_await inner_.Read(offset, iov, iovcnt);
    --active_;
    co_return st;
  }

  int max_active() const { return max_active_; }

 private:
  uint64_t slow_offset_;
  int yields_;
  int active_ = 0;
  int max_active_ = 0;
};

class BlkDeviceTest : public ::testing::Test {
 protected:
  void SetUp() override { Init({}); }

  // (Re)builds disk, device and queues. Features: everything offered, minus
  // `drop_features`.
  void Init(VirtioBlkOptions opts, uint64_t drop_features = 0, bool disk_read_only = false) {
    dev_.reset();
    disk_.reset();
    queues_.clear();
    data_ = std::make_shared<MemFileData>();
    data_->bytes = PatternBytes(kDiskSize, 7);
    auto file = std::make_unique<MemFile>(data_, "disk.img", disk_read_only);
    file_ = file.get();
    auto disk = RawDevice::Open(std::move(file));
    ASSERT_TRUE(disk.ok());
    disk_ = std::move(*disk);
    if (opts.serial.empty()) opts.serial = "kvblk-test-serial";
    if (opts.max_queue_size == 256) opts.max_queue_size = kQueueSize;
    auto dev = BlkDevice::Create(*disk_, opts);
    ASSERT_TRUE(dev.ok()) << dev.status().ToString();
    dev_ = std::move(*dev);
    dev_->SetInterruptCallback([this](int q) { irqs_.push_back(q); });
    ASSERT_TRUE(dev_->SetGuestMemory({guest_.region()}).ok());
    ASSERT_TRUE(dev_->SetDriverFeatures(dev_->features() & ~drop_features).ok());
    for (int i = 0; i < dev_->num_queues(); ++i) {
      queues_.push_back(std::make_unique<FakeVirtqueue>(guest_, kQueueSize));
      ASSERT_TRUE(dev_->SetQueue(i, queues_.back()->address()).ok());
      ASSERT_TRUE(dev_->EnableQueue(i).ok());
    }
    irqs_.clear();
  }

  FakeVirtqueue& q(int i = 0) { return *queues_[i]; }

  // Kicks queue `i` and runs the loop until nothing is in flight.
  void Run(int i = 0) {
    dev_->Kick(i);
    dev_->Drain();
  }

  FakeBlkRequest Submit(uint32_t type, uint64_t sector, const std::vector<uint8_t>& out,
                        uint32_t in_len, BlkLayout layout = BlkLayout::kSplit, int queue = 0) {
    return SubmitBlk(guest_, q(queue), type, sector, out, in_len, layout);
  }

  // Runs one request to completion and returns its status byte.
  uint8_t RunOne(uint32_t type, uint64_t sector, const std::vector<uint8_t>& out, uint32_t in_len,
                 BlkLayout layout = BlkLayout::kSplit) {
    FakeBlkRequest r = Submit(type, sector, out, in_len, layout);
    Run();
    auto used = q().TakeUsed();
    EXPECT_EQ(used.size(), 1u);
    return BlkStatus(guest_, r);
  }

  std::vector<uint8_t> Disk(uint64_t offset, size_t len) {
    return std::vector<uint8_t>(data_->bytes.begin() + offset, data_->bytes.begin() + offset + len);
  }

  FakeGuest guest_;
  std::shared_ptr<MemFileData> data_;
  MemFile* file_ = nullptr;
  std::unique_ptr<BlockDevice> disk_;
  std::unique_ptr<BlkDevice> dev_;
  std::vector<std::unique_ptr<FakeVirtqueue>> queues_;
  std::vector<int> irqs_;
};

// ---- Every request type, end to end ---------------------------------------------------

TEST_F(BlkDeviceTest, ReadReturnsDiskContents) {
  FakeBlkRequest r = Submit(vblk::kTypeIn, 16, {}, 4096);
  Run();
  auto used = q().TakeUsed();
  ASSERT_EQ(used.size(), 1u);
  EXPECT_EQ(used[0].id, r.head);
  EXPECT_EQ(used[0].len, 4096u + 1);
  EXPECT_EQ(BlkStatus(guest_, r), vblk::kStatusOk);
  EXPECT_EQ(guest_.Read(r.data_gpa, 4096), Disk(16 * 512, 4096));
  EXPECT_EQ(irqs_, std::vector<int>{0});
  EXPECT_EQ(dev_->in_flight(), 0u);
}

TEST_F(BlkDeviceTest, WriteReachesTheDisk) {
  auto payload = PatternBytes(8192, 99);
  FakeBlkRequest r = Submit(vblk::kTypeOut, 100, payload, 0);
  Run();
  auto used = q().TakeUsed();
  ASSERT_EQ(used.size(), 1u);
  EXPECT_EQ(used[0].len, 1u);  // only the status byte is device-writable
  EXPECT_EQ(BlkStatus(guest_, r), vblk::kStatusOk);
  EXPECT_EQ(Disk(100 * 512, 8192), payload);
}

class BlkDeviceLayoutTest : public BlkDeviceTest,
                            public ::testing::WithParamInterface<BlkLayout> {};

TEST_P(BlkDeviceLayoutTest, WriteThenReadBackInEveryLayout) {
  auto payload = PatternBytes(3 * 512, 5);
  EXPECT_EQ(RunOne(vblk::kTypeOut, 7, payload, 0, GetParam()), vblk::kStatusOk);
  EXPECT_EQ(Disk(7 * 512, payload.size()), payload);
  FakeBlkRequest r = Submit(vblk::kTypeIn, 7, {}, 3 * 512, GetParam());
  Run();
  ASSERT_EQ(q().TakeUsed().size(), 1u);
  EXPECT_EQ(BlkStatus(guest_, r), vblk::kStatusOk);
  EXPECT_EQ(guest_.Read(r.data_gpa, payload.size()), payload);
}

INSTANTIATE_TEST_SUITE_P(Layouts, BlkDeviceLayoutTest,
                         ::testing::Values(BlkLayout::kSplit, BlkLayout::kPerSector,
                                           BlkLayout::kMerged, BlkLayout::kIndirect));

TEST_F(BlkDeviceTest, FlushReachesTheDisk) {
  int flushes = 0;
  file_->SetHook([&](const MemFileEvent& ev) {
    if (ev.kind == MemFileEvent::Kind::kFlush) ++flushes;
    return 0;
  });
  EXPECT_EQ(RunOne(vblk::kTypeFlush, 0, {}, 0), vblk::kStatusOk);
  EXPECT_EQ(flushes, 1);
}

TEST_F(BlkDeviceTest, GetIdReturnsTheSerialNulPadded) {
  FakeBlkRequest r = Submit(vblk::kTypeGetId, 0, {}, vblk::kIdBytes);
  Run();
  ASSERT_EQ(q().TakeUsed().size(), 1u);
  EXPECT_EQ(BlkStatus(guest_, r), vblk::kStatusOk);
  std::vector<uint8_t> want(20, 0);
  std::memcpy(want.data(), "kvblk-test-serial", 17);
  EXPECT_EQ(guest_.Read(r.data_gpa, 20), want);
}

TEST_F(BlkDeviceTest, DefaultSerialIsStableAndDerivedFromThePath) {
  EXPECT_EQ(DefaultSerial("/images/a.qcow2"), DefaultSerial("/images/a.qcow2"));
  EXPECT_NE(DefaultSerial("/images/a.qcow2"), DefaultSerial("/images/b.qcow2"));
  EXPECT_EQ(DefaultSerial("/images/a.qcow2").size(), 20u);
  VirtioBlkOptions o;
  o.image_path = "/images/a.qcow2";
  o.serial = "";
  auto dev = BlkDevice::Create(*disk_, o);
  ASSERT_TRUE(dev.ok());
  EXPECT_EQ((*dev)->serial(), DefaultSerial("/images/a.qcow2"));
  o.serial = "this serial is too long for virtio";
  EXPECT_EQ(BlkDevice::Create(*disk_, o).status().code(), StatusCode::kInvalidArgument);
}

TEST_F(BlkDeviceTest, WriteZeroesZeroesEverySegment) {
  std::vector<uint8_t> segs = BlkSegment(10, 4, 0);
  auto s2 = BlkSegment(200, 8, vblk::kSegmentFlagUnmap);
  segs.insert(segs.end(), s2.begin(), s2.end());
  EXPECT_EQ(RunOne(vblk::kTypeWriteZeroes, 0, segs, 0), vblk::kStatusOk);
  EXPECT_EQ(Disk(10 * 512, 4 * 512), std::vector<uint8_t>(4 * 512, 0));
  EXPECT_EQ(Disk(200 * 512, 8 * 512), std::vector<uint8_t>(8 * 512, 0));
  // Neighbours untouched.
  auto pattern = PatternBytes(kDiskSize, 7);
  EXPECT_EQ(Disk(9 * 512, 512),
            std::vector<uint8_t>(pattern.begin() + 9 * 512, pattern.begin() + 10 * 512));
  EXPECT_EQ(Disk(14 * 512, 512),
            std::vector<uint8_t>(pattern.begin() + 14 * 512, pattern.begin() + 15 * 512));
}

TEST_F(BlkDeviceTest, DiscardSucceeds) {
  std::vector<MemFileEvent> events;
  file_->SetHook([&](const MemFileEvent& ev) {
    events.push_back(ev);
    return 0;
  });
  EXPECT_EQ(RunOne(vblk::kTypeDiscard, 0, BlkSegment(64, 64, 0), 0), vblk::kStatusOk);
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].kind, MemFileEvent::Kind::kDiscard);
  EXPECT_EQ(events[0].offset, 64u * 512);
  EXPECT_EQ(events[0].length, 64u * 512);
}

TEST_F(BlkDeviceTest, UnsupportedTypesGetUnsuppAndProcessingGoesOn) {
  FakeBlkRequest a = Submit(vblk::kTypeGetLifetime, 0, {}, 8);
  FakeBlkRequest b = Submit(0x1234, 0, {}, 0);
  FakeBlkRequest c = Submit(vblk::kTypeIn, 0, {}, 512);
  Run();
  EXPECT_EQ(q().TakeUsed().size(), 3u);
  EXPECT_EQ(BlkStatus(guest_, a), vblk::kStatusUnsupp);
  EXPECT_EQ(BlkStatus(guest_, b), vblk::kStatusUnsupp);
  EXPECT_EQ(BlkStatus(guest_, c), vblk::kStatusOk);
  EXPECT_FALSE(dev_->needs_reset());
}

TEST_F(BlkDeviceTest, DiskErrorIsIoErrAndTheDeviceStaysUsable) {
  file_->SetHook([](const MemFileEvent& ev) {
    return ev.kind == MemFileEvent::Kind::kRead && ev.offset == 0 ? EIO : 0;
  });
  EXPECT_EQ(RunOne(vblk::kTypeIn, 0, {}, 512), vblk::kStatusIoErr);
  EXPECT_EQ(RunOne(vblk::kTypeIn, 1, {}, 512), vblk::kStatusOk);
}

// ---- Concurrency ------------------------------------------------------------------

TEST_F(BlkDeviceTest, RequestsRunConcurrentlyAndCompleteOutOfOrder) {
  SlowReadDevice slow(*disk_, /*slow_offset=*/0, /*yields=*/20);
  VirtioBlkOptions o;
  o.serial = "slow";
  o.max_queue_size = kQueueSize;
  auto dev = BlkDevice::Create(slow, o);
  ASSERT_TRUE(dev.ok());
  dev_ = std::move(*dev);
  ASSERT_TRUE(dev_->SetGuestMemory({guest_.region()}).ok());
  ASSERT_TRUE(dev_->SetDriverFeatures(dev_->features()).ok());
  FakeVirtqueue fq(guest_, kQueueSize);
  ASSERT_TRUE(dev_->SetQueue(0, fq.address()).ok());
  ASSERT_TRUE(dev_->EnableQueue(0).ok());

  FakeBlkRequest first = SubmitBlk(guest_, fq, vblk::kTypeIn, 0, {}, 512);   // slow
  FakeBlkRequest second = SubmitBlk(guest_, fq, vblk::kTypeIn, 8, {}, 512);  // fast
  dev_->Kick(0);
  EXPECT_EQ(dev_->in_flight(), 2u);
  dev_->Drain();
  auto used = fq.TakeUsed();
  ASSERT_EQ(used.size(), 2u);
  EXPECT_EQ(used[0].id, second.head);
  EXPECT_EQ(used[1].id, first.head);
  EXPECT_EQ(slow.max_active(), 2);
  EXPECT_EQ(BlkStatus(guest_, first), vblk::kStatusOk);
  EXPECT_EQ(BlkStatus(guest_, second), vblk::kStatusOk);
  EXPECT_EQ(guest_.Read(first.data_gpa, 512), Disk(0, 512));
  EXPECT_EQ(guest_.Read(second.data_gpa, 512), Disk(8 * 512, 512));
}

TEST_F(BlkDeviceTest, FillsTheWholeQueueAndCompletesEveryRequestOnce) {
  std::vector<FakeBlkRequest> reqs;
  for (int i = 0; i < kQueueSize / 2; ++i) {  // two descriptors per request (merged)
    reqs.push_back(Submit(vblk::kTypeIn, i, {}, 512, BlkLayout::kMerged));
  }
  Run();
  auto used = q().TakeUsed();
  ASSERT_EQ(used.size(), reqs.size());
  std::set<uint32_t> heads;
  for (const UsedElem& u : used) heads.insert(u.id);
  EXPECT_EQ(heads.size(), reqs.size());
  for (size_t i = 0; i < reqs.size(); ++i) {
    EXPECT_EQ(BlkStatus(guest_, reqs[i]), vblk::kStatusOk);
    EXPECT_EQ(guest_.Read(reqs[i].data_gpa, 512), Disk(i * 512, 512));
  }
}

// ---- Notification suppression -----------------------------------------------------------

TEST_F(BlkDeviceTest, EventIdxSuppressesInterruptsUntilUsedEvent) {
  q().SetUsedEvent(2);  // interrupt when used entry 2 is written
  for (int i = 0; i < 3; ++i) {
    Submit(vblk::kTypeIn, i, {}, 512);
    Run();
  }
  EXPECT_EQ(q().TakeUsed().size(), 3u);
  // The first completion always interrupts; then none until entry 2.
  EXPECT_EQ(irqs_, (std::vector<int>{0, 0}));
  // The device asked to be notified at the next avail entry.
  EXPECT_EQ(q().AvailEvent(), 3);
}

// Completions within one pass of the loop share one interrupt, sent when
// the pass ends and before Drain() returns (without EVENT_IDX, so every
// completion would otherwise interrupt).
TEST_F(BlkDeviceTest, CompletionsInOneLoopPassShareOneInterrupt) {
  Init({}, FeatureBit(vblk::kFEventIdx));
  for (int i = 0; i < 8; ++i) Submit(vblk::kTypeIn, i, {}, 512);
  EventLoop::Current().PostFunction([this] { dev_->Kick(0); });
  EventLoop::Current().RunOnce();  // runs the posted kick
  dev_->Drain();
  EXPECT_EQ(q().TakeUsed().size(), 8u);
  EXPECT_EQ(irqs_, std::vector<int>{0});
  EXPECT_EQ(dev_->in_flight(), 0u);
}

TEST_F(BlkDeviceTest, NoInterruptFlagSuppressesWithoutEventIdx) {
  Init({}, FeatureBit(vblk::kFEventIdx));
  q().SetAvailFlags(kVirtqAvailFNoInterrupt);
  EXPECT_EQ(RunOne(vblk::kTypeIn, 0, {}, 512), vblk::kStatusOk);
  EXPECT_TRUE(irqs_.empty());
  q().SetAvailFlags(0);
  EXPECT_EQ(RunOne(vblk::kTypeIn, 0, {}, 512), vblk::kStatusOk);
  EXPECT_EQ(irqs_, std::vector<int>{0});
}

// ---- Hostile guests: request errors --------------------------------------------------------

TEST_F(BlkDeviceTest, DescriptorLoopIsReturnedWithoutStatusAndProcessingGoesOn) {
  FakeBlkRequest bad = testing::PrepareBlk(guest_, vblk::kTypeIn, 0, {}, 512);
  uint16_t d0 = q().AllocDesc(), d1 = q().AllocDesc();
  q().WriteDesc(d0, bad.header_gpa, 16, kVirtqDescFNext, d1);
  q().WriteDesc(d1, bad.data_gpa, 513, kVirtqDescFNext | kVirtqDescFWrite, d0);
  q().Publish(d0);
  FakeBlkRequest ok = SubmitBlk(guest_, q(), vblk::kTypeIn, 0, {}, 512);
  Run();
  auto used = q().TakeUsed();
  ASSERT_EQ(used.size(), 2u);
  EXPECT_EQ(used[0].id, d0);
  EXPECT_EQ(used[0].len, 0u);
  EXPECT_EQ(BlkStatus(guest_, bad), 0xff);  // no end of chain, so no status byte
  EXPECT_EQ(dev_->last_guest_error(), VirtioError::kDescriptorLoop);
  EXPECT_EQ(BlkStatus(guest_, ok), vblk::kStatusOk);
  EXPECT_FALSE(dev_->needs_reset());
}

TEST_F(BlkDeviceTest, RejectsChainLongerThanQueue) {
  // seg_max is 62 (queue size 64 - 2), so chains may have 64 descriptors.
  std::vector<testing::FakeBuf> bufs;
  uint64_t hdr = guest_.Alloc(16);
  uint32_t t = vblk::kTypeIn;
  guest_.Write(hdr, &t, 4);
  bufs.push_back({hdr, 16, false});
  for (int i = 0; i < kQueueSize - 1; ++i) bufs.push_back({guest_.Alloc(512), 512, true});
  uint64_t status = guest_.Alloc(1);
  *guest_.Host(status) = 0xff;
  bufs.push_back({status, 1, true});  // 65 descriptors
  q().Publish(q().AddIndirect(bufs));
  Run();
  auto used = q().TakeUsed();
  ASSERT_EQ(used.size(), 1u);
  EXPECT_EQ(used[0].len, 0u);
  EXPECT_EQ(*guest_.Host(status), 0xff);
  EXPECT_EQ(dev_->last_guest_error(), VirtioError::kDescriptorChainTooLong);
}

TEST_F(BlkDeviceTest, BufferOutsideGuestMemoryGetsIoErr) {
  // A data buffer wholly outside guest memory...
  FakeBlkRequest a = testing::PrepareBlk(guest_, vblk::kTypeIn, 0, {}, 512);
  q().Publish(q().AddChain(
      {{a.header_gpa, 16, false}, {guest_.end() + 0x1000, 512, true}, {a.status_gpa, 1, true}}));
  // ... and one that starts inside but runs past its end.
  FakeBlkRequest b = testing::PrepareBlk(guest_, vblk::kTypeIn, 0, {}, 512);
  q().Publish(q().AddChain(
      {{b.header_gpa, 16, false}, {guest_.end() - 100, 512, true}, {b.status_gpa, 1, true}}));
  Run();
  auto used = q().TakeUsed();
  ASSERT_EQ(used.size(), 2u);
  EXPECT_EQ(BlkStatus(guest_, a), vblk::kStatusIoErr);
  EXPECT_EQ(BlkStatus(guest_, b), vblk::kStatusIoErr);
  EXPECT_EQ(dev_->last_guest_error(), VirtioError::kAddressOutsideGuestMemory);
  EXPECT_FALSE(dev_->needs_reset());
}

TEST_F(BlkDeviceTest, MissingStatusByteReturnsChainWithLengthZero) {
  std::vector<std::string> errors;
  dev_->SetGuestErrorCallback([&](int, const char* e) { errors.push_back(e); });
  uint64_t hdr = guest_.Alloc(16);
  q().Publish(q().AddChain({{hdr, 16, false}}));
  Run();
  auto used = q().TakeUsed();
  ASSERT_EQ(used.size(), 1u);
  EXPECT_EQ(used[0].len, 0u);
  EXPECT_EQ(errors, std::vector<std::string>{"StatusMissing"});
}

TEST_F(BlkDeviceTest, ReadOnlyStatusByteIsNeverWritten) {
  FakeBlkRequest r = testing::PrepareBlk(guest_, vblk::kTypeOut, 0, PatternBytes(512, 1), 0);
  uint16_t h =
      q().AddChain({{r.header_gpa, 16, false}, {r.data_gpa, 512, false}, {r.status_gpa, 1, false}});
  q().Publish(h);
  auto before = Disk(0, 512);
  Run();
  auto used = q().TakeUsed();
  ASSERT_EQ(used.size(), 1u);
  EXPECT_EQ(used[0].id, h);
  EXPECT_EQ(used[0].len, 0u);
  EXPECT_EQ(BlkStatus(guest_, r), 0xff);
  EXPECT_EQ(Disk(0, 512), before);  // nothing was written
  EXPECT_EQ(dev_->last_guest_error(), VirtioError::kStatusNotWritable);
}

TEST_F(BlkDeviceTest, MisplacedStatusGetsIoErr) {
  FakeBlkRequest r = testing::PrepareBlk(guest_, vblk::kTypeOut, 0, PatternBytes(512, 1), 0);
  q().Publish(
      q().AddChain({{r.header_gpa, 16, false}, {r.status_gpa, 1, true}, {r.data_gpa, 512, false}}));
  Run();
  ASSERT_EQ(q().TakeUsed().size(), 1u);
  EXPECT_EQ(BlkStatus(guest_, r), vblk::kStatusIoErr);
  EXPECT_EQ(dev_->last_guest_error(), VirtioError::kStatusMisplaced);
}

TEST_F(BlkDeviceTest, ReadIntoReadOnlyBufferGetsIoErr) {
  FakeBlkRequest r = testing::PrepareBlk(guest_, vblk::kTypeIn, 0, {}, 512);
  std::vector<uint8_t> zeros(512, 0);
  q().Publish(
      q().AddChain({{r.header_gpa, 16, false}, {r.data_gpa, 512, false}, {r.status_gpa, 1, true}}));
  Run();
  ASSERT_EQ(q().TakeUsed().size(), 1u);
  EXPECT_EQ(BlkStatus(guest_, r), vblk::kStatusIoErr);
  EXPECT_EQ(guest_.Read(r.data_gpa, 512), zeros);  // the device never wrote it
  EXPECT_EQ(dev_->last_guest_error(), VirtioError::kDataNotWritable);
}

TEST_F(BlkDeviceTest, SectorPastCapacityGetsIoErr) {
  const uint64_t last = kDiskSize / 512 - 1;
  EXPECT_EQ(RunOne(vblk::kTypeIn, last, {}, 512), vblk::kStatusOk);
  EXPECT_EQ(RunOne(vblk::kTypeIn, last, {}, 1024), vblk::kStatusIoErr);
  EXPECT_EQ(dev_->last_guest_error(), VirtioError::kSectorPastEnd);
  EXPECT_EQ(RunOne(vblk::kTypeOut, UINT64_MAX / 512 + 1, PatternBytes(512, 2), 0),
            vblk::kStatusIoErr);
  EXPECT_EQ(dev_->last_guest_error(), VirtioError::kSectorPastEnd);
}

TEST_F(BlkDeviceTest, WriteToReadOnlyDiskGetsIoErr) {
  Init({}, 0, /*disk_read_only=*/true);
  EXPECT_TRUE(dev_->features() & FeatureBit(vblk::kFRo));
  EXPECT_FALSE(dev_->features() & FeatureBit(vblk::kFDiscard));
  EXPECT_FALSE(dev_->features() & FeatureBit(vblk::kFWriteZeroes));
  auto before = Disk(0, 4096);
  EXPECT_EQ(RunOne(vblk::kTypeOut, 0, PatternBytes(4096, 3), 0), vblk::kStatusIoErr);
  EXPECT_EQ(dev_->last_guest_error(), VirtioError::kWriteToReadOnlyDevice);
  EXPECT_EQ(Disk(0, 4096), before);
  EXPECT_EQ(RunOne(vblk::kTypeWriteZeroes, 0, BlkSegment(0, 8, 0), 0), vblk::kStatusUnsupp);
  EXPECT_EQ(dev_->last_guest_error(), VirtioError::kFeatureNotNegotiated);
  EXPECT_EQ(RunOne(vblk::kTypeIn, 0, {}, 512), vblk::kStatusOk);
}

TEST_F(BlkDeviceTest, ReadOnlyOptionOverridesAWritableDisk) {
  VirtioBlkOptions o;
  o.read_only = true;
  Init(o);
  EXPECT_TRUE(dev_->features() & FeatureBit(vblk::kFRo));
  EXPECT_EQ(RunOne(vblk::kTypeOut, 0, PatternBytes(512, 3), 0), vblk::kStatusIoErr);
}

// ---- Hostile guests: broken rings ------------------------------------------------------------

TEST_F(BlkDeviceTest, BrokenAvailIdxNeedsResetWhileOtherQueueKeepsWorking) {
  VirtioBlkOptions o;
  o.num_queues = 2;
  Init(o);
  q(0).SetAvailIdx(kQueueSize + 5);
  dev_->Kick(0);
  EXPECT_TRUE(dev_->needs_reset());
  EXPECT_TRUE(dev_->queue_broken(0));
  EXPECT_FALSE(dev_->queue_broken(1));
  EXPECT_EQ(dev_->queue_error(0), VirtioError::kAvailIndexJumped);
  EXPECT_EQ(irqs_, std::vector<int>{vblk::kConfigInterrupt});

  FakeBlkRequest r = Submit(vblk::kTypeIn, 3, {}, 512, BlkLayout::kSplit, /*queue=*/1);
  Run(1);
  ASSERT_EQ(q(1).TakeUsed().size(), 1u);
  EXPECT_EQ(BlkStatus(guest_, r), vblk::kStatusOk);
  EXPECT_EQ(guest_.Read(r.data_gpa, 512), Disk(3 * 512, 512));
  EXPECT_EQ(irqs_, (std::vector<int>{vblk::kConfigInterrupt, 1}));

  // The broken queue stays stopped until the driver resets the device.
  dev_->Kick(0);
  EXPECT_EQ(q(0).UsedIdx(), 0);
  dev_->Reset();
  EXPECT_FALSE(dev_->needs_reset());
  EXPECT_FALSE(dev_->queue_enabled(0));
}

TEST_F(BlkDeviceTest, AvailEntryOutOfRangeNeedsReset) {
  q().Publish(kQueueSize);
  Run();
  EXPECT_TRUE(dev_->needs_reset());
  EXPECT_EQ(dev_->queue_error(0), VirtioError::kAvailRingEntryOutOfRange);
}

// ---- Lifecycle ----------------------------------------------------------------------------

TEST_F(BlkDeviceTest, ResetDropsCompletionsOfRequestsInFlight) {
  FakeBlkRequest r = Submit(vblk::kTypeIn, 0, {}, 512);
  dev_->Kick(0);
  EXPECT_EQ(dev_->in_flight(), 1u);
  dev_->Reset();
  dev_->Drain();
  EXPECT_EQ(dev_->in_flight(), 0u);
  EXPECT_EQ(q().UsedIdx(), 0);
  EXPECT_EQ(BlkStatus(guest_, r), 0xff);
  EXPECT_EQ(dev_->driver_features(), 0u);
}

TEST_F(BlkDeviceTest, PostedKickRunsOnTheLoop) {
  FakeBlkRequest r = Submit(vblk::kTypeIn, 0, {}, 512);
  dev_->PostKick(0);
  EXPECT_EQ(q().UsedIdx(), 0);
  EventLoop::Current().RunOnce();  // runs the posted kick
  dev_->Drain();
  EXPECT_EQ(BlkStatus(guest_, r), vblk::kStatusOk);
}

TEST_F(BlkDeviceTest, QueueSetupErrors) {
  EXPECT_EQ(dev_->EnableQueueChecked(5).error(), VirtioError::kInvalidQueueIndex);
  VirtqueueAddress a = q().address();
  a.size = 2 * kQueueSize;  // above max_queue_size
  ASSERT_TRUE(dev_->StopQueue(0).ok());
  ASSERT_TRUE(dev_->SetQueue(0, a).ok());
  EXPECT_EQ(dev_->EnableQueueChecked(0).error(), VirtioError::kInvalidQueueSize);
  a = q().address();
  a.avail_gpa += 1;
  ASSERT_TRUE(dev_->SetQueue(0, a).ok());
  EXPECT_EQ(dev_->EnableQueueChecked(0).error(), VirtioError::kRingMisaligned);
  EXPECT_EQ(dev_->EnableQueue(0).code(), StatusCode::kInvalidArgument);
}

TEST_F(BlkDeviceTest, StopQueueReportsNextAvailIndex) {
  Submit(vblk::kTypeIn, 0, {}, 512);
  Submit(vblk::kTypeIn, 1, {}, 512);
  Run();
  auto base = dev_->StopQueue(0);
  ASSERT_TRUE(base.ok());
  EXPECT_EQ(*base, 2);
  // Stopped: kicks are ignored.
  Submit(vblk::kTypeIn, 2, {}, 512);
  Run();
  EXPECT_EQ(q().UsedIdx(), 2);
}

TEST_F(BlkDeviceTest, NewMemoryMapReleasesTheOldOneWhenUnused) {
  int released = 0;
  ASSERT_TRUE(dev_->SetGuestMemory({guest_.region()}, [&] { ++released; }).ok());
  FakeBlkRequest r = Submit(vblk::kTypeIn, 0, {}, 512);
  dev_->Kick(0);
  ASSERT_TRUE(dev_->SetGuestMemory({guest_.region()}).ok());
  EXPECT_EQ(released, 0);  // the request in flight still uses it
  dev_->Drain();
  EXPECT_EQ(released, 1);
  EXPECT_EQ(BlkStatus(guest_, r), vblk::kStatusOk);
}

// ---- Features and configuration space ------------------------------------------------------

TEST_F(BlkDeviceTest, OffersTheExpectedFeatures) {
  uint64_t want = 0;
  for (int bit : {vblk::kFSizeMax, vblk::kFSegMax, vblk::kFBlkSize, vblk::kFTopology, vblk::kFFlush,
                  vblk::kFConfigWce, vblk::kFMq, vblk::kFDiscard, vblk::kFWriteZeroes,
                  vblk::kFVersion1, vblk::kFIndirectDesc, vblk::kFEventIdx}) {
    want |= FeatureBit(bit);
  }
  EXPECT_EQ(dev_->features(), want);
  EXPECT_EQ(dev_->SetDriverFeaturesChecked(want | FeatureBit(vblk::kFRo)).error(),
            VirtioError::kFeatureNotOffered);
  EXPECT_EQ(dev_->SetDriverFeaturesChecked(want & ~FeatureBit(vblk::kFVersion1)).error(),
            VirtioError::kLegacyDriverNotSupported);
  EXPECT_EQ(dev_->driver_features(), want);  // unchanged by the failed attempts
}

TEST_F(BlkDeviceTest, ConfigSpaceLayoutIsByteExact) {
  std::vector<uint8_t> c(dev_->config_size());
  ASSERT_EQ(c.size(), 96u);
  ASSERT_TRUE(dev_->ReadConfig(0, c.data(), 96).ok());
  auto le = [&](size_t off, int n) {
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; --i) v = (v << 8) | c[off + i];
    return v;
  };
  EXPECT_EQ(le(0, 8), kDiskSize / 512);               // capacity
  EXPECT_EQ(le(8, 4), 1u << 20);                      // size_max
  EXPECT_EQ(le(12, 4), kQueueSize - 2u);              // seg_max
  EXPECT_EQ(le(16, 2), kDiskSize / 512 / (16 * 63));  // cylinders
  EXPECT_EQ(c[18], 16);                               // heads
  EXPECT_EQ(c[19], 63);                               // sectors
  EXPECT_EQ(le(20, 4), 512u);                         // blk_size
  EXPECT_EQ(c[24], 0);                                // physical_block_exp
  EXPECT_EQ(c[25], 0);                                // alignment_offset
  EXPECT_EQ(le(26, 2), 1u);                           // min_io_size
  EXPECT_EQ(le(28, 4), 0u);                           // opt_io_size (raw: none)
  EXPECT_EQ(c[32], 1);                                // writeback
  EXPECT_EQ(c[33], 0);                                // unused0
  EXPECT_EQ(le(34, 2), 1u);                           // num_queues
  EXPECT_EQ(le(36, 4), 1u << 22);                     // max_discard_sectors
  EXPECT_EQ(le(40, 4), 16u);                          // max_discard_seg
  EXPECT_EQ(le(44, 4), 8u);                           // discard_sector_alignment (4 KiB)
  EXPECT_EQ(le(48, 4), 1u << 22);                     // max_write_zeroes_sectors
  EXPECT_EQ(le(52, 4), 16u);                          // max_write_zeroes_seg
  EXPECT_EQ(c[56], 1);                                // write_zeroes_may_unmap
  for (size_t i = 57; i < 96; ++i) EXPECT_EQ(c[i], 0) << "byte " << i;
  // Partial, unaligned reads see the same bytes.
  uint8_t nq[2];
  ASSERT_TRUE(dev_->ReadConfig(34, nq, 2).ok());
  EXPECT_EQ(nq[0], 1);
  uint8_t cap_hi[3];
  ASSERT_TRUE(dev_->ReadConfig(1, cap_hi, 3).ok());
  EXPECT_EQ(cap_hi[0], c[1]);
  EXPECT_EQ(dev_->ReadConfigChecked(90, c.data(), 7).error(), VirtioError::kConfigAccessOutOfRange);
  EXPECT_EQ(dev_->ReadConfigChecked(UINT32_MAX, c.data(), 2).error(),
            VirtioError::kConfigAccessOutOfRange);
}

TEST_F(BlkDeviceTest, OnlyWritebackIsWritable) {
  uint8_t zero = 0, two = 2;
  uint64_t cap = 5;
  EXPECT_EQ(dev_->WriteConfigChecked(0, &cap, 8).error(), VirtioError::kConfigFieldReadOnly);
  EXPECT_EQ(dev_->WriteConfigChecked(vblk::kCfgWriteback, &two, 1).error(),
            VirtioError::kBadConfigValue);
  EXPECT_EQ(dev_->WriteConfigChecked(100, &zero, 1).error(), VirtioError::kConfigAccessOutOfRange);
  ASSERT_TRUE(dev_->WriteConfig(vblk::kCfgWriteback, &zero, 1).ok());
  uint8_t wb = 1;
  ASSERT_TRUE(dev_->ReadConfig(vblk::kCfgWriteback, &wb, 1).ok());
  EXPECT_EQ(wb, 0);
  EXPECT_TRUE(dev_->write_through());
  // Without CONFIG_WCE negotiated the field is read-only.
  Init({}, FeatureBit(vblk::kFConfigWce));
  EXPECT_EQ(dev_->WriteConfigChecked(vblk::kCfgWriteback, &zero, 1).error(),
            VirtioError::kConfigFieldReadOnly);
}

TEST_F(BlkDeviceTest, WritethroughFlushesEveryWrite) {
  uint8_t zero = 0;
  ASSERT_TRUE(dev_->WriteConfig(vblk::kCfgWriteback, &zero, 1).ok());
  std::vector<MemFileEvent::Kind> kinds;
  file_->SetHook([&](const MemFileEvent& ev) {
    kinds.push_back(ev.kind);
    return 0;
  });
  EXPECT_EQ(RunOne(vblk::kTypeOut, 0, PatternBytes(512, 4), 0), vblk::kStatusOk);
  EXPECT_EQ(kinds, (std::vector<MemFileEvent::Kind>{MemFileEvent::Kind::kWrite,
                                                    MemFileEvent::Kind::kFlush}));
}

TEST_F(BlkDeviceTest, ConfigWceWithoutFlushStartsWritethrough) {
  Init({}, FeatureBit(vblk::kFFlush));
  uint8_t wb = 1;
  ASSERT_TRUE(dev_->ReadConfig(vblk::kCfgWriteback, &wb, 1).ok());
  EXPECT_EQ(wb, 0);
  EXPECT_TRUE(dev_->write_through());
  // Neither FLUSH nor CONFIG_WCE: writethrough too (5.2.6.4, case 1).
  Init({}, FeatureBit(vblk::kFFlush) | FeatureBit(vblk::kFConfigWce));
  EXPECT_TRUE(dev_->write_through());
  Init({}, FeatureBit(vblk::kFConfigWce));
  EXPECT_FALSE(dev_->write_through());
}

// The device over a raw image in a real file: the guest's reads take
// RawDevice's fast path (StartRead, no coroutine) and get the file's bytes.
TEST(BlkDeviceRawFileTest, GuestReadsTakeTheRawFastPath) {
  testing::TempDir dir;
  const std::string img = dir.File("disk.raw");
  const std::vector<uint8_t> bytes = PatternBytes(kDiskSize, 3);
  ASSERT_NO_FATAL_FAILURE(testing::WriteFileBytes(img, bytes));
  OpenOptions o;
  o.format = "raw";
  auto disk = OpenImage(img, o);
  ASSERT_TRUE(disk.ok()) << disk.status().ToString();
  auto* raw = dynamic_cast<RawDevice*>(disk->get());
  ASSERT_NE(raw, nullptr);
  VirtioBlkOptions opts;
  opts.serial = "raw-file";
  opts.max_queue_size = kQueueSize;
  auto dev = BlkDevice::Create(**disk, opts);
  ASSERT_TRUE(dev.ok()) << dev.status().ToString();
  FakeGuest guest;
  FakeVirtqueue vq(guest, kQueueSize);
  ASSERT_TRUE((*dev)->SetGuestMemory({guest.region()}).ok());
  ASSERT_TRUE((*dev)->SetDriverFeatures((*dev)->features()).ok());
  ASSERT_TRUE((*dev)->SetQueue(0, vq.address()).ok());
  ASSERT_TRUE((*dev)->EnableQueue(0).ok());

  FakeBlkRequest r = SubmitBlk(guest, vq, vblk::kTypeIn, 24, {}, 8192);
  (*dev)->Kick(0);
  (*dev)->Drain();
  ASSERT_EQ(vq.TakeUsed().size(), 1u);
  EXPECT_EQ(BlkStatus(guest, r), vblk::kStatusOk);
  EXPECT_EQ(guest.Read(r.data_gpa, 8192),
            std::vector<uint8_t>(bytes.begin() + 24 * 512, bytes.begin() + 24 * 512 + 8192));
  EXPECT_EQ(raw->fast_reads(), 1u);
  dev->reset();
  EXPECT_TRUE(CloseImage(std::move(*disk)).ok());
}

}  // namespace
}  // namespace kvblk
