// FdPoller: readiness callbacks on the poller thread, oneshot watches and
// their re-arming, and Remove()'s guarantee that a callback is over.
#include "virtio/fd_poller.h"

#include <gtest/gtest.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <thread>

namespace kvblk {
namespace {

void Notify(int fd) {
  uint64_t one = 1;
  ASSERT_EQ(write(fd, &one, 8), 8);
}

bool WaitFor(const std::function<bool()>& cond) {
  for (int i = 0; i < 5000; ++i) {
    if (cond()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return false;
}

TEST(FdPoller, ReportsReadableDescriptors) {
  auto poller = FdPoller::Start();
  ASSERT_TRUE(poller.ok());
  int efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  std::atomic<int> calls{0};
  auto id = (*poller)->Add(efd, false, [&](uint32_t events) {
    EXPECT_TRUE(events & EPOLLIN);
    uint64_t v;
    (void)!read(efd, &v, 8);
    ++calls;
  });
  ASSERT_TRUE(id.ok());
  Notify(efd);
  EXPECT_TRUE(WaitFor([&] { return calls == 1; }));
  Notify(efd);
  EXPECT_TRUE(WaitFor([&] { return calls == 2; }));
  (*poller)->Remove(*id);
  close(efd);
}

TEST(FdPoller, OneshotWatchWaitsForRearm) {
  auto poller = FdPoller::Start();
  ASSERT_TRUE(poller.ok());
  int efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  std::atomic<int> calls{0};
  // The callback does not consume the event: level-triggered, it would
  // repeat; oneshot, it reports once.
  auto id = (*poller)->Add(efd, true, [&](uint32_t) { ++calls; });
  ASSERT_TRUE(id.ok());
  Notify(efd);
  EXPECT_TRUE(WaitFor([&] { return calls == 1; }));
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_EQ(calls, 1);
  (*poller)->Rearm(*id);  // still readable: reported again
  EXPECT_TRUE(WaitFor([&] { return calls == 2; }));
  (*poller)->Remove(*id);
  close(efd);
}

TEST(FdPoller, RemoveWaitsForARunningCallback) {
  auto poller = FdPoller::Start();
  ASSERT_TRUE(poller.ok());
  int efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  std::atomic<bool> inside{false};
  std::atomic<bool> finished{false};
  auto id = (*poller)->Add(efd, true, [&](uint32_t) {
    inside = true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    finished = true;
  });
  ASSERT_TRUE(id.ok());
  Notify(efd);
  ASSERT_TRUE(WaitFor([&] { return inside.load(); }));
  (*poller)->Remove(*id);
  EXPECT_TRUE(finished);
  close(efd);
}

TEST(FdPoller, DeadPipeIsReportedOnceNotSpun) {
  auto poller = FdPoller::Start();
  ASSERT_TRUE(poller.ok());
  int p[2];
  ASSERT_EQ(pipe(p), 0);
  std::atomic<int> calls{0};
  auto id = (*poller)->Add(p[0], false, [&](uint32_t events) {
    EXPECT_TRUE(events & EPOLLHUP);
    ++calls;
  });
  ASSERT_TRUE(id.ok());
  close(p[1]);
  EXPECT_TRUE(WaitFor([&] { return calls == 1; }));
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_EQ(calls, 1);
  (*poller)->Remove(*id);
  close(p[0]);
}

TEST(FdPoller, StopEndsTheThreadAndAddRefusesBadDescriptors) {
  auto poller = FdPoller::Start();
  ASSERT_TRUE(poller.ok());
  auto bad = (*poller)->Add(-1, false, [](uint32_t) {});
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), StatusCode::kIoError);
  (*poller)->Stop();
  (*poller)->Stop();  // idempotent
}

}  // namespace
}  // namespace kvblk
