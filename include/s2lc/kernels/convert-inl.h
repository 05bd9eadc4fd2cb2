// s2lc — per-target bodies of the bulk dtype conversions (Highway). Included once per target by
// hwy/foreach_target.h (dynamic dispatch) or once for the static target (static dispatch); never
// include it directly: use <s2lc/kernels/convert.hpp>.
//
// Highway 1.0.3's DemoteTo(bf16/f16) truncates instead of rounding (and maps Inf/NaN wrongly on
// targets without F16C), so both directions are written here with integer ops, bit-identical to
// the scalar reference in <s2lc/dtype.hpp> on every target.

// Per-target include guard (Highway idiom).
#if defined(S2LC_KERNELS_CONVERT_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef S2LC_KERNELS_CONVERT_INL_H_
#undef S2LC_KERNELS_CONVERT_INL_H_
#else
#define S2LC_KERNELS_CONVERT_INL_H_
#endif

#include <cstddef>
#include <cstdint>

#include <hwy/highway.h>

#include "s2lc/dtype.hpp"

HWY_BEFORE_NAMESPACE();
namespace s2lc::kernels::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Lanes: f32 vectors and the u16 half-width vectors they pair with.
using DF32 = hn::ScalableTag<float>;
using DU32 = hn::RebindToUnsigned<DF32>;
using DI32 = hn::RebindToSigned<DF32>;
using DU16 = hn::Rebind<std::uint16_t, DF32>;

template <class V>
HWY_INLINE hn::Vec<DU16> NarrowU32(V v32) {
  // Values are < 2^16, so the saturating i32 -> u16 demotion is exact.
  return hn::DemoteTo(DU16(), hn::BitCast(DI32(), v32));
}

// f32 -> bf16 bits (round to nearest even, NaN quieted), in 32-bit lanes.
HWY_INLINE hn::Vec<DU32> F32ToBF16Bits32(hn::Vec<DF32> f) {
  const DU32 du;
  const auto bits = hn::BitCast(du, f);
  const auto lsb = hn::And(hn::ShiftRight<16>(bits), hn::Set(du, 1u));
  const auto rounded = hn::ShiftRight<16>(hn::Add(bits, hn::Add(hn::Set(du, 0x7FFFu), lsb)));
  const auto quiet_nan = hn::Or(hn::ShiftRight<16>(bits), hn::Set(du, 0x0040u));
  // NaN test on the bits: Highway lowers float Ne to an *ordered* compare on AVX2/AVX-512, for
  // which NaN != NaN is false.
  const DI32 di;
  const auto abs_i = hn::BitCast(di, hn::And(bits, hn::Set(du, 0x7FFFFFFFu)));
  const auto is_nan = hn::RebindMask(du, hn::Gt(abs_i, hn::Set(di, 0x7F800000)));
  return hn::IfThenElse(is_nan, quiet_nan, rounded);
}

HWY_INLINE hn::Vec<DU16> F32ToBF16Vec(hn::Vec<DF32> f) { return NarrowU32(F32ToBF16Bits32(f)); }

HWY_INLINE hn::Vec<DF32> BF16ToF32Vec(hn::Vec<DU16> h) {
  return hn::BitCast(DF32(), hn::ShiftLeft<16>(hn::PromoteTo(DU32(), h)));
}

HWY_INLINE hn::Vec<DU16> F32ToF16Vec(hn::Vec<DF32> f) {
  const DU32 du;
  const DI32 di;
  const DF32 df;
  const auto bits = hn::BitCast(du, f);
  const auto sign = hn::And(hn::ShiftRight<16>(bits), hn::Set(du, 0x8000u));
  const auto abs = hn::And(bits, hn::Set(du, 0x7FFFFFFFu));
  const auto abs_i = hn::BitCast(di, abs);  // < 2^31: signed compares are exact

  // Normal results: rebias and round the mantissa to 10 bits (ties to even).
  const auto lsb = hn::And(hn::ShiftRight<13>(abs), hn::Set(du, 1u));
  const auto normal = hn::ShiftRight<13>(
      hn::Sub(hn::Add(abs, hn::Add(hn::Set(du, 0xFFFu), lsb)), hn::Set(du, 112u << 23)));
  // Subnormal results (|f| < 2^-14): adding 0.5f (2^-1) makes the FPU round |f| at 2^-24, the
  // f16 subnormal step, with the current (nearest-even) rounding; the low bits are the result.
  const auto magic = hn::Set(du, 126u << 23);  // 0.5f
  const auto sub = hn::Sub(hn::BitCast(du, hn::Add(hn::BitCast(df, abs), hn::BitCast(df, magic))), magic);
  const auto is_sub = hn::RebindMask(du, hn::Lt(abs_i, hn::Set(di, 0x38800000)));
  const auto is_inf = hn::RebindMask(du, hn::Gt(abs_i, hn::Set(di, 0x477FFFFF)));
  const auto is_nan = hn::RebindMask(du, hn::Gt(abs_i, hn::Set(di, 0x7F800000)));
  const auto nan = hn::Or(hn::Set(du, 0x7E00u), hn::And(hn::ShiftRight<13>(abs), hn::Set(du, 0x3FFu)));
  auto r = hn::IfThenElse(is_sub, sub, normal);
  r = hn::IfThenElse(is_inf, hn::Set(du, 0x7C00u), r);
  r = hn::IfThenElse(is_nan, nan, r);
  return NarrowU32(hn::Or(r, sign));
}

HWY_INLINE hn::Vec<DF32> F16ToF32Vec(hn::Vec<DU16> h16) {
  const DU32 du;
  const DF32 df;
  const auto h = hn::PromoteTo(du, h16);
  const auto sign = hn::ShiftLeft<16>(hn::And(h, hn::Set(du, 0x8000u)));
  const auto exp = hn::And(h, hn::Set(du, 0x7C00u));
  const auto mant = hn::And(h, hn::Set(du, 0x3FFu));
  const auto em = hn::ShiftLeft<13>(hn::And(h, hn::Set(du, 0x7FFFu)));
  const auto normal = hn::Add(em, hn::Set(du, 112u << 23));
  const auto infnan = hn::Or(em, hn::Set(du, 0x7F800000u));
  // Subnormal: mant * 2^-24, computed exactly as float(mant) * 2^-24.
  const auto subf = hn::Mul(hn::ConvertTo(df, hn::BitCast(DI32(), mant)), hn::Set(df, 5.9604644775390625e-08f));
  const auto sub = hn::BitCast(du, subf);
  const auto zero_exp = hn::RebindMask(du, hn::Eq(hn::BitCast(DI32(), exp), hn::Zero(DI32())));
  const auto max_exp = hn::RebindMask(du, hn::Eq(hn::BitCast(DI32(), exp), hn::Set(DI32(), 0x7C00)));
  auto r = hn::IfThenElse(zero_exp, sub, normal);
  r = hn::IfThenElse(max_exp, infnan, r);
  return hn::BitCast(df, hn::Or(r, sign));
}

// Entry points are `inline` so that header-only (static dispatch) use from many TUs links.
// Tails go through the scalar reference (MaskedLoad tails fault on SSE4 in Highway 1.0.3).
inline HWY_NOINLINE void F32ToBF16(const float* HWY_RESTRICT in, std::uint16_t* HWY_RESTRICT out, std::size_t n) {
  const DF32 df;
  const std::size_t N = hn::Lanes(df);
  std::size_t i = 0;
  for (; i + N <= n; i += N) hn::StoreU(F32ToBF16Vec(hn::LoadU(df, in + i)), DU16(), out + i);
  for (; i < n; ++i) out[i] = s2lc::f32_to_bf16(in[i]);
}

inline HWY_NOINLINE void BF16ToF32(const std::uint16_t* HWY_RESTRICT in, float* HWY_RESTRICT out, std::size_t n) {
  const DF32 df;
  const std::size_t N = hn::Lanes(df);
  std::size_t i = 0;
  for (; i + N <= n; i += N) hn::StoreU(BF16ToF32Vec(hn::LoadU(DU16(), in + i)), df, out + i);
  for (; i < n; ++i) out[i] = s2lc::bf16_to_f32(in[i]);
}

inline HWY_NOINLINE void F32ToF16(const float* HWY_RESTRICT in, std::uint16_t* HWY_RESTRICT out, std::size_t n) {
  const DF32 df;
  const std::size_t N = hn::Lanes(df);
  std::size_t i = 0;
  for (; i + N <= n; i += N) hn::StoreU(F32ToF16Vec(hn::LoadU(df, in + i)), DU16(), out + i);
  for (; i < n; ++i) out[i] = s2lc::f32_to_f16(in[i]);
}

inline HWY_NOINLINE void F16ToF32(const std::uint16_t* HWY_RESTRICT in, float* HWY_RESTRICT out, std::size_t n) {
  const DF32 df;
  const std::size_t N = hn::Lanes(df);
  std::size_t i = 0;
  for (; i + N <= n; i += N) hn::StoreU(F16ToF32Vec(hn::LoadU(DU16(), in + i)), df, out + i);
  for (; i < n; ++i) out[i] = s2lc::f16_to_f32(in[i]);
}

}  // namespace s2lc::kernels::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // per-target include guard
