// Sampling by the exponential race (DESIGN §2): the token is
// argmax_i p_i / E_i, E_i ~ Exp(1) drawn per vocabulary index; evaluated in
// log space as argmax_i x_i - log(E_i) with x = logits / temperature, so it
// needs neither the row maximum nor the normaliser: one pass, any layout.
// Greedy is argmax_i logits_i. Ties go to the lowest index in both.
#pragma once
#include <math.h>

#include <cstdint>

#include "filters.h"
#include "macros.h"
#include "rng.h"
#include "status.h"

namespace dspark {

struct RaceBest {
  float score;
  int32_t index;  // -1: no candidate yet
};

DSPARK_HD RaceBest race_empty() { return RaceBest{-INFINITY, -1}; }

// Total order: higher score first, then lower index; empty loses.
DSPARK_HD bool race_better(float score, int32_t index, const RaceBest& best) {
  if (index < 0) return false;
  if (best.index < 0) return true;
  return score > best.score || (score == best.score && index < best.index);
}

DSPARK_HD RaceBest race_merge(const RaceBest& a, const RaceBest& b) {
  return race_better(b.score, b.index, a) ? b : a;
}

DSPARK_HD float race_score(float x, uint32_t bits) { return x - logf(exponential_from_bits(bits)); }

// One row's sampling parameters, already resolved from the per-request inputs.
struct RaceRow {
  bool greedy;        // temperature <= 0 (or NaN)
  float temperature;
  uint32_t keep_key;  // top-k/top-p threshold key; 0 keeps everything
};

// -log(E) < 16.7 for every E that uniform_from_bits can produce (u <= 1 -
// 2^-24), so a candidate with fl(x + kRaceGumbelBound) < best.score scores
// strictly below best (rounding is monotone) and needs no random draw. This
// skips most of the Philox and log work on real LLM rows (most logits sit
// far below the maximum) without changing any result.
constexpr float kRaceGumbelBound = 17.0f;

// The race value of logit l: l itself (greedy) or x = l / T, or -inf when
// the entry is not a candidate (masked, top-k/top-p). Flags kNonfiniteLogits
// for NaN or +inf logits and for l / T overflowing to +inf.
DSPARK_HD float race_value(int32_t& flags, const RaceRow& row, float l) {
  if (l != l || l == INFINITY) {
    flags |= kNonfiniteLogits;
    return -INFINITY;
  }
  if (row.greedy) return l;
  const float x = l / row.temperature;
  if (x == INFINITY || x != x) {  // overflow; -inf / inf from a device-side T = inf
    flags |= kNonfiniteLogits;
    return -INFINITY;
  }
  return float_key(x) < row.keep_key ? -INFINITY : x;
}

DSPARK_HD bool race_may_win(float x, const RaceBest& best) {
  return x > -INFINITY && (best.index < 0 || x + kRaceGumbelBound >= best.score);
}

// The random stream of one request's draw (DESIGN §2 counter layout).
struct RaceStream {
  int64_t seed;
  int64_t position;
  uint32_t purpose;
  uint32_t slot;
};

// Offer the `count` (<= 4) entries of vocabulary group g (indices 4g..) with
// logits l[] to the race. One Philox call serves the group, and only when
// one of its entries may still win.
DSPARK_HD void race_offer_group(RaceBest& best, int32_t& flags, const RaceRow& row, const RaceStream& stream,
                                int64_t g, const float (&l)[4], int count) {
  float x[4];
  bool any = false;
  DSPARK_UNROLL
  for (int j = 0; j < 4; ++j) {
    x[j] = j < count ? race_value(flags, row, l[j]) : -INFINITY;
    any |= race_may_win(x[j], best);
  }
  if (!any) return;
  const int32_t base = static_cast<int32_t>(4 * g);
  if (row.greedy) {
    DSPARK_UNROLL
  for (int j = 0; j < 4; ++j)
      if (x[j] > -INFINITY && race_better(x[j], base + j, best)) best = RaceBest{x[j], base + j};
    return;
  }
  const PhiloxBlock bits =
      philox_draw(stream.seed, stream.position, stream.purpose, stream.slot, static_cast<uint32_t>(g));
  DSPARK_UNROLL
  for (int j = 0; j < 4; ++j) {
    if (!race_may_win(x[j], best)) continue;
    const float s = race_score(x[j], bits.x[j]);
    if (race_better(s, base + j, best)) best = RaceBest{s, base + j};
  }
}

// The final token and status of a row from its merged race and flags.
DSPARK_HD void race_finish(const RaceBest& best, int32_t flags, int32_t& token, int32_t& status) {
  if ((flags & kAbortMask) == 0 && best.index < 0) flags |= kAllMasked;
  status = flags;
  token = (flags & kAbortMask) ? -1 : best.index;
}

}  // namespace dspark
