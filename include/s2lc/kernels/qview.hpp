// s2lc::kernels — the kernel-side layout of a group-quantized matrix (QView), target-independent.
//
// The storage format (s2lc/compress/quant.hpp) packs b-bit codes back to back, which is compact
// but not SIMD-friendly. Kernels read a repacked copy, made once when a module is loaded:
//
//  * byte container (codes of 5 to 8 bits, or any width when the group size is odd): one int8 per
//    code, row-major, row stride = cols bytes;
//  * nibble container (codes of 2 to 4 bits, even group size): each group of n codes takes
//    h = ceil(n / 2) bytes; byte j holds code j in its low nibble and code j + h in its high
//    nibble (both sign-extended 4-bit). A vector of N bytes then yields two vectors of N codes
//    that pair with two contiguous slices of x. Row stride = sum of the groups' bytes.
//
// Scales stay bf16, [rows, groups_per_row]. A tier t < bits is read as in quant.hpp: the rounded
// top t bits of each code at scale 2^(bits - t) s, computed in registers, so every tier of a
// module runs from the same bytes.
//
//  * rows in lanes (`lanes`; whole groups, a multiple of 8 codes): the rows are cut into panels
//    of 16 (the last one padded with zero codes and zero scales) and stored panel by panel, group
//    by group, one record per (panel, group): for each 4 code bytes of the group (quad k), 64
//    bytes holding quad k of the panel's 16 rows (row i at 4 i); then the 16 rows' bf16 scales of
//    the group (32 bytes). A vector load is then the same 4 bytes of 16 rows: with each token's 4
//    activations broadcast, every row accumulates in its own lane (`vpdpbusd`, or 4 FMAs of the
//    4 columns), with no horizontal sums and one scale vector per group, and the codes, scales
//    and everything a panel needs arrive as one stream. Nibble container: a quad is 4 code bytes
//    of the nibble row (group / 8 quads), each byte stored ^ 0x88 (two nibbles c + 8 in [0, 15]);
//    byte container: a quad is 4 codes, as they are (group / 4 quads). `scales` is null (the
//    scales are in the records, in host byte order). Kernels without a rows-in-lanes body unpack
//    panels (up to 32 KB of codes at a time) into the row-major form (unpack_lanes) and run that.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "s2lc/dtype.hpp"

namespace s2lc::kernels {

/// Rows a caller is about to read and write (rows of row_bytes bytes, ld_bytes apart, from p),
/// which a compute-bound kernel prefetches a few at a time spread over its work, so they stream
/// in from memory under its arithmetic instead of after it.
struct PrefetchRows {
  const void* p = nullptr;
  std::size_t rows = 0, ld_bytes = 0, row_bytes = 0;
};

/// Prefetches the 64-byte lines of [p, p + bytes) into L1 (GCC / Clang; nothing elsewhere). GCC
/// 12 treats __builtin_prefetch as free of side effects, so it marks a function that only
/// prefetches as const and deletes calls to it at -O1 and up (morph's metadata prefetch was
/// compiled away so until 2026-12-02); the empty volatile asm is a side effect it must keep.
inline void prefetch_lines(const void* p, std::size_t bytes) noexcept {
#if defined(__GNUC__) || defined(__clang__)
  const char* c = static_cast<const char*>(p);
  for (std::size_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o);
  asm volatile("");
#else
  (void)p, (void)bytes;
#endif
}

struct QView {
  const std::uint8_t* codes = nullptr;
  const std::uint16_t* scales = nullptr;  ///< bf16 bits, [rows, groups_per_row()]
  std::uint32_t rows = 0, cols = 0, group = 32;
  std::uint8_t bits = 8;     ///< stored code width, 2..8
  bool nibble = false;       ///< nibble container (see above)
  bool lanes = false;        ///< rows in lanes (see above)

  static constexpr std::size_t kLaneRows = 16;
  /// Widest rows the rows-in-lanes layout takes (a panel unpacked fits a 32 KB stack buffer).
  static constexpr std::size_t kLanesMaxCols = 2048;

  std::uint32_t groups_per_row() const noexcept { return (cols + group - 1) / group; }
  /// The group size the kernels take for a matrix of `cols` columns quantized in groups of
  /// `group`: `cols` where its one group is partial (group > cols: a block narrower than the
  /// group, or a row's one scale) and the container allows (bytes, or an even width), else
  /// `group`. The same codes, scales and bytes either way, but a partial group takes the scalar
  /// path and a whole one the vector kernels (4-bit 256 x 64 in groups of 128, AVX-512: q_gemm_nn
  /// at 8 tokens 517 us against 1.3 in groups of 64).
  static std::size_t kernel_group(std::size_t cols, std::size_t group, bool nibble) noexcept {
    return group > cols && cols > 0 && (!nibble || cols % 2 == 0) ? cols : group;
  }
  /// Whether a matrix of this shape can take the rows-in-lanes layout (either container).
  static bool lanes_fit(std::size_t cols, std::size_t group) noexcept {
    return group % 8 == 0 && cols % group == 0 && cols > 0 && cols <= kLanesMaxCols;
  }
  /// Rows in lanes: quads per group, bytes of codes of a record (where its scales start), the
  /// byte each code byte is stored xor'ed with, bytes of one (panel, group) record, of one panel,
  /// and the record itself.
  std::size_t lanes_quads() const noexcept { return nibble ? group / 8 : group / 4; }
  std::size_t lanes_codes() const noexcept { return 64 * lanes_quads(); }
  std::uint8_t lanes_flip() const noexcept { return nibble ? 0x88 : 0x00; }
  std::size_t lanes_record() const noexcept { return lanes_codes() + 32; }
  std::size_t lanes_panel() const noexcept { return lanes_record() * groups_per_row(); }
  const std::uint8_t* lanes_at(std::size_t panel, std::size_t g) const noexcept {
    return codes + panel * lanes_panel() + g * lanes_record();
  }
  std::size_t panels() const noexcept { return (rows + kLaneRows - 1) / kLaneRows; }
  static std::size_t row_bytes(std::size_t cols, std::size_t group, bool nibble) noexcept {
    if (!nibble) return cols;
    return (cols / group) * (group / 2) + ((cols % group) + 1) / 2;
  }
  std::size_t row_bytes() const noexcept { return row_bytes(cols, group, nibble); }
  /// Bytes the kernels read for the whole matrix.
  std::size_t bytes() const noexcept {
    return lanes ? panels() * lanes_panel() : rows * row_bytes() + 2u * rows * groups_per_row();
  }
  /// The bf16 bits of the scale of group g of row r (either layout).
  std::uint16_t scale_bits(std::size_t r, std::size_t g) const noexcept {
    if (!lanes) return scales[r * groups_per_row() + g];
    std::uint16_t s;
    std::memcpy(&s, lanes_at(r / kLaneRows, g) + lanes_codes() + 2 * (r % kLaneRows), 2);  // host order
    return s;
  }
};

/// One token's activations quantized to int8 for the code layout of a QView (q8_quantize), what
/// q8_gemv_nt reads. Per token, `bytes(q)` bytes (rbp = row_bytes() rounded up to 64):
///   [0, rbp)          int8 x paired with the codes byte for byte (nibble: with the low nibbles)
///   [rbp, 2 rbp)      nibble container: int8 x paired with the high nibbles (else zero)
///   [2 rbp, 3 rbp)    f32 scale of the group of each 4-byte lane of the vector body
///   [3 rbp, 4 rbp)    i32 per 4-byte lane of whole groups: 8 (nibbles) or 128 (bytes) times the
///                     sum of its x, the offset of codes read unsigned as c + 8 or c + 128
///   [4 rbp, ...)      f32 scale per group, groups_per_row() of them
/// Group g of x is quantized as xq = round_half_even(x * (127 / amax_g)) with scale amax_g / 127
/// (a group with amax < 1e-30 quantizes to zero; a non-finite x makes its group's scale NaN).
struct Q8Acts {
  static constexpr std::size_t padded(std::size_t rb) noexcept { return (rb + 63) & ~std::size_t{63}; }
  static std::size_t bytes(const QView& q) noexcept {
    return 4 * padded(q.row_bytes()) + padded(4 * std::size_t{q.groups_per_row()});
  }
};

/// How a tier is read: code c -> clamp((c + half) >> shift, lo, hi), value = c' * scale * mul.
struct TierParams {
  int shift = 0, half = 0, lo = -128, hi = 127;
  float mul = 1.0f;
  /// Value of each 4-bit code pattern n (two's complement) at this tier: the table the AVX-512
  /// kernels look nibbles up in (vpermps reads only an index's low 4 bits).
  alignas(64) float nibble[16] = {};
};

/// Operand bits of kernels::lowrank_add_fixed at rank k: (2^rbits - 1) (2^abits - 1) k < 2^31, so
/// no int32 sum of its int16 products overflows.
inline void fixed_bits(std::size_t k, int& rbits, int& abits) noexcept {
  int lk = 0;
  while ((std::size_t{1} << lk) < k) ++lk;
  const int t = 31 - std::min(lk, 29);
  rbits = std::min(15, t / 2), abits = std::min(15, t - t / 2);
}

namespace detail {
/// Code c read at a tier (see TierParams).
inline int tiered(int code, const TierParams& t) noexcept {
  if (t.shift == 0) return code;
  return std::min(std::max((code + t.half) >> t.shift, t.lo), t.hi);
}

}  // namespace detail

inline TierParams tier_params(unsigned bits, unsigned tier) noexcept {
  if (tier == 0 || tier > bits) tier = bits;
  TierParams t;
  t.shift = static_cast<int>(bits - tier);
  t.half = t.shift ? 1 << (t.shift - 1) : 0;
  t.lo = -(1 << (tier - 1));
  t.hi = (1 << (tier - 1)) - 1;
  t.mul = static_cast<float>(1u << t.shift);
  for (int n = 0; n < 16; ++n) t.nibble[n] = static_cast<float>(detail::tiered(n < 8 ? n : n - 16, t));
  return t;
}

namespace detail {

/// The signed 4-bit codes a nibble-container byte holds: its low nibble and its high one.
inline int low_nibble(int byte) noexcept { return static_cast<int>(static_cast<unsigned>(byte) << 28) >> 28; }
inline int high_nibble(int byte) noexcept { return byte >> 4; }

/// The stored code of element (r, c) of q (scalar path: tails, odd groups, references).
inline int stored_code(const QView& q, std::size_t r, std::size_t c) noexcept {
  if (q.lanes) {
    const std::size_t g = c / q.group, j = c % q.group, h = q.group / 2, b = !q.nibble ? j : j < h ? j : j - h;
    const int byte = q.lanes_at(r / QView::kLaneRows, g)[(b / 4) * 64 + (r % QView::kLaneRows) * 4 + b % 4];
    if (!q.nibble) return static_cast<std::int8_t>(byte);
    return (j < h ? byte & 0xF : byte >> 4) - 8;  // c + 8
  }
  const std::uint8_t* row = q.codes + r * q.row_bytes();
  if (!q.nibble) return static_cast<std::int8_t>(row[c]);
  const std::size_t g = c / q.group, j = c % q.group;
  const std::size_t n = std::min<std::size_t>(q.group, q.cols - g * q.group), h = (n + 1) / 2;
  const int byte = static_cast<std::int8_t>(row[g * (q.group / 2) + (j < h ? j : j - h)]);
  return j < h ? low_nibble(byte) : high_nibble(byte);
}

/// Effective scale of group g of row r at a tier (bf16 scale times 2^shift, exact).
inline float group_scale(const QView& q, std::size_t r, std::size_t g, const TierParams& t) noexcept {
  return s2lc::bf16_to_f32(q.scale_bits(r, g)) * t.mul;
}

/// Decoded value of element (r, c): what every kernel's arithmetic starts from.
inline float decode(const QView& q, std::size_t r, std::size_t c, const TierParams& t) noexcept {
  return static_cast<float>(tiered(stored_code(q, r, c), t)) * group_scale(q, r, c / q.group, t);
}

}  // namespace detail

/// The rows-in-lanes form of a row-major q that fits it (QView::lanes_fit) into out
/// (q.bytes() of the result, which is returned): every record written, padded rows as zero codes
/// and zero scales. The inverse of unpack_lanes.
inline QView pack_lanes(const QView& q, std::uint8_t* out) noexcept {
  QView lv = q;
  lv.lanes = true, lv.codes = out, lv.scales = nullptr;
  const std::size_t R = QView::kLaneRows, gpr = q.groups_per_row(), rb = q.row_bytes(), gb = 4 * lv.lanes_quads();
  const std::size_t at = lv.lanes_codes();
  const std::uint8_t flip = lv.lanes_flip();
  for (std::size_t p = 0; p < lv.panels(); ++p)
    for (std::size_t g = 0; g < gpr; ++g) {
      std::uint8_t* rec = out + p * lv.lanes_panel() + g * lv.lanes_record();
      std::memset(rec, flip, at);                          // padded rows: codes 0 (stored ^ flip)
      std::memset(rec + at, 0, 2 * QView::kLaneRows);  // ... and scales 0
      for (std::size_t i = 0; i < R && p * R + i < q.rows; ++i) {
        const std::size_t r = p * R + i;
        for (std::size_t b = 0; b < gb; ++b) rec[(b / 4) * 64 + i * 4 + b % 4] = q.codes[r * rb + g * gb + b] ^ flip;
        std::memcpy(rec + at + 2 * i, &q.scales[r * gpr + g], 2);  // host order
      }
    }
  return lv;
}
/// Panel p of a rows-in-lanes q in the row-major nibble form (unpack_lanes): a view of its rows
/// (q.rows - 16 p of them if fewer than 16) over codes (row stride q.row_bytes()) and scales
/// ([row, group]), with the scales written; the codes are the caller's (unpack_lanes_quads).
inline QView unpack_lanes_view(const QView& q, std::size_t p, std::uint8_t* codes, std::uint16_t* scales) noexcept {
  QView v = q;
  v.lanes = false;
  v.codes = codes, v.scales = scales;
  v.rows = static_cast<std::uint32_t>(std::min(QView::kLaneRows, q.rows - p * QView::kLaneRows));
  const std::size_t gpr = q.groups_per_row(), rec = q.lanes_record(), at = q.lanes_codes();
  const std::uint8_t* r = q.lanes_at(p, 0);
  for (std::size_t g = 0; g < gpr; ++g, r += rec) {
    std::uint16_t s[QView::kLaneRows];
    std::memcpy(s, r + at, sizeof s);  // the records hold them in host order
    for (std::size_t i = 0; i < v.rows; ++i) scales[i * gpr + g] = s[i];
  }
  return v;
}
/// Code bytes [4 m0, row bytes) of rows [i0, i1) of panel p, row-major, into codes (row stride
/// q.row_bytes()); m0 on a group's first quad or not.
inline void unpack_lanes_quads(const QView& q, std::size_t p, std::size_t m0, std::size_t i0, std::size_t i1, std::uint8_t* codes) noexcept {
  const std::size_t nq = q.lanes_quads(), rb = q.row_bytes(), rec = q.lanes_record(), gpr = q.groups_per_row();
  const std::uint32_t flip = 0x01010101u * q.lanes_flip();
  const std::uint8_t* r = q.lanes_at(p, m0 / nq);
  for (std::size_t g = m0 / nq, k = m0 % nq, m = m0; g < gpr; ++g, r += rec, k = 0)
    for (; k < nq; ++k, ++m)
      for (std::size_t i = i0; i < i1; ++i) {
        std::uint32_t w;
        std::memcpy(&w, r + 64 * k + 4 * i, 4);
        w ^= flip;
        std::memcpy(codes + i * rb + 4 * m, &w, 4);
      }
}
/// Panel p of a rows-in-lanes q in the row-major nibble form: its rows' codes and scales, and a
/// QView over them (the scalar form; the kernels move the codes with vectors).
inline QView unpack_lanes(const QView& q, std::size_t p, std::uint8_t* codes, std::uint16_t* scales) noexcept {
  const QView v = unpack_lanes_view(q, p, codes, scales);
  unpack_lanes_quads(q, p, 0, 0, v.rows, codes);
  return v;
}

}  // namespace s2lc::kernels
