// A vhost-user-blk front end: the part of a VMM that hands a virtio-blk
// device's rings to a back end over a Unix socket (QEMU's
// docs/interop/vhost-user.rst), and the driver side of split virtqueues
// (virtio 1.x, 2.7) carrying virtio-blk requests (5.2.6).
//
// "Guest memory" is one memfd mapping owned by the client: the rings, the
// request headers and status bytes, and a data area from which callers
// allocate the buffers they read into and write from. Guest physical
// address = offset in that memfd.
//
// Threading: Connect() and the data-area allocator are thread-safe; each
// BlkQueue must be used by one thread at a time (the fio engine gives each
// job thread its own queue).
#ifndef KVBLK_PERF_FIO_VHOST_USER_CLIENT_H_
#define KVBLK_PERF_FIO_VHOST_USER_CLIENT_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "kvblk/status.h"

namespace kvblk::perf {

struct VhostUserClientOptions {
  int num_queues = 1;
  // Split-ring size (power of two). A request takes three descriptors, so
  // a queue holds queue_size / 3 requests in flight.
  uint16_t queue_size = 256;
  uint64_t data_bytes = 256ull << 20;  // shared data area (sparse memfd)
  // How long to keep retrying when the back end refuses or drops the
  // connection during the handshake (it may still be tearing down a
  // previous client).
  int connect_timeout_ms = 5000;
};

// What the back end told us during the handshake.
struct VhostUserBlkInfo {
  uint64_t capacity_bytes = 0;  // config.capacity * 512
  uint32_t blk_size = 512;
  uint64_t device_features = 0;
  uint64_t acked_features = 0;  // virtio feature bits we accepted
  uint64_t protocol_features = 0;
  uint32_t max_queues = 1;  // GET_QUEUE_NUM (1 without the MQ protocol feature)
  bool read_only = false;
  bool flush = false;    // VIRTIO_BLK_F_FLUSH
  bool discard = false;  // VIRTIO_BLK_F_DISCARD
};

// One completed request.
struct BlkCompletion {
  void* cookie;
  uint8_t status;  // VIRTIO_BLK_S_OK / IOERR / UNSUPP
};

// The driver side of one split virtqueue carrying virtio-blk requests.
class BlkQueue {
 public:
  enum class Op : uint8_t { kRead, kWrite, kFlush, kDiscard };

  // Free request slots (each request takes one until it completes).
  unsigned free_slots() const { return static_cast<unsigned>(free_.size()); }
  unsigned capacity() const { return slots_; }
  unsigned in_flight() const { return slots_ - free_slots(); }

  // Writes the descriptors and an avail ring entry for one request; the
  // device sees it only after Publish(). `buf` must lie inside the client's
  // data area (InvalidArgument otherwise); kFlush ignores buf/len and
  // kDiscard ignores buf. Busy when no slot is free.
  Status Add(Op op, uint64_t offset, void* buf, uint32_t len, void* cookie);
  // Makes added requests visible to the device and kicks it unless it asked
  // not to be notified: with VIRTIO_RING_F_EVENT_IDX (acked when offered,
  // as a Linux guest does) by its avail_event, else by
  // VRING_USED_F_NO_NOTIFY.
  void Publish();
  // Appends completed requests (at most `max`) to `out`; never blocks.
  // Returns how many were appended.
  unsigned Reap(std::vector<BlkCompletion>* out, unsigned max);
  // Waits until the device signals the call eventfd or `timeout_ms` (-1:
  // forever) passes. Returns false on timeout. With EVENT_IDX it first asks
  // for an interrupt at the next used entry (used_event) and returns at
  // once if that entry is already there; between waits the device does not
  // interrupt, so a caller that keeps reaping is not disturbed.
  bool WaitForInterrupt(int timeout_ms);

 private:
  friend class VhostUserBlkClient;
  struct Desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
  };
  struct UsedElem {
    uint32_t id;
    uint32_t len;
  };
  // Per-slot request header, discard segment and status byte (driver memory).
  struct SlotMem {
    uint32_t type;
    uint32_t ioprio;
    uint64_t sector;
    uint64_t seg_sector;
    uint32_t seg_num_sectors;
    uint32_t seg_flags;
    uint8_t status;
    uint8_t pad[31];
  };
  static_assert(sizeof(SlotMem) == 64);

  uint64_t Gpa(const void* p) const;

  class VhostUserBlkClient* client_ = nullptr;
  int index_ = 0;
  uint16_t size_ = 0;
  unsigned slots_ = 0;
  Desc* desc_ = nullptr;
  uint16_t* avail_ = nullptr;     // flags, idx, ring[size], used_event
  uint16_t* used_hdr_ = nullptr;  // flags, idx, ring[size] (4 u16 each), avail_event
  UsedElem* used_ring_ = nullptr;
  SlotMem* slot_mem_ = nullptr;
  std::vector<void*> cookies_;
  std::vector<uint16_t> free_;
  uint16_t avail_idx_ = 0;      // next avail index to write (not yet published)
  uint16_t published_idx_ = 0;  // avail index the device has seen
  uint16_t last_used_ = 0;
  bool event_idx_ = false;  // VIRTIO_RING_F_EVENT_IDX negotiated
  int kick_fd_ = -1;
  int call_fd_ = -1;
};

class VhostUserBlkClient {
 public:
  ~VhostUserBlkClient();
  VhostUserBlkClient(const VhostUserBlkClient&) = delete;
  VhostUserBlkClient& operator=(const VhostUserBlkClient&) = delete;

  // Connects to the back end listening on `socket_path`, negotiates
  // features, shares the memory and starts opts.num_queues queues.
  // InvalidArgument for bad options, NotSupported when the back end lacks
  // something required (VIRTIO_F_VERSION_1, the CONFIG protocol feature,
  // enough queues), IoError for socket failures or a closed connection.
  static Result<std::unique_ptr<VhostUserBlkClient>> Connect(const std::string& socket_path,
                                                             const VhostUserClientOptions& opts);
  // Handshake up to GET_CONFIG only, then disconnects: the disk size.
  static Result<VhostUserBlkInfo> Probe(const std::string& socket_path,
                                        int connect_timeout_ms = 5000);

  const VhostUserBlkInfo& info() const { return info_; }
  int num_queues() const { return static_cast<int>(queues_.size()); }
  BlkQueue& queue(int i) { return *queues_[i]; }

  // Allocates `len` bytes (4 KiB aligned) from the shared data area; never
  // freed individually. NoSpace when the area is exhausted. Thread-safe.
  Result<void*> AllocData(size_t len);
  bool InDataArea(const void* p, size_t len) const;

 private:
  friend class BlkQueue;
  VhostUserBlkClient() = default;

  Status Handshake(bool config_only);
  Status SetupMemoryAndQueues();
  Status SendMsg(uint32_t request, const void* payload, uint32_t size, const int* fds = nullptr,
                 int nfds = 0, bool want_ack = false);
  // Receives the reply to `request` into `payload` (exactly `size` bytes
  // unless `size_out` is given, which then receives the actual size).
  Status RecvReply(uint32_t request, void* payload, uint32_t size, uint32_t* size_out = nullptr);
  Status Call(uint32_t request, const void* in, uint32_t in_size, void* out, uint32_t out_size);
  Status GetU64(uint32_t request, uint64_t* out);
  Status SetU64(uint32_t request, uint64_t value, bool want_ack);

  std::string path_;
  VhostUserClientOptions opts_;
  VhostUserBlkInfo info_;
  int sock_ = -1;
  bool reply_ack_ = false;

  int mem_fd_ = -1;
  uint8_t* mem_ = nullptr;
  size_t mem_size_ = 0;
  size_t data_off_ = 0;  // start of the data area in mem_
  std::mutex data_mu_;
  size_t data_next_ = 0;  // GUARDED_BY(data_mu_): next free byte (offset in mem_)

  std::vector<std::unique_ptr<BlkQueue>> queues_;
};

}  // namespace kvblk::perf

#endif  // KVBLK_PERF_FIO_VHOST_USER_CLIENT_H_
