#include "disk/qcow2_snapshot.h"

#include <algorithm>
#include <cstdlib>

#include "disk/qcow2_format.h"

namespace kvblk::qcow2 {

Result<std::vector<Snapshot>> DecodeSnapshotTable(const std::vector<uint8_t>& buf, uint32_t count,
                                                  uint32_t cluster_bits, uint64_t file_size,
                                                  const std::string& file) {
  std::vector<Snapshot> out;
  size_t pos = 0;
  const uint64_t cs = uint64_t{1} << cluster_bits;
  for (uint32_t i = 0; i < count; ++i) {
    auto corrupt = [&](const std::string& what) {
      return Status::Corruption(file + ": snapshot table entry " + std::to_string(i) + ": " + what);
    };
    if (pos > buf.size() || buf.size() - pos < 40) return corrupt("truncated");
    const uint8_t* p = buf.data() + pos;
    Snapshot s;
    s.l1_table_offset = LoadBe64(p);
    s.l1_size = LoadBe32(p + 8);
    uint16_t id_len = LoadBe16(p + 12);
    uint16_t name_len = LoadBe16(p + 14);
    s.info.date_sec = LoadBe32(p + 16);
    s.info.date_nsec = LoadBe32(p + 20);
    s.info.vm_clock_nsec = LoadBe64(p + 24);
    uint32_t vm_state_size = LoadBe32(p + 32);
    uint32_t extra_len = LoadBe32(p + 36);
    s.info.vm_state_size = vm_state_size;
    pos += 40;
    if (extra_len > 1024) return corrupt("extra data too large");
    if (buf.size() - pos < uint64_t{extra_len} + id_len + name_len) return corrupt("truncated");
    s.extra.assign(buf.begin() + static_cast<long>(pos),
                   buf.begin() + static_cast<long>(pos + extra_len));
    if (extra_len >= 8) s.info.vm_state_size = LoadBe64(s.extra.data());
    if (extra_len >= 16) s.info.disk_size = LoadBe64(s.extra.data() + 8);
    if (extra_len >= 24) s.info.icount = LoadBe64(s.extra.data() + 16);
    if (s.info.icount && *s.info.icount == ~uint64_t{0}) s.info.icount.reset();
    pos += extra_len;
    s.info.id.assign(reinterpret_cast<const char*>(buf.data() + pos), id_len);
    pos += id_len;
    s.info.name.assign(reinterpret_cast<const char*>(buf.data() + pos), name_len);
    pos += name_len;
    pos = (pos + 7) & ~size_t{7};
    if (s.l1_table_offset & (cs - 1)) return corrupt("L1 table offset is not cluster aligned");
    if (uint64_t{s.l1_size} * 8 > kMaxL1Bytes) return corrupt("L1 table too large");
    if (s.l1_size > 0 && (s.l1_table_offset > file_size ||
                          file_size - s.l1_table_offset < uint64_t{s.l1_size} * 8)) {
      return corrupt("L1 table lies past the end of the file");
    }
    out.push_back(std::move(s));
  }
  return out;
}

std::vector<uint8_t> EncodeSnapshotTable(const std::vector<Snapshot>& snapshots) {
  std::vector<uint8_t> out;
  for (const Snapshot& s : snapshots) {
    size_t pos = out.size();
    size_t len = 40 + s.extra.size() + s.info.id.size() + s.info.name.size();
    out.resize(pos + ((len + 7) & ~size_t{7}), 0);
    uint8_t* p = out.data() + pos;
    StoreBe64(p, s.l1_table_offset);
    StoreBe32(p + 8, s.l1_size);
    StoreBe16(p + 12, static_cast<uint16_t>(s.info.id.size()));
    StoreBe16(p + 14, static_cast<uint16_t>(s.info.name.size()));
    StoreBe32(p + 16, static_cast<uint32_t>(s.info.date_sec));
    StoreBe32(p + 20, s.info.date_nsec);
    StoreBe64(p + 24, s.info.vm_clock_nsec);
    StoreBe32(p + 32, static_cast<uint32_t>(s.info.vm_state_size));
    StoreBe32(p + 36, static_cast<uint32_t>(s.extra.size()));
    p += 40;
    std::copy(s.extra.begin(), s.extra.end(), p);
    p += s.extra.size();
    std::copy(s.info.id.begin(), s.info.id.end(), p);
    p += s.info.id.size();
    std::copy(s.info.name.begin(), s.info.name.end(), p);
  }
  return out;
}

std::vector<uint8_t> EncodeSnapshotExtra(const SnapshotInfo& info) {
  std::vector<uint8_t> extra(kSnapshotExtraBytes);
  StoreBe64(extra.data(), info.vm_state_size);
  StoreBe64(extra.data() + 8, info.disk_size);
  StoreBe64(extra.data() + 16, info.icount ? *info.icount : ~uint64_t{0});
  return extra;
}

std::string NextSnapshotId(const std::vector<Snapshot>& snapshots) {
  uint64_t max_id = 0;
  for (const Snapshot& s : snapshots) {
    const std::string& id = s.info.id;
    if (id.empty() || id.size() > 19 || id.find_first_not_of("0123456789") != std::string::npos) {
      continue;
    }
    uint64_t v = std::strtoull(id.c_str(), nullptr, 10);
    if (v > max_id) max_id = v;
  }
  return std::to_string(max_id + 1);
}

int FindSnapshot(const std::vector<Snapshot>& snapshots, const std::string& name_or_id,
                 SnapshotLookup order) {
  auto by = [&](bool id) {
    for (size_t i = 0; i < snapshots.size(); ++i) {
      if ((id ? snapshots[i].info.id : snapshots[i].info.name) == name_or_id) {
        return static_cast<int>(i);
      }
    }
    return -1;
  };
  switch (order) {
    case SnapshotLookup::kIdThenName: {
      int i = by(true);
      return i >= 0 ? i : by(false);
    }
    case SnapshotLookup::kNameThenId: {
      int i = by(false);
      return i >= 0 ? i : by(true);
    }
    case SnapshotLookup::kNameOnly:
      return by(false);
  }
  return -1;
}

}  // namespace kvblk::qcow2
