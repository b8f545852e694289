// libFuzzer target: a hostile virtio-blk driver. The input drives a script
// of driver actions on fake guest memory (tests/support/virtio_fake_driver.h)
// with two split virtqueues, processed by the device model (BlkDevice over a
// raw in-memory disk): descriptors with fuzzed addresses, lengths, flags and
// links (direct, chained, indirect tables in fuzzed memory), avail ring
// entries and indices, request headers, arbitrary pokes anywhere in guest
// memory (also while requests are in flight), kicks, config-space access,
// queue stop/enable and device reset.
//
// Besides sanitizer reports, it aborts when the device breaks its own
// contract: requests still in flight after Drain().
#include <fuzzer/FuzzedDataProvider.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "disk/mem_file.h"
#include "disk/raw_device.h"
#include "kvblk/event_loop.h"
#include "kvblk/virtio_blk.h"
#include "tests/support/virtio_fake_driver.h"
#include "virtio/blk_device.h"

namespace kvblk {
namespace {

using testing::FakeGuest;
using testing::FakeVirtqueue;

constexpr size_t kGuestBytes = 128 << 10;
constexpr uint64_t kGuestBase = 0x10000000;
constexpr size_t kDataBytes = 32 << 10;
constexpr size_t kDiskBytes = 128 << 10;
constexpr int kQueues = 2;
constexpr int kMaxActions = 64;

enum class Action : uint8_t {
  kDescriptor,  // write one ring descriptor
  kHeader,      // write a request header into the data area
  kPublish,     // avail entry + avail idx
  kAvailIdx,    // avail idx alone (may jump)
  kKick,
  kPoke,  // arbitrary bytes anywhere in guest memory
  kConfig,
  kStopStart,
  kReset,
  kDrain,
  kEventIdx,  // used_event / avail flags
  kCount,
};

constexpr uint32_t kRequestTypes[] = {
    vblk::kTypeIn,      vblk::kTypeOut,         vblk::kTypeFlush,       vblk::kTypeGetId,
    vblk::kTypeDiscard, vblk::kTypeWriteZeroes, vblk::kTypeGetLifetime, vblk::kTypeSecureErase,
};

class Harness {
 public:
  explicit Harness(FuzzedDataProvider& in) : in_(in), guest_(kGuestBytes, kGuestBase) {}

  void Run() {
    auto file = MemFile::Create("fuzz-disk");
    if (!file->Truncate(kDiskBytes).ok()) return;
    auto disk = RawDevice::Open(std::move(file));
    if (!disk.ok()) return;
    disk_ = std::move(*disk);
    VirtioBlkOptions opts;
    opts.num_queues = kQueues;
    opts.max_queue_size = 64;
    opts.serial = "fuzz";
    opts.seg_max = in_.ConsumeIntegralInRange<uint32_t>(1, 70);
    opts.max_discard_seg = in_.ConsumeIntegralInRange<uint32_t>(1, 8);
    opts.max_write_zeroes_seg = in_.ConsumeIntegralInRange<uint32_t>(1, 8);
    auto dev = BlkDevice::Create(*disk_, opts);
    if (!dev.ok()) return;
    dev_ = std::move(*dev);
    dev_->SetInterruptCallback([](int) {});

    const uint16_t qsize = uint16_t{1} << in_.ConsumeIntegralInRange<int>(1, 6);
    for (int q = 0; q < kQueues; ++q) {
      queues_.push_back(std::make_unique<FakeVirtqueue>(guest_, qsize));
    }
    data_gpa_ = guest_.Alloc(kDataBytes, 4096);
    std::vector<uint8_t> fill =
        in_.ConsumeBytes<uint8_t>(in_.ConsumeIntegralInRange<size_t>(0, 512));
    guest_.Write(data_gpa_, fill.data(), fill.size());
    if (!dev_->SetGuestMemory({guest_.region()}).ok()) return;
    features_ = in_.ConsumeIntegral<uint64_t>() & dev_->features();
    if (in_.ConsumeBool()) features_ |= vblk::FeatureBit(vblk::kFVersion1);
    SetUp();

    const int actions = in_.ConsumeIntegralInRange<int>(0, kMaxActions);
    for (int i = 0; i < actions && in_.remaining_bytes() > 0; ++i) Step();
    dev_->Drain();
    if (dev_->in_flight() != 0) std::abort();
    dev_.reset();
  }

 private:
  void SetUp() {
    (void)dev_->SetDriverFeatures(features_);
    for (int q = 0; q < kQueues; ++q) {
      (void)dev_->SetQueue(q, queues_[q]->address());
      (void)dev_->EnableQueue(q);
    }
  }

  // A guest address: mostly inside the data area, sometimes anywhere.
  uint64_t Address() {
    switch (in_.ConsumeIntegralInRange<int>(0, 7)) {
      case 0:
        return in_.ConsumeIntegral<uint64_t>();
      case 1:
        return kGuestBase + in_.ConsumeIntegralInRange<uint64_t>(0, kGuestBytes + 64);
      default:
        return data_gpa_ + in_.ConsumeIntegralInRange<uint64_t>(0, kDataBytes - 1);
    }
  }

  uint32_t Length() {
    switch (in_.ConsumeIntegralInRange<int>(0, 7)) {
      case 0:
        return in_.ConsumeIntegral<uint32_t>();
      case 1:
        return 16;
      case 2:
        return 1;
      default:
        return in_.ConsumeIntegralInRange<uint32_t>(0, 8192);
    }
  }

  FakeVirtqueue& Queue() { return *queues_[in_.ConsumeIntegralInRange<int>(0, kQueues - 1)]; }

  void Step() {
    switch (static_cast<Action>(in_.ConsumeIntegralInRange<int>(0, int(Action::kCount) - 1))) {
      case Action::kDescriptor: {
        FakeVirtqueue& q = Queue();
        const uint16_t index = in_.ConsumeIntegral<uint16_t>() % q.size();
        const uint64_t addr = Address();
        const uint32_t len = Length();
        const uint16_t flags = in_.ConsumeIntegral<uint8_t>() & 0x7;
        const uint16_t next =
            in_.ConsumeBool() ? (index + 1) % q.size() : in_.ConsumeIntegral<uint16_t>();
        q.WriteDesc(index, addr, len, flags, next);
        break;
      }
      case Action::kHeader: {
        const uint64_t off = in_.ConsumeIntegralInRange<uint64_t>(0, kDataBytes - 16);
        uint8_t hdr[16] = {};
        const uint32_t type = in_.ConsumeBool()
                                  ? kRequestTypes[in_.ConsumeIntegralInRange<int>(0, 7)]
                                  : in_.ConsumeIntegral<uint32_t>();
        const uint64_t sector = in_.ConsumeBool() ? in_.ConsumeIntegralInRange<uint64_t>(0, 300)
                                                  : in_.ConsumeIntegral<uint64_t>();
        std::memcpy(hdr, &type, 4);
        std::memcpy(hdr + 8, &sector, 8);
        guest_.Write(data_gpa_ + off, hdr, sizeof hdr);
        break;
      }
      case Action::kPublish: {
        FakeVirtqueue& q = Queue();
        q.Publish(in_.ConsumeIntegral<uint16_t>() % (q.size() + 1));
        break;
      }
      case Action::kAvailIdx: {
        FakeVirtqueue& q = Queue();
        q.SetAvailIdx(in_.ConsumeIntegral<uint16_t>());
        break;
      }
      case Action::kKick:
        Kick(in_.ConsumeIntegralInRange<int>(-1, kQueues));
        break;
      case Action::kPoke: {
        const uint64_t off = in_.ConsumeIntegralInRange<uint64_t>(0, kGuestBytes - 1);
        std::vector<uint8_t> bytes = in_.ConsumeBytes<uint8_t>(
            std::min<size_t>(in_.ConsumeIntegralInRange<size_t>(1, 32), kGuestBytes - off));
        guest_.Write(kGuestBase + off, bytes.data(), bytes.size());
        break;
      }
      case Action::kConfig: {
        const uint32_t off = in_.ConsumeIntegralInRange<uint32_t>(0, 100);
        const uint32_t len = in_.ConsumeIntegralInRange<uint32_t>(0, 100);
        uint8_t buf[256] = {};
        buf[0] = in_.ConsumeIntegral<uint8_t>();
        if (in_.ConsumeBool()) {
          (void)dev_->WriteConfig(off, buf, len);
        } else {
          (void)dev_->ReadConfig(off, buf, len);
        }
        break;
      }
      case Action::kStopStart: {
        const int q = in_.ConsumeIntegralInRange<int>(0, kQueues - 1);
        auto next = dev_->StopQueue(q);
        if (in_.ConsumeBool()) dev_->Drain();
        VirtqueueAddress a = queues_[q]->address();
        a.next_avail = next.ok() ? *next : 0;
        (void)dev_->SetQueue(q, a);
        (void)dev_->EnableQueue(q);
        break;
      }
      case Action::kReset:
        dev_->Reset();
        if (in_.ConsumeBool()) dev_->Drain();
        features_ = in_.ConsumeIntegral<uint64_t>() & dev_->features();
        features_ |= vblk::FeatureBit(vblk::kFVersion1);
        SetUp();
        break;
      case Action::kDrain:
        dev_->Drain();
        break;
      case Action::kEventIdx: {
        FakeVirtqueue& q = Queue();
        q.SetUsedEvent(in_.ConsumeIntegral<uint16_t>());
        q.SetAvailFlags(in_.ConsumeIntegral<uint8_t>() & 1);
        break;
      }
      case Action::kCount:
        break;
    }
  }

  void Kick(int q) {
    dev_->Kick(q);
    // Let some requests finish (and others stay in flight) before the next
    // action.
    for (int i = in_.ConsumeIntegralInRange<int>(0, 3); i > 0; --i) EventLoop::Current().RunOnce();
  }

  FuzzedDataProvider& in_;
  FakeGuest guest_;
  std::vector<std::unique_ptr<FakeVirtqueue>> queues_;
  uint64_t data_gpa_ = 0;
  uint64_t features_ = 0;
  std::unique_ptr<BlockDevice> disk_;
  std::unique_ptr<BlkDevice> dev_;
};

}  // namespace
}  // namespace kvblk

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  kvblk::Harness h(in);
  h.Run();
  return 0;
}
