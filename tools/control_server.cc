// ControlServer: see control_server.h for the protocol and the threads.
#include "tools/control_server.h"

#include <errno.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <string_view>
#include <utility>
#include <vector>

#include "disk/io_engine.h"
#include "disk/qcow2_device.h"
#include "kvblk/image_create.h"
#include "kvblk/task.h"
#include "tools/json_writer.h"

namespace kvblk::cli {

namespace {

constexpr const char* kHelp =
    "commands: snapshot-create NAME | snapshot-list | snapshot-delete NAME|ID | "
    "resize [+]SIZE | info | flush | help";

// How long a reply may wait for a client that does not read.
constexpr int kSendTimeoutSec = 10;

// Runs `fn` on `home` and comes back to the calling loop; returns fn().
// For state that only the home loop may read (snapshot table, header).
template <typename T, typename F>
Task<T> CallOnHome(EventLoop* home, F fn) {
  EventLoop* self = &EventLoop::Current();
  co_await home->Enter();
  T r = fn();
  co_await self->Enter();
  co_return r;
}

// `text` with newlines replaced, so it fits on one reply line.
std::string OneLine(std::string text) {
  for (char& c : text) {
    if (c == '\n' || c == '\r') c = ' ';
  }
  return text;
}

std::string ErrorReply(const std::string& message) { return "error " + OneLine(message); }
std::string ErrorReply(const Status& st) { return ErrorReply(st.message()); }

// JsonWriter's output without its line breaks (strings are escaped, so the
// only newlines are layout).
std::string Compact(const JsonWriter& json) {
  std::string out;
  for (char c : json.str()) {
    if (c != '\n') out += c;
  }
  return out;
}

std::vector<std::string> SplitWords(const std::string& line) {
  std::vector<std::string> words;
  std::istringstream in(line);
  std::string w;
  while (in >> w) words.push_back(w);
  return words;
}

// The size asked for by `text` ("SIZE" or "+SIZE", with ParseSize's
// suffixes) given the current size. Shrinking a disk under a running guest
// is refused.
Result<uint64_t> ParseNewSize(const std::string& text, uint64_t current) {
  if (!text.empty() && text[0] == '-') {
    return Status::NotSupported(
        "shrinking a disk in use is not supported (use kvblk resize "
        "--shrink on the image when it is not served)");
  }
  const bool grow = !text.empty() && text[0] == '+';
  const std::string digits = grow ? text.substr(1) : text;
  Result<uint64_t> value = ParseSize(digits);
  if (digits.empty() || !value.ok()) {
    return Status::InvalidArgument("bad size '" + text +
                                   "' (a number with an optional k, M, G, T, P or E suffix, "
                                   "optionally preceded by +)");
  }
  uint64_t size = *value;
  if (grow) {
    if (size > UINT64_MAX - current) return Status::InvalidArgument("the new size is too large");
    size += current;
  }
  if (size == 0 || size % 512 != 0) {
    return Status::InvalidArgument("the new size must be a positive multiple of 512, not " +
                                   std::to_string(size));
  }
  if (size < current) {
    return Status::NotSupported("shrinking a disk in use is not supported (" +
                                std::to_string(size) + " < current size " +
                                std::to_string(current) + ")");
  }
  return size;
}

std::string SnapshotListJson(const std::vector<SnapshotInfo>& snaps) {
  JsonWriter json(0);
  json.BeginArray();
  for (const SnapshotInfo& s : snaps) {
    json.BeginObject();
    json.Key("id");
    json.String(s.id);
    json.Key("name");
    json.String(s.name);
    json.Key("vm-state-size");
    json.Uint(s.vm_state_size);
    json.Key("date-sec");
    json.Uint(s.date_sec);
    json.Key("date-nsec");
    json.Uint(s.date_nsec);
    json.Key("vm-clock-sec");
    json.Uint(s.vm_clock_nsec / 1000000000);
    json.Key("vm-clock-nsec");
    json.Uint(s.vm_clock_nsec % 1000000000);
    if (s.icount) {
      json.Key("icount");
      json.Uint(*s.icount);
    }
    json.Key("disk-size");
    json.Uint(s.disk_size);
    json.EndObject();
  }
  json.EndArray();
  return Compact(json);
}

std::string InfoJson(const ImageInfo& info, uint64_t size) {
  JsonWriter json(0);
  json.BeginObject();
  json.Key("filename");
  json.String(info.filename);
  json.Key("format");
  json.String(info.format);
  json.Key("virtual-size");
  json.Uint(size);
  json.Key("actual-size");
  json.Uint(info.actual_size);
  if (info.cluster_size != 0) {
    json.Key("cluster-size");
    json.Uint(info.cluster_size);
    json.Key("l2-cache-size");
    json.Uint(info.l2_cache_bytes);
  }
  json.Key("snapshots");
  json.Uint(info.snapshots.size());
  json.Key("dirty");
  json.Bool(info.dirty);
  json.EndObject();
  return Compact(json);
}

// Writes all of `text`; false if the client is gone or stuck.
bool SendAll(int fd, std::string_view text) {
  while (!text.empty()) {
    ssize_t n = send(fd, text.data(), text.size(), MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    text.remove_prefix(static_cast<size_t>(n));
  }
  return true;
}

// Makes a Unix listening socket at `path`, replacing a stale one.
Result<int> Listen(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path)) {
    return Status::InvalidArgument("control socket path '" + path + "' is empty or too long");
  }
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  struct stat st;
  if (lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      return Status::InvalidArgument(path + ": exists and is not a socket");
    }
    int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (probe < 0) return Status::FromErrno(errno, path + ": socket");
    const bool live = connect(probe, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
    close(probe);
    if (live) return Status::Busy(path + ": a server is already listening there");
    unlink(path.c_str());
  }
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Status::FromErrno(errno, path + ": socket");
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 || listen(fd, 8) != 0) {
    Status err = Status::FromErrno(errno, path + ": bind/listen");
    close(fd);
    return err;
  }
  return fd;
}

}  // namespace

Result<std::unique_ptr<ControlServer>> ControlServer::Start(BlockDevice& disk, EventLoop& home,
                                                            ControlServerOptions opts) {
  if (opts.idle_timeout_ms <= 0) {
    return Status::InvalidArgument("control server: idle timeout must be positive, not " +
                                   std::to_string(opts.idle_timeout_ms) + " ms");
  }
  Result<int> fd = Listen(opts.socket_path);
  if (!fd.ok()) return fd.status();
  int stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (stop_fd < 0) {
    Status err = Status::FromErrno(errno, "control server: eventfd");
    close(*fd);
    unlink(opts.socket_path.c_str());
    return err;
  }
  std::unique_ptr<ControlServer> s(new ControlServer(disk, home, std::move(opts), *fd, stop_fd));
  s->thread_ = std::thread([p = s.get()] { p->ThreadMain(); });
  return s;
}

ControlServer::ControlServer(BlockDevice& disk, EventLoop& home, ControlServerOptions opts,
                             int listen_fd, int stop_fd)
    : disk_(disk), home_(home), opts_(std::move(opts)), listen_fd_(listen_fd), stop_fd_(stop_fd) {}

ControlServer::~ControlServer() {
  Shutdown();
  close(listen_fd_);
  close(stop_fd_);
  unlink(opts_.socket_path.c_str());
}

void ControlServer::Shutdown() {
  if (shut_down_) return;
  shut_down_ = true;
  uint64_t one = 1;
  ssize_t n = write(stop_fd_, &one, sizeof(one));
  (void)n;  // an eventfd write of 1 cannot fail short of overflow
  // A command in progress may wait for the home loop: keep it running.
  home_.RunUntil([this] { return exited_.load(); });
  thread_.join();
}

void ControlServer::Log(const std::string& line) const {
  if (opts_.log) opts_.log("control: " + line);
}

void ControlServer::ThreadMain() {
  std::unique_ptr<IoEngine> engine = MakeDefaultIoEngine();
  EventLoop loop(std::move(engine));
  EventLoop::SetCurrent(&loop);
  for (;;) {
    pollfd fds[2] = {{listen_fd_, POLLIN, 0}, {stop_fd_, POLLIN, 0}};
    if (poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      Log(std::string("poll failed: ") + std::strerror(errno));
      break;
    }
    if (fds[1].revents != 0) break;
    if ((fds[0].revents & POLLIN) == 0) continue;
    int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) continue;
    timeval tv{kSendTimeoutSec, 0};
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    Log("client connected");
    ServeClient(fd);
    close(fd);
    Log("client disconnected");
  }
  EventLoop::SetCurrent(nullptr);
  exited_.store(true);
  home_.PostFunction([] {});  // wakes Shutdown()'s RunUntil
}

void ControlServer::ServeClient(int fd) {
  std::string pending;      // bytes of the current line so far
  bool discarding = false;  // inside an over-long line
  char buf[4096];
  using Clock = std::chrono::steady_clock;
  Clock::time_point last_heard = Clock::now();
  for (;;) {
    pollfd fds[3] = {{fd, POLLIN, 0}, {listen_fd_, POLLIN, 0}, {stop_fd_, POLLIN, 0}};
    const auto idle = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() -
                                                                            last_heard);
    const int left = opts_.idle_timeout_ms - static_cast<int>(std::min<int64_t>(
                                                 idle.count(), opts_.idle_timeout_ms));
    int r = poll(fds, 3, left);
    if (r < 0) {
      if (errno == EINTR) continue;
      return;
    }
    if (r == 0) {
      const int secs = (opts_.idle_timeout_ms + 999) / 1000;
      SendAll(fd, ErrorReply("idle for " + std::to_string(secs) + " s, disconnecting") + "\n");
      Log("disconnected an idle client");
      return;
    }
    if (fds[2].revents != 0) return;
    if (fds[1].revents & POLLIN) {
      int other = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
      if (other >= 0) {
        SendAll(other, "error busy: another control client is connected\n");
        close(other);
        Log("refused a second client");
      }
    }
    if (fds[0].revents == 0) continue;
    ssize_t n = recv(fd, buf, sizeof(buf), 0);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n <= 0) return;  // hung up (an unterminated last line is dropped)
    last_heard = Clock::now();
    for (ssize_t i = 0; i < n; ++i) {
      const char c = buf[i];
      if (c != '\n') {
        if (discarding) continue;
        if (pending.size() >= kMaxLineBytes) {
          discarding = true;
          pending.clear();
          if (!SendAll(fd, ErrorReply("line too long (more than " + std::to_string(kMaxLineBytes) +
                                      " bytes)") +
                               "\n")) {
            return;
          }
          continue;
        }
        pending += c;
        continue;
      }
      if (discarding) {
        discarding = false;
        continue;
      }
      std::string reply = Execute(pending);
      pending.clear();
      if (!SendAll(fd, reply + "\n")) return;
      last_heard = Clock::now();  // a long command does not count as idleness
    }
  }
}

std::string ControlServer::Execute(const std::string& raw_line) {
  std::string line = raw_line;
  if (!line.empty() && line.back() == '\r') line.pop_back();
  const std::vector<std::string> words = SplitWords(line);
  if (words.empty()) return ErrorReply("empty command (try 'help')");
  const std::string& cmd = words[0];
  auto* q = dynamic_cast<qcow2::Qcow2Device*>(&disk_);
  auto want_args = [&](size_t n, const char* usage) -> std::string {
    if (words.size() - 1 == n) return "";
    return ErrorReply(
        std::string(words.size() - 1 < n ? "missing argument" : "too many arguments") +
        " (usage: " + usage + ")");
  };
  auto need_qcow2 = [&]() -> std::string {
    if (q != nullptr) return "";
    return ErrorReply("'" + cmd + "' needs a qcow2 image; this image is raw");
  };

  if (cmd == "help") {
    if (std::string e = want_args(0, "help"); !e.empty()) return e;
    return "ok " + JsonQuote(kHelp);
  }
  if (cmd == "snapshot-create" || cmd == "snapshot-delete") {
    if (std::string e = want_args(1, (cmd + " NAME").c_str()); !e.empty()) return e;
    if (std::string e = need_qcow2(); !e.empty()) return e;
    Status st = cmd == "snapshot-create" ? RunSync(q->CreateSnapshot(words[1]))
                                         : RunSync(q->DeleteSnapshot(words[1]));
    if (!st.ok()) {
      Log(cmd + " " + words[1] + ": " + st.ToString());
      return ErrorReply(st);
    }
    Log(cmd + " " + words[1] + ": done");
    return "ok";
  }
  if (cmd == "snapshot-list") {
    if (std::string e = want_args(0, "snapshot-list"); !e.empty()) return e;
    if (std::string e = need_qcow2(); !e.empty()) return e;
    std::vector<SnapshotInfo> snaps =
        RunSync(CallOnHome<std::vector<SnapshotInfo>>(&home_, [q] { return q->ListSnapshots(); }));
    return "ok " + SnapshotListJson(snaps);
  }
  if (cmd == "resize") {
    if (std::string e = want_args(1, "resize [+]SIZE"); !e.empty()) return e;
    if (q == nullptr) {
      return ErrorReply(
          "resize of a raw image in use is not supported (stop serving and use "
          "kvblk resize)");
    }
    Result<uint64_t> size = ParseNewSize(words[1], disk_.size());
    if (!size.ok()) return ErrorReply(size.status());
    Status st = RunSync(q->Resize(*size, /*allow_shrink=*/false));
    if (!st.ok()) {
      Log("resize " + words[1] + ": " + st.ToString());
      return ErrorReply(st);
    }
    Log("resize to " + std::to_string(*size) + " bytes: done");
    if (opts_.on_resized) opts_.on_resized();
    return "ok";
  }
  if (cmd == "info") {
    if (std::string e = want_args(0, "info"); !e.empty()) return e;
    BlockDevice* d = &disk_;
    Result<ImageInfo> info =
        RunSync(CallOnHome<Result<ImageInfo>>(&home_, [d] { return d->Info(); }));
    if (!info.ok()) return ErrorReply(info.status());
    return "ok " + InfoJson(*info, disk_.size());
  }
  if (cmd == "flush") {
    if (std::string e = want_args(0, "flush"); !e.empty()) return e;
    Status st = RunSync(disk_.Flush());
    if (!st.ok()) return ErrorReply(st);
    return "ok";
  }
  return ErrorReply("unknown command '" + cmd.substr(0, 64) + "' (try 'help')");
}

}  // namespace kvblk::cli
