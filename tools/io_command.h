// The qemu-io command lines `kvblk io -c` understands: parsing and
// validation, done for every command before any of them runs.
#ifndef KVBLK_TOOLS_IO_COMMAND_H_
#define KVBLK_TOOLS_IO_COMMAND_H_

#include <cstdint>
#include <optional>
#include <string>

#include "kvblk/status.h"

namespace kvblk::cli {

enum class IoOp : uint8_t { kRead, kWrite, kDiscard, kFlush, kMap };

// qemu-io's limit on one request (INT_MAX rounded down to 512 bytes).
constexpr uint64_t kMaxIoRequestBytes = 2147483136;

// qemu-io's default pattern byte for `write`.
constexpr uint8_t kDefaultWritePattern = 0xcd;

struct IoCommand {
  std::string name;  // as typed: "read", "write", "aio_flush", ...
  IoOp op = IoOp::kRead;
  uint64_t offset = 0;
  uint64_t length = 0;
  std::optional<uint8_t> pattern;  // -P: verify (read) or fill (write) byte
  bool verbose = false;            // read -v: hexdump the data
  bool quiet = false;              // -q: no report
  bool zeroes = false;             // write -z: write zeroes without data
  bool may_unmap = false;          // write -z -u
  bool compressed = false;         // write -c: compressed clusters (qcow2)

  bool Writes() const { return op == IoOp::kWrite || op == IoOp::kDiscard; }
};

// Parses one command line (words separated by blanks). Returns
// InvalidArgument, with a message that starts with the command name, for an
// unknown command, an unknown or conflicting option, a missing, extra or
// malformed argument, a negative offset or length, or a request larger than
// kMaxIoRequestBytes.
Result<IoCommand> ParseIoCommand(const std::string& line);

// Checks `cmd` against an image of `image_size` bytes: InvalidArgument if the
// range does not fit, ReadOnly for a write when `read_only`.
Status CheckIoCommand(const IoCommand& cmd, uint64_t image_size, bool read_only);

// The command reference printed by `kvblk io --help`.
const char* IoCommandHelp();

}  // namespace kvblk::cli

#endif  // KVBLK_TOOLS_IO_COMMAND_H_
