// s2lc — per-layer routing schedules (DynaMoE-style): how many experts a token may use and how
// much capacity each expert has, as a function of the layer.
//
//   s2lc::route::RoutingSchedule s;
//   s.max_k = {s2lc::route::Shape::pyramid, 1, 4};       // 1 expert at the ends, 4 mid-stack
//   s.capacity = {s2lc::route::Shape::descending, 1.0, 2.0};
//   s.top_p = {s2lc::route::Shape::uniform, 0.6, 0.6};
//   auto router = s.top_p_router(layer, n_layers);        // TopP{p, 1, max_k(layer)}
//   auto cap = s.capacity_for(layer, n_layers);           // Capacity{factor(layer)}
//
// Shapes, over layers l = 0 .. L-1 with x = l / (L - 1) (x = 0 when L = 1):
//   uniform     hi everywhere
//   descending  hi -> lo linearly        ascending  lo -> hi linearly
//   pyramid     lo at both ends, hi in the middle: lo + (hi - lo) * (1 - |2x - 1|)
//   wave        lo + (hi - lo) * (1 - cos(2 pi periods x)) / 2   (starts and ends at lo)
//   user        values[l] (one per layer)
#pragma once

#include <cmath>
#include <cstddef>
#include <string>
#include <vector>

#include "route/token.hpp"
#include "s2lc/error.hpp"

namespace s2lc::route {

enum class Shape { uniform, descending, ascending, pyramid, wave, user };

inline const char* shape_name(Shape s) noexcept {
  switch (s) {
    case Shape::uniform: return "uniform";
    case Shape::descending: return "descending";
    case Shape::ascending: return "ascending";
    case Shape::pyramid: return "pyramid";
    case Shape::wave: return "wave";
    case Shape::user: return "user";
  }
  return "?";
}

inline Shape parse_shape(const std::string& s) {
  for (Shape v : {Shape::uniform, Shape::descending, Shape::ascending, Shape::pyramid, Shape::wave, Shape::user})
    if (s == shape_name(v)) return v;
  throw invalid_argument("unknown schedule shape '" + s + "' (uniform, descending, ascending, pyramid, wave, user)");
}

/// One quantity as a function of the layer.
struct LayerSchedule {
  Shape shape = Shape::uniform;
  double lo = 1.0;
  double hi = 1.0;
  std::vector<double> values;  ///< Shape::user: one value per layer
  double periods = 1.0;        ///< Shape::wave

  double at(std::size_t layer, std::size_t n_layers) const {
    if (n_layers == 0 || layer >= n_layers)
      throw invalid_argument("schedule: layer " + std::to_string(layer) + " of " + std::to_string(n_layers));
    if (shape == Shape::user) {
      if (values.size() != n_layers)
        throw invalid_argument("schedule: user shape has " + std::to_string(values.size()) + " values for " + std::to_string(n_layers) +
                               " layers");
      return values[layer];
    }
    const double x = n_layers == 1 ? 0.0 : static_cast<double>(layer) / static_cast<double>(n_layers - 1);
    switch (shape) {
      case Shape::uniform: return hi;
      case Shape::descending: return hi + (lo - hi) * x;
      case Shape::ascending: return lo + (hi - lo) * x;
      case Shape::pyramid: return lo + (hi - lo) * (1.0 - std::fabs(2.0 * x - 1.0));
      case Shape::wave: return lo + (hi - lo) * 0.5 * (1.0 - std::cos(6.283185307179586 * periods * x));
      case Shape::user: break;
    }
    return hi;
  }
};

/// The routing quantities of one layer.
struct LayerRouting {
  std::size_t max_k = 2;       ///< experts per token at most (top-k's k, top-p's max_k)
  double capacity_factor = 1.25;
  double top_p = 1.0;
};

/// Per-layer schedules for the expert count, the capacity factor and top-p's threshold.
struct RoutingSchedule {
  LayerSchedule max_k{Shape::uniform, 2.0, 2.0, {}, 1.0};
  LayerSchedule capacity{Shape::uniform, 1.25, 1.25, {}, 1.0};
  LayerSchedule top_p{Shape::uniform, 1.0, 1.0, {}, 1.0};
  std::size_t min_k = 1;

  /// max_k is rounded to the nearest integer (ties up) and kept >= min_k.
  LayerRouting at(std::size_t layer, std::size_t n_layers) const {
    LayerRouting r;
    const double k = max_k.at(layer, n_layers);
    if (!std::isfinite(k)) throw invalid_argument("schedule: expert count is not finite at layer " + std::to_string(layer));
    r.max_k = std::max(min_k, static_cast<std::size_t>(std::max(0.0, std::floor(k + 0.5))));
    r.capacity_factor = capacity.at(layer, n_layers);
    r.top_p = top_p.at(layer, n_layers);
    if (!(r.capacity_factor > 0.0)) throw invalid_argument("schedule: capacity factor must be > 0 at layer " + std::to_string(layer));
    if (!(r.top_p >= 0.0)) throw invalid_argument("schedule: top_p must be >= 0 at layer " + std::to_string(layer));
    return r;
  }
  TopK top_k_router(std::size_t layer, std::size_t n_layers) const { return TopK{at(layer, n_layers).max_k, true}; }
  TopP top_p_router(std::size_t layer, std::size_t n_layers) const {
    const auto r = at(layer, n_layers);
    return TopP{r.top_p, std::min(min_k, r.max_k), r.max_k, true};
  }
  Capacity capacity_for(std::size_t layer, std::size_t n_layers, Overflow o = Overflow::drop, Priority p = Priority::token_order) const {
    return Capacity{at(layer, n_layers).capacity_factor, 1, o, p};
  }
};

}  // namespace s2lc::route
