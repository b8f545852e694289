#include "perf/fio/vhost_user_client.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <thread>

namespace kvblk::perf {
namespace {

// vhost-user requests (vhost-user.rst, "Front-end message types").
constexpr uint32_t kGetFeatures = 1;
constexpr uint32_t kSetFeatures = 2;
constexpr uint32_t kSetOwner = 3;
constexpr uint32_t kSetMemTable = 5;
constexpr uint32_t kSetVringNum = 8;
constexpr uint32_t kSetVringAddr = 9;
constexpr uint32_t kSetVringBase = 10;
constexpr uint32_t kSetVringKick = 12;
constexpr uint32_t kSetVringCall = 13;
constexpr uint32_t kGetProtocolFeatures = 15;
constexpr uint32_t kSetProtocolFeatures = 16;
constexpr uint32_t kGetQueueNum = 17;
constexpr uint32_t kSetVringEnable = 18;
constexpr uint32_t kGetConfig = 24;

const char* RequestName(uint32_t r) {
  switch (r) {
    case kGetFeatures:
      return "GET_FEATURES";
    case kSetFeatures:
      return "SET_FEATURES";
    case kSetOwner:
      return "SET_OWNER";
    case kSetMemTable:
      return "SET_MEM_TABLE";
    case kSetVringNum:
      return "SET_VRING_NUM";
    case kSetVringAddr:
      return "SET_VRING_ADDR";
    case kSetVringBase:
      return "SET_VRING_BASE";
    case kSetVringKick:
      return "SET_VRING_KICK";
    case kSetVringCall:
      return "SET_VRING_CALL";
    case kGetProtocolFeatures:
      return "GET_PROTOCOL_FEATURES";
    case kSetProtocolFeatures:
      return "SET_PROTOCOL_FEATURES";
    case kGetQueueNum:
      return "GET_QUEUE_NUM";
    case kSetVringEnable:
      return "SET_VRING_ENABLE";
    case kGetConfig:
      return "GET_CONFIG";
    default:
      return "request";
  }
}

// Header flags.
constexpr uint32_t kVersion = 0x1;
constexpr uint32_t kFlagReply = 1u << 2;
constexpr uint32_t kFlagNeedReply = 1u << 3;

// Feature bits.
constexpr int kFProtocolFeatures = 30;  // VHOST_USER_F_PROTOCOL_FEATURES
constexpr int kPfMq = 0;
constexpr int kPfReplyAck = 3;
constexpr int kPfConfig = 9;

constexpr int kVirtioFVersion1 = 32;
constexpr int kVirtioRingFEventIdx = 29;
constexpr int kBlkFSizeMax = 1;
constexpr int kBlkFSegMax = 2;
constexpr int kBlkFRo = 5;
constexpr int kBlkFBlkSize = 6;
constexpr int kBlkFFlush = 9;
constexpr int kBlkFTopology = 10;
constexpr int kBlkFMq = 12;
constexpr int kBlkFDiscard = 13;

constexpr uint64_t Bit(int b) { return uint64_t{1} << b; }

// virtio-blk request types (5.2.6).
constexpr uint32_t kTIn = 0;
constexpr uint32_t kTOut = 1;
constexpr uint32_t kTFlush = 4;
constexpr uint32_t kTDiscard = 11;

// Split virtqueue flags (2.7).
constexpr uint16_t kDescNext = 1;
constexpr uint16_t kDescWrite = 2;
constexpr uint16_t kUsedNoNotify = 1;

constexpr uint32_t kSectorSize = 512;
constexpr size_t kPage = 4096;

size_t AlignUp(size_t v, size_t a) { return (v + a - 1) / a * a; }

struct MsgHeader {
  uint32_t request;
  uint32_t flags;
  uint32_t size;
} __attribute__((packed));

struct VringState {
  uint32_t index;
  uint32_t num;
};

struct VringAddr {
  uint32_t index;
  uint32_t flags;
  uint64_t desc;
  uint64_t used;
  uint64_t avail;
  uint64_t log;
};

struct MemRegion {
  uint64_t guest_phys_addr;
  uint64_t memory_size;
  uint64_t userspace_addr;
  uint64_t mmap_offset;
};

struct MemTable {
  uint32_t nregions;
  uint32_t padding;
  MemRegion regions[1];
};

struct ConfigMsg {
  uint32_t offset;
  uint32_t size;
  uint32_t flags;
  uint8_t payload[36];  // up to and including num_queues (5.2.4)
};

// A socket error or a connection the back end closed: worth a retry while
// connecting (qemu-storage-daemon serves one client at a time and may
// still be dropping the previous one).
bool Retryable(const Status& st) {
  int e = st.sys_errno();
  return e == ECONNRESET || e == EPIPE || e == ECONNREFUSED || e == ENOENT || e == EAGAIN;
}

Result<int> ConnectSocket(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path)) {
    return Status::InvalidArgument(path + ": socket path too long");
  }
  memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Status::FromErrno(errno, "socket");
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    int e = errno;
    close(fd);
    return Status::FromErrno(e, path + ": connect");
  }
  return fd;
}

Status ReadFull(int fd, void* buf, size_t len, const std::string& what) {
  auto* p = static_cast<uint8_t*>(buf);
  while (len > 0) {
    ssize_t n = read(fd, p, len);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Status::FromErrno(errno, what);
    if (n == 0) {
      return Status(StatusCode::kIoError, what + ": the back end closed the connection",
                    ECONNRESET);
    }
    p += n;
    len -= static_cast<size_t>(n);
  }
  return Status::Ok();
}

}  // namespace

// ---------------------------------------------------------------------------
// BlkQueue

uint64_t BlkQueue::Gpa(const void* p) const {
  return static_cast<uint64_t>(static_cast<const uint8_t*>(p) - client_->mem_);
}

Status BlkQueue::Add(Op op, uint64_t offset, void* buf, uint32_t len, void* cookie) {
  if (free_.empty()) return Status::Busy("virtqueue full");
  if (offset % kSectorSize != 0 || len % kSectorSize != 0) {
    return Status::InvalidArgument("offset/length not a multiple of 512");
  }
  if ((op == Op::kRead || op == Op::kWrite) && !client_->InDataArea(buf, len)) {
    return Status::InvalidArgument("buffer outside the shared memory");
  }
  uint16_t slot = free_.back();
  free_.pop_back();
  SlotMem& m = slot_mem_[slot];
  uint16_t head = static_cast<uint16_t>(slot * 3);
  Desc* d = &desc_[head];
  m.ioprio = 0;
  m.sector = offset / kSectorSize;
  m.status = 0xff;
  d[0] = Desc{Gpa(&m.type), 16, kDescNext, static_cast<uint16_t>(head + 1)};
  d[2] = Desc{Gpa(&m.status), 1, kDescWrite, 0};
  switch (op) {
    case Op::kRead:
      m.type = kTIn;
      d[1] = Desc{Gpa(buf), len, kDescNext | kDescWrite, static_cast<uint16_t>(head + 2)};
      break;
    case Op::kWrite:
      m.type = kTOut;
      d[1] = Desc{Gpa(buf), len, kDescNext, static_cast<uint16_t>(head + 2)};
      break;
    case Op::kFlush:
      m.type = kTFlush;
      m.sector = 0;
      d[0].next = static_cast<uint16_t>(head + 2);
      break;
    case Op::kDiscard:
      m.type = kTDiscard;
      m.sector = 0;
      m.seg_sector = offset / kSectorSize;
      m.seg_num_sectors = len / kSectorSize;
      m.seg_flags = 0;
      d[1] = Desc{Gpa(&m.seg_sector), 16, kDescNext, static_cast<uint16_t>(head + 2)};
      break;
  }
  cookies_[slot] = cookie;
  avail_[2 + avail_idx_ % size_] = head;
  ++avail_idx_;
  return Status::Ok();
}

void BlkQueue::Publish() {
  if (avail_idx_ == published_idx_) return;
  const uint16_t old_idx = published_idx_;
  // Descriptors and ring entries before the index (2.7.13).
  __atomic_store_n(&avail_[1], avail_idx_, __ATOMIC_RELEASE);
  published_idx_ = avail_idx_;
  // The index store before reading the device's notification fields.
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  bool kick;
  if (event_idx_) {
    // 2.7.10: kick only if avail_event lies in [old_idx, new index).
    const uint16_t event = __atomic_load_n(&used_hdr_[2 + 4 * size_], __ATOMIC_RELAXED);
    kick = static_cast<uint16_t>(avail_idx_ - event - 1) <
           static_cast<uint16_t>(avail_idx_ - old_idx);
  } else {
    kick = (__atomic_load_n(&used_hdr_[0], __ATOMIC_RELAXED) & kUsedNoNotify) == 0;
  }
  if (kick) {
    uint64_t one = 1;
    ssize_t n = write(kick_fd_, &one, sizeof(one));
    (void)n;  // EAGAIN: the counter is already non-zero, the device will look.
  }
}

unsigned BlkQueue::Reap(std::vector<BlkCompletion>* out, unsigned max) {
  uint16_t used_idx = __atomic_load_n(&used_hdr_[1], __ATOMIC_ACQUIRE);
  unsigned n = 0;
  while (last_used_ != used_idx && n < max) {
    UsedElem e = used_ring_[last_used_ % size_];
    ++last_used_;
    uint32_t slot = e.id / 3;
    if (e.id % 3 != 0 || slot >= slots_ || cookies_[slot] == nullptr) {
      // A device bug; nothing to complete.
      continue;
    }
    out->push_back(BlkCompletion{cookies_[slot], slot_mem_[slot].status});
    cookies_[slot] = nullptr;
    free_.push_back(static_cast<uint16_t>(slot));
    ++n;
  }
  return n;
}

bool BlkQueue::WaitForInterrupt(int timeout_ms) {
  if (event_idx_) {
    // Ask for an interrupt at the next used entry (used_event, 2.7.10),
    // then look again: one may have been added before the device read it.
    __atomic_store_n(&avail_[2 + size_], last_used_, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (__atomic_load_n(&used_hdr_[1], __ATOMIC_ACQUIRE) != last_used_) return true;
  }
  pollfd p{call_fd_, POLLIN, 0};
  int r;
  do {
    r = poll(&p, 1, timeout_ms);
  } while (r < 0 && errno == EINTR);
  if (r <= 0) return false;
  uint64_t v;
  ssize_t n = read(call_fd_, &v, sizeof(v));
  (void)n;
  return true;
}

// ---------------------------------------------------------------------------
// VhostUserBlkClient

VhostUserBlkClient::~VhostUserBlkClient() {
  if (sock_ >= 0) close(sock_);
  for (auto& q : queues_) {
    if (q->kick_fd_ >= 0) close(q->kick_fd_);
    if (q->call_fd_ >= 0) close(q->call_fd_);
  }
  if (mem_ != nullptr) munmap(mem_, mem_size_);
  if (mem_fd_ >= 0) close(mem_fd_);
}

Status VhostUserBlkClient::SendMsg(uint32_t request, const void* payload, uint32_t size,
                                   const int* fds, int nfds, bool want_ack) {
  bool ack = want_ack && reply_ack_;
  MsgHeader h{request, kVersion | (ack ? kFlagNeedReply : 0), size};
  iovec iov[2] = {{&h, sizeof(h)}, {const_cast<void*>(payload), size}};
  msghdr msg{};
  msg.msg_iov = iov;
  msg.msg_iovlen = size > 0 ? 2 : 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 8)];
  if (nfds > 0) {
    msg.msg_control = control;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
    memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
  }
  size_t total = sizeof(h) + size;
  ssize_t n;
  do {
    n = sendmsg(sock_, &msg, MSG_NOSIGNAL);
  } while (n < 0 && errno == EINTR);
  if (n < 0) return Status::FromErrno(errno, path_ + ": send " + RequestName(request));
  if (static_cast<size_t>(n) != total) {
    return Status(StatusCode::kIoError, path_ + ": short send of " + RequestName(request), EPIPE);
  }
  if (ack) {
    uint64_t v = 0;
    KVBLK_RETURN_IF_ERROR(RecvReply(request, &v, sizeof(v)));
    if (v != 0) {
      return Status(StatusCode::kIoError, path_ + ": the back end rejected " +
                                              RequestName(request) + " (ack " + std::to_string(v) +
                                              ")");
    }
  }
  return Status::Ok();
}

Status VhostUserBlkClient::RecvReply(uint32_t request, void* payload, uint32_t size,
                                     uint32_t* size_out) {
  std::string what = path_ + ": reply to " + RequestName(request);
  MsgHeader h;
  KVBLK_RETURN_IF_ERROR(ReadFull(sock_, &h, sizeof(h), what));
  if (h.request != request || (h.flags & kFlagReply) == 0 || (h.flags & 0x3) != kVersion) {
    return Status::InvalidArgument(what + ": unexpected message " + std::to_string(h.request) +
                                   " flags " + std::to_string(h.flags));
  }
  if (h.size > 4096) return Status::InvalidArgument(what + ": payload too large");
  std::vector<uint8_t> buf(h.size);
  if (h.size > 0) KVBLK_RETURN_IF_ERROR(ReadFull(sock_, buf.data(), h.size, what));
  if (size_out != nullptr) {
    if (h.size > size) return Status::InvalidArgument(what + ": payload too large");
    *size_out = h.size;
  } else if (h.size != size) {
    return Status::InvalidArgument(what + ": payload size " + std::to_string(h.size) +
                                   ", expected " + std::to_string(size));
  }
  memcpy(payload, buf.data(), h.size);
  return Status::Ok();
}

Status VhostUserBlkClient::GetU64(uint32_t request, uint64_t* out) {
  KVBLK_RETURN_IF_ERROR(SendMsg(request, nullptr, 0));
  return RecvReply(request, out, sizeof(*out));
}

Status VhostUserBlkClient::SetU64(uint32_t request, uint64_t value, bool want_ack) {
  return SendMsg(request, &value, sizeof(value), nullptr, 0, want_ack);
}

Status VhostUserBlkClient::Handshake(bool config_only) {
  uint64_t features = 0;
  KVBLK_RETURN_IF_ERROR(GetU64(kGetFeatures, &features));
  info_.device_features = features;
  if ((features & Bit(kFProtocolFeatures)) == 0) {
    return Status::NotSupported(path_ + ": back end lacks VHOST_USER_F_PROTOCOL_FEATURES");
  }
  if ((features & Bit(kVirtioFVersion1)) == 0) {
    return Status::NotSupported(path_ + ": back end lacks VIRTIO_F_VERSION_1");
  }
  uint64_t pf = 0;
  KVBLK_RETURN_IF_ERROR(GetU64(kGetProtocolFeatures, &pf));
  if ((pf & Bit(kPfConfig)) == 0) {
    return Status::NotSupported(path_ + ": back end lacks the CONFIG protocol feature");
  }
  uint64_t want_pf = pf & (Bit(kPfMq) | Bit(kPfReplyAck) | Bit(kPfConfig));
  KVBLK_RETURN_IF_ERROR(SetU64(kSetProtocolFeatures, want_pf, false));
  info_.protocol_features = want_pf;
  reply_ack_ = (want_pf & Bit(kPfReplyAck)) != 0;
  info_.max_queues = 1;
  if (want_pf & Bit(kPfMq)) {
    uint64_t nq = 0;
    KVBLK_RETURN_IF_ERROR(GetU64(kGetQueueNum, &nq));
    info_.max_queues = static_cast<uint32_t>(nq);
  }
  KVBLK_RETURN_IF_ERROR(SendMsg(kSetOwner, nullptr, 0, nullptr, 0, true));

  ConfigMsg cfg{};
  cfg.offset = 0;
  cfg.size = sizeof(cfg.payload);
  cfg.flags = 0;
  KVBLK_RETURN_IF_ERROR(SendMsg(kGetConfig, &cfg, sizeof(cfg)));
  ConfigMsg reply{};
  uint32_t got = 0;
  KVBLK_RETURN_IF_ERROR(RecvReply(kGetConfig, &reply, sizeof(reply), &got));
  if (got != sizeof(reply) || reply.size != sizeof(reply.payload)) {
    return Status(StatusCode::kIoError,
                  path_ + ": GET_CONFIG failed (reply of " + std::to_string(got) + " bytes)");
  }
  uint64_t capacity;
  memcpy(&capacity, reply.payload + 0, 8);  // le64 capacity (x86: native order)
  info_.capacity_bytes = capacity * kSectorSize;
  if (features & Bit(kBlkFBlkSize)) memcpy(&info_.blk_size, reply.payload + 20, 4);
  if (features & Bit(kBlkFMq)) {
    uint16_t nq;
    memcpy(&nq, reply.payload + 34, 2);
    if (nq >= 1 && nq < info_.max_queues) info_.max_queues = nq;
  }
  info_.read_only = (features & Bit(kBlkFRo)) != 0;
  info_.flush = (features & Bit(kBlkFFlush)) != 0;
  info_.discard = (features & Bit(kBlkFDiscard)) != 0;
  if (config_only) return Status::Ok();

  uint64_t wanted = Bit(kVirtioFVersion1) | Bit(kBlkFSizeMax) | Bit(kBlkFSegMax) | Bit(kBlkFRo) |
                    Bit(kBlkFBlkSize) | Bit(kBlkFFlush) | Bit(kBlkFTopology) | Bit(kBlkFMq) |
                    Bit(kBlkFDiscard) | Bit(kVirtioRingFEventIdx);
  info_.acked_features = features & wanted;
  KVBLK_RETURN_IF_ERROR(SetU64(kSetFeatures, info_.acked_features | Bit(kFProtocolFeatures), true));
  return Status::Ok();
}

Status VhostUserBlkClient::SetupMemoryAndQueues() {
  const uint16_t n = opts_.queue_size;
  // Per-queue layout: descriptor table, avail ring, used ring, request slots.
  const size_t desc_bytes = 16u * n;
  const size_t avail_bytes = 6 + 2u * n;
  const size_t used_off = AlignUp(desc_bytes + avail_bytes, kPage);
  const size_t used_bytes = 6 + 8u * n;
  const unsigned slots = n / 3;
  const size_t slot_off = AlignUp(used_off + used_bytes, 64);
  const size_t queue_bytes = AlignUp(slot_off + slots * sizeof(BlkQueue::SlotMem), kPage);
  data_off_ = queue_bytes * opts_.num_queues;
  mem_size_ = data_off_ + AlignUp(opts_.data_bytes, kPage);
  data_next_ = data_off_;

  mem_fd_ = memfd_create("kvblk-fio-guest-ram", MFD_CLOEXEC);
  if (mem_fd_ < 0) return Status::FromErrno(errno, "memfd_create");
  if (ftruncate(mem_fd_, static_cast<off_t>(mem_size_)) != 0) {
    return Status::FromErrno(errno, "ftruncate(memfd)");
  }
  void* p = mmap(nullptr, mem_size_, PROT_READ | PROT_WRITE, MAP_SHARED, mem_fd_, 0);
  if (p == MAP_FAILED) return Status::FromErrno(errno, "mmap(memfd)");
  mem_ = static_cast<uint8_t*>(p);

  MemTable table{};
  table.nregions = 1;
  table.regions[0] = MemRegion{0, mem_size_, reinterpret_cast<uint64_t>(mem_), 0};
  KVBLK_RETURN_IF_ERROR(SendMsg(kSetMemTable, &table, sizeof(table), &mem_fd_, 1, true));

  for (int i = 0; i < opts_.num_queues; ++i) {
    auto q = std::make_unique<BlkQueue>();
    uint8_t* base = mem_ + queue_bytes * i;
    q->client_ = this;
    q->index_ = i;
    q->size_ = n;
    q->slots_ = slots;
    q->event_idx_ = (info_.acked_features & Bit(kVirtioRingFEventIdx)) != 0;
    q->desc_ = reinterpret_cast<BlkQueue::Desc*>(base);
    q->avail_ = reinterpret_cast<uint16_t*>(base + desc_bytes);
    q->used_hdr_ = reinterpret_cast<uint16_t*>(base + used_off);
    q->used_ring_ = reinterpret_cast<BlkQueue::UsedElem*>(base + used_off + 4);
    q->slot_mem_ = reinterpret_cast<BlkQueue::SlotMem*>(base + slot_off);
    q->cookies_.assign(slots, nullptr);
    for (unsigned s = slots; s-- > 0;) q->free_.push_back(static_cast<uint16_t>(s));
    q->kick_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    q->call_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    BlkQueue* qp = q.get();
    queues_.push_back(std::move(q));
    if (qp->kick_fd_ < 0 || qp->call_fd_ < 0) return Status::FromErrno(errno, "eventfd");

    uint32_t idx = static_cast<uint32_t>(i);
    VringState num{idx, n};
    KVBLK_RETURN_IF_ERROR(SendMsg(kSetVringNum, &num, sizeof(num), nullptr, 0, true));
    VringState base_idx{idx, 0};
    KVBLK_RETURN_IF_ERROR(SendMsg(kSetVringBase, &base_idx, sizeof(base_idx), nullptr, 0, true));
    // Ring addresses are front-end user addresses, not guest physical ones.
    VringAddr addr{idx,
                   0,
                   reinterpret_cast<uint64_t>(qp->desc_),
                   reinterpret_cast<uint64_t>(qp->used_hdr_),
                   reinterpret_cast<uint64_t>(qp->avail_),
                   0};
    KVBLK_RETURN_IF_ERROR(SendMsg(kSetVringAddr, &addr, sizeof(addr), nullptr, 0, true));
    uint64_t which = idx;
    KVBLK_RETURN_IF_ERROR(SendMsg(kSetVringCall, &which, sizeof(which), &qp->call_fd_, 1, true));
    KVBLK_RETURN_IF_ERROR(SendMsg(kSetVringKick, &which, sizeof(which), &qp->kick_fd_, 1, true));
    VringState enable{idx, 1};
    KVBLK_RETURN_IF_ERROR(SendMsg(kSetVringEnable, &enable, sizeof(enable), nullptr, 0, true));
  }
  return Status::Ok();
}

namespace {

// Runs `attempt` (which connects and talks to the back end) until it
// succeeds, fails for a reason other than the connection, or the timeout
// passes.
template <typename F>
auto RetryConnect(const std::string& path, int timeout_ms, F attempt) -> decltype(attempt()) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    auto r = attempt();
    if (r.ok() || !Retryable(r.status()) || std::chrono::steady_clock::now() >= deadline) {
      if (!r.ok() && Retryable(r.status())) {
        return Status(r.status().code(),
                      r.status().message() + " (still failing after " + std::to_string(timeout_ms) +
                          " ms; qemu-storage-daemon serves one client per export at a time)",
                      r.status().sys_errno());
      }
      return r;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  (void)path;
}

}  // namespace

Result<std::unique_ptr<VhostUserBlkClient>> VhostUserBlkClient::Connect(
    const std::string& socket_path, const VhostUserClientOptions& opts) {
  if (opts.num_queues < 1 || opts.num_queues > 256) {
    return Status::InvalidArgument("num_queues must be 1..256");
  }
  if (opts.queue_size < 4 || (opts.queue_size & (opts.queue_size - 1)) != 0) {
    return Status::InvalidArgument("queue_size must be a power of two >= 4");
  }
  using R = Result<std::unique_ptr<VhostUserBlkClient>>;
  return RetryConnect(socket_path, opts.connect_timeout_ms, [&]() -> R {
    std::unique_ptr<VhostUserBlkClient> c(new VhostUserBlkClient);
    c->path_ = socket_path;
    c->opts_ = opts;
    KVBLK_ASSIGN_OR_RETURN(c->sock_, ConnectSocket(socket_path));
    KVBLK_RETURN_IF_ERROR(c->Handshake(false));
    if (static_cast<uint32_t>(opts.num_queues) > c->info_.max_queues) {
      return Status::NotSupported(socket_path + ": num_queues=" + std::to_string(opts.num_queues) +
                                  " but the back end has " + std::to_string(c->info_.max_queues));
    }
    KVBLK_RETURN_IF_ERROR(c->SetupMemoryAndQueues());
    return c;
  });
}

Result<VhostUserBlkInfo> VhostUserBlkClient::Probe(const std::string& socket_path,
                                                   int connect_timeout_ms) {
  using R = Result<VhostUserBlkInfo>;
  return RetryConnect(socket_path, connect_timeout_ms, [&]() -> R {
    VhostUserBlkClient c;
    c.path_ = socket_path;
    KVBLK_ASSIGN_OR_RETURN(c.sock_, ConnectSocket(socket_path));
    KVBLK_RETURN_IF_ERROR(c.Handshake(true));
    return c.info_;
  });
}

Result<void*> VhostUserBlkClient::AllocData(size_t len) {
  std::lock_guard<std::mutex> l(data_mu_);
  size_t start = AlignUp(data_next_, kPage);
  if (start + len > mem_size_ || start + len < start) {
    return Status(StatusCode::kNoSpace, "vhost-user shared data area exhausted (" +
                                            std::to_string(mem_size_ - data_off_) +
                                            " bytes); raise mem_size");
  }
  data_next_ = start + len;
  return static_cast<void*>(mem_ + start);
}

bool VhostUserBlkClient::InDataArea(const void* p, size_t len) const {
  auto* b = static_cast<const uint8_t*>(p);
  return b >= mem_ + data_off_ && b <= mem_ + mem_size_ &&
         len <= static_cast<size_t>(mem_ + mem_size_ - b);
}

}  // namespace kvblk::perf
