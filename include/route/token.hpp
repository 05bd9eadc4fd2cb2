// s2lc — token routers: from hidden states and a gate weight to a dispatch plan.
//
//   std::vector<float> logits(T * E);
//   s2lc::route::router_logits(X, d, T, gate, E, d, logits.data());     // Highway GEMM
//   auto r = s2lc::route::TopK{2}.route(logits.data(), T, E);           // Mixtral
//   s2lc::route::apply_capacity(r, {.factor = 1.25}, logits.data());    // optional
//   s2lc::DispatchPlan plan = r.plan();                                 // -> grouped_apply
//
// Every router reads logits [T, E] (row-major, one row per token) and returns a Routing: per
// token up to `slots` (expert, gate) pairs, best first, -1 for an empty slot. Results are a pure
// function of the inputs (and of the seed for the noisy router): no global state, and the same
// with or without an executor.
//
// Ties are broken deterministically and the same way everywhere: between equal scores the lower
// expert index ranks first (expert-choice: the lower token index). NaN and +inf logits are
// rejected; -inf masks an expert (it is chosen only when k exceeds the finite logits).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "morph/parallel.hpp"
#include "s2lc/error.hpp"
#include "s2lc/kernels/qgemm.hpp"
#include "s2lc/plan.hpp"

namespace s2lc::route {

using morph::Executor;

/// Per-token routing decisions: token t's slot j holds expert[t * slots + j] (-1: empty) with
/// gate[t * slots + j]; filled slots come first, in descending router preference.
struct Routing {
  std::size_t n_tokens = 0;
  std::size_t n_experts = 0;
  std::size_t slots = 0;
  std::vector<std::int32_t> expert;
  std::vector<float> gate;

  static Routing empty(std::size_t tokens, std::size_t experts, std::size_t slots) {
    Routing r;
    r.n_tokens = tokens, r.n_experts = experts, r.slots = slots;
    r.expert.assign(tokens * slots, -1);
    r.gate.assign(tokens * slots, 0.0f);
    return r;
  }
  /// Experts token t is routed to.
  std::size_t active(std::size_t t) const noexcept {
    std::size_t n = 0;
    for (std::size_t j = 0; j < slots; ++j) n += expert[t * slots + j] >= 0;
    return n;
  }
  /// (token, expert) pairs in total.
  std::size_t routed() const noexcept {
    return static_cast<std::size_t>(std::count_if(expert.begin(), expert.end(), [](std::int32_t e) { return e >= 0; }));
  }
  double mean_active() const noexcept { return n_tokens ? static_cast<double>(routed()) / static_cast<double>(n_tokens) : 0.0; }
  /// The CSR plan grouped apply consumes (empty slots skipped; token order inside each expert).
  DispatchPlan plan() const { return DispatchPlan::from_topk(n_experts, n_tokens, slots, expert.data(), gate.data()); }
};

namespace detail {

inline constexpr std::size_t kChunk = 128;  ///< tokens per task (fixed: results never depend on it)

inline void check_logits(const float* logits, std::size_t T, std::size_t E, const char* who) {
  if (E == 0) throw invalid_argument(std::string(who) + ": no experts");
  if (T > 0 && logits == nullptr) throw invalid_argument(std::string(who) + ": logits is null");
  if (E > static_cast<std::size_t>(std::numeric_limits<std::int32_t>::max()))
    throw invalid_argument(std::string(who) + ": too many experts");
  for (std::size_t i = 0; i < T * E; ++i)
    if (std::isnan(logits[i]) || logits[i] == std::numeric_limits<float>::infinity())
      throw invalid_argument(std::string(who) + ": logit of token " + std::to_string(i / E) + ", expert " + std::to_string(i % E) +
                             (std::isnan(logits[i]) ? " is NaN" : " is +inf"));
}

/// True when (a, ia) ranks before (b, ib): higher score first, then lower index.
inline bool before(float a, std::size_t ia, float b, std::size_t ib) noexcept { return a > b || (a == b && ia < ib); }

/// The k best of s[0, n) by `before`, best first, into idx[0, k). k <= n.
inline void top_k(const float* s, std::size_t n, std::size_t k, std::uint32_t* idx) {
  std::size_t have = 0;
  for (std::size_t e = 0; e < n; ++e) {
    if (have == k && !before(s[e], e, s[idx[k - 1]], idx[k - 1])) continue;
    std::size_t pos = have < k ? have++ : k - 1;
    while (pos > 0 && before(s[e], e, s[idx[pos - 1]], idx[pos - 1])) {
      idx[pos] = idx[pos - 1];
      --pos;
    }
    idx[pos] = static_cast<std::uint32_t>(e);
  }
}

/// All of s[0, n) ranked by `before`.
inline void rank_all(const float* s, std::size_t n, std::uint32_t* idx) {
  std::iota(idx, idx + n, 0u);
  std::sort(idx, idx + n, [s](std::uint32_t a, std::uint32_t b) { return before(s[a], a, s[b], b); });
}

/// Softmax of x[0, n) into p (float; max-subtracted).
inline void softmax(const float* x, std::size_t n, float* p) {
  float m = -std::numeric_limits<float>::infinity();
  for (std::size_t i = 0; i < n; ++i) m = std::max(m, x[i]);
  if (std::isinf(m) && m < 0) {  // every logit -inf: uniform
    for (std::size_t i = 0; i < n; ++i) p[i] = 1.0f / static_cast<float>(n);
    return;
  }
  double s = 0;
  for (std::size_t i = 0; i < n; ++i) s += p[i] = std::exp(x[i] - m);
  const float inv = static_cast<float>(1.0 / s);
  for (std::size_t i = 0; i < n; ++i) p[i] *= inv;
}

/// Softmax over the selected logits x[idx[0..k)] into g[0..k).
inline void softmax_selected(const float* x, const std::uint32_t* idx, std::size_t k, float* g) {
  const float m = x[idx[0]];
  double s = 0;
  for (std::size_t j = 0; j < k; ++j) s += g[j] = std::isinf(m) ? 1.0f : std::exp(x[idx[j]] - m);
  const float inv = static_cast<float>(1.0 / s);
  for (std::size_t j = 0; j < k; ++j) g[j] *= inv;
}

template <class F>
void for_chunks(Executor* ex, std::size_t T, F&& f) {
  const std::size_t n = (T + kChunk - 1) / kChunk;
  morph::parallel_for(ex, n, [&](std::size_t c, unsigned) { f(c * kChunk, std::min(T, (c + 1) * kChunk)); });
}

/// splitmix64: the counter-based generator behind the noisy router (no state between calls).
inline std::uint64_t mix64(std::uint64_t z) noexcept {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/// A standard normal drawn from (seed, stream, token, expert) alone (Box-Muller).
inline float normal_at(std::uint64_t seed, std::uint64_t stream, std::size_t t, std::size_t e) noexcept {
  const std::uint64_t h = mix64(mix64(mix64(seed) ^ stream) ^ (static_cast<std::uint64_t>(t) << 20 ^ e));
  const double u1 = (static_cast<double>(h >> 40) + 0.5) / 16777216.0;              // (0, 1)
  const double u2 = static_cast<double>(mix64(h) >> 40) / 16777216.0;               // [0, 1)
  return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
}

inline float softplus(float x) noexcept { return x > 20.0f ? x : std::log1p(std::exp(x)); }
inline float sigmoid(float x) noexcept { return 1.0f / (1.0f + std::exp(-x)); }

}  // namespace detail

/// Router logits: logits[t, e] = sum_k gate[e, k] x[t, k]. x [T, d] (row stride ldx), gate [E, d]
/// (row stride ldg; Hugging Face `...gate.weight` layout), logits [T, E] dense. The GEMM is the
/// Highway gemm_nt kernel; tokens are split in fixed chunks, so threads do not change results.
inline void router_logits(const float* x, std::size_t ldx, std::size_t T, const float* gate, std::size_t ldg, std::size_t E,
                          std::size_t d, float* logits, Executor* ex = nullptr) {
  if (E == 0 || d == 0) throw invalid_argument("router_logits: no experts or zero hidden size");
  if (ldx < d || ldg < d) throw invalid_argument("router_logits: row stride smaller than the hidden size");
  std::fill(logits, logits + T * E, 0.0f);
  detail::for_chunks(ex, T, [&](std::size_t t0, std::size_t t1) {
    kernels::gemm_nt(gate, ldg, E, x + t0 * ldx, ldx, t1 - t0, d, 1.0f, logits + t0 * E, E);
  });
}

/// Softmax top-k. normalize = true (Mixtral, Qwen-MoE norm_topk_prob): the gates are the softmax
/// over the k selected logits (= the full softmax renormalised over them). normalize = false
/// (Switch / GShard): the gates are the full softmax probabilities of the selected experts.
struct TopK {
  std::size_t k = 2;
  bool normalize = true;

  Routing route(const float* logits, std::size_t T, std::size_t E, Executor* ex = nullptr) const {
    detail::check_logits(logits, T, E, "TopK");
    if (k == 0 || k > E) throw invalid_argument("TopK: k = " + std::to_string(k) + " must be in [1, " + std::to_string(E) + "]");
    Routing r = Routing::empty(T, E, k);
    detail::for_chunks(ex, T, [&](std::size_t t0, std::size_t t1) {
      std::vector<std::uint32_t> idx(k);
      std::vector<float> p(normalize ? 0 : E);
      for (std::size_t t = t0; t < t1; ++t) {
        const float* l = logits + t * E;
        detail::top_k(l, E, k, idx.data());
        float* g = r.gate.data() + t * k;
        if (normalize) {
          detail::softmax_selected(l, idx.data(), k, g);
        } else {
          detail::softmax(l, E, p.data());
          for (std::size_t j = 0; j < k; ++j) g[j] = p[idx[j]];
        }
        for (std::size_t j = 0; j < k; ++j) r.expert[t * k + j] = static_cast<std::int32_t>(idx[j]);
      }
    });
    return r;
  }
};

/// Noisy top-k gating (Shazeer et al. 2017): H = logits + N(0, 1) * sigma, sigma =
/// softplus(noise_logits) when the caller passes x W_noise (same layout as the logits) or the
/// constant `noise_std` otherwise; the k best of H are kept and the gates are the softmax over
/// their noisy values. The noise is a pure function of (seed, stream, token, expert): bump
/// `stream` per step for fresh noise. With train = false no noise is added (= TopK).
struct NoisyTopK {
  std::size_t k = 2;
  float noise_std = 1.0f;
  std::uint64_t seed = 0;
  std::uint64_t stream = 0;
  bool train = true;

  Routing route(const float* logits, std::size_t T, std::size_t E, Executor* ex = nullptr,
                const float* noise_logits = nullptr) const {
    detail::check_logits(logits, T, E, "NoisyTopK");
    if (k == 0 || k > E) throw invalid_argument("NoisyTopK: k = " + std::to_string(k) + " must be in [1, " + std::to_string(E) + "]");
    if (!(noise_std >= 0.0f) || !std::isfinite(noise_std)) throw invalid_argument("NoisyTopK: noise_std must be finite and >= 0");
    if (train && noise_logits) detail::check_logits(noise_logits, T, E, "NoisyTopK noise");
    Routing r = Routing::empty(T, E, k);
    detail::for_chunks(ex, T, [&](std::size_t t0, std::size_t t1) {
      std::vector<std::uint32_t> idx(k);
      std::vector<float> h(E);
      for (std::size_t t = t0; t < t1; ++t) {
        const float* l = logits + t * E;
        for (std::size_t e = 0; e < E; ++e) {
          h[e] = l[e];
          if (train) {
            const float sigma = noise_logits ? detail::softplus(noise_logits[t * E + e]) : noise_std;
            h[e] += sigma * detail::normal_at(seed, stream, t, e);
          }
        }
        detail::top_k(h.data(), E, k, idx.data());
        detail::softmax_selected(h.data(), idx.data(), k, r.gate.data() + t * k);
        for (std::size_t j = 0; j < k; ++j) r.expert[t * k + j] = static_cast<std::int32_t>(idx[j]);
      }
    });
    return r;
  }
};

/// Top-p (confidence-threshold) routing: experts in descending softmax probability until their
/// cumulative probability reaches p, then clamped to [min_k, max_k] (max_k = 0: all experts).
/// p >= 1 selects max_k experts; p -> 0 selects min_k (= top-1 with the default). Gates are the
/// probabilities renormalised over the selection (normalize = false: the raw probabilities).
/// The cumulative sum runs in double over the float probabilities, in rank order.
struct TopP {
  double p = 0.5;
  std::size_t min_k = 1;
  std::size_t max_k = 0;
  bool normalize = true;

  std::size_t cap(std::size_t E) const noexcept { return max_k == 0 ? E : std::min(max_k, E); }

  Routing route(const float* logits, std::size_t T, std::size_t E, Executor* ex = nullptr) const {
    detail::check_logits(logits, T, E, "TopP");
    if (!(p >= 0.0) || !std::isfinite(p)) throw invalid_argument("TopP: p must be finite and >= 0");
    const std::size_t hi = cap(E);
    if (min_k == 0 || min_k > hi)
      throw invalid_argument("TopP: min_k = " + std::to_string(min_k) + " must be in [1, max_k = " + std::to_string(hi) + "]");
    Routing r = Routing::empty(T, E, hi);
    detail::for_chunks(ex, T, [&](std::size_t t0, std::size_t t1) {
      std::vector<std::uint32_t> idx(E);
      std::vector<float> pr(E);
      for (std::size_t t = t0; t < t1; ++t) {
        detail::softmax(logits + t * E, E, pr.data());
        detail::rank_all(pr.data(), E, idx.data());
        std::size_t n = 0;
        if (p >= 1.0) {
          n = hi;
        } else {
          double cum = 0;
          while (n < hi && (n < min_k || cum < p)) cum += pr[idx[n++]];
        }
        double s = 0;
        for (std::size_t j = 0; j < n; ++j) s += pr[idx[j]];
        const float inv = normalize && s > 0 ? static_cast<float>(1.0 / s) : 1.0f;
        for (std::size_t j = 0; j < n; ++j) {
          r.expert[t * hi + j] = static_cast<std::int32_t>(idx[j]);
          r.gate[t * hi + j] = pr[idx[j]] * inv;
        }
      }
    });
    return r;
  }
};

/// Sigmoid scores with a per-expert selection bias (DeepSeek-V3): s = sigmoid(logits); experts
/// are chosen by s + bias (bias only steers selection: auxiliary-loss-free load balancing), the
/// gates are s of the chosen experts, divided by their sum when `normalize`, times `scale`
/// (routed_scaling_factor). Group-limited routing: experts split into n_groups equal groups,
/// a group scores the sum of its two best s + bias, only the topk_groups best groups compete.
struct SigmoidBias {
  std::size_t k = 8;
  std::vector<float> bias;       ///< E entries, or empty for none
  std::size_t n_groups = 1;
  std::size_t topk_groups = 1;
  bool normalize = true;
  float scale = 1.0f;

  Routing route(const float* logits, std::size_t T, std::size_t E, Executor* ex = nullptr) const {
    detail::check_logits(logits, T, E, "SigmoidBias");
    if (!bias.empty() && bias.size() != E)
      throw invalid_argument("SigmoidBias: bias has " + std::to_string(bias.size()) + " entries for " + std::to_string(E) + " experts");
    if (n_groups == 0 || E % n_groups != 0)
      throw invalid_argument("SigmoidBias: " + std::to_string(E) + " experts do not split into " + std::to_string(n_groups) + " groups");
    const std::size_t per = E / n_groups, groups = n_groups == 1 ? 1 : topk_groups;
    if (groups == 0 || groups > n_groups) throw invalid_argument("SigmoidBias: topk_groups must be in [1, n_groups]");
    if (k == 0 || k > groups * per)
      throw invalid_argument("SigmoidBias: k = " + std::to_string(k) + " must be in [1, " + std::to_string(groups * per) + "]");
    if (n_groups > 1 && per < 2) throw invalid_argument("SigmoidBias: group-limited routing needs at least 2 experts per group");
    Routing r = Routing::empty(T, E, k);
    detail::for_chunks(ex, T, [&](std::size_t t0, std::size_t t1) {
      std::vector<float> s(E), c(E), gs(n_groups);
      std::vector<std::uint32_t> idx(k), top2(2), gidx(groups);
      for (std::size_t t = t0; t < t1; ++t) {
        for (std::size_t e = 0; e < E; ++e) {
          s[e] = detail::sigmoid(logits[t * E + e]);
          c[e] = s[e] + (bias.empty() ? 0.0f : bias[e]);
        }
        if (n_groups > 1) {
          for (std::size_t gi = 0; gi < n_groups; ++gi) {
            detail::top_k(c.data() + gi * per, per, 2, top2.data());
            gs[gi] = c[gi * per + top2[0]] + c[gi * per + top2[1]];
          }
          detail::top_k(gs.data(), n_groups, groups, gidx.data());
          std::vector<bool> keep(n_groups, false);
          for (auto gi : gidx) keep[gi] = true;
          for (std::size_t e = 0; e < E; ++e)
            if (!keep[e / per]) c[e] = -std::numeric_limits<float>::infinity();
        }
        detail::top_k(c.data(), E, k, idx.data());
        double sum = 0;
        for (std::size_t j = 0; j < k; ++j) sum += s[idx[j]];
        const float mul = normalize ? static_cast<float>(scale / (sum + 1e-20)) : scale;
        for (std::size_t j = 0; j < k; ++j) {
          r.expert[t * k + j] = static_cast<std::int32_t>(idx[j]);
          r.gate[t * k + j] = s[idx[j]] * mul;
        }
      }
    });
    return r;
  }

  /// Auxiliary-loss-free balancing step: bias_e += rate * sign(mean load - load_e).
  void update_bias(const std::vector<std::size_t>& load, float rate) {
    if (bias.empty()) bias.assign(load.size(), 0.0f);
    if (load.size() != bias.size()) throw invalid_argument("SigmoidBias::update_bias: load and bias sizes differ");
    double mean = 0;
    for (auto l : load) mean += static_cast<double>(l);
    mean /= static_cast<double>(std::max<std::size_t>(load.size(), 1));
    for (std::size_t e = 0; e < load.size(); ++e) {
      const double l = static_cast<double>(load[e]);
      bias[e] += l < mean ? rate : (l > mean ? -rate : 0.0f);
    }
  }
};

/// Expert-choice routing (Zhou et al. 2022): every expert takes its capacity c = ceil(factor *
/// T / E) (at most T) tokens with the highest softmax probability (over experts, per token);
/// the gate is that probability. Ties: the lower token index first. A token may get 0..E experts;
/// its slots list them by descending probability.
struct ExpertChoice {
  double capacity_factor = 2.0;

  std::size_t capacity(std::size_t T, std::size_t E) const noexcept {
    const double c = std::ceil(capacity_factor * static_cast<double>(T) / static_cast<double>(E));
    return std::min(T, static_cast<std::size_t>(std::max(c, 0.0)));
  }

  Routing route(const float* logits, std::size_t T, std::size_t E, Executor* ex = nullptr) const {
    detail::check_logits(logits, T, E, "ExpertChoice");
    if (!(capacity_factor > 0.0) || !std::isfinite(capacity_factor)) throw invalid_argument("ExpertChoice: capacity_factor must be > 0");
    const std::size_t c = capacity(T, E);
    std::vector<float> probT(E * T);  // [E, T]
    detail::for_chunks(ex, T, [&](std::size_t t0, std::size_t t1) {
      std::vector<float> p(E);
      for (std::size_t t = t0; t < t1; ++t) {
        detail::softmax(logits + t * E, E, p.data());
        for (std::size_t e = 0; e < E; ++e) probT[e * T + t] = p[e];
      }
    });
    std::vector<std::uint32_t> chosen(E * c);
    morph::parallel_for(ex, E, [&](std::size_t e, unsigned) {
      if (c) detail::top_k(probT.data() + e * T, T, c, chosen.data() + e * c);
    });
    std::vector<std::size_t> count(T, 0);
    for (auto t : chosen) ++count[t];
    const std::size_t slots = T ? *std::max_element(count.begin(), count.end()) : 0;
    Routing r = Routing::empty(T, E, std::max<std::size_t>(slots, 1));
    std::fill(count.begin(), count.end(), 0);
    for (std::size_t e = 0; e < E; ++e)
      for (std::size_t i = 0; i < c; ++i) {
        const std::size_t t = chosen[e * c + i], j = count[t]++;
        r.expert[t * r.slots + j] = static_cast<std::int32_t>(e);
        r.gate[t * r.slots + j] = probT[e * T + t];
      }
    // Slots by descending probability (then expert index).
    for (std::size_t t = 0; t < T; ++t) {
      std::int32_t* ids = r.expert.data() + t * r.slots;
      float* g = r.gate.data() + t * r.slots;
      const std::size_t n = count[t];
      for (std::size_t a = 1; a < n; ++a)
        for (std::size_t b = a; b > 0 && detail::before(g[b], static_cast<std::size_t>(ids[b]), g[b - 1], static_cast<std::size_t>(ids[b - 1])); --b) {
          std::swap(g[b], g[b - 1]);
          std::swap(ids[b], ids[b - 1]);
        }
    }
    return r;
  }
};

/// What happens to a (token, expert) assignment beyond the expert's capacity.
enum class Overflow {
  drop,              ///< removed; the token keeps its other experts' gates as they were
  drop_renormalize,  ///< removed; the token's surviving gates are rescaled to the original sum
  reroute,           ///< moved, with its gate, to the token's best-logit expert that has room
};
/// The order in which assignments claim capacity (all first choices, then all second choices...).
enum class Priority {
  token_order,  ///< earlier tokens first (Switch Transformer)
  score,        ///< higher gate first, then earlier token (batch-prioritized routing)
};

struct Capacity {
  double factor = 1.25;          ///< capacity = ceil(factor * assignments / E)
  std::size_t min_capacity = 1;
  Overflow overflow = Overflow::drop;
  Priority priority = Priority::token_order;

  std::size_t capacity(std::size_t assignments, std::size_t E) const noexcept {
    const double c = std::ceil(factor * static_cast<double>(assignments) / static_cast<double>(E));
    return std::max(min_capacity, static_cast<std::size_t>(std::max(c, 0.0)));
  }
};

struct CapacityReport {
  std::size_t capacity = 0;   ///< per expert
  std::size_t dropped = 0;    ///< assignments removed
  std::size_t rerouted = 0;   ///< assignments moved to another expert
  std::size_t unrouted_tokens = 0;  ///< tokens that lost every expert in this call (load_stats counts all)
};

/// Enforces an expert capacity on a Routing in place (see Overflow, Priority). `logits` [T, E] is
/// needed for Overflow::reroute (candidate order) and may be null otherwise. Afterwards filled
/// slots still come first.
inline CapacityReport apply_capacity(Routing& r, const Capacity& cap, const float* logits = nullptr) {
  if (!(cap.factor > 0.0) || !std::isfinite(cap.factor)) throw invalid_argument("apply_capacity: factor must be > 0");
  if (cap.overflow == Overflow::reroute && logits == nullptr) throw invalid_argument("apply_capacity: rerouting needs the logits");
  const std::size_t T = r.n_tokens, E = r.n_experts, S = r.slots;
  CapacityReport rep;
  rep.capacity = cap.capacity(r.routed(), E);
  std::vector<std::size_t> load(E, 0);
  std::vector<double> before_sum(T, 0.0);
  for (std::size_t t = 0; t < T; ++t)
    for (std::size_t j = 0; j < S; ++j)
      if (r.expert[t * S + j] >= 0) before_sum[t] += r.gate[t * S + j];
  std::vector<std::uint32_t> order(T), cand(E);
  std::vector<bool> lost(T, false);
  for (std::size_t j = 0; j < S; ++j) {
    std::iota(order.begin(), order.end(), 0u);
    if (cap.priority == Priority::score)
      std::stable_sort(order.begin(), order.end(), [&](std::uint32_t a, std::uint32_t b) { return r.gate[a * S + j] > r.gate[b * S + j]; });
    for (std::uint32_t t : order) {
      std::int32_t& e = r.expert[t * S + j];
      if (e < 0) continue;
      if (load[static_cast<std::size_t>(e)] < rep.capacity) {
        ++load[static_cast<std::size_t>(e)];
        continue;
      }
      if (cap.overflow == Overflow::reroute) {
        detail::rank_all(logits + t * E, E, cand.data());
        std::int32_t to = -1;
        for (std::uint32_t c : cand) {
          if (load[c] >= rep.capacity) continue;
          bool taken = false;
          for (std::size_t i = 0; i < S; ++i) taken |= r.expert[t * S + i] == static_cast<std::int32_t>(c);
          if (!taken) {
            to = static_cast<std::int32_t>(c);
            break;
          }
        }
        if (to >= 0) {
          e = to;
          ++load[static_cast<std::size_t>(to)];
          ++rep.rerouted;
          continue;
        }
      }
      e = -1;
      r.gate[t * S + j] = 0.0f;
      ++rep.dropped;
      lost[t] = true;
    }
  }
  for (std::size_t t = 0; t < T; ++t) {
    if (!lost[t]) continue;
    // Compact: filled slots first, order kept.
    std::size_t w = 0;
    double after = 0;
    for (std::size_t j = 0; j < S; ++j)
      if (r.expert[t * S + j] >= 0) {
        r.expert[t * S + w] = r.expert[t * S + j];
        r.gate[t * S + w] = r.gate[t * S + j];
        after += r.gate[t * S + w];
        ++w;
      }
    for (std::size_t j = w; j < S; ++j) r.expert[t * S + j] = -1, r.gate[t * S + j] = 0.0f;
    if (w == 0) ++rep.unrouted_tokens;
    if (cap.overflow == Overflow::drop_renormalize && w > 0 && after > 0) {
      const float mul = static_cast<float>(before_sum[t] / after);
      for (std::size_t j = 0; j < w; ++j) r.gate[t * S + j] *= mul;
    }
  }
  return rep;
}

/// Monitoring: per-expert load and how peaked the router is.
struct LoadStats {
  std::vector<std::size_t> load;    ///< assignments per expert
  std::vector<double> importance;   ///< mean softmax probability per expert (needs logits)
  std::size_t tokens = 0, routed = 0, unrouted_tokens = 0;
  double mean_experts = 0;          ///< assignments per token
  double max_over_mean = 0;         ///< max load / mean load (1 = perfectly balanced)
  double cv = 0;                    ///< coefficient of variation of the load
  double load_entropy = 0;          ///< entropy of the load distribution / ln E (1 = balanced)
  double routing_entropy = 0;       ///< mean per-token entropy of the softmax, nats (needs logits)
  double aux_loss = 0;              ///< Switch balancing loss E * sum_e f_e P_e (needs logits)
};

inline LoadStats load_stats(const Routing& r, const float* logits = nullptr) {
  LoadStats s;
  const std::size_t T = r.n_tokens, E = r.n_experts, S = r.slots;
  s.tokens = T;
  s.load.assign(E, 0);
  for (std::size_t t = 0; t < T; ++t) {
    std::size_t n = 0;
    for (std::size_t j = 0; j < S; ++j)
      if (r.expert[t * S + j] >= 0) ++s.load[static_cast<std::size_t>(r.expert[t * S + j])], ++n;
    s.routed += n;
    s.unrouted_tokens += n == 0;
  }
  if (T == 0 || E == 0) return s;
  s.mean_experts = static_cast<double>(s.routed) / static_cast<double>(T);
  const double mean = static_cast<double>(s.routed) / static_cast<double>(E);
  double var = 0, mx = 0, ent = 0;
  for (auto l : s.load) {
    const double x = static_cast<double>(l);
    var += (x - mean) * (x - mean), mx = std::max(mx, x);
    if (l) ent -= x / static_cast<double>(s.routed) * std::log(x / static_cast<double>(s.routed));
  }
  s.max_over_mean = mean > 0 ? mx / mean : 0;
  s.cv = mean > 0 ? std::sqrt(var / static_cast<double>(E)) / mean : 0;
  s.load_entropy = E > 1 ? ent / std::log(static_cast<double>(E)) : 1.0;
  if (logits) {
    s.importance.assign(E, 0.0);
    std::vector<float> p(E);
    double h = 0;
    for (std::size_t t = 0; t < T; ++t) {
      detail::softmax(logits + t * E, E, p.data());
      for (std::size_t e = 0; e < E; ++e) {
        s.importance[e] += p[e];
        if (p[e] > 0) h -= static_cast<double>(p[e]) * std::log(static_cast<double>(p[e]));
      }
    }
    s.routing_entropy = h / static_cast<double>(T);
    double aux = 0;
    for (std::size_t e = 0; e < E; ++e) {
      s.importance[e] /= static_cast<double>(T);
      aux += static_cast<double>(s.load[e]) / static_cast<double>(s.routed ? s.routed : 1) * s.importance[e];
    }
    s.aux_loss = static_cast<double>(E) * aux;
  }
  return s;
}

}  // namespace s2lc::route
