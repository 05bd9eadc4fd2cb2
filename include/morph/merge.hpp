// s2lc::morph — JIT merge: add a compressed member (or a morphed hybrid, or a member's module over
// a buffer that holds its base cores: MemberPart) into a caller-provided dense f32 or bf16 weight
// buffer in place, for engines that want dense weights, and unmerge it again restoring the base
// bit for bit.
//
// Exactness without a copy of the base: merge computes w' = w + d per element (bf16: rounded to
// nearest even) and checks that w' - d gives w back; where it does not (a binade crossed, a
// tie), the element's mask bit is set and its old value goes into the MergeUndo record (1 bit per
// element plus 4 bytes per recorded f32 one). How many depends on the delta's size against the
// base: a module a tenth of the base's size records about 6 %; merging half an expert into
// another expert of the same layer (tinymoe) 11-13 % (the record: about a sixth of a copy's
// bytes); a delta much larger than the base records most of them. unmerge decodes the same d
// (same kernels, same order and arithmetic: bit-identical), subtracts it and writes the recorded
// values back.
//
// Decoding is per grid block into scratch, so the block's delta is never a full matrix; a
// low-rank block's factors multiply in int16 fixed point unless merge_math::f32 is asked for. A
// block whose only part is dense (a domain module's full-rank delta) is not decoded into scratch
// at all: its codes decode in registers straight into the merge (kernels::q_merge_rows_*, the
// same bits and record), a panel of 16 rows at a time.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "morph/morph.hpp"
#include "morph/parallel.hpp"
#include "morph/runtime.hpp"
#include "s2lc/dtype.hpp"
#include "s2lc/error.hpp"
#include "s2lc/kernels/qgemm.hpp"

namespace s2lc::morph {

/// How merge multiplies the two factors of a low-rank block (dense blocks always decode in f32).
///  * fixed16 (default): int16 fixed point, exact int32 sums (kernels::lowrank_add_fixed):
///    twice the f32 FMA rate with AVX-512 VNNI; each product term off by about 2^-13 of the
///    block row's largest term (K = 64), against the factors' own 2-8-bit quantization.
///  * f32: f32 products, the reconstruction's arithmetic (compress::reconstruct) up to rounding.
enum class merge_math { fixed16, f32 };

/// Which part of member e a merge adds. e's cores are the nodes of its path, root first; the
/// first `held` of them (all by default) are the base an engine keeps as its dense weights:
///  * whole: all of W_e (its cores and its residual);
///  * base: those `held` cores, on every block (materialize the base once, e.g. into zeros);
///  * module: W_e minus that base: e's residual and the cores below the base; on a block where a
///    raw residual replaces the cores, the residual minus the base. base + module = W_e, so a
///    buffer holding the base swaps modules without touching the base, and a module's blocks
///    with nothing in them (block-sparse residuals) are not read or written at all.
enum class member_part { whole, base, module };
struct MemberPart {
  member_part what = member_part::whole;
  std::size_t held = static_cast<std::size_t>(-1);  ///< cores in the base, root first (more than the path: all)
};

/// Name of a member part, for messages.
inline const char* member_part_name(member_part p) noexcept {
  return p == member_part::whole ? "whole" : p == member_part::base ? "base" : "module";
}

/// What unmerge needs besides the module: the elements whose merge was not exactly invertible.
struct MergeUndo {
  dtype type = dtype::f32;
  merge_math math = merge_math::fixed16;  ///< unmerge decodes the delta the same way
  member_part part = member_part::whole;  ///< what merge added (KMorph: whole)
  std::size_t held = 0;                   ///< cores in the base (part base or module; min(held, path length))
  std::size_t rows = 0, cols = 0, ld = 0;
  /// One bit per element, set where the element was recorded: per grid block in index order, per
  /// block row ceil(block cols / 8) bytes, bit j = the block row's column j.
  std::vector<std::uint8_t> mask;
  std::vector<float> f32;             ///< old values of the recorded elements, in mask order (f32 buffers)
  std::vector<std::uint16_t> bf16;    ///< ... (bf16 buffers)
  std::size_t exceptions() const noexcept { return type == dtype::f32 ? f32.size() : bf16.size(); }
};

namespace detail {

struct MemberDelta {
  const KGroup* g;
  std::size_t e;
  float scale;
  member_part part = member_part::whole;
  std::size_t held = 0;  ///< <= g->path[e].size()
};
struct MorphDelta {
  const KMorph* m;
  float scale;
};

/// Writes the parts of one block of a delta into out (n floats): the first part overwrites out
/// (no zeroing pass), the others add; finish() writes zeros if there was no part at all.
struct DeltaWriter {
  const KGroup& g;
  float* out;
  std::size_t n;
  unsigned tier;
  BlockScratch& bs;
  bool fixed;
  const kernels::PrefetchRows* pf;  ///< given to the first fixed-point low-rank part (then null)
  bool first = true;
  void add(const KBlock& k, float w) {
    const bool lr = k.kind == compress::block_kind::lowrank || k.kind == compress::block_kind::shared;
    add_block(g, k, w, tier, out, &bs, first, fixed, lr && fixed ? pf : nullptr), first = false;
    if (lr && fixed) pf = nullptr;
  }
  void finish() const {
    if (first) std::fill(out, out + n, 0.0f);
  }
};

/// Calls f(block, weight) for each part of block b of the delta, in the order they are summed: a
/// member's (or a hybrid's) cores root first, then its residual; a module's cores below the base,
/// its residual, then (where the residual replaces the cores) the base's cores negated.
template <class F>
void for_parts(const MemberDelta& s, std::size_t b, F&& f) {
  const KGroup& g = *s.g;
  const auto& path = g.path[s.e];
  const bool rep = g.replaces[s.e][b] != 0;
  const std::size_t from = s.part == member_part::module ? s.held : 0, to = s.part == member_part::base ? s.held : path.size();
  if (!rep || s.part == member_part::base)
    for (std::size_t i = from; i < to; ++i)
      if (const KBlock* c = find_block(g.cores[path[i]], b)) f(*c, s.scale);
  if (s.part == member_part::base) return;
  if (const KBlock* r = find_block(g.residuals[s.e], b)) f(*r, s.scale);
  if (rep && s.part == member_part::module)
    for (std::size_t i = 0; i < s.held; ++i)
      if (const KBlock* c = find_block(g.cores[path[i]], b)) f(*c, -s.scale);
}

template <class F>
void for_parts(const MorphDelta& s, std::size_t b, F&& f) {
  const KGroup& g = *s.m->group;
  if (!s.m->replaces[b])
    for (const auto& [nd, w] : s.m->cores)
      if (const KBlock* c = find_block(g.cores[nd], b)) f(*c, s.scale * w);
  if (const KBlock* r = find_block(s.m->residual, b)) f(*r, s.scale);
}

inline const KGroup& group_of(const MemberDelta& s) noexcept { return *s.g; }
inline const KGroup& group_of(const MorphDelta& s) noexcept { return *s.m->group; }

/// Whether block b of the delta has any part (else it is zero and the merge skips the block).
template <class Source>
bool has_parts(const Source& s, std::size_t b) {
  bool any = false;
  for_parts(s, b, [&](const KBlock&, float) { any = true; });
  return any;
}

/// Writes block b of the delta (a member's effective block or part, or a hybrid's) to out [rb, cb].
template <class Source>
void decode_delta(const Source& s, std::size_t b, float* out, std::size_t n, unsigned tier, BlockScratch& bs, bool fixed,
                  const kernels::PrefetchRows* pf = nullptr) {
  DeltaWriter dw{group_of(s), out, n, tier, bs, fixed, pf};
  for_parts(s, b, [&](const KBlock& k, float w) { dw.add(k, w); });
  dw.finish();
}

/// Block b's part and its weight when that is all the block has and it is dense (its rows then
/// decode in registers straight into the merge: kernels::q_merge_rows_*), else null.
template <class Source>
const KBlock* lone_dense_part(const Source& s, std::size_t b, float& weight) {
  const KBlock* one = nullptr;
  std::size_t parts = 0;
  for_parts(s, b, [&](const KBlock& k, float w) { ++parts, one = &k, weight = w; });
  return parts == 1 && one->kind == compress::block_kind::dense ? one : nullptr;
}

/// Whether some block of g takes the decoded-delta path (no lone dense part): the merge's
/// per-worker scratch is needed.
template <class Source>
bool some_block_decodes(const KGroup& g, const Source& s) {
  float w = 0;
  for (std::size_t b = 0; b < g.grid.blocks(); ++b)
    if (!lone_dense_part(s, b, w)) return true;
  return false;
}

/// Calls f(first row, rows, the buffer at the first row, the rows to prefetch) for block b's rows
/// in runs of a rows-in-lanes panel (16): each run's prefetch is the next run (past the block's
/// last: the next block's first), streamed in for writing a row at a time under the run.
template <class T, class F>
void dense_block_runs(const KGroup& g, std::size_t b, T* buf, std::size_t ld, F&& f) {
  constexpr std::size_t R = kernels::QView::kLaneRows;
  const std::size_t r0 = g.grid.r0(b), c0 = g.grid.c0(b), rb = g.grid.rb(b);
  for (std::size_t i = 0; i < rb; i += R) {
    std::size_t pb = b, pi = i + R;
    if (pi >= rb) pb = b + 1, pi = 0;
    kernels::PrefetchRows pf;
    if (pb < g.grid.blocks())
      pf = {buf + (g.grid.r0(pb) + pi) * ld + g.grid.c0(pb), std::min(R, g.grid.rb(pb) - pi), ld * sizeof(T), g.grid.cb(pb) * sizeof(T)};
    f(i, std::min(R, rb - i), buf + (r0 + i) * ld + c0, pf);
  }
}

/// Rows ahead the merge prefetches the buffer (delta_block_rows).
inline constexpr std::size_t kMergePrefetchRows = 8;

/// One worker's scratch: a block's delta and the decode scratch (reused block after block).
struct MergeScratch {
  std::vector<float> d;
  BlockScratch bs;
};

/// At a merge's or unmerge's start (PageSeeder): the source's coefficients, then the buffer's
/// rows, up to kSeedBytes in all (the merge walks the buffer a 1 KB piece of a row at a time,
/// which the hardware prefetchers do not follow on their own). The real domain module's 12
/// matrices merged cold into f32 weights, six alternating bench runs: faster in each, median
/// 1041 -> 807 us, 0.76-1.90x -> 0.75-1.33x a copy of the same run; unmerge 912-1368 -> 726-918 us
/// (bench/RESULTS.md, "Seeding the merge's buffer and coefficients").
template <class T, class Source>
void seed_merge_pages(const KGroup& g, const Source& src, const T* buf, std::size_t ld) noexcept {
  PageSeeder seed;
  if constexpr (std::is_same_v<Source, MemberDelta>) seed_member_pages(seed, g, src.e);
  else seed_morph_pages(seed, *src.m);
  if (g.rows()) seed.range(buf, ((g.rows() - 1) * ld + g.cols()) * sizeof(T));
}

/// Decodes block b's delta into s.d, then calls row_fn(row pointer into buf, the delta's row,
/// length) for each of the block's rows; nothing for a block without parts (its delta is zero:
/// the buffer is neither read nor written there, and its mask bits stay clear).
template <class T, class Source, class RowFn>
void delta_block_rows(const KGroup& g, const Source& src, std::size_t b, T* buf, std::size_t ld, unsigned tier, merge_math math,
                      MergeScratch& s, RowFn&& row_fn) {
  if (!has_parts(src, b)) return;
  const std::size_t r0 = g.grid.r0(b), c0 = g.grid.c0(b), rb = g.grid.rb(b), cb = g.grid.cb(b);
  // The block's buffer rows stream in under the products (prefetched a few per register tile):
  // the pass below is memory-bound, the products are not.
  const kernels::PrefetchRows pf{buf + r0 * ld + c0, rb, ld * sizeof(T), cb * sizeof(T)};
  decode_delta(src, b, s.d.data(), rb * cb, tier, s.bs, math == merge_math::fixed16, &pf);
  for (std::size_t i = 0; i < rb; ++i) {
    // The buffer row kMergePrefetchRows ahead (into the next block past the last rows): each
    // block row is a 1 KB piece of a longer buffer row, too short for the hardware prefetchers
    // to pick up. 2048 x 1408 fixed16 merge: cold 2962-3056 -> 2337-2415 us, hot 2492-2553 ->
    // 2131-2205 (distances 2 / 4 / 16 / 32 rows: 2524 / 2388 / 2292-2408 / 2375-2506 cold).
    std::size_t pb = b, pi = i + kMergePrefetchRows;
    if (pi >= rb) pb = b + 1, pi -= rb;
    if (pb < g.grid.blocks() && pi < g.grid.rb(pb)) {
      const char* p = reinterpret_cast<const char*>(buf + (g.grid.r0(pb) + pi) * ld + g.grid.c0(pb));
#if defined(__GNUC__) || defined(__clang__)
      for (std::size_t o = 0; o < g.grid.cb(pb) * sizeof(T); o += 64) __builtin_prefetch(p + o, 1, 3);
#else
      (void)p;
#endif
    }
    row_fn(buf + (r0 + i) * ld + c0, s.d.data() + i * cb, cb);
  }
}

/// Runs f(block, scratch) for every grid block of g: on ex's workers (each with its own
/// scratch), or in order without one.
template <class F>
void for_each_block(const KGroup& g, Executor* ex, bool scratch, F&& f) {
  // Sized here for the largest block, so that workers allocate nothing (allocations and first
  // touches on two threads cost a two-thread merge 10-15 %); left empty when no block decodes
  // through it (scratch false: every block merges from its codes), where it was 300 KB allocated
  // and zeroed per call for a 256 x 256 grid: the real domain module's 12 matrices merged in
  // 610-633 us hot before, 535-576 after; cold 878-972 -> 841-884 (bench, alternating runs).
  std::vector<MergeScratch> s(ex ? ex->workers() : 1u);
  const std::size_t br = g.grid.block_rows, bc = g.grid.block_cols, r = g.max_rank;
  for (auto& x : s) {
    if (!scratch) continue;
    x.d.resize(br * bc);
    x.bs.a.resize(r * bc), x.bs.b.resize(r * br);
    x.bs.fixed.resize(kernels::lowrank_fixed_scratch(r, br, bc));
  }
  parallel_for(ex, g.grid.blocks(), [&](std::size_t b, unsigned w) { f(b, s[w]); });
}

/// MergeUndo::mask's byte offset of each grid block, and its size last (blocks + 1 entries).
inline std::vector<std::size_t> undo_mask_offsets(const KGroup& g) {
  std::vector<std::size_t> off(g.grid.blocks() + 1, 0);
  for (std::size_t b = 0; b < g.grid.blocks(); ++b) off[b + 1] = off[b] + g.grid.rb(b) * ((g.grid.cb(b) + 7) / 8);
  return off;
}

template <class T, class U>
auto& undo_values(U& u) {
  if constexpr (std::is_same_v<T, float>) return u.f32;
  else return u.bf16;
}

/// Whether u's mask fits g's grid (off: undo_mask_offsets(g)): its size, and no bit past a block
/// row's last column.
inline bool undo_mask_fits(const KGroup& g, const MergeUndo& u, const std::vector<std::size_t>& off) {
  if (u.mask.size() != off.back()) return false;
  std::size_t at = 0;
  for (std::size_t b = 0; b < g.grid.blocks(); ++b) {
    const std::size_t cb = g.grid.cb(b), nb = (cb + 7) / 8;
    for (std::size_t i = 0; i < g.grid.rb(b); ++i, at += nb)
      if (cb % 8 && (u.mask[at + nb - 1] >> (cb % 8)) != 0) return false;
  }
  return true;
}

/// Collects recorded old values block row by block row (the kernels store whole vectors: 64
/// spare) in storage that is not zero-filled, grown by doubling (a std::vector's resize zeroed
/// twice the record and shrink_to_fit copied it again: memset + memmove were 2 % of a merge).
template <class T>
struct alignas(64) UndoSink {  // a cache line each: workers fill adjacent sinks
  std::unique_ptr<T[]> buf;
  std::size_t cap = 0, n = 0;
  T* room(std::size_t row) {
    if (cap < n + row + 64) {
      const std::size_t want = std::max({2 * cap, n + row + 64, std::size_t{4096}});
      auto grown = std::make_unique_for_overwrite<T[]>(want);
      if (n) std::memcpy(grown.get(), buf.get(), n * sizeof(T));
      buf = std::move(grown), cap = want;
    }
    return buf.get() + n;
  }
  void append_to(std::vector<T>& v) const {
    if (n) v.insert(v.end(), buf.get(), buf.get() + n);
  }
};

template <class T, class Source>
MergeUndo merge_impl(const KGroup& g, const Source& src, T* buf, std::size_t ld, unsigned tier, merge_math math, Executor* ex) {
  check_tier(tier);
  if (ld < g.cols()) throw invalid_argument("merge: leading dimension " + std::to_string(ld) + " is less than the " + std::to_string(g.cols()) + " columns");
  MergeUndo u;
  u.type = std::is_same_v<T, float> ? dtype::f32 : dtype::bf16;
  u.math = math;
  if constexpr (std::is_same_v<Source, MemberDelta>) u.part = src.part, u.held = src.part == member_part::whole ? 0 : src.held;
  u.rows = g.rows(), u.cols = g.cols(), u.ld = ld;
  seed_merge_pages(g, src, buf, ld);
  const auto off = undo_mask_offsets(g);
  u.mask.assign(off.back(), 0);
  auto& vals = undo_values<T>(u);
  // In order, blocks append to one sink; on workers, each block to its own, the sinks joined in
  // block order afterwards (the same record either way).
  const bool par = ex != nullptr && ex->workers() > 1 && g.grid.blocks() > 1;
  std::vector<UndoSink<T>> per(par ? g.grid.blocks() : 0);
  UndoSink<T> serial;
  for_each_block(g, par ? ex : nullptr, some_block_decodes(g, src), [&](std::size_t b, MergeScratch& s) {
    UndoSink<T>& sink = par ? per[b] : serial;
    std::size_t at = off[b];
    float w = 0;
    if (const KBlock* k = lone_dense_part(src, b, w)) {
      const auto q = k->a.view();
      const std::size_t cb = g.grid.cb(b), mb = (cb + 7) / 8;
      dense_block_runs(g, b, buf, ld, [&](std::size_t i, std::size_t n, T* rows, const kernels::PrefetchRows& pf) {
        T* v = sink.room(n * cb);
        if constexpr (std::is_same_v<T, float>) sink.n += kernels::q_merge_rows_f32(q, i, n, tier, w, rows, ld, u.mask.data() + at + i * mb, mb, v, &pf);
        else sink.n += kernels::q_merge_rows_bf16(q, i, n, tier, w, rows, ld, u.mask.data() + at + i * mb, mb, v, &pf);
      });
      return;
    }
    delta_block_rows(g, src, b, buf, ld, tier, math, s, [&](T* row, const float* d, std::size_t n) {
      T* v = sink.room(n);
      if constexpr (std::is_same_v<T, float>) sink.n += kernels::merge_f32(row, d, n, u.mask.data() + at, v);
      else sink.n += kernels::merge_bf16(row, d, n, u.mask.data() + at, v);
      at += (n + 7) / 8;
    });
  });
  std::size_t total = serial.n;
  for (const auto& p : per) total += p.n;
  vals.reserve(total);
  serial.append_to(vals);
  for (const auto& p : per) p.append_to(vals);
  return u;
}

/// Recorded elements per block of u's mask (mask bits set in the block's bytes).
inline std::vector<std::size_t> undo_marked(const MergeUndo& u, const std::vector<std::size_t>& off) {
  std::vector<std::size_t> n(off.size() - 1, 0);
  // (a vector kernel: std::popcount in this baseline-ISA code is a libgcc call per word, 11 % of
  // a real domain module's unmerge)
  for (std::size_t b = 0; b + 1 < off.size(); ++b) n[b] = kernels::count_bits(u.mask.data() + off[b], off[b + 1] - off[b]);
  return n;
}

template <class T, class Source>
void unmerge_impl(const KGroup& g, const Source& src, T* buf, std::size_t ld, const MergeUndo& u, unsigned tier, Executor* ex) {
  const dtype want = std::is_same_v<T, float> ? dtype::f32 : dtype::bf16;
  const auto& vals = undo_values<T>(u);
  const auto off = undo_mask_offsets(g);
  const bool fits = undo_mask_fits(g, u, off);
  // Each block's first value in the record (the marks of the blocks before it).
  std::vector<std::size_t> first(g.grid.blocks() + 1, 0);
  if (fits) {
    const auto marked = undo_marked(u, off);
    for (std::size_t b = 0; b < marked.size(); ++b) first[b + 1] = first[b] + marked[b];
  }
  if (u.type != want || u.rows != g.rows() || u.cols != g.cols() || u.ld != ld || !fits || first.back() != vals.size())
    throw invalid_argument("unmerge: the undo record belongs to another buffer (" + std::string(dtype_name(u.type)) + " [" +
                           std::to_string(u.rows) + ", " + std::to_string(u.cols) + "], ld " + std::to_string(u.ld) + ", " +
                           std::to_string(first.back()) + " elements marked, " + std::to_string(vals.size()) + " values)");
  member_part part = member_part::whole;
  std::size_t held = 0;
  if constexpr (std::is_same_v<Source, MemberDelta>) part = src.part, held = src.part == member_part::whole ? 0 : src.held;
  if (u.part != part || u.held != held)
    throw invalid_argument(std::string("unmerge: the undo record is of another part (") + member_part_name(u.part) + ", " + std::to_string(u.held) +
                           " cores held), not " + member_part_name(part) + ", " + std::to_string(held) + " cores held");
  seed_merge_pages(g, src, buf, ld);
  for_each_block(g, ex, some_block_decodes(g, src), [&](std::size_t b, MergeScratch& s) {
    std::size_t at = off[b], k = first[b];
    float w = 0;
    if (const KBlock* kb = lone_dense_part(src, b, w)) {
      const auto q = kb->a.view();
      const std::size_t mb = (g.grid.cb(b) + 7) / 8;
      dense_block_runs(g, b, buf, ld, [&](std::size_t i, std::size_t n, T* rows, const kernels::PrefetchRows& pf) {
        const std::uint8_t* m = u.mask.data() + at + i * mb;
        if constexpr (std::is_same_v<T, float>) k += kernels::q_unmerge_rows_f32(q, i, n, tier, w, rows, ld, m, mb, vals.data() + k, vals.size() - k, &pf);
        else k += kernels::q_unmerge_rows_bf16(q, i, n, tier, w, rows, ld, m, mb, vals.data() + k, vals.size() - k, &pf);
      });
      return;
    }
    delta_block_rows(g, src, b, buf, ld, tier, u.math, s, [&](T* row, const float* d, std::size_t n) {
      if constexpr (std::is_same_v<T, float>) k += kernels::unmerge_f32(row, d, n, u.mask.data() + at, vals.data() + k, vals.size() - k);
      else k += kernels::unmerge_bf16(row, d, n, u.mask.data() + at, vals.data() + k, vals.size() - k);
      at += (n + 7) / 8;
    });
  });
}

/// The delta of member e's part, e checked (what: the caller's name, for the message).
inline MemberDelta member_delta(const char* what, const KGroup& g, std::size_t e, float scale, MemberPart part) {
  if (e >= g.members()) throw invalid_argument(std::string(what) + ": member " + std::to_string(e) + " out of range");
  return MemberDelta{&g, e, scale, part.what, std::min(part.held, g.path[e].size())};
}

}  // namespace detail

/// buf [rows, cols] (row stride ld) += scale * W_e (or the part of it `part` names: its module
/// over a buffer that holds its base, or that base), in place. Keep the returned record for
/// unmerge. With an executor, grid blocks run on its workers; buffer and record come out the same.
inline MergeUndo merge(const KGroup& g, std::size_t e, float* buf, std::size_t ld, float scale = 1.0f, unsigned tier = 0,
                       merge_math math = merge_math::fixed16, Executor* ex = nullptr, MemberPart part = {}) {
  return detail::merge_impl(g, detail::member_delta("merge", g, e, scale, part), buf, ld, tier, math, ex);
}
inline MergeUndo merge(const KGroup& g, std::size_t e, std::uint16_t* bf16_buf, std::size_t ld, float scale = 1.0f, unsigned tier = 0,
                       merge_math math = merge_math::fixed16, Executor* ex = nullptr, MemberPart part = {}) {
  return detail::merge_impl(g, detail::member_delta("merge", g, e, scale, part), bf16_buf, ld, tier, math, ex);
}
inline MergeUndo merge(const KMorph& m, float* buf, std::size_t ld, float scale = 1.0f, merge_math math = merge_math::fixed16,
                       Executor* ex = nullptr) {
  return detail::merge_impl(*m.group, detail::MorphDelta{&m, scale}, buf, ld, 0, math, ex);
}
inline MergeUndo merge(const KMorph& m, std::uint16_t* bf16_buf, std::size_t ld, float scale = 1.0f, merge_math math = merge_math::fixed16,
                       Executor* ex = nullptr) {
  return detail::merge_impl(*m.group, detail::MorphDelta{&m, scale}, bf16_buf, ld, 0, math, ex);
}

/// Restores the buffer merge() changed, bit for bit (same member, scale, tier and part; the record
/// carries merge's arithmetic). The record is checked against the buffer's shape and the part first.
inline void unmerge(const KGroup& g, std::size_t e, float* buf, std::size_t ld, const MergeUndo& u, float scale = 1.0f, unsigned tier = 0,
                    Executor* ex = nullptr, MemberPart part = {}) {
  detail::unmerge_impl(g, detail::member_delta("unmerge", g, e, scale, part), buf, ld, u, tier, ex);
}
inline void unmerge(const KGroup& g, std::size_t e, std::uint16_t* bf16_buf, std::size_t ld, const MergeUndo& u, float scale = 1.0f,
                    unsigned tier = 0, Executor* ex = nullptr, MemberPart part = {}) {
  detail::unmerge_impl(g, detail::member_delta("unmerge", g, e, scale, part), bf16_buf, ld, u, tier, ex);
}
inline void unmerge(const KMorph& m, float* buf, std::size_t ld, const MergeUndo& u, float scale = 1.0f, Executor* ex = nullptr) {
  detail::unmerge_impl(*m.group, detail::MorphDelta{&m, scale}, buf, ld, u, 0, ex);
}
inline void unmerge(const KMorph& m, std::uint16_t* bf16_buf, std::size_t ld, const MergeUndo& u, float scale = 1.0f, Executor* ex = nullptr) {
  detail::unmerge_impl(*m.group, detail::MorphDelta{&m, scale}, bf16_buf, ld, u, 0, ex);
}

}  // namespace s2lc::morph
