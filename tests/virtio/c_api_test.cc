// An example VMM, as a test: it owns guest RAM and a split virtqueue, drives
// a kvblk device only through the C API (kvblk_c.h), writes to a qcow2 image
// and reads the data back, as a kvmtool-style embedder would.
#include <errno.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "kvblk/image_create.h"
#include "kvblk/kvblk_c.h"
#include "tests/support/qemu_util.h"
#include "tests/support/test_util.h"

namespace {

using kvblk::testing::PatternBytes;
using kvblk::testing::Sh;
using kvblk::testing::TempDir;

constexpr uint64_t kVirtioFVersion1 = 1ull << 32;
constexpr uint64_t kVirtioBlkFRo = 1ull << 5;

// Guest RAM plus queue 0, laid out the way a guest driver would.
class MiniVm {
 public:
  static constexpr uint64_t kRamBase = 0x40000000;
  static constexpr size_t kRamSize = 2 << 20;
  static constexpr uint16_t kQueueSize = 16;

  MiniVm() {
    ram_ = static_cast<uint8_t*>(std::aligned_alloc(4096, kRamSize));
    std::memset(ram_, 0, kRamSize);
    desc_ = Alloc(16 * kQueueSize, 16);
    avail_ = Alloc(6 + 2 * kQueueSize, 2);
    used_ = Alloc(6 + 8 * kQueueSize, 4);
  }
  ~MiniVm() { std::free(ram_); }

  kvblk_mem_region region() const { return {kRamBase, kRamSize, ram_, 0}; }
  uint64_t desc() const { return desc_; }
  uint64_t avail() const { return avail_; }
  uint64_t used() const { return used_; }
  uint8_t* Host(uint64_t gpa) { return ram_ + (gpa - kRamBase); }

  uint64_t Alloc(size_t len, size_t align) {
    next_ = (next_ + align - 1) / align * align;
    uint64_t gpa = kRamBase + next_;
    next_ += len;
    return gpa;
  }

  struct Request {
    uint16_t head;
    uint64_t data;
    uint64_t status;
  };

  // struct virtio_blk_req as three descriptors: header, data, status.
  Request Issue(uint32_t type, uint64_t sector, const void* out, uint32_t len, bool data_in) {
    uint64_t hdr = Alloc(16, 16), data = Alloc(len ? len : 1, 16), status = Alloc(1, 1);
    std::memcpy(Host(hdr), &type, 4);
    std::memset(Host(hdr) + 4, 0, 4);
    std::memcpy(Host(hdr) + 8, &sector, 8);
    if (out != nullptr) std::memcpy(Host(data), out, len);
    *Host(status) = 0xff;
    uint16_t d = next_desc_;
    next_desc_ = static_cast<uint16_t>((next_desc_ + 3) % (kQueueSize / 3 * 3));
    WriteDesc(d, hdr, 16, 1, d + 1);
    WriteDesc(d + 1, data, len, static_cast<uint16_t>(1 | (data_in ? 2 : 0)), d + 2);
    WriteDesc(d + 2, status, 1, 2, 0);
    uint16_t idx;
    std::memcpy(&idx, Host(avail_ + 2), 2);
    std::memcpy(Host(avail_ + 4 + 2 * (idx % kQueueSize)), &d, 2);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    ++idx;
    std::memcpy(Host(avail_ + 2), &idx, 2);
    return {d, data, status};
  }

  uint16_t UsedIdx() {
    uint16_t v;
    std::memcpy(&v, Host(used_ + 2), 2);
    return v;
  }

 private:
  void WriteDesc(uint16_t i, uint64_t addr, uint32_t len, uint16_t flags, uint16_t next) {
    uint8_t* p = Host(desc_ + 16 * i);
    std::memcpy(p, &addr, 8);
    std::memcpy(p + 8, &len, 4);
    std::memcpy(p + 12, &flags, 2);
    std::memcpy(p + 14, &next, 2);
  }

  uint8_t* ram_;
  size_t next_ = 0;
  uint64_t desc_, avail_, used_;
  uint16_t next_desc_ = 0;
};

void CountIrq(void* opaque, int queue) {
  if (queue == 0) ++*static_cast<int*>(opaque);
}

// Makes an empty qcow2 image of `size` bytes (64 KiB clusters) at `path`.
bool CreateQcow2(const std::string& path, uint64_t size) {
  kvblk::CreateOptions co;
  co.format = "qcow2";
  co.size = size;
  return kvblk::CreateImage(path, co).ok();
}

TEST(CApi, VmmWritesAndReadsBackThroughAQcow2Image) {
  TempDir dir;
  std::string path = dir.File("vm.qcow2");
  ASSERT_TRUE(CreateQcow2(path, 4 << 20));

  kvblk_image* img = nullptr;
  ASSERT_EQ(kvblk_open(path.c_str(), 0, nullptr, &img), 0) << kvblk_last_error();
  EXPECT_EQ(kvblk_image_size(img), 4u << 20);
  kvblk_dev* dev = nullptr;
  ASSERT_EQ(kvblk_dev_create(img, 1, &dev), 0) << kvblk_last_error();
  EXPECT_EQ(kvblk_dev_num_queues(dev), 1u);

  // Feature negotiation: a legacy driver is refused.
  uint64_t features = kvblk_dev_features(dev);
  ASSERT_TRUE(features & kVirtioFVersion1);
  EXPECT_EQ(kvblk_dev_set_features(dev, features & ~kVirtioFVersion1), -EINVAL);
  EXPECT_NE(std::string(kvblk_last_error()).find("LegacyDriverNotSupported"), std::string::npos);
  ASSERT_EQ(kvblk_dev_set_features(dev, features), 0);

  uint64_t capacity = 0;
  ASSERT_EQ(kvblk_dev_config_read(dev, 0, &capacity, 8), 0);
  EXPECT_EQ(capacity, (4u << 20) / 512);
  uint8_t byte = 0;
  EXPECT_EQ(kvblk_dev_config_read(dev, kvblk_dev_config_size(dev), &byte, 1), -EINVAL);
  EXPECT_EQ(kvblk_dev_config_write(dev, 0, &byte, 1), -EINVAL);

  MiniVm vm;
  kvblk_mem_region region = vm.region();
  ASSERT_EQ(kvblk_dev_set_memory(dev, &region, 1), 0);
  EXPECT_EQ(kvblk_dev_set_queue(dev, 0, 12, vm.desc(), vm.avail(), vm.used()), -EINVAL);
  EXPECT_EQ(kvblk_dev_set_queue(dev, 1, 16, vm.desc(), vm.avail(), vm.used()), -EINVAL);
  ASSERT_EQ(kvblk_dev_set_queue(dev, 0, MiniVm::kQueueSize, vm.desc(), vm.avail(), vm.used()), 0)
      << kvblk_last_error();
  int irqs = 0;
  kvblk_dev_set_irq_callback(dev, CountIrq, &irqs);

  // Write 64 KiB at sector 128, then read it back.
  std::vector<uint8_t> payload = PatternBytes(65536, 42);
  auto w = vm.Issue(1 /*OUT*/, 128, payload.data(), 65536, false);
  ASSERT_EQ(kvblk_dev_kick(dev, 0), 0);
  EXPECT_EQ(kvblk_dev_run(dev, -1), 0);
  EXPECT_EQ(*vm.Host(w.status), 0);
  EXPECT_EQ(irqs, 1);
  auto r = vm.Issue(0 /*IN*/, 128, nullptr, 65536, true);
  ASSERT_EQ(kvblk_dev_kick(dev, 0), 0);
  EXPECT_EQ(kvblk_dev_run(dev, -1), 0);
  EXPECT_EQ(*vm.Host(r.status), 0);
  EXPECT_EQ(std::memcmp(vm.Host(r.data), payload.data(), payload.size()), 0);

  // GET_ID: the serial derived from the image path.
  auto id = vm.Issue(8 /*GET_ID*/, 0, nullptr, 20, true);
  ASSERT_EQ(kvblk_dev_kick(dev, 0), 0);
  kvblk_dev_run(dev, -1);
  EXPECT_EQ(*vm.Host(id.status), 0);
  EXPECT_EQ(std::string(reinterpret_cast<char*>(vm.Host(id.data)), 6), "kvblk-");

  // A notification from another thread (a vCPU) is picked up by the loop.
  auto f = vm.Issue(4 /*FLUSH*/, 0, nullptr, 0, false);
  std::thread vcpu([&] { EXPECT_EQ(kvblk_dev_kick(dev, 0), 0); });
  vcpu.join();
  while (vm.UsedIdx() != 4) kvblk_dev_run(dev, 100);
  EXPECT_EQ(*vm.Host(f.status), 0);
  EXPECT_EQ(kvblk_dev_needs_reset(dev), 0);

  // The image cannot be closed under a live device.
  EXPECT_EQ(kvblk_close(img), -EBUSY);
  kvblk_dev_destroy(dev);
  ASSERT_EQ(kvblk_close(img), 0) << kvblk_last_error();

  // QEMU sees the data, and the image is clean.
  auto check = Sh("qemu-img check '" + path + "'");
  EXPECT_EQ(check.exit_code, 0) << check.output;
  std::string raw = dir.File("vm.raw");
  ASSERT_EQ(Sh("qemu-img convert -O raw '" + path + "' '" + raw + "'").exit_code, 0);
  auto bytes = kvblk::testing::ReadFileBytes(raw);
  ASSERT_EQ(bytes.size(), 4u << 20);
  EXPECT_TRUE(std::equal(payload.begin(), payload.end(), bytes.begin() + 128 * 512));
}

TEST(CApi, ReadOnlyImageOffersRoAndRefusesWrites) {
  TempDir dir;
  std::string path = dir.File("ro.raw");
  ASSERT_EQ(Sh("truncate -s 1M '" + path + "'").exit_code, 0);
  kvblk_image* img = nullptr;
  ASSERT_EQ(kvblk_open(path.c_str(), 1, "raw", &img), 0) << kvblk_last_error();
  kvblk_dev* dev = nullptr;
  ASSERT_EQ(kvblk_dev_create(img, 2, &dev), 0);
  uint64_t features = kvblk_dev_features(dev);
  EXPECT_TRUE(features & kVirtioBlkFRo);
  ASSERT_EQ(kvblk_dev_set_features(dev, features), 0);
  uint16_t num_queues = 0;
  ASSERT_EQ(kvblk_dev_config_read(dev, 34, &num_queues, 2), 0);
  EXPECT_EQ(num_queues, 2);

  MiniVm vm;
  kvblk_mem_region region = vm.region();
  ASSERT_EQ(kvblk_dev_set_memory(dev, &region, 1), 0);
  ASSERT_EQ(kvblk_dev_set_queue(dev, 0, MiniVm::kQueueSize, vm.desc(), vm.avail(), vm.used()), 0);
  std::vector<uint8_t> payload(512, 0xab);
  auto w = vm.Issue(1 /*OUT*/, 0, payload.data(), 512, false);
  kvblk_dev_kick(dev, 0);
  kvblk_dev_run(dev, -1);
  EXPECT_EQ(*vm.Host(w.status), 1);  // VIRTIO_BLK_S_IOERR
  auto r = vm.Issue(0 /*IN*/, 0, nullptr, 512, true);
  kvblk_dev_kick(dev, 0);
  kvblk_dev_run(dev, -1);
  EXPECT_EQ(*vm.Host(r.status), 0);
  EXPECT_EQ(*vm.Host(r.data), 0);

  EXPECT_EQ(kvblk_dev_reset(dev), 0);
  EXPECT_EQ(kvblk_dev_kick(dev, 7), -EINVAL);
  kvblk_dev_destroy(dev);
  EXPECT_EQ(kvblk_close(img), 0);
}

// The descriptor of `path` open in this process, or -1.
int OpenFdOf(const std::string& path) {
  for (int fd = 0; fd < 4096; ++fd) {
    char link[PATH_MAX];
    ssize_t n = readlink(("/proc/self/fd/" + std::to_string(fd)).c_str(), link, sizeof(link) - 1);
    if (n > 0 && std::string(link, static_cast<size_t>(n)) == path) return fd;
  }
  return -1;
}

// Whether descriptor `fd` was opened with O_DIRECT (/proc/self/fdinfo).
bool FdIsDirect(int fd) {
  std::vector<uint8_t> bytes =
      kvblk::testing::ReadFileBytes("/proc/self/fdinfo/" + std::to_string(fd));
  std::string info(bytes.begin(), bytes.end());
  size_t at = info.find("flags:");
  if (at == std::string::npos) return false;
  return (std::strtoul(info.c_str() + at + 6, nullptr, 8) & O_DIRECT) != 0;
}

// kvblk_open_with: O_DIRECT and the L2 cache size reach the image, and a VMM
// writes and reads back through it (the guest's buffers are not aligned
// for O_DIRECT: kvblk bounces them). kvblk_open keeps the defaults.
TEST(CApi, OpenWithOptionsSetsDirectIoAndTheL2Cache) {
  TempDir dir;
  std::string path = dir.File("big.qcow2");
  ASSERT_TRUE(CreateQcow2(path, uint64_t{8} << 30));  // 16 L2 tables of 64 KiB
  char* real = realpath(path.c_str(), nullptr);
  ASSERT_NE(real, nullptr);
  const std::string canonical = real;
  free(real);

  kvblk_image* img = nullptr;
  ASSERT_EQ(kvblk_open(path.c_str(), 0, nullptr, &img), 0) << kvblk_last_error();
  EXPECT_EQ(kvblk_image_l2_cache_size(img), 1u << 20);
  int fd = OpenFdOf(canonical);
  ASSERT_GE(fd, 0);
  EXPECT_FALSE(FdIsDirect(fd));
  ASSERT_EQ(kvblk_close(img), 0) << kvblk_last_error();

  kvblk_open_options o;
  std::memset(&o, 0, sizeof(o));
  o.size = sizeof(o);
  o.direct = 1;
  o.l2_cache_bytes = 200 << 10;  // three whole tables
  ASSERT_EQ(kvblk_open_with(path.c_str(), &o, &img), 0) << kvblk_last_error();
  EXPECT_EQ(kvblk_image_l2_cache_size(img), 3u << 16);
  fd = OpenFdOf(canonical);
  ASSERT_GE(fd, 0);
  EXPECT_TRUE(FdIsDirect(fd));

  kvblk_dev* dev = nullptr;
  ASSERT_EQ(kvblk_dev_create(img, 1, &dev), 0) << kvblk_last_error();
  ASSERT_EQ(kvblk_dev_set_features(dev, kvblk_dev_features(dev)), 0) << kvblk_last_error();
  MiniVm vm;
  kvblk_mem_region region = vm.region();
  ASSERT_EQ(kvblk_dev_set_memory(dev, &region, 1), 0);
  ASSERT_EQ(kvblk_dev_set_queue(dev, 0, MiniVm::kQueueSize, vm.desc(), vm.avail(), vm.used()), 0)
      << kvblk_last_error();
  std::vector<uint8_t> payload(65536, 0x5a);
  // Sector 2^23, at 4 GiB: the 9th L2 table.
  auto w = vm.Issue(1 /*OUT*/, uint64_t{1} << 23, payload.data(), 65536, false);
  ASSERT_EQ(kvblk_dev_kick(dev, 0), 0);
  EXPECT_EQ(kvblk_dev_run(dev, -1), 0);
  EXPECT_EQ(*vm.Host(w.status), 0);
  auto r = vm.Issue(0 /*IN*/, uint64_t{1} << 23, nullptr, 65536, true);
  ASSERT_EQ(kvblk_dev_kick(dev, 0), 0);
  EXPECT_EQ(kvblk_dev_run(dev, -1), 0);
  EXPECT_EQ(*vm.Host(r.status), 0);
  EXPECT_EQ(std::memcmp(vm.Host(r.data), payload.data(), payload.size()), 0);
  kvblk_dev_destroy(dev);
  ASSERT_EQ(kvblk_close(img), 0) << kvblk_last_error();

  auto check = Sh("qemu-img check '" + path + "'");
  EXPECT_EQ(check.exit_code, 0) << check.output;
  auto io = Sh("qemu-io -f qcow2 -c 'read -P 0x5a 4G 64k' '" + path + "'");
  EXPECT_EQ(io.exit_code, 0) << io.output;
}

TEST(CApi, OpenWithRefusesBadOptions) {
  TempDir dir;
  std::string path = dir.File("d.qcow2");
  ASSERT_TRUE(CreateQcow2(path, 1 << 20));
  kvblk_image* img = nullptr;
  kvblk_open_options o;
  std::memset(&o, 0, sizeof(o));
  o.size = sizeof(o);
  EXPECT_EQ(kvblk_open_with(path.c_str(), nullptr, &img), -EINVAL);
  EXPECT_EQ(kvblk_open_with(nullptr, &o, &img), -EINVAL);
  o.size = sizeof(o) - 8;
  EXPECT_EQ(kvblk_open_with(path.c_str(), &o, &img), -EINVAL);
  EXPECT_NE(std::string(kvblk_last_error()).find("options->size"), std::string::npos)
      << kvblk_last_error();
  o.size = sizeof(o);
  o.l2_cache_bytes = (uint64_t{64} << 30) + 1;
  EXPECT_EQ(kvblk_open_with(path.c_str(), &o, &img), -EINVAL);
  EXPECT_NE(std::string(kvblk_last_error()).find("64 GiB"), std::string::npos)
      << kvblk_last_error();
  EXPECT_EQ(img, nullptr);
  o.l2_cache_bytes = 0;
  o.format = "raw";
  o.read_only = 1;
  ASSERT_EQ(kvblk_open_with(path.c_str(), &o, &img), 0) << kvblk_last_error();
  EXPECT_EQ(kvblk_image_l2_cache_size(img), 0u);  // opened as raw: no L2 cache
  EXPECT_EQ(kvblk_close(img), 0) << kvblk_last_error();
}

TEST(CApi, OpenReportsMissingFilesAsErrno) {
  kvblk_image* img = nullptr;
  EXPECT_EQ(kvblk_open("/nonexistent/kvblk/disk.qcow2", 0, nullptr, &img), -ENOENT);
  EXPECT_STRNE(kvblk_last_error(), "");
  EXPECT_EQ(kvblk_open(nullptr, 0, nullptr, &img), -EINVAL);
}

// kvblk_open's other documented errors: an image feature kvblk does not
// implement is -ENOTSUP, a corrupt image -EINVAL; each with a description.
TEST(CApi, OpenReportsUnsupportedAndCorruptImages) {
  TempDir dir;
  const std::string path = dir.File("disk.qcow2");
  ASSERT_TRUE(CreateQcow2(path, 1 << 20));
  const std::vector<uint8_t> good = kvblk::testing::ReadFileBytes(path);
  ASSERT_GE(good.size(), 512u);

  std::vector<uint8_t> b = good;
  b[72] |= 0x80;  // incompatible_features bit 63 (big-endian u64 at 72)
  kvblk::testing::WriteFileBytes(path, b);
  kvblk_image* img = nullptr;
  EXPECT_EQ(kvblk_open(path.c_str(), 0, "qcow2", &img), -ENOTSUP) << kvblk_last_error();
  EXPECT_EQ(img, nullptr);
  EXPECT_STRNE(kvblk_last_error(), "");

  b = good;
  b[47] |= 0x01;  // l1_table_offset (u64 at 40) no longer cluster-aligned
  kvblk::testing::WriteFileBytes(path, b);
  EXPECT_EQ(kvblk_open(path.c_str(), 0, "qcow2", &img), -EINVAL) << kvblk_last_error();
  EXPECT_EQ(img, nullptr);
  EXPECT_NE(std::string(kvblk_last_error()).find("Corruption"), std::string::npos)
      << kvblk_last_error();
}

// kvblk_c.h promises -EACCES for a file the caller may not open: the errno
// behind the failure, not the read-only status code it maps to. A sysfs
// attribute without a store method refuses a writable open with EACCES even
// for root (who passes every permission bit), so the test can run as root.
TEST(CApi, OpenReportsPermissionDeniedAsEacces) {
  const char* kNoStore = "/sys/kernel/uevent_seqnum";
  const int fd = ::open(kNoStore, O_RDWR);
  if (fd >= 0) ::close(fd);
  ASSERT_LT(fd, 0) << kNoStore << " opened for writing; the test needs a file that refuses it";
  ASSERT_EQ(errno, EACCES) << kNoStore << ": " << std::strerror(errno);
  kvblk_image* img = nullptr;
  EXPECT_EQ(kvblk_open(kNoStore, 0, "raw", &img), -EACCES) << kvblk_last_error();
  EXPECT_EQ(img, nullptr);
  EXPECT_NE(std::string(kvblk_last_error()).find("ermission denied"), std::string::npos)
      << kvblk_last_error();
}

}  // namespace
