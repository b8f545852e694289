// Qcow2Device: opening, metadata (L1/L2), flush, close, info.
// The data path (read, write, discard, write zeroes) is in qcow2_io.cc.
#include "disk/qcow2_device.h"

#include <algorithm>
#include <cstring>

#include "disk/qcow2_check.h"
#include "disk/qcow2_create.h"
#include "disk/raw_device.h"
#include "kvblk/event_loop.h"

namespace kvblk {
namespace qcow2 {

namespace {

constexpr uint64_t kDefaultL2CacheMax = 32ull << 20;
constexpr uint64_t kDefaultRefcountCache = 1ull << 20;
constexpr uint64_t kPoolBytes = 64ull << 20;

// Resolves a backing file name relative to the image that names it, the way
// qemu does: absolute names stay, relative ones are joined to the image's
// directory ("x.qcow2" next to "img.qcow2" stays "x.qcow2").
std::string ResolveBacking(const std::string& image, const std::string& name) {
  if (name.empty() || name[0] == '/') return name;
  auto slash = image.rfind('/');
  if (slash == std::string::npos) return name;
  return image.substr(0, slash + 1) + name;
}

}  // namespace

Qcow2Device::Qcow2Device(std::unique_ptr<File> file, Header header, const OpenOptions& opts)
    : file_(std::move(file)),
      read_only_(opts.read_only || file_->read_only()),
      cluster_bits_(header.cluster_bits),
      cluster_size_(header.cluster_size()),
      l2_bits_(header.cluster_bits - (header.extended_l2() ? 4 : 3)),
      header_(std::move(header)),
      opts_(opts),
      home_(&EventLoop::Current()) {}

Qcow2Device::~Qcow2Device() = default;

Task<Result<std::unique_ptr<Qcow2Device>>> Qcow2Device::Open(std::unique_ptr<File> file,
                                                             const OpenOptions& opts, int depth) {
  KVBLK_CO_ASSIGN_OR_RETURN(uint64_t file_size, file->Size());
  std::vector<uint8_t> first(std::min<uint64_t>(file_size, 1ull << kMaxClusterBits));
  KVBLK_CO_RETURN_IF_ERROR(co_await file->Read(first.data(), first.size(), 0));
  KVBLK_CO_ASSIGN_OR_RETURN(Header h, DecodeHeader(first, file_size, file->path()));
  const std::string& path = file->path();
  bool writable = !opts.read_only && !file->read_only();
  if (writable && h.corrupt()) {
    co_return Status::Corruption(path + ": image is marked corrupt; it can only be opened "
                                        "read-only (repair it with 'qemu-img check -r all')");
  }
  if (writable && h.dirty()) {
    // Not closed cleanly with lazy refcounts: rebuild the refcounts from the
    // L1/L2 tables before anything is written, then read the header again
    // (the repair may move the refcount table and clears the dirty bit).
    Status rs = RepairRefcountsIfDirty(path);
    if (!rs.ok()) {
      co_return rs.WithContext(path + ": image was not closed cleanly and its refcounts could "
                                      "not be repaired");
    }
    KVBLK_CO_ASSIGN_OR_RETURN(file_size, file->Size());
    first.assign(std::min<uint64_t>(file_size, 1ull << kMaxClusterBits), 0);
    KVBLK_CO_RETURN_IF_ERROR(co_await file->Read(first.data(), first.size(), 0));
    KVBLK_CO_ASSIGN_OR_RETURN(h, DecodeHeader(first, file_size, path));
    if (h.dirty()) {
      co_return Status::Corruption(path + ": dirty bit still set after refcount repair");
    }
  }
  std::unique_ptr<Qcow2Device> dev(new Qcow2Device(std::move(file), std::move(h), opts));
  KVBLK_CO_RETURN_IF_ERROR(co_await dev->Load(file_size, depth));
  co_return dev;
}

Task<Status> Qcow2Device::Load(uint64_t file_size, int depth) {
  const std::string& path = file_->path();
  // L1 table (bounds were validated by DecodeHeader).
  l1_.resize(header_.l1_size);
  if (header_.l1_size > 0) {
    std::vector<uint8_t> raw(uint64_t{header_.l1_size} * 8);
    KVBLK_CO_RETURN_IF_ERROR(co_await file_->Read(raw.data(), raw.size(),
                                                  header_.l1_table_offset));
    for (uint32_t i = 0; i < header_.l1_size; ++i) l1_[i] = LoadBe64(&raw[i * 8ull]);
  }

  // Refcounts.
  Refcounts::Config rc;
  rc.file = file_.get();
  rc.cluster_bits = cluster_bits_;
  rc.refcount_order = header_.refcount_order;
  rc.table_offset = header_.refcount_table_offset;
  rc.table_clusters = header_.refcount_table_clusters;
  uint64_t rc_bytes = opts_.refcount_cache_bytes ? opts_.refcount_cache_bytes
                                                 : kDefaultRefcountCache;
  rc.cache_tables = std::max<uint64_t>(4, rc_bytes / cluster_size_);
  // A coroutine (co_await, not return): `buf` must live in its frame until
  // the lazily started UpdateHeaderField has written it.
  rc.switch_table = [this](uint64_t off, uint32_t clusters) -> Task<Status> {
    uint8_t buf[12];
    StoreBe64(buf, off);
    StoreBe32(buf + 8, clusters);
    KVBLK_CO_RETURN_IF_ERROR(co_await UpdateHeaderField(48, buf, sizeof(buf)));
    // Only a header that reached the disk changes what we believe.
    header_.refcount_table_offset = off;
    header_.refcount_table_clusters = clusters;
    co_return Status::Ok();
  };
  if (!read_only_ && opts_.overlap_check) {
    guard_ = std::make_unique<OverlapGuard>(cluster_bits_);
    rc.guard = guard_.get();
    rc.refuse = [this](Status why) { return SignalCorruption(std::move(why)); };
  }
  KVBLK_CO_ASSIGN_OR_RETURN(refcounts_, co_await Refcounts::Load(rc, file_size));
  alloc_ = std::make_unique<Allocator>(refcounts_.get(), file_.get(), cluster_bits_);
  // Pre-allocate up to 64 MiB of clusters (at least 4, at most 1024).
  if (!read_only_) alloc_->EnablePool(std::clamp<uint64_t>(kPoolBytes >> cluster_bits_, 4, 1024));
  // Open() repaired a dirty image before we got here.
  lazy_refcounts_ = !read_only_ && header_.lazy_refcounts();
  marked_dirty_ = header_.dirty();

  // L2 cache: by default large enough to cover the whole disk, up to 32 MiB.
  uint64_t entries = uint64_t{1} << l2_bits_;
  uint64_t tables_needed = (header_.size + (cluster_size_ * entries) - 1) / (cluster_size_ * entries);
  uint64_t l2_bytes = opts_.l2_cache_bytes;
  if (l2_bytes == 0) l2_bytes = std::min(kDefaultL2CacheMax, tables_needed * cluster_size_);
  l2_cache_ = std::make_unique<TableCache>(
      "L2", file_.get(), static_cast<uint32_t>(cluster_size_),
      std::max<uint64_t>(2, l2_bytes / cluster_size_),
      [this](uint64_t off, const uint8_t* t) { return WriteL2Table(off, t); });

  // Snapshot table.
  if (header_.nb_snapshots > 0) {
    uint64_t avail = file_size - header_.snapshots_offset;
    uint64_t want = std::min<uint64_t>({avail, kMaxSnapshotTableBytes, 65536});
    for (;;) {
      std::vector<uint8_t> buf(want);
      KVBLK_CO_RETURN_IF_ERROR(co_await file_->Read(buf.data(), want, header_.snapshots_offset));
      auto snaps = DecodeSnapshotTable(buf, header_.nb_snapshots, cluster_bits_, file_size, path);
      if (snaps.ok()) {
        snapshots_ = std::move(*snaps);
        break;
      }
      uint64_t next = std::min<uint64_t>({avail, kMaxSnapshotTableBytes, want * 4});
      if (next == want) co_return snaps.status();
      want = next;
    }
  }
  // Everything the guard protects is known now (and nothing was written).
  KVBLK_CO_RETURN_IF_ERROR(co_await RebuildOverlapGuard());

  // Backing file.
  if (!header_.backing_file.empty() && opts_.open_backing) {
    if (depth + 1 > opts_.max_backing_depth) {
      co_return Status::NotSupported(path + ": backing chain is deeper than " +
                                     std::to_string(opts_.max_backing_depth) + " images");
    }
    backing_path_ = ResolveBacking(path, header_.backing_file);
    OpenOptions bo = opts_;
    bo.read_only = true;
    bo.format = header_.backing_format;
    bo.l2_cache_bytes = 0;
    auto b = co_await OpenImageAsync(backing_path_, bo, depth + 1);
    if (!b.ok()) {
      co_return b.status().WithContext(path + ": could not open backing file '" +
                                       header_.backing_file + "'");
    }
    backing_ = std::move(*b);
  }

  // Autoclear bits kvblk does not maintain are cleared on a writable open,
  // as the spec requires of an implementation that does not know them.
  if (!read_only_ && header_.version >= 3 && header_.autoclear_features != 0) {
    header_.autoclear_features = 0;
    KVBLK_CO_RETURN_IF_ERROR(co_await RewriteHeader());
  }
  co_return Status::Ok();
}

Status Qcow2Device::CheckRequest(uint64_t offset, uint64_t length, bool write) const {
  if (RequestValid(offset, length, write)) return Status::Ok();
  if (closed_) return Status::InvalidArgument(file_->path() + ": device is closed");
  if (write && read_only_) return Status::ReadOnly(file_->path() + ": image is read-only");
  if (offset > header_.size || length > header_.size - offset) {
    return Status::InvalidArgument(file_->path() + ": request at offset " +
                                   std::to_string(offset) + " length " + std::to_string(length) +
                                   " is past the end of the disk (" +
                                   std::to_string(header_.size) + " bytes)");
  }
  return Status::Ok();
}

Status Qcow2Device::CorruptionAt(uint64_t gc, const std::string& what) const {
  return Status::Corruption(file_->path() + ": " + what + " (guest offset " +
                            std::to_string(gc << cluster_bits_) + ")");
}

// --- L1 / L2 --------------------------------------------------------------

uint64_t Qcow2Device::L2Entry(const TableCache::Handle& h, uint64_t index) const {
  return LoadBe64(h.data() + index * header_.l2_entry_size());
}

uint64_t Qcow2Device::L2Bitmap(const TableCache::Handle& h, uint64_t index) const {
  if (!header_.extended_l2()) return 0;
  return LoadBe64(h.data() + index * 16 + 8);
}

void Qcow2Device::SetL2Entry(TableCache::Handle& h, uint64_t index, uint64_t value,
                             uint64_t bitmap) {
  // Other threads may be reading this table (TableCache::Peek); descriptor
  // and bitmap change in one critical section.
  const bool extended = header_.extended_l2();
  const uint64_t at = index * header_.l2_entry_size();
  l2_cache_->Modify(h, [&](uint8_t* table) {
    StoreBe64(table + at, value);
    if (extended) StoreBe64(table + at + 8, bitmap);
  });
}

void Qcow2Device::IoPins::AddOther(const Mapping& m, uint32_t cluster_bits) {
  if (m.type == Mapping::Type::kNormal ||
      (m.type == Mapping::Type::kSubclusters && m.sub_alloc != 0)) {
    Pin(m.host >> cluster_bits);
  } else if (m.type == Mapping::Type::kCompressed) {
    uint64_t first = m.comp_offset >> cluster_bits;
    uint64_t last = (m.comp_offset + m.comp_length - 1) >> cluster_bits;
    for (uint64_t c = first; c <= last; ++c) Pin(c);
  }
}

Result<Qcow2Device::Mapping> Qcow2Device::Decode(uint64_t entry, uint64_t bitmap,
                                                 uint64_t gc) const {
  Mapping m;
  const bool extended = header_.extended_l2();
  if (entry & kOflagCompressed) {
    if (entry & kOflagCopied) {
      return CorruptionAt(gc, "compressed cluster has the COPIED flag set");
    }
    if (extended && bitmap != 0) {
      // qcow2.rst: the bitmap of a compressed cluster is reserved (0).
      return CorruptionAt(gc, "compressed cluster has a non-zero subcluster bitmap");
    }
    int x = CompressedOffsetBits(cluster_bits_);
    uint64_t off = entry & ((uint64_t{1} << x) - 1);
    uint64_t sectors = ((entry >> x) & ((uint64_t{1} << (62 - x)) - 1)) + 1;
    m.type = Mapping::Type::kCompressed;
    m.comp_offset = off;
    m.comp_length = sectors * 512 - (off & 511);
    if (off == 0) return CorruptionAt(gc, "compressed cluster at host offset 0");
    return m;
  }
  // With extended entries bit 0 has no meaning (the bitmap says what reads
  // as zero); it is ignored as qemu does and never written.
  if (extended) entry &= ~kOflagZero;
  if (entry & kL2StdReservedMask) {
    return CorruptionAt(gc, "L2 entry 0x" + [&] {
      char b[32];
      snprintf(b, sizeof b, "%016llx", static_cast<unsigned long long>(entry));
      return std::string(b);
    }() + " has reserved bits set");
  }
  uint64_t host = entry & kL2OffsetMask;
  if (host & (cluster_size_ - 1)) {
    return CorruptionAt(gc, "cluster allocation offset " + std::to_string(host) +
                                " is not aligned to the cluster size");
  }
  m.host = host;
  m.copied = (entry & kOflagCopied) != 0;
  if ((entry & kOflagZero) && header_.version < 3) {
    // qcow2.rst: "With version 2 ... this is always 0".
    return CorruptionAt(gc, "L2 entry has the zero flag set in a version 2 image");
  }
  if (extended) {
    m.sub_alloc = SubclusterAllocBits(bitmap);
    m.sub_zero = SubclusterZeroBits(bitmap);
    if (m.sub_alloc & m.sub_zero) {
      return CorruptionAt(gc, "subcluster bitmap marks a subcluster both allocated and zero");
    }
    if (m.sub_alloc != 0 && host == 0) {
      return CorruptionAt(gc, "allocated subclusters without a host cluster");
    }
    if (m.sub_alloc == kSubclusterAll) {
      m.type = Mapping::Type::kNormal;
    } else if (m.sub_zero == kSubclusterAll) {
      m.type = Mapping::Type::kZero;
    } else if (m.sub_alloc == 0 && m.sub_zero == 0) {
      m.type = Mapping::Type::kUnallocated;
    } else {
      m.type = Mapping::Type::kSubclusters;
    }
    return m;
  }
  if (entry & kOflagZero) {
    m.type = Mapping::Type::kZero;
    m.sub_zero = kSubclusterAll;
  } else if (host != 0) {
    m.type = Mapping::Type::kNormal;
    m.sub_alloc = kSubclusterAll;
  } else {
    m.type = Mapping::Type::kUnallocated;
  }
  return m;
}

Task<Result<TableCache::Handle>> Qcow2Device::GetL2(uint64_t l1_index) {
  uint64_t entry = L1Entry(l1_index);
  if (entry & kL1ReservedMask) {
    co_return co_await SignalCorruption(Status::Corruption(
        file_->path() + ": L1 entry " + std::to_string(l1_index) + " has reserved bits set"));
  }
  uint64_t off = entry & kL1OffsetMask;
  if (off == 0) co_return TableCache::Handle();
  if (off & (cluster_size_ - 1)) {
    co_return co_await SignalCorruption(Status::Corruption(
        file_->path() + ": L2 table offset " + std::to_string(off) + " in L1 entry " +
        std::to_string(l1_index) + " is not aligned to a cluster"));
  }
  if ((off >> cluster_bits_) >= refcounts_->file_clusters()) {
    co_return co_await SignalCorruption(Status::Corruption(
        file_->path() + ": L2 table offset " + std::to_string(off) + " in L1 entry " +
        std::to_string(l1_index) + " lies past the end of the file"));
  }
  co_return co_await l2_cache_->Get(off);
}

KVBLK_HOT bool Qcow2Device::TryLookupCached(uint64_t gc, Mapping* m, IoPins* pins) const {
  const uint64_t l1i = gc >> l2_bits_;
  if (l1i >= l1_.size()) {  // l1_ is resized only under image_lock_ exclusive
    *m = Mapping{};
    return true;
  }
  const uint64_t entry = L1Entry(l1i);
  const uint64_t off = entry & kL1OffsetMask;
  if ((entry & kL1ReservedMask) || (off & (cluster_size_ - 1))) return false;  // home reports it
  if (off == 0) {
    *m = Mapping{};
    return true;
  }
  const uint64_t at = (gc & ((uint64_t{1} << l2_bits_) - 1)) * header_.l2_entry_size();
  const bool extended = header_.extended_l2();
  bool valid = false;
  bool hit = l2_cache_->Peek(off, [&](const uint8_t* table) {
    const uint64_t entry = LoadBe64(table + at);
    const uint64_t bitmap = extended ? LoadBe64(table + at + 8) : 0;
    if (!DecodeNormal(entry, bitmap, m)) {
      Result<Mapping> r = Decode(entry, bitmap, gc);
      if (!r.ok()) return;
      *m = *r;
    }
    valid = true;
    if (pins) pins->Add(*m, cluster_bits_);
  });
  return hit && valid;
}

size_t Qcow2Device::ExtendCachedRun(uint64_t pos, uint64_t end, size_t n, const Mapping& m,
                                    IoPins* pins) const {
  const uint64_t gc = pos >> cluster_bits_;
  for (uint64_t k = 1; pos + n < end; ++k) {
    Mapping next;
    if (!TryLookupCached(gc + k, &next, pins)) break;
    if (next.type != Mapping::Type::kNormal || next.host != m.host + k * cluster_size_) break;
    n += static_cast<size_t>(std::min(cluster_size_, end - pos - n));
  }
  return n;
}

Task<Result<Qcow2Device::Mapping>> Qcow2Device::LookupHome(uint64_t gc, IoPins* pins) {
  uint64_t l1i = gc >> l2_bits_;
  if (l1i >= l1_.size()) co_return Mapping{};
  KVBLK_CO_ASSIGN_OR_RETURN(TableCache::Handle h, co_await GetL2(l1i));
  if (!h) co_return Mapping{};
  const uint64_t idx = gc & ((uint64_t{1} << l2_bits_) - 1);
  auto m = Decode(L2Entry(h, idx), L2Bitmap(h, idx), gc);
  if (!m.ok()) co_return co_await SignalCorruption(m.status());
  // No suspension since the lookup: frees happen on this loop, so the
  // mapping is still current when its clusters are pinned.
  if (pins) pins->Add(*m, cluster_bits_);
  co_return *m;
}

Task<Result<Qcow2Device::Mapping>> Qcow2Device::Lookup(uint64_t gc, IoPins* pins) {
  Mapping m;
  if (TryLookupCached(gc, &m, pins)) co_return m;
  if (&EventLoop::Current() == home_) co_return co_await LookupHome(gc, pins);
  co_return co_await OnHome(LookupHome(gc, pins));
}

Task<Status> Qcow2Device::WriteL1Entry(uint64_t l1_index, uint64_t value) {
  uint8_t buf[8];
  StoreBe64(buf, value);
  const uint64_t at = header_.l1_table_offset + l1_index * 8;
  if (Status ov = GuardCheck("L1 entry write", at, 8, KindBit(MetadataKind::kActiveL1));
      !ov.ok()) {
    co_return co_await RefuseWrite(std::move(ov));
  }
  KVBLK_CO_RETURN_IF_ERROR(co_await file_->Write(buf, 8, at));
  std::atomic_ref<uint64_t>(l1_[l1_index]).store(value, std::memory_order_release);
  co_return Status::Ok();
}

Task<Status> Qcow2Device::WriteL2Table(uint64_t offset, const uint8_t* table) {
  // Every cluster this copy of the table points to got its refcount, and
  // its data if newly allocated, before now; make both durable before the
  // table can reach the disk.
  const uint64_t data_target = data_written_seq_;
  bool synced = false;
  if (lazy_refcounts_) {
    // The refcounts may lag on disk; the dirty bit says so.
    KVBLK_CO_RETURN_IF_ERROR(co_await MarkDirty());
  } else {
    KVBLK_CO_RETURN_IF_ERROR(co_await refcounts_->EnsureDurable(refcounts_->seq(), &synced));
  }
  if (synced) data_synced_seq_ = std::max(data_synced_seq_, data_target);
  if (data_synced_seq_ < data_target) {
    KVBLK_CO_RETURN_IF_ERROR(co_await file_->Flush());
    data_synced_seq_ = std::max(data_synced_seq_, data_target);
  }
  // The table may be shared with a snapshot (COPIED flags rewritten).
  if (Status ov = GuardCheck("L2 table write", offset, cluster_size_, kIgnoreL2); !ov.ok()) {
    co_return co_await RefuseWrite(std::move(ov));
  }
  co_return co_await file_->Write(table, cluster_size_, offset);
}

Task<Result<TableCache::Handle>> Qcow2Device::GetL2ForWrite(uint64_t l1_index) {
  uint64_t entry = L1Entry(l1_index);
  if ((entry & kOflagCopied) && (entry & kL1OffsetMask)) co_return co_await GetL2(l1_index);
  co_await l1_mu_.Lock();
  ExclusiveGuard g(&l1_mu_);
  entry = L1Entry(l1_index);
  if ((entry & kOflagCopied) && (entry & kL1OffsetMask)) co_return co_await GetL2(l1_index);

  std::vector<uint8_t> table(cluster_size_, 0);
  uint64_t old_off = entry & kL1OffsetMask;
  if (old_off != 0) {  // shared with a snapshot: copy it
    KVBLK_CO_ASSIGN_OR_RETURN(TableCache::Handle old, co_await GetL2(l1_index));
    std::memcpy(table.data(), old.data(), cluster_size_);
  }
  KVBLK_CO_ASSIGN_OR_RETURN(Allocator::Run run, co_await alloc_->Allocate(1));
  uint64_t new_off = run.offset;
  if (Status ov = GuardCheck("new L2 table", new_off, cluster_size_, kIgnoreNone); !ov.ok()) {
    co_return co_await RefuseWrite(std::move(ov));
  }
  KVBLK_CO_RETURN_IF_ERROR(co_await file_->Write(table.data(), cluster_size_, new_off));
  // The table and its refcount (with lazy refcounts: the dirty bit) must
  // be durable before the L1 entry is.
  if (lazy_refcounts_) {
    KVBLK_CO_RETURN_IF_ERROR(co_await MarkDirty());
  } else {
    KVBLK_CO_RETURN_IF_ERROR(co_await refcounts_->EnsureDurable(refcounts_->seq()));
  }
  KVBLK_CO_RETURN_IF_ERROR(co_await file_->Flush());
  KVBLK_CO_ASSIGN_OR_RETURN(TableCache::Handle h, co_await l2_cache_->Insert(new_off, table.data()));
  KVBLK_CO_RETURN_IF_ERROR(co_await WriteL1Entry(l1_index, new_off | kOflagCopied));
  // The guard follows l1_ in the same step (no suspension since the store);
  // the old table stays protected as a snapshot's.
  KVBLK_CO_RETURN_IF_ERROR(GuardAdd(new_off, cluster_size_, MetadataKind::kActiveL2));
  if (old_off != 0) {
    KVBLK_CO_RETURN_IF_ERROR(GuardRemove(old_off, cluster_size_, MetadataKind::kActiveL2));
    alloc_->DeferFree(old_off, 1);
  }
  co_return h;
}

// --- flush, header, close -------------------------------------------------

Task<Status> Qcow2Device::FlushMetadata() {
  Allocator::FreeList frees = alloc_->TakeDeferred();
  Status st = co_await l2_cache_->Flush();
  if (st.ok()) st = co_await refcounts_->Flush();
  if (st.ok()) st = co_await file_->Flush();
  if (!st.ok()) {
    for (auto& f : frees) alloc_->DeferFree(f.first, f.second);  // try again next time
    co_return st;
  }
  if (!frees.empty()) {
    KVBLK_CO_RETURN_IF_ERROR(co_await alloc_->ApplyFrees(std::move(frees)));
    KVBLK_CO_RETURN_IF_ERROR(co_await refcounts_->Flush());
    KVBLK_CO_RETURN_IF_ERROR(co_await file_->Flush());
  }
  co_return Status::Ok();
}

Task<Status> Qcow2Device::Flush() { return OnHome(FlushOnHome()); }

Task<Status> Qcow2Device::FlushOnHome() {
  if (closed_) co_return Status::InvalidArgument(file_->path() + ": device is closed");
  if (corrupted_) co_return co_await FlushCorrupted();
  if (read_only_) co_return Status::Ok();
  co_await flush_mu_.Lock();
  ExclusiveGuard g(&flush_mu_);
  co_return co_await FlushMetadata();
}

Task<Status> Qcow2Device::FlushCorrupted() {
  // Metadata is no longer written to a corrupt image. Data written in place
  // is made durable; if table changes are still only in memory, the writes
  // they describe cannot be promised durable, and the flush says so.
  bool unwritten = l2_cache_->dirty_count() > 0 || refcounts_->cache().dirty_count() > 0 ||
                   alloc_->deferred_count() > 0;
  KVBLK_CO_RETURN_IF_ERROR(co_await file_->Flush());
  if (unwritten) {
    co_return Status::Corruption(file_->path() + ": image was marked corrupt; writes since the "
                                                 "last flush may not be durable");
  }
  co_return Status::Ok();
}

Task<Status> Qcow2Device::Close() { return OnHome(CloseOnHome()); }

Task<Status> Qcow2Device::CloseOnHome() {
  if (closed_) co_return Status::Ok();
  Status st;
  if (!read_only_) {
    co_await image_lock_.LockExclusive();  // waits for in-flight requests
    ExclusiveGuard g(&image_lock_);
    co_await flush_mu_.Lock();
    ExclusiveGuard f(&flush_mu_);
    if (!corrupted_) st = co_await alloc_->ReleasePool();  // no leaks on a clean close
    if (st.ok()) st = co_await FlushMetadata();
    if (st.ok() && !corrupted_ && marked_dirty_) st = co_await MarkClean();
  }
  if (corrupted_ && st.ok()) st = co_await FlushCorrupted();
  if (backing_) {
    Status bs = co_await backing_->Close();
    if (st.ok()) st = bs;
  }
  closed_ = true;
  co_return st;
}

Task<Status> Qcow2Device::UpdateHeaderField(uint64_t offset, const uint8_t* bytes, size_t len) {
  if (Status ov = GuardCheck("header write", offset, len, KindBit(MetadataKind::kHeader));
      !ov.ok()) {
    // Not SignalCorruption: it writes the header itself.
    read_only_ = true;
    corrupted_ = true;
    co_return ov;
  }
  KVBLK_CO_RETURN_IF_ERROR(co_await file_->Write(bytes, len, offset));
  co_return co_await file_->Flush();
}

Task<Status> Qcow2Device::WriteIncompatibleFeatures() {
  // A coroutine frame keeps `buf` alive until the write has run.
  uint8_t buf[8];
  StoreBe64(buf, header_.incompatible_features);
  co_return co_await UpdateHeaderField(72, buf, sizeof(buf));
}

Task<Status> Qcow2Device::RewriteHeader() {
  KVBLK_CO_ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, EncodeHeader(&header_));
  co_return co_await UpdateHeaderField(0, bytes.data(), bytes.size());
}

Task<Status> Qcow2Device::SignalCorruption(Status why) {
  if (!read_only_ && header_.version >= 3 && !header_.corrupt()) {
    header_.incompatible_features |= kIncompatCorrupt;
    Status st = co_await WriteIncompatibleFeatures();
    if (!st.ok()) why = why.WithContext("(could not mark the image corrupt: " + st.message() + ")");
  }
  read_only_ = true;  // no further writes to a corrupt image
  corrupted_ = true;
  co_return why;
}

Task<Status> Qcow2Device::MarkDirty() {
  if (marked_dirty_) co_return Status::Ok();
  header_.incompatible_features |= kIncompatDirty;
  Status st = co_await WriteIncompatibleFeatures();
  if (!st.ok()) {
    header_.incompatible_features &= ~kIncompatDirty;  // as on disk, as far as we know
    co_return st.WithContext(file_->path() + ": marking the image dirty (lazy refcounts)");
  }
  marked_dirty_ = true;
  co_return Status::Ok();
}

Task<Status> Qcow2Device::MarkClean() {
  header_.incompatible_features &= ~kIncompatDirty;
  Status st = co_await WriteIncompatibleFeatures();
  if (!st.ok()) {
    header_.incompatible_features |= kIncompatDirty;  // the next open repairs it
    co_return st.WithContext(file_->path() + ": clearing the dirty bit");
  }
  marked_dirty_ = false;
  co_return Status::Ok();
}

Capabilities Qcow2Device::capabilities() const {
  Capabilities c;
  c.read_only = read_only_;
  c.logical_block_size = 512;
  c.discard_granularity = static_cast<uint32_t>(cluster_size_);
  c.optimal_io_size = static_cast<uint32_t>(cluster_size_);
  return c;
}

Result<ImageInfo> Qcow2Device::Info() {
  ImageInfo info;
  info.filename = file_->path();
  info.format = "qcow2";
  info.virtual_size = header_.size;
  KVBLK_ASSIGN_OR_RETURN(info.actual_size, file_->AllocatedBytes());
  info.cluster_size = static_cast<uint32_t>(cluster_size_);
  info.dirty = header_.dirty();
  info.backing_filename = header_.backing_file;
  if (!header_.backing_file.empty()) {
    info.full_backing_filename = ResolveBacking(file_->path(), header_.backing_file);
  }
  info.backing_format = header_.backing_format;
  info.compat = header_.version >= 3 ? "1.1" : "0.10";
  info.lazy_refcounts = header_.lazy_refcounts();
  info.refcount_bits = static_cast<int>(header_.refcount_bits());
  info.corrupt = header_.corrupt();
  info.extended_l2 = header_.extended_l2();
  info.compression_type = header_.compression_type == kCompressionZstd ? "zstd" : "zlib";
  for (const auto& s : snapshots_) info.snapshots.push_back(s.info);
  info.l2_cache_bytes = l2_cache_bytes();
  return info;
}

Task<Status> Qcow2Device::Preallocate(Preallocation mode) {
  return OnHome(PreallocateOnHome(mode));
}

Task<Status> Qcow2Device::PreallocateOnHome(Preallocation mode) {
  KVBLK_CO_RETURN_IF_ERROR(CheckRequest(0, 0, true));
  const uint64_t entries = uint64_t{1} << l2_bits_;
  const uint64_t clusters = (header_.size + cluster_size_ - 1) >> cluster_bits_;
  for (uint64_t gc = 0; gc < clusters;) {
    uint64_t l1i = gc >> l2_bits_;
    KVBLK_CO_ASSIGN_OR_RETURN(TableCache::Handle h, co_await GetL2ForWrite(l1i));
    uint64_t end = std::min(clusters, (l1i + 1) * entries);
    auto empty = [&](uint64_t c) {
      return L2Entry(h, c & (entries - 1)) == 0 && L2Bitmap(h, c & (entries - 1)) == 0;
    };
    // Extended L2 entries: the host cluster is reserved with no subcluster
    // allocated, so reads still go to the backing file (or zeros), as qemu.
    const uint64_t bitmap = header_.extended_l2() ? 0 : SubclusterBitmap(kSubclusterAll, 0);
    while (gc < end) {
      if (!empty(gc)) {
        ++gc;
        continue;
      }
      uint64_t n = 1;
      while (gc + n < end && empty(gc + n)) ++n;
      KVBLK_CO_ASSIGN_OR_RETURN(Allocator::Run run, co_await alloc_->Allocate(n));
      for (uint64_t i = 0; i < run.count; ++i) {
        SetL2Entry(h, (gc + i) & (entries - 1), (run.offset + i * cluster_size_) | kOflagCopied,
                   bitmap);
      }
      if (mode == Preallocation::kFalloc || mode == Preallocation::kFull) {
        if (Status ov = GuardCheck("preallocation", run.offset, run.count * cluster_size_,
                                   kIgnoreNone);
            !ov.ok()) {
          co_return co_await RefuseWrite(std::move(ov));
        }
        KVBLK_CO_RETURN_IF_ERROR(
            co_await file_->WriteZeroes(run.offset, run.count * cluster_size_, true));
      }
      gc += run.count;
    }
  }
  uint64_t end_bytes = refcounts_->file_clusters() << cluster_bits_;
  KVBLK_CO_ASSIGN_OR_RETURN(uint64_t cur, file_->Size());
  if (cur < end_bytes) KVBLK_CO_RETURN_IF_ERROR(file_->Truncate(end_bytes));
  co_return co_await FlushOnHome();
}

}  // namespace qcow2

// --- opening images -------------------------------------------------------

Task<Result<std::unique_ptr<BlockDevice>>> OpenImageAsync(const std::string& path,
                                                          const OpenOptions& opts, int depth) {
  if (opts.l2_cache_bytes > kMaxL2CacheBytes) {
    co_return Status::InvalidArgument(path + ": L2 cache size " +
                                      std::to_string(opts.l2_cache_bytes) +
                                      " bytes is more than the limit of 64 GiB (" +
                                      std::to_string(kMaxL2CacheBytes) + ")");
  }
  FileOptions fo;
  fo.read_only = opts.read_only;
  fo.direct = opts.direct;
  KVBLK_CO_ASSIGN_OR_RETURN(std::unique_ptr<File> file, OpenPosixFile(path, fo));
  std::string format = opts.format;
  if (format.empty()) {
    uint8_t magic[4] = {0, 0, 0, 0};
    KVBLK_CO_ASSIGN_OR_RETURN(uint64_t size, file->Size());
    if (size >= 4) KVBLK_CO_RETURN_IF_ERROR(co_await file->Read(magic, 4, 0));
    format = qcow2::LoadBe32(magic) == qcow2::kMagic ? "qcow2" : "raw";
  }
  if (format == "raw") {
    KVBLK_CO_ASSIGN_OR_RETURN(auto dev, RawDevice::Open(std::move(file)));
    co_return std::unique_ptr<BlockDevice>(std::move(dev));
  }
  if (format == "qcow2") {
    KVBLK_CO_ASSIGN_OR_RETURN(auto dev, co_await qcow2::Qcow2Device::Open(std::move(file), opts,
                                                                          depth));
    co_return std::unique_ptr<BlockDevice>(std::move(dev));
  }
  co_return Status::InvalidArgument("unknown image format '" + format +
                                    "' (supported: qcow2, raw)");
}

Result<std::unique_ptr<BlockDevice>> OpenImage(const std::string& path, const OpenOptions& opts) {
  return RunSync(OpenImageAsync(path, opts, 0));
}

Status CloseImage(std::unique_ptr<BlockDevice> dev) {
  if (!dev) return Status::Ok();
  return RunSync(dev->Close());
}

Result<std::string> ProbeFormat(const std::string& path) {
  FileOptions fo;
  fo.read_only = true;
  KVBLK_ASSIGN_OR_RETURN(std::unique_ptr<File> file, OpenPosixFile(path, fo));
  KVBLK_ASSIGN_OR_RETURN(uint64_t size, file->Size());
  uint8_t magic[4] = {0, 0, 0, 0};
  if (size >= 4) KVBLK_RETURN_IF_ERROR(RunSync(file->Read(magic, 4, 0)));
  return std::string(qcow2::LoadBe32(magic) == qcow2::kMagic ? "qcow2" : "raw");
}

Status Qcow2Preallocate(const std::string& path, Preallocation mode) {
  if (mode == Preallocation::kOff) return Status::Ok();
  OpenOptions o;
  o.format = "qcow2";
  o.open_backing = true;
  KVBLK_ASSIGN_OR_RETURN(std::unique_ptr<BlockDevice> dev, OpenImage(path, o));
  auto* q = static_cast<qcow2::Qcow2Device*>(dev.get());
  Status st = RunSync(q->Preallocate(mode));
  Status cs = CloseImage(std::move(dev));
  return st.ok() ? cs : st;
}

}  // namespace kvblk
