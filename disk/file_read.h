// FileRead: the format-independent half of a callback read
// (BlockDevice::StartRead): one host extent of the image file, read with
// File::StartReadV straight into the request's buffers and completed from
// the I/O engine, without a coroutine.
//
// A device's read state derives from FileRead and lives in the request's
// device_state (so a read allocates nothing). Start() submits the read;
// when the engine completes it, a whole transfer calls `finish` with OK,
// and anything else (a short transfer, EINTR, an error) goes through
// File::FinishReadV first, which retries, continues, zero-fills past the
// end of the file or reports the error exactly as File::ReadV does.
// `finish` runs exactly once, on the loop that called Start(); it ends the
// FileRead's lifetime and reports to the request's `done`.
#ifndef KVBLK_DISK_FILE_READ_H_
#define KVBLK_DISK_FILE_READ_H_

#include <cstddef>
#include <cstdint>

#include "disk/file.h"
#include "disk/io_engine.h"
#include "kvblk/block_device.h"
#include "kvblk/status.h"

namespace kvblk {

struct FileRead : IoOp {
  using FinishFn = void (*)(FileRead* read, Status st);

  // Reads `want` bytes (the request's iovec total) at `host` in `file`.
  // Returns true if the read was submitted: `finish` will be called.
  // Returns false if the file cannot take this read on the fast path (see
  // File::StartReadV): nothing was started, and the caller reads another
  // way.
  bool Start(File* file, ReadRequest* req, uint64_t host, size_t want, FinishFn finish);

  File* file = nullptr;
  ReadRequest* req = nullptr;
  uint64_t host = 0;  // where the read starts in the file
  size_t want = 0;    // its length
  FinishFn finish = nullptr;

 private:
  static void OnIoDone(IoOp* op);
};

}  // namespace kvblk

#endif  // KVBLK_DISK_FILE_READ_H_
