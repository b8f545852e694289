// Qcow2Device: internal snapshots (docs/interop/qcow2.rst, "Snapshots" and
// "Host cluster management") and the reference-tracking helpers they share
// with resize (qcow2_resize.cc).
//
// Reference counting follows qemu and `qemu-img check`: a host cluster's
// refcount is the number of paths that reach it, one per L1 table (active or
// snapshot) entry naming an L2 table, and one per L2 entry of such a table
// naming a data cluster. So an L2 table shared by two L1 tables makes each of
// its data clusters count two references.
//
// Crash safety: every operation writes new structures (L1 copies, snapshot
// tables) to freshly allocated clusters, raises refcounts and syncs before
// one small header write switches to them; references are dropped only
// after that write is synced. COPIED is cleared before the switch that
// makes clusters shared, and set (where a cluster is left with one
// reference) before the refcount drops. A power cut therefore leaves at
// worst refcounts that are too high: leaks, which `qemu-img check -r leaks`
// repairs completely.
#include <time.h>

#include <algorithm>
#include <atomic>
#include <cstring>

#include "disk/qcow2_device.h"

namespace kvblk::qcow2 {

// --- shared helpers ------------------------------------------------------------

uint64_t Qcow2Device::L1EntriesFor(uint64_t size) const {
  const uint64_t clusters = (size + cluster_size_ - 1) >> cluster_bits_;
  const uint64_t per_table = uint64_t{1} << l2_bits_;
  return (clusters + per_table - 1) / per_table;
}

Task<Status> Qcow2Device::CountTreeRefs(const std::vector<uint64_t>& l1, bool clear_copied,
                                        RefDelta* refs) {
  const std::string& path = file_->path();
  const uint64_t entries = uint64_t{1} << l2_bits_;
  for (uint64_t i = 0; i < l1.size(); ++i) {
    const uint64_t e = l1[i];
    if (e & kL1ReservedMask) {
      co_return Status::Corruption(path + ": L1 entry " + std::to_string(i) +
                                   " has reserved bits set");
    }
    const uint64_t off = e & kL1OffsetMask;
    if (off == 0) continue;
    if ((off & (cluster_size_ - 1)) != 0 || (off >> cluster_bits_) >= refcounts_->file_clusters()) {
      co_return Status::Corruption(path + ": L2 table offset " + std::to_string(off) +
                                   " in L1 entry " + std::to_string(i) +
                                   " is misaligned or past the end of the file");
    }
    ++(*refs)[off >> cluster_bits_];
    KVBLK_CO_ASSIGN_OR_RETURN(TableCache::Handle h, co_await l2_cache_->Get(off));
    for (uint64_t j = 0; j < entries; ++j) {
      const uint64_t entry = L2Entry(h, j);
      if (entry == 0) continue;
      const uint64_t bitmap = L2Bitmap(h, j);
      const uint64_t gc = (i << l2_bits_) + j;
      KVBLK_CO_ASSIGN_OR_RETURN(Mapping m, Decode(entry, bitmap, gc));
      if (m.type == Mapping::Type::kCompressed) {
        const uint64_t first = m.comp_offset >> cluster_bits_;
        const uint64_t last = (m.comp_offset + m.comp_length - 1) >> cluster_bits_;
        for (uint64_t c = first; c <= last; ++c) ++(*refs)[c];
        continue;
      }
      if (m.host == 0) continue;
      if ((m.host >> cluster_bits_) >= refcounts_->file_clusters()) {
        co_return CorruptionAt(gc, "data cluster at host offset " + std::to_string(m.host) +
                                       " (L2 table at " + std::to_string(off) +
                                       ") lies past the end of the file");
      }
      ++(*refs)[m.host >> cluster_bits_];
      if (clear_copied && (entry & kOflagCopied)) {
        SetL2Entry(h, j, entry & ~kOflagCopied, bitmap);
      }
    }
  }
  co_return Status::Ok();
}

Task<Status> Qcow2Device::CheckRefcountRoom(const RefDelta& add, const std::string& what) {
  const uint64_t max = MaxRefcount(refcounts_->order());
  for (const auto& [cluster, n] : add) {
    KVBLK_CO_ASSIGN_OR_RETURN(uint64_t rc, co_await refcounts_->Get(cluster));
    if (max - rc < n) {
      co_return Status::NotSupported(
          file_->path() + ": cannot " + what + ": the refcount of the cluster at offset " +
          std::to_string(cluster << cluster_bits_) + " would exceed " + std::to_string(max) +
          ", the largest value of refcount_bits=" + std::to_string(header_.refcount_bits()));
    }
  }
  co_return Status::Ok();
}

Task<Status> Qcow2Device::RaiseRefcounts(const RefDelta& add) {
  for (const auto& [cluster, n] : add) {
    KVBLK_CO_RETURN_IF_ERROR(co_await refcounts_->Add(cluster, static_cast<int64_t>(n)));
  }
  co_return co_await refcounts_->EnsureDurable(refcounts_->seq());
}

Task<Status> Qcow2Device::DropRefcounts(const RefDelta& drop) {
  Allocator::FreeList frees;
  for (const auto& [cluster, n] : drop) {
    for (uint64_t k = 0; k < n; ++k) frees.emplace_back(cluster << cluster_bits_, 1);
  }
  if (frees.empty()) co_return Status::Ok();
  KVBLK_CO_RETURN_IF_ERROR(co_await alloc_->ApplyFrees(std::move(frees)));
  KVBLK_CO_RETURN_IF_ERROR(co_await refcounts_->Flush());
  KVBLK_CO_RETURN_IF_ERROR(co_await file_->Flush());
  // Freed L2 tables must not linger in the cache: the cluster may come
  // back as data.
  for (const auto& [cluster, n] : drop) {
    const uint64_t off = cluster << cluster_bits_;
    if (!l2_cache_->Contains(off)) continue;
    KVBLK_CO_ASSIGN_OR_RETURN(uint64_t rc, co_await refcounts_->Get(cluster));
    if (rc == 0) l2_cache_->Drop(off);
  }
  co_return Status::Ok();
}

Task<Status> Qcow2Device::UpdateCopiedFlags(const RefDelta& pending) {
  KVBLK_CO_ASSIGN_OR_RETURN(bool l1_dirty, co_await SetCopiedFlagsInCache(pending));
  co_return co_await WriteCopiedFlags(l1_dirty);
}

Task<Result<bool>> Qcow2Device::SetCopiedFlagsInCache(const RefDelta& pending) {
  auto final_rc = [&](uint64_t cluster) -> Task<Result<uint64_t>> {
    KVBLK_CO_ASSIGN_OR_RETURN(uint64_t rc, co_await refcounts_->Get(cluster));
    auto it = pending.find(cluster);
    uint64_t p = it == pending.end() ? 0 : it->second;
    co_return rc >= p ? rc - p : 0;
  };
  const uint64_t entries = uint64_t{1} << l2_bits_;
  bool l1_dirty = false;
  for (uint64_t i = 0; i < l1_.size(); ++i) {
    const uint64_t e = l1_[i];
    const uint64_t off = e & kL1OffsetMask;
    if (off == 0) continue;
    KVBLK_CO_ASSIGN_OR_RETURN(uint64_t table_rc, co_await final_rc(off >> cluster_bits_));
    const bool table_owned = table_rc == 1;
    if (table_owned != ((e & kOflagCopied) != 0)) {
      std::atomic_ref<uint64_t>(l1_[i]).store(
          table_owned ? (e | kOflagCopied) : (e & ~kOflagCopied), std::memory_order_release);
      l1_dirty = true;
    }
    KVBLK_CO_ASSIGN_OR_RETURN(TableCache::Handle h, co_await l2_cache_->Get(off));
    for (uint64_t j = 0; j < entries; ++j) {
      const uint64_t entry = L2Entry(h, j);
      if (entry == 0 || (entry & kOflagCompressed)) continue;
      const uint64_t host = entry & kL2OffsetMask;
      if (host == 0) continue;
      KVBLK_CO_ASSIGN_OR_RETURN(uint64_t rc, co_await final_rc(host >> cluster_bits_));
      // A table shared with a snapshot never gains COPIED entries (its
      // clusters have two paths at least); clearing is always safe.
      const bool want = rc == 1 && table_owned;
      if (want != ((entry & kOflagCopied) != 0)) {
        SetL2Entry(h, j, want ? (entry | kOflagCopied) : (entry & ~kOflagCopied),
                   L2Bitmap(h, j));
      }
    }
  }
  co_return l1_dirty;
}

Task<Status> Qcow2Device::WriteCopiedFlags(bool l1_dirty) {
  KVBLK_CO_RETURN_IF_ERROR(co_await l2_cache_->Flush());
  if (l1_dirty && !l1_.empty()) {
    // After a live snapshot, requests run meanwhile and may copy a shared
    // L2 table (GetL2ForWrite, under l1_mu_), writing its new L1 entry:
    // l1_mu_ keeps that from landing between our copy of l1_ and its write.
    co_await l1_mu_.Lock();
    ExclusiveGuard l1_guard(&l1_mu_);
    std::vector<uint8_t> raw(l1_.size() * 8);
    for (size_t i = 0; i < l1_.size(); ++i) StoreBe64(&raw[i * 8], l1_[i]);
    if (Status ov = GuardCheck("L1 table write", header_.l1_table_offset, raw.size(),
                               KindBit(MetadataKind::kActiveL1));
        !ov.ok()) {
      co_return co_await RefuseWrite(std::move(ov));
    }
    KVBLK_CO_RETURN_IF_ERROR(
        co_await file_->Write(raw.data(), raw.size(), header_.l1_table_offset));
  }
  co_return co_await file_->Flush();
}

Task<Result<std::vector<uint64_t>>> Qcow2Device::ReadL1(uint64_t offset, uint32_t entries) {
  std::vector<uint64_t> l1(entries);
  if (entries == 0) co_return l1;
  const uint64_t bytes = uint64_t{entries} * 8;
  KVBLK_CO_ASSIGN_OR_RETURN(uint64_t file_size, file_->Size());
  if (bytes > kMaxL1Bytes || (offset & (cluster_size_ - 1)) != 0 || offset > file_size ||
      file_size - offset < bytes) {
    co_return Status::Corruption(file_->path() + ": L1 table at offset " + std::to_string(offset) +
                                 " with " + std::to_string(entries) +
                                 " entries is misaligned, too large or past the end of the file");
  }
  std::vector<uint8_t> raw(bytes);
  KVBLK_CO_RETURN_IF_ERROR(co_await file_->Read(raw.data(), bytes, offset));
  for (uint32_t i = 0; i < entries; ++i) l1[i] = LoadBe64(&raw[i * 8ull]);
  co_return l1;
}

Task<Result<uint64_t>> Qcow2Device::WriteNewL1(const std::vector<uint64_t>& l1,
                                               MetadataKind kind) {
  if (l1.empty()) co_return uint64_t{0};
  const uint64_t bytes = l1.size() * 8;
  if (bytes > kMaxL1Bytes) {
    co_return Status::NotSupported(file_->path() + ": an L1 table of " + std::to_string(l1.size()) +
                                   " entries exceeds " + std::to_string(kMaxL1Bytes) + " bytes");
  }
  const uint64_t clusters = (bytes + cluster_size_ - 1) >> cluster_bits_;
  KVBLK_CO_ASSIGN_OR_RETURN(uint64_t off, co_await alloc_->AllocateContiguous(clusters));
  std::vector<uint8_t> raw(clusters << cluster_bits_, 0);
  for (size_t i = 0; i < l1.size(); ++i) StoreBe64(&raw[i * 8], l1[i]);
  if (Status ov = GuardCheck("new L1 table", off, raw.size(), kIgnoreNone); !ov.ok()) {
    co_return co_await RefuseWrite(std::move(ov));
  }
  KVBLK_CO_RETURN_IF_ERROR(GuardAdd(off, bytes, kind));
  Status st = co_await file_->Write(raw.data(), raw.size(), off);
  if (st.ok()) st = co_await refcounts_->EnsureDurable(refcounts_->seq());
  if (st.ok()) st = co_await file_->Flush();
  if (!st.ok()) {
    KVBLK_CO_RETURN_IF_ERROR(GuardRemove(off, bytes, kind));
    alloc_->DeferFree(off, clusters);  // nothing refers to it
    co_return st;
  }
  co_return off;
}

Task<Status> Qcow2Device::SwitchSnapshotTable(std::vector<Snapshot> snaps) {
  const uint64_t old_off = header_.snapshots_offset;
  const uint64_t old_bytes = header_.nb_snapshots ? EncodeSnapshotTable(snapshots_).size() : 0;
  std::vector<uint8_t> table = EncodeSnapshotTable(snaps);
  if (table.size() > kMaxSnapshotTableBytes) {
    co_return Status::NotSupported(file_->path() + ": the snapshot table would exceed " +
                                   std::to_string(kMaxSnapshotTableBytes) + " bytes");
  }
  uint64_t new_off = 0;
  uint64_t clusters = 0;
  if (!snaps.empty()) {
    clusters = (table.size() + cluster_size_ - 1) >> cluster_bits_;
    KVBLK_CO_ASSIGN_OR_RETURN(new_off, co_await alloc_->AllocateContiguous(clusters));
    const uint64_t bytes = table.size();
    table.resize(clusters << cluster_bits_, 0);
    if (Status ov = GuardCheck("new snapshot table", new_off, table.size(), kIgnoreNone);
        !ov.ok()) {
      co_return co_await RefuseWrite(std::move(ov));
    }
    KVBLK_CO_RETURN_IF_ERROR(GuardAdd(new_off, bytes, MetadataKind::kSnapshotTable));
    Status st = co_await file_->Write(table.data(), table.size(), new_off);
    if (st.ok()) st = co_await refcounts_->EnsureDurable(refcounts_->seq());
    if (st.ok()) st = co_await file_->Flush();
    if (!st.ok()) {
      KVBLK_CO_RETURN_IF_ERROR(GuardRemove(new_off, bytes, MetadataKind::kSnapshotTable));
      alloc_->DeferFree(new_off, clusters);
      co_return st;
    }
  }
  // The switch: nb_snapshots and snapshots_offset are adjacent (bytes
  // 60..71), one write within one sector.
  uint8_t buf[12];
  StoreBe32(buf, static_cast<uint32_t>(snaps.size()));
  StoreBe64(buf + 4, new_off);
  Status st = co_await UpdateHeaderField(60, buf, sizeof(buf));
  if (!st.ok()) {
    co_return st.WithContext(file_->path() +
                             ": could not switch the header to the new snapshot "
                             "table");
  }
  header_.nb_snapshots = static_cast<uint32_t>(snaps.size());
  header_.snapshots_offset = new_off;
  snapshots_ = std::move(snaps);
  if (old_off != 0 && old_bytes != 0) {
    // Unprotected before it is freed: requests running alongside a live
    // snapshot may be handed its clusters at once.
    KVBLK_CO_RETURN_IF_ERROR(GuardRemove(old_off, old_bytes, MetadataKind::kSnapshotTable));
    RefDelta old;
    const uint64_t n = (old_bytes + cluster_size_ - 1) >> cluster_bits_;
    for (uint64_t i = 0; i < n; ++i) old[(old_off >> cluster_bits_) + i] = 1;
    KVBLK_CO_RETURN_IF_ERROR(co_await DropRefcounts(old));
  }
  co_return Status::Ok();
}

Task<Status> Qcow2Device::SwitchL1(uint64_t size, const std::vector<uint64_t>& l1,
                                   uint64_t l1_offset) {
  // size (24), crypt_method (32), l1_size (36), l1_table_offset (40): one
  // 24-byte write within the first sector.
  uint8_t buf[24];
  StoreBe64(buf, size);
  StoreBe32(buf + 8, header_.crypt_method);
  StoreBe32(buf + 12, static_cast<uint32_t>(l1.size()));
  StoreBe64(buf + 16, l1_offset);
  Status st = co_await UpdateHeaderField(24, buf, sizeof(buf));
  if (!st.ok()) {
    co_return st.WithContext(file_->path() + ": could not switch the header to the L1 table at " +
                             std::to_string(l1_offset));
  }
  SetDiskSize(size);
  header_.l1_size = static_cast<uint32_t>(l1.size());
  header_.l1_table_offset = l1_offset;
  l1_ = l1;
  co_return Status::Ok();
}

// --- snapshots -----------------------------------------------------------------

namespace {

Status CheckWritableImage(bool closed, bool read_only, const std::string& path) {
  if (closed) return Status::InvalidArgument(path + ": device is closed");
  if (read_only) return Status::ReadOnly(path + ": image is read-only");
  return Status::Ok();
}

}  // namespace

std::vector<SnapshotInfo> Qcow2Device::ListSnapshots() const {
  std::vector<SnapshotInfo> out;
  for (const Snapshot& s : snapshots_) out.push_back(s.info);
  return out;
}

Task<Status> Qcow2Device::CreateSnapshot(const std::string& name, uint64_t vm_state_size,
                                         uint64_t date_sec, uint32_t date_nsec,
                                         uint64_t vm_clock_nsec) {
  return OnHome(CreateSnapshotOnHome(name, vm_state_size, date_sec, date_nsec, vm_clock_nsec));
}

Task<Status> Qcow2Device::CreateSnapshotOnHome(std::string name, uint64_t vm_state_size,
                                               uint64_t date_sec, uint32_t date_nsec,
                                               uint64_t vm_clock_nsec) {
  const std::string& path = file_->path();
  KVBLK_CO_RETURN_IF_ERROR(CheckWritableImage(closed_, read_only_, path));
  if (name.empty()) co_return Status::InvalidArgument(path + ": the snapshot name is empty");
  if (name.size() > kMaxSnapshotNameBytes) {
    co_return Status::InvalidArgument(path + ": the snapshot name is longer than " +
                                      std::to_string(kMaxSnapshotNameBytes) + " bytes");
  }
  {
    // While guest requests still run: sync what was written so far, and
    // load the L2 tables and refcount blocks the exclusive section will
    // read (its counts are redone there), so that it does no I/O.
    co_await image_lock_.LockShared();
    SharedGuard warm_lock(&image_lock_);
    co_await flush_mu_.Lock();
    ExclusiveGuard early(&flush_mu_);
    KVBLK_CO_RETURN_IF_ERROR(co_await FlushMetadata());
    RefDelta warm;
    KVBLK_CO_RETURN_IF_ERROR(co_await CountTreeRefs(l1_, false, &warm));
    KVBLK_CO_RETURN_IF_ERROR(co_await CheckRefcountRoom(warm, "create snapshot '" + name + "'"));
  }
  // The exclusive section changes memory only: the snapshot's L1 copy, one
  // more reference for everything the active tree reaches, COPIED cleared
  // where clusters became shared. Requests then resume; from here on a
  // write to a shared cluster or table copies it, so the copy stays the
  // snapshot. flush_mu_ stays held (no other metadata operation or guest
  // flush interleaves) while the new state is written: refcounts before the
  // tables whose COPIED bits they justify (WriteL2Table's rule), the L1
  // copy, then the snapshot table and the header switch. A crash before the
  // switch leaves only leaked references.
  co_await image_lock_.LockExclusive();
  ExclusiveGuard g(&image_lock_);
  co_await flush_mu_.Lock();
  ExclusiveGuard f(&flush_mu_);
  int dup = FindSnapshot(snapshots_, name, SnapshotLookup::kNameOnly);
  if (dup >= 0) {
    co_return Status::InvalidArgument(path + ": a snapshot named '" + name +
                                      "' already exists (ID " + snapshots_[dup].info.id + ")");
  }
  if (snapshots_.size() >= kMaxSnapshots) {
    co_return Status::NotSupported(path + ": the image already has " +
                                   std::to_string(kMaxSnapshots) + " snapshots, the most allowed");
  }
  RefDelta refs;
  KVBLK_CO_RETURN_IF_ERROR(co_await CountTreeRefs(l1_, false, &refs));
  KVBLK_CO_RETURN_IF_ERROR(co_await CheckRefcountRoom(refs, "create snapshot '" + name + "'"));
  std::vector<uint64_t> copy(l1_.size());
  for (size_t i = 0; i < l1_.size(); ++i) copy[i] = l1_[i] & ~kOflagCopied;
  for (const auto& [cluster, n] : refs) {
    KVBLK_CO_RETURN_IF_ERROR(co_await refcounts_->Add(cluster, static_cast<int64_t>(n)));
  }
  KVBLK_CO_ASSIGN_OR_RETURN(bool l1_dirty, co_await SetCopiedFlagsInCache(RefDelta()));
  // The copy's L2 tables are the snapshot's from now on: requests that
  // resume may copy them away from the active L1 (GetL2ForWrite), and they
  // must stay protected.
  for (uint64_t e : copy) {
    const uint64_t off = e & kL1OffsetMask;
    if (off != 0) KVBLK_CO_RETURN_IF_ERROR(GuardAdd(off, cluster_size_, MetadataKind::kInactiveL2));
  }
  const uint64_t disk_size = header_.size;
  g.Release();  // guest requests resume

  Status st = co_await WriteSnapshot(name, copy, l1_dirty, disk_size, vm_state_size, date_sec,
                                     date_nsec, vm_clock_nsec);
  // Whatever happened, the guard matches the image again (a failed attempt
  // leaves extents added for structures nothing refers to).
  Status gs = co_await RebuildOverlapGuard();
  co_return st.ok() ? gs : st;
}

Task<Status> Qcow2Device::WriteSnapshot(std::string name, std::vector<uint64_t> copy,
                                        bool l1_dirty, uint64_t disk_size,
                                        uint64_t vm_state_size, uint64_t date_sec,
                                        uint32_t date_nsec, uint64_t vm_clock_nsec) {
  KVBLK_CO_RETURN_IF_ERROR(co_await refcounts_->EnsureDurable(refcounts_->seq()));
  KVBLK_CO_RETURN_IF_ERROR(co_await WriteCopiedFlags(l1_dirty));
  KVBLK_CO_ASSIGN_OR_RETURN(uint64_t l1_off,
                            co_await WriteNewL1(copy, MetadataKind::kInactiveL1));

  Snapshot s;
  s.l1_table_offset = l1_off;
  s.l1_size = static_cast<uint32_t>(copy.size());
  s.info.id = NextSnapshotId(snapshots_);
  s.info.name = name;
  if (date_sec == 0 && date_nsec == 0) {
    timespec now{};
    clock_gettime(CLOCK_REALTIME, &now);
    date_sec = static_cast<uint64_t>(now.tv_sec);
    date_nsec = static_cast<uint32_t>(now.tv_nsec);
  }
  s.info.date_sec = date_sec;
  s.info.date_nsec = date_nsec;
  s.info.vm_clock_nsec = vm_clock_nsec;
  s.info.vm_state_size = vm_state_size;
  s.info.disk_size = disk_size;
  s.info.icount = 0;  // what qemu-img snapshot -c records
  s.extra = EncodeSnapshotExtra(s.info);
  std::vector<Snapshot> snaps = snapshots_;
  snaps.push_back(std::move(s));
  co_return co_await SwitchSnapshotTable(std::move(snaps));
}

void Qcow2Device::AddL1TableRefs(uint64_t offset, uint32_t entries, RefDelta* refs) const {
  if (entries == 0) return;
  const uint64_t n = (uint64_t{entries} * 8 + cluster_size_ - 1) >> cluster_bits_;
  for (uint64_t i = 0; i < n; ++i) ++(*refs)[(offset >> cluster_bits_) + i];
}

Task<Result<Qcow2Device::SnapshotTree>> Qcow2Device::LoadSnapshotTree(const std::string& name_or_id,
                                                                    SnapshotLookup order) {
  const int idx = FindSnapshot(snapshots_, name_or_id, order);
  if (idx < 0) {
    const char* what = order == SnapshotLookup::kIdThenName ? "ID or name" : "name or ID";
    co_return Status::NotFound(file_->path() + ": no snapshot with " + what + " '" + name_or_id +
                               "'");
  }
  SnapshotTree tree;
  tree.index = idx;
  tree.snapshot = snapshots_[idx];
  KVBLK_CO_RETURN_IF_ERROR(co_await FlushMetadata());
  KVBLK_CO_ASSIGN_OR_RETURN(tree.l1,
                            co_await ReadL1(tree.snapshot.l1_table_offset, tree.snapshot.l1_size));
  co_return tree;
}

Task<Status> Qcow2Device::ApplySnapshot(const std::string& name_or_id) {
  return OnHome(ApplySnapshotOnHome(name_or_id));
}

Task<Status> Qcow2Device::ApplySnapshotOnHome(std::string name_or_id) {
  KVBLK_CO_RETURN_IF_ERROR(CheckWritableImage(closed_, read_only_, file_->path()));
  co_await image_lock_.LockExclusive();
  ExclusiveGuard g(&image_lock_);
  co_await flush_mu_.Lock();
  ExclusiveGuard f(&flush_mu_);
  Status st = co_await ApplySnapshotLocked(name_or_id);
  Status gs = co_await RebuildOverlapGuard();  // before requests may reuse what was freed
  co_return st.ok() ? gs : st;
}

Task<Status> Qcow2Device::ApplySnapshotLocked(const std::string& name_or_id) {
  const std::string& path = file_->path();
  KVBLK_CO_ASSIGN_OR_RETURN(SnapshotTree tree,
                            co_await LoadSnapshotTree(name_or_id, SnapshotLookup::kIdThenName));
  const Snapshot& sn = tree.snapshot;
  const std::vector<uint64_t>& snap_l1 = tree.l1;
  // Snapshots without the disk size in their extra data (v2) keep the
  // current size, as qemu does.
  const uint64_t disk_size = sn.extra.size() >= 16 ? sn.info.disk_size : header_.size;
  if (disk_size > kMaxVirtualSize) {
    co_return Status::Corruption(path + ": snapshot '" + sn.info.name + "' has disk size " +
                                 std::to_string(disk_size) + ", past the limit");
  }

  // References the new active tree adds (the snapshot's tree, once more)
  // and those the old active tree will drop, its L1 table included.
  RefDelta add, drop;
  KVBLK_CO_RETURN_IF_ERROR(co_await CountTreeRefs(snap_l1, true, &add));
  KVBLK_CO_RETURN_IF_ERROR(co_await CountTreeRefs(l1_, false, &drop));
  AddL1TableRefs(header_.l1_table_offset, header_.l1_size, &drop);
  KVBLK_CO_RETURN_IF_ERROR(
      co_await CheckRefcountRoom(add, "apply snapshot '" + sn.info.name + "'"));
  std::vector<uint64_t> new_l1 = snap_l1;
  new_l1.resize(std::max<uint64_t>(new_l1.size(), L1EntriesFor(disk_size)), 0);
  for (uint64_t& e : new_l1) e &= ~kOflagCopied;          // shared with the snapshot
  KVBLK_CO_RETURN_IF_ERROR(co_await l2_cache_->Flush());  // COPIED cleared above
  KVBLK_CO_RETURN_IF_ERROR(co_await RaiseRefcounts(add));
  KVBLK_CO_ASSIGN_OR_RETURN(uint64_t l1_off, co_await WriteNewL1(new_l1, MetadataKind::kActiveL1));
  KVBLK_CO_RETURN_IF_ERROR(co_await SwitchL1(disk_size, new_l1, l1_off));
  KVBLK_CO_RETURN_IF_ERROR(co_await UpdateCopiedFlags(drop));
  co_return co_await DropRefcounts(drop);
}

Task<Status> Qcow2Device::DeleteSnapshot(const std::string& name_or_id) {
  return OnHome(DeleteSnapshotOnHome(name_or_id));
}

Task<Status> Qcow2Device::DeleteSnapshotOnHome(std::string name_or_id) {
  KVBLK_CO_RETURN_IF_ERROR(CheckWritableImage(closed_, read_only_, file_->path()));
  co_await image_lock_.LockExclusive();
  ExclusiveGuard g(&image_lock_);
  co_await flush_mu_.Lock();
  ExclusiveGuard f(&flush_mu_);
  Status st = co_await DeleteSnapshotLocked(name_or_id);
  Status gs = co_await RebuildOverlapGuard();  // before requests may reuse what was freed
  co_return st.ok() ? gs : st;
}

Task<Status> Qcow2Device::DeleteSnapshotLocked(const std::string& name_or_id) {
  KVBLK_CO_ASSIGN_OR_RETURN(SnapshotTree tree,
                            co_await LoadSnapshotTree(name_or_id, SnapshotLookup::kNameThenId));
  const Snapshot& sn = tree.snapshot;
  const std::vector<uint64_t>& snap_l1 = tree.l1;
  RefDelta drop;
  KVBLK_CO_RETURN_IF_ERROR(co_await CountTreeRefs(snap_l1, false, &drop));
  AddL1TableRefs(sn.l1_table_offset, sn.l1_size, &drop);
  std::vector<Snapshot> snaps = snapshots_;
  snaps.erase(snaps.begin() + tree.index);
  KVBLK_CO_RETURN_IF_ERROR(co_await SwitchSnapshotTable(std::move(snaps)));
  KVBLK_CO_RETURN_IF_ERROR(co_await UpdateCopiedFlags(drop));
  co_return co_await DropRefcounts(drop);
}

}  // namespace kvblk::qcow2
