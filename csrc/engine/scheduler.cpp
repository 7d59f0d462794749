#include "engine/scheduler.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <cmath>
#include <exception>
#include <limits>
#include <stdexcept>
#include <string>

#include "runtime/threadpool.h"

namespace gemma {

namespace {
constexpr int32_t kMaxLogprobs = 20;

// log(sum(exp(x))) over a row, in double: the log-softmax's denominator.
float log_sum_exp(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i]);
  if (!std::isfinite(m)) return m;
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(static_cast<double>(x[i]) - m);
  return static_cast<float>(m + std::log(sum));
}

// The k largest entries of x (ties: the lower index first), best first, as log-probabilities.
std::vector<std::pair<int32_t, float>> top_entries(const float* x, int64_t n, int32_t k, float lse) {
  std::vector<std::pair<int32_t, float>> top;
  auto better = [](const std::pair<int32_t, float>& a, const std::pair<int32_t, float>& b) {
    return a.second > b.second || (a.second == b.second && a.first < b.first);
  };
  for (int64_t i = 0; i < n && k > 0; ++i) {
    const std::pair<int32_t, float> e{static_cast<int32_t>(i), x[i]};
    if (static_cast<int32_t>(top.size()) == k && !better(e, top.back())) continue;
    top.insert(std::upper_bound(top.begin(), top.end(), e, better), e);
    if (static_cast<int32_t>(top.size()) > k) top.pop_back();
  }
  for (auto& e : top) e.second -= lse;
  return top;
}

// The cache's shape, checked before it is allocated.
const ModelConfig& checked(const ModelConfig& c, int64_t slots, int64_t slot_ctx, int64_t chunk) {
  if (slots < 1) throw std::invalid_argument("scheduler: slots must be >= 1, got " + std::to_string(slots));
  if (slot_ctx < 2) throw std::invalid_argument("scheduler: a slot's context must be >= 2 tokens, got " + std::to_string(slot_ctx));
  if (chunk < 1) throw std::invalid_argument("scheduler: the prompt chunk must be >= 1 token, got " + std::to_string(chunk));
  if (!c.causal)
    throw std::invalid_argument("scheduler: a bidirectional model sees the whole prompt at once; it cannot be served in chunks");
  return c;
}
}  // namespace

// The model's device memory is touched under the model's lock: another thread may be running
// generate() or forward() on it (a device that queues a step's ops must see nothing else).
KVCache Scheduler::make_cache(Model& model, int64_t slots, int64_t slot_ctx, int64_t chunk) {
  const ModelConfig& c = checked(model.config(), slots, slot_ctx, chunk);
  std::lock_guard<std::mutex> ml(model.mu_);
  return KVCache(model.device(), c, slots, slot_ctx, std::min(chunk, slot_ctx));
}

Scheduler::Scheduler(Model& model, int64_t slots, int64_t slot_ctx, int64_t chunk)
    : model_(model), slots_(slots), slot_ctx_(slot_ctx), chunk_(std::min(chunk, slot_ctx)),
      cache_(make_cache(model, slots, slot_ctx, chunk)),
      row_busy_(static_cast<size_t>(slots), 0), row_prefix_(static_cast<size_t>(slots)),
      row_freed_(static_cast<size_t>(slots), 0) {
  totals_.slots = slots;
  thread_ = std::thread([this] { loop(); });
}

Scheduler::~Scheduler() {
  shutdown();
  std::lock_guard<std::mutex> ml(model_.mu_);
  KVCache gone = std::move(cache_);  // freed under the model's lock
}

void Scheduler::shutdown() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  work_cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  event_cv_.notify_all();
}

int64_t Scheduler::submit(std::vector<int32_t> prompt, const SamplingParams& params, int32_t logprobs) {
  const int64_t V = model_.config().vocab_size, P = static_cast<int64_t>(prompt.size());
  if (P == 0) throw std::invalid_argument("the prompt is empty");
  for (int64_t i = 0; i < P; ++i)
    if (prompt[i] < 0 || prompt[i] >= V)
      throw std::invalid_argument("prompt token " + std::to_string(prompt[i]) + " at position " + std::to_string(i) +
                                  " is outside the vocabulary [0, " + std::to_string(V) + ")");
  if (logprobs < -1 || logprobs > kMaxLogprobs)
    throw std::invalid_argument("logprobs must be in [0, " + std::to_string(kMaxLogprobs) + "], got " +
                                std::to_string(logprobs));
  if (params.max_new_tokens < 1)
    throw std::invalid_argument("max_new_tokens must be >= 1, got " + std::to_string(params.max_new_tokens));
  if (P + params.max_new_tokens > slot_ctx_)
    throw std::invalid_argument("a prompt of " + std::to_string(P) + " tokens + max_new_tokens " +
                                std::to_string(params.max_new_tokens) + " exceeds a slot's context of " +
                                std::to_string(slot_ctx_) + " tokens");
  auto s = std::make_unique<Seq>();
  s->prompt = std::move(prompt);
  s->params = params;
  // Stream 0: a request draws what generate()'s row 0 draws with the same seed.
  s->sampler = std::make_unique<Sampler>(params, 0);
  s->history = s->prompt;
  s->logprobs = logprobs;
  int64_t id;
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (stop_) throw std::runtime_error("the scheduler has shut down");
    id = s->id = next_id_++;
    waiting_.push_back(std::move(s));
    ++totals_.requests;
  }
  work_cv_.notify_one();
  return id;
}

void Scheduler::cancel(int64_t id) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    cancels_.push_back(id);
  }
  work_cv_.notify_one();
}

std::vector<RequestEvent> Scheduler::poll(double timeout_s) {
  std::unique_lock<std::mutex> lk(mu_);
  if (events_.empty() && timeout_s > 0)
    event_cv_.wait_for(lk, std::chrono::duration<double>(timeout_s), [&] { return !events_.empty() || stop_; });
  std::vector<RequestEvent> out;
  out.swap(events_);
  return out;
}

SchedulerStats Scheduler::stats() const {
  std::lock_guard<std::mutex> lk(mu_);
  SchedulerStats s = totals_;
  s.running = static_cast<int64_t>(active_.size());
  s.waiting = static_cast<int64_t>(waiting_.size());
  return s;
}

std::string Scheduler::error() const {
  std::lock_guard<std::mutex> lk(mu_);
  return error_;
}

void Scheduler::emit(std::vector<RequestEvent>& out, const Seq& s, int32_t token, Finish f) {
  out.push_back(RequestEvent{s.id, token, f});
}

// Prefix reuse, in the terms of DESIGN's KV cache. A row's slots [0, n) can serve a new
// sequence whose prompt starts with the same n tokens when:
// - they hold whole prompt chunks of the old sequence ([i * chunk, (i + 1) * chunk), computed
//   by prefill steps of exactly those tokens): a cold start computes the same chunks with the
//   same kernels, so reuse is bit-exact. Tokens decoded one at a time (a reply) and a last,
//   partial chunk are never reused: a cold start would compute them as part of a chunk.
// - n < the new prompt's length: its last token is always computed (its logits are needed).
// - every sliding-window layer still holds what the new sequence's queries see: a query at
//   slot q >= n sees (q - window, q], so the layer's first held slot must be at most
//   max(0, n - window + 1). The old sequence may have moved past that (make_room drops what
//   its own later queries no longer saw); then the row gives nothing. Global layers hold
//   every slot.
int64_t Scheduler::reusable(int64_t row, const std::vector<int32_t>& prompt) const {
  const std::vector<int32_t>& held = row_prefix_[row];
  const int64_t limit = std::min<int64_t>(static_cast<int64_t>(held.size()), static_cast<int64_t>(prompt.size()) - 1);
  int64_t same = 0;
  while (same < limit && held[same] == prompt[same]) ++same;
  const int64_t n = same / chunk_ * chunk_;
  if (n == 0) return 0;
  const ModelConfig& c = model_.config();
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const int64_t w = c.layer_window(l);
    if (w > 0 && cache_.origin[l * cache_.rows + row] > std::max<int64_t>(0, n - w + 1)) return 0;
  }
  return n;
}

void Scheduler::admit() {
  while (!waiting_.empty() && static_cast<int64_t>(active_.size()) < slots_) {
    Seq& s = *waiting_.front();
    // The free row that saves the most; else the one keeping nothing, else the one released
    // longest ago (its prefix the least likely asked for again).
    int64_t best = -1, best_n = 0;
    for (int64_t r = 0; r < slots_; ++r) {
      if (row_busy_[r]) continue;
      const int64_t n = reusable(r, s.prompt);
      const bool better = best < 0 || n > best_n ||
                          (n == best_n && (row_prefix_[r].empty() != row_prefix_[best].empty()
                                               ? row_prefix_[r].empty()
                                               : row_freed_[r] < row_freed_[best]));
      if (better) {
        best = r;
        best_n = n;
      }
    }
    row_busy_[best] = 1;
    row_prefix_[best].clear();
    if (best_n > 0) {
      ++totals_.prefix_hits;
      totals_.prefix_tokens += best_n;
    } else {
      std::lock_guard<std::mutex> ml(model_.mu_);
      cache_.reset_row(best);
    }
    s.row = best;
    s.cached = best_n;
    active_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
  }
}

void Scheduler::release(const Seq& s, bool keep) {
  row_busy_[s.row] = 0;
  row_freed_[s.row] = ++release_count_;
  std::vector<int32_t>& held = row_prefix_[s.row];
  held.clear();
  if (!keep) return;
  const int64_t P = static_cast<int64_t>(s.prompt.size());
  held.assign(s.prompt.begin(), s.prompt.begin() + std::min(s.cached, P) / chunk_ * chunk_);
}

void Scheduler::loop() {
  const ModelConfig& c = model_.config();
  const int64_t H = c.hidden_size, V = c.vocab_size;
  std::vector<int32_t> ids, pos, drawn_tokens;
  std::vector<float> drawn_lp;
  std::vector<std::vector<std::pair<int32_t, float>>> drawn_top;
  std::vector<uint8_t> ones;
  std::vector<float> lg_stage;  // the logits, where the model's device has memory of its own
  std::vector<Seq*> drawn;
  std::vector<int64_t> drawn_at;  // each drawn sequence's token index in the step
  for (;;) {
    std::vector<RequestEvent> out;
    // Between iterations: cancellations, then admissions into free rows.
    {
      std::unique_lock<std::mutex> lk(mu_);
      work_cv_.wait(lk, [&] { return stop_ || !waiting_.empty() || !active_.empty() || !cancels_.empty(); });
      if (stop_) {
        for (auto& s : active_) emit(out, *s, -1, Finish::Cancelled);
        for (auto& s : waiting_) emit(out, *s, -1, Finish::Cancelled);
        active_.clear();
        waiting_.clear();
        events_.insert(events_.end(), out.begin(), out.end());
        event_cv_.notify_all();
        return;
      }
      for (int64_t id : cancels_) {
        auto w = std::find_if(waiting_.begin(), waiting_.end(), [&](const auto& s) { return s->id == id; });
        if (w != waiting_.end()) {
          emit(out, **w, -1, Finish::Cancelled);
          waiting_.erase(w);
          continue;
        }
        auto a = std::find_if(active_.begin(), active_.end(), [&](const auto& s) { return s->id == id; });
        if (a != active_.end()) {
          emit(out, **a, -1, Finish::Cancelled);
          release(**a, true);
          active_.erase(a);
        }
      }
      cancels_.clear();
      admit();
      if (!out.empty()) {
        events_.insert(events_.end(), out.begin(), out.end());
        event_cv_.notify_all();
        out.clear();
      }
      if (active_.empty()) continue;
    }
    // The iteration (only this thread changes active_ and its sequences): every generating
    // sequence's next token, then one chunk of the first sequence with prompt left.
    StepRows sr;
    ids.clear();
    pos.clear();
    drawn.clear();
    drawn_at.clear();
    for (auto& s : active_) {
      if (s->cached < static_cast<int64_t>(s->prompt.size())) continue;
      drawn_at.push_back(static_cast<int64_t>(ids.size()));
      drawn.push_back(s.get());
      sr.dec_rows.push_back(s->row);
      sr.dec_slots.push_back(s->cached);
      ids.push_back(s->next);
      pos.push_back(static_cast<int32_t>(s->cached));
    }
    const size_t n_decoding = drawn.size();  // drawn[0, n_decoding): the generating sequences
    Seq* chunk_seq = nullptr;
    int64_t chunk_T = 0;
    for (auto& s : active_) {
      const int64_t P = static_cast<int64_t>(s->prompt.size());
      if (s->cached >= P) continue;
      chunk_seq = s.get();
      const int64_t c0 = s->cached, end = std::min(P, (c0 / chunk_ + 1) * chunk_);
      chunk_T = end - c0;
      if (chunk_T == 1) {  // one token: decode work, as prompt_rows() has it
        sr.dec_rows.push_back(s->row);
        sr.dec_slots.push_back(c0);
      } else {
        sr.pre_rows.push_back(s->row);
        sr.slot0 = c0;
        sr.T = chunk_T;
      }
      for (int64_t t = c0; t < end; ++t) {
        ids.push_back(s->prompt[t]);
        pos.push_back(static_cast<int32_t>(t));
      }
      if (end == P) {  // the last prompt token's logits give the first new token
        drawn_at.push_back(static_cast<int64_t>(ids.size()) - 1);
        drawn.push_back(s.get());
      }
      break;
    }
    const int64_t M = static_cast<int64_t>(ids.size()), n = static_cast<int64_t>(drawn.size());
    drawn_tokens.assign(static_cast<size_t>(n), 0);
    drawn_lp.assign(static_cast<size_t>(n), 0.f);
    drawn_top.assign(static_cast<size_t>(n), {});
    try {
      std::lock_guard<std::mutex> ml(model_.mu_);
      ones.assign(static_cast<size_t>(M), 1);
      const float* hid = model_.step(cache_, sr, ids.data(), pos.data(), ones.data(), nullptr);
      // The drawing rows' states, gathered unless they are all of the step's rows (decode only).
      const float* states = hid;
      if (n < M) {
        float* sel = model_.scratch(model_.ws_.sel, n * H);
        for (int64_t i = 0; i < n; ++i) model_.device().copy(sel + i * H, hid + drawn_at[i] * H, H * sizeof(float));
        states = sel;
      }
      // One position per sequence: the decode kernels, as generate()'s every token. When every
      // drawing sequence is greedy without penalties or logprobs, a device with memory of its
      // own picks the tokens itself (only the ids come back).
      bool on_device = n > 0;
      for (int64_t i = 0; i < n && on_device; ++i)
        on_device = drawn[i]->logprobs < 0 && model_.device_greedy(drawn[i]->params);
      float* lg = nullptr;
      if (on_device) {
        model_.greedy_on_device(states, n, drawn_tokens.data());
      } else if (n > 0) {
        lg = model_.host_logits(states, n, Work::Decode, lg_stage);
      }
      // Each sequence draws from its own sampler; the logprobs read the raw logits first.
      auto draw = [&](int64_t i, bool pool) {
        Seq& s = *drawn[i];
        float* row = &lg[i * V];
        if (s.logprobs < 0) {
          drawn_tokens[i] = s.sampler->next(row, V, s.history, pool);
          return;
        }
        thread_local std::vector<float> raw;
        raw.assign(row, row + V);
        const float lse = log_sum_exp(raw.data(), V);
        drawn_top[i] = top_entries(raw.data(), V, s.logprobs, lse);
        drawn_tokens[i] = s.sampler->next(row, V, s.history, pool);
        drawn_lp[i] = raw[drawn_tokens[i]] - lse;
      };
      if (!on_device && n == 1) {
        draw(0, true);
      } else if (!on_device && n > 1) {
        parallel_for(n, [&](int64_t a, int64_t b) {
          for (int64_t i = a; i < b; ++i) draw(i, false);
        });
      }
    } catch (const std::exception& e) {
      // The engine failed: every admitted request ends with the error; the loop goes on.
      std::lock_guard<std::mutex> lk(mu_);
      error_ = e.what();
      for (auto& s : active_) {
        emit(out, *s, -1, Finish::Error);
        release(*s, false);  // what the failed step left in the row is unknown
      }
      active_.clear();
      events_.insert(events_.end(), out.begin(), out.end());
      event_cv_.notify_all();
      continue;
    }
    std::lock_guard<std::mutex> lk(mu_);
    ++totals_.iterations;
    totals_.peak_rows = std::max(totals_.peak_rows, static_cast<int64_t>(n_decoding) + (chunk_seq ? 1 : 0));
    for (size_t i = 0; i < n_decoding; ++i) ++drawn[i]->cached;
    if (chunk_seq) {
      chunk_seq->cached += chunk_T;
      totals_.prompt_tokens += chunk_T;
    }
    for (int64_t i = 0; i < n; ++i) {
      Seq& s = *drawn[i];
      const int32_t tok = drawn_tokens[i];
      s.history.push_back(tok);
      s.next = tok;
      ++s.generated;
      ++totals_.generated_tokens;
      Finish f = Finish::None;
      if (std::find(s.params.eos_token_ids.begin(), s.params.eos_token_ids.end(), tok) != s.params.eos_token_ids.end())
        f = Finish::Stop;
      else if (s.generated >= s.params.max_new_tokens)
        f = Finish::Length;
      emit(out, s, tok, f);
      out.back().with_logprobs = s.logprobs >= 0;
      out.back().logprob = drawn_lp[i];
      out.back().top = std::move(drawn_top[i]);
      if (f != Finish::None) release(s, true);
    }
    active_.erase(std::remove_if(active_.begin(), active_.end(), [&](const auto& s) { return !row_busy_[s->row]; }),
                  active_.end());
    events_.insert(events_.end(), out.begin(), out.end());
    event_cv_.notify_all();
  }
}

}  // namespace gemma
