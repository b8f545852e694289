#include "tools/image_options.h"

#include <cstdint>

#include "tools/cli_util.h"

namespace kvblk::cli {

namespace {

enum class ValueKind { kSize, kNumber, kBool, kString };

struct OptionDef {
  const char* name;
  ValueKind kind;
  bool raw_too;  // also accepted for raw images
  const char* help;
};

constexpr OptionDef kOptionDefs[] = {
    {"backing_file", ValueKind::kString, false, "file name of a base image"},
    {"backing_fmt", ValueKind::kString, false, "image format of the base image (raw or qcow2)"},
    {"cluster_size", ValueKind::kSize, false,
     "qcow2 cluster size (512 to 2M, a power of two; default 64k)"},
    {"compat", ValueKind::kString, false,
     "compatibility level: v2 [0.10] or v3 [1.1] (default 1.1)"},
    {"compression_type", ValueKind::kString, false,
     "method used for compressed clusters: zlib (default) or zstd"},
    {"extended_l2", ValueKind::kBool, false, "extended L2 tables with subclusters (default off)"},
    {"lazy_refcounts", ValueKind::kBool, false, "postpone refcount updates (default off)"},
    {"preallocation", ValueKind::kString, true,
     "preallocation mode: off, metadata (qcow2 only), falloc or full (default off)"},
    {"refcount_bits", ValueKind::kNumber, false,
     "width of a reference count entry in bits: 1..64, a power of two (default 16)"},
    {"size", ValueKind::kSize, true, "virtual disk size"},
};

const OptionDef* FindOption(const std::string& name) {
  for (const OptionDef& def : kOptionDefs) {
    if (name == def.name) return &def;
  }
  return nullptr;
}

const char* KindText(ValueKind kind) {
  switch (kind) {
    case ValueKind::kSize:
      return "<size>";
    case ValueKind::kNumber:
      return "<num>";
    case ValueKind::kBool:
      return "<bool (on/off)>";
    case ValueKind::kString:
      return "<str>";
  }
  return "";
}

// Splits one "-o" string at single commas; ",," stands for a comma.
std::vector<std::string> SplitOptionString(const std::string& text) {
  std::vector<std::string> parts;
  std::string current;
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] != ',') {
      current += text[i];
    } else if (i + 1 < text.size() && text[i + 1] == ',') {
      current += ',';
      ++i;
    } else {
      parts.push_back(std::move(current));
      current.clear();
    }
  }
  parts.push_back(std::move(current));
  return parts;
}

Status ApplyOption(const OptionDef& def, const std::string& value, CreateOptions& opts) {
  const std::string name = def.name;
  const std::string what = "option '" + name + "'";
  if (def.kind == ValueKind::kBool) {
    Result<bool> on = ParseBool(value, what);
    if (!on.ok()) return on.status();
    (name == "lazy_refcounts" ? opts.lazy_refcounts : opts.extended_l2) = *on;
    return Status::Ok();
  }
  if (def.kind == ValueKind::kSize) {
    Result<uint64_t> size = ParseSize(value);
    if (!size.ok()) return size.status().WithContext(what);
    if (name == "size") {
      opts.size = *size;
    } else if (*size > UINT32_MAX) {
      return Status::InvalidArgument(what + ": cluster size " + value + " is too large");
    } else {
      opts.cluster_size = static_cast<uint32_t>(*size);
    }
    return Status::Ok();
  }
  if (name == "refcount_bits") {
    Result<int64_t> bits = ParseInteger(value, 1, 64, what);
    if (!bits.ok()) return bits.status();
    opts.refcount_bits = static_cast<int>(*bits);
  } else if (name == "compat") {
    if (value == "0.10" || value == "v2") {
      opts.compat_v3 = false;
    } else if (value == "1.1" || value == "v3") {
      opts.compat_v3 = true;
    } else {
      return Status::InvalidArgument("invalid compat value '" + value +
                                     "' (expected 0.10, v2, 1.1 or v3)");
    }
  } else if (name == "compression_type") {
    if (value != "zlib" && value != "zstd") {
      return Status::InvalidArgument("invalid compression_type '" + value +
                                     "' (expected zlib or zstd)");
    }
    opts.compression_type = value;
  } else if (name == "preallocation") {
    if (value == "off") {
      opts.preallocation = Preallocation::kOff;
    } else if (value == "metadata" && opts.format == "qcow2") {
      opts.preallocation = Preallocation::kMetadata;
    } else if (value == "falloc") {
      opts.preallocation = Preallocation::kFalloc;
    } else if (value == "full") {
      opts.preallocation = Preallocation::kFull;
    } else {
      return Status::InvalidArgument(
          "invalid preallocation '" + value + "' for " + opts.format + " (expected " +
          (opts.format == "qcow2" ? "off, metadata, falloc or full" : "off, falloc or full") + ")");
    }
  } else if (name == "backing_file") {
    if (value.empty()) return Status::InvalidArgument("option 'backing_file' is empty");
    opts.backing_file = value;
  } else if (name == "backing_fmt") {
    KVBLK_RETURN_IF_ERROR(CheckFormatName(value, "backing format"));
    opts.backing_format = value;
  }
  return Status::Ok();
}

const char* OnOff(bool on) { return on ? "on" : "off"; }

}  // namespace

Status CheckFormatName(const std::string& format, const std::string& what) {
  if (format == "qcow2" || format == "raw") return Status::Ok();
  return Status::InvalidArgument("unknown " + what + " '" + format + "' (expected qcow2 or raw)");
}

bool WantsOptionHelp(const std::vector<std::string>& option_strings) {
  for (const std::string& text : option_strings) {
    for (const std::string& part : SplitOptionString(text)) {
      if (part == "help" || part == "?") return true;
    }
  }
  return false;
}

Result<ImageOptions> ParseImageOptions(const std::string& format,
                                       const std::vector<std::string>& option_strings) {
  KVBLK_RETURN_IF_ERROR(CheckFormatName(format, "format"));
  ImageOptions out;
  out.create.format = format;
  for (const std::string& text : option_strings) {
    for (const std::string& part : SplitOptionString(text)) {
      if (part.empty()) return Status::InvalidArgument("empty option in '-o " + text + "'");
      size_t eq = part.find('=');
      std::string name = part.substr(0, eq);
      const OptionDef* def = FindOption(name);
      if (def == nullptr) {
        return Status::InvalidArgument("unknown option '" + name + "' (see '-o help')");
      }
      if (format == "raw" && !def->raw_too) {
        return Status::InvalidArgument("option '" + name + "' is not supported for raw images");
      }
      std::string value;
      if (eq != std::string::npos) {
        value = part.substr(eq + 1);
      } else if (def->kind == ValueKind::kBool) {
        value = "on";
      } else {
        return Status::InvalidArgument("option '" + name + "' requires a value");
      }
      KVBLK_RETURN_IF_ERROR(ApplyOption(*def, value, out.create));
      out.given[name] = value;
    }
  }
  return out;
}

std::string ImageOptionHelp(const std::string& format) {
  std::string out = "Supported " + format + " options:\n";
  for (const OptionDef& def : kOptionDefs) {
    if (format == "raw" && !def.raw_too) continue;
    std::string left = std::string(def.name) + "=" + KindText(def.kind);
    if (left.size() < 22) left.resize(22, ' ');
    out += "  " + left + " - " + def.help + "\n";
  }
  return out;
}

std::string FormattingLine(const std::string& path, const ImageOptions& options) {
  const CreateOptions& o = options.create;
  auto given = [&](const char* name) { return options.given.count(name) > 0; };
  std::string line = "Formatting '" + path + "', fmt=" + o.format;
  if (o.format == "raw") {
    line += " size=" + std::to_string(o.size);
    if (given("preallocation")) line += " preallocation=" + options.given.at("preallocation");
    return line;
  }
  line += " cluster_size=" + std::to_string(o.cluster_size);
  line += std::string(" extended_l2=") + OnOff(o.extended_l2);
  if (given("preallocation")) line += " preallocation=" + options.given.at("preallocation");
  line += " compression_type=" + o.compression_type;
  line += " size=" + std::to_string(o.size);
  if (!o.backing_file.empty()) line += " backing_file=" + o.backing_file;
  if (!o.backing_format.empty()) line += " backing_fmt=" + o.backing_format;
  if (given("compat")) line += " compat=" + options.given.at("compat");
  line += std::string(" lazy_refcounts=") + OnOff(o.lazy_refcounts);
  line += " refcount_bits=" + std::to_string(o.refcount_bits);
  return line;
}

}  // namespace kvblk::cli
