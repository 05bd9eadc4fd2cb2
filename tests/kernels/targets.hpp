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

#include "s2lc/kernels/amx.hpp"
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

/// The settings of a kernel-path switch to test on `target`: both where it is AVX3_DL and the CPU
/// has the instructions (the kernels then have two paths there), else the default.
inline std::vector<bool> insn_modes(std::int64_t target, bool cpu_has) {
  if (target == HWY_AVX3_DL && cpu_has) return {true, false};
  return {true};
}
/// kernels::allow_avx512_bf16 (bf16 rounding with vcvtneps2bf16) and kernels::allow_amx (q_gemm_nt on AMX tiles).
inline std::vector<bool> bf16_insn_modes(std::int64_t target) { return insn_modes(target, s2lc::kernels::cpu_has_avx512_bf16()); }
inline std::vector<bool> amx_modes(std::int64_t target) { return insn_modes(target, s2lc::kernels::cpu_has_amx_bf16()); }

/// kernels::allow_vnni: both settings on AVX2 where the CPU has AVX-VNNI and on AVX3 where it has
/// AVX512_VNNI (the int8 kernels have a vpdpbusd form there beside pmaddubsw), else the default.
inline std::vector<bool> vnni_modes(std::int64_t target) {
  if ((target == HWY_AVX2 && s2lc::kernels::cpu_has_avx_vnni()) || (target == HWY_AVX3 && s2lc::kernels::cpu_has_avx512_vnni())) return {true, false};
  return {true};
}

/// Set(allow) for its lifetime, then Set(true) (the default).
template <void (*Set)(bool) noexcept>
class InsnScope {
 public:
  explicit InsnScope(bool allow) { Set(allow); }
  ~InsnScope() { Set(true); }
  InsnScope(const InsnScope&) = delete;
  InsnScope& operator=(const InsnScope&) = delete;
};
using Bf16InsnScope = InsnScope<&s2lc::kernels::allow_avx512_bf16>;
using AmxScope = InsnScope<&s2lc::kernels::allow_amx>;
using VnniScope = InsnScope<&s2lc::kernels::allow_vnni>;

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
