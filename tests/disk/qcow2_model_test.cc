// A randomized model test of the qcow2 device with concurrent requests.
//
// Operations (read, write, discard, write zeroes, flush, compressed write)
// run in batches of up to 8 requests in flight at once on the thread's event
// loop; requests of one batch never overlap in guest bytes, so each one's
// outcome is defined by the model state before the batch. Every read is
// checked against an in-memory model; a discard must leave each byte either
// old or zero, and what kvblk then returns becomes the model. The device runs
// with the smallest L2 and refcount caches so tables are evicted and loaded
// again constantly. Halfway through the image is closed and reopened; at the
// end `qemu-img check` must find it clean and `qemu-img compare` equal to the
// model dumped to a raw file.
//
// Seeds are fixed; a failure message names the seed (SCOPED_TRACE) so it can
// be replayed with --gtest_filter.
#include <gtest/gtest.h>
#include <sys/uio.h>

#include <algorithm>
#include <chrono>
#include <coroutine>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "disk/file.h"
#include "disk/qcow2_device.h"
#include "kvblk/block_device.h"
#include "kvblk/event_loop.h"
#include "kvblk/image_create.h"
#include "kvblk/task.h"
#include "tests/support/qemu_util.h"
#include "tests/support/test_util.h"

namespace kvblk {
namespace {

using testing::ExpectQemuCheckClean;
using testing::ExpectQemuCompareEqual;
using testing::FirstDifference;
using testing::PatternBytes;
using testing::ReadFileBytes;
using testing::ReadRange;
using testing::ShellQuote;
using testing::ShOk;
using testing::TempDir;
using testing::WriteFileBytes;

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * 1024;
constexpr int kBatch = 8;

struct ModelCase {
  uint32_t seed;
  uint32_t cluster_size;
  int refcount_bits;
  bool v3;
  bool backing;
  uint64_t size;
  int ops;
};

std::string ModelName(const ::testing::TestParamInfo<ModelCase>& info) {
  const ModelCase& c = info.param;
  return "seed" + std::to_string(c.seed) + "_" + (c.v3 ? "v3" : "v2") + "_cluster" +
         std::to_string(c.cluster_size) + "_refbits" + std::to_string(c.refcount_bits) +
         (c.backing ? "_backing" : "");
}

enum class OpKind { kRead, kWrite, kDiscard, kZeroes, kZeroesUnmap, kFlush, kCompressed };

const char* OpName(OpKind k) {
  switch (k) {
    case OpKind::kRead: return "read";
    case OpKind::kWrite: return "write";
    case OpKind::kDiscard: return "discard";
    case OpKind::kZeroes: return "write-zeroes";
    case OpKind::kZeroesUnmap: return "write-zeroes(unmap)";
    case OpKind::kFlush: return "flush";
    case OpKind::kCompressed: return "compressed write";
  }
  return "?";
}

// One request of a batch, with the buffers that must outlive it.
struct Op {
  OpKind kind = OpKind::kFlush;
  uint64_t offset = 0;
  uint64_t length = 0;
  std::vector<uint8_t> buf;
  std::vector<iovec> iov;  // scatter list over `buf`
  bool done = false;
  Status status;
};

// Splits `buf` into 1..3 iovecs at random points.
std::vector<iovec> ScatterOver(std::vector<uint8_t>& buf, std::mt19937_64& rng) {
  std::vector<iovec> iov;
  size_t pos = 0;
  const int pieces = 1 + static_cast<int>(rng() % 3);
  for (int i = 0; i < pieces - 1 && pos < buf.size(); ++i) {
    size_t n = 1 + rng() % (buf.size() - pos);
    iov.push_back({buf.data() + pos, n});
    pos += n;
  }
  if (pos < buf.size()) iov.push_back({buf.data() + pos, buf.size() - pos});
  return iov;
}

class ModelRunner {
 public:
  ModelRunner(const ModelCase& c, std::vector<uint8_t>* model)
      : c_(c), model_(model), rng_(c.seed) {}

  // Runs `ops` operations on `dev` in batches. Stops at the first failure.
  void Run(BlockDevice& dev, int ops) {
    for (int done = 0; done < ops && !::testing::Test::HasFailure(); done += kBatch) {
      RunBatch(dev);
    }
  }

 private:
  std::pair<uint64_t, uint64_t> RandomRange() {
    const uint64_t cs = c_.cluster_size;
    uint64_t len;
    switch (rng_() % 4) {
      case 0: len = 1 + rng_() % 700; break;
      case 1: len = 1 + rng_() % (3 * cs); break;
      case 2: len = cs * (1 + rng_() % 3); break;
      default: len = 1 + rng_() % (192 * kKiB); break;
    }
    uint64_t off = rng_() % c_.size;
    if (rng_() % 3 == 0) off -= off % cs;
    return {off, std::min(len, c_.size - off)};
  }

  OpKind RandomKind() {
    const int p = static_cast<int>(rng_() % 100);
    if (p < 35) return OpKind::kRead;
    if (p < 70) return OpKind::kWrite;
    if (p < 80) return OpKind::kDiscard;
    if (p < 86) return OpKind::kZeroes;
    if (p < 92) return OpKind::kZeroesUnmap;
    if (p < 95) return OpKind::kFlush;
    return OpKind::kCompressed;
  }

  // Whether [off, off+len) overlaps a range already taken in this batch.
  static bool Overlaps(const std::vector<std::unique_ptr<Op>>& ops, uint64_t off, uint64_t len) {
    for (const auto& o : ops) {
      if (o->length == 0) continue;
      if (off < o->offset + o->length && o->offset < off + len) return true;
    }
    return false;
  }

  std::unique_ptr<Op> MakeOp(BlockDevice& dev, const std::vector<std::unique_ptr<Op>>& taken) {
    auto op = std::make_unique<Op>();
    op->kind = RandomKind();
    if (op->kind == OpKind::kFlush) return op;
    if (op->kind == OpKind::kCompressed) {
      const uint64_t cs = c_.cluster_size;
      op->offset = (rng_() % c_.size) / cs * cs;
      op->length = std::min<uint64_t>(cs, c_.size - op->offset);
      if (Overlaps(taken, op->offset, op->length)) return nullptr;
      // Only clusters this image does not map with data yet qualify.
      auto bs = RunSync(dev.GetBlockStatus(op->offset, op->length));
      EXPECT_TRUE(bs.ok()) << bs.status().ToString();
      if (!bs.ok() || (bs->depth == 0 && bs->data)) return nullptr;
      op->buf.resize(op->length);
      for (size_t i = 0; i < op->buf.size(); i += 32) {
        std::fill_n(op->buf.begin() + static_cast<std::ptrdiff_t>(i),
                    std::min<size_t>(32, op->buf.size() - i), static_cast<uint8_t>(rng_()));
      }
      return op;
    }
    auto [off, len] = RandomRange();
    if (Overlaps(taken, off, len)) return nullptr;
    op->offset = off;
    op->length = len;
    if (op->kind == OpKind::kWrite) {
      op->buf = PatternBytes(static_cast<size_t>(len), static_cast<uint32_t>(rng_()));
      op->iov = ScatterOver(op->buf, rng_);
    } else if (op->kind == OpKind::kRead) {
      op->buf.assign(static_cast<size_t>(len), 0xee);
      op->iov = ScatterOver(op->buf, rng_);
    }
    return op;
  }

  static Task<Status> Issue(BlockDevice& dev, Op& op) {
    switch (op.kind) {
      case OpKind::kRead:
        return dev.Read(op.offset, op.iov.data(), static_cast<int>(op.iov.size()));
      case OpKind::kWrite:
        return dev.Write(op.offset, op.iov.data(), static_cast<int>(op.iov.size()));
      case OpKind::kDiscard: return dev.Discard(op.offset, op.length);
      case OpKind::kZeroes: return dev.WriteZeroes(op.offset, op.length, false);
      case OpKind::kZeroesUnmap: return dev.WriteZeroes(op.offset, op.length, true);
      case OpKind::kFlush: return dev.Flush();
      case OpKind::kCompressed: return dev.WriteCompressed(op.offset, op.buf.data(), op.length);
    }
    return dev.Flush();
  }

  void RunBatch(BlockDevice& dev) {
    std::vector<std::unique_ptr<Op>> ops;
    for (int tries = 0; ops.size() < kBatch && tries < 4 * kBatch; ++tries) {
      auto op = MakeOp(dev, ops);
      if (op) ops.push_back(std::move(op));
    }
    // All in flight at once on this thread's loop.
    int remaining = static_cast<int>(ops.size());
    for (auto& op : ops) {
      Op* p = op.get();
      Spawn(Issue(dev, *p), [p, &remaining](Status st) {
        p->status = std::move(st);
        p->done = true;
        --remaining;
      });
    }
    EventLoop::Current().RunUntil([&] { return remaining == 0; });

    for (auto& op : ops) {
      const Op& o = *op;
      ASSERT_TRUE(o.status.ok()) << OpName(o.kind) << " " << o.offset << "+" << o.length << ": "
                                 << o.status.ToString();
    }
    for (auto& op : ops) Settle(dev, *op);
    ++batches_;
  }

  // Checks a finished request against the model and applies it.
  void Settle(BlockDevice& dev, const Op& o) {
    auto at = [&](uint64_t off) { return model_->begin() + static_cast<std::ptrdiff_t>(off); };
    switch (o.kind) {
      case OpKind::kRead: {
        std::vector<uint8_t> want(at(o.offset), at(o.offset + o.length));
        int64_t d = FirstDifference(o.buf, want);
        ASSERT_EQ(d, -1) << "batch " << batches_ << ": read " << o.offset << "+" << o.length
                         << " differs from the model at guest offset " << o.offset + d;
        break;
      }
      case OpKind::kWrite:
      case OpKind::kCompressed:
        std::copy(o.buf.begin(), o.buf.end(), at(o.offset));
        break;
      case OpKind::kZeroes:
      case OpKind::kZeroesUnmap:
        std::fill(at(o.offset), at(o.offset + o.length), 0);
        break;
      case OpKind::kDiscard: {
        auto got = ReadRange(dev, o.offset, static_cast<size_t>(o.length));
        ASSERT_TRUE(got.ok()) << got.status().ToString();
        for (uint64_t i = 0; i < o.length; ++i) {
          uint8_t b = (*got)[i];
          uint8_t old = (*model_)[o.offset + i];
          ASSERT_TRUE(b == old || b == 0)
              << "batch " << batches_ << ": after discard " << o.offset << "+" << o.length
              << " byte " << o.offset + i << " is " << int{b} << ", neither old " << int{old}
              << " nor zero";
        }
        std::copy(got->begin(), got->end(), at(o.offset));
        break;
      }
      case OpKind::kFlush:
        break;
    }
  }

  const ModelCase& c_;
  std::vector<uint8_t>* model_;
  std::mt19937_64 rng_;
  int batches_ = 0;
};

class Qcow2Model : public ::testing::TestWithParam<ModelCase> {};

TEST_P(Qcow2Model, ConcurrentRandomOperationsMatchModelAndQemu) {
  const ModelCase& c = GetParam();
  SCOPED_TRACE("model seed " + std::to_string(c.seed));
  TempDir dir;
  const std::string img = dir.File("model.qcow2");
  const std::string raw = dir.File("model.raw");

  CreateOptions co;
  co.size = c.size;
  co.cluster_size = c.cluster_size;
  co.refcount_bits = c.refcount_bits;
  co.compat_v3 = c.v3;
  if (c.backing) {
    const std::string base = dir.File("base.qcow2");
    WriteFileBytes(dir.File("pat"), PatternBytes(3331, c.seed));
    ShOk("qemu-img create -f qcow2 -o cluster_size=4096 " + ShellQuote(base) + " " +
         std::to_string(c.size));
    ShOk("cd " + ShellQuote(dir.path()) +
         " && qemu-io -f qcow2 -c 'write -s pat 0 1500000' -c 'write -s pat 2000001 999999' "
         "base.qcow2");
    co.backing_file = "base.qcow2";
    co.backing_format = "qcow2";
  }
  Status st = CreateImage(img, co);
  ASSERT_TRUE(st.ok()) << st.ToString();
  ShOk("qemu-img convert -O raw " + ShellQuote(img) + " " + ShellQuote(raw));
  std::vector<uint8_t> model = ReadFileBytes(raw);
  ASSERT_EQ(model.size(), c.size);

  ModelRunner runner(c, &model);
  for (int half = 0; half < 2 && !HasFailure(); ++half) {
    OpenOptions o;
    o.format = "qcow2";
    o.l2_cache_bytes = 1;         // the minimum: two L2 tables
    o.refcount_cache_bytes = 1;   // the minimum: four refcount blocks
    auto dev = OpenImage(img, o);
    ASSERT_TRUE(dev.ok()) << dev.status().ToString();
    runner.Run(**dev, c.ops / 2);
    st = CloseImage(std::move(*dev));
    ASSERT_TRUE(st.ok()) << st.ToString();
  }
  ASSERT_FALSE(HasFailure());
  ExpectQemuCheckClean(img);
  WriteFileBytes(raw, model);
  ExpectQemuCompareEqual(img, raw);
}

INSTANTIATE_TEST_SUITE_P(Seeds, Qcow2Model,
                         ::testing::Values(ModelCase{1, 512, 16, true, false, 3 * kMiB, 3000},
                                           ModelCase{2, 4096, 16, true, false, 8 * kMiB, 3000},
                                           ModelCase{3, 4096, 1, true, true, 6 * kMiB, 3000},
                                           ModelCase{4, 4096, 16, false, true, 6 * kMiB, 2000},
                                           ModelCase{5, 65536, 64, true, false, 8 * kMiB, 2000},
                                           ModelCase{6, 1024, 16, false, false, 4 * kMiB, 3000},
                                           ModelCase{7, 2 * 1024 * 1024, 16, true, false,
                                                     12 * kMiB, 1000},
                                           // Grows the refcount table (512-byte
                                           // clusters, 64-bit refcounts).
                                           ModelCase{8, 512, 64, true, true, 3 * kMiB, 3000}),
                         ModelName);

// --- deterministic races -----------------------------------------------------
//
// These hold one chosen file operation at a gate while other requests run,
// to force interleavings that happen under load only now and then.

// A gate a coroutine can wait at until the test opens it.
class Gate {
 public:
  auto Wait() {
    struct Awaiter {
      Gate* g;
      bool await_ready() const { return g->open_; }
      void await_suspend(std::coroutine_handle<> h) { g->waiter_ = h; }
      void await_resume() const {}
    };
    return Awaiter{this};
  }
  void Open() {
    open_ = true;
    if (waiter_) EventLoop::Current().Schedule(std::exchange(waiter_, {}));
  }
  bool has_waiter() const { return static_cast<bool>(waiter_); }

 private:
  bool open_ = false;
  std::coroutine_handle<> waiter_;
};

// Forwards to a real file, but holds the first read (or write) at
// `held_offset` at the gate, once armed.
class GatedFile final : public File {
 public:
  GatedFile(std::unique_ptr<File> inner, Gate* gate) : inner_(std::move(inner)), gate_(gate) {}
  void Arm(uint64_t offset, bool write) {
    armed_ = true;
    held_offset_ = offset;
    held_write_ = write;
  }

  Task<Status> ReadV(const iovec* iov, int iovcnt, uint64_t offset) override {
    if (armed_ && !held_write_ && offset == held_offset_) {
      armed_ = false;
      co_await gate_->Wait();
    }
    co_return co_await inner_->ReadV(iov, iovcnt, offset);
  }
  Task<Status> WriteV(const iovec* iov, int iovcnt, uint64_t offset) override {
    if (armed_ && held_write_ && offset == held_offset_) {
      armed_ = false;
      // Capture the data now, as an engine does once a request is queued.
      std::vector<uint8_t> copy;
      for (int i = 0; i < iovcnt; ++i) {
        const auto* p = static_cast<const uint8_t*>(iov[i].iov_base);
        copy.insert(copy.end(), p, p + iov[i].iov_len);
      }
      co_await gate_->Wait();
      co_return co_await inner_->Write(copy.data(), copy.size(), offset);
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

 private:
  std::unique_ptr<File> inner_;
  Gate* gate_;
  bool armed_ = false;
  bool held_write_ = false;
  uint64_t held_offset_ = 0;
};

constexpr uint64_t kRaceCluster = 4096;
constexpr uint64_t kTableSpan = 512 * kRaceCluster;  // guest bytes per L2 table

// A race fixture: an 8 MiB image with 4 KiB clusters, opened through a
// GatedFile with room for two L2 tables in the cache.
class Qcow2Races : public ::testing::Test {
 protected:
  void SetUp() override {
    img_ = dir_.File("race.qcow2");
    CreateOptions co;
    co.size = 8 * kMiB;
    co.cluster_size = kRaceCluster;
    ASSERT_TRUE(CreateImage(img_, co).ok());
    auto posix = OpenPosixFile(img_, FileOptions{});
    ASSERT_TRUE(posix.ok()) << posix.status().ToString();
    auto gated = std::make_unique<GatedFile>(std::move(*posix), &gate_);
    file_ = gated.get();
    OpenOptions oo;
    oo.format = "qcow2";
    oo.l2_cache_bytes = 2 * kRaceCluster;
    auto opened = RunSync(qcow2::Qcow2Device::Open(std::move(gated), oo, 0));
    ASSERT_TRUE(opened.ok()) << opened.status().ToString();
    dev_ = std::move(*opened);
  }

  void Write(uint64_t off, const std::vector<uint8_t>& data) {
    Status st = RunSync(dev_->Write(off, data.data(), data.size()));
    ASSERT_TRUE(st.ok()) << st.ToString();
  }

  // Host offset of L2 table `i`, from the L1 table on disk.
  uint64_t L2TableOffset(int i) {
    std::vector<uint8_t> bytes = ReadFileBytes(img_);
    uint64_t l1 = 0, e = 0;
    for (int k = 40; k < 48; ++k) l1 = (l1 << 8) | bytes[k];
    for (int k = 0; k < 8; ++k) e = (e << 8) | bytes[l1 + 8 * i + k];
    return e & 0x00fffffffffffe00ull;
  }

  // Closes the device and has qemu-img judge the image.
  void CloseAndCheck() {
    Status st = RunSync(dev_->Close());
    EXPECT_TRUE(st.ok()) << st.ToString();
    dev_.reset();
    ExpectQemuCheckClean(img_);
  }

  TempDir dir_;
  std::string img_;
  Gate gate_;
  GatedFile* file_ = nullptr;
  std::unique_ptr<qcow2::Qcow2Device> dev_;
};

// An in-place write over two clusters looks up the second one's L2 table (a
// cache miss, held here) after it has mapped the first. Meanwhile an
// overlapping discard frees the first cluster, a flush returns it to the
// allocator, and a write elsewhere allocates a cluster. The in-place write
// must not land in that other guest cluster.
TEST_F(Qcow2Races, InPlaceWriteRacingDiscardNeverLandsInAnotherCluster) {
  const uint64_t a = kTableSpan - kRaceCluster;          // last cluster of L2 table 0
  const uint64_t b = kTableSpan;                         // first cluster of L2 table 1
  const uint64_t x = 3 * kTableSpan + 8 * kRaceCluster;  // under L2 table 3
  Write(a, PatternBytes(2 * kRaceCluster, 1));
  Write(3 * kTableSpan, PatternBytes(kRaceCluster, 2));
  ASSERT_TRUE(RunSync(dev_->Flush()).ok());
  // Leave only tables 3 and 0 cached.
  ASSERT_TRUE(ReadRange(*dev_, 3 * kTableSpan, 512).ok());
  ASSERT_TRUE(ReadRange(*dev_, a, 512).ok());
  const uint64_t table1 = L2TableOffset(1);
  ASSERT_NE(table1, 0u);
  file_->Arm(table1, /*write=*/false);

  EventLoop& loop = EventLoop::Current();
  std::vector<uint8_t> new_ab = PatternBytes(2 * kRaceCluster, 3);
  bool w_done = false;
  Status w_status;
  Spawn(dev_->Write(a, new_ab.data(), new_ab.size()), [&](Status st) {
    w_status = std::move(st);
    w_done = true;
  });
  loop.RunUntil([&] { return gate_.has_waiter() || w_done; });
  ASSERT_TRUE(gate_.has_waiter()) << "the write never looked up L2 table 1";

  ASSERT_TRUE(RunSync(dev_->Discard(a, kRaceCluster)).ok());
  ASSERT_TRUE(RunSync(dev_->Flush()).ok());
  std::vector<uint8_t> xdata = PatternBytes(kRaceCluster, 4);
  Write(x, xdata);

  gate_.Open();
  loop.RunUntil([&] { return w_done; });
  ASSERT_TRUE(w_status.ok()) << w_status.ToString();

  auto got_x = ReadRange(*dev_, x, kRaceCluster);
  ASSERT_TRUE(got_x.ok());
  EXPECT_EQ(FirstDifference(*got_x, xdata), -1) << "the racing write clobbered another cluster";
  auto got_b = ReadRange(*dev_, b, kRaceCluster);
  ASSERT_TRUE(got_b.ok());
  EXPECT_EQ(FirstDifference(*got_b, std::vector<uint8_t>(new_ab.begin() + kRaceCluster,
                                                         new_ab.end())),
            -1);
  CloseAndCheck();
}

// An L2 table's write-back on eviction is held in flight; meanwhile the
// table changes (a discard), a flush writes the newer copy and frees the
// discarded cluster. When the held, older copy finally lands it must not
// replace the newer one on disk: the discarded entry would come back
// pointing at a free cluster that the next allocation reuses.
TEST_F(Qcow2Races, StaleL2WriteBackNeverOverwritesNewerCopy) {
  const uint64_t a = 0;                                  // under L2 table 0
  const uint64_t x = 3 * kTableSpan + 8 * kRaceCluster;  // under L2 table 3
  Write(a, PatternBytes(kRaceCluster, 1));
  Write(kTableSpan, PatternBytes(kRaceCluster, 2));      // L2 table 1
  Write(3 * kTableSpan, PatternBytes(kRaceCluster, 3));  // L2 table 3
  ASSERT_TRUE(RunSync(dev_->Flush()).ok());
  const uint64_t table0 = L2TableOffset(0);
  ASSERT_NE(table0, 0u);
  // Table 0 dirty (a new allocation under it) and least recently used;
  // table 3 cached.
  Write(a + 8 * kRaceCluster, PatternBytes(512, 4));
  ASSERT_TRUE(ReadRange(*dev_, 3 * kTableSpan, 512).ok());

  // Loading table 1 evicts table 0, whose write-back is held at the gate.
  file_->Arm(table0, /*write=*/true);
  EventLoop& loop = EventLoop::Current();
  std::vector<uint8_t> rbuf(512);
  bool r1_done = false;
  Spawn(dev_->Read(kTableSpan, rbuf.data(), rbuf.size()), [&](Status st) {
    EXPECT_TRUE(st.ok()) << st.ToString();
    r1_done = true;
  });
  loop.RunUntil([&] { return gate_.has_waiter() || r1_done; });
  ASSERT_TRUE(gate_.has_waiter()) << "table 0 was never written back";

  // The table changes while its old copy is in flight, and a flush makes the
  // change durable and frees the discarded cluster. The flush may have to
  // wait for the held copy: let it get as far as it can, then release the
  // held write. (A bounded wait for the flush to settle, not a timing
  // assertion.)
  ASSERT_TRUE(RunSync(dev_->Discard(a, kRaceCluster)).ok());
  bool f_done = false;
  Status f_status;
  Spawn(dev_->Flush(), [&](Status st) {
    f_status = std::move(st);
    f_done = true;
  });
  const auto settle = std::chrono::steady_clock::now() + std::chrono::milliseconds(300);
  while (!f_done && std::chrono::steady_clock::now() < settle) loop.RunOnce();

  gate_.Open();
  loop.RunUntil([&] { return r1_done && f_done; });
  ASSERT_TRUE(f_status.ok()) << f_status.ToString();

  // Push table 0 out of the cache (clean now) and reuse the freed cluster.
  ASSERT_TRUE(ReadRange(*dev_, 3 * kTableSpan, 512).ok());
  ASSERT_TRUE(ReadRange(*dev_, kTableSpan, 512).ok());
  std::vector<uint8_t> xdata = PatternBytes(kRaceCluster, 5);
  Write(x, xdata);
  auto got_a = ReadRange(*dev_, a, kRaceCluster);
  ASSERT_TRUE(got_a.ok()) << got_a.status().ToString();
  EXPECT_EQ(FirstDifference(*got_a, std::vector<uint8_t>(kRaceCluster, 0)), -1)
      << "the discarded cluster came back";
  CloseAndCheck();
}

}  // namespace
}  // namespace kvblk
