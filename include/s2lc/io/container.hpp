// s2lc::io — the .s2lc artifact container: a validated, memory-mappable file of named, 64-byte
// aligned sections (JSON manifests and typed n-d arrays), each with a CRC-32C. It knows nothing
// about compression: s2lc's compressor decides which sections an artifact holds.
//
// Format version 1.0. All integers are little-endian. A file is the 64-byte header, the section
// data (each section at a multiple of 64, zero padding in between), then the section table.
//
//   Header (64 bytes, offset 0)
//     [ 0,  8)  magic          53 32 4C 43 0D 0A 1A 0A  ("S2LC" CR LF ^Z LF: catches text-mode
//                                                        transfers and `type`/`cat` of the file)
//     [ 8, 10)  u16 version_major   1; any other major version is rejected (checked before the
//                                   header checksum, so a newer file says "unsupported version")
//     [10, 12)  u16 version_minor   0; any minor is accepted: minor versions only add what a 1.0
//                                   reader can ignore
//     [12, 16)  u32 flags           0; version 1.0 defines no flags, any set bit is rejected
//     [16, 24)  u64 section_count
//     [24, 32)  u64 table_offset    a multiple of 64, >= 64
//     [32, 40)  u64 table_size      table_offset + table_size == file_size (the table ends the file)
//     [40, 48)  u64 file_size       must equal the real size of the file
//     [48, 52)  u32 table_crc       CRC-32C of the table, bytes [table_offset, file_size)
//     [52, 60)  reserved            zero (rejected otherwise)
//     [60, 64)  u32 header_crc      CRC-32C of header bytes [0, 60) (everything but itself)
//
//   Section table (table_size bytes at table_offset): section_count packed entries, in the
//   order the sections were added (which readers keep), each
//     u16  name_length     1..255
//     u8   name[name_length]   UTF-8 (strict: no overlongs, surrogates or code points past
//                              U+10FFFF), no NUL byte, unique within the file
//     u16  kind            0 = json (UTF-8 JSON text; must be dtype U8, rank 1, dims[0] == size)
//                          1 = array (raw little-endian elements, row-major; plain bytes are a
//                              rank-1 U8 array); any other kind is rejected
//     u8   dtype           code: 0 U8, 1 I8, 2 U16, 3 I16, 4 U32, 5 I32, 6 U64, 7 I64, 8 F16,
//                          9 BF16, 10 F32, 11 F64, 12 BOOL, 13 F8_E5M2, 14 F8_E4M3 (the s2lc::dtype
//                          set; codes are fixed by this table, not by the enum's order)
//     u8   rank            0..4 (0: a scalar)
//     u64  dims[rank]
//     u64  offset          absolute; a multiple of 64, >= 64, offset + size <= table_offset
//     u64  size            bytes; == product(dims) * dtype size, computed without overflow
//     u32  crc             CRC-32C of the section's size bytes
//   so an entry takes 27 + name_length + 8 * rank bytes, and no bytes may follow the last one.
//
//   Section data: non-empty sections do not overlap (empty ones occupy nothing); every byte of
//   [64, table_offset) outside a section is zero. The writer lays sections out in table order,
//   each at the next multiple of 64, and puts the table at the next multiple of 64 after the last.
//
// Reading (parse_container, ContainerFile) validates everything above before handing out any
// view, and by default (container_checks::full) also verifies every section's CRC-32C and the
// zero padding at open: artifacts are tens of MB and CRC-32C runs at GB/s, so a corrupt file is
// caught at open, not halfway through inference. container_checks::structure skips that pass
// (the header and table checksums are always verified; verify() runs the full pass later).
// Every malformed input throws s2lc::format_error naming the file, the section (once its name is
// known) and the absolute byte offset of the offending field or data; nothing is allocated in
// proportion to a field's value before that value is bounded by the file size.
#pragma once

#include <algorithm>
#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_set>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "s2lc/dtype.hpp"
#include "s2lc/error.hpp"
#include "s2lc/io/crc32c.hpp"
#include "s2lc/io/mapped_file.hpp"
#include "s2lc/io/names.hpp"
#include "s2lc/io/safetensors.hpp"

namespace s2lc::io {

inline constexpr std::array<std::byte, 8> container_magic = {std::byte{'S'}, std::byte{'2'}, std::byte{'L'}, std::byte{'C'},
                                                             std::byte{0x0D}, std::byte{0x0A}, std::byte{0x1A}, std::byte{0x0A}};
inline constexpr std::uint16_t container_version_major = 1;
inline constexpr std::uint16_t container_version_minor = 0;
inline constexpr std::uint64_t container_header_size = 64;
inline constexpr std::uint64_t container_alignment = 64;
inline constexpr std::size_t container_max_name = 255;
inline constexpr std::size_t container_max_rank = 4;
/// Smallest table entry: u16 name length, a 1-byte name, u16 kind, u8 dtype, u8 rank, u64
/// offset, u64 size, u32 crc. Bounds section_count by table_size before anything is allocated.
inline constexpr std::uint64_t container_min_entry = 2 + 1 + 2 + 1 + 1 + 8 + 8 + 4;

/// What a section holds.
enum class section_kind : std::uint16_t {
  json = 0,   ///< UTF-8 JSON text (a manifest), stored as a rank-1 U8 array
  array = 1,  ///< a typed n-d array (raw bytes: rank-1 U8)
};

constexpr std::string_view section_kind_name(section_kind k) noexcept {
  switch (k) {
    case section_kind::json: return "json";
    case section_kind::array: return "array";
  }
  return "?";
}

/// The container's dtype codes: code i is container_dtypes[i]. Append only.
inline constexpr dtype container_dtypes[] = {dtype::u8,  dtype::i8,  dtype::u16,  dtype::i16, dtype::u32,
                                             dtype::i32, dtype::u64, dtype::i64,  dtype::f16, dtype::bf16,
                                             dtype::f32, dtype::f64, dtype::boolean, dtype::f8_e5m2, dtype::f8_e4m3};
static_assert(std::size(container_dtypes) == std::size(all_dtypes), "every s2lc::dtype needs a container code");

/// The on-disk code of `t`.
constexpr std::uint8_t container_dtype_code(dtype t) noexcept {
  for (std::size_t i = 0; i < std::size(container_dtypes); ++i)
    if (container_dtypes[i] == t) return static_cast<std::uint8_t>(i);
  return 0xFF;  // unreachable: the static_assert above keeps the table complete
}

/// The dtype stored as `code`; nullopt for an unknown code.
constexpr std::optional<dtype> container_dtype_from_code(std::uint8_t code) noexcept {
  if (code < std::size(container_dtypes)) return container_dtypes[code];
  return std::nullopt;
}

/// The decoded 64-byte header.
struct ContainerHeader {
  std::uint16_t version_major = container_version_major;
  std::uint16_t version_minor = container_version_minor;
  std::uint32_t flags = 0;
  std::uint64_t section_count = 0;
  std::uint64_t table_offset = container_header_size;
  std::uint64_t table_size = 0;
  std::uint64_t file_size = container_header_size;
  std::uint32_t table_crc = 0;
  std::uint32_t header_crc = 0;
};

/// One section of a parsed container. `bytes` views the parsed buffer (the mapping, for
/// ContainerFile): it lives as long as that buffer.
struct ContainerSection {
  std::string name;
  section_kind kind = section_kind::array;
  dtype type = dtype::u8;
  std::vector<std::uint64_t> shape;
  std::uint64_t offset = 0;  ///< absolute byte offset of the data in the file
  std::uint64_t size = 0;    ///< bytes
  std::uint32_t crc = 0;     ///< stored CRC-32C of the data
  std::span<const std::byte> bytes;

  std::uint64_t numel() const noexcept {
    std::uint64_t n = 1;
    for (auto d : shape) n *= d;  // cannot overflow: validated against size
    return n;
  }
};

/// How much parse_container checks.
enum class container_checks : std::uint8_t {
  full,       ///< default: structure + every section's CRC-32C + zero padding (reads every byte)
  structure,  ///< header, table (incl. their checksums), bounds, overlaps: O(table size)
};

namespace detail {

inline std::uint16_t load_le16(const std::byte* p) noexcept {
  return static_cast<std::uint16_t>(static_cast<unsigned>(p[0]) | (static_cast<unsigned>(p[1]) << 8));
}
inline std::uint32_t load_le32(const std::byte* p) noexcept { return crc32c_load_le32(p); }

inline void store_le(std::byte* p, std::uint64_t v, std::size_t n) noexcept {
  for (std::size_t i = 0; i < n; ++i) p[i] = static_cast<std::byte>((v >> (8 * i)) & 0xFFu);
}
inline void append_le(std::vector<std::byte>& out, std::uint64_t v, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) out.push_back(static_cast<std::byte>((v >> (8 * i)) & 0xFFu));
}

inline std::string hex32(std::uint32_t v) {
  static constexpr char digits[] = "0123456789abcdef";
  std::string s = "0x";
  for (int i = 7; i >= 0; --i) s += digits[(v >> (4 * i)) & 0xFu];
  return s;
}

inline std::string hex_bytes(std::span<const std::byte> b) {
  static constexpr char digits[] = "0123456789ABCDEF";
  std::string s;
  for (std::byte x : b) {
    if (!s.empty()) s += ' ';
    s += digits[static_cast<unsigned>(x) >> 4];
    s += digits[static_cast<unsigned>(x) & 0xFu];
  }
  return s;
}

/// Strict UTF-8 (RFC 3629): no overlong forms, no surrogates, nothing past U+10FFFF.
constexpr bool is_valid_utf8(std::string_view s) noexcept {
  std::size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    std::size_t n = 0;
    unsigned lo = 0x80, hi = 0xBF;  // allowed range of the first continuation byte
    if (c < 0x80) {
      ++i;
      continue;
    } else if (c >= 0xC2 && c <= 0xDF) {
      n = 1;
    } else if (c >= 0xE0 && c <= 0xEF) {
      n = 2;
      if (c == 0xE0) lo = 0xA0;  // overlong
      if (c == 0xED) hi = 0x9F;  // surrogates
    } else if (c >= 0xF0 && c <= 0xF4) {
      n = 3;
      if (c == 0xF0) lo = 0x90;  // overlong
      if (c == 0xF4) hi = 0x8F;  // > U+10FFFF
    } else {
      return false;
    }
    if (s.size() - i - 1 < n) return false;
    for (std::size_t k = 1; k <= n; ++k) {
      const auto b = static_cast<unsigned char>(s[i + k]);
      if (k == 1 ? (b < lo || b > hi) : (b < 0x80 || b > 0xBF)) return false;
    }
    i += n + 1;
  }
  return true;
}

/// A name safe to print: control bytes (NUL included) and, unless the name is valid UTF-8, every
/// byte >= 0x80 as \xNN; names longer than 64 bytes are cut short with "...".
inline std::string printable_name(std::string_view name) {
  static constexpr char digits[] = "0123456789ABCDEF";
  const bool utf8 = is_valid_utf8(name);
  std::string out;
  for (std::size_t i = 0; i < name.size() && i < 64; ++i) {
    const auto c = static_cast<unsigned char>(name[i]);
    if (c < 0x20 || c == 0x7F || (c >= 0x80 && !utf8)) {
      out += "\\x";
      out += digits[c >> 4];
      out += digits[c & 0xFu];
    } else {
      out += static_cast<char>(c);
    }
  }
  if (name.size() > 64) out += "...";
  return out;
}

/// Why `name` cannot name a section, or an empty string if it can.
inline std::string section_name_problem(std::string_view name) {
  if (name.empty()) return "section name is empty";
  if (name.size() > container_max_name)
    return "section name of " + std::to_string(name.size()) + " bytes exceeds " + std::to_string(container_max_name);
  if (name.find('\0') != std::string_view::npos) return "section name \"" + printable_name(name) + "\" contains a NUL byte";
  if (!is_valid_utf8(name)) return "section name \"" + printable_name(name) + "\" is not valid UTF-8";
  return {};
}

/// product(shape) * dtype_size(type), or nullopt if that overflows 64 bits.
inline std::optional<std::uint64_t> section_nbytes(dtype type, std::span<const std::uint64_t> shape) noexcept {
  std::uint64_t n = dtype_size(type);
  for (auto d : shape)
    if (__builtin_mul_overflow(n, d, &n)) return std::nullopt;
  return n;
}

constexpr std::uint64_t align_up(std::uint64_t v, std::uint64_t a) noexcept { return (v + a - 1) / a * a; }

}  // namespace detail

class ContainerView;
ContainerView parse_container(std::span<const std::byte> bytes, std::string label, container_checks checks = container_checks::full);

/// A parsed, validated container over bytes it does not own (a mapping or a caller's buffer,
/// which must outlive the view). Sections are in table order; lookups by name are O(log n).
class ContainerView {
 public:
  ContainerView() = default;

  /// The name used for the file in error messages.
  const std::string& label() const noexcept { return label_; }
  const ContainerHeader& header() const noexcept { return header_; }
  std::span<const std::byte> file() const noexcept { return file_; }
  const std::vector<ContainerSection>& sections() const noexcept { return sections_; }

  const ContainerSection* find(std::string_view name) const noexcept {
    const auto it = std::lower_bound(by_name_.begin(), by_name_.end(), name,
                                     [&](std::size_t i, std::string_view n) { return sections_[i].name < n; });
    return it != by_name_.end() && sections_[*it].name == name ? &sections_[*it] : nullptr;
  }

  /// The section called `name`; invalid_argument naming the section and the file if missing.
  const ContainerSection& at(std::string_view name) const {
    if (const auto* s = find(name)) return *s;
    throw invalid_argument("no such section", {label_, std::string(name), {}});
  }

  /// The raw bytes of a section (any kind).
  std::span<const std::byte> bytes(std::string_view name) const { return at(name).bytes; }

  /// A typed view of an array section. T must match its dtype (bf16_t / f16_t for the 16-bit
  /// floats) and the data must be aligned for T in memory (always true in a ContainerFile:
  /// sections sit at multiples of 64 in a page-aligned mapping).
  template <typename T>
  std::span<const T> array(std::string_view name) const {
    static_assert(std::endian::native == std::endian::little, "typed views of little-endian data need a little-endian host");
    const ContainerSection& s = at(name);
    const error_location where{label_, s.name, s.offset};
    if (s.kind != section_kind::array)
      throw invalid_argument("is a " + std::string(section_kind_name(s.kind)) + " section, not an array", where);
    if (s.type != dtype_of_v<T>)
      throw invalid_argument("stored as " + std::string(dtype_name(s.type)) + ", requested as " + std::string(dtype_name(dtype_of_v<T>)), where);
    if (reinterpret_cast<std::uintptr_t>(s.bytes.data()) % alignof(T) != 0)
      throw invalid_argument("data are not aligned to " + std::to_string(alignof(T)) +
                                 " bytes in memory (parse a copy of the file in aligned memory)", where);
    return {reinterpret_cast<const T*>(s.bytes.data()), static_cast<std::size_t>(s.numel())};
  }

  /// Parses a json section. Invalid JSON and keys repeated within an object are format_errors
  /// naming the section and the absolute offset of the problem.
  nlohmann::json json(std::string_view name) const {
    const ContainerSection& s = at(name);
    if (s.kind != section_kind::json)
      throw invalid_argument("is an " + std::string(section_kind_name(s.kind)) + " section, not json", {label_, s.name, s.offset});
    const std::string_view text(reinterpret_cast<const char*>(s.bytes.data()), s.bytes.size());
    nlohmann::json value;
    try {
      value = nlohmann::json::parse(text.begin(), text.end());
    } catch (const nlohmann::json::parse_error& e) {
      const std::uint64_t at_byte = std::min<std::uint64_t>(e.byte > 0 ? e.byte - 1 : 0, s.size);
      throw format_error(std::string("invalid JSON: ") + e.what(), {label_, s.name, s.offset + at_byte});
    } catch (const nlohmann::json::exception& e) {  // e.g. out_of_range 406: a number too large for a double
      throw format_error(std::string("invalid JSON: ") + e.what(), {label_, s.name, s.offset});
    }
    detail::DuplicateKeys keys;
    if (!nlohmann::json::sax_parse(text.begin(), text.end(), &keys) && !keys.duplicate.empty())
      throw format_error("JSON key \"" + keys.duplicate + "\" appears twice in one object", {label_, s.name, s.offset});
    return value;
  }

  /// Verifies every section's CRC-32C and that all bytes between sections are zero (what
  /// parse_container does with container_checks::full).
  void verify() const {
    std::uint64_t pos = container_header_size;
    auto check_zero = [&](std::uint64_t begin, std::uint64_t end, const ContainerSection* next) {
      for (std::uint64_t i = begin; i < end; ++i)
        if (file_[static_cast<std::size_t>(i)] != std::byte{0})
          throw format_error("non-zero byte " + detail::hex_bytes(file_.subspan(static_cast<std::size_t>(i), 1)) + " in the padding before " +
                                 (next != nullptr ? "section '" + next->name + "'" : std::string("the section table")),
                             {label_, {}, i});
    };
    for (std::size_t i : by_offset_) {
      const ContainerSection& s = sections_[i];
      if (s.size != 0) check_zero(pos, s.offset, &s);
      const std::uint32_t computed = crc32c(s.bytes);  // 0 for an empty section, which must store 0
      if (computed != s.crc)
        throw format_error("checksum mismatch (stored " + detail::hex32(s.crc) + ", computed " + detail::hex32(computed) + ")",
                           {label_, s.name, s.offset});
      if (s.size != 0) pos = s.offset + s.size;
    }
    check_zero(pos, header_.table_offset, nullptr);
  }

 private:
  friend ContainerView parse_container(std::span<const std::byte>, std::string, container_checks);

  std::string label_;
  ContainerHeader header_;
  std::span<const std::byte> file_;
  std::vector<ContainerSection> sections_;
  std::vector<std::size_t> by_name_;    // section indices sorted by name
  std::vector<std::size_t> by_offset_;  // section indices sorted by (offset, size)
};

/// Parses and validates a complete container held in `bytes` (see the format at the top of this
/// file); `label` names it in error messages. The fuzzing entry point: every malformed input is a
/// format_error. The returned view refers to `bytes`.
inline ContainerView parse_container(std::span<const std::byte> bytes, std::string label, container_checks checks) {
  ContainerView v;
  v.label_ = std::move(label);
  v.file_ = bytes;
  const std::string& lbl = v.label_;
  const std::uint64_t size = bytes.size();
  const std::byte* p = bytes.data();

  // --- header
  const std::size_t magic_seen = static_cast<std::size_t>(std::min<std::uint64_t>(size, container_magic.size()));
  if (!std::equal(p, p + magic_seen, container_magic.begin()))
    throw format_error("bad magic " + detail::hex_bytes(bytes.first(magic_seen)) + ", expected " + detail::hex_bytes(container_magic) +
                           " (not an s2lc container)", {lbl, {}, 0});
  if (size < container_header_size)
    throw format_error("truncated file: " + std::to_string(size) + " bytes, the header alone takes " + std::to_string(container_header_size),
                       {lbl, {}, size});
  ContainerHeader& h = v.header_;
  h.version_major = detail::load_le16(p + 8);
  h.version_minor = detail::load_le16(p + 10);
  h.flags = detail::load_le32(p + 12);
  h.section_count = detail::load_le64(p + 16);
  h.table_offset = detail::load_le64(p + 24);
  h.table_size = detail::load_le64(p + 32);
  h.file_size = detail::load_le64(p + 40);
  h.table_crc = detail::load_le32(p + 48);
  h.header_crc = detail::load_le32(p + 60);
  if (h.version_major != container_version_major)
    throw format_error("unsupported format version " + std::to_string(h.version_major) + "." + std::to_string(h.version_minor) +
                           " (this reader reads version " + std::to_string(container_version_major) + ".x)", {lbl, {}, 8});
  const std::uint32_t header_crc = crc32c(bytes.first(60));
  if (header_crc != h.header_crc)
    throw format_error("header checksum mismatch (stored " + detail::hex32(h.header_crc) + ", computed " + detail::hex32(header_crc) + ")",
                       {lbl, {}, 60});
  if (h.flags != 0) throw format_error("unknown flags " + detail::hex32(h.flags) + " (version 1 defines none)", {lbl, {}, 12});
  for (std::uint64_t i = 52; i < 60; ++i)
    if (p[i] != std::byte{0}) throw format_error("reserved header bytes [52, 60) are not zero", {lbl, {}, i});
  if (h.file_size != size)
    throw format_error("the header records a file size of " + std::to_string(h.file_size) + " bytes but the file has " + std::to_string(size) +
                           (size < h.file_size ? " (truncated file)" : " (trailing bytes or a corrupt header)"), {lbl, {}, 40});
  if (h.table_offset < container_header_size || h.table_offset % container_alignment != 0)
    throw format_error("section table offset " + std::to_string(h.table_offset) + " is not a multiple of 64 at or after the 64-byte header",
                       {lbl, {}, 24});
  if (h.table_offset > size || h.table_size != size - h.table_offset)
    throw format_error("section table at " + std::to_string(h.table_offset) + " of " + std::to_string(h.table_size) +
                           " bytes does not end at the end of the " + std::to_string(size) + "-byte file", {lbl, {}, 32});
  if (h.section_count > h.table_size / container_min_entry)
    throw format_error(std::to_string(h.section_count) + " sections cannot fit in a " + std::to_string(h.table_size) +
                           "-byte section table (entries take at least " + std::to_string(container_min_entry) + " bytes)", {lbl, {}, 16});
  const auto table = bytes.subspan(static_cast<std::size_t>(h.table_offset));
  const std::uint32_t table_crc = crc32c(table);
  if (table_crc != h.table_crc)
    throw format_error("section table checksum mismatch (stored " + detail::hex32(h.table_crc) + ", computed " + detail::hex32(table_crc) + ")",
                       {lbl, {}, h.table_offset});

  // --- section table
  const std::size_t count = static_cast<std::size_t>(h.section_count);  // bounded by the file size above
  v.sections_.reserve(count);
  std::vector<std::uint64_t> name_at;  // absolute offset of each entry's name (for duplicate errors)
  name_at.reserve(count);
  std::size_t pos = 0;
  const std::uint64_t base = h.table_offset;
  for (std::size_t i = 0; i < count; ++i) {
    const std::string entry = "section table entry #" + std::to_string(i);
    std::string name;  // known once read and validated: then every error names it
    auto need = [&](std::size_t n, const char* what) {
      if (table.size() - pos < n)
        throw format_error(entry + " is cut off: needs " + std::to_string(n) + " bytes for its " + what + ", the table has " +
                               std::to_string(table.size() - pos) + " left", {lbl, name, base + pos});
    };
    need(2, "name length");
    const std::size_t name_length = detail::load_le16(table.data() + pos);
    if (name_length == 0 || name_length > container_max_name)
      throw format_error(entry + ": name length " + std::to_string(name_length) + " is outside 1.." + std::to_string(container_max_name),
                         {lbl, {}, base + pos});
    pos += 2;
    need(name_length, "name bytes");
    const std::string_view raw(reinterpret_cast<const char*>(table.data() + pos), name_length);
    if (const std::string why = detail::section_name_problem(raw); !why.empty()) throw format_error(entry + ": " + why, {lbl, {}, base + pos});
    name.assign(raw);
    name_at.push_back(base + pos);
    pos += name_length;

    need(4, "kind, dtype and rank");
    ContainerSection s;
    const std::uint16_t kind = detail::load_le16(table.data() + pos);
    if (kind > static_cast<std::uint16_t>(section_kind::array))
      throw format_error("unknown section kind " + std::to_string(kind) + " (0 = json, 1 = array)", {lbl, name, base + pos});
    s.kind = static_cast<section_kind>(kind);
    const auto code = static_cast<std::uint8_t>(table[pos + 2]);
    const auto type = container_dtype_from_code(code);
    if (!type) throw format_error("unknown dtype code " + std::to_string(code), {lbl, name, base + pos + 2});
    s.type = *type;
    const auto rank = static_cast<std::uint8_t>(table[pos + 3]);
    if (rank > container_max_rank)
      throw format_error("rank " + std::to_string(rank) + " exceeds " + std::to_string(container_max_rank), {lbl, name, base + pos + 3});
    pos += 4;
    need(8 * std::size_t{rank} + 8 + 8 + 4, "dimensions, offset, size and checksum");
    const std::uint64_t dims_at = base + pos;
    for (std::size_t d = 0; d < rank; ++d, pos += 8) s.shape.push_back(detail::load_le64(table.data() + pos));
    const std::uint64_t offset_at = base + pos;
    s.offset = detail::load_le64(table.data() + pos);
    s.size = detail::load_le64(table.data() + pos + 8);
    s.crc = detail::load_le32(table.data() + pos + 16);
    pos += 20;

    if (s.kind == section_kind::json && (s.type != dtype::u8 || rank != 1))
      throw format_error("a json section must be a rank-1 U8 array, got " + std::string(dtype_name(s.type)) + " of rank " + std::to_string(rank),
                         {lbl, name, dims_at - 4});
    const auto nbytes = detail::section_nbytes(s.type, s.shape);
    if (!nbytes)
      throw format_error("size of shape " + shape_string(s.shape) + " x " + std::string(dtype_name(s.type)) + " overflows 64 bits", {lbl, name, dims_at});
    if (*nbytes != s.size)
      throw format_error("shape " + shape_string(s.shape) + " of " + std::string(dtype_name(s.type)) + " needs " + std::to_string(*nbytes) +
                             " bytes but the entry records " + std::to_string(s.size), {lbl, name, offset_at + 8});
    if (s.offset < container_header_size || s.offset % container_alignment != 0)
      throw format_error("data offset " + std::to_string(s.offset) + " is not a multiple of 64 at or after the 64-byte header", {lbl, name, offset_at});
    std::uint64_t end = 0;
    if (__builtin_add_overflow(s.offset, s.size, &end))
      throw format_error("data offset " + std::to_string(s.offset) + " + size " + std::to_string(s.size) + " overflows 64 bits", {lbl, name, offset_at});
    if (end > h.table_offset)
      throw format_error("data [" + std::to_string(s.offset) + ", " + std::to_string(end) + ") run past the start of the section table at " +
                             std::to_string(h.table_offset), {lbl, name, offset_at});
    s.bytes = bytes.subspan(static_cast<std::size_t>(s.offset), static_cast<std::size_t>(s.size));
    s.name = std::move(name);
    v.sections_.push_back(std::move(s));
  }
  if (pos != table.size())
    throw format_error(std::to_string(table.size() - pos) + " trailing bytes after the last section table entry", {lbl, {}, base + pos});

  // --- names unique, data disjoint
  const auto& secs = v.sections_;
  v.by_name_.resize(count);
  v.by_offset_.resize(count);
  for (std::size_t i = 0; i < count; ++i) v.by_name_[i] = v.by_offset_[i] = i;
  std::sort(v.by_name_.begin(), v.by_name_.end(),
            [&](std::size_t a, std::size_t b) { return secs[a].name != secs[b].name ? secs[a].name < secs[b].name : a < b; });
  for (std::size_t k = 1; k < count; ++k) {
    const std::size_t a = v.by_name_[k - 1], b = v.by_name_[k];
    if (secs[a].name == secs[b].name)
      throw format_error("section name appears twice (table entries #" + std::to_string(a) + " and #" + std::to_string(b) + ")",
                         {lbl, secs[b].name, name_at[b]});
  }
  std::sort(v.by_offset_.begin(), v.by_offset_.end(), [&](std::size_t a, std::size_t b) {
    return secs[a].offset != secs[b].offset ? secs[a].offset < secs[b].offset : (secs[a].size != secs[b].size ? secs[a].size < secs[b].size : a < b);
  });
  std::uint64_t covered = container_header_size;
  const ContainerSection* last = nullptr;
  for (std::size_t i : v.by_offset_) {
    const ContainerSection& s = secs[i];
    if (s.size == 0) continue;
    if (s.offset < covered)
      throw format_error("data [" + std::to_string(s.offset) + ", " + std::to_string(s.offset + s.size) + ") overlap section '" + last->name + "' [" +
                             std::to_string(last->offset) + ", " + std::to_string(last->offset + last->size) + ")", {lbl, s.name, s.offset});
    covered = s.offset + s.size;
    last = &s;
  }

  if (checks == container_checks::full) v.verify();
  return v;
}

/// A container file, memory-mapped and validated (by default including every checksum, see
/// container_checks). Section bytes are views into the mapping; moving the object keeps them valid.
class ContainerFile {
 public:
  explicit ContainerFile(const std::filesystem::path& path, container_checks checks = container_checks::full)
      : map_(path), view_(parse_container(map_.bytes(), path.string(), checks)) {}

  static ContainerFile open(const std::filesystem::path& path, container_checks checks = container_checks::full) {
    return ContainerFile(path, checks);
  }

  const std::filesystem::path& path() const noexcept { return map_.path(); }
  std::uint64_t file_size() const noexcept { return map_.size(); }
  const ContainerView& view() const noexcept { return view_; }
  const ContainerHeader& header() const noexcept { return view_.header(); }
  const std::vector<ContainerSection>& sections() const noexcept { return view_.sections(); }
  const ContainerSection* find(std::string_view name) const noexcept { return view_.find(name); }
  const ContainerSection& at(std::string_view name) const { return view_.at(name); }
  std::span<const std::byte> bytes(std::string_view name) const { return view_.bytes(name); }
  template <typename T>
  std::span<const T> array(std::string_view name) const {
    return view_.template array<T>(name);
  }
  nlohmann::json json(std::string_view name) const { return view_.json(name); }
  void verify() const { view_.verify(); }

 private:
  MappedFile map_;
  ContainerView view_;
};

/// Collects sections and writes them as a container. The builder copies everything it is given
/// (callers may free their buffers right after add_*); sections are written in the order added.
/// Invalid names, shapes and sizes are rejected when added, as invalid_argument naming the section.
class ContainerBuilder {
 public:
  /// A JSON section holding `value.dump()` (compact, UTF-8).
  void add_json(std::string name, const nlohmann::json& value) {
    std::string text;
    try {
      text = value.dump();
    } catch (const nlohmann::json::exception& e) {  // type_error 316: a string that is not UTF-8
      throw invalid_argument(std::string("JSON value cannot be serialised: ") + e.what(), {{}, name, {}});
    }
    const auto b = std::as_bytes(std::span<const char>(text.data(), text.size()));
    add(std::move(name), section_kind::json, dtype::u8, {text.size()}, b);
  }

  /// An array section: `data` holds product(shape) elements of `type`, little-endian, row-major.
  void add_array(std::string name, dtype type, std::vector<std::uint64_t> shape, std::span<const std::byte> data) {
    add(std::move(name), section_kind::array, type, std::move(shape), data);
  }

  /// Typed convenience: add_array<float>("w", {2, 3}, values).
  template <typename T>
  void add_array(std::string name, std::vector<std::uint64_t> shape, std::span<const T> values) {
    add(std::move(name), section_kind::array, dtype_of_v<T>, std::move(shape), std::as_bytes(values));
  }

  /// Plain bytes: a rank-1 U8 array.
  void add_bytes(std::string name, std::span<const std::byte> data) {
    add(std::move(name), section_kind::array, dtype::u8, {data.size()}, data);
  }

  std::size_t size() const noexcept { return sections_.size(); }
  bool contains(std::string_view name) const { return names_.count(std::string(name)) != 0; }

  /// The size of the file to_bytes() and write() produce.
  std::uint64_t file_size() const { return layout().header.file_size; }

  /// The complete file in memory.
  std::vector<std::byte> to_bytes() const {
    const Layout l = layout();
    std::vector<std::byte> out(static_cast<std::size_t>(l.header.file_size), std::byte{0});
    std::memcpy(out.data(), l.header_bytes.data(), l.header_bytes.size());
    for (std::size_t i = 0; i < sections_.size(); ++i)
      if (!sections_[i].data.empty()) std::memcpy(out.data() + l.offsets[i], sections_[i].data.data(), sections_[i].data.size());
    if (!l.table.empty()) std::memcpy(out.data() + l.header.table_offset, l.table.data(), l.table.size());
    return out;
  }

  /// Writes the file crash-safely (temporary file in the same directory, fsync, rename): on any
  /// failure an existing file at `path` is left untouched and no temporary remains.
  void write(const std::filesystem::path& path) const {
    const Layout l = layout();
    static constexpr std::array<std::byte, container_alignment> zeros{};
    write_atomically(path, [&](FileSink& out) {
      out.write(l.header_bytes);
      std::uint64_t pos = container_header_size;
      for (std::size_t i = 0; i < sections_.size(); ++i) {
        out.write(std::span<const std::byte>(zeros).first(static_cast<std::size_t>(l.offsets[i] - pos)));
        out.write(sections_[i].data);
        pos = l.offsets[i] + sections_[i].data.size();
      }
      out.write(std::span<const std::byte>(zeros).first(static_cast<std::size_t>(l.header.table_offset - pos)));
      out.write(l.table);
    });
  }

 private:
  struct Pending {
    std::string name;
    section_kind kind;
    dtype type;
    std::vector<std::uint64_t> shape;
    std::vector<std::byte> data;
    std::uint32_t crc;
  };
  struct Layout {
    ContainerHeader header;
    std::array<std::byte, container_header_size> header_bytes{};
    std::vector<std::uint64_t> offsets;
    std::vector<std::byte> table;
  };

  void add(std::string name, section_kind kind, dtype type, std::vector<std::uint64_t> shape, std::span<const std::byte> data) {
    if (const std::string why = detail::section_name_problem(name); !why.empty())
      throw invalid_argument(why, {{}, detail::printable_name(name), {}});
    if (names_.count(name) != 0) throw invalid_argument("section name given twice", {{}, name, {}});
    if (shape.size() > container_max_rank)
      throw invalid_argument("rank " + std::to_string(shape.size()) + " exceeds " + std::to_string(container_max_rank), {{}, name, {}});
    const auto nbytes = detail::section_nbytes(type, shape);
    if (!nbytes)
      throw invalid_argument("size of shape " + shape_string(shape) + " x " + std::string(dtype_name(type)) + " overflows 64 bits", {{}, name, {}});
    if (*nbytes != data.size())
      throw invalid_argument("shape " + shape_string(shape) + " of " + std::string(dtype_name(type)) + " needs " + std::to_string(*nbytes) +
                                 " bytes, got " + std::to_string(data.size()), {{}, name, {}});
    names_.insert(name);
    sections_.push_back({std::move(name), kind, type, std::move(shape), std::vector<std::byte>(data.begin(), data.end()), crc32c(data)});
  }

  Layout layout() const {
    Layout l;
    l.offsets.reserve(sections_.size());
    std::uint64_t pos = container_header_size;
    for (const auto& s : sections_) {
      l.offsets.push_back(pos);
      pos = detail::align_up(pos + s.data.size(), container_alignment);
    }
    for (std::size_t i = 0; i < sections_.size(); ++i) {
      const auto& s = sections_[i];
      detail::append_le(l.table, s.name.size(), 2);
      for (char c : s.name) l.table.push_back(static_cast<std::byte>(c));
      detail::append_le(l.table, static_cast<std::uint16_t>(s.kind), 2);
      detail::append_le(l.table, container_dtype_code(s.type), 1);
      detail::append_le(l.table, s.shape.size(), 1);
      for (auto d : s.shape) detail::append_le(l.table, d, 8);
      detail::append_le(l.table, l.offsets[i], 8);
      detail::append_le(l.table, s.data.size(), 8);
      detail::append_le(l.table, s.crc, 4);
    }
    ContainerHeader& h = l.header;
    h.section_count = sections_.size();
    h.table_offset = pos;
    h.table_size = l.table.size();
    h.file_size = pos + l.table.size();
    h.table_crc = crc32c(l.table);
    std::byte* p = l.header_bytes.data();
    std::memcpy(p, container_magic.data(), container_magic.size());
    detail::store_le(p + 8, h.version_major, 2);
    detail::store_le(p + 10, h.version_minor, 2);
    detail::store_le(p + 12, h.flags, 4);
    detail::store_le(p + 16, h.section_count, 8);
    detail::store_le(p + 24, h.table_offset, 8);
    detail::store_le(p + 32, h.table_size, 8);
    detail::store_le(p + 40, h.file_size, 8);
    detail::store_le(p + 48, h.table_crc, 4);
    h.header_crc = crc32c(std::span<const std::byte>(l.header_bytes).first(60));
    detail::store_le(p + 60, h.header_crc, 4);
    return l;
  }

  std::vector<Pending> sections_;
  std::unordered_set<std::string> names_;
};

}  // namespace s2lc::io
