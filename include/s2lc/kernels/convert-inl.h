// s2lc — per-target bodies of the bulk dtype conversions (Highway). Included once per target by
// hwy/foreach_target.h (dynamic dispatch) or once for the static target (static dispatch); never
// include it directly: use <s2lc/kernels/convert.hpp>.
//
// Highway 1.0.3's DemoteTo(bf16) truncates instead of rounding, and its DemoteTo(f16) maps
// Inf/NaN wrongly on targets without F16C, so the conversions are written here with integer ops,
// bit-identical to the scalar reference in <s2lc/dtype.hpp> on every target. Instructions with
// the same bits replace them where there are any: F16C's vcvtps2ph (AVX2 and up) for f32 -> f16,
// vcvtneps2bf16 for f32 -> bf16 where the CPU has AVX512_BF16 (S2LC_BF16_NE below).

// Per-target include guard (Highway idiom).
#if defined(S2LC_KERNELS_CONVERT_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef S2LC_KERNELS_CONVERT_INL_H_
#undef S2LC_KERNELS_CONVERT_INL_H_
#else
#define S2LC_KERNELS_CONVERT_INL_H_
#endif

#include <cstddef>
#include <cstdint>

#include <hwy/cache_control.h>
#include <hwy/highway.h>

#include "s2lc/dtype.hpp"
#include "s2lc/kernels/cpu.hpp"

HWY_BEFORE_NAMESPACE();
namespace s2lc::kernels::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Lanes: f32 vectors and the u16 half-width vectors they pair with.
using DF32 = hn::ScalableTag<float>;
using DU32 = hn::RebindToUnsigned<DF32>;
using DI32 = hn::RebindToSigned<DF32>;
using DU16 = hn::Rebind<std::uint16_t, DF32>;

// v, kept in a register: g++ otherwise folds a load that several instructions use into each of
// them, so one vector is read two or three times. Hot that costs load slots (a cache-resident
// 256 x 256 4-bit core block at one token: 10 % slower, q8-inl.h); cold and not 64-byte aligned,
// every folded load splits a cache line again (f32_to_bf16's three reads per vector: 32 Mi
// elements from DRAM at a 16-byte offset, as std::vector gives, 10.4 against 5.1 ms). No
// instruction is emitted.
template <class V>
HWY_INLINE V InRegister(V v) {
#if HWY_ARCH_X86 && HWY_TARGET != HWY_SCALAR && HWY_TARGET != HWY_EMU128 && (HWY_COMPILER_GCC || HWY_COMPILER_CLANG)
  asm("" : "+v"(v.raw));
#endif
  return v;
}

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

// AVX3_DL on a CPU with AVX512_BF16 (use_avx512_bf16(), cpu.hpp): vcvtneps2bf16 rounds 16 f32
// to bf16 as f32_to_bf16 does (to nearest even, NaN quieted), except that a subnormal input
// becomes +-0 where f32_to_bf16 rounds it. Any +-0 result therefore sends its vector (the
// merge: its batch of vectors) to the integer rounding (exact zeros too: rare in trained
// weights). Through asm: the target's attributes do not enable AVX512_BF16.
#undef S2LC_BF16_NE  // (defined per target)
#if HWY_TARGET == HWY_AVX3_DL && S2LC_CPU_X86
#define S2LC_BF16_NE 1
HWY_INLINE __m256i CvtNeBF16(__m512 f) {
  __m256i r;
  asm("vcvtneps2bf16 %1, %0" : "=v"(r) : "v"(f));
  return r;
}
// 16 bf16 to f32 as one vpermw (each 16-bit lane moved to the top half of a 32-bit lane, zeros
// below) instead of a widening and a shift: the same bits. kernels::merge_bf16 on 16 K elements
// in L1/L2, 7.6 % recorded, best of 4000 calls, three alternations: 2.17-2.22 -> 2.06-2.15 ns per
// 16 elements (a vpexpandw took 3.9-4.2).
HWY_INLINE __m512 WidenBF16Lo(__m512i h) {  // (elements 0-15 of 32 in a 512-bit vector)
  const __m512i idx = _mm512_set_epi16(15, 0, 14, 0, 13, 0, 12, 0, 11, 0, 10, 0, 9, 0, 8, 0, 7, 0, 6, 0, 5, 0, 4, 0, 3, 0, 2, 0, 1, 0, 0, 0);
  return _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, idx, h));
}
HWY_INLINE __m512 WidenBF16(__m256i h) { return WidenBF16Lo(_mm512_castsi256_si512(h)); }
HWY_INLINE __m512 WidenBF16Hi(__m512i h) {  // elements 16-31
  const __m512i idx = _mm512_set_epi16(31, 0, 30, 0, 29, 0, 28, 0, 27, 0, 26, 0, 25, 0, 24, 0, 23, 0, 22, 0, 21, 0, 20, 0, 19, 0, 18, 0, 17, 0, 16, 0);
  return _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, idx, h));
}
// 32 f32 (lo: elements 0-15, hi: 16-31) to 32 bf16 in one vcvtne2ps2bf16, rounded as CvtNeBF16.
HWY_INLINE __m512i CvtNe2BF16(__m512 lo, __m512 hi) {
  __m512i r;
  asm("vcvtne2ps2bf16 %2, %1, %0" : "=v"(r) : "v"(hi), "v"(lo));
  return r;
}
// acc (unsigned 16-bit min) with h's lanes shifted left by one (x + x: the sign bit dropped), so
// a lane of acc is 0 once any h held +-0 there. AnyZero: whether a lane of a probe (or of h + h) is 0.
HWY_INLINE __m256i ZeroProbe(__m256i acc, __m256i h) { return _mm256_min_epu16(acc, _mm256_add_epi16(h, h)); }
HWY_INLINE bool AnyZero(__m256i acc) { return _mm256_cmpeq_epi16_mask(acc, _mm256_setzero_si256()) != 0; }
HWY_INLINE __m512i ZeroProbe32(__m512i acc, __m512i h) { return _mm512_min_epu16(acc, _mm512_add_epi16(h, h)); }  // 32 lanes
HWY_INLINE bool AnyZero32(__m512i acc) { return _mm512_cmpeq_epi16_mask(acc, _mm512_setzero_si512()) != 0; }
// The lanes of a or b that are subnormal (vfpclassps 0x20), which vcvtne(2)ps2bf16 flushes to +-0
// where the scalar rule rounds them: after a probe fired, whether the integer path is needed.
HWY_INLINE __mmask16 Subnormal(__m512 a, __m512 b) { return _mm512_fpclass_ps_mask(a, 0x20) | _mm512_fpclass_ps_mask(b, 0x20); }
#else
#define S2LC_BF16_NE 0
#endif

HWY_INLINE hn::Vec<DU16> F32ToF16Vec(hn::Vec<DF32> f) {
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX2 && !defined(HWY_DISABLE_F16C)
  // F16C's vcvtps2ph (imm 8: to nearest even, no exceptions) is the scalar rule, NaN included:
  // a quiet NaN of the top 10 payload bits, sign kept. (Highway's DemoteTo emits it here.)
  return hn::BitCast(DU16(), hn::DemoteTo(hn::Rebind<hwy::float16_t, DF32>(), f));
#else
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
#endif
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

// One conversion: Vec(p) converts the N elements at p, One(x) is the scalar rule; kStream:
// whether a large output is written with non-temporal stores (Convert).
struct ToBF16 {
  using In = float;
  using Out = std::uint16_t;
  using DOut = DU16;
  static constexpr bool kStream = true;
  static HWY_INLINE hn::Vec<DU16> Vec(const float* p) { return F32ToBF16Vec(InRegister(hn::LoadU(DF32(), p))); }
  static HWY_INLINE std::uint16_t One(float x) { return s2lc::f32_to_bf16(x); }
};
#if S2LC_BF16_NE
struct ToBF16Ne : ToBF16 {
  static HWY_INLINE hn::Vec<DU16> Vec(const float* p) {
    const auto f = InRegister(hn::LoadU(DF32(), p));
    const __m256i h = CvtNeBF16(f.raw);
    if (HWY_UNLIKELY(AnyZero(_mm256_add_epi16(h, h)))) return F32ToBF16Vec(f);
    return hn::Vec<DU16>{h};
  }
};
#endif
struct FromBF16 {
  using In = std::uint16_t;
  using Out = float;
  using DOut = DF32;
  static constexpr bool kStream = false;
  static HWY_INLINE hn::Vec<DF32> Vec(const std::uint16_t* p) { return BF16ToF32Vec(hn::LoadU(DU16(), p)); }
  static HWY_INLINE float One(std::uint16_t x) { return s2lc::bf16_to_f32(x); }
};
struct ToF16 {
  using In = float;
  using Out = std::uint16_t;
  using DOut = DU16;
  static constexpr bool kStream = true;
  static HWY_INLINE hn::Vec<DU16> Vec(const float* p) { return F32ToF16Vec(InRegister(hn::LoadU(DF32(), p))); }
  static HWY_INLINE std::uint16_t One(float x) { return s2lc::f32_to_f16(x); }
};
struct FromF16 {
  using In = std::uint16_t;
  using Out = float;
  using DOut = DF32;
  static constexpr bool kStream = false;
  static HWY_INLINE hn::Vec<DF32> Vec(const std::uint16_t* p) { return F16ToF32Vec(hn::LoadU(DU16(), p)); }
  static HWY_INLINE float One(std::uint16_t x) { return s2lc::f16_to_f32(x); }
};

// in[0, n) converted into out. A narrowing's output (f32 -> bf16 or f16) of kStreamStoreBytes or
// more goes past the caches anyway: it is written with non-temporal stores, whole 64-byte lines
// from out's first line boundary, so no line is read before it is written. 32 Mi elements from
// DRAM, one thread, the two ways alternating in one process: f32 -> bf16 4.3-7.7 against
// 5.6-10.2 ms, faster in 19 rounds of 19; f32 -> f16 (vcvtps2ph) 4.0-6.9 against 5.8-7.5, 8 of 8
// (with the integer rounding it had been slower in 8 of 11). The read of the input alone takes
// 3.8-4.0 ms in a fast phase of this VM. The widenings store normally: streaming their output
// was as often slower as faster (bf16 -> f32 slower in 6 rounds of 8, f16 -> f32 4.8-10.3
// against 5.6-8.0 ms). Targets whose output vector is under 16 bytes (SSE4's four bf16) store
// normally too: Highway streams at least 16 bytes. Tails go through the scalar reference
// (MaskedLoad tails fault on SSE4 in Highway 1.0.3).
template <class Op>
HWY_INLINE void Convert(const typename Op::In* HWY_RESTRICT in, typename Op::Out* HWY_RESTRICT out, std::size_t n) {
  using Out = typename Op::Out;
  const typename Op::DOut d;
  const std::size_t N = hn::Lanes(d);
  std::size_t i = 0;
  if constexpr (Op::kStream && hn::MaxLanes(d) * sizeof(Out) >= 16) {
    const auto addr = reinterpret_cast<std::uintptr_t>(out);
    if (n * sizeof(Out) >= kStreamStoreBytes && addr % sizeof(Out) == 0) {
      for (const std::size_t head = (64 - addr % 64) % 64 / sizeof(Out); i < head; ++i) out[i] = Op::One(in[i]);
      for (; i + N <= n; i += N) hn::Stream(Op::Vec(in + i), d, out + i);
      hwy::FlushStream();
    }
  }
  for (; i + N <= n; i += N) hn::StoreU(Op::Vec(in + i), d, out + i);
  for (; i < n; ++i) out[i] = Op::One(in[i]);
}

// Entry points are `inline` so that header-only (static dispatch) use from many TUs links.
inline HWY_NOINLINE void F32ToBF16(const float* HWY_RESTRICT in, std::uint16_t* HWY_RESTRICT out, std::size_t n) {
#if S2LC_BF16_NE
  if (use_avx512_bf16()) return Convert<ToBF16Ne>(in, out, n);
#endif
  Convert<ToBF16>(in, out, n);
}
inline HWY_NOINLINE void BF16ToF32(const std::uint16_t* HWY_RESTRICT in, float* HWY_RESTRICT out, std::size_t n) {
  Convert<FromBF16>(in, out, n);
}
inline HWY_NOINLINE void F32ToF16(const float* HWY_RESTRICT in, std::uint16_t* HWY_RESTRICT out, std::size_t n) {
  Convert<ToF16>(in, out, n);
}
inline HWY_NOINLINE void F16ToF32(const std::uint16_t* HWY_RESTRICT in, float* HWY_RESTRICT out, std::size_t n) {
  Convert<FromF16>(in, out, n);
}

}  // namespace s2lc::kernels::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // per-target include guard
