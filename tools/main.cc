// kvblk: the command-line tool. Dispatches to one subcommand per file
// (tools/cmd_*.cc); option names follow qemu-img and qemu-io.
#include <cstdio>
#include <exception>
#include <string>
#include <string_view>
#include <vector>

#include "tools/cli_util.h"
#include "tools/commands.h"

namespace kvblk::cli {
namespace {

constexpr const char* kVersion = "0.1.0";

struct Command {
  const char* name;
  int (*run)(const std::vector<std::string>& args);
  const char* summary;
};

constexpr Command kCommands[] = {
    {"create", RunCreate, "create a new qcow2 or raw image"},
    {"info", RunInfo, "show the format, size and settings of an image"},
    {"convert", RunConvert, "copy an image (and its backing chain) into a new image"},
    {"io", RunIo, "run qemu-io style read/write/discard/map commands on an image"},
    {"map", RunMap, "show which ranges of an image hold data, and where"},
    {"check", RunCheck, "check an image's metadata for errors and leaks, and repair them"},
    {"serve", RunServe, "serve an image as a vhost-user-blk device on a Unix socket"},
    {"snapshot", RunSnapshot, "list, create, apply or delete internal snapshots of a qcow2 image"},
    {"resize", RunResize, "change the virtual size of an image"},
};

const Command* FindCommand(std::string_view name) {
  for (const Command& command : kCommands) {
    if (name == command.name) return &command;
  }
  return nullptr;
}

void PrintUsage(FILE* out) {
  std::fprintf(out,
               "usage: kvblk [--help] [--version] COMMAND [ARGS...]\n"
               "\n"
               "kvblk manages qcow2 and raw disk images.\n"
               "\n"
               "Commands:\n");
  for (const Command& command : kCommands) {
    std::fprintf(out, "  %-10s%s\n", command.name, command.summary);
  }
  std::fprintf(out,
               "\n"
               "'kvblk help COMMAND' or 'kvblk COMMAND --help' describes a command and its "
               "options.\n");
}

int Main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty()) {
    PrintUsage(stdout);
    return 1;
  }
  const std::string& first = args[0];
  if (first == "--help" || first == "-h") {
    PrintUsage(stdout);
    return 0;
  }
  if (first == "--version" || first == "-V") {
    std::printf("kvblk %s\n", kVersion);
    return 0;
  }
  if (first == "help") {
    if (args.size() == 1) {
      PrintUsage(stdout);
      return 0;
    }
    if (args.size() > 2) return Fail("help", "expected one command name");
    const Command* command = FindCommand(args[1]);
    if (command == nullptr) {
      return Fail("help", "unknown command '" + args[1] + "' (see 'kvblk --help')");
    }
    return command->run({"--help"});
  }
  if (!first.empty() && first[0] == '-') {
    return Fail("", "unknown option '" + first + "' (see 'kvblk --help')");
  }
  const Command* command = FindCommand(first);
  if (command == nullptr) {
    return Fail("", "unknown command '" + first + "' (see 'kvblk --help')");
  }
  return command->run(std::vector<std::string>(args.begin() + 1, args.end()));
}

}  // namespace
}  // namespace kvblk::cli

int main(int argc, char** argv) {
  // kvblk reports errors as Status values; an exception reaching here is a
  // bug or an allocation failure, reported as one line like any error.
  try {
    return kvblk::cli::Main(argc, argv);
  } catch (const std::exception& e) {
    return kvblk::cli::Fail("", std::string("internal error: ") + e.what());
  }
}
