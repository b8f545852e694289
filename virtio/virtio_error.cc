#include "virtio/virtio_error.h"

namespace kvblk {

const char* VirtioErrorName(VirtioError e) {
  switch (e) {
    case VirtioError::kAddressOutsideGuestMemory:
      return "AddressOutsideGuestMemory";
    case VirtioError::kGuestMemoryReadOnly:
      return "GuestMemoryReadOnly";
    case VirtioError::kInvalidMemoryLayout:
      return "InvalidMemoryLayout";
    case VirtioError::kInvalidQueueIndex:
      return "InvalidQueueIndex";
    case VirtioError::kInvalidQueueSize:
      return "InvalidQueueSize";
    case VirtioError::kRingMisaligned:
      return "RingMisaligned";
    case VirtioError::kQueueNotReady:
      return "QueueNotReady";
    case VirtioError::kAvailIndexJumped:
      return "AvailIndexJumped";
    case VirtioError::kAvailRingEntryOutOfRange:
      return "AvailRingEntryOutOfRange";
    case VirtioError::kDescriptorIndexOutOfRange:
      return "DescriptorIndexOutOfRange";
    case VirtioError::kDescriptorLoop:
      return "DescriptorLoop";
    case VirtioError::kDescriptorChainTooLong:
      return "DescriptorChainTooLong";
    case VirtioError::kDescriptorChainTooLarge:
      return "DescriptorChainTooLarge";
    case VirtioError::kIndirectNotNegotiated:
      return "IndirectNotNegotiated";
    case VirtioError::kNestedIndirectDescriptor:
      return "NestedIndirectDescriptor";
    case VirtioError::kIndirectDescriptorHasNext:
      return "IndirectDescriptorHasNext";
    case VirtioError::kBadIndirectTableLength:
      return "BadIndirectTableLength";
    case VirtioError::kStatusMissing:
      return "StatusMissing";
    case VirtioError::kStatusNotWritable:
      return "StatusNotWritable";
    case VirtioError::kStatusMisplaced:
      return "StatusMisplaced";
    case VirtioError::kDescriptorChainTooShort:
      return "DescriptorChainTooShort";
    case VirtioError::kHeaderNotReadable:
      return "HeaderNotReadable";
    case VirtioError::kDataNotWritable:
      return "DataNotWritable";
    case VirtioError::kDataNotReadable:
      return "DataNotReadable";
    case VirtioError::kDataLengthNotSectorMultiple:
      return "DataLengthNotSectorMultiple";
    case VirtioError::kSectorPastEnd:
      return "SectorPastEnd";
    case VirtioError::kWriteToReadOnlyDevice:
      return "WriteToReadOnlyDevice";
    case VirtioError::kUnsupportedRequestType:
      return "UnsupportedRequestType";
    case VirtioError::kFeatureNotNegotiated:
      return "FeatureNotNegotiated";
    case VirtioError::kBadSegmentList:
      return "BadSegmentList";
    case VirtioError::kTooManySegments:
      return "TooManySegments";
    case VirtioError::kTooManyDataSegments:
      return "TooManyDataSegments";
    case VirtioError::kSegmentTooLarge:
      return "SegmentTooLarge";
    case VirtioError::kUnknownSegmentFlags:
      return "UnknownSegmentFlags";
    case VirtioError::kUnmapOnDiscard:
      return "UnmapOnDiscard";
    case VirtioError::kFeatureNotOffered:
      return "FeatureNotOffered";
    case VirtioError::kLegacyDriverNotSupported:
      return "LegacyDriverNotSupported";
    case VirtioError::kConfigAccessOutOfRange:
      return "ConfigAccessOutOfRange";
    case VirtioError::kConfigFieldReadOnly:
      return "ConfigFieldReadOnly";
    case VirtioError::kBadConfigValue:
      return "BadConfigValue";
  }
  return "UnknownVirtioError";
}

bool IsRingBroken(VirtioError e) {
  return e == VirtioError::kAvailIndexJumped || e == VirtioError::kAvailRingEntryOutOfRange;
}

Status VirtioErrorToStatus(VirtioError e, const std::string& context) {
  return Status::InvalidArgument(context + ": " + VirtioErrorName(e));
}

}  // namespace kvblk
