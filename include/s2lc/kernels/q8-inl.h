// s2lc — per-target bodies of the int8-activation products (Highway): activations quantized per
// group to int8, integer dot products of the stored codes with them (AVX-512 VNNI vpdpbusd;
// AVX-512BW / AVX2 / SSSE3 pmaddubsw; portable elsewhere), one f32 scale per group. Included by
// qgemm-inl.h; use <s2lc/kernels/qgemm.hpp>. The buffer layout is s2lc::kernels::Q8Acts.
//
// Exactness: every integer partial is exact on every target (|lane| < 2^17), so the result is
//   y[i] += alpha * sum_g sw[i, g] * sx[g] * sum_{j in g} code[i, j] * xq[j]
// up to f32 summation order, whatever the target. The quantization itself (q8_quantize) is
// bit-identical on every target: xq = round_half_even(x * (127 / amax_g)), sx = amax_g / 127
// (under the default rounding mode, round to nearest, which the vector and scalar paths both use).

#if defined(S2LC_KERNELS_Q8_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef S2LC_KERNELS_Q8_INL_H_
#undef S2LC_KERNELS_Q8_INL_H_
#else
#define S2LC_KERNELS_Q8_INL_H_
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

#include "s2lc/dtype.hpp"
#include "s2lc/kernels/convert-inl.h"
#include "s2lc/kernels/qview.hpp"

HWY_BEFORE_NAMESPACE();
namespace s2lc::kernels::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

namespace q8k {

// (Before the avx512vnni region below: qgemm-inl.h's GEMM tiles use it too.)
using DF = hn::ScalableTag<float>;
using VF = hn::Vec<DF>;

// out[0..3] = the lane sums of a, b, c, d (one transposing pass instead of four reductions).
#if HWY_TARGET != HWY_SCALAR && HWY_HAVE_INTEGER64
template <class D>
HWY_INLINE void StoreBlockSums(D d, hn::Vec<D> v, float* out) {
  if constexpr (hn::MaxLanes(D()) <= 4) {
    hn::StoreU(v, d, out);
  } else {
    const hn::Half<D> dh;
    StoreBlockSums(dh, hn::Add(hn::LowerHalf(dh, v), hn::UpperHalf(dh, v)), out);
  }
}
#endif
HWY_INLINE void Sum4(VF a, VF b, VF c, VF d, float* out) {
  const DF df;
#if HWY_TARGET != HWY_SCALAR && HWY_HAVE_INTEGER64
  if constexpr (hn::MaxLanes(DF()) >= 4) {
    const hn::Repartition<std::uint64_t, DF> d64;
    // per 128-bit block: ab = [a0+a2, b0+b2, a1+a3, b1+b3], cd likewise
    const VF ab = hn::Add(hn::InterleaveLower(df, a, b), hn::InterleaveUpper(df, a, b));
    const VF cd = hn::Add(hn::InterleaveLower(df, c, d), hn::InterleaveUpper(df, c, d));
    const auto ab64 = hn::BitCast(d64, ab), cd64 = hn::BitCast(d64, cd);
    const VF abcd = hn::Add(hn::BitCast(df, hn::InterleaveLower(d64, ab64, cd64)), hn::BitCast(df, hn::InterleaveUpper(d64, ab64, cd64)));
    StoreBlockSums(df, abcd, out);
    return;
  }
#endif
  out[0] = hn::GetLane(hn::SumOfLanes(df, a));
  out[1] = hn::GetLane(hn::SumOfLanes(df, b));
  out[2] = hn::GetLane(hn::SumOfLanes(df, c));
  out[3] = hn::GetLane(hn::SumOfLanes(df, d));
}

#if HWY_TARGET != HWY_SCALAR && HWY_HAVE_INTEGER64
// Lanes of a vector of rows: per 128-bit block k, [a, b, c, d] summed over block k's lanes.
HWY_INLINE VF Block4(VF a, VF b, VF c, VF d) {
  const DF df;
  const hn::Repartition<std::uint64_t, DF> d64;
  const VF ab = hn::Add(hn::InterleaveLower(df, a, b), hn::InterleaveUpper(df, a, b));
  const VF cd = hn::Add(hn::InterleaveLower(df, c, d), hn::InterleaveUpper(df, c, d));
  const auto ab64 = hn::BitCast(d64, ab), cd64 = hn::BitCast(d64, cd);
  return hn::Add(hn::BitCast(df, hn::InterleaveLower(d64, ab64, cd64)), hn::BitCast(df, hn::InterleaveUpper(d64, ab64, cd64)));
}

// Whole vectors of 4, 8 or 16 f32 lanes: RowsOne's reduction applies.
inline constexpr bool kRowsVec = !HWY_HAVE_SCALABLE && hn::MaxLanes(DF()) >= 4 && hn::MaxLanes(DF()) <= 16;

// s[q] = Block4 of rows 4q..4q+3 (q < lanes / 4) -> lane i = the whole sum of row i.
HWY_INLINE VF SumBlocks(const VF* s) {
  const DF df;
  constexpr std::size_t kN = hn::MaxLanes(DF());
  if constexpr (kN == 4) {
    return s[0];
  } else if constexpr (kN == 8) {
    return hn::Add(hn::ConcatLowerLower(df, s[1], s[0]), hn::ConcatUpperUpper(df, s[1], s[0]));
  } else {
    // halves: u = [s0 blocks 0+2, 1+3 | s2 ...], w = [s1 ... | s3 ...]; then adjacent blocks
    const VF u = hn::Add(hn::ConcatLowerLower(df, s[2], s[0]), hn::ConcatUpperUpper(df, s[2], s[0]));
    const VF w = hn::Add(hn::ConcatLowerLower(df, s[3], s[1]), hn::ConcatUpperUpper(df, s[3], s[1]));
    return hn::Add(hn::OddEvenBlocks(hn::SwapAdjacentBlocks(w), u), hn::OddEvenBlocks(w, hn::SwapAdjacentBlocks(u)));
  }
}
#else
inline constexpr bool kRowsVec = false;
#endif

// The kernels prefetch kPrefetchAhead (cpu.hpp) bytes ahead of the current chunk: a cold block
// is read from DRAM, and its rows are short (a 256-column 4-bit row is 128 bytes), so the
// hardware prefetcher alone lags behind.
// Rows up to this many bytes are prefetched whole, in order, rather than chunk by chunk.
inline constexpr std::size_t kShortRow = 256;


#if HWY_TARGET != HWY_SCALAR
// The kN x kN transpose of v (kN = 4, 8 or 16 lanes) in registers: unpacks inside 128-bit blocks,
// then blocks exchanged; u[k][c] = column 4k + c of v (lane i = v[i]'s lane 4k + c).
template <class D, std::size_t kN = hn::MaxLanes(D())>
HWY_INLINE void TransposeBlocks(const hn::Vec<D> (&v)[kN], hn::Vec<D> (&u)[kN / 4][4]) {
  using V = hn::Vec<D>;
  const D df;
  const hn::Repartition<std::uint64_t, D> d64;
  const std::size_t N = kN;
  // Per 128-bit block, rows 4q..4q+3 -> u[q][c]: block k holds column 4k + c of those rows.
  for (std::size_t q = 0; q < N / 4; ++q) {
    const V t0 = hn::InterleaveLower(df, v[4 * q], v[4 * q + 1]), t1 = hn::InterleaveUpper(df, v[4 * q], v[4 * q + 1]);
    const V t2 = hn::InterleaveLower(df, v[4 * q + 2], v[4 * q + 3]), t3 = hn::InterleaveUpper(df, v[4 * q + 2], v[4 * q + 3]);
    const auto a0 = hn::BitCast(d64, t0), a1 = hn::BitCast(d64, t1), a2 = hn::BitCast(d64, t2), a3 = hn::BitCast(d64, t3);
    u[q][0] = hn::BitCast(df, hn::InterleaveLower(d64, a0, a2));
    u[q][1] = hn::BitCast(df, hn::InterleaveUpper(d64, a0, a2));
    u[q][2] = hn::BitCast(df, hn::InterleaveLower(d64, a1, a3));
    u[q][3] = hn::BitCast(df, hn::InterleaveUpper(d64, a1, a3));
  }
  // Transpose the blocks: u[q][c] block k -> column 4k + c, rows 4q..4q+3 of the result.
  for (std::size_t c = 0; c < 4; ++c) {
    if constexpr (kN == 16) {
      for (std::size_t q = 0; q < 2; ++q) {
        const V lo = u[q][c], hi = u[q + 2][c];
        u[q][c] = hn::ConcatLowerLower(df, hi, lo), u[q + 2][c] = hn::ConcatUpperUpper(df, hi, lo);
      }
    }
    if constexpr (kN >= 8) {
      for (std::size_t q = 0; q < N / 4; q += 2) {
        const V a = u[q][c], b = u[q + 1][c];
        u[q][c] = hn::OddEvenBlocks(hn::SwapAdjacentBlocks(b), a), u[q + 1][c] = hn::OddEvenBlocks(b, hn::SwapAdjacentBlocks(a));
      }
    }
  }
}
#endif

// Rows in lanes (QView::lanes; the kernels are below and in qgemm-inl.h): whether this target
// has them (else panels are unpacked to the row-major form, ForPanels), and their stores.
inline constexpr bool kLanesVec =
    HWY_TARGET != HWY_SCALAR && !HWY_HAVE_SCALABLE && hn::MaxLanes(DF()) >= 4 && hn::MaxLanes(DF()) <= QView::kLaneRows;

// unpack_lanes (qview.hpp), the codes moved NL x NL quads at a time through TransposeBlocks.
HWY_INLINE QView UnpackPanel(const QView& q, std::size_t p, std::uint8_t* codes, std::uint16_t* scales) {
#if HWY_TARGET != HWY_SCALAR
  if constexpr (kLanesVec) {
    const DF df;
    const hn::RebindToSigned<DF> di;
    constexpr std::size_t kN = hn::MaxLanes(DF());
    const QView v = unpack_lanes_view(q, p, codes, scales);
    const std::size_t rb = q.row_bytes(), nq = q.lanes_quads(), nqr = q.groups_per_row() * nq;
    const auto flip = hn::Set(di, static_cast<std::int32_t>(0x01010101u * q.lanes_flip()));
    const std::size_t full = nqr / kN * kN, rec = q.lanes_record();
    for (std::size_t o = 0; o < q.lanes_panel(); o += 64) hwy::Prefetch(q.lanes_at(p, 0) + kPrefetchAhead + o);  // panels ahead
    for (std::size_t h = 0; h * kN < v.rows; ++h) {
      const std::size_t rows = std::min(kN, v.rows - h * kN);
      const std::uint8_t* r = q.lanes_at(p, 0) + 4 * kN * h;
      for (std::size_t m0 = 0, k = 0; m0 < full; m0 += kN) {
        VF in[kN];
        for (std::size_t j = 0; j < kN; ++j) {  // quad m0 + j: quad k of the group at r
          in[j] = hn::BitCast(df, hn::LoadU(di, reinterpret_cast<const std::int32_t*>(r + 64 * k)));
          if (++k == nq) k = 0, r += rec;
        }
        VF u[kN / 4][4];
        TransposeBlocks<DF>(in, u);
        for (std::size_t i = 0; i < rows; ++i)
          hn::StoreU(hn::Xor(hn::BitCast(di, u[i / 4][i % 4]), flip), di, reinterpret_cast<std::int32_t*>(codes + (h * kN + i) * rb + 4 * m0));
      }
      if (full < nqr) unpack_lanes_quads(q, p, full, h * kN, h * kN + rows, codes);
    }
    return v;
  }
#endif
  return unpack_lanes(q, p, codes, scales);
}

// Runs f(v, i0, n, off) over rows [r0, r0 + nr) of a rows-in-lanes q, unpacked to the row-major
// form (UnpackPanel) as many whole panels at a time as kUnpackBytes of codes hold (at least one;
// each call of f has a per-call cost): v views those panels' rows, [i0, i0 + n) is the part of the
// range in them, off that part's first row minus r0. For the kernels without a rows-in-lanes body.
inline constexpr std::size_t kUnpackBytes = 32768;
template <class F>
inline void ForPanels(const QView& q, std::size_t r0, std::size_t nr, F&& f) {
  constexpr std::size_t R = QView::kLaneRows;
  static_assert(kUnpackBytes >= R * QView::kLanesMaxCols);  // a panel of the byte container
  HWY_ALIGN std::uint8_t codes[kUnpackBytes];
  // scales: one per group of >= 8 codes (>= 4 code bytes)
  std::uint16_t scales[kUnpackBytes / 4];
  const std::size_t rb = q.row_bytes(), gpr = q.groups_per_row(), per = kUnpackBytes / (R * rb);
  for (std::size_t r = r0; r < r0 + nr;) {
    const std::size_t p0 = r / R, np = std::min(per, (r0 + nr - 1) / R + 1 - p0);
    QView v = UnpackPanel(q, p0, codes, scales);
    for (std::size_t j = 1; j < np; ++j) v.rows += UnpackPanel(q, p0 + j, codes + j * R * rb, scales + j * R * gpr).rows;
    const std::size_t i0 = r - p0 * R, n = std::min(p0 * R + v.rows, r0 + nr) - r;
    f(v, i0, n, r - r0);
    r += n;
  }
}

// y[t * ldy + i] += alpha * ya[t] lane (i + i0 - off) for the rows of [i0, i0 + n) (of a vector of NL).
template <std::size_t T>
HWY_INLINE void LanesStore(const VF (&ya)[T], std::size_t i0, std::size_t n, float alpha, float* y, std::size_t ldy) {
  const DF df;
  const std::size_t NL = hn::Lanes(df);
  for (std::size_t t = 0; t < T; ++t) {
    float* yt = y + t * ldy;
    if (i0 == 0 && n == NL) {
      hn::StoreU(hn::MulAdd(ya[t], hn::Set(df, alpha), hn::LoadU(df, yt)), df, yt);
      continue;
    }
    // A partial panel: the same fused multiply-add as a whole one, on its n rows only (before,
    // a scalar loop over the lanes stored to the stack: 1.9 % of the 8-token tinymoe layer,
    // whose right factors of rank 46-47, 78-79 and 85-90 end in one from 2 tokens on, and every
    // rank but a multiple of 16 at one token).
#if HWY_TARGET == HWY_AVX2 || HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL
    if (i0 == 0) {  // masked moves leave the other lanes' memory alone (not so on SSE4 in Highway 1.0)
      const auto m = hn::FirstN(df, n);
      hn::BlendedStore(hn::MulAdd(ya[t], hn::Set(df, alpha), hn::MaskedLoad(m, df, yt)), m, df, yt);
      continue;
    }
#endif
    HWY_ALIGN float v[hn::MaxLanes(DF())] = {};
    std::memcpy(v + i0, yt, n * sizeof(float));
    hn::Store(hn::MulAdd(ya[t], hn::Set(df, alpha), hn::Load(df, v)), df, v);
    std::memcpy(yt, v + i0, n * sizeof(float));
  }
}

}  // namespace q8k
}  // namespace s2lc::kernels::HWY_NAMESPACE

#if HWY_TARGET == HWY_AVX3_DL
// Highway 1.0.3's AVX3_DL target string names avxvnni but not avx512vnni, which vpdpbusd on zmm
// needs; the target is only chosen on CPUs that have it.
#pragma GCC push_options
#pragma GCC target("avx512vnni")
#endif
namespace s2lc::kernels::HWY_NAMESPACE {
namespace q8k {

using DI = hn::RebindToSigned<DF>;
using DU8 = hn::ScalableTag<std::uint8_t>;  // as many bytes as DF has (HWY_SCALAR: one)
using DI8 = hn::ScalableTag<std::int8_t>;
using DU16 = hn::ScalableTag<std::uint16_t>;
using VI = hn::Vec<DI>;
using VU8 = hn::Vec<DU8>;
using VI8 = hn::Vec<DI8>;
using IdxF = decltype(hn::SetTableIndices(DF(), static_cast<const std::int32_t*>(nullptr)));

// Whether this target's int8 kernels have a vpdpbusd form beside pmaddubsw + pmaddwd, chosen per
// call (kDp below): AVX2 with AVX-VNNI, AVX3 with AVX512_VNNI (kernels::use_vnni). AVX3_DL always
// has it; other targets never.
inline constexpr bool kDpVariant = HWY_TARGET == HWY_AVX2 || HWY_TARGET == HWY_AVX3;
HWY_INLINE bool UseDp() {
#if HWY_TARGET == HWY_AVX2 || HWY_TARGET == HWY_AVX3
  return use_vnni(HWY_TARGET == HWY_AVX3);
#else
  return false;
#endif
}
// f(std::bool_constant<UseDp()>{}): the kDp form is compiled on kDpVariant targets only (a
// discarded `if constexpr` branch outside a template would still instantiate it everywhere).
template <class F>
HWY_INLINE decltype(auto) WithDp(F&& f) {
  if constexpr (kDpVariant) {
    if (UseDp()) return f(std::true_type{});
  }
  return f(std::false_type{});
}

// acc[i] += sum_{j < 4} a[4i + j] * b[4i + j] with a unsigned bytes <= 128 and b in [-127, 127]:
// every pair sum fits int16, so pmaddubsw never saturates and all targets agree exactly. kDp
// (kDpVariant targets, where UseDp()): one vpdpbusd instead of pmaddubsw, pmaddwd and an add,
// the same exact sums, in inline assembly (these targets' compiler flags have no VNNI). With
// vpdpbusd (AVX3_DL, or kDp) a may also be in [0, 255]: it has no int16 pair sums.
template <bool kDp = false>
HWY_INLINE VI DotU8I8(VI acc, VU8 a, VI8 b) {
#if HWY_TARGET == HWY_AVX3_DL && HWY_COMPILER_CLANG
  // clang ignores the region's `#pragma GCC target` (below) and refuses the intrinsic, so the
  // instruction is written out (AT&T | Intel operand order); tests/CMakeLists.txt checks clang
  __m512i r = acc.raw;
  asm("vpdpbusd {%2, %1, %0|%0, %1, %2}" : "+v"(r) : "v"(a.raw), "v"(b.raw));
  return VI{r};
#elif HWY_TARGET == HWY_AVX3_DL
  return VI{_mm512_dpbusd_epi32(acc.raw, a.raw, b.raw)};
#elif HWY_TARGET == HWY_AVX3
  if constexpr (kDp) {
    __m512i r = acc.raw;
    asm("vpdpbusd {%2, %1, %0|%0, %1, %2}" : "+v"(r) : "v"(a.raw), "v"(b.raw));
    return VI{r};
  }
  return hn::Add(acc, VI{_mm512_madd_epi16(_mm512_maddubs_epi16(a.raw, b.raw), _mm512_set1_epi16(1))});
#elif HWY_TARGET == HWY_AVX2
  if constexpr (kDp) {  // AVX-VNNI: the VEX form (ymm0-15)
    __m256i r = acc.raw;
    asm("%{vex%} vpdpbusd {%2, %1, %0|%0, %1, %2}" : "+x"(r) : "x"(a.raw), "x"(b.raw));
    return VI{r};
  }
  return hn::Add(acc, VI{_mm256_madd_epi16(_mm256_maddubs_epi16(a.raw, b.raw), _mm256_set1_epi16(1))});
#elif HWY_TARGET == HWY_SSE4 || HWY_TARGET == HWY_SSSE3
  return hn::Add(acc, VI{_mm_madd_epi16(_mm_maddubs_epi16(a.raw, b.raw), _mm_set1_epi16(1))});
#else
  const DU8 du8;
  const DI8 di8;
  const DI di;
  HWY_ALIGN std::uint8_t av[hn::MaxLanes(du8)];
  HWY_ALIGN std::int8_t bv[hn::MaxLanes(di8)];
  HWY_ALIGN std::int32_t r[hn::MaxLanes(di)];
  if (hn::MaxLanes(du8) < 4 * hn::MaxLanes(di)) return acc;  // HWY_SCALAR: never called (no vector body)
  hn::Store(a, du8, av);
  hn::Store(b, di8, bv);
  for (std::size_t i = 0; i < hn::Lanes(di); ++i) {
    std::int32_t s = 0;
    for (std::size_t j = 0; j < 4; ++j) s += static_cast<std::int32_t>(av[4 * i + j]) * bv[4 * i + j];
    r[i] = s;
  }
  return hn::Add(acc, hn::Load(di, r));
#endif
}

// Per-call layout of the codes seen by the vector body: bytes per group (gb), lanes per group,
// and the bytes of each row the vector chunks cover (whole groups only).
struct Layout {
  std::size_t gpr, rb, rbp, gb, full, vend;
  bool bcast;  // a group spans whole chunks: one scale per chunk
};

HWY_INLINE Layout MakeLayout(const QView& q) {
  const std::size_t N8 = hn::Lanes(DU8());
  Layout l;
  l.gpr = q.groups_per_row();
  l.rb = q.row_bytes();
  l.rbp = Q8Acts::padded(l.rb);
  l.gb = q.nibble ? q.group / 2 : q.group;
  l.full = q.cols / q.group;
  l.bcast = l.gb % N8 == 0;
  // (HWY_SCALAR has one lane of every type: no byte vectors to pair with i32 lanes.)
  const bool ok = N8 == 4 * hn::Lanes(DI()) && l.gb % 4 == 0 && (l.bcast || N8 % l.gb == 0);
  l.vend = ok ? (l.full * l.gb) / N8 * N8 : 0;
  return l;
}

// The quantized activation paired with column c of a row (inverse of the code packing).
HWY_INLINE int XqAt(const QView& q, const Layout& L, const std::int8_t* lo, const std::int8_t* hi, std::size_t c) {
  if (!q.nibble) return lo[c];
  const std::size_t g = c / q.group, j = c % q.group;
  const std::size_t n = std::min<std::size_t>(q.group, q.cols - g * q.group), h = (n + 1) / 2;
  return j < h ? lo[g * L.gb + j] : hi[g * L.gb + j - h];
}

// Scalar tail of row r: groups [g0, gpr), exact integer sums, one f32 product per group.
// Not auto-vectorized with GCC: GCC 12.2 turns this int8 x int8 sum into vpdpbusd (unsigned x
// signed) where AVX-VNNI is enabled, as in the AVX3_DL region, and gets negative codes wrong
// (tests/kernels/q8.cpp's 8-bit cases with a tail caught it; plain C++ reproduces it at -O2
// -march=native on this CPU).
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("no-tree-vectorize")))
#endif
inline HWY_NOINLINE float TailRow(const QView& q, const Layout& L, std::size_t r, std::size_t g0, const std::uint8_t* act) {
  const auto* lo = reinterpret_cast<const std::int8_t*>(act);
  const auto* hi = lo + L.rbp;
  const float* sx = reinterpret_cast<const float*>(act + 4 * L.rbp);
  float s = 0.0f;
  const std::uint8_t* row = q.codes + r * L.rb;
  for (std::size_t g = g0; g < L.gpr; ++g) {
    const std::size_t c0 = g * q.group, n = std::min<std::size_t>(q.group, q.cols - c0);
    std::int32_t acc = 0;
    if (q.lanes) {
      for (std::size_t j = 0; j < n; ++j) acc += detail::stored_code(q, r, c0 + j) * XqAt(q, L, lo, hi, c0 + j);
    } else if (!q.nibble) {  // straight over the bytes (stored_code per element took ~10x as long)
      const auto* c = reinterpret_cast<const std::int8_t*>(row + c0);
      for (std::size_t j = 0; j < n; ++j) acc += c[j] * lo[c0 + j];
    } else {  // h bytes: code j < h in byte j's low nibble (x in lo), code h + j in its high one (x in hi)
      const std::size_t h = (n + 1) / 2, o = g * L.gb;
      const auto* c = reinterpret_cast<const std::int8_t*>(row + o);
      for (std::size_t j = 0; j < h; ++j) acc += detail::low_nibble(c[j]) * lo[o + j];
      for (std::size_t j = 0; j < n - h; ++j) acc += detail::high_nibble(c[j]) * hi[o + j];
    }
    s += static_cast<float>(acc) * sx[g] * s2lc::bf16_to_f32(q.scale_bits(r, g));
  }
  return s;
}

// One whole group of n values (a multiple of twice the f32 lanes) quantized exactly as the
// scalar loop of Q8Quantize does (same products, round half to even, same clamps), into lo (and,
// nibble container, its second half into hi), its scale into *sx.
HWY_INLINE void QuantizeGroup(const float* x, std::size_t n, bool nibble, std::int8_t* lo, std::int8_t* hi, float* sx) {
  const DF df;
  const DI di;
  const hn::Rebind<std::int8_t, DF> d8;
  const std::size_t N = hn::Lanes(df);
  // |x| as integers: ordered as the floats, and inf / NaN (exponent all ones) above every finite
  // value, so one integer max finds the group's amax and whether it is finite
  auto vmax = hn::Zero(di);
  for (std::size_t j = 0; j < n; j += N) vmax = hn::Max(vmax, hn::BitCast(di, hn::Abs(hn::LoadU(df, x + j))));
  const std::int32_t bits = hn::GetLane(hn::MaxOfLanes(di, vmax));
  const bool ok = bits <= 0x7F7FFFFF;
  const float amax = ok ? std::bit_cast<float>(bits) : 0.0f;
  const bool tiny = amax < 1e-30f;
  *sx = !ok ? std::nanf("") : tiny ? 0.0f : amax / 127.0f;
  if (!ok || tiny) return;  // codes stay zero (the caller cleared the buffer)
  // Rounding by adding 1.5 * 2^23: the sum's bits are those of 1.5 * 2^23 plus round_half_even(v),
  // so one integer subtraction gives the code: the same as rounding and converting, without the
  // conversion's overflow fix-ups (v is already clamped; the clamp between the product and the
  // sum also keeps them from fusing into one FMA). (Highway 1.0.3's TruncateTo to bytes is wrong
  // on AVX3_DL, so the codes go through the saturating DemoteTo, which never saturates here.)
  const auto inv = hn::Set(df, 127.0f / amax), lim = hn::Set(df, 127.0f), nlim = hn::Set(df, -127.0f);
  const auto magic = hn::Set(df, 12582912.0f);
  const auto magic_bits = hn::Set(di, 0x4B400000);
  for (std::size_t j = 0; j < n; j += N) {
    const auto v = hn::Min(hn::Max(hn::Mul(hn::LoadU(df, x + j), inv), nlim), lim);
    const auto q = hn::DemoteTo(d8, hn::Sub(hn::BitCast(di, hn::Add(v, magic)), magic_bits));
    if (!nibble) hn::StoreU(q, d8, lo + j);
    else if (j < n / 2) hn::StoreU(q, d8, lo + j);
    else hn::StoreU(q, d8, hi + j - n / 2);
  }
}

// The scales the kernel multiplies by are f32: Q8GemvNT converts them per panel of rows and
// column segment into a stack buffer (kScaleBuf floats), so the row loop only loads them.
inline constexpr std::size_t kScaleBuf = 4096;

// Columns [g0 * gb, g1 * gb) of the vector body, as a panel's work description.
struct Span {
  std::size_t g0, g1;      // groups
  const float* sw;         // scales of the panel's first row at group g0; row stride lds
  std::size_t lds;
  bool tail;               // also the scalar groups [gvec, gpr) (there are some)
};

// acc[i][t] = lane partials of row (r0 + i) . x_t over span sp, for R rows and T tokens. kNib:
// nibble container; kBcast: a group spans whole chunks (else a chunk holds whole groups). With
// several tokens each chunk of the R rows is decoded once for all of them; with one, each row is
// decoded and multiplied at once (nothing decoded is held), so a whole vector of rows fits the
// registers and the activations are loaded once per chunk for all of them.
template <std::size_t R, std::size_t T, bool kNib, bool kBcast, bool kDp>
HWY_INLINE void RowsAcc(const QView& q, const Layout& L, const IdxF& rep, const Span& sp, std::size_t r0, const float* sw0,
                        const std::uint8_t* acts, std::size_t abytes, VF (&acc)[R][T]) {
  const DF df;
  for (std::size_t i = 0; i < R; ++i)
    for (std::size_t t = 0; t < T; ++t) acc[i][t] = hn::Zero(df);
#if HWY_TARGET != HWY_SCALAR  // (one lane of every type: no bytes to pair with i32 lanes; vend is 0)
  const DI di;
  const DU8 du8;
  const DI8 di8;
  const std::size_t N8 = hn::Lanes(du8);
  const std::size_t gpc = kBcast ? 1 : N8 / L.gb;   // groups per chunk
  const std::size_t cpg = kBcast ? L.gb / N8 : 1;   // chunks per group
  const auto k88 = hn::Set(du8, 0x88), k0f = hn::Set(du8, 0x0F);
  const std::uint8_t* const base = q.codes + r0 * L.rb;
  const std::size_t rb = L.rb, lds = sp.lds;
  // Row i's codes of the chunk at off, prefetched ahead (rows are contiguous: the next rows), as
  // the two byte vectors paired with the activations: nibbles c (two's complement) ^ 8 = c + 8 in
  // [0, 15]; bytes |c| (<= 128) and c (whose sign goes onto x). Short rows (a block's, <= 256
  // bytes) are prefetched whole at their first chunk, so the prefetches ascend through memory;
  // issued chunk by chunk, R rows at a time, they jumped back a row's length every chunk, and a
  // cold low-rank residual ran 10 % slower (bench/RESULTS.md).
  const std::size_t off0 = sp.g0 * L.gb, span = (sp.g1 - sp.g0) * L.gb;
  const bool short_rows = rb <= kShortRow;
  auto decode = [&](std::size_t i, std::size_t off, VU8& a0, VU8& a1) {
    if (!short_rows) hwy::Prefetch(base + i * rb + off + kPrefetchAhead);
    else if (off == off0)
      for (std::size_t o = 0; o < span; o += 64) hwy::Prefetch(base + i * rb + off0 + o + kPrefetchAhead);
    const VU8 b = hn::LoadU(du8, base + i * rb + off);
    if constexpr (kNib) {
      const VU8 u = hn::Xor(b, k88);
      a0 = hn::And(u, k0f), a1 = hn::And(hn::BitCast(du8, hn::ShiftRight<4>(hn::BitCast(DU16(), u))), k0f);
    } else {
      a0 = hn::BitCast(du8, hn::Abs(hn::BitCast(di8, b))), a1 = b;
    }
  };
  // The integer partial of a decoded chunk with token activations x0 (x1: high nibbles; ncorr: -8 sum x).
  auto dot = [&](VU8 a0, VU8 a1, VI8 x0, VI8 x1, VI ncorr) {
    if constexpr (kNib) {
      return DotU8I8<kDp>(DotU8I8<kDp>(ncorr, a0, x0), a1, x1);
    } else {
      (void)x1, (void)ncorr;
      return DotU8I8<kDp>(hn::Zero(di), a0, hn::IfThenElse(hn::Lt(hn::BitCast(di8, a1), hn::Zero(di8)), hn::Neg(x0), x0));
    }
  };
  auto scale = [&](std::size_t i, std::size_t gl) {  // row i's group scales over the lanes
    return kBcast ? hn::Set(df, sw0[i * lds + gl]) : hn::TableLookupLanes(hn::LoadU(df, sw0 + i * lds + gl), rep);
  };
  std::size_t off = off0;
  for (std::size_t gl = 0; gl < sp.g1 - sp.g0; gl += gpc) {
    VF sw[T == 1 ? 1 : R];
    if constexpr (T > 1)
      for (std::size_t i = 0; i < R; ++i) sw[i] = scale(i, gl);
    for (std::size_t c = 0; c < cpg; ++c, off += N8) {
      VU8 a0[T == 1 ? 1 : R], a1[T == 1 ? 1 : R];
      if constexpr (T > 1)
        for (std::size_t i = 0; i < R; ++i) decode(i, off, a0[i], a1[i]);
      for (std::size_t t = 0; t < T; ++t) {
        const std::uint8_t* act = acts + t * abytes;
        const VI8 x0 = hn::LoadU(di8, reinterpret_cast<const std::int8_t*>(act + off));
        const VF sx = hn::LoadU(df, reinterpret_cast<const float*>(act + 2 * L.rbp) + off / 4);
        const VI8 x1 = kNib ? hn::LoadU(di8, reinterpret_cast<const std::int8_t*>(act + L.rbp + off)) : x0;
        const VI ncorr = kNib ? hn::Neg(hn::LoadU(di, reinterpret_cast<const std::int32_t*>(act + 3 * L.rbp) + off / 4)) : hn::Zero(di);
        for (std::size_t i = 0; i < R; ++i) {
          if constexpr (T == 1) {
            decode(i, off, a0[0], a1[0]);
            const VI d = dot(a0[0], a1[0], x0, x1, ncorr);
            acc[i][0] = hn::MulAdd(hn::Mul(hn::ConvertTo(df, d), sx), scale(i, gl), acc[i][0]);
          } else {
            acc[i][t] = hn::MulAdd(hn::Mul(hn::ConvertTo(df, dot(a0[i], a1[i], x0, x1, ncorr)), sx), sw[i], acc[i][t]);
          }
        }
      }
    }
  }
#else
  (void)q, (void)L, (void)rep, (void)sp, (void)r0, (void)sw0, (void)acts, (void)abytes;
#endif
}

// y[t, i] += alpha * row (r0 + i) . x_t over span sp, for R rows and T tokens.
template <std::size_t R, std::size_t T, bool kNib, bool kBcast, bool kDp>
HWY_INLINE void Rows(const QView& q, const Layout& L, const IdxF& rep, const Span& sp, std::size_t r0, const float* sw0,
                     const std::uint8_t* acts, std::size_t abytes, float alpha, float* y, std::size_t ldy) {
  const DF df;
  VF acc[R][T];
  RowsAcc<R, T, kNib, kBcast, kDp>(q, L, rep, sp, r0, sw0, acts, abytes, acc);
  const std::size_t gt = L.vend / L.gb;
  float sums[R][T];  // lane sums, four at a time where a tile has four tokens
  if constexpr (T == 4) {
    for (std::size_t i = 0; i < R; ++i) Sum4(acc[i][0], acc[i][1], acc[i][2], acc[i][3], sums[i]);
  } else {
    for (std::size_t i = 0; i < R; ++i)
      for (std::size_t t = 0; t < T; ++t) sums[i][t] = hn::GetLane(hn::SumOfLanes(df, acc[i][t]));
  }
  for (std::size_t t = 0; t < T; ++t)
    for (std::size_t i = 0; i < R; ++i)
      y[t * ldy + i] += alpha * (sp.tail ? sums[i][t] + TailRow(q, L, r0 + i, gt, acts + t * abytes) : sums[i][t]);
}

// y[i] += alpha * row (r0 + i) . x for R rows and one token. R = the f32 lanes (4, 8 or 16): the
// rows' lane partials are reduced together in registers (Block4, then SumBlocks) and y is updated
// a vector at a time (summing each row on its own had cost as much as a 256-column 4-bit row's
// dot product); R = 4, 2, 1: the rows left over.
template <std::size_t R, bool kNib, bool kBcast, bool kDp>
HWY_INLINE void RowsOne(const QView& q, const Layout& L, const IdxF& rep, const Span& sp, std::size_t r0, const float* sw0,
                        const std::uint8_t* act, float alpha, float* y) {
  const DF df;
  VF acc[R][1];
  RowsAcc<R, 1, kNib, kBcast, kDp>(q, L, rep, sp, r0, sw0, act, 0, acc);
  const std::size_t gt = L.vend / L.gb;
  if constexpr (kRowsVec && R == hn::MaxLanes(DF())) {
    VF s[R / 4];
    for (std::size_t j = 0; j < R / 4; ++j) s[j] = Block4(acc[4 * j][0], acc[4 * j + 1][0], acc[4 * j + 2][0], acc[4 * j + 3][0]);
    VF v = SumBlocks(s);
    if (sp.tail) {
      HWY_ALIGN float tl[R];
      for (std::size_t i = 0; i < R; ++i) tl[i] = TailRow(q, L, r0 + i, gt, act);
      v = hn::Add(v, hn::Load(df, tl));
    }
    hn::StoreU(hn::MulAdd(v, hn::Set(df, alpha), hn::LoadU(df, y)), df, y);
  } else {
    float sums[R];
    if constexpr (R == 4) Sum4(acc[0][0], acc[1][0], acc[2][0], acc[3][0], sums);
    else
      for (std::size_t i = 0; i < R; ++i) sums[i] = hn::GetLane(hn::SumOfLanes(df, acc[i][0]));
    for (std::size_t i = 0; i < R; ++i) y[i] += alpha * (sp.tail ? sums[i] + TailRow(q, L, r0 + i, gt, act) : sums[i]);
  }
}

template <std::size_t T, bool kNib, bool kBcast, bool kDp>
HWY_INLINE void RowsAll(const QView& q, const Layout& L, const IdxF& rep, const Span& sp, std::size_t r0, std::size_t nr,
                        const std::uint8_t* acts, std::size_t abytes, float alpha, float* y, std::size_t ldy) {
  std::size_t i = 0;
  if constexpr (T == 1) {
    constexpr std::size_t kN = hn::MaxLanes(DF());
    if constexpr (kRowsVec)
      for (; i + kN <= nr; i += kN) RowsOne<kN, kNib, kBcast, kDp>(q, L, rep, sp, r0 + i, sp.sw + i * sp.lds, acts, alpha, y + i);
    for (; i + 4 <= nr; i += 4) RowsOne<4, kNib, kBcast, kDp>(q, L, rep, sp, r0 + i, sp.sw + i * sp.lds, acts, alpha, y + i);
    for (; i + 2 <= nr; i += 2) RowsOne<2, kNib, kBcast, kDp>(q, L, rep, sp, r0 + i, sp.sw + i * sp.lds, acts, alpha, y + i);
    for (; i < nr; ++i) RowsOne<1, kNib, kBcast, kDp>(q, L, rep, sp, r0 + i, sp.sw + i * sp.lds, acts, alpha, y + i);
    return;
  }
  for (; i + 2 <= nr; i += 2) Rows<2, T, kNib, kBcast, kDp>(q, L, rep, sp, r0 + i, sp.sw + i * sp.lds, acts, abytes, alpha, y + i, ldy);
  for (; i < nr; ++i) Rows<1, T, kNib, kBcast, kDp>(q, L, rep, sp, r0 + i, sp.sw + i * sp.lds, acts, abytes, alpha, y + i, ldy);
}

template <bool kNib, bool kBcast, bool kDp>
HWY_INLINE void Panel(const QView& q, const Layout& L, const IdxF& rep, const Span& sp, std::size_t r0, std::size_t nr,
                      const std::uint8_t* acts, std::size_t nt, std::size_t abytes, float alpha, float* y, std::size_t ldy) {
  std::size_t t = 0;
  for (; t + 4 <= nt; t += 4) RowsAll<4, kNib, kBcast, kDp>(q, L, rep, sp, r0, nr, acts + t * abytes, abytes, alpha, y + t * ldy, ldy);
  for (; t + 2 <= nt; t += 2) RowsAll<2, kNib, kBcast, kDp>(q, L, rep, sp, r0, nr, acts + t * abytes, abytes, alpha, y + t * ldy, ldy);
  for (; t < nt; ++t) RowsAll<1, kNib, kBcast, kDp>(q, L, rep, sp, r0, nr, acts + t * abytes, abytes, alpha, y + t * ldy, ldy);
}

// ---- Batches: tokens in lanes ----
// From kTokensMin tokens on, nibble codes take this path instead of Panel: R rows of a column
// segment are decoded once into bytes code + 8 (u8 in [0, 15]; two's complement c ^ 8), and lane
// l of every i32 accumulator holds token l of a tile of NL tokens (or, with fewer tokens, lane
// group l of S lanes: see TokensPath). A row's 4 codes are broadcast to all lanes and the tile's
// 4 paired activations per token are one vector load, so a code is decoded once per 2 NL tokens
// (Panel decodes it once per 4 tokens) and no accumulator is summed across lanes but a group's.
// sum (c + 8) x = sum c x + 8 sum x: the second term (Q8Acts' corr) is subtracted per group and
// token before the f32 scaling. Same integer partials as Panel, so the same
// result up to f32 summation order.
//
// Decoded segment layout: per chunk of N8 code bytes, 2 N8 bytes: the low nibbles, then the high
// ones. A group of gb code bytes (gb <= N8, several per chunk) is two runs of gb decoded bytes,
// N8 apart; a group spanning chunks (gb > N8) is one run of 2 gb bytes.
inline constexpr std::size_t kTokensMin = 4;
inline constexpr std::size_t kSegBytes = 256;  // code bytes of a row per column segment
inline constexpr std::size_t kTileTokens = 2;  // token tiles per pass (x NL tokens): TokRows<R, 1 or 2>

struct TokGeom {
  std::size_t N8, NL, seg, dec, gseg;  // chunk bytes, lanes, code bytes / decoded bytes / groups per segment
  std::size_t gb, gpc;                 // code bytes per group; groups per chunk (0: a group spans chunks)
  std::size_t tile;                    // bytes of one token tile (lane groups of S): dec / S * NL quads, then gseg * NL sx and corr
};
inline constexpr std::size_t kDecStride = 2 * kSegBytes;  // decoded row stride (a constant: one base register)

// Tile of NL / S tokens (t0.., zero past nt) for the segment at code byte s0 (group g0). Lane
// l * S + s holds token l's activations for decoded quads m = s (mod S): super-quad M = m / S
// is one vector of NL lanes. corr per group and lane: 8 * the sum of those activations.
template <std::size_t S>
HWY_INLINE void BuildTile(const TokGeom& G, const Layout& L, const std::uint8_t* acts, std::size_t abytes, std::size_t t0,
                          std::size_t nt, std::size_t s0, std::size_t g0, std::uint8_t* tile) {
  auto* quads = reinterpret_cast<std::uint32_t*>(tile);
  auto* sxg = reinterpret_cast<float*>(tile + G.dec * G.NL / S);
  auto* corr = reinterpret_cast<std::int32_t*>(tile + G.dec * G.NL / S + 4 * G.gseg * G.NL);
  const std::size_t NL = G.NL, N8 = G.N8;
  // Pieces of a group: (decoded offset, code byte offset, bytes), low nibbles then high ones.
  const std::size_t piece = G.gpc == 0 ? N8 : G.gb, pieces = G.gpc == 0 ? G.gb / N8 : 1;
  for (std::size_t l = 0; l < NL / S; ++l) {
    const std::size_t t = t0 + l;
    if (t >= nt) {
      for (std::size_t m = 0; m < G.dec / 4; ++m) quads[(m / S) * NL + l * S + m % S] = 0;
      for (std::size_t g = 0; g < G.gseg; ++g)
        for (std::size_t u = 0; u < S; ++u) sxg[g * NL + l * S + u] = 0.0f, corr[g * NL + l * S + u] = 0;
      continue;
    }
    const std::uint8_t* act = acts + t * abytes;
    const float* sx = reinterpret_cast<const float*>(act + 4 * L.rbp);
    // Q8Acts' corr: 8 * the sum of the x paired with code bytes 4i..4i+3 (both nibbles), the
    // bytes whose two decoded quads land in lane group member i mod S.
    const auto* lane_corr = reinterpret_cast<const std::int32_t*>(act + 3 * L.rbp) + s0 / 4;
    for (std::size_t g = 0, o = 0, b = 0; g < G.gseg; ++g) {
      std::int32_t cs[S] = {};
      for (std::size_t pc = 0; pc < pieces; ++pc) {
        const std::size_t od = o + pc * 2 * N8, ob = b + pc * N8;  // decoded offset, code byte offset
        for (std::size_t h = 0; h < 2; ++h) {                     // low nibbles, then high
          const std::uint8_t* src = act + s0 + ob + h * L.rbp;
          std::uint32_t* dst = quads + (od + h * N8) / (4 * S) * NL + l * S;
          for (std::size_t qd = 0; qd < piece / 4; qd += S, src += 4 * S, dst += NL) std::memcpy(dst, src, 4 * S);
        }
        for (std::size_t qd = 0; qd < piece / 4; ++qd) cs[qd % S] += lane_corr[ob / 4 + qd];
      }
      for (std::size_t u = 0; u < S; ++u) sxg[g * NL + l * S + u] = sx[g0 + g], corr[g * NL + l * S + u] = cs[u];
      b += G.gb;
      if (G.gpc == 0) o += 2 * G.gb;
      else if (b % N8 != 0) o += G.gb;
      else o += N8 + G.gb;
    }
  }
}

// out[i][j * NL + l] = sum over the segment's groups of row i times token l of tile j, for R rows
// (decoded, row stride kDecStride) and T tiles; sw: the rows' f32 group scales (row stride lds).
// kG16: groups of 16 code bytes (32 nibble codes, the default) within a chunk and fixed-width
// vectors (G.N8, G.NL the targets' maxima): every loop over a group's bytes has a constant trip
// count and unrolls (a group's 2-4 steps otherwise paid a loop's overhead each).
// kLanes: dec is decoded rows in lanes (DecodeLanes: decoded quad m of row i at 64 m + 4 i; S = 1).
template <class D, std::size_t R, std::size_t T, std::size_t S, bool kG16, bool kLanes, bool kDp>
HWY_INLINE void TokRows(const TokGeom& G, const std::uint8_t* dec, const float* sw, std::size_t lds, const std::uint8_t* tiles,
                        float* out) {
  static_assert(!kLanes || S == 1, "rows in lanes: one lane per token");
#if HWY_TARGET != HWY_SCALAR
  const D df;
  const hn::RebindToSigned<D> di;
  const hn::Repartition<std::uint8_t, D> du8;
  const hn::Repartition<std::int8_t, D> di8;
  hn::Vec<D> accf[R][T];
  for (std::size_t i = 0; i < R; ++i)
    for (std::size_t j = 0; j < T; ++j) accf[i][j] = hn::Zero(df);
  const hn::Repartition<std::uint64_t, D> d64;
  const std::size_t NL = kG16 ? hn::MaxLanes(df) : G.NL;
  const std::size_t len = kG16 ? 16 : G.gpc == 0 ? 2 * G.gb : G.gb, runs = kG16 ? 2 : G.gpc == 0 ? 1 : 2;
  const std::size_t run_stride = kG16 ? hn::MaxLanes(du8) : G.gpc == 0 ? 0 : G.N8;
  for (std::size_t g = 0, o = 0, k = 0; g < G.gseg; ++g) {
    hn::Vec<decltype(di)> acc[R][T];
    for (std::size_t i = 0; i < R; ++i)
      for (std::size_t j = 0; j < T; ++j) acc[i][j] = hn::Zero(di);
    for (std::size_t w = 0; w < runs; ++w) {
      const std::size_t ow = o + w * run_stride;
      for (std::size_t e = 0; e < len; e += 4 * S) {
        const std::size_t d = ow + e;
        hn::Vec<decltype(di8)> xv[T];
        for (std::size_t j = 0; j < T; ++j)
          xv[j] = hn::LoadU(di8, reinterpret_cast<const std::int8_t*>(tiles + j * G.tile + d / S * NL));
        for (std::size_t i = 0; i < R; ++i) {
          const std::uint8_t* c = kLanes ? dec + 16 * d + 4 * i : dec + i * kDecStride + d;  // S quads of row i, to every lane group
          hn::Vec<decltype(du8)> wv;
          if constexpr (S == 1) {
            std::int32_t c4;
            std::memcpy(&c4, c, 4);
            wv = hn::BitCast(du8, hn::Set(di, c4));
          } else if constexpr (S == 2) {
            std::uint64_t c8;
            std::memcpy(&c8, c, 8);
            wv = hn::BitCast(du8, hn::Set(d64, c8));
          } else {
            wv = hn::LoadDup128(du8, c);
          }
          for (std::size_t j = 0; j < T; ++j) acc[i][j] = DotU8I8<kDp>(acc[i][j], wv, xv[j]);
        }
      }
    }
    // next group's first run: the next gb bytes, or past this chunk's high half
    if (G.gpc == 0) o += 2 * G.gb;
    else if (++k < G.gpc) o += G.gb;
    else k = 0, o += G.N8 + G.gb;
    for (std::size_t j = 0; j < T; ++j) {
      const std::uint8_t* tail = tiles + j * G.tile + G.dec / S * NL;
      const auto sx = hn::LoadU(df, reinterpret_cast<const float*>(tail) + g * NL);
      const auto corr = hn::LoadU(di, reinterpret_cast<const std::int32_t*>(tail + 4 * G.gseg * NL) + g * NL);
      for (std::size_t i = 0; i < R; ++i)
        accf[i][j] = hn::MulAdd(hn::ConvertTo(df, hn::Sub(acc[i][j], corr)), hn::Mul(sx, hn::Set(df, sw[i * lds + g])), accf[i][j]);
    }
  }
  for (std::size_t i = 0; i < R; ++i)
    for (std::size_t j = 0; j < T; ++j) {
      // each lane group's S partial sums (in all of its lanes)
      if constexpr (S >= 2) accf[i][j] = hn::Add(accf[i][j], hn::Shuffle2301(accf[i][j]));
      if constexpr (S >= 4) accf[i][j] = hn::Add(accf[i][j], hn::Shuffle1032(accf[i][j]));
      hn::StoreU(accf[i][j], df, out + (i * T + j) * NL);
    }
#else
  (void)G, (void)dec, (void)sw, (void)lds, (void)tiles, (void)out;
#endif
}

// Decodes rows [r, r + nr) of the segment at code byte s0 into dec (row stride kDecStride).
HWY_INLINE void DecodeRows(const QView& q, const Layout& L, const TokGeom& G, std::size_t r, std::size_t nr, std::size_t s0,
                           std::uint8_t* dec) {
#if HWY_TARGET != HWY_SCALAR
  const DU8 du8;
  const auto k88 = hn::Set(du8, 0x88), k0f = hn::Set(du8, 0x0F);
  for (std::size_t i = 0; i < nr; ++i) {
    const std::uint8_t* src = q.codes + (r + i) * L.rb + s0;
    std::uint8_t* dst = dec + i * kDecStride;
    for (std::size_t c = 0; c < G.seg; c += G.N8, dst += 2 * G.N8) {
      // The rows are read a few at a time between long compute stretches: without this the
      // hardware prefetcher lets each prepare wait on DRAM (cold batch 32 ran 1.5x hot).
      hwy::Prefetch(src + c + kPrefetchAhead);
      const VU8 u = hn::Xor(hn::LoadU(du8, src + c), k88);
      hn::Store(hn::And(u, k0f), du8, dst);
      hn::Store(hn::And(hn::BitCast(du8, hn::ShiftRight<4>(hn::BitCast(DU16(), u))), k0f), du8, dst + G.N8);
    }
  }
#else
  (void)q, (void)L, (void)G, (void)r, (void)nr, (void)s0, (void)dec;
#endif
}

// Decodes panel p of a rows-in-lanes q, the segment at code byte s0, into dec in lanes order:
// decoded quad m (what DecodeRows puts at row offset 4 m) of panel row i at 64 m + 4 i. The
// records' bytes are already c + 8, so a quad is an And (low nibbles) or a shift and an And.
HWY_INLINE void DecodeLanes(const QView& q, const TokGeom& G, std::size_t p, std::size_t s0, std::uint8_t* dec) {
#if HWY_TARGET != HWY_SCALAR
  const DU8 du8;  // 16, 32 or 64 bytes where kLanesVec holds: whole vectors of a 64-byte quad
  const auto k0f = hn::Set(du8, 0x0F);
  const std::size_t nq = q.group / 8, rec = q.lanes_record(), N8 = hn::Lanes(du8);
  const std::uint8_t* r = q.lanes_at(p, s0 / 4 / nq);  // the record of the segment's first quad
  // code quad ob / 4 of the segment: quad k of the record at r; its low nibbles go to decoded
  // offset dlo (chunk c of N8 code bytes: its low nibbles, then its high ones)
  for (std::size_t ob = 0, k = s0 / 4 % nq, dlo = 0, c = 0; ob < G.seg; ob += 4) {
    const std::uint8_t* src = r + 64 * k;
    hwy::Prefetch(src + kPrefetchAhead);  // every line of the records (cold panels come from DRAM)
    if (k == 0) hwy::Prefetch(r + q.lanes_codes() + kPrefetchAhead);
    std::uint8_t* lo = dec + 16 * dlo;
    std::uint8_t* hi = dec + 16 * (dlo + G.N8);
    if (++k == nq) k = 0, r += rec;
    dlo += 4;
    if ((c += 4) == G.N8) c = 0, dlo += G.N8;
    for (std::size_t b = 0; b < 64; b += N8) {
      const VU8 v = hn::LoadU(du8, src + b);
      hn::StoreU(hn::And(v, k0f), du8, lo + b);
      hn::StoreU(hn::And(hn::BitCast(du8, hn::ShiftRight<4>(hn::BitCast(DU16(), v))), k0f), du8, hi + b);
    }
  }
#else
  (void)q, (void)G, (void)p, (void)s0, (void)dec;
#endif
}

// y[t * ldy + i] += alpha * m[i * lds + t] for i < NL (all lanes) and t < nt <= NL: the NL x NL
// block transposed in registers (unpacks inside 128-bit blocks, then blocks exchanged), so y is
// updated a vector of rows at a time.
template <class D, std::size_t S>
HWY_INLINE void TransposeAdd(const float* m, std::size_t lds, std::size_t nt, float alpha, float* y, std::size_t ldy) {
#if HWY_TARGET != HWY_SCALAR
  using V = hn::Vec<D>;
  const D df;
  constexpr std::size_t kN = hn::MaxLanes(D());
  const std::size_t N = hn::Lanes(df);
  if constexpr (kN >= 4 && kN <= 16) {
    V v[kN];
    for (std::size_t i = 0; i < N; ++i) v[i] = hn::LoadU(df, m + i * lds);
    V u[kN / 4][4];
    TransposeBlocks<D>(v, u);
    const V va = hn::Set(df, alpha);
    for (std::size_t k = 0; k < N / 4; ++k)
      for (std::size_t c = 0; c < 4; ++c) {
        const std::size_t lane = 4 * k + c, t = lane / S;
        if (lane % S) continue;
        if (t >= nt) return;
        float* yt = y + t * ldy;
        hn::StoreU(hn::MulAdd(u[k][c], va, hn::LoadU(df, yt)), df, yt);
      }
    return;
  }
#endif
  for (std::size_t t = 0; t < nt; ++t)
    for (std::size_t i = 0; i < hn::Lanes(D()); ++i) y[t * ldy + i] += alpha * m[i * lds + t * S];
}

// Whether TokRows' kG16 form applies to the segment geometry G.
HWY_INLINE bool G16(const TokGeom& G) {
  return !HWY_HAVE_SCALABLE && G.gpc != 0 && G.gb == 16 && G.N8 == hn::MaxLanes(DU8()) && G.NL == hn::MaxLanes(DF());
}

template <class D, std::size_t T, std::size_t S, bool kLanes, bool kDp>
HWY_INLINE void TokRowsR(std::size_t R, const TokGeom& G, const std::uint8_t* dec, const float* sw, std::size_t lds,
                         const std::uint8_t* tiles, float* out) {
  if (R == 8 && T == 1 && G16(G)) TokRows<D, 8, 1, S, true, kLanes, kDp>(G, dec, sw, lds, tiles, out);
  else if (R == 8) TokRows<D, 8, T, S, false, kLanes, kDp>(G, dec, sw, lds, tiles, out);
  else if (R == 4) TokRows<D, 4, T, S, false, kLanes, kDp>(G, dec, sw, lds, tiles, out);
  else if (R == 2) TokRows<D, 2, T, S, false, kLanes, kDp>(G, dec, sw, lds, tiles, out);
  else TokRows<D, 1, T, S, false, kLanes, kDp>(G, dec, sw, lds, tiles, out);
}

// Code bytes per column segment of the tokens path (whole chunks or groups).
HWY_INLINE std::size_t SegMax(const Layout& L) {
  const std::size_t unit = std::max(hn::Lanes(DU8()), L.gb);
  return kSegBytes / unit * unit;
}

// The geometry of the segment at code byte s0 with lane groups of S.
template <std::size_t S>
HWY_INLINE TokGeom SegGeom(const Layout& L, std::size_t s0) {
  TokGeom G;
  const std::size_t N8 = hn::Lanes(DU8());
  G.N8 = N8, G.NL = hn::Lanes(DF()), G.seg = std::min(SegMax(L), L.vend - s0), G.dec = 2 * G.seg, G.gb = L.gb;
  G.gseg = G.seg / L.gb, G.gpc = L.gb <= N8 ? N8 / L.gb : 0;
  G.tile = (G.dec / S + 8 * G.gseg) * G.NL;
  return G;
}

// The tiles of every segment for nt tokens, laid out segment by segment, tile by tile (what
// TokensRun builds for itself when given none): their bytes, and building them into out.
template <std::size_t S>
HWY_INLINE std::size_t TilesBytes(const Layout& L, std::size_t nt) {
  const std::size_t per = hn::Lanes(DF()) / S, ntiles = (nt + per - 1) / per;
  std::size_t n = 0;
  for (std::size_t s0 = 0; s0 < L.vend; s0 += SegMax(L)) n += ntiles * SegGeom<S>(L, s0).tile;
  return n;
}
template <std::size_t S>
HWY_INLINE void BuildTiles(const Layout& L, const std::uint8_t* acts, std::size_t abytes, std::size_t nt, std::uint8_t* out) {
  const std::size_t per = hn::Lanes(DF()) / S, ntiles = (nt + per - 1) / per;
  for (std::size_t s0 = 0; s0 < L.vend; s0 += SegMax(L)) {
    const TokGeom G = SegGeom<S>(L, s0);
    for (std::size_t tt = 0; tt < ntiles; ++tt, out += G.tile) BuildTile<S>(G, L, acts, abytes, tt * per, nt, s0, s0 / L.gb, out);
  }
}

// The tokens-in-lanes path of Q8GemvNT with tiles of NL / S tokens (lane groups of S); pre: the
// tiles BuildTiles made for these activations (or null: built here per segment).
// kLanes: q is rows in lanes (S = 1, r0 on a panel): each 16-row panel is decoded once per segment
// and tile pair (DecodeLanes) and TokRows reads its rows in place.
template <class D, std::size_t S, bool kLanes, bool kDp>
HWY_INLINE void TokensRun(const QView& q, const Layout& L, std::size_t r0, std::size_t nr, const std::uint8_t* acts,
                          const std::uint8_t* pre, std::size_t nt, std::size_t abytes, float alpha, float* y, std::size_t ldy) {
  // rows decoded at a time: up to 8 (a TokRows call: 4 with two tiles, 8 with one); kLanes: a panel
  constexpr std::size_t kMaxNL = 16, kR = kLanes ? QView::kLaneRows : 8;
  const std::size_t NL = hn::Lanes(D());
  // A tile: 2 kSegBytes quads bytes per lane, sx and corr of at most kSegBytes / 4 groups.
  constexpr std::size_t kTileMax = (2 * kSegBytes + 8 * (kSegBytes / 4)) * kMaxNL;
  HWY_ALIGN std::uint8_t own[kTileTokens * kTileMax];
  HWY_ALIGN std::uint8_t dec[kR * kDecStride];
  HWY_ALIGN float out[kMaxNL * kTileTokens * kMaxNL];  // a panel: NL rows x T tiles
  float sw[kR * (kSegBytes / 4)];
  const std::size_t per = NL / S;  // tokens per tile
  const std::size_t ntiles = (nt + per - 1) / per;
  for (std::size_t s0 = 0, off = 0; s0 < L.vend; s0 += SegMax(L)) {
    const TokGeom G = SegGeom<S>(L, s0);
    const std::size_t g0 = s0 / L.gb;
    for (std::size_t tt = 0; tt < ntiles; tt += kTileTokens) {
      const std::size_t T = std::min(kTileTokens, ntiles - tt);
      const std::uint8_t* tiles = own;
      if (pre) tiles = pre + off + tt * G.tile;
      else
        for (std::size_t j = 0; j < T; ++j) BuildTile<S>(G, L, acts, abytes, (tt + j) * per, nt, s0, g0, own + j * G.tile);
      std::size_t panel = ~std::size_t{0};  // the lanes panel decoded in dec
      const std::uint8_t* rows = dec;      // row r's decoded codes (kLanes: in the panel)
      auto prepare = [&](std::size_t r, std::size_t R) {  // rows r..r+R decoded, their scales in f32
        if constexpr (kLanes) {
          if ((r0 + r) / QView::kLaneRows != panel) DecodeLanes(q, G, panel = (r0 + r) / QView::kLaneRows, s0, dec);
          const std::size_t i0 = (r0 + r) % QView::kLaneRows;
          rows = dec + 4 * i0;
          const std::uint8_t* rec = q.lanes_at(panel, g0) + q.lanes_codes() + 2 * i0;  // the rows' scales
          for (std::size_t g = 0; g < G.gseg; ++g, rec += q.lanes_record()) {
            std::uint16_t b[QView::kLaneRows];
            std::memcpy(b, rec, 2 * R);
            for (std::size_t i = 0; i < R; ++i) sw[i * G.gseg + g] = s2lc::bf16_to_f32(b[i]);
          }
          return;
        }
        DecodeRows(q, L, G, r0 + r, R, s0, dec);
        if (G.gseg == L.gpr) {  // whole rows: the R rows' scales are contiguous
          BF16ToF32(q.scales + (r0 + r) * L.gpr, sw, R * G.gseg);
          return;
        }
        for (std::size_t j = 0; j < R * G.gseg; ++j) sw[j] = s2lc::bf16_to_f32(q.scales[(r0 + r + j / G.gseg) * L.gpr + g0 + j % G.gseg]);
      };
      // Panels of NL rows (R at a time into out), each transposed onto y; then the last rows.
      std::size_t r = 0;
      for (; r + NL <= nr; r += NL) {
        const std::size_t R = T == 2 ? 4 : std::min<std::size_t>(8, NL);
        for (std::size_t p = 0; p < NL; p += R) {
          prepare(r + p, R);
          if (T == 2 && G16(G)) TokRows<D, 4, 2, S, true, kLanes, kDp>(G, rows, sw, G.gseg, tiles, out + p * T * NL);
          else if (T == 2) TokRows<D, 4, 2, S, false, kLanes, kDp>(G, rows, sw, G.gseg, tiles, out + p * T * NL);
          else TokRowsR<D, 1, S, kLanes, kDp>(R, G, rows, sw, G.gseg, tiles, out + p * T * NL);
        }
        for (std::size_t j = 0; j < T; ++j)
          TransposeAdd<D, S>(out + j * NL, T * NL, std::min(per, nt - (tt + j) * per), alpha, y + (tt + j) * per * ldy + r, ldy);
      }
      while (r < nr) {
        const std::size_t R = nr - r >= 4 ? 4 : nr - r >= 2 ? 2 : 1;
        prepare(r, R);
        if (T == 2) TokRowsR<D, 2, S, kLanes, kDp>(R, G, rows, sw, G.gseg, tiles, out);
        else TokRowsR<D, 1, S, kLanes, kDp>(R, G, rows, sw, G.gseg, tiles, out);
        for (std::size_t i = 0; i < R; ++i)
          for (std::size_t j = 0; j < T; ++j)
            for (std::size_t l = 0, t = (tt + j) * per; l < per && t < nt; ++l, ++t)
              y[t * ldy + r + i] += alpha * out[(i * T + j) * NL + l * S];
        r += R;
      }
    }
    off += ntiles * G.tile;
  }
  const std::size_t gvec = L.vend / L.gb;
  if (gvec < L.gpr)
    for (std::size_t t = 0; t < nt; ++t)
      for (std::size_t i = 0; i < nr; ++i) y[t * ldy + i] += alpha * TailRow(q, L, r0 + i, gvec, acts + t * abytes);
}

// The lanes per token of the tokens path for nt tokens, or 0 where it does not apply. Fewer
// tokens than lanes: lane groups of S = 2 or 4 lanes per token, each lane on its own quads of
// the codes (summed at the end), so no lane idles.
HWY_INLINE std::size_t TokensLanes(const QView& q, const Layout& L, std::size_t nt) {
  const std::size_t N8 = hn::Lanes(DU8()), NL = hn::Lanes(DI());
  if (HWY_TARGET == HWY_SCALAR || !q.nibble || L.vend == 0 || nt < kTokensMin || NL > 16 || NL < 4) return 0;
  if (std::max(N8, L.gb) > kSegBytes) return 0;
  const std::size_t run_quads = (L.gb <= N8 ? L.gb : 2 * L.gb) / 4;  // a group's runs are whole lane groups
  if (4 * nt <= NL && run_quads % 4 == 0) return 4;
  if (2 * nt <= NL && run_quads % 2 == 0) return 2;
  return 1;
}

// The tokens-in-lanes path of Q8GemvNT; false (nothing done) where it does not apply.
template <bool kDp>
HWY_INLINE bool TokensPath(const QView& q, const Layout& L, std::size_t r0, std::size_t nr, const std::uint8_t* acts,
                           const std::uint8_t* pre, std::size_t nt, std::size_t abytes, float alpha, float* y, std::size_t ldy) {
  const std::size_t S = TokensLanes(q, L, nt);
  if (q.lanes) {  // one lane per token, whole panels
    if (S != 1 || r0 % QView::kLaneRows != 0 || !kLanesVec) return false;
    TokensRun<DF, 1, true, kDp>(q, L, r0, nr, acts, pre, nt, abytes, alpha, y, ldy);
    return true;
  }
  if (S == 4) TokensRun<DF, 4, false, kDp>(q, L, r0, nr, acts, pre, nt, abytes, alpha, y, ldy);
  else if (S == 2) TokensRun<DF, 2, false, kDp>(q, L, r0, nr, acts, pre, nt, abytes, alpha, y, ldy);
  else if (S == 1) TokensRun<DF, 1, false, kDp>(q, L, r0, nr, acts, pre, nt, abytes, alpha, y, ldy);
  return S != 0;
}

// ---- Rows in lanes (QView::lanes) ----
// Each vector holds the same 4 code bytes of NL rows of a panel (a 64-byte quad record is 16 / NL
// vectors, one per sub-panel of NL rows): the two nibble halves, already c + 8, meet each token's
// 4 paired activations broadcast to every lane, so every i32 lane accumulates one row, one f32
// scale vector per group serves NL rows, and y takes a vector of rows per token. The i32 partials
// equal the row-major kernels' (sum (c + 8) x - 8 sum x per group): same result up to f32
// summation order.
// Tokens per pass over the codes: their accumulators (up to 4 tokens 2 i32 + 1 f32 each, from 5
// on 1 + 1) fit the registers.
inline constexpr std::size_t kLanesTile = hn::MaxLanes(DI()) >= 16 ? 8 : 2;

// A tile of T tokens' activations as LanesRows reads them, set up once per call: per group g,
// minus each token's sum over the group of Q8Acts' corr (nc[g T + t]: the offset of codes read as
// c + 8, or bytes as c + 128) and its scale (sx[g T + t]). Nibble codes broadcast each token's
// activations from its Q8Acts in place (token t at act + t abytes, the 4 paired with quad k of
// group g at g gb + 4 k, those of the high nibbles rbp further); byte codes from a copy of them,
// the quads of every token in turn (xq[(g nq + k) T + t]: one pointer reaches all, where a pointer
// per token ran out of registers at 8 tokens, 5-10 % slower). Nibbles had been copied too (two
// 4-byte loads and stores per quad and token), and the byte container's sums of activations taken
// byte by byte: a quarter of this kernel's samples in the 8-token tinymoe layer. A 48 x 256 3-bit
// matrix in rows in lanes (a residual's right factor), 1 / 4 / 8 tokens: 120-130 / 320-331 /
// 601-641 -> 109-120 / 251-270 / 480-491 ns (scratch driver); the int8 tinymoe layer, hot, 8
// tokens: median 80.1 -> 77.3 us over 5 alternating bench runs (bench/RESULTS.md).
struct LanesActs {
  const std::uint8_t* act;
  std::size_t abytes, rbp, gb;  // gb: activation bytes per group (per half, nibbles)
  const std::int32_t* xq;       // the byte container's copy
  const std::int32_t* nc;
  const float* sx;
};

// Token t's 4 activations at p, broadcast to every lane.
HWY_INLINE VI8 LanesQuad(const std::uint8_t* p) {
  std::int32_t v;
  std::memcpy(&v, p, 4);
  return hn::BitCast(DI8(), hn::Set(DI(), v));
}

// Byte codes meet vpdpbusd as c + 128 (see LanesRows).
inline constexpr bool kVnni = HWY_TARGET == HWY_AVX3_DL;

// ya[t] = rows [h NL, h NL + NL) of panel p times token t of the tile a. kNQ: quads per group as a
// constant (0: q.lanes_quads() at run time). Up to 4 tokens, each token's low and high nibbles
// (byte codes: even and odd quads) accumulate apart (two dependency chains per token keep the
// dot-product unit busy); from 5 on, one accumulator per token (as many chains as tokens, and the
// registers for 8).
// The byte container (kNib false): each vector is quad k of NL rows, 4 codes per lane, met by
// each token's 4 activations of those columns (xq[(g nq + k) T + t]), as the row-major byte
// kernels do: |code| times the activation with the code's sign (every pmaddubsw pair sum fits
// int16). With vpdpbusd (exact int32 sums of u8 x s8 products) the codes are read as c + 128
// instead, each group starting from -128 times the token's sum of activations (nc[g T + t]): one
// xor per quad for all tokens instead of a sign select per token. Groups of 32 (8 quads) run with
// the quad count a constant, so the loop unrolls and the alternation of a0 / a1 costs nothing
// (one 256 x 256 5-bit block, hot, 1 / 2 / 4 / 8 tokens: 47 / 73 / 121 / 170 -> 90 / 140 / 182 /
// 212 GMAC/s; the xor at up to 4 tokens had been slower while the loop ran with k % 2 branches).
template <std::size_t T, std::size_t kNQ, bool kNib, bool kDp>
HWY_INLINE void LanesRows(const QView& q, std::size_t p, std::size_t h, const LanesActs& a, VF (&ya)[T]) {
#if HWY_TARGET == HWY_SCALAR  // (never called: kLanesVec)
  (void)q, (void)p, (void)h, (void)a, (void)ya;
#else
  constexpr bool kSplit = T <= 4, kOffset = kNib || kVnni || kDp;  // a group starts from nc
  const DF df;
  const DI di;
  const DU8 du8;
  const DI8 di8;
  const std::size_t NL = hn::Lanes(df), gpr = q.groups_per_row(), nq = kNQ ? kNQ : q.lanes_quads();
  const std::size_t rec = q.lanes_record(), sc = q.lanes_codes() + 2 * NL * h;
  const auto k0f = hn::Set(du8, 0x0F);
  for (std::size_t t = 0; t < T; ++t) ya[t] = hn::Zero(df);
  const std::uint8_t* r = q.lanes_at(p, 0);
  const std::int32_t* xq = a.xq;
  for (std::size_t g = 0; g < gpr; ++g, r += rec, xq += kNib ? 0 : nq * T) {
    [[maybe_unused]] const std::uint8_t* xp[kNib ? T : 1];
    if constexpr (kNib)
      for (std::size_t t = 0; t < T; ++t) xp[t] = a.act + t * a.abytes + g * a.gb;
    if (h == 0)  // the panel's first pass brings its lines in; the others find them in L1
      for (std::size_t o = 0; o < rec + 64; o += 64) hwy::Prefetch(r + kPrefetchAhead + o);
    hn::Vec<DI> a0[T], a1[kSplit ? T : 1];
    for (std::size_t t = 0; t < T; ++t) a0[t] = kOffset ? hn::Set(di, a.nc[g * T + t]) : hn::Zero(di);
    if constexpr (kSplit)
      for (std::size_t t = 0; t < T; ++t) a1[t] = hn::Zero(di);
    for (std::size_t k = 0; k < nq; ++k) {
      VU8 v = hn::LoadU(du8, r + 64 * k + 4 * NL * h);
      if constexpr (kNib) {
        if constexpr (kSplit) v = InRegister(v);  // (passes of 8 tokens ran 4 % slower cold with it)
        const VU8 lo = hn::And(v, k0f), hi = hn::And(hn::BitCast(du8, hn::ShiftRight<4>(hn::BitCast(DU16(), v))), k0f);
        for (std::size_t t = 0; t < T; ++t) {
          a0[t] = DotU8I8<kDp>(a0[t], lo, LanesQuad(xp[t] + 4 * k));
          if constexpr (kSplit) a1[t] = DotU8I8<kDp>(a1[t], hi, LanesQuad(xp[t] + a.rbp + 4 * k));
          else a0[t] = DotU8I8<kDp>(a0[t], hi, LanesQuad(xp[t] + a.rbp + 4 * k));
        }
      } else if constexpr (kOffset) {  // c + 128 (the offset in a.nc): vpdpbusd has no int16 pair sums
        const VU8 u = hn::Xor(v, hn::Set(du8, 0x80));
        for (std::size_t t = 0; t < T; ++t) {
          const VI8 x = hn::BitCast(di8, hn::Set(di, xq[k * T + t]));
          if (kSplit && (k & 1)) a1[t] = DotU8I8<kDp>(a1[t], u, x);
          else a0[t] = DotU8I8<kDp>(a0[t], u, x);
        }
      } else {
        const VI8 c = hn::BitCast(di8, v);
        const VU8 ac = hn::BitCast(du8, hn::Abs(c));
        const auto neg = hn::Lt(c, hn::Zero(di8));
        for (std::size_t t = 0; t < T; ++t) {
          const VI8 x = hn::BitCast(di8, hn::Set(di, xq[k * T + t]));
          const VI8 xs = hn::IfThenElse(neg, hn::Neg(x), x);
          if (kSplit && (k & 1)) a1[t] = DotU8I8<kDp>(a1[t], ac, xs);
          else a0[t] = DotU8I8<kDp>(a0[t], ac, xs);
        }
      }
    }
    const VF s = BF16ToF32Vec(hn::LoadU(kernels::HWY_NAMESPACE::DU16(), reinterpret_cast<const std::uint16_t*>(r + sc)));
    for (std::size_t t = 0; t < T; ++t) {
      auto acc = a0[t];
      if constexpr (kSplit) acc = hn::Add(acc, a1[t]);
      ya[t] = hn::MulAdd(hn::ConvertTo(df, acc), hn::Mul(s, hn::Set(df, a.sx[g * T + t])), ya[t]);
    }
  }
#endif
}

template <std::size_t T, bool kDp>
HWY_INLINE void LanesTile(const QView& q, std::size_t r0, std::size_t nr, const LanesActs& a, float alpha, float* y, std::size_t ldy) {
  const std::size_t NL = hn::Lanes(DF());
  // sub-panels of NL rows (16 / NL per panel) meeting [r0, r0 + nr)
  for (std::size_t b = r0 / NL * NL; b < r0 + nr; b += NL) {
    const std::size_t i0 = b < r0 ? r0 - b : 0, n = std::min(b + NL, r0 + nr) - (b + i0);
    VF ya[T];
    const std::size_t p = b / QView::kLaneRows, h = b % QView::kLaneRows / NL;
    if (!q.nibble && q.group == 32) LanesRows<T, 8, false, kDp>(q, p, h, a, ya);
    else if (!q.nibble) LanesRows<T, 0, false, kDp>(q, p, h, a, ya);
    else if (q.group == 32) LanesRows<T, 4, true, kDp>(q, p, h, a, ya);
    else LanesRows<T, 0, true, kDp>(q, p, h, a, ya);
    LanesStore<T>(ya, i0, n, alpha, y + (b + i0 - r0), ldy);
  }
}

// Whether nt tokens on a rows-in-lanes matrix run LanesQ8: from kLanesTokensMax tokens on, the
// tokens-in-lanes path reading the panels in place ran faster (LanesQ8 reads the codes once per
// kLanesTile tokens; on AVX-512, with passes of 8, it was 10-15 % faster at 16 and 24 tokens and
// 5 % slower at 32). On AVX2 (passes of 2) LanesQ8 is faster at any batch: a 4-bit 1024 x 1408
// matrix in groups of 32 at 16 / 32 tokens took 159 / 318 us against 317 / 636 on the tokens
// path with AVX-VNNI, 227 / 455 against 343 / 688 without (Zen 5, static AVX2 build); SSSE3 the
// same either way. Other targets with passes of 2 (NEON) are unmeasured and keep 16.
inline constexpr std::size_t kLanesTokensMax = kLanesTile >= 8 ? 32 : HWY_ARCH_X86 ? ~std::size_t{0} : 16;
// Byte codes have no tokens-in-lanes path: LanesQ8 for any batch (32 tokens on tinymoe's 5-bit
// w1 core, hot: 187 -> 72 us against the row-major kernel on unpacked panels).
HWY_INLINE bool LanesNative(const QView& q, std::size_t nt) { return kLanesVec && (nt < kLanesTokensMax || !q.nibble); }
// The row-major layout of the same shape (what activations and tiles are laid out for).
HWY_INLINE QView RowMajor(QView q) {
  q.lanes = false;
  return q;
}

// Q8GemvNT for a rows-in-lanes q: tiles of up to kLanesTile tokens, each a pass over the codes.
// AVX2 with vpdpbusd takes passes of 4 (no pmaddubsw temporaries, so 4 tokens' accumulators fit
// the 16 registers): a 1024 x 1408 matrix in groups of 32 at 16 / 32 tokens, 4-bit 165 / 331 ->
// 148 / 296 us, 5-bit 212 / 424 -> 173 / 347 (static AVX2 scratch build on Zen 5); without VNNI
// passes of 4 were slower (234 -> 282 at 16 tokens).
template <bool kDp>
HWY_INLINE void LanesQ8(const QView& q, std::size_t r0, std::size_t nr, const std::uint8_t* acts, std::size_t nt, float alpha,
                        float* y, std::size_t ldy) {
  const Layout L = MakeLayout(q);
  const std::size_t abytes = Q8Acts::bytes(q), gpr = L.gpr, nq = q.lanes_quads();
  constexpr std::size_t kG = QView::kLanesMaxCols / 8;  // groups at most
  constexpr std::size_t kTile = kDp && HWY_TARGET == HWY_AVX2 ? 4 : kLanesTile;
  std::int32_t xq[kTile * QView::kLanesMaxCols / 4], nc[kTile * kG];
  float sx[kTile * kG];
  for (std::size_t t0 = 0, T = 0; t0 < nt; t0 += T) {
    T = nt - t0 >= kTile ? kTile : std::min<std::size_t>(nt - t0, 4);
    const LanesActs la{acts + t0 * abytes, abytes, L.rbp, L.gb, xq, nc, sx};
    for (std::size_t t = 0; t < T; ++t) {
      const std::uint8_t* act = acts + (t0 + t) * abytes;
      const auto* corr = reinterpret_cast<const std::int32_t*>(act + 3 * L.rbp);
      for (std::size_t g = 0; g < gpr; ++g) {
        std::int32_t sum = 0;
        for (std::size_t k = 0; k < nq; ++k) {
          sum += corr[g * nq + k];
          if (!q.nibble) std::memcpy(&xq[(g * nq + k) * T + t], act + 4 * (g * nq + k), 4);
        }
        nc[g * T + t] = -sum;
        sx[g * T + t] = reinterpret_cast<const float*>(act + 4 * L.rbp)[g];
      }
    }
    float* yt = y + t0 * ldy;
    if constexpr (kLanesTile == 8)
      if (T == 8) {
        LanesTile<8, kDp>(q, r0, nr, la, alpha, yt, ldy);
        continue;
      }
    if (T == 4) LanesTile<4, kDp>(q, r0, nr, la, alpha, yt, ldy);
    else if (T == 3) LanesTile<3, kDp>(q, r0, nr, la, alpha, yt, ldy);
    else if (T == 2) LanesTile<2, kDp>(q, r0, nr, la, alpha, yt, ldy);
    else LanesTile<1, kDp>(q, r0, nr, la, alpha, yt, ldy);
  }
}

// ---- Coefficients times codes (q8_gemv_nn): y[j] += sum_k c[k] q[k, j] ----
// The left factor's product with the right one's output t: per group g of columns, the rows'
// coefficients cs[k, g] = c[k] s[k, g] are quantized to int8 over the rows as q8_quantize does
// activations (cq = round_half_even(cs * 127 / amax_g), sigma_g = amax_g / 127), so a group's
// sum over rows is an exact integer sum of cq * code and one f32 product per group and chunk of
// kNNRows rows. The vector body reads 4 rows at a time, each 128-bit block 16 code bytes of one
// group: byte then word unpacks put one code byte of the 4 rows in each 4-byte lane, and one
// DotU8I8 per nibble with the 4 rows' cq (a quad, broadcast per block) adds the 4 rows' products
// for the low nibbles' columns and for the high ones'. Nibbles are read as c + 8 (byte ^ 0x88),
// so 8 * sum cq is subtracted per group. Exact integers, so every target gives the same sums.
inline constexpr std::size_t kNNRows = 64;   // rows per chunk (the integer partials' flush)
inline constexpr std::size_t kNNStrip = 64;  // groups per column strip (the per-group buffers)
using DC = hn::CappedTag<float, 8>;          // the per-group arithmetic (8 groups: a left factor of 256 columns)
using DCI = hn::RebindToSigned<DC>;

// Whether the vector body takes q's layout on this target: nibble codes in row-major form, 16
// code bytes of a block inside one group, vectors of whole blocks that start on a group or lie
// in one.
HWY_INLINE bool NNVector(const QView& q) {
#if HWY_TARGET == HWY_SCALAR || HWY_HAVE_SCALABLE
  (void)q;
  return false;
#else
  // (the coefficient quads are packed with shifts and read as bytes: little-endian lanes)
  if constexpr (std::endian::native != std::endian::little) return false;
  constexpr std::size_t N8 = hn::MaxLanes(DU8());
  const std::size_t gb = q.group / 2;
  return q.nibble && !q.lanes && q.bits <= 4 && q.group % 32 == 0 && (gb % N8 == 0 || N8 % gb == 0) && hn::MaxLanes(DF()) >= 4 &&
         hn::MaxLanes(DF()) <= 16;
#endif
}

// c times a DC vector of bf16 scales from s.
HWY_INLINE hn::Vec<DC> NNCoefVec(const std::uint16_t* s, float c) {
  const DC dc;
  const hn::Rebind<std::uint16_t, DC> d16;
  const hn::RebindToUnsigned<DC> du32;
  return hn::Mul(hn::BitCast(dc, hn::ShiftLeft<16>(hn::PromoteTo(du32, hn::LoadU(d16, s)))), hn::Set(dc, c));
}

// 1 where |cs| (a) is inf or NaN, else 0.
HWY_INLINE hn::Vec<DC> NNNonFinite(hn::Vec<DC> a) {
  const DC dc;
  return hn::IfThenZeroElse(hn::Le(a, hn::Set(dc, 3.40282347e38f)), hn::Set(dc, 1.0f));
}

// Row r's coefficients cs[g] = c * s[r, ga + g] for g < ns, lanes [ns, W) zero (W: whole DC vectors).
HWY_INLINE void NNCoefRow(const QView& q, std::size_t gpr, std::size_t r, std::size_t ga, std::size_t ns, std::size_t W, float c,
                          float* HWY_RESTRICT out) {
  const DC dc;
  const std::size_t NC = hn::Lanes(dc);
  std::size_t g = 0;
  if (!q.lanes) {
    const std::uint16_t* s = q.scales + r * gpr + ga;
    for (; g + NC <= ns; g += NC) hn::Store(NNCoefVec(s + g, c), dc, out + g);
  }
  for (; g < ns; ++g) out[g] = s2lc::bf16_to_f32(q.scale_bits(r, ga + g)) * c;
  for (; g < W; ++g) out[g] = 0.0f;
}

// The per-strip state: groups [ga, ga + ns), W lanes of them (ns rounded up to DC vectors), and
// Wq = W + 4 (what a LoadDup128 at the last group may read).
struct NNStrip {
  std::size_t ga, ns, W, Wq;
  const float* sig;         // [Wq]: sigma_g (NaN: a non-finite coefficient; 0: all zero)
  const std::int32_t* sum;  // [Wq]: sum of the chunk's cq per group
  const std::int32_t* qq;   // [steps][Wq]: quad s of group g: cq of rows 4s..4s+3 (bytes, low first)
};

// Where a vector of the strip's codes starts: group g of the strip, byte ob of its codes.
struct NNAt {
  std::size_t g, ob;
};

#if HWY_TARGET != HWY_SCALAR && !HWY_HAVE_SCALABLE
// Adds the 4 x 2 accumulators of the vector at `at` to y: per block L (its group's sigma and
// bias broadcast by idx), lanes 4 R + i of block L are the columns 4 R + i of its 16, which start
// boff[L] columns after the vector's first (low nibbles; the high ones gb later); a block
// transpose gives them in order.
HWY_INLINE void NNFlush(const QView& q, const NNStrip& st, NNAt at, std::size_t gb, VU8 idx, const std::size_t* boff, const VI (&acc)[4][2],
                        float* y) {
  const DF df;
  const DI di;
  constexpr std::size_t NB = hn::MaxLanes(DF()) / 4;
  const VI bias = hn::ShiftLeft<3>(hn::BitCast(di, hn::TableLookupBytes(hn::LoadDup128(di, st.sum + at.g), idx)));
  const VF sig = hn::BitCast(df, hn::TableLookupBytes(hn::BitCast(di, hn::LoadDup128(df, st.sig + at.g)), idx));
  float* y0 = y + (st.ga + at.g) * q.group + at.ob;
  for (std::size_t h = 0; h < 2; ++h, y0 += gb) {
    VF R[4];
    for (std::size_t i = 0; i < 4; ++i) R[i] = hn::Mul(hn::ConvertTo(df, hn::Sub(acc[i][h], bias)), sig);
    for (std::size_t L = 0; L < NB; ++L) {
      float* yb = y0 + boff[L];  // the block's 16 columns
      if constexpr (NB == 1) {
        for (std::size_t i = 0; i < 4; ++i) hn::StoreU(hn::Add(hn::LoadU(df, yb + 4 * i), R[i]), df, yb + 4 * i);
      } else if constexpr (NB == 2) {
        const VF a = L == 0 ? hn::ConcatLowerLower(df, R[1], R[0]) : hn::ConcatUpperUpper(df, R[1], R[0]);
        const VF b = L == 0 ? hn::ConcatLowerLower(df, R[3], R[2]) : hn::ConcatUpperUpper(df, R[3], R[2]);
        hn::StoreU(hn::Add(hn::LoadU(df, yb), a), df, yb);
        hn::StoreU(hn::Add(hn::LoadU(df, yb + 8), b), df, yb + 8);
      } else {
        // [R0.bL, R1.bL, R2.bL, R3.bL]: halves of R0/R2 and R1/R3, then even and odd blocks
        const bool upper = L >= 2;
        const VF t0 = upper ? hn::ConcatUpperUpper(df, R[2], R[0]) : hn::ConcatLowerLower(df, R[2], R[0]);
        const VF t1 = upper ? hn::ConcatUpperUpper(df, R[3], R[1]) : hn::ConcatLowerLower(df, R[3], R[1]);
        const VF v = L % 2 == 0 ? hn::OddEvenBlocks(hn::SwapAdjacentBlocks(t1), t0) : hn::OddEvenBlocks(t1, hn::SwapAdjacentBlocks(t0));
        hn::StoreU(hn::Add(hn::LoadU(df, yb), v), df, yb);
      }
    }
  }
}

// The TB vectors from byte offset o0 of the strip (codes from row p's, stride rb; where each
// starts: at[t]) over nc rows.
template <std::size_t TB, bool kDp>
HWY_INLINE void NNTile(const QView& q, const NNStrip& st, const std::uint8_t* p, std::size_t rb, std::size_t nc, std::size_t o0,
                       const NNAt* at, std::size_t gb, VU8 idx, const std::size_t* boff, float* y) {
  const DU8 du8;
  const DI di;
  const hn::Repartition<std::uint16_t, DU8> du16;
  const std::size_t N8 = hn::Lanes(du8);
  VI acc[TB][4][2];
  for (auto& a : acc)
    for (auto& b : a) b[0] = b[1] = hn::Zero(di);
  const VU8 m88 = hn::Set(du8, std::uint8_t{0x88}), m0f = hn::Set(du8, std::uint8_t{0x0F}), zero = hn::Zero(du8);
  const std::uint8_t* pr = p + o0;
  for (std::size_t k = 0, s = 0; k < nc; k += 4, ++s, pr += 4 * rb) {
    // every line of the tile's 4 rows, in order (the tile's first line only left the rest of a
    // short row to the hardware prefetcher: 10 % slower cold, bench/RESULTS.md)
    for (std::size_t i = 0; i < 4 && k + i < nc; ++i)
      for (std::size_t t = 0; t < TB * N8; t += 64) hwy::Prefetch(pr + i * rb + t + kPrefetchAhead);
    for (std::size_t t = 0; t < TB; ++t) {
      const VI8 co = hn::BitCast(DI8(), hn::TableLookupBytes(hn::LoadDup128(di, st.qq + s * st.Wq + at[t].g), idx));
      const std::uint8_t* pc = pr + t * N8;
      const VU8 r0 = hn::LoadU(du8, pc);
      const VU8 r1 = k + 1 < nc ? hn::LoadU(du8, pc + rb) : zero;
      const VU8 r2 = k + 2 < nc ? hn::LoadU(du8, pc + 2 * rb) : zero;
      const VU8 r3 = k + 3 < nc ? hn::LoadU(du8, pc + 3 * rb) : zero;
      const auto a = hn::BitCast(du16, hn::InterleaveLower(du8, r0, r1)), b = hn::BitCast(du16, hn::InterleaveUpper(du8, r0, r1));
      const auto c = hn::BitCast(du16, hn::InterleaveLower(du8, r2, r3)), d = hn::BitCast(du16, hn::InterleaveUpper(du8, r2, r3));
      const VU8 T[4] = {hn::BitCast(du8, hn::InterleaveLower(du16, a, c)), hn::BitCast(du8, hn::InterleaveUpper(du16, a, c)),
                        hn::BitCast(du8, hn::InterleaveLower(du16, b, d)), hn::BitCast(du8, hn::InterleaveUpper(du16, b, d))};
      for (std::size_t R = 0; R < 4; ++R) {
        const VU8 x = hn::Xor(T[R], m88);  // both nibbles c + 8, in [0, 15]
        const VU8 lo = hn::And(x, m0f), hi = hn::And(hn::BitCast(du8, hn::ShiftRight<4>(hn::BitCast(du16, x))), m0f);
        acc[t][R][0] = DotU8I8<kDp>(acc[t][R][0], lo, co);
        acc[t][R][1] = DotU8I8<kDp>(acc[t][R][1], hi, co);
      }
    }
  }
  for (std::size_t t = 0; t < TB; ++t) NNFlush(q, st, at[t], gb, idx, boff, acc[t], y);
}
#endif

// Widest group NNScalar sums row by row (a stack array of column sums); wider ones go element by element.
inline constexpr std::size_t kNNScalarMax = 1024;

// Scalar columns: groups [ga + g0, ga + g1) of the strip over rows [r, r + nc) (exact integer
// sums, one f32 product per group and column, as the vector body). Row-major codes of groups up to
// kNNScalarMax columns go row by row over the bytes into int32 column sums (the same sums; element
// by element through stored_code took about 2.5x as long: q8_gemv_nn on 8-bit 256 x 256, 79 -> 28 us).
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("no-tree-vectorize")))  // (see TailRow)
#endif
inline HWY_NOINLINE void NNScalar(const QView& q, const NNStrip& st, std::size_t r, std::size_t nc, std::size_t g0, std::size_t g1, float* y) {
  const std::size_t rb = q.row_bytes();
  for (std::size_t g = g0; g < g1; ++g) {
    const std::size_t c0 = (st.ga + g) * q.group, c1 = std::min<std::size_t>(q.cols, c0 + q.group), n = c1 - c0;
    if (!q.lanes && n <= kNNScalarMax) {
      std::int32_t sum[kNNScalarMax];
      std::fill_n(sum, n, 0);
      const std::size_t h = (n + 1) / 2;
      for (std::size_t k = 0; k < nc; ++k) {
        const int cq = static_cast<std::int8_t>(static_cast<std::uint32_t>(st.qq[(k / 4) * st.Wq + g]) >> (8 * (k % 4)));
        if (cq == 0) continue;
        if (!q.nibble) {
          const auto* c = reinterpret_cast<const std::int8_t*>(q.codes + (r + k) * rb + c0);
          for (std::size_t j = 0; j < n; ++j) sum[j] += cq * c[j];
        } else {  // code j < h in byte j's low nibble, code h + j in its high one
          const auto* c = reinterpret_cast<const std::int8_t*>(q.codes + (r + k) * rb + (st.ga + g) * (q.group / 2));
          for (std::size_t j = 0; j < h; ++j) sum[j] += cq * detail::low_nibble(c[j]);
          for (std::size_t j = 0; j < n - h; ++j) sum[h + j] += cq * detail::high_nibble(c[j]);
        }
      }
      for (std::size_t j = 0; j < n; ++j) y[c0 + j] += static_cast<float>(sum[j]) * st.sig[g];
      continue;
    }
    for (std::size_t j = c0; j < c1; ++j) {
      std::int32_t sum = 0;
      for (std::size_t k = 0; k < nc; ++k) {
        const auto cq = static_cast<std::int8_t>(static_cast<std::uint32_t>(st.qq[(k / 4) * st.Wq + g]) >> (8 * (k % 4)));
        sum += cq * detail::stored_code(q, r + k, j);
      }
      y[j] += static_cast<float>(sum) * st.sig[g];
    }
  }
}

#if HWY_TARGET == HWY_AVX3_DL
// Q8Quantize's path for groups of 32 over whole 256-column blocks (8 groups; the compressor's
// default group), the same bits as QuantizeGroup and the corr / sxl loops, about twice as fast
// (bench/RESULTS.md, "Activation quantization"):
//  * the 8 group maxima as one vector, a tree of two-table permutes (not 8 reductions), so the
//    scales and 127 / amax are two vector divisions, not 16 scalar ones;
//  * a code is the low byte of (x * inv + 1.5 * 2^23)'s bits (round half to even as before, the
//    integer subtraction of the old path only moved it to the low byte's place), with explicit
//    rounding so the two cannot fuse into one FMA (|x * inv| <= 127 (1 + u) rounds to at most 127,
//    so the old clamp changed nothing); 32 codes per vpermt2b;
//  * every part of the activations' record written once (no clearing first), corr from the
//    codes in registers rather than reloaded from the stores just made.

// The 8 group maxima of |x| (as bits: ordered as the floats, inf / NaN above every finite value)
// of columns [256 b, 256 b + 256), lanes 0-7 (and again 8-15).
HWY_INLINE __m512i GroupMax256(const float* xr, std::size_t b) {
  // level l: segments of 16 >> l lanes per group in (a, c) -> half as long, a's groups then c's
  alignas(64) static constexpr std::int32_t kIdx[4][2][16] = {
      {{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23}, {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31}},
      {{0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27}, {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31}},
      {{0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29}, {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31}},
      {{0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30}, {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31}}};
  const __m512i absm = _mm512_set1_epi32(0x7FFFFFFF);
  const float* x = xr + 256 * b;
  __m512i m[8];
  for (std::size_t g = 0; g < 8; ++g)
    m[g] = _mm512_max_epi32(_mm512_and_si512(_mm512_castps_si512(_mm512_loadu_ps(x + 32 * g)), absm),
                            _mm512_and_si512(_mm512_castps_si512(_mm512_loadu_ps(x + 32 * g + 16)), absm));
  auto level = [&](int l, __m512i a, __m512i c) {
    return _mm512_max_epi32(_mm512_permutex2var_epi32(a, _mm512_load_si512(kIdx[l][0]), c),
                            _mm512_permutex2var_epi32(a, _mm512_load_si512(kIdx[l][1]), c));
  };
  const __m512i w0 = level(0, m[0], m[1]), w1 = level(0, m[2], m[3]), w2 = level(0, m[4], m[5]), w3 = level(0, m[6], m[7]);
  const __m512i z = level(2, level(1, w0, w1), level(1, w2, w3));
  return level(3, z, z);
}

// Block b's codes, corr and sxl from its scales s and 127 / amax iv (8 groups in lanes 0-7).
// kSkip: the groups of bit set in skip (all tiny, or a non-finite value) keep zero codes.
template <bool kNib, bool kSkip>
HWY_INLINE void Quantize256(const float* xr, std::size_t b, __m512 s, __m512 iv, unsigned skip, std::int8_t* lo, std::int8_t* hi,
                            float* sxl, std::int32_t* corr) {
  alignas(64) static constexpr std::uint8_t kLow[64] = {  // the low byte of each i32 lane of (a, c), twice
      0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60, 64, 68, 72, 76, 80, 84, 88, 92, 96, 100, 104, 108, 112, 116, 120, 124,
      0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60, 64, 68, 72, 76, 80, 84, 88, 92, 96, 100, 104, 108, 112, 116, 120, 124};
  alignas(64) static constexpr std::int32_t kSpread[2][16] = {{0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1},
                                                              {0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3}};
  constexpr int kRn = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const __m512i sel = _mm512_load_si512(kLow), spread = _mm512_load_si512(kSpread[kNib ? 1 : 0]);
  const __m512 magic = _mm512_set1_ps(12582912.0f);
  const VU8 off = hn::Set(DU8(), static_cast<std::uint8_t>(kNib ? 8 : 128));
  const float* x = xr + 256 * b;
  auto code = [&](std::size_t i) {  // columns 16 i ... 16 i + 15: codes in the low byte of each lane
    const std::size_t g = i / 2;
    const __m512 ivg = _mm512_permutexvar_ps(_mm512_set1_epi32(static_cast<int>(g)), iv);
    __m512 v = _mm512_add_round_ps(_mm512_mul_round_ps(_mm512_loadu_ps(x + 16 * i), ivg, kRn), magic, kRn);
    if constexpr (kSkip) v = _mm512_mask_mov_ps(v, static_cast<__mmask16>(skip >> g & 1 ? 0xFFFF : 0), magic);
    return _mm512_castps_si512(v);
  };
  auto pack = [&](std::size_t i0, std::size_t i1, std::size_t i2, std::size_t i3) {  // 64 bytes: (i0, i1) then (i2, i3)
    const __m512i r1 = _mm512_permutex2var_epi8(code(i0), sel, code(i1));
    const __m512i r2 = _mm512_permutex2var_epi8(code(i2), sel, code(i3));
    return _mm512_mask_blend_epi64(0xF0, r1, r2);
  };
  auto dot = [&](VI acc, __m512i c) { return DotU8I8(acc, off, VI8{c}); };
  if constexpr (!kNib) {  // 2 groups per 64 bytes of lo; hi stays zero
    for (std::size_t k = 0; k < 4; ++k) {
      const __m512i c = pack(4 * k, 4 * k + 1, 4 * k + 2, 4 * k + 3);
      _mm512_storeu_si512(lo + 256 * b + 64 * k, c);
      _mm512_storeu_si512(hi + 256 * b + 64 * k, _mm512_setzero_si512());
      _mm512_storeu_si512(corr + 64 * b + 16 * k, dot(hn::Zero(DI()), c).raw);
      _mm512_storeu_ps(sxl + 64 * b + 16 * k, _mm512_permutexvar_ps(_mm512_add_epi32(spread, _mm512_set1_epi32(static_cast<int>(2 * k))), s));
    }
  } else {  // 4 groups per 64 bytes: their first 16 columns to lo, the other 16 to hi
    for (std::size_t k = 0; k < 2; ++k) {
      const std::size_t i = 8 * k;
      const __m512i l = pack(i, i + 2, i + 4, i + 6), h = pack(i + 1, i + 3, i + 5, i + 7);
      _mm512_storeu_si512(lo + 128 * b + 64 * k, l);
      _mm512_storeu_si512(hi + 128 * b + 64 * k, h);
      _mm512_storeu_si512(corr + 32 * b + 16 * k, dot(dot(hn::Zero(DI()), l), h).raw);
      _mm512_storeu_ps(sxl + 32 * b + 16 * k, _mm512_permutexvar_ps(_mm512_add_epi32(spread, _mm512_set1_epi32(static_cast<int>(4 * k))), s));
    }
  }
}

// Q8Quantize for q.group == 32 and whole 256-column blocks (then rb == rbp: no padding in lo / hi).
HWY_INLINE void Quantize32(const QView& q, const float* x, std::size_t ldx, std::size_t nt, std::uint8_t* out) {
  const Layout L = MakeLayout(q);
  const std::size_t abytes = Q8Acts::bytes(q), nb = q.cols / 256, sxb = Q8Acts::padded(4 * L.gpr);
  for (std::size_t t = 0; t < nt; ++t) {
    std::uint8_t* act = out + t * abytes;
    auto* lo = reinterpret_cast<std::int8_t*>(act);
    auto* hi = lo + L.rbp;
    auto* sxl = reinterpret_cast<float*>(act + 2 * L.rbp);
    auto* corr = reinterpret_cast<std::int32_t*>(act + 3 * L.rbp);
    auto* sx = reinterpret_cast<float*>(act + 4 * L.rbp);
    _mm512_storeu_si512(act + 4 * L.rbp + sxb - 64, _mm512_setzero_si512());  // the scales' padding (then the scales)
    const float* xr = x + t * ldx;
    for (std::size_t b = 0; b < nb; ++b) {
      const __m512i bits = GroupMax256(xr, b);
      const __mmask16 bad = _mm512_cmpgt_epi32_mask(bits, _mm512_set1_epi32(0x7F7FFFFF));  // inf / NaN
      const __m512 amax = _mm512_maskz_mov_ps(static_cast<__mmask16>(~bad), _mm512_castsi512_ps(bits));
      const __mmask16 tiny = _mm512_cmp_ps_mask(amax, _mm512_set1_ps(1e-30f), _CMP_LT_OQ);
      // as QuantizeGroup: scale NaN (non-finite), 0 (tiny) or amax / 127; 127 / amax where neither
      const __m512 s = _mm512_mask_mov_ps(_mm512_maskz_mov_ps(static_cast<__mmask16>(~tiny), _mm512_div_ps(amax, _mm512_set1_ps(127.0f))),
                                          bad, _mm512_set1_ps(std::nanf("")));
      const __m512 iv = _mm512_maskz_mov_ps(static_cast<__mmask16>(~(bad | tiny)), _mm512_div_ps(_mm512_set1_ps(127.0f), amax));
      _mm256_storeu_ps(sx + 8 * b, _mm512_castps512_ps256(s));
      const unsigned skip = static_cast<unsigned>(bad | tiny) & 0xFFu;
      if (q.nibble) {
        if (HWY_UNLIKELY(skip)) Quantize256<true, true>(xr, b, s, iv, skip, lo, hi, sxl, corr);
        else Quantize256<true, false>(xr, b, s, iv, 0, lo, hi, sxl, corr);
      } else {
        if (HWY_UNLIKELY(skip)) Quantize256<false, true>(xr, b, s, iv, skip, lo, hi, sxl, corr);
        else Quantize256<false, false>(xr, b, s, iv, 0, lo, hi, sxl, corr);
      }
    }
  }
}
#endif

}  // namespace q8k

/// Quantizes nt tokens (x[t * ldx + c], c < q.cols) into the Q8Acts layout of q's codes.
inline HWY_NOINLINE void Q8Quantize(const QView& q, const float* x, std::size_t ldx, std::size_t nt, std::uint8_t* out) {
#if HWY_TARGET == HWY_AVX3_DL
  if (q.group == 32 && q.cols && q.cols % 256 == 0) return q8k::Quantize32(q, x, ldx, nt, out);
#endif
  const q8k::Layout L = q8k::MakeLayout(q);
  const std::size_t abytes = Q8Acts::bytes(q);
  const std::size_t G = q.group, NF = hn::Lanes(q8k::DF());
  for (std::size_t t = 0; t < nt; ++t) {
    std::uint8_t* act = out + t * abytes;
    std::memset(act, 0, abytes);
    auto* lo = reinterpret_cast<std::int8_t*>(act);
    auto* hi = lo + L.rbp;
    auto* sxl = reinterpret_cast<float*>(act + 2 * L.rbp);
    auto* corr = reinterpret_cast<std::int32_t*>(act + 3 * L.rbp);
    auto* sx = reinterpret_cast<float*>(act + 4 * L.rbp);
    const float* xr = x + t * ldx;
    for (std::size_t g = 0; g < L.gpr; ++g) {
      const std::size_t c0 = g * G, n = std::min(G, static_cast<std::size_t>(q.cols) - c0);
      if (n == G && G % (2 * NF) == 0) {  // whole group, whole vectors (halves too): vector body
        q8k::QuantizeGroup(xr + c0, G, q.nibble, lo + (q.nibble ? g * L.gb : c0), q.nibble ? hi + g * L.gb : nullptr, sx + g);
        continue;
      }
      float amax = 0.0f;
      bool finite = true;
      for (std::size_t j = 0; j < n; ++j) {
        const float a = std::fabs(xr[c0 + j]);
        if (!(a <= 3.40282347e38f)) finite = false;  // inf or NaN
        else amax = std::max(amax, a);
      }
      // A non-finite input makes its group's scale NaN, so every product with it is NaN.
      // Groups below 1e-30 quantize to zero (127 / amax would overflow for subnormal amax).
      const bool tiny = amax < 1e-30f;
      sx[g] = !finite ? std::nanf("") : tiny ? 0.0f : amax / 127.0f;
      const float inv = finite && !tiny ? 127.0f / amax : 0.0f;
      for (std::size_t j = 0; j < n; ++j) {
        const float v = finite ? std::nearbyint(xr[c0 + j] * inv) : 0.0f;
        const auto xq = static_cast<std::int8_t>(std::clamp(v, -127.0f, 127.0f));
        const std::size_t c = c0 + j;
        if (!q.nibble) lo[c] = xq;
        else {
          const std::size_t h = (n + 1) / 2;
          if (j < h) lo[g * L.gb + j] = xq;
          else hi[g * L.gb + j - h] = xq;
        }
      }
    }
    // (every whole 4-byte lane of whole groups: the rows-in-lanes kernel sums a group's lanes)
    const std::size_t lanes_end = L.gb % 4 == 0 ? L.full * L.gb : L.vend;
    std::size_t i0 = 0;
    // corr (the offset of codes read as c + 8, nibbles, or c + 128, bytes, times the activations):
    // a vector of lanes at a time, 8 (128) times the 4 low plus 4 high bytes (zero for bytes)
    const int off = q.nibble ? 8 : 128;
    if (L.vend) {
      const q8k::DU8 du8;
      const q8k::DI8 di8;
      const q8k::DI di;
      const auto eight = hn::Set(du8, static_cast<std::uint8_t>(off));
      const std::size_t N8 = hn::Lanes(du8);
      for (; 4 * i0 + N8 <= lanes_end; i0 += N8 / 4) {
        const auto s8 = q8k::DotU8I8(q8k::DotU8I8(hn::Zero(di), eight, hn::LoadU(di8, lo + 4 * i0)), eight, hn::LoadU(di8, hi + 4 * i0));
        hn::StoreU(s8, di, corr + i0);
      }
    }
    // each whole group's lanes take its scale (lanes_end is 0 unless gb is a multiple of 4)
    if (lanes_end) {
      const q8k::DF df;
      const std::size_t per = L.gb / 4;
      for (std::size_t g = 0; g < L.full; ++g) {
        const auto s = hn::Set(df, sx[g]);
        float* p = sxl + g * per;
        std::size_t j = 0;
        for (; j + NF <= per; j += NF) hn::StoreU(s, df, p + j);
        if (j < per) hn::BlendedStore(s, hn::FirstN(df, per - j), df, p + j);
      }
    }
    for (std::size_t i = i0; 4 * i < lanes_end; ++i) {
      std::int32_t s = 0;
      for (std::size_t j = 0; j < 4; ++j) s += lo[4 * i + j] + hi[4 * i + j];
      corr[i] = off * s;
    }
  }
}

/// Bytes of the tokens-in-lanes tiles of nt tokens for q's layout (0: that path does not apply).
inline HWY_NOINLINE std::size_t Q8TilesBytes(const QView& q, std::size_t nt) {
  if (q.lanes) return q8k::LanesNative(q, nt) ? 0 : Q8TilesBytes(q8k::RowMajor(q), nt);  // (the tiles of that many tokens)
  const q8k::Layout L = q8k::MakeLayout(q);
  const std::size_t S = q8k::TokensLanes(q, L, nt);
  return S == 4 ? q8k::TilesBytes<4>(L, nt) : S == 2 ? q8k::TilesBytes<2>(L, nt) : S == 1 ? q8k::TilesBytes<1>(L, nt) : 0;
}

/// Builds the tiles of nt tokens' activations (q8_quantize's, for q's layout) into out.
inline HWY_NOINLINE void Q8Tiles(const QView& q, const std::uint8_t* acts, std::size_t nt, std::uint8_t* out) {
  if (q.lanes) {
    if (!q8k::LanesNative(q, nt)) Q8Tiles(q8k::RowMajor(q), acts, nt, out);
    return;
  }
  const q8k::Layout L = q8k::MakeLayout(q);
  const std::size_t S = q8k::TokensLanes(q, L, nt), abytes = Q8Acts::bytes(q);
  if (S == 4) q8k::BuildTiles<4>(L, acts, abytes, nt, out);
  else if (S == 2) q8k::BuildTiles<2>(L, acts, abytes, nt, out);
  else if (S == 1) q8k::BuildTiles<1>(L, acts, abytes, nt, out);
}

/// Q8GemvNT with the tiles Q8Tiles built for these activations (null: built per call).
template <bool kDp>
HWY_NOINLINE void Q8GemvNTTilesImpl(const QView& q, std::size_t r0, std::size_t nr, const std::uint8_t* acts, const std::uint8_t* tiles,
                                 std::size_t nt, float alpha, float* y, std::size_t ldy) {
  if (q.lanes) {
    if (q8k::LanesNative(q, nt)) return q8k::LanesQ8<kDp>(q, r0, nr, acts, nt, alpha, y, ldy);
    // larger batches: tokens in lanes, reading the panels in place (the tiles are the row-major
    // form's); else (a range not on a panel, or too few lanes) on each panel unpacked
    if (q8k::TokensPath<kDp>(q, q8k::MakeLayout(q), r0, nr, acts, tiles, nt, Q8Acts::bytes(q), alpha, y, ldy)) return;
    return q8k::ForPanels(q, r0, nr, [&](const QView& v, std::size_t i0, std::size_t n, std::size_t off) {
      Q8GemvNTTilesImpl<kDp>(v, i0, n, acts, tiles, nt, alpha, y + off, ldy);
    });
  }
  const q8k::Layout L = q8k::MakeLayout(q);
  const std::size_t abytes = Q8Acts::bytes(q);
  if (q8k::TokensPath<kDp>(q, L, r0, nr, acts, tiles, nt, abytes, alpha, y, ldy)) return;
  const q8k::DF df;
  HWY_ALIGN std::int32_t idx[hn::MaxLanes(df)];
  const std::size_t per = std::max<std::size_t>(1, L.gb / 4);
  for (std::size_t i = 0; i < hn::Lanes(df); ++i) idx[i] = static_cast<std::int32_t>(std::min(i / per, hn::Lanes(df) - 1));
  const auto rep = hn::SetTableIndices(df, idx);
  // Column segments of at most kScaleBuf / 4 groups, row panels whose scales fit the buffer; the
  // rows' partial sums of each segment are added to y (the tail goes with the last segment).
  HWY_ALIGN float sbuf[q8k::kScaleBuf + hn::MaxLanes(df)];
  const std::size_t NL = hn::Lanes(df), gvec = L.vend / L.gb, seg = q8k::kScaleBuf / 4;
  for (std::size_t g0 = 0;;) {
    const std::size_t g1 = std::min(gvec, g0 + seg), ns = g1 - g0;
    q8k::Span sp{g0, g1, sbuf, std::max<std::size_t>(ns, 1), g1 == gvec && gvec < L.gpr};
    const std::size_t panel = std::max<std::size_t>(4, q8k::kScaleBuf / sp.lds / 4 * 4);
    for (std::size_t p0 = 0; p0 < nr; p0 += panel) {
      const std::size_t np = std::min(panel, nr - p0);
      if (ns == L.gpr) {  // whole rows: the panel's scales are contiguous
        BF16ToF32(q.scales + (r0 + p0) * L.gpr, sbuf, np * ns);
      } else {
        for (std::size_t i = 0; i < np; ++i)
          for (std::size_t g = 0; g < ns; ++g) sbuf[i * sp.lds + g] = s2lc::bf16_to_f32(q.scales[(r0 + p0 + i) * L.gpr + g0 + g]);
      }
      for (std::size_t j = 0; j < NL; ++j) sbuf[np * sp.lds + j] = 0.0f;  // what the last row's loads may touch
      float* yp = y + p0;
      if (q.nibble) {
        if (L.bcast) q8k::Panel<true, true, kDp>(q, L, rep, sp, r0 + p0, np, acts, nt, abytes, alpha, yp, ldy);
        else q8k::Panel<true, false, kDp>(q, L, rep, sp, r0 + p0, np, acts, nt, abytes, alpha, yp, ldy);
      } else {
        if (L.bcast) q8k::Panel<false, true, kDp>(q, L, rep, sp, r0 + p0, np, acts, nt, abytes, alpha, yp, ldy);
        else q8k::Panel<false, false, kDp>(q, L, rep, sp, r0 + p0, np, acts, nt, abytes, alpha, yp, ldy);
      }
    }
    if (g1 == gvec) break;
    g0 = g1;
  }
}

inline HWY_NOINLINE void Q8GemvNTTiles(const QView& q, std::size_t r0, std::size_t nr, const std::uint8_t* acts,
                                       const std::uint8_t* tiles, std::size_t nt, float alpha, float* y, std::size_t ldy) {
  q8k::WithDp([&](auto dp) { Q8GemvNTTilesImpl<decltype(dp)::value>(q, r0, nr, acts, tiles, nt, alpha, y, ldy); });
}

/// y[t * ldy + i] += alpha * sum_j q[r0 + i, j] xq_t[j] (scaled per group), i < nr, t < nt; the
/// codes at their stored precision.
inline HWY_NOINLINE void Q8GemvNT(const QView& q, std::size_t r0, std::size_t nr, const std::uint8_t* acts, std::size_t nt,
                                  float alpha, float* y, std::size_t ldy) {
  Q8GemvNTTiles(q, r0, nr, acts, nullptr, nt, alpha, y, ldy);
}

/// Whether Q8GemvNT's vector body takes all of q's whole groups here (a partial last group is the
/// scalar tail either way); HWY_SCALAR: true (all scalar alike). Where it does not, the groups
/// left run TailRow at about 2 cycles per code: 4-bit 256 x 200 in groups of 64 (the vector body
/// takes two of a row's three whole groups, a whole number of 64-byte vectors) took 11.8 us
/// against 5.6 with f32 activations, AVX-512.
inline HWY_NOINLINE bool Q8GemvNTVectorized(const QView& q) {
  if (HWY_TARGET == HWY_SCALAR || q.lanes) return true;
  const q8k::Layout L = q8k::MakeLayout(q);
  return L.full > 0 && L.vend == L.full * L.gb;
}

/// Whether Q8GemvNN's vector body covers every column of q here: whole groups only, and with
/// groups narrower than a vector, a whole number of vectors of them.
inline HWY_NOINLINE bool Q8GemvNNVectorized(const QView& q) {
  if (!q8k::NNVector(q) || q.cols % q.group != 0) return false;
  const std::size_t gb = q.group / 2, N8 = hn::Lanes(q8k::DU8());
  return gb >= N8 || (q.cols / q.group) % (N8 / gb) == 0;
}

/// y[j] += sum_k c[k] q[k0 + k, j] for k < nk: the coefficients quantized to int8 per group of
/// columns over the rows (sigma_g = max_k |c[k] s[k0 + k, g]| / 127, see q8k::NNStrip), the codes
/// at their stored precision; exact integer sums per group and chunk of q8k::kNNRows rows.
template <bool kDp>
HWY_NOINLINE void Q8GemvNNImpl(const QView& q, std::size_t k0, std::size_t nk, const float* c, float* y) {
  if (nk == 0 || q.cols == 0) return;
  const q8k::DC dc;
  const q8k::DCI dci;
  const std::size_t NC = hn::Lanes(dc), gpr = q.groups_per_row();
  constexpr std::size_t kW = q8k::kNNStrip, kWq = kW + 4, kR = q8k::kNNRows;
  HWY_ALIGN float cs[kR * kW];  // the chunk's coefficients, [row][group]
  HWY_ALIGN float row[kW], amax[kW], bad[kW], inv[kW], sig[kWq];
  HWY_ALIGN std::int32_t sum[kWq], qq[kR / 4 * kWq];
#if HWY_TARGET != HWY_SCALAR && !HWY_HAVE_SCALABLE
  const bool vec = q8k::NNVector(q);
  const std::size_t gb = q.group / 2, rb = q.row_bytes(), N8 = hn::Lanes(q8k::DU8());
  // block L of a vector reads the quad (sigma, sum) of group 16 L / gb of the 4 loaded from its first
  HWY_ALIGN std::uint8_t ib[hn::MaxLanes(q8k::DU8())];
  std::size_t boff[hn::MaxLanes(q8k::DU8()) / 16];  // block L's first column after the vector's
  for (std::size_t L = 0; L < N8 / 16; ++L) {
    const auto first = static_cast<std::uint8_t>(vec ? 4 * (16 * L / gb) : 0);
    const std::uint8_t quad[4] = {first, static_cast<std::uint8_t>(first + 1), static_cast<std::uint8_t>(first + 2),
                                  static_cast<std::uint8_t>(first + 3)};
    for (std::size_t j = 0; j < 4; ++j) std::memcpy(ib + 16 * L + 4 * j, quad, 4);
    boff[L] = vec ? 16 * L / gb * q.group + 16 * L % gb : 0;
  }
  const q8k::VU8 idx = hn::Load(q8k::DU8(), ib);
#endif
  {  // The coefficient rounding below issues no prefetches (it reads only scales): a cold call
     // brings the next 4 KB past the rows' prefetch distance in under it (measured: 4 % of a cold
     // 2048 x 1408 expert; the same burst before q8_gemv_nt's set-up work gained nothing).
    const std::uint8_t* front = q.codes + k0 * q.row_bytes() + kPrefetchAhead;
    for (std::size_t o = 0; o < 4096; o += 64) hwy::Prefetch(front + o);
  }
  for (std::size_t ga = 0; ga < gpr; ga += q8k::kNNStrip) {
    const std::size_t ns = std::min(q8k::kNNStrip, gpr - ga), W = (ns + NC - 1) / NC * NC, Wq = W + 4;
    // sigma per group over every row (the first chunk's coefficients kept; amax in registers)
    const std::size_t n0 = std::min(nk, kR);
    const bool whole = !q.lanes && ns == W;  // the coefficients straight from whole vectors of scales
    if (!whole)
      for (std::size_t k = 0; k < n0; ++k) q8k::NNCoefRow(q, gpr, k0 + k, ga, ns, W, c[k], cs + k * W);
    for (std::size_t g = 0; g < W; g += NC) {
      // two chains (a max's latency per row had dominated); bd: 1 where inf or NaN
      auto am0 = hn::Zero(dc), am1 = am0, bd0 = am0, bd1 = am0;
      const std::uint16_t* sp = whole ? q.scales + k0 * gpr + ga + g : nullptr;
      auto row_at = [&](std::size_t k) {
        if (!whole) return hn::Load(dc, cs + k * W + g);
        const auto v = q8k::NNCoefVec(sp + k * gpr, c[k]);
        hn::Store(v, dc, cs + k * W + g);
        return v;
      };
      std::size_t k = 0;
      for (; k + 2 <= n0; k += 2) {
        const auto a0 = hn::Abs(row_at(k)), a1 = hn::Abs(row_at(k + 1));
        am0 = hn::Max(am0, a0), bd0 = hn::Max(bd0, q8k::NNNonFinite(a0));
        am1 = hn::Max(am1, a1), bd1 = hn::Max(bd1, q8k::NNNonFinite(a1));
      }
      if (k < n0) {
        const auto a0 = hn::Abs(row_at(k));
        am0 = hn::Max(am0, a0), bd0 = hn::Max(bd0, q8k::NNNonFinite(a0));
      }
      hn::Store(hn::Max(am0, am1), dc, amax + g), hn::Store(hn::Max(bd0, bd1), dc, bad + g);
    }
    for (std::size_t k = n0; k < nk; ++k) {
      q8k::NNCoefRow(q, gpr, k0 + k, ga, ns, W, c[k], row);
      for (std::size_t g = 0; g < W; g += NC) {
        const auto a = hn::Abs(hn::Load(dc, row + g));
        hn::Store(hn::Max(hn::Load(dc, amax + g), a), dc, amax + g);
        hn::Store(hn::Max(hn::Load(dc, bad + g), q8k::NNNonFinite(a)), dc, bad + g);
      }
    }
    // as q8_quantize: a non-finite coefficient makes its group NaN, below 1e-30 it is zero
    for (std::size_t g = 0; g < W; g += NC) {
      const auto am = hn::Load(dc, amax + g), bd = hn::Load(dc, bad + g);
      const auto live = hn::And(hn::Eq(bd, hn::Zero(dc)), hn::Ge(am, hn::Set(dc, 1e-30f)));
      const auto s127 = hn::Set(dc, 127.0f);
      hn::Store(hn::IfThenElse(hn::Eq(bd, hn::Zero(dc)), hn::IfThenElseZero(live, hn::Div(am, s127)), hn::Set(dc, std::nanf(""))), dc, sig + g);
      hn::Store(hn::IfThenElseZero(live, hn::Div(s127, am)), dc, inv + g);
    }
    for (std::size_t g = W; g < Wq; ++g) sig[g] = 0.0f;
    const q8k::NNStrip st{ga, ns, W, Wq, sig, sum, qq};
    for (std::size_t kc = 0; kc < nk; kc += kR) {
      const std::size_t nc = std::min(kR, nk - kc), steps = (nc + 3) / 4;
      if (kc > 0)
        for (std::size_t k = 0; k < nc; ++k) q8k::NNCoefRow(q, gpr, k0 + kc + k, ga, ns, W, c[kc + k], cs + k * W);
      // cq = round_half_even(cs / sigma): |cs * inv| <= 127 (1 + 2u) rounds into [-127, 127]
      // (non-finite groups: any bytes, their sigma is NaN)
      const auto ff = hn::Set(dci, 0xFF);
      for (std::size_t g = 0; g < W; g += NC) {
        const auto vinv = hn::Load(dc, inv + g);
        auto acc = hn::Zero(dci);
        for (std::size_t s = 0; s < steps; ++s) {
          hn::Vec<q8k::DCI> v[4];
          for (std::size_t i = 0; i < 4; ++i)
            v[i] = 4 * s + i < nc ? hn::NearestInt(hn::Mul(hn::Load(dc, cs + (4 * s + i) * W + g), vinv)) : hn::Zero(dci);
          const auto quad = hn::Or(hn::Or(hn::And(v[0], ff), hn::ShiftLeft<8>(hn::And(v[1], ff))),
                                   hn::Or(hn::ShiftLeft<16>(hn::And(v[2], ff)), hn::ShiftLeft<24>(v[3])));
          hn::StoreU(quad, dci, qq + s * Wq + g);
          acc = hn::Add(acc, hn::Add(hn::Add(v[0], v[1]), hn::Add(v[2], v[3])));
        }
        hn::Store(acc, dci, sum + g);
      }
      for (std::size_t g = W; g < Wq; ++g) sum[g] = 0;
      for (std::size_t s = 0; s < steps; ++s)
        for (std::size_t g = W; g < Wq; ++g) qq[s * Wq + g] = 0;
      std::size_t gv = 0;  // groups [0, gv) of the strip run the vector body
#if HWY_TARGET != HWY_SCALAR && !HWY_HAVE_SCALABLE
      if (vec) {
        const std::size_t full = q.cols / q.group, gfull = full > ga ? std::min(ns, full - ga) : 0;
        const std::size_t nvec = gb >= N8 ? gfull * gb / N8 : gfull / (N8 / gb);
        gv = gb >= N8 ? gfull : nvec * (N8 / gb);
        const std::uint8_t* p = q.codes + (k0 + kc) * rb + ga * gb;
        constexpr std::size_t TB = hn::MaxLanes(q8k::DU8()) >= 64 ? 2 : 1;  // accumulators: 8 TB
        q8k::NNAt at[TB] = {};
        std::size_t v = 0;
        auto where = [&](std::size_t v0, std::size_t n) {  // the n vectors from v0 (one division per tile)
          std::size_t g = v0 * N8 / gb, ob = v0 * N8 % gb;
          for (std::size_t t = 0; t < n; ++t, ob += N8) {
            for (; ob >= gb; ob -= gb) ++g;
            at[t] = {g, ob};
          }
        };
        for (; v + TB <= nvec; v += TB) where(v, TB), q8k::NNTile<TB, kDp>(q, st, p, rb, nc, v * N8, at, gb, idx, boff, y);
        for (; v < nvec; ++v) where(v, 1), q8k::NNTile<1, kDp>(q, st, p, rb, nc, v * N8, at, gb, idx, boff, y);
      }
#endif
      if (gv < ns) q8k::NNScalar(q, st, k0 + kc, nc, gv, ns, y);
    }
  }
}

inline HWY_NOINLINE void Q8GemvNN(const QView& q, std::size_t k0, std::size_t nk, const float* c, float* y) {
  q8k::WithDp([&](auto dp) { Q8GemvNNImpl<decltype(dp)::value>(q, k0, nk, c, y); });
}

// ---- Low-rank block products in int16 fixed point (lowrank_add_fixed, the JIT merge) ----------
namespace q8k {

// acc[i] += lo16(a[i]) lo16(b[i]) + hi16(a[i]) hi16(b[i]) (signed int16 pairs; the callers'
// operand bounds keep every sum inside int32, so all targets agree exactly). kDp: vpdpwssd
// (AVX-VNNI, AVX512_VNNI) instead of pmaddwd and an add, the same sums (see DotU8I8).
template <bool kDp = false>
HWY_INLINE VI DotI16(VI acc, VI a, VI b) {
#if HWY_TARGET == HWY_AVX3_DL
  // Written out for GCC too: GCC 12's _mm512_dpwssd_epi32 in lowrank_add_fixed's tile copied
  // every accumulator twice per step (88 against 184 G multiply-adds/s, K = 48, 256 x 256).
  __m512i r = acc.raw;
  asm("vpdpwssd {%2, %1, %0|%0, %1, %2}" : "+v"(r) : "v"(a.raw), "v"(b.raw));
  return VI{r};
#elif HWY_TARGET == HWY_AVX3
  if constexpr (kDp) {
    __m512i r = acc.raw;
    asm("vpdpwssd {%2, %1, %0|%0, %1, %2}" : "+v"(r) : "v"(a.raw), "v"(b.raw));
    return VI{r};
  }
  return hn::Add(acc, VI{_mm512_madd_epi16(a.raw, b.raw)});
#elif HWY_TARGET == HWY_AVX2
  if constexpr (kDp) {
    __m256i r = acc.raw;
    asm("%{vex%} vpdpwssd {%2, %1, %0|%0, %1, %2}" : "+x"(r) : "x"(a.raw), "x"(b.raw));
    return VI{r};
  }
  return hn::Add(acc, VI{_mm256_madd_epi16(a.raw, b.raw)});
#elif HWY_TARGET == HWY_SSE4 || HWY_TARGET == HWY_SSSE3
  return hn::Add(acc, VI{_mm_madd_epi16(a.raw, b.raw)});
#else
  const DI di;
  HWY_ALIGN std::int32_t av[hn::MaxLanes(di)], bv[hn::MaxLanes(di)], r[hn::MaxLanes(di)];
  hn::Store(acc, di, r), hn::Store(a, di, av), hn::Store(b, di, bv);
  for (std::size_t i = 0; i < hn::Lanes(di); ++i) {
    const auto lo = [](std::int32_t x) { return static_cast<std::int64_t>(static_cast<std::int16_t>(static_cast<std::uint16_t>(x))); };
    const auto hi = [](std::int32_t x) { return static_cast<std::int64_t>(x >> 16); };
    r[i] = static_cast<std::int32_t>(r[i] + lo(av[i]) * lo(bv[i]) + hi(av[i]) * hi(bv[i]));
  }
  return hn::Load(di, r);
#endif
}

// Prefetch of a line about to be written.
HWY_INLINE void PrefetchW(const void* p) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p, 1, 3);
#else
  hwy::Prefetch(p);
#endif
}

// NearestInt of values known to lie in int32's range: x86's conversion alone (round to nearest
// even, as NearestInt), without NearestInt's overflow fixup (four more operations per vector in
// lowrank_add_fixed's factor passes).
HWY_INLINE VI RoundInRange(VF v) {
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3
  return VI{_mm512_cvtps_epi32(v.raw)};
#elif HWY_TARGET == HWY_AVX2
  return VI{_mm256_cvtps_epi32(v.raw)};
#elif HWY_TARGET == HWY_SSE4 || HWY_TARGET == HWY_SSSE3
  return VI{_mm_cvtps_epi32(v.raw)};
#else
  return hn::NearestInt(v);
#endif
}

// The int16 pair (q0, q1) of two int32 values in [-32767, 32767], as one int32 lane.
HWY_INLINE VI PairI16(VI q0, VI q1) { return hn::Or(hn::And(q0, hn::Set(DI(), 0xFFFF)), hn::ShiftLeft<16>(q1)); }
HWY_INLINE std::int32_t PairI16(std::int32_t q0, std::int32_t q1) {
  return static_cast<std::int32_t>((static_cast<std::uint32_t>(q0) & 0xFFFFu) | (static_cast<std::uint32_t>(q1) << 16));
}

// Register tiles of lowrank_add_fixed: 4 rows x kFixedV vectors of columns.
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3
inline constexpr std::size_t kFixedV = 4;
#else
inline constexpr std::size_t kFixedV = 2;
#endif

}  // namespace q8k

// See lowrank_add_fixed in qgemm.hpp. Scratch (lowrank_fixed_scratch words): rho, 1 / rho [K];
// lambda [rb4]; the left pairs, per tile of 4 rows [Kp][4]; the right pairs, per slab of
// kFixedV vectors of columns [Kp][slab width].
template <bool kDp>
HWY_NOINLINE void LowRankAddFixedImpl(const float* left, const float* right, std::size_t K, std::size_t rb, std::size_t cb, float w,
                                      float* out, std::size_t ldo, bool overwrite, std::int32_t* scratch, const PrefetchRows* pf) {
  using q8k::DI;
  using q8k::VI;
  const q8k::DF df;
  const DI di;
  const std::size_t N = hn::Lanes(df), W = q8k::kFixedV * N, Kp = (K + 1) / 2, rb4 = (rb + 3) / 4 * 4;
  const std::size_t ns = (cb + W - 1) / W;  // slabs of W columns (the last one zero-padded)
  if (K == 0) {  // an empty product: nothing to add, zeros to write
    if (overwrite)
      for (std::size_t i = 0; i < rb; ++i) std::fill(out + i * ldo, out + i * ldo + cb, 0.0f);
    return;
  }
  static_assert(q8k::kFixedV * hn::MaxLanes(q8k::DF()) <= 256, "lowrank_fixed_scratch pads columns to 256");
  int rbits, abits;
  fixed_bits(K, rbits, abits);
  const float rmax = static_cast<float>((1 << rbits) - 1), amax = static_cast<float>((1 << abits) - 1);
  float* rho = reinterpret_cast<float*>(scratch);
  float* rinv = rho + K;
  float* lam = rinv + K;
  std::int32_t* P = scratch + (2 * K + rb4 + 15) / 16 * 16;
  std::int32_t* Rp = P + (Kp * rb4 + 15) / 16 * 16;
  // The right factor per row k: R16 = round(R / rho_k), rho_k = max_j |R[k, j]| / rmax; a pair
  // of rows scaled, then paired while it is still in L1.
  auto row_scale = [&](std::size_t k) {
    const float* r = right + k * cb;
    float m = 0.0f;
    std::size_t j = 0;
    if (cb >= N) {
      auto mv = hn::Zero(df);
      for (; j + N <= cb; j += N) mv = hn::Max(mv, hn::Abs(hn::LoadU(df, r + j)));
      m = hn::GetLane(hn::MaxOfLanes(df, mv));
    }
    for (; j < cb; ++j) m = std::max(m, std::fabs(r[j]));
    rho[k] = m / rmax, rinv[k] = m > 0.0f ? rmax / m : 0.0f;
  };
  for (std::size_t kp = 0; kp < Kp; ++kp) {
    row_scale(2 * kp);
    if (2 * kp + 1 < K) row_scale(2 * kp + 1);
    const float* r0 = right + 2 * kp * cb;
    const float* r1 = 2 * kp + 1 < K ? r0 + cb : nullptr;
    const float i0 = rinv[2 * kp], i1 = r1 ? rinv[2 * kp + 1] : 0.0f;
    auto at = [&](std::size_t j) { return Rp + (j / W) * Kp * W + kp * W + j % W; };
    std::size_t j = 0;
    for (; j + N <= cb; j += N) {
      const VI q0 = q8k::RoundInRange(hn::Mul(hn::LoadU(df, r0 + j), hn::Set(df, i0)));
      const VI q1 = r1 ? q8k::RoundInRange(hn::Mul(hn::LoadU(df, r1 + j), hn::Set(df, i1))) : hn::Zero(di);
      hn::StoreU(q8k::PairI16(q0, q1), di, at(j));
    }
    for (; j < cb; ++j)
      *at(j) = q8k::PairI16(static_cast<std::int32_t>(std::nearbyint(r0[j] * i0)), r1 ? static_cast<std::int32_t>(std::nearbyint(r1[j] * i1)) : 0);
    for (; j < ns * W; ++j) *at(j) = 0;
  }
  // The left factor per column i (a block row): A16 = round(L rho_k / lambda_i), lambda_i =
  // max_k |L[k, i] rho_k| / amax; stored as pairs per tile of 4 rows.
  auto put = [&](std::size_t i, std::size_t kp, std::int32_t v) { P[(i / 4) * Kp * 4 + kp * 4 + i % 4] = v; };
  std::size_t i = 0;
  for (; i + N <= rb; i += N) {
    auto mv = hn::Zero(df);
    for (std::size_t k = 0; k < K; ++k) mv = hn::Max(mv, hn::Abs(hn::Mul(hn::LoadU(df, left + k * rb + i), hn::Set(df, rho[k]))));
    const auto live = hn::Gt(mv, hn::Zero(df));
    const auto inv = hn::IfThenElseZero(live, hn::Div(hn::Set(df, amax), mv));
    hn::StoreU(hn::Mul(hn::Div(mv, hn::Set(df, amax)), hn::Set(df, w)), df, lam + i);
    HWY_ALIGN std::int32_t pr[hn::MaxLanes(di)];
    for (std::size_t kp = 0; kp < Kp; ++kp) {
      const VI q0 = q8k::RoundInRange(hn::Mul(hn::Mul(hn::LoadU(df, left + 2 * kp * rb + i), hn::Set(df, rho[2 * kp])), inv));
      const VI q1 = 2 * kp + 1 < K ? q8k::RoundInRange(hn::Mul(hn::Mul(hn::LoadU(df, left + (2 * kp + 1) * rb + i), hn::Set(df, rho[2 * kp + 1])), inv))
                                   : hn::Zero(di);
      hn::Store(q8k::PairI16(q0, q1), di, pr);
      std::size_t l = 0;
      if constexpr (hn::MaxLanes(DI()) % 4 == 0) {
        // i is a multiple of 4 then: each 4 lanes are one tile's 4 rows, contiguous in P
        if (N % 4 == 0)
          for (; l < N; l += 4) std::memcpy(P + ((i + l) / 4) * Kp * 4 + kp * 4, pr + l, 4 * sizeof(std::int32_t));
      }
      for (; l < N; ++l) put(i + l, kp, pr[l]);
    }
  }
  for (; i < rb; ++i) {
    float m = 0.0f;
    for (std::size_t k = 0; k < K; ++k) m = std::max(m, std::fabs(left[k * rb + i] * rho[k]));
    const float inv = m > 0.0f ? amax / m : 0.0f;
    lam[i] = m / amax * w;
    for (std::size_t kp = 0; kp < Kp; ++kp) {
      const auto q = [&](std::size_t k) { return k < K ? static_cast<std::int32_t>(std::nearbyint(left[k * rb + i] * rho[k] * inv)) : 0; };
      put(i, kp, q8k::PairI16(q(2 * kp), q(2 * kp + 1)));
    }
  }
  for (; i < rb4; ++i) {
    lam[i] = 0.0f;
    for (std::size_t kp = 0; kp < Kp; ++kp) put(i, kp, 0);
  }
  // out[i, j] (+)= lambda_i sum_kp dot(pair_L[kp, i], pair_R[kp, j]) per 4 x kFixedV-vector tile;
  // before each tile, its share of pf's rows is prefetched for writing (floor(rows (tile + 1) /
  // tiles) rows by the end of the tile, counted without the two divisions per tile it took).
  constexpr std::size_t V = q8k::kFixedV;
  const std::size_t tiles = ns * ((rb + 3) / 4);
  std::size_t pf_row = 0, pf_acc = 0;
  for (std::size_t s = 0; s < ns; ++s) {
    const std::int32_t* Rs = Rp + s * Kp * W;
    for (std::size_t i0 = 0; i0 < rb; i0 += 4) {
      if (pf && pf->p) {
        const char* base = static_cast<const char*>(pf->p);
        for (pf_acc += pf->rows; pf_acc >= tiles; pf_acc -= tiles, ++pf_row) {
          const char* row = base + pf_row * pf->ld_bytes;
          for (std::size_t o = 0; o < pf->row_bytes; o += 64) q8k::PrefetchW(row + o);
          if (pf->row_bytes) q8k::PrefetchW(row + pf->row_bytes - 1);  // an unaligned row's last line
        }
      }
      const std::int32_t* Pt = P + (i0 / 4) * Kp * 4;
      VI acc[4][V];
      for (std::size_t t = 0; t < 4; ++t)
        for (std::size_t v = 0; v < V; ++v) acc[t][v] = hn::Zero(di);
      for (std::size_t kp = 0; kp < Kp; ++kp) {
        VI r[V];
        for (std::size_t v = 0; v < V; ++v) r[v] = hn::LoadU(di, Rs + kp * W + v * N);
        for (std::size_t t = 0; t < 4; ++t) {
          const VI a = hn::Set(di, Pt[kp * 4 + t]);
          for (std::size_t v = 0; v < V; ++v) acc[t][v] = q8k::DotI16<kDp>(acc[t][v], a, r[v]);
        }
      }
      if (i0 + 4 <= rb && (s + 1) * W <= cb) {
        // A whole tile: constant trip counts, so the accumulators stay in registers (the
        // bounded loop below kept them on the stack: a store and a reload per vector).
        HWY_UNROLL(4)
        for (std::size_t t = 0; t < 4; ++t) {
          const auto lv = hn::Set(df, lam[i0 + t]);
          float* o = out + (i0 + t) * ldo + s * W;
          HWY_UNROLL(4)
          for (std::size_t v = 0; v < V; ++v) {
            const auto f = hn::Mul(hn::ConvertTo(df, acc[t][v]), lv);
            hn::StoreU(overwrite ? f : hn::Add(hn::LoadU(df, o + v * N), f), df, o + v * N);
          }
        }
        continue;
      }
      for (std::size_t t = 0; t < 4 && i0 + t < rb; ++t) {
        const auto lv = hn::Set(df, lam[i0 + t]);
        float* o = out + (i0 + t) * ldo + s * W;
        for (std::size_t v = 0; v < V && s * W + v * N < cb; ++v) {
          const auto f = hn::Mul(hn::ConvertTo(df, acc[t][v]), lv);
          if (s * W + (v + 1) * N <= cb) {
            hn::StoreU(overwrite ? f : hn::Add(hn::LoadU(df, o + v * N), f), df, o + v * N);
          } else {
            HWY_ALIGN float tmp[hn::MaxLanes(df)];
            hn::Store(f, df, tmp);
            for (std::size_t l = 0; s * W + v * N + l < cb; ++l) o[v * N + l] = overwrite ? tmp[l] : o[v * N + l] + tmp[l];
          }
        }
      }
    }
  }
}

inline HWY_NOINLINE void LowRankAddFixed(const float* left, const float* right, std::size_t K, std::size_t rb, std::size_t cb, float w,
                                         float* out, std::size_t ldo, bool overwrite, std::int32_t* scratch,
                                         const PrefetchRows* pf) {
  q8k::WithDp([&](auto dp) { LowRankAddFixedImpl<decltype(dp)::value>(left, right, K, rb, cb, w, out, ldo, overwrite, scratch, pf); });
}

}  // namespace s2lc::kernels::HWY_NAMESPACE
#if HWY_TARGET == HWY_AVX3_DL
#pragma GCC pop_options
#endif
HWY_AFTER_NAMESPACE();

#endif  // per-target include guard
