// kvblk io: a subset of qemu-io. Every -c command is parsed and checked
// against the image before the first one runs; then they run in order, a
// failed command does not stop the later ones, and the exit status is 1 if
// any failed.
#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "kvblk/block_device.h"
#include "kvblk/event_loop.h"
#include "tools/backing_chain.h"
#include "tools/cli_util.h"
#include "tools/commands.h"
#include "tools/image_options.h"
#include "tools/io_command.h"
#include "tools/io_report.h"

namespace kvblk::cli {

namespace {

constexpr const char* kCmd = "io";

std::vector<OptionSpec> IoSpecs() {
  return {
      {'f', "", "FMT", "image format: qcow2 or raw (default: probed from the file)"},
      {'r', "", "", "open the image read-only (write and discard are refused)"},
      {'n', "", "", "bypass the host page cache (O_DIRECT)"},
      {'c', "", "CMD", "run the command line CMD; may be repeated, commands run in order"},
      HelpOption(),
  };
}

void PrintHelp() {
  std::printf(
      "usage: kvblk io [-f FMT] [-r] [-n] -c CMD [-c CMD]... FILE\n"
      "\n"
      "Runs qemu-io style commands on FILE (through its backing chain) and prints their\n"
      "results in qemu-io's format. All commands are checked first (syntax, ranges,\n"
      "read-only); if any is invalid nothing runs. A command that fails at run time\n"
      "(I/O error, -P mismatch) does not stop the others, but kvblk exits with status 1.\n"
      "The image is opened read-write only if some command writes.\n"
      "\n"
      "%s"
      "\n"
      "%s",
      FormatOptionHelp(IoSpecs()).c_str(), IoCommandHelp());
}

using Clock = std::chrono::steady_clock;

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// Reports a command that failed at run time on stderr; returns false.
bool ReportFailure(const IoCommand& cmd, const Status& st) {
  Fail(kCmd, cmd.name + " failed: " + st.message());
  return false;
}

// Each Run* prints what qemu-io prints and returns false if the command
// failed (after reporting why).
bool RunRead(BlockDevice& dev, const IoCommand& cmd) {
  Result<AlignedBuffer> buf = AllocateAlignedBuffer(cmd.length);
  if (!buf.ok()) return ReportFailure(cmd, buf.status());
  Clock::time_point start = Clock::now();
  Status st = RunSync(dev.Read(cmd.offset, buf->get(), cmd.length));
  double seconds = SecondsSince(start);
  if (!st.ok()) return ReportFailure(cmd, st);
  bool ok = true;
  if (cmd.pattern) {
    const uint8_t* data = buf->get();
    for (uint64_t i = 0; i < cmd.length; ++i) {
      if (data[i] != *cmd.pattern) {
        std::printf("Pattern verification failed at offset %" PRIu64 ", %" PRIu64 " bytes\n",
                    cmd.offset, cmd.length);
        ok = false;
        break;
      }
    }
  }
  if (cmd.quiet) return ok;
  if (cmd.verbose) PrintHexDump(buf->get(), cmd.length, cmd.offset);
  PrintIoReport("read", cmd.offset, cmd.length, seconds);
  return ok;
}

// Writes [offset, offset + length) one compressed cluster at a time (the
// device compresses single clusters only).
Status WriteCompressedClusters(BlockDevice& dev, uint64_t offset, const uint8_t* data,
                               uint64_t length) {
  Result<ImageInfo> info = dev.Info();
  if (!info.ok()) return info.status();
  uint64_t cluster = info->cluster_size;
  if (cluster == 0) return RunSync(dev.WriteCompressed(offset, data, length));
  for (uint64_t done = 0; done < length;) {
    uint64_t n = std::min(cluster - (offset + done) % cluster, length - done);
    KVBLK_RETURN_IF_ERROR(RunSync(dev.WriteCompressed(offset + done, data + done, n)));
    done += n;
  }
  return Status::Ok();
}

bool RunWrite(BlockDevice& dev, const IoCommand& cmd) {
  Status st;
  Clock::time_point start;
  if (cmd.zeroes) {
    start = Clock::now();
    st = RunSync(dev.WriteZeroes(cmd.offset, cmd.length, cmd.may_unmap));
  } else {
    Result<AlignedBuffer> buf = AllocateAlignedBuffer(cmd.length);
    if (!buf.ok()) return ReportFailure(cmd, buf.status());
    std::memset(buf->get(), cmd.pattern.value_or(kDefaultWritePattern), cmd.length);
    start = Clock::now();
    st = cmd.compressed ? WriteCompressedClusters(dev, cmd.offset, buf->get(), cmd.length)
                        : RunSync(dev.Write(cmd.offset, buf->get(), cmd.length));
  }
  double seconds = SecondsSince(start);
  if (!st.ok()) return ReportFailure(cmd, st);
  if (!cmd.quiet) PrintIoReport("wrote", cmd.offset, cmd.length, seconds);
  return true;
}

bool RunDiscard(BlockDevice& dev, const IoCommand& cmd) {
  Clock::time_point start = Clock::now();
  Status st = RunSync(dev.Discard(cmd.offset, cmd.length));
  double seconds = SecondsSince(start);
  if (!st.ok()) return ReportFailure(cmd, st);
  if (!cmd.quiet) PrintIoReport("discard", cmd.offset, cmd.length, seconds);
  return true;
}

bool RunMapCommand(BlockDevice& dev, const IoCommand& cmd) {
  const uint64_t size = dev.size();
  uint64_t run_start = 0;
  bool run_allocated = false;
  uint64_t offset = 0;
  while (offset < size) {
    Result<BlockStatus> st = RunSync(dev.GetBlockStatus(offset, size - offset));
    if (!st.ok()) return ReportFailure(cmd, st.status());
    if (st->length == 0 || st->length > size - offset) {
      return ReportFailure(
          cmd, Status::Corruption("invalid block status length " + std::to_string(st->length) +
                                  " at offset " + std::to_string(offset)));
    }
    // Like qemu-io, "allocated" means allocated in FILE itself, not below it.
    bool allocated = st->present && st->depth == 0;
    if (offset > run_start && allocated != run_allocated) {
      PrintMapLine(run_start, offset - run_start, run_allocated);
      run_start = offset;
    }
    run_allocated = allocated;
    offset += st->length;
  }
  if (offset > run_start) PrintMapLine(run_start, offset - run_start, run_allocated);
  return true;
}

bool RunCommand(BlockDevice& dev, const IoCommand& cmd) {
  switch (cmd.op) {
    case IoOp::kRead:
      return RunRead(dev, cmd);
    case IoOp::kWrite:
      return RunWrite(dev, cmd);
    case IoOp::kDiscard:
      return RunDiscard(dev, cmd);
    case IoOp::kMap:
      return RunMapCommand(dev, cmd);
    case IoOp::kFlush: {
      Status st = RunSync(dev.Flush());
      return st.ok() || ReportFailure(cmd, st);
    }
  }
  return false;
}

}  // namespace

int RunIo(const std::vector<std::string>& args) {
  Result<ParsedArgs> parsed = ParseArgs(args, IoSpecs());
  if (!parsed.ok()) return Fail(kCmd, parsed.status());
  const ParsedArgs& a = *parsed;
  if (a.Has("help")) {
    PrintHelp();
    return 0;
  }
  OpenOptions opts;
  opts.format = a.Get("f");
  opts.direct = a.Has("n");
  if (a.Has("f")) {
    Status ok = CheckFormatName(opts.format, "format");
    if (!ok.ok()) return Fail(kCmd, ok);
  }
  const std::vector<std::string>& pos = a.positional();
  if (pos.empty()) return Fail(kCmd, "missing FILE (see 'kvblk io --help')");
  if (pos.size() > 1) return Fail(kCmd, "unexpected argument '" + pos[1] + "'");
  const std::string& path = pos[0];

  std::vector<IoCommand> commands;
  bool writes = false;
  for (const std::string& line : a.GetAll("c")) {
    Result<IoCommand> cmd = ParseIoCommand(line);
    if (!cmd.ok()) return Fail(kCmd, cmd.status());
    writes = writes || cmd->Writes();
    commands.push_back(std::move(*cmd));
  }
  if (commands.empty()) return Fail(kCmd, "no command given (use -c CMD)");
  opts.read_only = a.Has("r") || !writes;

  // Check every command against the image before anything is opened for
  // writing, so an invalid command line leaves the image untouched.
  if (!opts.read_only) {
    Result<ImageInfo> info = ReadImageInfo(path, opts.format);
    if (!info.ok()) return Fail(kCmd, info.status());
    for (const IoCommand& cmd : commands) {
      Status st = CheckIoCommand(cmd, info->virtual_size, false);
      if (!st.ok()) return Fail(kCmd, st);
    }
    if (opts.format.empty()) opts.format = info->format;
  }
  Result<std::unique_ptr<BlockDevice>> dev = OpenImage(path, opts);
  if (!dev.ok()) return Fail(kCmd, dev.status());
  for (const IoCommand& cmd : commands) {
    Status st = CheckIoCommand(cmd, (*dev)->size(), opts.read_only);
    if (!st.ok()) {
      Status closed = CloseImage(std::move(*dev));
      (void)closed;  // the command line error is the one to report
      return Fail(kCmd, st);
    }
  }

  bool all_ok = true;
  for (const IoCommand& cmd : commands) {
    if (!RunCommand(**dev, cmd)) all_ok = false;
    std::fflush(stdout);
  }
  Status closed = CloseImage(std::move(*dev));
  if (!closed.ok()) return Fail(kCmd, closed);
  return all_ok ? 0 : 1;
}

}  // namespace kvblk::cli
