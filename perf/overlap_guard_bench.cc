// Measures OverlapGuard (disk/overlap_guard.h): memory for realistic
// layouts of large images and the cost of Check(), side by side with two
// guards that need no bitmaps (a linear scan over every metadata extent, and
// a binary search over the extents sorted by offset), in one run.
//
// Not a test: it asserts nothing about speed. It prints Markdown on stdout
// (perf/overlap_guard_bench.sh writes it to perf/results/overlap_guard.md)
// and exits 1 only if the guard and the linear scan disagree on a check.
//
// The layouts are those kvblk creates and then fills: header in cluster 0,
// refcount table, first refcount block, L1 table; then, as a guest writes the
// whole disk front to back, each L2 table is allocated just before the data
// clusters it maps (one L2 table every 512 MiB of host file with 64 KiB
// clusters), and a refcount block is placed in the first cluster of every
// range of clusters that no block covers yet (Refcounts::EnsureBlock).
// Snapshots: each copies the L1 table (an inactive L1), makes every active L2
// table an inactive one as well (shared), rewrites the snapshot table, and
// the guest then rewrites 10% of the disk (those L2 tables are copied).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "disk/overlap_guard.h"

namespace kvblk::qcow2 {
namespace {

constexpr uint64_t kTiB = uint64_t{1} << 40;

struct Extent {
  uint64_t start;  // bytes
  uint64_t end;    // exclusive
  MetadataKind kind;
};

// The naive guards: every extent, Add/Remove applied literally.
class ExtentList {
 public:
  void Add(uint64_t off, uint64_t bytes, MetadataKind k) { v_.push_back({off, off + bytes, k}); }
  void Remove(uint64_t off, uint64_t bytes, MetadataKind k) {
    for (size_t i = v_.size(); i-- > 0;) {
      if (v_[i].start == off && v_[i].end == off + bytes && v_[i].kind == k) {
        v_.erase(v_.begin() + i);
        return;
      }
    }
    std::fprintf(stderr, "bench bug: remove of a missing extent\n");
    std::exit(2);
  }
  // Sorts for the binary search (after the layout is built).
  void Freeze() {
    std::sort(v_.begin(), v_.end(),
              [](const Extent& a, const Extent& b) { return a.start < b.start; });
    max_len_ = 0;
    for (const Extent& e : v_) max_len_ = std::max(max_len_, e.end - e.start);
  }
  // Linear scan: the lowest offset any non-ignored extent shares with the
  // write (a hit's offset rounded down to its cluster), or nullopt.
  std::optional<uint64_t> Linear(uint64_t off, uint64_t bytes, MetadataMask ignore) const {
    std::optional<uint64_t> best;
    for (const Extent& e : v_) {
      if (ignore & KindBit(e.kind)) continue;
      if (e.start < off + bytes && off < e.end) {
        uint64_t at = std::max(e.start, off);
        if (!best || at < *best) best = at;
      }
    }
    return best;
  }
  // Binary search over the sorted extents, scanning back at most the
  // longest extent's length.
  bool Sorted(uint64_t off, uint64_t bytes, MetadataMask ignore) const {
    auto it = std::lower_bound(v_.begin(), v_.end(), off + bytes,
                               [](const Extent& e, uint64_t x) { return e.start < x; });
    while (it != v_.begin()) {
      --it;
      if (it->start + max_len_ <= off) break;
      if (it->end > off && !(ignore & KindBit(it->kind))) return true;
    }
    return false;
  }
  size_t size() const { return v_.size(); }
  size_t bytes() const { return v_.capacity() * sizeof(Extent); }

 private:
  std::vector<Extent> v_;
  uint64_t max_len_ = 0;
};

// Builds the layout into both guards.
class Layout {
 public:
  Layout(uint32_t cluster_bits, uint64_t virtual_size, OverlapGuard* g, ExtentList* n)
      : bits_(cluster_bits), cs_(uint64_t{1} << cluster_bits), g_(g), n_(n) {
    l2_entries_ = cs_ / 8;
    per_block_ = cs_ * 8 / 16;  // 16-bit refcounts
    guest_clusters_ = virtual_size / cs_;
    l1_entries_ = (guest_clusters_ + l2_entries_ - 1) / l2_entries_;
  }

  void Build(int snapshots, uint64_t seed) {
    // Header, refcount table (sized for twice the disk: room to grow),
    // first refcount block, L1 table.
    Put(0, 1, MetadataKind::kHeader);
    uint64_t est = 2 * guest_clusters_ + 1024;
    uint64_t rt_clusters = Clusters((est + per_block_ - 1) / per_block_ * 8);
    blocks_.assign((est + per_block_ - 1) / per_block_ * 4, false);
    cursor_ = 1;
    Put(cursor_, rt_clusters, MetadataKind::kRefcountTable);
    cursor_ += rt_clusters;
    EnsureBlock();
    l1_clusters_ = Clusters(l1_entries_ * 8);
    uint64_t l1 = AllocMeta(l1_clusters_);
    Put(l1, l1_clusters_, MetadataKind::kActiveL1);
    // The guest fills the disk front to back.
    active_l2_.resize(l1_entries_);
    for (uint64_t i = 0; i < l1_entries_; ++i) {
      active_l2_[i] = AllocMeta(1);
      Put(active_l2_[i], 1, MetadataKind::kActiveL2);
      AllocData(std::min(l2_entries_, guest_clusters_ - i * l2_entries_));
    }
    std::mt19937_64 rng(seed);
    uint64_t snap_table = 0;
    for (int s = 0; s < snapshots; ++s) {
      uint64_t copy = AllocMeta(l1_clusters_);
      Put(copy, l1_clusters_, MetadataKind::kInactiveL1);
      for (uint64_t t : active_l2_) Put(t, 1, MetadataKind::kInactiveL2);
      uint64_t table = AllocMeta(1);
      Put(table, 1, MetadataKind::kSnapshotTable);
      if (snap_table) Drop(snap_table, 1, MetadataKind::kSnapshotTable);
      snap_table = table;
      // The guest rewrites 10% of the disk: those L2 tables are copied.
      for (uint64_t k = 0; k < (l1_entries_ + 9) / 10; ++k) {
        uint64_t i = rng() % l1_entries_;
        uint64_t fresh = AllocMeta(1);
        Put(fresh, 1, MetadataKind::kActiveL2);
        Drop(active_l2_[i], 1, MetadataKind::kActiveL2);
        active_l2_[i] = fresh;
        AllocData(std::min(l2_entries_, guest_clusters_ - i * l2_entries_));
      }
    }
  }

  uint64_t host_bytes() const { return cursor_ * cs_; }
  uint64_t l1_entries() const { return l1_entries_; }
  const std::vector<uint64_t>& active_l2() const { return active_l2_; }
  uint64_t extents() const { return extents_; }

 private:
  uint64_t Clusters(uint64_t bytes) const { return (bytes + cs_ - 1) / cs_; }
  void Put(uint64_t cluster, uint64_t n, MetadataKind k) {
    Status st = g_->Add(cluster * cs_, n * cs_, k);
    if (!st.ok()) {
      std::fprintf(stderr, "Add: %s\n", st.ToString().c_str());
      std::exit(2);
    }
    n_->Add(cluster * cs_, n * cs_, k);
    ++extents_;
  }
  void Drop(uint64_t cluster, uint64_t n, MetadataKind k) {
    Status st = g_->Remove(cluster * cs_, n * cs_, k);
    if (!st.ok()) {
      std::fprintf(stderr, "Remove: %s\n", st.ToString().c_str());
      std::exit(2);
    }
    n_->Remove(cluster * cs_, n * cs_, k);
  }
  // A refcount block for the cluster at the cursor, placed there if none.
  void EnsureBlock() {
    uint64_t idx = cursor_ / per_block_;
    if (idx >= blocks_.size()) blocks_.resize(idx + 1, false);
    if (blocks_[idx]) return;
    blocks_[idx] = true;
    Put(cursor_, 1, MetadataKind::kRefcountBlock);
    ++cursor_;
  }
  uint64_t AllocMeta(uint64_t n) {
    EnsureBlock();
    while ((cursor_ + n - 1) / per_block_ != cursor_ / per_block_) {
      // Would cross into a range without a block: take the block first.
      uint64_t next = (cursor_ / per_block_ + 1) * per_block_;
      AllocData(next - cursor_);
      EnsureBlock();
    }
    uint64_t at = cursor_;
    cursor_ += n;
    return at;
  }
  void AllocData(uint64_t n) {
    while (n > 0) {
      EnsureBlock();
      uint64_t boundary = (cursor_ / per_block_ + 1) * per_block_;
      uint64_t take = std::min(n, boundary - cursor_);
      cursor_ += take;
      n -= take;
    }
  }

  uint32_t bits_;
  uint64_t cs_;
  OverlapGuard* g_;
  ExtentList* n_;
  uint64_t l2_entries_, per_block_, guest_clusters_, l1_entries_, l1_clusters_ = 0;
  uint64_t cursor_ = 0;
  uint64_t extents_ = 0;
  std::vector<bool> blocks_;
  std::vector<uint64_t> active_l2_;
};

double NowNs() {
  return std::chrono::duration<double, std::nano>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// 4 KiB-aligned random write offsets in [lo, hi).
std::vector<uint64_t> Offsets(uint64_t lo, uint64_t hi, size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<uint64_t> v(n);
  for (auto& o : v) o = lo + ((rng() % (hi - lo)) & ~uint64_t{4095});
  return v;
}

struct Timing {
  double ns_per_check;
  uint64_t hits;
};

// Keeps the checks' results alive (a pure check whose result is unused
// would be optimized away).
std::atomic<uint64_t> g_sink = 0;

template <typename F>
Timing Time(const std::vector<uint64_t>& offs, size_t iters, F check) {
  uint64_t hits = 0;
  double t0 = NowNs();
  for (size_t i = 0; i < iters; ++i) hits += check(offs[i % offs.size()]);
  double t1 = NowNs();
  g_sink.fetch_add(hits, std::memory_order_relaxed);
  return {(t1 - t0) / static_cast<double>(iters), hits};
}

// The best of three runs (the machine is shared: the minimum is the least
// disturbed).
template <typename F>
Timing Best(const std::vector<uint64_t>& offs, size_t iters, F check) {
  Timing best = Time(offs, iters, check);
  for (int i = 0; i < 2; ++i) {
    Timing t = Time(offs, iters, check);
    if (t.ns_per_check < best.ns_per_check) best = t;
  }
  return best;
}

std::string KiB(size_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.1f KiB", static_cast<double>(bytes) / 1024.0);
  return buf;
}

int failures = 0;

// Cross-checks the guard against the linear scan on `offs`.
void Verify(const OverlapGuard& g, const ExtentList& n, const std::vector<uint64_t>& offs,
            uint64_t len, MetadataMask ignore) {
  // At most 20,000 offsets, fewer when the linear scan is long.
  size_t samples = std::min<size_t>({offs.size(), 20000, 400'000'000 / (n.size() + 1) + 100});
  for (size_t i = 0; i < samples; ++i) {
    auto a = g.Check(offs[i], len, ignore);
    auto b = n.Linear(offs[i], len, ignore);
    uint64_t cs = uint64_t{1} << g.cluster_bits();
    bool same = a.has_value() == b.has_value() && (!a || a->host_offset == (*b & ~(cs - 1)));
    if (!same || n.Sorted(offs[i], len, ignore) != b.has_value()) {
      std::fprintf(stderr, "disagreement at 0x%" PRIx64 "\n", offs[i]);
      ++failures;
      return;
    }
  }
}

struct Scenario {
  const char* name;
  uint32_t cluster_bits;
  int snapshots;
};

void MemoryTable(const std::vector<Scenario>& scenarios) {
  std::printf("## Memory\n\n");
  std::printf(
      "1 TiB virtual disk, fully allocated as described above. \"ranges\" is the guard's "
      "range list after merging; \"guard, no bitmaps\" is MemoryBytes() right after building "
      "(ranges + window index + object), \"guard, cache full\" after every cache slot holds a "
      "bitmap. Default options: 2^14-cluster windows (2 KiB bitmaps), 16 cached.\n\n");
  std::printf(
      "| layout | host file | extents added | ranges | windows | guard, no bitmaps | guard, "
      "cache full | naive extent list |\n|---|---|---|---|---|---|---|---|\n");
  for (const Scenario& s : scenarios) {
    OverlapGuard g(s.cluster_bits);
    ExtentList n;
    Layout lay(s.cluster_bits, kTiB, &g, &n);
    lay.Build(s.snapshots, 42);
    size_t before = g.MemoryBytes();
    auto offs = Offsets(0, lay.host_bytes(), 4096, 1);
    for (uint64_t o : offs) (void)g.Check(o, 4096);
    OverlapGuard::Stats st = g.GetStats();
    std::printf("| %s | %.2f TiB | %" PRIu64 " | %zu | %zu | %s | %s | %s |\n", s.name,
                static_cast<double>(lay.host_bytes()) / static_cast<double>(kTiB), lay.extents(),
                st.ranges, st.windows, KiB(before).c_str(), KiB(g.MemoryBytes()).c_str(),
                KiB(n.bytes()).c_str());
  }
  std::printf("\n");
}

void OptionsTable(uint32_t bits, int snapshots) {
  std::printf("### Options: %u KiB clusters, 1 TiB, %d snapshots; random 4 KiB writes\n\n",
              (1u << bits) / 1024, snapshots);
  std::printf(
      "\"direct below\" is bitmap_min_ranges: windows with fewer ranges are compared with "
      "their ranges and get no bitmap (0: every window through a bitmap, as issue 6 "
      "describes). Second-check admission: a dense window's bitmap is built on its second "
      "recent check only. Defaults: window 2^14, 16 cached, direct below 16, admission on. "
      "The miss rate counts bitmap lookups only.\n\n");
  std::printf(
      "| window (clusters) | bitmap | cached | direct below | second-check admission | guard, "
      "cache full | whole file (ns) | bitmap miss rate | 8-window working set (ns) |\n"
      "|---|---|---|---|---|---|---|---|---|\n");
  struct Opt {
    uint32_t wb;
    size_t cache;
    size_t direct;
    bool admit;
  };
  for (Opt o :
       {Opt{12, 16, 0, false}, Opt{14, 16, 0, false}, Opt{14, 64, 0, false}, Opt{15, 16, 0, false},
        Opt{14, 16, 0, true}, Opt{14, 16, 16, false}, Opt{14, 16, 16, true}, Opt{15, 16, 16, true},
        Opt{14, 64, 16, true}, Opt{14, 16, 1u << 15, false}}) {
    OverlapGuard::Options opts;
    opts.window_bits = o.wb;
    opts.cache_windows = o.cache;
    opts.bitmap_min_ranges = o.direct;
    opts.admit_on_second_check = o.admit;
    OverlapGuard g(bits, opts);
    ExtentList n;
    Layout lay(bits, kTiB, &g, &n);
    lay.Build(snapshots, 42);
    const uint64_t window_bytes = g.window_clusters() << bits;
    uint64_t mid = lay.host_bytes() / 2 / window_bytes * window_bytes;
    auto warm = Offsets(mid, mid + 8 * window_bytes, 1 << 20, 3);
    auto offs = Offsets(0, lay.host_bytes(), 1 << 20, 7);
    auto check = [&](uint64_t off) { return g.Check(off, 4096).has_value(); };
    (void)Time(offs, offs.size(), check);
    OverlapGuard::Stats s0 = g.GetStats();
    Timing t = Best(offs, 2'000'000, check);
    OverlapGuard::Stats s1 = g.GetStats();
    uint64_t m = s1.bitmap_misses - s0.bitmap_misses;
    uint64_t h = s1.bitmap_hits - s0.bitmap_hits;
    (void)Time(warm, warm.size(), check);
    Timing tw = Best(warm, 2'000'000, check);
    std::printf(
        "| 2^%u | %u B | %zu | %zu | %s | %s | %.1f | %s | %.1f |\n", o.wb, (1u << o.wb) / 8,
        o.cache, o.direct, o.admit ? "yes" : "no", KiB(g.MemoryBytes()).c_str(), t.ns_per_check,
        m + h ? (std::to_string(100 * m / (m + h)) + "%").c_str() : "no bitmaps", tw.ns_per_check);
  }
  std::printf("\n");
}

void CheckCost(const Scenario& s) {
  OverlapGuard g(s.cluster_bits);
  ExtentList n;
  Layout lay(s.cluster_bits, kTiB, &g, &n);
  double t0 = NowNs();
  lay.Build(s.snapshots, 42);
  double build_ms = (NowNs() - t0) / 1e6;  // includes the naive list's upkeep
  n.Freeze();
  const uint64_t window_bytes = g.window_clusters() << s.cluster_bits;
  // Warm: a working set of 8 windows in the middle of the file (< 16 cached).
  uint64_t mid = lay.host_bytes() / 2 / window_bytes * window_bytes;
  auto warm = Offsets(mid, mid + 8 * window_bytes, 1 << 20, 3);
  auto cold = Offsets(0, lay.host_bytes(), 1 << 20, 4);
  // L2 table writes: the table itself, ignoring L2 kinds (must pass) and
  // not ignoring them (must hit).
  std::vector<uint64_t> l2s;
  for (uint64_t c : lay.active_l2()) l2s.push_back(c << s.cluster_bits);
  const uint64_t cs = uint64_t{1} << s.cluster_bits;
  Verify(g, n, warm, 4096, kIgnoreNone);
  Verify(g, n, cold, 4096, kIgnoreNone);
  Verify(g, n, cold, 1 << 20, kIgnoreNone);
  Verify(g, n, l2s, cs, kIgnoreL2);
  Verify(g, n, l2s, cs, kIgnoreNone);

  std::printf("### %s (host file %.2f TiB, %zu extents, guard built in %.1f ms)\n\n", s.name,
              static_cast<double>(lay.host_bytes()) / static_cast<double>(kTiB), n.size(),
              build_ms);
  std::printf(
      "| check | OverlapGuard (ns) | bitmap miss rate | sorted extents, binary search "
      "(ns) | linear scan of all extents (ns) |\n|---|---|---|---|---|\n");
  auto row = [&](const char* what, const std::vector<uint64_t>& offs, uint64_t len,
                 MetadataMask ignore) {
    auto guard = [&](uint64_t off) { return g.Check(off, len, ignore).has_value(); };
    (void)Time(offs, offs.size() / 4, guard);  // warm the cache as a steady state would
    OverlapGuard::Stats s0 = g.GetStats();
    Timing tg = Best(offs, 2'000'000, guard);
    OverlapGuard::Stats s1 = g.GetStats();
    Timing ts = Best(offs, 2'000'000, [&](uint64_t off) { return n.Sorted(off, len, ignore); });
    Timing tl = Best(offs, std::min<size_t>(20'000, 100'000'000 / (n.size() + 1) + 100),
                     [&](uint64_t off) { return n.Linear(off, len, ignore).has_value(); });
    uint64_t m = s1.bitmap_misses - s0.bitmap_misses;
    uint64_t h = s1.bitmap_hits - s0.bitmap_hits;
    char rate[32] = "no bitmap used";
    if (m + h) {
      std::snprintf(rate, sizeof(rate), "%.1f%%",
                    100.0 * static_cast<double>(m) / static_cast<double>(m + h));
    }
    std::printf("| %s | %.1f | %s | %.1f | %.0f |\n", what, tg.ns_per_check, rate, ts.ns_per_check,
                tl.ns_per_check);
  };
  row("random 4 KiB data writes, working set 8 windows (cache warm)", warm, 4096, kIgnoreNone);
  row("random 4 KiB data writes, whole file (working set > cache)", cold, 4096, kIgnoreNone);
  row("random 1 MiB data writes, whole file", cold, 1 << 20, kIgnoreNone);
  row("L2 table writes (hit, ignore mask L2)", l2s, cs, kIgnoreL2);

  // Threads checking at once (the mutex shared), back to back: ns per
  // check per thread. An upper bound on contention: a real I/O thread does
  // microseconds of other work per request.
  auto threaded = [&](const std::vector<uint64_t>& offs, int threads) {
    std::vector<double> per(threads);
    std::vector<std::thread> ts;
    for (int t = 0; t < threads; ++t) {
      ts.emplace_back([&, t] {
        Timing r = Time(offs, 400'000, [&](uint64_t off) {
          return g.Check(off + static_cast<uint64_t>(t) * 4096, 4096).has_value();
        });
        per[t] = r.ns_per_check;
      });
    }
    for (auto& t : ts) t.join();
    double sum = 0;
    for (double p : per) sum += p;
    return sum / threads;
  };
  // The machine is shared: the best of five runs of each.
  auto best = [&](int threads) {
    double b = 1e18;
    for (int i = 0; i < 5; ++i) b = std::min(b, threaded(cold, threads));
    return b;
  };
  std::printf(
      "\nThreads sharing the guard, random 4 KiB writes over the whole file, back to "
      "back, ns per check per thread (best of 5): 1 thread %.1f, 2 threads %.1f.\n\n",
      best(1), best(2));
}

void MutexCost() {
  std::mutex mu;
  uint64_t x = 0;
  double t0 = NowNs();
  for (int i = 0; i < 10'000'000; ++i) {
    std::lock_guard<std::mutex> l(mu);
    x += static_cast<uint64_t>(i);
  }
  double ns = (NowNs() - t0) / 1e7;
  g_sink.fetch_add(x, std::memory_order_relaxed);
  std::printf("For scale: an uncontended std::mutex lock + unlock costs %.1f ns here.\n\n", ns);
}

int Main() {
  std::printf("# OverlapGuard: memory and Check() cost\n\n");
  std::printf(
      "Generated by perf/overlap_guard_bench.sh (perf/overlap_guard_bench.cc) on a "
      "2-core machine shared with other jobs: every time is the best of three runs "
      "(threads: of five), and differences under ~10 ns are noise.\n\n");
  std::vector<Scenario> scenarios = {
      {"64 KiB clusters", 16, 0},
      {"2 MiB clusters", 21, 0},
      {"64 KiB clusters, 10 snapshots", 16, 10},
      {"4 KiB clusters (dense windows: ~40 ranges each)", 12, 0},
  };
  MemoryTable(scenarios);
  OptionsTable(16, 10);
  OptionsTable(12, 0);
  std::printf("## Check() cost (default options)\n\n");
  std::printf(
      "Every check runs through the whole Check() (mutex, window lookup, bitmap cache, bits); "
      "the two alternatives are implemented in the bench only and run on the same extents and "
      "offsets. The bench first cross-checks all three on 20,000 offsets per case.\n\n");
  MutexCost();
  for (const Scenario& s : scenarios) CheckCost(s);
  std::printf(
      "## Reading the numbers\n\n"
      "- Memory is 8 bytes per range plus 8 bytes per window up to the last window holding "
      "metadata, plus the cached bitmaps: it follows the number of metadata extents (tables), "
      "not the disk size. Snapshots add inactive L1 tables and COW'd L2 tables; shared L2 "
      "tables cost nothing extra (one range, counted references).\n"
      "- Check() costs the same whatever the image size or the number of snapshots: one index "
      "lookup and a few comparisons (or bit tests); the linear scan grows with the extent "
      "count (thousands of times slower at 1 TiB), the binary search with its log and, above "
      "all, with cache misses in a large array.\n"
      "- Bitmaps pay off only where a window holds many ranges and the writes keep coming back "
      "to it. With kvblk's layouts at 64 KiB clusters a window holds 1-8 ranges and the direct "
      "comparison is as fast as a bitmap hit, while writes spread over the disk miss a small "
      "cache almost always and pay for building a bitmap each time (the 'direct below 0' "
      "rows). Hence the defaults: bitmaps for windows of 16 or more ranges, built on a "
      "window's second recent check.\n"
      "- The mutex: uncontended it is a few ns; two threads checking back to back serialize "
      "on it (and on this shared machine, with a preempted holder, convoy). A real I/O thread "
      "spends microseconds per request elsewhere, so the lock is rarely contended; per-thread "
      "bitmap caches would be the next step if a profile ever shows it.\n");
  if (failures)
    std::printf("\n**%d disagreements between the guard and the linear scan**\n", failures);
  return failures ? 1 : 0;
}

}  // namespace
}  // namespace kvblk::qcow2

int main() { return kvblk::qcow2::Main(); }
