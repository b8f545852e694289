// Implements disk/sync_file.h with pread/pwrite/fsync.
#include "disk/sync_file.h"

#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace kvblk {

namespace {

std::string Where(const std::string& path, const char* op, uint64_t offset, size_t len) {
  return path + ": " + op + " of " + std::to_string(len) + " bytes at offset " +
         std::to_string(offset);
}

}  // namespace

Result<std::unique_ptr<SyncFile>> SyncFile::Open(const std::string& path, bool writable) {
  int fd = ::open(path.c_str(), (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC);
  if (fd < 0) return Status::FromErrno(errno, path);
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    Status s = Status::FromErrno(errno, path);
    ::close(fd);
    return s;
  }
  if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) {
    ::close(fd);
    return Status::InvalidArgument(path + ": not a regular file or block device");
  }
  return std::unique_ptr<SyncFile>(new SyncFile(fd, path, writable));
}

SyncFile::~SyncFile() { ::close(fd_); }

Status SyncFile::ReadAt(void* buf, size_t len, uint64_t offset) const {
  auto* p = static_cast<uint8_t*>(buf);
  size_t done = 0;
  while (done < len) {
    ssize_t n = ::pread(fd_, p + done, len - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, Where(path_, "read", offset, len));
    }
    if (n == 0) {  // end of file: the rest reads as zeros
      std::memset(p + done, 0, len - done);
      break;
    }
    done += static_cast<size_t>(n);
  }
  return Status::Ok();
}

Status SyncFile::WriteAt(const void* buf, size_t len, uint64_t offset) {
  if (!writable_) return Status::ReadOnly(path_ + ": opened read-only");
  const auto* p = static_cast<const uint8_t*>(buf);
  size_t done = 0;
  while (done < len) {
    ssize_t n = ::pwrite(fd_, p + done, len - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, Where(path_, "write", offset, len));
    }
    done += static_cast<size_t>(n);
  }
  return Status::Ok();
}

Status SyncFile::Sync() {
  if (::fsync(fd_) != 0) return Status::FromErrno(errno, path_ + ": fsync");
  return Status::Ok();
}

Result<uint64_t> SyncFile::Size() const {
  struct stat st;
  if (::fstat(fd_, &st) != 0) return Status::FromErrno(errno, path_);
  if (S_ISBLK(st.st_mode)) {
    uint64_t bytes = 0;
    if (::ioctl(fd_, BLKGETSIZE64, &bytes) != 0) {
      return Status::FromErrno(errno, path_ + ": BLKGETSIZE64");
    }
    return bytes;
  }
  return static_cast<uint64_t>(st.st_size);
}

}  // namespace kvblk
