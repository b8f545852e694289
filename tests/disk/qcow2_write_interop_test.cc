// Images created and written by kvblk, judged by qemu-img.
//
// Each case creates an image with CreateImage (cluster sizes 512..2M,
// refcount widths 1..64, compat 0.10 and 1.1, with and without a qcow2
// backing file made by qemu), applies a seeded random mix of writes
// (unaligned, cluster-crossing, overwrites), discards, write-zeroes (with and
// without unmap), flushes and verifying reads, in two sessions separated by a
// close and reopen, and mirrors every change into a raw reference. After the
// last close `qemu-img check` must find no errors and no leaks, and
// `qemu-img compare` must find the image equal to the reference.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "kvblk/block_device.h"
#include "kvblk/event_loop.h"
#include "kvblk/image_create.h"
#include "tests/support/qemu_util.h"
#include "tests/support/test_util.h"

namespace kvblk {
namespace {

using testing::ExpectQemuCheckClean;
using testing::ExpectQemuCompareEqual;
using testing::FirstDifference;
using testing::HasCompressedClusters;
using testing::PatternBytes;
using testing::ReadFileBytes;
using testing::ReadRange;
using testing::ReadWholeDevice;
using testing::ShellQuote;
using testing::ShOk;
using testing::TempDir;
using testing::WriteFileBytes;

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * 1024;

struct WriteCase {
  std::string name;
  uint32_t cluster_size;
  int refcount_bits;
  bool v3;
  bool backing;        // a qcow2 backing file made and filled by qemu
  uint64_t size;       // virtual size of the kvblk image
  bool compressed;     // also issue WriteCompressed on unallocated clusters
  uint32_t seed;
  bool grows_reftable = false;  // the workload must outgrow the refcount table
};

std::string CaseName(const ::testing::TestParamInfo<WriteCase>& info) { return info.param.name; }

// Bytes that compress well: runs of one random value, 1..64 bytes long.
std::vector<uint8_t> CompressibleBytes(size_t len, std::mt19937_64& rng) {
  std::vector<uint8_t> v(len);
  size_t i = 0;
  while (i < len) {
    size_t run = std::min<size_t>(len - i, 1 + rng() % 64);
    std::fill(v.begin() + static_cast<std::ptrdiff_t>(i),
              v.begin() + static_cast<std::ptrdiff_t>(i + run), static_cast<uint8_t>(rng()));
    i += run;
  }
  return v;
}

// Drives one image and its reference through random operations.
class Workload {
 public:
  Workload(const WriteCase& c, std::vector<uint8_t>* ref)
      : c_(c), ref_(ref), rng_(c.seed) {}

  // Runs `ops` random operations on `dev`. Stops at the first failure.
  void Run(BlockDevice& dev, int ops) {
    for (int i = 0; i < ops && !::testing::Test::HasFailure(); ++i) {
      const int pick = static_cast<int>(rng_() % 100);
      if (pick < 45) {
        Write(dev);
      } else if (pick < 55) {
        Discard(dev);
      } else if (pick < 70) {
        Zeroes(dev);
      } else if (pick < 75) {
        Status st = RunSync(dev.Flush());
        ASSERT_TRUE(st.ok()) << st.ToString();
      } else if (pick < 90 || !c_.compressed) {
        Verify(dev);
      } else {
        Compressed(dev);
      }
    }
  }

  // Writes compressed clusters at the start of every 4th cluster of the
  // disk that is still unallocated (a fresh image: all of them).
  void CompressedSweep(BlockDevice& dev) {
    const uint64_t cs = c_.cluster_size;
    for (uint64_t off = 0; off < c_.size; off += 4 * cs) {
      const size_t len = static_cast<size_t>(std::min<uint64_t>(cs, c_.size - off));
      std::vector<uint8_t> data = CompressibleBytes(len, rng_);
      Status st = RunSync(dev.WriteCompressed(off, data.data(), len));
      ASSERT_TRUE(st.ok()) << "compressed write at " << off << ": " << st.ToString();
      Apply(off, data);
    }
  }

 private:
  // A random range: mostly small and unaligned, sometimes cluster-sized or
  // cluster-aligned, sometimes large.
  std::pair<uint64_t, uint64_t> Range() {
    const uint64_t cs = c_.cluster_size;
    uint64_t len;
    switch (rng_() % 5) {
      case 0: len = 1 + rng_() % 600; break;
      case 1: len = 1 + rng_() % (3 * cs); break;
      case 2: len = cs * (1 + rng_() % 4); break;
      case 3: len = 1 + rng_() % (256 * kKiB); break;
      default: len = 1 + rng_() % kMiB; break;
    }
    uint64_t off = rng_() % c_.size;
    if (rng_() % 3 == 0) off -= off % cs;  // cluster aligned
    len = std::min(len, c_.size - off);
    return {off, len};
  }

  void Apply(uint64_t off, const std::vector<uint8_t>& data) {
    std::copy(data.begin(), data.end(), ref_->begin() + static_cast<std::ptrdiff_t>(off));
  }

  void Write(BlockDevice& dev) {
    auto [off, len] = Range();
    std::vector<uint8_t> data = PatternBytes(static_cast<size_t>(len), static_cast<uint32_t>(rng_()));
    Status st = RunSync(dev.Write(off, data.data(), data.size()));
    ASSERT_TRUE(st.ok()) << "write " << off << "+" << len << ": " << st.ToString();
    Apply(off, data);
  }

  void Zeroes(BlockDevice& dev) {
    auto [off, len] = Range();
    const bool unmap = rng_() % 2 == 0;
    Status st = RunSync(dev.WriteZeroes(off, len, unmap));
    ASSERT_TRUE(st.ok()) << "write zeroes " << off << "+" << len << ": " << st.ToString();
    Apply(off, std::vector<uint8_t>(static_cast<size_t>(len), 0));
  }

  // A discard may leave old data or zeros: whatever kvblk now returns must be
  // one of the two for every byte, and becomes the reference.
  void Discard(BlockDevice& dev) {
    auto [off, len] = Range();
    Status st = RunSync(dev.Discard(off, len));
    ASSERT_TRUE(st.ok()) << "discard " << off << "+" << len << ": " << st.ToString();
    auto got = ReadRange(dev, off, static_cast<size_t>(len));
    ASSERT_TRUE(got.ok()) << got.status().ToString();
    for (uint64_t i = 0; i < len; ++i) {
      uint8_t b = (*got)[i];
      uint8_t old = (*ref_)[off + i];
      ASSERT_TRUE(b == old || b == 0) << "after discard " << off << "+" << len << ": byte at "
                                      << off + i << " is " << int{b} << ", neither the old "
                                      << int{old} << " nor zero";
    }
    Apply(off, *got);
  }

  void Verify(BlockDevice& dev) {
    auto [off, len] = Range();
    auto got = ReadRange(dev, off, static_cast<size_t>(len));
    ASSERT_TRUE(got.ok()) << got.status().ToString();
    std::vector<uint8_t> want(ref_->begin() + static_cast<std::ptrdiff_t>(off),
                              ref_->begin() + static_cast<std::ptrdiff_t>(off + len));
    int64_t d = FirstDifference(*got, want);
    ASSERT_EQ(d, -1) << "read " << off << "+" << len << " differs at " << off + d;
  }

  // A compressed write of a whole cluster that the image does not map yet;
  // skipped when the chosen cluster is allocated.
  void Compressed(BlockDevice& dev) {
    const uint64_t cs = c_.cluster_size;
    const uint64_t off = (rng_() % c_.size) / cs * cs;
    auto bs = RunSync(dev.GetBlockStatus(off, cs));
    ASSERT_TRUE(bs.ok()) << bs.status().ToString();
    if (bs->depth == 0 && bs->data) return;  // allocated in this image
    const size_t len = static_cast<size_t>(std::min<uint64_t>(cs, c_.size - off));
    std::vector<uint8_t> data = CompressibleBytes(len, rng_);
    Status st = RunSync(dev.WriteCompressed(off, data.data(), len));
    ASSERT_TRUE(st.ok()) << "compressed write at " << off << ": " << st.ToString();
    Apply(off, data);
  }

  const WriteCase& c_;
  std::vector<uint8_t>* ref_;
  std::mt19937_64 rng_;
};

class KvblkWrittenImages : public ::testing::TestWithParam<WriteCase> {};

TEST_P(KvblkWrittenImages, PassQemuCheckAndCompareAfterRandomWorkload) {
  const WriteCase& c = GetParam();
  TempDir dir;
  const std::string img = dir.File("img.qcow2");
  const std::string ref_path = dir.File("ref.raw");

  CreateOptions co;
  co.size = c.size;
  co.cluster_size = c.cluster_size;
  co.refcount_bits = c.refcount_bits;
  co.compat_v3 = c.v3;
  if (c.backing) {
    // A qemu-made backing file with a different cluster size, smaller than
    // the image, filled with data, zero clusters and unaligned writes.
    const std::string base = dir.File("base.qcow2");
    WriteFileBytes(dir.File("pat"), PatternBytes(5003, c.seed));
    ShOk("qemu-img create -f qcow2 -o cluster_size=16384 " + ShellQuote(base) + " " +
         std::to_string(c.size - 1 * kMiB));
    ShOk("cd " + ShellQuote(dir.path()) +
         " && qemu-io -f qcow2 -c 'write -s pat 0 1M' -c 'write -s pat 1500000 700001' "
         "-c 'write -z 65536 32768' -c 'write -s pat 2999999 12345' base.qcow2");
    co.backing_file = "base.qcow2";  // relative to the image's directory
    co.backing_format = "qcow2";
  }
  Status st = CreateImage(img, co);
  ASSERT_TRUE(st.ok()) << st.ToString();
  ShOk("qemu-img convert -O raw " + ShellQuote(img) + " " + ShellQuote(ref_path));
  std::vector<uint8_t> ref = ReadFileBytes(ref_path);
  ASSERT_EQ(ref.size(), c.size);

  Workload w(c, &ref);
  OpenOptions o;
  o.format = "qcow2";
  if (c.compressed) {
    // A session of compressed writes only, then random work over them.
    auto dev = OpenImage(img, o);
    ASSERT_TRUE(dev.ok()) << dev.status().ToString();
    w.CompressedSweep(**dev);
    st = CloseImage(std::move(*dev));
    ASSERT_TRUE(st.ok()) << st.ToString();
    ASSERT_FALSE(HasFailure());
    ExpectQemuCheckClean(img);
    EXPECT_TRUE(HasCompressedClusters(img)) << "no compressed cluster in the image";
  }
  for (int session = 0; session < 2 && !HasFailure(); ++session) {
    auto dev = OpenImage(img, o);
    ASSERT_TRUE(dev.ok()) << dev.status().ToString();
    w.Run(**dev, 250);
    st = CloseImage(std::move(*dev));
    ASSERT_TRUE(st.ok()) << st.ToString();
    if (HasFailure()) break;
    ExpectQemuCheckClean(img);
  }
  if (c.grows_reftable) {
    // The refcount table no longer sits where CreateImage put it.
    std::vector<uint8_t> bytes = ReadFileBytes(img);
    ASSERT_GE(bytes.size(), 64u);
    uint64_t reftable = 0;
    for (int i = 48; i < 56; ++i) reftable = (reftable << 8) | bytes[i];
    EXPECT_NE(reftable, c.cluster_size) << "the refcount table never grew";
  }
  ASSERT_FALSE(HasFailure());

  WriteFileBytes(ref_path, ref);
  ExpectQemuCompareEqual(img, ref_path);

  // kvblk reads back its own image in full as well.
  OpenOptions ro;
  ro.read_only = true;
  auto dev = OpenImage(img, ro);
  ASSERT_TRUE(dev.ok()) << dev.status().ToString();
  auto all = ReadWholeDevice(**dev, 1 << 20);
  ASSERT_TRUE(all.ok()) << all.status().ToString();
  EXPECT_EQ(FirstDifference(*all, ref), -1);
  st = CloseImage(std::move(*dev));
  EXPECT_TRUE(st.ok()) << st.ToString();
}

INSTANTIATE_TEST_SUITE_P(
    Interop, KvblkWrittenImages,
    ::testing::Values(
        WriteCase{"v3_cluster512_refbits16", 512, 16, true, false, 4 * kMiB, false, 11},
        WriteCase{"v3_cluster512_refbits64_growsRefcountTable", 512, 64, true, false, 6 * kMiB,
                  false, 12, true},
        WriteCase{"v2_cluster512_backing", 512, 16, false, true, 4 * kMiB, false, 13},
        WriteCase{"v3_cluster4k_refbits1", 4096, 1, true, false, 8 * kMiB, false, 21},
        WriteCase{"v3_cluster4k_refbits64_backing", 4096, 64, true, true, 6 * kMiB, false, 22},
        WriteCase{"v2_cluster4k_oddSize_compressed", 4096, 16, false, false, 5 * kMiB + 1536,
                  true, 23},
        WriteCase{"v3_cluster64k_refbits16", 65536, 16, true, false, 8 * kMiB, false, 31},
        WriteCase{"v3_cluster64k_backing", 65536, 16, true, true, 8 * kMiB, false, 32},
        WriteCase{"v2_cluster64k_backing", 65536, 16, false, true, 8 * kMiB, false, 33},
        WriteCase{"v3_cluster2M_refbits64", 2 * kMiB, 64, true, false, 10 * kMiB, false, 41},
        WriteCase{"v2_cluster2M", 2 * kMiB, 16, false, false, 8 * kMiB, false, 42},
        WriteCase{"v3_cluster4k_compressed", 4096, 16, true, false, 6 * kMiB, true, 51},
        WriteCase{"v3_cluster64k_compressed_backing", 65536, 16, true, true, 8 * kMiB, true,
                  52}),
    CaseName);

// --- kvblk writing into images qemu made --------------------------------------

struct QemuStart {
  std::string name;
  std::string create_opts;  // -o for qemu-img create
  uint32_t cluster_size;
  std::vector<std::string> qemu_io;  // fills the image first
  bool snapshot;        // take an internal snapshot after filling
  bool compress;        // then `qemu-img convert -c` the image
  uint32_t seed;
};

std::string QemuStartName(const ::testing::TestParamInfo<QemuStart>& info) {
  return info.param.name;
}

class KvblkWritesQemuImages : public ::testing::TestWithParam<QemuStart> {};

// Shared clusters (a snapshot: refcount 2, COPIED clear, L2 tables copied on
// write), compressed clusters, zero clusters and qemu's own allocation
// layout, all overwritten, discarded and zeroed by kvblk. A snapshot must
// still read what it held when it was taken.
TEST_P(KvblkWritesQemuImages, KeepImageConsistentAndSnapshotsIntact) {
  const QemuStart& q = GetParam();
  constexpr uint64_t kSize = 6 * kMiB;
  TempDir dir;
  const std::string img = dir.File("img.qcow2");
  const std::string ref_path = dir.File("ref.raw");
  const std::string snap_raw = dir.File("snap.raw");
  WriteFileBytes(dir.File("pat"), PatternBytes(7001, q.seed));
  const std::string made = q.compress ? dir.File("plain.qcow2") : img;
  ShOk("qemu-img create -f qcow2 -o " + q.create_opts + " " + ShellQuote(made) + " " +
       std::to_string(kSize));
  std::string io = "cd " + ShellQuote(dir.path()) + " && qemu-io -f qcow2";
  for (const std::string& c : q.qemu_io) io += " -c " + ShellQuote(c);
  ShOk(io + " " + ShellQuote(made));
  if (q.compress) {
    ShOk("qemu-img convert -c -O qcow2 -o " + q.create_opts + " " + ShellQuote(made) + " " +
         ShellQuote(img));
    ASSERT_TRUE(HasCompressedClusters(img));
  }
  if (q.snapshot) {
    ShOk("qemu-img snapshot -c before " + ShellQuote(img));
    ShOk("qemu-img convert -O raw " + ShellQuote(img) + " " + ShellQuote(snap_raw));
  }
  ShOk("qemu-img convert -O raw " + ShellQuote(img) + " " + ShellQuote(ref_path));
  std::vector<uint8_t> ref = ReadFileBytes(ref_path);
  ASSERT_EQ(ref.size(), kSize);

  WriteCase c{q.name, q.cluster_size, 16, true, false, kSize, true, q.seed};
  Workload w(c, &ref);
  for (int session = 0; session < 2 && !HasFailure(); ++session) {
    OpenOptions o;
    o.format = "qcow2";
    auto dev = OpenImage(img, o);
    ASSERT_TRUE(dev.ok()) << dev.status().ToString();
    w.Run(**dev, 200);
    Status st = CloseImage(std::move(*dev));
    ASSERT_TRUE(st.ok()) << st.ToString();
    if (HasFailure()) break;
    ExpectQemuCheckClean(img);
  }
  ASSERT_FALSE(HasFailure());
  WriteFileBytes(ref_path, ref);
  ExpectQemuCompareEqual(img, ref_path);
  if (q.snapshot) {
    // The snapshot still holds the data it was taken with.
    const std::string now = dir.File("snap-now.raw");
    ShOk("qemu-img convert -O raw -l snapshot.name=before " + ShellQuote(img) + " " +
         ShellQuote(now));
    EXPECT_EQ(FirstDifference(ReadFileBytes(now), ReadFileBytes(snap_raw)), -1)
        << "kvblk's writes changed the snapshot";
  }
}

INSTANTIATE_TEST_SUITE_P(
    Interop, KvblkWritesQemuImages,
    ::testing::Values(
        QemuStart{"snapshot_cluster4k", "cluster_size=4096", 4096,
                  {"write -s pat 0 3M", "write -z 1M 64k", "write -s pat 5M 300000"}, true, false,
                  61},
        QemuStart{"snapshot_cluster512_refbits64", "cluster_size=512,refcount_bits=64", 512,
                  {"write -s pat 0 1M", "write -s pat 2M 1000000"}, true, false, 62},
        QemuStart{"snapshot_v2_cluster64k", "compat=0.10,cluster_size=65536", 65536,
                  {"write -s pat 0 4M", "discard 1M 128k"}, true, false, 63},
        QemuStart{"compressed_zlib_cluster4k", "cluster_size=4096", 4096,
                  {"write -P 0x11 0 2M", "write -s pat 2M 1M", "write -P 0x22 4M 2M"}, false, true,
                  64},
        QemuStart{"compressed_zstd_cluster64k_snapshot",
                  "cluster_size=65536,compression_type=zstd", 65536,
                  {"write -P 0x33 0 3M", "write -s pat 3M 1M"}, true, true, 65},
        QemuStart{"zero_and_discarded_cluster64k", "cluster_size=65536", 65536,
                  {"write -s pat 0 6M", "write -z 1M 1M", "write -z -u 3M 512k",
                   "discard 4M 1M"},
                  false, false, 66}),
    QemuStartName);

}  // namespace
}  // namespace kvblk
