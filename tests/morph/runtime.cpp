// Running experts straight from their coefficients (include/morph): apply equals the dense
// product of compress::reconstruct for every member, tier, batch size and block kind (real
// tinymoe experts with odd block shapes, and synthetic groups that produce raw / shared / 4-bit
// blocks); grouped apply and the SwiGLU layer equal per-expert application; results do not depend
// on the thread count; a too-small arena and bad plans are rejected.
//
// Tolerances are the f32 summation bound: |y - y_ref| <= (K + slack) * 2^-24 * sum_j |W|_ij |x_j|,
// where |W| sums the absolute values of every decoded component (cores, residual, factor products)
// and K counts the terms of the longest sum.
#include <doctest/doctest.h>

#include "compress/synthetic.hpp"
#include "kernels/targets.hpp"
#include "morph/plans.hpp"
#include "support.hpp"

#include <morph/grouped.hpp>
#include <morph/merge.hpp>
#include <morph/morph.hpp>
#include <morph/parallel.hpp>
#include <morph/runtime.hpp>
#include <s2lc/compress/compressor.hpp>
#include <s2lc/compress/model.hpp>
#include <s2lc/io/safetensors.hpp>
#include <s2lc/plan.hpp>
#include <s2lc/tensor.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <random>
#include <utility>
#include <string>
#include <vector>

// The suite's own scope: the suites compile in unity groups (tests/CMakeLists.txt).
namespace suite_morph_runtime {

extern "C" void openblas_set_num_threads(int);

namespace {

namespace cz = s2lc::compress;
namespace mo = s2lc::morph;
constexpr double kU = 1.0 / 16777216.0;

using s2lc::test::randn;
using s2lc::test::top2_plan;

/// The tinymoe fixture's layer-1 experts (w1, w2, w3) compressed at ratio 8 with 100 x 90 blocks
/// (edge blocks of 68 rows / 76 and 48 columns; partial quantization groups), once per process.
const cz::Compressed& fixture_compressed() {
  static const cz::Compressed c = [] {
    openblas_set_num_threads(1);
    return s2lc::test::tinymoe_l1_compressed(true);
  }();
  return c;
}

/// The same experts at ratio 8 in the default 256 x 256 blocks: left factors of 256 columns,
/// which the int8 left factor kernel (q8_gemv_nn) runs whole on every SIMD target.
const cz::Compressed& fixture_compressed_256() {
  static const cz::Compressed c = [] {
    openblas_set_num_threads(1);
    return s2lc::test::tinymoe_l1_compressed(false);
  }();
  return c;
}

/// Synthetic groups covering raw residual blocks (energy 1), shared bases and 4-bit payloads.
std::vector<cz::Compressed> synthetic_compressed() {
  const auto in = s2lc::test::synthetic_groups();
  std::vector<cz::Compressed> out;
  cz::Options o;
  o.ratio = 6;
  out.push_back(cz::compress(in, s2lc::test::small_blocks(o)));
  o.ratio = 3;
  o.bits = 4;
  out.push_back(cz::compress(in, s2lc::test::small_blocks(o)));
  cz::Options e;
  e.mode = cz::target_mode::energy;
  e.energy = 1.0;
  e.energy_floor = 0;
  out.push_back(cz::compress(in, s2lc::test::small_blocks(e)));
  return out;
}

/// Element-wise sum of |decoded component| over member e's cores and residual (double).
/// Per element of member e: the sum of the absolute values of every component the
/// reconstruction adds (fixed = false), or (fixed = true) the error bound of multiplying the
/// low-rank blocks' factors in int16 fixed point (kernels::lowrank_add_fixed: per block row i,
/// k (1 / rmax + 1 / amax) / 2 max_k |L[k, i]| max_j |R[k, j]|).
/// keep_cores: where a raw residual replaces the cores, keep their terms too (a path that adds and
/// subtracts them, as base + module does).
std::vector<double> abs_components(const cz::CompressedGroup& g, std::uint32_t e, unsigned tier, bool fixed = false, bool keep_cores = false) {
  const auto& grid = g.grid;
  std::vector<double> out(grid.rows * grid.cols, 0.0);
  auto add = [&](const cz::BlockMatrix& m, bool residual) {
    for (std::size_t b = 0; b < grid.blocks(); ++b) {
      const auto& blk = m.blocks[b];
      const std::size_t r0 = grid.r0(b), c0 = grid.c0(b), rb = grid.rb(b), cb = grid.cb(b);
      auto at = [&](std::size_t i, std::size_t j) -> double& { return out[(r0 + i) * grid.cols + c0 + j]; };
      if (residual && blk.kind == cz::block_kind::raw && !keep_cores)
        for (std::size_t i = 0; i < rb; ++i)
          for (std::size_t j = 0; j < cb; ++j) at(i, j) = 0;
      auto tq = [&](const cz::QMatrix& q) { return tier == 0 ? 0u : std::min<unsigned>(tier, q.bits); };
      switch (blk.kind) {
        case cz::block_kind::zero: break;
        case cz::block_kind::raw:
          for (std::size_t i = 0; i < rb; ++i)
            for (std::size_t j = 0; j < cb; ++j) at(i, j) += fixed ? 0.0 : std::fabs(blk.raw[i * cb + j]);
          break;
        case cz::block_kind::dense: {
          if (fixed) break;
          const auto a = cz::dequantize(blk.a, tq(blk.a));
          for (std::size_t i = 0; i < rb; ++i)
            for (std::size_t j = 0; j < cb; ++j) at(i, j) += std::fabs(a[i * cb + j]);
          break;
        }
        case cz::block_kind::lowrank:
        case cz::block_kind::shared: {
          const auto& lq = blk.kind == cz::block_kind::lowrank ? blk.a : g.bases[blk.basis].u;
          const auto l = cz::dequantize(lq, tq(lq));
          const auto r = cz::dequantize(blk.b, tq(blk.b));
          if (fixed) {
            int rbits = 0, abits = 0;
            s2lc::kernels::fixed_bits(blk.rank, rbits, abits);
            const double per = double(blk.rank) * (1.0 / ((1 << rbits) - 1) + 1.0 / ((1 << abits) - 1)) / 2;
            for (std::size_t i = 0; i < rb; ++i) {
              double big = 0;
              for (std::size_t k = 0; k < blk.rank; ++k) {
                double rm = 0;
                for (std::size_t j = 0; j < cb; ++j) rm = std::max(rm, std::fabs(double(r[k * cb + j])));
                big = std::max(big, std::fabs(double(l[k * rb + i])) * rm);
              }
              for (std::size_t j = 0; j < cb; ++j) at(i, j) += per * big;
            }
            break;
          }
          for (std::size_t k = 0; k < blk.rank; ++k)
            for (std::size_t i = 0; i < rb; ++i)
              for (std::size_t j = 0; j < cb; ++j) at(i, j) += std::fabs(double(l[k * rb + i]) * r[k * cb + j]);
          break;
        }
      }
    }
  };
  std::vector<int> path;
  for (int n = g.leaf[e]; n >= 0; n = g.nodes[static_cast<std::size_t>(n)].parent) path.push_back(n);
  for (auto it = path.rbegin(); it != path.rend(); ++it) add(g.nodes[static_cast<std::size_t>(*it)].core, false);
  add(g.residuals[e], true);
  return out;
}

std::size_t max_rank(const cz::CompressedGroup& g) {
  std::size_t r = 0;
  for (const auto& res : g.residuals)
    for (const auto& b : res.blocks) r = std::max<std::size_t>(r, b.rank);
  for (const auto& n : g.nodes)
    for (const auto& b : n.core.blocks) r = std::max<std::size_t>(r, b.rank);
  return r;
}

/// Checks Y = Y0 + alpha W X^T against the double product of reconstruct(g, e, tier).
void check_apply(const cz::CompressedGroup& g, const mo::KGroup& kg, std::uint32_t e, unsigned tier, std::size_t n) {
  const std::size_t R = g.grid.rows, C = g.grid.cols, ldx = C + 3, ldy = R + 1;
  const auto X = randn(n * ldx, static_cast<std::uint32_t>(e * 1000 + n * 10 + tier), 1.0f);
  std::vector<float> Y(n * ldy, 0.25f);
  std::vector<std::byte> mem(mo::apply_scratch_bytes(kg, n));
  mo::Arena arena(mem);
  mo::apply(kg, e, X.data(), ldx, n, Y.data(), ldy, arena, -2.0f, tier);
  CHECK(arena.used() == 0);  // everything taken was given back
  const auto W = cz::reconstruct(g, e, tier);
  const auto A = abs_components(g, e, tier);
  const double slack = static_cast<double>(C + max_rank(g) + 32);
  for (std::size_t t = 0; t < n; ++t)
    for (std::size_t i = 0; i < R; ++i) {
      double s = 0, a = 0;
      for (std::size_t j = 0; j < C; ++j) s += double(W(i, j)) * X[t * ldx + j], a += A[i * C + j] * std::fabs(X[t * ldx + j]);
      const double ref = 0.25 - 2.0 * s;
      REQUIRE(std::fabs(Y[t * ldy + i] - ref) <= 2.0 * slack * kU * a + kU);
    }
  for (std::size_t t = 0; t < n; ++t) REQUIRE(Y[t * ldy + R] == 0.25f);  // padding untouched
}

/// Half the int8 scale of the group each column of x is quantized in (per grid column block,
/// groups of g.group_size).
std::vector<double> half_scales(const cz::CompressedGroup& g, const float* x) {
  const std::size_t C = g.grid.cols, bc = g.grid.block_cols, G = g.group_size;
  std::vector<double> half_sx(C);
  for (std::size_t j = 0; j < C; ++j) {
    const std::size_t b0 = j / bc * bc, be = std::min(C, b0 + bc), g0 = b0 + (j - b0) / G * G, g1 = std::min(be, g0 + G);
    float amax = 0;
    for (std::size_t k = g0; k < g1; ++k) amax = std::max(amax, std::fabs(x[k]));
    half_sx[j] = 0.5 * double(amax) / 127.0;
  }
  return half_sx;
}

/// For one or two tokens, apply meets each eligible left factor's coefficients t = alpha right x
/// as int8 (q8_gemv_nn): per output row, the bound that adds (in units of |alpha|),
/// sigma_g / 2 sum_k |code_k,i| with sigma_g <= max_k T_k |s_kg| / 127 and |t_k| / |alpha| <= T_k =
/// sum_j |right_kj| (|x_j| + half_sx_j), x_j's int8 value being at most half_sx_j further out.
std::vector<double> left_q8_bound(const mo::KGroup& kg, std::uint32_t e, const float* x, const std::vector<double>& half_sx, std::size_t R) {
  namespace k = s2lc::kernels;
  std::vector<double> extra(R, 0.0);
  auto scan = [&](const mo::KMatrix& m) {
    for (const auto& b : m.blocks) {
      if (b.kind != cz::block_kind::lowrank && b.kind != cz::block_kind::shared) continue;
      const auto left = b.kind == cz::block_kind::lowrank ? b.a.view() : kg.bases[b.basis].view();
      if (!mo::detail::q8_left(left, {0, mo::Activations::int8})) continue;
      const auto rv = b.b.view();
      const auto tp = k::tier_params(rv.bits, 0);
      std::vector<double> T(b.rank, 0.0);
      for (std::size_t kk = 0; kk < b.rank; ++kk)
        for (std::size_t j = 0; j < b.cb; ++j) {
          const double w = b.raw.empty() ? double(k::detail::decode(rv, kk, j, tp)) : double(b.raw[kk * b.cb + j]);
          T[kk] += std::fabs(w) * (std::fabs(x[b.c0 + j]) + half_sx[b.c0 + j]);
        }
      for (std::size_t i = 0; i < b.rb; ++i) {
        const std::size_t g = i / left.group;
        double sig = 0, codes = 0;
        for (std::size_t kk = 0; kk < b.rank; ++kk) {
          sig = std::max(sig, T[kk] * (1 + 1e-5) * std::fabs(double(s2lc::bf16_to_f32(left.scale_bits(kk, g)))) / 127.0);
          codes += std::abs(k::detail::stored_code(left, kk, i));
        }
        extra[b.r0 + i] += sig * (0.5 + 1e-4) * codes;
      }
    }
  };
  scan(kg.residuals[e]);
  for (auto nd : kg.path[e]) scan(kg.cores[nd]);
  return extra;
}

/// int8 activations: Y = Y0 + alpha W X^T within the activation-rounding bound (each column's
/// group scale over 2 times the magnitudes |W| the products pass through) plus the f32 bound.
/// Returns whether any block took the int8 path.
bool check_apply_int8(const cz::CompressedGroup& g, const mo::KGroup& kg, std::uint32_t e, std::size_t n, mo::Executor* ex = nullptr) {
  const std::size_t R = g.grid.rows, C = g.grid.cols, ldx = C + 3, ldy = R + 1;
  const auto X = randn(n * ldx, static_cast<std::uint32_t>(e * 1000 + n * 10 + 7), 1.0f);
  std::vector<float> Y(n * ldy, 0.25f);
  std::vector<std::byte> mem(mo::parallel_scratch_bytes(kg, n, 3));
  mo::Arena arena(mem);
  const mo::Precision prec{0, mo::Activations::int8};
  mo::apply(kg, e, X.data(), ldx, n, Y.data(), ldy, arena, -2.0f, prec);
  CHECK(arena.used() == 0);
  // a block the int8 path takes (its right factor or dense codes through q8_gemv_nt where its vector
  // body takes their groups, a left factor through q8_gemv_nn at 1-2 tokens): then the bits
  // differ from the f32 path
  bool quantized = false;
  auto scan = [&](const mo::KMatrix& m) {
    for (const auto& b : m.blocks) {
      if (b.kind == cz::block_kind::raw || b.kind == cz::block_kind::zero || !b.raw.empty()) continue;
      const bool dense = b.kind == cz::block_kind::dense;
      quantized = quantized || s2lc::kernels::q8_gemv_nt_vectorized(dense ? b.a.view() : b.b.view()) ||
                  (!dense && n <= 2 && mo::detail::q8_left(mo::detail::left_view(kg, b), prec));
    }
  };
  scan(kg.residuals[e]);
  for (auto nd : kg.path[e]) scan(kg.cores[nd]);
  std::vector<float> Yf(n * ldy, 0.25f);
  mo::apply(kg, e, X.data(), ldx, n, Yf.data(), ldy, arena, -2.0f);
  CHECK((Yf != Y) == quantized);
  if (ex) {  // split over workers: the same bits
    std::vector<float> Yp(n * ldy, 0.25f);
    mo::apply_parallel(kg, e, X.data(), ldx, n, Yp.data(), ldy, arena, ex, -2.0f, prec);
    CHECK(Yp == Y);
  }
  const auto W = cz::reconstruct(g, e);
  const auto A = abs_components(g, e, 0);
  const double slack = static_cast<double>(C + max_rank(g) + 32);
  for (std::size_t t = 0; t < n; ++t) {
    const float* x = X.data() + t * ldx;
    const auto half_sx = half_scales(g, x);
    const auto left = n < 3 ? left_q8_bound(kg, e, x, half_sx, R) : std::vector<double>(R, 0.0);
    for (std::size_t i = 0; i < R; ++i) {
      double s = 0, a = 0, q = left[i];
      for (std::size_t j = 0; j < C; ++j) {
        s += double(W(i, j)) * x[j];
        a += A[i * C + j] * std::fabs(x[j]);
        q += A[i * C + j] * (half_sx[j] + 4 * kU * std::fabs(x[j]));
      }
      REQUIRE(std::fabs(Y[t * ldy + i] - (0.25 - 2.0 * s)) <= 2.0 * (q + slack * kU * (a + q)) + kU);
    }
    REQUIRE(Y[t * ldy + R] == 0.25f);
  }
  return quantized;
}

}  // namespace

TEST_CASE("morph: apply equals the dense product of the reconstruction (real experts, odd blocks, every tier, batch 1..64)") {
  const auto& c = fixture_compressed();
  for (const auto& g : c.groups) {
    CAPTURE(g.name);
    const auto kg = mo::KGroup::from(g);
    CHECK(kg.members() == 8);
    for (std::uint32_t e : {0u, 5u})
      for (unsigned tier : {0u, 4u, 2u})
        for (std::size_t n : {1u, 2u, 3u, 8u, 33u}) {
          CAPTURE(e);
          CAPTURE(tier);
          CAPTURE(n);
          check_apply(g, kg, e, tier, n);
        }
  }
  // Batch 64 once, on the group with the most blocks.
  check_apply(c.groups[0], mo::KGroup::from(c.groups[0]), 3, 0, 64);
}

TEST_CASE("morph: with 256 x 256 blocks right factors are rows in lanes, and f32 apply of 3-64 tokens equals the reconstruction") {
  // (the 100 x 90 blocks above take no rows-in-lanes layout: their columns are not whole groups)
  for (const auto& g : fixture_compressed_256().groups) {
    CAPTURE(g.name);
    const auto kg = mo::KGroup::from(g);
    std::size_t lanes_right = 0;
    for (const auto* ms : {&kg.cores, &kg.residuals})
      for (const auto& m : *ms)
        for (const auto& b : m.blocks) {
          const auto& on_x = b.kind == cz::block_kind::dense ? b.a : b.b;  // the codes x meets
          if (!on_x.ncodes()) continue;
          CHECK(on_x.lanes == s2lc::kernels::QView::lanes_fit(on_x.cols, on_x.group));
          if (b.kind != cz::block_kind::dense) lanes_right += on_x.lanes;
          if (b.kind == cz::block_kind::lowrank) CHECK_FALSE(b.a.lanes);  // left factors stay row-major
        }
    CHECK(lanes_right > 0);
    for (unsigned tier : {0u, 2u})
      for (std::size_t n : {3u, 8u, 33u, 64u}) {
        CAPTURE(tier);
        CAPTURE(n);
        check_apply(g, kg, 1, tier, n);
      }
  }
}

TEST_CASE("morph: int8-activation apply stays within the activation-rounding bound of the reconstruction, threads give the same bits") {
  mo::ThreadPool pool(3);
  const auto& c = fixture_compressed();
  for (const auto& g : c.groups) {
    CAPTURE(g.name);
    const auto kg = mo::KGroup::from(g);
    for (std::uint32_t e : {0u, 5u})
      for (std::size_t n : {1u, 2u, 3u, 8u, 33u}) {
        CAPTURE(e);
        CAPTURE(n);
        check_apply_int8(g, kg, e, n, n == 3 ? &pool : nullptr);
      }
  }
  // 256 x 256 blocks: one and two tokens take the int8 left factor path (q8_gemv_nn) on the real
  // experts' residuals
  // (every 2-4-bit left factor here: 256 columns in groups of 32; w2's shared bases are 8-bit)
  std::size_t q8_lefts = 0, q8_applies = 0;
  for (const auto& g : fixture_compressed_256().groups) {
    CAPTURE(g.name);
    const auto kg = mo::KGroup::from(g);
    for (const auto& m : kg.residuals)
      for (const auto& b : m.blocks) {
        if (b.kind != cz::block_kind::lowrank && b.kind != cz::block_kind::shared) continue;
        const auto left = b.kind == cz::block_kind::lowrank ? b.a.view() : kg.bases[b.basis].view();
        const bool q8 = mo::detail::q8_left(left, {0, mo::Activations::int8});
        CHECK(q8 == (left.nibble && left.cols == 256 && left.group == 32));
        q8_lefts += q8;
      }
    for (std::uint32_t e : {0u, 5u})
      for (std::size_t n : {1u, 2u, 3u}) {
        CAPTURE(e);
        CAPTURE(n);
        q8_applies += check_apply_int8(g, kg, e, n, n == 2 ? &pool : nullptr);
      }
  }
  CHECK(q8_lefts > 0);
  CHECK(q8_applies > 0);
  for (std::int64_t target : s2lc::test::compiled_targets()) {
    s2lc::test::TargetScope scope(target);
    CAPTURE(std::string(hwy::TargetName(target)));
    std::size_t applies = 0;
    for (const auto& cs : synthetic_compressed())
      for (const auto& g : cs.groups) {
        const auto kg = mo::KGroup::from(g);
        for (std::uint32_t e = 0; e < kg.members(); ++e)
          for (std::size_t n : {1u, 5u}) applies += check_apply_int8(g, kg, e, n);
      }
    CHECK(applies > 0);
  }
}

TEST_CASE("morph: apply covers every block kind (raw residuals replacing cores, shared bases, 4-bit) on every target") {
  const auto cs = synthetic_compressed();
  std::size_t kinds[5] = {0, 0, 0, 0, 0}, replaced = 0;
  for (const auto& c : cs)
    for (const auto& g : c.groups) {
      for (std::size_t k = 0; k < 5; ++k) kinds[k] += g.stats.blocks_by_kind[k];
      for (std::size_t e = 0; e < g.residuals.size(); ++e)
        for (const auto& b : g.residuals[e].blocks) replaced += b.kind == cz::block_kind::raw && g.leaf[e] >= 0;
    }
  CHECK(kinds[1] > 0);
  CHECK(kinds[2] + kinds[3] > 0);
  CHECK(kinds[3] > 0);
  CHECK(kinds[4] > 0);
  CHECK(replaced > 0);
  for (std::int64_t target : s2lc::test::compiled_targets()) {
    s2lc::test::TargetScope scope(target);
    CAPTURE(std::string(hwy::TargetName(target)));
    for (const auto& c : cs)
      for (const auto& g : c.groups) {
        const auto kg = mo::KGroup::from(g);
        for (std::uint32_t e = 0; e < kg.members(); ++e)
          for (std::size_t n : {1u, 5u}) {
            CAPTURE(e);
            CAPTURE(n);
            check_apply(g, kg, e, 0, n);
            check_apply(g, kg, e, 3, n);
          }
      }
  }
}

namespace {

/// Every array of m, in the order pool() lays them out (per block: right codes, scales, left codes,
/// scales), as (pointer, bytes) with the empty ones left out.
std::vector<std::pair<const std::uint8_t*, std::size_t>> read_order(const mo::KMatrix& m) {
  std::vector<std::pair<const std::uint8_t*, std::size_t>> v;
  for (const auto& b : m.blocks)
    for (const mo::KMat* k : {&b.b, &b.a}) {
      // the kernels read a factor's scales before its codes
      if (k->nscales()) v.emplace_back(reinterpret_cast<const std::uint8_t*>(k->scales_data()), 2 * k->nscales());
      if (k->ncodes()) v.emplace_back(k->codes_data(), k->ncodes());
    }
  return v;
}

/// Member e's apply of one fixed batch of 3 tokens, f32 and int8 activations, appended.
std::vector<float> apply_both(const mo::KGroup& kg, std::uint32_t e) {
  const std::size_t R = kg.rows(), C = kg.cols(), n = 3;
  const auto X = randn(n * C, 77 + e, 1.0f);
  std::vector<float> Y(2 * n * R, 0.0f);
  std::vector<std::byte> mem(mo::apply_scratch_bytes(kg, n));
  mo::Arena arena(mem);
  mo::apply(kg, e, X.data(), C, n, Y.data(), R, arena);
  mo::apply(kg, e, X.data(), C, n, Y.data() + n * R, R, arena, 1.0f, {0, mo::Activations::int8});
  return Y;
}

}  // namespace

TEST_CASE("morph: PageSeeder seeds pooled matrices in order up to kSeedBytes in all, then nothing") {
  const auto kg = mo::KGroup::from(fixture_compressed().groups[0]);
  const mo::KMatrix& m = kg.cores.empty() ? kg.residuals[0] : kg.cores[0];
  REQUIRE(m.pooled());
  REQUIRE(m.pool_bytes() > 0);
  REQUIRE(m.pool_bytes() < mo::detail::kSeedBytes);
  mo::detail::PageSeeder seed;
  std::size_t total = 0, calls = 0;
  while (seed.left() >= m.pool_bytes()) {  // whole matrices while they fit
    CHECK(seed(m) == m.pool_bytes());
    total += m.pool_bytes(), ++calls;
  }
  CHECK(calls == mo::detail::kSeedBytes / m.pool_bytes());
  const std::size_t rest = mo::detail::kSeedBytes - total;
  CHECK(seed(m) == rest);  // the last one cut at the budget
  CHECK(seed.left() == 0);
  CHECK(seed(m) == 0);
  CHECK(mo::detail::PageSeeder{}(mo::KMatrix{}) == 0);  // not pooled: nothing
  mo::detail::PageSeeder buf;  // a buffer's range takes the same budget
  std::vector<std::uint8_t> b(8192);
  CHECK(buf.range(b.data(), b.size()) == b.size());
  CHECK(buf.left() == mo::detail::kSeedBytes - b.size());
  CHECK(buf(m) == m.pool_bytes());
  CHECK(buf.left() == mo::detail::kSeedBytes - b.size() - m.pool_bytes());
}

TEST_CASE("morph: a KGroup keeps each matrix's arrays in one pool in read order, copies get a pool of their own, copied blocks own their data") {
  const auto& c = fixture_compressed();
  const auto cs = synthetic_compressed();
  for (const cz::CompressedGroup* g : {&c.groups[0], &cs[0].groups[0], &cs[1].groups[0]}) {
    CAPTURE(g->name);
    auto kg = std::make_unique<mo::KGroup>(mo::KGroup::from(*g));
    std::vector<const mo::KMatrix*> ms;
    for (const auto& m : kg->cores) ms.push_back(&m);
    for (const auto& m : kg->residuals) ms.push_back(&m);
    std::size_t arrays = 0;
    for (const mo::KMatrix* m : ms) {
      const auto order = read_order(*m);
      arrays += order.size();
      REQUIRE(m->pooled() == !order.empty());
      if (order.empty()) continue;
      CHECK(m->pool_bytes() >= m->bytes());
      CHECK(m->pool_bytes() <= m->bytes() + 63 * order.size() + 64);
      const std::uint8_t* end = order[0].first;
      for (const auto& [ptr, n] : order) {
        CHECK(reinterpret_cast<std::uintptr_t>(ptr) % 64 == 0);
        CHECK(ptr >= end);         // after the previous array
        CHECK(ptr < end + 64);     // with at most the alignment padding between
        end = ptr + n;
      }
      CHECK(end <= order[0].first + m->pool_bytes());
      for (const auto& b : m->blocks) CHECK((b.a.codes.empty() && b.a.scales.empty() && b.b.codes.empty() && b.b.scales.empty()));
    }
    CHECK(arrays > 0);
    const auto ref = apply_both(*kg, 1);

    // A copy: pooled again in its own memory, the same bytes, the same results bit for bit.
    mo::KGroup copy = *kg;
    mo::KGroup assigned;
    assigned = copy;
    for (const mo::KGroup* k : {&copy, &assigned}) {
      for (std::size_t e = 0; e < kg->members(); ++e) {
        const auto a = read_order(kg->residuals[e]), b = read_order(k->residuals[e]);
        REQUIRE(a.size() == b.size());
        CHECK(k->residuals[e].pooled() == kg->residuals[e].pooled());
        for (std::size_t i = 0; i < a.size(); ++i) {
          CHECK(a[i].first != b[i].first);
          REQUIRE(a[i].second == b[i].second);
          CHECK(std::memcmp(a[i].first, b[i].first, a[i].second) == 0);
        }
      }
      CHECK(apply_both(*k, 1) == ref);
    }

    // A block copied out of a pooled matrix owns its data: it outlives the group.
    const mo::KBlock* src = nullptr;
    for (const auto& b : kg->residuals[1].blocks)
      if (b.kind == cz::block_kind::lowrank || b.kind == cz::block_kind::dense) src = &b;
    REQUIRE(src != nullptr);
    mo::KBlock own = *src;
    CHECK(!own.a.pooled());
    CHECK(own.a.codes.size() == src->a.ncodes());
    CHECK(own.a.view().codes != src->a.view().codes);
    const auto X = randn(kg->cols(), 5, 1.0f);
    std::vector<float> y0(kg->rows(), 0.0f), y1(kg->rows(), 0.0f);
    std::vector<std::byte> mem(mo::apply_scratch_bytes(*kg, 1));
    mo::Arena arena(mem);
    mo::apply_block(*kg, *src, X.data(), kg->cols(), 1, y0.data(), kg->rows(), 1.0f, {}, arena);
    const mo::KGroup keep = copy;  // apply_block reads only the block's own data and the bases
    kg.reset();
    mo::apply_block(keep, own, X.data(), keep.cols(), 1, y1.data(), keep.rows(), 1.0f, {}, arena);
    CHECK(y0 == y1);
  }
}

TEST_CASE("morph: grouped apply equals per-expert apply, shares cores, and does not depend on threads") {
  auto cs = synthetic_compressed();
  std::vector<const cz::CompressedGroup*> groups = {&fixture_compressed().groups[0], &fixture_compressed_256().groups[0]};
  for (const auto& c : cs) groups.push_back(&c.groups[0]);
  mo::ThreadPool pool(3);
  for (const auto* gp : groups) {
    const auto& g = *gp;
    CAPTURE(g.name);
    const auto kg = mo::KGroup::from(g);
    const std::size_t R = kg.rows(), C = kg.cols(), E = kg.members();
    for (std::size_t T : {1u, 7u, 40u}) {
      CAPTURE(T);
      const auto plan = top2_plan(E, T, static_cast<std::uint32_t>(T));
      const auto X = randn(T * C, 77);
      std::vector<float> Y(T * R, 0.0f), Yref(T * R, 0.0f), Yp(T * R, 0.0f);
      std::vector<std::byte> mem(mo::grouped_scratch_bytes(kg, T, plan.routed(), pool.workers()));
      mo::Arena arena(mem);
      mo::grouped_apply(kg, plan, X.data(), C, Y.data(), R, arena);
      CHECK(arena.used() == 0);
      mo::grouped_apply(kg, plan, X.data(), C, Yp.data(), R, arena, &pool);
      CHECK(Yp == Y);  // bit-identical with 3 workers

      // Reference: every (expert, token) through apply, weighted by its gate.
      std::vector<double> mag(T * R, 0.0);
      for (std::size_t e = 0; e < E; ++e) {
        const auto A = abs_components(g, static_cast<std::uint32_t>(e), 0);
        for (std::size_t i = plan.offsets[e]; i < plan.offsets[e + 1]; ++i) {
          const std::size_t t = plan.token[i];
          std::vector<float> y(R, 0.0f);
          std::vector<std::byte> m2(mo::apply_scratch_bytes(kg, 1));
          mo::Arena a2(m2);
          mo::apply(kg, e, X.data() + t * C, C, 1, y.data(), R, a2);
          for (std::size_t r = 0; r < R; ++r) {
            Yref[t * R + r] += plan.gate[i] * y[r];
            double s = 0;
            for (std::size_t j = 0; j < C; ++j) s += A[r * C + j] * std::fabs(X[t * C + j]);
            mag[t * R + r] += std::fabs(plan.gate[i]) * s;
          }
        }
      }
      const double slack = static_cast<double>(C + max_rank(g) + 64);
      for (std::size_t i = 0; i < T * R; ++i) REQUIRE(std::fabs(Y[i] - Yref[i]) <= 4.0 * slack * kU * mag[i] + 1e-30);

      // int8 activations: each token's activations are quantized the same way in both, so the
      // difference is summation order plus the int8 rounding of left-factor coefficients that
      // one side takes and the other may not (one-token calls always; grouped cores only for
      // batches of 1-2; an expert's residual when it has 1-2 tokens).
      const mo::Precision p8{0, mo::Activations::int8};
      std::vector<float> Y8(T * R, 0.0f), Y8p(T * R, 0.0f), Yref8(T * R, 0.0f);
      mo::grouped_apply(kg, plan, X.data(), C, Y8.data(), R, arena, nullptr, p8);
      mo::grouped_apply(kg, plan, X.data(), C, Y8p.data(), R, arena, &pool, p8);
      CHECK(Y8p == Y8);
      std::vector<double> lq(T * R, 0.0), mag8(T * R, 0.0);
      for (std::size_t e = 0; e < E; ++e) {
        const auto A = abs_components(g, static_cast<std::uint32_t>(e), 0);
        for (std::size_t i = plan.offsets[e]; i < plan.offsets[e + 1]; ++i) {
          const std::size_t t = plan.token[i];
          const float* x = X.data() + t * C;
          std::vector<float> y(R, 0.0f);
          std::vector<std::byte> m2(mo::apply_scratch_bytes(kg, 1) + mo::parallel_scratch_bytes(kg, 1, 1));
          mo::Arena a2(m2);
          mo::apply(kg, e, x, C, 1, y.data(), R, a2, 1.0f, p8);
          const auto hs = half_scales(g, x);
          const auto left = left_q8_bound(kg, static_cast<std::uint32_t>(e), x, hs, R);
          for (std::size_t r = 0; r < R; ++r) {
            Yref8[t * R + r] += plan.gate[i] * y[r];
            double s = 0;
            for (std::size_t j = 0; j < C; ++j) s += A[r * C + j] * (std::fabs(x[j]) + hs[j]);
            mag8[t * R + r] += std::fabs(plan.gate[i]) * (s + left[r]);
            lq[t * R + r] += std::fabs(plan.gate[i]) * left[r];
          }
        }
      }
      for (std::size_t i = 0; i < T * R; ++i) REQUIRE(std::fabs(Y8[i] - Yref8[i]) <= lq[i] + 4.0 * slack * kU * mag8[i] + 1e-30);
    }
  }
}

TEST_CASE("morph: grouped calls sum shared-basis residual blocks across experts, and apply a block on another basis on its own") {
  // The real w2's residual blocks project onto one basis per grid block; grouped_apply applies each
  // basis once to the gate-weighted sum of the experts' coefficients. Expert 3 is pointed at
  // another basis at one grid block, which the sum must not take for the first expert's.
  const auto& c = fixture_compressed();
  auto kg = mo::KGroup::from(c.groups[1]);
  REQUIRE(kg.bases.size() >= 2);
  std::size_t shared = 0;
  for (const auto& m : kg.residuals)
    for (const auto& b : m.blocks) shared += mo::detail::summed_block(b);
  REQUIRE(shared > 0);
  const std::size_t R = kg.rows(), C = kg.cols(), E = kg.members();
  for (bool moved : {false, true}) {
    CAPTURE(moved);
    if (moved) {
      mo::KBlock* b = nullptr;
      for (auto& blk : kg.residuals[3].blocks)
        if (mo::detail::summed_block(blk) && !b) b = &blk;
      REQUIRE(b != nullptr);
      for (std::uint32_t k = 0; k < kg.bases.size(); ++k)
        if (k != b->basis && kg.bases[k].view().rows >= b->rank && kg.bases[k].view().cols == b->rb) {
          b->basis = k;
          break;
        }
    }
    for (std::size_t T : {1u, 2u, 9u, 40u}) {
      CAPTURE(T);
      const auto plan = top2_plan(E, T, 500 + static_cast<std::uint32_t>(T));
      const auto X = randn(T * C, 13);
      std::vector<float> Y(T * R, 0.0f), Yp(T * R, 0.0f);
      std::vector<double> ref(T * R, 0.0);
      mo::ThreadPool pool(2);
      std::vector<std::byte> mem(mo::grouped_scratch_bytes(kg, T, plan.routed(), pool.workers()));
      mo::Arena arena(mem);
      mo::grouped_apply(kg, plan, X.data(), C, Y.data(), R, arena);
      mo::grouped_apply(kg, plan, X.data(), C, Yp.data(), R, arena, &pool);
      CHECK(Yp == Y);
      for (std::size_t e = 0; e < E; ++e)
        for (std::size_t i = plan.offsets[e]; i < plan.offsets[e + 1]; ++i) {
          std::vector<float> y(R, 0.0f);
          std::vector<std::byte> m2(mo::apply_scratch_bytes(kg, 1));
          mo::Arena a2(m2);
          mo::apply(kg, e, X.data() + plan.token[i] * C, C, 1, y.data(), R, a2);
          for (std::size_t r = 0; r < R; ++r) ref[plan.token[i] * R + r] += double(plan.gate[i]) * y[r];
        }
      double num = 0, den = 0;
      for (std::size_t i = 0; i < T * R; ++i) num += (Y[i] - ref[i]) * (Y[i] - ref[i]), den += ref[i] * ref[i];
      // f32 summation order only: each output sums C + rank products (about 1e-7 relative each)
      CAPTURE(std::sqrt(num / den));
      CHECK(std::sqrt(num / den) < 1e-5);
    }
  }
}

TEST_CASE("morph: an int8 activation cache gives apply_matrix the bits of per-block quantization, across w1 and w3") {
  const auto& c = fixture_compressed();
  const auto w1 = mo::KGroup::from(c.groups[0]), w3 = mo::KGroup::from(c.groups[2]);
  const std::size_t d = w1.cols(), f = w1.rows();
  for (std::size_t n : {1u, 3u, 9u, 32u}) {
    CAPTURE(n);
    const auto X = randn(n * d, 11 + static_cast<std::uint32_t>(n), 0.5f);
    std::vector<std::byte> mem(4 * mo::apply_scratch_bytes(w1, n));
    mo::Arena arena(mem);
    const mo::Precision prec{0, mo::Activations::int8};
    const mo::detail::Q8Cache cache(w1, X.data(), d, n, arena);  // built from w1, used for w3 too
    for (const mo::KGroup* g : {&w1, &w3})
      for (std::size_t e : {0u, 5u}) {
        for (const mo::KMatrix* m : {&g->residuals[e], &g->cores[g->path[e].front()]}) {
          std::vector<float> a(n * f, 0.0f), b(n * f, 0.0f);
          mo::apply_matrix(*g, *m, X.data(), d, n, a.data(), f, 1.0f, prec, arena);
          mo::apply_matrix(*g, *m, X.data(), d, n, b.data(), f, 1.0f, prec, arena, nullptr, &cache);
          CHECK(a == b);
        }
      }
  }
}

TEST_CASE("morph: an int8 activation cache for some matrices quantizes the containers their blocks meet x in, and only those") {
  // w1: 3-bit residual factors and 5-bit cores; w2: residuals on shared bases, which grouped
  // calls apply in coefficient space (unshared_only leaves them out)
  const auto& c = fixture_compressed();
  std::size_t skipped = 0, shared_left_out = 0;
  for (std::size_t gi : {0u, 1u})
    for (bool unshared_only : {false, true}) {
      CAPTURE(gi);
      CAPTURE(unshared_only);
      const auto g = mo::KGroup::from(c.groups[gi]);
      const std::size_t d = g.cols(), f = g.rows(), n = 5;
      const auto X = randn(n * d, 17, 0.5f);
      std::vector<std::byte> mem(8 * mo::apply_scratch_bytes(g, n));
      mo::Arena arena(mem);
      const mo::Precision prec{0, mo::Activations::int8};
      for (std::size_t e : {0u, 3u})
        for (const mo::KMatrix* m : {&g.residuals[e], &g.cores[g.path[e].front()]}) {
          const mo::detail::Q8Cache cache(g, {m}, X.data(), d, n, arena, unshared_only);
          std::vector<std::uint8_t> meets(g.grid.grid_cols(), 0);
          for (const auto& b : m->blocks) {
            const mo::KMat& onx = b.kind == cz::block_kind::dense ? b.a : b.b;
            if (!onx.ncodes()) continue;
            if (unshared_only && b.kind == cz::block_kind::shared) {
              ++shared_left_out;
              continue;
            }
            meets[b.c0 / g.grid.block_cols] |= onx.nibble ? 2 : 1;
            if (s2lc::kernels::q8_gemv_nt_vectorized(onx.view())) CHECK(cache.get(onx.view(), b.c0) != nullptr);
          }
          for (std::size_t j = 0; j < meets.size(); ++j)
            for (int nib = 0; nib < 2; ++nib) {
              const bool has = cache.slot[j * 2 + static_cast<std::size_t>(nib)] != nullptr;
              CHECK(has == ((meets[j] >> nib & 1) != 0));
              skipped += !has;
            }
          std::vector<float> a(n * f, 0.0f), b(n * f, 0.0f);
          mo::apply_matrix(g, *m, X.data(), d, n, a.data(), f, 1.0f, prec, arena);
          mo::apply_matrix(g, *m, X.data(), d, n, b.data(), f, 1.0f, prec, arena, nullptr, &cache);
          CHECK(a == b);
        }
    }
  CHECK(skipped > 0);          // the fixture's cores and residuals meet x in different containers somewhere
  CHECK(shared_left_out > 0);  // and w2's residuals have shared-basis blocks
}

TEST_CASE("morph: a group wider than a block runs as one group of the block's width, and the int8 activation cache serves it") {
  // Groups of 64 over 16 x 32 blocks (edge blocks of 8 rows and 6 columns): every factor's one
  // group is partial in storage; the kernels take it as a whole group of the factor's width
  // (QView::kernel_group), and the cache's activations must be laid out alike.
  const auto in = s2lc::test::synthetic_groups();
  for (unsigned bits : {4u, 8u}) {
    CAPTURE(bits);
    cz::Options o;
    o.ratio = 3;
    o.bits = bits;
    o = s2lc::test::small_blocks(o);
    o.group = 64;
    const auto c = cz::compress(in, o);
    const auto& g = c.groups[0];
    const auto kg = mo::KGroup::from(g);
    const std::size_t C = g.grid.cols, n = 5;
    const auto X = randn(n * C, 5, 0.5f);
    std::vector<std::byte> mem(4 * mo::apply_scratch_bytes(kg, n));
    mo::Arena arena(mem);
    const mo::detail::Q8Cache cache(kg, X.data(), C, n, arena);
    std::size_t served = 0, narrowed = 0;
    auto scan = [&](const mo::KMatrix& m) {
      for (const auto& b : m.blocks)
        for (const mo::KMat* k : {&b.a, &b.b}) {
          if (k->rows == 0) continue;
          REQUIRE(k->group == s2lc::kernels::QView::kernel_group(k->cols, 64, k->nibble));
          narrowed += k->group < 64;
          if (k->cols != b.cb || (k == &b.a && b.kind != cz::block_kind::dense)) continue;  // left factors read no x
          CHECK(cache.get(k->view(), b.c0) != nullptr);
          ++served;
        }
    };
    for (std::uint32_t e = 0; e < kg.members(); ++e) scan(kg.residuals[e]);
    for (const auto& m : kg.cores) scan(m);
    CHECK(served > 0);
    CHECK(narrowed > 0);
    for (std::uint32_t e = 0; e < kg.members(); ++e)
      for (std::size_t t : {1u, 5u}) {
        CAPTURE(e);
        CAPTURE(t);
        check_apply(g, kg, e, 0, t);
        check_apply_int8(g, kg, e, t);
      }
  }
}

TEST_CASE("morph: the SwiGLU layer with int8 activations: threads give the same bits, and it stays near the f32 layer") {
  const auto& c = fixture_compressed();
  const auto w1 = mo::KGroup::from(c.groups[0]), w2 = mo::KGroup::from(c.groups[1]), w3 = mo::KGroup::from(c.groups[2]);
  const mo::SwiGLUExperts L{&w1, &w3, &w2};
  const std::size_t d = L.d();
  mo::ThreadPool pool(2);
  for (std::size_t T : {1u, 2u, 9u, 32u}) {
    CAPTURE(T);
    const auto plan = top2_plan(8, T, 2000 + static_cast<std::uint32_t>(T));
    const auto X = randn(T * d, 7, 0.5f);
    std::vector<float> Y(T * d, 0.0f), Yp(T * d, 0.0f), Yf(T * d, 0.0f);
    std::vector<std::byte> mem(mo::swiglu_scratch_bytes(L, T, plan.routed(), pool.workers()));
    mo::Arena arena(mem);
    const mo::Precision q8{0, mo::Activations::int8};
    mo::swiglu_apply(L, plan, X.data(), d, Y.data(), d, arena, nullptr, q8);
    mo::swiglu_apply(L, plan, X.data(), d, Yp.data(), d, arena, &pool, q8);
    mo::swiglu_apply(L, plan, X.data(), d, Yf.data(), d, arena);
    CHECK(Yp == Y);
    // Activations rounded to int8 per 32 columns (half a step of 1/127 of the group's largest),
    // in w1, w3 and again in w2 on the hidden state: 0.56-0.63 % of the output's norm here. A
    // block given another token's or column's activations would be off by its own size.
    double num = 0, den = 0;
    for (std::size_t i = 0; i < Y.size(); ++i) num += (double(Y[i]) - Yf[i]) * (double(Y[i]) - Yf[i]), den += double(Yf[i]) * Yf[i];
    CAPTURE(std::sqrt(num / den));
    CHECK(std::sqrt(num / den) < 0.02);
  }
}

TEST_CASE("morph: the SwiGLU layer from a dispatch plan equals the per-expert FFN (real experts)") {
  const auto& c = fixture_compressed();
  const auto w1 = mo::KGroup::from(c.groups[0]), w2 = mo::KGroup::from(c.groups[1]), w3 = mo::KGroup::from(c.groups[2]);
  const mo::SwiGLUExperts L{&w1, &w3, &w2};
  const std::size_t d = L.d(), f = L.ffn();
  CHECK(d == 256);
  CHECK(f == 768);
  mo::ThreadPool pool(2);
  for (std::size_t T : {1u, 9u, 32u}) {
    CAPTURE(T);
    const auto plan = top2_plan(8, T, 1000 + static_cast<std::uint32_t>(T));
    const auto X = randn(T * d, 5, 0.5f);
    std::vector<float> Y(T * d, 0.0f), Yp(T * d, 0.0f);
    std::vector<std::byte> mem(mo::swiglu_scratch_bytes(L, T, plan.routed(), pool.workers()));
    mo::Arena arena(mem);
    mo::swiglu_apply(L, plan, X.data(), d, Y.data(), d, arena);
    mo::swiglu_apply(L, plan, X.data(), d, Yp.data(), d, arena, &pool);
    CHECK(Yp == Y);

    // Reference in double from the dense reconstructions, with the magnitudes for the bound:
    // the h error (d terms) is carried through |W2| like the sum's own rounding (f terms).
    std::vector<double> ref(T * d, 0.0), mag(T * d, 0.0);
    for (std::uint32_t e = 0; e < 8; ++e) {
      const auto W1 = cz::reconstruct(c.groups[0], e), W2 = cz::reconstruct(c.groups[1], e), W3 = cz::reconstruct(c.groups[2], e);
      const auto A1 = abs_components(c.groups[0], e, 0), A2 = abs_components(c.groups[1], e, 0), A3 = abs_components(c.groups[2], e, 0);
      for (std::size_t i = plan.offsets[e]; i < plan.offsets[e + 1]; ++i) {
        const std::size_t t = plan.token[i];
        const float* x = X.data() + t * d;
        std::vector<double> h(f), hmag(f);
        for (std::size_t r = 0; r < f; ++r) {
          double g1 = 0, g3 = 0, a1 = 0, a3 = 0;
          for (std::size_t j = 0; j < d; ++j)
            g1 += double(W1(r, j)) * x[j], g3 += double(W3(r, j)) * x[j], a1 += A1[r * d + j] * std::fabs(x[j]), a3 += A3[r * d + j] * std::fabs(x[j]);
          const double s = 1.0 / (1.0 + std::exp(-g1));
          h[r] = g1 * s * g3;
          // |d silu| <= 1.1; error of h from the two dot products, plus h's own rounding.
          hmag[r] = 1.1 * a1 * std::fabs(g3) + std::fabs(g1 * s) * a3 + 8 * std::fabs(h[r]);
        }
        for (std::size_t r = 0; r < d; ++r) {
          double y = 0, a = 0, b = 0;
          for (std::size_t j = 0; j < f; ++j) y += double(W2(r, j)) * h[j], a += A2[r * f + j] * std::fabs(h[j]), b += A2[r * f + j] * hmag[j];
          ref[t * d + r] += plan.gate[i] * y;
          mag[t * d + r] += std::fabs(plan.gate[i]) * (double(f + 64) * a + double(d + 64) * b);
        }
      }
    }
    for (std::size_t i = 0; i < T * d; ++i) REQUIRE(std::fabs(Y[i] - ref[i]) <= 2.0 * kU * mag[i] + 1e-30);
  }
}

TEST_CASE("morph: pool_layer puts a layer in one allocation in read order and changes no bit of its output") {
  const auto& c = fixture_compressed();
  const auto w1 = mo::KGroup::from(c.groups[0]), w2 = mo::KGroup::from(c.groups[1]), w3 = mo::KGroup::from(c.groups[2]);
  const mo::SwiGLUExperts L{&w1, &w3, &w2};
  const std::size_t d = L.d();
  mo::KGroup p1 = w1, p2 = w2, p3 = w3;
  CHECK(p2.bases_pool_bytes() == 0);  // a copy owns its bases' arrays
  REQUIRE(!w2.bases.empty());         // the fixture's w2 residuals use shared bases
  CHECK(w2.bases_pool_bytes() >= w2.bases[0].bytes());  // KGroup::from pools them
  mo::pool_layer(p1, p3, p2);
  // The read order: w1, w3 cores; their bases; per expert its w1, w3, w2 residuals; w2's bases;
  // w2 cores. Each pool starts where the one before it ends, and holds exactly what the matrix
  // (or the group's bases) held on its own.
  struct Run {
    const std::uint8_t* data;
    std::size_t bytes;
    std::vector<std::pair<const mo::KMat*, const mo::KMat*>> mats;  // (pooled, original)
  };
  std::vector<Run> order;
  auto matrix = [&](const mo::KMatrix& p, const mo::KMatrix& o) {
    CHECK(p.bytes() == o.bytes());
    CHECK(p.pool_bytes() == o.pool_bytes());
    Run r{p.pool_data(), p.pool_bytes(), {}};
    for (std::size_t b = 0; b < p.blocks.size(); ++b)
      for (auto m : {&mo::KBlock::a, &mo::KBlock::b}) r.mats.push_back({&(p.blocks[b].*m), &(o.blocks[b].*m)});
    order.push_back(std::move(r));
  };
  auto bases = [&](const mo::KGroup& p, const mo::KGroup& o) {
    CHECK(p.bases_pool_bytes() == o.bases_pool_bytes());
    Run r{p.bases_pool_data(), p.bases_pool_bytes(), {}};
    REQUIRE(p.bases.size() == o.bases.size());
    for (std::size_t k = 0; k < p.bases.size(); ++k) r.mats.push_back({&p.bases[k], &o.bases[k]});
    order.push_back(std::move(r));
  };
  for (auto [p, o] : {std::pair{&p1, &w1}, std::pair{&p3, &w3}})
    for (std::size_t k = 0; k < p->cores.size(); ++k) matrix(p->cores[k], o->cores[k]);
  bases(p1, w1), bases(p3, w3);
  for (std::size_t e = 0; e < w1.members(); ++e)
    for (auto [p, o] : {std::pair{&p1, &w1}, std::pair{&p3, &w3}, std::pair{&p2, &w2}}) matrix(p->residuals[e], o->residuals[e]);
  bases(p2, w2);
  for (std::size_t k = 0; k < p2.cores.size(); ++k) matrix(p2.cores[k], w2.cores[k]);
  const std::uint8_t* next = nullptr;
  std::size_t pooled = 0;
  for (const auto& r : order) {
    if (!r.data) {
      CHECK(r.bytes == 0);
      continue;
    }
    ++pooled;
    if (next) CHECK(r.data == next);
    next = r.data + r.bytes;
    for (auto [x, y] : r.mats) {
      REQUIRE(x->ncodes() == y->ncodes());
      REQUIRE(x->nscales() == y->nscales());
      if (x->ncodes()) {
        CHECK(x->codes_data() >= r.data);
        CHECK(x->codes_data() + x->ncodes() <= r.data + r.bytes);
        CHECK(std::memcmp(x->codes_data(), y->codes_data(), x->ncodes()) == 0);
      }
      if (x->nscales()) CHECK(std::memcmp(x->scales_data(), y->scales_data(), 2 * x->nscales()) == 0);
    }
  }
  CHECK(pooled > 2 * w1.members());  // the fixture's residuals are not empty
  // A copy of a pooled group owns its own pools; a group moved out of the layer keeps the shared
  // allocation alive after the others are gone (ASan run: no use after free).
  mo::KGroup copy1 = p1, copy2 = p2;
  CHECK(copy1.residuals[0].pool_data() != p1.residuals[0].pool_data());
  CHECK(copy2.bases_pool_bytes() == 0);
  CHECK(!copy2.bases[0].pooled());
  std::optional<mo::KGroup> m1 = std::move(p1), m2;
  {
    mo::KGroup q1 = w1, q2 = w2, q3 = w3;
    mo::pool_layer(q1, q3, q2);
    m1 = std::move(q1);
    m2 = std::move(q2);  // its bases read the allocation q3 shared too
  }
  const mo::SwiGLUExperts P{&*m1, &p3, &*m2};
  for (std::size_t T : {1u, 2u, 9u, 32u})
    for (auto act : {mo::Activations::f32, mo::Activations::int8}) {
      CAPTURE(T);
      CAPTURE(static_cast<int>(act));
      const auto plan = top2_plan(8, T, 3000 + static_cast<std::uint32_t>(T));
      const auto X = randn(T * d, 9, 0.5f);
      std::vector<float> Y(T * d, 0.0f), Yp(T * d, 0.0f), Yc(T * d, 0.0f);
      std::vector<std::byte> mem(mo::swiglu_scratch_bytes(L, T, plan.routed(), 1));
      mo::Arena arena(mem);
      mo::swiglu_apply(L, plan, X.data(), d, Y.data(), d, arena, nullptr, {0, act});
      mo::swiglu_apply(P, plan, X.data(), d, Yp.data(), d, arena, nullptr, {0, act});
      const mo::SwiGLUExperts C{&copy1, &p3, &copy2};
      mo::swiglu_apply(C, plan, X.data(), d, Yc.data(), d, arena, nullptr, {0, act});
      CHECK(Yp == Y);
      CHECK(Yc == Y);
    }
  mo::KGroup a = w1, b = w2;
  CHECK_THROWS_WITH_AS(mo::pool_layer(a, a, b), doctest::Contains("morph::pool_layer (one group passed twice?): a matrix appears twice"),
                       s2lc::invalid_argument);
  CHECK_THROWS_WITH_AS(mo::pool_layer(a, b, b), doctest::Contains("shapes disagree"), s2lc::invalid_argument);
  mo::KMatrix* twice[] = {&a.residuals[0], &a.residuals[1], &a.residuals[0]};
  CHECK_THROWS_WITH_AS(mo::KMatrix::pool_together(twice), doctest::Contains("KMatrix::pool_together: a matrix appears twice"),
                       s2lc::invalid_argument);
  CHECK(a.residuals[0].pool_data() != nullptr);  // a failed call leaves the groups as they were
}

TEST_CASE("morph: a too-small arena, a wrong plan and a bad tier are rejected with a clear error") {
  const auto cs = synthetic_compressed();
  const auto kg = mo::KGroup::from(cs[0].groups[0]);
  const auto plan = top2_plan(kg.members(), 4, 1);
  const auto X = randn(4 * kg.cols(), 1);
  std::vector<float> Y(4 * kg.rows(), 0.0f);
  std::vector<std::byte> small(256);
  mo::Arena a(small);
  CHECK_THROWS_WITH_AS(mo::grouped_apply(kg, plan, X.data(), kg.cols(), Y.data(), kg.rows(), a), doctest::Contains("scratch arena too small"),
                       s2lc::invalid_argument);
  std::vector<std::byte> mem(mo::grouped_scratch_bytes(kg, 4, plan.routed(), 1));
  mo::Arena b(mem);
  auto wrong = top2_plan(kg.members() + 1, 4, 1);
  CHECK_THROWS_WITH_AS(mo::grouped_apply(kg, wrong, X.data(), kg.cols(), Y.data(), kg.rows(), b), doctest::Contains("the plan has 7 experts, the layer 6"),
                       s2lc::invalid_argument);
  CHECK_THROWS_WITH_AS(mo::apply(kg, 0, X.data(), kg.cols(), 1, Y.data(), kg.rows(), b, 1.0f, 9), doctest::Contains("tier"), s2lc::invalid_argument);
  CHECK_THROWS_WITH_AS(mo::apply(kg, 6, X.data(), kg.cols(), 1, Y.data(), kg.rows(), b), doctest::Contains("member 6 out of range"), s2lc::invalid_argument);

  // Malformed plans.
  auto p = plan;
  p.token[0] = 4;
  CHECK_THROWS_WITH_AS(p.validate(), doctest::Contains("has token 4 of a batch of 4"), s2lc::invalid_argument);
  p = plan;
  p.offsets[1] = p.offsets[2] + 1;
  CHECK_THROWS_WITH_AS(p.validate(), doctest::Contains("offsets decrease"), s2lc::invalid_argument);
  p = plan;
  p.gate.pop_back();
  CHECK_THROWS_WITH_AS(p.validate(), doctest::Contains("sizes disagree"), s2lc::invalid_argument);
  const std::int32_t dup_ids[] = {1, 1};
  const float dup_gates[] = {0.5f, 0.5f};
  CHECK_THROWS_WITH_AS(s2lc::DispatchPlan::from_topk(3, 1, 2, dup_ids, dup_gates), doctest::Contains("lists token 0 twice"), s2lc::invalid_argument);
  const std::int32_t bad_ids[] = {0, 3};
  CHECK_THROWS_WITH_AS(s2lc::DispatchPlan::from_topk(3, 1, 2, bad_ids, dup_gates), doctest::Contains("expert 3 out of range"), s2lc::invalid_argument);
}

// ---------------------------------------------------------------------------------------------
// Morphing, the basis bank and JIT merge.

namespace {

/// Y += W X^T (n tokens) by `run`, checked against the double product of W within the bound of A.
template <class Run>
void check_product(const s2lc::matrix& W, const std::vector<double>& A, double slack, std::size_t n, Run run) {
  const std::size_t R = W.shape(0), C = W.shape(1);
  const auto X = randn(n * C, static_cast<std::uint32_t>(n + 17));
  std::vector<float> Y(n * R, 0.0f);
  run(X.data(), C, n, Y.data(), R);
  for (std::size_t t = 0; t < n; ++t)
    for (std::size_t i = 0; i < R; ++i) {
      double s = 0, a = 0;
      for (std::size_t j = 0; j < C; ++j) s += double(W(i, j)) * X[t * C + j], a += A[i * C + j] * std::fabs(X[t * C + j]);
      REQUIRE(std::fabs(Y[t * R + i] - s) <= 2.0 * slack * kU * a + 1e-30);
    }
}

}  // namespace

TEST_CASE("morph: mixing weights (softmax, sparsemax) lie on the simplex") {
  const float logits[] = {1.0f, 0.5f, -1.0f};
  const auto sm = mo::softmax_weights(logits);
  CHECK(sm[0] + sm[1] + sm[2] == doctest::Approx(1.0));
  CHECK(sm[0] > sm[1]);
  const auto sp = mo::sparsemax_weights(logits);
  CHECK(sp[0] == doctest::Approx(0.75));
  CHECK(sp[1] == doctest::Approx(0.25));
  CHECK(sp[2] == 0.0f);
  const float tied[] = {2.0f, 2.0f};
  CHECK(mo::sparsemax_weights(tied)[0] == doctest::Approx(0.5));
  CHECK_THROWS_AS(mo::softmax_weights(logits, 0.0f), s2lc::invalid_argument);
}

TEST_CASE("morph: hybrids equal the weighted sum of the experts, one-hot is the expert, gate 0 is the shared core exactly") {
  auto cs = synthetic_compressed();
  std::vector<const cz::CompressedGroup*> groups = {&fixture_compressed().groups[0], &fixture_compressed().groups[1]};
  for (const auto& c : cs) groups.push_back(&c.groups[0]);
  for (const auto* gp : groups) {
    const auto& g = *gp;
    CAPTURE(g.name);
    const auto kg = mo::KGroup::from(g);
    const double slack = static_cast<double>(g.grid.cols + max_rank(g) + 64);
    std::vector<std::byte> mem(1 << 22);
    mo::Arena arena(mem);
    const std::uint32_t ex[] = {0, 2, 3};
    const float alpha[] = {0.5f, -0.25f, 0.75f};
    // Linear mix, f32 coefficients: sum_i alpha_i reconstruct(i).
    {
      const auto m = mo::mix_linear(kg, ex, alpha);
      s2lc::matrix W = xt::zeros<float>({g.grid.rows, g.grid.cols});
      std::vector<double> A(W.size(), 0.0);
      for (std::size_t i = 0; i < 3; ++i) {
        W += alpha[i] * cz::reconstruct(g, ex[i]);
        const auto Ai = abs_components(g, ex[i], 0);
        for (std::size_t k = 0; k < A.size(); ++k) A[k] += std::fabs(alpha[i]) * Ai[k];
      }
      for (std::size_t n : {1u, 6u})
        check_product(W, A, slack * 2, n, [&](const float* X, std::size_t ldx, std::size_t nn, float* Y, std::size_t ldy) {
          mo::apply(m, X, ldx, nn, Y, ldy, arena);
        });
      // Requantized to int8: within 2 % of the f32 hybrid (Frobenius, on the products).
      const auto m8 = mo::mix_linear(kg, ex, alpha, {8});
      CHECK(m8.bytes() < m.bytes());
      const auto X = randn(8 * g.grid.cols, 3);
      std::vector<float> y32(8 * g.grid.rows, 0.0f), y8(8 * g.grid.rows, 0.0f);
      mo::apply(m, X.data(), g.grid.cols, 8, y32.data(), g.grid.rows, arena);
      mo::apply(m8, X.data(), g.grid.cols, 8, y8.data(), g.grid.rows, arena);
      double num = 0, den = 0;
      for (std::size_t i = 0; i < y8.size(); ++i) num += (y8[i] - y32[i]) * double(y8[i] - y32[i]), den += double(y32[i]) * y32[i];
      CAPTURE(std::sqrt(num / den));
    CHECK(std::sqrt(num / den) < 0.02);
    }
    // One-hot: the expert (linear and gated at g = 1).
    for (std::uint32_t e : {1u, 4u}) {
      const std::uint32_t one[] = {e, 0};
      const float hot[] = {1.0f, 0.0f};
      const auto W = cz::reconstruct(g, e);
      const auto A = abs_components(g, e, 0);
      for (const auto& m : {mo::mix_linear(kg, one, hot), mo::mix_gated(kg, one, hot, 1.0f)})
        check_product(W, A, slack, 3, [&](const float* X, std::size_t ldx, std::size_t nn, float* Y, std::size_t ldy) {
          mo::apply(m, X, ldx, nn, Y, ldy, arena);
        });
    }
    // Gate 0: exactly the cores the listed experts share, bit for bit.
    {
      const float simplex[] = {0.2f, 0.3f, 0.5f};
      const auto m = mo::mix_gated(kg, ex, simplex, 0.0f);
      CHECK(m.residual.blocks.empty());
      const auto X = randn(5 * g.grid.cols, 9);
      std::vector<float> y(5 * g.grid.rows, 0.0f), ref(5 * g.grid.rows, 0.0f);
      mo::apply(m, X.data(), g.grid.cols, 5, y.data(), g.grid.rows, arena);
      std::vector<int> on(kg.cores.size(), 0);
      for (auto e : ex)
        for (auto nd : kg.path[e]) ++on[nd];
      for (std::size_t nd = 0; nd < kg.cores.size(); ++nd)
        if (on[nd] == 3) mo::apply_matrix(kg, kg.cores[nd], X.data(), g.grid.cols, 5, ref.data(), g.grid.rows, 1.0f, 0, arena);
      CHECK(y == ref);
      // Continuity: a small gate stays close to the core.
      const auto m_small = mo::mix_gated(kg, ex, simplex, 1e-3f);
      std::vector<float> ys(5 * g.grid.rows, 0.0f);
      mo::apply(m_small, X.data(), g.grid.cols, 5, ys.data(), g.grid.rows, arena);
      double num = 0, den = 0;
      for (std::size_t i = 0; i < ys.size(); ++i) num += (ys[i] - ref[i]) * double(ys[i] - ref[i]), den += double(ref[i]) * ref[i] + 1e-12;
      CHECK(std::sqrt(num / den) < 0.01);
    }
    CHECK_THROWS_AS(mo::mix_gated(kg, ex, alpha, 0.5f), s2lc::invalid_argument);  // not on the simplex
    CHECK_THROWS_AS(mo::mix_gated(kg, ex, alpha, 1.5f), s2lc::invalid_argument);
  }
}

TEST_CASE("morph: experts sharing a basis mix in the shared subspace at the cost of one expert") {
  // The group with the most shared residual blocks (real experts first, then synthetic).
  const auto cs = synthetic_compressed();
  std::vector<const cz::CompressedGroup*> groups;
  for (const auto& g : fixture_compressed().groups) groups.push_back(&g);
  for (const auto& c : cs) groups.push_back(&c.groups[0]);
  const cz::CompressedGroup* best = nullptr;
  std::size_t most = 0;
  for (const auto* g : groups) {
    std::size_t shared = 0;
    for (const auto& r : g->residuals)
      for (const auto& b : r.blocks) shared += b.kind == cz::block_kind::shared;
    if (shared > most) most = shared, best = g;
  }
  REQUIRE(best != nullptr);
  const auto kg = mo::KGroup::from(*best);
  MESSAGE(best->name << ": " << most << " shared residual blocks");
  for (std::size_t K : {std::size_t{2}, std::size_t{4}, kg.members()}) {
    CAPTURE(K);
    std::vector<std::uint32_t> ex(K);
    std::vector<float> a(K, 1.0f / static_cast<float>(K));
    for (std::size_t i = 0; i < K; ++i) ex[i] = static_cast<std::uint32_t>(i);
    const auto m = mo::mix_linear(kg, ex, a, {8});
    double single = 0;
    for (std::size_t e = 0; e < K; ++e) single += static_cast<double>(kg.member_bytes(e)) / static_cast<double>(K);
    MESSAGE("morph of " << K << " experts reads " << m.bytes() << " bytes, one expert " << single);
    CHECK(static_cast<double>(m.bytes()) < 0.75 * static_cast<double>(K) * single);  // far from K experts
  }
}

TEST_CASE("morph: truncate cuts own-factor mixes to one expert's rank within the SVD tail of the exact mix") {
  std::size_t cut = 0;
  for (const auto& g : fixture_compressed().groups) {
    CAPTURE(g.name);
    const auto kg = mo::KGroup::from(g);
    const std::vector<std::uint32_t> ex{0, 2, 5, 7};
    const std::vector<float> a{0.4f, 0.3f, 0.2f, 0.1f};
    const auto exact = mo::mix_linear(kg, ex, a, {0});         // exact f32 mixes (stacked or dense)
    const auto dense8 = mo::mix_linear(kg, ex, a, {8});        // the same, int8
    for (unsigned bits : {8u, 4u}) {
    CAPTURE(bits);
    const auto cutm = mo::mix_linear(kg, ex, a, {bits, true});  // truncated, int8 / int4 factors
    std::size_t here = 0;
    for (const auto& b : cutm.residual.blocks) {
      if (b.kind != cz::block_kind::lowrank) continue;
      const auto* e = mo::detail::find_block(exact.residual, b.index);
      REQUIRE(e != nullptr);
      // a part's own block kept as is (one part at weight 1, a shared-basis mix): the same rank
      if (cutm.replaces[b.index] || (e->kind != cz::block_kind::raw && e->rank == b.rank)) continue;
      ++here;
      std::vector<float> x(std::size_t{b.rb} * b.cb, 0.0f);  // the exact mix: dense, or the parts' factors stacked
      mo::detail::add_block(kg, *e, 1.0f, 0, x.data());
      REQUIRE(b.a.bits == bits);
      REQUIRE(b.b.bits == bits);
      std::vector<float> d(std::size_t{b.rb} * b.cb, 0.0f);
      mo::detail::add_block(kg, b, 1.0f, 0, d.data());
      s2lc::matrix M = s2lc::matrix::from_shape({b.rb, b.cb});
      std::copy(x.begin(), x.end(), M.begin());
      const auto f = s2lc::linalg::svd(M);
      double tail = 0, norm = 0, err = 0;
      for (std::size_t k = b.rank; k < f.rank(); ++k) tail += double(f.S(k)) * f.S(k);
      for (std::size_t i = 0; i < d.size(); ++i) norm += double(x[i]) * x[i], err += (double(d[i]) - x[i]) * (double(d[i]) - x[i]);
      CAPTURE(b.index); CAPTURE(b.rank);
      // The factors are exactly (U S)^T and Vt of the exact mix's top b.rank singular triplets,
      // quantized at `bits` in the group's column groups: same codes, same scales.
      const std::size_t r = b.rank;
      std::vector<float> lt(r * b.rb), rt(r * b.cb);
      for (std::size_t k = 0; k < r; ++k) {
        for (std::size_t i = 0; i < b.rb; ++i) lt[k * b.rb + i] = f.U(i, k) * f.S(k);
        for (std::size_t j = 0; j < b.cb; ++j) rt[k * b.cb + j] = f.Vt(k, j);
      }
      auto same = [](const mo::KMat& got, const mo::KMat& want) {
        return got.ncodes() == want.ncodes() && got.nscales() == want.nscales() &&
               std::equal(want.codes_data(), want.codes_data() + want.ncodes(), got.codes_data()) &&
               std::equal(want.scales_data(), want.scales_data() + want.nscales(), got.scales_data());
      };
      CHECK(same(b.a, mo::KMat::from(cz::quantize(lt.data(), r, b.rb, {bits, kg.group_size, false}))));
      CHECK(same(b.b, mo::KMat::from(cz::quantize(rt.data(), r, b.cb, {bits, kg.group_size, false}))));
      // Eckart-Young: the rank-r cut loses exactly the tail; int8 factors add well under 1 %.
      if (bits == 8) CHECK(std::sqrt(err) <= std::sqrt(tail) + 0.01 * std::sqrt(norm));
      CHECK(b.rank < std::min(b.rb, b.cb));
    }
    if (here) CHECK(cutm.bytes() < dense8.bytes());
    cut += here;
    }
  }
  MESSAGE(cut << " own-factor mixes truncated");
  CHECK(cut > 0);
  const auto kg = mo::KGroup::from(fixture_compressed().groups[0]);
  const std::vector<std::uint32_t> ex{0, 1};
  const std::vector<float> a{0.5f, 0.5f};
  CHECK_THROWS_AS(mo::mix_linear(kg, ex, a, {0, true}), s2lc::invalid_argument);  // f32 factors: not supported
}

TEST_CASE("morph: exact mixes of own-factor low-rank blocks stack the parts' factors where cheaper than dense") {
  // Real experts: two at weights 0.6 and -0.3 (rank r1 + r2 per block), then all of them (too
  // large a rank: dense).
  std::size_t stacked = 0, dense = 0;
  for (const auto& g : fixture_compressed().groups) {
    CAPTURE(g.name);
    const auto kg = mo::KGroup::from(g);
    for (bool all : {false, true}) {
      std::vector<std::uint32_t> ex{0, 3};
      std::vector<float> w{0.6f, -0.3f};
      if (all) {
        ex.resize(kg.members()), w.assign(kg.members(), 1.0f / static_cast<float>(kg.members()));
        for (std::size_t i = 0; i < ex.size(); ++i) ex[i] = static_cast<std::uint32_t>(i);
      }
      for (unsigned bits : {0u, 8u}) {
        CAPTURE(all); CAPTURE(bits);
        const auto m = mo::mix_linear(kg, ex, w, {bits});
        for (const auto& b : m.residual.blocks) {
          if (m.replaces[b.index]) continue;
          std::vector<std::pair<const mo::KBlock*, float>> parts;
          for (std::size_t i = 0; i < ex.size(); ++i)
            if (const auto* p = mo::detail::find_block(kg.residuals[ex[i]], b.index)) parts.emplace_back(p, w[i]);
          bool own = !parts.empty(), same_basis = true;
          std::size_t rank = 0;
          for (const auto& [p, pw] : parts) {
            own &= p->kind == cz::block_kind::lowrank || p->kind == cz::block_kind::shared;
            same_basis &= p->kind == cz::block_kind::shared && p->basis == parts[0].first->basis;
            rank += p->rank;
          }
          if (!own || same_basis) continue;
          CAPTURE(b.index); CAPTURE(rank);
          const bool cheaper = rank * (b.rb + b.cb) <= std::size_t{b.rb} * b.cb;
          // the exact mix, from the parts
          std::vector<float> ref(std::size_t{b.rb} * b.cb, 0.0f), got(ref.size(), 0.0f);
          double mag = 0;
          for (const auto& [p, pw] : parts) mo::detail::add_block(kg, *p, pw, 0, ref.data());
          mo::detail::add_block(kg, b, 1.0f, 0, got.data());
          double err = 0;
          for (std::size_t i = 0; i < ref.size(); ++i) err += (double(got[i]) - ref[i]) * (double(got[i]) - ref[i]), mag += double(ref[i]) * ref[i];
          if (!cheaper) {
            CHECK(b.kind != cz::block_kind::lowrank);  // dense (raw f32 or requantized)
            ++dense;
            continue;
          }
          ++stacked;
          REQUIRE(b.kind == cz::block_kind::lowrank);
          REQUIRE(b.rank == rank);
          // left: the parts' codes and scales, row after row, as they are
          std::vector<std::uint8_t> codes;
          std::vector<std::uint16_t> scales;
          for (const auto& [p, pw] : parts) {
            const auto l = mo::detail::left_view(kg, *p);
            codes.insert(codes.end(), l.codes, l.codes + p->rank * l.row_bytes());
            scales.insert(scales.end(), l.scales, l.scales + p->rank * l.groups_per_row());
          }
          const auto lv = b.a.view();
          CHECK(std::equal(codes.begin(), codes.end(), lv.codes));
          CHECK(std::equal(scales.begin(), scales.end(), lv.scales));
          if (bits == 0) {
            // right: w_i R_i in f32, the same products as the dense mix's, so the block is that mix
            // up to the order of its f32 sums
            REQUIRE(b.raw.size() == rank * b.cb);
            CHECK(std::sqrt(err) <= 1e-6 * std::sqrt(mag) + 1e-30);
          } else {
            // right requantized to 8 bits: well under the 8-bit dense mix's 1 %
            CHECK(b.b.bits == 8);
            CHECK(std::sqrt(err) <= 0.01 * std::sqrt(mag));
          }
        }
      }
    }
  }
  MESSAGE(stacked << " blocks stacked, " << dense << " mixed densely");
  CHECK(stacked > 0);
  CHECK(dense > 0);
}

TEST_CASE("morph: basis bank atoms are unit-norm, all atoms give the dense product, K picks the largest") {
  std::vector<s2lc::matrix> ms;
  for (std::uint32_t s = 0; s < 3; ++s) {
    const auto v = randn(30 * 20, 40 + s);
    s2lc::matrix m = s2lc::matrix::from_shape({30, 20});
    std::copy(v.begin(), v.end(), m.begin());
    ms.push_back(m);
  }
  const auto bank = mo::BasisBank::from_matrices(ms, 4);
  REQUIRE(bank.atoms() == 12);
  for (std::size_t j = 0; j < bank.atoms(); ++j) {
    double nu = 0, nv = 0;
    for (std::size_t i = 0; i < bank.rows; ++i) nu += double(bank.u[j * bank.rows + i]) * bank.u[j * bank.rows + i];
    for (std::size_t i = 0; i < bank.cols; ++i) nv += double(bank.v[j * bank.cols + i]) * bank.v[j * bank.cols + i];
    CHECK(nu == doctest::Approx(1.0).epsilon(1e-5));
    CHECK(nv == doctest::Approx(1.0).epsilon(1e-5));
  }
  const auto X = randn(3 * 20, 5);
  std::vector<std::byte> mem(bank.scratch_bytes(3));
  mo::Arena arena(mem);
  std::vector<float> yall(3 * 30, 0.0f), y1(3 * 30, 0.0f);
  bank.apply(X.data(), 20, 3, yall.data(), 30, 100, arena);
  bank.apply(X.data(), 20, 3, y1.data(), 30, 1, arena);
  for (std::size_t t = 0; t < 3; ++t) {
    std::vector<double> c(bank.atoms());
    std::size_t best = 0;
    for (std::size_t j = 0; j < bank.atoms(); ++j) {
      double dot = 0;
      for (std::size_t i = 0; i < 20; ++i) dot += double(bank.v[j * 20 + i]) * X[t * 20 + i];
      c[j] = bank.s[j] * dot;
      if (std::fabs(c[j]) > std::fabs(c[best])) best = j;
    }
    for (std::size_t r = 0; r < 30; ++r) {
      double all = 0;
      for (std::size_t j = 0; j < bank.atoms(); ++j) all += c[j] * bank.u[j * 30 + r];
      CHECK(yall[t * 30 + r] == doctest::Approx(all).epsilon(1e-4).scale(1.0));
      CHECK(y1[t * 30 + r] == doctest::Approx(c[best] * bank.u[best * 30 + r]).epsilon(1e-4).scale(1.0));
    }
  }
}

TEST_CASE("morph: JIT merge into f32 and bf16 buffers, then unmerge restores the base bit for bit") {
  auto cs = synthetic_compressed();
  std::vector<const cz::CompressedGroup*> groups = {&fixture_compressed().groups[1]};
  for (const auto& c : cs) groups.push_back(&c.groups[0]);
  s2lc::io::SafetensorsFile f(s2lc::test::data_dir() / "tinymoe-upcycled-L1.safetensors");
  for (const auto* gp : groups) {
    const auto& g = *gp;
    CAPTURE(g.name);
    const auto kg = mo::KGroup::from(g);
    const std::size_t R = kg.rows(), C = kg.cols(), ld = C + 5;
    // The base: real bf16 weights where the shapes allow, else weight-like noise.
    std::vector<float> base(R * ld, 7.0f);
    const auto noise = randn(R * C, 3, 0.05f);
    const bool real = R == 256 && C == 768;
    const auto real_w = real ? s2lc::load_matrix_f32(f, "layers.1.moe.experts.6.w2.weight") : s2lc::matrix{};
    for (std::size_t i = 0; i < R; ++i)
      for (std::size_t j = 0; j < C; ++j) base[i * ld + j] = real ? real_w(i, j) : noise[i * C + j];
    for (std::uint32_t e : {0u, 3u})
      for (const auto math : {mo::merge_math::fixed16, mo::merge_math::f32}) {
      CAPTURE(e);
      const bool fixed = math == mo::merge_math::fixed16;
      CAPTURE(fixed);
      auto buf = base;
      const auto undo = mo::merge(kg, e, buf.data(), ld, 0.5f, 0, math);
      CHECK(undo.math == math);
      const auto W = cz::reconstruct(g, e);
      const auto A = abs_components(g, e, 0);
      const auto F = fixed ? abs_components(g, e, 0, true) : std::vector<double>(R * C, 0.0);
      double worst = 0;  // the largest error as a fraction of its bound
      for (std::size_t i = 0; i < R; ++i) {
        for (std::size_t j = 0; j < C; ++j) {
          const double want = double(base[i * ld + j]) + 0.5 * double(W(i, j));
          const double tol = double(max_rank(g) + 8) * kU * (std::fabs(want) + A[i * C + j]) + 0.5 * F[i * C + j];
          REQUIRE(std::fabs(buf[i * ld + j] - want) <= tol);
          worst = std::max(worst, std::fabs(buf[i * ld + j] - want) / tol);
        }
        for (std::size_t j = C; j < ld; ++j) REQUIRE(buf[i * ld + j] == base[i * ld + j]);  // padding untouched
      }
      MESSAGE(g.name << " member " << e << std::string(fixed ? " fixed16" : " f32") << ": " << undo.exceptions() << " of " << R * C
                     << " elements recorded; largest error " << worst << " of its bound");
      // The record stays small when the delta is not larger than the base (real weights); a
      // delta that dwarfs the base (the synthetic case) needs most elements recorded.
      if (real) CHECK(undo.exceptions() < R * C / 4);
      {  // on 3 workers (grid blocks in parallel): the same buffer bits and the same record
        mo::ThreadPool pool(3);
        auto pbuf = base;
        const auto pu = mo::merge(kg, e, pbuf.data(), ld, 0.5f, 0, math, &pool);
        CHECK(std::memcmp(pbuf.data(), buf.data(), buf.size() * sizeof(float)) == 0);
        CHECK(pu.mask == undo.mask);
        REQUIRE(pu.f32.size() == undo.f32.size());
        CHECK(std::memcmp(pu.f32.data(), undo.f32.data(), pu.f32.size() * sizeof(float)) == 0);
        mo::unmerge(kg, e, pbuf.data(), ld, pu, 0.5f, 0, &pool);
        CHECK(std::memcmp(pbuf.data(), base.data(), base.size() * sizeof(float)) == 0);
      }
      {  // a record whose mask does not match its values (or the grid) is refused, the buffer untouched
        const auto merged = buf;
        auto bad = undo;
        bad.mask[bad.mask.size() / 2] ^= 1;
        CHECK_THROWS_WITH_AS(mo::unmerge(kg, e, buf.data(), ld, bad, 0.5f), doctest::Contains("belongs to another buffer"), s2lc::invalid_argument);
        bad = undo;
        bad.mask.pop_back();
        CHECK_THROWS_WITH_AS(mo::unmerge(kg, e, buf.data(), ld, bad, 0.5f), doctest::Contains("belongs to another buffer"), s2lc::invalid_argument);
        CHECK(std::memcmp(buf.data(), merged.data(), buf.size() * sizeof(float)) == 0);
      }
      mo::unmerge(kg, e, buf.data(), ld, undo, 0.5f);
      CHECK(std::memcmp(buf.data(), base.data(), base.size() * sizeof(float)) == 0);
      if (!fixed) continue;

      std::vector<std::uint16_t> h(R * ld), hbase(R * ld);
      for (std::size_t i = 0; i < h.size(); ++i) h[i] = hbase[i] = s2lc::f32_to_bf16(base[i]);
      const auto hu = mo::merge(kg, e, h.data(), ld);
      CHECK(h != hbase);
      mo::unmerge(kg, e, h.data(), ld, hu);
      CHECK(h == hbase);
      CHECK_THROWS_WITH_AS(mo::unmerge(kg, e, buf.data(), ld, hu), doctest::Contains("belongs to another buffer"), s2lc::invalid_argument);
      }
    // A morphed hybrid merges and unmerges the same way.
    const std::uint32_t ex[] = {1, 2};
    const float a[] = {0.5f, 0.5f};
    const auto m = mo::mix_linear(kg, ex, a);
    auto buf = base;
    const auto undo = mo::merge(m, buf.data(), ld);
    CHECK(buf != base);
    mo::unmerge(m, buf.data(), ld, undo);
    CHECK(std::memcmp(buf.data(), base.data(), base.size() * sizeof(float)) == 0);
  }
}

TEST_CASE("morph: merge of a member's base then its module gives the member, and each unmerges bit for bit") {
  auto cs = synthetic_compressed();
  // A block-sparse module: the real w2 group with every third residual block of members 0 and 2 dropped.
  cz::CompressedGroup sparse = fixture_compressed().groups[1];
  sparse.name += " (block-sparse residuals)";
  for (std::uint32_t e : {0u, 2u})
    for (std::size_t b = 0; b < sparse.grid.blocks(); b += 3) sparse.residuals[e].blocks[b] = cz::Block{};
  std::vector<const cz::CompressedGroup*> groups = {&fixture_compressed().groups[1], &sparse, &fixture_compressed_256().groups[0]};
  for (const auto& c : cs) groups.push_back(&c.groups[0]);
  for (const auto* gp : groups) {
    const auto& g = *gp;
    CAPTURE(g.name);
    const auto kg = mo::KGroup::from(g);
    const std::size_t R = kg.rows(), C = kg.cols(), ld = C + 3;
    const bool is_sparse = gp == &sparse;
    for (std::uint32_t e : {0u, 2u}) {
      CAPTURE(e);
      std::vector<int> path;  // root first
      for (int n = g.leaf[e]; n >= 0; n = g.nodes[static_cast<std::size_t>(n)].parent) path.insert(path.begin(), n);
      REQUIRE(kg.path[e].size() == path.size());
      const auto W = cz::reconstruct(g, e);
      const auto A = abs_components(g, e, 0, false, true), F = abs_components(g, e, 0, true, true);
      const double slack = double(max_rank(g) + 8) * kU;
      // 1 core, and all (99: more than any path, clamped)
      for (std::size_t held : path.size() > 1 ? std::vector<std::size_t>{1, 99} : std::vector<std::size_t>{99}) {
        CAPTURE(held);
        const std::size_t h = std::min(held, path.size());
        // The base's reference: the first h cores, on every block.
        std::vector<float> B(R * C, 0.0f);
        for (std::size_t i = 0; i < h; ++i) cz::detail::accumulate(g, g.nodes[static_cast<std::size_t>(path[i])].core, B.data(), 0, false);
        std::vector<float> buf(R * ld, -3.0f);  // padding: -3
        for (std::size_t i = 0; i < R; ++i) std::fill(buf.begin() + static_cast<std::ptrdiff_t>(i * ld), buf.begin() + static_cast<std::ptrdiff_t>(i * ld + C), 0.0f);
        const auto zeros = buf;
        const mo::MemberPart bp{mo::member_part::base, held}, mp{mo::member_part::module, held};
        const auto ub = mo::merge(kg, e, buf.data(), ld, 1.0f, 0, mo::merge_math::fixed16, nullptr, bp);
        CHECK(ub.part == mo::member_part::base);
        CHECK(ub.held == h);
        for (std::size_t i = 0; i < R; ++i)
          for (std::size_t j = 0; j < C; ++j)
            REQUIRE(std::fabs(buf[i * ld + j] - B[i * C + j]) <= slack * (std::fabs(B[i * C + j]) + A[i * C + j]) + 0.5 * F[i * C + j]);
        const auto based = buf;
        const auto um = mo::merge(kg, e, buf.data(), ld, 1.0f, 0, mo::merge_math::fixed16, nullptr, mp);
        CHECK(um.part == mo::member_part::module);
        for (std::size_t i = 0; i < R; ++i) {
          for (std::size_t j = 0; j < C; ++j) {
            // base and module each round their parts; where a raw residual replaces the cores, the
            // base's cores are added by the base and subtracted by the module
            const double want = W(i, j);
            REQUIRE(std::fabs(buf[i * ld + j] - want) <= 2 * slack * (std::fabs(want) + A[i * C + j] + 2 * std::fabs(B[i * C + j])) + F[i * C + j]);
          }
          for (std::size_t j = C; j < ld; ++j) REQUIRE(buf[i * ld + j] == -3.0f);
        }
        std::size_t untouched = 0;  // elements of blocks the module has nothing in: not written
        for (std::size_t b = 0; b < kg.grid.blocks(); ++b) {
          bool empty = !kg.replaces[e][b] && !mo::detail::find_block(kg.residuals[e], b);
          for (std::size_t i = h; i < path.size(); ++i) empty = empty && !mo::detail::find_block(kg.cores[kg.path[e][i]], b);
          if (!empty) continue;
          for (std::size_t i = 0; i < kg.grid.rb(b); ++i) {
            const std::size_t at = (kg.grid.r0(b) + i) * ld + kg.grid.c0(b);
            CHECK(std::memcmp(buf.data() + at, based.data() + at, kg.grid.cb(b) * sizeof(float)) == 0);
            untouched += kg.grid.cb(b);
          }
        }
        if (is_sparse) CHECK(untouched > 0);
        MESSAGE(g.name << " member " << e << ", " << h << " of " << path.size() << " cores held: the module recorded " << um.exceptions()
                       << " elements; " << untouched << " of " << R * C << " are in blocks it has nothing in");
        // The part must match on unmerge; the buffer stays as it was.
        const auto merged = buf;
        CHECK_THROWS_WITH_AS(mo::unmerge(kg, e, buf.data(), ld, um, 1.0f), doctest::Contains("another part"), s2lc::invalid_argument);
        CHECK_THROWS_WITH_AS(mo::unmerge(kg, e, buf.data(), ld, um, 1.0f, 0, nullptr, bp), doctest::Contains("another part"), s2lc::invalid_argument);
        CHECK(std::memcmp(buf.data(), merged.data(), buf.size() * sizeof(float)) == 0);
        {  // on 3 workers: the same bits and record
          mo::ThreadPool pool(3);
          auto pbuf = based;
          const auto pu = mo::merge(kg, e, pbuf.data(), ld, 1.0f, 0, mo::merge_math::fixed16, &pool, mp);
          CHECK(std::memcmp(pbuf.data(), buf.data(), buf.size() * sizeof(float)) == 0);
          CHECK(pu.mask == um.mask);
          CHECK(pu.f32 == um.f32);
        }
        mo::unmerge(kg, e, buf.data(), ld, um, 1.0f, 0, nullptr, mp);
        CHECK(std::memcmp(buf.data(), based.data(), buf.size() * sizeof(float)) == 0);
        mo::unmerge(kg, e, buf.data(), ld, ub, 1.0f, 0, nullptr, bp);
        CHECK(std::memcmp(buf.data(), zeros.data(), buf.size() * sizeof(float)) == 0);
        // bf16: base, then module, unmerged in reverse order, restores the bits
        std::vector<std::uint16_t> hb(R * ld, 0);
        const auto hz = hb;
        const auto hub = mo::merge(kg, e, hb.data(), ld, 1.0f, 0, mo::merge_math::fixed16, nullptr, bp);
        const auto hbased = hb;
        const auto hum = mo::merge(kg, e, hb.data(), ld, 1.0f, 0, mo::merge_math::fixed16, nullptr, mp);
        mo::unmerge(kg, e, hb.data(), ld, hum, 1.0f, 0, nullptr, mp);
        CHECK(hb == hbased);
        mo::unmerge(kg, e, hb.data(), ld, hub, 1.0f, 0, nullptr, bp);
        CHECK(hb == hz);
      }
      {  // a module over no base is the whole member: the same bits and record as merge of the member
        const auto noise = randn(R * ld, 11 + e, 0.05f);
        auto w1 = noise, w2 = noise;
        const auto uw = mo::merge(kg, e, w1.data(), ld, 0.5f);
        const auto u0 = mo::merge(kg, e, w2.data(), ld, 0.5f, 0, mo::merge_math::fixed16, nullptr, {mo::member_part::module, 0});
        CHECK(std::memcmp(w1.data(), w2.data(), w1.size() * sizeof(float)) == 0);
        CHECK(uw.mask == u0.mask);
        CHECK(uw.f32 == u0.f32);
      }
    }
  }
  const auto kg = mo::KGroup::from(fixture_compressed().groups[1]);
  std::vector<float> buf(kg.rows() * kg.cols());
  CHECK_THROWS_WITH_AS(mo::merge(kg, 99, buf.data(), kg.cols()), doctest::Contains("member 99 out of range"), s2lc::invalid_argument);
  CHECK_THROWS_WITH_AS(mo::unmerge(kg, 99, buf.data(), kg.cols(), mo::MergeUndo{}), doctest::Contains("member 99 out of range"), s2lc::invalid_argument);
}

TEST_CASE("morph: a module of dense blocks merges straight from its codes, with the bits and record of decoding each block first") {
  // Member 0 of the real w2 group (100 x 90 blocks: partial quantization groups, row-major codes;
  // 256 x 256: rows in lanes) made a residual-only module: its reconstruction's blocks as dense
  // 3-bit blocks, every third block dropped, every fifth its low-rank block (decoded first: the
  // other path, in the same merge). The reference decodes every block (detail::decode_delta) and
  // merges element by element with the documented rule and record layout.
  s2lc::io::SafetensorsFile f(s2lc::test::data_dir() / "tinymoe-upcycled-L1.safetensors");
  const auto real_w = s2lc::load_matrix_f32(f, "layers.1.moe.experts.6.w2.weight");
  for (const auto* c : {&fixture_compressed(), &fixture_compressed_256()}) {
    const auto& g = c->groups[1];
    auto kg = mo::KGroup::from(g);
    const std::size_t R = kg.rows(), C = kg.cols(), ld = C + 3;
    REQUIRE(R == real_w.shape(0));
    REQUIRE(C == real_w.shape(1));
    CAPTURE(kg.grid.block_rows);
    const auto W = cz::reconstruct(g, 0);
    mo::KMatrix res;
    std::size_t lone = 0;
    for (std::size_t b = 0; b < kg.grid.blocks(); ++b) {
      if (b % 3 == 2) continue;
      if (b % 5 == 0) {
        if (const auto* o = mo::detail::find_block(kg.residuals[0], b)) res.blocks.push_back(*o);
        continue;
      }
      auto blk = mo::detail::block_shell(kg.grid, b);
      std::vector<float> v(std::size_t{blk.rb} * blk.cb);
      for (std::size_t i = 0; i < blk.rb; ++i)
        for (std::size_t j = 0; j < blk.cb; ++j) v[i * blk.cb + j] = W(blk.r0 + i, blk.c0 + j);
      blk.kind = cz::block_kind::dense;
      blk.a = mo::KMat::from(cz::quantize(v.data(), blk.rb, blk.cb, {3, 32, false}), true);
      res.blocks.push_back(std::move(blk));
      ++lone;
    }
    kg.residuals[0] = std::move(res);
    kg.path[0].clear();
    std::fill(kg.replaces[0].begin(), kg.replaces[0].end(), std::uint8_t{0});
    REQUIRE(lone > 0);
    std::vector<float> base(R * ld, 3.0f);
    for (std::size_t i = 0; i < R; ++i)
      for (std::size_t j = 0; j < C; ++j) base[i * ld + j] = real_w(i, j);
    for (float scale : {1.0f, 0.3f}) {
      CAPTURE(scale);
      const mo::detail::MemberDelta src{&kg, 0, scale};
      // The reference: f32 and bf16 buffers, masks and records.
      std::vector<float> want = base;
      std::vector<std::uint16_t> hbase(base.size()), hwant;
      for (std::size_t i = 0; i < base.size(); ++i) hbase[i] = s2lc::f32_to_bf16(base[i]);
      hwant = hbase;
      const auto off = mo::detail::undo_mask_offsets(kg);
      std::vector<std::uint8_t> mask(off.back(), 0), hmask(off.back(), 0);
      std::vector<float> vals;
      std::vector<std::uint16_t> hvals;
      mo::detail::BlockScratch bs;
      for (std::size_t b = 0; b < kg.grid.blocks(); ++b) {
        if (!mo::detail::has_parts(src, b)) continue;
        const std::size_t r0 = kg.grid.r0(b), c0 = kg.grid.c0(b), rb = kg.grid.rb(b), cb = kg.grid.cb(b), nb = (cb + 7) / 8;
        std::vector<float> d(rb * cb);
        mo::detail::decode_delta(src, b, d.data(), d.size(), 0, bs, true);
        for (std::size_t i = 0; i < rb; ++i)
          for (std::size_t j = 0; j < cb; ++j) {
            const float dv = d[i * cb + j];
            const std::size_t at = (r0 + i) * ld + c0 + j, bit = off[b] + i * nb + j / 8;
            const float old = want[at];
            want[at] = old + dv;
            if (std::bit_cast<std::uint32_t>(want[at] - dv) != std::bit_cast<std::uint32_t>(old))
              mask[bit] = static_cast<std::uint8_t>(mask[bit] | 1u << (j % 8)), vals.push_back(old);
            const std::uint16_t hold = hwant[at];
            hwant[at] = s2lc::f32_to_bf16(s2lc::bf16_to_f32(hold) + dv);
            if (s2lc::f32_to_bf16(s2lc::bf16_to_f32(hwant[at]) - dv) != hold)
              hmask[bit] = static_cast<std::uint8_t>(hmask[bit] | 1u << (j % 8)), hvals.push_back(hold);
          }
      }
      REQUIRE(!vals.empty());
      auto check = [&](auto& buf, const auto& wantbuf, const mo::MergeUndo& u, const std::vector<std::uint8_t>& wmask, const auto& wvals,
                       const auto& got_vals) {
        REQUIRE(std::memcmp(buf.data(), wantbuf.data(), buf.size() * sizeof(buf[0])) == 0);
        CHECK(u.mask == wmask);
        REQUIRE(got_vals.size() == wvals.size());
        CHECK(std::memcmp(got_vals.data(), wvals.data(), wvals.size() * sizeof(wvals[0])) == 0);
      };
      for (int workers : {1, 3}) {
        CAPTURE(workers);
        mo::ThreadPool pool(static_cast<unsigned>(workers));
        auto buf = base;
        const auto u = mo::merge(kg, 0, buf.data(), ld, scale, 0, mo::merge_math::fixed16, workers > 1 ? &pool : nullptr);
        check(buf, want, u, mask, vals, u.f32);
        mo::unmerge(kg, 0, buf.data(), ld, u, scale, 0, workers > 1 ? &pool : nullptr);
        CHECK(std::memcmp(buf.data(), base.data(), base.size() * sizeof(float)) == 0);
        auto h = hbase;
        const auto hu = mo::merge(kg, 0, h.data(), ld, scale, 0, mo::merge_math::fixed16, workers > 1 ? &pool : nullptr);
        check(h, hwant, hu, hmask, hvals, hu.bf16);
        mo::unmerge(kg, 0, h.data(), ld, hu, scale, 0, workers > 1 ? &pool : nullptr);
        CHECK(h == hbase);
      }
    }
  }
}

}  // namespace suite_morph_runtime
