// A fake virtio guest driver for tests: it owns a block of "guest physical"
// memory, lays out split virtqueues in it, writes real descriptor tables
// (direct, chained, indirect) and avail entries the way a driver does, and
// reads used entries and status bytes back. Hostile tests use the raw
// writers (WriteDesc, SetAvailIdx, ...) to build what no sane driver would.
//
// Not thread-safe; the device under test runs on the same thread.
#ifndef KVBLK_TESTS_SUPPORT_VIRTIO_FAKE_DRIVER_H_
#define KVBLK_TESTS_SUPPORT_VIRTIO_FAKE_DRIVER_H_

#include <cstdint>
#include <map>
#include <memory>
#include <vector>

#include "kvblk/virtio_blk.h"

namespace kvblk::testing {

// Guest RAM: `size` bytes at guest physical address `base`, page aligned.
class FakeGuest {
 public:
  explicit FakeGuest(size_t size = 4 << 20, uint64_t base = 0x10000000);
  ~FakeGuest();
  FakeGuest(const FakeGuest&) = delete;
  FakeGuest& operator=(const FakeGuest&) = delete;

  // Bump allocation of guest memory (zeroed); returns its gpa.
  uint64_t Alloc(size_t len, size_t align = 16);
  // Host address of `gpa` (which must be inside the buffer).
  uint8_t* Host(uint64_t gpa);
  void Write(uint64_t gpa, const void* src, size_t len);
  std::vector<uint8_t> Read(uint64_t gpa, size_t len);

  GuestMemoryRegion region() const;
  uint64_t base() const { return base_; }
  uint64_t size() const { return size_; }
  uint64_t end() const { return base_ + size_; }  // first gpa past guest RAM

 private:
  uint8_t* mem_;
  uint64_t base_;
  uint64_t size_;
  uint64_t next_ = 0;
};

struct FakeBuf {
  uint64_t gpa;
  uint32_t len;
  bool writable;
};

struct UsedElem {
  uint32_t id;
  uint32_t len;
};

// One split virtqueue, driver side.
class FakeVirtqueue {
 public:
  FakeVirtqueue(FakeGuest& guest, uint16_t size);

  VirtqueueAddress address() const;
  uint16_t size() const { return size_; }

  // Chains `bufs` through free descriptors (NEXT links, WRITE flags) and
  // returns the head. Does not publish it.
  uint16_t AddChain(const std::vector<FakeBuf>& bufs);
  // Writes `bufs` into a fresh indirect table and one ring descriptor
  // (VIRTQ_DESC_F_INDIRECT) pointing at it; returns that descriptor's index.
  uint16_t AddIndirect(const std::vector<FakeBuf>& bufs);

  // Raw writers for hostile tests.
  uint16_t AllocDesc();  // a free descriptor index
  void WriteDesc(uint16_t index, uint64_t addr, uint32_t len, uint16_t flags, uint16_t next);
  uint64_t AllocTable(uint32_t entries);  // an indirect table's gpa
  void WriteTableDesc(uint64_t table_gpa, uint32_t index, uint64_t addr, uint32_t len,
                      uint16_t flags, uint16_t next);

  // avail->ring[avail_idx % size] = head, then avail->idx += 1 (release).
  void Publish(uint16_t head);
  // Writes ring entries without moving idx, or idx alone.
  void SetAvailEntry(uint16_t slot, uint16_t head);
  void SetAvailIdx(uint16_t idx);
  uint16_t avail_idx() const { return avail_idx_; }
  void SetAvailFlags(uint16_t flags);
  void SetUsedEvent(uint16_t used_event);

  uint16_t UsedIdx();
  uint16_t UsedFlags();
  uint16_t AvailEvent();
  // Used entries added since the last call, in ring order; the descriptors
  // of their chains become free again.
  std::vector<UsedElem> TakeUsed();

 private:
  uint8_t* Desc(uint16_t i);

  FakeGuest& guest_;
  uint16_t size_;
  uint64_t desc_gpa_, avail_gpa_, used_gpa_;
  uint16_t avail_idx_ = 0;
  uint16_t last_used_ = 0;
  std::vector<uint16_t> free_;
  std::map<uint16_t, std::vector<uint16_t>> chains_;  // head -> descriptors it uses
};

// How a virtio-blk request is cut into descriptors.
enum class BlkLayout {
  kSplit,      // [header R] [data] [status W]
  kPerSector,  // [header R] [512-byte data pieces...] [status W]
  kMerged,     // [header (+ OUT data) R] [IN data + status W]: any layout is legal
  kIndirect,   // kSplit, through an indirect table
};

struct FakeBlkRequest {
  uint16_t head = 0;
  uint64_t header_gpa = 0;
  uint64_t data_gpa = 0;
  uint32_t data_len = 0;
  uint64_t status_gpa = 0;  // preset to 0xff: "not written"
};

// Writes a virtio-blk request's buffers (header, data, status; contiguous in
// guest memory) without any descriptors, for tests that chain them
// themselves.
FakeBlkRequest PrepareBlk(FakeGuest& guest, uint32_t type, uint64_t sector,
                          const std::vector<uint8_t>& out, uint32_t in_len);

// Builds a virtio-blk request (header, data, status) in guest memory and a
// chain for it, and publishes it. `out` is the device-readable payload (OUT
// data, DISCARD / WRITE_ZEROES segments); `in_len` the device-writable one
// (IN, GET_ID). Use either, not both.
FakeBlkRequest SubmitBlk(FakeGuest& guest, FakeVirtqueue& q, uint32_t type, uint64_t sector,
                         const std::vector<uint8_t>& out, uint32_t in_len,
                         BlkLayout layout = BlkLayout::kSplit, bool publish = true);

// DISCARD / WRITE_ZEROES segment bytes.
std::vector<uint8_t> BlkSegment(uint64_t sector, uint32_t num_sectors, uint32_t flags);

uint8_t BlkStatus(FakeGuest& guest, const FakeBlkRequest& r);

}  // namespace kvblk::testing

#endif  // KVBLK_TESTS_SUPPORT_VIRTIO_FAKE_DRIVER_H_
