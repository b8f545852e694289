#include "kvblk/event_loop.h"

#include "disk/io_engine.h"
#include "disk/hot.h"

namespace kvblk {

EventLoop::EventLoop(std::unique_ptr<IoEngine> engine) : engine_(std::move(engine)) {}

EventLoop::~EventLoop() {
  // Another thread may still be inside Post()/Wake() for work this loop has
  // already run: they touch the loop only under posted_mu_, so wait for them.
  std::lock_guard<std::mutex> l(posted_mu_);
}

namespace {
// Current() runs several times per request, so its pointers use the
// initial-exec TLS model: a plain %fs-relative load instead of a call to
// __tls_get_addr when kvblk is linked into a shared object (fio's engine).
// A shared object loaded with dlopen takes these few bytes from the static
// TLS space glibc reserves for that purpose.
#define KVBLK_FAST_TLS __attribute__((tls_model("initial-exec")))
thread_local EventLoop* tl_installed KVBLK_FAST_TLS = nullptr;  // SetCurrent's
thread_local EventLoop* tl_own KVBLK_FAST_TLS = nullptr;        // tl_own_loop's
// Owns the loop Current() creates; destroyed when the thread exits.
struct OwnLoop {
  std::unique_ptr<EventLoop> loop;
  ~OwnLoop() { tl_own = nullptr; }
};
thread_local OwnLoop tl_own_loop;

EventLoop& CreateOwnLoop() {
  tl_own_loop.loop = std::make_unique<EventLoop>(MakeDefaultIoEngine());
  tl_own = tl_own_loop.loop.get();
  return *tl_own;
}
}  // namespace

KVBLK_HOT EventLoop& EventLoop::Current() {
  if (tl_installed != nullptr) return *tl_installed;
  if (tl_own != nullptr) return *tl_own;
  return CreateOwnLoop();
}

void EventLoop::SetCurrent(EventLoop* loop) { tl_installed = loop; }

// The wake-up is sent under posted_mu_: once the loop has run the posted
// work it may be destroyed, and the destructor waits for the mutex.
void EventLoop::Post(std::coroutine_handle<> h) {
  std::lock_guard<std::mutex> l(posted_mu_);
  posted_.push_back(h);
  posted_any_.store(true, std::memory_order_release);
  engine_->Wake();
}

void EventLoop::PostFunction(std::function<void()> fn) {
  std::lock_guard<std::mutex> l(posted_mu_);
  posted_fns_.push_back(std::move(fn));
  posted_any_.store(true, std::memory_order_release);
  engine_->Wake();
}

void EventLoop::Wake() {
  std::lock_guard<std::mutex> l(posted_mu_);
  engine_->Wake();
}

// Runs on every pass, so it allocates nothing and takes no lock when
// nothing was posted. The posted lists are swapped with spares that keep
// their capacity; locals (not members) hold them while they run, so a
// posted function that runs the loop again is safe.
bool EventLoop::DrainPosted() {
  if (!posted_any_.load(std::memory_order_acquire)) return false;
  std::vector<std::coroutine_handle<>> hs = std::move(spare_posted_);
  std::vector<std::function<void()>> fns = std::move(spare_fns_);
  {
    std::lock_guard<std::mutex> l(posted_mu_);
    hs.swap(posted_);
    fns.swap(posted_fns_);
    posted_any_.store(false, std::memory_order_relaxed);
  }
  for (auto h : hs) ready_.push_back(h);
  for (auto& fn : fns) fn();
  const bool did = !hs.empty() || !fns.empty();
  hs.clear();
  fns.clear();
  if (spare_posted_.capacity() < hs.capacity()) spare_posted_ = std::move(hs);
  if (spare_fns_.capacity() < fns.capacity()) spare_fns_ = std::move(fns);
  return did;
}

void EventLoop::AtPassEnd(std::function<void()> fn) {
  if (pass_depth_ == 0) {
    fn();
    return;
  }
  pass_end_.push_back(std::move(fn));
}

bool EventLoop::RunPassEnd() {
  if (pass_end_.empty()) return false;
  std::vector<std::function<void()>> fns;
  fns.swap(pass_end_);
  for (auto& fn : fns) fn();
  fns.clear();
  if (pass_end_.empty()) pass_end_.swap(fns);  // keep the capacity
  return true;
}

KVBLK_HOT bool EventLoop::RunOnce() {
  ++pass_depth_;
  // The checks before DrainPosted() and RunPassEnd() keep a pass that has
  // only I/O to reap (most of them) free of those calls.
  bool did = posted_any_.load(std::memory_order_acquire) && DrainPosted();
  // Resume only what was ready at the start of the pass; coroutines that
  // become ready meanwhile run in the next pass, after I/O is submitted.
  size_t n = ready_.size();
  for (size_t i = 0; i < n; ++i) {
    auto h = ready_.front();
    ready_.pop_front();
    h.resume();
    did = true;
  }
  if (engine_->Reap(false) > 0) did = true;
  --pass_depth_;
  if (!pass_end_.empty() && RunPassEnd()) did = true;
  return did;
}

void EventLoop::RunUntil(const std::function<bool()>& done) {
  while (!done()) {
    if (RunOnce()) continue;
    if (done()) break;
    {
      std::lock_guard<std::mutex> l(posted_mu_);
      if (!posted_.empty() || !posted_fns_.empty()) continue;
    }
    ++pass_depth_;
    engine_->Reap(true);
    --pass_depth_;
    RunPassEnd();
  }
}

}  // namespace kvblk
