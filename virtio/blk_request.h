// BlkRequest: a virtio-blk request parsed out of a descriptor chain
// (virtio 1.x 5.2.6).
//
// Layout, independent of how the driver cut it into descriptors:
//   struct virtio_blk_req { le32 type; le32 reserved; le64 sector;
//                           u8 data[]; u8 status; };
// The header is the first 16 bytes of the chain (device-readable), the
// status is the last byte of the last device-writable buffer, and data is
// everything in between. DISCARD / WRITE_ZEROES data is an array of
//   struct virtio_blk_discard_write_zeroes { le64 sector; le32 num_sectors;
//                                            le32 flags; };
//
// ParseBlkRequest never fails as a function: what the guest got wrong is
// recorded in the request (error, and the status byte to answer with), and
// every check happens before any I/O, on values copied out of guest memory.
#ifndef KVBLK_VIRTIO_BLK_REQUEST_H_
#define KVBLK_VIRTIO_BLK_REQUEST_H_

#include <sys/uio.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "virtio/virtio_error.h"
#include "virtio/virtqueue.h"

namespace kvblk {

enum class BlkRequestType : uint8_t {
  kIn,
  kOut,
  kFlush,
  kGetId,
  kDiscard,
  kWriteZeroes,
  kUnsupported,
};

// What the device offered and the driver negotiated, for request checks.
struct BlkLimits {
  uint64_t capacity_sectors = 0;
  bool read_only = false;
  bool discard = false;       // VIRTIO_BLK_F_DISCARD negotiated
  bool write_zeroes = false;  // VIRTIO_BLK_F_WRITE_ZEROES negotiated
  uint32_t seg_max = 0;       // data buffers per IN / OUT request
  uint32_t max_discard_sectors = 0;
  uint32_t max_discard_seg = 0;
  uint32_t max_write_zeroes_sectors = 0;
  uint32_t max_write_zeroes_seg = 0;
};

// One DISCARD / WRITE_ZEROES segment, copied out of guest memory.
struct BlkRange {
  uint64_t sector = 0;
  uint32_t num_sectors = 0;
  uint32_t flags = 0;  // vblk::kSegmentFlagUnmap or 0
};

struct BlkRequest {
  uint16_t head = 0;
  uint32_t raw_type = 0;
  BlkRequestType type = BlkRequestType::kUnsupported;
  uint64_t sector = 0;
  // Data buffers between the header and the status byte (host addresses into
  // guest memory): written by IN / GET_ID, read by OUT.
  std::vector<iovec> data;
  uint64_t data_len = 0;
  std::vector<BlkRange> ranges;  // DISCARD / WRITE_ZEROES
  // Where the status byte goes; nullptr when the chain has no usable
  // writable status byte (then the request is returned with used length 0).
  uint8_t* status = nullptr;
  // Used length to report: the chain's device-writable bytes, through the
  // status byte (QEMU reports the same); 0 without a status byte.
  uint32_t used_len = 0;
  // When set, the request is answered with `error_status` and nothing else
  // is done.
  std::optional<VirtioError> error;
  uint8_t error_status = 0;
};

// The status byte a request rejected for `e` gets: VIRTIO_BLK_S_UNSUPP for an
// unsupported type, an un-negotiated feature, unknown segment flags and
// unmap on discard (5.2.6.2); VIRTIO_BLK_S_IOERR for everything else.
uint8_t StatusForError(VirtioError e);

// Parses `chain` against `limits`. A chain-level error in `chain` (bad
// descriptor walk) is carried over; the status byte is still used when the
// walk reached the end and the last buffer is writable guest memory.
BlkRequest ParseBlkRequest(const DescriptorChain& chain, const BlkLimits& limits);

}  // namespace kvblk

#endif  // KVBLK_VIRTIO_BLK_REQUEST_H_
