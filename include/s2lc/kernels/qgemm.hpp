// s2lc — apply kernels: products with group-quantized matrices straight from their codes, f32
// GEMM micro-kernels for token batches, SwiGLU, the streaming-read bound and JIT merge.
// Dispatch follows <s2lc/kernels/convert.hpp> (static by default; S2LC_DYNAMIC_DISPATCH=1 plus
// one S2LC_IMPLEMENTATION TU for runtime dispatch). Every function ADDS into its output.
#pragma once

#include <cstddef>
#include <cstdint>

#include "s2lc/config.hpp"  // first: it may define HWY_WANT_AVX3_DL for Highway

#include <hwy/targets.h>

#include "s2lc/kernels/cpu.hpp"
#include "s2lc/kernels/qview.hpp"

#if !S2LC_DYNAMIC_DISPATCH
#include <hwy/highway.h>
#include "s2lc/kernels/qgemm-inl.h"
#endif

namespace s2lc::kernels {

#define S2LC_QGEMM_FUNCTIONS(X)                                                                                     \
  X(void, q_decode_rows, QDecodeRows, (const QView& q, std::size_t r0, std::size_t nr, unsigned tier, float* out,    \
                                       std::size_t ld), (q, r0, nr, tier, out, ld))                                  \
  X(void, q_decode_rows_add, QDecodeRowsAdd, (const QView& q, std::size_t r0, std::size_t nr, unsigned tier,         \
                                              float alpha, float* out, std::size_t ld),                              \
    (q, r0, nr, tier, alpha, out, ld))                                                                               \
  X(void, q_decode_rows_scaled, QDecodeRowsScaled, (const QView& q, std::size_t r0, std::size_t nr, unsigned tier,   \
                                                    float alpha, float* out, std::size_t ld),                        \
    (q, r0, nr, tier, alpha, out, ld))                                                                               \
  X(void, q_gemv_nt, QGemvNT, (const QView& q, std::size_t r0, std::size_t nr, unsigned tier, const float* x,        \
                               float alpha, float* y), (q, r0, nr, tier, x, alpha, y))                               \
  X(void, q_gemv_nn, QGemvNN, (const QView& q, std::size_t k0, std::size_t nk, unsigned tier, const float* c,        \
                               float* y), (q, k0, nk, tier, c, y))                                                   \
  X(void, q_gemm_nt, QGemmNT, (const QView& q, std::size_t r0, std::size_t nr, unsigned tier, const float* x,        \
                               std::size_t ldx, std::size_t nt, float alpha, float* y, std::size_t ldy),             \
    (q, r0, nr, tier, x, ldx, nt, alpha, y, ldy))                                                                    \
  X(void, q_gemm_nn, QGemmNN, (const QView& q, std::size_t k0, std::size_t nk, unsigned tier, const float* c,        \
                               std::size_t ldc, std::size_t nt, float* y, std::size_t ldy),                          \
    (q, k0, nk, tier, c, ldc, nt, y, ldy))                                                                           \
  X(void, q8_quantize, Q8Quantize, (const QView& q, const float* x, std::size_t ldx, std::size_t nt,              \
                                     std::uint8_t* out), (q, x, ldx, nt, out))                                       \
  X(void, q8_gemv_nt, Q8GemvNT, (const QView& q, std::size_t r0, std::size_t nr, const std::uint8_t* acts,          \
                                 std::size_t nt, float alpha, float* y, std::size_t ldy),                            \
    (q, r0, nr, acts, nt, alpha, y, ldy))                                                                            \
  X(void, q8_gemv_nn, Q8GemvNN, (const QView& q, std::size_t k0, std::size_t nk, const float* c, float* y),         \
    (q, k0, nk, c, y))                                                                                               \
  X(bool, q8_gemv_nn_vectorized, Q8GemvNNVectorized, (const QView& q), (q))                                         \
  X(bool, q8_gemv_nt_vectorized, Q8GemvNTVectorized, (const QView& q), (q))                                         \
  X(std::size_t, q8_tiles_bytes, Q8TilesBytes, (const QView& q, std::size_t nt), (q, nt))                           \
  X(void, q8_tiles, Q8Tiles, (const QView& q, const std::uint8_t* acts, std::size_t nt, std::uint8_t* out),         \
    (q, acts, nt, out))                                                                                              \
  X(void, q8_gemv_nt_tiles, Q8GemvNTTiles, (const QView& q, std::size_t r0, std::size_t nr, const std::uint8_t* acts, \
                                             const std::uint8_t* tiles, std::size_t nt, float alpha, float* y,       \
                                             std::size_t ldy), (q, r0, nr, acts, tiles, nt, alpha, y, ldy))          \
  X(void, gemm_nt, GemmNT, (const float* w, std::size_t ldw, std::size_t nr, const float* x, std::size_t ldx,        \
                            std::size_t nt, std::size_t k, float alpha, float* y, std::size_t ldy),                  \
    (w, ldw, nr, x, ldx, nt, k, alpha, y, ldy))                                                                      \
  X(void, gemm_nn, GemmNN, (const float* c, std::size_t ldc, std::size_t nt, std::size_t k, const float* a,          \
                            std::size_t lda, std::size_t ncols, float* y, std::size_t ldy),                          \
    (c, ldc, nt, k, a, lda, ncols, y, ldy))                                                                          \
  X(void, gemm_tn, GemmTN, (const float* c, std::size_t ldc, std::size_t nt, std::size_t k, const float* a,          \
                            std::size_t lda, std::size_t ncols, float* y, std::size_t ldy),                          \
    (c, ldc, nt, k, a, lda, ncols, y, ldy))                                                                          \
  X(void, swiglu, SwiGLU, (const float* g, const float* u, float* out, std::size_t n), (g, u, out, n))              \
  X(void, add_scaled, AddScaled, (float a, const float* x, float* y, std::size_t n), (a, x, y, n))                \
  X(float, stream_read, StreamRead, (const float* p, std::size_t n), (p, n))                                        \
  X(std::uint64_t, stream_read_bytes, StreamReadBytes, (const std::uint8_t* p, std::size_t n), (p, n))               \
  X(std::size_t, fma_peak, FmaPeak, (std::size_t iters, float* sink), (iters, sink))                                \
  X(std::size_t, count_bits, CountBits, (const std::uint8_t* p, std::size_t n), (p, n))                             \
  X(std::int64_t, kernel_target_bit, KernelTargetBit, (), ())                                                        \
  X(std::size_t, merge_f32, MergeF32, (float* w, const float* d, std::size_t n, std::uint8_t* mask,                \
                                       float* bad_val), (w, d, n, mask, bad_val))                                    \
  X(std::size_t, unmerge_f32, UnmergeF32, (float* w, const float* d, std::size_t n, const std::uint8_t* mask,        \
                                           const float* vals, std::size_t nvals), (w, d, n, mask, vals, nvals))     \
  X(std::size_t, merge_bf16, MergeBF16, (std::uint16_t* w, const float* d, std::size_t n, std::uint8_t* mask,      \
                                         std::uint16_t* bad_val), (w, d, n, mask, bad_val))                          \
  X(std::size_t, unmerge_bf16, UnmergeBF16, (std::uint16_t* w, const float* d, std::size_t n, const std::uint8_t* mask, \
                                             const std::uint16_t* vals, std::size_t nvals), (w, d, n, mask, vals, nvals)) \
  X(std::size_t, q_merge_rows_f32, QMergeRowsF32, (const QView& q, std::size_t r0, std::size_t nr, unsigned tier,    \
                                                  float alpha, float* w, std::size_t ldw, std::uint8_t* mask,       \
                                                  std::size_t ldm, float* bad_val, const PrefetchRows* pf),         \
    (q, r0, nr, tier, alpha, w, ldw, mask, ldm, bad_val, pf))                                                        \
  X(std::size_t, q_unmerge_rows_f32, QUnmergeRowsF32, (const QView& q, std::size_t r0, std::size_t nr, unsigned tier, \
                                                      float alpha, float* w, std::size_t ldw, const std::uint8_t* mask, \
                                                      std::size_t ldm, const float* vals, std::size_t nvals,        \
                                                      const PrefetchRows* pf),                                       \
    (q, r0, nr, tier, alpha, w, ldw, mask, ldm, vals, nvals, pf))                                                    \
  X(std::size_t, q_merge_rows_bf16, QMergeRowsBF16, (const QView& q, std::size_t r0, std::size_t nr, unsigned tier,  \
                                                    float alpha, std::uint16_t* w, std::size_t ldw, std::uint8_t* mask, \
                                                    std::size_t ldm, std::uint16_t* bad_val, const PrefetchRows* pf), \
    (q, r0, nr, tier, alpha, w, ldw, mask, ldm, bad_val, pf))                                                        \
  X(std::size_t, q_unmerge_rows_bf16, QUnmergeRowsBF16, (const QView& q, std::size_t r0, std::size_t nr,             \
                                                        unsigned tier, float alpha, std::uint16_t* w, std::size_t ldw, \
                                                        const std::uint8_t* mask, std::size_t ldm,                   \
                                                        const std::uint16_t* vals, std::size_t nvals,                \
                                                        const PrefetchRows* pf),                                     \
    (q, r0, nr, tier, alpha, w, ldw, mask, ldm, vals, nvals, pf))                                                    \
  X(void, lowrank_add_fixed, LowRankAddFixed, (const float* left, const float* right, std::size_t k, std::size_t rb,  \
                                                std::size_t cb, float w, float* out, std::size_t ldo, bool overwrite,   \
                                                std::int32_t* scratch, const PrefetchRows* pf),                        \
    (left, right, k, rb, cb, w, out, ldo, overwrite, scratch, pf))

// q_decode_rows: out[i, :] (stride ld) = rows [r0, r0 + nr) of q decoded at `tier` (0: stored bits).
// q_decode_rows_add: out[i, :] += alpha * those decoded rows (one FMA per element).
// q_decode_rows_scaled: out[i, :] = alpha * those decoded rows (each decoded value rounded, then
//                the product: the bits of q_decode_rows followed by a multiply).
// q_gemv_nt:     y[i] += alpha * sum_j q[r0 + i, j] x[j],  i < nr.
// q_gemm_nt:     y[t * ldy + i] += alpha * sum_j q[r0 + i, j] x[t * ldx + j], i < nr, t < nt (rows in
//                lanes: each code decoded once per tile of up to 8 tokens; row-major: from 2
//                tokens each code decoded once per call into an L1 scratch, then f32 tiles for
//                every token; one token, or rows wider than 8192: q_gemv_nt per token).
// q_gemv_nn:     y[j] += sum_k c[k] q[k0 + k, j],          k < nk.
// q_gemm_nn:     y[t * ldy + j] += sum_k c[t * ldc + k] q[k0 + k, j], k < nk, t < nt (codes
//                decoded once per row for up to 8 tokens; what q_gemv_nn is per token).
// q8_quantize:   nt tokens x[t * ldx + c] (c < q.cols) to int8 in q's layout: out holds
//                nt * Q8Acts::bytes(q) bytes (see qview.hpp; bit-identical on every target).
// q8_gemv_nt:    y[t * ldy + i] += alpha * sum_g s[r0 + i, g] sx_t[g] sum_{j in g} code[r0 + i, j] xq_t[j]
//                for i < nr, t < nt: integer dot products (VNNI where the CPU has it), codes at
//                their stored precision (tiers take q_gemv_nt).
// q8_gemv_nn:   y[j] += sum_k c[k] q[k0 + k, j], k < nk, with c[k] s[k0 + k, g] quantized to int8
//                per group g of columns over the rows (cq = round_half_even(c s * 127 / amax_g),
//                sigma_g = amax_g / 127): y[j] += sigma_g sum_k cq[k, g] code[k0 + k, j], exact
//                integer sums (VNNI where the CPU has it) per chunk of 64 rows, so |dy_j| <=
//                sigma_g / 2 sum_k |code[k0 + k, j]| beyond q_gemv_nn's rounding. Codes at their
//                stored precision; the vector body takes row-major nibble codes whose groups are
//                a multiple of 32 columns (a low-rank block's left factor), the rest is scalar.
// q8_gemv_nn_vectorized: whether q8_gemv_nn's vector body covers every column of q on this target
//                (else some or all of it runs the scalar path: far slower than q_gemv_nn).
// q8_gemv_nt_vectorized: whether q8_gemv_nt's vector body takes all of q's whole groups on this
//                target (rows in lanes: always; row-major: group code bytes a multiple of 4 that
//                divide or are a multiple of the byte vector, and whole vectors of them: not byte
//                groups of 48 or 96 with AVX-512, nor a 64-column block of nibbles). Where not, it
//                runs the rest on its scalar path: 8-bit 256 x 288 in groups of 48 at one token 34
//                us against 3.5 for q_gemm_nt with f32 activations (morph's int8 activations take
//                f32 there, detail::apply_q8).
// q8_tiles_bytes, q8_tiles: the activation tiles q8_gemv_nt builds per call for 4+ tokens on
//                nibble codes (on rows in lanes 32+ with AVX-512, 16+ otherwise; tokens in lanes),
//                built once for activations that several matrices of the same layout (columns,
//                group) meet: their bytes (0: no tiles for this layout and nt on this target),
//                and building them.
// q8_gemv_nt_tiles: q8_gemv_nt with those tiles (null: built per call); the same result.
// gemm_nt:       y[t, i] += alpha * sum_k w[i, k] x[t, k]  (i < nr, t < nt).
// gemm_nn:       y[t, j] += sum_k c[t, k] a[k, j]          (t < nt, j < ncols).
// gemm_tn:       y[t, j] += sum_k c[k, t] a[k, j]          (c stored k-major: [k, ldc]).
// swiglu:        out[i] = g[i] / (1 + exp(-g[i])) * u[i].
// add_scaled:    y[i] += a * x[i], the product rounded, then the sum (never fused), i < n.
// stream_read:   the sum of p[0, n), read once (bandwidth bound).
// stream_read_bytes: the xor of the 8-byte words of p[0, n) (zero-padded), read once: the bound
//                of reading any bytes (codes, scales) without floating point on them.
// fma_peak:      iters rounds of independent register FMAs (the FMA bound); returns the f32
//                multiply-adds done (iters * 8 * lanes), their sum goes to *sink.
// count_bits:    the set bits of p[0, n) (the mask bits of a merge's undo record).
// kernel_target_bit: HWY_TARGET of the code that runs (Highway's target bit; see kernel_target).
// merge_*:       w += d (bf16: rounded to nearest even), returns the count of elements where
//                subtracting d would not restore w bit for bit; bit j of mask (ceil(n / 8) bytes,
//                all written) is set for each, and their old values go to bad_val in order
//                (n + 64 entries: whole vectors are stored).
// unmerge_*:     w -= d, then the recorded old values (vals: nvals left in the record, in order)
//                written back where merge set mask bits; returns how many it consumed.
// q_merge_rows_*, q_unmerge_rows_*: merge_* / unmerge_* of d = rows [r0, r0 + nr) of q decoded
//                (alpha == 1: q_decode_rows's bits; else q_decode_rows_scaled's, alpha times them)
//                into w's rows (ldw apart), decoded in registers: the f32 delta is never stored.
//                Mask rows ldm bytes apart (bit j: column j), zeroed by the caller for a merge;
//                the values in row order (merge: room for nr * q.cols + 64). The same bits,
//                mask and values as decoding the rows then merge_* / unmerge_* row by row. pf
//                (may be null): rows prefetched for writing, pf's row i just before w's row i.
// lowrank_add_fixed: out[i * ldo + j] += w * sum_k left[k * rb + i] right[k * cb + j] (i < rb,
//                j < cb; with overwrite, = instead of +=) in int16 fixed point: each right row k
//                rounded to R16 = round(R / rho_k), rho_k = max_j |R[k, j]| / rmax, each left
//                column i with those scales folded in to A16 = round(L rho_k / lambda_i),
//                lambda_i = max_k |L[k, i] rho_k| / amax, then exact int32 sums of int16 pairs
//                (vpdpwssd with AVX-512 VNNI: twice the f32 FMA rate) times w lambda_i. rmax and
//                amax are 2^b - 1 with (rmax amax K) < 2^31 (13 + 12 bits at K = 64, 15 + 15 at
//                K = 1), so |error| <= sum_k |L[k, i]| rho_k / 2 + lambda_i / 2 sum_k |R16[k, j]|
//                (before the final f32 rounding): about 2^-13 of the largest |L[k, i] R[k, j']|
//                per term. The same on every target. scratch: lowrank_fixed_scratch(k, rb, cb)
//                words. Finite factors only. pf (may be null): rows prefetched (for writing)
//                spread over the register tiles (the merge passes the buffer rows it updates next).

/// Scratch words of lowrank_add_fixed.
inline std::size_t lowrank_fixed_scratch(std::size_t k, std::size_t rb, std::size_t cb) noexcept {
  const std::size_t kp = (k + 1) / 2, rb4 = (rb + 3) / 4 * 4;
  return (2 * k + rb4 + 15) / 16 * 16 + (kp * rb4 + 15) / 16 * 16 + kp * ((cb + 255) / 256 * 256);
}

#if S2LC_DYNAMIC_DISPATCH
#define S2LC_DECLARE(ret, name, Name, params, args) ret name params;
S2LC_QGEMM_FUNCTIONS(S2LC_DECLARE)
#undef S2LC_DECLARE
#else
inline namespace S2LC_DETAIL_CAT(static_, HWY_NAMESPACE) {
#define S2LC_DEFINE(ret, name, Name, params, args) \
  inline ret name params { return HWY_STATIC_DISPATCH(Name) args; }
S2LC_QGEMM_FUNCTIONS(S2LC_DEFINE)
#undef S2LC_DEFINE
}  // namespace static_<target>
#endif

/// Highway's name of the SIMD target the kernels run on ("AVX3_DL", "AVX3", "AVX2", "SSE4",
/// "NEON", "SCALAR", ...), e.g. to log next to timings: the one a kernel call made now runs
/// (asked of a dispatched function, so it is what runtime dispatch really picks).
inline const char* kernel_target() { return hwy::TargetName(kernel_target_bit()); }

/// Whether q_gemm_nt's f32 batches run on AMX tiles in this process (amx.hpp): use_amx() and the
/// kernels run the AVX3_DL target, the one that takes them (a `--target avx2` run does not).
inline bool amx_in_use() { return use_amx() && kernel_target_bit() == HWY_AVX3_DL; }

/// Whether the int8 kernels (q8_*, lowrank_add_fixed) multiply with vpdpbusd / vpdpwssd in this
/// process: always on AVX3_DL, on AVX2 and AVX3 where use_vnni says the CPU has AVX-VNNI /
/// AVX512_VNNI (cpu.hpp); elsewhere pmaddubsw + pmaddwd or portable code. Results are the same.
inline bool vnni_in_use() { return vnni_on_target(kernel_target_bit()); }

}  // namespace s2lc::kernels
