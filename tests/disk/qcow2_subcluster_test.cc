// Qcow2Device with extended L2 entries (subclusters): what each operation
// does to the subcluster bitmap, what reads return, and a randomized model
// run that ends with an offline check.
#include <gtest/gtest.h>

#include <cerrno>
#include <cstring>
#include <functional>
#include <fstream>
#include <random>

#include "disk/mem_file.h"
#include "disk/qcow2_check.h"
#include "disk/qcow2_device.h"
#include "disk/qcow2_format.h"
#include "kvblk/event_loop.h"
#include "kvblk/image_create.h"
#include "tests/support/test_util.h"

namespace kvblk {
namespace {

using qcow2::Qcow2Device;

constexpr uint64_t kCluster = 65536;
constexpr uint64_t kSub = kCluster / 32;  // 2 KiB subclusters
constexpr uint64_t kDisk = 4ull << 20;
constexpr uint8_t kBackingByte = 0xbb;

uint32_t Bits(uint32_t first, uint32_t last) { return qcow2::SubclusterRange(first, last); }

class Subclusters : public ::testing::Test {
 protected:
  // Creates the image (optionally over a raw backing file full of
  // kBackingByte, or of `backing_bytes` when given) and opens it on a
  // MemFile.
  void Make(bool backing, uint64_t cluster = kCluster, uint64_t size = kDisk) {
    CreateOptions o;
    o.size = size;
    o.cluster_size = static_cast<uint32_t>(cluster);
    o.extended_l2 = true;
    if (backing) {
      backing_path_ = dir_.File("base.raw");
      backing_.assign(size, kBackingByte);
      for (size_t i = 0; i < backing_.size(); i += 4096) backing_[i] = static_cast<uint8_t>(i >> 12);
      std::ofstream(backing_path_, std::ios::binary)
          .write(reinterpret_cast<const char*>(backing_.data()),
                 static_cast<std::streamsize>(backing_.size()));
      o.backing_file = backing_path_;
      o.backing_format = "raw";
    }
    std::string path = dir_.File("img.qcow2");
    ASSERT_TRUE(CreateImage(path, o).ok());
    data_ = std::make_shared<MemFileData>();
    data_->bytes = testing::ReadFileBytes(path);
    Reopen();
  }
  void Reopen() {
    if (dev_) {
      ASSERT_TRUE(RunSync(dev_->Close()).ok());
    }
    dev_.reset();
    auto file = std::make_unique<MemFile>(data_, "img");
    if (hook_) file->SetHook(hook_);
    auto dev = RunSync(Qcow2Device::Open(std::move(file), OpenOptions(), 0));
    ASSERT_TRUE(dev.ok()) << dev.status().ToString();
    dev_ = std::move(*dev);
  }
  void TearDown() override {
    if (dev_) (void)RunSync(dev_->Close());
  }

  // What the guest should see before any write.
  uint8_t Initial(uint64_t off) const { return backing_.empty() ? 0 : backing_[off]; }

  void Write(uint64_t off, uint64_t len, uint8_t byte) {
    std::vector<uint8_t> b(len, byte);
    Status st = RunSync(dev_->Write(off, b.data(), b.size()));
    ASSERT_TRUE(st.ok()) << st.ToString();
  }
  std::vector<uint8_t> Read(uint64_t off, uint64_t len) {
    std::vector<uint8_t> b(len, 0xee);
    Status st = RunSync(dev_->Read(off, b.data(), b.size()));
    EXPECT_TRUE(st.ok()) << st.ToString();
    return b;
  }
  // The on-disk L2 entry (descriptor, bitmap) of guest cluster `gc`, after
  // flushing the metadata.
  std::pair<uint64_t, uint64_t> Entry(uint64_t gc) {
    EXPECT_TRUE(RunSync(dev_->Flush()).ok());
    const auto& h = dev_->header();
    const uint32_t l2_bits = h.cluster_bits - 4;
    const uint8_t* bytes = data_->bytes.data();
    uint64_t l1 = qcow2::LoadBe64(bytes + h.l1_table_offset + (gc >> l2_bits) * 8);
    uint64_t table = l1 & qcow2::kL1OffsetMask;
    if (table == 0) return {0, 0};
    const uint8_t* e = bytes + table + (gc & ((uint64_t{1} << l2_bits) - 1)) * 16;
    return {qcow2::LoadBe64(e), qcow2::LoadBe64(e + 8)};
  }
  static uint64_t Host(const std::pair<uint64_t, uint64_t>& e) { return e.first & qcow2::kL2OffsetMask; }
  static uint32_t Alloc(const std::pair<uint64_t, uint64_t>& e) { return qcow2::SubclusterAllocBits(e.second); }
  static uint32_t Zero(const std::pair<uint64_t, uint64_t>& e) { return qcow2::SubclusterZeroBits(e.second); }

  // Closes the device, writes the image to a file and checks it offline.
  void CloseAndCheckClean() {
    ASSERT_TRUE(RunSync(dev_->Close()).ok());
    dev_.reset();
    std::string out = dir_.File("dump.qcow2");
    std::ofstream(out, std::ios::binary)
        .write(reinterpret_cast<const char*>(data_->bytes.data()),
               static_cast<std::streamsize>(data_->bytes.size()));
    auto r = qcow2::CheckImage(out, qcow2::CheckOptions());
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_EQ(r->corruptions, 0u);
    EXPECT_EQ(r->leaks, 0u);
    EXPECT_EQ(r->check_errors, 0u);
    auto q = testing::Sh("qemu-img check " + out);
    EXPECT_EQ(q.exit_code, 0) << q.output;
  }
  // Patches the bitmap of guest cluster `gc` on disk (the device is closed
  // first and reopened after).
  void PatchEntry(uint64_t gc, uint64_t entry, uint64_t bitmap) {
    ASSERT_TRUE(RunSync(dev_->Flush()).ok());
    const qcow2::Header h = dev_->header();
    ASSERT_TRUE(RunSync(dev_->Close()).ok());
    dev_.reset();
    const auto& bytes = data_->bytes;
    const uint32_t l2_bits = h.cluster_bits - 4;
    uint64_t table = qcow2::LoadBe64(bytes.data() + h.l1_table_offset + (gc >> l2_bits) * 8) &
                     qcow2::kL1OffsetMask;
    ASSERT_NE(table, 0u);
    uint8_t* p = data_->bytes.data() + table + (gc & ((uint64_t{1} << l2_bits) - 1)) * 16;
    qcow2::StoreBe64(p, entry);
    qcow2::StoreBe64(p + 8, bitmap);
    Reopen();
  }
  // Installed on the MemFile by Reopen when set.
  std::function<int(const MemFileEvent&)> hook_;
  testing::TempDir dir_;
  std::string backing_path_;
  std::vector<uint8_t> backing_;
  std::shared_ptr<MemFileData> data_;
  std::unique_ptr<Qcow2Device> dev_;
};

TEST_F(Subclusters, PartialWriteAllocatesOnlyTheSubclustersItTouches) {
  Make(false);
  Write(2 * kSub + 100, 3 * kSub, 0x5a);  // subclusters 2..5
  auto e = Entry(0);
  EXPECT_NE(Host(e), 0u);
  EXPECT_NE(e.first & qcow2::kOflagCopied, 0u);
  EXPECT_EQ(Alloc(e), Bits(2, 5));
  EXPECT_EQ(Zero(e), 0u);
  auto b = Read(0, kCluster);
  for (uint64_t i = 0; i < kCluster; ++i) {
    uint8_t want = (i >= 2 * kSub + 100 && i < 5 * kSub + 100) ? 0x5a : 0;
    ASSERT_EQ(b[i], want) << "at " << i;
  }
  CloseAndCheckClean();
}

TEST_F(Subclusters, EdgeCopyOnWriteFillsPartialSubclustersFromTheBackingFile) {
  Make(true);
  const uint64_t off = kCluster + 3 * kSub + 10;  // cluster 1, subcluster 3
  Write(off, 50, 0x77);
  auto e = Entry(1);
  EXPECT_EQ(Alloc(e), Bits(3, 3));
  auto b = Read(kCluster, kCluster);
  for (uint64_t i = 0; i < kCluster; ++i) {
    uint64_t g = kCluster + i;
    uint8_t want = (g >= off && g < off + 50) ? 0x77 : Initial(g);
    ASSERT_EQ(b[i], want) << "at " << g;
  }
  // The allocated subcluster holds the backing data around the write on the
  // host (copy-on-write), the others were never written.
  const uint8_t* host = data_->bytes.data() + Host(e);
  EXPECT_EQ(host[3 * kSub], Initial(kCluster + 3 * kSub));
  EXPECT_EQ(host[3 * kSub + 9], Initial(kCluster + 3 * kSub + 9));
  EXPECT_EQ(host[3 * kSub + 60], Initial(kCluster + 3 * kSub + 60));
  CloseAndCheckClean();
}

TEST_F(Subclusters, WriteToUnallocatedSubclusterOfOwnedClusterStaysInItsHostCluster) {
  Make(true);
  Write(2 * kSub, 100, 0x01);
  auto first = Entry(0);
  Write(20 * kSub + 7, kSub, 0x02);  // subclusters 20..21
  auto second = Entry(0);
  EXPECT_EQ(Host(second), Host(first));
  EXPECT_EQ(Alloc(second), Bits(2, 2) | Bits(20, 21));
  // An overwrite of allocated subclusters changes nothing in the entry.
  Write(2 * kSub + 5, 10, 0x03);
  EXPECT_EQ(Entry(0), second);
  auto b = Read(0, kCluster);
  for (uint64_t i = 0; i < kCluster; ++i) {
    uint8_t want = Initial(i);
    if (i >= 2 * kSub && i < 2 * kSub + 100) want = 0x01;
    if (i >= 2 * kSub + 5 && i < 2 * kSub + 15) want = 0x03;
    if (i >= 20 * kSub + 7 && i < 21 * kSub + 7) want = 0x02;
    ASSERT_EQ(b[i], want) << "at " << i;
  }
  CloseAndCheckClean();
}

// --- known-zero host subclusters ---------------------------------------------

TEST_F(Subclusters, WriteIntoKnownZeroSubclusterOfOwnClusterWritesOnlyTheGuestData) {
  std::vector<MemFileEvent> writes;  // data writes and host zeroing
  hook_ = [&writes](const MemFileEvent& ev) {
    if (ev.kind == MemFileEvent::Kind::kWrite || ev.kind == MemFileEvent::Kind::kWriteZeroes) {
      writes.push_back(ev);
    }
    return 0;
  };
  Make(false);
  Write(2 * kSub + 10, 100, 0x01);  // a fresh host cluster
  const uint64_t host = Host(Entry(0));
  ASSERT_NE(host, 0u);
  // Bytes of the host cluster written (kWrite) or zeroed (kWriteZeroes).
  auto data_writes = [&](MemFileEvent::Kind kind) {
    uint64_t bytes = 0;
    for (const auto& ev : writes) {
      if (ev.kind == kind && ev.offset >= host && ev.offset < host + kCluster) bytes += ev.length;
    }
    return bytes;
  };
  writes.clear();
  Write(9 * kSub + 30, 100, 0x02);  // subcluster 9: never written, reads as zeros
  EXPECT_EQ(Host(Entry(0)), host);
  EXPECT_EQ(Alloc(Entry(0)), Bits(2, 2) | Bits(9, 9));
  EXPECT_EQ(data_writes(MemFileEvent::Kind::kWrite), 100u) << "zeros around the data were written";
  EXPECT_EQ(data_writes(MemFileEvent::Kind::kWriteZeroes), 0u) << "known zeros were zeroed";
  // A reopened device knows nothing: the host file zeroes the rest of the
  // subcluster, and reads are the same either way.
  Reopen();
  writes.clear();
  Write(14 * kSub + 30, 100, 0x03);
  EXPECT_EQ(data_writes(MemFileEvent::Kind::kWrite), 100u);
  EXPECT_EQ(data_writes(MemFileEvent::Kind::kWriteZeroes), kSub - 100);
  auto b = Read(0, kCluster);
  for (uint64_t i = 0; i < kCluster; ++i) {
    uint8_t want = 0;
    if (i >= 2 * kSub + 10 && i < 2 * kSub + 110) want = 0x01;
    if (i >= 9 * kSub + 30 && i < 9 * kSub + 130) want = 0x02;
    if (i >= 14 * kSub + 30 && i < 14 * kSub + 130) want = 0x03;
    ASSERT_EQ(b[i], want) << "at " << i;
  }
  CloseAndCheckClean();
}

TEST_F(Subclusters, DiscardedThenRewrittenSubclusterReadsZerosAroundTheNewData) {
  Make(false);
  Write(3 * kSub, kSub, 0xaa);   // all of subcluster 3, in a fresh host cluster
  Write(5 * kSub, kSub, 0xaa);   // all of subcluster 5, into that host cluster
  Write(20 * kSub, 10, 0x01);    // keeps the host cluster once 3..5 are discarded
  const uint64_t host = Host(Entry(0));
  ASSERT_TRUE(RunSync(dev_->Discard(3 * kSub, 3 * kSub)).ok());
  EXPECT_EQ(Alloc(Entry(0)), Bits(20, 20));
  EXPECT_EQ(Host(Entry(0)), host);
  // The host bytes of subclusters 3 and 5 still hold 0xaa (discard does not
  // punch them): rewriting part of them must write the zeros around the data.
  Write(3 * kSub + 50, 100, 0x02);
  Write(5 * kSub + 50, 100, 0x03);
  EXPECT_EQ(Host(Entry(0)), host);
  EXPECT_EQ(Alloc(Entry(0)), Bits(3, 3) | Bits(5, 5) | Bits(20, 20));
  auto b = Read(3 * kSub, 3 * kSub);
  for (uint64_t i = 0; i < 3 * kSub; ++i) {
    uint8_t want = 0;
    if (i >= 50 && i < 150) want = 0x02;
    if (i >= 2 * kSub + 50 && i < 2 * kSub + 150) want = 0x03;
    ASSERT_EQ(b[i], want) << "at " << i;
  }
  CloseAndCheckClean();
}

TEST_F(Subclusters, FreedAndReallocatedHostClusterIsNotKnownZero) {
  // Punching freed clusters fails (it is advisory), so freed host clusters
  // keep their bytes.
  hook_ = [](const MemFileEvent& ev) {
    return ev.kind == MemFileEvent::Kind::kDiscard ? EOPNOTSUPP : 0;
  };
  Make(false);
  Write(2 * kSub, 100, 0x01);  // guest cluster 0 gets a fresh host cluster
  const uint64_t host = Host(Entry(0));
  auto discard = [&](uint64_t gc) {
    ASSERT_TRUE(RunSync(dev_->Discard(gc * kCluster, kCluster)).ok());
    ASSERT_TRUE(RunSync(dev_->Flush()).ok());  // the host cluster is freed
  };
  discard(0);
  // Another guest cluster gets that host cluster and fills it with 0xaa.
  bool reused = false;
  for (uint64_t gc = 1; gc < kDisk / kCluster && !reused; ++gc) {
    Write(gc * kCluster, kCluster, 0xaa);
    reused = Host(Entry(gc)) == host;
    discard(gc);
  }
  ASSERT_TRUE(reused) << "the host cluster was not handed out again";
  // Guest cluster 0 gets it back (not fresh).
  reused = false;
  for (int i = 0; i < 64 && !reused; ++i) {
    Write(2 * kSub, 100, 0x01);
    reused = Host(Entry(0)) == host;
    if (!reused) discard(0);
  }
  ASSERT_TRUE(reused) << "guest cluster 0 did not get its host cluster back";
  // Subcluster 7 was never written for guest cluster 0, but its host bytes
  // are 0xaa now: the zeros around the new data must be written.
  Write(7 * kSub + 40, 100, 0x02);
  EXPECT_EQ(Host(Entry(0)), host);
  auto b = Read(0, kCluster);
  for (uint64_t i = 0; i < kCluster; ++i) {
    uint8_t want = 0;
    if (i >= 2 * kSub && i < 2 * kSub + 100) want = 0x01;
    if (i >= 7 * kSub + 40 && i < 7 * kSub + 140) want = 0x02;
    ASSERT_EQ(b[i], want) << "at " << i;
  }
  CloseAndCheckClean();
}

TEST_F(Subclusters, WriteZeroesSetsZeroBitsAndWritesUnalignedRemainders) {
  Make(true);
  Write(0, kCluster, 0x44);
  auto full = Entry(0);
  EXPECT_EQ(Alloc(full), qcow2::kSubclusterAll);
  // [100, 4*kSub + 9): subclusters 1..3 aligned, 0 and 4 partial.
  ASSERT_TRUE(RunSync(dev_->WriteZeroes(100, 4 * kSub - 91, false)).ok());
  auto e = Entry(0);
  EXPECT_EQ(Host(e), Host(full));
  EXPECT_EQ(Zero(e), Bits(1, 3));
  EXPECT_EQ(Alloc(e), qcow2::kSubclusterAll & ~Bits(1, 3));
  auto b = Read(0, kCluster);
  for (uint64_t i = 0; i < kCluster; ++i) {
    uint8_t want = (i >= 100 && i < 4 * kSub + 9) ? 0 : 0x44;
    ASSERT_EQ(b[i], want) << "at " << i;
  }
  // Zeroing over the backing file of a never written cluster: zero bits only.
  ASSERT_TRUE(RunSync(dev_->WriteZeroes(2 * kCluster + 4 * kSub, 2 * kSub, true)).ok());
  auto z = Entry(2);
  EXPECT_EQ(Host(z), 0u);
  EXPECT_EQ(Alloc(z), 0u);
  EXPECT_EQ(Zero(z), Bits(4, 5));
  b = Read(2 * kCluster, kCluster);
  for (uint64_t i = 0; i < kCluster; ++i) {
    uint8_t want = (i >= 4 * kSub && i < 6 * kSub) ? 0 : Initial(2 * kCluster + i);
    ASSERT_EQ(b[i], want) << "at " << i;
  }
  CloseAndCheckClean();
}

TEST_F(Subclusters, DiscardOverBackingFileReadsZerosAndFreesAnEmptiedCluster) {
  Make(true);
  Write(kCluster, 4 * kSub, 0x66);  // cluster 1, subclusters 0..3
  auto before = Entry(1);
  ASSERT_EQ(Alloc(before), Bits(0, 3));
  // An unaligned discard covers subclusters 1..2 only.
  ASSERT_TRUE(RunSync(dev_->Discard(kCluster + kSub - 10, 2 * kSub + 20)).ok());
  auto e = Entry(1);
  EXPECT_EQ(Host(e), Host(before));
  EXPECT_EQ(Alloc(e), Bits(0, 0) | Bits(3, 3));
  EXPECT_EQ(Zero(e), Bits(1, 2));  // never the stale backing data
  auto b = Read(kCluster, 4 * kSub);
  for (uint64_t i = 0; i < 4 * kSub; ++i) {
    uint8_t want = (i >= kSub && i < 3 * kSub) ? 0 : 0x66;
    ASSERT_EQ(b[i], want) << "at " << i;
  }
  // Discarding the last allocated subclusters frees the host cluster.
  ASSERT_TRUE(RunSync(dev_->Discard(kCluster, kSub)).ok());
  ASSERT_TRUE(RunSync(dev_->Discard(kCluster + 3 * kSub, kSub)).ok());
  auto gone = Entry(1);
  EXPECT_EQ(gone.first, 0u);
  EXPECT_EQ(Alloc(gone), 0u);
  EXPECT_EQ(Zero(gone), Bits(0, 3));
  b = Read(kCluster, kCluster);
  for (uint64_t i = 0; i < kCluster; ++i) {
    uint8_t want = i < 4 * kSub ? 0 : Initial(kCluster + i);
    ASSERT_EQ(b[i], want) << "at " << i;
  }
  CloseAndCheckClean();
}

TEST_F(Subclusters, DiscardWithoutBackingLeavesSubclustersUnallocated) {
  Make(false);
  Write(0, kCluster, 0x12);
  ASSERT_TRUE(RunSync(dev_->Discard(8 * kSub, 8 * kSub)).ok());
  auto e = Entry(0);
  EXPECT_EQ(Alloc(e), qcow2::kSubclusterAll & ~Bits(8, 15));
  EXPECT_EQ(Zero(e), 0u);
  auto b = Read(0, kCluster);
  for (uint64_t i = 0; i < kCluster; ++i) {
    ASSERT_EQ(b[i], (i >= 8 * kSub && i < 16 * kSub) ? 0 : 0x12) << "at " << i;
  }
  // A whole-cluster discard of written data leaves a zero cluster.
  ASSERT_TRUE(RunSync(dev_->Discard(0, kCluster)).ok());
  auto w = Entry(0);
  EXPECT_EQ(w.first, 0u);
  EXPECT_EQ(Zero(w), qcow2::kSubclusterAll);
  CloseAndCheckClean();
}

TEST_F(Subclusters, SubclusterBothAllocatedAndZeroIsCorruption) {
  Make(false);
  Write(0, kSub, 0x10);
  auto e = Entry(0);
  PatchEntry(0, e.first, qcow2::SubclusterBitmap(Bits(0, 0), Bits(0, 0)));
  std::vector<uint8_t> b(512);
  Status st = RunSync(dev_->Read(0, b.data(), b.size()));
  EXPECT_EQ(st.code(), StatusCode::kCorruption);
  EXPECT_NE(st.message().find("both allocated and zero"), std::string::npos) << st.message();
  // The image is marked corrupt on disk and refuses writes.
  EXPECT_NE(data_->bytes[79] & 2, 0);
  Status ws = RunSync(dev_->Write(kCluster, b.data(), b.size()));
  EXPECT_EQ(ws.code(), StatusCode::kReadOnly);
}

TEST_F(Subclusters, AllocatedSubclustersWithoutHostClusterIsCorruption) {
  Make(false);
  Write(0, kSub, 0x10);
  PatchEntry(0, 0, qcow2::SubclusterBitmap(Bits(3, 3), 0));
  std::vector<uint8_t> b(512);
  Status st = RunSync(dev_->Read(3 * kSub, b.data(), b.size()));
  EXPECT_EQ(st.code(), StatusCode::kCorruption);
  EXPECT_NE(st.message().find("without a host cluster"), std::string::npos) << st.message();
}

TEST_F(Subclusters, CompressedClusterWithNonZeroBitmapIsCorruption) {
  Make(false);
  std::vector<uint8_t> c(kCluster, 0x3c);
  ASSERT_TRUE(RunSync(dev_->WriteCompressed(kCluster, c.data(), c.size())).ok());
  auto e = Entry(1);
  ASSERT_NE(e.first & qcow2::kOflagCompressed, 0u);
  EXPECT_EQ(e.second, 0u);
  EXPECT_EQ(Read(kCluster, 100), std::vector<uint8_t>(100, 0x3c));
  PatchEntry(1, e.first, qcow2::SubclusterBitmap(1, 0));
  std::vector<uint8_t> b(512);
  Status st = RunSync(dev_->Read(kCluster, b.data(), b.size()));
  EXPECT_EQ(st.code(), StatusCode::kCorruption);
  EXPECT_NE(st.message().find("compressed cluster has a non-zero subcluster bitmap"),
            std::string::npos)
      << st.message();
}

TEST_F(Subclusters, PartialWriteToCompressedClusterCopiesItWhole) {
  Make(false);
  std::vector<uint8_t> c(kCluster, 0x3c);
  ASSERT_TRUE(RunSync(dev_->WriteCompressed(0, c.data(), c.size())).ok());
  Write(5 * kSub + 1, 10, 0x99);
  auto e = Entry(0);
  EXPECT_EQ(e.first & qcow2::kOflagCompressed, 0u);
  EXPECT_EQ(Alloc(e), qcow2::kSubclusterAll);
  auto b = Read(0, kCluster);
  for (uint64_t i = 0; i < kCluster; ++i) {
    ASSERT_EQ(b[i], (i > 5 * kSub && i <= 5 * kSub + 10) ? 0x99 : 0x3c) << "at " << i;
  }
  CloseAndCheckClean();
}

TEST_F(Subclusters, WriteAfterSnapshotCopiesTheSharedClusterAndKeepsItsBitmap) {
  Make(true);
  Write(0, kSub, 0x01);            // subcluster 0
  Write(5 * kSub, kSub, 0x05);     // subcluster 5
  ASSERT_TRUE(RunSync(dev_->WriteZeroes(9 * kSub, kSub, false)).ok());  // 9 zero
  auto before = Entry(0);
  ASSERT_TRUE(RunSync(dev_->CreateSnapshot("s1")).ok());
  Write(10 * kSub + 3, 5, 0x0a);   // subcluster 10, partial
  auto after = Entry(0);
  EXPECT_NE(Host(after), Host(before));
  EXPECT_NE(after.first & qcow2::kOflagCopied, 0u);
  EXPECT_EQ(Alloc(after), Bits(0, 0) | Bits(5, 5) | Bits(10, 10));
  EXPECT_EQ(Zero(after), Bits(9, 9));
  auto check = [&](bool with_new) {
    auto b = Read(0, kCluster);
    for (uint64_t i = 0; i < kCluster; ++i) {
      uint8_t want = Initial(i);
      if (i < kSub) want = 0x01;
      if (i >= 5 * kSub && i < 6 * kSub) want = 0x05;
      if (i >= 9 * kSub && i < 10 * kSub) want = 0;
      if (with_new && i >= 10 * kSub + 3 && i < 10 * kSub + 8) want = 0x0a;
      ASSERT_EQ(b[i], want) << "at " << i;
    }
  };
  check(true);
  ASSERT_TRUE(RunSync(dev_->ApplySnapshot("s1")).ok());
  check(false);
  EXPECT_EQ(Entry(0).second, before.second);
  CloseAndCheckClean();
}

TEST_F(Subclusters, BlockStatusReportsRunsOfSubclusters) {
  Make(true);
  Write(4 * kSub, 2 * kSub, 0x42);  // subclusters 4..5
  ASSERT_TRUE(RunSync(dev_->WriteZeroes(6 * kSub, kSub, false)).ok());  // 6
  auto s0 = RunSync(dev_->GetBlockStatus(0, kCluster));
  ASSERT_TRUE(s0.ok());
  EXPECT_EQ(s0->length, 4 * kSub);
  EXPECT_EQ(s0->depth, 1);  // from the backing file
  auto s1 = RunSync(dev_->GetBlockStatus(4 * kSub, kCluster));
  ASSERT_TRUE(s1.ok());
  EXPECT_EQ(s1->length, 2 * kSub);
  EXPECT_TRUE(s1->data);
  EXPECT_EQ(s1->depth, 0);
  ASSERT_TRUE(s1->host_offset.has_value());
  EXPECT_EQ(*s1->host_offset, Host(Entry(0)) + 4 * kSub);
  auto s2 = RunSync(dev_->GetBlockStatus(6 * kSub, kCluster));
  ASSERT_TRUE(s2.ok());
  EXPECT_EQ(s2->length, kSub);
  EXPECT_TRUE(s2->zero);
  EXPECT_EQ(s2->depth, 0);
}

TEST_F(Subclusters, ShrinkAndGrowKeepOnlyWhatFits) {
  Make(false);
  Write(kDisk - kCluster, kCluster, 0x31);
  Write(kCluster + 3 * kSub, 100, 0x32);
  ASSERT_TRUE(RunSync(dev_->Resize(kCluster + 4 * kSub, true)).ok());
  ASSERT_TRUE(RunSync(dev_->Resize(kDisk, false)).ok());
  auto b = Read(kCluster, kCluster);
  for (uint64_t i = 0; i < kCluster; ++i) {
    ASSERT_EQ(b[i], (i >= 3 * kSub && i < 3 * kSub + 100) ? 0x32 : 0) << "at " << i;
  }
  EXPECT_EQ(Read(kDisk - kCluster, 512), std::vector<uint8_t>(512, 0));
  CloseAndCheckClean();
}

// Random reads, writes, write zeroes and discards against an in-memory
// model; discards must leave zeros or the previous data, nothing else.
class SubclusterModel : public Subclusters, public ::testing::WithParamInterface<int> {};

TEST_P(SubclusterModel, RandomOperationsMatchModelAndCheckClean) {
  const bool backing = GetParam() & 1;
  const uint64_t cluster = (GetParam() & 2) ? 16384 : kCluster;
  const uint64_t disk = 2ull << 20;
  Make(backing, cluster, disk);
  std::vector<uint8_t> model(disk);
  for (uint64_t i = 0; i < disk; ++i) model[i] = Initial(i);
  std::vector<uint8_t> old_data;  // before a discard
  std::mt19937_64 rng(1234 + GetParam());
  const uint64_t sub = cluster / 32;
  auto pick = [&](uint64_t max_len) {
    uint64_t off, len;
    switch (rng() % 3) {
      case 0:  // subcluster aligned
        off = (rng() % (disk / sub)) * sub;
        len = (1 + rng() % (max_len / sub)) * sub;
        break;
      case 1:  // sector aligned
        off = (rng() % (disk / 512)) * 512;
        len = (1 + rng() % (max_len / 512)) * 512;
        break;
      default:
        off = rng() % disk;
        len = 1 + rng() % max_len;
    }
    len = std::min(len, disk - off);
    return std::make_pair(off, len);
  };
  for (int op = 0; op < 400; ++op) {
    auto [off, len] = pick(rng() % 4 == 0 ? 3 * cluster : cluster / 2);
    switch (rng() % 8) {
      case 0:
      case 1:
      case 2: {
        auto buf = testing::PatternBytes(len, static_cast<uint32_t>(op));
        ASSERT_TRUE(RunSync(dev_->Write(off, buf.data(), buf.size())).ok()) << op;
        std::memcpy(&model[off], buf.data(), len);
        break;
      }
      case 3:
        ASSERT_TRUE(RunSync(dev_->WriteZeroes(off, len, rng() % 2 == 0)).ok()) << op;
        std::memset(&model[off], 0, len);
        break;
      case 4: {
        ASSERT_TRUE(RunSync(dev_->Discard(off, len)).ok()) << op;
        auto now = Read(off, len);
        for (uint64_t i = 0; i < len; ++i) {
          ASSERT_TRUE(now[i] == 0 || now[i] == model[off + i])
              << "op " << op << " discard left byte " << int(now[i]) << " at " << off + i;
        }
        std::memcpy(&model[off], now.data(), len);
        break;
      }
      case 5:
        if (rng() % 8 == 0) {
          ASSERT_TRUE(RunSync(dev_->Flush()).ok());
        }
        if (rng() % 40 == 0) Reopen();
        break;
      default: {
        auto got = Read(off, len);
        ASSERT_EQ(0, std::memcmp(got.data(), &model[off], len)) << "op " << op << " read at "
                                                                << off << "+" << len;
      }
    }
  }
  Reopen();
  auto all = Read(0, disk);
  for (uint64_t i = 0; i < disk; ++i) ASSERT_EQ(all[i], model[i]) << "at " << i;
  CloseAndCheckClean();
}

INSTANTIATE_TEST_SUITE_P(Variants, SubclusterModel, ::testing::Values(0, 1, 2, 3),
                         [](const ::testing::TestParamInfo<int>& i) {
                           return std::string((i.param & 2) ? "Cluster16k" : "Cluster64k") +
                                  ((i.param & 1) ? "Backing" : "NoBacking");
                         });

TEST(SubclusterOpen, MetadataPreallocationOverBackingStillReadsTheBackingFile) {
  testing::TempDir dir;
  std::string base = dir.File("base.raw");
  std::vector<uint8_t> bytes(1 << 20, 0x61);
  std::ofstream(base, std::ios::binary)
      .write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  CreateOptions o;
  o.size = 1 << 20;
  o.extended_l2 = true;
  o.backing_file = base;
  o.backing_format = "raw";
  o.preallocation = Preallocation::kMetadata;
  std::string img = dir.File("p.qcow2");
  Status cs = CreateImage(img, o);
  ASSERT_TRUE(cs.ok()) << cs.ToString();
  auto dev = OpenImage(img, OpenOptions());
  ASSERT_TRUE(dev.ok()) << dev.status().ToString();
  std::vector<uint8_t> b(4096);
  ASSERT_TRUE(RunSync((*dev)->Read(70000, b.data(), b.size())).ok());
  EXPECT_EQ(b, std::vector<uint8_t>(4096, 0x61));
  std::vector<uint8_t> w(100, 0x62);
  ASSERT_TRUE(RunSync((*dev)->Write(70000, w.data(), w.size())).ok());
  ASSERT_TRUE(RunSync((*dev)->Read(69950, b.data(), 200)).ok());
  for (int i = 0; i < 200; ++i) ASSERT_EQ(b[i], (i >= 50 && i < 150) ? 0x62 : 0x61) << i;
  ASSERT_TRUE(CloseImage(std::move(*dev)).ok());
  auto q = testing::Sh("qemu-img check " + img);
  EXPECT_EQ(q.exit_code, 0) << q.output;
  auto r = testing::Sh("qemu-io -r -c 'read -P 0x62 70000 100' -c 'read -P 0x61 0 70000' " + img);
  EXPECT_EQ(r.output.find("Pattern verification failed"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace kvblk
