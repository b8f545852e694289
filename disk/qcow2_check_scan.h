// The reference scan of the qcow2 checker (disk/qcow2_check.h): walks L1
// tables and their L2 tables, counts a reference for every cluster they use
// (RefCounter), and records what is wrong with them in qemu-img check's
// words and numbers. In repair mode it also plans the entry changes that
// make the tables valid (EntryFix), and counts references as they will be
// after those changes.
//
// L2 tables are scanned in parallel (tbb::parallel_for over L1 entries);
// findings are kept per L1 entry and merged in L1 order, so the messages
// come out in the same order on every run.
#ifndef KVBLK_DISK_QCOW2_CHECK_SCAN_H_
#define KVBLK_DISK_QCOW2_CHECK_SCAN_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "disk/sync_file.h"
#include "kvblk/status.h"

namespace kvblk::qcow2::check {

// snprintf into a std::string (any length).
std::string Printf(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// The image parameters every part of the checker needs.
struct Geometry {
  uint32_t version = 3;
  uint32_t cluster_bits = 16;
  uint64_t cluster_size = 65536;
  uint32_t refcount_order = 4;
  bool extended_l2 = false;
  uint32_t l2_entry_bytes = 8;  // 16 with extended L2 entries
  uint64_t l2_entries = 8192;   // entries per L2 table
  uint64_t file_size = 0;
  uint64_t file_clusters = 0;  // clusters the file covers (rounded up)

  uint64_t ClusterOf(uint64_t offset) const { return offset >> cluster_bits; }
  bool Aligned(uint64_t offset) const { return (offset & (cluster_size - 1)) == 0; }
  // qemu's tolerance: a region may end less than one cluster past the end
  // of the file (the last cluster may be partly written); anything further
  // is a reference into nothing.
  bool ExceedsFile(uint64_t offset, uint64_t size) const;
};

// What a cluster holds, as far as repair decisions go (one byte per
// cluster of the file): metadata that no data entry may point into.
constexpr uint8_t kMetaFixed = 1;  // header, L1 tables, refcount table, snapshot table, bitmaps
constexpr uint8_t kMetaL2 = 2;     // an L2 table

// In-memory reference counts of the clusters [0, file_clusters] (one past
// the file: qemu's tolerance allows references to reach it). Counts stop at
// `limit` (the largest refcount the image can store, at most 2^32 - 1).
class RefCounter {
 public:
  // NoSpace if the array cannot be allocated.
  static Result<std::unique_ptr<RefCounter>> Create(const Geometry& geo, uint64_t limit);

  enum class AddResult { kOk, kPastEnd };
  // Adds one reference to every cluster [offset, offset + size) touches,
  // the way qemu counts: nothing for size 0; kPastEnd (nothing counted)
  // when the region ends one cluster or more past the end of the file; a
  // cluster already at the limit stays there and its index is appended to
  // `overflowed`. Thread-safe.
  AddResult Add(uint64_t offset, uint64_t size, std::vector<uint64_t>* overflowed);
  // Removes one reference from each cluster of the region (for counts that
  // must not survive a rebuild). Not thread-safe.
  void Remove(uint64_t offset, uint64_t size);

  uint64_t Get(uint64_t cluster) const { return cluster < slots_ ? counts_[cluster] : 0; }
  uint64_t slots() const { return slots_; }
  uint64_t limit() const { return limit_; }

 private:
  RefCounter(const Geometry& geo, uint64_t slots, uint64_t limit, std::unique_ptr<uint32_t[]> c)
      : geo_(geo), slots_(slots), limit_(limit), counts_(std::move(c)) {}
  const Geometry geo_;
  uint64_t slots_;
  uint64_t limit_;
  std::unique_ptr<uint32_t[]> counts_;
};

// A planned change of one big-endian 64-bit word of an L1 or L2 table.
struct EntryFix {
  uint64_t file_offset = 0;
  uint64_t old_value = 0;
  uint64_t new_value = 0;
  // The new value references a cluster that a reader of the old value would
  // not have used (reserved bits cleared from an otherwise valid entry);
  // such a change is written only after the refcounts are.
  bool adds_reference = false;
};

// What scanning found (per L1 entry while scanning, then merged).
struct Findings {
  // Messages kept per L1 entry; a garbage L2 table is summarized beyond
  // this, so that what an image makes the scan remember stays bounded.
  static constexpr size_t kMaxMessages = 1000;

  uint64_t corruptions = 0;
  uint64_t allocated = 0;
  uint64_t fragmented = 0;
  uint64_t compressed = 0;
  std::vector<std::string> messages;
  uint64_t suppressed = 0;           // messages beyond kMaxMessages
  std::vector<uint64_t> overflowed;  // clusters whose count hit the limit
  std::vector<EntryFix> fixes;       // repair mode only

  void Note(std::string message) {
    if (messages.size() < kMaxMessages) {
      messages.push_back(std::move(message));
    } else {
      ++suppressed;
    }
  }
  void Corruption(std::string message) {
    ++corruptions;
    Note(std::move(message));
  }
  // Appends `other` (keeps the order: this first; suppressed messages of
  // `other` become one line saying how many).
  void Merge(Findings&& other);
};

// An L1 table as read from the image.
struct L1Table {
  uint64_t offset = 0;
  uint32_t size = 0;  // entries
  std::vector<uint64_t> entries;
  std::string label;  // "" for the active table, "snapshot ID (NAME)" otherwise
};

// Everything a scan shares (read-only, except the counter and the file).
struct ScanContext {
  const Geometry* geo = nullptr;
  const SyncFile* file = nullptr;
  RefCounter* refs = nullptr;
  // Plan fixes (RepairMode::kAll): entries that would be reported as
  // corrupt are changed instead, and references are counted as they will
  // be afterwards.
  bool repair = false;
  const std::vector<uint8_t>* meta = nullptr;  // repair only (kMeta* per cluster)
  // Called on the scanning thread with the number of L1 entries done since
  // the last call.
  std::function<void(uint64_t)> progress;
  // Called on the scanning thread after each parallel round with what was
  // found so far (it may take the messages and fixes out).
  std::function<void(Findings*)> flush;
};

// Counts one reference to the region [offset, offset + size) and reports
// what qemu reports: a region past the end of the file, refcount overflow.
void CountRegion(const ScanContext& ctx, uint64_t offset, uint64_t size, Findings* out);

// Why an L2 table offset (from an L1 entry, reserved bits already cleared)
// cannot be used, in repair mode; nullopt if it can.
std::optional<std::string> L2TableProblem(const Geometry& geo, const std::vector<uint8_t>& meta,
                                          uint64_t l2_offset);

// Pass 1: counts the L1 table, its L2 tables and the clusters their entries
// use. `frag_info` (the active table) also counts allocated, fragmented and
// compressed clusters. Errors: I/O errors reading L2 tables.
Status ScanL1Table(const ScanContext& ctx, const L1Table& l1, bool frag_info, Findings* out);

// The refcount pass 2 compares COPIED flags with: nullopt when the refcount
// cannot be read (the entry is then skipped silently, as qemu does).
using RefcountFn = std::function<std::optional<uint64_t>(uint64_t cluster)>;

// Pass 2: compares the COPIED flag of every L1 entry of the active table and
// of every normal or preallocated-zero entry of its L2 tables with
// `refcount` (flag set iff refcount 1). Entries are read as `planned`
// (file offset -> value after pass 1 fixes) says where it has them.
// `repair` turns each mismatch into a fix instead of a corruption.
Status CheckCopiedFlags(const ScanContext& ctx, const L1Table& active, const RefcountFn& refcount,
                        bool repair, const std::unordered_map<uint64_t, uint64_t>& planned,
                        Findings* out);

}  // namespace kvblk::qcow2::check

#endif  // KVBLK_DISK_QCOW2_CHECK_SCAN_H_
