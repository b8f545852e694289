// TableCache: hits, misses, LRU eviction with write-back, load-once.
#include "disk/table_cache.h"

#include <gtest/gtest.h>

#include <vector>

#include "disk/mem_file.h"
#include "kvblk/event_loop.h"

namespace kvblk {
namespace {

constexpr uint32_t kTable = 512;

struct Fixture {
  std::unique_ptr<MemFile> file = MemFile::Create("tables");
  std::vector<uint64_t> written;
  std::unique_ptr<TableCache> cache;
  std::vector<MemFileEvent> events;

  explicit Fixture(size_t capacity) {
    std::vector<uint8_t> init(16 * kTable);
    for (size_t i = 0; i < init.size(); ++i) init[i] = static_cast<uint8_t>(i / kTable);
    EXPECT_TRUE(RunSync(file->Write(init.data(), init.size(), 0)).ok());
    file->SetHook([this](const MemFileEvent& e) {
      events.push_back(e);
      return 0;
    });
    cache = std::make_unique<TableCache>(
        "test", file.get(), kTable, capacity,
        [this](uint64_t off, const uint8_t* t) -> Task<Status> {
          written.push_back(off);
          return file->Write(t, kTable, off);
        });
  }
  size_t Reads() const {
    size_t n = 0;
    for (auto& e : events) n += e.kind == MemFileEvent::Kind::kRead;
    return n;
  }
};

TEST(TableCache, MissReadsFromDiskAndHitDoesNot) {
  Fixture f(4);
  {
    auto h = RunSync(f.cache->Get(2 * kTable));
    ASSERT_TRUE(h.ok());
    EXPECT_EQ(h->data()[0], 2);
  }
  auto h2 = RunSync(f.cache->Get(2 * kTable));
  ASSERT_TRUE(h2.ok());
  EXPECT_EQ(f.Reads(), 1u);
  EXPECT_EQ(f.cache->stats().hits, 1u);
  EXPECT_EQ(f.cache->stats().misses, 1u);
}

TEST(TableCache, EvictsLeastRecentlyUsedAndWritesBackDirty) {
  Fixture f(2);
  {
    auto a = RunSync(f.cache->Get(0));
    ASSERT_TRUE(a.ok());
    a->data()[5] = 0x77;
    a->MarkDirty();
  }
  { ASSERT_TRUE(RunSync(f.cache->Get(kTable)).ok()); }
  EXPECT_EQ(f.cache->LruOrder(), (std::vector<uint64_t>{0, kTable}));
  { ASSERT_TRUE(RunSync(f.cache->Get(2 * kTable)).ok()); }  // evicts table 0 (LRU, dirty)
  EXPECT_EQ(f.written, (std::vector<uint64_t>{0}));
  EXPECT_FALSE(f.cache->Contains(0));
  EXPECT_TRUE(f.cache->Contains(kTable));
  uint8_t b = 0;
  ASSERT_TRUE(RunSync(f.file->Read(&b, 1, 5)).ok());
  EXPECT_EQ(b, 0x77);
}

TEST(TableCache, UseMovesTableToMostRecentlyUsed) {
  Fixture f(3);
  for (uint64_t i = 0; i < 3; ++i) ASSERT_TRUE(RunSync(f.cache->Get(i * kTable)).ok());
  ASSERT_TRUE(RunSync(f.cache->Get(0)).ok());
  EXPECT_EQ(f.cache->LruOrder(), (std::vector<uint64_t>{kTable, 2 * kTable, 0}));
  ASSERT_TRUE(RunSync(f.cache->Get(3 * kTable)).ok());
  EXPECT_FALSE(f.cache->Contains(kTable));
  EXPECT_TRUE(f.cache->Contains(0));
}

// Peek (the read fast path's lookup) moves a table it finds to the most
// recently used end, as Get does, and reports a table that is not cached.
TEST(TableCache, PeekMovesTableToMostRecentlyUsed) {
  Fixture f(3);
  for (uint64_t i = 0; i < 3; ++i) ASSERT_TRUE(RunSync(f.cache->Get(i * kTable)).ok());
  ASSERT_EQ(f.cache->LruOrder(), (std::vector<uint64_t>{0, kTable, 2 * kTable}));
  auto peek = [&](uint64_t off) { return f.cache->Peek(off, [](const uint8_t*) {}); };
  EXPECT_TRUE(peek(0));  // the front
  EXPECT_EQ(f.cache->LruOrder(), (std::vector<uint64_t>{kTable, 2 * kTable, 0}));
  EXPECT_TRUE(peek(2 * kTable));  // the middle
  EXPECT_EQ(f.cache->LruOrder(), (std::vector<uint64_t>{kTable, 0, 2 * kTable}));
  EXPECT_TRUE(peek(2 * kTable));  // already the back
  EXPECT_EQ(f.cache->LruOrder(), (std::vector<uint64_t>{kTable, 0, 2 * kTable}));
  EXPECT_FALSE(peek(3 * kTable));
  EXPECT_EQ(f.cache->stats().hits, 3u);
  // The least recently used one is the one evicted.
  ASSERT_TRUE(RunSync(f.cache->Get(3 * kTable)).ok());
  EXPECT_FALSE(f.cache->Contains(kTable));
  EXPECT_EQ(f.cache->LruOrder(), (std::vector<uint64_t>{0, 2 * kTable, 3 * kTable}));
}

TEST(TableCache, PinnedTablesAreNotEvicted) {
  Fixture f(2);
  auto a = RunSync(f.cache->Get(0));
  auto b = RunSync(f.cache->Get(kTable));
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_TRUE(RunSync(f.cache->Get(2 * kTable)).ok());
  EXPECT_TRUE(f.cache->Contains(0));
  EXPECT_TRUE(f.cache->Contains(kTable));
}

TEST(TableCache, ConcurrentMissesReadOnce) {
  Fixture f(4);
  int done = 0;
  for (int i = 0; i < 5; ++i) {
    Spawn(
        [](TableCache* c) -> Task<Status> {
          auto h = co_await c->Get(3 * kTable);
          co_return h.status();
        }(f.cache.get()),
        [&](Status st) {
          EXPECT_TRUE(st.ok());
          ++done;
        });
  }
  EventLoop::Current().RunUntil([&] { return done == 5; });
  EXPECT_EQ(f.Reads(), 1u);
}

TEST(TableCache, FlushWritesEveryDirtyTableOnce) {
  Fixture f(4);
  for (uint64_t i = 0; i < 3; ++i) {
    auto h = RunSync(f.cache->Get(i * kTable));
    ASSERT_TRUE(h.ok());
    if (i != 1) h->MarkDirty();
  }
  ASSERT_TRUE(RunSync(f.cache->Flush()).ok());
  EXPECT_EQ(f.written, (std::vector<uint64_t>{0, 2 * kTable}));
  EXPECT_EQ(f.cache->dirty_count(), 0u);
  ASSERT_TRUE(RunSync(f.cache->Flush()).ok());
  EXPECT_EQ(f.written.size(), 2u);
}

TEST(TableCache, FailedReadIsReportedAndNotCached) {
  Fixture f(4);
  f.file->SetHook([](const MemFileEvent& e) { return e.kind == MemFileEvent::Kind::kRead ? 5 : 0; });
  auto h = RunSync(f.cache->Get(0));
  ASSERT_FALSE(h.ok());
  EXPECT_EQ(h.status().code(), StatusCode::kIoError);
  EXPECT_FALSE(f.cache->Contains(0));
  f.file->SetHook(nullptr);
  EXPECT_TRUE(RunSync(f.cache->Get(0)).ok());
}

}  // namespace
}  // namespace kvblk
