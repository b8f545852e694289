// VhostUserMemory: the front end's memory regions, mapped into this process.
//
// vhost-user describes guest RAM as regions, each with a guest physical
// address, a size, the front end's user (virtual) address for it, and a file
// descriptor plus mmap offset to map it with (SET_MEM_TABLE, ADD_MEM_REG,
// REM_MEM_REG; vhost-user.rst "Memory access"). This class validates the
// regions, maps them (MAP_SHARED, read/write), translates front-end user
// addresses (which SET_VRING_ADDR uses) to guest physical ones, and hands
// the device model the GuestMemoryRegion list.
//
// Lifetime: each mapping is reference-counted. KeepAlive() returns a
// callback object that holds the current mappings; the server passes it as
// VirtioBlkDevice::SetGuestMemory()'s `on_release`, so a mapping is unmapped
// only once neither this table nor any GuestMemory (queue or in-flight
// request) uses it.
//
// Hostile input: sizes and addresses are overflow-checked, regions may not
// overlap in guest or user address space, the descriptor must be a regular
// file (memfd, tmpfs, hugetlbfs) at least mmap_offset + size bytes long, so
// a mapping never reaches past the end of its file at setup. (A front end
// that shrinks the file afterwards can still make accesses fault, as with
// every vhost-user back end.)
//
// Thread-safety: none; the server's loop thread owns it.
#ifndef KVBLK_VIRTIO_VHOST_USER_MEMORY_H_
#define KVBLK_VIRTIO_VHOST_USER_MEMORY_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "kvblk/virtio_blk.h"
#include "virtio/vhost_user_protocol.h"

namespace kvblk::vhost_user {

class VhostUserMemory {
 public:
  // `max_regions`: the most regions ADD_MEM_REG may build up (the value
  // GET_MAX_MEM_SLOTS reports).
  explicit VhostUserMemory(size_t max_regions) : max_regions_(max_regions) {}

  // SET_MEM_TABLE: replaces every region with `regions`, mapping fds[i] for
  // regions[i]. All are validated and mapped before anything changes; on
  // error the table is as before. Errors: kWrongFdCount, kTooManyRegions,
  // kBadRegion, kRegionOverlap, kMmapFailed.
  VuStatus SetTable(const std::vector<MemoryRegionDesc>& regions, std::vector<UniqueFd> fds);
  // ADD_MEM_REG: adds one region. Errors as SetTable; kTooManyRegions past
  // max_regions.
  VuStatus Add(const MemoryRegionDesc& region, UniqueFd fd);
  // REM_MEM_REG: removes the region with this guest address, user address
  // and size (mmap_offset is ignored, as the spec says). kRegionNotFound.
  VuStatus Remove(const MemoryRegionDesc& region);
  // Forgets every region (mappings go once their last user lets go).
  void Clear() { regions_.clear(); }

  bool empty() const { return regions_.empty(); }
  size_t size() const { return regions_.size(); }

  // The guest physical address of front-end user range [uva, uva + len),
  // which must lie inside one region. kAddressNotMapped otherwise.
  VuResult<uint64_t> UserToGuest(uint64_t uva, uint64_t len) const;

  // The regions as the device model wants them.
  std::vector<GuestMemoryRegion> GuestRegions() const;
  // A callback that keeps the current mappings alive for as long as it (or
  // a copy) exists; calling it does nothing further.
  std::function<void()> KeepAlive() const;

 private:
  // One mmap of a front-end file; unmapped on destruction.
  struct Mapping {
    void* base = nullptr;
    size_t length = 0;
    ~Mapping();
  };
  struct Region {
    MemoryRegionDesc desc;
    std::shared_ptr<Mapping> mapping;
    uint8_t* host = nullptr;  // where desc.guest_phys_addr is mapped
  };

  static VuStatus Validate(const MemoryRegionDesc& r);
  static VuResult<Region> Map(const MemoryRegionDesc& r, int fd);
  // kRegionOverlap if any two of `regions` overlap (guest or user space).
  static VuStatus CheckOverlap(const std::vector<Region>& regions);

  size_t max_regions_;
  std::vector<Region> regions_;
};

}  // namespace kvblk::vhost_user

#endif  // KVBLK_VIRTIO_VHOST_USER_MEMORY_H_
