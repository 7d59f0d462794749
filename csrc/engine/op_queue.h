// A step's ops recorded instead of run, then run at once: directly, or as the replay of what
// an earlier step with exactly the same ops recorded. A CUDA device replays decode steps as
// captured CUDA graphs (one launch instead of hundreds); the staged CPU device (tests) replays
// the closures it kept, so that a step whose ops differ from the recorded ones in any argument
// it did not key shows up as wrong bits on every CI run.
//
// Each op is pushed with a key: a hash of its kind and of every argument it was given (device
// pointers and sizes; the step's changing inputs, ids, positions, rows and slots, live in
// device memory the ops read, uploaded before the flush). A step's ops replay an earlier
// step's only when the two key lists are equal.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <list>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/kernels.h"

namespace gemma {

// FNV-1a over the bytes of plain values without padding (a struct with padding would hash
// its indeterminate padding bytes: give its fields instead, as key_of below).
class KeyHash {
 public:
  template <typename... A>
  static uint64_t of(const A&... args) {
    uint64_t h = 1469598103934665603ull;
    (mix(h, args), ...);
    return h;
  }

 private:
  template <typename T>
  static void mix(uint64_t& h, const T& v) {
    static_assert(std::has_unique_object_representations_v<T> || std::is_floating_point_v<T>,
                  "op keys hash plain values without padding");
    unsigned char b[sizeof(T)];
    std::memcpy(b, &v, sizeof(T));
    for (unsigned char c : b) h = (h ^ c) * 1099511628211ull;
  }
};

inline uint64_t key_of(const Weight& w) { return KeyHash::of(w.data, w.scales, w.mins, w.dtype, w.rows, w.cols, w.ld); }
inline uint64_t key_of(const AttentionRule& r) { return KeyHash::of(r.n_heads, r.window, r.scale, r.softcap, r.causal); }

class OpQueue {
 public:
  using Op = std::function<void()>;
  // What a replayable step's ops become (a CUDA graph; the closures themselves).
  struct Replay {
    virtual ~Replay() = default;
    virtual void run() = 0;
  };
  // capture(ops) turns ops into a Replay without running them (a CUDA graph is captured, not
  // run); the queue then runs it. It may instead run the ops itself and return null: nothing
  // is kept.
  using Capture = std::function<std::unique_ptr<Replay>(std::vector<Op>& ops)>;

  explicit OpQueue(size_t max_replays = 256) : max_(max_replays) {}

  // A device's step: begin() on the stepping thread (record: its ops wait for flush(); else
  // they run at once), end() after its last op (then flush()), abort() if it failed (its ops
  // are dropped). run(key, op): op now, or recorded with key() while recording.
  void begin(bool record, bool replayable) {
    start(replayable);
    owner_ = std::this_thread::get_id();
    recording_ = record;
  }
  void end() { recording_ = false; }
  void abort() {
    start(false);
    recording_ = false;
  }
  bool recording() const { return recording_; }
  template <typename Key, typename F>
  void run(Key&& key, F&& op) {
    if (!recording_) {
      op();
      return;
    }
    push(key(), std::forward<F>(op));
  }
  // A memory op from another thread while a step's ops are recorded is a caller's bug (the
  // model's lock must be held): said, instead of run amid the step (or in its graph).
  void check_thread(const char* what) const {
    if (recording_.load() && owner_.load() != std::this_thread::get_id())
      throw std::logic_error(std::string("device ") + what + " from another thread during a step");
  }

  // A new step; replayable: its ops may be kept and replayed (decode steps). Ops still
  // queued (a step that failed before its flush) are dropped.
  void start(bool replayable) {
    ops_.clear();
    keys_.clear();
    replayable_ = replayable;
  }
  void push(uint64_t key, Op op) {
    keys_.push_back(key);
    ops_.push_back(std::move(op));
  }
  // A read of device memory on the host is coming (or any work outside the queue): what was
  // recorded runs now, and the rest of the step is not replayable.
  // The queue is empty when an op throws: what a failed step left is never run later.
  void flush(const Capture& capture) {
    if (ops_.empty()) return;
    std::vector<Op> ops;
    std::vector<uint64_t> keys;
    ops.swap(ops_);
    keys.swap(keys_);
    const bool replayable = replayable_;
    replayable_ = false;
    if (!replayable || !capture) {
      for (auto& op : ops) op();
    } else {
      replay_or_capture(ops, keys, capture);
    }
  }
  size_t replays() const { return cache_.size(); }
  uint64_t replayed() const { return replayed_; }  // steps run as a replay so far
  void clear_replays() {
    cache_.clear();
    seen_.clear();
  }

 private:
  struct Entry {
    std::vector<uint64_t> keys;
    std::unique_ptr<Replay> replay;
  };
  void replay_or_capture(std::vector<Op>& ops, std::vector<uint64_t>& keys, const Capture& capture) {
    for (auto it = cache_.begin(); it != cache_.end(); ++it)
      if (it->keys == keys) {
        cache_.splice(cache_.begin(), cache_, it);  // most recently used first
        ++replayed_;
        cache_.front().replay->run();
        return;
      }
    // A key list seen for the first time runs as it is; the second time it is captured. One-off
    // steps make no graph, and every kernel has run once before any capture (CUDA loads
    // modules lazily, which a capture may not do on older drivers).
    uint64_t all = KeyHash::of(keys.size());
    for (uint64_t k : keys) all = KeyHash::of(all, k);
    if (seen_.size() > 4 * max_) seen_.clear();
    if (std::find(seen_.begin(), seen_.end(), all) == seen_.end()) {
      seen_.push_back(all);
      for (auto& op : ops) op();
      return;
    }
    std::unique_ptr<Replay> r = capture(ops);
    if (!r) return;  // capture ran the ops itself
    r->run();
    cache_.push_front(Entry{std::move(keys), std::move(r)});
    if (cache_.size() > max_) cache_.pop_back();
  }

  size_t max_;
  std::atomic<bool> recording_{false};
  std::atomic<std::thread::id> owner_{};
  bool replayable_ = false;
  std::vector<Op> ops_;
  std::vector<uint64_t> keys_;
  std::list<Entry> cache_;
  std::vector<uint64_t> seen_;  // key lists run once, by hash
  uint64_t replayed_ = 0;
};

}  // namespace gemma
