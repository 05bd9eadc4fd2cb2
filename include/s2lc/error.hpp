// s2lc — exception types. Every error that concerns user data names the file, the tensor and the
// byte offset where they apply, so "what()" alone is enough to find the problem.
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>

namespace s2lc {

/// Where an error happened. Any field may be empty / absent.
struct error_location {
  std::string file;                    ///< path of the file being read or written
  std::string tensor;                  ///< tensor (or section) name
  std::optional<std::uint64_t> offset; ///< absolute byte offset in the file
};

/// Base of every exception s2lc throws.
class error : public std::runtime_error {
 public:
  explicit error(const std::string& message, error_location where = {})
      : std::runtime_error(compose(message, where)), message_(message), where_(std::move(where)) {}

  /// The message without the location prefix.
  const std::string& message() const noexcept { return message_; }
  const std::string& file() const noexcept { return where_.file; }
  const std::string& tensor() const noexcept { return where_.tensor; }
  const std::optional<std::uint64_t>& offset() const noexcept { return where_.offset; }
  const error_location& where() const noexcept { return where_; }

  static std::string compose(const std::string& message, const error_location& where) {
    std::string out;
    if (!where.file.empty()) out += "file '" + where.file + "'";
    if (!where.tensor.empty()) out += std::string(out.empty() ? "" : ", ") + "tensor '" + where.tensor + "'";
    if (where.offset) out += std::string(out.empty() ? "" : ", ") + "byte offset " + std::to_string(*where.offset);
    if (!out.empty()) out += ": ";
    return out + message;
  }

 private:
  std::string message_;
  error_location where_;
};

/// Operating-system level failure: open, mmap, write, fsync, rename.
class io_error : public error {
 public:
  using error::error;
};

/// Malformed file content (safetensors header, .s2lc artifact...).
class format_error : public error {
 public:
  using error::error;
};

/// Wrong dtype, shape or argument handed to an API.
class invalid_argument : public error {
 public:
  using error::error;
};

}  // namespace s2lc
