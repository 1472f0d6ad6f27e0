#!/usr/bin/env bash
# One command: set up, then train a TopK SAE on SmolLM2-135M's middle layer over the offline
# corpus, evaluate it on held-out text, and print where the artifact and metrics are.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export WANDB_MODE="${WANDB_MODE:-disabled}"
exec .venv/bin/saebench train --config configs/demo.toml "$@"
