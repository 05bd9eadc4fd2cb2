// s2lc::compress — the in-memory compressed representation of a group (a layer's experts, or
// same-named domain modules) and its exact, deterministic reconstruction.
//
// A group of E members [rows, cols] is stored as HED cores (s2lc/compress/hed.hpp) plus one
// residual per member. Every core and residual is a grid of blocks [block_rows, block_cols]
// (edge blocks smaller); each block is one of
//
//   zero     dropped (block-sparse)
//   dense    group-quantized values                        a = Q(B)              [rb, cb]
//   lowrank  left factor (stored transposed) and right     B ~ a^T b,  a [r, rb], b [r, cb]
//   shared   coefficients on a basis shared by the members B ~ U_r^T b, U = bases[basis] [R, rb], b [r, cb]
//            of a core node (r <= R: members keep the leading r basis vectors they need)
//   raw      f32 values, lossless: in a core, the core's values; in a member's residual, the
//            member's ORIGINAL values, which replace the cores' sum in that block (C + (W - C) in
//            f32 is not always W: weights of 1e-8 beside core values of 0.05 would come back off)
//
// Factors and coefficients are QMatrix (bit-nested codes, s2lc/compress/quant.hpp), so every
// quantized block can also be read at a lower tier.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "s2lc/compress/quant.hpp"
#include "s2lc/dtype.hpp"
#include "s2lc/error.hpp"
#include "s2lc/tensor.hpp"

namespace s2lc::compress {

enum class block_kind : std::uint8_t { zero = 0, dense = 1, lowrank = 2, shared = 3, raw = 4 };

inline constexpr const char* block_kind_name(block_kind k) noexcept {
  switch (k) {
    case block_kind::zero: return "zero";
    case block_kind::dense: return "dense";
    case block_kind::lowrank: return "lowrank";
    case block_kind::shared: return "shared";
    case block_kind::raw: return "raw";
  }
  return "?";
}

struct Block {
  block_kind kind = block_kind::zero;
  std::uint32_t rank = 0;    ///< lowrank / shared
  std::uint32_t basis = 0;   ///< shared: index into CompressedGroup::bases
  QMatrix a, b;
  std::vector<float> raw;

  /// Bytes of payload (codes, scales, raw values).
  std::size_t payload_bytes() const noexcept {
    switch (kind) {
      case block_kind::zero: return 0;
      case block_kind::dense: return a.storage_bytes();
      case block_kind::lowrank: return a.storage_bytes() + b.storage_bytes();
      case block_kind::shared: return b.storage_bytes();
      case block_kind::raw: return raw.size() * sizeof(float);
    }
    return 0;
  }
};

/// A [rows, cols] matrix stored as a grid of blocks.
struct BlockMatrix {
  std::vector<Block> blocks;  ///< row-major over the grid
};

/// A basis shared by the members of a core node for one block position: rows are basis vectors.
struct Basis {
  std::uint32_t node = 0;   ///< owning HED node
  std::uint32_t block = 0;  ///< block index in the grid
  QMatrix u;                ///< [R, rb]
};

struct GridShape {
  std::size_t rows = 0, cols = 0, block_rows = 0, block_cols = 0;
  std::size_t grid_rows() const noexcept { return (rows + block_rows - 1) / block_rows; }
  std::size_t grid_cols() const noexcept { return (cols + block_cols - 1) / block_cols; }
  std::size_t blocks() const noexcept { return grid_rows() * grid_cols(); }
  std::size_t r0(std::size_t b) const noexcept { return (b / grid_cols()) * block_rows; }
  std::size_t c0(std::size_t b) const noexcept { return (b % grid_cols()) * block_cols; }
  std::size_t rb(std::size_t b) const noexcept { return std::min(block_rows, rows - r0(b)); }
  std::size_t cb(std::size_t b) const noexcept { return std::min(block_cols, cols - c0(b)); }
};

struct CoreNode {
  int level = 0;
  int parent = -1;
  std::vector<std::uint32_t> members;
  BlockMatrix core;
};

/// Per-group statistics reported by the compressor (Frobenius unless noted).
struct GroupStats {
  double total_energy = 0;                 ///< sum ||W_e||^2
  std::vector<double> level_energy;        ///< captured by the global / cluster / subcluster cores
  double residual_energy = 0;              ///< left in the residuals
  double est_error = 0;                    ///< allocator's estimate of the (weighted) squared error
  double reference = 0;                    ///< the error's reference: sum ||W_e||^2 or sum ||W_e X_e||^2
  std::size_t blocks_by_kind[5] = {0, 0, 0, 0, 0};
};

struct CompressedGroup {
  std::string name;                         ///< pattern, e.g. "layers.1.moe.experts.{E}.w1.weight"
  std::vector<std::string> member_names;    ///< tensor names
  std::vector<std::uint32_t> member_sources;///< input file index of each member
  dtype type = dtype::f32;                  ///< original dtype of the members
  GridShape grid;
  unsigned group_size = 32;                 ///< quantization group
  std::vector<CoreNode> nodes;
  std::vector<int> leaf;                    ///< deepest node of each member (-1: none)
  std::vector<BlockMatrix> residuals;       ///< one per member
  std::vector<Basis> bases;
  GroupStats stats;

  std::size_t payload_bytes() const noexcept {
    std::size_t n = 0;
    for (const auto& nd : nodes)
      for (const auto& b : nd.core.blocks) n += b.payload_bytes();
    for (const auto& r : residuals)
      for (const auto& b : r.blocks) n += b.payload_bytes();
    for (const auto& b : bases) n += b.u.storage_bytes();
    return n;
  }
};

/// The compressor's result.
struct Compressed {
  std::vector<CompressedGroup> groups;
  double original_bytes = 0;  ///< bytes of every member tensor in its original dtype
};

namespace detail {

/// out[rb, cb] (row stride `ld`) += decoded block.
inline void accumulate_block(const CompressedGroup& g, const Block& blk, std::size_t rb, std::size_t cb, float* out,
                             std::size_t ld, unsigned tier) {
  auto tier_of = [&](const QMatrix& q) { return tier == 0 ? 0u : std::min<unsigned>(tier, q.bits); };
  switch (blk.kind) {
    case block_kind::zero: return;
    case block_kind::raw:
      for (std::size_t i = 0; i < rb; ++i)
        for (std::size_t j = 0; j < cb; ++j) out[i * ld + j] += blk.raw[i * cb + j];
      return;
    case block_kind::dense: {
      std::vector<float> row(cb);
      for (std::size_t i = 0; i < rb; ++i) {
        dequantize_row(blk.a, i, row.data(), tier_of(blk.a));
        for (std::size_t j = 0; j < cb; ++j) out[i * ld + j] += row[j];
      }
      return;
    }
    case block_kind::lowrank:
    case block_kind::shared: {
      const QMatrix& left = blk.kind == block_kind::lowrank ? blk.a : g.bases[blk.basis].u;
      std::vector<float> l(rb), r(cb);
      // Fixed summation order (k ascending, then i, j): bit-reproducible on every machine.
      for (std::size_t k = 0; k < blk.rank; ++k) {
        dequantize_row(left, k, l.data(), tier_of(left));
        dequantize_row(blk.b, k, r.data(), tier_of(blk.b));
        for (std::size_t i = 0; i < rb; ++i) {
          const float li = l[i];
          float* o = out + i * ld;
          for (std::size_t j = 0; j < cb; ++j) o[j] += li * r[j];
        }
      }
      return;
    }
  }
}

inline void accumulate(const CompressedGroup& g, const BlockMatrix& m, float* out, unsigned tier, bool residual) {
  for (std::size_t b = 0; b < g.grid.blocks(); ++b) {
    float* o = out + g.grid.r0(b) * g.grid.cols + g.grid.c0(b);
    if (residual && m.blocks[b].kind == block_kind::raw)  // the member's own values: replace
      for (std::size_t i = 0; i < g.grid.rb(b); ++i)
        for (std::size_t j = 0; j < g.grid.cb(b); ++j) o[i * g.grid.cols + j] = 0.0f;
    accumulate_block(g, m.blocks[b], g.grid.rb(b), g.grid.cb(b), o, g.grid.cols, tier);
  }
}

}  // namespace detail

/// Member e's reconstruction in f32: its cores (root first), then its residual, summed in a fixed
/// order. `tier` (0 = as stored) reads every quantized payload at min(tier, its bits).
inline matrix reconstruct(const CompressedGroup& g, std::uint32_t e, unsigned tier = 0) {
  if (e >= g.residuals.size()) throw invalid_argument("reconstruct: member " + std::to_string(e) + " out of range");
  if (tier != 0 && !valid_bits(tier)) throw invalid_argument("reconstruct: tier must be 2 to 8");
  matrix out = xt::zeros<float>({g.grid.rows, g.grid.cols});
  std::vector<int> path;
  for (int n = g.leaf[e]; n >= 0; n = g.nodes[static_cast<std::size_t>(n)].parent) path.push_back(n);
  for (auto it = path.rbegin(); it != path.rend(); ++it) detail::accumulate(g, g.nodes[static_cast<std::size_t>(*it)].core, out.data(), tier, false);
  detail::accumulate(g, g.residuals[e], out.data(), tier, true);
  return out;
}

}  // namespace s2lc::compress
