// The qcow2 checker (disk/qcow2_check.h) against qemu-img check.
//
// Damaged images are made with qemu-img/qemu-io and then patched byte by
// byte (big-endian fields, docs/interop/qcow2.rst). For each one kvblk must
// report exactly what qemu-img check reports (exit status, corruptions,
// leaks, check errors and the allocation numbers), and after kvblk's
// "repair all" qemu-img check must find the image clean. Clean images of
// every flavour must be reported clean with qemu-img's numbers.
#include "disk/qcow2_check.h"

#include <errno.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <mutex>
#include <ostream>
#include <set>
#include <string>
#include <vector>

#include "disk/qcow2_format.h"
#include "disk/refcount.h"
#include "tests/support/qemu_util.h"
#include "tests/support/test_util.h"

namespace kvblk::qcow2 {
namespace {

using testing::CommandResult;
using testing::ReadFileBytes;
using testing::Sh;
using testing::ShellQuote;
using testing::ShOk;
using testing::TempDir;

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

std::ostream& operator<<(std::ostream& os, const Counts& c) {
  return os << "{exit " << c.exit_code << ", corruptions " << c.corruptions << ", leaks " << c.leaks
            << ", check-errors " << c.check_errors << ", end " << c.image_end_offset << ", total "
            << c.total_clusters << ", allocated " << c.allocated_clusters << ", fragmented "
            << c.fragmented_clusters << ", compressed " << c.compressed_clusters
            << ", corruptions-fixed " << c.corruptions_fixed << ", leaks-fixed " << c.leaks_fixed
            << "}";
}

// The integer member `key` of qemu-img's JSON output (0 when absent: qemu
// leaves out members that are 0).
uint64_t JsonNumber(const std::string& json, const std::string& key) {
  const std::string tag = "\"" + key + "\": ";
  size_t pos = json.find(tag);
  if (pos == std::string::npos) return 0;
  return std::stoull(json.substr(pos + tag.size()));
}

Counts QemuCheck(const std::string& path, const std::string& repair = "") {
  CommandResult r =
      Sh("{ qemu-img check " + repair + " --output=json " + ShellQuote(path) + " 2>/dev/null; }");
  Counts c;
  c.exit_code = r.exit_code;
  if (r.output.find('{') == std::string::npos) return c;
  c.corruptions = JsonNumber(r.output, "corruptions");
  c.leaks = JsonNumber(r.output, "leaks");
  c.check_errors = JsonNumber(r.output, "check-errors");
  c.image_end_offset = JsonNumber(r.output, "image-end-offset");
  c.total_clusters = JsonNumber(r.output, "total-clusters");
  c.allocated_clusters = JsonNumber(r.output, "allocated-clusters");
  c.fragmented_clusters = JsonNumber(r.output, "fragmented-clusters");
  c.compressed_clusters = JsonNumber(r.output, "compressed-clusters");
  c.corruptions_fixed = JsonNumber(r.output, "corruptions-fixed");
  c.leaks_fixed = JsonNumber(r.output, "leaks-fixed");
  return c;
}

Counts ToCounts(const CheckResult& r) {
  Counts c;
  c.exit_code = r.ExitCode();
  c.corruptions = r.corruptions;
  c.leaks = r.leaks;
  c.check_errors = r.check_errors;
  c.image_end_offset = r.image_end_offset;
  c.total_clusters = r.total_clusters;
  c.allocated_clusters = r.allocated_clusters;
  c.fragmented_clusters = r.fragmented_clusters;
  c.compressed_clusters = r.compressed_clusters;
  c.corruptions_fixed = r.corruptions_fixed;
  c.leaks_fixed = r.leaks_fixed;
  return c;
}

Counts KvblkCheck(const std::string& path, RepairMode mode = RepairMode::kNone,
                  std::vector<std::string>* messages = nullptr) {
  CheckOptions opts;
  opts.repair = mode;
  if (messages) opts.on_message = [messages](const std::string& m) { messages->push_back(m); };
  Result<CheckResult> r = CheckImage(path, opts);
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  return r.ok() ? ToCounts(*r) : Counts();
}

std::string Q(const std::string& s) { return ShellQuote(s); }

// 64 MiB, 64 KiB clusters: header, refcount table (cluster 1), refcount
// block (2), L1 (3), L2 (4), data for guest 0..192K in clusters 5-7 and for
// guest 1M in cluster 8.
void MakeBase(const std::string& path, const std::string& create_opts = "") {
  ShOk("qemu-img create -f qcow2 " + create_opts + " " + Q(path) + " 64M");
  ShOk("qemu-io -c 'write -P 1 0 192k' -c 'write -P 2 1M 64k' " + Q(path));
}

// The base image plus snapshot "s1" and a new write of guest 0..64K (so
// guest clusters 1, 2 and 16 stay shared with the snapshot).
void MakeWithSnapshot(const std::string& path) {
  MakeBase(path);
  ShOk("qemu-img snapshot -c s1 " + Q(path));
  ShOk("qemu-io -c 'write -P 9 0 64k' " + Q(path));
}

constexpr uint64_t kCopied = kOflagCopied;
constexpr uint64_t kMask = kL2OffsetMask;

struct DamageCase {
  const char* name;
  std::function<void(const std::string& path)> make;
  Counts expected;         // what qemu-img check 7.2 reports (exit, corruptions, leaks, errors)
  bool data_intact;        // the guest data survives the repair unchanged
  bool repairable = true;  // kvblk -r all leaves the image clean
  bool qemu_fixes_the_same = false;  // qemu-img -r all reports the same *_fixed counts
};

void PrintTo(const DamageCase& c, std::ostream* os) { *os << c.name; }

Counts Expect(int exit_code, uint64_t corruptions, uint64_t leaks, uint64_t check_errors = 0) {
  Counts c;
  c.exit_code = exit_code;
  c.corruptions = corruptions;
  c.leaks = leaks;
  c.check_errors = check_errors;
  return c;
}

const DamageCase kDamage[] = {
    {"LeakedCluster",
     [](const std::string& p) {
       MakeBase(p);
       ASSERT_EQ(::truncate(p.c_str(), 12 * 65536), 0);
       ImagePatcher(p).SetRefcount(10, 1);
     },
     Expect(3, 0, 1), true, true, true},
    {"RefcountTooHighOnData",
     [](const std::string& p) {
       MakeBase(p);
       ImagePatcher img(p);
       img.SetRefcount(img.DataCluster(0, 0), 2);
     },
     Expect(2, 1, 1), true, true, true},
    {"RefcountTooLowOnData",
     [](const std::string& p) {
       MakeBase(p);
       ImagePatcher img(p);
       img.SetRefcount(img.DataCluster(0, 1), 0);
     },
     Expect(2, 2, 0), true},
    {"RefcountTooLowOnSharedCluster",
     [](const std::string& p) {
       MakeWithSnapshot(p);
       ImagePatcher img(p);
       img.SetRefcount(img.DataCluster(0, 1), 1);
     },
     Expect(2, 2, 0), true, true, true},
    {"CopiedFlagMissingOnData",
     [](const std::string& p) {
       MakeBase(p);
       ImagePatcher img(p);
       img.SetL2(0, 1, img.L2(0, 1) & ~kCopied);
     },
     Expect(2, 1, 0), true, true, true},
    {"CopiedFlagMissingOnL2Table",
     [](const std::string& p) {
       MakeBase(p);
       ImagePatcher img(p);
       img.SetL1(0, img.L1(0) & ~kCopied);
     },
     Expect(2, 1, 0), true, true, true},
    {"CopiedFlagSetOnSharedCluster",
     [](const std::string& p) {
       MakeWithSnapshot(p);
       ImagePatcher img(p);
       img.SetL2(0, 1, img.L2(0, 1) | kCopied);
     },
     Expect(2, 1, 0), true, true, true},
    {"L2EntryPointsIntoRefcountTable",
     [](const std::string& p) {
       MakeBase(p);
       ImagePatcher img(p);
       img.SetL2(0, 1, (img.L2(0, 1) & ~kMask) | img.rt_offset());
     },
     Expect(2, 1, 1), false},
    {"L2TableInsideRefcountTable",
     [](const std::string& p) {
       MakeBase(p);
       ImagePatcher img(p);
       img.SetL1(0, (img.L1(0) & ~kMask) | img.rt_offset());
     },
     Expect(2, 4, 5), false},
    {"DataClusterPastEndOfFile",
     [](const std::string& p) {
       MakeBase(p);
       ImagePatcher img(p);
       img.SetL2(0, 1, (img.L2(0, 1) & ~kMask) | (100u << 16));
     },
     Expect(2, 2, 1), false},
    {"L2TablePastEndOfFile",
     [](const std::string& p) {
       MakeBase(p);
       ImagePatcher img(p);
       img.SetL1(0, (img.L1(0) & ~kMask) | (100u << 16));
     },
     Expect(2, 2, 5), false},
    {"MisalignedDataCluster",
     [](const std::string& p) {
       MakeBase(p);
       ImagePatcher img(p);
       img.SetL2(0, 1, img.L2(0, 1) + 0x200);
     },
     Expect(2, 2, 0), false},
    {"MisalignedL2Table",
     [](const std::string& p) {
       MakeBase(p);
       ImagePatcher img(p);
       img.SetL1(0, img.L1(0) + 0x200);
     },
     Expect(2, 129, 3), false},
    {"L1EntryReservedBits",
     [](const std::string& p) {
       MakeBase(p);
       ImagePatcher img(p);
       img.SetL1(0, img.L1(0) | 1);
     },
     Expect(2, 1, 0), true},
    {"L2EntryReservedBits",
     [](const std::string& p) {
       MakeBase(p);
       ImagePatcher img(p);
       img.SetL2(0, 1, img.L2(0, 1) | 2);
     },
     Expect(2, 1, 0), true},
    {"CompressedClusterWithCopiedFlag",
     [](const std::string& p) {
       ShOk("qemu-img create -f qcow2 " + Q(p) + " 64M");
       ShOk("qemu-io -c 'write -c -P 1 0 64k' -c 'write -c -P 2 64k 64k' " + Q(p));
       ImagePatcher img(p);
       img.SetL2(0, 0, img.L2(0, 0) | kCopied);
     },
     Expect(2, 1, 0), true},
    {"RefcountBlockMisaligned",
     [](const std::string& p) {
       MakeBase(p);
       ImagePatcher img(p);
       img.SetRefTable(0, img.RefTable(0) + 0x200);
     },
     Expect(1, 1, 0, 9), true},
    {"RefcountBlockOutsideImage",
     [](const std::string& p) {
       MakeBase(p);
       ImagePatcher(p).SetRefTable(0, 100u << 16);
     },
     Expect(2, 14, 0), true},
    {"RefcountTableEntryReservedBits",
     [](const std::string& p) {
       MakeBase(p);
       ImagePatcher img(p);
       img.SetRefTable(0, img.RefTable(0) | 1);
     },
     Expect(2, 1, 1), true},
    {"RefcountBlockOverlapsL1Table",
     [](const std::string& p) {
       MakeBase(p);
       ImagePatcher img(p);
       img.SetRefTable(0, img.l1_offset());
     },
     Expect(2, 13, 2), true},
    {"SnapshotL1TableMisaligned",
     [](const std::string& p) {
       MakeWithSnapshot(p);
       ImagePatcher img(p);
       const uint64_t e = img.SnapshotEntry(0);
       img.SetU64(e, img.U64(e) + 0x200);
     },
     Expect(2, 1, 6), true},
    {"SnapshotL1TableTooLarge",
     [](const std::string& p) {
       MakeWithSnapshot(p);
       ImagePatcher img(p);
       img.SetU32(img.SnapshotEntry(0) + 8, 0x500000);
     },
     Expect(2, 1, 6), true},
    {"SnapshotTableEntryIncomplete",  // v3 entries need 16 bytes of extra data
     [](const std::string& p) {
       MakeWithSnapshot(p);
       ImagePatcher img(p);
       img.SetU32(img.SnapshotEntry(0) + 36, 8);
     },
     Expect(2, 1, 0), true},
    {"DirtyLazyRefcountsWithStaleRefcount",
     [](const std::string& p) {
       MakeBase(p, "-o lazy_refcounts=on");
       ImagePatcher img(p);
       img.SetIncompatibleBits(kIncompatDirty);
       img.SetRefcount(img.DataCluster(0, 1), 0);
     },
     Expect(2, 2, 0), true},
};

class DamagedImage : public ::testing::TestWithParam<DamageCase> {
 protected:
  TempDir dir_;
};

TEST_P(DamagedImage, CheckAgreesWithQemuImgAndRepairAllLeavesItClean) {
  const DamageCase& c = GetParam();
  const std::string img = dir_.File("img.qcow2");
  const std::string pristine = dir_.File("pristine.qcow2");
  c.make(img);
  ASSERT_FALSE(::testing::Test::HasFailure());
  ShOk("cp " + Q(img) + " " + Q(pristine));

  // Check: exactly qemu-img's numbers, and the ones known for qemu 7.2.
  const Counts qemu = QemuCheck(img);
  const Counts kvblk = KvblkCheck(img);
  EXPECT_EQ(kvblk, qemu);
  Counts core = kvblk;
  core.image_end_offset = core.total_clusters = core.allocated_clusters = 0;
  core.fragmented_clusters = core.compressed_clusters = 0;
  EXPECT_EQ(core, c.expected);
  EXPECT_EQ(ReadFileBytes(img), ReadFileBytes(pristine)) << "a check must not write";

  // Repair all.
  std::vector<std::string> messages;
  const Counts repaired = KvblkCheck(img, RepairMode::kAll, &messages);
  EXPECT_EQ(repaired.exit_code, 0) << repaired;
  EXPECT_GT(repaired.corruptions_fixed + repaired.leaks_fixed, 0u);
  const Counts after = QemuCheck(img);
  EXPECT_EQ(after.exit_code, 0) << after;
  EXPECT_EQ(after.corruptions + after.leaks + after.check_errors, 0u) << after;
  const Counts again = KvblkCheck(img);
  EXPECT_EQ(again, after);
  EXPECT_EQ(ImagePatcher(img).Incompatible() & (kIncompatDirty | kIncompatCorrupt), 0u);
  if (c.data_intact) {
    // The active layer still reads like the image before the damage.
    CommandResult cmp = Sh("qemu-img compare " + Q(pristine) + " " + Q(img));
    EXPECT_EQ(cmp.exit_code, 0) << cmp.output;
  }
  if (c.qemu_fixes_the_same) {
    ShOk("cp " + Q(pristine) + " " + Q(dir_.File("qemu.qcow2")));
    const Counts by_qemu = QemuCheck(dir_.File("qemu.qcow2"), "-r all");
    EXPECT_EQ(repaired.corruptions_fixed, by_qemu.corruptions_fixed);
    EXPECT_EQ(repaired.leaks_fixed, by_qemu.leaks_fixed);
  }
}

INSTANTIATE_TEST_SUITE_P(Corpus, DamagedImage, ::testing::ValuesIn(kDamage),
                         [](const ::testing::TestParamInfo<DamageCase>& info) {
                           return std::string(info.param.name);
                         });

struct CleanCase {
  const char* name;
  const char* commands;  // run with IMG (and BASE) replaced by file names
};

const CleanCase kClean[] = {
    {"Written",
     "qemu-img create -f qcow2 IMG 64M && "
     "qemu-io -c 'write -P 1 0 192k' -c 'write -z 2M 64k' -c 'write -P 2 1M 4k' IMG"},
    {"Empty", "qemu-img create -f qcow2 IMG 0"},
    {"TwoSnapshots",
     "qemu-img create -f qcow2 IMG 64M && qemu-io -c 'write -P 1 0 1M' IMG && "
     "qemu-img snapshot -c s1 IMG && qemu-io -c 'write -P 2 64k 64k' "
     "-c 'discard 512k 128k' IMG && qemu-img snapshot -c s2 IMG && "
     "qemu-io -c 'write -P 3 0 64k' IMG"},
    {"CompressedClusters",
     "qemu-img create -f qcow2 IMG 64M && qemu-io -c 'write -c -P 1 0 64k' "
     "-c 'write -c -P 2 64k 64k' -c 'write -P 3 1M 64k' IMG && "
     "qemu-img snapshot -c s IMG"},
    {"BackingFile",
     "qemu-img create -f qcow2 BASE 64M && qemu-io -c 'write -P 1 0 1M' BASE && "
     "qemu-img create -f qcow2 -b BASE -F qcow2 IMG && "
     "qemu-io -c 'write -P 5 64k 4k' IMG"},
    {"RefcountBits1",
     "qemu-img create -f qcow2 -o refcount_bits=1 IMG 64M && "
     "qemu-io -c 'write -P 1 0 1M' -c 'write -P 2 8M 64k' IMG"},
    {"RefcountBits64",
     "qemu-img create -f qcow2 -o refcount_bits=64 IMG 64M && "
     "qemu-io -c 'write -P 1 0 1M' IMG && qemu-img snapshot -c s IMG"},
    {"ClusterSize512",
     "qemu-img create -f qcow2 -o cluster_size=512 IMG 64M && "
     "qemu-io -c 'write -P 1 0 1M' -c 'write -P 2 32M 8k' IMG && "
     "qemu-img snapshot -c s IMG && qemu-io -c 'write -P 3 0 4k' IMG"},
    {"ClusterSize2M",
     "qemu-img create -f qcow2 -o cluster_size=2M IMG 64M && "
     "qemu-io -c 'write -P 1 0 3M' -c 'write -P 2 32M 8k' IMG && "
     "qemu-img snapshot -c s IMG && qemu-io -c 'write -P 3 0 4k' IMG"},
    {"Version2",
     "qemu-img create -f qcow2 -o compat=0.10 IMG 64M && "
     "qemu-io -c 'write -P 1 0 1M' IMG && qemu-img snapshot -c s IMG"},
    {"ExtendedL2",
     "qemu-img create -f qcow2 -o extended_l2=on IMG 64M && "
     "qemu-io -c 'write -P 1 0 1M' -c 'write -P 2 5M 2k' IMG"},
    {"PersistentBitmaps",
     "qemu-img create -f qcow2 IMG 64M && qemu-io -c 'write -P 1 0 1M' IMG && "
     "qemu-img bitmap --add IMG b0 && "
     "qemu-img bitmap --add --granularity 4k IMG b1"},
    {"PreallocatedMetadata",
     "qemu-img create -f qcow2 -o preallocation=metadata IMG 16M && "
     "qemu-io -c 'write -P 1 0 64k' IMG"},
    {"ZstdCompressed",
     "qemu-img create -f qcow2 -o compression_type=zstd IMG 64M && "
     "qemu-io -c 'write -c -P 1 0 64k' IMG"},
};

void PrintTo(const CleanCase& c, std::ostream* os) { *os << c.name; }

class CleanImage : public ::testing::TestWithParam<CleanCase> {
 protected:
  TempDir dir_;
};

std::string Substitute(std::string text, const std::string& from, const std::string& to) {
  for (size_t pos = 0; (pos = text.find(from, pos)) != std::string::npos; pos += to.size()) {
    text.replace(pos, from.size(), to);
  }
  return text;
}

TEST_P(CleanImage, ReportsNoErrorsWithQemuImgNumbers) {
  const std::string img = dir_.File("img.qcow2");
  std::string cmd = Substitute(GetParam().commands, "BASE", Q(dir_.File("base.qcow2")));
  ShOk(Substitute(cmd, "IMG", Q(img)));
  ASSERT_FALSE(::testing::Test::HasFailure());
  const Counts qemu = QemuCheck(img);
  EXPECT_EQ(qemu.exit_code, 0);
  EXPECT_EQ(KvblkCheck(img), qemu);
  // A repair of a clean image changes nothing.
  const std::vector<uint8_t> before = ReadFileBytes(img);
  EXPECT_EQ(KvblkCheck(img, RepairMode::kAll), qemu);
  EXPECT_EQ(ReadFileBytes(img), before);
}

INSTANTIATE_TEST_SUITE_P(Flavours, CleanImage, ::testing::ValuesIn(kClean),
                         [](const ::testing::TestParamInfo<CleanCase>& info) {
                           return std::string(info.param.name);
                         });

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
}  // namespace kvblk::qcow2
