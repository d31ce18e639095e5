"""schedule_verify, its calibration and the SPS table (DESIGN §3)."""
import pytest
import torch

import dspark_ops
import dspark_ops.schedule as schedule_mod
from dspark_ops import reference as ref
from dspark_ops.schedule import expected_calibration_error
from helpers import chi_square_pvalue

MODES = [("early_stop", {}), ("threshold", dict(threshold=0.4)), ("budget", dict(budget=7)),
         ("global", dict(allow_lossy=True))]


def random_case(R, G, seed, ties=False, staircase=False):
    g = torch.Generator().manual_seed(seed)
    conf = torch.rand(R, G, generator=g) * 0.6 + 0.4
    if ties:
        conf = (conf * 4).round() / 4  # many equal survivals
    conf[0, 0] = float("nan")
    num_draft = torch.randint(-1, G + 2, (R,), generator=g, dtype=torch.int32)
    B_max = R + R * G // 2
    sps = 1000.0 / (1.0 + torch.arange(B_max + 1, dtype=torch.float64) * (0.02 + 0.05 * torch.rand(1, generator=g).item()))
    if staircase:
        sps = sps[(torch.arange(B_max + 1) // 8) * 8]  # CUDA-graph buckets
    return conf, num_draft, sps


@pytest.mark.parametrize("mode,kw", MODES)
@pytest.mark.parametrize("R,G,ties,staircase", [(1, 7, False, False), (13, 5, True, False), (64, 7, False, True),
                                                (300, 16, True, True)])
def test_matches_reference_exactly(mode, kw, R, G, ties, staircase):
    conf, n, sps = random_case(R, G, R * G, ties, staircase)
    got = dspark_ops.schedule_verify(conf, n, sps, mode=mode, **kw)
    want = ref.schedule_verify(conf, n, sps, mode=mode, threshold=kw.get("threshold"), budget=kw.get("budget"))
    assert torch.equal(got, want)


def test_early_stop_stays_stopped_when_the_objective_recovers():
    """Algorithm 1 stops at the first admission that does not pay, even when
    a later one would (the admission loop loads candidates ahead: a stopped
    request must not restart within the same group of loads)."""
    conf, n = torch.ones(1, 4), torch.tensor([4], dtype=torch.int32)
    sps = torch.tensor([1.0, 1.0, 0.5, 2.0, 2.0, 2.0], dtype=torch.float64)  # tau * SPS: 1, then 1, 6, 8, 10
    got = dspark_ops.schedule_verify(conf, n, sps, mode="early_stop")
    assert got.tolist() == [0] == ref.schedule_verify(conf, n, sps, mode="early_stop").tolist()
    assert dspark_ops.schedule_verify(conf, n, sps, mode="global", allow_lossy=True).tolist() == [4]


@pytest.mark.parametrize("threshold", [0.25, 0.125, 0.0, -1.0, 1.0, 1.5, float("nan")])
def test_threshold_edges_match_reference(threshold):
    """threshold counts each request's survivals >= threshold without
    ranking (csrc/core/schedule.h): the same as ranking and cutting, also at
    survivals equal to the threshold (quarters: exact products), zero
    confidences, NaN and thresholds outside [0, 1]."""
    conf, n, sps = random_case(50, 6, 9, ties=True)
    conf[1, 2] = 0.0
    conf[2] = 1.0
    got = dspark_ops.schedule_verify(conf, n, sps, mode="threshold", threshold=threshold)
    want = ref.schedule_verify(conf, n, sps, mode="threshold", threshold=threshold)
    assert torch.equal(got, want)
    if threshold == 0.25:  # the equality case is exercised
        assert bool((torch.cumprod(conf.double().nan_to_num(0.0), 1) == 0.25).any())


def test_temperatures_calibrate_inside():
    conf, n, sps = random_case(20, 6, 3)
    logits = torch.logit(conf.clamp(0.01, 0.99))
    temps = torch.tensor([1.0, 1.5, 0.7, 2.0, 1.0, 0.5])
    got = dspark_ops.schedule_verify(logits, n, sps, temperatures=temps)
    want = ref.schedule_verify(logits, n, sps, temperatures=temps)
    assert torch.equal(got, want)


def brute_force_early_stop(conf, n, sps):
    """Algorithm 1 written differently: repeatedly take the best frontier
    candidate (the next position of some request), stop when it does not pay."""
    c = ref.calibrated_confidence(conf, None)
    R, G = c.shape
    n = n.clamp(0, G)
    l = [0] * R
    surv = [1.0] * R
    B, tau = R, float(R)

    def f(B, tau):
        return tau * (float(sps[B]) if B < sps.shape[0] else 0.0)

    while True:
        options = [(surv[r] * float(c[r, l[r]]), r) for r in range(R) if l[r] < int(n[r])]
        if not options:
            break
        a, r = max(options, key=lambda t: (t[0], -t[1]))
        if not f(B + 1, tau + a) > f(B, tau):
            break
        B, tau, l[r], surv[r] = B + 1, tau + a, l[r] + 1, a
    return torch.tensor(l, dtype=torch.int32)


@pytest.mark.parametrize("seed", range(6))
def test_early_stop_equals_a_frontier_search(seed):
    conf, n, sps = random_case(9, 5, 100 + seed)
    assert torch.equal(dspark_ops.schedule_verify(conf, n, sps), brute_force_early_stop(conf, n, sps))


def test_flat_table_admits_every_candidate_with_gain_and_steep_fewer():
    conf = torch.tensor([[0.9, 0.9, 0.0, 0.5], [0.5, 0.5, 0.5, 0.5]])
    n = torch.tensor([4, 4], dtype=torch.int32)
    flat = torch.full((20,), 10.0, dtype=torch.float64)
    assert dspark_ops.schedule_verify(conf, n, flat).tolist() == [2, 4]  # survival 0 adds nothing
    steep = 10.0 / (1.0 + torch.arange(20, dtype=torch.float64))
    assert dspark_ops.schedule_verify(conf, n, steep).sum() < 6
    short = torch.full((5,), 10.0, dtype=torch.float64)  # SPS 0 beyond B_max = 4
    assert int(dspark_ops.schedule_verify(conf, n, short).sum()) == 2


def appendix_trials(mode, N=20000, seed=5, **kw):
    """The paper's appendix case: target (0.7, 0.3), draft (0.5, 0.5); the
    confidence of draft 2 is 1 if draft 1 is token 0, else 0. The first
    emitted token must keep (0.7, 0.3) under a lossless schedule."""
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randint(0, 2, (N,), generator=g, dtype=torch.int32)
    x2 = torch.randint(0, 2, (N,), generator=g, dtype=torch.int32)
    conf = torch.stack([torch.full((N,), 0.5), (x1 == 0).float()], 1)
    sps = torch.tensor([0.0, 1.0, 0.6, 0.6], dtype=torch.float64)  # one draft does not pay, two do
    verify_len = torch.stack([dspark_ops.schedule_verify(conf[i:i + 1], torch.tensor([2], dtype=torch.int32), sps,
                                                         mode=mode, **kw) for i in range(N)]).flatten()
    cu = torch.zeros(N + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(verify_len, 0)
    drafts = torch.stack([x1, x2], 1)
    draft_tokens = torch.cat([drafts[i, :int(verify_len[i])] for i in range(N)]).to(torch.int32)
    target = torch.log(torch.tensor([0.7, 0.3]))
    rows = target.expand(int(cu[-1]) + N, 2).contiguous()
    probs = torch.full((max(int(cu[-1]), 1), 2), 0.5)
    res = dspark_ops.verify_chunk(rows, draft_tokens, cu, max_draft=2, draft_probs=probs[:int(cu[-1])], seed=11,
                                  position=torch.arange(N))
    return res.tokens[:, 0].long()


@pytest.mark.parametrize("mode,kw", [("early_stop", {}), ("threshold", dict(threshold=0.4)), ("budget", dict(budget=1))])
def test_appendix_case_lossless_modes_keep_the_target(mode, kw):
    first = appendix_trials(mode, **kw)
    assert chi_square_pvalue(first, torch.tensor([0.7, 0.3], dtype=torch.float64)) > 1e-3


def test_appendix_case_global_skews_to_085():
    first = appendix_trials("global", allow_lossy=True)
    assert chi_square_pvalue(first, torch.tensor([0.7, 0.3], dtype=torch.float64)) < 1e-6
    assert chi_square_pvalue(first, torch.tensor([0.85, 0.15], dtype=torch.float64)) > 1e-3


def test_mode_errors():
    conf, n, sps = random_case(3, 2, 0)
    with pytest.raises(ValueError, match="not lossless"):
        dspark_ops.schedule_verify(conf, n, sps, mode="global")
    with pytest.raises(ValueError, match="needs threshold="):
        dspark_ops.schedule_verify(conf, n, sps, mode="threshold")
    with pytest.raises(ValueError, match="needs budget="):
        dspark_ops.schedule_verify(conf, n, sps, mode="budget")
    with pytest.raises(ValueError, match="mode must be"):
        dspark_ops.schedule_verify(conf, n, sps, mode="greedy")
    with pytest.raises(ValueError, match="sps_table must have dtype torch.float64, got torch.float32"):  # the op itself
        torch.ops.dspark_ops.schedule_verify(conf, n, sps.float(), "early_stop", float("nan"), None, None)
    with pytest.raises(ValueError, match="budget must be >= 0 drafted tokens, got -1"):
        dspark_ops.schedule_verify(conf, n, sps, mode="budget", budget=-1)
    # the wrapper converts a float32 table (the values it holds, in fp64)
    assert torch.equal(dspark_ops.schedule_verify(conf, n, sps.float()),
                       dspark_ops.schedule_verify(conf, n, sps.float().double()))


def test_fit_sequential_temperatures_lowers_ece():
    g = torch.Generator().manual_seed(1)
    N, G = 20000, 4
    true_logit = torch.randn(N, G, generator=g) * 1.5 + 1.0
    survive = torch.rand(N, G, generator=g) < torch.sigmoid(true_logit)
    accepted = torch.where(survive.all(1), torch.full((N,), G), (~survive).int().argmax(1))
    overconfident = true_logit * torch.tensor([3.0, 0.4, 2.0, 1.0])  # miscalibrated per position
    temps = dspark_ops.fit_sequential_temperatures(overconfident, accepted)
    before = after = 0.0
    run_b = torch.ones(N, dtype=torch.float64)
    run_a = torch.ones(N, dtype=torch.float64)
    for k in range(G):
        run_b = run_b * torch.sigmoid(overconfident[:, k].double())
        run_a = run_a * torch.sigmoid(overconfident[:, k].double() / float(temps[k]))
        before += expected_calibration_error(run_b, accepted > k)
        after += expected_calibration_error(run_a, accepted > k)
    assert after < 0.5 * before
    assert abs(float(temps[0]) - 3.0) < 0.6


class FakeClock:
    """time.perf_counter for measure_sps on the CPU: a step of batch B
    advances it by delays[B] seconds (no real sleeps: exact on a loaded
    machine)."""

    def __init__(self, delays):
        self.now, self.delays = 0.0, delays

    def perf_counter(self):
        return self.now

    def step(self, B):
        self.now += self.delays[B]


def fake_measure(monkeypatch, delays, sizes, **kw):
    clock = FakeClock(delays)
    monkeypatch.setattr(schedule_mod, "time", clock)
    return dspark_ops.measure_sps(clock.step, sizes, warmup=0, iters=3, device="cpu", **kw)


def test_measure_sps_interpolates_the_step_time(monkeypatch):
    table = fake_measure(monkeypatch, {1: 0.001, 4: 0.002, 8: 0.006}, [4, 1, 8])
    assert table.shape == (9,) and table.dtype == torch.float64
    assert float(table[0]) == float(table[1]) == pytest.approx(1000.0)
    assert 1 / float(table[6]) == pytest.approx(0.004)  # halfway between 2 and 6 ms
    assert 1 / float(table[3]) == pytest.approx(0.001 + 2 / 3 * 0.001)


def test_measure_sps_fits(monkeypatch):
    """Step times with a dip (B = 3 faster than B = 2: noise on a real
    machine) and a non-convex rise: "convex" gives their greatest convex
    non-decreasing minorant (the lower hull: 2, 3, 4, 10 ms), "monotone"
    the isotonic fit (2, 6, 6, 10), "raw" (the default) the medians."""
    delays = {1: 0.002, 2: 0.008, 3: 0.004, 4: 0.010}
    for fit, want in (("convex", [2, 3, 4, 10]), ("monotone", [2, 6, 6, 10]), ("raw", [2, 8, 4, 10]),
                      (None, [2, 8, 4, 10])):
        table = fake_measure(monkeypatch, delays, [1, 2, 3, 4], **({} if fit is None else dict(fit=fit)))
        assert [1e3 / float(x) for x in table[1:]] == pytest.approx(want), fit
    with pytest.raises(ValueError, match="fit must be"):
        dspark_ops.measure_sps(lambda B: None, [1], fit="smooth")


@pytest.mark.parametrize("fixed_ms,c,best", [(0, 0.99, 0), (10, 0.7, 4)])
def test_early_stop_on_a_convex_table_stops_at_its_best_admission(monkeypatch, fixed_ms, c, best):
    """A step time of fixed + B ms measured at sparse sizes (1, 2, 10):
    interpolating the time, not the SPS, keeps it convex, so early_stop's
    first stop is the best admission count (brute force over every count).
    Interpolating the SPS made the time concave between 2 and 10: at 0 ms
    fixed the objective then peaked at 5 drafts while early_stop stopped at
    the first (measured by the review)."""
    table = fake_measure(monkeypatch, {B: (fixed_ms + B) * 1e-3 for B in (1, 2, 10)}, [1, 2, 10], fit="convex")
    conf = torch.full((1, 9), c)
    n = torch.tensor([9], dtype=torch.int32)
    got = int(dspark_ops.schedule_verify(conf, n, table, mode="early_stop")[0])
    surv = torch.cumprod(conf[0].double(), 0)
    objective = [float((1 + surv[:k].sum()) * table[1 + k]) for k in range(10)]
    assert got == max(range(10), key=lambda k: objective[k]) == best


def brute_minorant(xs, ys):
    """The greatest convex non-decreasing minorant by definition: at each x,
    the lowest chord between points on either side (or the point itself),
    then held at its minimum left of it."""
    n = len(xs)
    f = []
    for i in range(n):
        best = ys[i]
        for j in range(i + 1):
            for k in range(i, n):
                if j < k:
                    best = min(best, ys[j] + (ys[k] - ys[j]) * (xs[i] - xs[j]) / (xs[k] - xs[j]))
        f.append(best)
    k = f.index(min(f))
    return [f[k]] * k + f[k:]


def test_convex_fit_is_the_greatest_convex_non_decreasing_minorant():
    from dspark_ops.schedule import _convex_non_decreasing
    g = torch.Generator().manual_seed(0)
    for case in range(200):
        n = int(torch.randint(1, 12, (1,), generator=g))
        xs = sorted(set(torch.randint(1, 100, (n,), generator=g).tolist()))
        ys = (torch.rand(len(xs), generator=g) * 10).tolist()
        if case % 4 == 0:
            ys = [2.0 + 0.5 * x for x in xs]  # collinear
        f = _convex_non_decreasing([float(x) for x in xs], ys)
        assert f == pytest.approx(brute_minorant(xs, ys), abs=1e-9), (xs, ys)


def test_opcheck_and_compile():
    conf, n, sps = random_case(6, 4, 2)
    budget = torch.tensor([5])
    torch.library.opcheck(torch.ops.dspark_ops.schedule_verify.default,
                          (conf, n, sps, "budget", float("nan"), budget, None))
    torch.library.opcheck(torch.ops.dspark_ops.schedule_verify.out,
                          (conf, n, sps, "early_stop", float("nan"), None, None),
                          dict(verify_len=torch.empty(6, dtype=torch.int32)))

    def step(c, nd, s):
        return dspark_ops.schedule_verify(c, nd, s, mode="threshold", threshold=0.5)

    assert torch.equal(torch.compile(step, fullgraph=True, backend="aot_eager")(conf, n, sps), step(conf, n, sps))


@pytest.mark.cuda
@pytest.mark.parametrize("mode,kw", MODES)
@pytest.mark.parametrize("R,G", [(1, 7), (256, 7), (4096, 16)])
def test_cuda_matches_cpu_exactly(mode, kw, R, G):
    conf, n, sps = random_case(R, G, R + G, ties=True, staircase=True)
    want = dspark_ops.schedule_verify(conf, n, sps, mode=mode, **kw)
    got = dspark_ops.schedule_verify(conf.cuda(), n.cuda(), sps.cuda(), mode=mode, **kw)
    assert torch.equal(got.cpu(), want)
