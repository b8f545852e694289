// fio external engine that drives kvblk's disk layer (BlockDevice) directly,
// in the fio job's own thread: no virtio, no vhost-user, no second process.
//
//   fio --ioengine=external:build/perf/fio-kvblk.so --filename=disk.qcow2
//       [--format=qcow2|raw] [--cache=none|writeback] [--l2_cache_size=1M]
//
// Each fio job (thread or process) opens the image itself on the calling
// thread's EventLoop (EventLoop::Current() is thread-local). queue() spawns
// one coroutine per io_u on that loop; commit() runs the loop once so the
// I/O reaches io_uring; getevents() runs the loop until enough io_us have
// completed. A job that writes takes an exclusive flock on the image (readers
// a shared one): two kvblk instances allocating clusters in one qcow2 file
// would corrupt it, so numjobs>1 writing one image fails up front — give each
// job its own file (filename_format) instead.
//
// Uses only kvblk's public headers. fio's headers are C but usable from C++;
// fio's own functions are not called (they would need C linkage).
#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

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
using kvblk::StatusCode;

// Engine options (td->eo). fio requires that no option lives at offset 0.
struct EngineOptions {
  void* pad;
  char* format;                 // "raw", "qcow2" or unset (probe)
  char* cache;                  // "none" or "writeback" (default)
  unsigned long long l2_cache;  // bytes; 0 = cover the whole disk
  unsigned int iothreads;       // I/O threads per job; only 1 is supported
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
               "I/O threads per job (only 1: the job's own thread)", "1"),
    fio_option{},
};

int ErrnoFor(const Status& st) {
  switch (st.code()) {
    case StatusCode::kOk:
      return 0;
    case StatusCode::kInvalidArgument:
      return EINVAL;
    case StatusCode::kNotSupported:
      return EOPNOTSUPP;
    case StatusCode::kNoSpace:
      return ENOSPC;
    case StatusCode::kReadOnly:
      return EROFS;
    case StatusCode::kNotFound:
      return ENOENT;
    case StatusCode::kBusy:
      return EBUSY;
    default:
      return st.sys_errno() > 0 ? st.sys_errno() : EIO;
  }
}

// Per-job state (td->io_ops_data).
struct Job {
  EngineOptions* opts = nullptr;
  struct File {
    std::unique_ptr<BlockDevice> dev;
    int lock_fd = -1;
  };
  std::vector<File> files;       // indexed by fio_file::fileno
  std::vector<io_u*> completed;  // done, not yet handed to fio
  std::vector<io_u*> events;     // handed out by the last getevents()
  unsigned inflight = 0;
  bool reported_error = false;
};

Job* GetJob(thread_data* td) { return static_cast<Job*>(td->io_ops_data); }

kvblk::OpenOptions MakeOpenOptions(thread_data* td, const EngineOptions* o) {
  kvblk::OpenOptions opts;
  if (o->format != nullptr && *o->format != '\0') opts.format = o->format;
  opts.direct = td->o.odirect != 0 || (o->cache != nullptr && strcmp(o->cache, "none") == 0);
  opts.l2_cache_bytes = o->l2_cache;
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
  if (o->iothreads != 1) {
    fprintf(stderr, "fio-kvblk: iothreads=%u: only 1 is supported (the job's own thread)\n",
            o->iothreads);
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
  job->events.reserve(td->o.iodepth);
  job->completed.reserve(td->o.iodepth);
  td->io_ops_data = job;
  // Create the thread's loop now, not inside the first timed I/O.
  (void)EventLoop::Current();
  return 0;
}

void Cleanup(thread_data* td) {
  Job* job = GetJob(td);
  if (job == nullptr) return;
  for (auto& f : job->files) {
    if (f.dev) {
      Status st = kvblk::CloseImage(std::move(f.dev));
      if (!st.ok()) fprintf(stderr, "fio-kvblk: close: %s\n", st.ToString().c_str());
    }
    if (f.lock_fd >= 0) close(f.lock_fd);
  }
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
  switch (u->ddir) {
    case DDIR_READ:
      co_return co_await dev->Read(u->offset, u->xfer_buf, u->xfer_buflen);
    case DDIR_WRITE:
      co_return co_await dev->Write(u->offset, u->xfer_buf, u->xfer_buflen);
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

fio_q_status Queue(thread_data* td, io_u* u) {
  Job* job = GetJob(td);
  fio_ro_check(td, u);
  size_t fileno = static_cast<size_t>(u->file->fileno);
  BlockDevice* dev = fileno < job->files.size() ? job->files[fileno].dev.get() : nullptr;
  if (dev == nullptr) {
    u->error = EBADF;
    return FIO_Q_COMPLETED;
  }
  ++job->inflight;
  // The coroutine starts now and may even finish before Spawn returns (a
  // read of an unallocated cluster); either way the io_u is reported from
  // getevents().
  kvblk::Spawn(Submit(dev, u), [job, u](Status st) {
    --job->inflight;
    if (st.ok()) {
      u->error = 0;
      u->resid = 0;
    } else {
      u->error = ErrnoFor(st);
      u->resid = u->xfer_buflen;
      if (!job->reported_error) {
        job->reported_error = true;
        fprintf(stderr, "fio-kvblk: %s\n", st.ToString().c_str());
      }
    }
    job->completed.push_back(u);
  });
  return FIO_Q_QUEUED;
}

// Hands the queued requests to the kernel without waiting.
int Commit(thread_data*) {
  (void)EventLoop::Current().RunOnce();
  return 0;
}

// Runs the loop until at least `min` io_us have completed (or, with a
// timeout, until it expires; the deadline is checked between completions
// because the loop blocks inside io_uring). Returns at most `max`.
int GetEvents(thread_data* td, unsigned int min, unsigned int max, const timespec* t) {
  Job* job = GetJob(td);
  EventLoop& loop = EventLoop::Current();
  job->events.clear();
  bool poll_only = min == 0 || (t != nullptr && t->tv_sec == 0 && t->tv_nsec == 0);
  if (poll_only) {
    while (job->completed.size() < max && loop.RunOnce()) {
    }
  } else {
    using Clock = std::chrono::steady_clock;
    bool timed = t != nullptr;
    Clock::time_point deadline;
    if (timed)
      deadline =
          Clock::now() + std::chrono::seconds(t->tv_sec) + std::chrono::nanoseconds(t->tv_nsec);
    loop.RunUntil([&] {
      return job->completed.size() >= min || job->inflight == 0 ||
             (timed && Clock::now() >= deadline);
    });
    // Pick up whatever else is ready, without blocking.
    while (job->completed.size() < max && loop.RunOnce()) {
    }
  }
  size_t n = std::min<size_t>(max, job->completed.size());
  job->events.assign(job->completed.begin(), job->completed.begin() + n);
  job->completed.erase(job->completed.begin(), job->completed.begin() + n);
  return static_cast<int>(n);
}

io_u* Event(thread_data* td, int event) { return GetJob(td)->events[event]; }

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
