// GuestMemory and Virtqueue against descriptor tables written by the fake
// driver: chains, indirect tables, notification suppression, and the
// hostile cases (loops, long chains, bad indices, memory outside the guest).
#include "virtio/virtqueue.h"

#include <gtest/gtest.h>
#include <sys/mman.h>

#include "tests/support/virtio_fake_driver.h"
#include "virtio/guest_memory.h"

namespace kvblk {
namespace {

using testing::FakeBuf;
using testing::FakeGuest;
using testing::FakeVirtqueue;

constexpr uint16_t kNext = kVirtqDescFNext;
constexpr uint16_t kWrite = kVirtqDescFWrite;
constexpr uint16_t kIndirect = kVirtqDescFIndirect;

std::shared_ptr<const GuestMemory> MemoryOf(FakeGuest& g) {
  auto m = GuestMemory::Create({g.region()});
  EXPECT_TRUE(m.ok());
  return *m;
}

Virtqueue MakeQueue(FakeGuest& g, FakeVirtqueue& fq, bool indirect = true, bool event_idx = false) {
  auto q = Virtqueue::Create(MemoryOf(g), fq.address(), indirect, event_idx);
  EXPECT_TRUE(q.ok()) << VirtioErrorName(q.error());
  return std::move(q).value();
}

// Pops one chain, expecting the ring to be intact and non-empty.
DescriptorChain PopOne(Virtqueue& q) {
  auto r = q.Pop();
  EXPECT_TRUE(r.ok()) << VirtioErrorName(r.error());
  EXPECT_TRUE(r->has_value());
  return std::move(**r);
}

// ---- GuestMemory ----------------------------------------------------------------

TEST(GuestMemory, TranslatesOnlyRangesInsideOneRegion) {
  std::vector<uint8_t> a(4096), b(4096);
  auto m = GuestMemory::Create({{0x2000, 4096, b.data(), false}, {0x1000, 4096, a.data(), true}});
  ASSERT_TRUE(m.ok());
  const GuestMemory& mem = **m;
  EXPECT_EQ(*mem.Translate(0x1000, 4096, false), a.data());
  EXPECT_EQ(*mem.Translate(0x2ff0, 16, true), b.data() + 0xff0);
  // Adjacent in guest space, but two mappings: no single host range.
  EXPECT_EQ(mem.Translate(0x1ff0, 32, false).error(), VirtioError::kAddressOutsideGuestMemory);
  EXPECT_EQ(mem.Translate(0x0fff, 2, false).error(), VirtioError::kAddressOutsideGuestMemory);
  EXPECT_EQ(mem.Translate(0x3000, 0, false).error(), VirtioError::kAddressOutsideGuestMemory);
  EXPECT_EQ(mem.Translate(0x2001, 4096, false).error(), VirtioError::kAddressOutsideGuestMemory);
  // gpa + len wraps around 2^64.
  EXPECT_EQ(mem.Translate(0x2000, UINT64_MAX, false).error(),
            VirtioError::kAddressOutsideGuestMemory);
  EXPECT_EQ(mem.Translate(UINT64_MAX, 2, false).error(), VirtioError::kAddressOutsideGuestMemory);
  EXPECT_EQ(mem.Translate(0x1000, 16, true).error(), VirtioError::kGuestMemoryReadOnly);
}

TEST(GuestMemory, RejectsOverlappingAndDegenerateRegions) {
  std::vector<uint8_t> a(8192);
  EXPECT_EQ(
      GuestMemory::Create({{0x1000, 8192, a.data(), false}, {0x2000, 16, a.data(), false}}).error(),
      VirtioError::kInvalidMemoryLayout);
  EXPECT_EQ(GuestMemory::Create({{0x1000, 0, a.data(), false}}).error(),
            VirtioError::kInvalidMemoryLayout);
  EXPECT_EQ(GuestMemory::Create({{0x1000, 16, nullptr, false}}).error(),
            VirtioError::kInvalidMemoryLayout);
  EXPECT_EQ(GuestMemory::Create({{UINT64_MAX - 8, 16, a.data(), false}}).error(),
            VirtioError::kInvalidMemoryLayout);
}

TEST(GuestMemory, RunsReleaseCallbackWhenLastReferenceGoes) {
  std::vector<uint8_t> a(4096);
  int released = 0;
  std::shared_ptr<const GuestMemory> copy;
  {
    auto m = GuestMemory::Create({{0, 4096, a.data(), false}}, [&] { ++released; });
    ASSERT_TRUE(m.ok());
    copy = *m;
  }
  EXPECT_EQ(released, 0);  // `copy` still refers to it
  copy.reset();
  EXPECT_EQ(released, 1);
}

// ---- Setup ---------------------------------------------------------------------

TEST(Virtqueue, RejectsBadSizeMisalignedRingsAndRingsOutsideMemory) {
  FakeGuest g;
  FakeVirtqueue fq(g, 8);
  auto mem = MemoryOf(g);
  VirtqueueAddress a = fq.address();
  a.size = 6;
  EXPECT_EQ(Virtqueue::Create(mem, a, true, true).error(), VirtioError::kInvalidQueueSize);
  a.size = 0;
  EXPECT_EQ(Virtqueue::Create(mem, a, true, true).error(), VirtioError::kInvalidQueueSize);
  a = fq.address();
  a.desc_gpa += 8;
  EXPECT_EQ(Virtqueue::Create(mem, a, true, true).error(), VirtioError::kRingMisaligned);
  a = fq.address();
  a.used_gpa += 2;
  EXPECT_EQ(Virtqueue::Create(mem, a, true, true).error(), VirtioError::kRingMisaligned);
  a = fq.address();
  a.used_gpa = g.end() - 16;  // the used ring runs off the end of guest RAM
  EXPECT_EQ(Virtqueue::Create(mem, a, true, true).error(), VirtioError::kAddressOutsideGuestMemory);
}

// ---- Chains --------------------------------------------------------------------

TEST(Virtqueue, PopReturnsNothingWhenRingIsEmpty) {
  FakeGuest g;
  FakeVirtqueue fq(g, 8);
  Virtqueue q = MakeQueue(g, fq);
  auto r = q.Pop();
  ASSERT_TRUE(r.ok());
  EXPECT_FALSE(r->has_value());
}

TEST(Virtqueue, PopsChainedDescriptorsAsTranslatedSegments) {
  FakeGuest g;
  FakeVirtqueue fq(g, 8);
  Virtqueue q = MakeQueue(g, fq);
  uint64_t a = g.Alloc(16), b = g.Alloc(4096), c = g.Alloc(1);
  uint16_t head = fq.AddChain({{a, 16, false}, {b, 4096, true}, {c, 1, true}});
  fq.Publish(head);
  DescriptorChain ch = PopOne(q);
  EXPECT_EQ(ch.head, head);
  EXPECT_FALSE(ch.error.has_value());
  EXPECT_TRUE(ch.complete);
  ASSERT_EQ(ch.segments.size(), 3u);
  EXPECT_EQ(ch.segments[0].data, g.Host(a));
  EXPECT_EQ(ch.segments[0].len, 16u);
  EXPECT_FALSE(ch.segments[0].writable);
  EXPECT_EQ(ch.segments[1].data, g.Host(b));
  EXPECT_TRUE(ch.segments[1].writable);
  EXPECT_EQ(ch.segments[2].data, g.Host(c));
  EXPECT_EQ(q.next_avail(), 1);
}

TEST(Virtqueue, PopsIndirectTable) {
  FakeGuest g;
  FakeVirtqueue fq(g, 8);
  Virtqueue q = MakeQueue(g, fq);
  uint64_t a = g.Alloc(16), b = g.Alloc(512), c = g.Alloc(1);
  fq.Publish(fq.AddIndirect({{a, 16, false}, {b, 512, false}, {c, 1, true}}));
  DescriptorChain ch = PopOne(q);
  EXPECT_FALSE(ch.error.has_value());
  ASSERT_EQ(ch.segments.size(), 3u);
  EXPECT_EQ(ch.segments[1].data, g.Host(b));
  EXPECT_EQ(ch.segments[1].len, 512u);
  EXPECT_TRUE(ch.segments[2].writable);
}

TEST(Virtqueue, PopsDirectDescriptorsFollowedByAnIndirectTable) {
  FakeGuest g;
  FakeVirtqueue fq(g, 8);
  Virtqueue q = MakeQueue(g, fq);
  uint64_t a = g.Alloc(16), b = g.Alloc(512), c = g.Alloc(1);
  uint64_t table = fq.AllocTable(2);
  fq.WriteTableDesc(table, 0, b, 512, kNext, 1);
  fq.WriteTableDesc(table, 1, c, 1, kWrite, 0);
  uint16_t d0 = fq.AllocDesc(), d1 = fq.AllocDesc();
  fq.WriteDesc(d0, a, 16, kNext, d1);
  fq.WriteDesc(d1, table, 32, kIndirect, 0);
  fq.Publish(d0);
  DescriptorChain ch = PopOne(q);
  EXPECT_FALSE(ch.error.has_value());
  ASSERT_EQ(ch.segments.size(), 3u);
  EXPECT_EQ(ch.segments[0].data, g.Host(a));
  EXPECT_EQ(ch.segments[2].data, g.Host(c));
}

TEST(Virtqueue, SkipsTranslationOfZeroLengthDescriptors) {
  FakeGuest g;
  FakeVirtqueue fq(g, 8);
  Virtqueue q = MakeQueue(g, fq);
  uint64_t a = g.Alloc(16);
  // A zero-length buffer may point anywhere: nothing is accessed through it.
  fq.Publish(fq.AddChain({{a, 16, false}, {0xdead0000000ull, 0, true}}));
  DescriptorChain ch = PopOne(q);
  EXPECT_FALSE(ch.error.has_value());
  ASSERT_EQ(ch.segments.size(), 2u);
  EXPECT_EQ(ch.segments[1].data, nullptr);
}

// ---- Hostile chains ----------------------------------------------------------------

TEST(Virtqueue, DetectsDescriptorLoop) {
  FakeGuest g;
  FakeVirtqueue fq(g, 8);
  Virtqueue q = MakeQueue(g, fq);
  uint64_t a = g.Alloc(16);
  fq.WriteDesc(0, a, 16, kNext, 1);
  fq.WriteDesc(1, a, 16, kNext, 2);
  fq.WriteDesc(2, a, 16, kNext, 0);  // back to the head
  fq.Publish(0);
  DescriptorChain ch = PopOne(q);
  EXPECT_EQ(ch.head, 0);
  EXPECT_EQ(ch.error, VirtioError::kDescriptorLoop);
  EXPECT_FALSE(ch.complete);
  // The queue itself is fine: the next chain pops normally.
  fq.WriteDesc(3, a, 16, 0, 0);
  fq.Publish(3);
  DescriptorChain next = PopOne(q);
  EXPECT_FALSE(next.error.has_value());
  EXPECT_EQ(next.head, 3);
}

TEST(Virtqueue, DetectsSelfLoopInIndirectTable) {
  FakeGuest g;
  FakeVirtqueue fq(g, 8);
  Virtqueue q = MakeQueue(g, fq);
  uint64_t a = g.Alloc(16);
  uint64_t table = fq.AllocTable(4);
  fq.WriteTableDesc(table, 0, a, 16, kNext, 1);
  fq.WriteTableDesc(table, 1, a, 16, kNext, 1);  // points at itself
  uint16_t d = fq.AllocDesc();
  fq.WriteDesc(d, table, 64, kIndirect, 0);
  fq.Publish(d);
  EXPECT_EQ(PopOne(q).error, VirtioError::kDescriptorLoop);
}

TEST(Virtqueue, RejectsChainLongerThanQueue) {
  FakeGuest g;
  FakeVirtqueue fq(g, 8);
  Virtqueue q = MakeQueue(g, fq);
  // Nine distinct descriptors in one indirect table: no loop, but a driver
  // must not build a chain longer than the queue size (8).
  std::vector<FakeBuf> bufs;
  for (int i = 0; i < 9; ++i) bufs.push_back({g.Alloc(16), 16, i == 8});
  fq.Publish(fq.AddIndirect(bufs));
  DescriptorChain ch = PopOne(q);
  EXPECT_EQ(ch.error, VirtioError::kDescriptorChainTooLong);
  EXPECT_FALSE(ch.complete);
  // Exactly the queue size is fine.
  bufs.pop_back();
  fq.Publish(fq.AddIndirect(bufs));
  EXPECT_FALSE(PopOne(q).error.has_value());
}

TEST(Virtqueue, RejectsNextIndexOutOfRange) {
  FakeGuest g;
  FakeVirtqueue fq(g, 8);
  Virtqueue q = MakeQueue(g, fq);
  uint64_t a = g.Alloc(16);
  fq.WriteDesc(0, a, 16, kNext, 8);
  fq.Publish(0);
  EXPECT_EQ(PopOne(q).error, VirtioError::kDescriptorIndexOutOfRange);
  uint64_t table = fq.AllocTable(2);
  fq.WriteTableDesc(table, 0, a, 16, kNext, 2);  // table has entries 0 and 1
  fq.WriteDesc(1, table, 32, kIndirect, 0);
  fq.Publish(1);
  EXPECT_EQ(PopOne(q).error, VirtioError::kDescriptorIndexOutOfRange);
}

TEST(Virtqueue, RejectsIndirectWithoutTheFeature) {
  FakeGuest g;
  FakeVirtqueue fq(g, 8);
  Virtqueue q = MakeQueue(g, fq, /*indirect=*/false);
  fq.Publish(fq.AddIndirect({{g.Alloc(16), 16, false}}));
  EXPECT_EQ(PopOne(q).error, VirtioError::kIndirectNotNegotiated);
}

TEST(Virtqueue, RejectsIndirectInsideIndirect) {
  FakeGuest g;
  FakeVirtqueue fq(g, 8);
  Virtqueue q = MakeQueue(g, fq);
  uint64_t inner = fq.AllocTable(1);
  fq.WriteTableDesc(inner, 0, g.Alloc(16), 16, 0, 0);
  uint64_t outer = fq.AllocTable(1);
  fq.WriteTableDesc(outer, 0, inner, 16, kIndirect, 0);
  fq.WriteDesc(0, outer, 16, kIndirect, 0);
  fq.Publish(0);
  EXPECT_EQ(PopOne(q).error, VirtioError::kNestedIndirectDescriptor);
}

TEST(Virtqueue, RejectsIndirectWithNextAndBadTableLength) {
  FakeGuest g;
  FakeVirtqueue fq(g, 8);
  Virtqueue q = MakeQueue(g, fq);
  uint64_t table = fq.AllocTable(2);
  fq.WriteTableDesc(table, 0, g.Alloc(16), 16, 0, 0);
  fq.WriteDesc(0, table, 32, kIndirect | kNext, 1);
  fq.Publish(0);
  EXPECT_EQ(PopOne(q).error, VirtioError::kIndirectDescriptorHasNext);
  fq.WriteDesc(1, table, 24, kIndirect, 0);
  fq.Publish(1);
  EXPECT_EQ(PopOne(q).error, VirtioError::kBadIndirectTableLength);
  fq.WriteDesc(2, table, 0, kIndirect, 0);
  fq.Publish(2);
  EXPECT_EQ(PopOne(q).error, VirtioError::kBadIndirectTableLength);
  fq.WriteDesc(3, g.end() - 16, 32, kIndirect, 0);  // table runs off guest RAM
  fq.Publish(3);
  EXPECT_EQ(PopOne(q).error, VirtioError::kAddressOutsideGuestMemory);
}

TEST(Virtqueue, FlagsBufferOutsideGuestMemoryButKeepsWalking) {
  FakeGuest g;
  FakeVirtqueue fq(g, 8);
  Virtqueue q = MakeQueue(g, fq);
  uint64_t a = g.Alloc(16), c = g.Alloc(1);
  fq.Publish(fq.AddChain({{a, 16, false}, {g.end() + 4096, 512, true}, {c, 1, true}}));
  DescriptorChain ch = PopOne(q);
  EXPECT_EQ(ch.error, VirtioError::kAddressOutsideGuestMemory);
  EXPECT_TRUE(ch.complete);  // the status buffer is still known
  ASSERT_EQ(ch.segments.size(), 3u);
  EXPECT_EQ(ch.segments[1].data, nullptr);
  EXPECT_EQ(ch.segments[2].data, g.Host(c));
}

TEST(Virtqueue, RejectsLengthRunningPastTheEndOfGuestMemory) {
  FakeGuest g;
  FakeVirtqueue fq(g, 8);
  Virtqueue q = MakeQueue(g, fq);
  fq.Publish(fq.AddChain({{g.end() - 100, 512, false}}));
  EXPECT_EQ(PopOne(q).error, VirtioError::kAddressOutsideGuestMemory);
  // Address near 2^64 so that addr + len wraps.
  fq.Publish(fq.AddChain({{UINT64_MAX - 10, 512, false}}));
  EXPECT_EQ(PopOne(q).error, VirtioError::kAddressOutsideGuestMemory);
}

TEST(Virtqueue, RejectsChainOfMoreThanFourGiB) {
  // A second region of 8 GiB of reserved (never touched) address space, so
  // the buffers translate and only the total length is wrong.
  const uint64_t big = 8ull << 30;
  void* reserve = mmap(nullptr, big, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  ASSERT_NE(reserve, MAP_FAILED);
  FakeGuest g;
  FakeVirtqueue fq(g, 8);
  auto mem = GuestMemory::Create({g.region(), {0x100000000ull, big, reserve, false}});
  ASSERT_TRUE(mem.ok());
  auto q = Virtqueue::Create(*mem, fq.address(), true, false);
  ASSERT_TRUE(q.ok());
  fq.Publish(
      fq.AddChain({{0x100000000ull, 0x80000000u, false}, {0x180000000ull, 0x80000000u, false}}));
  auto r = q->Pop();
  ASSERT_TRUE(r.ok());
  EXPECT_EQ((*r)->error, VirtioError::kDescriptorChainTooLarge);
  munmap(reserve, big);
}

// ---- Broken rings --------------------------------------------------------------------

TEST(Virtqueue, AvailIndexJumpBreaksTheQueue) {
  FakeGuest g;
  FakeVirtqueue fq(g, 8);
  Virtqueue q = MakeQueue(g, fq);
  fq.SetAvailIdx(9);  // nine chains outstanding in an eight-entry ring
  auto r = q.Pop();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error(), VirtioError::kAvailIndexJumped);
  EXPECT_TRUE(IsRingBroken(r.error()));
  EXPECT_TRUE(q.broken());
  // Stays broken, even if the index is put back.
  fq.SetAvailIdx(0);
  EXPECT_EQ(q.Pop().error(), VirtioError::kAvailIndexJumped);
}

TEST(Virtqueue, AvailEntryOutOfRangeBreaksTheQueue) {
  FakeGuest g;
  FakeVirtqueue fq(g, 8);
  Virtqueue q = MakeQueue(g, fq);
  fq.Publish(8);
  EXPECT_EQ(q.Pop().error(), VirtioError::kAvailRingEntryOutOfRange);
  EXPECT_TRUE(q.broken());
}

// ---- Used ring and notifications ------------------------------------------------------

TEST(Virtqueue, PushPublishesUsedElementsAcrossIndexWrapAround) {
  FakeGuest g;
  FakeVirtqueue fq(g, 4);
  Virtqueue q = MakeQueue(g, fq);
  uint64_t a = g.Alloc(16);
  // 70000 round trips: both free-running indices wrap past 65535.
  for (int i = 0; i < 70000; ++i) {
    uint16_t head = fq.AddChain({{a, 16, false}});
    fq.Publish(head);
    DescriptorChain ch = PopOne(q);
    ASSERT_EQ(ch.head, head);
    q.Push(ch.head, 7);
    auto used = fq.TakeUsed();
    ASSERT_EQ(used.size(), 1u);
    ASSERT_EQ(used[0].id, head);
    ASSERT_EQ(used[0].len, 7u);
  }
  EXPECT_EQ(fq.UsedIdx(), static_cast<uint16_t>(70000));
  EXPECT_EQ(q.used_index(), static_cast<uint16_t>(70000));
}

TEST(Virtqueue, StartsFromTheGivenAvailIndex) {
  FakeGuest g;
  FakeVirtqueue fq(g, 8);
  uint64_t a = g.Alloc(16);
  for (int i = 0; i < 3; ++i) fq.Publish(fq.AddChain({{a, 16, false}}));
  VirtqueueAddress addr = fq.address();
  addr.next_avail = 2;  // the first two were handled by a previous owner
  auto q = Virtqueue::Create(MemoryOf(g), addr, true, false);
  ASSERT_TRUE(q.ok());
  DescriptorChain ch = PopOne(*q);
  EXPECT_EQ(ch.head, 2);
  auto r = q->Pop();
  ASSERT_TRUE(r.ok());
  EXPECT_FALSE(r->has_value());
}

TEST(Virtqueue, NoInterruptFlagSuppressesWithoutEventIdx) {
  FakeGuest g;
  FakeVirtqueue fq(g, 8);
  Virtqueue q = MakeQueue(g, fq, true, /*event_idx=*/false);
  q.Push(0, 1);
  EXPECT_TRUE(q.NeedsInterrupt());
  fq.SetAvailFlags(kVirtqAvailFNoInterrupt);
  q.Push(1, 1);
  EXPECT_FALSE(q.NeedsInterrupt());
}

TEST(Virtqueue, EventIdxInterruptsOnlyWhenUsedIndexPassesUsedEvent) {
  FakeGuest g;
  FakeVirtqueue fq(g, 8);
  Virtqueue q = MakeQueue(g, fq, true, /*event_idx=*/true);
  fq.SetAvailFlags(kVirtqAvailFNoInterrupt);  // must be ignored with EVENT_IDX
  fq.SetUsedEvent(3);                         // interrupt once entry 3 is used (used idx reaches 4)
  q.Push(0, 1);
  EXPECT_TRUE(q.NeedsInterrupt());  // first decision: nothing signalled yet
  q.Push(1, 1);
  EXPECT_FALSE(q.NeedsInterrupt());  // used idx 2
  q.Push(2, 1);
  EXPECT_FALSE(q.NeedsInterrupt());  // used idx 3
  q.Push(3, 1);
  EXPECT_TRUE(q.NeedsInterrupt());  // used idx 4: entry 3 written
  q.Push(4, 1);
  EXPECT_FALSE(q.NeedsInterrupt());
  // Several entries at once: the event index falls inside the batch.
  fq.SetUsedEvent(6);
  q.Push(5, 1);
  q.Push(6, 1);
  q.Push(7, 1);
  EXPECT_TRUE(q.NeedsInterrupt());
}

TEST(Virtqueue, EnableNotificationPublishesAvailEventAndReportsPendingChains) {
  FakeGuest g;
  FakeVirtqueue fq(g, 8);
  Virtqueue q = MakeQueue(g, fq, true, /*event_idx=*/true);
  uint64_t a = g.Alloc(16);
  fq.Publish(fq.AddChain({{a, 16, false}}));
  fq.Publish(fq.AddChain({{a, 16, false}}));
  PopOne(q);
  PopOne(q);
  EXPECT_FALSE(q.EnableNotification());
  EXPECT_EQ(fq.AvailEvent(), 2);
  // A chain published after the last Pop must not be missed.
  fq.Publish(fq.AddChain({{a, 16, false}}));
  EXPECT_TRUE(q.EnableNotification());
}

TEST(Virtqueue, NoNotifyFlagWithoutEventIdx) {
  FakeGuest g;
  FakeVirtqueue fq(g, 8);
  Virtqueue q = MakeQueue(g, fq, true, /*event_idx=*/false);
  q.DisableNotification();
  EXPECT_EQ(fq.UsedFlags(), kVirtqUsedFNoNotify);
  EXPECT_FALSE(q.EnableNotification());
  EXPECT_EQ(fq.UsedFlags(), 0);
}

TEST(Virtqueue, RemapKeepsIndicesAndRejectsMapsWithoutTheRings) {
  FakeGuest g;
  FakeVirtqueue fq(g, 8);
  Virtqueue q = MakeQueue(g, fq);
  uint64_t a = g.Alloc(16);
  fq.Publish(fq.AddChain({{a, 16, false}}));
  PopOne(q);
  std::vector<uint8_t> other(4096);
  auto elsewhere = GuestMemory::Create({{0, 4096, other.data(), false}});
  ASSERT_TRUE(elsewhere.ok());
  EXPECT_EQ(q.Remap(*elsewhere).error(), VirtioError::kAddressOutsideGuestMemory);
  ASSERT_TRUE(q.Remap(MemoryOf(g)).ok());
  EXPECT_EQ(q.next_avail(), 1);
  fq.Publish(fq.AddChain({{a, 16, false}}));
  EXPECT_FALSE(PopOne(q).error.has_value());
}

}  // namespace
}  // namespace kvblk
