"""The build: a silently CPU-only build cannot pass when nvcc was there."""
import os

import torch

import dspark_ops
from tools_path import find_cuda_home



# Ops with a CPU kernel by design only: packed_linear is the built-in model's CPU GEMM (on a GPU it uses cuBLAS).
CPU_ONLY = {"dspark_ops::packed_linear"}


def registered_ops():
    """Every dspark_ops op with a backend kernel (not the host-only helpers)."""
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("dspark_ops::"))
    return [n for n in names if torch._C._dispatch_has_kernel_for_dispatch_key(n, "CPU")]


def test_version():
    assert dspark_ops.__version__.count(".") == 2


def test_ops_are_registered():
    assert {"dspark_ops::sample", "dspark_ops::sample.out"} <= set(registered_ops())


def test_every_op_has_cuda_kernel_when_nvcc_was_there():
    cuda_build_possible = torch.version.cuda is not None and find_cuda_home() is not None
    if os.environ.get("DSPARK_FORCE_CUDA") == "0" or not cuda_build_possible:
        assert os.environ.get("DSPARK_FORCE_CUDA") != "1", "DSPARK_FORCE_CUDA=1 but no CUDA build possible"
        return
    assert dspark_ops.cuda_kernels_available()
    missing = [op for op in registered_ops()
               if op not in CPU_ONLY and not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")]
    assert not missing, f"ops without a CUDA kernel: {missing}"


def test_gpu_kernel_times_script_runs_at_small_sizes():
    """tools/gpu_kernel_times.py runs in a GPU session with no second try:
    its --small mode (CPU, tiny shapes) exercises every call it makes."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, str(root / "tools" / "gpu_kernel_times.py"), "--small"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("== ") == 7


def test_gpu_session_scripts_parse():
    """tools/gpu_check.sh (and its embedded Python) and tools/gpu_abi_probe.sh
    run once per GPU session, with no second try: they must at least parse."""
    import ast
    import re
    import subprocess
    from pathlib import Path

    tools = Path(__file__).resolve().parent.parent / "tools"
    for script in ("gpu_check.sh", "gpu_abi_probe.sh"):
        proc = subprocess.run(["bash", "-n", str(tools / script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"
    heredocs = re.findall(r"<<'PY'[^\n]*\n(.*?)\nPY\n", (tools / "gpu_check.sh").read_text(), re.S)
    assert heredocs, "gpu_check.sh: the FlashInfer JIT step's Python was not found"
    for body in heredocs:
        ast.parse(body)


def test_a_source_tree_without_the_extension_says_so(tmp_path):
    """Importing a checkout's dspark_ops/ with no _C built names the cause
    (Python's own message blames a circular import). Run without site's .pth
    files, so an editable install's finder cannot supply the extension."""
    import shutil
    import site
    import subprocess
    import sys
    from pathlib import Path
    pkg = Path(dspark_ops.__file__).parent
    shutil.copytree(pkg, tmp_path / "dspark_ops", ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(site.getsitepackages())}
    run = subprocess.run([sys.executable, "-S", "-c", "import dspark_ops"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "the compiled extension dspark_ops/_C is not built" in run.stderr, run.stderr[-2000:]
