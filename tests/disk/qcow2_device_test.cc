// Qcow2Device against images made and judged by qemu-img / qemu-io.
#include "disk/qcow2_device.h"

#include <gtest/gtest.h>

#include <cstring>

#include "kvblk/event_loop.h"
#include "kvblk/image_create.h"
#include "tests/support/test_util.h"

namespace kvblk {
namespace {

using testing::Sh;
using testing::TempDir;

std::unique_ptr<BlockDevice> MustOpen(const std::string& path, bool ro = false) {
  OpenOptions o;
  o.read_only = ro;
  auto d = OpenImage(path, o);
  EXPECT_TRUE(d.ok()) << d.status().ToString();
  return d.ok() ? std::move(*d) : nullptr;
}

void ExpectQemuCheckClean(const std::string& path) {
  auto r = Sh("qemu-img check '" + path + "'");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("No errors were found"), std::string::npos) << r.output;
}

TEST(Qcow2Device, ReadsWhatQemuIoWrote) {
  TempDir dir;
  std::string img = dir.File("a.qcow2");
  ASSERT_EQ(Sh("qemu-img create -f qcow2 " + img + " 16M").exit_code, 0);
  ASSERT_EQ(Sh("qemu-io -c 'write -P 0x5a 65536 8192' -c 'write -P 0x11 1000000 3000' " + img)
                .exit_code, 0);
  auto dev = MustOpen(img, true);
  ASSERT_NE(dev, nullptr);
  std::vector<uint8_t> buf(8192);
  ASSERT_TRUE(RunSync(dev->Read(65536, buf.data(), buf.size())).ok());
  for (uint8_t b : buf) ASSERT_EQ(b, 0x5a);
  std::vector<uint8_t> b2(4000);
  ASSERT_TRUE(RunSync(dev->Read(999500, b2.data(), b2.size())).ok());
  for (size_t i = 0; i < b2.size(); ++i) {
    uint64_t off = 999500 + i;
    uint8_t want = (off >= 1000000 && off < 1003000) ? 0x11 : 0;
    ASSERT_EQ(b2[i], want) << "at " << off;
  }
  EXPECT_TRUE(CloseImage(std::move(dev)).ok());
}

TEST(Qcow2Device, WritesThatQemuReadsBackAndChecksClean) {
  TempDir dir;
  std::string img = dir.File("b.qcow2");
  ASSERT_EQ(Sh("qemu-img create -f qcow2 -o cluster_size=4096 " + img + " 8M").exit_code, 0);
  auto dev = MustOpen(img);
  ASSERT_NE(dev, nullptr);
  std::vector<uint8_t> a(10000, 0xab);
  ASSERT_TRUE(RunSync(dev->Write(5000, a.data(), a.size())).ok());
  std::vector<uint8_t> b(4096, 0xcd);
  ASSERT_TRUE(RunSync(dev->Write(8 * 1024 * 1024 - 4096, b.data(), b.size())).ok());
  ASSERT_TRUE(RunSync(dev->Write(6000, b.data(), 100)).ok());  // partial overwrite
  ASSERT_TRUE(CloseImage(std::move(dev)).ok());
  ExpectQemuCheckClean(img);
  auto r = Sh("qemu-io -r -c 'read -P 0xab 5000 1000' -c 'read -P 0xcd 6000 100' "
               "-c 'read -P 0xab 6100 8900' -c 'read -P 0 0 5000' -c 'read -P 0xcd 8384512 4096' " +
               img);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(r.output.find("Pattern verification failed"), std::string::npos) << r.output;
}

TEST(Qcow2Device, RefusesWriteBeyondEndWithInvalidArgument) {
  TempDir dir;
  std::string img = dir.File("c.qcow2");
  ASSERT_EQ(Sh("qemu-img create -f qcow2 " + img + " 1M").exit_code, 0);
  auto dev = MustOpen(img);
  std::vector<uint8_t> a(512);
  Status st = RunSync(dev->Write(1024 * 1024 - 256, a.data(), a.size()));
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("past the end"), std::string::npos) << st.message();
  EXPECT_TRUE(CloseImage(std::move(dev)).ok());
}

}  // namespace
}  // namespace kvblk
