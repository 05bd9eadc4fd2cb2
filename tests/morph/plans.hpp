// Dispatch plans for the morph tests.
#pragma once

#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>

#include <s2lc/plan.hpp>

namespace s2lc::test {

/// A top-2 plan over `experts` with deterministic pseudo-random choices (two distinct experts per
/// token) and gates g, 1 - g with g in [0.3, 0.7).
inline DispatchPlan top2_plan(std::size_t experts, std::size_t tokens, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<std::int32_t> ids(tokens * 2);
  std::vector<float> gates(tokens * 2);
  for (std::size_t t = 0; t < tokens; ++t) {
    const auto a = static_cast<std::int32_t>(rng() % experts);
    auto b = static_cast<std::int32_t>(rng() % experts);
    if (b == a) b = (a + 1) % static_cast<std::int32_t>(experts);
    const float g = 0.3f + 0.4f * static_cast<float>(rng() % 1000) / 1000.0f;
    ids[2 * t] = a, ids[2 * t + 1] = b, gates[2 * t] = g, gates[2 * t + 1] = 1.0f - g;
  }
  return DispatchPlan::from_topk(experts, tokens, 2, ids.data(), gates.data());
}

}  // namespace s2lc::test
