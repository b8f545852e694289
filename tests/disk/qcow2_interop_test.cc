// Images made by qemu-img and filled by qemu-io read back through kvblk
// byte-identical to `qemu-img convert -O raw` of the same image.
//
// Covers compat 0.10 and 1.1, every cluster size class, refcount widths,
// zero clusters, discards, unaligned writes across clusters, compressed
// clusters (zlib and zstd, whole images and single clusters), backing chains
// qcow2 -> qcow2 -> raw, and internal snapshots.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "kvblk/block_device.h"
#include "kvblk/event_loop.h"
#include "tests/support/qemu_util.h"
#include "tests/support/test_util.h"

namespace kvblk {
namespace {

using testing::CommandResult;
using testing::FirstDifference;
using testing::HasCompressedClusters;
using testing::PatternBytes;
using testing::ReadFileBytes;
using testing::ReadWholeDevice;
using testing::Sh;
using testing::ShellQuote;
using testing::ShOk;
using testing::TempDir;
using testing::WriteFileBytes;

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * 1024;

// Runs qemu-io on `image` (format `fmt`) with one -c per command, from `dir`
// so that pattern files can be named relatively. Any failed command fails
// the test.
void QemuIo(const std::string& dir, const std::string& image, const std::vector<std::string>& cmds,
            const std::string& fmt = "qcow2") {
  std::string cmd = "cd " + ShellQuote(dir) + " && qemu-io -f " + fmt;
  for (const std::string& c : cmds) cmd += " -c " + ShellQuote(c);
  cmd += " " + ShellQuote(image);
  CommandResult r = ShOk(cmd);
  EXPECT_EQ(r.output.find("failed"), std::string::npos) << cmd << "\n" << r.output;
  EXPECT_EQ(r.output.find("rror"), std::string::npos) << cmd << "\n" << r.output;
}

// Writes pattern files p1..p3 into `dir`: pseudo-random bytes with odd
// lengths, so qemu-io's repetition of them never lines up with a cluster and
// every cluster of a long write holds different bytes.
void MakePatternFiles(const TempDir& dir) {
  WriteFileBytes(dir.File("p1"), PatternBytes(4099, 1));
  WriteFileBytes(dir.File("p2"), PatternBytes(12289, 2));
  WriteFileBytes(dir.File("p3"), PatternBytes(777, 3));
}

std::string N(uint64_t v) { return std::to_string(v); }

// Reads `image` through kvblk (read-only, whole disk, two different chunk
// sizes) and compares it with `qemu-img convert -O raw` of the same image.
void ExpectKvblkReadsWhatQemuConverts(const TempDir& dir, const std::string& image) {
  const std::string raw = dir.File("converted.raw");
  ShOk("qemu-img convert -O raw " + ShellQuote(image) + " " + ShellQuote(raw));
  const std::vector<uint8_t> want = ReadFileBytes(raw);

  OpenOptions o;
  o.read_only = true;
  auto dev = OpenImage(image, o);
  ASSERT_TRUE(dev.ok()) << dev.status().ToString();
  ASSERT_EQ((*dev)->size(), want.size());
  for (size_t chunk : {size_t{1} << 20, size_t{100003}}) {
    auto got = ReadWholeDevice(**dev, chunk);
    ASSERT_TRUE(got.ok()) << got.status().ToString();
    int64_t diff = FirstDifference(*got, want);
    ASSERT_EQ(diff, -1) << image << ": first difference at guest offset " << diff
                        << " (chunk size " << chunk << ")";
  }
  Status st = CloseImage(std::move(*dev));
  EXPECT_TRUE(st.ok()) << st.ToString();
}

// A mixed workload for an 8 MiB disk with cluster size `cs`: whole-cluster
// writes, unaligned writes that cross clusters (copy on write against data
// and against unallocated space), zero writes with and without unmap,
// aligned and unaligned discards, and a write that ends at the end of the
// disk.
std::vector<std::string> MixedWorkload(uint64_t cs) {
  return {
      "write -s p1 0 " + N(3 * cs),
      "write -s p2 " + N(cs / 2 + 3) + " " + N(2 * cs + 1000),
      "write -s p3 " + N(5 * kMiB + 123) + " 77777",
      "write -P 0x5a " + N(2 * kMiB + 17) + " " + N(std::min(3 * cs + 9, 5 * kMiB)),
      "write -z " + N(cs) + " " + N(cs),
      "write -z -u " + N(2 * kMiB) + " " + N(cs),
      "write -z " + N(3 * kMiB + 100) + " 5000",
      "discard " + N(4 * kMiB) + " " + N(1 * kMiB),
      "write -s p2 " + N(4 * kMiB + 333) + " 1111",
      "discard " + N(1 * kMiB + 4096) + " 600000",
      "write -s p1 " + N(7 * kMiB + 3) + " " + N(1 * kMiB - 3),
      "write -s p3 " + N(6 * kMiB + 511) + " 2",
  };
}

// --- compat x cluster size x refcount width -----------------------------

struct Format {
  std::string compat;
  uint64_t cluster_size;
  int refcount_bits;
};

std::string FormatName(const ::testing::TestParamInfo<Format>& info) {
  std::string c = info.param.compat == "0.10" ? "v2" : "v3";
  return c + "_cluster" + N(info.param.cluster_size) + "_refbits" + N(info.param.refcount_bits);
}

std::vector<Format> AllFormats() {
  std::vector<Format> out;
  for (uint64_t cs : {uint64_t{512}, 4 * kKiB, 64 * kKiB, 2 * kMiB}) {
    out.push_back({"0.10", cs, 16});
    for (int bits : {1, 16, 64}) out.push_back({"1.1", cs, bits});
  }
  return out;
}

std::string CreateOpts(const Format& f) {
  return "compat=" + f.compat + ",cluster_size=" + N(f.cluster_size) +
         ",refcount_bits=" + N(f.refcount_bits);
}

class QemuImageFormats : public ::testing::TestWithParam<Format> {};

TEST_P(QemuImageFormats, ReadsMixedWorkloadLikeQemu) {
  const Format& f = GetParam();
  TempDir dir;
  MakePatternFiles(dir);
  const std::string img = dir.File("img.qcow2");
  ShOk("qemu-img create -f qcow2 -o " + CreateOpts(f) + " " + ShellQuote(img) + " 8M");
  QemuIo(dir.path(), img, MixedWorkload(f.cluster_size));
  ExpectKvblkReadsWhatQemuConverts(dir, img);
}

TEST_P(QemuImageFormats, ReadsEmptyImageAsZeros) {
  const Format& f = GetParam();
  TempDir dir;
  const std::string img = dir.File("empty.qcow2");
  ShOk("qemu-img create -f qcow2 -o " + CreateOpts(f) + " " + ShellQuote(img) + " 3M");
  ExpectKvblkReadsWhatQemuConverts(dir, img);
}

TEST_P(QemuImageFormats, ReadsDiskWhoseSizeIsNotAClusterMultiple) {
  const Format& f = GetParam();
  TempDir dir;
  MakePatternFiles(dir);
  const std::string img = dir.File("odd.qcow2");
  const uint64_t size = 3 * kMiB + 2560;  // a partial last cluster for cs > 512
  ShOk("qemu-img create -f qcow2 -o " + CreateOpts(f) + " " + ShellQuote(img) + " " + N(size));
  QemuIo(dir.path(), img,
         {"write -s p2 " + N(size - 70000) + " 70000", "write -s p1 0 " + N(f.cluster_size + 7),
          "write -z " + N(size - 1536) + " 512"});
  ExpectKvblkReadsWhatQemuConverts(dir, img);
}

INSTANTIATE_TEST_SUITE_P(Interop, QemuImageFormats, ::testing::ValuesIn(AllFormats()),
                         FormatName);

// --- compressed images ------------------------------------------------------

struct Compression {
  std::string type;  // zlib or zstd
  uint64_t cluster_size;
};

std::string CompressionName(const ::testing::TestParamInfo<Compression>& info) {
  return info.param.type + "_cluster" + N(info.param.cluster_size);
}

class QemuCompressedImages : public ::testing::TestWithParam<Compression> {};

// A source image with compressible (pattern) and incompressible (random)
// clusters, converted with -c: the pattern clusters end up compressed, the
// random ones stored plainly.
TEST_P(QemuCompressedImages, ReadsConvertedCompressedImage) {
  const Compression& c = GetParam();
  TempDir dir;
  MakePatternFiles(dir);
  const std::string src = dir.File("src.qcow2");
  const std::string img = dir.File("comp.qcow2");
  ShOk("qemu-img create -f qcow2 " + ShellQuote(src) + " 6M");
  QemuIo(dir.path(), src,
         {"write -P 0x11 0 1M", "write -s p1 1M 512k", "write -P 0x22 " + N(2 * kMiB + 100) + " 900k",
          "write -s p3 4M 3000", "write -P 0x33 " + N(5 * kMiB) + " 1M"});
  ShOk("qemu-img convert -c -O qcow2 -o compression_type=" + c.type +
       ",cluster_size=" + N(c.cluster_size) + " " + ShellQuote(src) + " " + ShellQuote(img));
  EXPECT_TRUE(HasCompressedClusters(img));
  ExpectKvblkReadsWhatQemuConverts(dir, img);

  // Partial overwrites of compressed clusters (copy on write from a
  // compressed cluster) and discards of compressed clusters.
  QemuIo(dir.path(), img,
         {"write -s p2 " + N(100) + " 333", "write -s p3 " + N(std::min(c.cluster_size * 3, 5 * kMiB) - 10) + " 20",
          "discard " + N(5 * kMiB) + " " + N(512 * kKiB), "write -z " + N(2 * kMiB) + " 4096"});
  ExpectKvblkReadsWhatQemuConverts(dir, img);
}

// Single compressed clusters written by qemu-io next to normal ones; several
// compressed clusters share a host cluster.
TEST_P(QemuCompressedImages, ReadsClustersWrittenCompressedByQemuIo) {
  const Compression& c = GetParam();
  TempDir dir;
  MakePatternFiles(dir);
  const std::string img = dir.File("c.qcow2");
  const uint64_t cs = c.cluster_size;
  ShOk("qemu-img create -f qcow2 -o compression_type=" + c.type + ",cluster_size=" + N(cs) + " " +
       ShellQuote(img) + " " + N(std::max<uint64_t>(8 * cs, 4 * kMiB)));
  std::vector<std::string> cmds;
  for (uint64_t i = 0; i < 6; ++i) {
    cmds.push_back("write -c -P " + N(0x40 + i) + " " + N(i * cs) + " " + N(cs));
  }
  cmds.push_back("write -s p1 " + N(6 * cs) + " " + N(cs));
  cmds.push_back("write -s p2 " + N(2 * cs + cs / 3) + " 99");  // COW out of a compressed one
  QemuIo(dir.path(), img, cmds);
  EXPECT_TRUE(HasCompressedClusters(img));
  ExpectKvblkReadsWhatQemuConverts(dir, img);
}

INSTANTIATE_TEST_SUITE_P(Interop, QemuCompressedImages,
                         ::testing::Values(Compression{"zlib", 4 * kKiB},
                                           Compression{"zlib", 64 * kKiB},
                                           Compression{"zlib", 2 * kMiB},
                                           Compression{"zstd", 512},
                                           Compression{"zstd", 64 * kKiB},
                                           Compression{"zstd", 2 * kMiB}),
                         CompressionName);

// --- backing chains ----------------------------------------------------------

struct Chain {
  std::string compat;
  uint64_t cluster_size;
};

std::string ChainName(const ::testing::TestParamInfo<Chain>& info) {
  return std::string(info.param.compat == "0.10" ? "v2" : "v3") + "_cluster" +
         N(info.param.cluster_size);
}

class QemuBackingChains : public ::testing::TestWithParam<Chain> {};

// top.qcow2 (5M) -> mid.qcow2 (4M) -> base.raw (3M), relative names, with
// writes, zero writes and discards at each level; the top is larger than its
// backing files, so reads past them must be zeros.
TEST_P(QemuBackingChains, ReadsThreeLevelChainLikeQemu) {
  const Chain& c = GetParam();
  const uint64_t cs = c.cluster_size;
  TempDir dir;
  MakePatternFiles(dir);
  const std::string opts = "-o compat=" + c.compat + ",cluster_size=" + N(cs);
  const std::string cd = "cd " + ShellQuote(dir.path()) + " && ";
  ShOk(cd + "qemu-img create -f raw base.raw 3M");
  QemuIo(dir.path(), "base.raw", {"write -s p1 0 3M"}, "raw");
  ShOk(cd + "qemu-img create -f qcow2 " + opts + " -b base.raw -F raw mid.qcow2 4M");
  QemuIo(dir.path(), "mid.qcow2",
         {"write -s p2 " + N(cs + 5) + " " + N(cs * 2), "write -P 0x77 " + N(3 * kMiB - 1000) +
          " 300000", "write -z " + N(8 * cs) + " " + N(2 * cs), "discard " + N(12 * cs) + " " +
          N(cs), "write -s p3 " + N(20 * cs + 1) + " 1"});
  ShOk(cd + "qemu-img create -f qcow2 " + opts + " -b mid.qcow2 -F qcow2 top.qcow2 5M");
  QemuIo(dir.path(), "top.qcow2",
         {"write -s p3 " + N(cs / 2) + " " + N(cs), "write -P 0x99 " + N(4 * kMiB - 7) + " 70000",
          "write -z " + N(2 * cs) + " " + N(cs), "write -z " + N(9 * cs + 3) + " 100",
          "discard " + N(14 * cs) + " " + N(2 * cs), "write -s p1 " + N(3 * kMiB - 2) + " 10"});
  CommandResult info = ShOk("qemu-img info --backing-chain " + ShellQuote(dir.File("top.qcow2")));
  EXPECT_NE(info.output.find("backing file: mid.qcow2"), std::string::npos) << info.output;
  ExpectKvblkReadsWhatQemuConverts(dir, dir.File("top.qcow2"));
  // The middle layer alone too.
  ExpectKvblkReadsWhatQemuConverts(dir, dir.File("mid.qcow2"));
}

INSTANTIATE_TEST_SUITE_P(Interop, QemuBackingChains,
                         ::testing::Values(Chain{"0.10", 4 * kKiB}, Chain{"1.1", 512},
                                           Chain{"1.1", 4 * kKiB}, Chain{"1.1", 64 * kKiB}),
                         ChainName);

// --- snapshots ---------------------------------------------------------------

// After an internal snapshot every cluster is shared (refcount 2, COPIED
// clear); writes then copy on write. kvblk reads the active layer.
TEST(QemuImages, ReadsActiveLayerOfImageWithInternalSnapshot) {
  TempDir dir;
  MakePatternFiles(dir);
  const std::string img = dir.File("snap.qcow2");
  ShOk("qemu-img create -f qcow2 -o cluster_size=4096 " + ShellQuote(img) + " 4M");
  QemuIo(dir.path(), img, {"write -s p1 0 1M", "write -s p2 3M 200000"});
  ShOk("qemu-img snapshot -c first " + ShellQuote(img));
  QemuIo(dir.path(), img,
         {"write -s p3 1000 10000", "discard 512k 64k", "write -z 3M 8192", "write -P 1 2M 5"});
  ExpectKvblkReadsWhatQemuConverts(dir, img);
}

}  // namespace
}  // namespace kvblk
