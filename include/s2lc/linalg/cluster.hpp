// s2lc::linalg — k-means clustering of row vectors (e.g. flattened experts), k-means++ seeding,
// Lloyd iterations; deterministic under a seed, ties broken towards the lower index.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "s2lc/error.hpp"
#include "s2lc/tensor.hpp"

namespace s2lc::linalg {

struct KMeans {
  std::vector<std::size_t> labels;  ///< cluster of each row
  matrix centroids;                 ///< [k, d]
  double inertia = 0;               ///< sum of squared distances to the assigned centroid
  std::size_t iterations = 0;
};

namespace detail {
inline double sq_dist(const float* a, const float* b, std::size_t d) {
  double s = 0;
  for (std::size_t i = 0; i < d; ++i) {
    const double t = static_cast<double>(a[i]) - b[i];
    s += t * t;
  }
  return s;
}
}  // namespace detail

/// Clusters the rows of X [n, d] into k groups. Empty clusters are re-seeded with the point
/// farthest from its centroid.
inline KMeans kmeans(const matrix& X, std::size_t k, std::uint64_t seed = 1, std::size_t max_iter = 100) {
  const std::size_t n = X.shape()[0], d = X.shape()[1];
  if (k == 0 || k > n) throw invalid_argument("kmeans: need 1 <= k <= number of rows (k=" + std::to_string(k) + ", rows=" + std::to_string(n) + ")");
  const float* x = X.data();
  KMeans out;
  out.centroids = matrix::from_shape({k, d});
  std::mt19937_64 rng(seed);

  // k-means++ seeding.
  std::vector<double> dist(n, std::numeric_limits<double>::infinity());
  std::size_t first = static_cast<std::size_t>(rng() % n);
  std::copy(x + first * d, x + (first + 1) * d, out.centroids.data());
  for (std::size_t c = 1; c < k; ++c) {
    double total = 0;
    for (std::size_t i = 0; i < n; ++i) {
      dist[i] = std::min(dist[i], detail::sq_dist(x + i * d, out.centroids.data() + (c - 1) * d, d));
      total += dist[i];
    }
    std::size_t pick = 0;
    if (total > 0) {
      double r = std::uniform_real_distribution<double>(0.0, total)(rng);
      for (pick = 0; pick + 1 < n; ++pick) {
        r -= dist[pick];
        if (r < 0 && dist[pick] > 0) break;
      }
    }
    std::copy(x + pick * d, x + (pick + 1) * d, out.centroids.data() + c * d);
  }

  out.labels.assign(n, 0);
  std::vector<double> best(n);
  std::vector<double> sum(k * d);
  std::vector<std::size_t> count(k);
  for (out.iterations = 1; out.iterations <= max_iter; ++out.iterations) {
    bool changed = false;
    for (std::size_t i = 0; i < n; ++i) {
      std::size_t arg = 0;
      double bd = std::numeric_limits<double>::infinity();
      for (std::size_t c = 0; c < k; ++c) {
        const double dd = detail::sq_dist(x + i * d, out.centroids.data() + c * d, d);
        if (dd < bd) {
          bd = dd;
          arg = c;
        }
      }
      best[i] = bd;
      if (arg != out.labels[i]) {
        out.labels[i] = arg;
        changed = true;
      }
    }
    // Update step (double accumulation).
    std::fill(sum.begin(), sum.end(), 0.0);
    std::fill(count.begin(), count.end(), std::size_t{0});
    for (std::size_t i = 0; i < n; ++i) {
      ++count[out.labels[i]];
      for (std::size_t j = 0; j < d; ++j) sum[out.labels[i] * d + j] += x[i * d + j];
    }
    for (std::size_t c = 0; c < k; ++c) {
      if (count[c] == 0) {  // re-seed with the worst-served point
        std::size_t far = 0;
        for (std::size_t i = 1; i < n; ++i)
          if (best[i] > best[far]) far = i;
        std::copy(x + far * d, x + (far + 1) * d, out.centroids.data() + c * d);
        best[far] = 0;
        changed = true;
        continue;
      }
      for (std::size_t j = 0; j < d; ++j) out.centroids.data()[c * d + j] = static_cast<float>(sum[c * d + j] / static_cast<double>(count[c]));
    }
    if (!changed && out.iterations > 1) break;
  }
  out.iterations = std::min(out.iterations, max_iter);
  out.inertia = 0;
  for (std::size_t i = 0; i < n; ++i) out.inertia += detail::sq_dist(x + i * d, out.centroids.data() + out.labels[i] * d, d);
  return out;
}

}  // namespace s2lc::linalg
