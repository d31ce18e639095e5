#!/usr/bin/env bash
# Toolchain probe for the device machine: the first GPU run (torch 2.11,
# CXX=/opt/gcc/bin/g++) segfaulted whenever an op raised an error whose
# message formats a number. Logs the toolchain, builds, and tries fixes in
# turn; prints the environment that works as the last line ("PROBE_ENV=...").
# Usage: source-free; `bash tools/gpu_abi_probe.sh >> $OUT/test.log`.
set -u
cxx="${CXX:-c++}"
echo "== toolchain: CXX=${CXX:-} CC=${CC:-} LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
which -a g++ gcc c++ 2>&1 | tr '\n' ' '; echo
"$cxx" --version | head -1; /usr/bin/g++ --version 2>&1 | head -1
echo "compiler libstdc++: $("$cxx" -print-file-name=libstdc++.so.6)"
python3 - <<'PY'
import os, torch
print("torch cxx11 abi", torch._C._GLIBCXX_USE_CXX11_ABI)
print("loaded:", sorted({l.split()[-1] for l in open("/proc/self/maps") if "libstdc++" in l or "libgcc_s" in l}))
PY
probe() {  # rc of the error-message tests (0: exceptions with numbers work)
  env "$@" timeout 60 python3 -m pytest -q -x -p no:cacheprovider tests/test_errors.py >/tmp/probe.log 2>&1
  local rc=$?; echo "probe [$*]: rc=$rc $(tail -n 1 /tmp/probe.log)"; return $rc
}
start=$(date +%s)
python3 setup.py build_ext --inplace > /tmp/build_a.log 2>&1 || { tail -n 30 /tmp/build_a.log; }
echo "build (default toolchain) in $(( $(date +%s) - start )) s"
if probe X=1; then echo "PROBE_ENV="; exit 0; fi
pre="$("$cxx" -print-file-name=libstdc++.so.6)"
if [ -f "$pre" ] && probe LD_PRELOAD="$pre"; then echo "PROBE_ENV=LD_PRELOAD=$pre"; exit 0; fi
if [ -x /usr/bin/g++ ] && [ "$(readlink -f /usr/bin/g++)" != "$(readlink -f "$(command -v "$cxx")")" ]; then
  rm -rf build dspark_ops/_C*.so; start=$(date +%s)
  CXX=/usr/bin/g++ CC=/usr/bin/gcc python3 setup.py build_ext --inplace > /tmp/build_b.log 2>&1 || tail -n 30 /tmp/build_b.log
  echo "build (/usr/bin/g++) in $(( $(date +%s) - start )) s"
  if probe X=1; then echo "PROBE_ENV=CXX=/usr/bin/g++ CC=/usr/bin/gcc"; exit 0; fi
fi
echo "PROBE_ENV=none"
exit 1
