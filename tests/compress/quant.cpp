// Tests for s2lc/compress/quant.hpp: the mid-tread group quantizer (error bound, no clipping at
// the group's absmax, zero groups), the LSB-first packing of every bit width against a
// bit-at-a-time reference, and the bit-nested tiers: a t-bit tier of a b-bit code is exactly the
// t-bit quantization of the b-bit values at scale 2^(b-t) s, on random and on real weights.
#include <doctest/doctest.h>

#include "support.hpp"

#include <s2lc/compress/quant.hpp>
#include <s2lc/dtype.hpp>
#include <s2lc/error.hpp>
#include <s2lc/io/safetensors.hpp>
#include <s2lc/tensor.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

// The suite's own scope: the suites compile in unity groups (tests/CMakeLists.txt).
namespace suite_compress_quant {

namespace {

namespace cz = s2lc::compress;

/// Deterministic Gaussian-ish values (sum of uniforms: the same on every standard library).
std::vector<float> random_values(std::size_t n, std::uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::vector<float> v(n);
  for (auto& x : v) {
    double s = 0;
    for (int k = 0; k < 4; ++k) s += static_cast<double>(rng()) / 4294967296.0 - 0.5;
    x = static_cast<float>(s) * scale;
  }
  return v;
}

/// The scale (f32) of element i of q.
float scale_of(const cz::QMatrix& q, std::size_t i) {
  const std::size_t r = i / q.cols, c = i % q.cols;
  return s2lc::bf16_to_f32(q.scales[r * q.groups_per_row() + c / q.group]);
}

/// The stored code of element i, read bit by bit (LSB first), sign-extended.
int reference_code(const std::vector<std::uint8_t>& bytes, std::size_t i, unsigned bits) {
  unsigned raw = 0;
  for (unsigned k = 0; k < bits; ++k) {
    const std::size_t pos = i * bits + k;
    raw |= ((static_cast<unsigned>(bytes[pos / 8]) >> (pos % 8)) & 1u) << k;
  }
  return (raw & (1u << (bits - 1))) != 0 ? static_cast<int>(raw) - (1 << bits) : static_cast<int>(raw);
}

/// Packs `codes` at `bits` each, bit by bit.
std::vector<std::uint8_t> reference_pack(const std::vector<int>& codes, unsigned bits) {
  std::vector<std::uint8_t> out(cz::QMatrix::code_bytes(1, codes.size(), bits), 0);
  for (std::size_t i = 0; i < codes.size(); ++i)
    for (unsigned k = 0; k < bits; ++k) {
      const std::size_t pos = i * bits + k;
      if (((static_cast<unsigned>(codes[i]) >> k) & 1u) != 0) out[pos / 8] = static_cast<std::uint8_t>(static_cast<unsigned>(out[pos / 8]) | (1u << (pos % 8)));
    }
  return out;
}

/// Rows 0..rows-1 of expert 0's w1 in the real fixture (trained weights, bf16 values).
std::vector<float> real_values(std::size_t rows, std::size_t& cols) {
  s2lc::io::SafetensorsFile f(s2lc::test::data_dir() / "tinymoe-upcycled-L1.safetensors");
  const s2lc::matrix w = s2lc::load_matrix_f32(f, "layers.1.moe.experts.0.w1.weight");
  cols = w.shape()[1];
  return std::vector<float>(w.data(), w.data() + rows * cols);
}

/// Every tier property of `q` (quantized from x): see the file comment of quant.hpp.
void check_tiers(const cz::QMatrix& q) {
  const unsigned b = q.bits;
  const std::size_t n = static_cast<std::size_t>(q.rows) * q.cols;
  const auto full = cz::dequantize(q);
  for (unsigned t = 2; t < b; ++t) {
    CAPTURE(b);
    CAPTURE(t);
    const auto tier = cz::dequantize(q, t);
    REQUIRE(tier.size() == n);
    const float step = static_cast<float>(1u << (b - t));
    std::size_t bad_code = 0, bad_value = 0;
    for (std::size_t i = 0; i < n; ++i) {
      const float s = scale_of(q, i);
      const int c = cz::tier_code(q, i, t);
      // The b-bit value q s, quantized directly at t bits with scale 2^(b-t) s (a zero scale
      // stores zeros, whose every tier is zero).
      const int direct = s > 0 ? cz::detail::quantize_one(full[i], s * step, t) : 0;
      if (c != direct) ++bad_code;
      if (tier[i] != static_cast<float>(c) * (s * step)) ++bad_value;
    }
    CHECK(bad_code == 0);
    CHECK(bad_value == 0);
  }
}

}  // namespace

TEST_CASE("compress: quantize/dequantize round trip is within half a step, unclipped at absmax, for bits 2..8") {
  struct Shape {
    std::size_t rows, cols, group;
  };
  // Group sizes that divide the columns and ones that leave a short last group.
  const Shape shapes[] = {{4, 64, 32}, {5, 75, 32}, {3, 100, 7}, {2, 33, 64}, {6, 17, 1}, {3, 128, 128}, {1, 1, 32}};
  std::uint32_t seed = 1;
  for (const auto& sh : shapes) {
    for (unsigned bits = 2; bits <= 8; ++bits) {
      CAPTURE(sh.rows);
      CAPTURE(sh.cols);
      CAPTURE(sh.group);
      CAPTURE(bits);
      const auto x = random_values(sh.rows * sh.cols, seed++, 0.05f);
      const auto q = cz::quantize(x.data(), sh.rows, sh.cols, {bits, sh.group, false});
      REQUIRE(q.rows == sh.rows);
      REQUIRE(q.cols == sh.cols);
      REQUIRE(q.bits == bits);
      REQUIRE(q.group == sh.group);
      REQUIRE(q.groups_per_row() == (sh.cols + sh.group - 1) / sh.group);
      REQUIRE(q.codes.size() == (sh.rows * sh.cols * bits + 7) / 8);
      REQUIRE(q.scales.size() == sh.rows * q.groups_per_row());
      CHECK(q.storage_bytes() == cz::QMatrix::storage_bytes(sh.rows, sh.cols, bits, sh.group));
      const auto y = cz::dequantize(q);
      REQUIRE(y.size() == x.size());
      const int max_code = (1 << (bits - 1)) - 1;
      std::size_t over = 0, clipped = 0, bad_scale = 0;
      for (std::size_t r = 0; r < sh.rows; ++r)
        for (std::size_t g0 = 0; g0 < sh.cols; g0 += sh.group) {
          const std::size_t n = std::min(sh.group, sh.cols - g0);
          float amax = 0;
          std::size_t at = 0;
          for (std::size_t i = 0; i < n; ++i)
            if (std::fabs(x[r * sh.cols + g0 + i]) > amax) amax = std::fabs(x[r * sh.cols + g0 + i]), at = i;
          const float s = scale_of(q, r * sh.cols + g0);
          // s = absmax / (2^(b-1) - 1), rounded to bf16 (relative error <= 2^-9).
          if (std::fabs(s - amax / static_cast<float>(max_code)) > amax / static_cast<float>(max_code) * 0x1p-8f) ++bad_scale;
          for (std::size_t i = 0; i < n; ++i) {
            const std::size_t k = r * sh.cols + g0 + i;
            if (std::fabs(y[k] - x[k]) > 0.5f * s * (1.0f + 1e-6f)) ++over;
            if (y[k] != static_cast<float>(cz::tier_code(q, k, bits)) * s) ++over;
          }
          // The largest magnitude maps to the largest code of its sign: no clipping.
          const std::size_t k = r * sh.cols + g0 + at;
          if (std::abs(cz::tier_code(q, k, bits)) != max_code) ++clipped;
        }
      CHECK(over == 0);
      CHECK(clipped == 0);
      CHECK(bad_scale == 0);
    }
  }
}

TEST_CASE("compress: a zero group has scale zero and decodes to zeros, its neighbours unaffected") {
  const std::size_t rows = 3, cols = 70, group = 32;  // groups [0,32) [32,64) [64,70)
  auto x = random_values(rows * cols, 7);
  for (std::size_t c = 32; c < 64; ++c) x[1 * cols + c] = 0.0f;  // row 1, group 1
  for (std::size_t c = 64; c < 70; ++c) x[2 * cols + c] = 0.0f;  // row 2, the short last group
  for (unsigned bits = 2; bits <= 8; ++bits) {
    CAPTURE(bits);
    const auto q = cz::quantize(x.data(), rows, cols, {bits, group, false});
    CHECK(q.scales[1 * 3 + 1] == 0);
    CHECK(q.scales[2 * 3 + 2] == 0);
    for (unsigned t = 2; t <= bits; ++t) {
      const auto y = cz::dequantize(q, t);
      for (std::size_t c = 32; c < 64; ++c) CHECK(y[1 * cols + c] == 0.0f);
      for (std::size_t c = 64; c < 70; ++c) CHECK(y[2 * cols + c] == 0.0f);
      for (std::size_t c = 32; c < 64; ++c) CHECK(cz::tier_code(q, 1 * cols + c, t) == 0);
    }
    // Other groups still carry their values.
    const auto y = cz::dequantize(q);
    double e = 0;
    for (std::size_t c = 0; c < 32; ++c) e += std::fabs(y[1 * cols + c]);
    CHECK(e > 0);
  }
  // An all-zero matrix, and one of negative zeros.
  for (float z : {0.0f, -0.0f}) {
    const std::vector<float> zeros(5 * 9, z);
    const auto q = cz::quantize(zeros.data(), 5, 9, {4, 4, false});
    for (auto s : q.scales) CHECK(s == 0);
    for (auto b : q.codes) CHECK(b == 0);
    for (float v : cz::dequantize(q)) CHECK(v == 0.0f);
  }
}

TEST_CASE("compress: packing of every bit width (odd ones straddle bytes) matches a bit-at-a-time reference") {
  for (unsigned bits = 2; bits <= 8; ++bits) {
    CAPTURE(bits);
    // Every code value, in a pseudo-random order, over a length that ends mid-byte.
    std::mt19937 rng(bits);
    const std::size_t n = 1000 + bits;
    const int lo = -(1 << (bits - 1)), hi = (1 << (bits - 1)) - 1;
    std::vector<int> codes(n);
    for (std::size_t i = 0; i < n; ++i)
      codes[i] = i < static_cast<std::size_t>(hi - lo + 1) ? lo + static_cast<int>(i) : lo + static_cast<int>(rng() % static_cast<unsigned>(hi - lo + 1));
    std::shuffle(codes.begin(), codes.end(), rng);
    const auto ref = reference_pack(codes, bits);
    // write_code into a buffer pre-filled with ones (it must clear the field), in a shuffled
    // order (it must not disturb neighbouring fields).
    std::vector<std::uint8_t> packed(cz::QMatrix::code_bytes(1, n, bits), 0xFF);
    std::vector<std::size_t> order(n);
    for (std::size_t i = 0; i < n; ++i) order[i] = i;
    std::shuffle(order.begin(), order.end(), rng);
    for (auto i : order) cz::detail::write_code(packed.data(), packed.size(), i, bits, codes[i]);
    // Bits past the last code are not part of any code; compare them as the reference has them.
    const std::size_t used = n * bits;
    if (used % 8 != 0) packed.back() = static_cast<std::uint8_t>(static_cast<unsigned>(packed.back()) & ((1u << (used % 8)) - 1u));
    CHECK(packed == ref);
    std::size_t mismatches = 0;
    for (std::size_t i = 0; i < n; ++i) {
      if (cz::detail::read_code(ref.data(), ref.size(), i, bits) != codes[i]) ++mismatches;
      if (reference_code(ref, i, bits) != codes[i]) ++mismatches;
    }
    CHECK(mismatches == 0);
  }
  // quantize() packs its codes the same way: re-derive every code from the values and scales.
  for (unsigned bits : {3u, 5u, 6u, 7u}) {
    CAPTURE(bits);
    const std::size_t rows = 7, cols = 45;
    const auto x = random_values(rows * cols, 100 + bits);
    const auto q = cz::quantize(x.data(), rows, cols, {bits, 16, false});
    std::vector<int> expect(rows * cols);
    for (std::size_t i = 0; i < expect.size(); ++i) expect[i] = cz::detail::quantize_one(x[i], scale_of(q, i), bits);
    CHECK(q.codes == reference_pack(expect, bits));
  }
}

TEST_CASE("compress: tiers are views: tier t of a b-bit code is the t-bit quantization of its value at scale 2^(b-t) s") {
  SUBCASE("random values, several group sizes") {
    std::uint32_t seed = 11;
    for (std::size_t group : {1u, 8u, 32u, 50u}) {
      const std::size_t rows = 6, cols = 77;
      const auto x = random_values(rows * cols, seed++, 3.0f);
      for (unsigned b = 3; b <= 8; ++b) check_tiers(cz::quantize(x.data(), rows, cols, {b, group, false}));
    }
  }
  SUBCASE("real trained weights") {
    std::size_t cols = 0;
    const auto x = real_values(64, cols);
    for (unsigned b = 3; b <= 8; ++b) check_tiers(cz::quantize(x.data(), 64, cols, {b, 32, false}));
  }
  SUBCASE("clipped scales (search_scale) are views too") {
    const auto x = random_values(8 * 96, 5);
    for (unsigned b = 3; b <= 7; ++b) check_tiers(cz::quantize(x.data(), 8, 96, {b, 32, true}));
  }
  SUBCASE("every code of every width") {
    // One group whose codes run through every value: tier_of against the arithmetic definition.
    for (unsigned b = 3; b <= 8; ++b)
      for (unsigned t = 2; t < b; ++t)
        for (int q = -(1 << (b - 1)); q < (1 << (b - 1)); ++q) {
          const unsigned k = b - t;
          const double rounded = std::floor(static_cast<double>(q) / static_cast<double>(1u << k) + 0.5);
          const int expect = static_cast<int>(std::clamp(rounded, -static_cast<double>(1 << (t - 1)), static_cast<double>((1 << (t - 1)) - 1)));
          REQUIRE(cz::detail::tier_of(q, b, t) == expect);
        }
  }
}

TEST_CASE("compress: the int4 tier of an int8 QMatrix is within 2^(8-4-1) s of the int8 values, except where it clips") {
  // The 4-bit tier has codes -8..7 at scale 16 s: it spans [-128 s, 112 s], so int8 codes above
  // 7 * 16 + 7 = 119 (only ever near a group's positive absmax, at 127) clip to 112 s. Inside
  // that range the error is half a tier step, 8 s (plus the int8 rounding, s / 2, against x).
  std::size_t cols = 0;
  const auto real = real_values(128, cols);
  const auto rnd = random_values(128 * cols, 3);
  for (const auto* x : {&real, &rnd}) {
    const auto q = cz::quantize(x->data(), 128, cols, {8, 32, false});
    const auto v8 = cz::dequantize(q), v4 = cz::dequantize(q, 4);
    std::size_t over = 0, clipped = 0, in_range = 0;
    double max_clip_err = 0, err_tier = 0, err_direct = 0;
    const auto q4 = cz::quantize(x->data(), 128, cols, {4, 32, false});
    const auto d4 = cz::dequantize(q4);
    for (std::size_t i = 0; i < v4.size(); ++i) {
      err_tier += static_cast<double>(v4[i] - (*x)[i]) * (v4[i] - (*x)[i]);
      err_direct += static_cast<double>(d4[i] - (*x)[i]) * (d4[i] - (*x)[i]);
    }
    for (std::size_t i = 0; i < v8.size(); ++i) {
      const float s = scale_of(q, i);
      const int code = cz::tier_code(q, i, 8);
      if (code > 119) {
        ++clipped;
        max_clip_err = std::max(max_clip_err, static_cast<double>(std::fabs(v4[i] - v8[i]) / s));
        CHECK(v4[i] == 112.0f * s);
        continue;
      }
      ++in_range;
      if (std::fabs(v4[i] - v8[i]) > 8.0f * s) ++over;
      if (std::fabs(v4[i] - (*x)[i]) > 8.5f * s * (1.0f + 1e-6f)) ++over;
    }
    MESSAGE("int4 tier of int8: " << in_range << " values within 8 s, " << clipped << " clipped (max error " << max_clip_err
                                  << " s); squared error " << err_tier / err_direct << " x that of direct int4 quantization");
    CHECK(over == 0);
    CHECK(in_range > 0);
    CHECK(max_clip_err <= 15.0);
  }
}

TEST_CASE("compress: invalid bits, groups and tiers are rejected with invalid_argument") {
  const auto x = random_values(4 * 8, 9);
  for (unsigned bits : {0u, 1u, 9u, 16u}) {
    CAPTURE(bits);
    CHECK_THROWS_AS(cz::quantize(x.data(), 4, 8, {bits, 4, false}), s2lc::invalid_argument);
    CHECK_FALSE(cz::valid_bits(bits));
  }
  CHECK_THROWS_AS(cz::quantize(x.data(), 4, 8, {4, 0, false}), s2lc::invalid_argument);
  const auto q = cz::quantize(x.data(), 4, 8, {6, 4, false});
  for (unsigned tier : {1u, 7u, 8u, 9u}) {
    CAPTURE(tier);
    CHECK_THROWS_AS(cz::dequantize(q, tier), s2lc::invalid_argument);
    std::vector<float> row(8);
    CHECK_THROWS_AS(cz::dequantize_row(q, 0, row.data(), tier), s2lc::invalid_argument);
    CHECK_THROWS_AS(cz::tier_code(q, 0, tier), s2lc::invalid_argument);
  }
  CHECK_THROWS_AS(cz::tier_code(q, 0, 0), s2lc::invalid_argument);
  // Tier 0 means "as stored"; every tier 2..6 is fine.
  CHECK(cz::dequantize(q, 0) == cz::dequantize(q));
  for (unsigned tier = 2; tier <= 6; ++tier) CHECK_NOTHROW(cz::dequantize(q, tier));
}

}  // namespace suite_compress_quant
