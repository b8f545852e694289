// EventfdWatch: signals reach the callback on the watched loop's thread,
// coalesced; the destructor ends a pending read and no callback runs after
// it; a failed read is reported once and ends the watch; Supported() tells
// eventfds on io_uring from the rest.
#include "virtio/eventfd_watch.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>

#include "disk/io_engine.h"
#include "disk/loop_thread.h"

namespace kvblk {
namespace {

void Signal(int fd, uint64_t n = 1) { ASSERT_EQ(write(fd, &n, sizeof n), 8); }

bool WaitFor(const std::function<bool()>& cond) {
  for (int i = 0; i < 5000; ++i) {
    if (cond()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return false;
}

// The error callback of a watch whose reads must not fail.
void FailOnError(int err) { ADD_FAILURE() << "read failed: " << std::strerror(err); }

// The value left in an eventfd (0 if it is empty); non-blocking.
uint64_t Drain(int fd) {
  uint64_t v = 0;
  return read(fd, &v, sizeof v) == 8 ? v : 0;
}

class EventfdWatchTest : public ::testing::Test {
 protected:
  void SetUp() override {
    // io_uring works on every machine kvblk supports; a fallback to the
    // thread pool here would mean these tests check nothing.
    ASSERT_TRUE(EventLoop::Current().engine().polls_descriptors())
        << "the default I/O engine is " << EventLoop::Current().engine().name();
    efd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    ASSERT_GE(efd_, 0);
  }
  void TearDown() override {
    if (efd_ >= 0) close(efd_);
  }
  int efd_ = -1;
};

TEST_F(EventfdWatchTest, SignalsRunOnTheWatchedLoopsThread) {
  auto t = LoopThread::Start();
  ASSERT_TRUE(t.ok());
  std::atomic<int> calls{0};
  std::atomic<bool> wrong_thread{false};
  const std::thread::id loop_id = (*t)->id();
  auto w = EventfdWatch::Start((*t)->loop(), efd_,
                               [&] {
                                 if (std::this_thread::get_id() != loop_id) wrong_thread = true;
                                 ++calls;
                               },
                               FailOnError);
  ASSERT_TRUE(w.ok());
  Signal(efd_);
  ASSERT_TRUE(WaitFor([&] { return calls == 1; }));
  Signal(efd_, 5);
  ASSERT_TRUE(WaitFor([&] { return calls == 2; }));
  EXPECT_FALSE(wrong_thread);
  // The watch consumed both values.
  EXPECT_EQ(Drain(efd_), 0u);
  w->reset();
  (*t)->Stop();
}

TEST_F(EventfdWatchTest, WatchOnTheCallersOwnLoop) {
  EventLoop& loop = EventLoop::Current();
  int calls = 0;
  auto w = EventfdWatch::Start(
      loop, efd_, [&] { ++calls; }, FailOnError);
  ASSERT_TRUE(w.ok());
  Signal(efd_);
  loop.RunUntil([&] { return calls == 1; });
  Signal(efd_);
  loop.RunUntil([&] { return calls == 2; });
  EXPECT_EQ(calls, 2);
  w->reset();
  // Nothing after the watch is gone: the next value stays in the eventfd.
  Signal(efd_, 3);
  for (int i = 0; i < 10; ++i) loop.RunOnce();
  EXPECT_EQ(calls, 2);
  EXPECT_EQ(Drain(efd_), 3u);
}

TEST_F(EventfdWatchTest, DestructorEndsAPendingReadAndNoCallbackFollows) {
  auto t = LoopThread::Start();
  ASSERT_TRUE(t.ok());
  std::atomic<int> calls{0};
  auto w = EventfdWatch::Start((*t)->loop(), efd_, [&] { ++calls; }, FailOnError);
  ASSERT_TRUE(w.ok());
  Signal(efd_);
  ASSERT_TRUE(WaitFor([&] { return calls == 1; }));
  // The next read is pending now; the destructor must end it and return.
  w->reset();
  Signal(efd_, 7);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_EQ(calls, 1);
  // The destructor's own write was consumed by the ended read.
  EXPECT_EQ(Drain(efd_), 7u);
  (*t)->Stop();
}

TEST_F(EventfdWatchTest, DestroyedBeforeItsFirstReadWasSubmitted) {
  // Start() posts the first read to the loop; this loop has not run yet.
  EventLoop& loop = EventLoop::Current();
  int calls = 0;
  auto w = EventfdWatch::Start(
      loop, efd_, [&] { ++calls; }, FailOnError);
  ASSERT_TRUE(w.ok());
  w->reset();
  Signal(efd_, 2);
  for (int i = 0; i < 10; ++i) loop.RunOnce();
  EXPECT_EQ(calls, 0);
  EXPECT_EQ(Drain(efd_), 2u);  // nobody wrote or read it
}

TEST_F(EventfdWatchTest, SignalWhileTheCallbackRunsIsNotLost) {
  auto t = LoopThread::Start();
  ASSERT_TRUE(t.ok());
  std::atomic<int> calls{0};
  std::atomic<bool> release{false};
  auto w = EventfdWatch::Start((*t)->loop(), efd_,
                               [&] {
                                 ++calls;
                                 if (calls == 1) {
                                   while (!release) std::this_thread::yield();
                                 }
                               },
                               FailOnError);
  ASSERT_TRUE(w.ok());
  Signal(efd_);
  ASSERT_TRUE(WaitFor([&] { return calls == 1; }));
  Signal(efd_);  // no read is pending while the first callback runs
  release = true;
  EXPECT_TRUE(WaitFor([&] { return calls == 2; }));
  w->reset();
  (*t)->Stop();
}

TEST_F(EventfdWatchTest, AFailedReadIsReportedOnceAndEndsTheWatch) {
  // A directory: read() fails with EISDIR.
  int dir = open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  ASSERT_GE(dir, 0);
  EventLoop& loop = EventLoop::Current();
  int errors = 0;
  int last_err = 0;
  int calls = 0;
  auto w = EventfdWatch::Start(
      loop, dir, [&] { ++calls; },
      [&](int err) {
        ++errors;
        last_err = err;
      });
  ASSERT_TRUE(w.ok());
  close(dir);  // the watch has its own copy
  loop.RunUntil([&] { return errors > 0; });
  for (int i = 0; i < 10; ++i) loop.RunOnce();
  EXPECT_EQ(errors, 1);
  EXPECT_EQ(last_err, EISDIR);
  EXPECT_EQ(calls, 0);
  w->reset();  // after the failure: returns at once
}

TEST_F(EventfdWatchTest, SupportedOnlyForEventfdsOnAPollingEngine) {
  EventLoop& loop = EventLoop::Current();
  EXPECT_TRUE(EventfdWatch::Supported(loop, efd_));
  int p[2];
  ASSERT_EQ(pipe2(p, O_CLOEXEC), 0);
  EXPECT_FALSE(IsEventfd(p[0]));
  EXPECT_FALSE(EventfdWatch::Supported(loop, p[0]));
  close(p[0]);
  close(p[1]);
  EXPECT_FALSE(EventfdWatch::Supported(loop, -1));
  EXPECT_TRUE(IsEventfd(efd_));
  EXPECT_FALSE(IsEventfd(-1));
  EventLoop pool(MakeThreadPoolEngine(1));
  EXPECT_FALSE(EventfdWatch::Supported(pool, efd_));
}

}  // namespace
}  // namespace kvblk
