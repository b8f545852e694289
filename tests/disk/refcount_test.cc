// Refcount arithmetic for every width (refcount_order 0..6).
#include "disk/refcount.h"

#include <gtest/gtest.h>

#include <vector>

namespace kvblk::qcow2 {
namespace {

class RefcountWidth : public ::testing::TestWithParam<uint32_t> {};

TEST_P(RefcountWidth, SetThenGetRoundTripsWithoutDisturbingNeighbours) {
  const uint32_t order = GetParam();
  const uint32_t bits = 1u << order;
  std::vector<uint8_t> block(512, 0);
  const uint64_t entries = block.size() * 8 / bits;
  const uint64_t max = MaxRefcount(order);
  for (uint64_t i = 0; i < entries; ++i) SetRefcountEntry(block.data(), i, order, i % (max < 7 ? max + 1 : 7));
  for (uint64_t i = 0; i < entries; ++i) {
    ASSERT_EQ(GetRefcountEntry(block.data(), i, order), i % (max < 7 ? max + 1 : 7)) << i;
  }
  SetRefcountEntry(block.data(), 3, order, max);
  EXPECT_EQ(GetRefcountEntry(block.data(), 3, order), max);
  EXPECT_EQ(GetRefcountEntry(block.data(), 2, order), 2 % (max < 7 ? max + 1 : 7));
  EXPECT_EQ(GetRefcountEntry(block.data(), 4, order), 4 % (max < 7 ? max + 1 : 7));
}

INSTANTIATE_TEST_SUITE_P(AllWidths, RefcountWidth, ::testing::Range(0u, 7u));

TEST(Refcount, MaxRefcountMatchesWidth) {
  EXPECT_EQ(MaxRefcount(0), 1u);
  EXPECT_EQ(MaxRefcount(1), 3u);
  EXPECT_EQ(MaxRefcount(2), 15u);
  EXPECT_EQ(MaxRefcount(3), 255u);
  EXPECT_EQ(MaxRefcount(4), 65535u);
  EXPECT_EQ(MaxRefcount(5), 0xffffffffu);
  EXPECT_EQ(MaxRefcount(6), ~uint64_t{0});
}

TEST(Refcount, NarrowWidthsPackFromTheLeastSignificantBit) {
  std::vector<uint8_t> b(4, 0);
  SetRefcountEntry(b.data(), 0, 0, 1);
  EXPECT_EQ(b[0], 0x01);
  SetRefcountEntry(b.data(), 1, 1, 3);  // 2-bit entry 1 = bits 2-3 of byte 0
  EXPECT_EQ(b[0], 0x0d);
  std::fill(b.begin(), b.end(), 0);
  SetRefcountEntry(b.data(), 1, 2, 0xa);  // 4-bit entry 1 = high nibble
  EXPECT_EQ(b[0], 0xa0);
}

TEST(Refcount, WideWidthsAreBigEndian) {
  std::vector<uint8_t> b(16, 0);
  SetRefcountEntry(b.data(), 0, 4, 0x1234);
  EXPECT_EQ(b[0], 0x12);
  EXPECT_EQ(b[1], 0x34);
  SetRefcountEntry(b.data(), 1, 6, 0x0102030405060708ull);
  EXPECT_EQ(b[8], 0x01);
  EXPECT_EQ(b[15], 0x08);
}

}  // namespace
}  // namespace kvblk::qcow2
