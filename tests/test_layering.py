"""The layering of the package, read from the source with ``ast`` (every import, function-local ones included).

The house reads top to bottom: entry points (``saebench/api.py``, ``cli.py``, ``notebook.py`` and the
package's lazy ``__init__``) -> ``trainers/`` / ``evals/`` / ``app/`` -> the core (everything else in
``saebench/``: models, text, activations, sparse, sae, io, dashboards, ...). No arrow runs back up:
the core never imports trainers, evals or app; trainers and evals never import each other or the app;
the app may read eval results (``evals/results.py``) but never imports the trainers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"core": ROOT / "saebench", "trainers": ROOT / "trainers", "evals": ROOT / "evals", "app": ROOT / "app"}
ENTRY_POINTS = {"saebench/api.py", "saebench/cli.py", "saebench/notebook.py", "saebench/__init__.py"}
# what each layer must not import
FORBIDDEN = {"core": {"trainers", "evals", "app"}, "trainers": {"evals", "app"}, "evals": {"trainers", "app"}, "app": {"trainers"}}


def imported_modules(path: Path) -> list[tuple[str, int]]:
    """Every module an import statement in ``path`` names (``from saebench import x`` gives ``saebench.x``)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"{path}:{node.lineno}: relative import; the package uses absolute imports")
            if node.module == "saebench":
                out += [(f"saebench.{a.name}", node.lineno) for a in node.names]
            else:
                out.append((node.module or "", node.lineno))
    return out


def layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "saebench":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in ("trainers", "evals", "app") else "core"


def sources() -> list[tuple[str, Path]]:
    out = []
    for name, folder in FOLDERS.items():
        for p in sorted(folder.rglob("*.py")):
            rel = p.relative_to(ROOT).as_posix()
            if rel not in ENTRY_POINTS:
                out.append((name, p))
    return out


def violations(files: list[tuple[str, Path]]) -> list[str]:
    bad = []
    for name, p in files:
        for module, line in imported_modules(p):
            if layer(module) in FORBIDDEN[name]:
                where = p.relative_to(ROOT) if p.is_relative_to(ROOT) else p
                bad.append(f"{where}:{line} ({name}) imports {module}")
    return bad


def test_every_layer_has_modules():
    files = sources()
    assert {n for n, _ in files} == set(FOLDERS)
    assert len([1 for n, _ in files if n == "core"]) > 15


def test_no_import_runs_back_up():
    assert violations(sources()) == []


def test_the_check_sees_function_local_and_from_package_imports(tmp_path):
    """The check itself: an upward import hidden in a function, or spelled ``from saebench import evals``, is caught."""
    hidden = tmp_path / "hidden.py"
    hidden.write_text("def f():\n    from saebench.trainers.loop import train\n    return train\n")
    spelled = tmp_path / "spelled.py"
    spelled.write_text("from saebench import app, models\n")
    fine = tmp_path / "fine.py"
    fine.write_text("import torch\nfrom saebench.sae import SAE\n")
    bad = violations([("core", hidden), ("core", spelled), ("core", fine), ("evals", spelled)])
    assert [b.split(" imports ")[1] for b in bad] == ["saebench.trainers.loop", "saebench.app", "saebench.app"]


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_entry_points_exist(entry):
    assert (ROOT / entry).is_file()
