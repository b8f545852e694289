// kvblk convert: copies an image, through its whole backing chain, into a
// new image of another (or the same) format (qemu-img convert).
//
// The virtual disk is copied in kChunkBytes chunks by kWorkers coroutines on
// the calling thread's event loop. Ranges the source reports as zero, and
// 4 KiB blocks that read back as all zeros, are not written, so the
// destination stays sparse. With -c every cluster that holds data is written
// compressed.
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "kvblk/block_device.h"
#include "kvblk/event_loop.h"
#include "kvblk/image_create.h"
#include "kvblk/task.h"
#include "tools/backing_chain.h"
#include "tools/cli_util.h"
#include "tools/commands.h"
#include "tools/image_options.h"

namespace kvblk::cli {

namespace {

constexpr const char* kCmd = "convert";
constexpr uint64_t kChunkBytes = 2 << 20;
constexpr uint64_t kZeroGranule = 4096;
constexpr int kWorkers = 8;

std::vector<OptionSpec> ConvertSpecs() {
  return {
      {'f', "", "FMT", "source format: qcow2 or raw (default: probed from the file)"},
      {'O', "", "FMT", "destination format: raw (default) or qcow2"},
      {'o', "", "OPTIONS",
       "destination format options as for 'kvblk create' (not size or backing_file); "
       "'-o help' lists them"},
      {'c', "", "", "write every data cluster compressed (qcow2 destination only)"},
      {'p', "", "", "show progress on stderr"},
      {'q', "", "", "quiet: no progress"},
      HelpOption(),
  };
}

void PrintHelp() {
  std::printf(
      "usage: kvblk convert [-f FMT] [-O FMT] [-o OPTIONS] [-c] [-p] [-q] SRC DST\n"
      "\n"
      "Creates DST (replacing an existing file) with SRC's virtual size and copies what\n"
      "a guest would read from SRC, including data from its backing files. DST has no\n"
      "backing file. Zero and unallocated ranges are skipped, so DST is sparse. If the\n"
      "copy fails, DST is removed.\n"
      "\n"
      "%s",
      FormatOptionHelp(ConvertSpecs()).c_str());
}

// Shared state of the copy workers. Only touched from the event loop thread.
struct CopyJob {
  BlockDevice* src = nullptr;
  BlockDevice* dst = nullptr;
  uint64_t size = 0;
  uint64_t chunk_bytes = kChunkBytes;
  uint64_t cluster_bytes = 0;  // for compression
  bool compress = false;
  uint64_t next_chunk = 0;
  uint64_t chunk_count = 0;
  int running = 0;
  Status first_error;
  ProgressBar* progress = nullptr;
};

bool AllZero(const uint8_t* data, uint64_t length) {
  for (uint64_t i = 0; i < length; ++i) {
    if (data[i] != 0) return false;
  }
  return true;
}

// Reads [start, start + length) of the source into `buf`; ranges reported as
// zero are filled with zeros instead of read. Returns whether anything was
// read (false: the whole chunk is zero).
Task<Result<bool>> FillChunk(CopyJob& job, uint64_t start, uint64_t length, uint8_t* buf) {
  bool any_data = false;
  uint64_t offset = start;
  const uint64_t end = start + length;
  while (offset < end) {
    Result<BlockStatus> st = co_await job.src->GetBlockStatus(offset, end - offset);
    if (!st.ok()) co_return st.status();
    uint64_t n = st->length;
    if (n == 0 || n > end - offset) {
      co_return Status::Corruption("source block status at offset " + std::to_string(offset) +
                                   " has an invalid length " + std::to_string(n));
    }
    uint8_t* dest = buf + (offset - start);
    if (st->zero) {
      std::memset(dest, 0, n);
    } else {
      KVBLK_CO_RETURN_IF_ERROR(co_await job.src->Read(offset, dest, n));
      any_data = true;
    }
    offset += n;
  }
  co_return any_data;
}

Task<Status> CopyChunk(CopyJob& job, uint64_t start, uint64_t length, uint8_t* buf) {
  Result<bool> any_data = co_await FillChunk(job, start, length, buf);
  if (!any_data.ok()) co_return any_data.status();
  if (!*any_data) co_return Status::Ok();
  if (job.compress) {
    for (uint64_t pos = 0; pos < length; pos += job.cluster_bytes) {
      uint64_t n = std::min(job.cluster_bytes, length - pos);
      if (AllZero(buf + pos, n)) continue;
      KVBLK_CO_RETURN_IF_ERROR(co_await job.dst->WriteCompressed(start + pos, buf + pos, n));
    }
    co_return Status::Ok();
  }
  // Write each run of granules that are not all zeros.
  uint64_t pos = 0;
  while (pos < length) {
    uint64_t n = std::min(kZeroGranule, length - pos);
    if (AllZero(buf + pos, n)) {
      pos += n;
      continue;
    }
    uint64_t run_end = pos + n;
    while (run_end < length) {
      uint64_t m = std::min(kZeroGranule, length - run_end);
      if (AllZero(buf + run_end, m)) break;
      run_end += m;
    }
    KVBLK_CO_RETURN_IF_ERROR(co_await job.dst->Write(start + pos, buf + pos, run_end - pos));
    pos = run_end;
  }
  co_return Status::Ok();
}

// Copies chunks until none is left or some worker failed.
Task<Status> CopyWorker(CopyJob& job) {
  Result<AlignedBuffer> buf = AllocateAlignedBuffer(job.chunk_bytes);
  if (!buf.ok()) co_return buf.status();
  while (job.first_error.ok() && job.next_chunk < job.chunk_count) {
    uint64_t start = job.next_chunk++ * job.chunk_bytes;
    uint64_t length = std::min(job.chunk_bytes, job.size - start);
    KVBLK_CO_RETURN_IF_ERROR(co_await CopyChunk(job, start, length, buf->get()));
    job.progress->Add(length);
  }
  co_return Status::Ok();
}

// Runs the workers on this thread's loop until all have finished. Returns
// the first error any of them hit.
Status CopyAll(CopyJob& job) {
  job.chunk_count = (job.size + job.chunk_bytes - 1) / job.chunk_bytes;
  int workers = static_cast<int>(std::min<uint64_t>(kWorkers, job.chunk_count));
  for (int i = 0; i < workers; ++i) {
    ++job.running;
    Spawn(CopyWorker(job), [&job](Status st) {
      if (!st.ok() && job.first_error.ok()) job.first_error = st;
      --job.running;
    });
  }
  EventLoop::Current().RunUntil([&job] { return job.running == 0; });
  return job.first_error;
}

// InvalidArgument if `dst` is SRC or one of its backing files: creating it
// would destroy the data being copied.
Status CheckDestinationIsNotSource(const std::string& src, const std::string& src_format,
                                   const std::string& dst) {
  struct stat dst_stat;
  if (stat(dst.c_str(), &dst_stat) != 0) return Status::Ok();  // does not exist yet
  Result<std::vector<ChainImage>> chain = ReadBackingChain(src, src_format);
  if (!chain.ok()) return chain.status();
  for (const ChainImage& image : *chain) {
    struct stat st;
    if (stat(image.path.c_str(), &st) == 0 && st.st_dev == dst_stat.st_dev &&
        st.st_ino == dst_stat.st_ino) {
      if (image.path == src) {
        return Status::InvalidArgument("destination '" + dst + "' is the source image");
      }
      return Status::InvalidArgument(
          "destination '" + dst + "' is a backing file of the source image ('" + image.path + "')");
    }
  }
  return Status::Ok();
}

// Everything the copy needs, validated before DST is touched.
struct ConvertPlan {
  std::string src;
  std::string dst;
  OpenOptions src_open;
  ImageOptions dst_options;
  bool compress = false;
  bool progress = false;
};

// Copies into the freshly created DST. On error DST may hold partial data.
Status CopyInto(const ConvertPlan& plan, BlockDevice& src) {
  OpenOptions dst_open;
  dst_open.format = plan.dst_options.create.format;
  dst_open.open_backing = false;
  Result<std::unique_ptr<BlockDevice>> dst = OpenImage(plan.dst, dst_open);
  if (!dst.ok()) return dst.status();
  CopyJob job;
  job.src = &src;
  job.dst = dst->get();
  job.size = src.size();
  job.compress = plan.compress;
  if (plan.compress) {
    Result<ImageInfo> info = (*dst)->Info();
    if (!info.ok() || info->cluster_size == 0) {
      Status closed = CloseImage(std::move(*dst));
      (void)closed;
      return info.ok() ? Status::InvalidArgument("compression needs a qcow2 destination")
                       : info.status();
    }
    job.cluster_bytes = info->cluster_size;
    job.chunk_bytes = (kChunkBytes + job.cluster_bytes - 1) / job.cluster_bytes * job.cluster_bytes;
  }
  ProgressBar progress(plan.progress, job.size);
  job.progress = &progress;
  Status copied = CopyAll(job);
  if (copied.ok()) progress.Finish();
  Status closed = CloseImage(std::move(*dst));
  return copied.ok() ? closed : copied;
}

Result<ConvertPlan> MakePlan(const ParsedArgs& a) {
  ConvertPlan plan;
  const std::vector<std::string>& pos = a.positional();
  if (pos.size() < 2) return Status::InvalidArgument("expected SRC and DST");
  if (pos.size() > 2) return Status::InvalidArgument("unexpected argument '" + pos[2] + "'");
  plan.src = pos[0];
  plan.dst = pos[1];
  if (plan.dst.empty()) return Status::InvalidArgument("the destination file name is empty");
  plan.src_open.format = a.Get("f");
  plan.src_open.read_only = true;
  if (a.Has("f")) KVBLK_RETURN_IF_ERROR(CheckFormatName(plan.src_open.format, "format"));
  std::string out_format = a.Get("O", "raw");
  KVBLK_ASSIGN_OR_RETURN(plan.dst_options, ParseImageOptions(out_format, a.GetAll("o")));
  for (const char* name : {"size", "backing_file", "backing_fmt"}) {
    if (plan.dst_options.given.count(name) > 0) {
      return Status::InvalidArgument(std::string("option '") + name +
                                     "' cannot be used with convert");
    }
  }
  plan.compress = a.Has("c");
  if (plan.compress && out_format != "qcow2") {
    return Status::InvalidArgument("compression (-c) needs a qcow2 destination (-O qcow2)");
  }
  plan.progress = a.Has("p") && !a.Has("q");
  return plan;
}

}  // namespace

int RunConvert(const std::vector<std::string>& args) {
  Result<ParsedArgs> parsed = ParseArgs(args, ConvertSpecs());
  if (!parsed.ok()) return Fail(kCmd, parsed.status());
  const ParsedArgs& a = *parsed;
  if (a.Has("help")) {
    PrintHelp();
    return 0;
  }
  if (WantsOptionHelp(a.GetAll("o"))) {
    std::string format = a.Get("O", "raw");
    Status ok = CheckFormatName(format, "format");
    if (!ok.ok()) return Fail(kCmd, ok);
    std::fputs(ImageOptionHelp(format).c_str(), stdout);
    return 0;
  }
  Result<ConvertPlan> plan = MakePlan(a);
  if (!plan.ok()) return Fail(kCmd, plan.status());

  Result<std::unique_ptr<BlockDevice>> src = OpenImage(plan->src, plan->src_open);
  if (!src.ok()) return Fail(kCmd, src.status());
  Status st = CheckDestinationIsNotSource(plan->src, plan->src_open.format, plan->dst);
  CreateOptions& create = plan->dst_options.create;
  create.size = (*src)->size();
  bool dst_existed = access(plan->dst.c_str(), F_OK) == 0;
  bool created = false;
  if (st.ok()) {
    st = CreateImage(plan->dst, create);
    created = st.ok();
  }
  if (st.ok()) st = CopyInto(*plan, **src);
  Status src_closed = CloseImage(std::move(*src));
  if (st.ok()) st = src_closed;
  if (!st.ok()) {
    // Remove what this run made; an existing file that CreateImage refused
    // to touch stays as it was.
    if (created || !dst_existed) unlink(plan->dst.c_str());
    return Fail(kCmd, st);
  }
  return 0;
}

}  // namespace kvblk::cli
