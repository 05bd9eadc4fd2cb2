// Runs kernel tests on every SIMD target Highway compiled into the dispatch tables and this CPU
// supports (not only the best one), via hwy::SetSupportedTargetsForTest.
#pragma once

#include <cstdint>
#include <vector>

#include <hwy/targets.h>

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

}  // namespace s2lc::test
