// s2lc::io — CRC-32C (Castagnoli), the checksum of the .s2lc container (s2lc/io/container.hpp).
//
// Reflected polynomial 0x82F63B78, initial value and final xor 0xFFFFFFFF (as in iSCSI, ext4,
// SSE4.2's crc32 instruction): crc32c("123456789") == 0xE3069283. Software slice-by-8 over tables
// generated at compile time (constexpr, read-only: no global mutable state, no initialisation
// order issues), so it is usable in constant expressions too. About 2 GB/s per core here (g++ or
// clang -O2, Zen 5), ample for artifacts of tens of MB; a hardware path (SSE4.2 crc32) can be
// added behind the same two functions.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>

namespace s2lc::io {

namespace detail {

inline constexpr std::uint32_t crc32c_poly = 0x82F63B78u;

/// tables[0] is the classic byte-at-a-time table; tables[k][b] is the CRC of byte b followed by
/// k zero bytes, which lets slice-by-8 fold eight input bytes per step.
constexpr std::array<std::array<std::uint32_t, 256>, 8> make_crc32c_tables() noexcept {
  std::array<std::array<std::uint32_t, 256>, 8> t{};
  for (std::uint32_t b = 0; b < 256; ++b) {
    std::uint32_t c = b;
    for (int i = 0; i < 8; ++i) c = (c & 1u) != 0 ? (c >> 1) ^ crc32c_poly : c >> 1;
    t[0][b] = c;
  }
  for (std::size_t k = 1; k < 8; ++k)
    for (std::size_t b = 0; b < 256; ++b) t[k][b] = (t[k - 1][b] >> 8) ^ t[0][t[k - 1][b] & 0xFFu];
  return t;
}

inline constexpr auto crc32c_tables = make_crc32c_tables();

constexpr std::uint32_t crc32c_load_le32(const std::byte* p) noexcept {
  return static_cast<std::uint32_t>(p[0]) | (static_cast<std::uint32_t>(p[1]) << 8) | (static_cast<std::uint32_t>(p[2]) << 16) |
         (static_cast<std::uint32_t>(p[3]) << 24);
}

}  // namespace detail

/// Extends `crc`, the CRC-32C of some bytes A, to the CRC-32C of A followed by `data`:
/// crc32c_extend(crc32c(a), b) == crc32c(a + b), and crc32c_extend(0, x) == crc32c(x).
constexpr std::uint32_t crc32c_extend(std::uint32_t crc, std::span<const std::byte> data) noexcept {
  const auto& t = detail::crc32c_tables;
  std::uint32_t c = ~crc;
  const std::byte* p = data.data();
  std::size_t n = data.size();
  for (; n >= 8; n -= 8, p += 8) {
    const std::uint32_t lo = c ^ detail::crc32c_load_le32(p);
    const std::uint32_t hi = detail::crc32c_load_le32(p + 4);
    c = t[7][lo & 0xFFu] ^ t[6][(lo >> 8) & 0xFFu] ^ t[5][(lo >> 16) & 0xFFu] ^ t[4][lo >> 24] ^ t[3][hi & 0xFFu] ^
        t[2][(hi >> 8) & 0xFFu] ^ t[1][(hi >> 16) & 0xFFu] ^ t[0][hi >> 24];
  }
  for (; n > 0; --n, ++p) c = (c >> 8) ^ t[0][(c ^ static_cast<std::uint32_t>(*p)) & 0xFFu];
  return ~c;
}

/// CRC-32C of `data` (0 for no bytes).
constexpr std::uint32_t crc32c(std::span<const std::byte> data) noexcept { return crc32c_extend(0, data); }

}  // namespace s2lc::io
