// The output of `kvblk io` in qemu-io's formats: the per-request report,
// the hexdump of `read -v` and the lines of `map`.
#ifndef KVBLK_TOOLS_IO_REPORT_H_
#define KVBLK_TOOLS_IO_REPORT_H_

#include <cstddef>
#include <cstdint>
#include <string>

namespace kvblk::cli {

// qemu-io's elapsed time: "00.00 sec" below a minute, "MM:SS.cc" below an
// hour, "H:MM:SS.cc" beyond.
std::string FormatIoTime(double seconds);

// Prints "<verb> LEN/LEN bytes at offset OFF" and the statistics line
// "<size>, 1 ops; <time> (<rate>/sec and <n> ops/sec)" to stdout.
void PrintIoReport(const char* verb, uint64_t offset, uint64_t length, double seconds);

// Prints `data` (which was read at `offset`) 16 bytes a line:
// "%08x:  " then each byte as "%02x ", a blank, and the bytes again as text
// (letters and digits as themselves, anything else as '.').
void PrintHexDump(const uint8_t* data, size_t length, uint64_t offset);

// Prints one `map` line: "<size> (0x..) bytes [    allocated|not allocated]
// at offset <size> (0x..)".
void PrintMapLine(uint64_t offset, uint64_t length, bool allocated);

}  // namespace kvblk::cli

#endif  // KVBLK_TOOLS_IO_REPORT_H_
