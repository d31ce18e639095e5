// schedule_verify (DESIGN §3): DSpark's confidence-scheduled verification.
// Survival a[r, j] = prod_{i <= j} c[r, i] (fp64, in order); candidates ranked
// by survival descending (ties: request, then position); the admission count
// per mode from the ranked list with tau summed in fp64 in that order, so CPU
// and CUDA agree exactly (with temperatures, exp's last bit may differ
// between libm and CUDA: the margin rule). Shared by the CPU op and the CUDA kernel.
#pragma once
#include <math.h>

#include <cstdint>

#include "macros.h"

namespace dspark {

enum ScheduleMode : int32_t { kEarlyStop = 0, kThreshold = 1, kBudget = 2, kGlobal = 3 };

struct ScheduleArgs {
  const float* confidence;     // [R, G]: calibrated probabilities, or logits with temperatures
  int32_t num_requests;        // R
  int32_t group;               // G
  const int32_t* num_draft;    // [R]
  const double* sps;           // [sps_len]: steps per second at token batch B
  int64_t sps_len;
  const float* temperatures;   // [G] or nullptr
  int32_t mode;
  double threshold;
  const int64_t* budget;       // [1] or nullptr
  int32_t* verify_len;         // [R] out
};

// c[r, j] as a probability in [0, 1] (NaN counts as 0).
DSPARK_HD double schedule_confidence(const ScheduleArgs& a, int64_t r, int64_t j) {
  double x = static_cast<double>(a.confidence[r * a.group + j]);
  if (a.temperatures != nullptr) x = 1.0 / (1.0 + exp(-x / static_cast<double>(a.temperatures[j])));
  if (!(x > 0.0)) return 0.0;
  return x < 1.0 ? x : 1.0;
}

DSPARK_HD int32_t schedule_num_draft(const ScheduleArgs& a, int64_t r) {
  const int32_t n = a.num_draft[r];
  return n < 0 ? 0 : (n > a.group ? a.group : n);
}

// Ranking: higher survival first, then lower id = r * G + j.
DSPARK_HD bool schedule_before(double key_a, int32_t id_a, double key_b, int32_t id_b) {
  return key_a > key_b || (key_a == key_b && id_a < id_b);
}

DSPARK_HD double schedule_sps(const ScheduleArgs& a, int64_t B) { return B < a.sps_len ? a.sps[B] : 0.0; }

// Candidates the admission loop loads ahead, so that their loads overlap
// and only the fp64 chain of tau is sequential.
constexpr int kScheduleAhead = 4;

// The rate with ranked candidate i admitted: token batch B = R + 1 + i.
DSPARK_HD double schedule_sps_admitted(const ScheduleArgs& a, int64_t i) {
  return schedule_sps(a, a.num_requests + 1 + i);
}

// How many of the N ranked candidates (survivals `keys`, descending) to admit
// in modes early_stop, budget and global (threshold ranks nothing:
// schedule_threshold_len); sps_at(i) = schedule_sps_admitted(a, i), from
// wherever the caller keeps it. tau += key, then next = tau * sps, in rank
// order: the same operations in the same order whatever loads ahead, so CPU
// and CUDA agree bit for bit.
template <typename SpsAt>
DSPARK_HD int64_t schedule_admit_count(const ScheduleArgs& a, const double* keys, int64_t N, SpsAt sps_at) {
  if (a.mode == kBudget) {
    const int64_t b = a.budget != nullptr ? a.budget[0] : 0;
    return b < 0 ? 0 : (b < N ? b : N);
  }
  const bool early = a.mode == kEarlyStop;  // else kGlobal: the best prefix (lossy; for studies)
  int64_t k = 0, best_k = 0;
  double tau = static_cast<double>(a.num_requests);
  double f = tau * schedule_sps(a, a.num_requests), best_f = f;
  bool going = true;  // early_stop: Algorithm 1 stops at the first admission that does not pay
  for (int64_t i0 = 0; i0 < N && going; i0 += kScheduleAhead) {
    double key[kScheduleAhead], sps[kScheduleAhead];
    DSPARK_UNROLL
    for (int u = 0; u < kScheduleAhead; ++u) {
      key[u] = i0 + u < N ? keys[i0 + u] : 0.0;
      sps[u] = i0 + u < N ? sps_at(i0 + u) : 0.0;
    }
    DSPARK_UNROLL
    for (int u = 0; u < kScheduleAhead; ++u) {
      if (i0 + u < N) {
        tau += key[u];
        const double next = tau * sps[u];
        if (early) {
          going = going && next > f;
          if (going) {
            f = next;
            k = i0 + u + 1;
          }
        } else if (next > best_f) {
          best_f = next;
          best_k = i0 + u + 1;
        }
      }
    }
  }
  return early ? k : best_k;
}

// threshold mode without ranking: a request's survivals never increase
// (each is the previous one times a confidence in [0, 1], and fp64 rounding
// is monotone), so the ranked prefix of survivals >= threshold is, per
// request, a prefix of its positions: the same verify_len as ranking.
DSPARK_HD int32_t schedule_threshold_len(const ScheduleArgs& a, int64_t r) {
  const int32_t n = schedule_num_draft(a, r);
  double s = 1.0;
  int32_t len = 0;
  for (int32_t j = 0; j < n; ++j) {
    s *= schedule_confidence(a, r, j);
    if (!(s >= a.threshold)) break;
    ++len;
  }
  return len;
}

}  // namespace dspark
