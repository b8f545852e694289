// Live internal snapshots and resize (issue 5, item 3), at the device level:
// while two threads keep 16 writes each in flight on a qcow2 image, a third
// thread takes ten snapshots and grows the disk twice. Every snapshot, read
// back by `qemu-img convert -l snapshot.id=N`, must hold every write that
// completed before the snapshot was requested (unless a later write that
// also completed before replaced it) and no write submitted after the
// snapshot completed; no request fails; `qemu-img check` is clean.
//
// Time is one global atomic sequence: a write takes a number when it is
// submitted and another when it completes; a snapshot when it is requested
// and when it has completed.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "disk/io_engine.h"
#include "disk/qcow2_device.h"
#include "kvblk/block_device.h"
#include "kvblk/event_loop.h"
#include "kvblk/image_create.h"
#include "kvblk/task.h"
#include "tests/support/qemu_util.h"
#include "tests/support/test_util.h"

namespace kvblk {
namespace {

using qcow2::Qcow2Device;
using testing::ExpectQemuCheckClean;
using testing::ReadFileBytes;
using testing::ShellQuote;
using testing::ShOk;
using testing::TempDir;

constexpr uint64_t kMiB = 1024 * 1024;
constexpr uint64_t kBlock = 4096;
constexpr uint64_t kSlots = 1024;  // 4 MiB region written at random
constexpr uint64_t kInitialSize = 8 * kMiB;
constexpr uint64_t kGrowBy = 8 * kMiB;
constexpr int kWriterThreads = 2;
constexpr int kDepthPerThread = 16;
constexpr int kSnapshots = 10;

struct WriteRecord {
  uint64_t slot;
  uint64_t stamp;  // fills the block (every 8-byte word); unique, > 0
  uint64_t submitted;
  uint64_t completed;
};

struct SnapshotRecord {
  std::string name;
  uint64_t requested = 0;
  uint64_t completed = 0;
};

// State shared by the threads of one run.
struct Shared {
  std::atomic<uint64_t> clock{1};
  std::atomic<uint64_t> next_stamp{1};
  std::atomic<bool> stop{false};
  std::atomic<int> failures{0};
  std::mutex mu;
  std::string first_failure;  // GUARDED_BY(mu)
};

// One lane: a write at a time, to random slots, until `s->stop`. Records go
// to `out` (owned by the lane's thread; lanes of a thread share its loop).
Task<void> WriterLane(Qcow2Device* dev, Shared* s, uint32_t seed, std::vector<WriteRecord>* out) {
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> buf(kBlock);
  while (!s->stop.load()) {
    WriteRecord r;
    r.slot = rng() % kSlots;
    r.stamp = s->next_stamp.fetch_add(1);
    for (size_t i = 0; i < kBlock; i += 8) std::memcpy(&buf[i], &r.stamp, 8);
    r.submitted = s->clock.fetch_add(1);
    Status st = co_await dev->Write(r.slot * kBlock, buf.data(), kBlock);
    r.completed = s->clock.fetch_add(1);
    if (!st.ok()) {
      if (s->failures.fetch_add(1) == 0) {
        std::lock_guard<std::mutex> l(s->mu);
        s->first_failure = st.ToString();
      }
      continue;
    }
    out->push_back(r);
  }
}

// Runs `body` on a new thread with its own io_uring loop installed; the
// thread counts itself in `finished` and wakes `home` when done.
std::thread StartLoopThread(EventLoop& home, std::atomic<int>& finished,
                            std::function<void()> body) {
  return std::thread([&home, &finished, body = std::move(body)] {
    int err = 0;
    auto engine = MakeUringEngine(256, &err);
    if (engine == nullptr) {
      ADD_FAILURE() << "io_uring: errno " << err;
    } else {
      EventLoop loop(std::move(engine));
      EventLoop::SetCurrent(&loop);
      body();
      EventLoop::SetCurrent(nullptr);
    }
    ++finished;
    home.PostFunction([] {});
  });
}

TEST(LiveSnapshot, SnapshotsHoldExactlyTheWritesCompletedBeforeThemUnderLoad) {
  TempDir dir;
  const std::string path = dir.File("live.qcow2");
  CreateOptions co;
  co.size = kInitialSize;
  co.cluster_size = 65536;
  ASSERT_TRUE(CreateImage(path, co).ok());
  OpenOptions oo;
  oo.format = "qcow2";
  auto opened = OpenImage(path, oo);  // this thread's loop is the home loop
  ASSERT_TRUE(opened.ok()) << opened.status().ToString();
  std::unique_ptr<BlockDevice> disk = std::move(*opened);
  auto* dev = static_cast<Qcow2Device*>(disk.get());

  Shared s;
  EventLoop& home = EventLoop::Current();
  std::atomic<int> finished{0};
  std::vector<std::vector<WriteRecord>> records(kWriterThreads);
  std::vector<SnapshotRecord> snaps;
  std::vector<std::string> op_errors;
  std::vector<std::thread> threads;
  for (int t = 0; t < kWriterThreads; ++t) {
    threads.push_back(StartLoopThread(home, finished, [&, t] {
      int lanes_done = 0;
      for (int l = 0; l < kDepthPerThread; ++l) {
        Spawn(WriterLane(dev, &s, static_cast<uint32_t>(t * 1000 + l), &records[t]),
              [&] { ++lanes_done; });
      }
      EventLoop::Current().RunUntil([&] { return lanes_done == kDepthPerThread; });
    }));
  }
  threads.push_back(StartLoopThread(home, finished, [&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    for (int i = 1; i <= kSnapshots; ++i) {
      SnapshotRecord r;
      r.name = "live" + std::to_string(i);
      r.requested = s.clock.fetch_add(1);
      Status st = RunSync(dev->CreateSnapshot(r.name));
      r.completed = s.clock.fetch_add(1);
      if (!st.ok()) op_errors.push_back(r.name + ": " + st.ToString());
      snaps.push_back(r);
      std::this_thread::sleep_for(std::chrono::milliseconds(60));
      if (i == 3 || i == 7) {
        Status rs = RunSync(dev->Resize(dev->size() + kGrowBy, false));
        if (!rs.ok()) op_errors.push_back("resize: " + rs.ToString());
        std::this_thread::sleep_for(std::chrono::milliseconds(30));
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    s.stop.store(true);
  }));
  const auto t0 = std::chrono::steady_clock::now();
  home.RunUntil([&] { return finished == kWriterThreads + 1; });
  for (auto& t : threads) t.join();
  const auto ms = [](auto d) {
    return std::chrono::duration_cast<std::chrono::milliseconds>(d).count();
  };
  const auto t1 = std::chrono::steady_clock::now();

  EXPECT_TRUE(op_errors.empty()) << op_errors.front();
  EXPECT_EQ(s.failures.load(), 0) << s.first_failure;
  EXPECT_EQ(dev->size(), kInitialSize + 2 * kGrowBy);
  std::map<std::string, std::string> id_of;
  for (const SnapshotInfo& si : dev->ListSnapshots()) id_of[si.name] = si.id;
  ASSERT_EQ(id_of.size(), static_cast<size_t>(kSnapshots));
  Status closed = CloseImage(std::move(disk));
  ASSERT_TRUE(closed.ok()) << closed.ToString();
  ExpectQemuCheckClean(path);

  // Every write by stamp, and the writes of each slot.
  std::map<uint64_t, WriteRecord> by_stamp;
  std::vector<std::vector<WriteRecord>> by_slot(kSlots);
  for (const auto& v : records) {
    for (const WriteRecord& r : v) {
      by_stamp[r.stamp] = r;
      by_slot[r.slot].push_back(r);
    }
  }
  ASSERT_GT(by_stamp.size(), 1000u) << "too few writes to judge";
  const auto t2 = std::chrono::steady_clock::now();
  int overlapping = 0;  // writes in flight while some snapshot was taken
  for (const SnapshotRecord& sr : snaps) {
    ASSERT_TRUE(id_of.count(sr.name)) << sr.name;
    const std::string raw = dir.File(sr.name + ".raw");
    ShOk("qemu-img convert -f qcow2 -O raw -l snapshot.id=" + id_of[sr.name] + " " +
         ShellQuote(path) + " " + ShellQuote(raw));
    std::vector<uint8_t> data = ReadFileBytes(raw);
    ASSERT_GE(data.size(), kSlots * kBlock) << sr.name;
    int bad = 0;
    for (uint64_t slot = 0; slot < kSlots && bad < 5; ++slot) {
      const uint8_t* b = &data[slot * kBlock];
      uint64_t found;
      std::memcpy(&found, b, 8);
      for (size_t i = 8; i < kBlock; i += 8) {
        if (std::memcmp(b + i, &found, 8) != 0) {
          ADD_FAILURE() << sr.name << " slot " << slot << ": torn block";
          ++bad;
          break;
        }
      }
      // The latest completion among writes that completed before the
      // request, and the latest submission among them.
      bool any_before = false;
      uint64_t last_submit_before = 0;
      for (const WriteRecord& w : by_slot[slot]) {
        if (w.completed < sr.requested) {
          any_before = true;
          last_submit_before = std::max(last_submit_before, w.submitted);
        }
        if (w.submitted < sr.completed && w.completed > sr.requested) ++overlapping;
      }
      if (found == 0) {
        if (any_before) {
          ADD_FAILURE() << sr.name << " slot " << slot
                        << ": zeros although a write completed before the snapshot";
          ++bad;
        }
        continue;
      }
      auto it = by_stamp.find(found);
      if (it == by_stamp.end() || it->second.slot != slot) {
        ADD_FAILURE() << sr.name << " slot " << slot << ": unknown stamp " << found;
        ++bad;
        continue;
      }
      const WriteRecord& w = it->second;
      if (w.submitted > sr.completed) {
        ADD_FAILURE() << sr.name << " slot " << slot << ": holds stamp " << found
                      << " submitted at " << w.submitted << ", after the snapshot completed at "
                      << sr.completed;
        ++bad;
      } else if (any_before && w.completed < last_submit_before) {
        ADD_FAILURE() << sr.name << " slot " << slot << ": holds stamp " << found
                      << " (completed at " << w.completed << ") although a write submitted at "
                      << last_submit_before << " completed before the snapshot was requested at "
                      << sr.requested;
        ++bad;
      }
    }
    std::remove(raw.c_str());
  }
  std::printf(
      "[ INFO     ] %zu writes; load %lld ms, close+check %lld ms, snapshot reads %lld ms\n",
      by_stamp.size(), static_cast<long long>(ms(t1 - t0)), static_cast<long long>(ms(t2 - t1)),
      static_cast<long long>(ms(std::chrono::steady_clock::now() - t2)));
  // The snapshots really were taken under load.
  EXPECT_GT(overlapping, 0);
  auto info = ShOk("qemu-img info " + ShellQuote(path));
  EXPECT_NE(info.output.find("virtual size: 24 MiB"), std::string::npos) << info.output;
}

}  // namespace
}  // namespace kvblk
