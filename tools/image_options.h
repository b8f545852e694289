// Image creation options given with qemu-img's "-o name=value[,name=value]"
// syntax, shared by `kvblk create` and `kvblk convert`.
#ifndef KVBLK_TOOLS_IMAGE_OPTIONS_H_
#define KVBLK_TOOLS_IMAGE_OPTIONS_H_

#include <map>
#include <string>
#include <vector>

#include "kvblk/image_create.h"
#include "kvblk/status.h"

namespace kvblk::cli {

// CreateOptions plus which options the user set explicitly (name -> text as
// given), so callers can report or refuse them.
struct ImageOptions {
  CreateOptions create;
  std::map<std::string, std::string> given;
};

// InvalidArgument unless `format` is "qcow2" or "raw".
Status CheckFormatName(const std::string& format, const std::string& what);

// True if any "-o" string asks for the option list ("help" or "?").
bool WantsOptionHelp(const std::vector<std::string>& option_strings);

// Applies every "-o" string, in order, to the defaults for `format`. Within a
// string options are separated by commas (",," is a literal comma); a boolean
// option given without "=value" means on. Returns InvalidArgument naming the
// first unknown, unsupported (for the format) or malformed option. Range
// checks beyond the syntax (cluster size a power of two, ...) are left to
// CreateImage, which validates before writing anything.
Result<ImageOptions> ParseImageOptions(const std::string& format,
                                       const std::vector<std::string>& option_strings);

// The "-o help" listing for `format`.
std::string ImageOptionHelp(const std::string& format);

// qemu-img's "Formatting 'FILE', fmt=qcow2 cluster_size=65536 ..." line
// (without a newline) for the options that will be used.
std::string FormattingLine(const std::string& path, const ImageOptions& options);

}  // namespace kvblk::cli

#endif  // KVBLK_TOOLS_IMAGE_OPTIONS_H_
