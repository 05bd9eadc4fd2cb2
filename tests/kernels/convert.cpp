// Bulk conversion kernels: bit-identical to the scalar reference on every compiled SIMD target,
// for every length (vector bodies and scalar tails), with specials mixed into the data.
#include <doctest/doctest.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <ios>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <hwy/targets.h>

#include <s2lc/dtype.hpp>
#include <s2lc/kernels/convert.hpp>

#include "kernels/targets.hpp"

// The suite's own scope: the suites compile in unity groups (tests/CMakeLists.txt).
namespace suite_kernels_convert {

namespace {

std::vector<float> test_floats(std::size_t n, std::uint32_t seed) {
  std::mt19937 rng(seed);
  const float specials[] = {0.0f, -0.0f, 1.0f, -1.0f, 65504.0f, 65520.0f, 1e-8f, -3e-7f, 6.1e-5f,
                            std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                            std::bit_cast<float>(0x7FC00000u), std::bit_cast<float>(0xFF800001u),
                            std::bit_cast<float>(0x3F808000u), std::bit_cast<float>(0x3F818000u),
                            std::bit_cast<float>(0x33000000u), std::bit_cast<float>(0x00000001u),
                            std::bit_cast<float>(0x00428000u), std::bit_cast<float>(0x80012345u)};  // subnormals, bf16-representable
  std::vector<float> v(n);
  for (std::size_t i = 0; i < n; ++i) {
    switch (rng() % 4) {
      case 0: v[i] = specials[rng() % std::size(specials)]; break;
      case 1: v[i] = std::bit_cast<float>(static_cast<std::uint32_t>(rng())); break;  // any pattern
      case 2: v[i] = std::normal_distribution<float>(0.0f, 0.02f)(rng); break;     // weight-like
      default: v[i] = std::bit_cast<float>((static_cast<std::uint32_t>(rng()) & 0xFFFF0000u) | 0x8000u);  // bf16 ties
    }
  }
  return v;
}

}  // namespace

TEST_CASE("kernels: bulk conversions equal the scalar reference on every target and length") {
  const auto targets = s2lc::test::compiled_targets();
  for (std::int64_t target : targets) {
    s2lc::test::TargetScope scope(target);
    CAPTURE(std::string(hwy::TargetName(target)));
    for (std::size_t n : {0u, 1u, 3u, 7u, 8u, 15u, 16u, 17u, 31u, 33u, 63u, 64u, 65u, 1000u, 4099u}) {
      CAPTURE(n);
      const auto in = test_floats(n, static_cast<std::uint32_t>(n * 7919 + 1));
      std::vector<std::uint16_t> out(n + 1, 0xABCD), ref(n + 1, 0xABCD);  // +1 sentinel: no overrun
      std::vector<float> back(n + 1, -7.0f);

      for (std::size_t i = 0; i < n; ++i) ref[i] = s2lc::f32_to_bf16(in[i]);
      for (bool insn : s2lc::test::bf16_insn_modes(target)) {  // AVX3_DL: vcvtneps2bf16 and the integer rounding
        CAPTURE(insn);
        s2lc::test::Bf16InsnScope bf16(insn);
        std::fill(out.begin(), out.end() - 1, std::uint16_t{0xABCD});
        s2lc::kernels::f32_to_bf16(in.data(), out.data(), n);
        REQUIRE(out == ref);
      }
      s2lc::kernels::bf16_to_f32(out.data(), back.data(), n);
      for (std::size_t i = 0; i < n; ++i) REQUIRE(std::bit_cast<std::uint32_t>(back[i]) == std::bit_cast<std::uint32_t>(s2lc::bf16_to_f32(out[i])));
      REQUIRE(back[n] == -7.0f);

      s2lc::kernels::f32_to_f16(in.data(), out.data(), n);
      for (std::size_t i = 0; i < n; ++i) ref[i] = s2lc::f32_to_f16(in[i]);
      REQUIRE(out == ref);
      s2lc::kernels::f16_to_f32(out.data(), back.data(), n);
      for (std::size_t i = 0; i < n; ++i) REQUIRE(std::bit_cast<std::uint32_t>(back[i]) == std::bit_cast<std::uint32_t>(s2lc::f16_to_f32(out[i])));
      REQUIRE(back[n] == -7.0f);
    }
  }
}

TEST_CASE("kernels: f32_to_bf16 and f32_to_f16 past kStreamStoreBytes (non-temporal stores) equal the scalar reference at any alignment") {
  // An output of the streaming size: the scalar head up to out's first 64-byte boundary, the
  // streamed body and the tail all run. (The widenings store as for small n, above.)
  const std::size_t n = s2lc::kernels::kStreamStoreBytes / sizeof(std::uint16_t) + 37;
  const auto src = test_floats(n + 1, 20261201);
  std::vector<std::uint16_t> ref(n + 1), ref16(n + 1), out(n + 8);
  for (std::size_t i = 0; i < n + 1; ++i) ref[i] = s2lc::f32_to_bf16(src[i]), ref16[i] = s2lc::f32_to_f16(src[i]);
  for (std::int64_t target : s2lc::test::compiled_targets()) {
    s2lc::test::TargetScope scope(target);
    CAPTURE(std::string(hwy::TargetName(target)));
    for (std::size_t off : {0u, 3u}) {  // out (and in: off % 2) elements past the allocation's start
      CAPTURE(off);
      const std::size_t s = off % 2;
      // conv(src + s -> out + off) equals expect[s, s + n), the sentinels around it untouched
      const auto check = [&](auto conv, const std::vector<std::uint16_t>& expect) {
        std::fill(out.begin(), out.end(), std::uint16_t{0xABCD});
        conv(src.data() + s, out.data() + off, n);
        REQUIRE(std::equal(expect.begin() + static_cast<std::ptrdiff_t>(s), expect.begin() + static_cast<std::ptrdiff_t>(s + n),
                           out.begin() + static_cast<std::ptrdiff_t>(off)));
        REQUIRE(out[off + n] == 0xABCD);
        if (off > 0) REQUIRE(out[off - 1] == 0xABCD);
      };
      for (bool insn : s2lc::test::bf16_insn_modes(target)) {
        CAPTURE(insn);
        s2lc::test::Bf16InsnScope bf16(insn);
        check([](const float* i, std::uint16_t* o, std::size_t m) { s2lc::kernels::f32_to_bf16(i, o, m); }, ref);
      }
      check([](const float* i, std::uint16_t* o, std::size_t m) { s2lc::kernels::f32_to_f16(i, o, m); }, ref16);
    }
  }
}

TEST_CASE("kernels: f32 -> f16 and bf16 equal the scalar rule on a sweep of 2^32 patterns, every target, denormals flushed or not") {
  // Every 1009th f32 bit pattern (all exponents, both signs, subnormals, inf, NaN payloads): the
  // vector bodies on each target (F16C's vcvtps2ph, AVX512_BF16's vcvtneps2bf16 and its
  // fallback, the integer roundings) against the scalar reference, also with MXCSR's FTZ and DAZ
  // set (the bits must not depend on the caller's floating-point mode).
  std::vector<float> in;
  in.reserve((std::uint64_t{1} << 32) / 1009 + 1);
  for (std::uint64_t b = 0; b <= 0xFFFFFFFFull; b += 1009) in.push_back(std::bit_cast<float>(static_cast<std::uint32_t>(b)));
  std::vector<std::uint16_t> ref16(in.size()), refb(in.size()), out(in.size());
  for (std::size_t i = 0; i < in.size(); ++i) ref16[i] = s2lc::f32_to_f16(in[i]), refb[i] = s2lc::f32_to_bf16(in[i]);
  const auto first_diff = [&](const std::vector<std::uint16_t>& ref) {
    return static_cast<std::size_t>(std::mismatch(out.begin(), out.end(), ref.begin()).first - out.begin());
  };
  for (const bool flush : s2lc::test::flush_modes())
  for (std::int64_t target : s2lc::test::compiled_targets()) {
    s2lc::test::TargetScope scope(target);
    const s2lc::test::FlushScope fp(flush);
    CAPTURE(flush);
    CAPTURE(std::string(hwy::TargetName(target)));
    s2lc::kernels::f32_to_f16(in, out);
    std::size_t i = first_diff(ref16);
    REQUIRE_MESSAGE(i == in.size(), "f16 differs at f32 bits 0x" << std::hex << std::bit_cast<std::uint32_t>(in[i < in.size() ? i : 0]));
    for (bool insn : s2lc::test::bf16_insn_modes(target)) {
      CAPTURE(insn);
      s2lc::test::Bf16InsnScope bf16(insn);
      s2lc::kernels::f32_to_bf16(in, out);
      i = first_diff(refb);
      REQUIRE_MESSAGE(i == in.size(), "bf16 differs at f32 bits 0x" << std::hex << std::bit_cast<std::uint32_t>(in[i < in.size() ? i : 0]));
    }
  }
}

TEST_CASE("kernels: every f16 and bf16 bit pattern widens exactly on every target, denormals flushed or not") {
  std::vector<std::uint16_t> all(65536);
  for (std::size_t i = 0; i < all.size(); ++i) all[i] = static_cast<std::uint16_t>(i);
  std::vector<float> out(all.size() - 3), ref(all.size());  // (3 short: the scalar tail too)
  for (std::size_t i = 0; i < all.size(); ++i) ref[i] = s2lc::f16_to_f32(all[i]);
  for (const bool flush : s2lc::test::flush_modes())
  for (std::int64_t target : s2lc::test::compiled_targets()) {
    s2lc::test::TargetScope scope(target);
    CAPTURE(flush);
    CAPTURE(std::string(hwy::TargetName(target)));
    const s2lc::test::FlushScope fp(flush);
    for (std::size_t off : {0u, 3u}) {  // the last 3 patterns (NaNs) through the tail, then the body
      s2lc::kernels::f16_to_f32(std::span(all).subspan(off, out.size()), out);
      for (std::size_t i = 0; i < out.size(); ++i)
        REQUIRE(std::bit_cast<std::uint32_t>(out[i]) == std::bit_cast<std::uint32_t>(ref[i + off]));
      s2lc::kernels::bf16_to_f32(std::span(all).subspan(off, out.size()), out);
      for (std::size_t i = 0; i < out.size(); ++i) REQUIRE(std::bit_cast<std::uint32_t>(out[i]) == (static_cast<std::uint32_t>(i + off) << 16));
    }
  }
}

TEST_CASE("kernels: span overloads reject mismatched sizes") {
  std::vector<float> f(4);
  std::vector<std::uint16_t> h(5);
  CHECK_THROWS_AS(s2lc::kernels::f32_to_bf16(f, h), s2lc::invalid_argument);
  CHECK_THROWS_AS(s2lc::kernels::bf16_to_f32(h, f), s2lc::invalid_argument);
}

TEST_CASE("kernels: runtime dispatch really compiled several targets") {
  const auto targets = s2lc::test::compiled_targets();
  std::string names;
  for (auto t : targets) names += std::string(hwy::TargetName(t)) + " ";
  MESSAGE("kernel tests run on: " << names);
#if HWY_ARCH_X86_64
  // x86-64 always supports SSSE3/SSE4-class CPUs and the baseline; fewer means dispatch is broken.
  CHECK(targets.size() >= 3);
#else
  CHECK(targets.size() >= 1);
#endif
}

}  // namespace suite_kernels_convert
