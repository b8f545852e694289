// Thread-pool engine: blocking preadv/pwritev/fsync/fallocate on worker
// threads, completions handed back to the loop's thread. The fallback when
// io_uring is unavailable.
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "disk/io_engine.h"

namespace kvblk {
namespace {

int64_t Execute(IoOp* op) {
  ssize_t r = 0;
  switch (op->kind) {
    case IoOp::Kind::kReadv:
      r = preadv(op->fd, op->iov, op->iovcnt, static_cast<off_t>(op->offset));
      break;
    case IoOp::Kind::kWritev:
      r = pwritev(op->fd, op->iov, op->iovcnt, static_cast<off_t>(op->offset));
      break;
    case IoOp::Kind::kFsync:
      r = fsync(op->fd);
      break;
    case IoOp::Kind::kFdatasync:
      r = fdatasync(op->fd);
      break;
    case IoOp::Kind::kFallocate:
      r = fallocate(op->fd, op->mode, static_cast<off_t>(op->offset),
                    static_cast<off_t>(op->length));
      break;
  }
  return r < 0 ? -errno : r;
}

class ThreadPoolEngine final : public IoEngine {
 public:
  explicit ThreadPoolEngine(int threads) {
    for (int i = 0; i < threads; ++i) workers_.emplace_back([this] { Work(); });
  }
  ~ThreadPoolEngine() override {
    {
      std::lock_guard<std::mutex> l(mu_);
      stop_ = true;
    }
    todo_cv_.notify_all();
    for (auto& t : workers_) t.join();
  }

  void Submit(IoOp* op) override {
    ++inflight_;
    {
      std::lock_guard<std::mutex> l(mu_);
      todo_.push_back(op);
    }
    todo_cv_.notify_one();
  }

  int Reap(bool wait) override {
    std::deque<IoOp*> done;
    {
      std::unique_lock<std::mutex> l(mu_);
      if (wait) done_cv_.wait(l, [this] { return !done_.empty() || woken_; });
      woken_ = false;
      done.swap(done_);
    }
    inflight_ -= static_cast<int>(done.size());
    for (IoOp* op : done) op->Complete();
    return static_cast<int>(done.size());
  }

  void Wake() override {
    {
      std::lock_guard<std::mutex> l(mu_);
      woken_ = true;
    }
    done_cv_.notify_all();
  }

  int inflight() const override { return inflight_; }
  bool polls_descriptors() const override { return false; }
  const char* name() const override { return "threads"; }

 private:
  void Work() {
    for (;;) {
      IoOp* op;
      {
        std::unique_lock<std::mutex> l(mu_);
        todo_cv_.wait(l, [this] { return stop_ || !todo_.empty(); });
        if (stop_ && todo_.empty()) return;
        op = todo_.front();
        todo_.pop_front();
      }
      op->result = Execute(op);
      {
        std::lock_guard<std::mutex> l(mu_);
        done_.push_back(op);
      }
      done_cv_.notify_all();
    }
  }

  std::mutex mu_;
  std::condition_variable todo_cv_;
  std::condition_variable done_cv_;
  std::deque<IoOp*> todo_;
  std::deque<IoOp*> done_;
  bool woken_ = false;
  bool stop_ = false;
  int inflight_ = 0;  // touched only by the loop thread
  std::vector<std::thread> workers_;
};

}  // namespace

std::unique_ptr<IoEngine> MakeThreadPoolEngine(int threads) {
  return std::make_unique<ThreadPoolEngine>(threads);
}

std::unique_ptr<IoEngine> MakeDefaultIoEngine() {
  const char* env = std::getenv("KVBLK_IO");
  if (env != nullptr && std::strcmp(env, "threads") == 0) return MakeThreadPoolEngine(4);
  int err = 0;
  auto uring = MakeUringEngine(256, &err);
  if (uring) return uring;
  static std::once_flag said;
  std::call_once(said, [err] {
    std::fprintf(stderr, "kvblk: io_uring unavailable (%s); using the thread-pool I/O engine\n",
                 std::strerror(err));
  });
  return MakeThreadPoolEngine(4);
}

}  // namespace kvblk
