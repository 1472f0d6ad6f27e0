#!/usr/bin/env bash
# Create the side-by-side benchmark environments under benchmarks/envs/ (gitignored):
#   benchmarks/envs/saelens   - sae-lens 6.x (needs transformer-lens<4, so it cannot share saebench's venv)
#   benchmarks/envs/sparsify  - eai-sparsify (EleutherAI sparsify)
# torch is installed first from the local CPU wheel (`pip install torch==2.13.0`), so that the packages'
# own `torch` requirement is already satisfied and pip does not pull a multi-GB CUDA build.
# Usage: bash benchmarks/make_anchor_envs.sh [saelens|sparsify ...]   (default: both)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
envs="$here/envs"
mkdir -p "$envs"
PY="${PYTHON:-python3.11}"
TORCH="${TORCH_SPEC:-torch==2.13.0}"
declare -A PKGS=(
  [saelens]="sae-lens>=6,<7"
  [sparsify]="eai-sparsify"
)
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(saelens sparsify)
for name in "${targets[@]}"; do
  dir="$envs/$name"
  log="$envs/$name.install.log"
  echo "== $name -> $dir (log: $log)"
  [ -x "$dir/bin/python" ] || "$PY" -m venv "$dir"
  {
    "$dir/bin/pip" install --disable-pip-version-check -q "$TORCH"
    "$dir/bin/pip" install --disable-pip-version-check -q "${PKGS[$name]}"
    "$dir/bin/pip" freeze
  } >"$log" 2>&1 && echo "   ok" || { echo "   FAILED (see $log)"; tail -5 "$log"; }
done
