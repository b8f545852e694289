// Helpers shared by the unit tests: temporary directories, running QEMU's
// tools, and synchronous wrappers.
#ifndef KVBLK_TESTS_SUPPORT_TEST_UTIL_H_
#define KVBLK_TESTS_SUPPORT_TEST_UTIL_H_

#include <cstdint>
#include <string>
#include <vector>

namespace kvblk::testing {

// A directory under /tmp, removed with everything in it on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::string& path() const { return path_; }
  std::string File(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

struct CommandResult {
  int exit_code = -1;
  std::string output;  // stdout and stderr together
};

// Runs `cmd` through /bin/sh and captures its output.
CommandResult Sh(const std::string& cmd);

// Reads a whole file; empty on error.
std::vector<uint8_t> ReadFileBytes(const std::string& path);

// Deterministic pseudo-random bytes.
std::vector<uint8_t> PatternBytes(size_t len, uint32_t seed);

}  // namespace kvblk::testing

#endif  // KVBLK_TESTS_SUPPORT_TEST_UTIL_H_
