#include "engine/threadpool.h"

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace gemma {
namespace {

constexpr int kMaxThreads = 1024;

class Pool {
 public:
  explicit Pool(int n) : n_(n), pid_(getpid()) {
    try {
      for (int i = 1; i < n_; ++i) workers_.emplace_back([this, i] { loop(i); });
    } catch (...) {
      shutdown();  // a thread could not start: stop the ones that did, then report
      throw;
    }
  }
  ~Pool() { shutdown(); }
  int size() const { return n_; }
  pid_t pid() const { return pid_; }

  void run(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
    // Two Python threads may each run an engine call with the GIL released: jobs queue here.
    std::lock_guard<std::mutex> job(run_mu_);
    const int parts = static_cast<int>(std::min<int64_t>(static_cast<int64_t>(workers_.size()) + 1, n));
    if (parts <= 1) {
      fn(0, n);
      return;
    }
    {
      std::lock_guard<std::mutex> lk(mu_);
      fn_ = &fn;
      total_ = n;
      parts_ = parts;
      error_ = nullptr;
      pending_.store(parts - 1, std::memory_order_relaxed);
      ++generation_;
    }
    cv_.notify_all();
    do_part(fn, n, parts, 0);
    // Always wait for every worker, even after an exception here: they read fn and the
    // caller's stack. Spin briefly (chunks are short: a matmul slice), then yield.
    for (int spins = 0; pending_.load(std::memory_order_acquire) != 0; ++spins) {
      if (spins > 2000) std::this_thread::yield();
    }
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void shutdown() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
      ++generation_;
    }
    cv_.notify_all();
    for (auto& t : workers_)
      if (t.joinable()) t.join();
  }

  // Runs part p; an exception is kept (the first one wins) and rethrown by run().
  void do_part(const std::function<void(int64_t, int64_t)>& fn, int64_t total, int parts, int p) {
    const int64_t begin = total * p / parts, end = total * (p + 1) / parts;
    try {
      if (begin < end) fn(begin, end);
    } catch (...) {
      std::lock_guard<std::mutex> lk(mu_);
      if (!error_) error_ = std::current_exception();
    }
  }

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
  std::exception_ptr error_;
};

std::mutex g_mu;
std::shared_ptr<Pool> g_pool;
int g_threads = 0;

// The cores this process may run on (taskset, cgroups' cpusets), not the machine's.
int default_threads() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return std::min(n, kMaxThreads);
  }
  const unsigned hc = std::thread::hardware_concurrency();
  return hc == 0 ? 1 : static_cast<int>(std::min<unsigned>(hc, kMaxThreads));
}

// A running job holds its own reference: set_num_threads() in another thread swaps the
// pool for later jobs and never destroys one in use.
std::shared_ptr<Pool> pool() {
  std::lock_guard<std::mutex> lk(g_mu);
  if (g_threads <= 0) g_threads = default_threads();
  if (g_pool && g_pool->pid() != getpid()) {
    // Forked child: the parent's workers do not exist here. Their Pool cannot be
    // destroyed safely (joining threads that are not ours), so it is abandoned.
    new std::shared_ptr<Pool>(std::move(g_pool));
    g_pool.reset();
  }
  if (!g_pool || g_pool->size() != g_threads) g_pool = std::make_shared<Pool>(g_threads);
  return g_pool;
}

}  // namespace

int num_threads() {
  std::lock_guard<std::mutex> lk(g_mu);
  return g_threads > 0 ? g_threads : default_threads();
}

void set_num_threads(int n) {
  std::lock_guard<std::mutex> lk(g_mu);
  g_threads = n > 0 ? std::min(n, kMaxThreads) : default_threads();
}

void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  std::shared_ptr<Pool> p = pool();
  p->run(n, fn);
}

}  // namespace gemma
