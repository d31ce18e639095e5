"""Benchmark of `verify_chunk` (padded form, temperature-only target) against
the pure-PyTorch reference (small CPU cases only), a vectorised PyTorch chain
verification as an engine without our kernels writes it and, when installed,
FlashInfer's chain_speculative_sampling."""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Tuple

import torch

import dspark_ops
from dspark_ops import reference

from .timing import rotation_count, time_fn

# Temperature-only target sampling (top-k / top-p off); the draft distribution
# is given as probabilities, as logits in the target dtype, or not at all.
MODES: Dict[str, dict] = {
    "probs": dict(temperature=1.0, top_k=0, top_p=1.0),
    "logits": dict(temperature=1.0, top_k=0, top_p=1.0),
    "greedy": dict(temperature=0.0, top_k=0, top_p=1.0),
}
REFERENCE_MAX_ELEMS = 3e6  # R*(n+1)*V above which the Python-loop reference is skipped
CHECK_MAX_REQUESTS = 64  # the CPU op re-runs at most this many requests of the first buffer
DRAFT_NOISE = 1.0  # draft logits = target logits + this * N(0,1): acceptance ~0.6 per token

# One input set: (target_logits [R, n+1, V], draft_tokens [R, n] int32,
# draft [R, n, V] probs float32 / logits in the target dtype, or None).
Inputs = Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]


def elem_size(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


def draft_dtype(mode: str, dtype: torch.dtype) -> Optional[torch.dtype]:
    return {"probs": torch.float32, "logits": dtype}.get(mode)


def make_inputs(R: int, n: int, V: int, dtype: torch.dtype, mode: str, device: str,
                gen: torch.Generator) -> Inputs:
    """LLM-like inputs: per row one dominant token (p ~ 0.7) over a 2*N(0,1)
    background, the draft a noisy copy of the target, the drafted tokens
    sampled from the draft distribution (so acceptance is realistic, not ~0)."""
    target = 2 * torch.randn(R, n + 1, V, device=device, generator=gen)
    hot = torch.randint(0, V, (R, n + 1, 1), device=device, generator=gen)
    target.scatter_add_(-1, hot, torch.full_like(hot, math.log(V) + 3, dtype=torch.float32))
    draft_logits = target[:, :n] + DRAFT_NOISE * torch.randn(R, n, V, device=device, generator=gen)
    target = target.to(dtype)
    draft_logits = draft_logits.to(dtype) if mode == "logits" else draft_logits
    q = torch.softmax(draft_logits.float(), -1)
    tokens = torch.multinomial(q.view(R * n, V), 1, generator=gen).view(R, n).to(torch.int32)
    draft = {"probs": q, "logits": draft_logits}.get(mode)
    return target.contiguous(), tokens, draft


def op_kwargs(mode: str, draft: Optional[torch.Tensor]) -> dict:
    """The verify_chunk keywords of a mode (padded or ragged alike)."""
    kw = dict(MODES[mode])
    if mode == "probs":
        kw["draft_probs"] = draft
    elif mode == "logits":
        kw["draft_logits"] = draft
    return kw


def run_reference(inp: Inputs, mode: str, seed: torch.Tensor, position: torch.Tensor) -> tuple:
    """dspark_ops.reference.verify_chunk takes the ragged form: flatten the
    padded inputs (views) and give cu_num_draft = r * n."""
    target, tokens, draft = inp
    R, n = tokens.shape
    cu = torch.arange(R + 1, dtype=torch.int32) * n
    flat = draft.flatten(0, 1) if draft is not None else None
    return reference.verify_chunk(target.flatten(0, 1), tokens.flatten(), cu, max_draft=n, seed=seed,
                                  position=position, **op_kwargs(mode, flat))


def torch_verify(target: torch.Tensor, tokens: torch.Tensor, draft: Optional[torch.Tensor], mode: str,
                 gen: torch.Generator) -> torch.Tensor:
    """What an engine without our kernels does, vectorised over the batch:
    fp32 softmax of the target, p and q at the drafted tokens, coins from
    torch.rand, the first rejection via cumprod, the residual max(0, p-q)
    normalised and torch.multinomial (the bonus from p when all are accepted).
    Returns tokens [R, n+1] int64 (accepted drafts, the emitted token, -1)."""
    R, n = tokens.shape
    idx = tokens.long().unsqueeze(-1)
    rows = torch.arange(R, device=target.device)
    if mode == "greedy":
        am = target.argmax(-1)  # [R, n+1]
        accepted = (tokens.long() == am[:, :n]).long().cumprod(-1).sum(-1)
        emit = am[rows, accepted]
    else:
        p = torch.softmax(target.float(), -1)  # [R, n+1, V]
        q = draft if mode == "probs" else torch.softmax(draft.float(), -1)
        p_d = p[:, :n].gather(-1, idx).squeeze(-1)
        q_d = q.gather(-1, idx).squeeze(-1)
        u = torch.rand(R, n, device=target.device, generator=gen)
        accepted = (u * q_d < p_d).long().cumprod(-1).sum(-1)  # [R]
        # The row that decides the emitted token: the first rejected one, or
        # the bonus row n (q taken as 0 there, so the residual is p itself).
        q_row = q[rows, accepted.clamp(max=n - 1)] * (accepted < n).unsqueeze(-1)
        p_row = p[rows, accepted]
        resid = (p_row - q_row).clamp_min(0)
        mass = resid.sum(-1, keepdim=True)
        resid = torch.where(mass > 0, resid / mass, p_row)  # p == q: fall back to p
        emit = torch.multinomial(resid, 1, generator=gen).squeeze(-1)
    cols = torch.arange(n + 1, device=target.device)
    padded = torch.cat([tokens.long(), torch.zeros(R, 1, dtype=torch.long, device=target.device)], -1)
    out = torch.where(cols < accepted.unsqueeze(-1), padded, -1)
    return out.scatter(-1, accepted.unsqueeze(-1), emit.unsqueeze(-1))


def flashinfer_fn(mode: str) -> Optional[Callable]:
    """FlashInfer's chain verification with the softmax passes it needs (it
    takes probabilities); None when FlashInfer is absent or for greedy."""
    if mode == "greedy":
        return None
    try:
        import flashinfer.sampling as fs
    except Exception:
        return None

    def fn(target, tokens, draft):
        q = draft if mode == "probs" else torch.softmax(draft.float(), -1)
        return fs.chain_speculative_sampling(q, tokens, torch.softmax(target.float(), -1))
    return fn


_FI_AGREEMENT: Dict[str, str] = {}


def flashinfer_agreement(device: str) -> str:
    """Real FlashInfer against our drop-in shim (dspark_ops.compat.flashinfer)
    on point-mass targets, where the chain's outcome is deterministic (accept
    iff the draft is the target's token; else emit it; the bonus too): the
    same tokens and counts, or what differs. Once per process."""
    if device in _FI_AGREEMENT:
        return _FI_AGREEMENT[device]
    import flashinfer.sampling as fs
    from dspark_ops.compat import flashinfer as shim
    g = torch.Generator().manual_seed(7)
    B, n, V = 6, 5, 1000
    want_tok = torch.randint(0, V, (B, n + 1), generator=g)
    p = torch.nn.functional.one_hot(want_tok, V).float()
    q = torch.softmax(torch.randn(B, n, V, generator=g), -1)
    drafts = torch.where(torch.rand(B, n, generator=g) < 0.6, want_tok[:, :n],
                         torch.randint(0, V, (B, n), generator=g)).to(torch.int32)
    p, q, drafts = p.to(device), q.to(device), drafts.to(device)
    try:
        real = fs.chain_speculative_sampling(q, drafts, p)
        ours = shim.chain_speculative_sampling(q, drafts, p, seed=1, offset=0)
        diffs = [name for name, a, b in zip(("output_token_ids", "accepted", "emitted"), real, ours)
                 if not torch.equal(a.long().cpu(), b.long().cpu())]
        verdict = ("FlashInfer and the shim agree on point-mass targets" if not diffs
                   else f"FlashInfer and the shim DIFFER on point-mass targets: {', '.join(diffs)}")
    except Exception as e:  # another FlashInfer version's signature: say so
        verdict = f"FlashInfer agreement not checked ({type(e).__name__}: {e})"
    _FI_AGREEMENT[device] = verdict
    print(f"# {verdict}")
    return verdict


def expected_accepted(inp: Inputs, mode: str) -> torch.Tensor:
    """[R] float32: the expected number of accepted drafts given the drafted
    tokens, sum_k prod_{j<=k} min(1, p_j(x_j) / q_j(x_j)) (the exact count
    for greedy), to tell a plausible acceptance count from a suspicious one.
    fp32 log-space, gathering before any [R, n, V] copy: cheap on 1 GB inputs."""
    target, tokens, draft = inp
    n = tokens.shape[1]
    idx = tokens.long().unsqueeze(-1)
    t = target[:, :n]
    if mode == "greedy":
        a = (t.argmax(-1) == tokens.long()).float()
    else:
        log_p = t.gather(-1, idx).float() - torch.logsumexp(t.float(), -1, keepdim=True)
        if mode == "probs":
            log_q = draft.gather(-1, idx).log()
        else:
            log_q = draft.gather(-1, idx).float() - torch.logsumexp(draft.float(), -1, keepdim=True)
        a = (log_p - log_q).squeeze(-1).exp().clamp(max=1)
    return a.cumprod(-1).sum(-1)


def _differing(a: tuple, b: tuple) -> int:
    """Requests whose tokens, accepted count or status differ."""
    bad = (a[0].cpu() != b[0].cpu()).any(-1)
    for x, y in zip(a[1:], b[1:]):
        bad |= x.cpu() != y.cpu()
    return int(bad.sum())


def _verdict(bad: int, what: str, res: dspark_ops.VerifyResult) -> str:
    verdict = f"ok ({what})" if bad == 0 else f"{bad} {what} differ (check the margin rule)"
    nonzero = int((res.status != 0).sum())
    return verdict + (f"; {nonzero} nonzero status" if nonzero else "")


def check_against_cpu(inp: Inputs, mode: str, seed: torch.Tensor, position: torch.Tensor,
                      res: dspark_ops.VerifyResult) -> str:
    """res (the device's outputs) equals the CPU op's on the first
    CHECK_MAX_REQUESTS requests (margin rule aside): requests are independent,
    so a prefix bounds the CPU time on [256, 8, 152064] inputs."""
    target, tokens, draft = inp
    m = min(tokens.shape[0], CHECK_MAX_REQUESTS)
    cpu_draft = draft[:m].cpu() if draft is not None else None
    cpu = dspark_ops.verify_chunk(target[:m].cpu(), tokens[:m].cpu(), seed=seed[:m].cpu(),
                                  position=position[:m].cpu(), **op_kwargs(mode, cpu_draft))
    return _verdict(_differing(tuple(x[:m] for x in res), tuple(cpu)), f"of {m} requests vs CPU op", res)


def check(inp: Inputs, mode: str, seed: torch.Tensor, position: torch.Tensor, with_reference: bool
          ) -> Tuple[str, dspark_ops.VerifyResult]:
    """Run the op once on the first buffer and check it: on CUDA against the
    CPU op, on the CPU against the reference where that is run ("" when
    neither applies). Returns (verdict, the op's result)."""
    target, tokens, draft = inp
    res = dspark_ops.verify_chunk(target, tokens, seed=seed, position=position, **op_kwargs(mode, draft))
    if target.is_cuda:
        return check_against_cpu(inp, mode, seed, position, res), res
    if with_reference:
        bad = _differing(tuple(res), run_reference(inp, mode, seed, position))
        return _verdict(bad, "vs reference", res), res
    return "", res


def bytes_per_call(R: int, n: int, V: int, dtype: torch.dtype, mode: str) -> Tuple[int, int]:
    """(bytes read once: every target logit and every draft row once; bytes
    of one target + draft row, re-read per rejected request when the draft
    has a distribution)."""
    d = draft_dtype(mode, dtype)
    elem_d = elem_size(d) if d is not None else 0
    return R * (n + 1) * V * elem_size(dtype) + R * n * V * elem_d, V * (elem_size(dtype) + elem_d)


def run_case(R: int, n: int, V: int, dtype: torch.dtype, mode: str, device: str, iters: int,
             copy_gbs: float) -> List[dict]:
    """Time verify_chunk and the baselines on one (R, n, V, dtype, mode);
    one row per implementation, the first being dspark_ops.verify_chunk.
    The drafts per request are the rows' "n_draft" ("n" is the number of
    timed calls, as in every bench row)."""
    once, row_bytes = bytes_per_call(R, n, V, dtype, mode)
    n_buf = rotation_count(once, device)
    gen = torch.Generator(device=device).manual_seed(0)
    bufs = [make_inputs(R, n, V, dtype, mode, device, gen) for _ in range(n_buf)]
    seed = torch.arange(R, device=device)
    position = torch.full((R,), 1000, device=device)
    run_ref = device == "cpu" and R * (n + 1) * V <= REFERENCE_MAX_ELEMS
    verdict, res = check(bufs[0], mode, seed, position, run_ref)
    # A rejected request (accepted < n) re-reads one target + draft row for
    # the residual (CUDA; none in greedy mode).
    rejected = int(((res.accepted < n) & (res.status == 0)).sum())
    reread = rejected * row_bytes if mode != "greedy" else 0
    acc_mean = float(res.accepted.float().mean())
    acc_expected = float(expected_accepted(bufs[0], mode).mean())

    out = dspark_ops.empty_verify_result(R, n, device=device)
    ws = torch.empty(dspark_ops.workspace_size("verify_chunk", num_requests=R, vocab_size=V, max_draft=n),
                     dtype=torch.uint8, device=device)

    def ours(i: int):
        t, d, q = bufs[i % n_buf]
        return dspark_ops.verify_chunk(t, d, seed=seed, position=position, out=out, workspace=ws,
                                       **op_kwargs(mode, q))

    impls: Dict[str, Callable[[int], object]] = {"dspark_ops.verify_chunk": ours}
    if run_ref:
        impls["torch reference"] = lambda i: run_reference(bufs[i % n_buf], mode, seed, position)
    impls["torch vectorised"] = lambda i: torch_verify(*bufs[i % n_buf], mode, gen)
    fi = flashinfer_fn(mode) if device == "cuda" else None
    if fi is not None:
        try:
            fi(*bufs[0])
            torch.cuda.synchronize()
            impls["flashinfer chain_speculative_sampling"] = lambda i: fi(*bufs[i % n_buf])
        except Exception as e:  # a signature from another FlashInfer version: skip, say so
            print(f"# note: flashinfer chain_speculative_sampling skipped ({type(e).__name__}: {e})")

    rows, base = [], None
    for name, fn in impls.items():
        stats = time_fn(fn, device, iters)
        us = stats["median_us"]
        base = base or us
        gbs = once / (us * 1e-6) / 1e9
        ours_row = name == "dspark_ops.verify_chunk"
        d = draft_dtype(mode, dtype)
        rows.append({"op": "verify_chunk", "impl": name, "mode": mode, "R": R, "n_draft": n, "V": V,
                     "dtype": str(dtype).split(".")[-1], "draft_dtype": str(d).split(".")[-1] if d else None,
                     "bytes_read_once": once, "bytes_reread_rejected": reread if ours_row else None, **stats,
                     "GBps_one_pass": gbs, "frac_copy_bw_one_pass": gbs / copy_gbs,
                     "GBps_with_reread": (once + reread) / (us * 1e-6) / 1e9 if ours_row else None,
                     "time_vs_dspark": us / base,
                     "accepted_mean": acc_mean if ours_row else None,
                     "accepted_expected": acc_expected if ours_row else None,
                     "check": verdict if ours_row else (flashinfer_agreement(device) if "flashinfer" in name
                                                        else None)})
    return rows
