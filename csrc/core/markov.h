// DSpark's Markov-head drafting step (DESIGN §3 markov_draft): what the CPU
// op and the CUDA kernels share. Step k = 1..G of request r computes
//   x = round_T((U_k + w1[x_{k-1}] @ w2) / temperature)   (fp32, IEEE divide;
//       undivided at temperature 0), masks x below the top-k/top-p keep key
//   of x at temperature 1, writes it, and races it (purpose DRAFT, slot k).
#pragma once
#include <cstdint>

#include "broadcast.h"
#include "filters.h"
#include "macros.h"
#include "race.h"
#include "rng.h"
#include "status.h"

namespace dspark {

template <typename T>
struct MarkovArgs {
  const T* base;              // [R, G, V]: entry (r, k, v) at r * base_stride_r + k * base_stride_g + v
  int64_t base_stride_r;
  int64_t base_stride_g;
  T* draft_logits;            // [R, G, V] contiguous, out
  int32_t* tokens;            // [R, G] out
  int32_t* status;            // [R] out
  const int64_t* anchor;      // [R] x_0
  const int32_t* num_draft;   // [R], or nullptr: G for every request
  int32_t num_requests;
  int32_t group;              // G
  int32_t vocab;              // V
  PerRequest<float> temperature;
  PerRequest<int32_t> top_k;
  PerRequest<float> top_p;
  PerRequest<int64_t> seed;
  PerRequest<int64_t> position;
};

// Steps request r may draft: num_draft clamped to [0, G].
template <typename T>
DSPARK_HD int32_t markov_limit(const MarkovArgs<T>& a, int64_t r) {
  if (!a.num_draft) return a.group;
  const int32_t n = a.num_draft[r];
  return n < 0 ? 0 : (n > a.group ? a.group : n);
}

DSPARK_HD bool markov_stochastic(float temperature) { return temperature > 0.0f; }

// Whether request r's rows are masked by top-k/top-p (never at temperature 0).
template <typename T>
DSPARK_HD bool markov_filtered(const MarkovArgs<T>& a, int64_t r) {
  return markov_stochastic(a.temperature[r]) && (topk_active(a.top_k[r], a.vocab) || topp_active(a.top_p[r]));
}

// One entry's corrected, processed value before rounding to the logits' dtype.
DSPARK_HD float markov_corrected(float base, float bias, float temperature) {
  const float z = base + bias;
  return markov_stochastic(temperature) ? z / temperature : z;
}

// Whether top-k/top-p masks the written value x (keep key `keep`). Never a
// NaN, whatever its sign bit (a negative NaN has a tiny order key): the race
// must see it and abort the request, as the reference does.
DSPARK_HD bool markov_masked(float x, uint32_t keep) { return x == x && float_key(x) < keep; }

// The race of a written row: at temperature 1 (the row is already divided)
// or greedy, no filter (the row is already masked).
DSPARK_HD RaceRow markov_race_row(float temperature) {
  return RaceRow{!markov_stochastic(temperature), 1.0f, 0u};
}

template <typename T>
DSPARK_HD RaceStream markov_stream(const MarkovArgs<T>& a, int64_t r, int32_t k) {
  return RaceStream{a.seed[r], a.position[r], kPurposeDraft, static_cast<uint32_t>(k)};
}

// A request's state between steps: its last token (a valid w1 row) and
// whether it still drafts.
struct MarkovState {
  int64_t prev;
  int32_t live;
};

// Before step 1: an anchor outside [0, V) drafts nothing (TOKEN_OUT_OF_RANGE).
DSPARK_HD MarkovState markov_start(int64_t anchor, int32_t vocab, int32_t& status) {
  const bool ok = anchor >= 0 && anchor < vocab;
  status = ok ? kStatusOk : kTokenOutOfRange;
  return MarkovState{ok ? anchor : 0, ok ? 1 : 0};
}

// After step k's race (token and flags from race_finish): write x_k (-1 when
// the request did not draft this step), merge the flags, stop on an abort.
DSPARK_HD void markov_advance(MarkovState& s, bool live_k, int32_t token, int32_t flags, int32_t& token_out,
                              int32_t& status) {
  token_out = live_k ? token : -1;
  if (live_k) status |= flags;
  s.live = (live_k && (flags & kAbortMask) == 0) ? 1 : 0;
  if (s.live) s.prev = token;
}

}  // namespace dspark
