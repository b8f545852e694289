#include "disk/loop_thread.h"

#include <exception>
#include <future>
#include <string>
#include <system_error>

#include "disk/io_engine.h"

namespace kvblk {

Result<std::unique_ptr<LoopThread>> LoopThread::Start() {
  std::unique_ptr<LoopThread> t(new LoopThread());
  LoopThread* self = t.get();
  std::promise<Status> ready;
  std::future<Status> started = ready.get_future();
  try {
    t->thread_ = std::thread([self, &ready] {
      try {
        self->loop_ = std::make_unique<EventLoop>(MakeDefaultIoEngine());
      } catch (const std::exception& e) {
        ready.set_value(
            Status(StatusCode::kIoError, std::string("I/O thread: creating its loop: ") + e.what()));
        return;
      }
      EventLoop::SetCurrent(self->loop_.get());
      ready.set_value(Status::Ok());
      self->loop_->RunUntil([self] { return self->stop_.load(); });
      EventLoop::SetCurrent(nullptr);
    });
  } catch (const std::system_error& e) {
    return Status(StatusCode::kIoError, std::string("starting an I/O thread: ") + e.what());
  }
  t->id_ = t->thread_.get_id();
  Status st = started.get();
  if (!st.ok()) {
    t->thread_.join();
    return st;
  }
  return t;
}

LoopThread::~LoopThread() { Stop(); }

void LoopThread::Stop() {
  if (!thread_.joinable()) return;
  stop_ = true;
  loop_->Wake();
  thread_.join();
}

}  // namespace kvblk
