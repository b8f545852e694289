#include "tests/support/virtio_fake_driver.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

namespace kvblk::testing {
namespace {

constexpr uint16_t kNext = 1;
constexpr uint16_t kWrite = 2;
constexpr uint16_t kIndirect = 4;

void Put16(uint8_t* p, uint16_t v) { std::memcpy(p, &v, 2); }  // tests run on little-endian hosts
void Put32(uint8_t* p, uint32_t v) { std::memcpy(p, &v, 4); }
void Put64(uint8_t* p, uint64_t v) { std::memcpy(p, &v, 8); }
uint16_t Get16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}
uint32_t Get32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

void PutDesc(uint8_t* d, uint64_t addr, uint32_t len, uint16_t flags, uint16_t next) {
  Put64(d, addr);
  Put32(d + 8, len);
  Put16(d + 12, flags);
  Put16(d + 14, next);
}

}  // namespace

// ---- FakeGuest ---------------------------------------------------------------

FakeGuest::FakeGuest(size_t size, uint64_t base) : base_(base), size_(size) {
  mem_ = static_cast<uint8_t*>(std::aligned_alloc(4096, size));
  if (mem_ == nullptr) throw std::bad_alloc();
  std::memset(mem_, 0, size);
}

FakeGuest::~FakeGuest() { std::free(mem_); }

uint64_t FakeGuest::Alloc(size_t len, size_t align) {
  uint64_t at = (next_ + align - 1) / align * align;
  if (at + len > size_) throw std::runtime_error("FakeGuest: out of guest memory");
  next_ = at + len;
  std::memset(mem_ + at, 0, len);
  return base_ + at;
}

uint8_t* FakeGuest::Host(uint64_t gpa) {
  if (gpa < base_ || gpa >= base_ + size_) throw std::out_of_range("FakeGuest: gpa outside");
  return mem_ + (gpa - base_);
}

void FakeGuest::Write(uint64_t gpa, const void* src, size_t len) {
  if (len) std::memcpy(Host(gpa), src, len);
}

std::vector<uint8_t> FakeGuest::Read(uint64_t gpa, size_t len) {
  std::vector<uint8_t> v(len);
  if (len) std::memcpy(v.data(), Host(gpa), len);
  return v;
}

GuestMemoryRegion FakeGuest::region() const { return {base_, size_, mem_, false}; }

// ---- FakeVirtqueue -------------------------------------------------------------

FakeVirtqueue::FakeVirtqueue(FakeGuest& guest, uint16_t size) : guest_(guest), size_(size) {
  desc_gpa_ = guest.Alloc(16u * size, 16);
  avail_gpa_ = guest.Alloc(6u + 2u * size, 2);
  used_gpa_ = guest.Alloc(6u + 8u * size, 4);
  for (int i = size - 1; i >= 0; --i) free_.push_back(static_cast<uint16_t>(i));
}

VirtqueueAddress FakeVirtqueue::address() const {
  VirtqueueAddress a;
  a.size = size_;
  a.desc_gpa = desc_gpa_;
  a.avail_gpa = avail_gpa_;
  a.used_gpa = used_gpa_;
  return a;
}

uint8_t* FakeVirtqueue::Desc(uint16_t i) { return guest_.Host(desc_gpa_ + 16u * i); }

uint16_t FakeVirtqueue::AllocDesc() {
  if (free_.empty()) throw std::runtime_error("FakeVirtqueue: no free descriptor");
  uint16_t i = free_.back();
  free_.pop_back();
  return i;
}

void FakeVirtqueue::WriteDesc(uint16_t index, uint64_t addr, uint32_t len, uint16_t flags,
                              uint16_t next) {
  PutDesc(Desc(index), addr, len, flags, next);
}

uint64_t FakeVirtqueue::AllocTable(uint32_t entries) { return guest_.Alloc(16u * entries, 16); }

void FakeVirtqueue::WriteTableDesc(uint64_t table_gpa, uint32_t index, uint64_t addr, uint32_t len,
                                   uint16_t flags, uint16_t next) {
  PutDesc(guest_.Host(table_gpa + 16u * index), addr, len, flags, next);
}

uint16_t FakeVirtqueue::AddChain(const std::vector<FakeBuf>& bufs) {
  std::vector<uint16_t> ids;
  for (size_t i = 0; i < bufs.size(); ++i) ids.push_back(AllocDesc());
  for (size_t i = 0; i < bufs.size(); ++i) {
    uint16_t flags = bufs[i].writable ? kWrite : 0;
    uint16_t next = 0;
    if (i + 1 < bufs.size()) {
      flags |= kNext;
      next = ids[i + 1];
    }
    WriteDesc(ids[i], bufs[i].gpa, bufs[i].len, flags, next);
  }
  chains_[ids[0]] = ids;
  return ids[0];
}

uint16_t FakeVirtqueue::AddIndirect(const std::vector<FakeBuf>& bufs) {
  uint64_t table = AllocTable(static_cast<uint32_t>(bufs.size()));
  for (size_t i = 0; i < bufs.size(); ++i) {
    uint16_t flags = bufs[i].writable ? kWrite : 0;
    uint16_t next = 0;
    if (i + 1 < bufs.size()) {
      flags |= kNext;
      next = static_cast<uint16_t>(i + 1);
    }
    WriteTableDesc(table, static_cast<uint32_t>(i), bufs[i].gpa, bufs[i].len, flags, next);
  }
  uint16_t d = AllocDesc();
  WriteDesc(d, table, static_cast<uint32_t>(16 * bufs.size()), kIndirect, 0);
  chains_[d] = {d};
  return d;
}

void FakeVirtqueue::SetAvailEntry(uint16_t slot, uint16_t head) {
  Put16(guest_.Host(avail_gpa_ + 4 + 2u * (slot % size_)), head);
}

void FakeVirtqueue::SetAvailIdx(uint16_t idx) {
  avail_idx_ = idx;
  std::atomic_thread_fence(std::memory_order_release);
  Put16(guest_.Host(avail_gpa_ + 2), idx);
}

void FakeVirtqueue::Publish(uint16_t head) {
  SetAvailEntry(avail_idx_, head);
  SetAvailIdx(static_cast<uint16_t>(avail_idx_ + 1));
}

void FakeVirtqueue::SetAvailFlags(uint16_t flags) { Put16(guest_.Host(avail_gpa_), flags); }

void FakeVirtqueue::SetUsedEvent(uint16_t used_event) {
  Put16(guest_.Host(avail_gpa_ + 4 + 2u * size_), used_event);
}

uint16_t FakeVirtqueue::UsedIdx() {
  // An acquire load, as a driver reads the index the device publishes
  // (possibly from another thread) before the entries it covers.
  auto* p = reinterpret_cast<uint16_t*>(guest_.Host(used_gpa_ + 2));
  return std::atomic_ref<uint16_t>(*p).load(std::memory_order_acquire);
}
uint16_t FakeVirtqueue::UsedFlags() { return Get16(guest_.Host(used_gpa_)); }
uint16_t FakeVirtqueue::AvailEvent() { return Get16(guest_.Host(used_gpa_ + 4 + 8u * size_)); }

std::vector<UsedElem> FakeVirtqueue::TakeUsed() {
  std::vector<UsedElem> out;
  uint16_t idx = UsedIdx();
  std::atomic_thread_fence(std::memory_order_acquire);
  while (last_used_ != idx) {
    const uint8_t* e = guest_.Host(used_gpa_ + 4 + 8u * (last_used_ % size_));
    UsedElem u{Get32(e), Get32(e + 4)};
    out.push_back(u);
    auto it = chains_.find(static_cast<uint16_t>(u.id));
    if (it != chains_.end()) {
      for (uint16_t d : it->second) free_.push_back(d);
      chains_.erase(it);
    }
    ++last_used_;
  }
  return out;
}

// ---- virtio-blk requests -------------------------------------------------------

std::vector<uint8_t> BlkSegment(uint64_t sector, uint32_t num_sectors, uint32_t flags) {
  std::vector<uint8_t> s(16);
  Put64(s.data(), sector);
  Put32(s.data() + 8, num_sectors);
  Put32(s.data() + 12, flags);
  return s;
}

uint8_t BlkStatus(FakeGuest& guest, const FakeBlkRequest& r) { return *guest.Host(r.status_gpa); }

FakeBlkRequest PrepareBlk(FakeGuest& guest, uint32_t type, uint64_t sector,
                          const std::vector<uint8_t>& out, uint32_t in_len) {
  FakeBlkRequest r;
  r.data_len = in_len > 0 ? in_len : static_cast<uint32_t>(out.size());
  // Header, data and status are contiguous, so kMerged can cover them with
  // two descriptors.
  r.header_gpa = guest.Alloc(16 + r.data_len + 1, 16);
  r.data_gpa = r.header_gpa + 16;
  r.status_gpa = r.data_gpa + r.data_len;
  uint8_t hdr[16] = {};
  Put32(hdr, type);
  Put64(hdr + 8, sector);
  guest.Write(r.header_gpa, hdr, sizeof hdr);
  guest.Write(r.data_gpa, out.data(), out.size());
  *guest.Host(r.status_gpa) = 0xff;
  return r;
}

FakeBlkRequest SubmitBlk(FakeGuest& guest, FakeVirtqueue& q, uint32_t type, uint64_t sector,
                         const std::vector<uint8_t>& out, uint32_t in_len, BlkLayout layout,
                         bool publish) {
  FakeBlkRequest r = PrepareBlk(guest, type, sector, out, in_len);
  const bool writable_data = in_len > 0;
  std::vector<FakeBuf> bufs;
  switch (layout) {
    case BlkLayout::kSplit:
    case BlkLayout::kIndirect:
      bufs.push_back({r.header_gpa, 16, false});
      if (r.data_len) bufs.push_back({r.data_gpa, r.data_len, writable_data});
      bufs.push_back({r.status_gpa, 1, true});
      break;
    case BlkLayout::kPerSector:
      bufs.push_back({r.header_gpa, 16, false});
      for (uint32_t off = 0; off < r.data_len; off += 512) {
        uint32_t n = std::min<uint32_t>(512, r.data_len - off);
        bufs.push_back({r.data_gpa + off, n, writable_data});
      }
      bufs.push_back({r.status_gpa, 1, true});
      break;
    case BlkLayout::kMerged:
      if (writable_data) {
        bufs.push_back({r.header_gpa, 16, false});
        bufs.push_back({r.data_gpa, r.data_len + 1, true});
      } else {
        bufs.push_back({r.header_gpa, 16 + r.data_len, false});
        bufs.push_back({r.status_gpa, 1, true});
      }
      break;
  }
  r.head = layout == BlkLayout::kIndirect ? q.AddIndirect(bufs) : q.AddChain(bufs);
  if (publish) q.Publish(r.head);
  return r;
}

}  // namespace kvblk::testing
