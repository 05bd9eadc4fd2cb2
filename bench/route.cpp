// Token-router throughput: 4096 tokens, d = 2048, E = 8 / 64 / 256 experts, one thread for every
// contender (OpenBLAS too), all measured in one run:
//   route/<impl>/E<E>: gemm_openblas (the logits by cblas_sgemm: the baseline a user would
//     write), gemm_s2lc (the logits by our Highway gemm_nt kernel), topk2 / topp / sigmoid
//     (the whole router: logits + selection + the CSR dispatch plan), select_topk2 (selection +
//     plan alone, from ready logits), read_bound (one streaming read of the hidden states and
//     the gate: the memory bound of the router GEMM).
// Every impl counts the same bytes (hidden states + gate + logits), so x_bound is time over the
// bandwidth bound; GFLOP/s (2 T d E per call) gives the distance to the FMA peak, which binds
// from E ~ 64 on (see bench/RESULTS.md).
#include <cstddef>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>
#include <cblas.h>

#include <route/token.hpp>
#include <s2lc/kernels/qgemm.hpp>

#include "report.hpp"

extern "C" void openblas_set_num_threads(int);

namespace {

namespace rt = s2lc::route;

constexpr std::size_t kT = 4096, kD = 2048;

enum class impl { gemm_openblas, gemm_s2lc, topk2, topp, sigmoid, select_topk2, read_bound };

std::vector<float> filled(std::size_t n, std::uint32_t seed, float scale) {
  std::vector<float> v(n);
  std::uint64_t s = seed;
  for (auto& x : v) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    x = scale * (static_cast<float>(s >> 40) / 16777216.0f - 0.5f);
  }
  return v;
}

void run(benchmark::State& state, impl which, std::size_t E) {
  openblas_set_num_threads(1);
  const auto X = filled(kT * kD, 1, 2.0f), G = filled(E * kD, 2, 0.1f);
  std::vector<float> L(kT * E);
  rt::router_logits(X.data(), kD, kT, G.data(), kD, E, kD, L.data());
  const rt::TopP topp{0.6, 1, 8, true};
  const rt::SigmoidBias sig{std::min<std::size_t>(8, E), std::vector<float>(E, 0.0f), 1, 1, true, 1.0f};
  for (auto _ : state) {
    switch (which) {
      case impl::gemm_openblas:
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(kT), int(E), int(kD), 1.0f, X.data(), int(kD), G.data(), int(kD), 0.0f,
                    L.data(), int(E));
        break;
      case impl::gemm_s2lc: rt::router_logits(X.data(), kD, kT, G.data(), kD, E, kD, L.data()); break;
      case impl::topk2: {
        rt::router_logits(X.data(), kD, kT, G.data(), kD, E, kD, L.data());
        auto p = rt::TopK{2}.route(L.data(), kT, E).plan();
        benchmark::DoNotOptimize(p.token.data());
        break;
      }
      case impl::topp: {
        rt::router_logits(X.data(), kD, kT, G.data(), kD, E, kD, L.data());
        auto p = topp.route(L.data(), kT, E).plan();
        benchmark::DoNotOptimize(p.token.data());
        break;
      }
      case impl::sigmoid: {
        rt::router_logits(X.data(), kD, kT, G.data(), kD, E, kD, L.data());
        auto p = sig.route(L.data(), kT, E).plan();
        benchmark::DoNotOptimize(p.token.data());
        break;
      }
      case impl::select_topk2: {
        auto p = rt::TopK{2}.route(L.data(), kT, E).plan();
        benchmark::DoNotOptimize(p.token.data());
        break;
      }
      case impl::read_bound: {
        float s = s2lc::kernels::stream_read(X.data(), X.size()) + s2lc::kernels::stream_read(G.data(), G.size());
        benchmark::DoNotOptimize(s);
        break;
      }
    }
    benchmark::DoNotOptimize(L.data());
    benchmark::ClobberMemory();
  }
  s2lc::bench::set_bytes(state, static_cast<double>((kT * kD + E * kD + kT * E) * sizeof(float)));
  if (which != impl::read_bound && which != impl::select_topk2)
    state.counters["GFLOP/s"] = benchmark::Counter(2.0 * kT * kD * static_cast<double>(E) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

const bool registered = [] {
  s2lc::bench::register_op("route", {"gemm_openblas", "read_bound"});
  const std::pair<const char*, impl> impls[] = {{"gemm_openblas", impl::gemm_openblas}, {"gemm_s2lc", impl::gemm_s2lc},
                                                {"topk2", impl::topk2},                 {"topp", impl::topp},
                                                {"sigmoid", impl::sigmoid},             {"select_topk2", impl::select_topk2},
                                                {"read_bound", impl::read_bound}};
  for (std::size_t E : {8u, 64u, 256u})
    for (const auto& [name, which] : impls)
      benchmark::RegisterBenchmark((std::string("route/") + name + "/E" + std::to_string(E)).c_str(),
                                   [which = which, E](benchmark::State& s) { run(s, which, E); })
          ->Unit(benchmark::kMicrosecond);
  return true;
}();

}  // namespace
