// Lazy refcounts (qcow2 compatible feature bit 0), observed through a
// recording MemFile:
//  - the image is marked dirty on disk (synced) before the first L2 table
//    that may depend on a refcount not yet written;
//  - refcount blocks are no longer made durable before L2 tables;
//  - a clean close writes the refcounts, syncs and clears the dirty bit;
//  - a crash with refcounts behind the tables leaves a dirty image that the
//    next writable open repairs before anything is written.
#include <gtest/gtest.h>

#include <fstream>

#include "disk/mem_file.h"
#include "disk/qcow2_device.h"
#include "kvblk/event_loop.h"
#include "kvblk/image_create.h"
#include "tests/support/fresh_image_layout.h"
#include "tests/support/test_util.h"

namespace kvblk::qcow2 {
namespace {

using testing::fresh_image::kCluster;
using testing::fresh_image::kFirstL2;
using testing::fresh_image::kL1;
using testing::fresh_image::kRefBlock;
constexpr uint64_t kIncompatOffset = 72;  // incompatible_features, big endian

using Kind = MemFileEvent::Kind;

bool DirtyBit(const std::vector<uint8_t>& bytes) { return (bytes[kIncompatOffset + 7] & 1) != 0; }

class LazyRefcounts : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string path = dir_.File("img.qcow2");
    CreateOptions o;
    o.size = 256ull << 20;  // 4096 clusters, one L2 table
    o.lazy_refcounts = true;
    ASSERT_TRUE(CreateImage(path, o).ok());
    data_ = std::make_shared<MemFileData>();
    data_->bytes = testing::ReadFileBytes(path);
    ASSERT_FALSE(DirtyBit(data_->bytes));
    Open(false);
  }

  void Open(bool read_only) {
    auto file = std::make_unique<MemFile>(data_, "img", read_only);
    file->SetHook([this](const MemFileEvent& e) {
      if (e.kind != Kind::kRead) events_.push_back(e);
      if (on_event_) on_event_(e);
      return 0;
    });
    OpenOptions oo;
    oo.read_only = read_only;
    auto dev = RunSync(Qcow2Device::Open(std::move(file), oo, 0));
    ASSERT_TRUE(dev.ok()) << dev.status().ToString();
    dev_ = std::move(*dev);
  }

  int Find(Kind k, uint64_t off, int from = 0) const {
    for (int i = from; i < static_cast<int>(events_.size()); ++i) {
      const auto& e = events_[i];
      if (e.kind == k && (k == Kind::kFlush || e.offset == off)) return i;
    }
    return -1;
  }
  bool FlushBetween(int a, int b) const {
    for (int i = a + 1; i < b; ++i) {
      if (events_[i].kind == Kind::kFlush) return true;
    }
    return false;
  }
  std::string Dump(const std::vector<uint8_t>& bytes, const std::string& name) {
    std::string out = dir_.File(name);
    std::ofstream(out, std::ios::binary)
        .write(reinterpret_cast<const char*>(bytes.data()),
               static_cast<std::streamsize>(bytes.size()));
    return out;
  }

  testing::TempDir dir_;
  std::shared_ptr<MemFileData> data_;
  std::vector<MemFileEvent> events_;
  std::function<void(const MemFileEvent&)> on_event_;
  std::unique_ptr<Qcow2Device> dev_;
};

TEST_F(LazyRefcounts, DirtyBitIsDurableBeforeANewTableIsReachableAndClearedByACleanClose) {
  std::vector<uint8_t> buf(4096, 0xaa);
  ASSERT_TRUE(RunSync(dev_->Write(0, buf.data(), buf.size())).ok());
  // The new (empty) L2 table may be written first: nothing points to it.
  // The L1 entry that makes it reachable must come after the dirty bit.
  const int dirty = Find(Kind::kWrite, kIncompatOffset);
  const int l1 = Find(Kind::kWrite, kL1);
  ASSERT_GE(dirty, 0) << "the dirty bit was never written";
  ASSERT_GE(l1, 0);
  ASSERT_LT(dirty, l1) << "L1 entry written before the image was marked dirty";
  EXPECT_TRUE(FlushBetween(dirty, l1)) << "dirty bit not synced before the L1 entry";
  EXPECT_TRUE(DirtyBit(data_->bytes));
  // The table's write-back (now mapping the data cluster) comes later still.
  const int mark = static_cast<int>(events_.size());
  ASSERT_TRUE(RunSync(dev_->Flush()).ok());
  ASSERT_GE(Find(Kind::kWrite, kFirstL2, mark), 0) << "the flush did not write the L2 table";
  // Only once.
  ASSERT_TRUE(RunSync(dev_->Write(kCluster, buf.data(), buf.size())).ok());
  ASSERT_TRUE(RunSync(dev_->Flush()).ok());
  EXPECT_EQ(Find(Kind::kWrite, kIncompatOffset, dirty + 1), -1);
  EXPECT_TRUE(DirtyBit(data_->bytes)) << "a guest flush must not clear the dirty bit";

  const int before_close = static_cast<int>(events_.size());
  ASSERT_TRUE(RunSync(dev_->Close()).ok());
  const int clean = Find(Kind::kWrite, kIncompatOffset, before_close);
  const int rb = Find(Kind::kWrite, kRefBlock, before_close);
  ASSERT_GE(clean, 0) << "close did not clear the dirty bit";
  EXPECT_FALSE(DirtyBit(data_->bytes));
  // Returning the allocator's pool changes refcounts: the close writes them.
  ASSERT_GE(rb, 0) << "close wrote no refcount block";
  EXPECT_LT(rb, clean);
  EXPECT_TRUE(FlushBetween(rb, clean)) << "dirty bit cleared before the refcounts were synced";
  auto r = testing::Sh("qemu-img check " + Dump(data_->bytes, "closed.qcow2"));
  EXPECT_EQ(r.exit_code, 0) << r.output;
}

TEST_F(LazyRefcounts, RefcountBlockIsNotSyncedBeforeTheL2Table) {
  std::vector<uint8_t> buf(4096, 0xbb);
  ASSERT_TRUE(RunSync(dev_->Write(0, buf.data(), buf.size())).ok());
  ASSERT_TRUE(RunSync(dev_->Flush()).ok());
  // Clusters the pool has not pre-allocated yet: more than it holds.
  const int mark = static_cast<int>(events_.size());
  for (uint64_t i = 1; i < 1500 && i < 8192; ++i) {
    ASSERT_TRUE(RunSync(dev_->Write(i * kCluster, buf.data(), buf.size())).ok());
  }
  ASSERT_TRUE(RunSync(dev_->Flush()).ok());
  const int l2 = Find(Kind::kWrite, kFirstL2, mark);
  const int rb = Find(Kind::kWrite, kRefBlock, mark);
  ASSERT_GE(l2, 0) << "the flush did not write the L2 table";
  ASSERT_GE(rb, 0) << "the refcount block was never written";
  EXPECT_LT(l2, rb) << "with lazy refcounts the L2 table need not wait for the refcounts";
  ASSERT_TRUE(RunSync(dev_->Close()).ok());
  auto r = testing::Sh("qemu-img check " + Dump(data_->bytes, "closed.qcow2"));
  EXPECT_EQ(r.exit_code, 0) << r.output;
}

TEST_F(LazyRefcounts, CrashWithRefcountsBehindIsRepairedOnWritableOpen) {
  std::vector<uint8_t> a(4096, 0x11);
  ASSERT_TRUE(RunSync(dev_->Write(0, a.data(), a.size())).ok());
  ASSERT_TRUE(RunSync(dev_->Flush()).ok());
  // The power fails just before the flush writes the refcount block: the
  // L2 table that maps 1500 new clusters is on disk, their refcounts not.
  std::vector<uint8_t> crash;
  bool l2_written = false;
  on_event_ = [&](const MemFileEvent& e) {
    if (e.kind == Kind::kWrite && e.offset == kFirstL2) l2_written = true;
    if (e.kind == Kind::kWrite && e.offset == kRefBlock && l2_written && crash.empty()) {
      std::lock_guard<std::mutex> l(data_->mu);
      crash = data_->bytes;  // the write itself has not been applied yet
    }
  };
  std::vector<uint8_t> b(4096, 0x22);
  for (uint64_t i = 1; i < 1500; ++i) {
    ASSERT_TRUE(RunSync(dev_->Write(i * kCluster, b.data(), b.size())).ok());
  }
  ASSERT_TRUE(RunSync(dev_->Flush()).ok());
  ASSERT_FALSE(crash.empty()) << "no refcount block write followed the L2 table write";
  on_event_ = nullptr;
  ASSERT_TRUE(RunSync(dev_->Close()).ok());
  ASSERT_TRUE(DirtyBit(crash));

  const std::string path = Dump(crash, "crash.qcow2");
  // The state is really behind: qemu-img counts references without refcounts.
  auto before = testing::Sh("qemu-img check " + path);
  EXPECT_EQ(before.exit_code, 2) << before.output;
  EXPECT_NE(before.output.find("refcount=0 reference=1"), std::string::npos) << before.output;

  // Read-only: opens as is and reads the data, writes nothing.
  OpenOptions ro;
  ro.format = "qcow2";
  ro.read_only = true;
  {
    auto d = OpenImage(path, ro);
    ASSERT_TRUE(d.ok()) << d.status().ToString();
    std::vector<uint8_t> got(4096);
    ASSERT_TRUE(RunSync((*d)->Read(1499 * kCluster, got.data(), got.size())).ok());
    EXPECT_EQ(got, b);
    ASSERT_TRUE(CloseImage(std::move(*d)).ok());
  }
  EXPECT_EQ(testing::ReadFileBytes(path), crash) << "a read-only open changed the image";

  // Writable: repaired before the first write, clean after.
  OpenOptions rw;
  rw.format = "qcow2";
  auto d = OpenImage(path, rw);
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  std::vector<uint8_t> c(4096, 0x33);
  ASSERT_TRUE(RunSync((*d)->Write(1600 * kCluster, c.data(), c.size())).ok());
  std::vector<uint8_t> got(4096);
  ASSERT_TRUE(RunSync((*d)->Read(0, got.data(), got.size())).ok());
  EXPECT_EQ(got, a);
  ASSERT_TRUE(RunSync((*d)->Read(1499 * kCluster, got.data(), got.size())).ok());
  EXPECT_EQ(got, b);
  ASSERT_TRUE(CloseImage(std::move(*d)).ok());
  EXPECT_FALSE(DirtyBit(testing::ReadFileBytes(path)));
  auto after = testing::Sh("qemu-img check " + path);
  EXPECT_EQ(after.exit_code, 0) << after.output;
}

TEST_F(LazyRefcounts, RepairClearsRefcountsPastTheEndOfTheFile) {
  std::vector<uint8_t> a(4096, 0x44);
  ASSERT_TRUE(RunSync(dev_->Write(0, a.data(), a.size())).ok());
  ASSERT_TRUE(RunSync(dev_->Close()).ok());
  // A crash after the allocator raised refcounts past the end of the file
  // (its pool) and before the file grew: no check sees those refcounts, but
  // they become leaks once the file grows over them.
  std::vector<uint8_t> bytes = data_->bytes;
  bytes.resize((bytes.size() + kCluster - 1) / kCluster * kCluster);
  const uint64_t end = bytes.size() / kCluster;
  for (uint64_t c = end + 2; c < end + 6; ++c) bytes[kRefBlock + 2 * c + 1] = 1;  // 16-bit BE
  bytes[kIncompatOffset + 7] |= 1;  // dirty
  const std::string path = Dump(bytes, "past-end.qcow2");
  auto before = testing::Sh("qemu-img check " + path);
  ASSERT_EQ(before.exit_code, 0) << "qemu-img is expected not to see them:\n" << before.output;

  OpenOptions rw;
  rw.format = "qcow2";
  auto d = OpenImage(path, rw);  // repairs the dirty image
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  std::vector<uint8_t> b(4096, 0x55);
  for (uint64_t i = 1; i < 12; ++i) {
    ASSERT_TRUE(RunSync((*d)->Write(i * kCluster, b.data(), b.size())).ok());
  }
  ASSERT_TRUE(CloseImage(std::move(*d)).ok());
  auto after = testing::Sh("qemu-img check " + path);
  EXPECT_EQ(after.exit_code, 0) << after.output;
}

TEST_F(LazyRefcounts, ReadOnlyOpenNeverMarksTheImageDirty) {
  ASSERT_TRUE(RunSync(dev_->Close()).ok());
  events_.clear();
  Open(true);
  std::vector<uint8_t> got(4096);
  ASSERT_TRUE(RunSync(dev_->Read(0, got.data(), got.size())).ok());
  ASSERT_TRUE(RunSync(dev_->Close()).ok());
  EXPECT_EQ(Find(Kind::kWrite, kIncompatOffset), -1);
  EXPECT_FALSE(DirtyBit(data_->bytes));
}

}  // namespace
}  // namespace kvblk::qcow2
