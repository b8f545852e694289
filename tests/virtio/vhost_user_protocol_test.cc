// vhost-user message layout, encoding and decoding, shape validation and
// framing over a real Unix socket pair (with descriptors in SCM_RIGHTS).
#include "virtio/vhost_user_protocol.h"

#include <dirent.h>
#include <gtest/gtest.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>

namespace kvblk::vhost_user {
namespace {

Message Msg(Request r, std::vector<uint8_t> payload = {}, int nfds = 0) {
  Message m;
  m.request = static_cast<uint32_t>(r);
  m.payload = std::move(payload);
  for (int i = 0; i < nfds; ++i) m.fds.emplace_back(eventfd(0, EFD_CLOEXEC));
  return m;
}

std::vector<uint8_t> Header(uint32_t request, uint32_t flags, uint32_t size) {
  std::vector<uint8_t> h(12);
  std::memcpy(h.data(), &request, 4);
  std::memcpy(h.data() + 4, &flags, 4);
  std::memcpy(h.data() + 8, &size, 4);
  return h;
}

int OpenFdCount() {
  int n = 0;
  DIR* d = opendir("/proc/self/fd");
  if (d == nullptr) return -1;
  while (readdir(d) != nullptr) ++n;
  closedir(d);
  return n;
}

class VhostUserFraming : public ::testing::Test {
 protected:
  void SetUp() override {
    int sv[2];
    ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    front_.Reset(sv[0]);
    back_.Reset(sv[1]);
  }
  void SendRaw(const std::vector<uint8_t>& bytes) {
    ASSERT_EQ(send(front_.get(), bytes.data(), bytes.size(), MSG_NOSIGNAL),
              static_cast<ssize_t>(bytes.size()));
  }
  UniqueFd front_, back_;
};

// ---- Encoding ----------------------------------------------------------------

TEST(VhostUserEncoding, PayloadsRoundTrip) {
  EXPECT_EQ(*DecodeU64(Msg(Request::kSetFeatures, EncodeU64(0x1234567890abcdefull))),
            0x1234567890abcdefull);

  auto s = DecodeVringState(Msg(Request::kSetVringNum, EncodeVringState({3, 256})));
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->index, 3u);
  EXPECT_EQ(s->num, 256u);

  VringAddr a{1, 0, 0x1000, 0x3000, 0x2000, 0x4000};
  std::vector<uint8_t> enc = EncodeVringAddr(a);
  ASSERT_EQ(enc.size(), kVringAddrSize);
  // struct vhost_vring_addr: index, flags, desc, used, avail, log.
  uint64_t used;
  std::memcpy(&used, enc.data() + 16, 8);
  EXPECT_EQ(used, 0x3000u);
  auto d = DecodeVringAddr(Msg(Request::kSetVringAddr, enc));
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->desc_user_addr, 0x1000u);
  EXPECT_EQ(d->used_user_addr, 0x3000u);
  EXPECT_EQ(d->avail_user_addr, 0x2000u);
  EXPECT_EQ(d->log_guest_addr, 0x4000u);

  std::vector<MemoryRegionDesc> regions = {{0, 0x100000, 0x7f0000000000, 0},
                                           {0x100000000, 0x200000, 0x7f1000000000, 0x100000}};
  enc = EncodeMemTable(regions);
  EXPECT_EQ(enc.size(), kMemTableHeaderSize + 2 * kMemoryRegionSize);
  auto t = DecodeMemTable(Msg(Request::kSetMemTable, enc, 2));
  ASSERT_TRUE(t.ok());
  ASSERT_EQ(t->size(), 2u);
  EXPECT_EQ((*t)[1].guest_phys_addr, 0x100000000u);
  EXPECT_EQ((*t)[1].memory_size, 0x200000u);
  EXPECT_EQ((*t)[1].userspace_addr, 0x7f1000000000u);
  EXPECT_EQ((*t)[1].mmap_offset, 0x100000u);

  enc = EncodeSingleRegion(regions[1]);
  EXPECT_EQ(enc.size(), kSingleRegionSize);
  auto r = DecodeSingleRegion(Msg(Request::kAddMemReg, enc, 1));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->mmap_offset, 0x100000u);

  ConfigAccess c{32, kConfigFlagFrontend, {1}};
  enc = EncodeConfig(c);
  EXPECT_EQ(enc.size(), kConfigHeaderSize + 1);
  auto cd = DecodeConfig(Msg(Request::kSetConfig, enc));
  ASSERT_TRUE(cd.ok());
  EXPECT_EQ(cd->offset, 32u);
  EXPECT_EQ(cd->flags, kConfigFlagFrontend);
  EXPECT_EQ(cd->data, std::vector<uint8_t>{1});
}

TEST(VhostUserEncoding, ReplyCarriesReplyFlagAndRequest) {
  Message req = Msg(Request::kGetFeatures);
  req.flags = kVersion | kFlagNeedReply;
  Message reply = MakeReply(req, EncodeU64(7));
  EXPECT_EQ(reply.request, static_cast<uint32_t>(Request::kGetFeatures));
  EXPECT_EQ(reply.flags, kVersion | kFlagReply);
  EXPECT_EQ(reply.payload.size(), 8u);
}

TEST(VhostUserEncoding, DecodersRejectWrongSizes) {
  EXPECT_EQ(DecodeU64(Msg(Request::kSetFeatures, {1, 2, 3})).error(),
            VhostUserError::kWrongPayloadSize);
  EXPECT_EQ(DecodeVringState(Msg(Request::kSetVringNum, std::vector<uint8_t>(12))).error(),
            VhostUserError::kWrongPayloadSize);
  EXPECT_EQ(DecodeVringAddr(Msg(Request::kSetVringAddr, std::vector<uint8_t>(32))).error(),
            VhostUserError::kWrongPayloadSize);
  std::vector<uint8_t> table = EncodeMemTable({{0, 4096, 0, 0}});
  table.push_back(0);
  EXPECT_EQ(DecodeMemTable(Msg(Request::kSetMemTable, table, 1)).error(),
            VhostUserError::kWrongPayloadSize);
  EXPECT_EQ(DecodeMemTable(Msg(Request::kSetMemTable, EncodeMemTable({}))).error(),
            VhostUserError::kEmptyMemoryTable);
  std::vector<MemoryRegionDesc> nine(9, MemoryRegionDesc{0, 4096, 0, 0});
  EXPECT_EQ(DecodeMemTable(Msg(Request::kSetMemTable, EncodeMemTable(nine))).error(),
            VhostUserError::kTooManyRegions);
  std::vector<uint8_t> cfg = EncodeConfig({0, 0, std::vector<uint8_t>(8)});
  cfg.pop_back();  // size says 8, 7 bytes follow
  EXPECT_EQ(DecodeConfig(Msg(Request::kGetConfig, cfg)).error(), VhostUserError::kWrongPayloadSize);
  EXPECT_EQ(DecodeConfig(Msg(Request::kGetConfig,
                             EncodeConfig({0, 0, std::vector<uint8_t>(kMaxConfigSize + 1)})))
                .error(),
            VhostUserError::kWrongPayloadSize);
}

// ---- Shape validation ---------------------------------------------------------

TEST(VhostUserShape, AcceptsWellFormedMessages) {
  EXPECT_TRUE(CheckMessageShape(Msg(Request::kGetFeatures)).ok());
  EXPECT_TRUE(CheckMessageShape(Msg(Request::kSetFeatures, EncodeU64(1))).ok());
  EXPECT_TRUE(CheckMessageShape(Msg(Request::kSetOwner)).ok());
  EXPECT_TRUE(CheckMessageShape(Msg(Request::kSetVringNum, EncodeVringState({0, 128}))).ok());
  EXPECT_TRUE(CheckMessageShape(Msg(Request::kSetVringAddr, EncodeVringAddr({}))).ok());
  EXPECT_TRUE(CheckMessageShape(Msg(Request::kGetVringBase, EncodeVringState({0, 0}))).ok());
  EXPECT_TRUE(CheckMessageShape(Msg(Request::kSetVringKick, EncodeU64(0), 1)).ok());
  EXPECT_TRUE(CheckMessageShape(Msg(Request::kSetVringCall, EncodeU64(kVringNoFdMask))).ok());
  EXPECT_TRUE(CheckMessageShape(Msg(Request::kSetMemTable,
                                    EncodeMemTable({{0, 4096, 0, 0}, {8192, 4096, 8192, 0}}), 2))
                  .ok());
  EXPECT_TRUE(
      CheckMessageShape(Msg(Request::kGetConfig, EncodeConfig({0, 0, std::vector<uint8_t>(60)})))
          .ok());
  EXPECT_TRUE(CheckMessageShape(Msg(Request::kAddMemReg, EncodeSingleRegion({}), 1)).ok());
  EXPECT_TRUE(CheckMessageShape(Msg(Request::kRemMemReg, EncodeSingleRegion({}))).ok());
  // REM_MEM_REG "MAY accept" one descriptor (closed unused).
  EXPECT_TRUE(CheckMessageShape(Msg(Request::kRemMemReg, EncodeSingleRegion({}), 1)).ok());
}

TEST(VhostUserShape, RejectsWrongPayloadSize) {
  EXPECT_EQ(CheckMessageShape(Msg(Request::kGetFeatures, EncodeU64(0))).error(),
            VhostUserError::kWrongPayloadSize);
  EXPECT_EQ(CheckMessageShape(Msg(Request::kSetFeatures, {0, 0, 0, 0})).error(),
            VhostUserError::kWrongPayloadSize);
  EXPECT_EQ(CheckMessageShape(Msg(Request::kSetVringNum, std::vector<uint8_t>(4))).error(),
            VhostUserError::kWrongPayloadSize);
  EXPECT_EQ(CheckMessageShape(Msg(Request::kSetVringAddr, std::vector<uint8_t>(41))).error(),
            VhostUserError::kWrongPayloadSize);
  EXPECT_EQ(CheckMessageShape(Msg(Request::kSetMemTable, {1, 0, 0})).error(),
            VhostUserError::kWrongPayloadSize);
  EXPECT_EQ(CheckMessageShape(Msg(Request::kGetConfig, std::vector<uint8_t>(11))).error(),
            VhostUserError::kWrongPayloadSize);
  EXPECT_EQ(CheckMessageShape(Msg(Request::kAddMemReg, std::vector<uint8_t>(32), 1)).error(),
            VhostUserError::kWrongPayloadSize);
}

TEST(VhostUserShape, RejectsWrongFdCount) {
  // A kick without the "no fd" bit needs exactly one descriptor.
  EXPECT_EQ(CheckMessageShape(Msg(Request::kSetVringKick, EncodeU64(0))).error(),
            VhostUserError::kWrongFdCount);
  EXPECT_EQ(CheckMessageShape(Msg(Request::kSetVringCall, EncodeU64(0), 2)).error(),
            VhostUserError::kWrongFdCount);
  // The "no fd" bit with a descriptor anyway.
  EXPECT_EQ(CheckMessageShape(Msg(Request::kSetVringErr, EncodeU64(kVringNoFdMask), 1)).error(),
            VhostUserError::kWrongFdCount);
  EXPECT_EQ(CheckMessageShape(Msg(Request::kSetMemTable,
                                  EncodeMemTable({{0, 4096, 0, 0}, {8192, 4096, 8192, 0}}), 1))
                .error(),
            VhostUserError::kWrongFdCount);
  EXPECT_EQ(CheckMessageShape(Msg(Request::kAddMemReg, EncodeSingleRegion({}))).error(),
            VhostUserError::kWrongFdCount);
  EXPECT_EQ(CheckMessageShape(Msg(Request::kRemMemReg, EncodeSingleRegion({}), 2)).error(),
            VhostUserError::kWrongFdCount);
  EXPECT_EQ(CheckMessageShape(Msg(Request::kSetOwner, {}, 1)).error(),
            VhostUserError::kWrongFdCount);
}

TEST(VhostUserShape, RejectsBadMemoryTables) {
  EXPECT_EQ(CheckMessageShape(Msg(Request::kSetMemTable, EncodeMemTable({}))).error(),
            VhostUserError::kEmptyMemoryTable);
  std::vector<MemoryRegionDesc> nine(9, MemoryRegionDesc{0, 4096, 0, 0});
  EXPECT_EQ(CheckMessageShape(Msg(Request::kSetMemTable, EncodeMemTable(nine), 8)).error(),
            VhostUserError::kTooManyRegions);
}

TEST(VhostUserShape, RejectsUnknownAndUnsupportedRequests) {
  EXPECT_EQ(CheckMessageShape(Msg(Request::kNone)).error(), VhostUserError::kUnknownRequest);
  Message m = Msg(Request::kNone);
  m.request = kLastKnownRequest + 1;
  EXPECT_EQ(CheckMessageShape(m).error(), VhostUserError::kUnknownRequest);
  m.request = 0xffffffff;
  EXPECT_EQ(CheckMessageShape(m).error(), VhostUserError::kUnknownRequest);
  EXPECT_EQ(CheckMessageShape(Msg(Request::kSetLogBase, EncodeU64(0), 1)).error(),
            VhostUserError::kUnsupportedRequest);
  EXPECT_EQ(CheckMessageShape(Msg(Request::kGetInflightFd, std::vector<uint8_t>(20))).error(),
            VhostUserError::kUnsupportedRequest);
  EXPECT_EQ(CheckMessageShape(Msg(Request::kVringKick, EncodeVringState({0, 0}))).error(),
            VhostUserError::kUnsupportedRequest);
  EXPECT_EQ(CheckMessageShape(Msg(Request::kIotlbMsg)).error(),
            VhostUserError::kUnsupportedRequest);
}

TEST(VhostUserShape, ReplyKinds) {
  EXPECT_EQ(ReplyKindOf(static_cast<uint32_t>(Request::kGetFeatures)), ReplyKind::kBody);
  EXPECT_EQ(ReplyKindOf(static_cast<uint32_t>(Request::kGetVringBase)), ReplyKind::kBody);
  EXPECT_EQ(ReplyKindOf(static_cast<uint32_t>(Request::kGetConfig)), ReplyKind::kBody);
  EXPECT_EQ(ReplyKindOf(static_cast<uint32_t>(Request::kSetMemTable)), ReplyKind::kNone);
  EXPECT_EQ(ReplyKindOf(static_cast<uint32_t>(Request::kSetVringEnable)), ReplyKind::kNone);
  EXPECT_STREQ(RequestName(static_cast<uint32_t>(Request::kAddMemReg)), "ADD_MEM_REG");
  EXPECT_STREQ(RequestName(999), "UNKNOWN");
  EXPECT_STREQ(VhostUserErrorName(VhostUserError::kWrongFdCount), "WrongFdCount");
  EXPECT_TRUE(IsFramingError(VhostUserError::kTooManyFds));
  EXPECT_FALSE(IsFramingError(VhostUserError::kWrongFdCount));
}

// ---- Framing ------------------------------------------------------------------

TEST_F(VhostUserFraming, ReaderAssemblesMessageWithDescriptors) {
  Message m = Msg(Request::kSetVringKick, EncodeU64(2), 1);
  m.flags = kVersion | kFlagNeedReply;
  ASSERT_TRUE(SendMessage(front_.get(), m).ok());
  MessageReader reader;
  auto r = reader.Read(back_.get());
  ASSERT_TRUE(r.ok()) << VhostUserErrorName(r.error());
  ASSERT_TRUE(r->has_value());
  const Message& got = **r;
  EXPECT_EQ(got.request, static_cast<uint32_t>(Request::kSetVringKick));
  EXPECT_TRUE(got.need_reply());
  EXPECT_EQ(got.payload, EncodeU64(2));
  ASSERT_EQ(got.fds.size(), 1u);
  struct stat st;
  EXPECT_EQ(fstat(got.fds[0].get(), &st), 0);
  // Nothing more: the reader says so without blocking.
  auto again = reader.Read(back_.get());
  ASSERT_TRUE(again.ok());
  EXPECT_FALSE(again->has_value());
}

TEST_F(VhostUserFraming, ReaderHandlesMessagesArrivingInPieces) {
  std::vector<uint8_t> bytes = Header(static_cast<uint32_t>(Request::kSetFeatures), kVersion, 8);
  std::vector<uint8_t> payload = EncodeU64(0x42);
  bytes.insert(bytes.end(), payload.begin(), payload.end());
  MessageReader reader;
  for (size_t i = 0; i < bytes.size(); ++i) {
    SendRaw({bytes[i]});
    auto r = reader.Read(back_.get());
    ASSERT_TRUE(r.ok());
    if (i + 1 < bytes.size()) {
      EXPECT_FALSE(r->has_value()) << "byte " << i;
      EXPECT_EQ(reader.partial_bytes(), i + 1);
    } else {
      ASSERT_TRUE(r->has_value());
      EXPECT_EQ(*DecodeU64(**r), 0x42u);
    }
  }
}

TEST_F(VhostUserFraming, ReaderKeepsDescriptorsWithTheirMessage) {
  // Two messages queued back to back; only the second carries a descriptor.
  ASSERT_TRUE(SendMessage(front_.get(), Msg(Request::kSetVringNum, EncodeVringState({0, 8}))).ok());
  ASSERT_TRUE(SendMessage(front_.get(), Msg(Request::kSetVringCall, EncodeU64(0), 1)).ok());
  MessageReader reader;
  auto first = reader.Read(back_.get());
  ASSERT_TRUE(first.ok() && first->has_value());
  EXPECT_EQ((*first)->request, static_cast<uint32_t>(Request::kSetVringNum));
  EXPECT_TRUE((*first)->fds.empty());
  auto second = reader.Read(back_.get());
  ASSERT_TRUE(second.ok() && second->has_value());
  EXPECT_EQ((*second)->request, static_cast<uint32_t>(Request::kSetVringCall));
  EXPECT_EQ((*second)->fds.size(), 1u);
}

TEST_F(VhostUserFraming, ReaderRejectsBadVersion) {
  SendRaw(Header(1, 2, 0));
  MessageReader reader;
  EXPECT_EQ(reader.Read(back_.get()).error(), VhostUserError::kBadVersion);
}

TEST_F(VhostUserFraming, ReaderRejectsReplyFlagInRequest) {
  SendRaw(Header(1, kVersion | kFlagReply, 0));
  MessageReader reader;
  EXPECT_EQ(reader.Read(back_.get()).error(), VhostUserError::kUnexpectedReply);
}

TEST_F(VhostUserFraming, ReaderRejectsOversizedPayloadBeforeReadingIt) {
  SendRaw(Header(5, kVersion, kMaxPayloadSize + 1));
  MessageReader reader;
  EXPECT_EQ(reader.Read(back_.get()).error(), VhostUserError::kPayloadTooLarge);
  // A size that would be a 4 GiB allocation is refused the same way.
  VhostUserFraming::SetUp();
  SendRaw(Header(5, kVersion, 0xffffffff));
  MessageReader reader2;
  EXPECT_EQ(reader2.Read(back_.get()).error(), VhostUserError::kPayloadTooLarge);
}

TEST_F(VhostUserFraming, ReaderRejectsTooManyDescriptorsAndClosesThem) {
  const int before = OpenFdCount();
  {
    Message m;
    m.request = static_cast<uint32_t>(Request::kSetMemTable);
    m.payload = EncodeMemTable({{0, 4096, 0, 0}});
    // SendMessage refuses more than kMaxFds, so build the message by hand.
    std::vector<int> fds;
    for (int i = 0; i < kMaxFds + 1; ++i) fds.push_back(eventfd(0, EFD_CLOEXEC));
    std::vector<uint8_t> bytes =
        Header(m.request, kVersion, static_cast<uint32_t>(m.payload.size()));
    bytes.insert(bytes.end(), m.payload.begin(), m.payload.end());
    iovec iov{bytes.data(), bytes.size()};
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * (kMaxFds + 1))] = {};
    msghdr mh{};
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = control;
    mh.msg_controllen = sizeof control;
    cmsghdr* c = CMSG_FIRSTHDR(&mh);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
    ASSERT_EQ(sendmsg(front_.get(), &mh, 0), static_cast<ssize_t>(bytes.size()));
    for (int fd : fds) close(fd);
    MessageReader reader;
    EXPECT_EQ(reader.Read(back_.get()).error(), VhostUserError::kTooManyFds);
  }
  // Whatever arrived was closed (the truncated ones by the kernel).
  EXPECT_EQ(OpenFdCount(), before);
}

TEST_F(VhostUserFraming, ReaderReportsEndOfStream) {
  front_.Reset();
  MessageReader reader;
  EXPECT_EQ(reader.Read(back_.get()).error(), VhostUserError::kPeerClosed);
}

TEST_F(VhostUserFraming, ReaderReportsTruncatedMessage) {
  std::vector<uint8_t> h = Header(2, kVersion, 8);
  h.push_back(1);  // one payload byte of eight
  SendRaw(h);
  front_.Reset();
  MessageReader reader;
  EXPECT_EQ(reader.Read(back_.get()).error(), VhostUserError::kTruncatedMessage);
}

TEST_F(VhostUserFraming, NonblockingSendReportsFullSocket) {
  int small = 4096;
  setsockopt(front_.get(), SOL_SOCKET, SO_SNDBUF, &small, sizeof small);
  Message m = Msg(Request::kGetConfig, EncodeConfig({0, 0, std::vector<uint8_t>(kMaxConfigSize)}));
  VuStatus st;
  for (int i = 0; i < 100000 && st.ok(); ++i) st = SendMessage(front_.get(), m, true);
  EXPECT_EQ(st.error(), VhostUserError::kReplyNotSent);
}

TEST_F(VhostUserFraming, BlockingReaderReadsReplies) {
  Message req = Msg(Request::kGetFeatures);
  ASSERT_TRUE(SendMessage(back_.get(), MakeReply(req, EncodeU64(99))).ok());
  auto r = ReadMessageBlocking(front_.get(), 1000);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->flags, kVersion | kFlagReply);
  EXPECT_EQ(*DecodeU64(*r), 99u);
  // Nothing arrives: the timeout is an error, not a hang.
  EXPECT_EQ(ReadMessageBlocking(front_.get(), 10).error(), VhostUserError::kSocketError);
}

}  // namespace
}  // namespace kvblk::vhost_user
