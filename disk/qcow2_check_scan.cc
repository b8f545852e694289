// Implements disk/qcow2_check_scan.h: reference counting over L1/L2 tables
// (qcow2.rst, "Cluster mapping", "Compressed Clusters Descriptor",
// "Extended L2 Entries") with qemu-img check's classification.
#include "disk/qcow2_check_scan.h"

#include <tbb/blocked_range.h>
#include <tbb/enumerable_thread_specific.h>
#include <tbb/parallel_for.h>

#include <algorithm>
#include <atomic>
#include <cinttypes>
#include <cstdarg>
#include <cstdio>
#include <new>

#include "disk/qcow2_format.h"

namespace kvblk::qcow2::check {

namespace {

// L2 entries scanned per parallel round (at least one table); progress and
// messages are handed over after each round.
constexpr uint64_t kEntriesPerRound = uint64_t{1} << 20;

enum class ClusterType { kUnallocated, kZeroPlain, kZeroAlloc, kNormal, kCompressed };

// The type of an L2 entry, decided the way QEMU decides it (the zero flag
// has no meaning with extended L2 entries; their bitmap says it).
ClusterType Classify(const Geometry& geo, uint64_t entry) {
  if (entry & kOflagCompressed) return ClusterType::kCompressed;
  if ((entry & kOflagZero) && !geo.extended_l2) {
    return (entry & kL2OffsetMask) ? ClusterType::kZeroAlloc : ClusterType::kZeroPlain;
  }
  return (entry & kL2OffsetMask) ? ClusterType::kNormal : ClusterType::kUnallocated;
}

constexpr uint64_t kAllocBits = 0xffffffffull;  // extended L2 bitmap: allocation half

// Whether any cluster of [offset, offset + size) is marked in `meta`.
bool HitsMetadata(const Geometry& geo, const std::vector<uint8_t>& meta, uint64_t offset,
                  uint64_t size, uint8_t mask) {
  if (size == 0) return false;
  uint64_t first = geo.ClusterOf(offset);
  uint64_t last = geo.ClusterOf(offset + size - 1);
  for (uint64_t c = first; c <= last && c < meta.size(); ++c) {
    if (meta[c] & mask) return true;
  }
  return false;
}

// Why the host range of a data entry cannot be kept (repair mode).
std::optional<std::string> DataProblem(const ScanContext& ctx, uint64_t offset, uint64_t size,
                                       bool check_alignment) {
  const Geometry& geo = *ctx.geo;
  if (check_alignment && !geo.Aligned(offset)) return "not aligned to a cluster";
  if (offset == 0) return "points into the image header";
  if (geo.ExceedsFile(offset, size)) return "points past the end of the file";
  if (HitsMetadata(geo, *ctx.meta, offset, size, kMetaFixed | kMetaL2)) {
    return "points into image metadata";
  }
  return std::nullopt;
}

void AddFix(Findings* f, uint64_t file_offset, uint64_t old_value, uint64_t new_value,
            bool adds_reference) {
  f->fixes.push_back(EntryFix{file_offset, old_value, new_value, adds_reference});
}

// One L2 table (already read into `table`). `l2_offset` is where it is in
// the file, `first_guest` the guest offset of its first entry.
void ScanL2Entries(const ScanContext& ctx, uint64_t l2_offset, const uint8_t* table,
                   uint64_t first_guest, const std::string& label, bool frag_info, Findings* f) {
  const Geometry& geo = *ctx.geo;
  const uint64_t cs = geo.cluster_size;
  const int x = CompressedOffsetBits(geo.cluster_bits);
  const uint64_t coffset_mask = (uint64_t{1} << x) - 1;
  const uint64_t csize_mask = (uint64_t{1} << (geo.cluster_bits - 8)) - 1;
  const std::string where = label.empty() ? "" : " of " + label;
  uint64_t next_contiguous = 0;

  for (uint64_t j = 0; j < geo.l2_entries; ++j) {
    const uint64_t word = l2_offset + j * geo.l2_entry_bytes;
    const uint8_t* p = table + j * geo.l2_entry_bytes;
    const uint64_t on_disk = LoadBe64(p);
    const uint64_t bitmap = geo.extended_l2 ? LoadBe64(p + 8) : 0;
    const uint64_t guest = first_guest + j * cs;
    const ClusterType type = Classify(geo, on_disk);
    // The entry as it will be after repair, and whether it then gains a
    // reference (reserved bits cleared) or only loses one.
    uint64_t entry = on_disk;
    uint64_t new_bitmap = bitmap;
    bool adds_reference = false;
    // Repair: the entry gives up its host cluster.
    auto drop = [&](const std::string& what, const std::string& why, bool keep_zero) {
      f->Note(Printf("Repairing %s: %s; ", what.c_str(), why.c_str()) +
              (keep_zero ? std::string("L2 entry made a zero cluster without allocation")
                         : Printf("L2 entry cleared, guest data at offset 0x%" PRIx64 "%s is lost",
                                  guest, where.c_str())));
      entry = keep_zero ? kOflagZero : 0;
      new_bitmap &= ~kAllocBits;
      adds_reference = false;
    };

    if (type != ClusterType::kCompressed && (entry & kL2StdReservedMask)) {
      if (ctx.repair) {
        f->Note(Printf("Repairing l2 entry with reserved bits set: %" PRIx64, entry));
        entry &= ~kL2StdReservedMask;
        adds_reference = true;
      } else {
        f->Corruption(Printf("ERROR found l2 entry with reserved bits set: %" PRIx64, entry));
      }
    }

    switch (type) {
      case ClusterType::kCompressed: {
        const uint64_t coffset = entry & coffset_mask;
        if (entry & kOflagCopied) {
          std::string msg =
              Printf("coffset=0x%" PRIx64 ": copied flag must never be set for compressed clusters",
                     coffset);
          if (ctx.repair) {
            f->Note("Repairing " + msg);
          } else {
            f->Corruption("ERROR: " + msg);
          }
          entry &= ~kOflagCopied;
        }
        if (bitmap != 0) {
          if (!ctx.repair) {
            f->Corruption(Printf("ERROR compressed cluster %" PRIu64
                                 " with non-zero subcluster allocation bitmap, entry=0x%" PRIx64,
                                 j, entry));
            break;
          }
          f->Note(Printf("Repairing compressed cluster %" PRIu64
                         " with non-zero subcluster allocation bitmap",
                         j));
          new_bitmap = 0;
        }
        const uint64_t sectors = ((entry >> x) & csize_mask) + 1;
        const uint64_t csize = sectors * 512 - (coffset & 511);
        if (ctx.repair) {
          if (auto why = DataProblem(ctx, coffset, csize, false)) {
            drop(Printf("compressed cluster at coffset=0x%" PRIx64, coffset), *why, false);
            new_bitmap = 0;
            break;
          }
        }
        CountRegion(ctx, coffset, csize, f);
        if (frag_info) {
          ++f->allocated;
          ++f->compressed;
          ++f->fragmented;  // compressed clusters are fragmented by nature
        }
        break;
      }
      case ClusterType::kZeroAlloc:
      case ClusterType::kNormal: {
        const uint64_t offset = entry & kL2OffsetMask;
        if ((bitmap >> 32) & bitmap) {
          if (ctx.repair) {
            f->Note(Printf("Repairing offset=%" PRIx64
                           ": Allocated cluster has corrupted subcluster "
                           "allocation bitmap",
                           offset));
            new_bitmap &= ~((bitmap & kAllocBits) << 32);  // allocated data wins
          } else {
            f->Corruption(Printf("ERROR offset=%" PRIx64
                                 ": Allocated cluster has corrupted subcluster allocation bitmap",
                                 offset));
          }
        }
        const bool has_data = geo.extended_l2 ? (bitmap & kAllocBits) != 0 : !(entry & kOflagZero);
        if (ctx.repair) {
          if (auto why = DataProblem(ctx, offset, cs, true)) {
            drop(Printf("offset=%" PRIx64, offset), *why,
                 !geo.extended_l2 && geo.version >= 3 && !has_data);
            break;
          }
        } else if (!geo.Aligned(offset)) {
          f->Corruption(Printf("ERROR offset=%" PRIx64
                               ": %s cluster is not properly aligned; L2 entry corrupted.",
                               offset, has_data ? "Data" : "Preallocated"));
        }
        if (frag_info) {
          ++f->allocated;
          if (next_contiguous != 0 && offset != next_contiguous) ++f->fragmented;
          next_contiguous = offset + cs;
        }
        CountRegion(ctx, offset, cs, f);
        break;
      }
      case ClusterType::kZeroPlain:
        break;
      case ClusterType::kUnallocated:
        if (bitmap & kAllocBits) {
          if (ctx.repair) {
            f->Note("Repairing unallocated cluster with non-zero subcluster allocation map");
            new_bitmap &= ~kAllocBits;
          } else {
            f->Corruption("ERROR: Unallocated cluster has non-zero subcluster allocation map");
          }
        }
        break;
    }
    if (ctx.repair) {
      if (entry != on_disk) AddFix(f, word, on_disk, entry, adds_reference);
      if (new_bitmap != bitmap) AddFix(f, word + 8, bitmap, new_bitmap, false);
    }
  }
}

// Pass 1 for L1 entry `i` of `l1`.
Status ScanL1Entry(const ScanContext& ctx, const L1Table& l1, uint64_t i, bool frag_info,
                   std::vector<uint8_t>* buf, Findings* f) {
  const Geometry& geo = *ctx.geo;
  uint64_t entry = l1.entries[i];
  if (entry == 0) return Status::Ok();
  const uint64_t word = l1.offset + 8 * i;
  const uint64_t guest_span = geo.l2_entries * geo.cluster_size;
  if (entry & kL1ReservedMask) {
    if (ctx.repair) {
      f->Note(Printf("Repairing L1 entry with reserved bits set: %" PRIx64, entry));
    } else {
      f->Corruption(Printf("ERROR found L1 entry with reserved bits set: %" PRIx64, entry));
    }
  }
  const uint64_t l2_offset = entry & kL1OffsetMask;
  if (ctx.repair) {
    if (auto why = L2TableProblem(geo, *ctx.meta, l2_offset)) {
      f->Note(Printf("Repairing L1 entry %" PRIu64 "%s%s (l2_offset=%" PRIx64
                     "): %s; entry cleared, guest data at offsets 0x%" PRIx64 "..0x%" PRIx64
                     " is lost",
                     i, l1.label.empty() ? "" : " of ", l1.label.c_str(), l2_offset, why->c_str(),
                     i * guest_span, (i + 1) * guest_span - 1));
      AddFix(f, word, entry, 0, false);
      return Status::Ok();
    }
    if (entry & kL1ReservedMask) AddFix(f, word, entry, entry & ~kL1ReservedMask, true);
  }
  CountRegion(ctx, l2_offset, geo.cluster_size, f);
  if (!geo.Aligned(l2_offset)) {
    f->Corruption(Printf("ERROR l2_offset=%" PRIx64
                         ": Table is not cluster aligned; L1 entry corrupted",
                         l2_offset));
  }
  KVBLK_RETURN_IF_ERROR(ctx.file->ReadAt(buf->data(), buf->size(), l2_offset));
  ScanL2Entries(ctx, l2_offset, buf->data(), i * guest_span, l1.label, frag_info, f);
  return Status::Ok();
}

// Runs `body(index, buffer, findings)` for every index of [0, count) in
// parallel rounds, merging the findings of each round in index order into
// `out` and reporting progress after each round.
template <typename Body>
Status ParallelOverEntries(const ScanContext& ctx, uint64_t count, Body body, Findings* out) {
  tbb::enumerable_thread_specific<std::vector<uint8_t>> buffers;  // one L2 table per thread
  const uint64_t per_round = std::clamp<uint64_t>(kEntriesPerRound / ctx.geo->l2_entries, 1, 1024);
  for (uint64_t start = 0; start < count; start += per_round) {
    const uint64_t end = std::min<uint64_t>(count, start + per_round);
    std::vector<Findings> found(end - start);
    std::vector<Status> errors(end - start);
    std::atomic<bool> failed{false};
    tbb::parallel_for(tbb::blocked_range<uint64_t>(start, end, 4),
                      [&](const tbb::blocked_range<uint64_t>& r) {
                        std::vector<uint8_t>& buf = buffers.local();
                        if (buf.size() != ctx.geo->cluster_size) buf.resize(ctx.geo->cluster_size);
                        for (uint64_t i = r.begin(); i != r.end(); ++i) {
                          if (failed.load(std::memory_order_relaxed)) return;
                          Status s = body(i, &buf, &found[i - start]);
                          if (!s.ok()) {
                            errors[i - start] = s;
                            failed = true;
                          }
                        }
                      });
    for (const Status& s : errors) {
      if (!s.ok()) return s;
    }
    for (Findings& f : found) out->Merge(std::move(f));
    if (ctx.flush) ctx.flush(out);
    if (ctx.progress) ctx.progress(end - start);
  }
  return Status::Ok();
}

}  // namespace

std::string Printf(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  va_list again;
  va_copy(again, ap);
  int n = std::vsnprintf(nullptr, 0, fmt, ap);
  va_end(ap);
  std::string out(n > 0 ? static_cast<size_t>(n) : 0, '\0');
  if (n > 0) std::vsnprintf(out.data(), out.size() + 1, fmt, again);
  va_end(again);
  return out;
}

bool Geometry::ExceedsFile(uint64_t offset, uint64_t size) const {
  if (offset > UINT64_MAX - size) return true;
  uint64_t end = offset + size;
  return end > file_size && end - file_size >= cluster_size;
}

Result<std::unique_ptr<RefCounter>> RefCounter::Create(const Geometry& geo, uint64_t limit) {
  uint64_t slots = geo.file_clusters + 1;
  std::unique_ptr<uint32_t[]> counts(new (std::nothrow) uint32_t[slots]());
  if (!counts) {
    return Status(StatusCode::kNoSpace,
                  "cannot allocate reference counts for " + std::to_string(slots) + " clusters");
  }
  return std::unique_ptr<RefCounter>(
      new RefCounter(geo, slots, std::min<uint64_t>(limit, UINT32_MAX), std::move(counts)));
}

RefCounter::AddResult RefCounter::Add(uint64_t offset, uint64_t size,
                                      std::vector<uint64_t>* overflowed) {
  if (size == 0) return AddResult::kOk;
  if (geo_.ExceedsFile(offset, size)) return AddResult::kPastEnd;
  const uint64_t first = geo_.ClusterOf(offset);
  const uint64_t last = geo_.ClusterOf(offset + size - 1);
  for (uint64_t c = first; c <= last && c < slots_; ++c) {
    std::atomic_ref<uint32_t> count(counts_[c]);
    uint32_t now = count.load(std::memory_order_relaxed);
    for (;;) {
      if (now >= limit_) {
        overflowed->push_back(c);
        break;
      }
      if (count.compare_exchange_weak(now, now + 1, std::memory_order_relaxed)) break;
    }
  }
  return AddResult::kOk;
}

void RefCounter::Remove(uint64_t offset, uint64_t size) {
  if (size == 0 || geo_.ExceedsFile(offset, size)) return;
  const uint64_t first = geo_.ClusterOf(offset);
  const uint64_t last = geo_.ClusterOf(offset + size - 1);
  for (uint64_t c = first; c <= last && c < slots_; ++c) {
    if (counts_[c] > 0) --counts_[c];
  }
}

void Findings::Merge(Findings&& other) {
  corruptions += other.corruptions;
  allocated += other.allocated;
  fragmented += other.fragmented;
  compressed += other.compressed;
  for (std::string& m : other.messages) messages.push_back(std::move(m));
  if (other.suppressed) {
    messages.push_back(
        Printf("(%" PRIu64 " more findings in the same L2 table not shown)", other.suppressed));
  }
  overflowed.insert(overflowed.end(), other.overflowed.begin(), other.overflowed.end());
  fixes.insert(fixes.end(), other.fixes.begin(), other.fixes.end());
}

void CountRegion(const ScanContext& ctx, uint64_t offset, uint64_t size, Findings* out) {
  const size_t before = out->overflowed.size();
  if (ctx.refs->Add(offset, size, &out->overflowed) == RefCounter::AddResult::kPastEnd) {
    out->Corruption(
        Printf("ERROR: counting reference for region exceeding the end of the file "
               "by one cluster or more: offset 0x%" PRIx64 " size 0x%" PRIx64,
               offset, size));
  }
  for (size_t k = before; k < out->overflowed.size(); ++k) {
    out->Corruption(Printf("ERROR: overflow cluster offset=0x%" PRIx64,
                           out->overflowed[k] << ctx.geo->cluster_bits));
    out->Note(
        "Use qemu-img amend to increase the refcount entry width or kvblk convert to create a "
        "clean copy if the image cannot be opened for writing");
  }
}

std::optional<std::string> L2TableProblem(const Geometry& geo, const std::vector<uint8_t>& meta,
                                          uint64_t l2_offset) {
  if (l2_offset == 0) return "no L2 table offset";
  if (!geo.Aligned(l2_offset)) return "L2 table is not cluster aligned";
  if (geo.ExceedsFile(l2_offset, geo.cluster_size)) return "L2 table lies past the end of the file";
  if (HitsMetadata(geo, meta, l2_offset, geo.cluster_size, kMetaFixed)) {
    return "L2 table overlaps other image metadata";
  }
  return std::nullopt;
}

Status ScanL1Table(const ScanContext& ctx, const L1Table& l1, bool frag_info, Findings* out) {
  if (l1.size == 0) return Status::Ok();
  CountRegion(ctx, l1.offset, uint64_t{l1.size} * 8, out);
  return ParallelOverEntries(
      ctx, l1.size,
      [&](uint64_t i, std::vector<uint8_t>* buf, Findings* f) {
        return ScanL1Entry(ctx, l1, i, frag_info, buf, f);
      },
      out);
}

Status CheckCopiedFlags(const ScanContext& ctx, const L1Table& active, const RefcountFn& refcount,
                        bool repair, const std::unordered_map<uint64_t, uint64_t>& planned,
                        Findings* out) {
  const Geometry& geo = *ctx.geo;
  auto value_at = [&](uint64_t file_offset, uint64_t on_disk) {
    auto it = planned.find(file_offset);
    return it == planned.end() ? on_disk : it->second;
  };
  auto mismatch = [&](Findings* f, const std::string& what, uint64_t word, uint64_t entry) {
    if (repair) {
      f->Note("Repairing OFLAG_COPIED " + what);
      AddFix(f, word, entry, entry ^ kOflagCopied, false);
    } else {
      f->Corruption("ERROR OFLAG_COPIED " + what);
    }
  };
  return ParallelOverEntries(
      ctx, active.size,
      [&](uint64_t i, std::vector<uint8_t>* buf, Findings* f) -> Status {
        const uint64_t word = active.offset + 8 * i;
        const uint64_t entry = value_at(word, active.entries[i]);
        const uint64_t l2_offset = entry & kL1OffsetMask;
        if (l2_offset == 0) return Status::Ok();
        if (auto rc = refcount(geo.ClusterOf(l2_offset))) {
          if ((*rc == 1) != ((entry & kOflagCopied) != 0)) {
            mismatch(
                f,
                Printf("L2 cluster: l1_index=%" PRIu64 " l1_entry=%" PRIx64 " refcount=%" PRIu64, i,
                       entry, *rc),
                word, entry);
          }
        }
        KVBLK_RETURN_IF_ERROR(ctx.file->ReadAt(buf->data(), buf->size(), l2_offset));
        for (uint64_t j = 0; j < geo.l2_entries; ++j) {
          const uint64_t w = l2_offset + j * geo.l2_entry_bytes;
          const uint64_t e = value_at(w, LoadBe64(buf->data() + j * geo.l2_entry_bytes));
          const ClusterType type = Classify(geo, e);
          if (type != ClusterType::kNormal && type != ClusterType::kZeroAlloc) continue;
          auto rc = refcount(geo.ClusterOf(e & kL2OffsetMask));
          if (!rc) continue;
          if ((*rc == 1) != ((e & kOflagCopied) != 0)) {
            mismatch(f, Printf("data cluster: l2_entry=%" PRIx64 " refcount=%" PRIu64, e, *rc), w,
                     e);
          }
        }
        return Status::Ok();
      },
      out);
}

}  // namespace kvblk::qcow2::check
