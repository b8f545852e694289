// Coroutine-aware locks: FIFO grants, shared/exclusive exclusion, writer
// preference, and one-shot events.
#include "disk/async_lock.h"

#include <gtest/gtest.h>

#include <string>

#include "kvblk/event_loop.h"

namespace kvblk {
namespace {

struct Trace {
  std::string log;
};

Task<void> Reader(AsyncSharedMutex* m, Trace* t, char id, AsyncEvent* release) {
  co_await m->LockShared();
  t->log += id;
  co_await release->Wait();
  t->log += static_cast<char>(id - 'a' + 'A');
  m->UnlockShared();
}

Task<void> Writer(AsyncSharedMutex* m, Trace* t, char id) {
  co_await m->LockExclusive();
  t->log += id;
  co_await EventLoop::Current().Yield();
  t->log += id;
  m->UnlockExclusive();
}

TEST(AsyncSharedMutex, ReadersShareAndWriterWaitsForAll) {
  AsyncSharedMutex m;
  AsyncEvent release;
  Trace t;
  int done = 0;
  auto count = [&] { ++done; };
  Spawn(Reader(&m, &t, 'a', &release), count);
  Spawn(Reader(&m, &t, 'b', &release), count);
  Spawn(Writer(&m, &t, 'w'), count);
  EXPECT_EQ(t.log, "ab");
  EXPECT_EQ(m.readers(), 2);
  release.Set();
  EventLoop::Current().RunUntil([&] { return done == 3; });
  EXPECT_EQ(t.log, "abABww");
}

TEST(AsyncSharedMutex, NewReadersQueueBehindAWaitingWriter) {
  AsyncSharedMutex m;
  AsyncEvent release, release2;
  Trace t;
  int done = 0;
  auto count = [&] { ++done; };
  Spawn(Reader(&m, &t, 'a', &release), count);
  Spawn(Writer(&m, &t, 'w'), count);
  Spawn(Reader(&m, &t, 'b', &release2), count);
  EXPECT_EQ(t.log, "a");  // b must not overtake the writer
  release.Set();
  release2.Set();
  EventLoop::Current().RunUntil([&] { return done == 3; });
  EXPECT_EQ(t.log, "aAwwbB");
}

TEST(AsyncMutex, GrantsInFifoOrder) {
  AsyncSharedMutex m;
  Trace t;
  int done = 0;
  for (char c : std::string("xyz")) Spawn(Writer(&m, &t, c), [&] { ++done; });
  EventLoop::Current().RunUntil([&] { return done == 3; });
  EXPECT_EQ(t.log, "xxyyzz");
  EXPECT_FALSE(m.held_exclusive());
}

TEST(AsyncEvent, WaitAfterSetDoesNotSuspend) {
  AsyncEvent e;
  e.Set();
  bool ran = false;
  Spawn([](AsyncEvent* ev, bool* r) -> Task<void> {
    co_await ev->Wait();
    *r = true;
  }(&e, &ran));
  EXPECT_TRUE(ran);
}

}  // namespace
}  // namespace kvblk
