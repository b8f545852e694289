// I/O error injection under Qcow2Device: EIO and ENOSPC on data writes,
// metadata writes (L2 table, refcount block, L1 entry, header), reads and
// flushes, through MemFile's hook. Every case asserts
//  - the exact error the request reports (IoError for EIO, NoSpace for
//    ENOSPC);
//  - that no request is left waiting (the loop drains);
//  - that later requests work once the fault is gone, and a failed flush is
//    never reported as a success;
//  - that the image stays consistent: `qemu-img check` finds no corruption
//    after closing (leaks only where an allocation was in flight), and data
//    whose write and flush succeeded reads back after reopening.
#include <gtest/gtest.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "disk/mem_file.h"
#include "disk/qcow2_device.h"
#include "disk/qcow2_format.h"
#include "kvblk/event_loop.h"
#include "kvblk/image_create.h"
#include "tests/support/qemu_util.h"
#include "tests/support/test_util.h"

namespace kvblk::testing {
namespace {

using Kind = MemFileEvent::Kind;
using qcow2::Qcow2Device;

constexpr uint64_t kCs = 4096;
constexpr uint64_t kAll = std::numeric_limits<uint64_t>::max();

// Fails matching operations with `err`.
struct Fault {
  Kind kind = Kind::kWrite;
  uint64_t begin = 0;  // host byte range the operation must overlap (not for flushes)
  uint64_t end = kAll;
  int err = EIO;
  int skip = 0;    // let this many matching operations pass first
  int times = -1;  // fail this many, or -1: until cleared
  int hits = 0;
};

std::string Fill(uint64_t len, uint32_t seed) {
  auto v = PatternBytes(len, seed);
  return std::string(v.begin(), v.end());
}

class ErrorInjection : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_NO_FATAL_FAILURE(CreateAndOpen(CreateOptions())); }
  void TearDown() override {
    faults_.clear();
    if (dev_) {
      Status st = RunSync(dev_->Close());
      (void)st;
    }
  }

  // A fresh image: 4k clusters, 16 MiB unless `o` says otherwise. Layout:
  // header, refcount table, refcount block, L1 table; the first cluster
  // allocated is at 16k.
  void CreateAndOpen(CreateOptions o) {
    if (o.size == 0) o.size = 16 << 20;
    if (o.cluster_size == 65536) o.cluster_size = kCs;
    cluster_size_ = o.cluster_size;
    path_ = dir_.File("img.qcow2");
    Status st = CreateImage(path_, o);
    ASSERT_TRUE(st.ok()) << st.ToString();
    data_ = std::make_shared<MemFileData>();
    data_->bytes = ReadFileBytes(path_);
    ASSERT_NO_FATAL_FAILURE(Open(false));
  }

  void Open(bool read_only) {
    auto file = std::make_unique<MemFile>(data_, path_, read_only);
    file->SetHook([this](const MemFileEvent& e) { return OnEvent(e); });
    OpenOptions oo;
    oo.format = "qcow2";
    oo.read_only = read_only;
    auto dev = RunSync(Qcow2Device::Open(std::move(file), oo, 0));
    ASSERT_TRUE(dev.ok()) << dev.status().ToString();
    dev_ = std::move(*dev);
  }

  int OnEvent(const MemFileEvent& e) {
    for (Fault& f : faults_) {
      if (f.kind != e.kind) continue;
      if (e.kind != Kind::kFlush && (e.offset + e.length <= f.begin || e.offset >= f.end)) continue;
      if (f.skip > 0) {
        --f.skip;
        continue;
      }
      if (f.times == 0) continue;
      if (f.times > 0) --f.times;
      ++f.hits;
      return f.err;
    }
    return 0;
  }

  Fault& Inject(Fault f) {
    faults_.push_back(f);
    return faults_.back();
  }
  int Hits() const {
    int n = 0;
    for (const Fault& f : faults_) n += f.hits;
    return n;
  }

  // Runs `tasks` concurrently to completion. Fails (instead of hanging) if
  // the loop runs out of work while one of them is still waiting.
  std::vector<Status> RunAll(std::vector<Task<Status>> tasks) {
    std::vector<Status> out(tasks.size());
    size_t done = 0;
    for (size_t i = 0; i < tasks.size(); ++i) {
      Spawn(std::move(tasks[i]), [&out, &done, i](Status st) {
        out[i] = std::move(st);
        ++done;
      });
    }
    EventLoop& loop = EventLoop::Current();
    int idle = 0;
    while (done < out.size() && idle < 1000) idle = loop.RunOnce() ? 0 : idle + 1;
    EXPECT_EQ(done, out.size()) << "requests left waiting: the loop has nothing left to run";
    return out;
  }
  Status Run(Task<Status> t) {
    std::vector<Task<Status>> v;
    v.push_back(std::move(t));
    return RunAll(std::move(v))[0];
  }

  Task<Status> WriteTask(uint64_t off, const std::string& data) {
    co_return co_await dev_->Write(off, data.data(), data.size());
  }
  Status Write(uint64_t off, const std::string& data) { return Run(WriteTask(off, data)); }
  Status Flush() { return Run(dev_->Flush()); }
  Result<std::string> Read(uint64_t off, uint64_t len) {
    std::string buf(len, '\0');
    Status st = Run(dev_->Read(off, buf.data(), buf.size()));
    if (!st.ok()) return st;
    return buf;
  }
  void ExpectReads(uint64_t off, const std::string& want) {
    auto got = Read(off, want.size());
    ASSERT_TRUE(got.ok()) << got.status().ToString();
    EXPECT_TRUE(*got == want) << "wrong data at guest offset " << off;
  }

  // Host offsets of metadata.
  uint64_t L1Offset() const { return dev_->header().l1_table_offset; }
  uint64_t RefBlockOffset() const { return dev_->refcounts().table()[0]; }
  uint64_t L2Offset(uint64_t l1_index) {
    std::lock_guard<std::mutex> l(data_->mu);
    return qcow2::LoadBe64(&data_->bytes[L1Offset() + 8 * l1_index]) & qcow2::kL1OffsetMask;
  }
  uint64_t HostOffset(uint64_t guest) {
    auto bs = RunSync(dev_->GetBlockStatus(guest, cluster_size_));
    EXPECT_TRUE(bs.ok() && bs->host_offset.has_value()) << "guest " << guest << " not mapped";
    return bs.ok() && bs->host_offset ? *bs->host_offset : 0;
  }
  uint64_t FileSize() {
    std::lock_guard<std::mutex> l(data_->mu);
    return data_->bytes.size();
  }

  // Closes the device (faults removed) and runs `qemu-img check` on the
  // bytes: no corruption, and no leak unless `leaks_allowed`.
  void CloseAndCheck(bool leaks_allowed) {
    faults_.clear();
    Status st = RunSync(dev_->Close());
    EXPECT_TRUE(st.ok()) << "close: " << st.ToString();
    dev_.reset();
    std::string dump = dir_.File("dump.qcow2");
    {
      std::lock_guard<std::mutex> l(data_->mu);
      WriteFileBytes(dump, data_->bytes);
    }
    CommandResult r = Sh("qemu-img check --output=json " + ShellQuote(dump));
    EXPECT_TRUE(r.exit_code == 0 || (leaks_allowed && r.exit_code == 3))
        << "qemu-img check exit " << r.exit_code << ":\n"
        << r.output;
    // qemu-img leaves "corruptions" out of its JSON when there are none.
    EXPECT_EQ(r.output.find("\"corruptions\""), std::string::npos) << r.output;
    EXPECT_NE(r.output.find("\"check-errors\": 0,"), std::string::npos) << r.output;
  }
  // CloseAndCheck, then opens the bytes again.
  void Reopen(bool leaks_allowed) {
    ASSERT_NO_FATAL_FAILURE(CloseAndCheck(leaks_allowed));
    ASSERT_NO_FATAL_FAILURE(Open(false));
  }

  TempDir dir_;
  std::string path_;
  uint64_t cluster_size_ = kCs;
  std::shared_ptr<MemFileData> data_;
  std::deque<Fault> faults_;
  std::unique_ptr<Qcow2Device> dev_;
};

// --- data writes -------------------------------------------------------------

TEST_F(ErrorInjection, DataWriteErrorFailsAnInPlaceWriteWithIoError) {
  const std::string a = Fill(kCs, 1), b = Fill(kCs, 2);
  ASSERT_TRUE(Write(0, a).ok());
  ASSERT_TRUE(Flush().ok());
  const uint64_t host = HostOffset(0);
  Inject({Kind::kWrite, host, host + kCs, EIO});
  Status st = Write(0, b);
  EXPECT_EQ(st.code(), StatusCode::kIoError) << st.ToString();
  EXPECT_EQ(Hits(), 1);
  faults_.clear();
  ASSERT_TRUE(Write(0, b).ok());
  ExpectReads(0, b);
  ASSERT_TRUE(Flush().ok());
  ASSERT_NO_FATAL_FAILURE(Reopen(/*leaks_allowed=*/false));
  ExpectReads(0, b);
}

TEST_F(ErrorInjection, NoSpaceOnAnAllocatingDataWriteIsReportedAsNoSpace) {
  const std::string a = Fill(kCs, 1), b = Fill(3 * kCs, 2);
  ASSERT_TRUE(Write(0, a).ok());  // the L2 table exists from here on
  ASSERT_TRUE(Flush().ok());
  // Every write past the current end of the file: the new data clusters.
  Inject({Kind::kWrite, FileSize(), kAll, ENOSPC});
  Status st = Write(8 * kCs, b);
  EXPECT_EQ(st.code(), StatusCode::kNoSpace) << st.ToString();
  EXPECT_GE(Hits(), 1);
  faults_.clear();
  ASSERT_TRUE(Write(8 * kCs, b).ok());
  ExpectReads(8 * kCs, b);
  ASSERT_TRUE(Flush().ok());
  ASSERT_NO_FATAL_FAILURE(Reopen(/*leaks_allowed=*/true));
  ExpectReads(0, a);
  ExpectReads(8 * kCs, b);
}

// --- metadata writes -----------------------------------------------------------

TEST_F(ErrorInjection, NewL2TableWriteErrorFailsTheWriteAndLaterWritesWork) {
  const std::string a = Fill(kCs, 3);
  const uint64_t next = FileSize();  // where a fresh image puts its first L2 table
  Inject({Kind::kWrite, next, next + kCs, EIO, 0, 1});
  Status st = Write(0, a);
  EXPECT_EQ(st.code(), StatusCode::kIoError) << st.ToString();
  EXPECT_EQ(Hits(), 1);
  faults_.clear();
  ASSERT_TRUE(Write(0, a).ok());
  ASSERT_TRUE(Flush().ok());
  ASSERT_NO_FATAL_FAILURE(Reopen(/*leaks_allowed=*/true));
  ExpectReads(0, a);
}

TEST_F(ErrorInjection, L1EntryWriteErrorFailsTheWriteAndLaterWritesWork) {
  const std::string a = Fill(kCs, 4);
  Inject({Kind::kWrite, L1Offset(), L1Offset() + 8, EIO});
  Status st = Write(0, a);
  EXPECT_EQ(st.code(), StatusCode::kIoError) << st.ToString();
  EXPECT_EQ(Hits(), 1);
  ExpectReads(0, std::string(kCs, '\0'));
  faults_.clear();
  ASSERT_TRUE(Write(0, a).ok());
  ASSERT_TRUE(Flush().ok());
  ASSERT_NO_FATAL_FAILURE(Reopen(/*leaks_allowed=*/true));
  ExpectReads(0, a);
}

TEST_F(ErrorInjection, RefcountBlockWriteErrorFailsTheAllocatingWrite) {
  const std::string a = Fill(kCs, 5);
  const uint64_t rb = RefBlockOffset();
  Inject({Kind::kWrite, rb, rb + kCs, ENOSPC});
  Status st = Write(0, a);  // new L2 table: its refcount must be durable first
  EXPECT_EQ(st.code(), StatusCode::kNoSpace) << st.ToString();
  EXPECT_GE(Hits(), 1);
  faults_.clear();
  ASSERT_TRUE(Write(0, a).ok());
  ASSERT_TRUE(Flush().ok());
  ASSERT_NO_FATAL_FAILURE(Reopen(/*leaks_allowed=*/true));
  ExpectReads(0, a);
}

TEST_F(ErrorInjection, L2WriteBackErrorFailsTheFlushAndARetryMakesTheDataDurable) {
  const std::string a = Fill(kCs, 6), b = Fill(kCs, 7);
  ASSERT_TRUE(Write(0, a).ok());
  ASSERT_TRUE(Flush().ok());
  ASSERT_TRUE(Write(kCs, b).ok());  // allocating: the L2 table is dirty
  const uint64_t l2 = L2Offset(0);
  Inject({Kind::kWrite, l2, l2 + kCs, EIO});
  Status st = Flush();
  EXPECT_EQ(st.code(), StatusCode::kIoError)
      << "a flush whose L2 write-back failed: " << st.ToString();
  EXPECT_GE(Hits(), 1);
  st = Flush();
  EXPECT_EQ(st.code(), StatusCode::kIoError) << "the table is still not on disk: " << st.ToString();
  faults_.clear();
  ASSERT_TRUE(Flush().ok());
  ASSERT_NO_FATAL_FAILURE(Reopen(/*leaks_allowed=*/false));
  ExpectReads(0, a);
  ExpectReads(kCs, b);
}

TEST_F(ErrorInjection, RefcountBlockWriteErrorDuringFlushFailsTheFlush) {
  // b is larger than the allocator's pool of pre-allocated clusters (whose
  // refcounts the first flush made durable), so it raises refcounts anew.
  const std::string a = Fill(kCs, 8), b = Fill(256 * kCs, 9);
  ASSERT_TRUE(Write(0, a).ok());
  ASSERT_TRUE(Flush().ok());
  ASSERT_TRUE(Write(4 * kCs, b).ok());  // raises refcounts in the cached block
  const uint64_t rb = RefBlockOffset();
  Inject({Kind::kWrite, rb, rb + kCs, ENOSPC});
  Status st = Flush();
  EXPECT_EQ(st.code(), StatusCode::kNoSpace) << st.ToString();
  EXPECT_GE(Hits(), 1);
  faults_.clear();
  ASSERT_TRUE(Flush().ok());
  ASSERT_NO_FATAL_FAILURE(Reopen(/*leaks_allowed=*/false));
  ExpectReads(4 * kCs, b);
}

// 512-byte clusters with 64-bit refcounts: the refcount table (64 entries)
// covers 2 MiB of host file, so sequential 32 KiB writes soon grow it. The
// header write that switches to the new table fails.
class HeaderFault : public ErrorInjection {
 protected:
  static constexpr uint64_t kChunk = 32 << 10;
  void SetUp() override {
    CreateOptions o;
    o.cluster_size = 512;
    o.refcount_bits = 64;
    o.size = 8 << 20;
    ASSERT_NO_FATAL_FAILURE(CreateAndOpen(o));
    table_clusters_ = dev_->header().refcount_table_clusters;
    table_offset_ = dev_->header().refcount_table_offset;
    Inject({Kind::kWrite, 0, 512, EIO});
    for (uint64_t i = 0; i < 200 && failed_.ok(); ++i) {
      chunks_.push_back(Fill(kChunk, 100 + static_cast<uint32_t>(i)));
      failed_ = Write(i * kChunk, chunks_.back());
    }
    ASSERT_FALSE(failed_.ok()) << "the refcount table never grew";
  }
  uint32_t table_clusters_ = 0;
  uint64_t table_offset_ = 0;
  std::vector<std::string> chunks_;
  Status failed_;
};

TEST_F(HeaderFault, HeaderWriteErrorDuringRefcountTableGrowthFailsTheWrite) {
  EXPECT_EQ(failed_.code(), StatusCode::kIoError) << failed_.ToString();
  EXPECT_EQ(Hits(), 1);
  faults_.clear();
  const uint64_t failed_index = chunks_.size() - 1;
  for (uint64_t i = failed_index; i < failed_index + 8; ++i) {
    if (i > failed_index) chunks_.push_back(Fill(kChunk, 100 + static_cast<uint32_t>(i)));
    Status st = Write(i * kChunk, chunks_[i]);
    ASSERT_TRUE(st.ok()) << "write " << i << " after the fault was removed: " << st.ToString();
  }
  ASSERT_TRUE(Flush().ok());
  EXPECT_GT(dev_->header().refcount_table_clusters, table_clusters_);
  ASSERT_NO_FATAL_FAILURE(Reopen(/*leaks_allowed=*/true));
  for (uint64_t i = 0; i < chunks_.size(); ++i) ExpectReads(i * kChunk, chunks_[i]);
}

// The header in memory must keep describing the header on disk: a later
// header rewrite would otherwise switch to a refcount table that the
// refcount code no longer maintains.
TEST_F(HeaderFault, FailedHeaderWriteLeavesTheInMemoryRefcountTableFieldsUnchanged) {
  EXPECT_EQ(dev_->header().refcount_table_clusters, table_clusters_);
  EXPECT_EQ(dev_->header().refcount_table_offset, table_offset_);
  EXPECT_EQ(dev_->header().refcount_table_offset, dev_->refcounts().table_offset());
}

// --- reads -------------------------------------------------------------------

TEST_F(ErrorInjection, DataReadErrorFailsTheReadWithIoError) {
  const std::string a = Fill(2 * kCs, 10);
  ASSERT_TRUE(Write(0, a).ok());
  ASSERT_TRUE(Flush().ok());
  Inject({Kind::kRead, HostOffset(kCs), HostOffset(kCs) + kCs, EIO});
  auto got = Read(0, 2 * kCs);
  ASSERT_FALSE(got.ok());
  EXPECT_EQ(got.status().code(), StatusCode::kIoError) << got.status().ToString();
  faults_.clear();
  ExpectReads(0, a);
  ASSERT_NO_FATAL_FAILURE(CloseAndCheck(/*leaks_allowed=*/false));
}

TEST_F(ErrorInjection, L2TableReadErrorIsNotCachedAndWakesEveryWaiter) {
  const std::string a = Fill(kCs, 11);
  ASSERT_TRUE(Write(0, a).ok());
  ASSERT_NO_FATAL_FAILURE(Reopen(/*leaks_allowed=*/false));  // empty L2 cache
  const uint64_t l2 = L2Offset(0);
  Inject({Kind::kRead, l2, l2 + kCs, EIO});
  std::string b1(kCs, '\0'), b2(kCs, '\0'), b3(512, '\0');
  std::vector<Task<Status>> reads;
  reads.push_back(dev_->Read(0, b1.data(), b1.size()));
  reads.push_back(dev_->Read(0, b2.data(), b2.size()));
  reads.push_back(dev_->Read(512, b3.data(), b3.size()));
  for (const Status& st : RunAll(std::move(reads))) {
    EXPECT_EQ(st.code(), StatusCode::kIoError) << st.ToString();
  }
  // A write that needs the same table fails the same way.
  Status st = Write(kCs, Fill(kCs, 12));
  EXPECT_EQ(st.code(), StatusCode::kIoError) << st.ToString();
  faults_.clear();
  ExpectReads(0, a);
  ASSERT_NO_FATAL_FAILURE(CloseAndCheck(/*leaks_allowed=*/false));
}

TEST_F(ErrorInjection, ReadErrorDuringCopyOnWriteFailsTheWrite) {
  // A compressed cluster: a partial write must copy the rest of it.
  std::string packed(kCs, 'k');
  Status st = Run(dev_->WriteCompressed(0, packed.data(), packed.size()));
  ASSERT_TRUE(st.ok()) << st.ToString();
  ASSERT_TRUE(Flush().ok());
  Inject({Kind::kRead, 0, kAll, EIO, 0, 1});
  const std::string part = Fill(512, 13);
  st = Write(512, part);
  EXPECT_EQ(st.code(), StatusCode::kIoError) << st.ToString();
  EXPECT_EQ(Hits(), 1);
  ExpectReads(0, packed);
  faults_.clear();
  ASSERT_TRUE(Write(512, part).ok());
  std::string want = packed;
  want.replace(512, 512, part);
  ExpectReads(0, want);
  ASSERT_TRUE(Flush().ok());
  ASSERT_NO_FATAL_FAILURE(Reopen(/*leaks_allowed=*/true));
  ExpectReads(0, want);
}

// --- flushes -------------------------------------------------------------------

TEST_F(ErrorInjection, HostFlushErrorFailsTheGuestFlush) {
  const std::string a = Fill(kCs, 14);
  ASSERT_TRUE(Write(0, a).ok());
  for (int err : {EIO, ENOSPC}) {
    Inject({Kind::kFlush, 0, kAll, err});
    Status st = Flush();
    EXPECT_EQ(st.code(), err == EIO ? StatusCode::kIoError : StatusCode::kNoSpace)
        << "errno " << err << ": " << st.ToString();
    EXPECT_GE(Hits(), 1);
    faults_.clear();
  }
  ASSERT_TRUE(Flush().ok());
  ASSERT_NO_FATAL_FAILURE(Reopen(/*leaks_allowed=*/true));
  ExpectReads(0, a);
}

TEST_F(ErrorInjection, HostFlushErrorBeforeTheL1UpdateFailsTheWrite) {
  const std::string a = Fill(kCs, 15);
  // A new L2 table is synced before the L1 entry may point to it.
  Inject({Kind::kFlush, 0, kAll, EIO});
  Status st = Write(0, a);
  EXPECT_EQ(st.code(), StatusCode::kIoError) << st.ToString();
  EXPECT_GE(Hits(), 1);
  {
    std::lock_guard<std::mutex> l(data_->mu);
    EXPECT_EQ(qcow2::LoadBe64(&data_->bytes[L1Offset()]), 0u)
        << "the L1 entry was written although the table's sync failed";
  }
  faults_.clear();
  ASSERT_TRUE(Write(0, a).ok());
  ASSERT_TRUE(Flush().ok());
  ASSERT_NO_FATAL_FAILURE(Reopen(/*leaks_allowed=*/true));
  ExpectReads(0, a);
}

TEST_F(ErrorInjection, FlushErrorAfterFreeingClustersFailsTheGuestFlush) {
  const std::string a = Fill(4 * kCs, 16);
  ASSERT_TRUE(Write(0, a).ok());
  ASSERT_TRUE(Flush().ok());
  ASSERT_TRUE(Run(dev_->Discard(kCs, 2 * kCs)).ok());
  // The first sync (L2 entries cleared) passes; the one after the
  // refcounts dropped fails.
  Inject({Kind::kFlush, 0, kAll, EIO, /*skip=*/1});
  Status st = Flush();
  EXPECT_EQ(st.code(), StatusCode::kIoError) << st.ToString();
  EXPECT_EQ(Hits(), 1);
  faults_.clear();
  ASSERT_TRUE(Flush().ok());
  ASSERT_NO_FATAL_FAILURE(Reopen(/*leaks_allowed=*/false));
  ExpectReads(0, a.substr(0, kCs));
  ExpectReads(3 * kCs, a.substr(3 * kCs));
  ExpectReads(kCs, std::string(2 * kCs, '\0'));
}

TEST_F(ErrorInjection, HostDiscardErrorIsAdvisory) {
  const std::string a = Fill(2 * kCs, 17);
  ASSERT_TRUE(Write(0, a).ok());
  ASSERT_TRUE(Flush().ok());
  ASSERT_TRUE(Run(dev_->Discard(0, kCs)).ok());
  Inject({Kind::kDiscard, 0, kAll, EIO});
  EXPECT_TRUE(Flush().ok());
  faults_.clear();
  ASSERT_NO_FATAL_FAILURE(Reopen(/*leaks_allowed=*/false));
  ExpectReads(0, std::string(kCs, '\0'));
  ExpectReads(kCs, a.substr(kCs));
}

// Requests in flight when a flush fails: each one reports success or the
// exact error, none is left waiting, and the failed ones can be repeated.
TEST_F(ErrorInjection, FlushErrorsWithRequestsInFlightLeaveNoneWaiting) {
  ASSERT_TRUE(Write(0, Fill(kCs, 18)).ok());
  ASSERT_TRUE(Flush().ok());
  Inject({Kind::kFlush, 0, kAll, EIO});
  // Guest offsets in L1 entries 0 (table exists) and 1..3 (new tables, whose
  // creation syncs); two writes share each new table.
  std::vector<uint64_t> offsets = {kCs,     2 * kCs,         2 << 20, (2 << 20) + 3 * kCs,
                                   4 << 20, (4 << 20) + kCs, 6 << 20};
  std::vector<std::string> data;
  std::vector<Task<Status>> tasks;
  for (size_t i = 0; i < offsets.size(); ++i) {
    data.push_back(Fill(kCs, 200 + static_cast<uint32_t>(i)));
  }
  for (size_t i = 0; i < offsets.size(); ++i) tasks.push_back(WriteTask(offsets[i], data[i]));
  tasks.push_back(dev_->Flush());
  tasks.push_back(dev_->Flush());
  auto results = RunAll(std::move(tasks));
  int failed = 0;
  for (size_t i = 0; i < results.size(); ++i) {
    const Status& st = results[i];
    EXPECT_TRUE(st.ok() || st.code() == StatusCode::kIoError) << i << ": " << st.ToString();
    if (!st.ok()) ++failed;
  }
  EXPECT_FALSE(results[offsets.size()].ok()) << "a flush reported success while syncs fail";
  EXPECT_FALSE(results[offsets.size() + 1].ok()) << "a flush reported success while syncs fail";
  EXPECT_TRUE(results[0].ok() && results[1].ok()) << "writes that need no sync failed";
  EXPECT_GE(failed, 3);
  faults_.clear();
  for (size_t i = 0; i < offsets.size(); ++i) {
    if (!results[i].ok()) {
      ASSERT_TRUE(Write(offsets[i], data[i]).ok()) << i;
    }
  }
  ASSERT_TRUE(Flush().ok());
  ASSERT_NO_FATAL_FAILURE(Reopen(/*leaks_allowed=*/true));
  for (size_t i = 0; i < offsets.size(); ++i) ExpectReads(offsets[i], data[i]);
}

// Once the device has found corruption it refuses further writes; a flush
// after that must not report success for earlier writes whose metadata it
// did not write.
TEST_F(ErrorInjection, FlushAfterCorruptionWasFoundNeverClaimsUnwrittenDataIsDurable) {
  ASSERT_TRUE(Write(0, Fill(kCs, 19)).ok());
  ASSERT_TRUE(Write(2 << 20, Fill(kCs, 20)).ok());  // second L2 table
  ASSERT_TRUE(Flush().ok());
  const uint64_t l2 = L2Offset(1);
  ASSERT_NO_FATAL_FAILURE(CloseAndCheck(/*leaks_allowed=*/false));
  {
    // A reserved bit in the second table's first entry.
    std::lock_guard<std::mutex> l(data_->mu);
    data_->bytes[l2 + 7] |= 0x02;
  }
  ASSERT_NO_FATAL_FAILURE(Open(false));
  const std::string b = Fill(kCs, 21);
  ASSERT_TRUE(Write(kCs, b).ok());  // allocating, in the first (healthy) table
  auto bad = Read(2 << 20, kCs);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), StatusCode::kCorruption) << bad.status().ToString();
  Status st = Flush();
  Status cs = RunSync(dev_->Close());
  dev_.reset();
  if (st.ok()) {
    // The flush claimed the write is durable: it must be.
    ASSERT_NO_FATAL_FAILURE(Open(/*read_only=*/true));
    auto got = Read(kCs, kCs);
    ASSERT_TRUE(got.ok()) << got.status().ToString();
    EXPECT_TRUE(*got == b) << "Flush() returned OK after corruption was detected, but the "
                              "write that completed before it is not on disk (close: "
                           << cs.ToString() << ")";
  }
}

}  // namespace
}  // namespace kvblk::testing
