// VhostUserServer: a vhost-user-blk back end (the `kvblk serve` engine).
//
// It listens on a Unix socket, serves one front end (QEMU's
// vhost-user-blk-pci, cloud-hypervisor, a test) at a time, and drives a
// VirtioBlkDevice over a BlockDevice it does not own. Protocol:
// docs/interop/vhost-user.rst; message framing and validation live in
// vhost_user_protocol.h, the memory table in vhost_user_memory.h.
//
// Offered: virtio-blk features from the device model plus
// VHOST_USER_F_PROTOCOL_FEATURES; protocol features MQ, REPLY_ACK, CONFIG,
// RESET_DEVICE, CONFIGURE_MEM_SLOTS. Not offered (and their requests
// refused): LOG_SHMFD / dirty logging, IOMMU, INFLIGHT_SHMFD, in-band
// notifications, the back-end request channel, STATUS, postcopy, packed
// rings. Kick fds must be real descriptors (no polling mode).
//
// Rings (vhost-user.rst "Ring states"): a ring starts at SET_VRING_KICK and
// stops at GET_VRING_BASE (which waits for the device's requests in flight
// and answers with the next avail index). Without
// VHOST_USER_F_PROTOCOL_FEATURES acked in SET_FEATURES a started ring is
// enabled; with it, SET_VRING_ENABLE decides. A device queue runs while its
// ring is started, enabled, fully described (SET_VRING_NUM/ADDR) and guest
// memory is mapped; ring addresses (front-end user addresses) are translated
// to guest physical ones through the region table at that moment. Disabling
// a ring stops the queue and drains its requests, so the used ring is
// complete and the saved avail index exact.
//
// Error policy, per message (see vhost_user_protocol.h for the errors):
//  - framing errors (bad version, oversized payload, too many descriptors,
//    EOF inside a message, a front end that does not read replies) and
//    unknown request numbers close the connection;
//  - a refused GET_CONFIG is answered with an empty payload (the spec's
//    error reply); any other refused request that normally has a reply body
//    (GET_VRING_BASE with a bad index, ...) closes the connection;
//  - any other refused request is answered with a non-zero u64 when
//    REPLY_ACK was negotiated and need_reply is set, and is otherwise
//    logged and ignored.
// Descriptors that came with a refused message are closed.
//
// Threads and events: the server runs on the event loop of the thread that
// calls Create() and Run() (the device's loop); every piece of protocol
// state lives there. Queue i is served by I/O thread i mod iothreads (thread
// 0 being the server's). A FdPoller thread waits for the listening socket
// and the connection socket (oneshot: re-armed once the loop has read all it
// had). A kick eventfd is read by its queue's loop, in that loop's io_uring
// (EventfdWatch), which then runs VirtioBlkDevice::Kick() itself. Where that
// is not possible (the thread-pool I/O engine, a kick descriptor that is
// not an eventfd, or a kernel that refuses the read) the poller watches it
// instead and posts the kick to the loop (coalesced: at most one pending
// per queue). Interrupts are written to the call eventfd on the queue's
// loop; a queue the device finds broken (NEEDS_RESET) signals its error
// eventfd.
//
// Disconnect: rings stop, requests in flight finish (Drain), the device is
// destroyed (unmapping guest memory once nothing uses it), the image is
// flushed, and the server waits for the next connection (or returns with
// `once`). Stop() ends Run() the same way.
//
// Writes to a call eventfd whose reader is gone could raise SIGPIPE if a
// front end passed a pipe; programs embedding the server should ignore
// SIGPIPE (kvblk serve does). Socket writes never raise it.
#ifndef KVBLK_VIRTIO_VHOST_USER_SERVER_H_
#define KVBLK_VIRTIO_VHOST_USER_SERVER_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "disk/loop_thread.h"
#include "kvblk/block_device.h"
#include "kvblk/event_loop.h"
#include "kvblk/status.h"
#include "kvblk/virtio_blk.h"
#include "virtio/eventfd_watch.h"
#include "virtio/fd_poller.h"
#include "virtio/vhost_user_memory.h"
#include "virtio/vhost_user_protocol.h"

namespace kvblk {

struct VhostUserServerOptions {
  // Unix socket to listen on. It is created; a stale socket file (nobody
  // listening) is replaced; a live one is Busy; any other file there is
  // InvalidArgument. Removed again when the server is destroyed.
  std::string socket_path;
  // Instead of socket_path: serve this already connected socket (taken
  // over), and let Run() return when it closes. For tests.
  int connection_fd = -1;
  // The device: num_queues (1..256, vhost-user's vring index is 8 bits),
  // serial, read_only, max_queue_size, ...
  VirtioBlkOptions device;
  // Return from Run() after the first connection ends.
  bool once = false;
  // I/O threads serving the queues (1..64): queue i runs on thread
  // i % iothreads. Thread 0 is the server's own (the one that calls Run(),
  // which also owns the disk); the others are started by Create().
  int iothreads = 1;
  // GET_MAX_MEM_SLOTS: how many regions ADD_MEM_REG may build up.
  uint32_t max_mem_slots = 32;
  // Receives one line per event worth telling: connections, refused
  // messages, guest errors (rate-limited per connection). Default: stderr.
  std::function<void(const std::string&)> log;
};

class VhostUserServer {
 public:
  // Validates the options (by creating the device), opens the listening
  // socket. Call on the thread whose loop will serve the device. Errors:
  // InvalidArgument (options, socket path too long or not a socket), Busy
  // (a server is listening on socket_path), IoError.
  static Result<std::unique_ptr<VhostUserServer>> Create(BlockDevice& disk,
                                                         VhostUserServerOptions opts);
  // Stops serving (as Stop()) and removes the socket file. On the loop
  // thread.
  ~VhostUserServer();
  VhostUserServer(const VhostUserServer&) = delete;
  VhostUserServer& operator=(const VhostUserServer&) = delete;

  // Serves connections until Stop(), or until the first one ends with
  // `once` (or `connection_fd`). On the thread that called Create().
  // Returns OK after an orderly stop; an error if the server could not go on
  // (accept failed, device creation failed, the flush after a disconnect
  // failed).
  Status Run();
  // Makes Run() return: the current connection is ended as on disconnect.
  // Thread-safe and async-signal-safe (one write() to an eventfd); may be
  // called before Run().
  void Stop();

  // Tells the front end that the device's configuration changed (its
  // capacity after a resize): VHOST_USER_BACKEND_CONFIG_CHANGE_MSG on the
  // back-end channel, if the front end set one up (protocol features
  // BACKEND_REQ and CONFIG); QEMU then rereads the config space and
  // notifies the guest. Otherwise nothing happens. Thread-safe.
  void NotifyConfigChange();

  uint64_t offered_features() const { return offered_features_; }
  uint64_t offered_protocol_features() const;
  // Connections that ended so far.
  int connections_served() const { return connections_served_; }

 private:
  struct Vring {
    uint16_t num = 0;  // SET_VRING_NUM; 0: not set
    std::optional<vhost_user::VringAddr> addr;
    uint16_t base = 0;  // next avail index to process
    vhost_user::UniqueFd kick;
    // The kick eventfd is watched by one of these: read in the queue
    // loop's ring (kick_id names that watch), or by the poller.
    std::unique_ptr<EventfdWatch> kick_reader;
    uint64_t kick_id = 0;
    uint64_t kick_watch = 0;  // FdPoller id, 0: none
    vhost_user::UniqueFd call;
    vhost_user::UniqueFd err;
    bool started = false;  // SET_VRING_KICK seen, no GET_VRING_BASE since
    bool enabled = false;  // SET_VRING_ENABLE
    bool running = false;  // the device queue is enabled
    bool err_signalled = false;
  };

  VhostUserServer(BlockDevice& disk, VhostUserServerOptions opts, EventLoop& loop);

  // Poller callbacks hand over to these (loop thread).
  void OnListenReadable();
  void OnConnReadable(uint64_t conn_gen);
  void OnKick(int q);
  void OnStop();
  void SendConfigChange();

  Status StartConnection(vhost_user::UniqueFd fd);
  void Disconnect(const std::string& why);
  void FinishIfDone();
  void ResetConnectionState();
  Status CreateDevice();

  // One request: checks, dispatches and replies per the error policy.
  // Returns false when the connection must be closed.
  bool HandleMessage(vhost_user::Message m);
  vhost_user::VuStatus Dispatch(vhost_user::Message& m, std::optional<std::vector<uint8_t>>& body);
  vhost_user::VuStatus HandleSetFeatures(const vhost_user::Message& m);
  // SET_VRING_NUM, SET_VRING_BASE, GET_VRING_BASE, SET_VRING_ENABLE.
  vhost_user::VuStatus HandleVringState(const vhost_user::Message& m,
                                        std::optional<std::vector<uint8_t>>& body);
  vhost_user::VuStatus HandleMemoryChange(vhost_user::Message& m);
  vhost_user::VuStatus HandleVringFd(vhost_user::Message& m);
  vhost_user::VuStatus HandleGetConfig(const vhost_user::Message& m,
                                       std::optional<std::vector<uint8_t>>& body);
  vhost_user::VuStatus HandleSetConfig(const vhost_user::Message& m);
  vhost_user::VuResult<Vring*> VringFor(uint32_t index);
  bool Negotiated(int protocol_bit) const;
  bool Reply(const vhost_user::Message& request, std::vector<uint8_t> payload);

  // Starts or stops queue `q` to match its ring's state.
  vhost_user::VuStatus UpdateRing(int q);
  // Stops the device queue (if running), waits for its requests and records
  // the next avail index.
  void StopRing(int q);
  void StopAllRings();
  vhost_user::VuStatus ApplyMemory();
  // Watches `fd` as queue q's kick eventfd (replacing any other): in the
  // queue loop's ring when EventfdWatch supports it, else on the poller.
  vhost_user::VuStatus SetKickFd(int q, vhost_user::UniqueFd fd);
  // Watches queue q's kick eventfd (Vring::kick) on the poller; on failure
  // closes it.
  vhost_user::VuStatus WatchKickOnPoller(int q);
  // A ring read of queue q's kick eventfd failed (watch `id`): move the
  // watch to the poller. Loop thread.
  void OnKickReadFailed(int q, uint64_t id, int err);
  // Stops watching queue q's kick eventfd and closes it.
  void DropKickFd(int q);
  void OnInterrupt(int q);
  void Log(const std::string& line);
  void LogLimited(const std::string& line);
  // Starts iothreads - 1 threads with a loop each.
  Status StartIoThreads(int count);
  void StopIoThreads();

  BlockDevice& disk_;
  VhostUserServerOptions opts_;
  EventLoop* const loop_;
  uint64_t offered_features_ = 0;
  std::unique_ptr<VirtioBlkDevice> device_;
  std::unique_ptr<FdPoller> poller_;
  vhost_user::UniqueFd listen_fd_;
  vhost_user::UniqueFd stop_fd_;  // eventfd written by Stop()
  bool socket_created_ = false;
  uint64_t listen_watch_ = 0;
  uint64_t stop_watch_ = 0;

  // The connection (loop thread).
  vhost_user::UniqueFd conn_fd_;
  uint64_t conn_watch_ = 0;
  uint64_t conn_gen_ = 0;  // bumped per connection and at disconnect
  bool connected_ = false;
  vhost_user::MessageReader reader_;
  uint64_t protocol_features_ = 0;
  bool protocol_features_acked_ = false;  // bit 30 in SET_FEATURES
  vhost_user::VhostUserMemory memory_;
  std::vector<Vring> vrings_;
  vhost_user::UniqueFd backend_fd_;  // SET_BACKEND_REQ_FD; loop thread
  std::string error_detail_;  // context for the next refusal's log line
  std::atomic<int> log_budget_ = 0;  // guest errors are logged from queue loops
  std::mutex log_mu_;
  // Vring::call is signalled on the queue's loop and replaced by
  // SET_VRING_CALL on the loop thread.
  std::mutex call_mu_;

  // The other I/O threads (queue i runs on thread i mod iothreads, thread
  // 0 being this one).
  std::vector<std::unique_ptr<LoopThread>> io_threads_;

  std::unique_ptr<std::atomic<bool>[]> kick_pending_;  // per queue; poller sets, loop clears
  uint64_t kick_ids_ = 0;  // the last Vring::kick_id handed out
  int in_handler_ = 0;  // > 0 while a message or a disconnect is being handled
  bool stopping_ = false;
  bool finished_ = false;
  Status run_status_;
  int connections_served_ = 0;
  // Work posted to the loop holds a weak reference, so none runs after the
  // server is gone.
  std::shared_ptr<VhostUserServer*> alive_;
};

}  // namespace kvblk

#endif  // KVBLK_VIRTIO_VHOST_USER_SERVER_H_
