// The CPU passes over one verification row that verify_chunk and
// verify_tree share (so a path-shaped tree is bit-identical to a chain):
// target-row statistics, draft-row normaliser, and the residual race.
#pragma once
#include <algorithm>
#include <cstdint>

#include "../core/verify.h"
#include "chunked.h"

namespace dspark {

// f(i, l[4], count) for the groups of 4 entries of row_ptr[begin, end), in
// order (begin a multiple of 4; count < 4 only at the end).
template <typename T, typename F>
void row_groups_each(const T* row_ptr, int64_t begin, int64_t end, F&& f) {
  for (int64_t i = begin; i < end; i += 4) {
    float l[4];
    const int count = static_cast<int>(std::min<int64_t>(4, end - i));
    for (int j = 0; j < 4; ++j) l[j] = j < count ? static_cast<float>(row_ptr[i + j]) : 0.0f;
    f(i, l, count);
  }
}

template <typename T>
TargetRowStats target_row_stats(const T* row_ptr, int64_t V, const RaceRow& row, const RaceStream& stream) {
  return chunked_reduce(
      V, target_stats_empty(),
      [&](int64_t begin, int64_t end) {
        TargetRowStats st = target_stats_empty();
        row_groups_each(row_ptr, begin, end, [&](int64_t i, const float(&l)[4], int count) {
          target_offer_group(st, row, stream, i >> 2, l, count);
        });
        return st;
      },
      target_stats_merge);
}

// Stochastic rows, first pass: the normaliser and flags only. The race for
// a token from p is needed only where a step emits from p, so the CPU draws
// it lazily (the CUDA kernels race a row's first pass where
// verify_row_races says so, and the other rows lazily too).
template <typename T>
TargetRowStats target_row_softmax(const T* row_ptr, int64_t V, const RaceRow& row) {
  return target_stats_stand_in(chunked_reduce(
      V, target_stats_empty(),
      [&](int64_t begin, int64_t end) {
        TargetRowStats acc = target_stats_empty();
        row_groups_each(row_ptr, begin, end,
                        [&](int64_t, const float(&l)[4], int count) { target_offer_softmax(acc, row, l, count); });
        return acc;
      },
      target_stats_merge));
}

template <typename D>
DraftRowStats draft_row_stats(const D* row_ptr, int64_t V, float draft_temperature) {
  return chunked_reduce(
      V, draft_stats_empty(),
      [&](int64_t begin, int64_t end) {
        DraftRowStats st = draft_stats_empty();
        for (int64_t i = begin; i < end; ++i) draft_offer(st, static_cast<float>(row_ptr[i]), draft_temperature);
        return st;
      },
      draft_stats_merge);
}

// q(i) of a draft row as the residual needs it.
template <typename D>
float draft_q(int32_t mode, const D* drow, int64_t i, const DraftRowStats& ds, float draft_temperature) {
  return draft_q_value(mode, static_cast<float>(drow[i]), ds, draft_temperature);
}

template <typename T, typename D>
RaceBest residual_race(const T* trow, const D* drow, int64_t V, const RaceRow& row, const SoftmaxAcc& sm,
                       int32_t mode, const DraftRowStats& ds, float draft_temperature, const RaceStream& stream) {
  const float log_s = logf(sm.s);
  return chunked_reduce(
      V, race_empty(),
      [&](int64_t begin, int64_t end) {
        RaceBest best = race_empty();
        for (int64_t i = begin; i < end; i += 4) {
          float l[4], q[4];
          const int count = static_cast<int>(std::min<int64_t>(4, end - i));
          for (int j = 0; j < 4; ++j) {
            l[j] = j < count ? static_cast<float>(trow[i + j]) : 0.0f;
            q[j] = j < count ? draft_q(mode, drow, i + j, ds, draft_temperature) : 0.0f;
          }
          residual_offer_group(best, row, sm, log_s, stream, i >> 2, l, q, count);
        }
        return best;
      },
      race_merge);
}

}  // namespace dspark
