// s2lc::linalg — QR (LAPACK geqrf/orgqr through xtensor-blas).
#pragma once

#include <xtensor-blas/xlinalg.hpp>

#include "s2lc/error.hpp"
#include "s2lc/tensor.hpp"

namespace s2lc::linalg {

/// A = Q R, Q [m, k] with orthonormal columns, R [k, n] upper triangular, k = min(m, n).
struct QR {
  matrix Q;
  matrix R;
};

inline QR qr(const matrix& A) {
  if (A.size() == 0) throw invalid_argument("qr: empty matrix");
  auto [q, r] = xt::linalg::qr(A, xt::linalg::qrmode::reduced);
  return QR{matrix(q), matrix(r)};
}

/// An orthonormal basis of the column space of A (the Q of its thin QR).
inline matrix orthonormal_basis(const matrix& A) { return qr(A).Q; }

}  // namespace s2lc::linalg
