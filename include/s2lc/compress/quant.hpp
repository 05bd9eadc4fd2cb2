// s2lc::compress — bit-nested group quantization of row-major float matrices.
//
// Each row is cut into groups of `group` consecutive values (the last one may be shorter); a
// group has one scale s (stored as bf16) and b-bit two's-complement codes, 2 <= b <= 8. The
// quantizer rounds to nearest and has a zero level (mid-tread), like the int-N baselines users
// know; the scale maps the group's largest magnitude to the largest positive code:
//
//     s = absmax / (2^(b-1) - 1),   q = clamp(floor(x / s + 1/2), -2^(b-1), 2^(b-1) - 1),   x^ = q s
//
// (Measured on moe-scratch8: a mid-rise quantizer without a zero level has 21 % less squared
// error at 3 bits yet costs 17x more bits-per-byte; small weights must be able to stay zero.)
//
// Bit-nested tiers: reading a b-bit code at t < b bits takes its top t bits, rounded:
// c = clamp((q + 2^(k-1)) >> k) with k = b - t, at scale 2^k s. That is exactly the t-bit
// quantization, at scale 2^k s, of the values the b-bit code stores (q s), so an int4 or int2
// tier of an int8 code is a view of the same bytes, not a copy (tests/compress/quant.cpp).
//
// Packing: code i of the matrix (row-major, rows not padded) occupies bits [i*b, (i+1)*b) of the
// byte stream, least significant bits first.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "s2lc/dtype.hpp"
#include "s2lc/error.hpp"

namespace s2lc::compress {

/// Bit widths a code may be stored with (and tiers it may be read at): 2 to 8.
inline constexpr bool valid_bits(unsigned bits) noexcept { return bits >= 2 && bits <= 8; }

/// A group-quantized [rows, cols] matrix.
struct QMatrix {
  std::uint32_t rows = 0, cols = 0;
  std::uint8_t bits = 8;
  std::uint32_t group = 32;
  std::vector<std::uint8_t> codes;    ///< packed, see the file comment
  std::vector<std::uint16_t> scales;  ///< bf16 bits, [rows, groups_per_row()]

  std::uint32_t groups_per_row() const noexcept { return group ? (cols + group - 1) / group : 0; }
  static std::size_t code_bytes(std::size_t rows, std::size_t cols, unsigned bits) noexcept {
    return (rows * cols * bits + 7) / 8;
  }
  static std::size_t scale_count(std::size_t rows, std::size_t cols, std::size_t group) noexcept {
    return rows * ((cols + group - 1) / group);
  }
  /// Bytes this matrix occupies when stored (codes + scales).
  static std::size_t storage_bytes(std::size_t rows, std::size_t cols, unsigned bits, std::size_t group) noexcept {
    return code_bytes(rows, cols, bits) + 2 * scale_count(rows, cols, group);
  }
  std::size_t storage_bytes() const noexcept { return codes.size() + 2 * scales.size(); }
};

namespace detail {

/// Code i of a packed stream of `n_bytes` bytes (a field may straddle two bytes).
inline int read_code(const std::uint8_t* codes, std::size_t n_bytes, std::size_t i, unsigned bits) noexcept {
  const std::size_t bit = i * bits, byte = bit >> 3;
  const unsigned word = codes[byte] | (byte + 1 < n_bytes ? static_cast<unsigned>(codes[byte + 1]) << 8 : 0u);
  const unsigned raw = (word >> (bit & 7)) & ((1u << bits) - 1u);
  // Sign-extend the b-bit field.
  return static_cast<int>(raw) - static_cast<int>((raw >> (bits - 1)) << bits);
}

inline void write_code(std::uint8_t* codes, std::size_t n_bytes, std::size_t i, unsigned bits, int q) noexcept {
  const std::size_t bit = i * bits, byte = bit >> 3;
  const unsigned mask = ((1u << bits) - 1u) << (bit & 7);
  const unsigned field = (static_cast<unsigned>(q) << (bit & 7)) & mask;
  codes[byte] = static_cast<std::uint8_t>((codes[byte] & ~mask) | field);
  if ((mask >> 8) != 0 && byte + 1 < n_bytes)
    codes[byte + 1] = static_cast<std::uint8_t>((codes[byte + 1] & ~(mask >> 8)) | (field >> 8));
}

inline int clamp_code(int q, unsigned bits) noexcept {
  const int lo = -(1 << (bits - 1)), hi = (1 << (bits - 1)) - 1;
  return std::min(std::max(q, lo), hi);
}

/// The tier-`tier` code of a `bits`-bit code q (see the file comment).
inline int tier_of(int q, unsigned bits, unsigned tier) noexcept {
  const unsigned k = bits - tier;
  if (k == 0) return q;
  return clamp_code((q + (1 << (k - 1))) >> k, tier);
}

inline int quantize_one(float x, float s, unsigned bits) noexcept {
  const int lo = -(1 << (bits - 1)), hi = (1 << (bits - 1)) - 1;
  const float f = std::floor(x / s + 0.5f);
  if (!(f >= static_cast<float>(lo))) return lo;  // also NaN -> lo (inputs are validated finite)
  if (f > static_cast<float>(hi)) return hi;
  return static_cast<int>(f);
}

/// Rounds a positive scale to bf16, never to zero or infinity.
inline std::uint16_t scale_to_bf16(float s) noexcept {
  std::uint16_t h = f32_to_bf16(s);
  if (bf16_to_f32(h) <= 0.0f) h = 0x0080;             // smallest normal bf16
  if (!std::isfinite(bf16_to_f32(h))) h = 0x7f7f;     // largest finite bf16
  return h;
}

inline double group_sq_error(const float* x, std::size_t n, float s, unsigned bits) noexcept {
  double e = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(x[i]) - static_cast<double>(quantize_one(x[i], s, bits)) * s;
    e += d * d;
  }
  return e;
}

}  // namespace detail

/// Options of `quantize`.
struct QuantOptions {
  unsigned bits = 8;
  std::size_t group = 32;
  /// Try clipped scales (c * absmax / (2^(b-1) - 1) for a few c <= 1) and keep the one with the
  /// least squared error per group (never for 8 bits). Off by default: clipping the largest
  /// weights lowers the squared error but not the model's quality.
  bool search_scale = false;
};

/// Quantizes a row-major [rows, cols] float matrix. Values must be finite.
inline QMatrix quantize(const float* x, std::size_t rows, std::size_t cols, const QuantOptions& opt) {
  if (!valid_bits(opt.bits)) throw invalid_argument("quantize: bits must be 2 to 8 (got " + std::to_string(opt.bits) + ")");
  if (opt.group == 0) throw invalid_argument("quantize: group size must be positive");
  if (rows > std::numeric_limits<std::uint32_t>::max() || cols > std::numeric_limits<std::uint32_t>::max())
    throw invalid_argument("quantize: matrix too large");
  QMatrix q;
  q.rows = static_cast<std::uint32_t>(rows);
  q.cols = static_cast<std::uint32_t>(cols);
  q.bits = static_cast<std::uint8_t>(opt.bits);
  q.group = static_cast<std::uint32_t>(opt.group);
  q.codes.assign(QMatrix::code_bytes(rows, cols, opt.bits), 0);
  q.scales.resize(QMatrix::scale_count(rows, cols, opt.group));
  const float max_code = static_cast<float>((1u << (opt.bits - 1)) - 1u);
  static constexpr float clips[] = {1.0f, 0.95f, 0.9f, 0.85f, 0.8f, 0.75f, 0.7f, 0.65f, 0.6f, 0.55f, 0.5f, 0.45f, 0.4f};
  const std::size_t n_clips = (opt.search_scale && opt.bits < 8) ? std::size(clips) : 1;
  const std::size_t gpr = q.groups_per_row();
  for (std::size_t r = 0; r < rows; ++r) {
    for (std::size_t g = 0; g < gpr; ++g) {
      const std::size_t c0 = g * opt.group, n = std::min(opt.group, cols - c0);
      const float* v = x + r * cols + c0;
      float amax = 0;
      for (std::size_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(v[i]));
      std::uint16_t best = 0;  // bf16 zero: the group decodes to zeros
      if (amax > 0) {
        double best_err = std::numeric_limits<double>::infinity();
        for (std::size_t k = 0; k < n_clips; ++k) {
          const std::uint16_t h = detail::scale_to_bf16(clips[k] * amax / max_code);
          const double e = n_clips == 1 ? 0.0 : detail::group_sq_error(v, n, bf16_to_f32(h), opt.bits);
          if (e < best_err) best_err = e, best = h;
        }
      }
      q.scales[r * gpr + g] = best;
      const float s = bf16_to_f32(best);
      for (std::size_t i = 0; i < n; ++i) {
        const int code = s > 0 ? detail::quantize_one(v[i], s, opt.bits) : 0;
        detail::write_code(q.codes.data(), q.codes.size(), r * cols + c0 + i, opt.bits, code);
      }
    }
  }
  return q;
}

/// Decodes row `r` of `q` into out[0, cols), read at `tier` bits (<= q.bits; 0 means q.bits):
/// every code's tier code at scale 2^(bits - tier) s. A group whose scale is zero decodes to zeros.
inline void dequantize_row(const QMatrix& q, std::size_t r, float* out, unsigned tier = 0) {
  if (tier == 0) tier = q.bits;
  if (!valid_bits(tier) || tier > q.bits)
    throw invalid_argument("dequantize: tier " + std::to_string(tier) + " is not a tier of a " + std::to_string(q.bits) + "-bit code");
  const unsigned shift = q.bits - tier;
  const float step = static_cast<float>(1u << shift);
  const std::size_t gpr = q.groups_per_row();
  for (std::size_t g = 0; g < gpr; ++g) {
    const float s = bf16_to_f32(q.scales[r * gpr + g]) * step;
    const std::size_t c0 = g * q.group, n = std::min<std::size_t>(q.group, q.cols - c0);
    for (std::size_t i = 0; i < n; ++i) {
      const int code = detail::tier_of(detail::read_code(q.codes.data(), q.codes.size(), r * q.cols + c0 + i, q.bits), q.bits, tier);
      out[c0 + i] = static_cast<float>(code) * s;
    }
  }
}

/// Decodes the whole matrix (row-major) at `tier` bits.
inline std::vector<float> dequantize(const QMatrix& q, unsigned tier = 0) {
  std::vector<float> out(static_cast<std::size_t>(q.rows) * q.cols);
  for (std::size_t r = 0; r < q.rows; ++r) dequantize_row(q, r, out.data() + r * q.cols, tier);
  return out;
}

/// The `tier`-bit code of element i (row-major) of `q` (tier == q.bits: the stored code).
inline int tier_code(const QMatrix& q, std::size_t i, unsigned tier) {
  if (!valid_bits(tier) || tier > q.bits) throw invalid_argument("tier_code: bad tier");
  return detail::tier_of(detail::read_code(q.codes.data(), q.codes.size(), i, q.bits), q.bits, tier);
}

}  // namespace s2lc::compress
