// Runs kernel tests on every SIMD target Highway compiled into the dispatch tables and this CPU
// supports (not only the best one), via hwy::SetSupportedTargetsForTest.
#pragma once

#include <cstdint>
#include <vector>

#include <hwy/targets.h>

#if defined(__SSE__) || defined(_M_X64)
#include <xmmintrin.h>
#define S2LC_TEST_MXCSR 1
#else
#define S2LC_TEST_MXCSR 0
#endif

#include "s2lc/kernels/cpu.hpp"

namespace s2lc::test {

/// Targets to test: all compiled + supported ones (AVX3_DL, AVX3, AVX2, SSE4, SSSE3 and the
/// baseline EMU128/SCALAR on this machine).
inline std::vector<std::int64_t> compiled_targets() { return hwy::SupportedAndGeneratedTargets(); }

/// Restricts dispatch to one target for its lifetime.
class TargetScope {
 public:
  explicit TargetScope(std::int64_t target) { hwy::SetSupportedTargetsForTest(target); }
  ~TargetScope() { hwy::SetSupportedTargetsForTest(0); }
  TargetScope(const TargetScope&) = delete;
  TargetScope& operator=(const TargetScope&) = delete;
};

/// The settings of kernels::allow_avx512_bf16 to test on `target`: both where it is AVX3_DL and
/// the CPU has AVX512_BF16 (the kernels then have two bf16 paths there), else the default.
inline std::vector<bool> bf16_insn_modes(std::int64_t target) {
  if (target == HWY_AVX3_DL && s2lc::kernels::cpu_has_avx512_bf16()) return {true, false};
  return {true};
}

/// kernels::allow_avx512_bf16(allow) for its lifetime.
class Bf16InsnScope {
 public:
  explicit Bf16InsnScope(bool allow) { s2lc::kernels::allow_avx512_bf16(allow); }
  ~Bf16InsnScope() { s2lc::kernels::allow_avx512_bf16(true); }
  Bf16InsnScope(const Bf16InsnScope&) = delete;
  Bf16InsnScope& operator=(const Bf16InsnScope&) = delete;
};

/// The settings of FlushScope to test: flushing too where the CPU has MXCSR (x86).
inline std::vector<bool> flush_modes() {
  if (S2LC_TEST_MXCSR) return {false, true};
  return {false};
}

/// With `on`, MXCSR's flush-to-zero and denormals-are-zero bits set for its lifetime, as engines
/// run that flush denormals (PyTorch's set_flush_denormal, oneDNN); this thread only.
class FlushScope {
 public:
  explicit FlushScope(bool on) {
#if S2LC_TEST_MXCSR
    old_ = _mm_getcsr();
    if (on) _mm_setcsr(old_ | 0x8040u);
#else
    (void)on;
#endif
  }
  ~FlushScope() {
#if S2LC_TEST_MXCSR
    _mm_setcsr(old_);
#endif
  }
  FlushScope(const FlushScope&) = delete;
  FlushScope& operator=(const FlushScope&) = delete;

 private:
  unsigned old_ = 0;
};

}  // namespace s2lc::test
