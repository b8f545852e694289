// ErrorOr<T, E> and ErrorStatus<E>: a value or a domain error enum, for the
// virtio layers whose errors are named after what the peer got wrong
// (VirtioError for guests, VhostUserError for front ends).
#ifndef KVBLK_VIRTIO_ERROR_OR_H_
#define KVBLK_VIRTIO_ERROR_OR_H_

#include <utility>
#include <variant>

namespace kvblk {

template <typename T, typename E>
class [[nodiscard]] ErrorOr {
 public:
  ErrorOr(T value) : v_(std::move(value)) {}  // NOLINT: implicit by design
  ErrorOr(E e) : v_(e) {}                     // NOLINT: implicit by design

  bool ok() const { return std::holds_alternative<T>(v_); }
  E error() const { return std::get<E>(v_); }
  T& value() & { return std::get<T>(v_); }
  const T& value() const& { return std::get<T>(v_); }
  T&& value() && { return std::get<T>(std::move(v_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

 private:
  std::variant<T, E> v_;
};

// No value: success, or the error. error() is meaningful only when !ok().
template <typename E>
class [[nodiscard]] ErrorStatus {
 public:
  ErrorStatus() = default;
  ErrorStatus(E e) : error_(e), ok_(false) {}  // NOLINT: implicit by design
  bool ok() const { return ok_; }
  E error() const { return error_; }

 private:
  E error_{};
  bool ok_ = true;
};

}  // namespace kvblk

#endif  // KVBLK_VIRTIO_ERROR_OR_H_
