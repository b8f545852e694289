// The virtio-blk device model (virtio 1.x, device type 2), independent of any
// transport.
//
// A transport (the vhost-user server, the C embedding API in kvblk_c.h, a
// test) creates a VirtioBlkDevice over a BlockDevice, tells it where guest
// memory is and where each queue's rings are, forwards the driver's feature
// bits and configuration-space accesses, and calls Kick() when the driver
// notifies a queue. The device pops every available descriptor chain, runs
// each request as a coroutine on the BlockDevice (requests of one queue run
// concurrently and complete out of order), writes the status byte, adds the
// chain to the used ring and raises the interrupt callback when the driver
// wants one (VIRTIO_F_EVENT_IDX aware).
//
// Guest mistakes never reach the disk: a bad request is completed with
// VIRTIO_BLK_S_IOERR or VIRTIO_BLK_S_UNSUPP and processing goes on; a broken
// ring stops that queue and sets needs_reset() (the transport reports
// DEVICE_NEEDS_RESET and the interrupt callback is called with
// kConfigInterrupt); the other queues keep working.
//
// Threading: the thread that creates the device is its control thread: every
// method is called there, except PostKick() (thread-safe) and Kick() (on the
// queue's loop). Each queue is served by one event loop: by default the
// control thread's (EventLoop::Current() at creation), or the loops listed
// in VirtioBlkOptions::queue_loops (queue i on queue_loops[i % n]), each run
// by its own I/O thread. A queue's ring, its requests and their completions
// live on its loop; control methods that change a queue run there (posted,
// with the control thread running its own loop until they are done). The
// interrupt and guest-error callbacks are called on the queue's loop. The
// device must be destroyed on the control thread once the other loops have
// stopped; its destructor waits for requests in flight.
#ifndef KVBLK_VIRTIO_BLK_H_
#define KVBLK_VIRTIO_BLK_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "kvblk/block_device.h"
#include "kvblk/status.h"

namespace kvblk {

class EventLoop;

namespace vblk {

inline constexpr uint32_t kDeviceId = 2;
inline constexpr uint32_t kSectorSize = 512;
inline constexpr uint32_t kIdBytes = 20;          // VIRTIO_BLK_ID_BYTES
inline constexpr uint16_t kMaxQueueSize = 32768;  // split virtqueue limit

constexpr uint64_t FeatureBit(int bit) { return uint64_t{1} << bit; }

// Feature bit numbers (virtio 1.x 5.2.3 and 6).
inline constexpr int kFSizeMax = 1;
inline constexpr int kFSegMax = 2;
inline constexpr int kFGeometry = 4;
inline constexpr int kFRo = 5;
inline constexpr int kFBlkSize = 6;
inline constexpr int kFFlush = 9;
inline constexpr int kFTopology = 10;
inline constexpr int kFConfigWce = 11;
inline constexpr int kFMq = 12;
inline constexpr int kFDiscard = 13;
inline constexpr int kFWriteZeroes = 14;
inline constexpr int kFLifetime = 15;
inline constexpr int kFSecureErase = 16;
inline constexpr int kFIndirectDesc = 28;  // VIRTIO_F_INDIRECT_DESC
inline constexpr int kFEventIdx = 29;      // VIRTIO_F_EVENT_IDX
inline constexpr int kFVersion1 = 32;      // VIRTIO_F_VERSION_1

// Request types (5.2.6).
inline constexpr uint32_t kTypeIn = 0;
inline constexpr uint32_t kTypeOut = 1;
inline constexpr uint32_t kTypeFlush = 4;
inline constexpr uint32_t kTypeGetId = 8;
inline constexpr uint32_t kTypeGetLifetime = 10;
inline constexpr uint32_t kTypeDiscard = 11;
inline constexpr uint32_t kTypeWriteZeroes = 13;
inline constexpr uint32_t kTypeSecureErase = 14;

// Status byte values.
inline constexpr uint8_t kStatusOk = 0;
inline constexpr uint8_t kStatusIoErr = 1;
inline constexpr uint8_t kStatusUnsupp = 2;

// Flag in struct virtio_blk_discard_write_zeroes.
inline constexpr uint32_t kSegmentFlagUnmap = 1;

// struct virtio_blk_config byte offsets (5.2.4); little-endian fields.
inline constexpr uint32_t kCfgCapacity = 0;                 // le64
inline constexpr uint32_t kCfgSizeMax = 8;                  // le32
inline constexpr uint32_t kCfgSegMax = 12;                  // le32
inline constexpr uint32_t kCfgGeometryCylinders = 16;       // le16
inline constexpr uint32_t kCfgGeometryHeads = 18;           // u8
inline constexpr uint32_t kCfgGeometrySectors = 19;         // u8
inline constexpr uint32_t kCfgBlkSize = 20;                 // le32
inline constexpr uint32_t kCfgPhysicalBlockExp = 24;        // u8
inline constexpr uint32_t kCfgAlignmentOffset = 25;         // u8
inline constexpr uint32_t kCfgMinIoSize = 26;               // le16
inline constexpr uint32_t kCfgOptIoSize = 28;               // le32
inline constexpr uint32_t kCfgWriteback = 32;               // u8 (the only writable field)
inline constexpr uint32_t kCfgNumQueues = 34;               // le16
inline constexpr uint32_t kCfgMaxDiscardSectors = 36;       // le32
inline constexpr uint32_t kCfgMaxDiscardSeg = 40;           // le32
inline constexpr uint32_t kCfgDiscardSectorAlignment = 44;  // le32
inline constexpr uint32_t kCfgMaxWriteZeroesSectors = 48;   // le32
inline constexpr uint32_t kCfgMaxWriteZeroesSeg = 52;       // le32
inline constexpr uint32_t kCfgWriteZeroesMayUnmap = 56;     // u8
// Secure-erase (60..71) and zoned (72..95) fields read as zero: the features
// are not offered.
inline constexpr uint32_t kConfigSize = 96;

// Passed to the interrupt callback instead of a queue index when the
// configuration changed (NEEDS_RESET was set).
inline constexpr int kConfigInterrupt = -1;

}  // namespace vblk

// One range of guest physical memory mapped into this process.
struct GuestMemoryRegion {
  uint64_t guest_phys_addr = 0;
  uint64_t size = 0;
  void* host_addr = nullptr;
  bool read_only = false;  // the device may not write into it
};

// Where a split virtqueue lives (guest physical addresses).
struct VirtqueueAddress {
  uint16_t size = 0;  // power of two, <= max_queue_size
  uint64_t desc_gpa = 0;
  uint64_t avail_gpa = 0;
  uint64_t used_gpa = 0;
  // Free-running index of the next avail ring entry to process (0 for a
  // fresh queue; vhost-user SET_VRING_BASE). The used index is read from the
  // used ring when the queue is enabled.
  uint16_t next_avail = 0;
};

struct VirtioBlkOptions {
  int num_queues = 1;             // 1..65535 (num_queues in the config space)
  uint16_t max_queue_size = 256;  // power of two <= 32768
  // GET_ID serial, printable ASCII, at most 20 bytes. Empty: "kvblk-" and 14
  // hex digits of a hash of `image_path` (or of the disk's file name), so the
  // same image gets the same serial on every run.
  std::string serial;
  std::string image_path;
  bool read_only = false;        // offer VIRTIO_BLK_F_RO even if the disk is writable
  bool writeback = true;         // cache mode after reset (config field writeback)
  uint32_t seg_max = 0;          // max data buffers per request; 0: max_queue_size - 2
  uint32_t size_max = 1u << 20;  // max bytes per buffer (advisory)
  uint32_t max_discard_sectors = 1u << 22;
  uint32_t max_discard_seg = 16;
  uint32_t max_write_zeroes_sectors = 1u << 22;
  uint32_t max_write_zeroes_seg = 16;
  // The loops that serve the queues (not owned; they must outlive the
  // device). Empty: the creating thread's loop serves every queue.
  std::vector<EventLoop*> queue_loops;
};

class VirtioBlkDevice {
 public:
  virtual ~VirtioBlkDevice() = default;

  // Feature bits the device offers (device_features).
  virtual uint64_t features() const = 0;
  // Accepts the driver's feature bits (FEATURES_OK). InvalidArgument, and
  // nothing changes, when a bit was not offered or VIRTIO_F_VERSION_1 is
  // missing (no legacy interface).
  virtual Status SetDriverFeatures(uint64_t features) = 0;
  virtual uint64_t driver_features() const = 0;

  // Configuration space access, byte-exact (struct virtio_blk_config, 96
  // bytes). Reads outside it are InvalidArgument. Only `writeback` (offset
  // 32, 1 byte, value 0 or 1, with VIRTIO_BLK_F_CONFIG_WCE negotiated) is
  // writable; other writes are InvalidArgument and change nothing.
  virtual uint32_t config_size() const = 0;
  virtual Status ReadConfig(uint32_t offset, void* buf, uint32_t len) const = 0;
  virtual Status WriteConfig(uint32_t offset, const void* buf, uint32_t len) = 0;

  // Replaces the guest memory map. `on_release` runs once neither a queue nor
  // an in-flight request uses this map any more (the transport unmaps there).
  // InvalidArgument for overlapping or empty regions. Enabled queues are
  // re-resolved against the new map; a queue whose rings are no longer inside
  // it is stopped and NEEDS_RESET is set.
  virtual Status SetGuestMemory(std::vector<GuestMemoryRegion> regions,
                                std::function<void()> on_release = {}) = 0;

  virtual int num_queues() const = 0;
  virtual uint16_t max_queue_size() const = 0;
  // Records where queue `index` lives; takes effect at EnableQueue().
  virtual Status SetQueue(int index, const VirtqueueAddress& addr) = 0;
  // Validates and resolves the rings against guest memory and starts the
  // queue. InvalidArgument (with the VirtioError name) on a bad size,
  // misaligned rings, or rings outside guest memory.
  virtual Status EnableQueue(int index) = 0;
  // Stops popping from queue `index` and returns the next avail index
  // (vhost-user GET_VRING_BASE). Requests in flight still complete into the
  // used ring unless the device is Reset() first; call Drain() to wait.
  virtual Result<uint16_t> StopQueue(int index) = 0;
  virtual bool queue_enabled(int index) const = 0;
  // Whether queue `index` found its ring broken (and stopped).
  virtual bool queue_broken(int index) const = 0;

  // The driver notified queue `index`: processes every available chain.
  // On the queue's loop only. Unknown or stopped queues are ignored.
  virtual void Kick(int index) = 0;
  // Thread-safe Kick(): runs it on the queue's loop.
  virtual void PostKick(int index) = 0;
  // The loop that serves queue `index`.
  virtual EventLoop& queue_loop(int index) const = 0;

  // Called on the queue's loop with a queue index when that queue's used
  // ring needs an interrupt, or with vblk::kConfigInterrupt (when a ring
  // broke; on the loop of the queue that broke).
  virtual void SetInterruptCallback(std::function<void(int queue)> cb) = 0;

  // Called on the queue's loop with the queue and the name of the rule a
  // guest broke ("SectorPastEnd", "DescriptorLoop", ...) for every rejected
  // request and broken ring; for logging. Keep it cheap.
  virtual void SetGuestErrorCallback(std::function<void(int queue, const char* error)> cb) = 0;

  // DEVICE_NEEDS_RESET: some queue's ring was broken.
  virtual bool needs_reset() const = 0;
  // Device reset (driver wrote 0 to the status): stops every queue, forgets
  // queue addresses and negotiated features, clears needs_reset. Requests
  // still in flight finish on the disk but are not completed to the guest;
  // call Drain() first to let them complete.
  virtual void Reset() = 0;

  // Requests started and not yet completed (all queues).
  virtual size_t in_flight() const = 0;
  // Runs the control thread's loop until no request is in flight on any
  // queue. Control thread only, never from inside a coroutine.
  virtual void Drain() = 0;

  virtual const std::string& serial() const = 0;
  virtual uint64_t capacity_sectors() const = 0;
};

// Creates a device over `disk`, which must outlive it. InvalidArgument on
// bad options (queue counts and sizes, serial).
Result<std::unique_ptr<VirtioBlkDevice>> CreateVirtioBlkDevice(BlockDevice& disk,
                                                               const VirtioBlkOptions& opts);

}  // namespace kvblk

#endif  // KVBLK_VIRTIO_BLK_H_
