// s2lc — safe module addition (Brainstacks-style): before a new domain module joins existing
// ones, remove the part of its weight delta that lies in the existing modules' principal
// subspaces, so routing or mixing the new module does not disturb what the others do there,
// and measure the interference before and after.
//
//   auto S = s2lc::route::principal_subspace({&delta_c, &delta_py}, {.rank = 16});
//   double before = s2lc::route::overlap(S, delta_en);           // energy fraction inside
//   s2lc::matrix safe = s2lc::route::project_out(S, delta_en);   // overlap(S, safe) ~ 0
//
// The subspace of each existing delta D_i [out, in] is its top-`rank` left singular vectors
// (randomized SVD, deterministic for a seed), optionally also the right ones (two_sided); the
// union is re-orthonormalised (QR). One-sided projection: D' = (I - U U^T) D. Two-sided:
// D' = (I - U U^T) D (I - V V^T). overlap(S, D) = 1 - ||D'||_F^2 / ||D||_F^2.
#pragma once

#include <cmath>
#include <cstddef>
#include <string>
#include <utility>
#include <vector>

#include <xtensor-blas/xlinalg.hpp>

#include "s2lc/error.hpp"
#include "s2lc/linalg/qr.hpp"
#include "s2lc/linalg/svd.hpp"
#include "s2lc/tensor.hpp"

namespace s2lc::route {

struct SubspaceOptions {
  std::size_t rank = 16;     ///< singular directions kept per existing module
  double energy = 0.0;       ///< > 0: keep only as many (<= rank) as reach this energy fraction
  bool two_sided = false;    ///< also project out the input-side (right) subspace
  linalg::RandomizedOptions rsvd{};
};

struct Subspace {
  matrix U;   ///< [out, r] orthonormal columns (output space)
  matrix V;   ///< [in, r'] orthonormal columns (input space; empty unless two-sided)
};

namespace detail {

inline double frob2(const matrix& A) {
  double s = 0;
  for (float v : A) s += static_cast<double>(v) * v;
  return s;
}

/// Columns of `parts` side by side, re-orthonormalised; rank-deficient directions dropped.
inline matrix orthonormal_union(const std::vector<matrix>& parts, std::size_t rows) {
  std::size_t cols = 0;
  for (const auto& p : parts) cols += p.shape()[1];
  if (cols == 0) return matrix::from_shape({rows, 0});
  matrix A = matrix::from_shape({rows, cols});
  std::size_t c = 0;
  for (const auto& p : parts) {
    for (std::size_t j = 0; j < p.shape()[1]; ++j, ++c)
      for (std::size_t i = 0; i < rows; ++i) A(i, c) = p(i, j);
  }
  if (cols >= rows) {  // the union spans everything it can: an SVD basis is safer than QR here
    const auto f = linalg::svd(A);
    std::size_t r = 0;
    while (r < f.S.size() && f.S(r) > f.S(0) * 1e-6f) ++r;
    return xt::eval(xt::view(f.U, xt::all(), xt::range(0, r)));
  }
  return linalg::orthonormal_basis(A);
}

inline matrix left_directions(const matrix& D, const SubspaceOptions& opt, bool right) {
  const matrix A = right ? matrix(xt::transpose(D)) : D;
  const std::size_t r = std::min({opt.rank, A.shape()[0], A.shape()[1]});
  auto f = linalg::randomized_svd(A, r, opt.rsvd);
  std::size_t keep = r;
  if (opt.energy > 0) {
    keep = std::max<std::size_t>(1, linalg::rank_for_energy(f.S, opt.energy, frob2(A)));
    keep = std::min(keep, r);
  }
  return xt::eval(xt::view(f.U, xt::all(), xt::range(0, keep)));
}

/// (I - Q Q^T) A.
inline matrix remove_columns_space(const matrix& Q, const matrix& A) {
  if (Q.shape()[1] == 0) return A;
  return A - xt::linalg::dot(Q, xt::linalg::dot(xt::transpose(Q), A));
}

}  // namespace detail

/// The principal subspace of the existing modules' deltas (all the same shape).
inline Subspace principal_subspace(const std::vector<const matrix*>& existing, const SubspaceOptions& opt = {}) {
  if (existing.empty()) throw invalid_argument("principal_subspace: no existing modules");
  if (opt.rank == 0) throw invalid_argument("principal_subspace: rank must be positive");
  const auto shape = existing[0]->shape();
  std::vector<matrix> left, right;
  for (std::size_t i = 0; i < existing.size(); ++i) {
    const matrix& D = *existing[i];
    if (D.shape() != shape)
      throw invalid_argument("principal_subspace: module " + std::to_string(i) + " is [" + std::to_string(D.shape()[0]) + ", " +
                             std::to_string(D.shape()[1]) + "], module 0 is [" + std::to_string(shape[0]) + ", " + std::to_string(shape[1]) + "]");
    if (detail::frob2(D) == 0) continue;
    left.push_back(detail::left_directions(D, opt, false));
    if (opt.two_sided) right.push_back(detail::left_directions(D, opt, true));
  }
  Subspace s;
  s.U = detail::orthonormal_union(left, shape[0]);
  s.V = opt.two_sided ? detail::orthonormal_union(right, shape[1]) : matrix::from_shape({shape[1], 0});
  return s;
}

/// D without its components in the subspace: (I - U U^T) D [(I - V V^T)].
inline matrix project_out(const Subspace& s, const matrix& D) {
  if (D.shape()[0] != s.U.shape()[0] || (s.V.shape()[1] && D.shape()[1] != s.V.shape()[0]))
    throw invalid_argument("project_out: the module's shape does not match the subspace's");
  matrix out = detail::remove_columns_space(s.U, D);
  if (s.V.shape()[1]) out = xt::transpose(detail::remove_columns_space(s.V, xt::transpose(out)));
  return out;
}

/// Fraction of D's energy (squared Frobenius norm) inside the subspace, in [0, 1].
inline double overlap(const Subspace& s, const matrix& D) {
  const double all = detail::frob2(D);
  if (all == 0) return 0.0;
  return std::max(0.0, 1.0 - detail::frob2(project_out(s, D)) / all);
}

/// One tensor of a module: its name and weight delta.
struct NamedDelta {
  std::string name;
  matrix delta;
};

struct InterferenceReport {
  std::string name;
  double overlap_before = 0;  ///< energy fraction of the new delta inside the existing subspaces
  double overlap_after = 0;   ///< the same after projection (~0)
  double kept = 1;            ///< ||D'||^2 / ||D||^2: how much of the new module survives
  std::size_t subspace_rank = 0;
};

/// Adds `incoming` beside `existing` modules (each a list of named deltas; tensors matched by
/// name, missing ones skipped): returns the projected module and a report per tensor. With
/// project = false the module is returned unchanged and only the interference is measured.
inline std::pair<std::vector<NamedDelta>, std::vector<InterferenceReport>> safe_add(const std::vector<std::vector<NamedDelta>>& existing,
                                                                                    const std::vector<NamedDelta>& incoming,
                                                                                    const SubspaceOptions& opt = {}, bool project = true) {
  std::vector<NamedDelta> out;
  std::vector<InterferenceReport> rep;
  for (const auto& t : incoming) {
    std::vector<const matrix*> same;
    for (const auto& m : existing)
      for (const auto& e : m)
        if (e.name == t.name) same.push_back(&e.delta);
    InterferenceReport r;
    r.name = t.name;
    if (same.empty()) {
      out.push_back(t);
      rep.push_back(r);
      continue;
    }
    const Subspace s = principal_subspace(same, opt);
    r.subspace_rank = s.U.shape()[1] + s.V.shape()[1];
    const matrix p = project_out(s, t.delta);
    const double all = detail::frob2(t.delta), left = detail::frob2(p);
    r.overlap_before = all > 0 ? std::max(0.0, 1.0 - left / all) : 0.0;
    if (project) {
      r.overlap_after = overlap(s, p);
      r.kept = all > 0 ? left / all : 1.0;
      out.push_back({t.name, p});
    } else {
      r.overlap_after = r.overlap_before;
      out.push_back(t);
    }
    rep.push_back(r);
  }
  return {std::move(out), std::move(rep)};
}

}  // namespace s2lc::route
