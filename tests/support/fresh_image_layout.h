// Where CreateImage puts things in a fresh qcow2 image with 64 KiB clusters
// and no preallocation: header, refcount table, refcount block, L1 table;
// the first L2 table and the first data cluster follow, in that order, as
// they are allocated. Tests that watch the order of writes
// (write_order_test, lazy_refcounts_test) name clusters by these offsets.
#ifndef KVBLK_TESTS_SUPPORT_FRESH_IMAGE_LAYOUT_H_
#define KVBLK_TESTS_SUPPORT_FRESH_IMAGE_LAYOUT_H_

#include <cstdint>

namespace kvblk::testing::fresh_image {

constexpr uint64_t kCluster = 65536;
constexpr uint64_t kRefBlock = 2 * kCluster;
constexpr uint64_t kL1 = 3 * kCluster;
constexpr uint64_t kFirstL2 = 4 * kCluster;

}  // namespace kvblk::testing::fresh_image

#endif  // KVBLK_TESTS_SUPPORT_FRESH_IMAGE_LAYOUT_H_
