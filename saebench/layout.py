"""The file names of an SAE folder: the one place that knows them.

saebench writes SAELens' layout, so ``sae_lens.SAE.load_from_disk`` loads a saebench folder as it is:

- ``sae_weights.safetensors``: the tensors (``W_enc``, ``W_dec``, ``b_enc``, ``b_dec``, ``threshold``);
- ``cfg.json``: the config, with SAELens field names;
- ``manifest.json`` (saebench only): size and sha256 of every file, checked on load.

Folders written before 2026-11-25 hold ``sae.safetensors`` instead of ``sae_weights.safetensors``;
they are still read (never rewritten in place).
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS_FILE = "sae_weights.safetensors"  # SAELens' name; what saebench writes
LEGACY_WEIGHTS_FILE = "sae.safetensors"  # saebench's name until 2026-11-25; still read
WEIGHTS_FILES = (WEIGHTS_FILE, LEGACY_WEIGHTS_FILE)  # in order of preference
CFG_FILE = "cfg.json"
MANIFEST_FILE = "manifest.json"


def weights_file(folder: str | Path, listed: "list[str] | set[str] | None" = None) -> Path | None:
    """The weights file of an SAE folder, or None when it has none.

    ``listed``: the names a manifest records; a file it names wins (an old folder that also got a
    ``sae_weights.safetensors`` alias, or a new one whose legacy file a crash left behind, is read
    from the file its manifest vouches for).
    """
    folder = Path(folder)
    if listed is not None:
        for name in WEIGHTS_FILES:
            if name in listed and (folder / name).is_file():
                return folder / name
    for name in WEIGHTS_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def is_sae_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds an SAE: ``cfg.json`` plus a weights file (either name)."""
    folder = Path(folder)
    return (folder / CFG_FILE).is_file() and weights_file(folder) is not None


def describe() -> str:
    """The expected files, for error messages."""
    return f"{CFG_FILE} + {WEIGHTS_FILE} (or {LEGACY_WEIGHTS_FILE}, saebench before 2026-11-25)"


# ---- what saebench derives into an SAE folder ----
DASHBOARD_DIR = "dashboards"  # SAE_DIR/dashboards/: the feature dashboards (saebench.dashboards)
DASHBOARD_DB_FILE = "features.sqlite"  # the dashboards' database, inside DASHBOARD_DIR
EVAL_CORE_FILE = "eval_core.json"  # what ``saebench eval`` writes into the SAE folder
TRAINING_LOG_FILE = "training_log.json"  # the training history the loop writes next to the SAE
