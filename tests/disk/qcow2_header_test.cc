// Tests for disk/qcow2_header.h (decode, validate, encode), ParseSize and
// qcow2/raw image creation (checked with qemu-img).
#include "disk/qcow2_header.h"

#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <utility>
#include <vector>

#include "disk/qcow2_create.h"
#include "disk/qcow2_format.h"
#include "kvblk/image_create.h"

namespace kvblk::qcow2 {
namespace {

constexpr uint64_t kClusterSize = 65536;
constexpr uint64_t kFileSize = 4 * kClusterSize;  // header, reftable, refblock, L1
constexpr const char* kFile = "img.qcow2";

// A consistent v3 header for a 1 GiB image with the default layout.
Header ValidHeader() {
  Header h;
  h.version = 3;
  h.cluster_bits = 16;
  h.size = 1ull << 30;
  h.l1_size = 2;
  h.l1_table_offset = 3 * kClusterSize;
  h.refcount_table_offset = kClusterSize;
  h.refcount_table_clusters = 1;
  h.feature_names = DefaultFeatureNames();
  return h;
}

// Encodes `*h` (updating its derived fields) into a full first cluster.
std::vector<uint8_t> EncodeInPlace(Header* h) {
  auto r = EncodeHeader(h);
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  std::vector<uint8_t> buf = r.ok() ? std::move(r).value() : std::vector<uint8_t>();
  buf.resize(h->cluster_size(), 0);
  return buf;
}

std::vector<uint8_t> Bytes(Header h) { return EncodeInPlace(&h); }

Result<Header> Decode(const std::vector<uint8_t>& buf, uint64_t file_size = kFileSize) {
  return DecodeHeader(buf, file_size, kFile);
}

void Put32(std::vector<uint8_t>* buf, size_t off, uint32_t v) { StoreBe32(buf->data() + off, v); }
void Put64(std::vector<uint8_t>* buf, size_t off, uint64_t v) { StoreBe64(buf->data() + off, v); }

bool SameFeatureNames(const std::vector<FeatureName>& a, const std::vector<FeatureName>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].type != b[i].type || a[i].bit != b[i].bit || a[i].name != b[i].name) return false;
  }
  return true;
}

void ExpectSameHeader(const Header& a, const Header& b) {
  EXPECT_EQ(a.version, b.version);
  EXPECT_EQ(a.backing_file_offset, b.backing_file_offset);
  EXPECT_EQ(a.backing_file_size, b.backing_file_size);
  EXPECT_EQ(a.cluster_bits, b.cluster_bits);
  EXPECT_EQ(a.size, b.size);
  EXPECT_EQ(a.crypt_method, b.crypt_method);
  EXPECT_EQ(a.l1_size, b.l1_size);
  EXPECT_EQ(a.l1_table_offset, b.l1_table_offset);
  EXPECT_EQ(a.refcount_table_offset, b.refcount_table_offset);
  EXPECT_EQ(a.refcount_table_clusters, b.refcount_table_clusters);
  EXPECT_EQ(a.nb_snapshots, b.nb_snapshots);
  EXPECT_EQ(a.snapshots_offset, b.snapshots_offset);
  EXPECT_EQ(a.incompatible_features, b.incompatible_features);
  EXPECT_EQ(a.compatible_features, b.compatible_features);
  EXPECT_EQ(a.autoclear_features, b.autoclear_features);
  EXPECT_EQ(a.refcount_order, b.refcount_order);
  EXPECT_EQ(a.header_length, b.header_length);
  EXPECT_EQ(a.compression_type, b.compression_type);
  EXPECT_EQ(a.extra_header, b.extra_header);
  EXPECT_EQ(a.backing_file, b.backing_file);
  EXPECT_EQ(a.backing_format, b.backing_format);
  EXPECT_TRUE(SameFeatureNames(a.feature_names, b.feature_names));
  ASSERT_EQ(a.unknown_extensions.size(), b.unknown_extensions.size());
  for (size_t i = 0; i < a.unknown_extensions.size(); ++i) {
    EXPECT_EQ(a.unknown_extensions[i].type, b.unknown_extensions[i].type);
    EXPECT_EQ(a.unknown_extensions[i].data, b.unknown_extensions[i].data);
  }
  EXPECT_EQ(a.has_bitmaps_extension, b.has_bitmaps_extension);
  EXPECT_EQ(a.data_file, b.data_file);
}

// Asserts that `r` failed with `code` and a message containing `phrase`.
template <typename T>
void ExpectError(const Result<T>& r, StatusCode code, const std::string& phrase) {
  ASSERT_FALSE(r.ok()) << "expected " << StatusCodeName(code) << " containing '" << phrase << "'";
  EXPECT_EQ(r.status().code(), code) << r.status().ToString();
  EXPECT_NE(r.status().message().find(phrase), std::string::npos) << r.status().ToString();
}


// ---------------------------------------------------------------------------
// Round trips

TEST(Qcow2Header, RoundTripsV3WithEveryField) {
  Header h = ValidHeader();
  h.backing_file = "base image.qcow2";
  h.backing_format = "qcow2";
  h.incompatible_features = kIncompatDirty | kIncompatCompressionType;
  h.compression_type = kCompressionZstd;
  h.compatible_features = kCompatLazyRefcounts | (1ull << 5);
  h.autoclear_features = kAutoclearBitmaps;
  h.refcount_order = 5;
  h.nb_snapshots = 1;
  h.snapshots_offset = 3 * kClusterSize;
  h.extra_header = {1, 2, 3, 4, 5, 6, 7, 8};
  h.unknown_extensions.push_back({kExtBitmaps, std::vector<uint8_t>(24, 0xab)});
  h.unknown_extensions.push_back({0x12345678, {9, 8, 7}});
  h.has_bitmaps_extension = true;
  auto d = Decode(EncodeInPlace(&h));
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  EXPECT_EQ(h.header_length, 120u);
  EXPECT_NE(h.backing_file_offset, 0u);
  EXPECT_EQ(h.backing_file_size, h.backing_file.size());
  ExpectSameHeader(*d, h);
}

TEST(Qcow2Header, RoundTripsV2) {
  Header h = ValidHeader();
  h.version = 2;
  h.feature_names.clear();
  h.backing_file = "/abs/base.raw";
  h.backing_format = "raw";
  auto d = Decode(EncodeInPlace(&h));
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  EXPECT_EQ(d->header_length, kV2HeaderLength);
  EXPECT_EQ(d->refcount_order, 4u);
  ExpectSameHeader(*d, h);
}

TEST(Qcow2Header, EncodeRecomputesHeaderLengthAndBackingFields) {
  Header h = ValidHeader();
  h.header_length = 4000;
  h.backing_file_offset = 77;
  h.backing_file_size = 99;
  auto r = EncodeHeader(&h);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(h.header_length, 112u);  // kept at the compression-type length
  EXPECT_EQ(h.backing_file_offset, 0u);
  EXPECT_EQ(h.backing_file_size, 0u);
  Header plain = ValidHeader();
  ASSERT_TRUE(EncodeHeader(&plain).ok());
  EXPECT_EQ(plain.header_length, kV3MinHeaderLength);
}

TEST(Qcow2Header, EncodedLayoutEndsWithEndMarkerThenBackingName) {
  Header h = ValidHeader();
  h.feature_names.clear();
  h.backing_file = "b";
  auto r = EncodeHeader(&h);
  ASSERT_TRUE(r.ok());
  const std::vector<uint8_t>& b = *r;
  EXPECT_EQ(LoadBe32(&b[0]), kMagic);
  EXPECT_EQ(LoadBe32(&b[104]), kExtEnd);
  EXPECT_EQ(LoadBe32(&b[108]), 0u);
  EXPECT_EQ(h.backing_file_offset, 112u);
  EXPECT_EQ(b[112], 'b');
}

TEST(Qcow2Header, DecodesImageMadeByQemuImg) {
  char dir_template[] = "/tmp/kvblk_hdr_XXXXXX";
  ASSERT_NE(mkdtemp(dir_template), nullptr);
  const std::string dir = dir_template;
  const std::string path = dir + "/q.qcow2";
  ASSERT_EQ(
      std::system(("qemu-img create -q -f qcow2 -o compression_type=zstd,lazy_refcounts=on '" +
                   path + "' 1G")
                      .c_str()),
      0);
  std::ifstream in(path, std::ios::binary);
  std::vector<uint8_t> buf((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::filesystem::remove_all(dir);
  const uint64_t file_size = buf.size();
  buf.resize(kClusterSize, 0);
  auto d = DecodeHeader(buf, file_size, path);
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  EXPECT_EQ(d->size, 1ull << 30);
  EXPECT_EQ(d->header_length, 112u);
  EXPECT_EQ(d->compression_type, kCompressionZstd);
  EXPECT_TRUE(d->lazy_refcounts());
  EXPECT_EQ(d->l1_table_offset, 3 * kClusterSize);
  EXPECT_EQ(d->IncompatibleFeatureName(0), "dirty bit");
  // Re-encoding reproduces qemu's header byte for byte.
  auto again = EncodeHeader(&*d);
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE(std::equal(again->begin(), again->end(), buf.begin()));
}

// ---------------------------------------------------------------------------
// Basic fields

TEST(Qcow2Header, RejectsBadMagic) {
  std::vector<uint8_t> buf = Bytes(ValidHeader());
  buf[3] = 0;
  ExpectError(Decode(buf), StatusCode::kInvalidArgument,
              "img.qcow2: not a qcow2 image (bad magic)");
  ExpectError(Decode({}), StatusCode::kInvalidArgument, "not a qcow2 image");
}

TEST(Qcow2Header, RejectsTruncatedHeader) {
  std::vector<uint8_t> buf = Bytes(ValidHeader());
  ExpectError(Decode(std::vector<uint8_t>(buf.begin(), buf.begin() + 60)), StatusCode::kCorruption,
              "truncated header");
  ExpectError(Decode(std::vector<uint8_t>(buf.begin(), buf.begin() + 90)), StatusCode::kCorruption,
              "truncated header");
  Put32(&buf, 100, 112);
  ExpectError(Decode(std::vector<uint8_t>(buf.begin(), buf.begin() + 108)), StatusCode::kCorruption,
              "truncated header");
}

TEST(Qcow2Header, RejectsUnsupportedVersion) {
  std::vector<uint8_t> buf = Bytes(ValidHeader());
  Put32(&buf, 4, 4);
  ExpectError(Decode(buf), StatusCode::kNotSupported, "version 4");
  Put32(&buf, 4, 1);
  ExpectError(Decode(buf), StatusCode::kNotSupported, "version 1");
}

TEST(Qcow2Header, RejectsClusterBitsOutsideRange) {
  std::vector<uint8_t> buf = Bytes(ValidHeader());
  Put32(&buf, 20, 8);
  ExpectError(Decode(buf), StatusCode::kCorruption, "unsupported cluster size: cluster_bits 8");
  Put32(&buf, 20, 22);
  ExpectError(Decode(buf), StatusCode::kCorruption, "unsupported cluster size: cluster_bits 22");
}

TEST(Qcow2Header, RejectsEncryption) {
  std::vector<uint8_t> buf = Bytes(ValidHeader());
  Put32(&buf, 32, 2);
  ExpectError(Decode(buf), StatusCode::kNotSupported, "encrypted images are not supported");
}

TEST(Qcow2Header, RejectsBadHeaderLength) {
  std::vector<uint8_t> buf = Bytes(ValidHeader());
  Put32(&buf, 100, 96);
  ExpectError(Decode(buf), StatusCode::kCorruption, "invalid header_length 96");
  Put32(&buf, 100, 108);
  ExpectError(Decode(buf), StatusCode::kCorruption, "invalid header_length 108");
  Put32(&buf, 100, kClusterSize + 8);
  ExpectError(Decode(buf), StatusCode::kCorruption, "invalid header_length 65544");
}

TEST(Qcow2Header, RejectsRefcountOrderAbove6) {
  std::vector<uint8_t> buf = Bytes(ValidHeader());
  Put32(&buf, 96, 7);
  ExpectError(Decode(buf), StatusCode::kCorruption, "refcount_order 7");
}

TEST(Qcow2Header, V2ImpliesRefcountOrder4AndNoFeatures) {
  Header h = ValidHeader();
  h.version = 2;
  h.feature_names.clear();
  std::vector<uint8_t> buf = Bytes(h);
  auto d = Decode(buf);
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  EXPECT_EQ(d->refcount_order, 4u);
  EXPECT_EQ(d->refcount_bits(), 16u);
  EXPECT_EQ(d->header_length, kV2HeaderLength);
  EXPECT_EQ(d->incompatible_features, 0u);
  EXPECT_TRUE(d->unknown_extensions.empty());
}

TEST(Qcow2Header, RejectsOversizedVirtualSize) {
  std::vector<uint8_t> buf = Bytes(ValidHeader());
  Put64(&buf, 24, kMaxVirtualSize + 512);
  ExpectError(Decode(buf), StatusCode::kNotSupported, "exceeds the maximum virtual size");
}

// ---------------------------------------------------------------------------
// Feature bits

TEST(Qcow2Header, NamesUnknownIncompatibleBitFromFeatureTable) {
  Header h = ValidHeader();
  h.feature_names.push_back({0, 7, "frobnicated clusters"});
  h.feature_names.push_back({1, 9, "not incompatible"});
  h.incompatible_features = (1ull << 7) | (1ull << 9);
  ExpectError(Decode(Bytes(h)), StatusCode::kNotSupported,
              "img.qcow2: unsupported incompatible features: frobnicated clusters, "
              "unknown feature bit 9");
}

TEST(Qcow2Header, NamesUnknownIncompatibleBitWithoutFeatureTable) {
  Header h = ValidHeader();
  h.feature_names.clear();
  h.incompatible_features = 1ull << 63;
  ExpectError(Decode(Bytes(h)), StatusCode::kNotSupported, "unknown feature bit 63");
  EXPECT_EQ(h.IncompatibleFeatureName(63), "unknown feature bit 63");
  EXPECT_EQ(ValidHeader().IncompatibleFeatureName(4), "extended L2 entries");
}

TEST(Qcow2Header, DecodesCorruptAndDirtyBits) {
  Header h = ValidHeader();
  h.incompatible_features = kIncompatCorrupt | kIncompatDirty;
  auto d = Decode(Bytes(h));
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  EXPECT_TRUE(d->corrupt());
  EXPECT_TRUE(d->dirty());
}

TEST(Qcow2Header, IgnoresUnknownCompatibleAndAutoclearBits) {
  Header h = ValidHeader();
  h.compatible_features = 1ull << 40;
  h.autoclear_features = 1ull << 41;
  auto d = Decode(Bytes(h));
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  EXPECT_EQ(d->compatible_features, 1ull << 40);
  EXPECT_EQ(d->autoclear_features, 1ull << 41);
}

TEST(Qcow2Header, RejectsExternalDataFile) {
  Header h = ValidHeader();
  h.incompatible_features = kIncompatExternalData;
  h.data_file = "data.raw";
  ExpectError(Decode(Bytes(h)), StatusCode::kNotSupported,
              "external data files are not supported (data file 'data.raw')");
}

TEST(Qcow2Header, DecodesZstdCompressionType) {
  Header h = ValidHeader();
  h.incompatible_features = kIncompatCompressionType;
  h.compression_type = kCompressionZstd;
  auto d = Decode(Bytes(h));
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  EXPECT_EQ(d->compression_type, kCompressionZstd);
  EXPECT_EQ(d->header_length, 112u);
}

TEST(Qcow2Header, RejectsInconsistentCompressionType) {
  Header h = ValidHeader();
  h.incompatible_features = kIncompatCompressionType;
  h.compression_type = 2;
  ExpectError(Decode(Bytes(h)), StatusCode::kNotSupported, "unsupported compression_type 2");

  h.incompatible_features = 0;
  h.compression_type = kCompressionZstd;
  ExpectError(Decode(Bytes(h)), StatusCode::kCorruption,
              "compression_type 1 is set without the compression type feature bit");

  h.incompatible_features = kIncompatCompressionType;
  h.compression_type = kCompressionZlib;
  h.header_length = 112;
  ExpectError(Decode(Bytes(h)), StatusCode::kCorruption,
              "compression type feature bit is set but compression_type is 0");
}

TEST(Qcow2Header, CompressionTypeIsZeroWithShortHeader) {
  // With header_length 104, byte 104 belongs to the extension area.
  Header h = ValidHeader();
  h.feature_names.clear();
  h.unknown_extensions.push_back({0x01000000, {1, 2, 3}});
  std::vector<uint8_t> buf = Bytes(h);
  ASSERT_EQ(buf[104], 1);
  auto d = Decode(buf);
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  EXPECT_EQ(d->compression_type, kCompressionZlib);
  EXPECT_EQ(d->header_length, kV3MinHeaderLength);
}

TEST(Qcow2Header, RejectsExtendedL2WithSmallClusters) {
  Header h = ValidHeader();
  h.cluster_bits = 13;
  h.size = 1 << 20;
  h.l1_size = 1;
  h.l1_table_offset = 3 << 13;
  h.refcount_table_offset = 1 << 13;
  h.feature_names.clear();
  h.incompatible_features = kIncompatExtendedL2;
  ExpectError(Decode(Bytes(h)), StatusCode::kCorruption,
              "extended L2 entries need a cluster size of at least 16384");
}

// ---------------------------------------------------------------------------
// Tables

TEST(Qcow2Header, RejectsL1TableTooLarge) {
  Header h = ValidHeader();
  h.l1_size = static_cast<uint32_t>(kMaxL1Bytes / 8 + 1);
  ExpectError(Decode(Bytes(h), 1ull << 40), StatusCode::kCorruption, "L1 table too large");
}

TEST(Qcow2Header, RejectsL1TableTooSmallForSize) {
  Header h = ValidHeader();
  h.l1_size = 1;  // 1 GiB with 64 KiB clusters needs 2 entries
  ExpectError(Decode(Bytes(h)), StatusCode::kCorruption,
              "l1_size 1 is too small for size 1073741824 (needs 2 entries)");
  h.l1_size = 2;
  h.size = (1ull << 30) + 1;
  ExpectError(Decode(Bytes(h)), StatusCode::kCorruption, "needs 3 entries");
}

TEST(Qcow2Header, L1SizeUsesExtendedL2EntryCount) {
  Header h = ValidHeader();
  h.incompatible_features = kIncompatExtendedL2;
  // 4096 entries of 16 bytes per L2 table: 256 MiB per L1 entry.
  ExpectError(Decode(Bytes(h)), StatusCode::kCorruption, "needs 4 entries");
  h.l1_size = 4;
  EXPECT_TRUE(Decode(Bytes(h)).ok());
}

TEST(Qcow2Header, RejectsMisalignedL1TableOffset) {
  Header h = ValidHeader();
  h.l1_table_offset = 0x1234;
  ExpectError(Decode(Bytes(h)), StatusCode::kCorruption,
              "img.qcow2: l1_table_offset 0x1234 is not aligned to the cluster size 65536");
}

TEST(Qcow2Header, RejectsL1TablePastEndOfFile) {
  Header h = ValidHeader();
  ExpectError(Decode(Bytes(h), 3 * kClusterSize + 8), StatusCode::kCorruption,
              "l1_table_offset 0x30000 + 16 bytes lies past the end of the file");
  h.l1_table_offset = 0xffffffffffff0000ull;  // offset + size overflows
  ExpectError(Decode(Bytes(h)), StatusCode::kCorruption, "lies past the end of the file");
}

TEST(Qcow2Header, RejectsL1TableOverlappingHeader) {
  Header h = ValidHeader();
  h.l1_table_offset = 0;
  ExpectError(Decode(Bytes(h)), StatusCode::kCorruption, "l1_table_offset 0 overlaps the header");
}

TEST(Qcow2Header, AcceptsEmptyL1TableAnywhereAligned) {
  Header h = ValidHeader();
  h.size = 0;
  h.l1_size = 0;
  h.l1_table_offset = 100 * kClusterSize;
  EXPECT_TRUE(Decode(Bytes(h)).ok());
}

TEST(Qcow2Header, RejectsBadRefcountTable) {
  Header h = ValidHeader();
  h.refcount_table_offset = kClusterSize + 512;
  ExpectError(Decode(Bytes(h)), StatusCode::kCorruption,
              "refcount_table_offset 0x10200 is not aligned to the cluster size 65536");
  h = ValidHeader();
  h.refcount_table_offset = 4 * kClusterSize;
  ExpectError(Decode(Bytes(h)), StatusCode::kCorruption,
              "refcount_table_offset 0x40000 + 65536 bytes lies past the end of the file");
  h = ValidHeader();
  h.refcount_table_clusters = 0;
  ExpectError(Decode(Bytes(h)), StatusCode::kCorruption, "refcount_table_clusters is 0");
  h = ValidHeader();
  h.refcount_table_clusters = kMaxRefcountTableBytes / kClusterSize + 1;
  ExpectError(Decode(Bytes(h), 1ull << 40), StatusCode::kCorruption, "refcount table too large");
}

TEST(Qcow2Header, RejectsBadSnapshotTable) {
  Header h = ValidHeader();
  h.nb_snapshots = 1;
  h.snapshots_offset = 3 * kClusterSize + 8;
  ExpectError(Decode(Bytes(h)), StatusCode::kCorruption,
              "snapshots_offset 0x30008 is not aligned to the cluster size 65536");
  h.snapshots_offset = 4 * kClusterSize;
  ExpectError(Decode(Bytes(h)), StatusCode::kCorruption,
              "snapshots_offset 0x40000 + 40 bytes lies past the end of the file");
  h.nb_snapshots = kMaxSnapshots + 1;
  ExpectError(Decode(Bytes(h)), StatusCode::kCorruption, "nb_snapshots 65537 exceeds the limit");
  // Without snapshots the offset is not looked at.
  h.nb_snapshots = 0;
  h.snapshots_offset = 12345;
  EXPECT_TRUE(Decode(Bytes(h)).ok());
}

// ---------------------------------------------------------------------------
// Backing file name and header extensions

TEST(Qcow2Header, RejectsBackingFileNameTooLong) {
  Header h = ValidHeader();
  h.backing_file = "base";
  std::vector<uint8_t> buf = Bytes(h);
  Put32(&buf, 16, 1024);
  ExpectError(Decode(buf), StatusCode::kCorruption, "backing_file_size 1024 exceeds 1023");
}

TEST(Qcow2Header, RejectsBackingFileNameOutsideFirstCluster) {
  Header h = ValidHeader();
  h.backing_file = "base";
  std::vector<uint8_t> buf = Bytes(h);
  Put64(&buf, 8, kClusterSize - 2);
  ExpectError(Decode(buf), StatusCode::kCorruption, "is not inside the first cluster");
  // Inside the cluster but past the end of a short file.
  buf = EncodeInPlace(&h);
  ExpectError(Decode(std::vector<uint8_t>(buf.begin(), buf.begin() + h.backing_file_offset + 2)),
              StatusCode::kCorruption, "truncated header: backing file name");
}

TEST(Qcow2Header, RejectsHeaderExtensionPastFirstCluster) {
  Header h = ValidHeader();
  h.feature_names.clear();
  std::vector<uint8_t> buf = Bytes(h);
  Put32(&buf, 104, 0x11111111);
  Put32(&buf, 108, kClusterSize);
  ExpectError(Decode(buf), StatusCode::kCorruption,
              "header extension 0x11111111 at offset 0x68 has length 65536");
  // An extension header that does not fit before the end of the area.
  buf = Bytes(h);
  Put32(&buf, 104, 0x11111111);
  Put32(&buf, 108, 0);
  Put64(&buf, 8, 110);  // backing name at 110 ends the extension area
  Put32(&buf, 16, 1);
  ExpectError(Decode(buf), StatusCode::kCorruption, "overruns the header extension area");
}

TEST(Qcow2Header, RejectsTruncatedHeaderExtension) {
  Header h = ValidHeader();
  h.feature_names.clear();
  h.unknown_extensions.push_back({0x22222222, std::vector<uint8_t>(64, 1)});
  std::vector<uint8_t> buf = Bytes(h);
  ExpectError(Decode(std::vector<uint8_t>(buf.begin(), buf.begin() + 140)), StatusCode::kCorruption,
              "truncated header extension 0x22222222");
}

TEST(Qcow2Header, RejectsMalformedKnownExtensions) {
  Header h = ValidHeader();
  h.feature_names.clear();
  h.backing_format = "qcow2";
  h.unknown_extensions.push_back({kExtBackingFormat, {'r', 'a', 'w'}});
  ExpectError(Decode(Bytes(h)), StatusCode::kCorruption,
              "duplicate backing format header extension");
  h = ValidHeader();
  h.feature_names.clear();
  h.unknown_extensions.push_back({kExtFeatureTable, std::vector<uint8_t>(50, 0)});
  ExpectError(Decode(Bytes(h)), StatusCode::kCorruption,
              "feature name table length 50 is not a multiple of 48");
}

TEST(Qcow2Header, PreservesUnknownExtensionsByteExact) {
  Header h = ValidHeader();
  h.backing_format = "qcow2";
  h.backing_file = "base";
  h.unknown_extensions.push_back({0xdeadbeef, {1, 2, 3, 4, 5}});
  h.unknown_extensions.push_back({kExtBitmaps, std::vector<uint8_t>(24, 0x5a)});
  h.unknown_extensions.push_back({0x0badf00d, {}});
  const std::vector<uint8_t> first = Bytes(h);
  auto d = Decode(first);
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  ASSERT_EQ(d->unknown_extensions.size(), 3u);
  EXPECT_EQ(d->unknown_extensions[0].type, 0xdeadbeefu);
  EXPECT_EQ(d->unknown_extensions[0].data, (std::vector<uint8_t>{1, 2, 3, 4, 5}));
  EXPECT_EQ(d->unknown_extensions[1].type, kExtBitmaps);
  EXPECT_TRUE(d->has_bitmaps_extension);
  EXPECT_TRUE(d->unknown_extensions[2].data.empty());
  EXPECT_EQ(Bytes(*d), first);
}

TEST(Qcow2Header, PreservesAdditionalHeaderBytes) {
  Header h = ValidHeader();
  std::vector<uint8_t> buf = Bytes(h);
  // Rewrite as header_length 120 with an unknown field at 112..119, followed
  // by an empty extension area.
  std::vector<uint8_t> grown(buf.begin(), buf.begin() + 104);
  grown.resize(kClusterSize, 0);
  Put32(&grown, 100, 120);
  for (int i = 0; i < 8; ++i) grown[112 + i] = static_cast<uint8_t>(0xa0 + i);
  auto d = Decode(grown);
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  EXPECT_EQ(d->header_length, 120u);
  EXPECT_EQ(d->extra_header,
            (std::vector<uint8_t>{0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7}));
  EXPECT_TRUE(d->feature_names.empty());
  EXPECT_EQ(Bytes(*d), grown);
}

TEST(Qcow2Header, DecodesDataFileExtension) {
  Header h = ValidHeader();
  h.data_file = "data.raw";
  auto d = Decode(Bytes(h));
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  EXPECT_EQ(d->data_file, "data.raw");
}

TEST(Qcow2Header, EncodeRejectsHeaderLargerThanCluster) {
  Header h = ValidHeader();
  h.cluster_bits = 9;
  h.size = 0;
  h.l1_size = 0;
  h.l1_table_offset = 3 * 512;
  h.refcount_table_offset = 512;
  h.backing_file = "images/base.qcow2";  // 104 + 8 + 384 + 8 + 17 > 512
  auto r = EncodeHeader(&h);
  ExpectError(r, StatusCode::kNotSupported, "header does not fit in the first cluster");
}

TEST(Qcow2Header, EncodeRejectsV3OnlyFieldsInV2) {
  Header h = ValidHeader();
  h.version = 2;
  h.refcount_order = 5;
  ExpectError(EncodeHeader(&h), StatusCode::kInvalidArgument, "need version 3");
}

TEST(Qcow2Header, DefaultFeatureNamesCoverKnownBits) {
  Header h;
  h.feature_names = DefaultFeatureNames();
  EXPECT_EQ(h.IncompatibleFeatureName(0), "dirty");
  EXPECT_EQ(h.IncompatibleFeatureName(1), "corrupt");
  EXPECT_EQ(h.IncompatibleFeatureName(2), "external data file");
  EXPECT_EQ(h.IncompatibleFeatureName(3), "compression type");
  EXPECT_EQ(h.IncompatibleFeatureName(4), "extended L2 entries");
  EXPECT_EQ(h.IncompatibleFeatureName(5), "unknown feature bit 5");
  ASSERT_EQ(h.feature_names.size(), 8u);
  EXPECT_EQ(h.feature_names[5].type, 1);
  EXPECT_EQ(h.feature_names[5].name, "lazy refcounts");
  EXPECT_EQ(h.feature_names[6].name, "bitmaps");
  EXPECT_EQ(h.feature_names[7].name, "raw external data");
}

}  // namespace
}  // namespace kvblk::qcow2
