// The kvblk subcommands. Each takes the arguments after its name and returns
// the process exit status: 0 on success, 1 on any failure (after printing
// one "kvblk <cmd>: <message>" line on stderr). "--help" prints the usage.
#ifndef KVBLK_TOOLS_COMMANDS_H_
#define KVBLK_TOOLS_COMMANDS_H_

#include <string>
#include <vector>

#include "kvblk/block_device.h"
#include "tools/json_writer.h"

namespace kvblk::cli {

int RunCreate(const std::vector<std::string>& args);
int RunInfo(const std::vector<std::string>& args);
int RunConvert(const std::vector<std::string>& args);
int RunIo(const std::vector<std::string>& args);
int RunMap(const std::vector<std::string>& args);
int RunCheck(const std::vector<std::string>& args);
int RunServe(const std::vector<std::string>& args);
int RunSnapshot(const std::vector<std::string>& args);
int RunResize(const std::vector<std::string>& args);

// qemu-img's "Snapshot list:" table (header and one line per snapshot, each
// ending in a newline), shared by `info` and `snapshot -l`.
std::string FormatSnapshotTable(const std::vector<SnapshotInfo>& snapshots);
// Writes `snapshots` as a JSON array, members in the order qemu-img's
// `info --output=json` prints them.
void WriteSnapshotsJson(const std::vector<SnapshotInfo>& snapshots, JsonWriter& json);

}  // namespace kvblk::cli

#endif  // KVBLK_TOOLS_COMMANDS_H_
