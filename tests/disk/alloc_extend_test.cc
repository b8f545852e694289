// Allocator pre-extension (issue 7): on a writable O_DIRECT file the
// allocator extends the host file in batches ahead of the clusters it hands
// out, keeps runs past the logical end `fresh`, never zeroes a cluster it
// handed out, trims the file back on a clean close, and leaves after a crash
// a tail of free clusters that checks accept and later allocations reuse.
//
// The allocator cases run over a MemFile that reports O_DIRECT alignment;
// the device cases over real O_DIRECT files judged by kvblk's checker and
// qemu-img.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "disk/allocator.h"
#include "disk/mem_file.h"
#include "disk/qcow2_check.h"
#include "disk/qcow2_header.h"
#include "kvblk/block_device.h"
#include "kvblk/event_loop.h"
#include "kvblk/image_create.h"
#include "tests/support/qemu_util.h"
#include "tests/support/test_util.h"

namespace kvblk::qcow2 {
namespace {

constexpr uint64_t kCluster = 65536;
constexpr uint64_t kMiB = 1 << 20;

// A MemFile that says it is O_DIRECT (alignment 4096), so the allocator
// pre-extends it. DataExtent answers `zeros_are_data` for every range: false
// is what a host with zero range reports for the extended space.
class DirectMemFile final : public File {
 public:
  explicit DirectMemFile(std::unique_ptr<MemFile> inner) : inner_(std::move(inner)) {}
  Task<Status> ReadV(const iovec* iov, int n, uint64_t off) override {
    return inner_->ReadV(iov, n, off);
  }
  Task<Status> WriteV(const iovec* iov, int n, uint64_t off) override {
    return inner_->WriteV(iov, n, off);
  }
  Task<Status> Flush() override { return inner_->Flush(); }
  Task<Status> Discard(uint64_t off, uint64_t len) override { return inner_->Discard(off, len); }
  Task<Status> WriteZeroes(uint64_t off, uint64_t len, bool allocate) override {
    return inner_->WriteZeroes(off, len, allocate);
  }
  Result<uint64_t> Size() override { return inner_->Size(); }
  Status Truncate(uint64_t size) override { return inner_->Truncate(size); }
  Result<uint64_t> AllocatedBytes() override { return inner_->AllocatedBytes(); }
  Result<Extent> DataExtent(uint64_t, uint64_t max) override { return Extent{zeros_are_data, max}; }
  const std::string& path() const override { return inner_->path(); }
  bool read_only() const override { return inner_->read_only(); }
  uint32_t alignment() const override { return 4096; }

  bool zeros_are_data = false;

 private:
  std::unique_ptr<MemFile> inner_;
};

class AllocExtend : public ::testing::Test {
 protected:
  // A fresh image with 64 KiB clusters: clusters 0-3 hold the metadata.
  // `direct`: the file reports O_DIRECT alignment.
  void Init(bool direct = true, bool read_only = false) {
    testing::TempDir dir;
    CreateOptions o;
    o.size = 1ull << 30;
    o.cluster_size = kCluster;
    ASSERT_TRUE(CreateImage(dir.File("a.qcow2"), o).ok());
    data_ = std::make_shared<MemFileData>();
    data_->bytes = testing::ReadFileBytes(dir.File("a.qcow2"));
    size0_ = data_->bytes.size();
    auto mem = std::make_unique<MemFile>(data_, "a.qcow2", read_only);
    mem->set_yield(false);
    mem->SetHook([this](const MemFileEvent& e) {
      if (e.kind != MemFileEvent::Kind::kWriteZeroes) return 0;
      zeroes_.push_back(e);
      return fail_zeroes_ ? EIO : 0;
    });
    if (direct) {
      auto d = std::make_unique<DirectMemFile>(std::move(mem));
      direct_ = d.get();
      file_ = std::move(d);
    } else {
      file_ = std::move(mem);
    }
    auto h = DecodeHeader(data_->bytes, data_->bytes.size(), "a.qcow2");
    ASSERT_TRUE(h.ok()) << h.status().ToString();
    Refcounts::Config c;
    c.file = file_.get();
    c.cluster_bits = h->cluster_bits;
    c.refcount_order = h->refcount_order;
    c.table_offset = h->refcount_table_offset;
    c.table_clusters = h->refcount_table_clusters;
    c.switch_table = [](uint64_t, uint32_t) -> Task<Status> { co_return Status::Ok(); };
    auto rc = RunSync(Refcounts::Load(c, data_->bytes.size()));
    ASSERT_TRUE(rc.ok()) << rc.status().ToString();
    rc_ = std::move(*rc);
    alloc_ = std::make_unique<Allocator>(rc_.get(), file_.get(), h->cluster_bits);
  }
  uint64_t Size() { return data_->bytes.size(); }
  Allocator::Run MustAllocate(uint64_t n) {
    auto r = RunSync(alloc_->Allocate(n));
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok() ? *r : Allocator::Run{0, 0, false};
  }

  std::shared_ptr<MemFileData> data_;
  uint64_t size0_ = 0;
  std::unique_ptr<File> file_;
  DirectMemFile* direct_ = nullptr;
  std::vector<MemFileEvent> zeroes_;
  bool fail_zeroes_ = false;
  std::unique_ptr<Refcounts> rc_;
  std::unique_ptr<Allocator> alloc_;
};

// The first fresh run makes the file grow, in one zero-range call from the
// logical end, by a whole minimum step; the next run fits in it.
TEST_F(AllocExtend, ExtendsTheFileInOneBatchAheadOfAFreshRun) {
  Init();
  ASSERT_EQ(size0_, 4 * kCluster);
  EXPECT_TRUE(alloc_->extending());
  Allocator::Run a = MustAllocate(1);
  EXPECT_EQ(a.offset, 4 * kCluster);
  EXPECT_TRUE(a.fresh);
  ASSERT_EQ(zeroes_.size(), 1u);
  EXPECT_EQ(zeroes_[0].offset, 4 * kCluster);
  EXPECT_EQ(zeroes_[0].length, Allocator::kExtendMinBytes + kCluster);
  EXPECT_EQ(Size(), 5 * kCluster + Allocator::kExtendMinBytes);
  EXPECT_EQ(alloc_->extended_to(), Size());
  Allocator::Run b = MustAllocate(2);
  EXPECT_EQ(b.offset, 5 * kCluster);
  EXPECT_TRUE(b.fresh);
  EXPECT_EQ(zeroes_.size(), 1u) << "a run with enough headroom extended the file again";
}

// Runs inside the pre-extended space are still fresh (they lie past the
// logical end), every run lies inside the file with at least half a step
// of headroom, and no extension ever zeroes a cluster already handed out:
// each cluster keeps the bytes written to it right after its allocation.
TEST_F(AllocExtend, RunsInThePreExtendedSpaceStayFreshAndKeepTheirData) {
  Init();
  // The last cluster before the logical end holds data that must survive.
  std::vector<uint8_t> last = testing::PatternBytes(kCluster, 77);
  std::copy(last.begin(), last.end(), data_->bytes.begin() + 3 * kCluster);
  const std::vector<uint8_t> metadata(data_->bytes.begin(), data_->bytes.end());
  std::vector<Allocator::Run> runs;
  uint64_t handed_out_end = 0;
  size_t seen_zeroes = 0;
  for (int i = 0; i < 400; ++i) {  // 25 MiB: several extensions
    Allocator::Run r = MustAllocate(1);
    ASSERT_EQ(r.count, 1u);
    EXPECT_TRUE(r.fresh) << "run " << i << " at " << r.offset;
    EXPECT_GE(Size(), r.offset + kCluster + Allocator::kExtendMinBytes / 2) << i;
    for (; seen_zeroes < zeroes_.size(); ++seen_zeroes) {
      EXPECT_GE(zeroes_[seen_zeroes].offset, handed_out_end) << "extension " << seen_zeroes;
    }
    handed_out_end = r.offset + kCluster;
    std::vector<uint8_t> pat = testing::PatternBytes(kCluster, i);
    ASSERT_TRUE(RunSync(file_->Write(pat.data(), pat.size(), r.offset)).ok());
    runs.push_back(r);
  }
  EXPECT_GE(zeroes_.size(), 2u);
  EXPECT_LE(zeroes_.size(), 6u) << "extensions are not batched";
  EXPECT_TRUE(std::equal(metadata.begin(), metadata.end(), data_->bytes.begin()))
      << "an extension zeroed bytes before the logical end";
  for (size_t i = 0; i < runs.size(); ++i) {
    std::vector<uint8_t> got(kCluster);
    ASSERT_TRUE(RunSync(file_->Read(got.data(), got.size(), runs[i].offset)).ok());
    EXPECT_EQ(got, testing::PatternBytes(kCluster, static_cast<uint32_t>(i))) << "run " << i;
  }
}

// ReleasePool (clean close) returns the pooled clusters and truncates the
// file to the end of the last cluster still in use.
TEST_F(AllocExtend, ReleasePoolTruncatesToTheLastClusterInUse) {
  Init();
  alloc_->EnablePool(64);
  uint64_t end = 0;
  for (int i = 0; i < 20; ++i) {
    Allocator::Run r = MustAllocate(1);
    end = std::max(end, r.offset + r.count * kCluster);
  }
  ASSERT_GT(alloc_->pooled_clusters(), 0u);
  ASSERT_GT(Size(), end + Allocator::kExtendMinBytes / 2);
  ASSERT_TRUE(RunSync(alloc_->ReleasePool()).ok());
  EXPECT_EQ(Size(), end);
  EXPECT_EQ(alloc_->extended_to(), 0u);
  auto rc = RunSync(rc_->Get(end / kCluster));
  ASSERT_TRUE(rc.ok());
  EXPECT_EQ(*rc, 0u);
}

// With nothing in use past the old end (the only new cluster was freed),
// the clean close restores the size the file had before it was extended.
TEST_F(AllocExtend, ReleasePoolRestoresTheOriginalSizeWhenNothingNewIsInUse) {
  Init();
  Allocator::Run r = MustAllocate(1);
  ASSERT_GT(Size(), size0_);
  alloc_->DeferFree(r.offset, 1);
  ASSERT_TRUE(RunSync(alloc_->ApplyFrees(alloc_->TakeDeferred())).ok());
  ASSERT_TRUE(RunSync(alloc_->ReleasePool()).ok());
  EXPECT_EQ(Size(), size0_);
}

// Files without O_DIRECT alignment (MemFile, the test engines) and
// read-only files are never extended.
TEST_F(AllocExtend, BufferedAndReadOnlyFilesAreNeverExtended) {
  Init(/*direct=*/false);
  EXPECT_FALSE(alloc_->extending());
  Allocator::Run r = MustAllocate(3);
  EXPECT_TRUE(r.fresh);
  EXPECT_TRUE(zeroes_.empty());
  EXPECT_EQ(Size(), size0_);
  ASSERT_TRUE(RunSync(alloc_->ReleasePool()).ok());
  EXPECT_EQ(Size(), size0_);

  Init(/*direct=*/true, /*read_only=*/true);
  EXPECT_FALSE(alloc_->extending());
  r = MustAllocate(1);
  EXPECT_TRUE(zeroes_.empty());
  EXPECT_EQ(Size(), size0_);
}

// A file already longer than its logical end (what a block device looks
// like) is never extended, and ReleasePool leaves its size alone.
TEST_F(AllocExtend, AFileLongerThanItsLogicalEndIsNeverExtended) {
  Init();
  data_->bytes.resize(size0_ + kMiB);  // after Refcounts::Load took the end
  Allocator::Run r = MustAllocate(1);
  EXPECT_TRUE(r.fresh);
  EXPECT_TRUE(zeroes_.empty());
  EXPECT_FALSE(alloc_->extending());
  ASSERT_TRUE(RunSync(alloc_->ReleasePool()).ok());
  EXPECT_EQ(Size(), size0_ + kMiB);
}

// A failed extension does not fail the allocation; pre-extension stops.
TEST_F(AllocExtend, AFailedExtensionIsAdvisoryAndStopsPreExtension) {
  Init();
  fail_zeroes_ = true;
  Allocator::Run r = MustAllocate(1);
  EXPECT_TRUE(r.fresh);
  EXPECT_EQ(zeroes_.size(), 1u);
  EXPECT_FALSE(alloc_->extending());
  EXPECT_EQ(alloc_->extended_to(), 0u);
  fail_zeroes_ = false;
  for (int i = 0; i < 200; ++i) MustAllocate(1);
  EXPECT_EQ(zeroes_.size(), 1u);
}

// A host that "extended" by writing zeros (the range reads back as data)
// gets one batch, then no more.
TEST_F(AllocExtend, StopsAfterOneBatchWhenTheHostWroteTheZeros) {
  Init();
  direct_->zeros_are_data = true;
  MustAllocate(1);
  EXPECT_EQ(zeroes_.size(), 1u);
  EXPECT_FALSE(alloc_->extending());
  for (int i = 0; i < 200; ++i) MustAllocate(1);
  EXPECT_EQ(zeroes_.size(), 1u);
  // The batch it did make is still trimmed on close (the file had not
  // grown past it: nothing was written).
  ASSERT_EQ(Size(), 5 * kCluster + Allocator::kExtendMinBytes);
  alloc_->DeferFree(100 * kCluster, 105);
  ASSERT_TRUE(RunSync(alloc_->ApplyFrees(alloc_->TakeDeferred())).ok());
  ASSERT_TRUE(RunSync(alloc_->ReleasePool()).ok());
  EXPECT_EQ(Size(), 100 * kCluster);
}

// --- Whole images on real O_DIRECT files ---------------------------------

uint64_t FileSize(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0 ? static_cast<uint64_t>(st.st_size) : 0;
}

std::unique_ptr<BlockDevice> MustOpen(const std::string& path, bool direct, bool ro = false) {
  OpenOptions o;
  o.format = "qcow2";
  o.direct = direct;
  o.read_only = ro;
  auto d = OpenImage(path, o);
  EXPECT_TRUE(d.ok()) << d.status().ToString();
  return d.ok() ? std::move(*d) : nullptr;
}

void MustCreate(const std::string& path, bool lazy = false) {
  CreateOptions o;
  o.size = 4ull << 30;
  o.cluster_size = kCluster;
  o.lazy_refcounts = lazy;
  ASSERT_TRUE(CreateImage(path, o).ok());
}

// Whole clusters at scattered guest offsets (one L2 table covers 512 MiB).
uint64_t GuestOffset(int i) { return (static_cast<uint64_t>(i) * 7919 % 16384) * kCluster; }

void WriteClusters(BlockDevice& dev, int from, int to) {
  for (int i = from; i < to; ++i) {
    std::vector<uint8_t> pat = testing::PatternBytes(kCluster, 1000 + i);
    ASSERT_TRUE(RunSync(dev.Write(GuestOffset(i), pat.data(), pat.size())).ok()) << i;
  }
}

void ExpectClusters(BlockDevice& dev, int from, int to) {
  for (int i = from; i < to; ++i) {
    auto got = testing::ReadRange(dev, GuestOffset(i), kCluster);
    ASSERT_TRUE(got.ok()) << got.status().ToString();
    EXPECT_EQ(*got, testing::PatternBytes(kCluster, 1000 + i)) << "guest cluster " << i;
  }
}

// The state a crash leaves: `img` created (with lazy refcounts if `lazy`),
// clusters 0..99 written and flushed, then the file copied to `crash` while
// the device is still open (pool and pre-extended tail included); the
// device is then closed cleanly. Returns false (with a failure recorded)
// if the copy does not carry the pre-extended tail.
bool MakeCrashCopy(const std::string& img, const std::string& crash, bool lazy) {
  MustCreate(img, lazy);
  auto dev = MustOpen(img, true);
  if (!dev) return false;
  WriteClusters(*dev, 0, 100);
  EXPECT_TRUE(RunSync(dev->Flush()).ok());
  std::filesystem::copy_file(img, crash);
  EXPECT_TRUE(CloseImage(std::move(dev)).ok());
  EXPECT_GE(FileSize(crash), FileSize(img) + Allocator::kExtendMinBytes / 2);
  return !::testing::Test::HasFailure();
}

struct Findings {
  CheckResult result;
  std::vector<uint64_t> leaked;     // clusters reported as leaked
  std::vector<std::string> others;  // every other message
};

Findings Check(const std::string& path) {
  Findings f;
  CheckOptions o;
  o.on_message = [&](const std::string& m) {
    unsigned long long c = 0;
    if (std::sscanf(m.c_str(), "Leaked cluster %llu", &c) == 1) {
      f.leaked.push_back(c);
    } else {
      f.others.push_back(m);
    }
  };
  auto r = CheckImage(path, o);
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  if (r.ok()) f.result = *r;
  return f;
}

std::string Join(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& m : v) s += m + "\n";
  return s;
}

// The same workload on an O_DIRECT (pre-extended) and a buffered (never
// extended) image: while open the direct one runs ahead of its data by at
// least half a step; after a clean close both files have the same size and
// contents, and qemu-img finds both clean.
TEST(AllocExtendDevice, CleanCloseLeavesTheSizeAnImageWithoutPreExtensionHas) {
  testing::TempDir dir;
  const std::string a = dir.File("direct.qcow2");
  const std::string b = dir.File("buffered.qcow2");
  MustCreate(a);
  MustCreate(b);
  auto da = MustOpen(a, true);
  auto db = MustOpen(b, false);
  ASSERT_TRUE(da && db);
  WriteClusters(*da, 0, 200);
  WriteClusters(*db, 0, 200);
  ASSERT_TRUE(RunSync(da->Flush()).ok());
  ASSERT_TRUE(RunSync(db->Flush()).ok());
  EXPECT_GE(FileSize(a), FileSize(b) + Allocator::kExtendMinBytes / 2);
  ASSERT_TRUE(CloseImage(std::move(da)).ok());
  ASSERT_TRUE(CloseImage(std::move(db)).ok());
  EXPECT_EQ(FileSize(a), FileSize(b));
  testing::ExpectQemuCheckClean(a);
  testing::ShOk("qemu-img compare -q " + testing::ShellQuote(a) + " " + testing::ShellQuote(b));
}

// A crash (the file as a killed process leaves it, copied after a flush)
// keeps the pre-extended tail. kvblk's checker and qemu-img report no
// corruption, and no finding at all about the tail: the only findings are
// the pool's leaked clusters, all before it (qemu-img check -r leaks makes
// the image clean). A read-only open changes nothing. A writable open
// allocates new clusters inside the tail (the file does not grow), keeps
// the old data, and closes consistent.
TEST(AllocExtendDevice, CrashLeavesAFreeTailThatChecksAcceptAndAllocationReuses) {
  testing::TempDir dir;
  const std::string img = dir.File("a.qcow2");
  const std::string crash = dir.File("crash.qcow2");
  ASSERT_TRUE(MakeCrashCopy(img, crash, /*lazy=*/false));
  const uint64_t crash_size = FileSize(crash);

  Findings f = Check(crash);
  EXPECT_EQ(f.result.corruptions, 0u);
  EXPECT_EQ(f.result.check_errors, 0u);
  EXPECT_TRUE(f.others.empty()) << Join(f.others);
  EXPECT_EQ(f.result.leaks, f.leaked.size());
  const uint64_t tail_clusters = Allocator::kExtendMinBytes / 2 / kCluster;
  for (uint64_t c : f.leaked) EXPECT_LT(c, crash_size / kCluster - tail_clusters) << c;
  auto q = testing::Sh("qemu-img check " + testing::ShellQuote(crash));
  // qemu-img agrees with kvblk: leaks (exit 3) exactly when kvblk found some.
  EXPECT_EQ(q.exit_code, f.leaked.empty() ? 0 : 3) << q.output;
  EXPECT_EQ(q.output.find("ERROR"), std::string::npos) << q.output;
  const std::string repaired = dir.File("repaired.qcow2");
  std::filesystem::copy_file(crash, repaired);
  testing::Sh("qemu-img check -r leaks " + testing::ShellQuote(repaired));
  testing::ExpectQemuCheckClean(repaired);

  const std::vector<uint8_t> before = testing::ReadFileBytes(crash);
  auto ro = MustOpen(crash, true, /*ro=*/true);
  ASSERT_TRUE(ro);
  ExpectClusters(*ro, 0, 100);
  ASSERT_TRUE(CloseImage(std::move(ro)).ok());
  EXPECT_TRUE(testing::ReadFileBytes(crash) == before) << "a read-only open changed the image";

  auto dev = MustOpen(crash, true);
  ASSERT_TRUE(dev);
  WriteClusters(*dev, 100, 150);
  ExpectClusters(*dev, 0, 150);
  ASSERT_TRUE(CloseImage(std::move(dev)).ok());
  EXPECT_EQ(FileSize(crash), crash_size)
      << "new clusters were appended instead of reusing the tail";
  Findings g = Check(crash);
  EXPECT_EQ(g.result.corruptions, 0u);
  EXPECT_EQ(g.result.check_errors, 0u);
  EXPECT_TRUE(g.others.empty()) << Join(g.others);
  EXPECT_EQ(g.leaked, f.leaked) << "only the crash's pooled clusters may be leaked";
  dev = MustOpen(crash, true);
  ASSERT_TRUE(dev);
  ExpectClusters(*dev, 0, 150);
  ASSERT_TRUE(CloseImage(std::move(dev)).ok());
}

// With lazy refcounts the reopen repairs the refcounts from the tables, so
// after the crash, more allocation and a clean close qemu-img finds no
// errors and no leaks at all.
TEST(AllocExtendDevice, CrashWithLazyRefcountsEndsCleanAfterReopen) {
  testing::TempDir dir;
  const std::string img = dir.File("a.qcow2");
  const std::string crash = dir.File("crash.qcow2");
  ASSERT_TRUE(MakeCrashCopy(img, crash, /*lazy=*/true));

  auto dev = MustOpen(crash, true);
  ASSERT_TRUE(dev);
  WriteClusters(*dev, 100, 150);
  ExpectClusters(*dev, 0, 150);
  ASSERT_TRUE(CloseImage(std::move(dev)).ok());
  testing::ExpectQemuCheckClean(crash);
}

}  // namespace
}  // namespace kvblk::qcow2
