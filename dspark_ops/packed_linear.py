"""A batch-invariant small-batch linear layer for the CPU: the few rows of a
decode step or a verify pass times a weight packed once
(csrc/cpu/packed_gemm.h). The built-in model's CPU forward runs its GEMMs
through it; CPU only (GPUs have cuBLAS)."""
from __future__ import annotations

import os
from typing import Optional

import torch

from ._checks import check_dtype, shape_str
from .ops import _ops

OP = "dspark_ops.packed_linear"
PACK_WIDTH = 64  # csrc/cpu/packed_gemm.h kPackWidth


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """Pack a linear layer's weight for :func:`packed_linear`.

    Parameters
    ----------
    weight : [N, K] float32 (``nn.Linear.weight``: out_features x in_features)

    Returns
    -------
    [ceil(N / 64), K, 64] float32, contiguous: column group g holds output
    columns 64g..64g+63, K-major, zero past N. A copy; ``weight`` is unchanged.
    """
    if weight.dim() != 2:
        raise ValueError(f"dspark_ops.pack_linear_weight: weight must have shape [out_features, in_features], "
                         f"got {shape_str(weight)}")
    N, K = weight.shape
    G = -(-N // PACK_WIDTH)
    padded = weight.new_zeros(G * PACK_WIDTH, K)
    padded[:N] = weight
    return padded.view(G, PACK_WIDTH, K).transpose(1, 2).contiguous()


def packed_linear(input: torch.Tensor, packed_weight: torch.Tensor, out_features: int,
                  residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``residual + input @ weight.T`` on the CPU, with the weight packed by
    :func:`pack_linear_weight`.

    Parameters
    ----------
    input : [M, K] float32 (rows contiguous, or copied so)
    packed_weight : [ceil(N / 64), K, 64] float32, contiguous
    out_features : N
    residual : [M, N] float32, optional (added before the products: the
        accumulation starts from it)

    out_features must be the N the weight was packed from: only its group
    count, ceil(N / 64), can be checked.

    Returns
    -------
    [M, N] float32, a new tensor.

    Notes
    -----
    Each output is the residual (or 0) plus ``input[m, k] * weight[n, k]``
    accumulated by fused multiply-adds in k order: bitwise the same for a
    row whatever the batch around it (a 6-token verify pass gives a 1-token
    decode step's logits exactly) and whichever path runs it: AVX-512 or
    AVX2 where the CPU has it (:func:`packed_linear_kernel`), else a portable loop that
    is far slower than ``torch.nn.functional.linear`` (the built-in model
    then keeps torch's GEMMs). Built for few rows: it re-reads each weight
    group from cache per 6 rows; measured as fast as MKL or faster up to
    ~512 rows on this project's CPU. Differentiable in input and residual
    (not in the packed weight). No GPU kernel.

    Example
    -------
    >>> w = torch.randn(100, 48)
    >>> x = torch.randn(6, 48)
    >>> y = packed_linear(x, pack_linear_weight(w), 100)
    >>> torch.allclose(y, x @ w.T, atol=1e-4)
    True
    """
    return _ops.packed_linear(input, packed_weight, out_features, residual)


def packed_linear_kernel() -> str:
    """The path :func:`packed_linear` takes on this CPU now, as the C++ op
    decides it: ``"avx512"`` (AVX-512F), ``"avx2"`` (AVX2 + FMA, or
    ``DSPARK_PACKED_LINEAR=avx2``) or ``"portable"`` (neither, or
    ``DSPARK_PACKED_LINEAR=portable``); the switch is read at each call.
    Every path gives the same bits."""
    return _ops.packed_linear_kernel()


_CPU_FAST: Optional[bool] = None  # whether the CPU has a vector path, asked once


def packed_linear_fast() -> bool:
    """Whether :func:`packed_linear` runs a vector path (AVX-512 or AVX2)
    now: what :func:`packed_linear_kernel` says, without an op call per
    forward (the CPU is asked once, the environment switch read each
    time). The built-in model uses packed_linear only then."""
    global _CPU_FAST
    if os.environ.get("DSPARK_PACKED_LINEAR") == "portable":
        return False
    if _CPU_FAST is None:
        _CPU_FAST = packed_linear_kernel() != "portable"
    return _CPU_FAST


def _check_cpu_float(name: str, t: torch.Tensor) -> None:
    if t.device.type not in ("cpu", "meta"):
        raise ValueError(f"{OP}: {name} must be on the CPU (the op has no GPU kernel), got {t.device}")
    check_dtype(OP, name, t, torch.float32)


@torch.library.register_fake("dspark_ops::packed_linear")
def _packed_linear_fake(input, packed_weight, out_features, residual=None):
    _check_cpu_float("input", input)
    _check_cpu_float("packed_weight", packed_weight)
    if input.dim() != 2:
        raise ValueError(f"{OP}: input must have shape [rows, in_features], got {shape_str(input)}")
    if out_features < 1:
        raise ValueError(f"{OP}: out_features must be >= 1, got {out_features}")
    M, K = input.shape
    G = -(-out_features // PACK_WIDTH)
    if packed_weight.dim() != 3 or tuple(packed_weight.shape) != (G, K, PACK_WIDTH):
        raise ValueError(f"{OP}: packed_weight must have shape [{G}, {K}, {PACK_WIDTH}] (pack_linear_weight of a "
                         f"[{out_features}, {K}] weight), got {shape_str(packed_weight)}")
    if not packed_weight.is_contiguous():
        raise ValueError(f"{OP}: packed_weight must be contiguous")
    if residual is not None:
        _check_cpu_float("residual", residual)
        if residual.dim() != 2 or tuple(residual.shape) != (M, out_features):
            raise ValueError(f"{OP}: residual must have shape [{M}, {out_features}], got {shape_str(residual)}")
    return input.new_empty((M, out_features))


def _setup_context(ctx, inputs, output) -> None:
    input, packed_weight, out_features, residual = inputs
    if packed_weight.requires_grad:
        raise NotImplementedError(f"{OP}: no gradient for packed_weight (an inference op: train the nn.Linear "
                                  f"weight and pack it again)")
    ctx.save_for_backward(packed_weight)
    ctx.out_features = out_features
    ctx.has_residual = residual is not None


def _backward(ctx, grad):
    """d input = grad @ W (W^T read from the packing); d residual = grad."""
    (packed,) = ctx.saved_tensors
    G, K, _ = packed.shape
    w_t = packed.permute(1, 0, 2).reshape(K, G * PACK_WIDTH)[:, :ctx.out_features]  # [K, N]
    return grad @ w_t.t(), None, None, (grad if ctx.has_residual else None)


torch.library.register_autograd("dspark_ops::packed_linear", _backward, setup_context=_setup_context)
