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

IterationPlan plan_iteration(const std::vector<PlannedSeq>& seqs, int64_t chunk) {
  IterationPlan p;
  int64_t tokens = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    const PlannedSeq& s = seqs[i];
    if (s.cached < s.prompt_len) continue;
    p.decoding.push_back(static_cast<int64_t>(i));
    p.drawn.push_back(static_cast<int64_t>(i));
    p.drawn_at.push_back(tokens++);
    p.rows.dec_rows.push_back(s.row);
    p.rows.dec_slots.push_back(s.cached);
  }
  for (size_t i = 0; i < seqs.size(); ++i) {
    const PlannedSeq& s = seqs[i];
    if (s.cached >= s.prompt_len) continue;
    const int64_t c0 = s.cached, end = std::min(s.prompt_len, (c0 / chunk + 1) * chunk), T = end - c0;
    p.chunk_seq = static_cast<int64_t>(i);
    p.chunk_begin = c0;
    p.chunk_end = end;
    if (T == 1) {
      p.rows.dec_rows.push_back(s.row);
      p.rows.dec_slots.push_back(c0);
    } else {
      p.rows.pre_rows.push_back(s.row);
      p.rows.slot0 = c0;
      p.rows.T = T;
    }
    tokens += T;
    if (end == s.prompt_len) {  // the last prompt token's logits give the first new token
      p.drawn.push_back(static_cast<int64_t>(i));
      p.drawn_at.push_back(tokens - 1);
    }
    break;
  }
  return p;
}

KVCache Scheduler::make_cache(Model& model, int64_t slots, int64_t slot_ctx, int64_t chunk) {
  checked(model.config(), slots, slot_ctx, chunk);
  return model.new_cache(slots, slot_ctx, std::min(chunk, slot_ctx));
}

Scheduler::Scheduler(Model& model, int64_t slots, int64_t slot_ctx, int64_t chunk)
    : model_(model), slots_(slots), slot_ctx_(slot_ctx), chunk_(std::min(chunk, slot_ctx)),
      cache_(make_cache(model, slots, slot_ctx, chunk)),
      row_busy_(static_cast<size_t>(slots), 0), row_prefix_(static_cast<size_t>(slots)),
      row_freed_(static_cast<size_t>(slots), 0) {
  totals_.slots = slots;
  totals_.kv_cache_bytes = cache_.bytes();
  thread_ = std::thread([this] { loop(); });
}

Scheduler::~Scheduler() {
  shutdown();
  model_.free_cache(cache_);
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
      model_.reset_cache_row(cache_, best);
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
  std::vector<PlannedSeq> planned;
  std::vector<DrawRow> draws;
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
    // The iteration. Only this thread changes active_ and its sequences, so they are read
    // here without the lock.
    planned.clear();
    for (const auto& s : active_) planned.push_back({s->row, s->cached, static_cast<int64_t>(s->prompt.size())});
    const IterationPlan plan = plan_iteration(planned, chunk_);
    try {
      run(plan, draws);
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
    advance(plan, draws, out);
    events_.insert(events_.end(), out.begin(), out.end());
    event_cv_.notify_all();
  }
}

void Scheduler::run(const IterationPlan& plan, std::vector<DrawRow>& draws) {
  ids_.clear();
  pos_.clear();
  for (int64_t i : plan.decoding) {
    const Seq& s = *active_[i];
    ids_.push_back(s.next);
    pos_.push_back(static_cast<int32_t>(s.cached));
  }
  if (plan.chunk_seq >= 0) {
    const Seq& s = *active_[plan.chunk_seq];
    for (int64_t t = plan.chunk_begin; t < plan.chunk_end; ++t) {
      ids_.push_back(s.prompt[t]);
      pos_.push_back(static_cast<int32_t>(t));
    }
  }
  // Each sequence draws from its own sampler (stream 0: what generate()'s row 0 draws).
  draws.assign(plan.drawn.size(), DrawRow{});
  for (size_t i = 0; i < plan.drawn.size(); ++i) {
    Seq& s = *active_[plan.drawn[i]];
    draws[i].sampler = s.sampler.get();
    draws[i].history = &s.history;
    draws[i].logprobs = s.logprobs;
  }
  model_.step_and_draw(cache_, plan.rows, ids_.data(), pos_.data(), plan.drawn_at.data(), draws.data(),
                       static_cast<int64_t>(draws.size()));
}

void Scheduler::advance(const IterationPlan& plan, std::vector<DrawRow>& draws, std::vector<RequestEvent>& out) {
  ++totals_.iterations;
  totals_.peak_rows = std::max(totals_.peak_rows,
                               static_cast<int64_t>(plan.decoding.size()) + (plan.chunk_seq >= 0 ? 1 : 0));
  for (int64_t i : plan.decoding) ++active_[i]->cached;
  if (plan.chunk_seq >= 0) {
    active_[plan.chunk_seq]->cached = plan.chunk_end;
    totals_.prompt_tokens += plan.chunk_end - plan.chunk_begin;
  }
  for (size_t i = 0; i < draws.size(); ++i) {
    Seq& s = *active_[plan.drawn[i]];
    const int32_t tok = draws[i].token;
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
    out.back().logprob = draws[i].logprob;
    out.back().top = std::move(draws[i].top);
    if (f != Finish::None) release(s, true);
  }
  active_.erase(std::remove_if(active_.begin(), active_.end(), [&](const auto& s) { return !row_busy_[s->row]; }),
                active_.end());
}

}  // namespace gemma
