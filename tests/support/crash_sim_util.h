// Shared by the crash-simulation tests (tests/disk/crash_sim_test.cc,
// crash_recovery_test.cc): stamped guest sectors, the guest requests of a
// workload and what each sector may hold after a power cut, running the
// calling thread's loop with a hang limit, and `qemu-img check` of many
// files at once.
#ifndef KVBLK_TESTS_SUPPORT_CRASH_SIM_UTIL_H_
#define KVBLK_TESTS_SUPPORT_CRASH_SIM_UTIL_H_

#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <string>
#include <vector>

#include "kvblk/status.h"
#include "tests/support/crash_file.h"

namespace kvblk::testing {

inline constexpr uint64_t kSector = 512;
// A GuestOp time stamp not taken yet.
inline constexpr uint64_t kNotYet = CrashFile::kInFlight;

// --- sector contents ---------------------------------------------------------
// A guest sector holds a value: 0 (zeros), 1 (the initial contents: the
// backing file's pattern) or the id of the write that stored it. The id and
// the sector number are embedded, so a read identifies where data came from;
// the body is compressible so compressed writes stay compressed.
inline constexpr uint32_t kZeroValue = 0;
inline constexpr uint32_t kBackingValue = 1;

// Fills the kSector bytes at `p` with `value` as guest sector `sector`.
void FillSector(uint8_t* p, uint32_t value, uint64_t sector);

// `sectors` sectors of `value` starting at guest sector `first_sector`.
std::vector<uint8_t> Pattern(uint32_t value, uint64_t first_sector, uint64_t sectors);

// The value `p` holds as guest sector `sector`, or -1 if it is none.
int64_t Identify(const uint8_t* p, uint64_t sector);

// --- guest operations and the model -----------------------------------------

struct GuestOp {
  enum class Kind : uint8_t { kWrite, kZeroes, kDiscard, kFlush, kCompressed };
  Kind kind = Kind::kWrite;
  uint64_t offset = 0;
  uint64_t length = 0;
  uint32_t value = kZeroValue;  // kWrite / kCompressed
  bool may_unmap = false;
  std::vector<uint8_t> data;
  uint64_t issued = kNotYet;
  uint64_t completed = kNotYet;
  Status status;
};

const char* KindName(GuestOp::Kind k);

// What each guest sector may hold after a power cut at time `t`.
class Expectation {
 public:
  // `ops` issued and completed on the CrashFile clock; `sectors` guest
  // sectors whose contents before any op were `initial`.
  Expectation(const std::deque<GuestOp>& ops, uint64_t t, uint64_t sectors, uint32_t initial);

  bool Allows(uint64_t sector, int64_t value) const;
  // The allowed values of `sector`, as "{v1,v2,...}".
  std::string Describe(uint64_t sector) const;

 private:
  static uint32_t ValueOf(const GuestOp& op);
  std::vector<std::vector<uint32_t>> allowed_;
};

// Runs the calling thread's loop until `done`, failing (instead of hanging)
// if nothing can make progress for `limit`. False on that timeout.
bool DrainUntil(const std::function<bool()>& done, std::chrono::seconds limit);

// --- qemu-img check ------------------------------------------------------------

// What `qemu-img check --output=json` said of one file.
struct QemuCheck {
  int exit_code = -1;
  long corruptions = -1;
  long check_errors = -1;
  long leaks = 0;
  std::string output;
  // No corruption and no check error; leaks are allowed.
  bool ok() const {
    return (exit_code == 0 || exit_code == 3) && corruptions == 0 && check_errors == 0;
  }
};

// Runs `qemu-img check --output=json` on every file (a few at a time).
std::vector<QemuCheck> QemuCheckAll(const std::vector<std::string>& files);

// The same for one file.
QemuCheck QemuCheckOne(const std::string& path);

}  // namespace kvblk::testing

#endif  // KVBLK_TESTS_SUPPORT_CRASH_SIM_UTIL_H_
