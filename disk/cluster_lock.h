// ClusterLocks: per-guest-cluster writer locks.
//
// A request that changes a cluster's mapping (allocating write, copy on
// write, discard, write zeroes) holds that cluster's lock, so two such
// requests on one cluster run one after the other and the second sees the
// first's allocation. Requests on different clusters do not contend. Locks
// exist only while held or awaited.
#ifndef KVBLK_DISK_CLUSTER_LOCK_H_
#define KVBLK_DISK_CLUSTER_LOCK_H_

#include <cstdint>
#include <memory>
#include <unordered_map>

#include "disk/async_lock.h"
#include "kvblk/task.h"

namespace kvblk::qcow2 {

class ClusterLocks {
 public:
  // Holds the locks of [first, first + count) until destroyed.
  class Guard {
   public:
    Guard() = default;
    Guard(Guard&& o) noexcept : locks_(o.locks_), first_(o.first_), count_(o.count_) {
      o.locks_ = nullptr;
    }
    Guard& operator=(Guard&& o) noexcept;
    ~Guard() { Release(); }
    void Release();

   private:
    friend class ClusterLocks;
    Guard(ClusterLocks* l, uint64_t first, uint64_t count)
        : locks_(l), first_(first), count_(count) {}
    ClusterLocks* locks_ = nullptr;
    uint64_t first_ = 0;
    uint64_t count_ = 0;
  };

  // Acquires the locks of clusters [first, first + count) in ascending order.
  Task<Guard> Lock(uint64_t first, uint64_t count);

  // Number of clusters currently locked or awaited (for tests).
  size_t active() const { return locks_.size(); }

 private:
  struct Slot {
    AsyncMutex mu;
    int refs = 0;
  };
  void Unlock(uint64_t cluster);

  std::unordered_map<uint64_t, std::unique_ptr<Slot>> locks_;
};

}  // namespace kvblk::qcow2

#endif  // KVBLK_DISK_CLUSTER_LOCK_H_
