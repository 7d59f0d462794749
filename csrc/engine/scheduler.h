// Continuous batching: a scheduler of sequences over one Model. Up to `slots` sequences run at
// once, each in its own row of one KV cache, at its own position, with its own sampler, seed,
// stop tokens and token budget; requests join and leave between iterations.
//
// One iteration is one Model::step(): the next token of every sequence that is generating
// (decode work), plus one chunk of one waiting prompt (prefill work). A prompt goes in chunks
// of `chunk` tokens at slots [i * chunk, (i + 1) * chunk): its chunks, and so its bits, are the
// same whatever else runs, and a long prompt holds the running sequences up for one chunk per
// iteration at most.
//
// Batch invariance: the decode tokens take the decode kernels and the chunk the prefill ones,
// each row's arithmetic its own (kernels.h, Work); the LM head runs as decode work on every
// row whose next token is drawn; each sequence draws from its own Sampler. So a request's
// tokens are the same bits alone or beside any others, and (a whole prompt in one chunk, as
// generate() takes it) the same as generate()'s for that prompt alone with the same seed.
//
// Prefix reuse: a row keeps what its last sequence left (see admit()), and a request whose
// prompt begins with the same whole chunks recomputes only the rest, with the same bits as a
// cold start.
//
// The loop runs on its own thread; submit(), cancel() and poll() may be called from any
// thread. Events (a token, a finish) queue up for poll().
#pragma once
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "engine/model.h"
#include "engine/sampler.h"

namespace gemma {

// Stop: an eos token; Length: max_new_tokens; Error: the engine failed (Scheduler::error()).
enum class Finish : int32_t { None = 0, Stop = 1, Length = 2, Cancelled = 3, Error = 4 };

struct RequestEvent {
  int64_t id = 0;
  int32_t token = -1;  // -1: no token (a cancelled request's last event)
  Finish finish = Finish::None;
  // When the request asked for logprobs: the token's log-probability under the model (the
  // log-softmax of the raw logits, before any penalty or warping), and the `logprobs` most
  // likely tokens with theirs (best first; ties: the lower id first).
  bool with_logprobs = false;
  float logprob = 0.f;
  std::vector<std::pair<int32_t, float>> top;
};

struct SchedulerStats {
  int64_t running = 0, waiting = 0, slots = 0;
  int64_t prompt_tokens = 0, generated_tokens = 0, requests = 0;
  int64_t iterations = 0, peak_rows = 0;  // steps run; the most sequences one step advanced
  int64_t prefix_hits = 0, prefix_tokens = 0;  // requests that reused a row's prefix; its tokens
  int64_t kv_cache_bytes = 0;  // the KV cache's memory (all slots, every layer that keeps one)
};

// A sequence as an iteration's plan sees it: its cache row, the slots it has computed
// (cached) and its prompt's length (cached >= prompt_len: it is generating).
struct PlannedSeq {
  int64_t row = 0, cached = 0, prompt_len = 0;
};

// What one iteration runs, from the admitted sequences (in admission order) alone:
// - every generating sequence's next token (decode work, at slot `cached`), in order;
// - then one chunk of the first sequence with prompt left: its prompt tokens [chunk_begin,
//   chunk_end), chunk_begin = cached, up to the end of the chunk-aligned window it is in
//   (slots [i * chunk, (i + 1) * chunk)) or of the prompt: so a prompt's chunks, and its
//   bits, are the same whatever else runs. A one-token chunk is decode work (as
//   Model::prompt_rows has it).
// rows: the step's rows in that token order; drawn: the sequences that draw a token after the
// step (the generating ones, then the chunk's when it ends the prompt), drawn_at: each one's
// token index in the step.
struct IterationPlan {
  StepRows rows;
  std::vector<int64_t> decoding;  // indices into the sequences
  int64_t chunk_seq = -1;         // -1: no prompt chunk
  int64_t chunk_begin = 0, chunk_end = 0;
  std::vector<int64_t> drawn, drawn_at;
  int64_t tokens() const { return rows.decode_tokens() + rows.prompt_tokens(); }
};
IterationPlan plan_iteration(const std::vector<PlannedSeq>& seqs, int64_t chunk);

class Scheduler {
 public:
  // slot_ctx: tokens a sequence may hold (prompt + new tokens); chunk: prompt tokens per
  // iteration. The KV cache for slots x slot_ctx is allocated here, once.
  Scheduler(Model& model, int64_t slots, int64_t slot_ctx, int64_t chunk);
  ~Scheduler();
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Queues a request; its id. std::invalid_argument (nothing queued) when the prompt is empty,
  // holds a token outside the vocabulary, asks for no new token, or prompt + max_new_tokens
  // exceeds slot_ctx.
  // logprobs: -1 none, else each token's log-probability and the top `logprobs` (<= 20).
  int64_t submit(std::vector<int32_t> prompt, const SamplingParams& params, int32_t logprobs = -1);
  // The request stops at the next iteration (its last event: Finish::Cancelled); unknown or
  // finished ids are ignored.
  void cancel(int64_t id);
  // The events queued so far, waiting up to timeout_s for the first one.
  std::vector<RequestEvent> poll(double timeout_s);
  SchedulerStats stats() const;
  // What failed, when an iteration threw (its requests ended with Finish::Error); "" if none.
  std::string error() const;
  // Cancels everything and joins the loop (the destructor does it too).
  void shutdown();

  int64_t slots() const { return slots_; }
  int64_t slot_ctx() const { return slot_ctx_; }
  int64_t chunk() const { return chunk_; }

 private:
  static KVCache make_cache(Model& model, int64_t slots, int64_t slot_ctx, int64_t chunk);
  struct Seq {
    int64_t id = 0;
    std::vector<int32_t> prompt;
    SamplingParams params;
    std::unique_ptr<Sampler> sampler;
    std::vector<int32_t> history;  // prompt and generated tokens (the repetition penalty's)
    int64_t row = -1;              // its KV cache row while admitted
    int64_t cached = 0;            // slots [0, cached) of its row hold its tokens
    int64_t generated = 0;
    int32_t next = 0;              // a generating sequence's token to feed next
    int32_t logprobs = -1;
  };
  void loop();
  // Runs a plan: the step and the draws (no lock of the scheduler's held); the sequences'
  // tokens go into draws. Throws what the engine throws.
  void run(const IterationPlan& plan, std::vector<DrawRow>& draws);
  // After a run, under mu_: the sequences advance, and each draw becomes an event (a finished
  // sequence leaves its row).
  void advance(const IterationPlan& plan, std::vector<DrawRow>& draws, std::vector<RequestEvent>& out);
  // Moves waiting requests into free rows (under mu_), each to the row whose kept prefix
  // saves it the most.
  void admit();
  // The prompt tokens a free row can give `prompt` (a multiple of chunk_, 0 if none).
  int64_t reusable(int64_t row, const std::vector<int32_t>& prompt) const;
  // A sequence leaves its row (under mu_): the row keeps its whole prompt chunks.
  void release(const Seq& s, bool keep);
  void emit(std::vector<RequestEvent>& out, const Seq& s, int32_t token, Finish f);

  Model& model_;
  const int64_t slots_, slot_ctx_, chunk_;
  KVCache cache_;
  std::thread thread_;

  mutable std::mutex mu_;  // guards everything below
  std::condition_variable work_cv_, event_cv_;
  bool stop_ = false;
  int64_t next_id_ = 1;
  std::deque<std::unique_ptr<Seq>> waiting_;
  std::vector<std::unique_ptr<Seq>> active_;  // admitted, in admission order
  std::vector<int64_t> cancels_;
  std::vector<RequestEvent> events_;
  std::vector<uint8_t> row_busy_;
  std::vector<std::vector<int32_t>> row_prefix_;  // per row: the prompt chunks its cache holds
  std::vector<int64_t> row_freed_;                // per row: when it was last released
  int64_t release_count_ = 0;
  SchedulerStats totals_;
  std::string error_;
  std::vector<int32_t> ids_, pos_;  // run()'s step tokens (the loop's thread only)
};

}  // namespace gemma
