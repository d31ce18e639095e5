// Chain verification (DESIGN §3 verify_chunk): the per-row statistics both
// backends accumulate over a row's vocabulary, and the decision taken at each
// drafted position from them. One code path for the CPU op and the CUDA
// finalize kernel, so the two differ only in summation order.
#pragma once
#include <math.h>

#include <cstdint>

#include "filters.h"
#include "macros.h"
#include "race.h"
#include "rng.h"
#include "status.h"

namespace dspark {

// Online softmax normaliser: s = sum exp(x - m) over the values added.
struct SoftmaxAcc {
  float m;
  float s;
};

DSPARK_HD SoftmaxAcc softmax_empty() { return SoftmaxAcc{-INFINITY, 0.0f}; }

DSPARK_HD void softmax_add(SoftmaxAcc& a, float x) {
  if (x > a.m) {
    a.s = a.s * expf(a.m - x) + 1.0f;
    a.m = x;
  } else {
    a.s += expf(x - a.m);
  }
}

DSPARK_HD SoftmaxAcc softmax_merge(const SoftmaxAcc& a, const SoftmaxAcc& b) {
  if (b.m == -INFINITY) return a;
  if (a.m == -INFINITY) return b;
  const float m = a.m > b.m ? a.m : b.m;
  return SoftmaxAcc{m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

// The best two entries of a race (the second serves a point-mass draft's
// residual: p with the rejected token removed).
struct RaceTop2 {
  RaceBest best;
  RaceBest second;
};

DSPARK_HD RaceTop2 top2_empty() { return RaceTop2{race_empty(), race_empty()}; }

DSPARK_HD void top2_offer(RaceTop2& t, float score, int32_t index) {
  if (race_better(score, index, t.best)) {
    t.second = t.best;
    t.best = RaceBest{score, index};
  } else if (race_better(score, index, t.second)) {
    t.second = RaceBest{score, index};
  }
}

DSPARK_HD RaceTop2 top2_merge(RaceTop2 a, const RaceTop2& b) {
  top2_offer(a, b.best.score, b.best.index);
  top2_offer(a, b.second.score, b.second.index);
  return a;
}

// What pass 1 learns about a target row: its normaliser over the kept
// values (stochastic rows), the race for a token drawn from p itself (EMIT
// purpose; greedy rows: the argmax), and the non-finite flag.
struct TargetRowStats {
  SoftmaxAcc softmax;
  RaceTop2 race;
  int32_t flags;
};

DSPARK_HD TargetRowStats target_stats_empty() { return TargetRowStats{softmax_empty(), top2_empty(), 0}; }

DSPARK_HD TargetRowStats target_stats_merge(const TargetRowStats& a, const TargetRowStats& b) {
  return TargetRowStats{softmax_merge(a.softmax, b.softmax), top2_merge(a.race, b.race), a.flags | b.flags};
}

// Offer vocabulary group g (entries 4g.., `count` <= 4 of them) of a target
// row. Draws are skipped when no entry can enter the top two.
DSPARK_HD void target_offer_group(TargetRowStats& st, const RaceRow& row, const RaceStream& stream, int64_t g,
                                  const float (&l)[4], int count) {
  float x[4];
  bool any = false;
  DSPARK_UNROLL
  for (int j = 0; j < 4; ++j) {
    x[j] = j < count ? race_value(st.flags, row, l[j]) : -INFINITY;
    if (!row.greedy && x[j] > -INFINITY) softmax_add(st.softmax, x[j]);
    any |= race_may_win(x[j], st.race.second);
  }
  if (!any) return;
  const int32_t base = static_cast<int32_t>(4 * g);
  if (row.greedy) {
    DSPARK_UNROLL
    for (int j = 0; j < 4; ++j)
      if (x[j] > -INFINITY) top2_offer(st.race, x[j], base + j);
    return;
  }
  const PhiloxBlock bits =
      philox_draw(stream.seed, stream.position, stream.purpose, stream.slot, static_cast<uint32_t>(g));
  DSPARK_UNROLL
  for (int j = 0; j < 4; ++j)
    if (race_may_win(x[j], st.race.second)) top2_offer(st.race, race_score(x[j], bits.x[j]), base + j);
}

// The same group offered to the normaliser and flags only (no race): for a
// row whose token from p is needed only on a rare path (a draft-distribution
// request's rows before its last; DESIGN §3), drawn lazily there. The
// normaliser is bit-identical to target_offer_group's.
DSPARK_HD void target_offer_softmax(TargetRowStats& st, const RaceRow& row, const float (&l)[4], int count) {
  DSPARK_UNROLL
  for (int j = 0; j < 4; ++j) {
    if (j >= count) continue;
    const float x = race_value(st.flags, row, l[j]);
    if (x > -INFINITY) softmax_add(st.softmax, x);
  }
}

// Merged softmax-only stats as verify_step reads them: a stand-in winner
// marks "some candidate exists" (exactly when the race would have one), so
// the all-masked check is unchanged; the real winner is drawn lazily.
DSPARK_HD TargetRowStats target_stats_stand_in(TargetRowStats st) {
  st.race = top2_empty();
  if (st.softmax.m > -INFINITY) st.race.best = RaceBest{0.0f, 0};
  return st;
}

// A draft row given as logits: its normaliser at the draft temperature.
struct DraftRowStats {
  SoftmaxAcc softmax;
  int32_t flags;
};

DSPARK_HD DraftRowStats draft_stats_empty() { return DraftRowStats{softmax_empty(), 0}; }

DSPARK_HD DraftRowStats draft_stats_merge(const DraftRowStats& a, const DraftRowStats& b) {
  return DraftRowStats{softmax_merge(a.softmax, b.softmax), a.flags | b.flags};
}

// x = draft logit / draft temperature, or -inf with a flag when not finite.
DSPARK_HD float draft_value(int32_t& flags, float dl, float draft_temperature) {
  if (dl != dl || dl == INFINITY) {
    flags |= kNonfiniteLogits;
    return -INFINITY;
  }
  const float x = dl / draft_temperature;
  if (x == INFINITY || x != x) {
    flags |= kNonfiniteLogits;
    return -INFINITY;
  }
  return x;
}

DSPARK_HD void draft_offer(DraftRowStats& st, float dl, float draft_temperature) {
  const float x = draft_value(st.flags, dl, draft_temperature);
  if (x > -INFINITY) softmax_add(st.softmax, x);
}

// The `count` (<= 4) entries of a group of a draft-logit row, in order.
DSPARK_HD void draft_offer_group(DraftRowStats& st, const float (&l)[4], int count, float draft_temperature) {
  DSPARK_UNROLL
  for (int j = 0; j < 4; ++j)
    if (j < count) draft_offer(st, l[j], draft_temperature);
}

// p(token) of a stochastic target row: exp(x - m) / s over the kept set.
DSPARK_HD float target_prob(const RaceRow& row, const SoftmaxAcc& sm, float l) {
  int32_t ignored = 0;
  const float x = race_value(ignored, row, l);
  return x > -INFINITY ? expf(x - sm.m) / sm.s : 0.0f;
}

// q(token) of a draft row given as logits.
DSPARK_HD float draft_prob(const DraftRowStats& st, float dl, float draft_temperature) {
  int32_t ignored = 0;
  const float x = draft_value(ignored, dl, draft_temperature);
  return x > -INFINITY ? expf(x - st.softmax.m) / st.softmax.s : 0.0f;
}

enum VerifyAction : int32_t {
  kVerifyAccept = 0,    // the draft is accepted: go on to the next position
  kVerifyEmit = 1,      // emit `token` and stop
  kVerifyResidual = 2,  // rejected: emit from max(0, p - q), needs pass 2
  kVerifyAbort = 3,     // stop; `flags` holds the abort bit
};

struct VerifyStep {
  int32_t action;
  int32_t token;
  int32_t flags;  // status bits this step adds
};

// How the draft distribution q of a request is given.
enum DraftMode : int32_t { kDraftPointMass = 0, kDraftProbs = 1, kDraftLogits = 2 };

// Whether a stochastic target row j (of n drafts, drafted token tok there)
// needs the race for a token from p in its first pass: always for
// point-mass drafts (a rejection emits the runner-up), at the bonus row, and
// where the draft token is out of range (-1 padding ends a chain there and
// emits from p_j: common, so not left to the lazy pass). Elsewhere only the
// rare q = 0 and empty-residual paths need it, drawn lazily.
DSPARK_HD bool verify_row_races(int32_t mode, int32_t j, int32_t n, int32_t tok, int64_t vocab) {
  return mode == kDraftPointMass || j == n || tok < 0 || tok >= vocab;
}

// q of one draft-row entry with stored value v: the value itself for
// probabilities, its softmax share for logits.
DSPARK_HD float draft_q_value(int32_t mode, float v, const DraftRowStats& st, float draft_temperature) {
  return mode == kDraftProbs ? v : draft_prob(st, v, draft_temperature);
}

// The decision at position j (0 <= j <= n) of a request with merged target
// row stats `st`. tok: the drafted token (ignored at j == n); p_tok / q_tok:
// its target and draft probabilities (q ignored for point masses);
// draft_flags: the draft row's flags; coin_bits: COIN purpose, slot j + 1.
DSPARK_HD VerifyStep verify_step(bool greedy, int32_t mode, int32_t j, int32_t n, const TargetRowStats& st,
                                 int32_t tok, int32_t vocab, float p_tok, float q_tok, int32_t draft_flags,
                                 uint32_t coin_bits) {
  if (st.flags & kNonfiniteLogits) return VerifyStep{kVerifyAbort, -1, kNonfiniteLogits};
  if (st.race.best.index < 0) return VerifyStep{kVerifyAbort, -1, kAllMasked};
  const int32_t from_p = st.race.best.index;
  if (j == n) return VerifyStep{kVerifyEmit, from_p, 0};  // bonus token
  if (tok < 0 || tok >= vocab) return VerifyStep{kVerifyEmit, from_p, kTokenOutOfRange};
  if (greedy) return tok == from_p ? VerifyStep{kVerifyAccept, tok, 0} : VerifyStep{kVerifyEmit, from_p, 0};
  float q = 1.0f;
  if (mode != kDraftPointMass) {
    if (draft_flags & kNonfiniteLogits) return VerifyStep{kVerifyAbort, -1, kNonfiniteLogits};
    if (!(q_tok > 0.0f)) return VerifyStep{kVerifyEmit, from_p, kDraftProbZero};
    q = q_tok;
  }
  if (uniform_from_bits(coin_bits) * q < p_tok) return VerifyStep{kVerifyAccept, tok, 0};
  if (mode != kDraftPointMass) return VerifyStep{kVerifyResidual, -1, 0};
  // max(0, p - delta_tok) renormalised is p without tok: the race's runner-up
  // when tok won it (p(tok) < 1 here, so another kept token exists).
  const int32_t other = from_p != tok ? from_p : st.race.second.index;
  return VerifyStep{kVerifyEmit, other, 0};
}

// Pass 2: offer group g of the residual max(0, p - q) (q[] already computed
// from the draft row) to the race; log p = x - m - log s bounds log r.
DSPARK_HD void residual_offer_group(RaceBest& best, const RaceRow& row, const SoftmaxAcc& sm, float log_s,
                                    const RaceStream& stream, int64_t g, const float (&l)[4], const float (&q)[4],
                                    int count) {
  float x[4];
  bool any = false;
  DSPARK_UNROLL
  for (int j = 0; j < 4; ++j) {
    int32_t ignored = 0;
    x[j] = j < count ? race_value(ignored, row, l[j]) : -INFINITY;
    any |= race_may_win(x[j] - sm.m - log_s, best);
  }
  if (!any) return;
  const PhiloxBlock bits =
      philox_draw(stream.seed, stream.position, stream.purpose, stream.slot, static_cast<uint32_t>(g));
  const int32_t base = static_cast<int32_t>(4 * g);
  DSPARK_UNROLL
  for (int j = 0; j < 4; ++j) {
    if (!(x[j] > -INFINITY)) continue;
    const float r = expf(x[j] - sm.m) / sm.s - q[j];
    if (!(r > 0.0f)) continue;
    const float s = race_score(logf(r), bits.x[j]);
    if (race_better(s, base + j, best)) best = RaceBest{s, base + j};
  }
}

}  // namespace dspark
