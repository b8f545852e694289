#include "virtio/vhost_user_server.h"

#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <exception>

#include "disk/loop_thread.h"

namespace kvblk {

using vhost_user::ConfigAccess;
using vhost_user::Hex;
using vhost_user::Message;
using vhost_user::Request;
using vhost_user::UniqueFd;
using vhost_user::VhostUserError;
using vhost_user::VringAddr;
using vhost_user::VringState;
using vhost_user::VuResult;
using vhost_user::VuStatus;

namespace {

constexpr int kMaxQueues = 256;              // the vring index of SET_VRING_* fds is 8 bits
constexpr uint32_t kMaxMemSlotsLimit = 512;  // a generous cap (QEMU uses at most 512)
constexpr int kMessagesPerWakeup = 64;       // then the loop gets a turn
constexpr int kLogBudget = 50;               // rate-limited lines per connection
constexpr int kMaxIoThreads = 64;

uint64_t Bit(int b) { return uint64_t{1} << b; }

bool IsPowerOfTwo(uint32_t v) { return v != 0 && (v & (v - 1)) == 0; }

}  // namespace

// ---- Lifetime ----------------------------------------------------------------

Result<std::unique_ptr<VhostUserServer>> VhostUserServer::Create(BlockDevice& disk,
                                                                 VhostUserServerOptions opts) {
  UniqueFd conn(opts.connection_fd);  // owned from here on, whatever happens
  opts.connection_fd = -1;
  if (opts.socket_path.empty() == !conn.valid()) {
    return Status::InvalidArgument("vhost-user: give either a socket path or a connection");
  }
  if (opts.device.num_queues < 1 || opts.device.num_queues > kMaxQueues) {
    return Status::InvalidArgument("vhost-user: num_queues " +
                                   std::to_string(opts.device.num_queues) + " is not in 1.." +
                                   std::to_string(kMaxQueues));
  }
  if (opts.max_mem_slots < 1 || opts.max_mem_slots > kMaxMemSlotsLimit) {
    return Status::InvalidArgument("vhost-user: max_mem_slots must be in 1.." +
                                   std::to_string(kMaxMemSlotsLimit));
  }
  if (!opts.log) {
    opts.log = [](const std::string& line) {
      std::fprintf(stderr, "vhost-user: %s\n", line.c_str());
    };
  }
  if (opts.iothreads < 1 || opts.iothreads > kMaxIoThreads) {
    return Status::InvalidArgument("vhost-user: iothreads must be in 1.." +
                                   std::to_string(kMaxIoThreads));
  }
  std::unique_ptr<VhostUserServer> s(
      new VhostUserServer(disk, std::move(opts), EventLoop::Current()));
  KVBLK_RETURN_IF_ERROR(s->StartIoThreads(s->opts_.iothreads));
  KVBLK_RETURN_IF_ERROR(s->CreateDevice());
  s->offered_features_ = s->device_->features() | Bit(vhost_user::kFProtocolFeatures);
  s->stop_fd_.Reset(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!s->stop_fd_.valid()) return Status::FromErrno(errno, "vhost-user: eventfd");
  if (conn.valid()) {
    s->opts_.connection_fd = conn.Release();
  } else {
    KVBLK_ASSIGN_OR_RETURN(s->listen_fd_, vhost_user::ListenOnUnixSocket(s->opts_.socket_path));
    s->socket_created_ = true;
  }
  return s;
}

VhostUserServer::VhostUserServer(BlockDevice& disk, VhostUserServerOptions opts, EventLoop& loop)
    : disk_(disk),
      opts_(std::move(opts)),
      loop_(&loop),
      memory_(opts_.max_mem_slots),
      kick_pending_(new std::atomic<bool>[static_cast<size_t>(opts_.device.num_queues)]),
      alive_(std::make_shared<VhostUserServer*>(this)) {
  for (int i = 0; i < opts_.device.num_queues; ++i) kick_pending_[i].store(false);
}

VhostUserServer::~VhostUserServer() {
  if (connected_) Disconnect("server destroyed: closing the connection");
  poller_.reset();
  alive_.reset();
  device_.reset();  // needs the I/O threads still running
  StopIoThreads();
  if (opts_.connection_fd >= 0) close(opts_.connection_fd);
  listen_fd_.Reset();
  if (socket_created_) unlink(opts_.socket_path.c_str());
}

uint64_t VhostUserServer::offered_protocol_features() const {
  return Bit(vhost_user::kProtocolFMq) | Bit(vhost_user::kProtocolFReplyAck) |
         Bit(vhost_user::kProtocolFBackendReq) |
         Bit(vhost_user::kProtocolFConfig) | Bit(vhost_user::kProtocolFResetDevice) |
         Bit(vhost_user::kProtocolFConfigureMemSlots);
}

Status VhostUserServer::StartIoThreads(int count) {
  for (int i = 1; i < count; ++i) {
    KVBLK_ASSIGN_OR_RETURN(std::unique_ptr<LoopThread> t, LoopThread::Start());
    io_threads_.push_back(std::move(t));
  }
  if (!io_threads_.empty()) {
    opts_.device.queue_loops.clear();
    opts_.device.queue_loops.push_back(loop_);
    for (const auto& t : io_threads_) opts_.device.queue_loops.push_back(&t->loop());
  }
  return Status::Ok();
}

void VhostUserServer::StopIoThreads() {
  for (auto& t : io_threads_) t->Stop();
  io_threads_.clear();
}

Status VhostUserServer::CreateDevice() {
  auto dev = CreateVirtioBlkDevice(disk_, opts_.device);
  if (!dev.ok()) return dev.status();
  device_ = std::move(*dev);
  device_->SetInterruptCallback([this](int q) { OnInterrupt(q); });
  device_->SetGuestErrorCallback([this](int q, const char* error) {
    LogLimited("guest error on queue " + std::to_string(q) + ": " + error);
  });
  return Status::Ok();
}

void VhostUserServer::Stop() {
  uint64_t one = 1;
  ssize_t r = write(stop_fd_.get(), &one, sizeof one);
  (void)r;  // only EAGAIN is possible (counter saturated), and then a stop is pending anyway
}

Status VhostUserServer::Run() {
  if (&EventLoop::Current() != loop_) {
    return Status::InvalidArgument("vhost-user: Run() must be called on the thread of Create()");
  }
  if (finished_) return run_status_;
  KVBLK_ASSIGN_OR_RETURN(poller_, FdPoller::Start());
  std::weak_ptr<VhostUserServer*> weak = alive_;
  EventLoop* loop = loop_;
  auto post = [weak, loop](void (VhostUserServer::*fn)()) {
    return [weak, loop, fn](uint32_t) {
      loop->PostFunction([weak, fn] {
        if (auto s = weak.lock()) ((*s)->*fn)();
      });
    };
  };
  KVBLK_ASSIGN_OR_RETURN(stop_watch_,
                         poller_->Add(stop_fd_.get(), true, post(&VhostUserServer::OnStop)));
  if (opts_.connection_fd >= 0) {
    UniqueFd conn(opts_.connection_fd);
    opts_.connection_fd = -1;
    Status st = StartConnection(std::move(conn));
    if (!st.ok()) {
      run_status_ = st;
      finished_ = true;
    }
  } else {
    KVBLK_ASSIGN_OR_RETURN(listen_watch_, poller_->Add(listen_fd_.get(), true,
                                                       post(&VhostUserServer::OnListenReadable)));
    Log("listening on " + opts_.socket_path);
  }
  loop_->RunUntil([this] { return finished_; });
  if (connected_) Disconnect("stopping: closing the connection");
  poller_.reset();
  listen_fd_.Reset();
  if (socket_created_) {
    unlink(opts_.socket_path.c_str());
    socket_created_ = false;
  }
  return run_status_;
}

void VhostUserServer::OnStop() {
  stopping_ = true;
  FinishIfDone();
}

// Work deferred while a handler runs (a Drain() or flush inside it runs the
// loop, and with it posted work such as OnStop) is finished here, by the
// outermost frame.
void VhostUserServer::FinishIfDone() {
  if (!stopping_ || in_handler_ > 0) return;
  if (connected_) Disconnect("stopping: closing the connection");
  finished_ = true;
}

// ---- Connections -------------------------------------------------------------

void VhostUserServer::OnListenReadable() {
  if (connected_ || finished_ || stopping_) return;
  int fd = accept4(listen_fd_.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
  if (fd < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR || errno == ECONNABORTED ||
        errno == EPROTO) {
      poller_->Rearm(listen_watch_);
      return;
    }
    run_status_ = Status::FromErrno(errno, "vhost-user: accept on '" + opts_.socket_path + "'");
    finished_ = true;
    return;
  }
  Status st = StartConnection(UniqueFd(fd));
  if (!st.ok()) {
    run_status_ = st;
    finished_ = true;
  }
}

void VhostUserServer::NotifyConfigChange() {
  std::weak_ptr<VhostUserServer*> weak = alive_;
  loop_->PostFunction([weak] {
    if (auto s = weak.lock()) (*s)->SendConfigChange();
  });
}

void VhostUserServer::SendConfigChange() {
  if (!connected_ || !backend_fd_.valid() || !Negotiated(vhost_user::kProtocolFConfig)) return;
  Message m;
  m.request = vhost_user::kBackendConfigChangeMsg;
  // No NEED_REPLY: the front end's answer would have to be read from the
  // channel, and a missed notification only delays what the guest sees.
  VuStatus st = vhost_user::SendMessage(backend_fd_.get(), m, /*nonblocking=*/true);
  if (st.ok()) {
    Log("told the front end that the configuration changed");
  } else {
    LogLimited(std::string("config change notification failed: ") +
               vhost_user::VhostUserErrorName(st.error()));
  }
}

void VhostUserServer::ResetConnectionState() {
  reader_ = vhost_user::MessageReader();
  backend_fd_.Reset();
  protocol_features_ = 0;
  protocol_features_acked_ = false;
  memory_.Clear();
  vrings_.clear();
  vrings_.resize(static_cast<size_t>(opts_.device.num_queues));
  for (int i = 0; i < opts_.device.num_queues; ++i) kick_pending_[i].store(false);
  log_budget_ = kLogBudget;
}

Status VhostUserServer::StartConnection(UniqueFd fd) {
  if (!device_) KVBLK_RETURN_IF_ERROR(CreateDevice());
  ResetConnectionState();
  conn_fd_ = std::move(fd);
  const uint64_t gen = ++conn_gen_;
  std::weak_ptr<VhostUserServer*> weak = alive_;
  EventLoop* loop = loop_;
  auto watch = poller_->Add(conn_fd_.get(), true, [weak, loop, gen](uint32_t) {
    loop->PostFunction([weak, gen] {
      if (auto s = weak.lock()) (*s)->OnConnReadable(gen);
    });
  });
  if (!watch.ok()) {
    conn_fd_.Reset();
    return watch.status();
  }
  conn_watch_ = *watch;
  connected_ = true;
  Log("front end connected");
  return Status::Ok();
}

void VhostUserServer::OnConnReadable(uint64_t gen) {
  if (!connected_ || gen != conn_gen_) return;
  ++in_handler_;
  bool open = true;
  bool drained = false;  // the socket had nothing more
  std::string why;
  for (int i = 0; i < kMessagesPerWakeup && open && !stopping_; ++i) {
    auto r = reader_.Read(conn_fd_.get());
    if (!r.ok()) {
      why =
          r.error() == VhostUserError::kPeerClosed
              ? "front end disconnected"
              : std::string("closing the connection: ") + vhost_user::VhostUserErrorName(r.error());
      open = false;
      break;
    }
    if (!r->has_value()) {
      drained = true;
      break;
    }
    open = HandleMessage(std::move(**r));
    if (!open) why = "closing the connection after a refused request";
  }
  --in_handler_;
  if (!open) {
    Disconnect(why);
  } else if (!stopping_ && connected_ && gen == conn_gen_) {
    if (drained) {
      poller_->Rearm(conn_watch_);
    } else {
      std::weak_ptr<VhostUserServer*> weak = alive_;
      loop_->PostFunction([weak, gen] {
        if (auto s = weak.lock()) (*s)->OnConnReadable(gen);
      });
    }
  }
  FinishIfDone();
}

void VhostUserServer::Disconnect(const std::string& why) {
  if (!connected_) return;
  ++in_handler_;
  Log(why);
  ++conn_gen_;
  connected_ = false;
  if (conn_watch_ != 0 && poller_) poller_->Remove(conn_watch_);
  conn_watch_ = 0;
  conn_fd_.Reset();
  backend_fd_.Reset();
  if (device_) {
    StopAllRings();
    device_->Drain();
  }
  for (size_t q = 0; q < vrings_.size(); ++q) DropKickFd(static_cast<int>(q));
  vrings_.clear();
  // Destroying the device releases its GuestMemory; with the table
  // cleared too, every mapping goes.
  device_.reset();
  memory_.Clear();
  Status st;
  try {
    st = RunSync(disk_.Flush());
  } catch (const std::exception& e) {
    st = Status(StatusCode::kIoError, std::string("flush threw: ") + e.what());
  }
  ++connections_served_;
  --in_handler_;
  if (!st.ok()) {
    Log("flush after disconnect failed: " + st.ToString());
    run_status_ = st;
    finished_ = true;
    return;
  }
  if (opts_.once || opts_.socket_path.empty() || stopping_) {
    finished_ = true;
  } else if (poller_ && !finished_) {
    poller_->Rearm(listen_watch_);
  }
}

// ---- Messages ----------------------------------------------------------------

bool VhostUserServer::Negotiated(int protocol_bit) const {
  return (protocol_features_ & Bit(protocol_bit)) != 0;
}

bool VhostUserServer::Reply(const Message& request, std::vector<uint8_t> payload) {
  VuStatus st =
      vhost_user::SendMessage(conn_fd_.get(), vhost_user::MakeReply(request, std::move(payload)),
                              /*nonblocking=*/true);
  if (!st.ok()) {
    Log(std::string("reply to ") + vhost_user::RequestName(request.request) +
        " not sent: " + vhost_user::VhostUserErrorName(st.error()));
    return false;
  }
  return true;
}

bool VhostUserServer::HandleMessage(Message m) {
  const uint32_t request = m.request;
  const bool ack = m.need_reply() && Negotiated(vhost_user::kProtocolFReplyAck);
  error_detail_.clear();
  std::optional<std::vector<uint8_t>> body;
  VuStatus st = vhost_user::CheckMessageShape(m);
  if (st.ok()) st = Dispatch(m, body);
  if (st.ok()) {
    if (body) return Reply(m, std::move(*body));
    if (ack) return Reply(m, vhost_user::EncodeU64(0));
    return true;
  }
  std::string line = std::string(vhost_user::RequestName(request)) +
                     " refused: " + vhost_user::VhostUserErrorName(st.error());
  if (!error_detail_.empty()) line += " (" + error_detail_ + ")";
  if (st.error() == VhostUserError::kUnknownRequest) {
    Log(line + " (request " + std::to_string(request) + ")");
    return false;
  }
  if (static_cast<Request>(request) == Request::kGetConfig) {
    LogLimited(line);
    return Reply(m, {});  // "zero length of payload to indicate an error"
  }
  if (vhost_user::ReplyKindOf(request) == vhost_user::ReplyKind::kBody) {
    Log(line);
    return false;
  }
  LogLimited(line);
  if (ack) return Reply(m, vhost_user::EncodeU64(1));
  return true;
}

VuResult<VhostUserServer::Vring*> VhostUserServer::VringFor(uint32_t index) {
  if (index >= vrings_.size()) {
    error_detail_ = "vring " + std::to_string(index) + " of " + std::to_string(vrings_.size());
    return VhostUserError::kInvalidQueueIndex;
  }
  return &vrings_[index];
}

VuStatus VhostUserServer::Dispatch(Message& m, std::optional<std::vector<uint8_t>>& body) {
  switch (static_cast<Request>(m.request)) {
    case Request::kGetFeatures:
      body = vhost_user::EncodeU64(offered_features_);
      return {};
    case Request::kSetFeatures:
      return HandleSetFeatures(m);
    case Request::kGetProtocolFeatures:
      body = vhost_user::EncodeU64(offered_protocol_features());
      return {};
    case Request::kSetProtocolFeatures: {
      auto v = vhost_user::DecodeU64(m);
      if (!v.ok()) return v.error();
      if (*v & ~offered_protocol_features()) {
        error_detail_ = "bits " + Hex(*v & ~offered_protocol_features());
        return VhostUserError::kFeatureNotOffered;
      }
      protocol_features_ = *v;
      return {};
    }
    case Request::kSetOwner:
      return {};
    case Request::kResetOwner:
      // Deprecated; the spec recommends ignoring it or disabling all rings.
      StopAllRings();
      for (size_t q = 0; q < vrings_.size(); ++q) {
        vrings_[q].started = false;
        DropKickFd(static_cast<int>(q));
      }
      return {};
    case Request::kResetDevice: {
      if (!Negotiated(vhost_user::kProtocolFResetDevice)) {
        return VhostUserError::kProtocolFeatureNotNegotiated;
      }
      StopAllRings();
      device_->Reset();
      for (size_t q = 0; q < vrings_.size(); ++q) DropKickFd(static_cast<int>(q));
      vrings_.clear();
      vrings_.resize(static_cast<size_t>(opts_.device.num_queues));
      protocol_features_acked_ = false;
      return {};
    }
    case Request::kSetMemTable:
    case Request::kAddMemReg:
    case Request::kRemMemReg:
      return HandleMemoryChange(m);
    case Request::kGetMaxMemSlots:
      body = vhost_user::EncodeU64(opts_.max_mem_slots);
      return {};
    case Request::kGetQueueNum:
      body = vhost_user::EncodeU64(static_cast<uint64_t>(opts_.device.num_queues));
      return {};
    case Request::kSetVringNum:
    case Request::kSetVringBase:
    case Request::kGetVringBase:
    case Request::kSetVringEnable:
      return HandleVringState(m, body);
    case Request::kSetVringAddr: {
      auto a = vhost_user::DecodeVringAddr(m);
      if (!a.ok()) return a.error();
      auto v = VringFor(a->index);
      if (!v.ok()) return v.error();
      if ((*v)->running) return VhostUserError::kQueueRunning;
      if (a->flags & vhost_user::kVringFLog) return VhostUserError::kLoggingNotSupported;
      (*v)->addr = *a;
      return {};
    }
    case Request::kSetVringKick:
    case Request::kSetVringCall:
    case Request::kSetVringErr:
      return HandleVringFd(m);
    case Request::kSetBackendReqFd:
      if (!Negotiated(vhost_user::kProtocolFBackendReq)) {
        return VhostUserError::kProtocolFeatureNotNegotiated;
      }
      backend_fd_ = std::move(m.fds[0]);
      return {};
    case Request::kGetConfig:
      return HandleGetConfig(m, body);
    case Request::kSetConfig:
      return HandleSetConfig(m);
    default:
      return VhostUserError::kUnsupportedRequest;  // CheckMessageShape lets none through
  }
}

VuStatus VhostUserServer::HandleVringState(const Message& m,
                                           std::optional<std::vector<uint8_t>>& body) {
  auto s = vhost_user::DecodeVringState(m);
  if (!s.ok()) return s.error();
  auto found = VringFor(s->index);
  if (!found.ok()) return found.error();
  Vring& v = **found;
  const int q = static_cast<int>(s->index);
  switch (static_cast<Request>(m.request)) {
    case Request::kSetVringNum:
      if (v.running) return VhostUserError::kQueueRunning;
      if (s->num > device_->max_queue_size() || !IsPowerOfTwo(s->num)) {
        error_detail_ = "size " + std::to_string(s->num) + ", at most " +
                        std::to_string(device_->max_queue_size());
        return VhostUserError::kInvalidQueueSize;
      }
      v.num = static_cast<uint16_t>(s->num);
      return {};
    case Request::kSetVringBase:
      if (v.running) return VhostUserError::kQueueRunning;
      if (s->num > 0xffff) return VhostUserError::kInvalidValue;  // split rings only
      v.base = static_cast<uint16_t>(s->num);
      return {};
    case Request::kGetVringBase:
      StopRing(q);
      v.started = false;
      DropKickFd(q);
      body = vhost_user::EncodeVringState(VringState{s->index, v.base});
      return {};
    default:  // kSetVringEnable
      if (s->num > 1) return VhostUserError::kInvalidValue;
      v.enabled = s->num == 1;
      return UpdateRing(q);
  }
}

VuStatus VhostUserServer::HandleSetFeatures(const Message& m) {
  auto v = vhost_user::DecodeU64(m);
  if (!v.ok()) return v.error();
  if (*v & ~offered_features_) {
    error_detail_ = "bits " + Hex(*v & ~offered_features_);
    return VhostUserError::kFeatureNotOffered;
  }
  Status st = device_->SetDriverFeatures(*v & ~Bit(vhost_user::kFProtocolFeatures));
  if (!st.ok()) {
    error_detail_ = st.message();
    return VhostUserError::kDeviceRejected;
  }
  protocol_features_acked_ = (*v & Bit(vhost_user::kFProtocolFeatures)) != 0;
  // Whether started rings count as enabled may have changed.
  for (size_t q = 0; q < vrings_.size(); ++q) (void)UpdateRing(static_cast<int>(q));
  return {};
}

VuStatus VhostUserServer::HandleMemoryChange(Message& m) {
  VuStatus st;
  switch (static_cast<Request>(m.request)) {
    case Request::kSetMemTable: {
      auto regions = vhost_user::DecodeMemTable(m);
      if (!regions.ok()) return regions.error();
      st = memory_.SetTable(*regions, std::move(m.fds));
      break;
    }
    case Request::kAddMemReg: {
      if (!Negotiated(vhost_user::kProtocolFConfigureMemSlots)) {
        return VhostUserError::kProtocolFeatureNotNegotiated;
      }
      auto r = vhost_user::DecodeSingleRegion(m);
      if (!r.ok()) return r.error();
      st = memory_.Add(*r, std::move(m.fds[0]));
      break;
    }
    default: {  // kRemMemReg; a descriptor that came along is closed unused
      if (!Negotiated(vhost_user::kProtocolFConfigureMemSlots)) {
        return VhostUserError::kProtocolFeatureNotNegotiated;
      }
      auto r = vhost_user::DecodeSingleRegion(m);
      if (!r.ok()) return r.error();
      st = memory_.Remove(*r);
      break;
    }
  }
  if (!st.ok()) return st;
  return ApplyMemory();
}

VuStatus VhostUserServer::ApplyMemory() {
  // With no region left the device keeps its previous map (it refuses an
  // empty one); those mappings go with the next table or the connection.
  if (memory_.empty()) return {};
  Status st = device_->SetGuestMemory(memory_.GuestRegions(), memory_.KeepAlive());
  if (!st.ok()) {
    error_detail_ = st.message();
    return VhostUserError::kDeviceRejected;
  }
  for (size_t q = 0; q < vrings_.size(); ++q) (void)UpdateRing(static_cast<int>(q));
  return {};
}

VuStatus VhostUserServer::HandleVringFd(Message& m) {
  auto v64 = vhost_user::DecodeU64(m);
  if (!v64.ok()) return v64.error();
  if (*v64 & ~(vhost_user::kVringIndexMask | vhost_user::kVringNoFdMask)) {
    error_detail_ = "payload " + Hex(*v64);
    return VhostUserError::kInvalidValue;
  }
  const uint32_t index = static_cast<uint32_t>(*v64 & vhost_user::kVringIndexMask);
  const bool nofd = (*v64 & vhost_user::kVringNoFdMask) != 0;
  auto v = VringFor(index);
  if (!v.ok()) return v.error();
  UniqueFd fd = nofd ? UniqueFd() : std::move(m.fds[0]);
  const int q = static_cast<int>(index);
  switch (static_cast<Request>(m.request)) {
    case Request::kSetVringKick: {
      if (nofd) return VhostUserError::kPollingNotSupported;
      const bool was_running = (*v)->running;
      VuStatus st = SetKickFd(q, std::move(fd));
      if (!st.ok()) return st;
      (*v)->started = true;
      st = UpdateRing(q);
      // A replaced kick fd may have swallowed a notification.
      if (was_running && (*v)->running) device_->PostKick(q);
      return st;
    }
    case Request::kSetVringCall: {
      std::lock_guard<std::mutex> l(call_mu_);
      (*v)->call = std::move(fd);
      return {};
    }
    default:  // kSetVringErr
      (*v)->err = std::move(fd);
      (*v)->err_signalled = false;
      return {};
  }
}

VuStatus VhostUserServer::HandleGetConfig(const Message& m,
                                          std::optional<std::vector<uint8_t>>& body) {
  if (!Negotiated(vhost_user::kProtocolFConfig)) {
    return VhostUserError::kProtocolFeatureNotNegotiated;
  }
  auto c = vhost_user::DecodeConfig(m);
  if (!c.ok()) return c.error();
  const uint64_t size = c->data.size();
  if (uint64_t{c->offset} + size > vhost_user::kMaxConfigSize) {
    error_detail_ = "offset " + std::to_string(c->offset) + " size " + std::to_string(size);
    return VhostUserError::kBadConfigAccess;
  }
  // Bytes past the device's config space (up to the protocol's 256) read
  // as zero, as the reserved fields inside it do.
  std::vector<uint8_t> out(size, 0);
  const uint32_t config_size = device_->config_size();
  if (c->offset < config_size && size > 0) {
    uint32_t n = static_cast<uint32_t>(std::min<uint64_t>(size, config_size - c->offset));
    Status st = device_->ReadConfig(c->offset, out.data(), n);
    if (!st.ok()) {
      error_detail_ = st.message();
      return VhostUserError::kBadConfigAccess;
    }
  }
  ConfigAccess reply;
  reply.offset = c->offset;
  reply.flags = c->flags;
  reply.data = std::move(out);
  body = vhost_user::EncodeConfig(reply);
  return {};
}

VuStatus VhostUserServer::HandleSetConfig(const Message& m) {
  if (!Negotiated(vhost_user::kProtocolFConfig)) {
    return VhostUserError::kProtocolFeatureNotNegotiated;
  }
  auto c = vhost_user::DecodeConfig(m);
  if (!c.ok()) return c.error();
  if (c->flags != vhost_user::kConfigFlagFrontend && c->flags != vhost_user::kConfigFlagMigration) {
    return VhostUserError::kInvalidValue;
  }
  if (uint64_t{c->offset} + c->data.size() > device_->config_size()) {
    error_detail_ =
        "offset " + std::to_string(c->offset) + " size " + std::to_string(c->data.size());
    return VhostUserError::kBadConfigAccess;
  }
  // Read-only fields stay read-only even for migration: there is no
  // migration support to accept them for.
  Status st =
      device_->WriteConfig(c->offset, c->data.data(), static_cast<uint32_t>(c->data.size()));
  if (!st.ok()) {
    error_detail_ = st.message();
    return VhostUserError::kDeviceRejected;
  }
  return {};
}

// ---- Logging ---------------------------------------------------------------------

void VhostUserServer::Log(const std::string& line) {
  std::lock_guard<std::mutex> l(log_mu_);
  opts_.log(line);
}

void VhostUserServer::LogLimited(const std::string& line) {
  const int left = log_budget_.fetch_sub(1);
  if (left <= 0) return;
  if (left == 1) {
    Log(line + " (further messages of this connection are not logged)");
  } else {
    Log(line);
  }
}

}  // namespace kvblk
