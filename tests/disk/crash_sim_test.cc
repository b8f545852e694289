// Crash simulation: power loss at sampled moments of qcow2 workloads.
//
// Each workload runs concurrent guest requests (allocating writes,
// overwrites, copy on write over a backing file, discards, write zeroes,
// compressed writes, flushes) against a Qcow2Device on a CrashFile. From the
// recorded history we build the image a power cut could leave at sampled
// moments (a subset of the unflushed host writes, some torn at 512-byte
// sectors) and check each one:
//  - `qemu-img check` finds no corruption (leaks are allowed);
//  - kvblk opens it read-write;
//  - every guest sector holds a value the guest may see: the data of the
//    writes that completed before a completed guest flush was issued (or of
//    a later write), and otherwise its old or its new contents (a discard
//    adds "zeros" to the choices);
//  - kvblk keeps working on it: new writes, a discard and a flush succeed,
//    read back, and `qemu-img check` still finds no corruption after close.
//
// Environment: KVBLK_CRASH_STATES (total states over all workloads, default
// 512), KVBLK_CRASH_SEED (a number, or "random"; default 1),
// KVBLK_CRASH_KEEP (directory for failing states, default
// The targeted orderings and recovery cases are in crash_recovery_test.cc;
// the sector model and qemu-img helpers in tests/support/crash_sim_util.h.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <map>
#include <ostream>
#include <random>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "disk/qcow2_device.h"
#include "kvblk/event_loop.h"
#include "kvblk/image_create.h"
#include "tests/support/crash_file.h"
#include "tests/support/crash_sim_util.h"
#include "tests/support/qemu_util.h"
#include "tests/support/test_util.h"

namespace kvblk::testing {
namespace {

// --- workloads -----------------------------------------------------------------

struct Workload {
  const char* name;
  uint32_t cluster_size;
  int refcount_bits;
  bool v3;
  bool lazy_refcounts;
  bool backing;
  uint64_t disk_size;
  uint64_t l2_cache_bytes;  // 0: default (whole disk)
  int batches;              // rounds of concurrent requests
  int max_batch;            // requests in flight per round
  uint64_t max_write_sectors;
  bool hot_spot;     // most requests in the first quarter of the disk
  bool compressed;   // include compressed writes
  bool grows_table;  // the run must grow the refcount table
  bool extended_l2 = false;  // subclusters (cluster size >= 16 KiB)
};

void PrintTo(const Workload& w, std::ostream* os) { *os << w.name; }

const Workload kWorkloads[] = {
    // name, cluster, refcount bits, v3, lazy refcounts, backing, disk size,
    // L2 cache bytes, rounds, max in flight, max write sectors, hot spot,
    // compressed writes, grows the refcount table[, extended L2 entries]
    {"Alloc4kRc16", 4096, 16, true, false, false, 4 << 20, 0, 40, 6, 24, true, true, false},
    {"CowBacking4kRc64", 4096, 64, true, false, true, 4 << 20, 8192, 40, 6, 24, true, false, false},
    {"Tiny512Rc1", 512, 1, true, false, false, 3 << 20, 2048, 50, 5, 48, false, true, false},
    {"RefcountGrowth512Rc64", 512, 64, true, false, false, 4 << 20, 0, 90, 6, 96, false, false,
     true},
    {"V2Backing512Rc16", 512, 16, false, false, true, 2 << 20, 0, 40, 5, 24, true, false, false},
    {"LazyRefcounts4kRc16", 4096, 16, true, true, true, 4 << 20, 0, 30, 6, 24, true, false, false},
    // Subclusters of 512 bytes (16 KiB clusters) and 2 KiB (64 KiB clusters).
    {"Subclusters16kRc16", 16384, 16, true, false, false, 4 << 20, 0, 40, 6, 24, true, true, false,
     true},
    {"SubclustersBacking64kRc16", 65536, 16, true, false, true, 4 << 20, 0, 40, 6, 24, true, false,
     false, true},
};

uint64_t EnvU64(const char* name, uint64_t def) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return def;
  return std::strtoull(v, nullptr, 0);
}

uint64_t BaseSeed() {
  static const uint64_t seed = [] {
    const char* v = std::getenv("KVBLK_CRASH_SEED");
    if (v != nullptr && std::string(v) == "random") {
      return static_cast<uint64_t>(std::random_device{}()) << 32 | std::random_device{}();
    }
    return EnvU64("KVBLK_CRASH_SEED", 1);
  }();
  return seed;
}

uint64_t g_states_checked = 0;

class CrashSimEnvironment : public ::testing::Environment {
 public:
  void TearDown() override {
    if (g_states_checked > 0) {
      std::printf("crash states checked: %llu (KVBLK_CRASH_SEED=%llu)\n",
                  static_cast<unsigned long long>(g_states_checked),
                  static_cast<unsigned long long>(BaseSeed()));
    }
  }
};
[[maybe_unused]] const bool kEnvRegistered =
    (::testing::AddGlobalTestEnvironment(new CrashSimEnvironment), true);

class CrashSim : public ::testing::TestWithParam<Workload> {
 protected:
  // A fresh image on a CrashFile, opened; run `run` of this workload.
  void StartRun(uint64_t run) {
    const Workload& w = GetParam();
    uint64_t name_hash = 1469598103934665603ull;  // FNV-1a: stable across builds
    for (const char* c = w.name; *c; ++c) name_hash = (name_hash ^ uint8_t(*c)) * 1099511628211ull;
    seed_ = (BaseSeed() * 0x9e3779b97f4a7c15ull + name_hash) ^ (run * 0xbf58476d1ce4e5b9ull);
    rng_.seed(seed_);
    run_ = run;
    if (dev_) {
      Status st = RunSync(dev_->Close());  // already closed by the workload
      (void)st;
    }
    dev_.reset();
    file_ = nullptr;
    ops_.clear();
    next_value_ = 2;
    sectors_ = w.disk_size / kSector;
    initial_ = w.backing ? kBackingValue : kZeroValue;
    image_ = dir_.File("img.qcow2");
    CreateOptions o;
    o.size = w.disk_size;
    o.cluster_size = w.cluster_size;
    o.refcount_bits = w.refcount_bits;
    o.compat_v3 = w.v3;
    o.lazy_refcounts = w.lazy_refcounts;
    o.extended_l2 = w.extended_l2;
    if (w.backing) {
      WriteFileBytes(dir_.File("backing.raw"), Pattern(kBackingValue, 0, sectors_));
      o.backing_file = "backing.raw";  // relative: state files sit next to it
      o.backing_format = "raw";
    }
    Status st = CreateImage(image_, o);
    ASSERT_TRUE(st.ok()) << st.ToString();
    auto file = std::make_unique<CrashFile>(image_, ReadFileBytes(image_), seed_);
    file_ = file.get();
    OpenOptions oo;
    oo.format = "qcow2";
    oo.l2_cache_bytes = w.l2_cache_bytes;
    oo.refcount_cache_bytes = 4ull * w.cluster_size;
    auto dev = RunSync(qcow2::Qcow2Device::Open(std::move(file), oo, 0));
    ASSERT_TRUE(dev.ok()) << dev.status().ToString();
    dev_ = std::move(*dev);
  }

  uint64_t Rand(uint64_t n) { return n == 0 ? 0 : rng_() % n; }

  // A random guest request (not yet issued).
  GuestOp MakeOp() {
    const Workload& w = GetParam();
    const uint64_t cs = w.cluster_size / kSector;  // sectors per cluster
    GuestOp op;
    uint64_t r = Rand(100);
    if (r < 50) {
      op.kind = GuestOp::Kind::kWrite;
    } else if (r < 60) {
      op.kind = GuestOp::Kind::kZeroes;
    } else if (r < 72) {
      op.kind = GuestOp::Kind::kDiscard;
    } else if (r < 87) {
      op.kind = GuestOp::Kind::kFlush;
      return op;
    } else {
      op.kind = w.compressed ? GuestOp::Kind::kCompressed : GuestOp::Kind::kWrite;
    }
    uint64_t span = w.hot_spot && Rand(10) < 7 ? sectors_ / 4 : sectors_;
    uint64_t first = Rand(span);
    uint64_t n = 1 + Rand(w.max_write_sectors);
    if (op.kind == GuestOp::Kind::kCompressed) {
      first = first / cs * cs;
      n = cs;
    } else if (op.kind != GuestOp::Kind::kWrite && Rand(10) < 7) {
      // Mostly whole clusters, so that discard and zeroing change mappings.
      first = first / cs * cs;
      n = cs * (1 + Rand(3));
    } else if (Rand(10) < 3) {
      first = first / cs * cs;
    }
    n = std::min(n, sectors_ - first);
    op.offset = first * kSector;
    op.length = n * kSector;
    if (op.kind == GuestOp::Kind::kWrite || op.kind == GuestOp::Kind::kCompressed) {
      op.value = next_value_++;
      op.data = Pattern(op.value, first, n);
    }
    op.may_unmap = Rand(2) == 0;
    return op;
  }

  Task<void> Issue(GuestOp* op) {
    op->issued = file_->Tick();
    switch (op->kind) {
      case GuestOp::Kind::kWrite:
        op->status = co_await dev_->Write(op->offset, op->data.data(), op->data.size());
        break;
      case GuestOp::Kind::kCompressed:
        op->status = co_await dev_->WriteCompressed(op->offset, op->data.data(), op->data.size());
        break;
      case GuestOp::Kind::kZeroes:
        op->status = co_await dev_->WriteZeroes(op->offset, op->length, op->may_unmap);
        break;
      case GuestOp::Kind::kDiscard:
        op->status = co_await dev_->Discard(op->offset, op->length);
        break;
      case GuestOp::Kind::kFlush:
        op->status = co_await dev_->Flush();
        break;
    }
    op->completed = file_->Tick();
  }

  // Runs the workload: rounds of concurrent requests, then Close (recorded
  // as a flush).
  void RunWorkload() {
    const Workload& w = GetParam();
    for (int b = 0; b < w.batches; ++b) {
      size_t first = ops_.size();
      int k = 1 + static_cast<int>(Rand(w.max_batch));
      for (int i = 0; i < k; ++i) ops_.push_back(MakeOp());
      for (size_t i = first; i < ops_.size(); ++i) Spawn(Issue(&ops_[i]));
      ASSERT_TRUE(DrainUntil(
          [&] {
            for (size_t i = first; i < ops_.size(); ++i) {
              if (ops_[i].completed == kNotYet) return false;
            }
            return true;
          },
          std::chrono::seconds(10)))
          << "requests of round " << b << " never completed (hang)";
      for (size_t i = first; i < ops_.size(); ++i) {
        const GuestOp& op = ops_[i];
        // A compressed write to an allocated cluster is refused by contract.
        if (op.kind == GuestOp::Kind::kCompressed &&
            op.status.code() == StatusCode::kInvalidArgument) {
          continue;
        }
        ASSERT_TRUE(op.status.ok()) << KindName(op.kind) << " at " << op.offset << "+" << op.length
                                    << ": " << op.status.ToString();
      }
    }
    GuestOp close;
    close.kind = GuestOp::Kind::kFlush;
    close.issued = file_->Tick();
    close.status = RunSync(dev_->Close());
    close.completed = file_->Tick();
    ASSERT_TRUE(close.status.ok()) << close.status.ToString();
    ops_.push_back(std::move(close));
  }

  // Saves a failing state (and the backing file) for the report.
  std::string Keep(const std::string& state_path, size_t index) {
    const char* env = std::getenv("KVBLK_CRASH_KEEP");
    std::string dir = std::string(env && *env ? env : "/tmp/kvblk-crash-failures") + "/" +
                      GetParam().name + "-seed" + std::to_string(BaseSeed()) + "-run" +
                      std::to_string(run_) + "-state" + std::to_string(index);
    Sh("mkdir -p " + ShellQuote(dir) + " && cp " + ShellQuote(state_path) + " " +
       ShellQuote(dir + "/img.qcow2") +
       (GetParam().backing ? " && cp " + ShellQuote(dir_.File("backing.raw")) + " " +
                                 ShellQuote(dir + "/backing.raw")
                           : ""));
    return dir;
  }

  // Opens a state with kvblk, checks every sector against the model, then
  // writes, discards, flushes and closes. Returns "" or what went wrong.
  std::string CheckWithKvblk(const std::string& path, uint64_t t) {
    const Workload& w = GetParam();
    OpenOptions oo;
    oo.format = "qcow2";
    auto d = OpenImage(path, oo);
    if (!d.ok()) return "kvblk cannot open the image: " + d.status().ToString();
    std::unique_ptr<BlockDevice> dev = std::move(*d);
    auto all = ReadWholeDevice(*dev, 65536);
    if (!all.ok()) return "reading the disk failed: " + all.status().ToString();
    Expectation want(ops_, t, sectors_, initial_);
    std::string bad;
    std::vector<uint64_t> bad_sectors;
    for (uint64_t s = 0; s < sectors_; ++s) {
      int64_t v = Identify(&(*all)[s * kSector], s);
      if (want.Allows(s, v)) continue;
      if (bad_sectors.size() < 8) {
        bad += "\n  guest sector " + std::to_string(s) + " (offset " + std::to_string(s * kSector) +
               ") holds " + (v < 0 ? std::string("garbage") : "value " + std::to_string(v)) +
               ", allowed " + want.Describe(s);
      }
      bad_sectors.push_back(s);
    }
    if (!bad_sectors.empty()) {
      return std::to_string(bad_sectors.size()) +
             " sectors hold data the guest may not see:" + bad +
             "\n  guest requests touching them (issued,completed clock):" +
             DescribeOps(t, bad_sectors);
    }
    // Keep using the recovered image: allocating writes and overwrites, a
    // discard, a flush; then close, reopen and read back. `after` is what
    // each sector must hold: a value, or -1 for "whatever it held".
    std::vector<int64_t> after(sectors_, -1);
    const uint64_t cs = w.cluster_size / kSector;
    for (uint32_t i = 0; i < 6; ++i) {
      uint64_t first = Rand(sectors_);
      if (i % 2 == 0) first = first / cs * cs;
      uint64_t n = std::min<uint64_t>(sectors_ - first, 1 + Rand(4 * cs));
      const uint32_t value = 1000000 + i;
      auto data = Pattern(value, first, n);
      Status st = RunSync(dev->Write(first * kSector, data.data(), data.size()));
      if (!st.ok()) return "write after recovery failed: " + st.ToString();
      std::fill(after.begin() + first, after.begin() + first + n, value);
    }
    const uint64_t dfirst = Rand(sectors_) / cs * cs;
    const uint64_t dn = std::min<uint64_t>(sectors_ - dfirst, 2 * cs);
    Status st = RunSync(dev->Discard(dfirst * kSector, dn * kSector));
    if (!st.ok()) return "discard after recovery failed: " + st.ToString();
    std::fill(after.begin() + dfirst, after.begin() + dfirst + dn, -1);
    st = RunSync(dev->Flush());
    if (!st.ok()) return "flush after recovery failed: " + st.ToString();
    st = CloseImage(std::move(dev));
    if (!st.ok()) return "close after recovery failed: " + st.ToString();
    OpenOptions ro = oo;
    ro.read_only = true;
    auto again = OpenImage(path, ro);
    if (!again.ok()) return "reopening after recovery failed: " + again.status().ToString();
    for (uint64_t s = 0; s < sectors_;) {  // runs of sectors written after recovery
      if (after[s] < 0) {
        ++s;
        continue;
      }
      uint64_t e = s;
      while (e < sectors_ && after[e] >= 0) ++e;
      auto got = ReadRange(**again, s * kSector, (e - s) * kSector);
      if (!got.ok()) return "reading after recovery failed: " + got.status().ToString();
      for (uint64_t i = s; i < e; ++i) {
        if (Identify(&(*got)[(i - s) * kSector], i) != after[i]) {
          return "data written and flushed after recovery reads back wrong at guest sector " +
                 std::to_string(i);
        }
      }
      s = e;
    }
    dev = std::move(*again);
    st = CloseImage(std::move(dev));
    if (!st.ok()) return "close after recovery failed: " + st.ToString();
    return "";
  }

  // The guest requests issued before `t` that touch any of `sectors`
  // (sorted), and the flushes.
  std::string DescribeOps(uint64_t t, const std::vector<uint64_t>& sectors) const {
    std::string s;
    for (const auto& op : ops_) {
      if (op.issued >= t) continue;
      if (op.kind != GuestOp::Kind::kFlush) {
        auto it = std::lower_bound(sectors.begin(), sectors.end(), op.offset / kSector);
        if (it == sectors.end() || *it >= (op.offset + op.length + kSector - 1) / kSector) {
          continue;
        }
      }
      s += std::string("\n    ") + KindName(op.kind);
      if (op.kind != GuestOp::Kind::kFlush) {
        s += " sectors " + std::to_string(op.offset / kSector) + "+" +
             std::to_string(op.length / kSector) + " value " + std::to_string(op.value);
      }
      s += " [" + std::to_string(op.issued) + "," +
           (op.completed == kNotYet ? std::string("-") : std::to_string(op.completed)) + "]" +
           (op.status.ok() ? "" : " failed");
    }
    return s;
  }

  struct Stats {
    uint64_t guest_ops = 0, host_writes = 0, header_writes = 0, host_flushes = 0;
    uint64_t checked = 0, failures = 0, leaky = 0, marked_dirty = 0, qemu_runs = 0;
    double qemu_secs = 0;
  };

  // Builds `states` distinct crash states from this run's history and checks
  // each one (see the top of the file).
  void CheckStates(uint64_t states, Stats* stats) {
    const Workload& w = GetParam();
    Stats& st = *stats;
    // `qemu-img check` after kvblk reused the image: every Nth state.
    const uint64_t recheck_every = std::max<uint64_t>(1, EnvU64("KVBLK_CRASH_RECHECK", 2));
    const uint64_t end = file_->Now() + 1;
    constexpr size_t kBatch = 12;
    uint64_t checked = 0;
    // A state is a (file contents, cut time) pair; equal contents are
    // checked by qemu-img once.
    std::set<std::pair<size_t, uint64_t>> seen;
    std::map<size_t, QemuCheck> qemu_cache;
    uint64_t next = 0;
    for (uint64_t attempts = 0; checked < states && st.failures < 3 && attempts < 20 * states;
         attempts += kBatch) {
      struct State {
        std::string path;
        uint64_t index;
        uint64_t t;
        size_t hash;
        std::string what;
        bool dirty;  // the header's dirty bit is set
      };
      std::vector<State> batch;
      std::vector<std::string> fresh;  // files qemu-img has not judged yet
      for (size_t tries = 0;
           batch.size() < std::min<uint64_t>(kBatch, states - checked) && tries < 4 * kBatch;
           ++tries) {
        // The first state: the end of the run, everything durable.
        uint64_t t = next == 0 && batch.empty() ? end : file_->SampleTime(rng_);
        auto point = file_->PointAt(t);
        auto fates = file_->SampleFates(point, rng_);
        auto bytes = file_->BuildState(point, fates);
        size_t h = std::hash<std::string_view>()(
            std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()));
        if (!seen.insert({h, t}).second) continue;
        // v3 only: a v2 header ends at byte 72.
        const bool dirty_bit = bytes.size() >= 80 && bytes[7] >= 3 && (bytes[79] & 1) != 0;
        State s{dir_.File("state-" + std::to_string(next) + ".qcow2"), next, t, h,
                file_->Describe(point, fates), dirty_bit};
        ++next;
        WriteFileBytes(s.path, bytes);
        if (!qemu_cache.count(h)) {
          qemu_cache[h] = QemuCheck();
          fresh.push_back(s.path);
        }
        batch.push_back(std::move(s));
      }
      if (batch.empty()) break;
      auto q0 = std::chrono::steady_clock::now();
      auto fresh_results = QemuCheckAll(fresh);
      st.qemu_runs += fresh.size();
      st.qemu_secs += std::chrono::duration<double>(std::chrono::steady_clock::now() - q0).count();
      for (size_t j = 0, f = 0; j < batch.size() && f < fresh.size(); ++j) {
        if (batch[j].path == fresh[f]) qemu_cache[batch[j].hash] = fresh_results[f++];
      }
      std::vector<std::string> errors(batch.size());
      std::vector<std::string> recheck;
      for (size_t j = 0; j < batch.size(); ++j) {
        const QemuCheck& before = qemu_cache[batch[j].hash];
        // A state marked dirty (lazy refcounts) may have refcounts behind
        // its tables by design; what must hold is that kvblk repairs it on
        // open, so qemu-img judges it after kvblk used it, always.
        const bool marked_dirty = batch[j].dirty;
        if (marked_dirty) ++st.marked_dirty;
        if (!before.ok() && !marked_dirty) {
          errors[j] = "qemu-img check of the crash state reports corruption (exit " +
                      std::to_string(before.exit_code) + "):\n" + before.output;
          Keep(batch[j].path, batch[j].index);
          continue;
        }
        if (before.leaks > 0) ++st.leaky;
        errors[j] = CheckWithKvblk(batch[j].path, batch[j].t);
        if (!errors[j].empty()) {
          Keep(batch[j].path, batch[j].index);
        } else if (batch[j].index % recheck_every == 0 || marked_dirty) {
          recheck.push_back(batch[j].path);
        }
      }
      q0 = std::chrono::steady_clock::now();
      auto after = QemuCheckAll(recheck);
      st.qemu_runs += recheck.size();
      st.qemu_secs += std::chrono::duration<double>(std::chrono::steady_clock::now() - q0).count();
      for (size_t j = 0, r = 0; j < batch.size(); ++j) {
        if (r < recheck.size() && batch[j].path == recheck[r]) {
          const QemuCheck& a = after[r++];
          if (!a.ok()) {
            errors[j] =
                "qemu-img check after kvblk wrote to the recovered image reports "
                "corruption (exit " +
                std::to_string(a.exit_code) + "):\n" + a.output;
          }
        }
        ++checked;
        if (!errors[j].empty()) {
          ++st.failures;
          ADD_FAILURE() << w.name << " run " << run_ << " state " << batch[j].index
                        << " (KVBLK_CRASH_SEED=" << BaseSeed() << ", " << batch[j].what
                        << "): " << errors[j];
        }
        std::remove(batch[j].path.c_str());
      }
    }
    st.checked += checked;
  }

  TempDir dir_;
  uint64_t seed_ = 0;
  uint64_t run_ = 0;
  std::mt19937_64 rng_;
  uint64_t sectors_ = 0;
  uint32_t initial_ = kZeroValue;
  uint32_t next_value_ = 2;
  std::string image_;
  CrashFile* file_ = nullptr;  // owned by dev_
  std::unique_ptr<qcow2::Qcow2Device> dev_;
  std::deque<GuestOp> ops_;
};

TEST_P(CrashSim, PowerLossLeavesConsistentImageWithFlushedData) {
  const Workload& w = GetParam();
  const auto start = std::chrono::steady_clock::now();
  const uint64_t total = EnvU64("KVBLK_CRASH_STATES", 512);
  const uint64_t n_workloads = sizeof(kWorkloads) / sizeof(kWorkloads[0]);
  const uint64_t states = (total + n_workloads - 1) / n_workloads;
  // Long runs sample several workload runs (other requests, other
  // interleavings) rather than ever more cuts of one history.
  constexpr uint64_t kStatesPerRun = 250;
  const uint64_t runs = (states + kStatesPerRun - 1) / kStatesPerRun;
  Stats stats;
  for (uint64_t run = 0; run < runs && stats.failures < 3; ++run) {
    ASSERT_NO_FATAL_FAILURE(StartRun(run));
    ASSERT_NO_FATAL_FAILURE(RunWorkload());
    uint64_t header_writes = 0;
    for (const auto& op : file_->history()) {
      if (op.kind == CrashFile::Op::Kind::kFlush) {
        ++stats.host_flushes;
      } else {
        ++stats.host_writes;
        if (op.offset < w.cluster_size) ++header_writes;
      }
    }
    stats.header_writes += header_writes;
    stats.guest_ops += ops_.size();
    if (w.grows_table) {
      // The header changes only when the refcount table moves.
      EXPECT_GT(header_writes, 0u) << "the workload no longer grows the refcount table";
    }
    const uint64_t first = run * states / runs, last = (run + 1) * states / runs;
    CheckStates(last - first, &stats);
  }
  g_states_checked += stats.checked;
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf(
      "[ %s ] KVBLK_CRASH_SEED=%llu, %llu run(s): %llu guest requests, %llu host writes "
      "(%llu to the header), %llu host flushes; crash states checked: %llu (%llu with "
      "leaks, %llu marked dirty, repaired on open) in %.1f s (%llu qemu-img runs, %.1f s)\n",
      w.name, static_cast<unsigned long long>(BaseSeed()), static_cast<unsigned long long>(runs),
      static_cast<unsigned long long>(stats.guest_ops),
      static_cast<unsigned long long>(stats.host_writes),
      static_cast<unsigned long long>(stats.header_writes),
      static_cast<unsigned long long>(stats.host_flushes),
      static_cast<unsigned long long>(stats.checked), static_cast<unsigned long long>(stats.leaky),
      static_cast<unsigned long long>(stats.marked_dirty), secs,
      static_cast<unsigned long long>(stats.qemu_runs), stats.qemu_secs);
}

INSTANTIATE_TEST_SUITE_P(Workloads, CrashSim, ::testing::ValuesIn(kWorkloads),
                         [](const ::testing::TestParamInfo<Workload>& info) {
                           return std::string(info.param.name);
                         });

}  // namespace
}  // namespace kvblk::testing
