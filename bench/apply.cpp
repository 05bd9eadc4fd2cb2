// Compressed apply, morphing and JIT merge against what a user would otherwise run, in one run:
//   apply/<impl>/<shape>_b<batch>_<hot|cold>: s2lc (from coefficients, f32 activations), s2lc_int8
//     (int8 activations, integer dot products), openblas (sgemv / sgemm on
//     the reconstructed f32 matrix, the baseline), highway_dense (our f32 kernel on it),
//     stream_bound (a read-only streaming kernel: the bandwidth bound of each impl's own bytes),
//     read_bound (that kernel over exactly the bytes s2lc reads, where they are, in the copy it
//     would read: the same short cold streams; column x_read) and fma_bound (register-only f32
//     FMAs, as many as s2lc's multiply-adds: its FMA bound);
//   morph/<impl>/<shape>_b1_cold: one compressed expert (baseline) vs hybrids of K = 2, 4, 8, on
//     the synthetic experts and on the real tinymoe layer-1 experts (tinymoe_<w1|w2|w3>);
//   merge/<impl>/<shape>[_bf16]_{hot,cold}: JIT merge of one expert into a dense f32 (bf16) base, the
//   factors multiplied in int16 fixed point (s2lc, the default) or f32 (s2lc_f32), vs memcpy of the
//   buffer and vs register FMAs as many as the merge's multiply-adds (low-rank blocks: rank per
//   element); s2lc_unmerge times the unmerge of the fixed16 merge; s2lc_t2 and memcpy_t2 run on
//   two threads (grid blocks on a ThreadPool; the copy in 16 chunks); s2lc_module (_t2: on two
//   threads) merges only the expert's module (its residual: MemberPart module) over a buffer that
//   holds the base.
//   merge/<s2lc|s2lc_unmerge|memcpy|rmw|s2lc_t2|memcpy_t2>/tinymoe_domain[_bf16]_{hot,cold}: a real
//     domain module (tinymoe's domain-c FFN delta, compressed as the CLI does with the py and en
//     deltas) merged into the real base model's 12 FFN weights (dense-base, ../shared/data; skipped
//     where it is missing); _bf16: the base weights held in bf16, against a copy of those bytes;
//     rmw: one in-place pass reading and writing each element (no arithmetic, no record); _t2:
//     the 12 matrices shared out over two workers, against a two-thread copy.
//   merge/<s2lc|memcpy|rmw>/tinymoe_domain_m0_{hot,cold}: the same with its first matrix only
//     (768 x 256, three 256 x 256 dense blocks), the other 11 left alone.
//   layer/<impl>/tinymoe_t<T>_{hot,cold}: a whole SwiGLU MoE layer on the real tinymoe layer-1
//     experts, T tokens routed top-2: swiglu_apply (s2lc, s2lc_int8, s2lc_t2 on two threads) vs
//     OpenBLAS per expert on the reconstructed f32 weights, stream_bound, and fma_bound (register
//     FMAs as many as swiglu_apply's multiply-adds for the plan: cores once per token of their
//     node, residuals per routed expert; counter macs).
//   grouped/<s2lc|s2lc_int8|openblas>/<shape>_t<T>_hot: grouped_apply of the shape's 8 synthetic
//     experts, T tokens routed top-2, against OpenBLAS per routed expert (gather, sgemm, scatter)
//     on a reconstructed f32 matrix; one thread.
//   merge/<s2lc|s2lc_unmerge|memcpy>/codes_<q4|q4_lanes|q5_lanes|q8|q4_sparse24>_<f32|bf16>_hot:
//     the merge kernel alone (q_merge_rows_*, q_unmerge_rows_*) on one 256 x 1024 quantized matrix
//     (4-, 5- or 8-bit codes, group 32; _lanes: stored rows in lanes) into an f32 or bf16 buffer
//     in L2 (_sparse24: a 2:4-sparse base), against a copy of that buffer: the cost per code
//     width, layout and base.
//   kernel/<s2lc|decode_gemm_nn|fma_bound>/<matrix>_t<T>: one kernel, hot, T tokens, against
//     register FMAs as many as its multiply-adds (x_baseline: times the FMA bound): core_2048x1408
//     (q_gemm_nt on a 4-bit rows-in-lanes matrix, a synthetic expert's dense core; core5: 5-bit
//     codes, bytes, as the real tinymoe experts' global core), right_36x256
//     (q_gemm_nt on a 3-bit rows-in-lanes rank-36 right factor), left_36x256 (q_gemm_nn on a 3-bit
//     row-major left factor; decode_gemm_nn: q_decode_rows then gemm_nn, what apply runs from 32
//     tokens on).
// Cold runs cycle through copies of the weights (kColdBytes: >= 512 MiB and twice the last-level
// cache the OS reports) so every call reads from DRAM.
// Experts have a power-law spectrum (tools/s2lc/apply_bench.hpp); speed does not depend on values.
// Single thread for every contender (OpenBLAS too) except the _t2 rows (merge, layer). See bench/RESULTS.md.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include <benchmark/benchmark.h>

#include <morph/grouped.hpp>
#include <morph/merge.hpp>
#include <s2lc/compress/pipeline.hpp>
#include <s2lc/io/safetensors.hpp>
#include <s2lc/tensor.hpp>

#include "apply_bench.hpp"
#include "report.hpp"

namespace {

namespace ab = s2lc::apply_bench;
namespace mo = s2lc::morph;

struct Shape {
  std::size_t rows, cols;
};
const Shape kShapes[] = {{768, 256}, {2048, 1408}, {4096, 14336}};
// The working set cold rows cycle through (ab::cold_working_set_bytes: at least 512 MiB and twice
// the last-level cache the OS reports).
const std::size_t kColdBytes = ab::cold_working_set_bytes();

struct Setup {
  mo::KGroup base;
  std::vector<mo::KGroup> copies;          // cold: distinct memory
  std::vector<s2lc::bench::Buffer<float>> dense;   // reconstructed f32, copies
  std::vector<s2lc::bench::Buffer<std::uint16_t>> dense_bf16;  // the same in bf16 (merge rows, made on first use)
  std::vector<float> stream;               // for the bound
  std::vector<std::vector<ab::ByteRange>> ranges;  // per copy: the bytes apply(0) reads
  std::map<unsigned, std::vector<mo::KMorph>> morphs;  // by 4 K + tr (trunc_options)
  std::map<unsigned, double> rel_error;
  double bytes = 0, dense_bytes = 0;
};

Setup& setup(std::size_t si, bool cold) {
  static const bool announced =
      (std::printf("s2lc kernels run the %s target%s; OpenBLAS runs its %s kernels; cold rows cycle through %zu MiB "
                   "(the OS reports a %zu MiB last-level cache)\n",
                   s2lc::kernels::kernel_target(), s2lc::kernels::vnni_in_use() ? " (int8: VNNI)" : "", openblas_get_corename(),
                   kColdBytes >> 20, ab::last_level_cache_bytes() >> 20),
       true);
  (void)announced;
  static std::map<std::pair<std::size_t, bool>, std::unique_ptr<Setup>> cache;
  auto& slot = cache[{si, cold}];
  if (slot) return *slot;
  // One cold setup at a time (each holds about 3 x kColdBytes; rows are registered shape by shape)
  if (cold)
    for (auto& [key, other] : cache)
      if (key.second && key.first != si) other.reset();
  // The compressed group is shared by the hot and cold setups of a shape.
  static std::map<std::size_t, std::pair<mo::KGroup, std::vector<float>>> groups;
  if (!groups.count(si)) {
    ab::Config c;
    c.rows = kShapes[si].rows, c.cols = kShapes[si].cols, c.experts = 8;
    s2lc::compress::Options opt;
    opt.ratio = 8;
    opt.threads = 2;
    const auto comp = s2lc::compress::compress(ab::make_experts(c), opt);
    const auto W = s2lc::compress::reconstruct(comp.groups[0], 0);
    groups[si] = {mo::KGroup::from(comp.groups[0]), std::vector<float>(W.begin(), W.end())};
  }
  slot = std::make_unique<Setup>();
  Setup& s = *slot;
  s.base = groups[si].first;
  s.bytes = static_cast<double>(s.base.member_bytes(0));
  s.dense_bytes = static_cast<double>(groups[si].second.size() * sizeof(float));
  const std::size_t nq = cold ? ab::cold_copies(kColdBytes, s.bytes) : 1;
  const std::size_t nd = cold ? ab::cold_copies(kColdBytes, s.dense_bytes, 2) : 1;
  s.copies.assign(nq, s.base);
  for (const auto& q : s.copies) s.ranges.push_back(ab::member_ranges(q, 0));
  s.dense.assign(nd, s2lc::bench::Buffer<float>(groups[si].second.begin(), groups[si].second.end()));
  s.stream.assign(cold ? kColdBytes / sizeof(float) : static_cast<std::size_t>(s.dense_bytes) / sizeof(float), 1.0f);
  return s;
}

std::string case_name(std::size_t si, std::size_t batch, bool cold) {
  return std::to_string(kShapes[si].rows) + "x" + std::to_string(kShapes[si].cols) + "_b" + std::to_string(batch) + (cold ? "_cold" : "_hot");
}

// Cold runs page in the memory of their whole cycle before timing it (ab::touch_pages: this
// VM's host takes back guest memory left idle for a few seconds): every copy's coefficients
// (morphs: each copy's hybrid residual too).
void warm_copies(const std::vector<mo::KGroup>& copies, const std::vector<mo::KMorph>* morphs = nullptr) {
  for (std::size_t c = 0; c < copies.size(); ++c) ab::touch_pages(ab::group_ranges(copies[c], morphs ? &(*morphs)[c].residual : nullptr));
}

enum class impl { s2lc, s2lc_int8, openblas, highway_dense, stream_bound, fma_bound, read_bound };

void bench_apply(benchmark::State& state, std::size_t si, std::size_t B, bool cold, impl which) {
  openblas_set_num_threads(1);
  Setup& s = setup(si, cold);
  const std::size_t R = kShapes[si].rows, C = kShapes[si].cols;
  std::vector<float> X(B * C, 0.5f), Y(B * R);
  std::vector<std::byte> mem(mo::apply_scratch_bytes(s.base, B));
  mo::Arena arena(mem);
  if (cold) {
    if (which == impl::openblas || which == impl::highway_dense) ab::touch_buffers(s.dense);
    else if (which == impl::stream_bound) ab::touch_pages(s.stream.data(), s.stream.size() * sizeof(float));
    else if (which != impl::fma_bound)
      for (const auto& r : s.ranges) ab::touch_pages(r);
  }
  std::size_t i = 0;
  double bytes = 0;
  for (auto _ : state) {
    switch (which) {
      case impl::s2lc:
      case impl::s2lc_int8:
        mo::apply(s.copies[i++ % s.copies.size()], 0, X.data(), C, B, Y.data(), R, arena, 1.0f,
                  {0, which == impl::s2lc ? mo::Activations::f32 : mo::Activations::int8});
        bytes = s.bytes;
        break;
      case impl::openblas: {
        const float* w = s.dense[i++ % s.dense.size()].data();
        if (B == 1) cblas_sgemv(CblasRowMajor, CblasNoTrans, int(R), int(C), 1.0f, w, int(C), X.data(), 1, 0.0f, Y.data(), 1);
        else cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(B), int(R), int(C), 1.0f, X.data(), int(C), w, int(C), 0.0f, Y.data(), int(R));
        bytes = s.dense_bytes;
        break;
      }
      case impl::highway_dense:
        s2lc::kernels::gemm_nt(s.dense[i++ % s.dense.size()].data(), C, R, X.data(), C, B, C, 1.0f, Y.data(), R);
        bytes = s.dense_bytes;
        break;
      case impl::fma_bound: {  // register FMAs as many as s2lc's multiply-adds: the FMA bound
        float sink = 0;
        const std::size_t macs = s.base.member_macs(0) * B, lanes8 = s2lc::kernels::fma_peak(1, &sink);
        s2lc::kernels::fma_peak(macs / lanes8, &sink);
        benchmark::DoNotOptimize(sink);
        bytes = 0;
        break;
      }
      case impl::stream_bound:
        benchmark::DoNotOptimize(s2lc::kernels::stream_read(s.stream.data(), s.stream.size()));
        bytes = static_cast<double>(s.stream.size() * sizeof(float));
        break;
      case impl::read_bound:
        benchmark::DoNotOptimize(ab::read_ranges(s.ranges[i++ % s.ranges.size()]));
        bytes = s.bytes;
        break;
    }
    benchmark::ClobberMemory();
  }
  s2lc::bench::set_bytes(state, bytes);
}

// The linear hybrid of experts 0..K-1 with equal weights.
mo::KMorph equal_mix(const mo::KGroup& g, unsigned K, const mo::MorphOptions& opt) {
  std::vector<std::uint32_t> ex(K);
  for (unsigned k = 0; k < K; ++k) ex[k] = k;
  return mo::mix_linear(g, ex, std::vector<float>(K, 1.0f / static_cast<float>(K)), opt);
}

// m (mixed once) rebound to every copy of its group: cold runs read each copy's cores and bases.
std::vector<mo::KMorph> per_copy(const mo::KMorph& m, const std::vector<mo::KGroup>& copies) {
  std::vector<mo::KMorph> v(copies.size(), m);
  for (std::size_t i = 0; i < copies.size(); ++i) v[i].group = &copies[i];
  return v;
}

// The hybrids' options: tr 0 int8 mixes; 1 truncated (own-factor mixes cut to one expert's rank)
// with int8 factors; 2 truncated with int4 factors (about one expert's bytes).
mo::MorphOptions trunc_options(unsigned tr) { return {tr == 2 ? 4u : 8u, tr != 0}; }
const char* trunc_suffix(unsigned tr) { return tr == 0 ? "" : tr == 1 ? "_truncated" : "_truncated4"; }

// One compressed expert (K = 0) or the linear hybrid of the first K (trunc_options(tr)), batch 1,
// cold, f32 activations. rel_error as in bench_morph_real below.
void bench_morph(benchmark::State& state, std::size_t si, unsigned K, unsigned tr) {
  Setup& s = setup(si, true);
  const std::size_t R = kShapes[si].rows, C = kShapes[si].cols;
  const unsigned key = K * 4 + tr;
  if (K && !s.morphs.count(key)) {
    const mo::KMorph m0 = equal_mix(s.base, K, trunc_options(tr));
    s.morphs[key] = per_copy(m0, s.copies);
    s.rel_error[key] = ab::morph_rel_error(m0, equal_mix(s.base, K, {0}));
  }
  std::vector<float> X(C, 0.5f), Y(R);
  std::vector<std::byte> mem(std::max(mo::apply_scratch_bytes(s.base, 1), K ? mo::apply_scratch_bytes(s.morphs[key][0], 1) : 0));
  mo::Arena arena(mem);
  warm_copies(s.copies, K ? &s.morphs[key] : nullptr);
  std::size_t i = 0;
  for (auto _ : state) {
    if (K) mo::apply(s.morphs[key][i++ % s.copies.size()], X.data(), C, 1, Y.data(), R, arena);
    else mo::apply(s.copies[i++ % s.copies.size()], 0, X.data(), C, 1, Y.data(), R, arena);
    benchmark::ClobberMemory();
  }
  s2lc::bench::set_bytes(state, K ? static_cast<double>(s.morphs[key][0].bytes()) : s.bytes);
  if (K) state.counters["rel_error"] = s.rel_error[key];
  // Resident bytes of the layer's 8 experts: soft-MoE keeps them dense (bf16); morphing keeps the
  // compressed group (cores, bases, coefficients) and builds hybrids from it.
  double group_bytes = 0;
  for (const auto& c : s.base.cores) group_bytes += static_cast<double>(c.bytes());
  for (const auto& r : s.base.residuals) group_bytes += static_cast<double>(r.bytes());
  for (const auto& b : s.base.bases) group_bytes += static_cast<double>(b.bytes());
  state.counters["resident_dense_MB"] = static_cast<double>(s.base.members() * R * C * 2) / 1e6;
  state.counters["resident_morph_MB"] = group_bytes / 1e6;
}

// Morph on real trained experts: tinymoe layer 1 (tests/data, committed), compressed as the CLI
// does by default (ratio 8), whose residuals use shared bases where the compressor found them.
struct RealMorph {
  std::vector<mo::KGroup> copies;                  // cold: distinct memory
  std::map<unsigned, std::vector<mo::KMorph>> morphs;  // by 4 K + tr (trunc_options)
  std::map<unsigned, double> rel_error;
  double single_bytes = 0;
  std::size_t shared_blocks = 0, rows = 0, cols = 0;
};

RealMorph& real_morph(std::size_t role) {
  static std::map<std::size_t, std::unique_ptr<RealMorph>> cache;
  auto& slot = cache[role];
  if (slot) return *slot;
  slot = std::make_unique<RealMorph>();
  RealMorph& r = *slot;
  s2lc::io::SafetensorsFile f(std::string(S2LC_SOURCE_DIR) + "/tests/data/tinymoe-upcycled-L1.safetensors");
  s2lc::compress::GroupInput in;
  const std::string name = role == 0 ? "w1" : role == 1 ? "w2" : "w3";
  in.name = "layers.1.moe.experts.{E}." + name + ".weight";
  in.type = s2lc::dtype::bf16;
  for (int e = 0; e < 8; ++e) {
    in.member_names.push_back("layers.1.moe.experts." + std::to_string(e) + "." + name + ".weight");
    in.member_sources.push_back(0);
    in.weights.push_back(s2lc::load_matrix_f32(f, in.member_names.back()));
  }
  s2lc::compress::Options opt;
  opt.ratio = 8;
  opt.threads = 2;
  const auto comp = s2lc::compress::compress({in}, opt);
  const auto base = mo::KGroup::from(comp.groups[0]);
  r.rows = base.rows(), r.cols = base.cols();
  for (const auto& m : base.residuals)
    for (const auto& b : m.blocks) r.shared_blocks += b.kind == s2lc::compress::block_kind::shared;
  double group_bytes = 0;
  for (std::size_t e = 0; e < base.members(); ++e) group_bytes += static_cast<double>(base.member_bytes(e));
  r.single_bytes = group_bytes / static_cast<double>(base.members());
  r.copies.assign(ab::cold_copies(kColdBytes, 4 * r.single_bytes, 2), base);
  return r;
}

// One compressed expert (K = 0: the members in turn) or a linear hybrid of the first K experts
// (trunc_options(tr)), batch 1, cold, f32 activations (what the synthetic morph rows run).
// rel_error: ||hybrid - exact mix|| / ||exact mix|| (both materialized with merge).
void bench_morph_real(benchmark::State& state, std::size_t role, unsigned K, unsigned tr) {
  RealMorph& r = real_morph(role);
  const unsigned key = K * 4 + tr;
  if (K && !r.morphs.count(key)) {
    const mo::KMorph m0 = equal_mix(r.copies[0], K, trunc_options(tr));
    r.morphs[key] = per_copy(m0, r.copies);
    r.rel_error[key] = ab::morph_rel_error(m0, equal_mix(r.copies[0], K, {0}));
  }
  std::vector<float> X(r.cols, 0.5f), Y(r.rows);
  std::vector<std::byte> mem(std::max(mo::apply_scratch_bytes(r.copies[0], 1), K ? mo::apply_scratch_bytes(r.morphs[key][0], 1) : 0));
  mo::Arena arena(mem);
  warm_copies(r.copies, K ? &r.morphs[key] : nullptr);
  std::size_t i = 0;
  for (auto _ : state) {
    if (K) mo::apply(r.morphs[key][i % r.copies.size()], X.data(), r.cols, 1, Y.data(), r.rows, arena);
    else mo::apply(r.copies[i % r.copies.size()], i % 8, X.data(), r.cols, 1, Y.data(), r.rows, arena);
    ++i;
    benchmark::ClobberMemory();
  }
  state.counters["shared_blocks"] = static_cast<double>(r.shared_blocks);
  if (K) state.counters["rel_error"] = r.rel_error[key];
  s2lc::bench::set_bytes(state, K ? static_cast<double>(r.morphs[key][0].bytes()) : r.single_bytes);
}

// Multiply-adds of merging member e: a low-rank block costs rank per element, dense and raw
// blocks one (the FMA bound of the merge; cores a raw residual replaces are skipped). module:
// of merging its module over all its cores (the residual, and the cores a raw residual replaces,
// subtracted).
std::size_t merge_macs(const mo::KGroup& g, std::size_t e, bool module = false) {
  auto macs = [&](const mo::KMatrix& m, const std::uint8_t* skip) {
    std::size_t n = 0;
    for (const auto& b : m.blocks) {
      if (skip && (skip[b.index] != 0) != module) continue;
      const bool lr = b.kind == s2lc::compress::block_kind::lowrank || b.kind == s2lc::compress::block_kind::shared;
      n += std::size_t{b.rb} * b.cb * (lr ? b.rank : 1u);
    }
    return n;
  };
  std::size_t n = macs(g.residuals[e], nullptr);
  for (auto nd : g.path[e]) n += macs(g.cores[nd], g.replaces[e].data());
  return n;
}

// The _t2 rows' two workers (merge, its copies, the layer).
mo::ThreadPool& pool2() {
  static mo::ThreadPool pool(2);
  return pool;
}

// memcpy of n elements on pool2() in 16 chunks (the memcpy_t2 rows).
template <class T>
void copy_t2(T* to, const T* from, std::size_t n) {
  const std::size_t c = (n + 15) / 16;
  mo::parallel_for(&pool2(), 16, [&](std::size_t t, unsigned) {
    if (t * c < n) std::memcpy(to + t * c, from + t * c, std::min(c, n - t * c) * sizeof(T));
  });
}

enum class merge_impl { s2lc, s2lc_f32, memcpy, fma_bound, s2lc_unmerge, s2lc_t2, memcpy_t2, s2lc_module, s2lc_module_t2, rmw };
const char* const merge_names[] = {"s2lc", "s2lc_f32", "memcpy", "fma_bound", "s2lc_unmerge", "s2lc_t2", "memcpy_t2", "s2lc_module", "s2lc_module_t2", "rmw"};

// The rmw rows: one in-place pass reading and writing every element of the buffer once (its sign
// flipped: exact, and undone by a second pass), what the memory system gives an in-place merge
// with no arithmetic and no record.
template <class T>
void flip_signs(T* p, std::size_t n) {
  if constexpr (std::is_same_v<T, float>) {
    for (std::size_t j = 0; j < n; ++j) p[j] = -p[j];
  } else {
    for (std::size_t j = 0; j < n; ++j) p[j] = static_cast<T>(p[j] ^ 0x8000u);
  }
}

template <class T>
std::vector<s2lc::bench::Buffer<T>>& dense_copies(Setup& s) {
  if constexpr (std::is_same_v<T, float>) {
    return s.dense;
  } else {
    if (s.dense_bf16.empty())
      for (const auto& d : s.dense) {
        auto& b = s.dense_bf16.emplace_back(d.size());
        std::transform(d.begin(), d.end(), b.begin(), [](float v) { return s2lc::f32_to_bf16(v); });
      }
    return s.dense_bf16;
  }
}

template <class T>
void bench_merge(benchmark::State& state, std::size_t si, merge_impl which, bool cold) {
  // Cold: every iteration merges another copy of the module into another dense buffer (memcpy:
  // copies into it the buffer half the cycle away, untouched for many iterations; where only two
  // buffers fit kColdBytes, each is far larger than the caches), cycling through more than the
  // last-level cache holds. T: the buffer's type (float or bf16 bits).
  Setup& s = setup(si, cold);
  auto& dense = dense_copies<T>(s);
  const s2lc::bench::Buffer<T> src = cold ? s2lc::bench::Buffer<T>{} : dense[0];  // hot memcpy's source
  const double buf_bytes = static_cast<double>(dense[0].size() * sizeof(T)), bytes = 2.0 * buf_bytes;
  mo::ThreadPool& pool = pool2();  // the _t2 rows
  // The base: member 0's weights; the module: member 1 at a tenth of its size, as a domain
  // module's delta is small against the weights it merges into. About 6 % of the elements (f32)
  // need an undo entry (counter undo; merging a member into its own exact weights, w + w - w is
  // exact and none do; a delta as large as the base records 10-60 %: tests/morph/runtime.cpp).
  // s2lc_module: member 1's module (its residual: the cores are the base the buffer holds) at its
  // real size, scale 1.
  const bool module = which == merge_impl::s2lc_module || which == merge_impl::s2lc_module_t2;
  const mo::MemberPart part{module ? mo::member_part::module : mo::member_part::whole};
  const float scale = module ? 1.0f : 0.1f;
  const std::size_t macs = module ? merge_macs(s.base, 1, true) : merge_macs(s.base, 1), nd = dense.size();
  // s2lc_unmerge, cold: the buffer merged (untimed) half a cycle earlier is the one unmerged
  // (timed), so its rows come from DRAM as a cold merge's do (the buffer just merged would be in
  // cache). D buffers are merged ahead before the loop and the last D unmerged after it.
  const bool ring = which == merge_impl::s2lc_unmerge && cold;
  const std::size_t D = nd / 2;
  std::vector<mo::MergeUndo> pending(ring ? nd : 0);
  auto math_of = [&] { return which == merge_impl::s2lc_f32 ? mo::merge_math::f32 : mo::merge_math::fixed16; };
  const std::size_t ncopies = s.copies.size();
  if (ring)
    for (std::size_t q = 0; q < D; ++q) pending[q] = mo::merge(s.copies[q % ncopies], 1, dense[q].data(), kShapes[si].cols, scale, 0, math_of(), nullptr, part);
  const bool copy = which == merge_impl::memcpy || which == merge_impl::memcpy_t2;
  if (cold && which != merge_impl::fma_bound) {
    ab::touch_buffers(dense);
    if (!copy) warm_copies(s.copies);
  }
  std::size_t i = ring ? D : 0;
  for (auto _ : state) {
    T* buf = dense[i % nd].data();
    if (which == merge_impl::memcpy) std::memcpy(buf, cold ? dense[(i + nd / 2) % nd].data() : src.data(), static_cast<std::size_t>(buf_bytes));
    else if (which == merge_impl::memcpy_t2) copy_t2(buf, cold ? dense[(i + nd / 2) % nd].data() : src.data(), dense[0].size());
    else if (which == merge_impl::fma_bound) {
      float sink = 0;
      s2lc::kernels::fma_peak(macs / s2lc::kernels::fma_peak(1, &sink), &sink);
      benchmark::DoNotOptimize(sink);
    } else if (ring) {
      state.PauseTiming();
      pending[i % nd] = mo::merge(s.copies[i % ncopies], 1, buf, kShapes[si].cols, scale, 0, math_of(), nullptr, part);
      state.counters["undo"] = static_cast<double>(pending[i % nd].exceptions());
      state.ResumeTiming();
      const std::size_t j = (i - D) % nd;
      mo::unmerge(s.copies[(i - D) % ncopies], 1, dense[j].data(), kShapes[si].cols, pending[j], scale, 0, nullptr, part);
    } else {
      const mo::KGroup& g = s.copies[i % s.copies.size()];
      // s2lc_unmerge (hot): the fixed16 merge untimed, its unmerge timed
      const bool un = which == merge_impl::s2lc_unmerge;
      if (un) state.PauseTiming();
      const bool t2 = which == merge_impl::s2lc_t2 || which == merge_impl::s2lc_module_t2;
      auto u = mo::merge(g, 1, buf, kShapes[si].cols, scale, 0, math_of(), t2 ? &pool : nullptr, part);
      if (!un) state.PauseTiming();
      state.counters["undo"] = static_cast<double>(u.exceptions());
      if (un) state.ResumeTiming();
      mo::unmerge(g, 1, buf, kShapes[si].cols, u, scale, 0, t2 ? &pool : nullptr, part);  // t2: keeps the worker busy between calls
      if (!un) state.ResumeTiming();
    }
    ++i;
    benchmark::ClobberMemory();
  }
  for (std::size_t k = i - D; ring && k < i; ++k)  // the buffers still merged
    mo::unmerge(s.copies[k % ncopies], 1, dense[k % nd].data(), kShapes[si].cols, pending[k % nd], scale, 0, nullptr, part);
  state.counters["macs"] = static_cast<double>(macs);
  const double coef = module ? static_cast<double>(s.base.residuals[1].bytes()) : s.bytes;
  s2lc::bench::set_bytes(state, which == merge_impl::fma_bound ? 0.0 : bytes + (copy ? 0.0 : coef));
}

// A real domain module merged into the real base: tinymoe's domain-c FFN delta (fine-tuned minus
// base), compressed with the py and en deltas as `s2lc compress domain-c domain-py domain-en` does
// (same-named tensors across files, ratio 8: they come out as dense 4-bit blocks, full-rank
// deltas), merged (member 0) into dense-base's 12 FFN weights packed in one f32 buffer (9.4 MB),
// against a copy of that buffer. Cold: copies of both over kColdBytes.
struct RealDomain {
  std::vector<std::vector<mo::KGroup>> copies;  // per copy: the 12 groups
  std::vector<std::size_t> offset;              // each group's matrix in the buffer
  std::vector<s2lc::bench::Buffer<float>> dense;        // copies of the base weights
  std::vector<s2lc::bench::Buffer<std::uint16_t>> dense16;  // ... as bf16 (the _bf16 rows)
  double module_bytes = 0, module_bytes0 = 0;  // all 12 matrices' deltas, the first's
  template <class T>
  std::vector<s2lc::bench::Buffer<T>>& buffers() {
    if constexpr (std::is_same_v<T, float>) return dense;
    else return dense16;
  }
};

RealDomain* real_domain() {
  static std::unique_ptr<RealDomain> slot;
  static bool tried = false;
  if (tried) return slot.get();
  tried = true;
  const std::string dir = std::string(S2LC_SHARED_DATA_DIR) + "/tinymoe/";
  const std::vector<std::filesystem::path> files{dir + "domain-c.safetensors", dir + "domain-py.safetensors", dir + "domain-en.safetensors"};
  for (const auto& f : files)
    if (!std::filesystem::exists(f) || !std::filesystem::exists(dir + "dense-base.safetensors")) return nullptr;
  slot = std::make_unique<RealDomain>();
  RealDomain& r = *slot;
  s2lc::compress::Options opt;
  opt.ratio = 8;
  opt.threads = 2;
  const auto comp = s2lc::compress::compress(s2lc::compress::group_inputs(s2lc::compress::open_inputs(files), nullptr), opt);
  s2lc::io::SafetensorsFile base(dir + "dense-base.safetensors");
  std::vector<mo::KGroup> groups;
  std::vector<float> w;
  double all_bytes = 0;
  for (const auto& cg : comp.groups) {
    groups.push_back(mo::KGroup::from(cg));
    const auto m = s2lc::load_matrix_f32(base, cg.name);  // the base weight under the delta's name
    r.offset.push_back(w.size());
    w.insert(w.end(), m.begin(), m.end());
    r.module_bytes += static_cast<double>(groups.back().member_bytes(0));
    if (groups.size() == 1) r.module_bytes0 = r.module_bytes;
    for (std::size_t e = 0; e < groups.back().members(); ++e) all_bytes += static_cast<double>(groups.back().member_bytes(e));
  }
  r.copies.assign(ab::cold_copies(kColdBytes, all_bytes, 2), groups);
  r.dense.assign(ab::cold_copies(kColdBytes, static_cast<double>(w.size() * sizeof(float)), 2), s2lc::bench::Buffer<float>(w.begin(), w.end()));
  s2lc::bench::Buffer<std::uint16_t> h(w.size());
  for (std::size_t i = 0; i < w.size(); ++i) h[i] = s2lc::f32_to_bf16(w[i]);
  r.dense16.assign(ab::cold_copies(kColdBytes, static_cast<double>(h.size() * sizeof(std::uint16_t)), 2), h);
  return &r;
}

// T = std::uint16_t: the base weights in bf16 (the _bf16 rows), against a copy of those bytes.
template <class T>
void bench_merge_domain(benchmark::State& state, merge_impl which, bool cold, bool one = false) {
  RealDomain* r = real_domain();
  if (!r) {
    state.SkipWithError("../shared/data/tinymoe (domain-*.safetensors, dense-base.safetensors) not found");
    return;
  }
  auto& dense = r->buffers<T>();
  const std::size_t nd = dense.size(), nc = r->copies.size();
  // one: matrix 0 only (its elements from offset 0), else the buffer's 12
  const std::size_t ng = one ? 1 : r->copies[0].size(), n = one ? r->offset[1] : dense[0].size();
  // Copy c of the module's groups into / out of buffer b (each matrix at its offset). s2lc_t2:
  // the matrices shared out over pool2()'s two workers, one merge call each (each of these small
  // matrices has only 3 grid blocks to split).
  mo::Executor* ex = which == merge_impl::s2lc_t2 ? &pool2() : nullptr;
  auto merge_all = [&](std::size_t c, std::size_t b, std::vector<mo::MergeUndo>& u) {
    const auto& gs = r->copies[c % nc];
    u.resize(ng);
    mo::parallel_for(ex, ng, [&](std::size_t m, unsigned) { u[m] = mo::merge(gs[m], 0, dense[b % nd].data() + r->offset[m], gs[m].cols()); });
  };
  auto unmerge_all = [&](std::size_t c, std::size_t b, const std::vector<mo::MergeUndo>& u) {
    const auto& gs = r->copies[c % nc];
    mo::parallel_for(ex, ng, [&](std::size_t m, unsigned) { mo::unmerge(gs[m], 0, dense[b % nd].data() + r->offset[m], gs[m].cols(), u[m]); });
  };
  auto recorded_in = [](const std::vector<mo::MergeUndo>& u) {
    double k = 0;
    for (const auto& x : u) k += static_cast<double>(x.exceptions());
    return k;
  };
  // s2lc_unmerge, cold: as bench_merge, the buffer merged half a cycle earlier is unmerged.
  const bool ring = which == merge_impl::s2lc_unmerge && cold;
  const std::size_t D = nd / 2;
  std::vector<std::vector<mo::MergeUndo>> pending(ring ? nd : 1);
  if (ring)
    for (std::size_t q = 0; q < D; ++q) merge_all(q, q, pending[q]);
  const bool copy = which == merge_impl::memcpy || which == merge_impl::memcpy_t2;
  const bool rmw = which == merge_impl::rmw;
  if (cold) {
    ab::touch_buffers(dense);
    if (!copy && !rmw)
      for (const auto& gs : r->copies) warm_copies(gs);
  }
  double recorded = 0;
  std::size_t i = ring ? D : 0;
  std::vector<std::uint8_t> flipped(rmw ? nd : 0);  // buffers left with their signs flipped
  for (auto _ : state) {
    const std::size_t b = cold ? i % nd : 0, c = cold ? i : 0;
    if (rmw) {
      flip_signs(dense[b].data(), n);
      flipped[b] ^= 1;
    } else if (copy) {
      // hot: buffer 0 from copy 1 (there are at least two)
      const T* from = dense[cold ? (i + nd / 2) % nd : 1].data();
      if (which == merge_impl::memcpy) std::memcpy(dense[b].data(), from, n * sizeof(T));
      else copy_t2(dense[b].data(), from, n);
    } else if (ring) {
      state.PauseTiming();
      merge_all(c, b, pending[b]);
      recorded = recorded_in(pending[b]);
      state.ResumeTiming();
      unmerge_all(i - D, i - D, pending[(i - D) % nd]);
    } else {
      const bool un = which == merge_impl::s2lc_unmerge;
      if (un) state.PauseTiming();
      merge_all(c, b, pending[0]);
      if (!un) state.PauseTiming();
      recorded = recorded_in(pending[0]);
      if (un) state.ResumeTiming();
      unmerge_all(c, b, pending[0]);
      if (!un) state.ResumeTiming();
    }
    ++i;
    benchmark::ClobberMemory();
  }
  for (std::size_t k = i - D; ring && k < i; ++k) unmerge_all(k, k, pending[k % nd]);  // the buffers still merged
  for (std::size_t k = 0; k < flipped.size(); ++k)
    if (flipped[k]) flip_signs(dense[k].data(), n);  // the other rows merge into the base as loaded
  if (!copy && !rmw) state.counters["undo"] = recorded;
  s2lc::bench::set_bytes(state, 2.0 * static_cast<double>(n * sizeof(T)) + (copy || rmw ? 0.0 : one ? r->module_bytes0 : r->module_bytes));
}

// A whole SwiGLU MoE layer on real weights: tinymoe layer 1 (8 experts, d 256, ffn 768; w1 / w3 /
// w2 as real_morph compresses them), T tokens routed top-2. s2lc: swiglu_apply from the
// coefficients (cores once per node, f32 or int8 activations, s2lc_t2 on a two-thread ThreadPool);
// openblas: per expert on the reconstructed f32 weights (gather its tokens, two sgemm / sgemv,
// SiLU, one more, the gate-weighted scatter), one thread. Cold: copies over kColdBytes each.
// Each compressed copy is pooled as one allocation (mo::pool_layer); s2lc_apart runs the same
// layer on real_morph's copies, each matrix in its own allocation as KGroup::from leaves it.
struct RealLayer {
  std::vector<std::array<mo::KGroup, 3>> owned;  // per compressed copy: w1, w3, w2, pool_layer'd
  std::vector<mo::SwiGLUExperts> layers;        // per compressed copy (owned)
  std::vector<mo::SwiGLUExperts> apart;         // the same on real_morph's copies
  std::vector<s2lc::bench::Buffer<float>> dense;        // per dense copy: w1, w3 of each expert [f, d], then w2 [d, f]
  std::size_t d = 0, f = 0, experts = 0, dense_copies = 0;
};

RealLayer& real_layer() {
  static std::unique_ptr<RealLayer> slot;
  if (slot) return *slot;
  slot = std::make_unique<RealLayer>();
  RealLayer& L = *slot;
  RealMorph &r1 = real_morph(0), &r2 = real_morph(1), &r3 = real_morph(2);
  const std::size_t n = std::min({r1.copies.size(), r2.copies.size(), r3.copies.size()});
  L.owned.reserve(n);
  for (std::size_t c = 0; c < n; ++c) {
    L.owned.push_back({r1.copies[c], r3.copies[c], r2.copies[c]});
    mo::pool_layer(L.owned[c][0], L.owned[c][1], L.owned[c][2]);
    L.layers.push_back({&L.owned[c][0], &L.owned[c][1], &L.owned[c][2]});
    L.apart.push_back({&r1.copies[c], &r3.copies[c], &r2.copies[c]});
  }
  L.d = r1.cols, L.f = r1.rows, L.experts = r1.copies[0].members();
  const std::size_t m = L.d * L.f;
  std::vector<float> w(3 * L.experts * m, 0.0f);  // the f32 reconstruction (merge into zeros, f32 math)
  for (std::size_t e = 0; e < L.experts; ++e) {
    mo::merge(r1.copies[0], e, w.data() + e * m, L.d, 1.0f, 0, mo::merge_math::f32);
    mo::merge(r3.copies[0], e, w.data() + (L.experts + e) * m, L.d, 1.0f, 0, mo::merge_math::f32);
    mo::merge(r2.copies[0], e, w.data() + (2 * L.experts + e) * m, L.f, 1.0f, 0, mo::merge_math::f32);
  }
  L.dense_copies = ab::cold_copies(kColdBytes, static_cast<double>(w.size() * sizeof(float)), 2);
  L.dense.assign(L.dense_copies, s2lc::bench::Buffer<float>(w.begin(), w.end()));
  return L;
}

// Top-2 routing of T tokens (two distinct experts per token, gates 0.6 / 0.4), fixed per T.
s2lc::DispatchPlan layer_plan(std::size_t experts, std::size_t T) {
  std::mt19937 rng(static_cast<std::uint32_t>(7 + T));
  std::vector<std::int32_t> ids(2 * T);
  std::vector<float> gates(2 * T);
  for (std::size_t t = 0; t < T; ++t) {
    const auto e1 = static_cast<std::int32_t>(rng() % experts);
    const auto e2 = static_cast<std::int32_t>((static_cast<std::size_t>(e1) + 1 + rng() % (experts - 1)) % experts);
    ids[2 * t] = e1, ids[2 * t + 1] = e2, gates[2 * t] = 0.6f, gates[2 * t + 1] = 0.4f;
  }
  return s2lc::DispatchPlan::from_topk(experts, T, 2, ids.data(), gates.data());
}

// grouped/<impl>/<shape>_t<T>_hot: grouped_apply (llama.cpp's mul_mat_id, on compressed experts)
// of the shape's 8 synthetic experts, T tokens routed top-2 (layer_plan), one thread, hot.
// openblas: per routed expert, its tokens gathered, one sgemm (sgemv for one token) on a
// reconstructed f32 matrix (expert 0's for each: the same cost), the gate-weighted scatter.
enum class grouped_impl { s2lc, s2lc_int8, openblas };

void bench_grouped(benchmark::State& state, std::size_t si, std::size_t T, grouped_impl which) {
  openblas_set_num_threads(1);
  Setup& s = setup(si, false);
  const std::size_t R = kShapes[si].rows, C = kShapes[si].cols, E = s.base.members();
  const auto plan = layer_plan(E, T);
  std::vector<float> X(T * C), Y(T * R, 0.0f), xe(T * C), ye(T * R);
  std::mt19937 rng(5);
  std::normal_distribution<float> nd;
  for (auto& v : X) v = nd(rng);
  std::vector<std::byte> mem(mo::grouped_scratch_bytes(s.base, T, plan.routed(), 1));
  mo::Arena arena(mem);
  const float* w = s.dense[0].data();
  std::vector<const mo::KMatrix*> ms;  // the bytes grouped_apply reads: the routed residuals, the cores
  for (std::size_t e = 0; e < E; ++e)
    if (plan.count(e)) ms.push_back(&s.base.residuals[e]);
  const std::size_t routed_experts = ms.size();
  for (const auto& c : s.base.cores) ms.push_back(&c);
  for (auto _ : state) {
    if (which == grouped_impl::openblas) {
      for (std::size_t e = 0; e < E; ++e) {
        const std::size_t off = plan.offsets[e], n = plan.count(e);
        if (n == 0) continue;
        for (std::size_t i = 0; i < n; ++i) std::memcpy(xe.data() + i * C, X.data() + plan.token[off + i] * C, C * sizeof(float));
        if (n == 1) cblas_sgemv(CblasRowMajor, CblasNoTrans, int(R), int(C), 1.0f, w, int(C), xe.data(), 1, 0.0f, ye.data(), 1);
        else cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(n), int(R), int(C), 1.0f, xe.data(), int(C), w, int(C), 0.0f, ye.data(), int(R));
        for (std::size_t i = 0; i < n; ++i) s2lc::kernels::add_scaled(plan.gate[off + i], ye.data() + i * R, Y.data() + plan.token[off + i] * R, R);
      }
    } else {
      mo::grouped_apply(s.base, plan, X.data(), C, Y.data(), R, arena, nullptr,
                        {0, which == grouped_impl::s2lc ? mo::Activations::f32 : mo::Activations::int8});
    }
    benchmark::ClobberMemory();
  }
  state.counters["experts"] = static_cast<double>(routed_experts);
  s2lc::bench::set_bytes(state, which == grouped_impl::openblas ? static_cast<double>(routed_experts * R * C * sizeof(float))
                                                               : static_cast<double>(s.base.bytes_with_bases(ms)));
}

// The layer on dense f32 weights w (real_layer's packing) with OpenBLAS, one expert at a time:
// Y[t] += gate * W2 (silu(W1 x_t) * (W3 x_t)) for each routed (expert, token).
void dense_layer(const RealLayer& L, const float* w, const s2lc::DispatchPlan& plan, const std::vector<std::uint32_t>& routed,
                 const float* X, float* Y, std::vector<float>& xe, std::vector<float>& h1, std::vector<float>& h3,
                 std::vector<float>& ye) {
  const std::size_t d = L.d, f = L.f, E = L.experts, m = d * f;
  for (auto e : routed) {
    const std::size_t o = plan.offsets[e], ne = plan.offsets[e + 1] - o;
    for (std::size_t t = 0; t < ne; ++t) std::memcpy(xe.data() + t * d, X + plan.token[o + t] * d, d * sizeof(float));
    const float *w1 = w + e * m, *w3 = w + (E + e) * m, *w2 = w + (2 * E + e) * m;
    if (ne == 1) {
      cblas_sgemv(CblasRowMajor, CblasNoTrans, int(f), int(d), 1.0f, w1, int(d), xe.data(), 1, 0.0f, h1.data(), 1);
      cblas_sgemv(CblasRowMajor, CblasNoTrans, int(f), int(d), 1.0f, w3, int(d), xe.data(), 1, 0.0f, h3.data(), 1);
    } else {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(ne), int(f), int(d), 1.0f, xe.data(), int(d), w1, int(d), 0.0f, h1.data(), int(f));
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(ne), int(f), int(d), 1.0f, xe.data(), int(d), w3, int(d), 0.0f, h3.data(), int(f));
    }
    for (std::size_t k = 0; k < ne * f; ++k) h1[k] = h1[k] / (1.0f + std::exp(-h1[k])) * h3[k];
    if (ne == 1) cblas_sgemv(CblasRowMajor, CblasNoTrans, int(d), int(f), 1.0f, w2, int(f), h1.data(), 1, 0.0f, ye.data(), 1);
    else cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(ne), int(d), int(f), 1.0f, h1.data(), int(f), w2, int(f), 0.0f, ye.data(), int(d));
    for (std::size_t t = 0; t < ne; ++t) {
      float* y = Y + plan.token[o + t] * d;
      const float gt = plan.gate[o + t];
      for (std::size_t j = 0; j < d; ++j) y[j] += gt * ye[t * d + j];
    }
  }
}

// The merge kernel on one matrix, hot (the merge/*/codes_* rows): q_merge_rows_* of a 256 x 1024
// matrix quantized to `bits` (group 32) into a buffer of random normal T weights; s2lc_unmerge
// times the unmerge (the merge untimed), s2lc the merge (the unmerge untimed).
struct MergeRowsCase {
  const char* name;
  unsigned bits;
  bool lanes;
  bool sparse = false;  // the base 2:4 sparse (two zeros in every four weights)
};
constexpr MergeRowsCase kMergeRowsCases[] = {{"codes_q4", 4, false},       {"codes_q4_lanes", 4, true}, {"codes_q5_lanes", 5, true},
                                             {"codes_q8", 8, false},       {"codes_q4_sparse24", 4, false, true}};

template <class T>
void bench_merge_rows(benchmark::State& state, const MergeRowsCase& mc, merge_impl which) {
  namespace k = s2lc::kernels;
  constexpr bool kBF16 = std::is_same_v<T, std::uint16_t>;
  constexpr std::size_t rows = 256, cols = 1024, ldm = cols / 8;
  std::mt19937 rng(11);
  std::normal_distribution<float> nd(0.0f, 0.02f);
  std::vector<float> delta(rows * cols);
  for (auto& v : delta) v = 0.05f * nd(rng);
  const auto km = mo::KMat::from(s2lc::compress::quantize(delta.data(), rows, cols, {mc.bits, 32, false}), mc.lanes);
  std::vector<T> w(rows * cols), from(rows * cols), record(rows * cols + 64);
  for (std::size_t i = 0; i < w.size(); ++i) {
    const float v = mc.sparse && i % 4 < 2 ? 0.0f : nd(rng);
    if constexpr (kBF16) w[i] = s2lc::f32_to_bf16(v);
    else w[i] = v;
  }
  from = w;
  std::vector<std::uint8_t> mask(rows * ldm);
  auto merge = [&] {
    std::fill(mask.begin(), mask.end(), std::uint8_t{0});
    if constexpr (kBF16) return k::q_merge_rows_bf16(km.view(), 0, rows, 0, 1.0f, w.data(), cols, mask.data(), ldm, record.data(), nullptr);
    else return k::q_merge_rows_f32(km.view(), 0, rows, 0, 1.0f, w.data(), cols, mask.data(), ldm, record.data(), nullptr);
  };
  auto unmerge = [&](std::size_t nrec) {
    if constexpr (kBF16) return k::q_unmerge_rows_bf16(km.view(), 0, rows, 0, 1.0f, w.data(), cols, mask.data(), ldm, record.data(), nrec, nullptr);
    else return k::q_unmerge_rows_f32(km.view(), 0, rows, 0, 1.0f, w.data(), cols, mask.data(), ldm, record.data(), nrec, nullptr);
  };
  std::size_t nrec = 0;
  for (auto _ : state) {
    if (which == merge_impl::memcpy) {
      std::memcpy(w.data(), from.data(), w.size() * sizeof(T));
    } else {
      const bool un = which == merge_impl::s2lc_unmerge;
      if (un) state.PauseTiming();
      nrec = merge();
      if (un) state.ResumeTiming();
      else state.PauseTiming();
      if (unmerge(nrec) != nrec) state.SkipWithError("the unmerge did not consume the record");
      if (!un) state.ResumeTiming();
    }
    benchmark::DoNotOptimize(w.data());
    benchmark::ClobberMemory();
  }
  if (w != from) state.SkipWithError("merge then unmerge did not restore the buffer");
  if (which != merge_impl::memcpy) state.counters["undo"] = static_cast<double>(nrec);
  s2lc::bench::set_bytes(state, 2.0 * static_cast<double>(w.size() * sizeof(T)) + (which == merge_impl::memcpy ? 0.0 : static_cast<double>(km.view().bytes())));
}

// One kernel on one matrix, hot (the kernel/ rows): random normal weights quantized to `bits`
// (groups of `group`, 32 unless named _g<group>), rows in lanes for q_gemm_nt.
enum class kernel_impl { s2lc, decode_gemm_nn, fma_bound };
struct KernelCase {
  const char* name;
  std::size_t rows, cols;
  unsigned bits;
  bool lanes;  // q_gemm_nt on rows in lanes; else q_gemm_nn on the row-major matrix
  std::size_t group = 32;
  bool nt = false;  // q_gemm_nt on the row-major matrix (a right factor whose shape has no rows in lanes)
};
constexpr KernelCase kKernelCases[] = {
    {"core_2048x1408", 2048, 1408, 4, true}, {"core5_2048x1408", 2048, 1408, 5, true},
    {"right_36x256", 36, 256, 3, true}, {"left_36x256", 36, 256, 3, false},
    // a 4-bit left factor with groups of 32 and of 16 codes (16: half a vector's nibble bytes on
    // AVX-512, qgemm-inl.h's HalfNibbles)
    {"left_256x256", 256, 256, 4, false}, {"left_g16_256x256", 256, 256, 4, false, 16},
    // ... with one group a row (per-channel scales; q_gemm_nn's wide tiles)
    {"left_g256_256x256", 256, 256, 4, false, 256},
    // ... and with groups of 8 (AVX-512: two groups a vector, qgemm-inl.h's narrow groups)
    {"left_g8_256x256", 256, 256, 4, false, 8},
    // ... and groups of 3 or 6 vectors (byte groups of 48, nibble groups of 96: q_gemm_nn's wide
    // tiles with runs of 3)
    {"left_g48_256x288", 256, 288, 8, false, 48}, {"left_g96_256x384", 256, 384, 4, false, 96},
    // ... and groups no vector body takes, decoded in runs (qgemm-inl.h's DecodeSpan): groups of
    // 96 over 256 columns (a partial 64-column group a row), byte groups of 24 (AVX-512: neither
    // whole vectors nor dividing one)
    {"left_g96p_256x256", 256, 256, 4, false, 96}, {"left_g24_256x256", 256, 256, 8, false, 24},
    // q_gemm_nt on a row-major 4-bit 256 x 256 (groups of 32, and of 4: no rows in lanes)
    {"right_rm_256x256", 256, 256, 4, false, 32, true}, {"right_rm_g4_256x256", 256, 256, 4, false, 4, true},
    {"right_rm_g96p_256x256", 256, 256, 4, false, 96, true}};

void bench_kernel(benchmark::State& state, const KernelCase& kc, std::size_t T, kernel_impl which) {
  namespace k = s2lc::kernels;
  std::mt19937 rng(7);
  std::normal_distribution<float> nd;
  std::vector<float> w(kc.rows * kc.cols);
  for (auto& v : w) v = nd(rng);
  const auto q = s2lc::compress::quantize(w.data(), kc.rows, kc.cols, {kc.bits, kc.group, false});
  const auto km = mo::KMat::from(q, kc.lanes);
  const k::QView v = km.view();
  // q_gemm_nt: X [T, cols] -> Y [T, rows]; q_gemm_nn: C [T, rows] -> Y [T, cols]
  const bool nt = kc.lanes || kc.nt;
  const std::size_t in = nt ? kc.cols : kc.rows, out = nt ? kc.rows : kc.cols;
  std::vector<float> X(T * in), Y(T * out, 0.0f), buf(kc.rows * kc.cols);
  for (auto& x : X) x = nd(rng);
  const std::size_t macs = kc.rows * kc.cols * T;
  for (auto _ : state) {
    if (which == kernel_impl::fma_bound) {
      float sink = 0;
      k::fma_peak(macs / k::fma_peak(1, &sink), &sink);
      benchmark::DoNotOptimize(sink);
    } else if (which == kernel_impl::decode_gemm_nn) {
      k::q_decode_rows(v, 0, kc.rows, 0, buf.data(), kc.cols);
      k::gemm_nn(X.data(), in, T, kc.rows, buf.data(), kc.cols, kc.cols, Y.data(), out);
    } else if (nt) {
      k::q_gemm_nt(v, 0, kc.rows, 0, X.data(), in, T, 1.0f, Y.data(), out);
    } else {
      k::q_gemm_nn(v, 0, kc.rows, 0, X.data(), in, T, Y.data(), out);
    }
    benchmark::DoNotOptimize(Y.data());
    benchmark::ClobberMemory();
  }
  state.counters["GMAC/s"] = benchmark::Counter(static_cast<double>(macs) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  s2lc::bench::set_bytes(state, 0.0);
}

enum class layer_impl { s2lc, s2lc_int8, s2lc_t2, openblas, stream_bound, fma_bound, s2lc_apart };

// The multiply-adds swiglu_apply does for a plan (morph/grouped.hpp): per matrix, each core node
// over the union of its routed members' tokens, each routed expert's residual over its tokens, and
// per expert again the core blocks its raw residual blocks replace (subtracted); w2's shared-basis
// blocks: their right factors per expert and token, each basis (as many rows as the largest rank
// there) once per token of the plan (detail::apply_shared_summed).
std::size_t layer_macs(const RealLayer& L, const s2lc::DispatchPlan& plan) {
  auto matrix_macs = [](const mo::KMatrix& m, bool summed) {
    std::size_t n = 0;
    for (const auto& b : m.blocks) n += summed && mo::detail::summed_block(b) ? std::size_t{b.rank} * b.cb : b.apply_macs();
    return n;
  };
  std::size_t n = 0;
  for (const mo::KGroup* g : {L.layers[0].w1, L.layers[0].w3, L.layers[0].w2}) {
    const bool summed = g == L.layers[0].w2;
    std::vector<std::vector<std::uint8_t>> on(g->cores.size(), std::vector<std::uint8_t>(plan.n_tokens, 0));
    std::map<std::uint32_t, std::pair<std::size_t, std::size_t>> bases;  // grid block: basis rows used, rb
    for (std::size_t e = 0; e < plan.n_experts(); ++e) {
      const std::size_t t = plan.count(e);
      if (t == 0) continue;
      for (std::size_t i = plan.offsets[e]; i < plan.offsets[e + 1]; ++i)
        for (auto nd : g->path[e]) on[nd][plan.token[i]] = 1;
      n += t * matrix_macs(g->residuals[e], summed);
      for (const auto& b : g->residuals[e].blocks)
        if (summed && mo::detail::summed_block(b)) {
          auto& [rows, rb] = bases[b.index];
          rows = std::max<std::size_t>(rows, b.rank), rb = b.rb;
        }
      for (auto nd : g->path[e])
        for (const auto& b : g->cores[nd].blocks)
          if (g->replaces[e][b.index]) n += t * b.apply_macs();
    }
    for (std::size_t nd = 0; nd < g->cores.size(); ++nd)
      n += static_cast<std::size_t>(std::count(on[nd].begin(), on[nd].end(), 1)) * matrix_macs(g->cores[nd], false);
    for (const auto& [index, rr] : bases)  // apply_shared_summed: each basis over all tokens of the plan
      n += rr.first * rr.second * plan.n_tokens;
  }
  return n;
}

void bench_layer(benchmark::State& state, std::size_t T, bool cold, layer_impl which) {
  openblas_set_num_threads(1);
  RealLayer& L = real_layer();
  const std::vector<mo::SwiGLUExperts>& layers = which == layer_impl::s2lc_apart ? L.apart : L.layers;
  const std::size_t d = L.d, f = L.f, E = L.experts, m = d * f;
  const auto plan = layer_plan(E, T);
  mo::ThreadPool& pool = pool2();
  std::vector<float> X(T * d), Y(T * d, 0.0f);
  std::mt19937 rng(3);
  std::normal_distribution<float> nd;
  for (auto& v : X) v = nd(rng);
  const unsigned workers = which == layer_impl::s2lc_t2 ? 2u : 1u;
  std::vector<std::byte> mem(mo::swiglu_scratch_bytes(L.layers[0], T, plan.routed(), workers));
  mo::Arena arena(mem);
  std::vector<float> xe(T * d), h1(T * f), h3(T * f), ye(T * d);
  static std::vector<float> stream;
  if (which == layer_impl::stream_bound && stream.empty()) stream.assign(kColdBytes / sizeof(float), 1.0f);
  // Bytes: s2lc reads the routed members' residuals and their cores once (bases once); OpenBLAS
  // the routed experts' three f32 matrices.
  std::vector<std::uint32_t> routed;
  for (std::size_t e = 0; e < E; ++e)
    if (plan.offsets[e + 1] > plan.offsets[e]) routed.push_back(static_cast<std::uint32_t>(e));
  double s2lc_bytes = 0;
  for (const mo::KGroup* g : {L.layers[0].w1, L.layers[0].w3, L.layers[0].w2}) {
    std::vector<const mo::KMatrix*> ms;
    std::vector<std::uint8_t> node(g->cores.size(), 0);
    for (auto e : routed) {
      ms.push_back(&g->residuals[e]);
      for (auto nd2 : g->path[e]) node[nd2] = 1;
    }
    for (std::size_t k = 0; k < node.size(); ++k)
      if (node[k]) ms.push_back(&g->cores[k]);
    s2lc_bytes += static_cast<double>(g->bytes_with_bases(ms));
  }
  const double dense_bytes = static_cast<double>(routed.size() * 3 * m * sizeof(float));
  const std::size_t macs = layer_macs(L, plan);
  float sink = 0;
  const std::size_t lanes8 = which == layer_impl::fma_bound ? s2lc::kernels::fma_peak(1, &sink) : 1;
  if (cold && which != layer_impl::fma_bound) {
    if (which == layer_impl::openblas) ab::touch_buffers(L.dense);
    else if (which == layer_impl::stream_bound) ab::touch_pages(stream.data(), stream.size() * sizeof(float));
    else
      for (const auto& l : layers)
        for (const mo::KGroup* g : {l.w1, l.w3, l.w2}) ab::touch_pages(ab::group_ranges(*g));
  }
  std::size_t i = 0;
  for (auto _ : state) {
    switch (which) {
      case layer_impl::s2lc:
      case layer_impl::s2lc_int8:
      case layer_impl::s2lc_t2:
      case layer_impl::s2lc_apart:
        mo::swiglu_apply(layers[cold ? i % layers.size() : 0], plan, X.data(), d, Y.data(), d, arena,
                         which == layer_impl::s2lc_t2 ? &pool : nullptr,
                         {0, which == layer_impl::s2lc_int8 ? mo::Activations::int8 : mo::Activations::f32});
        break;
      case layer_impl::openblas:
        dense_layer(L, L.dense[cold ? i % L.dense_copies : 0].data(), plan, routed, X.data(), Y.data(), xe, h1, h3, ye);
        break;
      case layer_impl::stream_bound:
        benchmark::DoNotOptimize(s2lc::kernels::stream_read(stream.data(), cold ? stream.size() : m * 3));
        break;
      case layer_impl::fma_bound:  // register FMAs as many as swiglu_apply's multiply-adds
        s2lc::kernels::fma_peak(macs / lanes8, &sink);
        break;
    }
    ++i;
    benchmark::ClobberMemory();
  }
  benchmark::DoNotOptimize(sink);
  state.counters["experts"] = static_cast<double>(routed.size());
  state.counters["macs"] = static_cast<double>(macs);
  const double bytes = which == layer_impl::fma_bound ? 0.0
                       : which == layer_impl::openblas ? dense_bytes
                       : which == layer_impl::stream_bound ? static_cast<double>((cold ? stream.size() : m * 3) * sizeof(float))
                                                           : s2lc_bytes;
  s2lc::bench::set_bytes(state, bytes);
}

const bool registered = [] {
  const char* names[] = {"s2lc", "s2lc_int8", "openblas", "highway_dense", "stream_bound", "fma_bound", "read_bound"};
  for (std::size_t si = 0; si < std::size(kShapes); ++si)
    for (bool cold : {false, true})
      for (std::size_t B : {1u, 8u, 32u})
        for (int w = 0; w < 7; ++w)
          benchmark::RegisterBenchmark(("apply/" + std::string(names[w]) + "/" + case_name(si, B, cold)).c_str(),
                                       [=](benchmark::State& st) { bench_apply(st, si, B, cold, static_cast<impl>(w)); })
              ->Unit(benchmark::kMicrosecond);
  s2lc::bench::register_op("apply", {"openblas", "stream_bound", "read_bound"});
  for (std::size_t si = 0; si < std::size(kShapes); ++si) {
    for (unsigned K : {0u, 2u, 4u, 8u})
      for (unsigned tr : {0u, 1u, 2u}) {
        if (tr && !K) continue;
        benchmark::RegisterBenchmark(("morph/" + (K ? "morph" + std::to_string(K) + trunc_suffix(tr) : std::string("single")) + "/" +
                                      case_name(si, 1, true)).c_str(),
                                     [=](benchmark::State& st) { bench_morph(st, si, K, tr); })
            ->Unit(benchmark::kMicrosecond);
      }
    for (bool bf16 : {false, true})
      for (bool cold : {false, true})
        for (int w = 0; w < 9; ++w) {
          if (bf16 && static_cast<merge_impl>(w) == merge_impl::s2lc_f32) continue;
          benchmark::RegisterBenchmark(("merge/" + std::string(merge_names[w]) + "/" + std::to_string(kShapes[si].rows) + "x" +
                                        std::to_string(kShapes[si].cols) + (bf16 ? "_bf16" : "") + (cold ? "_cold" : "_hot")).c_str(),
                                       [=](benchmark::State& st) {
                                         if (bf16) bench_merge<std::uint16_t>(st, si, static_cast<merge_impl>(w), cold);
                                         else bench_merge<float>(st, si, static_cast<merge_impl>(w), cold);
                                       })
              ->Unit(benchmark::kMicrosecond);
        }
  }
  for (std::size_t role = 0; role < 3; ++role)
    for (unsigned K : {0u, 2u, 4u, 8u})
      for (unsigned tr : {0u, 1u, 2u}) {
        if (tr && !K) continue;
        benchmark::RegisterBenchmark(("morph/" + (K ? "morph" + std::to_string(K) + trunc_suffix(tr) : std::string("single")) +
                                      "/tinymoe_" + (role == 0 ? "w1" : role == 1 ? "w2" : "w3") + "_b1_cold").c_str(),
                                     [=](benchmark::State& st) { bench_morph_real(st, role, K, tr); })
            ->Unit(benchmark::kMicrosecond);
      }
  const char* layer_names[] = {"s2lc", "s2lc_int8", "s2lc_t2", "openblas", "stream_bound", "fma_bound", "s2lc_apart"};
  for (bool cold : {false, true})
    for (std::size_t T : {1u, 8u, 32u})
      for (int w = 0; w < 7; ++w)
        benchmark::RegisterBenchmark(("layer/" + std::string(layer_names[w]) + "/tinymoe_t" + std::to_string(T) + (cold ? "_cold" : "_hot")).c_str(),
                                     [=](benchmark::State& st) { bench_layer(st, T, cold, static_cast<layer_impl>(w)); })
            ->Unit(benchmark::kMicrosecond);
  for (bool bf16 : {false, true})
    for (bool cold : {false, true})
      for (merge_impl w : {merge_impl::s2lc, merge_impl::s2lc_unmerge, merge_impl::memcpy, merge_impl::rmw, merge_impl::s2lc_t2, merge_impl::memcpy_t2})
        benchmark::RegisterBenchmark(("merge/" + std::string(merge_names[static_cast<int>(w)]) +
                                      "/tinymoe_domain" + (bf16 ? "_bf16" : "") + (cold ? "_cold" : "_hot")).c_str(),
                                     [=](benchmark::State& st) {
                                       if (bf16) bench_merge_domain<std::uint16_t>(st, w, cold);
                                       else bench_merge_domain<float>(st, w, cold);
                                     })
            ->Unit(benchmark::kMicrosecond);
  for (bool cold : {false, true})
    for (merge_impl w : {merge_impl::s2lc, merge_impl::memcpy, merge_impl::rmw})
      benchmark::RegisterBenchmark(("merge/" + std::string(merge_names[static_cast<int>(w)]) + "/tinymoe_domain_m0" + (cold ? "_cold" : "_hot")).c_str(),
                                   [=](benchmark::State& st) { bench_merge_domain<float>(st, w, cold, true); })
          ->Unit(benchmark::kMicrosecond);
  for (const MergeRowsCase& mc : kMergeRowsCases)
    for (bool bf16 : {false, true})
      for (merge_impl w : {merge_impl::s2lc, merge_impl::s2lc_unmerge, merge_impl::memcpy})
        benchmark::RegisterBenchmark(("merge/" + std::string(merge_names[static_cast<int>(w)]) + "/" + mc.name + (bf16 ? "_bf16" : "_f32") + "_hot").c_str(),
                                     [=](benchmark::State& st) {
                                       if (bf16) bench_merge_rows<std::uint16_t>(st, mc, w);
                                       else bench_merge_rows<float>(st, mc, w);
                                     })
            ->Unit(benchmark::kMicrosecond);
  for (const KernelCase& kc : kKernelCases)
    for (std::size_t T : {1u, 2u, 3u, 4u, 5u, 8u, 16u, 32u, 64u})
      for (kernel_impl w : {kernel_impl::s2lc, kernel_impl::decode_gemm_nn, kernel_impl::fma_bound}) {
        if (w == kernel_impl::decode_gemm_nn && (kc.lanes || kc.nt)) continue;
        const char* iname = w == kernel_impl::s2lc ? "s2lc" : w == kernel_impl::fma_bound ? "fma_bound" : "decode_gemm_nn";
        benchmark::RegisterBenchmark(("kernel/" + std::string(iname) + "/" + kc.name + "_t" + std::to_string(T)).c_str(),
                                     [=](benchmark::State& st) { bench_kernel(st, kc, T, w); })
            ->Unit(benchmark::kMicrosecond);
      }
  for (std::size_t si = 0; si < std::size(kShapes); ++si)
    for (std::size_t T : {1u, 8u, 32u})
      for (grouped_impl w : {grouped_impl::s2lc, grouped_impl::s2lc_int8, grouped_impl::openblas})
        benchmark::RegisterBenchmark(("grouped/" + std::string(w == grouped_impl::s2lc ? "s2lc" : w == grouped_impl::s2lc_int8 ? "s2lc_int8" : "openblas") +
                                      "/" + std::to_string(kShapes[si].rows) + "x" + std::to_string(kShapes[si].cols) + "_t" + std::to_string(T) + "_hot").c_str(),
                                     [=](benchmark::State& st) { bench_grouped(st, si, T, w); })
            ->Unit(benchmark::kMicrosecond);
  s2lc::bench::register_op("grouped", {"openblas", "none"});
  s2lc::bench::register_op("kernel", {"fma_bound", "none"});
  s2lc::bench::register_op("layer", {"openblas", "stream_bound"});
  s2lc::bench::register_op("morph", {"single", "none"});
  s2lc::bench::register_op("merge", {"memcpy", "memcpy"});
  // Issue 4's targets, checked on whichever of these rows ran (bench/apply/targets.sh runs them).
  // Batch 1 is judged cold (weights from DRAM; hot, OpenBLAS reads its 11.5 MB from L3). The 4x
  // over OpenBLAS is asked at 8x compression, the synthetic experts' ratio; the tinymoe layer's
  // bytes are about a fifth of its f32 weights, so its speedup is only in the ratio table.
  using T = s2lc::bench::Target;
  const std::vector<std::string> acts = {"s2lc", "s2lc_int8"};
  const char* b1 = "batch 1: x its bandwidth bound";
  const char* b1_blas = "batch 1: times as fast as OpenBLAS f32";
  const char* bn = "batch 8-32: x max(bandwidth, FMA) bound";
  s2lc::bench::register_target({b1, "apply", acts, ".*_b1_cold", T::Kind::bound, "", 1.3});
  s2lc::bench::register_target({b1, "layer", acts, "tinymoe_t1_cold", T::Kind::bound, "", 1.3});
  s2lc::bench::register_target({b1_blas, "apply", acts, ".*_b1_cold", T::Kind::speedup, "openblas", 4.0});
  s2lc::bench::register_target({bn, "apply", acts, ".*_b(8|32)_(cold|hot)", T::Kind::max_bound, "fma_bound", 1.5});
  s2lc::bench::register_target({bn, "layer", acts, "tinymoe_t(8|32)_(cold|hot)", T::Kind::max_bound, "fma_bound", 1.5});
  std::vector<std::string> morphs;
  for (unsigned K : {2u, 4u, 8u})
    for (unsigned tr : {0u, 1u, 2u}) morphs.push_back("morph" + std::to_string(K) + trunc_suffix(tr));
  s2lc::bench::register_target({"morph of K experts: x one expert", "morph", morphs, ".*", T::Kind::time_ratio, "single", 1.25});
  s2lc::bench::register_target({"JIT merge: x a copy of the buffer", "merge", {"s2lc"}, ".*_cold", T::Kind::time_ratio, "memcpy", 1.3});
  return true;
}();

}  // namespace
