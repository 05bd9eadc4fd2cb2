// s2lc::morph — executors for the apply paths: a serial one, a built-in thread pool, and the
// interface an engine implements to run s2lc's tasks on its own threads.
//
// Results never depend on the executor or the number of workers: tasks write disjoint outputs and
// every reduction happens afterwards in a fixed order.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <exception>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

namespace s2lc::morph {

/// Runs fn(ctx, task, worker) for every task in [0, n); worker < workers(). Blocks until done.
class Executor {
 public:
  using task_fn = void (*)(void* ctx, std::size_t task, unsigned worker);
  virtual ~Executor() = default;
  virtual unsigned workers() const noexcept = 0;
  virtual void run(std::size_t n, task_fn fn, void* ctx) = 0;
};

class SerialExecutor final : public Executor {
 public:
  unsigned workers() const noexcept override { return 1; }
  void run(std::size_t n, task_fn fn, void* ctx) override {
    for (std::size_t i = 0; i < n; ++i) fn(ctx, i, 0);
  }
};

namespace detail {
/// A spin-wait hint to the CPU (lets a sibling hyperthread run, saves power).
inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}
}  // namespace detail

/// A fixed pool of threads; the calling thread works too (worker 0). Not re-entrant.
///
/// Between calls the workers spin for `spin` (default 200 us) before they sleep, and the caller
/// spins as long for them to finish before it sleeps: waking a sleeping thread costs a futex call
/// and, on a VM, waking its halted vCPU (run() of 4 trivial tasks on 2 threads took 44 us median
/// with sleeping workers on the Zen 5 VM of bench/RESULTS.md, against a 7 us batch-1 call of a
/// 768 x 256 expert). Calls closer together than `spin` (an engine's layers) never sleep; a pool
/// left idle costs at most `spin` of CPU per worker after each call. spin = 0: sleep at once.
class ThreadPool final : public Executor {
 public:
  explicit ThreadPool(unsigned threads = std::thread::hardware_concurrency(),
                      std::chrono::microseconds spin = std::chrono::microseconds(200))
      : spin_(spin) {
    if (threads == 0) threads = 1;
    for (unsigned w = 1; w < threads; ++w) threads_.emplace_back([this, w] { loop(w); });
  }
  ~ThreadPool() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_.store(true);
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  unsigned workers() const noexcept override { return static_cast<unsigned>(threads_.size() + 1); }

  void run(std::size_t n, task_fn fn, void* ctx) override {
    if (n == 0) return;
    if (threads_.empty() || n == 1) {
      for (std::size_t i = 0; i < n; ++i) fn(ctx, i, 0);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      fn_ = fn, ctx_ = ctx, n_ = n, next_.store(0), active_.store(threads_.size()), error_ = nullptr;
      generation_.store(generation_.load() + 1, std::memory_order_release);  // spinning workers see it now
    }
    cv_.notify_all();  // and sleeping ones (no system call when none sleeps)
    work(0);
    if (!spin_until([this] { return active_.load(std::memory_order_acquire) == 0; })) {
      std::unique_lock<std::mutex> lock(mu_);
      done_cv_.wait(lock, [this] { return active_.load() == 0; });
    }
    std::lock_guard<std::mutex> lock(mu_);  // error_ is written under it
    if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
  }

 private:
  /// Spins until ready() or spin_ has passed; whether ready() became true.
  template <class Ready>
  bool spin_until(Ready&& ready) const {
    if (ready()) return true;
    if (spin_.count() <= 0) return false;
    const auto start = std::chrono::steady_clock::now(), until = start + spin_, yield_from = start + std::chrono::microseconds(8);
    for (;;) {
      for (int i = 0; i < 64; ++i) {
        if (ready()) return true;
        detail::cpu_relax();
      }
      const auto now = std::chrono::steady_clock::now();
      if (now >= until) return ready();
      // Still waiting after 8 us: maybe more threads than cores, so let one with work run (not
      // sooner: a yield costs microseconds on a VM, and most waits end well before).
      if (now >= yield_from) std::this_thread::yield();
    }
  }
  void work(unsigned w) {
    for (std::size_t i; (i = next_.fetch_add(1)) < n_;) {
      try {
        fn_(ctx_, i, w);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu_);
        if (!error_) error_ = std::current_exception();
        next_.store(n_);
      }
    }
  }
  void loop(unsigned w) {
    std::size_t seen = 0;
    for (;;) {
      auto fresh = [&] { return stop_.load(std::memory_order_acquire) || generation_.load(std::memory_order_acquire) != seen; };
      if (!spin_until(fresh)) {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, fresh);
      }
      if (stop_.load()) return;
      seen = generation_.load(std::memory_order_acquire);
      work(w);
      if (active_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lock(mu_);  // a caller about to sleep holds it while it checks active_
        done_cv_.notify_one();
      }
    }
  }

  std::vector<std::thread> threads_;
  std::chrono::microseconds spin_;
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  std::atomic<bool> stop_{false};
  std::atomic<std::size_t> generation_{0}, active_{0}, next_{0};
  std::size_t n_ = 0;
  task_fn fn_ = nullptr;
  void* ctx_ = nullptr;
  std::exception_ptr error_;
};

/// parallel_for(ex, n, [&](std::size_t task, unsigned worker) {...}); ex == nullptr runs serially.
template <class F>
void parallel_for(Executor* ex, std::size_t n, F&& f) {
  auto thunk = [](void* c, std::size_t i, unsigned w) { (*static_cast<std::remove_reference_t<F>*>(c))(i, w); };
  if (ex == nullptr) {
    for (std::size_t i = 0; i < n; ++i) f(i, 0u);
    return;
  }
  ex->run(n, thunk, const_cast<void*>(static_cast<const void*>(&f)));
}

}  // namespace s2lc::morph
