#include "runtime/threadpool.h"

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
// Parts per thread: more parts spread the work of a descheduled worker, but each part restarts
// the weight stream (measured on Gemma 3 270M int8 decode, quiet machine: 4 parts 61-62 tok/s,
// 1 part 71). With one part each, the caller still takes a worker's part that has not started.
constexpr int64_t kPartsPerThread = 1;

class Pool {
 public:
  explicit Pool(int n) : n_(n), pid_(getpid()) {
    try {
      for (int i = 1; i < n_; ++i) workers_.emplace_back([this] { loop(); });
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
    const int64_t threads = static_cast<int64_t>(workers_.size()) + 1;
    if (threads <= 1 || n <= 1) {
      fn(0, n);
      return;
    }
    // Contiguous parts claimed in order by whoever is free: a worker that has not woken yet
    // (descheduled on a shared machine) costs its unclaimed part, which the caller takes,
    // instead of a time slice of waiting.
    const int parts = static_cast<int>(std::min<int64_t>(threads * kPartsPerThread, n));
    uint64_t gen;
    {
      std::lock_guard<std::mutex> lk(mu_);
      fn_ = &fn;
      total_ = n;
      parts_ = parts;
      error_ = nullptr;
      done_.store(0, std::memory_order_relaxed);
      gen = generation_.load(std::memory_order_relaxed) + 1;
      claim_.store((gen & 0xffffffffu) << 32, std::memory_order_relaxed);
      generation_.store(gen, std::memory_order_release);
    }
    cv_.notify_all();
    work(fn, n, parts, gen);
    // Wait until every part has finished: workers touch fn only inside a part they claimed,
    // and nothing is left to claim now.
    for (int spins = 0; done_.load(std::memory_order_acquire) != parts; ++spins) {
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

  // Claims and runs parts of job `gen` until none is left. An exception is kept (the first
  // one wins) and rethrown by run().
  void work(const std::function<void(int64_t, int64_t)>& fn, int64_t total, int parts, uint64_t gen) {
    for (;;) {
      uint64_t c = claim_.load(std::memory_order_acquire);
      int64_t p;
      do {
        p = static_cast<int64_t>(c & 0xffffffffu);
        if ((c >> 32) != (gen & 0xffffffffu) || p >= parts) return;  // another job's, or all claimed
      } while (!claim_.compare_exchange_weak(c, c + 1, std::memory_order_acq_rel, std::memory_order_acquire));
      const int64_t begin = total * p / parts, end = total * (p + 1) / parts;
      try {
        if (begin < end) fn(begin, end);
      } catch (...) {
        std::lock_guard<std::mutex> lk(mu_);
        if (!error_) error_ = std::current_exception();
      }
      done_.fetch_add(1, std::memory_order_acq_rel);
    }
  }

  void loop() {
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
        // The job's parameters are read under the lock together with its generation; parts
        // are claimed only while the claim counter still carries that generation, so a
        // worker that wakes late never runs a finished job.
        seen = generation_.load();
        fn = fn_;
        total = total_;
        parts = parts_;
      }
      work(*fn, total, parts, seen);
    }
  }

  const int n_;
  const pid_t pid_;
  std::vector<std::thread> workers_;
  std::mutex mu_, run_mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<uint64_t> claim_{0};  // low 32 bits of the generation << 32 | next part to claim
  std::atomic<int> done_{0};        // parts of the current job finished
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
