// Token routers (include/route/token.hpp) against scalar references written from the header's
// documented semantics (double precision, std::stable_sort for the tie rule): TopK (normalize on /
// off), NoisyTopK (noise recomputed from normal_at, constant and softplus sigma, train off),
// TopP (p -> 0, p = 1, min_k / max_k clamps), SigmoidBias (bias, scale, group-limited routing) and
// ExpertChoice, on random logits for many (T, E, k) including T = 0, T = 1, E = 1 and k = E, and on
// logits with deliberate ties. Then apply_capacity for every Overflow x Priority against a scalar
// reference (plus hand-computed cases), Routing::plan() against the routing's (token, expert, gate)
// triples, load_stats against a scalar reference, router_logits against a double dot product (odd
// sizes, strides, the 128-token chunk) and bit-identical with a thread pool, and the rejections.
//
// Gate tolerance: 1e-6 relative. The header computes softmax / sigmoid in float (exp of a float
// difference, a double sum, a float reciprocal): a few float roundings, < 1e-6 for logits of
// moderate size. NoisyTopK's noisy values H are float sums (l + sigma n) whose rounding,
// <= 2^-24 |H| each, enters the gate's exponent: there the tolerance is 2e-6.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <morph/parallel.hpp>
#include <route/token.hpp>
#include <s2lc/error.hpp>
#include <s2lc/plan.hpp>

// The suite's own scope: the suites compile in unity groups (tests/CMakeLists.txt).
namespace suite_route_token {

namespace {

namespace rt = s2lc::route;

constexpr double kRel = 1e-6;       // gate tolerance (relative)
constexpr double kNoisyRel = 2e-6;  // NoisyTopK gate tolerance (float H, see the top comment)

std::vector<float> randn(std::size_t n, std::uint32_t seed, float sd = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, sd);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

/// Random logits on a coarse grid (multiples of 0.5 in [-2, 2]): many exact ties in every row.
std::vector<float> tied_logits(std::size_t n, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> d(-4, 4);
  std::vector<float> v(n);
  for (auto& x : v) x = 0.5f * static_cast<float>(d(rng));
  return v;
}

/// Indices of s ordered by descending value; equal values: lower index first.
std::vector<std::size_t> rank_desc(const std::vector<double>& s) {
  std::vector<std::size_t> idx(s.size());
  std::iota(idx.begin(), idx.end(), std::size_t{0});
  std::stable_sort(idx.begin(), idx.end(), [&](std::size_t a, std::size_t b) { return s[a] > s[b]; });
  return idx;
}

std::vector<double> row(const float* x, std::size_t n) { return std::vector<double>(x, x + n); }

/// Softmax in double.
std::vector<double> softmax_d(const std::vector<double>& x) {
  double m = -std::numeric_limits<double>::infinity();
  for (double v : x) m = std::max(m, v);
  std::vector<double> p(x.size());
  double s = 0;
  for (std::size_t i = 0; i < x.size(); ++i) s += p[i] = std::exp(x[i] - m);
  for (auto& v : p) v /= s;
  return p;
}

/// Expected routing: per token `slots` (expert, gate) pairs, -1 / 0 for empty slots.
struct Ref {
  std::size_t T = 0, E = 0, slots = 0;
  std::vector<std::int32_t> expert;
  std::vector<double> gate;
  Ref(std::size_t t, std::size_t e, std::size_t s) : T(t), E(e), slots(s), expert(t * s, -1), gate(t * s, 0.0) {}
  void set(std::size_t t, std::size_t j, std::size_t e, double g) {
    expert[t * slots + j] = static_cast<std::int32_t>(e);
    gate[t * slots + j] = g;
  }
};

/// Empty string when r matches ref (experts exactly, gates to `rel`), else the first difference.
std::string compare(const rt::Routing& r, const Ref& ref, double rel = kRel) {
  std::ostringstream os;
  if (r.n_tokens != ref.T || r.n_experts != ref.E || r.slots != ref.slots) {
    os << "shape: got T=" << r.n_tokens << " E=" << r.n_experts << " slots=" << r.slots << ", want T=" << ref.T << " E=" << ref.E
       << " slots=" << ref.slots;
    return os.str();
  }
  if (r.expert.size() != ref.T * ref.slots || r.gate.size() != ref.T * ref.slots) return "expert / gate vector sizes";
  for (std::size_t t = 0; t < ref.T; ++t)
    for (std::size_t j = 0; j < ref.slots; ++j) {
      const std::size_t i = t * ref.slots + j;
      if (r.expert[i] != ref.expert[i]) {
        os << "token " << t << " slot " << j << ": expert " << r.expert[i] << ", want " << ref.expert[i];
        return os.str();
      }
      const double g = r.gate[i], w = ref.gate[i];
      const bool ok = ref.expert[i] < 0 ? g == 0.0 : std::fabs(g - w) <= rel * std::fabs(w) + 1e-300;
      if (!ok) {
        os.precision(10);
        os << "token " << t << " slot " << j << " (expert " << ref.expert[i] << "): gate " << g << ", want " << w;
        return os.str();
      }
    }
  return {};
}

/// The routing as a Ref (exact gates): input of the capacity reference.
Ref to_ref(const rt::Routing& r) {
  Ref ref(r.n_tokens, r.n_experts, r.slots);
  ref.expert = r.expert;
  ref.gate.assign(r.gate.begin(), r.gate.end());
  return ref;
}

bool same_bits(const rt::Routing& a, const rt::Routing& b) {
  return a.n_tokens == b.n_tokens && a.n_experts == b.n_experts && a.slots == b.slots && a.expert == b.expert && a.gate == b.gate;
}

// ------------------------------------------------------------------------------------------------
// Reference routers (from the documented semantics).

Ref ref_topk(const float* logits, std::size_t T, std::size_t E, std::size_t k, bool normalize) {
  Ref ref(T, E, k);
  for (std::size_t t = 0; t < T; ++t) {
    const auto l = row(logits + t * E, E);
    const auto order = rank_desc(l);
    const auto p = softmax_d(l);
    double sel = 0;
    for (std::size_t j = 0; j < k; ++j) sel += p[order[j]];
    for (std::size_t j = 0; j < k; ++j) ref.set(t, j, order[j], normalize ? p[order[j]] / sel : p[order[j]]);
  }
  return ref;
}

double softplus_d(double x) { return std::log1p(std::exp(x)); }

Ref ref_noisy(const float* logits, std::size_t T, std::size_t E, std::size_t k, double noise_std, std::uint64_t seed,
              std::uint64_t stream, const float* noise_logits) {
  Ref ref(T, E, k);
  for (std::size_t t = 0; t < T; ++t) {
    std::vector<double> h(E);
    for (std::size_t e = 0; e < E; ++e) {
      const double sigma = noise_logits ? softplus_d(noise_logits[t * E + e]) : noise_std;
      h[e] = static_cast<double>(logits[t * E + e]) + static_cast<double>(rt::detail::normal_at(seed, stream, t, e)) * sigma;
    }
    const auto order = rank_desc(h);
    std::vector<double> sel(k);
    for (std::size_t j = 0; j < k; ++j) sel[j] = h[order[j]];
    const auto g = softmax_d(sel);
    for (std::size_t j = 0; j < k; ++j) ref.set(t, j, order[j], g[j]);
  }
  return ref;
}

Ref ref_topp(const float* logits, std::size_t T, std::size_t E, double p, std::size_t min_k, std::size_t max_k, bool normalize) {
  const std::size_t hi = max_k == 0 ? E : std::min(max_k, E);
  Ref ref(T, E, hi);
  for (std::size_t t = 0; t < T; ++t) {
    const auto pr = softmax_d(row(logits + t * E, E));
    const auto order = rank_desc(pr);
    std::size_t n = hi;
    if (p < 1.0) {
      // The shortest prefix whose cumulative probability reaches p, then clamped to [min_k, hi].
      std::size_t reach = E;
      double cum = 0;
      for (std::size_t i = 0; i < E; ++i) {
        cum += pr[order[i]];
        if (cum >= p) {
          reach = i + 1;
          break;
        }
      }
      n = std::clamp(reach, min_k, hi);
    }
    double sum = 0;
    for (std::size_t j = 0; j < n; ++j) sum += pr[order[j]];
    for (std::size_t j = 0; j < n; ++j) ref.set(t, j, order[j], normalize ? pr[order[j]] / sum : pr[order[j]]);
  }
  return ref;
}

Ref ref_sigmoid(const float* logits, std::size_t T, std::size_t E, const rt::SigmoidBias& cfg) {
  Ref ref(T, E, cfg.k);
  for (std::size_t t = 0; t < T; ++t) {
    std::vector<double> s(E), c(E);
    for (std::size_t e = 0; e < E; ++e) {
      s[e] = 1.0 / (1.0 + std::exp(-static_cast<double>(logits[t * E + e])));
      c[e] = s[e] + (cfg.bias.empty() ? 0.0 : static_cast<double>(cfg.bias[e]));
    }
    std::vector<bool> allowed(E, true);
    if (cfg.n_groups > 1) {
      const std::size_t per = E / cfg.n_groups;
      std::vector<double> gscore(cfg.n_groups);
      for (std::size_t gi = 0; gi < cfg.n_groups; ++gi) {
        std::vector<double> m(c.begin() + static_cast<std::ptrdiff_t>(gi * per), c.begin() + static_cast<std::ptrdiff_t>((gi + 1) * per));
        std::sort(m.begin(), m.end(), std::greater<double>());
        gscore[gi] = m[0] + m[1];
      }
      const auto gorder = rank_desc(gscore);
      std::vector<bool> keep(cfg.n_groups, false);
      for (std::size_t i = 0; i < cfg.topk_groups; ++i) keep[gorder[i]] = true;
      for (std::size_t e = 0; e < E; ++e) allowed[e] = keep[e / per];
    }
    std::vector<std::size_t> cand;
    for (std::size_t e : rank_desc(c))
      if (allowed[e]) cand.push_back(e);
    double sum = 0;
    for (std::size_t j = 0; j < cfg.k; ++j) sum += s[cand[j]];
    for (std::size_t j = 0; j < cfg.k; ++j) {
      const double g = s[cand[j]] * static_cast<double>(cfg.scale);
      ref.set(t, j, cand[j], cfg.normalize ? g / sum : g);
    }
  }
  return ref;
}

Ref ref_expert_choice(const float* logits, std::size_t T, std::size_t E, double factor) {
  const std::size_t c = std::min(T, static_cast<std::size_t>(std::ceil(factor * static_cast<double>(T) / static_cast<double>(E))));
  std::vector<std::vector<double>> prob(T);
  for (std::size_t t = 0; t < T; ++t) prob[t] = softmax_d(row(logits + t * E, E));
  std::vector<std::vector<std::pair<std::size_t, double>>> got(T);  // (expert, prob), expert order
  for (std::size_t e = 0; e < E; ++e) {
    std::vector<double> col(T);
    for (std::size_t t = 0; t < T; ++t) col[t] = prob[t][e];
    const auto order = rank_desc(col);
    for (std::size_t i = 0; i < c; ++i) got[order[i]].emplace_back(e, col[order[i]]);
  }
  std::size_t slots = 1;
  for (auto& g : got) {
    std::stable_sort(g.begin(), g.end(), [](const auto& a, const auto& b) { return a.second > b.second; });
    slots = std::max(slots, g.size());
  }
  Ref ref(T, E, slots);
  for (std::size_t t = 0; t < T; ++t)
    for (std::size_t j = 0; j < got[t].size(); ++j) ref.set(t, j, got[t][j].first, got[t][j].second);
  return ref;
}

struct RefReport {
  std::size_t capacity = 0, dropped = 0, rerouted = 0, unrouted = 0;
};

/// apply_capacity from its documentation: capacity = max(min_capacity, ceil(factor * assignments
/// / E)); slot 0 of every token, then slot 1, ...; inside a slot tokens by priority (token order,
/// or gate descending then token); an assignment beyond capacity is dropped, dropped and the
/// token's surviving gates rescaled to their original sum, or moved with its gate to the token's
/// best-logit expert (ties: lower index) that has room and is not among the token's experts.
/// Afterwards each token's filled slots come first, in their previous order.
RefReport ref_capacity(Ref& r, const rt::Capacity& cap, const float* logits) {
  const std::size_t T = r.T, E = r.E, S = r.slots;
  std::size_t assignments = 0;
  for (auto e : r.expert) assignments += e >= 0;
  RefReport rep;
  const double want = std::ceil(cap.factor * static_cast<double>(assignments) / static_cast<double>(E));
  rep.capacity = std::max(cap.min_capacity, static_cast<std::size_t>(want));
  std::vector<double> before(T, 0.0);
  std::vector<bool> had(T, false);
  for (std::size_t t = 0; t < T; ++t)
    for (std::size_t j = 0; j < S; ++j)
      if (r.expert[t * S + j] >= 0) before[t] += r.gate[t * S + j], had[t] = true;
  std::vector<std::size_t> load(E, 0);
  for (std::size_t j = 0; j < S; ++j) {
    std::vector<std::size_t> order(T);
    std::iota(order.begin(), order.end(), std::size_t{0});
    if (cap.priority == rt::Priority::score) {
      std::vector<double> g(T);
      for (std::size_t t = 0; t < T; ++t) g[t] = r.gate[t * S + j];
      order = rank_desc(g);
    }
    for (std::size_t t : order) {
      const std::int32_t e = r.expert[t * S + j];
      if (e < 0) continue;
      if (load[static_cast<std::size_t>(e)] < rep.capacity) {
        ++load[static_cast<std::size_t>(e)];
        continue;
      }
      if (cap.overflow == rt::Overflow::reroute) {
        bool moved = false;
        for (std::size_t c : rank_desc(row(logits + t * E, E))) {
          bool mine = false;
          for (std::size_t i = 0; i < S; ++i) mine = mine || r.expert[t * S + i] == static_cast<std::int32_t>(c);
          if (mine || load[c] >= rep.capacity) continue;
          r.expert[t * S + j] = static_cast<std::int32_t>(c);
          ++load[c];
          ++rep.rerouted;
          moved = true;
          break;
        }
        if (moved) continue;
      }
      r.expert[t * S + j] = -1;
      r.gate[t * S + j] = 0.0;
      ++rep.dropped;
    }
  }
  for (std::size_t t = 0; t < T; ++t) {
    std::vector<std::pair<std::int32_t, double>> kept;
    for (std::size_t j = 0; j < S; ++j)
      if (r.expert[t * S + j] >= 0) kept.emplace_back(r.expert[t * S + j], r.gate[t * S + j]);
    double after = 0;
    for (auto& kv : kept) after += kv.second;
    if (cap.overflow == rt::Overflow::drop_renormalize && after > 0)
      for (auto& kv : kept) kv.second *= before[t] / after;
    for (std::size_t j = 0; j < S; ++j) {
      r.expert[t * S + j] = j < kept.size() ? kept[j].first : -1;
      r.gate[t * S + j] = j < kept.size() ? kept[j].second : 0.0;
    }
    rep.unrouted += had[t] && kept.empty();
  }
  return rep;
}

// Invariants of any Routing: filled slots first, experts in range and distinct per token.
std::string structure(const rt::Routing& r) {
  std::ostringstream os;
  for (std::size_t t = 0; t < r.n_tokens; ++t) {
    bool empty_seen = false;
    for (std::size_t j = 0; j < r.slots; ++j) {
      const std::int32_t e = r.expert[t * r.slots + j];
      if (e < 0) {
        empty_seen = true;
        if (r.gate[t * r.slots + j] != 0.0f) os << "token " << t << " slot " << j << ": empty slot with a gate";
        continue;
      }
      if (empty_seen) os << "token " << t << ": filled slot " << j << " after an empty one; ";
      if (static_cast<std::size_t>(e) >= r.n_experts) os << "token " << t << ": expert " << e << " out of range; ";
      for (std::size_t i = 0; i < j; ++i)
        if (r.expert[t * r.slots + i] == e) os << "token " << t << ": expert " << e << " twice; ";
      if (!(r.gate[t * r.slots + j] >= 0.0f) || !std::isfinite(r.gate[t * r.slots + j])) os << "token " << t << ": bad gate; ";
    }
  }
  return os.str();
}

struct Shape {
  std::size_t T, E, k;
};
// T = 0, T = 1, E = 1, k = E, and the 128-token chunk crossed.
const Shape kShapes[] = {{0, 4, 2}, {1, 1, 1}, {1, 5, 5}, {1, 6, 2}, {7, 3, 3}, {9, 8, 1}, {33, 8, 2},
                         {50, 16, 4}, {20, 64, 8}, {150, 12, 3}, {12, 2, 2}};

}  // namespace

// ================================================================================================
// Routers against their references.

TEST_CASE("route: TopK equals the scalar reference (normalize on and off), including ties") {
  for (bool normalize : {true, false}) {
    for (const auto& s : kShapes) {
      CAPTURE(normalize); CAPTURE(s.T); CAPTURE(s.E); CAPTURE(s.k);
      for (std::uint32_t seed : {1u, 2u}) {
        const auto l = randn(s.T * s.E, seed * 1000u + static_cast<std::uint32_t>(s.T * 31 + s.E), 1.5f);
        const auto r = rt::TopK{s.k, normalize}.route(l.data(), s.T, s.E);
        const std::string d = compare(r, ref_topk(l.data(), s.T, s.E, s.k, normalize));
        CHECK_MESSAGE(d.empty(), d);
        CHECK(structure(r).empty());
      }
      const auto tl = tied_logits(s.T * s.E, static_cast<std::uint32_t>(7 + s.T + s.E));
      const std::string d = compare(rt::TopK{s.k, normalize}.route(tl.data(), s.T, s.E), ref_topk(tl.data(), s.T, s.E, s.k, normalize));
      CHECK_MESSAGE(d.empty(), d);
    }
  }
  // Hand-written ties: lower expert index first.
  const float rows[] = {1.0f, 3.0f, 3.0f, 2.0f, 3.0f,   // token 0: 3 at experts 1, 2, 4
                        0.5f, 0.5f, 0.5f, 0.5f, 0.5f};  // token 1: all equal
  const auto r = rt::TopK{3, true}.route(rows, 2, 5);
  CHECK(r.expert == std::vector<std::int32_t>{1, 2, 4, 0, 1, 2});
  for (float g : r.gate) CHECK(g == doctest::Approx(1.0 / 3.0).epsilon(1e-6));
  const auto r2 = rt::TopK{2, false}.route(rows, 2, 5);
  CHECK(r2.expert == std::vector<std::int32_t>{1, 2, 0, 1});
  const double z = std::exp(1.0) + 3 * std::exp(3.0) + std::exp(2.0);
  CHECK(r2.gate[0] == doctest::Approx(std::exp(3.0) / z).epsilon(1e-6));
  CHECK(r2.gate[1] == doctest::Approx(std::exp(3.0) / z).epsilon(1e-6));
  CHECK(r2.gate[2] == doctest::Approx(0.2).epsilon(1e-6));
  // E = 1: the only expert with gate 1 either way.
  const float one[] = {-3.0f, 7.0f};
  for (bool normalize : {true, false}) {
    const auto r1 = rt::TopK{1, normalize}.route(one, 2, 1);
    CHECK(r1.expert == std::vector<std::int32_t>{0, 0});
    CHECK(r1.gate == std::vector<float>{1.0f, 1.0f});
  }
}

TEST_CASE("route: NoisyTopK equals the reference recomputed from normal_at (constant and softplus sigma)") {
  const std::uint64_t seed = 12345, stream = 7;
  for (const auto& s : kShapes) {
    CAPTURE(s.T); CAPTURE(s.E); CAPTURE(s.k);
    const auto l = randn(s.T * s.E, static_cast<std::uint32_t>(s.T * 17 + s.E), 1.0f);
    auto nl = randn(s.T * s.E, static_cast<std::uint32_t>(s.T * 19 + s.E + 5), 1.0f);
    if (!nl.empty()) nl[0] = 25.0f;  // softplus' large-x branch
    for (float sd : {1.0f, 0.3f}) {
      CAPTURE(sd);
      rt::NoisyTopK nk{s.k, sd, seed, stream, true};
      const auto r = nk.route(l.data(), s.T, s.E);
      const std::string d = compare(r, ref_noisy(l.data(), s.T, s.E, s.k, sd, seed, stream, nullptr), kNoisyRel);
      CHECK_MESSAGE(d.empty(), d);
      CHECK(structure(r).empty());
    }
    rt::NoisyTopK nk{s.k, 1.0f, seed, stream, true};
    const auto rn = nk.route(l.data(), s.T, s.E, nullptr, nl.data());
    const std::string d = compare(rn, ref_noisy(l.data(), s.T, s.E, s.k, 0.0, seed, stream, nl.data()), kNoisyRel);
    CHECK_MESSAGE(d.empty(), d);
    // train = false: no noise at all, bit-identical to TopK (with or without noise logits).
    nk.train = false;
    const auto topk = rt::TopK{s.k, true}.route(l.data(), s.T, s.E);
    CHECK(same_bits(nk.route(l.data(), s.T, s.E), topk));
    CHECK(same_bits(nk.route(l.data(), s.T, s.E, nullptr, nl.data()), topk));
    // noise_std = 0 adds exact zeros.
    CHECK(same_bits(rt::NoisyTopK{s.k, 0.0f, seed, stream, true}.route(l.data(), s.T, s.E), topk));
  }
}

TEST_CASE("route: NoisyTopK noise is a pure function of (seed, stream, token, expert)") {
  const std::size_t T = 64, E = 8, k = 2;
  const auto l = randn(T * E, 99, 0.5f);
  const rt::NoisyTopK a{k, 1.0f, 42, 0, true};
  const auto r1 = a.route(l.data(), T, E);
  CHECK(same_bits(r1, a.route(l.data(), T, E)));  // same seed and stream: identical
  s2lc::morph::ThreadPool pool(3);
  CHECK(same_bits(r1, a.route(l.data(), T, E, &pool)));
  // The noise changes the routing of some token compared with the clean TopK.
  CHECK(r1.expert != rt::TopK{k, true}.route(l.data(), T, E).expert);
  rt::NoisyTopK b = a;
  b.stream = 1;
  CHECK(r1.expert != b.route(l.data(), T, E).expert);  // another stream: other experts for some token
  rt::NoisyTopK c = a;
  c.seed = 43;
  CHECK(r1.expert != c.route(l.data(), T, E).expert);
  // A token's noise does not depend on the batch around it: token 5 routed alone in a batch of
  // one would use t = 0, so compare the batch prefix instead (tokens 0..9 of the same logits).
  const auto prefix = a.route(l.data(), 10, E);
  CHECK(std::equal(prefix.expert.begin(), prefix.expert.end(), r1.expert.begin()));
  CHECK(std::equal(prefix.gate.begin(), prefix.gate.end(), r1.gate.begin()));
  // normal_at itself: deterministic, and roughly standard normal over many draws.
  double m = 0, v = 0;
  std::size_t nonfinite = 0;
  const std::size_t n = 20000;
  for (std::size_t i = 0; i < n; ++i) {
    const double x = rt::detail::normal_at(3, 4, i / 100, i % 100);
    nonfinite += !std::isfinite(x);
    m += x, v += x * x;
  }
  CHECK(nonfinite == 0);
  m /= static_cast<double>(n), v = v / static_cast<double>(n) - m * m;
  CHECK(std::fabs(m) < 0.05);
  CHECK(std::fabs(v - 1.0) < 0.05);
  CHECK(rt::detail::normal_at(3, 4, 5, 6) == rt::detail::normal_at(3, 4, 5, 6));
  CHECK(rt::detail::normal_at(3, 4, 5, 6) != rt::detail::normal_at(3, 5, 5, 6));
}

TEST_CASE("route: TopP equals the scalar reference, p -> 0 is TopK{1}, p = 1 takes max_k, min_k holds") {
  struct P {
    double p;
    std::size_t min_k, max_k;
  };
  const P kParams[] = {{0.5, 1, 0}, {0.9, 1, 0}, {0.37, 2, 0}, {0.8, 1, 3}, {0.95, 2, 4}, {0.0, 1, 0}, {1.0, 1, 0}, {1.0, 1, 3}, {2.5, 2, 2}, {0.7, 1, 100}};
  for (bool normalize : {true, false}) {
    for (const auto& s : kShapes) {
      for (const auto& q : kParams) {
        const std::size_t hi = q.max_k == 0 ? s.E : std::min(q.max_k, s.E);
        if (q.min_k > hi) continue;
        CAPTURE(normalize); CAPTURE(s.T); CAPTURE(s.E); CAPTURE(q.p); CAPTURE(q.min_k); CAPTURE(q.max_k);
        const rt::TopP tp{q.p, q.min_k, q.max_k, normalize};
        CHECK(tp.cap(s.E) == hi);
        const auto l = randn(s.T * s.E, static_cast<std::uint32_t>(s.T * 13 + s.E * 3 + 1), 1.5f);
        const auto r = tp.route(l.data(), s.T, s.E);
        std::string d = compare(r, ref_topp(l.data(), s.T, s.E, q.p, q.min_k, q.max_k, normalize));
        CHECK_MESSAGE(d.empty(), d);
        CHECK(structure(r).empty());
        const auto tl = tied_logits(s.T * s.E, static_cast<std::uint32_t>(s.T + s.E + 3));
        d = compare(tp.route(tl.data(), s.T, s.E), ref_topp(tl.data(), s.T, s.E, q.p, q.min_k, q.max_k, normalize));
        CHECK_MESSAGE(d.empty(), d);
        for (std::size_t t = 0; t < s.T; ++t) {
          CHECK(r.active(t) >= q.min_k);
          CHECK(r.active(t) <= hi);
          if (q.p >= 1.0) CHECK(r.active(t) == hi);
          if (normalize) {
            double sum = 0;
            for (std::size_t j = 0; j < r.slots; ++j) sum += r.gate[t * r.slots + j];
            CHECK(sum == doctest::Approx(1.0).epsilon(1e-6));
          }
        }
      }
    }
  }
  // p -> 0: the same experts as TopK{1}; gate 1 (normalize) or the same probability (raw).
  const std::size_t T = 40, E = 7;
  const auto l = randn(T * E, 5, 2.0f);
  const auto top1 = rt::TopK{1, false}.route(l.data(), T, E);
  for (double p : {0.0, 1e-9}) {
    CAPTURE(p);
    const auto rn = rt::TopP{p, 1, 0, true}.route(l.data(), T, E);
    const auto rr = rt::TopP{p, 1, 0, false}.route(l.data(), T, E);
    for (std::size_t t = 0; t < T; ++t) {
      CHECK(rn.active(t) == 1);
      CHECK(rn.expert[t * E] == top1.expert[t]);
      CHECK(rn.gate[t * E] == doctest::Approx(1.0).epsilon(1e-6));
      CHECK(rr.expert[t * E] == top1.expert[t]);
      CHECK(rr.gate[t * E] == top1.gate[t]);
    }
  }
  // p = 1: every expert (max_k = 0), or max_k of them, best first.
  const auto all = rt::TopP{1.0, 1, 0, true}.route(l.data(), T, E);
  const auto three = rt::TopP{1.0, 1, 3, true}.route(l.data(), T, E);
  const auto top3 = rt::TopK{3, true}.route(l.data(), T, E);
  CHECK(all.slots == E);
  CHECK(three.slots == 3);
  for (std::size_t t = 0; t < T; ++t) {
    CHECK(all.active(t) == E);
    CHECK(three.active(t) == 3);
  }
  CHECK(three.expert == top3.expert);
  for (std::size_t i = 0; i < top3.gate.size(); ++i) CHECK(three.gate[i] == doctest::Approx(top3.gate[i]).epsilon(1e-6));
  // min_k respected even at p = 0.
  const auto mk = rt::TopP{0.0, 3, 5, true}.route(l.data(), T, E);
  for (std::size_t t = 0; t < T; ++t) CHECK(mk.active(t) == 3);
  // All-equal logits: probabilities 1/4 each, p = 0.5 reached after exactly two (lower indices).
  const float eq[] = {0.25f, 0.25f, 0.25f, 0.25f};
  const auto re = rt::TopP{0.5, 1, 0, true}.route(eq, 1, 4);
  CHECK(re.expert == std::vector<std::int32_t>{0, 1, -1, -1});
  CHECK(re.gate == std::vector<float>{0.5f, 0.5f, 0.0f, 0.0f});
}

TEST_CASE("route: SigmoidBias equals the scalar reference (bias, scale, group-limited routing)") {
  struct C {
    std::size_t T, E, k, n_groups, topk_groups;
  };
  const C kCases[] = {{0, 8, 2, 1, 1}, {1, 1, 1, 1, 1},  {1, 6, 6, 1, 1},  {9, 8, 2, 1, 1},   {40, 16, 4, 1, 1}, {40, 16, 4, 4, 2},
                      {40, 16, 8, 4, 2}, {17, 12, 3, 3, 1}, {25, 32, 8, 8, 4}, {10, 16, 16, 4, 4}, {150, 8, 2, 2, 1}};
  for (const auto& c : kCases) {
    for (int variant = 0; variant < 5; ++variant) {
      // 0: no bias; 1: bias; 2: bias + normalize off + scale; 3: tied logits, no bias;
      // 4: bias + scale (normalized)
      CAPTURE(c.T); CAPTURE(c.E); CAPTURE(c.k); CAPTURE(c.n_groups); CAPTURE(c.topk_groups); CAPTURE(variant);
      rt::SigmoidBias sb;
      sb.k = c.k, sb.n_groups = c.n_groups, sb.topk_groups = c.topk_groups;
      if (variant == 1 || variant == 2 || variant == 4) sb.bias = randn(c.E, static_cast<std::uint32_t>(c.E + 77), 0.2f);
      if (variant == 2) sb.normalize = false, sb.scale = 2.5f;
      if (variant == 4) sb.scale = 2.5f;
      const auto l = variant == 3 ? tied_logits(c.T * c.E, static_cast<std::uint32_t>(c.T + 1))
                                  : randn(c.T * c.E, static_cast<std::uint32_t>(c.T * 7 + c.E), 1.5f);
      const auto r = sb.route(l.data(), c.T, c.E);
      const std::string d = compare(r, ref_sigmoid(l.data(), c.T, c.E, sb));
      CHECK_MESSAGE(d.empty(), d);
      CHECK(structure(r).empty());
      if (c.n_groups > 1) {  // every token's experts lie in at most topk_groups groups
        const std::size_t per = c.E / c.n_groups;
        for (std::size_t t = 0; t < c.T; ++t) {
          std::vector<bool> used(c.n_groups, false);
          for (std::size_t j = 0; j < c.k; ++j) used[static_cast<std::size_t>(r.expert[t * c.k + j]) / per] = true;
          CHECK(static_cast<std::size_t>(std::count(used.begin(), used.end(), true)) <= c.topk_groups);
        }
      }
    }
  }
  // Hand-computed: the bias steers selection but not the gates.
  const float l[] = {2.0f, 0.0f, 1.0f, -1.0f};
  rt::SigmoidBias sb;
  sb.k = 2;
  sb.bias = {0.0f, 0.9f, 0.0f, 0.0f};  // expert 1: 0.5 + 0.9 = 1.4 beats sigmoid(2) = 0.88
  auto r = sb.route(l, 1, 4);
  CHECK(r.expert == std::vector<std::int32_t>{1, 0});
  const double s0 = 1.0 / (1.0 + std::exp(-2.0)), s1 = 0.5;
  CHECK(r.gate[0] == doctest::Approx(s1 / (s0 + s1)).epsilon(1e-6));
  CHECK(r.gate[1] == doctest::Approx(s0 / (s0 + s1)).epsilon(1e-6));
  // Groups of 2: {2, 0} scores s(2)+s(0) = 1.38, {1, -1} scores s(1)+s(-1) = 1.0: with one group
  // the best two experts (0 and 2, different groups) cannot both be taken.
  sb.bias.clear();
  sb.n_groups = 2, sb.topk_groups = 1;
  const float lg[] = {2.0f, 0.0f, 1.0f, -1.0f};
  r = sb.route(lg, 1, 4);
  CHECK(r.expert == std::vector<std::int32_t>{0, 1});
  // All-equal logits with groups: the lowest groups and experts win.
  std::vector<float> flat(16, 0.3f);
  sb.k = 3, sb.n_groups = 4, sb.topk_groups = 2;
  r = sb.route(flat.data(), 1, 16);
  CHECK(r.expert == std::vector<std::int32_t>{0, 1, 2});
}

TEST_CASE("route: SigmoidBias::update_bias moves the bias toward balance") {
  rt::SigmoidBias sb;
  sb.update_bias({4, 1, 2, 1}, 0.1f);  // mean 2
  REQUIRE(sb.bias.size() == 4);
  CHECK(sb.bias[0] == doctest::Approx(-0.1));
  CHECK(sb.bias[1] == doctest::Approx(0.1));
  CHECK(sb.bias[2] == 0.0f);
  CHECK(sb.bias[3] == doctest::Approx(0.1));
  sb.update_bias({0, 5, 2, 1}, 0.1f);
  CHECK(sb.bias[0] == doctest::Approx(0.0));
  CHECK(sb.bias[1] == doctest::Approx(0.0));
  CHECK(sb.bias[2] == 0.0f);  // load == mean: unchanged
  CHECK(sb.bias[3] == doctest::Approx(0.2));
  CHECK_THROWS_WITH_AS((sb.update_bias({1, 2}, 0.1f)), doctest::Contains("load and bias sizes differ"), s2lc::invalid_argument);
}

TEST_CASE("route: ExpertChoice equals the scalar reference, every expert takes its capacity, ties by token") {
  struct C {
    std::size_t T, E;
    double f;
  };
  const C kCases[] = {{0, 4, 2.0}, {1, 4, 2.0}, {1, 1, 1.0}, {7, 3, 1.5}, {40, 8, 2.0}, {33, 5, 1.25}, {10, 4, 100.0}, {64, 16, 0.5}, {150, 4, 1.0}};
  for (const auto& c : kCases) {
    CAPTURE(c.T); CAPTURE(c.E); CAPTURE(c.f);
    const rt::ExpertChoice ec{c.f};
    auto l = randn(c.T * c.E, static_cast<std::uint32_t>(c.T * 5 + c.E), 1.5f);
    // Duplicate rows: tied probabilities across tokens (the lower token index must win).
    for (std::size_t t = 3; t < c.T; t += 4)
      std::copy(l.begin() + static_cast<std::ptrdiff_t>((t - 2) * c.E), l.begin() + static_cast<std::ptrdiff_t>((t - 1) * c.E),
                l.begin() + static_cast<std::ptrdiff_t>(t * c.E));
    const auto r = ec.route(l.data(), c.T, c.E);
    const std::string d = compare(r, ref_expert_choice(l.data(), c.T, c.E, c.f));
    CHECK_MESSAGE(d.empty(), d);
    CHECK(structure(r).empty());
    const std::size_t cap = ec.capacity(c.T, c.E);
    CHECK(cap == std::min(c.T, static_cast<std::size_t>(std::ceil(c.f * static_cast<double>(c.T) / static_cast<double>(c.E)))));
    const auto st = rt::load_stats(r);
    for (std::size_t e = 0; e < c.E; ++e) CHECK(st.load[e] == cap);
  }
  // All-equal logits: every expert takes tokens 0 .. c-1; their slots list experts in index order.
  std::vector<float> flat(6 * 3, 1.0f);
  const auto r = rt::ExpertChoice{1.0}.route(flat.data(), 6, 3);  // c = 2
  REQUIRE(r.slots == 3);
  CHECK(r.expert == std::vector<std::int32_t>{0, 1, 2, 0, 1, 2, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1});
  for (std::size_t i = 0; i < 6; ++i) CHECK(r.gate[i] == doctest::Approx(1.0 / 3.0).epsilon(1e-6));
  CHECK(rt::load_stats(r).unrouted_tokens == 4);
}

TEST_CASE("route: results do not depend on the executor (ThreadPool(3) is bit-identical to serial)") {
  const std::size_t T = 300, E = 16;
  const auto l = randn(T * E, 2024, 1.5f);
  const auto nl = randn(T * E, 2025, 1.0f);
  s2lc::morph::ThreadPool pool(3);
  s2lc::morph::SerialExecutor serial;
  CHECK(same_bits(rt::TopK{4, true}.route(l.data(), T, E), rt::TopK{4, true}.route(l.data(), T, E, &pool)));
  CHECK(same_bits(rt::TopK{2, false}.route(l.data(), T, E), rt::TopK{2, false}.route(l.data(), T, E, &serial)));
  const rt::NoisyTopK nk{2, 1.0f, 5, 6, true};
  CHECK(same_bits(nk.route(l.data(), T, E, nullptr, nl.data()), nk.route(l.data(), T, E, &pool, nl.data())));
  CHECK(same_bits(rt::TopP{0.7, 1, 4, true}.route(l.data(), T, E), rt::TopP{0.7, 1, 4, true}.route(l.data(), T, E, &pool)));
  rt::SigmoidBias sb;
  sb.k = 4, sb.n_groups = 4, sb.topk_groups = 2, sb.bias = randn(E, 3, 0.1f);
  CHECK(same_bits(sb.route(l.data(), T, E), sb.route(l.data(), T, E, &pool)));
  CHECK(same_bits(rt::ExpertChoice{1.5}.route(l.data(), T, E), rt::ExpertChoice{1.5}.route(l.data(), T, E, &pool)));
}

TEST_CASE("route: large logits neither overflow nor underflow into NaN (softmaxes are max-subtracted)") {
  const float l[] = {1000.0f, 999.0f, -1000.0f, 998.0f};  // gaps exp(-1), exp(-2); -1000 is 0
  const double z3 = 1.0 + std::exp(-1.0) + std::exp(-2.0);
  const auto rn = rt::TopK{2, true}.route(l, 1, 4);
  CHECK(rn.expert == std::vector<std::int32_t>{0, 1});
  CHECK(rn.gate[0] == doctest::Approx(1.0 / (1.0 + std::exp(-1.0))).epsilon(1e-6));
  CHECK(rn.gate[1] == doctest::Approx(std::exp(-1.0) / (1.0 + std::exp(-1.0))).epsilon(1e-6));
  const auto rr = rt::TopK{4, false}.route(l, 1, 4);
  CHECK(rr.expert == std::vector<std::int32_t>{0, 1, 3, 2});
  CHECK(rr.gate[0] == doctest::Approx(1.0 / z3).epsilon(1e-6));
  CHECK(rr.gate[2] == doctest::Approx(std::exp(-2.0) / z3).epsilon(1e-6));
  CHECK(rr.gate[3] == 0.0f);
  const auto rn4 = rt::TopK{4, true}.route(l, 1, 4);  // the selection spans 2000: still finite
  CHECK(rn4.expert == rr.expert);
  for (std::size_t j = 0; j < 4; ++j) CHECK(rn4.gate[j] == doctest::Approx(rr.gate[j]).epsilon(1e-6));
  const auto rp = rt::TopP{0.99, 1, 0, true}.route(l, 1, 4);
  CHECK(rp.expert == std::vector<std::int32_t>{0, 1, 3, -1});
  CHECK(rp.gate[0] == doctest::Approx(1.0 / z3).epsilon(1e-6));
  const auto rn1 = rt::NoisyTopK{2, 1.0f, 1, 2, true}.route(l, 1, 4);
  for (float g : rn1.gate) CHECK(std::isfinite(g));
  const auto re = rt::ExpertChoice{4.0}.route(l, 1, 4);
  for (std::size_t j = 0; j < re.slots; ++j) CHECK(std::isfinite(re.gate[j]));
  CHECK(re.gate[0] == doctest::Approx(1.0 / z3).epsilon(1e-6));
  rt::SigmoidBias sb;
  sb.k = 2;
  const auto rs = sb.route(l, 1, 4);
  CHECK(rs.expert == std::vector<std::int32_t>{0, 1});  // sigmoid saturates to 1: tie, lower index
  CHECK(rs.gate[0] == doctest::Approx(0.5));
  const auto st = rt::load_stats(rn, l);
  CHECK(st.routing_entropy == doctest::Approx(std::log(z3) + (std::exp(-1.0) + 2.0 * std::exp(-2.0)) / z3).epsilon(1e-6));
  CHECK(std::isfinite(st.aux_loss));
}

// ================================================================================================
// Capacity.

TEST_CASE("route: apply_capacity equals the scalar reference for every overflow policy and priority") {
  const rt::Overflow kOverflow[] = {rt::Overflow::drop, rt::Overflow::drop_renormalize, rt::Overflow::reroute};
  const rt::Priority kPriority[] = {rt::Priority::token_order, rt::Priority::score};
  struct C {
    std::size_t T, E, k;
    double factor;
    std::size_t min_capacity;
    int router;  // 0 TopK normalize, 1 TopK raw, 2 TopP (variable expert counts)
  };
  const C kCases[] = {{0, 4, 2, 1.0, 1, 0},  {1, 3, 2, 0.5, 1, 0},  {1, 1, 1, 1.0, 1, 0},   {16, 4, 1, 1.0, 1, 0},  {16, 4, 2, 1.0, 1, 1},
                      {40, 8, 2, 1.25, 1, 0}, {40, 8, 2, 0.5, 1, 1}, {40, 8, 3, 0.75, 1, 2}, {60, 6, 2, 1.0, 30, 0}, {33, 5, 5, 0.5, 1, 0},
                      {150, 8, 2, 1.0, 1, 2}, {25, 8, 8, 0.3, 2, 1}};
  for (const auto& c : kCases) {
    // Skewed logits: a few popular experts, so capacity actually binds.
    // (One spare element so that the logits pointer is not null at T = 0: rerouting needs it.)
    auto l = randn(c.T * c.E + 1, static_cast<std::uint32_t>(c.T * 3 + c.E * 11 + c.k), 1.0f);
    for (std::size_t t = 0; t < c.T; ++t) l[t * c.E] += 1.5f, l[t * c.E + c.E / 2] += 0.75f;
    rt::Routing base = c.router == 2 ? rt::TopP{0.6, 1, c.k, true}.route(l.data(), c.T, c.E)
                                     : rt::TopK{c.k, c.router == 0}.route(l.data(), c.T, c.E);
    for (auto o : kOverflow)
      for (auto p : kPriority) {
        CAPTURE(c.T); CAPTURE(c.E); CAPTURE(c.k); CAPTURE(c.factor); CAPTURE(c.min_capacity); CAPTURE(c.router);
        CAPTURE(static_cast<int>(o)); CAPTURE(static_cast<int>(p));
        const rt::Capacity cap{c.factor, c.min_capacity, o, p};
        rt::Routing r = base;
        Ref ref = to_ref(base);
        const auto rep = rt::apply_capacity(r, cap, l.data());
        const auto want = ref_capacity(ref, cap, l.data());
        const std::string d = compare(r, ref);
        CHECK_MESSAGE(d.empty(), d);
        CHECK(rep.capacity == want.capacity);
        CHECK(rep.capacity == cap.capacity(base.routed(), c.E));
        CHECK(rep.dropped == want.dropped);
        CHECK(rep.rerouted == want.rerouted);
        CHECK(rep.unrouted_tokens == want.unrouted);
        CHECK(structure(r).empty());
        CHECK(r.routed() + rep.dropped == base.routed());
        if (o != rt::Overflow::reroute) CHECK(rep.rerouted == 0);
        const auto st = rt::load_stats(r);
        for (std::size_t e = 0; e < c.E; ++e) CHECK(st.load[e] <= rep.capacity);
        CHECK(st.unrouted_tokens == rep.unrouted_tokens);  // every base token had an expert
        CHECK_NOTHROW(r.plan().validate());
      }
  }
}

TEST_CASE("route: apply_capacity on crafted cases (hand-computed results)") {
  // 4 tokens, 2 experts, top-1, everyone prefers expert 0. Logit gaps 0.5, 2, 1, 3: raw top-1
  // gates sigmoid(gap), so by score the order is tokens 3, 1, 2, 0. Capacity ceil(1.0 * 4 / 2) = 2.
  const float l[] = {0.5f, 0.0f, 2.0f, 0.0f, 1.0f, 0.0f, 3.0f, 0.0f};
  const auto base = rt::TopK{1, false}.route(l, 4, 2);
  REQUIRE(base.expert == std::vector<std::int32_t>{0, 0, 0, 0});
  auto sig = [](double x) { return static_cast<float>(1.0 / (1.0 + std::exp(-x))); };
  {
    auto r = base;
    const auto rep = rt::apply_capacity(r, {1.0, 1, rt::Overflow::drop, rt::Priority::token_order});
    CHECK(rep.capacity == 2);
    CHECK(rep.dropped == 2);
    CHECK(rep.rerouted == 0);
    CHECK(rep.unrouted_tokens == 2);
    CHECK(r.expert == std::vector<std::int32_t>{0, 0, -1, -1});
    CHECK(r.gate[0] == doctest::Approx(sig(0.5)).epsilon(1e-6));
    CHECK(r.gate[1] == doctest::Approx(sig(2.0)).epsilon(1e-6));
    CHECK(r.gate[2] == 0.0f);
    CHECK(r.gate[3] == 0.0f);
  }
  {
    auto r = base;
    const auto rep = rt::apply_capacity(r, {1.0, 1, rt::Overflow::drop, rt::Priority::score});
    CHECK(rep.dropped == 2);
    CHECK(rep.unrouted_tokens == 2);
    CHECK(r.expert == std::vector<std::int32_t>{-1, 0, -1, 0});
  }
  {
    auto r = base;
    const auto rep = rt::apply_capacity(r, {1.0, 1, rt::Overflow::reroute, rt::Priority::token_order}, l);
    CHECK(rep.dropped == 0);
    CHECK(rep.rerouted == 2);
    CHECK(rep.unrouted_tokens == 0);
    CHECK(r.expert == std::vector<std::int32_t>{0, 0, 1, 1});
    CHECK(r.gate == base.gate);  // moved with their gates
  }
  {
    auto r = base;
    const auto rep = rt::apply_capacity(r, {1.0, 1, rt::Overflow::reroute, rt::Priority::score}, l);
    CHECK(rep.rerouted == 2);
    CHECK(r.expert == std::vector<std::int32_t>{1, 0, 1, 0});
  }
  {
    auto r = base;  // min_capacity above the computed capacity: nothing happens
    const auto rep = rt::apply_capacity(r, {1.0, 4, rt::Overflow::drop, rt::Priority::token_order});
    CHECK(rep.capacity == 4);
    CHECK(rep.dropped == 0);
    CHECK(same_bits(r, base));
  }
  {
    auto r = base;  // factor 0.1: ceil(0.2) = 1
    const auto rep = rt::apply_capacity(r, {0.1, 1, rt::Overflow::drop, rt::Priority::token_order});
    CHECK(rep.capacity == 1);
    CHECK(rep.dropped == 3);
    CHECK(rep.unrouted_tokens == 3);
  }
  // 3 tokens, 3 experts, top-2 [0, 1] for everyone (logits 3, 2, 1). Capacity ceil(6 / 3) = 2.
  const float l3[] = {3, 2, 1, 3, 2, 1, 3, 2, 1};
  const auto b3 = rt::TopK{2, true}.route(l3, 3, 3);
  REQUIRE(b3.expert == std::vector<std::int32_t>{0, 1, 0, 1, 0, 1});
  {
    // Slot 0: tokens 0, 1 -> expert 0; token 2 overflows, expert 1 is its own (slot 1): to 2.
    // Slot 1: tokens 0, 1 -> expert 1; token 2: 0 and 1 full, 2 its own now: dropped.
    auto r = b3;
    const auto rep = rt::apply_capacity(r, {1.0, 1, rt::Overflow::reroute, rt::Priority::token_order}, l3);
    CHECK(rep.capacity == 2);
    CHECK(rep.rerouted == 1);
    CHECK(rep.dropped == 1);
    CHECK(rep.unrouted_tokens == 0);
    CHECK(r.expert == std::vector<std::int32_t>{0, 1, 0, 1, 2, -1});
    CHECK(r.gate[4] == b3.gate[4]);
    CHECK(r.gate[5] == 0.0f);
  }
  {
    auto r = b3;
    const auto rep = rt::apply_capacity(r, {1.0, 1, rt::Overflow::drop_renormalize, rt::Priority::token_order});
    CHECK(rep.dropped == 2);
    CHECK(rep.unrouted_tokens == 1);
    CHECK(r.expert == std::vector<std::int32_t>{0, 1, 0, 1, -1, -1});
  }
  // 2 tokens, 2 experts, top-2 in opposite orders; factor 0.5: capacity 1. Each token keeps its
  // first choice; drop keeps its gate, drop_renormalize restores the original sum (1).
  const float l2[] = {2.0f, 1.0f, 0.0f, 1.0f};
  const auto b2 = rt::TopK{2, true}.route(l2, 2, 2);
  REQUIRE(b2.expert == std::vector<std::int32_t>{0, 1, 1, 0});
  const double g = 1.0 / (1.0 + std::exp(-1.0));
  {
    auto r = b2;
    const auto rep = rt::apply_capacity(r, {0.5, 1, rt::Overflow::drop, rt::Priority::token_order});
    CHECK(rep.capacity == 1);
    CHECK(rep.dropped == 2);
    CHECK(rep.unrouted_tokens == 0);
    CHECK(r.expert == std::vector<std::int32_t>{0, -1, 1, -1});
    CHECK(r.gate[0] == doctest::Approx(g).epsilon(1e-6));
    CHECK(r.gate[2] == doctest::Approx(g).epsilon(1e-6));
  }
  {
    auto r = b2;
    rt::apply_capacity(r, {0.5, 1, rt::Overflow::drop_renormalize, rt::Priority::score});
    CHECK(r.expert == std::vector<std::int32_t>{0, -1, 1, -1});
    CHECK(r.gate[0] == doctest::Approx(1.0).epsilon(1e-6));
    CHECK(r.gate[2] == doctest::Approx(1.0).epsilon(1e-6));
  }
}

// ================================================================================================
// Plan and statistics.

TEST_CASE("route: Routing::plan() lists exactly the routing's (token, expert, gate) triples") {
  const std::size_t T = 37, E = 6;
  const auto l = randn(T * E, 31, 1.5f);
  std::vector<rt::Routing> rs;
  rs.push_back(rt::TopK{2, true}.route(l.data(), T, E));
  rs.push_back(rt::TopK{6, false}.route(l.data(), T, E));
  rs.push_back(rt::TopP{0.6, 1, 4, true}.route(l.data(), T, E));
  rs.push_back(rt::ExpertChoice{1.0}.route(l.data(), T, E));
  rs.push_back(rt::TopK{3, true}.route(l.data(), 0, E));
  rt::Routing capped = rt::TopK{3, true}.route(l.data(), T, E);
  rt::apply_capacity(capped, {0.5, 1, rt::Overflow::drop, rt::Priority::score});
  rs.push_back(capped);
  for (std::size_t i = 0; i < rs.size(); ++i) {
    CAPTURE(i);
    const auto& r = rs[i];
    const s2lc::DispatchPlan p = r.plan();
    CHECK_NOTHROW(p.validate());
    CHECK_NOTHROW(p.validate(false));
    CHECK(p.n_tokens == r.n_tokens);
    REQUIRE(p.n_experts() == E);
    CHECK(p.routed() == r.routed());
    CHECK(p.offsets[0] == 0);
    // Expected per expert: tokens ascending (scan tokens in order).
    std::vector<std::vector<std::pair<std::uint32_t, float>>> want(E);
    for (std::size_t t = 0; t < r.n_tokens; ++t)
      for (std::size_t j = 0; j < r.slots; ++j)
        if (r.expert[t * r.slots + j] >= 0)
          want[static_cast<std::size_t>(r.expert[t * r.slots + j])].emplace_back(static_cast<std::uint32_t>(t), r.gate[t * r.slots + j]);
    for (std::size_t e = 0; e < E; ++e) {
      CAPTURE(e);
      REQUIRE(p.count(e) == want[e].size());
      for (std::size_t n = 0; n < want[e].size(); ++n) {
        CHECK(p.token[p.offsets[e] + n] == want[e][n].first);
        CHECK(p.gate[p.offsets[e] + n] == want[e][n].second);
        if (n) CHECK(p.token[p.offsets[e] + n - 1] < p.token[p.offsets[e] + n]);
      }
    }
  }
}

namespace {

struct RefStats {
  std::vector<std::size_t> load;
  std::size_t routed = 0, unrouted = 0;
  double mean_experts = 0, max_over_mean = 0, cv = 0, load_entropy = 0, routing_entropy = 0, aux_loss = 0;
  std::vector<double> importance;
};

RefStats ref_stats(const rt::Routing& r, const float* logits) {
  RefStats s;
  const std::size_t T = r.n_tokens, E = r.n_experts;
  s.load.assign(E, 0);
  for (std::size_t t = 0; t < T; ++t) {
    std::size_t n = 0;
    for (std::size_t j = 0; j < r.slots; ++j)
      if (r.expert[t * r.slots + j] >= 0) ++s.load[static_cast<std::size_t>(r.expert[t * r.slots + j])], ++n;
    s.routed += n;
    if (n == 0) ++s.unrouted;
  }
  if (T == 0) return s;
  const double R = static_cast<double>(s.routed);
  s.mean_experts = R / static_cast<double>(T);
  const double mean = R / static_cast<double>(E);
  double mx = 0, ss = 0, h = 0;
  for (auto x : s.load) {
    const double v = static_cast<double>(x);
    mx = std::max(mx, v);
    ss += (v - mean) * (v - mean);
    if (x > 0) h += -(v / R) * std::log(v / R);
  }
  s.max_over_mean = mx / mean;
  s.cv = std::sqrt(ss / static_cast<double>(E)) / mean;
  s.load_entropy = E == 1 ? 1.0 : h / std::log(static_cast<double>(E));
  s.importance.assign(E, 0.0);
  double ent = 0;
  for (std::size_t t = 0; t < T; ++t) {
    const auto p = softmax_d(row(logits + t * E, E));
    for (std::size_t e = 0; e < E; ++e) {
      s.importance[e] += p[e] / static_cast<double>(T);
      if (p[e] > 0) ent -= p[e] * std::log(p[e]);
    }
  }
  s.routing_entropy = ent / static_cast<double>(T);
  for (std::size_t e = 0; e < E; ++e) s.aux_loss += static_cast<double>(s.load[e]) / R * s.importance[e];
  s.aux_loss *= static_cast<double>(E);
  return s;
}

}  // namespace

TEST_CASE("route: load_stats equals the scalar reference, balanced routing scores 1") {
  struct C {
    std::size_t T, E, k;
  };
  const C kCases[] = {{1, 4, 1}, {20, 4, 2}, {64, 8, 2}, {33, 16, 4}, {10, 1, 1}, {150, 6, 3}};
  for (const auto& c : kCases) {
    CAPTURE(c.T); CAPTURE(c.E); CAPTURE(c.k);
    auto l = randn(c.T * c.E, static_cast<std::uint32_t>(c.T + c.E * 3), 1.5f);
    for (std::size_t t = 0; t < c.T; ++t) l[t * c.E] += 1.0f;  // unbalanced
    const auto r = rt::TopK{c.k, true}.route(l.data(), c.T, c.E);
    const auto s = rt::load_stats(r, l.data());
    const auto w = ref_stats(r, l.data());
    CHECK(s.load == w.load);
    CHECK(s.tokens == c.T);
    CHECK(s.routed == w.routed);
    CHECK(s.routed == c.T * c.k);
    CHECK(s.unrouted_tokens == 0);
    CHECK(s.mean_experts == doctest::Approx(w.mean_experts).epsilon(1e-12));
    CHECK(s.mean_experts == doctest::Approx(r.mean_active()).epsilon(1e-12));
    CHECK(s.max_over_mean == doctest::Approx(w.max_over_mean).epsilon(1e-12));
    CHECK(s.cv == doctest::Approx(w.cv).epsilon(1e-9).scale(1e-12));
    CHECK(s.load_entropy == doctest::Approx(w.load_entropy).epsilon(1e-12));
    CHECK(s.routing_entropy == doctest::Approx(w.routing_entropy).epsilon(1e-6));
    CHECK(s.aux_loss == doctest::Approx(w.aux_loss).epsilon(1e-6));
    REQUIRE(s.importance.size() == c.E);
    double isum = 0;
    for (std::size_t e = 0; e < c.E; ++e) {
      CHECK(s.importance[e] == doctest::Approx(w.importance[e]).epsilon(1e-6));
      isum += s.importance[e];
    }
    CHECK(isum == doctest::Approx(1.0).epsilon(1e-6));
    // Without logits: the load part only.
    const auto s0 = rt::load_stats(r);
    CHECK(s0.load == w.load);
    CHECK(s0.importance.empty());
    CHECK(s0.aux_loss == 0.0);
    CHECK(s0.routing_entropy == 0.0);
    CHECK(s0.cv == s.cv);
  }
  // Perfectly balanced: token t prefers expert t mod E; uniform-ish loads.
  const std::size_t T = 24, E = 6;
  std::vector<float> l(T * E, 0.0f);
  for (std::size_t t = 0; t < T; ++t) l[t * E + t % E] = 2.0f;
  const auto r = rt::TopK{1, true}.route(l.data(), T, E);
  const auto s = rt::load_stats(r, l.data());
  CHECK(s.load == std::vector<std::size_t>(E, 4));
  CHECK(s.load_entropy == doctest::Approx(1.0).epsilon(1e-12));
  CHECK(s.max_over_mean == doctest::Approx(1.0).epsilon(1e-12));
  CHECK(s.cv == doctest::Approx(0.0).scale(1.0).epsilon(1e-12));
  // aux = E * sum_e (1/E) * (1/E) = 1 when importance is uniform too (it is, by symmetry).
  CHECK(s.aux_loss == doctest::Approx(1.0).epsilon(1e-6));
  // Uniform logits: routing entropy ln E, aux loss 1 for any routing.
  std::vector<float> flat(T * E, 0.0f);
  const auto rf = rt::TopK{2, true}.route(flat.data(), T, E);
  const auto sf = rt::load_stats(rf, flat.data());
  CHECK(sf.routing_entropy == doctest::Approx(std::log(6.0)).epsilon(1e-6));
  CHECK(sf.aux_loss == doctest::Approx(1.0).epsilon(1e-6));
  CHECK(sf.load == std::vector<std::size_t>{T, T, 0, 0, 0, 0});  // ties: experts 0 and 1
  CHECK(sf.max_over_mean == doctest::Approx(3.0));
  CHECK(sf.load_entropy == doctest::Approx(std::log(2.0) / std::log(6.0)));
  // Everything routed to one expert: entropy 0, cv sqrt(E - 1).
  const auto one = rt::TopK{1, true}.route(flat.data(), T, E);
  const auto so = rt::load_stats(one, flat.data());
  CHECK(so.load_entropy == doctest::Approx(0.0).scale(1.0));
  CHECK(so.cv == doctest::Approx(std::sqrt(5.0)));
  CHECK(so.max_over_mean == doctest::Approx(6.0));
  // Unrouted tokens are counted; T = 0 gives zeros.
  auto capped = rf;
  rt::apply_capacity(capped, {0.25, 1, rt::Overflow::drop, rt::Priority::token_order});  // capacity ceil(0.25*48/6) = 2
  const auto sc = rt::load_stats(capped);
  CHECK(sc.routed == 4);
  CHECK(sc.unrouted_tokens == T - 2);
  const auto s_empty = rt::load_stats(rt::TopK{2, true}.route(flat.data(), 0, E), flat.data());
  CHECK(s_empty.tokens == 0);
  CHECK(s_empty.routed == 0);
  CHECK(s_empty.mean_experts == 0.0);
  CHECK(s_empty.load == std::vector<std::size_t>(E, 0));
}

// ================================================================================================
// Router logits.

TEST_CASE("route: router_logits equals a double dot product (odd sizes, strides, chunks) and is thread-independent") {
  constexpr double kU = 1.0 / 16777216.0;  // 2^-24
  const std::size_t kT[] = {1, 5, 130}, kE[] = {3, 8}, kD[] = {7, 64, 257};
  s2lc::morph::ThreadPool pool(3);
  for (std::size_t T : kT)
    for (std::size_t E : kE)
      for (std::size_t d : kD) {
        CAPTURE(T); CAPTURE(E); CAPTURE(d);
        const std::size_t ldx = d + 3, ldg = d + 5;
        // Padding beyond d is NaN: reading it would poison the result.
        std::vector<float> x(T * ldx, std::numeric_limits<float>::quiet_NaN()), g(E * ldg, std::numeric_limits<float>::quiet_NaN());
        const auto xv = randn(T * d, static_cast<std::uint32_t>(T * 7 + d), 1.0f), gv = randn(E * d, static_cast<std::uint32_t>(E * 5 + d), 0.2f);
        for (std::size_t t = 0; t < T; ++t) std::copy(xv.begin() + static_cast<std::ptrdiff_t>(t * d), xv.begin() + static_cast<std::ptrdiff_t>((t + 1) * d), x.begin() + static_cast<std::ptrdiff_t>(t * ldx));
        for (std::size_t e = 0; e < E; ++e) std::copy(gv.begin() + static_cast<std::ptrdiff_t>(e * d), gv.begin() + static_cast<std::ptrdiff_t>((e + 1) * d), g.begin() + static_cast<std::ptrdiff_t>(e * ldg));
        std::vector<float> out(T * E, 123.0f), par(T * E, -7.0f);  // overwritten, not added to
        rt::router_logits(x.data(), ldx, T, g.data(), ldg, E, d, out.data());
        rt::router_logits(x.data(), ldx, T, g.data(), ldg, E, d, par.data(), &pool);
        std::size_t bad = 0;
        double worst = 0;
        for (std::size_t t = 0; t < T; ++t)
          for (std::size_t e = 0; e < E; ++e) {
            double ref = 0, abs = 0;
            for (std::size_t k = 0; k < d; ++k) {
              const double p = static_cast<double>(g[e * ldg + k]) * static_cast<double>(x[t * ldx + k]);
              ref += p, abs += std::fabs(p);
            }
            const double err = std::fabs(static_cast<double>(out[t * E + e]) - ref), lim = static_cast<double>(d + 8) * kU * abs;
            if (!(err <= lim)) ++bad;
            worst = std::max(worst, err / (lim + 1e-300));
          }
        CHECK_MESSAGE(bad == 0, "worst err / bound = " << worst);
        CHECK(std::memcmp(out.data(), par.data(), out.size() * sizeof(float)) == 0);
      }
  // T = 0 writes nothing and does not throw.
  std::vector<float> gz(3 * 4, 1.0f), none;
  CHECK_NOTHROW(rt::router_logits(nullptr, 4, 0, gz.data(), 4, 3, 4, none.data()));
}

// ================================================================================================
// Rejections.

TEST_CASE("route: invalid inputs are rejected with clear messages") {
  std::vector<float> l = randn(4 * 5, 1, 1.0f);
  l[2 * 5 + 3] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH_AS((rt::TopK{2, true}.route(l.data(), 4, 5)), doctest::Contains("TopK: logit of token 2, expert 3 is NaN"), s2lc::invalid_argument);
  CHECK_THROWS_WITH_AS((rt::NoisyTopK{}.route(l.data(), 4, 5)), doctest::Contains("NoisyTopK: logit of token 2, expert 3 is NaN"), s2lc::invalid_argument);
  CHECK_THROWS_WITH_AS((rt::TopP{}.route(l.data(), 4, 5)), doctest::Contains("TopP: logit of token 2, expert 3 is NaN"), s2lc::invalid_argument);
  rt::SigmoidBias sb5;
  sb5.k = 2;
  CHECK_THROWS_WITH_AS((sb5.route(l.data(), 4, 5)), doctest::Contains("SigmoidBias: logit of token 2, expert 3 is NaN"), s2lc::invalid_argument);
  CHECK_THROWS_WITH_AS((rt::ExpertChoice{}.route(l.data(), 4, 5)), doctest::Contains("ExpertChoice: logit of token 2, expert 3 is NaN"), s2lc::invalid_argument);
  l[2 * 5 + 3] = 0.0f;

  // k out of range.
  CHECK_THROWS_WITH_AS((rt::TopK{0, true}.route(l.data(), 4, 5)), doctest::Contains("TopK: k = 0 must be in [1, 5]"), s2lc::invalid_argument);
  CHECK_THROWS_WITH_AS((rt::TopK{6, true}.route(l.data(), 4, 5)), doctest::Contains("TopK: k = 6 must be in [1, 5]"), s2lc::invalid_argument);
  CHECK_THROWS_WITH_AS((rt::NoisyTopK{0}.route(l.data(), 4, 5)), doctest::Contains("NoisyTopK: k = 0 must be in [1, 5]"), s2lc::invalid_argument);
  CHECK_THROWS_WITH_AS((rt::NoisyTopK{6}.route(l.data(), 4, 5)), doctest::Contains("NoisyTopK: k = 6 must be in [1, 5]"), s2lc::invalid_argument);
  CHECK_THROWS_WITH_AS((rt::NoisyTopK{2, -1.0f}.route(l.data(), 4, 5)), doctest::Contains("noise_std must be finite and >= 0"), s2lc::invalid_argument);
  CHECK_THROWS_WITH_AS((rt::NoisyTopK{2, std::numeric_limits<float>::infinity()}.route(l.data(), 4, 5)), doctest::Contains("noise_std"), s2lc::invalid_argument);
  // No experts / null logits.
  CHECK_THROWS_WITH_AS((rt::TopK{1, true}.route(l.data(), 4, 0)), doctest::Contains("TopK: no experts"), s2lc::invalid_argument);
  CHECK_THROWS_WITH_AS((rt::TopK{1, true}.route(nullptr, 4, 5)), doctest::Contains("TopK: logits is null"), s2lc::invalid_argument);

  // TopP.
  CHECK_THROWS_WITH_AS((rt::TopP{0.5, 3, 2, true}.route(l.data(), 4, 5)), doctest::Contains("TopP: min_k = 3 must be in [1, max_k = 2]"), s2lc::invalid_argument);
  CHECK_THROWS_WITH_AS((rt::TopP{0.5, 0, 2, true}.route(l.data(), 4, 5)), doctest::Contains("TopP: min_k = 0 must be in [1, max_k = 2]"), s2lc::invalid_argument);
  CHECK_THROWS_WITH_AS((rt::TopP{0.5, 6, 0, true}.route(l.data(), 4, 5)), doctest::Contains("min_k = 6 must be in [1, max_k = 5]"), s2lc::invalid_argument);
  CHECK_THROWS_WITH_AS((rt::TopP{-0.1, 1, 0, true}.route(l.data(), 4, 5)), doctest::Contains("TopP: p must be finite and >= 0"), s2lc::invalid_argument);
  CHECK_THROWS_WITH_AS((rt::TopP{std::nan(""), 1, 0, true}.route(l.data(), 4, 5)), doctest::Contains("TopP: p must be finite"), s2lc::invalid_argument);

  // SigmoidBias.
  std::vector<float> l8 = randn(3 * 8, 2, 1.0f);
  rt::SigmoidBias sb;
  sb.k = 2;
  sb.bias = {0.0f, 0.0f, 0.0f};
  CHECK_THROWS_WITH_AS((sb.route(l8.data(), 3, 8)), doctest::Contains("SigmoidBias: bias has 3 entries for 8 experts"), s2lc::invalid_argument);
  sb.bias.clear();
  sb.n_groups = 3;
  CHECK_THROWS_WITH_AS((sb.route(l8.data(), 3, 8)), doctest::Contains("SigmoidBias: 8 experts do not split into 3 groups"), s2lc::invalid_argument);
  sb.n_groups = 0;
  CHECK_THROWS_WITH_AS((sb.route(l8.data(), 3, 8)), doctest::Contains("do not split into 0 groups"), s2lc::invalid_argument);
  sb.n_groups = 4, sb.topk_groups = 0;
  CHECK_THROWS_WITH_AS((sb.route(l8.data(), 3, 8)), doctest::Contains("topk_groups must be in [1, n_groups]"), s2lc::invalid_argument);
  sb.topk_groups = 5;
  CHECK_THROWS_WITH_AS((sb.route(l8.data(), 3, 8)), doctest::Contains("topk_groups must be in [1, n_groups]"), s2lc::invalid_argument);
  sb.topk_groups = 2, sb.k = 5;  // two groups of 2 experts: at most 4
  CHECK_THROWS_WITH_AS((sb.route(l8.data(), 3, 8)), doctest::Contains("SigmoidBias: k = 5 must be in [1, 4]"), s2lc::invalid_argument);
  sb.k = 0;
  CHECK_THROWS_WITH_AS((sb.route(l8.data(), 3, 8)), doctest::Contains("SigmoidBias: k = 0 must be in [1, 4]"), s2lc::invalid_argument);
  sb.n_groups = 8, sb.topk_groups = 2, sb.k = 2;  // one expert per group
  CHECK_THROWS_WITH_AS((sb.route(l8.data(), 3, 8)), doctest::Contains("at least 2 experts per group"), s2lc::invalid_argument);
  sb.n_groups = 1, sb.topk_groups = 1, sb.k = 9;
  CHECK_THROWS_WITH_AS((sb.route(l8.data(), 3, 8)), doctest::Contains("SigmoidBias: k = 9 must be in [1, 8]"), s2lc::invalid_argument);

  // ExpertChoice.
  CHECK_THROWS_WITH_AS((rt::ExpertChoice{0.0}.route(l.data(), 4, 5)), doctest::Contains("ExpertChoice: capacity_factor must be > 0"), s2lc::invalid_argument);
  CHECK_THROWS_WITH_AS((rt::ExpertChoice{-1.0}.route(l.data(), 4, 5)), doctest::Contains("capacity_factor must be > 0"), s2lc::invalid_argument);

  // Capacity.
  auto r = rt::TopK{2, true}.route(l.data(), 4, 5);
  CHECK_THROWS_WITH_AS((rt::apply_capacity(r, {1.0, 1, rt::Overflow::reroute, rt::Priority::token_order})), doctest::Contains("apply_capacity: rerouting needs the logits"),
                       s2lc::invalid_argument);
  CHECK_THROWS_WITH_AS((rt::apply_capacity(r, {0.0, 1, rt::Overflow::drop, rt::Priority::token_order})), doctest::Contains("apply_capacity: factor must be > 0"),
                       s2lc::invalid_argument);
  CHECK_THROWS_WITH_AS(rt::apply_capacity(r, {std::numeric_limits<double>::infinity(), 1, rt::Overflow::drop, rt::Priority::token_order}),
                       doctest::Contains("factor must be > 0"), s2lc::invalid_argument);
  CHECK(r.expert == rt::TopK{2, true}.route(l.data(), 4, 5).expert);  // rejected calls leave it alone

  // router_logits.
  std::vector<float> x(4 * 8, 1.0f), g(3 * 8, 1.0f), out(4 * 3);
  CHECK_THROWS_WITH_AS((rt::router_logits(x.data(), 8, 4, g.data(), 8, 0, 8, out.data())), doctest::Contains("router_logits: no experts or zero hidden size"),
                       s2lc::invalid_argument);
  CHECK_THROWS_WITH_AS((rt::router_logits(x.data(), 8, 4, g.data(), 8, 3, 0, out.data())), doctest::Contains("zero hidden size"), s2lc::invalid_argument);
  CHECK_THROWS_WITH_AS((rt::router_logits(x.data(), 7, 4, g.data(), 8, 3, 8, out.data())), doctest::Contains("row stride smaller than the hidden size"),
                       s2lc::invalid_argument);
  CHECK_THROWS_WITH_AS((rt::router_logits(x.data(), 8, 4, g.data(), 6, 3, 8, out.data())), doctest::Contains("row stride smaller"), s2lc::invalid_argument);
}

}  // namespace suite_route_token
