#!/usr/bin/env bash
# Create the side-by-side benchmark environments under benchmarks/envs/ (gitignored):
#   benchmarks/envs/saelens   - sae-lens 6.x (needs transformer-lens<4, so it cannot share saebench's venv)
#   benchmarks/envs/sparsify  - eai-sparsify (EleutherAI sparsify)
#   benchmarks/envs/saebench  - sae-bench (SAEBench; brings sae-lens 6.x and transformer-lens<4), for bench_vs_saebench.py
# torch is installed first from the local CPU wheel (`pip install torch==2.13.0`), so that the packages'
# own `torch` requirement is already satisfied and pip does not pull a multi-GB CUDA build; every later
# install runs under a constraint file pinning that torch, so no dependency (e.g. sae-bench's torchvision)
# can upgrade it.
# Usage: bash benchmarks/make_anchor_envs.sh [saelens|sparsify|saebench ...]   (default: all three)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
envs="$here/envs"
mkdir -p "$envs"
PY="${PYTHON:-python3.11}"
TORCH="${TORCH_SPEC:-torch==2.13.0}"
declare -A PKGS=(
  [saelens]="sae-lens>=6,<7"
  [sparsify]="eai-sparsify"
  [saebench]="sae-bench>=0.6,<0.7"
)
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(saelens sparsify saebench)
for name in "${targets[@]}"; do
  dir="$envs/$name"
  log="$envs/$name.install.log"
  echo "== $name -> $dir (log: $log)"
  [ -x "$dir/bin/python" ] || "$PY" -m venv "$dir"
  pin="$envs/$name.constraints.txt"
  echo "$TORCH" >"$pin"
  {
    "$dir/bin/pip" install --disable-pip-version-check -q "$TORCH"
    "$dir/bin/pip" install --disable-pip-version-check -q -c "$pin" "${PKGS[$name]}"
    if [ "$name" = saebench ]; then
      # sae-bench requires torchvision, and PyPI's torchvision 0.28.0 is built for the CUDA torch: next to the
      # CPU torch its operators fail to register ("RuntimeError: operator torchvision::nms does not exist"),
      # which breaks `import transformers.models.llama`. SAEBench's core eval never uses it: remove it.
      "$dir/bin/pip" uninstall --disable-pip-version-check -y -q torchvision
    fi
    "$dir/bin/pip" freeze
  } >"$log" 2>&1 && echo "   ok" || { echo "   FAILED (see $log)"; tail -5 "$log"; }
done
