#!/usr/bin/env bash
# The test suite under different CPU kernels and thread counts: results must not depend on them.
# torch picks its kernels by CPU (AVX2, AVX-512, AMX ...); ATEN_CPU_CAPABILITY forces a level, so
# one machine can check what another would compute. Runs `bash scripts/test.sh` once per setting:
#   bash scripts/test_kernels.sh                      # default, avx2 and the machine's own, at 1 and 2 threads
#   bash scripts/test_kernels.sh tests/test_eval_core.py   # extra arguments go to pytest
set -uo pipefail
cd "$(dirname "$0")/.."
FAILED=()
for cap in default avx2 native; do
  for threads in 1 2; do
    echo "=== ATEN_CPU_CAPABILITY=$cap OMP_NUM_THREADS=$threads"
    if [[ $cap == native ]]; then
      env -u ATEN_CPU_CAPABILITY OMP_NUM_THREADS=$threads bash scripts/test.sh "$@" || FAILED+=("$cap/$threads")
    else
      ATEN_CPU_CAPABILITY=$cap OMP_NUM_THREADS=$threads bash scripts/test.sh "$@" || FAILED+=("$cap/$threads")
    fi
  done
done
if (( ${#FAILED[@]} )); then echo "test_kernels: FAILED under ${FAILED[*]}"; exit 1; fi
echo "test_kernels: green under every setting"
