// Resource bounds on the disk side: every allocation that image data drives
// is capped, and a hostile image that asks for more is refused with the
// exact error before anything that large is allocated. Each test sits just
// past a cap; the "AtTheLimit" ones show the cap itself is accepted, so the
// check is the cap and not something stricter.
//
// Caps (disk/qcow2_format.h): L1 table 32 MiB, refcount table 8 MiB, 65536
// snapshots, snapshot extra data 1 KiB, backing file name 1023 bytes, header
// extension strings 1023 bytes and any header extension 1 MiB (and the first
// cluster), virtual size 2^61, L2 cache 32 MiB by default whatever the
// virtual size and 64 GiB when asked for (kMaxL2CacheBytes).
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "disk/qcow2_device.h"
#include "disk/qcow2_format.h"
#include "disk/qcow2_header.h"
#include "kvblk/block_device.h"
#include "kvblk/event_loop.h"
#include "tests/support/qemu_util.h"
#include "tests/support/test_util.h"

namespace kvblk {
namespace {

using qcow2::DecodeHeader;
using testing::ReadFileBytes;
using testing::ShellQuote;
using testing::ShOk;
using testing::TempDir;
using testing::WriteFileBytes;

constexpr uint64_t kCluster = 65536;
constexpr uint64_t kHugeFile = uint64_t{1} << 40;  // tables never lie past its end
const std::string kName = "img.qcow2";

void PutBe(std::vector<uint8_t>* b, size_t off, uint64_t v, int width) {
  for (int i = width - 1; i >= 0; --i) {
    b->at(off + i) = static_cast<uint8_t>(v);
    v >>= 8;
  }
}

// A valid v3 header in a 64 KiB first cluster: 1 GiB virtual size, L1
// table (8 entries) at cluster 3, refcount table (1 cluster) at cluster 1,
// no snapshots, no extensions.
std::vector<uint8_t> BaseHeader() {
  std::vector<uint8_t> b(kCluster, 0);
  PutBe(&b, 0, qcow2::kMagic, 4);
  PutBe(&b, 4, 3, 4);                   // version
  PutBe(&b, 20, 16, 4);                 // cluster_bits
  PutBe(&b, 24, uint64_t{1} << 30, 8);  // size
  PutBe(&b, 36, 2, 4);                  // l1_size: 2 x 512 MiB
  PutBe(&b, 40, 3 * kCluster, 8);       // l1_table_offset
  PutBe(&b, 48, 1 * kCluster, 8);       // refcount_table_offset
  PutBe(&b, 56, 1, 4);                  // refcount_table_clusters
  PutBe(&b, 96, 4, 4);                  // refcount_order
  PutBe(&b, 100, 104, 4);               // header_length
  return b;
}

Status Decode(const std::vector<uint8_t>& b) {
  auto h = DecodeHeader(b, kHugeFile, kName);
  return h.ok() ? Status::Ok() : h.status();
}

void ExpectRefused(const std::vector<uint8_t>& b, StatusCode code, const std::string& message) {
  Status st = Decode(b);
  EXPECT_EQ(st.code(), code) << st.ToString();
  EXPECT_EQ(st.message(), message);
}

TEST(ResourceBounds, BaseHeaderDecodes) { EXPECT_TRUE(Decode(BaseHeader()).ok()); }

TEST(ResourceBounds, L1TableOneEntryPastTheCapIsRefused) {
  auto b = BaseHeader();
  PutBe(&b, 36, qcow2::kMaxL1Bytes / 8 + 1, 4);
  ExpectRefused(b, StatusCode::kCorruption,
                kName + ": L1 table too large: l1_size 4194305 (33554440 bytes, limit 33554432)");
}

TEST(ResourceBounds, L1TableAtTheCapIsAccepted) {
  auto b = BaseHeader();
  PutBe(&b, 36, qcow2::kMaxL1Bytes / 8, 4);
  EXPECT_TRUE(Decode(b).ok()) << Decode(b).ToString();
}

TEST(ResourceBounds, L1SizeFieldAtItsMaximumIsRefused) {
  auto b = BaseHeader();
  PutBe(&b, 36, 0xffffffff, 4);
  ExpectRefused(
      b, StatusCode::kCorruption,
      kName + ": L1 table too large: l1_size 4294967295 (34359738360 bytes, limit 33554432)");
}

TEST(ResourceBounds, RefcountTableOneClusterPastTheCapIsRefused) {
  auto b = BaseHeader();
  PutBe(&b, 56, qcow2::kMaxRefcountTableBytes / kCluster + 1, 4);
  ExpectRefused(b, StatusCode::kCorruption,
                kName +
                    ": refcount table too large: refcount_table_clusters 129 (8454144 bytes, "
                    "limit 8388608)");
}

TEST(ResourceBounds, RefcountTableAtTheCapIsAccepted) {
  auto b = BaseHeader();
  PutBe(&b, 56, qcow2::kMaxRefcountTableBytes / kCluster, 4);
  // The L1 table moves out of the way of a 128-cluster refcount table.
  PutBe(&b, 40, 200 * kCluster, 8);
  EXPECT_TRUE(Decode(b).ok()) << Decode(b).ToString();
}

TEST(ResourceBounds, SnapshotCountPastTheCapIsRefused) {
  auto b = BaseHeader();
  PutBe(&b, 60, qcow2::kMaxSnapshots + 1, 4);
  PutBe(&b, 64, 8 * kCluster, 8);
  ExpectRefused(b, StatusCode::kCorruption, kName + ": nb_snapshots 65537 exceeds the limit 65536");
}

TEST(ResourceBounds, BackingFileNamePastTheCapIsRefused) {
  auto b = BaseHeader();
  PutBe(&b, 8, 1024, 8);   // backing_file_offset
  PutBe(&b, 16, 1024, 4);  // backing_file_size
  ExpectRefused(b, StatusCode::kCorruption, kName + ": backing_file_size 1024 exceeds 1023");
}

TEST(ResourceBounds, BackingFileNameAtTheCapIsAccepted) {
  auto b = BaseHeader();
  PutBe(&b, 8, 1024, 8);
  PutBe(&b, 16, 1023, 4);
  std::fill(b.begin() + 1024, b.begin() + 1024 + 1023, 'x');
  auto h = DecodeHeader(b, kHugeFile, kName);
  ASSERT_TRUE(h.ok()) << h.status().ToString();
  EXPECT_EQ(h->backing_file, std::string(1023, 'x'));
}

TEST(ResourceBounds, BackingFormatExtensionPastTheStringCapIsRefused) {
  auto b = BaseHeader();
  PutBe(&b, 104, qcow2::kExtBackingFormat, 4);
  PutBe(&b, 108, 1024, 4);
  ExpectRefused(b, StatusCode::kCorruption,
                kName + ": backing format name length 1024 is too long");
}

TEST(ResourceBounds, DataFileExtensionPastTheStringCapIsRefused) {
  auto b = BaseHeader();
  PutBe(&b, 104, qcow2::kExtDataFile, 4);
  PutBe(&b, 108, 1024, 4);
  ExpectRefused(b, StatusCode::kCorruption,
                kName + ": external data file name length 1024 is too long");
}

TEST(ResourceBounds, HeaderExtensionLongerThanTheFirstClusterIsRefused) {
  auto b = BaseHeader();
  PutBe(&b, 104, 0x12345678, 4);  // an unknown extension: it would be kept
  PutBe(&b, 108, 0xfffffff0, 4);
  ExpectRefused(b, StatusCode::kCorruption,
                kName +
                    ": header extension 0x12345678 at offset 0x68 has length 4294967280, past "
                    "the end of the first cluster");
}

TEST(ResourceBounds, VirtualSizePastTheCapIsNotSupported) {
  auto b = BaseHeader();
  PutBe(&b, 24, qcow2::kMaxVirtualSize + 1, 8);
  ExpectRefused(b, StatusCode::kNotSupported,
                kName +
                    ": size 2305843009213693953 exceeds the maximum virtual size "
                    "2305843009213693952");
}

// --- through the device: tables read at open time ------------------------------

class ResourceBoundsImage : public ::testing::Test {
 protected:
  Result<std::unique_ptr<BlockDevice>> Open(const OpenOptions& extra = {}) {
    OpenOptions o = extra;
    o.format = "qcow2";
    o.read_only = true;
    return OpenImage(img_, o);
  }

  TempDir dir_;
  std::string img_ = dir_.File("img.qcow2");
};

TEST_F(ResourceBoundsImage, SnapshotExtraDataPastTheCapIsRefused) {
  ShOk("qemu-img create -q -f qcow2 " + ShellQuote(img_) + " 4M");
  ShOk("qemu-img snapshot -c s1 " + ShellQuote(img_));
  std::vector<uint8_t> b = ReadFileBytes(img_);
  uint64_t snapshots = 0;
  for (int i = 0; i < 8; ++i) snapshots = (snapshots << 8) | b.at(64 + i);
  ASSERT_NE(snapshots, 0u);
  PutBe(&b, snapshots + 36, 1025, 4);  // extra_data_size
  WriteFileBytes(img_, b);
  auto dev = Open();
  ASSERT_FALSE(dev.ok());
  EXPECT_EQ(dev.status().code(), StatusCode::kCorruption) << dev.status().ToString();
  EXPECT_EQ(dev.status().message(), img_ + ": snapshot table entry 0: extra data too large");
}

TEST_F(ResourceBoundsImage, DefaultL2CacheIsCappedAt32MiBWhateverTheVirtualSize) {
  // 1 PiB with 64 KiB clusters: 2^50 / 2^29 = 2 Mi L2 tables of 64 KiB
  // would be 128 GiB of cache.
  ShOk("qemu-img create -q -f qcow2 -o cluster_size=65536 " + ShellQuote(img_) + " 1P");
  auto file = OpenPosixFile(img_, FileOptions{.read_only = true});
  ASSERT_TRUE(file.ok()) << file.status().ToString();
  OpenOptions o;
  o.format = "qcow2";
  o.read_only = true;
  auto dev = RunSync(qcow2::Qcow2Device::Open(std::move(*file), o, 0));
  ASSERT_TRUE(dev.ok()) << dev.status().ToString();
  EXPECT_EQ((*dev)->l2_cache().capacity() * kCluster, uint64_t{32} << 20);
  EXPECT_TRUE(RunSync((*dev)->Close()).ok());
}

TEST_F(ResourceBoundsImage, SmallDiskGetsACacheNoLargerThanItsTables) {
  // 64 MiB with 64 KiB clusters: one L2 table maps 512 MiB, so a single
  // table (the cache keeps at least 2) covers the disk.
  ShOk("qemu-img create -q -f qcow2 -o cluster_size=65536 " + ShellQuote(img_) + " 64M");
  auto file = OpenPosixFile(img_, FileOptions{.read_only = true});
  ASSERT_TRUE(file.ok()) << file.status().ToString();
  OpenOptions o;
  o.format = "qcow2";
  o.read_only = true;
  auto dev = RunSync(qcow2::Qcow2Device::Open(std::move(*file), o, 0));
  ASSERT_TRUE(dev.ok()) << dev.status().ToString();
  EXPECT_EQ((*dev)->l2_cache().capacity(), 2u);
  EXPECT_TRUE(RunSync((*dev)->Close()).ok());
}

TEST_F(ResourceBoundsImage, L2CacheSizePastTheLimitIsRefusedBeforeTheFileIsOpened) {
  ShOk("qemu-img create -q -f qcow2 " + ShellQuote(img_) + " 64M");
  OpenOptions o;
  o.l2_cache_bytes = kMaxL2CacheBytes + 1;
  auto dev = Open(o);
  ASSERT_FALSE(dev.ok());
  EXPECT_EQ(dev.status().code(), StatusCode::kInvalidArgument) << dev.status().ToString();
  EXPECT_EQ(dev.status().message(), img_ +
                                        ": L2 cache size 68719476737 bytes is more than the "
                                        "limit of 64 GiB (68719476736)");
  // The same holds for a file that does not exist: the options are checked first.
  o.format = "qcow2";
  auto missing = OpenImage(dir_.File("missing.qcow2"), o);
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), StatusCode::kInvalidArgument);
}

TEST_F(ResourceBoundsImage, L2CacheSizeAtTheLimitIsAccepted) {
  ShOk("qemu-img create -q -f qcow2 -o cluster_size=65536 " + ShellQuote(img_) + " 64M");
  OpenOptions o;
  o.l2_cache_bytes = kMaxL2CacheBytes;
  auto dev = Open(o);
  ASSERT_TRUE(dev.ok()) << dev.status().ToString();
  EXPECT_EQ((*dev)->l2_cache_bytes(), kMaxL2CacheBytes);
  EXPECT_TRUE(CloseImage(std::move(*dev)).ok());
}

}  // namespace
}  // namespace kvblk
