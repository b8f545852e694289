// Offline consistency check and repair of qcow2 images (what `qemu-img
// check` does; docs/interop/qcow2.rst, "Host cluster management").
//
// The checker rebuilds every cluster's reference count from the image's
// metadata -- the header cluster, the active L1 table, every L2 table and the
// clusters its entries use (normal, zero with an allocation, and each host
// cluster a compressed cluster's bytes touch), every snapshot's L1 and L2
// tables, the snapshot table, the refcount table and blocks, and persistent
// bitmaps -- and compares them with the stored refcounts. Findings are
// classified and counted as qemu-img 7.2 does, so that both tools report
// the same numbers for the same image:
//  - corruptions: a refcount lower than the references ("ERROR cluster N
//    refcount=R reference=M"), COPIED flags that disagree with the refcount,
//    misaligned tables and data clusters, reserved bits, references past the
//    end of the file, broken refcount blocks, refcount overflow;
//  - leaks: a refcount higher than the references ("Leaked cluster N ...");
//  - check errors: refcounts that cannot be read at all.
//
// Repair (kLeaks lowers leaked refcounts; kAll fixes everything it can):
//  - refcounts are raised or lowered in place, or, when the refcount
//    structure itself is broken (a refcount table entry that is misaligned,
//    past the end of the file or overlapping other metadata, or a cluster in
//    use that no refcount block covers), a new refcount table and blocks
//    are written at the end of the file and the header switches to them in
//    one write;
//  - COPIED flags are set or cleared in the active L1 and L2 tables;
//  - reserved bits are cleared; L1/L2 entries that are misaligned, point
//    past the end of the file or into other metadata are cleared (a zero
//    cluster stays a zero cluster; data is reported lost); snapshots whose
//    L1 table is unusable are removed from the snapshot table, incomplete
//    snapshot entries are completed (the table is rewritten at the end of
//    the file, switched to with the same header write as the refcounts);
//  - finally the dirty and corrupt bits are cleared.
//  Write order: reference removals and COPIED clears first, then refcounts
//  (a rebuilt table only becomes live with the header write), then entries
//  that gain a reference and COPIED sets, then the header bits, each step
//  synced before the next, so a crash during repair can leak clusters but
//  never lowers a refcount below its references or leaves a COPIED flag on
//  a shared cluster where the damaged image had neither; running the repair
//  again finishes it.
//  Refcount overflow (more references than the refcount width can hold) is
//  reported but not repaired, as in qemu-img.
//
// Every size and offset read from the image is validated before use; every
// allocation is bounded by the file size or the format's limits.
#ifndef KVBLK_DISK_QCOW2_CHECK_H_
#define KVBLK_DISK_QCOW2_CHECK_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "disk/sync_file.h"
#include "kvblk/status.h"

namespace kvblk::qcow2 {

enum class RepairMode { kNone, kLeaks, kAll };

struct CheckOptions {
  RepairMode repair = RepairMode::kNone;
  // One finding per call, in qemu-img check's wording (no newline), e.g.
  // "Leaked cluster 5 refcount=2 reference=1". Called on the calling thread,
  // in image order. May be empty.
  std::function<void(const std::string&)> on_message;
  // Progress in abstract work units (done, total); called on the calling
  // thread. May be empty.
  std::function<void(uint64_t done, uint64_t total)> on_progress;
  // Opens the image file (default: SyncFile::Open). A seam for tests that
  // record or fail the repair's writes.
  std::function<Result<std::unique_ptr<SyncFile>>(const std::string& path, bool writable)>
      open_file;
};

// The numbers qemu-img check reports (ImageCheck in QEMU's QAPI schema).
struct CheckResult {
  uint64_t corruptions = 0;
  uint64_t leaks = 0;
  uint64_t check_errors = 0;
  uint64_t corruptions_fixed = 0;
  uint64_t leaks_fixed = 0;
  uint64_t image_end_offset = 0;
  uint64_t total_clusters = 0;
  uint64_t allocated_clusters = 0;
  uint64_t fragmented_clusters = 0;
  uint64_t compressed_clusters = 0;
  // True when a repair changed the image and the numbers above (except the
  // *_fixed ones) come from a second check of the repaired image. (A repair
  // that fixed nothing but left problems also reports a second check, with
  // this false.)
  bool double_checked = false;

  // qemu-img check's exit status: 1 if the check could not complete (check
  // errors), 2 for corruptions, 3 for leaks only, 0 for a clean image.
  int ExitCode() const {
    if (check_errors) return 1;
    if (corruptions) return 2;
    if (leaks) return 3;
    return 0;
  }
};

// Checks the qcow2 image at `path` and, with `opts.repair`, repairs it (the
// file is then opened read-write; nobody else may use it meanwhile). After a
// repair that changed anything or left problems the image is checked again
// and the result describes the repaired image, with the *_fixed counts of
// the repair.
// Errors (the check could not be done at all): what DecodeHeader reports
// for the header, IoError for I/O failures, Corruption for a snapshot table
// or bitmap directory that cannot be parsed, Corruption when kLeaks would
// need the refcount structure rebuilt ("use RepairMode::kAll"),
// NotSupported for images too large to check (more than 2^31 clusters).
Result<CheckResult> CheckImage(const std::string& path, const CheckOptions& opts);

// For Qcow2Device::Open: if the image at `path` has the dirty bit set (it
// was not closed cleanly while using lazy refcounts), repairs it as
// CheckImage with RepairMode::kAll does (which also clears the dirty bit);
// otherwise does nothing. Call it before any other descriptor of the image
// writes to it. Returns OK when the image is clean afterwards, Corruption
// (with the counts) when the repair left corruptions, or the error that
// stopped the repair. `on_message` (optional) receives the findings.
Status RepairRefcountsIfDirty(const std::string& path,
                              const std::function<void(const std::string&)>& on_message = {});

}  // namespace kvblk::qcow2

#endif  // KVBLK_DISK_QCOW2_CHECK_H_
