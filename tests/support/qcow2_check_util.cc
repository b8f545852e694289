#include "tests/support/qcow2_check_util.h"

#include "tests/support/qemu_util.h"
#include "tests/support/test_util.h"

namespace kvblk::qcow2::check_test {

namespace {

// The integer member `key` of qemu-img's JSON output (0 when absent: qemu
// leaves out members that are 0).
uint64_t JsonNumber(const std::string& json, const std::string& key) {
  const std::string tag = "\"" + key + "\": ";
  size_t pos = json.find(tag);
  if (pos == std::string::npos) return 0;
  return std::stoull(json.substr(pos + tag.size()));
}

Counts ToCounts(const CheckResult& r) {
  Counts c;
  c.exit_code = r.ExitCode();
  c.corruptions = r.corruptions;
  c.leaks = r.leaks;
  c.check_errors = r.check_errors;
  c.image_end_offset = r.image_end_offset;
  c.total_clusters = r.total_clusters;
  c.allocated_clusters = r.allocated_clusters;
  c.fragmented_clusters = r.fragmented_clusters;
  c.compressed_clusters = r.compressed_clusters;
  c.corruptions_fixed = r.corruptions_fixed;
  c.leaks_fixed = r.leaks_fixed;
  return c;
}

}  // namespace

std::ostream& operator<<(std::ostream& os, const Counts& c) {
  return os << "{exit " << c.exit_code << ", corruptions " << c.corruptions << ", leaks " << c.leaks
            << ", check-errors " << c.check_errors << ", end " << c.image_end_offset << ", total "
            << c.total_clusters << ", allocated " << c.allocated_clusters << ", fragmented "
            << c.fragmented_clusters << ", compressed " << c.compressed_clusters
            << ", corruptions-fixed " << c.corruptions_fixed << ", leaks-fixed " << c.leaks_fixed
            << "}";
}

Counts QemuCheck(const std::string& path, const std::string& repair) {
  testing::CommandResult r = testing::Sh("{ qemu-img check " + repair + " --output=json " +
                                         testing::ShellQuote(path) + " 2>/dev/null; }");
  Counts c;
  c.exit_code = r.exit_code;
  if (r.output.find('{') == std::string::npos) return c;
  c.corruptions = JsonNumber(r.output, "corruptions");
  c.leaks = JsonNumber(r.output, "leaks");
  c.check_errors = JsonNumber(r.output, "check-errors");
  c.image_end_offset = JsonNumber(r.output, "image-end-offset");
  c.total_clusters = JsonNumber(r.output, "total-clusters");
  c.allocated_clusters = JsonNumber(r.output, "allocated-clusters");
  c.fragmented_clusters = JsonNumber(r.output, "fragmented-clusters");
  c.compressed_clusters = JsonNumber(r.output, "compressed-clusters");
  c.corruptions_fixed = JsonNumber(r.output, "corruptions-fixed");
  c.leaks_fixed = JsonNumber(r.output, "leaks-fixed");
  return c;
}

Counts KvblkCheck(const std::string& path, RepairMode mode, std::vector<std::string>* messages) {
  CheckOptions opts;
  opts.repair = mode;
  if (messages) opts.on_message = [messages](const std::string& m) { messages->push_back(m); };
  Result<CheckResult> r = CheckImage(path, opts);
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  return r.ok() ? ToCounts(*r) : Counts();
}

std::string Q(const std::string& s) { return testing::ShellQuote(s); }

void MakeBase(const std::string& path, const std::string& create_opts) {
  testing::ShOk("qemu-img create -f qcow2 " + create_opts + " " + Q(path) + " 64M");
  testing::ShOk("qemu-io -c 'write -P 1 0 192k' -c 'write -P 2 1M 64k' " + Q(path));
}

void MakeWithSnapshot(const std::string& path) {
  MakeBase(path);
  testing::ShOk("qemu-img snapshot -c s1 " + Q(path));
  testing::ShOk("qemu-io -c 'write -P 9 0 64k' " + Q(path));
}

}  // namespace kvblk::qcow2::check_test
