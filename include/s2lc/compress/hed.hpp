// s2lc::compress — Hierarchical Expert Decomposition (HED): a global shared core (the mean of a
// group's members), then cluster cores and subcluster cores (means of the members of clusters
// found by k-means on what the level above leaves), then per-member residuals:
//
//     W_e = C_global + C_cluster(e) + C_subcluster(e) + R_e        (exactly, in f32 arithmetic)
//
// Each level is the mean of what its members have left, so the levels are orthogonal in the sum
// over members and the energy fractions they capture add up to one.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include <xtensor/xtensor.hpp>

#include "s2lc/error.hpp"
#include "s2lc/linalg/cluster.hpp"
#include "s2lc/tensor.hpp"

namespace s2lc::compress {

/// A core of the hierarchy: the shared part of `members` not already in its ancestors.
struct HedNode {
  int level = 0;                       ///< 0 global, 1 cluster, 2 subcluster
  int parent = -1;                     ///< index of the parent node, -1 for the global core
  std::vector<std::uint32_t> members;  ///< member indices (into the group), ascending
  matrix core;                         ///< [rows, cols]
};

struct HedOptions {
  /// Cluster counts per level below the global core: -1 chooses automatically, 0 skips the
  /// level, k >= 2 asks for k clusters (subclusters: k per cluster).
  int clusters = -1;
  int subclusters = -1;
  /// The global core: -1 keeps it when it captures at least 2/E of the members' energy (the mean
  /// of E structureless members captures 1/E), 0 skips it, 1 always keeps it.
  int global = -1;
  std::uint64_t seed = 1;
};

struct Hed {
  std::vector<HedNode> nodes;          ///< parents before children; nodes[0] is the global core when present
  std::vector<int> leaf;               ///< deepest node of each member (-1: none)
  std::vector<matrix> residuals;       ///< R_e
  std::vector<double> level_energy;    ///< [3]: energy captured per level (sum over members), Frobenius
  double total_energy = 0;             ///< sum over members of ||W_e||^2
  double residual_energy = 0;          ///< sum over members of ||R_e||^2

  /// Nodes on the path from the root to member e's leaf.
  std::vector<int> path(std::uint32_t e) const {
    std::vector<int> p;
    for (int n = leaf[e]; n >= 0; n = nodes[static_cast<std::size_t>(n)].parent) p.push_back(n);
    std::reverse(p.begin(), p.end());
    return p;
  }
};

namespace detail {

inline double sq_norm(const matrix& a) {
  double s = 0;
  for (float v : a) s += static_cast<double>(v) * v;
  return s;
}

/// Mean of the given matrices.
inline matrix mean_of(const std::vector<matrix>& xs, const std::vector<std::uint32_t>& idx) {
  matrix m = xt::zeros<float>(xs[idx[0]].shape());
  std::vector<double> acc(m.size(), 0.0);
  for (auto i : idx) {
    const float* p = xs[i].data();
    for (std::size_t j = 0; j < acc.size(); ++j) acc[j] += p[j];
  }
  for (std::size_t j = 0; j < acc.size(); ++j) m.data()[j] = static_cast<float>(acc[j] / static_cast<double>(idx.size()));
  return m;
}

/// Splits `members` (whose current residuals are rs[members]) into clusters. `requested` as in
/// HedOptions. Automatic: the k in [2, n/2] whose clusters capture the largest share of the
/// residual energy beyond k/n (what cluster means of structureless residuals capture), kept only
/// when that share is at least 2k/n. Returns an empty vector when the level is skipped.
inline std::vector<std::vector<std::uint32_t>> split(const std::vector<matrix>& rs, const std::vector<std::uint32_t>& members,
                                                     int requested, std::uint64_t seed) {
  const std::size_t n = members.size();
  if (requested == 0 || n < 2) return {};
  const std::size_t d = rs[members[0]].size();
  matrix X = matrix::from_shape({n, d});
  double energy = 0;
  for (std::size_t i = 0; i < n; ++i) {
    std::copy(rs[members[i]].begin(), rs[members[i]].end(), X.data() + i * d);
    energy += sq_norm(rs[members[i]]);
  }
  auto labels_to_clusters = [&](const std::vector<std::size_t>& labels, std::size_t k) {
    std::vector<std::vector<std::uint32_t>> out(k);
    for (std::size_t i = 0; i < n; ++i) out[labels[i]].push_back(members[i]);
    out.erase(std::remove_if(out.begin(), out.end(), [](const auto& c) { return c.empty(); }), out.end());
    return out;
  };
  if (requested > 0) {
    const std::size_t k = std::min<std::size_t>(static_cast<std::size_t>(requested), n);
    if (k < 2) return {};
    return labels_to_clusters(linalg::kmeans(X, k, seed).labels, k);
  }
  if (n < 4 || energy <= 0) return {};
  double best_gain = 0;
  std::vector<std::vector<std::uint32_t>> best;
  for (std::size_t k = 2; k <= n / 2; ++k) {
    const auto km = linalg::kmeans(X, k, seed);
    const double captured = (energy - km.inertia) / energy;
    const double chance = static_cast<double>(k) / static_cast<double>(n);
    if (captured >= 2 * chance && captured - chance > best_gain) {
      best_gain = captured - chance;
      best = labels_to_clusters(km.labels, k);
    }
  }
  return best;
}

}  // namespace detail

/// Decomposes `ws` (all [rows, cols], at least one).
inline Hed decompose(const std::vector<matrix>& ws, const HedOptions& opt = {}) {
  if (ws.empty()) throw invalid_argument("decompose: no members");
  for (const auto& w : ws)
    if (w.shape() != ws[0].shape()) throw invalid_argument("decompose: members differ in shape");
  Hed h;
  const auto E = static_cast<std::uint32_t>(ws.size());
  h.leaf.assign(E, -1);
  h.level_energy.assign(3, 0.0);
  h.residuals = ws;
  for (const auto& w : ws) h.total_energy += detail::sq_norm(w);
  std::vector<std::uint32_t> all(E);
  for (std::uint32_t e = 0; e < E; ++e) all[e] = e;

  auto add_node = [&](int level, int parent, std::vector<std::uint32_t> members) {
    HedNode node;
    node.level = level;
    node.parent = parent;
    node.core = detail::mean_of(h.residuals, members);
    for (auto e : members) {
      h.residuals[e] -= node.core;
      h.leaf[e] = static_cast<int>(h.nodes.size());
    }
    h.level_energy[static_cast<std::size_t>(level)] += static_cast<double>(members.size()) * detail::sq_norm(node.core);
    node.members = std::move(members);
    h.nodes.push_back(std::move(node));
    return static_cast<int>(h.nodes.size()) - 1;
  };

  bool keep_global = opt.global != 0;
  if (opt.global < 0 && E > 1) {
    const matrix mean = detail::mean_of(h.residuals, all);
    const double captured = static_cast<double>(E) * detail::sq_norm(mean);
    keep_global = h.total_energy > 0 && captured >= 2.0 / static_cast<double>(E) * h.total_energy;
  }
  const int root = keep_global ? add_node(0, -1, all) : -1;
  const auto clusters = detail::split(h.residuals, all, opt.clusters, opt.seed);
  for (const auto& c : clusters) {
    const int cn = add_node(1, root, c);
    const auto subs = detail::split(h.residuals, c, opt.subclusters, opt.seed + 1);
    for (const auto& s : subs) add_node(2, cn, s);
  }
  for (const auto& r : h.residuals) h.residual_energy += detail::sq_norm(r);
  return h;
}

}  // namespace s2lc::compress
