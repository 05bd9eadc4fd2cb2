// s2lc — bulk dtype conversion kernels (f32 <-> bf16, f32 <-> f16), rounding to nearest even,
// bit-identical to the scalar functions in <s2lc/dtype.hpp> on every SIMD target.
//
// Dispatch (the pattern every s2lc kernel follows, see README "SIMD dispatch"):
//  * S2LC_DYNAMIC_DISPATCH=0 (default): the body for the target chosen by this TU's compile flags
//    is compiled inline (HWY_STATIC_DISPATCH). Header-only, no libhwy needed. The wrappers live
//    in an inline namespace named after that target, so TUs built with different flags never
//    share a symbol (no ODR violation).
//  * S2LC_DYNAMIC_DISPATCH=1: these are declarations; one TU defines S2LC_IMPLEMENTATION and
//    includes <s2lc/dispatch.hpp>, which compiles every target and picks one at run time.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "s2lc/config.hpp"
#include "s2lc/error.hpp"

#if !S2LC_DYNAMIC_DISPATCH
#include <hwy/highway.h>
#include "s2lc/kernels/convert-inl.h"
#endif

namespace s2lc::kernels {

#if S2LC_DYNAMIC_DISPATCH
void f32_to_bf16(const float* in, std::uint16_t* out, std::size_t n);
void bf16_to_f32(const std::uint16_t* in, float* out, std::size_t n);
void f32_to_f16(const float* in, std::uint16_t* out, std::size_t n);
void f16_to_f32(const std::uint16_t* in, float* out, std::size_t n);
#else
inline namespace S2LC_DETAIL_CAT(static_, HWY_NAMESPACE) {
inline void f32_to_bf16(const float* in, std::uint16_t* out, std::size_t n) {
  HWY_STATIC_DISPATCH(F32ToBF16)(in, out, n);
}
inline void bf16_to_f32(const std::uint16_t* in, float* out, std::size_t n) {
  HWY_STATIC_DISPATCH(BF16ToF32)(in, out, n);
}
inline void f32_to_f16(const float* in, std::uint16_t* out, std::size_t n) {
  HWY_STATIC_DISPATCH(F32ToF16)(in, out, n);
}
inline void f16_to_f32(const std::uint16_t* in, float* out, std::size_t n) {
  HWY_STATIC_DISPATCH(F16ToF32)(in, out, n);
}
}  // namespace static_<target>
#endif

/// Span overloads: sizes must match.
inline void f32_to_bf16(std::span<const float> in, std::span<std::uint16_t> out) {
  if (in.size() != out.size()) throw invalid_argument("f32_to_bf16: input and output sizes differ");
  f32_to_bf16(in.data(), out.data(), in.size());
}
inline void bf16_to_f32(std::span<const std::uint16_t> in, std::span<float> out) {
  if (in.size() != out.size()) throw invalid_argument("bf16_to_f32: input and output sizes differ");
  bf16_to_f32(in.data(), out.data(), in.size());
}
inline void f32_to_f16(std::span<const float> in, std::span<std::uint16_t> out) {
  if (in.size() != out.size()) throw invalid_argument("f32_to_f16: input and output sizes differ");
  f32_to_f16(in.data(), out.data(), in.size());
}
inline void f16_to_f32(std::span<const std::uint16_t> in, std::span<float> out) {
  if (in.size() != out.size()) throw invalid_argument("f16_to_f32: input and output sizes differ");
  f16_to_f32(in.data(), out.data(), in.size());
}

}  // namespace s2lc::kernels
