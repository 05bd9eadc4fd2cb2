// morph::ThreadPool: every task runs exactly once per call on a valid worker, whether workers
// spin between calls or sleep (spin = 0), with more threads than cores, and a task's exception
// reaches the caller without breaking the pool.
#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <stdexcept>
#include <thread>
#include <vector>

#include <morph/parallel.hpp>

// The suite's own scope: the suites compile in unity groups (tests/CMakeLists.txt).
namespace suite_morph_parallel {

namespace mo = s2lc::morph;

namespace {

// calls runs of n tasks (n cycling 1 ... 7); after some, waits `gap` so workers may fall asleep.
void check_runs(mo::ThreadPool& pool, std::size_t calls, std::chrono::microseconds gap) {
  std::vector<std::atomic<int>> hits(8);
  std::atomic<bool> bad_worker{false};
  for (std::size_t c = 0; c < calls; ++c) {
    const std::size_t n = 1 + c % 7;
    for (auto& h : hits) h.store(0);
    mo::parallel_for(&pool, n, [&](std::size_t i, unsigned w) {
      if (w >= pool.workers()) bad_worker.store(true);
      hits[i].fetch_add(1);
    });
    for (std::size_t i = 0; i < hits.size(); ++i) {
      if (hits[i].load() != (i < n ? 1 : 0)) {
        CAPTURE(c);
        CAPTURE(i);
        REQUIRE(hits[i].load() == (i < n ? 1 : 0));
      }
    }
    if (gap.count() > 0 && c % 16 == 15) std::this_thread::sleep_for(gap);
  }
  CHECK(!bad_worker.load());
}

}  // namespace

TEST_CASE("morph: ThreadPool runs every task once per call, spinning or sleeping between calls") {
  const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
  for (unsigned threads : {2u, 3u, cores + 2}) {  // the last: more threads than cores
    CAPTURE(threads);
    mo::ThreadPool spinning(threads);
    CHECK(spinning.workers() == threads);
    check_runs(spinning, 3000, std::chrono::microseconds(0));
    check_runs(spinning, 160, std::chrono::microseconds(400));  // past the spin: workers sleep
    mo::ThreadPool sleeping(threads, std::chrono::microseconds(0));
    check_runs(sleeping, 400, std::chrono::microseconds(0));
  }
}

TEST_CASE("morph: a ThreadPool task's exception reaches the caller and the pool keeps working") {
  mo::ThreadPool pool(3);
  for (int round = 0; round < 3; ++round) {
    std::atomic<int> ran{0};
    CHECK_THROWS_WITH_AS(mo::parallel_for(&pool, 50, [&](std::size_t i, unsigned) {
                           ran.fetch_add(1);
                           if (i == 7) throw std::runtime_error("task 7 failed");
                         }),
                         "task 7 failed", std::runtime_error);
    CHECK(ran.load() >= 1);
    std::atomic<int> after{0};
    mo::parallel_for(&pool, 20, [&](std::size_t, unsigned) { after.fetch_add(1); });
    CHECK(after.load() == 20);
  }
}

}  // namespace suite_morph_parallel
