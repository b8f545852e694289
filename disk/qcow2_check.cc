// Implements disk/qcow2_check.h: one Checker run per pass (the check, or
// the repair followed by a second, read-only check of the result).
#include "disk/qcow2_check.h"

#include <algorithm>
#include <cinttypes>
#include <map>
#include <memory>
#include <optional>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "disk/qcow2_check_refcounts.h"
#include "disk/qcow2_check_scan.h"
#include "disk/qcow2_check_tables.h"
#include "disk/qcow2_format.h"
#include "disk/qcow2_header.h"
#include "disk/refcount.h"
#include "disk/sync_file.h"

namespace kvblk::qcow2 {

namespace {

using check::BitmapDirectory;
using check::EntryFix;
using check::Findings;
using check::Geometry;
using check::L1Table;
using check::Printf;
using check::RefCounter;
using check::ScanContext;
using check::SnapshotTable;
using check::StoredRefcounts;

// Header field offsets the repair rewrites.
constexpr uint64_t kHeaderRefcountTableOffset = 48;  // refcount table offset, clusters,
                                                     // nb_snapshots, snapshots offset
constexpr uint64_t kHeaderIncompatibleOffset = 72;
// qemu refuses to check images with more clusters than this.
constexpr uint64_t kMaxCheckClusters = (uint64_t{1} << 31) - 1;
// A repair plans at most this many entry changes (bounds its memory).
constexpr size_t kMaxPlannedFixes = size_t{1} << 24;

uint64_t DivRoundUp(uint64_t a, uint64_t b) { return a / b + (a % b != 0); }

// One change of a table entry, merged from both scan passes.
struct EntryPlan {
  uint64_t on_disk = 0;
  uint64_t final_value = 0;
  bool adds_reference = false;
};

class Checker {
 public:
  Checker(const std::string& path, RepairMode mode, const CheckOptions& opts)
      : path_(path), mode_(mode), opts_(opts) {}

  // Runs the pass. On success `result()` holds the counts of this pass and
  // `fixed_anything()` says whether the image was changed.
  Status Run();
  const CheckResult& result() const { return result_; }
  bool fixed_anything() const { return result_.corruptions_fixed + result_.leaks_fixed > 0; }

 private:
  bool repairing_all() const { return mode_ == RepairMode::kAll; }
  void Emit(Findings* f);
  void Message(const std::string& m) {
    if (opts_.on_message) opts_.on_message(m);
  }
  void Progress(uint64_t n) {
    done_units_ += n;
    if (opts_.on_progress) opts_.on_progress(done_units_, total_units_);
  }

  Status Open();
  Status LoadTables();
  Result<L1Table> ReadL1(uint64_t offset, uint32_t size, std::string label) const;
  std::optional<std::string> SnapshotProblem(size_t index) const;
  Status BuildMetadataMap();
  Status CountReferences();
  void CheckRefcountBlocks(Findings* f);
  void Compare();
  // Queues (in refcount_changes_) the clearing of stored refcounts past the
  // end of the file that nothing references.
  void ClearRefcountsPastEnd();
  Status CheckCopied();
  Status RepairAll();
  Status RepairLeaks();
  Status WritePlans(bool first_phase);
  Status ClearHeaderBits();
  Status WriteBe64(uint64_t offset, uint64_t value);

  const std::string path_;
  const RepairMode mode_;
  const CheckOptions& opts_;
  CheckResult result_;

  std::unique_ptr<SyncFile> file_;
  Header header_;
  Geometry geo_;
  std::unique_ptr<RefCounter> refs_;
  std::unique_ptr<StoredRefcounts> stored_;
  L1Table active_;
  SnapshotTable snapshots_;
  std::optional<BitmapDirectory> bitmaps_;
  std::vector<uint8_t> meta_;        // repair only
  std::vector<bool> drop_snapshot_;  // repair: removed from the table
  bool rewrite_snapshots_ = false;   // repair: the snapshot table is replaced

  // Regions counted for the refcount table and blocks: they do not survive
  // a rebuild.
  std::vector<std::pair<uint64_t, uint64_t>> refcount_regions_;
  bool rebuild_ = false;               // the refcount structure must be rebuilt
  bool zero_refcount_in_use_ = false;  // a cluster in use has refcount 0
  uint64_t compare_clusters_ = 0;
  uint64_t highest_ = 0;
  std::unordered_set<uint64_t> overflowed_;

  std::map<uint64_t, EntryFix> scan_fixes_;    // pass 1 (repair), by file offset
  std::map<uint64_t, EntryFix> copied_fixes_;  // pass 2 (repair), by file offset
  std::vector<std::pair<uint64_t, uint64_t>> refcount_changes_;
  std::map<uint64_t, EntryPlan> plans_;

  uint64_t total_units_ = 0;
  uint64_t done_units_ = 0;
};

void Checker::Emit(Findings* f) {
  for (const std::string& m : f->messages) Message(m);
  f->messages.clear();
}

Status Checker::Run() {
  KVBLK_RETURN_IF_ERROR(Open());
  KVBLK_RETURN_IF_ERROR(LoadTables());
  if (repairing_all()) KVBLK_RETURN_IF_ERROR(BuildMetadataMap());
  KVBLK_RETURN_IF_ERROR(CountReferences());
  Compare();
  if (mode_ == RepairMode::kLeaks && (rebuild_ || zero_refcount_in_use_)) {
    Message("ERROR need to rebuild refcount structures");
    return Status::Corruption(path_ +
                              ": the refcount structure is broken and must be rebuilt, which a "
                              "leaks-only repair does not do (repair all instead)");
  }
  KVBLK_RETURN_IF_ERROR(CheckCopied());
  if (mode_ == RepairMode::kAll) KVBLK_RETURN_IF_ERROR(RepairAll());
  if (mode_ == RepairMode::kLeaks) KVBLK_RETURN_IF_ERROR(RepairLeaks());
  return Status::Ok();
}

Status Checker::Open() {
  const bool writable = mode_ != RepairMode::kNone;
  KVBLK_ASSIGN_OR_RETURN(
      file_, opts_.open_file ? opts_.open_file(path_, writable) : SyncFile::Open(path_, writable));
  KVBLK_ASSIGN_OR_RETURN(uint64_t size, file_->Size());
  std::vector<uint8_t> first(std::min<uint64_t>(size, uint64_t{1} << kMaxClusterBits));
  KVBLK_RETURN_IF_ERROR(file_->ReadAt(first.data(), first.size(), 0));
  KVBLK_ASSIGN_OR_RETURN(header_, DecodeHeader(first, size, path_));
  geo_.version = header_.version;
  geo_.cluster_bits = header_.cluster_bits;
  geo_.cluster_size = header_.cluster_size();
  geo_.refcount_order = header_.refcount_order;
  geo_.extended_l2 = header_.extended_l2();
  geo_.l2_entry_bytes = header_.l2_entry_size();
  geo_.l2_entries = header_.l2_entries();
  geo_.file_size = size;
  geo_.file_clusters = DivRoundUp(size, geo_.cluster_size);
  if (geo_.file_clusters > kMaxCheckClusters) {
    return Status::NotSupported(path_ + ": image file too large to check (" +
                                std::to_string(geo_.file_clusters) + " clusters)");
  }
  KVBLK_ASSIGN_OR_RETURN(refs_, RefCounter::Create(geo_, MaxRefcount(geo_.refcount_order)));
  // qemu counts whole sectors of the virtual disk, in clusters.
  result_.total_clusters = DivRoundUp(header_.size / 512 * 512, geo_.cluster_size);
  return Status::Ok();
}

Result<L1Table> Checker::ReadL1(uint64_t offset, uint32_t size, std::string label) const {
  L1Table t;
  t.offset = offset;
  t.size = size;
  t.label = std::move(label);
  std::vector<uint8_t> raw(uint64_t{size} * 8);
  KVBLK_RETURN_IF_ERROR(file_->ReadAt(raw.data(), raw.size(), offset));
  t.entries.resize(size);
  for (uint32_t i = 0; i < size; ++i) t.entries[i] = LoadBe64(&raw[uint64_t{i} * 8]);
  return t;
}

Status Checker::LoadTables() {
  KVBLK_ASSIGN_OR_RETURN(active_, ReadL1(header_.l1_table_offset, header_.l1_size, ""));
  if (header_.nb_snapshots > 0) {
    KVBLK_ASSIGN_OR_RETURN(snapshots_, check::ReadSnapshotTable(*file_, header_));
  }
  KVBLK_ASSIGN_OR_RETURN(bitmaps_, check::ReadBitmapDirectory(*file_, header_, geo_));
  KVBLK_ASSIGN_OR_RETURN(stored_,
                         StoredRefcounts::Load(*file_, geo_, header_.refcount_table_offset,
                                               header_.refcount_table_clusters, refs_->slots()));
  total_units_ = uint64_t{active_.size} * 2;
  drop_snapshot_.assign(snapshots_.entries.size(), false);
  for (size_t i = 0; i < snapshots_.entries.size(); ++i) {
    const check::SnapshotEntry& s = snapshots_.entries[i];
    if (s.ExcessExtra() || s.Incomplete(header_.version)) {
      if (s.ExcessExtra() && !repairing_all()) {
        return Status::Corruption(path_ + ": snapshot table entry " + std::to_string(i) +
                                  " has too much extra metadata (" + std::to_string(s.extra_size) +
                                  " bytes); a repair of everything discards it");
      }
      rewrite_snapshots_ = rewrite_snapshots_ || repairing_all();
    }
    if (SnapshotProblem(i)) {
      if (repairing_all()) drop_snapshot_[i] = rewrite_snapshots_ = true;
    } else {
      total_units_ += s.l1_size;
    }
  }
  return Status::Ok();
}

// What qemu reports about a snapshot's L1 table before scanning it, and, in
// repair mode, anything else that makes the table unusable.
std::optional<std::string> Checker::SnapshotProblem(size_t index) const {
  const check::SnapshotEntry& s = snapshots_.entries[index];
  const std::string name = s.Label();
  if (!geo_.Aligned(s.l1_offset)) {
    return Printf("%s l1_offset=%#" PRIx64
                  ": L1 table is not cluster aligned; snapshot table entry corrupted",
                  name.c_str(), s.l1_offset);
  }
  if (uint64_t{s.l1_size} * 8 > kMaxL1Bytes) {
    return Printf("%s l1_size=%#" PRIx32 ": L1 table is too large; snapshot table entry corrupted",
                  name.c_str(), s.l1_size);
  }
  if (!repairing_all() || s.l1_size == 0) return std::nullopt;
  const uint64_t bytes = uint64_t{s.l1_size} * 8;
  if (geo_.ExceedsFile(s.l1_offset, bytes)) {
    return Printf("%s l1_offset=%#" PRIx64 ": L1 table lies past the end of the file", name.c_str(),
                  s.l1_offset);
  }
  // Overlap with the header, the refcount table, the snapshot table, the
  // active L1 table or the L1 table of an earlier snapshot.
  auto overlaps = [&](uint64_t off, uint64_t len) {
    if (len == 0) return false;
    const uint64_t a0 = geo_.ClusterOf(s.l1_offset), a1 = geo_.ClusterOf(s.l1_offset + bytes - 1);
    const uint64_t b0 = geo_.ClusterOf(off), b1 = geo_.ClusterOf(off + len - 1);
    return a0 <= b1 && b0 <= a1;
  };
  bool hit = overlaps(0, geo_.cluster_size) ||
             overlaps(header_.refcount_table_offset,
                      uint64_t{header_.refcount_table_clusters} * geo_.cluster_size) ||
             overlaps(header_.snapshots_offset, snapshots_.bytes) ||
             overlaps(active_.offset, uint64_t{active_.size} * 8);
  for (size_t k = 0; k < index && !hit; ++k) {
    const check::SnapshotEntry& o = snapshots_.entries[k];
    if (!geo_.Aligned(o.l1_offset) || uint64_t{o.l1_size} * 8 > kMaxL1Bytes) continue;
    hit = overlaps(o.l1_offset, uint64_t{o.l1_size} * 8);
  }
  if (hit) {
    return Printf("%s l1_offset=%#" PRIx64 ": L1 table overlaps other image metadata", name.c_str(),
                  s.l1_offset);
  }
  return std::nullopt;
}

Status Checker::BuildMetadataMap() {
  meta_.assign(refs_->slots(), 0);
  auto mark = [&](uint64_t off, uint64_t len, uint8_t what) {
    if (len == 0 || geo_.ExceedsFile(off, len)) return;
    for (uint64_t c = geo_.ClusterOf(off); c <= geo_.ClusterOf(off + len - 1); ++c) {
      if (c < meta_.size()) meta_[c] |= what;
    }
  };
  const uint64_t cs = geo_.cluster_size;
  mark(0, cs, check::kMetaFixed);
  mark(active_.offset, uint64_t{active_.size} * 8, check::kMetaFixed);
  mark(header_.refcount_table_offset, uint64_t{header_.refcount_table_clusters} * cs,
       check::kMetaFixed);
  if (header_.nb_snapshots > 0) mark(header_.snapshots_offset, snapshots_.bytes, check::kMetaFixed);
  std::vector<size_t> kept;
  for (size_t i = 0; i < snapshots_.entries.size(); ++i) {
    if (drop_snapshot_[i]) continue;
    kept.push_back(i);
    const check::SnapshotEntry& s = snapshots_.entries[i];
    mark(s.l1_offset, uint64_t{s.l1_size} * 8, check::kMetaFixed);
  }
  if (bitmaps_) KVBLK_RETURN_IF_ERROR(check::MarkBitmapClusters(*file_, geo_, *bitmaps_, &meta_));
  // L2 tables of usable L1 entries (an L1 entry may share one with another).
  auto mark_l2 = [&](const L1Table& t) {
    for (uint64_t e : t.entries) {
      const uint64_t l2 = e & kL1OffsetMask;
      if (e != 0 && !check::L2TableProblem(geo_, meta_, l2)) mark(l2, cs, check::kMetaL2);
    }
  };
  mark_l2(active_);
  for (size_t i : kept) {
    const check::SnapshotEntry& s = snapshots_.entries[i];
    KVBLK_ASSIGN_OR_RETURN(L1Table t, ReadL1(s.l1_offset, s.l1_size, s.Label()));
    mark_l2(t);
  }
  return Status::Ok();
}

Status Checker::CountReferences() {
  ScanContext ctx;
  ctx.geo = &geo_;
  ctx.file = file_.get();
  ctx.refs = refs_.get();
  ctx.repair = repairing_all();
  ctx.meta = repairing_all() ? &meta_ : nullptr;
  ctx.progress = [this](uint64_t n) { Progress(n); };
  Findings all;
  // Hands over what was found so far: messages go out, fixes and overflowed
  // clusters are kept (deduplicated: an L2 table shared by several L1
  // entries is scanned, and fixed, once per entry), counts are summed.
  auto take = [&](Findings* f) {
    Emit(f);
    for (const EntryFix& fix : f->fixes) scan_fixes_.emplace(fix.file_offset, fix);
    for (uint64_t c : f->overflowed) overflowed_.insert(c);
    f->fixes.clear();
    f->overflowed.clear();
    all.Merge(std::move(*f));
    *f = Findings();
  };
  ctx.flush = take;

  Findings f;
  // What qemu finds while reading the snapshot table comes first.
  for (size_t i = 0; i < snapshots_.entries.size(); ++i) {
    const check::SnapshotEntry& s = snapshots_.entries[i];
    if (s.ExcessExtra()) {  // repair mode only (a check refuses it earlier)
      f.Note(Printf("Discarding too much extra metadata in snapshot table entry %zu (%" PRIu32
                    " > 1024)",
                    i, s.extra_size));
      ++result_.corruptions_fixed;
    }
    if (!s.Incomplete(header_.version)) continue;
    if (repairing_all()) {
      f.Note(Printf("Repairing snapshot table entry %zu is incomplete", i));
      ++result_.corruptions_fixed;
    } else {
      f.Corruption(Printf("ERROR snapshot table entry %zu is incomplete", i));
    }
  }
  take(&f);
  check::CountRegion(ctx, 0, geo_.cluster_size, &f);  // the header
  KVBLK_RETURN_IF_ERROR(check::ScanL1Table(ctx, active_, true, &f));
  take(&f);
  for (size_t i = 0; i < snapshots_.entries.size(); ++i) {
    const check::SnapshotEntry& s = snapshots_.entries[i];
    if (auto problem = SnapshotProblem(i)) {
      if (repairing_all()) {
        Message("Repairing " + *problem + "; snapshot removed from the snapshot table");
        ++result_.corruptions_fixed;
      } else {
        f.Corruption("ERROR " + *problem);
      }
      take(&f);
      continue;
    }
    KVBLK_ASSIGN_OR_RETURN(L1Table t, ReadL1(s.l1_offset, s.l1_size, s.Label()));
    KVBLK_RETURN_IF_ERROR(check::ScanL1Table(ctx, t, false, &f));
    take(&f);
  }
  // A snapshot table that is about to be replaced is counted by the rebuild.
  if (header_.nb_snapshots > 0 && !rewrite_snapshots_) {
    check::CountRegion(ctx, header_.snapshots_offset, snapshots_.bytes, &f);
  }
  const uint64_t rt_bytes = uint64_t{header_.refcount_table_clusters} * geo_.cluster_size;
  check::CountRegion(ctx, header_.refcount_table_offset, rt_bytes, &f);
  refcount_regions_.emplace_back(header_.refcount_table_offset, rt_bytes);
  if (bitmaps_) KVBLK_RETURN_IF_ERROR(check::CountBitmapReferences(ctx, *bitmaps_, &f));
  CheckRefcountBlocks(&f);
  take(&f);

  if (scan_fixes_.size() > kMaxPlannedFixes) {
    return Status::NotSupported(path_ + ": more than " + std::to_string(kMaxPlannedFixes) +
                                " table entries would need repair; the image is beyond repair "
                                "(copy what is readable with convert instead)");
  }
  result_.corruptions += all.corruptions;
  result_.allocated_clusters = all.allocated;
  result_.fragmented_clusters = all.fragmented;
  result_.compressed_clusters = all.compressed;
  return Status::Ok();
}

// qemu's check_refblocks: every refcount block must be aligned, inside the
// image and used by nothing else; any failure means a rebuild.
void Checker::CheckRefcountBlocks(Findings* f) {
  compare_clusters_ = geo_.file_clusters + (refs_->Get(geo_.file_clusters) != 0 ? 1 : 0);
  const char* prefix = repairing_all() ? "Repairing" : "ERROR";
  const std::vector<uint64_t>& table = stored_->table();
  ScanContext ctx;
  ctx.geo = &geo_;
  ctx.file = file_.get();
  ctx.refs = refs_.get();
  for (uint64_t i = 0; i < table.size(); ++i) {
    std::string problem;
    const uint64_t off = table[i] & kReftOffsetMask;
    if (table[i] & kReftReservedMask) {
      problem = Printf("refcount table entry %" PRIu64 " has reserved bits set", i);
    } else if (!geo_.Aligned(off)) {
      problem = Printf(
          "refcount block %" PRIu64 " is not cluster aligned; refcount table entry corrupted", i);
    } else if (geo_.ClusterOf(off) >= compare_clusters_) {
      problem = Printf("refcount block %" PRIu64 " is outside image", i);
    } else if (off != 0) {
      check::CountRegion(ctx, off, geo_.cluster_size, f);
      refcount_regions_.emplace_back(off, geo_.cluster_size);
      const uint64_t n = refs_->Get(geo_.ClusterOf(off));
      if (n != 1) problem = Printf("refcount block %" PRIu64 " refcount=%" PRIu64, i, n);
    }
    if (problem.empty()) continue;
    rebuild_ = true;
    if (repairing_all()) {
      f->messages.push_back(std::string(prefix) + " " + problem);
      ++result_.corruptions_fixed;
    } else {
      f->Corruption(std::string(prefix) + " " + problem);
    }
  }
}

void Checker::Compare() {
  const bool all = repairing_all();
  const uint64_t cs = geo_.cluster_size;
  highest_ = 0;
  for (uint64_t c = 0; c < compare_clusters_; ++c) {
    const std::optional<uint64_t> stored = stored_->Get(c);
    if (!stored) {
      Message(Printf("Can't get refcount for cluster %" PRIu64 ": Input/output error", c));
      ++result_.check_errors;
      continue;
    }
    const uint64_t ref = refs_->Get(c);
    if (*stored > 0 || ref > 0) highest_ = c;
    if (*stored == ref) continue;
    if (*stored == 0) zero_refcount_in_use_ = true;
    const bool fix = (*stored > ref && mode_ != RepairMode::kNone) || (*stored < ref && all);
    Message(Printf("%s cluster %" PRIu64 " refcount=%" PRIu64 " reference=%" PRIu64,
                   fix ? "Repairing" : (*stored < ref ? "ERROR" : "Leaked"), c, *stored, ref));
    if (fix) {
      if (*stored < ref && !stored_->Covered(c)) rebuild_ = true;
      refcount_changes_.emplace_back(c, ref);
      ++(*stored < ref ? result_.corruptions_fixed : result_.leaks_fixed);
    } else {
      ++(*stored < ref ? result_.corruptions : result_.leaks);
    }
  }
  result_.image_end_offset = (highest_ + 1) * cs;
  if (mode_ != RepairMode::kNone) ClearRefcountsPastEnd();
  if (!all) return;
  // Refcounts that cannot be read, or a snapshot table to replace: the
  // header switch to a new refcount structure does both safely.
  if (result_.check_errors != 0 || rewrite_snapshots_) rebuild_ = true;
  if (rebuild_) {
    // The old refcount table and blocks will not be referenced any more.
    for (const auto& [off, len] : refcount_regions_) refs_->Remove(off, len);
  }
}

Status Checker::CheckCopied() {
  ScanContext ctx;
  ctx.geo = &geo_;
  ctx.file = file_.get();
  ctx.refs = refs_.get();
  ctx.progress = [this](uint64_t n) { Progress(n); };
  check::RefcountFn refcount;
  bool repair = false;
  if (mode_ == RepairMode::kAll) {
    repair = true;
    refcount = [this](uint64_t c) -> std::optional<uint64_t> {
      const uint64_t n = refs_->Get(c);
      if (overflowed_.count(c)) return std::max<uint64_t>(n, 2);  // more than it can store
      return n;
    };
  } else {
    std::unordered_map<uint64_t, uint64_t> lowered;
    for (const auto& [c, v] : refcount_changes_) lowered[c] = v;
    refcount = [this, lowered](uint64_t c) -> std::optional<uint64_t> {
      auto it = lowered.find(c);
      if (it != lowered.end()) return it->second;
      return stored_->Get(c);
    };
    // Like qemu: with -r leaks, flags are repaired only when nothing else
    // is wrong any more.
    repair = mode_ == RepairMode::kLeaks && result_.check_errors == 0 && result_.corruptions == 0 &&
             result_.leaks == 0;
  }
  std::unordered_map<uint64_t, uint64_t> planned;
  for (const auto& [offset, fix] : scan_fixes_) planned.emplace(offset, fix.new_value);
  ctx.flush = [this](Findings* round) {
    Emit(round);
    for (const EntryFix& fix : round->fixes) copied_fixes_.emplace(fix.file_offset, fix);
    round->fixes.clear();
  };
  Findings f;
  KVBLK_RETURN_IF_ERROR(check::CheckCopiedFlags(ctx, active_, refcount, repair, planned, &f));
  result_.corruptions += f.corruptions;

  // Merge both passes into one plan per table word.
  for (const auto& [offset, fix] : scan_fixes_) {
    plans_.emplace(offset, EntryPlan{fix.old_value, fix.new_value, fix.adds_reference});
  }
  const size_t scan_words = plans_.size();
  size_t copied_words = 0;
  for (const auto& [offset, fix] : copied_fixes_) {
    auto [it, inserted] =
        plans_.emplace(fix.file_offset, EntryPlan{fix.old_value, fix.new_value, false});
    if (!inserted) {
      if (it->second.final_value != fix.new_value) ++copied_words;
      it->second.final_value = fix.new_value;
    } else {
      ++copied_words;
    }
  }
  result_.corruptions_fixed += scan_words + copied_words;
  scan_fixes_.clear();
  copied_fixes_.clear();
  if (plans_.size() > kMaxPlannedFixes) {
    return Status::NotSupported(path_ + ": more than " + std::to_string(kMaxPlannedFixes) +
                                " table entries would need repair");
  }
  return Status::Ok();
}

Status Checker::WriteBe64(uint64_t offset, uint64_t value) {
  uint8_t b[8];
  StoreBe64(b, value);
  return file_->WriteAt(b, sizeof(b), offset);
}

// Phase 1 writes what only removes references or clears COPIED flags;
// phase 2 what adds a reference back (reserved bits cleared) or sets a
// COPIED flag, once the refcounts are on disk.
Status Checker::WritePlans(bool first_phase) {
  bool wrote = false;
  for (const auto& [offset, p] : plans_) {
    const uint64_t base = p.adds_reference ? p.on_disk : p.final_value;
    const uint64_t phase1 =
        (base & ~kOflagCopied) | (base & p.on_disk & p.final_value & kOflagCopied);
    const uint64_t from = first_phase ? p.on_disk : phase1;
    const uint64_t to = first_phase ? phase1 : p.final_value;
    if (from == to) continue;
    KVBLK_RETURN_IF_ERROR(WriteBe64(offset, to));
    wrote = true;
  }
  return wrote ? file_->Sync() : Status::Ok();
}

void Checker::ClearRefcountsPastEnd() {
  // A crash after the allocator raised refcounts for clusters past the end
  // of the file, before the file grew over them, leaves refcounts that no
  // check sees (qemu-img too compares only the clusters inside the file);
  // once the file grows they turn into leaks. A repair clears them with the
  // rest (no message and no count: no check reports them). Only the rest of
  // the block holding the end matters: blocks wholly past it are "outside
  // image" and make a full repair rebuild the structure.
  const uint64_t per_block = stored_->entries_per_block();
  const uint64_t end = (compare_clusters_ + per_block - 1) / per_block * per_block;
  for (uint64_t c = compare_clusters_; c < end && stored_->Covered(c); ++c) {
    const std::optional<uint64_t> stored = stored_->Get(c);
    if (stored && *stored != 0 && refs_->Get(c) == 0) refcount_changes_.emplace_back(c, 0);
  }
}

Status Checker::ClearHeaderBits() {
  const uint64_t bits = kIncompatDirty | kIncompatCorrupt;
  if (header_.version < 3 || !(header_.incompatible_features & bits)) return Status::Ok();
  if (result_.check_errors != 0 || result_.corruptions != 0) return Status::Ok();
  KVBLK_RETURN_IF_ERROR(
      WriteBe64(kHeaderIncompatibleOffset, header_.incompatible_features & ~bits));
  return file_->Sync();
}

// In repair mode the counts of this pass are what could not be fixed
// (refcount overflow); the rest becomes *_fixed.
Status Checker::RepairAll() {
  KVBLK_RETURN_IF_ERROR(WritePlans(true));
  if (rebuild_) {
    Message("Rebuilding refcount structure");
    result_.check_errors = 0;  // they came from the structure being replaced
    uint64_t end = geo_.file_clusters;
    if (refs_->Get(geo_.file_clusters) != 0) end = geo_.file_clusters + 1;
    std::vector<uint8_t> new_snapshots;
    uint32_t kept = 0;
    for (size_t i = 0; i < snapshots_.entries.size() && rewrite_snapshots_; ++i) {
      if (drop_snapshot_[i]) continue;
      const std::vector<uint8_t> entry =
          check::RepairedSnapshotEntry(snapshots_.entries[i], header_.version, header_.size);
      new_snapshots.insert(new_snapshots.end(), entry.begin(), entry.end());
      ++kept;
    }
    const uint64_t limit = MaxRefcount(geo_.refcount_order);
    KVBLK_ASSIGN_OR_RETURN(check::NewRefcountStructure s,
                           check::WriteNewRefcountStructure(
                               file_.get(), geo_, end,
                               [&](uint64_t c) { return std::min<uint64_t>(refs_->Get(c), limit); },
                               rewrite_snapshots_ ? new_snapshots : std::vector<uint8_t>()));
    KVBLK_RETURN_IF_ERROR(file_->Sync());
    // The switch: one write of the adjacent header fields.
    uint8_t fields[24];
    StoreBe64(fields, s.table_offset);
    StoreBe32(fields + 8, s.table_clusters);
    StoreBe32(fields + 12, rewrite_snapshots_ ? kept : header_.nb_snapshots);
    StoreBe64(fields + 16,
              rewrite_snapshots_ ? (kept ? s.prefix_offset : 0) : header_.snapshots_offset);
    KVBLK_RETURN_IF_ERROR(
        file_->WriteAt(fields, rewrite_snapshots_ ? 24 : 12, kHeaderRefcountTableOffset));
    KVBLK_RETURN_IF_ERROR(file_->Sync());
  } else if (!refcount_changes_.empty()) {
    KVBLK_RETURN_IF_ERROR(stored_->Apply(file_.get(), refcount_changes_));
    KVBLK_RETURN_IF_ERROR(file_->Sync());
  }
  KVBLK_RETURN_IF_ERROR(WritePlans(false));
  return ClearHeaderBits();
}

Status Checker::RepairLeaks() {
  if (!refcount_changes_.empty()) {
    KVBLK_RETURN_IF_ERROR(stored_->Apply(file_.get(), refcount_changes_));
    KVBLK_RETURN_IF_ERROR(file_->Sync());
  }
  // Only COPIED fixes can be planned here; they follow the refcounts.
  KVBLK_RETURN_IF_ERROR(WritePlans(true));
  KVBLK_RETURN_IF_ERROR(WritePlans(false));
  return ClearHeaderBits();
}

}  // namespace

Result<CheckResult> CheckImage(const std::string& path, const CheckOptions& opts) {
  Checker first(path, opts.repair, opts);
  KVBLK_RETURN_IF_ERROR(first.Run());
  if (opts.repair == RepairMode::kNone) return first.result();
  const CheckResult& repair = first.result();
  const bool problems_left = repair.corruptions + repair.leaks + repair.check_errors > 0;
  if (!first.fixed_anything() && !problems_left) return repair;
  // Like qemu-img: report the state of the image after the repair, as a
  // plain check sees it (a repair pass counts only what it could not fix).
  CheckOptions again;
  again.on_message = opts.on_message;
  Checker second(path, RepairMode::kNone, again);
  KVBLK_RETURN_IF_ERROR(second.Run());
  CheckResult r = second.result();
  r.corruptions_fixed = repair.corruptions_fixed;
  r.leaks_fixed = repair.leaks_fixed;
  r.double_checked = first.fixed_anything();
  return r;
}

Status RepairRefcountsIfDirty(const std::string& path,
                              const std::function<void(const std::string&)>& on_message) {
  {
    KVBLK_ASSIGN_OR_RETURN(std::unique_ptr<SyncFile> f, SyncFile::Open(path, false));
    KVBLK_ASSIGN_OR_RETURN(uint64_t size, f->Size());
    std::vector<uint8_t> first(std::min<uint64_t>(size, uint64_t{1} << kMaxClusterBits));
    KVBLK_RETURN_IF_ERROR(f->ReadAt(first.data(), first.size(), 0));
    KVBLK_ASSIGN_OR_RETURN(Header h, DecodeHeader(first, size, path));
    if (!h.dirty()) return Status::Ok();
  }
  CheckOptions opts;
  opts.repair = RepairMode::kAll;
  opts.on_message = on_message;
  KVBLK_ASSIGN_OR_RETURN(CheckResult r, CheckImage(path, opts));
  if (r.corruptions != 0 || r.check_errors != 0) {
    return Status::Corruption(path + ": repairing the refcounts of the dirty image left " +
                              std::to_string(r.corruptions) + " corruptions and " +
                              std::to_string(r.check_errors) + " check errors");
  }
  return Status::Ok();
}

}  // namespace kvblk::qcow2
