// int8-activation products (q8_quantize / q8_gemv_nt) against scalar references, on every SIMD
// target compiled into the dispatch tables:
//  * the quantized activations are bit-identical to an independent scalar quantizer everywhere;
//  * the product equals the exact integer formulation sum_g s_g sx_g sum code * xq within the f32
//    summation bound of its terms;
//  * against the f32 product of the dequantized matrix, the error stays within the bound the
//    activation rounding implies: sum_j |w_j| (sx_g / 2 + 4 u |x_j|) plus the summation bound.
// Shapes cover both containers, vector bodies (group bytes 4 ... 128, chunk-straddling or not),
// partial last groups, odd group sizes, 1 ... 3 tokens (the 2- and 1-token tiles; one token: rows
// a vector at a time, reduced together, and the rows left over) and 4 ... 40 tokens (the
// tokens-in-lanes path of nibble codes: lane groups of 4, 2 or 1 lanes per token, one or two
// tiles, partial tiles, row panels and leftover rows; with tiles prebuilt and without). Nibble
// cases with whole groups of a multiple of 8 run on the rows-in-lanes layout too (below 16
// tokens in passes of 8, 4 and 1-3 tokens: 13 = 8 + 4 + 1, 15 = 8 + 4 + 3).
#include <doctest/doctest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include <hwy/targets.h>

#include <morph/runtime.hpp>
#include <s2lc/compress/quant.hpp>
#include <s2lc/kernels/qgemm.hpp>

#include "kernels/targets.hpp"
#include "support.hpp"

// The suite's own scope: the suites compile in unity groups (tests/CMakeLists.txt).
namespace suite_kernels_q8 {

namespace {

namespace cz = s2lc::compress;
namespace k = s2lc::kernels;
using s2lc::test::randn;

constexpr double kU = 1.0 / 16777216.0;

struct Case {
  std::size_t rows, cols, group;
  unsigned bits;
};
const Case kCases[] = {{1, 1, 32, 8},     {5, 37, 32, 4},   {9, 1408, 32, 4}, {3, 256, 64, 4},   {5, 300, 128, 3},
                       {4, 512, 32, 8},   {3, 200, 16, 4},  {2, 96, 8, 2},    {6, 1000, 256, 4}, {7, 33, 7, 4},
                       {3, 70, 10, 6},    {13, 256, 32, 5}, {2, 31, 32, 2},   {4, 288, 96, 4},
                       // 16+ rows: whole row panels of the batched (tokens in lanes) path and
                       // whole vectors of rows of the one-token path, plus leftover rows; two
                       // column segments; groups spanning chunks; byte containers with a vector
                       // body and a scalar tail
                       {37, 600, 32, 4},  {20, 1408, 64, 3}, {17, 512, 256, 4}, {18, 300, 32, 8}, {35, 96, 16, 6},
                       // rows in lanes: panels padded or not, group bytes 4 ... 128; the byte
                       // container (two quads per group, a panel of the widest rows: 32 KB)
                       {16, 256, 32, 4}, {40, 256, 8, 4}, {33, 528, 16, 4}, {50, 2048, 32, 4},
                       {40, 256, 8, 8}, {33, 528, 16, 6}, {20, 2048, 64, 7},
                       // the scalar tail over the bytes: byte groups of 48 (no vector body on
                       // AVX-512), a partial last group of nibbles of an odd width
                       {4, 288, 48, 8}, {3, 175, 64, 4}, {5, 250, 96, 8}};

/// The reference quantizer: per group, amax; scale amax / 127; xq = round_half_even(x * 127 / amax).
struct RefQ {
  std::vector<int> xq;
  std::vector<float> sx;
};
RefQ ref_quantize(const float* x, std::size_t cols, std::size_t G) {
  RefQ r;
  r.xq.assign(cols, 0);
  for (std::size_t c0 = 0; c0 < cols; c0 += G) {
    const std::size_t n = std::min(G, cols - c0);
    float amax = 0;
    bool finite = true;
    for (std::size_t j = 0; j < n; ++j) {
      finite = finite && std::isfinite(x[c0 + j]);
      amax = std::max(amax, std::fabs(x[c0 + j]));
    }
    // a non-finite value makes the group's scale NaN (every product with it NaN) and its codes 0
    if (!finite) {
      r.sx.push_back(std::nanf(""));
      continue;
    }
    const bool tiny = amax < 1e-30f;
    r.sx.push_back(tiny ? 0.0f : amax / 127.0f);
    const float inv = tiny ? 0.0f : 127.0f / amax;
    for (std::size_t j = 0; j < n; ++j) r.xq[c0 + j] = static_cast<int>(std::nearbyint(x[c0 + j] * inv));
  }
  return r;
}

/// The activation paired with column c in a Q8Acts buffer (inverse of the code packing).
int stored_xq(const k::QView& q, const std::uint8_t* act, std::size_t c) {
  const std::size_t rbp = k::Q8Acts::padded(q.row_bytes());
  const auto* lo = reinterpret_cast<const std::int8_t*>(act);
  if (!q.nibble) return lo[c];
  const std::size_t g = c / q.group, j = c % q.group, n = std::min<std::size_t>(q.group, q.cols - g * q.group), h = (n + 1) / 2;
  return j < h ? lo[g * (q.group / 2) + j] : lo[rbp + g * (q.group / 2) + j - h];
}

}  // namespace

TEST_CASE("kernels: q8 activation quantization is bit-identical to the scalar reference on every target") {
  for (std::int64_t target : s2lc::test::compiled_targets()) {
    s2lc::test::TargetScope scope(target);
    CAPTURE(std::string(hwy::TargetName(target)));
    for (const auto& c : kCases) {
      CAPTURE(c.cols); CAPTURE(c.group); CAPTURE(c.bits);
      const auto w = randn(c.rows * c.cols, 3, 0.05f);
      const auto km = s2lc::morph::KMat::from(cz::quantize(w.data(), c.rows, c.cols, {c.bits, c.group, false}));
      const auto q = km.view();
      const std::size_t nt = 5, ldx = c.cols + 5, ab = k::Q8Acts::bytes(q);
      auto x = randn(nt * ldx, static_cast<std::uint32_t>(c.cols), 1.0f);
      for (std::size_t j = 0; j < std::min<std::size_t>(c.group, c.cols); ++j) x[ldx + j] = 0.0f;  // an all-zero group
      // Token 2's first group: amax 127 (scale 1), every other value halfway between integers, so
      // the products are exact ties and round half to even is checked, not only nearest.
      for (std::size_t j = 0; j < std::min<std::size_t>(c.group, c.cols); ++j)
        x[2 * ldx + j] = j == 0 ? 127.0f : static_cast<float>(static_cast<int>(j % 40) - 20) + 0.5f;
      // Token 3: inf in the second group, a NaN with a payload in the third, -FLT_MAX in the
      // fifth; token 4: a group of nonzero values all below 1e-30 (scale 0, codes 0) in the
      // fourth, inf in the first (the last group where there are fewer)
      auto at = [&](std::size_t t, std::size_t g, std::size_t j) -> float* {
        const std::size_t c0 = std::min(g * c.group, (c.cols - 1) / c.group * c.group);
        return &x[t * ldx + std::min(c0 + j, c.cols - 1)];
      };
      *at(3, 1, 1) = INFINITY;
      *at(3, 2, 3) = std::bit_cast<float>(0x7FC01234u);
      if (4 * c.group < c.cols) *at(3, 4, 0) = -3.4028235e38f;
      if (3 * c.group < c.cols)
        for (std::size_t j = 0; j < c.group && 3 * c.group + j < c.cols; ++j) *at(4, 3, j) = 1e-31f * static_cast<float>(j + 1);
      *at(4, 0, 2) = -INFINITY;
      std::vector<std::uint8_t> acts(nt * ab + 1, 0xAB);
      k::q8_quantize(q, x.data(), ldx, nt, acts.data());
      REQUIRE(acts.back() == 0xAB);  // nothing written past nt * bytes
      const std::size_t rbp = k::Q8Acts::padded(q.row_bytes());
      for (std::size_t t = 0; t < nt; ++t) {
        const auto ref = ref_quantize(x.data() + t * ldx, c.cols, c.group);
        const std::uint8_t* act = acts.data() + t * ab;
        const float* sx = reinterpret_cast<const float*>(act + 4 * rbp);
        CAPTURE(t);
        for (std::size_t g = 0; g < ref.sx.size(); ++g) REQUIRE(std::bit_cast<std::uint32_t>(sx[g]) == std::bit_cast<std::uint32_t>(ref.sx[g]));
        for (std::size_t j = 0; j < c.cols; ++j) {
          REQUIRE(stored_xq(q, act, j) == ref.xq[j]);
          REQUIRE(std::abs(ref.xq[j]) <= 127);
        }
        // corr, over the 4-byte lanes of whole groups: 8 (nibbles) or 128 (bytes) times the sum of
        // each lane's activations, the offset of codes read as c + 8 / c + 128
        const std::size_t gb = q.nibble ? q.group / 2 : q.group;
        if (gb % 4 == 0) {
          const auto* lo = reinterpret_cast<const std::int8_t*>(act);
          const auto* hi = lo + rbp;
          const auto* corr = reinterpret_cast<const std::int32_t*>(act + 3 * rbp);
          for (std::size_t i = 0; i < q.cols / q.group * gb / 4; ++i) {
            std::int32_t sum = 0;
            for (std::size_t j = 0; j < 4; ++j) sum += lo[4 * i + j] + hi[4 * i + j];
            REQUIRE(corr[i] == (q.nibble ? 8 : 128) * sum);
          }
        }
      }
    }
  }
}

TEST_CASE("kernels: q8 gemv equals the exact integer formulation, and stays within the activation-rounding bound of W x") {
  for (std::int64_t target : s2lc::test::compiled_targets()) {
    s2lc::test::TargetScope scope(target);
    CAPTURE(std::string(hwy::TargetName(target)));
    std::size_t tiled = 0;  // cases with prebuilt tiles
    for (const auto& c : kCases) {
      CAPTURE(c.rows); CAPTURE(c.cols); CAPTURE(c.group); CAPTURE(c.bits);
      const auto w = randn(c.rows * c.cols, static_cast<std::uint32_t>(c.rows * 7 + c.cols), 0.05f);
      const auto qm = cz::quantize(w.data(), c.rows, c.cols, {c.bits, c.group, false});
      const auto W = cz::dequantize(qm);
      for (bool lanes : {false, true}) {
      const auto km = s2lc::morph::KMat::from(qm, lanes);
      if (lanes && !km.lanes) continue;  // the shape does not take rows in lanes
      CAPTURE(lanes);
      const auto q = km.view();
      for (std::size_t nt : {1u, 2u, 3u, 4u, 5u, 7u, 8u, 13u, 15u, 16u, 19u, 33u, 40u}) {
        CAPTURE(nt);
        const std::size_t ldx = c.cols + 1, ldy = c.rows + 3, ab = k::Q8Acts::bytes(q);
        const auto x = randn(nt * ldx, static_cast<std::uint32_t>(nt), 1.0f);
        std::vector<std::uint8_t> acts(nt * ab);
        k::q8_quantize(q, x.data(), ldx, nt, acts.data());
        std::vector<float> y(nt * ldy, 0.5f);
        const float alpha = -0.75f;
        k::q8_gemv_nt(q, 0, c.rows, acts.data(), nt, alpha, y.data(), ldy);
        {  // tiles built once (what a grid column's blocks share) give the same result, bit for bit
          const std::size_t tb = k::q8_tiles_bytes(q, nt);
          REQUIRE((tb == 0 || (q.nibble && nt >= 4)));
          tiled += tb > 0;
          std::vector<std::uint8_t> tiles(tb + 1, 0xCD);
          k::q8_tiles(q, acts.data(), nt, tiles.data());
          REQUIRE(tiles.back() == 0xCD);  // nothing written past the reported bytes
          std::vector<float> y2(nt * ldy, 0.5f);
          k::q8_gemv_nt_tiles(q, 0, c.rows, acts.data(), tb ? tiles.data() : nullptr, nt, alpha, y2.data(), ldy);
          for (std::size_t j = 0; j < y.size(); ++j) REQUIRE(std::bit_cast<std::uint32_t>(y2[j]) == std::bit_cast<std::uint32_t>(y[j]));
        }
        for (std::size_t t = 0; t < nt; ++t) {
          const auto ref = ref_quantize(x.data() + t * ldx, c.cols, c.group);
          for (std::size_t i = 0; i < c.rows; ++i) {
            // exact integer formulation
            double s = 0, a = 0;
            for (std::size_t g = 0; g < ref.sx.size(); ++g) {
              long long is = 0, ia = 0;
              for (std::size_t j = g * c.group; j < std::min(c.cols, (g + 1) * c.group); ++j) {
                const long long p = static_cast<long long>(k::detail::stored_code(q, i, j)) * ref.xq[j];
                is += p, ia += p < 0 ? -p : p;
              }
              const double sc = double(s2lc::bf16_to_f32(q.scale_bits(i, g))) * ref.sx[g];
              s += sc * double(is), a += std::fabs(sc) * double(ia);
            }
            const double got = y[t * ldy + i];
            REQUIRE(std::fabs(got - (0.5 + alpha * s)) <= std::fabs(alpha) * double(c.cols + 8) * kU * a + kU);
            // against the f32 product W x: the activation rounding bound
            double exact = 0, wabs_err = 0, fa = 0;
            for (std::size_t j = 0; j < c.cols; ++j) {
              const double wv = W[i * c.cols + j], xv = x[t * ldx + j];
              exact += wv * xv;
              wabs_err += std::fabs(wv) * (0.5 * ref.sx[j / c.group] + 4 * kU * std::fabs(xv));
              fa += std::fabs(wv * xv);
            }
            REQUIRE(std::fabs(got - (0.5 + alpha * exact)) <= std::fabs(alpha) * (wabs_err + double(c.cols + 8) * kU * (a + fa)) + kU);
          }
          for (std::size_t i = c.rows; i < ldy; ++i) REQUIRE(y[t * ldy + i] == 0.5f);  // nothing else written
        }
      }
      // A row sub-range touches only its rows.
      if (c.rows >= 3) {
        const auto x = randn(c.cols, 5, 1.0f);
        std::vector<std::uint8_t> acts(k::Q8Acts::bytes(q));
        k::q8_quantize(q, x.data(), c.cols, 1, acts.data());
        std::vector<float> y(c.rows, 0.0f), full(c.rows, 0.0f);
        k::q8_gemv_nt(q, 1, c.rows - 2, acts.data(), 1, 1.0f, y.data() + 1, 1);
        k::q8_gemv_nt(q, 0, c.rows, acts.data(), 1, 1.0f, full.data(), 1);
        CHECK(y[0] == 0.0f);
        CHECK(y[c.rows - 1] == 0.0f);
        for (std::size_t i = 1; i + 1 < c.rows; ++i) CHECK(std::fabs(y[i] - full[i]) <= 1e-5f * (std::fabs(full[i]) + 1e-3f));
      }
      }
    }
    if (target != HWY_SCALAR) REQUIRE(tiled > 0);
  }
}

TEST_CASE("kernels: q8_gemv_nt_vectorized: rows in lanes and groups of 16-128 codes on every target, and row-major groups of 48 or 96 codes where their bytes divide or are a multiple of the byte vector") {
  // What detail::apply_q8 routes on: where it is false, int8 activations take the f32 kernels.
  // (Every row-major case here has whole byte vectors of whole groups where they divide.)
  auto kmat = [](std::size_t cols, std::size_t group, unsigned bits, bool lanes) {
    const auto w = randn(16 * cols, static_cast<std::uint32_t>(cols + group), 0.05f);
    return s2lc::morph::KMat::from(cz::quantize(w.data(), 16, cols, {bits, group, false}), lanes);
  };
  for (std::int64_t target : s2lc::test::compiled_targets()) {
    s2lc::test::TargetScope scope(target);
    const std::string name = hwy::TargetName(target);
    CAPTURE(name);
    // the byte vector (0: the scalar target, where every layout counts as vectorized)
    const std::size_t vec = name == "SCALAR" ? 0 : name.rfind("AVX3", 0) == 0 ? 64 : name == "AVX2" ? 32 : 16;
    for (std::size_t group : {16u, 32u, 64u, 128u})
      for (unsigned bits : {4u, 8u}) {
        CAPTURE(group); CAPTURE(bits);
        CHECK(k::q8_gemv_nt_vectorized(kmat(256, group, bits, false).view()));
      }
    // a 64-column block of nibbles in groups of 32 (the last block of 2880 columns): 32 bytes a row
    CHECK(k::q8_gemv_nt_vectorized(kmat(64, 32, 4, false).view()) == (vec <= 32));
    for (std::size_t group : {48u, 96u})
      for (unsigned bits : {4u, 8u}) {
        CAPTURE(group); CAPTURE(bits);
        const auto lanes = kmat(288, group, bits, true);
        REQUIRE(lanes.lanes);
        CHECK(k::q8_gemv_nt_vectorized(lanes.view()));
        const std::size_t gb = bits <= 4 ? group / 2 : group;  // code bytes of a group
        CHECK(k::q8_gemv_nt_vectorized(kmat(288, group, bits, false).view()) == (vec == 0 || gb % vec == 0 || vec % gb == 0));
      }
  }
}

TEST_CASE("kernels: q8 gemv turns a non-finite activation into NaN outputs, never a silent zero") {
  for (std::int64_t target : s2lc::test::compiled_targets()) {
    s2lc::test::TargetScope scope(target);
    CAPTURE(std::string(hwy::TargetName(target)));
    const auto w = randn(4 * 256, 9, 0.05f);
    for (bool lanes : {false, true})
    for (unsigned bits : {4u, 8u})  // both containers
    for (float bad : {INFINITY, -INFINITY, NAN, std::copysign(NAN, -1.0f)}) {  // (a NaN with its sign bit set too)
      const auto km = s2lc::morph::KMat::from(cz::quantize(w.data(), 4, 256, {bits, 32, false}), lanes);
      REQUIRE(km.lanes == lanes);
      auto x = randn(256, 10, 1.0f);
      x[77] = bad;
      std::vector<std::uint8_t> acts(k::Q8Acts::bytes(km.view()));
      k::q8_quantize(km.view(), x.data(), 256, 1, acts.data());
      std::vector<float> y(4, 0.0f);
      k::q8_gemv_nt(km.view(), 0, 4, acts.data(), 1, 1.0f, y.data(), 1);
      for (float v : y) CHECK(std::isnan(v));
    }
  }
}

namespace {

/// q8_gemv_nn's reference: y[j] (starting from y0) for rows [k0, k0 + nk) of q and coefficients
/// c, from an independent scalar formulation (cq per group over the rows, exact integer sums per
/// chunk of 64 rows); `mag` gets the sum of the magnitudes of the terms of each column.
std::vector<double> ref_gemv_nn(const k::QView& q, std::size_t k0, std::size_t nk, const float* c, float y0, std::vector<double>& mag,
                                std::vector<double>& sigma) {
  const std::size_t G = q.group, gpr = q.groups_per_row();
  std::vector<float> cs(nk * gpr);
  sigma.assign(gpr, 0.0);
  std::vector<float> inv(gpr, 0.0f);
  for (std::size_t g = 0; g < gpr; ++g) {
    float amax = 0;
    for (std::size_t k = 0; k < nk; ++k) {
      cs[k * gpr + g] = c[k] * s2lc::bf16_to_f32(q.scale_bits(k0 + k, g));
      amax = std::max(amax, std::fabs(cs[k * gpr + g]));
    }
    if (amax >= 1e-30f) sigma[g] = amax / 127.0f, inv[g] = 127.0f / amax;
  }
  std::vector<double> y(q.cols, y0);
  mag.assign(q.cols, std::fabs(y0));
  for (std::size_t j = 0; j < q.cols; ++j) {
    const std::size_t g = j / G;
    for (std::size_t kc = 0; kc < nk; kc += 64) {
      long long is = 0, ia = 0;
      for (std::size_t k = kc; k < std::min(nk, kc + 64); ++k) {
        const float v = std::clamp(std::nearbyint(cs[k * gpr + g] * inv[g]), -127.0f, 127.0f);
        const long long p = static_cast<long long>(v) * k::detail::stored_code(q, k0 + k, j);
        is += p, ia += p < 0 ? -p : p;
      }
      y[j] += sigma[g] * double(is), mag[j] += sigma[g] * double(ia);
    }
  }
  return y;
}

}  // namespace

TEST_CASE("kernels: q8 gemv_nn (int8 coefficients times a left factor's codes) equals its exact integer formulation and stays within the coefficient-rounding bound") {
  // (rows = rank, cols, group, bits): left factors (2- and 4-bit nibbles, group 32: the vector
  // body, one or two vectors of accumulators), two row chunks, column strips, groups of 64 ... 256
  // (a vector of blocks in one group, several blocks per group), a partial last group, groups the
  // vector body does not take, byte containers (scalar)
  const Case cases[] = {{35, 256, 32, 2}, {35, 256, 32, 4}, {4, 128, 32, 4},  {1, 32, 32, 4},   {7, 1408, 32, 4}, {5, 2304, 32, 3},
                        {70, 256, 32, 3}, {130, 96, 32, 4}, {9, 512, 64, 4},  {6, 1024, 128, 4}, {5, 1024, 256, 2}, {3, 300, 32, 4},
                        {5, 96, 48, 4},   {6, 100, 10, 4},  {4, 64, 32, 8},   {7, 33, 7, 4},    {18, 384, 32, 4},
                        // partial last groups: nibbles of an even and an odd width, bytes
                        {4, 150, 64, 4},  {5, 175, 64, 3},  {3, 200, 48, 8}};
  for (std::int64_t target : s2lc::test::compiled_targets()) {
    s2lc::test::TargetScope scope(target);
    CAPTURE(std::string(hwy::TargetName(target)));
    for (const auto& cs : cases) {
      CAPTURE(cs.rows); CAPTURE(cs.cols); CAPTURE(cs.group); CAPTURE(cs.bits);
      const auto w = randn(cs.rows * cs.cols, static_cast<std::uint32_t>(cs.rows * 11 + cs.cols), 0.05f);
      const auto qm = cz::quantize(w.data(), cs.rows, cs.cols, {cs.bits, cs.group, false});
      const auto W = cz::dequantize(qm);
      for (bool lanes : {false, true}) {
        const auto km = s2lc::morph::KMat::from(qm, lanes);
        if (lanes && !km.lanes) continue;
        CAPTURE(lanes);
        const auto q = km.view();
        // where apply_block takes this kernel: the vector body covers every column
        const bool vz = k::q8_gemv_nn_vectorized(q);
        if (vz) REQUIRE((q.nibble && !q.lanes && cs.cols % cs.group == 0 && cs.group % 32 == 0));
        if (cs.cols == 256 && cs.group == 32 && !lanes) REQUIRE(vz == (target != HWY_SCALAR));
        // coefficients of a right factor's output: mixed magnitudes, a zero, a sign change
        auto c = randn(cs.rows, static_cast<std::uint32_t>(cs.cols), 2.0f);
        if (cs.rows > 2) c[1] = 0.0f, c[2] *= 30.0f;
        for (std::size_t k0 : {std::size_t{0}, cs.rows > 3 ? std::size_t{2} : std::size_t{0}}) {
          const std::size_t nk = cs.rows - k0 - (k0 ? 1 : 0);
          CAPTURE(k0);
          std::vector<float> y(cs.cols + 3, 0.5f);
          k::q8_gemv_nn(q, k0, nk, c.data() + k0, y.data());
          std::vector<double> mag, sigma;
          const auto ref = ref_gemv_nn(q, k0, nk, c.data() + k0, 0.5f, mag, sigma);
          for (std::size_t j = 0; j < cs.cols; ++j) {
            CAPTURE(j);
            // the exact integer formulation: f32 rounding of one product and sum per 64 rows
            REQUIRE(std::fabs(y[j] - ref[j]) <= double(nk / 64 + 3) * kU * mag[j] + kU);
            // against the f32 product of the dequantized factor: the coefficient rounding bound
            // sigma_g / 2 sum_k |code| (sigma and the rounding of c s and of c s / sigma: 1e-4 of sigma)
            double exact = 0.5, fa = 0.5, codes = 0;
            for (std::size_t k = k0; k < k0 + nk; ++k) {
              exact += double(c[k]) * W[k * cs.cols + j];
              fa += std::fabs(double(c[k]) * W[k * cs.cols + j]);
              codes += std::abs(k::detail::stored_code(q, k, j));
            }
            const double bound = sigma[j / cs.group] * (0.5 + 1e-4) * codes + double(nk + 8) * kU * (fa + mag[j]) + kU;
            REQUIRE(std::fabs(y[j] - exact) <= bound);
          }
          for (std::size_t j = cs.cols; j < y.size(); ++j) REQUIRE(y[j] == 0.5f);  // nothing else written
        }
        // all-zero coefficients add exact zeros; a non-finite one makes every output NaN
        std::vector<float> z(cs.rows, 0.0f), y(cs.cols, 0.5f);
        k::q8_gemv_nn(q, 0, cs.rows, z.data(), y.data());
        for (float v : y) REQUIRE(v == 0.5f);
        for (float bad : {INFINITY, -INFINITY, NAN, std::copysign(NAN, -1.0f)}) {  // (a NaN with its sign bit set too)
          auto cb = c;
          cb[cs.rows / 2] = bad;
          k::q8_gemv_nn(q, 0, cs.rows, cb.data(), y.data());
          for (float v : y) REQUIRE(std::isnan(v));
          y.assign(cs.cols, 0.5f);
        }
      }
    }
  }
}

TEST_CASE("kernels: the int8 kernels give the same bits with vpdpbusd / vpdpwssd as with pmaddubsw / pmaddwd on AVX2 (AVX-VNNI) and AVX3 (AVX512_VNNI)") {
  // The integer sums are exact either way (the byte codes of rows in lanes go in as c + 128 with
  // vpdpbusd), so q8_gemv_nt (every path: rows, tokens in lanes, rows in lanes), q8_gemv_nn and
  // lowrank_add_fixed must agree bit for bit; each mode is checked against the references above.
  std::size_t compared = 0;
  for (std::int64_t target : s2lc::test::compiled_targets()) {
    if (s2lc::test::vnni_modes(target).size() < 2) continue;
    s2lc::test::TargetScope scope(target);
    CAPTURE(std::string(hwy::TargetName(target)));
    auto both = [&](auto&& run) {
      std::vector<float> r[2];
      for (bool vnni : {true, false}) {
        s2lc::test::VnniScope vs(vnni);
        REQUIRE(k::use_vnni(target == HWY_AVX3) == vnni);
        r[vnni] = run();
      }
      REQUIRE(r[0].size() == r[1].size());
      for (std::size_t j = 0; j < r[0].size(); ++j) REQUIRE(std::bit_cast<std::uint32_t>(r[0][j]) == std::bit_cast<std::uint32_t>(r[1][j]));
      ++compared;
    };
    for (const auto& c : kCases) {
      CAPTURE(c.rows); CAPTURE(c.cols); CAPTURE(c.group); CAPTURE(c.bits);
      const auto w = randn(c.rows * c.cols, static_cast<std::uint32_t>(c.rows * 5 + c.cols), 0.05f);
      const auto qm = cz::quantize(w.data(), c.rows, c.cols, {c.bits, c.group, false});
      for (bool lanes : {false, true}) {
        const auto km = s2lc::morph::KMat::from(qm, lanes);
        if (lanes && !km.lanes) continue;
        CAPTURE(lanes);
        const auto q = km.view();
        for (std::size_t nt : {1u, 2u, 3u, 4u, 5u, 8u, 13u, 16u, 33u}) {
          CAPTURE(nt);
          const auto x = randn(nt * c.cols, static_cast<std::uint32_t>(nt + 3), 1.0f);
          std::vector<std::uint8_t> acts(nt * k::Q8Acts::bytes(q));
          k::q8_quantize(q, x.data(), c.cols, nt, acts.data());
          both([&] {
            std::vector<float> y(nt * c.rows, 0.5f);
            k::q8_gemv_nt(q, 0, c.rows, acts.data(), nt, -0.75f, y.data(), c.rows);
            return y;
          });
        }
        const auto co = randn(c.rows, static_cast<std::uint32_t>(c.cols + 1), 2.0f);
        both([&] {
          std::vector<float> y(c.cols, 0.5f);
          k::q8_gemv_nn(q, 0, c.rows, co.data(), y.data());
          return y;
        });
      }
    }
    for (std::size_t K : {1u, 7u, 48u, 200u}) {
      CAPTURE(K);
      const std::size_t rb = 37, cb = 100;
      const auto L = randn(K * rb, 21), R = randn(K * cb, 22);
      std::vector<std::int32_t> scratch(k::lowrank_fixed_scratch(K, rb, cb));
      both([&] {
        std::vector<float> out(rb * cb, 0.25f);
        k::lowrank_add_fixed(L.data(), R.data(), K, rb, cb, -0.5f, out.data(), cb, false, scratch.data(), nullptr);
        return out;
      });
    }
  }
  // this CPU has VNNI where the suite compiled AVX2 / AVX3 for it: the comparison ran
  const auto targets = s2lc::test::compiled_targets();
  const bool avx2 = std::find(targets.begin(), targets.end(), HWY_AVX2) != targets.end();
  if (avx2 && k::cpu_has_avx_vnni()) REQUIRE(compared > 0);
}

}  // namespace suite_kernels_q8
