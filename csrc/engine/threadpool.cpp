#include "engine/threadpool.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace gemma {
namespace {

class Pool {
 public:
  explicit Pool(int n) : n_(n), pid_(getpid()) {
    for (int i = 1; i < n_; ++i) workers_.emplace_back([this, i] { loop(i); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
      ++generation_;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int size() const { return n_; }
  pid_t pid() const { return pid_; }

  void run(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
    // Two Python threads may each run an engine call with the GIL released: jobs queue here.
    std::lock_guard<std::mutex> job(run_mu_);
    const int parts = static_cast<int>(std::min<int64_t>(n_, n));
    if (parts <= 1) {
      fn(0, n);
      return;
    }
    {
      std::lock_guard<std::mutex> lk(mu_);
      fn_ = &fn;
      total_ = n;
      parts_ = parts;
      pending_.store(parts - 1, std::memory_order_relaxed);
      ++generation_;
    }
    cv_.notify_all();
    do_part(0);
    // Spin briefly (chunks are short: a matmul slice), then yield.
    for (int spins = 0; pending_.load(std::memory_order_acquire) != 0; ++spins) {
      if (spins > 2000) std::this_thread::yield();
    }
  }

 private:
  static void do_part(const std::function<void(int64_t, int64_t)>& fn, int64_t total, int parts,
                      int p) {
    const int64_t begin = total * p / parts, end = total * (p + 1) / parts;
    if (begin < end) fn(begin, end);
  }
  void do_part(int p) { do_part(*fn_, total_, parts_, p); }

  void loop(int index) {
    uint64_t seen = 0;
    for (;;) {
      // Spin-then-sleep: decode calls the pool ~10 times a layer, so a worker that slept
      // on every call would add a wake-up latency per matmul.
      for (int spins = 0; spins < 20000; ++spins) {
        if (generation_.load(std::memory_order_acquire) != seen) break;
        if (spins > 200) std::this_thread::yield();
      }
      const std::function<void(int64_t, int64_t)>* fn;
      int64_t total;
      int parts;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return generation_.load() != seen; });
        if (stop_) return;
        // The job's parameters are read under the lock together with its generation, so
        // a worker that wakes late works on the current job exactly once.
        seen = generation_.load();
        fn = fn_;
        total = total_;
        parts = parts_;
      }
      if (index < parts) {
        do_part(*fn, total, parts, index);
        pending_.fetch_sub(1, std::memory_order_acq_rel);
      }
    }
  }

  const int n_;
  const pid_t pid_;
  std::vector<std::thread> workers_;
  std::mutex mu_, run_mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  bool stop_ = false;
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t total_ = 0;
  int parts_ = 0;
};

std::mutex g_mu;
Pool* g_pool = nullptr;
int g_threads = 0;

int default_threads() {
  unsigned hc = std::thread::hardware_concurrency();
  return hc == 0 ? 1 : static_cast<int>(hc);
}

Pool& pool() {
  std::lock_guard<std::mutex> lk(g_mu);
  if (g_threads <= 0) g_threads = default_threads();
  if (g_pool != nullptr && g_pool->pid() != getpid()) {
    // Forked child: the parent's workers do not exist here. Their Pool cannot be
    // destroyed safely (joining threads that are not ours), so it is abandoned.
    g_pool = nullptr;
  }
  if (g_pool == nullptr || g_pool->size() != g_threads) {
    delete g_pool;
    g_pool = new Pool(g_threads);
  }
  return *g_pool;
}

}  // namespace

int num_threads() {
  std::lock_guard<std::mutex> lk(g_mu);
  return g_threads > 0 ? g_threads : default_threads();
}

void set_num_threads(int n) {
  std::lock_guard<std::mutex> lk(g_mu);
  g_threads = n > 0 ? n : default_threads();
}

void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  pool().run(n, fn);
}

}  // namespace gemma
