// Shared main for s2lc benches: runs the benchmarks, then prints ratio tables (see report.hpp).
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <algorithm>
#include <map>
#include <regex>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>

#include "report.hpp"
#include "targets.hpp"

#include <s2lc/kernels/amx.hpp>
#include <s2lc/kernels/cpu.hpp>

namespace s2lc::bench {
namespace {

std::map<std::string, OpSpec>& specs() {
  static std::map<std::string, OpSpec> s;  // bench-program configuration, set up before the run
  return s;
}

std::vector<Target>& targets() {
  static std::vector<Target> t;  // likewise
  return t;
}

struct Result {
  double seconds = 0;  // per iteration: the fastest repetition's
  double bytes = 0;    // moved per iteration
  int reps = 0;        // repetitions seen
};

// The time res's bytes take at the bandwidth the bound row reached (its bytes over its time) on
// the same case; 0 where either row has no bytes.
double BoundSeconds(const Result& res, const Result& bound) {
  return bound.bytes > 0 && res.bytes > 0 ? res.bytes / (bound.bytes / bound.seconds) : 0.0;
}

class RatioReporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    ConsoleReporter::ReportRuns(runs);
    for (const auto& r : runs) {
      if (r.run_type != Run::RT_Iteration || r.iterations == 0) continue;
      const std::string name = r.benchmark_name();
      const auto a = name.find('/');
      const auto b = name.find('/', a + 1);
      if (a == std::string::npos || b == std::string::npos) continue;
      Result& res = results_[name.substr(0, a)][name.substr(b + 1)][name.substr(a + 1, b - a - 1)];
      const double sec = r.GetAdjustedRealTime() / benchmark::GetTimeUnitMultiplier(r.time_unit);
      res.seconds = res.reps ? std::min(res.seconds, sec) : sec;
      ++res.reps;
      if (auto it = r.counters.find("bytes"); it != r.counters.end()) res.bytes = it->second.value;
    }
  }

  void PrintRatios() const {
    for (const auto& [op, cases] : results_) {
      const auto spec_it = specs().find(op);
      if (spec_it == specs().end()) continue;
      const OpSpec& spec = spec_it->second;
      std::printf("\n%s: time ratios (lower is better), baseline '%s', bound from '%s' in this run%s\n", op.c_str(),
                  spec.baseline.c_str(), spec.bound_impl.c_str(), reps_note());
      const bool with_read = !spec.read_impl.empty();
      std::printf("  %-14s %-16s %12s %10s %10s %12s%s\n", "case", "impl", "us/iter", "GB/s", "x_baseline", "x_bound",
                  with_read ? "       x_read" : "");
      for (const auto& [c, impls] : cases) {
        const auto base = impls.find(spec.baseline);
        const auto bound = impls.find(spec.bound_impl);
        const auto read = with_read ? impls.find(spec.read_impl) : impls.end();
        for (const auto& [impl, res] : impls) {
          if (impl == spec.bound_impl) continue;
          const double gbs = res.bytes / res.seconds * 1e-9;
          const double vs_base = base != impls.end() ? res.seconds / base->second.seconds : 0.0;
          const double bound_s = bound != impls.end() ? BoundSeconds(res, bound->second) : 0.0;
          const double vs_bound = bound_s > 0 ? res.seconds / bound_s : 0.0;
          char bound_text[32] = "n/a";
          if (vs_bound > 0) std::snprintf(bound_text, sizeof bound_text, "%.3f", vs_bound);
          char read_text[32] = "";
          if (with_read) {
            std::snprintf(read_text, sizeof read_text, " %12s", "n/a");
            if (read != impls.end() && impl != spec.read_impl && res.bytes > 0 && res.bytes == read->second.bytes)
              std::snprintf(read_text, sizeof read_text, " %12.3f", res.seconds / read->second.seconds);
          }
          std::printf("  %-14s %-16s %12.2f %10.2f %10.3f %12s%s\n", c.c_str(), impl.c_str(), res.seconds * 1e6, gbs, vs_base,
                      bound_text, read_text);
        }
        if (bound != impls.end())
          std::printf("  %-14s %-16s %12.2f %10.2f %10s %12s\n", c.c_str(), spec.bound_impl.c_str(), bound->second.seconds * 1e6,
                      bound->second.bytes / bound->second.seconds * 1e-9, "", "(bound)");
      }
    }
  }

  /// The registered targets on the rows that ran: one line per (target, case, impl), then a count.
  void PrintTargets() const {
    int met = 0, rows = 0;
    for (const Target& t : targets()) {
      const auto op_it = results_.find(t.op);
      const auto spec_it = specs().find(t.op);
      if (op_it == results_.end()) continue;
      const std::regex re(t.cases);
      for (const auto& [c, impls] : op_it->second) {
        if (!std::regex_match(c, re)) continue;
        const auto ref = impls.find(t.ref);
        const auto bound = spec_it != specs().end() ? impls.find(spec_it->second.bound_impl) : impls.end();
        for (const std::string& impl : t.impls) {
          const auto it = impls.find(impl);
          if (it == impls.end()) continue;
          const Result& res = it->second;
          const bool need_bound = t.kind == Target::Kind::bound || t.kind == Target::Kind::max_bound;
          const bool need_ref = t.kind != Target::Kind::bound;
          if (need_ref && ref == impls.end()) continue;
          const double bound_s = need_bound && bound != impls.end() ? BoundSeconds(res, bound->second) : 0.0;
          if (need_bound && bound_s <= 0) continue;
          double fig = 0;
          switch (t.kind) {
            case Target::Kind::bound: fig = res.seconds / bound_s; break;
            case Target::Kind::max_bound: fig = res.seconds / std::max(bound_s, ref->second.seconds); break;
            case Target::Kind::time_ratio: fig = res.seconds / ref->second.seconds; break;
            case Target::Kind::speedup: fig = ref->second.seconds / res.seconds; break;
          }
          const bool ok = t.kind == Target::Kind::speedup ? fig >= t.limit : fig <= t.limit;
          if (rows++ == 0) {
            std::printf("\ntargets: each figure from this run%s\n", reps_note());
            std::printf("  %-44s %-26s %-18s %8s %8s %4s\n", "target", "case", "impl", "figure", "limit", "met");
          }
          met += ok;
          std::printf("  %-44s %-26s %-18s %8.3f %7s%.2f %4s\n", t.what.c_str(), c.c_str(), impl.c_str(), fig,
                      t.kind == Target::Kind::speedup ? ">=" : "<=", t.limit, ok ? "yes" : "no");
        }
      }
    }
    if (rows) std::printf("  %d of %d met\n", met, rows);
  }

 private:
  const char* reps_note() const {
    for (const auto& [op, cases] : results_)
      for (const auto& [c, impls] : cases)
        for (const auto& [impl, res] : impls)
          if (res.reps > 1) return " (times: the fastest repetition of each row)";
    return "";
  }

  std::map<std::string, std::map<std::string, std::map<std::string, Result>>> results_;  // op -> case -> impl
};

}  // namespace

void register_op(const std::string& op, OpSpec spec) { specs()[op] = std::move(spec); }

void register_target(Target t) { targets().push_back(std::move(t)); }

}  // namespace s2lc::bench

// Removes argv[i] (a flag of ours, before Google Benchmark sees the rest); i then names the next.
static void drop_arg(int& argc, char** argv, int& i) {
  for (int j = i; j + 1 < argc; ++j) argv[j] = argv[j + 1];
  --argc, --i;
}

int main(int argc, char** argv) {
  // --s2lc_target=NAME: the kernels run that SIMD target of the dispatch build (see targets.hpp).
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i], flag = "--s2lc_target=";
    if (a.rfind(flag, 0) != 0) continue;
    try {
      s2lc::cli::limit_dispatch_target(a.substr(flag.size()));
    } catch (const std::exception& e) {
      std::fprintf(stderr, "%s\n", e.what());
      return 2;
    }
    drop_arg(argc, argv, i);
  }
  // --s2lc_no_avx512_bf16: the AVX3_DL kernels round to bf16 in integer arithmetic even where the
  // CPU has AVX512_BF16 (kernels::allow_avx512_bf16), to time both paths with one binary.
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--s2lc_no_avx512_bf16") != 0) continue;
    s2lc::kernels::allow_avx512_bf16(false);
    drop_arg(argc, argv, i);
  }
  // --s2lc_no_amx: q_gemm_nt keeps its AVX-512 kernels where the CPU has AMX tiles
  // (kernels::allow_amx), to time both paths with one binary.
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--s2lc_no_amx") != 0) continue;
    s2lc::kernels::allow_amx(false);
    drop_arg(argc, argv, i);
  }
  // --s2lc_no_vnni: the AVX2 / AVX3 int8 kernels keep pmaddubsw + pmaddwd where the CPU has
  // AVX-VNNI / AVX512_VNNI (kernels::allow_vnni), to time both paths with one binary.
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--s2lc_no_vnni") != 0) continue;
    s2lc::kernels::allow_vnni(false);
    drop_arg(argc, argv, i);
  }
  // --s2lc_buffer_offset=B: weight buffers start B bytes past a 64-byte boundary (report.hpp).
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i], flag = "--s2lc_buffer_offset=";
    if (a.rfind(flag, 0) != 0) continue;
    const std::string v = a.substr(flag.size());
    if (v.empty() || v.size() > 2 || v.find_first_not_of("0123456789") != std::string::npos || std::stoul(v) >= 64 || std::stoul(v) % 4) {
      std::fprintf(stderr, "--s2lc_buffer_offset: want a multiple of 4 below 64, got '%s'\n", v.c_str());
      return 2;
    }
    s2lc::bench::buffer_offset() = std::stoul(v);
    drop_arg(argc, argv, i);
  }
  std::printf("weight buffers start %zu bytes past a 64-byte boundary\n", s2lc::bench::buffer_offset());
  // (dispatch runs the first target listed; this TU has no dispatched kernels to ask: AVX512_BF16
  // and AMX serve AVX3_DL only)
  const std::int64_t first = hwy::SupportedAndGeneratedTargets().front();
  const bool vnni = s2lc::kernels::vnni_on_target(first);
  std::printf("SIMD targets runtime dispatch may pick, best first (it runs the first): %s; AVX512_BF16 instructions: %s; "
              "AMX tiles: %s; int8 VNNI instructions: %s\n",
              s2lc::cli::dispatch_targets().c_str(), s2lc::kernels::use_avx512_bf16() && first == HWY_AVX3_DL ? "used" : "not used",
              s2lc::kernels::use_amx() && first == HWY_AVX3_DL ? "used" : "not used", vnni ? "used" : "not used");
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  s2lc::bench::RatioReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  reporter.PrintRatios();
  reporter.PrintTargets();
  benchmark::Shutdown();
  return 0;
}
