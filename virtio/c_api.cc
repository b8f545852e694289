// The C embedding API (include/kvblk/kvblk_c.h) over BlkDevice.
//
// Every entry point converts errors to -errno, records a message for
// kvblk_last_error(), and lets no exception cross the C boundary.
#include <errno.h>
#include <limits.h>
#include <stdlib.h>

#include <chrono>
#include <memory>
#include <new>
#include <string>
#include <thread>

#include "kvblk/block_device.h"
#include "kvblk/event_loop.h"
#include "kvblk/kvblk_c.h"
#include "kvblk/virtio_blk.h"
#include "virtio/blk_device.h"

struct kvblk_image {
  std::unique_ptr<kvblk::BlockDevice> disk;
  std::string path;  // canonical when it could be resolved
  int devices = 0;
};

struct kvblk_dev {
  kvblk_image* image = nullptr;
  std::unique_ptr<kvblk::BlkDevice> device;
  std::thread::id owner;  // the thread whose event loop runs the device
};

namespace {

thread_local std::string g_last_error;

int Fail(int err, std::string message) {
  g_last_error = std::move(message);
  return -err;
}

int FromStatus(const kvblk::Status& st) {
  if (st.ok()) {
    g_last_error.clear();
    return 0;
  }
  return Fail(st.ToErrno(), st.ToString());
}

// Runs `fn` (returning int) and turns any exception into -ENOMEM / -EIO.
template <typename F>
int Guard(F&& fn) {
  try {
    return fn();
  } catch (const std::bad_alloc&) {
    return Fail(ENOMEM, "out of memory");
  } catch (...) {
    return Fail(EIO, "internal error");
  }
}

// Opens `path` with `o` into a new handle in *out. Inside Guard().
int Open(const char* path, const kvblk::OpenOptions& o, kvblk_image** out) {
  auto disk = kvblk::OpenImage(path, o);
  if (!disk.ok()) return FromStatus(disk.status());
  auto img = std::make_unique<kvblk_image>();
  img->disk = std::move(*disk);
  char* real = realpath(path, nullptr);
  img->path = real != nullptr ? real : path;
  free(real);
  *out = img.release();
  g_last_error.clear();
  return 0;
}

int InFlight(const kvblk_dev* dev) {
  size_t n = dev->device->in_flight();
  return n > INT_MAX ? INT_MAX : static_cast<int>(n);
}

}  // namespace

extern "C" {

const char* kvblk_last_error(void) { return g_last_error.c_str(); }

int kvblk_open(const char* path, int read_only, const char* format, kvblk_image** out) {
  if (path == nullptr || out == nullptr) return Fail(EINVAL, "kvblk_open: NULL argument");
  return Guard([&] {
    kvblk::OpenOptions o;
    o.read_only = read_only != 0;
    if (format != nullptr) o.format = format;
    return Open(path, o, out);
  });
}

int kvblk_open_with(const char* path, const kvblk_open_options* options, kvblk_image** out) {
  if (path == nullptr || options == nullptr || out == nullptr)
    return Fail(EINVAL, "kvblk_open_with: NULL argument");
  if (options->size != sizeof(kvblk_open_options)) {
    return Fail(EINVAL, "kvblk_open_with: options->size is " + std::to_string(options->size) +
                            ", not sizeof(struct kvblk_open_options) (" +
                            std::to_string(sizeof(kvblk_open_options)) + ")");
  }
  // OpenImage refuses an L2 cache over kMaxL2CacheBytes (InvalidArgument,
  // so -EINVAL) before it opens anything.
  return Guard([&] {
    kvblk::OpenOptions o;
    o.read_only = options->read_only != 0;
    if (options->format != nullptr) o.format = options->format;
    o.direct = options->direct != 0;
    o.l2_cache_bytes = options->l2_cache_bytes;
    return Open(path, o, out);
  });
}

uint64_t kvblk_image_l2_cache_size(const kvblk_image* image) {
  return image != nullptr ? image->disk->l2_cache_bytes() : 0;
}

uint64_t kvblk_image_size(const kvblk_image* image) {
  return image != nullptr ? image->disk->size() : 0;
}

int kvblk_close(kvblk_image* image) {
  if (image == nullptr) return Fail(EINVAL, "kvblk_close: NULL image");
  if (image->devices > 0) {
    return Fail(
        EBUSY, "kvblk_close: " + std::to_string(image->devices) + " device(s) still use the image");
  }
  return Guard([&] {
    std::unique_ptr<kvblk_image> owned(image);
    return FromStatus(kvblk::CloseImage(std::move(owned->disk)));
  });
}

int kvblk_dev_create(kvblk_image* image, unsigned num_queues, kvblk_dev** out) {
  if (image == nullptr || out == nullptr) return Fail(EINVAL, "kvblk_dev_create: NULL argument");
  if (num_queues < 1 || num_queues > 65535) {
    return Fail(EINVAL, "kvblk_dev_create: num_queues must be in 1..65535");
  }
  return Guard([&] {
    kvblk::VirtioBlkOptions opts;
    opts.num_queues = static_cast<int>(num_queues);
    opts.image_path = image->path;
    auto created = kvblk::BlkDevice::Create(*image->disk, opts);
    if (!created.ok()) return FromStatus(created.status());
    auto dev = std::make_unique<kvblk_dev>();
    dev->image = image;
    dev->device = std::move(*created);
    dev->owner = std::this_thread::get_id();
    ++image->devices;
    *out = dev.release();
    g_last_error.clear();
    return 0;
  });
}

void kvblk_dev_destroy(kvblk_dev* dev) {
  if (dev == nullptr) return;
  try {
    dev->device.reset();  // drains requests in flight
  } catch (...) {
  }
  --dev->image->devices;
  delete dev;
}

uint64_t kvblk_dev_features(const kvblk_dev* dev) {
  return dev != nullptr ? dev->device->features() : 0;
}

int kvblk_dev_set_features(kvblk_dev* dev, uint64_t features) {
  if (dev == nullptr) return Fail(EINVAL, "kvblk_dev_set_features: NULL device");
  return Guard([&] { return FromStatus(dev->device->SetDriverFeatures(features)); });
}

uint32_t kvblk_dev_config_size(const kvblk_dev* dev) {
  return dev != nullptr ? dev->device->config_size() : 0;
}

int kvblk_dev_config_read(const kvblk_dev* dev, uint32_t offset, void* buf, uint32_t len) {
  if (dev == nullptr || (buf == nullptr && len > 0)) {
    return Fail(EINVAL, "kvblk_dev_config_read: NULL argument");
  }
  return Guard([&] { return FromStatus(dev->device->ReadConfig(offset, buf, len)); });
}

int kvblk_dev_config_write(kvblk_dev* dev, uint32_t offset, const void* buf, uint32_t len) {
  if (dev == nullptr || (buf == nullptr && len > 0)) {
    return Fail(EINVAL, "kvblk_dev_config_write: NULL argument");
  }
  return Guard([&] { return FromStatus(dev->device->WriteConfig(offset, buf, len)); });
}

int kvblk_dev_set_memory(kvblk_dev* dev, const struct kvblk_mem_region* regions, unsigned count) {
  if (dev == nullptr || regions == nullptr || count == 0) {
    return Fail(EINVAL, "kvblk_dev_set_memory: no regions");
  }
  return Guard([&] {
    std::vector<kvblk::GuestMemoryRegion> rs;
    rs.reserve(count);
    for (unsigned i = 0; i < count; ++i) {
      rs.push_back({regions[i].guest_phys_addr, regions[i].size, regions[i].host_addr,
                    regions[i].read_only != 0});
    }
    return FromStatus(dev->device->SetGuestMemory(std::move(rs)));
  });
}

unsigned kvblk_dev_num_queues(const kvblk_dev* dev) {
  return dev != nullptr ? static_cast<unsigned>(dev->device->num_queues()) : 0;
}

unsigned kvblk_dev_max_queue_size(const kvblk_dev* dev) {
  return dev != nullptr ? dev->device->max_queue_size() : 0;
}

int kvblk_dev_set_queue(kvblk_dev* dev, unsigned idx, uint16_t size, uint64_t desc, uint64_t avail,
                        uint64_t used) {
  if (dev == nullptr) return Fail(EINVAL, "kvblk_dev_set_queue: NULL device");
  if (idx >= static_cast<unsigned>(dev->device->num_queues())) {
    return Fail(EINVAL, "kvblk_dev_set_queue: no queue " + std::to_string(idx));
  }
  return Guard([&] {
    int q = static_cast<int>(idx);
    auto stopped = dev->device->StopQueue(q);
    if (!stopped.ok()) return FromStatus(stopped.status());
    kvblk::VirtqueueAddress addr;
    addr.size = size;
    addr.desc_gpa = desc;
    addr.avail_gpa = avail;
    addr.used_gpa = used;
    kvblk::Status st = dev->device->SetQueue(q, addr);
    if (!st.ok()) return FromStatus(st);
    return FromStatus(dev->device->EnableQueue(q));
  });
}

int kvblk_dev_kick(kvblk_dev* dev, unsigned idx) {
  if (dev == nullptr) return Fail(EINVAL, "kvblk_dev_kick: NULL device");
  if (idx >= static_cast<unsigned>(dev->device->num_queues())) {
    return Fail(EINVAL, "kvblk_dev_kick: no queue " + std::to_string(idx));
  }
  return Guard([&] {
    if (std::this_thread::get_id() == dev->owner) {
      dev->device->Kick(static_cast<int>(idx));
    } else {
      dev->device->PostKick(static_cast<int>(idx));
    }
    return 0;
  });
}

void kvblk_dev_set_irq_callback(kvblk_dev* dev, kvblk_irq_fn cb, void* opaque) {
  if (dev == nullptr) return;
  if (cb == nullptr) {
    dev->device->SetInterruptCallback(nullptr);
  } else {
    dev->device->SetInterruptCallback([cb, opaque](int queue) { cb(opaque, queue); });
  }
}

int kvblk_dev_poll(kvblk_dev* dev) {
  if (dev == nullptr) return Fail(EINVAL, "kvblk_dev_poll: NULL device");
  return Guard([&] {
    kvblk::EventLoop::Current().RunOnce();
    return InFlight(dev);
  });
}

int kvblk_dev_run(kvblk_dev* dev, int timeout_ms) {
  if (dev == nullptr) return Fail(EINVAL, "kvblk_dev_run: NULL device");
  return Guard([&] {
    using Clock = std::chrono::steady_clock;
    const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms < 0 ? 0 : timeout_ms);
    kvblk::EventLoop& loop = kvblk::EventLoop::Current();
    // One pass first: it picks up kicks posted from other threads.
    loop.RunOnce();
    loop.RunUntil([&] {
      return dev->device->in_flight() == 0 || (timeout_ms >= 0 && Clock::now() >= deadline);
    });
    return InFlight(dev);
  });
}

int kvblk_dev_needs_reset(const kvblk_dev* dev) {
  return dev != nullptr && dev->device->needs_reset() ? 1 : 0;
}

int kvblk_dev_reset(kvblk_dev* dev) {
  if (dev == nullptr) return Fail(EINVAL, "kvblk_dev_reset: NULL device");
  return Guard([&] {
    dev->device->Drain();
    dev->device->Reset();
    return 0;
  });
}

}  // extern "C"
