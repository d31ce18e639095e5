#!/usr/bin/env bash
# Every check a GPU session owes, in one call on the device machine (torch
# 2.11+cu130, Python 3.12, no registry), writing logs and JSON under $OUT
# (8 files at most come back: test.log, with the bench output appended,
# sanitizer.log and one bench_<op>.json per op -- six ops by default):
#   1. build for sm_90 only and run the whole suite with DSPARK_REQUIRE_CUDA=1
#      (make test NO_VENV=1: cuda-check, CPU and GPU tests; no GPU test may skip)
#   2. the benchmarks of every op, side by side with PyTorch (and FlashInfer
#      when .peer/ holds tools/pack_flashinfer.py's pack -- carry ".peer" --
#      or its wheel is carried in .whl/; and SGLang's tree kernels when .peer/
#      also holds tools/pack_sglang.py's), then the decoding demo on the GPU
#   3. compute-sanitizer memcheck over the GPU tests at small shapes, racecheck
#      and synccheck over the kernels that use shared memory (seen working on
#      the H100 kind; refused on the H200 kind, "Device not supported": then
#      sanitizer.log says so)
# Each phase runs under `timeout`, inside GPU_CHECK_BUDGET seconds in all
# (default 540), so a hang or a slow phase costs that phase, not the call.
# Usage (device tool):  bash tools/gpu_check.sh   [GPU_CHECK_OPS="sample verify_chunk verify_tree"]
#   GPU_CHECK_PYTEST (extra pytest args, e.g. "-m cuda"), GPU_CHECK_PROFILE=0 (no per-kernel tables,
#   tools/gpu_kernel_times.py), GPU_SAN_TESTS / GPU_RACE_TESTS (memcheck / racecheck+synccheck test
#   files), GPU_SAN_K (a -k filter), GPU_CHECK_PROBE=0 with LD_PRELOAD set (skip the toolchain probe
#   when its answer is known).
# Then commit $OUT/bench_*.json under bench/results/ with the device and date.
set -uo pipefail
OUT="${OUT:-/tmp/dspark_gpu_out}"
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST="9.0" DSPARK_CHECK_ARCHS="90" DSPARK_FORCE_CUDA=1 DSPARK_REQUIRE_CUDA=1
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}"
deadline=$(( $(date +%s) + ${GPU_CHECK_BUDGET:-540} ))
# seconds a phase may take: its cap, or what is left of the budget
allow() { local left=$(( deadline - $(date +%s) - 5 )); (( left < $1 )) && echo $(( left > 1 ? left : 1 )) || echo "$1"; }
if ls .whl/*.whl >/dev/null 2>&1; then  # optional peers (flashinfer-python), see README
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
peer_jit=0
if ls .peer/flashinfer-*-sampling.tar.xz >/dev/null 2>&1; then  # FlashInfer's sampling kernels (tools/pack_flashinfer.py)
  mkdir -p /tmp/peer/site && tar -xJf .peer/flashinfer-*-sampling.tar.xz -C /tmp/peer/site \
    && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/peer/site \
      .peer/apache_tvm_ffi-*.whl \
    && export PYTHONPATH="/tmp/peer/site:${PYTHONPATH:-}" FLASHINFER_WORKSPACE_BASE=/tmp/peer/ws \
      FLASHINFER_CUDA_ARCH_LIST="9.0" CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" && peer_jit=1
fi
peer_sgl=0
sgl_note=""
if ls .peer/sglang-*-speculative.tar.xz >/dev/null 2>&1; then  # SGLang's tree kernels (tools/pack_sglang.py)
  if [ "$peer_jit" = 1 ]; then  # built on the FlashInfer pack's headers and tvm-ffi
    mkdir -p /tmp/peer/sglang && tar -xJf .peer/sglang-*-speculative.tar.xz -C /tmp/peer/sglang && peer_sgl=1
  else
    sgl_note="gpu_check: SGLang pack present but FlashInfer's pack absent: the SGLang peer is skipped"
  fi
fi
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv > "$OUT/test.log" 2>&1
[ -n "$sgl_note" ] && echo "$sgl_note" | tee -a "$OUT/test.log"
python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__)" >> "$OUT/test.log" 2>&1

if [ "$peer_jit" = 1 ]; then  # JIT-build FlashInfer's sampling module (~1 min) beside the tests, before any timing
  ( timeout 300 python3 - <<'PY' > /tmp/peer/jit.log 2>&1; echo "gpu_check: FlashInfer JIT rc=$?" >> /tmp/peer/jit.log ) &
import os, pathlib
try:  # curand.h and friends from the nvidia-* wheels when the toolkit lacks them
    import nvidia
    inc = [str(p) for p in pathlib.Path(nvidia.__path__[0]).glob("*/include") if (p / "curand.h").exists()]
    os.environ["CPATH"] = os.pathsep.join(inc + [os.environ.get("CPATH", "")])
except ImportError:
    pass
import flashinfer, flashinfer.sampling as fs
fs.get_sampling_module()
print("gpu_check: FlashInfer", flashinfer.__version__, "sampling module built")
PY
  peer_pid=$!
fi
if [ "$peer_sgl" = 1 ]; then  # build SGLang's peer module (tools/pack_sglang.py, bench/sglang_peer.py; ~20 s)
  ( timeout 300 python3 -c "import pathlib, sys; sys.path.insert(0, '.'); from bench.sglang_peer import build
build(pathlib.Path('/tmp/peer/sglang'), pathlib.Path('/tmp/peer/sglang_speculative.so')); print('SGLang peer built')" \
      > /tmp/peer/sgl.log 2>&1; echo "gpu_check: SGLang peer build rc=$?" >> /tmp/peer/sgl.log ) &
  sgl_pid=$!
  export DSPARK_SGLANG_PEER=/tmp/peer/sglang_speculative.so
fi

if [ "${GPU_CHECK_PROBE:-1}" = 1 ]; then  # the toolchain, and a fix if raising errors crashes
  timeout "$(allow 200)" bash tools/gpu_abi_probe.sh 2>&1 | tee /tmp/probe.out >> "$OUT/test.log"
  probe_env=$(sed -n 's/^PROBE_ENV=//p' /tmp/probe.out | tail -n 1)
  [ -n "$probe_env" ] && [ "$probe_env" != none ] && export $probe_env && echo "gpu_check: using $probe_env" | tee -a "$OUT/test.log"
fi
start=$(date +%s)
timeout "$(allow 330)" make test NO_VENV=1 PYTHON=python3 EMULATOR=0 \
  PYTEST_ARGS="${GPU_CHECK_XDIST:--n 8} -rs -p no:cacheprovider --tb=short --durations=15 ${GPU_CHECK_PYTEST:-}" 2>&1 | tee -a "$OUT/test.log"
test_rc=${PIPESTATUS[0]}
echo "gpu_check: make test rc=$test_rc in $(( $(date +%s) - start )) s" | tee -a "$OUT/test.log"

if [ "$peer_jit" = 1 ]; then
  wait "$peer_pid"
  tail -n 20 /tmp/peer/jit.log | tee -a "$OUT/test.log"
fi
if [ "$peer_sgl" = 1 ]; then
  wait "$sgl_pid"
  tail -n 20 /tmp/peer/sgl.log | tee -a "$OUT/test.log"
fi

bench_rc=0
for op in ${GPU_CHECK_OPS:-sample verify_chunk verify_tree kv_compact schedule_verify markov_draft}; do  # one JSON per op
  start=$(date +%s)
  quick="--quick"; [ "$op" = schedule_verify ] || [ "$op" = markov_draft ] && quick=""  # full grids: minutes
  PYTHONPATH="$PWD:${PYTHONPATH:-}" timeout "$(allow 90)" python3 -m bench --op "$op" $quick --out "$OUT/bench_$op.json" \
    2>&1 | tee -a "$OUT/test.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || bench_rc=$rc
  echo "gpu_check: bench $op rc=$rc in $(( $(date +%s) - start )) s" | tee -a "$OUT/test.log"
done

if [ "${GPU_CHECK_PROFILE:-1}" = 1 ]; then  # which kernel dominates each op's large case
  start=$(date +%s)
  timeout "$(allow 60)" python3 tools/gpu_kernel_times.py 2>&1 | tee -a "$OUT/test.log"
  echo "gpu_check: kernel times rc=${PIPESTATUS[0]} in $(( $(date +%s) - start )) s (not counted in the result)" \
    | tee -a "$OUT/test.log"
fi

# The decoding loop end to end on the GPU (the embedded default pair; greedy outputs must match plain decoding).
start=$(date +%s)
PYTHONPATH="$PWD:${PYTHONPATH:-}" timeout "$(allow 90)" python3 -m dspark_ops demo --device cuda --rounds 1 2>&1 | tee -a "$OUT/test.log"
demo_rc=${PIPESTATUS[0]}
[ "$demo_rc" = 0 ] || bench_rc=$demo_rc
echo "gpu_check: decoding demo rc=$demo_rc in $(( $(date +%s) - start )) s" | tee -a "$OUT/test.log"

san_rc=0
GPU_TESTS="${GPU_SAN_TESTS:-tests/test_sample_cuda.py tests/test_verify_chunk_cuda.py tests/test_verify_tree_cuda.py tests/test_kv_compact_cuda.py tests/test_schedule_verify.py tests/test_markov_draft.py}"
RACE_TESTS="${GPU_RACE_TESTS:-tests/test_sample_cuda.py tests/test_verify_chunk_cuda.py tests/test_verify_tree_cuda.py tests/test_markov_draft.py tests/test_schedule_verify.py}"
SMALL="(cuda) and not 151936 and not large_batch and not graph and not repeatedly and not 4096"
SMALL="$SMALL and not error"  # argument checks run on the host
SMALL="$SMALL and not kernel_names"  # torch.profiler (CUPTI) beside the sanitizer
[ -n "${GPU_SAN_K:-}" ] && SMALL="$SMALL and ($GPU_SAN_K)"  # e.g. "bfloat16 or never": fewer cases, faster
echo "gpu_check: sanitizer -k \"$SMALL\"; memcheck: $GPU_TESTS; racecheck, synccheck: $RACE_TESTS" >> "$OUT/sanitizer.log"
for tool in memcheck racecheck synccheck; do  # racecheck/synccheck: the shared-memory radix descent, staged moves
  start=$(date +%s)
  tests=$GPU_TESTS cap=110
  [ "$tool" = memcheck ] || { tests=$RACE_TESTS; cap=80; }
  if (( deadline - start < 30 )); then  # a run cut at once would read as a failure
    echo "gpu_check: compute-sanitizer $tool skipped (budget spent)" | tee -a "$OUT/sanitizer.log"
    san_rc=skipped
    continue
  fi
  PYTHONPATH="$PWD:${PYTHONPATH:-}" timeout "$(allow $cap)" compute-sanitizer --tool "$tool" --error-exitcode 99 \
    python3 -m pytest -q -p no:cacheprovider $tests -k "$SMALL" 2>&1 | tail -n 40 >> "$OUT/sanitizer.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || san_rc=$rc
  echo "gpu_check: compute-sanitizer $tool rc=$rc in $(( $(date +%s) - start )) s" | tee -a "$OUT/sanitizer.log"
done
echo "gpu_check: test=$test_rc sanitizer=$san_rc bench=$bench_rc"
[ "$test_rc" = 0 ] && [ "$san_rc" = 0 ] && [ "$bench_rc" = 0 ]
