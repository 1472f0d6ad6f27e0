"""Atomic, checksummed file writes: a crash or a full disk never leaves a half-written artifact.

Every write goes to a temporary name in the same folder, is fsynced, then renamed over the target,
so a reader sees either the old file or the new one. ``manifest.json`` records a sha256 per file so
``verify_folder`` can say exactly what is wrong with a folder.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

from saebench.layout import MANIFEST_FILE as MANIFEST

VERIFY_MODES = ("sha256", "size", "none")


class ArtifactError(ValueError):
    """An artifact folder is missing, incomplete, corrupted or of a foreign format."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; artifacts are meant to be shared, so use the usual umask-based mode.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(
            e.errno,
            f"writing {path} failed ({e.strerror or e}); nothing was replaced, the previous version of the file is intact. "
            f"{write_error_advice(e.errno, path.parent)}; a training run resumes from its last checkpoint",
        ) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_error_advice(err: int | None, folder: Path) -> str:
    """What to do about a failed write, by its errno (a vanished folder is not a full disk)."""
    if err in (errno.ENOSPC, errno.EDQUOT):
        return f"The disk (or your quota) is full: free space on the filesystem of {folder} and retry"
    if err == errno.EFBIG:
        return "The file exceeds the file-size limit: raise it (ulimit -f) or free disk space, and retry"
    if err == errno.ENOENT:
        return (f"The folder {folder} disappeared while the file was written: another process deleted it (two runs writing "
                "into the same folder?); make sure only one process writes there and retry")
    if err in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"No permission to write in {folder} (or the filesystem is read-only): fix its permissions or write elsewhere"
    return "Check the disk and the folder, then retry"


def check_free_space(folder: str | Path, nbytes: int, what: str) -> None:
    """Raise ``OSError(ENOSPC)`` before writing when ``folder``'s filesystem has fewer than ``nbytes`` free.

    A cheap lower bound: the write would certainly fail half way, so nothing is started. Quotas and
    file-size limits are still caught by the write itself (``atomic_write_bytes``).
    """
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < nbytes:
        raise OSError(errno.ENOSPC, f"not enough disk space for {what} in {folder}: it needs {nbytes / 2**20:,.1f} MiB and "
                                    f"{free / 2**20:,.1f} MiB are free; nothing was written, the folder is as it was. Free disk space "
                                    "or write elsewhere, and retry; a training run resumes from its last checkpoint")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def read_json(path: str | Path, what: str = "file") -> Any:
    """Read JSON, turning a missing or malformed file into a clear ``ArtifactError``."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{what} {path} is not valid JSON ({e}); the file is corrupted") from None
    except RecursionError:
        # json.loads recurses once per nesting level: a hostile file nested ~1,000+ deep exhausts the stack.
        raise ArtifactError(f"{what} {path} is nested too deeply to be a config (hostile or corrupted file); replace it") from None


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomically write a safetensors file (tensors made contiguous and moved to CPU)."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, st_save(flat, metadata=metadata))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: str | Path, files: list[str]) -> None:
    """Record the size and sha256 of ``files`` (relative to ``folder``) in ``manifest.json``."""
    folder = Path(folder)
    entries = {name: {"bytes": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)} for name in files}
    write_json(folder / MANIFEST, {"files": entries})


def verify_mode(verify: bool | str | None) -> str:
    """Normalise a ``verify`` argument: True/"sha256" (default), "size", False/"none".

    None means the default: ``$SAEBENCH_VERIFY`` if set (for command-line runs on huge files), else "sha256".
    """
    if verify is None:
        verify = os.environ.get("SAEBENCH_VERIFY", "sha256").strip().lower() or "sha256"
        if verify in ("0", "false", "no", "off"):
            verify = "none"
    if verify is True:
        return "sha256"
    if verify is False:
        return "none"
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be True, False or one of {VERIFY_MODES}, got {verify!r} (from the argument or $SAEBENCH_VERIFY)")
    return verify


def check_against_manifest(folder: str | Path, names: list[str], verify: bool | str | None = None) -> bool:
    """Check ``names`` (files of ``folder``) against its ``manifest.json`` before they are read.

    Sizes are always compared; sha256 hashes too when ``verify`` is "sha256" (the default). A folder
    with no manifest (a SAELens folder) passes unchecked and the function returns False; True when
    the files were checked. Raises ``ArtifactError`` naming the file, what is wrong and what to do.
    """
    mode = verify_mode(verify)
    folder = Path(folder)
    if mode == "none" or not (folder / MANIFEST).is_file():
        return False
    advice = (f"run `saebench verify {folder}` for the full report; restore the folder from a copy or retrain it "
              "(a run with its checkpoints resumes); to load it anyway pass verify=False (SAEBENCH_VERIFY=none)")
    manifest = read_json(folder / MANIFEST, "manifest")
    entries = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
        raise ArtifactError(f"{folder / MANIFEST} is corrupted (no 'files' table of sizes and hashes); {advice}")
    for name in names:
        path = folder / name
        meta = entries.get(name)
        if meta is None:
            raise ArtifactError(f"{path} is not listed in {folder / MANIFEST}: the folder was changed after saebench wrote it; {advice}")
        size = path.stat().st_size
        if size != meta.get("bytes"):
            raise ArtifactError(f"{path} is {size:,} bytes but {MANIFEST} says {meta.get('bytes')}: the file is truncated or corrupted; {advice}")
        if mode == "sha256" and sha256_file(path) != meta.get("sha256"):
            raise ArtifactError(f"{path} does not match its sha256 in {MANIFEST} (the file is corrupted or was edited after saving); {advice}")
    return True


def verify_folder(folder: str | Path) -> list[str]:
    """Check every file listed in the folder's manifest; return a list of problems (empty = OK)."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        return [f"{folder} has no {MANIFEST}: it was not written by saebench, or its write never finished"]
    try:
        manifest = read_json(folder / MANIFEST, "manifest")
        entries = manifest["files"]
        assert isinstance(entries, dict)
    except (ArtifactError, KeyError, TypeError, AssertionError):
        return [f"{folder / MANIFEST} is corrupted"]
    problems = []
    for name, meta in entries.items():
        p = folder / name
        if not isinstance(meta, dict):
            problems.append(f"{name}: its {MANIFEST} entry is corrupted")
        elif not p.is_file():
            problems.append(f"{name}: missing")
        elif p.stat().st_size != meta.get("bytes"):
            problems.append(f"{name}: size {p.stat().st_size} bytes, manifest says {meta.get('bytes')} (truncated?)")
        elif sha256_file(p) != meta.get("sha256"):
            problems.append(f"{name}: checksum mismatch (file corrupted or edited after saving)")
    return problems
