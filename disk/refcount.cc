#include "disk/refcount.h"

#include <algorithm>
#include <cstring>

#include "disk/qcow2_format.h"

namespace kvblk::qcow2 {

uint64_t GetRefcountEntry(const uint8_t* block, uint64_t index, uint32_t order) {
  switch (order) {
    case 0: return (block[index / 8] >> (index % 8)) & 0x1;
    case 1: return (block[index / 4] >> (2 * (index % 4))) & 0x3;
    case 2: return (block[index / 2] >> (4 * (index % 2))) & 0xf;
    case 3: return block[index];
    case 4: return LoadBe16(block + 2 * index);
    case 5: return LoadBe32(block + 4 * index);
    default: return LoadBe64(block + 8 * index);
  }
}

void SetRefcountEntry(uint8_t* block, uint64_t index, uint32_t order, uint64_t value) {
  auto set_bits = [&](uint32_t width) {
    uint32_t per_byte = 8 / width;
    uint32_t shift = width * static_cast<uint32_t>(index % per_byte);
    uint8_t mask = static_cast<uint8_t>(((1u << width) - 1) << shift);
    uint8_t& b = block[index / per_byte];
    b = static_cast<uint8_t>((b & ~mask) | ((value << shift) & mask));
  };
  switch (order) {
    case 0: set_bits(1); break;
    case 1: set_bits(2); break;
    case 2: set_bits(4); break;
    case 3: block[index] = static_cast<uint8_t>(value); break;
    case 4: StoreBe16(block + 2 * index, static_cast<uint16_t>(value)); break;
    case 5: StoreBe32(block + 4 * index, static_cast<uint32_t>(value)); break;
    default: StoreBe64(block + 8 * index, value); break;
  }
}

Refcounts::Refcounts(const Config& cfg)
    : file_(cfg.file), cluster_bits_(cfg.cluster_bits),
      cluster_size_(uint64_t{1} << cfg.cluster_bits), order_(cfg.refcount_order),
      entries_per_block_((uint64_t{1} << cfg.cluster_bits) * 8 >> cfg.refcount_order),
      table_offset_(cfg.table_offset), table_clusters_(cfg.table_clusters),
      switch_table_(cfg.switch_table), guard_(cfg.guard), refuse_(cfg.refuse) {
  cache_ = std::make_unique<TableCache>(
      "refcount block", file_, static_cast<uint32_t>(cluster_size_), cfg.cache_tables,
      [this](uint64_t off, const uint8_t* t) -> Task<Status> {
        return GuardedWrite(t, cluster_size_, off, kIgnoreRefcountBlocks, "refcount block write");
      });
}

Task<Status> Refcounts::GuardedWrite(const void* buf, size_t len, uint64_t offset,
                                     MetadataMask ignore, const char* what) {
  if (guard_ != nullptr) {
    if (auto hit = guard_->Check(offset, len, ignore)) {
      Status why = OverlapError(file_->path() + ": " + what, offset, len, *hit);
      co_return refuse_ ? co_await refuse_(std::move(why)) : why;
    }
  }
  co_return co_await file_->Write(buf, len, offset);
}

Status Refcounts::CheckBlockOffset(uint64_t index, uint64_t off) const {
  if ((off & kReftReservedMask) != 0 || (off & (cluster_size_ - 1)) != 0) {
    return Status::Corruption(file_->path() + ": refcount table entry " + std::to_string(index) +
                              " (offset " + std::to_string(off) +
                              ") is not aligned to a cluster");
  }
  return Status::Ok();
}

Task<Result<std::unique_ptr<Refcounts>>> Refcounts::Load(const Config& cfg, uint64_t file_size) {
  std::unique_ptr<Refcounts> r(new Refcounts(cfg));
  uint64_t bytes = uint64_t{cfg.table_clusters} << cfg.cluster_bits;
  std::vector<uint8_t> raw(bytes);
  KVBLK_CO_RETURN_IF_ERROR(co_await cfg.file->Read(raw.data(), bytes, cfg.table_offset));
  r->table_.resize(bytes / 8);
  for (uint64_t i = 0; i < r->table_.size(); ++i) {
    uint64_t off = LoadBe64(&raw[i * 8]);
    KVBLK_CO_RETURN_IF_ERROR(r->CheckBlockOffset(i, off));
    if (off != 0 && (off >= file_size || file_size - off < r->cluster_size_)) {
      co_return Status::Corruption(cfg.file->path() + ": refcount block " + std::to_string(i) +
                                   " at offset " + std::to_string(off) +
                                   " lies past the end of the file");
    }
    r->table_[i] = off;
  }
  r->file_clusters_ = (file_size + r->cluster_size_ - 1) >> cfg.cluster_bits;
  co_return r;
}

Task<Result<uint64_t>> Refcounts::Get(uint64_t cluster) {
  uint64_t idx = cluster / entries_per_block_;
  if (idx >= table_.size() || table_[idx] == 0) co_return uint64_t{0};
  KVBLK_CO_ASSIGN_OR_RETURN(TableCache::Handle h, co_await cache_->Get(table_[idx]));
  co_return GetRefcountEntry(h.data(), cluster % entries_per_block_, order_);
}

Task<Status> Refcounts::Add(uint64_t cluster, int64_t delta) {
  uint64_t idx = cluster / entries_per_block_;
  if (idx >= table_.size() || table_[idx] == 0) {
    co_return Status::Corruption(file_->path() + ": no refcount block covers cluster " +
                                 std::to_string(cluster) + " (offset " +
                                 std::to_string(cluster << cluster_bits_) + ")");
  }
  KVBLK_CO_ASSIGN_OR_RETURN(TableCache::Handle h, co_await cache_->Get(table_[idx]));
  uint64_t i = cluster % entries_per_block_;
  uint64_t old = GetRefcountEntry(h.data(), i, order_);
  uint64_t now;
  if (delta < 0) {
    uint64_t d = static_cast<uint64_t>(-delta);
    if (old < d) {
      co_return Status::Corruption(file_->path() + ": refcount of cluster at offset " +
                                   std::to_string(cluster << cluster_bits_) +
                                   " would drop below zero");
    }
    now = old - d;
  } else {
    uint64_t d = static_cast<uint64_t>(delta);
    if (MaxRefcount(order_) - old < d) {
      co_return Status::Corruption(file_->path() + ": refcount of cluster at offset " +
                                   std::to_string(cluster << cluster_bits_) +
                                   " would overflow " + std::to_string(1u << order_) + " bits");
    }
    now = old + d;
  }
  SetRefcountEntry(h.data(), i, order_, now);
  h.MarkDirty();
  ++seq_;
  co_return Status::Ok();
}

Task<Status> Refcounts::EnsureDurable(uint64_t seq, bool* synced) {
  if (synced) *synced = false;
  if (durable_seq_ >= seq) co_return Status::Ok();
  co_await durable_mu_.Lock();
  ExclusiveGuard g(&durable_mu_);
  if (durable_seq_ >= seq) co_return Status::Ok();
  uint64_t target = seq_;
  KVBLK_CO_RETURN_IF_ERROR(co_await cache_->Flush());
  KVBLK_CO_RETURN_IF_ERROR(co_await file_->Flush());
  durable_seq_ = std::max(durable_seq_, target);
  if (synced) *synced = true;
  co_return Status::Ok();
}

Task<Result<Refcounts::BlockState>> Refcounts::EnsureBlock(uint64_t cluster) {
  uint64_t idx = cluster / entries_per_block_;
  if (idx >= table_.size()) {
    KVBLK_CO_RETURN_IF_ERROR(co_await GrowTable(idx));
    co_return BlockState::kTableGrew;
  }
  if (table_[idx] != 0) co_return BlockState::kPresent;
  // A block for a range with no block: every cluster in it is free, so the
  // block can describe itself by living in `cluster`.
  uint64_t off = cluster << cluster_bits_;
  std::vector<uint8_t> block(cluster_size_, 0);
  SetRefcountEntry(block.data(), cluster % entries_per_block_, order_, 1);
  KVBLK_CO_RETURN_IF_ERROR(
      co_await GuardedWrite(block.data(), cluster_size_, off, kIgnoreNone, "new refcount block"));
  KVBLK_CO_RETURN_IF_ERROR(co_await file_->Flush());
  uint8_t entry[8];
  StoreBe64(entry, off);
  KVBLK_CO_RETURN_IF_ERROR(co_await GuardedWrite(entry, 8, table_offset_ + idx * 8,
                                                 KindBit(MetadataKind::kRefcountTable),
                                                 "refcount table entry write"));
  table_[idx] = off;
  if (guard_ != nullptr) {
    KVBLK_CO_RETURN_IF_ERROR(guard_->Add(off, cluster_size_, MetadataKind::kRefcountBlock));
  }
  NoteFileClusters(cluster + 1);
  KVBLK_CO_ASSIGN_OR_RETURN(TableCache::Handle h, co_await cache_->Insert(off, block.data()));
  (void)h;
  ++seq_;
  co_return BlockState::kPlacedAt;
}

Task<Status> Refcounts::GrowTable(uint64_t need_index) {
  const uint64_t e = entries_per_block_;
  const uint64_t old_entries = table_.size();
  const uint64_t start = file_clusters_;  // new structures go at the end
  uint64_t nblocks = 0;
  uint64_t tclusters = 0;
  uint64_t new_entries = 0;
  for (int iter = 0; iter < 64; ++iter) {
    uint64_t end = start + nblocks + tclusters;  // one past the last new cluster
    new_entries = std::max<uint64_t>({need_index + 1, old_entries + old_entries / 2 + 1,
                                      end == 0 ? 1 : (end - 1) / e + 1});
    uint64_t t2 = (new_entries * 8 + cluster_size_ - 1) >> cluster_bits_;
    uint64_t last = start + nblocks + t2 - 1;
    uint64_t b2 = 0;
    for (uint64_t r = start / e; r <= last / e; ++r) {
      if (r >= old_entries || table_[r] == 0) ++b2;
    }
    if (b2 == nblocks && t2 == tclusters) break;
    nblocks = b2;
    tclusters = t2;
  }
  if ((tclusters << cluster_bits_) > kMaxRefcountTableBytes) {
    co_return Status::NotSupported(file_->path() +
                                   ": image too large: refcount table would exceed " +
                                   std::to_string(kMaxRefcountTableBytes) + " bytes");
  }
  new_entries = (tclusters << cluster_bits_) / 8;
  std::vector<uint64_t> table = table_;
  table.resize(new_entries, 0);
  const uint64_t end = start + nblocks + tclusters;

  // New blocks, each counting the new clusters that fall in its range.
  uint64_t placed = 0;
  std::vector<uint8_t> block(cluster_size_);
  for (uint64_t r = start / e; r <= (end - 1) / e; ++r) {
    if (r < old_entries && table_[r] != 0) continue;
    uint64_t boff = (start + placed) << cluster_bits_;
    std::fill(block.begin(), block.end(), 0);
    for (uint64_t c = std::max(start, r * e); c < std::min(end, (r + 1) * e); ++c) {
      SetRefcountEntry(block.data(), c - r * e, order_, 1);
    }
    KVBLK_CO_RETURN_IF_ERROR(co_await GuardedWrite(block.data(), cluster_size_, boff, kIgnoreNone,
                                                   "new refcount block"));
    KVBLK_CO_ASSIGN_OR_RETURN(TableCache::Handle h, co_await cache_->Insert(boff, block.data()));
    (void)h;
    table[r] = boff;
    ++placed;
  }
  // Clusters of the new structures that fall in ranges that already had a
  // block are counted there.
  for (uint64_t c = start; c < end; ++c) {
    uint64_t r = c / e;
    if (r < old_entries && table_[r] != 0) {
      KVBLK_CO_ASSIGN_OR_RETURN(TableCache::Handle h, co_await cache_->Get(table_[r]));
      SetRefcountEntry(h.data(), c - r * e, order_, 1);
      h.MarkDirty();
    }
  }
  KVBLK_CO_RETURN_IF_ERROR(co_await cache_->Flush());
  uint64_t toff = (start + nblocks) << cluster_bits_;
  std::vector<uint8_t> raw(tclusters << cluster_bits_, 0);
  for (uint64_t i = 0; i < table.size(); ++i) StoreBe64(&raw[i * 8], table[i]);
  KVBLK_CO_RETURN_IF_ERROR(
      co_await GuardedWrite(raw.data(), raw.size(), toff, kIgnoreNone, "new refcount table"));
  KVBLK_CO_RETURN_IF_ERROR(co_await file_->Flush());
  KVBLK_CO_RETURN_IF_ERROR(co_await switch_table_(toff, static_cast<uint32_t>(tclusters)));

  uint64_t old_off = table_offset_;
  uint32_t old_clusters = table_clusters_;
  if (guard_ != nullptr) {
    // The guard follows table_: new blocks and table in, old table out.
    for (uint64_t r = 0; r < table.size(); ++r) {
      if (table[r] != 0 && (r >= old_entries || table_[r] == 0)) {
        KVBLK_CO_RETURN_IF_ERROR(guard_->Add(table[r], cluster_size_, MetadataKind::kRefcountBlock));
      }
    }
    KVBLK_CO_RETURN_IF_ERROR(
        guard_->Add(toff, tclusters << cluster_bits_, MetadataKind::kRefcountTable));
    KVBLK_CO_RETURN_IF_ERROR(guard_->Remove(old_off, uint64_t{old_clusters} << cluster_bits_,
                                            MetadataKind::kRefcountTable));
  }
  table_ = std::move(table);
  table_offset_ = toff;
  table_clusters_ = static_cast<uint32_t>(tclusters);
  NoteFileClusters(end);
  ++seq_;
  // Nothing refers to the old table any more: free it.
  for (uint32_t i = 0; i < old_clusters; ++i) {
    KVBLK_CO_RETURN_IF_ERROR(co_await Add((old_off >> cluster_bits_) + i, -1));
  }
  co_return Status::Ok();
}

}  // namespace kvblk::qcow2
