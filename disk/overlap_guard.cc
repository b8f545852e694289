// Implements OverlapGuard (disk/overlap_guard.h).
#include "disk/overlap_guard.h"

#include <algorithm>
#include <bit>
#include <cinttypes>
#include <cstdio>
#include <limits>
#include <string>
#include <utility>

namespace kvblk::qcow2 {
namespace {

constexpr uint32_t kMinWindowBits = 6;
constexpr uint32_t kMaxWindowBits = 15;  // a range's start and count fit 16 bits
// Metadata extents are at most tens of MiB (L1 tables, refcount tables and
// snapshot tables are capped well below this); anything larger is a bug.
constexpr uint64_t kMaxExtentBytes = uint64_t{1} << 32;
constexpr uint64_t kNoBit = std::numeric_limits<uint64_t>::max();
// The window index is dense (8 bytes a window, up to the highest window
// holding metadata): at most this many windows, 8 MiB.
constexpr uint64_t kMaxWindows = uint64_t{1} << 20;

std::string Hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "0x%" PRIx64, v);
  return buf;
}

// Sets bits [start, start + count) of `bits`.
void SetBits(uint64_t* bits, uint64_t start, uint64_t count) {
  uint64_t end = start + count;
  while (start < end) {
    uint64_t word = start >> 6;
    uint64_t bit = start & 63;
    uint64_t n = std::min<uint64_t>(64 - bit, end - start);
    uint64_t mask = (n == 64 ? ~uint64_t{0} : ((uint64_t{1} << n) - 1)) << bit;
    bits[word] |= mask;
    start += n;
  }
}

// The first set bit of `bits` in [lo, hi] (inclusive), or kNoBit.
uint64_t FindSet(const uint64_t* bits, uint64_t lo, uint64_t hi) {
  uint64_t word = lo >> 6;
  uint64_t last_word = hi >> 6;
  uint64_t w = bits[word] & (~uint64_t{0} << (lo & 63));
  while (true) {
    if (word == last_word) {
      uint64_t top = hi & 63;
      if (top != 63) w &= (uint64_t{1} << (top + 1)) - 1;
      return w ? (word << 6) + std::countr_zero(w) : kNoBit;
    }
    if (w) return (word << 6) + std::countr_zero(w);
    w = bits[++word];
  }
}

}  // namespace

const char* MetadataKindName(MetadataKind kind) {
  switch (kind) {
    case MetadataKind::kHeader:
      return "header";
    case MetadataKind::kActiveL1:
      return "active L1 table";
    case MetadataKind::kActiveL2:
      return "active L2 table";
    case MetadataKind::kRefcountTable:
      return "refcount table";
    case MetadataKind::kRefcountBlock:
      return "refcount block";
    case MetadataKind::kSnapshotTable:
      return "snapshot table";
    case MetadataKind::kInactiveL1:
      return "inactive L1 table";
    case MetadataKind::kInactiveL2:
      return "inactive L2 table";
  }
  return "unknown metadata";
}

Status OverlapError(const std::string& what, uint64_t host_offset, uint64_t bytes,
                    const Overlap& hit) {
  std::string msg = "metadata overlap: refused ";
  msg += what.empty() ? std::string("a write") : what;
  msg += " of " + std::to_string(bytes) + " bytes at host offset " + Hex(host_offset) +
         ": it would overwrite the " + MetadataKindName(hit.kind) + " at host offset " +
         Hex(hit.host_offset);
  return Status(StatusCode::kIoError, std::move(msg));
}

OverlapGuard::OverlapGuard(uint32_t cluster_bits) : OverlapGuard(cluster_bits, Options{}) {}

OverlapGuard::OverlapGuard(uint32_t cluster_bits, const Options& options)
    : cluster_bits_(cluster_bits),
      window_bits_(std::clamp(options.window_bits, kMinWindowBits, kMaxWindowBits)),
      bitmap_words_((size_t{1} << window_bits_) / 64),
      bitmap_min_ranges_(options.bitmap_min_ranges),
      cache_(std::max<size_t>(options.cache_windows, 1)),
      seen_(options.admit_on_second_check ? 2 * cache_.size() : 0) {}

OverlapGuard::~OverlapGuard() = default;

Status OverlapGuard::Add(uint64_t host_offset, uint64_t bytes, MetadataKind kind, uint32_t refs) {
  std::lock_guard<std::mutex> l(mu_);
  return ApplyLocked(host_offset, bytes, kind, refs);
}

Status OverlapGuard::Remove(uint64_t host_offset, uint64_t bytes, MetadataKind kind,
                            uint32_t refs) {
  std::lock_guard<std::mutex> l(mu_);
  return ApplyLocked(host_offset, bytes, kind, -static_cast<int64_t>(refs));
}

void OverlapGuard::Clear() {
  std::lock_guard<std::mutex> l(mu_);
  ranges_.clear();
  ranges_.shrink_to_fit();
  index_.clear();
  index_.shrink_to_fit();
  for (Slot& s : cache_) s.last_used = 0;
  std::fill(seen_.begin(), seen_.end(), 0);
}

Status OverlapGuard::ReplaceWith(OverlapGuard& fresh) {
  if (&fresh == this) return Status::Ok();
  if (fresh.cluster_bits_ != cluster_bits_ || fresh.window_bits_ != window_bits_) {
    return Status::InvalidArgument("overlap guard: replacement has a different geometry");
  }
  std::scoped_lock l(mu_, fresh.mu_);
  ranges_ = std::move(fresh.ranges_);
  index_ = std::move(fresh.index_);
  fresh.ranges_.clear();
  fresh.index_.clear();
  for (Slot& s : cache_) s.last_used = 0;
  std::fill(seen_.begin(), seen_.end(), 0);
  return Status::Ok();
}

std::vector<OverlapGuard::Extent> OverlapGuard::Extents() const {
  std::vector<Extent> out;
  {
    std::lock_guard<std::mutex> l(mu_);
    for (uint64_t w = 0; w + 1 < index_.size(); ++w) {
      for (size_t i = index_[w].first; i < index_[w + 1].first; ++i) {
        const Range& r = ranges_[i];
        out.push_back(Extent{r.kind(), (w << window_bits_) + r.start, r.count, r.refs()});
      }
    }
  }
  std::sort(out.begin(), out.end(), [](const Extent& a, const Extent& b) {
    return a.kind != b.kind ? a.kind < b.kind : a.first_cluster < b.first_cluster;
  });
  // Ranges are broken at window borders: join what continues across one.
  std::vector<Extent> joined;
  for (const Extent& e : out) {
    if (!joined.empty() && joined.back().kind == e.kind && joined.back().refs == e.refs &&
        joined.back().first_cluster + joined.back().clusters == e.first_cluster) {
      joined.back().clusters += e.clusters;
    } else {
      joined.push_back(e);
    }
  }
  return joined;
}

Status OverlapGuard::ApplyLocked(uint64_t host_offset, uint64_t bytes, MetadataKind kind,
                                 int64_t delta) {
  if (bytes == 0 || delta == 0) return Status::Ok();
  auto describe = [&] {
    return std::string(delta > 0 ? "adding" : "removing") + " the " + MetadataKindName(kind) +
           " at host offset " + Hex(host_offset) + " (" + std::to_string(bytes) + " bytes)";
  };
  if (bytes > kMaxExtentBytes || bytes - 1 > std::numeric_limits<uint64_t>::max() - host_offset) {
    return Status::InvalidArgument("overlap guard: " + describe() +
                                   ": extent too large or past the end of the address space");
  }
  const uint64_t first = host_offset >> cluster_bits_;
  const uint64_t last = (host_offset + bytes - 1) >> cluster_bits_;
  const uint64_t mask = window_clusters() - 1;
  const uint64_t w_first = first >> window_bits_;
  const uint64_t w_last = last >> window_bits_;
  if (w_last >= kMaxWindows) {
    return Status::InvalidArgument("overlap guard: " + describe() +
                                   ": beyond the host offsets the guard covers");
  }
  auto bounds = [&](uint64_t w, uint32_t* lo, uint32_t* hi) {
    *lo = static_cast<uint32_t>(w == w_first ? (first & mask) : 0);
    *hi = static_cast<uint32_t>(w == w_last ? (last & mask) + 1 : window_clusters());
  };
  // Validate every window first, so that a refused change changes nothing.
  for (uint64_t w = w_first; w <= w_last; ++w) {
    uint32_t lo, hi;
    bounds(w, &lo, &hi);
    uint32_t min_refs = 0, max_refs = 0;
    CountRange(w, lo, hi, kind, &min_refs, &max_refs);
    if (delta < 0 && min_refs < static_cast<uint64_t>(-delta)) {
      return Status::InvalidArgument("overlap guard: " + describe() +
                                     ": a cluster holds fewer such references");
    }
    if (delta > 0 && max_refs + static_cast<uint64_t>(delta) > kMaxRefs) {
      return Status::InvalidArgument("overlap guard: " + describe() + ": too many references");
    }
  }
  if (index_.size() < w_last + 2) {
    uint32_t end = static_cast<uint32_t>(ranges_.size());
    index_.resize(w_last + 2, WindowIndex{end, 0});
  }
  for (uint64_t w = w_first; w <= w_last; ++w) {
    uint32_t lo, hi;
    bounds(w, &lo, &hi);
    ApplyToWindow(w, lo, hi, kind, delta);
    InvalidateLocked(w);
  }
  return Status::Ok();
}

void OverlapGuard::CountRange(uint64_t w, uint32_t lo, uint32_t hi, MetadataKind kind,
                              uint32_t* min_refs, uint32_t* max_refs) const {
  uint64_t covered = 0;
  uint32_t mn = std::numeric_limits<uint32_t>::max(), mx = 0;
  if (WindowRanges(w) > 0) {
    for (size_t i = index_[w].first; i < index_[w + 1].first; ++i) {
      const Range& r = ranges_[i];
      if (r.kind() != kind) continue;
      uint32_t s = std::max<uint32_t>(r.start, lo);
      uint32_t e = std::min<uint32_t>(r.end(), hi);
      if (s >= e) continue;
      covered += e - s;
      mn = std::min(mn, r.refs());
      mx = std::max(mx, r.refs());
    }
  }
  *min_refs = covered < hi - lo ? 0 : mn;
  *max_refs = mx;
}

void OverlapGuard::ApplyToWindow(uint64_t w, uint32_t lo, uint32_t hi, MetadataKind kind,
                                 int64_t delta) {
  const size_t b = index_[w].first, e = index_[w + 1].first;
  // Split the window's ranges: those of `kind` that overlap [lo, hi) or
  // touch it (so that equal neighbours merge), and the rest. Both stay
  // sorted by start.
  std::vector<Range> pieces, rest;
  for (size_t i = b; i < e; ++i) {
    const Range& r = ranges_[i];
    if (r.kind() == kind && r.start <= hi && r.end() >= lo) {
      pieces.push_back(r);
    } else {
      rest.push_back(r);
    }
  }
  // Rebuild that stretch piece by piece between all the break points.
  std::vector<uint32_t> points = {lo, hi};
  for (const Range& p : pieces) {
    points.push_back(p.start);
    points.push_back(p.end());
  }
  std::sort(points.begin(), points.end());
  points.erase(std::unique(points.begin(), points.end()), points.end());
  std::vector<Range> out;
  size_t pi = 0;
  const uint32_t kind_bits = static_cast<uint32_t>(kind) << 24;
  for (size_t i = 0; i + 1 < points.size(); ++i) {
    uint32_t x = points[i], y = points[i + 1];
    while (pi < pieces.size() && pieces[pi].end() <= x) ++pi;
    int64_t refs = (pi < pieces.size() && pieces[pi].start <= x) ? pieces[pi].refs() : 0;
    if (x >= lo && y <= hi) refs += delta;
    if (refs <= 0) continue;  // validated: only a count that reached zero
    if (!out.empty() && out.back().end() == x && out.back().refs() == refs) {
      out.back().count = static_cast<uint16_t>(out.back().count + (y - x));
    } else {
      out.push_back(Range{static_cast<uint16_t>(x), static_cast<uint16_t>(y - x),
                          kind_bits | static_cast<uint32_t>(refs)});
    }
  }
  std::vector<Range> merged(rest.size() + out.size());
  std::merge(rest.begin(), rest.end(), out.begin(), out.end(), merged.begin(),
             [](const Range& a, const Range& c) {
               return a.start != c.start ? a.start < c.start : a.kind_refs < c.kind_refs;
             });
  uint16_t max_count = index_[w].max_count;
  for (const Range& r : out) max_count = std::max(max_count, r.count);
  index_[w].max_count = max_count;
  // Put the window's new ranges in place and move the later windows' starts.
  const size_t old_n = e - b, new_n = merged.size();
  if (new_n > old_n) {
    ranges_.insert(ranges_.begin() + static_cast<ptrdiff_t>(e), new_n - old_n, Range{});
  } else if (new_n < old_n) {
    ranges_.erase(ranges_.begin() + static_cast<ptrdiff_t>(b + new_n),
                  ranges_.begin() + static_cast<ptrdiff_t>(e));
  }
  std::copy(merged.begin(), merged.end(), ranges_.begin() + static_cast<ptrdiff_t>(b));
  if (new_n != old_n) {
    for (size_t i = w + 1; i < index_.size(); ++i) {
      index_[i].first = static_cast<uint32_t>(index_[i].first + new_n - old_n);
    }
    if (ranges_.capacity() > 2 * ranges_.size() + 64) ranges_.shrink_to_fit();
  }
}

void OverlapGuard::InvalidateLocked(uint64_t w) {
  for (Slot& s : cache_) {
    if (s.last_used != 0 && s.window == w) s.last_used = 0;
  }
}

const uint64_t* OverlapGuard::CachedBitmapLocked(uint64_t w) const {
  ++tick_;
  Slot* slot = &cache_[last_slot_];
  if (slot->last_used == 0 || slot->window != w) {
    slot = nullptr;
    for (size_t i = 0; i < cache_.size(); ++i) {
      if (cache_[i].last_used != 0 && cache_[i].window == w) {
        slot = &cache_[i];
        last_slot_ = i;
        break;
      }
    }
    if (slot == nullptr) return nullptr;
  }
  slot->last_used = tick_;
  ++hits_;
  return slot->bits.get();
}

bool OverlapGuard::AdmitLocked(uint64_t w) const {
  if (seen_.empty()) return true;
  for (uint64_t& x : seen_) {
    if (x == w + 1) {
      x = 0;
      return true;
    }
  }
  seen_[seen_pos_] = w + 1;
  seen_pos_ = (seen_pos_ + 1) % seen_.size();
  return false;
}

const uint64_t* OverlapGuard::BuildBitmapLocked(uint64_t w) const {
  size_t victim = 0;
  for (size_t i = 1; i < cache_.size(); ++i) {
    if (cache_[i].last_used < cache_[victim].last_used) victim = i;
  }
  ++misses_;
  Slot* slot = &cache_[victim];
  if (!slot->bits) slot->bits = std::make_unique<uint64_t[]>(bitmap_words_);
  uint64_t* bits = slot->bits.get();
  std::fill(bits, bits + bitmap_words_, 0);
  for (size_t i = index_[w].first; i < index_[w + 1].first; ++i) {
    SetBits(bits, ranges_[i].start, ranges_[i].count);
  }
  slot->window = w;
  slot->last_used = tick_;
  last_slot_ = victim;
  return bits;
}

int OverlapGuard::KindAt(uint64_t w, uint32_t c, MetadataMask ignore) const {
  const auto b = ranges_.begin() + index_[w].first;
  auto it = std::upper_bound(b, ranges_.begin() + index_[w + 1].first, c,
                             [](uint32_t x, const Range& r) { return x < r.start; });
  const uint32_t max_count = index_[w].max_count;
  int best = -1;
  while (it != b) {
    --it;
    if (uint32_t{it->start} + max_count <= c) break;  // nothing earlier reaches c
    if (it->end() <= c || (ignore & KindBit(it->kind()))) continue;
    int k = static_cast<int>(it->kind());
    if (best < 0 || k < best) best = k;
  }
  return best;
}

std::optional<Overlap> OverlapGuard::DirectLocked(uint64_t w, uint64_t lo, uint64_t hi,
                                                  MetadataMask ignore) const {
  ++direct_;
  const size_t b = index_[w].first, e = index_[w + 1].first;
  uint64_t best_c = 0;
  int best_k = -1;
  // Ranges starting max_count or more before lo cannot reach it.
  const uint64_t max_count = index_[w].max_count;
  const uint64_t from = lo >= max_count ? lo - max_count + 1 : 0;
  const size_t first = std::partition_point(ranges_.begin() + static_cast<ptrdiff_t>(b),
                                            ranges_.begin() + static_cast<ptrdiff_t>(e),
                                            [from](const Range& r) { return r.start < from; }) -
                       ranges_.begin();
  for (size_t i = first; i < e; ++i) {
    const Range& r = ranges_[i];
    if (r.start > hi) break;
    if (r.end() <= lo || (ignore & KindBit(r.kind()))) continue;
    uint64_t c = std::max<uint64_t>(r.start, lo);
    int k = static_cast<int>(r.kind());
    if (best_k < 0 || c < best_c || (c == best_c && k < best_k)) {
      best_c = c;
      best_k = k;
    }
  }
  if (best_k < 0) return std::nullopt;
  return Overlap{static_cast<MetadataKind>(best_k), ((w << window_bits_) + best_c)
                                                        << cluster_bits_};
}

std::optional<Overlap> OverlapGuard::CheckWindowLocked(uint64_t w, uint64_t lo, uint64_t hi,
                                                       MetadataMask ignore) const {
  if (WindowRanges(w) < bitmap_min_ranges_) return DirectLocked(w, lo, hi, ignore);
  const uint64_t* bits = CachedBitmapLocked(w);
  if (bits == nullptr) {
    // Not cached: build it if the window was checked recently, otherwise
    // answer from the ranges (a one-off check does not evict a hot window).
    if (!AdmitLocked(w)) return DirectLocked(w, lo, hi, ignore);
    bits = BuildBitmapLocked(w);
  }
  for (uint64_t c = FindSet(bits, lo, hi); c != kNoBit;
       c = c == hi ? kNoBit : FindSet(bits, c + 1, hi)) {
    int k = KindAt(w, static_cast<uint32_t>(c), ignore);
    if (k >= 0) {
      return Overlap{static_cast<MetadataKind>(k), ((w << window_bits_) + c) << cluster_bits_};
    }
  }
  return std::nullopt;
}

std::optional<Overlap> OverlapGuard::Check(uint64_t host_offset, uint64_t bytes,
                                           MetadataMask ignore) const {
  if (bytes == 0) return std::nullopt;
  const uint64_t end_byte = bytes - 1 > std::numeric_limits<uint64_t>::max() - host_offset
                                ? std::numeric_limits<uint64_t>::max()
                                : host_offset + bytes - 1;
  const uint64_t first = host_offset >> cluster_bits_;
  const uint64_t last = end_byte >> cluster_bits_;
  const uint64_t mask = window_clusters() - 1;
  const uint64_t w_first = first >> window_bits_;
  const uint64_t w_last = last >> window_bits_;

  std::lock_guard<std::mutex> l(mu_);
  ++checks_;
  // Windows past the index hold nothing; a write spans one window, or two
  // across a border (a huge range is cut to the index).
  const uint64_t w_end = std::min<uint64_t>(w_last, index_.size() < 2 ? 0 : index_.size() - 2);
  if (index_.size() < 2 || w_first > w_end) return std::nullopt;
  for (uint64_t w = w_first; w <= w_end; ++w) {
    if (WindowRanges(w) == 0) continue;
    uint64_t lo = w == w_first ? (first & mask) : 0;
    uint64_t hi = w == w_last ? (last & mask) : mask;
    if (auto hit = CheckWindowLocked(w, lo, hi, ignore)) return hit;
  }
  return std::nullopt;
}

size_t OverlapGuard::MemoryBytes() const {
  std::lock_guard<std::mutex> l(mu_);
  size_t bytes = sizeof(*this) + ranges_.capacity() * sizeof(Range) +
                 index_.capacity() * sizeof(WindowIndex) + cache_.capacity() * sizeof(Slot) +
                 seen_.capacity() * sizeof(uint64_t);
  for (const Slot& s : cache_) {
    if (s.bits) bytes += bitmap_words_ * sizeof(uint64_t);
  }
  return bytes;
}

OverlapGuard::Stats OverlapGuard::GetStats() const {
  std::lock_guard<std::mutex> l(mu_);
  Stats s;
  for (uint64_t w = 0; w + 1 < index_.size(); ++w) s.windows += WindowRanges(w) > 0;
  s.ranges = ranges_.size();
  for (const Slot& slot : cache_) s.cached_bitmaps += slot.last_used != 0;
  s.checks = checks_;
  s.bitmap_hits = hits_;
  s.bitmap_misses = misses_;
  s.direct_checks = direct_;
  return s;
}

}  // namespace kvblk::qcow2
