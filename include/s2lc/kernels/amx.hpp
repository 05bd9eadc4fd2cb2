// s2lc::kernels — q_gemm_nt on Intel AMX tiles (x86-64 Linux, GCC 11+ / Clang 12+): f32
// activations times nibble or byte codes at f32 accuracy with bf16 tile products.
//
// Why: with f32 activations and 8+ tokens, the AVX-512 kernels decode nibbles to f32 and run one
// FMA per code and token; on a CPU with two 512-bit ports the decode and the FMAs share them and
// the kernel runs at about 1.5x the FMA bound. An AMX unit (Sapphire Rapids and later) does
// 16 x 16 x 32 bf16 multiply-adds per TDPBF16PS into f32, about 12x the f32 FMA rate of a core.
//
// How, exactly: a nibble code (an integer of magnitude <= 8, at any tier) is a bf16 exactly, and
// so are both parts of a byte code c = 16 hi + lo (hi its signed high nibble, lo the low one, as
// two tiles); every f32 activation x is the exact sum of three bf16, h + m + l: h is x with its
// low 16 bits cleared, m the same of x - h, l = x - h - m (each step exact, 8 significant bits
// each). So sum_j c_j x_j = sum_j c_j h_j + c_j m_j + c_j l_j, each product exact in f32; the tile
// sums in f32 with round-to-nearest-even. Per (16-row panel, group) a tile C (tokens x rows)
// takes the group's products, then the f32 kernel's step: the group's scales times C added into
// per-token accumulators. The result is within the f32 summation bound of the same sum as the
// FMA kernels (a different order of the same exact products). Differences from the FMA kernels:
// AMX treats bf16 inputs below 2^-126 (the m, l of |x| < ~2^-110) as zero and flushes results
// below 2^-126 to zero, which moves a result by at most ~2^-110 |x|.
//
// The tile state needs the OS's permission once per process (arch_prctl ARCH_REQ_XCOMP_PERM,
// Linux 5.16+), asked the first time cpu_has_amx_bf16() runs; each call configures the tiles of
// its thread and releases them when it returns (tiles are caller-saved in the psABI), and keeps
// about 37 KB on its stack (the A tiles of a span 24 KB, the B ring 8 KB, the C ring 4 KB).
// allow_amx(false) keeps the AVX-512 kernels (tests and benches run both).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "s2lc/kernels/cpu.hpp"
#include "s2lc/kernels/qview.hpp"

#if defined(__x86_64__) && defined(__linux__) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define S2LC_AMX 1
// Highway includes <immintrin.h> with -Wmaybe-uninitialized off (GCC 12 flags the
// _mm512_undefined_* idiom of its intrinsics where they inline); the first inclusion decides.
#if !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#if !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#define S2LC_AMX_ATTR __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,amx-tile,amx-bf16")))
#else
#define S2LC_AMX 0
#endif

namespace s2lc::kernels {

/// Whether q_gemm_nt takes the AMX kernel for nr rows and nt tokens of q: 16+ tokens, or, for
/// nibble codes, 8+ on more than 64 rows. Its cost per (16-row panel, group) hardly depends on the
/// tokens (decoding the codes to bf16 tiles, storing and scaling the sums), while the FMA
/// kernels' grows with them; each call also splits its activations. On the Intel VM (bench
/// kernel/ rows, hot): 4-bit 2048 x 1408 at 4 tokens 204-242 us against 176-188 on AVX-512, 8
/// tokens 254-270 against 305-334, 16 tokens 352-388 against 595-612; a 3-bit rank-36 right factor
/// (36 x 256) at 8 tokens 1.41-1.43 us against 1.26-1.28, at 16 tokens 2.25-2.36 against 2.40-2.48;
/// 5-bit (bytes) 2048 x 1408 at 8 tokens 345-365 against 334-356, at 16 523-541 against 680-693.
inline bool amx_gemm_worth(const QView& q, std::size_t nr, std::size_t nt) noexcept {
  return nt >= 16 || (q.nibble && nt >= 8 && nr > 64);
}

/// Whether amx_gemm_nt takes q at `tier` (0: stored bits): rows in lanes, groups of a multiple of
/// 32 columns; nibble codes (groups up to 256) at every tier, byte codes (groups up to 128) at
/// their stored bits (a code c = 16 h + l, h its signed high nibble, l the low one, is applied as
/// two bf16 tiles, 16 h and l: twice the products, the same decode per byte).
inline bool amx_gemm_fits(const QView& q, unsigned tier) noexcept {
  if (!q.lanes || q.group % 32 != 0) return false;
  return q.nibble ? q.group <= 256 : q.group <= 128 && (tier == 0 || tier >= q.bits);
}

#if S2LC_AMX
namespace amx {

struct alignas(64) TileConfig {
  std::uint8_t palette = 1, start_row = 0, reserved[14] = {};
  std::uint16_t colsb[16] = {};
  std::uint8_t rows[16] = {};
};

// Tiles: 0, 1 the group sums C (tokens x 16 rows, f32), alternating per group; 2-4 the three
// bf16 parts of the activations (tokens x 32 columns); 5, 6 the codes as bf16 (16 column pairs
// x 16 rows x 2), alternating per group; 7 the high nibbles of byte codes.
// Columns of activations split per pass (3 x 16 tokens x 256 x 2 bytes = 24 KB on the stack).
inline constexpr std::size_t kSpanCols = 256;

S2LC_AMX_ATTR inline void configure(std::size_t tokens) noexcept {
  TileConfig c;
  for (int i = 0; i < 8; ++i) c.colsb[i] = 64;
  for (int i = 0; i < 5; ++i) c.rows[i] = static_cast<std::uint8_t>(tokens);
  c.rows[5] = c.rows[6] = c.rows[7] = 16;
  _tile_loadconfig(&c);
}

// The three bf16 parts of 16 activations (bit patterns with the low 16 bits zero): h = x with the
// low 16 bits cleared (a NaN stays a NaN), m the same of x - h (0 where h is not finite), l the rest.
S2LC_AMX_ATTR inline void split3(__m512 x, __m512& h, __m512& m, __m512& l) noexcept {
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  __m512i hb = _mm512_and_si512(_mm512_castps_si512(x), hi);
  hb = _mm512_mask_or_epi32(hb, nan, hb, _mm512_set1_epi32(0x00400000));
  h = _mm512_castsi512_ps(hb);
  const __mmask16 fin = _mm512_cmp_ps_mask(_mm512_sub_ps(h, h), _mm512_setzero_ps(), _CMP_EQ_OQ);
  const __m512 r = _mm512_maskz_sub_ps(fin, x, h);
  m = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(r), hi));
  l = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(_mm512_sub_ps(r, m)), hi));
}

// 32 bf16 from the high halves of a (lanes 0-15) and b (16-31).
S2LC_AMX_ATTR inline __m512i high_halves(__m512 a, __m512 b, __m512i idx) noexcept {
  return _mm512_permutex2var_epi16(_mm512_castps_si512(a), idx, _mm512_castps_si512(b));
}

// Activations of tokens [0, nt) (X rows ldx apart), columns [c0, c0 + n) (n a multiple of 32), as
// the A tiles: a[chunk][part][token][32] bf16, in the order of the B tiles' column pairs: element
// 2 kk + e of a chunk is its column 4 (kk / 2) + kk % 2 + 2 e (decode_codes).
S2LC_AMX_ATTR inline void split_acts(const float* X, std::size_t ldx, std::size_t nt, std::size_t c0, std::size_t n,
                                     std::uint16_t* a) noexcept {
  alignas(64) std::uint16_t sel[32];  // column c's bf16 is 16-bit lane 2 c + 1 of (lo : hi)
  for (int w = 0; w < 32; ++w) sel[w] = static_cast<std::uint16_t>(2 * (4 * (w / 4) + (w / 2) % 2 + 2 * (w % 2)) + 1);
  const __m512i idx = _mm512_load_si512(sel);
  for (std::size_t ch = 0; ch < n / 32; ++ch)
    for (std::size_t u = 0; u < nt; ++u) {
      const float* x = X + u * ldx + c0 + 32 * ch;
      __m512 h0, m0, l0, h1, m1, l1;
      split3(_mm512_loadu_ps(x), h0, m0, l0);
      split3(_mm512_loadu_ps(x + 16), h1, m1, l1);
      std::uint16_t* dst = a + ch * 3 * 512 + u * 32;
      _mm512_store_si512(dst, high_halves(h0, h1, idx));
      _mm512_store_si512(dst + 512, high_halves(m0, m1, idx));
      _mm512_store_si512(dst + 1024, high_halves(l0, l1, idx));
    }
}

// The codes of one (panel, group) record as bf16 B tiles, one per 32 columns of the group:
// b[chunk][column pair][row][2]. Record quad k holds code bytes 4k .. 4k + 3 of the 16 rows (row i
// at 4i); byte j of a row holds column j (low nibble) and j + group / 2 (high), stored as c + 8.
// Read as 16-bit lanes, lane 2i holds bytes 0, 1 of row i and lane 2i + 1 bytes 2, 3: looked up
// as they are (vpermw reads an index's low 5 bits: the table repeats after 16), shifted by 4, 8
// and 12, they give the rows' pairs of columns (j, j + 2) for j = 4k, 4k + h, 4k + 1, 4k + 1 + h
// (h = group / 2) with no byte shuffle; split_acts orders the activations to match: the pair
// (j, j + 2) of a chunk's columns is its row kk = 2 ((j % 32) / 4) + j % 2.
S2LC_AMX_ATTR inline std::size_t pair_row(std::size_t j) noexcept { return (j / 32) * 512 + (2 * ((j % 32) / 4) + j % 2) * 32; }

S2LC_AMX_ATTR inline void decode_codes(const std::uint8_t* rec, std::size_t group, __m512i tbl, std::uint16_t* b) noexcept {
  const std::size_t h = group / 2;
  for (std::size_t k = 0; k < group / 8; ++k) {
    const __m512i v = _mm512_loadu_si512(rec + 64 * k);
    _mm512_store_si512(b + pair_row(4 * k), _mm512_permutexvar_epi16(v, tbl));
    _mm512_store_si512(b + pair_row(4 * k + h), _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), tbl));
    _mm512_store_si512(b + pair_row(4 * k + 1), _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 8), tbl));
    _mm512_store_si512(b + pair_row(4 * k + 1 + h), _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 12), tbl));
  }
}

// The same for byte codes: quad k holds columns 4k .. 4k + 3 of the 16 rows, as they are (int8).
// Both nibbles of a byte are looked up in their own table, the low one's value l (0 .. 15) into
// the tiles at b, the high one's 16 h (h signed) into the tiles at b + chunks * 512.
S2LC_AMX_ATTR inline void decode_bytes(const std::uint8_t* rec, std::size_t group, __m512i tlo, __m512i thi, std::uint16_t* b) noexcept {
  std::uint16_t* bh = b + group / 32 * 512;
  for (std::size_t k = 0; k < group / 4; ++k) {
    const __m512i v = _mm512_loadu_si512(rec + 64 * k);
    const std::size_t o0 = pair_row(4 * k), o1 = pair_row(4 * k + 1);
    _mm512_store_si512(b + o0, _mm512_permutexvar_epi16(v, tlo));
    _mm512_store_si512(bh + o0, _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), thi));
    _mm512_store_si512(b + o1, _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 8), tlo));
    _mm512_store_si512(bh + o1, _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 12), thi));
  }
}

// C tile c_ <- sum over the group's chunks of the three parts (tiles 2-4, from a) times the codes
// (tile b_, from b; byte codes: plus the high nibbles' tiles, tile 7, from b + chunks * 512);
// store_c stores it. (GCC's _tile_* are macros that paste the tile number into the assembly, so
// the numbers are literals: one function per tile.)
#define S2LC_AMX_GROUP_PRODUCTS(name, c_, b_)                                                                 \
  S2LC_AMX_ATTR inline void name(const std::uint16_t* a, const std::uint16_t* b, std::size_t chunks, bool bytes) noexcept { \
    _tile_zero(c_);                                                                                            \
    for (std::size_t ch = 0; ch < chunks; ++ch) {                                                              \
      _tile_loadd(2, a + ch * 1536, 64);                                                                       \
      _tile_loadd(3, a + ch * 1536 + 512, 64);                                                                 \
      _tile_loadd(4, a + ch * 1536 + 1024, 64);                                                                \
      _tile_loadd(b_, b + ch * 512, 64);                                                                       \
      _tile_dpbf16ps(c_, 2, b_);                                                                               \
      _tile_dpbf16ps(c_, 3, b_);                                                                               \
      _tile_dpbf16ps(c_, 4, b_);                                                                               \
      if (bytes) {                                                                                             \
        _tile_loadd(7, b + (chunks + ch) * 512, 64);                                                           \
        _tile_dpbf16ps(c_, 2, 7);                                                                              \
        _tile_dpbf16ps(c_, 3, 7);                                                                              \
        _tile_dpbf16ps(c_, 4, 7);                                                                              \
      }                                                                                                        \
    }                                                                                                          \
  }
S2LC_AMX_GROUP_PRODUCTS(group_products0, 0, 5)
S2LC_AMX_GROUP_PRODUCTS(group_products1, 1, 6)
#undef S2LC_AMX_GROUP_PRODUCTS
S2LC_AMX_ATTR inline void store_c(std::size_t k, float* c) noexcept {
  if (k) _tile_stored(1, c, 64);
  else _tile_stored(0, c, 64);
}

// The 16 f32 scales of a record (bf16, host order, after its codes).
S2LC_AMX_ATTR inline __m512 record_scales(const std::uint8_t* s) noexcept {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

}  // namespace amx

/// q_gemm_nt (qgemm.hpp) on AMX tiles for a q that amx_gemm_fits at tier t, where use_amx():
/// Y[u * ldy + i] += alpha * sum_j q[r0 + i, j] X[u * ldx + j] for i < nr, u < nt.
///
/// Per 16 tokens, per span of columns (kSpanCols: the activations' three parts as A tiles, 24 KB),
/// the (panel, group) items run as a software pipeline: the codes of item i + D are decoded to bf16
/// (a ring of S buffers) while item i's products run, and item i - L's stored C is scaled into the
/// panel's accumulators. A tile load of bytes stored just before stalls the tile unit (a
/// scratch loop on the Intel VM: 16 stores + load + 3 TDPBF16PS 32 ns, 14 ns one item apart), and
/// so does a tile store right after its products (23 against 15 ns per item stored one item
/// later). The kernel still takes 40-70 ns per item against 15-20 in such loops; loading the A
/// tiles once per group for 16 panels (sums in memory) and moving the buffers did not change it.
S2LC_AMX_ATTR inline void amx_gemm_nt(const QView& q, std::size_t r0, std::size_t nr, const TierParams& t, const float* X,
                                      std::size_t ldx, std::size_t nt, float alpha, float* Y, std::size_t ldy) noexcept {
  using namespace amx;
  const std::size_t R = QView::kLaneRows, gpr = q.groups_per_row(), span = std::max<std::size_t>(1, kSpanCols / q.group);
  const std::size_t chunks = q.group / 32, at = q.lanes_codes(), p0 = r0 / R, p1 = (r0 + nr + R - 1) / R;
  // ring slots of B tiles (8 KB) and the decode lead: 4 and 2 for groups of 32 (bytes) or 64
  // (nibbles); the sums of item i are stored at step i + 1 (4 slots) and scaled at step i + L
  const bool bytes = !q.nibble;
  const std::size_t slot = chunks * 512 * (bytes ? 2 : 1), S = slot <= 1024 ? 4 : slot <= 2048 ? 2 : 1, D = S / 2, L = 2;
  alignas(64) std::uint16_t a[kSpanCols / 32 * 3 * 512];  // A tiles of one span
  alignas(64) std::uint16_t b[8 * 512];                   // B tiles, S slots
  alignas(64) float c[4 * 256] = {};                      // C tiles stored, 4 slots (rows past the tokens: 0)
  alignas(64) std::uint16_t tab[32], thi[32];
  for (int n = 0; n < 32; ++n) {  // small integers: exact in bf16
    const int m = n & 15;
    // nibbles: stored nibble m = code + 8; bytes: the low nibble's value, and the high one's times 16
    const float v = bytes ? static_cast<float>(m) : t.nibble[m ^ 8], vh = static_cast<float>(16 * (m < 8 ? m : m - 16));
    std::uint32_t bits, bits_h;
    std::memcpy(&bits, &v, 4);
    std::memcpy(&bits_h, &vh, 4);
    tab[n] = static_cast<std::uint16_t>(bits >> 16), thi[n] = static_cast<std::uint16_t>(bits_h >> 16);
  }
  const __m512i tbl = _mm512_load_si512(tab), tblh = _mm512_load_si512(thi);
  const __m512 scale = _mm512_set1_ps(alpha * t.mul);  // t.mul: a power of two
  std::size_t configured = 0;
  for (std::size_t u0 = 0; u0 < nt; u0 += 16) {
    const std::size_t tb = std::min<std::size_t>(16, nt - u0);
    if (tb != configured) configure(tb), configured = tb;
    for (std::size_t g0 = 0; g0 < gpr; g0 += span) {
      const std::size_t ng = std::min(span, gpr - g0), items = (p1 - p0) * ng;
      split_acts(X + u0 * ldx, ldx, tb, g0 * q.group, ng * q.group, a);
      // cursors (panel, group) of the item decoded next (dn of them so far) and consumed next
      std::size_t dp = p0, dg = 0, dn = 0, cp = p0, cg = 0, ag = 0;
      // (a macro, not a lambda: Clang does not give lambdas the enclosing function's target)
#define S2LC_AMX_DECODE_NEXT()                                                                               \
  do {                                                                                                       \
    if (dp + 1 < p1) prefetch_lines(q.lanes_at(dp + 1, g0 + dg), q.lanes_record());                         \
    if (bytes) decode_bytes(q.lanes_at(dp, g0 + dg), q.group, tbl, tblh, b + (dn & (S - 1)) * slot);         \
    else decode_codes(q.lanes_at(dp, g0 + dg), q.group, tbl, b + (dn & (S - 1)) * slot);                     \
    ++dn;                                                                                                    \
    if (++dg == ng) dg = 0, ++dp;                                                                            \
  } while (0)
      for (std::size_t i = 0; i < std::min(D, items); ++i) S2LC_AMX_DECODE_NEXT();
      __m512 acc[16];
      for (auto& v : acc) v = _mm512_setzero_ps();
      for (std::size_t i = 0; i < items + L; ++i) {
        if (i < items) {
          if (dn < items) S2LC_AMX_DECODE_NEXT();
          const std::uint16_t* ai = a + ag * chunks * 1536;
          if (++ag == ng) ag = 0;
          const std::uint16_t* bi = b + (i & (S - 1)) * slot;
          if (i & 1) group_products1(ai, bi, chunks, bytes);
          else group_products0(ai, bi, chunks, bytes);
        }
        // item i - 1's sums stored after item i's products are queued: a tile store waits for its
        // products, and the tile unit runs in order
        if (i >= 1 && i <= items) store_c((i - 1) & 1, c + ((i - 1) & 3) * 256);
        if (i < L) continue;
        const __m512 s = record_scales(q.lanes_at(cp, g0 + cg) + at);
        const float* ci = c + ((i - L) & 3) * 256;
        if (tb > 8) {
          for (std::size_t u = 0; u < 16; ++u) acc[u] = _mm512_fmadd_ps(_mm512_load_ps(ci + 16 * u), s, acc[u]);
        } else {
          for (std::size_t u = 0; u < 8; ++u) acc[u] = _mm512_fmadd_ps(_mm512_load_ps(ci + 16 * u), s, acc[u]);
        }
        if (++cg != ng) continue;
        const std::size_t p = cp;
        cg = 0, ++cp;
        // the panel's sums: rows [lo, hi) of it are the caller's
        const std::size_t lo = std::max(r0, p * R) - p * R, hi = std::min(r0 + nr, p * R + R) - p * R;
        const __mmask16 m = static_cast<__mmask16>(((1u << (hi - lo)) - 1) << lo), mn = static_cast<__mmask16>((1u << (hi - lo)) - 1);
        for (std::size_t u = 0; u < tb; ++u) {
          float* y = Y + (u0 + u) * ldy + (p * R + lo - r0);
          if (m == 0xFFFF) {
            _mm512_storeu_ps(y, _mm512_fmadd_ps(acc[u], scale, _mm512_loadu_ps(y)));
          } else {
            const __m512 v = _mm512_maskz_compress_ps(m, acc[u]);
            _mm512_mask_storeu_ps(y, mn, _mm512_fmadd_ps(v, scale, _mm512_maskz_loadu_ps(mn, y)));
          }
          acc[u] = _mm512_setzero_ps();
        }
      }
    }
  }
  _tile_release();
}
#undef S2LC_AMX_DECODE_NEXT
#endif

}  // namespace s2lc::kernels
