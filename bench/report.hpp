// Benchmark reporting: every benchmark is named "<op>/<impl>/<case>"; after the run, a table gives
// each impl's time as a ratio to the baseline impl and to the bandwidth bound of the same op and
// case, all measured in the same run (see bench/RESULTS.md).
#pragma once

#include <cstddef>
#include <map>
#include <new>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>

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

/// Bytes past a 64-byte boundary at which every Buffer starts: 0 (aligned, as engines allocate
/// weights: PyTorch to 64 bytes) unless --s2lc_buffer_offset=B says otherwise (std::vector's own
/// large allocations start 16 bytes past a boundary: --s2lc_buffer_offset=16).
inline std::size_t& buffer_offset() {
  static std::size_t offset = 0;  // set by main before any benchmark runs
  return offset;
}

/// std::vector storage at buffer_offset() past a 64-byte boundary.
template <class T>
struct BufferAlloc {
  using value_type = T;
  BufferAlloc() = default;
  template <class U>
  BufferAlloc(const BufferAlloc<U>&) noexcept {}
  T* allocate(std::size_t n) {
    char* p = static_cast<char*>(::operator new(n * sizeof(T) + 64, std::align_val_t{64}));
    return reinterpret_cast<T*>(p + buffer_offset());
  }
  void deallocate(T* p, std::size_t) noexcept { ::operator delete(reinterpret_cast<char*>(p) - buffer_offset(), std::align_val_t{64}); }
  template <class U>
  bool operator==(const BufferAlloc<U>&) const noexcept { return true; }
};

/// The benches' weight buffers (dense matrices, merge targets): see buffer_offset().
template <class T>
using Buffer = std::vector<T, BufferAlloc<T>>;

}  // namespace s2lc::bench
