// Implements disk/qcow2_header.h: the qcow2 header, its validation and its
// header extensions (QEMU docs/interop/qcow2.rst, "Header", "Additional
// fields", "Header extensions", "Feature name table").
#include "disk/qcow2_header.h"

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

namespace kvblk::qcow2 {
namespace {

// Byte offsets of the header fields.
constexpr size_t kOffMagic = 0;
constexpr size_t kOffVersion = 4;
constexpr size_t kOffBackingFileOffset = 8;
constexpr size_t kOffBackingFileSize = 16;
constexpr size_t kOffClusterBits = 20;
constexpr size_t kOffSize = 24;
constexpr size_t kOffCryptMethod = 32;
constexpr size_t kOffL1Size = 36;
constexpr size_t kOffL1TableOffset = 40;
constexpr size_t kOffRefcountTableOffset = 48;
constexpr size_t kOffRefcountTableClusters = 56;
constexpr size_t kOffNbSnapshots = 60;
constexpr size_t kOffSnapshotsOffset = 64;
constexpr size_t kOffIncompatible = 72;
constexpr size_t kOffCompatible = 80;
constexpr size_t kOffAutoclear = 88;
constexpr size_t kOffRefcountOrder = 96;
constexpr size_t kOffHeaderLength = 100;
constexpr size_t kOffCompressionType = 104;
// End of the compression type field and its padding.
constexpr uint32_t kV3CompressionHeaderLength = 112;

constexpr size_t kExtHeaderBytes = 8;  // type + length
constexpr size_t kFeatureNameEntryBytes = 48;
constexpr size_t kFeatureNameBytes = 46;
// Fixed part of one snapshot table entry; the table holds at least this much
// per snapshot.
constexpr uint64_t kMinSnapshotEntryBytes = 40;
// Names stored in string extensions; generous compared with qemu's limits,
// and bounded by the first cluster anyway.
constexpr size_t kMaxExtensionString = 1023;

std::string Hex(uint64_t v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "0x%" PRIx64, v);
  return buf;
}

std::string Dec(uint64_t v) { return std::to_string(v); }

uint64_t AlignUp8(uint64_t v) { return (v + 7) & ~uint64_t{7}; }

// Checks that a table of `bytes` bytes at `offset` is cluster aligned and
// lies inside the file. `field` names the offset field in messages.
Status CheckTable(const std::string& file, const char* field, uint64_t offset, uint64_t bytes,
                  uint64_t cluster_size, uint64_t file_size) {
  if (offset & (cluster_size - 1)) {
    return Status::Corruption(file + ": " + field + " " + Hex(offset) +
                              " is not aligned to the cluster size " + Dec(cluster_size));
  }
  if (bytes == 0) return Status::Ok();
  if (offset == 0) {
    return Status::Corruption(file + ": " + field + " 0 overlaps the header");
  }
  if (offset > file_size || bytes > file_size - offset) {
    return Status::Corruption(file + ": " + field + " " + Hex(offset) + " + " + Dec(bytes) +
                              " bytes lies past the end of the file (" + Dec(file_size) +
                              " bytes)");
  }
  return Status::Ok();
}

std::string BytesToString(const uint8_t* p, size_t n) {
  return std::string(reinterpret_cast<const char*>(p), n);
}

// Parses the header extension area [start, end) of `buf` into `h`. `end` is
// at most the cluster size; an area that runs past the end of `buf` (a file
// shorter than one cluster) is reported as truncation.
Status ParseExtensions(const std::vector<uint8_t>& buf, uint64_t start, uint64_t end,
                       const std::string& file, Header* h) {
  bool seen_backing_format = false;
  bool seen_feature_table = false;
  bool seen_data_file = false;
  uint64_t pos = start;
  while (pos < end) {
    if (end - pos < kExtHeaderBytes) {
      return Status::Corruption(file + ": header extension at offset " + Hex(pos) +
                                " overruns the header extension area");
    }
    if (pos + kExtHeaderBytes > buf.size()) {
      return Status::Corruption(file + ": truncated header extension at offset " + Hex(pos));
    }
    const uint32_t type = LoadBe32(&buf[pos]);
    const uint32_t len = LoadBe32(&buf[pos + 4]);
    if (type == kExtEnd) return Status::Ok();
    const uint64_t data = pos + kExtHeaderBytes;
    if (len > end - data || len > kMaxHeaderExtensionBytes) {
      return Status::Corruption(file + ": header extension " + Hex(type) + " at offset " +
                                Hex(pos) + " has length " + Dec(len) +
                                ", past the end of the first cluster");
    }
    if (data + len > buf.size()) {
      return Status::Corruption(file + ": truncated header extension " + Hex(type) + " at offset " +
                                Hex(pos));
    }
    const uint8_t* p = buf.data() + data;
    switch (type) {
      case kExtBackingFormat:
        if (seen_backing_format) {
          return Status::Corruption(file + ": duplicate backing format header extension");
        }
        if (len > kMaxExtensionString) {
          return Status::Corruption(file + ": backing format name length " + Dec(len) +
                                    " is too long");
        }
        seen_backing_format = true;
        h->backing_format = BytesToString(p, len);
        break;
      case kExtFeatureTable:
        if (seen_feature_table) {
          return Status::Corruption(file + ": duplicate feature name table header extension");
        }
        if (len % kFeatureNameEntryBytes != 0) {
          return Status::Corruption(file + ": feature name table length " + Dec(len) +
                                    " is not a multiple of 48");
        }
        seen_feature_table = true;
        for (size_t i = 0; i < len; i += kFeatureNameEntryBytes) {
          const uint8_t* e = p + i;
          size_t n = 0;
          while (n < kFeatureNameBytes && e[2 + n] != 0) ++n;
          h->feature_names.push_back(FeatureName{e[0], e[1], BytesToString(e + 2, n)});
        }
        break;
      case kExtDataFile:
        if (seen_data_file) {
          return Status::Corruption(file + ": duplicate external data file header extension");
        }
        if (len > kMaxExtensionString) {
          return Status::Corruption(file + ": external data file name length " + Dec(len) +
                                    " is too long");
        }
        seen_data_file = true;
        h->data_file = BytesToString(p, len);
        break;
      default:
        if (type == kExtBitmaps) h->has_bitmaps_extension = true;
        h->unknown_extensions.push_back(HeaderExtension{type, std::vector<uint8_t>(p, p + len)});
        break;
    }
    pos = data + AlignUp8(len);
  }
  return Status::Ok();
}

// Validates the feature bits and the compression type of a decoded v3
// header.
Status CheckFeatures(const Header& h, const std::string& file) {
  const uint64_t unknown = h.incompatible_features & ~kIncompatKnown;
  if (unknown != 0) {
    std::string names;
    for (int bit = 0; bit < 64; ++bit) {
      if (!(unknown & (uint64_t{1} << bit))) continue;
      if (!names.empty()) names += ", ";
      names += h.IncompatibleFeatureName(bit);
    }
    return Status::NotSupported(file + ": unsupported incompatible features: " + names);
  }
  if (h.incompatible_features & kIncompatExternalData) {
    return Status::NotSupported(file + ": external data files are not supported" +
                                (h.data_file.empty() ? "" : " (data file '" + h.data_file + "')"));
  }
  if (h.incompatible_features & kIncompatCompressionType) {
    if (h.compression_type != kCompressionZlib && h.compression_type != kCompressionZstd) {
      return Status::NotSupported(file + ": unsupported compression_type " +
                                  Dec(h.compression_type));
    }
    if (h.compression_type == kCompressionZlib) {
      return Status::Corruption(file +
                                ": compression type feature bit is set but "
                                "compression_type is 0");
    }
  } else if (h.compression_type != kCompressionZlib) {
    return Status::Corruption(file + ": compression_type " + Dec(h.compression_type) +
                              " is set without the compression type feature bit");
  }
  if (h.extended_l2() && h.cluster_bits < 14) {
    return Status::Corruption(file +
                              ": extended L2 entries need a cluster size of at least "
                              "16384, not " +
                              Dec(h.cluster_size()));
  }
  return Status::Ok();
}

// Validates the virtual size and the tables the header points to.
Status CheckTables(const Header& h, uint64_t file_size, const std::string& file) {
  const uint64_t cs = h.cluster_size();
  if (h.size > kMaxVirtualSize) {
    return Status::NotSupported(file + ": size " + Dec(h.size) +
                                " exceeds the maximum virtual size " + Dec(kMaxVirtualSize));
  }
  // L1 table.
  const uint64_t l1_bytes = uint64_t{h.l1_size} * 8;
  if (l1_bytes > kMaxL1Bytes) {
    return Status::Corruption(file + ": L1 table too large: l1_size " + Dec(h.l1_size) + " (" +
                              Dec(l1_bytes) + " bytes, limit " + Dec(kMaxL1Bytes) + ")");
  }
  const uint64_t bytes_per_l1_entry = cs * h.l2_entries();
  const uint64_t needed = h.size / bytes_per_l1_entry + (h.size % bytes_per_l1_entry != 0);
  if (h.l1_size < needed) {
    return Status::Corruption(file + ": l1_size " + Dec(h.l1_size) + " is too small for size " +
                              Dec(h.size) + " (needs " + Dec(needed) + " entries)");
  }
  KVBLK_RETURN_IF_ERROR(
      CheckTable(file, "l1_table_offset", h.l1_table_offset, l1_bytes, cs, file_size));
  // Refcount table.
  if (h.refcount_table_clusters == 0) {
    return Status::Corruption(file + ": refcount_table_clusters is 0");
  }
  const uint64_t rt_bytes = uint64_t{h.refcount_table_clusters} * cs;
  if (rt_bytes > kMaxRefcountTableBytes) {
    return Status::Corruption(file + ": refcount table too large: refcount_table_clusters " +
                              Dec(h.refcount_table_clusters) + " (" + Dec(rt_bytes) +
                              " bytes, limit " + Dec(kMaxRefcountTableBytes) + ")");
  }
  KVBLK_RETURN_IF_ERROR(
      CheckTable(file, "refcount_table_offset", h.refcount_table_offset, rt_bytes, cs, file_size));
  // The L1 and refcount tables must not share a cluster: an update of one
  // would overwrite the other. (Both lie inside the file: no overflow.)
  if (l1_bytes > 0) {
    const uint64_t l1_end = h.l1_table_offset + (l1_bytes + cs - 1) / cs * cs;
    const uint64_t rt_end = h.refcount_table_offset + rt_bytes;
    if (h.l1_table_offset < rt_end && h.refcount_table_offset < l1_end) {
      return Status::Corruption(file + ": l1_table_offset " + Hex(h.l1_table_offset) + " (" +
                                Dec(l1_bytes) + " bytes) overlaps the refcount table at " +
                                Hex(h.refcount_table_offset) + " (" + Dec(rt_bytes) + " bytes)");
    }
  }
  // Snapshot table.
  if (h.nb_snapshots > kMaxSnapshots) {
    return Status::Corruption(file + ": nb_snapshots " + Dec(h.nb_snapshots) +
                              " exceeds the limit " + Dec(kMaxSnapshots));
  }
  if (h.nb_snapshots > 0) {
    KVBLK_RETURN_IF_ERROR(CheckTable(file, "snapshots_offset", h.snapshots_offset,
                                     uint64_t{h.nb_snapshots} * kMinSnapshotEntryBytes, cs,
                                     file_size));
  }
  return Status::Ok();
}

}  // namespace

std::string Header::IncompatibleFeatureName(int bit) const {
  for (const FeatureName& f : feature_names) {
    if (f.type == 0 && f.bit == bit) return f.name;
  }
  return "unknown feature bit " + std::to_string(bit);
}

std::vector<FeatureName> DefaultFeatureNames() {
  return {
      {0, 0, "dirty"},
      {0, 1, "corrupt"},
      {0, 2, "external data file"},
      {0, 3, "compression type"},
      {0, 4, "extended L2 entries"},
      {1, 0, "lazy refcounts"},
      {2, 0, "bitmaps"},
      {2, 1, "raw external data"},
  };
}

Result<Header> DecodeHeader(const std::vector<uint8_t>& buf, uint64_t file_size,
                            const std::string& file_name) {
  const std::string& file = file_name;
  if (buf.size() < 4 || LoadBe32(&buf[kOffMagic]) != kMagic) {
    return Status::InvalidArgument(file + ": not a qcow2 image (bad magic)");
  }
  if (buf.size() < kV2HeaderLength) {
    return Status::Corruption(file + ": truncated header (" + Dec(buf.size()) + " bytes)");
  }
  Header h;
  const uint8_t* b = buf.data();
  h.version = LoadBe32(b + kOffVersion);
  if (h.version != 2 && h.version != 3) {
    return Status::NotSupported(file + ": unsupported qcow2 version " + Dec(h.version));
  }
  h.backing_file_offset = LoadBe64(b + kOffBackingFileOffset);
  h.backing_file_size = LoadBe32(b + kOffBackingFileSize);
  h.cluster_bits = LoadBe32(b + kOffClusterBits);
  h.size = LoadBe64(b + kOffSize);
  h.crypt_method = LoadBe32(b + kOffCryptMethod);
  h.l1_size = LoadBe32(b + kOffL1Size);
  h.l1_table_offset = LoadBe64(b + kOffL1TableOffset);
  h.refcount_table_offset = LoadBe64(b + kOffRefcountTableOffset);
  h.refcount_table_clusters = LoadBe32(b + kOffRefcountTableClusters);
  h.nb_snapshots = LoadBe32(b + kOffNbSnapshots);
  h.snapshots_offset = LoadBe64(b + kOffSnapshotsOffset);

  if (h.cluster_bits < kMinClusterBits || h.cluster_bits > kMaxClusterBits) {
    return Status::Corruption(file + ": unsupported cluster size: cluster_bits " +
                              Dec(h.cluster_bits) + " (must be " + Dec(kMinClusterBits) + ".." +
                              Dec(kMaxClusterBits) + ")");
  }
  const uint64_t cs = h.cluster_size();

  if (h.version == 2) {
    h.incompatible_features = 0;
    h.compatible_features = 0;
    h.autoclear_features = 0;
    h.refcount_order = 4;
    h.header_length = kV2HeaderLength;
    h.compression_type = kCompressionZlib;
  } else {
    if (buf.size() < kV3MinHeaderLength) {
      return Status::Corruption(file + ": truncated header (" + Dec(buf.size()) + " bytes)");
    }
    h.incompatible_features = LoadBe64(b + kOffIncompatible);
    h.compatible_features = LoadBe64(b + kOffCompatible);
    h.autoclear_features = LoadBe64(b + kOffAutoclear);
    h.refcount_order = LoadBe32(b + kOffRefcountOrder);
    h.header_length = LoadBe32(b + kOffHeaderLength);
    if (h.header_length < kV3MinHeaderLength || h.header_length % 8 != 0 || h.header_length > cs) {
      return Status::Corruption(file + ": invalid header_length " + Dec(h.header_length) +
                                " (must be a multiple of 8 from 104 to the cluster size " +
                                Dec(cs) + ")");
    }
    if (buf.size() < h.header_length) {
      return Status::Corruption(file + ": truncated header (" + Dec(buf.size()) +
                                " bytes, header_length " + Dec(h.header_length) + ")");
    }
    if (h.header_length > kV3MinHeaderLength) {
      h.compression_type = b[kOffCompressionType];
    }
    if (h.header_length > kV3CompressionHeaderLength) {
      h.extra_header.assign(b + kV3CompressionHeaderLength, b + h.header_length);
    }
  }

  if (h.crypt_method != 0) {
    return Status::NotSupported(file + ": encrypted images are not supported (crypt_method " +
                                Dec(h.crypt_method) + ")");
  }
  if (h.refcount_order > kMaxRefcountOrder) {
    return Status::Corruption(file + ": refcount_order " + Dec(h.refcount_order) + " exceeds " +
                              Dec(kMaxRefcountOrder));
  }

  // Header extensions run from the end of the header to the backing file
  // name (if it lies in the first cluster) or the end of the first cluster.
  uint64_t ext_end = cs;
  if (h.backing_file_offset != 0 && h.backing_file_offset < ext_end) {
    ext_end = h.backing_file_offset;
  }
  KVBLK_RETURN_IF_ERROR(ParseExtensions(buf, h.header_length, ext_end, file, &h));

  KVBLK_RETURN_IF_ERROR(CheckFeatures(h, file));
  KVBLK_RETURN_IF_ERROR(CheckTables(h, file_size, file));

  if (h.backing_file_offset == 0) {
    h.backing_file_size = 0;
  } else {
    if (h.backing_file_size > kMaxBackingFileName) {
      return Status::Corruption(file + ": backing_file_size " + Dec(h.backing_file_size) +
                                " exceeds " + Dec(kMaxBackingFileName));
    }
    if (h.backing_file_offset > cs || h.backing_file_size > cs - h.backing_file_offset) {
      return Status::Corruption(file + ": backing file name at backing_file_offset " +
                                Hex(h.backing_file_offset) + " (" + Dec(h.backing_file_size) +
                                " bytes) is not inside the first cluster");
    }
    if (h.backing_file_offset + h.backing_file_size > buf.size()) {
      return Status::Corruption(file + ": truncated header: backing file name at " +
                                Hex(h.backing_file_offset) + " lies past the end of the file");
    }
    h.backing_file = BytesToString(b + h.backing_file_offset, h.backing_file_size);
  }
  return h;
}

Result<std::vector<uint8_t>> EncodeHeader(Header* h) {
  if (h->cluster_bits < kMinClusterBits || h->cluster_bits > kMaxClusterBits) {
    return Status::InvalidArgument("qcow2 header: invalid cluster_bits " + Dec(h->cluster_bits));
  }
  if (h->version != 2 && h->version != 3) {
    return Status::InvalidArgument("qcow2 header: invalid version " + Dec(h->version));
  }
  if (h->extra_header.size() % 8 != 0) {
    return Status::InvalidArgument("qcow2 header: additional header bytes (" +
                                   Dec(h->extra_header.size()) + ") are not a multiple of 8");
  }
  if (h->backing_file.size() > kMaxBackingFileName) {
    return Status::InvalidArgument("qcow2 header: backing file name is " +
                                   Dec(h->backing_file.size()) + " bytes, limit " +
                                   Dec(kMaxBackingFileName));
  }
  if (h->version == 2) {
    if (h->incompatible_features || h->compatible_features || h->autoclear_features ||
        h->refcount_order != 4 || h->compression_type != kCompressionZlib ||
        !h->extra_header.empty()) {
      return Status::InvalidArgument(
          "qcow2 header: feature bits, refcount_order other than 4, a compression type or "
          "additional header fields need version 3");
    }
    h->header_length = kV2HeaderLength;
  } else if (!h->extra_header.empty() || h->compression_type != kCompressionZlib ||
             h->header_length >= kV3CompressionHeaderLength) {
    h->header_length = kV3CompressionHeaderLength + static_cast<uint32_t>(h->extra_header.size());
  } else {
    h->header_length = kV3MinHeaderLength;
  }
  for (const FeatureName& f : h->feature_names) {
    if (f.name.size() > kFeatureNameBytes) {
      return Status::InvalidArgument("qcow2 header: feature name '" + f.name +
                                     "' is longer than 46 bytes");
    }
  }

  // Lay out the extensions.
  struct Ext {
    uint32_t type;
    std::vector<uint8_t> data;
  };
  std::vector<Ext> exts;
  auto string_ext = [](uint32_t type, const std::string& s) {
    return Ext{type, std::vector<uint8_t>(s.begin(), s.end())};
  };
  if (!h->backing_format.empty()) exts.push_back(string_ext(kExtBackingFormat, h->backing_format));
  if (!h->feature_names.empty()) {
    std::vector<uint8_t> table(h->feature_names.size() * kFeatureNameEntryBytes, 0);
    for (size_t i = 0; i < h->feature_names.size(); ++i) {
      const FeatureName& f = h->feature_names[i];
      uint8_t* e = &table[i * kFeatureNameEntryBytes];
      e[0] = f.type;
      e[1] = f.bit;
      std::copy(f.name.begin(), f.name.end(), e + 2);
    }
    exts.push_back(Ext{kExtFeatureTable, std::move(table)});
  }
  if (!h->data_file.empty()) exts.push_back(string_ext(kExtDataFile, h->data_file));
  for (const HeaderExtension& e : h->unknown_extensions) {
    if (e.type == kExtEnd) {
      return Status::InvalidArgument("qcow2 header: an unknown extension has type 0");
    }
    exts.push_back(Ext{e.type, e.data});
  }

  uint64_t total = h->header_length;
  for (const Ext& e : exts) total += kExtHeaderBytes + AlignUp8(e.data.size());
  total += kExtHeaderBytes;  // end marker
  const uint64_t backing_offset = h->backing_file.empty() ? 0 : total;
  total += h->backing_file.size();
  if (total > h->cluster_size()) {
    return Status::NotSupported("qcow2 header: header does not fit in the first cluster (" +
                                Dec(total) + " bytes, cluster size " + Dec(h->cluster_size()) +
                                ")");
  }
  h->backing_file_offset = backing_offset;
  h->backing_file_size = static_cast<uint32_t>(h->backing_file.size());

  std::vector<uint8_t> out(AlignUp8(total), 0);
  uint8_t* b = out.data();
  StoreBe32(b + kOffMagic, kMagic);
  StoreBe32(b + kOffVersion, h->version);
  StoreBe64(b + kOffBackingFileOffset, h->backing_file_offset);
  StoreBe32(b + kOffBackingFileSize, h->backing_file_size);
  StoreBe32(b + kOffClusterBits, h->cluster_bits);
  StoreBe64(b + kOffSize, h->size);
  StoreBe32(b + kOffCryptMethod, h->crypt_method);
  StoreBe32(b + kOffL1Size, h->l1_size);
  StoreBe64(b + kOffL1TableOffset, h->l1_table_offset);
  StoreBe64(b + kOffRefcountTableOffset, h->refcount_table_offset);
  StoreBe32(b + kOffRefcountTableClusters, h->refcount_table_clusters);
  StoreBe32(b + kOffNbSnapshots, h->nb_snapshots);
  StoreBe64(b + kOffSnapshotsOffset, h->snapshots_offset);
  if (h->version == 3) {
    StoreBe64(b + kOffIncompatible, h->incompatible_features);
    StoreBe64(b + kOffCompatible, h->compatible_features);
    StoreBe64(b + kOffAutoclear, h->autoclear_features);
    StoreBe32(b + kOffRefcountOrder, h->refcount_order);
    StoreBe32(b + kOffHeaderLength, h->header_length);
    if (h->header_length >= kV3CompressionHeaderLength) {
      b[kOffCompressionType] = h->compression_type;
      std::copy(h->extra_header.begin(), h->extra_header.end(), b + kV3CompressionHeaderLength);
    }
  }
  size_t pos = h->header_length;
  for (const Ext& e : exts) {
    StoreBe32(b + pos, e.type);
    StoreBe32(b + pos + 4, static_cast<uint32_t>(e.data.size()));
    std::copy(e.data.begin(), e.data.end(), b + pos + kExtHeaderBytes);
    pos += kExtHeaderBytes + AlignUp8(e.data.size());
  }
  pos += kExtHeaderBytes;  // end marker: type 0, length 0 (already zero)
  std::copy(h->backing_file.begin(), h->backing_file.end(), b + pos);
  return out;
}

}  // namespace kvblk::qcow2
