// Implements disk/qcow2_check_refcounts.h.
#include "disk/qcow2_check_refcounts.h"

#include <algorithm>
#include <map>

#include "disk/qcow2_format.h"
#include "disk/refcount.h"

namespace kvblk::qcow2::check {

namespace {

uint64_t DivRoundUp(uint64_t a, uint64_t b) { return a / b + (a % b != 0); }

}  // namespace

Result<std::unique_ptr<StoredRefcounts>> StoredRefcounts::Load(const SyncFile& file,
                                                               const Geometry& geo,
                                                               uint64_t table_offset,
                                                               uint32_t table_clusters,
                                                               uint64_t preload_clusters) {
  std::unique_ptr<StoredRefcounts> s(new StoredRefcounts(file, geo));
  const uint64_t bytes = uint64_t{table_clusters} << geo.cluster_bits;
  if (bytes > kMaxRefcountTableBytes) {
    return Status::Corruption(file.path() + ": refcount table of " + std::to_string(bytes) +
                              " bytes exceeds the limit");
  }
  std::vector<uint8_t> raw(bytes);
  KVBLK_RETURN_IF_ERROR(file.ReadAt(raw.data(), raw.size(), table_offset));
  s->table_.resize(bytes / 8);
  for (uint64_t i = 0; i < s->table_.size(); ++i) s->table_[i] = LoadBe64(&raw[i * 8]);

  const uint64_t preload_blocks =
      std::min<uint64_t>(s->table_.size(), DivRoundUp(preload_clusters, s->entries_per_block_));
  s->blocks_.resize(preload_blocks);
  for (uint64_t i = 0; i < preload_blocks; ++i) {
    const uint64_t off = s->BlockOffset(i);
    if (off == 0 || !geo.Aligned(off)) continue;
    s->blocks_[i].resize(geo.cluster_size);
    // A block that cannot be read at all (an offset beyond what the file
    // system accepts) makes its refcounts unreadable, as in qemu; blocks
    // merely past the end of the file read as zeros.
    if (!file.ReadAt(s->blocks_[i].data(), geo.cluster_size, off).ok()) {
      s->blocks_[i].clear();
      s->unreadable_.insert(i);
    }
  }
  return s;
}

uint64_t StoredRefcounts::BlockOffset(uint64_t index) const {
  return table_[index] & kReftOffsetMask;
}

std::optional<uint64_t> StoredRefcounts::Get(uint64_t cluster) const {
  const uint64_t index = cluster / entries_per_block_;
  if (index >= table_.size()) return 0;
  const uint64_t off = BlockOffset(index);
  if (off == 0) return 0;
  if (!geo_.Aligned(off) || unreadable_.count(index)) return std::nullopt;
  const uint64_t in_block = cluster % entries_per_block_;
  if (index < blocks_.size() && !blocks_[index].empty()) {
    return GetRefcountEntry(blocks_[index].data(), in_block, geo_.refcount_order);
  }
  // A block not preloaded (it covers clusters past the end of the file):
  // read just the bytes that hold this entry.
  const uint32_t order = geo_.refcount_order;
  const uint64_t byte = (in_block << order) / 8;
  const size_t width = order >= 3 ? (size_t{1} << order) / 8 : 1;
  uint8_t buf[8] = {};
  if (!file_.ReadAt(buf, width, off + byte).ok()) return std::nullopt;
  const uint64_t index_in_buf = order >= 3 ? 0 : in_block % (8u >> order);
  return GetRefcountEntry(buf, index_in_buf, order);
}

bool StoredRefcounts::Covered(uint64_t cluster) const {
  const uint64_t index = cluster / entries_per_block_;
  if (index >= table_.size()) return false;
  const uint64_t off = BlockOffset(index);
  return off != 0 && geo_.Aligned(off) && index < blocks_.size() && !blocks_[index].empty();
}

Status StoredRefcounts::Apply(SyncFile* file,
                              const std::vector<std::pair<uint64_t, uint64_t>>& changes) {
  std::map<uint64_t, bool> touched;  // table index -> written
  for (const auto& [cluster, value] : changes) {
    if (!Covered(cluster)) {
      return Status::Corruption(file->path() + ": no refcount block covers cluster " +
                                std::to_string(cluster));
    }
    const uint64_t index = cluster / entries_per_block_;
    SetRefcountEntry(blocks_[index].data(), cluster % entries_per_block_, geo_.refcount_order,
                     std::min(value, MaxRefcount(geo_.refcount_order)));
    touched[index] = true;
  }
  for (const auto& [index, unused] : touched) {
    KVBLK_RETURN_IF_ERROR(
        file->WriteAt(blocks_[index].data(), geo_.cluster_size, BlockOffset(index)));
  }
  return Status::Ok();
}

Result<NewRefcountStructure> WriteNewRefcountStructure(
    SyncFile* file, const Geometry& geo, uint64_t end_cluster,
    const std::function<uint64_t(uint64_t)>& refcount, const std::vector<uint8_t>& prefix) {
  const uint64_t cs = geo.cluster_size;
  const uint64_t per_block = (cs * 8) >> geo.refcount_order;
  const uint64_t prefix_clusters = DivRoundUp(prefix.size(), cs);
  const uint64_t base = end_cluster + prefix_clusters;  // first new refcount block

  // Block ranges with a cluster in use below end_cluster.
  std::vector<bool> used(DivRoundUp(end_cluster, per_block), false);
  for (uint64_t c = 0; c < end_cluster; ++c) {
    if (!used[c / per_block] && refcount(c) != 0) used[c / per_block] = true;
  }
  const uint64_t used_below = static_cast<uint64_t>(std::count(used.begin(), used.end(), true));

  // The new clusters (prefix, blocks, table) need blocks too, and the table
  // must cover every block: iterate until the sizes settle.
  uint64_t blocks = 0;
  uint64_t table_clusters = 1;
  uint64_t end = 0;
  for (int round = 0;; ++round) {
    if (round == 64) return Status::Corruption(file->path() + ": refcount layout did not settle");
    end = base + blocks + table_clusters;
    uint64_t need = used_below;
    for (uint64_t b = end_cluster / per_block; b <= (end - 1) / per_block; ++b) {
      if (b >= used.size() || !used[b]) ++need;
    }
    const uint64_t entries = (end - 1) / per_block + 1;
    const uint64_t tclusters = std::max<uint64_t>(1, DivRoundUp(entries * 8, cs));
    if (need == blocks && tclusters == table_clusters) break;
    blocks = need;
    table_clusters = tclusters;
  }
  if (table_clusters * cs > kMaxRefcountTableBytes) {
    return Status::NotSupported(file->path() + ": a refcount table for " + std::to_string(end) +
                                " clusters would exceed " + std::to_string(kMaxRefcountTableBytes) +
                                " bytes");
  }

  NewRefcountStructure out;
  if (!prefix.empty()) {
    out.prefix_offset = end_cluster * cs;
    std::vector<uint8_t> padded(prefix);
    padded.resize(prefix_clusters * cs, 0);
    KVBLK_RETURN_IF_ERROR(file->WriteAt(padded.data(), padded.size(), out.prefix_offset));
  }
  std::vector<uint8_t> table(table_clusters * cs, 0);
  std::vector<uint8_t> block(cs);
  const uint64_t max = MaxRefcount(geo.refcount_order);
  uint64_t next_block = base;
  for (uint64_t b = 0; b <= (end - 1) / per_block; ++b) {
    const bool has_new = (b + 1) * per_block > end_cluster;
    if (!(b < used.size() && used[b]) && !has_new) continue;
    std::fill(block.begin(), block.end(), 0);
    const uint64_t first = b * per_block;
    const uint64_t last = std::min(end, first + per_block);
    for (uint64_t c = first; c < last; ++c) {
      const uint64_t v = c < end_cluster ? refcount(c) : 1;
      if (v != 0) SetRefcountEntry(block.data(), c - first, geo.refcount_order, std::min(v, max));
    }
    const uint64_t off = next_block * cs;
    KVBLK_RETURN_IF_ERROR(file->WriteAt(block.data(), cs, off));
    StoreBe64(&table[b * 8], off);
    ++next_block;
  }
  if (next_block != base + blocks) {
    return Status::Corruption(file->path() + ": refcount block count mismatch while rebuilding");
  }
  out.table_offset = (base + blocks) * cs;
  out.table_clusters = static_cast<uint32_t>(table_clusters);
  KVBLK_RETURN_IF_ERROR(file->WriteAt(table.data(), table.size(), out.table_offset));
  out.end_offset = end * cs;
  return out;
}

}  // namespace kvblk::qcow2::check
