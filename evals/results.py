"""Bench results on disk: the table ``evals/bench.py`` writes (``results.csv`` / ``.parquet`` / ``.json``)
and reading every result under a folder back (``eval_core.json`` of each SAE plus bench results files),
for the browser's evals page."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from saebench.folders import SKIP_DIRS, find_saes
from saebench.io import write_json
from saebench.layout import EVAL_CORE_FILE


def write_table(rows: list[dict[str, Any]], out_dir: str | Path) -> dict[str, Path]:
    """``results.csv``, ``results.parquet`` and ``results.json`` (one row per SAE, union of columns)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    full = [{c: r.get(c) for c in cols} for r in rows]
    paths = {"csv": out / "results.csv", "parquet": out / "results.parquet", "json": out / "results.json"}
    tmp = paths["csv"].with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(full)
    tmp.replace(paths["csv"])
    table = pa.Table.from_pylist([{c: _arrow_safe(v) for c, v in r.items()} for r in full])
    tmp = paths["parquet"].with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    tmp.replace(paths["parquet"])
    write_json(paths["json"], full)
    return paths


def _arrow_safe(v):
    return float(v) if isinstance(v, int) and not isinstance(v, bool) else v


def load_eval_results(root: str | Path) -> list[dict[str, Any]]:
    """Eval metrics of the SAEs under ``root``: each ``eval_core.json`` plus bench results files.

    Bench results (``evals/bench.py``) are read from ``*results*.json`` / ``*results*.csv`` files
    under the root (a JSON list of records, or an object with a ``results`` list; CSV with a
    header); of a ``results.json`` + ``results.csv`` pair only the JSON is read. Each record gets
    ``source`` (file, relative to the root) and ``eval`` (``core`` or ``bench``); SAE records get ``sae``
    (folder relative to the root), bench rows too when their ``sae_dir`` is an SAE under the root.
    Every source is kept: an SAE with both an eval_core.json and a bench row appears twice, each row
    saying where its numbers come from (its ``n_tokens`` and ``dead_window_tokens`` when recorded),
    never one silently replacing the other.
    """
    root_p = Path(root).resolve()
    saes = find_saes(root_p)
    by_path = {str(e.path.resolve()): e.rel for e in saes}
    bench: list[dict[str, Any]] = []
    for f in _bench_files(root_p):
        bench.extend(_read_bench_file(f, root_p))
    for r in bench:
        r.setdefault("eval", "bench")
        d = r.get("sae_dir")
        if isinstance(d, str) and d:
            try:
                p = (Path(d) if Path(d).is_absolute() else root_p / d).resolve()
            except (OSError, RuntimeError, ValueError):
                continue
            if str(p) in by_path:
                r["bench_sae"] = r.get("sae")
                r["sae"] = by_path[str(p)]
    records: list[dict[str, Any]] = []
    for e in saes:
        f = e.path / EVAL_CORE_FILE
        if not f.is_file():
            continue
        try:
            m = json.loads(f.read_text())
        except (OSError, ValueError, RecursionError):
            continue
        if isinstance(m, dict):
            rec = {"sae": e.rel, "source": f.relative_to(root_p).as_posix(), "eval": "core",
                   "method": e.cfg.get("method") or e.cfg.get("architecture", "")}
            rec |= {k: v for k, v in m.items() if isinstance(v, (int, float, str, bool)) or v is None}
            records.append(rec)
    return records + bench


def _bench_files(root: Path, max_depth: int = 4) -> list[Path]:
    out = []

    def walk(d: Path, depth: int) -> None:
        try:
            entries = sorted(d.iterdir())
        except OSError:
            return
        for p in entries:
            if p.name.startswith(".") or p.name in SKIP_DIRS:
                continue
            real = p.resolve()
            if not (real == root or root in real.parents):
                continue
            if p.is_file() and "results" in p.name and p.suffix in (".json", ".csv") and p.stat().st_size < 50_000_000:
                if p.suffix == ".csv" and p.with_suffix(".json").is_file():
                    continue  # the bench writes the same rows as .json and .csv
                out.append(p)
            elif p.is_dir() and depth < max_depth:
                walk(p, depth + 1)

    walk(root, 0)
    return out


def _read_bench_file(f: Path, root: Path) -> list[dict[str, Any]]:
    rel = f.relative_to(root).as_posix()
    try:
        if f.suffix == ".csv":
            with f.open(newline="") as fh:
                rows = [dict(r) for r in csv.DictReader(fh)]
            rows = [{k: _num(v) for k, v in r.items() if k} for r in rows]
        else:
            data = json.loads(f.read_text())
            rows = data.get("results") if isinstance(data, dict) else data
            if isinstance(data, dict) and rows is None and any(k in data for k in ("l0", "fvu")):
                rows = [data]
    except (OSError, ValueError, RecursionError):
        return []
    if not isinstance(rows, list):
        return []
    out = []
    for r in rows:
        if isinstance(r, dict) and any(k in r for k in ("l0", "fvu", "ce_loss_score")):
            out.append({k: v for k, v in r.items() if isinstance(v, (int, float, str, bool)) or v is None} | {"source": rel})
    return out


def _num(v: str) -> Any:
    try:
        return int(v)
    except (TypeError, ValueError):
        pass
    try:
        return float(v)
    except (TypeError, ValueError):
        return v
