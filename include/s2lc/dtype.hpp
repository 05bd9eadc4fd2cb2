// s2lc — element types: the safetensors dtype set, their sizes and names, and exact scalar
// conversions between f32 and the 16-bit float storage formats (bf16, f16), rounding to nearest,
// ties to even, keeping NaN a (quiet) NaN with its sign. Bulk conversions: s2lc/kernels/convert.hpp.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace s2lc {

/// Element types of safetensors files (names as in the safetensors spec).
enum class dtype : std::uint8_t {
  boolean, u8, i8, f8_e5m2, f8_e4m3, i16, u16, f16, bf16, i32, u32, f32, f64, i64, u64,
};

inline constexpr dtype all_dtypes[] = {dtype::boolean, dtype::u8,  dtype::i8,  dtype::f8_e5m2, dtype::f8_e4m3,
                                       dtype::i16,     dtype::u16, dtype::f16, dtype::bf16,    dtype::i32,
                                       dtype::u32,     dtype::f32, dtype::f64, dtype::i64,     dtype::u64};

/// Size of one element in bytes.
constexpr std::size_t dtype_size(dtype t) noexcept {
  switch (t) {
    case dtype::boolean: case dtype::u8: case dtype::i8: case dtype::f8_e5m2: case dtype::f8_e4m3: return 1;
    case dtype::i16: case dtype::u16: case dtype::f16: case dtype::bf16: return 2;
    case dtype::i32: case dtype::u32: case dtype::f32: return 4;
    case dtype::f64: case dtype::i64: case dtype::u64: return 8;
  }
  return 0;
}

/// The safetensors name ("F32", "BF16", ...).
constexpr std::string_view dtype_name(dtype t) noexcept {
  switch (t) {
    case dtype::boolean: return "BOOL";
    case dtype::u8: return "U8";
    case dtype::i8: return "I8";
    case dtype::f8_e5m2: return "F8_E5M2";
    case dtype::f8_e4m3: return "F8_E4M3";
    case dtype::i16: return "I16";
    case dtype::u16: return "U16";
    case dtype::f16: return "F16";
    case dtype::bf16: return "BF16";
    case dtype::i32: return "I32";
    case dtype::u32: return "U32";
    case dtype::f32: return "F32";
    case dtype::f64: return "F64";
    case dtype::i64: return "I64";
    case dtype::u64: return "U64";
  }
  return "?";
}

/// Parses a safetensors dtype name; nullopt when unknown.
constexpr std::optional<dtype> parse_dtype(std::string_view name) noexcept {
  for (dtype t : all_dtypes)
    if (dtype_name(t) == name) return t;
  return std::nullopt;
}

/// True for the floating types s2lc computes with (f32, f16, bf16, f64).
constexpr bool is_float(dtype t) noexcept {
  return t == dtype::f32 || t == dtype::f16 || t == dtype::bf16 || t == dtype::f64;
}

// ---------------------------------------------------------------------------------------------
// Scalar conversions (the reference semantics of the SIMD kernels in kernels/convert-inl.h).

/// bf16 bits -> f32: exact.
constexpr float bf16_to_f32(std::uint16_t h) noexcept {
  return std::bit_cast<float>(static_cast<std::uint32_t>(h) << 16);
}

/// f32 -> bf16 bits: round to nearest, ties to even; NaN stays NaN (quiet bit set, sign and top
/// payload bits kept); overflow rounds to +-Inf as IEEE requires.
constexpr std::uint16_t f32_to_bf16(float f) noexcept {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(f);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<std::uint16_t>((bits >> 16) | 0x0040u);
  const std::uint32_t lsb = (bits >> 16) & 1u;
  return static_cast<std::uint16_t>((bits + 0x7FFFu + lsb) >> 16);
}

/// f16 (IEEE binary16) bits -> f32: exact, including subnormals, Inf and NaN payloads.
constexpr float f16_to_f32(std::uint16_t h) noexcept {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1Fu;
  const std::uint32_t mant = h & 0x3FFu;
  if (exp == 0x1F) return std::bit_cast<float>(sign | 0x7F800000u | (mant << 13));
  if (exp != 0) return std::bit_cast<float>(sign | ((exp + 112u) << 23) | (mant << 13));
  // zero or subnormal: mant * 2^-24, exact in f32
  const float mag = static_cast<float>(mant) * 5.9604644775390625e-08f;
  return std::bit_cast<float>(sign | std::bit_cast<std::uint32_t>(mag));
}

/// f32 -> f16 bits: round to nearest, ties to even, including results that become subnormal or
/// round up to Inf; NaN stays NaN (quiet bit set, sign and top payload bits kept).
constexpr std::uint16_t f32_to_f16(float f) noexcept {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(f);
  const std::uint32_t sign = (bits >> 16) & 0x8000u;
  const std::uint32_t abs = bits & 0x7FFFFFFFu;
  if (abs > 0x7F800000u) return static_cast<std::uint16_t>(sign | 0x7E00u | ((abs >> 13) & 0x3FFu));
  if (abs >= 0x47800000u) return static_cast<std::uint16_t>(sign | 0x7C00u);  // >= 65536: Inf
  if (abs < 0x38800000u) {
    // result is subnormal or zero (|f| < 2^-14): value / 2^-24 rounded to an integer, RNE.
    const std::uint32_t e = abs >> 23;
    if (e < 102) return static_cast<std::uint16_t>(sign);  // < 2^-25: rounds to zero
    const std::uint32_t m = (abs & 0x7FFFFFu) | 0x800000u;
    const std::uint32_t shift = 126u - e;  // 14..24
    const std::uint32_t q = m >> shift;
    const std::uint32_t rem = m & ((1u << shift) - 1u);
    const std::uint32_t half = 1u << (shift - 1u);
    const std::uint32_t r = q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u);
    return static_cast<std::uint16_t>(sign | r);
  }
  // normal: rebias exponent, round mantissa from 23 to 10 bits (a carry may reach Inf: correct).
  const std::uint32_t lsb = (abs >> 13) & 1u;
  const std::uint32_t rounded = abs + 0xFFFu + lsb - (112u << 23);
  return static_cast<std::uint16_t>(sign | (rounded >> 13));
}

/// Storage types: 16-bit wrappers that keep the bit pattern (no implicit arithmetic).
struct bf16_t {
  std::uint16_t bits;
};
struct f16_t {
  std::uint16_t bits;
};

/// Maps a C++ element type to its dtype.
template <typename T> struct dtype_of;
template <> struct dtype_of<float> { static constexpr dtype value = dtype::f32; };
template <> struct dtype_of<double> { static constexpr dtype value = dtype::f64; };
template <> struct dtype_of<bf16_t> { static constexpr dtype value = dtype::bf16; };
template <> struct dtype_of<f16_t> { static constexpr dtype value = dtype::f16; };
template <> struct dtype_of<std::int8_t> { static constexpr dtype value = dtype::i8; };
template <> struct dtype_of<std::uint8_t> { static constexpr dtype value = dtype::u8; };
template <> struct dtype_of<std::int16_t> { static constexpr dtype value = dtype::i16; };
template <> struct dtype_of<std::uint16_t> { static constexpr dtype value = dtype::u16; };
template <> struct dtype_of<std::int32_t> { static constexpr dtype value = dtype::i32; };
template <> struct dtype_of<std::uint32_t> { static constexpr dtype value = dtype::u32; };
template <> struct dtype_of<std::int64_t> { static constexpr dtype value = dtype::i64; };
template <> struct dtype_of<std::uint64_t> { static constexpr dtype value = dtype::u64; };
template <> struct dtype_of<bool> { static constexpr dtype value = dtype::boolean; };
template <typename T> inline constexpr dtype dtype_of_v = dtype_of<T>::value;

}  // namespace s2lc
