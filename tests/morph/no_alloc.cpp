// The hot path allocates nothing: apply (one member, f32 and int8 activations, one thread and a
// pool), grouped_apply, the SwiGLU layer, a morphed hybrid and the basis bank take all their
// scratch from the caller's Arena (include/morph/runtime.hpp). This program replaces the global
// operator new and delete to count the allocations made while a counting scope is open, on any
// thread (the pool's workers too), so it is its own executable: s2lc_tests keeps the sanitizers'
// own allocator checks.
#include <doctest/doctest.h>

#include "compress/synthetic.hpp"
#include "kernels/targets.hpp"
#include "morph/plans.hpp"
#include "support.hpp"

#include <morph/grouped.hpp>
#include <morph/morph.hpp>
#include <morph/parallel.hpp>
#include <morph/runtime.hpp>
#include <s2lc/compress/compressor.hpp>
#include <s2lc/compress/model.hpp>
#include <s2lc/plan.hpp>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <vector>

extern "C" void openblas_set_num_threads(int);

namespace {

std::atomic<bool> g_counting{false};
std::atomic<std::size_t> g_allocs{0};

void* counted_alloc(std::size_t n, std::size_t align) noexcept {
  if (g_counting.load(std::memory_order_relaxed)) g_allocs.fetch_add(1, std::memory_order_relaxed);
  if (n == 0) n = 1;
  if (align <= alignof(std::max_align_t)) return std::malloc(n);
  return std::aligned_alloc(align, (n + align - 1) / align * align);
}

void* counted_alloc_or_throw(std::size_t n, std::size_t align) {
  if (void* p = counted_alloc(n, align)) return p;
  throw std::bad_alloc();
}

/// Allocations (operator new, any form, any thread) made while it is alive.
class CountAllocs {
 public:
  CountAllocs() {
    g_allocs.store(0);
    g_counting.store(true);
  }
  ~CountAllocs() { g_counting.store(false); }
  CountAllocs(const CountAllocs&) = delete;
  CountAllocs& operator=(const CountAllocs&) = delete;
  std::size_t count() const { return g_allocs.load(); }
};

}  // namespace

void* operator new(std::size_t n) { return counted_alloc_or_throw(n, 0); }
void* operator new[](std::size_t n) { return counted_alloc_or_throw(n, 0); }
void* operator new(std::size_t n, std::align_val_t a) { return counted_alloc_or_throw(n, static_cast<std::size_t>(a)); }
void* operator new[](std::size_t n, std::align_val_t a) { return counted_alloc_or_throw(n, static_cast<std::size_t>(a)); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept { return counted_alloc(n, 0); }
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept { return counted_alloc(n, 0); }
void* operator new(std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept { return counted_alloc(n, static_cast<std::size_t>(a)); }
void* operator new[](std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept { return counted_alloc(n, static_cast<std::size_t>(a)); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }

namespace {

namespace cz = s2lc::compress;
namespace mo = s2lc::morph;

/// The tinymoe fixture's layer-1 experts (w1, w2, w3) at ratio 8: default 256 x 256 blocks, and
/// 100 x 90 blocks (edge blocks, partial quantization groups, the row-major code layout).
cz::Compressed compress_fixture(bool odd_blocks) {
  openblas_set_num_threads(1);
  return s2lc::test::tinymoe_l1_compressed(odd_blocks);
}

const cz::Compressed& fixture(bool odd_blocks) {  // each compressed on its first use only
  if (odd_blocks) {
    static const cz::Compressed odd = compress_fixture(true);
    return odd;
  }
  static const cz::Compressed even = compress_fixture(false);
  return even;
}


using s2lc::test::top2_plan;
constexpr mo::Activations kActs[] = {mo::Activations::f32, mo::Activations::int8};

}  // namespace

TEST_CASE("no allocation: the counting operator new sees an allocation on this thread and on a pool worker") {
  mo::ThreadPool pool(2);
  std::vector<int>* made[2] = {nullptr, nullptr};
  std::size_t n = 0;
  {
    const CountAllocs c;
    auto* v = new std::vector<int>(3);
    mo::parallel_for(&pool, 2, [&](std::size_t i, unsigned) { made[i] = new std::vector<int>(5); });
    n = c.count();
    delete v;
  }
  delete made[0];
  delete made[1];
  CHECK(n == 6);  // each vector object and its storage
}

TEST_CASE("no allocation: apply and apply_parallel of a member, every target, both activation types, 1-64 tokens") {
  mo::ThreadPool pool(2);
  for (bool odd : {false, true}) {
    const auto kg = mo::KGroup::from(fixture(odd).groups[0]);
    const std::size_t R = kg.rows(), C = kg.cols();
    constexpr std::size_t kMaxT = 64;
    const auto X = s2lc::test::randn(kMaxT * C, 5);
    std::vector<float> Y(kMaxT * R, 0.0f);
    std::vector<std::byte> mem(mo::apply_scratch_bytes(kg, kMaxT) + mo::parallel_scratch_bytes(kg, kMaxT, pool.workers()));
    mo::Arena arena(mem);
    // Under the sanitizers (59 s for all targets) the best target only: the release run has them all.
    auto targets = s2lc::test::compiled_targets();
    if (s2lc::test::kSanitized) targets.resize(1);
    for (const auto target : targets) {
      const s2lc::test::TargetScope scope(target);
      for (const auto act : kActs)
        for (std::size_t n : s2lc::test::kSanitized ? std::vector<std::size_t>{1, 33} : std::vector<std::size_t>{1, 2, 3, 8, 33, 64}) {
          CAPTURE(odd);
          CAPTURE(target);
          CAPTURE(n);
          CAPTURE(static_cast<int>(act));
          std::size_t allocs = 0;
          {
            const CountAllocs c;
            for (std::size_t e : {0u, 5u}) {
              mo::apply(kg, e, X.data(), C, n, Y.data(), R, arena, 1.0f, {0, act});
              mo::apply(kg, e, X.data(), C, n, Y.data(), R, arena, 0.5f, {2, act});
              mo::apply_parallel(kg, e, X.data(), C, n, Y.data(), R, arena, &pool, 1.0f, {0, act});
              mo::apply_parallel(kg, e, X.data(), C, n, Y.data(), R, arena, nullptr, 1.0f, {0, act});
            }
            allocs = c.count();
          }
          CHECK(allocs == 0);
          CHECK(arena.used() == 0);
        }
    }
  }
}

TEST_CASE("no allocation: grouped_apply and the SwiGLU layer, one thread and a pool") {
  const auto& c = fixture(false);
  const auto w1 = mo::KGroup::from(c.groups[0]), w2 = mo::KGroup::from(c.groups[1]), w3 = mo::KGroup::from(c.groups[2]);
  const mo::SwiGLUExperts L{&w1, &w3, &w2};
  const std::size_t d = L.d(), f = L.ffn();
  mo::ThreadPool pool(2);
  for (std::size_t T : {1u, 7u, 40u}) {
    const auto plan = top2_plan(8, T, 300 + static_cast<std::uint32_t>(T));
    const auto X = s2lc::test::randn(T * f, 9, 0.5f);
    std::vector<float> Y(T * f, 0.0f);
    std::vector<std::byte> mem(std::max(mo::grouped_scratch_bytes(w2, T, plan.routed(), pool.workers()),
                                        mo::swiglu_scratch_bytes(L, T, plan.routed(), pool.workers())));
    mo::Arena arena(mem);
    for (const auto act : kActs) {
      CAPTURE(T);
      CAPTURE(static_cast<int>(act));
      std::size_t allocs = 0;
      {
        const CountAllocs count;
        for (mo::Executor* ex : {static_cast<mo::Executor*>(nullptr), static_cast<mo::Executor*>(&pool)}) {
          mo::grouped_apply(w2, plan, X.data(), f, Y.data(), d, arena, ex, {0, act});
          mo::swiglu_apply(L, plan, X.data(), d, Y.data(), d, arena, ex, {0, act});
        }
        allocs = count.count();
      }
      CHECK(allocs == 0);
      CHECK(arena.used() == 0);
    }
  }
}

TEST_CASE("no allocation: a morphed hybrid and the basis bank apply from the arena") {
  const auto kg = mo::KGroup::from(fixture(false).groups[1]);  // w2: residuals on shared bases
  const std::uint32_t ex[] = {0, 3, 6};
  const float alpha[] = {0.5f, 0.3f, 0.2f};
  const auto lin = mo::mix_linear(kg, ex, alpha);
  const auto gated = mo::mix_gated(kg, ex, alpha, 0.7f, mo::MorphOptions{4, true});
  std::vector<s2lc::matrix> ms;
  for (std::uint32_t e = 0; e < 3; ++e) ms.push_back(cz::reconstruct(fixture(false).groups[1], e));
  const auto bank = mo::BasisBank::from_matrices(ms, 8);
  const std::size_t R = kg.rows(), C = kg.cols();
  for (std::size_t n : {1u, 8u, 32u}) {
    CAPTURE(n);
    const auto X = s2lc::test::randn(n * C, 13);
    std::vector<float> Y(n * R, 0.0f);
    std::vector<std::byte> mem(std::max({mo::apply_scratch_bytes(lin, n), mo::apply_scratch_bytes(gated, n), bank.scratch_bytes(n)}));
    mo::Arena arena(mem);
    std::size_t allocs = 0;
    {
      const CountAllocs count;
      for (const auto act : kActs) {
        mo::apply(lin, X.data(), C, n, Y.data(), R, arena, 1.0f, {0, act});
        mo::apply(gated, X.data(), C, n, Y.data(), R, arena, 1.0f, {0, act});
      }
      bank.apply(X.data(), C, n, Y.data(), R, 4, arena);
      allocs = count.count();
    }
    CHECK(allocs == 0);
    CHECK(arena.used() == 0);
  }
}
