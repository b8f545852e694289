// fio external engine that drives kvblk's disk layer (BlockDevice) directly,
// in the fio process: no virtio, no vhost-user, no second process.
//
//   fio --ioengine=external:build/perf/fio-kvblk.so --filename=disk.qcow2
//       [--format=qcow2|raw] [--cache=none|writeback] [--l2_cache_size=1M]
//       [--iothreads=N] [--overlap_check=0|1]
//
// Each fio job (thread or process) opens the image itself on the calling
// thread's EventLoop (EventLoop::Current() is thread-local); that loop is the
// device's home loop. queue() starts a read with BlockDevice::StartRead (the
// fast path: no coroutine when the read maps to one cached host extent) and
// spawns a coroutine for anything else; commit() runs the loop once so the
// I/O reaches io_uring; getevents() runs the loop until enough io_us have
// completed.
//
// iothreads=N (default 1) spreads a job's I/Os round-robin over N I/O
// threads, each with its own EventLoop and io_uring, the way
// `kvblk serve --iothreads N` spreads virtqueues: I/O thread 0 is the job's
// own thread (so iothreads=1 is exactly the single-threaded path, with no
// hop), threads 1..N-1 are LoopThreads started in init(). An io_u for
// thread i>0 waits in a per-thread batch until commit() posts the batch to
// that loop; there it runs like any other request on a non-home loop (cached
// reads and overwrites stay on the thread, misses and allocations hop to the
// home loop and back). Its completion goes to a mutex-protected list and
// wakes the job's loop, which is the home loop and keeps running inside
// getevents() while the job waits, so the other threads' hops home are
// served. getevents() hands both kinds of completion to fio. iodepth is the
// job's total: with N threads each carries about iodepth/N.
//
// A job that writes takes an exclusive flock on the image (readers a shared
// one): two kvblk instances allocating clusters in one qcow2 file would
// corrupt it, so numjobs>1 writing one image fails up front — give each job
// its own file (filename_format) instead.
//
// Uses kvblk's public headers and disk/loop_thread.h (the I/O thread that
// kvblk serve uses). fio's headers are C but usable from C++; fio's own
// functions are not called (they would need C linkage).
#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "disk/hot.h"
#include "disk/loop_thread.h"
#include "kvblk/block_device.h"
#include "kvblk/event_loop.h"
#include "kvblk/status.h"
#include "kvblk/task.h"

// fio
#include "fio.h"
#include "optgroup.h"

namespace {

using kvblk::BlockDevice;
using kvblk::EventLoop;
using kvblk::Status;

// Engine options (td->eo). fio requires that no option lives at offset 0.
struct EngineOptions {
  void* pad;
  char* format;                 // "raw", "qcow2" or unset (probe)
  char* cache;                  // "none" or "writeback" (default)
  unsigned long long l2_cache;  // bytes; 0 = cover the whole disk
  unsigned int iothreads;       // I/O threads per job, the job's own thread included
  unsigned int overlap_check;   // 0: no metadata overlap protection (to measure its cost)
};

fio_option MakeOption(const char* name, const char* lname, fio_opt_type type, unsigned off,
                      const char* help, const char* def) {
  fio_option o{};
  o.name = name;
  o.lname = lname;
  o.type = type;
  o.off1 = off;
  o.help = help;
  o.def = def;
  o.category = FIO_OPT_C_ENGINE;
  o.group = FIO_OPT_G_INVALID;
  return o;
}

fio_option g_options[] = {
    MakeOption("format", "kvblk image format", FIO_OPT_STR_STORE, offsetof(EngineOptions, format),
               "Image format: raw or qcow2 (default: probe)", nullptr),
    MakeOption("cache", "kvblk cache mode", FIO_OPT_STR_STORE, offsetof(EngineOptions, cache),
               "none (O_DIRECT) or writeback; direct=1 also means none", "writeback"),
    MakeOption("l2_cache_size", "kvblk L2 cache size", FIO_OPT_STR_VAL,
               offsetof(EngineOptions, l2_cache),
               "qcow2 L2 table cache in bytes (0: cover the whole disk, up to 32M)", "0"),
    MakeOption("iothreads", "kvblk I/O threads", FIO_OPT_INT, offsetof(EngineOptions, iothreads),
               "I/O threads per job, each with its own event loop and io_uring (1: only the "
               "job's own thread)",
               "1"),
    MakeOption("overlap_check", "kvblk metadata overlap check", FIO_OPT_BOOL,
               offsetof(EngineOptions, overlap_check),
               "Check every write against all qcow2 metadata (1, the default) or not (0)", "1"),
    fio_option{},
};

constexpr unsigned kMaxIoThreads = 64;

// Completed io_us, oldest first: those handed to fio by the last
// getevents() (read back one by one through event()), then those waiting
// for the next one. fio often takes them one at a time
// (iodepth_batch_complete_max defaults to 1), so handing out and taking back
// move cursors instead of copying the list.
class Completions {
 public:
  void Reserve(size_t n) { v_.reserve(n); }
  void Push(io_u* u) { v_.push_back(u); }
  void Append(const std::vector<io_u*>& us) { v_.insert(v_.end(), us.begin(), us.end()); }
  // Waiting: not handed out yet.
  size_t size() const { return v_.size() - head_ - handed_; }
  bool empty() const { return size() == 0; }
  // Takes back the last batch handed out and hands out the oldest
  // min(max, size()) waiting io_us, returning how many: Handed(i) for i
  // below that, until the next Hand().
  size_t Hand(size_t max) {
    head_ += handed_;
    if (head_ == v_.size()) {
      v_.clear();
      head_ = 0;
    } else if (head_ >= 64 && head_ * 2 >= v_.size()) {  // amortized: moves at most head_
      v_.erase(v_.begin(), v_.begin() + static_cast<std::ptrdiff_t>(head_));
      head_ = 0;
    }
    handed_ = std::min<size_t>(max, v_.size() - head_);  // (fio defines a min macro)
    return handed_;
  }
  io_u* Handed(size_t i) const { return v_[head_ + i]; }

 private:
  std::vector<io_u*> v_;
  size_t head_ = 0;    // v_[0, head_) were handed out and taken back
  size_t handed_ = 0;  // v_[head_, head_ + handed_) are fio's now
};

// Per-job state (td->io_ops_data). Everything but `remote_*` is touched only
// on the job's thread. What every read touches comes first, in the first
// two cache lines (a read's cost here is mostly the lines it touches: see
// docs/disk-layer.md).
struct alignas(64) Job {
  EventLoop* home = nullptr;  // the job thread's loop
  unsigned inflight = 0;      // queued and not yet in `completed`
  bool uncommitted = false;   // something was queued since the last commit()
  Completions completed;  // done: waiting for getevents(), or handed out by the last one
  // iothreads>1: I/O threads 1..N-1 (index i-1 here), the io_us queued for
  // each since the last commit(), and the round-robin cursor.
  std::vector<std::unique_ptr<kvblk::LoopThread>> threads;
  struct Pending {
    BlockDevice* dev;
    io_u* u;
  };
  std::vector<std::vector<Pending>> pending;
  unsigned next_thread = 0;

  EngineOptions* opts = nullptr;
  struct File {
    std::unique_ptr<BlockDevice> dev;  // also the fio_file's engine_data while open
    int lock_fd = -1;
  };
  std::vector<File> files;  // indexed by fio_file::fileno
  std::atomic<bool> reported_error = false;  // any thread

  // Completions on I/O threads 1..N-1, waiting for the job's thread.
  std::mutex remote_mu;
  std::vector<io_u*> remote_done;  // guarded by remote_mu
};

Job* GetJob(thread_data* td) { return static_cast<Job*>(td->io_ops_data); }

kvblk::OpenOptions MakeOpenOptions(thread_data* td, const EngineOptions* o) {
  kvblk::OpenOptions opts;
  if (o->format != nullptr && *o->format != '\0') opts.format = o->format;
  opts.direct = td->o.odirect != 0 || (o->cache != nullptr && strcmp(o->cache, "none") == 0);
  opts.l2_cache_bytes = o->l2_cache;
  opts.overlap_check = o->overlap_check != 0;
  opts.read_only = !td_write(td) && !td_trim(td);
  return opts;
}

bool ValidateOptions(const EngineOptions* o) {
  if (o->cache != nullptr && strcmp(o->cache, "none") != 0 && strcmp(o->cache, "writeback") != 0) {
    fprintf(stderr, "fio-kvblk: cache=%s: expected none or writeback\n", o->cache);
    return false;
  }
  if (o->format != nullptr && *o->format != '\0' && strcmp(o->format, "raw") != 0 &&
      strcmp(o->format, "qcow2") != 0) {
    fprintf(stderr, "fio-kvblk: format=%s: expected raw or qcow2\n", o->format);
    return false;
  }
  if (o->iothreads < 1 || o->iothreads > kMaxIoThreads) {
    fprintf(stderr, "fio-kvblk: iothreads=%u: expected 1 to %u\n", o->iothreads, kMaxIoThreads);
    return false;
  }
  return true;
}

// setup(): runs in fio's main process before jobs start (and before fork),
// so it must not leave an EventLoop behind on this thread: the image is
// opened on a short-lived thread whose thread-local loop dies with it.
int Setup(thread_data* td) {
  auto* o = static_cast<EngineOptions*>(td->eo);
  if (!ValidateOptions(o)) return 1;
  kvblk::OpenOptions opts = MakeOpenOptions(td, o);
  opts.read_only = true;
  opts.direct = false;
  for (unsigned i = 0; i < td->o.nr_files; ++i) {
    fio_file* f = td->files[i];
    std::string name = f->file_name;
    uint64_t size = 0;
    std::string error;
    std::thread t([&] {
      auto dev = kvblk::OpenImage(name, opts);
      if (!dev.ok()) {
        error = dev.status().ToString();
        return;
      }
      size = (*dev)->size();
      Status st = kvblk::CloseImage(std::move(dev).value());
      if (!st.ok()) error = st.ToString();
    });
    t.join();
    if (!error.empty()) {
      fprintf(stderr, "fio-kvblk: %s: %s\n", name.c_str(), error.c_str());
      return 1;
    }
    f->real_file_size = size;
    fio_file_set_size_known(f);
  }
  return 0;
}

int Init(thread_data* td) {
  auto* o = static_cast<EngineOptions*>(td->eo);
  if (!ValidateOptions(o)) return 1;
  auto* job = new Job;
  job->opts = o;
  job->completed.Reserve(td->o.iodepth);
  td->io_ops_data = job;
  // Create the thread's loop now, not inside the first timed I/O.
  job->home = &EventLoop::Current();
  for (unsigned i = 1; i < o->iothreads; ++i) {
    auto t = kvblk::LoopThread::Start();
    if (!t.ok()) {
      fprintf(stderr, "fio-kvblk: %s\n", t.status().ToString().c_str());
      return 1;  // fio calls cleanup()
    }
    job->threads.push_back(std::move(t).value());
  }
  job->pending.resize(job->threads.size());
  for (auto& p : job->pending) p.reserve(td->o.iodepth);
  return 0;
}

void Cleanup(thread_data* td) {
  Job* job = GetJob(td);
  if (job == nullptr) return;
  // fio has reaped every io_u, so the I/O threads are idle. Close on the
  // home loop (this thread) first, then stop the threads.
  for (auto& f : job->files) {
    if (f.dev) {
      Status st = kvblk::CloseImage(std::move(f.dev));
      if (!st.ok()) fprintf(stderr, "fio-kvblk: close: %s\n", st.ToString().c_str());
    }
    if (f.lock_fd >= 0) close(f.lock_fd);
  }
  for (auto& t : job->threads) t->Stop();
  job->threads.clear();
  delete job;
  td->io_ops_data = nullptr;
}

int OpenFile(thread_data* td, fio_file* f) {
  Job* job = GetJob(td);
  size_t fileno = static_cast<size_t>(f->fileno);
  if (job->files.size() <= fileno) job->files.resize(fileno + 1);
  Job::File& jf = job->files[fileno];
  if (jf.dev) return 0;
  kvblk::OpenOptions opts = MakeOpenOptions(td, job->opts);

  // One writer per image across jobs and processes (see the file comment).
  if (jf.lock_fd < 0) {
    jf.lock_fd = open(f->file_name, O_RDONLY | O_CLOEXEC);
    if (jf.lock_fd < 0) {
      fprintf(stderr, "fio-kvblk: %s: %s\n", f->file_name, strerror(errno));
      return 1;
    }
    if (flock(jf.lock_fd, (opts.read_only ? LOCK_SH : LOCK_EX) | LOCK_NB) != 0) {
      fprintf(stderr,
              "fio-kvblk: %s is already open in another fio job%s; give each job its own "
              "image (e.g. filename_format) or use numjobs=1\n",
              f->file_name, opts.read_only ? " for writing" : "");
      close(jf.lock_fd);
      jf.lock_fd = -1;
      return 1;
    }
  }
  auto dev = kvblk::OpenImage(f->file_name, opts);
  if (!dev.ok()) {
    fprintf(stderr, "fio-kvblk: %s\n", dev.status().ToString().c_str());
    return 1;
  }
  jf.dev = std::move(dev).value();
  FILE_SET_ENG_DATA(f, jf.dev.get());
  f->real_file_size = jf.dev->size();
  fio_file_set_size_known(f);
  return 0;
}

int CloseFile(thread_data* td, fio_file* f) {
  Job* job = GetJob(td);
  size_t fileno = static_cast<size_t>(f->fileno);
  if (job == nullptr || fileno >= job->files.size()) return 0;
  Job::File& jf = job->files[fileno];
  int ret = 0;
  FILE_SET_ENG_DATA(f, nullptr);
  if (jf.dev) {
    // Requests of this file are complete: fio drains before closing.
    Status st = kvblk::CloseImage(std::move(jf.dev));
    if (!st.ok()) {
      fprintf(stderr, "fio-kvblk: close %s: %s\n", f->file_name, st.ToString().c_str());
      ret = 1;
    }
  }
  if (jf.lock_fd >= 0) {
    close(jf.lock_fd);
    jf.lock_fd = -1;
  }
  return ret;
}

kvblk::Task<Status> Submit(BlockDevice* dev, io_u* u) {
  // The iovec lives in this frame until the request completes (the iovec
  // forms of Read/Write save the buffer forms' extra coroutine frame).
  iovec v{u->xfer_buf, static_cast<size_t>(u->xfer_buflen)};
  switch (u->ddir) {
    case DDIR_READ:
      co_return co_await dev->Read(u->offset, &v, 1);
    case DDIR_WRITE:
      co_return co_await dev->Write(u->offset, &v, 1);
    case DDIR_TRIM:
      co_return co_await dev->Discard(u->offset, u->xfer_buflen);
    case DDIR_SYNC:
    case DDIR_DATASYNC:
    case DDIR_SYNC_FILE_RANGE:
      co_return co_await dev->Flush();
    default:
      co_return Status::NotSupported("fio-kvblk: unsupported data direction");
  }
}

// Sets the io_u's result; reports the job's first error. Any thread.
KVBLK_HOT void Finish(Job* job, io_u* u, const Status& st) {
  if (st.ok()) {
    u->error = 0;
    u->resid = 0;
    return;
  }
  u->error = st.ToErrno();
  u->resid = u->xfer_buflen;
  if (!job->reported_error.exchange(true))
    fprintf(stderr, "fio-kvblk: %s\n", st.ToString().c_str());
}

// Finish() for an io_u that ran on the job's own loop: it is ready for
// getevents(). Home loop only.
KVBLK_HOT void FinishHere(Job* job, io_u* u, const Status& st) {
  Finish(job, u, st);
  --job->inflight;
  job->completed.Push(u);
}

// On an I/O thread other than the job's: starts `u` on that thread's loop;
// its completion goes to remote_done and wakes the job's loop (only when
// the list was empty: the job drains it all at once).
void StartRemote(Job* job, BlockDevice* dev, io_u* u) {
  kvblk::Spawn(Submit(dev, u), [job, u](Status st) {
    Finish(job, u, st);
    bool wake;
    {
      std::lock_guard<std::mutex> l(job->remote_mu);
      wake = job->remote_done.empty();
      job->remote_done.push_back(u);
    }
    if (wake) job->home->Wake();
  });
}

// The io_u's open device (kept in its fio_file, which fio touches for every
// I/O anyway), or nullptr.
BlockDevice* DeviceOf(io_u* u) { return static_cast<BlockDevice*>(FILE_ENG_DATA(u->file)); }

// Posts each I/O thread's batch of queued io_us to its loop. Job's thread.
void PostPending(Job* job) {
  for (size_t i = 0; i < job->pending.size(); ++i) {
    if (job->pending[i].empty()) continue;
    std::vector<Job::Pending> batch;
    batch.reserve(job->pending[i].capacity());
    batch.swap(job->pending[i]);
    job->threads[i]->loop().PostFunction([job, batch = std::move(batch)] {
      for (const Job::Pending& p : batch) StartRemote(job, p.dev, p.u);
    });
  }
}

// Moves the other threads' completions to `completed`. Job's thread.
void DrainRemote(Job* job) {
  if (job->threads.empty()) return;
  std::lock_guard<std::mutex> l(job->remote_mu);
  job->inflight -= static_cast<unsigned>(job->remote_done.size());
  job->completed.Append(job->remote_done);
  job->remote_done.clear();
}

// Per io_u (io_u->engine_data): the request StartRead takes, and its iovec.
// Aligned, and with the engine's fields before the request's, so that they
// share the request's first line and a read touches as few lines as it can.
struct alignas(64) Slot {
  iovec v{};
  Job* job = nullptr;
  io_u* u = nullptr;
  kvblk::ReadRequest req;
};

// ReadRequest::done of every read the engine starts.
KVBLK_HOT void SlotDone(kvblk::ReadRequest* req, Status st) {
  auto* slot = static_cast<Slot*>(req->user);
  FinishHere(slot->job, slot->u, st);
}

int IoUInit(thread_data* td, io_u* u) {
  auto* s = new Slot;
  s->job = GetJob(td);
  s->u = u;
  s->req.iov = &s->v;
  s->req.iovcnt = 1;
  s->req.user = s;
  s->req.done = &SlotDone;
  u->engine_data = s;
  return 0;
}

void IoUFree(thread_data*, io_u* u) {
  delete static_cast<Slot*>(u->engine_data);
  u->engine_data = nullptr;
}

KVBLK_HOT fio_q_status Queue(thread_data* td, io_u* u) {
  Job* job = GetJob(td);
  fio_ro_check(td, u);
  BlockDevice* dev = DeviceOf(u);
  if (dev == nullptr) {
    u->error = EBADF;
    return FIO_Q_COMPLETED;
  }
  ++job->inflight;
  job->uncommitted = true;
  unsigned t = 0;
  if (!job->threads.empty()) {
    t = job->next_thread;
    job->next_thread = t + 1 == job->threads.size() + 1 ? 0 : t + 1;
  }
  if (t > 0) {
    // Started by the next commit() (the file stays open until fio has
    // reaped its io_us, so the device outlives the request).
    job->pending[t - 1].push_back({dev, u});
    return FIO_Q_QUEUED;
  }
  // A read may finish before StartRead or Spawn returns (a read of an
  // unallocated cluster); either way the io_u is reported from getevents().
  if (u->ddir == DDIR_READ) {
    auto* s = static_cast<Slot*>(u->engine_data);
    s->v = {u->xfer_buf, static_cast<size_t>(u->xfer_buflen)};
    s->req.offset = u->offset;
    dev->StartRead(&s->req);
    return FIO_Q_QUEUED;
  }
  kvblk::Spawn(Submit(dev, u), [job, u](Status st) { FinishHere(job, u, st); });
  return FIO_Q_QUEUED;
}

// Hands the queued requests to the kernel (and to the other I/O threads)
// without waiting. fio also calls it before every getevents() that waits;
// with nothing queued since the last one there is nothing to hand over
// (getevents() runs the loop itself).
KVBLK_HOT int Commit(thread_data* td) {
  Job* job = GetJob(td);
  if (!job->uncommitted) return 0;
  job->uncommitted = false;
  if (!job->threads.empty()) PostPending(job);
  (void)job->home->RunOnce();
  return 0;
}

// Runs the loop until at least `min` io_us have completed (or, with a
// timeout, until it expires; the deadline is checked between completions
// because the loop blocks inside io_uring), then collects what else is
// ready up to `max`. min == 0 or a zero timeout: no blocking.
__attribute__((noinline)) void RunForEvents(Job* job, unsigned int min, unsigned int max,
                                            const timespec* t) {
  EventLoop& loop = *job->home;
  const bool poll_only = min == 0 || (t != nullptr && t->tv_sec == 0 && t->tv_nsec == 0);
  if (!poll_only) {
    using Clock = std::chrono::steady_clock;
    struct Wait {
      Job* job;
      unsigned min;
      bool timed;
      Clock::time_point deadline;
      bool Done() const {
        DrainRemote(job);
        return job->completed.size() >= min || job->inflight == 0 ||
               (timed && Clock::now() >= deadline);
      }
    } w{job, min, t != nullptr, {}};
    if (w.timed)
      w.deadline =
          Clock::now() + std::chrono::seconds(t->tv_sec) + std::chrono::nanoseconds(t->tv_nsec);
    // A completion on another I/O thread wakes this loop (see StartRemote),
    // so the predicate sees it without a posted function. (One captured
    // pointer: std::function keeps it without allocating.)
    loop.RunUntil([&w] { return w.Done(); });
  }
  while (job->completed.size() < max && loop.RunOnce()) {
  }
  DrainRemote(job);
}

// Returns at least `min` and at most `max` completed io_us (see
// RunForEvents for `t`).
KVBLK_HOT int GetEvents(thread_data* td, unsigned int min, unsigned int max, const timespec* t) {
  Job* job = GetJob(td);
  if (!job->threads.empty()) {
    PostPending(job);  // in case fio waits without committing
    DrainRemote(job);
  }
  // Usually commit() ran the loop and collected enough (with a fast
  // device): they are handed over without another pass, and what completes
  // meanwhile is collected by the next commit() or getevents().
  if (job->completed.empty() || job->completed.size() < min) RunForEvents(job, min, max, t);
  return static_cast<int>(job->completed.Hand(max));
}

KVBLK_HOT io_u* Event(thread_data* td, int event) {
  return GetJob(td)->completed.Handed(static_cast<size_t>(event));
}

// No page cache of fio's to drop: the file is kvblk's.
int Invalidate(thread_data*, fio_file*) { return 0; }

ioengine_ops MakeOps() {
  ioengine_ops ops{};
  ops.name = "kvblk";
  ops.version = FIO_IOOPS_VERSION;
  ops.flags = FIO_DISKLESSIO | FIO_NOEXTEND | FIO_NODISKUTIL;
  ops.setup = Setup;
  ops.init = Init;
  ops.cleanup = Cleanup;
  ops.queue = Queue;
  ops.commit = Commit;
  ops.getevents = GetEvents;
  ops.event = Event;
  ops.open_file = OpenFile;
  ops.close_file = CloseFile;
  ops.invalidate = Invalidate;
  ops.io_u_init = IoUInit;
  ops.io_u_free = IoUFree;
  ops.options = g_options;
  ops.option_struct_size = sizeof(EngineOptions);
  return ops;
}

ioengine_ops g_ops = MakeOps();

}  // namespace

// fio looks this symbol up with dlsym() (see fio's ioengines.c).
extern "C" __attribute__((visibility("default"))) void get_ioengine(ioengine_ops** ops) {
  *ops = &g_ops;
}
