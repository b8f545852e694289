// BlkDevice with its queues on several event loops (VirtioBlkOptions::
// queue_loops): each queue's requests run and complete on its own I/O
// thread, control calls from the creating thread reach the queue's loop,
// and Drain() waits for every queue.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <set>
#include <thread>

#include "disk/loop_thread.h"
#include "disk/mem_file.h"
#include "disk/raw_device.h"
#include "kvblk/event_loop.h"
#include "tests/support/forwarding_device.h"
#include "tests/support/test_util.h"
#include "tests/support/virtio_fake_driver.h"
#include "virtio/blk_device.h"

namespace kvblk {
namespace {

using testing::BlkStatus;
using testing::FakeBlkRequest;
using testing::FakeGuest;
using testing::FakeVirtqueue;
using testing::PatternBytes;
using testing::SubmitBlk;

constexpr uint64_t kDiskSize = 1 << 20;
constexpr uint16_t kQueueSize = 64;

// Records which thread ran each write (by offset).
class ThreadRecordingDevice final : public testing::ForwardingDevice {
 public:
  using ForwardingDevice::ForwardingDevice;

  Task<Status> Write(uint64_t offset, const iovec* iov, int iovcnt) override {
    {
      std::lock_guard<std::mutex> l(mu_);
      writer_[offset] = std::this_thread::get_id();
    }
    return inner_.Write(offset, iov, iovcnt);
  }

  std::map<uint64_t, std::thread::id> writers() {
    std::lock_guard<std::mutex> l(mu_);
    return writer_;
  }

 private:
  std::mutex mu_;
  std::map<uint64_t, std::thread::id> writer_;
};

class BlkDeviceThreadsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    for (auto* t : {&t1_, &t2_}) {
      auto started = LoopThread::Start();
      ASSERT_TRUE(started.ok()) << started.status().ToString();
      *t = std::move(*started);
    }
    data_ = std::make_shared<MemFileData>();
    data_->bytes.assign(kDiskSize, 0);
    auto disk = RawDevice::Open(std::make_unique<MemFile>(data_, "disk.img"));
    ASSERT_TRUE(disk.ok());
    raw_ = std::move(*disk);
    disk_ = std::make_unique<ThreadRecordingDevice>(*raw_);
    VirtioBlkOptions opts;
    opts.num_queues = 3;
    opts.max_queue_size = kQueueSize;
    opts.serial = "threads";
    // Queue 0 on this thread, 1 and 2 on the two I/O threads.
    opts.queue_loops = {&EventLoop::Current(), &t1_->loop(), &t2_->loop()};
    auto dev = BlkDevice::Create(*disk_, opts);
    ASSERT_TRUE(dev.ok()) << dev.status().ToString();
    dev_ = std::move(*dev);
    dev_->SetInterruptCallback([this](int q) {
      std::lock_guard<std::mutex> l(irq_mu_);
      irq_threads_[q].insert(std::this_thread::get_id());
    });
    ASSERT_TRUE(dev_->SetGuestMemory({guest_.region()}).ok());
    ASSERT_TRUE(dev_->SetDriverFeatures(dev_->features()).ok());
    for (int i = 0; i < dev_->num_queues(); ++i) {
      queues_.push_back(std::make_unique<FakeVirtqueue>(guest_, kQueueSize));
      ASSERT_TRUE(dev_->SetQueue(i, queues_.back()->address()).ok());
      ASSERT_TRUE(dev_->EnableQueue(i).ok());
    }
  }
  void TearDown() override {
    dev_.reset();  // while the I/O threads still run their loops
  }

  // Runs this thread's loop (queue 0 and posted work) until every queue in
  // `queues` has `n` used entries, or a few seconds pass.
  void WaitUsed(const std::vector<int>& queues, uint16_t n) {
    for (int round = 0; round < 2000; ++round) {
      bool all = true;
      for (int q : queues) all = all && queues_[static_cast<size_t>(q)]->UsedIdx() == n;
      if (all) break;
      if (!EventLoop::Current().RunOnce()) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
    }
    dev_->Drain();
  }

  std::thread::id QueueThread(int q) const {
    return q == 0 ? std::this_thread::get_id() : q == 1 ? t1_->id() : t2_->id();
  }

  std::unique_ptr<LoopThread> t1_, t2_;
  FakeGuest guest_;
  std::shared_ptr<MemFileData> data_;
  std::unique_ptr<BlockDevice> raw_;
  std::unique_ptr<ThreadRecordingDevice> disk_;
  std::unique_ptr<BlkDevice> dev_;
  std::vector<std::unique_ptr<FakeVirtqueue>> queues_;
  std::mutex irq_mu_;
  std::map<int, std::set<std::thread::id>> irq_threads_;
};

TEST_F(BlkDeviceThreadsTest, EachQueueRunsAndCompletesOnItsOwnThread) {
  constexpr int kPerQueue = 16;
  std::vector<std::vector<FakeBlkRequest>> reqs(3);
  std::vector<std::vector<uint8_t>> payloads;
  for (int q = 0; q < 3; ++q) {
    for (int i = 0; i < kPerQueue; ++i) {
      const uint64_t sector = static_cast<uint64_t>(q * kPerQueue + i) * 8;
      payloads.push_back(PatternBytes(4096, static_cast<uint32_t>(sector + 1)));
      reqs[q].push_back(SubmitBlk(guest_, *queues_[q], vblk::kTypeOut, sector, payloads.back(), 0));
    }
  }
  for (int q = 0; q < 3; ++q) dev_->PostKick(q);
  // Kicks are posted: wait until every queue has popped and finished.
  WaitUsed({0, 1, 2}, kPerQueue);
  const auto writers = disk_->writers();
  for (int q = 0; q < 3; ++q) {
    auto used = queues_[q]->TakeUsed();
    ASSERT_EQ(used.size(), static_cast<size_t>(kPerQueue)) << "queue " << q;
    for (int i = 0; i < kPerQueue; ++i) {
      const FakeBlkRequest& r = reqs[q][static_cast<size_t>(i)];
      EXPECT_EQ(BlkStatus(guest_, r), vblk::kStatusOk);
      const uint64_t offset = static_cast<uint64_t>(q * kPerQueue + i) * 4096;
      ASSERT_TRUE(writers.count(offset)) << offset;
      EXPECT_EQ(writers.at(offset), QueueThread(q)) << "queue " << q << " request " << i;
      std::vector<uint8_t> on_disk(data_->bytes.begin() + static_cast<long>(offset),
                                   data_->bytes.begin() + static_cast<long>(offset) + 4096);
      EXPECT_EQ(on_disk, payloads[static_cast<size_t>(q * kPerQueue + i)]);
    }
  }
  std::lock_guard<std::mutex> l(irq_mu_);
  for (int q = 0; q < 3; ++q) {
    EXPECT_EQ(irq_threads_[q], std::set<std::thread::id>{QueueThread(q)}) << "queue " << q;
  }
  EXPECT_EQ(dev_->in_flight(), 0u);
}

TEST_F(BlkDeviceThreadsTest, StopQueueFromTheControlThreadReturnsTheNextAvailIndex) {
  for (int i = 0; i < 5; ++i) {
    SubmitBlk(guest_, *queues_[2], vblk::kTypeOut, static_cast<uint64_t>(i) * 8,
              PatternBytes(4096, 3), 0);
  }
  dev_->PostKick(2);
  WaitUsed({2}, 5);
  auto next = dev_->StopQueue(2);
  ASSERT_TRUE(next.ok());
  EXPECT_EQ(*next, 5);
  EXPECT_FALSE(dev_->queue_enabled(2));
  // A stopped queue ignores kicks: nothing more is popped.
  SubmitBlk(guest_, *queues_[2], vblk::kTypeOut, 100, PatternBytes(4096, 4), 0);
  dev_->PostKick(2);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  dev_->Drain();
  EXPECT_EQ(queues_[2]->UsedIdx(), 5);
}

TEST_F(BlkDeviceThreadsTest, ResetFromTheControlThreadStopsEveryQueue) {
  dev_->Reset();
  for (int q = 0; q < 3; ++q) EXPECT_FALSE(dev_->queue_enabled(q)) << q;
  EXPECT_EQ(dev_->driver_features(), 0u);
}

}  // namespace
}  // namespace kvblk
