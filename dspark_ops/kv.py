"""KV-cache rollback and compaction, and on-device commit bookkeeping
(DESIGN §3): kv_compact, KVLayout, tree_to_keep, RequestState,
commit_tokens — typed wrappers beside their fake kernels."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import List, Optional, Sequence, Tuple, Union

import torch

from . import _checks
from ._host import host_to_device
from .ops import _ops

KV_OP = "dspark_ops.kv_compact"
COMMIT_OP = "dspark_ops.commit_tokens"


def _as_list(caches) -> List[torch.Tensor]:
    if isinstance(caches, torch.Tensor):
        if caches.dim() != 5:
            raise ValueError(f"{KV_OP}: a stacked cache tensor must be [L, R, S, H, D], got {list(caches.shape)}")
        return list(caches.unbind(0))  # L views, no copy
    return list(caches)


class KVLayout:
    """The device table of every layer's address and byte geometry, built
    once for a set of caches and reused across steps and CUDA-graph replays
    (``kv_compact(layout, ...)``). Rebuild it if the caches are reallocated.
    The table reaches the GPU by a non-blocking copy on the current stream:
    use the layout on that stream, or synchronise it before another does.

    Parameters
    ----------
    caches : list of Tensor, or Tensor [L, R, S, H, D]
        Per-layer K and V tensors: contiguous ``[R, S, H, D]``, heads-first
        ``[R, H, S, D]`` (``heads_first=True``) or paged
        ``[num_blocks, block_size, H, D]`` (``paged=True``).
    """

    def __init__(self, caches: Union[Sequence[torch.Tensor], torch.Tensor], *, heads_first: bool = False,
                 paged: bool = False):
        self.caches = _as_list(caches)
        self.heads_first, self.paged = heads_first, paged
        host = _ops.kv_layout_table(self.caches, heads_first, paged)
        self.table = host_to_device(host, self.caches[0].device)  # [L, 8] int64; no host synchronisation
        self._key = [(c.data_ptr(), tuple(c.shape), c.dtype) for c in self.caches]

    def matches(self, caches: List[torch.Tensor]) -> bool:
        return [(c.data_ptr(), tuple(c.shape), c.dtype) for c in caches] == self._key


def kv_compact(
    caches: Union[Sequence[torch.Tensor], torch.Tensor, KVLayout],
    base_len: torch.Tensor,
    num_appended: torch.Tensor,
    keep_index: torch.Tensor,
    num_keep: torch.Tensor,
    new_len: Optional[torch.Tensor] = None,
    *,
    block_table: Optional[torch.Tensor] = None,
    block_size: Optional[int] = None,
    heads_first: bool = False,
    status: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Keep some of the entries each request appended after ``base_len``, in
    place, in every layer at once (one launch on CUDA).

    Request r appended ``num_appended[r]`` entries at positions
    ``base_len[r] ..``; entry ``keep_index[r, i]`` (strictly increasing,
    < num_appended) moves to ``base_len[r] + i`` for i < ``num_keep[r]``.

    Parameters
    ----------
    caches : list of Tensor, Tensor [L, R, S, H, D], or KVLayout
        Modified in place. Contiguous ``[R, S, H, D]``, heads-first
        ``[R, H, S, D]`` (Hugging Face's layout; ``heads_first=True``), or
        paged ``[num_blocks, block_size, H, D]`` with ``block_table``. Any
        dtype (bytes are moved); shapes may differ between tensors.
    base_len, num_appended, num_keep : Tensor [R], int32
        ``base_len`` is read-only.
    keep_index : Tensor [R, K_max], int32
    new_len : Tensor [R], int32, optional
        Written: ``base_len + num_keep`` (``base_len`` for a rejected request).
    block_table : Tensor [R, max_blocks], int32, optional
        Paged caches: position s of request r lives in block
        ``block_table[r, s // block_size]``. The blocks holding the appended
        positions must be the request's own (no two positions on one slot;
        a shared prefix block below base_len is fine): the op does not
        check it.
    status : Tensor [R], int32, optional
        Written: 0, ``Status.BAD_INDEX`` (a keep index not strictly
        increasing or >= num_appended, a block-table entry out of range) or
        ``Status.BAD_LENGTHS`` (negative counts, num_keep > K_max or >
        num_appended, base_len + num_appended > S). That request's caches are
        untouched; the others go on.

    Returns
    -------
    (new_len [R], status [R])

    Example
    -------
    >>> import torch, dspark_ops
    >>> k = torch.arange(2 * 6 * 1 * 2, dtype=torch.float32).reshape(2, 6, 1, 2)   # [R, S, H, D]
    >>> new_len, status = dspark_ops.kv_compact([k], torch.tensor([1, 1], dtype=torch.int32),
    ...     torch.tensor([4, 4], dtype=torch.int32), torch.tensor([[1, 3], [0, 1]], dtype=torch.int32),
    ...     torch.tensor([2, 2], dtype=torch.int32))
    >>> new_len.tolist(), k[0, 1:3, 0, 0].tolist()
    ([3, 3], [4.0, 8.0])

    Notes
    -----
    Entries already in place are skipped: after chain verification (keep
    = 0..accepted) the op only writes the lengths. Overlapping moves (keep =
    [1, 2]) are safe. No host synchronisation either way; a list costs one
    small asynchronous host-to-device copy of the layer table per call (from
    pinned memory), which a CUDA graph cannot capture: capture with a
    KVLayout.
    """
    layout = None
    if isinstance(caches, KVLayout):
        layout = caches
        caches = layout.caches
        if layout.heads_first != heads_first or layout.paged != (block_table is not None):
            raise ValueError(f"{KV_OP}: the KVLayout was built with heads_first={layout.heads_first}, "
                             f"paged={layout.paged}; called with heads_first={heads_first}, "
                             f"paged={block_table is not None}")
    caches = _as_list(caches)
    # Data pointers cannot be traced: a compiled call trusts the layout (rebuild it when the caches are reallocated).
    if layout is not None and not torch.compiler.is_compiling() and not layout.matches(caches):
        raise ValueError(f"{KV_OP}: the KVLayout no longer matches its caches (reallocated?): build a new one")
    if block_size is not None and (block_table is None or not caches or caches[0].shape[1] != block_size):
        raise ValueError(f"{KV_OP}: block_size={block_size} must go with block_table and equal the caches' "
                         f"dimension 1, got {list(caches[0].shape) if caches else []}")
    R = base_len.shape[0] if base_len.dim() == 1 else -1
    dev = base_len.device
    new_len = torch.empty(max(R, 0), dtype=torch.int32, device=dev) if new_len is None else new_len
    status = torch.empty(max(R, 0), dtype=torch.int32, device=dev) if status is None else status
    table = layout.table if (layout is not None and dev.type == "cuda") else None
    _ops.kv_compact(caches, base_len, num_appended, keep_index, num_keep, new_len, status, block_table,
                    heads_first, table)
    return new_len, status


@torch.library.register_fake("dspark_ops::kv_compact")
def _kv_compact_fake(caches, base_len, num_appended, keep_index, num_keep, new_len, status, block_table,
                     heads_first, layout):
    _checks.check_kv_args(caches, base_len, num_appended, keep_index, num_keep, new_len, status, block_table,
                          heads_first)


@torch.library.register_fake("dspark_ops::kv_layout_table")
def _kv_layout_table_fake(caches, heads_first, paged):
    return torch.empty((len(caches), 8), dtype=torch.int64, device="cpu")


def tree_to_keep(path: torch.Tensor, accepted: torch.Tensor, *, node_offset: Optional[torch.Tensor] = None,
                 cu_num_nodes: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The kv_compact arguments after a verify pass that appended every node
    (root included): device tensor ops only, no synchronisation.

    Parameters
    ----------
    path : Tensor [R, D+1], int32
        Accepted node indices per request, root first, -1 padded
        (``verify_tree``'s ``path``; a chain's is 0..accepted).
    accepted : Tensor [R], int32
    node_offset : Tensor [M], int32, optional
        Where node i of request r was appended (offset from base_len),
        addressed as ``node_offset[cu_num_nodes[r] + i]``; default: node
        order.
    cu_num_nodes : Tensor [R+1], int32, optional
        Required with node_offset.

    Returns
    -------
    (keep_index [R, D+1] int32 (-1 beyond the path), num_keep [R] int32 =
    accepted + 1, or 0 for an aborted request whose path is empty)
    """
    D1 = path.shape[1]
    cols = torch.arange(D1, device=path.device).unsqueeze(0)
    valid = (cols <= accepted.unsqueeze(1)) & (path >= 0)
    nodes = path.clamp(min=0).long()
    if node_offset is not None:
        if cu_num_nodes is None:
            raise ValueError("dspark_ops.tree_to_keep: node_offset needs cu_num_nodes")
        nodes = node_offset[(cu_num_nodes[:-1].long().unsqueeze(1) + nodes).clamp(max=max(node_offset.shape[0] - 1, 0))]
    keep_index = torch.where(valid, nodes.to(torch.int32), torch.full_like(path, -1, dtype=torch.int32))
    num_keep = torch.where(path[:, 0] >= 0, accepted + 1, torch.zeros_like(accepted)).to(torch.int32)
    return keep_index, num_keep


@dataclass
class RequestState:
    """Per-request decoding state on the device (all [R], out_tokens
    [R, max_total]); commit_tokens updates it in place."""

    out_tokens: torch.Tensor  # [R, max_total] int32: tokens generated so far
    out_len: torch.Tensor  # [R] int32
    position: torch.Tensor  # [R] int64: absolute index of the next token to emit
    max_len: torch.Tensor  # [R] int32: stop after this many tokens
    finished: torch.Tensor  # [R] bool
    last_token: torch.Tensor  # [R] int32: the next step's anchor / root
    error: torch.Tensor  # [R] int32: the status that aborted the request

    @classmethod
    def new(cls, last_token: torch.Tensor, position: torch.Tensor, max_len: Union[torch.Tensor, int],
            max_total: int) -> "RequestState":
        """Fresh state: last_token [R] (each prompt's last token), position [R]
        (each prompt's length)."""
        R, dev = last_token.shape[0], last_token.device
        if isinstance(max_len, torch.Tensor):
            max_len = max_len.to(device=dev, dtype=torch.int32).expand(R).contiguous()
        else:  # filled on the device: a host scalar copied there would synchronise
            max_len = torch.full((R,), int(max_len), dtype=torch.int32, device=dev)
        return cls(torch.full((R, max_total), -1, dtype=torch.int32, device=dev),
                   torch.zeros(R, dtype=torch.int32, device=dev), position.to(torch.int64).contiguous().clone(),
                   max_len, torch.zeros(R, dtype=torch.bool, device=dev), last_token.to(torch.int32).clone(),
                   torch.zeros(R, dtype=torch.int32, device=dev))


def commit_tokens(state: RequestState, tokens: torch.Tensor, emitted: torch.Tensor, status: torch.Tensor, *,
                  stop_tokens: Optional[torch.Tensor] = None) -> RequestState:
    """Append each unfinished request's emitted tokens to ``state`` in place:
    up to and including the first stop token and within ``max_len``;
    advance ``position`` by the number appended; set ``last_token``; finish
    a request on a stop token, at ``max_len``, or on an abort status
    (writing ``error``). No host synchronisation.

    Parameters
    ----------
    tokens : Tensor [R, W], int32 (e.g. VerifyResult.tokens)
    emitted, status : Tensor [R], int32
    stop_tokens : Tensor [S], int32, optional
    """
    _ops.commit_tokens(*(getattr(state, f.name) for f in fields(state)), tokens, emitted, status, stop_tokens)
    return state


@torch.library.register_fake("dspark_ops::commit_tokens")
def _commit_tokens_fake(out_tokens, out_len, position, max_len, finished, last_token, error, tokens, emitted,
                        status, stop_tokens):
    if out_tokens.dim() != 2:
        raise ValueError(f"{COMMIT_OP}: out_tokens must be a contiguous [R, max_total] tensor, got "
                         f"[{', '.join(map(str, out_tokens.shape))}]")
