// Safe module addition (include/route/safe_add.hpp): on constructed deltas with a known shared
// part the measured overlap equals the shared energy fraction and projection removes exactly
// that part; on the real tinymoe domain modules (c and py existing, en added) the projected en
// module has no energy left in their principal subspaces and keeps the rest of itself.
#include <doctest/doctest.h>

#include "support.hpp"

#include <route/safe_add.hpp>
#include <s2lc/io/safetensors.hpp>
#include <s2lc/tensor.hpp>

#include <xtensor-blas/xlinalg.hpp>

#include <cmath>
#include <string>
#include <vector>

// The suite's own scope: the suites compile in unity groups (tests/CMakeLists.txt).
namespace suite_route_safe_add {

extern "C" void openblas_set_num_threads(int);

namespace {

namespace rt = s2lc::route;

s2lc::matrix gaussian(std::size_t r, std::size_t c, std::uint32_t seed) {
  const auto v = s2lc::test::randn(r * c, seed);
  s2lc::matrix m = s2lc::matrix::from_shape({r, c});
  std::copy(v.begin(), v.end(), m.begin());
  return m;
}

double frob2(const s2lc::matrix& m) {
  double s = 0;
  for (float v : m) s += double(v) * v;
  return s;
}

}  // namespace

TEST_CASE("route: safe addition removes exactly the part of a module inside the existing modules' subspace") {
  openblas_set_num_threads(1);
  const std::size_t out = 96, in = 64;
  // Two existing rank-4 modules; the new module = a part in their column space + an independent part.
  const s2lc::matrix A = xt::linalg::dot(gaussian(out, 4, 1), gaussian(4, in, 2));
  const s2lc::matrix B = xt::linalg::dot(gaussian(out, 4, 3), gaussian(4, in, 4));
  const s2lc::matrix inside = xt::linalg::dot(A, gaussian(in, in, 5)) * 0.01f + B * 0.5f;
  s2lc::matrix fresh = gaussian(out, in, 6);
  // Make the fresh part orthogonal to the existing column space so the expected overlap is exact.
  rt::SubspaceOptions opt;
  opt.rank = 4;
  const auto S = rt::principal_subspace({&A, &B}, opt);
  CHECK(S.U.shape()[0] == out);
  CHECK(S.U.shape()[1] == 8);
  const s2lc::matrix UtU = xt::linalg::dot(xt::transpose(S.U), S.U);
  for (std::size_t i = 0; i < 8; ++i)
    for (std::size_t j = 0; j < 8; ++j) CHECK(std::fabs(UtU(i, j) - (i == j ? 1.0f : 0.0f)) < 1e-5f);
  fresh = rt::project_out(S, fresh);
  const s2lc::matrix D = inside + fresh;
  const double expect = frob2(inside) / (frob2(inside) + frob2(fresh));
  CHECK(rt::overlap(S, D) == doctest::Approx(expect).epsilon(1e-4));
  CHECK(rt::overlap(S, A) == doctest::Approx(1.0).epsilon(1e-5));
  const auto P = rt::project_out(S, D);
  CHECK(rt::overlap(S, P) < 1e-8);
  double diff = 0;
  for (std::size_t i = 0; i < P.size(); ++i) diff += std::pow(double(P.data()[i]) - fresh.data()[i], 2);
  CHECK(diff / frob2(fresh) < 1e-9);

  // Two-sided: the input-side directions go too.
  opt.two_sided = true;
  const auto S2 = rt::principal_subspace({&A, &B}, opt);
  CHECK(S2.V.shape()[1] == 8);
  const auto P2 = rt::project_out(S2, D);
  const s2lc::matrix right = xt::linalg::dot(P2, S2.V);
  CHECK(frob2(right) < 1e-8 * frob2(D));
  CHECK(rt::overlap(S2, D) >= rt::overlap(S, D) - 1e-9);

  const s2lc::matrix wrong = gaussian(out + 1, in, 9);
  CHECK_THROWS_WITH_AS(rt::principal_subspace({&A, &wrong}), doctest::Contains("module 1 is [97, 64], module 0 is [96, 64]"), s2lc::invalid_argument);
  CHECK_THROWS_WITH_AS(rt::project_out(S, wrong), doctest::Contains("does not match"), s2lc::invalid_argument);
}

TEST_CASE("route: adding the real en domain module beside c and py (tinymoe): interference before and after") {
  openblas_set_num_threads(1);
  const auto dir = s2lc::test::shared_dir() / "tinymoe";
  auto load = [&](const char* d) {
    const s2lc::io::SafetensorsFile f(dir / (std::string("domain-") + d + ".safetensors"));
    std::vector<rt::NamedDelta> m;
    for (const char* t : {"layers.1.ffn.w1.weight", "layers.1.ffn.w2.weight"}) m.push_back({t, s2lc::load_matrix_f32(f, t)});
    return m;
  };
  const auto c = load("c"), py = load("py"), en = load("en");
  rt::SubspaceOptions opt;
  opt.rank = 16;
  const auto [measured, before] = rt::safe_add({c, py}, en, opt, false);
  const auto [projected, after] = rt::safe_add({c, py}, en, opt, true);
  REQUIRE(after.size() == 2);
  for (std::size_t i = 0; i < 2; ++i) {
    CAPTURE(after[i].name);
    MESSAGE(after[i].name << ": overlap before " << after[i].overlap_before << ", after " << after[i].overlap_after << ", kept "
                          << after[i].kept << ", subspace rank " << after[i].subspace_rank);
    CHECK(measured[i].delta == en[i].delta);  // measuring only changes nothing
    CHECK(before[i].overlap_before == doctest::Approx(after[i].overlap_before));
    // Domain fine-tunes of one base share directions: a real, non-trivial overlap...
    CHECK(after[i].overlap_before > 0.05);
    CHECK(after[i].overlap_before < 0.95);
    // ...removed by the projection, which keeps everything else.
    CHECK(after[i].overlap_after < 1e-6);
    CHECK(after[i].kept == doctest::Approx(1.0 - after[i].overlap_before).epsilon(1e-4));
    CHECK(after[i].subspace_rank == 32);
  }
}

}  // namespace suite_route_safe_add
