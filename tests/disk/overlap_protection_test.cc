// Metadata overlap protection in Qcow2Device (issue 6 item 4): a write that
// would overwrite metadata is refused with IoError, the image is marked
// corrupt, and the metadata is left exactly as it was.
//
// The forgeries start from images made by qemu-img / qemu-io (with a
// snapshot, so that inactive L1 and L2 tables exist) and point one L2 entry
// at a metadata cluster, or drop a metadata cluster's refcount to zero so
// that the allocator hands it out. The bookkeeping test checks that the
// guard kvblk keeps up to date through writes, snapshots, resizes and
// refcount growth always equals a guard rebuilt from the image: a missing
// Remove would refuse legitimate writes, a missing Add would leave metadata
// unprotected.
#include <gtest/gtest.h>

#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "disk/overlap_guard.h"
#include "disk/qcow2_device.h"
#include "kvblk/block_device.h"
#include "kvblk/event_loop.h"
#include "kvblk/image_create.h"
#include "tests/support/qemu_util.h"
#include "tests/support/test_util.h"

namespace kvblk {
namespace {

using qcow2::MetadataKind;
using qcow2::MetadataKindName;
using qcow2::OverlapGuard;
using qcow2::Qcow2Device;
using testing::ExpectQemuCheckClean;
using testing::ReadFileBytes;
using testing::ShellQuote;
using testing::ShOk;
using testing::TempDir;
using testing::WriteFileBytes;

constexpr uint64_t kCluster = 65536;
constexpr uint64_t kOffsetMask = 0x00fffffffffffe00ull;
constexpr uint64_t kCopied = 1ull << 63;

uint64_t Get64(const std::vector<uint8_t>& b, size_t off) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v = (v << 8) | b.at(off + i);
  return v;
}

void Put64(std::vector<uint8_t>* b, size_t off, uint64_t v) {
  for (int i = 7; i >= 0; --i) {
    b->at(off + i) = static_cast<uint8_t>(v);
    v >>= 8;
  }
}

std::string Hex(uint64_t v) {
  char buf[24];
  snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

// A 4 MiB image, 64 KiB clusters, made by qemu: data at guest clusters 0, 1
// and 16 (1 MiB), snapshot "s1", then cluster 0 rewritten so that the
// active L2 table was copied and the old one belongs to the snapshot alone.
class OverlapImage : public ::testing::Test {
 protected:
  void SetUp() override {
    img_ = dir_.File("img.qcow2");
    ShOk("qemu-img create -q -f qcow2 -o cluster_size=65536 " + ShellQuote(img_) + " 4M");
    ShOk("qemu-io -f qcow2 -c 'write -q -P 0x5a 0 128k' -c 'write -q -P 0xa5 1M 64k' " +
         ShellQuote(img_));
    ShOk("qemu-img snapshot -c s1 " + ShellQuote(img_));
    ShOk("qemu-io -f qcow2 -c 'write -q -P 0x3c 0 4k' " + ShellQuote(img_));
    bytes_ = ReadFileBytes(img_);
  }

  // Where each kind of metadata lives in this image (one cluster of each).
  uint64_t Where(MetadataKind kind) const {
    const uint64_t l1 = Get64(bytes_, 40);
    const uint64_t reftable = Get64(bytes_, 48);
    const uint64_t snaptable = Get64(bytes_, 64);
    const uint64_t snap_l1 = Get64(bytes_, snaptable);  // first entry: l1_table_offset
    switch (kind) {
      case MetadataKind::kActiveL1: return l1;
      case MetadataKind::kActiveL2: return Get64(bytes_, l1) & kOffsetMask;
      case MetadataKind::kRefcountTable: return reftable;
      case MetadataKind::kRefcountBlock: return Get64(bytes_, reftable) & kOffsetMask;
      case MetadataKind::kSnapshotTable: return snaptable;
      case MetadataKind::kInactiveL1: return snap_l1;
      case MetadataKind::kInactiveL2: return Get64(bytes_, snap_l1) & kOffsetMask;
      case MetadataKind::kHeader: return 0;
    }
    return 0;
  }

  Result<std::unique_ptr<BlockDevice>> OpenWritable(bool overlap_check = true) {
    OpenOptions o;
    o.format = "qcow2";
    o.overlap_check = overlap_check;
    return OpenImage(img_, o);
  }

  // Every byte of the file is as it was before the refused write, except
  // the incompatible-feature bits (bytes 72..79), whose corrupt bit (1) is
  // now set.
  void ExpectOnlyCorruptBitChanged(const std::vector<uint8_t>& before) {
    std::vector<uint8_t> after = ReadFileBytes(img_);
    ASSERT_EQ(after.size(), before.size());
    EXPECT_EQ(Get64(after, 72), Get64(before, 72) | 2) << "corrupt bit not set";
    size_t differing = 0;
    for (size_t i = 0; i < after.size(); ++i) {
      if ((i < 72 || i >= 80) && after[i] != before[i]) ++differing;
    }
    EXPECT_EQ(differing, 0u) << "bytes changed outside the header's feature bits";
  }

  TempDir dir_;
  std::string img_;
  std::vector<uint8_t> bytes_;
};

// The layout assumptions the forgeries rest on: seven distinct clusters.
TEST_F(OverlapImage, MetadataOfEveryKindLivesInItsOwnCluster) {
  std::vector<uint64_t> seen;
  for (int k = 1; k < qcow2::kMetadataKindCount; ++k) {
    uint64_t off = Where(static_cast<MetadataKind>(k));
    EXPECT_NE(off, 0u) << MetadataKindName(static_cast<MetadataKind>(k));
    EXPECT_EQ(off % kCluster, 0u);
    for (uint64_t s : seen) EXPECT_NE(s, off);
    seen.push_back(off);
  }
}

class ForgedL2Entry : public OverlapImage,
                      public ::testing::WithParamInterface<MetadataKind> {};

// The active L2 entry of guest cluster 16 (1 MiB, allocated, COPIED) is
// made to point at a metadata cluster; a guest write there goes in place.
TEST_P(ForgedL2Entry, WriteIsRefusedAndMetadataIsIntact) {
  const MetadataKind kind = GetParam();
  const uint64_t target = Where(kind);
  const uint64_t l2 = Where(MetadataKind::kActiveL2);
  Put64(&bytes_, l2 + 16 * 8, target | kCopied);
  WriteFileBytes(img_, bytes_);

  auto dev = OpenWritable();
  ASSERT_TRUE(dev.ok()) << dev.status().ToString();
  std::vector<uint8_t> data(4096, 0xee);
  Status st = RunSync((*dev)->Write(1 << 20, data.data(), data.size()));
  EXPECT_EQ(st.code(), StatusCode::kIoError) << st.ToString();
  EXPECT_NE(st.message().find(std::string("would overwrite the ") + MetadataKindName(kind) +
                              " at host offset " + Hex(target)),
            std::string::npos)
      << st.ToString();
  // The device refuses further writes; reads still work.
  Status again = RunSync((*dev)->Write(0, data.data(), data.size()));
  EXPECT_FALSE(again.ok());
  std::vector<uint8_t> back(4096);
  EXPECT_TRUE(RunSync((*dev)->Read(65536, back.data(), back.size())).ok());
  EXPECT_EQ(back, std::vector<uint8_t>(4096, 0x5a));
  (void)CloseImage(std::move(*dev));  // reports the corruption; nothing to assert
  ExpectOnlyCorruptBitChanged(bytes_);
}

// Without the guard the same forgery does overwrite the metadata: the test
// above would fail if the guard did not work.
TEST_P(ForgedL2Entry, WithoutProtectionTheMetadataIsOverwritten) {
  const MetadataKind kind = GetParam();
  const uint64_t target = Where(kind);
  Put64(&bytes_, Where(MetadataKind::kActiveL2) + 16 * 8, target | kCopied);
  WriteFileBytes(img_, bytes_);
  auto dev = OpenWritable(/*overlap_check=*/false);
  ASSERT_TRUE(dev.ok()) << dev.status().ToString();
  std::vector<uint8_t> data(4096, 0xee);
  // Writing into the active L2 table destroys the entry that leads there,
  // the others are plain overwrites: either way the write "succeeds".
  EXPECT_TRUE(RunSync((*dev)->Write(1 << 20, data.data(), data.size())).ok());
  (void)CloseImage(std::move(*dev));
  std::vector<uint8_t> after = ReadFileBytes(img_);
  EXPECT_EQ(std::vector<uint8_t>(after.begin() + static_cast<long>(target),
                                 after.begin() + static_cast<long>(target + 4096)),
            data);
}

INSTANTIATE_TEST_SUITE_P(Kinds, ForgedL2Entry,
                         ::testing::Values(MetadataKind::kActiveL1, MetadataKind::kActiveL2,
                                           MetadataKind::kRefcountTable,
                                           MetadataKind::kRefcountBlock,
                                           MetadataKind::kSnapshotTable,
                                           MetadataKind::kInactiveL1,
                                           MetadataKind::kInactiveL2),
                         [](const auto& info) {
                           std::string n = MetadataKindName(info.param);
                           std::string out;
                           for (char c : n) {
                             if (c != ' ') out += c;
                           }
                           return out;
                         });

// A refcount that is too low (zero) for the active L1 table: the allocator
// believes the cluster free and hands it out. Whatever lands there first (a
// new L2 table or guest data) is refused.
TEST_F(OverlapImage, ClusterWithForgedZeroRefcountIsNeverWritten) {
  const uint64_t l1 = Where(MetadataKind::kActiveL1);
  const uint64_t block = Where(MetadataKind::kRefcountBlock);
  // refcount_bits=16: entry i of block 0 at block + 2 * i.
  const uint64_t at = block + 2 * (l1 / kCluster);
  ASSERT_EQ(bytes_.at(at), 0);
  ASSERT_EQ(bytes_.at(at + 1), 1);
  bytes_[at + 1] = 0;
  WriteFileBytes(img_, bytes_);

  auto dev = OpenWritable();
  ASSERT_TRUE(dev.ok()) << dev.status().ToString();
  // Fill unallocated guest clusters until the allocator reaches the L1
  // table's cluster (the first free one it finds, scanning from the start).
  std::vector<uint8_t> data(kCluster, 0x77);
  Status st;
  for (uint64_t gc = 2; gc < 64 && st.ok(); ++gc) {
    if (gc == 16) continue;
    st = RunSync((*dev)->Write(gc * kCluster, data.data(), data.size()));
  }
  ASSERT_EQ(st.code(), StatusCode::kIoError) << st.ToString();
  EXPECT_NE(st.message().find("would overwrite the active L1 table at host offset " + Hex(l1)),
            std::string::npos)
      << st.ToString();
  (void)CloseImage(std::move(*dev));
  std::vector<uint8_t> after = ReadFileBytes(img_);
  ASSERT_GE(after.size(), l1 + kCluster);
  EXPECT_TRUE(std::equal(bytes_.begin() + static_cast<long>(l1),
                         bytes_.begin() + static_cast<long>(l1 + kCluster),
                         after.begin() + static_cast<long>(l1)))
      << "the L1 table changed";
  EXPECT_EQ(Get64(after, 72) & 2, 2u) << "corrupt bit not set";
}

// The guard kept up to date always equals one rebuilt from the image.
class GuardBookkeeping : public ::testing::Test {
 protected:
  void Create(uint32_t cluster_size, bool extended_l2) {
    path_ = dir_.File("img.qcow2");
    CreateOptions o;
    o.size = 48ull << 20;
    o.cluster_size = cluster_size;
    o.refcount_bits = 16;
    o.extended_l2 = extended_l2;
    ASSERT_TRUE(CreateImage(path_, o).ok());
    OpenOptions oo;
    oo.format = "qcow2";
    oo.l2_cache_bytes = 4ull * cluster_size;  // write-back and reloads
    auto dev = OpenImage(path_, oo);
    ASSERT_TRUE(dev.ok()) << dev.status().ToString();
    dev_ = std::move(*dev);
  }
  Qcow2Device& q() { return *static_cast<Qcow2Device*>(dev_.get()); }

  void ExpectGuardCurrent(const std::string& after) {
    ASSERT_NE(q().overlap_guard(), nullptr);
    auto fresh = RunSync(q().BuildFreshOverlapGuard());
    ASSERT_TRUE(fresh.ok()) << fresh.status().ToString();
    auto kept = q().overlap_guard()->Extents();
    auto want = (*fresh)->Extents();
    ASSERT_EQ(kept.size(), want.size()) << "after " << after;
    for (size_t i = 0; i < kept.size(); ++i) {
      EXPECT_EQ(kept[i], want[i]) << "after " << after << ": extent " << i << " kind "
                                  << MetadataKindName(kept[i].kind) << " vs "
                                  << MetadataKindName(want[i].kind) << " at cluster "
                                  << kept[i].first_cluster << " vs " << want[i].first_cluster;
    }
  }

  // Random guest writes, discards, snapshots (create, apply, delete),
  // resizes and flushes; every step must succeed (a stale guard entry would
  // refuse a write) and leave the guard current.
  void RunModel(uint32_t seed, int steps) {
    std::mt19937 rng(seed);
    std::vector<std::string> snaps;
    int next_snap = 0;
    for (int step = 0; step < steps; ++step) {
      const uint64_t size = dev_->size();
      const int op = static_cast<int>(rng() % 100);
      std::string what;
      Status st;
      if (op < 55) {
        const uint64_t len = (1 + rng() % 32) * 4096;
        const uint64_t off = (rng() % (size / 4096)) * 4096;
        const uint64_t n = std::min(len, size - off);
        std::vector<uint8_t> buf(n, static_cast<uint8_t>(step));
        what = "write " + std::to_string(off) + "+" + std::to_string(n);
        st = RunSync(dev_->Write(off, buf.data(), buf.size()));
      } else if (op < 65) {
        const uint64_t off = (rng() % (size / 65536)) * 65536;
        what = "discard " + std::to_string(off);
        st = RunSync(dev_->Discard(off, std::min<uint64_t>(256 * 1024, size - off)));
      } else if (op < 75) {
        std::string name = "s" + std::to_string(next_snap++);
        what = "snapshot create " + name;
        st = RunSync(q().CreateSnapshot(name));
        if (st.ok()) snaps.push_back(name);
      } else if (op < 80 && !snaps.empty()) {
        const size_t i = rng() % snaps.size();
        what = "snapshot apply " + snaps[i];
        st = RunSync(q().ApplySnapshot(snaps[i]));
      } else if (op < 87 && !snaps.empty()) {
        const size_t i = rng() % snaps.size();
        what = "snapshot delete " + snaps[i];
        st = RunSync(q().DeleteSnapshot(snaps[i]));
        if (st.ok()) snaps.erase(snaps.begin() + static_cast<long>(i));
      } else if (op < 93) {
        const uint64_t target = (16 + rng() % 96) << 20;  // 16..111 MiB
        what = "resize " + std::to_string(target);
        st = RunSync(q().Resize(target, /*allow_shrink=*/true));
      } else {
        what = "flush";
        st = RunSync(dev_->Flush());
      }
      ASSERT_TRUE(st.ok()) << "step " << step << " (" << what << "): " << st.ToString();
      ExpectGuardCurrent(what);
      if (::testing::Test::HasFailure()) return;
    }
    ASSERT_TRUE(CloseImage(std::move(dev_)).ok());
    ExpectQemuCheckClean(path_);
  }

  TempDir dir_;
  std::string path_;
  std::unique_ptr<BlockDevice> dev_;
};

TEST_F(GuardBookkeeping, KeptGuardEqualsRebuiltOne4kClusters) {
  // 4 KiB clusters: a refcount block covers 8 MiB, so the table grows too.
  Create(4096, false);
  RunModel(1, 150);
}

TEST_F(GuardBookkeeping, KeptGuardEqualsRebuiltOne64kExtendedL2) {
  Create(65536, true);
  RunModel(2, 150);
}

TEST(OverlapProtection, ReadOnlyImageHasNoGuard) {
  TempDir dir;
  const std::string path = dir.File("ro.qcow2");
  CreateOptions o;
  o.size = 1 << 20;
  ASSERT_TRUE(CreateImage(path, o).ok());
  OpenOptions oo;
  oo.format = "qcow2";
  oo.read_only = true;
  auto dev = OpenImage(path, oo);
  ASSERT_TRUE(dev.ok());
  EXPECT_EQ(static_cast<Qcow2Device*>(dev->get())->overlap_guard(), nullptr);
  ASSERT_TRUE(CloseImage(std::move(*dev)).ok());
}

}  // namespace
}  // namespace kvblk
