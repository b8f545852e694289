// The qcow2 checker (disk/qcow2_check.h) against qemu-img check.
//
// Damaged images are made with qemu-img/qemu-io and then patched byte by
// byte (big-endian fields, docs/interop/qcow2.rst). For each one kvblk must
// report exactly what qemu-img check reports (exit status, corruptions,
// leaks, check errors and the allocation numbers), and after kvblk's
// "repair all" qemu-img check must find the image clean. Clean images of
// every flavour must be reported clean with qemu-img's numbers.
// Repairs, their crash safety and refusals: qcow2_check_repair_test.cc; the
// image patcher and the numbers: tests/support/qcow2_check_util.h.
#include "disk/qcow2_check.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdint>
#include <functional>
#include <ostream>
#include <string>
#include <vector>

#include "disk/qcow2_format.h"
#include "tests/support/qcow2_check_util.h"
#include "tests/support/qemu_util.h"
#include "tests/support/test_util.h"

namespace kvblk::qcow2::check_test {
namespace {

using testing::CommandResult;
using testing::ReadFileBytes;
using testing::Sh;
using testing::ShOk;
using testing::TempDir;

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

}  // namespace
}  // namespace kvblk::qcow2::check_test
