"""The benchmark runner: any set of SAE folders × any set of evals, resumable, one table and figures.

``run_bench(sae_dirs, evals, ...)``:

1. expands the SAE folders (glob patterns, or parent folders holding SAE folders) and keys each
   one by a checksum of its weights and config;
2. looks up every (SAE, eval) result in ``out_dir/cache/<checksum>/<eval>-<config hash>.json``; what
   is cached is not recomputed, so an interrupted run resumes where it stopped (the model is not
   even loaded when everything is cached);
3. runs what is missing, eval by eval as ``evals/registry.py`` lists them (each eval module registers an
   ``EvalSpec``: its config, cache key, computation, columns and figures; this runner names none of them):
   evals of the weights alone (``compat``) first without a model, then per model the per-hook jobs
   (``core`` and ``dead`` in one shared pass, ``evals/reconstruction.py``: one clean forward per batch and
   the zero-ablation terms for the whole group, one spliced forward per SAE; ``sparse_probing``,
   ``absorption``) and the per-SAE jobs (``steering``, ``circuits``, ``autointerp``), writing each result
   as soon as it is done;
4. writes ``results.csv``, ``results.parquet`` and ``results.json`` (one row per SAE), and the
   figures each eval declares, as offline HTML (CE loss recovered vs L0 and FVU vs L0 Pareto views,
   dead/dense latents, steering curves, faithfulness/completeness curves, ...).

Timings. Work is done in *jobs*: ``core+dead`` (or ``core`` / ``dead`` alone) is one shared pass for
all SAEs at a hook, as are ``sparse_probing`` and ``absorption``; ``steering``, ``circuits``,
``autointerp`` and ``compat`` are one job per SAE. Each cached result
records the wall time of the job that produced it, the SAEs that shared it, and this SAE's share
(job seconds / SAEs in it). The table gets one ``seconds[<job>]`` column per job (the SAE's share,
as recorded when the result was computed, also when it now comes from the cache) and
``seconds_total``; ``timings.json`` (and ``BenchResult.timings``) has this run's wall times: model
load, eval-token loading, every job, and the whole run.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from torch import Tensor
from tqdm.auto import tqdm

from pydantic import BaseModel, ConfigDict, Field

from saebench.config import HelpFormatter
from saebench.evals import registry
from saebench.evals.common import config_hash, load_eval_tokens, sae_checksum, special_ids_of
from saebench.evals.compat import check_saebench_compat  # noqa: F401  (it lived here)
from saebench.evals.registry import EvalContext, EvalSpec
from saebench.evals.results import write_table
from saebench.io import read_json, write_json
from saebench.layout import WEIGHTS_FILES, is_sae_folder
from saebench.layout import describe as describe_sae_layout
from saebench.sae import SAE
from saebench.site import Site

CACHE_VERSION = 1


def __getattr__(name: str):
    # ``EVALS`` / ``ALIASES``: what the registry holds now (read at use, so evals registered later are listed).
    if name == "EVALS":
        return registry.names()
    if name == "ALIASES":
        return registry.aliases()
    raise AttributeError(name)


class BenchConfig(BaseModel):
    """One bench run's settings: which evals, the held-out data they share, and each eval's own config (by key)."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    evals: tuple[str, ...] = Field(("core", "dead"), description="Evals to run (names or aliases).")
    out_dir: str = Field("bench", description="Output folder (table, figures, cache/).")
    corpus: str = Field("default", description="Text source; its held-out 'eval' split is used.")
    eval_tokens: int = Field(65_536, gt=0, description="Tokens for the core metrics.")
    context_size: int = Field(128, gt=1, description="Tokens per sequence.")
    batch_size: int = Field(8, gt=0, description="Sequences per model forward.")
    device: str = Field("cpu", description="Torch device.")
    force: bool = Field(False, description="Recompute cached results.")
    figures: bool = Field(True, description="Write the figures.")
    progress: bool = Field(True, description="Show progress bars.")
    configs: dict[str, Any] = Field(default_factory=dict, description="Eval configs by key (steering, circuits, dead, judge, ...); "
                                    "a missing key takes its config's defaults.")

    def eval_configs(self) -> dict[str, Any]:
        """Every registered config key's config: the given one, else the default."""
        known = registry.config_specs()
        unknown = sorted(set(self.configs) - set(known))
        if unknown:
            raise ValueError(f"unknown eval config(s) {unknown}; known: {sorted(known)}")
        out = {}
        for key, spec in known.items():
            given = self.configs.get(key)
            if given is not None and not isinstance(given, spec.cls):
                raise TypeError(f"config {key!r} must be a {spec.cls.__name__}, got {type(given).__name__}")
            out[key] = given if given is not None else spec.cls()
        return out


# --------------------------------------------------------------------------- runner


@dataclass
class BenchResult:
    """What ``run_bench`` did and where it wrote it."""

    rows: list[dict[str, Any]]
    results: dict[str, dict[str, Any]]  # sae_dir -> eval -> result
    computed: list[tuple[str, str]] = field(default_factory=list)
    cached: list[tuple[str, str]] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)
    # This run's wall times: ``model_load_seconds``, ``tokens_seconds``, ``jobs`` (one dict per job: job, hook,
    # saes, evals, seconds), ``total_seconds``. Cached results cost nothing here.
    timings: dict[str, Any] = field(default_factory=dict)


def expand_sae_dirs(sae_dirs: str | Sequence[str | Path]) -> list[Path]:
    """Glob patterns and folders → sorted, de-duplicated SAE folders (a folder without weights is searched below)."""
    items = [sae_dirs] if isinstance(sae_dirs, (str, Path)) else list(sae_dirs)
    found: list[Path] = []
    for item in items:
        s = str(item)
        matches = sorted(glob.glob(s, recursive=True)) if any(c in s for c in "*?[") else [s]
        for m in matches:
            p = Path(m)
            if _is_sae_dir(p):
                found.append(p)
            elif p.is_dir():
                found += sorted({w.parent for pat in WEIGHTS_FILES for w in p.rglob(pat)})
            else:
                raise FileNotFoundError(f"{m} is not an SAE folder ({describe_sae_layout()}) nor a folder holding some")
    out, seen = [], set()
    for p in found:
        r = p.resolve()
        if r not in seen:
            seen.add(r)
            out.append(p)
    if not out:
        raise FileNotFoundError(f"no SAE folders found in {items}")
    return out


def _is_sae_dir(p: Path) -> bool:
    return p.is_dir() and is_sae_folder(p)


def _model_key(model, cfg_model_name: str) -> str:
    """What identifies the model in cache keys: the given name, a loaded model's description, or the SAE's cfg.model_name."""
    if isinstance(model, str):
        return model
    if model is not None:
        tok = getattr(model, "tokenizer", None)
        return f"{getattr(model.cfg, 'model_name', '')}|{getattr(tok, 'name_or_path', '')}|{model.cfg.n_layers}x{model.cfg.d_model}"
    return cfg_model_name or "default"


def run_bench(sae_dirs: str | Sequence[str | Path], evals: Sequence[str] | None = None, model=None, *, config: BenchConfig | None = None,
              tokens: Tensor | None = None, **options: Any) -> BenchResult:
    """Evaluate every SAE folder with every eval, resuming from cached results; write table + figures.

    Args:
        sae_dirs: SAE folders, glob patterns, or folders holding SAE folders.
        evals: eval names or aliases (``evals/registry.py``; default ``config.evals``: core and dead).
        model: a loaded model, a model name/folder, or None (each SAE's ``cfg.model_name``).
        config: a :class:`BenchConfig`; ``options`` override it: its fields (``out_dir``, ``eval_tokens``, ...),
            an eval's config by key (``steering=SteeringConfig(...)``, ``judge=JudgeConfig(...)``), or a field
            of one eval config by name where only one has it (``dead_tokens=``, ``windows=``).
        tokens: [n_seq, ctx] eval tokens to use instead of the held-out split of ``corpus``.
    """
    t_start = time.time()
    cfg = _bench_config(config or BenchConfig(), evals, options)
    specs = registry.resolve(cfg.evals)
    cfgs = cfg.eval_configs()
    out = Path(cfg.out_dir)
    dirs = expand_sae_dirs(sae_dirs)
    checksums = {str(d): sae_checksum(d) for d in dirs}
    data = {"corpus": cfg.corpus, "context_size": cfg.context_size, "tokens": None if tokens is None else config_hash(tokens.tolist()),
            "eval_tokens": cfg.eval_tokens, "batch_size": cfg.batch_size, "given_tokens": tokens is not None}

    def eval_config(spec: EvalSpec, model_id: str) -> dict[str, Any]:
        base = {"version": CACHE_VERSION} | ({"model": model_id} if spec.needs_model else {})
        return base | spec.cache_key(cfgs, data)

    def cache_path(d: str, spec: EvalSpec, model_id: str) -> Path:
        return out / "cache" / checksums[d][:16] / f"{spec.name}-{config_hash(eval_config(spec, model_id))}.json"

    # Model identity for cache keys without loading anything: the given name/object, else cfg.model_name.
    cfg_model = {str(d): _cfg_model_name(d) for d in dirs}
    results: dict[str, dict[str, Any]] = {str(d): {} for d in dirs}
    times: dict[str, dict[str, dict[str, Any]]] = {str(d): {} for d in dirs}  # sae dir -> eval -> job timing record
    res = BenchResult([], results, timings={"model_load_seconds": 0.0, "tokens_seconds": 0.0, "jobs": []})
    pending: dict[str, list[str]] = defaultdict(list)  # eval -> sae dirs
    for d in dirs:
        d = str(d)
        mid = _model_key(model, cfg_model[d])
        for spec in specs:
            path = cache_path(d, spec, mid if spec.needs_model else "")
            if path.exists() and not cfg.force:
                cached = read_json(path, f"cached {spec.name} result")
                results[d][spec.name] = cached["result"]
                times[d][spec.name] = _timing_record(cached, spec.name)
                res.cached.append((d, spec.name))
            else:
                pending[spec.name].append(d)

    if pending:
        _compute([s for s in specs if s.name in pending], pending, results, times, res, model=model, tokens=tokens, cfg=cfg, cfgs=cfgs,
                 data=data,                 cfg_model=cfg_model, checksums=checksums, cache_path=cache_path, eval_config=eval_config)

    labels = sae_labels(dirs)
    res.rows = [_row(d, results[str(d)], labels[str(d)]) | _timing_columns(times[str(d)]) for d in dirs]
    res.files |= write_table(res.rows, out)
    if cfg.figures:
        res.files |= _figures(res.rows, {labels[d]: r for d, r in results.items()}, out)
    res.timings["total_seconds"] = time.time() - t_start
    res.timings["jobs"] = [j | {"saes": [labels[s] for s in j["saes"]]} for j in res.timings["jobs"]]
    res.files["timings"] = out / "timings.json"
    write_json(res.files["timings"], res.timings)
    return res


def _bench_config(config: BenchConfig, evals: Sequence[str] | None, options: dict[str, Any]) -> BenchConfig:
    """``config`` with ``evals`` and keyword ``options`` applied (see :func:`run_bench`)."""
    fields, configs = {}, dict(config.configs)
    known = registry.config_specs()
    by_field: dict[str, list[str]] = defaultdict(list)
    for key, spec in known.items():
        for name in (f.name for f in dataclasses.fields(spec.cls)) if dataclasses.is_dataclass(spec.cls) else spec.cls.model_fields:
            by_field[name].append(key)
    loose: dict[str, dict[str, Any]] = defaultdict(dict)
    for name, value in options.items():
        if name in BenchConfig.model_fields and name != "configs":
            fields[name] = str(value) if name == "out_dir" else value
        elif name in known:
            configs[name] = value
        elif len(by_field.get(name, ())) == 1:
            loose[by_field[name][0]][name] = value
        else:
            where = f" (a field of {by_field[name]}: pass that config instead)" if by_field.get(name) else ""
            takes = sorted(set(BenchConfig.model_fields) - {'configs'})
            raise TypeError(f"run_bench got an unexpected keyword {name!r}{where}; it takes {takes}, "
                            f"eval configs {sorted(known)}, or a field of one of them")
    for key, values in loose.items():
        base = configs.get(key) or known[key].cls()
        configs[key] = dataclasses.replace(base, **values) if dataclasses.is_dataclass(base) else base.model_copy(update=values)
        if not dataclasses.is_dataclass(base):
            configs[key] = type(base).model_validate(configs[key].model_dump())
    if evals is not None:
        fields["evals"] = tuple([evals] if isinstance(evals, str) else evals)
    return config.model_copy(update=fields | {"configs": configs})


def _timing_record(cached: dict[str, Any], ev: str) -> dict[str, Any]:
    """The job timing stored with a result (older cache files have only ``seconds``)."""
    seconds = cached.get("seconds")
    return {"job": cached.get("job", ev), "seconds": seconds, "job_seconds": cached.get("job_seconds", seconds),
            "job_saes": cached.get("job_saes", 1)}


def _timing_columns(times: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``seconds[<job>]`` (this SAE's share of each job that produced one of its results) and ``seconds_total``."""
    cols: dict[str, float] = {}
    for rec in times.values():
        if isinstance(rec.get("seconds"), (int, float)):
            cols[f"seconds[{rec['job']}]"] = float(rec["seconds"])  # evals of one job share one record
    if cols:
        cols["seconds_total"] = sum(cols.values())
    return cols


def sae_labels(dirs: Sequence[Path]) -> dict[str, str]:
    """Short unique names: each folder's path relative to the common parent of all of them."""
    parents = [str(Path(d).resolve().parent) for d in dirs]
    common = Path(os.path.commonpath(parents)) if parents else Path(".")
    return {str(d): str(Path(d).resolve().relative_to(common)) for d in dirs}


def _cfg_model_name(d: Path) -> str:
    try:
        raw = json.loads((Path(d) / "cfg.json").read_text())
    except (OSError, ValueError):
        return ""
    return raw.get("model_name") or (raw.get("metadata") or {}).get("model_name", "") or ""


def _compute(specs: list[EvalSpec], pending, results, times, res, *, model, tokens, cfg: BenchConfig, cfgs, data, cfg_model, checksums,
             cache_path, eval_config) -> None:
    from saebench import models as model_lib

    def save(d: str, spec: EvalSpec, mid: str, result: dict, job: dict[str, Any]) -> None:
        n = len(job["saes"])
        timing = {"job": job["job"], "seconds": job["seconds"] / n, "job_seconds": job["seconds"], "job_saes": n}
        write_json(cache_path(d, spec, mid), {"eval": spec.name, "sae_dir": d, "sae_checksum": checksums[d],
                                              "config": eval_config(spec, mid), **timing, "result": result})
        results[d][spec.name] = result
        times[d][spec.name] = timing
        res.computed.append((d, spec.name))

    def job(name: str, saes: list[str], evals: list[str], t0: float, hook: str | None = None) -> dict[str, Any]:
        j = {"job": name, "hook": hook, "saes": saes, "evals": evals, "seconds": time.time() - t0}
        res.timings["jobs"].append(j)
        return j

    # Evals of the weights alone need no model: one job per SAE, first.
    for spec in [s for s in specs if not s.needs_model]:
        ctx = EvalContext(None, "", cfgs, data, device=cfg.device, progress=cfg.progress)
        for d in pending[spec.name]:
            t = time.time()
            r = spec.compute(ctx, SAE.load(d, device=cfg.device), d)
            save(d, spec, "", r, job(spec.name, [d], [spec.name], t))
        if spec.finish:
            spec.finish(ctx)
    specs = [s for s in specs if s.needs_model]
    if not specs:
        return

    # One model at a time: the given one, or each distinct cfg.model_name.
    by_model: dict[str, set[str]] = defaultdict(set)
    for spec in specs:
        for d in pending[spec.name]:
            by_model["__given__" if model is not None else (cfg_model[d] or "")].add(d)
    for key, dset in by_model.items():
        if model is not None and not isinstance(model, str):
            lm = model
        else:
            t = time.time()
            lm = model_lib.load_model(model if isinstance(model, str) else (key or None), device=cfg.device)
            res.timings["model_load_seconds"] += time.time() - t
        mid = _model_key(model, key)
        saes = {d: SAE.load(d, device=cfg.device) for d in sorted(dset)}
        ctx = EvalContext(lm, mid, cfgs, data, device=cfg.device, progress=cfg.progress, tokens=tokens,
                          special_ids=special_ids_of(lm.tokenizer))
        mine = {s.name: [d for d in pending[s.name] if d in saes] for s in specs}
        n = max([s.tokens_needed(cfgs, data) for s in specs if s.tokens_needed and mine[s.name]], default=0)
        if tokens is None and n:
            t = time.time()
            ctx.tokens = load_eval_tokens(lm, cfg.corpus, n, cfg.context_size)
            res.timings["tokens_seconds"] += time.time() - t

        done: set[str] = set()
        for spec in specs:
            if spec.name in done:
                continue
            if spec.scope == "sae":
                done.add(spec.name)
                for d in tqdm(mine[spec.name], desc=f"{spec.name} evals", disable=not cfg.progress or not mine[spec.name]):
                    t = time.time()
                    r = spec.compute(ctx, saes[d], d)
                    save(d, spec, mid, r, job(spec.name, [d], [spec.name], t))
                continue
            # Per hook: the SAEs at one hook share the model forwards; evals of one shared pass share one job.
            members = [s for s in specs if s.shared is not None and s.shared is spec.shared] if spec.shared else [spec]
            done |= {s.name for s in members}
            groups: dict[tuple, list[str]] = defaultdict(list)
            for d in dict.fromkeys(d for s in members for d in mine[s.name]):
                groups[Site.of_sae(saes[d])].append(d)
            for site, ds in groups.items():
                t = time.time()
                group = [saes[d] for d in ds]
                if spec.shared:
                    out = spec.shared.compute(ctx, group, {s.name: [d in mine[s.name] for d in ds] for s in members})
                else:
                    out = [{spec.name: r} for r in spec.compute(ctx, group, list(ds))]
                evs = [s.name for s in members if any(s.name in r for r in out)]
                j = job("+".join(evs), list(ds), evs, t, hook=site[0] if site[1] is None else f"{site[0]}:{site[1]}")
                for d, r in zip(ds, out):
                    for s in members:
                        if s.name in r:
                            save(d, s, mid, r[s.name], j)
        for spec in specs:
            if spec.finish:
                spec.finish(ctx)


# --------------------------------------------------------------------------- table and figures

def _row(d: Path, res: dict[str, Any], label: str) -> dict[str, Any]:
    """One table row: the SAE's own fields, then each eval's ``columns`` (in registry order)."""
    raw = {}
    try:
        raw = json.loads((Path(d) / "cfg.json").read_text())
    except (OSError, ValueError, RecursionError):
        pass
    raw = raw if isinstance(raw, dict) else {}
    row: dict[str, Any] = {
        "sae": label, "sae_dir": str(d), "method": raw.get("method") or raw.get("architecture", ""),
        "architecture": raw.get("architecture", ""), "hook_name": raw.get("hook_name", ""), "d_sae": raw.get("d_sae"), "k": raw.get("k"),
    }
    for spec in registry.specs():
        if res.get(spec.name):
            row |= spec.columns(res[spec.name])
    return row


def _figures(rows, results, out: Path) -> dict[str, Path]:
    from saebench.evals import plots

    figs = {}
    for spec in registry.specs():
        if spec.figures:
            figs |= spec.figures(rows, results)
    return {f"figure:{k}": v for k, v in plots.write_figures(figs, out / "figures").items()}


# --------------------------------------------------------------------------- CLI




def build_parser(prog: str = "saebench bench") -> argparse.ArgumentParser:
    """The argument parser of ``saebench bench`` (exposed so the CLI can embed it): the run's settings, then one flag
    per field of every registered eval's config (``--<prefix>-<field>``, generated from the config)."""
    p = argparse.ArgumentParser(prog=prog, description="Evaluate SAE folders with a set of evals; resumable; writes a table and figures.",
                                formatter_class=HelpFormatter)
    al = registry.aliases()
    p.add_argument("sae_dirs", nargs="+", help="SAE folders, glob patterns (quoted), or folders holding SAE folders")
    p.add_argument("--evals", nargs="+", default=["core", "dead"],
                   help=f"evals to run: {', '.join(registry.names())} (aliases: {', '.join(f'{a} = {n}' for a, n in sorted(al.items()))})")
    p.add_argument("--model", default=None, help="model name or local HF folder (default: each SAE's cfg.model_name)")
    p.add_argument("--out", default="bench", help="output folder (table, figures, cache/)")
    p.add_argument("--corpus", default="default", help="text source; its held-out 'eval' split is used")
    p.add_argument("--eval-tokens", type=int, default=65_536, help="tokens for the core metrics")
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per model forward")
    p.add_argument("--device", default="cpu")
    p.add_argument("--force", action="store_true", help="recompute cached results")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    dests = {c.key: registry.add_flags(p, c.key, title=f"{spec.name} eval: {c.cls.__name__} fields")
             for spec in registry.specs() for c in spec.configs}
    p.set_defaults(_config_dests=dests)
    return p


def bench_config_from_args(a: argparse.Namespace) -> BenchConfig:
    """The :class:`BenchConfig` that ``saebench bench``'s parsed flags describe."""
    configs = {key: registry.config_from_args(a, key, dests, batch_size=a.batch_size) for key, dests in a._config_dests.items()}
    return BenchConfig(evals=tuple(a.evals), out_dir=a.out, corpus=a.corpus, eval_tokens=a.eval_tokens, context_size=a.context_size,
                       batch_size=a.batch_size, device=a.device, force=a.force, figures=not a.no_figures, progress=not a.no_progress,
                       configs=configs)


def bench_main(argv: list[str] | None = None) -> BenchResult:
    """Entry point for ``saebench bench``: parse ``argv``, run, print a short table."""
    a = build_parser().parse_args(argv)
    res = run_bench(a.sae_dirs, model=a.model, config=bench_config_from_args(a))
    print(format_rows(res.rows))
    print(f"\n{len(res.computed)} results computed, {len(res.cached)} from cache; table: {res.files['csv']}")
    return res


def format_rows(rows: list[dict[str, Any]]) -> str:
    """A compact text table of the headline columns."""
    cols = [c for c in ("sae", "l0", "fvu", "ce_loss_score", "kl_div_score", "dead_fraction", "dead_window_tokens", "dense_fraction_1pct",
                        "steering_score", "sae_top_1_test_accuracy", "mean_absorption_fraction_score", "autointerp_score", "afa_rel_error", "saebench_compatible",
                        "seconds_total") if any(c in r for r in rows)]

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    table = [cols] + [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in table)


if __name__ == "__main__":
    bench_main()
