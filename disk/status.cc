#include "kvblk/status.h"

#include <cerrno>
#include <cstring>

namespace kvblk {

const char* StatusCodeName(StatusCode code) {
  switch (code) {
    case StatusCode::kOk: return "OK";
    case StatusCode::kInvalidArgument: return "Invalid argument";
    case StatusCode::kNotSupported: return "Not supported";
    case StatusCode::kCorruption: return "Corruption";
    case StatusCode::kIoError: return "I/O error";
    case StatusCode::kNoSpace: return "No space";
    case StatusCode::kNotFound: return "Not found";
    case StatusCode::kReadOnly: return "Read-only";
    case StatusCode::kBusy: return "Busy";
  }
  return "Unknown";
}

Status::Status(StatusCode code, std::string message, int sys_errno) {
  if (code != StatusCode::kOk) {
    rep_ = std::make_shared<const Rep>(Rep{code, sys_errno, std::move(message)});
  }
}

Status Status::FromErrno(int err, const std::string& context) {
  StatusCode code = StatusCode::kIoError;
  switch (err) {
    case ENOSPC:
    case EDQUOT: code = StatusCode::kNoSpace; break;
    case ENOENT: code = StatusCode::kNotFound; break;
    case EROFS:
    case EACCES:
    case EPERM: code = StatusCode::kReadOnly; break;
    case EINVAL: code = StatusCode::kInvalidArgument; break;
    case EOPNOTSUPP: code = StatusCode::kNotSupported; break;
    case EAGAIN:
    case EBUSY: code = StatusCode::kBusy; break;
    default: break;
  }
  return Status(code, context + ": " + std::strerror(err), err);
}

int Status::ToErrno() const {
  if (ok()) return 0;
  if (rep_->sys_errno > 0) return rep_->sys_errno;
  switch (rep_->code) {
    case StatusCode::kOk: return 0;
    case StatusCode::kInvalidArgument:
    case StatusCode::kCorruption: return EINVAL;
    case StatusCode::kNotSupported: return ENOTSUP;
    case StatusCode::kNoSpace: return ENOSPC;
    case StatusCode::kNotFound: return ENOENT;
    case StatusCode::kReadOnly: return EROFS;
    case StatusCode::kBusy: return EBUSY;
    case StatusCode::kIoError: return EIO;
  }
  return EIO;
}

const std::string& Status::message() const {
  static const std::string kEmpty;
  return rep_ ? rep_->message : kEmpty;
}

std::string Status::ToString() const {
  if (ok()) return "OK";
  return std::string(StatusCodeName(rep_->code)) + ": " + rep_->message;
}

Status Status::WithContext(const std::string& prefix) const {
  if (ok()) return *this;
  return Status(rep_->code, prefix + ": " + rep_->message, rep_->sys_errno);
}

}  // namespace kvblk
