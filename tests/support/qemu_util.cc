#include "tests/support/qemu_util.h"

#include <gtest/gtest.h>
#include <sys/uio.h>

#include <algorithm>
#include <fstream>

#include "kvblk/event_loop.h"

namespace kvblk::testing {

std::string ShellQuote(const std::string& s) {
  std::string out = "'";
  for (char c : s) {
    if (c == '\'') {
      out += "'\\''";
    } else {
      out += c;
    }
  }
  return out + "'";
}

CommandResult ShOk(const std::string& cmd) {
  CommandResult r = Sh(cmd);
  EXPECT_EQ(r.exit_code, 0) << "command failed: " << cmd << "\n" << r.output;
  return r;
}

Result<std::vector<uint8_t>> ReadRange(BlockDevice& dev, uint64_t offset, size_t len) {
  std::vector<uint8_t> out(len);
  Status st = RunSync(dev.Read(offset, out.data(), len));
  if (!st.ok()) return st;
  return out;
}

Result<std::vector<uint8_t>> ReadWholeDevice(BlockDevice& dev, size_t chunk) {
  const uint64_t size = dev.size();
  std::vector<uint8_t> out(size);
  for (uint64_t pos = 0; pos < size; pos += chunk) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(chunk, size - pos));
    // Split unevenly: a small odd head, a middle, and the rest.
    const size_t a = std::min<size_t>(n, 1 + n / 7);
    const size_t b = std::min<size_t>(n - a, n / 2);
    iovec iov[3] = {{out.data() + pos, a}, {out.data() + pos + a, b},
                    {out.data() + pos + a + b, n - a - b}};
    Status st = RunSync(dev.Read(pos, iov, 3));
    if (!st.ok()) return st;
  }
  return out;
}

void ExpectQemuCheckClean(const std::string& image) {
  CommandResult r = Sh("qemu-img check " + ShellQuote(image));
  EXPECT_EQ(r.exit_code, 0) << "qemu-img check " << image << ":\n" << r.output;
  EXPECT_NE(r.output.find("No errors were found"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("leaked"), std::string::npos) << r.output;
}

void ExpectQemuCompareEqual(const std::string& image, const std::string& raw) {
  CommandResult r =
      Sh("qemu-img compare -f qcow2 -F raw " + ShellQuote(image) + " " + ShellQuote(raw));
  EXPECT_EQ(r.exit_code, 0) << "qemu-img compare " << image << " " << raw << ":\n" << r.output;
}

bool HasCompressedClusters(const std::string& image) {
  CommandResult map = ShOk("qemu-img map --output=json " + ShellQuote(image));
  size_t pos = 0;
  while (pos < map.output.size()) {
    size_t eol = std::min(map.output.find('\n', pos), map.output.size());
    std::string line = map.output.substr(pos, eol - pos);
    if (line.find("\"data\": true") != std::string::npos &&
        line.find("\"offset\"") == std::string::npos) {
      return true;
    }
    pos = eol + 1;
  }
  return false;
}

void WriteFileBytes(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  out.close();
  EXPECT_TRUE(out.good()) << "could not write " << path;
}

int64_t FirstDifference(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b) {
  const size_t n = std::min(a.size(), b.size());
  auto mm = std::mismatch(a.begin(), a.begin() + static_cast<std::ptrdiff_t>(n), b.begin());
  if (mm.first != a.begin() + static_cast<std::ptrdiff_t>(n)) {
    return mm.first - a.begin();
  }
  return a.size() == b.size() ? -1 : static_cast<int64_t>(n);
}

}  // namespace kvblk::testing
