// PosixFile over both I/O engines (io_uring and the thread pool), including
// O_DIRECT with unaligned buffers.
#include "disk/io_engine.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <cstring>
#include <thread>
#include <vector>

#include "disk/file.h"
#include "kvblk/event_loop.h"
#include "tests/support/test_util.h"

namespace kvblk {
namespace {

enum class EngineKind { kUring, kThreads };

std::unique_ptr<IoEngine> Make(EngineKind k) {
  if (k == EngineKind::kThreads) return MakeThreadPoolEngine(2);
  int err = 0;
  return MakeUringEngine(64, &err);
}

// Runs `body` on a fresh thread whose event loop uses the given engine.
template <typename F>
void OnEngine(EngineKind k, F body) {
  std::thread t([&] {
    auto engine = Make(k);
    ASSERT_NE(engine, nullptr);
    EventLoop loop(std::move(engine));
    EventLoop::SetCurrent(&loop);
    body(loop);
    EventLoop::SetCurrent(nullptr);
  });
  t.join();
}

template <typename T>
T RunOn(EventLoop& loop, Task<T> task) {
  std::optional<T> out;
  Spawn(std::move(task), [&](T v) { out.emplace(std::move(v)); });
  loop.RunUntil([&] { return out.has_value(); });
  return std::move(*out);
}

class IoEngineTest : public ::testing::TestWithParam<EngineKind> {};

TEST_P(IoEngineTest, VectoredWriteThenReadRoundTrips) {
  testing::TempDir dir;
  std::string path = dir.File("f");
  OnEngine(GetParam(), [&](EventLoop& loop) {
    FileOptions fo;
    fo.create = true;
    auto f = OpenPosixFile(path, fo);
    ASSERT_TRUE(f.ok()) << f.status().ToString();
    auto a = testing::PatternBytes(3000, 1), b = testing::PatternBytes(5000, 2);
    iovec w[2] = {{a.data(), a.size()}, {b.data(), b.size()}};
    ASSERT_TRUE(RunOn(loop, (*f)->WriteV(w, 2, 100)).ok());
    ASSERT_TRUE(RunOn(loop, (*f)->Flush()).ok());
    std::vector<uint8_t> got(8000 + 50);
    ASSERT_TRUE(RunOn(loop, (*f)->Read(got.data(), got.size(), 100)).ok());
    EXPECT_EQ(0, memcmp(got.data(), a.data(), a.size()));
    EXPECT_EQ(0, memcmp(got.data() + 3000, b.data(), b.size()));
    for (size_t i = 8000; i < got.size(); ++i) ASSERT_EQ(got[i], 0) << "past EOF must read zero";
  });
}

TEST_P(IoEngineTest, PunchHoleAndZeroRangeReadBackZeros) {
  testing::TempDir dir;
  std::string path = dir.File("f");
  OnEngine(GetParam(), [&](EventLoop& loop) {
    FileOptions fo;
    fo.create = true;
    auto f = OpenPosixFile(path, fo);
    ASSERT_TRUE(f.ok());
    std::vector<uint8_t> ones(1 << 20, 1);
    ASSERT_TRUE(RunOn(loop, (*f)->Write(ones.data(), ones.size(), 0)).ok());
    ASSERT_TRUE(RunOn(loop, (*f)->Discard(65536, 65536)).ok());
    ASSERT_TRUE(RunOn(loop, (*f)->WriteZeroes(262144, 4096, true)).ok());
    std::vector<uint8_t> got(ones.size());
    ASSERT_TRUE(RunOn(loop, (*f)->Read(got.data(), got.size(), 0)).ok());
    for (size_t i = 0; i < got.size(); ++i) {
      bool zero = (i >= 65536 && i < 131072) || (i >= 262144 && i < 266240);
      ASSERT_EQ(got[i], zero ? 0 : 1) << i;
    }
  });
}

TEST_P(IoEngineTest, DirectIoBouncesUnalignedRequests) {
  testing::TempDir dir;
  std::string path = dir.File("f");
  OnEngine(GetParam(), [&](EventLoop& loop) {
    FileOptions fo;
    fo.create = true;
    fo.direct = true;
    auto f = OpenPosixFile(path, fo);
    if (!f.ok() && f.status().code() == StatusCode::kInvalidArgument) {
      GTEST_SKIP() << "filesystem has no O_DIRECT";
    }
    ASSERT_TRUE(f.ok()) << f.status().ToString();
    auto data = testing::PatternBytes(10000, 3);
    // Unaligned offset, length and buffer: must go through bounce buffers.
    ASSERT_TRUE(RunOn(loop, (*f)->Write(data.data() + 1, 9999, 777)).ok());
    std::vector<uint8_t> got(9999 + 1);
    ASSERT_TRUE(RunOn(loop, (*f)->Read(got.data() + 1, 9999, 777)).ok());
    EXPECT_EQ(0, memcmp(got.data() + 1, data.data() + 1, 9999));
    // Neighbouring bytes of the partial blocks were preserved (zeros).
    uint8_t edge[777];
    ASSERT_TRUE(RunOn(loop, (*f)->Read(edge, sizeof edge, 0)).ok());
    for (uint8_t b : edge) ASSERT_EQ(b, 0);
  });
}

TEST_P(IoEngineTest, ReadErrorsNameTheFileAndOffset) {
  testing::TempDir dir;
  std::string path = dir.File("f");
  OnEngine(GetParam(), [&](EventLoop& loop) {
    FileOptions fo;
    fo.create = true;
    fo.read_only = false;
    auto f = OpenPosixFile(path, fo);
    ASSERT_TRUE(f.ok());
    // A read into an invalid buffer fails with EFAULT.
    Status st = RunOn(loop, (*f)->Read(reinterpret_cast<void*>(8), 0, 0));
    EXPECT_TRUE(st.ok());  // zero-length reads succeed
    uint8_t b[16] = {1};
    ASSERT_TRUE(RunOn(loop, (*f)->Write(b, sizeof b, 0)).ok());
    st = RunOn(loop, (*f)->Read(reinterpret_cast<void*>(8), 16, 0));
    EXPECT_EQ(st.code(), StatusCode::kIoError);
    EXPECT_NE(st.message().find(path), std::string::npos) << st.message();
    EXPECT_NE(st.message().find("offset 0"), std::string::npos) << st.message();
  });
}

// A completion that runs a nested Reap (as a callback that drives the loop
// would) takes the completions after it; the outer Reap must not complete
// any of them a second time. Four reads of a cached file are submitted
// together, and the first one's completion reaps again.
TEST_P(IoEngineTest, NestedReapCompletesEachOperationOnce) {
  testing::TempDir dir;
  std::string path = dir.File("f");
  int fd = open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  ASSERT_GE(fd, 0);
  std::vector<uint8_t> data = testing::PatternBytes(16384, 7);
  ASSERT_EQ(pwrite(fd, data.data(), data.size(), 0), static_cast<ssize_t>(data.size()));
  auto engine = Make(GetParam());
  ASSERT_NE(engine, nullptr);
  struct Op : IoOp {
    IoEngine* engine = nullptr;
    int* total = nullptr;  // completions of all four
    int completions = 0;
    bool nest = false;
    uint8_t buf[4096];
    iovec v{buf, sizeof(buf)};
  };
  Op ops[4];
  int total = 0;
  for (int i = 0; i < 4; ++i) {
    Op& o = ops[i];
    o.engine = engine.get();
    o.total = &total;
    o.nest = i == 0;
    o.kind = IoOp::Kind::kReadv;
    o.fd = fd;
    o.iov = &o.v;
    o.iovcnt = 1;
    o.offset = static_cast<uint64_t>(i) * 4096;
    o.on_done = [](IoOp* op) {
      auto* self = static_cast<Op*>(op);
      ++self->completions;
      ++*self->total;
      if (self->nest) self->engine->Reap(false);
    };
    engine->Submit(&o);
  }
  for (int pass = 0; pass < 1000 && total < 4; ++pass) engine->Reap(total < 4);
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(ops[i].completions, 1) << "operation " << i;
    EXPECT_EQ(ops[i].result, 4096) << "operation " << i;
    EXPECT_EQ(std::memcmp(ops[i].buf, data.data() + i * 4096, 4096), 0) << "operation " << i;
  }
  EXPECT_EQ(total, 4);
  close(fd);
}

INSTANTIATE_TEST_SUITE_P(Engines, IoEngineTest,
                         ::testing::Values(EngineKind::kUring, EngineKind::kThreads),
                         [](const auto& info) {
                           return info.param == EngineKind::kUring ? "IoUring" : "ThreadPool";
                         });

// More operations than the completion ring holds, submitted without a reap
// in between (a 4-entry ring has 8 completion slots): each completes once,
// with its data, and the kernel never had to keep a completion outside the
// ring, because the engine held back what the ring had no slot for.
TEST(IoEngine, UringHoldsBackWhatTheCompletionRingCannotTake) {
  constexpr int kOps = 64;
  testing::TempDir dir;
  std::string path = dir.File("f");
  int fd = open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  ASSERT_GE(fd, 0);
  std::vector<uint8_t> data = testing::PatternBytes(kOps * 4096, 11);
  ASSERT_EQ(pwrite(fd, data.data(), data.size(), 0), static_cast<ssize_t>(data.size()));
  int err = 0;
  auto engine = MakeUringEngine(4, &err);
  ASSERT_NE(engine, nullptr) << std::strerror(err);
  struct Op : IoOp {
    int completions = 0;
    uint8_t buf[4096];
    iovec v{buf, sizeof(buf)};
  };
  std::vector<Op> ops(kOps);
  int total = 0;
  for (int i = 0; i < kOps; ++i) {
    Op& o = ops[i];
    o.kind = IoOp::Kind::kReadv;
    o.fd = fd;
    o.iov = &o.v;
    o.iovcnt = 1;
    o.offset = static_cast<uint64_t>(i) * 4096;
    o.waiter = {};
    o.on_done = [](IoOp* op) { ++static_cast<Op*>(op)->completions; };
    engine->Submit(&o);
  }
  EXPECT_EQ(engine->inflight(), kOps);
  for (int pass = 0; pass < 10000 && engine->inflight() > 0; ++pass) total += engine->Reap(true);
  EXPECT_EQ(total, kOps);
  EXPECT_EQ(engine->inflight(), 0);
  for (int i = 0; i < kOps; ++i) {
    EXPECT_EQ(ops[i].completions, 1) << "operation " << i;
    EXPECT_EQ(ops[i].result, 4096) << "operation " << i;
    EXPECT_EQ(std::memcmp(ops[i].buf, data.data() + i * 4096, 4096), 0) << "operation " << i;
  }
  EXPECT_EQ(engine->completion_overflows(), 0u);
  close(fd);
}

TEST(IoEngine, MissingFileIsNotFound) {
  auto f = OpenPosixFile("/nonexistent/kvblk/file", FileOptions());
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.status().code(), StatusCode::kNotFound);
  EXPECT_NE(f.status().message().find("/nonexistent/kvblk/file"), std::string::npos);
}

TEST(IoEngine, KvblkIoThreadsForcesThreadPool) {
  setenv("KVBLK_IO", "threads", 1);
  auto e = MakeDefaultIoEngine();
  unsetenv("KVBLK_IO");
  EXPECT_STREQ(e->name(), "threads");
}

}  // namespace
}  // namespace kvblk
