// CrashFile: the power-loss test engine behind the File seam.
//
// A CrashFile is an in-memory file that keeps two things:
//  - the current bytes: reads see every write that has completed;
//  - the ordered history of every write (offset + data), host discard /
//    zero range (recorded as writes of zeros) and flush, each stamped with
//    the logical clock at which it was issued and at which it completed.
//
// From the history it builds the bytes a power cut at any moment `t` could
// leave behind, following the contract of File::Flush ("makes every write
// that completed before it durable"):
//  - durable: every write that completed before the issue of a flush that
//    itself completed before `t`;
//  - possible: every other write issued before `t` (completed or still in
//    flight); each of them may be lost, land whole, or be torn — only a
//    prefix or a suffix of its 512-byte host sectors applied.
// Writes are applied in completion order (in-flight ones last, in issue
// order), so a later write of the same bytes wins when both land.
//
// The clock advances by one at every issue and every completion. Tests
// stamp their own (guest) operations with Tick() to relate them to the
// same timeline. Every operation suspends a random 1..3 times (seeded) so
// that concurrent requests interleave differently from run to run.
//
// Single-threaded: use from the coroutines of one event loop.
#ifndef KVBLK_TESTS_SUPPORT_CRASH_FILE_H_
#define KVBLK_TESTS_SUPPORT_CRASH_FILE_H_

#include <coroutine>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "disk/file.h"

namespace kvblk::testing {

class CrashFile final : public File {
 public:
  static constexpr uint64_t kSector = 512;
  static constexpr uint64_t kInFlight = std::numeric_limits<uint64_t>::max();

  struct Op {
    enum class Kind : uint8_t { kWrite, kZero, kFlush };
    Kind kind;
    uint64_t offset = 0;
    uint64_t length = 0;
    std::vector<uint8_t> data;       // kWrite only
    uint64_t issued = 0;             // clock at issue
    uint64_t completed = kInFlight;  // clock at completion
  };

  // How one possible write fares in a crash state.
  struct Fate {
    enum class Kind : uint8_t { kLost, kWhole, kPrefix, kSuffix };
    Kind kind = Kind::kLost;
    uint64_t sectors = 0;  // kPrefix / kSuffix: host sectors that landed (>= 1)
  };

  // The writes that decide the state after a power cut at time `time`.
  struct CrashPoint {
    uint64_t time = 0;
    std::vector<size_t> durable;   // op indices, in application order
    std::vector<size_t> possible;  // op indices, in application order
  };

  // `path` is what path() reports (a qcow2 image resolves a relative backing
  // file name against it); `initial` the contents, durable from the start.
  CrashFile(std::string path, std::vector<uint8_t> initial, uint64_t seed);

  Task<Status> ReadV(const iovec* iov, int iovcnt, uint64_t offset) override;
  Task<Status> WriteV(const iovec* iov, int iovcnt, uint64_t offset) override;
  Task<Status> Flush() override;
  Task<Status> Discard(uint64_t offset, uint64_t length) override;
  Task<Status> WriteZeroes(uint64_t offset, uint64_t length, bool allocate) override;
  Result<uint64_t> Size() override { return static_cast<uint64_t>(bytes_.size()); }
  // Only growth is supported (it is recorded as a zero write past the end).
  Status Truncate(uint64_t size) override;
  Result<uint64_t> AllocatedBytes() override { return Size(); }
  const std::string& path() const override { return path_; }
  bool read_only() const override { return false; }

  // Controlled interleaving: the next write issued (not a flush) is held
  // after its issue, before it takes effect, until ReleaseHeld().
  void HoldNextWrite() { hold_next_ = true; }
  bool holding() const { return static_cast<bool>(held_); }
  // Index in history() of the write being held (or last held).
  size_t held_index() const { return held_index_; }
  void ReleaseHeld();

  // The logical clock: Tick() advances it and returns the new time.
  uint64_t Now() const { return clock_; }
  uint64_t Tick() { return ++clock_; }

  const std::vector<Op>& history() const { return ops_; }
  const std::vector<uint8_t>& current() const { return bytes_; }
  const std::vector<uint8_t>& initial() const { return initial_; }
  uint64_t flushes_completed() const { return flushes_completed_; }

  // Which writes are durable and which are possible after a cut at `time`
  // (0 <= time <= Now() + 1: everything stamped before `time` happened).
  CrashPoint PointAt(uint64_t time) const;
  // The file a cut at `p` leaves when possible write i has fate fates[i].
  std::vector<uint8_t> BuildState(const CrashPoint& p, const std::vector<Fate>& fates) const;
  // Random fates for `p`: a per-state mode picks which writes land (none,
  // all, a random mix, only the newest or only the oldest); a write that
  // lands and spans several sectors is sometimes torn.
  std::vector<Fate> SampleFates(const CrashPoint& p, std::mt19937_64& rng) const;
  // A random cut time in [1, Now() + 1]; more than half of the time just
  // after a flush was issued, where the most writes are in doubt.
  uint64_t SampleTime(std::mt19937_64& rng) const;
  // "t=123 durable=40 possible=7 [w:whole w:lost w:prefix(2) ...]".
  std::string Describe(const CrashPoint& p, const std::vector<Fate>& fates) const;

 private:
  // Suspends 1..3 times.
  Task<void> Jitter();
  Task<Status> Record(Op op);
  static void Apply(std::vector<uint8_t>* bytes, const Op& op, uint64_t from, uint64_t to);

  std::string path_;
  std::vector<uint8_t> initial_;
  std::vector<uint8_t> bytes_;
  std::vector<Op> ops_;
  uint64_t clock_ = 0;
  uint64_t flushes_completed_ = 0;
  std::mt19937_64 rng_;
  bool hold_next_ = false;
  std::coroutine_handle<> held_;
  size_t held_index_ = 0;
};

}  // namespace kvblk::testing

#endif  // KVBLK_TESTS_SUPPORT_CRASH_FILE_H_
