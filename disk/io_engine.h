// IoEngine: asynchronous file I/O for one event loop (one thread).
//
// An operation is an IoOp that lives in the awaiting coroutine's frame (or,
// for the callback form, in its owner's state). The engine fills in
// `result` (bytes transferred, or -errno) and, from Reap() on the loop's
// thread, calls Complete(): it resumes `waiter`, or calls `on_done`. The
// io_uring engine is the default; the thread-pool engine (preadv/pwritev on
// worker threads) takes over when io_uring cannot be set up, or when
// KVBLK_IO=threads.
#ifndef KVBLK_DISK_IO_ENGINE_H_
#define KVBLK_DISK_IO_ENGINE_H_

#include <sys/uio.h>

#include <coroutine>
#include <cstdint>
#include <memory>

namespace kvblk {

struct IoOp {
  enum class Kind : uint8_t { kReadv, kWritev, kFsync, kFdatasync, kFallocate };
  Kind kind = Kind::kReadv;
  int fd = -1;
  const iovec* iov = nullptr;
  int iovcnt = 0;
  uint64_t offset = 0;
  uint64_t length = 0;  // fallocate only
  int mode = 0;         // fallocate mode
  int64_t result = 0;   // >= 0 bytes (or 0), < 0 is -errno
  std::coroutine_handle<> waiter;
  // When set, called with the op instead of resuming `waiter` (the read
  // fast path uses it to complete a request without a coroutine).
  void (*on_done)(IoOp* op) = nullptr;

  void Complete() {
    if (on_done != nullptr) {
      on_done(this);
    } else {
      waiter.resume();
    }
  }
};

class IoEngine {
 public:
  virtual ~IoEngine() = default;
  // Queues `op`; it completes later through Reap(). Never blocks.
  virtual void Submit(IoOp* op) = 0;
  // Submits what is queued and resumes the waiters of completed operations.
  // With `wait`, blocks until at least one completion or a Wake().
  // Returns the number of operations completed.
  virtual int Reap(bool wait) = 0;
  // Thread-safe: makes a blocked Reap(true) return.
  virtual void Wake() = 0;
  // Number of submitted operations not yet completed.
  virtual int inflight() const = 0;
  // Passes of Reap() that found completions the kernel had to keep outside
  // its completion ring (io_uring's CQ overflow). The io_uring engine keeps
  // it at zero by holding back what the ring has no room for; the count is
  // there to show that it does.
  virtual uint64_t completion_overflows() const { return 0; }
  virtual const char* name() const = 0;
  // Whether a read of a pollable descriptor with nothing to read (an empty
  // eventfd) waits inside the engine, holding no thread, until data comes:
  // then a loop can watch such a descriptor by keeping a read of it
  // submitted (EventfdWatch). True for io_uring, which polls the
  // descriptor; false for the thread pool, whose worker would block in
  // read() (or get EAGAIN).
  virtual bool polls_descriptors() const = 0;
};

// Returns the io_uring engine, or the thread-pool engine when io_uring is not
// available or KVBLK_IO=threads (said once on stderr when it is a fallback).
std::unique_ptr<IoEngine> MakeDefaultIoEngine();
std::unique_ptr<IoEngine> MakeUringEngine(unsigned entries, int* err);
std::unique_ptr<IoEngine> MakeThreadPoolEngine(int threads);

// co_await Await(engine, op): submits op and resumes when it is complete.
struct IoAwaiter {
  IoEngine* engine;
  IoOp* op;
  bool await_ready() const noexcept { return false; }
  void await_suspend(std::coroutine_handle<> h) noexcept {
    op->waiter = h;
    engine->Submit(op);
  }
  int64_t await_resume() const noexcept { return op->result; }
};

}  // namespace kvblk

#endif  // KVBLK_DISK_IO_ENGINE_H_
