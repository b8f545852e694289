// The vhost-user protocol, back-end side: message layout, payload encoding
// and decoding, and message framing over a Unix socket with file descriptors
// in SCM_RIGHTS ancillary data.
//
// Also the back end's listening socket (ListenOnUnixSocket).
//
// Spec: QEMU docs/interop/vhost-user.rst ("Message Specification",
// "Front-end message types", "VHOST_USER_PROTOCOL_F_REPLY_ACK"). All numbers
// are in the machine's native byte order, as the spec says.
//
// Everything here is untrusted-input code: a message is checked against the
// shape its request type prescribes (payload size, file descriptor count)
// before anything reads the payload, payloads are bounded (kMaxPayloadSize),
// and so is the number of descriptors a message may carry (kMaxFds). Errors
// are VhostUserError values naming the rule the front end broke; what to do
// about one (reply, ignore, close) is the server's policy, described in
// vhost_user_server.h.
//
// Thread-safety: the functions are pure or act on the fd they are given; a
// MessageReader belongs to one thread.
#ifndef KVBLK_VIRTIO_VHOST_USER_PROTOCOL_H_
#define KVBLK_VIRTIO_VHOST_USER_PROTOCOL_H_

#include "virtio/error_or.h"
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "kvblk/status.h"

namespace kvblk::vhost_user {

// ---- File descriptors ----------------------------------------------------

// Owns one file descriptor (closed on destruction); -1 means none.
class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  ~UniqueFd() { Reset(); }
  UniqueFd(UniqueFd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept {
    if (this != &o) {
      Reset();
      fd_ = std::exchange(o.fd_, -1);
    }
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  // Gives up ownership and returns the descriptor.
  int Release() { return std::exchange(fd_, -1); }
  // Closes the descriptor (if any) and takes `fd`.
  void Reset(int fd = -1);

 private:
  int fd_ = -1;
};

// ---- Requests, flags and feature bits ---------------------------------------

enum class Request : uint32_t {
  kNone = 0,
  kGetFeatures = 1,
  kSetFeatures = 2,
  kSetOwner = 3,
  kResetOwner = 4,
  kSetMemTable = 5,
  kSetLogBase = 6,
  kSetLogFd = 7,
  kSetVringNum = 8,
  kSetVringAddr = 9,
  kSetVringBase = 10,
  kGetVringBase = 11,
  kSetVringKick = 12,
  kSetVringCall = 13,
  kSetVringErr = 14,
  kGetProtocolFeatures = 15,
  kSetProtocolFeatures = 16,
  kGetQueueNum = 17,
  kSetVringEnable = 18,
  kSendRarp = 19,
  kNetSetMtu = 20,
  kSetBackendReqFd = 21,
  kIotlbMsg = 22,
  kSetVringEndian = 23,
  kGetConfig = 24,
  kSetConfig = 25,
  kCreateCryptoSession = 26,
  kCloseCryptoSession = 27,
  kPostcopyAdvise = 28,
  kPostcopyListen = 29,
  kPostcopyEnd = 30,
  kGetInflightFd = 31,
  kSetInflightFd = 32,
  kGpuSetSocket = 33,
  kResetDevice = 34,
  kVringKick = 35,
  kGetMaxMemSlots = 36,
  kAddMemReg = 37,
  kRemMemReg = 38,
  kSetStatus = 39,
  kGetStatus = 40,
};
// The highest request number this implementation knows by name.
inline constexpr uint32_t kLastKnownRequest = 40;

// "GET_FEATURES", "SET_MEM_TABLE", ...; "UNKNOWN" for other numbers.
const char* RequestName(uint32_t request);
// "0x..." for log lines.
std::string Hex(uint64_t v);

// Header flags.
inline constexpr uint32_t kVersion = 1;
inline constexpr uint32_t kVersionMask = 0x3;
inline constexpr uint32_t kFlagReply = 1u << 2;
inline constexpr uint32_t kFlagNeedReply = 1u << 3;

// VHOST_USER_F_PROTOCOL_FEATURES, in GET_FEATURES / SET_FEATURES.
inline constexpr int kFProtocolFeatures = 30;

// Protocol feature bits (GET_PROTOCOL_FEATURES / SET_PROTOCOL_FEATURES).
// Requests the back end sends on the back-end channel (SET_BACKEND_REQ_FD).
inline constexpr uint32_t kBackendConfigChangeMsg = 2;

inline constexpr int kProtocolFMq = 0;
inline constexpr int kProtocolFLogShmfd = 1;
inline constexpr int kProtocolFReplyAck = 3;
inline constexpr int kProtocolFBackendReq = 5;
inline constexpr int kProtocolFConfig = 9;
inline constexpr int kProtocolFInflightShmfd = 12;
inline constexpr int kProtocolFResetDevice = 13;
inline constexpr int kProtocolFInbandNotifications = 14;
inline constexpr int kProtocolFConfigureMemSlots = 15;
inline constexpr int kProtocolFStatus = 16;

// SET_VRING_KICK/CALL/ERR u64 payload: bits 0-7 the vring index, bit 8 "no
// file descriptor".
inline constexpr uint64_t kVringIndexMask = 0xff;
inline constexpr uint64_t kVringNoFdMask = 1u << 8;
// SET_VRING_ADDR flags: VHOST_VRING_F_LOG.
inline constexpr uint32_t kVringFLog = 1;
// SET_CONFIG / GET_CONFIG flags.
inline constexpr uint32_t kConfigFlagFrontend = 0;
inline constexpr uint32_t kConfigFlagMigration = 1;

// Limits.
inline constexpr uint32_t kHeaderSize = 12;
inline constexpr uint32_t kMaxConfigSize = 256;     // VHOST_USER_MAX_CONFIG_SIZE
inline constexpr uint32_t kConfigHeaderSize = 12;   // offset, size, flags
inline constexpr uint32_t kMaxMemTableRegions = 8;  // VHOST_MEMORY_BASELINE_NREGIONS
inline constexpr uint32_t kMemoryRegionSize = 32;
inline constexpr uint32_t kMemTableHeaderSize = 8;  // nregions, padding
inline constexpr uint32_t kSingleRegionSize = 40;   // padding, region
inline constexpr uint32_t kVringStateSize = 8;
inline constexpr uint32_t kVringAddrSize = 40;
// Every message this back end accepts fits; larger ones are refused before
// their payload is read (the largest is GET/SET_CONFIG: 12 + 256 bytes).
inline constexpr uint32_t kMaxPayloadSize = kConfigHeaderSize + kMaxConfigSize;
// At most this many descriptors ride on one message (SET_MEM_TABLE's 8).
inline constexpr int kMaxFds = 8;

// ---- Errors ---------------------------------------------------------------

enum class VhostUserError : uint8_t {
  // Framing: the byte stream cannot be trusted any more (connection closed).
  kPeerClosed,        // orderly EOF between messages (not a protocol error)
  kTruncatedMessage,  // EOF inside a message
  kBadVersion,        // header version bits are not 1
  kUnexpectedReply,   // a request with the reply flag set
  kPayloadTooLarge,   // header size above kMaxPayloadSize
  kTooManyFds,        // more than kMaxFds descriptors (or truncated control data)
  kSocketError,       // recvmsg/sendmsg failed
  kReplyNotSent,      // the front end does not read its replies (socket full)

  // One message is malformed or refused.
  kUnknownRequest,                // a request number the spec does not define (to us)
  kUnsupportedRequest,            // defined, but needs a feature this back end never offers
  kWrongPayloadSize,              // payload size differs from what the request prescribes
  kWrongFdCount,                  // descriptor count differs from what the request prescribes
  kProtocolFeatureNotNegotiated,  // request gated by a protocol feature that was not acked
  kFeatureNotOffered,             // SET_(PROTOCOL_)FEATURES with a bit that was not offered
  kInvalidQueueIndex,             // vring index >= the number of queues
  kInvalidQueueSize,              // SET_VRING_NUM: 0, not a power of two, or too large
  kInvalidValue,                  // SET_VRING_BASE > 65535, SET_VRING_ENABLE not 0/1
  kQueueRunning,                  // ring parameters changed while the ring runs
  kEmptyMemoryTable,              // SET_MEM_TABLE with zero regions
  kTooManyRegions,                // more regions than the table or the slots allow
  kBadRegion,            // zero size, address wrap-around, fd not a regular file / too small
  kRegionOverlap,        // two regions overlap in guest or user address space
  kRegionNotFound,       // REM_MEM_REG of a region that is not mapped
  kMmapFailed,           // mmap of a region's fd failed
  kAddressNotMapped,     // a ring's user address lies outside every region
  kLoggingNotSupported,  // VHOST_VRING_F_LOG (dirty logging) requested
  kPollingNotSupported,  // SET_VRING_KICK without a descriptor
  kBadConfigAccess,      // GET/SET_CONFIG range outside the config space
  kDeviceRejected,       // the device model refused (features, config write, ring)
};

// "WrongPayloadSize", ...: the enumerator without the k.
const char* VhostUserErrorName(VhostUserError e);

// Framing errors end the connection; the others concern one message.
bool IsFramingError(VhostUserError e);

// A T, or the VhostUserError that explains why there is none.
template <typename T>
using VuResult = ErrorOr<T, VhostUserError>;
// Success, or the VhostUserError.
using VuStatus = ErrorStatus<VhostUserError>;

// ---- Messages and payloads -------------------------------------------------

struct Message {
  uint32_t request = 0;
  uint32_t flags = kVersion;
  std::vector<uint8_t> payload;  // header.size bytes
  std::vector<UniqueFd> fds;     // from SCM_RIGHTS, in order

  bool need_reply() const { return (flags & kFlagNeedReply) != 0; }
};

struct VringState {
  uint32_t index = 0;
  uint32_t num = 0;
};

// struct vhost_vring_addr: ring addresses in the front end's user address
// space (no IOMMU support).
struct VringAddr {
  uint32_t index = 0;
  uint32_t flags = 0;
  uint64_t desc_user_addr = 0;
  uint64_t used_user_addr = 0;
  uint64_t avail_user_addr = 0;
  uint64_t log_guest_addr = 0;
};

// VhostUserMemoryRegion.
struct MemoryRegionDesc {
  uint64_t guest_phys_addr = 0;
  uint64_t memory_size = 0;
  uint64_t userspace_addr = 0;
  uint64_t mmap_offset = 0;
};

// VhostUserConfig: a configuration-space access.
struct ConfigAccess {
  uint32_t offset = 0;
  uint32_t flags = 0;
  std::vector<uint8_t> data;  // `size` bytes
};

// How a request is answered when all goes well.
enum class ReplyKind : uint8_t {
  kNone,  // nothing, unless REPLY_ACK's need_reply asks for a u64 status
  kBody,  // a request-specific payload (GET_FEATURES, GET_VRING_BASE, ...)
};
ReplyKind ReplyKindOf(uint32_t request);

// Checks `m` against the shape its request prescribes: payload size and
// number of file descriptors, before any handler reads it. Errors:
// kUnknownRequest, kUnsupportedRequest (requests gated by features this back
// end never offers: logging, IOTLB, postcopy, inflight, in-band
// notifications, status, back-end channel, net/crypto/gpu), kWrongPayloadSize,
// kWrongFdCount, kEmptyMemoryTable, kTooManyRegions.
VuStatus CheckMessageShape(const Message& m);

// Payload decoders. Each checks the exact payload size (kWrongPayloadSize).
VuResult<uint64_t> DecodeU64(const Message& m);
VuResult<VringState> DecodeVringState(const Message& m);
VuResult<VringAddr> DecodeVringAddr(const Message& m);
// SET_MEM_TABLE: 1..8 regions; the payload holds exactly `nregions` entries.
VuResult<std::vector<MemoryRegionDesc>> DecodeMemTable(const Message& m);
// ADD_MEM_REG / REM_MEM_REG.
VuResult<MemoryRegionDesc> DecodeSingleRegion(const Message& m);
// GET_CONFIG / SET_CONFIG: size <= kMaxConfigSize and payload 12 + size.
VuResult<ConfigAccess> DecodeConfig(const Message& m);

// Payload encoders (for replies and for front ends in tests and tools).
std::vector<uint8_t> EncodeU64(uint64_t v);
std::vector<uint8_t> EncodeVringState(const VringState& s);
std::vector<uint8_t> EncodeVringAddr(const VringAddr& a);
std::vector<uint8_t> EncodeMemTable(const std::vector<MemoryRegionDesc>& regions);
std::vector<uint8_t> EncodeSingleRegion(const MemoryRegionDesc& r);
std::vector<uint8_t> EncodeConfig(const ConfigAccess& c);

// The reply to `request`: same request number, version 1, reply flag.
Message MakeReply(const Message& request, std::vector<uint8_t> payload);

// ---- Framing ----------------------------------------------------------------

// Assembles messages from a stream socket, whatever the pieces it arrives in.
// It never reads past the end of the message it is assembling, so the
// descriptors a recvmsg() returns belong to that message.
class MessageReader {
 public:
  // Reads what `fd` has (without blocking: MSG_DONTWAIT). Returns a complete
  // message, std::nullopt when the socket has no more bytes yet, or a
  // framing error: kPeerClosed (EOF between messages), kTruncatedMessage,
  // kBadVersion, kUnexpectedReply, kPayloadTooLarge, kTooManyFds,
  // kSocketError. After an error the reader must not be used again.
  VuResult<std::optional<Message>> Read(int fd);

  // Bytes of a message received so far (0 between messages).
  size_t partial_bytes() const { return got_; }

 private:
  uint8_t header_[kHeaderSize] = {};
  size_t got_ = 0;  // header and payload bytes of the current message
  Message msg_;
};

// Reads one whole message, waiting up to `timeout_ms` (-1: forever) for
// each piece. For front ends in tests and tools; framing errors as above,
// kSocketError on timeout.
VuResult<Message> ReadMessageBlocking(int fd, int timeout_ms = -1);

// Sends `m` (header, payload, its descriptors) in one sendmsg(). With
// `nonblocking`, a full socket is kReplyNotSent rather than a wait.
// kSocketError on other failures (EPIPE included; SIGPIPE is not raised).
VuStatus SendMessage(int fd, const Message& m, bool nonblocking = false);

// ---- The socket -------------------------------------------------------------------

// Creates a non-blocking Unix stream socket listening at `path` (backlog 1:
// one front end at a time). A stale socket file there (nobody accepts on
// it) is replaced. Errors: InvalidArgument (path empty or longer than
// sun_path allows, or an existing file that is not a socket, which is left
// alone), Busy (a server is listening there), IoError.
Result<UniqueFd> ListenOnUnixSocket(const std::string& path);

}  // namespace kvblk::vhost_user

#endif  // KVBLK_VIRTIO_VHOST_USER_PROTOCOL_H_
