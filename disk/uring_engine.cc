// io_uring engine: one ring per event loop.
#include <liburing.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>

#include "disk/io_engine.h"
#include "disk/hot.h"

namespace kvblk {
namespace {

// user_data of the eventfd read that wakes a blocked Reap().
constexpr uint64_t kWakeTag = 1;
// The longest buffer IORING_OP_READ/WRITE take (their length is 32 bits).
constexpr size_t kMaxOneBuffer = 0xffffffffu;

class UringEngine final : public IoEngine {
 public:
  ~UringEngine() override {
    if (ring_ok_) io_uring_queue_exit(&ring_);
    if (wake_fd_ >= 0) close(wake_fd_);
  }

  int Init(unsigned entries) {
    int r = io_uring_queue_init(entries, &ring_, 0);
    if (r < 0) return r;
    ring_ok_ = true;
    // One completion slot is the wake read's; see Submit().
    limit_ = ring_.cq.ring_entries - 1;
    wake_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (wake_fd_ < 0) return -errno;
    ArmWake();
    return 0;
  }

  // An operation goes to the kernel only while the completion ring has a
  // slot for it: the kernel then never holds completions outside the ring
  // (an overflow: the kernel keeps those in memory it allocates
  // atomically and drops a completion when that allocation fails, and older
  // kernels refuse submissions with EBUSY while it lasts, on which
  // GetSqe() would spin). The rest wait in backlog_, in order, and go to
  // the kernel from Reap() as slots free up. An operation that stays
  // pending (a read of a watched eventfd) holds its slot meanwhile; a loop
  // watches a few, against 511 slots.
  KVBLK_HOT void Submit(IoOp* op) override {
    ++inflight_;
    if (in_kernel_ >= limit_) {
      backlog_.push_back(op);
      return;
    }
    Place(op);
  }

  KVBLK_HOT int Reap(bool wait) override {
    // A backlog exists exactly when more is in flight than in the kernel
    // (tested on the counters' line rather than on backlog_'s).
    if (inflight_ != static_cast<int>(in_kernel_)) PlaceBacklog();
    // Enter the kernel only with something to submit, or when completions
    // overflowed the ring (the submission then flushes them into it; never
    // expected, see Submit(), but counted).
    const bool overflow = (IO_URING_READ_ONCE(*ring_.sq.kflags) & IORING_SQ_CQ_OVERFLOW) != 0;
    if (overflow) ++overflows_;
    if (io_uring_sq_ready(&ring_) > 0 || overflow) Enter();
    if (wait) {
      io_uring_cqe* cqe = nullptr;
      int r;
      do {
        r = io_uring_wait_cqe(&ring_, &cqe);
      } while (r == -EINTR);
      if (r < 0) Fail("waiting for a completion", r);
    }
    // Each completion is consumed (the head advanced) before its operation
    // completes, and the head is read again after every completion: one that
    // runs the loop again (a nested Reap) or submits more sees a consistent
    // queue and nothing is completed twice. Only the completions present at
    // the start are taken, so a loop that keeps completing work cannot hold
    // the pass here.
    int done = 0;
    const unsigned tail = io_uring_smp_load_acquire(ring_.cq.ktail);
    for (;;) {
      const unsigned head = *ring_.cq.khead;
      if (static_cast<int>(tail - head) <= 0) break;
      const io_uring_cqe* cqe =
          &ring_.cq.cqes[io_uring_cqe_index(&ring_, head, ring_.cq.ring_mask)];
      const uint64_t tag = cqe->user_data;
      const int res = cqe->res;
      io_uring_smp_store_release(ring_.cq.khead, head + 1);
      if (tag == kWakeTag) {
        ArmWake();
        continue;
      }
      auto* op = reinterpret_cast<IoOp*>(tag);
      op->result = res;
      --in_kernel_;
      --inflight_;
      ++done;
      op->Complete();
    }
    return done;
  }

  void Wake() override {
    uint64_t one = 1;
    ssize_t r = write(wake_fd_, &one, sizeof(one));
    (void)r;  // EAGAIN means a wake is already pending: fine.
  }

  int inflight() const override { return inflight_; }
  uint64_t completion_overflows() const override { return overflows_; }
  const char* name() const override { return "io_uring"; }
  bool polls_descriptors() const override { return true; }

 private:
  // Prepares `op` in a submission entry (submitted by the next Enter()).
  KVBLK_HOT void Place(IoOp* op) {
    io_uring_sqe* sqe = GetSqe();
    // A one-buffer read, the common case, is prepared here as
    // IORING_OP_READ (no iovec array for the kernel to copy and check):
    // the switch in Prepare() compiles to a jump table, one more page for
    // a read to touch (see disk/hot.h).
    if (op->kind == IoOp::Kind::kReadv && op->iovcnt == 1 &&
        op->iov[0].iov_len <= kMaxOneBuffer) {
      io_uring_prep_read(sqe, op->fd, op->iov[0].iov_base,
                         static_cast<unsigned>(op->iov[0].iov_len), op->offset);
    } else {
      Prepare(sqe, op);
    }
    io_uring_sqe_set_data(sqe, op);
    ++in_kernel_;
  }

  // Moves what the completion ring now has slots for from the backlog to
  // the submission queue, oldest first.
  void PlaceBacklog() {
    while (!backlog_.empty() && in_kernel_ < limit_) {
      IoOp* op = backlog_.front();
      backlog_.pop_front();
      Place(op);
    }
  }

  static void Prepare(io_uring_sqe* sqe, const IoOp* op) {
    switch (op->kind) {
      case IoOp::Kind::kReadv:  // (Submit prepares one buffer up to 4 GiB itself)
        io_uring_prep_readv(sqe, op->fd, op->iov, op->iovcnt, op->offset);
        break;
      // One buffer: IORING_OP_WRITE spares the kernel copying and checking
      // an iovec array.
      case IoOp::Kind::kWritev:
        if (op->iovcnt == 1 && op->iov[0].iov_len <= kMaxOneBuffer) {
          io_uring_prep_write(sqe, op->fd, op->iov[0].iov_base,
                              static_cast<unsigned>(op->iov[0].iov_len), op->offset);
        } else {
          io_uring_prep_writev(sqe, op->fd, op->iov, op->iovcnt, op->offset);
        }
        break;
      case IoOp::Kind::kFsync:
        io_uring_prep_fsync(sqe, op->fd, 0);
        break;
      case IoOp::Kind::kFdatasync:
        io_uring_prep_fsync(sqe, op->fd, IORING_FSYNC_DATASYNC);
        break;
      case IoOp::Kind::kFallocate:
        io_uring_prep_fallocate(sqe, op->fd, op->mode, op->offset, op->length);
        break;
    }
  }

  // A full submission queue is entered to make room. That cannot spin:
  // with no completion overflow (see Submit()) no kernel refuses it for
  // completion space.
  io_uring_sqe* GetSqe() {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    while (sqe == nullptr) {
      Enter();
      sqe = io_uring_get_sqe(&ring_);
    }
    return sqe;
  }

  // Submits what is queued. A kernel short of memory or of completion
  // space (EAGAIN, EBUSY) leaves the submissions queued for the next call.
  // Any other failure means the ring is unusable and every request on it
  // would hang: that is fatal.
  void Enter() {
    int r = io_uring_submit(&ring_);
    if (r < 0 && r != -EAGAIN && r != -EBUSY && r != -EINTR) Fail("io_uring_enter", r);
  }

  [[noreturn]] static void Fail(const char* what, int err) {
    std::fprintf(stderr, "kvblk: io_uring engine: %s: %s\n", what, std::strerror(-err));
    std::abort();
  }

  void ArmWake() {
    io_uring_sqe* sqe = GetSqe();
    io_uring_prep_read(sqe, wake_fd_, &wake_buf_, sizeof(wake_buf_), 0);
    io_uring_sqe_set_data64(sqe, kWakeTag);
  }

  io_uring ring_{};
  bool ring_ok_ = false;
  int wake_fd_ = -1;
  uint64_t wake_buf_ = 0;
  unsigned limit_ = 0;      // operations the kernel may hold (see Submit())
  unsigned in_kernel_ = 0;  // operations prepared and not yet reaped
  int inflight_ = 0;        // those plus the backlog's
  uint64_t overflows_ = 0;  // Reap() passes that saw the ring overflowed
  std::deque<IoOp*> backlog_;
};

}  // namespace

std::unique_ptr<IoEngine> MakeUringEngine(unsigned entries, int* err) {
  auto e = std::make_unique<UringEngine>();
  int r = e->Init(entries);
  if (r < 0) {
    if (err) *err = -r;
    return nullptr;
  }
  return e;
}

}  // namespace kvblk
