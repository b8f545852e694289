#include "tools/cli_util.h"

#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace kvblk::cli {

namespace {

std::string SpecKey(const OptionSpec& spec) {
  return spec.long_name.empty() ? std::string(1, spec.short_name) : spec.long_name;
}

bool LooksLikeNegativeNumber(const std::string& token) {
  return token.size() > 1 && token[0] == '-' && std::isdigit(static_cast<unsigned char>(token[1]));
}

}  // namespace

bool ParsedArgs::Has(std::string_view name) const { return Count(name) > 0; }

size_t ParsedArgs::Count(std::string_view name) const {
  auto it = values_.find(name);
  return it == values_.end() ? 0 : it->second.size();
}

std::string ParsedArgs::Get(std::string_view name, const std::string& fallback) const {
  auto it = values_.find(name);
  if (it == values_.end() || it->second.empty()) return fallback;
  return it->second.back();
}

std::vector<std::string> ParsedArgs::GetAll(std::string_view name) const {
  auto it = values_.find(name);
  return it == values_.end() ? std::vector<std::string>{} : it->second;
}

Result<ParsedArgs> ParseArgs(const std::vector<std::string>& args,
                             const std::vector<OptionSpec>& specs) {
  ParsedArgs out;
  // Each spec is reachable both under its key and under its short letter.
  auto record = [&out](const OptionSpec& spec, std::string value) {
    std::string key = SpecKey(spec);
    out.values_[key].push_back(value);
    if (spec.short_name != 0 && !spec.long_name.empty()) {
      out.values_[std::string(1, spec.short_name)].push_back(std::move(value));
    }
  };
  bool options_done = false;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& token = args[i];
    if (options_done || token.size() < 2 || token[0] != '-' || LooksLikeNegativeNumber(token)) {
      out.positional_.push_back(token);
      continue;
    }
    if (token == "--") {
      options_done = true;
      continue;
    }
    if (token[1] == '-') {
      std::string name = token.substr(2);
      std::string value;
      bool has_inline_value = false;
      if (size_t eq = name.find('='); eq != std::string::npos) {
        value = name.substr(eq + 1);
        name.resize(eq);
        has_inline_value = true;
      }
      const OptionSpec* spec = nullptr;
      for (const OptionSpec& s : specs) {
        if (!s.long_name.empty() && s.long_name == name) spec = &s;
      }
      if (spec == nullptr) {
        return Status::InvalidArgument("unknown option '--" + name + "'");
      }
      if (spec->value_name.empty()) {
        if (has_inline_value) {
          return Status::InvalidArgument("option '--" + name + "' does not take a value");
        }
      } else if (!has_inline_value) {
        if (i + 1 >= args.size()) {
          return Status::InvalidArgument("option '--" + name + "' requires a value");
        }
        value = args[++i];
      }
      record(*spec, std::move(value));
      continue;
    }
    // One or more bundled short options.
    for (size_t pos = 1; pos < token.size(); ++pos) {
      char letter = token[pos];
      const OptionSpec* spec = nullptr;
      for (const OptionSpec& s : specs) {
        if (s.short_name == letter) spec = &s;
      }
      if (spec == nullptr) {
        return Status::InvalidArgument(std::string("unknown option '-") + letter + "'");
      }
      if (spec->value_name.empty()) {
        record(*spec, "");
        continue;
      }
      std::string value;
      if (pos + 1 < token.size()) {
        value = token.substr(pos + 1);
      } else if (i + 1 < args.size()) {
        value = args[++i];
      } else {
        return Status::InvalidArgument(std::string("option '-") + letter + "' requires a value");
      }
      record(*spec, std::move(value));
      break;
    }
  }
  return out;
}

std::string FormatOptionHelp(const std::vector<OptionSpec>& specs) {
  std::vector<std::string> left;
  size_t width = 0;
  for (const OptionSpec& spec : specs) {
    std::string text = "  ";
    if (spec.short_name != 0) {
      text += std::string("-") + spec.short_name;
      if (!spec.long_name.empty()) text += ", --" + spec.long_name;
    } else {
      text += "    --" + spec.long_name;
    }
    if (!spec.value_name.empty()) {
      text += (spec.short_name != 0 && spec.long_name.empty() ? " " : "=") + spec.value_name;
    }
    width = std::max(width, text.size());
    left.push_back(std::move(text));
  }
  std::string out = "Options:\n";
  for (size_t i = 0; i < specs.size(); ++i) {
    out += left[i] + std::string(width + 2 - left[i].size(), ' ') + specs[i].help + "\n";
  }
  return out;
}

OptionSpec HelpOption() { return {'h', "help", "", "print this help and exit"}; }

int Fail(std::string_view command, std::string_view message) {
  std::string line = "kvblk";
  if (!command.empty()) {
    line += " ";
    line += command;
  }
  line += ": ";
  for (char c : message) {
    if (c == '\n') {
      line += "; ";
    } else if (c != '\r') {
      line += c;
    }
  }
  line += "\n";
  std::fflush(stdout);
  std::fputs(line.c_str(), stderr);
  return 1;
}

int Fail(std::string_view command, const Status& status) {
  return Fail(command, status.message().empty() ? status.ToString() : status.message());
}

Result<bool> ParseBool(const std::string& text, const std::string& what) {
  if (text == "on" || text == "yes" || text == "true") return true;
  if (text == "off" || text == "no" || text == "false") return false;
  return Status::InvalidArgument("invalid value '" + text + "' for " + what +
                                 " (expected on or off)");
}

Result<int64_t> ParseInteger(const std::string& text, int64_t min, int64_t max,
                             const std::string& what) {
  if (text.empty() || std::isspace(static_cast<unsigned char>(text[0]))) {
    return Status::InvalidArgument("invalid " + what + " '" + text + "'");
  }
  errno = 0;
  char* end = nullptr;
  long long value = std::strtoll(text.c_str(), &end, 0);
  if (*end != '\0') return Status::InvalidArgument("invalid " + what + " '" + text + "'");
  if (errno == ERANGE || value < min || value > max) {
    return Status::InvalidArgument(what + " '" + text + "' is out of range (" +
                                   std::to_string(min) + ".." + std::to_string(max) + ")");
  }
  return static_cast<int64_t>(value);
}

std::string FormatHumanSize(uint64_t bytes) {
  static constexpr const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  double value = static_cast<double>(bytes);
  int unit = 0;
  // Move up while the number would need four digits in the current unit.
  while (unit < 6 && value >= 1000.0 * std::ldexp(1.0, 10 * unit)) ++unit;
  // "%.3g" would print 999.5..1023.99 as "1e+03"; show those in the next unit.
  if (unit < 6 && value / std::ldexp(1.0, 10 * unit) >= 999.5) ++unit;
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%0.3g %s", value / std::ldexp(1.0, 10 * unit), kUnits[unit]);
  return buf;
}

std::string FormatIoSize(double bytes) {
  static constexpr const char* kUnits[] = {" bytes", " KiB", " MiB", " GiB",
                                           " TiB",   " PiB", " EiB"};
  int unit = 0;
  while (unit < 6 && bytes >= std::ldexp(1.0, 10 * (unit + 1))) ++unit;
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.3f", bytes / std::ldexp(1.0, 10 * unit));
  std::string text = buf;
  if (size_t dot = text.find(".000"); dot != std::string::npos) text.resize(dot);
  return text + kUnits[unit];
}

std::string DirName(const std::string& path) {
  size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

std::string ResolveRelativeTo(const std::string& path, const std::string& relative_to) {
  if (path.empty() || path[0] == '/') return path;
  size_t slash = relative_to.find_last_of('/');
  if (slash == std::string::npos) return path;
  return relative_to.substr(0, slash + 1) + path;
}

void FreeDeleter::operator()(uint8_t* p) const { std::free(p); }

Result<AlignedBuffer> AllocateAlignedBuffer(uint64_t length) {
  constexpr uint64_t kAlign = 4096;
  if (length > UINT64_MAX - kAlign) {
    return Status(StatusCode::kNoSpace,
                  "cannot allocate a buffer of " + std::to_string(length) + " bytes");
  }
  uint64_t rounded = (length + kAlign - 1) / kAlign * kAlign;
  if (rounded == 0) rounded = kAlign;
  void* p = std::aligned_alloc(kAlign, rounded);
  if (p == nullptr) {
    return Status(StatusCode::kNoSpace,
                  "cannot allocate a buffer of " + std::to_string(length) + " bytes");
  }
  std::memset(p, 0, rounded);
  return AlignedBuffer(static_cast<uint8_t*>(p));
}

ProgressBar::ProgressBar(bool enabled, uint64_t total)
    : enabled_(enabled), tty_(isatty(STDERR_FILENO) == 1), total_(total) {
  if (enabled_) Print(0.0);
}

void ProgressBar::Add(uint64_t bytes) {
  done_ += bytes;
  if (!enabled_) return;
  double percent = total_ == 0 ? 100.0 : 100.0 * static_cast<double>(done_) / total_;
  if (percent > 100.0) percent = 100.0;
  if (tty_) {
    auto now = std::chrono::steady_clock::now();
    if (percent - printed_ >= 0.01 && now - last_print_ >= std::chrono::milliseconds(100)) {
      Print(percent);
    }
  } else if (std::floor(percent / 10) > std::floor(printed_ / 10) && percent < 100.0) {
    Print(std::floor(percent / 10) * 10);
  }
}

void ProgressBar::Finish() {
  if (!enabled_) return;
  if (printed_ < 100.0) Print(100.0);
  if (tty_) std::fputc('\n', stderr);
  std::fflush(stderr);
  enabled_ = false;
}

void ProgressBar::Print(double percent) {
  if (tty_) {
    std::fprintf(stderr, "\r    (%3.2f/100%%)", percent);
  } else {
    std::fprintf(stderr, "    (%3.2f/100%%)\n", percent);
  }
  std::fflush(stderr);
  printed_ = percent;
  last_print_ = std::chrono::steady_clock::now();
}

}  // namespace kvblk::cli
