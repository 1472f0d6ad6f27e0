#!/usr/bin/env bash
# Early warning for new releases: build a venv WITHOUT requirements/lock.txt (the newest transformers,
# transformer-lens, streamlit, ... that pyproject.toml allows; torch stays the CPU build 2.13.0 on
# machines without a GPU), then run the whole test suite in it.
#   bash scripts/latest_deps.sh                 # report only
#   bash scripts/latest_deps.sh --update-lock   # and, if the suite is green, rewrite requirements/lock.txt
# The venv is .venv-latest (SAEBENCH_LATEST_VENV). Commit the new lock together with the README's
# "Locked versions" line. Not part of .ci/run: a new release should not turn CI red on its own.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SAEBENCH_LATEST_VENV:-.venv-latest}"
UPDATE=0
[[ "${1:-}" == "--update-lock" ]] && UPDATE=1
rm -rf "$VENV"
SAEBENCH_VENV="$VENV" SAEBENCH_UNLOCKED=1 bash scripts/setup.sh --test
"$VENV/bin/python" -m pip install -q --upgrade --upgrade-strategy only-if-needed transformers transformer-lens
echo "latest_deps: testing with $("$VENV/bin/python" -c 'from saebench.compat import library_versions; print(library_versions())')"
"$VENV/bin/python" -m pip freeze | grep -v -E "^#|^-e|saebench" > "$VENV/freeze.txt"
diff <(grep -v '^#' requirements/lock.txt) "$VENV/freeze.txt" | grep '^[<>]' || echo "latest_deps: same versions as the lock"
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$VENV/bin/python" -m pytest -q -n 2 --dist loadfile
if [[ $UPDATE == 1 ]]; then
  { sed -n '1,3p' requirements/lock.txt; sed -e 's/^torch==\([0-9.]*\)+cpu/torch==\1/' "$VENV/freeze.txt" | sort -f; } > requirements/lock.txt.new
  mv requirements/lock.txt.new requirements/lock.txt
  echo "latest_deps: suite green; requirements/lock.txt rewritten. Update the README's locked versions and commit both."
fi
