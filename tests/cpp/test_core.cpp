// Host-side tests of csrc/core: built with the system C++ compiler (no torch,
// no CUDA) by tests/test_core.py, so they exercise the very headers the
// kernels include. Prints "ok" and exits 0, or names the failed check.
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "core/filters.h"
#include "core/philox.h"
#include "core/race.h"
#include "core/rng.h"

using namespace dspark;

static int failures = 0;
#define CHECK(cond)                                              \
  do {                                                           \
    if (!(cond)) {                                               \
      std::printf("FAILED %s:%d: %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                \
    }                                                            \
  } while (0)

static void philox_known_answers() {
  // Random123 tests/kat_vectors: philox4x32 10
  struct Kat {
    uint32_t c[4], k[2], out[4];
  } kats[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
      {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
       {0xffffffffu, 0xffffffffu},
       {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
      {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
       {0xa4093822u, 0x299f31d0u},
       {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
  };
  for (const Kat& t : kats) {
    const PhiloxBlock b = philox4x32_10(t.c[0], t.c[1], t.c[2], t.c[3], t.k[0], t.k[1]);
    for (int i = 0; i < 4; ++i) CHECK(b.x[i] == t.out[i]);
  }
}

static void counter_layout() {
  // seed = k0 | k1 << 32; counter = (vocab >> 2, slot | purpose << 16, pos lo, pos hi)
  const int64_t seed = 0x0123456789abcdefLL, position = 0x0000000500000007LL;
  const PhiloxBlock a = philox_draw(seed, position, kPurposeEmit, 9, 3);
  const PhiloxBlock b = philox4x32_10(3, 9u | (2u << 16), 7, 5, 0x89abcdefu, 0x01234567u);
  for (int i = 0; i < 4; ++i) CHECK(a.x[i] == b.x[i]);
}

static void uniform_bounds() {
  CHECK(uniform_from_bits(0u) > 0.0f);
  CHECK(uniform_from_bits(0xffffffffu) < 1.0f);
  CHECK(uniform_from_bits(0xffffffffu) == 1.0f - 0x1p-24f);
  CHECK(uniform_from_bits(0u) == 0x1p-24f);
  CHECK(std::isfinite(exponential_from_bits(0u)) && exponential_from_bits(0xffffffffu) > 0.0f);
  // The common ((x >> 8) + 0.5) * 2^-24 would give exactly 1.0f here:
  CHECK((static_cast<float>(0xffffffffu >> 8) + 0.5f) * 0x1p-24f == 1.0f);
}

static void key_order() {
  const float vals[] = {-INFINITY, -3.5f, -1e-30f, -0.0f, 0.0f, 1e-30f, 2.0f, INFINITY};
  for (int i = 0; i + 1 < 8; ++i) {
    if (vals[i] == vals[i + 1])
      CHECK(float_key(vals[i]) == float_key(vals[i + 1]));  // -0 == +0
    else
      CHECK(float_key(vals[i]) < float_key(vals[i + 1]));
  }
}

static void keep_rules() {
  CHECK(!topk_active(0, 10) && topk_active(3, 10) && !topk_active(10, 10));
  CHECK(!topp_active(1.0f) && !topp_active(1.5f) && !topp_active(NAN) && topp_active(0.9f));
  CHECK(topp_keeps(0, 100, 0.0f));        // the argmax is always kept
  CHECK(topp_keeps(49, 100, 0.5f) && !topp_keeps(50, 100, 0.5f));  // strict <
  CHECK(mass_fixed(0.0f, 0.0f) == (uint64_t{1} << 40));
  CHECK(mass_fixed(-INFINITY, 0.0f) == 0);
}

static void race_ties() {
  RaceBest b = race_empty();
  CHECK(race_better(1.0f, 5, b));
  b = RaceBest{1.0f, 5};
  CHECK(race_better(1.0f, 4, b) && !race_better(1.0f, 6, b) && race_better(2.0f, 9, b));
  CHECK(race_merge(RaceBest{1.0f, 7}, RaceBest{1.0f, 3}).index == 3);
  int32_t token = 0, status = 0;
  // The skip bound holds for the extreme draws.
  CHECK(race_score(0.0f, 0xffffffffu) < kRaceGumbelBound && race_score(0.0f, 0u) < kRaceGumbelBound);
  CHECK(race_score(0.0f, 0xffffffffu) > 16.0f);
  race_finish(race_empty(), 0, token, status);
  CHECK(token == -1 && status == kAllMasked);
  race_finish(RaceBest{1.0f, 3}, kNonfiniteLogits, token, status);
  CHECK(token == -1 && status == kNonfiniteLogits);
}

int main() {
  philox_known_answers();
  counter_layout();
  uniform_bounds();
  key_order();
  keep_rules();
  race_ties();
  if (failures) return 1;
  std::printf("ok\n");
  return 0;
}
