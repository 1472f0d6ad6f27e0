#!/usr/bin/env bash
# One command: set up (including the browser-test tools), then run the whole test suite offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# Two workers, one thread each (tests/conftest.py): the suite is many small CPU-bound tests.
exec "${SAEBENCH_VENV:-.venv}/bin/python" -m pytest -q -n 2 --dist loadfile "$@"
