#include "disk/compress.h"

#include <zlib.h>
#include <zstd.h>

#include "disk/qcow2_format.h"

namespace kvblk::qcow2 {
namespace {

Status InflateRaw(const uint8_t* in, size_t in_len, uint8_t* out, size_t out_len) {
  z_stream s{};
  if (inflateInit2(&s, -15) != Z_OK) return Status(StatusCode::kIoError, "inflateInit2 failed");
  s.next_in = const_cast<uint8_t*>(in);
  s.avail_in = static_cast<uInt>(in_len);
  s.next_out = out;
  s.avail_out = static_cast<uInt>(out_len);
  int r = inflate(&s, Z_FINISH);
  size_t produced = out_len - s.avail_out;
  inflateEnd(&s);
  // Z_BUF_ERROR with a full output buffer is fine: the input was padded.
  if ((r != Z_STREAM_END && r != Z_BUF_ERROR && r != Z_OK) || produced != out_len) {
    return Status::Corruption("invalid deflate data in compressed cluster");
  }
  return Status::Ok();
}

Status ZstdDecompress(const uint8_t* in, size_t in_len, uint8_t* out, size_t out_len) {
  ZSTD_DCtx* dctx = ZSTD_createDCtx();
  if (dctx == nullptr) return Status(StatusCode::kIoError, "ZSTD_createDCtx failed");
  ZSTD_inBuffer ib{in, in_len, 0};
  ZSTD_outBuffer ob{out, out_len, 0};
  Status st;
  while (ob.pos < ob.size) {
    size_t in_before = ib.pos;
    size_t out_before = ob.pos;
    size_t r = ZSTD_decompressStream(dctx, &ob, &ib);
    if (ZSTD_isError(r)) {
      st = Status::Corruption(std::string("invalid zstd data in compressed cluster: ") +
                              ZSTD_getErrorName(r));
      break;
    }
    if (ib.pos == in_before && ob.pos == out_before) break;  // no progress: input ran out
  }
  ZSTD_freeDCtx(dctx);
  if (st.ok() && ob.pos != out_len) {
    st = Status::Corruption("zstd data in compressed cluster is too short");
  }
  return st;
}

}  // namespace

Status Decompress(uint8_t type, const uint8_t* in, size_t in_len, uint8_t* out, size_t out_len) {
  if (type == kCompressionZlib) return InflateRaw(in, in_len, out, out_len);
  if (type == kCompressionZstd) return ZstdDecompress(in, in_len, out, out_len);
  return Status::NotSupported("unknown compression type " + std::to_string(type));
}

Result<std::vector<uint8_t>> Compress(uint8_t type, const uint8_t* in, size_t in_len,
                                      size_t max_out) {
  std::vector<uint8_t> out;
  if (type == kCompressionZlib) {
    z_stream s{};
    // Raw deflate with a 4 KiB window, as QEMU writes it.
    if (deflateInit2(&s, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY) != Z_OK) {
      return Status(StatusCode::kIoError, "deflateInit2 failed");
    }
    out.resize(max_out);
    s.next_in = const_cast<uint8_t*>(in);
    s.avail_in = static_cast<uInt>(in_len);
    s.next_out = out.data();
    s.avail_out = static_cast<uInt>(out.size());
    int r = deflate(&s, Z_FINISH);
    size_t produced = out.size() - s.avail_out;
    deflateEnd(&s);
    if (r != Z_STREAM_END) return std::vector<uint8_t>();  // did not fit
    out.resize(produced);
    return out;
  }
  if (type == kCompressionZstd) {
    out.resize(max_out);
    size_t r = ZSTD_compress(out.data(), out.size(), in, in_len, 3);
    if (ZSTD_isError(r)) return std::vector<uint8_t>();  // did not fit (or failed)
    out.resize(r);
    return out;
  }
  return Status::NotSupported("unknown compression type " + std::to_string(type));
}

}  // namespace kvblk::qcow2
