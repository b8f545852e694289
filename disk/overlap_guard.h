// OverlapGuard: refuses host writes that would overwrite qcow2 metadata
// (issue 6 item 4).
//
// The guard knows where every metadata structure of an image lives (header,
// active and inactive L1 and L2 tables, refcount table and blocks, snapshot
// table) and answers, for a host byte range about to be written, whether it
// touches any of them, in constant time per cluster checked.
//
// Layout. Host clusters are grouped in windows of 2^window_bits clusters
// (default 2^14: 1 GiB of host file with 64 KiB clusters).
//  - The range list: one vector of ranges (start cluster within its window,
//    cluster count, kind, reference count; 8 bytes each) sorted by window,
//    start and kind. Ranges never cross a window border: the list is broken
//    at every border, and a dense index (one 8-byte entry per window, up to
//    the highest window holding metadata) gives each window's span of the
//    list in O(1). Ranges of one kind never overlap each other; ranges of
//    different kinds may (an L2 table shared by the active image and a
//    snapshot is both an active and an inactive L2 table). Adjacent ranges
//    of one kind and count are merged.
//  - The bitmap cache: for a few recently checked windows, one bit per
//    cluster ("some metadata here"), generated from the window's ranges on
//    first use and kept in a small LRU cache of fixed size (default 16
//    bitmaps of 2 KiB). Add/Remove drop the bitmap of every window they
//    change.
// Check() finds the window's span (empty: no metadata, done). A window with
// fewer than Options::bitmap_min_ranges ranges is compared with those
// ranges directly (a handful of comparisons, no bitmap: with the usual
// layouts most windows hold one to eight ranges, and building a bitmap for
// them costs more than it saves when writes are spread over the disk, see
// perf/results/overlap_guard.md). Denser windows go through their bitmap:
// test the bits of the written clusters, and only on a set bit consult the
// window's ranges for the kind (and the ignore mask). A dense window's
// bitmap is built on its second recent check (Options::
// admit_on_second_check), so one-off checks spread over the disk do not
// evict the bitmaps of hot windows. Either way the work per check is
// bounded by the window, independent of the image size.
//
// Reference counting (the Add/Remove contract). Each (cluster, kind) pair
// carries a count: Add raises it (by one, or by `refs`) for every cluster
// the extent touches, Remove lowers it, and the cluster stays protected as
// that kind while the count is above zero. So a table referenced twice (two Adds,
// e.g. an L2 table shared by the active L1 and a snapshot's L1, added once
// as kActiveL2 and once as kInactiveL2, or twice as kInactiveL2 by two
// snapshots) stays protected until both references are removed. Remove of
// a reference that is not there is refused as a whole (InvalidArgument) and
// changes nothing: it is a bookkeeping bug in the caller.
//
// Threads. Check() may be called from any number of threads at once;
// Add/Remove/Clear from any thread too (in kvblk: the device's home loop).
// One std::mutex (mu_) guards the ranges, the index, the cache and the
// counters. It is held for a bounded, short time and never across a
// suspension: a Check does an index lookup and either compares fewer than
// bitmap_min_ranges ranges or looks the bitmap up (a scan of at most
// cache_windows keys) and tests a few words; a cache miss additionally
// builds one bitmap (window_clusters / 8 bytes cleared, then one bit run per
// range of the window). Add/Remove rewrite one window's span and shift the
// later ones: O(ranges + windows), microseconds, on the rare metadata
// allocations. perf/results/overlap_guard.md has the measured cost, alone
// and with a second thread checking at the same time.
#ifndef KVBLK_DISK_OVERLAP_GUARD_H_
#define KVBLK_DISK_OVERLAP_GUARD_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "kvblk/status.h"

namespace kvblk::qcow2 {

// What a metadata cluster holds (qcow2.rst: "Header", "Cluster mapping",
// "Host cluster management", "Snapshots").
enum class MetadataKind : uint8_t {
  kHeader = 0,     // the header and its extensions (cluster 0)
  kActiveL1,       // the active L1 table
  kActiveL2,       // an L2 table the active L1 points to
  kRefcountTable,  // the refcount table
  kRefcountBlock,  // a refcount block
  kSnapshotTable,  // the snapshot table
  kInactiveL1,     // a snapshot's L1 table
  kInactiveL2,     // an L2 table a snapshot's L1 points to
};
inline constexpr int kMetadataKindCount = 8;

// A name for messages: "header", "active L1 table", "active L2 table",
// "refcount table", "refcount block", "snapshot table", "inactive L1 table",
// "inactive L2 table".
const char* MetadataKindName(MetadataKind kind);

// A set of kinds, for Check's ignore mask.
using MetadataMask = uint32_t;
constexpr MetadataMask KindBit(MetadataKind kind) {
  return MetadataMask{1} << static_cast<unsigned>(kind);
}
inline constexpr MetadataMask kIgnoreNone = 0;
// What an L2 table writer ignores: the table it writes may also be a
// snapshot's (COPIED flags are rewritten in shared tables).
inline constexpr MetadataMask kIgnoreL2 =
    KindBit(MetadataKind::kActiveL2) | KindBit(MetadataKind::kInactiveL2);
inline constexpr MetadataMask kIgnoreRefcountBlocks = KindBit(MetadataKind::kRefcountBlock);

// The first metadata a checked write would have hit.
struct Overlap {
  MetadataKind kind;
  uint64_t host_offset;  // byte offset of the first metadata cluster hit
};

// The error for a refused write of `bytes` at `host_offset` that would have
// hit `hit`: IoError "metadata overlap: refused a write of <bytes> bytes at
// host offset 0x<..>: it would overwrite the <kind> at host offset 0x<..>".
// `what` names the writer (e.g. "data write", "L2 table write") and is put
// in front when not empty. The caller also marks the image corrupt.
Status OverlapError(const std::string& what, uint64_t host_offset, uint64_t bytes,
                    const Overlap& hit);

class OverlapGuard {
 public:
  struct Options {
    // log2 of the clusters per window, 6..15. A window's bitmap has
    // 2^window_bits bits (2 KiB for the default 14).
    uint32_t window_bits = 14;
    // Bitmaps kept (>= 1).
    size_t cache_windows = 16;
    // A window with fewer ranges than this is checked against its ranges
    // directly (at most this many comparisons) and gets no bitmap; 0 means
    // every window goes through a bitmap.
    size_t bitmap_min_ranges = 16;
    // A window gets a bitmap only on its second check while it is among
    // the last 2 * cache_windows windows that wanted one; the first check
    // is answered from its ranges. Keeps writes spread over the disk from
    // evicting the bitmaps of hot windows.
    bool admit_on_second_check = true;
  };

  // `cluster_bits` is the image's (9..21); options as above (values out of
  // range are clamped).
  explicit OverlapGuard(uint32_t cluster_bits);
  OverlapGuard(uint32_t cluster_bits, const Options& options);
  OverlapGuard(const OverlapGuard&) = delete;
  OverlapGuard& operator=(const OverlapGuard&) = delete;
  ~OverlapGuard();

  // Adds `refs` references of `kind` (default one) to every cluster that
  // host bytes [host_offset, host_offset + bytes) touch. bytes == 0 or
  // refs == 0 does nothing. InvalidArgument (nothing changed) if the extent
  // is larger than 4 GiB, wraps past 2^64, lies past the 2^20th window
  // (2^34 clusters with the default window: 8 TiB of host file with
  // 512-byte clusters, 1 PiB with 64 KiB ones) or a count would pass
  // 2^24 - 1 (qcow2 allows 65536 snapshots). Cost: O(ranges + windows)
  // (the list is a vector); adding extents in offset order appends.
  Status Add(uint64_t host_offset, uint64_t bytes, MetadataKind kind, uint32_t refs = 1);
  // Drops `refs` references of `kind` from the same clusters; a cluster
  // whose count reaches zero is no longer protected as `kind`.
  // InvalidArgument (nothing changed) if any of them holds fewer.
  Status Remove(uint64_t host_offset, uint64_t bytes, MetadataKind kind, uint32_t refs = 1);
  // Forgets everything (e.g. before rebuilding after a failed operation).
  void Clear();
  // Takes over the ranges of `fresh` (a guard built from scratch; same
  // cluster_bits and window_bits, else InvalidArgument and nothing changes),
  // in one step: a concurrent Check sees either the old ranges or the new
  // ones, never none. `fresh` is left empty. Drops every cached bitmap.
  Status ReplaceWith(OverlapGuard& fresh);

  // What the guard protects, as maximal extents of clusters that share one
  // kind and reference count, sorted by (kind, first cluster). Two guards
  // protect the same clusters with the same counts exactly when their
  // Extents() are equal (tests compare a guard kept up to date against one
  // rebuilt from the image).
  struct Extent {
    MetadataKind kind;
    uint64_t first_cluster;
    uint64_t clusters;
    uint32_t refs;
    bool operator==(const Extent&) const = default;
  };
  std::vector<Extent> Extents() const;

  // Whether writing host bytes [host_offset, host_offset + bytes) would
  // touch metadata of a kind not in `ignore`: the first such cluster (lowest
  // offset; of its kinds the lowest-numbered one not ignored), or nullopt.
  // bytes == 0 never overlaps; a range past 2^64 is checked up to 2^64 - 1.
  // Thread-safe.
  std::optional<Overlap> Check(uint64_t host_offset, uint64_t bytes,
                               MetadataMask ignore = kIgnoreNone) const;

  // Bytes of memory the guard uses: its object, the window index, the
  // ranges and the cached bitmaps (allocated capacity, not counting the
  // allocator's own per-block overhead).
  size_t MemoryBytes() const;

  struct Stats {
    size_t windows = 0;          // windows holding metadata
    size_t ranges = 0;           // entries of the range list
    size_t cached_bitmaps = 0;   // bitmaps in the cache now
    uint64_t checks = 0;         // Check() calls
    uint64_t bitmap_hits = 0;    // window bitmap found in the cache
    uint64_t bitmap_misses = 0;  // window bitmap generated
    uint64_t direct_checks = 0;  // windows checked against their ranges directly
  };
  Stats GetStats() const;

  uint32_t cluster_bits() const { return cluster_bits_; }
  uint64_t window_clusters() const { return uint64_t{1} << window_bits_; }

 private:
  // One entry of the range list: clusters [start, start + count) of one
  // window, relative to the window's first cluster; kind in the top 8 bits
  // of kind_refs, the reference count in the low 24.
  struct Range {
    uint16_t start;
    uint16_t count;
    uint32_t kind_refs;
    MetadataKind kind() const { return static_cast<MetadataKind>(kind_refs >> 24); }
    uint32_t refs() const { return kind_refs & kMaxRefs; }
    uint32_t end() const { return uint32_t{start} + count; }
  };
  static constexpr uint32_t kMaxRefs = (uint32_t{1} << 24) - 1;
  // Where window w's ranges are: ranges_[index_[w].first, index_[w+1].first).
  struct WindowIndex {
    uint32_t first;
    // No range of the window is longer (never lowered; bounds the backward
    // scan in KindAt).
    uint16_t max_count;
  };
  struct Slot {
    uint64_t window = 0;
    uint64_t last_used = 0;  // 0: empty slot
    std::unique_ptr<uint64_t[]> bits;
  };

  // Applies `delta` to the (cluster, kind) counts of the clusters touched
  // by the byte range. Requires mu_.
  Status ApplyLocked(uint64_t host_offset, uint64_t bytes, MetadataKind kind, int64_t delta);
  // Applies `delta` to clusters [lo, hi) of window `w` (relative). Requires
  // mu_, an index covering w and that the change was validated.
  void ApplyToWindow(uint64_t w, uint32_t lo, uint32_t hi, MetadataKind kind, int64_t delta);
  // The smallest count of `kind` over clusters [lo, hi) of window `w` (0 if
  // a cluster has none) and the largest. Requires mu_.
  void CountRange(uint64_t w, uint32_t lo, uint32_t hi, MetadataKind kind, uint32_t* min_refs,
                  uint32_t* max_refs) const;
  // The number of ranges of window `w` (0 past the index). Requires mu_.
  size_t WindowRanges(uint64_t w) const {
    return w + 1 < index_.size() ? index_[w + 1].first - index_[w].first : 0;
  }
  // The first non-ignored metadata cluster in relative clusters [lo, hi]
  // (inclusive) of window `w`, which holds ranges. Requires mu_.
  std::optional<Overlap> CheckWindowLocked(uint64_t w, uint64_t lo, uint64_t hi,
                                           MetadataMask ignore) const;
  // Drops the cached bitmap of window `w`, if any. Requires mu_.
  void InvalidateLocked(uint64_t w);
  // The cached bitmap of window `w` (now most recently used), or null.
  // Requires mu_.
  const uint64_t* CachedBitmapLocked(uint64_t w) const;
  // Whether window `w`, whose bitmap is not cached, gets one now: true if
  // admission is off or `w` was seen recently; otherwise remembers `w`.
  // Requires mu_.
  bool AdmitLocked(uint64_t w) const;
  // Builds the bitmap of window `w` in the least recently used slot.
  // Requires mu_.
  const uint64_t* BuildBitmapLocked(uint64_t w) const;
  // CheckWindowLocked from the ranges alone (binary search, then the
  // ranges that can reach [lo, hi]). Requires mu_.
  std::optional<Overlap> DirectLocked(uint64_t w, uint64_t lo, uint64_t hi,
                                      MetadataMask ignore) const;
  // The lowest-numbered kind not in `ignore` that covers relative cluster
  // `c` of window `w`, or -1. Requires mu_.
  int KindAt(uint64_t w, uint32_t c, MetadataMask ignore) const;

  const uint32_t cluster_bits_;
  const uint32_t window_bits_;
  const size_t bitmap_words_;

  const size_t bitmap_min_ranges_;

  mutable std::mutex mu_;
  // The range list, sorted by (window, start, kind). Guarded by mu_.
  std::vector<Range> ranges_;
  // One entry per window from 0 up to the highest window that ever held
  // metadata, plus one past it. Guarded by mu_.
  std::vector<WindowIndex> index_;
  // The bitmap cache (LRU by last_used). Guarded by mu_ (Check fills it).
  mutable std::vector<Slot> cache_;
  mutable size_t last_slot_ = 0;  // where the latest lookup hit
  mutable uint64_t tick_ = 0;
  mutable uint64_t checks_ = 0;
  mutable uint64_t hits_ = 0;
  mutable uint64_t misses_ = 0;
  mutable uint64_t direct_ = 0;
  // Admission: windows whose bitmap was wanted recently but not built
  // (window + 1; 0 is empty), a ring of 2 * cache_windows. Guarded by mu_.
  mutable std::vector<uint64_t> seen_;
  mutable size_t seen_pos_ = 0;
};

}  // namespace kvblk::qcow2

#endif  // KVBLK_DISK_OVERLAP_GUARD_H_
