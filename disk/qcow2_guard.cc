// Qcow2Device: metadata overlap protection (issue 6 item 4; the data
// structure is OverlapGuard, disk/overlap_guard.h). What is protected and
// how the guard is kept current is described in qcow2_device.h ("Metadata
// overlap protection").
//
// The header is protected as its whole first cluster (the header, its
// extensions and the backing file name live there). Data clusters of
// internal snapshots' VM state are data, not metadata. Unknown header
// extensions that point elsewhere in the file (e.g. persistent bitmaps,
// whose autoclear bit kvblk clears on a writable open) are not tracked.
#include <algorithm>

#include "disk/qcow2_device.h"

namespace kvblk::qcow2 {

Status Qcow2Device::GuardCheck(const char* what, uint64_t host, uint64_t bytes,
                               MetadataMask ignore) const {
  if (!guard_) return Status::Ok();
  std::optional<Overlap> hit = guard_->Check(host, bytes, ignore);
  if (!hit) return Status::Ok();
  return OverlapError(file_->path() + ": " + what, host, bytes, *hit);
}

Task<Status> Qcow2Device::RefuseWrite(Status why) {
  if (&EventLoop::Current() == home_) co_return co_await SignalCorruption(std::move(why));
  co_return co_await OnHome(SignalCorruption(std::move(why)));
}

Status Qcow2Device::GuardAdd(uint64_t host, uint64_t bytes, MetadataKind kind) {
  return guard_ ? guard_->Add(host, bytes, kind) : Status::Ok();
}

Status Qcow2Device::GuardRemove(uint64_t host, uint64_t bytes, MetadataKind kind) {
  return guard_ ? guard_->Remove(host, bytes, kind) : Status::Ok();
}

Status Qcow2Device::FillOverlapGuard(OverlapGuard* g,
                                     const std::vector<std::vector<uint64_t>>& snapshot_l1s) const {
  const uint64_t file_bytes = refcounts_->file_clusters() << cluster_bits_;
  // An extent worth protecting: inside the file (a corrupt pointer past its
  // end is reported where it is used) and not empty.
  auto add = [&](uint64_t off, uint64_t bytes, MetadataKind kind) -> Status {
    if (bytes == 0 || off >= file_bytes) return Status::Ok();
    return g->Add(off, std::min(bytes, file_bytes - off), kind);
  };
  auto add_l2s = [&](const std::vector<uint64_t>& l1, MetadataKind kind) -> Status {
    for (uint64_t e : l1) {
      const uint64_t off = e & kL1OffsetMask;
      if (off == 0 || (off & (cluster_size_ - 1)) != 0) continue;
      KVBLK_RETURN_IF_ERROR(add(off, cluster_size_, kind));
    }
    return Status::Ok();
  };
  KVBLK_RETURN_IF_ERROR(add(0, cluster_size_, MetadataKind::kHeader));
  KVBLK_RETURN_IF_ERROR(
      add(header_.l1_table_offset, uint64_t{header_.l1_size} * 8, MetadataKind::kActiveL1));
  KVBLK_RETURN_IF_ERROR(add_l2s(l1_, MetadataKind::kActiveL2));
  KVBLK_RETURN_IF_ERROR(add(refcounts_->table_offset(),
                            uint64_t{refcounts_->table_clusters()} << cluster_bits_,
                            MetadataKind::kRefcountTable));
  for (uint64_t off : refcounts_->table()) {
    if (off == 0) continue;
    KVBLK_RETURN_IF_ERROR(add(off, cluster_size_, MetadataKind::kRefcountBlock));
  }
  if (!snapshots_.empty()) {
    KVBLK_RETURN_IF_ERROR(add(header_.snapshots_offset, EncodeSnapshotTable(snapshots_).size(),
                              MetadataKind::kSnapshotTable));
  }
  for (size_t i = 0; i < snapshots_.size() && i < snapshot_l1s.size(); ++i) {
    const Snapshot& s = snapshots_[i];
    KVBLK_RETURN_IF_ERROR(
        add(s.l1_table_offset, uint64_t{s.l1_size} * 8, MetadataKind::kInactiveL1));
    KVBLK_RETURN_IF_ERROR(add_l2s(snapshot_l1s[i], MetadataKind::kInactiveL2));
  }
  return Status::Ok();
}

Task<Result<std::unique_ptr<OverlapGuard>>> Qcow2Device::BuildFreshOverlapGuard() {
  // The snapshots' L1 tables first (I/O); then the rest from memory with no
  // suspension, so that it matches one instant of the in-memory state.
  std::vector<std::vector<uint64_t>> snapshot_l1s;
  const std::vector<Snapshot> snaps = snapshots_;
  for (const Snapshot& s : snaps) {
    auto l1 = co_await ReadL1(s.l1_table_offset, s.l1_size);
    // A snapshot whose L1 table cannot be read protects its L1 table only;
    // using the snapshot reports the problem.
    snapshot_l1s.push_back(l1.ok() ? std::move(*l1) : std::vector<uint64_t>());
  }
  auto g = std::make_unique<OverlapGuard>(cluster_bits_);
  KVBLK_CO_RETURN_IF_ERROR(FillOverlapGuard(g.get(), snapshot_l1s));
  co_return g;
}

Task<Status> Qcow2Device::RebuildOverlapGuard() {
  if (!guard_) co_return Status::Ok();
  KVBLK_CO_ASSIGN_OR_RETURN(std::unique_ptr<OverlapGuard> fresh, co_await BuildFreshOverlapGuard());
  co_return guard_->ReplaceWith(*fresh);
}

}  // namespace kvblk::qcow2
