"""Crash-safe training checkpoints: safetensors + JSON, never pickle.

Each checkpoint is a new folder ``checkpoints/step_XXXXXXXX`` written completely (files fsynced)
before ``checkpoints/latest.json`` is atomically pointed at it; older ones are then removed. A kill
at any moment leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from saebench.io import ArtifactError, check_free_space, read_json, save_tensors, write_json

LATEST = "latest.json"


def save_checkpoint(run_dir: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any], keep: int = 1) -> Path:
    ckpt_root = run_dir / "checkpoints"
    folder = ckpt_root / f"step_{step:08d}"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    check_free_space(ckpt_root, sum(t.numel() * t.element_size() for t in tensors.values()), f"the step-{step} checkpoint")
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    try:
        save_tensors(folder / "state.safetensors", tensors)
        write_json(folder / "state.json", meta | {"step": step})
        write_json(ckpt_root / LATEST, {"folder": folder.name, "step": step})
    except OSError:
        if _latest_folder(ckpt_root) != folder.name:  # the pointer still names the previous checkpoint: drop the partial one
            shutil.rmtree(folder, ignore_errors=True)
        raise
    old = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir() and p.name != folder.name)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return folder


def _latest_folder(ckpt_root: Path) -> str | None:
    try:
        return str(read_json(ckpt_root / LATEST, "checkpoint pointer").get("folder"))
    except (ArtifactError, AttributeError):
        return None


def load_checkpoint(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The latest checkpoint's (tensors, meta), or None if the run has none."""
    ckpt_root = run_dir / "checkpoints"
    if not (ckpt_root / LATEST).exists():
        return None
    latest = read_json(ckpt_root / LATEST, "checkpoint pointer")
    folder = ckpt_root / str(latest.get("folder", ""))
    try:
        tensors = load_file(str(folder / "state.safetensors"))
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"checkpoint {folder} cannot be read ({e}); delete {ckpt_root} to start over") from None
    return tensors, read_json(folder / "state.json", "checkpoint state")


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten an optimizer's state into named tensors + JSON-able param groups."""
    sd = opt.state_dict()
    tensors = {}
    for pid, state in sd["state"].items():
        for key, val in state.items():
            t = val if torch.is_tensor(val) else torch.tensor(val)
            tensors[f"opt.{pid}.{key}"] = t
    return tensors, {"param_groups": sd["param_groups"]}


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        if name.startswith("opt."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = t
    groups = meta["param_groups"]
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})
