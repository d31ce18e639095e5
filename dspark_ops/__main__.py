"""python -m dspark_ops COMMAND

    demo       speculative decoding on the embedded default model (`make demo`)
    ops-demo   the ops on a synthetic verification batch (verify_chunk, sample)

Arguments after `demo` go to the decoding demo (python -m dspark_ops demo --help)."""
from __future__ import annotations

import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd, rest = (argv[0], argv[1:]) if argv else (None, [])
    if cmd == "demo":
        from .demo_decoding import main as demo_main
        demo_main(rest)
    elif cmd == "ops-demo":
        if rest:
            print(f"python -m dspark_ops ops-demo takes no arguments, got {rest}", file=sys.stderr)
            return 2
        from .demo import main as ops_demo_main
        ops_demo_main()
    elif cmd in ("-h", "--help", "help"):
        print(__doc__)
    else:
        print(__doc__, file=sys.stderr)
        if cmd is not None:
            print(f"unknown command {cmd!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
