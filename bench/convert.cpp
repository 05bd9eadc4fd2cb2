// Bulk dtype conversion: s2lc's dispatched kernels vs the plain loops a user would write (same
// rounding), and the bound: the same bytes at the bandwidth a memcpy reaches on the same buffers.
// hot = 16 Ki elements (in L2), cold = 32 Mi elements (192 MB touched per pass: DRAM). 1 thread.
#include <cstdint>
#include <cstring>
#include <vector>

#include <benchmark/benchmark.h>

#include <s2lc/dtype.hpp>
#include <s2lc/kernels/convert.hpp>

#include "report.hpp"

namespace {

constexpr std::size_t kHot = std::size_t{1} << 14;
constexpr std::size_t kCold = std::size_t{1} << 25;

struct Buffers {
  std::vector<float> f32;
  std::vector<std::uint16_t> u16;
  explicit Buffers(std::size_t n) : f32(n), u16(n) {
    for (std::size_t i = 0; i < n; ++i) {
      f32[i] = static_cast<float>(static_cast<int>(i % 2001) - 1000) * 1.37e-3f;
      u16[i] = s2lc::f32_to_bf16(f32[i]);
    }
  }
};

Buffers& buffers(std::size_t n) {
  static Buffers hot(kHot), cold(kCold);  // allocated and pre-faulted once per process
  return n == kHot ? hot : cold;
}

template <class Fn>
void run(benchmark::State& state, Fn&& fn, double bytes_per_element = 6.0) {
  const auto n = static_cast<std::size_t>(state.range(0));
  Buffers& b = buffers(n);
  for (auto _ : state) {
    fn(b, n);
    benchmark::ClobberMemory();
  }
  s2lc::bench::set_bytes(state, static_cast<double>(n) * bytes_per_element);  // conversions: 2 in + 4 out
}

void bf16_to_f32_s2lc(benchmark::State& s) { run(s, [](Buffers& b, std::size_t n) { s2lc::kernels::bf16_to_f32(b.u16.data(), b.f32.data(), n); }); }
void bf16_to_f32_loop(benchmark::State& s) {
  run(s, [](Buffers& b, std::size_t n) {
    for (std::size_t i = 0; i < n; ++i) b.f32[i] = s2lc::bf16_to_f32(b.u16[i]);
  });
}
void f32_to_bf16_s2lc(benchmark::State& s) { run(s, [](Buffers& b, std::size_t n) { s2lc::kernels::f32_to_bf16(b.f32.data(), b.u16.data(), n); }); }
void f32_to_bf16_loop(benchmark::State& s) {
  run(s, [](Buffers& b, std::size_t n) {
    for (std::size_t i = 0; i < n; ++i) b.u16[i] = s2lc::f32_to_bf16(b.f32[i]);
  });
}
void f16_to_f32_s2lc(benchmark::State& s) { run(s, [](Buffers& b, std::size_t n) { s2lc::kernels::f16_to_f32(b.u16.data(), b.f32.data(), n); }); }
void f16_to_f32_loop(benchmark::State& s) {
  run(s, [](Buffers& b, std::size_t n) {
    for (std::size_t i = 0; i < n; ++i) b.f32[i] = s2lc::f16_to_f32(b.u16[i]);
  });
}
void f32_to_f16_s2lc(benchmark::State& s) { run(s, [](Buffers& b, std::size_t n) { s2lc::kernels::f32_to_f16(b.f32.data(), b.u16.data(), n); }); }
void f32_to_f16_loop(benchmark::State& s) {
  run(s, [](Buffers& b, std::size_t n) {
    for (std::size_t i = 0; i < n; ++i) b.u16[i] = s2lc::f32_to_f16(b.f32[i]);
  });
}
// Bound: two memcpy of the 2-byte buffer into the two halves of the f32 buffer (reads 4n bytes,
// writes 4n); its bandwidth times a conversion's 6n bytes is the conversion's bound.
void copy_bound(benchmark::State& s) {
  run(
      s,
      [](Buffers& b, std::size_t n) {
        auto* dst = reinterpret_cast<char*>(b.f32.data());
        std::memcpy(dst, b.u16.data(), n * 2);
        std::memcpy(dst + n * 2, b.u16.data(), n * 2);
      },
      8.0);
}

#define S2LC_CONVERT_BENCH(op)                                                                               \
  BENCHMARK(op##_s2lc)->Name(#op "/s2lc")->ArgName("n")->Arg(kHot)->Arg(kCold)->Unit(benchmark::kMicrosecond); \
  BENCHMARK(op##_loop)->Name(#op "/plain_loop")->ArgName("n")->Arg(kHot)->Arg(kCold)->Unit(benchmark::kMicrosecond); \
  BENCHMARK(copy_bound)->Name(#op "/copy_bound")->ArgName("n")->Arg(kHot)->Arg(kCold)->Unit(benchmark::kMicrosecond)

S2LC_CONVERT_BENCH(bf16_to_f32);
S2LC_CONVERT_BENCH(f32_to_bf16);
S2LC_CONVERT_BENCH(f16_to_f32);
S2LC_CONVERT_BENCH(f32_to_f16);

const bool registered = [] {
  for (const char* op : {"bf16_to_f32", "f32_to_bf16", "f16_to_f32", "f32_to_f16"})
    s2lc::bench::register_op(op, {"plain_loop", "copy_bound"});
  return true;
}();

}  // namespace
