// s2lc::compress — the S2LC compressor: HED cores, then per block spectral energy thresholding,
// shared bases, bit-nested quantization, and a rate-distortion allocator.
//
// Every block of every core and residual (a "unit") gets a ladder of candidate encodings with
// their exact byte cost and their (estimated) squared error: drop it; quantize it densely at
// 2 to 8 bits; keep its leading r singular triplets (r = 1..) with factors at 2 to 8 bits; keep
// the leading r coefficients on the basis its core node shares; keep it raw. Errors are measured
// in the metric the user asks for: ||W - W^||_F, or with calibration activations X the output
// error ||(W - W^) X||_F, which is the Frobenius error after whitening by the activation
// covariance H = X X^T / N (B -> B L with L L^T = H; the SVD of B L gives the optimal rank-r
// subspace for that metric). Core errors count once per member sharing the core.
//
// Allocation: each unit's candidates are reduced to their lower convex hull in (bytes, error);
// a greedy walk over the hull segments of all units of all groups, steepest error decrease per
// byte first, spends the byte budget (--ratio) or stops at the error target (--max-error);
// --energy keeps, per block, the cheapest candidate that retains the requested energy fraction
// (the spectral energy threshold), dropping blocks under the energy floor. Errors are
// normalised by each group's reference energy so that groups of different scale compete fairly.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <map>
#include <mutex>
#include <numeric>
#include <queue>
#include <string>
#include <thread>
#include <vector>

#include <xtensor-blas/xlinalg.hpp>
#include <xtensor/xtensor.hpp>
#include <xtensor/xview.hpp>

#include "s2lc/compress/hed.hpp"
#include "s2lc/compress/model.hpp"
#include "s2lc/compress/quant.hpp"
#include "s2lc/error.hpp"
#include "s2lc/linalg/svd.hpp"
#include "s2lc/tensor.hpp"

namespace s2lc::compress {

/// One group handed to the compressor.
struct GroupInput {
  std::string name;
  std::vector<std::string> member_names;
  std::vector<std::uint32_t> member_sources;
  dtype type = dtype::f32;
  std::vector<matrix> weights;      ///< [rows, cols] each, f32
  /// Input covariances H = X^T X / N ([cols, cols]): none (plain Frobenius error), one shared by
  /// all members, or one per member.
  std::vector<matrix> covariance;
};

enum class target_mode { ratio, energy, max_error };

/// How the allocator weighs errors of different places: `group` minimises the sum over groups of
/// the relative squared error of the group (MSE-optimal inside a group); `block` minimises the
/// sum of every block's relative squared error, which spreads precision evenly (quantization
/// noise spread evenly costs language-model quality less than the same error concentrated).
enum class balance_mode { group, block };

struct Options {
  target_mode mode = target_mode::ratio;
  double ratio = 8.0;        ///< ratio mode: original bytes of all groups / compressed bytes
  double energy = 0.99;      ///< energy mode: fraction of each block's energy to retain
  double energy_floor = 1e-3;///< energy mode: blocks under this fraction of the mean block energy of their owner are dropped
  double max_error = 0.05;   ///< max-error mode: target relative error (rms over groups)
  unsigned bits = 0;         ///< 0: the allocator picks per block; 8 or 4: every payload at that width
  std::size_t block_rows = 256, block_cols = 256;
  std::size_t group = 32;    ///< quantization group (values per scale)
  /// Weight of truncation error (dropped blocks, discarded singular directions) against
  /// quantization noise of the same energy. Measured on tinymoe: removing structure costs far
  /// more bits-per-byte than spreading noise (int3 noise at 5 % of the energy costs +0.01 % bpb,
  /// dropping a 3 % expert residual +2.3 %), so the allocator truncates only when it must.
  double truncation_penalty = 10.0;
  bool clip_search = false;  ///< search clipped scales per group (see QuantOptions::search_scale)
  HedOptions hed;
  balance_mode balance = balance_mode::group;
  bool shared_basis = true;
  bool allow_raw = true;
  double damping = 0.01;     ///< covariance damping, as a fraction of its mean diagonal
  unsigned threads = 0;      ///< 0: hardware concurrency
  std::function<void(const std::string& stage, std::size_t done, std::size_t total)> progress;
};

namespace detail {

struct Candidate {
  block_kind kind = block_kind::zero;
  std::uint8_t bits = 0;
  std::uint32_t rank = 0;
  double bytes = 0;  ///< estimated stored bytes (exact except the shared basis share)
  double err = 0;    ///< estimated squared error, in the group's metric, truncation penalised
  double plain_err = -1;  ///< the same without the truncation penalty (-1: equal to err)
  double energy_err() const noexcept { return plain_err >= 0 ? plain_err : err; }
};

/// Whitening of one column block: L with L L^T = H_JJ (or identity).
struct Whitening {
  bool identity = true;
  matrix L;  ///< [cb, cb]
};

struct Unit {
  std::size_t group = 0;
  int node = -1;          ///< >= 0: a core node's block; -1: a member residual block
  std::uint32_t member = 0;
  std::size_t block = 0;
  double weight = 1;      ///< normalisation of errors (1 / reference energy of the group)
  double energy = 0;      ///< ||B L||^2, the error of dropping the block
  std::vector<Candidate> candidates;  ///< lower convex hull, bytes ascending
  std::size_t chosen = 0;
  // Cached factorization of B L (truncated to the ranks the ladder can use): U [rb, k], S [k].
  matrix U;
  vector S;
  int basis_slot = -1;    ///< index of the shared basis this unit may use
};

struct SharedBasisWork {
  std::size_t group = 0;
  std::uint32_t node = 0;
  std::size_t block = 0;
  matrix U;  ///< [rb, k] orthonormal, by decreasing shared energy
  std::size_t members = 1;
};

template <typename F>
void parallel_for(std::size_t n, unsigned threads, F&& f) {
  if (threads == 0) threads = std::max(1u, std::thread::hardware_concurrency());
  threads = static_cast<unsigned>(std::min<std::size_t>(threads, n));
  if (threads <= 1) {
    for (std::size_t i = 0; i < n; ++i) f(i);
    return;
  }
  std::atomic<std::size_t> next{0};
  std::exception_ptr failure;
  std::atomic<bool> failed{false};
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < threads; ++t)
    pool.emplace_back([&] {
      for (std::size_t i; !failed && (i = next.fetch_add(1)) < n;) {
        try {
          f(i);
        } catch (...) {
          if (!failed.exchange(true)) failure = std::current_exception();
        }
      }
    });
  for (auto& t : pool) t.join();
  if (failure) std::rethrow_exception(failure);
}

inline matrix block_of(const matrix& m, const GridShape& g, std::size_t b) {
  return xt::view(m, xt::range(g.r0(b), g.r0(b) + g.rb(b)), xt::range(g.c0(b), g.c0(b) + g.cb(b)));
}

inline double sq_norm_times(const matrix& d, const Whitening& w) {
  if (w.identity) return sq_norm(d);
  return sq_norm(matrix(xt::linalg::dot(d, w.L)));
}

/// Per-row squared errors ||(Q(x) - x)_k L||^2 of quantizing x [k, c] at `bits`.
inline std::vector<double> row_quant_errors(const matrix& x, unsigned bits, std::size_t group, bool clip, const Whitening& w) {
  const std::size_t k = x.shape()[0], c = x.shape()[1];
  const QMatrix q = quantize(x.data(), k, c, {bits, group, clip});
  matrix d = matrix::from_shape({k, c});
  const auto deq = dequantize(q);
  for (std::size_t i = 0; i < d.size(); ++i) d.data()[i] = deq[i] - x.data()[i];
  if (!w.identity) d = xt::linalg::dot(d, w.L);
  std::vector<double> out(k, 0.0);
  for (std::size_t i = 0; i < k; ++i)
    for (std::size_t j = 0; j < c; ++j) out[i] += static_cast<double>(d(i, j)) * d(i, j);
  return out;
}

/// Keeps the lower convex hull of (bytes, err), bytes ascending, err strictly descending.
inline std::vector<Candidate> convex_hull(std::vector<Candidate> c) {
  std::sort(c.begin(), c.end(), [](const Candidate& a, const Candidate& b) {
    return a.bytes != b.bytes ? a.bytes < b.bytes : a.err < b.err;
  });
  std::vector<Candidate> mono;
  for (const auto& x : c)
    if (mono.empty() || x.err < mono.back().err) mono.push_back(x);
  std::vector<Candidate> hull;
  for (const auto& x : mono) {
    while (hull.size() >= 2) {
      const auto& a = hull[hull.size() - 2];
      const auto& b = hull.back();
      // Drop b when it lies on or above the segment a -> x.
      const double lhs = (b.err - a.err) * (x.bytes - a.bytes);
      const double rhs = (x.err - a.err) * (b.bytes - a.bytes);
      if (lhs >= rhs) hull.pop_back();
      else break;
    }
    hull.push_back(x);
  }
  return hull;
}

}  // namespace detail

/// The compressor, in two steps: analyse() (decomposition and candidates), then finish() with
/// the bytes the container adds beyond payloads (manifest, block maps, alignment) so that the
/// ratio is met on the whole artifact; finish() may be called again with a corrected overhead.
class Compressor {
 public:
  using Candidate = detail::Candidate;
  using Unit = detail::Unit;
  using Whitening = detail::Whitening;
  using SharedBasisWork = detail::SharedBasisWork;

  Compressor(const std::vector<GroupInput>& in, const Options& opt) : in_(in), opt_(opt) {}

  /// Decomposition and every unit's candidates: the expensive part, done once.
  void analyse() {
    validate();
    decompose_all();
    build_units();
  }

  /// Allocation and encoding; cheap, so callers may repeat it with the container overhead they
  /// measured on the previous result.
  Compressed finish(std::size_t overhead_bytes) {
    overhead_ = overhead_bytes;
    allocate();
    return encode();
  }

 private:
  const std::vector<GroupInput>& in_;
  const Options& opt_;
  std::vector<Hed> hed_;
  std::vector<GridShape> grid_;
  std::vector<std::vector<std::vector<Whitening>>> white_;  // [group][owner][col block]; owner: member, or node after members
  std::vector<double> reference_;
  std::vector<Unit> units_;
  std::vector<SharedBasisWork> bases_;
  std::size_t overhead_ = 0;

  void progress(const std::string& stage, std::size_t done, std::size_t total) const {
    if (opt_.progress) opt_.progress(stage, done, total);
  }

  std::vector<unsigned> dense_bits() const {
    if (opt_.bits) return {opt_.bits};
    return {2, 3, 4, 5, 6, 8};
  }
  std::vector<unsigned> factor_bits() const {
    if (opt_.bits) return {opt_.bits};
    return {2, 3, 4, 6, 8};
  }

  void validate() const {
    if (in_.empty()) throw invalid_argument("compress: no groups");
    if (opt_.bits && !valid_bits(opt_.bits)) throw invalid_argument("compress: bits must be 8 or 4 (or 0 for automatic)");
    if (opt_.block_rows == 0 || opt_.block_cols == 0) throw invalid_argument("compress: block size must be positive");
    if (opt_.group == 0) throw invalid_argument("compress: quantization group must be positive");
    if (opt_.mode == target_mode::ratio && !(opt_.ratio >= 1.0)) throw invalid_argument("compress: ratio must be >= 1");
    if (opt_.mode == target_mode::energy && !(opt_.energy >= 0.0 && opt_.energy <= 1.0))
      throw invalid_argument("compress: energy must be in [0, 1]");
    if (opt_.mode == target_mode::max_error && !(opt_.max_error >= 0.0)) throw invalid_argument("compress: max error must be >= 0");
    for (const auto& g : in_) {
      if (g.weights.empty()) throw invalid_argument("compress: group '" + g.name + "' has no members");
      if (g.member_names.size() != g.weights.size()) throw invalid_argument("compress: group '" + g.name + "': names and weights differ in count");
      const auto shape = g.weights[0].shape();
      for (std::size_t e = 0; e < g.weights.size(); ++e) {
        if (g.weights[e].shape() != shape) throw invalid_argument("compress: group '" + g.name + "': member '" + g.member_names[e] + "' differs in shape");
        for (float v : g.weights[e])
          if (!std::isfinite(v)) throw invalid_argument("compress: tensor '" + g.member_names[e] + "' holds a non-finite value");
      }
      if (!(g.covariance.empty() || g.covariance.size() == 1 || g.covariance.size() == g.weights.size()))
        throw invalid_argument("compress: group '" + g.name + "': need 0, 1 or one covariance per member");
      for (const auto& h : g.covariance)
        if (h.shape()[0] != shape[1] || h.shape()[1] != shape[1])
          throw invalid_argument("compress: group '" + g.name + "': covariance must be [cols, cols]");
    }
  }

  void decompose_all() {
    hed_.resize(in_.size());
    grid_.resize(in_.size());
    detail::parallel_for(in_.size(), opt_.threads, [&](std::size_t gi) {
      HedOptions h = opt_.hed;
      h.seed += gi;
      hed_[gi] = decompose(in_[gi].weights, h);
    });
    for (std::size_t gi = 0; gi < in_.size(); ++gi) {
      const auto& w = in_[gi].weights[0];
      grid_[gi] = GridShape{w.shape()[0], w.shape()[1], std::min(opt_.block_rows, w.shape()[0]), std::min(opt_.block_cols, w.shape()[1])};
    }
    progress("decompose", in_.size(), in_.size());
  }

  /// Whitening per owner (members first, then nodes) and column block; reference energies.
  void prepare_metric(std::size_t gi) {
    const auto& g = in_[gi];
    const auto& grid = grid_[gi];
    const std::size_t E = g.weights.size(), N = hed_[gi].nodes.size();
    auto& W = white_[gi];
    W.assign(E + N, std::vector<Whitening>(grid.grid_cols()));
    double ref = 0;
    if (g.covariance.empty()) {
      for (const auto& w : g.weights) ref += detail::sq_norm(w);
      // Core errors count once per member.
      for (std::size_t n = 0; n < N; ++n) {
        const double s = std::sqrt(static_cast<double>(hed_[gi].nodes[n].members.size()));
        for (std::size_t j = 0; j < grid.grid_cols(); ++j) {
          const std::size_t cb = std::min(grid.block_cols, grid.cols - j * grid.block_cols);
          W[E + n][j].identity = false;
          W[E + n][j].L = xt::eye<float>(cb) * static_cast<float>(s);
        }
      }
      reference_[gi] = ref;
      return;
    }
    auto cov_of = [&](std::size_t e) -> const matrix& { return g.covariance.size() == 1 ? g.covariance[0] : g.covariance[e]; };
    for (std::size_t e = 0; e < E; ++e) {
      const matrix wx = xt::linalg::dot(g.weights[e], cov_of(e));
      double r = 0;
      for (std::size_t i = 0; i < wx.size(); ++i) r += static_cast<double>(wx.data()[i]) * g.weights[e].data()[i];
      ref += r;
    }
    reference_[gi] = ref;
    auto whiten = [&](const matrix& H, std::size_t j) {
      const std::size_t c0 = j * grid.block_cols, cb = std::min(grid.block_cols, grid.cols - c0);
      matrix Hj = xt::view(H, xt::range(c0, c0 + cb), xt::range(c0, c0 + cb));
      double mean_diag = 0;
      for (std::size_t i = 0; i < cb; ++i) mean_diag += Hj(i, i);
      mean_diag /= static_cast<double>(cb);
      const float damp = static_cast<float>(std::max(opt_.damping * mean_diag, 1e-12));
      for (std::size_t i = 0; i < cb; ++i) Hj(i, i) += damp;
      auto [lam, Q] = xt::linalg::eigh(Hj);
      Whitening w;
      w.identity = false;
      w.L = matrix(Q);
      for (std::size_t i = 0; i < cb; ++i) xt::view(w.L, xt::all(), i) *= std::sqrt(std::max(static_cast<float>(lam(i)), damp));
      return w;
    };
    for (std::size_t e = 0; e < E; ++e)
      if (g.covariance.size() > 1 || e == 0)
        for (std::size_t j = 0; j < grid.grid_cols(); ++j) W[e][j] = whiten(cov_of(e), j);
      else
        W[e] = W[0];
    for (std::size_t n = 0; n < N; ++n) {
      const auto& members = hed_[gi].nodes[n].members;
      matrix H = xt::zeros<float>({grid.cols, grid.cols});
      for (auto e : members) H += cov_of(e);
      for (std::size_t j = 0; j < grid.grid_cols(); ++j) W[E + n][j] = whiten(H, j);
    }
  }

  const Whitening& whitening(const Unit& u) const {
    const std::size_t E = in_[u.group].weights.size();
    const std::size_t owner = u.node >= 0 ? E + static_cast<std::size_t>(u.node) : u.member;
    return white_[u.group][owner][u.block % grid_[u.group].grid_cols()];
  }

  matrix unit_block(const Unit& u) const {
    const auto& h = hed_[u.group];
    const matrix& m = u.node >= 0 ? h.nodes[static_cast<std::size_t>(u.node)].core : h.residuals[u.member];
    return detail::block_of(m, grid_[u.group], u.block);
  }

  void build_units() {
    white_.resize(in_.size());
    reference_.assign(in_.size(), 0.0);
    for (std::size_t gi = 0; gi < in_.size(); ++gi) prepare_metric(gi);
    for (std::size_t gi = 0; gi < in_.size(); ++gi) {
      const auto& h = hed_[gi];
      const double weight = reference_[gi] > 0 ? 1.0 / reference_[gi] : 1.0;
      for (std::size_t n = 0; n < h.nodes.size(); ++n)
        for (std::size_t b = 0; b < grid_[gi].blocks(); ++b) {
          Unit u;
          u.group = gi, u.node = static_cast<int>(n), u.block = b, u.weight = weight;
          units_.push_back(std::move(u));
        }
      for (std::uint32_t e = 0; e < in_[gi].weights.size(); ++e)
        for (std::size_t b = 0; b < grid_[gi].blocks(); ++b) {
          Unit u;
          u.group = gi, u.member = e, u.block = b, u.weight = weight;
          units_.push_back(std::move(u));
        }
    }
    if (opt_.balance == balance_mode::block) block_weights();
    if (opt_.shared_basis) build_bases();
    std::atomic<std::size_t> done{0};
    detail::parallel_for(units_.size(), opt_.threads, [&](std::size_t i) {
      make_candidates(units_[i]);
      const std::size_t d = ++done;
      if (d % 16 == 0 || d == units_.size()) progress("analyse", d, units_.size());
    });
  }

  /// Errors relative to the energy of the original weights each unit stands for: ||W_e[b] L||^2
  /// for a residual block, the sum over the node's members for a core block.
  void block_weights() {
    std::map<std::pair<std::size_t, std::size_t>, std::vector<double>> energy;  // (group, block) -> per member
    std::mutex lock;
    std::vector<std::pair<std::size_t, std::size_t>> keys;
    for (std::size_t gi = 0; gi < in_.size(); ++gi)
      for (std::size_t b = 0; b < grid_[gi].blocks(); ++b) keys.emplace_back(gi, b);
    for (const auto& k : keys) energy[k].assign(in_[k.first].weights.size(), 0.0);
    detail::parallel_for(keys.size(), opt_.threads, [&](std::size_t i) {
      const auto [gi, b] = keys[i];
      std::vector<double> out(in_[gi].weights.size());
      for (std::uint32_t e = 0; e < out.size(); ++e) {
        Unit probe;
        probe.group = gi, probe.member = e, probe.block = b;
        out[e] = detail::sq_norm_times(detail::block_of(in_[gi].weights[e], grid_[gi], b), whitening(probe));
      }
      std::lock_guard<std::mutex> g(lock);
      energy[keys[i]] = std::move(out);
    });
    for (auto& u : units_) {
      const auto& en = energy[{u.group, u.block}];
      double ref = 0;
      if (u.node >= 0) {
        for (auto e : hed_[u.group].nodes[static_cast<std::size_t>(u.node)].members) ref += en[e];
      } else {
        ref = en[u.member];
      }
      u.weight = ref > 0 ? 1.0 / ref : 1.0;
    }
  }

  /// Shared bases: per core node with >= 2 members and block position, the leading
  /// eigenvectors of sum_e B_e H_e B_e^T over the node's members' residual blocks.
  void build_bases() {
    for (std::size_t gi = 0; gi < in_.size(); ++gi) {
      const auto& h = hed_[gi];
      // The deepest node owning each member's residual: its leaf.
      for (std::size_t n = 0; n < h.nodes.size(); ++n) {
        std::vector<std::uint32_t> leaves;
        for (auto e : h.nodes[n].members)
          if (h.leaf[e] == static_cast<int>(n)) leaves.push_back(e);
        if (leaves.size() < 2) continue;
        for (std::size_t b = 0; b < grid_[gi].blocks(); ++b) {
          SharedBasisWork w;
          w.group = gi, w.node = static_cast<std::uint32_t>(n), w.block = b, w.members = leaves.size();
          bases_.push_back(std::move(w));
        }
      }
    }
    detail::parallel_for(bases_.size(), opt_.threads, [&](std::size_t i) {
      auto& w = bases_[i];
      const auto& h = hed_[w.group];
      const auto& grid = grid_[w.group];
      const std::size_t rb = grid.rb(w.block);
      matrix G = xt::zeros<float>({rb, rb});
      for (auto e : h.nodes[w.node].members) {
        if (h.leaf[e] != static_cast<int>(w.node)) continue;
        Unit probe;
        probe.group = w.group, probe.member = e, probe.block = w.block;
        matrix BL = unit_block(probe);
        const auto& wh = whitening(probe);
        if (!wh.identity) BL = xt::linalg::dot(BL, wh.L);
        G += xt::linalg::dot(BL, xt::transpose(BL));
      }
      auto [lam, Q] = xt::linalg::eigh(G);  // ascending
      const std::size_t k = std::min(rb, grid.cb(w.block));
      w.U = matrix::from_shape({rb, k});
      for (std::size_t j = 0; j < k; ++j) xt::view(w.U, xt::all(), j) = xt::view(Q, xt::all(), rb - 1 - j);
    });
    for (auto& u : units_) {
      if (u.node >= 0) continue;
      const int leaf = hed_[u.group].leaf[u.member];
      for (std::size_t i = 0; i < bases_.size(); ++i)
        if (bases_[i].group == u.group && static_cast<int>(bases_[i].node) == leaf && bases_[i].block == u.block) u.basis_slot = static_cast<int>(i);
    }
  }

  void make_candidates(Unit& u) {
    const auto& grid = grid_[u.group];
    const std::size_t rb = grid.rb(u.block), cb = grid.cb(u.block);
    const matrix B = unit_block(u);
    const Whitening& wh = whitening(u);
    const matrix BL = wh.identity ? B : matrix(xt::linalg::dot(B, wh.L));
    u.energy = detail::sq_norm(BL);
    std::vector<Candidate> c;
    const double gamma = opt_.truncation_penalty;
    c.push_back({block_kind::zero, 0, 0, 0.0, gamma * u.energy, u.energy});
    if (u.energy == 0) {
      u.candidates = c;
      return;
    }
    if (opt_.allow_raw) c.push_back({block_kind::raw, 32, 0, 4.0 * static_cast<double>(rb * cb), 0.0, -1.0});
    for (unsigned bits : dense_bits()) {
      const QMatrix q = quantize(B.data(), rb, cb, {bits, opt_.group, opt_.clip_search});
      const auto deq = dequantize(q);
      matrix d = matrix::from_shape({rb, cb});
      for (std::size_t i = 0; i < d.size(); ++i) d.data()[i] = deq[i] - B.data()[i];
      c.push_back({block_kind::dense, static_cast<std::uint8_t>(bits), 0, static_cast<double>(q.storage_bytes()), detail::sq_norm_times(d, wh), -1.0});
    }
    // Low rank on the spectrum of B L: rank r keeps left U_r^T [r, rb] and right U_r^T B [r, cb].
    const std::size_t kmax = std::max<std::size_t>(1, (rb * cb) / (rb + cb));
    {
      auto [Um, Sv, Vt] = xt::linalg::svd(BL, false, true);
      const std::size_t k = std::min<std::size_t>(kmax, Sv.size());
      u.U = xt::view(Um, xt::all(), xt::range(0, k));
      u.S = xt::view(Sv, xt::range(0, k));
      const matrix left = xt::transpose(u.U);                // [k, rb]
      const matrix right = xt::linalg::dot(left, B);         // [k, cb]
      std::vector<double> tail(k + 1, 0.0);                  // energy not in the leading r
      double kept = 0;
      for (std::size_t r = 0; r <= k; ++r) {
        tail[r] = std::max(0.0, u.energy - kept);
        if (r < k) kept += static_cast<double>(u.S(r)) * u.S(r);
      }
      for (unsigned bits : factor_bits()) {
        const auto el = detail::row_quant_errors(left, bits, opt_.group, opt_.clip_search, Whitening{});
        const auto er = detail::row_quant_errors(right, bits, opt_.group, opt_.clip_search, wh);
        double qerr = 0;
        for (std::size_t r = 1; r <= k; ++r) {
          qerr += el[r - 1] * static_cast<double>(u.S(r - 1)) * u.S(r - 1) + er[r - 1];
          const double bytes = static_cast<double>(QMatrix::storage_bytes(r, rb, bits, opt_.group) + QMatrix::storage_bytes(r, cb, bits, opt_.group));
          c.push_back({block_kind::lowrank, static_cast<std::uint8_t>(bits), static_cast<std::uint32_t>(r), bytes, gamma * tail[r] + qerr, tail[r] + qerr});
        }
      }
    }
    if (u.basis_slot >= 0) {
      const auto& bw = bases_[static_cast<std::size_t>(u.basis_slot)];
      const std::size_t k = bw.U.shape()[1];
      const matrix left = xt::transpose(bw.U);
      const matrix coef = xt::linalg::dot(left, B);                             // [k, cb]
      const matrix coefL = wh.identity ? coef : matrix(xt::linalg::dot(coef, wh.L));
      std::vector<double> kept(k + 1, 0.0);
      for (std::size_t r = 1; r <= k; ++r) {
        double s = 0;
        for (std::size_t j = 0; j < cb; ++j) s += static_cast<double>(coefL(r - 1, j)) * coefL(r - 1, j);
        kept[r] = kept[r - 1] + s;
      }
      // The basis is stored once per node at 8 bits; each member is charged its share.
      const double basis_row = static_cast<double>(QMatrix::storage_bytes(1, rb, 8, opt_.group)) / static_cast<double>(bw.members);
      for (unsigned bits : factor_bits()) {
        const auto er = detail::row_quant_errors(coef, bits, opt_.group, opt_.clip_search, wh);
        double qerr = 0;
        for (std::size_t r = 1; r <= k; ++r) {
          qerr += er[r - 1];
          const double bytes = static_cast<double>(QMatrix::storage_bytes(r, cb, bits, opt_.group)) + basis_row * static_cast<double>(r);
          const double trunc = std::max(0.0, u.energy - kept[r]);
          c.push_back({block_kind::shared, static_cast<std::uint8_t>(bits), static_cast<std::uint32_t>(r), bytes, gamma * trunc + qerr, trunc + qerr});
        }
      }
    }
    if (opt_.mode == target_mode::energy) {
      u.candidates = std::move(c);  // the threshold picks among all of them
    } else {
      u.candidates = detail::convex_hull(std::move(c));
    }
  }

  void allocate() {
    if (opt_.mode == target_mode::energy) {
      allocate_energy();
      return;
    }
    double original = 0;
    for (const auto& g : in_) original += static_cast<double>(g.weights.size() * g.weights[0].size() * dtype_size(g.type));
    double bytes = 0, err = 0;
    for (auto& u : units_) {
      u.chosen = 0;
      bytes += u.candidates[0].bytes;
      err += u.weight * u.candidates[0].err;
    }
    const double budget = opt_.mode == target_mode::ratio ? original / opt_.ratio - static_cast<double>(overhead_)
                                                          : std::numeric_limits<double>::infinity();
    const double target_err = opt_.mode == target_mode::max_error
                                  ? opt_.max_error * opt_.max_error * static_cast<double>(in_.size())
                                  : -1.0;
    using Item = std::pair<double, std::size_t>;  // (error decrease per byte, unit)
    auto cmp = [](const Item& a, const Item& b) { return a.first != b.first ? a.first < b.first : a.second > b.second; };
    std::priority_queue<Item, std::vector<Item>, decltype(cmp)> heap(cmp);
    auto push_next = [&](std::size_t i) {
      const auto& u = units_[i];
      if (u.chosen + 1 >= u.candidates.size()) return;
      const auto& a = u.candidates[u.chosen];
      const auto& b = u.candidates[u.chosen + 1];
      const double db = std::max(b.bytes - a.bytes, 1e-9);
      heap.push({u.weight * (a.err - b.err) / db, i});
    };
    for (std::size_t i = 0; i < units_.size(); ++i) push_next(i);
    while (!heap.empty() && err > target_err) {
      const auto [slope, i] = heap.top();
      heap.pop();
      auto& u = units_[i];
      const auto& a = u.candidates[u.chosen];
      const auto& b = u.candidates[u.chosen + 1];
      if (bytes + (b.bytes - a.bytes) > budget) continue;  // does not fit: smaller steps elsewhere may
      bytes += b.bytes - a.bytes;
      err -= u.weight * (a.err - b.err);
      ++u.chosen;
      push_next(i);
    }
  }

  void allocate_energy() {
    // Mean block energy per owner, for the drop floor.
    std::vector<std::pair<double, std::size_t>> owner_energy;
    // Owner: (group, node), members as negative nodes (also avoids GCC 12's -Wrestrict false
    // positive on string concatenation).
    auto owner_key = [&](const Unit& u) {
      return std::pair<std::size_t, long long>(u.group, u.node >= 0 ? u.node : -1 - static_cast<long long>(u.member));
    };
    std::map<std::pair<std::size_t, long long>, std::pair<double, std::size_t>> mean;
    for (const auto& u : units_) {
      auto& m = mean[owner_key(u)];
      m.first += u.energy, m.second += 1;
    }
    for (auto& u : units_) {
      const auto& m = mean[owner_key(u)];
      const double floor = opt_.energy_floor * m.first / static_cast<double>(m.second);
      const double allowed = (1.0 - opt_.energy) * u.energy;
      std::size_t best = 0;
      if (u.energy > floor) {
        double best_bytes = std::numeric_limits<double>::infinity();
        for (std::size_t i = 0; i < u.candidates.size(); ++i) {
          const auto& c = u.candidates[i];
          if (c.energy_err() <= allowed && c.bytes < best_bytes) best = i, best_bytes = c.bytes;
        }
        if (!std::isfinite(best_bytes)) best = 0;
      }
      u.chosen = best;
    }
  }

  Block encode_unit(const Unit& u) const {
    const auto& c = u.candidates[u.chosen];
    const auto& grid = grid_[u.group];
    const std::size_t rb = grid.rb(u.block), cb = grid.cb(u.block);
    Block blk;
    blk.kind = c.kind;
    const matrix B = unit_block(u);
    switch (c.kind) {
      case block_kind::zero: break;
      case block_kind::raw: {
        // A member's raw block holds its original values (exact); a core's, the core.
        const matrix V = u.node >= 0 ? B : detail::block_of(in_[u.group].weights[u.member], grid_[u.group], u.block);
        blk.raw.assign(V.begin(), V.end());
        break;
      }
      case block_kind::dense: blk.a = quantize(B.data(), rb, cb, {c.bits, opt_.group, opt_.clip_search}); break;
      case block_kind::lowrank: {
        const matrix left = xt::transpose(xt::view(u.U, xt::all(), xt::range(0, c.rank)));
        blk.rank = c.rank;
        blk.a = quantize(left.data(), c.rank, rb, {c.bits, opt_.group, opt_.clip_search});
        blk.b = project(blk.a, B, c.bits);
        break;
      }
      case block_kind::shared: {
        blk.rank = c.rank;
        blk.basis = static_cast<std::uint32_t>(u.basis_slot);  // remapped by the caller
        break;  // coefficients need the quantized basis: filled in encode()
      }
    }
    return blk;
  }

  /// Right factor for a quantized left factor `a` [r, rb]: the least-squares coefficients
  /// (a a^T)^-1 a B, optimal for any whitening (the whitening acts on the right).
  QMatrix project(const QMatrix& a, const matrix& B, unsigned bits) const {
    const std::size_t r = a.rows, rb = a.cols;
    matrix A = matrix::from_shape({r, rb});
    const auto deq = dequantize(a);
    std::copy(deq.begin(), deq.end(), A.begin());
    const matrix AB = xt::linalg::dot(A, B);
    matrix G = xt::linalg::dot(A, xt::transpose(A));
    for (std::size_t i = 0; i < r; ++i) G(i, i) += 1e-12f;
    matrix coef;
    try {
      coef = xt::linalg::solve(G, AB);
    } catch (const std::exception&) {
      coef = AB;  // a singular Gram matrix (all-zero rows): plain projection
    }
    return quantize(coef.data(), r, B.shape()[1], {bits, opt_.group, opt_.clip_search});
  }

  Compressed encode() {
    Compressed out;
    out.groups.resize(in_.size());
    for (std::size_t gi = 0; gi < in_.size(); ++gi) {
      const auto& g = in_[gi];
      auto& cg = out.groups[gi];
      cg.name = g.name;
      cg.member_names = g.member_names;
      cg.member_sources = g.member_sources;
      if (cg.member_sources.size() != g.weights.size()) cg.member_sources.assign(g.weights.size(), 0);
      cg.type = g.type;
      cg.grid = grid_[gi];
      cg.group_size = static_cast<unsigned>(opt_.group);
      cg.leaf = hed_[gi].leaf;
      for (const auto& n : hed_[gi].nodes) {
        CoreNode cn;
        cn.level = n.level, cn.parent = n.parent, cn.members = n.members;
        cn.core.blocks.resize(grid_[gi].blocks());
        cg.nodes.push_back(std::move(cn));
      }
      cg.residuals.assign(g.weights.size(), BlockMatrix{});
      for (auto& r : cg.residuals) r.blocks.resize(grid_[gi].blocks());
      cg.stats.total_energy = hed_[gi].total_energy;
      cg.stats.level_energy = hed_[gi].level_energy;
      cg.stats.residual_energy = hed_[gi].residual_energy;
      cg.stats.reference = reference_[gi];
      out.original_bytes += static_cast<double>(g.weights.size() * g.weights[0].size() * dtype_size(g.type));
    }
    // Shared bases: rank = the most any member uses.
    std::vector<std::uint32_t> need(bases_.size(), 0);
    for (const auto& u : units_) {
      const auto& c = u.candidates[u.chosen];
      if (c.kind == block_kind::shared) need[static_cast<std::size_t>(u.basis_slot)] = std::max(need[static_cast<std::size_t>(u.basis_slot)], c.rank);
    }
    std::vector<int> basis_index(bases_.size(), -1);
    for (std::size_t i = 0; i < bases_.size(); ++i) {
      if (!need[i]) continue;
      auto& cg = out.groups[bases_[i].group];
      Basis b;
      b.node = bases_[i].node;
      b.block = static_cast<std::uint32_t>(bases_[i].block);
      const matrix left = xt::transpose(xt::view(bases_[i].U, xt::all(), xt::range(0, need[i])));
      b.u = quantize(left.data(), need[i], left.shape()[1], {8, opt_.group, opt_.clip_search});
      basis_index[i] = static_cast<int>(cg.bases.size());
      cg.bases.push_back(std::move(b));
    }
    std::vector<Block> blocks(units_.size());
    detail::parallel_for(units_.size(), opt_.threads, [&](std::size_t i) {
      const auto& u = units_[i];
      blocks[i] = encode_unit(u);
      if (blocks[i].kind == block_kind::shared) {
        const auto& cg = out.groups[u.group];
        const auto bi = static_cast<std::size_t>(basis_index[static_cast<std::size_t>(u.basis_slot)]);
        const QMatrix& basis = cg.bases[bi].u;
        QMatrix lead;  // the leading `rank` rows of the basis
        lead.rows = blocks[i].rank, lead.cols = basis.cols, lead.bits = basis.bits, lead.group = basis.group;
        lead.codes.assign(basis.codes.begin(), basis.codes.begin() + static_cast<std::ptrdiff_t>(QMatrix::code_bytes(lead.rows, lead.cols, 8)));
        lead.scales.assign(basis.scales.begin(), basis.scales.begin() + static_cast<std::ptrdiff_t>(QMatrix::scale_count(lead.rows, lead.cols, lead.group)));
        blocks[i].b = project(lead, unit_block(u), u.candidates[u.chosen].bits);
        blocks[i].basis = static_cast<std::uint32_t>(bi);
      }
    });
    for (std::size_t i = 0; i < units_.size(); ++i) {
      const auto& u = units_[i];
      auto& cg = out.groups[u.group];
      cg.stats.est_error += u.candidates[u.chosen].err;
      cg.stats.blocks_by_kind[static_cast<std::size_t>(blocks[i].kind)] += 1;
      auto& slot = u.node >= 0 ? cg.nodes[static_cast<std::size_t>(u.node)].core.blocks[u.block] : cg.residuals[u.member].blocks[u.block];
      slot = std::move(blocks[i]);
    }
    progress("encode", units_.size(), units_.size());
    return out;
  }
};

/// Compresses `groups` under `opt` (see the file comment), payload budget only. Deterministic:
/// the same inputs and options give the same bytes, whatever the thread count.
inline Compressed compress(const std::vector<GroupInput>& groups, const Options& opt) {
  Compressor c(groups, opt);
  c.analyse();
  return c.finish(0);
}

}  // namespace s2lc::compress
