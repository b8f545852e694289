#include "tests/support/test_util.h"

#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>

#include <fstream>
#include <iterator>

namespace kvblk::testing {

TempDir::TempDir() {
  char tmpl[] = "/tmp/kvblk-test-XXXXXX";
  const char* p = mkdtemp(tmpl);
  path_ = p ? p : "/tmp";
}

TempDir::~TempDir() {
  if (path_.rfind("/tmp/kvblk-test-", 0) == 0) {
    std::string cmd = "rm -rf '" + path_ + "'";
    int r = system(cmd.c_str());
    (void)r;
  }
}

CommandResult Sh(const std::string& cmd) {
  CommandResult res;
  std::string full = cmd + " 2>&1";
  FILE* f = popen(full.c_str(), "r");
  if (f == nullptr) return res;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, f)) > 0) res.output.append(buf, n);
  int status = pclose(f);
  res.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return res;
}

std::vector<uint8_t> ReadFileBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), {});
}

std::vector<uint8_t> PatternBytes(size_t len, uint32_t seed) {
  std::vector<uint8_t> v(len);
  uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;
  for (size_t i = 0; i < len; ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    v[i] = static_cast<uint8_t>(x);
  }
  return v;
}

}  // namespace kvblk::testing
