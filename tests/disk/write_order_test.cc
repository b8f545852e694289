// The qcow2 write-ordering rules, observed through a recording MemFile:
//  - a new cluster's refcount reaches the disk (write + flush) before the L2
//    table that points to it is written;
//  - a new L2 table is written and flushed before the L1 entry pointing to it;
//  - an L2 entry is cleared on disk (write + flush) before the refcount of
//    the cluster it pointed to drops.
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

using Kind = MemFileEvent::Kind;

class WriteOrder : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string path = dir_.File("img.qcow2");
    CreateOptions o;
    o.size = 64ull << 20;
    ASSERT_TRUE(CreateImage(path, o).ok());
    data_ = std::make_shared<MemFileData>();
    data_->bytes = testing::ReadFileBytes(path);
    auto file = std::make_unique<MemFile>(data_, "img");
    file->SetHook([this](const MemFileEvent& e) {
      if (e.kind != Kind::kRead) events_.push_back(e);
      return 0;
    });
    auto dev = RunSync(Qcow2Device::Open(std::move(file), OpenOptions(), 0));
    ASSERT_TRUE(dev.ok()) << dev.status().ToString();
    dev_ = std::move(*dev);
  }

  // Index of the first/last event matching; -1 if none.
  int Find(Kind k, uint64_t off, bool last = false, int from = 0) const {
    int found = -1;
    for (int i = from; i < static_cast<int>(events_.size()); ++i) {
      const auto& e = events_[i];
      if (e.kind == k && (k == Kind::kFlush || e.offset == off)) {
        found = i;
        if (!last) break;
      }
    }
    return found;
  }
  bool FlushBetween(int a, int b) const {
    for (int i = a + 1; i < b; ++i) {
      if (events_[i].kind == Kind::kFlush) return true;
    }
    return false;
  }
  void DumpAndCheck() {
    std::string out = dir_.File("dump.qcow2");
    std::ofstream(out, std::ios::binary)
        .write(reinterpret_cast<const char*>(data_->bytes.data()),
               static_cast<std::streamsize>(data_->bytes.size()));
    auto r = testing::Sh("qemu-img check " + out);
    EXPECT_EQ(r.exit_code, 0) << r.output;
  }

  testing::TempDir dir_;
  std::shared_ptr<MemFileData> data_;
  std::vector<MemFileEvent> events_;
  std::unique_ptr<Qcow2Device> dev_;
};

TEST_F(WriteOrder, NewL2TableIsDurableBeforeTheL1EntryPointsToIt) {
  std::vector<uint8_t> buf(4096, 0xaa);
  ASSERT_TRUE(RunSync(dev_->Write(0, buf.data(), buf.size())).ok());
  int l2 = Find(Kind::kWrite, kFirstL2);
  int l1 = Find(Kind::kWrite, kL1);
  ASSERT_GE(l2, 0);
  ASSERT_GT(l1, l2) << "L1 entry written before its L2 table";
  EXPECT_TRUE(FlushBetween(l2, l1)) << "no flush between L2 table and L1 entry";
  ASSERT_TRUE(RunSync(dev_->Close()).ok());
  DumpAndCheck();
}

TEST_F(WriteOrder, RefcountIsDurableBeforeL2TablePointingToNewCluster) {
  std::vector<uint8_t> buf(4096, 0xbb);
  ASSERT_TRUE(RunSync(dev_->Write(0, buf.data(), buf.size())).ok());
  size_t before_flush = events_.size();
  ASSERT_TRUE(RunSync(dev_->Flush()).ok());
  // The write-back of the L2 table that now maps the data cluster.
  int l2 = Find(Kind::kWrite, kFirstL2, /*last=*/false, static_cast<int>(before_flush));
  ASSERT_GE(l2, 0) << "flush did not write the dirty L2 table";
  int rb = Find(Kind::kWrite, kRefBlock, /*last=*/true);
  ASSERT_GE(rb, 0);
  ASSERT_LT(rb, l2) << "refcount block written after the L2 table";
  EXPECT_TRUE(FlushBetween(rb, l2)) << "refcount block not flushed before the L2 table";
  ASSERT_TRUE(RunSync(dev_->Close()).ok());
  DumpAndCheck();
}

TEST_F(WriteOrder, L2EntryIsClearedOnDiskBeforeRefcountDrops) {
  std::vector<uint8_t> buf(kCluster, 0xcc);
  ASSERT_TRUE(RunSync(dev_->Write(0, buf.data(), buf.size())).ok());
  ASSERT_TRUE(RunSync(dev_->Flush()).ok());
  size_t mark = events_.size();
  ASSERT_TRUE(RunSync(dev_->Discard(0, kCluster)).ok());
  // Nothing about the free may reach the disk before the guest's flush.
  EXPECT_EQ(Find(Kind::kWrite, kRefBlock, false, static_cast<int>(mark)), -1);
  ASSERT_TRUE(RunSync(dev_->Flush()).ok());
  int l2 = Find(Kind::kWrite, kFirstL2, false, static_cast<int>(mark));
  int rb = Find(Kind::kWrite, kRefBlock, false, static_cast<int>(mark));
  ASSERT_GE(l2, 0);
  ASSERT_GT(rb, l2) << "refcount dropped before the L2 entry was cleared on disk";
  EXPECT_TRUE(FlushBetween(l2, rb));
  ASSERT_TRUE(RunSync(dev_->Close()).ok());
  DumpAndCheck();
}

TEST_F(WriteOrder, NothingIsSyncedOnTheWritePathOnceTablesExist) {
  std::vector<uint8_t> buf(4096, 0x11);
  ASSERT_TRUE(RunSync(dev_->Write(0, buf.data(), buf.size())).ok());
  ASSERT_TRUE(RunSync(dev_->Flush()).ok());
  size_t mark = events_.size();
  for (int i = 1; i < 8; ++i) {
    ASSERT_TRUE(RunSync(dev_->Write(i * kCluster, buf.data(), buf.size())).ok());
  }
  for (size_t i = mark; i < events_.size(); ++i) {
    EXPECT_NE(events_[i].kind, Kind::kFlush) << "allocating write synced (event " << i << ")";
  }
  ASSERT_TRUE(RunSync(dev_->Close()).ok());
  DumpAndCheck();
}

TEST_F(WriteOrder, ConcurrentAllocatingWritesToOneClusterAllocateItOnce) {
  std::vector<uint8_t> a(4096, 0x01), b(4096, 0x02);
  ASSERT_TRUE(RunSync(dev_->Write(0, a.data(), a.size())).ok());  // creates the L2 table
  uint64_t size_before = data_->bytes.size();
  int done = 0;
  auto write = [&](uint64_t off, std::vector<uint8_t>* v) {
    Spawn(dev_->Write(off + kCluster, v->data(), v->size()), [&](Status st) {
      EXPECT_TRUE(st.ok()) << st.ToString();
      ++done;
    });
  };
  write(0, &a);
  write(8192, &b);
  EventLoop::Current().RunUntil([&] { return done == 2; });
  // A second allocation would land a whole cluster further on. (The fresh
  // cluster is not filled with zeros, so the file may end inside it.)
  const uint64_t base = (size_before + kCluster - 1) / kCluster * kCluster;
  EXPECT_GT(data_->bytes.size(), base);
  EXPECT_LE(data_->bytes.size(), base + kCluster) << "more than one cluster allocated";
  std::vector<uint8_t> got(12288);
  ASSERT_TRUE(RunSync(dev_->Read(kCluster, got.data(), got.size())).ok());
  for (size_t i = 0; i < 4096; ++i) ASSERT_EQ(got[i], 0x01);
  for (size_t i = 4096; i < 8192; ++i) ASSERT_EQ(got[i], 0x00);
  for (size_t i = 8192; i < 12288; ++i) ASSERT_EQ(got[i], 0x02);
  ASSERT_TRUE(RunSync(dev_->Close()).ok());
  DumpAndCheck();
}


TEST_F(WriteOrder, SmallWriteIntoFreshClusterWritesOnlyTheGuestData) {
  std::vector<uint8_t> buf(4096, 0x33);
  ASSERT_TRUE(RunSync(dev_->Write(0, buf.data(), buf.size())).ok());  // creates the L2 table
  size_t mark = events_.size();
  ASSERT_TRUE(RunSync(dev_->Write(3 * kCluster + 8192, buf.data(), buf.size())).ok());
  uint64_t bytes = 0;
  for (size_t i = mark; i < events_.size(); ++i) {
    if (events_[i].kind == Kind::kWrite) bytes += events_[i].length;
  }
  EXPECT_EQ(bytes, 4096u) << "copy-on-write of zeros was written to a fresh cluster";
  std::vector<uint8_t> got(kCluster);
  ASSERT_TRUE(RunSync(dev_->Read(3 * kCluster, got.data(), got.size())).ok());
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_EQ(got[i], (i >= 8192 && i < 12288) ? 0x33 : 0) << i;
  }
  ASSERT_TRUE(RunSync(dev_->Close()).ok());
  DumpAndCheck();
}

}  // namespace
}  // namespace kvblk::qcow2
