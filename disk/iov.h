// IovCursor: walks an iovec array front to back, handing out slices.
#ifndef KVBLK_DISK_IOV_H_
#define KVBLK_DISK_IOV_H_

#include <sys/uio.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace kvblk {

class IovCursor {
 public:
  IovCursor(const iovec* iov, int iovcnt) : iov_(iov), n_(iovcnt) {}

  // Appends the next `len` bytes, as iovecs, to `out`, and advances.
  void Take(size_t len, std::vector<iovec>* out) {
    while (len > 0 && i_ < n_) {
      size_t avail = iov_[i_].iov_len - off_;
      size_t k = std::min(avail, len);
      if (k > 0) out->push_back({static_cast<char*>(iov_[i_].iov_base) + off_, k});
      Advance(k);
      len -= k;
    }
  }
  // Fills the next `len` bytes with zeros, and advances.
  void Zero(size_t len) {
    while (len > 0 && i_ < n_) {
      size_t k = std::min(iov_[i_].iov_len - off_, len);
      std::memset(static_cast<char*>(iov_[i_].iov_base) + off_, 0, k);
      Advance(k);
      len -= k;
    }
  }
  // Copies `len` bytes from `src` into the next bytes, and advances.
  void CopyIn(const uint8_t* src, size_t len) {
    while (len > 0 && i_ < n_) {
      size_t k = std::min(iov_[i_].iov_len - off_, len);
      std::memcpy(static_cast<char*>(iov_[i_].iov_base) + off_, src, k);
      src += k;
      Advance(k);
      len -= k;
    }
  }
  // Copies the next `len` bytes out to `dst`, and advances.
  void CopyOut(uint8_t* dst, size_t len) {
    while (len > 0 && i_ < n_) {
      size_t k = std::min(iov_[i_].iov_len - off_, len);
      std::memcpy(dst, static_cast<const char*>(iov_[i_].iov_base) + off_, k);
      dst += k;
      Advance(k);
      len -= k;
    }
  }
  void Skip(size_t len) {
    while (len > 0 && i_ < n_) {
      size_t k = std::min(iov_[i_].iov_len - off_, len);
      Advance(k);
      len -= k;
    }
  }

 private:
  void Advance(size_t k) {
    off_ += k;
    while (i_ < n_ && off_ >= iov_[i_].iov_len) {
      off_ -= iov_[i_].iov_len;
      ++i_;
      if (off_ == 0) break;
    }
  }
  const iovec* iov_;
  int n_;
  int i_ = 0;
  size_t off_ = 0;
};

}  // namespace kvblk


namespace kvblk {

// Appends to `out` the iovecs covering bytes [skip, skip + len) of `in`.
inline void SliceIov(const std::vector<iovec>& in, size_t skip, size_t len,
                     std::vector<iovec>* out) {
  for (const iovec& v : in) {
    if (len == 0) break;
    if (skip >= v.iov_len) {
      skip -= v.iov_len;
      continue;
    }
    size_t k = std::min(v.iov_len - skip, len);
    out->push_back({static_cast<char*>(v.iov_base) + skip, k});
    skip = 0;
    len -= k;
  }
}

inline void ZeroIov(const std::vector<iovec>& v) {
  for (const iovec& x : v) std::memset(x.iov_base, 0, x.iov_len);
}

}  // namespace kvblk

#endif  // KVBLK_DISK_IOV_H_
