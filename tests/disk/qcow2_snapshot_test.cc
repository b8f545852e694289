// Internal snapshots and resize of qcow2 images (Qcow2Device::CreateSnapshot,
// ApplySnapshot, DeleteSnapshot, Resize), judged by qemu-img: after every
// operation `qemu-img check` must find no errors and no leaks, and the data
// of each snapshot, read by `qemu-img convert -l snapshot.id=N`, must be what
// was written before it was taken. Snapshots made by qemu-img are used by
// kvblk and the other way round.
#include <gtest/gtest.h>

#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "disk/qcow2_device.h"
#include "disk/qcow2_format.h"
#include "kvblk/block_device.h"
#include "kvblk/event_loop.h"
#include "kvblk/image_create.h"
#include "tests/support/qemu_util.h"
#include "tests/support/test_util.h"

namespace kvblk {
namespace {

using qcow2::Qcow2Device;
using testing::ExpectQemuCheckClean;
using testing::PatternBytes;
using testing::ReadFileBytes;
using testing::ReadRange;
using testing::ShellQuote;
using testing::ShOk;
using testing::TempDir;

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * 1024;

// An image on disk plus an open device for it.
class SnapshotFixture : public ::testing::Test {
 protected:
  void Create(uint64_t size, uint32_t cluster_size = 65536, int refcount_bits = 16,
              bool v3 = true) {
    path_ = dir_.File("img.qcow2");
    CreateOptions o;
    o.size = size;
    o.cluster_size = cluster_size;
    o.refcount_bits = refcount_bits;
    o.compat_v3 = v3;
    Status st = CreateImage(path_, o);
    ASSERT_TRUE(st.ok()) << st.ToString();
    Open();
  }
  void Open() {
    OpenOptions o;
    o.format = "qcow2";
    auto dev = OpenImage(path_, o);
    ASSERT_TRUE(dev.ok()) << dev.status().ToString();
    dev_ = std::move(*dev);
  }
  void Close() {
    if (!dev_) return;
    Status st = CloseImage(std::move(dev_));
    ASSERT_TRUE(st.ok()) << st.ToString();
  }
  // Closes, runs `qemu-img check` (clean, no leaks) and reopens.
  void CheckClean() {
    Close();
    ExpectQemuCheckClean(path_);
    Open();
  }
  Qcow2Device& q() { return *static_cast<Qcow2Device*>(dev_.get()); }

  void Write(uint64_t offset, const std::vector<uint8_t>& data) {
    Status st = RunSync(dev_->Write(offset, data.data(), data.size()));
    ASSERT_TRUE(st.ok()) << st.ToString();
  }
  std::vector<uint8_t> Read(uint64_t offset, size_t len) {
    auto r = ReadRange(*dev_, offset, len);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok() ? *r : std::vector<uint8_t>();
  }
  Status CreateSnap(const std::string& name) { return RunSync(q().CreateSnapshot(name)); }
  Status ApplySnap(const std::string& name) { return RunSync(q().ApplySnapshot(name)); }
  Status DeleteSnap(const std::string& name) { return RunSync(q().DeleteSnapshot(name)); }
  Status Resize(uint64_t size, bool shrink) { return RunSync(q().Resize(size, shrink)); }

  // The guest contents of snapshot `id` as qemu-img reads them (the image
  // must be closed).
  std::vector<uint8_t> QemuSnapshotData(const std::string& id) {
    std::string out = dir_.File("snap-" + id + ".raw");
    ShOk("qemu-img convert -f qcow2 -O raw -l snapshot.id=" + id + " " + ShellQuote(path_) + " " +
         ShellQuote(out));
    return ReadFileBytes(out);
  }
  // The active L1 entry `index` as stored in the file (the image must be
  // closed or flushed).
  uint64_t L1EntryOnDisk(uint64_t index) {
    auto bytes = ReadFileBytes(path_);
    uint64_t l1 = qcow2::LoadBe64(&bytes[40]);
    return qcow2::LoadBe64(&bytes[l1 + index * 8]);
  }

  TempDir dir_;
  std::string path_;
  std::unique_ptr<BlockDevice> dev_;
};

std::vector<uint8_t> Fill(size_t len, uint8_t v) { return std::vector<uint8_t>(len, v); }

// --- create / list / apply / delete ------------------------------------------

TEST_F(SnapshotFixture, SnapshotCreateIsListedByKvblkAndQemu) {
  Create(4 * kMiB);
  Write(0, PatternBytes(128 * kKiB, 1));
  ASSERT_TRUE(CreateSnap("first").ok());
  ASSERT_EQ(q().ListSnapshots().size(), 1u);
  EXPECT_EQ(q().ListSnapshots()[0].id, "1");
  EXPECT_EQ(q().ListSnapshots()[0].name, "first");
  EXPECT_EQ(q().ListSnapshots()[0].disk_size, 4 * kMiB);
  ASSERT_TRUE(CreateSnap("second").ok());
  CheckClean();
  auto info = dev_->Info();
  ASSERT_TRUE(info.ok());
  ASSERT_EQ(info->snapshots.size(), 2u);
  EXPECT_EQ(info->snapshots[1].id, "2");
  EXPECT_EQ(info->snapshots[1].name, "second");
  ASSERT_TRUE(info->snapshots[1].icount.has_value());
  EXPECT_EQ(*info->snapshots[1].icount, 0u);
  Close();
  auto list = ShOk("qemu-img snapshot -l " + ShellQuote(path_));
  EXPECT_NE(list.output.find("1         first"), std::string::npos) << list.output;
  EXPECT_NE(list.output.find("2         second"), std::string::npos) << list.output;
}

TEST_F(SnapshotFixture, SnapshotWritesAfterSnapshotCopyTheSharedClusterAndL2Table) {
  Create(4 * kMiB);
  const auto a = PatternBytes(64 * kKiB, 1);
  Write(0, a);
  ASSERT_TRUE(RunSync(dev_->Flush()).ok());
  const uint64_t l1_before = L1EntryOnDisk(0);
  ASSERT_NE(l1_before & qcow2::kOflagCopied, 0u);
  ASSERT_TRUE(CreateSnap("s").ok());
  // The active L1 entry now names a shared table: COPIED is clear.
  EXPECT_EQ(L1EntryOnDisk(0), l1_before & ~qcow2::kOflagCopied);
  const auto b = PatternBytes(4 * kKiB, 2);
  Write(8 * kKiB, b);
  auto expect = a;
  std::copy(b.begin(), b.end(), expect.begin() + 8 * kKiB);
  EXPECT_EQ(Read(0, 64 * kKiB), expect);
  CheckClean();
  // The L2 table was copied: the active entry names a new, unshared table.
  const uint64_t l1_after = L1EntryOnDisk(0);
  EXPECT_NE(l1_after & qcow2::kL1OffsetMask, l1_before & qcow2::kL1OffsetMask);
  EXPECT_NE(l1_after & qcow2::kOflagCopied, 0u);
  Close();
  auto snap = QemuSnapshotData("1");
  ASSERT_EQ(snap.size(), 4 * kMiB);
  EXPECT_TRUE(std::equal(a.begin(), a.end(), snap.begin()));
}

TEST_F(SnapshotFixture, SnapshotApplyRevertsDataAndSize) {
  Create(2 * kMiB);
  const auto a = PatternBytes(256 * kKiB, 3);
  Write(100 * kKiB, a);
  ASSERT_TRUE(CreateSnap("base").ok());
  ASSERT_TRUE(Resize(8 * kMiB, false).ok());
  Write(100 * kKiB, PatternBytes(300 * kKiB, 4));
  Write(6 * kMiB, PatternBytes(64 * kKiB, 5));
  CheckClean();
  ASSERT_TRUE(ApplySnap("base").ok());
  EXPECT_EQ(dev_->size(), 2 * kMiB);
  EXPECT_EQ(Read(100 * kKiB, a.size()), a);
  EXPECT_EQ(Read(0, 100 * kKiB), Fill(100 * kKiB, 0));
  CheckClean();
  // Applying again (by ID) and writing keeps the snapshot intact.
  ASSERT_TRUE(ApplySnap("1").ok());
  Write(100 * kKiB, PatternBytes(8 * kKiB, 6));
  CheckClean();
  Close();
  auto snap = QemuSnapshotData("1");
  ASSERT_EQ(snap.size(), 2 * kMiB);
  EXPECT_TRUE(std::equal(a.begin(), a.end(), snap.begin() + 100 * kKiB));
}

TEST_F(SnapshotFixture, SnapshotDeleteFreesItsClustersAndRestoresCopied) {
  Create(4 * kMiB);
  Write(0, PatternBytes(512 * kKiB, 7));
  ASSERT_TRUE(CreateSnap("a").ok());
  Write(64 * kKiB, PatternBytes(64 * kKiB, 8));  // one cluster diverges
  ASSERT_TRUE(CreateSnap("b").ok());
  CheckClean();
  ASSERT_TRUE(DeleteSnap("a").ok());
  CheckClean();
  ASSERT_TRUE(DeleteSnap("2").ok());  // by ID when no name matches
  EXPECT_TRUE(q().ListSnapshots().empty());
  CheckClean();
  // Every cluster is the active image's alone again: COPIED everywhere, so
  // an overwrite happens in place (no new cluster).
  Close();
  auto size_before = ReadFileBytes(path_).size();
  EXPECT_NE(L1EntryOnDisk(0) & qcow2::kOflagCopied, 0u);
  Open();
  Write(0, PatternBytes(512 * kKiB, 9));
  CheckClean();
  Close();
  EXPECT_EQ(ReadFileBytes(path_).size(), size_before);
}

TEST_F(SnapshotFixture, SnapshotDuplicateNameIsRefused) {
  Create(1 * kMiB);
  ASSERT_TRUE(CreateSnap("x").ok());
  Status st = CreateSnap("x");
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(st.message(), path_ + ": a snapshot named 'x' already exists (ID 1)");
  st = CreateSnap("");
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(st.message(), path_ + ": the snapshot name is empty");
  CheckClean();
}

TEST_F(SnapshotFixture, SnapshotUnknownNameOrIdIsNotFound) {
  Create(1 * kMiB);
  ASSERT_TRUE(CreateSnap("x").ok());
  Status st = ApplySnap("nope");
  EXPECT_EQ(st.code(), StatusCode::kNotFound);
  EXPECT_EQ(st.message(), path_ + ": no snapshot with ID or name 'nope'");
  st = DeleteSnap("7");
  EXPECT_EQ(st.code(), StatusCode::kNotFound);
  EXPECT_EQ(st.message(), path_ + ": no snapshot with name or ID '7'");
  CheckClean();
}

TEST_F(SnapshotFixture, SnapshotApplyLooksUpIdBeforeName) {
  Create(1 * kMiB);
  Write(0, Fill(64 * kKiB, 0x11));
  ASSERT_TRUE(CreateSnap("first").ok());  // ID 1
  Write(0, Fill(64 * kKiB, 0x22));
  ASSERT_TRUE(CreateSnap("1").ok());  // ID 2, named "1"
  ASSERT_TRUE(ApplySnap("1").ok());
  EXPECT_EQ(Read(0, 64 * kKiB), Fill(64 * kKiB, 0x11));
  CheckClean();
}

TEST_F(SnapshotFixture, SnapshotRefcountBits1IsRefusedWithoutLeaks) {
  Create(1 * kMiB, 65536, 1);
  ASSERT_TRUE(CreateSnap("empty").ok());  // nothing to share yet
  Write(0, PatternBytes(64 * kKiB, 1));
  Status st = CreateSnap("full");
  EXPECT_EQ(st.code(), StatusCode::kNotSupported);
  EXPECT_NE(st.message().find(path_ + ": cannot create snapshot 'full': the refcount of the "
                                      "cluster at offset "),
            std::string::npos)
      << st.message();
  EXPECT_NE(st.message().find("would exceed 1, the largest value of refcount_bits=1"),
            std::string::npos)
      << st.message();
  CheckClean();
  EXPECT_EQ(q().ListSnapshots().size(), 1u);
}

TEST_F(SnapshotFixture, SnapshotRefcountBits2StopsAtTheWidth) {
  Create(1 * kMiB, 65536, 2);
  Write(0, PatternBytes(64 * kKiB, 1));
  ASSERT_TRUE(CreateSnap("s1").ok());
  ASSERT_TRUE(CreateSnap("s2").ok());
  EXPECT_EQ(CreateSnap("s3").code(), StatusCode::kNotSupported);  // refcount 3 is the max
  CheckClean();
  ASSERT_TRUE(DeleteSnap("s1").ok());
  ASSERT_TRUE(CreateSnap("s3").ok());
  CheckClean();
}

// Several snapshots interleaved with writes, over refcount widths and
// cluster sizes: each snapshot keeps its data (read by qemu-img), deletes in
// any order leave a clean image.
struct Mix {
  const char* name;
  uint32_t cluster_size;
  int refcount_bits;
  bool v3;
};

class SnapshotMix : public SnapshotFixture, public ::testing::WithParamInterface<Mix> {};

TEST_P(SnapshotMix, EachSnapshotKeepsTheDataWrittenBeforeIt) {
  const Mix& m = GetParam();
  const uint64_t size = 3 * kMiB;
  Create(size, m.cluster_size, m.refcount_bits, m.v3);
  std::mt19937_64 rng(m.cluster_size * 31 + m.refcount_bits);
  std::vector<uint8_t> ref(size, 0);
  std::vector<std::vector<uint8_t>> snaps;
  for (int round = 0; round < 4; ++round) {
    for (int i = 0; i < 12; ++i) {
      uint64_t len = 512 * (1 + rng() % 256);
      uint64_t off = (rng() % (size - len)) / 512 * 512;
      auto data = PatternBytes(len, static_cast<uint32_t>(rng()));
      Write(off, data);
      std::copy(data.begin(), data.end(), ref.begin() + off);
    }
    if (m.v3 && round == 1) {
      Status st = RunSync(dev_->WriteZeroes(0, m.cluster_size, false));  // zero flag, kept host
      ASSERT_TRUE(st.ok()) << st.ToString();
      std::fill(ref.begin(), ref.begin() + m.cluster_size, 0);
    }
    ASSERT_TRUE(CreateSnap("s" + std::to_string(round)).ok());
    snaps.push_back(ref);
    CheckClean();
  }
  Close();
  for (size_t i = 0; i < snaps.size(); ++i) {
    auto got = QemuSnapshotData(std::to_string(i + 1));
    EXPECT_EQ(testing::FirstDifference(got, snaps[i]), -1) << "snapshot " << i + 1;
  }
  Open();
  ASSERT_TRUE(ApplySnap("s1").ok());
  EXPECT_EQ(Read(0, size), snaps[1]);
  CheckClean();
  for (const char* name : {"s2", "s0", "s3", "s1"}) {
    ASSERT_TRUE(DeleteSnap(name).ok()) << name;
    CheckClean();
  }
  EXPECT_EQ(Read(0, size), snaps[1]);
}

INSTANTIATE_TEST_SUITE_P(
    Widths, SnapshotMix,
    ::testing::Values(Mix{"Rc16C64k", 65536, 16, true}, Mix{"Rc64C4k", 4096, 64, true},
                      Mix{"Rc8C512", 512, 8, true}, Mix{"Rc16V2C64k", 65536, 16, false}),
    [](const ::testing::TestParamInfo<Mix>& i) { return std::string(i.param.name); });

// --- interop -------------------------------------------------------------------

TEST_F(SnapshotFixture, SnapshotInteropQemuSnapshotsUsedByKvblk) {
  Create(2 * kMiB);
  Close();
  const std::string img = ShellQuote(path_);
  ShOk("qemu-io -c 'write -P 0x41 0 128k' " + img);
  ShOk("qemu-img snapshot -c qa " + img);
  ShOk("qemu-io -c 'write -P 0x42 64k 128k' " + img);
  ShOk("qemu-img snapshot -c qb " + img);
  ShOk("qemu-io -c 'write -P 0x43 0 64k' " + img);
  Open();
  auto list = q().ListSnapshots();
  ASSERT_EQ(list.size(), 2u);
  EXPECT_EQ(list[0].name, "qa");
  EXPECT_EQ(list[1].id, "2");
  ASSERT_TRUE(ApplySnap("qa").ok());
  EXPECT_EQ(Read(0, 128 * kKiB), Fill(128 * kKiB, 0x41));
  CheckClean();
  ASSERT_TRUE(DeleteSnap("qa").ok());
  CheckClean();
  ASSERT_TRUE(ApplySnap("qb").ok());
  EXPECT_EQ(Read(0, 64 * kKiB), Fill(64 * kKiB, 0x41));
  EXPECT_EQ(Read(64 * kKiB, 128 * kKiB), Fill(128 * kKiB, 0x42));
  ASSERT_TRUE(CreateSnap("kc").ok());  // ID 3: one past the largest
  EXPECT_EQ(q().ListSnapshots().back().id, "3");
  CheckClean();
}

TEST_F(SnapshotFixture, SnapshotInteropKvblkSnapshotsUsedByQemu) {
  Create(2 * kMiB);
  Write(0, Fill(128 * kKiB, 0x51));
  ASSERT_TRUE(CreateSnap("ka").ok());
  Write(64 * kKiB, Fill(128 * kKiB, 0x52));
  ASSERT_TRUE(CreateSnap("kb").ok());
  Write(0, Fill(32 * kKiB, 0x53));
  Close();
  const std::string img = ShellQuote(path_);
  ShOk("qemu-img snapshot -a ka " + img);
  ShOk("qemu-io -c 'read -P 0x51 0 128k' -c 'read -P 0 128k 64k' " + img);
  ExpectQemuCheckClean(path_);
  ShOk("qemu-img snapshot -d ka " + img);
  ExpectQemuCheckClean(path_);
  auto kb = QemuSnapshotData("2");
  EXPECT_EQ(std::vector<uint8_t>(kb.begin() + 64 * kKiB, kb.begin() + 192 * kKiB),
            Fill(128 * kKiB, 0x52));
  ShOk("qemu-img snapshot -c qc " + img);
  Open();
  ASSERT_EQ(q().ListSnapshots().size(), 2u);
  EXPECT_EQ(q().ListSnapshots()[1].id, "3");
  ASSERT_TRUE(DeleteSnap("kb").ok());
  ASSERT_TRUE(DeleteSnap("qc").ok());
  CheckClean();
}

// --- resize --------------------------------------------------------------------

TEST_F(SnapshotFixture, ResizeGrowsTheL1TableAndKeepsData) {
  Create(1 * kMiB, 512);  // one L1 entry covers 32 KiB: 1 MiB needs 32 entries
  const auto a = PatternBytes(1 * kMiB, 11);
  Write(0, a);
  CheckClean();
  const uint64_t l1_before = q().header().l1_table_offset;
  ASSERT_TRUE(Resize(64 * kMiB, false).ok());
  EXPECT_EQ(dev_->size(), 64 * kMiB);
  EXPECT_EQ(q().header().l1_size, 2048u);
  EXPECT_NE(q().header().l1_table_offset, l1_before);
  EXPECT_EQ(Read(0, a.size()), a);
  EXPECT_EQ(Read(63 * kMiB, 64 * kKiB), Fill(64 * kKiB, 0));
  Write(60 * kMiB, PatternBytes(64 * kKiB, 12));
  CheckClean();
  EXPECT_EQ(Read(0, a.size()), a);
  ASSERT_TRUE(Resize(64 * kMiB + 512, false).ok());  // within the L1: size only
  CheckClean();
}

TEST_F(SnapshotFixture, ResizeShrinkNeedsPermission) {
  Create(4 * kMiB);
  Status st = Resize(1 * kMiB, false);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(st.message(), path_ +
                              ": shrinking from 4194304 to 1048576 bytes deletes the data past "
                              "the new end; it needs the shrink option");
  st = Resize(1000, true);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(st.message(), path_ + ": the new size 1000 is not a multiple of 512");
  st = Resize(0, true);
  EXPECT_EQ(st.message(), path_ + ": the new size must be positive");
  EXPECT_EQ(dev_->size(), 4 * kMiB);
}

TEST_F(SnapshotFixture, ResizeShrinkFreesClustersPastTheEnd) {
  Create(8 * kMiB, 4096);
  const auto a = PatternBytes(8 * kMiB, 13);
  Write(0, a);
  CheckClean();
  ASSERT_TRUE(Resize(3 * kMiB + 6 * kKiB, true).ok());  // mid-cluster, mid-L2
  EXPECT_EQ(Read(0, 3 * kMiB + 6 * kKiB),
            std::vector<uint8_t>(a.begin(), a.begin() + 3 * kMiB + 6 * kKiB));
  CheckClean();
  // Growing again exposes zeros, also in the rest of the partial cluster.
  ASSERT_TRUE(Resize(8 * kMiB, false).ok());
  EXPECT_EQ(Read(3 * kMiB + 6 * kKiB, 5 * kMiB - 6 * kKiB), Fill(5 * kMiB - 6 * kKiB, 0));
  CheckClean();
  Close();
  // 770 clusters hold data (the last one partly); the rest was freed.
  auto check = ShOk("qemu-img check " + ShellQuote(path_));
  EXPECT_NE(check.output.find("770/2048 = "), std::string::npos) << check.output;
}

TEST_F(SnapshotFixture, ResizeWithSnapshotsKeepsTheirDataAndSize) {
  Create(4 * kMiB);
  const auto a = PatternBytes(4 * kMiB, 14);
  Write(0, a);
  ASSERT_TRUE(CreateSnap("full").ok());
  ASSERT_TRUE(Resize(1 * kMiB, true).ok());
  CheckClean();
  ASSERT_TRUE(Resize(16 * kMiB, false).ok());
  EXPECT_EQ(Read(1 * kMiB, 1 * kMiB), Fill(1 * kMiB, 0));
  CheckClean();
  Close();
  // qemu-img reads a snapshot at the active image's size (16 MiB here).
  auto snap = QemuSnapshotData("1");
  ASSERT_EQ(snap.size(), 16 * kMiB);
  EXPECT_EQ(std::vector<uint8_t>(snap.begin(), snap.begin() + 4 * kMiB), a);
  Open();
  ASSERT_TRUE(ApplySnap("full").ok());
  EXPECT_EQ(dev_->size(), 4 * kMiB);
  EXPECT_EQ(Read(0, 4 * kMiB), a);
  CheckClean();
}

TEST_F(SnapshotFixture, ResizeOfV2ImageWithSnapshotsIsRefused) {
  Create(1 * kMiB, 65536, 16, false);
  ASSERT_TRUE(Resize(2 * kMiB, false).ok());  // no snapshots yet: fine
  ASSERT_TRUE(CreateSnap("s").ok());
  Status st = Resize(4 * kMiB, false);
  EXPECT_EQ(st.code(), StatusCode::kNotSupported);
  EXPECT_EQ(st.message(),
            path_ + ": cannot resize a version 2 (compat=0.10) image that has snapshots");
  CheckClean();
}

TEST_F(SnapshotFixture, SnapshotOperationsOnReadOnlyImageAreRefused) {
  Create(1 * kMiB);
  Close();
  OpenOptions o;
  o.read_only = true;
  auto dev = OpenImage(path_, o);
  ASSERT_TRUE(dev.ok());
  dev_ = std::move(*dev);
  Status st = CreateSnap("x");
  EXPECT_EQ(st.code(), StatusCode::kReadOnly);
  EXPECT_EQ(st.message(), path_ + ": image is read-only");
  EXPECT_EQ(Resize(2 * kMiB, false).code(), StatusCode::kReadOnly);
}

}  // namespace
}  // namespace kvblk
