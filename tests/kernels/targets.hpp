// Runs kernel tests on every SIMD target Highway compiled into the dispatch tables and this CPU
// supports (not only the best one), via hwy::SetSupportedTargetsForTest.
#pragma once

#include <cstdint>
#include <vector>

#include <hwy/targets.h>

namespace s2lc::test {

/// Targets to test: all compiled + supported ones (AVX3_DL, AVX3, AVX2, SSE4, SSSE3 and the
/// baseline EMU128/SCALAR on this machine).
inline std::vector<std::int64_t> compiled_targets() { return hwy::SupportedAndGeneratedTargets(); }

/// Restricts dispatch to one target for its lifetime.
class TargetScope {
 public:
  explicit TargetScope(std::int64_t target) { hwy::SetSupportedTargetsForTest(target); }
  ~TargetScope() { hwy::SetSupportedTargetsForTest(0); }
  TargetScope(const TargetScope&) = delete;
  TargetScope& operator=(const TargetScope&) = delete;
};

}  // namespace s2lc::test
