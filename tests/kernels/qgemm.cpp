// Apply kernels (s2lc/kernels/qgemm.hpp) against scalar references, on every SIMD target compiled
// into the dispatch tables: decode is bit-exact with compress::dequantize_row at every tier; the
// products stay within the f32 summation bound (K + 4) * 2^-24 * sum |w x| of a double reference;
// merge then unmerge restores the buffer bit for bit. Shapes, group sizes and lengths are chosen
// so that vector bodies, partial groups, odd group sizes and scalar tails are all exercised.
// Every quantized kernel runs on both kernel layouts where the shape takes the rows-in-lanes one
// (nibble codes, whole groups of a multiple of 8): the same bounds, the same bits for decode.
#include <algorithm>
#include <doctest/doctest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include <hwy/targets.h>

#include <morph/runtime.hpp>
#include <s2lc/compress/quant.hpp>
#include <s2lc/dtype.hpp>
#include <s2lc/kernels/qgemm.hpp>

#include "kernels/targets.hpp"
#include "support.hpp"

// The suite's own scope: the suites compile in unity groups (tests/CMakeLists.txt).
namespace suite_kernels_qgemm {

namespace {

namespace cz = s2lc::compress;
namespace k = s2lc::kernels;

constexpr double kU = 1.0 / 16777216.0;  // f32 unit roundoff 2^-24

using s2lc::test::randn;

struct Case {
  std::size_t rows, cols, group;
  unsigned bits;
};

// Shapes: odd rows and columns, partial last groups, odd and even group sizes, both containers;
// 53 x 288 is a low-rank factor (q_gemv_nn's register tiles of 4 groups, then a lone group);
// 300 x 600: q_gemv_nn's coefficients computed in two chunks of rows.
const Case kCases[] = {{1, 1, 32, 8}, {5, 37, 32, 8}, {17, 64, 32, 4}, {9, 100, 32, 4}, {6, 45, 16, 3},
                       {4, 96, 64, 2}, {7, 33, 7, 4}, {3, 70, 10, 6}, {13, 256, 32, 5}, {2, 31, 32, 2},
                       {5, 80, 16, 8}, {53, 288, 32, 3}, {300, 600, 32, 4},
                       // rows in lanes: one panel, a padded one, several, quads per group 1 ... 8,
                       // quads per row not a multiple of the lanes; q_gemm_nt packing the
                       // activations of 512 columns at a time (528: two chunks), and groups too
                       // wide to pack (768: panels unpacked instead, from 2 tokens on); 33, 20
                       // and 3 rows end in a block of at most kLanesAloneRows rows, which
                       // q_gemm_nt computes row by row in passes of 2 to 8 tokens (3 rows from row 1 too)
                       {16, 256, 32, 4}, {40, 256, 8, 4}, {33, 528, 16, 4}, {20, 384, 64, 3}, {17, 1536, 768, 4},
                       {3, 256, 32, 3},
                       // nibble groups of one vector's lanes (HalfNibbles; 16 and 8 codes above):
                       // 4 codes for SSE4 / SSSE3 / EMU128, 13 groups, the last of them partial
                       {9, 51, 4, 4},
                       // one group a row (per-channel scales): q_gemm_nn's wide tiles, runs of 8, 4,
                       // 2 or 1 vectors (640 nibbles: 20 vectors of low ones on AVX-512, 40 on AVX2)
                       {6, 640, 640, 4}, {5, 384, 384, 8},
                       // narrow groups, several a vector (Layout::gpv; 8 above too): nibble groups
                       // of 8 and 2 codes and byte groups of 1, 2, 4 with a row's last vector
                       // partial (the scalar path) and a partial last group
                       {7, 37, 8, 4}, {5, 75, 2, 4}, {4, 35, 1, 8}, {3, 29, 2, 5}, {6, 43, 4, 7},
                       // row-major q_gemm_nt decodes blocks of 8192 / cols rows (3000 columns: 2
                       // rows a block, the 4-row tiles unused)
                       {5, 3000, 32, 4},
                       // groups of 3, 5, 6, 12 ... vectors (q_gemm_nn's wide tiles with runs of 3, or
                       // of 1 or 2): byte groups of 48 and 80, nibble groups of 96, whole and partial
                       {5, 288, 48, 8}, {4, 400, 80, 7}, {6, 384, 96, 4}, {3, 200, 96, 3},
                       // a group wider than the matrix: one partial group in storage, a whole
                       // group of the width for the kernels (QView::kernel_group; not for an odd
                       // width of nibbles)
                       {6, 64, 128, 4}, {5, 100, 256, 8}, {4, 63, 128, 3},
                       // ... the byte container: two quads per group, 528 columns, groups too wide
                       // to pack, a panel of the widest rows (32 KB)
                       {40, 256, 8, 8}, {33, 528, 16, 6}, {17, 1536, 768, 5}, {16, 2048, 128, 8},
                       // AMX tiles (amx.hpp; q_gemm_nt from 16 tokens, 8 on more than 64 rows):
                       // nibbles in groups of 32, 64 (above), 128 and 256 columns, the widest they
                       // take; 80 rows: 8 and 13 tokens too, from row 1 a partial first and last
                       // panel; byte codes (stored bits only, from 16 tokens) in groups of 32,
                       // 64 and 128 (above)
                       {24, 512, 128, 4}, {18, 512, 256, 3}, {80, 256, 32, 4}, {80, 256, 32, 5}, {20, 256, 64, 8},
                       // groups no vector body takes, decoded in runs (DecodeSpan): a partial last
                       // group of whole vectors and a tail, of nibbles of an odd width; byte groups
                       // of 24 and nibble groups of 48 (neither whole vectors nor dividing one on
                       // AVX-512); runs of two chunks (more than 4096 columns); a group wider than a
                       // run (element by element)
                       {4, 250, 96, 8}, {5, 230, 64, 4}, {3, 177, 64, 3}, {6, 256, 24, 8}, {4, 256, 48, 4},
                       {2, 4200, 24, 6}, {2, 4210, 50, 4}, {2, 9000, 4500, 8}};

/// The kernel layouts to run a case on: row-major, and rows in lanes where the shape takes it.
std::vector<s2lc::morph::KMat> layouts(const cz::QMatrix& q) {
  std::vector<s2lc::morph::KMat> v{s2lc::morph::KMat::from(q)};
  REQUIRE(v[0].group == k::QView::kernel_group(q.cols, q.group, v[0].nibble));
  auto l = s2lc::morph::KMat::from(q, true);
  REQUIRE(l.lanes == k::QView::lanes_fit(q.cols, v[0].group));
  if (l.lanes) {
    REQUIRE(l.view().bytes() == l.codes.size());
    for (std::size_t r = 0; r < q.rows; ++r)
      for (std::size_t c = 0; c < q.cols; ++c) {
        REQUIRE(k::detail::stored_code(l.view(), r, c) == k::detail::stored_code(v[0].view(), r, c));
        REQUIRE(l.view().scale_bits(r, c / v[0].group) == v[0].view().scale_bits(r, c / v[0].group));
      }
    v.push_back(std::move(l));
  }
  return v;
}

/// |value| bound of the error of an f32 sum of K products: (K + 4) u sum |terms|.
double bound(std::size_t K, double abs_sum) { return static_cast<double>(K + 4) * kU * abs_sum + 1e-30; }

}  // namespace

TEST_CASE("kernels: kernel_target names the target a kernel call runs, on every target, and amx_in_use only AVX3_DL with AMX allowed") {
  const auto targets = s2lc::test::compiled_targets();
  REQUIRE(!targets.empty());
  for (std::int64_t target : targets) {
    s2lc::test::TargetScope scope(target);
    CHECK(std::string(k::kernel_target()) == hwy::TargetName(target));
    for (bool amx : s2lc::test::amx_modes(target)) {
      s2lc::test::AmxScope allow(amx);
      CHECK(k::amx_in_use() == (target == HWY_AVX3_DL && amx && k::cpu_has_amx_bf16()));
    }
  }
  CHECK(std::string(k::kernel_target()) == hwy::TargetName(targets.front()));  // the scopes ended: the best again
}

TEST_CASE("kernels: quantized decode equals compress::dequantize_row bit for bit (decode-add within one rounding, decode-scaled bit for bit), every tier and target") {
  for (std::int64_t target : s2lc::test::compiled_targets()) {
    s2lc::test::TargetScope scope(target);
    CAPTURE(std::string(hwy::TargetName(target)));
    for (const auto& c : kCases) {
      CAPTURE(c.rows); CAPTURE(c.cols); CAPTURE(c.group); CAPTURE(c.bits);
      const auto w = randn(c.rows * c.cols, static_cast<std::uint32_t>(c.rows * 131 + c.cols), 0.05f);
      const auto q = cz::quantize(w.data(), c.rows, c.cols, {c.bits, c.group, false});
      for (const auto& km : layouts(q)) {
        CAPTURE(km.lanes);
        CHECK(km.nibble == (c.bits <= 4 && c.group % 2 == 0));
        for (unsigned tier = 2; tier <= c.bits; ++tier) {
          CAPTURE(tier);
          std::vector<float> got(c.rows * c.cols + 1, -9.0f), ref(c.cols);
          k::q_decode_rows(km.view(), 0, c.rows, tier == c.bits ? 0 : tier, got.data(), c.cols);
          for (std::size_t r = 0; r < c.rows; ++r) {
            cz::dequantize_row(q, r, ref.data(), tier);
            for (std::size_t j = 0; j < c.cols; ++j) REQUIRE(std::bit_cast<std::uint32_t>(got[r * c.cols + j]) == std::bit_cast<std::uint32_t>(ref[j]));
          }
          REQUIRE(got.back() == -9.0f);  // no write past the rows
          if (c.rows >= 3) {  // a row sub-range (rows in lanes: not on panel bounds)
            std::vector<float> sub((c.rows - 2) * c.cols, -9.0f);
            k::q_decode_rows(km.view(), 1, c.rows - 2, tier == c.bits ? 0 : tier, sub.data(), c.cols);
            for (std::size_t i = 0; i < sub.size(); ++i) REQUIRE(std::bit_cast<std::uint32_t>(sub[i]) == std::bit_cast<std::uint32_t>(got[c.cols + i]));
          }
          // q_decode_rows_add: out += alpha * decoded, one rounding (FMA) or two (mul, add) per element.
          const float alpha = -0.625f;
          auto acc = randn(c.rows * c.cols + 1, static_cast<std::uint32_t>(c.rows + 7), 0.01f);
          const auto acc0 = acc;
          k::q_decode_rows_add(km.view(), 0, c.rows, tier == c.bits ? 0 : tier, alpha, acc.data(), c.cols);
          for (std::size_t i = 0; i < c.rows * c.cols; ++i) {
            const double want = double(acc0[i]) + double(alpha) * got[i];
            REQUIRE(std::fabs(acc[i] - want) <= kU * (std::fabs(want) + std::fabs(double(alpha) * got[i])) + 1e-37);
          }
          REQUIRE(acc.back() == acc0.back());
          // q_decode_rows_scaled: out = alpha * decoded, the decoded value rounded first.
          std::vector<float> scaled(c.rows * c.cols + 1, -9.0f);
          k::q_decode_rows_scaled(km.view(), 0, c.rows, tier == c.bits ? 0 : tier, alpha, scaled.data(), c.cols);
          for (std::size_t i = 0; i < c.rows * c.cols; ++i)
            REQUIRE(std::bit_cast<std::uint32_t>(scaled[i]) == std::bit_cast<std::uint32_t>(alpha * got[i]));
          REQUIRE(scaled.back() == -9.0f);
        }
      }
    }
  }
}

TEST_CASE("kernels: fused quantized gemv (both orientations), q_gemm_nt and q_gemm_nn within the f32 summation bound, every tier and target") {
  // Each double reference is computed once and checked against every target (recomputed per
  // target they were 70 % of this case's release time; under the sanitizers the -O0 kernels
  // dominate, see the token counts below).
  const auto targets = s2lc::test::compiled_targets();
  const auto each_target = [&](auto&& f) {
    for (std::int64_t target : targets) {
      s2lc::test::TargetScope scope(target);
      CAPTURE(std::string(hwy::TargetName(target)));
      f(target);
    }
  };
  for (const auto& c : kCases) {
    CAPTURE(c.rows); CAPTURE(c.cols); CAPTURE(c.group); CAPTURE(c.bits);
    const auto w = randn(c.rows * c.cols, static_cast<std::uint32_t>(c.rows * 7 + c.cols), 0.05f);
    const auto q = cz::quantize(w.data(), c.rows, c.cols, {c.bits, c.group, false});
    for (const auto& km : layouts(q)) {
      CAPTURE(km.lanes);
      const auto x = randn(c.cols, 11), t = randn(c.rows, 12);
      for (unsigned tier : {0u, 2u, c.bits - 1}) {
        if (tier == 1) continue;
        CAPTURE(tier);
        const auto W = cz::dequantize(q, tier);
        // y = 0.5 + alpha W x
        std::vector<double> ys(c.rows), ya(c.rows);
        for (std::size_t i = 0; i < c.rows; ++i)
          for (std::size_t j = 0; j < c.cols; ++j) ys[i] += double(W[i * c.cols + j]) * x[j], ya[i] += std::fabs(double(W[i * c.cols + j]) * x[j]);
        each_target([&](std::int64_t) {
          std::vector<float> y(c.rows + 1, 0.5f);
          y.back() = -9.0f;
          k::q_gemv_nt(km.view(), 0, c.rows, tier, x.data(), -1.5f, y.data());
          for (std::size_t i = 0; i < c.rows; ++i) REQUIRE(std::fabs(y[i] - (0.5 - 1.5 * ys[i])) <= 1.5 * bound(c.cols, ya[i]) + kU);
          REQUIRE(y.back() == -9.0f);
        });
        // Y[u] = 0.5 + alpha W X[u] for 1..29 tokens (q_gemm_nt; rows in lanes: passes of 16
        // (AVX-512, nibbles), 8 (AVX-512), one of the 3, 5, 6 or 7 left (AVX-512), 4, 2, 1
        // tokens), on all rows and on a sub-range (rows in lanes: not on panel bounds); rows
        // outside the range and the padding of Y untouched
        // (AVX3_DL on a CPU with AMX: from 16 tokens, nibbles from 8 on more than 64 rows, on
        // AMX tiles, amx.hpp, and without them)
        for (std::size_t nt : {1u, 2u, 3u, 4u, 5u, 6u, 7u, 8u, 13u, 16u, 29u}) {
          for (std::size_t r0 : {std::size_t{0}, std::size_t{1}}) {
            if (r0 && c.rows < 3) continue;
            const std::size_t nr = c.rows - 2 * r0, ldx = c.cols + 3, ldy = c.rows + 2;
            CAPTURE(nt); CAPTURE(r0);
            const auto X = randn(nt * ldx, static_cast<std::uint32_t>(17 + nt));
            std::vector<double> S(nt * nr), A(nt * nr);
            for (std::size_t u = 0; u < nt; ++u)
              for (std::size_t i = 0; i < nr; ++i)
                for (std::size_t j = 0; j < c.cols; ++j) {
                  const double p = double(W[(r0 + i) * c.cols + j]) * X[u * ldx + j];
                  S[u * nr + i] += p, A[u * nr + i] += std::fabs(p);
                }
            each_target([&](std::int64_t target) {
              // Under the sanitizers, targets narrower than AVX-512 skip 13, 16 and 29 tokens:
              // they run them in passes of 4, 2 and 1, as 5 and 8 tokens, and their -O0 kernels
              // were most of this case's 121-153 s there.
              if (s2lc::test::kSanitized && nt > 8 && target != HWY_AVX3 && target != HWY_AVX3_DL) return;
              for (bool amx : s2lc::test::amx_modes(target)) {
                s2lc::test::AmxScope amx_scope(amx);
                CAPTURE(amx);
                std::vector<float> Y(nt * ldy, 0.5f);
                k::q_gemm_nt(km.view(), r0, nr, tier, X.data(), ldx, nt, -1.5f, Y.data(), ldy);
                for (std::size_t u = 0; u < nt; ++u)
                  for (std::size_t i = 0; i < ldy; ++i) {
                    if (i >= nr) {
                      REQUIRE(Y[u * ldy + i] == 0.5f);
                      continue;
                    }
                    REQUIRE(std::fabs(Y[u * ldy + i] - (0.5 - 1.5 * S[u * nr + i])) <= 1.5 * bound(c.cols, A[u * nr + i]) + kU);
                  }
              }
            });
          }
        }
        // z = 0.25 + W^T t
        std::vector<double> zs(c.cols, 0.25), za(c.cols, 0.25);
        for (std::size_t j = 0; j < c.cols; ++j)
          for (std::size_t i = 0; i < c.rows; ++i) zs[j] += double(W[i * c.cols + j]) * t[i], za[j] += std::fabs(double(W[i * c.cols + j]) * t[i]);
        each_target([&](std::int64_t) {
          std::vector<float> z(c.cols + 1, 0.25f);
          z.back() = -9.0f;
          k::q_gemv_nn(km.view(), 0, c.rows, tier, t.data(), z.data());
          for (std::size_t j = 0; j < c.cols; ++j) REQUIRE(std::fabs(z[j] - zs[j]) <= bound(c.rows, za[j]));
          REQUIRE(z.back() == -9.0f);
        });
        // Z[t] = 0.25 + W^T T[t] for 1..11 tokens (q_gemm_nn: tiles of 8, then the rest in one
        // tile where the accumulators allow, else tiles of 4, 2, 1)
        for (std::size_t nt : {1u, 2u, 3u, 4u, 5u, 6u, 7u, 9u, 11u}) {
          CAPTURE(nt);
          const std::size_t ldc = c.rows + 2, ldz = c.cols + 3;
          const auto T = randn(nt * ldc, static_cast<std::uint32_t>(13 + nt));
          std::vector<double> S(nt * c.cols, 0.25), A(nt * c.cols, 0.25);
          for (std::size_t i = 0; i < nt; ++i)
            for (std::size_t j = 0; j < c.cols; ++j)
              for (std::size_t r = 0; r < c.rows; ++r) {
                const double p = double(W[r * c.cols + j]) * T[i * ldc + r];
                S[i * c.cols + j] += p, A[i * c.cols + j] += std::fabs(p);
              }
          each_target([&](std::int64_t) {
            std::vector<float> Z(nt * ldz, 0.25f);
            k::q_gemm_nn(km.view(), 0, c.rows, tier, T.data(), ldc, nt, Z.data(), ldz);
            for (std::size_t i = 0; i < nt; ++i) {
              for (std::size_t j = 0; j < c.cols; ++j) REQUIRE(std::fabs(Z[i * ldz + j] - S[i * c.cols + j]) <= bound(c.rows, A[i * c.cols + j]));
              for (std::size_t j = c.cols; j < ldz; ++j) REQUIRE(Z[i * ldz + j] == 0.25f);  // nothing else written
            }
          });
        }
      }
      // A row sub-range: only those rows are read and written.
      if (c.rows >= 3) {
        const auto W = cz::dequantize(q);
        double s = 0, a = 0;
        for (std::size_t j = 0; j < c.cols; ++j) s += double(W[c.cols + j]) * x[j], a += std::fabs(double(W[c.cols + j]) * x[j]);
        each_target([&](std::int64_t) {
          std::vector<float> y(c.rows, 0.0f);
          k::q_gemv_nt(km.view(), 1, c.rows - 2, 0, x.data(), 1.0f, y.data());
          CHECK(std::fabs(y[0] - s) <= bound(c.cols, a));
          CHECK(y[c.rows - 3] != 0.0f);
          CHECK(y[c.rows - 2] == 0.0f);
          CHECK(y[c.rows - 1] == 0.0f);
        });
      }
    }
  }
}

// q_gemm_nn converts the scales of up to 4096 / groups-per-row rows at a time: 1500 rows of 3
// groups take two such chunks, and k0 > 0 starts inside the matrix.
TEST_CASE("kernels: q_gemm_nn over a row range deeper than one chunk of converted scales, from k0 > 0, every tier and target") {
  const std::size_t rows = 1500, cols = 96, k0 = 7, nk = rows - 9;
  const auto w = randn(rows * cols, 5, 0.05f);
  const auto q = cz::quantize(w.data(), rows, cols, {4, 32, false});
  for (std::int64_t target : s2lc::test::compiled_targets()) {
    s2lc::test::TargetScope scope(target);
    CAPTURE(std::string(hwy::TargetName(target)));
    for (const auto& km : layouts(q))
      for (unsigned tier : {0u, 2u}) {
        CAPTURE(km.lanes); CAPTURE(tier);
        const auto W = cz::dequantize(q, tier);
        for (std::size_t nt : {1u, 8u, 9u}) {
          CAPTURE(nt);
          const std::size_t ldc = nk + 1, ldz = cols + 1;
          const auto T = randn(nt * ldc, static_cast<std::uint32_t>(29 + nt));
          std::vector<float> Z(nt * ldz, 0.25f);
          k::q_gemm_nn(km.view(), k0, nk, tier, T.data(), ldc, nt, Z.data(), ldz);
          for (std::size_t i = 0; i < nt; ++i) {
            for (std::size_t j = 0; j < cols; ++j) {
              double s = 0.25, a = 0.25;
              for (std::size_t r = 0; r < nk; ++r) {
                const double p = double(W[(k0 + r) * cols + j]) * T[i * ldc + r];
                s += p, a += std::fabs(p);
              }
              REQUIRE(std::fabs(Z[i * ldz + j] - s) <= bound(nk, a));
            }
            REQUIRE(Z[i * ldz + cols] == 0.25f);
          }
        }
      }
  }
}

TEST_CASE("kernels: f32 GEMM micro-kernels (gemm_nt, gemm_nn, gemm_tn) for every batch 1..9 and odd K, every target") {
  for (std::int64_t target : s2lc::test::compiled_targets()) {
    s2lc::test::TargetScope scope(target);
    CAPTURE(std::string(hwy::TargetName(target)));
    for (std::size_t nr : {1u, 3u, 4u, 6u, 17u, 70u, 150u})  // 70, 150: packed column slabs of gemm_nn, then remainders
      for (std::size_t K : {1u, 5u, 16u, 33u, 70u, 130u})  // 130: too deep to pack a 4-vector slab
        for (std::size_t nt = 1; nt <= 9; ++nt) {
          CAPTURE(nr); CAPTURE(K); CAPTURE(nt);
          const std::size_t ldw = K + 3, ldx = K + 1, ldy = nr + 2;
          const auto W = randn(nr * ldw, 1), X = randn(nt * ldx, 2);
          std::vector<float> Y(nt * ldy, 1.0f);
          k::gemm_nt(W.data(), ldw, nr, X.data(), ldx, nt, K, 0.75f, Y.data(), ldy);
          for (std::size_t t = 0; t < nt; ++t) {
            for (std::size_t i = 0; i < nr; ++i) {
              double s = 0, a = 0;
              for (std::size_t kk = 0; kk < K; ++kk) s += double(W[i * ldw + kk]) * X[t * ldx + kk], a += std::fabs(double(W[i * ldw + kk]) * X[t * ldx + kk]);
              REQUIRE(std::fabs(Y[t * ldy + i] - (1.0 + 0.75 * s)) <= bound(K, a) + 2 * kU);
            }
            for (std::size_t i = nr; i < ldy; ++i) REQUIRE(Y[t * ldy + i] == 1.0f);  // padding untouched
          }
          // gemm_nn: Y2[t, j] += sum_k C[t, k] A[k, j], A [K, nr] with lda = nr + 1.
          const std::size_t lda = nr + 1, ldc = K + 2;
          const auto A = randn(K * lda, 3), Cm = randn(nt * ldc, 4);
          std::vector<float> Y2(nt * ldy, -1.0f);
          k::gemm_nn(Cm.data(), ldc, nt, K, A.data(), lda, nr, Y2.data(), ldy);
          for (std::size_t t = 0; t < nt; ++t) {
            for (std::size_t j = 0; j < nr; ++j) {
              double s = -1, a = 1;
              for (std::size_t kk = 0; kk < K; ++kk) s += double(Cm[t * ldc + kk]) * A[kk * lda + j], a += std::fabs(double(Cm[t * ldc + kk]) * A[kk * lda + j]);
              REQUIRE(std::fabs(Y2[t * ldy + j] - s) <= bound(K, a));
            }
            for (std::size_t j = nr; j < ldy; ++j) REQUIRE(Y2[t * ldy + j] == -1.0f);
          }
          // gemm_tn: the same product with C stored k-major (Ct[k, t], ldct = nt + 3): same bits.
          const std::size_t ldct = nt + 3;
          std::vector<float> Ct(K * ldct, 7.0f), Y3(nt * ldy, -1.0f);
          for (std::size_t t = 0; t < nt; ++t)
            for (std::size_t kk = 0; kk < K; ++kk) Ct[kk * ldct + t] = Cm[t * ldc + kk];
          k::gemm_tn(Ct.data(), ldct, nt, K, A.data(), lda, nr, Y3.data(), ldy);
          for (std::size_t i = 0; i < Y2.size(); ++i) REQUIRE(std::bit_cast<std::uint32_t>(Y3[i]) == std::bit_cast<std::uint32_t>(Y2[i]));
        }
  }
}

// Rows in lanes at one and two tokens scale their codes by a power of 2 before the products (byte
// codes by 2^24, nibbles by 2^28 where there is no AVX-512 lookup) and the group's sum back:
// documented exact while activations stay below 2^92 in magnitude (morph::Activations::f32). At
// 2^90 every product is near f32's top and still within the bound; a missing or doubled 2^-k
// scaling, or an overflow, fails it.
TEST_CASE("kernels: q_gemm_nt rows in lanes at one and two tokens, activations near 2^90, every target") {
  for (std::int64_t target : s2lc::test::compiled_targets()) {
    s2lc::test::TargetScope scope(target);
    CAPTURE(std::string(hwy::TargetName(target)));
    for (unsigned bits : {3u, 4u, 5u, 8u}) {
      CAPTURE(bits);
      const std::size_t R = 20, C = 64;
      const auto w = randn(R * C, 31 + bits, 0.05f);
      const auto q = cz::quantize(w.data(), R, C, {bits, 32, false});
      const auto km = s2lc::morph::KMat::from(q, true);
      REQUIRE(km.lanes);
      const auto W = cz::dequantize(q, 0);
      for (std::size_t nt : {1u, 2u}) {
        CAPTURE(nt);
        auto X = randn(nt * C, 41);
        for (auto& v : X) v = std::ldexp(std::max(-1.0f, std::min(1.0f, v)), 90);
        std::vector<float> Y(nt * R, 0.0f);
        k::q_gemm_nt(km.view(), 0, R, 0, X.data(), C, nt, 1.0f, Y.data(), R);
        for (std::size_t u = 0; u < nt; ++u)
          for (std::size_t i = 0; i < R; ++i) {
            double s = 0, a = 0;
            for (std::size_t j = 0; j < C; ++j) {
              const double p = double(W[i * C + j]) * X[u * C + j];
              s += p, a += std::fabs(p);
            }
            REQUIRE(std::isfinite(Y[u * R + i]));
            REQUIRE(std::fabs(Y[u * R + i] - s) <= bound(C, a));
          }
      }
    }
  }
}

// AMX tiles (amx.hpp) split each f32 activation into three bf16 parts: activations of magnitude
// 2^-120 to 2^100 (parts near bf16's smallest normal, products near the top of the range) stay
// within the f32 bound, and NaN and +-inf give what the double reference gives (NaN where a code
// is 0 or infinities of both signs meet). On every target (AMX on and off where the CPU has it).
TEST_CASE("kernels: q_gemm_nt with activations from 2^-120 to 2^100, NaN and infinities, every target") {
  for (std::int64_t target : s2lc::test::compiled_targets()) {
    s2lc::test::TargetScope scope(target);
    CAPTURE(std::string(hwy::TargetName(target)));
    for (bool amx : s2lc::test::amx_modes(target)) {
      s2lc::test::AmxScope amx_scope(amx);
      CAPTURE(amx);
      const std::size_t R = 80, C = 96, nt = 16;
      const auto w = randn(R * C, 57, 0.05f);
      const auto q = cz::quantize(w.data(), R, C, {4, 32, false});
      const auto km = s2lc::morph::KMat::from(q, true);
      REQUIRE(km.lanes);
      const auto W = cz::dequantize(q, 0);
      auto X = randn(nt * C, 59);
      const int exps[] = {-120, -100, -60, 0, 60, 100};
      for (std::size_t u = 0; u < nt; ++u)
        for (std::size_t j = 0; j < C; ++j) X[u * C + j] = std::ldexp(X[u * C + j], exps[(u + j / 7) % 6]);
      X[3 * C + 5] = std::numeric_limits<float>::quiet_NaN();
      X[7 * C + 10] = std::numeric_limits<float>::infinity();
      X[9 * C + 20] = -std::numeric_limits<float>::infinity();
      X[9 * C + 50] = std::numeric_limits<float>::infinity();
      std::vector<float> Y(nt * R, 0.0f);
      k::q_gemm_nt(km.view(), 0, R, 0, X.data(), C, nt, 1.0f, Y.data(), R);
      for (std::size_t u = 0; u < nt; ++u)
        for (std::size_t i = 0; i < R; ++i) {
          CAPTURE(u); CAPTURE(i);
          double s = 0, a = 0;
          for (std::size_t j = 0; j < C; ++j) {
            const double p = double(W[i * C + j]) * X[u * C + j];
            s += p, a += std::fabs(p);
          }
          const float y = Y[u * R + i];
          if (std::isnan(s)) {
            REQUIRE(std::isnan(y));
          } else if (std::isinf(s)) {
            REQUIRE(y == static_cast<float>(s));
          } else {
            REQUIRE(std::fabs(y - s) <= bound(C, a) + kU);
          }
        }
    }
  }
}

TEST_CASE("kernels: SwiGLU, add_scaled and the streaming read, every target") {
  for (std::int64_t target : s2lc::test::compiled_targets()) {
    s2lc::test::TargetScope scope(target);
    CAPTURE(std::string(hwy::TargetName(target)));
    for (std::size_t n : {0u, 1u, 7u, 16u, 33u, 1000u}) {
      auto g = randn(n, 5, 3.0f), u = randn(n, 6);
      if (n > 3) g[0] = 0.0f, g[1] = -80.0f, g[2] = 80.0f;
      std::vector<float> out(n + 1, -9.0f);
      k::swiglu(g.data(), u.data(), out.data(), n);
      for (std::size_t i = 0; i < n; ++i) {
        const double ref = double(g[i]) / (1.0 + std::exp(-double(g[i]))) * u[i];
        REQUIRE(std::fabs(out[i] - ref) <= 8 * kU * std::fabs(ref) + 1e-37);
      }
      REQUIRE(out[n] == -9.0f);
      // add_scaled: the product rounded, then the sum, bit for bit (a fused multiply-add would
      // differ in the last bit for most of these), nothing written past n
      for (float a : {0.6f, 1.0f, -3.25f}) {
        CAPTURE(a);
        const auto ax = randn(n, 8);
        std::vector<float> y = randn(n + 1, 9), ref = y;
        y[n] = ref[n] = 7.0f;
        for (std::size_t i = 0; i < n; ++i) {
          volatile float prod = a * ax[i];  // rounded on its own
          ref[i] = ref[i] + prod;
        }
        k::add_scaled(a, ax.data(), y.data(), n);
        for (std::size_t i = 0; i <= n; ++i) REQUIRE(std::bit_cast<std::uint32_t>(y[i]) == std::bit_cast<std::uint32_t>(ref[i]));
      }
      const auto p = randn(n, 7);
      double s = 0, a = 0;
      for (float v : p) s += v, a += std::fabs(v);
      CHECK(std::fabs(k::stream_read(p.data(), n) - s) <= bound(n, a));
    }
    // The byte read: the xor of the little-endian 8-byte words, the last one zero-padded, from
    // any start (unaligned) and any length.
    std::vector<std::uint8_t> bytes(1200);
    for (std::size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<std::uint8_t>(i * 37 + i / 5);
    for (std::size_t off : {0u, 3u}) {
      for (std::size_t n : {0u, 1u, 9u, 63u, 64u, 257u, 1100u}) {
        CAPTURE(off);
        CAPTURE(n);
        std::uint64_t ref = 0;
        for (std::size_t i = 0; i < n; ++i) ref ^= std::uint64_t{bytes[off + i]} << (8 * (i % 8));
        CHECK(k::stream_read_bytes(bytes.data() + off, n) == ref);
      }
    }
  }
}

// fma_peak is the bench's FMA bound (the fma_bound rows): it must count the multiply-adds it does
// (8 vector FMAs per round, at the target's width) and do them on distinct chains (GCC once
// folded chains that started equal into one, counted as 8: the sum then falls below the bound).
TEST_CASE("kernels: fma_peak counts its multiply-adds at the target's vector width, every target") {
  for (std::int64_t target : s2lc::test::compiled_targets()) {
    s2lc::test::TargetScope scope(target);
    CAPTURE(std::string(hwy::TargetName(target)));
    std::size_t lanes = 4;  // SSE2 to SSE4, EMU128
    if (target == HWY_SCALAR) lanes = 1;
    if (target == HWY_AVX2) lanes = 8;
    if (target == HWY_AVX3 || target == HWY_AVX3_DL) lanes = 16;
    for (std::size_t iters : {0u, 1u, 2u, 3u, 1001u}) {
      CAPTURE(iters);
      float sink = -1.0f;
      CHECK(k::fma_peak(iters, &sink) == iters * 8 * lanes);
      // Every chain a <- 0.999999 a + 1e-7 from a distinct start in [1, 4.75]: they sum to 15 (8
      // chains), 28.5 (12) or 46 (16) times the lanes at the start and stay within 0.1 % of that.
      const double lo = 15.0 * static_cast<double>(lanes) * std::pow(0.999999, double(iters)) * 0.999;
      const double hi = 46.0 * static_cast<double>(lanes) * 1.001;
      CHECK(sink >= lo);
      CHECK(sink <= hi);
    }
  }
}

TEST_CASE("kernels: merge then unmerge restores f32 and bf16 buffers bit for bit, every target, denormals flushed or not") {
  for (const bool flush : s2lc::test::flush_modes())
  for (std::int64_t target : s2lc::test::compiled_targets()) {
    s2lc::test::TargetScope scope(target);
    CAPTURE(flush);
    CAPTURE(std::string(hwy::TargetName(target)));
    const s2lc::test::FlushScope fp(flush);  // the expected values below are computed in this mode too
    volatile float half_tiny = std::ldexp(1.0f, -127);
    REQUIRE((half_tiny * 1.0f == 0.0f) == flush);  // DAZ really on (and off)
    for (std::size_t n : {1u, 15u, 64u, 1001u}) {
      CAPTURE(n);
      auto w = randn(n, 8, 0.05f);
      auto d = randn(n, 9, 0.01f);
      // Values whose sums cross binades or tie: they need the recorded exceptions.
      for (std::size_t i = 0; i < n; i += 7) w[i] = std::ldexp(1.0f, -static_cast<int>(i % 9)) * (i % 2 ? -1.0f : 1.0f);
      // Subnormal weights, and sums that are subnormal (flushed to zero under FTZ / DAZ).
      const float tiny = std::ldexp(1.0f, -126);
      for (std::size_t i = 3; i < n; i += 11) w[i] = std::ldexp(1.0f, -127 - static_cast<int>(i % 20)) * (i % 2 ? -1.0f : 1.0f);
      for (std::size_t i = 5; i < n; i += 13) w[i] = 1.5f * tiny, d[i] = -tiny;
      const auto base = w;
      // The recorded elements: their mask bits (every byte written, bits past n clear).
      auto marked = [n](const std::vector<std::uint8_t>& mask) {
        std::vector<std::uint32_t> at;
        for (std::size_t i = 0; i < 8 * mask.size(); ++i)
          if (mask[i / 8] >> (i % 8) & 1) at.push_back(static_cast<std::uint32_t>(i));
        if (!at.empty()) REQUIRE(at.back() < n);
        return at;
      };
      std::vector<std::uint8_t> mask((n + 7) / 8, 0xA5);
      std::vector<float> val(n + 64);  // (whole vectors stored)
      const std::size_t nb = k::merge_f32(w.data(), d.data(), n, mask.data(), val.data());
      const auto idx = marked(mask);
      REQUIRE(idx.size() == nb);
      for (std::size_t i = 0; i < n; ++i) {  // recorded exactly where subtracting d does not restore
        const bool rec = std::binary_search(idx.begin(), idx.end(), static_cast<std::uint32_t>(i));
        CHECK(rec == (std::bit_cast<std::uint32_t>(w[i] - d[i]) != std::bit_cast<std::uint32_t>(base[i])));
      }
      for (std::size_t i = 0; i < nb; ++i) CHECK(std::bit_cast<std::uint32_t>(val[i]) == std::bit_cast<std::uint32_t>(base[idx[i]]));
      for (std::size_t i = 0; i < n; ++i) REQUIRE(std::bit_cast<std::uint32_t>(w[i]) == std::bit_cast<std::uint32_t>(base[i] + d[i]));
      REQUIRE(k::unmerge_f32(w.data(), d.data(), n, mask.data(), val.data(), nb) == nb);
      for (std::size_t i = 0; i < n; ++i) REQUIRE(std::bit_cast<std::uint32_t>(w[i]) == std::bit_cast<std::uint32_t>(base[i]));
      CHECK(nb <= n);

      for (bool insn : s2lc::test::bf16_insn_modes(target)) {
        s2lc::test::Bf16InsnScope bf16_scope(insn);
        CAPTURE(insn);
        std::vector<std::uint16_t> h(n), hbase(n), hval(n + 64);
        for (std::size_t i = 0; i < n; ++i) h[i] = hbase[i] = s2lc::f32_to_bf16(base[i]);
        std::fill(mask.begin(), mask.end(), 0x5A);
        const std::size_t nh = k::merge_bf16(h.data(), d.data(), n, mask.data(), hval.data());
        const auto hidx = marked(mask);
        REQUIRE(hidx.size() == nh);
        for (std::size_t i = 0; i < nh; ++i) CHECK(hval[i] == hbase[hidx[i]]);
        for (std::size_t i = 0; i < n; ++i) REQUIRE(h[i] == s2lc::f32_to_bf16(s2lc::bf16_to_f32(hbase[i]) + d[i]));
        REQUIRE(k::unmerge_bf16(h.data(), d.data(), n, mask.data(), hval.data(), nh) == nh);
        CHECK(h == hbase);
      }
    }
  }
}

TEST_CASE("kernels: merge_bf16 and unmerge_bf16 follow the scalar rule on zeros, subnormals, infinities and NaN, every target and bf16 path, denormals flushed or not") {
  // Lanes whose sum or check is subnormal (the AVX512_BF16 instruction flushes those to +-0,
  // the scalar rule rounds them), exact zeros, cancellations, infinities and NaNs, spread among
  // ordinary values so that some vectors of 16 hold none of them and others one or several.
  const float tiny = std::ldexp(1.0f, -126);  // the smallest normal f32 (and bf16)
  struct Pair {
    std::uint16_t w;
    float d;
  };
  const Pair special[] = {
      {s2lc::f32_to_bf16(1.5f * tiny), -tiny},                   // sum 0.5 tiny: subnormal
      {0x0000, tiny + std::ldexp(1.0f, -140)},                   // sum normal, check (m - d) subnormal
      {0x0001, 0.0f},                                            // a subnormal bf16 weight, unchanged
      {0x8040, std::ldexp(1.0f, -135)},                          // subnormal weight and delta
      {0x0000, 0.0f}, {0x8000, 0.0f}, {0x8000, -0.0f},           // exact zeros
      {s2lc::f32_to_bf16(0.25f), -0.25f},                        // cancels to +0
      {0x0000, std::ldexp(1.0f, -149)},                          // the smallest subnormal delta
      {0x7F80, 1.0f}, {0xFF80, -1.0f}, {0x7F80, -std::numeric_limits<float>::infinity()},  // inf, inf - inf
      {0x7FC1, 0.5f}, {0xFF81, 0.0f},                            // quiet and signalling NaN weights
      {s2lc::f32_to_bf16(1.0f), std::numeric_limits<float>::quiet_NaN()},
      {0x7F7F, 3e38f},                                           // overflows to inf
  };
  constexpr std::size_t kSpecial = sizeof(special) / sizeof(special[0]);
  // With MXCSR's FTZ and DAZ set (engines that flush denormals) the scalar rule flushes too, and
  // the kernels must follow it in that mode: unmerge then still restores the base.
  for (const bool flush : s2lc::test::flush_modes())
  for (std::int64_t target : s2lc::test::compiled_targets()) {
    s2lc::test::TargetScope scope(target);
    CAPTURE(flush);
    CAPTURE(std::string(hwy::TargetName(target)));
    const s2lc::test::FlushScope fp(flush);
    for (bool insn : s2lc::test::bf16_insn_modes(target)) {
      s2lc::test::Bf16InsnScope bf16_scope(insn);
      CAPTURE(insn);
      for (std::size_t n : {16u, 333u, 1024u}) {
        CAPTURE(n);
        const auto wf = randn(n, 31, 0.05f);
        auto d = randn(n, 32, 0.01f);
        std::vector<std::uint16_t> h(n);
        for (std::size_t i = 0; i < n; ++i) h[i] = s2lc::f32_to_bf16(wf[i]);
        // specials in the first vector, then one every 37 elements, then a run of them past 512
        for (std::size_t i = 0, j = 0; i < n; i += (i < 16 ? 3 : i < 512 ? 37 : 1), ++j) {
          if (i >= 600) break;
          h[i] = special[j % kSpecial].w, d[i] = special[j % kSpecial].d;
        }
        const auto hbase = h;
        std::vector<std::uint8_t> mask((n + 7) / 8, 0x33);
        std::vector<std::uint16_t> vals(n + 64);
        const std::size_t nb = k::merge_bf16(h.data(), d.data(), n, mask.data(), vals.data());
        std::size_t at = 0;
        for (std::size_t i = 0; i < n; ++i) {
          CAPTURE(i); CAPTURE(hbase[i]); CAPTURE(d[i]);
          const std::uint16_t m = s2lc::f32_to_bf16(s2lc::bf16_to_f32(hbase[i]) + d[i]);
          REQUIRE(h[i] == m);
          const bool rec = s2lc::f32_to_bf16(s2lc::bf16_to_f32(m) - d[i]) != hbase[i];
          REQUIRE(((mask[i / 8] >> (i % 8)) & 1) == (rec ? 1 : 0));
          if (rec) REQUIRE(vals[at++] == hbase[i]);
        }
        REQUIRE(at == nb);
        REQUIRE(k::unmerge_bf16(h.data(), d.data(), n, mask.data(), vals.data(), nb) == nb);
        CHECK(h == hbase);
      }
    }
  }
}

TEST_CASE("kernels: count_bits counts the set bits of any byte range, every target") {
  std::vector<std::uint8_t> bytes(700);
  for (std::size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<std::uint8_t>(i * 73 + i / 3);
  std::fill(bytes.begin() + 300, bytes.begin() + 400, std::uint8_t{0xFF});
  for (std::int64_t target : s2lc::test::compiled_targets()) {
    s2lc::test::TargetScope scope(target);
    CAPTURE(std::string(hwy::TargetName(target)));
    for (std::size_t off : {0u, 1u, 5u})
      for (std::size_t n : {0u, 1u, 7u, 63u, 64u, 65u, 128u, 200u, 691u}) {
        CAPTURE(off); CAPTURE(n);
        std::size_t ref = 0;
        for (std::size_t i = 0; i < n; ++i) ref += static_cast<std::size_t>(std::popcount(bytes[off + i]));
        CHECK(k::count_bits(bytes.data() + off, n) == ref);
      }
  }
}

TEST_CASE("kernels: q_merge_rows and q_unmerge_rows give the bits, mask and record of decoding first then merge / unmerge, every layout, tier and target") {
  // Merge: rows [r0, r0 + nr) of q (rows in lanes: not on panel bounds) decoded in registers into
  // w (ld = cols + 3, padding untouched); the reference decodes them (q_decode_rows, or
  // q_decode_rows_scaled for alpha != 1) and runs merge_f32 / merge_bf16 row by row. The deltas
  // are as large as the base, so many elements are recorded; mask rows have a spare byte.
  for (std::int64_t target : s2lc::test::compiled_targets()) {
    s2lc::test::TargetScope scope(target);
    CAPTURE(std::string(hwy::TargetName(target)));
    for (const auto& c : kCases) {
      CAPTURE(c.rows); CAPTURE(c.cols); CAPTURE(c.group); CAPTURE(c.bits);
      const auto src = randn(c.rows * c.cols, static_cast<std::uint32_t>(c.rows * 17 + c.cols), 0.05f);
      const auto q = cz::quantize(src.data(), c.rows, c.cols, {c.bits, c.group, false});
      const std::size_t r0 = c.rows >= 3 ? 1 : 0, nr = c.rows - r0, ld = c.cols + 3, ldm = (c.cols + 7) / 8 + 1;
      auto base = randn(nr * ld, static_cast<std::uint32_t>(c.cols * 5 + 3), 0.05f);
      for (std::size_t i = 0; i < base.size(); i += 5) base[i] = std::ldexp(1.0f, -static_cast<int>(i % 7) - 4);  // binade edges
      std::vector<float> other(2 * ld * 16, 0.0f);  // rows the kernel prefetches (their contents stay)
      const k::PrefetchRows pf{other.data(), 16, 2 * ld * sizeof(float), ld * sizeof(float)};
      for (const auto& km : layouts(q)) {
        CAPTURE(km.lanes);
        for (unsigned tier : {0u, 2u}) {
          for (float alpha : {1.0f, -0.3f}) {  // (0.3: its products round, so a fused multiply-add would show)
            CAPTURE(tier); CAPTURE(alpha);
            std::vector<float> d(nr * c.cols);
            if (alpha == 1.0f) k::q_decode_rows(km.view(), r0, nr, tier, d.data(), c.cols);
            else k::q_decode_rows_scaled(km.view(), r0, nr, tier, alpha, d.data(), c.cols);
            auto run = [&](auto zero) {
              using T = decltype(zero);
              constexpr bool f32 = std::is_same_v<T, float>;
              std::vector<T> b0(base.size());
              for (std::size_t i = 0; i < base.size(); ++i) {
                if constexpr (f32) b0[i] = base[i];
                else b0[i] = s2lc::f32_to_bf16(base[i]);
              }
              auto want = b0, got = b0;
              std::vector<std::uint8_t> wmask(nr * ldm, 0), gmask(nr * ldm, 0);
              std::vector<T> wvals(nr * c.cols + 64), gvals(nr * c.cols + 64);
              std::size_t nw = 0;
              for (std::size_t i = 0; i < nr; ++i) {
                if constexpr (f32) nw += k::merge_f32(want.data() + i * ld, d.data() + i * c.cols, c.cols, wmask.data() + i * ldm, wvals.data() + nw);
                else nw += k::merge_bf16(want.data() + i * ld, d.data() + i * c.cols, c.cols, wmask.data() + i * ldm, wvals.data() + nw);
              }
              std::size_t ng;
              if constexpr (f32) ng = k::q_merge_rows_f32(km.view(), r0, nr, tier, alpha, got.data(), ld, gmask.data(), ldm, gvals.data(), &pf);
              else ng = k::q_merge_rows_bf16(km.view(), r0, nr, tier, alpha, got.data(), ld, gmask.data(), ldm, gvals.data(), &pf);
              REQUIRE(ng == nw);
              REQUIRE(std::memcmp(got.data(), want.data(), got.size() * sizeof(T)) == 0);  // padding too
              REQUIRE(gmask == wmask);
              REQUIRE(std::memcmp(gvals.data(), wvals.data(), nw * sizeof(T)) == 0);
              if (c.rows * c.cols >= 256) CHECK(nw > 0);  // the record is exercised
              // unmerge from the codes restores the base, consuming the whole record
              std::size_t used;
              if constexpr (f32) used = k::q_unmerge_rows_f32(km.view(), r0, nr, tier, alpha, got.data(), ld, gmask.data(), ldm, gvals.data(), ng, &pf);
              else used = k::q_unmerge_rows_bf16(km.view(), r0, nr, tier, alpha, got.data(), ld, gmask.data(), ldm, gvals.data(), ng, &pf);
              CHECK(used == ng);
              REQUIRE(std::memcmp(got.data(), b0.data(), got.size() * sizeof(T)) == 0);
            };
            run(0.0f);
            for (bool insn : s2lc::test::bf16_insn_modes(target)) {
              s2lc::test::Bf16InsnScope bf16_scope(insn);
              CAPTURE(insn);
              run(std::uint16_t{0});
            }
            REQUIRE(std::all_of(other.begin(), other.end(), [](float x) { return x == 0.0f; }));
          }
        }
      }
    }
  }
}

TEST_CASE("kernels: lowrank_add_fixed within its int16 fixed-point bound of the exact product, every target and odd shape") {
  // out (+)= w L^T R with L [K, rb], R [K, cb]; the bound documented in qgemm.hpp:
  // sum_k |L[k, i]| rho_k / 2 + lambda_i / 2 sum_k |R16[k, j]| <= K M_i (1 / rmax + 1 / amax) / 2
  // with M_i = max_k |L[k, i]| max_j |R[k, j]|, plus the final f32 rounding.
  struct Shape {
    std::size_t K, rb, cb;
  };
  const Shape shapes[] = {{1, 1, 1}, {1, 5, 3}, {2, 4, 16}, {3, 7, 17}, {7, 13, 37}, {16, 64, 64}, {33, 65, 100}, {48, 256, 256}, {64, 40, 300}, {200, 9, 70}};
  std::vector<float> first;  // the first target's result for the last shape: every target agrees
  for (std::int64_t target : s2lc::test::compiled_targets()) {
    s2lc::test::TargetScope scope(target);
    CAPTURE(std::string(hwy::TargetName(target)));
    for (const auto& sh : shapes) {
      CAPTURE(sh.K);
      CAPTURE(sh.rb);
      CAPTURE(sh.cb);
      auto L = randn(sh.K * sh.rb, 11), R = randn(sh.K * sh.cb, 12);
      // rows of very different scales, a zero row of R and a zero column of L
      for (std::size_t k = 0; k < sh.K; ++k)
        for (std::size_t j = 0; j < sh.cb; ++j) R[k * sh.cb + j] *= std::ldexp(1.0f, static_cast<int>(k % 5) * 3 - 6);
      if (sh.K > 2) std::fill(R.begin() + static_cast<std::ptrdiff_t>(sh.cb), R.begin() + static_cast<std::ptrdiff_t>(2 * sh.cb), 0.0f);
      if (sh.rb > 2)
        for (std::size_t k = 0; k < sh.K; ++k) L[k * sh.rb + 1] = 0.0f;
      int rbits = 0, abits = 0;
      s2lc::kernels::fixed_bits(sh.K, rbits, abits);
      CHECK(double((1 << rbits) - 1) * double((1 << abits) - 1) * double(sh.K) < 2147483648.0);
      const double per = double(sh.K) * (1.0 / ((1 << rbits) - 1) + 1.0 / ((1 << abits) - 1)) / 2;
      std::vector<std::int32_t> scratch(s2lc::kernels::lowrank_fixed_scratch(sh.K, sh.rb, sh.cb));
      const std::size_t ldo = sh.cb + 3;
      for (bool overwrite : {true, false}) {
        CAPTURE(overwrite);
        std::vector<float> out(sh.rb * ldo, 0.25f);
        const float w = -0.75f;
        k::lowrank_add_fixed(L.data(), R.data(), sh.K, sh.rb, sh.cb, w, out.data(), ldo, overwrite, scratch.data(), nullptr);
        for (std::size_t i = 0; i < sh.rb; ++i) {
          double M = 0;
          for (std::size_t kk = 0; kk < sh.K; ++kk) {
            double rm = 0;
            for (std::size_t j = 0; j < sh.cb; ++j) rm = std::max(rm, std::fabs(double(R[kk * sh.cb + j])));
            M = std::max(M, std::fabs(double(L[kk * sh.rb + i])) * rm);
          }
          for (std::size_t j = 0; j < sh.cb; ++j) {
            double exact = 0;
            for (std::size_t kk = 0; kk < sh.K; ++kk) exact += double(L[kk * sh.rb + i]) * R[kk * sh.cb + j];
            const double want = (overwrite ? 0.0 : 0.25) + double(w) * exact;
            const double tol = std::fabs(double(w)) * per * M * 1.001 + 4 * kU * (std::fabs(want) + 0.25);
            REQUIRE(std::fabs(out[i * ldo + j] - want) <= tol);
            if (i == 1 && sh.rb > 2) REQUIRE(out[i * ldo + j] == (overwrite ? 0.0f : 0.25f));  // zero column of L
          }
          for (std::size_t j = sh.cb; j < ldo; ++j) REQUIRE(out[i * ldo + j] == 0.25f);  // past the block: untouched
        }
        {  // prefetching rows of another buffer (odd stride and width) changes nothing in out or there
          std::vector<float> again(sh.rb * ldo, 0.25f), other(3 * sh.rb * 37 + 64, 1.5f);
          const s2lc::kernels::PrefetchRows pf{other.data() + 1, 3 * sh.rb, 37 * sizeof(float), 33 * sizeof(float)};
          k::lowrank_add_fixed(L.data(), R.data(), sh.K, sh.rb, sh.cb, w, again.data(), ldo, overwrite, scratch.data(), &pf);
          REQUIRE(again == out);
          CHECK(std::all_of(other.begin(), other.end(), [](float v) { return v == 1.5f; }));
        }
        if (sh.K == 1 && sh.rb == 5) {  // rank 0: adds nothing, overwrites with zeros
          std::vector<float> z(sh.rb * ldo, 0.25f);
          k::lowrank_add_fixed(L.data(), R.data(), 0, sh.rb, sh.cb, w, z.data(), ldo, overwrite, scratch.data(), nullptr);
          for (std::size_t i = 0; i < sh.rb; ++i)
            for (std::size_t j = 0; j < ldo; ++j) REQUIRE(z[i * ldo + j] == (overwrite && j < sh.cb ? 0.0f : 0.25f));
        }
        if (&sh == &shapes[std::size(shapes) - 1] && overwrite) {
          if (first.empty()) first = out;
          else CHECK(out == first);
        }
      }
    }
  }
}

}  // namespace suite_kernels_qgemm
