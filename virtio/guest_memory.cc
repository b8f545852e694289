#include "virtio/guest_memory.h"

#include <algorithm>

namespace kvblk {

VirtioResult<std::shared_ptr<const GuestMemory>> GuestMemory::Create(
    std::vector<GuestMemoryRegion> regions, std::function<void()> on_release) {
  for (const GuestMemoryRegion& r : regions) {
    if (r.size == 0 || r.host_addr == nullptr) return VirtioError::kInvalidMemoryLayout;
    if (r.guest_phys_addr + (r.size - 1) < r.guest_phys_addr) {
      return VirtioError::kInvalidMemoryLayout;
    }
    auto host = reinterpret_cast<uintptr_t>(r.host_addr);
    if (host + (r.size - 1) < host) return VirtioError::kInvalidMemoryLayout;
  }
  std::sort(regions.begin(), regions.end(),
            [](const GuestMemoryRegion& a, const GuestMemoryRegion& b) {
              return a.guest_phys_addr < b.guest_phys_addr;
            });
  for (size_t i = 1; i < regions.size(); ++i) {
    const GuestMemoryRegion& prev = regions[i - 1];
    // prev's last byte is prev.gpa + prev.size - 1 (checked above not to wrap).
    if (regions[i].guest_phys_addr <= prev.guest_phys_addr + (prev.size - 1)) {
      return VirtioError::kInvalidMemoryLayout;
    }
  }
  return std::shared_ptr<const GuestMemory>(
      new GuestMemory(std::move(regions), std::move(on_release)));
}

GuestMemory::~GuestMemory() {
  if (on_release_) on_release_();
}

VirtioResult<uint8_t*> GuestMemory::Translate(uint64_t gpa, uint64_t len, bool writable) const {
  // The last region whose start is <= gpa.
  auto it = std::upper_bound(
      regions_.begin(), regions_.end(), gpa,
      [](uint64_t addr, const GuestMemoryRegion& r) { return addr < r.guest_phys_addr; });
  if (it == regions_.begin()) return VirtioError::kAddressOutsideGuestMemory;
  const GuestMemoryRegion& r = *(it - 1);
  uint64_t offset = gpa - r.guest_phys_addr;
  if (offset >= r.size || len > r.size - offset) return VirtioError::kAddressOutsideGuestMemory;
  if (writable && r.read_only) return VirtioError::kGuestMemoryReadOnly;
  return static_cast<uint8_t*>(r.host_addr) + offset;
}

}  // namespace kvblk
