// Concurrency of the qcow2 device (issue 3): allocating writes to one
// cluster allocate once, data writes to different clusters are in flight at
// the same time, and reads from several threads stay correct while another
// thread allocates.
//
// The device is opened on the test thread (its home loop); other threads
// install their own EventLoop and issue requests from coroutines on it. The
// home thread keeps running its loop until every other thread is done.
#include <gtest/gtest.h>
#include <sys/uio.h>

#include <algorithm>
#include <atomic>
#include <coroutine>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "disk/file.h"
#include "disk/io_engine.h"
#include "disk/iov.h"
#include "disk/mem_file.h"
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
using testing::ReadRange;
using testing::TempDir;
using testing::WriteFileBytes;

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;
constexpr uint64_t kSector = 512;

// The 8-byte word that fills guest half `half` of guest cluster `cluster`
// in these tests. The top byte marks test data, so that a File wrapper can
// recognise data writes among metadata writes.
constexpr uint64_t kDataMark = uint64_t{0xc1} << 56;
uint64_t HalfWord(uint64_t cluster, int half) {
  return kDataMark | (cluster << 8) | static_cast<uint64_t>(half + 1);
}
bool IsDataWord(uint64_t w) { return (w >> 56) == 0xc1; }

std::vector<uint8_t> Filled(size_t len, uint64_t word) {
  std::vector<uint8_t> b(len);
  for (size_t i = 0; i + 8 <= len; i += 8) std::memcpy(&b[i], &word, 8);
  return b;
}

// Forwards to another File. Records, for every test data word found at the
// start of a sector of a write, which host clusters it was written to; with
// Arm(), holds every write carrying test data until Release().
class WatchingFile final : public File {
 public:
  WatchingFile(std::unique_ptr<File> inner, uint32_t cluster_bits)
      : inner_(std::move(inner)), cluster_bits_(cluster_bits) {}

  Task<Status> ReadV(const iovec* iov, int iovcnt, uint64_t offset) override {
    return inner_->ReadV(iov, iovcnt, offset);
  }
  Task<Status> WriteV(const iovec* iov, int iovcnt, uint64_t offset) override {
    const bool data = Record(iov, iovcnt, offset);
    if (data && armed_) {
      ++held_count_;
      max_held_ = std::max(max_held_, held_count_);
      co_await Hold{this};
      --held_count_;
    }
    co_return co_await inner_->WriteV(iov, iovcnt, offset);
  }
  Task<Status> Flush() override { return inner_->Flush(); }
  Task<Status> Discard(uint64_t offset, uint64_t length) override {
    return inner_->Discard(offset, length);
  }
  Task<Status> WriteZeroes(uint64_t offset, uint64_t length, bool allocate) override {
    return inner_->WriteZeroes(offset, length, allocate);
  }
  Result<uint64_t> Size() override { return inner_->Size(); }
  Status Truncate(uint64_t size) override { return inner_->Truncate(size); }
  Result<uint64_t> AllocatedBytes() override { return inner_->AllocatedBytes(); }
  const std::string& path() const override { return inner_->path(); }
  bool read_only() const override { return inner_->read_only(); }

  // Host clusters that received sectors starting with data word `w`.
  std::set<uint64_t> HostClustersOf(uint64_t w) {
    std::lock_guard<std::mutex> l(mu_);
    return written_[w];
  }

  // Single-threaded use only (the home loop): from now on, writes of test
  // data wait until Release().
  void Arm() { armed_ = true; }
  int held() const { return held_count_; }
  int max_held() const { return max_held_; }
  // Disarms and resumes every held write on the calling thread's loop.
  void Release() {
    armed_ = false;
    for (auto h : waiting_) EventLoop::Current().Schedule(h);
    waiting_.clear();
  }

 private:
  struct Hold {
    WatchingFile* f;
    bool await_ready() const noexcept { return false; }
    void await_suspend(std::coroutine_handle<> h) { f->waiting_.push_back(h); }
    void await_resume() const noexcept {}
  };

  // Returns whether the write carries test data.
  bool Record(const iovec* iov, int iovcnt, uint64_t offset) {
    std::vector<uint8_t> flat(IovTotal(iov, iovcnt));
    size_t pos = 0;
    for (int i = 0; i < iovcnt; ++i) {
      std::memcpy(flat.data() + pos, iov[i].iov_base, iov[i].iov_len);
      pos += iov[i].iov_len;
    }
    bool data = false;
    std::lock_guard<std::mutex> l(mu_);
    for (uint64_t j = (kSector - offset % kSector) % kSector; j + 8 <= flat.size(); j += kSector) {
      uint64_t w;
      std::memcpy(&w, &flat[j], 8);
      if (!IsDataWord(w)) continue;
      written_[w].insert((offset + j) >> cluster_bits_);
      data = true;
    }
    return data;
  }

  std::unique_ptr<File> inner_;
  uint32_t cluster_bits_;
  std::mutex mu_;
  std::map<uint64_t, std::set<uint64_t>> written_;
  bool armed_ = false;
  int held_count_ = 0;
  int max_held_ = 0;
  std::vector<std::coroutine_handle<>> waiting_;
};

// Opens `img` (qcow2) through a WatchingFile on the calling thread's loop.
std::unique_ptr<Qcow2Device> OpenWatched(std::unique_ptr<File> file, uint32_t cluster_bits,
                                         uint64_t l2_cache_bytes, WatchingFile** watch) {
  auto w = std::make_unique<WatchingFile>(std::move(file), cluster_bits);
  *watch = w.get();
  OpenOptions oo;
  oo.format = "qcow2";
  oo.l2_cache_bytes = l2_cache_bytes;
  auto dev = RunSync(Qcow2Device::Open(std::move(w), oo, 0));
  EXPECT_TRUE(dev.ok()) << dev.status().ToString();
  return dev.ok() ? std::move(*dev) : nullptr;
}

// Runs `body` on `n` new threads, each with its own io_uring EventLoop
// installed, while the calling (home) thread runs its loop and `home_body`.
// Each body spawns coroutines and returns a predicate telling when they are
// all done; the thread runs its loop until then.
void RunOnThreads(int n, const std::function<std::function<bool()>(int)>& body,
                  const std::function<std::function<bool()>()>& home_body) {
  EventLoop& home = EventLoop::Current();
  std::atomic<int> finished{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < n; ++t) {
    threads.emplace_back([&, t] {
      int err = 0;
      auto engine = MakeUringEngine(256, &err);
      ASSERT_NE(engine, nullptr) << "io_uring: errno " << err;
      EventLoop loop(std::move(engine));
      EventLoop::SetCurrent(&loop);
      std::function<bool()> done = body(t);
      loop.RunUntil(done);
      EventLoop::SetCurrent(nullptr);
      ++finished;
      home.PostFunction([] {});  // lets the home loop see `finished`
    });
  }
  std::function<bool()> home_done = home_body();
  home.RunUntil([&] { return home_done() && finished == n; });
  for (auto& t : threads) t.join();
}

// Checks that guest cluster `gc` reads back as its two halves and that
// each half's data went to one and the same host cluster.
void ExpectOneClusterBothHalves(Qcow2Device& dev, WatchingFile& watch, uint64_t gc,
                                uint64_t cluster) {
  SCOPED_TRACE("guest cluster " + std::to_string(gc));
  auto got = ReadRange(dev, gc * cluster, cluster);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  std::vector<uint8_t> want = Filled(cluster / 2, HalfWord(gc, 0));
  std::vector<uint8_t> b = Filled(cluster / 2, HalfWord(gc, 1));
  want.insert(want.end(), b.begin(), b.end());
  EXPECT_EQ(testing::FirstDifference(*got, want), -1);

  std::set<uint64_t> hosts = watch.HostClustersOf(HalfWord(gc, 0));
  std::set<uint64_t> hosts_b = watch.HostClustersOf(HalfWord(gc, 1));
  hosts.insert(hosts_b.begin(), hosts_b.end());
  EXPECT_EQ(hosts.size(), 1u) << "the two halves were written to " << hosts.size()
                              << " host clusters: the cluster was allocated more than once";
  auto bs0 = RunSync(dev.GetBlockStatus(gc * cluster, cluster / 2));
  auto bs1 = RunSync(dev.GetBlockStatus(gc * cluster + cluster / 2, cluster / 2));
  ASSERT_TRUE(bs0.ok() && bs1.ok());
  ASSERT_TRUE(bs0->host_offset.has_value() && bs1->host_offset.has_value());
  EXPECT_EQ(*bs0->host_offset + cluster / 2, *bs1->host_offset);
  if (hosts.size() == 1) {
    EXPECT_EQ(*hosts.begin() * cluster, *bs0->host_offset);
  }
}

// qemu-img map: total bytes mapped to data in the top image.
uint64_t MappedDataBytes(const std::string& img) {
  testing::CommandResult r =
      testing::ShOk("qemu-img map --output=json " + testing::ShellQuote(img));
  uint64_t total = 0;
  size_t pos = 0;
  while ((pos = r.output.find("\"length\": ", pos)) != std::string::npos) {
    size_t eol = r.output.find('\n', pos);
    std::string line = r.output.substr(pos, eol - pos);
    pos = eol;
    if (line.find("\"data\": true") == std::string::npos) continue;
    total += std::stoull(line.substr(std::strlen("\"length\": ")));
  }
  return total;
}

// Two threads (the home thread and another) each write one half of the same
// 32 unallocated clusters, all at once: every cluster ends up with exactly
// one host cluster holding both halves, and qemu-img finds no leak.
TEST(Concurrency, TwoAllocatingWritesToOneClusterAllocateOnce) {
  constexpr uint64_t kCluster = 64 * kKiB;
  constexpr int kClusters = 32;
  TempDir dir;
  const std::string img = dir.File("two.qcow2");
  CreateOptions co;
  co.size = 8 * kMiB;
  co.cluster_size = kCluster;
  ASSERT_TRUE(CreateImage(img, co).ok());
  auto file = OpenPosixFile(img, FileOptions{});
  ASSERT_TRUE(file.ok()) << file.status().ToString();
  WatchingFile* watch = nullptr;
  std::unique_ptr<Qcow2Device> dev = OpenWatched(std::move(*file), 16, 0, &watch);
  ASSERT_NE(dev, nullptr);

  std::vector<std::vector<uint8_t>> halves[2];
  for (int h = 0; h < 2; ++h) {
    for (int c = 0; c < kClusters; ++c) halves[h].push_back(Filled(kCluster / 2, HalfWord(c, h)));
  }
  std::atomic<int> failed{0};
  // Half `h` of every cluster, all in flight at once on this thread.
  auto issue = [&](int h, int* done) {
    for (int c = 0; c < kClusters; ++c) {
      Spawn(dev->Write(c * kCluster + h * kCluster / 2, halves[h][c].data(), kCluster / 2),
            [&failed, done](Status st) {
              if (!st.ok()) ++failed;
              ++*done;
            });
    }
  };
  int done_other = 0, done_home = 0;
  RunOnThreads(
      1,
      [&](int) -> std::function<bool()> {
        issue(1, &done_other);
        return [&] { return done_other == kClusters; };
      },
      [&]() -> std::function<bool()> {
        issue(0, &done_home);
        return [&] { return done_home == kClusters; };
      });
  ASSERT_EQ(failed, 0);

  std::set<uint64_t> hosts;
  for (int c = 0; c < kClusters; ++c) {
    ExpectOneClusterBothHalves(*dev, *watch, c, kCluster);
    std::set<uint64_t> h = watch->HostClustersOf(HalfWord(c, 0));
    hosts.insert(h.begin(), h.end());
  }
  EXPECT_EQ(hosts.size(), static_cast<size_t>(kClusters)) << "guest clusters share host clusters";
  Status st = RunSync(dev->Close());
  ASSERT_TRUE(st.ok()) << st.ToString();
  dev.reset();
  ExpectQemuCheckClean(img);
  EXPECT_EQ(MappedDataBytes(img), kClusters * kCluster);
}

// The same on one loop: two coroutines write the halves of one cluster and
// the file operations interleave (MemFile completes each on a later pass).
TEST(Concurrency, TwoAllocatingCoroutinesOnOneLoopAllocateOnce) {
  constexpr uint64_t kCluster = 64 * kKiB;
  TempDir dir;
  const std::string img = dir.File("one.qcow2");
  CreateOptions co;
  co.size = 8 * kMiB;
  co.cluster_size = kCluster;
  ASSERT_TRUE(CreateImage(img, co).ok());
  auto mem = MemFile::Create("one.qcow2");
  mem->data()->bytes = ReadFileBytes(img);
  std::shared_ptr<MemFileData> bytes = mem->data();
  WatchingFile* watch = nullptr;
  std::unique_ptr<Qcow2Device> dev = OpenWatched(std::move(mem), 16, 0, &watch);
  ASSERT_NE(dev, nullptr);

  const uint64_t gc = 5;
  std::vector<uint8_t> a = Filled(kCluster / 2, HalfWord(gc, 0));
  std::vector<uint8_t> b = Filled(kCluster / 2, HalfWord(gc, 1));
  int done = 0;
  Spawn(dev->Write(gc * kCluster, a.data(), a.size()), [&](Status st) {
    EXPECT_TRUE(st.ok()) << st.ToString();
    ++done;
  });
  Spawn(dev->Write(gc * kCluster + kCluster / 2, b.data(), b.size()), [&](Status st) {
    EXPECT_TRUE(st.ok()) << st.ToString();
    ++done;
  });
  EventLoop::Current().RunUntil([&] { return done == 2; });
  ExpectOneClusterBothHalves(*dev, *watch, gc, kCluster);
  Status st = RunSync(dev->Close());
  ASSERT_TRUE(st.ok()) << st.ToString();
  dev.reset();
  WriteFileBytes(img, bytes->bytes);
  ExpectQemuCheckClean(img);
  EXPECT_EQ(MappedDataBytes(img), kCluster);
}

// Runs the home loop until `count` test-data writes are held, or until
// nothing can make progress (everything is on this loop and in memory).
void RunUntilHeldOrStuck(WatchingFile& watch, int count) {
  EventLoop& loop = EventLoop::Current();
  while (watch.held() < count && loop.RunOnce()) {
  }
}

// Eight 4 KiB writes to eight different clusters are issued together, first
// as allocating writes (clusters unallocated), then as in-place overwrites.
// The file below holds every data write until all eight have reached it: if
// the device serialised them, fewer would ever be in flight at once.
TEST(Concurrency, WritesToDifferentClustersOverlapInFlight) {
  constexpr uint64_t kCluster = 64 * kKiB;
  constexpr int kWrites = 8;
  TempDir dir;
  const std::string img = dir.File("overlap.qcow2");
  CreateOptions co;
  co.size = 8 * kMiB;
  co.cluster_size = kCluster;
  ASSERT_TRUE(CreateImage(img, co).ok());
  auto mem = MemFile::Create("overlap.qcow2");
  mem->data()->bytes = ReadFileBytes(img);
  std::shared_ptr<MemFileData> bytes = mem->data();
  WatchingFile* watch = nullptr;
  std::unique_ptr<Qcow2Device> dev = OpenWatched(std::move(mem), 16, 0, &watch);
  ASSERT_NE(dev, nullptr);
  // The L2 table exists before the race (its allocation is rare and may
  // serialise).
  std::vector<uint8_t> first = Filled(4 * kKiB, 1);
  ASSERT_TRUE(RunSync(dev->Write(100 * kCluster, first.data(), first.size())).ok());

  for (const char* phase : {"allocating", "in place"}) {
    SCOPED_TRACE(phase);
    std::vector<std::vector<uint8_t>> bufs;
    for (int i = 0; i < kWrites; ++i) {
      bufs.push_back(Filled(4 * kKiB, HalfWord(2 * i, phase[0] == 'a' ? 0 : 1)));
    }
    watch->Arm();
    int done = 0;
    for (int i = 0; i < kWrites; ++i) {
      Spawn(dev->Write(2 * i * kCluster, bufs[i].data(), bufs[i].size()), [&](Status st) {
        EXPECT_TRUE(st.ok()) << st.ToString();
        ++done;
      });
    }
    RunUntilHeldOrStuck(*watch, kWrites);
    EXPECT_EQ(watch->held(), kWrites) << "data writes to different clusters in flight at once";
    watch->Release();
    EventLoop::Current().RunUntil([&] { return done == kWrites; });
    for (int i = 0; i < kWrites; ++i) {
      auto got = ReadRange(*dev, 2 * i * kCluster, 4 * kKiB);
      ASSERT_TRUE(got.ok()) << got.status().ToString();
      EXPECT_EQ(testing::FirstDifference(*got, bufs[i]), -1) << "cluster " << 2 * i;
    }
  }
  Status st = RunSync(dev->Close());
  ASSERT_TRUE(st.ok()) << st.ToString();
  dev.reset();
  WriteFileBytes(img, bytes->bytes);
  ExpectQemuCheckClean(img);
}

// The 8-byte word of guest sector `s`, written once by the allocating
// thread (or by the prefill).
uint64_t SectorWord(uint64_t s) { return (uint64_t{0x5e} << 56) | s; }

// Reader threads (the home thread and two others) read random ranges of a
// 16 MiB image with 4 KiB clusters and an L2 cache of two tables, while a
// fourth thread allocates the clusters of its second half one by one: the
// readers' cache misses go to the home loop and back. Prefilled sectors
// must always read back exactly; a sector of the second half must read its
// data once its write completed before the read started, and zeros or its
// data before that.
TEST(Concurrency, ReadsFromSeveralThreadsWhileAnotherAllocates) {
  constexpr uint64_t kCluster = 4 * kKiB;
  constexpr uint64_t kSize = 16 * kMiB;
  constexpr uint64_t kHalf = kSize / 2;
  constexpr int kReaders = 2;
  constexpr int kDepth = 16;
  constexpr int kReadsPerLane = 150;
  TempDir dir;
  const std::string img = dir.File("readers.qcow2");
  CreateOptions co;
  co.size = kSize;
  co.cluster_size = kCluster;
  ASSERT_TRUE(CreateImage(img, co).ok());
  std::vector<uint8_t> all(kSize);
  for (uint64_t s = 0; s < kSize / kSector; ++s) {
    const uint64_t w = SectorWord(s);
    for (uint64_t i = 0; i < kSector; i += 8) std::memcpy(&all[s * kSector + i], &w, 8);
  }
  OpenOptions oo;
  oo.format = "qcow2";
  oo.l2_cache_bytes = 2 * kCluster;
  auto opened = OpenImage(img, oo);
  ASSERT_TRUE(opened.ok()) << opened.status().ToString();
  std::unique_ptr<BlockDevice> dev = std::move(*opened);
  for (uint64_t pos = 0; pos < kHalf; pos += kMiB) {
    ASSERT_TRUE(RunSync(dev->Write(pos, all.data() + pos, kMiB)).ok());
  }
  ASSERT_TRUE(RunSync(dev->Flush()).ok());

  const uint64_t clusters = kHalf / kCluster;
  std::vector<std::atomic<bool>> written(clusters);
  std::atomic<int> failures{0};
  std::mutex msg_mu;
  std::string first_failure;
  auto fail = [&](const std::string& m) {
    std::lock_guard<std::mutex> l(msg_mu);
    if (failures++ == 0) first_failure = m;
  };

  // A reader lane: kReadsPerLane random reads of 4..32 KiB, each checked.
  auto reader_lane = [&](uint32_t seed) -> Task<void> {
    std::mt19937_64 rng(seed);
    for (int i = 0; i < kReadsPerLane && failures == 0; ++i) {
      const uint64_t len = kCluster * (1 + rng() % 8);
      const uint64_t off = (rng() % ((kSize - len) / kSector)) * kSector;
      std::vector<bool> was_written(len / kCluster + 2);
      for (uint64_t c = off / kCluster; c * kCluster < off + len; ++c) {
        if (c * kCluster >= kHalf) {
          was_written[c - off / kCluster] = written[(c * kCluster - kHalf) / kCluster].load();
        }
      }
      std::vector<uint8_t> buf(len);
      Status st = co_await dev->Read(off, buf.data(), len);
      if (!st.ok()) {
        fail("read at " + std::to_string(off) + ": " + st.ToString());
        co_return;
      }
      for (uint64_t p = 0; p < len; p += kSector) {
        const uint64_t g = off + p;
        uint64_t got;
        std::memcpy(&got, &buf[p], 8);
        const uint64_t want = SectorWord(g / kSector);
        const bool may_be_zero = g >= kHalf && !was_written[g / kCluster - off / kCluster];
        static const std::vector<uint8_t> kZeros(kSector, 0);
        const bool is_data = std::memcmp(&buf[p], &all[g], kSector) == 0;
        const bool is_zero = std::memcmp(&buf[p], kZeros.data(), kSector) == 0;
        if (!is_data && !(may_be_zero && is_zero)) {
          fail("read at " + std::to_string(off) + "+" + std::to_string(len) + ": guest sector at " +
               std::to_string(g) + " holds word " + std::to_string(got) + ", expected " +
               std::to_string(want) + (may_be_zero ? " or zeros" : ""));
          co_return;
        }
      }
    }
  };
  // Start readers on a thread; returns its done predicate.
  auto start_readers = [&](uint32_t seed, int* done) {
    for (int l = 0; l < kDepth; ++l) {
      Spawn(reader_lane(seed * 100 + static_cast<uint32_t>(l)), [done] { ++*done; });
    }
  };
  // The allocating thread: every cluster of the second half, random order,
  // kDepth at a time.
  std::vector<uint64_t> order(clusters);
  for (uint64_t c = 0; c < clusters; ++c) order[c] = c;
  std::shuffle(order.begin(), order.end(), std::mt19937_64(7));
  std::atomic<uint64_t> next{0};
  auto writer_lane = [&]() -> Task<void> {
    for (uint64_t i; (i = next.fetch_add(1)) < clusters && failures == 0;) {
      const uint64_t off = kHalf + order[i] * kCluster;
      Status st = co_await dev->Write(off, all.data() + off, kCluster);
      if (!st.ok()) {
        fail("write at " + std::to_string(off) + ": " + st.ToString());
        co_return;
      }
      written[order[i]] = true;
    }
  };

  std::vector<int> reader_done(kReaders, 0);
  int writer_done = 0, home_done = 0;
  RunOnThreads(
      kReaders + 1,
      [&](int t) -> std::function<bool()> {
        if (t == kReaders) {
          for (int l = 0; l < kDepth; ++l) Spawn(writer_lane(), [&] { ++writer_done; });
          return [&] { return writer_done == kDepth; };
        }
        start_readers(static_cast<uint32_t>(t + 1), &reader_done[t]);
        return [&, t] { return reader_done[t] == kDepth; };
      },
      [&]() -> std::function<bool()> {
        start_readers(99, &home_done);
        return [&] { return home_done == kDepth; };
      });
  EXPECT_EQ(failures, 0) << first_failure;

  auto whole = testing::ReadWholeDevice(*dev, 1 * kMiB);
  ASSERT_TRUE(whole.ok()) << whole.status().ToString();
  EXPECT_EQ(testing::FirstDifference(*whole, all), -1);
  Status st = CloseImage(std::move(dev));
  ASSERT_TRUE(st.ok()) << st.ToString();
  ExpectQemuCheckClean(img);
}

}  // namespace
}  // namespace kvblk
