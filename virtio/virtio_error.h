// VirtioError: what a guest (or the transport acting for it) got wrong.
//
// The virtio layer reports problems with guest-supplied structures as values
// of this enum, not as Status: each one names the specific rule that was
// broken, so tests can assert it exactly and logs say what the driver did.
// How each error is answered is a policy of the caller:
//  - a malformed request (bad header, bad buffers, bad sector) is completed
//    with VIRTIO_BLK_S_IOERR or VIRTIO_BLK_S_UNSUPP and processing goes on;
//  - a malformed descriptor chain is returned to the guest with IOERR in its
//    status byte when that byte can still be found, else with used length 0;
//  - a broken ring (IsRingBroken) stops its queue and marks the device
//    NEEDS_RESET.
#ifndef KVBLK_VIRTIO_VIRTIO_ERROR_H_
#define KVBLK_VIRTIO_VIRTIO_ERROR_H_

#include "virtio/error_or.h"
#include <cstdint>
#include <utility>
#include <variant>

#include "kvblk/status.h"

namespace kvblk {

enum class VirtioError : uint8_t {
  // Guest memory (GuestMemory::Translate).
  kAddressOutsideGuestMemory,  // a range not wholly inside one region, or gpa+len overflows
  kGuestMemoryReadOnly,        // a device-writable range inside a read-only region
  kInvalidMemoryLayout,        // the transport's region list overlaps, wraps or is empty

  // Queue setup (transport-supplied, on behalf of the driver).
  kInvalidQueueIndex,
  kInvalidQueueSize,  // zero, not a power of two, or above the device's maximum
  kRingMisaligned,    // desc % 16, avail % 2 or used % 4 (spec 2.7, alignment table)
  kQueueNotReady,     // the queue has no rings / no guest memory yet

  // Ring-level: the queue can no longer be trusted (IsRingBroken).
  kAvailIndexJumped,          // avail idx moved more than the queue size ahead
  kAvailRingEntryOutOfRange,  // a head index in the avail ring >= queue size

  // Chain-level: this chain is malformed; others may be fine.
  kDescriptorIndexOutOfRange,  // `next` beyond the (direct or indirect) table
  kDescriptorLoop,             // the walk revisited a descriptor
  kDescriptorChainTooLong,     // more descriptors than the queue size allows
  kDescriptorChainTooLarge,    // total length above 2^32 - 1 bytes
  kIndirectNotNegotiated,      // VIRTQ_DESC_F_INDIRECT without VIRTIO_F_INDIRECT_DESC
  kNestedIndirectDescriptor,   // INDIRECT inside an indirect table
  kIndirectDescriptorHasNext,  // INDIRECT together with NEXT
  kBadIndirectTableLength,     // indirect table length zero or not a multiple of 16

  // Request-level (virtio-blk).
  kStatusMissing,                // the chain has no byte at all for the status
  kStatusNotWritable,            // the status byte is in a device-readable buffer
  kStatusMisplaced,              // device-readable buffers follow the last writable one
  kDescriptorChainTooShort,      // fewer than 16 header bytes before the status
  kHeaderNotReadable,            // header bytes in a device-writable buffer
  kDataNotWritable,              // IN / GET_ID data in a device-readable buffer
  kDataNotReadable,              // OUT / DISCARD / WRITE_ZEROES data in a device-writable buffer
  kDataLengthNotSectorMultiple,  // IN / OUT data not a multiple of 512 bytes
  kSectorPastEnd,                // sector range beyond capacity (or overflowing)
  kWriteToReadOnlyDevice,        // OUT to a device that offered VIRTIO_BLK_F_RO
  kUnsupportedRequestType,       // unknown type, GET_LIFETIME, SECURE_ERASE, zoned, ...
  kFeatureNotNegotiated,         // DISCARD / WRITE_ZEROES without the feature
  kBadSegmentList,               // discard/write-zeroes data empty or not a multiple of 16
  kTooManySegments,              // more segments than max_discard_seg / max_write_zeroes_seg
  kTooManyDataSegments,          // more data buffers than seg_max
  kSegmentTooLarge,              // num_sectors above max_discard_sectors / max_write_zeroes_sectors
  kUnknownSegmentFlags,          // reserved flag bits set
  kUnmapOnDiscard,               // unmap flag in a discard segment

  // Feature negotiation and configuration space.
  kFeatureNotOffered,         // driver accepted a bit the device did not offer
  kLegacyDriverNotSupported,  // VIRTIO_F_VERSION_1 not accepted
  kConfigAccessOutOfRange,    // offset/len outside the configuration space
  kConfigFieldReadOnly,       // write to a configuration field other than writeback
  kBadConfigValue,            // writeback not 0 or 1
};

// "DescriptorLoop", "SectorPastEnd", ...: the enumerator without the k.
const char* VirtioErrorName(VirtioError e);

// Whether `e` means the ring itself can no longer be trusted, so the queue
// must stop and the device be marked NEEDS_RESET.
bool IsRingBroken(VirtioError e);

// Converts to an InvalidArgument Status whose message is `context: <name>`,
// for the public, Status-based interface.
Status VirtioErrorToStatus(VirtioError e, const std::string& context);

// A T, or the VirtioError that explains why there is none.
template <typename T>
using VirtioResult = ErrorOr<T, VirtioError>;
// No value: success, or the VirtioError.
using VirtioStatus = ErrorStatus<VirtioError>;

}  // namespace kvblk

#endif  // KVBLK_VIRTIO_VIRTIO_ERROR_H_
