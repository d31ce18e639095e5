"""SGLang's EAGLE tree verification (sgl-kernel's ``verify_tree_greedy`` and
``tree_speculative_sampling_target_only``) over :func:`dspark_ops.verify_tree`
(a thin shim: no kernels of its own).

Mirrors ``sgl-kernel/python/sgl_kernel/speculative.py`` at
sgl-project/sglang@6bfad8f187aa80f7c9a2a06f7861409c4e3a4ad2 (the kernels:
``csrc/speculative/eagle_utils.cu`` @29bd4e85, ``speculative_sampling.cuh``
@b227f632, ``speculative_sampling.cu`` @c28bdc90; the fixtures:
``tests/speculative/test_eagle_utils.py`` @120affb9,
``test_speculative_sampling.py`` @24dcd7c4): the same positional arguments
in the same order, sgl-kernel's ``retrive_*`` spelling (``retrieve_*``, as
SGLang's own code and tests spell it, is accepted by keyword too), the
outputs written in place:

* ``predicts [P]`` (P = bs * num_draft_tokens): for each node on the accepted
  path, at its flat index ``retrive_index[b, i]``, the token that follows it
  (the next accepted draft, or the emitted token after the last node); other
  entries are left as they are.
* ``accept_index [bs, num_spec_step]``: the accepted path's flat indices,
  root first, **then -1** (SGLang leaves the tail as it was; its callers fill
  it with -1 first, so the result is the same).
* ``accept_token_num [bs]``: drafts accepted (the path's length minus the root).

The tree. SGLang stores request b's tree as first-child / next-sibling linked
lists over its local nodes 0..N-1 (node 0: the root; -1: none); the walk
from the root tries a node's children in list order and stops after
``num_spec_step - 1`` accepted drafts. :func:`tree_from_linked_lists`
converts the lists into our request-local ``parents`` (vectorised torch ops,
no loop over nodes, no host synchronisation): each node's predecessor link
(pointer jumping along sibling chains gives each node its list head, hence
its parent, and its rank among its siblings; pointer jumping along parents
gives depths), then a stable order by (depth, parent, sibling rank) - parent
before child and siblings in list order, so verify_tree's index-order walk is
SGLang's list-order walk for **any** numbering (SGLang's ``build_tree``
numbers its EAGLE trees this way already, siblings in index order; its own
test fixture does not: request 1 lists child 4 before child 1). Target rows
are gathered into that order and the outputs mapped back. Nodes SGLang's
walk can never reach - not linked from the root, or deeper than
``num_spec_step - 1`` - become children of the root with token -1, which
verify_tree skips (no coin, no update; they may add
``Status.TOKEN_OUT_OF_RANGE`` to the status). A request whose lists are malformed - a link outside [-1, N),
a node linked twice (by any node, reachable or not), a link to the root, or
a reachable node's ``retrive_index`` outside ``predicts`` - is aborted
(``Status.BAD_TREE``: ``accept_token_num`` 0, ``accept_index`` holds the
root's index then -1, and ``predicts`` at the root a defined token -- the
target's argmax there, NaN ignored -- since SGLang's kernels always write
the root and its callers read predicts there without looking at a status;
a root index outside ``predicts`` leaves the row all -1; check
``return_status=True``); SGLang's kernels walk such lists as they come
(forever round a cycle, out of bounds on a bad link). The root's
``retrive_next_sibling`` is never read (nor is it by SGLang).

Greedy. ``verify_tree_greedy`` receives the target's argmax per node
(``target_predict``), not logits, so the shim compares each child's token
with its parent's prediction (one gather), and verify_tree walks the tree
over 2-token surrogate logits (a stride-0 ``[M, 2]`` view, argmax token 0;
a matching child has token 0, any other 1): the same first-match-in-list-
order walk, no vocabulary-sized tensor, exact. As in SGLang,
``target_predict`` is read at the flat index ``retrive_index``.

Sampling. ``target_probs [bs, N, V]`` are SGLang's processed target
probabilities (temperature, top-k / top-p already applied); the shim passes
``log(target_probs)`` as float32 at temperature 1, rows gathered into the
converted order (the gather and the log: one copy, as the FlashInfer shim's
log), so the op samples from ``p / sum(p)`` up to one float32 log and exp per
entry. SGLang's target-only sampler is verify_tree's ``"deterministic"``
sibling mode: one coin per node compared with the running sum of the target
probabilities of the siblings tried (accept sibling k with probability
p(x_k) / (1 - p(rejected ones))), then a sample from the target with the
rejected tokens removed - which is how the shim calls the op
(``sibling_mode="deterministic"``, no draft rows). EAGLE's top-k drafts are
deterministic drafts; this is lossless for them, and for any drafting.

Where it differs from SGLang (stricter, or documented):

* ``threshold_single`` and ``threshold_acc`` must be 1.0 (the lossless
  setting, SGLang's default): below 1 SGLang accepts more than the target
  allows (lossy by design); the shim raises ValueError rather than silently
  running lossless rules the caller did not ask for.
* Random numbers are ours (Philox, DESIGN §2), not the given coins: the
  tokens for given ``uniform_samples`` differ from SGLang's, the distribution
  is the same. By default request b's seed is the 64 bits of
  ``(uniform_samples_for_final_sampling[b], uniform_samples[b, 0])`` as
  float32 (position 0): the caller's generator still drives the randomness
  and equal inputs give equal outputs, as in SGLang. Keyword-only ``seed`` /
  ``offset`` (both or neither; an int or [1] spreads to per-request streams,
  as in the FlashInfer shim) select our streams explicitly.
* Duplicate sibling tokens: SGLang adds p(x) to its running sum once per
  duplicate, so a token drafted twice under one node is accepted with up to
  twice its probability (not lossless); verify_tree removes x after its first
  rejection, so a duplicate is never accepted (lossless; a test checks both).
* ``draft_probs`` is neither read nor written (SGLang's kernel uses it as a
  zero-filled scratch buffer and writes rejected tokens' probabilities into
  it; pass anything or None). ``deterministic`` is ignored: always
  deterministic.
* A token outside [0, V) is skipped with ``Status.TOKEN_OUT_OF_RANGE``
  (SGLang reads out of bounds). A needed row with NaN, negative or no
  probability mass aborts the request (``NONFINITE_LOGITS`` /
  ``ALL_MASKED``; outputs as for malformed trees).
* Inputs may be of any integer dtype (SGLang: int64), probabilities float32 /
  float16 / bfloat16 (SGLang: float32), outputs of any integer dtype (SGLang:
  int32). ``return_status=True`` also returns the ``Status`` bits [bs].

Cost: no host synchronisation anywhere (the trees' depth bound is
``num_spec_step - 1``, known on the host). Measured on the 2-core CPU machine
(torch 2.14.1, ``python -m bench.sglang_bench --threads 1 --cpu-time``,
process CPU time, medians; EAGLE-like trees numbered as build_tree numbers
them, 5 steps, V = 32000 float32):

======================  =========  ===========  ===========  ============
bs x N (topk)           1 x 8 (4)  8 x 8 (4)    8 x 64 (8)   32 x 64 (8)
======================  =========  ===========  ===========  ============
list conversion         0.21       0.23         0.27         0.34
greedy shim             0.42       0.44         0.50         0.59
greedy verify_tree      0.02       0.02         0.02         0.03
sampling: gather + log  0.29       2.6          58           229
sampling verify_tree    1.25       9.6          9.6          38
sampling shim           2.2        13.5         71           274
======================  =========  ===========  ===========  ============

The conversion is about 90 top-level torch calls (views included), 0.2 to
0.35 ms whatever V, dispatch-bound; the greedy shim about 160 (the
conversion, the comparison, the output scatter, verify_tree's scalar
arguments). On a GPU most are tiny launches; as nothing synchronises with
the host they could be captured in a CUDA graph (not tried), and none of it
is measured there yet. The sampling shim's
cost beyond verify_tree is the gather + log pass over all bs * N rows
(verify_tree reads only the visited ones): about 1.4 ns per element of CPU
time, plus the page faults of a fresh float32 buffer (more than half of it
at 64 MB on this VM; glibc's ``MALLOC_MMAP_THRESHOLD_`` / a caching allocator
removes them; on a GPU it is one bandwidth-bound pass, e.g. 2 x 262 MB at
32 x 64 x 32000). The CUDA path has not run on a GPU yet
(``tests/test_compat_sglang.py::test_cuda_matches_cpu``).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import torch

from ..tree import verify_tree
from ._streams import as_int64, per_row_seeds

OP_GREEDY = "dspark_ops.compat.sglang.verify_tree_greedy"
OP_SAMPLING = "dspark_ops.compat.sglang.tree_speculative_sampling_target_only"
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_M32 = 0xFFFFFFFF


class LinkedTree(NamedTuple):
    """:func:`tree_from_linked_lists`' result for bs requests of N nodes."""

    parents: torch.Tensor  # [bs * N] int32: request-local parents in the new order (verify_tree's)
    order: torch.Tensor  # [bs, N] int64: new local index -> the node's local index in SGLang's numbering
    kept: torch.Tensor  # [bs, N] bool (SGLang's numbering): reachable within max_depth
    parent: torch.Tensor  # [bs, N] int64 (SGLang's numbering): the parent's local index; -1 root / not kept
    malformed: torch.Tensor  # [bs] bool: lists not a tree (the root's parent is then 0: BAD_TREE)


def _rounds(n: int) -> int:
    """Pointer-jumping rounds after which every chain of up to n links is covered."""
    return max(int(n) - 1, 0).bit_length()


def tree_from_linked_lists(retrive_next_token: torch.Tensor, retrive_next_sibling: torch.Tensor,
                           max_depth: int) -> LinkedTree:
    """SGLang's first-child / next-sibling lists [bs, N] as verify_tree's
    request-local ``parents`` (see the module docstring): nodes ordered by
    (depth, parent, rank in the sibling list), nodes that cannot be reached
    within ``max_depth`` moved after them as children of the root. Vectorised
    torch ops on the lists' device, no host synchronisation."""
    bs, N = retrive_next_token.shape
    dev = retrive_next_token.device
    src = torch.arange(N, device=dev).expand(bs, N)
    nt = retrive_next_token.long()
    root_sibling = torch.full((bs, min(N, 1)), -1, dtype=torch.int64, device=dev)  # never read by SGLang's walk
    ns = torch.cat([root_sibling, retrive_next_sibling[:, 1:].long()], 1)

    bad = torch.zeros(bs, dtype=torch.bool, device=dev)
    targets = []
    for links in (nt, ns):  # a link's target, or the dump column N for -1 and bad links
        ok = (links >= 0) & (links < N)
        bad |= ((links < -1) | (links >= N)).any(1)
        targets.append(torch.where(ok, links, N))
    indeg = torch.zeros(bs, N + 1, dtype=torch.int64, device=dev)
    for t in targets:
        indeg.scatter_add_(1, t, torch.ones_like(t))
    bad |= (indeg[:, :N] > 1).any(1) | (indeg[:, 0] > 0)
    tok_pred, sib_pred = (torch.full((bs, N + 1), -1, dtype=torch.int64, device=dev).scatter_(1, t, src)[:, :N]
                          for t in targets)

    # Along sibling chains: each node's list head and its rank in the list.
    has = sib_pred >= 0
    ptr, rank = torch.where(has, sib_pred, src), has.long()
    for _ in range(_rounds(N)):
        rank, ptr = rank + rank.gather(1, ptr), ptr.gather(1, ptr)
    parent = tok_pred.gather(1, ptr)

    # Along parents: the depth, exact up to max_depth; kept iff it ends at the root.
    has = parent >= 0
    anc, depth = torch.where(has, parent, src), has.long()
    for _ in range(_rounds(max_depth)):
        depth, anc = depth + depth.gather(1, anc), anc.gather(1, anc)
    kept = (anc == 0) & (depth <= max_depth)

    span = (N + 1) * N
    key = torch.where(kept, depth * span + (parent + 1) * N + rank, (max_depth + 1) * span + src)
    order = torch.argsort(key, dim=1, stable=True)
    inv = torch.empty_like(order).scatter_(1, order, src)
    new_parent = torch.where(kept.gather(1, order), inv.gather(1, parent.gather(1, order).clamp(min=0)), 0)
    new_parent[:, 0] = torch.where(bad, 0, -1)
    return LinkedTree(new_parent.to(torch.int32).reshape(-1), order, kept, torch.where(kept, parent, -1), bad)


# ------------------------------------------------------------------ checks


def _pick(op: str, name: str, sgl_kernel_value, sglang_value):
    if sgl_kernel_value is None and sglang_value is None:
        raise ValueError(f"{op}: retrive_{name} (or retrieve_{name}) is required")
    if sgl_kernel_value is not None and sglang_value is not None:
        raise ValueError(f"{op}: pass retrive_{name} or retrieve_{name}, not both")
    return sgl_kernel_value if sgl_kernel_value is not None else sglang_value


def _desc(t) -> str:
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{t.dtype} {list(t.shape)} on {t.device}"


def _check_int(op: str, name: str, t, shape, device) -> None:
    if (not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype.is_complex
            or t.dtype == torch.bool or (shape is not None and tuple(t.shape) != tuple(shape))
            or (device is not None and t.device != device)):
        want = f"shape {list(shape)}" if shape is not None else "shape as documented"
        raise ValueError(f"{op}: {name} must be an integer tensor of {want} on {device}, got {_desc(t)}")


def _check_tree_args(op, predicts, accept_index, accept_token_num, candidates, index, next_token,
                     next_sibling) -> Tuple[int, int, int, torch.device]:
    if not isinstance(candidates, torch.Tensor) or candidates.dim() != 2:
        raise ValueError(f"{op}: candidates must be an integer tensor [bs, num_draft_tokens], got {_desc(candidates)}")
    bs, N = candidates.shape
    dev = candidates.device
    _check_int(op, "candidates", candidates, (bs, N), dev)
    if N < 1 or N > 0xFFFF:
        raise ValueError(f"{op}: num_draft_tokens must be in [1, 65535], got {N}")
    for name, t in (("retrive_index", index), ("retrive_next_token", next_token),
                    ("retrive_next_sibling", next_sibling)):
        _check_int(op, name, t, (bs, N), dev)
    if not isinstance(accept_index, torch.Tensor) or accept_index.dim() != 2:
        raise ValueError(f"{op}: accept_index must be an integer tensor [{bs}, num_spec_step], got "
                         f"{_desc(accept_index)}")
    S = accept_index.shape[1]
    _check_int(op, "accept_index", accept_index, (bs, S), dev)
    if S < 1:
        raise ValueError(f"{op}: accept_index must have num_spec_step >= 1 columns, got {list(accept_index.shape)}")
    _check_int(op, "accept_token_num", accept_token_num, (bs,), dev)
    if not isinstance(predicts, torch.Tensor) or predicts.dim() != 1:
        raise ValueError(f"{op}: predicts must be a 1-D integer tensor [bs * num_draft_tokens], got {_desc(predicts)}")
    _check_int(op, "predicts", predicts, None, dev)
    return bs, N, S, dev


# ------------------------------------------------------------------ outputs


def _flat_rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t.reshape(-1)[index] for indices already known to be in range or masked."""
    return t.reshape(-1).gather(0, index.reshape(-1).clamp(0, max(t.numel() - 1, 0))).view(index.shape)


def _write_outputs(path, values, tree: LinkedTree, index, predicts, accept_index, accept_token_num, accepted,
                   fallback):
    """accept_index / accept_token_num / predicts from verify_tree's path
    (converted local indices) and the token each path node is followed by.
    An aborted request (empty path: NaN or massless rows, a malformed tree)
    still gets its root in accept_index[b, 0], accept_token_num 0 and
    fallback[b] as the token after the root: SGLang's kernels always write
    the root, and its callers read predicts there without a status. A root
    outside predicts stays -1."""
    S, P = accept_index.shape[1], predicts.numel()
    root = index[:, 0].long()
    rescue = (path[:, 0] < 0) & (root >= 0) & (root < P)
    path = torch.cat([torch.where(rescue, 0, path[:, 0]).unsqueeze(1), path[:, 1:S]], 1)
    first = torch.where(rescue, fallback.to(values.dtype), values[:, 0])
    values = torch.cat([first.unsqueeze(1), values[:, 1:S]], 1)
    on_path = path >= 0
    orig = tree.order.gather(1, path.clamp(min=0).long())
    flat = index.long().gather(1, orig)
    flat[:, 0] = torch.where(rescue, root, flat[:, 0])  # the root itself: a malformed tree's order may not start there
    accept_index.copy_(torch.where(on_path, flat, -1))
    accept_token_num.copy_(accepted)
    ext = torch.cat([predicts.reshape(-1), predicts.new_zeros(1)])  # slot P: the dump for the -1 entries
    ext.scatter_(0, torch.where(on_path, flat, P).reshape(-1), values[:, :S].reshape(-1).to(ext.dtype))
    predicts.copy_(ext[:P].view(predicts.shape))


def _index_in_range(index, tree: LinkedTree, limit: int) -> torch.Tensor:
    """[bs] bool: every reachable node's flat index lies in [0, limit)."""
    ok = (index >= 0) & (index < limit)
    return (ok | ~tree.kept).all(1)


# ------------------------------------------------------------------ greedy


def verify_tree_greedy(
    predicts: torch.Tensor,
    accept_index: torch.Tensor,
    accept_token_num: torch.Tensor,
    candidates: torch.Tensor,
    retrive_index: Optional[torch.Tensor] = None,
    retrive_next_token: Optional[torch.Tensor] = None,
    retrive_next_sibling: Optional[torch.Tensor] = None,
    target_predict: Optional[torch.Tensor] = None,
    *,
    retrieve_index: Optional[torch.Tensor] = None,
    retrieve_next_token: Optional[torch.Tensor] = None,
    retrieve_next_sibling: Optional[torch.Tensor] = None,
    return_status: bool = False,
):
    """sgl-kernel's greedy tree verification via :func:`dspark_ops.verify_tree`
    (module docstring: the mapping and what differs). Writes ``predicts``,
    ``accept_index`` and ``accept_token_num`` in place.

    Parameters
    ----------
    predicts : Tensor [bs * N], integer (mutable)
        At each accepted node's flat index: the token that follows it.
    accept_index : Tensor [bs, num_spec_step], integer (mutable)
        The accepted path's flat indices, root first, then -1.
    accept_token_num : Tensor [bs], integer (mutable)
        Drafts accepted.
    candidates : Tensor [bs, N], integer
        Node tokens (node 0, the root's, is not read).
    retrive_index : Tensor [bs, N], integer
        Each node's flat index into ``predicts`` and ``target_predict``.
    retrive_next_token, retrive_next_sibling : Tensor [bs, N], integer
        First child and next sibling (local indices; -1: none).
    target_predict : Tensor [bs, N], integer
        The target's argmax after each node, read at the flat index
        ``retrive_index``.
    retrieve_index, retrieve_next_token, retrieve_next_sibling : keyword only
        SGLang's spelling of the three above (one spelling per argument).
    return_status : bool
        Return the ``Status`` bits [bs] int32 (keyword only; not SGLang's).

    Returns
    -------
    None, or ``status [bs]`` when ``return_status``.

    Example
    -------
    >>> import torch
    >>> from dspark_ops.compat import sglang
    >>> cand = torch.tensor([[0, 5, 6, 7]])                  # root -> 1, 2; 1 -> 3
    >>> nxt, sib = torch.tensor([[1, 3, -1, -1]]), torch.tensor([[-1, 2, -1, -1]])
    >>> pred = torch.tensor([[6, 1, 7, 2]])                   # the target's argmax after each node
    >>> predicts = torch.full((4,), -1, dtype=torch.int32)
    >>> acc_idx, acc_num = torch.full((1, 3), -1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    >>> sglang.verify_tree_greedy(predicts, acc_idx, acc_num, cand, torch.arange(4).view(1, 4), nxt, sib, pred)
    >>> predicts.tolist(), acc_idx.tolist(), acc_num.tolist()
    ([6, -1, 7, -1], [[0, 2, -1]], [1])
    """
    op = OP_GREEDY
    index = _pick(op, "index", retrive_index, retrieve_index)
    next_token = _pick(op, "next_token", retrive_next_token, retrieve_next_token)
    next_sibling = _pick(op, "next_sibling", retrive_next_sibling, retrieve_next_sibling)
    bs, N, S, dev = _check_tree_args(op, predicts, accept_index, accept_token_num, candidates, index, next_token,
                                     next_sibling)
    _check_int(op, "target_predict", target_predict, (bs, N), dev)
    if bs == 0:
        return torch.zeros(0, dtype=torch.int32, device=dev) if return_status else None

    tree = tree_from_linked_lists(next_token, next_sibling, S - 1)
    index = index.long()
    ok = _index_in_range(index, tree, min(predicts.numel(), target_predict.numel()))
    tree.parents.view(bs, N)[:, 0] = torch.where(tree.malformed | ~ok, 0, -1).to(torch.int32)  # abort: BAD_TREE

    predict = _flat_rows(target_predict.long(), index)  # [bs, N]: the target's argmax after node i
    match = candidates.long() == predict.gather(1, tree.parent.clamp(min=0))
    surrogate = torch.where(tree.kept, torch.where(match, 0, 1), -1)  # token 0 is each row's argmax
    node_tokens = surrogate.gather(1, tree.order).to(torch.int32).reshape(-1)
    logits = torch.arange(0, -2, -1, dtype=torch.float32, device=dev).expand(bs * N, 2)  # no host copy
    cu = torch.arange(bs + 1, dtype=torch.int32, device=dev) * N
    res = verify_tree(logits, node_tokens, tree.parents, cu, max_depth=max(S - 1, 1), temperature=0.0)

    values = predict.gather(1, tree.order.gather(1, res.path.clamp(min=0).long()))
    _write_outputs(res.path, values, tree, index, predicts, accept_index, accept_token_num, res.accepted,
                   predict[:, 0])  # aborted: the target's argmax after the root
    return res.status if return_status else None


# ------------------------------------------------------------------ sampling


def _streams(seed, offset, uniform_samples, uniform_final, bs: int, dev) -> Tuple[torch.Tensor, torch.Tensor]:
    """(seed [bs], position [1] or [bs]) int64."""
    if (seed is None) != (offset is None):
        raise ValueError(f"{OP_SAMPLING}: seed and offset must be given together (got seed={seed!r}, "
                         f"offset={offset!r}); neither derives the seeds from the uniform samples")
    if seed is not None:
        return per_row_seeds(as_int64(OP_SAMPLING, "seed", seed, bs, dev), bs), \
            as_int64(OP_SAMPLING, "offset", offset, bs, dev)
    lo = uniform_samples[:, 0].to(torch.float32).contiguous().view(torch.int32).long() & _M32
    hi = uniform_final.to(torch.float32).contiguous().view(torch.int32).long()
    return (hi << 32) | lo, torch.zeros(1, dtype=torch.int64, device=dev)


def tree_speculative_sampling_target_only(
    predicts: torch.Tensor,
    accept_index: torch.Tensor,
    accept_token_num: torch.Tensor,
    candidates: torch.Tensor,
    retrive_index: Optional[torch.Tensor] = None,
    retrive_next_token: Optional[torch.Tensor] = None,
    retrive_next_sibling: Optional[torch.Tensor] = None,
    uniform_samples: Optional[torch.Tensor] = None,
    uniform_samples_for_final_sampling: Optional[torch.Tensor] = None,
    target_probs: Optional[torch.Tensor] = None,
    draft_probs: Optional[torch.Tensor] = None,
    threshold_single: float = 1.0,
    threshold_acc: float = 1.0,
    deterministic: bool = True,
    *,
    retrieve_index: Optional[torch.Tensor] = None,
    retrieve_next_token: Optional[torch.Tensor] = None,
    retrieve_next_sibling: Optional[torch.Tensor] = None,
    seed: Optional[Union[int, torch.Tensor]] = None,
    offset: Optional[Union[int, torch.Tensor]] = None,
    return_status: bool = False,
):
    """sgl-kernel's target-only tree speculative sampling, lossless via
    :func:`dspark_ops.verify_tree` with ``sibling_mode="deterministic"``
    (module docstring: the mapping and what differs). Writes ``predicts``,
    ``accept_index`` and ``accept_token_num`` in place.

    Parameters
    ----------
    predicts, accept_index, accept_token_num, candidates, retrive_index, retrive_next_token, retrive_next_sibling
        As in :func:`verify_tree_greedy` (``retrive_index`` addresses
        ``predicts`` only; target rows are per local node).
    uniform_samples : Tensor [bs, N], float
        SGLang's coins; not used as coins (column 0 seeds request b's Philox
        stream unless ``seed`` / ``offset`` are given).
    uniform_samples_for_final_sampling : Tensor [bs], float
        Likewise (the seed's high 32 bits).
    target_probs : Tensor [bs, N, V], float32 / float16 / bfloat16
        Row (b, i): the target distribution after node i, as SGLang processed
        it (temperature, top-k, top-p); used as ``log(p)`` at temperature 1.
    draft_probs : any, optional
        Ignored (SGLang's scratch buffer).
    threshold_single, threshold_acc : float
        Must be 1.0 (lossless); anything else raises ValueError.
    deterministic : bool
        Ignored: always deterministic.
    retrieve_index, retrieve_next_token, retrieve_next_sibling : keyword only
        SGLang's spelling of the tree arguments.
    seed, offset : int or Tensor [1] / [bs] (int64 / uint64), keyword only
        Our Philox seed and position (both or neither; advance ``offset`` by
        >= 1 every call with the same seed).
    return_status : bool
        Return the ``Status`` bits [bs] int32 (keyword only; not SGLang's).

    Returns
    -------
    None, or ``status [bs]`` when ``return_status``.
    """
    op = OP_SAMPLING
    index = _pick(op, "index", retrive_index, retrieve_index)
    next_token = _pick(op, "next_token", retrive_next_token, retrieve_next_token)
    next_sibling = _pick(op, "next_sibling", retrive_next_sibling, retrieve_next_sibling)
    bs, N, S, dev = _check_tree_args(op, predicts, accept_index, accept_token_num, candidates, index, next_token,
                                     next_sibling)
    if float(threshold_single) != 1.0 or float(threshold_acc) != 1.0:
        raise ValueError(f"{op}: threshold_single and threshold_acc must be 1.0 (lossless verification), got "
                         f"{threshold_single} and {threshold_acc}; SGLang's relaxed thresholds accept drafts the "
                         f"target would not and are not supported")
    if (not isinstance(target_probs, torch.Tensor) or target_probs.dim() != 3
            or tuple(target_probs.shape[:2]) != (bs, N) or target_probs.dtype not in _FLOATS
            or target_probs.device != dev or target_probs.shape[2] < 1):
        raise ValueError(f"{op}: target_probs must be a float32/float16/bfloat16 tensor [{bs}, {N}, V] on {dev}, "
                         f"got {_desc(target_probs)}")
    for name, t, shape in (("uniform_samples", uniform_samples, (bs, N)),
                           ("uniform_samples_for_final_sampling", uniform_samples_for_final_sampling, (bs,))):
        if (not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point or tuple(t.shape) != shape
                or t.device != dev):
            raise ValueError(f"{op}: {name} must be a float tensor of shape {list(shape)} on {dev}, got {_desc(t)}")
    seeds, position = _streams(seed, offset, uniform_samples, uniform_samples_for_final_sampling, bs, dev)
    if bs == 0:
        return torch.zeros(0, dtype=torch.int32, device=dev) if return_status else None

    tree = tree_from_linked_lists(next_token, next_sibling, S - 1)
    index = index.long()
    ok = _index_in_range(index, tree, predicts.numel())
    tree.parents.view(bs, N)[:, 0] = torch.where(tree.malformed | ~ok, 0, -1).to(torch.int32)  # abort: BAD_TREE

    V = target_probs.shape[2]
    rows = (tree.order + torch.arange(bs, device=dev).unsqueeze(1) * N).reshape(-1)
    logits = target_probs.reshape(bs * N, V).index_select(0, rows).to(torch.float32).log_()
    node_tokens = torch.where(tree.kept, candidates.long(), -1).gather(1, tree.order).to(torch.int32).reshape(-1)
    cu = torch.arange(bs + 1, dtype=torch.int32, device=dev) * N
    res = verify_tree(logits, node_tokens, tree.parents, cu, max_depth=max(S - 1, 1),
                      sibling_mode="deterministic", temperature=1.0, seed=seeds, position=position)

    fallback = torch.nan_to_num(target_probs[:, 0].float(), nan=-1.0).argmax(-1)  # aborted: the root row's mode
    _write_outputs(res.path, res.tokens, tree, index, predicts, accept_index, accept_token_num, res.accepted,
                   fallback)
    return res.status if return_status else None


# ------------------------------------------------------------------ cost


def eagle_lists(bs: int, depth: int, topk: int, num_nodes: Optional[int] = None,
                device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Linked lists [bs, N] of an EAGLE-like tree numbered level by level as
    SGLang's build_tree numbers it (siblings listed in index order): the
    root, its ``topk`` children, then ``topk`` children under each of the
    first ``topk`` nodes of every level, ``depth`` levels, cut to the first
    ``num_nodes`` nodes (default all: 1 + topk + (depth - 1) * topk^2)."""
    parents, level = [-1], [0]
    for _ in range(depth):
        nxt = []
        for u in level[:topk]:
            for _ in range(topk):
                nxt.append(len(parents))
                parents.append(u)
        level = nxt
    parents = parents[:num_nodes] if num_nodes is not None else parents
    N = len(parents)
    nt, ns = [-1] * N, [-1] * N
    for c in range(N - 1, 0, -1):  # prepend, as build_tree does: lists end up in index order
        p = parents[c]
        nt[p], ns[c] = c, nt[p]
    to = lambda x: torch.tensor(x, dtype=torch.int64, device=device).expand(bs, N).contiguous()  # noqa: E731
    return to(nt), to(ns)
