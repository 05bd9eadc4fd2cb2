// Benchmark reporting: every benchmark is named "<op>/<impl>/<case>"; after the run, a table gives
// each impl's time as a ratio to the baseline impl and to the bandwidth bound of the same op and
// case, all measured in the same run (see bench/RESULTS.md).
#pragma once

#include <cstddef>
#include <map>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>

#include "buffer.hpp"  // tools/s2lc: Buffer, buffer_offset

namespace s2lc::bench {

/// What to compare for one op: the baseline impl a user would otherwise use, and the bytes the op
/// must move per iteration (for the bound, from the "bandwidth" counter of the `bound_impl`).
struct OpSpec {
  std::string baseline;
  std::string bound_impl = "copy_bound";
  /// Optional: an impl that reads exactly the bytes of the measured op where they are (column
  /// x_read: time over its time, for impls moving the same bytes; n/a for the others).
  std::string read_impl = "";
};

/// Registers an op's comparison spec (call before RunSpecifiedBenchmarks).
void register_op(const std::string& op, OpSpec spec);

/// A speed target, checked after the run on the rows that ran (table "targets"): for every case of
/// `op` whose name matches `cases` and every impl of `impls` that ran on it, one figure against
/// `limit`. The figure, from the same run:
/// - bound: the impl's time over its bytes at the bandwidth the op's bound impl reached;
/// - max_bound: its time over the larger of that and `ref`'s time (a compute bound);
/// - time_ratio: its time over `ref`'s;
/// - speedup: `ref`'s time over its time (the one figure that must reach `limit`, not stay below).
struct Target {
  enum class Kind { bound, max_bound, time_ratio, speedup };
  std::string what;  ///< the target in words
  std::string op;
  std::vector<std::string> impls;
  std::string cases;  ///< ECMAScript regular expression, matched against the whole case name
  Kind kind = Kind::bound;
  std::string ref;
  double limit = 0;
};

/// Registers a target (call before RunSpecifiedBenchmarks).
void register_target(Target t);

/// Sets the counters a bound is computed from: bytes this op moves per iteration.
inline void set_bytes(benchmark::State& state, double bytes_per_iter) {
  state.counters["bytes"] = bytes_per_iter;
  state.counters["GB/s"] = benchmark::Counter(bytes_per_iter * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

}  // namespace s2lc::bench
