// Implements disk/qcow2_check_tables.h.
#include "disk/qcow2_check_tables.h"

#include <algorithm>
#include <cinttypes>
#include <cstring>

#include "disk/qcow2_format.h"

namespace kvblk::qcow2::check {

namespace {

constexpr uint64_t kSnapshotFixedBytes = 40;
constexpr uint32_t kMaxSnapshotExtraData = 1024;

constexpr size_t kBitmapExtBytes = 24;
constexpr uint64_t kMaxBitmapDirectoryBytes = 64ull << 20;
constexpr uint32_t kMaxBitmaps = 65535;
constexpr uint64_t kBitmapEntryFixedBytes = 24;
constexpr uint32_t kMaxBitmapNameBytes = 1023;
constexpr uint32_t kMaxBitmapTableEntries = 0x8000000;
constexpr uint64_t kBitmapEntryReservedMask = 0xff000000000001feull;
constexpr uint64_t kBitmapEntryOffsetMask = 0x00fffffffffffe00ull;
constexpr uint64_t kBitmapEntryAllOnes = 1;
// Bitmap table entries read at a time.
constexpr uint64_t kBitmapChunkEntries = 65536;

uint64_t AlignUp8(uint64_t v) { return (v + 7) & ~uint64_t{7}; }

bool BitmapEntryValid(uint64_t entry, uint64_t cluster_size) {
  if (entry & kBitmapEntryReservedMask) return false;
  const uint64_t offset = entry & kBitmapEntryOffsetMask;
  if (offset == 0) return true;
  return !(entry & kBitmapEntryAllOnes) && offset % cluster_size == 0;
}

// Calls `fn(entry)` for every entry of a bitmap table, reading it in chunks
// so that a large table never needs one large buffer.
template <typename Fn>
Status ForEachBitmapEntry(const SyncFile& file, const BitmapDirectory::Bitmap& bm, Fn fn) {
  std::vector<uint8_t> buf;
  for (uint64_t start = 0; start < bm.table_size; start += kBitmapChunkEntries) {
    const uint64_t n = std::min<uint64_t>(kBitmapChunkEntries, bm.table_size - start);
    buf.resize(n * 8);
    KVBLK_RETURN_IF_ERROR(file.ReadAt(buf.data(), buf.size(), bm.table_offset + start * 8));
    for (uint64_t i = 0; i < n; ++i) fn(LoadBe64(&buf[i * 8]));
  }
  return Status::Ok();
}

void MarkRange(const Geometry& geo, uint64_t offset, uint64_t size, std::vector<uint8_t>* meta) {
  if (size == 0 || geo.ExceedsFile(offset, size)) return;
  for (uint64_t c = geo.ClusterOf(offset); c <= geo.ClusterOf(offset + size - 1); ++c) {
    if (c < meta->size()) (*meta)[c] |= kMetaFixed;
  }
}

}  // namespace

Result<SnapshotTable> ReadSnapshotTable(const SyncFile& file, const Header& h) {
  SnapshotTable t;
  uint64_t pos = h.snapshots_offset;
  for (uint32_t i = 0; i < h.nb_snapshots; ++i) {
    auto corrupt = [&](const std::string& what) {
      return Status::Corruption(file.path() + ": snapshot table entry " + std::to_string(i) + ": " +
                                what);
    };
    uint8_t fixed[kSnapshotFixedBytes];
    KVBLK_RETURN_IF_ERROR(file.ReadAt(fixed, sizeof(fixed), pos));
    SnapshotEntry e;
    e.l1_offset = LoadBe64(fixed);
    e.l1_size = LoadBe32(fixed + 8);
    const uint16_t id_len = LoadBe16(fixed + 12);
    const uint16_t name_len = LoadBe16(fixed + 14);
    const uint32_t extra_len = LoadBe32(fixed + 36);
    e.extra_size = extra_len;
    const uint64_t bytes = AlignUp8(kSnapshotFixedBytes + uint64_t{extra_len} + id_len + name_len);
    if (t.bytes + bytes > kMaxSnapshotTableBytes) {
      return corrupt("the snapshot table exceeds " + std::to_string(kMaxSnapshotTableBytes) +
                     " bytes");
    }
    e.raw.resize(bytes);
    KVBLK_RETURN_IF_ERROR(file.ReadAt(e.raw.data(), bytes, pos));
    const char* strings =
        reinterpret_cast<const char*>(e.raw.data()) + kSnapshotFixedBytes + extra_len;
    e.id.assign(strings, id_len);
    e.name.assign(strings + id_len, name_len);
    t.entries.push_back(std::move(e));
    t.bytes += bytes;
    pos += bytes;
    // qemu counts the table up to the end of the last entry, without its
    // padding.
    if (i + 1 == h.nb_snapshots) {
      t.bytes -= bytes - (kSnapshotFixedBytes + uint64_t{extra_len} + id_len + name_len);
    }
  }
  return t;
}

bool SnapshotEntry::ExcessExtra() const { return extra_size > kMaxSnapshotExtraData; }

std::vector<uint8_t> RepairedSnapshotEntry(const SnapshotEntry& e, uint32_t version,
                                           uint64_t disk_size) {
  const uint8_t* old_extra = e.raw.data() + kSnapshotFixedBytes;
  std::vector<uint8_t> extra(old_extra,
                             old_extra + std::min<uint32_t>(e.extra_size, kMaxSnapshotExtraData));
  if (e.Incomplete(version)) {
    uint8_t fields[16];
    if (e.extra_size >= 8) {
      std::copy(old_extra, old_extra + 8, fields);
    } else {
      StoreBe64(fields, LoadBe32(e.raw.data() + 32));  // the 32-bit VM state size
    }
    StoreBe64(fields + 8, disk_size);
    extra.assign(fields, fields + sizeof(fields));
  }
  const size_t strings = e.id.size() + e.name.size();
  std::vector<uint8_t> out(AlignUp8(kSnapshotFixedBytes + extra.size() + strings), 0);
  std::memcpy(out.data(), e.raw.data(), kSnapshotFixedBytes);
  StoreBe32(out.data() + 36, static_cast<uint32_t>(extra.size()));
  std::memcpy(out.data() + kSnapshotFixedBytes, extra.data(), extra.size());
  std::memcpy(out.data() + kSnapshotFixedBytes + extra.size(), old_extra + e.extra_size, strings);
  return out;
}

Result<std::optional<BitmapDirectory>> ReadBitmapDirectory(const SyncFile& file, const Header& h,
                                                           const Geometry& geo) {
  if (!(h.autoclear_features & kAutoclearBitmaps)) return std::optional<BitmapDirectory>();
  const HeaderExtension* ext = nullptr;
  for (const HeaderExtension& e : h.unknown_extensions) {
    if (e.type == kExtBitmaps) ext = &e;
  }
  if (ext == nullptr) return std::optional<BitmapDirectory>();
  auto corrupt = [&](const std::string& what) {
    return Status::Corruption(file.path() + ": bitmaps extension: " + what);
  };
  if (ext->data.size() < kBitmapExtBytes) return corrupt("too short");
  const uint32_t count = LoadBe32(ext->data.data());
  BitmapDirectory dir;
  dir.size = LoadBe64(ext->data.data() + 8);
  dir.offset = LoadBe64(ext->data.data() + 16);
  if (count == 0) return std::optional<BitmapDirectory>();
  if (count > kMaxBitmaps) return corrupt("too many bitmaps (" + std::to_string(count) + ")");
  if (dir.size > kMaxBitmapDirectoryBytes || dir.size < count * kBitmapEntryFixedBytes) {
    return corrupt("invalid directory size " + std::to_string(dir.size));
  }
  if (!geo.Aligned(dir.offset) || dir.offset == 0 || geo.ExceedsFile(dir.offset, dir.size)) {
    return corrupt(Printf("invalid directory offset 0x%" PRIx64, dir.offset));
  }
  std::vector<uint8_t> raw(dir.size);
  KVBLK_RETURN_IF_ERROR(file.ReadAt(raw.data(), raw.size(), dir.offset));
  uint64_t pos = 0;
  for (uint32_t i = 0; i < count; ++i) {
    if (raw.size() - pos < kBitmapEntryFixedBytes) return corrupt("truncated directory");
    const uint8_t* p = raw.data() + pos;
    BitmapDirectory::Bitmap bm;
    bm.table_offset = LoadBe64(p);
    bm.table_size = LoadBe32(p + 8);
    const uint16_t name_len = LoadBe16(p + 18);
    const uint32_t extra_len = LoadBe32(p + 20);
    const uint64_t bytes = AlignUp8(kBitmapEntryFixedBytes + uint64_t{extra_len} + name_len);
    if (bytes > raw.size() - pos) return corrupt("truncated directory");
    if (name_len == 0 || name_len > kMaxBitmapNameBytes) return corrupt("invalid bitmap name");
    if (bm.table_size > kMaxBitmapTableEntries || !geo.Aligned(bm.table_offset) ||
        (bm.table_size != 0 && bm.table_offset == 0)) {
      return corrupt("invalid bitmap table of bitmap " + std::to_string(i));
    }
    dir.bitmaps.push_back(bm);
    pos += bytes;
  }
  return std::optional<BitmapDirectory>(std::move(dir));
}

Status CountBitmapReferences(const ScanContext& ctx, const BitmapDirectory& dir, Findings* out) {
  const Geometry& geo = *ctx.geo;
  CountRegion(ctx, dir.offset, dir.size, out);
  for (const BitmapDirectory::Bitmap& bm : dir.bitmaps) {
    CountRegion(ctx, bm.table_offset, uint64_t{bm.table_size} * 8, out);
    KVBLK_RETURN_IF_ERROR(ForEachBitmapEntry(*ctx.file, bm, [&](uint64_t entry) {
      if (!BitmapEntryValid(entry, geo.cluster_size)) {
        out->Corruption(Printf("ERROR bitmap table entry 0x%" PRIx64 " is invalid", entry));
        return;
      }
      const uint64_t offset = entry & kBitmapEntryOffsetMask;
      if (offset != 0) CountRegion(ctx, offset, geo.cluster_size, out);
    }));
  }
  return Status::Ok();
}

Status MarkBitmapClusters(const SyncFile& file, const Geometry& geo, const BitmapDirectory& dir,
                          std::vector<uint8_t>* meta) {
  MarkRange(geo, dir.offset, dir.size, meta);
  for (const BitmapDirectory::Bitmap& bm : dir.bitmaps) {
    MarkRange(geo, bm.table_offset, uint64_t{bm.table_size} * 8, meta);
    KVBLK_RETURN_IF_ERROR(ForEachBitmapEntry(file, bm, [&](uint64_t entry) {
      const uint64_t offset = entry & kBitmapEntryOffsetMask;
      if (offset != 0 && BitmapEntryValid(entry, geo.cluster_size)) {
        MarkRange(geo, offset, geo.cluster_size, meta);
      }
    }));
  }
  return Status::Ok();
}

}  // namespace kvblk::qcow2::check
