// Tests for ParseSize and qcow2/raw image creation (checked with qemu-img).
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

// ---------------------------------------------------------------------------
// ParseSize

namespace kvblk {
namespace {

template <typename T>
void ExpectError(const Result<T>& r, StatusCode code, const std::string& phrase) {
  ASSERT_FALSE(r.ok()) << "expected " << StatusCodeName(code) << " containing '" << phrase << "'";
  EXPECT_EQ(r.status().code(), code) << r.status().ToString();
  EXPECT_NE(r.status().message().find(phrase), std::string::npos) << r.status().ToString();
}

void ExpectError(const Status& s, StatusCode code, const std::string& phrase) {
  ASSERT_FALSE(s.ok()) << "expected " << StatusCodeName(code) << " containing '" << phrase << "'";
  EXPECT_EQ(s.code(), code) << s.ToString();
  EXPECT_NE(s.message().find(phrase), std::string::npos) << s.ToString();
}



TEST(ParseSize, AcceptsBytesAndBinarySuffixes) {
  const std::pair<const char*, uint64_t> cases[] = {
      {"0", 0},           {"512", 512},         {"100b", 100},
      {"100B", 100},      {"1k", 1024},         {"1K", 1024},
      {"3M", 3ull << 20}, {"10g", 10ull << 30}, {"2T", 2ull << 40},
      {"1p", 1ull << 50}, {"15E", 15ull << 60}, {"18446744073709551615", UINT64_MAX},
  };
  for (const auto& [text, want] : cases) {
    auto r = ParseSize(text);
    ASSERT_TRUE(r.ok()) << text << ": " << r.status().ToString();
    EXPECT_EQ(*r, want) << text;
  }
}

TEST(ParseSize, AcceptsDecimalFractionsRoundingDown) {
  EXPECT_EQ(*ParseSize("1.5G"), 3ull << 29);
  EXPECT_EQ(*ParseSize("0.5k"), 512u);
  EXPECT_EQ(*ParseSize("1.1k"), 1126u);  // 1126.4
  EXPECT_EQ(*ParseSize("0.999999999999999999999999E"), (1ull << 60) - 1);
  EXPECT_EQ(*ParseSize("1.0M"), 1ull << 20);
}

TEST(ParseSize, RejectsMalformedNegativeAndOverflowingSizes) {
  for (const char* text : {"", "-1", "abc", "1x", "1kk", " 1", "1 ", "1.", ".5G", "1.5", "1.5b",
                           "16E", "18446744073709551616", "99999999999999999999k", "1,5G"}) {
    ExpectError(ParseSize(text), StatusCode::kInvalidArgument,
                       std::string("invalid size '") + text + "'");
  }
}

// ---------------------------------------------------------------------------
// Image creation, judged by qemu-img

// Runs a shell command; returns its exit status and combined output.
std::pair<int, std::string> RunCommand(const std::string& cmd) {
  std::string out;
  FILE* f = popen((cmd + " 2>&1").c_str(), "r");
  if (f == nullptr) return {-1, "popen failed"};
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), f)) > 0) out.append(buf, n);
  const int status = pclose(f);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

// The text after `"key": ` in qemu-img's JSON, up to the next ',' or newline.
std::string JsonField(const std::string& json, const std::string& key) {
  const std::string needle = "\"" + key + "\": ";
  const size_t p = json.find(needle);
  if (p == std::string::npos) return "<missing " + key + ">";
  const size_t start = p + needle.size();
  const size_t end = json.find_first_of(",\n", start);
  return json.substr(start, end - start);
}

std::vector<uint8_t> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>((std::istreambuf_iterator<char>(in)),
                              std::istreambuf_iterator<char>());
}

class CreateImageTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char dir_template[] = "/tmp/kvblk_create_XXXXXX";
    ASSERT_NE(mkdtemp(dir_template), nullptr);
    dir_ = dir_template;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::string Path(const std::string& name) const { return dir_ + "/" + name; }

  // Asserts that `qemu-img check` finds no problem and returns the JSON of
  // `qemu-img info`.
  std::string CheckAndInfo(const std::string& path, const std::string& fmt = "qcow2") {
    if (fmt != "raw") {  // qemu-img cannot check raw images
      auto [rc, out] = RunCommand("qemu-img check -f " + fmt + " '" + path + "'");
      EXPECT_EQ(rc, 0) << out;
    }
    auto [info_rc, info] = RunCommand("qemu-img info --output=json -f " + fmt + " '" + path + "'");
    EXPECT_EQ(info_rc, 0) << info;
    return info;
  }

  // Asserts that creating an image with `o` fails with `code` and `phrase`,
  // and that neither a new path nor an existing file was touched.
  void ExpectCreateFails(const CreateOptions& o, StatusCode code, const std::string& phrase) {
    ExpectError(CreateImage(Path("new.img"), o), code, phrase);
    EXPECT_FALSE(std::filesystem::exists(Path("new.img")));
    const std::string existing = Path("existing.img");
    { std::ofstream(existing) << "keep me"; }
    ExpectError(CreateImage(existing, o), code, phrase);
    const std::vector<uint8_t> content = ReadFile(existing);
    EXPECT_EQ(std::string(content.begin(), content.end()), "keep me");
  }

  std::string dir_;
};

struct CreateCase {
  uint32_t cluster_size;
  int refcount_bits;
  bool v3;
  uint64_t size;
  bool lazy_refcounts = false;
  bool extended_l2 = false;
  bool zstd = false;
};

TEST_F(CreateImageTest, Qcow2ImagesPassQemuImgCheck) {
  const CreateCase cases[] = {
      {65536, 16, true, 1ull << 30},
      {65536, 16, false, 1ull << 30},
      {512, 1, true, 10ull << 20},
      {4096, 2, true, 100ull << 20},
      {2u << 20, 4, true, 10ull << 30},
      {65536, 8, true, 1ull << 40},
      {65536, 32, true, 3ull << 30},
      {65536, 64, true, 5ull << 30},
      {512, 64, true, 16ull << 30},  // several refcount table clusters
      {65536, 16, true, 1ull << 30, true},
      {65536, 16, true, 1ull << 30, false, true},
      {65536, 16, true, 1ull << 30, false, false, true},
      {65536, 16, true, 0},
      {65536, 16, true, 1000},  // rounded up to 1024
  };
  for (const CreateCase& c : cases) {
    SCOPED_TRACE("cluster " + std::to_string(c.cluster_size) + " refcount_bits " +
                 std::to_string(c.refcount_bits) + " v" + (c.v3 ? "3" : "2") + " size " +
                 std::to_string(c.size));
    CreateOptions o;
    o.size = c.size;
    o.cluster_size = c.cluster_size;
    o.refcount_bits = c.refcount_bits;
    o.compat_v3 = c.v3;
    o.lazy_refcounts = c.lazy_refcounts;
    o.extended_l2 = c.extended_l2;
    o.compression_type = c.zstd ? "zstd" : "zlib";
    const std::string path = Path("img.qcow2");
    ASSERT_TRUE(CreateImage(path, o).ok());
    const uint64_t want_size = (c.size + 511) / 512 * 512;
    const std::string info = CheckAndInfo(path);
    EXPECT_EQ(JsonField(info, "virtual-size"), std::to_string(want_size));
    EXPECT_EQ(JsonField(info, "cluster-size"), std::to_string(c.cluster_size));
    EXPECT_EQ(JsonField(info, "refcount-bits"), std::to_string(c.refcount_bits));
    EXPECT_EQ(JsonField(info, "compat"), c.v3 ? "\"1.1\"" : "\"0.10\"");
    if (c.v3) {
      EXPECT_EQ(JsonField(info, "lazy-refcounts"), c.lazy_refcounts ? "true" : "false");
      EXPECT_EQ(JsonField(info, "extended-l2"), c.extended_l2 ? "true" : "false");
      EXPECT_EQ(JsonField(info, "compression-type"), c.zstd ? "\"zstd\"" : "\"zlib\"");
    }
    // kvblk's own decoder accepts it too, and the file ends at a cluster.
    std::vector<uint8_t> buf = ReadFile(path);
    const uint64_t file_size = buf.size();
    EXPECT_EQ(file_size % c.cluster_size, 0u);
    buf.resize(std::max<size_t>(buf.size(), c.cluster_size));
    auto h = qcow2::DecodeHeader(buf, file_size, path);
    ASSERT_TRUE(h.ok()) << h.status().ToString();
    EXPECT_EQ(h->size, want_size);
    EXPECT_EQ(h->refcount_table_offset, c.cluster_size);
    if (c.cluster_size == 512 && c.refcount_bits == 64) {
      EXPECT_GT(h->refcount_table_clusters, 1u);
    }
  }
}

TEST_F(CreateImageTest, DefaultQcow2LayoutMatchesQemuImg) {
  const std::string ours = Path("ours.qcow2");
  const std::string theirs = Path("theirs.qcow2");
  CreateOptions o;
  o.size = 3ull << 30;
  ASSERT_TRUE(CreateImage(ours, o).ok());
  ASSERT_EQ(RunCommand("qemu-img create -q -f qcow2 '" + theirs + "' 3G").first, 0);
  std::vector<uint8_t> a = ReadFile(ours);
  std::vector<uint8_t> b = ReadFile(theirs);
  ASSERT_GE(a.size(), 4 * 65536u);
  ASSERT_GE(b.size(), 3 * 65536u + 24);
  auto ha = qcow2::DecodeHeader(a, a.size(), ours);
  auto hb = qcow2::DecodeHeader(b, b.size(), theirs);
  ASSERT_TRUE(ha.ok()) << ha.status().ToString();
  ASSERT_TRUE(hb.ok()) << hb.status().ToString();
  EXPECT_EQ(ha->l1_size, hb->l1_size);
  EXPECT_EQ(ha->l1_table_offset, hb->l1_table_offset);
  EXPECT_EQ(ha->refcount_table_offset, hb->refcount_table_offset);
  EXPECT_EQ(ha->refcount_table_clusters, hb->refcount_table_clusters);
  // Refcount table and first refcount block are identical.
  EXPECT_TRUE(std::equal(a.begin() + 65536, a.begin() + 3 * 65536, b.begin() + 65536));
}

TEST_F(CreateImageTest, PacksNarrowRefcountsFromTheLeastSignificantBit) {
  const std::pair<int, std::vector<uint8_t>> cases[] = {
      {1, {0x0f, 0x00}},
      {2, {0x55, 0x00}},
      {4, {0x11, 0x11, 0x00}},
      {8, {1, 1, 1, 1, 0}},
      {16, {0, 1, 0, 1, 0, 1, 0, 1, 0, 0}},
      {64, {0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1}},
  };
  for (const auto& [bits, want] : cases) {
    SCOPED_TRACE("refcount_bits " + std::to_string(bits));
    CreateOptions o;
    o.size = 1 << 20;
    o.refcount_bits = bits;
    const std::string path = Path("r.qcow2");
    ASSERT_TRUE(CreateImage(path, o).ok());
    const std::vector<uint8_t> file = ReadFile(path);
    ASSERT_EQ(file.size(), 4 * 65536u);
    EXPECT_TRUE(std::equal(want.begin(), want.end(), file.begin() + 2 * 65536));
  }
}

TEST_F(CreateImageTest, StoresRelativeBackingFileAndFormat) {
  CreateOptions base;
  base.size = 1 << 20;
  ASSERT_TRUE(CreateImage(Path("base.qcow2"), base).ok());
  CreateOptions o;
  o.size = 2 << 20;
  o.backing_file = "base.qcow2";
  o.backing_format = "qcow2";
  ASSERT_TRUE(CreateImage(Path("top.qcow2"), o).ok());
  const std::string info = CheckAndInfo(Path("top.qcow2"));
  EXPECT_EQ(JsonField(info, "backing-filename"), "\"base.qcow2\"");
  EXPECT_EQ(JsonField(info, "backing-filename-format"), "\"qcow2\"");
  EXPECT_EQ(JsonField(info, "virtual-size"), std::to_string(2 << 20));
}

TEST_F(CreateImageTest, TakesSizeAndFormatFromBackingFile) {
  ASSERT_EQ(RunCommand("qemu-img create -q -f raw '" + Path("base.raw") + "' 3M").first, 0);
  CreateOptions o;
  o.backing_file = "base.raw";
  ASSERT_TRUE(CreateImage(Path("top.qcow2"), o).ok());
  const std::string info = CheckAndInfo(Path("top.qcow2"));
  EXPECT_EQ(JsonField(info, "virtual-size"), std::to_string(3 << 20));
  EXPECT_EQ(JsonField(info, "backing-filename-format"), "\"raw\"");
}

TEST_F(CreateImageTest, RejectsMissingBackingFile) {
  CreateOptions o;
  o.size = 1 << 20;
  o.backing_file = "nonexistent.qcow2";
  o.backing_format = "qcow2";
  ExpectCreateFails(o, StatusCode::kNotFound, "nonexistent.qcow2");
}

TEST_F(CreateImageTest, InvalidOptionsWriteNothing) {
  using Edit = void (*)(CreateOptions&);
  const std::pair<Edit, const char*> cases[] = {
      {[](CreateOptions& o) { o.cluster_size = 1000; }, "cluster size 1000"},
      {[](CreateOptions& o) { o.cluster_size = 256; }, "cluster size 256"},
      {[](CreateOptions& o) { o.cluster_size = 4u << 20; }, "cluster size 4194304"},
      {[](CreateOptions& o) { o.refcount_bits = 3; }, "refcount_bits 3"},
      {[](CreateOptions& o) { o.refcount_bits = 128; }, "refcount_bits 128"},
      {[](CreateOptions& o) { o.compat_v3 = false, o.refcount_bits = 8; },
       "only support refcount_bits 16"},
      {[](CreateOptions& o) { o.compat_v3 = false, o.lazy_refcounts = true; },
       "lazy_refcounts need compat 1.1"},
      {[](CreateOptions& o) { o.compat_v3 = false, o.extended_l2 = true; },
       "extended_l2 needs compat 1.1"},
      {[](CreateOptions& o) { o.compat_v3 = false, o.compression_type = "zstd"; },
       "zstd needs compat 1.1"},
      {[](CreateOptions& o) { o.extended_l2 = true, o.cluster_size = 8192; }, "at least 16k"},
      {[](CreateOptions& o) { o.compression_type = "lz4"; }, "compression_type 'lz4'"},
      {[](CreateOptions& o) { o.backing_format = "raw"; }, "without a backing file"},
      {[](CreateOptions& o) { o.cluster_size = 512, o.size = 1ull << 40; }, "L1 table too big"},
      {[](CreateOptions& o) { o.size = UINT64_MAX; }, "exceeds the maximum"},
      {[](CreateOptions& o) { o.format = "vmdk"; }, "unknown image format 'vmdk'"},
      {[](CreateOptions& o) { o.format = "raw", o.backing_file = "x"; },
       "raw images cannot have a backing file"},
      {[](CreateOptions& o) { o.backing_file = "x", o.preallocation = Preallocation::kMetadata; },
       "preallocation can only be combined with extended_l2"},
  };
  for (const auto& [edit, phrase] : cases) {
    SCOPED_TRACE(phrase);
    CreateOptions o;
    o.size = 1 << 20;
    edit(o);
    ExpectCreateFails(o, StatusCode::kInvalidArgument, phrase);
  }
}

TEST_F(CreateImageTest, RawPreallocationModes) {
  struct stat st;
  CreateOptions o;
  o.format = "raw";
  o.size = 1000;  // rounded up to 1024, as qemu-img does
  ASSERT_TRUE(CreateImage(Path("a.raw"), o).ok());
  ASSERT_EQ(stat(Path("a.raw").c_str(), &st), 0);
  EXPECT_EQ(st.st_size, 1024);

  o.size = 8 << 20;
  ASSERT_TRUE(CreateImage(Path("off.raw"), o).ok());
  ASSERT_EQ(stat(Path("off.raw").c_str(), &st), 0);
  EXPECT_EQ(st.st_size, 8 << 20);
  EXPECT_LT(static_cast<uint64_t>(st.st_blocks) * 512, o.size);  // sparse

  for (Preallocation p : {Preallocation::kFalloc, Preallocation::kFull}) {
    o.preallocation = p;
    const std::string path = Path(p == Preallocation::kFull ? "full.raw" : "falloc.raw");
    ASSERT_TRUE(CreateImage(path, o).ok());
    ASSERT_EQ(stat(path.c_str(), &st), 0);
    EXPECT_EQ(st.st_size, 8 << 20);
    EXPECT_GE(static_cast<uint64_t>(st.st_blocks) * 512, o.size);
    const std::string info = CheckAndInfo(path, "raw");
    EXPECT_EQ(JsonField(info, "virtual-size"), std::to_string(8 << 20));
  }
  const std::vector<uint8_t> full = ReadFile(Path("full.raw"));
  EXPECT_EQ(std::count(full.begin(), full.end(), 0), 8 << 20);
}

}  // namespace
}  // namespace kvblk
