// The kvblk subcommands. Each takes the arguments after its name and returns
// the process exit status: 0 on success, 1 on any failure (after printing
// one "kvblk <cmd>: <message>" line on stderr). "--help" prints the usage.
#ifndef KVBLK_TOOLS_COMMANDS_H_
#define KVBLK_TOOLS_COMMANDS_H_

#include <string>
#include <vector>

namespace kvblk::cli {

int RunCreate(const std::vector<std::string>& args);
int RunInfo(const std::vector<std::string>& args);
int RunConvert(const std::vector<std::string>& args);
int RunIo(const std::vector<std::string>& args);
int RunMap(const std::vector<std::string>& args);
int RunCheck(const std::vector<std::string>& args);
int RunServe(const std::vector<std::string>& args);

}  // namespace kvblk::cli

#endif  // KVBLK_TOOLS_COMMANDS_H_
