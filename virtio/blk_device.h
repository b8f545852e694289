// BlkDevice: the virtio-blk device model behind VirtioBlkDevice
// (include/kvblk/virtio_blk.h), over one BlockDevice.
//
// Per queue: the address the transport set, the Virtqueue once enabled, a
// generation number (bumped whenever the queue is re-created or the device
// reset, so a request that started on an older incarnation is never
// completed into the new one) and the NEEDS_RESET error, if any.
//
// Request life: Kick() pops a chain, ParseBlkRequest() checks it, and either
// it is answered at once (a guest error), or a read goes to the disk's
// StartRead, or Execute() runs as a coroutine on the disk. Either way
// Complete() runs exactly once per popped chain: status byte, used ring,
// interrupt. Execute() converts any exception from the disk layer into
// IOERR, so nothing escapes the detached coroutine; StartRead reports one
// as an error status.
//
// Threading: see virtio_blk.h; LoopForQueue() is the one place that maps a
// queue to the loop that serves it, OnQueueLoop() how the control thread
// changes a queue's state.
#ifndef KVBLK_VIRTIO_BLK_DEVICE_H_
#define KVBLK_VIRTIO_BLK_DEVICE_H_

#include <array>
#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "kvblk/block_device.h"
#include "kvblk/event_loop.h"
#include "kvblk/virtio_blk.h"
#include "virtio/blk_request.h"
#include "virtio/guest_memory.h"
#include "virtio/virtqueue.h"

namespace kvblk {

class BlkDevice final : public VirtioBlkDevice {
 public:
  // InvalidArgument for bad options (see VirtioBlkOptions).
  static Result<std::unique_ptr<BlkDevice>> Create(BlockDevice& disk, const VirtioBlkOptions& opts);
  ~BlkDevice() override;

  uint64_t features() const override { return offered_features_; }
  Status SetDriverFeatures(uint64_t features) override;
  uint64_t driver_features() const override { return driver_features_; }

  uint32_t config_size() const override { return vblk::kConfigSize; }
  Status ReadConfig(uint32_t offset, void* buf, uint32_t len) const override;
  Status WriteConfig(uint32_t offset, const void* buf, uint32_t len) override;

  Status SetGuestMemory(std::vector<GuestMemoryRegion> regions,
                        std::function<void()> on_release = {}) override;

  int num_queues() const override { return static_cast<int>(queues_.size()); }
  uint16_t max_queue_size() const override { return opts_.max_queue_size; }
  Status SetQueue(int index, const VirtqueueAddress& addr) override;
  Status EnableQueue(int index) override;
  Result<uint16_t> StopQueue(int index) override;
  bool queue_enabled(int index) const override;
  bool queue_broken(int index) const override;

  void Kick(int index) override;
  void PostKick(int index) override;
  void SetInterruptCallback(std::function<void(int queue)> cb) override { irq_ = std::move(cb); }
  void SetGuestErrorCallback(std::function<void(int queue, const char* error)> cb) override {
    guest_error_ = std::move(cb);
  }

  EventLoop& queue_loop(int index) const override { return LoopForQueue(index); }

  bool needs_reset() const override { return needs_reset_; }
  void Reset() override;
  size_t in_flight() const override { return in_flight_; }
  void Drain() override;

  const std::string& serial() const override { return serial_; }
  uint64_t capacity_sectors() const override { return disk_.size() / vblk::kSectorSize; }

  // VirtioError-level views for tests and transports.
  VirtioStatus SetDriverFeaturesChecked(uint64_t features);
  VirtioStatus ReadConfigChecked(uint32_t offset, void* buf, uint32_t len) const;
  VirtioStatus WriteConfigChecked(uint32_t offset, const void* buf, uint32_t len);
  VirtioStatus EnableQueueChecked(int index);
  // What broke queue `index`, if it is broken. On the queue's loop.
  std::optional<VirtioError> queue_error(int index) const;
  // The most recent guest error (request- or ring-level), if any.
  std::optional<VirtioError> last_guest_error() const {
    std::lock_guard<std::mutex> l(error_mu_);
    return last_guest_error_;
  }
  // Whether writes must be durable before they complete (5.2.6.4: no
  // FLUSH/CONFIG_WCE negotiated, or writeback == 0 under CONFIG_WCE).
  bool write_through() const;
  BlkLimits limits() const;

 private:
  // Owned by the queue's loop; `enabled` and `broken` are also read by the
  // control thread.
  struct Queue {
    std::optional<VirtqueueAddress> addr;
    std::optional<Virtqueue> vq;
    std::atomic<bool> enabled = false;  // popping allowed
    uint64_t generation = 0;
    size_t in_flight = 0;
    // Completions pushed in the loop's current pass whose interrupt decision
    // (and in_flight_ decrement) waits for the pass to end: see SignalUsed.
    size_t unsignalled = 0;
    std::optional<VirtioError> error;  // why the queue stopped (NEEDS_RESET)
    std::atomic<bool> broken = false;  // error.has_value()
  };

  BlkDevice(BlockDevice& disk, const VirtioBlkOptions& opts, std::string serial);

  // The loop that serves queue `index`.
  EventLoop& LoopForQueue(int index) const {
    const auto& loops = opts_.queue_loops;
    return loops.empty() ? *loop_ : *loops[static_cast<size_t>(index) % loops.size()];
  }
  // Runs `fn` on queue `index`'s loop and returns when it has run; the
  // calling thread runs its own loop meanwhile.
  void OnQueueLoop(int index, const std::function<void()>& fn);

  VirtioStatus EnableQueueOnLoop(int index);
  std::array<uint8_t, vblk::kConfigSize> BuildConfig() const;
  void StartRequest(int index, DescriptorChain chain, const BlkLimits& limits);
  // A guest read (the common request) goes to BlockDevice::StartRead and
  // completes from its callback, without a coroutine of its own.
  struct GuestRead;
  void StartGuestRead(BlkRequest req, int index, uint64_t generation,
                      std::shared_ptr<const GuestMemory> mem);
  Task<uint8_t> Execute(BlkRequest req);
  // After a used-ring push on queue `index`: interrupts the driver if it
  // asked for it. Inside a loop pass the decision waits for the pass end, so
  // a batch of completions costs one interrupt (one eventfd write) instead
  // of one each; the completion counts in in_flight_ until then, so Drain()
  // returns only after the interrupt. Returns whether it was deferred.
  bool SignalUsed(int index);
  void FlushUsed(int index);
  void Complete(int index, uint64_t generation, uint16_t head, uint8_t* status_ptr, uint8_t status,
                uint32_t used_len);
  void BreakQueue(int index, VirtioError e);
  void ReportGuestError(int index, VirtioError e);

  BlockDevice& disk_;
  const VirtioBlkOptions opts_;
  const std::string serial_;
  const Capabilities caps_;
  const bool read_only_;
  EventLoop* const loop_;  // the control thread's
  uint64_t offered_features_ = 0;
  std::atomic<uint64_t> driver_features_ = 0;
  std::atomic<uint8_t> writeback_ = 1;
  std::atomic<bool> needs_reset_ = false;
  std::shared_ptr<const GuestMemory> mem_;  // control thread
  std::vector<Queue> queues_;
  std::atomic<size_t> in_flight_ = 0;
  // Set while Drain() waits, so the completion that empties the device
  // wakes it.
  std::atomic<EventLoop*> drainer_ = nullptr;
  std::function<void(int)> irq_;
  std::function<void(int, const char*)> guest_error_;
  mutable std::mutex error_mu_;
  std::optional<VirtioError> last_guest_error_;  // guarded by error_mu_
  // Posted kicks hold a weak reference, so one that arrives after the device
  // is gone does nothing.
  std::shared_ptr<BlkDevice*> self_;
};

// The serial a device gets when none is configured: "kvblk-" and 14 hex
// digits of a 64-bit FNV-1a hash of `path` (exactly 20 bytes).
std::string DefaultSerial(const std::string& path);

}  // namespace kvblk

#endif  // KVBLK_VIRTIO_BLK_DEVICE_H_
