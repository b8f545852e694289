// Corrupt and hostile qcow2 images: images made by qemu-img, then patched
// byte by byte (big-endian fields, docs/interop/qcow2.rst). For each forgery
// kvblk must fail with the exact StatusCode and a message naming the
// problem, never crash, and leave the file's bytes untouched when an open
// fails (or when the image was opened read-only).
#include <gtest/gtest.h>
#include <unistd.h>

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
using testing::ReadFileBytes;
using testing::ReadRange;
using testing::ShellQuote;
using testing::ShOk;
using testing::TempDir;
using testing::WriteFileBytes;

constexpr uint64_t kCluster = 65536;

// Header field offsets (qcow2.rst "Header").
constexpr size_t kOffMagic = 0;
constexpr size_t kOffVersion = 4;
constexpr size_t kOffClusterBits = 20;
constexpr size_t kOffL1Size = 36;
constexpr size_t kOffL1TableOffset = 40;
constexpr size_t kOffRefcountTableOffset = 48;
constexpr size_t kOffIncompatible = 72;
constexpr size_t kOffHeaderLength = 100;
constexpr uint32_t kFeatureTableExt = 0x6803f857;

uint64_t Get(const std::vector<uint8_t>& b, size_t off, int width) {
  uint64_t v = 0;
  for (int i = 0; i < width; ++i) v = (v << 8) | b.at(off + i);
  return v;
}

void Put(std::vector<uint8_t>* b, size_t off, uint64_t v, int width) {
  for (int i = width - 1; i >= 0; --i) {
    b->at(off + i) = static_cast<uint8_t>(v);
    v >>= 8;
  }
}

// A small v3 image (64 KiB clusters, 4 MiB) whose first two clusters hold
// 0x5a and whose cluster at 1 MiB holds 0xa5. qemu-img lays it out as:
// header, refcount table, refcount block, L1 table, L2 table, data.
class HostileImage : public ::testing::Test {
 protected:
  void SetUp() override {
    img_ = dir_.File("img.qcow2");
    Make("");
  }

  // (Re)creates the image with extra -o options.
  void Make(const std::string& opts) {
    ShOk("qemu-img create -f qcow2 -o cluster_size=65536" + opts + " " + ShellQuote(img_) +
         " 4M");
    ShOk("qemu-io -f qcow2 -c 'write -P 0x5a 0 128k' -c 'write -P 0xa5 1M 64k' " +
         ShellQuote(img_));
    bytes_ = ReadFileBytes(img_);
    ASSERT_GT(bytes_.size(), 5 * kCluster);
  }

  uint64_t L1Offset() const { return Get(bytes_, kOffL1TableOffset, 8); }
  uint64_t RefcountTableOffset() const { return Get(bytes_, kOffRefcountTableOffset, 8); }
  uint64_t L2Offset() const { return Get(bytes_, L1Offset(), 8) & 0x00fffffffffffe00ull; }
  // File offset of the L2 entry of guest cluster `gc` (all in L2 table 0).
  size_t L2EntryAt(uint64_t gc) const { return L2Offset() + gc * 8; }

  // Writes the patched bytes back.
  void Save() { WriteFileBytes(img_, bytes_); }

  Result<std::unique_ptr<BlockDevice>> Open(bool read_only) {
    OpenOptions o;
    o.format = "qcow2";
    o.read_only = read_only;
    return OpenImage(img_, o);
  }

  // Opening fails with `code` and a message containing `phrase`, and the
  // file is unchanged afterwards.
  void ExpectOpenFails(bool read_only, StatusCode code, const std::string& phrase) {
    const std::vector<uint8_t> before = ReadFileBytes(img_);
    auto dev = Open(read_only);
    ASSERT_FALSE(dev.ok()) << "open (" << (read_only ? "read-only" : "writable")
                           << ") succeeded on a forged image";
    EXPECT_EQ(dev.status().code(), code) << dev.status().ToString();
    EXPECT_NE(dev.status().message().find(phrase), std::string::npos)
        << "message lacks '" << phrase << "': " << dev.status().message();
    EXPECT_TRUE(ReadFileBytes(img_) == before) << "a failed open changed the file";
  }

  void ExpectBothOpensFail(StatusCode code, const std::string& phrase) {
    ExpectOpenFails(true, code, phrase);
    ExpectOpenFails(false, code, phrase);
  }

  // Reads of the clean part of the image still return the right data.
  void ExpectGoodDataReadable(BlockDevice& dev) {
    auto r = ReadRange(dev, 1 << 20, kCluster);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_TRUE(*r == std::vector<uint8_t>(kCluster, 0xa5));
  }

  TempDir dir_;
  std::string img_;
  std::vector<uint8_t> bytes_;
};

TEST_F(HostileImage, BadMagicIsInvalidArgument) {
  Put(&bytes_, kOffMagic, 0x12345678, 4);
  Save();
  ExpectBothOpensFail(StatusCode::kInvalidArgument, "not a qcow2 image");
}

TEST_F(HostileImage, HeaderCutShortIsCorruption) {
  bytes_.resize(60);  // inside the v2 part of the header
  Save();
  ExpectBothOpensFail(StatusCode::kCorruption, "truncated header");
}

TEST_F(HostileImage, V3HeaderCutBeforeItsEndIsCorruption) {
  bytes_.resize(90);  // the v2 fields are there, the v3 ones are not
  Save();
  ExpectBothOpensFail(StatusCode::kCorruption, "truncated header");
}

TEST_F(HostileImage, UnsupportedVersionIsNotSupported) {
  Put(&bytes_, kOffVersion, 4, 4);
  Save();
  ExpectBothOpensFail(StatusCode::kNotSupported, "unsupported qcow2 version 4");
}

TEST_F(HostileImage, L1TablePastEndOfFileIsCorruption) {
  Put(&bytes_, kOffL1TableOffset, 1000 * kCluster, 8);
  Save();
  ExpectBothOpensFail(StatusCode::kCorruption, "past the end of the file");
}

TEST_F(HostileImage, L1TableAtRefcountTableOffsetIsCorruption) {
  Put(&bytes_, kOffL1TableOffset, RefcountTableOffset(), 8);
  Save();
  ExpectBothOpensFail(StatusCode::kCorruption, "overlaps the refcount table");
}

TEST_F(HostileImage, L1TableOverlappingRefcountTablePartlyIsCorruption) {
  // A refcount table of two clusters whose second cluster is the L1 table.
  Put(&bytes_, 56, 2, 4);
  Put(&bytes_, kOffRefcountTableOffset, L1Offset() - kCluster, 8);
  Save();
  ExpectBothOpensFail(StatusCode::kCorruption, "overlaps the refcount table");
}

TEST_F(HostileImage, AbsurdL1SizeIsCorruption) {
  Put(&bytes_, kOffL1Size, 0x7fffffff, 4);
  Save();
  ExpectBothOpensFail(StatusCode::kCorruption, "L1 table too large");
}

TEST_F(HostileImage, L1SizeTooSmallForDiskIsCorruption) {
  Put(&bytes_, 24, uint64_t{1} << 40, 8);  // size: 1 TiB with l1_size 1
  Save();
  ExpectBothOpensFail(StatusCode::kCorruption, "is too small for size");
}

TEST_F(HostileImage, ClusterBits30IsCorruption) {
  Put(&bytes_, kOffClusterBits, 30, 4);
  Save();
  ExpectBothOpensFail(StatusCode::kCorruption, "unsupported cluster size: cluster_bits 30");
}

TEST_F(HostileImage, UnknownIncompatibleBitWithoutNameIsNotSupported) {
  Put(&bytes_, kOffIncompatible, uint64_t{1} << 9, 8);
  Save();
  ExpectBothOpensFail(StatusCode::kNotSupported, "unknown feature bit 9");
}

TEST_F(HostileImage, UnknownIncompatibleBitIsNamedFromFeatureTable) {
  // Find qemu's feature name table and turn its last entry into a name for
  // incompatible bit 9.
  size_t pos = Get(bytes_, kOffHeaderLength, 4);
  size_t table = 0, len = 0;
  while (pos + 8 <= kCluster) {
    uint32_t type = static_cast<uint32_t>(Get(bytes_, pos, 4));
    uint32_t n = static_cast<uint32_t>(Get(bytes_, pos + 4, 4));
    if (type == 0) break;
    if (type == kFeatureTableExt) {
      table = pos + 8;
      len = n;
      break;
    }
    pos += 8 + (n + 7) / 8 * 8;
  }
  ASSERT_NE(table, 0u) << "qemu-img wrote no feature name table";
  ASSERT_GE(len, 48u);
  size_t e = table + len - 48;
  std::fill(bytes_.begin() + e, bytes_.begin() + e + 48, 0);
  bytes_[e] = 0;  // incompatible
  bytes_[e + 1] = 9;
  const std::string name = "frobnicated clusters";
  std::copy(name.begin(), name.end(), bytes_.begin() + e + 2);
  Put(&bytes_, kOffIncompatible, uint64_t{1} << 9, 8);
  Save();
  ExpectBothOpensFail(StatusCode::kNotSupported, "unsupported incompatible features: " + name);
}

TEST_F(HostileImage, CorruptBitRefusesWritableOpenButAllowsReadOnly) {
  Put(&bytes_, kOffIncompatible, 2, 8);
  Save();
  ExpectOpenFails(false, StatusCode::kCorruption, "marked corrupt");
  auto dev = Open(true);
  ASSERT_TRUE(dev.ok()) << dev.status().ToString();
  auto r = ReadRange(**dev, 0, 2 * kCluster);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_TRUE(*r == std::vector<uint8_t>(2 * kCluster, 0x5a));
  ExpectGoodDataReadable(**dev);
  EXPECT_EQ(RunSync((*dev)->Write(0, r->data(), 512)).code(), StatusCode::kReadOnly);
  EXPECT_TRUE(CloseImage(std::move(*dev)).ok());
  EXPECT_TRUE(ReadFileBytes(img_) == bytes_);
}

TEST_F(HostileImage, DirtyBitOpensReadOnlyUntouchedAndIsRepairedOnWritableOpen) {
  Make(",lazy_refcounts=on");
  Put(&bytes_, kOffIncompatible, 1, 8);
  Save();
  {
    // Read-only: readable, and the file is left exactly as it was.
    auto dev = Open(true);
    ASSERT_TRUE(dev.ok()) << dev.status().ToString();
    ExpectGoodDataReadable(**dev);
    EXPECT_TRUE(CloseImage(std::move(*dev)).ok());
    EXPECT_TRUE(ReadFileBytes(img_) == bytes_);
  }
  // Writable: the refcounts are rebuilt and the dirty bit cleared first.
  auto dev = Open(false);
  ASSERT_TRUE(dev.ok()) << dev.status().ToString();
  ExpectGoodDataReadable(**dev);
  EXPECT_TRUE(CloseImage(std::move(*dev)).ok());
  EXPECT_EQ(Get(ReadFileBytes(img_), kOffIncompatible, 8) & 1, 0u) << "dirty bit still set";
  auto r = testing::Sh("qemu-img check " + ShellQuote(img_));
  EXPECT_EQ(r.exit_code, 0) << r.output;
}

TEST_F(HostileImage, RefcountTableEntryUnalignedIsCorruption) {
  const size_t e = RefcountTableOffset();
  Put(&bytes_, e, Get(bytes_, e, 8) + 512, 8);
  Save();
  ExpectBothOpensFail(StatusCode::kCorruption, "refcount table entry 0");
  ExpectOpenFails(true, StatusCode::kCorruption, "is not aligned to a cluster");
}

TEST_F(HostileImage, RefcountBlockPastEndOfFileIsCorruption) {
  Put(&bytes_, RefcountTableOffset(), 4096 * kCluster, 8);
  Save();
  ExpectBothOpensFail(StatusCode::kCorruption, "lies past the end of the file");
}

TEST_F(HostileImage, MissingBackingFileIsNotFound) {
  ShOk("qemu-img create -f qcow2 -u -b nowhere.qcow2 -F qcow2 " + ShellQuote(img_) + " 4M");
  ExpectBothOpensFail(StatusCode::kNotFound, "nowhere.qcow2");
}

// --- bad table entries: the open succeeds, the read that meets them fails --

class HostileEntry : public HostileImage {
 protected:
  // Opens read-only: reading guest cluster 0 fails with Corruption naming
  // `phrase`; with `rest_readable`, clusters mapped by other entries are
  // still readable; the file is unchanged.
  void ExpectReadOnlyReadFails(const std::string& phrase, bool rest_readable = true) {
    Save();
    auto dev = Open(true);
    ASSERT_TRUE(dev.ok()) << dev.status().ToString();
    auto r = ReadRange(**dev, 100, 1000);
    ASSERT_FALSE(r.ok()) << "read of a forged entry succeeded";
    EXPECT_EQ(r.status().code(), StatusCode::kCorruption) << r.status().ToString();
    EXPECT_NE(r.status().message().find(phrase), std::string::npos) << r.status().message();
    // A second attempt fails the same way (nothing cached half-valid).
    auto again = ReadRange(**dev, 0, 512);
    EXPECT_EQ(again.status().code(), StatusCode::kCorruption);
    if (rest_readable) ExpectGoodDataReadable(**dev);
    EXPECT_TRUE(CloseImage(std::move(*dev)).ok());
    EXPECT_TRUE(ReadFileBytes(img_) == bytes_) << "a read-only open changed the file";
  }

  // Opens writable: the failed read marks the image corrupt on disk and the
  // device refuses further writes; qemu-img agrees that it is corrupt.
  void ExpectWritableReadMarksCorrupt() {
    Save();
    auto dev = Open(false);
    ASSERT_TRUE(dev.ok()) << dev.status().ToString();
    auto r = ReadRange(**dev, 0, 512);
    ASSERT_EQ(r.status().code(), StatusCode::kCorruption) << r.status().ToString();
    std::vector<uint8_t> data(512, 1);
    EXPECT_EQ(RunSync((*dev)->Write(1 << 20, data.data(), data.size())).code(),
              StatusCode::kReadOnly);
    CloseImage(std::move(*dev)).ok();
    std::vector<uint8_t> after = ReadFileBytes(img_);
    EXPECT_EQ(Get(after, kOffIncompatible, 8) & 2, 2u) << "corrupt bit not set";
    CommandResult info = ShOk("qemu-img info " + ShellQuote(img_));
    EXPECT_NE(info.output.find("corrupt: true"), std::string::npos) << info.output;
    // Apart from the header's feature bits nothing changed.
    Put(&after, kOffIncompatible, Get(bytes_, kOffIncompatible, 8), 8);
    EXPECT_TRUE(after == bytes_) << "a corrupt image was modified beyond its header";
  }
};

TEST_F(HostileEntry, L2EntryWithReservedBitsFailsReadWithCorruption) {
  Put(&bytes_, L2EntryAt(0), Get(bytes_, L2EntryAt(0), 8) | (1u << 3), 8);
  ExpectReadOnlyReadFails("reserved bits");
}

TEST_F(HostileEntry, L2EntryWithHighReservedBitsFailsReadWithCorruption) {
  Put(&bytes_, L2EntryAt(0), Get(bytes_, L2EntryAt(0), 8) | (uint64_t{1} << 58), 8);
  ExpectReadOnlyReadFails("reserved bits");
}

TEST_F(HostileEntry, L2EntryWithUnalignedOffsetFailsReadWithCorruption) {
  Put(&bytes_, L2EntryAt(0), Get(bytes_, L2EntryAt(0), 8) + 4096, 8);
  ExpectReadOnlyReadFails("not aligned to the cluster size");
}

TEST_F(HostileEntry, BadL2EntryInWritableImageMarksItCorrupt) {
  Put(&bytes_, L2EntryAt(0), Get(bytes_, L2EntryAt(0), 8) + 4096, 8);
  ExpectWritableReadMarksCorrupt();
}

TEST_F(HostileEntry, L1EntryWithReservedBitsFailsReadWithCorruption) {
  Put(&bytes_, L1Offset(), Get(bytes_, L1Offset(), 8) | 1, 8);
  // Every cluster of the disk is behind L1 entry 0.
  ExpectReadOnlyReadFails("L1 entry 0 has reserved bits set", false);
}

TEST_F(HostileEntry, L1EntryWithUnalignedL2OffsetFailsReadWithCorruption) {
  Put(&bytes_, L1Offset(), Get(bytes_, L1Offset(), 8) + 512, 8);
  ExpectReadOnlyReadFails("is not aligned to a cluster", false);
}

TEST_F(HostileEntry, L2TablePastEndOfFileFailsReadWithCorruption) {
  Put(&bytes_, L1Offset(), (uint64_t{1} << 63) | (1000 * kCluster), 8);
  ExpectReadOnlyReadFails("lies past the end of the file", false);
}

TEST_F(HostileEntry, ZeroFlagInVersion2ImageFailsReadWithCorruption) {
  Make(",compat=0.10");
  Put(&bytes_, L2EntryAt(0), Get(bytes_, L2EntryAt(0), 8) | 1, 8);
  ExpectReadOnlyReadFails("zero flag");
}

TEST_F(HostileEntry, GarbageInCompressedClusterFailsReadWithCorruption) {
  // Make cluster 0 compressed by qemu, then scribble over its data.
  ShOk("qemu-img create -f qcow2 -o cluster_size=65536 " + ShellQuote(img_) + " 4M");
  ShOk("qemu-io -f qcow2 -c 'write -c -P 0x33 0 64k' -c 'write -P 0xa5 1M 64k' " +
       ShellQuote(img_));
  bytes_ = ReadFileBytes(img_);
  const uint64_t entry = Get(bytes_, L2EntryAt(0), 8);
  ASSERT_NE(entry & (uint64_t{1} << 62), 0u) << "cluster 0 is not compressed";
  const int x = 62 - (16 - 8);
  const uint64_t host = entry & ((uint64_t{1} << x) - 1);
  for (size_t i = 0; i < 64; ++i) bytes_.at(host + i) = static_cast<uint8_t>(0xff - i);
  ExpectReadOnlyReadFails("compressed cluster");
}

}  // namespace
}  // namespace kvblk
