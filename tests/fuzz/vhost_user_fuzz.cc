// libFuzzer target: a hostile vhost-user front end. The input is a script of
// messages sent over a socketpair to a VhostUserServer (the `kvblk serve`
// engine) that serves a raw in-memory disk; the server handles the whole
// stream and returns when the front end's side is shut down.
//
// Each script entry is either a raw chunk of bytes written to the socket
// (framing: bad versions, oversized or truncated messages), or a message
// built from a request number, flags and a payload taken from the input,
// optionally with descriptors attached: memfds holding input bytes (for
// SET_MEM_TABLE / ADD_MEM_REG, so that rings may land in mapped memory),
// eventfds (kick, call, err; some already signalled, so the server sees a
// kick as soon as it watches one) or /dev/null. Payload sizes are biased
// towards what each request prescribes, and a payload may start with a user
// address inside a memfd the server has been sent, so messages get past the
// shape checks into the handlers.
//
// Replies are not read: they stay in the socket buffer (a full buffer is
// the server's kReplyNotSent, which must be handled cleanly too).
#include <fcntl.h>
#include <fuzzer/FuzzedDataProvider.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "disk/mem_file.h"
#include "disk/raw_device.h"
#include "virtio/vhost_user_protocol.h"
#include "virtio/vhost_user_server.h"

namespace kvblk {
namespace {

using vhost_user::UniqueFd;

constexpr size_t kDiskBytes = 128 << 10;
constexpr size_t kRegionBytes = 64 << 10;
constexpr int kMaxEntries = 48;

// Payload sizes the requests prescribe (vhost_user_protocol.h), to steer the
// fuzzer past the shape checks.
size_t NaturalSize(uint32_t request, FuzzedDataProvider& in) {
  using vhost_user::Request;
  switch (static_cast<Request>(request)) {
    case Request::kSetFeatures:
    case Request::kSetProtocolFeatures:
    case Request::kSetVringKick:
    case Request::kSetVringCall:
    case Request::kSetVringErr:
      return 8;
    case Request::kSetVringNum:
    case Request::kSetVringBase:
    case Request::kGetVringBase:
    case Request::kSetVringEnable:
      return vhost_user::kVringStateSize;
    case Request::kSetVringAddr:
      return vhost_user::kVringAddrSize;
    case Request::kSetMemTable:
      return vhost_user::kMemTableHeaderSize +
             vhost_user::kMemoryRegionSize * in.ConsumeIntegralInRange<size_t>(0, 9);
    case Request::kAddMemReg:
    case Request::kRemMemReg:
      return vhost_user::kSingleRegionSize;
    case Request::kGetConfig:
    case Request::kSetConfig:
      return vhost_user::kConfigHeaderSize + in.ConsumeIntegralInRange<size_t>(0, 100);
    default:
      return 0;
  }
}

class Frontend {
 public:
  Frontend(FuzzedDataProvider& in, int sock) : in_(in), sock_(sock) {}

  // Sends the whole script; false if the socket stopped taking data.
  bool SendScript() {
    const int entries = in_.ConsumeIntegralInRange<int>(0, kMaxEntries);
    for (int i = 0; i < entries && in_.remaining_bytes() > 0; ++i) {
      if (!(in_.ConsumeIntegralInRange<int>(0, 15) == 0 ? SendRaw() : SendMessage())) {
        return false;
      }
    }
    return true;
  }

 private:
  bool SendRaw() {
    std::vector<uint8_t> bytes = in_.ConsumeBytes<uint8_t>(in_.ConsumeIntegralInRange(1, 300));
    return Send(bytes, {});
  }

  bool SendMessage() {
    uint32_t request = in_.ConsumeBool() ? in_.ConsumeIntegralInRange<uint32_t>(1, 40)
                                         : in_.ConsumeIntegral<uint32_t>();
    uint32_t flags = vhost_user::kVersion;
    if (in_.ConsumeBool()) flags |= vhost_user::kFlagNeedReply;
    if (in_.ConsumeIntegralInRange<int>(0, 15) == 0) flags = in_.ConsumeIntegral<uint32_t>();
    size_t size = in_.ConsumeIntegralInRange<int>(0, 7) == 0
                      ? in_.ConsumeIntegralInRange<size_t>(0, 400)
                      : NaturalSize(request, in_);
    std::vector<UniqueFd> fds;
    const int nfds = in_.ConsumeIntegralInRange<int>(0, 7) < 5 ? Fds(request) : 9;
    for (int i = 0; i < nfds; ++i) {
      UniqueFd fd = MakeFd(request);
      if (!fd.valid()) return false;
      fds.push_back(std::move(fd));
    }
    std::vector<uint8_t> payload = in_.ConsumeBytes<uint8_t>(size);
    payload.resize(size);
    // Aim a user address (a ring address in SET_VRING_ADDR, a region's
    // userspace_addr) at memory a memfd sent so far is mapped at, here and
    // (if the server accepted it) in the server's region table.
    if (!mapped_uva_.empty() && payload.size() >= 16 && in_.ConsumeBool()) {
      const size_t slot = 8 * in_.ConsumeIntegralInRange<size_t>(1, (payload.size() - 8) / 8);
      uint64_t uva = mapped_uva_[in_.ConsumeIntegralInRange<size_t>(0, mapped_uva_.size() - 1)] +
                     in_.ConsumeIntegralInRange<uint64_t>(0, 4) * (kRegionBytes / 4);
      std::memcpy(payload.data() + slot, &uva, 8);
    }

    std::vector<uint8_t> msg(vhost_user::kHeaderSize);
    const uint32_t psize = static_cast<uint32_t>(payload.size());
    std::memcpy(msg.data(), &request, 4);
    std::memcpy(msg.data() + 4, &flags, 4);
    std::memcpy(msg.data() + 8, &psize, 4);
    msg.insert(msg.end(), payload.begin(), payload.end());
    return Send(msg, fds);
  }

  // How many descriptors a well-formed message of `request` carries.
  int Fds(uint32_t request) {
    using vhost_user::Request;
    switch (static_cast<Request>(request)) {
      case Request::kSetMemTable:
        return in_.ConsumeIntegralInRange<int>(1, 8);
      case Request::kAddMemReg:
      case Request::kSetVringKick:
      case Request::kSetVringCall:
      case Request::kSetVringErr:
        return 1;
      default:
        return in_.ConsumeIntegralInRange<int>(0, 15) == 0 ? 1 : 0;
    }
  }

  UniqueFd MakeFd(uint32_t request) {
    using vhost_user::Request;
    const bool memory =
        request == uint32_t(Request::kSetMemTable) || request == uint32_t(Request::kAddMemReg);
    switch (memory ? 0 : in_.ConsumeIntegralInRange<int>(1, 4)) {
      case 0: {
        UniqueFd fd(memfd_create("fuzz-guest", MFD_CLOEXEC));
        if (!fd.valid() || ftruncate(fd.get(), kRegionBytes) != 0) return UniqueFd();
        std::vector<uint8_t> fill = in_.ConsumeBytes<uint8_t>(in_.ConsumeIntegralInRange(0, 256));
        if (!fill.empty() && pwrite(fd.get(), fill.data(), fill.size(), 0) < 0) return UniqueFd();
        // The address this front end would give the region: its own mapping.
        void* p = mmap(nullptr, kRegionBytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
        if (p == MAP_FAILED) return UniqueFd();
        mappings_.push_back(p);
        mapped_uva_.push_back(reinterpret_cast<uint64_t>(p));
        return fd;
      }
      case 1:
      case 2: {
        UniqueFd fd(eventfd(in_.ConsumeBool() ? 1 : 0, EFD_CLOEXEC | EFD_NONBLOCK));
        return fd;
      }
      case 3:
        return UniqueFd(open("/dev/null", O_RDWR | O_CLOEXEC));
      default:
        return UniqueFd(memfd_create("fuzz-small", MFD_CLOEXEC));
    }
  }

  bool Send(const std::vector<uint8_t>& bytes, const std::vector<UniqueFd>& fds) {
    iovec iov{const_cast<uint8_t*>(bytes.data()), bytes.size()};
    msghdr mh{};
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    alignas(cmsghdr) uint8_t control[CMSG_SPACE(sizeof(int) * 16)] = {};
    if (!fds.empty()) {
      mh.msg_control = control;
      mh.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
      cmsghdr* c = CMSG_FIRSTHDR(&mh);
      c->cmsg_level = SOL_SOCKET;
      c->cmsg_type = SCM_RIGHTS;
      c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
      int* out = reinterpret_cast<int*>(CMSG_DATA(c));
      for (size_t i = 0; i < fds.size(); ++i) out[i] = fds[i].get();
    }
    ssize_t n = sendmsg(sock_, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0) return false;
    // A short send leaves the rest of the stream unsent; that is just a
    // truncated message to the server.
    return static_cast<size_t>(n) == bytes.size();
  }

 public:
  ~Frontend() {
    for (void* p : mappings_) munmap(p, kRegionBytes);
  }

 private:
  FuzzedDataProvider& in_;
  int sock_;
  std::vector<void*> mappings_;
  std::vector<uint64_t> mapped_uva_;
};

void FuzzOne(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) return;
  UniqueFd ours(sv[1]);
  int buf = 1 << 20;
  setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &buf, sizeof buf);
  setsockopt(sv[1], SOL_SOCKET, SO_RCVBUF, &buf, sizeof buf);

  auto file = MemFile::Create("fuzz-disk");
  if (!file->Truncate(kDiskBytes).ok()) {
    close(sv[0]);
    return;
  }
  auto disk = RawDevice::Open(std::move(file));
  if (!disk.ok()) {
    close(sv[0]);
    return;
  }
  VhostUserServerOptions opts;
  opts.connection_fd = sv[0];
  opts.device.num_queues = in.ConsumeIntegralInRange<int>(1, 3);
  opts.device.max_queue_size = 64;
  opts.device.serial = "fuzz";
  opts.max_mem_slots = in.ConsumeIntegralInRange<uint32_t>(1, 10);
  opts.log = [](const std::string&) {};
  auto server = VhostUserServer::Create(**disk, std::move(opts));
  if (!server.ok()) return;

  {
    Frontend fe(in, ours.get());
    fe.SendScript();
    shutdown(ours.get(), SHUT_WR);
    (void)(*server)->Run();
    server->reset();
  }
}

}  // namespace
}  // namespace kvblk

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  kvblk::FuzzOne(data, size);
  return 0;
}
