#include "tests/support/crash_file.h"

#include <algorithm>
#include <cstring>

#include "kvblk/event_loop.h"

namespace kvblk::testing {

CrashFile::CrashFile(std::string path, std::vector<uint8_t> initial, uint64_t seed)
    : path_(std::move(path)), initial_(std::move(initial)), bytes_(initial_), rng_(seed) {}

void CrashFile::ReleaseHeld() {
  std::coroutine_handle<> h = held_;
  held_ = nullptr;
  if (h) EventLoop::Current().Schedule(h);
}

Task<void> CrashFile::Jitter() {
  int n = 1 + static_cast<int>(rng_() % 3);
  for (int i = 0; i < n; ++i) co_await EventLoop::Current().Yield();
}

void CrashFile::Apply(std::vector<uint8_t>* bytes, const Op& op, uint64_t from, uint64_t to) {
  if (from >= to) return;
  if (bytes->size() < to) bytes->resize(to);
  if (op.kind == Op::Kind::kWrite) {
    std::memcpy(bytes->data() + from, op.data.data() + (from - op.offset), to - from);
  } else {
    std::memset(bytes->data() + from, 0, to - from);
  }
}

Task<Status> CrashFile::Record(Op op) {
  op.issued = Tick();
  const size_t idx = ops_.size();
  ops_.push_back(std::move(op));
  if (hold_next_ && ops_[idx].kind != Op::Kind::kFlush) {
    struct Hold {
      CrashFile* f;
      bool await_ready() const noexcept { return false; }
      void await_suspend(std::coroutine_handle<> h) { f->held_ = h; }
      void await_resume() const noexcept {}
    };
    hold_next_ = false;
    held_index_ = idx;
    co_await Hold{this};
  }
  co_await Jitter();
  Op& o = ops_[idx];  // the vector may have grown while suspended
  if (o.kind == Op::Kind::kFlush) {
    ++flushes_completed_;
  } else {
    Apply(&bytes_, o, o.offset, o.offset + o.length);
  }
  o.completed = Tick();
  co_return Status::Ok();
}

Task<Status> CrashFile::ReadV(const iovec* iov, int iovcnt, uint64_t offset) {
  co_await Jitter();
  uint64_t pos = offset;
  for (int i = 0; i < iovcnt; ++i) {
    auto* dst = static_cast<uint8_t*>(iov[i].iov_base);
    const size_t n = iov[i].iov_len;
    const size_t avail =
        pos < bytes_.size() ? static_cast<size_t>(std::min<uint64_t>(n, bytes_.size() - pos)) : 0;
    if (avail) std::memcpy(dst, bytes_.data() + pos, avail);
    std::memset(dst + avail, 0, n - avail);
    pos += n;
  }
  co_return Status::Ok();
}

Task<Status> CrashFile::WriteV(const iovec* iov, int iovcnt, uint64_t offset) {
  Op op;
  op.kind = Op::Kind::kWrite;
  op.offset = offset;
  for (int i = 0; i < iovcnt; ++i) {
    const auto* p = static_cast<const uint8_t*>(iov[i].iov_base);
    op.data.insert(op.data.end(), p, p + iov[i].iov_len);
  }
  op.length = op.data.size();
  co_return co_await Record(std::move(op));
}

Task<Status> CrashFile::Flush() {
  Op op;
  op.kind = Op::Kind::kFlush;
  co_return co_await Record(std::move(op));
}

Task<Status> CrashFile::Discard(uint64_t offset, uint64_t length) {
  // A punched hole reads as zeros and never extends the file.
  const uint64_t size = bytes_.size();
  if (offset >= size) co_return Status::Ok();
  Op op;
  op.kind = Op::Kind::kZero;
  op.offset = offset;
  op.length = std::min(length, size - offset);
  co_return co_await Record(std::move(op));
}

Task<Status> CrashFile::WriteZeroes(uint64_t offset, uint64_t length, bool /*allocate*/) {
  Op op;
  op.kind = Op::Kind::kZero;
  op.offset = offset;
  op.length = length;
  co_return co_await Record(std::move(op));
}

Status CrashFile::Truncate(uint64_t size) {
  if (size < bytes_.size()) {
    return Status::NotSupported(path_ + ": CrashFile cannot shrink a file");
  }
  if (size == bytes_.size()) return Status::Ok();
  Op op;
  op.kind = Op::Kind::kZero;
  op.offset = bytes_.size();
  op.length = size - bytes_.size();
  op.issued = Tick();
  Apply(&bytes_, op, op.offset, op.offset + op.length);
  op.completed = Tick();
  ops_.push_back(std::move(op));
  return Status::Ok();
}

CrashFile::CrashPoint CrashFile::PointAt(uint64_t time) const {
  CrashPoint p;
  p.time = time;
  uint64_t durable_before = 0;  // writes completed before this are durable
  for (const Op& o : ops_) {
    if (o.kind == Op::Kind::kFlush && o.completed < time) {
      durable_before = std::max(durable_before, o.issued);
    }
  }
  for (size_t i = 0; i < ops_.size(); ++i) {
    const Op& o = ops_[i];
    if (o.kind == Op::Kind::kFlush || o.issued >= time) continue;
    if (o.completed < durable_before) {
      p.durable.push_back(i);
    } else {
      p.possible.push_back(i);
    }
  }
  // Completion order; writes still in flight at `time` go last, by issue.
  auto key = [&](size_t i) {
    const Op& o = ops_[i];
    return o.completed < time ? o.completed : kInFlight / 2 + o.issued;
  };
  auto by_key = [&](size_t a, size_t b) { return key(a) < key(b); };
  std::sort(p.durable.begin(), p.durable.end(), by_key);
  std::sort(p.possible.begin(), p.possible.end(), by_key);
  return p;
}

std::vector<uint8_t> CrashFile::BuildState(const CrashPoint& p,
                                           const std::vector<Fate>& fates) const {
  std::vector<uint8_t> out = initial_;
  for (size_t i : p.durable) {
    const Op& o = ops_[i];
    Apply(&out, o, o.offset, o.offset + o.length);
  }
  for (size_t k = 0; k < p.possible.size(); ++k) {
    const Op& o = ops_[p.possible[k]];
    const Fate f = k < fates.size() ? fates[k] : Fate{};
    const uint64_t end = o.offset + o.length;
    const uint64_t first = o.offset / kSector;
    const uint64_t last = (end - 1) / kSector;
    switch (f.kind) {
      case Fate::Kind::kLost:
        break;
      case Fate::Kind::kWhole:
        Apply(&out, o, o.offset, end);
        break;
      case Fate::Kind::kPrefix:
        Apply(&out, o, o.offset, std::min(end, (first + f.sectors) * kSector));
        break;
      case Fate::Kind::kSuffix:
        Apply(&out, o, std::max(o.offset, (last + 1 - f.sectors) * kSector), end);
        break;
    }
  }
  return out;
}

std::vector<CrashFile::Fate> CrashFile::SampleFates(const CrashPoint& p,
                                                    std::mt19937_64& rng) const {
  std::uniform_real_distribution<double> u(0.0, 1.0);
  const size_t n = p.possible.size();
  // Which writes land: none, all, a random mix (three densities), or the
  // ones issued after / before a cut in application order (a disk that
  // persisted only its newest, or only its oldest, cached writes).
  const int mode = static_cast<int>(rng() % 7);
  static constexpr double kDensity[] = {0.0, 1.0, 0.5, 0.2, 0.8};
  const size_t cut = n == 0 ? 0 : rng() % (n + 1);
  std::vector<Fate> fates(n);
  for (size_t k = 0; k < n; ++k) {
    bool lands;
    if (mode < 5) {
      lands = u(rng) < kDensity[mode];
    } else if (mode == 5) {
      lands = k >= cut;
    } else {
      lands = k < cut;
    }
    if (!lands) continue;
    const Op& o = ops_[p.possible[k]];
    const uint64_t sectors = (o.offset + o.length - 1) / kSector - o.offset / kSector + 1;
    if (sectors > 1 && u(rng) < 0.25) {
      fates[k].kind = (rng() & 1) ? Fate::Kind::kPrefix : Fate::Kind::kSuffix;
      fates[k].sectors = 1 + rng() % (sectors - 1);
    } else {
      fates[k].kind = Fate::Kind::kWhole;
    }
  }
  return fates;
}

uint64_t CrashFile::SampleTime(std::mt19937_64& rng) const {
  const uint64_t end = clock_ + 1;
  std::vector<uint64_t> flushes;
  for (const Op& o : ops_) {
    if (o.kind == Op::Kind::kFlush) flushes.push_back(o.issued);
  }
  if (flushes.empty() || rng() % 5 < 2) return 1 + rng() % end;
  // Just after a flush was issued: everything since the previous durable
  // point is still in doubt.
  return std::min(end, flushes[rng() % flushes.size()] + 1 + rng() % 2);
}

std::string CrashFile::Describe(const CrashPoint& p, const std::vector<Fate>& fates) const {
  std::string s = "t=" + std::to_string(p.time) + " durable=" + std::to_string(p.durable.size()) +
                  " possible=" + std::to_string(p.possible.size()) + " [";
  for (size_t k = 0; k < p.possible.size(); ++k) {
    const Op& o = ops_[p.possible[k]];
    const Fate f = k < fates.size() ? fates[k] : Fate{};
    if (k) s += ' ';
    s += (o.kind == Op::Kind::kWrite ? "w@" : "z@") + std::to_string(o.offset) + "+" +
         std::to_string(o.length) + ":";
    switch (f.kind) {
      case Fate::Kind::kLost:
        s += "lost";
        break;
      case Fate::Kind::kWhole:
        s += "whole";
        break;
      case Fate::Kind::kPrefix:
        s += "prefix(" + std::to_string(f.sectors) + ")";
        break;
      case Fate::Kind::kSuffix:
        s += "suffix(" + std::to_string(f.sectors) + ")";
        break;
    }
  }
  return s + "]";
}

}  // namespace kvblk::testing
