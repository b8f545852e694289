// Shared by the qcow2 checker tests (tests/disk/qcow2_check_test.cc,
// qcow2_check_repair_test.cc): forging damage into an image in place, the
// numbers both `qemu-img check` and kvblk's checker report, and the base
// images the damage is forged into.
#ifndef KVBLK_TESTS_SUPPORT_QCOW2_CHECK_UTIL_H_
#define KVBLK_TESTS_SUPPORT_QCOW2_CHECK_UTIL_H_

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include "disk/qcow2_check.h"
#include "disk/qcow2_format.h"
#include "disk/refcount.h"

namespace kvblk::qcow2::check_test {

// In-place access to an image's metadata for forging damage.
class ImagePatcher {
 public:
  explicit ImagePatcher(const std::string& path) : fd_(::open(path.c_str(), O_RDWR)) {
    EXPECT_GE(fd_, 0) << path;
    cluster_bits_ = U32(20);
    l1_offset_ = U64(40);
    rt_offset_ = U64(48);
    snapshots_offset_ = U64(64);
    refcount_order_ = U32(96);
  }
  ~ImagePatcher() { ::close(fd_); }

  uint64_t U64(uint64_t off) const {
    uint8_t b[8] = {};
    EXPECT_EQ(::pread(fd_, b, 8, static_cast<off_t>(off)), 8);
    return LoadBe64(b);
  }
  uint32_t U32(uint64_t off) const {
    uint8_t b[4] = {};
    EXPECT_EQ(::pread(fd_, b, 4, static_cast<off_t>(off)), 4);
    return LoadBe32(b);
  }
  void SetU64(uint64_t off, uint64_t v) {
    uint8_t b[8];
    StoreBe64(b, v);
    EXPECT_EQ(::pwrite(fd_, b, 8, static_cast<off_t>(off)), 8);
  }
  void SetU32(uint64_t off, uint32_t v) {
    uint8_t b[4];
    StoreBe32(b, v);
    EXPECT_EQ(::pwrite(fd_, b, 4, static_cast<off_t>(off)), 4);
  }

  uint64_t cluster_size() const { return uint64_t{1} << cluster_bits_; }
  uint64_t rt_offset() const { return rt_offset_; }
  uint64_t l1_offset() const { return l1_offset_; }
  uint64_t L1(uint64_t i) const { return U64(l1_offset_ + 8 * i); }
  void SetL1(uint64_t i, uint64_t v) { SetU64(l1_offset_ + 8 * i, v); }
  uint64_t L2Offset(uint64_t i) const { return L1(i) & kL1OffsetMask; }
  uint64_t L2(uint64_t i, uint64_t j) const { return U64(L2Offset(i) + 8 * j); }
  void SetL2(uint64_t i, uint64_t j, uint64_t v) { SetU64(L2Offset(i) + 8 * j, v); }
  // Host cluster index of the data of L2 entry (i, j).
  uint64_t DataCluster(uint64_t i, uint64_t j) const {
    return (L2(i, j) & kL2OffsetMask) >> cluster_bits_;
  }

  uint64_t RefTable(uint64_t i) const { return U64(rt_offset_ + 8 * i); }
  void SetRefTable(uint64_t i, uint64_t v) { SetU64(rt_offset_ + 8 * i, v); }
  uint64_t Refcount(uint64_t cluster) const {
    std::vector<uint8_t> block = Block(cluster);
    return GetRefcountEntry(block.data(), cluster % PerBlock(), refcount_order_);
  }
  void SetRefcount(uint64_t cluster, uint64_t v) {
    std::vector<uint8_t> block = Block(cluster);
    SetRefcountEntry(block.data(), cluster % PerBlock(), refcount_order_, v);
    const uint64_t off = RefTable(cluster / PerBlock()) & kReftOffsetMask;
    EXPECT_EQ(::pwrite(fd_, block.data(), block.size(), static_cast<off_t>(off)),
              static_cast<ssize_t>(block.size()));
  }

  // Offset of snapshot table entry `k`.
  uint64_t SnapshotEntry(uint32_t k) const {
    uint64_t pos = snapshots_offset_;
    for (uint32_t i = 0; i < k; ++i) {
      uint8_t b[40];
      EXPECT_EQ(::pread(fd_, b, 40, static_cast<off_t>(pos)), 40);
      uint64_t len = 40 + LoadBe32(b + 36) + LoadBe16(b + 12) + LoadBe16(b + 14);
      pos += (len + 7) & ~uint64_t{7};
    }
    return pos;
  }
  void SetIncompatibleBits(uint64_t bits) { SetU64(72, U64(72) | bits); }
  uint64_t Incompatible() const { return U64(72); }

 private:
  uint64_t PerBlock() const { return (cluster_size() * 8) >> refcount_order_; }
  std::vector<uint8_t> Block(uint64_t cluster) const {
    std::vector<uint8_t> block(cluster_size());
    const uint64_t off = RefTable(cluster / PerBlock()) & kReftOffsetMask;
    EXPECT_NE(off, 0u);
    EXPECT_EQ(::pread(fd_, block.data(), block.size(), static_cast<off_t>(off)),
              static_cast<ssize_t>(block.size()));
    return block;
  }

  int fd_;
  uint32_t cluster_bits_;
  uint64_t l1_offset_;
  uint64_t rt_offset_;
  uint64_t snapshots_offset_;
  uint32_t refcount_order_;
};

// The numbers both tools report.
struct Counts {
  int exit_code = -1;
  uint64_t corruptions = 0;
  uint64_t leaks = 0;
  uint64_t check_errors = 0;
  uint64_t image_end_offset = 0;
  uint64_t total_clusters = 0;
  uint64_t allocated_clusters = 0;
  uint64_t fragmented_clusters = 0;
  uint64_t compressed_clusters = 0;
  uint64_t corruptions_fixed = 0;
  uint64_t leaks_fixed = 0;

  bool operator==(const Counts&) const = default;
};

std::ostream& operator<<(std::ostream& os, const Counts& c);

// What `qemu-img check [repair] --output=json` reports for `path`.
Counts QemuCheck(const std::string& path, const std::string& repair = "");

// What kvblk's checker reports for `path` with `mode`, its messages
// appended to `messages` if given. A failed check is a test failure.
Counts KvblkCheck(const std::string& path, RepairMode mode = RepairMode::kNone,
                  std::vector<std::string>* messages = nullptr);

// `s` quoted for /bin/sh.
std::string Q(const std::string& s);

// 64 MiB, 64 KiB clusters: header, refcount table (cluster 1), refcount
// block (2), L1 (3), L2 (4), data for guest 0..192K in clusters 5-7 and for
// guest 1M in cluster 8.
void MakeBase(const std::string& path, const std::string& create_opts = "");

// The base image plus snapshot "s1" and a new write of guest 0..64K (so
// guest clusters 1, 2 and 16 stay shared with the snapshot).
void MakeWithSnapshot(const std::string& path);

// The COPIED flag and the host offset bits of L1/L2 entries.
inline constexpr uint64_t kCopied = kOflagCopied;
inline constexpr uint64_t kMask = kL2OffsetMask;

}  // namespace kvblk::qcow2::check_test

#endif  // KVBLK_TESTS_SUPPORT_QCOW2_CHECK_UTIL_H_
