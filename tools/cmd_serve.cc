// kvblk serve: exports an image as a vhost-user-blk device on a Unix socket
// (virtio/vhost_user_server.h), for QEMU's vhost-user-blk-pci or
// cloud-hypervisor.
#include <signal.h>
#include <stdlib.h>

#include <atomic>
#include <climits>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "kvblk/block_device.h"
#include "kvblk/event_loop.h"
#include "kvblk/image_create.h"
#include "kvblk/virtio_blk.h"
#include "tools/cli_util.h"
#include "tools/commands.h"
#include "tools/control_server.h"
#include "tools/image_options.h"
#include "virtio/vhost_user_server.h"

namespace kvblk::cli {

namespace {

constexpr const char* kCmd = "serve";
constexpr int kMaxQueues = 256;
constexpr int kMaxIothreads = 64;
// QEMU's largest virtqueue (VIRTQUEUE_MAX_SIZE); its default is 128.
constexpr uint16_t kMaxQueueSize = 1024;

// The server Stop() is async-signal-safe; the handler reaches it here.
std::atomic<VhostUserServer*> g_server{nullptr};

void OnSignal(int) {
  VhostUserServer* s = g_server.load();
  if (s != nullptr) s->Stop();
}

void InstallSignalHandlers() {
  struct sigaction sa {};
  sa.sa_handler = OnSignal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
}

std::vector<OptionSpec> ServeSpecs() {
  return {
      {0, "socket", "PATH", "Unix socket to listen on (required; a stale socket is replaced)"},
      {'f', "format", "FMT", "image format: qcow2 or raw (default: probed from the file)"},
      {0, "read-only", "", "open the image read-only and offer VIRTIO_BLK_F_RO to the guest"},
      {0, "num-queues", "N", "number of virtqueues offered (MQ), 1..256 (default 1)"},
      {0, "iothreads", "N",
       "I/O threads serving the queues, 1..64 (default 1); queue i runs on thread i mod N"},
      {0, "cache", "MODE", "writeback (default: host page cache) or none (O_DIRECT)"},
      {0, "l2-cache-size", "SIZE",
       "qcow2 L2 table cache, k/M/G suffixes, up to 64G; whole tables, at least 2 "
       "(default: enough for the whole disk, up to 32M)"},
      {0, "serial", "S", "GET_ID serial, <= 20 printable ASCII (default: from the image path)"},
      {0, "once", "", "exit after the first front end disconnects"},
      {0, "control", "PATH", "Unix socket for live commands (snapshots, resize, info, flush)"},
      {0, "control-idle-timeout", "S",
       "disconnect a control client silent for S seconds, 1..86400 (default 60)"},
      HelpOption(),
  };
}

void PrintHelp() {
  std::printf(
      "usage: kvblk serve [-f FMT] [--read-only] [--num-queues N] [--iothreads N]\n"
      "                   [--cache none|writeback] [--l2-cache-size SIZE] [--serial S]\n"
      "                   [--once] [--control PATH] [--control-idle-timeout S]\n"
      "                   --socket PATH IMAGE\n"
      "\n"
      "Serves IMAGE as a vhost-user-blk device on the Unix socket PATH, one front end at a\n"
      "time (QEMU's -device vhost-user-blk-pci, cloud-hypervisor). When a front end\n"
      "disconnects, its requests are finished, the image is flushed and the next front end\n"
      "may connect (or the command exits, with --once). SIGINT or SIGTERM shuts down\n"
      "cleanly: requests finish, the image is flushed and closed, the socket is removed.\n"
      "Either cache mode honours the guest's flushes; the guest sees a write cache it\n"
      "can switch (VIRTIO_BLK_F_CONFIG_WCE).\n"
      "\n"
      "With --control PATH, a second Unix socket takes one command per line while the\n"
      "guest runs and answers each with one line, 'ok', 'ok JSON' or 'error MESSAGE':\n"
      "  snapshot-create NAME     internal snapshot of the running disk (qcow2)\n"
      "  snapshot-list            the snapshots, as a JSON array (qcow2)\n"
      "  snapshot-delete NAME|ID  deletes a snapshot (qcow2)\n"
      "  resize [+]SIZE           grows the disk (qcow2; k, M, G, T suffixes)\n"
      "  info                     size, format and snapshot count, as JSON\n"
      "  flush                    makes everything written so far durable\n"
      "  help                     lists the commands\n"
      "One control client is served at a time (others get 'error busy'); one that stays\n"
      "silent for --control-idle-timeout seconds is disconnected. Lines longer than 4096\n"
      "bytes are refused.\n"
      "\n"
      "QEMU example:\n"
      "  qemu-system-x86_64 -object memory-backend-memfd,id=mem,size=1G,share=on \\\n"
      "    -machine memory-backend=mem -chardev socket,id=c0,path=PATH \\\n"
      "    -device vhost-user-blk-pci,chardev=c0,num-queues=1 ...\n"
      "\n"
      "%s",
      FormatOptionHelp(ServeSpecs()).c_str());
}

std::string CanonicalPath(const std::string& path) {
  char buf[PATH_MAX];
  if (realpath(path.c_str(), buf) != nullptr) return buf;
  return path;
}

}  // namespace

int RunServe(const std::vector<std::string>& args) {
  Result<ParsedArgs> parsed = ParseArgs(args, ServeSpecs());
  if (!parsed.ok()) return Fail(kCmd, parsed.status());
  const ParsedArgs& a = *parsed;
  if (a.Has("help")) {
    PrintHelp();
    return 0;
  }
  const std::vector<std::string>& pos = a.positional();
  if (pos.empty()) return Fail(kCmd, "missing IMAGE (see 'kvblk serve --help')");
  if (pos.size() > 1) return Fail(kCmd, "unexpected argument '" + pos[1] + "'");
  if (!a.Has("socket") || a.Get("socket").empty()) {
    return Fail(kCmd, "missing --socket PATH (see 'kvblk serve --help')");
  }

  OpenOptions open_opts;
  open_opts.format = a.Get("format");
  if (a.Has("format")) {
    Status ok = CheckFormatName(open_opts.format, "format");
    if (!ok.ok()) return Fail(kCmd, ok);
  }
  open_opts.read_only = a.Has("read-only");
  const std::string cache = a.Get("cache", "writeback");
  if (cache == "none") {
    open_opts.direct = true;
  } else if (cache != "writeback") {
    return Fail(kCmd, "unknown cache mode '" + cache + "' (expected none or writeback)");
  }

  if (a.Has("l2-cache-size")) {
    const std::string& text = a.Get("l2-cache-size");
    Result<uint64_t> n = ParseSize(text);
    if (!n.ok() || *n > kMaxL2CacheBytes) {
      return Fail(kCmd, "invalid --l2-cache-size '" + text +
                            "' (bytes with an optional k, M or G suffix, up to 64G)");
    }
    open_opts.l2_cache_bytes = *n;  // 0: the default
  }

  VhostUserServerOptions so;
  so.socket_path = a.Get("socket");
  so.once = a.Has("once");
  if (a.Has("num-queues")) {
    Result<int64_t> n = ParseInteger(a.Get("num-queues"), 1, kMaxQueues, "--num-queues");
    if (!n.ok()) return Fail(kCmd, n.status());
    so.device.num_queues = static_cast<int>(*n);
  }
  if (a.Has("iothreads")) {
    Result<int64_t> n = ParseInteger(a.Get("iothreads"), 1, kMaxIothreads, "--iothreads");
    if (!n.ok()) return Fail(kCmd, n.status());
    so.iothreads = static_cast<int>(*n);
  }
  so.device.serial = a.Get("serial");
  if (a.Has("serial") && so.device.serial.empty()) return Fail(kCmd, "--serial must not be empty");
  so.device.read_only = open_opts.read_only;
  so.device.max_queue_size = kMaxQueueSize;
  so.device.image_path = CanonicalPath(pos[0]);
  so.log = [](const std::string& line) { std::fprintf(stderr, "kvblk serve: %s\n", line.c_str()); };
  if (a.Has("control") && a.Get("control").empty())
    return Fail(kCmd, "--control must not be empty");
  int control_idle_ms = ControlServerOptions{}.idle_timeout_ms;
  if (a.Has("control-idle-timeout")) {
    Result<int64_t> n =
        ParseInteger(a.Get("control-idle-timeout"), 1, 86400, "--control-idle-timeout");
    if (!n.ok()) return Fail(kCmd, n.status());
    control_idle_ms = static_cast<int>(*n * 1000);
  }

  Result<std::unique_ptr<BlockDevice>> disk = OpenImage(pos[0], open_opts);
  if (!disk.ok()) return Fail(kCmd, disk.status());

  Result<std::unique_ptr<VhostUserServer>> server = VhostUserServer::Create(**disk, so);
  if (!server.ok()) {
    Status closed = CloseImage(std::move(*disk));
    (void)closed;  // the first error is the one to report
    return Fail(kCmd, server.status());
  }
  // The control socket; its commands hop to this thread's loop (the disk's
  // home), which runs inside server->Run().
  std::unique_ptr<ControlServer> control;
  if (a.Has("control")) {
    ControlServerOptions co;
    co.socket_path = a.Get("control");
    co.log = so.log;
    co.idle_timeout_ms = control_idle_ms;
    VhostUserServer* vs = server->get();
    co.on_resized = [vs] { vs->NotifyConfigChange(); };
    Result<std::unique_ptr<ControlServer>> c =
        ControlServer::Start(**disk, EventLoop::Current(), std::move(co));
    if (!c.ok()) {
      server->reset();
      Status closed = CloseImage(std::move(*disk));
      (void)closed;  // the first error is the one to report
      return Fail(kCmd, c.status());
    }
    control = std::move(*c);
  }
  // A front end that hands over a pipe instead of an eventfd must not kill
  // the process when it goes away.
  signal(SIGPIPE, SIG_IGN);
  g_server.store(server->get());
  InstallSignalHandlers();
  Status st = (*server)->Run();
  g_server.store(nullptr);
  // Before the home loop stops for good: a command in progress finishes.
  control.reset();  // removes the control socket
  server->reset();  // removes the socket
  Status closed = CloseImage(std::move(*disk));
  if (!st.ok()) return Fail(kCmd, st);
  if (!closed.ok()) return Fail(kCmd, closed);
  return 0;
}

}  // namespace kvblk::cli
