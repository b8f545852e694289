// Crash recovery and ordering cases built by hand on a CrashFile: a cluster
// leaked past the end of the file by a crash must not be handed out again,
// and the data of an allocating write must be durable before the L2 entry
// that maps it. The sampled power-cut workloads are in crash_sim_test.cc.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "disk/qcow2_device.h"
#include "disk/qcow2_format.h"
#include "disk/refcount.h"
#include "kvblk/event_loop.h"
#include "kvblk/image_create.h"
#include "tests/support/crash_file.h"
#include "tests/support/crash_sim_util.h"
#include "tests/support/qemu_util.h"
#include "tests/support/test_util.h"

namespace kvblk::testing {
namespace {

using Kind = CrashFile::Op::Kind;

// A crash can leave a cluster past the end of the file with a nonzero
// refcount: the refcount block reached the disk (made durable for some other
// L2 table) while the write that appended the cluster was lost. qemu-img
// check calls it a leak. Builds such an image: 4k clusters, 1 MiB, cluster 4
// (the first one past the end) counted once.
std::vector<uint8_t> ImageWithClusterLeakedPastEnd(const TempDir& dir, int refcount_bits) {
  CreateOptions o;
  o.size = 1 << 20;
  o.cluster_size = 4096;
  o.refcount_bits = refcount_bits;
  std::string tmp = dir.File("fresh.qcow2");
  EXPECT_TRUE(CreateImage(tmp, o).ok());
  auto bytes = ReadFileBytes(tmp);
  // Layout of a fresh image: header, refcount table, refcount block, L1.
  EXPECT_EQ(bytes.size(), 4u * 4096);
  if (bytes.size() != 4u * 4096) return bytes;
  uint32_t order = 0;
  while ((1 << order) < refcount_bits) ++order;
  qcow2::SetRefcountEntry(&bytes[2 * 4096], 4, order, 1);
  return bytes;
}

// Opens `image`, writes 8 sectors at offset 0 (allocating an L2 table and a
// data cluster) and closes it. Returns the status of the open-and-write and
// that of the close.
std::pair<Status, Status> WriteFirstSectorsAndClose(const std::string& image) {
  OpenOptions oo;
  oo.format = "qcow2";
  auto dev = OpenImage(image, oo);
  if (!dev.ok()) return {dev.status(), Status::Ok()};
  auto data = Pattern(2, 0, 8);
  Status write = RunSync((*dev)->Write(0, data.data(), data.size()));
  Status close = CloseImage(std::move(*dev));
  return {write, close};
}

TEST(CrashRecovery, ClusterLeakedPastEndOfFileIsNotAllocatedAgain) {
  TempDir dir;
  std::string image = dir.File("img.qcow2");
  WriteFileBytes(image, ImageWithClusterLeakedPastEnd(dir, 16));
  QemuCheck before = QemuCheckOne(image);
  // qemu-img check does not even look at refcounts past the end of the file.
  ASSERT_TRUE(before.ok()) << before.output;

  auto [write, close] = WriteFirstSectorsAndClose(image);
  ASSERT_TRUE(write.ok()) << write.ToString();
  ASSERT_TRUE(close.ok()) << close.ToString();
  QemuCheck after = QemuCheckOne(image);
  EXPECT_TRUE(after.ok()) << "kvblk handed out the leaked cluster again (its refcount is now 2 "
                             "while the L2/L1 entry has COPIED set):\n"
                          << after.output;
}

TEST(CrashRecovery, WritesWorkAfterAClusterLeakedPastEndOfFileWithOneBitRefcounts) {
  TempDir dir;
  std::string image = dir.File("img.qcow2");
  WriteFileBytes(image, ImageWithClusterLeakedPastEnd(dir, 1));
  QemuCheck before = QemuCheckOne(image);
  ASSERT_TRUE(before.ok()) << before.output;

  auto [write, close] = WriteFirstSectorsAndClose(image);
  EXPECT_TRUE(write.ok()) << "open and write after crash recovery failed: " << write.ToString();
  EXPECT_TRUE(close.ok()) << close.ToString();
  EXPECT_TRUE(QemuCheckOne(image).ok());
}

// The data of an allocating write (guest data plus the copy-on-write head and
// tail) must be on disk before an L2 table that maps the new cluster can be.
// Interleaving forced here: a guest flush runs while the data write of a
// copy-on-write request is in flight, so that flush makes the new cluster's
// refcount durable; the next flush writes the L2 table.
TEST(CrashOrdering, CopyOnWriteDataIsDurableBeforeTheL2EntryThatMapsIt) {
  TempDir dir;
  constexpr uint64_t kCs = 4096;
  constexpr uint64_t kDisk = 4 << 20;  // two L2 tables: [0, 2M) and [2M, 4M)
  WriteFileBytes(dir.File("backing.raw"), Pattern(kBackingValue, 0, kDisk / kSector));
  CreateOptions o;
  o.size = kDisk;
  o.cluster_size = kCs;
  o.backing_file = "backing.raw";
  o.backing_format = "raw";
  const std::string image = dir.File("img.qcow2");
  ASSERT_TRUE(CreateImage(image, o).ok());
  auto owned = std::make_unique<CrashFile>(image, ReadFileBytes(image), 7);
  CrashFile* file = owned.get();
  OpenOptions oo;
  oo.format = "qcow2";
  auto opened = RunSync(qcow2::Qcow2Device::Open(std::move(owned), oo, 0));
  ASSERT_TRUE(opened.ok()) << opened.status().ToString();
  qcow2::Qcow2Device& dev = **opened;
  auto write = [&](uint64_t off, uint32_t value, uint64_t len) {
    auto d = Pattern(value, off / kSector, len / kSector);
    return RunSync(dev.Write(off, d.data(), d.size()));
  };
  // Both L2 tables exist and are durable.
  ASSERT_TRUE(write(0, 2, kCs).ok());
  ASSERT_TRUE(write(2 << 20, 3, kCs).ok());
  ASSERT_TRUE(RunSync(dev.Flush()).ok());
  // A completed allocating write leaves the second L2 table dirty.
  ASSERT_TRUE(write((2 << 20) + kCs, 4, kCs).ok());

  // W: one sector inside guest cluster 2, copied on write from the backing
  // file. Its data write is held in flight.
  file->HoldNextWrite();
  const uint64_t w_off = 2 * kCs + 3 * kSector;
  auto w_data = Pattern(5, w_off / kSector, 1);
  Status w_status;
  bool w_done = false;
  Spawn(dev.Write(w_off, w_data.data(), w_data.size()), [&](Status st) {
    w_status = st;
    w_done = true;
  });
  ASSERT_TRUE(DrainUntil([&] { return file->holding(); }, std::chrono::seconds(10)));
  const size_t data_op = file->held_index();
  // A guest flush meanwhile: writing back the dirty second L2 table makes
  // the refcounts durable, W's new cluster included.
  ASSERT_TRUE(RunSync(dev.Flush()).ok());
  file->ReleaseHeld();
  ASSERT_TRUE(DrainUntil([&] { return w_done; }, std::chrono::seconds(10)));
  ASSERT_TRUE(w_status.ok()) << w_status.ToString();

  // The guest flush that makes W durable writes the first L2 table.
  const uint64_t flush_issued = file->Tick();
  ASSERT_TRUE(RunSync(dev.Flush()).ok());
  const auto& hist = file->history();
  const uint64_t l2_off =
      qcow2::LoadBe64(&file->current()[dev.header().l1_table_offset]) & qcow2::kL1OffsetMask;
  size_t l2_write = hist.size();
  for (size_t i = data_op + 1; i < hist.size(); ++i) {
    if (hist[i].kind == Kind::kWrite && hist[i].offset == l2_off && hist[i].issued > flush_issued) {
      l2_write = i;
      break;
    }
  }
  ASSERT_LT(l2_write, hist.size()) << "the flush did not write the L2 table";
  bool synced_between = false;
  for (const auto& op : hist) {
    if (op.kind == Kind::kFlush && op.issued > hist[data_op].completed &&
        op.completed < hist[l2_write].issued) {
      synced_between = true;
    }
  }
  EXPECT_TRUE(synced_between) << "the L2 table mapping the new cluster was written with no "
                                 "flush after the cluster's data write";

  // What a power cut right after the L2 table write may leave: the table
  // landed, nothing else since the last completed flush did.
  auto point = file->PointAt(hist[l2_write].completed + 1);
  std::vector<CrashFile::Fate> fates(point.possible.size());
  for (size_t k = 0; k < fates.size(); ++k) {
    if (point.possible[k] == l2_write) fates[k].kind = CrashFile::Fate::Kind::kWhole;
  }
  const std::string state = dir.File("state.qcow2");
  WriteFileBytes(state, file->BuildState(point, fates));
  ASSERT_TRUE(RunSync(dev.Close()).ok());
  QemuCheck check = QemuCheckOne(state);
  EXPECT_TRUE(check.ok()) << check.output;
  OpenOptions ro;
  ro.format = "qcow2";
  ro.read_only = true;
  auto crashed = OpenImage(state, ro);
  ASSERT_TRUE(crashed.ok()) << crashed.status().ToString();
  auto got = ReadRange(**crashed, 2 * kCs, kCs);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  std::string bad;
  for (uint64_t s = 0; s < kCs / kSector; ++s) {
    const uint64_t gs = 2 * kCs / kSector + s;
    const int64_t v = Identify(&(*got)[s * kSector], gs);
    if (v != kBackingValue && !(gs == w_off / kSector && v == 5)) {
      bad += " " + std::to_string(gs) + "=" + (v < 0 ? std::string("garbage") : std::to_string(v));
    }
  }
  EXPECT_EQ(bad, "") << "guest sectors of cluster 2 (sector=value; 0 is zeros) after the "
                        "crash: they never held anything but the backing file's data (value "
                     << kBackingValue << "), or W's (value 5) for sector " << w_off / kSector;
}

}  // namespace
}  // namespace kvblk::testing
