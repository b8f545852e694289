// Little-endian loads and stores on unaligned bytes (guest memory, config
// space, request headers). Every multi-byte field virtio defines for a 1.x
// device is little-endian, whatever the host.
#ifndef KVBLK_VIRTIO_BYTE_ORDER_H_
#define KVBLK_VIRTIO_BYTE_ORDER_H_

#include <bit>
#include <cstdint>
#include <cstring>

namespace kvblk {

template <typename T>
constexpr T FromLe(T v) {
  if constexpr (std::endian::native == std::endian::big) {
    if constexpr (sizeof(T) == 2) return static_cast<T>(__builtin_bswap16(v));
    if constexpr (sizeof(T) == 4) return static_cast<T>(__builtin_bswap32(v));
    if constexpr (sizeof(T) == 8) return static_cast<T>(__builtin_bswap64(v));
  }
  return v;
}
template <typename T>
constexpr T ToLe(T v) {
  return FromLe(v);
}

inline uint16_t LoadLe16(const void* p) {
  uint16_t v;
  std::memcpy(&v, p, sizeof v);
  return FromLe(v);
}
inline uint32_t LoadLe32(const void* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return FromLe(v);
}
inline uint64_t LoadLe64(const void* p) {
  uint64_t v;
  std::memcpy(&v, p, sizeof v);
  return FromLe(v);
}
inline void StoreLe16(void* p, uint16_t v) {
  v = ToLe(v);
  std::memcpy(p, &v, sizeof v);
}
inline void StoreLe32(void* p, uint32_t v) {
  v = ToLe(v);
  std::memcpy(p, &v, sizeof v);
}
inline void StoreLe64(void* p, uint64_t v) {
  v = ToLe(v);
  std::memcpy(p, &v, sizeof v);
}

}  // namespace kvblk

#endif  // KVBLK_VIRTIO_BYTE_ORDER_H_
