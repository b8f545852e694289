#include "virtio/blk_device.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <memory>
#include <new>
#include <utility>

#include "virtio/byte_order.h"

namespace kvblk {
namespace {

using vblk::FeatureBit;

constexpr uint16_t kGeometryHeads = 16;
constexpr uint8_t kGeometrySectors = 63;

bool IsPowerOfTwo(uint32_t v) { return v != 0 && (v & (v - 1)) == 0; }

Status FromVirtio(VirtioStatus st, const std::string& context) {
  return st.ok() ? Status::Ok() : VirtioErrorToStatus(st.error(), context);
}

// Copies the serial, NUL-padded to 20 bytes, into the first bytes of `data`
// (as much as fits: the driver should give exactly 20).
void CopySerial(const std::string& serial, const std::vector<iovec>& data) {
  uint8_t id[vblk::kIdBytes] = {};
  std::memcpy(id, serial.data(), std::min<size_t>(serial.size(), sizeof id));
  size_t done = 0;
  for (const iovec& v : data) {
    if (done == sizeof id) break;
    size_t k = std::min(v.iov_len, sizeof id - done);
    std::memcpy(v.iov_base, id + done, k);
    done += k;
  }
}

}  // namespace

std::string DefaultSerial(const std::string& path) {
  uint64_t h = 14695981039346656037ull;  // FNV-1a 64
  for (unsigned char c : path) {
    h ^= c;
    h *= 1099511628211ull;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, "kvblk-%014llx",
                static_cast<unsigned long long>(h & 0x00ffffffffffffffull));
  return buf;
}

Result<std::unique_ptr<VirtioBlkDevice>> CreateVirtioBlkDevice(BlockDevice& disk,
                                                               const VirtioBlkOptions& opts) {
  auto dev = BlkDevice::Create(disk, opts);
  if (!dev.ok()) return dev.status();
  return std::unique_ptr<VirtioBlkDevice>(std::move(*dev));
}

Result<std::unique_ptr<BlkDevice>> BlkDevice::Create(BlockDevice& disk,
                                                     const VirtioBlkOptions& opts_in) {
  VirtioBlkOptions opts = opts_in;
  if (opts.num_queues < 1 || opts.num_queues > 65535) {
    return Status::InvalidArgument("virtio-blk: num_queues " + std::to_string(opts.num_queues) +
                                   " is not in 1..65535");
  }
  if (!IsPowerOfTwo(opts.max_queue_size) || opts.max_queue_size < 2 ||
      opts.max_queue_size > vblk::kMaxQueueSize) {
    return Status::InvalidArgument("virtio-blk: max_queue_size " +
                                   std::to_string(opts.max_queue_size) +
                                   " is not a power of two in 2..32768");
  }
  if (opts.seg_max == 0) opts.seg_max = std::max(1, opts.max_queue_size - 2);
  if (opts.max_discard_seg == 0 || opts.max_write_zeroes_seg == 0 ||
      opts.max_discard_sectors == 0 || opts.max_write_zeroes_sectors == 0 || opts.size_max == 0) {
    return Status::InvalidArgument("virtio-blk: size and segment limits must be non-zero");
  }
  std::string serial = opts.serial;
  if (serial.empty()) {
    std::string path = opts.image_path;
    if (path.empty()) {
      auto info = disk.Info();
      if (info.ok()) path = info->filename;
    }
    serial = DefaultSerial(path);
  }
  if (serial.size() > vblk::kIdBytes) {
    return Status::InvalidArgument("virtio-blk: serial '" + serial + "' is longer than 20 bytes");
  }
  for (unsigned char c : serial) {
    if (c < 0x20 || c > 0x7e) {
      return Status::InvalidArgument("virtio-blk: serial must be printable ASCII");
    }
  }
  return std::unique_ptr<BlkDevice>(new BlkDevice(disk, opts, std::move(serial)));
}

BlkDevice::BlkDevice(BlockDevice& disk, const VirtioBlkOptions& opts, std::string serial)
    : disk_(disk),
      opts_(opts),
      serial_(std::move(serial)),
      caps_(disk.capabilities()),
      read_only_(opts.read_only || caps_.read_only),
      loop_(&EventLoop::Current()),
      writeback_(opts.writeback ? 1 : 0),
      queues_(opts.num_queues),
      self_(std::make_shared<BlkDevice*>(this)) {
  offered_features_ = FeatureBit(vblk::kFSizeMax) | FeatureBit(vblk::kFSegMax) |
                      FeatureBit(vblk::kFBlkSize) | FeatureBit(vblk::kFTopology) |
                      FeatureBit(vblk::kFFlush) | FeatureBit(vblk::kFConfigWce) |
                      FeatureBit(vblk::kFMq) | FeatureBit(vblk::kFVersion1) |
                      FeatureBit(vblk::kFIndirectDesc) | FeatureBit(vblk::kFEventIdx);
  if (read_only_) {
    offered_features_ |= FeatureBit(vblk::kFRo);
  } else {
    if (caps_.discard) offered_features_ |= FeatureBit(vblk::kFDiscard);
    if (caps_.write_zeroes) offered_features_ |= FeatureBit(vblk::kFWriteZeroes);
  }
}

BlkDevice::~BlkDevice() {
  if (in_flight_ > 0) Drain();
  self_.reset();
  // A kick posted to another queue loop may have taken its reference just
  // before the reset: let every such loop finish what it is running.
  for (int i = 0; i < num_queues(); ++i) {
    EventLoop& l = LoopForQueue(i);
    bool seen = &l == loop_;
    for (int j = 0; j < i && !seen; ++j) seen = &LoopForQueue(j) == &l;
    if (!seen) OnQueueLoop(i, [] {});
  }
}

// ---- Features and configuration space -------------------------------------

VirtioStatus BlkDevice::SetDriverFeaturesChecked(uint64_t features) {
  if (features & ~offered_features_) return VirtioError::kFeatureNotOffered;
  if (!(features & FeatureBit(vblk::kFVersion1))) return VirtioError::kLegacyDriverNotSupported;
  driver_features_ = features;  // read by the queues' loops for requests parsed after this
  // 5.2.5 device requirement: CONFIG_WCE without FLUSH starts writethrough.
  if ((features & FeatureBit(vblk::kFConfigWce)) && !(features & FeatureBit(vblk::kFFlush))) {
    writeback_ = 0;
  }
  return {};
}

Status BlkDevice::SetDriverFeatures(uint64_t features) {
  return FromVirtio(SetDriverFeaturesChecked(features), "virtio-blk: driver features");
}

bool BlkDevice::write_through() const {
  const uint64_t f = driver_features_;
  if (f & FeatureBit(vblk::kFConfigWce)) return writeback_ == 0;
  return !(f & FeatureBit(vblk::kFFlush));
}

void BlkDevice::OnQueueLoop(int index, const std::function<void()>& fn) {
  EventLoop& target = LoopForQueue(index);
  EventLoop& here = EventLoop::Current();
  if (&target == &here) {
    fn();
    return;
  }
  std::atomic<bool> done = false;
  target.PostFunction([&fn, &done, &here] {
    fn();
    done.store(true, std::memory_order_release);
    here.Wake();
  });
  here.RunUntil([&done] { return done.load(std::memory_order_acquire); });
}

std::array<uint8_t, vblk::kConfigSize> BlkDevice::BuildConfig() const {
  std::array<uint8_t, vblk::kConfigSize> c{};
  const uint64_t capacity = capacity_sectors();
  const uint32_t blk_size = caps_.logical_block_size ? caps_.logical_block_size : 512;
  StoreLe64(&c[vblk::kCfgCapacity], capacity);
  StoreLe32(&c[vblk::kCfgSizeMax], opts_.size_max);
  StoreLe32(&c[vblk::kCfgSegMax], opts_.seg_max);
  uint64_t cylinders = capacity / (kGeometryHeads * kGeometrySectors);
  StoreLe16(&c[vblk::kCfgGeometryCylinders],
            static_cast<uint16_t>(std::min<uint64_t>(cylinders, 65535)));
  c[vblk::kCfgGeometryHeads] = kGeometryHeads;
  c[vblk::kCfgGeometrySectors] = kGeometrySectors;
  StoreLe32(&c[vblk::kCfgBlkSize], blk_size);
  c[vblk::kCfgPhysicalBlockExp] = 0;
  c[vblk::kCfgAlignmentOffset] = 0;
  StoreLe16(&c[vblk::kCfgMinIoSize], 1);
  StoreLe32(&c[vblk::kCfgOptIoSize], caps_.optimal_io_size / blk_size);
  c[vblk::kCfgWriteback] = writeback_;
  StoreLe16(&c[vblk::kCfgNumQueues], static_cast<uint16_t>(queues_.size()));
  if (offered_features_ & FeatureBit(vblk::kFDiscard)) {
    StoreLe32(&c[vblk::kCfgMaxDiscardSectors], opts_.max_discard_sectors);
    StoreLe32(&c[vblk::kCfgMaxDiscardSeg], opts_.max_discard_seg);
    StoreLe32(&c[vblk::kCfgDiscardSectorAlignment],
              std::max<uint32_t>(1, caps_.discard_granularity / vblk::kSectorSize));
  }
  if (offered_features_ & FeatureBit(vblk::kFWriteZeroes)) {
    StoreLe32(&c[vblk::kCfgMaxWriteZeroesSectors], opts_.max_write_zeroes_sectors);
    StoreLe32(&c[vblk::kCfgMaxWriteZeroesSeg], opts_.max_write_zeroes_seg);
    c[vblk::kCfgWriteZeroesMayUnmap] = caps_.discard ? 1 : 0;
  }
  return c;
}

VirtioStatus BlkDevice::ReadConfigChecked(uint32_t offset, void* buf, uint32_t len) const {
  if (offset > vblk::kConfigSize || len > vblk::kConfigSize - offset) {
    return VirtioError::kConfigAccessOutOfRange;
  }
  auto c = BuildConfig();
  if (len > 0) std::memcpy(buf, c.data() + offset, len);
  return {};
}

Status BlkDevice::ReadConfig(uint32_t offset, void* buf, uint32_t len) const {
  return FromVirtio(ReadConfigChecked(offset, buf, len), "virtio-blk: config read");
}

VirtioStatus BlkDevice::WriteConfigChecked(uint32_t offset, const void* buf, uint32_t len) {
  if (offset > vblk::kConfigSize || len > vblk::kConfigSize - offset) {
    return VirtioError::kConfigAccessOutOfRange;
  }
  if (offset != vblk::kCfgWriteback || len != 1 ||
      !(driver_features_ & FeatureBit(vblk::kFConfigWce))) {
    return VirtioError::kConfigFieldReadOnly;
  }
  uint8_t v = *static_cast<const uint8_t*>(buf);
  if (v > 1) return VirtioError::kBadConfigValue;
  writeback_ = v;
  return {};
}

Status BlkDevice::WriteConfig(uint32_t offset, const void* buf, uint32_t len) {
  return FromVirtio(WriteConfigChecked(offset, buf, len), "virtio-blk: config write");
}

// ---- Guest memory and queues -------------------------------------------------

Status BlkDevice::SetGuestMemory(std::vector<GuestMemoryRegion> regions,
                                 std::function<void()> on_release) {
  auto mem = GuestMemory::Create(std::move(regions), std::move(on_release));
  if (!mem.ok()) return VirtioErrorToStatus(mem.error(), "virtio-blk: guest memory");
  mem_ = *mem;
  for (size_t i = 0; i < queues_.size(); ++i) {
    const int index = static_cast<int>(i);
    std::shared_ptr<const GuestMemory> m = mem_;
    OnQueueLoop(index, [this, index, m] {
      Queue& q = queues_[static_cast<size_t>(index)];
      if (!q.vq) return;
      VirtioStatus st = q.vq->Remap(m);
      if (!st.ok()) BreakQueue(index, st.error());
    });
  }
  return Status::Ok();
}

Status BlkDevice::SetQueue(int index, const VirtqueueAddress& addr) {
  if (index < 0 || index >= num_queues()) {
    return VirtioErrorToStatus(VirtioError::kInvalidQueueIndex, "virtio-blk: set queue");
  }
  if (queues_[index].enabled) {
    return Status::Busy("virtio-blk: queue " + std::to_string(index) + " is running");
  }
  OnQueueLoop(index, [&] { queues_[index].addr = addr; });
  return Status::Ok();
}

VirtioStatus BlkDevice::EnableQueueChecked(int index) {
  if (index < 0 || index >= num_queues()) return VirtioError::kInvalidQueueIndex;
  VirtioStatus result;
  OnQueueLoop(index, [&] { result = EnableQueueOnLoop(index); });
  return result;
}

VirtioStatus BlkDevice::EnableQueueOnLoop(int index) {
  Queue& q = queues_[index];
  if (!q.addr || mem_ == nullptr) return VirtioError::kQueueNotReady;
  if (q.addr->size > opts_.max_queue_size) return VirtioError::kInvalidQueueSize;
  // A driver that honours seg_max with indirect descriptors may build
  // seg_max + 2 descriptors even in a smaller queue; allow that much.
  uint32_t max_chain = std::max<uint32_t>(q.addr->size, opts_.seg_max + 2);
  auto vq = Virtqueue::Create(mem_, *q.addr, driver_features_ & FeatureBit(vblk::kFIndirectDesc),
                              driver_features_ & FeatureBit(vblk::kFEventIdx), max_chain);
  if (!vq.ok()) return vq.error();
  q.vq.emplace(std::move(*vq));
  ++q.generation;
  q.enabled = true;
  q.error.reset();
  return {};
}

Status BlkDevice::EnableQueue(int index) {
  return FromVirtio(EnableQueueChecked(index), "virtio-blk: enable queue " + std::to_string(index));
}

Result<uint16_t> BlkDevice::StopQueue(int index) {
  if (index < 0 || index >= num_queues()) {
    return VirtioErrorToStatus(VirtioError::kInvalidQueueIndex, "virtio-blk: stop queue");
  }
  uint16_t next = 0;
  OnQueueLoop(index, [&] {
    Queue& q = queues_[index];
    q.enabled = false;
    if (q.vq) {
      next = q.vq->next_avail();
    } else if (q.addr) {
      next = q.addr->next_avail;
    }
  });
  return next;
}

bool BlkDevice::queue_enabled(int index) const {
  return index >= 0 && index < num_queues() && queues_[index].enabled;
}

bool BlkDevice::queue_broken(int index) const {
  return index >= 0 && index < num_queues() && queues_[index].broken;
}

std::optional<VirtioError> BlkDevice::queue_error(int index) const {
  if (index < 0 || index >= num_queues()) return std::nullopt;
  return queues_[index].error;
}

void BlkDevice::BreakQueue(int index, VirtioError e) {
  Queue& q = queues_[index];
  if (q.error) return;
  q.error = e;
  q.broken = true;
  q.enabled = false;
  ReportGuestError(index, e);
  bool was_set = needs_reset_.exchange(true);
  if (!was_set && irq_) irq_(vblk::kConfigInterrupt);
}

void BlkDevice::ReportGuestError(int index, VirtioError e) {
  {
    std::lock_guard<std::mutex> l(error_mu_);
    last_guest_error_ = e;
  }
  if (guest_error_) guest_error_(index, VirtioErrorName(e));
}

void BlkDevice::Reset() {
  for (int i = 0; i < num_queues(); ++i) {
    OnQueueLoop(i, [this, i] {
      Queue& q = queues_[static_cast<size_t>(i)];
      ++q.generation;
      q.vq.reset();
      q.addr.reset();
      q.enabled = false;
      q.error.reset();
      q.broken = false;
    });
  }
  driver_features_ = 0;
  writeback_ = opts_.writeback ? 1 : 0;
  needs_reset_ = false;
}

void BlkDevice::Drain() {
  EventLoop& here = EventLoop::Current();
  drainer_ = &here;
  here.RunUntil([this] { return in_flight_ == 0; });
  drainer_ = nullptr;
}

// ---- Requests ----------------------------------------------------------------

BlkLimits BlkDevice::limits() const {
  BlkLimits l;
  l.capacity_sectors = capacity_sectors();
  l.read_only = read_only_;
  const uint64_t f = driver_features_;
  l.discard = (f & FeatureBit(vblk::kFDiscard)) != 0;
  l.write_zeroes = (f & FeatureBit(vblk::kFWriteZeroes)) != 0;
  l.seg_max = opts_.seg_max;
  l.max_discard_sectors = opts_.max_discard_sectors;
  l.max_discard_seg = opts_.max_discard_seg;
  l.max_write_zeroes_sectors = opts_.max_write_zeroes_sectors;
  l.max_write_zeroes_seg = opts_.max_write_zeroes_seg;
  return l;
}

void BlkDevice::PostKick(int index) {
  std::weak_ptr<BlkDevice*> weak = self_;
  LoopForQueue(index).PostFunction([weak, index] {
    if (auto self = weak.lock()) (*self)->Kick(index);
  });
}

void BlkDevice::Kick(int index) {
  if (index < 0 || index >= num_queues()) return;
  Queue& q = queues_[index];
  if (!q.enabled || !q.vq || q.error) return;
  const BlkLimits lim = limits();
  const uint64_t generation = q.generation;
  // Bounded work per kick, so one busy queue cannot starve the loop; the
  // rest is picked up by a posted kick.
  uint32_t budget = q.vq->size();
  for (;;) {
    if (budget-- == 0) {
      PostKick(index);
      return;
    }
    auto popped = q.vq->Pop();
    if (!popped.ok()) {
      BreakQueue(index, popped.error());
      return;
    }
    if (!popped->has_value()) {
      if (q.vq->EnableNotification()) continue;
      return;
    }
    StartRequest(index, std::move(**popped), lim);
    // A synchronous completion ran the interrupt callback, which may have
    // stopped or reset the queue.
    if (!q.enabled || !q.vq || q.generation != generation) return;
  }
}

void BlkDevice::StartRequest(int index, DescriptorChain chain, const BlkLimits& lim) {
  Queue& q = queues_[index];
  ++in_flight_;
  ++q.in_flight;
  const uint64_t generation = q.generation;
  BlkRequest req;
  try {
    req = ParseBlkRequest(chain, lim);
  } catch (...) {
    // Out of memory while parsing: hand the chain back without a status.
    Complete(index, generation, chain.head, nullptr, 0, 0);
    return;
  }
  if (req.error) {
    ReportGuestError(index, *req.error);
    Complete(index, generation, req.head, req.status, req.error_status, req.used_len);
    return;
  }
  const uint16_t head = req.head;
  uint8_t* status_ptr = req.status;
  const uint32_t used_len = req.used_len;
  // The buffers stay mapped until the request is completed.
  std::shared_ptr<const GuestMemory> mem = q.vq->memory();
  if (req.type == BlkRequestType::kIn && req.data_len > 0) {
    StartGuestRead(std::move(req), index, generation, std::move(mem));
    return;
  }
  try {
    Spawn(Execute(std::move(req)),
          [this, index, generation, head, status_ptr, used_len, mem](uint8_t status) {
            Complete(index, generation, head, status_ptr, status, used_len);
          });
  } catch (...) {
    // A coroutine frame could not be allocated, so nothing started (Execute
    // itself never lets an exception out once running).
    Complete(index, generation, head, status_ptr, vblk::kStatusIoErr, used_len);
  }
}

struct BlkDevice::GuestRead {
  ReadRequest rr;
  BlkRequest req;  // owns the iovecs rr points to
  std::shared_ptr<const GuestMemory> mem;
  BlkDevice* dev = nullptr;
  int index = 0;
  uint64_t generation = 0;
};

void BlkDevice::StartGuestRead(BlkRequest req, int index, uint64_t generation,
                               std::shared_ptr<const GuestMemory> mem) {
  const uint16_t head = req.head;
  uint8_t* status_ptr = req.status;
  const uint32_t used_len = req.used_len;
  GuestRead* r;
  try {
    r = new GuestRead;
  } catch (const std::bad_alloc&) {
    Complete(index, generation, head, status_ptr, vblk::kStatusIoErr, used_len);
    return;
  }
  r->req = std::move(req);
  r->mem = std::move(mem);
  r->dev = this;
  r->index = index;
  r->generation = generation;
  r->rr.offset = r->req.sector * vblk::kSectorSize;  // range-checked by the parser
  r->rr.iov = r->req.data.data();
  r->rr.iovcnt = static_cast<int>(r->req.data.size());
  r->rr.user = r;
  r->rr.done = [](ReadRequest* rr, Status st) {
    std::unique_ptr<GuestRead> g(static_cast<GuestRead*>(rr->user));
    g->dev->Complete(g->index, g->generation, g->req.head, g->req.status,
                     st.ok() ? vblk::kStatusOk : vblk::kStatusIoErr, g->req.used_len);
  };
  disk_.StartRead(&r->rr);  // never throws; done() always runs
}

Task<uint8_t> BlkDevice::Execute(BlkRequest req) {
  const uint64_t offset = req.sector * vblk::kSectorSize;  // range-checked by the parser
  const int iovcnt = static_cast<int>(req.data.size());
  // 5.2.6.4: a write completed in writethrough mode must be stable.
  const bool stable = write_through();
  Status st;
  try {
    switch (req.type) {
      case BlkRequestType::kIn:
        if (req.data_len > 0) st = co_await disk_.Read(offset, req.data.data(), iovcnt);
        break;
      case BlkRequestType::kOut:
        if (req.data_len > 0) st = co_await disk_.Write(offset, req.data.data(), iovcnt);
        if (st.ok() && stable) st = co_await disk_.Flush();
        break;
      case BlkRequestType::kFlush:
        st = co_await disk_.Flush();
        break;
      case BlkRequestType::kGetId:
        CopySerial(serial_, req.data);
        break;
      case BlkRequestType::kDiscard:
        for (const BlkRange& r : req.ranges) {
          if (r.num_sectors == 0) continue;
          Status s = co_await disk_.Discard(r.sector * vblk::kSectorSize,
                                            uint64_t{r.num_sectors} * vblk::kSectorSize);
          // Discard is advisory (the device MAY deallocate).
          if (!s.ok() && s.code() != StatusCode::kNotSupported) {
            st = s;
            break;
          }
        }
        break;
      case BlkRequestType::kWriteZeroes:
        for (const BlkRange& r : req.ranges) {
          if (r.num_sectors == 0) continue;
          st = co_await disk_.WriteZeroes(r.sector * vblk::kSectorSize,
                                          uint64_t{r.num_sectors} * vblk::kSectorSize,
                                          (r.flags & vblk::kSegmentFlagUnmap) != 0);
          if (!st.ok()) break;
        }
        if (st.ok() && stable) st = co_await disk_.Flush();
        break;
      case BlkRequestType::kUnsupported:
        co_return vblk::kStatusUnsupp;
    }
  } catch (...) {
    // The disk layer threw (bad_alloc, a bug): the guest sees an I/O error,
    // and the request is still completed.
    co_return vblk::kStatusIoErr;
  }
  co_return st.ok() ? vblk::kStatusOk : vblk::kStatusIoErr;
}

void BlkDevice::Complete(int index, uint64_t generation, uint16_t head, uint8_t* status_ptr,
                         uint8_t status, uint32_t used_len) {
  Queue& q = queues_[index];
  --q.in_flight;
  // Started before a reset or re-enable: that ring is gone.
  if (q.generation == generation && q.vq) {
    if (status_ptr != nullptr) *status_ptr = status;
    q.vq->Push(head, status_ptr != nullptr ? used_len : 0);
    if (SignalUsed(index)) return;  // FlushUsed() finishes it
  }
  // Last: once Drain() sees zero, the transport may unmap guest memory.
  if (--in_flight_ == 0) {
    if (EventLoop* d = drainer_.load()) d->Wake();
  }
}

bool BlkDevice::SignalUsed(int index) {
  Queue& q = queues_[index];
  EventLoop& loop = EventLoop::Current();
  if (!loop.in_pass()) {
    if (q.vq->NeedsInterrupt() && irq_) irq_(index);
    return false;
  }
  if (q.unsignalled++ == 0) {
    std::weak_ptr<BlkDevice*> weak = self_;
    loop.AtPassEnd([weak, index] {
      // The device outlives its requests: ~BlkDevice drains, and in_flight_
      // counts this batch until FlushUsed() runs.
      if (auto s = weak.lock()) (*s)->FlushUsed(index);
    });
  }
  return true;
}

void BlkDevice::FlushUsed(int index) {
  Queue& q = queues_[index];
  const size_t n = std::exchange(q.unsignalled, 0);
  // The queue may have been re-created during the pass, with completions
  // pushed to the new ring too: decide for whatever ring is there now (an
  // extra interrupt is harmless, a missing one is not).
  if (q.vq && q.vq->NeedsInterrupt() && irq_) irq_(index);
  if (in_flight_.fetch_sub(n) == n) {
    if (EventLoop* d = drainer_.load()) d->Wake();
  }
}

}  // namespace kvblk
