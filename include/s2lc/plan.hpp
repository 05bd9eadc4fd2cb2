// s2lc — the dispatch plan: which tokens each expert of a layer processes, with their gate
// weights. Routers (include/route) produce it; grouped apply (include/morph/grouped.hpp) consumes it.
//
// Compact CSR over experts: expert e handles tokens token[offsets[e] .. offsets[e + 1]) with the
// matching gate weights. A token may appear under several experts (top-k) but at most once per
// expert. Order inside an expert is the order outputs are accumulated in (results do not depend
// on the number of threads).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "s2lc/error.hpp"

namespace s2lc {

struct DispatchPlan {
  std::size_t n_tokens = 0;              ///< tokens in the batch
  std::vector<std::uint32_t> offsets;    ///< n_experts + 1 entries, offsets[0] = 0
  std::vector<std::uint32_t> token;      ///< token indices (< n_tokens)
  std::vector<float> gate;               ///< one weight per entry of `token`

  std::size_t n_experts() const noexcept { return offsets.empty() ? 0 : offsets.size() - 1; }
  std::size_t count(std::size_t e) const noexcept { return offsets[e + 1] - offsets[e]; }
  std::size_t routed() const noexcept { return token.size(); }

  /// An empty plan for `experts` experts over `tokens` tokens; fill with `add` in expert order.
  static DispatchPlan empty(std::size_t experts, std::size_t tokens) {
    DispatchPlan p;
    p.n_tokens = tokens;
    p.offsets.assign(experts + 1, 0);
    return p;
  }

  /// Builds the plan from per-token choices: experts[t * k + j] with gates[t * k + j] (top-k).
  /// Negative expert ids are skipped (dropped by capacity).
  static DispatchPlan from_topk(std::size_t experts, std::size_t tokens, std::size_t k, const std::int32_t* ids,
                                const float* gates) {
    DispatchPlan p = empty(experts, tokens);
    for (std::size_t i = 0; i < tokens * k; ++i) {
      if (ids[i] < 0) continue;
      if (static_cast<std::size_t>(ids[i]) >= experts)
        throw invalid_argument("dispatch plan: expert " + std::to_string(ids[i]) + " out of range (" + std::to_string(experts) + " experts)");
      ++p.offsets[static_cast<std::size_t>(ids[i]) + 1];
    }
    for (std::size_t e = 0; e < experts; ++e) p.offsets[e + 1] += p.offsets[e];
    p.token.resize(p.offsets[experts]);
    p.gate.resize(p.offsets[experts]);
    std::vector<std::uint32_t> fill(p.offsets.begin(), p.offsets.end() - 1);
    for (std::size_t t = 0; t < tokens; ++t)
      for (std::size_t j = 0; j < k; ++j) {
        const std::int32_t e = ids[t * k + j];
        if (e < 0) continue;
        const std::uint32_t at = fill[static_cast<std::size_t>(e)]++;
        p.token[at] = static_cast<std::uint32_t>(t);
        p.gate[at] = gates[t * k + j];
      }
    p.validate();
    return p;
  }

  /// Throws invalid_argument naming the first inconsistency. With check_duplicates = false (what
  /// the apply paths use: no allocation), a token listed twice under one expert is not detected.
  void validate(bool check_duplicates = true) const {
    if (offsets.empty() || offsets.front() != 0) throw invalid_argument("dispatch plan: offsets must start at 0");
    for (std::size_t e = 0; e + 1 < offsets.size(); ++e)
      if (offsets[e + 1] < offsets[e]) throw invalid_argument("dispatch plan: offsets decrease at expert " + std::to_string(e));
    if (offsets.back() != token.size() || gate.size() != token.size())
      throw invalid_argument("dispatch plan: offsets, token and gate sizes disagree");
    std::vector<std::uint32_t> seen(check_duplicates ? n_tokens : 0, 0xFFFFFFFFu);
    for (std::size_t e = 0; e + 1 < offsets.size(); ++e)
      for (std::size_t i = offsets[e]; i < offsets[e + 1]; ++i) {
        if (token[i] >= n_tokens)
          throw invalid_argument("dispatch plan: expert " + std::to_string(e) + " has token " + std::to_string(token[i]) +
                                 " of a batch of " + std::to_string(n_tokens));
        if (check_duplicates) {
          if (seen[token[i]] == e)
            throw invalid_argument("dispatch plan: expert " + std::to_string(e) + " lists token " + std::to_string(token[i]) + " twice");
          seen[token[i]] = static_cast<std::uint32_t>(e);
        }
        if (!std::isfinite(gate[i])) throw invalid_argument("dispatch plan: gate of expert " + std::to_string(e) + " is not finite");
      }
  }
};

}  // namespace s2lc
