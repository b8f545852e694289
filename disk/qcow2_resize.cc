// Qcow2Device: changing the virtual size (qemu-img resize).
//
// Growing rewrites only the size field when the L1 table already covers the
// new size; otherwise a larger copy of the L1 table is written to new
// clusters and synced, one header write switches size and L1 together, and
// the old table is freed. Shrinking first clears the entries of the last
// kept L2 table that lie past the new end (copying the table if a snapshot
// shares it), then switches to a shorter L1 table and drops the references
// of every L2 table past the end. Snapshots keep their own L1 tables and
// sizes; v2 images with snapshots are refused as qemu refuses them (their
// snapshot entries carry no disk size).
#include <algorithm>

#include "disk/qcow2_device.h"

namespace kvblk::qcow2 {

Task<Status> Qcow2Device::Resize(uint64_t new_size, bool allow_shrink) {
  return OnHome(ResizeOnHome(new_size, allow_shrink));
}

Task<Status> Qcow2Device::ResizeOnHome(uint64_t new_size, bool allow_shrink) {
  const std::string& path = file_->path();
  if (closed_) co_return Status::InvalidArgument(path + ": device is closed");
  if (read_only_) co_return Status::ReadOnly(path + ": image is read-only");
  if (new_size == 0) co_return Status::InvalidArgument(path + ": the new size must be positive");
  if (new_size % 512 != 0) {
    co_return Status::InvalidArgument(path + ": the new size " + std::to_string(new_size) +
                                      " is not a multiple of 512");
  }
  if (new_size > kMaxVirtualSize) {
    co_return Status::InvalidArgument(path + ": the new size " + std::to_string(new_size) +
                                      " exceeds the qcow2 limit of " +
                                      std::to_string(kMaxVirtualSize) + " bytes");
  }
  if (header_.version < 3 && !snapshots_.empty()) {
    co_return Status::NotSupported(path +
                                   ": cannot resize a version 2 (compat=0.10) image that "
                                   "has snapshots");
  }
  if (new_size < header_.size && !allow_shrink) {
    co_return Status::InvalidArgument(path + ": shrinking from " + std::to_string(header_.size) +
                                      " to " + std::to_string(new_size) +
                                      " bytes deletes the data past the new end; it needs the "
                                      "shrink option");
  }
  uint64_t zero_from = 0;
  uint64_t zero_to = 0;
  {
    co_await image_lock_.LockExclusive();
    ExclusiveGuard g(&image_lock_);
    co_await flush_mu_.Lock();
    ExclusiveGuard f(&flush_mu_);
    Status st = co_await ResizeLocked(new_size, &zero_from, &zero_to);
    Status gs = co_await RebuildOverlapGuard();  // before requests may reuse what was freed
    KVBLK_CO_RETURN_IF_ERROR(st);
    KVBLK_CO_RETURN_IF_ERROR(gs);
  }
  if (zero_to > zero_from) {
    // Bytes that would otherwise show stale data: the rest of a partial last
    // cluster, and the part of a backing file the new area covers.
    KVBLK_CO_RETURN_IF_ERROR(co_await WriteZeroes(zero_from, zero_to - zero_from, false));
    KVBLK_CO_RETURN_IF_ERROR(co_await Flush());
  }
  co_return Status::Ok();
}

Task<Status> Qcow2Device::ResizeLocked(uint64_t new_size, uint64_t* zero_from, uint64_t* zero_to) {
  KVBLK_CO_RETURN_IF_ERROR(co_await FlushMetadata());
  const uint64_t old_size = header_.size;
  if (new_size == old_size) co_return Status::Ok();
  if (new_size < old_size) co_return co_await ShrinkLocked(new_size);

  // What must be zeroed once the new size is in place.
  *zero_from = *zero_to = old_size;
  if (old_size % cluster_size_ != 0) {
    const uint64_t gc = old_size >> cluster_bits_;
    const uint64_t l1i = gc >> l2_bits_;
    if (l1i < l1_.size() && (l1_[l1i] & kL1OffsetMask) != 0) {
      KVBLK_CO_ASSIGN_OR_RETURN(TableCache::Handle h, co_await GetL2(l1i));
      const uint64_t idx = gc & ((uint64_t{1} << l2_bits_) - 1);
      KVBLK_CO_ASSIGN_OR_RETURN(Mapping m, Decode(L2Entry(h, idx), L2Bitmap(h, idx), gc));
      // Data (some allocated subcluster with extended L2 entries) past the
      // old end must read as zeros once exposed.
      if (m.sub_alloc != 0 || m.type == Mapping::Type::kCompressed) {
        *zero_to = std::min(new_size, (gc + 1) << cluster_bits_);
      }
    }
  }
  if (backing_ && backing_->size() > old_size) {
    *zero_to = std::max(*zero_to, std::min(new_size, backing_->size()));
  }

  const uint64_t need = L1EntriesFor(new_size);
  if (need <= l1_.size()) {
    uint8_t buf[8];
    StoreBe64(buf, new_size);
    KVBLK_CO_RETURN_IF_ERROR(co_await UpdateHeaderField(24, buf, sizeof(buf)));
    SetDiskSize(new_size);
    co_return Status::Ok();
  }
  // A larger L1 table: written and synced, switched in with the size, and
  // only then is the old one freed.
  RefDelta old_l1;
  AddL1TableRefs(header_.l1_table_offset, header_.l1_size, &old_l1);
  std::vector<uint64_t> grown = l1_;
  grown.resize(need, 0);
  KVBLK_CO_ASSIGN_OR_RETURN(uint64_t off, co_await WriteNewL1(grown, MetadataKind::kActiveL1));
  KVBLK_CO_RETURN_IF_ERROR(co_await SwitchL1(new_size, grown, off));
  co_return co_await DropRefcounts(old_l1);
}

Task<Status> Qcow2Device::ShrinkLocked(uint64_t new_size) {
  const uint64_t entries = uint64_t{1} << l2_bits_;
  const uint64_t keep_clusters = (new_size + cluster_size_ - 1) >> cluster_bits_;
  const uint64_t need = L1EntriesFor(new_size);

  // The last kept L2 table: entries past the new end are cleared.
  const uint64_t first_cut = keep_clusters % entries;
  if (first_cut != 0 && need - 1 < l1_.size() && (l1_[need - 1] & kL1OffsetMask) != 0) {
    KVBLK_CO_ASSIGN_OR_RETURN(TableCache::Handle h, co_await GetL2(need - 1));
    bool any = false;
    for (uint64_t j = first_cut; j < entries && !any; ++j) {
      any = L2Entry(h, j) != 0 || L2Bitmap(h, j) != 0;
    }
    if (any) {
      KVBLK_CO_ASSIGN_OR_RETURN(h, co_await GetL2ForWrite(need - 1));
      for (uint64_t j = first_cut; j < entries; ++j) {
        const uint64_t prev = L2Entry(h, j);
        const uint64_t prev_bitmap = L2Bitmap(h, j);
        if (prev == 0 && prev_bitmap == 0) continue;
        SetL2Entry(h, j, 0, 0);
        FreeOldEntry(prev, prev_bitmap, ((need - 1) << l2_bits_) + j, 0);
      }
      KVBLK_CO_RETURN_IF_ERROR(co_await FlushMetadata());
    }
  }

  // Every L2 table past the end loses the active image's reference, and so
  // does each cluster it names; the old L1 table goes too.
  std::vector<uint64_t> tail;
  if (need < l1_.size()) tail.assign(l1_.begin() + static_cast<long>(need), l1_.end());
  RefDelta drop;
  KVBLK_CO_RETURN_IF_ERROR(co_await CountTreeRefs(tail, false, &drop));
  AddL1TableRefs(header_.l1_table_offset, header_.l1_size, &drop);
  std::vector<uint64_t> kept(l1_.begin(),
                             l1_.begin() + static_cast<long>(std::min<uint64_t>(need, l1_.size())));
  kept.resize(need, 0);
  KVBLK_CO_ASSIGN_OR_RETURN(uint64_t off, co_await WriteNewL1(kept, MetadataKind::kActiveL1));
  KVBLK_CO_RETURN_IF_ERROR(co_await SwitchL1(new_size, kept, off));
  KVBLK_CO_RETURN_IF_ERROR(co_await UpdateCopiedFlags(drop));
  co_return co_await DropRefcounts(drop);
}

}  // namespace kvblk::qcow2
