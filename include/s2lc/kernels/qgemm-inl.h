// s2lc — per-target bodies of the apply kernels (Highway): quantized decode, fused quantized
// matrix-vector products (codes dequantized in registers, tier chosen at call time), f32 GEMM
// micro-kernels for token batches, SwiGLU, the streaming-read bound, and the JIT-merge kernels.
// Included once per target by hwy/foreach_target.h or once for the static target; use
// <s2lc/kernels/qgemm.hpp>.
//
// Conventions: matrices are row-major with explicit leading dimensions; every kernel ADDS into
// its output. Vector bodies cover full groups whose length is a multiple of the lane count, nibble
// groups of exactly the lane count (HalfNibbles) and, in the row-major kernels, groups narrower
// than a vector that divide it (several a vector, per-lane scales: Layout::gpv); partial groups,
// other group sizes and column tails take the scalar path, which decodes exactly as
// s2lc::kernels::detail::decode.

#if defined(S2LC_KERNELS_QGEMM_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef S2LC_KERNELS_QGEMM_INL_H_
#undef S2LC_KERNELS_QGEMM_INL_H_
#else
#define S2LC_KERNELS_QGEMM_INL_H_
#endif

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <hwy/cache_control.h>
#include <hwy/highway.h>
#include <hwy/contrib/math/math-inl.h>

#include "s2lc/kernels/amx.hpp"
#include "s2lc/kernels/convert-inl.h"
#include "s2lc/kernels/cpu.hpp"
#include "s2lc/kernels/q8-inl.h"
#include "s2lc/kernels/qview.hpp"

HWY_BEFORE_NAMESPACE();
namespace s2lc::kernels::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

namespace qk {

using DF = hn::ScalableTag<float>;
using DI = hn::RebindToSigned<DF>;
using DU = hn::RebindToUnsigned<DF>;
using DI8 = hn::Rebind<std::int8_t, DF>;
using VF = hn::Vec<DF>;
using VI = hn::Vec<DI>;

// The fused gemvs prefetch kPrefetchAhead (cpu.hpp) bytes ahead, as q8-inl.h's kernels.

// N codes starting at p as i32 lanes (sign-extended bytes).
HWY_INLINE VI LoadBytes(const std::uint8_t* p) {
  return hn::PromoteTo(DI(), hn::LoadU(DI8(), reinterpret_cast<const std::int8_t*>(p)));
}
HWY_INLINE VI LowNibble(VI b) { return hn::ShiftRight<28>(hn::ShiftLeft<28>(b)); }
HWY_INLINE VI HighNibble(VI b) { return hn::ShiftRight<4>(b); }

template <bool kTier>
HWY_INLINE VF Codes(VI q, const TierParams& t) {
  if constexpr (kTier) {
    const DI di;
    q = hn::ShiftRightSame(hn::Add(q, hn::Set(di, t.half)), t.shift);
    q = hn::Min(hn::Max(q, hn::Set(di, t.lo)), hn::Set(di, t.hi));
  }
  return hn::ConvertTo(DF(), q);
}

// The tier's nibble table (TierParams::nibble) where the kernels look nibbles up: AVX-512 only.
HWY_INLINE VF NibbleTable(const TierParams& t) {
#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL
  return hn::LoadU(DF(), t.nibble);
#else
  (void)t;
  return hn::Zero(DF());
#endif
}

// The values of the low and high nibbles of the bytes in b (one byte per i32 lane). AVX-512: two
// vpermps from the tier's table (each reads only the low 4 bits of its index lanes), no shifts
// to sign-extend, no conversions, the tier already applied; elsewhere shifts and ConvertTo.
template <bool kTier>
HWY_INLINE void Nibbles(VI b, VF table, const TierParams& t, VF& lo, VF& hi) {
#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL
  (void)t;
  lo = VF{_mm512_permutexvar_ps(b.raw, table.raw)};
  hi = VF{_mm512_permutexvar_ps(hn::ShiftRight<4>(b).raw, table.raw)};
#else
  (void)table;
  lo = Codes<kTier>(LowNibble(b), t);
  hi = Codes<kTier>(HighNibble(b), t);
#endif
}

// Per-call layout constants (no divisions in the loops): groups per row, bytes per row, the
// number of leading groups that run the vector body (full length, whole vectors), and of nibble
// groups of exactly N codes (HalfNibbles; nhalf > 0 implies nfast == 0).
// Narrow groups (fewer codes than lanes, dividing N: AVX-512 groups of 8, 4, 2 (bytes also 1),
// AVX2 of 4, 2, ...): gpv = N / group groups per vector, nnarrow leading vectors of whole groups
// that run the narrow vector body (NarrowCodes, NarrowScales; nnarrow > 0 implies nfast == nhalf
// == 0), the groups from nnarrow gpv on the scalar path.
struct Layout {
  std::size_t gpr, rb, nfast, nhalf, gpv, nnarrow;
};
HWY_INLINE Layout MakeLayout(const QView& q, std::size_t N) {
  Layout l;
  l.gpr = q.groups_per_row();
  l.rb = q.row_bytes();
  const bool ok = q.nibble ? (q.group / 2) % N == 0 : q.group % N == 0;
  l.nfast = ok ? q.cols / q.group : 0;
  l.nhalf = HWY_TARGET != HWY_SCALAR && q.nibble && q.group == N ? q.cols / q.group : 0;
  const bool narrow = HWY_TARGET != HWY_SCALAR && q.group < N && N % q.group == 0;
  l.gpv = narrow ? N / q.group : 0;
  l.nnarrow = narrow ? q.cols / N : 0;
  return l;
}

#if HWY_TARGET != HWY_SCALAR
// A nibble group of N codes (N / 2 bytes: 16 codes on AVX-512, 8 on AVX2, 4 on SSE4), which has
// no whole vector of low or of high nibbles, as one vector in column order: its bytes in both
// halves of the lanes, the lower half's low nibbles and the upper half's high ones (one variable
// shift; AVX-512 then looks them up as Nibbles does). Such groups had taken the scalar path:
// 4-bit 256 x 256, groups of 16, AVX-512, q_gemv_nn 238 us against 1.1 for groups of 32.
template <bool kTier>
HWY_INLINE VF HalfNibbles(const std::uint8_t* p, VF table, const TierParams& t) {
  const DI di;
  const hn::Half<DI8> dh;
  const auto h = hn::LoadU(dh, reinterpret_cast<const std::int8_t*>(p));
  const VI b = hn::PromoteTo(di, hn::Combine(DI8(), h, h));
  const auto upper = hn::Not(hn::FirstN(di, hn::Lanes(di) / 2));
#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL
  (void)t;  // vpermps reads the low 4 bits of each index: the low nibble, or the high one shifted down
  return VF{_mm512_permutexvar_ps(hn::Shr(b, hn::IfThenElseZero(upper, hn::Set(di, 4))).raw, table.raw)};
#else
  (void)table;
  return Codes<kTier>(hn::ShiftRight<28>(hn::Shl(b, hn::IfThenElse(upper, hn::Set(di, 24), hn::Set(di, 28)))), t);
#endif
}

// Narrow groups (Layout::gpv): each lane's code byte among the vector's N / 2 (nibbles) and the
// shift of its nibble (0 low, 4 high; elsewhere as 28 - that, for a shift pair), and each lane's
// group among the vector's gpv. A group of G nibble codes has h = G / 2 bytes: lane j is code
// j % G of group j / G, the low nibble of byte (j / G) h + j % G while j % G < h, else the high
// nibble of byte (j / G) h + j % G - h. Byte codes are in column order: byte j.
// Nibbles also as chunks of N bytes in storage order (GemmNNQNarrowNibTile): each lane's group
// among the chunk's 2 gpv (byte j: j / h), and the lanes of column order that take a high nibble.
struct NarrowIx {
  VI byte, shift, group, chunk_group;
  hn::Mask<DF> high;
};
HWY_INLINE NarrowIx MakeNarrowIx(const QView& q) {
  const DI di;
  const std::size_t N = hn::Lanes(di), G = q.group, h = G / 2;
  HWY_ALIGN std::int32_t b[HWY_MAX_BYTES / 4], sh[HWY_MAX_BYTES / 4], g[HWY_MAX_BYTES / 4], cg[HWY_MAX_BYTES / 4],
      hm[HWY_MAX_BYTES / 4];
  for (std::size_t j = 0; j < N; ++j) {
    const std::size_t jj = j % G;
    g[j] = static_cast<std::int32_t>(j / G);
    cg[j] = static_cast<std::int32_t>(q.nibble ? j / h : 0);
    hm[j] = q.nibble && jj >= h ? 1 : 0;
    b[j] = static_cast<std::int32_t>(q.nibble ? (j / G) * h + (jj < h ? jj : jj - h) : j);
    const int hi = q.nibble && jj >= h ? 4 : 0;
#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL
    sh[j] = hi;
#else
    sh[j] = 28 - hi;
#endif
  }
  return {hn::Load(di, b), hn::Load(di, sh), hn::Load(di, g), hn::Load(di, cg),
          hn::RebindMask(DF(), hn::Ne(hn::Load(di, hm), hn::Zero(di)))};
}

// Codes of vector v (columns [v N, v N + N)) of a row of narrow groups at `row`, unscaled, in
// column order (the tier applied; AVX-512 nibbles: looked up in the tier's table).
template <bool kTier>
HWY_INLINE VF NarrowCodes(const QView& q, const std::uint8_t* row, std::size_t v, VF table, const TierParams& t,
                          const NarrowIx& nx) {
  const DI di;
  const std::size_t N = hn::Lanes(di);
  if (!q.nibble) return Codes<kTier>(LoadBytes(row + v * N), t);
  const hn::Half<DI8> dh;
  const auto h = hn::LoadU(dh, reinterpret_cast<const std::int8_t*>(row + v * (N / 2)));
  const VI b = hn::TableLookupLanes(hn::PromoteTo(di, hn::Combine(DI8(), h, h)), hn::IndicesFromVec(di, nx.byte));
#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL
  (void)t;
  return VF{_mm512_permutexvar_ps(hn::Shr(b, nx.shift).raw, table.raw)};
#else
  (void)table;
  return Codes<kTier>(hn::ShiftRight<28>(hn::Shl(b, nx.shift)), t);
#endif
}

// Per-lane scales of a vector of narrow groups from gpv consecutive f32 scales at p (N floats
// readable there: the lanes past gpv are not used).
HWY_INLINE VF NarrowScales(const float* p, const NarrowIx& nx) {
  const DF df;
  return hn::TableLookupLanes(hn::LoadU(df, p), hn::IndicesFromVec(df, nx.group));
}

// The same from q's bf16 scales, of vector v of row r, times the tier's 2^shift: the products
// Scale makes, one per lane.
HWY_INLINE VF NarrowScalesBF16(const QView& q, const Layout& L, std::size_t r, std::size_t v, const TierParams& t,
                               const NarrowIx& nx) {
  const DF df;
  const hn::Rebind<std::uint16_t, DF> d16;
  const std::size_t N = hn::Lanes(df), i = r * L.gpr + v * L.gpv;
  hn::Vec<decltype(d16)> bits;
  if (i + N <= std::size_t{q.rows} * L.gpr) {
    bits = hn::LoadU(d16, q.scales + i);
  } else {  // a load of N would pass the end of the scales
    HWY_ALIGN std::uint16_t tmp[HWY_MAX_BYTES / 4] = {};
    std::memcpy(tmp, q.scales + i, L.gpv * sizeof(std::uint16_t));
    bits = hn::Load(d16, tmp);
  }
  const VF s = hn::BitCast(df, hn::ShiftLeft<16>(hn::PromoteTo(DU(), bits)));
  return hn::Mul(hn::TableLookupLanes(s, hn::IndicesFromVec(df, nx.group)), hn::Set(df, t.mul));
}
#endif
HWY_INLINE float Scale(const QView& q, const Layout& l, std::size_t r, std::size_t g, const TierParams& t) {
  return s2lc::bf16_to_f32(q.scales[r * l.gpr + g]) * t.mul;
}

// The groups no vector body takes (a row's partial last group where the group does not divide the
// width; groups that are neither whole vectors nor divide one, as bytes of 24 or nibbles of 48 on
// AVX-512) go through DecodeSpan: runs of them decoded with vectors into a buffer, each group at
// its scale, which the kernels then take as f32 vectors. They had decoded element by element
// (detail::stored_code), in q_gemm_nn once per token: AVX-512, 256 x 256 in groups of 96 (a
// partial 64-column group a row), 4-bit q_gemm_nn at 8 tokens 485 us against 4.6 in groups of 64.
// Runs are at most kSpanMax columns (callers' stack buffers hold kSpanMax + kSpanPad floats):
// SpanGroups groups, none if one group is wider (those stay element by element).
inline constexpr std::size_t kSpanMax = 4096;
inline constexpr std::size_t kSpanPad = 2 * HWY_MAX_BYTES / 4;
HWY_INLINE std::size_t SpanGroups(const QView& q) { return kSpanMax / q.group; }

// Groups [ga, gb) of row r (the last may be partial), each group's tiered codes times its scale
// (Scale), into out[0, n) for their n columns, which it returns (out: n + kSpanPad floats, past n
// overwritten). The same products as detail::decode. A vector reaching past a group's bytes reads
// the next group's (its lanes are overwritten or ignored), and past the matrix's last byte, a
// zero-padded copy.
template <bool kTier>
HWY_INLINE std::size_t DecodeSpan(const QView& q, const Layout& L, std::size_t r, std::size_t ga, std::size_t gb, const TierParams& t,
                                  float* HWY_RESTRICT out) {
  const DF df;
  const std::size_t N = hn::Lanes(df);
  const std::uint8_t* end = q.codes + std::size_t{q.rows} * L.rb;
  auto load = [N, end](const std::uint8_t* p) {
    const auto left = static_cast<std::size_t>(end - p);
    if (HWY_LIKELY(left >= N)) return LoadBytes(p);
    HWY_ALIGN std::uint8_t tmp[HWY_MAX_BYTES] = {};
    std::memcpy(tmp, p, left);
    return LoadBytes(tmp);
  };
  const std::uint8_t* row = q.codes + r * L.rb;
  const VF table = NibbleTable(t);
  std::size_t o = 0;
  for (std::size_t g = ga; g < gb; ++g) {
    const std::size_t c0 = g * q.group, n = std::min<std::size_t>(q.group, q.cols - c0);
    const VF vs = hn::Set(df, Scale(q, L, r, g, t));
    float* HWY_RESTRICT dst = out + o;
    if (!q.nibble) {
      for (std::size_t j = 0; j < n; j += N) hn::StoreU(hn::Mul(Codes<kTier>(load(row + c0 + j), t), vs), df, dst + j);
    } else {  // h bytes: code j < h in byte j's low nibble, code h + j in its high one
      const std::size_t h = (n + 1) / 2;
      const std::uint8_t* p = row + g * (q.group / 2);
      VF lo, hi;
      for (std::size_t j = 0; j < h; j += N) {
        Nibbles<kTier>(load(p + j), table, t, lo, hi);
        hn::StoreU(hn::Mul(lo, vs), df, dst + j);
      }
      for (std::size_t j = 0; j < n - h; j += N) {  // after the low ones: over what they wrote past h
        Nibbles<kTier>(load(p + j), table, t, lo, hi);
        hn::StoreU(hn::Mul(hi, vs), df, dst + h + j);
      }
    }
    o += n;
  }
  return o;
}

// out = v (kAdd: out += alpha v; kScale: out = alpha v) for a decoded vector v.
template <bool kAdd, bool kScale>
HWY_INLINE void PutDecoded(VF v, VF va, float* o) {
  const DF df;
  if constexpr (kAdd) hn::StoreU(hn::MulAdd(va, v, hn::LoadU(df, o)), df, o);
  else if constexpr (kScale) hn::StoreU(hn::Mul(va, v), df, o);
  else hn::StoreU(v, df, o);
}

// Decoded row r, columns [c0, c0 + n) of one group, into out (vector or scalar); with kAdd,
// out += alpha * decoded instead (one FMA per element, the decoded value rounded first).
template <bool kTier, bool kAdd = false, bool kScale = false>
HWY_INLINE void DecodeGroup(const QView& q, const Layout& L, std::size_t r, std::size_t g, const TierParams& t, float* out,
                            float alpha = 1.0f) {
  const DF df;
  const std::size_t N = hn::Lanes(df);
  const std::size_t c0 = g * q.group;
  const float s = Scale(q, L, r, g, t);
  if (g >= L.nfast && g >= L.nhalf) {
    const std::size_t n = std::min<std::size_t>(q.group, q.cols - c0);
    for (std::size_t j = 0; j < n; ++j) {
      const float v = static_cast<float>(detail::tiered(detail::stored_code(q, r, c0 + j), t)) * s;
      if constexpr (kAdd) out[j] = std::fma(alpha, v, out[j]);
      else if constexpr (kScale) out[j] = alpha * v;
      else out[j] = v;
    }
    return;
  }
  const auto vs = hn::Set(df, s), va = hn::Set(df, alpha);
  auto put = [&](VF v, float* o) { PutDecoded<kAdd, kScale>(v, va, o); };
  const std::uint8_t* row = q.codes + r * L.rb;
#if HWY_TARGET != HWY_SCALAR
  if (L.nhalf) return put(hn::Mul(HalfNibbles<kTier>(row + g * (N / 2), NibbleTable(t), t), vs), out);
#endif
  if (q.nibble) {
    const std::size_t h = q.group / 2;
    const std::uint8_t* p = row + g * h;
    const VF table = NibbleTable(t);
    for (std::size_t j = 0; j < h; j += N) {
      VF lo, hi;
      Nibbles<kTier>(LoadBytes(p + j), table, t, lo, hi);
      put(hn::Mul(lo, vs), out + j);
      put(hn::Mul(hi, vs), out + h + j);
    }
  } else {
    const std::uint8_t* p = row + c0;
    for (std::size_t j = 0; j < q.group; j += N) put(hn::Mul(Codes<kTier>(LoadBytes(p + j), t), vs), out + j);
  }
}

template <bool kTier, bool kAdd = false, bool kScale = false>
HWY_INLINE void DecodeRowsT(const QView& q, std::size_t r0, std::size_t nr, const TierParams& t, float* out, std::size_t ld,
                            float alpha = 1.0f) {
  const DF df;
  const std::size_t N = hn::Lanes(df);
  const Layout L = MakeLayout(q, N);
  std::size_t g0 = 0;  // the first group of the per-group loop
#if HWY_TARGET != HWY_SCALAR
  if (L.nnarrow) {  // narrow groups: vectors of gpv groups, each lane at its group's scale
    const NarrowIx nx = MakeNarrowIx(q);
    const VF table = NibbleTable(t), va = hn::Set(df, alpha);
    for (std::size_t i = 0; i < nr; ++i)
      for (std::size_t v = 0; v < L.nnarrow; ++v)
        PutDecoded<kAdd, kScale>(hn::Mul(NarrowCodes<kTier>(q, q.codes + (r0 + i) * L.rb, v, table, t, nx),
                                         NarrowScalesBF16(q, L, r0 + i, v, t, nx)),
                                 va, out + i * ld + v * N);
    g0 = L.nnarrow * L.gpv;
  }
#endif
  // the groups from gs: runs decoded by DecodeSpan into buf, then put as vectors
  const std::size_t gs = std::max({g0, L.nfast, L.nhalf}), sg = SpanGroups(q);
  HWY_ALIGN float buf[kSpanMax + kSpanPad];
  const auto va = hn::Set(df, alpha);
  for (std::size_t i = 0; i < nr; ++i) {
    float* o = out + i * ld;
    for (std::size_t g = g0; g < gs; ++g) DecodeGroup<kTier, kAdd, kScale>(q, L, r0 + i, g, t, o + g * q.group, alpha);
    if (!sg) {
      for (std::size_t g = gs; g < L.gpr; ++g) DecodeGroup<kTier, kAdd, kScale>(q, L, r0 + i, g, t, o + g * q.group, alpha);
      continue;
    }
    for (std::size_t ga = gs; ga < L.gpr; ga += sg) {
      const std::size_t n = DecodeSpan<kTier>(q, L, r0 + i, ga, std::min(ga + sg, L.gpr), t, buf);
      float* oa = o + ga * q.group;
      std::size_t j = 0;
      for (; j + N <= n; j += N) PutDecoded<kAdd, kScale>(hn::Load(df, buf + j), va, oa + j);
      for (; j < n; ++j) {
        if constexpr (kAdd) oa[j] = std::fma(alpha, buf[j], oa[j]);
        else if constexpr (kScale) oa[j] = alpha * buf[j];
        else oa[j] = buf[j];
      }
    }
  }
}

// y[i] += alpha * sum_j W[r0 + i, j] x[j] for R rows: codes decoded in registers, one x load
// shared by the R rows, the group's scale applied once per group.
template <std::size_t R, bool kTier>
HWY_INLINE void GemvNTRows(const QView& q, std::size_t r0, const TierParams& t, const float* HWY_RESTRICT x, float alpha,
                           float* HWY_RESTRICT y) {
  const DF df;
  const std::size_t N = hn::Lanes(df);
  const Layout L = MakeLayout(q, N);
  const std::size_t gpr = L.gpr, rb = L.rb;
  const VF table = NibbleTable(t);
  VF acc[R];
  float tail[R];
  for (std::size_t i = 0; i < R; ++i) acc[i] = hn::Zero(df), tail[i] = 0.0f;
  std::size_t g0 = 0;  // the first group of the per-group loop
#if HWY_TARGET != HWY_SCALAR
  if (L.nnarrow) {  // narrow groups: vectors of gpv groups, each lane at its group's scale
    const NarrowIx nx = MakeNarrowIx(q);
    const std::size_t vb = q.nibble ? N / 2 : N;  // code bytes per vector
    for (std::size_t v = 0; v < L.nnarrow; ++v) {
      const VF xv = hn::LoadU(df, x + v * N);
      for (std::size_t i = 0; i < R; ++i) {
        const std::uint8_t* row = q.codes + (r0 + i) * rb;
        if ((v * vb) % 64 == 0) hwy::Prefetch(row + v * vb + kPrefetchAhead);
        const VF w = hn::Mul(NarrowCodes<kTier>(q, row, v, table, t, nx), NarrowScalesBF16(q, L, r0 + i, v, t, nx));
        acc[i] = hn::MulAdd(w, xv, acc[i]);
      }
    }
    g0 = L.nnarrow * L.gpv;
  }
#endif
  // the groups from gs: runs decoded by DecodeSpan, then f32 vectors (after the loop)
  const std::size_t gs = std::max({g0, L.nfast, L.nhalf}), sg = SpanGroups(q), gend = sg ? gs : gpr;
  for (std::size_t g = g0; g < gend; ++g) {
    const std::size_t c0 = g * q.group;
#if HWY_TARGET != HWY_SCALAR
    if (g < L.nhalf) {
      const VF xv = hn::LoadU(df, x + c0);
      for (std::size_t i = 0; i < R; ++i) {
        const std::uint8_t* p = q.codes + (r0 + i) * rb + g * (N / 2);
        if (g % 8 == 0) hwy::Prefetch(p + kPrefetchAhead);
        acc[i] = hn::MulAdd(hn::Mul(HalfNibbles<kTier>(p, table, t), xv), hn::Set(df, Scale(q, L, r0 + i, g, t)), acc[i]);
      }
      continue;
    }
#endif
    if (g >= L.nfast) {
      const std::size_t n = std::min<std::size_t>(q.group, q.cols - c0);
      for (std::size_t i = 0; i < R; ++i) {
        float s = 0;
        for (std::size_t j = 0; j < n; ++j)
          s += static_cast<float>(detail::tiered(detail::stored_code(q, r0 + i, c0 + j), t)) * x[c0 + j];
        tail[i] += s * Scale(q, L, r0 + i, g, t);
      }
      continue;
    }
    VF part[R];
    for (std::size_t i = 0; i < R; ++i) part[i] = hn::Zero(df);
    if (q.nibble) {
      const std::size_t h = q.group / 2;
      for (std::size_t j = 0; j < h; j += N) {
        const VF xl = hn::LoadU(df, x + c0 + j), xh = hn::LoadU(df, x + c0 + h + j);
        for (std::size_t i = 0; i < R; ++i) {
          hwy::Prefetch(q.codes + (r0 + i) * rb + g * h + j + kPrefetchAhead);
          VF lo, hi;
          Nibbles<kTier>(LoadBytes(q.codes + (r0 + i) * rb + g * h + j), table, t, lo, hi);
          part[i] = hn::MulAdd(lo, xl, part[i]);
          part[i] = hn::MulAdd(hi, xh, part[i]);
        }
      }
    } else {
      for (std::size_t j = 0; j < q.group; j += N) {
        const VF xv = hn::LoadU(df, x + c0 + j);
        for (std::size_t i = 0; i < R; ++i) {
          // 8 KB ahead, a line per row at a time, as the nibble path does (tinymoe's 5-bit
          // cores, before they took rows in lanes: one cold w1 apply 27-37 -> 20-26 us)
          if (j % 64 == 0) hwy::Prefetch(q.codes + (r0 + i) * rb + c0 + j + kPrefetchAhead);
          part[i] = hn::MulAdd(Codes<kTier>(LoadBytes(q.codes + (r0 + i) * rb + c0 + j), t), xv, part[i]);
        }
      }
    }
    for (std::size_t i = 0; i < R; ++i)
      acc[i] = hn::MulAdd(part[i], hn::Set(df, Scale(q, L, r0 + i, g, t)), acc[i]);
  }
  if (gend < gpr) {
    HWY_ALIGN float buf[kSpanMax + kSpanPad];
    for (std::size_t ga = gs; ga < gpr; ga += sg)
      for (std::size_t i = 0; i < R; ++i) {
        const std::size_t n = DecodeSpan<kTier>(q, L, r0 + i, ga, std::min(ga + sg, gpr), t, buf);
        const float* xa = x + ga * q.group;
        std::size_t j = 0;
        for (; j + N <= n; j += N) acc[i] = hn::MulAdd(hn::Load(df, buf + j), hn::LoadU(df, xa + j), acc[i]);
        for (; j < n; ++j) tail[i] += buf[j] * xa[j];
      }
  }
  for (std::size_t i = 0; i < R; ++i) y[i] += alpha * (hn::GetLane(hn::SumOfLanes(df, acc[i])) + tail[i]);
}

template <bool kTier>
HWY_INLINE void GemvNTT(const QView& q, std::size_t r0, std::size_t nr, const TierParams& t, const float* x, float alpha, float* y) {
  std::size_t i = 0;
  for (; i + 4 <= nr; i += 4) GemvNTRows<4, kTier>(q, r0 + i, t, x, alpha, y + i);
  for (; i < nr; ++i) GemvNTRows<1, kTier>(q, r0 + i, t, x, alpha, y + i);
}

// ---- Rows in lanes (QView::lanes), f32 activations ----
// One vector is the same 4 code bytes (8 codes) of NL rows of a panel: each code column is one
// shift plus a lookup (AVX-512: vpermps in the tier's table, indexed by c + 8) or a conversion
// after a byte shuffle and a mask or shift (elsewhere; a shift pair at a tier), and one FMA with
// x[column] broadcast, every row in its own lane.
// The same products as GemvNTRows, summed in another order.
#if HWY_TARGET != HWY_SCALAR
// The activations of ng groups of T tokens (x: at the first group's column) packed for
// LanesGemmRows: per group and quad k, for each token the columns of the quad's codes (nibbles:
// the low-nibble ones 4k ... 4k + 3, then the high-nibble ones hb + 4k ...; bytes: 4k ... 4k + 3),
// so every broadcast of the products is one base pointer plus a constant offset.
template <std::size_t T>
HWY_INLINE void LanesPack(const QView& q, std::size_t ng, const float* HWY_RESTRICT x, std::size_t ldx, float* HWY_RESTRICT xp) {
  const std::size_t nq = q.lanes_quads(), hb = q.group / 2;
  for (std::size_t g = 0; g < ng; ++g, x += q.group)
    for (std::size_t k = 0; k < nq; ++k)
      for (std::size_t u = 0; u < T; ++u) {
        std::memcpy(xp, x + u * ldx + 4 * k, 4 * sizeof(float));
        xp += 4;
        if (!q.nibble) continue;
        std::memcpy(xp, x + u * ldx + hb + 4 * k, 4 * sizeof(float));
        xp += 4;
      }
}

// Byte shuffles moving code column B < 3 of every lane into the lane's top byte, zeros below.
struct TopIndex {
  hn::Vec<hn::Repartition<std::uint8_t, DF>> v[3];
};
HWY_INLINE TopIndex MakeTopIndex() {
  const hn::Repartition<std::uint8_t, DF> du8;
  HWY_ALIGN static constexpr std::uint8_t kIndex[3][16] = {
      {0x80, 0x80, 0x80, 0, 0x80, 0x80, 0x80, 4, 0x80, 0x80, 0x80, 8, 0x80, 0x80, 0x80, 12},
      {0x80, 0x80, 0x80, 1, 0x80, 0x80, 0x80, 5, 0x80, 0x80, 0x80, 9, 0x80, 0x80, 0x80, 13},
      {0x80, 0x80, 0x80, 2, 0x80, 0x80, 0x80, 6, 0x80, 0x80, 0x80, 10, 0x80, 0x80, 0x80, 14}};
  return {{hn::LoadDup128(du8, kIndex[0]), hn::LoadDup128(du8, kIndex[1]), hn::LoadDup128(du8, kIndex[2])}};
}

// The two code columns of byte B of a nibble quad (lo: the low nibbles). AVX-512: a vpermps each
// from the tier's table, indexed by the stored nibble c + 8 (w). Elsewhere from wx (the codes in
// two's complement, stored ^ 0x88): with kTop, c 2^28 (the byte moved into the lane's top byte by
// one byte shuffle, zeros below, then a mask for the high nibble and a shift for the low one: 3
// operations per byte instead of 4 shifts); else c at the tier (a shift pair sign-extends each).
template <bool kTier, bool kTop, int B>
HWY_INLINE void LanesByte(VI w, VI wx, VF table, const TopIndex& ix, const TierParams& t, VF& lo, VF& hi) {
#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL
  (void)wx, (void)ix, (void)t;
  lo = VF{_mm512_permutexvar_ps(hn::ShiftRight<8 * B>(w).raw, table.raw)};
  hi = VF{_mm512_permutexvar_ps(hn::ShiftRight<8 * B + 4>(w).raw, table.raw)};
#else
  (void)w, (void)table;
  if constexpr (kTop) {
    const VI top = hn::Set(DI(), static_cast<std::int32_t>(0xF0000000u));
    VI s = wx;
    if constexpr (B < 3) s = hn::BitCast(DI(), hn::TableLookupBytesOr0(hn::BitCast(hn::Repartition<std::uint8_t, DF>(), wx), ix.v[B]));
    hi = hn::ConvertTo(DF(), hn::And(s, top));
    lo = hn::ConvertTo(DF(), B < 3 ? hn::ShiftLeft<4>(s) : hn::And(hn::ShiftLeft<4>(s), top));
  } else {
    (void)ix;
    lo = Codes<kTier>(hn::ShiftRight<28>(hn::ShiftLeft<28 - 8 * B>(wx)), t);
    hi = Codes<kTier>(hn::ShiftRight<28>(hn::ShiftLeft<24 - 8 * B>(wx)), t);
  }
#endif
}

// Code column B of a byte quad w (4 codes per lane) as f32: with kTop, c 2^24 (the code moved
// into the top byte, one shuffle or mask); else c at the tier (a shift pair sign-extends it).
template <bool kTier, bool kTop, int B>
HWY_INLINE VF ByteColumn(VI w, const TopIndex& ix, const TierParams& t) {
  if constexpr (kTop) {
    if constexpr (B == 3) return hn::ConvertTo(DF(), hn::And(w, hn::Set(DI(), static_cast<std::int32_t>(0xFF000000u))));
    else return hn::ConvertTo(DF(), hn::BitCast(DI(), hn::TableLookupBytesOr0(hn::BitCast(hn::Repartition<std::uint8_t, DF>(), w), ix.v[B])));
  } else {
    (void)ix;
    return Codes<kTier>(hn::ShiftRight<24>(hn::ShiftLeft<24 - 8 * B>(w)), t);
  }
}

// ya[u] += rows [h NL, h NL + NL) of panel p times token u over groups [g0, g0 + ng), scaled
// (not yet by alpha), each code column decoded once for all T tokens. The activations: for one
// token x itself (at group g0's column), else packed by LanesPack (x = its buffer). Each token
// keeps one accumulator per code column of a quad (cycling), ceil(8 / T) but at most the quad's
// columns on AVX-512 (elsewhere ceil(columns / T)), so 8-10 FMA chains are in flight from 2
// tokens on. floor(8 / T) had left 5-7 tokens 5-7 chains: a 3-bit 49 x 256 right factor, hot,
// Zen 5, 5 tokens 0.98-1.01 -> 0.78-0.83 us, 7 tokens 1.29-1.34 -> 1.03-1.12; and byte codes 4
// chains at 2 and 4 tokens: a 5-bit 256 x 256 core block of the real tinymoe layer, 4 tokens
// 3.72-3.80 -> 3.21-3.25 us, 6 tokens 4.92-5.00 -> 4.41-4.48, 2 tokens unchanged. Two per token
// at 8 tokens (16 chains) measured 3 % faster on that block in a scratch build but 5-15 % slower
// on the bench's 5-bit 2048 x 1408 core (`kernel/s2lc/core5_2048x1408_t8`), so 8 tokens keep one.
// The byte container (kNib false): a quad is 4 code columns, each a conversion and one FMA per
// token after moving the column's code into the top byte of its lane (a byte shuffle, or
// a mask for the top column: the lane holds c 2^24, undone with the group's sum, exactly while
// the scaled partial sums stay finite, i.e. for activations below 2^92 in magnitude) for one
// or two tokens, or sign-extending it with a shift pair for more (and for tiers) where the
// shuffle measured slower (a table would need 256 entries; a 32-entry vpermt2ps for 5-bit codes
// measured no faster). Against the row-major kernel (GemvNTRows), hot, one 256 x 256 5-bit block
// on AVX-512: one token 18.6 -> 38 GMAC/s with the shift pair -> 49 with the shuffle, two 58 -> 63,
// four 19 -> 70 (scratch). kNQ: quads per group as a constant (0: q.lanes_quads()); nibble groups
// of 32 (4 quads) take it, so their quad loop unrolls: a 3-bit 256 x 256 block, one token 45-47 ->
// 55-57 GMAC/s, two 61-65 -> 75-78, four the same; byte groups measured slower with it (5-bit:
// one token 48-49 -> 45) and keep the loop.
template <bool kTier, std::size_t T, bool kNib, std::size_t kNQ = 0>
HWY_INLINE void LanesGemmRows(const QView& q, std::size_t p, std::size_t h, std::size_t g0, std::size_t ng, const TierParams& t,
                              VF table, const float* HWY_RESTRICT x, VF (&ya)[T]) {
  constexpr std::size_t kC = kNib ? 8 : 4;  // code columns per quad
  // accumulators per token: at least 8 FMA chains where 32 registers hold them
  constexpr std::size_t kA = hn::MaxLanes(DF()) >= 16 ? std::min(kC, (8 + T - 1) / T) : (kC + T - 1) / T;
  constexpr bool kTop = !kNib && !kTier && T <= 2;
  constexpr bool kNibTop = kNib && !kTier && T <= 2 && !(HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL);
  constexpr bool kFold = kNib && T >= 16;  // the scale folded into each decoded column (registers for 16 tokens)
  const DF df;
  const std::size_t NL = hn::Lanes(df), nq = kNQ ? kNQ : q.lanes_quads(), hb = T == 1 ? q.group / 2 : 4;  // hb: nibbles
  const std::size_t rec = q.lanes_record(), sc = q.lanes_codes() + 2 * NL * h;
  const VF mul = hn::Set(df, t.mul);
  const TopIndex ix = MakeTopIndex();
  const VF unit = hn::Set(df, kTop ? 0x1p-24f : kNibTop ? 0x1p-28f : 1.0f);  // undoes kTop's 2^24, kNibTop's 2^28
  const std::uint8_t* r = q.lanes_at(p, g0);
  for (std::size_t g = 0; g < ng; ++g, r += rec) {
    if (h == 0)
      for (std::size_t o = 0; o < rec + 64; o += 64) hwy::Prefetch(r + kPrefetchAhead + o);
    const VF s = hn::Mul(BF16ToF32Vec(hn::LoadU(DU16(), reinterpret_cast<const std::uint16_t*>(r + sc))), mul);
    VF acc[T][kA];
    for (std::size_t u = 0; u < T; ++u)
      for (std::size_t a = 0; a < kA; ++a) acc[u][a] = hn::Zero(df);
    // token u's value of the code column's low (x[u * 8 + b]) and high (x[u * 8 + hb + b]) nibbles
    const float* xg = x + g * (T == 1 ? q.group : nq * kC * T);
    for (std::size_t k = 0; k < nq; ++k, xg += T == 1 ? 4 : kC * T) {
      const VI w = hn::LoadU(DI(), reinterpret_cast<const std::int32_t*>(r + 64 * k + 4 * NL * h));
      if constexpr (kNib) {
        const VI wx = hn::Xor(w, hn::Set(DI(), static_cast<std::int32_t>(0x88888888u)));
        VF lo, hi;
#define S2LC_LANES_COLUMN(B)                                                \
        LanesByte<kTier, kNibTop, B>(w, wx, table, ix, t, lo, hi);          \
        if constexpr (kFold) lo = hn::Mul(lo, s), hi = hn::Mul(hi, s);      \
        for (std::size_t u = 0; u < T; ++u) {                               \
          VF& ac = kFold ? ya[u] : acc[u][(2 * B) % kA];                    \
          ac = hn::MulAdd(lo, hn::Set(df, xg[u * 8 + B]), ac);               \
        }                                                                   \
        for (std::size_t u = 0; u < T; ++u) {                               \
          VF& ah = kFold ? ya[u] : acc[u][(2 * B + 1) % kA];                \
          ah = hn::MulAdd(hi, hn::Set(df, xg[u * 8 + hb + B]), ah);          \
        }
        S2LC_LANES_COLUMN(0) S2LC_LANES_COLUMN(1) S2LC_LANES_COLUMN(2) S2LC_LANES_COLUMN(3)
#undef S2LC_LANES_COLUMN
      } else {
#define S2LC_LANES_COLUMN(B)                                                                 \
        {                                                                                    \
          const VF c = ByteColumn<kTier, kTop, B>(w, ix, t);                                 \
          for (std::size_t u = 0; u < T; ++u) {                                              \
            VF& ac = acc[u][B % kA];                                                         \
            ac = hn::MulAdd(c, hn::Set(df, xg[u * 4 + B]), ac);                              \
          }                                                                                  \
        }
        S2LC_LANES_COLUMN(0) S2LC_LANES_COLUMN(1) S2LC_LANES_COLUMN(2) S2LC_LANES_COLUMN(3)
#undef S2LC_LANES_COLUMN
      }
    }
    if constexpr (kFold) continue;
    for (std::size_t u = 0; u < T; ++u) {
      VF a = acc[u][0];
      for (std::size_t i = 1; i < kA; ++i) a = hn::Add(a, acc[u][i]);
      if constexpr (kTop || kNibTop) a = hn::Mul(a, unit);
      ya[u] = hn::MulAdd(a, s, ya[u]);
    }
  }
}
#endif

// LanesByte's lookup table: AVX-512's is indexed by the stored nibble, c + 8 (unused elsewhere).
HWY_INLINE VF LanesTable(const TierParams& t) {
#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL
  HWY_ALIGN float tab[16];
  for (std::size_t u = 0; u < 16; ++u) tab[u] = t.nibble[u ^ 8];
  return hn::Load(DF(), tab);
#else
  (void)t;
  return hn::Zero(DF());
#endif
}

// Columns of activations packed at a time (a stack buffer of kLanesPackCols * T floats).
inline constexpr std::size_t kLanesPackCols = 512;
// Columns a pass of T tokens packs at a time: passes of more than 8 tokens take fewer, so the
// buffer stays at most kLanesPackCols * 8 floats.
template <std::size_t T>
inline constexpr std::size_t kLanesPackColsT = T > 8 ? kLanesPackCols * 8 / T : kLanesPackCols;

// Real rows in a 16-row block up to which LanesGemmTile computes them one by one (LanesRowsAlone)
// instead of the whole block: a low-rank right factor of rank 33 stores and would compute 48 rows.
inline constexpr std::size_t kLanesAloneRows = 4;

#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL
// y[u * ldy + i - i0] += alpha * row i of panel p (AVX-512: 16 rows, h = 0) times token u over
// groups [g0, g0 + ng), for rows [i0, i0 + n) one at a time, T = 2 to 8 or 16 tokens, nibble
// codes, activations packed by LanesPack (xp). Each quad of the row is one 32-bit word of 8 codes:
// broadcast to 16 lanes, shifted per lane to the nibble each lane takes (the low nibbles of bytes
// 0-3, then the high ones: LanesPack's order), looked up in the tier's table (vpermps reads the
// low 4 bits), and multiplied into two tokens' 8 packed activations per vector (an odd last token:
// its 8 in a half vector); per group the row's scale, at the end a sum over each token's 8 lanes.
// Per quad and row: 3 operations and T / 2 FMAs, against LanesGemmRows' 8 lookups and 8 T FMAs
// for the whole block.
template <std::size_t T>
HWY_INLINE void LanesRowsAlone(const QView& q, std::size_t p, std::size_t g0, std::size_t ng, const TierParams& t, VF table,
                               const float* HWY_RESTRICT xp, std::size_t i0, std::size_t n, float alpha, float* y, std::size_t ldy) {
  static_assert(T >= 2 && (T <= 8 || T == 16));
  constexpr std::size_t kP = T / 2;  // full vectors: two tokens each
  constexpr bool kOdd = T % 2 != 0;  // then token T - 1 in a half vector
  const DF df;
  const hn::Half<DF> dh;
  using VH = hn::Vec<hn::Half<DF>>;
  const std::size_t nq = q.lanes_quads(), rec = q.lanes_record(), sc = q.lanes_codes();
  HWY_ALIGN static constexpr std::int32_t kShift[16] = {0, 8, 16, 24, 4, 12, 20, 28, 0, 8, 16, 24, 4, 12, 20, 28};
  const VI shift = hn::Load(DI(), kShift);
  const std::uint8_t* r0 = q.lanes_at(p, g0);
  for (std::size_t o = 0; o < ng * rec; o += 64) hwy::Prefetch(r0 + kPrefetchAhead + o);
  for (std::size_t i = i0; i < i0 + n; ++i) {
    VF ya[kP];
    for (std::size_t j = 0; j < kP; ++j) ya[j] = hn::Zero(df);
    VH yo = hn::Zero(dh);
    const std::uint8_t* r = r0;
    const float* xg = xp;
    for (std::size_t g = 0; g < ng; ++g, r += rec) {
      VF acc[kP];
      for (std::size_t j = 0; j < kP; ++j) acc[j] = hn::Zero(df);
      VH ao = hn::Zero(dh);
      for (std::size_t k = 0; k < nq; ++k, xg += 8 * T) {
        std::int32_t word;
        std::memcpy(&word, r + 64 * k + 4 * i, 4);
        const VF c{_mm512_permutexvar_ps(_mm512_srlv_epi32(hn::Set(DI(), word).raw, shift.raw), table.raw)};
        for (std::size_t j = 0; j < kP; ++j) acc[j] = hn::MulAdd(c, hn::LoadU(df, xg + 16 * j), acc[j]);
        if constexpr (kOdd) ao = hn::MulAdd(hn::LowerHalf(dh, c), hn::LoadU(dh, xg + 16 * kP), ao);
      }
      std::uint16_t sb;
      std::memcpy(&sb, r + sc + 2 * i, 2);
      const float s = s2lc::bf16_to_f32(sb) * t.mul;
      for (std::size_t j = 0; j < kP; ++j) ya[j] = hn::MulAdd(acc[j], hn::Set(df, s), ya[j]);
      if constexpr (kOdd) yo = hn::MulAdd(ao, hn::Set(dh, s), yo);
    }
    for (std::size_t j = 0; j < kP; ++j) {
      y[2 * j * ldy + i - i0] += alpha * hn::GetLane(hn::SumOfLanes(dh, hn::LowerHalf(dh, ya[j])));
      y[(2 * j + 1) * ldy + i - i0] += alpha * hn::GetLane(hn::SumOfLanes(dh, hn::UpperHalf(dh, ya[j])));
    }
    if constexpr (kOdd) y[(T - 1) * ldy + i - i0] += alpha * hn::GetLane(hn::SumOfLanes(dh, yo));
  }
}
#endif

template <bool kTier, std::size_t T>
HWY_INLINE void LanesGemmTile(const QView& q, std::size_t r0, std::size_t nr, const TierParams& t, VF tbl, const float* x,
                              std::size_t ldx, float alpha, float* y, std::size_t ldy) {
#if HWY_TARGET != HWY_SCALAR
  const DF df;
  const std::size_t NL = hn::Lanes(df), gpr = q.groups_per_row();
  constexpr std::size_t kCols = kLanesPackColsT<T>;
  const std::size_t chunk = T == 1 ? gpr : std::max<std::size_t>(1, kCols / q.group);
  HWY_ALIGN float xp[T == 1 ? 1 : kCols * T];
  for (std::size_t g0 = 0; g0 < gpr; g0 += chunk) {
    const std::size_t ng = std::min(chunk, gpr - g0);
    if (T > 1) LanesPack<T>(q, ng, x + g0 * q.group, ldx, xp);
    for (std::size_t b = r0 / NL * NL; b < r0 + nr; b += NL) {
      const std::size_t i0 = b < r0 ? r0 - b : 0, n = std::min(b + NL, r0 + nr) - (b + i0);
      const float* xa = T == 1 ? x + g0 * q.group : xp;
      const std::size_t p = b / QView::kLaneRows, h = b % QView::kLaneRows / NL;
#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL
      if constexpr (T >= 2)
        if (q.nibble && n <= kLanesAloneRows) {
          LanesRowsAlone<T>(q, p, g0, ng, t, tbl, xp, i0, n, alpha, y + (b + i0 - r0), ldy);
          continue;
        }
#endif
      VF ya[T];
      for (std::size_t u = 0; u < T; ++u) ya[u] = hn::Zero(df);
      if (q.nibble && q.group == 32) LanesGemmRows<kTier, T, true, 4>(q, p, h, g0, ng, t, tbl, xa, ya);
      else if (q.nibble) LanesGemmRows<kTier, T, true>(q, p, h, g0, ng, t, tbl, xa, ya);
      else LanesGemmRows<kTier, T, false>(q, p, h, g0, ng, t, tbl, xa, ya);
      q8k::LanesStore<T>(ya, i0, n, alpha, y + (b + i0 - r0), ldy);
    }
  }
#else
  (void)q, (void)r0, (void)nr, (void)t, (void)tbl, (void)x, (void)ldx, (void)alpha, (void)y, (void)ldy;
#endif
}

// Tokens per pass of LanesGemmT: 8 where there are 32 vector registers (8 accumulators and 8
// group sums), else 4.
inline constexpr std::size_t kLanesGemmPass = hn::MaxLanes(DF()) >= 16 ? 8 : 4;

// Y[u, r0 + i] += alpha * sum_j q[r0 + i, j] X[u, j] for a rows-in-lanes q: passes of 8 tokens
// on AVX-512, then the 3, 5, 6 or 7 left in one pass (4 elsewhere; then 4, 2, 1), each reading
// the codes once. Against passes of 4, 2, 1 for the rest, a 3-bit 49 x 256 right factor of the
// real tinymoe layer, hot, Zen 5 (the layer at 8 tokens routes 1-5 tokens to each expert, at 32
// 5-12): 3 tokens 0.64-0.68 -> 0.53-0.56 us, 7 tokens 1.29-1.34 -> 1.03-1.12 (with the
// accumulators of LanesGemmRows). One 256 x 256 block, hot,
// 8 tokens, dynamic-dispatch build on AVX-512: 5-bit (bytes) 67 -> 87 GMAC/s against passes of 4,
// 4-bit 84-85 -> 86-87, 3-bit 78-86 -> 83-86. (When the kernel last had them, 2026-11, g++ 12
// spilled the accumulators of 8-token passes in that build: 79 against 109 GMAC/s for 4-bit.)
// Nibble codes on AVX-512 take passes of 16 tokens first (LanesGemmRows folds each group's
// scales into the decoded columns there, so 16 sums and the decode fit the 32 registers; the
// 8 multiplies per quad cost less than the second pass's 15 lookups and shifts). Intel Xeon VM
// (two 512-bit FMA ports, which also run the lookups and shifts), 4-bit 2048 x 1408 at 32
// tokens, hot: 75-82 -> 77-85 GMAC/s in a scratch driver, at the edge of noise in the bench's
// kernel/ rows (bench/RESULTS.md).
template <bool kTier>
HWY_INLINE void LanesGemmT(const QView& q, std::size_t r0, std::size_t nr, const TierParams& t, const float* X, std::size_t ldx,
                           std::size_t nt, float alpha, float* Y, std::size_t ldy) {
  const VF tbl = LanesTable(t);
  std::size_t u = 0;
#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL
  if (q.nibble && q.group <= kLanesPackColsT<16>)  // a group must fit one pack
    for (; u + 16 <= nt; u += 16) LanesGemmTile<kTier, 16>(q, r0, nr, t, tbl, X + u * ldx, ldx, alpha, Y + u * ldy, ldy);
#endif
  if constexpr (kLanesGemmPass == 8) {
    for (; u + 8 <= nt; u += 8) LanesGemmTile<kTier, 8>(q, r0, nr, t, tbl, X + u * ldx, ldx, alpha, Y + u * ldy, ldy);
    switch (nt - u) {  // 3, 5, 6 or 7 left: one pass decoding the codes once, not passes of 4, 2, 1
      case 7: return LanesGemmTile<kTier, 7>(q, r0, nr, t, tbl, X + u * ldx, ldx, alpha, Y + u * ldy, ldy);
      case 6: return LanesGemmTile<kTier, 6>(q, r0, nr, t, tbl, X + u * ldx, ldx, alpha, Y + u * ldy, ldy);
      case 5: return LanesGemmTile<kTier, 5>(q, r0, nr, t, tbl, X + u * ldx, ldx, alpha, Y + u * ldy, ldy);
      case 3: return LanesGemmTile<kTier, 3>(q, r0, nr, t, tbl, X + u * ldx, ldx, alpha, Y + u * ldy, ldy);
      default: break;
    }
  }
  for (; u + 4 <= nt; u += 4) LanesGemmTile<kTier, 4>(q, r0, nr, t, tbl, X + u * ldx, ldx, alpha, Y + u * ldy, ldy);
  if (u + 2 <= nt) LanesGemmTile<kTier, 2>(q, r0, nr, t, tbl, X + u * ldx, ldx, alpha, Y + u * ldy, ldy), u += 2;
  if (u < nt) LanesGemmTile<kTier, 1>(q, r0, nr, t, tbl, X + u * ldx, ldx, alpha, Y + u * ldy, ldy);
}

template <bool kTransC>
HWY_INLINE void GemmNNT(const float* C, std::size_t ldc, std::size_t nt, std::size_t K, const float* A, std::size_t lda,
                        std::size_t ncols, float* Y, std::size_t ldy);

// Y[i, j] += sum_k C[i, k] W[k, j], k < nk, i < nt, over the groups [g0, g1) of each row that no
// tile takes, in runs of a row's groups (DecodeSpan) decoded once for the nt tokens: a chunk of
// rows at a time into a buffer whose whole vectors gemm_nn's register tiles take (the columns left
// per token and row); a run narrower than a vector, each token's row of Y updated per decoded row.
// AVX-512, 4-bit 256 x 256 in groups of 96 (bench rows): q_gemm_nn at 8 tokens 16.4 us with Y
// updated per decoded row, 14.6 decoding first then gemm_nn, 9.7 so; scratch, one token 3.95 ->
// 2.8 us.
template <bool kTier>
HWY_NOINLINE void GemvNNScalar(const QView& q, const Layout& L, std::size_t k0, std::size_t nk, const TierParams& t, const float* C,
                               std::size_t ldc, std::size_t nt, std::size_t g0, std::size_t g1, float* Y, std::size_t ldy) {
  const DF df;
  const std::size_t N = hn::Lanes(df), sg = SpanGroups(q);
  if (g0 >= g1 || nk == 0 || nt == 0) return;
  if (!sg) {
    for (std::size_t g = g0; g < g1; ++g) {
      const std::size_t c0 = g * q.group, n = std::min<std::size_t>(q.group, q.cols - c0);
      for (std::size_t i = 0; i < nt; ++i)
        for (std::size_t k = 0; k < nk; ++k) {
          const float cs = C[i * ldc + k] * Scale(q, L, k0 + k, g, t);
          float* HWY_RESTRICT y = Y + i * ldy + c0;
          for (std::size_t j = 0; j < n; ++j) y[j] += cs * static_cast<float>(detail::tiered(detail::stored_code(q, k0 + k, c0 + j), t));
        }
    }
    return;
  }
  constexpr std::size_t kBuf = 8192;  // floats: at least one run (kSpanMax + kSpanPad)
  static_assert(kBuf >= kSpanMax + kSpanPad);
  HWY_ALIGN float buf[kBuf];
  for (std::size_t ga = g0; ga < g1; ga += sg) {
    const std::size_t gb = std::min(ga + sg, g1), c0 = ga * q.group;
    const std::size_t w = std::min<std::size_t>(gb * q.group, q.cols) - c0, wv = w / N * N;
    if (wv) {  // whole vectors of the run through gemm_nn's tiles, the rest per token and row
      const std::size_t ld = w + kSpanPad, kc = kBuf / ld;
      for (std::size_t kb = 0; kb < nk; kb += kc) {
        const std::size_t n = std::min(kc, nk - kb);
        for (std::size_t k = 0; k < n; ++k) DecodeSpan<kTier>(q, L, k0 + kb + k, ga, gb, t, buf + k * ld);
        GemmNNT<false>(C + kb, ldc, nt, n, buf, ld, wv, Y + c0, ldy);
        if (wv == w) continue;
        for (std::size_t k = 0; k < n; ++k)
          for (std::size_t i = 0; i < nt; ++i) {
            const float ck = C[i * ldc + kb + k];
            float* HWY_RESTRICT y = Y + i * ldy + c0;
            for (std::size_t j = wv; j < w; ++j) y[j] += ck * buf[k * ld + j];
          }
      }
      continue;
    }
    for (std::size_t k = 0; k < nk; ++k) {
      const std::size_t n = DecodeSpan<kTier>(q, L, k0 + k, ga, gb, t, buf);
      for (std::size_t i = 0; i < nt; ++i) {
        const float ck = C[i * ldc + k];
        const VF vc = hn::Set(df, ck);
        float* HWY_RESTRICT y = Y + i * ldy + c0;
        std::size_t j = 0;
        for (; j + N <= n; j += N) hn::StoreU(hn::MulAdd(vc, hn::Load(df, buf + j), hn::LoadU(df, y + j)), df, y + j);
        for (; j < n; ++j) y[j] += ck * buf[j];
      }
    }
  }
}

// y[j] += sum_k c[k] W[k, j] over the G groups from g0 (kV vectors each): the columns stay in
// kV * G <= 8 register accumulators over every row k, so y is read and written once and a row
// costs its codes, G scales and kV * G FMAs.
template <std::size_t kV, std::size_t G, bool kTier>
HWY_INLINE void GemvNNTile(const QView& q, const Layout& L, std::size_t k0, std::size_t nk, const TierParams& t, const float* cs,
                           std::size_t g0, float* HWY_RESTRICT y) {
  const DF df;
  const std::size_t N = hn::Lanes(df);
  const VF table = NibbleTable(t);
  VF acc[kV * G];
  for (std::size_t v = 0; v < kV * G; ++v) acc[v] = hn::Zero(df);
  const std::size_t gb = q.nibble ? q.group / 2 : q.group;
  const std::uint8_t* p = q.codes + k0 * L.rb + g0 * gb;
  const float* sc = cs + g0;
  for (std::size_t k = 0; k < nk; ++k, p += L.rb, sc += L.gpr) {
    hwy::Prefetch(p + kPrefetchAhead);
    for (std::size_t gi = 0; gi < G; ++gi) {
      const VF cg = hn::Set(df, sc[gi]);
      if (q.nibble) {
#if HWY_TARGET != HWY_SCALAR
        if constexpr (kV == 1) acc[gi] = hn::MulAdd(HalfNibbles<kTier>(p + gi * gb, table, t), cg, acc[gi]);
#endif
        for (std::size_t j = 0; j < kV / 2; ++j) {
          VF lo, hi;
          Nibbles<kTier>(LoadBytes(p + gi * gb + j * N), table, t, lo, hi);
          acc[gi * kV + j] = hn::MulAdd(lo, cg, acc[gi * kV + j]);
          acc[gi * kV + kV / 2 + j] = hn::MulAdd(hi, cg, acc[gi * kV + kV / 2 + j]);
        }
      } else {
        for (std::size_t j = 0; j < kV; ++j)
          acc[gi * kV + j] = hn::MulAdd(Codes<kTier>(LoadBytes(p + gi * gb + j * N), t), cg, acc[gi * kV + j]);
      }
    }
  }
  float* yp = y + g0 * q.group;
  for (std::size_t v = 0; v < kV * G; ++v) hn::StoreU(hn::Add(hn::LoadU(df, yp + v * N), acc[v]), df, yp + v * N);
}

// (cs: the rows' coefficients c[k] 2^shift s[k, g], row stride L.gpr; see GemvNNT.)
template <std::size_t kV, bool kTier>
HWY_INLINE void GemvNNTiles(const QView& q, const Layout& L, std::size_t k0, std::size_t nk, const TierParams& t, const float* cs,
                            float* y) {
  constexpr std::size_t G = kV >= 8 ? 1 : 8 / kV;
  std::size_t g = 0;
  for (; g + G <= L.nfast; g += G) GemvNNTile<kV, G, kTier>(q, L, k0, nk, t, cs, g, y);
  for (; g < L.nfast; ++g) GemvNNTile<kV, 1, kTier>(q, L, k0, nk, t, cs, g, y);
}

// Floats of GemvNNT's coefficient buffer (stack): rows are taken kNNCoefs / groups at a time.
inline constexpr std::size_t kNNCoefs = 4096;

// cs[i gpr + g] *= c[i] mul for i < n, g < gpr (gpr scales a row): rows of 2, 4 or 8 scales as
// one vector of that many lanes (where the target's vectors are at least that wide), else whole
// vectors and scalars. A 256-column block of groups of 32 has 8 scales a row, which had been 8
// scalar products: q_gemv_nn on a 3-bit 48 x 256 left factor, hot, Zen 5, 0.34-0.38 -> 0.25-0.29
// us (best of 6-8 alternating runs; 256 x 256: 1.81-1.90 -> 1.34-1.44; bench/RESULTS.md "Where
// the 8-token layer's compute goes"). The same products.
template <std::size_t G>
HWY_INLINE void ScaleRowsOf(const float* HWY_RESTRICT c, std::size_t n, float mul, float* HWY_RESTRICT cs) {
  const hn::CappedTag<float, G> d;
  for (std::size_t i = 0; i < n; ++i, cs += G) hn::StoreU(hn::Mul(hn::LoadU(d, cs), hn::Set(d, c[i] * mul)), d, cs);
}
HWY_INLINE void ScaleRows(const float* HWY_RESTRICT c, std::size_t n, std::size_t gpr, float mul, float* HWY_RESTRICT cs) {
  const DF df;
  const std::size_t N = hn::Lanes(df);
  if (gpr == 8 && N >= 8) return ScaleRowsOf<8>(c, n, mul, cs);
  if (gpr == 4 && N >= 4) return ScaleRowsOf<4>(c, n, mul, cs);
  if (gpr == 2 && N >= 2) return ScaleRowsOf<2>(c, n, mul, cs);
  for (std::size_t i = 0; i < n; ++i) {
    float* row = cs + i * gpr;
    const float ck = c[i] * mul;
    const VF vk = hn::Set(df, ck);
    std::size_t g = 0;
    for (; g + N <= gpr; g += N) hn::StoreU(hn::Mul(hn::LoadU(df, row + g), vk), df, row + g);
    for (; g < gpr; ++g) row[g] *= ck;
  }
}

// Groups of whole vectors that the whole-group tiles do not take (GemmNNQGroups: 1, 2, 4 or,
// from 2 tokens, 8 vectors; GemvNNTiles at one token: 1, 2, 3, 4, 6, 8, 16): wider ones (up to
// a row's one scale, per-channel quantization) and, from 2 tokens, 3, 5, 6, 7, 12 ... vectors
// (byte groups of 48 or 96 codes on AVX-512, nibble groups of 96 or 192). GemmNNQT runs them kW
// vectors of a group at a time. Groups of 3, 5, 6, 7, 12 ... vectors had taken the scalar path
// (and 3 and 6 at one token too): 8-bit 256 x 288 in groups of 48, AVX-512, q_gemm_nn at 8
// tokens 326 -> 6.4 us, q_gemv_nn 43 -> 1.7 (groups of 32: 5.1 and 1.1 on 256 x 256).
HWY_INLINE bool WideNN(const QView& q, const Layout& L, std::size_t N, std::size_t nt) {
  const std::size_t kv = q.group / N;
  const bool tiles = kv == 1 || kv == 2 || kv == 4 || kv == 8 || (nt == 1 && (kv == 3 || kv == 6 || kv == 16));
  return L.nfast && q.group % N == 0 && L.gpr <= kNNCoefs && !tiles;
}

// Accumulators a GemmNNQTile may keep: 16 with 32 vector registers (AVX-512), else 8.
inline constexpr std::size_t kNNQAcc = hn::MaxLanes(DF()) >= 16 ? 16 : 8;

// The T tokens' coefficients of rows [0, nk) (token i's at C + i ldc) packed row by row into pack
// (row k's at pack + k T, nk T <= kNNCoefs), so every broadcast of a tile is one base pointer
// plus a constant offset; one token: C itself, already contiguous.
template <std::size_t T>
HWY_INLINE const float* PackCoefs(const float* C, std::size_t ldc, std::size_t nk, float* pack) {
  if constexpr (T == 1) {
    (void)ldc, (void)nk, (void)pack;
    return C;
  } else {
    for (std::size_t k = 0; k < nk; ++k)
      for (std::size_t i = 0; i < T; ++i) pack[k * T + i] = C[i * ldc + k];
    return pack;
  }
}

// Vectors [v0, v0 + kW) in column order of group g (WideNN), for T tokens: nibbles, the low ones
// of the group's byte chunks v0.. while v0 < kv / 2, else the high ones of chunks v0 - kv / 2..
// (kW divides kv / 2, so a tile never straddles the two). One row's scale per row, as
// GemmNNQTile's (AVX-512 nibbles: the scaled table).
template <std::size_t T, std::size_t kW, bool kTier, bool kNib>
HWY_INLINE void GemmNNQWideTile(const QView& q, const Layout& L, std::size_t k0, std::size_t nk, const TierParams& t, const float* ss,
                                const float* HWY_RESTRICT cp, std::size_t g, std::size_t v0, float* HWY_RESTRICT Y,
                                std::size_t ldy) {
  const DF df;
  const std::size_t N = hn::Lanes(df), kv = q.group / N;
  [[maybe_unused]] const VF table = NibbleTable(t);
  VF acc[T][kW];
  for (std::size_t i = 0; i < T; ++i)
    for (std::size_t j = 0; j < kW; ++j) acc[i][j] = hn::Zero(df);
  const bool high = kNib && v0 >= kv / 2;
  const std::size_t off = kNib ? g * (q.group / 2) + (high ? v0 - kv / 2 : v0) * N : g * q.group + v0 * N;
  auto rows = [&](auto hi) {
    constexpr bool kHigh = decltype(hi)::value;
    const std::uint8_t* p = q.codes + k0 * L.rb + off;
    const float* sc = ss + g;
    const float* c = cp;
    for (std::size_t k = 0; k < nk; ++k, p += L.rb, sc += L.gpr, c += T) {
      hwy::Prefetch(p + kPrefetchAhead);
      const VF s = hn::Set(df, *sc);
#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL
      const VF tab = kNib ? hn::Mul(table, s) : table;
#endif
      for (std::size_t j = 0; j < kW; ++j) {
        VF a;
        if constexpr (kNib) {
          const VI b = LoadBytes(p + j * N);
#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL
          a = VF{_mm512_permutexvar_ps((kHigh ? hn::ShiftRight<4>(b) : b).raw, tab.raw)};
#else
          a = hn::Mul(Codes<kTier>(kHigh ? HighNibble(b) : LowNibble(b), t), s);
#endif
        } else {
          a = hn::Mul(Codes<kTier>(LoadBytes(p + j * N), t), s);
        }
        for (std::size_t i = 0; i < T; ++i) acc[i][j] = hn::MulAdd(a, hn::Set(df, c[i]), acc[i][j]);
      }
    }
  };
  if (high) rows(std::true_type());
  else rows(std::false_type());
  for (std::size_t i = 0; i < T; ++i) {
    float* yp = Y + i * ldy + g * q.group + v0 * N;
    for (std::size_t j = 0; j < kW; ++j) hn::StoreU(hn::Add(hn::LoadU(df, yp + j * N), acc[i][j]), df, yp + j * N);
  }
}

template <std::size_t T, std::size_t kW, bool kTier>
HWY_INLINE void GemmNNQWide(const QView& q, const Layout& L, std::size_t k0, std::size_t nk, const TierParams& t, const float* ss,
                            const float* C, std::size_t ldc, float* Y, std::size_t ldy) {
  HWY_ALIGN float pack[T == 1 ? 1 : kNNCoefs];  // nk <= kNNCoefs / 8 (NNChunks)
  const float* cp = PackCoefs<T>(C, ldc, nk, pack);
  const std::size_t kv = q.group / hn::Lanes(DF());
  for (std::size_t g = 0; g < L.nfast; ++g)
    for (std::size_t v0 = 0; v0 < kv; v0 += kW) {
      if (q.nibble) GemmNNQWideTile<T, kW, kTier, true>(q, L, k0, nk, t, ss, cp, g, v0, Y, ldy);
      else GemmNNQWideTile<T, kW, kTier, false>(q, L, k0, nk, t, ss, cp, g, v0, Y, ldy);
    }
}

// ss = the scales of rows [k, k + n) as f32 times 2^shift (exact: a power of 2).
HWY_INLINE void NNScales(const QView& q, const Layout& L, std::size_t k, std::size_t n, const TierParams& t, float* ss) {
  BF16ToF32(q.scales + k * L.gpr, ss, n * L.gpr);
  if (t.mul != 1.0f)
    for (std::size_t j = 0; j < n * L.gpr; ++j) ss[j] *= t.mul;
}

// Rows [k0, k0 + nk) of the left-factor drivers in chunks of kNNCoefs / max(gpr, 8) rows (their
// scales fit kNNCoefs floats, and so do the coefficients of 8 tokens PackCoefs packs): for each,
// ss = its scales (NNScales), then f(kb, n) for rows [k0 + kb, k0 + kb + n).
template <class F>
HWY_INLINE void NNChunks(const QView& q, const Layout& L, std::size_t k0, std::size_t nk, const TierParams& t, float* ss, F&& f) {
  const std::size_t kc = kNNCoefs / std::max<std::size_t>(L.gpr, 8);
  for (std::size_t kb = 0; kb < nk; kb += kc) {
    const std::size_t n = std::min(kc, nk - kb);
    NNScales(q, L, k0 + kb, n, t, ss);
    f(kb, n);
  }
}

#if HWY_TARGET != HWY_SCALAR
// Y[t, j] += sum_k C[t, k] W[k, j] for T tokens over vectors [v0, v0 + kW) of narrow groups
// (Layout::gpv): each row's vector decoded once for the T tokens, times its per-lane scales (ss
// as GemmNNQTile's, N floats readable past each row's), then one FMA per token; cp packed as
// GemmNNQTile's.
template <std::size_t T, std::size_t kW, bool kTier>
HWY_INLINE void GemmNNQNarrowTile(const QView& q, const Layout& L, std::size_t k0, std::size_t nk, const TierParams& t,
                                  const float* ss, const float* HWY_RESTRICT cp, std::size_t v0, const NarrowIx& nx,
                                  float* HWY_RESTRICT Y, std::size_t ldy) {
  const DF df;
  const std::size_t N = hn::Lanes(df), vb = q.nibble ? N / 2 : N;
  const VF table = NibbleTable(t);
  VF acc[T][kW];
  for (std::size_t i = 0; i < T; ++i)
    for (std::size_t j = 0; j < kW; ++j) acc[i][j] = hn::Zero(df);
  const std::uint8_t* row = q.codes + k0 * L.rb;
  const float* sc = ss + v0 * L.gpv;
  for (std::size_t k = 0; k < nk; ++k, row += L.rb, sc += L.gpr, cp += T) {
    hwy::Prefetch(row + v0 * vb + kPrefetchAhead);
    for (std::size_t j = 0; j < kW; ++j) {
      const VF a = hn::Mul(NarrowCodes<kTier>(q, row, v0 + j, table, t, nx), NarrowScales(sc + j * L.gpv, nx));
      for (std::size_t i = 0; i < T; ++i) acc[i][j] = hn::MulAdd(a, hn::Set(df, cp[i]), acc[i][j]);
    }
  }
  for (std::size_t i = 0; i < T; ++i) {
    float* yp = Y + i * ldy + v0 * N;
    for (std::size_t j = 0; j < kW; ++j) hn::StoreU(hn::Add(hn::LoadU(df, yp + j * N), acc[i][j]), df, yp + j * N);
  }
}

// The same for nibbles over chunks [c0, c0 + kC) of N code bytes (2 vectors of columns each), in
// storage order: a chunk's low and high nibbles as Nibbles decodes them (no per-vector byte
// permutation: 2 vectors from one load and two lookups), times the chunk's per-lane scales (lane
// j: group j / h), accumulated so, and put in column order once, at the store (lane j of column
// vector 2 c + u: low or high nibble of byte u N / 2 + NarrowIx::byte[j]).
template <std::size_t T, std::size_t kC, bool kTier>
HWY_INLINE void GemmNNQNarrowNibTile(const QView& q, const Layout& L, std::size_t k0, std::size_t nk, const TierParams& t,
                                     const float* ss, const float* HWY_RESTRICT cp, std::size_t c0, const NarrowIx& nx,
                                     float* HWY_RESTRICT Y, std::size_t ldy) {
  const DF df;
  const DI di;
  const std::size_t N = hn::Lanes(df);
  const VF table = NibbleTable(t);
  VF acc[T][2 * kC];
  for (std::size_t i = 0; i < T; ++i)
    for (std::size_t j = 0; j < 2 * kC; ++j) acc[i][j] = hn::Zero(df);
  const std::uint8_t* row = q.codes + k0 * L.rb + c0 * N;
  const float* sc = ss + c0 * 2 * L.gpv;
  const auto cix = hn::IndicesFromVec(df, nx.chunk_group);
  for (std::size_t k = 0; k < nk; ++k, row += L.rb, sc += L.gpr, cp += T) {
    hwy::Prefetch(row + kPrefetchAhead);
    for (std::size_t j = 0; j < kC; ++j) {
      VF lo, hi;
      Nibbles<kTier>(LoadBytes(row + j * N), table, t, lo, hi);
      const VF s = hn::TableLookupLanes(hn::LoadU(df, sc + j * 2 * L.gpv), cix);
      lo = hn::Mul(lo, s), hi = hn::Mul(hi, s);
      for (std::size_t i = 0; i < T; ++i) {
        const VF c = hn::Set(df, cp[i]);
        acc[i][2 * j] = hn::MulAdd(lo, c, acc[i][2 * j]);
        acc[i][2 * j + 1] = hn::MulAdd(hi, c, acc[i][2 * j + 1]);
      }
    }
  }
  const auto i0 = hn::IndicesFromVec(df, nx.byte), i1 = hn::IndicesFromVec(df, hn::Add(nx.byte, hn::Set(di, static_cast<std::int32_t>(N / 2))));
  for (std::size_t i = 0; i < T; ++i) {
    float* yp = Y + i * ldy + c0 * 2 * N;
    for (std::size_t j = 0; j < kC; ++j) {
      const VF lo = acc[i][2 * j], hi = acc[i][2 * j + 1];
      const VF u0 = hn::IfThenElse(nx.high, hn::TableLookupLanes(hi, i0), hn::TableLookupLanes(lo, i0));
      const VF u1 = hn::IfThenElse(nx.high, hn::TableLookupLanes(hi, i1), hn::TableLookupLanes(lo, i1));
      hn::StoreU(hn::Add(hn::LoadU(df, yp + 2 * j * N), u0), df, yp + 2 * j * N);
      hn::StoreU(hn::Add(hn::LoadU(df, yp + 2 * j * N + N), u1), df, yp + 2 * j * N + N);
    }
  }
}

// GemmNNQT and GemvNNT on narrow groups: the scales converted as GemmNNQT does, tiles of 8 tokens,
// then the remaining 3, 5, 6 or 7 in one tile, else 4, 2, 1. Nibbles: chunk tiles of
// kNNQAcc / 2T chunks (at most 4) where that is at least one, the rest of the chunks one at a
// time, then a last odd vector; else (and for bytes) tiles of kNNQAcc / T vectors (at most 8),
// the rest one at a time. The groups past the vectors (a row's last N - 1 columns or fewer) on
// the scalar path. Were the scalar path throughout: AVX-512, 4-bit 256 x 256 in groups of 8,
// q_gemm_nn at 8 tokens 2011 us.
template <bool kTier>
HWY_INLINE void GemmNNQNarrowT(const QView& q, const Layout& L, std::size_t k0, std::size_t nk, const TierParams& t, const float* C,
                               std::size_t ldc, std::size_t nt, float* Y, std::size_t ldy) {
  const NarrowIx nx = MakeNarrowIx(q);
  HWY_ALIGN float ss[kNNCoefs + HWY_MAX_BYTES / 4];  // + N: NarrowScales reads N floats
  HWY_ALIGN float pack[kNNCoefs];
  NNChunks(q, L, k0, nk, t, ss, [&](std::size_t kb, std::size_t n) {
    std::fill(ss + n * L.gpr, ss + n * L.gpr + hn::Lanes(DF()), 0.0f);  // (lanes never used)
    std::size_t i = 0;
    // exact: one tile, only if exactly T tokens remain (as GemmNNQT's run)
    auto tiles = [&](auto tt, bool exact = false) {
      constexpr std::size_t T = decltype(tt)::value, kW = std::min<std::size_t>(kNNQAcc / T, 8);
      constexpr std::size_t kC = std::min<std::size_t>(kNNQAcc / (2 * T), 4);
      // nibbles: only tiles with room for a chunk (AVX2: at most 4 tokens; 4-bit 256 x 256 in
      // groups of 4, 8 / 32 tokens 13.6-14.2 / 52-54 us as tiles of 8 vectors, 12.3-12.7 /
      // 47 as chunk tiles of 4 tokens)
      if (kC == 0 && q.nibble) return;
      for (; exact ? nt - i == T : i + T <= nt; i += T) {
        const float* cp = PackCoefs<T>(C + i * ldc + kb, ldc, n, pack);
        float* Yi = Y + i * ldy;
        std::size_t v = 0;
        if constexpr (kC >= 1) {
          if (q.nibble) {
            const std::size_t nc = L.nnarrow / 2;
            std::size_t c = 0;
            for (; c + kC <= nc; c += kC) GemmNNQNarrowNibTile<T, kC, kTier>(q, L, k0 + kb, n, t, ss, cp, c, nx, Yi, ldy);
            for (; c < nc; ++c) GemmNNQNarrowNibTile<T, 1, kTier>(q, L, k0 + kb, n, t, ss, cp, c, nx, Yi, ldy);
            v = 2 * nc;
          }
        }
        for (; v + kW <= L.nnarrow; v += kW) GemmNNQNarrowTile<T, kW, kTier>(q, L, k0 + kb, n, t, ss, cp, v, nx, Yi, ldy);
        for (; v < L.nnarrow; ++v) GemmNNQNarrowTile<T, 1, kTier>(q, L, k0 + kb, n, t, ss, cp, v, nx, Yi, ldy);
      }
    };
    tiles(std::integral_constant<std::size_t, 8>());
    tiles(std::integral_constant<std::size_t, 7>(), true);
    tiles(std::integral_constant<std::size_t, 6>(), true);
    tiles(std::integral_constant<std::size_t, 5>(), true);
    tiles(std::integral_constant<std::size_t, 3>(), true);
    tiles(std::integral_constant<std::size_t, 4>());
    tiles(std::integral_constant<std::size_t, 2>());
    tiles(std::integral_constant<std::size_t, 1>());
  });
  GemvNNScalar<kTier>(q, L, k0, nk, t, C, ldc, nt, L.nnarrow * L.gpv, L.gpr, Y, ldy);
}
#endif

// GemmNNQT (and GemvNNT) on groups that WideNN takes: the scales converted as GemmNNQT does,
// tiles of 8, 4, 2, 1 tokens, each of the widest kW of 8, 4, 3, 2, 1 that fits the accumulators and
// divides the vectors of a run (nibbles: half the group's).
template <bool kTier>
HWY_INLINE void GemmNNQWideT(const QView& q, const Layout& L, std::size_t k0, std::size_t nk, const TierParams& t, const float* C,
                             std::size_t ldc, std::size_t nt, float* Y, std::size_t ldy) {
  const std::size_t kv = q.group / hn::Lanes(DF()), d = q.nibble ? kv / 2 : kv;
  HWY_ALIGN float ss[kNNCoefs];
  NNChunks(q, L, k0, nk, t, ss, [&](std::size_t kb, std::size_t n) {
    std::size_t i = 0;
    auto tiles = [&](auto tt) {
      constexpr std::size_t T = decltype(tt)::value;
      for (; i + T <= nt; i += T) {
        const float* Ci = C + i * ldc + kb;
        float* Yi = Y + i * ldy;
        if constexpr (T * 8 <= kNNQAcc)
          if (d % 8 == 0) { GemmNNQWide<T, 8, kTier>(q, L, k0 + kb, n, t, ss, Ci, ldc, Yi, ldy); continue; }
        if constexpr (T * 4 <= kNNQAcc)
          if (d % 4 == 0) { GemmNNQWide<T, 4, kTier>(q, L, k0 + kb, n, t, ss, Ci, ldc, Yi, ldy); continue; }
        if constexpr (T * 3 <= kNNQAcc)
          if (d % 3 == 0) { GemmNNQWide<T, 3, kTier>(q, L, k0 + kb, n, t, ss, Ci, ldc, Yi, ldy); continue; }
        if constexpr (T * 2 <= kNNQAcc)
          if (d % 2 == 0) { GemmNNQWide<T, 2, kTier>(q, L, k0 + kb, n, t, ss, Ci, ldc, Yi, ldy); continue; }
        GemmNNQWide<T, 1, kTier>(q, L, k0 + kb, n, t, ss, Ci, ldc, Yi, ldy);
      }
    };
    tiles(std::integral_constant<std::size_t, 8>());
    tiles(std::integral_constant<std::size_t, 4>());
    tiles(std::integral_constant<std::size_t, 2>());
    tiles(std::integral_constant<std::size_t, 1>());
  });
  GemvNNScalar<kTier>(q, L, k0, nk, t, C, ldc, nt, L.nfast, L.gpr, Y, ldy);
}

// y[j] += sum_k c[k] W[k, j]: register column tiles over the vector groups, scalar for the rest.
// The tiles' coefficients c[k] 2^shift s[k, g] are computed for a chunk of rows at once (vector
// conversion and products; one scalar conversion, product and broadcast per row and group had
// been a third of a tile's instructions): the same products, so the same results.
template <bool kTier>
HWY_INLINE void GemvNNT(const QView& q, std::size_t k0, std::size_t nk, const TierParams& t, const float* C, std::size_t ldc,
                        std::size_t nt, float* Y, std::size_t ldy) {
  const DF df;
  const std::size_t N = hn::Lanes(df);
  Layout L = MakeLayout(q, N);
#if HWY_TARGET != HWY_SCALAR
  if (L.nnarrow && L.gpr <= kNNCoefs) return GemmNNQNarrowT<kTier>(q, L, k0, nk, t, C, ldc, nt, Y, ldy);
#endif
  if (L.nhalf) L.nfast = L.nhalf;      // nibble groups of N codes: GemvNNTile<1> decodes them whole
  const std::size_t kv = q.group / N;  // vectors per group (nibble: half of them per half group)
  const bool vec = L.nfast && q.group % N == 0 && L.gpr <= kNNCoefs &&
                   ((kv == 1 && (!q.nibble || L.nhalf)) || kv == 2 || kv == 3 || kv == 4 || kv == 6 || kv == 8 || kv == 16);
  if (vec) {
    HWY_ALIGN float cs[kNNCoefs];
    const std::size_t kc = kNNCoefs / L.gpr;
    for (std::size_t i = 0; i < nt; ++i)
      for (std::size_t kb = 0; kb < nk; kb += kc) {
        const std::size_t n = std::min(kc, nk - kb);
        float* y = Y + i * ldy;
        BF16ToF32(q.scales + (k0 + kb) * L.gpr, cs, n * L.gpr);
        ScaleRows(C + i * ldc + kb, n, L.gpr, t.mul, cs);
        if (kv == 1) GemvNNTiles<1, kTier>(q, L, k0 + kb, n, t, cs, y);
        else if (kv == 2) GemvNNTiles<2, kTier>(q, L, k0 + kb, n, t, cs, y);
        else if (kv == 3) GemvNNTiles<3, kTier>(q, L, k0 + kb, n, t, cs, y);
        else if (kv == 4) GemvNNTiles<4, kTier>(q, L, k0 + kb, n, t, cs, y);
        else if (kv == 6) GemvNNTiles<6, kTier>(q, L, k0 + kb, n, t, cs, y);
        else if (kv == 8) GemvNNTiles<8, kTier>(q, L, k0 + kb, n, t, cs, y);
        else GemvNNTiles<16, kTier>(q, L, k0 + kb, n, t, cs, y);
      }
  } else if (WideNN(q, L, N, nt)) {
    return GemmNNQWideT<kTier>(q, L, k0, nk, t, C, ldc, nt, Y, ldy);
  } else {
    L.nfast = 0;
  }
  GemvNNScalar<kTier>(q, L, k0, nk, t, C, ldc, nt, L.nfast, L.gpr, Y, ldy);  // the rest once for the nt tokens
}

// Y[t, j] += sum_k C[t, k] W[k, j] for T tokens over the G groups from g0 (kV vectors each,
// T * kV * G <= kNNQAcc accumulators): each row's codes are decoded once for the T tokens and scaled
// once (code * scale * 2^shift is exact in f32: a small integer times a bf16), then one FMA per
// token. ss: rows k0.. of the scales as f32 times 2^shift (row stride L.gpr), converted once per
// call by GemmNNQT instead of once per row and tile here; cp: the T tokens' coefficients of rows
// k0.. packed by GemmNNQGroups (row k's at cp + k T), so every broadcast is one base pointer plus
// a constant offset. AVX-512 nibbles: the scale multiplies the tier's 16-entry table, then both
// lookups read the scaled table (the same products as scaling each looked-up vector: one
// multiply per row and group instead of two), a row ahead: made in the row itself, the multiply
// sat between the scale's load and the lookups that every FMA of the row waits for. Row ahead,
// a 3-bit 48 x 256 left factor, hot, Zen 5, the best of 8 alternating runs: 2 / 3 / 5 / 8
// tokens 0.45 / 0.57 / 0.90 / 1.28 -> 0.40 / 0.49 / 0.86 / 1.17 us (a standalone copy of the
// loop at 8 tokens: 8.3 -> 7.0-7.4 TSC ticks a row, 6.5 with no multiply at all). Same products.
template <std::size_t T, std::size_t kV, std::size_t G, bool kTier, bool kNib>
HWY_INLINE void GemmNNQTile(const QView& q, const Layout& L, std::size_t k0, std::size_t nk, const TierParams& t, const float* ss,
                            const float* HWY_RESTRICT cp, std::size_t g0, float* HWY_RESTRICT Y, std::size_t ldy) {
  const DF df;
  const std::size_t N = hn::Lanes(df);
  const VF table = NibbleTable(t);
  VF acc[T][kV * G];
  for (std::size_t i = 0; i < T; ++i)
    for (std::size_t v = 0; v < kV * G; ++v) acc[i][v] = hn::Zero(df);
  const std::size_t gb = kNib ? q.group / 2 : q.group;
  const std::uint8_t* p = q.codes + k0 * L.rb + g0 * gb;
  const float* sc = ss + g0;
#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL
  // AVX-512 nibbles: the scaled tables of the next row, made a row ahead of their lookups
  [[maybe_unused]] VF next[G];
  if constexpr (kNib)
    if (nk)
      for (std::size_t gi = 0; gi < G; ++gi) next[gi] = hn::Mul(table, hn::Set(df, sc[gi]));
#endif
  for (std::size_t k = 0; k < nk; ++k, p += L.rb, sc += L.gpr, cp += T) {
    hwy::Prefetch(p + kPrefetchAhead);
#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL
    [[maybe_unused]] VF cur[G];
    if constexpr (kNib) {
      for (std::size_t gi = 0; gi < G; ++gi) cur[gi] = next[gi];
      if (k + 1 < nk)
        for (std::size_t gi = 0; gi < G; ++gi) next[gi] = hn::Mul(table, hn::Set(df, sc[L.gpr + gi]));
    }
#endif
    for (std::size_t gi = 0; gi < G; ++gi) {
      const VF s = hn::Set(df, sc[gi]);
#if HWY_TARGET != HWY_SCALAR
      if constexpr (kNib && kV == 1) {  // a nibble group of N codes (HalfNibbles)
#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL
        const VF a = HalfNibbles<kTier>(p + gi * gb, cur[gi], t);
#else
        const VF a = hn::Mul(HalfNibbles<kTier>(p + gi * gb, table, t), s);
#endif
        for (std::size_t i = 0; i < T; ++i) acc[i][gi] = hn::MulAdd(a, hn::Set(df, cp[i]), acc[i][gi]);
      }
#endif
      for (std::size_t j = 0; j < (kNib ? kV / 2 : kV); ++j) {
        VF a, b;
        if constexpr (kNib) {
#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL
          (void)s;
          Nibbles<kTier>(LoadBytes(p + gi * gb + j * N), cur[gi], t, a, b);
#else
          Nibbles<kTier>(LoadBytes(p + gi * gb + j * N), table, t, a, b);
          a = hn::Mul(a, s);
          b = hn::Mul(b, s);
#endif
        } else {
          a = hn::Mul(Codes<kTier>(LoadBytes(p + gi * gb + j * N), t), s);
        }
        for (std::size_t i = 0; i < T; ++i) {
          const VF c = hn::Set(df, cp[i]);
          acc[i][gi * kV + j] = hn::MulAdd(a, c, acc[i][gi * kV + j]);
          if constexpr (kNib) acc[i][gi * kV + kV / 2 + j] = hn::MulAdd(b, c, acc[i][gi * kV + kV / 2 + j]);
        }
      }
    }
  }
  for (std::size_t i = 0; i < T; ++i) {
    float* yp = Y + i * ldy + g0 * q.group;
    for (std::size_t v = 0; v < kV * G; ++v) hn::StoreU(hn::Add(hn::LoadU(df, yp + v * N), acc[i][v]), df, yp + v * N);
  }
}


template <std::size_t T, std::size_t kV, bool kTier>
HWY_INLINE void GemmNNQGroups(const QView& q, const Layout& L, std::size_t k0, std::size_t nk, const TierParams& t, const float* ss,
                              const float* C, std::size_t ldc, float* Y, std::size_t ldy) {
  // (groups of one vector at one token: 8 at a time, not 16; AVX-512 nibbles keep a scaled table
  // per group, and 16 of them measured 2.8 against 2.1 us on a 4-bit 256 x 256)
  constexpr std::size_t G = std::min<std::size_t>(kNNQAcc / (T * kV), 8);
  static_assert(G >= 1);
  HWY_ALIGN float pack[T == 1 ? 1 : kNNCoefs];  // nk <= kNNCoefs / 8 (NNChunks)
  const float* cp = PackCoefs<T>(C, ldc, nk, pack);
  auto tiles = [&](auto nib) {
    constexpr bool kNib = decltype(nib)::value;
    std::size_t g = 0;
    for (; g + G <= L.nfast; g += G) GemmNNQTile<T, kV, G, kTier, kNib>(q, L, k0, nk, t, ss, cp, g, Y, ldy);
    for (; g < L.nfast; ++g) GemmNNQTile<T, kV, 1, kTier, kNib>(q, L, k0, nk, t, ss, cp, g, Y, ldy);
  };
  if (q.nibble) tiles(std::true_type());
  else tiles(std::false_type());
}

// Y[t, j] += sum_k C[t, k] W[k, j] for nt tokens: token tiles of 8, then the remaining 3, 5, 6 or 7
// tokens in one tile, else tiles of 4, 2, 1 (as many as the accumulators allow), over the vector
// groups (groups of 1, 2, 4 or, from 2 tokens, 8 vectors, halves of groups where a whole group
// leaves room for at most 2 tokens; wider groups: GemmNNQWideT; otherwise a q_gemv_nn per
// token), scalar for the rest. Each
// tile decodes the codes once: a 3-bit 49 x 256 left factor, hot, AVX-512 (Zen 5), 3 tokens
// 0.72-0.77 -> 0.56-0.59 us, 5 tokens 0.93-1.00 -> 0.85-0.88, 7 tokens 1.36-1.40 -> 1.20-1.25
// (the real tinymoe layer at 8 tokens routes 1-5 tokens to each expert).
template <bool kTier>
HWY_INLINE void GemmNNQT(const QView& q, std::size_t k0, std::size_t nk, const TierParams& t, const float* C, std::size_t ldc,
                         std::size_t nt, float* Y, std::size_t ldy) {
  const std::size_t N = hn::Lanes(DF());
  Layout L = MakeLayout(q, N);
#if HWY_TARGET != HWY_SCALAR
  if (L.nnarrow && L.gpr <= kNNCoefs) return GemmNNQNarrowT<kTier>(q, L, k0, nk, t, C, ldc, nt, Y, ldy);
#endif
  if (L.nhalf) L.nfast = L.nhalf;  // nibble groups of N codes: GemmNNQTile<kV = 1> decodes them whole
  const std::size_t kv = q.group / N;
  const bool vec = L.nfast && q.group % N == 0 && L.gpr <= kNNCoefs && ((kv == 1 && (!q.nibble || L.nhalf)) || kv == 2 || kv == 4 || (kv == 8 && nt > 1));
  if (!vec && WideNN(q, L, N, nt)) return GemmNNQWideT<kTier>(q, L, k0, nk, t, C, ldc, nt, Y, ldy);
  if (!vec) return GemvNNT<kTier>(q, k0, nk, t, C, ldc, nt, Y, ldy);  // per token, the groups no tile takes once
  // The scales as f32 times 2^shift (exact: a power of 2), kNNCoefs at a time.
  HWY_ALIGN float ss[kNNCoefs];
  NNChunks(q, L, k0, nk, t, ss, [&](std::size_t kb, std::size_t n) {
    std::size_t i = 0;
    // tiles of T tokens while they fit; exact: one tile, only if exactly T tokens remain (the 3,
    // 5, 6 or 7 left after tiles of 8, decoded once instead of in tiles of 4, 2, 1)
    auto run = [&](auto tt, auto vv, bool exact = false) {
      constexpr std::size_t T = decltype(tt)::value, kV = decltype(vv)::value;
      if constexpr (T * kV <= kNNQAcc) {
        while (exact ? nt - i == T : i + T <= nt) {
          GemmNNQGroups<T, kV, kTier>(q, L, k0 + kb, n, t, ss, C + i * ldc + kb, ldc, Y + i * ldy, ldy);
          i += T;
        }
      } else if constexpr (kNNQAcc / kV < 4 && T * kV / 2 <= kNNQAcc) {
        // whole groups of kV vectors fit tiles of at most 2 tokens (AVX2: groups of 32 and 64
        // codes; AVX-512: 128): halves of groups in tiles of twice the tokens. Where whole
        // groups fit 4 tokens, halves measured no faster (AVX2's groups of 16, AVX-512's of 64).
        // The wide tiles with runs of kV / 2 vectors: each group's first half, then its second.
        while (exact ? nt - i == T : i + T <= nt) {
          GemmNNQWide<T, kV / 2, kTier>(q, L, k0 + kb, n, t, ss, C + i * ldc + kb, ldc, Y + i * ldy, ldy);
          i += T;
        }
      }
    };
    auto all = [&](auto vv) {
      run(std::integral_constant<std::size_t, 8>(), vv);
      run(std::integral_constant<std::size_t, 7>(), vv, true);
      run(std::integral_constant<std::size_t, 6>(), vv, true);
      run(std::integral_constant<std::size_t, 5>(), vv, true);
      run(std::integral_constant<std::size_t, 3>(), vv, true);
      run(std::integral_constant<std::size_t, 4>(), vv);
      run(std::integral_constant<std::size_t, 2>(), vv);
      run(std::integral_constant<std::size_t, 1>(), vv);
    };
    if (kv == 1) all(std::integral_constant<std::size_t, 1>());
    else if (kv == 2) all(std::integral_constant<std::size_t, 2>());
    else if (kv == 4) all(std::integral_constant<std::size_t, 4>());
    else all(std::integral_constant<std::size_t, 8>());
  });
  GemvNNScalar<kTier>(q, L, k0, nk, t, C, ldc, nt, L.nfast, L.gpr, Y, ldy);
}

// Y[t, i] += alpha sum_k W[i, k] X[t, k] on an R x T register tile.
template <std::size_t R, std::size_t T>
HWY_INLINE void GemmNTTile(const float* HWY_RESTRICT W, std::size_t ldw, const float* HWY_RESTRICT X, std::size_t ldx,
                           std::size_t K, float alpha, float* HWY_RESTRICT Y, std::size_t ldy) {
  const DF df;
  const std::size_t N = hn::Lanes(df);
  VF acc[R][T];
  for (std::size_t i = 0; i < R; ++i)
    for (std::size_t j = 0; j < T; ++j) acc[i][j] = hn::Zero(df);
  std::size_t k = 0;
  for (; k + N <= K; k += N) {
    VF xv[T];
    for (std::size_t j = 0; j < T; ++j) xv[j] = hn::LoadU(df, X + j * ldx + k);
    for (std::size_t i = 0; i < R; ++i) {
      const VF w = hn::LoadU(df, W + i * ldw + k);
      for (std::size_t j = 0; j < T; ++j) acc[i][j] = hn::MulAdd(w, xv[j], acc[i][j]);
    }
  }
  float sums[R][T];  // lane sums: four tokens in one transposing pass where the tile has four
  for (std::size_t i = 0; i < R; ++i) {
    if constexpr (T == 4) q8k::Sum4(acc[i][0], acc[i][1], acc[i][2], acc[i][3], sums[i]);
    else
      for (std::size_t j = 0; j < T; ++j) sums[i][j] = hn::GetLane(hn::SumOfLanes(df, acc[i][j]));
  }
  for (std::size_t i = 0; i < R; ++i)
    for (std::size_t j = 0; j < T; ++j) {
      float s = sums[i][j];
      const float* w = W + i * ldw;
      const float* xr = X + j * ldx;
      for (std::size_t kk = k; kk < K; ++kk) s += w[kk] * xr[kk];
      Y[j * ldy + i] += alpha * s;
    }
}

template <std::size_t R>
HWY_INLINE void GemmNTRows(const float* W, std::size_t ldw, const float* X, std::size_t ldx, std::size_t nt, std::size_t K,
                           float alpha, float* Y, std::size_t ldy) {
  std::size_t j = 0;
  for (; j + 4 <= nt; j += 4) GemmNTTile<R, 4>(W, ldw, X + j * ldx, ldx, K, alpha, Y + j * ldy, ldy);
  for (; j < nt; ++j) GemmNTTile<R, 1>(W, ldw, X + j * ldx, ldx, K, alpha, Y + j * ldy, ldy);
}

// Y[t, i] += alpha sum_k W[i, k] X[t, k] for nr rows: tiles of 4 rows, then single rows (gemm_nt,
// and row-major q_gemm_nt on its decoded blocks).
HWY_INLINE void GemmNTAll(const float* W, std::size_t ldw, std::size_t nr, const float* X, std::size_t ldx, std::size_t nt,
                          std::size_t K, float alpha, float* Y, std::size_t ldy) {
  std::size_t i = 0;
  for (; i + 4 <= nr; i += 4) GemmNTRows<4>(W + i * ldw, ldw, X, ldx, nt, K, alpha, Y + i, ldy);
  for (; i < nr; ++i) GemmNTRows<1>(W + i * ldw, ldw, X, ldx, nt, K, alpha, Y + i, ldy);
}

// Element (t, k) of the coefficients C: C[t * ldc + k] (gemm_nn), or C[k * ldc + t] with kTransC
// (gemm_tn: a decoded left factor, rank rows of block rows, used as is: no transposed copy).
template <bool kTransC>
HWY_INLINE const float* CRow(const float* C, std::size_t ldc, std::size_t t) {
  return kTransC ? C + t : C + t * ldc;
}
template <bool kTransC>
HWY_INLINE float CAt(const float* HWY_RESTRICT C, std::size_t ldc, std::size_t t, std::size_t k) {
  return kTransC ? C[k * ldc + t] : C[t * ldc + k];
}

// Vectors of columns per register tile of gemm_nn / gemm_tn: 4 where the target has 32 vector
// registers (4 x 4 accumulators leave room for the 4 loads of A and a broadcast; two FMAs per
// load of A or C), else 2 (4 x 2, 16 registers).
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3
inline constexpr std::size_t kNNV = 4;
#else
inline constexpr std::size_t kNNV = 2;
#endif

// Y[t, j] += sum_k C(t, k) A[k, j] on a T x (V vectors) tile.
template <std::size_t T, std::size_t V, bool kTransC>
HWY_INLINE void GemmNNTile(const float* HWY_RESTRICT C, std::size_t ldc, std::size_t K, const float* HWY_RESTRICT A,
                           std::size_t lda, float* HWY_RESTRICT Y, std::size_t ldy) {
  const DF df;
  const std::size_t N = hn::Lanes(df);
  VF acc[T][V];
  for (std::size_t t = 0; t < T; ++t)
    for (std::size_t v = 0; v < V; ++v) acc[t][v] = hn::LoadU(df, Y + t * ldy + v * N);
  for (std::size_t k = 0; k < K; ++k) {
    VF a[V];
    for (std::size_t v = 0; v < V; ++v) a[v] = hn::LoadU(df, A + k * lda + v * N);
    for (std::size_t t = 0; t < T; ++t) {
      const VF c = hn::Set(df, CAt<kTransC>(C, ldc, t, k));
      for (std::size_t v = 0; v < V; ++v) acc[t][v] = hn::MulAdd(c, a[v], acc[t][v]);
    }
  }
  for (std::size_t t = 0; t < T; ++t)
    for (std::size_t v = 0; v < V; ++v) hn::StoreU(acc[t][v], df, Y + t * ldy + v * N);
}

template <std::size_t T, bool kTransC>
HWY_INLINE void GemmNNTokens(const float* C, std::size_t ldc, std::size_t K, const float* A, std::size_t lda, std::size_t ncols,
                             float* Y, std::size_t ldy) {
  const std::size_t N = hn::Lanes(DF());
  std::size_t j = 0;
  for (; j + 2 * N <= ncols; j += 2 * N) GemmNNTile<T, 2, kTransC>(C, ldc, K, A + j, lda, Y + j, ldy);
  for (; j + N <= ncols; j += N) GemmNNTile<T, 1, kTransC>(C, ldc, K, A + j, lda, Y + j, ldy);
  for (; j < ncols; ++j)
    for (std::size_t t = 0; t < T; ++t) {
      float s = Y[t * ldy + j];
      // std::fma: the compiler's own contraction choice could differ between gemm_nn and gemm_tn.
      for (std::size_t k = 0; k < K; ++k) s = std::fma(CAt<kTransC>(C, ldc, t, k), A[k * lda + j], s);
      Y[t * ldy + j] = s;
    }
}

// Y[t, j] += sum_k C(t, k) A[k, j], t < nt, j < ncols. Many rows of C: each slab of kNNV vectors
// of A's columns is packed contiguous first (A's rows are typically 1 KB apart, and K such rows
// map to a few L1 sets and evict each other), then every row tile runs on the packed slab. Every
// element sums the same products in the same order whatever the tiling: same bits.
template <bool kTransC>
HWY_INLINE void GemmNNT(const float* C, std::size_t ldc, std::size_t nt, std::size_t K, const float* A, std::size_t lda,
                        std::size_t ncols, float* Y, std::size_t ldy) {
  constexpr std::size_t kPack = 8192;  // floats
  const std::size_t W = kNNV * hn::Lanes(DF());
  std::size_t j0 = 0;
  if (nt >= 8 && K * W <= kPack) {
    HWY_ALIGN float pack[kPack];
    for (; j0 + W <= ncols; j0 += W) {
      for (std::size_t k = 0; k < K; ++k) std::memcpy(pack + k * W, A + k * lda + j0, W * sizeof(float));
      std::size_t t = 0;
      for (; t + 4 <= nt; t += 4) GemmNNTile<4, kNNV, kTransC>(CRow<kTransC>(C, ldc, t), ldc, K, pack, W, Y + t * ldy + j0, ldy);
      for (; t < nt; ++t) GemmNNTile<1, kNNV, kTransC>(CRow<kTransC>(C, ldc, t), ldc, K, pack, W, Y + t * ldy + j0, ldy);
    }
  }
  std::size_t t = 0;
  for (; t + 4 <= nt; t += 4)
    GemmNNTokens<4, kTransC>(CRow<kTransC>(C, ldc, t), ldc, K, A + j0, lda, ncols - j0, Y + t * ldy + j0, ldy);
  for (; t < nt; ++t) GemmNNTokens<1, kTransC>(CRow<kTransC>(C, ldc, t), ldc, K, A + j0, lda, ncols - j0, Y + t * ldy + j0, ldy);
}

}  // namespace qk

// ---- entry points (inline: header-only static dispatch from many TUs links) -------------------

namespace qk {
// out = decoded rows (neither), out += alpha * decoded (kAdd), out = alpha * decoded (kScale).
template <bool kAdd, bool kScale>
inline void DecodeRowsEntry(const QView& q, std::size_t r0, std::size_t nr, unsigned tier, float alpha, float* out, std::size_t ld) {
  if (q.lanes)
    return q8k::ForPanels(q, r0, nr, [&](const QView& v, std::size_t i0, std::size_t n, std::size_t off) {
      DecodeRowsEntry<kAdd, kScale>(v, i0, n, tier, alpha, out + off * ld, ld);
    });
  const TierParams t = tier_params(q.bits, tier);
  if (t.shift) DecodeRowsT<true, kAdd, kScale>(q, r0, nr, t, out, ld, alpha);
  else DecodeRowsT<false, kAdd, kScale>(q, r0, nr, t, out, ld, alpha);
}
}  // namespace qk

inline HWY_NOINLINE void QDecodeRows(const QView& q, std::size_t r0, std::size_t nr, unsigned tier, float* out, std::size_t ld) {
  qk::DecodeRowsEntry<false, false>(q, r0, nr, tier, 1.0f, out, ld);
}

inline HWY_NOINLINE void QDecodeRowsAdd(const QView& q, std::size_t r0, std::size_t nr, unsigned tier, float alpha, float* out,
                                        std::size_t ld) {
  qk::DecodeRowsEntry<true, false>(q, r0, nr, tier, alpha, out, ld);
}

inline HWY_NOINLINE void QDecodeRowsScaled(const QView& q, std::size_t r0, std::size_t nr, unsigned tier, float alpha, float* out,
                                           std::size_t ld) {
  qk::DecodeRowsEntry<false, true>(q, r0, nr, tier, alpha, out, ld);
}

// q_gemv_nt on a row-major q.
inline void GemvNTRowMajor(const QView& q, std::size_t r0, std::size_t nr, unsigned tier, const float* x, float alpha, float* y) {
  const TierParams t = tier_params(q.bits, tier);
  if (t.shift) qk::GemvNTT<true>(q, r0, nr, t, x, alpha, y);
  else qk::GemvNTT<false>(q, r0, nr, t, x, alpha, y);
}

// Row-major q_gemm_nt. From 2 tokens, blocks of rows decoded once (q_decode_rows's vector bodies)
// into an L1-sized scratch, then the f32 gemm_nt tiles (4 rows x 4 tokens) for every token: the
// same products (a decoded code is exact in f32), in another order. It had been q_gemv_nt once
// per token, decoding every code once per token: 4-bit 256 x 256 in groups of 32, AVX-512, 3 / 8 /
// 32 tokens 16.6 / 45 / 183 -> 11.8 / 20.4 / 63 us (groups of 8: 27 / 70 / 279 -> 12.9 / 22.4 /
// 65; AVX2 groups of 4: 30 / 78 / 305 -> 14.6 / 27.8 / 85).
inline void GemmNTRowMajor(const QView& q, std::size_t r0, std::size_t nr, unsigned tier, const float* X, std::size_t ldx,
                           std::size_t nt, float alpha, float* Y, std::size_t ldy) {
  constexpr std::size_t kScratch = 8192;  // floats: 32 KB
  std::size_t R = kScratch / std::max<std::size_t>(q.cols, 1);
  if (R >= 4) R &= ~std::size_t{3};
  if (nt < 2 || R == 0) {
    for (std::size_t u = 0; u < nt; ++u) GemvNTRowMajor(q, r0, nr, tier, X + u * ldx, alpha, Y + u * ldy);
    return;
  }
  HWY_ALIGN float buf[kScratch];
  const std::size_t K = q.cols;
  for (std::size_t i = 0; i < nr; i += R) {
    const std::size_t n = std::min(R, nr - i);
    qk::DecodeRowsEntry<false, false>(q, r0 + i, n, tier, 1.0f, buf, K);
    qk::GemmNTAll(buf, K, n, X, ldx, nt, K, alpha, Y + i, ldy);
  }
}

inline HWY_NOINLINE void QGemmNT(const QView& q, std::size_t r0, std::size_t nr, unsigned tier, const float* X, std::size_t ldx,
                                 std::size_t nt, float alpha, float* Y, std::size_t ldy) {
  if (q.lanes) {
#if HWY_TARGET == HWY_AVX3_DL && S2LC_AMX
    if (amx_gemm_worth(q, nr, nt) && amx_gemm_fits(q, tier) && use_amx())
      return amx_gemm_nt(q, r0, nr, tier_params(q.bits, tier), X, ldx, nt, alpha, Y, ldy);  // amx.hpp
#endif
    if constexpr (q8k::kLanesVec) {
      if (nt == 1 || q.group <= qk::kLanesPackCols) {
        const TierParams t = tier_params(q.bits, tier);
        if (t.shift) qk::LanesGemmT<true>(q, r0, nr, t, X, ldx, nt, alpha, Y, ldy);
        else qk::LanesGemmT<false>(q, r0, nr, t, X, ldx, nt, alpha, Y, ldy);
        return;
      }
    }
    // panels unpacked to the row-major form once, for all tokens (also: groups too wide to pack)
    q8k::ForPanels(q, r0, nr, [&](const QView& v, std::size_t i0, std::size_t n, std::size_t off) {
      GemmNTRowMajor(v, i0, n, tier, X, ldx, nt, alpha, Y + off, ldy);
    });
    return;
  }
  GemmNTRowMajor(q, r0, nr, tier, X, ldx, nt, alpha, Y, ldy);
}

inline HWY_NOINLINE void QGemvNT(const QView& q, std::size_t r0, std::size_t nr, unsigned tier, const float* x, float alpha, float* y) {
  if (q.lanes) return QGemmNT(q, r0, nr, tier, x, 0, 1, alpha, y, 0);  // one token of the rows-in-lanes tiles
  GemvNTRowMajor(q, r0, nr, tier, x, alpha, y);
}

inline HWY_NOINLINE void QGemvNN(const QView& q, std::size_t k0, std::size_t nk, unsigned tier, const float* c, float* y) {
  if (q.lanes)
    return q8k::ForPanels(q, k0, nk, [&](const QView& v, std::size_t i0, std::size_t n, std::size_t off) {
      QGemvNN(v, i0, n, tier, c + off, y);
    });
  const TierParams t = tier_params(q.bits, tier);
  if (t.shift) qk::GemvNNT<true>(q, k0, nk, t, c, 0, 1, y, 0);
  else qk::GemvNNT<false>(q, k0, nk, t, c, 0, 1, y, 0);
}

inline HWY_NOINLINE void QGemmNN(const QView& q, std::size_t k0, std::size_t nk, unsigned tier, const float* C, std::size_t ldc,
                                 std::size_t nt, float* Y, std::size_t ldy) {
  if (q.lanes)
    return q8k::ForPanels(q, k0, nk, [&](const QView& v, std::size_t i0, std::size_t n, std::size_t off) {
      QGemmNN(v, i0, n, tier, C + off, ldc, nt, Y, ldy);
    });
  const TierParams t = tier_params(q.bits, tier);
  if (t.shift) qk::GemmNNQT<true>(q, k0, nk, t, C, ldc, nt, Y, ldy);
  else qk::GemmNNQT<false>(q, k0, nk, t, C, ldc, nt, Y, ldy);
}

inline HWY_NOINLINE void GemmNT(const float* W, std::size_t ldw, std::size_t nr, const float* X, std::size_t ldx, std::size_t nt,
                                std::size_t K, float alpha, float* Y, std::size_t ldy) {
  qk::GemmNTAll(W, ldw, nr, X, ldx, nt, K, alpha, Y, ldy);
}

inline HWY_NOINLINE void GemmNN(const float* C, std::size_t ldc, std::size_t nt, std::size_t K, const float* A, std::size_t lda,
                                std::size_t ncols, float* Y, std::size_t ldy) {
  qk::GemmNNT<false>(C, ldc, nt, K, A, lda, ncols, Y, ldy);
}

inline HWY_NOINLINE void GemmTN(const float* C, std::size_t ldc, std::size_t nt, std::size_t K, const float* A, std::size_t lda,
                                std::size_t ncols, float* Y, std::size_t ldy) {
  qk::GemmNNT<true>(C, ldc, nt, K, A, lda, ncols, Y, ldy);
}

/// out[i] = silu(g[i]) * u[i] = g / (1 + exp(-g)) * u.
inline HWY_NOINLINE void SwiGLU(const float* HWY_RESTRICT g, const float* HWY_RESTRICT u, float* HWY_RESTRICT out, std::size_t n) {
  const qk::DF df;
  const std::size_t N = hn::Lanes(df);
  const auto one = hn::Set(df, 1.0f);
  std::size_t i = 0;
  for (; i + N <= n; i += N) {
    const auto gv = hn::LoadU(df, g + i);
    const auto e = hn::Exp(df, hn::Neg(gv));
    hn::StoreU(hn::Mul(hn::Div(gv, hn::Add(one, e)), hn::LoadU(df, u + i)), df, out + i);
  }
  for (; i < n; ++i) out[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

/// Sum of n floats read once, streaming: the read-bandwidth bound of a kernel's bytes.
inline HWY_NOINLINE float StreamRead(const float* HWY_RESTRICT p, std::size_t n) {
  const qk::DF df;
  const std::size_t N = hn::Lanes(df);
  auto a0 = hn::Zero(df), a1 = hn::Zero(df), a2 = hn::Zero(df), a3 = hn::Zero(df);
  std::size_t i = 0;
  for (; i + 4 * N <= n; i += 4 * N) {
    a0 = hn::Add(a0, hn::LoadU(df, p + i));
    a1 = hn::Add(a1, hn::LoadU(df, p + i + N));
    a2 = hn::Add(a2, hn::LoadU(df, p + i + 2 * N));
    a3 = hn::Add(a3, hn::LoadU(df, p + i + 3 * N));
  }
  float s = hn::GetLane(hn::SumOfLanes(df, hn::Add(hn::Add(a0, a1), hn::Add(a2, a3))));
  for (; i < n; ++i) s += p[i];
  return s;
}

/// The xor of p's 8-byte words (the last one zero-padded), read once with whole vectors.
inline HWY_NOINLINE std::uint64_t StreamReadBytes(const std::uint8_t* HWY_RESTRICT p, std::size_t n) {
  std::size_t i = 0;
  std::uint64_t s = 0;
#if HWY_TARGET == HWY_SCALAR
  for (; i + 8 <= n; i += 8) {
    std::uint64_t w;
    std::memcpy(&w, p + i, 8);
    s ^= w;
  }
#else
  const hn::ScalableTag<std::uint64_t> du;
  const hn::Repartition<std::uint8_t, decltype(du)> d8;
  const std::size_t N = hn::Lanes(d8);
  auto a0 = hn::Zero(du), a1 = hn::Zero(du), a2 = hn::Zero(du), a3 = hn::Zero(du);
  for (; i + 4 * N <= n; i += 4 * N) {
    a0 = hn::Xor(a0, hn::BitCast(du, hn::LoadU(d8, p + i)));
    a1 = hn::Xor(a1, hn::BitCast(du, hn::LoadU(d8, p + i + N)));
    a2 = hn::Xor(a2, hn::BitCast(du, hn::LoadU(d8, p + i + 2 * N)));
    a3 = hn::Xor(a3, hn::BitCast(du, hn::LoadU(d8, p + i + 3 * N)));
  }
  HWY_ALIGN std::uint64_t lanes[hn::MaxLanes(du)];
  hn::Store(hn::Xor(hn::Xor(a0, a1), hn::Xor(a2, a3)), du, lanes);
  for (std::size_t l = 0; l < hn::Lanes(du); ++l) s ^= lanes[l];
#endif
  for (; i < n; ++i) s ^= std::uint64_t{p[i]} << (8 * (i % 8));  // the loop stops at a multiple of 8
  return s;
}

inline HWY_NOINLINE std::int64_t KernelTargetBit() { return HWY_TARGET; }

// The set bits of p[0, n): PopulationCount per vector, then the tail bytes.
inline HWY_NOINLINE std::size_t CountBits(const std::uint8_t* HWY_RESTRICT p, std::size_t n) {
  std::size_t i = 0, total = 0;
#if HWY_TARGET != HWY_SCALAR
  const hn::ScalableTag<std::uint64_t> d64;
  const hn::Repartition<std::uint8_t, decltype(d64)> d8;
  const std::size_t N8 = hn::Lanes(d8);
  auto acc = hn::Zero(d64);
  for (; i + N8 <= n; i += N8) acc = hn::Add(acc, hn::PopulationCount(hn::BitCast(d64, hn::LoadU(d8, p + i))));
  total = static_cast<std::size_t>(hn::GetLane(hn::SumOfLanes(d64, acc)));
#endif
  for (; i < n; ++i)
    for (unsigned b = p[i]; b; b &= b - 1) ++total;  // (no popcount call: baseline targets have no instruction)
  return total;
}

/// iters rounds of 8 vector FMAs on registers (16 independent chains on 32-register targets, 12
/// on 16-register ones, so FMA latency times pipes does not limit them): the FMA throughput
/// bound. The chains start from distinct values: from equal ones the compiler folds them into one
/// (GCC 12 did: a single dependent FMA counted as 8).
inline HWY_NOINLINE std::size_t FmaPeak(std::size_t iters, float* sink) {
  const qk::DF df;
  const auto m = hn::Set(df, 0.999999f), c = hn::Set(df, 1e-7f);
  auto a0 = hn::Set(df, 1.0f), a1 = hn::Set(df, 1.25f), a2 = hn::Set(df, 1.5f), a3 = hn::Set(df, 1.75f);
  auto a4 = hn::Set(df, 2.0f), a5 = hn::Set(df, 2.25f), a6 = hn::Set(df, 2.5f), a7 = hn::Set(df, 2.75f);
  std::size_t i = 0;
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3
  auto b0 = hn::Set(df, 3.0f), b1 = hn::Set(df, 3.25f), b2 = hn::Set(df, 3.5f), b3 = hn::Set(df, 3.75f);
  auto b4 = hn::Set(df, 4.0f), b5 = hn::Set(df, 4.25f), b6 = hn::Set(df, 4.5f), b7 = hn::Set(df, 4.75f);
  for (; i + 2 <= iters; i += 2) {
    a0 = hn::MulAdd(a0, m, c), a1 = hn::MulAdd(a1, m, c), a2 = hn::MulAdd(a2, m, c), a3 = hn::MulAdd(a3, m, c);
    a4 = hn::MulAdd(a4, m, c), a5 = hn::MulAdd(a5, m, c), a6 = hn::MulAdd(a6, m, c), a7 = hn::MulAdd(a7, m, c);
    b0 = hn::MulAdd(b0, m, c), b1 = hn::MulAdd(b1, m, c), b2 = hn::MulAdd(b2, m, c), b3 = hn::MulAdd(b3, m, c);
    b4 = hn::MulAdd(b4, m, c), b5 = hn::MulAdd(b5, m, c), b6 = hn::MulAdd(b6, m, c), b7 = hn::MulAdd(b7, m, c);
  }
  a0 = hn::Add(a0, b0), a1 = hn::Add(a1, b1), a2 = hn::Add(a2, b2), a3 = hn::Add(a3, b3);
  a4 = hn::Add(a4, b4), a5 = hn::Add(a5, b5), a6 = hn::Add(a6, b6), a7 = hn::Add(a7, b7);
#elif HWY_TARGET != HWY_SCALAR
  auto b0 = hn::Set(df, 3.0f), b1 = hn::Set(df, 3.25f), b2 = hn::Set(df, 3.5f), b3 = hn::Set(df, 3.75f);
  for (; i + 2 <= iters; i += 2) {  // 12 chains in 16 registers: 12 FMAs per step of 2 rounds
    a0 = hn::MulAdd(a0, m, c), a1 = hn::MulAdd(a1, m, c), a2 = hn::MulAdd(a2, m, c), a3 = hn::MulAdd(a3, m, c);
    a4 = hn::MulAdd(a4, m, c), a5 = hn::MulAdd(a5, m, c), a6 = hn::MulAdd(a6, m, c), a7 = hn::MulAdd(a7, m, c);
    b0 = hn::MulAdd(b0, m, c), b1 = hn::MulAdd(b1, m, c), b2 = hn::MulAdd(b2, m, c), b3 = hn::MulAdd(b3, m, c);
    a0 = hn::MulAdd(a0, m, c), a1 = hn::MulAdd(a1, m, c), a2 = hn::MulAdd(a2, m, c), a3 = hn::MulAdd(a3, m, c);
  }
  a4 = hn::Add(a4, b0), a5 = hn::Add(a5, b1), a6 = hn::Add(a6, b2), a7 = hn::Add(a7, b3);
#endif
  for (; i < iters; ++i) {
    a0 = hn::MulAdd(a0, m, c), a1 = hn::MulAdd(a1, m, c), a2 = hn::MulAdd(a2, m, c), a3 = hn::MulAdd(a3, m, c);
    a4 = hn::MulAdd(a4, m, c), a5 = hn::MulAdd(a5, m, c), a6 = hn::MulAdd(a6, m, c), a7 = hn::MulAdd(a7, m, c);
  }
  *sink = hn::GetLane(hn::SumOfLanes(df, hn::Add(hn::Add(hn::Add(a0, a1), hn::Add(a2, a3)), hn::Add(hn::Add(a4, a5), hn::Add(a6, a7)))));
  return iters * 8 * hn::Lanes(df);
}

// JIT merge: w += d, recording (a mask bit, the old value) for every element where (w + d) - d
// does not give w back bit for bit, so unmerge (w -= d, then the recorded values) is exact.

// Bit j of mask: read, and set (the mask zeroed first).
HWY_INLINE bool MaskBit(const std::uint8_t* HWY_RESTRICT mask, std::size_t j) { return (mask[j / 8] >> (j % 8)) & 1; }
HWY_INLINE void SetMaskBit(std::uint8_t* HWY_RESTRICT mask, std::size_t j) {
  mask[j / 8] = static_cast<std::uint8_t>(mask[j / 8] | (1u << (j % 8)));
}

// The next 16 recorded values from vals[k] (nvals in the record): in place, or the record's last
// ones copied into t after zeros, so no read goes past the record.
template <class T>
HWY_INLINE const T* Next16(const T* HWY_RESTRICT vals, std::size_t k, std::size_t nvals, T (&t)[16]) {
  if (k + 16 <= nvals) return vals + k;
  std::fill(t, t + 16, T{});
  if (nvals > k) std::memcpy(t, vals + k, (nvals - k) * sizeof(T));  // (vals is null for an empty record)
  return t;
}

// Sets bit i + j of mask (zeroed by the caller) for each lane j of m; i is a multiple of Lanes(d).
template <class D>
HWY_INLINE void PutMaskBits(D d, hn::Mask<D> m, std::size_t i, std::uint8_t* HWY_RESTRICT mask) {
  if (hn::Lanes(d) >= 8) {
    hn::StoreMaskBits(d, m, mask + i / 8);  // whole bytes: Lanes(d) is a multiple of 8
  } else {
    std::uint8_t b[8];
    hn::StoreMaskBits(d, m, b);
    mask[i / 8] = static_cast<std::uint8_t>(mask[i / 8] | (b[0] << (i % 8)));
  }
}

// Compress and expand of 32-bit lanes. AVX2 and SSE4 / SSSE3 permute by a table: Highway 1.0's
// Compress there keeps its 1 KB index table in a non-static constexpr array that GCC 12 copies
// onto the stack on every call (rep movsq), which made an AVX2 merge 8-10x slower than the
// AVX-512 one (real domain module: 4.3-4.8 ms). kLaneTables, per 8-bit mask m and lane j, 4 bits
// each: compress, the lane of the j-th set bit; expand, lane j's rank among the set bits.
#undef S2LC_LANE_TABLES  // (defined per target)
#if HWY_TARGET == HWY_AVX2 || HWY_TARGET == HWY_SSE4 || HWY_TARGET == HWY_SSSE3
#define S2LC_LANE_TABLES 1
struct LaneTables {
  std::uint32_t compress[256], expand[256];
};
inline constexpr LaneTables kLaneTables = [] {
  LaneTables t{};
  for (unsigned m = 0; m < 256; ++m) {
    unsigned rank = 0;
    for (unsigned j = 0; j < 8; ++j)
      if (m >> j & 1) t.compress[m] |= j << (4 * rank), t.expand[m] |= rank << (4 * j), ++rank;
  }
  return t;
}();
template <class D>
HWY_INLINE auto LaneIndices(D d, std::uint32_t packed) {
  const hn::RebindToUnsigned<D> du;
  const auto idx = hn::And(hn::Set(du, packed) >> hn::ShiftLeft<2>(hn::Iota(du, 0)), hn::Set(du, 7u));
  return hn::IndicesFromVec(d, idx);
}
#else
#define S2LC_LANE_TABLES 0
#endif

// The lanes of v where m is set, moved to the front in order (the rest unspecified).
template <class D>
HWY_INLINE hn::Vec<D> CompressLanes(D d, hn::Vec<D> v, hn::Mask<D> m) {
#if S2LC_LANE_TABLES
  std::uint8_t b[8];
  hn::StoreMaskBits(d, m, b);
  return hn::TableLookupLanes(v, LaneIndices(d, kLaneTables.compress[b[0]]));
#else
  (void)d;
  return hn::Compress(v, m);
#endif
}

#if HWY_TARGET == HWY_AVX2
// The bf16 merge's record on AVX2 as 16-bit lanes of a 128-bit vector, per 8-bit mask m (bit j:
// lane j recorded): compress, the byte shuffle moving the set lanes to the front in order (zeros
// after); expand, the one moving the r-th recorded value to the r-th set lane (zeros elsewhere);
// select, 0xFFFF in the set lanes (for a blend). The 32-bit forms (kLaneTables) built lane
// indices in registers and narrowed afterwards: scratch loop, 4-bit 256 x 1024 merge into bf16 in
// L2, best of 6 alternating runs, 9.9 -> 8.0 ns per 16 elements.
struct Shuffle16Tables {
  alignas(16) std::uint8_t compress[256][16];
  alignas(16) std::uint8_t expand[256][16];
  alignas(16) std::uint8_t select[256][16];
};
inline constexpr Shuffle16Tables kShuffle16 = [] {
  Shuffle16Tables t{};
  for (unsigned m = 0; m < 256; ++m) {
    for (unsigned b = 0; b < 16; ++b) t.compress[m][b] = t.expand[m][b] = 0x80;
    for (unsigned j = 0, rank = 0; j < 8; ++j) {
      if (!(m >> j & 1)) continue;
      for (unsigned h = 0; h < 2; ++h) {
        t.compress[m][2 * rank + h] = static_cast<std::uint8_t>(2 * j + h);
        t.expand[m][2 * j + h] = static_cast<std::uint8_t>(2 * rank + h);
        t.select[m][2 * j + h] = 0xFF;
      }
      ++rank;
    }
  }
  return t;
}();
#endif

#if S2LC_LANE_TABLES
// v with each lane j whose bit is set in bits replaced by the next of src's lanes, in order.
template <class D>
HWY_INLINE hn::Vec<D> ExpandLanes(D d, hn::Vec<D> v, unsigned bits, hn::Vec<D> src) {
  const std::uint8_t b[8] = {static_cast<std::uint8_t>(bits)};
  return hn::IfThenElse(hn::LoadMaskBits(d, b), hn::TableLookupLanes(src, LaneIndices(d, kLaneTables.expand[bits])), v);
}
// The mask bits of the Lanes(DF) elements from i (a multiple of Lanes; Lanes <= 8).
HWY_INLINE unsigned LaneBits(const std::uint8_t* HWY_RESTRICT mask, std::size_t i) {
  constexpr unsigned kAll = (1u << hn::MaxLanes(qk::DF())) - 1;
  return (mask[i / 8] >> (i % 8)) & kAll;
}
#endif

// Merging into real weights records 1-50 % of the elements. The body is branch-free: a bit per
// element and the recorded old values compressed in registers, stored as whole vectors. A branch
// on "any lane recorded" mispredicted at a few per cent (1436 against 608 us per 2048 x 1408
// pass at 4 %, scratch test on Zen 5), and a scalar loop over the lanes cost 37-54 ns per vector
// (CompressStore's memory form is microcoded on AMD Zen).
//
// Per vector and per element, for f32 and bf16 buffers: w (a row) at element i (a multiple of
// Lanes for a vector) += dv, recording into mask (bits set, never cleared) and at bad_val;
// returns how many were recorded. Unmerge: w -= dv, then the recorded values from vals[k]
// (nvals in all) where mask has a bit; returns the new k.
//
// VecU: U vectors from element i, every load before the first store of a recorded value. Such a
// store's address waits for the counts before it, and on Zen 5 it holds back the loads after it
// (scratch test, w and d in L2: 8.3 cycles a vector one at a time, 5.5 at U = 8, 3.0 with no
// record).
inline constexpr std::size_t kMergeU = 8;
struct MergeF32Op {
  using T = float;
  static constexpr bool kPairs = false;  // (DecodedRow: byte codes and wide nibble groups one vector at a time)
  template <std::size_t U>
  static HWY_INLINE std::size_t VecU(float* HWY_RESTRICT w, const qk::VF (&dv)[U], std::size_t i, std::uint8_t* HWY_RESTRICT mask,
                                     float* HWY_RESTRICT bad_val) {
    const qk::DF df;
    const qk::DU du;
    const std::size_t N = hn::Lanes(df);
    qk::VF wv[U], m[U];
    hn::Mask<qk::DU> bad[U];
    for (std::size_t u = 0; u < U; ++u) wv[u] = hn::LoadU(df, w + i + u * N);
    for (std::size_t u = 0; u < U; ++u) {
      m[u] = hn::Add(wv[u], dv[u]);
      bad[u] = hn::Ne(hn::BitCast(du, hn::Sub(m[u], dv[u])), hn::BitCast(du, wv[u]));
    }
    std::size_t nb = 0;
    for (std::size_t u = 0; u < U; ++u) {
      hn::StoreU(m[u], df, w + i + u * N);
      PutMaskBits(du, bad[u], i + u * N, mask);
      hn::StoreU(CompressLanes(df, wv[u], hn::RebindMask(df, bad[u])), df, bad_val + nb);
      nb += hn::CountTrue(du, bad[u]);
    }
    return nb;
  }
  static HWY_INLINE std::size_t Vec(float* HWY_RESTRICT w, qk::VF dv, std::size_t i, std::uint8_t* HWY_RESTRICT mask,
                                    float* HWY_RESTRICT bad_val) {
    const qk::VF d1[1] = {dv};
    return VecU<1>(w, d1, i, mask, bad_val);
  }
  static HWY_INLINE std::size_t One(float* HWY_RESTRICT w, float d, std::size_t i, std::uint8_t* HWY_RESTRICT mask,
                                    float* HWY_RESTRICT bad_val) {
    const float old = w[i], m = old + d, back = m - d;
    w[i] = m;
    if (std::memcmp(&back, &old, sizeof(float)) == 0) return 0;
    SetMaskBit(mask, i), *bad_val = old;
    return 1;
  }
  // AVX-512 expands the recorded values into each vector in registers (a branch per vector on
  // "any recorded" mispredicts at a few per cent, as merge's did).
  static HWY_INLINE std::size_t Undo(float* HWY_RESTRICT w, qk::VF dv, std::size_t i, const std::uint8_t* HWY_RESTRICT mask,
                                     const float* HWY_RESTRICT vals, std::size_t k, std::size_t nvals) {
    const qk::DF df;
    const auto v = hn::Sub(hn::LoadU(df, w + i), dv);
#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL
    const unsigned bits = mask[i / 8] | (unsigned{mask[i / 8 + 1]} << 8);
    float t[16];
    const __m512 src = _mm512_loadu_ps(Next16(vals, k, nvals, t));
    hn::StoreU(qk::VF{_mm512_mask_expand_ps(v.raw, static_cast<__mmask16>(bits), src)}, df, w + i);
    return k + static_cast<std::size_t>(std::popcount(bits));
#elif S2LC_LANE_TABLES
    const unsigned bits = LaneBits(mask, i);
    float t[16];
    hn::StoreU(ExpandLanes(df, v, bits, hn::LoadU(df, Next16(vals, k, nvals, t))), df, w + i);
    return k + static_cast<std::size_t>(std::popcount(bits));
#else
    (void)nvals;
    hn::StoreU(v, df, w + i);
    for (std::size_t j = 0; j < hn::Lanes(df); ++j)
      if (MaskBit(mask, i + j)) w[i + j] = vals[k++];
    return k;
#endif
  }
  // U vectors from element i, their loads first (AVX-512, the record's next U vectors in place).
  template <std::size_t U>
  static HWY_INLINE std::size_t UndoU(float* HWY_RESTRICT w, const qk::VF (&dv)[U], std::size_t i, const std::uint8_t* HWY_RESTRICT mask,
                                      const float* HWY_RESTRICT vals, std::size_t k, std::size_t nvals) {
    const qk::DF df;
    const std::size_t N = hn::Lanes(df);
#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL
    if (k + 16 * U <= nvals) {
      qk::VF v[U];
      for (std::size_t u = 0; u < U; ++u) v[u] = hn::Sub(hn::LoadU(df, w + i + u * N), dv[u]);
      for (std::size_t u = 0; u < U; ++u) {
        const unsigned bits = mask[(i + u * N) / 8] | (unsigned{mask[(i + u * N) / 8 + 1]} << 8);
        hn::StoreU(qk::VF{_mm512_mask_expand_ps(v[u].raw, static_cast<__mmask16>(bits), _mm512_loadu_ps(vals + k))}, df, w + i + u * N);
        k += static_cast<std::size_t>(std::popcount(bits));
      }
      return k;
    }
#endif
    for (std::size_t u = 0; u < U; ++u) k = Undo(w, dv[u], i + u * N, mask, vals, k, nvals);
    return k;
  }
  static HWY_INLINE std::size_t UndoOne(float* HWY_RESTRICT w, float d, std::size_t i, const std::uint8_t* HWY_RESTRICT mask,
                                        const float* HWY_RESTRICT vals, std::size_t k) {
    w[i] -= d;
    if (MaskBit(mask, i)) w[i] = vals[k++];
    return k;
  }
};

// kNe: rounds with vcvtneps2bf16 (S2LC_BF16_NE, convert-inl.h; chosen per call where the CPU
// has AVX512_BF16), +-0 results through the integer path (VecUInt, UndoInt). Real domain module
// into bf16 weights (bench, alternating runs): merge cold 692-709 -> 603-617 us, hot 568-571 ->
// 488-505; unmerge cold 559-566 -> 505-512.
template <bool kNe>
struct MergeBF16OpT {
  using T = std::uint16_t;
  static constexpr bool kPairs = kNe;  // VecU takes pairs of vectors as 32 bf16 lanes
  template <std::size_t U>
  static HWY_INLINE std::size_t VecU(std::uint16_t* HWY_RESTRICT w, const qk::VF (&dv)[U], std::size_t i,
                                     std::uint8_t* HWY_RESTRICT mask, std::uint16_t* HWY_RESTRICT bad_val) {
#if S2LC_BF16_NE
    // Pairs of vectors (32 elements): one 512-bit load, vcvtne2ps2bf16 rounding both at once, and
    // the compare, zero probe, store and compressed record on 32 bf16 lanes instead of two
    // 256-bit halves. kernels::merge_bf16 on 16 K elements in L1/L2 (scratch, alternating
    // builds): 1.95-2.07 -> 1.21-1.31 ns per 16 elements.
    if constexpr (kNe && U % 2 == 0) {
      constexpr std::size_t P = U / 2;
      __m512i wv[P], m16[P];
      __mmask32 bad[P];
      __m512i probe = _mm512_set1_epi16(-1);
      for (std::size_t p = 0; p < P; ++p) wv[p] = _mm512_loadu_si512(w + i + 32 * p);
      for (std::size_t p = 0; p < P; ++p) {
        m16[p] = CvtNe2BF16(_mm512_add_ps(WidenBF16Lo(wv[p]), dv[2 * p].raw), _mm512_add_ps(WidenBF16Hi(wv[p]), dv[2 * p + 1].raw));
        const __m512i back = CvtNe2BF16(_mm512_sub_ps(WidenBF16Lo(m16[p]), dv[2 * p].raw), _mm512_sub_ps(WidenBF16Hi(m16[p]), dv[2 * p + 1].raw));
        bad[p] = _mm512_cmpneq_epi16_mask(back, wv[p]);
        probe = ZeroProbe32(ZeroProbe32(probe, m16[p]), back);
      }
      if (HWY_UNLIKELY(AnyZero32(probe))) {
        // A +-0 result is exact unless the value rounded was subnormal (the instruction flushes
        // it): only then the integer path. A real domain module cancels base weights exactly
        // (a domain weight 0) in 2 % of its pairs, which all took the integer path before.
        __mmask16 sub = 0;
        for (std::size_t p = 0; p < P; ++p) {
          const __m512 lo = _mm512_add_ps(WidenBF16Lo(wv[p]), dv[2 * p].raw), hi = _mm512_add_ps(WidenBF16Hi(wv[p]), dv[2 * p + 1].raw);
          const __m512 blo = _mm512_sub_ps(WidenBF16Lo(m16[p]), dv[2 * p].raw), bhi = _mm512_sub_ps(WidenBF16Hi(m16[p]), dv[2 * p + 1].raw);
          sub = static_cast<__mmask16>(sub | Subnormal(lo, hi) | Subnormal(blo, bhi));
        }
        if (sub) return VecUInt<U>(w, dv, i, mask, bad_val);  // nothing stored yet
      }
      std::size_t nb = 0;
      for (std::size_t p = 0; p < P; ++p) {
        _mm512_storeu_si512(w + i + 32 * p, m16[p]);
        const std::uint32_t bits = bad[p];
        std::memcpy(mask + (i + 32 * p) / 8, &bits, 4);
        _mm512_storeu_si512(bad_val + nb, _mm512_maskz_compress_epi16(bad[p], wv[p]));
        nb += static_cast<std::size_t>(std::popcount(bits));
      }
      return nb;
    }
    if constexpr (kNe) {
      __m256i wv[U], m16[U];
      __mmask16 bad[U];
      __m256i probe = _mm256_set1_epi16(-1);
      for (std::size_t u = 0; u < U; ++u) wv[u] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i + 16 * u));
      for (std::size_t u = 0; u < U; ++u) {
        m16[u] = CvtNeBF16(_mm512_add_ps(WidenBF16(wv[u]), dv[u].raw));
        const __m256i back = CvtNeBF16(_mm512_sub_ps(WidenBF16(m16[u]), dv[u].raw));
        bad[u] = _mm256_cmpneq_epi16_mask(back, wv[u]);
        probe = ZeroProbe(ZeroProbe(probe, m16[u]), back);
      }
      if (HWY_UNLIKELY(AnyZero(probe))) return VecUInt<U>(w, dv, i, mask, bad_val);  // nothing stored yet
      std::size_t nb = 0;
      for (std::size_t u = 0; u < U; ++u) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + i + 16 * u), m16[u]);
        PutMaskBits(qk::DU(), hn::Mask<qk::DU>{bad[u]}, i + 16 * u, mask);
        hn::StoreU(hn::Compress(hn::Vec<DU16>{wv[u]}, hn::Mask<DU16>{bad[u]}), DU16(), bad_val + nb);  // as VecUInt's
        nb += static_cast<std::size_t>(std::popcount(static_cast<unsigned>(bad[u])));
      }
      return nb;
    }
#endif
    return VecUInt<U>(w, dv, i, mask, bad_val);
  }
  // Rounded and compared in 32-bit lanes: only the stored result is narrowed (a narrowing of
  // the check too made the kernel a third slower: 1000 against 750 us per 2048 x 1408 pass).
  template <std::size_t U>
  static HWY_INLINE std::size_t VecUInt(std::uint16_t* HWY_RESTRICT w, const qk::VF (&dv)[U], std::size_t i,
                                        std::uint8_t* HWY_RESTRICT mask, std::uint16_t* HWY_RESTRICT bad_val) {
    const qk::DF df;
    const qk::DU du;
    const DU16 d16;
    const std::size_t N = hn::Lanes(df);
    hn::Vec<DU16> wv[U];
    hn::Vec<qk::DU> w32[U], m32[U];
    hn::Mask<qk::DU> bad[U];
    for (std::size_t u = 0; u < U; ++u) wv[u] = hn::LoadU(d16, w + i + u * N);
    for (std::size_t u = 0; u < U; ++u) {
      w32[u] = hn::PromoteTo(du, wv[u]);
      m32[u] = F32ToBF16Bits32(hn::Add(hn::BitCast(df, hn::ShiftLeft<16>(w32[u])), dv[u]));
      bad[u] = hn::Ne(F32ToBF16Bits32(hn::Sub(hn::BitCast(df, hn::ShiftLeft<16>(m32[u])), dv[u])), w32[u]);
    }
    std::size_t nb = 0;
    for (std::size_t u = 0; u < U; ++u) {
      hn::StoreU(NarrowU32(m32[u]), d16, w + i + u * N);
      PutMaskBits(du, bad[u], i + u * N, mask);
#if HWY_TARGET == HWY_AVX3_DL
      // old values compressed as 16-bit lanes (VBMI2): 750 -> 700 us per pass
      hn::StoreU(hn::Compress(wv[u], hn::Mask256<std::uint16_t>{static_cast<__mmask16>(bad[u].raw)}), d16, bad_val + nb);
#elif HWY_TARGET == HWY_AVX2
      // old values compressed as 16-bit lanes by one byte shuffle (kShuffle16)
      const unsigned bits = static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(bad[u].raw)));
      const __m128i sh = _mm_load_si128(reinterpret_cast<const __m128i*>(kShuffle16.compress[bits]));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(bad_val + nb), _mm_shuffle_epi8(wv[u].raw, sh));
      nb += static_cast<std::size_t>(std::popcount(bits));
      continue;
#else
      // old values compressed as 32-bit lanes, narrowed (exact: they are below 2^16), stored whole
      hn::StoreU(NarrowU32(CompressLanes(du, w32[u], bad[u])), d16, bad_val + nb);
#endif
      nb += hn::CountTrue(du, bad[u]);
    }
    return nb;
  }
  static HWY_INLINE std::size_t Vec(std::uint16_t* HWY_RESTRICT w, qk::VF dv, std::size_t i, std::uint8_t* HWY_RESTRICT mask,
                                    std::uint16_t* HWY_RESTRICT bad_val) {
    const qk::VF d1[1] = {dv};
    return VecU<1>(w, d1, i, mask, bad_val);
  }
  static HWY_INLINE std::size_t One(std::uint16_t* HWY_RESTRICT w, float d, std::size_t i, std::uint8_t* HWY_RESTRICT mask,
                                    std::uint16_t* HWY_RESTRICT bad_val) {
    const std::uint16_t old = w[i];
    const std::uint16_t m = s2lc::f32_to_bf16(s2lc::bf16_to_f32(old) + d);
    w[i] = m;
    if (s2lc::f32_to_bf16(s2lc::bf16_to_f32(m) - d) == old) return 0;
    SetMaskBit(mask, i), *bad_val = old;
    return 1;
  }
  static HWY_INLINE std::size_t Undo(std::uint16_t* HWY_RESTRICT w, qk::VF dv, std::size_t i, const std::uint8_t* HWY_RESTRICT mask,
                                     const std::uint16_t* HWY_RESTRICT vals, std::size_t k, std::size_t nvals) {
#if S2LC_BF16_NE
    if constexpr (kNe) {  // the recorded values expanded as 16-bit lanes (VBMI2)
      const __m256i v = CvtNeBF16(_mm512_sub_ps(WidenBF16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i))), dv.raw));
      if (HWY_LIKELY(!AnyZero(_mm256_add_epi16(v, v)))) {
        const unsigned bits = mask[i / 8] | (unsigned{mask[i / 8 + 1]} << 8);
        std::uint16_t t[16];
        const __m256i src = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(Next16(vals, k, nvals, t)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + i), _mm256_mask_expand_epi16(v, static_cast<__mmask16>(bits), src));
        return k + static_cast<std::size_t>(std::popcount(bits));
      }
    }
#endif
    return UndoInt(w, dv, i, mask, vals, k, nvals);
  }
  // As MergeF32Op::Undo: the recorded values expanded into each vector in registers (as 32-bit lanes).
  static HWY_INLINE std::size_t UndoInt(std::uint16_t* HWY_RESTRICT w, qk::VF dv, std::size_t i, const std::uint8_t* HWY_RESTRICT mask,
                                        const std::uint16_t* HWY_RESTRICT vals, std::size_t k, std::size_t nvals) {
    const DU16 d16;
    const auto v = F32ToBF16Bits32(hn::Sub(BF16ToF32Vec(hn::LoadU(d16, w + i)), dv));
#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL
    const qk::DU du;
    const unsigned bits = mask[i / 8] | (unsigned{mask[i / 8 + 1]} << 8);
    std::uint16_t t[16];
    const auto src = hn::LoadU(d16, Next16(vals, k, nvals, t));
    const auto e = hn::Vec<qk::DU>{_mm512_mask_expand_epi32(v.raw, static_cast<__mmask16>(bits), hn::PromoteTo(du, src).raw)};
    hn::StoreU(NarrowU32(e), d16, w + i);
    return k + static_cast<std::size_t>(std::popcount(bits));
#elif HWY_TARGET == HWY_AVX2
    // the recorded values expanded as 16-bit lanes by one byte shuffle and a blend (kShuffle16)
    const unsigned bits = LaneBits(mask, i);
    std::uint16_t t[16];
    const __m128i src = _mm_loadu_si128(reinterpret_cast<const __m128i*>(Next16(vals, k, nvals, t)));
    const __m128i e = _mm_shuffle_epi8(src, _mm_load_si128(reinterpret_cast<const __m128i*>(kShuffle16.expand[bits])));
    const __m128i sel = _mm_load_si128(reinterpret_cast<const __m128i*>(kShuffle16.select[bits]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(w + i), _mm_blendv_epi8(NarrowU32(v).raw, e, sel));
    return k + static_cast<std::size_t>(std::popcount(bits));
#elif S2LC_LANE_TABLES
    const qk::DU du;
    const unsigned bits = LaneBits(mask, i);
    std::uint16_t t[16];
    const auto src = hn::PromoteTo(du, hn::LoadU(d16, Next16(vals, k, nvals, t)));
    hn::StoreU(NarrowU32(ExpandLanes(du, v, bits, src)), d16, w + i);
    return k + static_cast<std::size_t>(std::popcount(bits));
#else
    (void)nvals;
    hn::StoreU(NarrowU32(v), d16, w + i);
    for (std::size_t j = 0; j < hn::Lanes(qk::DF()); ++j)
      if (MaskBit(mask, i + j)) w[i + j] = vals[k++];
    return k;
#endif
  }
  template <std::size_t U>
  static HWY_INLINE std::size_t UndoU(std::uint16_t* HWY_RESTRICT w, const qk::VF (&dv)[U], std::size_t i,
                                      const std::uint8_t* HWY_RESTRICT mask, const std::uint16_t* HWY_RESTRICT vals, std::size_t k,
                                      std::size_t nvals) {
#if S2LC_BF16_NE
    // As MergeF32Op::UndoU: all U loaded and rounded first, the record read in place (real domain
    // module, bf16, four alternating runs: unmerge cold 611-687 -> 573-587 us, hot 458-471 -> 437-443).
    if constexpr (kNe && U % 2 == 0) {  // pairs of vectors, as VecU
      constexpr std::size_t P = U / 2;
      if (k + 16 * U <= nvals) {
        __m512i v[P];
        __m512i probe = _mm512_set1_epi16(-1);
        for (std::size_t p = 0; p < P; ++p) {
          const __m512i h = _mm512_loadu_si512(w + i + 32 * p);
          v[p] = CvtNe2BF16(_mm512_sub_ps(WidenBF16Lo(h), dv[2 * p].raw), _mm512_sub_ps(WidenBF16Hi(h), dv[2 * p + 1].raw));
          probe = ZeroProbe32(probe, v[p]);
        }
        bool exact = !AnyZero32(probe);
        if (HWY_UNLIKELY(!exact)) {
          // As VecU: a +-0 is exact unless the difference rounded was subnormal. Zeros are common
          // where the base has zeros (pruned or 2:4-sparse weights) and the delta is 0 or a bf16
          // value; before, each such pair took the integer path vector by vector.
          __mmask16 sub = 0;
          for (std::size_t p = 0; p < P; ++p) {
            const __m512i h = _mm512_loadu_si512(w + i + 32 * p);
            sub |= Subnormal(_mm512_sub_ps(WidenBF16Lo(h), dv[2 * p].raw), _mm512_sub_ps(WidenBF16Hi(h), dv[2 * p + 1].raw));
          }
          exact = sub == 0;
        }
        if (HWY_LIKELY(exact)) {
          for (std::size_t p = 0; p < P; ++p) {
            std::uint32_t bits;
            std::memcpy(&bits, mask + (i + 32 * p) / 8, 4);
            _mm512_storeu_si512(w + i + 32 * p, _mm512_mask_expand_epi16(v[p], static_cast<__mmask32>(bits), _mm512_loadu_si512(vals + k)));
            k += static_cast<std::size_t>(std::popcount(bits));
          }
          return k;
        }
      }
    } else if constexpr (kNe) {
      if (k + 16 * U <= nvals) {
        __m256i v[U];
        __m256i probe = _mm256_set1_epi16(-1);
        for (std::size_t u = 0; u < U; ++u) {
          v[u] = CvtNeBF16(_mm512_sub_ps(WidenBF16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i + 16 * u))), dv[u].raw));
          probe = ZeroProbe(probe, v[u]);
        }
        if (HWY_LIKELY(!AnyZero(probe))) {
          for (std::size_t u = 0; u < U; ++u) {
            const unsigned bits = mask[(i + 16 * u) / 8] | (unsigned{mask[(i + 16 * u) / 8 + 1]} << 8);
            const __m256i src = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(vals + k));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + i + 16 * u), _mm256_mask_expand_epi16(v[u], static_cast<__mmask16>(bits), src));
            k += static_cast<std::size_t>(std::popcount(bits));
          }
          return k;
        }
      }
    }
#endif
    for (std::size_t u = 0; u < U; ++u) k = Undo(w, dv[u], i + u * hn::Lanes(qk::DF()), mask, vals, k, nvals);
    return k;
  }
  static HWY_INLINE std::size_t UndoOne(std::uint16_t* HWY_RESTRICT w, float d, std::size_t i, const std::uint8_t* HWY_RESTRICT mask,
                                        const std::uint16_t* HWY_RESTRICT vals, std::size_t k) {
    w[i] = s2lc::f32_to_bf16(s2lc::bf16_to_f32(w[i]) - d);
    if (MaskBit(mask, i)) w[i] = vals[k++];
    return k;
  }
};

// Where a delta row's vectors go (decoded in registers, or loaded): merged into (or unmerged
// from) a buffer row, the recorded values from vals[k].
template <class Op, bool kUndo, class M, class V>
struct RowSink {
  static constexpr bool kPairs = Op::kPairs;
  typename Op::T* row;
  M* mask;
  V* vals;
  std::size_t k, nvals;
  HWY_INLINE void Vec(qk::VF dv, std::size_t c) {
    if constexpr (kUndo) k = Op::Undo(row, dv, c, mask, vals, k, nvals);
    else k += Op::Vec(row, dv, c, mask, vals + k);
  }
  template <std::size_t U>  // U vectors from column c
  HWY_INLINE void Vecs(const qk::VF (&dv)[U], std::size_t c) {
    if constexpr (kUndo) k = Op::UndoU(row, dv, c, mask, vals, k, nvals);
    else k += Op::VecU(row, dv, c, mask, vals + k);
  }
  HWY_INLINE void One(float d, std::size_t c) {
    if constexpr (kUndo) k = Op::UndoOne(row, d, c, mask, vals, k);
    else k += Op::One(row, d, c, mask, vals + k);
  }
};

// The delta row d[0, n) into sink: kMergeU vectors at a time, then single vectors, then the tail.
template <class Sink>
HWY_INLINE void LoadedRow(const float* HWY_RESTRICT d, std::size_t n, Sink& sink) {
  const qk::DF df;
  const std::size_t N = hn::Lanes(df);
  std::size_t i = 0;
  for (; i + kMergeU * N <= n; i += kMergeU * N) {
    qk::VF dv[kMergeU];
    for (std::size_t u = 0; u < kMergeU; ++u) dv[u] = hn::LoadU(df, d + i + u * N);
    sink.Vecs(dv, i);
  }
  for (; i + N <= n; i += N) sink.Vec(hn::LoadU(df, d + i), i);
  for (; i < n; ++i) sink.One(d[i], i);
}

// The record's values a few KB ahead of an unmerge, once per buffer row: the values are read
// at a data-dependent pace, which the hardware prefetchers follow late (real domain module,
// cold: unmerge 741-754 -> 606-616 us; a 2048 x 1408 expert: 1814-1939 -> 1701-1726).
template <class V>
HWY_INLINE void PrefetchRecord(const V* vals, std::size_t nvals) {
  constexpr std::size_t kAhead = 4096 / sizeof(V);
  if (nvals > kAhead) hwy::Prefetch(vals + kAhead);
}

template <class Op>
HWY_INLINE std::size_t MergeT(typename Op::T* HWY_RESTRICT w, const float* HWY_RESTRICT d, std::size_t n, std::uint8_t* HWY_RESTRICT mask,
                              typename Op::T* HWY_RESTRICT bad_val) {
  std::memset(mask, 0, (n + 7) / 8);
  RowSink<Op, false, std::uint8_t, typename Op::T> sink{w, mask, bad_val, 0, 0};
  LoadedRow(d, n, sink);
  return sink.k;
}

template <class Op>
HWY_INLINE std::size_t UnmergeT(typename Op::T* HWY_RESTRICT w, const float* HWY_RESTRICT d, std::size_t n, const std::uint8_t* HWY_RESTRICT mask,
                                const typename Op::T* HWY_RESTRICT vals, std::size_t nvals) {
  PrefetchRecord(vals, nvals);
  RowSink<Op, true, const std::uint8_t, const typename Op::T> sink{w, mask, vals, 0, nvals};
  LoadedRow(d, n, sink);
  return sink.k;
}

inline HWY_NOINLINE std::size_t MergeF32(float* HWY_RESTRICT w, const float* HWY_RESTRICT d, std::size_t n,
                                         std::uint8_t* HWY_RESTRICT mask, float* HWY_RESTRICT bad_val) {
  return MergeT<MergeF32Op>(w, d, n, mask, bad_val);
}
inline HWY_NOINLINE std::size_t UnmergeF32(float* HWY_RESTRICT w, const float* HWY_RESTRICT d, std::size_t n,
                                           const std::uint8_t* HWY_RESTRICT mask, const float* HWY_RESTRICT vals, std::size_t nvals) {
  return UnmergeT<MergeF32Op>(w, d, n, mask, vals, nvals);
}
inline HWY_NOINLINE std::size_t MergeBF16(std::uint16_t* HWY_RESTRICT w, const float* HWY_RESTRICT d, std::size_t n,
                                          std::uint8_t* HWY_RESTRICT mask, std::uint16_t* HWY_RESTRICT bad_val) {
#if S2LC_BF16_NE
  if (use_avx512_bf16()) return MergeT<MergeBF16OpT<true>>(w, d, n, mask, bad_val);
#endif
  return MergeT<MergeBF16OpT<false>>(w, d, n, mask, bad_val);
}
inline HWY_NOINLINE std::size_t UnmergeBF16(std::uint16_t* HWY_RESTRICT w, const float* HWY_RESTRICT d, std::size_t n,
                                            const std::uint8_t* HWY_RESTRICT mask, const std::uint16_t* HWY_RESTRICT vals, std::size_t nvals) {
#if S2LC_BF16_NE
  if (use_avx512_bf16()) return UnmergeT<MergeBF16OpT<true>>(w, d, n, mask, vals, nvals);
#endif
  return UnmergeT<MergeBF16OpT<false>>(w, d, n, mask, vals, nvals);
}

// ---- merge / unmerge of a dense quantized delta straight from its codes ----
// v itself, but opaque to the optimizer: a decoded delta is rounded before the merge adds it.
// (GCC, as -std=gnu++ builds do by default, contracts the decode's multiply and the merge's add
// into one FMA, rounding once: the bits would then differ from decoding first, and a merge and
// an unmerge compiled differently could disagree.)
template <class V>
HWY_INLINE V Opaque(V v) {
#if HWY_ARCH_X86 && (defined(__GNUC__) || defined(__clang__)) && HWY_TARGET != HWY_EMU128
  if constexpr (std::is_same_v<V, float>) asm("" : "+v"(v));
  else asm("" : "+v"(v.raw));  // an x86 target's vector (HWY_SCALAR's: a float) is one register
  return v;
#elif defined(__GNUC__) || defined(__clang__)
  asm volatile("" : : "r"(&v) : "memory");  // v stored and reloaded
  return v;
#else
  return v;  // MSVC contracts only under /fp:contract
#endif
}

// y[i] += a x[i], the product rounded before the sum (never one FMA, whatever the compiler's
// contraction): the bits of the scalar loop `y[i] += a * x[i]` built without FMA instructions, on
// every target. The grouped apply's gate-weighted sums and copies of partial outputs (a = 1 is an
// exact product: y + x) used to be such loops in the caller's baseline ISA (SSE2 on x86-64).
inline HWY_NOINLINE void AddScaled(float a, const float* HWY_RESTRICT x, float* HWY_RESTRICT y, std::size_t n) {
  const qk::DF df;
  const std::size_t N = hn::Lanes(df);
  const auto va = hn::Set(df, a);
  std::size_t i = 0;
  for (; i + 2 * N <= n; i += 2 * N) {
    const auto p0 = Opaque(hn::Mul(va, hn::LoadU(df, x + i))), p1 = Opaque(hn::Mul(va, hn::LoadU(df, x + i + N)));
    hn::StoreU(hn::Add(hn::LoadU(df, y + i), p0), df, y + i);
    hn::StoreU(hn::Add(hn::LoadU(df, y + i + N), p1), df, y + i + N);
  }
  for (; i + N <= n; i += N) hn::StoreU(hn::Add(hn::LoadU(df, y + i), Opaque(hn::Mul(va, hn::LoadU(df, x + i)))), df, y + i);
  for (; i < n; ++i) y[i] += Opaque(a * x[i]);  // (a masked load may read past the end on some targets)
}

// A decoded vector v of codes times its scale vs (kScale: then times va), rounded.
template <bool kScale>
HWY_INLINE qk::VF Finish(qk::VF v, qk::VF vs, qk::VF va) {
  if constexpr (kScale) return Opaque(hn::Mul(va, hn::Mul(v, vs)));
  else return Opaque(hn::Mul(v, vs));
}

// One nibble chunk of row codes (N bytes at p) decoded: its low and high nibbles' vectors, scaled
// by vs (kScale: and va). AVX-512 looks the nibbles up in the table times the group's scale (and
// alpha): the same products as Finish on the looked-up codes, one multiply per group instead of
// one per vector.
template <bool kTier, bool kScale>
HWY_INLINE void NibbleChunk(const std::uint8_t* p, qk::VF table, const TierParams& t, qk::VF vs, qk::VF va, qk::VF& lo, qk::VF& hi) {
#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL
  qk::Nibbles<kTier>(qk::LoadBytes(p), Finish<kScale>(table, vs, va), t, lo, hi);
#else
  qk::Nibbles<kTier>(qk::LoadBytes(p), table, t, lo, hi);
  lo = Finish<kScale>(lo, vs, va), hi = Finish<kScale>(hi, vs, va);
#endif
}

// The groups of row r of q from group g_from on (every path of DecodedRow but its batches),
// decoded to sink as DecodedRow's are. Out of line: the rows of a merge take it for their last
// few groups (or, for the group sizes DecodedRow does not batch, whole), and its many paths
// inlined into the merge's row loop had GCC 12 spill that loop's vectors.
template <bool kTier, bool kScale, class Sink>
HWY_NOINLINE void DecodedRowFrom(const QView& q, const qk::Layout& L, std::size_t r, const TierParams& t, qk::VF table, float alpha,
                                 Sink& sink, std::size_t g_from) {
  const qk::DF df;
  const std::size_t N = hn::Lanes(df);
  const auto va = hn::Set(df, alpha);
  const std::uint8_t* row = q.codes + r * L.rb;
  auto bytes = [&](std::size_t c, qk::VF vs) { return Finish<kScale>(qk::Codes<kTier>(qk::LoadBytes(row + c), t), vs, va); };
  std::size_t g0 = g_from;  // the first group of the per-group loop
#if HWY_TARGET != HWY_SCALAR
  if (L.nnarrow && g_from == 0) {  // narrow groups: vectors of gpv groups, each lane at its group's scale
    const qk::NarrowIx nx = qk::MakeNarrowIx(q);
    auto vec = [&](std::size_t v) {
      return Finish<kScale>(qk::NarrowCodes<kTier>(q, row, v, table, t, nx), qk::NarrowScalesBF16(q, L, r, v, t, nx), va);
    };
    std::size_t v = 0;
    for (; v + kMergeU <= L.nnarrow; v += kMergeU) {  // kMergeU vectors to the sink at a time
      qk::VF dv[kMergeU];
      for (std::size_t u = 0; u < kMergeU; ++u) dv[u] = vec(v + u);
      sink.Vecs(dv, v * N);
    }
    for (; v < L.nnarrow; ++v) sink.Vec(vec(v), v * N);
    g0 = L.nnarrow * L.gpv;
  }
#endif
  // the groups from gs: runs decoded by DecodeSpan, then to the sink (after the loop)
  const std::size_t gs = std::max({g0, L.nfast, L.nhalf}), sg = qk::SpanGroups(q), gend = sg ? gs : L.gpr;
  for (std::size_t g = g0; g < gend; ++g) {
    const std::size_t c0 = g * q.group;
#if HWY_TARGET != HWY_SCALAR
    if (g + 2 <= L.nhalf) {
      // Groups of half a vector's nibble bytes (16 codes on AVX-512, 8 on AVX2), which the
      // layout has no vector path for: two groups' bytes decoded at once, their low and high
      // halves regrouped per group (was the scalar path: about 119 ns per 16 elements, 60x a
      // group of 32, in a bf16 merge on AVX-512).
      qk::VF lo, hi, dv[2];
      qk::Nibbles<kTier>(qk::LoadBytes(row + g * N / 2), table, t, lo, hi);
      dv[0] = Finish<kScale>(hn::ConcatLowerLower(df, hi, lo), hn::Set(df, qk::Scale(q, L, r, g, t)), va);
      dv[1] = Finish<kScale>(hn::ConcatUpperUpper(df, hi, lo), hn::Set(df, qk::Scale(q, L, r, g + 1, t)), va);
      sink.Vecs(dv, c0);
      ++g;
      continue;
    }
#endif
    if (Sink::kPairs && !q.nibble && q.group % (kMergeU * N) == 0 && g < L.nfast) {
      // Byte groups of a multiple of kMergeU vectors to a sink of pairs (the bf16 merge on 32
      // lanes): kMergeU vectors of the group at a time, as DecodedRow's batches of narrower ones.
      const auto vs = hn::Set(df, qk::Scale(q, L, r, g, t));
      for (std::size_t j = 0; j < q.group; j += kMergeU * N) {
        qk::VF dv[kMergeU];
        for (std::size_t v = 0; v < kMergeU; ++v) dv[v] = bytes(c0 + j + v * N, vs);
        sink.Vecs(dv, c0 + j);
      }
      continue;
    }
    const float s = qk::Scale(q, L, r, g, t);
#if HWY_TARGET != HWY_SCALAR
    if (g < L.nhalf) {  // the last of an odd number of nibble groups of N codes
      sink.Vec(Finish<kScale>(qk::HalfNibbles<kTier>(row + g * N / 2, table, t), hn::Set(df, s), va), c0);
      continue;
    }
#endif
    if (g >= L.nfast) {
      const std::size_t n = std::min<std::size_t>(q.group, q.cols - c0);
      for (std::size_t j = 0; j < n; ++j) {
        const float v = static_cast<float>(detail::tiered(detail::stored_code(q, r, c0 + j), t)) * s;
        sink.One(Opaque(kScale ? alpha * v : v), c0 + j);
      }
      continue;
    }
    const auto vs = hn::Set(df, s);
    if (q.nibble) {
      const std::size_t h = q.group / 2;
      const std::uint8_t* p = row + g * h;
      for (std::size_t j = 0; j < h; j += N) {  // the low nibbles' columns, then the high ones'

        qk::VF lo, hi;
        qk::Nibbles<kTier>(qk::LoadBytes(p + j), table, t, lo, hi);
        sink.Vec(Finish<kScale>(lo, vs, va), c0 + j);
      }
      for (std::size_t j = 0; j < h; j += N) {
        qk::VF lo, hi;
        qk::Nibbles<kTier>(qk::LoadBytes(p + j), table, t, lo, hi);
        sink.Vec(Finish<kScale>(hi, vs, va), c0 + h + j);
      }
    } else {
      for (std::size_t j = 0; j < q.group; j += N) sink.Vec(bytes(c0 + j, vs), c0 + j);
    }
  }
  if (gend < L.gpr) {
    HWY_ALIGN float buf[qk::kSpanMax + qk::kSpanPad];
    auto one = [&](float v, std::size_t c) { sink.One(Opaque(kScale ? alpha * v : v), c); };
    for (std::size_t ga = gs; ga < L.gpr; ga += sg) {
      const std::size_t n = qk::DecodeSpan<kTier>(q, L, r, ga, std::min(ga + sg, L.gpr), t, buf), c0 = ga * q.group;
      std::size_t j = 0;
      for (; j < n && (c0 + j) % N; ++j) one(buf[j], c0 + j);  // sink.Vec: from a multiple of N
      for (; j + N <= n; j += N) {
        const qk::VF v = hn::LoadU(df, buf + j);
        sink.Vec(kScale ? Opaque(hn::Mul(va, v)) : v, c0 + j);
      }
      for (; j < n; ++j) one(buf[j], c0 + j);
    }
  }
}

// How DecodedRow batches a row's groups: groups of v vectors' codes, nibbles (nib: v = 2, 4, 8,
// groups of 2 N, 4 N, 8 N codes) or bytes (v = 1, 2, 4, 8); v = 0: no batches.
struct RowBatch {
  bool nib;
  std::size_t v;
};

// Row r of q decoded (alpha == 1: q_decode_rows's bits; else alpha times them, as
// q_decode_rows_scaled) goes to sink.Vec(vector, column) in registers, column runs of Lanes in
// increasing order, and the tails to sink.One(value, column): the f32 delta is never stored.
//
// The row's groups batched as B says go first, the rest to DecodedRowFrom. Nibble groups are
// decoded kMergeU vectors to the sink at a time in column order (a group's low nibbles' columns,
// then its high ones'), each chunk once. Groups wider than 2 N take that batch only into a sink
// of pairs (the bf16 merge): 4-bit 256 x 1024 into bf16 in L2, scratch, best of 4 alternating
// runs, ns per 16 elements: groups of 64 merge 3.34 -> 2.79, unmerge 2.18 -> 1.90; 128 3.01 ->
// 2.68, 1.83 -> 1.75 (before: single vectors, each chunk decoded twice). The f32 merge measured
// slower so (1.46-1.66 -> 2.09-2.17) and, as 256-code groups in batches of 4 vectors, the bf16
// one too; groups of 2 N it does take batched (1.47 against 2.02 ns single). Into a sink of
// single vectors (the f32 merge) a wider group's chunks are decoded once each, its low nibbles'
// vectors then its high ones' to the sink (had been decoded twice, once for each: AVX2, 4-bit
// groups of 32, merge/s2lc/codes_q4_f32_hot 71 -> 66 us, unmerge 79 -> 57, against 0131825,
// medians of 4 alternating runs). Byte codes go to a sink of pairs kMergeU vectors at a time too (bench rows merge/*/codes_*_bf16_hot, best of 6
// alternating runs: 8-bit merge 62 -> 41 us, unmerge 42 -> 35; 5-bit rows in lanes 66 -> 47,
// 50 -> 42), to the f32 merge one vector at a time (batches: 5-20 % slower in scratch, more live
// vectors).
//
// B is a template argument, chosen once per call (MergeRowsEntry): as branches of one loop over
// groups with every other path, their trip counts known only at run time, the batches had GCC 12
// keep the vectors on the stack and divide per group, and the merges grew 1.3-1.5x slower as that
// loop gained paths (bench merge/*/codes_q4_*_hot, codes_q8_*, tinymoe_domain_bf16_hot, against
// 0131825).
template <RowBatch B, bool kTier, bool kScale, class Sink>
HWY_INLINE void DecodedRow(const QView& q, const qk::Layout& L, std::size_t r, const TierParams& t, qk::VF table, float alpha,
                           Sink& sink) {
  std::size_t g = 0;
  if constexpr (B.v != 0) {
    const qk::DF df;
    const std::size_t N = hn::Lanes(df);
    const auto va = hn::Set(df, alpha);
    const std::uint8_t* row = q.codes + r * L.rb;
    auto bytes = [&](std::size_t c, qk::VF vs) { return Finish<kScale>(qk::Codes<kTier>(qk::LoadBytes(row + c), t), vs, va); };
    if constexpr (B.nib && B.v > 2 && !Sink::kPairs) {
      constexpr std::size_t hv = B.v / 2;
      for (; g < L.nfast; ++g) {
        const auto vs = hn::Set(df, qk::Scale(q, L, r, g, t));
        const std::uint8_t* p = row + g * hv * N;
        qk::VF lo[hv], hi[hv];
        for (std::size_t j = 0; j < hv; ++j) NibbleChunk<kTier, kScale>(p + j * N, table, t, vs, va, lo[j], hi[j]);
        for (std::size_t j = 0; j < hv; ++j) sink.Vec(lo[j], g * q.group + j * N);
        for (std::size_t j = 0; j < hv; ++j) sink.Vec(hi[j], g * q.group + (hv + j) * N);
      }
    } else if constexpr (B.nib || Sink::kPairs) {
      constexpr std::size_t gpb = kMergeU / B.v;  // groups per batch
      for (; g + gpb <= L.nfast; g += gpb) {
        qk::VF dv[kMergeU];
        for (std::size_t u = 0; u < gpb; ++u) {
          const auto vs = hn::Set(df, qk::Scale(q, L, r, g + u, t));
          if constexpr (B.nib) {
            constexpr std::size_t hv = B.v / 2;
            const std::uint8_t* p = row + (g + u) * hv * N;
            for (std::size_t j = 0; j < hv; ++j) NibbleChunk<kTier, kScale>(p + j * N, table, t, vs, va, dv[B.v * u + j], dv[B.v * u + hv + j]);
          } else {
            for (std::size_t j = 0; j < B.v; ++j) dv[B.v * u + j] = bytes(((g + u) * B.v + j) * N, vs);
          }
        }
        sink.Vecs(dv, g * q.group);
      }
    } else {
      for (; g < L.nfast; ++g) {
        const auto vs = hn::Set(df, qk::Scale(q, L, r, g, t));
        for (std::size_t j = 0, c = g * q.group; j < B.v; ++j, c += N) sink.Vec(bytes(c, vs), c);
      }
    }
  }
  if (g < L.gpr) {
    Sink rest = sink;  // (a copy: sink's address does not escape, its count stays in a register)
    DecodedRowFrom<kTier, kScale>(q, L, r, t, table, alpha, rest, g);
    sink = rest;
  }
}

// DecodedRow's batches for q.
HWY_INLINE RowBatch MergeBatch(const QView& q) {
  const std::size_t N = hn::Lanes(qk::DF());
  if (q.group % N) return {false, 0};
  const std::size_t v = q.group / N;
  if (q.nibble) return {true, v == 2 || v == 4 || v == 8 ? v : 0};
  return {false, v == 1 || v == 2 || v == 4 || v == 8 ? v : 0};
}

// merge_rows (kUndo false) or unmerge_rows of a row-major q (q_merge_rows_*): rows [r0, r0 + nr)
// into w (rows ldw apart; mask rows ldm bytes apart), the recorded values from vals[k]; returns
// the new k.
template <class Op, bool kUndo, bool kTier, bool kScale, RowBatch B, class M, class V>
HWY_INLINE std::size_t MergeRowsT(const QView& q, std::size_t r0, std::size_t nr, const TierParams& t, float alpha, typename Op::T* w,
                                  std::size_t ldw, M* mask, std::size_t ldm, V* vals, std::size_t k, std::size_t nvals,
                                  const PrefetchRows* pf) {
  const qk::Layout L = qk::MakeLayout(q, hn::Lanes(qk::DF()));
  const qk::VF table = qk::NibbleTable(t);
  for (std::size_t i = 0; i < nr; ++i) {
    if (pf && pf->p && i < pf->rows) {
      const char* p = static_cast<const char*>(pf->p) + i * pf->ld_bytes;
      for (std::size_t o = 0; o < pf->row_bytes; o += 64) {  // (q8k::PrefetchW fails to inline here on GCC 12)
#if defined(__GNUC__) || defined(__clang__)
        __builtin_prefetch(p + o, 1, 3);
#else
        hwy::Prefetch(p + o);
#endif
      }
    }
    if constexpr (kUndo) PrefetchRecord(vals + k, nvals - k);
    RowSink<Op, kUndo, M, V> sink{w + i * ldw, mask + i * ldm, vals, k, nvals};
    DecodedRow<B, kTier, kScale>(q, L, r0 + i, t, table, alpha, sink);
    k = sink.k;
  }
  return k;
}

// q_merge_rows_* (kUndo false) and q_unmerge_rows_*: rows in lanes are unpacked a panel at a
// time to the row-major form first. Returns how many values were recorded / consumed.
template <class Op, bool kUndo, class M, class V>
inline std::size_t MergeRowsEntry(const QView& q, std::size_t r0, std::size_t nr, unsigned tier, float alpha, typename Op::T* w,
                                  std::size_t ldw, M* mask, std::size_t ldm, V* vals, std::size_t nvals, const PrefetchRows* pf) {
  std::size_t k = 0;
  if (q.lanes) {
    q8k::ForPanels(q, r0, nr, [&](const QView& v, std::size_t i0, std::size_t n, std::size_t off) {
      PrefetchRows sub;
      if (pf && pf->p && off < pf->rows) sub = {static_cast<const char*>(pf->p) + off * pf->ld_bytes, pf->rows - off, pf->ld_bytes, pf->row_bytes};
      k += MergeRowsEntry<Op, kUndo>(v, i0, n, tier, alpha, w + off * ldw, ldw, mask + off * ldm, ldm, vals + k, kUndo ? nvals - k : 0, &sub);
    });
    return k;
  }
  const TierParams t = tier_params(q.bits, tier);
  auto run = [&](auto tier_c, auto scale_c) {
    constexpr bool kTier = decltype(tier_c)::value, kScale = decltype(scale_c)::value;
    auto rows = [&]<RowBatch B>() { return MergeRowsT<Op, kUndo, kTier, kScale, B>(q, r0, nr, t, alpha, w, ldw, mask, ldm, vals, 0, nvals, pf); };
    const RowBatch b = MergeBatch(q);
    if (b.nib) {
      if (b.v == 2) return rows.template operator()<RowBatch{true, 2}>();
      if (b.v == 4) return rows.template operator()<RowBatch{true, 4}>();
      if (b.v == 8) return rows.template operator()<RowBatch{true, 8}>();
    } else {
      if (b.v == 1) return rows.template operator()<RowBatch{false, 1}>();
      if (b.v == 2) return rows.template operator()<RowBatch{false, 2}>();
      if (b.v == 4) return rows.template operator()<RowBatch{false, 4}>();
      if (b.v == 8) return rows.template operator()<RowBatch{false, 8}>();
    }
    return rows.template operator()<RowBatch{false, 0}>();
  };
  using yes = std::true_type;
  using no = std::false_type;
  const bool scaled = alpha != 1.0f;
  if (t.shift) return scaled ? run(yes(), yes()) : run(yes(), no());
  return scaled ? run(no(), yes()) : run(no(), no());
}

inline HWY_NOINLINE std::size_t QMergeRowsF32(const QView& q, std::size_t r0, std::size_t nr, unsigned tier, float alpha, float* w,
                                              std::size_t ldw, std::uint8_t* mask, std::size_t ldm, float* bad_val,
                                              const PrefetchRows* pf) {
  return MergeRowsEntry<MergeF32Op, false>(q, r0, nr, tier, alpha, w, ldw, mask, ldm, bad_val, 0, pf);
}
inline HWY_NOINLINE std::size_t QUnmergeRowsF32(const QView& q, std::size_t r0, std::size_t nr, unsigned tier, float alpha, float* w,
                                                std::size_t ldw, const std::uint8_t* mask, std::size_t ldm, const float* vals,
                                                std::size_t nvals, const PrefetchRows* pf) {
  return MergeRowsEntry<MergeF32Op, true>(q, r0, nr, tier, alpha, w, ldw, mask, ldm, vals, nvals, pf);
}
inline HWY_NOINLINE std::size_t QMergeRowsBF16(const QView& q, std::size_t r0, std::size_t nr, unsigned tier, float alpha,
                                               std::uint16_t* w, std::size_t ldw, std::uint8_t* mask, std::size_t ldm,
                                               std::uint16_t* bad_val, const PrefetchRows* pf) {
#if S2LC_BF16_NE
  if (use_avx512_bf16()) return MergeRowsEntry<MergeBF16OpT<true>, false>(q, r0, nr, tier, alpha, w, ldw, mask, ldm, bad_val, 0, pf);
#endif
  return MergeRowsEntry<MergeBF16OpT<false>, false>(q, r0, nr, tier, alpha, w, ldw, mask, ldm, bad_val, 0, pf);
}
inline HWY_NOINLINE std::size_t QUnmergeRowsBF16(const QView& q, std::size_t r0, std::size_t nr, unsigned tier, float alpha,
                                                 std::uint16_t* w, std::size_t ldw, const std::uint8_t* mask, std::size_t ldm,
                                                 const std::uint16_t* vals, std::size_t nvals, const PrefetchRows* pf) {
#if S2LC_BF16_NE
  if (use_avx512_bf16()) return MergeRowsEntry<MergeBF16OpT<true>, true>(q, r0, nr, tier, alpha, w, ldw, mask, ldm, vals, nvals, pf);
#endif
  return MergeRowsEntry<MergeBF16OpT<false>, true>(q, r0, nr, tier, alpha, w, ldw, mask, ldm, vals, nvals, pf);
}

}  // namespace s2lc::kernels::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // per-target include guard
