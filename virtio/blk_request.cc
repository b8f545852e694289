#include "virtio/blk_request.h"

#include <algorithm>
#include <cstring>

#include "kvblk/virtio_blk.h"
#include "virtio/byte_order.h"

namespace kvblk {
namespace {

constexpr uint32_t kHeaderSize = 16;
constexpr uint32_t kRangeSize = 16;

// A byte range [begin, end) of the chain, cut back into per-buffer pieces.
struct Piece {
  uint8_t* data;
  uint32_t len;
  bool writable;
};

// Returns the pieces covering chain bytes [begin, end) of `segs` (only
// non-empty segments).
std::vector<Piece> Slice(const std::vector<DescriptorSegment>& segs, uint64_t begin, uint64_t end) {
  std::vector<Piece> out;
  uint64_t pos = 0;
  for (const DescriptorSegment& s : segs) {
    uint64_t s_begin = pos;
    uint64_t s_end = pos + s.len;
    pos = s_end;
    if (s_end <= begin) continue;
    if (s_begin >= end) break;
    uint64_t lo = std::max(s_begin, begin);
    uint64_t hi = std::min(s_end, end);
    out.push_back({s.data + (lo - s_begin), static_cast<uint32_t>(hi - lo), s.writable});
  }
  return out;
}

// Copies the bytes of `pieces` (at most `len`) into `dst`.
void Gather(const std::vector<Piece>& pieces, uint8_t* dst, size_t len) {
  for (const Piece& p : pieces) {
    size_t k = std::min<size_t>(p.len, len);
    std::memcpy(dst, p.data, k);
    dst += k;
    len -= k;
    if (len == 0) return;
  }
}

// Whether sectors [sector, sector + count) lie within the capacity, without
// overflowing.
bool SectorRangeOk(uint64_t sector, uint64_t count, uint64_t capacity) {
  return sector <= capacity && count <= capacity - sector;
}

BlkRequestType TypeOf(uint32_t raw) {
  switch (raw) {
    case vblk::kTypeIn:
      return BlkRequestType::kIn;
    case vblk::kTypeOut:
      return BlkRequestType::kOut;
    case vblk::kTypeFlush:
      return BlkRequestType::kFlush;
    case vblk::kTypeGetId:
      return BlkRequestType::kGetId;
    case vblk::kTypeDiscard:
      return BlkRequestType::kDiscard;
    case vblk::kTypeWriteZeroes:
      return BlkRequestType::kWriteZeroes;
    default:
      return BlkRequestType::kUnsupported;  // GET_LIFETIME, SECURE_ERASE, zoned, ...
  }
}

void Reject(BlkRequest* req, VirtioError e) {
  req->error = e;
  req->error_status = StatusForError(e);
}

// IN / OUT: buffer direction, length, count and sector range.
void CheckReadWrite(BlkRequest* req, const std::vector<Piece>& data, const BlkLimits& limits) {
  const bool in = req->type == BlkRequestType::kIn;
  if (!in && limits.read_only) return Reject(req, VirtioError::kWriteToReadOnlyDevice);
  for (const Piece& p : data) {
    if (in && !p.writable) return Reject(req, VirtioError::kDataNotWritable);
    if (!in && p.writable) return Reject(req, VirtioError::kDataNotReadable);
  }
  if (req->data_len % vblk::kSectorSize != 0) {
    return Reject(req, VirtioError::kDataLengthNotSectorMultiple);
  }
  if (data.size() > limits.seg_max) return Reject(req, VirtioError::kTooManyDataSegments);
  if (!SectorRangeOk(req->sector, req->data_len / vblk::kSectorSize, limits.capacity_sectors)) {
    return Reject(req, VirtioError::kSectorPastEnd);
  }
}

// DISCARD / WRITE_ZEROES: the segment array (5.2.6, device requirements).
void CheckRanges(BlkRequest* req, const std::vector<Piece>& data, const BlkLimits& limits) {
  const bool discard = req->type == BlkRequestType::kDiscard;
  if (!(discard ? limits.discard : limits.write_zeroes)) {
    return Reject(req, VirtioError::kFeatureNotNegotiated);
  }
  if (limits.read_only) return Reject(req, VirtioError::kWriteToReadOnlyDevice);
  for (const Piece& p : data) {
    if (p.writable) return Reject(req, VirtioError::kDataNotReadable);
  }
  if (req->data_len == 0 || req->data_len % kRangeSize != 0) {
    return Reject(req, VirtioError::kBadSegmentList);
  }
  const uint64_t count = req->data_len / kRangeSize;
  const uint32_t max_seg = discard ? limits.max_discard_seg : limits.max_write_zeroes_seg;
  const uint32_t max_sectors =
      discard ? limits.max_discard_sectors : limits.max_write_zeroes_sectors;
  if (count > max_seg) return Reject(req, VirtioError::kTooManySegments);
  std::vector<uint8_t> raw(req->data_len);
  Gather(data, raw.data(), raw.size());
  req->ranges.reserve(count);
  for (uint64_t i = 0; i < count; ++i) {
    const uint8_t* r = raw.data() + i * kRangeSize;
    BlkRange range{LoadLe64(r), LoadLe32(r + 8), LoadLe32(r + 12)};
    if (range.flags & ~vblk::kSegmentFlagUnmap) {
      return Reject(req, VirtioError::kUnknownSegmentFlags);
    }
    if (discard && (range.flags & vblk::kSegmentFlagUnmap)) {
      return Reject(req, VirtioError::kUnmapOnDiscard);
    }
    if (range.num_sectors > max_sectors) return Reject(req, VirtioError::kSegmentTooLarge);
    if (!SectorRangeOk(range.sector, range.num_sectors, limits.capacity_sectors)) {
      return Reject(req, VirtioError::kSectorPastEnd);
    }
    req->ranges.push_back(range);
  }
}

}  // namespace

uint8_t StatusForError(VirtioError e) {
  switch (e) {
    case VirtioError::kUnsupportedRequestType:
    case VirtioError::kFeatureNotNegotiated:
    case VirtioError::kUnknownSegmentFlags:
    case VirtioError::kUnmapOnDiscard:
      return vblk::kStatusUnsupp;
    default:
      return vblk::kStatusIoErr;
  }
}

BlkRequest ParseBlkRequest(const DescriptorChain& chain, const BlkLimits& limits) {
  BlkRequest req;
  req.head = chain.head;

  // Zero-length buffers carry nothing; framing is about bytes.
  std::vector<DescriptorSegment> segs;
  segs.reserve(chain.segments.size());
  uint64_t total = 0;
  for (const DescriptorSegment& s : chain.segments) {
    if (s.len == 0) continue;
    segs.push_back(s);
    total += s.len;
  }

  // The status byte: the last byte of the last writable buffer.
  int last_writable = -1;
  uint64_t writable_bytes = 0;
  uint64_t status_pos = 0;  // chain offset of the status byte
  {
    uint64_t pos = 0;
    for (size_t i = 0; i < segs.size(); ++i) {
      pos += segs[i].len;
      if (segs[i].writable) {
        last_writable = static_cast<int>(i);
        writable_bytes += segs[i].len;
        status_pos = pos - 1;
      }
    }
  }

  if (chain.error) {
    // A broken walk: answer IOERR only if the chain's real last buffer is a
    // writable one we could translate.
    req.error = chain.error;
    req.error_status = StatusForError(*chain.error);
    if (chain.complete && !segs.empty() && last_writable == static_cast<int>(segs.size()) - 1 &&
        segs.back().data != nullptr) {
      req.status = segs.back().data + segs.back().len - 1;
      req.used_len = static_cast<uint32_t>(writable_bytes);
    }
    return req;
  }
  if (last_writable < 0) {
    // Nowhere to put a status: the request can only be handed back.
    req.error =
        total <= kHeaderSize ? VirtioError::kStatusMissing : VirtioError::kStatusNotWritable;
    req.error_status = vblk::kStatusIoErr;
    return req;
  }
  const DescriptorSegment& sw = segs[last_writable];
  req.status = sw.data + sw.len - 1;
  req.used_len = static_cast<uint32_t>(writable_bytes);
  if (last_writable != static_cast<int>(segs.size()) - 1) {
    // Device-readable buffers after the status (the driver must put every
    // writable buffer after the readable ones).
    Reject(&req, VirtioError::kStatusMisplaced);
    return req;
  }

  // The header: the first 16 bytes, device-readable.
  if (status_pos < kHeaderSize) {
    Reject(&req, VirtioError::kDescriptorChainTooShort);
    return req;
  }
  std::vector<Piece> header = Slice(segs, 0, kHeaderSize);
  for (const Piece& p : header) {
    if (p.writable) {
      Reject(&req, VirtioError::kHeaderNotReadable);
      return req;
    }
  }
  uint8_t hdr[kHeaderSize];
  Gather(header, hdr, kHeaderSize);
  req.raw_type = LoadLe32(hdr);
  req.sector = LoadLe64(hdr + 8);
  req.type = TypeOf(req.raw_type);

  std::vector<Piece> data = Slice(segs, kHeaderSize, status_pos);
  req.data_len = status_pos - kHeaderSize;
  req.data.reserve(data.size());
  for (const Piece& p : data) req.data.push_back({p.data, p.len});

  switch (req.type) {
    case BlkRequestType::kIn:
    case BlkRequestType::kOut:
      CheckReadWrite(&req, data, limits);
      break;
    case BlkRequestType::kFlush:
      break;  // sector and data are ignored (the driver should send neither)
    case BlkRequestType::kGetId:
      for (const Piece& p : data) {
        if (!p.writable) {
          Reject(&req, VirtioError::kDataNotWritable);
          break;
        }
      }
      break;
    case BlkRequestType::kDiscard:
    case BlkRequestType::kWriteZeroes:
      CheckRanges(&req, data, limits);
      break;
    case BlkRequestType::kUnsupported:
      Reject(&req, VirtioError::kUnsupportedRequestType);
      break;
  }
  return req;
}

}  // namespace kvblk
