"""verify_tree: lossless multi-draft tree verification (DESIGN §3), the
typed wrapper beside its fake kernels."""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

from . import _checks
from ._enums import SIBLING_MODES, SiblingMode
from ._params import (TensorOrFloat, TensorOrInt, position_tensor, seed_tensor, temperature_tensor,
                      top_k_tensor, top_p_tensor)
from .ops import _ops, check_fake_workspace

OP = _checks.TREE_OP


class TreeResult(NamedTuple):
    """What :func:`verify_tree` returns (R requests, D = max_depth)."""

    tokens: torch.Tensor  # [R, D+1] int32: accepted node tokens root to leaf, the emitted token, then -1
    accepted: torch.Tensor  # [R] int32: nodes accepted (the path's length minus the root)
    emitted: torch.Tensor  # [R] int32: accepted + 1 (0 when aborted)
    path: torch.Tensor  # [R, D+1] int32: accepted local node indices, root (0) first, then -1
    status: torch.Tensor  # [R] int32: Status bits


def empty_tree_result(num_requests: int, max_depth: int, *, device=None) -> TreeResult:
    """Preallocated outputs for ``verify_tree(..., out=...)``."""
    def vec():
        return torch.empty(num_requests, dtype=torch.int32, device=device)

    def rows():
        return torch.empty(num_requests, max_depth + 1, dtype=torch.int32, device=device)
    return TreeResult(rows(), vec(), vec(), rows(), vec())


def tree_max_depth(parents: torch.Tensor, cu_num_nodes: torch.Tensor) -> int:
    """The deepest node of a batch of trees (one host sync): pointer jumping
    over request-local parents. Malformed trees count as shallow here; the
    op flags them."""
    par, cu = parents.cpu().long(), cu_num_nodes.cpu().long()
    n = cu[1:] - cu[:-1]
    if par.numel() == 0 or bool((n < 0).any()) or int(cu[0]) < 0 or int(cu[-1]) > par.numel():
        return 0
    owner = torch.repeat_interleave(torch.arange(n.numel()), n)
    local = par[int(cu[0]):int(cu[-1])]
    ok = (local >= 0) & (local < torch.arange(local.numel()) - (cu[:-1][owner] - int(cu[0])))
    jump = torch.where(ok, local + cu[:-1][owner] - int(cu[0]), torch.full_like(local, -1))
    depth = ok.long()
    for _ in range(17):  # 2^17 > 65535 nodes: every chain of ancestors is covered
        has = jump >= 0
        if not bool(has.any()):
            break
        safe = jump.clamp(min=0)
        depth = depth + torch.where(has, depth[safe], torch.zeros_like(depth))
        jump = torch.where(has, jump[safe], jump)
    return int(depth.max())


def _sibling_tensor(value, R: int, device) -> Optional[torch.Tensor]:
    if value is None:
        return None
    if isinstance(value, str):
        if value not in SIBLING_MODES:
            raise ValueError(f"{OP}: sibling_mode must be one of {sorted(SIBLING_MODES)} or int8 codes, got {value!r}")
        return torch.full((1,), int(SIBLING_MODES[value]), dtype=torch.int8, device=device)
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, int) and not isinstance(value, bool):  # SiblingMode.DETERMINISTIC, or its code
        if value not in SIBLING_MODES.values():
            raise ValueError(f"{OP}: sibling_mode must be 0 (iid), 1 (without_replacement) or 2 (deterministic), "
                             f"got {value}")
        return torch.full((1,), int(value), dtype=torch.int8, device=device)
    raise ValueError(f"{OP}: sibling_mode must be a string, a SiblingMode, an int8 tensor [R] or None, got "
                     f"{type(value).__name__}")


def verify_tree(
    target_logits: torch.Tensor,
    node_tokens: torch.Tensor,
    parents: torch.Tensor,
    cu_num_nodes: torch.Tensor,
    *,
    max_depth: Optional[int] = None,
    draft_probs: Optional[torch.Tensor] = None,
    draft_logits: Optional[torch.Tensor] = None,
    draft_temperature: TensorOrFloat = 1.0,
    sibling_mode: Union[str, SiblingMode, torch.Tensor, None] = None,
    temperature: TensorOrFloat = 1.0,
    top_k: TensorOrInt = 0,
    top_p: TensorOrFloat = 1.0,
    seed: TensorOrInt = 0,
    position: TensorOrInt = 0,
    validate: bool = False,
    out: Optional[TreeResult] = None,
    workspace: Optional[torch.Tensor] = None,
) -> TreeResult:
    """Verify drafted trees against the target and emit what survives,
    losslessly (DESIGN §3): walking from the root, each node's children are
    tried in index order; an accepted child becomes the node; when none is
    accepted, a token is sampled from the (updated) target distribution.

    Parameters
    ----------
    target_logits : Tensor [M, V]; float32 / float16 / bfloat16; V <= 2**23
        Row i: the target's logits after node i's path (M nodes of all
        requests). Rows may be strided; the last dimension contiguous.
    node_tokens : Tensor [M], int32
        Each node's token (the root's is ignored). Out of [0, V): the child
        is skipped with ``Status.TOKEN_OUT_OF_RANGE``.
    parents : Tensor [M], int32
        Request-local parent index: -1 for the root (local node 0), else
        smaller than the node's own index. Otherwise ``Status.BAD_TREE``.
    cu_num_nodes : Tensor [R+1], int32
        Offsets: request r owns nodes ``cu[r]:cu[r+1]`` (1 to 65535 nodes).
    max_depth : int, optional
        Host bound on any node's depth (root 0); sets the outputs' width
        D+1. None: read from ``parents`` (one host sync). A deeper node:
        ``Status.BAD_TREE``.
    draft_probs, draft_logits : Tensor [M, V], optional
        Row i: the distribution node i's children were drawn from, as
        probabilities or as logits (softmax at ``draft_temperature``, taken
        as given). Neither, or draft temperature 0: point masses
        (deterministic mode).
    draft_temperature : float or Tensor [R] / [1]
    sibling_mode : "iid" | "without_replacement" | "deterministic" | SiblingMode | Tensor [R] / [1] int8, optional
        The update after a rejected sibling (``SiblingMode`` codes 0/1/2);
        None: iid with draft rows, deterministic without. Each is lossless
        for the drafting it names; deterministic for any drafting.
    temperature, top_k, top_p, seed, position : scalar or Tensor [R] / [1]
        As in :func:`verify_chunk`. COIN slot = the child's node index; EMIT
        slot = the node whose row the emitted token is sampled from.
    validate : bool
        Check tensor values on the host first (one sync); raise ValueError
        naming the first bad value.
    out : TreeResult, optional
        Preallocated outputs (``empty_tree_result``): the ``.out`` overload.
    workspace : Tensor, optional
        ``workspace_size("verify_tree", num_requests=R, vocab_size=V,
        num_nodes=M)`` bytes on the device (M = ``target_logits.shape[0]``,
        padding rows included): no allocation. Sized without ``num_nodes`` it still works, without the
        row pass (CUDA: every node row's statistics read by the whole GPU
        before the walk, chosen for small batches; ``DSPARK_TREE_ROW_PASS``
        = 1 / 0 forces it on, given the room, / off).

    Returns
    -------
    TreeResult
        ``tokens [R, D+1]``, ``accepted [R]``, ``emitted [R]``, ``path [R,
        D+1]`` (accepted nodes root first: the keep set of ``tree_to_keep``)
        and ``status [R]``.

    Example
    -------
    >>> import torch, dspark_ops
    >>> V = 8                                   # root 0 -> children 1, 2; node 1 -> child 3
    >>> parents = torch.tensor([-1, 0, 0, 1], dtype=torch.int32)
    >>> tokens = torch.tensor([0, 5, 6, 2], dtype=torch.int32)
    >>> target = torch.full((4, V), -5.0); target[0, 6] = 5; target[2, 2] = 5
    >>> cu = torch.tensor([0, 4], dtype=torch.int32)
    >>> res = dspark_ops.verify_tree(target, tokens, parents, cu, temperature=0.0)   # greedy
    >>> res.path.tolist(), res.tokens.tolist()
    ([[0, 2, -1]], [[6, 2, -1]])
    """
    if cu_num_nodes.dim() != 1 or cu_num_nodes.shape[0] < 1:
        raise ValueError(f"{OP}: cu_num_nodes must have shape [R + 1], got {list(cu_num_nodes.shape)}")
    if max_depth is None:
        if torch.compiler.is_compiling():  # reading it from the tensors is a host sync the graph cannot hold
            raise ValueError(f"{OP}: under torch.compile pass max_depth= (a host int)")
        max_depth = tree_max_depth(parents, cu_num_nodes)
    R, dev = cu_num_nodes.shape[0] - 1, target_logits.device
    V = target_logits.shape[1] if target_logits.dim() == 2 else 0
    args = (
        target_logits, node_tokens, parents, cu_num_nodes, int(max_depth), draft_probs, draft_logits,
        temperature_tensor(OP, draft_temperature, R, dev, name="draft_temperature"),
        _sibling_tensor(sibling_mode, R, dev),
        temperature_tensor(OP, temperature, R, dev),
        top_k_tensor(OP, top_k, R, V, dev),
        top_p_tensor(OP, top_p, R, dev),
        seed_tensor(OP, seed, R, dev),
        position_tensor(OP, position, R, dev),
    )
    if validate:
        _validate_tree(*args)
    if out is None and workspace is None:
        return TreeResult(*_ops.verify_tree(*args))
    if out is None:  # a workspace alone: fresh outputs, the caller's scratch
        out = empty_tree_result(R, int(max_depth), device=dev)
    _ops.verify_tree.out(*args, tokens=out.tokens, accepted=out.accepted, emitted=out.emitted, path=out.path,
                         status=out.status, workspace=workspace)
    return out


def _validate_tree(target_logits, node_tokens, parents, cu, max_depth, draft_probs, draft_logits, draft_temperature,
                   sibling_mode, temperature, top_k, top_p, seed, position) -> None:
    """Host-side value checks (one synchronisation), first bad value named."""
    _checks.check_tree_args(target_logits, node_tokens, parents, cu, max_depth, draft_probs, draft_logits,
                            draft_temperature, sibling_mode, temperature, top_k, top_p, seed, position)
    M, V = target_logits.shape

    cu = cu.cpu().long()
    n = cu[1:] - cu[:-1]
    R = n.numel()
    _checks.raise_first_invalid(OP, "cu_num_nodes", cu, cu >= 0, rule="offsets must be >= 0")
    _checks.raise_first_invalid(OP, "cu_num_nodes", cu, cu <= M,
                                rule=f"past the {M} rows of target_logits (one row per node)")
    _checks.raise_first_invalid(OP, "cu_num_nodes", cu[1:], (n >= 1) & (n <= 0xFFFF), torch.arange(1, R + 1),
                                rule="every request needs 1 to 65535 nodes (offsets must increase)")
    draft = draft_probs if draft_probs is not None else draft_logits
    if draft is not None and R and int(cu[-1]) > draft.shape[0]:
        name = "draft_probs" if draft_probs is not None else "draft_logits"
        raise ValueError(f"{OP}: {name} has {draft.shape[0]} rows, but the nodes need rows up to {int(cu[-1])} "
                         f"(one row per node, as target_logits)")
    if sibling_mode is not None:
        sm = sibling_mode.cpu()
        _checks.raise_first_invalid(OP, "sibling_mode", sm, (sm >= 0) & (sm <= 2),
                                    rule="must be 0 (iid), 1 (without_replacement) or 2 (deterministic)")
    _checks.validate_sampling_values(OP, temperature, draft_temperature, top_k, top_p, position)
    par = parents.cpu().long()
    owner = torch.repeat_interleave(torch.arange(n.numel()), n)
    nodes = torch.arange(int(cu[0]), int(cu[-1]))
    local = nodes - cu[:-1][owner]
    p = par[nodes]
    _checks.raise_first_invalid(OP, "parents", p, torch.where(local == 0, p == -1, (p >= 0) & (p < local)), nodes,
                                rule="a root's parent is -1, any other node's is a request-local index "
                                     "below its own")
    depth = tree_max_depth(parents, torch.as_tensor(cu, dtype=torch.int32))
    if depth > max_depth:
        raise ValueError(f"{OP}: a node has depth {depth} > max_depth = {max_depth}")
    toks = node_tokens.cpu().long()[nodes[local > 0]]
    _checks.raise_first_invalid(OP, "node_tokens", toks, (toks >= 0) & (toks < V), nodes[local > 0],
                                rule=f"tokens must be in [0, V = {V})")
    _checks.validate_finite_rows(OP, target_logits, nodes)


@torch.library.register_fake("dspark_ops::verify_tree")
def _verify_tree_fake(target_logits, node_tokens, parents, cu_num_nodes, max_depth, draft_probs, draft_logits,
                      draft_temperature, sibling_mode, temperature, top_k, top_p, seed, position):
    R = _checks.check_tree_args(target_logits, node_tokens, parents, cu_num_nodes, max_depth, draft_probs,
                                draft_logits, draft_temperature, sibling_mode, temperature, top_k, top_p, seed,
                                position)
    vec = lambda: target_logits.new_empty((R,), dtype=torch.int32)  # noqa: E731
    rows = lambda: target_logits.new_empty((R, max_depth + 1), dtype=torch.int32)  # noqa: E731
    return rows(), vec(), vec(), rows(), vec()


@torch.library.register_fake("dspark_ops::verify_tree.out")
def _verify_tree_out_fake(target_logits, node_tokens, parents, cu_num_nodes, max_depth, draft_probs, draft_logits,
                          draft_temperature, sibling_mode, temperature, top_k, top_p, seed, position, *, tokens,
                          accepted, emitted, path, status, workspace=None):
    _checks.check_tree_args(target_logits, node_tokens, parents, cu_num_nodes, max_depth, draft_probs, draft_logits,
                            draft_temperature, sibling_mode, temperature, top_k, top_p, seed, position)
    _checks.check_tree_outputs(target_logits, cu_num_nodes, max_depth, tokens, accepted, emitted, path, status)
    # Without draft rows the op needs fewer bytes than workspace_size gives: size unchecked here.
    check_fake_workspace("verify_tree", workspace, target_logits,
                         sized=draft_probs is not None or draft_logits is not None,
                         num_requests=cu_num_nodes.shape[0] - 1, vocab_size=target_logits.shape[1])
