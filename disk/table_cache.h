// TableCache: a cache of cluster-sized metadata tables (L2 tables, refcount
// blocks) keyed by their host offset.
//
// Index: an RB-tree (std::map) from host offset to entry. Eviction: an LRU
// list of unpinned entries; a dirty entry is written back before it leaves.
// A table that is being read from disk is read once: other callers wait for
// that read instead of issuing their own.
//
// Write-back goes through the owner's Writer, which receives a private copy
// of the table taken at the moment the write-back started: the owner
// enforces its ordering rules (e.g. "refcounts before L2 tables") against
// that copy, and changes made while the write is in flight keep the entry
// dirty.
//
// Thread model: the owner's home event loop (one thread) runs every
// coroutine method and uses Handles. Peek() and Modify() may be called from
// any thread: mu_ guards the index, the LRU list, pin counts, entry state
// and table bytes against them, and is never held across a suspension.
// Writes to a table that other threads may Peek() go through Modify().
#ifndef KVBLK_DISK_TABLE_CACHE_H_
#define KVBLK_DISK_TABLE_CACHE_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "disk/async_lock.h"
#include "disk/file.h"
#include "disk/futex_mutex.h"
#include "kvblk/status.h"
#include "kvblk/task.h"

namespace kvblk {

class TableCache {
  struct Entry;

 public:
  // Writes `table` (table_size bytes) for the entry at `offset`.
  using Writer = std::function<Task<Status>(uint64_t offset, const uint8_t* table)>;
  // Validates a table just read from disk (e.g. entry sanity); may be null.
  using Validator = std::function<Status(uint64_t offset, const uint8_t* table)>;

  // `capacity` is the number of tables kept (at least 2).
  TableCache(std::string name, File* file, uint32_t table_size, size_t capacity, Writer writer);
  ~TableCache();
  TableCache(const TableCache&) = delete;
  TableCache& operator=(const TableCache&) = delete;

  // A pinned table: it stays in memory while any Handle refers to it.
  class Handle {
   public:
    Handle() = default;
    Handle(const Handle& o);
    Handle& operator=(const Handle& o);
    Handle(Handle&& o) noexcept;
    Handle& operator=(Handle&& o) noexcept;
    ~Handle();

    explicit operator bool() const { return e_ != nullptr; }
    uint8_t* data() const;
    uint64_t offset() const;
    // Records a change; the table will be written back.
    void MarkDirty();

   private:
    friend class TableCache;
    Handle(TableCache* c, Entry* e);
    void Reset();
    TableCache* c_ = nullptr;
    Entry* e_ = nullptr;
  };

  // Thread-safe. If the table at `offset` is cached and loaded, marks it
  // most recently used, calls fn(const uint8_t* table) under the cache lock
  // and returns true; otherwise returns false (the caller goes to the home
  // loop and uses Get()). `fn` must be short and must not block.
  template <typename Fn>
  bool Peek(uint64_t offset, Fn&& fn) {
    std::lock_guard<FutexMutex> l(mu_);
    auto it = map_.find(offset);
    if (it == map_.end() || !it->second->loaded || it->second->dropped) return false;
    Entry* e = it->second.get();
    if (e->in_lru() && e->next != &lru_) {
      LruUnlink(e);
      LruPushBack(e);
    }
    ++stats_.hits;
    fn(static_cast<const uint8_t*>(e->data.get()));
    return true;
  }
  // Changes the pinned table `h` by calling fn(uint8_t* table) under the
  // cache lock, and marks it dirty. Home loop only.
  template <typename Fn>
  void Modify(Handle& h, Fn&& fn) {
    std::lock_guard<FutexMutex> l(mu_);
    fn(h.e_->data.get());
    ++h.e_->dirty_gen;
  }

  // Returns the table at `offset`, reading it from disk on a miss.
  // Errors: the read's Status, or the validator's.
  Task<Result<Handle>> Get(uint64_t offset);
  // Returns a table for a freshly allocated cluster without reading it; its
  // contents start as zeros and it is marked dirty. Any stale entry for the
  // offset is dropped first.
  Task<Result<Handle>> Create(uint64_t offset);
  // Inserts a table whose contents are already on disk (clean).
  Task<Result<Handle>> Insert(uint64_t offset, const uint8_t* contents);
  // Writes back every dirty table. On error the tables stay dirty.
  Task<Status> Flush();
  // Forgets the table at `offset` (its cluster was freed). Must not be pinned.
  void Drop(uint64_t offset);

  void set_validator(Validator v) { validator_ = std::move(v); }
  uint32_t table_size() const { return table_size_; }
  size_t capacity() const { return capacity_; }
  size_t size() const;
  size_t dirty_count() const;
  bool Contains(uint64_t offset) const;

  // Statistics, for tests and benchmarks.
  struct Stats {
    uint64_t hits = 0;
    uint64_t misses = 0;
    uint64_t evictions = 0;
    uint64_t writebacks = 0;
  };
  Stats stats() const;
  // Offsets in LRU order, least recently used first (unpinned entries only).
  std::vector<uint64_t> LruOrder() const;

 private:
  // The LRU list is intrusive (its links live in the entries), so that
  // Peek's move to the back is a few stores inline, with no call out of
  // the library (see disk/hot.h).
  struct LruLink {
    LruLink* prev = nullptr;
    LruLink* next = nullptr;
  };
  struct Entry : LruLink {
    uint64_t offset = 0;
    std::unique_ptr<uint8_t[]> data;
    int pins = 0;
    bool loaded = false;
    Status load_status;
    std::unique_ptr<AsyncEvent> load_done;
    uint64_t dirty_gen = 0;    // bumped by MarkDirty
    uint64_t clean_gen = 0;    // dirty_gen last written back
    bool writing = false;
    AsyncMutex write_mu;  // serializes write-backs of this table
    bool dropped = false;
    bool in_lru() const { return next != nullptr; }
  };

  // Unlinks `e`, which is in the LRU list.
  void LruUnlink(Entry* e) {
    e->prev->next = e->next;
    e->next->prev = e->prev;
    e->prev = e->next = nullptr;
  }
  // Links `e`, which is not in the LRU list, as the most recently used.
  void LruPushBack(Entry* e) {
    e->prev = lru_.prev;
    e->next = &lru_;
    lru_.prev->next = e;
    lru_.prev = e;
  }

  void Pin(Entry* e);
  void Unpin(Entry* e);
  void PinLocked(Entry* e);
  void UnpinLocked(Entry* e);
  // Adds an entry for `offset`, not yet loaded, to the index.
  Entry* NewEntryLocked(uint64_t offset);
  void DropLocked(uint64_t offset);
  // Evicts unpinned entries (writing back dirty ones) until there is room.
  Task<Status> MakeRoom();
  Task<Status> WriteBack(Entry* e);
  void EraseLocked(Entry* e);

  // Peek() takes it on every cached read: a FutexMutex, whose uncontended
  // lock and unlock are one atomic instruction each.
  mutable FutexMutex mu_;
  std::string name_;
  File* file_;
  uint32_t table_size_;
  size_t capacity_;
  Writer writer_;
  Validator validator_;
  std::map<uint64_t, std::unique_ptr<Entry>> map_;
  // Unpinned loaded entries; lru_.next is the least recently used, and an
  // empty list links lru_ to itself.
  LruLink lru_{&lru_, &lru_};
  // Dropped entries still pinned by a holder; freed with the cache.
  std::vector<std::unique_ptr<Entry>> orphans_;
  Stats stats_;
};

}  // namespace kvblk

#endif  // KVBLK_DISK_TABLE_CACHE_H_
