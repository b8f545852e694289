// GuestMemory: the guest's physical address space as the VMM mapped it for us.
//
// A list of regions (guest physical address, size, host pointer), sorted and
// non-overlapping. Nothing in virtio/ touches guest memory except through a
// pointer returned by Translate(), and Translate() hands out a pointer only
// for a range that lies wholly inside one region.
//
// Ownership: GuestMemory does not own the mappings. The transport that made
// them passes an `on_release` callback, run when the last reference to the
// GuestMemory goes away; in-flight requests hold a std::shared_ptr to the
// GuestMemory they were parsed against, so a memory-table change never
// unmaps a buffer under a request that still uses it.
//
// Thread-safety: immutable after Create(); safe to share between threads.
#ifndef KVBLK_VIRTIO_GUEST_MEMORY_H_
#define KVBLK_VIRTIO_GUEST_MEMORY_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "kvblk/virtio_blk.h"
#include "virtio/virtio_error.h"

namespace kvblk {

class GuestMemory {
 public:
  // Validates `regions` (non-empty sizes, non-null host pointers, no gpa or
  // host wrap-around, no two regions overlapping in guest physical space) and
  // sorts them. kInvalidMemoryLayout on any violation.
  static VirtioResult<std::shared_ptr<const GuestMemory>> Create(
      std::vector<GuestMemoryRegion> regions, std::function<void()> on_release = {});

  ~GuestMemory();
  GuestMemory(const GuestMemory&) = delete;
  GuestMemory& operator=(const GuestMemory&) = delete;

  // Returns the host address of guest range [gpa, gpa + len) when the whole
  // range lies inside one region (arithmetic overflow-checked); len 0 needs
  // gpa inside a region. With `writable`, the region must not be read-only.
  // Errors: kAddressOutsideGuestMemory, kGuestMemoryReadOnly.
  VirtioResult<uint8_t*> Translate(uint64_t gpa, uint64_t len, bool writable) const;

  const std::vector<GuestMemoryRegion>& regions() const { return regions_; }

 private:
  GuestMemory(std::vector<GuestMemoryRegion> regions, std::function<void()> on_release)
      : regions_(std::move(regions)), on_release_(std::move(on_release)) {}

  std::vector<GuestMemoryRegion> regions_;  // sorted by guest_phys_addr
  std::function<void()> on_release_;
};

}  // namespace kvblk

#endif  // KVBLK_VIRTIO_GUEST_MEMORY_H_
