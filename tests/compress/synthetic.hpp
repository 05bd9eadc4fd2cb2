// Expert groups for tests: a synthetic one (clusters, structure at several scales and blocks at
// the edges, small enough to compress in milliseconds; every block kind appears across the
// options of small_blocks / energy 1), and the real tinymoe layer-1 fixture's three groups.
#pragma once

#include <cstddef>
#include <cstdint>
#include <exception>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include <xtensor-blas/xlinalg.hpp>

#include <s2lc/compress/artifact.hpp>
#include <s2lc/compress/compressor.hpp>
#include <s2lc/io/container.hpp>
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

/// What an artifact of `in` compressed in memory holds besides its groups: one source (no
/// metadata), every member of every group as a tensor of that group, in group order.
inline compress::ArtifactContents member_contents(const std::vector<compress::GroupInput>& in, std::string source) {
  compress::ArtifactContents contents;
  contents.sources = {std::move(source)};
  contents.metadata.emplace_back();
  for (std::size_t g = 0; g < in.size(); ++g)
    for (std::size_t e = 0; e < in[g].member_names.size(); ++e) {
      compress::TensorEntry t;
      t.name = in[g].member_names[e];
      t.type = in[g].type;
      t.shape = {in[g].weights[e].shape(0), in[g].weights[e].shape(1)};
      t.group = static_cast<int>(g);
      t.member = static_cast<std::uint32_t>(e);
      contents.tensors.push_back(t);
    }
  return contents;
}

/// tinymoe_l1_groups() compressed at ratio 8 in 256 x 256 blocks, or in 100 x 90 blocks with
/// `odd_blocks` (edge blocks, partial quantization groups), as read back from its artifact.
///
/// Compressing takes about 1 s (5 s under ASan), and about 20 cases need it, each in a process of
/// its own (CTest runs one case per process). So the artifact is kept in S2LC_TEST_CACHE_DIR
/// (the build tree) under a name holding the program's name, size and modification time: a
/// rebuilt program never reads an artifact an older build wrote, and the older ones are deleted.
/// Every process, the one that compressed included, uses the groups read back from the artifact's
/// bytes, so which process compressed changes nothing; two that compress at once write the same
/// bytes (compression is deterministic, and the write is atomic).
inline compress::Compressed tinymoe_l1_compressed(bool odd_blocks) {
  namespace fs = std::filesystem;
  const std::string what = odd_blocks ? "tinymoe-l1-r8-100x90" : "tinymoe-l1-r8-256x256";
  fs::path cached;
#ifdef S2LC_TEST_CACHE_DIR
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    const auto size = fs::file_size(exe, ec);
    const auto stamp = fs::last_write_time(exe, ec).time_since_epoch().count();
    if (!ec) {
      const std::string prefix = exe.filename().string() + "-" + what + "-";
      cached = fs::path(S2LC_TEST_CACHE_DIR) / (prefix + std::to_string(size) + "-" + std::to_string(static_cast<unsigned long long>(stamp)) + ".s2lc");
      if (!fs::exists(cached)) {  // older builds' artifacts go (not this one's: another process may have just written it)
        fs::create_directories(cached.parent_path(), ec);
        for (const auto& f : fs::directory_iterator(cached.parent_path(), ec))
          if (f.path().filename().string().starts_with(prefix) && f.path().filename() != cached.filename()) fs::remove(f.path(), ec);
      }
    }
  }
#endif
  std::vector<std::byte> bytes;
  std::string label = what;  // a damaged cached artifact fails with its path (delete it to recompress)
  if (!cached.empty() && fs::exists(cached)) bytes = read_bytes(cached), label = cached.string();
  if (bytes.empty()) {
    label = what;
    const auto in = tinymoe_l1_groups();
    compress::Options opt;
    opt.ratio = 8;
    opt.threads = 2;
    if (odd_blocks) opt.block_rows = 100, opt.block_cols = 90;
    io::ContainerBuilder b;
    compress::build_artifact(b, compress::compress(in, opt), member_contents(in, "tinymoe-upcycled-L1.safetensors"));
    bytes = b.to_bytes();
    if (!cached.empty()) {
      try {
        b.write(cached);
      } catch (const std::exception&) {  // a read-only build tree: the cache only saves time
      }
    }
  }
  const compress::Artifact a(bytes, label);
  compress::Compressed out;
  out.groups = a.groups();
  for (const auto& g : out.groups)
    out.original_bytes += static_cast<double>(g.residuals.size() * g.grid.rows * g.grid.cols * dtype_size(g.type));
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
