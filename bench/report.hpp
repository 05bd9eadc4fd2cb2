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

/// Sets the counters a bound is computed from: bytes this op moves per iteration.
inline void set_bytes(benchmark::State& state, double bytes_per_iter) {
  state.counters["bytes"] = bytes_per_iter;
  state.counters["GB/s"] = benchmark::Counter(bytes_per_iter * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

}  // namespace s2lc::bench
