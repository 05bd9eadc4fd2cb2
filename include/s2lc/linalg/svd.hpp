// s2lc::linalg — singular value decompositions for the offline compressor: exact (LAPACK gesdd
// through xtensor-blas), truncated, and randomized (Halko, Martinsson & Tropp 2011: Gaussian
// sketch with oversampling and power iterations), deterministic under a seed.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <random>
#include <tuple>

#include <xtensor-blas/xlinalg.hpp>
#include <xtensor/xtensor.hpp>
#include <xtensor/xview.hpp>

#include "s2lc/error.hpp"
#include "s2lc/linalg/qr.hpp"
#include "s2lc/tensor.hpp"

namespace s2lc::linalg {

/// A = U diag(S) Vt with U [m, r], S [r] descending, Vt [r, n].
struct SVD {
  matrix U;
  vector S;
  matrix Vt;

  std::size_t rank() const noexcept { return S.size(); }
  /// U diag(S) Vt.
  matrix reconstruct() const {
    matrix US = U;
    for (std::size_t j = 0; j < S.size(); ++j) xt::view(US, xt::all(), j) *= S(j);
    return xt::linalg::dot(US, Vt);
  }
};

/// Exact thin SVD (r = min(m, n)).
inline SVD svd(const matrix& A) {
  if (A.size() == 0) throw invalid_argument("svd: empty matrix");
  auto [u, s, vt] = xt::linalg::svd(A, /*full_matrices=*/false, /*compute_uv=*/true);
  return SVD{matrix(u), vector(s), matrix(vt)};
}

/// Keeps the leading `rank` triplets (rank is clamped to the available ones).
inline SVD truncate(const SVD& f, std::size_t rank) {
  rank = std::min(rank, f.rank());
  return SVD{matrix(xt::view(f.U, xt::all(), xt::range(0, rank))), vector(xt::view(f.S, xt::range(0, rank))),
             matrix(xt::view(f.Vt, xt::range(0, rank), xt::all()))};
}

/// Smallest r such that the leading r singular values hold at least `fraction` of
/// `total_energy` (the squared Frobenius norm of the matrix; by default, the sum of S^2).
inline std::size_t rank_for_energy(const vector& S, double fraction, double total_energy = -1.0) {
  if (!(fraction >= 0.0 && fraction <= 1.0)) throw invalid_argument("rank_for_energy: fraction must be in [0, 1]");
  if (total_energy < 0) {
    total_energy = 0;
    for (float s : S) total_energy += static_cast<double>(s) * s;
  }
  const double target = fraction * total_energy;
  double kept = 0;
  for (std::size_t r = 0; r < S.size(); ++r) {
    if (kept >= target) return r;
    kept += static_cast<double>(S(r)) * S(r);
  }
  return S.size();
}

struct RandomizedOptions {
  std::size_t oversample = 10;   ///< extra sketch columns beyond the rank
  std::size_t power_iters = 2;   ///< subspace iterations (each re-orthonormalised)
  std::uint64_t seed = 0x5eed;   ///< the Gaussian sketch's seed
};

/// Rank-`rank` randomized SVD; approaches the exact truncated SVD as oversampling and power
/// iterations grow. Deterministic for a given seed (and BLAS build).
inline SVD randomized_svd(const matrix& A, std::size_t rank, const RandomizedOptions& opt = {}) {
  const std::size_t m = A.shape()[0], n = A.shape()[1];
  if (A.size() == 0) throw invalid_argument("randomized_svd: empty matrix");
  if (rank == 0) throw invalid_argument("randomized_svd: rank must be positive");
  const std::size_t l = std::min({rank + opt.oversample, m, n});
  std::mt19937_64 rng(opt.seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  matrix omega = matrix::from_shape({n, l});
  for (auto& v : omega) v = normal(rng);

  matrix Q = orthonormal_basis(xt::linalg::dot(A, omega));
  const auto At = xt::transpose(A);
  for (std::size_t it = 0; it < opt.power_iters; ++it) {
    const matrix Z = orthonormal_basis(xt::linalg::dot(At, Q));
    Q = orthonormal_basis(xt::linalg::dot(A, Z));
  }
  const matrix B = xt::linalg::dot(xt::transpose(Q), A);  // [l, n]
  SVD small = svd(B);
  SVD out{xt::linalg::dot(Q, small.U), std::move(small.S), std::move(small.Vt)};
  return truncate(out, rank);
}

}  // namespace s2lc::linalg
