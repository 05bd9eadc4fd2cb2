// s2lc::kernels — CPU features the kernels use beyond what their Highway target implies, and the
// output size from which bulk conversions bypass the caches.
//
// Highway 1.0.3's best x86 target (AVX3_DL: AVX-512 with VNNI, VBMI2, BITALG) has no
// AVX512_BF16, which Zen 4/5 and Sapphire Rapids and later have. Its `vcvtneps2bf16` rounds f32 to
// bf16 in one instruction, where the portable kernels spend nine integer operations. The AVX3_DL
// merge kernels and the bulk f32 -> bf16 conversion check for it once at run time and take it
// when present (see S2LC_BF16_NE in convert-inl.h); the results are bit-identical either way.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

#include <hwy/detect_targets.h>  // HWY_AVX2, HWY_AVX3, HWY_AVX3_DL (vnni_on_target)

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#define S2LC_CPU_X86 1
#else
#define S2LC_CPU_X86 0
#endif
#if S2LC_CPU_X86 && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace s2lc::kernels {

namespace detail {
/// Bit `bit` of register `reg` (0: EAX, 1: EBX, 2: ECX, 3: EDX) of CPUID leaf 7, subleaf `sub`;
/// false where the CPU has no such subleaf (or is not x86).
inline bool cpuid7_bit(unsigned sub, unsigned reg, unsigned bit) noexcept {
#if S2LC_CPU_X86
  unsigned r[4] = {};
  if (!__get_cpuid_count(7, 0, &r[0], &r[1], &r[2], &r[3]) || r[0] < sub) return false;  // r[0]: the highest subleaf
  if (sub != 0 && !__get_cpuid_count(7, sub, &r[0], &r[1], &r[2], &r[3])) return false;
  return (r[reg] >> bit & 1u) != 0;
#else
  (void)sub, (void)reg, (void)bit;
  return false;
#endif
}
}  // namespace detail

/// Whether this CPU executes AVX512_BF16 (CPUID leaf 7, subleaf 1, EAX bit 5). The OS support of
/// the AVX-512 state is Highway's check: the kernels ask only inside its AVX3_DL target.
inline bool cpu_has_avx512_bf16() noexcept {
  static const bool has = detail::cpuid7_bit(1, 0, 5);
  return has;
}

/// Bytes of output from which kernels::f32_to_bf16 and f32_to_f16 (convert.hpp) store with non-temporal hints,
/// as memcpy does for large copies: such an output would not stay in a core's share of the last
/// level cache anyway, and streaming it saves reading every line before writing it. (The OS's
/// cache sizes are no guide in a VM: this one reports the host's 512 MB of L3, a core sees 32.)
inline constexpr std::size_t kStreamStoreBytes = std::size_t{8} << 20;

namespace detail {
/// 2 KB on Intel CPUs, else 8 KB (kPrefetchAhead).
inline std::size_t detect_prefetch_ahead() noexcept {
#if S2LC_CPU_X86
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid(0, &a, &b, &c, &d) && b == 0x756e6547u && d == 0x49656e69u && c == 0x6c65746eu) return 2048;  // "GenuineIntel"
#endif
  return 8192;
}
}  // namespace detail

/// Bytes ahead of what they read that the kernels prefetch a cold expert's codes, scales and
/// factors (its arrays lie one after another in its pool, so this reaches into the next block's).
/// The best distance depends on the memory system: on a Zen 5 host 8 KB (4 KB was 10-15 % slower
/// at one token cold, 16-32 KB the same, no prefetch 1.6x); on an Intel Xeon with AMX (a Sapphire
/// Rapids class VM, one core streaming ~15 GB/s) 2 KB, where 8 KB made a 2048 x 1408 one-token
/// apply 6-10 % slower cold and 24 KB 15 % (bench/RESULTS.md, "The prefetch distance per CPU").
/// So it is read once from CPUID at start-up: 2 KB on Intel, 8 KB on every other CPU. Define
/// S2LC_PREFETCH_AHEAD (bytes) to fix it at compile time for another host. Results never depend
/// on it. (A kernel called from another TU's static initializer, before this one's, sees 0:
/// prefetches of what it reads anyway.)
#ifdef S2LC_PREFETCH_AHEAD
inline constexpr std::size_t kPrefetchAhead = S2LC_PREFETCH_AHEAD;
#else
inline const std::size_t kPrefetchAhead = detail::detect_prefetch_ahead();
#endif

namespace detail {
inline std::atomic<bool>& avx512_bf16_allowed() noexcept {
  static std::atomic<bool> allowed{true};
  return allowed;
}
}  // namespace detail

/// For tests and benches, like hwy::SetSupportedTargetsForTest: false makes the AVX3_DL kernels
/// round to bf16 in integer arithmetic on this CPU too, so both paths can be checked and timed
/// in one process. Process-wide; results do not change, only speed.
inline void allow_avx512_bf16(bool allow) noexcept { detail::avx512_bf16_allowed().store(allow, std::memory_order_relaxed); }

/// Whether the AVX3_DL kernels use AVX512_BF16 instructions: the CPU has them and
/// allow_avx512_bf16(false) is not in effect.
inline bool use_avx512_bf16() noexcept { return cpu_has_avx512_bf16() && detail::avx512_bf16_allowed().load(std::memory_order_relaxed); }

/// Whether this CPU executes AVX-VNNI (VEX-encoded vpdpbusd / vpdpwssd on 256-bit vectors; CPUID
/// leaf 7, subleaf 1, EAX bit 4): Intel client cores from Alder Lake and E-core Xeons, which have
/// no AVX-512, and AMD Zen 5. Highway 1.0.3's AVX2 target does not assume it; its int8 kernels
/// check once at run time (use_vnni) and take it when present.
inline bool cpu_has_avx_vnni() noexcept {
  static const bool has = detail::cpuid7_bit(1, 0, 4);
  return has;
}

/// Whether this CPU executes AVX512_VNNI (CPUID leaf 7, subleaf 0, ECX bit 11). Highway 1.0.3
/// picks its AVX3 target, not AVX3_DL, on Cascade Lake and Cooper Lake (AVX512_VNNI but no
/// VBMI2 / BITALG); the AVX3 int8 kernels check for it once at run time (use_vnni).
inline bool cpu_has_avx512_vnni() noexcept {
  static const bool has = detail::cpuid7_bit(0, 2, 11);
  return has;
}

namespace detail {
inline std::atomic<bool>& vnni_allowed() noexcept {
  static std::atomic<bool> allowed{true};
  return allowed;
}
}  // namespace detail

/// For tests and benches: false makes the AVX2 and AVX3 int8 kernels use pmaddubsw + pmaddwd
/// where the CPU has AVX-VNNI or AVX512_VNNI, so both paths can be checked and timed in one
/// process. Process-wide; the integer sums, and so the results, are the same either way. (AVX3_DL
/// implies VNNI and always uses it.)
inline void allow_vnni(bool allow) noexcept { detail::vnni_allowed().store(allow, std::memory_order_relaxed); }

/// Whether the int8 kernels of Highway's AVX2 target (avx512 false) or AVX3 target (true) use
/// vpdpbusd / vpdpwssd: the CPU has AVX-VNNI (AVX2) or AVX512_VNNI (AVX3) and allow_vnni(false)
/// is not in effect.
inline bool use_vnni(bool avx512) noexcept {
  return (avx512 ? cpu_has_avx512_vnni() : cpu_has_avx_vnni()) && detail::vnni_allowed().load(std::memory_order_relaxed);
}

/// Whether the int8 kernels use VNNI when Highway target t (a HWY_* target bit) runs them:
/// always on AVX3_DL, on AVX2 / AVX3 as use_vnni says (kernels::vnni_in_use asks it for the
/// target that runs; a caller without dispatched kernels, for the target it knows runs).
inline bool vnni_on_target(std::int64_t t) noexcept {
  return t == HWY_AVX3_DL || ((t == HWY_AVX2 || t == HWY_AVX3) && use_vnni(t == HWY_AVX3));
}

namespace detail {
/// CPUID says AMX-TILE, AMX-BF16, AVX512F/BW/VL/VBMI; the OS enables the AVX-512 and tile state
/// (XCR0 bits 1, 2, 5-7, 17, 18); and Linux grants this process the tile data.
inline bool amx_bf16_setup() noexcept {
#if S2LC_CPU_X86 && defined(__linux__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool cpu = (d >> 24 & 1u) && (d >> 22 & 1u) && (b >> 16 & 1u) && (b >> 30 & 1u) && (b >> 31 & 1u) && (c >> 1 & 1u);
  if (!cpu) return false;
  __get_cpuid(1, &a, &b, &c, &d);
  if (!(c >> 27 & 1u)) return false;  // OSXSAVE
  unsigned lo = 0, hi = 0;
  asm volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  const unsigned want = (1u << 1) | (1u << 2) | (7u << 5) | (3u << 17);
  if ((lo & want) != want) return false;
  constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
#else
  return false;
#endif
}
inline std::atomic<bool>& amx_allowed() noexcept {
  static std::atomic<bool> allowed{true};
  return allowed;
}
}  // namespace detail

/// Whether this CPU and OS run AMX bf16 tiles for this process (asks the OS once).
inline bool cpu_has_amx_bf16() noexcept {
  static const bool has = detail::amx_bf16_setup();
  return has;
}

/// For tests and benches: false keeps the AVX-512 kernels on a CPU with AMX, so both paths can be
/// checked and timed in one process. Process-wide; results stay within the same bounds.
inline void allow_amx(bool allow) noexcept { detail::amx_allowed().store(allow, std::memory_order_relaxed); }

/// Whether q_gemm_nt takes AMX tiles: the CPU has them and allow_amx(false) is not in effect.
inline bool use_amx() noexcept { return cpu_has_amx_bf16() && detail::amx_allowed().load(std::memory_order_relaxed); }

}  // namespace s2lc::kernels
