// s2lc bench apply — compressed apply against OpenBLAS dense and the bandwidth bound, measured in
// one run (see apply_bench.hpp and bench/RESULTS.md).
#include <cstdio>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "apply_bench.hpp"
#include "cli.hpp"
#include "targets.hpp"

namespace s2lc::cli {

int run_bench(const std::vector<std::string>& args) {
  if (args.empty() || args[0] != "apply")
    throw usage_error("bench: usage: s2lc bench apply --rows M --cols N --ratio R --batch B [--threads T] [--morph K [--truncate] [--morph-bits 8|4]] [--activations f32|int8] [--target NAME] [--hot] [--json]");
  apply_bench::Config c;
  bool json = false, morph_bits_given = false;
  for (std::size_t i = 1; i < args.size(); ++i) {
    const std::string& a = args[i];
    auto value = [&]() -> const std::string& {
      if (i + 1 >= args.size()) throw usage_error(a + " needs a value");
      return args[++i];
    };
    if (a == "--rows") c.rows = parse_count(a, value());
    else if (a == "--cols") c.cols = parse_count(a, value());
    else if (a == "--batch") c.batch = parse_count(a, value());
    else if (a == "--threads") c.threads = static_cast<unsigned>(parse_count(a, value()));
    else if (a == "--morph") c.morph = static_cast<unsigned>(parse_count(a, value()));
    else if (a == "--truncate") c.truncate = true;
    else if (a == "--morph-bits") {
      const std::string& v = value();
      if (v != "8" && v != "4") throw usage_error("--morph-bits must be 8 or 4, got '" + v + "'");
      c.morph_bits = v == "8" ? 8 : 4;
      morph_bits_given = true;
    }
    else if (a == "--experts") c.experts = parse_count(a, value());
    else if (a == "--hot") c.cold = false;
    else if (a == "--activations") {
      const std::string& v = value();
      if (v == "f32") c.act = morph::Activations::f32;
      else if (v == "int8") c.act = morph::Activations::int8;
      else throw usage_error("--activations must be f32 or int8, got '" + v + "'");
    }
    else if (a == "--target") {
      const std::string& v = value();
      try {
        limit_dispatch_target(v);
      } catch (const std::invalid_argument& e) {
        throw usage_error(e.what());
      }
    }
    else if (a == "--json") json = true;
    else if (a == "--seconds") c.seconds = parse_number(a, value());
    else if (a == "--ratio") {
      c.ratio = parse_number(a, value());
      if (!(c.ratio >= 1)) throw usage_error("--ratio must be at least 1");
    } else throw usage_error("bench apply: unknown option '" + a + "'");
  }
  if (c.rows == 0 || c.cols == 0 || c.batch == 0 || c.batch > 4096 || c.threads == 0)
    throw usage_error("bench apply: rows, cols, threads and batch (<= 4096) must be positive");
  if (c.morph == 1 || c.morph > 64) throw usage_error("bench apply: --morph K needs 2 <= K <= 64");
  if (c.truncate && !c.morph) throw usage_error("bench apply: --truncate applies to --morph K");
  if (morph_bits_given && !c.morph) throw usage_error("bench apply: --morph-bits applies to --morph K");
  const auto r = apply_bench::run(c);
  nlohmann::ordered_json j;
  j["rows"] = c.rows, j["cols"] = c.cols, j["ratio"] = c.ratio, j["batch"] = c.batch, j["threads"] = c.threads;
  // a cold run's cycle: copies of the expert (and of the dense matrix) over cold_bytes
  j["cold"] = c.cold, j["cold_bytes"] = c.cold ? c.cold_bytes : 0, j["copies"] = r.copies, j["target"] = kernels::kernel_target();
  j["openblas_core"] = openblas_get_corename();
  j["amx"] = kernels::amx_in_use();  // q_gemm_nt's f32 batches ran on AMX tiles
  j["vnni"] = kernels::vnni_in_use();  // int8 products ran on vpdpbusd / vpdpwssd
  j["activations"] = c.act == morph::Activations::int8 ? "int8" : "f32";
  j["bytes"] = r.bytes, j["dense_f32_bytes"] = r.dense_bytes, j["bandwidth_gbs"] = r.bandwidth_gbs;
  j["us_per_call"] = r.us, j["openblas_us_per_call"] = r.openblas_us, j["dense_highway_us_per_call"] = r.dense_us;
  j["f32_activations_us_per_call"] = r.f32_us, j["int8_activations_us_per_call"] = r.int8_us;
  j["speedup_vs_openblas"] = r.openblas_us / r.us;
  j["macs"] = r.macs, j["fma_gmacs"] = r.fma_gmacs;
  j["bandwidth_bound_us"] = r.bandwidth_bound_us, j["fma_bound_us"] = r.fma_bound_us;
  j["bound_us"] = r.bound_us, j["bound_ratio"] = r.us / r.bound_us;
  j["read_us"] = r.read_us, j["read_ratio"] = r.us / r.read_us;
  j["openblas_bound_ratio"] = r.openblas_us / r.dense_bound_us;
  if (c.morph) {
    j["morph_k"] = c.morph, j["morph_bytes"] = r.morph_bytes, j["morph_us_per_call"] = r.morph_us;
    j["single_us_per_call_1thread"] = r.single_serial_us, j["morph_vs_single"] = r.morph_us / r.single_serial_us;
    j["morph_bits"] = c.morph_bits, j["morph_truncate"] = c.truncate, j["morph_rel_error"] = r.morph_rel_error;
  }
  if (json) {
    std::printf("%s\n", j.dump(2).c_str());
    return 0;
  }
  for (auto it = j.begin(); it != j.end(); ++it) std::printf("%-28s %s\n", it.key().c_str(), it.value().dump().c_str());
  return 0;
}

}  // namespace s2lc::cli
