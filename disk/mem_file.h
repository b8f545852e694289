// MemFile: an in-memory File for tests, fuzzing and crash simulation.
//
// Every operation suspends once (it completes on a later loop pass), so
// concurrent requests on top of it interleave the way they do over io_uring.
// Hooks let a test record the order of writes and flushes, or fail chosen
// operations with an errno.
#ifndef KVBLK_DISK_MEM_FILE_H_
#define KVBLK_DISK_MEM_FILE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "disk/file.h"

namespace kvblk {

struct MemFileEvent {
  enum class Kind : uint8_t { kRead, kWrite, kFlush, kDiscard, kWriteZeroes };
  Kind kind;
  uint64_t offset;
  uint64_t length;
};

// Shared contents, so that a test can "reopen" the same bytes.
struct MemFileData {
  std::mutex mu;
  std::vector<uint8_t> bytes;
};

class MemFile final : public File {
 public:
  explicit MemFile(std::shared_ptr<MemFileData> data, std::string name = "mem",
                   bool read_only = false);
  static std::unique_ptr<MemFile> Create(std::string name = "mem");

  Task<Status> ReadV(const iovec* iov, int iovcnt, uint64_t offset) override;
  Task<Status> WriteV(const iovec* iov, int iovcnt, uint64_t offset) override;
  Task<Status> Flush() override;
  Task<Status> Discard(uint64_t offset, uint64_t length) override;
  Task<Status> WriteZeroes(uint64_t offset, uint64_t length, bool allocate) override;
  Result<uint64_t> Size() override;
  Status Truncate(uint64_t size) override;
  Result<uint64_t> AllocatedBytes() override { return Size(); }
  const std::string& path() const override { return name_; }
  bool read_only() const override { return ro_; }

  std::shared_ptr<MemFileData> data() const { return data_; }

  // Called before each operation takes effect; returning a non-zero errno
  // fails the operation with it instead.
  void SetHook(std::function<int(const MemFileEvent&)> hook) { hook_ = std::move(hook); }
  // Whether operations suspend once before completing (default true).
  void set_yield(bool y) { yield_ = y; }

 private:
  Task<Status> Begin(const MemFileEvent& ev);

  std::shared_ptr<MemFileData> data_;
  std::string name_;
  bool ro_;
  bool yield_ = true;
  std::function<int(const MemFileEvent&)> hook_;
};

}  // namespace kvblk

#endif  // KVBLK_DISK_MEM_FILE_H_
