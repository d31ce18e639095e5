// commit_tokens (DESIGN §3): appending a step's emitted tokens to each
// request's output on the device, shared by the CPU op and the CUDA kernel.
#pragma once
#include <cstdint>

#include "macros.h"
#include "status.h"

namespace dspark {

struct CommitArgs {
  int32_t* out_tokens;        // [R, max_total]
  int64_t max_total;
  int32_t* out_len;           // [R]
  int64_t* position;          // [R]
  const int32_t* max_len;     // [R] read-only
  bool* finished;             // [R]
  int32_t* last_token;        // [R]
  int32_t* error;             // [R]
  const int32_t* tokens;      // [R, width]: this step's tokens (-1 padded)
  int64_t width;
  const int32_t* emitted;     // [R]
  const int32_t* status;      // [R]
  const int32_t* stop_tokens; // [num_stop] or nullptr
  int32_t num_stop;
  int32_t num_requests;
};

DSPARK_HD bool commit_is_stop(const CommitArgs& a, int32_t token) {
  for (int32_t s = 0; s < a.num_stop; ++s)
    if (a.stop_tokens[s] == token) return true;
  return false;
}

// Appends request r's emitted tokens up to and including the first stop
// token and within max_len (and the buffer); advances position by the count
// appended; an abort status finishes the request with `error` set.
DSPARK_HD void commit_request(const CommitArgs& a, int64_t r) {
  if (a.finished[r]) return;
  const int32_t st = a.status[r];
  const int64_t n = a.emitted[r];
  if ((st & kAbortMask) || n < 0 || n > a.width || a.out_len[r] < 0) {
    a.finished[r] = true;
    a.error[r] = (st & kAbortMask) ? st : static_cast<int32_t>(kBadLengths);
    return;
  }
  int64_t len = a.out_len[r];
  const int64_t limit = a.max_len[r] < a.max_total ? a.max_len[r] : a.max_total;
  int64_t appended = 0;
  bool stop = false;
  for (int64_t i = 0; i < n && len < limit && !stop; ++i) {
    const int32_t t = a.tokens[r * a.width + i];
    a.out_tokens[r * a.max_total + len++] = t;
    a.last_token[r] = t;
    ++appended;
    stop = commit_is_stop(a, t);
  }
  a.out_len[r] = static_cast<int32_t>(len);
  a.position[r] += appended;
  if (stop || len >= limit) a.finished[r] = true;
}

}  // namespace dspark
