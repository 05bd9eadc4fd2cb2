// s2lc::morph — compressed experts in kernel-ready form, and their application to token batches
// straight from the coefficients (no weight matrix is ever materialized).
//
// KGroup is a CompressedGroup (s2lc/compress/model.hpp) repacked once for the kernels
// (s2lc/kernels/qview.hpp): codes one per byte or one per nibble, only the non-zero blocks kept.
// apply(g, e, ...) computes Y[t, :] += alpha * W_e X[t, :] for a batch of tokens, where W_e is
// exactly what compress::reconstruct(g, e, tier) returns (up to f32 summation order):
//
//   cores on e's path (root first)  +  e's residual,
//   where a `raw` residual block replaces the cores in its block (they are skipped there).
//
// Per block and batch size n:
//   dense   rows in lanes: q_gemm_nt, codes decoded in registers once per pass of up to 8 tokens
//           (AVX-512; 4 elsewhere);
//           else n < 3: fused q_gemv_nt per token; else decode 16-row panels to L1 and gemm_nt;
//   lowrank/shared  t = b x (rank values per token), then y += left^T t
//           (left = the block's own factor, or the first `rank` vectors of a shared basis);
//           the right factor b is stored rows in lanes where its shape takes it (like dense
//           blocks, then also run by q_gemm_nt), the left factor row-major;
//   raw     gemm_nt on the f32 values.
// Scratch comes from a caller-provided Arena (no allocation on the apply path).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "s2lc/compress/model.hpp"
#include "s2lc/error.hpp"
#include "s2lc/kernels/qgemm.hpp"

namespace s2lc::morph {

/// A bump allocator over caller-owned memory; take() throws when it runs out (never allocates).
class Arena {
 public:
  Arena() = default;
  explicit Arena(std::span<std::byte> mem) : mem_(mem) {}
  template <class T>
  T* take(std::size_t n) {
    const std::size_t at = (used_ + 63) & ~std::size_t{63};
    if (at + n * sizeof(T) > mem_.size())
      throw invalid_argument("morph: scratch arena too small (" + std::to_string(mem_.size()) + " bytes, need at least " +
                             std::to_string(at + n * sizeof(T)) + "); size it with the *_scratch_bytes functions");
    used_ = at + n * sizeof(T);
    return reinterpret_cast<T*>(mem_.data() + at);
  }
  template <class T>
  T* take_zeroed(std::size_t n) {
    T* p = take<T>(n);
    std::memset(static_cast<void*>(p), 0, n * sizeof(T));
    return p;
  }
  std::size_t used() const noexcept { return used_; }
  std::size_t capacity() const noexcept { return mem_.size(); }
  /// Everything taken after mark() is released by reset(mark).
  std::size_t mark() const noexcept { return used_; }
  void reset(std::size_t mark = 0) noexcept { used_ = mark; }
  /// A sub-arena of `bytes` bytes carved from this one (for a worker).
  Arena split(std::size_t bytes) { return Arena({take<std::byte>(bytes), bytes}); }
  /// Bytes take<T>(n) may need including alignment padding.
  template <class T>
  static constexpr std::size_t bytes_for(std::size_t n) noexcept { return n * sizeof(T) + 64; }

 private:
  std::span<std::byte> mem_;
  std::size_t used_ = 0;
};

struct KMat;
struct KMatrix;

namespace detail {
/// One run of a shared pool (lay_out_pools): its matrices one after another, and the owner that
/// keeps the run's first byte (aliasing the whole allocation) and the run's bytes.
struct PoolRun {
  std::vector<KMat*> mats;
  std::shared_ptr<const std::uint8_t>* keep = nullptr;
  std::size_t* bytes = nullptr;
};
inline void lay_out_pools(std::span<const PoolRun> runs, const char* what);

/// Holds a pool alive for a group's bases (KGroup::pool_bases). A copy holds nothing: the copied
/// bases own their arrays (KMat's copy); a move passes the pool on with them.
struct PoolKeep {
  std::shared_ptr<const std::uint8_t> p;
  std::size_t n = 0;
  PoolKeep() = default;
  PoolKeep(const PoolKeep&) noexcept {}
  PoolKeep(PoolKeep&&) noexcept = default;
  PoolKeep& operator=(const PoolKeep&) noexcept {
    p.reset(), n = 0;
    return *this;
  }
  PoolKeep& operator=(PoolKeep&&) noexcept = default;
};
}  // namespace detail

/// A kernel-ready quantized matrix. Its codes and scales are either its own (the vectors) or, once
/// a KMatrix (KMatrix::pool) or its group (KGroup::pool_bases, for a basis) has pooled it, views
/// into that pool; the vectors are then empty. Read it through view() and bytes(). A copy always
/// owns its data (a block copied out of a pooled matrix does not point into it); a move keeps what
/// it had, so a KMat moved out of a pooled matrix or group still reads that pool and must not
/// outlive it (copy it instead).
struct KMat {
  std::uint32_t rows = 0, cols = 0, group = 32;
  std::uint8_t bits = 8;
  bool nibble = false;
  bool lanes = false;                 ///< rows in lanes (kernels/qview.hpp): scales live in codes
  std::vector<std::uint8_t> codes;    ///< own codes (empty when pooled)
  std::vector<std::uint16_t> scales;  ///< own scales (empty when pooled)

  KMat() = default;
  KMat(const KMat& o)
      : rows(o.rows), cols(o.cols), group(o.group), bits(o.bits), nibble(o.nibble), lanes(o.lanes),
        codes(o.codes_data(), o.codes_data() + o.ncodes()), scales(o.scales_data(), o.scales_data() + o.nscales()) {}
  KMat(KMat&&) noexcept = default;
  KMat& operator=(const KMat& o) {
    if (this != &o) *this = KMat(o);
    return *this;
  }
  KMat& operator=(KMat&&) noexcept = default;

  const std::uint8_t* codes_data() const noexcept { return pcodes_ ? pcodes_ : codes.data(); }
  const std::uint16_t* scales_data() const noexcept { return pcodes_ ? pscales_ : scales.data(); }
  std::size_t ncodes() const noexcept { return pcodes_ ? ncodes_ : codes.size(); }
  std::size_t nscales() const noexcept { return pcodes_ ? nscales_ : scales.size(); }
  bool pooled() const noexcept { return pcodes_ != nullptr; }

  kernels::QView view() const noexcept {
    kernels::QView v;
    v.codes = codes_data(), v.scales = lanes ? nullptr : scales_data(), v.rows = rows, v.cols = cols, v.group = group;
    v.bits = bits, v.nibble = nibble, v.lanes = lanes;
    return v;
  }
  std::size_t bytes() const noexcept { return ncodes() + 2 * nscales(); }

  /// Repacks a storage-format matrix (same codes and scales, kernel layout); with `rows_in_lanes`
  /// the rows-in-lanes layout where the shape takes it (QView::lanes_fit), else row-major.
  static KMat from(const compress::QMatrix& q, bool rows_in_lanes) {
    KMat k = from(q);
    if (!rows_in_lanes || !kernels::QView::lanes_fit(k.cols, k.group)) return k;
    kernels::QView lv = k.view();
    lv.lanes = true;
    std::vector<std::uint8_t> out(lv.bytes());
    kernels::pack_lanes(k.view(), out.data());
    k.codes = std::move(out);
    k.scales.clear();
    k.lanes = true;
    return k;
  }
  /// Repacks a storage-format matrix (same codes and scales, kernel layout; a group wider than
  /// the matrix as one of its width, QView::kernel_group).
  static KMat from(const compress::QMatrix& q) {
    KMat k;
    k.rows = q.rows, k.cols = q.cols, k.bits = q.bits;
    k.nibble = q.bits <= 4 && q.group % 2 == 0;
    k.group = static_cast<std::uint32_t>(kernels::QView::kernel_group(q.cols, q.group, k.nibble));
    k.scales = q.scales;
    const std::size_t rb = kernels::QView::row_bytes(q.cols, q.group, k.nibble);
    k.codes.assign(rb * q.rows, 0);
    for (std::size_t r = 0; r < q.rows; ++r) {
      std::uint8_t* row = k.codes.data() + r * rb;
      for (std::size_t c = 0; c < q.cols; ++c) {
        const int code = compress::detail::read_code(q.codes.data(), q.codes.size(), r * q.cols + c, q.bits);
        if (!k.nibble) {
          row[c] = static_cast<std::uint8_t>(code);
          continue;
        }
        const std::size_t g = c / q.group, j = c % q.group;
        const std::size_t n = std::min<std::size_t>(q.group, q.cols - g * q.group), h = (n + 1) / 2;
        std::uint8_t& b = row[g * (q.group / 2) + (j < h ? j : j - h)];
        const auto nib = static_cast<std::uint8_t>(static_cast<unsigned>(code) & 0xFu);
        b = static_cast<std::uint8_t>(j < h ? (b & 0xF0u) | nib : (b & 0x0Fu) | (nib << 4));
      }
    }
    return k;
  }

 private:
  friend void detail::lay_out_pools(std::span<const detail::PoolRun>, const char*);
  const std::uint8_t* pcodes_ = nullptr;  // pooled: the codes and scales in the pool holding them
  const std::uint16_t* pscales_ = nullptr;
  std::size_t ncodes_ = 0, nscales_ = 0;
};

struct KBlock {
  compress::block_kind kind = compress::block_kind::zero;
  std::uint32_t index = 0;             ///< grid block index
  std::uint32_t r0 = 0, c0 = 0, rb = 0, cb = 0;
  std::uint32_t rank = 0, basis = 0;   ///< lowrank / shared
  KMat a, b;                           ///< dense: a; lowrank: a (left, [rank, rb]) and b (right); shared: b
  std::vector<float> raw;              ///< raw: [rb, cb]; lowrank / shared: if not empty, the right
                                       ///< factor in f32 [rank, cb] instead of b (morphed experts)

  std::size_t bytes() const noexcept { return a.bytes() + b.bytes() + raw.size() * sizeof(float); }
  /// The code container x meets in this block (bit 0: bytes, bit 1: nibbles; 0: no codes, as a
  /// raw block): the dense codes, else the right factor's.
  std::uint8_t x_container() const noexcept {
    const KMat& onx = kind == compress::block_kind::dense ? a : b;
    return onx.ncodes() ? (onx.nibble ? 2 : 1) : 0;
  }
  /// Multiply-adds of applying the block to one token: rank (rb + cb) if low-rank, else rb cb.
  std::size_t apply_macs() const noexcept {
    const bool lr = kind == compress::block_kind::lowrank || kind == compress::block_kind::shared;
    return lr ? std::size_t{rank} * (rb + cb) : std::size_t{rb} * cb;
  }
};

/// The non-zero blocks of a block matrix, in grid order. pool() moves the blocks' codes and
/// scales into one allocation, laid out in the order apply reads them (per block: the right
/// factor's scales and codes, then the left's; each array 64-byte aligned), so a cold apply reads
/// one stream instead of hundreds of small heap arrays wherever the allocator put them (measured
/// in bench/RESULTS.md). KGroup::from pools every matrix; a copy of a pooled matrix is pooled on
/// its own (it never shares its source's allocation, see pool_together).
struct KMatrix {
  std::vector<KBlock> blocks;

  KMatrix() = default;
  KMatrix(const KMatrix& o) : blocks(o.blocks) {
    if (o.pooled()) pool();
  }
  KMatrix(KMatrix&&) noexcept = default;
  KMatrix& operator=(const KMatrix& o) {
    if (this != &o) *this = KMatrix(o);
    return *this;
  }
  KMatrix& operator=(KMatrix&&) noexcept = default;

  std::size_t bytes() const noexcept {
    std::size_t n = 0;
    for (const auto& b : blocks) n += b.bytes();
    return n;
  }
  bool pooled() const noexcept { return pool_ != nullptr; }
  /// Bytes of the pool (0 if not pooled): bytes() plus alignment padding.
  std::size_t pool_bytes() const noexcept { return pool_ ? pool_n_ : 0; }
  /// The pool's first byte (null if not pooled).
  const std::uint8_t* pool_data() const noexcept { return pool_.get(); }

  /// Moves every block's codes and scales into one pool in read order (see above). Blocks added
  /// later keep their own arrays; pooling again re-packs everything.
  void pool() {
    KMatrix* one[] = {this};
    pool_together(one);
  }

  /// Pools the matrices ms into one allocation they share, one after the other in the order given,
  /// each laid out as pool() lays it out; the allocation lives as long as any of them. A cold
  /// apply that reads several of them in that order then reads one region instead of one per
  /// matrix wherever the allocator put it (pool_layer in grouped.hpp: a layer in the order
  /// swiglu_apply reads it). Throws invalid_argument if a matrix appears twice.
  static void pool_together(std::span<KMatrix* const> ms) {
    std::vector<detail::PoolRun> runs;
    for (KMatrix* k : ms) runs.push_back(k->pool_run());
    detail::lay_out_pools(runs, "KMatrix::pool_together");
  }

  /// The run pool_together lays out for this matrix: per block the right factor (b), then the
  /// left (a), the order apply reads them.
  detail::PoolRun pool_run() {
    detail::PoolRun r;
    for (auto& b : blocks) r.mats.push_back(&b.b), r.mats.push_back(&b.a);
    r.keep = &pool_, r.bytes = &pool_n_;
    return r;
  }

 private:
  std::shared_ptr<const std::uint8_t> pool_;  // into an allocation possibly shared (pool_together)
  std::size_t pool_n_ = 0;                    // its bytes (pool_bytes: 0 once moved from)
};

namespace detail {
/// Lays the runs' matrices out in one allocation, one after another in the order given, each
/// matrix's scales then codes, every array 64-byte aligned (zeroed padding); each run's owner
/// then aliases the allocation at the run's first byte, so it lives as long as any run does.
/// Throws invalid_argument, naming the caller (what), if a matrix or an owner appears twice.
inline void lay_out_pools(std::span<const PoolRun> runs, const char* what) {
  constexpr std::size_t kAlign = 64;
  auto up = [](std::size_t n) { return (n + kAlign - 1) & ~(kAlign - 1); };
  std::vector<const void*> seen;
  for (const auto& r : runs) {
    seen.push_back(r.keep);
    seen.insert(seen.end(), r.mats.begin(), r.mats.end());
  }
  std::sort(seen.begin(), seen.end());
  if (std::adjacent_find(seen.begin(), seen.end()) != seen.end()) throw invalid_argument(std::string(what) + ": a matrix appears twice");
  std::size_t total = 0;
  for (const auto& r : runs)
    for (const KMat* m : r.mats) total += up(m->ncodes()) + up(2 * m->nscales());
  std::shared_ptr<std::vector<std::uint8_t>> mem;  // zeroed: the alignment padding too
  std::uint8_t* p = nullptr;
  if (total) {
    mem = std::make_shared<std::vector<std::uint8_t>>(total + kAlign);
    const auto at = reinterpret_cast<std::uintptr_t>(mem->data());
    p = mem->data() + (((at + kAlign - 1) & ~std::uintptr_t{kAlign - 1}) - at);
  }
  for (const auto& r : runs) {
    std::uint8_t* const start = p;
    for (KMat* m : r.mats) {  // scales first: the kernels read them before the codes
      const std::size_t nc = m->ncodes(), ns = m->nscales();
      std::uint8_t* cp = p + up(2 * ns);
      if (ns) std::memcpy(p, m->scales_data(), 2 * ns);
      if (nc) std::memcpy(cp, m->codes_data(), nc);
      m->pcodes_ = nc ? cp : nullptr;
      m->pscales_ = nc ? reinterpret_cast<const std::uint16_t*>(p) : nullptr;
      m->ncodes_ = nc, m->nscales_ = ns;
      std::vector<std::uint8_t>().swap(m->codes);
      std::vector<std::uint16_t>().swap(m->scales);
      p = cp + up(nc);
    }
    // the old pool (if any) is released only here, after its codes were copied out
    *r.bytes = static_cast<std::size_t>(p - start);
    *r.keep = *r.bytes ? std::shared_ptr<const std::uint8_t>(mem, start) : nullptr;
  }
}
}  // namespace detail

struct KGroup {
  std::string name;
  std::vector<std::string> member_names;
  compress::GridShape grid;
  std::vector<KMatrix> cores;                    ///< one per HED node
  std::vector<int> parent;                       ///< per node
  std::vector<std::vector<std::uint32_t>> node_members;
  std::vector<std::vector<std::uint32_t>> path;  ///< per member: its nodes, root first
  std::vector<KMatrix> residuals;                ///< per member
  std::vector<std::vector<std::uint8_t>> replaces;  ///< per member, per grid block: 1 where a raw residual replaces the cores
  std::vector<KMat> bases;                       ///< shared left factors (pool_bases: in one allocation)
  detail::PoolKeep bases_pool;                   ///< keeps the bases' pool alive (empty in a copy)
  std::uint32_t max_rank = 0;                    ///< over every low-rank / shared block
  std::uint32_t group_size = 32;                 ///< quantization group of the payloads
  /// Per grid column: which code containers meet x there (bit 0: bytes, bit 1: nibbles), so
  /// int8 activations are quantized only for those (empty: assume both).
  std::vector<std::uint8_t> x_containers;

  std::size_t rows() const noexcept { return grid.rows; }
  std::size_t cols() const noexcept { return grid.cols; }
  std::size_t members() const noexcept { return residuals.size(); }

  /// The run KMatrix::pool_together-style pooling lays out for the bases (pool_layer).
  detail::PoolRun bases_run() {
    detail::PoolRun r;
    for (auto& b : bases) r.mats.push_back(&b);
    r.keep = &bases_pool.p, r.bytes = &bases_pool.n;
    return r;
  }
  /// Moves the bases' codes and scales into one allocation of their own, in basis order (as
  /// KMatrix::pool does for a matrix). KGroup::from does it; a copy of the group owns its bases'
  /// arrays until this is called again.
  void pool_bases() {
    const detail::PoolRun r = bases_run();
    detail::lay_out_pools({&r, 1}, "KGroup::pool_bases");
  }
  /// Bytes of the bases' pool (0 if they are not pooled).
  std::size_t bases_pool_bytes() const noexcept { return bases_pool.p ? bases_pool.n : 0; }
  /// The bases' pool's first byte (null if they are not pooled).
  const std::uint8_t* bases_pool_data() const noexcept { return bases_pool.p.get(); }

  /// Bytes of coefficients the kernels read to apply member e (its cores, residual and the bases
  /// its shared blocks use, each basis counted once).
  std::size_t member_bytes(std::size_t e) const {
    std::vector<const KMatrix*> ms{&residuals[e]};
    for (auto nd : path[e]) ms.push_back(&cores[nd]);
    return bytes_with_bases(ms);
  }

  /// Multiply-adds per token of apply(e): dense and raw blocks rb * cb, low-rank rank * (rb + cb);
  /// core blocks a raw residual replaces are skipped (the FMA bound of apply).
  std::size_t member_macs(std::size_t e) const {
    auto macs = [](const KMatrix& m, const std::uint8_t* skip) {
      std::size_t n = 0;
      for (const auto& b : m.blocks)
        if (!skip || !skip[b.index]) n += b.apply_macs();
      return n;
    };
    std::size_t n = macs(residuals[e], nullptr);
    for (auto nd : path[e]) n += macs(cores[nd], replaces[e].data());
    return n;
  }

  /// Bytes of the matrices plus each basis their shared blocks use, counted once.
  std::size_t bytes_with_bases(const std::vector<const KMatrix*>& ms) const {
    std::size_t n = 0;
    std::vector<std::uint8_t> used(bases.size(), 0);
    for (const KMatrix* m : ms) {
      n += m->bytes();
      for (const auto& b : m->blocks)
        if (b.kind == compress::block_kind::shared) used[b.basis] = 1;
    }
    for (std::size_t i = 0; i < bases.size(); ++i)
      if (used[i]) n += bases[i].bytes();
    return n;
  }

  static KGroup from(const compress::CompressedGroup& g) {
    KGroup k;
    k.name = g.name;
    k.member_names = g.member_names;
    k.grid = g.grid;
    k.group_size = g.group_size;
    k.x_containers.assign(g.grid.grid_cols(), 0);
    for (const auto& b : g.bases) k.bases.push_back(KMat::from(b.u));
    auto convert = [&](const compress::BlockMatrix& m) {
      KMatrix out;
      for (std::size_t i = 0; i < m.blocks.size(); ++i) {
        const auto& src = m.blocks[i];
        if (src.kind == compress::block_kind::zero) continue;
        KBlock b;
        b.kind = src.kind;
        b.index = static_cast<std::uint32_t>(i);
        b.r0 = static_cast<std::uint32_t>(g.grid.r0(i)), b.c0 = static_cast<std::uint32_t>(g.grid.c0(i));
        b.rb = static_cast<std::uint32_t>(g.grid.rb(i)), b.cb = static_cast<std::uint32_t>(g.grid.cb(i));
        b.rank = src.rank, b.basis = src.basis;
        switch (src.kind) {
          case compress::block_kind::dense: b.a = KMat::from(src.a, true); break;
          case compress::block_kind::lowrank: b.a = KMat::from(src.a), b.b = KMat::from(src.b, true); break;
          case compress::block_kind::shared: b.b = KMat::from(src.b, true); break;
          case compress::block_kind::raw: b.raw = src.raw; break;
          case compress::block_kind::zero: break;
        }
        if (src.kind == compress::block_kind::lowrank || src.kind == compress::block_kind::shared) k.max_rank = std::max(k.max_rank, src.rank);
        k.x_containers[b.c0 / g.grid.block_cols] |= b.x_container();
        out.blocks.push_back(std::move(b));
      }
      return out;
    };
    for (const auto& nd : g.nodes) {
      k.cores.push_back(convert(nd.core));
      k.parent.push_back(nd.parent);
      k.node_members.push_back(nd.members);
    }
    for (std::size_t e = 0; e < g.residuals.size(); ++e) {
      k.residuals.push_back(convert(g.residuals[e]));
      std::vector<std::uint32_t> p;
      for (int n = g.leaf[e]; n >= 0; n = g.nodes[static_cast<std::size_t>(n)].parent) p.push_back(static_cast<std::uint32_t>(n));
      std::reverse(p.begin(), p.end());
      k.path.push_back(std::move(p));
      std::vector<std::uint8_t> rep(g.grid.blocks(), 0);
      for (const auto& b : k.residuals.back().blocks)
        if (b.kind == compress::block_kind::raw) rep[b.index] = 1;
      k.replaces.push_back(std::move(rep));
    }
    for (auto& m : k.cores) m.pool();
    for (auto& m : k.residuals) m.pool();
    k.pool_bases();
    return k;
  }
};

/// How activations meet the codes.
enum class Activations : std::uint8_t {
  f32,   ///< codes dequantized to f32 in registers, f32 products: W_e x up to f32 summation order
         ///< (at one or two tokens, byte codes scale their partial sums by 2^24, and nibble codes
         ///< by 2^28 on targets without AVX-512: activations below 2^92 in magnitude, where no
         ///< such sum of a group of 32 overflows)
  int8,  ///< x quantized per group of columns to int8 (Q8Acts), integer dot products of codes and
         ///< x (VNNI where present), one f32 scale per group: faster; error also includes the
         ///< activation rounding, |dy_i| <= sum_j |w_ij| sx_g(j) / 2 (q8_gemv_nt). For one or two
         ///< tokens, a low-rank block's 2- to 4-bit left factor (groups of a multiple of 32) also
         ///< meets its coefficients t = right x as int8 (q8_gemv_nn): |dy_i| <= sigma_g / 2
         ///< sum_k |code_ki| more, sigma_g = max_k |t_k s_kg| / 127. Blocks read at a tier below
         ///< their stored bits, raw blocks, other left factors and row-major blocks whose groups
         ///< q8_gemv_nt has no vector body for (kernels::q8_gemv_nt_vectorized: e.g. byte
         ///< groups of 48 or 96 with AVX-512) use the f32 path.
};

/// What apply() reads: a tier of the stored codes (0: as stored) and the activation path.
/// Converts from a bare tier, so apply(..., 3) still means "tier 3, f32 activations".
struct Precision {
  unsigned tier = 0;
  Activations act = Activations::f32;
  /// With int8 activations, calls of one or two tokens may run low-rank left factors as int8 too
  /// (q8_gemv_nn, see Activations::int8). grouped_apply and swiglu_apply clear it for the cores
  /// of batches of 3+ tokens, so a core block added over a node's tokens and subtracted per
  /// expert (where a residual replaces it) takes the same path both times.
  bool int8_left = true;
  Precision() = default;
  Precision(unsigned t, Activations a = Activations::f32) : tier(t), act(a) {}  // NOLINT: implicit
};

/// Rows of a dense block decoded per panel on the batched path.
inline constexpr std::size_t kPanelRows = 16;
/// Below this many tokens a low-rank block's left factor runs fused (q_gemm_nn: codes decoded in
/// registers, once per 8 tokens); from it on, decoded once into scratch for gemm_nn, whose
/// plain f32 tiles are faster once the decode is spread over that many tokens (measured: equal
/// at 32 on AVX-512, fused 2x faster at 8).
inline constexpr std::size_t kFusedLeftMax = 32;

namespace detail {

/// The left factor [rank, rb] of a low-rank or shared block (its first b.rank rows).
inline kernels::QView left_view(const KGroup& g, const KBlock& b) noexcept {
  return b.kind == compress::block_kind::lowrank ? b.a.view() : g.bases[b.basis].view();
}

/// int8 activations of one apply call's tokens, quantized once per grid column and code container
/// (nibble / byte; only those the group's blocks there use) when the cache is made, then shared
/// (read-only, so by every worker too) by all blocks of that column.
struct Q8Cache {
  const float* X = nullptr;  ///< the call's activations, before the column offset
  std::size_t ldx = 0, n = 0, gcols = 0, block_cols = 0, cols = 0, group = 32;
  std::uint8_t** slot = nullptr;  ///< [gcols * 2]: the buffer
  std::uint8_t** tiles = nullptr; ///< [gcols]: the nibble activations' tokens-in-lanes tiles (or null)

  static kernels::QView layout(std::size_t cols, std::size_t group, bool nibble) {
    kernels::QView v;
    v.cols = static_cast<std::uint32_t>(cols), v.nibble = nibble;
    v.group = static_cast<std::uint32_t>(kernels::QView::kernel_group(cols, group, nibble));  // as KMat::from
    return v;
  }
  static std::size_t bytes(const compress::GridShape& grid, std::size_t group, std::size_t n) {
    std::size_t b = Arena::bytes_for<std::uint8_t*>(grid.grid_cols() * 3) + Arena::bytes_for<std::uint8_t>(grid.grid_cols());
    for (std::size_t j = 0; j < grid.grid_cols(); ++j) {
      const std::size_t cb = std::min(grid.block_cols, grid.cols - j * grid.block_cols);
      for (bool nib : {false, true}) b += Arena::bytes_for<std::uint8_t>(n * kernels::Q8Acts::bytes(layout(cb, group, nib)));
      if (group % 2 == 0) b += Arena::bytes_for<std::uint8_t>(kernels::q8_tiles_bytes(layout(cb, group, true), n));
    }
    return b;
  }
  /// For every block of g (the containers g.x_containers lists).
  Q8Cache(const KGroup& g, const float* x, std::size_t ld, std::size_t nt, Arena& a) : Q8Cache(g, x, ld, nt, a, g.x_containers.data(), g.x_containers.size()) {}
  /// Only for the blocks of `mats` (matrices of g; with unshared_only, not their shared-basis
  /// blocks, which grouped calls apply in coefficient space): the containers their codes meet x
  /// in. A call that runs one expert's residual, or one node's cores, then skips the other's (the
  /// tinymoe experts: bytes for the 5-bit cores, nibbles for the residuals' 3-bit factors).
  Q8Cache(const KGroup& g, std::initializer_list<const KMatrix*> mats, const float* x, std::size_t ld, std::size_t nt, Arena& a,
          bool unshared_only = false)
      : Q8Cache(g, x, ld, nt, a, containers(g, mats, a, unshared_only), g.grid.grid_cols()) {}
  /// Per grid column, the containers the blocks of mats meet x in (bit 0: bytes, bit 1: nibbles).
  static std::uint8_t* containers(const KGroup& g, std::initializer_list<const KMatrix*> mats, Arena& a, bool unshared_only) {
    auto* c = a.take<std::uint8_t>(g.grid.grid_cols());
    std::fill_n(c, g.grid.grid_cols(), std::uint8_t{0});
    for (const KMatrix* m : mats)
      if (m)
        for (const KBlock& b : m->blocks)
          if (!(unshared_only && b.kind == compress::block_kind::shared)) c[b.c0 / g.grid.block_cols] |= b.x_container();
    return c;
  }
  Q8Cache(const KGroup& g, const float* x, std::size_t ld, std::size_t nt, Arena& a, const std::uint8_t* xc, std::size_t nxc)
      : X(x), ldx(ld), n(nt), gcols(g.grid.grid_cols()), block_cols(g.grid.block_cols), cols(g.grid.cols), group(g.group_size) {
    slot = a.take<std::uint8_t*>(gcols * 2);
    tiles = a.take<std::uint8_t*>(gcols);
    for (std::size_t j = 0; j < gcols; ++j) {
      tiles[j] = nullptr;
      for (int nib = 0; nib < 2; ++nib) {
        const auto q = layout(width(j), group, nib != 0 && group % 2 == 0);
        std::uint8_t*& buf = slot[j * 2 + static_cast<std::size_t>(nib)];
        buf = nullptr;  // get() then returns null: apply_q8 quantizes for that block itself
        if (j < nxc && !(xc[j] >> nib & 1)) continue;
        buf = a.take<std::uint8_t>(n * kernels::Q8Acts::bytes(q));
        kernels::q8_quantize(q, X + j * block_cols, ldx, n, buf);
        // every block of this grid column meets the same tiles: built once here, not per block
        if (const std::size_t tb = q.nibble ? kernels::q8_tiles_bytes(q, n) : 0) {
          tiles[j] = a.take<std::uint8_t>(tb);
          kernels::q8_tiles(q, buf, n, tiles[j]);
        }
      }
    }
  }
  std::size_t width(std::size_t j) const { return std::min(block_cols, cols - j * block_cols); }
  /// The activations of the block at column offset c0 in q's layout, or null if q does not fit
  /// the cache's layout (another group size or width).
  const std::uint8_t* get(const kernels::QView& q, std::size_t c0) const {
    const std::size_t j = c0 / block_cols;
    if (c0 % block_cols || j >= gcols || q.cols != width(j) || q.group != kernels::QView::kernel_group(q.cols, group, q.nibble))
      return nullptr;
    return slot[j * 2 + (q.nibble ? 1 : 0)];
  }
  /// The tiles of get(q, c0)'s activations (null: none; q8_gemv_nt then builds its own).
  const std::uint8_t* tiles_for(const kernels::QView& q, std::size_t c0) const {
    return q.nibble && get(q, c0) ? tiles[c0 / block_cols] : nullptr;
  }
};

/// Y[t, :nr] += alpha * q X[t, :] through int8 activations (from the cache if it has them), if
/// prec asks for them, q is read at its stored bits and q8_gemv_nt's vector body takes its groups;
/// false (nothing done) otherwise.
inline bool apply_q8(const kernels::QView& q, std::size_t nr, const float* X, std::size_t ldx, std::size_t n, float* Y,
                     std::size_t ldy, float alpha, const Precision& prec, Arena& arena, const Q8Cache* cache, std::size_t c0) {
  if (prec.act != Activations::int8 || (prec.tier != 0 && prec.tier < q.bits)) return false;
  if (!kernels::q8_gemv_nt_vectorized(q)) return false;  // its scalar path: f32 activations are ~10x faster
  const std::size_t mark = arena.mark();
  const std::uint8_t* acts = cache ? cache->get(q, c0) : nullptr;
  const std::uint8_t* tiles = cache ? cache->tiles_for(q, c0) : nullptr;
  if (!acts) {
    auto* buf = arena.take<std::uint8_t>(n * kernels::Q8Acts::bytes(q));
    kernels::q8_quantize(q, X, ldx, n, buf);
    acts = buf;
  }
  kernels::q8_gemv_nt_tiles(q, 0, nr, acts, tiles, n, alpha, Y, ldy);
  arena.reset(mark);
  return true;
}

/// Whether a left factor meets its coefficients as int8 (q8_gemv_nn) at this precision: int8
/// activations, stored bits, and a layout its vector body covers whole on this target (2- to
/// 4-bit codes in the row-major nibble container, groups of a multiple of 32 columns, a whole
/// number of vectors of them; its scalar path would be slower than f32). apply_block uses it for one
/// or two tokens: q8_gemv_nn rounds each token's coefficients on its own (half of its time at
/// rank 41, bench/RESULTS.md), while q_gemm_nn decodes a code row once for up to 8 tokens.
inline bool q8_left(const kernels::QView& left, Precision prec) {
  return prec.act == Activations::int8 && prec.int8_left && (prec.tier == 0 || prec.tier >= left.bits) &&
         kernels::q8_gemv_nn_vectorized(left);
}

/// Blocks of each matrix whose metadata apply prefetches at its start.
inline constexpr std::size_t kMetaBlocks = 8;

/// Prefetches the metadata of m's first blocks (kinds, shapes, pointers into the pool). A cold
/// call otherwise meets it as a chain of dependent misses (the group's matrices, a matrix's
/// blocks, a block's codes), one matrix after another: a 768 x 256 expert at batch 1 cold took
/// 7.7-8.2 us without, 6.6-7.2 with, in a scratch driver (prefetching the first 0.5-8 KB of each
/// pool as well made it slower again). GCC deleted the library's calls until 2026-12-02 (see
/// kernels::prefetch_lines); since, a real tinymoe w1 apply cold: f32 15.3-16.3 -> 14.3-15.9 us,
/// int8 14.0-15.2 -> 12.9-14.4 (bench/RESULTS.md).
inline void prefetch_meta(const KMatrix& m) noexcept {
  kernels::prefetch_lines(m.blocks.data(), std::min(m.blocks.size(), kMetaBlocks) * sizeof(KBlock));
}

/// prefetch_meta for member e's residual and the cores on its path (where apply starts).
inline void prefetch_meta(const KGroup& g, std::size_t e) noexcept {
  prefetch_meta(g.residuals[e]);
  for (auto nd : g.path[e]) prefetch_meta(g.cores[nd]);
}

/// The page size prefetch_pages seeds by: the hardware prefetchers do not run past the end of a
/// 4 KB page on their own.
inline constexpr std::size_t kSeedPage = 4096;

/// Prefetches the first two 64-byte lines of each 4 KB page of [p, p + bytes) (where the range
/// starts mid-page: its first two). PageSeeder issues it at a call's start for what the call reads
/// first. Issued a stage before the kernels read the range, about two
/// prefetches a page seem to start the hardware prefetchers on every page, which bring in much
/// of the rest while the current stage runs: the real tinymoe layer, cold, one thread, 0.87-0.89x
/// the time at 8 tokens and 0.82-0.88x at one token in a scratch driver (bench/RESULTS.md
/// "Seeding the hardware prefetchers a stage ahead"). Prefetching every line of the next stage
/// (32 times the instructions) stalls the stage that issues them, which then takes as long as
/// with no prefetch. A page's first lines rather than the range's every 4 KB: the same or
/// slightly faster (one token 72-75 against 73-75 us). The empty volatile asm: see
/// kernels::prefetch_lines (GCC would delete calls to a function that only prefetches).
inline void prefetch_pages(const void* p, std::size_t bytes) noexcept {
#if defined(__GNUC__) || defined(__clang__)
  const auto a0 = reinterpret_cast<std::uintptr_t>(p), end = a0 + bytes;
  for (std::uintptr_t a = a0; a < end; a = (a + kSeedPage) & ~std::uintptr_t{kSeedPage - 1}) {
    __builtin_prefetch(reinterpret_cast<const char*>(a));
    if (a + 64 < end) __builtin_prefetch(reinterpret_cast<const char*>(a + 64));
  }
  asm volatile("");
#else
  (void)p, (void)bytes;
#endif
}

/// prefetch_pages over a pooled matrix's coefficients (KMatrix::pool). A matrix whose arrays lie
/// apart gets none (not measured: a group's matrices are pooled by KGroup::from).
inline void prefetch_pages(const KMatrix& m) noexcept {
  if (m.pooled()) prefetch_pages(m.pool_data(), m.pool_bytes());
}

/// prefetch_pages over a group's pooled shared bases (KGroup::pool_bases).
inline void prefetch_bases_pages(const KGroup& g) noexcept {
  if (g.bases_pool_data()) prefetch_pages(g.bases_pool_data(), g.bases_pool_bytes());
}

/// Bytes of coefficients a call seeds with prefetch_pages at its start (PageSeeder): a whole
/// 2048 x 1408 expert (2.4 MB) fits (1024 pages, 2048 prefetches). A larger
/// matrix's first 4 MB are seeded; the rest meets only the kernels' prefetch kPrefetchAhead ahead.
inline constexpr std::size_t kSeedBytes = std::size_t{4} << 20;

/// prefetch_pages over pooled matrices in the order a call reads them, until kSeedBytes are
/// seeded. Issued where the call starts, for the matrices it reads first: each 4 KB page's first
/// lines, so its translation is walked and the hardware prefetchers started while the kernels
/// are still at the start, instead of one page walk and one cold start per page in turn as the
/// kernels reach it (which of the two it is was not measured: no event counters on the VM).
/// One expert applied cold at one token, nine alternating bench runs (bench/RESULTS.md, "Seeding
/// an expert's cores at the call's start"): 2048 x 1408 f32 120-161 -> 104-130 us, int8 124-154
/// -> 95-123; 768 x 256 f32 10.1-13.0 -> 9.3-11.9, int8 10.0-12.4 -> 8.4-10.7; the real tinymoe
/// layer at one token, median 59.7 -> 56.0 us, faster in 9 of 9. Hot it costs 0.15-0.19 us per
/// MB seeded. Until then only the residual was seeded, a stage ahead of its reading.
class PageSeeder {
 public:
  /// Seeds m's first pages within what is left of the budget; returns the bytes seeded.
  std::size_t operator()(const KMatrix& m) noexcept { return m.pooled() ? range(m.pool_data(), m.pool_bytes()) : 0; }
  /// The same for bytes [p, p + bytes) (a weight buffer a merge reads and writes).
  std::size_t range(const void* p, std::size_t bytes) noexcept {
    const std::size_t n = std::min(left_, bytes);
    if (n) prefetch_pages(p, n);
    left_ -= n;
    return n;
  }
  std::size_t left() const noexcept { return left_; }

 private:
  std::size_t left_ = kSeedBytes;
};

/// Tokens below which a low-rank block's factor runs per token: one, or two for a left factor that
/// meets its coefficients as int8 (q8_gemv_nn, see q8_left); two tokens otherwise take the 2-token
/// passes of q_gemm_nt / q_gemm_nn (the real tinymoe layer at 8 tokens, about two per expert:
/// 195-201 -> 184-189 us hot, bench/RESULTS.md), with int8 activations too where a factor takes
/// the f32 kernels (a tier, raw coefficients, groups q8_gemv_nt has no vector body for): the
/// same bits as with f32 activations.
inline std::size_t per_token_below(bool q8_left_factor) noexcept { return q8_left_factor ? 3u : 2u; }

/// t[i, :rank] += alpha * right x_i for i < n: the right factor of a low-rank or shared block b
/// (f32 if b holds it so, a morphed expert's mixed coefficients; else its codes, through int8
/// activations where prec asks for them). x: the block's first column, token stride ldx.
inline void right_coeffs(const KBlock& b, const float* x, std::size_t ldx, std::size_t n, float* t, float alpha, const Precision& prec,
                         Arena& arena, const Q8Cache* q8c) {
  const std::size_t r = b.rank;
  if (!b.raw.empty()) {
    if (n < per_token_below(false))
      for (std::size_t i = 0; i < n; ++i) kernels::gemm_nt(b.raw.data(), b.cb, r, x + i * ldx, ldx, 1, b.cb, alpha, t + i * r, r);
    else kernels::gemm_nt(b.raw.data(), b.cb, r, x, ldx, n, b.cb, alpha, t, r);
    return;
  }
  if (apply_q8(b.b.view(), r, x, ldx, n, t, r, alpha, prec, arena, q8c, b.c0)) return;
  if (n < per_token_below(false)) {
    for (std::size_t i = 0; i < n; ++i) kernels::q_gemv_nt(b.b.view(), 0, r, prec.tier, x + i * ldx, alpha, t + i * r);
  } else if (b.b.lanes) {
    kernels::q_gemm_nt(b.b.view(), 0, r, prec.tier, x, ldx, n, alpha, t, r);
  } else {
    const std::size_t mark = arena.mark();
    float* buf = arena.take<float>(r * b.cb);
    kernels::q_decode_rows(b.b.view(), 0, r, prec.tier, buf, b.cb);
    kernels::gemm_nt(buf, b.cb, r, x, ldx, n, b.cb, alpha, t, r);
    arena.reset(mark);
  }
}

/// Y[i, :left.cols] += left[:r]^T t_i for i < n (t: n rows of r coefficients, stride ldt): codes
/// decoded in registers (per token, or once per pass of up to 8 tokens), or from kFusedLeftMax
/// tokens on decoded once into scratch for gemm_nn.
inline void left_apply(const kernels::QView& left, std::size_t r, const float* t, std::size_t ldt, std::size_t n, float* Y,
                       std::size_t ldy, const Precision& prec, Arena& arena) {
  const bool q8l = q8_left(left, prec);
  if (n < per_token_below(q8l)) {
    for (std::size_t i = 0; i < n; ++i) {
      if (q8l) kernels::q8_gemv_nn(left, 0, r, t + i * ldt, Y + i * ldy);
      else kernels::q_gemv_nn(left, 0, r, prec.tier, t + i * ldt, Y + i * ldy);
    }
  } else if (n < kFusedLeftMax) {
    kernels::q_gemm_nn(left, 0, r, prec.tier, t, ldt, n, Y, ldy);
  } else {
    const std::size_t mark = arena.mark();
    float* buf = arena.take<float>(r * left.cols);
    kernels::q_decode_rows(left, 0, r, prec.tier, buf, left.cols);
    kernels::gemm_nn(t, ldt, n, r, buf, left.cols, left.cols, Y, ldy);
    arena.reset(mark);
  }
}

/// Seeds member e's coefficients in the order apply reads them: the cores on its path, then its
/// residual, within seed's budget (detail::PageSeeder).
inline void seed_member_pages(PageSeeder& seed, const KGroup& g, std::size_t e) noexcept {
  for (auto nd : g.path[e]) seed(g.cores[nd]);
  seed(g.residuals[e]);
}
/// The same with a budget of its own (where a call starts).
inline void seed_member_pages(const KGroup& g, std::size_t e) noexcept {
  PageSeeder seed;
  seed_member_pages(seed, g, e);
}

}  // namespace detail

/// Scratch bytes apply_block / apply_matrix / apply need for a batch of n tokens.
inline std::size_t apply_scratch_bytes(const KGroup& g, std::size_t n) {
  const std::size_t wide = std::max(g.grid.block_rows, g.grid.block_cols);
  // int8 activations of n tokens over one block's columns: Q8Acts::bytes <= 8 * padded(columns).
  const std::size_t q8 = Arena::bytes_for<std::uint8_t>(n * 8 * kernels::Q8Acts::padded(g.grid.block_cols)) +
                         detail::Q8Cache::bytes(g.grid, g.group_size, n);
  return Arena::bytes_for<float>(n * g.max_rank) + Arena::bytes_for<float>(std::max<std::size_t>(kPanelRows, g.max_rank) * wide) + q8;
}

/// Y[t, r0:r0+rb] += alpha * B X[t, c0:c0+cb] for t < n (X, Y: token-major with strides ldx, ldy).
inline void apply_block(const KGroup& g, const KBlock& b, const float* X, std::size_t ldx, std::size_t n, float* Y,
                        std::size_t ldy, float alpha, Precision prec, Arena& arena, const detail::Q8Cache* q8c = nullptr) {
  if (n == 0) return;
  const unsigned tier = prec.tier;
  const float* x = X + b.c0;
  float* y = Y + b.r0;
  const std::size_t mark = arena.mark();
  switch (b.kind) {
    case compress::block_kind::zero: return;
    case compress::block_kind::raw:
      kernels::gemm_nt(b.raw.data(), b.cb, b.rb, x, ldx, n, b.cb, alpha, y, ldy);
      return;
    case compress::block_kind::dense: {
      const auto q = b.a.view();
      if (detail::apply_q8(q, b.rb, x, ldx, n, y, ldy, alpha, prec, arena, q8c, b.c0)) return;
      // codes decoded in registers: per token below 3 tokens; rows in lanes, once per pass of up
      // to 8 tokens at any batch (2.4x faster than decoding panels for gemm_nt at 32 and 64
      // tokens, bench/RESULTS.md)
      if (n < 3 || q.lanes) return kernels::q_gemm_nt(q, 0, b.rb, tier, x, ldx, n, alpha, y, ldy);
      float* panel = arena.take<float>(kPanelRows * b.cb);
      for (std::size_t i = 0; i < b.rb; i += kPanelRows) {
        const std::size_t p = std::min<std::size_t>(kPanelRows, b.rb - i);
        kernels::q_decode_rows(q, i, p, tier, panel, b.cb);
        kernels::gemm_nt(panel, b.cb, p, x, ldx, n, b.cb, alpha, y + i, ldy);
      }
      arena.reset(mark);
      return;
    }
    case compress::block_kind::lowrank:
    case compress::block_kind::shared: {
      float* t = arena.take_zeroed<float>(n * b.rank);
      detail::right_coeffs(b, x, ldx, n, t, alpha, prec, arena, q8c);  // t = alpha right x
      detail::left_apply(detail::left_view(g, b), b.rank, t, b.rank, n, y, ldy, prec, arena);
      arena.reset(mark);
      return;
    }
  }
}

/// Applies every block of m (skipping grid blocks where skip[index] != 0, if skip is given).
inline void apply_matrix(const KGroup& g, const KMatrix& m, const float* X, std::size_t ldx, std::size_t n, float* Y, std::size_t ldy,
                         float alpha, Precision prec, Arena& arena, const std::uint8_t* skip = nullptr,
                         const detail::Q8Cache* q8c = nullptr) {
  for (const auto& b : m.blocks)
    if (!skip || !skip[b.index]) apply_block(g, b, X, ldx, n, Y, ldy, alpha, prec, arena, q8c);
}

inline void check_tier(Precision prec) {
  const unsigned tier = prec.tier;
  if (prec.act != Activations::f32 && prec.act != Activations::int8) throw invalid_argument("morph: unknown activation path");
  if (tier != 0 && !compress::valid_bits(tier)) throw invalid_argument("morph: tier must be 0 (as stored) or 2 to 8, got " + std::to_string(tier));
}

/// Y[t, :] += alpha * W_e X[t, :] for t < n: member e's cores and residual, from the coefficients.
inline void apply(const KGroup& g, std::size_t e, const float* X, std::size_t ldx, std::size_t n, float* Y, std::size_t ldy,
                  Arena& arena, float alpha = 1.0f, Precision prec = {}) {
  if (e >= g.members()) throw invalid_argument("morph::apply: member " + std::to_string(e) + " out of range");
  check_tier(prec);
  detail::prefetch_meta(g, e);  // the misses overlap each other and the activations' quantization
  detail::seed_member_pages(g, e);
  const std::size_t mark = arena.mark();
  std::optional<detail::Q8Cache> q8c;
  if (prec.act == Activations::int8 && n > 0) q8c.emplace(g, X, ldx, n, arena);
  const detail::Q8Cache* c = q8c ? &*q8c : nullptr;
  for (auto nd : g.path[e]) apply_matrix(g, g.cores[nd], X, ldx, n, Y, ldy, alpha, prec, arena, g.replaces[e].data(), c);
  apply_matrix(g, g.residuals[e], X, ldx, n, Y, ldy, alpha, prec, arena, nullptr, c);
  arena.reset(mark);
}

}  // namespace s2lc::morph
