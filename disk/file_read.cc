#include "disk/file_read.h"

#include <new>

#include "disk/hot.h"
#include "kvblk/task.h"

namespace kvblk {

KVBLK_HOT bool FileRead::Start(File* f, ReadRequest* r, uint64_t at, size_t len, FinishFn fn) {
  file = f;
  req = r;
  host = at;
  want = len;
  finish = fn;
  on_done = &FileRead::OnIoDone;
  return file->StartReadV(req->iov, req->iovcnt, host, this);
}

KVBLK_HOT void FileRead::OnIoDone(IoOp* op) {
  auto* r = static_cast<FileRead*>(op);
  if (r->result >= 0 && static_cast<size_t>(r->result) == r->want) {
    r->finish(r, Status::Ok());
    return;
  }
  try {
    Spawn(r->file->FinishReadV(r->req->iov, r->req->iovcnt, r->host, r->result),
          [r](Status st) { r->finish(r, std::move(st)); });
  } catch (const std::bad_alloc&) {  // no frame: nothing started
    r->finish(r, Status(StatusCode::kIoError, "out of memory finishing a short read"));
  }
}

}  // namespace kvblk
