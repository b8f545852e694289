// Concurrency stress test of the qcow2 device (issue 3 acceptance).
//
// Several I/O threads (the device's home thread and KVBLK_STRESS_THREADS - 1
// more, each with its own EventLoop) keep 64 requests in flight each: reads,
// writes, discards, write zeroes (with and without may_unmap) and flushes of
// 512 B .. 64 KiB, on overlapping ranges of a qcow2 image with 4 KiB
// clusters, a backing file and an L2 cache of three tables, so that cache
// misses, evictions and same-cluster races happen all the time. Part of the
// traffic goes to a small hot region that straddles an L2 table boundary.
//
// The model. Every 512-byte sector a write puts down holds one 64-bit tag
// (write id and sector number) repeated across the sector, so a torn or
// misplaced sector is recognised. (A read that overlaps a write of a sector
// may see a mix of old and new bytes, since the host file makes neither a
// sector nor a word atomic against a concurrent write; every byte must then
// come from an allowed value, and only while a change overlapped the read.
// In the final image every sector must be whole.) Each operation takes a start and an end
// number from one global sequence (under a mutex). When a read completes,
// each sector it returned must hold one of:
//  - the data of a write (or the zeros of a write zeroes) to that sector
//    that started before the read ended and that was not superseded: no
//    other write or write zeroes of the sector started after it ended and
//    ended before the read started;
//  - zeros, for a discard of the sector under the same condition (a discard
//    may leave old data or zeros, so it supersedes nothing);
//  - the initial content (the backing file's pattern, or zeros past it) if
//    no write or write zeroes of the sector had ended before the read
//    started.
// At the end the image is flushed and closed; `qemu-img check` must find no
// errors and no leaks, and every sector of the image (read by qemu-img
// convert) must be one of the final candidates.
//
// Scale: KVBLK_STRESS_OPS (total operations of the io_uring run; the
// thread-pool run does a quarter), KVBLK_STRESS_THREADS (I/O threads, home
// included), KVBLK_STRESS_SEED. Interleavings depend on timing, so a seed
// does not replay a failure exactly; it is printed to tell runs apart.
#include <gtest/gtest.h>
#include <sys/uio.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "disk/io_engine.h"
#include "kvblk/block_device.h"
#include "kvblk/event_loop.h"
#include "kvblk/image_create.h"
#include "kvblk/task.h"
#include "tests/support/qemu_util.h"
#include "tests/support/test_util.h"

namespace kvblk {
namespace {

using testing::ExpectQemuCheckClean;
using testing::ReadFileBytes;
using testing::ShellQuote;
using testing::ShOk;
using testing::TempDir;
using testing::WriteFileBytes;

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;
constexpr uint64_t kSector = 512;
constexpr uint64_t kWords = kSector / 8;  // 64-bit words per sector
constexpr uint64_t kNever = std::numeric_limits<uint64_t>::max();
constexpr int kSectorBits = 24;  // low bits of a tag: the sector number
// The write id of the backing file's pattern.
constexpr uint64_t kBackingId = (uint64_t{1} << 39) - 1;

// The tag write `id` stamps on sector `sector`. Never 0 (ids start at 1).
uint64_t Tag(uint64_t id, uint64_t sector) { return (id << kSectorBits) | sector; }

std::string DescribeValue(uint64_t v) {
  if (v == 0) return "zeros";
  std::ostringstream s;
  const uint64_t id = v >> kSectorBits;
  s << "0x" << std::hex << v << std::dec << " (";
  if (id == kBackingId) {
    s << "backing pattern";
  } else {
    s << "write " << id;
  }
  s << " of sector " << (v & ((uint64_t{1} << kSectorBits) - 1)) << ")";
  return s.str();
}

uint64_t EnvOr(const char* name, uint64_t fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  return std::strtoull(v, nullptr, 10);
}

// Which writes may be seen by which reads (see the file comment). All
// methods are thread-safe.
class SectorModel {
 public:
  enum class Kind : uint8_t { kData, kZero, kDiscard };
  struct Ticket {
    uint64_t id = 0;
    uint64_t start = 0;
  };

  // `initial[s]` is the tag sector s holds before any write (0: zeros).
  explicit SectorModel(std::vector<uint64_t> initial)
      : initial_(std::move(initial)), sectors_(initial_.size()) {}

  // A write, write zeroes or discard of `count` sectors from `first` starts.
  Ticket BeginChange(Kind kind, uint64_t first, uint64_t count) {
    std::lock_guard<std::mutex> l(mu_);
    Ticket t{next_id_++, ++seq_};
    for (uint64_t s = first; s < first + count; ++s) {
      sectors_[s].events.push_back(Event{t.id, t.start, kNever, kind});
    }
    return t;
  }
  // ... and ends.
  void EndChange(const Ticket& t, uint64_t first, uint64_t count) {
    std::lock_guard<std::mutex> l(mu_);
    const uint64_t end = ++seq_;
    for (uint64_t s = first; s < first + count; ++s) {
      SectorState& st = sectors_[s];
      for (Event& e : st.events) {
        if (e.id != t.id) continue;
        e.end = end;
        if (e.kind != Kind::kDiscard) st.first_write_end = std::min(st.first_write_end, end);
      }
      Prune(&st);
    }
  }

  Ticket BeginRead() {
    std::lock_guard<std::mutex> l(mu_);
    Ticket t{next_id_++, ++seq_};
    reads_in_flight_.insert(t.start);
    return t;
  }
  // A read of `count` sectors from `first` ended with `data`. Returns "" if
  // every sector is allowed, else a description of the first one that is not.
  std::string EndRead(const Ticket& t, uint64_t first, uint64_t count, const uint8_t* data) {
    std::lock_guard<std::mutex> l(mu_);
    const uint64_t end = ++seq_;
    reads_in_flight_.erase(reads_in_flight_.find(t.start));
    std::string err;
    for (uint64_t i = 0; i < count && err.empty(); ++i) {
      err = CheckSector(first + i, data + i * kSector, t.start, end, true);
    }
    ++reads_checked_;
    for (uint64_t i = 0; i < count; ++i) Prune(&sectors_[first + i]);
    if (!err.empty()) {
      err = "read " + std::to_string(t.id) + " of sectors [" + std::to_string(first) + ", " +
            std::to_string(first + count) + ") seq " + std::to_string(t.start) + ".." +
            std::to_string(end) + ": " + err;
    }
    return err;
  }

  // "N reads checked; M sectors read held data of a write still in flight".
  std::string Stats() {
    std::lock_guard<std::mutex> l(mu_);
    return std::to_string(reads_checked_) + " reads checked; " + std::to_string(saw_in_flight_) +
           " sectors read held data of a write still in flight; " +
           std::to_string(saw_byte_mix_) + " words were a byte-wise mix of racing writes";
  }

  // With nothing in flight: checks a whole-disk image against the final
  // candidates; returns up to `max_errors` descriptions.
  std::vector<std::string> CheckFinal(const std::vector<uint8_t>& image, size_t max_errors) {
    std::lock_guard<std::mutex> l(mu_);
    const uint64_t now = ++seq_;
    std::vector<std::string> errs;
    for (uint64_t s = 0; s < sectors_.size() && errs.size() < max_errors; ++s) {
      std::string e = CheckSector(s, image.data() + s * kSector, now, now, false);
      if (!e.empty()) errs.push_back("final image: " + e);
    }
    return errs;
  }

 private:
  struct Event {
    uint64_t id;
    uint64_t start;
    uint64_t end;  // kNever while in flight
    Kind kind;
  };
  struct SectorState {
    std::vector<Event> events;
    uint64_t first_write_end = kNever;  // first write or write zeroes to end
  };

  // The largest start of a write or write zeroes of `st` that ended before
  // `before`; events that ended before it are superseded. 0 if none.
  static uint64_t SupersedingStart(const SectorState& st, uint64_t before) {
    uint64_t best = 0;
    for (const Event& w : st.events) {
      if (w.kind != Kind::kDiscard && w.end < before) best = std::max(best, w.start);
    }
    return best;
  }

  // Drops events that no read in flight or to come can see: superseded by
  // a write that ended before the oldest read in flight started.
  void Prune(SectorState* st) {
    if (st->events.size() < 8) return;
    const uint64_t horizon = reads_in_flight_.empty() ? seq_ : *reads_in_flight_.begin();
    const uint64_t cut = SupersedingStart(*st, horizon);
    std::erase_if(st->events, [&](const Event& e) { return e.end < cut; });
  }

  // Whether sector `s` may hold `v` for a read that started at `read_start`
  // and ended at `read_end`, and why.
  enum class Verdict : uint8_t { kNo, kInitial, kCompleted, kInFlight };
  Verdict Allowed(uint64_t s, uint64_t v, uint64_t read_start, uint64_t read_end) const {
    const SectorState& st = sectors_[s];
    if (v == initial_[s] && st.first_write_end > read_start) return Verdict::kInitial;
    const uint64_t cut = SupersedingStart(st, read_start);
    Verdict best = Verdict::kNo;
    for (const Event& e : st.events) {
      if (e.start > read_end || e.end < cut) continue;
      if ((e.kind == Kind::kData ? Tag(e.id, s) : 0) != v) continue;
      if (e.end > read_end) return Verdict::kInFlight;
      best = Verdict::kCompleted;
    }
    return best;
  }

  // Whether `v` is a byte-wise mix of values sector `s` may hold for the
  // read, at least one of them from a change that overlapped the read in
  // time. Scatter() cuts buffers at any byte, so a word can straddle two
  // iovec segments that the kernel copies at different moments: a read
  // racing a write may see a word half old, half new. Without a change in
  // flight during the read no mix is possible.
  bool ByteMixAllowed(uint64_t s, uint64_t v, uint64_t read_start, uint64_t read_end) {
    const SectorState& st = sectors_[s];
    std::vector<uint64_t> values;
    if (st.first_write_end > read_start) values.push_back(initial_[s]);
    const uint64_t cut = SupersedingStart(st, read_start);
    bool overlapped = false;
    for (const Event& e : st.events) {
      if (e.start > read_end || e.end < cut) continue;
      values.push_back(e.kind == Kind::kData ? Tag(e.id, s) : 0);
      if (e.end > read_start) overlapped = true;
    }
    if (!overlapped) return false;
    for (int b = 0; b < 8; ++b) {
      const uint64_t mask = uint64_t{0xff} << (8 * b);
      if (std::none_of(values.begin(), values.end(),
                       [&](uint64_t c) { return (c & mask) == (v & mask); })) {
        return false;
      }
    }
    ++saw_byte_mix_;
    return true;
  }

  // "" if the 512 bytes at `bytes` are allowed for sector `s`, else why not.
  // A sector whose words differ is torn: with `allow_mixed` (a read that may
  // have overlapped writes, which the host does not make atomic per sector,
  // nor per word) it passes if every word is allowed or a byte-wise mix
  // (ByteMixAllowed); otherwise it fails.
  std::string CheckSector(uint64_t s, const uint8_t* bytes, uint64_t read_start, uint64_t read_end,
                          bool allow_mixed) {
    uint64_t words[kWords];
    std::memcpy(words, bytes, kSector);
    uint64_t v = words[0];
    bool mixed_ok = false;  // v is not allowed whole, but as a byte-wise mix
    for (uint64_t w = 0; w < kWords; ++w) {
      if (w > 0 && words[w] == words[0]) continue;
      if (w > 0 && !allow_mixed) {
        return "sector " + std::to_string(s) + " is torn: word 0 is " + DescribeValue(words[0]) +
               ", word " + std::to_string(w) + " is " + DescribeValue(words[w]);
      }
      if (Allowed(s, words[w], read_start, read_end) != Verdict::kNo) continue;
      if (allow_mixed && ByteMixAllowed(s, words[w], read_start, read_end)) {
        if (w == 0) mixed_ok = true;
        continue;
      }
      v = words[w];
      mixed_ok = false;
      break;
    }
    if (mixed_ok) return "";
    const Verdict verdict = Allowed(s, v, read_start, read_end);
    if (verdict == Verdict::kInFlight) ++saw_in_flight_;
    if (verdict != Verdict::kNo) return "";
    const SectorState& st = sectors_[s];
    const uint64_t cut = SupersedingStart(st, read_start);
    // Not allowed: list the candidates.
    std::ostringstream m;
    m << "sector " << s << " (guest offset " << s * kSector << ") holds " << DescribeValue(v)
      << "; candidates:";
    if (st.first_write_end > read_start) m << " initial " << DescribeValue(initial_[s]) << ";";
    for (const Event& e : st.events) {
      if (e.start > read_end || e.end < cut) continue;
      m << " "
        << (e.kind == Kind::kData   ? "write"
            : e.kind == Kind::kZero ? "zeroes"
                                    : "discard")
        << " " << e.id << " seq " << e.start << ".."
        << (e.end == kNever ? std::string("in flight") : std::to_string(e.end)) << ";";
    }
    m << " (superseded: events that ended before seq " << cut << ")";
    return m.str();
  }

  std::mutex mu_;
  uint64_t reads_checked_ = 0;
  uint64_t saw_in_flight_ = 0;  // sectors read holding a write still in flight
  uint64_t saw_byte_mix_ = 0;   // words read that were a byte-wise mix
  uint64_t seq_ = 0;
  uint64_t next_id_ = 1;
  std::multiset<uint64_t> reads_in_flight_;
  const std::vector<uint64_t> initial_;
  std::vector<SectorState> sectors_;
};

struct StressConfig {
  uint64_t size = 16 * kMiB;
  uint32_t cluster_size = 4096;
  // The backing file's virtual size: not a multiple of the cluster size, so
  // one cluster is partly backed.
  uint64_t backing_size = 10 * kMiB + 6 * kSector;
  bool qcow2_backing = true;
  bool extended_l2 = false;  // subclusters: cluster_size must be >= 16 KiB
  bool thread_pool = false;  // engine of every loop: thread pool, else io_uring
  int threads = 4;           // I/O threads, the home thread included
  int depth = 64;            // requests in flight per thread
  uint64_t ops = 0;          // in total
  uint32_t seed = 1;
  uint64_t l2_cache_tables = 3;
  // A hot region of 8 clusters across the boundary of L2 tables 0 and 1.
  uint64_t hot_start = 2 * kMiB - 16 * kKiB;
  uint64_t hot_length = 32 * kKiB;
};

// The shared state of one run.
struct Run {
  const StressConfig* cfg;
  BlockDevice* dev;
  SectorModel* model;
  std::atomic<uint64_t> issued{0};
  std::atomic<bool> stop{false};
  std::mutex fail_mu;
  std::vector<std::string> failures;

  void Fail(std::string what) {
    std::lock_guard<std::mutex> l(fail_mu);
    if (failures.size() < 10) failures.push_back(std::move(what));
    stop = true;
  }
};

// One I/O thread's requests: `depth` lanes, each issuing one request at a
// time until the run's operation budget is spent. Lanes of a worker run on
// one thread and share its random generator.
class Worker {
 public:
  Worker(Run* run, uint32_t seed) : run_(run), rng_(seed) {}

  // Spawns the lanes on the calling thread's loop; lanes_done() reaches the
  // configured depth when they are all finished.
  void Start() {
    for (int i = 0; i < run_->cfg->depth; ++i) Spawn(Lane(), [this] { ++lanes_done_; });
  }
  int lanes_done() const { return lanes_done_; }

 private:
  enum class Op : uint8_t { kRead, kWrite, kDiscard, kZeroes, kZeroesUnmap, kFlush };

  Op RandomOp() {
    const int p = static_cast<int>(rng_() % 100);
    if (p < 42) return Op::kRead;
    if (p < 80) return Op::kWrite;
    if (p < 87) return Op::kDiscard;
    if (p < 93) return Op::kZeroes;
    if (p < 99) return Op::kZeroesUnmap;
    return Op::kFlush;
  }

  // A range in sectors: 512 B .. 64 KiB, within one cluster, cluster-aligned
  // whole clusters, or anywhere; 40% of them in the hot region.
  std::pair<uint64_t, uint64_t> RandomRange() {
    const StressConfig& c = *run_->cfg;
    const uint64_t cs = c.cluster_size / kSector;
    const bool hot = rng_() % 100 < 40;
    const uint64_t lo = hot ? c.hot_start / kSector : 0;
    const uint64_t hi = hot ? (c.hot_start + c.hot_length) / kSector : c.size / kSector;
    uint64_t first = lo + rng_() % (hi - lo);
    uint64_t count;
    switch (rng_() % 3) {
      case 0:  // inside one cluster
        count = 1 + rng_() % (cs - first % cs);
        break;
      case 1:  // whole clusters
        first -= first % cs;
        count = cs * (1 + rng_() % 4);
        break;
      default:
        count = 1 + rng_() % (64 * kKiB / kSector);
        break;
    }
    return {first, std::min(count, hi - first)};
  }

  // Splits `buf` into 1..3 iovecs at random byte positions.
  std::vector<iovec> Scatter(std::vector<uint8_t>& buf) {
    std::vector<iovec> iov;
    size_t pos = 0;
    const int pieces = 1 + static_cast<int>(rng_() % 3);
    for (int i = 0; i < pieces - 1 && pos + 1 < buf.size(); ++i) {
      size_t n = 1 + rng_() % (buf.size() - pos - 1);
      iov.push_back({buf.data() + pos, n});
      pos += n;
    }
    iov.push_back({buf.data() + pos, buf.size() - pos});
    return iov;
  }

  static std::string Where(const char* what, uint64_t first, uint64_t count) {
    return std::string(what) + " of " + std::to_string(count * kSector) + " bytes at " +
           std::to_string(first * kSector);
  }

  // co_await StartedRead(...): BlockDevice::StartRead as an awaitable. Its
  // `done` runs on this lane's thread, possibly inside StartRead.
  class StartedRead {
   public:
    StartedRead(BlockDevice* dev, uint64_t off, const iovec* iov, int iovcnt) : dev_(dev) {
      req_.offset = off;
      req_.iov = iov;
      req_.iovcnt = iovcnt;
      req_.user = this;
      req_.done = [](ReadRequest* req, Status st) {
        auto* self = static_cast<StartedRead*>(req->user);
        self->st_ = std::move(st);
        self->finished_ = true;
        if (self->suspended_) self->waiter_.resume();
      };
    }
    bool await_ready() const noexcept { return false; }
    bool await_suspend(std::coroutine_handle<> h) {
      waiter_ = h;
      dev_->StartRead(&req_);
      if (finished_) return false;  // done inside StartRead
      suspended_ = true;
      return true;
    }
    Status await_resume() { return std::move(st_); }

   private:
    BlockDevice* dev_;
    ReadRequest req_;
    Status st_;
    std::coroutine_handle<> waiter_;
    bool finished_ = false;
    bool suspended_ = false;
  };

  Task<void> Lane() {
    Run& r = *run_;
    while (!r.stop && r.issued.fetch_add(1) < r.cfg->ops) {
      const Op op = RandomOp();
      if (op == Op::kFlush) {
        Status st = co_await r.dev->Flush();
        if (!st.ok()) r.Fail("flush: " + st.ToString());
        continue;
      }
      auto [first, count] = RandomRange();
      const uint64_t off = first * kSector;
      const uint64_t len = count * kSector;
      if (op == Op::kRead) {
        std::vector<uint8_t> buf(len, 0xa5);
        std::vector<iovec> iov = Scatter(buf);
        SectorModel::Ticket t = r.model->BeginRead();
        // Half the reads use the callback form (and so qcow2's fast path).
        Status st = rng_() % 2 == 0
                        ? co_await r.dev->Read(off, iov.data(), static_cast<int>(iov.size()))
                        : co_await StartedRead(r.dev, off, iov.data(), static_cast<int>(iov.size()));
        if (!st.ok()) {
          r.Fail(Where("read", first, count) + ": " + st.ToString());
          continue;
        }
        std::string err = r.model->EndRead(t, first, count, buf.data());
        if (!err.empty()) r.Fail(err);
        continue;
      }
      SectorModel::Kind kind = op == Op::kWrite     ? SectorModel::Kind::kData
                               : op == Op::kDiscard ? SectorModel::Kind::kDiscard
                                                    : SectorModel::Kind::kZero;
      SectorModel::Ticket t = r.model->BeginChange(kind, first, count);
      Status st;
      if (op == Op::kWrite) {
        std::vector<uint8_t> buf(len);
        for (uint64_t i = 0; i < count; ++i) {
          const uint64_t tag = Tag(t.id, first + i);
          for (uint64_t w = 0; w < kWords; ++w) {
            std::memcpy(buf.data() + i * kSector + w * 8, &tag, 8);
          }
        }
        std::vector<iovec> iov = Scatter(buf);
        st = co_await r.dev->Write(off, iov.data(), static_cast<int>(iov.size()));
      } else if (op == Op::kDiscard) {
        st = co_await r.dev->Discard(off, len);
      } else {
        st = co_await r.dev->WriteZeroes(off, len, op == Op::kZeroesUnmap);
      }
      r.model->EndChange(t, first, count);
      if (!st.ok()) {
        const char* what = op == Op::kWrite     ? "write"
                           : op == Op::kDiscard ? "discard"
                           : op == Op::kZeroes  ? "write-zeroes"
                                                : "write-zeroes(unmap)";
        r.Fail(Where(what, first, count) + ": " + st.ToString());
      }
    }
  }

  Run* run_;
  std::mt19937_64 rng_;
  int lanes_done_ = 0;
};

std::unique_ptr<IoEngine> MakeEngine(bool thread_pool) {
  if (thread_pool) return MakeThreadPoolEngine(2);
  int err = 0;
  auto e = MakeUringEngine(256, &err);
  EXPECT_NE(e, nullptr) << "io_uring: errno " << err;
  return e;
}

// Creates the backing file and the image in `dir`; returns the initial tag
// of every sector.
std::vector<uint64_t> MakeImages(const StressConfig& c, const TempDir& dir,
                                 const std::string& img) {
  const uint64_t backed = c.backing_size / kSector;
  std::vector<uint8_t> base(c.backing_size);
  std::vector<uint64_t> initial(c.size / kSector, 0);
  for (uint64_t s = 0; s < backed; ++s) {
    initial[s] = Tag(kBackingId, s);
    for (uint64_t w = 0; w < kWords; ++w) std::memcpy(&base[s * kSector + w * 8], &initial[s], 8);
  }
  WriteFileBytes(dir.File("base.raw"), base);
  CreateOptions co;
  co.size = c.size;
  co.cluster_size = c.cluster_size;
  co.extended_l2 = c.extended_l2;
  if (c.qcow2_backing) {
    ShOk("qemu-img convert -f raw -O qcow2 -o cluster_size=65536 " +
         ShellQuote(dir.File("base.raw")) + " " + ShellQuote(dir.File("base.qcow2")));
    co.backing_file = "base.qcow2";
    co.backing_format = "qcow2";
  } else {
    co.backing_file = "base.raw";
    co.backing_format = "raw";
  }
  Status st = CreateImage(img, co);
  EXPECT_TRUE(st.ok()) << st.ToString();
  return initial;
}

void RunStress(const StressConfig& c) {
  std::cout << "[ stress   ] seed " << c.seed << ", " << c.ops << " operations, " << c.threads
            << " I/O threads x depth " << c.depth << ", "
            << (c.thread_pool ? "thread-pool" : "io_uring") << " engine" << std::endl;
  SCOPED_TRACE("stress seed " + std::to_string(c.seed));
  TempDir dir;
  const std::string img = dir.File("stress.qcow2");
  SectorModel model(MakeImages(c, dir, img));
  ASSERT_FALSE(::testing::Test::HasFailure());

  // The home loop: the test thread's, with the configured engine.
  std::unique_ptr<EventLoop> own_home;
  if (c.thread_pool) {
    own_home = std::make_unique<EventLoop>(MakeEngine(true));
    EventLoop::SetCurrent(own_home.get());
  }
  EventLoop& home = EventLoop::Current();
  OpenOptions oo;
  oo.format = "qcow2";
  oo.l2_cache_bytes = c.l2_cache_tables * c.cluster_size;
  auto opened = OpenImage(img, oo);
  ASSERT_TRUE(opened.ok()) << opened.status().ToString();
  std::unique_ptr<BlockDevice> dev = std::move(*opened);

  Run run;
  run.cfg = &c;
  run.dev = dev.get();
  run.model = &model;
  std::atomic<int> threads_done{0};
  std::vector<std::thread> threads;
  for (int t = 1; t < c.threads; ++t) {
    threads.emplace_back([&, t] {
      EventLoop loop(MakeEngine(c.thread_pool));
      EventLoop::SetCurrent(&loop);
      Worker w(&run, c.seed * 1000 + static_cast<uint32_t>(t));
      w.Start();
      loop.RunUntil([&] { return w.lanes_done() == c.depth; });
      EventLoop::SetCurrent(nullptr);
      ++threads_done;
      home.PostFunction([] {});  // wakes the home loop to see it
    });
  }
  Worker home_worker(&run, c.seed * 1000);
  home_worker.Start();
  home.RunUntil(
      [&] { return home_worker.lanes_done() == c.depth && threads_done == c.threads - 1; });
  for (auto& t : threads) t.join();
  for (const std::string& f : run.failures) ADD_FAILURE() << f;
  std::cout << "[ stress   ] " << model.Stats() << std::endl;

  Status st = RunSync(dev->Flush());
  EXPECT_TRUE(st.ok()) << st.ToString();
  st = CloseImage(std::move(dev));
  EXPECT_TRUE(st.ok()) << st.ToString();
  if (own_home) EventLoop::SetCurrent(nullptr);
  ASSERT_FALSE(::testing::Test::HasFailure());

  ExpectQemuCheckClean(img);
  const std::string raw = dir.File("final.raw");
  ShOk("qemu-img convert -O raw " + ShellQuote(img) + " " + ShellQuote(raw));
  std::vector<uint8_t> bytes = ReadFileBytes(raw);
  ASSERT_EQ(bytes.size(), c.size);
  for (const std::string& e : model.CheckFinal(bytes, 10)) ADD_FAILURE() << e;
}

StressConfig FromEnv(uint64_t default_ops) {
  StressConfig c;
  c.ops = EnvOr("KVBLK_STRESS_OPS", default_ops);
  c.threads = static_cast<int>(std::max<uint64_t>(1, EnvOr("KVBLK_STRESS_THREADS", 4)));
  c.seed = static_cast<uint32_t>(EnvOr("KVBLK_STRESS_SEED", 1));
  return c;
}

// A sector of 512 bytes whose words are all `v`, with word `w` set to `mixed`.
std::vector<uint8_t> SectorWith(uint64_t v, int w, uint64_t mixed) {
  std::vector<uint8_t> b(kSector);
  for (uint64_t i = 0; i < kWords; ++i) std::memcpy(&b[i * 8], i == uint64_t(w) ? &mixed : &v, 8);
  return b;
}

// The model's tolerance for torn words is narrow: a word mixing the bytes of
// zeros and a write is allowed only while that write overlapped the read,
// and a byte that no candidate holds is never allowed.
TEST(ConcurrencyStressModel, ByteMixAllowedOnlyWhileAWriteOverlapsTheRead) {
  using Kind = SectorModel::Kind;
  SectorModel model(std::vector<uint64_t>(4, 0));  // 4 sectors of zeros
  SectorModel::Ticket w = model.BeginChange(Kind::kData, 1, 1);
  const uint64_t tag = Tag(w.id, 1);
  const uint64_t mix = tag & ~uint64_t{0xffffff};  // low 3 bytes from zeros
  ASSERT_NE(mix, tag);

  SectorModel::Ticket r = model.BeginRead();
  EXPECT_EQ(model.EndRead(r, 1, 1, SectorWith(tag, 5, mix).data()), "");
  EXPECT_EQ(model.EndRead(model.BeginRead(), 1, 1, SectorWith(mix, 0, mix).data()), "");
  // A byte neither zero nor the write's: refused even while in flight.
  EXPECT_NE(model.EndRead(model.BeginRead(), 1, 1, SectorWith(tag, 5, mix | 0x77).data()), "");
  // Another sector: no write overlaps, so no mix.
  EXPECT_NE(model.EndRead(model.BeginRead(), 2, 1, SectorWith(0, 5, mix).data()), "");

  model.EndChange(w, 1, 1);
  // The write ended before this read began: whole values only.
  EXPECT_EQ(model.EndRead(model.BeginRead(), 1, 1, SectorWith(tag, 5, tag).data()), "");
  EXPECT_NE(model.EndRead(model.BeginRead(), 1, 1, SectorWith(tag, 5, mix).data()), "");
}

TEST(ConcurrencyStress, UringThreadsWithQcow2BackingMatchModel) {
  StressConfig c = FromEnv(80000);
  RunStress(c);
}

TEST(ConcurrencyStress, ThreadPoolThreadsWithRawBackingMatchModel) {
  StressConfig c = FromEnv(80000);
  c.ops /= 4;
  c.thread_pool = true;
  c.qcow2_backing = false;
  c.seed += 500;
  RunStress(c);
}

// Extended L2 entries with 512-byte subclusters (one per sector): partial
// writes allocate subclusters of clusters that in-place writers, readers,
// discards and zeroing use at the same time.
TEST(ConcurrencyStress, UringThreadsWithSubclustersMatchModel) {
  StressConfig c = FromEnv(80000);
  c.ops /= 8;
  c.extended_l2 = true;
  c.cluster_size = 16384;
  c.qcow2_backing = false;
  c.hot_start = 2 * kMiB - 4 * c.cluster_size;
  c.hot_length = 8 * c.cluster_size;
  c.seed += 900;
  RunStress(c);
}

}  // namespace
}  // namespace kvblk
