#include "tests/support/crash_sim_util.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "kvblk/event_loop.h"
#include "tests/support/qemu_util.h"
#include "tests/support/test_util.h"

namespace kvblk::testing {

namespace {

constexpr char kMagic[8] = {'K', 'V', 'C', 'R', 'A', 'S', 'H', '!'};

long JsonNumber(const std::string& json, const std::string& key, long absent) {
  size_t p = json.find("\"" + key + "\":");
  if (p == std::string::npos) return absent;
  return std::strtol(json.c_str() + p + key.size() + 3, nullptr, 10);
}

}  // namespace

void FillSector(uint8_t* p, uint32_t value, uint64_t sector) {
  if (value == kZeroValue) {
    std::memset(p, 0, kSector);
    return;
  }
  std::memcpy(p, kMagic, 8);
  std::memcpy(p + 8, &value, 4);
  std::memcpy(p + 12, &sector, 8);
  for (size_t i = 20; i < kSector; ++i) {
    p[i] = static_cast<uint8_t>(value * 131 + sector * 17 + i / 16);
  }
}

std::vector<uint8_t> Pattern(uint32_t value, uint64_t first_sector, uint64_t sectors) {
  std::vector<uint8_t> v(sectors * kSector);
  for (uint64_t i = 0; i < sectors; ++i) FillSector(&v[i * kSector], value, first_sector + i);
  return v;
}

// The value `p` holds as guest sector `sector`, or -1 if it is none.
int64_t Identify(const uint8_t* p, uint64_t sector) {
  // (Not memcmp(p, p + 1, ...): GCC 12 with the sanitizers flags that call
  // as an overread and -Werror stops `make asan`.)
  if (std::all_of(p, p + kSector, [](uint8_t b) { return b == 0; })) return kZeroValue;
  if (std::memcmp(p, kMagic, 8) != 0) return -1;
  uint32_t value;
  std::memcpy(&value, p + 8, 4);
  uint8_t want[kSector];
  FillSector(want, value, sector);
  return std::memcmp(p, want, kSector) == 0 ? value : -1;
}

const char* KindName(GuestOp::Kind k) {
  switch (k) {
    case GuestOp::Kind::kWrite:
      return "write";
    case GuestOp::Kind::kZeroes:
      return "zeroes";
    case GuestOp::Kind::kDiscard:
      return "discard";
    case GuestOp::Kind::kFlush:
      return "flush";
    case GuestOp::Kind::kCompressed:
      return "compressed";
  }
  return "?";
}

Expectation::Expectation(const std::deque<GuestOp>& ops, uint64_t t, uint64_t sectors,
                         uint32_t initial)
    : allowed_(sectors) {
  uint64_t g = 0;  // writes completed before g are durable
  for (const auto& op : ops) {
    if (op.kind == GuestOp::Kind::kFlush && op.status.ok() && op.completed < t) {
      g = std::max(g, op.issued);
    }
  }
  // Per sector: the durable ops and the possible ones that touch it.
  std::vector<std::vector<const GuestOp*>> durable(sectors), possible(sectors);
  for (const auto& op : ops) {
    if (op.kind == GuestOp::Kind::kFlush || !op.status.ok() || op.issued >= t) continue;
    uint64_t first = op.offset / kSector;
    uint64_t end = std::min(sectors, (op.offset + op.length + kSector - 1) / kSector);
    auto& dst = op.completed < g ? durable : possible;
    for (uint64_t s = first; s < end; ++s) dst[s].push_back(&op);
  }
  for (uint64_t s = 0; s < sectors; ++s) {
    auto& a = allowed_[s];
    bool overwritten = false;
    for (const GuestOp* x : durable[s]) {
      if (x->kind == GuestOp::Kind::kDiscard) continue;
      overwritten = true;
    }
    if (!overwritten) a.push_back(initial);
    for (const GuestOp* x : durable[s]) {
      bool superseded = false;
      for (const GuestOp* y : durable[s]) {
        if (y->kind != GuestOp::Kind::kDiscard && x->completed < y->issued) superseded = true;
      }
      if (!superseded) a.push_back(ValueOf(*x));
    }
    for (const GuestOp* x : possible[s]) a.push_back(ValueOf(*x));
    std::sort(a.begin(), a.end());
    a.erase(std::unique(a.begin(), a.end()), a.end());
  }
}

bool Expectation::Allows(uint64_t sector, int64_t value) const {
  const auto& a = allowed_[sector];
  return value >= 0 && std::binary_search(a.begin(), a.end(), static_cast<uint32_t>(value));
}

std::string Expectation::Describe(uint64_t sector) const {
  std::string s = "{";
  for (uint32_t v : allowed_[sector]) s += (s.size() > 1 ? "," : "") + std::to_string(v);
  return s + "}";
}

uint32_t Expectation::ValueOf(const GuestOp& op) {
  return op.kind == GuestOp::Kind::kWrite || op.kind == GuestOp::Kind::kCompressed ? op.value
                                                                                   : kZeroValue;
}

bool DrainUntil(const std::function<bool()>& done, std::chrono::seconds limit) {
  EventLoop& loop = EventLoop::Current();
  auto idle_since = std::chrono::steady_clock::now();
  while (!done()) {
    if (loop.RunOnce()) {
      idle_since = std::chrono::steady_clock::now();
    } else if (std::chrono::steady_clock::now() - idle_since > limit) {
      return false;
    }
  }
  return true;
}

// Runs `qemu-img check --output=json` on every file (a few at a time).
std::vector<QemuCheck> QemuCheckAll(const std::vector<std::string>& files) {
  std::string list;
  for (const auto& f : files) list += ShellQuote(f) + " ";
  Sh("printf '%s\\n' " + list +
     "| xargs -P 3 -I{} sh -c 'qemu-img check --output=json \"$1\" > \"$1.json\" 2>&1; "
     "echo $? > \"$1.rc\"' _ {}");
  std::vector<QemuCheck> out;
  for (const auto& f : files) {
    QemuCheck c;
    auto json = ReadFileBytes(f + ".json");
    c.output.assign(json.begin(), json.end());
    auto rc = ReadFileBytes(f + ".rc");
    if (!rc.empty()) c.exit_code = std::atoi(std::string(rc.begin(), rc.end()).c_str());
    // `corruptions` and `leaks` are left out of the JSON when zero.
    c.corruptions = JsonNumber(c.output, "corruptions", 0);
    c.check_errors = JsonNumber(c.output, "check-errors", -1);
    c.leaks = JsonNumber(c.output, "leaks", 0);
    std::remove((f + ".json").c_str());
    std::remove((f + ".rc").c_str());
    out.push_back(std::move(c));
  }
  return out;
}

QemuCheck QemuCheckOne(const std::string& path) { return QemuCheckAll({path})[0]; }

}  // namespace kvblk::testing
