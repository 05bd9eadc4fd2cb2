// s2lc CLI / bench — the compressed-apply measurement shared by `s2lc bench apply` and
// bench/apply.cpp: experts with a real-like spectrum, compressed; contenders measured in the same
// run on the same threads: s2lc apply from coefficients, OpenBLAS sgemv/sgemm on the reconstructed
// f32 matrix, our own Highway f32 kernel on it, and a read-only streaming kernel over the same
// number of bytes (the bandwidth bound). Cold runs cycle through enough copies that every call
// reads its weights from DRAM; hot runs reuse one.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <unistd.h>

#include <xtensor-blas/xlinalg.hpp>  // declares the CBLAS functions (xflens cblas.h)

extern "C" void openblas_set_num_threads(int);
extern "C" char* openblas_get_corename(void);

#include <morph/grouped.hpp>
#include <morph/merge.hpp>
#include <morph/morph.hpp>
#include <morph/parallel.hpp>
#include <morph/runtime.hpp>
#include <s2lc/compress/compressor.hpp>
#include <s2lc/kernels/qgemm.hpp>
#include <s2lc/tensor.hpp>

#include "buffer.hpp"

namespace s2lc::apply_bench {

/// Bytes of the largest cache level the OS reports (L3, else L2; 0 if it reports none).
inline std::size_t last_level_cache_bytes() noexcept {
  for (int name : {_SC_LEVEL3_CACHE_SIZE, _SC_LEVEL2_CACHE_SIZE}) {
    const long v = sysconf(name);
    if (v > 0) return static_cast<std::size_t>(v);
  }
  return 0;
}

/// The working set cold runs cycle through, so every call reads its bytes from DRAM: at least
/// 512 MiB and twice the last-level cache the OS reports. A VM may see much of a large shared L3:
/// on the Intel Xeon VM (480 MiB reported) one core read a cycle of 64 MiB at 29.5 GB/s, 512 MiB
/// at 18.2, 1 GiB at 17.0 and 2 GiB at 16.5, so 512 MiB there still hit in L3 (bench/RESULTS.md,
/// "Cold working sets twice the last-level cache").
inline std::size_t cold_working_set_bytes() noexcept {
  constexpr std::size_t kMiB = std::size_t{1} << 20;
  return std::max<std::size_t>(512 * kMiB, (2 * last_level_cache_bytes() + kMiB - 1) / kMiB * kMiB);
}

/// Copies of `bytes` that cover `working_set` (at least `least`): the cycle of a cold run.
inline std::size_t cold_copies(std::size_t working_set, double bytes, std::size_t least = 1) noexcept {
  return std::max<std::size_t>(least, static_cast<std::size_t>(std::ceil(static_cast<double>(working_set) / bytes)));
}

struct Config {
  std::size_t rows = 2048, cols = 1408, batch = 1, experts = 4;
  double ratio = 8;
  unsigned threads = 1, morph = 0;
  bool truncate = false;  ///< morph: own-factor mixes cut to one expert's rank (MorphOptions::truncate)
  unsigned morph_bits = 8;  ///< morph: the hybrid's coefficients requantized to 8 or 4 bits
  bool cold = true;
  morph::Activations act = morph::Activations::f32;  ///< the path `us` measures (both are timed)
  std::size_t cold_bytes = cold_working_set_bytes();  ///< working set that defeats the caches
  double seconds = 0.3;                              ///< per contender
};

/// Experts W_e = S + 0.3 R_e: every 256 x 256 tile of S and R_e a product of Gaussians through a
/// power-law spectrum (sigma_k = k^-0.6), like trained weights; speed does not depend on values.
inline std::vector<compress::GroupInput> make_experts(const Config& c, std::uint32_t seed = 1) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  auto tiled = [&](matrix& m, float scale) {
    const std::size_t T = 256;
    for (std::size_t r0 = 0; r0 < c.rows; r0 += T)
      for (std::size_t c0 = 0; c0 < c.cols; c0 += T) {
        const std::size_t rb = std::min(T, c.rows - r0), cb = std::min(T, c.cols - c0), k = std::min(rb, cb);
        matrix a = matrix::from_shape({rb, k}), b = matrix::from_shape({k, cb});
        for (auto& v : a) v = nd(rng);
        for (std::size_t i = 0; i < k; ++i)
          for (std::size_t j = 0; j < cb; ++j) b(i, j) = nd(rng) * scale * std::pow(static_cast<float>(i + 1), -0.6f) / 16.0f;
        const matrix p = xt::linalg::dot(a, b);
        for (std::size_t i = 0; i < rb; ++i)
          for (std::size_t j = 0; j < cb; ++j) m(r0 + i, c0 + j) += p(i, j);
      }
  };
  matrix S = xt::zeros<float>({c.rows, c.cols});
  tiled(S, 1.0f);
  compress::GroupInput g;
  g.name = "bench.{E}.weight";
  g.type = dtype::bf16;
  for (std::size_t e = 0; e < c.experts; ++e) {
    matrix W = S;
    tiled(W, 0.3f);
    g.weights.push_back(std::move(W));
    g.member_names.push_back("bench." + std::to_string(e) + ".weight");
    g.member_sources.push_back(0);
  }
  return {g};
}

struct Result {
  double us = 0;            ///< s2lc compressed apply, per call, with Config::act
  double f32_us = 0, int8_us = 0;  ///< the same with f32 / int8 activations
  double openblas_us = 0;   ///< OpenBLAS on the reconstructed f32 matrix
  double dense_us = 0;      ///< our Highway f32 kernel on it
  double bound_us = 0;      ///< max(bandwidth_bound_us, fma_bound_us)
  double read_us = 0;       ///< streaming read of exactly the bytes apply reads, where they are
  double dense_bound_us = 0;///< streaming read of the f32 matrix
  double bytes = 0, dense_bytes = 0, bandwidth_gbs = 0;
  double macs = 0, fma_gmacs = 0, fma_bound_us = 0, bandwidth_bound_us = 0;  ///< bound_us = max of the two
  double morph_us = 0, morph_bytes = 0, single_serial_us = 0;  ///< morph and one expert, one thread
  double morph_rel_error = 0;  ///< ||hybrid - exact f32 mix|| / ||exact mix|| (Frobenius)
  std::size_t copies = 0;
};

/// ||a - b|| / ||b|| over the materialized matrices of two hybrids of one group (Frobenius).
inline double morph_rel_error(const morph::KMorph& a, const morph::KMorph& b) {
  const std::size_t rows = a.group->rows(), cols = a.group->cols();
  std::vector<float> ma(rows * cols, 0.0f), mb(rows * cols, 0.0f);
  morph::merge(a, ma.data(), cols, 1.0f, morph::merge_math::f32);
  morph::merge(b, mb.data(), cols, 1.0f, morph::merge_math::f32);
  double num = 0, den = 0;
  for (std::size_t i = 0; i < ma.size(); ++i) {
    const double d = double(ma[i]) - double(mb[i]);
    num += d * d, den += double(mb[i]) * double(mb[i]);
  }
  return den > 0 ? std::sqrt(num / den) : 0.0;
}

/// A run of bytes in memory.
using ByteRange = std::pair<const std::uint8_t*, std::size_t>;
namespace detail {
inline void kmat_ranges(const morph::KMat& m, std::vector<ByteRange>& out) {
  if (m.nscales()) out.emplace_back(reinterpret_cast<const std::uint8_t*>(m.scales_data()), 2 * m.nscales());
  if (m.ncodes()) out.emplace_back(m.codes_data(), m.ncodes());
}

// km's arrays: one range for a pooled matrix (its pool, from its first array to its last), else
// array by array; raw blocks each; marks the bases its shared blocks use.
inline void matrix_ranges(const morph::KMatrix& km, std::vector<ByteRange>& out, std::vector<std::uint8_t>& used) {
  std::vector<ByteRange> parts;
  for (const auto& b : km.blocks) {
    kmat_ranges(b.b, parts), kmat_ranges(b.a, parts);
    if (!b.raw.empty()) out.emplace_back(reinterpret_cast<const std::uint8_t*>(b.raw.data()), b.raw.size() * sizeof(float));
    if (b.kind == compress::block_kind::shared) used[b.basis] = 1;
  }
  if (km.pooled() && !parts.empty()) {
    const std::uint8_t *lo = parts[0].first, *hi = lo;
    for (const auto& [p, n] : parts) lo = std::min(lo, p), hi = std::max(hi, p + n);
    out.emplace_back(lo, static_cast<std::size_t>(hi - lo));
  } else {
    out.insert(out.end(), parts.begin(), parts.end());
  }
}

inline void basis_ranges(const morph::KGroup& g, const std::vector<std::uint8_t>& used, std::vector<ByteRange>& out) {
  for (std::size_t i = 0; i < used.size(); ++i)
    if (used[i]) kmat_ranges(g.bases[i], out);
}
}  // namespace detail

/// The bytes apply(e) reads, where they are: each pooled matrix (member e's residual, the cores
/// on its path) as one range (its pool, in read order), unpooled codes and scales array by array,
/// raw blocks, and each basis its shared blocks use, once. Reading exactly these with a streaming
/// kernel is the bound of this call's bytes in their own layout: a short cold read does not reach
/// the bandwidth of a long stream (bench/RESULTS.md).
inline std::vector<ByteRange> member_ranges(const morph::KGroup& g, std::size_t e) {
  std::vector<ByteRange> out;
  std::vector<std::uint8_t> used(g.bases.size(), 0);
  detail::matrix_ranges(g.residuals[e], out, used);
  for (auto nd : g.path[e]) detail::matrix_ranges(g.cores[nd], out, used);
  detail::basis_ranges(g, used, out);
  return out;
}

/// Every coefficient array of g (all members' residuals, all cores, all bases) and, if given, of
/// a hybrid's own residual.
inline std::vector<ByteRange> group_ranges(const morph::KGroup& g, const morph::KMatrix* hybrid = nullptr) {
  std::vector<ByteRange> out;
  std::vector<std::uint8_t> used(g.bases.size(), 1);  // all of them, whichever blocks use them
  for (const auto& m : g.residuals) detail::matrix_ranges(m, out, used);
  for (const auto& m : g.cores) detail::matrix_ranges(m, out, used);
  if (hybrid) detail::matrix_ranges(*hybrid, out, used);
  detail::basis_ranges(g, used, out);
  return out;
}

/// Reads one byte of every 4 KB page of [p, p + n) (and its last byte), so that the pages are
/// mapped before a timed loop. On a VM whose host reclaims guest memory left idle for a few
/// seconds (this project's bench machine), the first read of such a page costs several times a
/// DRAM read (a 1 GB pass after 40 s idle: 216 ms against 34 ms): a cold benchmark that starts
/// on memory it set up earlier would time the host's faults for part of its cycle, and a run
/// whose few first iterations land on them can come out 10x slow (bench/RESULTS.md).
inline std::uint64_t touch_pages(const void* p, std::size_t n) {
  if (!n) return 0;
  const auto* b = static_cast<const volatile std::uint8_t*>(p);
  std::uint64_t s = 0;
  for (std::size_t i = 0; i < n; i += 4096) s += b[i];
  return s + b[n - 1];
}

inline std::uint64_t touch_pages(const std::vector<ByteRange>& r) {
  std::uint64_t s = 0;
  for (const auto& [p, n] : r) s += touch_pages(p, n);
  return s;
}

/// touch_pages over every element's storage of a vector of buffers.
template <class Buffers>
std::uint64_t touch_buffers(const Buffers& v) {
  std::uint64_t s = 0;
  for (const auto& b : v) s += touch_pages(b.data(), b.size() * sizeof(b[0]));
  return s;
}

/// Streams ranges p, p + step, p + 2 step, ... (one thread's share), returns their xor.
inline std::uint64_t read_ranges(const std::vector<ByteRange>& r, std::size_t p = 0, std::size_t step = 1) {
  std::uint64_t s = 0;
  for (std::size_t i = p; i < r.size(); i += step) s ^= kernels::stream_read_bytes(r[i].first, r[i].second);
  return s;
}

/// Mean seconds per call of f(i) for i = 0, 1, 2, ... over about `seconds`.
template <class F>
double time_calls(F&& f, double seconds) {
  using clk = std::chrono::steady_clock;
  for (int i = 0; i < 3; ++i) f(static_cast<std::size_t>(i));
  std::size_t n = 0;
  const auto t0 = clk::now();
  double el = 0;
  do {
    for (int i = 0; i < 8; ++i) f(n++);
    el = std::chrono::duration<double>(clk::now() - t0).count();
  } while (el < seconds);
  return el / static_cast<double>(n);
}

inline Result run(const Config& c) {
  openblas_set_num_threads(static_cast<int>(c.threads));
  compress::Options opt;
  opt.ratio = c.ratio;
  opt.threads = c.threads;
  Config cc = c;
  cc.experts = std::max<std::size_t>(c.experts, c.morph);
  const auto comp = compress::compress(make_experts(cc), opt);
  const auto& cg = comp.groups[0];
  const morph::KGroup base = morph::KGroup::from(cg);
  const matrix W0 = compress::reconstruct(cg, 0);
  Result r;
  r.bytes = static_cast<double>(base.member_bytes(0));
  r.dense_bytes = static_cast<double>(c.rows * c.cols * sizeof(float));
  // Copies (distinct memory) to cycle through when cold.
  const std::size_t nq = c.cold ? cold_copies(c.cold_bytes, r.bytes) : 1;
  const std::size_t nd = c.cold ? cold_copies(c.cold_bytes, r.dense_bytes, 2) : 1;
  std::vector<morph::KGroup> qs(nq, base);
  // 64-byte aligned, as engines allocate weights (std::vector's start 16 bytes past a line).
  std::vector<bench::Buffer<float>> ds(nd, bench::Buffer<float>(W0.begin(), W0.end()));
  r.copies = nq;
  const std::size_t B = c.batch;
  std::vector<float> X(B * c.cols), Y(B * c.rows);
  std::mt19937 rng(3);
  std::normal_distribution<float> dist;
  for (auto& v : X) v = dist(rng);
  morph::ThreadPool pool(c.threads);
  morph::Executor* ex = c.threads > 1 ? &pool : nullptr;
  std::vector<std::byte> mem(morph::parallel_scratch_bytes(base, B, c.threads) + morph::apply_scratch_bytes(base, B) * 2 + (1 << 20));
  morph::Arena arena(mem);

  // Cold: each contender's cycle is paged in just before its timing (touch_pages).
  auto warm_copies = [&](const std::vector<morph::KMorph>* ms = nullptr) {
    for (std::size_t i = 0; c.cold && i < nq; ++i) touch_pages(group_ranges(qs[i], ms ? &(*ms)[i].residual : nullptr));
  };
  auto warm_dense = [&] {
    if (c.cold) touch_buffers(ds);
  };
  for (auto act : {morph::Activations::f32, morph::Activations::int8}) {
    warm_copies();
    const double us = 1e6 * time_calls([&](std::size_t i) {
      morph::apply_parallel(qs[i % nq], 0, X.data(), c.cols, B, Y.data(), c.rows, arena, ex, 1.0f, {0, act});
    }, c.seconds);
    (act == morph::Activations::f32 ? r.f32_us : r.int8_us) = us;
  }
  r.us = c.act == morph::Activations::f32 ? r.f32_us : r.int8_us;
  warm_dense();
  r.openblas_us = 1e6 * time_calls([&](std::size_t i) {
    const float* w = ds[i % nd].data();
    const auto M = static_cast<int>(c.rows), K = static_cast<int>(c.cols), N = static_cast<int>(B);
    if (B == 1) cblas_sgemv(CblasRowMajor, CblasNoTrans, M, K, 1.0f, w, K, X.data(), 1, 0.0f, Y.data(), 1);
    else cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, M, K, 1.0f, X.data(), K, w, K, 0.0f, Y.data(), M);
  }, c.seconds);
  // Our f32 kernel, split over block rows of 256 like the compressed path.
  warm_dense();
  r.dense_us = 1e6 * time_calls([&](std::size_t i) {
    const float* w = ds[i % nd].data();
    const std::size_t tasks = (c.rows + 255) / 256;
    morph::parallel_for(ex, tasks, [&](std::size_t t, unsigned) {
      const std::size_t r0 = t * 256, n = std::min<std::size_t>(256, c.rows - r0);
      kernels::gemm_nt(w + r0 * c.cols, c.cols, n, X.data(), c.cols, B, c.cols, 1.0f, Y.data() + r0, c.rows);
    });
  }, c.seconds);
  // Bandwidth: a streaming read over the same threads, cold (a buffer far larger than the caches)
  // or hot (the compressed bytes themselves, again and again).
  {
    const std::size_t n = c.cold ? c.cold_bytes / sizeof(float) : static_cast<std::size_t>(r.bytes) / sizeof(float);
    std::vector<float> buf(n, 1.0f);
    const std::size_t parts = c.threads;
    volatile float sink = 0;
    const double s = time_calls([&](std::size_t) {
      morph::parallel_for(ex, parts, [&](std::size_t p, unsigned) {
        const std::size_t a = n * p / parts, b = n * (p + 1) / parts;
        sink = sink + kernels::stream_read(buf.data() + a, b - a);
      });
    }, c.seconds);
    r.bandwidth_gbs = static_cast<double>(n * sizeof(float)) / s * 1e-9;
    r.bandwidth_bound_us = r.bytes / (r.bandwidth_gbs * 1e9) * 1e6;
    r.dense_bound_us = r.dense_bytes / (r.bandwidth_gbs * 1e9) * 1e6;
  }
  // The same bytes apply reads, in their own ranges, over the same copies and threads (cold: each
  // call a copy not read for 512 MiB). A short read starts cold streams and does not reach the
  // long stream's bandwidth, so for small experts this takes longer than bandwidth_bound_us.
  {
    std::vector<std::vector<ByteRange>> ranges(nq);
    for (std::size_t i = 0; i < nq; ++i) ranges[i] = member_ranges(qs[i], 0);
    std::vector<std::uint64_t> sink(c.threads, 0);
    warm_copies();
    r.read_us = 1e6 * time_calls([&](std::size_t i) {
      morph::parallel_for(ex, c.threads, [&](std::size_t p, unsigned) { sink[p] ^= read_ranges(ranges[i % nq], p, c.threads); });
    }, c.seconds);
    volatile std::uint64_t keep = sink[0];
    (void)keep;
  }
  // FMA bound: register-only f32 FMAs on the same threads, for the multiply-adds apply does.
  {
    const std::size_t iters = 1u << 16;
    std::vector<float> sink(c.threads, 0.0f);
    const std::size_t per_call = kernels::fma_peak(iters, sink.data());
    const double s = time_calls([&](std::size_t) {
      morph::parallel_for(ex, c.threads, [&](std::size_t p, unsigned) { kernels::fma_peak(iters, &sink[p]); });
    }, c.seconds);
    volatile float keep = sink[0];
    (void)keep;
    r.fma_gmacs = static_cast<double>(per_call * c.threads) / s * 1e-9;  // multiply-adds per ns
    r.macs = static_cast<double>(base.member_macs(0) * B);
    r.fma_bound_us = r.macs / (r.fma_gmacs * 1e9) * 1e6;
    r.bound_us = std::max(r.bandwidth_bound_us, r.fma_bound_us);
  }
  if (c.morph > 0) {
    std::vector<std::uint32_t> ex_ids(c.morph);
    std::vector<float> alpha(c.morph, 1.0f / static_cast<float>(c.morph));
    for (std::size_t i = 0; i < c.morph; ++i) ex_ids[i] = static_cast<std::uint32_t>(i);
    // mixed once, then bound to every copy of the group (cold: each copy's cores and bases)
    const morph::KMorph m0 = morph::mix_linear(qs[0], ex_ids, alpha, {c.morph_bits, c.truncate});
    std::vector<morph::KMorph> ms(nq, m0);
    for (std::size_t i = 0; i < nq; ++i) ms[i].group = &qs[i];
    r.morph_bytes = static_cast<double>(m0.bytes());
    r.morph_rel_error = morph_rel_error(m0, morph::mix_linear(qs[0], ex_ids, alpha, {0}));
    std::vector<std::byte> mm(std::max(morph::apply_scratch_bytes(ms[0], B), morph::apply_scratch_bytes(base, B)));
    morph::Arena ma(mm);
    const morph::Precision prec{0, c.act};
    warm_copies(&ms);
    r.single_serial_us = 1e6 * time_calls([&](std::size_t i) { morph::apply(qs[i % nq], 0, X.data(), c.cols, B, Y.data(), c.rows, ma, 1.0f, prec); }, c.seconds);
    r.morph_us = 1e6 * time_calls([&](std::size_t i) { morph::apply(ms[i % nq], X.data(), c.cols, B, Y.data(), c.rows, ma, 1.0f, prec); }, c.seconds);
  }
  return r;
}

}  // namespace s2lc::apply_bench
