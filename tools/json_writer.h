// JsonWriter: builds JSON text the way qemu-img prints it (objects and
// arrays one member per line, indented by four spaces, "key": value).
//
// The caller is responsible for well-formed nesting: Key() only inside an
// object and before each value there, Begin/End in matching pairs. Values are
// emitted in call order; nothing is reordered or deduplicated.
#ifndef KVBLK_TOOLS_JSON_WRITER_H_
#define KVBLK_TOOLS_JSON_WRITER_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace kvblk::cli {

// `text` as a quoted JSON string: quotes, backslashes and control characters
// are escaped; bytes that are not valid UTF-8 become U+FFFD.
std::string JsonQuote(std::string_view text);

class JsonWriter {
 public:
  explicit JsonWriter(int indent = 4) : indent_(indent) {}

  void BeginObject();
  void EndObject();
  void BeginArray();
  void EndArray();
  // Names the next value of the current object.
  void Key(std::string_view key);

  void String(std::string_view value);
  void Uint(uint64_t value);
  void Int(int64_t value);
  void Bool(bool value);

  // The text so far (complete once every Begin has its End).
  const std::string& str() const { return out_; }

 private:
  struct Level {
    bool is_object;
    int members = 0;
  };
  // Emits the separator and indentation that precede a value or key.
  void BeforeValue();
  void Close(char bracket);
  void Newline(size_t depth);

  int indent_;
  std::string out_;
  std::vector<Level> stack_;
  bool after_key_ = false;
};

}  // namespace kvblk::cli

#endif  // KVBLK_TOOLS_JSON_WRITER_H_
