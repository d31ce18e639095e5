"""Shared test helpers: random logits, poisoned outputs, and the DESIGN §2
margin rule for comparing sampled tokens across implementations."""
from __future__ import annotations

import torch
from scipy import stats

from dspark_ops import reference as ref

MARGIN = 1e-5  # DESIGN §2: decisions may differ only within a relative 1e-5


def random_logits(rows: int, vocab: int, dtype=torch.float32, scale: float = 3.0, seed: int = 0,
                  device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=g) * scale).to(dtype).to(device)


def off_alignment(t: torch.Tensor, device="cuda") -> torch.Tensor:
    """A copy of t on `device` that starts one element past the allocation's
    (16-byte) alignment: every row of it is off the vector boundary unless
    its offset brings it back."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=device)
    shifted = buf[1:].view(t.shape)
    shifted.copy_(t.to(device))
    return shifted


def poisoned(R: int, device="cpu"):
    """Outputs filled with garbage so an unwritten entry is caught."""
    from dspark_ops import SampleResult
    return SampleResult(torch.full((R,), 0x5A5A5A5A, dtype=torch.int32, device=device),
                        torch.full((R,), 0x5A5A5A5A, dtype=torch.int32, device=device))


def explain_mismatch(logits_row: torch.Tensor, got: int, want: int, **params) -> bool:
    """True when two implementations' tokens `got` and `want` may differ under
    the margin rule: their race scores (per the reference) are within a
    relative 1e-5, or either token sits at a top-p boundary within a relative
    1e-5 (so one backend's expf may keep it and the other's drop it)."""
    _, _, scores = ref.sample_row(logits_row.float(), **params)
    V = scores.shape[0]
    if not (0 <= got < V and 0 <= want < V):
        return False
    a, b = float(scores[want]), float(scores[got])
    if a != float("-inf") and b != float("-inf") and abs(a - b) <= MARGIN * max(1.0, abs(a)):
        return True
    T, top_p, top_k = params["temperature"], params["top_p"], params["top_k"]
    if T > 0 and top_p < 1:
        x = logits_row.float() / torch.tensor(T, dtype=torch.float32)
        keep = ref.topk_keep(x, top_k)
        above, total = ref.topp_mass_above(x, keep)
        bound = float(torch.tensor(top_p, dtype=torch.float32)) * total
        return any(abs(float(above[t]) - bound) <= MARGIN * total for t in (got, want))
    return False


def assert_same_tokens(logits, got_tokens, want_tokens, *, row_start=None, **per_request):
    """Tokens equal, or different only as the margin rule allows."""
    got, want = got_tokens.cpu().tolist(), want_tokens.cpu().tolist()
    R = len(want)
    for r in range(R):
        if got[r] == want[r]:
            continue
        row = int(row_start[r]) if row_start is not None else r
        params = {k: (float(v[r]) if isinstance(v, torch.Tensor) and v.dtype.is_floating_point else
                      int(v[r]) if isinstance(v, torch.Tensor) else v) for k, v in per_request.items()}
        assert explain_mismatch(logits[row].cpu(), got[r], want[r], **params), (
            f"request {r}: token {got[r]} vs reference {want[r]} ({params})")


def chi_square_pvalue(tokens, probs):
    counts = torch.bincount(tokens, minlength=probs.shape[0]).double()
    support = probs > 0
    assert counts[~support].sum() == 0, "sampled a token of probability 0"
    expected = probs[support] * tokens.shape[0]
    return stats.chisquare(counts[support].numpy(), expected.numpy()).pvalue


def assert_cpp_and_fake_agree(call, args: dict, expected: str) -> None:
    """call(args) raises ValueError(expected) from the C++ op, and the very
    same message from its fake kernel under FakeTensorMode."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import pytest
    with pytest.raises(ValueError) as cpp:
        call(args)
    assert str(cpp.value).splitlines()[0] == expected
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_args = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        with pytest.raises(ValueError) as fake:
            call(fake_args)
    assert str(fake.value) == expected


def assert_kernel_launched(fn, kernel: str, expected: bool = True) -> None:
    """Run fn() under the CUDA profiler and assert whether a kernel whose
    name contains `kernel` was launched. Where the profiler records no
    kernels at all (under compute-sanitizer, which excludes CUPTI), fn()
    still runs and nothing is asserted."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if "dspark" in e.name]
    if names:
        assert any(kernel in n for n in names) == expected, f"{kernel} launched: expected {expected}, got {names}"
