// SVD / QR / k-means on real expert residuals of the tinymoe upcycled MoE (tests/data fixture):
// real trained weights have the spectra the compressor will see.
#include <doctest/doctest.h>

#include <cmath>
#include <string>
#include <vector>

#include <xtensor/xmath.hpp>
#include <xtensor/xview.hpp>

#include <s2lc/linalg/cluster.hpp>
#include <s2lc/linalg/qr.hpp>
#include <s2lc/linalg/svd.hpp>
#include <s2lc/tensor.hpp>

#include "support.hpp"

// The suite's own scope: the suites compile in unity groups (tests/CMakeLists.txt).
namespace suite_linalg_svd {

namespace {

double fro2(const s2lc::matrix& A) {
  double s = 0;
  for (float v : A) s += static_cast<double>(v) * v;
  return s;
}

/// Expert e's w1 minus the mean of the 8 experts (the residual HED leaves), layer 1.
s2lc::matrix residual(std::size_t e) {
  s2lc::io::SafetensorsFile f(s2lc::test::data_dir() / "tinymoe-upcycled-L1.safetensors");
  s2lc::matrix mean = xt::zeros<float>({768u, 256u});
  std::vector<s2lc::matrix> w;
  for (int i = 0; i < 8; ++i) {
    w.push_back(s2lc::load_matrix_f32(f, "layers.1.moe.experts." + std::to_string(i) + ".w1.weight"));
    mean += w.back() / 8.0f;
  }
  return w[e] - mean;
}

void check_orthonormal_columns(const s2lc::matrix& Q, double tol) {
  const s2lc::matrix G = xt::linalg::dot(xt::transpose(Q), Q);
  for (std::size_t i = 0; i < G.shape()[0]; ++i)
    for (std::size_t j = 0; j < G.shape()[1]; ++j) REQUIRE(std::abs(G(i, j) - (i == j ? 1.0f : 0.0f)) < tol);
}

}  // namespace

TEST_CASE("linalg: exact SVD of a real residual reconstructs it, ordered and orthonormal") {
  const s2lc::matrix R = residual(3);
  const auto f = s2lc::linalg::svd(R);
  REQUIRE(f.rank() == 256);
  for (std::size_t i = 1; i < f.rank(); ++i) REQUIRE(f.S(i) <= f.S(i - 1));
  check_orthonormal_columns(f.U, 1e-4);
  check_orthonormal_columns(xt::transpose(f.Vt), 1e-4);
  const double err = fro2(f.reconstruct() - R) / fro2(R);
  CHECK(err < 1e-10);
  double s2 = 0;
  for (float s : f.S) s2 += static_cast<double>(s) * s;
  CHECK(std::abs(s2 - fro2(R)) / fro2(R) < 1e-5);
}

TEST_CASE("linalg: truncation error equals the discarded energy (Eckart-Young) and rank_for_energy honours the fraction") {
  const s2lc::matrix R = residual(0);
  const auto f = s2lc::linalg::svd(R);
  for (double frac : {0.5, 0.8, 0.95}) {
    const std::size_t r = s2lc::linalg::rank_for_energy(f.S, frac);
    REQUIRE(r >= 1);
    REQUIRE(r <= f.rank());
    const auto t = s2lc::linalg::truncate(f, r);
    const double kept = 1.0 - fro2(t.reconstruct() - R) / fro2(R);
    CHECK(kept >= frac - 1e-4);  // honoured ...
    const auto t1 = s2lc::linalg::truncate(f, r - 1);
    CHECK(1.0 - fro2(t1.reconstruct() - R) / fro2(R) < frac + 1e-4);  // ... by the smallest rank
    double tail = 0;
    for (std::size_t i = r; i < f.rank(); ++i) tail += static_cast<double>(f.S(i)) * f.S(i);
    CHECK(std::abs(fro2(t.reconstruct() - R) - tail) / fro2(R) < 1e-4);
  }
  CHECK(s2lc::linalg::rank_for_energy(f.S, 0.0) == 0);
  CHECK(s2lc::linalg::rank_for_energy(f.S, 1.0) <= f.rank());
  CHECK_THROWS_AS(s2lc::linalg::rank_for_energy(f.S, 1.5), s2lc::invalid_argument);
}

TEST_CASE("linalg: randomized SVD is within 2% of the optimal rank-k error on real residuals, and deterministic") {
  const s2lc::matrix R = residual(5);
  const auto exact = s2lc::linalg::svd(R);
  for (std::size_t k : {8u, 32u, 64u}) {
    CAPTURE(k);
    const auto opt = fro2(s2lc::linalg::truncate(exact, k).reconstruct() - R);
    const auto rs = s2lc::linalg::randomized_svd(R, k);
    REQUIRE(rs.rank() == k);
    check_orthonormal_columns(rs.U, 1e-4);
    const double err = fro2(rs.reconstruct() - R);
    CHECK(err <= 1.02 * opt);
    // Singular values of Q^T A never exceed those of A; the leading half is accurate (the tail
    // of a real residual's flat spectrum converges slowest).
    for (std::size_t i = 0; i < k; ++i) CHECK(rs.S(i) <= exact.S(i) * 1.0001f);
    for (std::size_t i = 0; i < k / 2; ++i) CHECK(rs.S(i) >= 0.98f * exact.S(i));
    const auto again = s2lc::linalg::randomized_svd(R, k);
    CHECK(xt::all(xt::equal(again.U, rs.U)));
    CHECK(xt::all(xt::equal(again.S, rs.S)));
  }
  // Without power iterations the sketch alone is measurably worse: the iterations matter.
  const auto crude = s2lc::linalg::randomized_svd(R, 32, {.oversample = 2, .power_iters = 0, .seed = 7});
  CHECK(fro2(crude.reconstruct() - R) > fro2(s2lc::linalg::randomized_svd(R, 32).reconstruct() - R));
}

TEST_CASE("linalg: thin QR is orthonormal, upper triangular and exact") {
  const s2lc::matrix A = xt::view(residual(1), xt::range(0, 300), xt::range(0, 40));
  const auto [Q, Rm] = s2lc::linalg::qr(A);
  REQUIRE(Q.shape()[0] == 300);
  REQUIRE(Q.shape()[1] == 40);
  REQUIRE(Rm.shape()[0] == 40);
  check_orthonormal_columns(Q, 1e-5);
  for (std::size_t i = 0; i < 40; ++i)
    for (std::size_t j = 0; j < i; ++j) REQUIRE(Rm(i, j) == 0.0f);
  CHECK(fro2(xt::linalg::dot(Q, Rm) - A) / fro2(A) < 1e-10);
}

TEST_CASE("linalg: k-means recovers separated clusters, is seed-deterministic, and rejects bad k") {
  // 3 well separated blobs of 20 points in 16-d, interleaved.
  s2lc::matrix X = s2lc::matrix::from_shape({60, 16});
  std::mt19937 rng(3);
  std::normal_distribution<float> noise(0.0f, 0.1f);
  for (std::size_t i = 0; i < 60; ++i)
    for (std::size_t j = 0; j < 16; ++j) X(i, j) = (j == i % 3 ? 10.0f : 0.0f) + noise(rng);
  const auto km = s2lc::linalg::kmeans(X, 3, 42);
  for (std::size_t i = 3; i < 60; ++i) CHECK(km.labels[i] == km.labels[i % 3]);
  CHECK(km.labels[0] != km.labels[1]);
  CHECK(km.labels[1] != km.labels[2]);
  CHECK(km.labels[0] != km.labels[2]);
  CHECK(km.inertia < 60 * 16 * 0.1 * 0.1 * 2);
  const auto again = s2lc::linalg::kmeans(X, 3, 42);
  CHECK(again.labels == km.labels);
  CHECK(xt::all(xt::equal(again.centroids, km.centroids)));
  CHECK_THROWS_AS(s2lc::linalg::kmeans(X, 0), s2lc::invalid_argument);
  CHECK_THROWS_AS(s2lc::linalg::kmeans(X, 61), s2lc::invalid_argument);
  // k = n: every point its own cluster, zero inertia.
  const s2lc::matrix few = xt::view(X, xt::range(0, 5), xt::all());
  CHECK(s2lc::linalg::kmeans(few, 5, 1).inertia == doctest::Approx(0.0));
}

TEST_CASE("linalg: k-means on the 8 real upcycled experts of a layer yields a valid partition") {
  s2lc::io::SafetensorsFile f(s2lc::test::data_dir() / "tinymoe-upcycled-L1.safetensors");
  s2lc::matrix X = s2lc::matrix::from_shape({8, 768 * 256});
  for (std::size_t e = 0; e < 8; ++e) {
    const auto w = s2lc::load_matrix_f32(f, "layers.1.moe.experts." + std::to_string(e) + ".w3.weight");
    std::copy(w.begin(), w.end(), X.data() + e * w.size());
  }
  const auto one = s2lc::linalg::kmeans(X, 1, 9);
  const auto two = s2lc::linalg::kmeans(X, 2, 9);
  const auto four = s2lc::linalg::kmeans(X, 4, 9);
  CHECK(two.inertia <= one.inertia);
  CHECK(four.inertia <= two.inertia);
  std::vector<int> used(4, 0);
  for (auto l : four.labels) used[l] = 1;
  CHECK(used == std::vector<int>{1, 1, 1, 1});
}

}  // namespace suite_linalg_svd
