// Implements CreateQcow2 (disk/qcow2_create.h) and CreateImage / ParseSize
// (include/kvblk/image_create.h).
//
// A new qcow2 image has the layout qemu-img gives it: the header in cluster
// 0, then the refcount table, the refcount blocks and the (zeroed) L1 table.
// For the default options that is cluster 1 = refcount table, cluster 2 =
// refcount block, cluster 3.. = L1. Creation is an offline operation and uses
// plain POSIX I/O.
#include "disk/qcow2_create.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "disk/qcow2_format.h"
#include "disk/qcow2_header.h"
#include "kvblk/block_device.h"
#include "kvblk/image_create.h"

namespace kvblk {
namespace {

constexpr uint64_t kSectorSize = 512;
constexpr uint32_t kMinClusterSize = 1u << qcow2::kMinClusterBits;
constexpr uint32_t kMaxClusterSize = 1u << qcow2::kMaxClusterBits;
constexpr uint32_t kMinExtendedL2ClusterSize = 16384;
// Largest size a raw file may have (off_t).
constexpr uint64_t kMaxRawSize = static_cast<uint64_t>(INT64_MAX) & ~(kSectorSize - 1);

bool IsPowerOfTwo(uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

uint64_t DivRoundUp(uint64_t a, uint64_t b) { return a / b + (a % b != 0); }

uint32_t Log2(uint64_t v) {
  uint32_t n = 0;
  while (v > 1) {
    v >>= 1;
    ++n;
  }
  return n;
}

// Rounds `size` up to a multiple of 512 (as qemu-img does), or fails if that
// would exceed `max`.
Result<uint64_t> RoundSize(uint64_t size, uint64_t max) {
  if (size > max) {
    return Status::InvalidArgument("image size " + std::to_string(size) +
                                   " exceeds the maximum of " + std::to_string(max));
  }
  return (size + kSectorSize - 1) & ~(kSectorSize - 1);
}

// Resolves a backing file name as stored in an image at `image_path`:
// relative names are relative to the image's directory.
std::string ResolveBacking(const std::string& image_path, const std::string& backing) {
  std::filesystem::path b(backing);
  if (b.is_absolute()) return backing;
  std::filesystem::path dir = std::filesystem::path(image_path).parent_path();
  return dir.empty() ? backing : (dir / b).string();
}

// Checks the qcow2-specific options that do not depend on any file.
Status ValidateQcow2Options(const CreateOptions& o) {
  if (!IsPowerOfTwo(o.cluster_size) || o.cluster_size < kMinClusterSize ||
      o.cluster_size > kMaxClusterSize) {
    return Status::InvalidArgument("cluster size " + std::to_string(o.cluster_size) +
                                   " must be a power of two between 512 and 2M");
  }
  if (o.refcount_bits < 1 || o.refcount_bits > 64 || !IsPowerOfTwo(o.refcount_bits)) {
    return Status::InvalidArgument("refcount_bits " + std::to_string(o.refcount_bits) +
                                   " must be a power of two between 1 and 64");
  }
  if (o.compression_type != "zlib" && o.compression_type != "zstd") {
    return Status::InvalidArgument("compression_type '" + o.compression_type +
                                   "' must be 'zlib' or 'zstd'");
  }
  if (!o.compat_v3) {
    if (o.refcount_bits != 16) {
      return Status::InvalidArgument(
          "compat 0.10 (qcow2 v2) images only support refcount_bits 16, not " +
          std::to_string(o.refcount_bits));
    }
    if (o.lazy_refcounts) {
      return Status::InvalidArgument("lazy_refcounts need compat 1.1 (qcow2 v3)");
    }
    if (o.extended_l2) {
      return Status::InvalidArgument("extended_l2 needs compat 1.1 (qcow2 v3)");
    }
    if (o.compression_type != "zlib") {
      return Status::InvalidArgument("compression_type zstd needs compat 1.1 (qcow2 v3)");
    }
  }
  if (o.extended_l2 && o.cluster_size < kMinExtendedL2ClusterSize) {
    return Status::InvalidArgument("extended_l2 needs a cluster size of at least 16k, not " +
                                   std::to_string(o.cluster_size));
  }
  if (!o.backing_format.empty() && o.backing_file.empty()) {
    return Status::InvalidArgument("backing_format '" + o.backing_format +
                                   "' given without a backing file");
  }
  if (!o.backing_file.empty() && o.preallocation != Preallocation::kOff && !o.extended_l2) {
    return Status::InvalidArgument(
        "a backing file and preallocation can only be combined with extended_l2");
  }
  if (o.backing_file.size() > qcow2::kMaxBackingFileName) {
    return Status::InvalidArgument("backing file name is longer than " +
                                   std::to_string(qcow2::kMaxBackingFileName) + " bytes");
  }
  return Status::Ok();
}

// The clusters of a new image, in file order after the header cluster.
struct Layout {
  uint64_t reftable_clusters = 1;
  uint64_t refblocks = 1;
  uint64_t l1_clusters = 0;
  uint64_t total_clusters = 0;  // header + all of the above
  uint64_t reftable_offset = 0;
  uint64_t refblocks_offset = 0;
  uint64_t l1_offset = 0;
};

// Sizes the refcount table and blocks so that they cover every cluster of
// the image, themselves included. An empty L1 table takes no cluster.
Result<Layout> ComputeLayout(uint64_t cluster_size, int refcount_bits, uint64_t l1_size) {
  Layout l;
  l.l1_clusters = DivRoundUp(l1_size * 8, cluster_size);
  const uint64_t per_block = cluster_size * 8 / static_cast<uint64_t>(refcount_bits);
  for (;;) {
    l.total_clusters = 1 + l.reftable_clusters + l.refblocks + l.l1_clusters;
    const uint64_t blocks = DivRoundUp(l.total_clusters, per_block);
    const uint64_t table = DivRoundUp(blocks * 8, cluster_size);
    if (blocks == l.refblocks && table == l.reftable_clusters) break;
    // Both only grow, so this terminates.
    l.refblocks = std::max(l.refblocks, blocks);
    l.reftable_clusters = std::max(l.reftable_clusters, table);
  }
  if (l.reftable_clusters * cluster_size > qcow2::kMaxRefcountTableBytes) {
    return Status::InvalidArgument("image too large for cluster size " +
                                   std::to_string(cluster_size) +
                                   ": the refcount table would exceed its limit");
  }
  l.reftable_offset = cluster_size;
  l.refblocks_offset = l.reftable_offset + l.reftable_clusters * cluster_size;
  l.l1_offset = l.refblocks_offset + l.refblocks * cluster_size;
  return l;
}

// Stores refcount 1 for entry `i` of a refcount block of `bits`-wide
// entries (qcow2.rst "Host cluster management": big-endian for widths >= 8,
// packed from the least significant bit otherwise).
void SetRefcountOne(uint8_t* block, uint64_t i, int bits) {
  const uint64_t bit_pos = i * static_cast<uint64_t>(bits);
  if (bits >= 8) {
    block[bit_pos / 8 + bits / 8 - 1] = 1;
  } else {
    block[bit_pos / 8] |= static_cast<uint8_t>(1u << (bit_pos % 8));
  }
}

Status WriteAll(int fd, const uint8_t* data, size_t len, uint64_t offset, const std::string& path) {
  while (len > 0) {
    ssize_t n = ::pwrite(fd, data, len, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, path + ": write at offset " + std::to_string(offset));
    }
    data += n;
    len -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return Status::Ok();
}

// An open, newly created file that is removed again unless Commit() is
// called.
class NewFile {
 public:
  explicit NewFile(std::string path) : path_(std::move(path)) {}
  NewFile(const NewFile&) = delete;
  NewFile& operator=(const NewFile&) = delete;
  ~NewFile() {
    if (fd_ < 0) return;
    ::close(fd_);
    if (!committed_) ::unlink(path_.c_str());
  }

  Status Open() {
    fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd_ < 0) return Status::FromErrno(errno, path_ + ": create");
    return Status::Ok();
  }
  int fd() const { return fd_; }
  const std::string& path() const { return path_; }

  Status SetLength(uint64_t len) {
    if (::ftruncate(fd_, static_cast<off_t>(len)) != 0) {
      return Status::FromErrno(errno, path_ + ": set length to " + std::to_string(len));
    }
    return Status::Ok();
  }

  // Syncs and closes the file; it is kept from now on.
  Status Commit() {
    if (::fsync(fd_) != 0) return Status::FromErrno(errno, path_ + ": fsync");
    const int fd = fd_;
    fd_ = -1;
    committed_ = true;
    if (::close(fd) != 0) return Status::FromErrno(errno, path_ + ": close");
    return Status::Ok();
  }

 private:
  std::string path_;
  int fd_ = -1;
  bool committed_ = false;
};

Status CreateRaw(const std::string& path, const CreateOptions& opts) {
  if (!opts.backing_file.empty() || !opts.backing_format.empty()) {
    return Status::InvalidArgument("raw images cannot have a backing file");
  }
  KVBLK_ASSIGN_OR_RETURN(const uint64_t size, RoundSize(opts.size, kMaxRawSize));
  NewFile file(path);
  KVBLK_RETURN_IF_ERROR(file.Open());
  switch (opts.preallocation) {
    case Preallocation::kOff:
    case Preallocation::kMetadata:
      KVBLK_RETURN_IF_ERROR(file.SetLength(size));
      break;
    case Preallocation::kFalloc:
      if (size > 0) {
        const int err = ::posix_fallocate(file.fd(), 0, static_cast<off_t>(size));
        if (err != 0) return Status::FromErrno(err, path + ": preallocate " + std::to_string(size));
      }
      break;
    case Preallocation::kFull: {
      constexpr uint64_t kChunk = 1 << 20;
      const std::vector<uint8_t> zeros(std::min(size, kChunk), 0);
      for (uint64_t off = 0; off < size; off += kChunk) {
        const size_t n = static_cast<size_t>(std::min(kChunk, size - off));
        KVBLK_RETURN_IF_ERROR(WriteAll(file.fd(), zeros.data(), n, off, path));
      }
      break;
    }
  }
  return file.Commit();
}

}  // namespace

Status CreateQcow2(const std::string& path, const CreateOptions& opts) {
  KVBLK_RETURN_IF_ERROR(ValidateQcow2Options(opts));

  // The backing file: its format is probed and its size taken when not
  // given, as qemu-img does.
  uint64_t requested_size = opts.size;
  std::string backing_format = opts.backing_format;
  if (!opts.backing_file.empty()) {
    const std::string backing_path = ResolveBacking(path, opts.backing_file);
    struct stat st;
    if (::stat(backing_path.c_str(), &st) != 0) {
      return Status::FromErrno(errno, "backing file " + backing_path);
    }
    if (backing_format.empty()) {
      KVBLK_ASSIGN_OR_RETURN(backing_format, ProbeFormat(backing_path));
    }
    if (requested_size == 0) {
      OpenOptions oo;
      oo.format = backing_format;
      oo.read_only = true;
      KVBLK_ASSIGN_OR_RETURN(std::unique_ptr<BlockDevice> dev, OpenImage(backing_path, oo));
      requested_size = dev->size();
      KVBLK_RETURN_IF_ERROR(CloseImage(std::move(dev)));
    }
  }
  KVBLK_ASSIGN_OR_RETURN(const uint64_t size,
                         RoundSize(requested_size, qcow2::kMaxVirtualSize & ~(kSectorSize - 1)));

  qcow2::Header h;
  h.version = opts.compat_v3 ? 3 : 2;
  h.cluster_bits = Log2(opts.cluster_size);
  h.size = size;
  h.refcount_order = Log2(static_cast<uint64_t>(opts.refcount_bits));
  if (opts.compat_v3) {
    if (opts.lazy_refcounts) h.compatible_features |= qcow2::kCompatLazyRefcounts;
    if (opts.extended_l2) h.incompatible_features |= qcow2::kIncompatExtendedL2;
    if (opts.compression_type == "zstd") {
      h.incompatible_features |= qcow2::kIncompatCompressionType;
      h.compression_type = qcow2::kCompressionZstd;
    }
    h.feature_names = qcow2::DefaultFeatureNames();
  }
  h.backing_file = opts.backing_file;
  h.backing_format = backing_format;

  const uint64_t cluster_size = opts.cluster_size;
  const uint64_t l1_entries = DivRoundUp(size, cluster_size * h.l2_entries());
  if (l1_entries * 8 > qcow2::kMaxL1Bytes) {
    return Status::InvalidArgument("image size " + std::to_string(size) +
                                   " is too large for cluster size " +
                                   std::to_string(cluster_size) + " (L1 table too big)");
  }
  h.l1_size = static_cast<uint32_t>(l1_entries);
  KVBLK_ASSIGN_OR_RETURN(const Layout layout,
                         ComputeLayout(cluster_size, opts.refcount_bits, l1_entries));
  // An empty L1 table has no cluster and offset 0, as with qemu-img (a
  // reserved but unreferenced cluster would be a leak to `qemu-img check`).
  h.l1_table_offset = l1_entries == 0 ? 0 : layout.l1_offset;
  h.refcount_table_offset = layout.reftable_offset;
  h.refcount_table_clusters = static_cast<uint32_t>(layout.reftable_clusters);
  auto encoded = qcow2::EncodeHeader(&h);
  if (!encoded.ok() && encoded.status().code() == StatusCode::kNotSupported &&
      !h.feature_names.empty()) {
    // The feature name table is optional; like qemu-img, leave it out when
    // it would not fit in a small first cluster (e.g. 512 bytes with a
    // backing file name).
    h.feature_names.clear();
    encoded = qcow2::EncodeHeader(&h);
  }
  if (!encoded.ok()) {
    return Status::InvalidArgument(path + ": " + encoded.status().message());
  }

  // Refcount table: entry i points at refcount block i.
  std::vector<uint8_t> reftable(layout.reftable_clusters * cluster_size, 0);
  for (uint64_t i = 0; i < layout.refblocks; ++i) {
    qcow2::StoreBe64(&reftable[i * 8], layout.refblocks_offset + i * cluster_size);
  }
  // Refcount blocks: every cluster of the new image has refcount 1.
  std::vector<uint8_t> refblocks(layout.refblocks * cluster_size, 0);
  for (uint64_t c = 0; c < layout.total_clusters; ++c) {
    SetRefcountOne(refblocks.data(), c, opts.refcount_bits);
  }

  NewFile file(path);
  KVBLK_RETURN_IF_ERROR(file.Open());
  KVBLK_RETURN_IF_ERROR(file.SetLength(layout.total_clusters * cluster_size));
  KVBLK_RETURN_IF_ERROR(WriteAll(file.fd(), encoded->data(), encoded->size(), 0, path));
  KVBLK_RETURN_IF_ERROR(
      WriteAll(file.fd(), reftable.data(), reftable.size(), layout.reftable_offset, path));
  KVBLK_RETURN_IF_ERROR(
      WriteAll(file.fd(), refblocks.data(), refblocks.size(), layout.refblocks_offset, path));
  return file.Commit();
}

Status CreateImage(const std::string& path, const CreateOptions& opts) {
  if (opts.format == "raw") return CreateRaw(path, opts);
  if (opts.format != "qcow2") {
    return Status::InvalidArgument("unknown image format '" + opts.format +
                                   "' (expected 'qcow2' or 'raw')");
  }
  KVBLK_RETURN_IF_ERROR(CreateQcow2(path, opts));
  if (opts.preallocation == Preallocation::kOff) return Status::Ok();
  return Qcow2Preallocate(path, opts.preallocation);
}

namespace {

// floor(0.<digits> * 2^shift), exactly: the first `shift` bits of the binary
// expansion of the decimal fraction.
uint64_t FractionBits(std::string digits, uint32_t shift) {
  uint64_t result = 0;
  for (uint32_t b = 0; b < shift; ++b) {
    int carry = 0;
    for (size_t i = digits.size(); i-- > 0;) {
      const int d = (digits[i] - '0') * 2 + carry;
      digits[i] = static_cast<char>('0' + d % 10);
      carry = d / 10;
    }
    result = (result << 1) | static_cast<uint64_t>(carry);
  }
  return result;
}

bool IsDigit(char c) { return c >= '0' && c <= '9'; }

}  // namespace

Result<uint64_t> ParseSize(const std::string& text) {
  const Status invalid = Status::InvalidArgument("invalid size '" + text + "'");
  size_t i = 0;
  uint64_t whole = 0;
  const size_t whole_start = i;
  for (; i < text.size() && IsDigit(text[i]); ++i) {
    if (__builtin_mul_overflow(whole, 10u, &whole) ||
        __builtin_add_overflow(whole, static_cast<uint64_t>(text[i] - '0'), &whole)) {
      return invalid;
    }
  }
  if (i == whole_start) return invalid;
  std::string fraction;
  if (i < text.size() && text[i] == '.') {
    ++i;
    const size_t frac_start = i;
    while (i < text.size() && IsDigit(text[i])) ++i;
    if (i == frac_start) return invalid;
    fraction = text.substr(frac_start, i - frac_start);
  }
  uint32_t shift = 0;
  bool has_unit = false;
  if (i < text.size()) {
    switch (text[i]) {
      case 'b':
      case 'B':
        shift = 0;
        break;
      case 'k':
      case 'K':
        shift = 10;
        break;
      case 'm':
      case 'M':
        shift = 20;
        break;
      case 'g':
      case 'G':
        shift = 30;
        break;
      case 't':
      case 'T':
        shift = 40;
        break;
      case 'p':
      case 'P':
        shift = 50;
        break;
      case 'e':
      case 'E':
        shift = 60;
        break;
      default:
        return invalid;
    }
    has_unit = shift > 0;
    ++i;
  }
  if (i != text.size()) return invalid;
  // A fraction of a byte is meaningless (qemu-img rejects it too).
  if (!fraction.empty() && !has_unit) return invalid;
  if (shift > 0 && whole > (UINT64_MAX >> shift)) return invalid;
  uint64_t value = whole << shift;
  if (__builtin_add_overflow(value, FractionBits(fraction, shift), &value)) return invalid;
  return value;
}

}  // namespace kvblk
