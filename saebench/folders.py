"""SAE folders on disk: finding them under a root (the browser's list), resolving a user's path safely,
and fingerprinting an SAE's weights. With :mod:`saebench.layout` (the file names) this is the one place
that knows what an SAE folder holds."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saebench.io import ArtifactError, read_json, sha256_file
from saebench.layout import CFG_FILE, DASHBOARD_DB_FILE, DASHBOARD_DIR, MANIFEST_FILE, TRAINING_LOG_FILE, WEIGHTS_FILES, is_sae_folder

SKIP_DIRS = {DASHBOARD_DIR, ".git", ".venv", "node_modules", "__pycache__", "checkpoints", "wandb"}


@dataclass
class SaeEntry:
    rel: str  # path relative to the root, '/'-separated ('.' for the root itself)
    path: Path
    cfg: dict[str, Any]

    @property
    def has_dashboard(self) -> bool:
        return (self.path / DASHBOARD_DIR / DASHBOARD_DB_FILE).is_file()


def _is_sae_dir(p: Path) -> bool:
    return is_sae_folder(p)


MAX_CFG_BYTES = 1_000_000


def _read_sae_cfg(d: Path) -> dict[str, Any]:
    """The folder's cfg.json, checked enough for the browser to list it; raises ValueError with a one-line reason."""
    f = d / CFG_FILE
    size = f.stat().st_size
    if size > MAX_CFG_BYTES:
        raise ValueError(f"cfg.json is {size:,} bytes (more than {MAX_CFG_BYTES:,})")
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except RecursionError:
        raise ValueError("cfg.json is nested too deeply to read") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"cfg.json is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"cfg.json holds a {type(cfg).__name__}, not an object")  # noqa: TRY004 - one error type for "unreadable"
    for key in ("d_in", "d_sae"):
        v = cfg.get(key)
        if v is None and key == "d_in":
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{key} is {_short(v)}, not a positive integer")
    return cfg


def _short(v: Any, n: int = 40) -> str:
    try:
        r = repr(v)
    except RecursionError:
        r = f"<deeply nested {type(v).__name__}>"
    return r if len(r) <= n else r[: n - 1] + "…"


@dataclass
class SkippedSae:
    rel: str
    reason: str  # one line, no paths outside the root


def scan_saes(root: str | Path, max_depth: int = 6) -> tuple[list[SaeEntry], list[SkippedSae]]:
    """Every SAE folder under ``root``, and the SAE-looking folders skipped because they cannot be read.

    Any error reading one folder (a cfg.json nested 200,000 levels deep, ``"d_sae": "abc"``, an
    unreadable file) skips that folder with a one-line reason; it never stops the scan. Symlinks
    leading outside the root are not followed.
    """
    root = Path(root).resolve()
    out: list[SaeEntry] = []
    skipped: list[SkippedSae] = []
    if not root.is_dir():
        return out, skipped

    def walk(d: Path, depth: int) -> None:
        try:
            is_sae = _is_sae_dir(d)
        except OSError:
            is_sae = False
        if is_sae:
            rel = d.relative_to(root).as_posix() or "."
            try:
                out.append(SaeEntry(rel, d, _read_sae_cfg(d)))
            except Exception as e:  # noqa: BLE001 - any failure skips this folder only
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                skipped.append(SkippedSae(rel, reason.replace(str(root), "<root>")[:200]))
        if depth >= max_depth:
            return
        try:
            children = sorted(p for p in d.iterdir() if p.is_dir() and p.name not in SKIP_DIRS and not p.name.startswith("."))
        except OSError:
            return
        for c in children:
            real = c.resolve()
            if real == root or root in real.parents:
                walk(c, depth + 1)

    walk(root, 0)
    return out, skipped


def find_saes(root: str | Path, max_depth: int = 6) -> list[SaeEntry]:
    """Every readable SAE folder under ``root`` (see :func:`scan_saes`, which also says what was skipped)."""
    return scan_saes(root, max_depth)[0]


def resolve_sae(root: str | Path, rel: str | None) -> SaeEntry | None:
    """The SAE at ``rel`` under ``root`` if ``rel`` names one exactly; never a path outside the root."""
    if not rel:
        return None
    for e in find_saes(root):
        if e.rel == rel:
            return e
    return None


def weights_sha256(sae_dir: str | Path) -> str:
    """sha256 of the SAE weights (from its manifest when present: hashing is then free)."""
    sae_dir = Path(sae_dir)
    for weights in WEIGHTS_FILES:
        path = sae_dir / weights
        if not path.exists():
            continue
        manifest = sae_dir / MANIFEST_FILE
        if manifest.exists():
            try:
                entry = read_json(manifest, "manifest")["files"][weights]
                if entry.get("bytes") == path.stat().st_size:
                    return entry["sha256"]
            except (ArtifactError, KeyError, TypeError):
                pass
        return sha256_file(path)
    raise ArtifactError(f"{sae_dir} holds no SAE weights")


def read_training_log(sae_dir: str | Path, missing_ok: bool = False) -> dict[str, Any]:
    """The training log (``training_log.json``) of an SAE folder; ``missing_ok``: {} when it is absent or unreadable."""
    try:
        return json.loads((Path(sae_dir) / TRAINING_LOG_FILE).read_text())
    except (OSError, ValueError):
        if missing_ok:
            return {}
        raise
