// s2lc::morph — executors for the apply paths: a serial one, a built-in thread pool, and the
// interface an engine implements to run s2lc's tasks on its own threads.
//
// Results never depend on the executor or the number of workers: tasks write disjoint outputs and
// every reduction happens afterwards in a fixed order.
#pragma once

#include <atomic>
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

/// A fixed pool of threads; the calling thread works too (worker 0). Not re-entrant.
class ThreadPool final : public Executor {
 public:
  explicit ThreadPool(unsigned threads = std::thread::hardware_concurrency()) {
    if (threads == 0) threads = 1;
    for (unsigned w = 1; w < threads; ++w) threads_.emplace_back([this, w] { loop(w); });
  }
  ~ThreadPool() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
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
      fn_ = fn, ctx_ = ctx, n_ = n, next_.store(0), active_ = threads_.size(), error_ = nullptr;
      ++generation_;
    }
    cv_.notify_all();
    work(0);
    std::unique_lock<std::mutex> lock(mu_);
    done_cv_.wait(lock, [this] { return active_ == 0; });
    if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
  }

 private:
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
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
      }
      work(w);
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (--active_ == 0) done_cv_.notify_one();
      }
    }
  }

  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  bool stop_ = false;
  std::size_t generation_ = 0, active_ = 0, n_ = 0;
  std::atomic<std::size_t> next_{0};
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
