#include "tools/io_command.h"

#include <cctype>
#include <vector>

#include "kvblk/image_create.h"
#include "tools/cli_util.h"

namespace kvblk::cli {

namespace {

std::vector<std::string> SplitWords(const std::string& line) {
  std::vector<std::string> words;
  std::string current;
  for (char c : line) {
    if (std::isspace(static_cast<unsigned char>(c))) {
      if (!current.empty()) words.push_back(std::move(current));
      current.clear();
    } else {
      current += c;
    }
  }
  if (!current.empty()) words.push_back(std::move(current));
  return words;
}

std::vector<OptionSpec> SpecsFor(IoOp op) {
  switch (op) {
    case IoOp::kRead:
      return {{'P', "", "PATTERN", ""}, {'v', "", "", ""}, {'q', "", "", ""}};
    case IoOp::kWrite:
      return {{'P', "", "PATTERN", ""},
              {'z', "", "", ""},
              {'u', "", "", ""},
              {'c', "", "", ""},
              {'q', "", "", ""}};
    case IoOp::kDiscard:
      return {{'q', "", "", ""}};
    case IoOp::kFlush:
    case IoOp::kMap:
      return {};
  }
  return {};
}

Result<uint64_t> ParseByteCount(const std::string& cmd, const std::string& what,
                                const std::string& text) {
  if (!text.empty() && text[0] == '-') {
    return Status::InvalidArgument(cmd + ": negative " + what + " '" + text + "'");
  }
  Result<uint64_t> value = ParseSize(text);
  if (!value.ok()) {
    return Status::InvalidArgument(cmd + ": invalid " + what + " '" + text +
                                   "' (expected bytes with an optional k, M, G, T, P or E suffix)");
  }
  return value;
}

}  // namespace

Result<IoCommand> ParseIoCommand(const std::string& line) {
  std::vector<std::string> words = SplitWords(line);
  if (words.empty()) return Status::InvalidArgument("empty command");
  IoCommand cmd;
  cmd.name = words[0];
  const std::string& name = cmd.name;
  if (name == "read") {
    cmd.op = IoOp::kRead;
  } else if (name == "write") {
    cmd.op = IoOp::kWrite;
  } else if (name == "discard") {
    cmd.op = IoOp::kDiscard;
  } else if (name == "flush" || name == "aio_flush") {
    cmd.op = IoOp::kFlush;
  } else if (name == "map") {
    cmd.op = IoOp::kMap;
  } else {
    return Status::InvalidArgument("unknown command '" + name +
                                   "' (see 'kvblk io --help' for the commands)");
  }
  Result<ParsedArgs> parsed =
      ParseArgs(std::vector<std::string>(words.begin() + 1, words.end()), SpecsFor(cmd.op));
  if (!parsed.ok()) return parsed.status().WithContext(name);
  const ParsedArgs& a = *parsed;
  cmd.verbose = a.Has("v");
  cmd.quiet = a.Has("q");
  cmd.zeroes = a.Has("z");
  cmd.may_unmap = a.Has("u");
  cmd.compressed = a.Has("c");
  if (a.Has("P")) {
    Result<int64_t> pattern = ParseInteger(a.Get("P"), 0, 255, "pattern");
    if (!pattern.ok()) return pattern.status().WithContext(name);
    cmd.pattern = static_cast<uint8_t>(*pattern);
  }
  if (cmd.may_unmap && !cmd.zeroes) {
    return Status::InvalidArgument(name + ": -u requires -z");
  }
  if (cmd.zeroes && (cmd.pattern || cmd.compressed)) {
    return Status::InvalidArgument(name + ": -z cannot be combined with -P or -c");
  }

  const std::vector<std::string>& pos = a.positional();
  const size_t want = (cmd.op == IoOp::kFlush || cmd.op == IoOp::kMap) ? 0 : 2;
  if (pos.size() < want) {
    return Status::InvalidArgument(name + ": expected OFFSET and LENGTH");
  }
  if (pos.size() > want) {
    return Status::InvalidArgument(name + ": unexpected argument '" + pos[want] + "'");
  }
  if (want == 2) {
    Result<uint64_t> offset = ParseByteCount(name, "offset", pos[0]);
    if (!offset.ok()) return offset.status();
    Result<uint64_t> length = ParseByteCount(name, "length", pos[1]);
    if (!length.ok()) return length.status();
    cmd.offset = *offset;
    cmd.length = *length;
    bool buffered = cmd.op == IoOp::kRead || (cmd.op == IoOp::kWrite && !cmd.zeroes);
    if (buffered && cmd.length > kMaxIoRequestBytes) {
      return Status::InvalidArgument(name + ": length cannot exceed " +
                                     std::to_string(kMaxIoRequestBytes) + ", given " + pos[1]);
    }
  }
  return cmd;
}

Status CheckIoCommand(const IoCommand& cmd, uint64_t image_size, bool read_only) {
  if (cmd.Writes() && read_only) {
    return Status::ReadOnly(cmd.name + ": the image is opened read-only (-r)");
  }
  if (cmd.op == IoOp::kFlush || cmd.op == IoOp::kMap) return Status::Ok();
  if (cmd.offset > image_size || cmd.length > image_size - cmd.offset) {
    return Status::InvalidArgument(cmd.name + ": " + std::to_string(cmd.length) +
                                   " bytes at offset " + std::to_string(cmd.offset) +
                                   " go past the end of the image (" + std::to_string(image_size) +
                                   " bytes)");
  }
  return Status::Ok();
}

const char* IoCommandHelp() {
  return "Commands (OFF and LEN take k, M, G, T suffixes):\n"
         "  read [-P PATTERN] [-v] [-q] OFF LEN\n"
         "        read LEN bytes at OFF; -P checks that every byte equals PATTERN (0..255;\n"
         "        a mismatch fails the command), -v hexdumps the data, -q prints nothing\n"
         "  write [-P PATTERN] [-c] [-q] OFF LEN\n"
         "        write LEN bytes of PATTERN (default 0xcd) at OFF; -c writes each\n"
         "        cluster compressed (qcow2; OFF cluster-aligned, LEN whole clusters or\n"
         "        up to the end of the disk, clusters not allocated yet), -q prints nothing\n"
         "  write -z [-u] [-q] OFF LEN\n"
         "        make LEN bytes at OFF read as zeros; -u allows freeing their space\n"
         "  discard [-q] OFF LEN\n"
         "        discard LEN bytes at OFF (they may read back as zeros or old data)\n"
         "  flush, aio_flush\n"
         "        make every completed write durable\n"
         "  map\n"
         "        list the ranges allocated in FILE itself (not in its backing files)\n";
}

}  // namespace kvblk::cli
