// KnownZeroSubclusters: which subclusters of recently allocated host
// clusters are known to still read as zeros on the host.
//
// Used by subcluster-allocating writes (qcow2 extended L2 entries): when a
// write allocates a subcluster whose guest view is zeros and whose host
// bytes are known zero, the zeros around the guest's data need not be
// written. Without this record every write into a not-yet-allocated
// subcluster of an existing host cluster would write a whole subcluster.
//
// Contract (the caller, Qcow2Device, keeps it; see qcow2_subcluster.cc):
// a bit s set for host cluster H (recorded for guest cluster G) means the
// bytes of subcluster s of H have not been written since H was handed out
// fresh (past every cluster the file ever used, so reading as zeros) and
// mapped by G. An entry is only ever made at that moment; bits are only
// ever cleared afterwards. Forgetting is always safe: a missing entry only
// costs writing the zeros.
//
// Size is bounded: at most `capacity` entries; the least recently used is
// evicted. Not thread-safe: the owner uses it on one thread (the device's
// home loop).
#ifndef KVBLK_DISK_KNOWN_ZERO_H_
#define KVBLK_DISK_KNOWN_ZERO_H_

#include <cstddef>
#include <cstdint>
#include <list>
#include <unordered_map>

namespace kvblk::qcow2 {

class KnownZeroSubclusters {
 public:
  explicit KnownZeroSubclusters(size_t capacity) : capacity_(capacity) {}
  KnownZeroSubclusters(const KnownZeroSubclusters&) = delete;
  KnownZeroSubclusters& operator=(const KnownZeroSubclusters&) = delete;

  // Records that subclusters `mask` of host cluster `host`, just handed
  // out fresh to guest cluster `gc`, read as zeros. Replaces any entry for
  // `host`; an empty mask forgets it. May evict the least recently used.
  void Set(uint64_t host, uint64_t gc, uint32_t mask);
  // The subclusters of `host` known zero while it is mapped by `gc`; 0 when
  // unknown or recorded for another guest cluster. Marks the entry used.
  uint32_t Get(uint64_t host, uint64_t gc);
  // Subclusters `mask` of `host` are about to be written (or may have been):
  // they are no longer known zero.
  void Clear(uint64_t host, uint32_t mask);
  // `host` was freed or handed out again: nothing is known about it.
  void Forget(uint64_t host);
  void ForgetAll();

  // Everything is forgotten when (l1_offset, size) differs from the values
  // seen by the previous call: the active L1 table was switched (snapshot
  // apply, resize), which can free clusters behind the owner's back.
  void SyncTree(uint64_t l1_offset, uint64_t size);

  size_t size() const { return map_.size(); }
  size_t capacity() const { return capacity_; }

 private:
  struct Entry {
    uint64_t host;
    uint64_t gc;
    uint32_t mask;
  };
  using List = std::list<Entry>;  // most recently used first

  size_t capacity_;
  List lru_;
  std::unordered_map<uint64_t, List::iterator> map_;  // host -> entry
  uint64_t l1_offset_ = 0;
  uint64_t size_ = 0;
};

}  // namespace kvblk::qcow2

#endif  // KVBLK_DISK_KNOWN_ZERO_H_
