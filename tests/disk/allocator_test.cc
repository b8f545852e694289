// Allocator: appends at the end of the file, reuses freed clusters, skips
// clusters with I/O in flight, grows the refcount table when it must.
#include "disk/allocator.h"

#include <gtest/gtest.h>

#include "disk/mem_file.h"
#include "disk/qcow2_header.h"
#include "kvblk/event_loop.h"
#include "kvblk/image_create.h"
#include "tests/support/test_util.h"

namespace kvblk::qcow2 {
namespace {

class AllocatorTest : public ::testing::Test {
 protected:
  // A fresh image: header, refcount table, refcount block, L1 table
  // (clusters 0-3).
  void Init(uint32_t cluster_size, int refcount_bits) {
    testing::TempDir dir;
    CreateOptions o;
    o.size = 64ull << 20;
    o.cluster_size = cluster_size;
    o.refcount_bits = refcount_bits;
    ASSERT_TRUE(CreateImage(dir.File("a.qcow2"), o).ok());
    auto data = std::make_shared<MemFileData>();
    data->bytes = testing::ReadFileBytes(dir.File("a.qcow2"));
    file_ = std::make_unique<MemFile>(data, "a.qcow2");
    file_->set_yield(false);
    auto h = DecodeHeader(data->bytes, data->bytes.size(), "a.qcow2");
    ASSERT_TRUE(h.ok()) << h.status().ToString();
    header_ = *h;
    Refcounts::Config c;
    c.file = file_.get();
    c.cluster_bits = header_.cluster_bits;
    c.refcount_order = header_.refcount_order;
    c.table_offset = header_.refcount_table_offset;
    c.table_clusters = header_.refcount_table_clusters;
    c.switch_table = [this](uint64_t off, uint32_t clusters) -> Task<Status> {
      switched_to_ = off;
      (void)clusters;
      co_return Status::Ok();
    };
    auto rc = RunSync(Refcounts::Load(c, data->bytes.size()));
    ASSERT_TRUE(rc.ok()) << rc.status().ToString();
    rc_ = std::move(*rc);
    alloc_ = std::make_unique<Allocator>(rc_.get(), file_.get(), header_.cluster_bits);
  }
  uint64_t Cluster(uint64_t off) const { return off >> header_.cluster_bits; }
  uint64_t Refcount(uint64_t cluster) {
    auto r = RunSync(rc_->Get(cluster));
    EXPECT_TRUE(r.ok());
    return r.ok() ? *r : ~0ull;
  }

  std::unique_ptr<MemFile> file_;
  Header header_;
  std::unique_ptr<Refcounts> rc_;
  std::unique_ptr<Allocator> alloc_;
  uint64_t switched_to_ = 0;
};

TEST_F(AllocatorTest, AppendsFreshRunsAfterTheMetadata) {
  Init(65536, 16);
  auto a = RunSync(alloc_->Allocate(1));
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(Cluster(a->offset), 4u);
  EXPECT_EQ(a->count, 1u);
  EXPECT_TRUE(a->fresh);
  auto b = RunSync(alloc_->Allocate(3));
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(Cluster(b->offset), 5u);
  EXPECT_EQ(b->count, 3u);
  for (uint64_t c = 4; c < 8; ++c) EXPECT_EQ(Refcount(c), 1u) << c;
  EXPECT_EQ(Refcount(8), 0u);
}

TEST_F(AllocatorTest, ReusesFreedClustersOnlyAfterTheFreeIsApplied) {
  Init(65536, 16);
  auto a = RunSync(alloc_->Allocate(4));
  ASSERT_TRUE(a.ok());
  alloc_->DeferFree(a->offset + 65536, 1);  // cluster 5
  auto before = RunSync(alloc_->Allocate(1));
  ASSERT_TRUE(before.ok());
  EXPECT_EQ(Cluster(before->offset), 8u) << "a deferred free was reused before it was applied";
  ASSERT_TRUE(RunSync(alloc_->ApplyFrees(alloc_->TakeDeferred())).ok());
  EXPECT_EQ(Refcount(5), 0u);
  auto after = RunSync(alloc_->Allocate(1));
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(Cluster(after->offset), 5u);
  EXPECT_FALSE(after->fresh) << "a reused cluster may hold old data";
}

TEST_F(AllocatorTest, SkipsClustersWithIoInFlight) {
  Init(65536, 16);
  auto a = RunSync(alloc_->Allocate(2));  // clusters 4, 5
  ASSERT_TRUE(a.ok());
  alloc_->DeferFree(a->offset, 1);
  ASSERT_TRUE(RunSync(alloc_->ApplyFrees(alloc_->TakeDeferred())).ok());
  alloc_->BeginIo(4);  // a read of the old contents is still running
  auto b = RunSync(alloc_->Allocate(1));
  ASSERT_TRUE(b.ok());
  EXPECT_NE(Cluster(b->offset), 4u);
  alloc_->EndIo(4);
  auto c = RunSync(alloc_->Allocate(1));
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(Cluster(c->offset), 4u);
}

// Pins are counted per slot (cluster modulo kPinSlots): I/O on a cluster
// kPinSlots away makes a free cluster look pinned too. It is passed over
// while that I/O runs and handed out once the slot empties.
TEST_F(AllocatorTest, ClusterSharingAPinSlotIsPassedOverUntilTheSlotEmpties) {
  Init(65536, 16);
  auto a = RunSync(alloc_->Allocate(2));  // clusters 4, 5
  ASSERT_TRUE(a.ok());
  alloc_->DeferFree(a->offset, 1);
  ASSERT_TRUE(RunSync(alloc_->ApplyFrees(alloc_->TakeDeferred())).ok());
  const uint64_t twin = 4 + Allocator::kPinSlots;
  alloc_->BeginIo(twin);
  alloc_->BeginIo(twin);  // two requests on the twin
  auto b = RunSync(alloc_->Allocate(1));
  ASSERT_TRUE(b.ok());
  EXPECT_NE(Cluster(b->offset), 4u);
  alloc_->EndIo(twin);  // one left: still pinned
  auto c = RunSync(alloc_->Allocate(1));
  ASSERT_TRUE(c.ok());
  EXPECT_NE(Cluster(c->offset), 4u);
  alloc_->EndIo(twin);
  auto d = RunSync(alloc_->Allocate(1));
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(Cluster(d->offset), 4u) << "the passed-over cluster was not released";
}

TEST_F(AllocatorTest, GrowsTheRefcountTableWhenItIsFull) {
  // 512-byte clusters with 64-bit refcounts: a block covers 64 clusters and
  // one table cluster 64 blocks, so 4096 clusters fill the first table.
  Init(512, 64);
  const uint32_t before = rc_->table_clusters();
  uint64_t allocated = 0;
  while (allocated < 6000) {
    auto r = RunSync(alloc_->Allocate(64));
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    allocated += r->count;
  }
  EXPECT_GT(rc_->table_clusters(), before);
  EXPECT_EQ(switched_to_, rc_->table_offset());
  // Every cluster below the end is in use exactly once (metadata included).
  for (uint64_t c = 0; c < rc_->file_clusters(); c += 97) EXPECT_EQ(Refcount(c), 1u) << c;
}

// --- pre-allocation pool ------------------------------------------------------

TEST_F(AllocatorTest, PoolRaisesRefcountsForABatchAndServesRunsFromIt) {
  Init(65536, 16);
  alloc_->EnablePool(64);
  auto a = RunSync(alloc_->Allocate(1));
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(Cluster(a->offset), 4u);
  EXPECT_TRUE(a->fresh);
  // One refill raised a whole batch: the clusters after `a` are taken, and
  // the next allocations come from them without scanning again.
  const uint64_t pooled = alloc_->pooled_clusters();
  EXPECT_GE(pooled, 4u);
  for (uint64_t c = 5; c < 5 + pooled; ++c) EXPECT_EQ(Refcount(c), 1u) << c;
  EXPECT_EQ(Refcount(5 + pooled), 0u);
  auto b = RunSync(alloc_->Allocate(2));
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(Cluster(b->offset), 5u);
  EXPECT_EQ(b->count, 2u);
  EXPECT_TRUE(b->fresh);
}

TEST_F(AllocatorTest, ReleasePoolReturnsEveryPooledCluster) {
  Init(65536, 16);
  alloc_->EnablePool(64);
  auto a = RunSync(alloc_->Allocate(3));
  ASSERT_TRUE(a.ok());
  ASSERT_GT(alloc_->pooled_clusters(), 0u);
  ASSERT_TRUE(RunSync(alloc_->ReleasePool()).ok());
  EXPECT_EQ(alloc_->pooled_clusters(), 0u);
  for (uint64_t c = 4; c < 4 + a->count; ++c) EXPECT_EQ(Refcount(c), 1u) << c;
  for (uint64_t c = 4 + a->count; c < 4 + 200; ++c) EXPECT_EQ(Refcount(c), 0u) << c;
  // Without the pool, allocation continues right after what was handed out.
  auto b = RunSync(alloc_->Allocate(1));
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(Cluster(b->offset), 4 + a->count);
}

TEST_F(AllocatorTest, PoolHighMarkGrowsWhenAllocationsFindItEmpty) {
  Init(65536, 16);
  alloc_->EnablePool(256);
  const uint64_t first = alloc_->pool_high_mark();
  // Drain the pool in single large allocations faster than it refills.
  for (int i = 0; i < 6; ++i) {
    auto r = RunSync(alloc_->Allocate(1000));
    ASSERT_TRUE(r.ok());
    // Let the background refill run.
    RunSync([]() -> Task<void> { co_return; }());
  }
  EXPECT_GT(alloc_->pool_high_mark(), first);
  EXPECT_LE(alloc_->pool_high_mark(), 256u);
  ASSERT_TRUE(RunSync(alloc_->ReleasePool()).ok());
}

}  // namespace
}  // namespace kvblk::qcow2
