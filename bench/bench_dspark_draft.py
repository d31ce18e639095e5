"""python bench/bench_dspark_draft.py [args]: DSpark's drafting ops —
markov_draft per step against its memory floor, then schedule_verify latency
(the same as `python -m bench --op markov_draft` and `--op schedule_verify`)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.__main__ import main  # noqa: E402

if __name__ == "__main__":
    rc = main(["--op", "markov_draft", *sys.argv[1:]])
    sys.exit(rc or main(["--op", "schedule_verify", *sys.argv[1:]]))
