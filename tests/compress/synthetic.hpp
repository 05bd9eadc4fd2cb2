// Expert groups for tests: a synthetic one (clusters, structure at several scales and blocks at
// the edges, small enough to compress in milliseconds; every block kind appears across the
// options of small_blocks / energy 1), and the real tinymoe layer-1 fixture's three groups.
#pragma once

#include <cstddef>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <xtensor-blas/xlinalg.hpp>

#include <s2lc/compress/compressor.hpp>
#include <s2lc/io/safetensors.hpp>
#include <s2lc/tensor.hpp>

#include "support.hpp"

namespace s2lc::test {

/// The in-repo tinymoe fixture's layer-1 expert groups (w1, w2, w3; 8 BF16 experts each), as the
/// pipeline would gather them.
inline std::vector<compress::GroupInput> tinymoe_l1_groups() {
  io::SafetensorsFile f(data_dir() / "tinymoe-upcycled-L1.safetensors");
  std::vector<compress::GroupInput> out;
  for (const char* role : {"w1", "w2", "w3"}) {
    compress::GroupInput g;
    g.name = std::string("layers.1.moe.experts.{E}.") + role + ".weight";
    g.type = dtype::bf16;
    for (int e = 0; e < 8; ++e) {
      g.member_names.push_back("layers.1.moe.experts." + std::to_string(e) + "." + role + ".weight");
      g.member_sources.push_back(0);
      g.weights.push_back(load_matrix_f32(f, g.member_names.back()));
    }
    out.push_back(std::move(g));
  }
  return out;
}

inline std::vector<compress::GroupInput> synthetic_groups(std::size_t rows = 40, std::size_t cols = 70) {
  std::mt19937 rng(5);
  auto gauss = [&](std::size_t r, std::size_t c, float scale) {
    matrix m = matrix::from_shape({r, c});
    for (auto& v : m) {
      double s = 0;
      for (int k = 0; k < 4; ++k) s += static_cast<double>(rng()) / 4294967296.0 - 0.5;
      v = static_cast<float>(s) * scale;
    }
    return m;
  };
  const matrix common = gauss(rows, cols, 1.0f);
  const matrix centers[2] = {gauss(rows, cols, 0.4f), gauss(rows, cols, 0.4f)};
  compress::GroupInput g;
  g.name = "synthetic.{E}.weight";
  g.type = dtype::f32;
  for (std::uint32_t e = 0; e < 6; ++e) {
    // A low-rank part (cheap as lowrank/shared blocks) and a little noise (dense).
    const matrix lr = xt::linalg::dot(gauss(rows, 2, 0.5f), gauss(2, cols, 0.5f));
    g.weights.push_back(matrix(common + centers[e % 2] + lr + gauss(rows, cols, 0.02f)));
    g.member_names.push_back("synthetic." + std::to_string(e) + ".weight");
    g.member_sources.push_back(0);
  }
  return {g};
}

inline compress::Options small_blocks(compress::Options opt) {
  opt.block_rows = 16;  // 40 x 70 -> a 3 x 3 grid with short edge blocks
  opt.block_cols = 32;
  opt.group = 16;
  opt.threads = 2;
  return opt;
}

}  // namespace s2lc::test
