// VhostUserMemory: validating and mapping the front end's regions,
// translating ring addresses, and keeping mappings alive for the device.
#include "virtio/vhost_user_memory.h"

#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>

namespace kvblk::vhost_user {
namespace {

constexpr uint64_t kSize = 1 << 20;

UniqueFd MemFd(uint64_t size, uint8_t fill = 0) {
  UniqueFd fd(memfd_create("vhost-user-memory-test", MFD_CLOEXEC));
  EXPECT_EQ(ftruncate(fd.get(), static_cast<off_t>(size)), 0);
  if (fill != 0) {
    std::vector<uint8_t> bytes(size, fill);
    EXPECT_EQ(pwrite(fd.get(), bytes.data(), bytes.size(), 0), static_cast<ssize_t>(size));
  }
  return fd;
}

std::vector<UniqueFd> Fds(UniqueFd a) {
  std::vector<UniqueFd> v;
  v.push_back(std::move(a));
  return v;
}

TEST(VhostUserMemory, MapsRegionsAndTranslatesUserAddresses) {
  VhostUserMemory mem(8);
  UniqueFd fd = MemFd(2 * kSize, 0x5a);
  // The second half of the file, at guest 0x100000, user 0x7000'0000.
  MemoryRegionDesc r{0x100000, kSize, 0x70000000, kSize};
  ASSERT_TRUE(mem.SetTable({r}, Fds(UniqueFd(dup(fd.get())))).ok());
  EXPECT_EQ(mem.size(), 1u);
  EXPECT_EQ(*mem.UserToGuest(0x70000000, 16), 0x100000u);
  EXPECT_EQ(*mem.UserToGuest(0x70000000 + kSize - 8, 8), 0x100000u + kSize - 8);
  EXPECT_EQ(mem.UserToGuest(0x70000000 + kSize - 8, 9).error(), VhostUserError::kAddressNotMapped);
  EXPECT_EQ(mem.UserToGuest(0x6fffffff, 1).error(), VhostUserError::kAddressNotMapped);
  EXPECT_EQ(mem.UserToGuest(0x100000, 1).error(), VhostUserError::kAddressNotMapped);  // a gpa

  auto regions = mem.GuestRegions();
  ASSERT_EQ(regions.size(), 1u);
  EXPECT_EQ(regions[0].guest_phys_addr, 0x100000u);
  EXPECT_EQ(regions[0].size, kSize);
  // The host pointer maps the file at mmap_offset: writes land there.
  static_cast<uint8_t*>(regions[0].host_addr)[0] = 0xa5;
  uint8_t b = 0;
  ASSERT_EQ(pread(fd.get(), &b, 1, kSize), 1);
  EXPECT_EQ(b, 0xa5);
  ASSERT_EQ(pread(fd.get(), &b, 1, kSize - 1), 1);
  EXPECT_EQ(b, 0x5a);
}

TEST(VhostUserMemory, RejectsBadRegions) {
  VhostUserMemory mem(8);
  // Zero size, and address wrap-around in each space.
  EXPECT_EQ(mem.SetTable({{0, 0, 0, 0}}, Fds(MemFd(kSize))).error(), VhostUserError::kBadRegion);
  EXPECT_EQ(mem.SetTable({{~uint64_t{0} - 10, kSize, 0, 0}}, Fds(MemFd(kSize))).error(),
            VhostUserError::kBadRegion);
  EXPECT_EQ(mem.SetTable({{0, kSize, ~uint64_t{0} - 10, 0}}, Fds(MemFd(kSize))).error(),
            VhostUserError::kBadRegion);
  EXPECT_EQ(mem.SetTable({{0, kSize, 0, ~uint64_t{0} - 10}}, Fds(MemFd(kSize))).error(),
            VhostUserError::kBadRegion);
  // Longer than the file behind it (accesses would fault).
  EXPECT_EQ(mem.SetTable({{0, 2 * kSize, 0, 0}}, Fds(MemFd(kSize))).error(),
            VhostUserError::kBadRegion);
  EXPECT_EQ(mem.SetTable({{0, kSize, 0, 4096}}, Fds(MemFd(kSize))).error(),
            VhostUserError::kBadRegion);
  // Not a regular file.
  int p[2];
  ASSERT_EQ(pipe(p), 0);
  close(p[1]);
  EXPECT_EQ(mem.SetTable({{0, 4096, 0, 0}}, Fds(UniqueFd(p[0]))).error(),
            VhostUserError::kBadRegion);
  // Descriptor count.
  EXPECT_EQ(mem.SetTable({{0, 4096, 0, 0}}, {}).error(), VhostUserError::kWrongFdCount);
  EXPECT_TRUE(mem.empty());  // nothing changed along the way
}

TEST(VhostUserMemory, RejectsOverlapInGuestOrUserSpace) {
  VhostUserMemory mem(8);
  UniqueFd fd = MemFd(2 * kSize);
  auto two = [&] {
    std::vector<UniqueFd> v;
    v.emplace_back(dup(fd.get()));
    v.emplace_back(dup(fd.get()));
    return v;
  };
  EXPECT_EQ(mem.SetTable({{0, kSize, 0x10000000, 0}, {kSize - 4096, kSize, 0x20000000, 0}}, two())
                .error(),
            VhostUserError::kRegionOverlap);
  EXPECT_EQ(mem.SetTable({{0, kSize, 0x10000000, 0}, {kSize, kSize, 0x10000000 + 4096, 0}}, two())
                .error(),
            VhostUserError::kRegionOverlap);
  EXPECT_TRUE(
      mem.SetTable({{0, kSize, 0x10000000, 0}, {kSize, kSize, 0x10000000 + kSize, kSize}}, two())
          .ok());
  EXPECT_EQ(mem.size(), 2u);
}

TEST(VhostUserMemory, AddAndRemoveRespectTheSlotLimit) {
  VhostUserMemory mem(2);
  UniqueFd fd = MemFd(4 * kSize);
  MemoryRegionDesc a{0, kSize, 0x10000000, 0};
  MemoryRegionDesc b{kSize, kSize, 0x20000000, kSize};
  MemoryRegionDesc c{2 * kSize, kSize, 0x30000000, 2 * kSize};
  ASSERT_TRUE(mem.Add(a, UniqueFd(dup(fd.get()))).ok());
  EXPECT_EQ(mem.Add(a, UniqueFd(dup(fd.get()))).error(), VhostUserError::kRegionOverlap);
  ASSERT_TRUE(mem.Add(b, UniqueFd(dup(fd.get()))).ok());
  EXPECT_EQ(mem.Add(c, UniqueFd(dup(fd.get()))).error(), VhostUserError::kTooManyRegions);
  EXPECT_EQ(mem.Add(c, UniqueFd()).error(), VhostUserError::kWrongFdCount);
  // Removal matches guest address, user address and size; mmap_offset is ignored.
  MemoryRegionDesc b_other_offset = b;
  b_other_offset.mmap_offset = 12345;
  ASSERT_TRUE(mem.Remove(b_other_offset).ok());
  EXPECT_EQ(mem.Remove(b).error(), VhostUserError::kRegionNotFound);
  MemoryRegionDesc a_other_size = a;
  a_other_size.memory_size = 4096;
  EXPECT_EQ(mem.Remove(a_other_size).error(), VhostUserError::kRegionNotFound);
  ASSERT_TRUE(mem.Add(c, UniqueFd(dup(fd.get()))).ok());
  EXPECT_EQ(*mem.UserToGuest(0x30000000 + 10, 1), 2 * kSize + 10);
  EXPECT_EQ(mem.UserToGuest(0x20000000, 1).error(), VhostUserError::kAddressNotMapped);
}

TEST(VhostUserMemory, KeepAliveHoldsMappingsAfterTheTableForgetsThem) {
  VhostUserMemory mem(8);
  UniqueFd fd = MemFd(kSize);
  ASSERT_TRUE(mem.SetTable({{0, kSize, 0x10000000, 0}}, Fds(UniqueFd(dup(fd.get())))).ok());
  auto regions = mem.GuestRegions();
  std::function<void()> keep = mem.KeepAlive();
  mem.Clear();
  EXPECT_TRUE(mem.empty());
  // Still mapped: the device's GuestMemory would hold `keep`.
  static_cast<uint8_t*>(regions[0].host_addr)[100] = 7;
  uint8_t b = 0;
  ASSERT_EQ(pread(fd.get(), &b, 1, 100), 1);
  EXPECT_EQ(b, 7);
  keep = nullptr;  // now it goes
}

}  // namespace
}  // namespace kvblk::vhost_user
