// safetensors header parsing + validation vs the floor any JSON-header reader pays: a bare
// nlohmann::json::parse of the same header. Cases: 1 000, 10 000 and 50 000 tensors (must scale
// linearly; it was quadratic once). Not memory-bound, so no bandwidth bound: baseline only.
#include <cstddef>
#include <cstring>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>
#include <nlohmann/json.hpp>

#include <s2lc/io/safetensors.hpp>

#include "report.hpp"

namespace {

std::vector<std::byte> make_file(std::size_t count) {
  std::vector<std::string> names;
  for (std::size_t i = 0; i < count; ++i) names.push_back("model.layers." + std::to_string(i / 8) + ".mlp.experts." + std::to_string(i % 8) + ".w1.weight");
  const std::vector<std::byte> one(4);
  std::vector<s2lc::io::TensorData> tensors;
  for (const auto& n : names) tensors.push_back({n, s2lc::dtype::f32, {1}, one});
  const auto layout = s2lc::io::safetensors_layout(tensors, {{"format", "pt"}}, "bench");
  std::vector<std::byte> file(layout.first.size() + 4 * count);
  std::memcpy(file.data(), layout.first.data(), layout.first.size());
  return file;
}

void parse_s2lc(benchmark::State& state) {
  const auto file = make_file(static_cast<std::size_t>(state.range(0)));
  for (auto _ : state) benchmark::DoNotOptimize(s2lc::io::parse_safetensors(file, "bench"));
  s2lc::bench::set_bytes(state, static_cast<double>(file.size()));
}

void parse_json_only(benchmark::State& state) {
  const auto file = make_file(static_cast<std::size_t>(state.range(0)));
  const auto* text = reinterpret_cast<const char*>(file.data());
  std::uint64_t n = 0;
  std::memcpy(&n, text, 8);
  for (auto _ : state) benchmark::DoNotOptimize(nlohmann::json::parse(text + 8, text + 8 + n));
  s2lc::bench::set_bytes(state, static_cast<double>(file.size()));
}

BENCHMARK(parse_s2lc)->Name("parse_header/s2lc")->ArgName("tensors")->Arg(1000)->Arg(10000)->Arg(50000)->Unit(benchmark::kMillisecond);
BENCHMARK(parse_json_only)->Name("parse_header/json_parse_only")->ArgName("tensors")->Arg(1000)->Arg(10000)->Arg(50000)->Unit(benchmark::kMillisecond);

const bool registered = [] {
  s2lc::bench::register_op("parse_header", {"json_parse_only", "none"});
  return true;
}();

}  // namespace
