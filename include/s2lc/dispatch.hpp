// s2lc — runtime (dynamic) SIMD dispatch tables.
//
// With S2LC_DYNAMIC_DISPATCH=1 in every TU (CMake: link s2lc::dynamic), exactly one .cpp of the
// program contains nothing but:
//
//     #define S2LC_IMPLEMENTATION
//     #include <s2lc/dispatch.hpp>
//
// It compiles every kernel for every target Highway supports on this architecture (AVX-512 with
// VNNI/BF16, AVX-512, AVX2, SSE4, SSSE3, scalar on x86) and the exported wrappers pick the best one
// the CPU supports at run time (libhwy must be linked; s2lc::dynamic does). Keep this TU free of
// other includes: Highway's foreach_target must see the kernel bodies first.
#pragma once

#include "s2lc/config.hpp"

#if defined(S2LC_IMPLEMENTATION)
#if !S2LC_DYNAMIC_DISPATCH
#error "s2lc/dispatch.hpp: S2LC_IMPLEMENTATION needs S2LC_DYNAMIC_DISPATCH=1 in every translation unit"
#endif

// Also build the AVX-512 VNNI/BF16 target (opt-in in Highway 1.0.3). Define it for every TU
// (CMake's s2lc::dynamic does) so hwy::SupportedAndGeneratedTargets() agrees everywhere.
#ifndef HWY_WANT_AVX3_DL
#define HWY_WANT_AVX3_DL 1
#endif

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "s2lc/kernels/all-inl.h"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include "s2lc/kernels/all-inl.h"  // the pass for the static (baseline) target
#include "s2lc/kernels/convert.hpp"
#include "s2lc/kernels/qgemm.hpp"

#if HWY_ONCE
namespace s2lc::kernels {

HWY_EXPORT(F32ToBF16);
HWY_EXPORT(BF16ToF32);
HWY_EXPORT(F32ToF16);
HWY_EXPORT(F16ToF32);

void f32_to_bf16(const float* in, std::uint16_t* out, std::size_t n) { HWY_DYNAMIC_DISPATCH(F32ToBF16)(in, out, n); }
void bf16_to_f32(const std::uint16_t* in, float* out, std::size_t n) { HWY_DYNAMIC_DISPATCH(BF16ToF32)(in, out, n); }
void f32_to_f16(const float* in, std::uint16_t* out, std::size_t n) { HWY_DYNAMIC_DISPATCH(F32ToF16)(in, out, n); }
void f16_to_f32(const std::uint16_t* in, float* out, std::size_t n) { HWY_DYNAMIC_DISPATCH(F16ToF32)(in, out, n); }

#define S2LC_EXPORT(ret, name, Name, params, args) \
  HWY_EXPORT(Name);                                \
  ret name params { return HWY_DYNAMIC_DISPATCH(Name) args; }
S2LC_QGEMM_FUNCTIONS(S2LC_EXPORT)
#undef S2LC_EXPORT

}  // namespace s2lc::kernels
#endif  // HWY_ONCE
#endif  // S2LC_IMPLEMENTATION
