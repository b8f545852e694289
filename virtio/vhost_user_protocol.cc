#include "virtio/vhost_user_protocol.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

namespace kvblk::vhost_user {
namespace {

// How many descriptors a request must carry.
struct FdRule {
  int min = 0;
  int max = 0;
};

bool IsKnown(uint32_t request) { return request >= 1 && request <= kLastKnownRequest; }

// Requests that need a feature (protocol or virtio) this back end never
// offers. A front end that sends one has ignored the negotiation.
bool IsNeverOffered(Request r) {
  switch (r) {
    case Request::kSetLogBase:  // LOG_SHMFD / VHOST_F_LOG_ALL
    case Request::kSetLogFd:
    case Request::kSendRarp:  // net
    case Request::kNetSetMtu:
    case Request::kIotlbMsg:             // VIRTIO_F_IOMMU_PLATFORM
    case Request::kSetVringEndian:       // CROSS_ENDIAN
    case Request::kCreateCryptoSession:  // crypto
    case Request::kCloseCryptoSession:
    case Request::kPostcopyAdvise:  // PAGEFAULT
    case Request::kPostcopyListen:
    case Request::kPostcopyEnd:
    case Request::kGetInflightFd:  // INFLIGHT_SHMFD
    case Request::kSetInflightFd:
    case Request::kGpuSetSocket:  // gpu
    case Request::kVringKick:     // INBAND_NOTIFICATIONS
    case Request::kSetStatus:     // STATUS
    case Request::kGetStatus:
      return true;
    default:
      return false;
  }
}

void Put32(std::vector<uint8_t>& out, uint32_t v) {
  uint8_t b[4];
  std::memcpy(b, &v, 4);
  out.insert(out.end(), b, b + 4);
}

void Put64(std::vector<uint8_t>& out, uint64_t v) {
  uint8_t b[8];
  std::memcpy(b, &v, 8);
  out.insert(out.end(), b, b + 8);
}

uint32_t Get32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

uint64_t Get64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

MemoryRegionDesc GetRegion(const uint8_t* p) {
  MemoryRegionDesc r;
  r.guest_phys_addr = Get64(p);
  r.memory_size = Get64(p + 8);
  r.userspace_addr = Get64(p + 16);
  r.mmap_offset = Get64(p + 24);
  return r;
}

void PutRegion(std::vector<uint8_t>& out, const MemoryRegionDesc& r) {
  Put64(out, r.guest_phys_addr);
  Put64(out, r.memory_size);
  Put64(out, r.userspace_addr);
  Put64(out, r.mmap_offset);
}

VuStatus ExpectSize(const Message& m, size_t size) {
  if (m.payload.size() != size) return VhostUserError::kWrongPayloadSize;
  return {};
}

VuStatus ExpectFds(const Message& m, FdRule rule) {
  int n = static_cast<int>(m.fds.size());
  if (n < rule.min || n > rule.max) return VhostUserError::kWrongFdCount;
  return {};
}

// Takes control messages apart; closes descriptors beyond `room`.
// Returns false if there were more than `room` of them or the control data
// was truncated.
bool CollectFds(msghdr* mh, std::vector<UniqueFd>& out, size_t room) {
  bool ok = (mh->msg_flags & MSG_CTRUNC) == 0;
  for (cmsghdr* c = CMSG_FIRSTHDR(mh); c != nullptr; c = CMSG_NXTHDR(mh, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    const uint8_t* data = CMSG_DATA(c);
    for (size_t i = 0; i < n; ++i) {
      int fd;
      std::memcpy(&fd, data + i * sizeof(int), sizeof(int));
      if (out.size() < room) {
        out.emplace_back(fd);
      } else {
        close(fd);
        ok = false;
      }
    }
  }
  return ok;
}

}  // namespace

void UniqueFd::Reset(int fd) {
  if (fd_ >= 0) close(fd_);
  fd_ = fd;
}

std::string Hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

const char* RequestName(uint32_t request) {
  switch (static_cast<Request>(request)) {
    case Request::kNone:
      return "NONE";
    case Request::kGetFeatures:
      return "GET_FEATURES";
    case Request::kSetFeatures:
      return "SET_FEATURES";
    case Request::kSetOwner:
      return "SET_OWNER";
    case Request::kResetOwner:
      return "RESET_OWNER";
    case Request::kSetMemTable:
      return "SET_MEM_TABLE";
    case Request::kSetLogBase:
      return "SET_LOG_BASE";
    case Request::kSetLogFd:
      return "SET_LOG_FD";
    case Request::kSetVringNum:
      return "SET_VRING_NUM";
    case Request::kSetVringAddr:
      return "SET_VRING_ADDR";
    case Request::kSetVringBase:
      return "SET_VRING_BASE";
    case Request::kGetVringBase:
      return "GET_VRING_BASE";
    case Request::kSetVringKick:
      return "SET_VRING_KICK";
    case Request::kSetVringCall:
      return "SET_VRING_CALL";
    case Request::kSetVringErr:
      return "SET_VRING_ERR";
    case Request::kGetProtocolFeatures:
      return "GET_PROTOCOL_FEATURES";
    case Request::kSetProtocolFeatures:
      return "SET_PROTOCOL_FEATURES";
    case Request::kGetQueueNum:
      return "GET_QUEUE_NUM";
    case Request::kSetVringEnable:
      return "SET_VRING_ENABLE";
    case Request::kSendRarp:
      return "SEND_RARP";
    case Request::kNetSetMtu:
      return "NET_SET_MTU";
    case Request::kSetBackendReqFd:
      return "SET_BACKEND_REQ_FD";
    case Request::kIotlbMsg:
      return "IOTLB_MSG";
    case Request::kSetVringEndian:
      return "SET_VRING_ENDIAN";
    case Request::kGetConfig:
      return "GET_CONFIG";
    case Request::kSetConfig:
      return "SET_CONFIG";
    case Request::kCreateCryptoSession:
      return "CREATE_CRYPTO_SESSION";
    case Request::kCloseCryptoSession:
      return "CLOSE_CRYPTO_SESSION";
    case Request::kPostcopyAdvise:
      return "POSTCOPY_ADVISE";
    case Request::kPostcopyListen:
      return "POSTCOPY_LISTEN";
    case Request::kPostcopyEnd:
      return "POSTCOPY_END";
    case Request::kGetInflightFd:
      return "GET_INFLIGHT_FD";
    case Request::kSetInflightFd:
      return "SET_INFLIGHT_FD";
    case Request::kGpuSetSocket:
      return "GPU_SET_SOCKET";
    case Request::kResetDevice:
      return "RESET_DEVICE";
    case Request::kVringKick:
      return "VRING_KICK";
    case Request::kGetMaxMemSlots:
      return "GET_MAX_MEM_SLOTS";
    case Request::kAddMemReg:
      return "ADD_MEM_REG";
    case Request::kRemMemReg:
      return "REM_MEM_REG";
    case Request::kSetStatus:
      return "SET_STATUS";
    case Request::kGetStatus:
      return "GET_STATUS";
  }
  return "UNKNOWN";
}

const char* VhostUserErrorName(VhostUserError e) {
  switch (e) {
    case VhostUserError::kPeerClosed:
      return "PeerClosed";
    case VhostUserError::kTruncatedMessage:
      return "TruncatedMessage";
    case VhostUserError::kBadVersion:
      return "BadVersion";
    case VhostUserError::kUnexpectedReply:
      return "UnexpectedReply";
    case VhostUserError::kPayloadTooLarge:
      return "PayloadTooLarge";
    case VhostUserError::kTooManyFds:
      return "TooManyFds";
    case VhostUserError::kSocketError:
      return "SocketError";
    case VhostUserError::kReplyNotSent:
      return "ReplyNotSent";
    case VhostUserError::kUnknownRequest:
      return "UnknownRequest";
    case VhostUserError::kUnsupportedRequest:
      return "UnsupportedRequest";
    case VhostUserError::kWrongPayloadSize:
      return "WrongPayloadSize";
    case VhostUserError::kWrongFdCount:
      return "WrongFdCount";
    case VhostUserError::kProtocolFeatureNotNegotiated:
      return "ProtocolFeatureNotNegotiated";
    case VhostUserError::kFeatureNotOffered:
      return "FeatureNotOffered";
    case VhostUserError::kInvalidQueueIndex:
      return "InvalidQueueIndex";
    case VhostUserError::kInvalidQueueSize:
      return "InvalidQueueSize";
    case VhostUserError::kInvalidValue:
      return "InvalidValue";
    case VhostUserError::kQueueRunning:
      return "QueueRunning";
    case VhostUserError::kEmptyMemoryTable:
      return "EmptyMemoryTable";
    case VhostUserError::kTooManyRegions:
      return "TooManyRegions";
    case VhostUserError::kBadRegion:
      return "BadRegion";
    case VhostUserError::kRegionOverlap:
      return "RegionOverlap";
    case VhostUserError::kRegionNotFound:
      return "RegionNotFound";
    case VhostUserError::kMmapFailed:
      return "MmapFailed";
    case VhostUserError::kAddressNotMapped:
      return "AddressNotMapped";
    case VhostUserError::kLoggingNotSupported:
      return "LoggingNotSupported";
    case VhostUserError::kPollingNotSupported:
      return "PollingNotSupported";
    case VhostUserError::kBadConfigAccess:
      return "BadConfigAccess";
    case VhostUserError::kDeviceRejected:
      return "DeviceRejected";
  }
  return "Unknown";
}

bool IsFramingError(VhostUserError e) {
  switch (e) {
    case VhostUserError::kPeerClosed:
    case VhostUserError::kTruncatedMessage:
    case VhostUserError::kBadVersion:
    case VhostUserError::kUnexpectedReply:
    case VhostUserError::kPayloadTooLarge:
    case VhostUserError::kTooManyFds:
    case VhostUserError::kSocketError:
    case VhostUserError::kReplyNotSent:
      return true;
    default:
      return false;
  }
}

ReplyKind ReplyKindOf(uint32_t request) {
  switch (static_cast<Request>(request)) {
    case Request::kGetFeatures:
    case Request::kGetProtocolFeatures:
    case Request::kGetVringBase:
    case Request::kGetQueueNum:
    case Request::kGetConfig:
    case Request::kGetMaxMemSlots:
    // Unsupported requests whose spec'd reply is a payload of their own.
    case Request::kIotlbMsg:
    case Request::kCreateCryptoSession:
    case Request::kPostcopyAdvise:
    case Request::kPostcopyEnd:
    case Request::kGetInflightFd:
    case Request::kGetStatus:
      return ReplyKind::kBody;
    default:
      return ReplyKind::kNone;
  }
}

VuStatus CheckMessageShape(const Message& m) {
  if (!IsKnown(m.request)) return VhostUserError::kUnknownRequest;
  const auto r = static_cast<Request>(m.request);
  if (IsNeverOffered(r)) return VhostUserError::kUnsupportedRequest;
  size_t size = 0;
  FdRule fds;
  switch (r) {
    case Request::kGetFeatures:
    case Request::kSetOwner:
    case Request::kResetOwner:
    case Request::kGetProtocolFeatures:
    case Request::kGetQueueNum:
    case Request::kResetDevice:
    case Request::kGetMaxMemSlots:
      size = 0;
      break;
    case Request::kSetFeatures:
    case Request::kSetProtocolFeatures:
      size = 8;
      break;
    case Request::kSetVringNum:
    case Request::kSetVringBase:
    case Request::kGetVringBase:
    case Request::kSetVringEnable:
      size = kVringStateSize;
      break;
    case Request::kSetVringAddr:
      size = kVringAddrSize;
      break;
    case Request::kSetVringKick:
    case Request::kSetVringCall:
    case Request::kSetVringErr: {
      size = 8;
      if (m.payload.size() == 8) {
        bool nofd = (Get64(m.payload.data()) & kVringNoFdMask) != 0;
        fds = nofd ? FdRule{0, 0} : FdRule{1, 1};
      }
      break;
    }
    case Request::kSetMemTable: {
      if (m.payload.size() < kMemTableHeaderSize) return VhostUserError::kWrongPayloadSize;
      uint32_t n = Get32(m.payload.data());
      if (n == 0) return VhostUserError::kEmptyMemoryTable;
      if (n > kMaxMemTableRegions) return VhostUserError::kTooManyRegions;
      size = kMemTableHeaderSize + size_t{n} * kMemoryRegionSize;
      fds = FdRule{static_cast<int>(n), static_cast<int>(n)};
      break;
    }
    case Request::kGetConfig:
    case Request::kSetConfig: {
      if (m.payload.size() < kConfigHeaderSize) return VhostUserError::kWrongPayloadSize;
      uint32_t n = Get32(m.payload.data() + 4);
      if (n > kMaxConfigSize) return VhostUserError::kWrongPayloadSize;
      size = kConfigHeaderSize + n;
      break;
    }
    case Request::kAddMemReg:
      size = kSingleRegionSize;
      fds = FdRule{1, 1};
      break;
    case Request::kSetBackendReqFd:  // the back-end channel's socket
      size = 0;
      fds = FdRule{1, 1};
      break;
    case Request::kRemMemReg:
      // "No file descriptors SHOULD be passed ... the back-end MAY accept
      // messages with one file descriptor" (and closes it unused).
      size = kSingleRegionSize;
      fds = FdRule{0, 1};
      break;
    default:
      return VhostUserError::kUnknownRequest;
  }
  if (VuStatus st = ExpectSize(m, size); !st.ok()) return st;
  return ExpectFds(m, fds);
}

VuResult<uint64_t> DecodeU64(const Message& m) {
  if (m.payload.size() != 8) return VhostUserError::kWrongPayloadSize;
  return Get64(m.payload.data());
}

VuResult<VringState> DecodeVringState(const Message& m) {
  if (m.payload.size() != kVringStateSize) return VhostUserError::kWrongPayloadSize;
  return VringState{Get32(m.payload.data()), Get32(m.payload.data() + 4)};
}

VuResult<VringAddr> DecodeVringAddr(const Message& m) {
  if (m.payload.size() != kVringAddrSize) return VhostUserError::kWrongPayloadSize;
  const uint8_t* p = m.payload.data();
  VringAddr a;
  a.index = Get32(p);
  a.flags = Get32(p + 4);
  a.desc_user_addr = Get64(p + 8);
  a.used_user_addr = Get64(p + 16);
  a.avail_user_addr = Get64(p + 24);
  a.log_guest_addr = Get64(p + 32);
  return a;
}

VuResult<std::vector<MemoryRegionDesc>> DecodeMemTable(const Message& m) {
  if (m.payload.size() < kMemTableHeaderSize) return VhostUserError::kWrongPayloadSize;
  uint32_t n = Get32(m.payload.data());
  if (n == 0) return VhostUserError::kEmptyMemoryTable;
  if (n > kMaxMemTableRegions) return VhostUserError::kTooManyRegions;
  if (m.payload.size() != kMemTableHeaderSize + size_t{n} * kMemoryRegionSize) {
    return VhostUserError::kWrongPayloadSize;
  }
  std::vector<MemoryRegionDesc> regions;
  regions.reserve(n);
  for (uint32_t i = 0; i < n; ++i) {
    regions.push_back(GetRegion(m.payload.data() + kMemTableHeaderSize + i * kMemoryRegionSize));
  }
  return regions;
}

VuResult<MemoryRegionDesc> DecodeSingleRegion(const Message& m) {
  if (m.payload.size() != kSingleRegionSize) return VhostUserError::kWrongPayloadSize;
  return GetRegion(m.payload.data() + 8);
}

VuResult<ConfigAccess> DecodeConfig(const Message& m) {
  if (m.payload.size() < kConfigHeaderSize) return VhostUserError::kWrongPayloadSize;
  const uint8_t* p = m.payload.data();
  uint32_t size = Get32(p + 4);
  if (size > kMaxConfigSize || m.payload.size() != kConfigHeaderSize + size_t{size}) {
    return VhostUserError::kWrongPayloadSize;
  }
  ConfigAccess c;
  c.offset = Get32(p);
  c.flags = Get32(p + 8);
  c.data.assign(p + kConfigHeaderSize, p + kConfigHeaderSize + size);
  return c;
}

std::vector<uint8_t> EncodeU64(uint64_t v) {
  std::vector<uint8_t> out;
  Put64(out, v);
  return out;
}

std::vector<uint8_t> EncodeVringState(const VringState& s) {
  std::vector<uint8_t> out;
  Put32(out, s.index);
  Put32(out, s.num);
  return out;
}

std::vector<uint8_t> EncodeVringAddr(const VringAddr& a) {
  std::vector<uint8_t> out;
  Put32(out, a.index);
  Put32(out, a.flags);
  Put64(out, a.desc_user_addr);
  Put64(out, a.used_user_addr);
  Put64(out, a.avail_user_addr);
  Put64(out, a.log_guest_addr);
  return out;
}

std::vector<uint8_t> EncodeMemTable(const std::vector<MemoryRegionDesc>& regions) {
  std::vector<uint8_t> out;
  Put32(out, static_cast<uint32_t>(regions.size()));
  Put32(out, 0);
  for (const MemoryRegionDesc& r : regions) PutRegion(out, r);
  return out;
}

std::vector<uint8_t> EncodeSingleRegion(const MemoryRegionDesc& r) {
  std::vector<uint8_t> out;
  Put64(out, 0);
  PutRegion(out, r);
  return out;
}

std::vector<uint8_t> EncodeConfig(const ConfigAccess& c) {
  std::vector<uint8_t> out;
  Put32(out, c.offset);
  Put32(out, static_cast<uint32_t>(c.data.size()));
  Put32(out, c.flags);
  out.insert(out.end(), c.data.begin(), c.data.end());
  return out;
}

Message MakeReply(const Message& request, std::vector<uint8_t> payload) {
  Message reply;
  reply.request = request.request;
  reply.flags = kVersion | kFlagReply;
  reply.payload = std::move(payload);
  return reply;
}

// ---- Framing ----------------------------------------------------------------

VuResult<std::optional<Message>> MessageReader::Read(int fd) {
  for (;;) {
    const bool in_header = got_ < kHeaderSize;
    uint8_t* dst;
    size_t want;
    if (in_header) {
      dst = header_ + got_;
      want = kHeaderSize - got_;
    } else {
      size_t done = got_ - kHeaderSize;
      want = msg_.payload.size() - done;
      dst = msg_.payload.data() + done;
    }
    if (want > 0) {
      iovec iov{dst, want};
      alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFds)];
      msghdr mh{};
      mh.msg_iov = &iov;
      mh.msg_iovlen = 1;
      mh.msg_control = control;
      mh.msg_controllen = sizeof control;
      ssize_t n = recvmsg(fd, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return std::optional<Message>();
        return VhostUserError::kSocketError;
      }
      // Descriptors first: even with an error below they must be closed.
      bool fds_ok = CollectFds(&mh, msg_.fds, static_cast<size_t>(kMaxFds));
      if (!fds_ok) return VhostUserError::kTooManyFds;
      if (n == 0) {
        return got_ == 0 && msg_.fds.empty() ? VhostUserError::kPeerClosed
                                             : VhostUserError::kTruncatedMessage;
      }
      got_ += static_cast<size_t>(n);
      if (got_ < kHeaderSize) continue;
      if (in_header && got_ == kHeaderSize) {
        uint32_t request = Get32(header_);
        uint32_t flags = Get32(header_ + 4);
        uint32_t size = Get32(header_ + 8);
        if ((flags & kVersionMask) != kVersion) return VhostUserError::kBadVersion;
        if (flags & kFlagReply) return VhostUserError::kUnexpectedReply;
        if (size > kMaxPayloadSize) return VhostUserError::kPayloadTooLarge;
        msg_.request = request;
        msg_.flags = flags;
        msg_.payload.assign(size, 0);
      }
    }
    if (got_ == kHeaderSize + msg_.payload.size()) {
      Message out = std::move(msg_);
      msg_ = Message();
      got_ = 0;
      return std::optional<Message>(std::move(out));
    }
  }
}

VuResult<Message> ReadMessageBlocking(int fd, int timeout_ms) {
  // Replies carry the reply flag, which MessageReader refuses in requests;
  // this reader is for the front-end side, so it parses on its own.
  Message m;
  uint8_t header[kHeaderSize];
  size_t got = 0;
  size_t total = kHeaderSize;
  bool have_header = false;
  while (got < total) {
    pollfd p{fd, POLLIN, 0};
    int r = poll(&p, 1, timeout_ms);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return VhostUserError::kSocketError;
    uint8_t* dst = have_header ? m.payload.data() + (got - kHeaderSize) : header + got;
    iovec iov{dst, total - got};
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFds)];
    msghdr mh{};
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = control;
    mh.msg_controllen = sizeof control;
    ssize_t n = recvmsg(fd, &mh, MSG_CMSG_CLOEXEC);
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return VhostUserError::kSocketError;
    }
    if (!CollectFds(&mh, m.fds, static_cast<size_t>(kMaxFds))) return VhostUserError::kTooManyFds;
    if (n == 0) return got == 0 ? VhostUserError::kPeerClosed : VhostUserError::kTruncatedMessage;
    got += static_cast<size_t>(n);
    if (!have_header && got == kHeaderSize) {
      have_header = true;
      m.request = Get32(header);
      m.flags = Get32(header + 4);
      uint32_t size = Get32(header + 8);
      if ((m.flags & kVersionMask) != kVersion) return VhostUserError::kBadVersion;
      if (size > kMaxPayloadSize) return VhostUserError::kPayloadTooLarge;
      m.payload.assign(size, 0);
      total = kHeaderSize + size;
    }
  }
  return m;
}

VuStatus SendMessage(int fd, const Message& m, bool nonblocking) {
  if (m.fds.size() > static_cast<size_t>(kMaxFds)) return VhostUserError::kTooManyFds;
  uint8_t header[kHeaderSize];
  uint32_t size = static_cast<uint32_t>(m.payload.size());
  std::memcpy(header, &m.request, 4);
  std::memcpy(header + 4, &m.flags, 4);
  std::memcpy(header + 8, &size, 4);
  iovec iov[2] = {{header, kHeaderSize},
                  {const_cast<uint8_t*>(m.payload.data()), m.payload.size()}};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFds)] = {};
  msghdr mh{};
  mh.msg_iov = iov;
  mh.msg_iovlen = m.payload.empty() ? 1 : 2;
  if (!m.fds.empty()) {
    mh.msg_control = control;
    mh.msg_controllen = CMSG_SPACE(sizeof(int) * m.fds.size());
    cmsghdr* c = CMSG_FIRSTHDR(&mh);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * m.fds.size());
    for (size_t i = 0; i < m.fds.size(); ++i) {
      int v = m.fds[i].get();
      std::memcpy(CMSG_DATA(c) + i * sizeof(int), &v, sizeof(int));
    }
  }
  const size_t total = kHeaderSize + m.payload.size();
  const int flags = MSG_NOSIGNAL | (nonblocking ? MSG_DONTWAIT : 0);
  ssize_t n;
  do {
    n = sendmsg(fd, &mh, flags);
  } while (n < 0 && errno == EINTR);
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) return VhostUserError::kReplyNotSent;
    return VhostUserError::kSocketError;
  }
  size_t sent = static_cast<size_t>(n);
  // A stream socket may take part of it; send the rest (no more descriptors).
  while (sent < total) {
    if (nonblocking) return VhostUserError::kReplyNotSent;
    std::vector<uint8_t> rest;
    rest.reserve(total - sent);
    for (size_t i = sent; i < total; ++i) {
      rest.push_back(i < kHeaderSize ? header[i] : m.payload[i - kHeaderSize]);
    }
    n = send(fd, rest.data(), rest.size(), MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      return VhostUserError::kSocketError;
    }
    sent += static_cast<size_t>(n);
  }
  return {};
}

// ---- The socket -------------------------------------------------------------------

Result<UniqueFd> ListenOnUnixSocket(const std::string& path) {
  sockaddr_un addr{};
  if (path.empty() || path.size() >= sizeof addr.sun_path) {
    return Status::InvalidArgument("socket path '" + path + "' is empty or longer than " +
                                   std::to_string(sizeof addr.sun_path - 1) + " bytes");
  }
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.data(), path.size());
  struct stat st;
  if (lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      return Status::InvalidArgument("'" + path + "' exists and is not a socket");
    }
    UniqueFd probe(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!probe.valid()) return Status::FromErrno(errno, "socket");
    if (connect(probe.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) {
      return Status::Busy("socket '" + path + "' is in use by a running server");
    }
    if (errno != ECONNREFUSED) return Status::FromErrno(errno, "socket '" + path + "'");
    // Nobody listens: a stale socket from an earlier run.
    if (unlink(path.c_str()) < 0) return Status::FromErrno(errno, "remove stale '" + path + "'");
  }
  UniqueFd fd(socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return Status::FromErrno(errno, "socket");
  if (bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) < 0) {
    if (errno == EADDRINUSE) return Status::Busy("socket '" + path + "' is in use");
    return Status::FromErrno(errno, "bind '" + path + "'");
  }
  if (listen(fd.get(), 1) < 0) {
    int err = errno;
    unlink(path.c_str());
    return Status::FromErrno(err, "listen on '" + path + "'");
  }
  return fd;
}

}  // namespace kvblk::vhost_user
