// Helpers shared by the kvblk subcommands: argument parsing, error
// printing, size formatting in qemu-img's style, and the progress bar.
//
// Every subcommand is a function `int Run(const std::vector<std::string>&)`
// that receives the arguments after its name and returns the process exit
// status (0 on success, 1 on any failure).
#ifndef KVBLK_TOOLS_CLI_UTIL_H_
#define KVBLK_TOOLS_CLI_UTIL_H_

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "kvblk/status.h"

namespace kvblk::cli {

// ---------------------------------------------------------------------------
// Argument parsing

// One option a command accepts. An option is known by its long name, or by
// its short letter when it has no long name.
struct OptionSpec {
  char short_name = 0;     // 0: long form only
  std::string long_name;   // "": short form only
  std::string value_name;  // "": a flag; otherwise the option takes a value
  std::string help;        // one line, shown by --help
};

// The result of ParseArgs: option values and positional arguments in order.
class ParsedArgs {
 public:
  // True if the option (long name or single-letter short name) was given.
  bool Has(std::string_view name) const;
  // Number of times the option was given.
  size_t Count(std::string_view name) const;
  // The last value given for the option, or `fallback` if it was not given.
  std::string Get(std::string_view name, const std::string& fallback = "") const;
  // Every value given for the option, in order (empty if none).
  std::vector<std::string> GetAll(std::string_view name) const;
  const std::vector<std::string>& positional() const { return positional_; }

 private:
  friend Result<ParsedArgs> ParseArgs(const std::vector<std::string>& args,
                                      const std::vector<OptionSpec>& specs);
  std::map<std::string, std::vector<std::string>, std::less<>> values_;
  std::vector<std::string> positional_;
};

// Parses `args` getopt-style: options and positional arguments may be mixed;
// "-abc" bundles flags; "-fVALUE", "-f VALUE", "--name=VALUE" and
// "--name VALUE" all give a value; "--" ends the options. A token that looks
// like a negative number ("-5", "-0x10") is positional, so commands can
// reject it with a precise message. InvalidArgument names an unknown option
// or one whose value is missing.
Result<ParsedArgs> ParseArgs(const std::vector<std::string>& args,
                             const std::vector<OptionSpec>& specs);

// The "Options:" block of a --help text, one aligned line per option.
std::string FormatOptionHelp(const std::vector<OptionSpec>& specs);

// The -h/--help option every command accepts.
OptionSpec HelpOption();

// ---------------------------------------------------------------------------
// Errors

// Prints "kvblk <command>: <message>" as a single line on stderr (newlines in
// the message become "; ") and returns 1, the exit status for failures.
int Fail(std::string_view command, std::string_view message);
// Fail() with the message of `status` (status messages name the file and
// the structure involved, so the kind is not repeated).
int Fail(std::string_view command, const Status& status);

// ---------------------------------------------------------------------------
// Values

// Parses "on"/"off" (also yes/no, true/false). InvalidArgument otherwise,
// naming `what`.
Result<bool> ParseBool(const std::string& text, const std::string& what);

// Parses a whole decimal, hex (0x) or octal (0) number into [min, max].
Result<int64_t> ParseInteger(const std::string& text, int64_t min, int64_t max,
                             const std::string& what);

// qemu-img's human size: three significant digits and a binary unit chosen
// so the number stays below 1000 ("196 KiB", "1 GiB", "0.977 MiB", "0 B").
std::string FormatHumanSize(uint64_t bytes);

// qemu-io's size: "%.3f" with the unit, ".000" dropped ("64 KiB",
// "1.125 MiB", "40 bytes").
std::string FormatIoSize(double bytes);

// The directory part of `path` ("." if it has none).
std::string DirName(const std::string& path);
// `path` resolved against the directory of `relative_to` unless absolute.
std::string ResolveRelativeTo(const std::string& path, const std::string& relative_to);

// ---------------------------------------------------------------------------
// Buffers

struct FreeDeleter {
  void operator()(uint8_t* p) const;
};
// A heap buffer aligned to 4096 bytes (good for O_DIRECT), owned.
using AlignedBuffer = std::unique_ptr<uint8_t[], FreeDeleter>;

// A zero-filled AlignedBuffer of at least `length` bytes (at least one
// page), or NoSpace if the allocation fails.
Result<AlignedBuffer> AllocateAlignedBuffer(uint64_t length);

// ---------------------------------------------------------------------------
// Progress

// qemu-img's "    (42.00/100%)" progress report on stderr. On a terminal the
// line is rewritten in place; otherwise one line is printed per 10% step so
// logs stay short. A disabled bar prints nothing. Not thread-safe: update it
// from the event loop thread only.
class ProgressBar {
 public:
  ProgressBar(bool enabled, uint64_t total);
  // Records `bytes` more of the total as done.
  void Add(uint64_t bytes);
  // Prints 100% (if enabled) and ends the line.
  void Finish();

 private:
  void Print(double percent);

  bool enabled_;
  bool tty_;
  uint64_t total_;
  uint64_t done_ = 0;
  double printed_ = -1;  // last percentage shown
  std::chrono::steady_clock::time_point last_print_;
};

}  // namespace kvblk::cli

#endif  // KVBLK_TOOLS_CLI_UTIL_H_
