// The qcow2 checker's repairs (disk/qcow2_check.h) judged by qemu-img
// check: repair of leaks, of refcount overflow, the refcount rebuild,
// dropping an unusable snapshot, clearing the corrupt and dirty bits,
// progress reports, refusals; and crash safety of the repair: every write is
// recorded, then images are rebuilt as a crash could have left them, and
// must be no worse than the damaged original. The corpus of damaged and
// clean images is in qcow2_check_test.cc.
#include <errno.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "disk/qcow2_check.h"
#include "disk/qcow2_format.h"
#include "tests/support/qcow2_check_util.h"
#include "tests/support/qemu_util.h"
#include "tests/support/test_util.h"

namespace kvblk::qcow2::check_test {
namespace {

using testing::CommandResult;
using testing::ReadFileBytes;
using testing::ShOk;
using testing::TempDir;

class Qcow2Check : public ::testing::Test {
 protected:
  TempDir dir_;
  std::string img_ = dir_.File("img.qcow2");
};

TEST_F(Qcow2Check, ReportsLeaksInQemuWordsAndRepairsThemWithRepairLeaks) {
  MakeBase(img_);
  ASSERT_EQ(::truncate(img_.c_str(), 12 * 65536), 0);
  ImagePatcher(img_).SetRefcount(10, 1);
  std::vector<std::string> messages;
  KvblkCheck(img_, RepairMode::kNone, &messages);
  EXPECT_EQ(messages, std::vector<std::string>{"Leaked cluster 10 refcount=1 reference=0"});

  messages.clear();
  const Counts fixed = KvblkCheck(img_, RepairMode::kLeaks, &messages);
  EXPECT_EQ(fixed.leaks_fixed, 1u);
  EXPECT_EQ(fixed.exit_code, 0);
  EXPECT_EQ(messages.front(), "Repairing cluster 10 refcount=1 reference=0");
  EXPECT_EQ(ImagePatcher(img_).Refcount(10), 0u);
  testing::ExpectQemuCheckClean(img_);
}

TEST_F(Qcow2Check, RepairLeaksRefusesWhenTheRefcountStructureNeedsARebuild) {
  MakeBase(img_);
  ImagePatcher img(img_);
  img.SetRefcount(img.DataCluster(0, 1), 0);
  const std::vector<uint8_t> before = ReadFileBytes(img_);
  CheckOptions opts;
  opts.repair = RepairMode::kLeaks;
  Result<CheckResult> r = CheckImage(img_, opts);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kCorruption);
  EXPECT_NE(r.status().message().find("must be rebuilt"), std::string::npos);
  EXPECT_EQ(ReadFileBytes(img_), before);
}

TEST_F(Qcow2Check, ReportsRefcountOverflowLikeQemuAndLeavesItUnrepaired) {
  // Two L2 entries share one cluster, but 1-bit refcounts cannot count 2.
  MakeBase(img_, "-o refcount_bits=1");
  ImagePatcher img(img_);
  const uint64_t e = img.L2(0, 1) & ~kCopied;
  img.SetL2(0, 1, e);
  img.SetL2(0, 2, e);
  const Counts qemu = QemuCheck(img_);
  EXPECT_EQ(KvblkCheck(img_), qemu);
  EXPECT_EQ(qemu.corruptions, 3u);  // the overflow and two COPIED flags
  EXPECT_EQ(qemu.leaks, 1u);
  const Counts repaired = KvblkCheck(img_, RepairMode::kAll);
  EXPECT_EQ(repaired.leaks_fixed, 1u);
  EXPECT_EQ(repaired.corruptions, 3u);
  EXPECT_EQ(QemuCheck(img_).corruptions, 3u);
  // A second repair finds nothing more to do and reports the same.
  const Counts again = KvblkCheck(img_, RepairMode::kAll);
  EXPECT_EQ(again.corruptions, 3u);
  EXPECT_EQ(again.leaks_fixed + again.corruptions_fixed, 0u);
  // Neither entry may claim the cluster for itself.
  EXPECT_EQ(ImagePatcher(img_).L2(0, 1) & kCopied, 0u);
  EXPECT_EQ(ImagePatcher(img_).L2(0, 2) & kCopied, 0u);
}

TEST_F(Qcow2Check, RebuildPutsTheNewRefcountStructureAtTheEndOfTheFile) {
  MakeBase(img_);
  ImagePatcher(img_).SetRefTable(0, 100u << 16);  // refcount block outside the image
  const uint64_t old_size = ReadFileBytes(img_).size();
  std::vector<std::string> messages;
  KvblkCheck(img_, RepairMode::kAll, &messages);
  EXPECT_NE(std::find(messages.begin(), messages.end(), "Rebuilding refcount structure"),
            messages.end());
  ImagePatcher img(img_);
  EXPECT_GE(img.rt_offset(), old_size);
  EXPECT_GE(img.RefTable(0) & kReftOffsetMask, old_size);
  testing::ExpectQemuCheckClean(img_);
}

TEST_F(Qcow2Check, RepairAllRemovesSnapshotWithUnusableL1Table) {
  MakeWithSnapshot(img_);
  {
    ImagePatcher img(img_);
    const uint64_t e = img.SnapshotEntry(0);
    img.SetU64(e, img.U64(e) + 0x200);
  }
  KvblkCheck(img_, RepairMode::kAll);
  testing::ExpectQemuCheckClean(img_);
  CommandResult list = ShOk("qemu-img snapshot -l " + Q(img_));
  EXPECT_EQ(list.output.find("s1"), std::string::npos) << list.output;
}

TEST_F(Qcow2Check, RepairAllClearsTheCorruptBitOfAConsistentImage) {
  MakeBase(img_);
  ImagePatcher(img_).SetIncompatibleBits(kIncompatCorrupt);
  const Counts r = KvblkCheck(img_, RepairMode::kAll);
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_EQ(ImagePatcher(img_).Incompatible() & kIncompatCorrupt, 0u);
}

TEST_F(Qcow2Check, RepairRefcountsIfDirtyRepairsADirtyImageAndClearsTheBit) {
  MakeBase(img_, "-o lazy_refcounts=on");
  {
    ImagePatcher img(img_);
    img.SetIncompatibleBits(kIncompatDirty);
    img.SetRefcount(img.DataCluster(0, 1), 0);
  }
  ASSERT_TRUE(RepairRefcountsIfDirty(img_).ok());
  EXPECT_EQ(ImagePatcher(img_).Incompatible() & kIncompatDirty, 0u);
  testing::ExpectQemuCheckClean(img_);
}

TEST_F(Qcow2Check, RepairRefcountsIfDirtyLeavesACleanImageUntouched) {
  MakeBase(img_);
  ImagePatcher(img_).SetRefcount(9, 0);  // nothing to do: not dirty
  const std::vector<uint8_t> before = ReadFileBytes(img_);
  ASSERT_TRUE(RepairRefcountsIfDirty(img_).ok());
  EXPECT_EQ(ReadFileBytes(img_), before);
}

TEST_F(Qcow2Check, ReportsProgressUpToTheTotal) {
  MakeWithSnapshot(img_);
  uint64_t last_done = 0, last_total = 0, calls = 0;
  CheckOptions opts;
  opts.on_progress = [&](uint64_t done, uint64_t total) {
    EXPECT_GE(done, last_done);
    last_done = done;
    last_total = total;
    ++calls;
  };
  ASSERT_TRUE(CheckImage(img_, opts).ok());
  EXPECT_GT(calls, 0u);
  EXPECT_EQ(last_done, last_total);
}

// ---------------------------------------------------------------------------
// Crash safety of the repair: every write is recorded, then images are
// rebuilt as a crash could have left them, and must be no worse than the
// damaged original.

struct WriteRecord {
  uint64_t offset = 0;
  std::vector<uint8_t> data;
  bool sync = false;
};

class RecordingFile : public SyncFile {
 public:
  static Result<std::unique_ptr<SyncFile>> Open(const std::string& path, bool writable,
                                                std::vector<WriteRecord>* log) {
    int fd = ::open(path.c_str(), writable ? O_RDWR : O_RDONLY);
    if (fd < 0) return Status::FromErrno(errno, path);
    return std::unique_ptr<SyncFile>(new RecordingFile(fd, path, writable, log));
  }
  Status WriteAt(const void* buf, size_t len, uint64_t offset) override {
    const auto* p = static_cast<const uint8_t*>(buf);
    {
      std::lock_guard<std::mutex> lock(mu_);
      log_->push_back(WriteRecord{offset, std::vector<uint8_t>(p, p + len), false});
    }
    return SyncFile::WriteAt(buf, len, offset);
  }
  Status Sync() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      log_->push_back(WriteRecord{0, {}, true});
    }
    return SyncFile::Sync();
  }

 private:
  RecordingFile(int fd, const std::string& path, bool writable, std::vector<WriteRecord>* log)
      : SyncFile(fd, path, writable), log_(log) {}
  std::mutex mu_;
  std::vector<WriteRecord>* log_;
};

// What makes an image dangerous to write to: clusters whose refcount is
// below their references, and entries that claim a shared cluster with
// COPIED ("cluster:N", "copied:ENTRY").
std::set<std::string> Dangers(const std::string& path) {
  std::set<std::string> out;
  CheckOptions opts;
  opts.on_message = [&](const std::string& m) {
    unsigned long long a = 0, b = 0, c = 0;
    if (std::sscanf(m.c_str(), "ERROR cluster %llu refcount=%llu reference=%llu", &a, &b, &c) ==
        3) {
      out.insert("cluster:" + std::to_string(a));
    } else if (std::sscanf(m.c_str(),
                           "ERROR OFLAG_COPIED data cluster: l2_entry=%llx refcount=%llu", &a,
                           &b) == 2 ||
               std::sscanf(m.c_str(),
                           "ERROR OFLAG_COPIED L2 cluster: l1_index=%llu l1_entry=%llx "
                           "refcount=%llu",
                           &c, &a, &b) == 3) {
      if ((a & kCopied) && b > 1) out.insert("copied:" + std::to_string(a));
    }
  };
  Result<CheckResult> r = CheckImage(path, opts);
  EXPECT_TRUE(r.ok()) << path << ": " << r.status().ToString();
  return out;
}

void ApplyWrites(const std::string& path, const std::vector<const WriteRecord*>& writes) {
  int fd = ::open(path.c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  for (const WriteRecord* w : writes) {
    ASSERT_EQ(::pwrite(fd, w->data.data(), w->data.size(), static_cast<off_t>(w->offset)),
              static_cast<ssize_t>(w->data.size()));
  }
  ::close(fd);
}

void ExpectRepairIsCrashSafe(const std::string& damaged, const TempDir& dir) {
  const std::string work = dir.File("work.qcow2");
  const std::string crash = dir.File("crash.qcow2");
  ShOk("cp " + Q(damaged) + " " + Q(work));
  std::vector<WriteRecord> log;
  CheckOptions opts;
  opts.repair = RepairMode::kAll;
  opts.open_file = [&](const std::string& path, bool writable) {
    return RecordingFile::Open(path, writable, &log);
  };
  Result<CheckResult> r = CheckImage(work, opts);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  ASSERT_EQ(r->ExitCode(), 0);
  const std::set<std::string> before = Dangers(damaged);

  std::vector<const WriteRecord*> writes;  // in order, syncs included
  for (const WriteRecord& w : log) writes.push_back(&w);
  size_t synced = 0;  // writes before the last sync seen so far
  for (size_t k = 0; k < writes.size(); ++k) {
    if (writes[k]->sync) {
      synced = k;
      continue;
    }
    // A crash right after write k: (a) everything so far reached the disk;
    // (b) only what was synced, plus write k itself.
    std::vector<const WriteRecord*> all, latest;
    for (size_t i = 0; i <= k; ++i) {
      if (writes[i]->sync) continue;
      all.push_back(writes[i]);
      if (i < synced || i == k) latest.push_back(writes[i]);
    }
    for (const auto* variant : {&all, &latest}) {
      ShOk("cp " + Q(damaged) + " " + Q(crash));
      ApplyWrites(crash, *variant);
      const std::set<std::string> now = Dangers(crash);
      for (const std::string& d : now) {
        EXPECT_TRUE(before.count(d))
            << "crash after write " << k << " of " << writes.size() << " introduced " << d;
      }
    }
    // The repair can be restarted from the crashed state.
    ShOk("cp " + Q(damaged) + " " + Q(crash));
    ApplyWrites(crash, all);
    EXPECT_EQ(KvblkCheck(crash, RepairMode::kAll).exit_code, 0) << "after write " << k;
    testing::ExpectQemuCheckClean(crash);
  }
}

TEST_F(Qcow2Check, InPlaceRepairNeverMakesTheImageWorseOnACrash) {
  MakeWithSnapshot(img_);
  ASSERT_EQ(::truncate(img_.c_str(), (ReadFileBytes(img_).size() / 65536 + 2) * 65536), 0);
  {
    ImagePatcher img(img_);
    const uint64_t last = ReadFileBytes(img_).size() / 65536 - 1;
    img.SetRefcount(img.DataCluster(0, 1), 1);  // too low (shared)
    img.SetRefcount(last, 1);                   // leaked
    img.SetL2(0, 3, kCopied | (100u << 16));    // past the end of the file
    img.SetL2(0, 0, img.L2(0, 0) & ~kCopied);   // COPIED missing...
    img.SetRefcount(img.DataCluster(0, 0), 2);  // ...and refcount too high
    img.SetL2(0, 16, img.L2(0, 16) | 2);        // reserved bit
  }
  ExpectRepairIsCrashSafe(img_, dir_);
}

TEST_F(Qcow2Check, RebuildingRepairNeverMakesTheImageWorseOnACrash) {
  MakeWithSnapshot(img_);
  {
    ImagePatcher img(img_);
    img.SetRefTable(0, img.RefTable(0) | 1);  // refcount structure broken
    const uint64_t e = img.SnapshotEntry(0);
    img.SetU64(e, img.U64(e) + 0x200);         // snapshot to drop
    img.SetL2(0, 2, img.L2(0, 2) | 4);         // reserved bit
    img.SetL2(0, 0, img.L2(0, 0) & ~kCopied);  // COPIED missing
  }
  ExpectRepairIsCrashSafe(img_, dir_);
}

TEST_F(Qcow2Check, RefusesAFileThatIsNotQcow2) {
  ShOk("qemu-img create -f raw " + Q(img_) + " 1M");
  Result<CheckResult> r = CheckImage(img_, CheckOptions());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("not a qcow2 image"), std::string::npos);
}

TEST_F(Qcow2Check, RefusesAMissingFile) {
  Result<CheckResult> r = CheckImage(dir_.File("missing.qcow2"), CheckOptions());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kNotFound);
}

}  // namespace
}  // namespace kvblk::qcow2::check_test
