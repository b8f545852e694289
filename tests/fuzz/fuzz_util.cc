#include "tests/fuzz/fuzz_util.h"

#include <sys/mman.h>
#include <unistd.h>

#include "kvblk/event_loop.h"

namespace kvblk::fuzz {

void TaskGroup::Wait() {
  EventLoop::Current().RunUntil([this] { return running_ == 0; });
}

MemfdFile::MemfdFile(const std::vector<uint8_t>& bytes) {
  fd_ = memfd_create("kvblk-fuzz", MFD_CLOEXEC);
  if (fd_ < 0) return;
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t n = pwrite(fd_, bytes.data() + done, bytes.size() - done, static_cast<off_t>(done));
    if (n <= 0) {
      close(fd_);
      fd_ = -1;
      return;
    }
    done += static_cast<size_t>(n);
  }
  path_ = "/proc/self/fd/" + std::to_string(fd_);
}

MemfdFile::~MemfdFile() {
  if (fd_ >= 0) close(fd_);
}

}  // namespace kvblk::fuzz
