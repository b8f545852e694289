// The qcow2 header: decoding, validation and encoding
// (docs/interop/qcow2.rst, "Header" and "Header extensions").
//
// Decode() accepts only what the spec allows and what kvblk can handle:
// every offset and size is checked for alignment, range and the limits in
// qcow2_format.h before anything uses it. Encode() reproduces every field,
// including unknown header extensions and additional header bytes past the
// fields kvblk knows, so that rewriting a header never drops what another
// implementation stored there.
#ifndef KVBLK_DISK_QCOW2_HEADER_H_
#define KVBLK_DISK_QCOW2_HEADER_H_

#include <cstdint>
#include <string>
#include <vector>

#include "disk/qcow2_format.h"
#include "kvblk/status.h"

namespace kvblk::qcow2 {

struct FeatureName {
  uint8_t type;  // 0 incompatible, 1 compatible, 2 autoclear
  uint8_t bit;
  std::string name;
};

struct HeaderExtension {
  uint32_t type;
  std::vector<uint8_t> data;  // unpadded
};

struct Header {
  uint32_t version = 3;
  uint64_t backing_file_offset = 0;
  uint32_t backing_file_size = 0;
  uint32_t cluster_bits = 16;
  uint64_t size = 0;
  uint32_t crypt_method = 0;
  uint32_t l1_size = 0;
  uint64_t l1_table_offset = 0;
  uint64_t refcount_table_offset = 0;
  uint32_t refcount_table_clusters = 0;
  uint32_t nb_snapshots = 0;
  uint64_t snapshots_offset = 0;
  // v3 fields (v2: all zero, refcount_order 4, header_length 72).
  uint64_t incompatible_features = 0;
  uint64_t compatible_features = 0;
  uint64_t autoclear_features = 0;
  uint32_t refcount_order = 4;
  uint32_t header_length = kV3MinHeaderLength;
  uint8_t compression_type = kCompressionZlib;
  // Bytes of the header past the fields above (up to header_length), kept
  // verbatim.
  std::vector<uint8_t> extra_header;

  // Extensions. The known ones are decoded into fields; every other one is
  // kept in `unknown_extensions`, in order, and written back unchanged.
  std::string backing_file;    // read from backing_file_offset
  std::string backing_format;  // backing-format extension, "" if absent
  std::vector<FeatureName> feature_names;
  std::vector<HeaderExtension> unknown_extensions;
  bool has_bitmaps_extension = false;  // kept as unknown; noted for autoclear
  std::string data_file;  // external data file name extension (not supported)

  uint64_t cluster_size() const { return uint64_t{1} << cluster_bits; }
  uint32_t refcount_bits() const { return 1u << refcount_order; }
  bool dirty() const { return incompatible_features & kIncompatDirty; }
  bool corrupt() const { return incompatible_features & kIncompatCorrupt; }
  bool extended_l2() const { return incompatible_features & kIncompatExtendedL2; }
  bool lazy_refcounts() const { return compatible_features & kCompatLazyRefcounts; }
  // Bytes per L2 entry: 8, or 16 with extended L2 entries.
  uint32_t l2_entry_size() const { return extended_l2() ? 16 : 8; }
  uint64_t l2_entries() const { return cluster_size() / l2_entry_size(); }
  // Name of an incompatible feature bit from the feature table, or
  // "unknown feature bit N".
  std::string IncompatibleFeatureName(int bit) const;
};

// Decodes the header from the first bytes of an image (`buf` holds at least
// the first cluster, or the whole file if shorter) and validates it against
// `file_size`. `file_name` is used in messages.
// Errors: InvalidArgument "not a qcow2 image" for a bad magic; NotSupported
// for versions other than 2/3, encryption, unknown incompatible features (by
// name), external data files; Corruption for anything inconsistent or out
// of bounds (names the field and its value).
// The backing file name is read from `buf` (it must lie in the first cluster
// per spec).
Result<Header> DecodeHeader(const std::vector<uint8_t>& buf, uint64_t file_size,
                            const std::string& file_name);

// Encodes the header, its extensions (backing format, feature name table,
// unknown ones in order, end marker) and the backing file name into one
// buffer that fits the first cluster. NotSupported if it would not fit.
// Sets backing_file_offset/size and header_length consistently in the
// returned bytes (the caller's Header is updated through `h`).
Result<std::vector<uint8_t>> EncodeHeader(Header* h);

// The feature-name table kvblk writes into every v3 image it creates.
std::vector<FeatureName> DefaultFeatureNames();

}  // namespace kvblk::qcow2

#endif  // KVBLK_DISK_QCOW2_HEADER_H_
