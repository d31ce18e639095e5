"""Enums shared with the C++ core (csrc/core/status.h, csrc/core/rng.h)."""
from enum import IntEnum, IntFlag


class Status(IntFlag):
    """Per-request status bits (DESIGN §2). A *flag* lets the request go on;
    an *abort* gives token -1 and emits nothing."""

    OK = 0
    TOKEN_OUT_OF_RANGE = 1  # flag: a draft token < 0 or >= V
    NONFINITE_LOGITS = 2  # abort: NaN or +inf in a needed row
    BAD_LENGTHS = 4  # abort: bad offsets, lengths, slots or row starts
    DRAFT_PROB_ZERO = 8  # flag: a drafted token has q = 0
    ALL_MASKED = 16  # abort: the masks left no token
    BAD_TREE = 32  # abort: malformed tree
    BAD_INDEX = 64  # abort: keep index or block-table entry out of range


ABORT_MASK = (Status.NONFINITE_LOGITS | Status.BAD_LENGTHS | Status.ALL_MASKED
              | Status.BAD_TREE | Status.BAD_INDEX)


class Purpose(IntEnum):
    """What a random draw is for: part of its Philox counter (DESIGN §2)."""

    COIN = 1  # acceptance coin of a drafted token (slot = its node index)
    EMIT = 2  # the token a verifier emits (slot = the row's node index)
    DRAFT = 3  # a drafter's token (slot = the drafted node index)


MAX_SLOT = 0xFFFF


class SiblingMode(IntEnum):
    """How verify_tree updates p (and q) after a rejected sibling (DESIGN §3
    verify_tree); each is lossless for the drafting it names."""

    IID = 0  # siblings drawn i.i.d. from q: p <- norm(max(0, p - q))
    WITHOUT_REPLACEMENT = 1  # drawn without replacement: also q <- norm(q without x)
    DETERMINISTIC = 2  # q a point mass (top-k trees, any drafting): p <- norm(p without x)


SIBLING_MODES = {"iid": SiblingMode.IID, "without_replacement": SiblingMode.WITHOUT_REPLACEMENT,
                 "deterministic": SiblingMode.DETERMINISTIC}
