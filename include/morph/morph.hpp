// s2lc::morph — expert morphing: a hybrid expert mixed from several compressed experts, applied
// with the same kernels at about the cost of one compressed expert.
//
// For experts i with weights beta_i and a core weight c, the hybrid is
//
//     W = c * C + sum_i beta_i (W_i - C),      C = the cores every listed expert shares,
//
// which gives the usual modes:
//   linear      c = sum alpha, beta = alpha           W = sum_i alpha_i W_i
//   simplex     alpha = softmax(logits / T) or sparsemax(logits), then linear
//   gated (DSC) c = 1, beta = g * alpha (alpha on the simplex, gate g in [0, 1]):
//               g = 0 is exactly the shared core, g = 1 with a one-hot alpha exactly expert i.
//
// Cost. The mixed expert is built once per alpha: cores get weights (a core node is applied once,
// whatever the number of experts under it); residual blocks that are coefficients on the same
// shared basis mix in the shared subspace (sum_i beta_i B_i, one block of the largest rank), so
// they cost one expert, not K; low-rank blocks on their own factors stack exactly into one
// low-rank block of the summed rank where that is cheaper than a dense block (up to rank 128 for
// 256 x 256: K = 2-3 experts' residuals); other blocks (dense, raw blocks replacing the cores,
// larger stacks) are mixed densely into one block (MorphOptions::truncate cuts mixes of low-rank
// blocks back to the largest part's rank by an SVD instead: about one expert's bytes, not exact).
// Mixed coefficients stay f32 (bits = 0) or are requantized (bits = 8 / 4, cheaper to apply,
// adds that quantization's error).
//
// BasisBank is DSC's per-token composition: unit-norm rank-1 atoms (u_j, v_j) with magnitudes
// s_j; each token uses the K atoms with the largest |s_j v_j . x|.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "morph/runtime.hpp"
#include "s2lc/compress/quant.hpp"
#include "s2lc/error.hpp"
#include "s2lc/kernels/qgemm.hpp"
#include "s2lc/linalg/svd.hpp"
#include "s2lc/tensor.hpp"

namespace s2lc::morph {

/// softmax(logits / temperature).
inline std::vector<float> softmax_weights(std::span<const float> logits, float temperature = 1.0f) {
  if (logits.empty()) throw invalid_argument("softmax_weights: no logits");
  if (!(temperature > 0)) throw invalid_argument("softmax_weights: temperature must be positive");
  const float m = *std::max_element(logits.begin(), logits.end());
  std::vector<float> w(logits.size());
  double s = 0;
  for (std::size_t i = 0; i < w.size(); ++i) s += (w[i] = std::exp((logits[i] - m) / temperature));
  for (auto& v : w) v = static_cast<float>(v / s);
  return w;
}

/// sparsemax (Martins & Astudillo 2016): the Euclidean projection of the logits on the simplex;
/// weights below the threshold are exactly 0.
inline std::vector<float> sparsemax_weights(std::span<const float> logits) {
  if (logits.empty()) throw invalid_argument("sparsemax_weights: no logits");
  std::vector<double> z(logits.begin(), logits.end());
  std::sort(z.begin(), z.end(), std::greater<>());
  double cum = 0, tau = 0;
  for (std::size_t k = 0; k < z.size(); ++k) {
    cum += z[k];
    const double t = (cum - 1.0) / static_cast<double>(k + 1);
    if (z[k] > t) tau = t;
  }
  std::vector<float> w(logits.size());
  for (std::size_t i = 0; i < w.size(); ++i) w[i] = static_cast<float>(std::max(0.0, double(logits[i]) - tau));
  return w;
}

struct MorphOptions {
  unsigned bits = 0;  ///< 0: mixed coefficients in f32; 8 or 4: requantized (group size of the group)
  /// Blocks whose parts are low-rank on different factors (no shared basis) mix exactly: their
  /// factors stacked (rank sum r_i) where that is cheaper than a dense block, else densely; with
  /// truncate (needs bits 8 or 4) they are cut back to the largest part's rank by an SVD of
  /// the mix (Eckart-Young: the best approximation of that rank), so the hybrid costs about one
  /// expert there too, at the error of the dropped singular directions.
  bool truncate = false;
};

/// A mixed expert: weighted cores plus one mixed residual.
struct KMorph {
  const KGroup* group = nullptr;
  std::vector<std::pair<std::uint32_t, float>> cores;  ///< (node, weight), weight != 0
  KMatrix residual;
  std::vector<std::uint8_t> replaces;                  ///< per grid block: the residual replaces the cores

  /// Bytes of coefficients apply reads (cores, residual, and the bases used, once each).
  std::size_t bytes() const {
    std::vector<const KMatrix*> ms{&residual};
    for (const auto& c : cores) ms.push_back(&group->cores[c.first]);
    return group->bytes_with_bases(ms);
  }
};

namespace detail {

/// Reusable f32 scratch of add_block (the merge path calls it once per block and part).
struct BlockScratch {
  std::vector<float> a, b;
  std::vector<std::int32_t> fixed;  ///< kernels::lowrank_add_fixed's
};

/// out[rb, cb] += w * the decoded block (f32), with scratch reused across calls if given; with
/// overwrite, out's old contents are ignored (out = w * the block: no zeroing pass first). With
/// fixed, a low-rank block's factors multiply in int16 fixed point (kernels::lowrank_add_fixed).
inline void add_block(const KGroup& g, const KBlock& b, float w, unsigned tier, float* out, BlockScratch* scratch = nullptr,
                      bool overwrite = false, bool fixed = false, const kernels::PrefetchRows* pf = nullptr) {
  const std::size_t rb = b.rb, cb = b.cb;
  BlockScratch local;
  BlockScratch& s = scratch ? *scratch : local;
  auto fit = [](std::vector<float>& v, std::size_t n) -> float* {
    if (v.size() < n) v.resize(n);
    return v.data();
  };
  const bool lr = b.kind == compress::block_kind::lowrank || b.kind == compress::block_kind::shared;
  if (overwrite && b.kind != compress::block_kind::dense && !(lr && fixed)) std::fill(out, out + rb * cb, 0.0f);
  switch (b.kind) {
    case compress::block_kind::zero: return;
    case compress::block_kind::raw:
      for (std::size_t i = 0; i < rb * cb; ++i) out[i] += w * b.raw[i];
      return;
    case compress::block_kind::dense:
      if (!overwrite) return kernels::q_decode_rows_add(b.a.view(), 0, rb, tier, w, out, cb);
      // (a separate pass of out *= w, in the baseline ISA, took about 7 % of a merge)
      if (w != 1.0f) return kernels::q_decode_rows_scaled(b.a.view(), 0, rb, tier, w, out, cb);
      return kernels::q_decode_rows(b.a.view(), 0, rb, tier, out, cb);
    case compress::block_kind::lowrank:
    case compress::block_kind::shared: {
      const std::size_t r = b.rank;
      float* right = fit(s.a, r * cb);
      float* left = fit(s.b, r * rb);  // [rank, rb]: gemm_tn reads it k-major, no transposed copy
      if (b.raw.empty()) kernels::q_decode_rows(b.b.view(), 0, r, tier, right, cb);
      else std::copy(b.raw.begin(), b.raw.end(), right);
      kernels::q_decode_rows(left_view(g, b), 0, r, tier, left, rb);
      if (fixed) {
        s.fixed.resize(std::max(s.fixed.size(), kernels::lowrank_fixed_scratch(r, rb, cb)));
        return kernels::lowrank_add_fixed(left, right, r, rb, cb, w, out, cb, overwrite, s.fixed.data(), pf);
      }
      if (w != 1.0f)
        for (std::size_t i = 0; i < r * rb; ++i) left[i] *= w;
      kernels::gemm_tn(left, rb, rb, r, right, cb, cb, out, cb);
      return;
    }
  }
}

inline const KBlock* find_block(const KMatrix& m, std::size_t index) {
  auto it = std::lower_bound(m.blocks.begin(), m.blocks.end(), index, [](const KBlock& b, std::size_t i) { return b.index < i; });
  return it != m.blocks.end() && it->index == index ? &*it : nullptr;
}

inline KBlock block_shell(const compress::GridShape& grid, std::size_t index) {
  KBlock b;
  b.index = static_cast<std::uint32_t>(index);
  b.r0 = static_cast<std::uint32_t>(grid.r0(index)), b.c0 = static_cast<std::uint32_t>(grid.c0(index));
  b.rb = static_cast<std::uint32_t>(grid.rb(index)), b.cb = static_cast<std::uint32_t>(grid.cb(index));
  return b;
}

/// lanes: rows in lanes where the shape takes it, as KGroup stores dense blocks and right factors
/// (so a hybrid runs the same kernels as a member); left factors stay row-major.
inline KMat requantize(const std::vector<float>& v, std::size_t rows, std::size_t cols, unsigned bits, std::size_t group, bool lanes) {
  return KMat::from(compress::quantize(v.data(), rows, cols, {bits, group, false}), lanes);
}

/// out = the best rank-`rank` approximation of the dense [rb, cb] block, as a low-rank block with
/// left = (U S)^T [rank, rb] and right = Vt [rank, cb], both requantized.
inline void truncate_into(const std::vector<float>& dense, std::size_t rb, std::size_t cb, std::size_t rank, unsigned bits,
                          std::size_t group, KBlock& out) {
  matrix M = matrix::from_shape({rb, cb});
  std::copy(dense.begin(), dense.end(), M.begin());
  const auto f = linalg::truncate(linalg::svd(M), std::min(rank, std::min(rb, cb)));
  const std::size_t r = f.rank();
  std::vector<float> left(r * rb), right(r * cb);
  for (std::size_t k = 0; k < r; ++k) {
    for (std::size_t i = 0; i < rb; ++i) left[k * rb + i] = f.U(i, k) * f.S(k);
    for (std::size_t j = 0; j < cb; ++j) right[k * cb + j] = f.Vt(k, j);
  }
  out.kind = compress::block_kind::lowrank, out.rank = static_cast<std::uint32_t>(r);
  out.a = requantize(left, r, rb, bits, group, false), out.b = requantize(right, r, cb, bits, group, true);
}

/// sum_i w_i L_i^T R_i over low-rank parts (own factors or different bases) as one low-rank block
/// of rank sum_i r_i, exactly: the left factor is the parts' left factors' rows one after another
/// (their codes and scales as they are, so its bits are the largest part's: a tier below that
/// reads every row at that tier), the right one w_i R_i (f32, or requantized at `bits` like the
/// dense mix). Taken where it needs fewer multiply-adds than a dense block (sum r (rb + cb) <=
/// rb cb; it is then smaller too) and the left factors share a layout (row-major, one group size
/// and container); false (out untouched) otherwise.
inline bool stack_lowrank(const KGroup& g, const std::vector<std::pair<const KBlock*, float>>& parts, std::size_t rb, std::size_t cb,
                          unsigned bits, std::size_t group, KBlock& out) {
  std::size_t rank = 0;
  kernels::QView first;
  std::uint8_t left_bits = 0;
  for (std::size_t i = 0; i < parts.size(); ++i) {
    const KBlock& b = *parts[i].first;
    if (b.kind != compress::block_kind::lowrank && b.kind != compress::block_kind::shared) return false;
    const kernels::QView l = left_view(g, b);
    if (i == 0) first = l;
    if (l.lanes || l.cols != rb || l.rows < b.rank || l.group != first.group || l.nibble != first.nibble) return false;
    rank += b.rank, left_bits = std::max(left_bits, l.bits);
  }
  if (rank == 0 || rank * (rb + cb) > rb * cb) return false;
  const std::size_t row_bytes = first.row_bytes(), gpr = first.groups_per_row();
  KMat a;
  a.rows = static_cast<std::uint32_t>(rank), a.cols = static_cast<std::uint32_t>(rb), a.group = first.group, a.bits = left_bits;
  a.nibble = first.nibble;
  a.codes.reserve(rank * row_bytes), a.scales.reserve(rank * gpr);
  std::vector<float> right(rank * cb);
  float* r = right.data();
  for (const auto& [b, w] : parts) {
    const kernels::QView l = left_view(g, *b);
    a.codes.insert(a.codes.end(), l.codes, l.codes + b->rank * row_bytes);
    a.scales.insert(a.scales.end(), l.scales, l.scales + b->rank * gpr);
    if (b->raw.empty()) kernels::q_decode_rows(b->b.view(), 0, b->rank, 0, r, cb);
    else std::copy(b->raw.begin(), b->raw.begin() + static_cast<std::ptrdiff_t>(b->rank * cb), r);
    for (std::size_t i = 0; i < b->rank * cb; ++i) r[i] *= w;
    r += b->rank * cb;
  }
  out.kind = compress::block_kind::lowrank, out.rank = static_cast<std::uint32_t>(rank), out.a = std::move(a);
  if (bits) out.b = requantize(right, rank, cb, bits, group, true);
  else out.raw = std::move(right);
  return true;
}

}  // namespace detail

/// The hybrid c * C + sum_i beta_i (W_i - C) of experts[i] (see the file comment). Experts may
/// repeat; weights must be finite.
inline KMorph morph(const KGroup& g, std::span<const std::uint32_t> experts, std::span<const float> beta, float core_weight,
                    const MorphOptions& opt = {}) {
  if (experts.empty() || experts.size() != beta.size()) throw invalid_argument("morph: need one weight per expert, and at least one expert");
  if (opt.bits != 0 && opt.bits != 8 && opt.bits != 4) throw invalid_argument("morph: bits must be 0, 8 or 4");
  if (opt.truncate && opt.bits == 0) throw invalid_argument("morph: truncate needs quantized factors (bits 8 or 4)");
  for (std::size_t i = 0; i < experts.size(); ++i) {
    if (experts[i] >= g.members()) throw invalid_argument("morph: expert " + std::to_string(experts[i]) + " out of range");
    if (!std::isfinite(beta[i])) throw invalid_argument("morph: weight " + std::to_string(i) + " is not finite");
  }
  if (!std::isfinite(core_weight)) throw invalid_argument("morph: core weight is not finite");
  KMorph m;
  m.group = &g;
  const std::size_t nblocks = g.grid.blocks();
  m.replaces.assign(nblocks, 0);
  // Common cores: the nodes on every listed expert's path (a shared prefix of the tree).
  std::vector<float> w(g.cores.size(), 0.0f);
  std::vector<std::uint8_t> common(g.cores.size(), 0);
  for (auto nd : g.path[experts[0]]) common[nd] = 1;
  for (auto e : experts) {
    std::vector<std::uint8_t> on(g.cores.size(), 0);
    for (auto nd : g.path[e]) on[nd] = 1;
    for (std::size_t n = 0; n < common.size(); ++n) common[n] &= on[n];
  }
  float beta_sum = 0;
  for (std::size_t i = 0; i < experts.size(); ++i) {
    beta_sum += beta[i];
    for (auto nd : g.path[experts[i]])
      if (!common[nd]) w[nd] += beta[i];
  }
  for (std::size_t n = 0; n < w.size(); ++n) {
    if (common[n]) w[n] = core_weight;
    if (w[n] != 0.0f) m.cores.emplace_back(static_cast<std::uint32_t>(n), w[n]);
  }
  for (std::size_t b = 0; b < nblocks; ++b) {
    bool replaced = false;
    std::vector<std::pair<const KBlock*, float>> parts;
    for (std::size_t i = 0; i < experts.size(); ++i) {
      if (beta[i] == 0.0f) continue;
      replaced |= g.replaces[experts[i]][b] != 0;
      if (const KBlock* blk = detail::find_block(g.residuals[experts[i]], b)) parts.emplace_back(blk, beta[i]);
    }
    KBlock out = detail::block_shell(g.grid, b);
    const std::size_t rb = out.rb, cb = out.cb;
    if (replaced) {
      // W_b = (c - sum beta) C_b + sum_i beta_i W_i,b, with W_i,b the expert's own block.
      std::vector<float> dense(rb * cb, 0.0f);
      for (std::size_t n = 0; n < g.cores.size(); ++n)
        if (common[n] && core_weight - beta_sum != 0.0f)
          if (const KBlock* cbk = detail::find_block(g.cores[n], b)) detail::add_block(g, *cbk, core_weight - beta_sum, 0, dense.data());
      for (std::size_t i = 0; i < experts.size(); ++i) {
        if (beta[i] == 0.0f) continue;
        const auto e = experts[i];
        if (!g.replaces[e][b])
          for (auto nd : g.path[e])
            if (const KBlock* cbk = detail::find_block(g.cores[nd], b)) detail::add_block(g, *cbk, beta[i], 0, dense.data());
        if (const KBlock* rbk = detail::find_block(g.residuals[e], b)) detail::add_block(g, *rbk, beta[i], 0, dense.data());
      }
      m.replaces[b] = 1;
      if (opt.bits) out.kind = compress::block_kind::dense, out.a = detail::requantize(dense, rb, cb, opt.bits, g.group_size, true);
      else out.kind = compress::block_kind::raw, out.raw = std::move(dense);
      m.residual.blocks.push_back(std::move(out));
      continue;
    }
    if (parts.empty()) continue;
    if (parts.size() == 1 && parts[0].second == 1.0f) {  // one expert at weight 1: its block as is
      m.residual.blocks.push_back(*parts[0].first);
      continue;
    }
    const bool same_basis = std::all_of(parts.begin(), parts.end(), [&](const auto& p) {
      return p.first->kind == compress::block_kind::shared && p.first->basis == parts[0].first->basis;
    });
    const std::size_t group = g.group_size;
    if (same_basis) {
      // Mix in the shared subspace: sum_i beta_i B_i, rows beyond an expert's rank are zero.
      std::uint32_t rank = 0;
      for (const auto& p : parts) rank = std::max(rank, p.first->rank);
      std::vector<float> coef(rank * cb, 0.0f), row(cb);
      for (const auto& [blk, bw] : parts) {
        if (!blk->raw.empty()) {
          for (std::size_t i = 0; i < blk->rank * cb; ++i) coef[i] += bw * blk->raw[i];
          continue;
        }
        std::vector<float> dec(blk->rank * cb);
        kernels::q_decode_rows(blk->b.view(), 0, blk->rank, 0, dec.data(), cb);
        for (std::size_t i = 0; i < dec.size(); ++i) coef[i] += bw * dec[i];
      }
      out.kind = compress::block_kind::shared, out.basis = parts[0].first->basis, out.rank = rank;
      if (opt.bits) out.b = detail::requantize(coef, rank, cb, opt.bits, group, true);
      else out.raw = std::move(coef);
    } else if (!opt.truncate && detail::stack_lowrank(g, parts, rb, cb, opt.bits, group, out)) {
      // exact, as the parts' factors stacked (cheaper than the dense mix below)
    } else {
      std::vector<float> dense(rb * cb, 0.0f);
      for (const auto& [blk, bw] : parts) detail::add_block(g, *blk, bw, 0, dense.data());
      std::uint32_t rank = 0;
      bool lowrank = true;
      for (const auto& p : parts) {
        lowrank &= p.first->kind == compress::block_kind::lowrank || p.first->kind == compress::block_kind::shared;
        rank = std::max(rank, p.first->rank);
      }
      if (opt.truncate && lowrank && rank < std::min(rb, cb)) {
        detail::truncate_into(dense, rb, cb, rank, opt.bits, group, out);
      } else if (opt.bits) {
        out.kind = compress::block_kind::dense, out.a = detail::requantize(dense, rb, cb, opt.bits, group, true);
      } else {
        out.kind = compress::block_kind::raw, out.raw = std::move(dense);
      }
    }
    m.residual.blocks.push_back(std::move(out));
  }
  m.residual.pool();  // one stream in read order, as KGroup::from does for the group's matrices
  return m;
}

/// sum_i alpha_i W_i.
inline KMorph mix_linear(const KGroup& g, std::span<const std::uint32_t> experts, std::span<const float> alpha, const MorphOptions& opt = {}) {
  const float s = std::accumulate(alpha.begin(), alpha.end(), 0.0f);
  return morph(g, experts, alpha, s, opt);
}

/// DSC's magnitude-gated simplex interpolation: C + gate * sum_i alpha_i (W_i - C), alpha on the
/// simplex (e.g. softmax_weights / sparsemax_weights), gate in [0, 1].
inline KMorph mix_gated(const KGroup& g, std::span<const std::uint32_t> experts, std::span<const float> alpha, float gate,
                        const MorphOptions& opt = {}) {
  if (!(gate >= 0.0f && gate <= 1.0f)) throw invalid_argument("mix_gated: gate must be in [0, 1]");
  double s = 0;
  for (float a : alpha) {
    if (!(a >= 0.0f)) throw invalid_argument("mix_gated: weights must be non-negative (a point of the simplex)");
    s += a;
  }
  if (std::fabs(s - 1.0) > 1e-4) throw invalid_argument("mix_gated: weights must sum to 1 (got " + std::to_string(s) + ")");
  std::vector<float> beta(alpha.begin(), alpha.end());
  for (auto& b : beta) b *= gate;
  return morph(g, experts, beta, 1.0f, opt);
}

inline std::size_t apply_scratch_bytes(const KMorph& m, std::size_t n) {
  std::size_t r = m.group->max_rank;
  for (const auto& b : m.residual.blocks) r = std::max<std::size_t>(r, b.rank);
  const std::size_t wide = std::max(m.group->grid.block_rows, m.group->grid.block_cols);
  return Arena::bytes_for<float>(n * r) + Arena::bytes_for<float>(std::max<std::size_t>(kPanelRows, r) * wide);
}

namespace detail {
/// Seeds a hybrid's coefficients in the order apply reads them: its cores, then its residual,
/// within seed's budget (PageSeeder).
inline void seed_morph_pages(PageSeeder& seed, const KMorph& m) noexcept {
  for (const auto& c : m.cores) seed(m.group->cores[c.first]);
  seed(m.residual);
}
}  // namespace detail

/// Y[t, :] += alpha * W X[t, :] for the hybrid W.
inline void apply(const KMorph& m, const float* X, std::size_t ldx, std::size_t n, float* Y, std::size_t ldy, Arena& arena,
                  float alpha = 1.0f, Precision tier = {}) {
  check_tier(tier);
  const KGroup& g = *m.group;
  detail::prefetch_meta(m.residual);  // as apply(KGroup)
  for (const auto& c : m.cores) detail::prefetch_meta(g.cores[c.first]);
  {  // as apply(KGroup)
    detail::PageSeeder seed;
    detail::seed_morph_pages(seed, m);
  }
  for (const auto& [nd, w] : m.cores) apply_matrix(g, g.cores[nd], X, ldx, n, Y, ldy, alpha * w, tier, arena, m.replaces.data());
  apply_matrix(g, m.residual, X, ldx, n, Y, ldy, alpha, tier, arena);
}

/// DSC basis bank: unit-norm atoms u_j [rows], v_j [cols] with magnitudes s_j.
struct BasisBank {
  std::size_t rows = 0, cols = 0;
  std::vector<float> u;  ///< [atoms, rows]
  std::vector<float> v;  ///< [atoms, cols]
  std::vector<float> s;  ///< [atoms]

  std::size_t atoms() const noexcept { return s.size(); }

  /// The leading `per_matrix` singular triplets of each matrix (e.g. experts' residuals W_i - C).
  static BasisBank from_matrices(const std::vector<matrix>& ms, std::size_t per_matrix) {
    if (ms.empty()) throw invalid_argument("BasisBank: no matrices");
    BasisBank bank;
    bank.rows = ms[0].shape(0), bank.cols = ms[0].shape(1);
    for (const auto& a : ms) {
      if (a.shape(0) != bank.rows || a.shape(1) != bank.cols) throw invalid_argument("BasisBank: matrices of different shapes");
      const auto f = linalg::truncate(linalg::svd(a), std::min(per_matrix, std::min(bank.rows, bank.cols)));
      for (std::size_t k = 0; k < f.rank(); ++k) {
        for (std::size_t i = 0; i < bank.rows; ++i) bank.u.push_back(f.U(i, k));
        for (std::size_t j = 0; j < bank.cols; ++j) bank.v.push_back(f.Vt(k, j));
        bank.s.push_back(f.S(k));
      }
    }
    return bank;
  }

  /// Scratch bytes of apply for n tokens.
  std::size_t scratch_bytes(std::size_t n) const { return Arena::bytes_for<float>(n * atoms()) + Arena::bytes_for<std::uint32_t>(atoms()); }

  /// Y[t, :] += sum over the K atoms j with the largest |s_j v_j . x_t| of s_j (v_j . x_t) u_j
  /// (ties: the lower atom index). K >= atoms() is the full bank.
  void apply(const float* X, std::size_t ldx, std::size_t n, float* Y, std::size_t ldy, std::size_t K, Arena& arena) const {
    const std::size_t A = atoms(), mark = arena.mark();
    float* sc = arena.take_zeroed<float>(n * A);
    std::uint32_t* order = arena.take<std::uint32_t>(A);
    kernels::gemm_nt(v.data(), cols, A, X, ldx, n, cols, 1.0f, sc, A);
    for (std::size_t t = 0; t < n; ++t) {
      float* c = sc + t * A;
      for (std::size_t j = 0; j < A; ++j) c[j] *= s[j], order[j] = static_cast<std::uint32_t>(j);
      const std::size_t k = std::min(K, A);
      std::partial_sort(order, order + k, order + A, [&](std::uint32_t a, std::uint32_t b) {
        const float fa = std::fabs(c[a]), fb = std::fabs(c[b]);
        return fa > fb || (fa == fb && a < b);
      });
      float* y = Y + t * ldy;
      for (std::size_t i = 0; i < k; ++i) {
        const float w = c[order[i]];
        const float* uj = u.data() + std::size_t{order[i]} * rows;
        kernels::add_scaled(w, uj, y, rows);
      }
    }
    arena.reset(mark);
  }
};

}  // namespace s2lc::morph
