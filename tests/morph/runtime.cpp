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
#include "support.hpp"

#include <morph/grouped.hpp>
#include <morph/parallel.hpp>
#include <morph/runtime.hpp>
#include <s2lc/compress/compressor.hpp>
#include <s2lc/compress/model.hpp>
#include <s2lc/io/safetensors.hpp>
#include <s2lc/plan.hpp>
#include <s2lc/tensor.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

extern "C" void openblas_set_num_threads(int);

namespace {

namespace cz = s2lc::compress;
namespace mo = s2lc::morph;
constexpr double kU = 1.0 / 16777216.0;

using s2lc::test::randn;

/// The tinymoe fixture's layer-1 experts (w1, w2, w3) compressed at ratio 8 with 100 x 90 blocks
/// (edge blocks of 68 rows / 76 and 48 columns; partial quantization groups), once per process.
const cz::Compressed& fixture_compressed() {
  static const cz::Compressed c = [] {
    openblas_set_num_threads(1);
    s2lc::io::SafetensorsFile f(s2lc::test::data_dir() / "tinymoe-upcycled-L1.safetensors");
    std::vector<cz::GroupInput> in;
    for (const char* role : {"w1", "w2", "w3"}) {
      cz::GroupInput g;
      g.name = std::string("layers.1.moe.experts.{E}.") + role + ".weight";
      g.type = s2lc::dtype::bf16;
      for (int e = 0; e < 8; ++e) {
        g.member_names.push_back("layers.1.moe.experts." + std::to_string(e) + "." + role + ".weight");
        g.member_sources.push_back(0);
        g.weights.push_back(s2lc::load_matrix_f32(f, g.member_names.back()));
      }
      in.push_back(std::move(g));
    }
    cz::Options opt;
    opt.ratio = 8;
    opt.block_rows = 100;
    opt.block_cols = 90;
    opt.threads = 2;
    return cz::compress(in, opt);
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
std::vector<double> abs_components(const cz::CompressedGroup& g, std::uint32_t e, unsigned tier) {
  const auto& grid = g.grid;
  std::vector<double> out(grid.rows * grid.cols, 0.0);
  auto add = [&](const cz::BlockMatrix& m, bool residual) {
    for (std::size_t b = 0; b < grid.blocks(); ++b) {
      const auto& blk = m.blocks[b];
      const std::size_t r0 = grid.r0(b), c0 = grid.c0(b), rb = grid.rb(b), cb = grid.cb(b);
      auto at = [&](std::size_t i, std::size_t j) -> double& { return out[(r0 + i) * grid.cols + c0 + j]; };
      if (residual && blk.kind == cz::block_kind::raw)
        for (std::size_t i = 0; i < rb; ++i)
          for (std::size_t j = 0; j < cb; ++j) at(i, j) = 0;
      auto tq = [&](const cz::QMatrix& q) { return tier == 0 ? 0u : std::min<unsigned>(tier, q.bits); };
      switch (blk.kind) {
        case cz::block_kind::zero: break;
        case cz::block_kind::raw:
          for (std::size_t i = 0; i < rb; ++i)
            for (std::size_t j = 0; j < cb; ++j) at(i, j) += std::fabs(blk.raw[i * cb + j]);
          break;
        case cz::block_kind::dense: {
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

/// A top-2 plan over `experts` with deterministic pseudo-random choices and gates.
s2lc::DispatchPlan top2_plan(std::size_t experts, std::size_t tokens, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<std::int32_t> ids(tokens * 2);
  std::vector<float> gates(tokens * 2);
  for (std::size_t t = 0; t < tokens; ++t) {
    const auto a = static_cast<std::int32_t>(rng() % experts);
    auto b = static_cast<std::int32_t>(rng() % experts);
    if (b == a) b = (a + 1) % static_cast<std::int32_t>(experts);
    const float g = 0.3f + 0.4f * static_cast<float>(rng() % 1000) / 1000.0f;
    ids[2 * t] = a, ids[2 * t + 1] = b, gates[2 * t] = g, gates[2 * t + 1] = 1.0f - g;
  }
  return s2lc::DispatchPlan::from_topk(experts, tokens, 2, ids.data(), gates.data());
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

TEST_CASE("morph: grouped apply equals per-expert apply, shares cores, and does not depend on threads") {
  auto cs = synthetic_compressed();
  std::vector<const cz::CompressedGroup*> groups = {&fixture_compressed().groups[0]};
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
    }
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
