// Top-p routing against the trained top-2 on tinymoe (moe-upcycled, calibration activations of
// all four layers, 1024 real tokens each): experts per token and the MoE layer's output error
// relative to the top-2 layer the model was trained with. Experts run dense in f32 (BF16 weights
// widened; OpenBLAS), so the error is the routing's alone.
//   s2lc_bench_route_quality [DATA_DIR]     (default ../shared/data/tinymoe)
#include <cblas.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include <route/token.hpp>
#include <s2lc/io/safetensors.hpp>
#include <s2lc/tensor.hpp>

int main(int argc, char** argv) {
  namespace rt = s2lc::route;
  const std::string dir = argc > 1 ? argv[1] : "../shared/data/tinymoe";
  const s2lc::io::SafetensorsFile model(dir + "/moe-upcycled.safetensors"), calib(dir + "/calib-moe-upcycled.safetensors");
  const double ps[] = {0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95};
  constexpr int kP = sizeof ps / sizeof ps[0];
  double experts[kP] = {}, err[kP] = {}, norm = 0;
  std::size_t tokens = 0;
  std::printf("| layer | p | experts/token | rel. output error vs top-2 |\n|---|---|---|---|\n");
  for (int L = 0; L < 4; ++L) {
    const std::string p = "layers." + std::to_string(L);
    const auto X = s2lc::load_matrix_f32(calib, p + ".ffn_input");
    const auto G = s2lc::load_matrix_f32(model, p + ".moe.gate.weight");
    const std::size_t T = X.shape()[0], d = X.shape()[1], E = G.shape()[0];
    // Every expert's output for every token: Y[e] [T, d].
    std::vector<std::vector<float>> Y(E, std::vector<float>(T * d));
    for (std::size_t e = 0; e < E; ++e) {
      const std::string n = p + ".moe.experts." + std::to_string(e);
      const auto W1 = s2lc::load_matrix_f32(model, n + ".w1.weight"), W3 = s2lc::load_matrix_f32(model, n + ".w3.weight"),
                 W2 = s2lc::load_matrix_f32(model, n + ".w2.weight");
      const std::size_t f = W1.shape()[0];
      std::vector<float> h1(T * f), h3(T * f);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(T), int(f), int(d), 1.0f, X.data(), int(d), W1.data(), int(d), 0.0f, h1.data(), int(f));
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(T), int(f), int(d), 1.0f, X.data(), int(d), W3.data(), int(d), 0.0f, h3.data(), int(f));
      for (std::size_t i = 0; i < T * f; ++i) h1[i] = h1[i] / (1.0f + std::exp(-h1[i])) * h3[i];
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(T), int(d), int(f), 1.0f, h1.data(), int(f), W2.data(), int(f), 0.0f, Y[e].data(), int(d));
    }
    std::vector<float> logits(T * E);
    rt::router_logits(X.data(), d, T, G.data(), d, E, d, logits.data());
    auto combine = [&](const rt::Routing& r) {
      std::vector<double> out(T * d, 0.0);
      for (std::size_t t = 0; t < T; ++t)
        for (std::size_t j = 0; j < r.slots; ++j) {
          const std::int32_t e = r.expert[t * r.slots + j];
          if (e < 0) continue;
          for (std::size_t i = 0; i < d; ++i) out[t * d + i] += double(r.gate[t * r.slots + j]) * Y[std::size_t(e)][t * d + i];
        }
      return out;
    };
    const auto ref = combine(rt::TopK{2}.route(logits.data(), T, E));
    double n2 = 0;
    for (double v : ref) n2 += v * v;
    norm += n2;
    tokens += T;
    for (int k = 0; k < kP; ++k) {
      const auto r = rt::TopP{ps[k], 1, 0, true}.route(logits.data(), T, E);
      const auto y = combine(r);
      double e2 = 0;
      for (std::size_t i = 0; i < y.size(); ++i) e2 += (y[i] - ref[i]) * (y[i] - ref[i]);
      experts[k] += r.mean_active() * double(T);
      err[k] += e2;
      std::printf("| %d | %.2f | %.3f | %.4f |\n", L, ps[k], r.mean_active(), std::sqrt(e2 / n2));
    }
  }
  std::printf("\n| p | experts/token (all layers) | rel. output error vs top-2 (all layers) |\n|---|---|---|\n");
  for (int k = 0; k < kP; ++k) std::printf("| %.2f | %.3f | %.4f |\n", ps[k], experts[k] / double(tokens), std::sqrt(err[k] / norm));
  return 0;
}
