// Helpers shared by the libFuzzer targets in tests/fuzz/.
#ifndef KVBLK_TESTS_FUZZ_FUZZ_UTIL_H_
#define KVBLK_TESTS_FUZZ_FUZZ_UTIL_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "kvblk/task.h"

namespace kvblk::fuzz {

// Runs every task started through Start() on the calling thread's event
// loop; Wait() returns once all of them have finished. Lets a target issue
// several requests at once, so that they interleave as they do under a
// guest with a deep queue.
class TaskGroup {
 public:
  // Starts `task`; its result is ignored (the targets look for crashes and
  // sanitizer reports, not for particular errors).
  template <typename T>
  void Start(Task<T> task) {
    ++running_;
    if constexpr (std::is_void_v<T>) {
      Spawn(std::move(task), [this] { --running_; });
    } else {
      Spawn(std::move(task), [this](T) { --running_; });
    }
  }
  // Runs the loop until every started task has finished.
  void Wait();

 private:
  int running_ = 0;
};

// A memfd holding `bytes`, and its /proc/self/fd path (for code that opens
// files by name). Closed on destruction.
class MemfdFile {
 public:
  explicit MemfdFile(const std::vector<uint8_t>& bytes);
  ~MemfdFile();
  MemfdFile(const MemfdFile&) = delete;
  MemfdFile& operator=(const MemfdFile&) = delete;

  bool ok() const { return fd_ >= 0; }
  int fd() const { return fd_; }
  const std::string& path() const { return path_; }

 private:
  int fd_ = -1;
  std::string path_;
};

}  // namespace kvblk::fuzz

#endif  // KVBLK_TESTS_FUZZ_FUZZ_UTIL_H_
