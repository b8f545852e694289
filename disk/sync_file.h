// SyncFile: blocking positional I/O on an image file, for offline tools
// (check, repair) that run outside any event loop.
//
// ReadAt/WriteAt may be called from several threads at once (pread/pwrite
// on one descriptor); they never move a shared file position. Reads past the
// end of the file return zeros, as the qcow2 layer expects of its files.
// Errors are Status values naming the path, the offset and the length.
// The operations are virtual so that tests can observe or fail them.
#ifndef KVBLK_DISK_SYNC_FILE_H_
#define KVBLK_DISK_SYNC_FILE_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "kvblk/status.h"

namespace kvblk {

class SyncFile {
 public:
  // Opens `path` read-only or read-write (never creates it). NotFound,
  // ReadOnly, IoError... from errno, with the path in the message;
  // InvalidArgument for something that is not a regular file or block device.
  static Result<std::unique_ptr<SyncFile>> Open(const std::string& path, bool writable);
  virtual ~SyncFile();
  SyncFile(const SyncFile&) = delete;
  SyncFile& operator=(const SyncFile&) = delete;

  // Fills `buf` with `len` bytes from `offset`; bytes past the end of the
  // file read as zero. Thread-safe.
  virtual Status ReadAt(void* buf, size_t len, uint64_t offset) const;
  // Writes all `len` bytes at `offset` (the file grows as needed).
  // Thread-safe for disjoint ranges.
  virtual Status WriteAt(const void* buf, size_t len, uint64_t offset);
  // Makes completed writes durable (fsync: sizes may have changed).
  virtual Status Sync();
  // Size of the file in bytes (block devices: the device size).
  virtual Result<uint64_t> Size() const;

  const std::string& path() const { return path_; }
  bool writable() const { return writable_; }

 protected:
  // Takes ownership of `fd`.
  SyncFile(int fd, std::string path, bool writable)
      : fd_(fd), path_(std::move(path)), writable_(writable) {}

 private:
  int fd_;
  std::string path_;
  bool writable_;
};

}  // namespace kvblk

#endif  // KVBLK_DISK_SYNC_FILE_H_
