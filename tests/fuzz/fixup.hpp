// Checksum fix-ups shared by the .s2lc fuzz harnesses (container_fuzz.cpp, artifact_fuzz.cpp).
//
// The container's CRC-32Cs stop almost every mutation of a valid file at the first check, so the
// harnesses also try each input "resealed":
//   resealed(in)      the table and header checksums recomputed (when the table range is inside
//                     the input): mutations reach the table-entry and overlap checks, while
//                     corrupt section data are still reported as checksum mismatches.
//   resealed_all(in)  in addition, every section checksum recomputed (for the table entries that
//                     can be read and whose range is inside the input): mutations of the manifest,
//                     block records and payloads reach the reader behind the container.
// Both return nullopt when the input is shorter than the 64-byte header.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include <s2lc/io/container.hpp>

namespace s2lc_fuzz {

/// The n-byte little-endian integer at b[at] (the caller checks the range).
inline std::uint64_t le(std::span<const std::byte> b, std::size_t at, std::size_t n) {
  std::uint64_t v = 0;
  for (std::size_t i = n; i-- > 0;) v = (v << 8) | static_cast<std::uint64_t>(b[at + i]);
  return v;
}

inline void put_le(std::vector<std::byte>& b, std::size_t at, std::uint64_t v, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) b[at + i] = static_cast<std::byte>((v >> (8 * i)) & 0xFFu);
}

namespace detail {

/// Recomputes the table checksum (when the table range is inside f) and then the header's.
inline void seal_header_and_table(std::vector<std::byte>& f) {
  const std::uint64_t off = le(f, 24, 8), size = le(f, 32, 8);
  if (off <= f.size() && size <= f.size() - off)
    put_le(f, 48, s2lc::io::crc32c(std::span<const std::byte>(f).subspan(static_cast<std::size_t>(off), static_cast<std::size_t>(size))), 4);
  put_le(f, 60, s2lc::io::crc32c(std::span<const std::byte>(f).first(60)), 4);
}

}  // namespace detail

/// The input with its table and header checksums recomputed; nullopt when there is no header.
inline std::optional<std::vector<std::byte>> resealed(std::span<const std::byte> in) {
  if (in.size() < s2lc::io::container_header_size) return std::nullopt;
  std::vector<std::byte> f(in.begin(), in.end());
  detail::seal_header_and_table(f);
  return f;
}

/// The input with every readable section checksum, then the table and header checksums,
/// recomputed; nullopt when there is no header. The table is walked as the reader walks it
/// (name length, name, kind, dtype, rank, dims, offset, size, crc) up to the first entry that
/// does not fit in the input; nothing else is validated.
inline std::optional<std::vector<std::byte>> resealed_all(std::span<const std::byte> in) {
  if (in.size() < s2lc::io::container_header_size) return std::nullopt;
  std::vector<std::byte> f(in.begin(), in.end());
  const std::uint64_t off = le(f, 24, 8), count = le(f, 16, 8);
  if (off <= f.size()) {
    std::size_t p = static_cast<std::size_t>(off);
    for (std::uint64_t i = 0; i < count; ++i) {
      if (f.size() - p < 2) break;
      const std::size_t name_length = static_cast<std::size_t>(le(f, p, 2));
      if (f.size() - p - 2 < name_length + 4) break;
      p += 2 + name_length + 4;  // name, kind (2), dtype (1), rank (1)
      const std::size_t need = 8 * static_cast<std::size_t>(f[p - 1]) + 8 + 8 + 4;
      if (f.size() - p < need) break;
      p += need - 20;
      const std::uint64_t at = le(f, p, 8), size = le(f, p + 8, 8);
      if (at <= f.size() && size <= f.size() - at)
        put_le(f, p + 16, s2lc::io::crc32c(std::span<const std::byte>(f).subspan(static_cast<std::size_t>(at), static_cast<std::size_t>(size))), 4);
      p += 20;
    }
  }
  detail::seal_header_and_table(f);
  return f;
}

}  // namespace s2lc_fuzz
