// Scalar dtype conversions against known bit patterns and independent references.
#include <doctest/doctest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <ios>
#include <limits>

#include <s2lc/dtype.hpp>

// The suite's own scope: the suites compile in unity groups (tests/CMakeLists.txt).
namespace suite_dtype {

using s2lc::bf16_to_f32;
using s2lc::f16_to_f32;
using s2lc::f32_to_bf16;
using s2lc::f32_to_f16;

namespace {
float F(std::uint32_t bits) { return std::bit_cast<float>(bits); }
std::uint32_t B(float f) { return std::bit_cast<std::uint32_t>(f); }

// Independent bf16 reference: pick the nearer of the two bf16 neighbours in exact (double)
// arithmetic, ties to the even one. Finite inputs only.
std::uint16_t bf16_reference(float f) {
  const std::uint32_t bits = B(f);
  const auto lo = static_cast<std::uint16_t>(bits >> 16);
  const auto hi = static_cast<std::uint16_t>(lo + 1);
  const double x = std::fabs(static_cast<double>(f));
  const double dlo = x - std::fabs(static_cast<double>(bf16_to_f32(lo)));
  const double vhi = (hi & 0x7F80) == 0x7F80 ? std::ldexp(1.0, 128) : std::fabs(static_cast<double>(bf16_to_f32(hi)));
  const double dhi = vhi - x;
  if (dlo < dhi) return lo;
  if (dhi < dlo) return hi;
  return (lo & 1) ? hi : lo;
}
}  // namespace

TEST_CASE("dtype: names, sizes and parsing round trip") {
  for (auto t : s2lc::all_dtypes) {
    const auto parsed = s2lc::parse_dtype(s2lc::dtype_name(t));
    REQUIRE(parsed.has_value());
    CHECK(*parsed == t);
    CHECK(s2lc::dtype_size(t) >= 1);
  }
  CHECK(s2lc::dtype_size(s2lc::dtype::bf16) == 2);
  CHECK(s2lc::dtype_size(s2lc::dtype::f64) == 8);
  CHECK(s2lc::dtype_size(s2lc::dtype::f8_e4m3) == 1);
  CHECK_FALSE(s2lc::parse_dtype("F33").has_value());
  CHECK_FALSE(s2lc::parse_dtype("f32").has_value());  // names are case-sensitive, as in the spec
  CHECK_FALSE(s2lc::parse_dtype("").has_value());
}

TEST_CASE("bf16: known bit patterns, ties to even, Inf, NaN, subnormals") {
  CHECK(f32_to_bf16(1.0f) == 0x3F80);
  CHECK(f32_to_bf16(-2.0f) == 0xC000);
  CHECK(f32_to_bf16(F(0x40490FDB)) == 0x4049);  // pi rounds down
  CHECK(f32_to_bf16(F(0x3F808000)) == 0x3F80);  // tie, even below
  CHECK(f32_to_bf16(F(0x3F818000)) == 0x3F82);  // tie, even above
  CHECK(f32_to_bf16(F(0x3F808001)) == 0x3F81);  // just above the tie
  CHECK(f32_to_bf16(F(0x3F807FFF)) == 0x3F80);  // just below the tie
  CHECK(f32_to_bf16(F(0x7F7FFFFF)) == 0x7F80);  // FLT_MAX rounds to +Inf
  CHECK(f32_to_bf16(F(0xFF7FFFFF)) == 0xFF80);
  CHECK(f32_to_bf16(std::numeric_limits<float>::infinity()) == 0x7F80);
  CHECK(f32_to_bf16(-std::numeric_limits<float>::infinity()) == 0xFF80);
  CHECK(f32_to_bf16(F(0x7FC00000)) == 0x7FC0);
  CHECK(f32_to_bf16(F(0xFFC00001)) == 0xFFC0);
  CHECK(f32_to_bf16(F(0x7F800001)) == 0x7FC0);  // signalling NaN stays NaN (naive rounding gives Inf)
  CHECK(f32_to_bf16(F(0x7FFFFFFF)) == 0x7FFF);  // NaN with all payload bits: no overflow into sign
  CHECK(f32_to_bf16(0.0f) == 0x0000);
  CHECK(f32_to_bf16(-0.0f) == 0x8000);
  CHECK(f32_to_bf16(F(0x00000001)) == 0x0000);  // f32 subnormals round like everything else
  CHECK(f32_to_bf16(F(0x00008000)) == 0x0000);  // tie, even
  CHECK(f32_to_bf16(F(0x00018000)) == 0x0002);  // tie, even above
  CHECK(f32_to_bf16(F(0x007FFFFF)) == 0x0080);  // largest subnormal rounds up to smallest normal
  CHECK(B(bf16_to_f32(0x3F80)) == 0x3F800000);
  CHECK(B(bf16_to_f32(0x0001)) == 0x00010000);
  CHECK(std::isnan(bf16_to_f32(0x7FC1)));
}

TEST_CASE("bf16: every bf16 value survives bf16 -> f32 -> bf16 (NaNs come back quiet)") {
  for (std::uint32_t h = 0; h <= 0xFFFF; ++h) {
    const auto v = static_cast<std::uint16_t>(h);
    const bool nan = (v & 0x7F80) == 0x7F80 && (v & 0x7F) != 0;
    const std::uint16_t expect = nan ? static_cast<std::uint16_t>(v | 0x40) : v;
    REQUIRE(f32_to_bf16(bf16_to_f32(v)) == expect);
  }
}

TEST_CASE("bf16: f32 -> bf16 equals the exact nearest-even reference on a sweep of 2^32 patterns") {
  // Every 997th bit pattern (~4.3M values) plus every tie and near-tie around sampled values.
  for (std::uint64_t b = 0; b <= 0xFFFFFFFFull; b += 997) {
    const auto bits = static_cast<std::uint32_t>(b);
    for (std::uint32_t low : {bits, (bits & 0xFFFF0000u) | 0x8000u, (bits & 0xFFFF0000u) | 0x7FFFu}) {
      const float f = F(low);
      if (std::isnan(f)) {
        REQUIRE(std::isnan(bf16_to_f32(f32_to_bf16(f))));
        continue;
      }
      if (std::isinf(f)) continue;
      REQUIRE_MESSAGE(f32_to_bf16(f) == bf16_reference(f), "bits 0x" << std::hex << low);
    }
  }
}

TEST_CASE("f16: known bit patterns, ties to even, overflow, subnormals, NaN") {
  CHECK(f32_to_f16(1.0f) == 0x3C00);
  CHECK(f32_to_f16(-2.0f) == 0xC000);
  CHECK(f32_to_f16(65504.0f) == 0x7BFF);            // max finite
  CHECK(f32_to_f16(65519.99609375f) == 0x7BFF);     // just below the rounding boundary
  CHECK(f32_to_f16(65520.0f) == 0x7C00);            // tie between max and 2^16: even is Inf
  CHECK(f32_to_f16(1e9f) == 0x7C00);
  CHECK(f32_to_f16(-1e9f) == 0xFC00);
  CHECK(f32_to_f16(std::ldexp(1.0f, -14)) == 0x0400);  // smallest normal
  CHECK(f32_to_f16(std::ldexp(1.0f, -24)) == 0x0001);  // smallest subnormal
  CHECK(f32_to_f16(std::ldexp(1.0f, -25)) == 0x0000);  // tie: even is zero
  CHECK(f32_to_f16(std::ldexp(1.5f, -25)) == 0x0001);
  CHECK(f32_to_f16(std::ldexp(3.0f, -25)) == 0x0002);  // 1.5 ulp: tie, even above
  CHECK(f32_to_f16(std::ldexp(5.0f, -25)) == 0x0002);  // 2.5 ulp: tie, even below
  CHECK(f32_to_f16(std::ldexp(1023.5f, -24)) == 0x0400);  // rounds out of the subnormals
  CHECK(f32_to_f16(1.0f + std::ldexp(1.0f, -11)) == 0x3C00);  // tie, even below
  CHECK(f32_to_f16(1.0f + std::ldexp(3.0f, -11)) == 0x3C02);  // tie, even above
  CHECK(f32_to_f16(1e-10f) == 0x0000);
  CHECK(f32_to_f16(-1e-10f) == 0x8000);
  CHECK(f32_to_f16(-0.0f) == 0x8000);
  CHECK(f32_to_f16(std::numeric_limits<float>::infinity()) == 0x7C00);
  CHECK(f32_to_f16(F(0x7FC00000)) == 0x7E00);
  CHECK(f32_to_f16(F(0xFF800001)) == 0xFE00);  // signalling NaN: quiet, sign kept
  CHECK(f32_to_f16(F(0x7F802000)) == 0x7E01);  // top payload bits kept
  CHECK(B(f16_to_f32(0x0001)) == B(std::ldexp(1.0f, -24)));
  CHECK(f16_to_f32(0x03FF) == std::ldexp(1023.0f, -24));
  CHECK(f16_to_f32(0x7BFF) == 65504.0f);
  CHECK(B(f16_to_f32(0x8000)) == 0x80000000u);
  CHECK(f16_to_f32(0x7C00) == std::numeric_limits<float>::infinity());
  CHECK(f16_to_f32(0xFC00) == -std::numeric_limits<float>::infinity());
  CHECK(std::isnan(f16_to_f32(0x7E00)));
  CHECK(std::isnan(f16_to_f32(0x7C01)));
}

TEST_CASE("f16: every f16 value survives f16 -> f32 -> f16 (NaNs come back quiet)") {
  for (std::uint32_t h = 0; h <= 0xFFFF; ++h) {
    const auto v = static_cast<std::uint16_t>(h);
    const bool nan = (v & 0x7C00) == 0x7C00 && (v & 0x3FF) != 0;
    const std::uint16_t expect = nan ? static_cast<std::uint16_t>(v | 0x200) : v;
    REQUIRE(f32_to_f16(f16_to_f32(v)) == expect);
  }
}

#if defined(__FLT16_MAX__)
TEST_CASE("f16: f32 -> f16 equals the compiler's _Float16 conversion on a sweep of 2^32 patterns") {
  for (std::uint64_t b = 0; b <= 0xFFFFFFFFull; b += 1009) {
    const float f = F(static_cast<std::uint32_t>(b));
    if (std::isnan(f)) continue;
    const auto ref = std::bit_cast<std::uint16_t>(static_cast<_Float16>(f));
    REQUIRE_MESSAGE(f32_to_f16(f) == ref, "bits 0x" << std::hex << b);
  }
  for (std::uint32_t h = 0; h <= 0xFFFF; ++h) {
    const auto v = static_cast<std::uint16_t>(h);
    if ((v & 0x7C00) == 0x7C00 && (v & 0x3FF) != 0) continue;
    REQUIRE(B(f16_to_f32(v)) == B(static_cast<float>(std::bit_cast<_Float16>(v))));
  }
}
#endif

}  // namespace suite_dtype
