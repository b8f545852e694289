#include "tools/io_report.h"

#include <cctype>
#include <cinttypes>
#include <cstdio>

#include "tools/cli_util.h"

namespace kvblk::cli {

std::string FormatIoTime(double seconds) {
  if (seconds < 0) seconds = 0;
  uint64_t centis = static_cast<uint64_t>(seconds * 100);
  unsigned cs = static_cast<unsigned>(centis % 100);
  uint64_t whole = centis / 100;
  char buf[64];
  if (whole < 60) {
    std::snprintf(buf, sizeof(buf), "%02u.%02u sec", static_cast<unsigned>(whole), cs);
  } else if (whole < 3600) {
    std::snprintf(buf, sizeof(buf), "%02u:%02u.%02u", static_cast<unsigned>(whole / 60),
                  static_cast<unsigned>(whole % 60), cs);
  } else {
    std::snprintf(buf, sizeof(buf), "%" PRIu64 ":%02u:%02u.%02u", whole / 3600,
                  static_cast<unsigned>(whole / 60 % 60), static_cast<unsigned>(whole % 60), cs);
  }
  return buf;
}

void PrintIoReport(const char* verb, uint64_t offset, uint64_t length, double seconds) {
  // A request can finish within the clock's resolution; avoid dividing by 0.
  if (seconds <= 0) seconds = 1e-9;
  std::printf("%s %" PRIu64 "/%" PRIu64 " bytes at offset %" PRIu64 "\n", verb, length, length,
              offset);
  std::printf("%s, 1 ops; %s (%s/sec and %.4f ops/sec)\n",
              FormatIoSize(static_cast<double>(length)).c_str(), FormatIoTime(seconds).c_str(),
              FormatIoSize(static_cast<double>(length) / seconds).c_str(), 1.0 / seconds);
}

void PrintHexDump(const uint8_t* data, size_t length, uint64_t offset) {
  for (size_t line = 0; line < length; line += 16) {
    size_t n = length - line < 16 ? length - line : 16;
    std::printf("%08" PRIx64 ":  ", offset + line);
    for (size_t i = 0; i < n; ++i) std::printf("%02x ", data[line + i]);
    std::putchar(' ');
    for (size_t i = 0; i < n; ++i) {
      unsigned char c = data[line + i];
      std::putchar(std::isalnum(c) ? c : '.');
    }
    std::putchar('\n');
  }
}

void PrintMapLine(uint64_t offset, uint64_t length, bool allocated) {
  std::printf("%s (0x%" PRIx64 ") bytes %s at offset %s (0x%" PRIx64 ")\n",
              FormatIoSize(static_cast<double>(length)).c_str(), length,
              allocated ? "    allocated" : "not allocated",
              FormatIoSize(static_cast<double>(offset)).c_str(), offset);
}

}  // namespace kvblk::cli
