#include "disk/table_cache.h"

#include <cstring>

namespace kvblk {

TableCache::TableCache(std::string name, File* file, uint32_t table_size, size_t capacity,
                       Writer writer)
    : name_(std::move(name)), file_(file), table_size_(table_size),
      capacity_(capacity < 2 ? 2 : capacity), writer_(std::move(writer)) {}

TableCache::~TableCache() = default;

// --- Handle ---------------------------------------------------------------

TableCache::Handle::Handle(TableCache* c, Entry* e) : c_(c), e_(e) { c_->Pin(e_); }
TableCache::Handle::Handle(const Handle& o) : c_(o.c_), e_(o.e_) {
  if (e_) c_->Pin(e_);
}
TableCache::Handle& TableCache::Handle::operator=(const Handle& o) {
  if (this != &o) {
    Reset();
    c_ = o.c_;
    e_ = o.e_;
    if (e_) c_->Pin(e_);
  }
  return *this;
}
TableCache::Handle::Handle(Handle&& o) noexcept : c_(o.c_), e_(o.e_) {
  o.c_ = nullptr;
  o.e_ = nullptr;
}
TableCache::Handle& TableCache::Handle::operator=(Handle&& o) noexcept {
  if (this != &o) {
    Reset();
    c_ = o.c_;
    e_ = o.e_;
    o.c_ = nullptr;
    o.e_ = nullptr;
  }
  return *this;
}
TableCache::Handle::~Handle() { Reset(); }
void TableCache::Handle::Reset() {
  if (e_) c_->Unpin(e_);
  e_ = nullptr;
  c_ = nullptr;
}
uint8_t* TableCache::Handle::data() const { return e_->data.get(); }
uint64_t TableCache::Handle::offset() const { return e_->offset; }
void TableCache::Handle::MarkDirty() {
  std::lock_guard<FutexMutex> l(c_->mu_);
  ++e_->dirty_gen;
}

// --- Cache ----------------------------------------------------------------

void TableCache::Pin(Entry* e) {
  std::lock_guard<FutexMutex> l(mu_);
  PinLocked(e);
}

void TableCache::Unpin(Entry* e) {
  std::lock_guard<FutexMutex> l(mu_);
  UnpinLocked(e);
}

void TableCache::PinLocked(Entry* e) {
  if (e->pins++ == 0 && e->in_lru()) LruUnlink(e);
}

void TableCache::UnpinLocked(Entry* e) {
  if (--e->pins > 0) return;
  if (e->dropped || !e->loaded) {
    // A failed load or a dropped table: forget it once nobody refers to it.
    if (!e->writing) EraseLocked(e);
    return;
  }
  LruPushBack(e);
}

void TableCache::EraseLocked(Entry* e) {
  if (e->in_lru()) LruUnlink(e);
  auto it = map_.find(e->offset);
  if (it != map_.end() && it->second.get() == e) map_.erase(it);
}

TableCache::Entry* TableCache::NewEntryLocked(uint64_t offset) {
  auto e = std::make_unique<Entry>();
  e->offset = offset;
  e->data.reset(new uint8_t[table_size_]);
  e->load_done = std::make_unique<AsyncEvent>();
  Entry* raw = e.get();
  map_[offset] = std::move(e);
  return raw;
}

size_t TableCache::size() const {
  std::lock_guard<FutexMutex> l(mu_);
  return map_.size();
}

bool TableCache::Contains(uint64_t offset) const {
  std::lock_guard<FutexMutex> l(mu_);
  return map_.count(offset) != 0;
}

TableCache::Stats TableCache::stats() const {
  std::lock_guard<FutexMutex> l(mu_);
  return stats_;
}

size_t TableCache::dirty_count() const {
  std::lock_guard<FutexMutex> l(mu_);
  size_t n = 0;
  for (const auto& [off, e] : map_) {
    if (e->loaded && e->dirty_gen != e->clean_gen) ++n;
  }
  return n;
}

std::vector<uint64_t> TableCache::LruOrder() const {
  std::lock_guard<FutexMutex> l(mu_);
  std::vector<uint64_t> v;
  for (const LruLink* l = lru_.next; l != &lru_; l = l->next)
    v.push_back(static_cast<const Entry*>(l)->offset);
  return v;
}

Task<Status> TableCache::WriteBack(Entry* e) {
  Pin(e);  // keep the entry alive (and out of the LRU list) across the write
  // One write-back per table at a time: two copies in flight may reach the
  // disk in either order, and an older copy must never land last.
  co_await e->write_mu.Lock();
  ExclusiveGuard serial(&e->write_mu);
  Status st;
  std::unique_ptr<uint8_t[]> copy;
  uint64_t gen = 0;
  {
    std::lock_guard<FutexMutex> l(mu_);
    if (e->dirty_gen != e->clean_gen) {  // else the write we waited for covered it
      // Snapshot the table so that concurrent changes neither tear the write
      // nor sneak past the owner's ordering checks.
      copy.reset(new uint8_t[table_size_]);
      std::memcpy(copy.get(), e->data.get(), table_size_);
      gen = e->dirty_gen;
      e->writing = true;
    }
  }
  if (copy) {
    st = co_await writer_(e->offset, copy.get());
    std::lock_guard<FutexMutex> l(mu_);
    e->writing = false;
    if (st.ok()) {
      ++stats_.writebacks;
      if (gen > e->clean_gen) e->clean_gen = gen;
    }
  }
  serial.Release();  // before Unpin, which may free the entry
  Unpin(e);
  co_return st;
}

Task<Status> TableCache::MakeRoom() {
  for (;;) {
    Entry* victim;
    uint64_t off;
    {
      std::lock_guard<FutexMutex> l(mu_);
      if (map_.size() < capacity_ || lru_.next == &lru_) break;
      victim = static_cast<Entry*>(lru_.next);
      if (victim->dirty_gen == victim->clean_gen) {
        ++stats_.evictions;
        EraseLocked(victim);
        continue;
      }
      if (victim->writing) break;  // someone is on it; tolerate overshoot
      off = victim->offset;
    }
    KVBLK_CO_RETURN_IF_ERROR(co_await WriteBack(victim));
    // Evict it now unless someone used or changed it meanwhile.
    std::lock_guard<FutexMutex> l(mu_);
    auto it = map_.find(off);
    if (it != map_.end()) {
      Entry* e = it->second.get();
      if (e->pins == 0 && e->dirty_gen == e->clean_gen && !e->writing) {
        ++stats_.evictions;
        EraseLocked(e);
      }
    }
  }
  co_return Status::Ok();
}

Task<Result<TableCache::Handle>> TableCache::Get(uint64_t offset) {
  Entry* found = nullptr;
  bool loaded = false;
  {
    std::lock_guard<FutexMutex> l(mu_);
    auto it = map_.find(offset);
    if (it != map_.end() && !it->second->dropped) {
      found = it->second.get();
      loaded = found->loaded;
      if (loaded) ++stats_.hits;
    } else {
      ++stats_.misses;
    }
  }
  if (found != nullptr) {
    Handle h(this, found);
    if (!loaded) {
      co_await found->load_done->Wait();
      if (!found->load_status.ok()) co_return found->load_status;
    }
    co_return h;
  }
  KVBLK_CO_RETURN_IF_ERROR(co_await MakeRoom());
  Entry* e;
  {
    // MakeRoom may have suspended: someone else may have started the load.
    std::lock_guard<FutexMutex> l(mu_);
    auto it = map_.find(offset);
    if (it != map_.end() && !it->second->dropped) {
      e = nullptr;
    } else {
      e = NewEntryLocked(offset);
    }
  }
  if (e == nullptr) co_return co_await Get(offset);
  Handle h(this, e);
  Status st = co_await file_->Read(e->data.get(), table_size_, offset);
  if (st.ok() && validator_) st = validator_(offset, e->data.get());
  if (!st.ok()) {
    st = st.WithContext(name_ + " table at offset " + std::to_string(offset));
  }
  {
    std::lock_guard<FutexMutex> l(mu_);
    e->load_status = st;
    e->loaded = st.ok();
  }
  e->load_done->Set();
  if (!st.ok()) co_return st;
  co_return h;
}

Task<Result<TableCache::Handle>> TableCache::Create(uint64_t offset) {
  Drop(offset);
  KVBLK_CO_RETURN_IF_ERROR(co_await MakeRoom());
  Entry* e;
  {
    std::lock_guard<FutexMutex> l(mu_);
    DropLocked(offset);  // MakeRoom may have suspended
    e = NewEntryLocked(offset);
    std::memset(e->data.get(), 0, table_size_);
    e->loaded = true;
    e->dirty_gen = 1;
  }
  e->load_done->Set();
  co_return Handle(this, e);
}

Task<Result<TableCache::Handle>> TableCache::Insert(uint64_t offset, const uint8_t* contents) {
  KVBLK_CO_ASSIGN_OR_RETURN(Handle h, co_await Create(offset));
  std::lock_guard<FutexMutex> l(mu_);
  std::memcpy(h.e_->data.get(), contents, table_size_);
  h.e_->clean_gen = h.e_->dirty_gen;
  co_return h;
}

Task<Status> TableCache::Flush() {
  std::vector<uint64_t> dirty;
  {
    std::lock_guard<FutexMutex> l(mu_);
    for (const auto& [off, e] : map_) {
      if (e->loaded && !e->dropped && e->dirty_gen != e->clean_gen) dirty.push_back(off);
    }
  }
  for (uint64_t off : dirty) {
    Entry* e;
    {
      std::lock_guard<FutexMutex> l(mu_);
      auto it = map_.find(off);
      if (it == map_.end()) continue;
      e = it->second.get();
      if (e->dropped || e->dirty_gen == e->clean_gen) continue;
    }
    KVBLK_CO_RETURN_IF_ERROR(co_await WriteBack(e));
  }
  co_return Status::Ok();
}

void TableCache::Drop(uint64_t offset) {
  std::lock_guard<FutexMutex> l(mu_);
  DropLocked(offset);
}

void TableCache::DropLocked(uint64_t offset) {
  auto it = map_.find(offset);
  if (it == map_.end()) return;
  Entry* e = it->second.get();
  e->dropped = true;
  if (e->pins == 0 && !e->writing) {
    EraseLocked(e);
  } else {
    // UnpinLocked() erases it when the last holder lets go. Detach from the
    // index now so a new table at the same offset can be created.
    std::unique_ptr<Entry> keep = std::move(it->second);
    map_.erase(it);
    orphans_.push_back(std::move(keep));
  }
}

}  // namespace kvblk
