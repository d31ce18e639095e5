"""dspark_ops.Status mirrors csrc/core/status.h bit for bit."""
import re
from pathlib import Path

from dspark_ops import ABORT_MASK, Status

HEADER = Path(__file__).resolve().parent.parent / "csrc" / "core" / "status.h"
NAMES = {"TokenOutOfRange": "TOKEN_OUT_OF_RANGE", "NonfiniteLogits": "NONFINITE_LOGITS",
         "BadLengths": "BAD_LENGTHS", "DraftProbZero": "DRAFT_PROB_ZERO", "AllMasked": "ALL_MASKED",
         "BadTree": "BAD_TREE", "BadIndex": "BAD_INDEX"}


def test_status_matches_header():
    text = HEADER.read_text()
    found = dict(re.findall(r"k(\w+) = (\d+),", text))
    assert {NAMES[k]: int(v) for k, v in found.items() if k in NAMES} == {
        s.name: int(s) for s in Status if s.name != "OK"}
    assert int(ABORT_MASK) == int(Status.NONFINITE_LOGITS | Status.BAD_LENGTHS | Status.ALL_MASKED
                                  | Status.BAD_TREE | Status.BAD_INDEX)
    assert "kAbortMask = kNonfiniteLogits | kBadLengths | kAllMasked | kBadTree | kBadIndex" in text
