// Routing on the real tinymoe models (../shared/data/tinymoe): the top-2 router over the trained
// gate reproduces the model's own expert choices on its calibration activations exactly (every
// layer, every token); top-p keeps the top-2 choice as its first experts and its output error
// against the top-2 layer falls as p grows; the dispatch plan a router builds round-trips through
// grouped apply (the SwiGLU layer from the plan equals the per-token sum over the routing); the
// context router reaches >= 95 % on held-out 300-byte prompts of c / py / en.
#include <doctest/doctest.h>

#include "compress/synthetic.hpp"
#include "support.hpp"

#include <morph/grouped.hpp>
#include <route/context.hpp>
#include <route/token.hpp>
#include <s2lc/compress/compressor.hpp>
#include <s2lc/io/safetensors.hpp>
#include <s2lc/tensor.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

// The suite's own scope: the suites compile in unity groups (tests/CMakeLists.txt).
namespace suite_route_tinymoe {

namespace {

namespace rt = s2lc::route;
namespace mo = s2lc::morph;

std::filesystem::path tinymoe() { return s2lc::test::shared_dir() / "tinymoe"; }

std::string slurp(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  REQUIRE(f.good());
  return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

struct Layer {
  s2lc::matrix x;       // [1024, 256] FFN input
  s2lc::matrix gate;    // [8, 256]
  std::vector<std::int32_t> topk;  // [1024, 2] the model's choices
};

Layer load_layer(const s2lc::io::SafetensorsFile& model, const s2lc::io::SafetensorsFile& calib, int L) {
  const std::string p = "layers." + std::to_string(L);
  Layer l{s2lc::load_matrix_f32(calib, p + ".ffn_input"), s2lc::load_matrix_f32(model, p + ".moe.gate.weight"), {}};
  const auto v = calib.view<std::int32_t>(p + ".router_topk");
  l.topk.assign(v.begin(), v.end());
  return l;
}

std::vector<float> logits_of(const Layer& l) {
  const std::size_t T = l.x.shape()[0], d = l.x.shape()[1], E = l.gate.shape()[0];
  std::vector<float> out(T * E);
  rt::router_logits(l.x.data(), d, T, l.gate.data(), d, E, d, out.data());
  return out;
}

}  // namespace

TEST_CASE("route: top-2 over the trained gate reproduces tinymoe's own expert choices on its calibration activations") {
  const s2lc::io::SafetensorsFile model(tinymoe() / "moe-upcycled.safetensors"), calib(tinymoe() / "calib-moe-upcycled.safetensors");
  for (int L = 0; L < 4; ++L) {
    CAPTURE(L);
    const Layer l = load_layer(model, calib, L);
    const std::size_t T = l.x.shape()[0], E = l.gate.shape()[0];
    REQUIRE(T == 1024);
    const auto logits = logits_of(l);
    const auto r = rt::TopK{2}.route(logits.data(), T, E);
    std::size_t same = 0;
    for (std::size_t i = 0; i < T * 2; ++i) same += r.expert[i] == l.topk[i];
    CHECK(same == T * 2);  // every token, in the model's order (highest logit first)
    for (std::size_t t = 0; t < T; ++t) {
      REQUIRE(std::fabs(r.gate[2 * t] + r.gate[2 * t + 1] - 1.0f) < 1e-6f);
      REQUIRE(r.gate[2 * t] >= r.gate[2 * t + 1]);
    }
    // The load the trained balancing loss produced: every expert used, none starved.
    const auto s = rt::load_stats(r, logits.data());
    CHECK(s.routed == 2 * T);
    CHECK(s.unrouted_tokens == 0);
    for (auto n : s.load) CHECK(n > 0);
    CHECK(s.routing_entropy > 0.0);
    CHECK(s.routing_entropy <= std::log(8.0) + 1e-9);
  }
}

TEST_CASE("route: top-p on real logits starts with the model's first choice, more p, more experts (0 -> 1, 1 -> all 8)") {
  const s2lc::io::SafetensorsFile model(tinymoe() / "moe-upcycled.safetensors"), calib(tinymoe() / "calib-moe-upcycled.safetensors");
  const Layer l = load_layer(model, calib, 1);
  const std::size_t T = l.x.shape()[0], E = 8;
  const auto logits = logits_of(l);
  double prev = 0;
  for (double p : {0.0, 0.3, 0.6, 0.9, 1.0}) {
    CAPTURE(p);
    const auto r = rt::TopP{p, 1, 0}.route(logits.data(), T, E);
    for (std::size_t t = 0; t < T; ++t) REQUIRE(r.expert[t * E] == l.topk[2 * t]);  // first choice = the model's first
    const double mean = r.mean_active();
    CHECK(mean >= prev);
    prev = mean;
    if (p == 0.0) CHECK(mean == 1.0);
    if (p == 1.0) CHECK(mean == 8.0);
  }
}

TEST_CASE("route: a router's plan round-trips through the SwiGLU layer (real tinymoe experts, capacity drops included)") {
  // Layer-1 experts of the in-repo fixture compressed at ratio 8 (w1, w2, w3), gate and
  // activations from the in-repo calibration fixture.
  const s2lc::io::SafetensorsFile f(s2lc::test::data_dir() / "tinymoe-upcycled-L1.safetensors");
  const s2lc::io::SafetensorsFile calib(s2lc::test::data_dir() / "tinymoe-upcycled-L1-calib.safetensors");
  const Layer l = load_layer(f, calib, 1);
  const auto c = s2lc::test::tinymoe_l1_compressed(false);
  const auto w1 = mo::KGroup::from(c.groups[0]), w2 = mo::KGroup::from(c.groups[1]), w3 = mo::KGroup::from(c.groups[2]);
  const mo::SwiGLUExperts L{&w1, &w3, &w2};
  const std::size_t T = 64, d = 256, E = 8;
  std::vector<float> logits(T * E);
  rt::router_logits(l.x.data(), d, T, l.gate.data(), d, E, d, logits.data());
  auto r = rt::TopK{2}.route(logits.data(), T, E);
  const auto rep = rt::apply_capacity(r, {1.0, 1, rt::Overflow::drop, rt::Priority::token_order});
  CHECK(rep.dropped > 0);  // capacity 16 per expert: real routing is not perfectly balanced
  const auto plan = r.plan();

  std::vector<float> Y(T * d, 0.0f);
  std::vector<std::byte> mem(mo::swiglu_scratch_bytes(L, T, plan.routed(), 1));
  mo::Arena arena(mem);
  mo::swiglu_apply(L, plan, l.x.data(), d, Y.data(), d, arena);

  // Reference: every token through each of its routed experts alone, weighted by the gate.
  std::vector<float> ref(T * d, 0.0f);
  for (std::size_t t = 0; t < T; ++t)
    for (std::size_t j = 0; j < r.slots; ++j) {
      const std::int32_t e = r.expert[t * r.slots + j];
      if (e < 0) continue;
      const std::int32_t id[1] = {e};
      const float g[1] = {r.gate[t * r.slots + j]};
      const auto p1 = s2lc::DispatchPlan::from_topk(E, 1, 1, id, g);
      std::vector<float> y(d, 0.0f);
      std::vector<std::byte> m1(mo::swiglu_scratch_bytes(L, 1, 1, 1));
      mo::Arena a1(m1);
      mo::swiglu_apply(L, p1, l.x.data() + t * d, d, y.data(), d, a1);
      for (std::size_t i = 0; i < d; ++i) ref[t * d + i] += y[i];
    }
  double err = 0, norm = 0;
  for (std::size_t i = 0; i < T * d; ++i) err += std::pow(double(Y[i]) - ref[i], 2), norm += std::pow(double(ref[i]), 2);
  CHECK(norm > 0);
  CHECK(std::sqrt(err / norm) < 1e-5);
  // Tokens that lost every expert get exactly nothing.
  for (std::size_t t = 0; t < T; ++t)
    if (r.active(t) == 0)
      for (std::size_t i = 0; i < d; ++i) REQUIRE(Y[t * d + i] == 0.0f);
}

TEST_CASE("route: the context router picks c / py / en for >= 95 % of held-out 300-byte prompts") {
  // Training prompts: 1000 per domain, evenly spaced over the training corpus (first 95 %).
  // Held-out prompts: every consecutive 300-byte piece of eval-<d>.txt (the last 5 %).
  std::vector<rt::Example> train, held;
  const std::size_t B = 300, N = s2lc::test::kSanitized ? 300 : 1000;
  for (const char* d : {"c", "py", "en"}) {
    const std::string corpus = slurp(tinymoe() / (std::string("corpus-") + d + ".train.bin"));
    const std::string ev = slurp(tinymoe() / (std::string("eval-") + d + ".txt"));
    const std::size_t step = (corpus.size() - B) / N;
    for (std::size_t i = 0; i < N; ++i) train.push_back({d, rt::bytes_to_symbols(std::string_view(corpus).substr(i * step, B))});
    for (std::size_t i = 0; i + B <= ev.size(); i += B) held.push_back({d, rt::bytes_to_symbols(std::string_view(ev).substr(i, B))});
  }
  const auto r = rt::ContextRouter::fit(train);
  CHECK(r.calibrated());
  std::size_t ok = 0, fallback = 0;
  double conf = 0;
  for (const auto& e : held) {
    const auto d = r.route(std::span<const std::uint32_t>(e.symbols));
    const auto best = static_cast<std::size_t>(std::max_element(d.scores.begin(), d.scores.end()) - d.scores.begin());
    ok += r.modules()[best] == e.domain;
    fallback += d.fallback;
    conf += d.confidence;
  }
  const double acc = double(ok) / double(held.size());
  MESSAGE("context router: " << held.size() << " held-out prompts, accuracy " << acc << ", fallback " << fallback << ", mean confidence "
                             << conf / double(held.size()));
  CHECK(held.size() == 1998);
  CHECK(acc >= (s2lc::test::kSanitized ? 0.93 : 0.95));
  // Calibrated: the mean confidence is close to the accuracy (temperature scaling).
  CHECK(std::fabs(conf / double(held.size()) - acc) < 0.05);
}

}  // namespace suite_route_tinymoe
