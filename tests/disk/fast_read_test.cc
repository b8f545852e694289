// BlockDevice::StartRead and the read fast paths of Qcow2Device and
// RawDevice: the same bytes and errors as Read(), the fast path taken
// exactly where it applies, and short transfers finished the way ReadV
// finishes them.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "disk/qcow2_device.h"
#include "disk/raw_device.h"
#include "kvblk/event_loop.h"
#include "tests/support/test_util.h"

namespace kvblk {
namespace {

using testing::Sh;
using testing::TempDir;

constexpr uint64_t kCluster = 64 * 1024;

std::unique_ptr<BlockDevice> MustOpen(const std::string& path, bool direct = false) {
  OpenOptions o;
  o.read_only = true;
  o.direct = direct;
  auto d = OpenImage(path, o);
  EXPECT_TRUE(d.ok()) << d.status().ToString();
  return d.ok() ? std::move(*d) : nullptr;
}

uint64_t FastReads(BlockDevice* dev) {
  if (auto* q = dynamic_cast<qcow2::Qcow2Device*>(dev)) return q->fast_reads();
  if (auto* r = dynamic_cast<RawDevice*>(dev)) return r->fast_reads();
  ADD_FAILURE() << "neither a qcow2 nor a raw device";
  return 0;
}

// StartRead, waited for on this thread's loop.
Status StartReadSync(BlockDevice* dev, uint64_t offset, const iovec* iov, int iovcnt) {
  struct Wait {
    ReadRequest req;
    bool done = false;
    int calls = 0;
    Status st;
  } w;
  w.req.offset = offset;
  w.req.iov = iov;
  w.req.iovcnt = iovcnt;
  w.req.user = &w;
  w.req.done = [](ReadRequest* r, Status st) {
    auto* self = static_cast<Wait*>(r->user);
    ++self->calls;
    self->st = std::move(st);
    self->done = true;
  };
  dev->StartRead(&w.req);
  EventLoop::Current().RunUntil([&w] { return w.done; });
  EXPECT_EQ(w.calls, 1);
  return w.st;
}

Status StartReadSync(BlockDevice* dev, uint64_t offset, void* buf, size_t len) {
  iovec v{buf, len};
  return StartReadSync(dev, offset, &v, 1);
}

// Reads [offset, offset+len) with Read() and with StartRead(); both must
// succeed with the same bytes, which are returned.
std::vector<uint8_t> ReadBothWays(BlockDevice* dev, uint64_t offset, size_t len) {
  std::vector<uint8_t> a(len, 0xee), b(len, 0xdd);
  Status sa = RunSync(dev->Read(offset, a.data(), len));
  EXPECT_TRUE(sa.ok()) << sa.ToString();
  Status sb = StartReadSync(dev, offset, b.data(), len);
  EXPECT_TRUE(sb.ok()) << sb.ToString();
  EXPECT_EQ(a, b) << "offset " << offset << " length " << len;
  return b;
}

// A request Read() refuses as out of range: StartRead refuses it with the
// same Status.
void ExpectRefusedAsReadRefuses(BlockDevice* dev, uint64_t offset, size_t len) {
  std::vector<uint8_t> buf(len);
  Status by_read = RunSync(dev->Read(offset, buf.data(), buf.size()));
  Status by_start = StartReadSync(dev, offset, buf.data(), buf.size());
  EXPECT_EQ(by_read.code(), StatusCode::kInvalidArgument) << by_read.ToString();
  EXPECT_EQ(by_start.ToString(), by_read.ToString());
}

// A zeroed buffer of `len` bytes aligned for O_DIRECT.
std::unique_ptr<uint8_t, decltype(&free)> AlignedZeros(size_t len) {
  void* p = nullptr;
  if (posix_memalign(&p, 4096, len) != 0) p = nullptr;
  if (p != nullptr) std::memset(p, 0, len);
  return {static_cast<uint8_t*>(p), &free};
}

void ExpectFilled(const std::vector<uint8_t>& buf, size_t from, size_t to, uint8_t want) {
  for (size_t i = from; i < to; ++i) ASSERT_EQ(buf[i], want) << "at byte " << i;
}

// MustOpen, then one read each way at offset 0 so that the first L2 table
// is cached.
std::unique_ptr<BlockDevice> MustOpenWarm(const std::string& path, bool direct = false) {
  auto dev = MustOpen(path, direct);
  if (dev) ReadBothWays(dev.get(), 0, 4096);
  return dev;
}

// Makes image `img` of `format` and `size` whose first `written` bytes
// hold `pattern` (qemu-img and qemu-io).
bool MakeImage(const std::string& img, const std::string& format, const std::string& size,
               const std::string& written, int pattern) {
  if (Sh("qemu-img create -q -f " + format + " " + img + " " + size).exit_code == 0 &&
      Sh("qemu-io -f " + format + " -c 'write -P " + std::to_string(pattern) + " 0 " + written +
         "' " + img)
              .exit_code == 0) {
    return true;
  }
  ADD_FAILURE() << "could not make " << img;
  return false;
}

// A qcow2 image of `size` whose first `written` bytes hold `pattern`,
// opened read-only, with its first L2 table cached (one read each way).
std::unique_ptr<BlockDevice> OpenWarm(const TempDir& dir, const std::string& size,
                                      const std::string& written, int pattern,
                                      bool direct = false) {
  const std::string img = dir.File("a.qcow2");
  return MakeImage(img, "qcow2", size, written, pattern) ? MustOpenWarm(img, direct) : nullptr;
}

TEST(FastRead, MappedReadsTakeTheFastPathOnceTheTableIsCached) {
  TempDir dir;
  const std::string img = dir.File("a.qcow2");
  ASSERT_EQ(Sh("qemu-img create -q -f qcow2 " + img + " 16M").exit_code, 0);
  ASSERT_EQ(Sh("qemu-io -c 'write -P 0x5a 0 256k' " + img).exit_code, 0);
  auto dev = MustOpen(img);
  ASSERT_NE(dev, nullptr);

  // The L2 table is not cached yet: the slow path loads it.
  std::vector<uint8_t> buf(4096);
  ASSERT_TRUE(StartReadSync(dev.get(), 0, buf.data(), buf.size()).ok());
  ExpectFilled(buf, 0, buf.size(), 0x5a);
  EXPECT_EQ(FastReads(dev.get()), 0u);

  // Within one cluster, across a cluster boundary (qemu-io allocated the
  // clusters in order, so they are contiguous on the host), and in three
  // iovec pieces.
  auto one = ReadBothWays(dev.get(), 8192, 4096);
  ExpectFilled(one, 0, one.size(), 0x5a);
  auto across = ReadBothWays(dev.get(), kCluster - 2048, 8192);
  ExpectFilled(across, 0, across.size(), 0x5a);
  std::vector<uint8_t> pieces(3 * 4096);
  iovec iov[3] = {{pieces.data(), 4096}, {pieces.data() + 4096, 4096},
                  {pieces.data() + 8192, 4096}};
  ASSERT_TRUE(StartReadSync(dev.get(), 3 * kCluster, iov, 3).ok());
  ExpectFilled(pieces, 0, pieces.size(), 0x5a);
  EXPECT_EQ(FastReads(dev.get()), 3u);
  EXPECT_TRUE(CloseImage(std::move(dev)).ok());
}

TEST(FastRead, OtherMappingsGoDownTheSlowPathWithTheSameBytes) {
  TempDir dir;
  const std::string base = dir.File("base.qcow2");
  const std::string img = dir.File("top.qcow2");
  ASSERT_EQ(Sh("qemu-img create -q -f qcow2 " + base + " 16M").exit_code, 0);
  ASSERT_EQ(Sh("qemu-io -c 'write -P 0x42 1M 64k' " + base).exit_code, 0);
  ASSERT_EQ(Sh("qemu-img create -q -f qcow2 -F qcow2 -b " + base + " " + img).exit_code, 0);
  // Cluster 5 before cluster 4: not contiguous on the host. A zero cluster
  // at 2M, data at 3M (to read across into the zero cluster at 3M+64k).
  ASSERT_EQ(Sh("qemu-io -c 'write -P 0x05 320k 64k' -c 'write -P 0x04 256k 64k' "
               "-c 'write -z 2M 64k' -c 'write -P 0x33 3M 64k' -c 'write -z 3136k 64k' " +
               img)
                .exit_code,
            0);
  auto dev = MustOpenWarm(img);  // all of these lie in the first L2 table
  ASSERT_NE(dev, nullptr);
  const uint64_t fast_before = FastReads(dev.get());

  auto split = ReadBothWays(dev.get(), 5 * kCluster - 4096, 8192);  // host order broken
  ExpectFilled(split, 0, 4096, 0x04);
  ExpectFilled(split, 4096, 8192, 0x05);
  auto zero = ReadBothWays(dev.get(), 2 * 1024 * 1024, 4096);  // zero cluster
  ExpectFilled(zero, 0, zero.size(), 0);
  auto backing = ReadBothWays(dev.get(), 1024 * 1024 + 4096, 4096);  // from the backing file
  ExpectFilled(backing, 0, backing.size(), 0x42);
  auto none = ReadBothWays(dev.get(), 6 * 1024 * 1024, 4096);  // nowhere in the chain
  ExpectFilled(none, 0, none.size(), 0);
  auto into_zero = ReadBothWays(dev.get(), 3 * 1024 * 1024 + kCluster - 512, 1024);
  ExpectFilled(into_zero, 0, 512, 0x33);
  ExpectFilled(into_zero, 512, 1024, 0);
  EXPECT_EQ(FastReads(dev.get()), fast_before);
  EXPECT_TRUE(CloseImage(std::move(dev)).ok());
}

TEST(FastRead, CompressedClustersGoDownTheSlowPath) {
  TempDir dir;
  const std::string raw = dir.File("a.raw");
  const std::string img = dir.File("c.qcow2");
  ASSERT_EQ(Sh("qemu-img create -q -f raw " + raw + " 4M && qemu-io -f raw -c 'write -P 0x77 0 1M' " +
               raw + " && qemu-img convert -c -O qcow2 " + raw + " " + img)
                .exit_code,
            0);
  auto dev = MustOpenWarm(img);
  ASSERT_NE(dev, nullptr);
  const uint64_t fast_before = FastReads(dev.get());
  auto c = ReadBothWays(dev.get(), kCluster + 100, 5000);
  ExpectFilled(c, 0, c.size(), 0x77);
  EXPECT_EQ(FastReads(dev.get()), fast_before);
  EXPECT_TRUE(CloseImage(std::move(dev)).ok());
}

TEST(FastRead, ARequestPastTheEndFailsAsReadFails) {
  TempDir dir;
  auto dev = OpenWarm(dir, "1M", "1M", 1);
  ASSERT_NE(dev, nullptr);
  ExpectRefusedAsReadRefuses(dev.get(), 1024 * 1024 - 512, 4096);
  EXPECT_TRUE(CloseImage(std::move(dev)).ok());
}

TEST(FastRead, DirectReadsBounceUnalignedBuffersAndSendAlignedOnesFast) {
  TempDir dir;
  auto dev = OpenWarm(dir, "4M", "1M", 0x3c, /*direct=*/true);
  ASSERT_NE(dev, nullptr);
  const uint64_t fast_before = FastReads(dev.get());

  std::vector<uint8_t> storage(8192 + 1);
  uint8_t* odd = storage.data() + 1;  // not aligned for O_DIRECT
  ASSERT_TRUE(StartReadSync(dev.get(), 4096, odd, 4096).ok());
  for (size_t i = 0; i < 4096; ++i) ASSERT_EQ(odd[i], 0x3c) << i;
  EXPECT_EQ(FastReads(dev.get()), fast_before);

  auto aligned = AlignedZeros(8192);
  ASSERT_NE(aligned, nullptr);
  ASSERT_TRUE(StartReadSync(dev.get(), 8192, aligned.get(), 8192).ok());
  for (size_t i = 0; i < 8192; ++i) ASSERT_EQ(aligned.get()[i], 0x3c) << i;
  EXPECT_EQ(FastReads(dev.get()), fast_before + 1);
  EXPECT_TRUE(CloseImage(std::move(dev)).ok());
}

// A data cluster that the host file ends inside of: the kernel transfers
// what is there, and FinishReadV reads on to the end of the file and fills
// the rest with zeros, as ReadV does.
TEST(FastRead, AShortTransferAtTheEndOfTheFileIsFinishedWithZeros) {
  TempDir dir;
  const std::string img = dir.File("a.qcow2");
  ASSERT_EQ(Sh("qemu-img create -q -f qcow2 " + img + " 4M").exit_code, 0);
  ASSERT_EQ(Sh("qemu-io -c 'write -P 0x61 0 64k' -c 'write -P 0x62 64k 64k' " + img).exit_code,
            0);
  // The second data cluster is the last cluster of the file: cut it after
  // 4 KiB + 100 bytes.
  auto map = Sh("qemu-img map --output=json " + img);
  ASSERT_EQ(map.exit_code, 0) << map.output;
  const auto at = map.output.find("\"offset\": ");
  ASSERT_NE(at, std::string::npos) << map.output;
  const uint64_t host0 = std::stoull(map.output.substr(at + 10));
  const uint64_t host1 = host0 + kCluster;  // one mapping: contiguous on the host
  ASSERT_EQ(truncate(img.c_str(), static_cast<off_t>(host1 + 4096 + 100)), 0);

  auto dev = MustOpenWarm(img);
  ASSERT_NE(dev, nullptr);
  const uint64_t fast_before = FastReads(dev.get());
  auto buf = ReadBothWays(dev.get(), kCluster - 4096, 4096 + 8192);
  ExpectFilled(buf, 0, 4096, 0x61);
  ExpectFilled(buf, 4096, 4096 + 4096 + 100, 0x62);
  ExpectFilled(buf, 4096 + 4096 + 100, buf.size(), 0);
  EXPECT_EQ(FastReads(dev.get()), fast_before + 1);
  EXPECT_TRUE(CloseImage(std::move(dev)).ok());
}

// A raw image of 1 MiB whose first 8 KiB hold 9s, opened read-only.
std::unique_ptr<BlockDevice> OpenRaw(const TempDir& dir, bool direct = false) {
  const std::string img = dir.File("a.raw");
  return MakeImage(img, "raw", "1M", "8k", 9) ? MustOpen(img, direct) : nullptr;
}

TEST(FastRead, RawImagesReadFastWithTheBytesReadGives) {
  TempDir dir;
  auto dev = OpenRaw(dir);
  ASSERT_NE(dev, nullptr);
  auto buf = ReadBothWays(dev.get(), 4000, 8192);
  ExpectFilled(buf, 0, 8192 - 4000, 9);
  ExpectFilled(buf, 8192 - 4000, buf.size(), 0);
  // Three iovec pieces, ending at the last byte of the device.
  std::vector<uint8_t> pieces(3 * 512, 0xee);
  iovec iov[3] = {{pieces.data(), 512}, {pieces.data() + 512, 512}, {pieces.data() + 1024, 512}};
  ASSERT_TRUE(StartReadSync(dev.get(), 1024 * 1024 - 1536, iov, 3).ok());
  ExpectFilled(pieces, 0, pieces.size(), 0);
  ASSERT_TRUE(StartReadSync(dev.get(), 512, iov, 3).ok());
  ExpectFilled(pieces, 0, pieces.size(), 9);
  EXPECT_EQ(FastReads(dev.get()), 3u);
  EXPECT_TRUE(CloseImage(std::move(dev)).ok());
}

TEST(FastRead, RawRequestsPastTheEndOrEmptyAreAnsweredByRead) {
  TempDir dir;
  auto dev = OpenRaw(dir);
  ASSERT_NE(dev, nullptr);
  ExpectRefusedAsReadRefuses(dev.get(), 1024 * 1024 - 512, 4096);
  // Past the end by its offset alone (offset + length would wrap).
  ExpectRefusedAsReadRefuses(dev.get(), ~uint64_t{0} - 100, 4096);
  // Empty: succeeds, as Read() does.
  uint8_t byte = 0;
  EXPECT_TRUE(StartReadSync(dev.get(), 4096, &byte, 0).ok());
  EXPECT_EQ(FastReads(dev.get()), 0u);
  EXPECT_TRUE(CloseImage(std::move(dev)).ok());
}

TEST(FastRead, RawDirectReadsBounceUnalignedBuffersAndSendAlignedOnesFast) {
  TempDir dir;
  auto dev = OpenRaw(dir, /*direct=*/true);
  ASSERT_NE(dev, nullptr);
  std::vector<uint8_t> storage(4096 + 1);
  uint8_t* odd = storage.data() + 1;  // not aligned for O_DIRECT
  ASSERT_TRUE(StartReadSync(dev.get(), 4096, odd, 4096).ok());
  for (size_t i = 0; i < 4096; ++i) ASSERT_EQ(odd[i], 9) << i;
  EXPECT_EQ(FastReads(dev.get()), 0u);

  auto aligned = AlignedZeros(8192);
  ASSERT_NE(aligned, nullptr);
  ASSERT_TRUE(StartReadSync(dev.get(), 0, aligned.get(), 8192).ok());
  for (size_t i = 0; i < 8192; ++i) ASSERT_EQ(aligned.get()[i], 9) << i;
  EXPECT_EQ(FastReads(dev.get()), 1u);
  EXPECT_TRUE(CloseImage(std::move(dev)).ok());
}

// The file shrank under the open device: the kernel transfers what is left
// and FileRead hands the short transfer to FinishReadV, which fills the rest
// with zeros, as Read() does.
TEST(FastRead, RawShortTransferAtTheEndOfTheFileIsFinishedWithZeros) {
  TempDir dir;
  auto dev = OpenRaw(dir);
  ASSERT_NE(dev, nullptr);
  ASSERT_EQ(truncate(dir.File("a.raw").c_str(), 4096 + 100), 0);
  auto buf = ReadBothWays(dev.get(), 2048, 8192);
  ExpectFilled(buf, 0, 4096 + 100 - 2048, 9);
  ExpectFilled(buf, 4096 + 100 - 2048, buf.size(), 0);
  EXPECT_EQ(FastReads(dev.get()), 1u);
  EXPECT_TRUE(CloseImage(std::move(dev)).ok());
}

}  // namespace
}  // namespace kvblk
