// s2lc — configuration: version and the S2LC_ configuration macros.
#pragma once

#define S2LC_VERSION_MAJOR 0
#define S2LC_VERSION_MINOR 1
#define S2LC_VERSION_PATCH 0
#define S2LC_VERSION_STRING "0.1.0"

// S2LC_DYNAMIC_DISPATCH (default 0): when 1, the SIMD kernels are plain declarations and the
// per-target code plus Highway's dispatch tables live in exactly one translation unit that does
//   #define S2LC_IMPLEMENTATION
//   #include <s2lc/dispatch.hpp>
// (CMake: link s2lc::dynamic and add that file; links libhwy). One binary then runs the best of
// AVX-512/AVX2/SSE4/scalar on whatever CPU it finds. When 0, kernels are compiled inline for the
// target selected by the including TU's compiler flags (-mavx2 ...; none: baseline SSE2/scalar).
#ifndef S2LC_DYNAMIC_DISPATCH
#define S2LC_DYNAMIC_DISPATCH 0
#endif

// Highway 1.0.3 (Debian 12) stops with "#error Logic error: best baseline should be included in
// dynamic targets" wherever the compile flags enable its AVX3_DL target (e.g. -march=native on
// Sapphire Rapids or Zen 4 and later), unless HWY_WANT_AVX3_DL is defined: its test of the
// baseline reads an undefined macro. Defined here for such flags, before any Highway header, so
// a static (header-only) build with them compiles; it could not have compiled without.
#if !defined(HWY_WANT_AVX3_DL) && defined(__AVX512F__) && defined(__AVXVNNI__) && defined(__VAES__) && \
    defined(__VPCLMULQDQ__) && defined(__AVX512VBMI__) && defined(__AVX512VBMI2__) &&                \
    defined(__AVX512VPOPCNTDQ__) && defined(__AVX512BITALG__)
#define HWY_WANT_AVX3_DL 1
#endif

#define S2LC_DETAIL_CAT_(a, b) a##b
#define S2LC_DETAIL_CAT(a, b) S2LC_DETAIL_CAT_(a, b)

namespace s2lc {

struct version_info {
  int major, minor, patch;
  const char* string;
};

inline constexpr version_info version{S2LC_VERSION_MAJOR, S2LC_VERSION_MINOR, S2LC_VERSION_PATCH,
                                      S2LC_VERSION_STRING};

}  // namespace s2lc
