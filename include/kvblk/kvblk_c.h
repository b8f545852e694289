/* kvblk C embedding API: a virtio-blk device model for a VMM, kvmtool-style.
 *
 * The VMM owns the transport (virtio-pci or virtio-mmio registers, eventfds,
 * interrupt injection) and guest memory; kvblk owns the device: features,
 * configuration space, ring processing and the disk image (raw or qcow2).
 *
 *   kvblk_image *img;  kvblk_dev *dev;
 *   kvblk_open("disk.qcow2", 0, NULL, &img);
 *   kvblk_dev_create(img, 1, &dev);
 *   kvblk_dev_set_memory(dev, regions, n);            // guest RAM mappings
 *   kvblk_dev_set_irq_callback(dev, inject_irq, vm);  // used-buffer interrupts
 *   ... guest reads kvblk_dev_features / kvblk_dev_config_read,
 *       writes kvblk_dev_set_features, sets up queue 0:
 *   kvblk_dev_set_queue(dev, 0, 256, desc_gpa, avail_gpa, used_gpa);
 *   ... on every queue notification:
 *   kvblk_dev_kick(dev, 0);
 *   ... and from the VMM's I/O thread loop:
 *   kvblk_dev_run(dev, 10);
 *   kvblk_dev_destroy(dev);  kvblk_close(img);
 *
 * Conventions: functions returning int return 0 (or a documented count) on
 * success and a negative errno on failure (-EINVAL for a bad argument, a
 * guest-side violation or a corrupt image, -ENOENT, -EROFS, -ENOSPC,
 * -ENOTSUP, -EBUSY, -EIO, -ENOMEM; when the host's system call failed, its
 * own errno, such as -EACCES or -EDQUOT); kvblk_last_error() then describes
 * the failure. Handles are opaque. Threading: an image and its devices
 * belong to the thread that opened / created them (their I/O runs on that
 * thread's event loop); call every function from that thread, except
 * kvblk_dev_kick(), which may be called from any thread (a vCPU thread
 * handling a notification).
 */
#ifndef KVBLK_KVBLK_C_H_
#define KVBLK_KVBLK_C_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvblk_image kvblk_image;
typedef struct kvblk_dev kvblk_dev;

/* One range of guest physical memory mapped at host_addr in this process. */
struct kvblk_mem_region {
  uint64_t guest_phys_addr;
  uint64_t size;
  void *host_addr;
  int read_only; /* nonzero: the device never writes into it */
};

/* Passed as `queue` to the interrupt callback for a configuration change
 * (the device needs a reset: a queue's ring was found broken). */
#define KVBLK_IRQ_CONFIG (-1)

/* Interrupt callback: raise the used-buffer interrupt for `queue` (or the
 * configuration interrupt for KVBLK_IRQ_CONFIG). Runs on the device's thread,
 * from inside kvblk_dev_kick / kvblk_dev_poll / kvblk_dev_run; it must not
 * destroy the device. */
typedef void (*kvblk_irq_fn)(void *opaque, int queue);

/* A description of the last failure on the calling thread ("" if none).
 * Valid until the next kvblk call on this thread. */
const char *kvblk_last_error(void);

/* Opens a disk image. `format` is "raw", "qcow2" or NULL to probe; with
 * `read_only` nonzero the image is opened read-only and devices on it offer
 * VIRTIO_BLK_F_RO. On success stores a new handle in *out and returns 0.
 * Errors: -EINVAL (bad arguments or a corrupt image), -ENOENT, -EACCES,
 * -ENOTSUP (unsupported image feature), -EIO. */
int kvblk_open(const char *path, int read_only, const char *format, kvblk_image **out);

/* What kvblk_open_with takes. Zero it, set `size` to
 * sizeof(struct kvblk_open_options), then the fields you need. Fields added
 * later go at the end, and a later kvblk still accepts the sizes of earlier
 * versions of the struct. */
struct kvblk_open_options {
  uint32_t size;           /* sizeof(struct kvblk_open_options) */
  int read_only;           /* as kvblk_open's `read_only` */
  const char *format;      /* "raw", "qcow2" or NULL to probe */
  int direct;              /* nonzero: O_DIRECT, bypassing the host page cache
                            * (QEMU's cache=none); 0: through it */
  uint64_t l2_cache_bytes; /* qcow2 L2 table cache, rounded down to whole
                            * tables, at least 2, at most 64 GiB; 0: enough
                            * for the whole disk, up to 32 MiB */
};

/* kvblk_open with options. -EINVAL for a NULL argument, a `size` that is not
 * the size of a known version of the struct, or an L2 cache over 64 GiB;
 * otherwise as kvblk_open. */
int kvblk_open_with(const char *path, const struct kvblk_open_options *options, kvblk_image **out);

/* The image's virtual size in bytes. */
uint64_t kvblk_image_size(const kvblk_image *image);

/* What the image's L2 table cache holds, in bytes (whole tables); 0 for a
 * raw image. */
uint64_t kvblk_image_l2_cache_size(const kvblk_image *image);

/* Flushes and closes the image and frees the handle. -EBUSY (and nothing is
 * done) while a device created on it still exists. On any other error the
 * handle is freed all the same. */
int kvblk_close(kvblk_image *image);

/* Creates a virtio-blk device (device ID 2) with `num_queues` request queues
 * (1..65535; VIRTIO_BLK_F_MQ) over `image`, which must outlive it. The GET_ID
 * serial is derived from the image path. Queues accept sizes up to
 * kvblk_dev_max_queue_size(). On success stores the handle in *out. */
int kvblk_dev_create(kvblk_image *image, unsigned num_queues, kvblk_dev **out);

/* Waits for requests in flight, then frees the device. NULL is ignored. */
void kvblk_dev_destroy(kvblk_dev *dev);

/* Device feature bits to offer to the driver (bits 0..63). */
uint64_t kvblk_dev_features(const kvblk_dev *dev);

/* The driver's accepted features (FEATURES_OK). -EINVAL, and nothing changes,
 * if a bit was not offered or VIRTIO_F_VERSION_1 (bit 32) is missing: only
 * the virtio 1.x interface is supported. Call before kvblk_dev_set_queue. */
int kvblk_dev_set_features(kvblk_dev *dev, uint64_t features);

/* Size in bytes of the device configuration space (struct virtio_blk_config). */
uint32_t kvblk_dev_config_size(const kvblk_dev *dev);

/* Copies `len` bytes of the configuration space at `offset` into `buf`
 * (little-endian, byte-exact). -EINVAL if the range is outside it. */
int kvblk_dev_config_read(const kvblk_dev *dev, uint32_t offset, void *buf, uint32_t len);

/* A driver write to the configuration space. Only `writeback` (offset 32,
 * one byte, 0 or 1, after VIRTIO_BLK_F_CONFIG_WCE was negotiated) is
 * writable; anything else is -EINVAL and changes nothing. */
int kvblk_dev_config_write(kvblk_dev *dev, uint32_t offset, const void *buf, uint32_t len);

/* Tells the device where guest memory is (copied; `count` >= 1, regions must
 * not overlap). Every ring and buffer address is checked against these
 * regions. The mappings must stay valid until the device is destroyed, or
 * until a later kvblk_dev_set_memory has returned and no request is in
 * flight. -EINVAL for an invalid region list. */
int kvblk_dev_set_memory(kvblk_dev *dev, const struct kvblk_mem_region *regions, unsigned count);

unsigned kvblk_dev_num_queues(const kvblk_dev *dev);
unsigned kvblk_dev_max_queue_size(const kvblk_dev *dev);

/* Sets up split virtqueue `idx` (`size` entries, a power of two up to
 * kvblk_dev_max_queue_size(); guest physical addresses of the descriptor
 * table, available ring and used ring, 16-, 2- and 4-byte aligned) and starts
 * it (the driver wrote queue_enable). Guest memory must be set first. Calling
 * it again re-creates the queue from avail index 0; requests still in flight
 * on the old queue are not completed into the new one.
 * -EINVAL for a bad index, size, alignment or rings outside guest memory. */
int kvblk_dev_set_queue(kvblk_dev *dev, unsigned idx, uint16_t size, uint64_t desc, uint64_t avail,
                        uint64_t used);

/* The driver notified queue `idx`: every available request is started. Safe
 * from any thread; from another thread the work is handed to the device's
 * thread and runs in its next kvblk_dev_poll / kvblk_dev_run. -EINVAL for a
 * bad index. */
int kvblk_dev_kick(kvblk_dev *dev, unsigned idx);

/* Sets (or with cb NULL clears) the interrupt callback. */
void kvblk_dev_set_irq_callback(kvblk_dev *dev, kvblk_irq_fn cb, void *opaque);

/* One non-blocking pass of the device's event loop: completes what is
 * ready. Returns the number of requests still in flight. */
int kvblk_dev_poll(kvblk_dev *dev);

/* Runs the device's event loop until no request is in flight, or until
 * `timeout_ms` milliseconds have passed (checked whenever the loop wakes;
 * negative: no limit). Returns the number of requests still in flight. */
int kvblk_dev_run(kvblk_dev *dev, int timeout_ms);

/* 1 if the device needs a reset (DEVICE_NEEDS_RESET: a ring was broken; that
 * queue stopped, the others keep working), else 0. */
int kvblk_dev_needs_reset(const kvblk_dev *dev);

/* Device reset (the driver wrote 0 to the device status): waits for requests
 * in flight, then forgets features and queues. Guest memory is kept. */
int kvblk_dev_reset(kvblk_dev *dev);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* KVBLK_KVBLK_C_H_ */
