"""python bench/bench_verify_tree.py [args]: the same as
python -m bench --op verify_tree [args] (see bench/__main__.py)."""
from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, sys.path[0] is bench/ itself: put the repo root first so
# that `bench` and the in-place built `dspark_ops` import as packages.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["--op", "verify_tree", *sys.argv[1:]]))
