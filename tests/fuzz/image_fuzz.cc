// libFuzzer target: a mutated qcow2 image is opened through the qcow2 layer
// (on an in-memory file), a short sequence of requests driven by the input
// runs on it, the device is closed, and the result is checked (and
// sometimes repaired) by the offline checker.
//
// Input layout (FuzzedDataProvider: integers are taken from the end, the
// image is what remains at the front, so a seed is a qemu-img image with a
// request script appended; see make_seeds.sh):
//   end-1:  flags (bit 0: open read-only; bits 1-2: check mode after close:
//           none / check / repair leaks / repair all)
//   end-2:  number of requests (at most kMaxRequests)
//   then per request: kind, offset (32 bits, scaled to the disk), length
//   (16 bits, in sectors), a data byte, and whether to wait for the
//   requests started so far before this one (otherwise it runs
//   concurrently with them).
//
// The image file is capped at kMaxFileBytes: writes beyond fail with
// ENOSPC, so a hostile image cannot make the target itself use unbounded
// memory; anything kvblk allocates on its own is bounded by its caps
// (libFuzzer's -rss_limit_mb reports a breach).
#include <fuzzer/FuzzedDataProvider.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "disk/mem_file.h"
#include "disk/qcow2_check.h"
#include "disk/qcow2_device.h"
#include "kvblk/block_device.h"
#include "kvblk/event_loop.h"
#include "tests/fuzz/fuzz_util.h"

namespace kvblk {
namespace {

constexpr uint64_t kMaxFileBytes = 64ull << 20;
constexpr int kMaxRequests = 24;
constexpr uint32_t kMaxRequestSectors = 512;  // 256 KiB
constexpr uint64_t kSector = 512;

enum class Kind : uint8_t {
  kRead,
  kWrite,
  kDiscard,
  kWriteZeroes,
  kWriteZeroesUnmap,
  kFlush,
  kBlockStatus,
  kWriteCompressed,
  kCount,
};

struct Request {
  Kind kind;
  uint64_t offset;
  uint64_t length;
  uint8_t fill;
  bool barrier;
};

// Runs one request on `dev`; `buf` stays alive until the group has waited.
Task<void> Run(BlockDevice& dev, Request r, std::shared_ptr<std::vector<uint8_t>> buf) {
  switch (r.kind) {
    case Kind::kRead:
      (void)co_await dev.Read(r.offset, buf->data(), buf->size());
      break;
    case Kind::kWrite:
      (void)co_await dev.Write(r.offset, buf->data(), buf->size());
      break;
    case Kind::kDiscard:
      (void)co_await dev.Discard(r.offset, r.length);
      break;
    case Kind::kWriteZeroes:
    case Kind::kWriteZeroesUnmap:
      (void)co_await dev.WriteZeroes(r.offset, r.length, r.kind == Kind::kWriteZeroesUnmap);
      break;
    case Kind::kFlush:
      (void)co_await dev.Flush();
      break;
    case Kind::kBlockStatus:
      (void)co_await dev.GetBlockStatus(r.offset, r.length);
      break;
    case Kind::kWriteCompressed:
      (void)co_await dev.WriteCompressed(r.offset, buf->data(), buf->size());
      break;
    case Kind::kCount:
      break;
  }
}

void FuzzOne(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  const uint8_t flags = in.ConsumeIntegral<uint8_t>();
  const int count = in.ConsumeIntegralInRange<int>(0, kMaxRequests);
  std::vector<Request> requests;
  for (int i = 0; i < count; ++i) {
    Request r;
    r.kind = static_cast<Kind>(in.ConsumeIntegral<uint8_t>() % static_cast<int>(Kind::kCount));
    r.offset = in.ConsumeIntegral<uint32_t>();
    r.length = (in.ConsumeIntegral<uint16_t>() % kMaxRequestSectors + 1) * kSector;
    r.fill = in.ConsumeIntegral<uint8_t>();
    r.barrier = in.ConsumeBool();
    requests.push_back(r);
  }
  std::vector<uint8_t> image = in.ConsumeRemainingBytes<uint8_t>();
  if (image.size() > kMaxFileBytes) return;
  auto file_data = std::make_shared<MemFileData>();
  file_data->bytes = std::move(image);
  const bool read_only = flags & 1;
  // The name is not a file: a dirty image opened writable fails to be
  // repaired with NotFound instead of touching the host.
  auto file = std::make_unique<MemFile>(file_data, "/nonexistent/kvblk-fuzz.qcow2", read_only);
  file->SetHook([](const MemFileEvent& ev) {
    const bool grows =
        ev.kind == MemFileEvent::Kind::kWrite || ev.kind == MemFileEvent::Kind::kWriteZeroes;
    if (grows && (ev.offset > kMaxFileBytes || ev.length > kMaxFileBytes - ev.offset)) {
      return ENOSPC;
    }
    return 0;
  });
  OpenOptions opts;
  opts.format = "qcow2";
  opts.read_only = read_only;
  opts.open_backing = false;
  opts.l2_cache_bytes = 1 << 20;
  auto dev = RunSync(qcow2::Qcow2Device::Open(std::move(file), opts, 0));
  if (dev.ok()) {
    BlockDevice& d = **dev;
    const uint64_t disk = d.size();
    const uint64_t cluster = d.capabilities().optimal_io_size;
    fuzz::TaskGroup group;
    std::vector<std::shared_ptr<std::vector<uint8_t>>> buffers;
    for (Request r : requests) {
      if (disk == 0) break;
      // Mostly in range; sometimes just past the end, which must fail cleanly.
      r.offset = (r.offset * kSector) % (disk + kSector) & ~(kSector - 1);
      if (r.kind == Kind::kWriteCompressed && cluster != 0) {
        r.offset -= r.offset % cluster;
        r.length = r.offset < disk ? std::min<uint64_t>(cluster, disk - r.offset) : cluster;
      }
      if (r.barrier) group.Wait();
      auto buf = std::make_shared<std::vector<uint8_t>>(r.length, r.fill);
      buffers.push_back(buf);
      group.Start(Run(d, r, buf));
    }
    group.Wait();
    (void)RunSync(d.Close());
    dev->reset();
  }

  const int check = (flags >> 1) & 3;
  if (check != 0) {
    std::vector<uint8_t> bytes;
    {
      std::lock_guard<std::mutex> l(file_data->mu);
      bytes = file_data->bytes;
    }
    fuzz::MemfdFile memfd(bytes);
    if (!memfd.ok()) return;
    qcow2::CheckOptions co;
    co.repair = check == 1   ? qcow2::RepairMode::kNone
                : check == 2 ? qcow2::RepairMode::kLeaks
                             : qcow2::RepairMode::kAll;
    (void)qcow2::CheckImage(memfd.path(), co);
  }
}

}  // namespace
}  // namespace kvblk

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  kvblk::FuzzOne(data, size);
  return 0;
}
