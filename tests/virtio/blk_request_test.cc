// ParseBlkRequest on hand-built chains: framing in any layout, and every
// rule a guest can break, each with its exact error and status byte.
#include "virtio/blk_request.h"

#include <gtest/gtest.h>

#include <array>
#include <cstring>
#include <memory>

#include "kvblk/virtio_blk.h"

namespace kvblk {
namespace {

// Host buffers standing in for guest memory, and a chain over them.
class ChainBuilder {
 public:
  // Adds a buffer of `len` bytes (zeroed) and returns it.
  uint8_t* Add(uint32_t len, bool writable) {
    bufs_.push_back(std::make_unique<uint8_t[]>(len ? len : 1));
    std::memset(bufs_.back().get(), 0, len ? len : 1);
    chain_.segments.push_back({len ? bufs_.back().get() : nullptr, len, writable});
    return bufs_.back().get();
  }
  // A 16-byte readable header.
  uint8_t* Header(uint32_t type, uint64_t sector) {
    uint8_t* h = Add(16, false);
    std::memcpy(h, &type, 4);
    std::memcpy(h + 8, &sector, 8);
    return h;
  }
  DescriptorChain& chain() { return chain_; }

 private:
  std::vector<std::unique_ptr<uint8_t[]>> bufs_;
  DescriptorChain chain_;
};

BlkLimits Limits() {
  BlkLimits l;
  l.capacity_sectors = 2048;  // 1 MiB
  l.discard = true;
  l.write_zeroes = true;
  l.seg_max = 8;
  l.max_discard_sectors = 256;
  l.max_discard_seg = 2;
  l.max_write_zeroes_sectors = 256;
  l.max_write_zeroes_seg = 2;
  return l;
}

void PutSegment(uint8_t* p, uint64_t sector, uint32_t n, uint32_t flags) {
  std::memcpy(p, &sector, 8);
  std::memcpy(p + 8, &n, 4);
  std::memcpy(p + 12, &flags, 4);
}

// ---- Framing ----------------------------------------------------------------------

TEST(BlkRequest, ParsesReadWithSeparateHeaderDataAndStatus) {
  ChainBuilder b;
  b.Header(vblk::kTypeIn, 8);
  uint8_t* data = b.Add(1024, true);
  uint8_t* status = b.Add(1, true);
  b.chain().head = 5;
  BlkRequest r = ParseBlkRequest(b.chain(), Limits());
  EXPECT_FALSE(r.error.has_value());
  EXPECT_EQ(r.head, 5);
  EXPECT_EQ(r.type, BlkRequestType::kIn);
  EXPECT_EQ(r.sector, 8u);
  ASSERT_EQ(r.data.size(), 1u);
  EXPECT_EQ(r.data[0].iov_base, data);
  EXPECT_EQ(r.data[0].iov_len, 1024u);
  EXPECT_EQ(r.data_len, 1024u);
  EXPECT_EQ(r.status, status);
  EXPECT_EQ(r.used_len, 1025u);
}

TEST(BlkRequest, AcceptsAnyLayout) {
  // Header split 10 + 6 bytes, the second piece carrying the first 512 data
  // bytes too, and the last data bytes sharing a buffer with the status.
  ChainBuilder b;
  uint8_t* h1 = b.Add(10, false);
  uint8_t* h2 = b.Add(6 + 512, false);
  uint8_t* tail = b.Add(512 + 1, true);
  (void)tail;
  uint32_t type = vblk::kTypeOut;
  uint64_t sector = 3;
  uint8_t hdr[16] = {};
  std::memcpy(hdr, &type, 4);
  std::memcpy(hdr + 8, &sector, 8);
  std::memcpy(h1, hdr, 10);
  std::memcpy(h2, hdr + 10, 6);
  BlkRequest r = ParseBlkRequest(b.chain(), Limits());
  // OUT data must be device-readable: the second half is writable.
  EXPECT_EQ(r.error, VirtioError::kDataNotReadable);
  EXPECT_EQ(r.sector, 3u);

  // Same cut as a read: data in readable and writable pieces is wrong too,
  // but an IN whose data shares the status buffer is fine.
  ChainBuilder c;
  c.Header(vblk::kTypeIn, 0);
  uint8_t* in = c.Add(512 + 1, true);
  BlkRequest r2 = ParseBlkRequest(c.chain(), Limits());
  EXPECT_FALSE(r2.error.has_value());
  ASSERT_EQ(r2.data.size(), 1u);
  EXPECT_EQ(r2.data[0].iov_base, in);
  EXPECT_EQ(r2.data[0].iov_len, 512u);
  EXPECT_EQ(r2.status, in + 512);
}

TEST(BlkRequest, IgnoresZeroLengthBuffers) {
  ChainBuilder b;
  b.Add(0, false);
  b.Header(vblk::kTypeFlush, 0);
  b.Add(0, true);
  uint8_t* status = b.Add(1, true);
  b.Add(0, true);
  BlkRequest r = ParseBlkRequest(b.chain(), Limits());
  EXPECT_FALSE(r.error.has_value());
  EXPECT_EQ(r.type, BlkRequestType::kFlush);
  EXPECT_EQ(r.status, status);
}

// ---- Status byte -------------------------------------------------------------------

TEST(BlkRequest, StatusMissingWhenChainIsOnlyAHeader) {
  ChainBuilder b;
  b.Header(vblk::kTypeFlush, 0);
  BlkRequest r = ParseBlkRequest(b.chain(), Limits());
  EXPECT_EQ(r.error, VirtioError::kStatusMissing);
  EXPECT_EQ(r.status, nullptr);
  EXPECT_EQ(r.used_len, 0u);
}

TEST(BlkRequest, StatusNotWritableWhenLastBufferIsReadOnly) {
  ChainBuilder b;
  b.Header(vblk::kTypeOut, 0);
  b.Add(512, false);
  b.Add(1, false);  // the status, but device-readable
  BlkRequest r = ParseBlkRequest(b.chain(), Limits());
  EXPECT_EQ(r.error, VirtioError::kStatusNotWritable);
  EXPECT_EQ(r.status, nullptr);
  EXPECT_EQ(r.used_len, 0u);
}

TEST(BlkRequest, StatusMisplacedWhenReadableBuffersFollowIt) {
  ChainBuilder b;
  b.Header(vblk::kTypeOut, 0);
  uint8_t* status = b.Add(1, true);
  b.Add(512, false);  // readable after writable
  BlkRequest r = ParseBlkRequest(b.chain(), Limits());
  EXPECT_EQ(r.error, VirtioError::kStatusMisplaced);
  EXPECT_EQ(r.error_status, vblk::kStatusIoErr);
  EXPECT_EQ(r.status, status);  // still answerable
}

TEST(BlkRequest, ChainTooShortForHeader) {
  ChainBuilder b;
  b.Add(8, false);
  uint8_t* status = b.Add(1, true);
  BlkRequest r = ParseBlkRequest(b.chain(), Limits());
  EXPECT_EQ(r.error, VirtioError::kDescriptorChainTooShort);
  EXPECT_EQ(r.error_status, vblk::kStatusIoErr);
  EXPECT_EQ(r.status, status);
}

TEST(BlkRequest, HeaderInWritableBufferIsRejected) {
  ChainBuilder b;
  b.Add(16, true);
  b.Add(1, true);
  BlkRequest r = ParseBlkRequest(b.chain(), Limits());
  EXPECT_EQ(r.error, VirtioError::kHeaderNotReadable);
  EXPECT_EQ(r.error_status, vblk::kStatusIoErr);
}

TEST(BlkRequest, CarriesChainErrorsAndUsesStatusOnlyIfReachable) {
  ChainBuilder b;
  b.Header(vblk::kTypeIn, 0);
  b.Add(512, true);
  uint8_t* status = b.Add(1, true);
  b.chain().segments[1].data = nullptr;  // was outside guest memory
  b.chain().error = VirtioError::kAddressOutsideGuestMemory;
  BlkRequest r = ParseBlkRequest(b.chain(), Limits());
  EXPECT_EQ(r.error, VirtioError::kAddressOutsideGuestMemory);
  EXPECT_EQ(r.error_status, vblk::kStatusIoErr);
  EXPECT_EQ(r.status, status);

  b.chain().error = VirtioError::kDescriptorLoop;
  b.chain().complete = false;  // the walk never found the end
  BlkRequest r2 = ParseBlkRequest(b.chain(), Limits());
  EXPECT_EQ(r2.error, VirtioError::kDescriptorLoop);
  EXPECT_EQ(r2.status, nullptr);
  EXPECT_EQ(r2.used_len, 0u);
}

// ---- IN / OUT ---------------------------------------------------------------------

TEST(BlkRequest, InNeedsWritableData) {
  ChainBuilder b;
  b.Header(vblk::kTypeIn, 0);
  b.Add(512, false);
  b.Add(1, true);
  BlkRequest r = ParseBlkRequest(b.chain(), Limits());
  EXPECT_EQ(r.error, VirtioError::kDataNotWritable);
  EXPECT_EQ(r.error_status, vblk::kStatusIoErr);
}

TEST(BlkRequest, OutNeedsReadableData) {
  ChainBuilder b;
  b.Header(vblk::kTypeOut, 0);
  b.Add(512, true);
  b.Add(1, true);
  BlkRequest r = ParseBlkRequest(b.chain(), Limits());
  EXPECT_EQ(r.error, VirtioError::kDataNotReadable);
  EXPECT_EQ(r.error_status, vblk::kStatusIoErr);
}

TEST(BlkRequest, DataMustBeWholeSectors) {
  ChainBuilder b;
  b.Header(vblk::kTypeIn, 0);
  b.Add(700, true);
  b.Add(1, true);
  EXPECT_EQ(ParseBlkRequest(b.chain(), Limits()).error, VirtioError::kDataLengthNotSectorMultiple);
}

TEST(BlkRequest, SectorRangePastCapacityIsIoErr) {
  auto parse = [](uint64_t sector, uint32_t len) {
    ChainBuilder b;
    b.Header(vblk::kTypeIn, sector);
    if (len) b.Add(len, true);
    b.Add(1, true);
    return ParseBlkRequest(b.chain(), Limits());
  };
  EXPECT_FALSE(parse(2047, 512).error.has_value());  // the last sector
  EXPECT_FALSE(parse(2048, 0).error.has_value());    // empty, at the end
  BlkRequest r = parse(2047, 1024);
  EXPECT_EQ(r.error, VirtioError::kSectorPastEnd);
  EXPECT_EQ(r.error_status, vblk::kStatusIoErr);
  EXPECT_EQ(parse(2049, 0).error, VirtioError::kSectorPastEnd);
  // sector * 512 overflows 64 bits.
  EXPECT_EQ(parse(UINT64_MAX / 256, 512).error, VirtioError::kSectorPastEnd);
  EXPECT_EQ(parse(UINT64_MAX, 512).error, VirtioError::kSectorPastEnd);
}

TEST(BlkRequest, WriteToReadOnlyDeviceIsIoErr) {
  ChainBuilder b;
  b.Header(vblk::kTypeOut, 0);
  b.Add(512, false);
  b.Add(1, true);
  BlkLimits l = Limits();
  l.read_only = true;
  BlkRequest r = ParseBlkRequest(b.chain(), l);
  EXPECT_EQ(r.error, VirtioError::kWriteToReadOnlyDevice);
  EXPECT_EQ(r.error_status, vblk::kStatusIoErr);
  // Reads are fine.
  ChainBuilder c;
  c.Header(vblk::kTypeIn, 0);
  c.Add(512, true);
  c.Add(1, true);
  EXPECT_FALSE(ParseBlkRequest(c.chain(), l).error.has_value());
}

TEST(BlkRequest, TooManyDataBuffersIsIoErr) {
  ChainBuilder b;
  b.Header(vblk::kTypeOut, 0);
  for (int i = 0; i < 9; ++i) b.Add(512, false);  // seg_max is 8
  b.Add(1, true);
  EXPECT_EQ(ParseBlkRequest(b.chain(), Limits()).error, VirtioError::kTooManyDataSegments);
}

// ---- Other types -----------------------------------------------------------------

TEST(BlkRequest, UnknownAndUnimplementedTypesAreUnsupp) {
  for (uint32_t type : {vblk::kTypeGetLifetime, vblk::kTypeSecureErase, 2u, 5u, 16u, 0x1234u}) {
    ChainBuilder b;
    b.Header(type, 0);
    b.Add(512, true);
    b.Add(1, true);
    BlkRequest r = ParseBlkRequest(b.chain(), Limits());
    EXPECT_EQ(r.error, VirtioError::kUnsupportedRequestType) << type;
    EXPECT_EQ(r.error_status, vblk::kStatusUnsupp) << type;
  }
}

TEST(BlkRequest, GetIdNeedsWritableData) {
  ChainBuilder b;
  b.Header(vblk::kTypeGetId, 0);
  b.Add(20, false);
  b.Add(1, true);
  EXPECT_EQ(ParseBlkRequest(b.chain(), Limits()).error, VirtioError::kDataNotWritable);
  ChainBuilder c;
  c.Header(vblk::kTypeGetId, 0);
  c.Add(20, true);
  c.Add(1, true);
  BlkRequest ok = ParseBlkRequest(c.chain(), Limits());
  EXPECT_FALSE(ok.error.has_value());
  EXPECT_EQ(ok.type, BlkRequestType::kGetId);
}

// ---- DISCARD / WRITE_ZEROES ----------------------------------------------------------

BlkRequest ParseRanges(uint32_t type, const std::vector<std::array<uint64_t, 3>>& segs,
                       const BlkLimits& l = Limits(), size_t extra_bytes = 0) {
  ChainBuilder b;
  b.Header(type, 0);
  uint8_t* d = b.Add(static_cast<uint32_t>(16 * segs.size() + extra_bytes), false);
  for (size_t i = 0; i < segs.size(); ++i) {
    PutSegment(d + 16 * i, segs[i][0], static_cast<uint32_t>(segs[i][1]),
               static_cast<uint32_t>(segs[i][2]));
  }
  b.Add(1, true);
  return ParseBlkRequest(b.chain(), l);
}

TEST(BlkRequest, ParsesDiscardAndWriteZeroesSegments) {
  BlkRequest r = ParseRanges(vblk::kTypeWriteZeroes, {{8, 16, 1}, {100, 4, 0}});
  ASSERT_FALSE(r.error.has_value());
  ASSERT_EQ(r.ranges.size(), 2u);
  EXPECT_EQ(r.ranges[0].sector, 8u);
  EXPECT_EQ(r.ranges[0].num_sectors, 16u);
  EXPECT_EQ(r.ranges[0].flags, vblk::kSegmentFlagUnmap);
  EXPECT_EQ(r.ranges[1].sector, 100u);
  BlkRequest d = ParseRanges(vblk::kTypeDiscard, {{0, 256, 0}});
  ASSERT_FALSE(d.error.has_value());
  EXPECT_EQ(d.type, BlkRequestType::kDiscard);
}

TEST(BlkRequest, SegmentRulesGiveUnsuppOrIoErr) {
  struct Case {
    uint32_t type;
    std::vector<std::array<uint64_t, 3>> segs;
    VirtioError error;
    uint8_t status;
  };
  const std::vector<Case> cases = {
      {vblk::kTypeDiscard, {{0, 8, 1}}, VirtioError::kUnmapOnDiscard, vblk::kStatusUnsupp},
      {vblk::kTypeWriteZeroes, {{0, 8, 2}}, VirtioError::kUnknownSegmentFlags, vblk::kStatusUnsupp},
      {vblk::kTypeDiscard,
       {{0, 8, 0}, {8, 8, 0}, {16, 8, 0}},
       VirtioError::kTooManySegments,
       vblk::kStatusIoErr},
      {vblk::kTypeWriteZeroes, {{0, 257, 0}}, VirtioError::kSegmentTooLarge, vblk::kStatusIoErr},
      {vblk::kTypeDiscard, {{2000, 49, 0}}, VirtioError::kSectorPastEnd, vblk::kStatusIoErr},
      {vblk::kTypeWriteZeroes,
       {{UINT64_MAX - 1, 4, 0}},
       VirtioError::kSectorPastEnd,
       vblk::kStatusIoErr},
      {vblk::kTypeDiscard, {}, VirtioError::kBadSegmentList, vblk::kStatusIoErr},
  };
  for (const Case& c : cases) {
    BlkRequest r = ParseRanges(c.type, c.segs);
    EXPECT_EQ(r.error, c.error) << VirtioErrorName(c.error);
    EXPECT_EQ(r.error_status, c.status) << VirtioErrorName(c.error);
  }
  // 17 bytes of segment data: not a whole number of segments.
  EXPECT_EQ(ParseRanges(vblk::kTypeDiscard, {{0, 8, 0}}, Limits(), 1).error,
            VirtioError::kBadSegmentList);
}

TEST(BlkRequest, DiscardWithoutTheFeatureIsUnsupp) {
  BlkLimits l = Limits();
  l.discard = false;
  l.write_zeroes = false;
  BlkRequest r = ParseRanges(vblk::kTypeDiscard, {{0, 8, 0}}, l);
  EXPECT_EQ(r.error, VirtioError::kFeatureNotNegotiated);
  EXPECT_EQ(r.error_status, vblk::kStatusUnsupp);
  EXPECT_EQ(ParseRanges(vblk::kTypeWriteZeroes, {{0, 8, 0}}, l).error,
            VirtioError::kFeatureNotNegotiated);
}

TEST(BlkRequest, SegmentsMustBeDeviceReadable) {
  ChainBuilder b;
  b.Header(vblk::kTypeWriteZeroes, 0);
  PutSegment(b.Add(16, true), 0, 8, 0);
  b.Add(1, true);
  EXPECT_EQ(ParseBlkRequest(b.chain(), Limits()).error, VirtioError::kDataNotReadable);
}

}  // namespace
}  // namespace kvblk
