// Virtqueue: the device side of one split virtqueue (virtio 1.x 2.7).
//
// The descriptor table, available ring and used ring are guest-physical
// ranges resolved once through GuestMemory (and again on Remap). Everything
// read from them is untrusted: indices are range-checked, chains are walked
// with loop and length limits, every buffer is translated through
// GuestMemory, and each descriptor is copied out of guest memory once before
// it is looked at (the guest may rewrite it meanwhile).
//
// Ordering: avail->idx is loaded with acquire semantics before the ring
// entries and descriptors it publishes are read; used->idx is stored with
// release semantics after the used element is written; a full fence
// separates publishing used->idx (or avail_event) from reading the driver's
// suppression fields (used_event / avail flags, avail->idx).
//
// Thread-safety: none; one thread (the queue's event loop) owns the queue.
#ifndef KVBLK_VIRTIO_VIRTQUEUE_H_
#define KVBLK_VIRTIO_VIRTQUEUE_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "kvblk/virtio_blk.h"
#include "virtio/guest_memory.h"
#include "virtio/virtio_error.h"

namespace kvblk {

// struct virtq_desc flags.
inline constexpr uint16_t kVirtqDescFNext = 1;
inline constexpr uint16_t kVirtqDescFWrite = 2;
inline constexpr uint16_t kVirtqDescFIndirect = 4;
// virtq_avail.flags / virtq_used.flags.
inline constexpr uint16_t kVirtqAvailFNoInterrupt = 1;
inline constexpr uint16_t kVirtqUsedFNoNotify = 1;

// One buffer of a chain, already translated to a host address.
struct DescriptorSegment {
  // nullptr when len is 0, or when the range was not valid guest memory (the
  // chain's error says so).
  uint8_t* data = nullptr;
  uint32_t len = 0;
  bool writable = false;  // VIRTQ_DESC_F_WRITE: device-writable
};

// What Pop() took off the available ring.
struct DescriptorChain {
  uint16_t head = 0;  // goes back in the used ring's id
  std::vector<DescriptorSegment> segments;
  // The first thing wrong with the chain, if anything. The head is consumed
  // all the same and must be pushed back to the used ring.
  std::optional<VirtioError> error;
  // Whether `segments` reaches the chain's last descriptor. False when the
  // walk stopped at a structural error (loop, index out of range, bad
  // indirect table, too long); true for a chain that was merely pointing
  // outside guest memory.
  bool complete = true;
};

class Virtqueue {
 public:
  // Validates `addr` (size a power of two in 1..32768; desc 16-, avail 2-
  // and used 4-byte aligned) and resolves the three rings in `mem` (the used
  // ring writable). The used index starts from the used ring's idx.
  // `max_chain_length` (0: the queue size) bounds the descriptors per chain.
  // Errors: kInvalidQueueSize, kRingMisaligned, kAddressOutsideGuestMemory,
  // kGuestMemoryReadOnly.
  static VirtioResult<Virtqueue> Create(std::shared_ptr<const GuestMemory> mem,
                                        const VirtqueueAddress& addr, bool indirect_desc,
                                        bool event_idx, uint32_t max_chain_length = 0);

  Virtqueue(Virtqueue&&) = default;
  Virtqueue& operator=(Virtqueue&&) = default;

  // Re-resolves the rings in a new memory map, keeping every index.
  // Errors as for Create(); on error the queue is unchanged.
  VirtioStatus Remap(std::shared_ptr<const GuestMemory> mem);

  // Takes the next available chain and walks it. Returns std::nullopt when
  // the ring is empty; a chain (possibly carrying a chain-level error); or a
  // ring-level error (kAvailIndexJumped, kAvailRingEntryOutOfRange), after
  // which the queue is broken and every further Pop() returns that error.
  VirtioResult<std::optional<DescriptorChain>> Pop();

  // Adds (head, written_len) to the used ring and publishes used->idx.
  // Allowed on a broken queue (the used ring was validated at Create).
  void Push(uint16_t head, uint32_t written_len);

  // Whether the driver wants an interrupt for what was pushed since the last
  // call: VIRTQ_AVAIL_F_NO_INTERRUPT, or with VIRTIO_F_EVENT_IDX the
  // used_event rule (interrupt iff used_event lies in [old, new) of the used
  // indices pushed since the last interrupt decision).
  bool NeedsInterrupt();

  // Asks the driver for a notification on the next avail entry (avail_event
  // with EVENT_IDX, else clears VIRTQ_USED_F_NO_NOTIFY), then re-reads
  // avail->idx. Returns true when chains are already waiting, so the caller
  // must keep popping or it could miss them.
  bool EnableNotification();
  // Tells the driver not to bother notifying (VIRTQ_USED_F_NO_NOTIFY; with
  // EVENT_IDX avail_event is simply left behind).
  void DisableNotification();

  uint16_t size() const { return size_; }
  uint16_t next_avail() const { return next_avail_; }
  uint16_t used_index() const { return used_idx_; }
  bool broken() const { return broken_.has_value(); }
  std::optional<VirtioError> broken_error() const { return broken_; }
  const std::shared_ptr<const GuestMemory>& memory() const { return mem_; }

 private:
  Virtqueue() = default;
  VirtioStatus Resolve(const std::shared_ptr<const GuestMemory>& mem);
  uint16_t LoadAvailIdx() const;
  void WalkChain(uint16_t head, DescriptorChain* chain) const;

  std::shared_ptr<const GuestMemory> mem_;
  VirtqueueAddress addr_;
  uint16_t size_ = 0;
  bool indirect_ = false;
  bool event_idx_ = false;
  uint32_t max_chain_ = 0;

  const uint8_t* desc_ = nullptr;   // 16 * size
  const uint8_t* avail_ = nullptr;  // flags, idx, ring[size], used_event
  uint8_t* used_ = nullptr;         // flags, idx, ring[size] {id, len}, avail_event

  uint16_t next_avail_ = 0;    // next avail entry to pop (free-running)
  uint16_t shadow_avail_ = 0;  // last avail->idx seen
  uint16_t used_idx_ = 0;      // next used entry to fill (free-running)
  uint16_t signalled_used_ = 0;
  bool signalled_valid_ = false;
  std::optional<VirtioError> broken_;
};

}  // namespace kvblk

#endif  // KVBLK_VIRTIO_VIRTQUEUE_H_
