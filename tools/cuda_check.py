"""make cuda-check: compile every csrc/kernels/*.cuh through a torch-free
translation unit for each architecture with `ptxas -v`, and fail on any
error, any warning, or a register spill in a kernel that is not on the
allow-list (tools/cuda_check_allow.txt: `<substring of the mangled name>
<reason>`).

Without nvcc this prints a loud SKIPPED and exits 0, unless
DSPARK_FORCE_CUDA=1 (CI sets it), when a missing nvcc is a failure.
"""
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from cuda_env import find_cuda_home  # noqa: E402

ARCHS = os.environ.get("DSPARK_CHECK_ARCHS", "80,90").split(",")
ALLOW_FILE = ROOT / "tools" / "cuda_check_allow.txt"


def load_allow_list():
    allow = {}
    if ALLOW_FILE.exists():
        for line in ALLOW_FILE.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                name, _, reason = line.partition(" ")
                if not reason.strip():
                    sys.exit(f"cuda-check: {ALLOW_FILE.name}: '{name}' needs a reason")
                allow[name] = reason.strip()
    return allow


def compile_header(nvcc, header, tmp):
    tu = Path(tmp) / f"{header.stem}_check.cu"
    tu.write_text(f'#define DSPARK_KERNEL_CHECK\n#include "{header}"\n')
    cmd = [nvcc, "-c", "-std=c++20", "-O3", "-Xptxas", "-v", "--expt-relaxed-constexpr",
           "-Werror", "all-warnings", "-Xcompiler", "-Wall", "-o", str(Path(tmp) / f"{header.stem}.o"), str(tu)]
    for arch in ARCHS:
        cmd += [f"-gencode=arch=compute_{arch},code=sm_{arch}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return header, proc


def parse_ptxas(text):
    """[(arch, function, registers, spill_stores, spill_loads)]"""
    rows, func, arch, spills = [], None, None, (0, 0)
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
        if m:
            func, arch = m.group(1), m.group(2)
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and func:
            spills = (int(m.group(1)), int(m.group(2)))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and func:
            rows.append((arch, func, int(m.group(1)), *spills))
            func, spills = None, (0, 0)
    return rows


def main():
    home = find_cuda_home()
    if home is None:
        msg = "cuda-check: nvcc not found -- SKIPPED: the CUDA kernels were NOT compile-checked"
        if os.environ.get("DSPARK_FORCE_CUDA") == "1":
            sys.exit(msg.replace("SKIPPED", "FAILED (DSPARK_FORCE_CUDA=1)"))
        print("!" * 78 + "\n" + msg + "\n" + "!" * 78)
        return
    nvcc = str(Path(home) / "bin" / "nvcc")
    headers = sorted((ROOT / "csrc" / "kernels").glob("*.cuh"))
    allow = load_allow_list()
    failed = False
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        for header, proc in pool.map(lambda h: compile_header(nvcc, h, tmp), headers):
            rel = header.relative_to(ROOT)
            warnings = [l for l in proc.stderr.splitlines() if "warning" in l.lower()]
            if proc.returncode != 0 or warnings:
                failed = True
                print(f"cuda-check: {rel}: FAILED\n{proc.stderr}")
                continue
            rows = parse_ptxas(proc.stderr)
            for arch, func, regs, st, ld in rows:
                spill = st or ld
                allowed = next((r for k, r in allow.items() if k in func), None)
                tag = "ok"
                if spill and not allowed:
                    tag, failed = "SPILL (not allowed)", True
                elif spill:
                    tag = f"spill allowed: {allowed}"
                print(f"cuda-check: {rel} {arch} {regs:3d} regs, spill {st}/{ld} B  {tag}  {func[:90]}")
            print(f"cuda-check: {rel}: compiled for sm_{', sm_'.join(ARCHS)} ({len(rows)} kernels)")
    if failed:
        sys.exit("cuda-check: FAILED")
    print(f"cuda-check: {len(headers)} headers OK")


if __name__ == "__main__":
    main()
