// s2lc::morph — grouped apply: every selected expert of a layer in one call, from a dispatch plan
// (s2lc/plan.hpp), sharing the HED cores between experts (like llama.cpp's mul_mat_id, on
// compressed experts), and the SwiGLU expert FFN end to end.
//
// Sharing. For a linear map, sum_e g_e (C + R_e) x = (sum_e g_e) C x + sum_e g_e R_e x: a core C is
// applied once per token of the union of its members' tokens, not once per (token, expert).
// In the SwiGLU FFN the w1/w3 cores are applied once per token and node and reused by every
// expert of that node; the w2 core is applied once per token to the gate-weighted sum of the
// experts' hidden states (sum_e g_e C h_e = C sum_e g_e h_e). A `raw` residual block replaces the
// cores in its block; those experts subtract the core's share of that block again.
//
// Work is split into tasks (block rows of a core, experts) run by an Executor; each task writes
// its own region and the results are summed afterwards in a fixed order, so Y does not depend
// on the executor or the number of workers. All scratch comes from one Arena sized by
// grouped_scratch_bytes / swiglu_scratch_bytes: the call itself allocates nothing.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "morph/parallel.hpp"
#include "morph/runtime.hpp"
#include "s2lc/kernels/qgemm.hpp"
#include "s2lc/plan.hpp"

namespace s2lc::morph {

namespace detail {

inline constexpr std::uint32_t kNone = 0xFFFFFFFFu;

/// The tokens of a core node: the union of its members' tokens (first-seen order) and, per
/// token, the sum of those members' gates.
struct Union {
  std::uint32_t* pos = nullptr;   ///< [n_tokens]: index in `list`, or kNone
  std::uint32_t* list = nullptr;  ///< tokens
  float* weight = nullptr;
  std::size_t n = 0;
};

inline Union make_union(const std::vector<std::uint32_t>& members, const DispatchPlan& p, Arena& a) {
  Union u;
  u.pos = a.take<std::uint32_t>(p.n_tokens);
  u.list = a.take<std::uint32_t>(p.n_tokens);
  u.weight = a.take<float>(p.n_tokens);
  std::fill(u.pos, u.pos + p.n_tokens, kNone);
  for (auto e : members)
    for (std::size_t i = p.offsets[e]; i < p.offsets[e + 1]; ++i) {
      const std::uint32_t t = p.token[i];
      if (u.pos[t] == kNone) u.pos[t] = static_cast<std::uint32_t>(u.n), u.list[u.n] = t, u.weight[u.n++] = 0.0f;
      u.weight[u.pos[t]] += p.gate[i];
    }
  return u;
}

inline std::size_t union_bytes(std::size_t tokens) {
  return 2 * Arena::bytes_for<std::uint32_t>(tokens) + Arena::bytes_for<float>(tokens);
}

/// Per-worker scratch arenas carved from `a`.
struct Workers {
  static constexpr unsigned kMax = 256;
  Arena arena[kMax];
  unsigned n = 1;
};

inline void split_workers(Arena& a, Executor* ex, std::size_t bytes_each, Workers& w) {
  w.n = ex ? std::min(ex->workers(), Workers::kMax) : 1u;
  for (unsigned i = 0; i < w.n; ++i) w.arena[i] = a.split(bytes_each);
}

inline unsigned workers_of(Executor* ex) { return ex ? std::min(ex->workers(), Workers::kMax) : 1u; }

/// Y[i, :] += M X[i, :] for i < n, split into block-row tasks (each writes its own columns of Y).
inline void apply_matrix_parallel(const KGroup& g, const KMatrix& m, const float* X, std::size_t ldx, std::size_t n, float* Y,
                                  std::size_t ldy, Precision tier, Executor* ex, Workers& w, float alpha = 1.0f,
                                  const std::uint8_t* skip = nullptr, const Q8Cache* q8c = nullptr) {
  if (n == 0 || m.blocks.empty()) return;
  const std::size_t gc = g.grid.grid_cols();
  parallel_for(ex, g.grid.grid_rows(), [&](std::size_t br, unsigned worker) {
    for (const auto& b : m.blocks)
      if (b.index / gc == br && !(skip && skip[b.index])) apply_block(g, b, X, ldx, n, Y, ldy, alpha, tier, w.arena[worker], q8c);
  });
}

inline void gather(const float* X, std::size_t ldx, const std::uint32_t* tokens, std::size_t n, std::size_t cols, float* out) {
  for (std::size_t i = 0; i < n; ++i) std::memcpy(out + i * cols, X + tokens[i] * ldx, cols * sizeof(float));
}

inline void check_plan(const DispatchPlan& p, std::size_t experts, const char* what) {
  p.validate(/*check_duplicates=*/false);  // no allocation on the apply path; from_topk checks them
  if (p.n_experts() != experts)
    throw invalid_argument(std::string(what) + ": the plan has " + std::to_string(p.n_experts()) + " experts, the layer " +
                           std::to_string(experts));
}

/// The precision a plan's cores run at: with 3+ tokens their left factors stay f32 even where a
/// node or an expert has 1-2 tokens, so a core block added over a node's tokens and subtracted
/// per expert (unapply_replaced) takes the same path both times (Precision::int8_left).
inline Precision core_precision(Precision tier, const DispatchPlan& plan) noexcept {
  tier.int8_left = tier.int8_left && plan.n_tokens < 3;
  return tier;
}

/// Applies the cores of e's path at the blocks its residual replaces, with weight -1.
inline void unapply_replaced(const KGroup& g, std::size_t e, const float* X, std::size_t ldx, std::size_t n, float* Y,
                             std::size_t ldy, Precision tier, Arena& a) {
  const auto& rep = g.replaces[e];
  if (std::find(rep.begin(), rep.end(), std::uint8_t{1}) == rep.end()) return;
  for (auto nd : g.path[e])
    for (const auto& b : g.cores[nd].blocks)
      if (rep[b.index]) apply_block(g, b, X, ldx, n, Y, ldy, -1.0f, tier, a);
}

/// Residual blocks grouped calls apply in coefficient space (apply_shared_summed), not per expert.
inline bool summed_block(const KBlock& b) noexcept { return b.kind == compress::block_kind::shared; }

/// Y[t, :] += W X[t, :] for t < n over m's blocks that apply_shared_summed does not take.
inline void apply_unshared(const KGroup& g, const KMatrix& m, const float* X, std::size_t ldx, std::size_t n, float* Y, std::size_t ldy,
                           Precision tier, Arena& a, const Q8Cache* q8c = nullptr) {
  for (const auto& b : m.blocks)
    if (!summed_block(b)) apply_block(g, b, X, ldx, n, Y, ldy, 1.0f, tier, a, q8c);
}

/// Member e's residual blocks apply_shared_summed does not take, then the cores that residual
/// replaces taken back off (unapply_replaced): a grouped call's per-expert part. With int8
/// activations e's tokens are quantized once per grid column for all block rows (a Q8Cache
/// without the shared-basis blocks).
inline void apply_expert_unshared(const KGroup& g, std::size_t e, const float* X, std::size_t ldx, std::size_t n, float* Y, std::size_t ldy,
                                  Precision tier, Precision core, Arena& a) {
  const std::size_t am = a.mark();
  std::optional<Q8Cache> q8;
  if (tier.act == Activations::int8) q8.emplace(g, std::initializer_list<const KMatrix*>{&g.residuals[e]}, X, ldx, n, a, true);
  apply_unshared(g, g.residuals[e], X, ldx, n, Y, ldy, tier, a, q8 ? &*q8 : nullptr);
  a.reset(am);
  unapply_replaced(g, e, X, ldx, n, Y, ldy, core, a);
}

/// Arena bytes of apply_shared_summed beyond each worker's apply_scratch_bytes(g, tokens): per
/// worker (the first) and once (the second).
inline std::size_t summed_worker_bytes(const KGroup& g, std::size_t tokens) {
  return Arena::bytes_for<float>(std::max<std::size_t>(tokens, 1) * g.max_rank);
}
inline std::size_t summed_shared_bytes(const KGroup& g, std::size_t tokens) {
  const std::size_t gc = g.grid.grid_cols();
  return Arena::bytes_for<float>(gc * std::max<std::size_t>(tokens, 1) * g.grid.block_rows) + Arena::bytes_for<std::uint8_t>(gc);
}

/// Below this many tokens apply_shared_summed runs its block tasks on the calling thread: a task is
/// then about a microsecond, less than handing it to a worker (the real tinymoe layer at one token
/// on two threads took 30-31 us before the sum, 32-34 with its tasks on the pool). Same bits either way.
inline constexpr std::size_t kSummedSerialBelow = 4;

/// The residual block of member e at grid block idx if apply_shared_summed takes it, else null.
inline const KBlock* summed_at(const KGroup& g, std::size_t e, std::size_t idx) noexcept {
  const auto& bl = g.residuals[e].blocks;  // in grid order
  const auto it = std::lower_bound(bl.begin(), bl.end(), idx, [](const KBlock& b, std::size_t i) { return b.index < i; });
  return it != bl.end() && it->index == idx && summed_block(*it) ? &*it : nullptr;
}

/// prefetch_pages over the residuals, in each group of gs, of the first expert at or after
/// `from` that the plan routes tokens to (none past the last): an expert's coefficients a stage
/// ahead, while the cores or the expert before it run.
inline void prefetch_routed_pages(const DispatchPlan& plan, std::size_t from, std::initializer_list<const KGroup*> gs) noexcept {
  for (std::size_t e = from; e < plan.n_experts(); ++e)
    if (plan.count(e)) {
      for (const KGroup* g : gs) prefetch_pages(g->residuals[e]);
      return;
    }
}

/// The routed experts' shared-basis residual blocks, summed where they meet. Where the experts'
/// blocks at a grid block use one basis B (the compressor's shared projection),
/// sum_e g_e B^T t_e = B^T sum_e g_e t_e (t_e: e's coefficients of its tokens, gate-weighted
/// per token), so B is applied once per token of the plan, to all of them in one pass, instead of
/// once per (token, expert) in passes of each expert's few tokens: half the left multiply-adds
/// at top-2, in wider passes (bench/RESULTS.md, "Shared bases summed across experts"). A block on
/// another basis than the first expert's there is applied on its own, gate-weighted per token.
/// Xe: the routed pairs' activations in plan order (stride ldx); Y[t, :] += the blocks' share of
/// sum_e g_e W_e Xe. Per grid row, one task per grid block writes its own part (from the arena,
/// summed_shared_bytes), then the parts are added to Y in grid order: Y does not depend on workers.
inline void apply_shared_summed(const KGroup& g, const DispatchPlan& plan, const float* Xe, std::size_t ldx, float* Y, std::size_t ldy,
                                Precision tier, Executor* ex, Workers& w, Arena& arena) {
  const std::size_t gc = g.grid.grid_cols(), T = plan.n_tokens, E = plan.n_experts(), RB = g.grid.block_rows;
  if (T == 0 || g.bases.empty()) return;
  const std::size_t mark = arena.mark();
  float* P = arena.take<float>(gc * T * RB);
  auto* used = arena.take<std::uint8_t>(gc);
  for (std::size_t br = 0; br < g.grid.grid_rows(); ++br) {
    parallel_for(T < kSummedSerialBelow ? nullptr : ex, gc, [&](std::size_t bc, unsigned worker) {
      const std::size_t idx = br * gc + bc;
      const KBlock* first = nullptr;
      std::size_t R = 0;
      for (std::size_t e = 0; e < E; ++e)
        if (const KBlock* b = plan.count(e) ? summed_at(g, e, idx) : nullptr) {
          if (!first) first = b;
          if (b->basis == first->basis) R = std::max<std::size_t>(R, b->rank);
        }
      used[bc] = first != nullptr;
      if (!first) return;
      Arena& a = w.arena[worker];
      const std::size_t m1 = a.mark();
      const std::size_t rb = first->rb;
      float* p = P + bc * T * RB;  // [T, rb]
      float* S = a.take<float>(T * R);
      std::fill(p, p + T * rb, 0.0f);
      std::fill(S, S + T * R, 0.0f);
      for (std::size_t e = 0; e < E; ++e) {
        const KBlock* b = plan.count(e) ? summed_at(g, e, idx) : nullptr;
        if (!b) continue;
        const std::size_t off = plan.offsets[e], n = plan.count(e), r = b->rank;
        const std::size_t m2 = a.mark();
        float* t = a.take_zeroed<float>(n * r);
        if (b->basis != first->basis) {  // on its own: t_i = g_i right x_i, p_i += left^T t_i
          for (std::size_t i = 0; i < n; ++i) {
            const std::size_t tok = plan.token[off + i];
            right_coeffs(*b, Xe + (off + i) * ldx + b->c0, ldx, 1, t + i * r, plan.gate[off + i], tier, a, nullptr);
            left_apply(left_view(g, *b), r, t + i * r, r, 1, p + tok * rb, rb, tier, a);
          }
        } else {
          right_coeffs(*b, Xe + off * ldx + b->c0, ldx, n, t, 1.0f, tier, a, nullptr);
          for (std::size_t i = 0; i < n; ++i) {
            float* s = S + plan.token[off + i] * R;
            const float gt = plan.gate[off + i];
            kernels::add_scaled(gt, t + i * r, s, r);
          }
        }
        a.reset(m2);
      }
      left_apply(g.bases[first->basis].view(), R, S, R, T, p, rb, tier, a);
      a.reset(m1);
    });
    for (std::size_t bc = 0; bc < gc; ++bc) {
      if (!used[bc]) continue;
      const std::size_t r0 = br * RB, rb = std::min(RB, g.rows() - r0);
      const float* p = P + bc * T * RB;
      for (std::size_t t = 0; t < T; ++t)
        kernels::add_scaled(1.0f, p + t * rb, Y + t * ldy + r0, rb);
    }
  }
  arena.reset(mark);
}

}  // namespace detail

/// Arena bytes apply_parallel needs.
inline std::size_t parallel_scratch_bytes(const KGroup& g, std::size_t n, unsigned workers) {
  return std::max(workers, 1u) * (apply_scratch_bytes(g, n) + 64) + detail::Q8Cache::bytes(g.grid, g.group_size, n);
}

/// apply() with its block rows split over an executor's workers (same result, bit for bit).
inline void apply_parallel(const KGroup& g, std::size_t e, const float* X, std::size_t ldx, std::size_t n, float* Y, std::size_t ldy,
                           Arena& arena, Executor* ex, float alpha = 1.0f, Precision tier = {}) {
  if (e >= g.members()) throw invalid_argument("morph::apply_parallel: member " + std::to_string(e) + " out of range");
  check_tier(tier);
  detail::prefetch_meta(g, e);  // as apply
  detail::seed_member_pages(g, e);
  const std::size_t mark = arena.mark();
  std::optional<detail::Q8Cache> q8c;
  if (tier.act == Activations::int8 && n > 0) q8c.emplace(g, X, ldx, n, arena);
  const detail::Q8Cache* c = q8c ? &*q8c : nullptr;
  detail::Workers w;
  detail::split_workers(arena, ex, apply_scratch_bytes(g, n), w);
  for (auto nd : g.path[e]) detail::apply_matrix_parallel(g, g.cores[nd], X, ldx, n, Y, ldy, tier, ex, w, alpha, g.replaces[e].data(), c);
  detail::apply_matrix_parallel(g, g.residuals[e], X, ldx, n, Y, ldy, tier, ex, w, alpha, nullptr, c);
  arena.reset(mark);
}

/// Arena bytes grouped_apply needs for a plan of `tokens` tokens and `routed` (token, expert) pairs.
inline std::size_t grouped_scratch_bytes(const KGroup& g, std::size_t tokens, std::size_t routed, unsigned workers) {
  const std::size_t r = g.rows(), c = g.cols(), tmax = std::max(tokens, std::size_t{1});
  return detail::union_bytes(tmax) + Arena::bytes_for<float>(tmax * c) + Arena::bytes_for<float>(tmax * r) +
         Arena::bytes_for<float>(routed * c) + Arena::bytes_for<float>(routed * r) + detail::Q8Cache::bytes(g.grid, g.group_size, tmax) +
         detail::summed_shared_bytes(g, tmax) + std::max(workers, 1u) * (apply_scratch_bytes(g, tmax) + detail::summed_worker_bytes(g, tmax) + 64);
}

/// Y[t, :] += sum over experts e routed t of gate(e, t) * W_e X[t, :]. X [n_tokens, cols] (stride
/// ldx), Y [n_tokens, rows] (stride ldy). Equal to per-expert apply up to f32 summation order;
/// with int8 activations also up to the int8 rounding of left-factor coefficients, which
/// per-expert calls of 1-2 tokens take (q8_gemv_nn) and cores over 3+ tokens do not.
inline void grouped_apply(const KGroup& g, const DispatchPlan& plan, const float* X, std::size_t ldx, float* Y, std::size_t ldy,
                          Arena& arena, Executor* ex = nullptr, Precision tier = {}) {
  detail::check_plan(plan, g.members(), "grouped_apply");
  check_tier(tier);
  {  // the cores, read first, as swiglu_apply (detail::PageSeeder)
    detail::PageSeeder seed;
    for (const auto& c : g.cores) seed(c);
  }
  detail::prefetch_routed_pages(plan, 0, {&g});  // the coefficients a stage ahead, as swiglu_apply
  const std::size_t R = g.rows(), C = g.cols(), T = std::max<std::size_t>(plan.n_tokens, 1);
  const std::size_t mark = arena.mark();
  detail::Workers w;
  detail::split_workers(arena, ex, apply_scratch_bytes(g, T) + detail::summed_worker_bytes(g, T), w);
  float* xg = arena.take<float>(T * C);
  float* yg = arena.take<float>(T * R);
  // Cores: once per token of each node's union, weighted by the summed gates.
  const Precision core = detail::core_precision(tier, plan);
  for (std::size_t nd = 0; nd < g.cores.size(); ++nd) {
    const std::size_t m2 = arena.mark();
    const auto u = detail::make_union(g.node_members[nd], plan, arena);
    if (u.n && !g.cores[nd].blocks.empty()) {
      detail::gather(X, ldx, u.list, u.n, C, xg);
      std::memset(yg, 0, u.n * R * sizeof(float));
      // int8: each grid column of the node's tokens quantized once for all its block rows (as
      // swiglu_apply; per block, a 2048-row matrix quantized its tokens 8 times)
      std::optional<detail::Q8Cache> q8c;
      if (core.act == Activations::int8) q8c.emplace(g, std::initializer_list<const KMatrix*>{&g.cores[nd]}, xg, C, u.n, arena);
      detail::apply_matrix_parallel(g, g.cores[nd], xg, C, u.n, yg, R, core, ex, w, 1.0f, nullptr, q8c ? &*q8c : nullptr);
      for (std::size_t i = 0; i < u.n; ++i) {
        float* y = Y + u.list[i] * ldy;
        const float wt = u.weight[i];
        kernels::add_scaled(wt, yg + i * R, y, R);
      }
    }
    arena.reset(m2);
  }
  // Residuals: one task per expert, outputs in the plan's order.
  float* xe = arena.take<float>(plan.routed() * C);
  float* oe = arena.take_zeroed<float>(plan.routed() * R);
  parallel_for(ex, g.members(), [&](std::size_t e, unsigned worker) {
    const std::size_t off = plan.offsets[e], n = plan.count(e);
    if (n == 0) return;
    detail::prefetch_routed_pages(plan, e + 1, {&g});
    detail::gather(X, ldx, plan.token.data() + off, n, C, xe + off * C);
    detail::apply_expert_unshared(g, e, xe + off * C, C, n, oe + off * R, R, tier, core, w.arena[worker]);
  });
  detail::prefetch_bases_pages(g);
  detail::apply_shared_summed(g, plan, xe, C, Y, ldy, tier, ex, w, arena);
  for (std::size_t i = 0; i < plan.routed(); ++i) {
    float* y = Y + plan.token[i] * ldy;
    const float gt = plan.gate[i];
    kernels::add_scaled(gt, oe + i * R, y, R);
  }
  arena.reset(mark);
}

/// A layer's SwiGLU experts: y = W2 (silu(W1 x) * (W3 x)); W1, W3 [ffn, d], W2 [d, ffn].
struct SwiGLUExperts {
  const KGroup* w1 = nullptr;
  const KGroup* w3 = nullptr;
  const KGroup* w2 = nullptr;

  std::size_t d() const noexcept { return w1->cols(); }
  std::size_t ffn() const noexcept { return w1->rows(); }
  void check() const {
    if (!w1 || !w2 || !w3) throw invalid_argument("SwiGLUExperts: w1, w3 and w2 must all be set");
    if (w3->rows() != w1->rows() || w3->cols() != w1->cols() || w2->rows() != w1->cols() || w2->cols() != w1->rows())
      throw invalid_argument("SwiGLUExperts: shapes disagree (w1, w3 [ffn, d], w2 [d, ffn]): " + w1->name + ", " + w3->name + ", " + w2->name);
    if (w1->members() != w3->members() || w1->members() != w2->members())
      throw invalid_argument("SwiGLUExperts: w1, w3 and w2 have different expert counts");
  }
};

/// Pools a layer's matrices into one allocation (KMatrix::pool_together) in the order
/// swiglu_apply reads them: the w1 and w3 cores, their bases (read by the residuals' shared
/// blocks), then per expert its w1, w3 and w2 residuals, then w2's bases (read once for all
/// experts, apply_shared_summed), then the w2 cores. Same values, same results bit for bit; a
/// cold layer then reads one region rather than one per matrix wherever the allocator put it (the
/// real tinymoe layer, one thread: one token 0.78-1.00x the time, eight 0.87-1.02x, 32 unchanged;
/// bench/RESULTS.md "One allocation per layer"). Call it once after loading; a copy of a group
/// pools its matrices on their own again and owns its bases' arrays.
inline void pool_layer(KGroup& w1, KGroup& w3, KGroup& w2) {
  SwiGLUExperts{&w1, &w3, &w2}.check();
  std::vector<detail::PoolRun> runs;
  for (KGroup* g : {&w1, &w3})
    for (auto& c : g->cores) runs.push_back(c.pool_run());
  for (KGroup* g : {&w1, &w3}) runs.push_back(g->bases_run());
  for (std::size_t e = 0; e < w1.members(); ++e)
    for (KGroup* g : {&w1, &w3, &w2}) runs.push_back(g->residuals[e].pool_run());
  runs.push_back(w2.bases_run());
  for (auto& c : w2.cores) runs.push_back(c.pool_run());
  detail::lay_out_pools(runs, "morph::pool_layer (one group passed twice?)");
}

inline std::size_t swiglu_scratch_bytes(const SwiGLUExperts& L, std::size_t tokens, std::size_t routed, unsigned workers) {
  L.check();
  const std::size_t d = L.d(), f = L.ffn(), T = std::max<std::size_t>(tokens, 1);
  const std::size_t nodes = L.w1->cores.size() + L.w3->cores.size();
  std::size_t per_worker = 0, q8 = 0;  // q8: swiglu_apply's int8 cache of a node's tokens
  for (const KGroup* g : {L.w1, L.w3, L.w2}) {
    per_worker = std::max(per_worker, apply_scratch_bytes(*g, T));
    q8 = std::max(q8, detail::Q8Cache::bytes(g->grid, g->group_size, T));
  }
  per_worker = std::max(per_worker, apply_scratch_bytes(*L.w2, T) + detail::summed_worker_bytes(*L.w2, T));
  return q8 + detail::summed_shared_bytes(*L.w2, T) + nodes * (detail::union_bytes(T) + Arena::bytes_for<float>(T * f)) + detail::union_bytes(T) +
         Arena::bytes_for<float>(T * d) + Arena::bytes_for<float>(T * f) + Arena::bytes_for<float>(T * d) +
         Arena::bytes_for<float>(routed * d) * 2 + Arena::bytes_for<float>(routed * f) * 2 + std::max(workers, 1u) * (per_worker + 64);
}

/// Y[t, :] += sum over experts e routed t of gate(e, t) * FFN_e(X[t, :]).
inline void swiglu_apply(const SwiGLUExperts& L, const DispatchPlan& plan, const float* X, std::size_t ldx, float* Y, std::size_t ldy,
                         Arena& arena, Executor* ex = nullptr, Precision tier = {}) {
  L.check();
  detail::check_plan(plan, L.w1->members(), "swiglu_apply");
  check_tier(tier);
  // the routed experts' residual metadata (as apply), met after the w1 / w3 cores: its misses
  // overlap each other and the cores' work instead of stalling each expert in turn
  for (std::size_t e = 0; e < plan.n_experts(); ++e)
    if (plan.count(e))
      for (const KGroup* g : {L.w1, L.w3, L.w2}) detail::prefetch_meta(g->residuals[e]);
  {  // the w1 and w3 cores, read first, at the start (detail::PageSeeder)
    detail::PageSeeder seed;
    for (const KGroup* g : {L.w1, L.w3})
      for (const auto& c : g->cores) seed(c);
  }
  // The coefficients a stage ahead (detail::prefetch_pages, which gives the measurements): the
  // first routed expert's residuals while the cores run, the next routed expert's while one runs,
  // w2's bases and cores before the shared-basis sum (it reads the experts' right factors first,
  // each basis after them, the cores come last).
  detail::prefetch_routed_pages(plan, 0, {L.w1, L.w3, L.w2});
  const std::size_t d = L.d(), f = L.ffn(), T = std::max<std::size_t>(plan.n_tokens, 1);
  const std::size_t mark = arena.mark();
  std::size_t per_worker = apply_scratch_bytes(*L.w2, T) + detail::summed_worker_bytes(*L.w2, T);
  for (const KGroup* g : {L.w1, L.w3}) per_worker = std::max(per_worker, apply_scratch_bytes(*g, T));
  detail::Workers w;
  detail::split_workers(arena, ex, per_worker, w);
  float* xg = arena.take<float>(T * d);

  // 1. w1 / w3 cores: once per (node, token), kept for the experts.
  struct NodeOut {
    detail::Union u;
    float* out;
  };
  // Small fixed-size tables (no allocation): nodes per group are bounded by the member count.
  constexpr std::size_t kMaxNodes = 512;
  if (L.w1->cores.size() > kMaxNodes || L.w3->cores.size() > kMaxNodes || L.w2->cores.size() > kMaxNodes)
    throw invalid_argument("swiglu_apply: more than 512 core nodes");
  union NodeTable {  // entries [0, cores) are constructed by run_cores; the rest never are
    NodeTable() noexcept {}  // (value-initializing 2 x 512 entries was ~0.5 us of an 8-token layer)
    NodeOut v[kMaxNodes];
  } t1, t3;
  NodeOut* const n1s = t1.v;
  NodeOut* const n3s = t3.v;
  const Precision core = detail::core_precision(tier, plan);
  auto run_cores = [&](const KGroup& g, NodeOut* outs) {
    for (std::size_t nd = 0; nd < g.cores.size(); ++nd) {
      NodeOut o{detail::make_union(g.node_members[nd], plan, arena), nullptr};
      o.out = arena.take_zeroed<float>(o.u.n * f);
      if (o.u.n && !g.cores[nd].blocks.empty()) {
        detail::gather(X, ldx, o.u.list, o.u.n, d, xg);
        // int8: each grid column of the node's tokens quantized once for all its block rows
        const std::size_t m1 = arena.mark();
        std::optional<detail::Q8Cache> q8c;
        if (core.act == Activations::int8) q8c.emplace(g, std::initializer_list<const KMatrix*>{&g.cores[nd]}, xg, d, o.u.n, arena);
        detail::apply_matrix_parallel(g, g.cores[nd], xg, d, o.u.n, o.out, f, core, ex, w, 1.0f, nullptr, q8c ? &*q8c : nullptr);
        arena.reset(m1);
      }
      std::construct_at(outs + nd, o);
    }
  };
  run_cores(*L.w1, n1s);
  run_cores(*L.w3, n3s);

  // 2. Experts: h = silu(w1 x) * (w3 x) from the shared core outputs plus residuals; o = R2 h.
  const std::size_t routed = plan.routed();
  float* xe = arena.take<float>(routed * d);
  float* h1 = arena.take<float>(routed * f);  // every routed pair's rows are written by its expert
  float* h3 = arena.take<float>(routed * f);
  float* oe = arena.take_zeroed<float>(routed * d);
  parallel_for(ex, plan.n_experts(), [&](std::size_t e, unsigned worker) {
    const std::size_t off = plan.offsets[e], n = plan.count(e);
    if (n == 0) return;
    detail::prefetch_routed_pages(plan, e + 1, {L.w1, L.w3, L.w2});
    Arena& a = w.arena[worker];
    const float* x = xe + off * d;
    detail::gather(X, ldx, plan.token.data() + off, n, d, xe + off * d);
    auto hidden = [&](const KGroup& g, const NodeOut* outs, float* h, const detail::Q8Cache* q8c) {
      bool first = true;  // h starts as the first node's output (a copy, not zeroing and adding)
      for (auto nd : g.path[e]) {
        const NodeOut& o = outs[nd];
        for (std::size_t i = 0; i < n; ++i) {
          const float* src = o.out + o.u.pos[plan.token[off + i]] * f;
          float* dst = h + i * f;
          if (first) std::memcpy(dst, src, f * sizeof(float));
          else
            kernels::add_scaled(1.0f, src, dst, f);
        }
        first = false;
      }
      if (first) std::memset(h, 0, n * f * sizeof(float));  // no cores on e's path
      apply_matrix(g, g.residuals[e], x, d, n, h, f, 1.0f, tier, a, nullptr, q8c);
      detail::unapply_replaced(g, e, x, d, n, h, f, core, a);
    };
    float* a1 = h1 + off * f;
    float* a3 = h3 + off * f;
    // int8: the expert's tokens quantized once per grid column for every block row of w1's and
    // (same grid) w3's residuals, not once per block (q8_quantize was 10 % of a 32-token layer)
    const std::size_t am = a.mark();
    std::optional<detail::Q8Cache> q8x;
    const bool share = L.w3->grid.block_cols == L.w1->grid.block_cols && L.w3->group_size == L.w1->group_size;
    if (tier.act == Activations::int8)  // (only the containers the two residuals meet x in)
      q8x.emplace(*L.w1, std::initializer_list<const KMatrix*>{&L.w1->residuals[e], share ? &L.w3->residuals[e] : nullptr}, x, d, n, a);
    hidden(*L.w1, n1s, a1, q8x ? &*q8x : nullptr);
    hidden(*L.w3, n3s, a3, q8x && share ? &*q8x : nullptr);
    a.reset(am);
    kernels::swiglu(a1, a3, a1, n * f);
    detail::apply_expert_unshared(*L.w2, e, a1, f, n, oe + off * d, d, tier, core, a);
  });
  detail::prefetch_bases_pages(*L.w2);
  for (const auto& c : L.w2->cores) detail::prefetch_pages(c);
  // w2's shared-basis residual blocks: summed across experts in coefficient space, into Y
  detail::apply_shared_summed(*L.w2, plan, h1, f, Y, ldy, tier, ex, w, arena);

  // 3. w2 cores: once per token on the gate-weighted sum of its members' hidden states.
  float* hs = h3;  // h3 is no longer needed: reuse it as [T, f] for the weighted sums
  float* yg = arena.take<float>(T * d);
  for (std::size_t nd = 0; nd < L.w2->cores.size(); ++nd) {
    const std::size_t m2 = arena.mark();
    const auto u = detail::make_union(L.w2->node_members[nd], plan, arena);
    if (u.n && !L.w2->cores[nd].blocks.empty()) {
      std::memset(hs, 0, u.n * f * sizeof(float));
      for (auto e : L.w2->node_members[nd])
        for (std::size_t i = plan.offsets[e]; i < plan.offsets[e + 1]; ++i) {
          float* dst = hs + u.pos[plan.token[i]] * f;
          const float* src = h1 + i * f;
          const float gt = plan.gate[i];
          kernels::add_scaled(gt, src, dst, f);
        }
      std::memset(yg, 0, u.n * d * sizeof(float));
      std::optional<detail::Q8Cache> q8c;  // (int8: as the w1 / w3 cores; w2 of a 4096-wide model has 16 block rows)
      if (core.act == Activations::int8) q8c.emplace(*L.w2, std::initializer_list<const KMatrix*>{&L.w2->cores[nd]}, hs, f, u.n, arena);
      detail::apply_matrix_parallel(*L.w2, L.w2->cores[nd], hs, f, u.n, yg, d, core, ex, w, 1.0f, nullptr, q8c ? &*q8c : nullptr);
      for (std::size_t i = 0; i < u.n; ++i) {
        float* y = Y + u.list[i] * ldy;
        kernels::add_scaled(1.0f, yg + i * d, y, d);
      }
    }
    arena.reset(m2);
  }
  // 4. Residual outputs, gate-weighted, in plan order.
  for (std::size_t i = 0; i < routed; ++i) {
    float* y = Y + plan.token[i] * ldy;
    const float gt = plan.gate[i];
    kernels::add_scaled(gt, oe + i * d, y, d);
  }
  arena.reset(mark);
}

}  // namespace s2lc::morph
