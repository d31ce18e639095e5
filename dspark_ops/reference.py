"""Pure-PyTorch implementation of every op: the executable specification.

Slow and obviously correct: loops over requests, vectorised over the
vocabulary, float64 wherever a sum decides something. The CPU and CUDA ops
are tested against these functions.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._enums import ABORT_MASK as ABORT, MAX_SLOT, SIBLING_MODES, Purpose, SiblingMode, Status

_M32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
MASS_SCALE = float(1 << 40)  # top-p masses are 2^-40 fixed point


# ---------------------------------------------------------------- Philox RNG


def _mulhilo(a: int, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * b, b an int64 tensor of uint32 values,
    computed in int64 without overflow by splitting a into 16-bit halves."""
    t_lo = b * (a & 0xFFFF)  # < 2^48
    t_hi = b * (a >> 16)  # < 2^48
    s = ((t_hi & 0xFFFF) << 16) + t_lo
    return (t_hi >> 16) + (s >> 32), s & _M32


def philox4x32_10(counter: Tuple[torch.Tensor, ...], key: Tuple[torch.Tensor, torch.Tensor]
                  ) -> torch.Tensor:
    """Philox4x32-10 on int64 tensors holding uint32 values.

    counter: four broadcastable tensors; key: two. Returns [..., 4] int64.
    """
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) for c in counter)
    k0, k1 = (torch.as_tensor(k, dtype=torch.int64) for k in key)
    c0, c1, c2, c3, k0, k1 = torch.broadcast_tensors(c0, c1, c2, c3, k0, k1)
    for _ in range(10):
        hi0, lo0 = _mulhilo(_PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _PHILOX_W0) & _M32
        k1 = (k1 + _PHILOX_W1) & _M32
    return torch.stack([c0, c1, c2, c3], dim=-1)


def random_bits(seed: int, position: int, purpose: int, slot: int, vocab: int) -> torch.Tensor:
    """The 32-bit draws for vocabulary indices 0..vocab-1 of one (seed,
    position, purpose, slot): DESIGN §2's counter layout. [vocab] int64."""
    seed &= (1 << 64) - 1
    groups = torch.arange((vocab + 3) // 4, dtype=torch.int64)
    out = philox4x32_10(
        (groups, (slot | (purpose << 16)) & _M32, position & _M32, (position >> 32) & _M32),
        (seed & _M32, seed >> 32),
    )
    return out.reshape(-1)[:vocab]


def uniform_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """u = ((x >> 9) + 0.5) * 2^-23 in float32: in (0, 1), never 1.0."""
    return ((bits >> 9).to(torch.float32) + 0.5) * (2.0 ** -23)


def exponential_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """E = -log(u), float32."""
    return -torch.log(uniform_from_bits(bits))


# ------------------------------------------------------------ keep rules


def topk_keep(x: torch.Tensor, top_k: int) -> torch.Tensor:
    """[V] bool: fewer than top_k entries of x are strictly larger.
    top_k <= 0 or >= V: everything."""
    V = x.shape[0]
    if top_k <= 0 or top_k >= V:
        return torch.ones(V, dtype=torch.bool)
    kth = torch.topk(x, top_k).values[top_k - 1]
    return x >= kth


def mass_fixed(x: torch.Tensor, row_max: float) -> torch.Tensor:
    """exp(x - row_max) in float32, as a 2^-40 fixed-point int64."""
    w = torch.exp(x - torch.tensor(row_max, dtype=torch.float32))
    return torch.floor(w.to(torch.float64) * MASS_SCALE + 0.5).to(torch.int64)


def topp_mass_above(x: torch.Tensor, keep: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """For every entry: the fixed-point mass of the kept entries with a
    strictly larger x (S), and the kept total (Z)."""
    row_max = float(x[keep].max())
    mass = torch.where(keep, mass_fixed(x, row_max), torch.zeros_like(x, dtype=torch.int64))
    order = torch.argsort(x, descending=True, stable=True)
    xs, ms = x[order], mass[order]
    excl = torch.cumsum(ms, 0) - ms
    _, inverse, counts = torch.unique_consecutive(xs, return_inverse=True, return_counts=True)
    group_start = torch.cumsum(counts, 0) - counts
    above_sorted = excl[group_start[inverse]]
    above = torch.empty_like(above_sorted)
    above[order] = above_sorted
    return above, int(mass.sum())


def topp_keep(x: torch.Tensor, keep: torch.Tensor, top_p: float) -> torch.Tensor:
    """Refine `keep` (top-k) by top-p: keep iff S < top_p * Z or S == 0.
    top_p >= 1: unchanged (the filter is skipped, never evaluated)."""
    if not top_p < 1.0 or not bool(keep.any()) or not bool(torch.isfinite(x[keep]).any()):
        return keep
    above, total = topp_mass_above(x, keep)
    bound = float(torch.tensor(top_p, dtype=torch.float32)) * float(total)
    return keep & ((above == 0) | (above.to(torch.float64) < bound))


# -------------------------------------------------------------------- sample


def _per_request(value, R: int, dtype) -> torch.Tensor:
    t = torch.as_tensor(value).to(dtype).reshape(-1).cpu()
    return t.expand(R) if t.numel() == 1 else t


def _sampling_params(R: int, temperature, top_k, top_p, seed, position):
    """The per-request sampling parameters as CPU tensors [R]."""
    return (_per_request(temperature, R, torch.float32), _per_request(top_k, R, torch.int64),
            _per_request(top_p, R, torch.float32), _per_request(seed, R, torch.int64),
            _per_request(position, R, torch.int64))


def sample_row(l: torch.Tensor, *, temperature: float, top_k: int, top_p: float, seed: int,
               position: int, purpose: int, slot: int) -> Tuple[int, int, torch.Tensor]:
    """One request: (token, status, scores [V] float32 with -inf where not a
    candidate). `l` is the row's logits as float32."""
    V = l.shape[0]
    status = 0
    if bool(torch.isnan(l).any() | (l == float("inf")).any()):
        return -1, int(Status.NONFINITE_LOGITS), torch.full((V,), float("-inf"))
    if not temperature > 0:
        scores = l.clone()
    else:
        x = l / torch.tensor(temperature, dtype=torch.float32)
        if bool((x == float("inf")).any() | torch.isnan(x).any()):
            return -1, int(Status.NONFINITE_LOGITS), torch.full((V,), float("-inf"))
        keep = topp_keep(x, topk_keep(x, top_k), top_p) & (x > float("-inf"))
        bits = random_bits(seed, position, purpose, slot, V)
        scores = torch.where(keep, x - torch.log(exponential_from_bits(bits)),
                             torch.tensor(float("-inf")))
    if not bool((scores > float("-inf")).any()):
        return -1, status | int(Status.ALL_MASKED), scores
    return int(torch.argmax(scores)), status, scores  # argmax: first maximum


def sample(logits: torch.Tensor, *, temperature=1.0, top_k=0, top_p=1.0, seed=0, position=0,
           purpose: int = Purpose.DRAFT, slot=0, row_start: Optional[torch.Tensor] = None
           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference `sample`: (tokens [R] int32, status [R] int32). Arguments as
    dspark_ops.sample (scalars or [R]/[1] tensors)."""
    T, V = logits.shape
    R = row_start.shape[0] if row_start is not None else T
    temps, ks, ps, seeds, positions = _sampling_params(R, temperature, top_k, top_p, seed, position)
    slots = _per_request(slot, R, torch.int64)
    starts = row_start.cpu().to(torch.int64) if row_start is not None else torch.arange(R)
    tokens = torch.full((R,), -1, dtype=torch.int32)
    status = torch.zeros(R, dtype=torch.int32)
    for r in range(R):
        row, s = int(starts[r]), int(slots[r])
        if not (0 <= row < T) or not (0 <= s <= MAX_SLOT):
            status[r] = int(Status.BAD_LENGTHS)
            continue
        tok, st, _ = sample_row(
            logits[row].detach().cpu().to(torch.float32), temperature=float(temps[r]), top_k=int(ks[r]),
            top_p=float(ps[r]), seed=int(seeds[r]), position=int(positions[r]), purpose=int(purpose),
            slot=s)
        tokens[r], status[r] = tok, st
    return tokens, status


# -------------------------------------------------------------- verify_chunk

_NEG_INF = float("-inf")


def _nonfinite(row: torch.Tensor) -> bool:
    return bool(torch.isnan(row).any() | (row == float("inf")).any())


def target_distribution(l: torch.Tensor, temperature: float, top_k: int, top_p: float
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x [V] float32 = l / T, p [V] float64): the processed distribution of
    a stochastic row (DESIGN §2 order); p is 0 outside the keep set."""
    x = l / torch.tensor(temperature, dtype=torch.float32)
    keep = topp_keep(x, topk_keep(x, top_k), top_p) & (x > _NEG_INF)
    xd = x.to(torch.float64)
    if not bool(keep.any()):  # everything masked: p = 0 (ALL_MASKED for the caller)
        return x, torch.zeros_like(xd)
    w = torch.where(keep, torch.exp(xd - xd[keep].max()), torch.zeros((), dtype=torch.float64))
    return x, w / w.sum()


def target_row(l: torch.Tensor, temperature: float, top_k: int, top_p: float):
    """What a verifier needs of one target row l [V] float32, with the
    checks every verifier makes first: (abort Status or 0, the argmax
    (temperature 0) or the processed distribution p (target_distribution),
    the row's top-p margin (inf when top-p is off or greedy))."""
    greedy = not temperature > 0
    if _nonfinite(l) or (not greedy and _nonfinite(l / torch.tensor(temperature, dtype=torch.float32))):
        return int(Status.NONFINITE_LOGITS), None, float("inf")
    if greedy:
        if not bool((l > _NEG_INF).any()):
            return int(Status.ALL_MASKED), None, float("inf")
        return 0, int(torch.argmax(l)), float("inf")
    x, p = target_distribution(l, temperature, top_k, top_p)
    if not bool((p > 0).any()):
        return int(Status.ALL_MASKED), None, float("inf")
    return 0, p, topp_margin(x, top_k, top_p) if top_p < 1 else float("inf")


def topp_margin(x: torch.Tensor, top_k: int, top_p: float) -> float:
    """The smallest relative distance of a kept token's top-p mass from its
    bound: where an implementation's keep set differs, it must be < 1e-5."""
    keep = topk_keep(x, top_k)
    above, total = topp_mass_above(x, keep)
    bound = float(torch.tensor(top_p, dtype=torch.float32)) * total
    return float(((above.double() - bound).abs() / total)[keep].min())


def race(dist: torch.Tensor, bits: torch.Tensor, p: Optional[torch.Tensor] = None) -> Tuple[int, float]:
    """Exponential race over a float64 distribution: (token, relative gap
    between the best and second-best score — the margin of this decision).
    For a residual dist = max(0, p - q), pass p: an implementation's
    rounding of p (relative eps) moves log r by eps * p / r, so the gap is
    scaled by r / p of the two contenders (cancellation where p ~ q)."""
    scores = torch.where(dist > 0, torch.log(dist) - torch.log(exponential_from_bits(bits).double()),
                         torch.tensor(_NEG_INF, dtype=torch.float64))
    top = torch.topk(scores, min(2, scores.shape[0]))
    gap = float("inf")
    if top.values.shape[0] == 2 and top.values[1] > _NEG_INF:
        gap = float(top.values[0] - top.values[1]) / max(1.0, abs(float(top.values[0])))
        if p is not None:
            gap *= min(float(dist[i] / p[i]) for i in top.indices.tolist())
    return int(torch.argmax(scores)), gap


def verify_chunk(target_logits: torch.Tensor, draft_tokens: torch.Tensor, cu_num_draft: torch.Tensor, *,
                 max_draft: Optional[int] = None, draft_probs: Optional[torch.Tensor] = None,
                 draft_logits: Optional[torch.Tensor] = None, draft_temperature=1.0, temperature=1.0,
                 top_k=0, top_p=1.0, seed=0, position=0, draft_row_start: Optional[torch.Tensor] = None,
                 target_row_start: Optional[torch.Tensor] = None, margins: Optional[list] = None):
    """Reference chain verification (DESIGN §3 verify_chunk).

    Returns (tokens [R, max_draft+1] int32, accepted [R], emitted [R],
    status [R]). If `margins` is a list, it receives per request the
    smallest relative margin of any decision taken (a coin's |u q - p| / p,
    a race's score gap, a top-p boundary): where an implementation differs
    from this one, that margin must be below 1e-5 (DESIGN §2)."""
    T, V = target_logits.shape
    cu = cu_num_draft.cpu().to(torch.int64)
    R = cu.shape[0] - 1
    if max_draft is None:
        max_draft = int((cu[1:] - cu[:-1]).max()) if R > 0 else 0
    temps, ks, ps, seeds, positions = _sampling_params(R, temperature, top_k, top_p, seed, position)
    dtemps = _per_request(draft_temperature, R, torch.float32)
    toks = draft_tokens.cpu().to(torch.int64)
    n_draft_rows = (draft_probs if draft_probs is not None else draft_logits)
    n_draft_rows = n_draft_rows.shape[0] if n_draft_rows is not None else toks.shape[0]
    tokens = torch.full((R, max_draft + 1), -1, dtype=torch.int32)
    accepted = torch.zeros(R, dtype=torch.int32)
    emitted = torch.zeros(R, dtype=torch.int32)
    status = torch.zeros(R, dtype=torch.int32)
    for r in range(R):
        n = int(cu[r + 1] - cu[r])
        d0 = int(draft_row_start[r]) if draft_row_start is not None else int(cu[r])
        t0 = int(target_row_start[r]) if target_row_start is not None else int(cu[r]) + r
        margin = float("inf")
        if (n < 0 or n > max_draft or n > MAX_SLOT - 1 or d0 < 0 or d0 + n > toks.shape[0]
                or d0 + n > n_draft_rows or t0 < 0 or t0 + n + 1 > T):
            status[r] = int(Status.BAD_LENGTHS)
            if margins is not None:
                margins.append(margin)
            continue
        T_r, greedy = float(temps[r]), not float(temps[r]) > 0
        point_mass = (draft_probs is None and draft_logits is None) or not float(dtemps[r]) > 0
        s, pos, flags, out, emit = int(seeds[r]), int(positions[r]), 0, [], None
        for j in range(n + 1):
            abort, row, row_margin = target_row(target_logits[t0 + j].detach().cpu().float(), T_r, int(ks[r]),
                                                float(ps[r]))
            if abort:
                flags |= abort
                break
            margin = min(margin, row_margin)
            if greedy:
                am = row
                if j < n and int(toks[d0 + j]) == am:
                    out.append(am)
                    continue
                if j < n and not 0 <= int(toks[d0 + j]) < V:
                    flags |= int(Status.TOKEN_OUT_OF_RANGE)
                emit = am
                break
            p = row
            emit_bits = random_bits(s, pos, Purpose.EMIT, j, V)
            if j == n:  # every draft accepted: the bonus token from p_n
                emit, gap = race(p, emit_bits)
                margin = min(margin, gap)
                break
            tok = int(toks[d0 + j])
            if not 0 <= tok < V:  # the draft row is not needed: emit from p_j itself
                flags |= int(Status.TOKEN_OUT_OF_RANGE)
                emit, gap = race(p, emit_bits)
                margin = min(margin, gap)
                break
            q = None
            if not point_mass:
                if draft_probs is not None:
                    q = draft_probs[d0 + j].detach().cpu().double()
                else:
                    dl = draft_logits[d0 + j].detach().cpu().float()
                    dx = dl / torch.tensor(float(dtemps[r]), dtype=torch.float32)
                    if _nonfinite(dl) or _nonfinite(dx):
                        flags |= int(Status.NONFINITE_LOGITS)
                        break
                    q = torch.softmax(dx.double(), 0)
                if not float(q[tok]) > 0:  # q is not what the draft was drawn from
                    flags |= int(Status.DRAFT_PROB_ZERO)
                    emit, gap = race(p, emit_bits)  # from p_j itself: stays lossless
                    margin = min(margin, gap)
                    break
            u = float(uniform_from_bits(random_bits(s, pos, Purpose.COIN, j + 1, 1))[0])
            qx = 1.0 if q is None else float(q[tok])
            px = float(p[tok])
            if px > 0:
                margin = min(margin, abs(u * qx - px) / px)
            if u * qx < px:
                out.append(tok)
                continue
            if q is None:
                resid = p.clone()
                resid[tok] = 0.0
            else:
                resid = torch.clamp(p - q, min=0.0)
            has_mass = bool((resid > 0).any())
            emit, gap = race(resid, emit_bits, p) if has_mass else race(p, emit_bits)
            margin = min(margin, gap)
            break
        if margins is not None:
            margins.append(margin)
        status[r] = flags
        if flags & int(ABORT):
            continue
        out.append(emit)
        tokens[r, :len(out)] = torch.tensor(out, dtype=torch.int32)
        accepted[r], emitted[r] = len(out) - 1, len(out)
    return tokens, accepted, emitted, status


# --------------------------------------------------------------- verify_tree


def tree_depths(parents: torch.Tensor) -> Optional[list]:
    """Depth of every node of one request's local `parents` (root 0 has
    parent -1, every other node a smaller index), or None if malformed."""
    par = parents.tolist()
    if not par or par[0] != -1:
        return None
    depth = [0] * len(par)
    for i in range(1, len(par)):
        if not 0 <= par[i] < i:
            return None
        depth[i] = depth[par[i]] + 1
    return depth


def sibling_codes(sibling_mode, R: int, has_draft: bool) -> torch.Tensor:
    """Per-request sibling-mode codes [R] (int64) from a string, a tensor of
    codes or None (iid with draft rows, deterministic without)."""
    if sibling_mode is None:
        code = SiblingMode.IID if has_draft else SiblingMode.DETERMINISTIC
        return torch.full((R,), int(code), dtype=torch.int64)
    if isinstance(sibling_mode, str):
        return torch.full((R,), int(SIBLING_MODES[sibling_mode]), dtype=torch.int64)
    return _per_request(sibling_mode, R, torch.int64)


def _normalised(w: torch.Tensor) -> Optional[torch.Tensor]:
    total = float(w.sum())
    return w / total if total > 0 else None


def verify_tree(target_logits: torch.Tensor, node_tokens: torch.Tensor, parents: torch.Tensor,
                cu_num_nodes: torch.Tensor, *, max_depth: Optional[int] = None,
                draft_probs: Optional[torch.Tensor] = None, draft_logits: Optional[torch.Tensor] = None,
                draft_temperature=1.0, sibling_mode=None, temperature=1.0, top_k=0, top_p=1.0, seed=0,
                position=0, margins: Optional[list] = None):
    """Reference tree verification (DESIGN §3 verify_tree).

    Request r owns nodes (rows of every [M, ...] input) cu[r]..cu[r+1]-1;
    local node 0 is the root. Target row i: the target's distribution after
    node i; draft row i: the distribution node i's children were drawn from.
    Returns (tokens [R, D+1], accepted [R], emitted [R], path [R, D+1],
    status [R]), all int32, D = max_depth. `margins` as in verify_chunk."""
    M, V = target_logits.shape
    cu = cu_num_nodes.cpu().to(torch.int64)
    R = cu.shape[0] - 1
    toks = node_tokens.cpu().to(torch.int64)
    par_all = parents.cpu().to(torch.int64)
    if max_depth is None:
        depths = [tree_depths(par_all[int(cu[r]):int(cu[r + 1])]) if 0 <= cu[r] <= cu[r + 1] <= M else None
                  for r in range(R)]
        max_depth = max([max(d) for d in depths if d] or [0])
    temps, ks, ps, seeds, positions = _sampling_params(R, temperature, top_k, top_p, seed, position)
    dtemps = _per_request(draft_temperature, R, torch.float32)
    has_draft = draft_probs is not None or draft_logits is not None
    modes = sibling_codes(sibling_mode, R, has_draft)
    W = max_depth + 1
    tokens = torch.full((R, W), -1, dtype=torch.int32)
    path = torch.full((R, W), -1, dtype=torch.int32)
    accepted = torch.zeros(R, dtype=torch.int32)
    emitted = torch.zeros(R, dtype=torch.int32)
    status = torch.zeros(R, dtype=torch.int32)
    for r in range(R):
        c0, n = int(cu[r]), int(cu[r + 1] - cu[r])
        margin = float("inf")

        def done(flags):
            status[r] = flags
            if margins is not None:
                margins.append(margin)

        if c0 < 0 or n < 1 or n > MAX_SLOT or c0 + n > M or c0 + n > toks.shape[0] or c0 + n > par_all.shape[0]:
            done(int(Status.BAD_LENGTHS))
            continue
        par = par_all[c0:c0 + n]
        depth = tree_depths(par)
        mode = int(modes[r])
        if depth is None or max(depth) > max_depth or mode not in (0, 1, 2):
            done(int(Status.BAD_TREE))
            continue
        T_r, greedy = float(temps[r]), not float(temps[r]) > 0
        point_mass = not has_draft or not float(dtemps[r]) > 0
        if point_mass:
            mode = int(SiblingMode.DETERMINISTIC)
        children = [[] for _ in range(n)]
        for i in range(1, n):
            children[int(par[i])].append(i)
        s, pos, flags, out, nodes, emit = int(seeds[r]), int(positions[r]), 0, [], [0], None
        cur = 0
        while True:
            abort, row, row_margin = target_row(target_logits[c0 + cur].detach().cpu().float(), T_r, int(ks[r]),
                                                float(ps[r]))
            if abort:
                flags |= abort
                break
            margin = min(margin, row_margin)
            if greedy:
                am, nxt = row, None
                for c in children[cur]:
                    tok = int(toks[c0 + c])
                    if not 0 <= tok < V:
                        flags |= int(Status.TOKEN_OUT_OF_RANGE)
                    elif tok == am:
                        nxt = c
                        break
                if nxt is None:
                    emit = am
                    break
                out.append(am)
                nodes.append(nxt)
                cur = nxt
                continue
            p = row
            # race_dist: p up to a factor, as the last update left it unnormalised
            # (the chain races on max(0, p - q) itself; the argmax is the same)
            p0, race_dist, q, nxt, aborted = p, p, None, None, False
            for c in children[cur]:
                tok = int(toks[c0 + c])
                if not 0 <= tok < V:  # skipped: no coin, no update, subtree not visited
                    flags |= int(Status.TOKEN_OUT_OF_RANGE)
                    continue
                if mode != SiblingMode.DETERMINISTIC and q is None:
                    if draft_probs is not None:
                        q = draft_probs[c0 + cur].detach().cpu().double()
                    else:
                        dl = draft_logits[c0 + cur].detach().cpu().float()
                        dx = dl / torch.tensor(float(dtemps[r]), dtype=torch.float32)
                        if _nonfinite(dl) or _nonfinite(dx):
                            flags |= int(Status.NONFINITE_LOGITS)
                            aborted = True
                            break
                        q = torch.softmax(dx.double(), 0)
                qx = 1.0 if mode == SiblingMode.DETERMINISTIC else float(q[tok])
                if not qx > 0:  # q is not what this sibling was drawn from
                    flags |= int(Status.DRAFT_PROB_ZERO)
                    continue
                u = float(uniform_from_bits(random_bits(s, pos, Purpose.COIN, c, 1))[0])
                px = float(p[tok])
                if px > 0:  # the implementations' p after updates carries rounding of p0 and q
                    margin = min(margin, abs(u * qx - px) / max(px, float(p0[tok]) + qx))
                if u * qx < px:
                    nxt = c
                    break
                if mode == SiblingMode.DETERMINISTIC:
                    resid = p.clone()
                    resid[tok] = 0.0
                else:
                    resid = torch.clamp(p - q, min=0.0)
                if _normalised(resid) is not None:  # mass 0 (p == q up to rounding): p unchanged
                    p, race_dist = _normalised(resid), resid
                if mode == SiblingMode.WITHOUT_REPLACEMENT:
                    qz = q.clone()
                    qz[tok] = 0.0
                    q = _normalised(qz) if _normalised(qz) is not None else torch.zeros_like(q)
            if aborted:
                break
            if nxt is None:
                # a residual's rounding scales with p0 / r (cancellation); a
                # zeroed p is p0 itself, up to a factor
                emit, gap = race(race_dist, random_bits(s, pos, Purpose.EMIT, cur, V),
                                 p0 if race_dist is not p0 and mode != SiblingMode.DETERMINISTIC else None)
                margin = min(margin, gap)
                break
            out.append(int(toks[c0 + nxt]))
            nodes.append(nxt)
            cur = nxt
        done(flags)
        if flags & int(ABORT):
            continue
        out.append(emit)
        tokens[r, :len(out)] = torch.tensor(out, dtype=torch.int32)
        path[r, :len(nodes)] = torch.tensor(nodes, dtype=torch.int32)
        accepted[r], emitted[r] = len(out) - 1, len(out)
    return tokens, accepted, emitted, path, status


# ------------------------------------------------- kv_compact, commit_tokens


def kv_compact(caches, base_len, num_appended, keep_index, num_keep, *, block_table=None, heads_first=False):
    """Reference kv_compact, functional: (new caches (clones), new_len [R],
    status [R]). Gathers every kept entry before writing any (no aliasing
    question arises)."""
    caches = [c.clone() for c in caches]
    R, K = keep_index.shape
    new_len = base_len.clone()
    status = torch.zeros(R, dtype=torch.int32)
    for r in range(R):
        base, app, nk = int(base_len[r]), int(num_appended[r]), int(num_keep[r])
        keep = [int(k) for k in keep_index[r, :max(nk, 0)]] if 0 <= nk <= K else []
        if base < 0 or app < 0 or nk < 0 or nk > K or nk > app or (
                block_table is None and base + app > min(c.shape[2 if heads_first else 1] for c in caches)):
            status[r] = int(Status.BAD_LENGTHS)
            continue

        def slot(s):
            b = s // caches[0].shape[1]
            if b >= block_table.shape[1]:
                return -1
            blk = int(block_table[r, b])
            return blk * caches[0].shape[1] + s % caches[0].shape[1] if 0 <= blk < caches[0].shape[0] else -1

        ok = all(b > a for a, b in zip(keep, keep[1:])) and all(0 <= k < app for k in keep)
        if ok and block_table is not None:
            ok = all(slot(base + k) >= 0 and slot(base + i) >= 0 for i, k in enumerate(keep))
        if not ok:
            status[r] = int(Status.BAD_INDEX)
            continue
        new_len[r] = base + nk
        for c in caches:
            if block_table is not None:
                flat = c.view(-1, *c.shape[2:])
                src = torch.stack([flat[slot(base + k)] for k in keep]) if keep else None
                for i in range(nk):
                    flat[slot(base + i)] = src[i]
            elif heads_first:
                src = c[r, :, [base + k for k in keep]].clone()
                c[r, :, base:base + nk] = src
            else:
                src = c[r, [base + k for k in keep]].clone()
                c[r, base:base + nk] = src
    return caches, new_len, status


def commit_tokens(out_tokens, out_len, position, max_len, finished, last_token, error, tokens, emitted, status,
                  stop_tokens=None):
    """Reference commit_tokens, functional: returns the updated state fields
    (clones) in the same order."""
    out_tokens, out_len, position, finished, last_token, error = (
        t.clone() for t in (out_tokens, out_len, position, finished, last_token, error))
    stops = set(stop_tokens.tolist()) if stop_tokens is not None else set()
    R, W = tokens.shape
    for r in range(R):
        if bool(finished[r]):
            continue
        st, n = int(status[r]), int(emitted[r])
        if st & int(ABORT) or not 0 <= n <= W or int(out_len[r]) < 0:
            finished[r] = True
            error[r] = st if st & int(ABORT) else int(Status.BAD_LENGTHS)
            continue
        limit = min(int(max_len[r]), out_tokens.shape[1])
        appended = 0
        for i in range(n):
            if int(out_len[r]) >= limit:
                break
            t = int(tokens[r, i])
            out_tokens[r, int(out_len[r])] = t
            out_len[r] += 1
            last_token[r] = t
            appended += 1
            if t in stops:
                finished[r] = True
                break
        position[r] += appended
        if int(out_len[r]) >= limit:
            finished[r] = True
    return out_tokens, out_len, position, finished, last_token, error


# ----------------------------------------------------------- schedule_verify

SCHEDULE_MODES = ("early_stop", "threshold", "budget", "global")


def calibrated_confidence(confidence: torch.Tensor, temperatures: Optional[torch.Tensor]) -> torch.Tensor:
    """c [R, G] float64 in [0, 1]: the confidences as given (NaN -> 0), or
    sigmoid(logit / T_k) when per-position temperatures are given."""
    c = confidence.detach().cpu().double()
    if temperatures is not None:
        c = torch.sigmoid(c / temperatures.detach().cpu().double().unsqueeze(0))
    return torch.nan_to_num(c, nan=0.0).clamp(0.0, 1.0)


def schedule_verify(confidence, num_draft, sps_table, *, mode="early_stop", threshold=None, budget=None,
                    temperatures=None):
    """Reference schedule_verify (DESIGN §3): verify_len [R] int32.

    Survival a[r, j] = prod_{i <= j} c[r, i] (fp64, in order); candidates
    (r, j < n_r) ranked by survival descending, ties by r then j; token
    batch B = R + admitted; tau = R + sum of admitted survivals (fp64, in
    admission order); SPS(B) = sps_table[B], 0 beyond its end."""
    c = calibrated_confidence(confidence, temperatures)
    R, G = c.shape
    n = num_draft.detach().cpu().long().clamp(0, G)
    sps = sps_table.detach().cpu().double()

    def sps_at(B):
        return float(sps[B]) if B < sps.shape[0] else 0.0

    cands = []
    for r in range(R):
        a = 1.0
        for j in range(int(n[r])):
            a *= float(c[r, j])
            cands.append((a, r, j))
    cands.sort(key=lambda t: (-t[0], t[1], t[2]))
    if mode == "threshold":
        admitted = [t for t in cands if t[0] >= threshold]
    elif mode == "budget":
        admitted = cands[:max(0, min(int(budget), len(cands)))]
    elif mode in ("early_stop", "global"):
        B, tau = R, float(R)
        best_f, best_k, f = tau * sps_at(B), 0, tau * sps_at(B)
        k = 0
        for a, r, j in cands:
            B, tau = B + 1, tau + a
            f_next = tau * sps_at(B)
            if mode == "early_stop":
                if not f_next > f:
                    break
                f, k = f_next, k + 1
            else:
                k += 1
                if f_next > best_f:
                    best_f, best_k = f_next, k
        admitted = cands[:k if mode == "early_stop" else best_k]
    else:
        raise ValueError(f"unknown mode {mode}")
    verify_len = torch.zeros(R, dtype=torch.int32)
    for _, r, _ in admitted:
        verify_len[r] += 1
    return verify_len


# -------------------------------------------------------------- markov_draft


def markov_draft(base_logits, anchor, w1, w2, *, temperature=1.0, top_k=0, top_p=1.0, seed=0, position=0,
                 num_draft=None):
    """Reference markov_draft (DESIGN §3): (tokens [R, G] int32,
    draft_logits [R, G, V], status [R]); per request, step by step.
    The corrected logits are computed in float64 and rounded to float32
    (the op uses an fp32 GEMM: written values may differ in the last fp32
    bit, decisions only within the margin rule)."""
    R, G, V = base_logits.shape
    dtype = base_logits.dtype
    temps, ks, ps, seeds, positions = _sampling_params(R, temperature, top_k, top_p, seed, position)
    n = (num_draft.cpu().long().clamp(0, G) if num_draft is not None else torch.full((R,), G))
    tokens = torch.full((R, G), -1, dtype=torch.int32)
    logits = torch.full((R, G, V), float("-inf"), dtype=dtype)
    status = torch.zeros(R, dtype=torch.int32)
    w1d, w2d = w1.detach().cpu().double(), w2.detach().cpu().double()
    for r in range(R):
        prev = int(anchor[r])
        if not 0 <= prev < V:
            status[r] = int(Status.TOKEN_OUT_OF_RANGE)
            continue
        T = float(temps[r])
        for k in range(1, int(n[r]) + 1):
            z = (base_logits[r, k - 1].detach().cpu().double() + w1d[prev] @ w2d).float()
            if T > 0:
                x = (z / torch.tensor(T, dtype=torch.float32)).to(dtype)
                xf = x.float()
                if not _nonfinite(xf):
                    keep = topp_keep(xf, topk_keep(xf, int(ks[r])), float(ps[r]))
                    x = torch.where(keep, x, torch.tensor(float("-inf"), dtype=dtype))
            else:
                x = z.to(dtype)
            logits[r, k - 1] = x
            tok, st, _ = sample_row(x.float(), temperature=1.0 if T > 0 else 0.0, top_k=0, top_p=1.0,
                                    seed=int(seeds[r]), position=int(positions[r]), purpose=int(Purpose.DRAFT),
                                    slot=k)
            status[r] |= st
            if st & int(ABORT):
                break
            tokens[r, k - 1] = tok
            prev = tok
    return tokens, logits, status


# ---------------------------------------------------------------- packed_linear


def packed_linear(input: torch.Tensor, weight: torch.Tensor, residual: Optional[torch.Tensor] = None
                  ) -> torch.Tensor:
    """residual + input @ weight.T, in float64, as float32: input [M, K],
    weight [N, K] (the unpacked weight), residual [M, N] or None -> [M, N].
    (The op accumulates in float32 by fused multiply-adds in k order; its
    tests bound the difference and check that order's bits separately.)"""
    y = input.double() @ weight.double().T
    return (y + residual.double() if residual is not None else y).float()
