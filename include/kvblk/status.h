// Status and Result<T>: errors as values.
//
// Every fallible kvblk call returns a Status (no value) or a Result<T> (a value
// or a Status). Both are [[nodiscard]]: an ignored error is a compile error.
// A Status names what kind of failure happened (so callers can branch on it)
// and carries a message that names the file, offset and structure involved.
#ifndef KVBLK_STATUS_H_
#define KVBLK_STATUS_H_

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <variant>

namespace kvblk {

enum class StatusCode : uint8_t {
  kOk = 0,
  kInvalidArgument,  // the caller asked for something malformed or out of range
  kNotSupported,     // well-formed, but a feature kvblk does not implement
  kCorruption,       // on-disk data violates the format
  kIoError,          // the operating system reported an I/O failure
  kNoSpace,          // ENOSPC/EDQUOT from the host
  kNotFound,         // a file, snapshot or object does not exist
  kReadOnly,         // a write to something opened read-only
  kBusy,             // the resource is locked or in use
};

const char* StatusCodeName(StatusCode code);

class [[nodiscard]] Status {
 public:
  Status() = default;  // OK
  Status(StatusCode code, std::string message, int sys_errno = 0);

  static Status Ok() { return Status(); }
  static Status InvalidArgument(std::string msg) {
    return Status(StatusCode::kInvalidArgument, std::move(msg));
  }
  static Status NotSupported(std::string msg) {
    return Status(StatusCode::kNotSupported, std::move(msg));
  }
  static Status Corruption(std::string msg) {
    return Status(StatusCode::kCorruption, std::move(msg));
  }
  static Status NotFound(std::string msg) {
    return Status(StatusCode::kNotFound, std::move(msg));
  }
  static Status ReadOnly(std::string msg) {
    return Status(StatusCode::kReadOnly, std::move(msg));
  }
  static Status Busy(std::string msg) { return Status(StatusCode::kBusy, std::move(msg)); }
  // Maps an errno value to IoError, NoSpace, NotFound, ... and appends
  // strerror(err) to `context`.
  static Status FromErrno(int err, const std::string& context);

  bool ok() const { return rep_ == nullptr; }
  StatusCode code() const { return rep_ ? rep_->code : StatusCode::kOk; }
  // The errno behind an I/O failure, or 0.
  int sys_errno() const { return rep_ ? rep_->sys_errno : 0; }
  // The positive errno to report to a POSIX-style caller (the C API, fio):
  // 0 for OK; the errno behind the failure when there is one (a permission
  // failure stays EACCES, though its code is ReadOnly); else by code:
  // InvalidArgument and Corruption EINVAL, NotSupported ENOTSUP, NoSpace
  // ENOSPC, NotFound ENOENT, ReadOnly EROFS, Busy EBUSY, IoError EIO.
  int ToErrno() const;
  const std::string& message() const;
  // "Corruption: <message>" or "OK".
  std::string ToString() const;

  // Returns a copy whose message is "<prefix>: <message>".
  Status WithContext(const std::string& prefix) const;

 private:
  struct Rep {
    StatusCode code;
    int sys_errno;
    std::string message;
  };
  std::shared_ptr<const Rep> rep_;
};

// A value of type T, or the Status that explains why there is none.
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}  // NOLINT: implicit by design
  Result(Status status) : v_(std::move(status)) {}  // NOLINT: must not be OK

  bool ok() const { return std::holds_alternative<T>(v_); }
  const Status& status() const {
    static const Status kOkStatus;
    return ok() ? kOkStatus : std::get<Status>(v_);
  }
  T& value() & { return std::get<T>(v_); }
  const T& value() const& { return std::get<T>(v_); }
  T&& value() && { return std::get<T>(std::move(v_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace kvblk

#define KVBLK_CONCAT_INNER_(a, b) a##b
#define KVBLK_CONCAT_(a, b) KVBLK_CONCAT_INNER_(a, b)

// Returns (or co_returns) the Status of `expr` if it is not OK.
#define KVBLK_RETURN_IF_ERROR(expr)            \
  do {                                         \
    ::kvblk::Status kvblk_st_ = (expr);        \
    if (!kvblk_st_.ok()) return kvblk_st_;     \
  } while (0)
#define KVBLK_CO_RETURN_IF_ERROR(expr)         \
  do {                                         \
    ::kvblk::Status kvblk_st_ = (expr);        \
    if (!kvblk_st_.ok()) co_return kvblk_st_;  \
  } while (0)

// Declares/assigns `lhs` from the value of a Result expression, or returns
// its Status.
#define KVBLK_ASSIGN_OR_RETURN(lhs, expr) \
  KVBLK_ASSIGN_OR_RETURN_IMPL_(KVBLK_CONCAT_(kvblk_r_, __LINE__), lhs, expr, return)
#define KVBLK_CO_ASSIGN_OR_RETURN(lhs, expr) \
  KVBLK_ASSIGN_OR_RETURN_IMPL_(KVBLK_CONCAT_(kvblk_r_, __LINE__), lhs, expr, co_return)
#define KVBLK_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr, ret) \
  auto tmp = (expr);                                      \
  if (!tmp.ok()) ret tmp.status();                        \
  lhs = std::move(tmp).value()

#endif  // KVBLK_STATUS_H_
