#include "virtio/virtqueue.h"

#include <atomic>
#include <limits>

#include "virtio/byte_order.h"

namespace kvblk {
namespace {

constexpr uint32_t kDescSize = 16;
constexpr uint32_t kUsedElemSize = 8;
constexpr uint32_t kRingHeader = 4;  // flags + idx

// The 16-bit ring fields shared with a running guest go through atomic_ref:
// they are read and written concurrently by the driver.
uint16_t AtomicLoad16(const uint8_t* p, std::memory_order order) {
  auto* q = const_cast<uint16_t*>(reinterpret_cast<const uint16_t*>(p));
  return FromLe(std::atomic_ref<uint16_t>(*q).load(order));
}
void AtomicStore16(uint8_t* p, uint16_t v, std::memory_order order) {
  std::atomic_ref<uint16_t>(*reinterpret_cast<uint16_t*>(p)).store(ToLe(v), order);
}
void AtomicStore32(uint8_t* p, uint32_t v, std::memory_order order) {
  std::atomic_ref<uint32_t>(*reinterpret_cast<uint32_t*>(p)).store(ToLe(v), order);
}

struct Desc {
  uint64_t addr;
  uint32_t len;
  uint16_t flags;
  uint16_t next;
};

// Copies descriptor `i` of `table` out of guest memory once.
Desc ReadDesc(const uint8_t* table, uint32_t i) {
  uint8_t raw[kDescSize];
  std::memcpy(raw, table + uint64_t{i} * kDescSize, kDescSize);
  return Desc{LoadLe64(raw), LoadLe32(raw + 8), LoadLe16(raw + 12), LoadLe16(raw + 14)};
}

bool IsPowerOfTwo(uint32_t v) { return v != 0 && (v & (v - 1)) == 0; }

}  // namespace

VirtioResult<Virtqueue> Virtqueue::Create(std::shared_ptr<const GuestMemory> mem,
                                          const VirtqueueAddress& addr, bool indirect_desc,
                                          bool event_idx, uint32_t max_chain_length) {
  if (!IsPowerOfTwo(addr.size) || addr.size > vblk::kMaxQueueSize) {
    return VirtioError::kInvalidQueueSize;
  }
  if (addr.desc_gpa % 16 != 0 || addr.avail_gpa % 2 != 0 || addr.used_gpa % 4 != 0) {
    return VirtioError::kRingMisaligned;
  }
  if (mem == nullptr) return VirtioError::kAddressOutsideGuestMemory;
  Virtqueue q;
  q.addr_ = addr;
  q.size_ = addr.size;
  q.indirect_ = indirect_desc;
  q.event_idx_ = event_idx;
  q.max_chain_ = max_chain_length == 0 ? addr.size : max_chain_length;
  VirtioStatus st = q.Resolve(mem);
  if (!st.ok()) return st.error();
  q.next_avail_ = addr.next_avail;
  q.shadow_avail_ = addr.next_avail;
  q.used_idx_ = AtomicLoad16(q.used_ + 2, std::memory_order_acquire);
  return q;
}

VirtioStatus Virtqueue::Resolve(const std::shared_ptr<const GuestMemory>& mem) {
  const uint64_t n = size_;
  auto desc = mem->Translate(addr_.desc_gpa, kDescSize * n, false);
  if (!desc.ok()) return desc.error();
  auto avail = mem->Translate(addr_.avail_gpa, kRingHeader + 2 * n + 2, false);
  if (!avail.ok()) return avail.error();
  auto used = mem->Translate(addr_.used_gpa, kRingHeader + kUsedElemSize * n + 2, true);
  if (!used.ok()) return used.error();
  // The shared 16/32-bit fields are accessed atomically; that needs natural
  // alignment of the host addresses too, not only of the guest addresses.
  if (reinterpret_cast<uintptr_t>(*avail) % 2 != 0 || reinterpret_cast<uintptr_t>(*used) % 4 != 0) {
    return VirtioError::kRingMisaligned;
  }
  desc_ = *desc;
  avail_ = *avail;
  used_ = *used;
  mem_ = mem;
  return {};
}

VirtioStatus Virtqueue::Remap(std::shared_ptr<const GuestMemory> mem) {
  if (mem == nullptr) return VirtioError::kAddressOutsideGuestMemory;
  const uint8_t* desc = desc_;
  const uint8_t* avail = avail_;
  uint8_t* used = used_;
  std::shared_ptr<const GuestMemory> old = mem_;
  VirtioStatus st = Resolve(mem);
  if (!st.ok()) {
    desc_ = desc;
    avail_ = avail;
    used_ = used;
    mem_ = std::move(old);
  }
  return st;
}

uint16_t Virtqueue::LoadAvailIdx() const {
  // Acquire: the ring entries and descriptors published before idx are read
  // after it.
  return AtomicLoad16(avail_ + 2, std::memory_order_acquire);
}

VirtioResult<std::optional<DescriptorChain>> Virtqueue::Pop() {
  if (broken_) return *broken_;
  if (shadow_avail_ == next_avail_) {
    uint16_t idx = LoadAvailIdx();
    // A driver can have at most `size` chains outstanding; anything more is
    // a corrupt (or decremented) index.
    if (static_cast<uint16_t>(idx - next_avail_) > size_) {
      broken_ = VirtioError::kAvailIndexJumped;
      return *broken_;
    }
    shadow_avail_ = idx;
    if (idx == next_avail_) return std::optional<DescriptorChain>();
  }
  const uint8_t* entry = avail_ + kRingHeader + 2u * (next_avail_ % size_);
  uint16_t head = AtomicLoad16(entry, std::memory_order_relaxed);
  if (head >= size_) {
    broken_ = VirtioError::kAvailRingEntryOutOfRange;
    return *broken_;
  }
  DescriptorChain chain;
  chain.head = head;
  WalkChain(head, &chain);
  // Consumed only once the walk is done: if it throws (bad_alloc) the entry
  // is still there for the next Pop.
  ++next_avail_;
  return std::optional<DescriptorChain>(std::move(chain));
}

void Virtqueue::WalkChain(uint16_t head, DescriptorChain* chain) const {
  auto fail = [chain](VirtioError e) {
    if (!chain->error) chain->error = e;
    chain->complete = false;
  };
  const uint8_t* table = desc_;
  uint32_t table_size = size_;
  bool in_indirect = false;
  uint32_t index = head;
  uint32_t steps = 0;  // descriptors visited in the current table
  uint64_t total_len = 0;
  for (;;) {
    if (index >= table_size) return fail(VirtioError::kDescriptorIndexOutOfRange);
    // A table of N descriptors holds at most N distinct links: one more step
    // means the walk came back to a descriptor it had already seen.
    if (++steps > table_size) return fail(VirtioError::kDescriptorLoop);
    Desc d = ReadDesc(table, index);
    if (d.flags & kVirtqDescFIndirect) {
      if (in_indirect) return fail(VirtioError::kNestedIndirectDescriptor);
      if (!indirect_) return fail(VirtioError::kIndirectNotNegotiated);
      if (d.flags & kVirtqDescFNext) return fail(VirtioError::kIndirectDescriptorHasNext);
      if (d.len == 0 || d.len % kDescSize != 0) {
        return fail(VirtioError::kBadIndirectTableLength);
      }
      auto t = mem_->Translate(d.addr, d.len, false);
      if (!t.ok()) return fail(t.error());
      table = *t;
      table_size = d.len / kDescSize;
      in_indirect = true;
      index = 0;
      steps = 0;
      continue;
    }
    if (chain->segments.size() >= max_chain_) return fail(VirtioError::kDescriptorChainTooLong);
    total_len += d.len;
    if (total_len > std::numeric_limits<uint32_t>::max()) {
      return fail(VirtioError::kDescriptorChainTooLarge);
    }
    DescriptorSegment seg;
    seg.len = d.len;
    seg.writable = (d.flags & kVirtqDescFWrite) != 0;
    if (d.len > 0) {
      auto p = mem_->Translate(d.addr, d.len, seg.writable);
      if (p.ok()) {
        seg.data = *p;
      } else if (!chain->error) {
        chain->error = p.error();  // keep walking: the status byte may still be usable
      }
    }
    chain->segments.push_back(seg);
    if (!(d.flags & kVirtqDescFNext)) return;
    index = d.next;
  }
}

void Virtqueue::Push(uint16_t head, uint32_t written_len) {
  uint8_t* elem = used_ + kRingHeader + kUsedElemSize * (used_idx_ % size_);
  AtomicStore32(elem, head, std::memory_order_relaxed);
  AtomicStore32(elem + 4, written_len, std::memory_order_relaxed);
  ++used_idx_;
  // Release: the element (and the data and status written before Push) is
  // visible before the new index.
  AtomicStore16(used_ + 2, used_idx_, std::memory_order_release);
}

bool Virtqueue::NeedsInterrupt() {
  // used->idx must be visible before we read what the driver asked for.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (!event_idx_) {
    return (AtomicLoad16(avail_, std::memory_order_relaxed) & kVirtqAvailFNoInterrupt) == 0;
  }
  bool valid = signalled_valid_;
  uint16_t old_idx = signalled_used_;
  uint16_t new_idx = used_idx_;
  signalled_valid_ = true;
  signalled_used_ = new_idx;
  if (!valid) return true;
  uint16_t used_event = AtomicLoad16(avail_ + kRingHeader + 2u * size_, std::memory_order_relaxed);
  // vring_need_event: used_event in [old_idx, new_idx), modulo 2^16.
  return static_cast<uint16_t>(new_idx - used_event - 1) < static_cast<uint16_t>(new_idx - old_idx);
}

bool Virtqueue::EnableNotification() {
  if (event_idx_) {
    AtomicStore16(used_ + kRingHeader + kUsedElemSize * size_, next_avail_,
                  std::memory_order_relaxed);
  } else {
    AtomicStore16(used_, 0, std::memory_order_relaxed);
  }
  // The request for a notification must be visible before we look again.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (broken_) return false;
  return LoadAvailIdx() != next_avail_;
}

void Virtqueue::DisableNotification() {
  if (!event_idx_) AtomicStore16(used_, kVirtqUsedFNoNotify, std::memory_order_relaxed);
}

}  // namespace kvblk
