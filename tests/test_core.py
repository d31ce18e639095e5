"""csrc/core built by the host compiler without torch or CUDA (tests/cpp)."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
def test_core_headers_on_host(tmp_path):
    exe = tmp_path / "test_core"
    subprocess.run(["c++", "-std=c++20", "-O2", "-Wall", "-Werror", f"-I{ROOT / 'csrc'}",
                    str(ROOT / "tests" / "cpp" / "test_core.cpp"), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout
