#include "virtio/vhost_user_memory.h"

#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <limits>

namespace kvblk::vhost_user {
namespace {

// [a, a + a_len) and [b, b + b_len) intersect; lengths are non-zero and the
// ends do not wrap (checked by Validate).
bool Intersects(uint64_t a, uint64_t a_len, uint64_t b, uint64_t b_len) {
  return a < b + b_len && b < a + a_len;
}

bool IsPowerOfTwo(uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

}  // namespace

VhostUserMemory::Mapping::~Mapping() {
  if (base != nullptr) munmap(base, length);
}

VuStatus VhostUserMemory::Validate(const MemoryRegionDesc& r) {
  constexpr uint64_t kMax = std::numeric_limits<uint64_t>::max();
  if (r.memory_size == 0) return VhostUserError::kBadRegion;
  if (r.guest_phys_addr > kMax - r.memory_size) return VhostUserError::kBadRegion;
  if (r.userspace_addr > kMax - r.memory_size) return VhostUserError::kBadRegion;
  if (r.mmap_offset > kMax - r.memory_size) return VhostUserError::kBadRegion;
  return {};
}

VuResult<VhostUserMemory::Region> VhostUserMemory::Map(const MemoryRegionDesc& r, int fd) {
  if (VuStatus st = Validate(r); !st.ok()) return st.error();
  struct stat sb;
  if (fstat(fd, &sb) < 0 || !S_ISREG(sb.st_mode)) return VhostUserError::kBadRegion;
  const uint64_t end = r.mmap_offset + r.memory_size;
  if (sb.st_size < 0 || static_cast<uint64_t>(sb.st_size) < end) {
    return VhostUserError::kBadRegion;
  }
  // Map from an offset aligned to the file's block size (the huge page size
  // on hugetlbfs, where mmap offsets must be huge-page aligned).
  uint64_t align = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  if (sb.st_blksize > 0 && IsPowerOfTwo(static_cast<uint64_t>(sb.st_blksize)) &&
      static_cast<uint64_t>(sb.st_blksize) > align) {
    align = static_cast<uint64_t>(sb.st_blksize);
  }
  const uint64_t map_offset = r.mmap_offset & ~(align - 1);
  const uint64_t delta = r.mmap_offset - map_offset;
  const uint64_t length = delta + r.memory_size;  // <= end, no overflow
  if (length > std::numeric_limits<size_t>::max() ||
      map_offset > static_cast<uint64_t>(std::numeric_limits<off_t>::max())) {
    return VhostUserError::kBadRegion;
  }
  void* base = mmap(nullptr, static_cast<size_t>(length), PROT_READ | PROT_WRITE, MAP_SHARED, fd,
                    static_cast<off_t>(map_offset));
  if (base == MAP_FAILED) return VhostUserError::kMmapFailed;
  auto mapping = std::make_shared<Mapping>();
  mapping->base = base;
  mapping->length = static_cast<size_t>(length);
  Region region;
  region.desc = r;
  region.mapping = std::move(mapping);
  region.host = static_cast<uint8_t*>(base) + delta;
  return region;
}

VuStatus VhostUserMemory::CheckOverlap(const std::vector<Region>& regions) {
  for (size_t i = 0; i < regions.size(); ++i) {
    for (size_t j = i + 1; j < regions.size(); ++j) {
      const MemoryRegionDesc& a = regions[i].desc;
      const MemoryRegionDesc& b = regions[j].desc;
      if (Intersects(a.guest_phys_addr, a.memory_size, b.guest_phys_addr, b.memory_size) ||
          Intersects(a.userspace_addr, a.memory_size, b.userspace_addr, b.memory_size)) {
        return VhostUserError::kRegionOverlap;
      }
    }
  }
  return {};
}

VuStatus VhostUserMemory::SetTable(const std::vector<MemoryRegionDesc>& regions,
                                   std::vector<UniqueFd> fds) {
  if (fds.size() != regions.size()) return VhostUserError::kWrongFdCount;
  if (regions.size() > max_regions_ || regions.size() > kMaxMemTableRegions) {
    return VhostUserError::kTooManyRegions;
  }
  // Validate everything before mapping anything.
  for (const MemoryRegionDesc& r : regions) {
    if (VuStatus st = Validate(r); !st.ok()) return st;
  }
  std::vector<Region> next;
  next.reserve(regions.size());
  for (size_t i = 0; i < regions.size(); ++i) {
    auto region = Map(regions[i], fds[i].get());
    if (!region.ok()) return region.error();
    next.push_back(std::move(*region));
  }
  if (VuStatus st = CheckOverlap(next); !st.ok()) return st;
  regions_ = std::move(next);
  return {};
}

VuStatus VhostUserMemory::Add(const MemoryRegionDesc& region, UniqueFd fd) {
  if (!fd.valid()) return VhostUserError::kWrongFdCount;
  if (regions_.size() >= max_regions_) return VhostUserError::kTooManyRegions;
  if (VuStatus st = Validate(region); !st.ok()) return st;
  auto mapped = Map(region, fd.get());
  if (!mapped.ok()) return mapped.error();
  std::vector<Region> next = regions_;
  next.push_back(std::move(*mapped));
  if (VuStatus st = CheckOverlap(next); !st.ok()) return st;
  regions_ = std::move(next);
  return {};
}

VuStatus VhostUserMemory::Remove(const MemoryRegionDesc& region) {
  for (auto it = regions_.begin(); it != regions_.end(); ++it) {
    const MemoryRegionDesc& d = it->desc;
    if (d.guest_phys_addr == region.guest_phys_addr && d.userspace_addr == region.userspace_addr &&
        d.memory_size == region.memory_size) {
      regions_.erase(it);
      return {};
    }
  }
  return VhostUserError::kRegionNotFound;
}

VuResult<uint64_t> VhostUserMemory::UserToGuest(uint64_t uva, uint64_t len) const {
  for (const Region& r : regions_) {
    const MemoryRegionDesc& d = r.desc;
    if (uva < d.userspace_addr) continue;
    const uint64_t off = uva - d.userspace_addr;
    if (off >= d.memory_size || len > d.memory_size - off) continue;
    return d.guest_phys_addr + off;
  }
  return VhostUserError::kAddressNotMapped;
}

std::vector<GuestMemoryRegion> VhostUserMemory::GuestRegions() const {
  std::vector<GuestMemoryRegion> out;
  out.reserve(regions_.size());
  for (const Region& r : regions_) {
    GuestMemoryRegion g;
    g.guest_phys_addr = r.desc.guest_phys_addr;
    g.size = r.desc.memory_size;
    g.host_addr = r.host;
    g.read_only = false;
    out.push_back(g);
  }
  return out;
}

std::function<void()> VhostUserMemory::KeepAlive() const {
  std::vector<std::shared_ptr<Mapping>> pins;
  pins.reserve(regions_.size());
  for (const Region& r : regions_) pins.push_back(r.mapping);
  return [pins = std::move(pins)] {};
}

}  // namespace kvblk::vhost_user
