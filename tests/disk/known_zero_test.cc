// KnownZeroSubclusters: the bounded record of host subclusters known to read
// as zeros.
#include "disk/known_zero.h"

#include <gtest/gtest.h>

namespace kvblk::qcow2 {
namespace {

TEST(KnownZero, ReportsOnlyForTheGuestClusterItWasRecordedFor) {
  KnownZeroSubclusters kz(4);
  kz.Set(0x200000, 7, 0xfffffff0u);
  EXPECT_EQ(kz.Get(0x200000, 7), 0xfffffff0u);
  EXPECT_EQ(kz.Get(0x200000, 8), 0u);
  EXPECT_EQ(kz.Get(0x400000, 7), 0u);
}

TEST(KnownZero, ClearedBitsStayClearAndAnEmptyEntryIsDropped) {
  KnownZeroSubclusters kz(4);
  kz.Set(1 << 21, 0, 0x0000000fu);
  kz.Clear(1 << 21, 0x3u);
  EXPECT_EQ(kz.Get(1 << 21, 0), 0xcu);
  kz.Clear(1 << 21, 0xcu);
  EXPECT_EQ(kz.Get(1 << 21, 0), 0u);
  EXPECT_EQ(kz.size(), 0u);
  kz.Set(1 << 21, 0, 0);  // nothing known: no entry
  EXPECT_EQ(kz.size(), 0u);
}

TEST(KnownZero, EvictsTheLeastRecentlyUsedAtCapacity) {
  KnownZeroSubclusters kz(2);
  kz.Set(1, 1, 1);
  kz.Set(2, 2, 2);
  EXPECT_EQ(kz.Get(1, 1), 1u);  // 2 is now the least recently used
  kz.Set(3, 3, 3);
  EXPECT_EQ(kz.size(), 2u);
  EXPECT_EQ(kz.Get(2, 2), 0u);
  EXPECT_EQ(kz.Get(1, 1), 1u);
  EXPECT_EQ(kz.Get(3, 3), 3u);
}

TEST(KnownZero, SetReplacesAndForgetDrops) {
  KnownZeroSubclusters kz(2);
  kz.Set(1, 1, 0xff);
  kz.Set(1, 5, 0x0f);  // handed out fresh again, to another guest cluster
  EXPECT_EQ(kz.Get(1, 1), 0u);
  EXPECT_EQ(kz.Get(1, 5), 0x0fu);
  EXPECT_EQ(kz.size(), 1u);
  kz.Forget(1);
  EXPECT_EQ(kz.Get(1, 5), 0u);
  EXPECT_EQ(kz.size(), 0u);
}

TEST(KnownZero, SwitchedL1TableForgetsEverything) {
  KnownZeroSubclusters kz(4);
  kz.SyncTree(0x30000, 1 << 30);
  kz.Set(1, 1, 1);
  kz.SyncTree(0x30000, 1 << 30);
  EXPECT_EQ(kz.Get(1, 1), 1u);
  kz.SyncTree(0x50000, 1 << 30);  // another active L1 table
  EXPECT_EQ(kz.Get(1, 1), 0u);
  kz.Set(1, 1, 1);
  kz.SyncTree(0x50000, 2 << 30);  // resized
  EXPECT_EQ(kz.size(), 0u);
}

}  // namespace
}  // namespace kvblk::qcow2
