// s2lc tools and benches: run the kernels on one SIMD target of the dispatch build (--target), to
// measure on this machine what an AVX2-only or SSE4 one gets from the same binary. The including
// TU must see the dispatch TU's HWY_WANT_AVX3_DL (s2lc::dynamic defines it), so that its
// HWY_TARGETS lists the same targets.
#pragma once

#include <cctype>
#include <cstdint>
#include <stdexcept>
#include <string>

#include <hwy/targets.h>

namespace s2lc::cli {

/// Highway's names of the targets runtime dispatch may pick here (compiled in and supported by
/// this CPU), best first, space-separated.
inline std::string dispatch_targets() {
  std::string names;
  for (const std::int64_t t : hwy::SupportedAndGeneratedTargets()) {
    if (!names.empty()) names += ' ';
    names += hwy::TargetName(t);  // (appending, not operator+: GCC 12's -Wrestrict false positive at -O3)
  }
  return names;
}

/// From now on, runtime dispatch runs `name` (Highway's target name, any case: avx3_dl, avx3,
/// avx2, sse4, ssse3, scalar) for the whole process: the supported targets become it and the
/// worse ones. Throws std::invalid_argument naming the targets available when `name` is not one
/// of them.
///
/// hwy::SetSupportedTargetsForTest, not hwy::DisableTargets: in Highway 1.0.3 (Debian 12) any
/// later hwy::SupportedTargets() call re-selects the best target despite DisableTargets (a test
/// program: dispatch gave AVX2 after DisableTargets, AVX3_DL once SupportedTargets() had run).
inline void limit_dispatch_target(const std::string& name) {
  std::string want = name;
  for (char& ch : want) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
  std::int64_t keep = 0;
  bool found = false;
  for (const std::int64_t t : hwy::SupportedAndGeneratedTargets()) {
    found = found || want == hwy::TargetName(t);
    if (found) keep |= t;  // best first: t and every target after it
  }
  if (!found)
    throw std::invalid_argument("--target " + name + ": not a target of this build on this CPU (available: " + dispatch_targets() + ")");
  hwy::SetSupportedTargetsForTest(keep);
}

}  // namespace s2lc::cli
