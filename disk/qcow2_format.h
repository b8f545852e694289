// On-disk constants of the qcow2 format (QEMU docs/interop/qcow2.rst).
// All multi-byte fields on disk are big-endian.
#ifndef KVBLK_DISK_QCOW2_FORMAT_H_
#define KVBLK_DISK_QCOW2_FORMAT_H_

#include <bit>
#include <cstdint>
#include <cstring>

namespace kvblk::qcow2 {

constexpr uint32_t kMagic = 0x514649fb;  // "QFI\xfb"
constexpr uint32_t kV2HeaderLength = 72;
constexpr uint32_t kV3MinHeaderLength = 104;
constexpr uint32_t kMinClusterBits = 9;   // 512 B
constexpr uint32_t kMaxClusterBits = 21;  // 2 MiB
constexpr uint32_t kMaxRefcountOrder = 6;  // 64-bit refcounts

// Limits that keep a hostile image from driving huge allocations (the same
// bounds QEMU enforces).
constexpr uint64_t kMaxL1Bytes = 32ull << 20;        // 32 MiB of L1 entries
constexpr uint64_t kMaxRefcountTableBytes = 8ull << 20;  // 8 MiB
constexpr uint32_t kMaxSnapshots = 65536;
constexpr uint64_t kMaxSnapshotTableBytes = 64ull << 20;
constexpr uint32_t kMaxBackingFileName = 1023;
constexpr uint64_t kMaxVirtualSize = 1ull << 61;  // 2 EiB, qemu's QCOW_MAX_SIZE-ish bound
constexpr uint64_t kMaxHeaderExtensionBytes = 1 << 20;

// Incompatible feature bits.
constexpr uint64_t kIncompatDirty = 1ull << 0;
constexpr uint64_t kIncompatCorrupt = 1ull << 1;
constexpr uint64_t kIncompatExternalData = 1ull << 2;
constexpr uint64_t kIncompatCompressionType = 1ull << 3;
constexpr uint64_t kIncompatExtendedL2 = 1ull << 4;
constexpr uint64_t kIncompatKnown = kIncompatDirty | kIncompatCorrupt |
                                    kIncompatExternalData | kIncompatCompressionType |
                                    kIncompatExtendedL2;
// Compatible feature bits.
constexpr uint64_t kCompatLazyRefcounts = 1ull << 0;
// Autoclear feature bits.
constexpr uint64_t kAutoclearBitmaps = 1ull << 0;
constexpr uint64_t kAutoclearRawExternalData = 1ull << 1;

// Header extension types.
constexpr uint32_t kExtEnd = 0;
constexpr uint32_t kExtBackingFormat = 0xe2792aca;
constexpr uint32_t kExtFeatureTable = 0x6803f857;
constexpr uint32_t kExtBitmaps = 0x23852875;
constexpr uint32_t kExtCrypto = 0x0537be77;
constexpr uint32_t kExtDataFile = 0x44415441;

constexpr uint8_t kCompressionZlib = 0;
constexpr uint8_t kCompressionZstd = 1;

// L1 entries.
constexpr uint64_t kL1OffsetMask = 0x00fffffffffffe00ull;  // bits 9-55
constexpr uint64_t kL1ReservedMask = 0x7f000000000001ffull;
// L2 entries (standard descriptors).
constexpr uint64_t kOflagCopied = 1ull << 63;
constexpr uint64_t kOflagCompressed = 1ull << 62;
constexpr uint64_t kOflagZero = 1ull << 0;
constexpr uint64_t kL2OffsetMask = 0x00fffffffffffe00ull;  // bits 9-55
constexpr uint64_t kL2StdReservedMask = 0x3f000000000001feull;  // bits 1-8, 56-61
// Refcount table entries.
constexpr uint64_t kReftOffsetMask = 0xfffffffffffffe00ull;
constexpr uint64_t kReftReservedMask = 0x1ffull;

// Extended L2 entries (qcow2.rst, "Extended L2 Entries"): the second 64 bits
// hold allocation (bits 0-31) and reads-as-zero (bits 32-63) bitmaps of 32
// subclusters; bit x (x < 32) is subcluster x. Compressed clusters have no
// subclusters: their bitmap is reserved and must be 0.
constexpr int kSubclustersPerCluster = 32;
constexpr uint32_t kSubclusterAll = 0xffffffffu;
// The bitmap word of an extended L2 entry from its two halves.
inline uint64_t SubclusterBitmap(uint32_t alloc, uint32_t zero) {
  return (uint64_t{zero} << 32) | alloc;
}
inline uint32_t SubclusterAllocBits(uint64_t bitmap) { return static_cast<uint32_t>(bitmap); }
inline uint32_t SubclusterZeroBits(uint64_t bitmap) { return static_cast<uint32_t>(bitmap >> 32); }
// Bits first .. last (inclusive, both < 32) set.
inline uint32_t SubclusterRange(uint32_t first, uint32_t last) {
  const uint32_t upto = last >= 31 ? kSubclusterAll : ((1u << (last + 1)) - 1);
  return upto & ~((1u << first) - 1);
}

// Compressed cluster descriptor: host offset in bits [0, x), additional
// 512-byte sector count in bits [x, 62), where x = 62 - (cluster_bits - 8).
inline int CompressedOffsetBits(uint32_t cluster_bits) {
  return 62 - static_cast<int>(cluster_bits - 8);
}

// Big-endian fields: a plain load or store and a byte swap (GCC 12 at -O2
// does not merge a byte-at-a-time loop into one). The tables are read on
// every request, so these matter.
template <typename T>
inline T FromBe(T v) {
  if constexpr (std::endian::native == std::endian::little) {
    if constexpr (sizeof(T) == 8) return __builtin_bswap64(v);
    if constexpr (sizeof(T) == 4) return __builtin_bswap32(v);
    if constexpr (sizeof(T) == 2) return __builtin_bswap16(v);
  }
  return v;
}
template <typename T>
inline T LoadBe(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(v));
  return FromBe(v);
}
template <typename T>
inline void StoreBe(uint8_t* p, T v) {
  v = FromBe(v);  // the swap is its own inverse
  std::memcpy(p, &v, sizeof(v));
}

inline uint64_t LoadBe64(const uint8_t* p) { return LoadBe<uint64_t>(p); }
inline uint32_t LoadBe32(const uint8_t* p) { return LoadBe<uint32_t>(p); }
inline uint16_t LoadBe16(const uint8_t* p) { return LoadBe<uint16_t>(p); }
inline void StoreBe64(uint8_t* p, uint64_t v) { StoreBe<uint64_t>(p, v); }
inline void StoreBe32(uint8_t* p, uint32_t v) { StoreBe<uint32_t>(p, v); }
inline void StoreBe16(uint8_t* p, uint16_t v) { StoreBe<uint16_t>(p, v); }

}  // namespace kvblk::qcow2

#endif  // KVBLK_DISK_QCOW2_FORMAT_H_
