// s2lc::io — safetensors: a validating, memory-mapped reader and a crash-safe writer.
//
// Format: 8-byte little-endian header length N, N bytes of JSON
//   {"__metadata__": {str: str}, "<name>": {"dtype": "F32", "shape": [..], "data_offsets": [b, e]}, ...}
// then the data section; offsets are relative to its start (byte 8 + N).
//
// The reader rejects, with a message naming the file, tensor and byte offset: a file too short
// for the length prefix, a header length past the end of the file or above 100 MB, JSON that does
// not parse or is not an object, duplicate names, unknown dtypes, malformed shapes or offsets,
// a shape whose byte size overflows 64 bits, byte sizes that disagree with the shape, data past
// the end of the file, overlapping tensors, gaps or trailing bytes in the data section (as the
// reference implementation does), and tensors not aligned to their element size in the file.
#pragma once

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <unordered_set>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "s2lc/dtype.hpp"
#include "s2lc/error.hpp"
#include "s2lc/io/mapped_file.hpp"
#include "s2lc/io/names.hpp"

namespace s2lc::io {

/// The reference implementation's limit on the JSON header.
inline constexpr std::uint64_t safetensors_max_header = 100'000'000;

/// One tensor's entry in a safetensors header.
struct TensorInfo {
  std::string name;
  dtype type = dtype::f32;
  std::vector<std::uint64_t> shape;
  std::uint64_t begin = 0;  ///< start, relative to the data section
  std::uint64_t end = 0;    ///< one past the end, relative to the data section

  std::uint64_t nbytes() const noexcept { return end - begin; }
  std::uint64_t numel() const noexcept {
    std::uint64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
};

/// A parsed, validated safetensors header.
struct SafetensorsHeader {
  std::uint64_t header_size = 0;             ///< N, the JSON length
  std::vector<TensorInfo> tensors;           ///< sorted by data offset
  std::map<std::string, std::string> metadata;

  std::uint64_t data_offset() const noexcept { return 8 + header_size; }
  const TensorInfo* find(std::string_view name) const noexcept {
    for (const auto& t : tensors)
      if (t.name == name) return &t;
    return nullptr;
  }
};

namespace detail {

inline std::uint64_t load_le64(const std::byte* p) noexcept {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<std::uint64_t>(p[i]);
  return v;
}

/// Absolute offset of a tensor's key in the header text (best effort, for error messages).
inline std::uint64_t key_offset(std::string_view header, const std::string& key) {
  const std::string quoted = nlohmann::json(key).dump();
  const auto pos = header.find(quoted);
  return 8 + (pos == std::string_view::npos ? 0 : pos);
}

/// A JSON value for an error message. Never dumps an array or object: dump() recurses, and a
/// deeply nested header ("[[[[...") would overflow the stack. Long scalars are cut short.
inline std::string describe(const nlohmann::json& v) {
  if (v.is_array()) return "an array of " + std::to_string(v.size());
  if (v.is_object()) return "an object";
  std::string s = v.dump();
  if (s.size() > 40) s = s.substr(0, 37) + "...";
  return s;
}

/// `where()` makes the error_location: it is only computed when there is an error to report.
template <typename Where>
inline std::uint64_t as_u64(const nlohmann::json& v, const char* what, const Where& where) {
  if (!v.is_number_integer()) throw format_error(std::string(what) + " must be a non-negative integer, got " + describe(v), where());
  if (v.is_number_unsigned()) return v.get<std::uint64_t>();
  const auto s = v.get<std::int64_t>();
  if (s < 0) throw format_error(std::string(what) + " is negative (" + std::to_string(s) + ")", where());
  return static_cast<std::uint64_t>(s);
}

/// nlohmann SAX handler that finds the first key repeated within one object, at any depth
/// (nlohmann keeps the last value silently; the reference implementation rejects repeats).
struct DuplicateKeys {
  std::vector<std::unordered_set<std::string>> objects;  // keys seen, per open object
  std::string duplicate;
  std::string parent;  // top-level key owning the object with the repeat ("" at top level)
  std::string current_top;
  bool null() { return true; }
  bool boolean(bool) { return true; }
  bool number_integer(nlohmann::json::number_integer_t) { return true; }
  bool number_unsigned(nlohmann::json::number_unsigned_t) { return true; }
  bool number_float(nlohmann::json::number_float_t, const std::string&) { return true; }
  bool string(std::string&) { return true; }
  bool binary(nlohmann::json::binary_t&) { return true; }
  bool start_object(std::size_t) { return objects.emplace_back(), true; }
  bool end_object() { return objects.pop_back(), true; }
  bool start_array(std::size_t) { return true; }
  bool end_array() { return true; }
  bool key(std::string& k) {
    if (objects.size() == 1) current_top = k;
    if (objects.back().insert(k).second) return true;
    duplicate = k;
    if (objects.size() > 1) parent = current_top;
    return false;  // stop at the first duplicate
  }
  bool parse_error(std::size_t, const std::string&, const nlohmann::json::exception&) { return false; }
};

/// True if nlohmann can serialise `s` (i.e. it is valid UTF-8).
inline bool valid_utf8(const std::string& s) {
  try {
    (void)nlohmann::json(s).dump();
    return true;
  } catch (const nlohmann::json::type_error&) {
    return false;
  }
}

}  // namespace detail

/// Parses and validates the header of a complete safetensors file held in `file`.
/// `label` names the file in error messages.
inline SafetensorsHeader parse_safetensors(std::span<const std::byte> file, const std::string& label) {
  using detail::as_u64;
  const std::uint64_t size = file.size();
  if (size < 8)
    throw format_error("truncated file: " + std::to_string(size) + " bytes, a safetensors file starts with an 8-byte header length", {label, {}, 0});
  const std::uint64_t n = detail::load_le64(file.data());
  if (n > size - 8)
    throw format_error("header length " + std::to_string(n) + " runs past the end of the file (" + std::to_string(size) +
                           " bytes): truncated file or not safetensors", {label, {}, 0});
  if (n > safetensors_max_header)
    throw format_error("header length " + std::to_string(n) + " exceeds the 100 MB limit", {label, {}, 0});
  if (n < 2) throw format_error("header of " + std::to_string(n) + " bytes cannot hold a JSON object", {label, {}, 8});

  const std::string_view text(reinterpret_cast<const char*>(file.data() + 8), static_cast<std::size_t>(n));
  if (text.front() != '{') throw format_error("header does not start with '{' (not a safetensors JSON header)", {label, {}, 8});

  nlohmann::json root;
  try {
    root = nlohmann::json::parse(text.begin(), text.end());
  } catch (const nlohmann::json::parse_error& e) {
    throw format_error(std::string("invalid JSON header: ") + e.what(), {label, {}, 8 + (e.byte > 0 ? e.byte - 1 : 0)});
  } catch (const nlohmann::json::exception& e) {
    // out_of_range 406: a number too large for a double ("1e999"); no position is available.
    throw format_error(std::string("invalid JSON header: ") + e.what(), {label, {}, 8});
  }
  // Duplicate keys, at any depth (nlohmann keeps the last one silently): a second, SAX-only pass.
  // (Not a parse callback: nlohmann's callback parser is quadratic in the number of members.)
  detail::DuplicateKeys keys;
  nlohmann::json::sax_parse(text.begin(), text.end(), &keys);
  if (!keys.duplicate.empty()) {
    if (keys.parent.empty())
      throw format_error("tensor name appears twice in the header", {label, keys.duplicate, detail::key_offset(text, keys.duplicate)});
    throw format_error("field \"" + keys.duplicate + "\" appears twice in this entry", {label, keys.parent, detail::key_offset(text, keys.parent)});
  }
  if (!root.is_object()) throw format_error("header JSON is not an object", {label, {}, 8});

  SafetensorsHeader h;
  h.header_size = n;
  const std::uint64_t data_offset = 8 + n;
  const std::uint64_t data_size = size - data_offset;

  for (auto it = root.begin(); it != root.end(); ++it) {
    const std::string& name = it.key();
    const nlohmann::json& v = it.value();
    // Built only on error: searching the header for every key would make parsing quadratic.
    const auto at = [&] { return error_location{label, name, detail::key_offset(text, name)}; };
    if (name == "__metadata__") {
      if (!v.is_object()) throw format_error("__metadata__ must be an object of strings", at());
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string()) throw format_error("__metadata__ value of '" + m.key() + "' is not a string", at());
        h.metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    if (name.empty()) throw format_error("empty tensor name", at());
    if (!v.is_object()) throw format_error("entry is not an object", at());
    for (const char* key : {"dtype", "shape", "data_offsets"})
      if (!v.contains(key)) throw format_error(std::string("entry has no \"") + key + "\"", at());

    TensorInfo t;
    t.name = name;
    const auto& dt = v["dtype"];
    if (!dt.is_string()) throw format_error("dtype is not a string", at());
    const auto parsed = parse_dtype(dt.get<std::string>());
    if (!parsed) throw format_error("unknown dtype '" + dt.get<std::string>() + "'", at());
    t.type = *parsed;

    const auto& shape = v["shape"];
    if (!shape.is_array()) throw format_error("shape is not an array", at());
    std::uint64_t numel = 1;
    bool overflow = false;
    for (const auto& d : shape) {
      const std::uint64_t dim = as_u64(d, "shape dimension", at);
      t.shape.push_back(dim);
      overflow = overflow || __builtin_mul_overflow(numel, dim, &numel);
    }
    std::uint64_t nbytes = 0;
    overflow = overflow || __builtin_mul_overflow(numel, static_cast<std::uint64_t>(dtype_size(t.type)), &nbytes);
    if (overflow)
      throw format_error("size of shape " + shape_string(t.shape) + " x " + std::string(dtype_name(t.type)) + " overflows 64 bits", at());

    const auto& offs = v["data_offsets"];
    if (!offs.is_array() || offs.size() != 2) throw format_error("data_offsets must be an array [begin, end]", at());
    t.begin = as_u64(offs[0], "data_offsets begin", at);
    t.end = as_u64(offs[1], "data_offsets end", at);
    if (t.end < t.begin)
      throw format_error("data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) + "] end before they begin", at());
    if (t.end > data_size)
      throw format_error("data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) + "] run past the end of the file (data section holds " +
                             std::to_string(data_size) + " bytes)", {label, name, data_offset + std::min(t.begin, data_size)});
    if (t.end - t.begin != nbytes)
      throw format_error("shape " + shape_string(t.shape) + " of " + std::string(dtype_name(t.type)) + " needs " + std::to_string(nbytes) +
                             " bytes but data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) + "] hold " +
                             std::to_string(t.end - t.begin), {label, name, data_offset + t.begin});
    if ((data_offset + t.begin) % dtype_size(t.type) != 0)
      throw format_error("data is not aligned to its " + std::to_string(dtype_size(t.type)) + "-byte element size", {label, name, data_offset + t.begin});
    h.tensors.push_back(std::move(t));
  }

  std::sort(h.tensors.begin(), h.tensors.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.begin != b.begin ? a.begin < b.begin : (a.end != b.end ? a.end < b.end : a.name < b.name);
  });
  std::uint64_t covered = 0;
  const TensorInfo* last = nullptr;
  for (const auto& t : h.tensors) {
    if (t.begin < covered)
      throw format_error("data [" + std::to_string(t.begin) + ", " + std::to_string(t.end) + ") overlaps tensor '" + last->name + "' [" +
                             std::to_string(last->begin) + ", " + std::to_string(last->end) + ")", {label, t.name, data_offset + t.begin});
    if (t.begin > covered)
      throw format_error("gap of " + std::to_string(t.begin - covered) + " unused bytes before this tensor's data", {label, t.name, data_offset + covered});
    if (t.end > covered) {
      covered = t.end;
      last = &t;
    }
  }
  if (covered != data_size)
    throw format_error(std::to_string(data_size - covered) + " trailing bytes after the last tensor's data", {label, {}, data_offset + covered});
  return h;
}

/// A safetensors file, memory-mapped and validated. Tensor bytes are views into the mapping.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::filesystem::path& path)
      : map_(path), header_(parse_safetensors(map_.bytes(), path.string())) {}

  const std::filesystem::path& path() const noexcept { return map_.path(); }
  std::uint64_t file_size() const noexcept { return map_.size(); }
  const SafetensorsHeader& header() const noexcept { return header_; }
  const std::vector<TensorInfo>& tensors() const noexcept { return header_.tensors; }
  const std::map<std::string, std::string>& metadata() const noexcept { return header_.metadata; }
  const TensorInfo* find(std::string_view name) const noexcept { return header_.find(name); }

  const TensorInfo& at(std::string_view name) const {
    if (const auto* t = find(name)) return *t;
    throw invalid_argument("no such tensor", {path().string(), std::string(name), {}});
  }

  /// The raw little-endian bytes of a tensor (a view into the mapping).
  std::span<const std::byte> bytes(const TensorInfo& t) const noexcept {
    return {map_.data() + header_.data_offset() + t.begin, static_cast<std::size_t>(t.nbytes())};
  }
  std::span<const std::byte> bytes(std::string_view name) const { return bytes(at(name)); }

  /// A typed view; T must match the stored dtype (bf16_t / f16_t for the 16-bit floats).
  template <typename T>
  std::span<const T> view(std::string_view name) const {
    const TensorInfo& t = at(name);
    if (t.type != dtype_of_v<T>)
      throw invalid_argument("stored as " + std::string(dtype_name(t.type)) + ", requested as " + std::string(dtype_name(dtype_of_v<T>)),
                             {path().string(), t.name, header_.data_offset() + t.begin});
    const auto b = bytes(t);
    return {reinterpret_cast<const T*>(b.data()), static_cast<std::size_t>(t.numel())};
  }

  /// Absolute byte offset of a tensor's data in the file.
  std::uint64_t offset_of(const TensorInfo& t) const noexcept { return header_.data_offset() + t.begin; }

 private:
  MappedFile map_;
  SafetensorsHeader header_;
};

/// The file's tensors as name / dtype / shape references (for find_expert_groups etc.).
inline std::vector<TensorRef> tensor_refs(const SafetensorsFile& file, std::size_t source = 0) {
  std::vector<TensorRef> refs;
  refs.reserve(file.tensors().size());
  for (const auto& t : file.tensors()) refs.push_back({t.name, t.type, t.shape, source});
  return refs;
}

/// One tensor to write: name, dtype, shape and its raw little-endian bytes.
struct TensorData {
  std::string name;
  dtype type = dtype::f32;
  std::vector<std::uint64_t> shape;
  std::span<const std::byte> data;
};

/// Serialises a header + data layout for `tensors`: data are placed widest element type first
/// (stable otherwise), so every tensor is aligned to its element size and the data section has
/// no gaps. Returns the header bytes (length prefix + JSON padded with spaces to 8 bytes) and the
/// order in which the tensors' data must follow.
inline std::pair<std::string, std::vector<std::size_t>> safetensors_layout(std::span<const TensorData> tensors,
                                                                           const std::map<std::string, std::string>& metadata,
                                                                           const std::string& label) {
  std::unordered_set<std::string> names;
  for (const auto& t : tensors) {
    if (t.name.empty() || t.name == "__metadata__") throw invalid_argument("invalid tensor name", {label, t.name, {}});
    if (!names.insert(t.name).second) throw invalid_argument("tensor name given twice", {label, t.name, {}});
    if (!detail::valid_utf8(t.name)) throw invalid_argument("tensor name is not valid UTF-8", {label, t.name, {}});
    std::uint64_t numel = 1;
    std::uint64_t nbytes = 0;
    bool overflow = false;
    for (auto d : t.shape) overflow = __builtin_mul_overflow(numel, d, &numel) || overflow;
    overflow = __builtin_mul_overflow(numel, static_cast<std::uint64_t>(dtype_size(t.type)), &nbytes) || overflow;
    if (overflow)
      throw invalid_argument("size of shape " + shape_string(t.shape) + " x " + std::string(dtype_name(t.type)) + " overflows 64 bits",
                             {label, t.name, {}});
    if (nbytes != t.data.size())
      throw invalid_argument("shape " + shape_string(t.shape) + " of " + std::string(dtype_name(t.type)) + " needs " +
                                 std::to_string(nbytes) + " bytes, got " + std::to_string(t.data.size()),
                             {label, t.name, {}});
  }
  for (const auto& [key, value] : metadata)
    if (!detail::valid_utf8(key) || !detail::valid_utf8(value))
      throw invalid_argument("metadata entry '" + key + "' is not valid UTF-8", {label, "__metadata__", {}});
  std::vector<std::size_t> order(tensors.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](std::size_t a, std::size_t b) { return dtype_size(tensors[a].type) > dtype_size(tensors[b].type); });

  nlohmann::ordered_json j = nlohmann::ordered_json::object();
  if (!metadata.empty()) j["__metadata__"] = metadata;
  std::uint64_t off = 0;
  for (std::size_t i : order) {
    const auto& t = tensors[i];
    j[t.name] = {{"dtype", dtype_name(t.type)}, {"shape", t.shape}, {"data_offsets", {off, off + t.data.size()}}};
    off += t.data.size();
  }
  std::string json = j.dump();
  json.append((8 - json.size() % 8) % 8, ' ');
  std::string head(8, '\0');
  const std::uint64_t n = json.size();
  for (int i = 0; i < 8; ++i) head[static_cast<std::size_t>(i)] = static_cast<char>((n >> (8 * i)) & 0xFFu);
  return {head + json, order};
}

/// Writes a safetensors file crash-safely (temp file, fsync, rename). An existing file at `path`
/// is replaced only once the new one is complete.
inline void write_safetensors(const std::filesystem::path& path, std::span<const TensorData> tensors,
                              const std::map<std::string, std::string>& metadata = {}) {
  // (no structured binding: clang < 16 cannot capture one in a lambda)
  const auto layout = safetensors_layout(tensors, metadata, path.string());
  write_atomically(path, [&](FileSink& out) {
    out.write(layout.first.data(), layout.first.size());
    for (std::size_t i : layout.second) out.write(tensors[i].data);
  });
}

}  // namespace s2lc::io
