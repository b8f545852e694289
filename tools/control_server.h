// ControlServer: the `kvblk serve --control PATH` socket, for operations on
// an image while a guest uses it (live internal snapshots, resize, flush).
//
// Protocol (line-oriented, documented in README.md): a client sends one
// command per line ("\n"-terminated, "\r\n" accepted, at most
// kMaxLineBytes bytes) and gets exactly one reply line per command, in
// order: "ok", "ok <json>" (JSON on one line) or "error <message>". Commands:
//   snapshot-create NAME   snapshot-list   snapshot-delete NAME|ID
//   resize [+]SIZE         info            flush            help
// An over-long line is answered with an error and skipped up to its
// newline. One client is served at a time; another one that connects
// meanwhile gets "error busy: ..." and is disconnected. A client that sends
// nothing for idle_timeout_ms (while no command of its own is running) gets
// "error idle for N s, disconnecting" and is disconnected, so one silent
// client cannot hold the socket for good.
//
// Threads: the server has its own thread with its own EventLoop (installed
// with EventLoop::SetCurrent). Commands run there with RunSync; the device
// operations hop to the device's home loop themselves (Qcow2Device takes
// the image lock exclusive, so guest requests wait only for the short
// critical part). Reading the snapshot list and the image info also happens
// on the home loop, where that state lives. The home loop must therefore
// keep running while a command is in progress: stop the server with
// Shutdown() on the home thread before that loop stops for good.
#ifndef KVBLK_TOOLS_CONTROL_SERVER_H_
#define KVBLK_TOOLS_CONTROL_SERVER_H_

#include <atomic>
#include <cstddef>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "kvblk/block_device.h"
#include "kvblk/event_loop.h"
#include "kvblk/status.h"

namespace kvblk::cli {

struct ControlServerOptions {
  // Unix socket to listen on. A stale socket (nobody listening) is
  // replaced; a live one is Busy; any other file is InvalidArgument. The
  // socket is removed when the server is destroyed.
  std::string socket_path;
  // One line per event worth telling (connections, failed commands).
  std::function<void(const std::string&)> log;
  // Called on the control thread after a resize succeeded (kvblk serve tells
  // the front end, which tells the guest). May be empty.
  std::function<void()> on_resized;
  // How long a connected client may stay silent (milliseconds, > 0).
  int idle_timeout_ms = 60'000;
};

class ControlServer {
 public:
  // The longest command line accepted, newline excluded.
  static constexpr size_t kMaxLineBytes = 4096;

  // Opens the socket and starts the server thread. `disk` (not owned) must
  // outlive the server; `home` is the loop `disk` was opened on. Errors:
  // InvalidArgument (path too long, not a socket), Busy, IoError.
  static Result<std::unique_ptr<ControlServer>> Start(BlockDevice& disk, EventLoop& home,
                                                      ControlServerOptions opts);
  // Shuts down (see Shutdown) if that was not done, removes the socket.
  ~ControlServer();
  ControlServer(const ControlServer&) = delete;
  ControlServer& operator=(const ControlServer&) = delete;

  // Stops accepting, lets a command in progress finish (running the home
  // loop meanwhile, so call it on the home thread while no other code runs
  // that loop), closes the client and joins the thread. Idempotent.
  void Shutdown();

  // Runs one command line (without its newline) on the calling thread's
  // loop and returns the reply line (without its newline). For the server
  // thread and tests; never call it on the home thread (it would wait for
  // the home loop it blocks).
  std::string Execute(const std::string& line);

 private:
  ControlServer(BlockDevice& disk, EventLoop& home, ControlServerOptions opts, int listen_fd,
                int stop_fd);
  // The server thread's body.
  void ThreadMain();
  // Serves connected client `fd` until it hangs up or Shutdown().
  void ServeClient(int fd);
  void Log(const std::string& line) const;

  BlockDevice& disk_;
  EventLoop& home_;
  ControlServerOptions opts_;
  int listen_fd_;
  int stop_fd_;  // eventfd: written by Shutdown()
  std::atomic<bool> exited_{false};
  bool shut_down_ = false;
  std::thread thread_;
};

}  // namespace kvblk::cli

#endif  // KVBLK_TOOLS_CONTROL_SERVER_H_
