"""Lets tests import the build helpers in tools/ (find_cuda_home)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from cuda_env import find_cuda_home  # noqa: E402,F401
