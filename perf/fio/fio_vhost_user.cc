// fio external engine that plays the VMM for a vhost-user-blk back end
// (qemu-storage-daemon's vhost-user-blk export, `kvblk serve`):
//
//   fio --ioengine=external:build/perf/fio-vhost-user.so --filename=SOCKET
//       [--num_queues=1] [--queue_size=256] [--mem_size=512M]
//
// The engine shares a memfd with the back end (VhostUserBlkClient), builds
// split virtqueues in it and submits virtio-blk requests; fio's I/O buffers
// are allocated from that shared memory (iomem_alloc), so data is never
// copied. queue() writes descriptors, commit() publishes and kicks,
// getevents() reaps the used ring and sleeps on the call eventfd.
//
// One connection per socket per process. With thread=1 the jobs of one
// process that name the same socket share the connection, each on its own
// queue (num_queues must be at least the number of such jobs), as the vCPUs
// of a VM would. Without thread=1 every job is a process with a connection
// of its own; qemu-storage-daemon serves only one client per export.
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "perf/fio/vhost_user_client.h"

// fio
#include "fio.h"
#include "optgroup.h"

namespace {

using kvblk::Status;
using kvblk::StatusCode;
using kvblk::perf::BlkCompletion;
using kvblk::perf::BlkQueue;
using kvblk::perf::VhostUserBlkClient;
using kvblk::perf::VhostUserClientOptions;

// Engine options (td->eo). fio requires that no option lives at offset 0.
struct EngineOptions {
  void* pad;
  unsigned int num_queues;
  unsigned int queue_size;
  unsigned long long mem_size;
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
    MakeOption("num_queues", "vhost-user-blk queues", FIO_OPT_INT,
               offsetof(EngineOptions, num_queues),
               "Virtqueues to set up on the connection (>= jobs sharing it)", "1"),
    MakeOption("queue_size", "virtqueue size", FIO_OPT_INT, offsetof(EngineOptions, queue_size),
               "Split ring size, a power of two; raised to fit 3 descriptors per iodepth", "256"),
    MakeOption("mem_size", "shared memory size", FIO_OPT_STR_VAL, offsetof(EngineOptions, mem_size),
               "Shared data area for I/O buffers (sparse memfd)", "512M"),
    fio_option{},
};

// Connections of this process, by socket path (shared by thread=1 jobs).
struct SharedClient {
  std::shared_ptr<VhostUserBlkClient> client;
  int next_queue = 0;
  int users = 0;
};
std::mutex g_clients_mu;
std::map<std::string, SharedClient> g_clients;  // GUARDED_BY(g_clients_mu)

struct Job {
  std::string socket;
  std::shared_ptr<VhostUserBlkClient> client;
  BlkQueue* queue = nullptr;
  std::vector<BlkCompletion> done;
  std::vector<io_u*> events;
  bool reported_error = false;
};

Job* GetJob(thread_data* td) { return static_cast<Job*>(td->io_ops_data); }

uint16_t QueueSizeFor(unsigned want, unsigned iodepth) {
  unsigned need = 3 * iodepth + 3;  // three descriptors per request
  unsigned size = want < 4 ? 4 : want;
  while (size < need && size < 32768) size *= 2;
  return static_cast<uint16_t>(size > 32768 ? 32768 : size);
}

// Runs in fio's main process before the jobs start: learns the disk size.
int Setup(thread_data* td) {
  for (unsigned i = 0; i < td->o.nr_files; ++i) {
    fio_file* f = td->files[i];
    auto info = VhostUserBlkClient::Probe(f->file_name);
    if (!info.ok()) {
      fprintf(stderr, "fio-vhost-user: %s\n", info.status().ToString().c_str());
      return 1;
    }
    f->real_file_size = info->capacity_bytes;
    fio_file_set_size_known(f);
  }
  return 0;
}

int Init(thread_data* td) {
  auto* o = static_cast<EngineOptions*>(td->eo);
  if (td->o.nr_files != 1) {
    fprintf(stderr, "fio-vhost-user: exactly one filename (the socket) per job\n");
    return 1;
  }
  auto job = std::make_unique<Job>();
  job->socket = td->files[0]->file_name;
  {
    std::lock_guard<std::mutex> l(g_clients_mu);
    SharedClient& sc = g_clients[job->socket];
    if (!sc.client) {
      VhostUserClientOptions copts;
      copts.num_queues = static_cast<int>(o->num_queues);
      copts.queue_size = QueueSizeFor(o->queue_size, td->o.iodepth);
      copts.data_bytes = o->mem_size;
      auto c = VhostUserBlkClient::Connect(job->socket, copts);
      if (!c.ok()) {
        g_clients.erase(job->socket);
        fprintf(stderr, "fio-vhost-user: %s\n", c.status().ToString().c_str());
        return 1;
      }
      sc.client = std::move(c).value();
    }
    if (sc.next_queue >= sc.client->num_queues()) {
      fprintf(stderr,
              "fio-vhost-user: %s: more jobs share this connection than it has queues "
              "(num_queues=%d)\n",
              job->socket.c_str(), sc.client->num_queues());
      if (sc.users == 0) g_clients.erase(job->socket);
      return 1;
    }
    job->client = sc.client;
    job->queue = &sc.client->queue(sc.next_queue++);
    ++sc.users;
  }
  if (job->queue->capacity() < td->o.iodepth) {
    fprintf(stderr, "fio-vhost-user: queue holds %u requests, iodepth is %u\n",
            job->queue->capacity(), td->o.iodepth);
  }
  job->done.reserve(job->queue->capacity());
  job->events.reserve(job->queue->capacity());
  td->io_ops_data = job.release();
  return 0;
}

void Cleanup(thread_data* td) {
  Job* job = GetJob(td);
  if (job == nullptr) return;
  {
    std::lock_guard<std::mutex> l(g_clients_mu);
    auto it = g_clients.find(job->socket);
    if (it != g_clients.end() && --it->second.users == 0) g_clients.erase(it);
  }
  delete job;
  td->io_ops_data = nullptr;
}

// fio's buffers live in the memory the back end maps.
int IomemAlloc(thread_data* td, size_t total) {
  Job* job = GetJob(td);
  auto p = job->client->AllocData(total);
  if (!p.ok()) {
    fprintf(stderr, "fio-vhost-user: %s\n", p.status().ToString().c_str());
    return 1;
  }
  td->orig_buffer = static_cast<char*>(*p);
  return 0;
}

// The area is released with the connection.
void IomemFree(thread_data*) {}

int OpenFile(thread_data*, fio_file*) { return 0; }
int CloseFile(thread_data*, fio_file*) { return 0; }
int Invalidate(thread_data*, fio_file*) { return 0; }

void Fail(Job* job, io_u* u, int err, const char* why) {
  u->error = err;
  u->resid = u->xfer_buflen;
  if (!job->reported_error) {
    job->reported_error = true;
    fprintf(stderr, "fio-vhost-user: %s\n", why);
  }
}

fio_q_status Queue(thread_data* td, io_u* u) {
  Job* job = GetJob(td);
  fio_ro_check(td, u);
  const auto& info = job->client->info();
  BlkQueue::Op op;
  switch (u->ddir) {
    case DDIR_READ:
      op = BlkQueue::Op::kRead;
      break;
    case DDIR_WRITE:
      if (info.read_only) {
        Fail(job, u, EROFS, "the device is read-only");
        return FIO_Q_COMPLETED;
      }
      op = BlkQueue::Op::kWrite;
      break;
    case DDIR_SYNC:
    case DDIR_DATASYNC:
    case DDIR_SYNC_FILE_RANGE:
      if (!info.flush) {
        u->error = 0;  // no volatile cache to flush
        return FIO_Q_COMPLETED;
      }
      op = BlkQueue::Op::kFlush;
      break;
    case DDIR_TRIM:
      if (!info.discard) {
        Fail(job, u, EOPNOTSUPP, "the device does not offer discard");
        return FIO_Q_COMPLETED;
      }
      op = BlkQueue::Op::kDiscard;
      break;
    default:
      Fail(job, u, EINVAL, "unsupported data direction");
      return FIO_Q_COMPLETED;
  }
  Status st = job->queue->Add(op, u->offset, u->xfer_buf, static_cast<uint32_t>(u->xfer_buflen), u);
  if (st.code() == StatusCode::kBusy) return FIO_Q_BUSY;
  if (!st.ok()) {
    Fail(job, u, EINVAL, st.ToString().c_str());
    return FIO_Q_COMPLETED;
  }
  return FIO_Q_QUEUED;
}

int Commit(thread_data* td) {
  GetJob(td)->queue->Publish();
  return 0;
}

void Complete(Job* job, const BlkCompletion& c) {
  auto* u = static_cast<io_u*>(c.cookie);
  if (c.status == 0) {
    u->error = 0;
    u->resid = 0;
  } else {
    Fail(job, u, c.status == 2 ? EOPNOTSUPP : EIO,
         c.status == 2 ? "the device answered UNSUPP" : "the device answered IOERR");
  }
  job->events.push_back(u);
}

int GetEvents(thread_data* td, unsigned int min, unsigned int max, const timespec* t) {
  Job* job = GetJob(td);
  BlkQueue* q = job->queue;
  job->events.clear();
  job->done.clear();
  using Clock = std::chrono::steady_clock;
  Clock::time_point deadline{};
  if (t != nullptr) {
    deadline =
        Clock::now() + std::chrono::seconds(t->tv_sec) + std::chrono::nanoseconds(t->tv_nsec);
  }
  unsigned got = q->Reap(&job->done, max);
  while (got < min && q->in_flight() > 0) {
    int timeout_ms = -1;
    if (t != nullptr) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
      if (left.count() <= 0) break;
      timeout_ms = static_cast<int>(left.count());
    }
    if (!q->WaitForInterrupt(timeout_ms)) break;
    got += q->Reap(&job->done, max - got);
  }
  for (const auto& c : job->done) Complete(job, c);
  return static_cast<int>(job->events.size());
}

io_u* Event(thread_data* td, int event) { return GetJob(td)->events[event]; }

ioengine_ops MakeOps() {
  ioengine_ops ops{};
  ops.name = "vhost-user-blk";
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
  ops.iomem_alloc = IomemAlloc;
  ops.iomem_free = IomemFree;
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
