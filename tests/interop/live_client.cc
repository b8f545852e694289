// live_client: the client of the end-to-end live snapshot test
// (tests/interop/live_snapshot_test.sh, issue 5).
//
//   live_client run VHOST_SOCKET CONTROL_SOCKET LOG [options]
//     Plays the guest and the operator at once. One thread keeps `depth`
//     stamped 4 KiB writes in flight on a vhost-user-blk queue; another
//     takes `snapshots` snapshots (s1, s2, ...) and grows the disk `grows`
//     times through the control socket while the writes go on. Every event
//     gets a tick of one shared logical clock; the log records, per write,
//     when it was published and when its completion was seen, and per
//     snapshot, when the command was sent and when the reply arrived.
//     Exit status 1 if any request failed or any command was refused.
//
//   live_client verify LOG DIR
//     DIR holds s1.raw ... (each snapshot read back by `qemu-img convert
//     -l snapshot.name=sN`) and active.raw. For every 4 KiB block of every
//     snapshot, the stamp found must be the last write that completed
//     before the snapshot was requested, or a later write to that block
//     that was published before the reply came (in flight meanwhile);
//     never an older one and never one published after the reply. Each
//     snapshot has the disk size of its moment; active.raw holds every
//     block's last write. Exit status 1 on any mismatch.
//
// Writes to one block never overlap in time (a block in flight is not
// picked again), so each block's writes are totally ordered and the rule
// above is exact.
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "perf/fio/vhost_user_client.h"

namespace {

using kvblk::perf::BlkCompletion;
using kvblk::perf::BlkQueue;
using kvblk::perf::VhostUserBlkClient;
using kvblk::perf::VhostUserClientOptions;

constexpr uint64_t kBlock = 4096;
constexpr char kMagic[8] = {'K', 'V', 'B', 'L', 'K', 'L', 'I', 'V'};
constexpr uint8_t kStatusOk = 0;  // VIRTIO_BLK_S_OK

// --- stamps ------------------------------------------------------------------

// Fills `buf` (one block) with write `seq`'s stamp for `block`: magic,
// block number, sequence number, then bytes derived from both, so a torn
// or misplaced block is recognised.
void Stamp(uint8_t* buf, uint64_t block, uint64_t seq) {
  std::memcpy(buf, kMagic, 8);
  std::memcpy(buf + 8, &block, 8);
  std::memcpy(buf + 16, &seq, 8);
  uint64_t x = seq * 0x9e3779b97f4a7c15ull ^ block;
  for (uint64_t i = 24; i + 8 <= kBlock; i += 8) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    std::memcpy(buf + i, &x, 8);
  }
}

// The write sequence number a block holds: 0 for all zeros (never
// written), -1 for anything that is not an intact stamp of this block.
int64_t ReadStamp(const uint8_t* buf, uint64_t block) {
  bool zero = true;
  for (uint64_t i = 0; i < kBlock && zero; ++i) zero = buf[i] == 0;
  if (zero) return 0;
  uint64_t b, seq;
  std::memcpy(&b, buf + 8, 8);
  std::memcpy(&seq, buf + 16, 8);
  if (std::memcmp(buf, kMagic, 8) != 0 || b != block || seq == 0) return -1;
  std::vector<uint8_t> want(kBlock);
  Stamp(want.data(), block, seq);
  if (std::memcmp(want.data(), buf, kBlock) != 0) return -1;
  return static_cast<int64_t>(seq);
}

// --- the log -------------------------------------------------------------------

struct WriteRec {
  uint64_t block = 0;
  uint64_t seq = 0;
  uint64_t submit = 0;    // clock tick just before the request was published
  uint64_t complete = 0;  // clock tick just after its completion was seen
  int status = -1;        // virtio status byte
};

struct SnapRec {
  std::string name;
  uint64_t sent = 0;   // tick just before the command was sent
  uint64_t reply = 0;  // tick just after the reply line arrived
  uint64_t size = 0;   // disk size while it was taken
  double wait_ms = 0;  // wall time from send to reply
  uint64_t in_flight = 0;  // writes in flight when it was sent
};

struct Log {
  uint64_t final_size = 0;
  std::vector<SnapRec> snaps;
  std::vector<WriteRec> writes;  // in sequence order (seq = index + 1)
};

bool SaveLog(const Log& log, const std::string& path) {
  std::ofstream out(path);
  out << "final_size " << log.final_size << "\n";
  for (const SnapRec& s : log.snaps) {
    out << "snapshot " << s.name << " " << s.sent << " " << s.reply << " " << s.size << " "
        << s.wait_ms << " " << s.in_flight << "\n";
  }
  for (const WriteRec& w : log.writes) {
    out << "write " << w.block << " " << w.seq << " " << w.submit << " " << w.complete << " "
        << w.status << "\n";
  }
  return static_cast<bool>(out);
}

bool LoadLog(const std::string& path, Log* log) {
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream ls(line);
    std::string kind;
    ls >> kind;
    if (kind == "final_size") {
      ls >> log->final_size;
    } else if (kind == "snapshot") {
      SnapRec s;
      ls >> s.name >> s.sent >> s.reply >> s.size >> s.wait_ms >> s.in_flight;
      log->snaps.push_back(s);
    } else if (kind == "write") {
      WriteRec w;
      ls >> w.block >> w.seq >> w.submit >> w.complete >> w.status;
      log->writes.push_back(w);
    } else {
      return false;
    }
    if (!ls && !ls.eof()) return false;
  }
  return !log->writes.empty() || !log->snaps.empty();
}

// --- the control socket ---------------------------------------------------------

class ControlClient {
 public:
  ~ControlClient() {
    if (fd_ >= 0) close(fd_);
  }
  bool Connect(const std::string& path) {
    fd_ = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    if (fd_ < 0 || path.size() >= sizeof(addr.sun_path)) return false;
    std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
    return connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  }
  bool Send(const std::string& cmd) {
    std::string line = cmd + "\n";
    size_t done = 0;
    while (done < line.size()) {
      ssize_t n = send(fd_, line.data() + done, line.size() - done, MSG_NOSIGNAL);
      if (n <= 0) return false;
      done += static_cast<size_t>(n);
    }
    return true;
  }
  // The next reply line (without the newline); empty when the server hung up.
  std::string ReadLine() {
    for (;;) {
      size_t nl = buf_.find('\n');
      if (nl != std::string::npos) {
        std::string line = buf_.substr(0, nl);
        buf_.erase(0, nl + 1);
        return line;
      }
      char tmp[4096];
      ssize_t n = recv(fd_, tmp, sizeof(tmp), 0);
      if (n <= 0) return "";
      buf_.append(tmp, static_cast<size_t>(n));
    }
  }

 private:
  int fd_ = -1;
  std::string buf_;
};

// --- run ------------------------------------------------------------------------

struct RunOptions {
  int snapshots = 10;
  int grows = 2;
  uint64_t grow_bytes = 32ull << 20;
  unsigned depth = 32;
  int interval_ms = 150;  // between control commands
  uint64_t seed = 1;
};

struct Shared {
  std::atomic<uint64_t> clock{1};
  std::atomic<uint64_t> active_blocks{0};  // blocks the writer may use
  std::atomic<uint64_t> in_flight{0};
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> failed{0};
};

uint64_t Tick(Shared* s) { return s->clock.fetch_add(1); }

// The writer: keeps `depth` stamped writes in flight until told to stop,
// then waits for the rest.
bool RunWriter(VhostUserBlkClient* client, const RunOptions& opt, Shared* sh,
               std::vector<WriteRec>* writes) {
  BlkQueue& q = client->queue(0);
  const unsigned depth = std::min(opt.depth, q.capacity());
  std::vector<uint8_t*> bufs;
  std::vector<unsigned> free_bufs;
  for (unsigned i = 0; i < depth; ++i) {
    auto b = client->AllocData(kBlock);
    if (!b.ok()) {
      std::fprintf(stderr, "live_client: %s\n", b.status().ToString().c_str());
      return false;
    }
    bufs.push_back(static_cast<uint8_t*>(*b));
    free_bufs.push_back(i);
  }
  struct Pending {
    size_t rec;
    unsigned buf;
  };
  std::vector<Pending> pending(depth);
  std::vector<bool> busy;  // block -> a write is in flight
  std::mt19937_64 rng(opt.seed);
  std::vector<BlkCompletion> done;
  std::vector<size_t> added;
  while (!sh->stop.load() || q.in_flight() > 0) {
    const uint64_t blocks = sh->active_blocks.load();
    if (busy.size() < blocks) busy.resize(blocks, false);
    added.clear();
    while (!sh->stop.load() && !free_bufs.empty()) {
      uint64_t block = rng() % blocks;
      int tries = 0;
      while (busy[block] && ++tries < 64) block = rng() % blocks;
      if (busy[block]) break;
      const unsigned b = free_bufs.back();
      WriteRec w;
      w.block = block;
      w.seq = writes->size() + 1;
      Stamp(bufs[b], block, w.seq);
      writes->push_back(w);
      pending[b] = Pending{writes->size() - 1, b};
      kvblk::Status st = q.Add(BlkQueue::Op::kWrite, block * kBlock, bufs[b], kBlock, &pending[b]);
      if (!st.ok()) {
        std::fprintf(stderr, "live_client: add: %s\n", st.ToString().c_str());
        return false;
      }
      free_bufs.pop_back();
      busy[block] = true;
      added.push_back(writes->size() - 1);
    }
    if (!added.empty()) {
      for (size_t r : added) (*writes)[r].submit = Tick(sh);
      sh->in_flight.fetch_add(added.size());
      q.Publish();
    }
    q.WaitForInterrupt(5);
    done.clear();
    q.Reap(&done, depth);
    for (const BlkCompletion& c : done) {
      const uint64_t t = Tick(sh);
      auto* p = static_cast<Pending*>(c.cookie);
      WriteRec& w = (*writes)[p->rec];
      w.complete = t;
      w.status = c.status;
      if (c.status != kStatusOk) sh->failed.fetch_add(1);
      busy[w.block] = false;
      free_bufs.push_back(p->buf);
    }
    sh->in_flight.fetch_sub(done.size());
  }
  return true;
}

// The operator: snapshots and grows through the control socket.
bool RunControl(const std::string& ctl_path, uint64_t start_size, const RunOptions& opt,
                Shared* sh, std::vector<SnapRec>* snaps, uint64_t* final_size) {
  ControlClient ctl;
  if (!ctl.Connect(ctl_path)) {
    std::fprintf(stderr, "live_client: cannot connect to %s\n", ctl_path.c_str());
    return false;
  }
  uint64_t size = start_size;
  // Grows are spread between the snapshots: after snapshot k * N / (G + 1).
  std::vector<int> grow_after;
  for (int g = 1; g <= opt.grows; ++g) grow_after.push_back(g * opt.snapshots / (opt.grows + 1));
  auto pause = [&] { std::this_thread::sleep_for(std::chrono::milliseconds(opt.interval_ms)); };
  pause();
  for (int i = 1; i <= opt.snapshots; ++i) {
    SnapRec s;
    s.name = "s" + std::to_string(i);
    s.size = size;
    s.in_flight = sh->in_flight.load();
    const auto t0 = std::chrono::steady_clock::now();
    s.sent = Tick(sh);
    if (!ctl.Send("snapshot-create " + s.name)) return false;
    const std::string reply = ctl.ReadLine();
    s.reply = Tick(sh);
    s.wait_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0)
                    .count();
    if (reply != "ok") {
      std::fprintf(stderr, "live_client: snapshot-create %s: '%s'\n", s.name.c_str(),
                   reply.c_str());
      return false;
    }
    snaps->push_back(s);
    pause();
    for (int after : grow_after) {
      if (after != i) continue;
      size += opt.grow_bytes;
      if (!ctl.Send("resize " + std::to_string(size))) return false;
      const std::string r = ctl.ReadLine();
      if (r != "ok") {
        std::fprintf(stderr, "live_client: resize %" PRIu64 ": '%s'\n", size, r.c_str());
        return false;
      }
      sh->active_blocks.store(size / kBlock);  // the writer may use the new blocks now
      pause();
    }
  }
  *final_size = size;
  return true;
}

int Run(int argc, char** argv) {
  if (argc < 5) return 2;
  const std::string vhost = argv[2], ctl = argv[3], log_path = argv[4];
  RunOptions opt;
  for (int i = 5; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    const uint64_t v = std::strtoull(argv[i + 1], nullptr, 0);
    if (k == "--snapshots") opt.snapshots = static_cast<int>(v);
    else if (k == "--grows") opt.grows = static_cast<int>(v);
    else if (k == "--grow-bytes") opt.grow_bytes = v;
    else if (k == "--depth") opt.depth = static_cast<unsigned>(v);
    else if (k == "--interval-ms") opt.interval_ms = static_cast<int>(v);
    else if (k == "--seed") opt.seed = v;
    else {
      std::fprintf(stderr, "live_client: unknown option %s\n", k.c_str());
      return 2;
    }
  }
  VhostUserClientOptions copts;
  copts.queue_size = 256;
  copts.data_bytes = 16ull << 20;
  auto client = VhostUserBlkClient::Connect(vhost, copts);
  if (!client.ok()) {
    std::fprintf(stderr, "live_client: %s\n", client.status().ToString().c_str());
    return 1;
  }
  const uint64_t start = (*client)->info().capacity_bytes;
  if (start < kBlock || start % kBlock != 0) {
    std::fprintf(stderr, "live_client: disk size %" PRIu64 " is not a multiple of 4 KiB\n", start);
    return 1;
  }
  Shared sh;
  sh.active_blocks.store(start / kBlock);
  Log log;
  bool writer_ok = false;
  std::thread writer([&] { writer_ok = RunWriter(client->get(), opt, &sh, &log.writes); });
  const bool ctl_ok = RunControl(ctl, start, opt, &sh, &log.snaps, &log.final_size);
  sh.stop.store(true);
  writer.join();
  if (!ctl_ok || !writer_ok) return 1;
  // The image's metadata reaches the disk before the server is stopped.
  ControlClient c;
  if (!c.Connect(ctl) || !c.Send("flush") || c.ReadLine() != "ok") {
    std::fprintf(stderr, "live_client: flush through the control socket failed\n");
    return 1;
  }
  if (!SaveLog(log, log_path)) return 1;
  double max_wait = 0;
  for (const SnapRec& s : log.snaps) max_wait = std::max(max_wait, s.wait_ms);
  std::printf("%zu writes at queue depth %u, %zu snapshots (longest %.1f ms), final size %" PRIu64
              ", %" PRIu64 " failed requests\n",
              log.writes.size(), opt.depth, log.snaps.size(), max_wait, log.final_size,
              sh.failed.load());
  return sh.failed.load() == 0 ? 0 : 1;
}

// --- verify -----------------------------------------------------------------------

bool ReadFile(const std::string& path, std::vector<uint8_t>* out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  out->assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  return true;
}

// Checks one snapshot image against the log; prints what is wrong.
// `hist` maps block -> its writes (indices into log.writes), in order.
bool VerifySnapshot(const Log& log, const std::vector<std::vector<size_t>>& hist,
                    const SnapRec& s, const std::string& path, uint64_t* racing) {
  std::vector<uint8_t> img;
  if (!ReadFile(path, &img)) {
    std::printf("%s: cannot read %s\n", s.name.c_str(), path.c_str());
    return false;
  }
  if (img.size() != s.size) {
    std::printf("%s: size %zu, expected %" PRIu64 "\n", s.name.c_str(), img.size(), s.size);
    return false;
  }
  int bad = 0;
  for (uint64_t b = 0; b < s.size / kBlock; ++b) {
    const int64_t got = ReadStamp(img.data() + b * kBlock, b);
    // The last write completed before the request, and the writes that
    // may also be in the snapshot (published before the reply).
    int64_t must = 0;
    std::vector<int64_t> may;
    for (size_t r : hist[b]) {
      const WriteRec& w = log.writes[r];
      if (w.complete < s.sent) {
        must = static_cast<int64_t>(w.seq);
        may.clear();
      } else if (w.submit < s.reply) {
        may.push_back(static_cast<int64_t>(w.seq));
      }
    }
    bool ok = got == must;
    for (int64_t m : may) ok = ok || got == m;
    if (got != must && ok) ++*racing;
    if (!ok && bad++ < 5) {
      std::printf("%s: block %" PRIu64 " holds %s%" PRId64 ", expected write %" PRId64
                  " (completed before the request)%s\n",
                  s.name.c_str(), b, got < 0 ? "garbage " : "write ", got, must,
                  may.empty() ? "" : " or one in flight meanwhile");
    }
  }
  if (bad > 0) std::printf("%s: %d blocks wrong\n", s.name.c_str(), bad);
  return bad == 0;
}

int Verify(int argc, char** argv) {
  if (argc != 4) return 2;
  Log log;
  if (!LoadLog(argv[2], &log)) {
    std::printf("cannot read the log %s\n", argv[2]);
    return 1;
  }
  const std::string dir = argv[3];
  std::vector<std::vector<size_t>> hist(log.final_size / kBlock);
  bool ok = true;
  for (size_t i = 0; i < log.writes.size(); ++i) {
    const WriteRec& w = log.writes[i];
    if (w.block >= hist.size() || w.status != kStatusOk || w.complete == 0) {
      std::printf("write %" PRIu64 " to block %" PRIu64 " did not complete OK\n", w.seq, w.block);
      ok = false;
      continue;
    }
    hist[w.block].push_back(i);
  }
  for (const SnapRec& s : log.snaps) {
    uint64_t racing = 0;
    const bool sok = VerifySnapshot(log, hist, s, dir + "/" + s.name + ".raw", &racing);
    std::printf("%s: %s (size %" PRIu64 ", %" PRIu64 " writes in flight when requested, %" PRIu64
                " blocks hold a write that raced it, the request took %.1f ms)\n",
                s.name.c_str(), sok ? "ok" : "WRONG", s.size, s.in_flight, racing, s.wait_ms);
    ok = ok && sok;
    // The point of the test is writes racing the snapshot.
    uint64_t overlapping = 0;
    for (const WriteRec& w : log.writes) overlapping += w.submit < s.reply && w.complete > s.sent;
    if (overlapping == 0) {
      std::printf("%s: no write overlapped the snapshot request: the test proved nothing\n",
                  s.name.c_str());
      ok = false;
    }
  }
  // The active image: every block holds its last write.
  SnapRec active;
  active.name = "active";
  active.size = log.final_size;
  active.sent = active.reply = UINT64_MAX;
  uint64_t unused = 0;
  const bool aok = VerifySnapshot(log, hist, active, dir + "/active.raw", &unused);
  std::printf("active: %s\n", aok ? "ok" : "WRONG");
  return ok && aok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  int rc = 2;
  if (mode == "run") rc = Run(argc, argv);
  if (mode == "verify") rc = Verify(argc, argv);
  if (rc == 2) {
    std::fprintf(stderr,
                 "usage: live_client run VHOST_SOCKET CONTROL_SOCKET LOG [--snapshots N]\n"
                 "         [--grows N] [--grow-bytes B] [--depth D] [--interval-ms MS] [--seed S]\n"
                 "       live_client verify LOG DIR\n");
  }
  return rc;
}
