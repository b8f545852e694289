// Small helpers over iovec arrays: lengths, slices, zero fill, copies.
#ifndef KVBLK_DISK_IOV_H_
#define KVBLK_DISK_IOV_H_

#include <sys/uio.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace kvblk {

// Total length of an iovec array.
inline size_t IovTotal(const iovec* iov, int iovcnt) {
  size_t n = 0;
  for (int i = 0; i < iovcnt; ++i) n += iov[i].iov_len;
  return n;
}
inline size_t IovTotal(const std::vector<iovec>& v) {
  return IovTotal(v.data(), static_cast<int>(v.size()));
}

// Appends to `out` the iovecs covering bytes [skip, skip + len) of the
// `incnt` iovecs at `in`.
inline void SliceIov(const iovec* in, int incnt, size_t skip, size_t len,
                     std::vector<iovec>* out) {
  for (int i = 0; i < incnt; ++i) {
    const iovec& v = in[i];
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
inline void SliceIov(const std::vector<iovec>& in, size_t skip, size_t len,
                     std::vector<iovec>* out) {
  SliceIov(in.data(), static_cast<int>(in.size()), skip, len, out);
}

// Drops the first `done` bytes of `*v` (after a short transfer).
inline void AdvanceIov(std::vector<iovec>* v, size_t done) {
  size_t i = 0;
  while (i < v->size() && done >= (*v)[i].iov_len) {
    done -= (*v)[i].iov_len;
    ++i;
  }
  v->erase(v->begin(), v->begin() + static_cast<long>(i));
  if (!v->empty() && done > 0) {
    (*v)[0].iov_base = static_cast<char*>((*v)[0].iov_base) + done;
    (*v)[0].iov_len -= done;
  }
}

inline void ZeroIov(const std::vector<iovec>& v) {
  for (const iovec& x : v) std::memset(x.iov_base, 0, x.iov_len);
}

// Fills `v` front to back from `src` (IovTotal(v) bytes).
inline void CopyToIov(const std::vector<iovec>& v, const uint8_t* src) {
  for (const iovec& x : v) {
    std::memcpy(x.iov_base, src, x.iov_len);
    src += x.iov_len;
  }
}

}  // namespace kvblk

#endif  // KVBLK_DISK_IOV_H_
