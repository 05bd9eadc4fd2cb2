// Tests for s2lc/compress/hed.hpp: the hierarchical expert decomposition on the real fixture's
// w1 experts (exact sum, energy bookkeeping, how much the global core captures of upcycled
// experts), and on synthetic groups with a planted cluster structure or none at all.
#include <doctest/doctest.h>

#include "support.hpp"

#include <s2lc/compress/hed.hpp>
#include <s2lc/io/safetensors.hpp>
#include <s2lc/tensor.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <random>
#include <set>
#include <string>
#include <vector>

// The suite's own scope: the suites compile in unity groups (tests/CMakeLists.txt).
namespace suite_compress_hed {

namespace {

namespace cz = s2lc::compress;
using s2lc::matrix;

double sq_norm(const matrix& a) {
  double s = 0;
  for (float v : a) s += static_cast<double>(v) * v;
  return s;
}

double max_abs(const matrix& a) {
  double m = 0;
  for (float v : a) m = std::max(m, static_cast<double>(std::fabs(v)));
  return m;
}

/// The 8 experts' w1 of layer 1 of the upcycled tinymoe (tests/data fixture).
std::vector<matrix> fixture_w1() {
  s2lc::io::SafetensorsFile f(s2lc::test::data_dir() / "tinymoe-upcycled-L1.safetensors");
  std::vector<matrix> ws;
  for (int e = 0; e < 8; ++e) ws.push_back(s2lc::load_matrix_f32(f, "layers.1.moe.experts." + std::to_string(e) + ".w1.weight"));
  return ws;
}

/// Deterministic approximately Gaussian [rows, cols] matrix (sum of uniforms).
matrix random_matrix(std::size_t rows, std::size_t cols, std::mt19937& rng, float scale) {
  matrix m = matrix::from_shape({rows, cols});
  for (auto& v : m) {
    double s = 0;
    for (int k = 0; k < 4; ++k) s += static_cast<double>(rng()) / 4294967296.0 - 0.5;
    v = static_cast<float>(s * 1.7320508) * scale;  // unit variance before `scale`
  }
  return m;
}

/// The sum of the cores on member e's path plus its residual.
matrix rebuild(const cz::Hed& h, std::uint32_t e) {
  matrix sum = h.residuals[e];
  for (int n : h.path(e)) sum += h.nodes[static_cast<std::size_t>(n)].core;
  return sum;
}

/// Structural invariants every decomposition satisfies.
void check_structure(const cz::Hed& h, std::size_t E) {
  REQUIRE(h.leaf.size() == E);
  REQUIRE(h.residuals.size() == E);
  REQUIRE(h.level_energy.size() == 3);
  for (std::size_t n = 0; n < h.nodes.size(); ++n) {
    const auto& node = h.nodes[n];
    CHECK(node.parent < static_cast<int>(n));
    CHECK(std::is_sorted(node.members.begin(), node.members.end()));
    if (node.parent >= 0) {
      const auto& up = h.nodes[static_cast<std::size_t>(node.parent)];
      CHECK(node.level > up.level);
      for (auto e : node.members) CHECK(std::find(up.members.begin(), up.members.end(), e) != up.members.end());
    }
  }
  for (std::uint32_t e = 0; e < E; ++e)
    for (int n : h.path(e)) {
      const auto& mem = h.nodes[static_cast<std::size_t>(n)].members;
      CHECK(std::find(mem.begin(), mem.end(), e) != mem.end());
    }
}

/// Energy bookkeeping: the levels and the residuals add up to the total.
void check_energy(const cz::Hed& h, const std::vector<matrix>& ws) {
  double total = 0, resid = 0;
  for (const auto& w : ws) total += sq_norm(w);
  for (const auto& r : h.residuals) resid += sq_norm(r);
  CHECK(std::fabs(h.total_energy - total) <= 1e-9 * total);
  CHECK(std::fabs(h.residual_energy - resid) <= 1e-9 * total);
  const double sum = h.level_energy[0] + h.level_energy[1] + h.level_energy[2] + h.residual_energy;
  CHECK(std::fabs(sum - h.total_energy) <= 1e-3 * h.total_energy);
}

std::set<std::vector<std::uint32_t>> clusters_at(const cz::Hed& h, int level) {
  std::set<std::vector<std::uint32_t>> out;
  for (const auto& n : h.nodes)
    if (n.level == level) out.insert(n.members);
  return out;
}

}  // namespace

TEST_CASE("compress: HED of the real w1 experts is exact, keeps its energy books, and the global core dominates") {
  const auto ws = fixture_w1();
  const auto h = cz::decompose(ws);
  check_structure(h, ws.size());
  check_energy(h, ws);

  double wmax = 0;
  for (const auto& w : ws) wmax = std::max(wmax, max_abs(w));
  for (std::uint32_t e = 0; e < ws.size(); ++e) {
    CAPTURE(e);
    CHECK(max_abs(matrix(rebuild(h, e) - ws[e])) <= 1e-5 * wmax);
  }

  // The global core: node 0, every member.
  REQUIRE_FALSE(h.nodes.empty());
  CHECK(h.nodes[0].level == 0);
  CHECK(h.nodes[0].parent == -1);
  CHECK(h.nodes[0].members.size() == ws.size());
  const double global = h.level_energy[0] / h.total_energy, residual = h.residual_energy / h.total_energy;
  INFO("fixture w1: global core " << global << ", cluster " << h.level_energy[1] / h.total_energy << ", subcluster "
                                     << h.level_energy[2] / h.total_energy << ", residual " << residual << " of the energy; "
                                     << h.nodes.size() << " nodes");
  CHECK(global > 0.90);  // upcycled experts: copies of one dense FFN, then briefly trained
  CHECK(residual > 0.01);
  CHECK(residual < 0.10);

  // Deterministic under its seed.
  const auto again = cz::decompose(ws);
  REQUIRE(again.nodes.size() == h.nodes.size());
  CHECK(again.leaf == h.leaf);
  for (std::size_t n = 0; n < h.nodes.size(); ++n) CHECK(again.nodes[n].members == h.nodes[n].members);
}

TEST_CASE("compress: HED finds exactly a planted 2-cluster partition") {
  std::mt19937 rng(42);
  const std::size_t rows = 24, cols = 40;
  const matrix common = random_matrix(rows, cols, rng, 3.0f);
  const matrix centers[2] = {random_matrix(rows, cols, rng, 1.0f), random_matrix(rows, cols, rng, 1.0f)};
  const int label[8] = {0, 1, 1, 0, 1, 0, 0, 1};  // interleaved, so index order gives nothing away
  std::vector<matrix> ws;
  for (int e = 0; e < 8; ++e) ws.push_back(matrix(common + centers[label[e]] + random_matrix(rows, cols, rng, 0.05f)));
  const std::set<std::vector<std::uint32_t>> planted = {{0, 3, 5, 6}, {1, 2, 4, 7}};

  SUBCASE("automatic levels") {
    const auto h = cz::decompose(ws);
    check_structure(h, ws.size());
    check_energy(h, ws);
    REQUIRE(h.nodes.size() == 3);  // global + 2 clusters; no subclusters in noise
    CHECK(h.nodes[0].level == 0);
    CHECK(clusters_at(h, 1) == planted);
    CHECK(clusters_at(h, 2).empty());
    CHECK(h.level_energy[2] == 0.0);
    for (std::uint32_t e = 0; e < 8; ++e) {
      REQUIRE(h.leaf[e] >= 1);
      const auto& leaf = h.nodes[static_cast<std::size_t>(h.leaf[e])];
      CHECK(leaf.level == 1);
      CHECK(leaf.parent == 0);
    }
    // The residuals are the noise: ~0.05^2 of unit-variance entries.
    const double noise = 8.0 * static_cast<double>(rows * cols) * 0.05 * 0.05;
    CHECK(h.residual_energy < 1.5 * noise);
    CHECK(h.residual_energy > 0.5 * noise);
  }
  SUBCASE("without the global core the clusters are found all the same") {
    cz::HedOptions opt;
    opt.global = 0;
    const auto h = cz::decompose(ws, opt);
    check_structure(h, ws.size());
    check_energy(h, ws);
    CHECK(h.level_energy[0] == 0.0);
    CHECK(clusters_at(h, 0).empty());
    CHECK(clusters_at(h, 1) == planted);
    for (const auto& n : h.nodes)
      if (n.level == 1) CHECK(n.parent == -1);
  }
  SUBCASE("clusters = 0: no cluster level, and so no subclusters") {
    cz::HedOptions opt;
    opt.clusters = 0;
    const auto h = cz::decompose(ws, opt);
    check_structure(h, ws.size());
    check_energy(h, ws);
    REQUIRE(h.nodes.size() == 1);
    CHECK(h.nodes[0].level == 0);
    CHECK(h.level_energy[1] == 0.0);
    CHECK(h.level_energy[2] == 0.0);
    for (std::uint32_t e = 0; e < 8; ++e) CHECK(h.leaf[e] == 0);
    for (std::uint32_t e = 0; e < 8; ++e) CHECK(max_abs(matrix(rebuild(h, e) - ws[e])) <= 1e-5 * max_abs(ws[e]));
  }
  SUBCASE("clusters = 2 asked for explicitly") {
    cz::HedOptions opt;
    opt.clusters = 2;
    opt.subclusters = 0;
    const auto h = cz::decompose(ws, opt);
    CHECK(clusters_at(h, 1) == planted);
    CHECK(clusters_at(h, 2).empty());
  }
}

TEST_CASE("compress: HED skips the global core of structureless members (their mean captures ~1/E)") {
  std::mt19937 rng(7);
  const std::size_t E = 8;
  std::vector<matrix> ws;
  for (std::size_t e = 0; e < E; ++e) ws.push_back(random_matrix(32, 48, rng, 1.0f));
  // What the mean would capture: about 1/E of the energy.
  matrix mean = xt::zeros<float>({32u, 48u});
  double total = 0;
  for (const auto& w : ws) mean += w, total += sq_norm(w);
  mean /= static_cast<float>(E);
  const double captured = static_cast<double>(E) * sq_norm(mean) / total;
  CHECK(captured > 0.5 / static_cast<double>(E));
  CHECK(captured < 1.5 / static_cast<double>(E));

  const auto h = cz::decompose(ws);
  check_structure(h, E);
  check_energy(h, ws);
  CHECK(clusters_at(h, 0).empty());
  CHECK(h.level_energy[0] == 0.0);
  // Nor any cluster: nothing but noise. The residuals are then the members themselves.
  CHECK(h.nodes.empty());
  for (std::uint32_t e = 0; e < E; ++e) {
    CHECK(h.leaf[e] == -1);
    CHECK(h.residuals[e] == ws[e]);
  }

  // Forced, the global core captures about 1/E.
  cz::HedOptions opt;
  opt.global = 1;
  opt.clusters = 0;
  const auto forced = cz::decompose(ws, opt);
  REQUIRE(forced.nodes.size() == 1);
  CHECK(std::fabs(forced.level_energy[0] / forced.total_energy - captured) < 1e-4);
}

TEST_CASE("compress: HED of a single member, and invalid groups") {
  std::mt19937 rng(3);
  const std::vector<matrix> one = {random_matrix(4, 5, rng, 1.0f)};
  const auto h = cz::decompose(one);
  check_energy(h, one);
  CHECK(h.nodes.size() <= 1);
  CHECK(max_abs(matrix(rebuild(h, 0) - one[0])) <= 1e-6);
  CHECK_THROWS_AS(cz::decompose({}), s2lc::invalid_argument);
  const std::vector<matrix> mixed = {random_matrix(4, 5, rng, 1.0f), random_matrix(5, 4, rng, 1.0f)};
  CHECK_THROWS_AS(cz::decompose(mixed), s2lc::invalid_argument);
}

}  // namespace suite_compress_hed
