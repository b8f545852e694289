// The VhostUserServer end-to-end fixture: the server runs on its own thread
// over a RawDevice on a MemFile (kDiskSize bytes of a known pattern), and the
// test drives it through the front end of vhost_user_front_end.h.
#ifndef KVBLK_TESTS_SUPPORT_VHOST_USER_SERVER_FIXTURE_H_
#define KVBLK_TESTS_SUPPORT_VHOST_USER_SERVER_FIXTURE_H_

#include <gtest/gtest.h>

#include <atomic>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "disk/io_engine.h"
#include "disk/mem_file.h"
#include "kvblk/status.h"
#include "tests/support/vhost_user_front_end.h"
#include "virtio/vhost_user_server.h"

namespace kvblk::testing {

// Size of the disk every test server serves.
inline constexpr uint64_t kDiskSize = 1 << 20;

// A VhostUserServer on its own thread, whose loop serves it; it logs into
// a list the test can search.
class ServerThread {
 public:
  explicit ServerThread(std::shared_ptr<MemFileData> data) : data_(std::move(data)) {}
  ~ServerThread();

  // Creates the server (on the new thread, whose loop then serves it);
  // returns Create()'s status.
  Status Start(VhostUserServerOptions opts);
  // Before Start(): the server thread's loop gets its I/O engine from
  // `make` instead of the default (fault injection).
  void SetEngine(std::function<std::unique_ptr<IoEngine>()> make) { make_engine_ = std::move(make); }

  // Run()'s status once it returned (or a timeout error).
  Status WaitRun();

  // Stops the server and joins its thread. Idempotent.
  void StopAndJoin();

  // Whether a logged line contains `needle`.
  bool HasLog(const std::string& needle);
  // Every logged line, for failure messages.
  std::string Logs();
  int served() const { return served_; }
  void NotifyConfigChange() { server_->NotifyConfigChange(); }

 private:
  std::shared_ptr<MemFileData> data_;
  std::function<std::unique_ptr<IoEngine>()> make_engine_;
  std::thread thread_;
  VhostUserServer* server_ = nullptr;
  std::promise<Status> run_done_;
  std::shared_future<Status> run_done_f_ = run_done_.get_future().share();
  std::promise<void> release_;
  std::atomic<int> served_{0};
  std::mutex mu_;
  std::vector<std::string> logs_;
};

class VhostUserServerTest : public ::testing::Test {
 protected:
  VhostUserServerTest();

  // Starts a server over a socketpair; the test end becomes `fe_`.
  void StartPair(int num_queues = 1, int iothreads = 1);

  // The usual front-end sequence up to a running queue 0 (QEMU's order),
  // every state change acknowledged through REPLY_ACK.
  void Handshake(FrontEnd& fe, DriverRing& ring, QueueFds& fds, bool ack_protocol_bit = true,
                 bool send_enable = true, bool add_mem_reg = false);

  // Sets up queue `q` on `ring` starting at avail index `base`.
  void SetUpRing(FrontEnd& fe, uint32_t q, DriverRing& ring, QueueFds& fds, uint32_t base,
                 bool send_enable = true);

  // Runs one request to completion; returns its status byte.
  uint8_t RunOne(DriverRing& ring, QueueFds& fds, BlkReq& r, uint32_t type, uint64_t sector,
                 const std::vector<uint8_t>& out, uint32_t in_len);

  // Runs `n` 512-byte reads of sectors 0..n-1 one after another; each must
  // succeed (the failure names the read and shows the server's log).
  void ReadSectors(DriverRing& ring, QueueFds& fds, int n);

  // Kicks through `kick` (an old or disabled ring's eventfd), lets the
  // server's loop run a round trip and a pause, then expects the used index
  // to be `used` still: the kick was not served.
  void ExpectKickIgnored(QueueFds& kick, DriverRing& ring, uint16_t used);

  // Bytes [offset, offset + len) of the served disk.
  std::vector<uint8_t> Disk(uint64_t offset, size_t len);

  std::shared_ptr<MemFileData> data_;
  ServerThread server_;
  GuestRam ram_;
  GuestRam* mem_ = &ram_;  // the memory Handshake() shares
  std::unique_ptr<FrontEnd> fe_;
  uint64_t features_ = 0;
};

}  // namespace kvblk::testing

#endif  // KVBLK_TESTS_SUPPORT_VHOST_USER_SERVER_FIXTURE_H_
