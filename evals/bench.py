"""The benchmark runner: any set of SAE folders × any set of evals, resumable, one table and figures.

``run_bench(sae_dirs, evals, ...)``:

1. expands the SAE folders (glob patterns, or parent folders holding SAE folders) and keys each
   one by a checksum of its weights and config;
2. looks up every (SAE, eval) result in ``out_dir/cache/<checksum>/<eval>-<config hash>.json``; what
   is cached is not recomputed, so an interrupted run resumes where it stopped (the model is not
   even loaded when everything is cached);
3. runs ``core`` (= ``reconstruction``) and ``dead`` for all SAEs at one hook in one shared pass
   (``evals/reconstruction.evaluate_hook_group``: one clean forward per batch and the zero-ablation
   terms for the whole group, one spliced forward per SAE), then ``steering``, ``circuits`` and
   ``compat`` per SAE, writing each result as soon as it is done;
4. writes ``results.csv``, ``results.parquet`` and ``results.json`` (one row per SAE), and the
   figures as offline HTML: CE loss recovered vs L0 and FVU vs L0 Pareto views, dead/dense latents,
   steering curves, faithfulness/completeness curves.

Timings. Work is done in *jobs*: ``core+dead`` (or ``core`` / ``dead`` alone) is one shared pass for
all SAEs at a hook; ``steering``, ``circuits`` and ``compat`` are one job per SAE. Each cached result
records the wall time of the job that produced it, the SAEs that shared it, and this SAE's share
(job seconds / SAEs in it). The table gets one ``seconds[<job>]`` column per job (the SAE's share,
as recorded when the result was computed, also when it now comes from the cache) and
``seconds_total``; ``timings.json`` (and ``BenchResult.timings``) has this run's wall times: model
load, eval-token loading, every job, and the whole run.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saebench.evals.absorption import AbsorptionConfig, evaluate_absorption
from saebench.evals.autointerp import AutointerpConfig, JudgeConfig
from saebench.evals.autointerp import evaluate_sae as evaluate_autointerp_sae
from saebench.evals.circuits import CircuitConfig, evaluate_circuit
from saebench.evals.common import config_hash, load_eval_tokens, sae_checksum, special_ids_of
from saebench.evals.dead import DEFAULT_WINDOWS
from saebench.evals.reconstruction import evaluate_hook_group
from saebench.evals.results import write_table
from saebench.evals.sparse_probing import SparseProbingConfig, evaluate_sparse_probing
from saebench.evals.steering import SteeringConfig, evaluate_steering
from saebench.io import read_json, write_json
from saebench.layout import WEIGHTS_FILES, is_sae_folder
from saebench.layout import describe as describe_sae_layout
from saebench.sae import SAE
from saebench.site import Site

EVALS = ("core", "dead", "steering", "circuits", "compat", "sparse_probing", "absorption", "autointerp")
ALIASES = {"reconstruction": "core", "saebench_compat": "compat", "circuit": "circuits"}
CACHE_VERSION = 1


# --------------------------------------------------------------------------- SAEBench interface check


def check_saebench_compat(sae) -> dict[str, Any]:
    """Does ``sae`` expose what SAEBench's custom-SAE interface needs (EVALS.md §1.2)? Never raises."""
    checks: dict[str, dict[str, Any]] = {}

    def check(name: str, fn) -> None:
        try:
            ok, detail = fn()
        except Exception as e:  # a missing attribute is a failed check, not a crash
            ok, detail = False, f"{type(e).__name__}: {e}"
        checks[name] = {"ok": bool(ok), "detail": detail}

    cfg = getattr(sae, "cfg", None)
    d_in, d_sae = getattr(cfg, "d_in", None), getattr(cfg, "d_sae", None)
    check("nn.Module", lambda: (isinstance(sae, torch.nn.Module), type(sae).__name__))
    check("W_enc [d_in, d_sae]", lambda: (tuple(sae.W_enc.shape) == (d_in, d_sae), tuple(sae.W_enc.shape)))
    check("W_dec [d_sae, d_in]", lambda: (tuple(sae.W_dec.shape) == (d_sae, d_in), tuple(sae.W_dec.shape)))
    tol = 1e-2 if getattr(sae, "dtype", torch.float32) in (torch.bfloat16, torch.float16) else 1e-5

    def unit():
        err = float((sae.W_dec.detach().float().norm(dim=-1) - 1).abs().max())
        return err <= tol, f"max |‖W_dec[i]‖ − 1| = {err:.2e} (tolerance {tol:g})"

    check("W_dec rows unit norm", unit)
    check("b_enc [d_sae]", lambda: (tuple(sae.b_enc.shape) == (d_sae,), tuple(sae.b_enc.shape)))
    check("b_dec [d_in]", lambda: (tuple(sae.b_dec.shape) == (d_in,), tuple(sae.b_dec.shape)))
    check("device", lambda: (isinstance(sae.device, torch.device), str(sae.device)))
    check("dtype", lambda: (isinstance(sae.dtype, torch.dtype), str(sae.dtype)))

    def shapes():
        x = torch.randn(2, 3, d_in, dtype=sae.dtype, device=sae.device)
        f = sae.encode(x)
        xh = sae.decode(f)
        y = sae(x)
        ok = tuple(f.shape) == (2, 3, d_sae) and tuple(xh.shape) == (2, 3, d_in) and tuple(y.shape) == (2, 3, d_in)
        return ok, f"encode {tuple(f.shape)}, decode {tuple(xh.shape)}, forward {tuple(y.shape)}"

    check("encode/decode/forward on [batch, pos, d_in]", shapes)
    for f in ("model_name", "hook_name"):
        check(f"cfg.{f}", lambda f=f: (bool(getattr(cfg, f)), repr(getattr(cfg, f))))
    for f in ("d_in", "d_sae", "hook_layer"):
        check(f"cfg.{f}", lambda f=f: (isinstance(getattr(cfg, f), int), repr(getattr(cfg, f))))
    return {"ok": all(c["ok"] for c in checks.values()), "checks": checks}


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


def run_bench(
    sae_dirs: str | Sequence[str | Path],
    evals: Sequence[str] = ("core", "dead"),
    model=None,
    *,
    out_dir: str | Path = "bench",
    corpus: str = "default",
    eval_tokens: int = 65_536,
    dead_tokens: int | None = None,
    context_size: int = 128,
    batch_size: int = 8,
    tokens: Tensor | None = None,
    windows: Sequence[int] = DEFAULT_WINDOWS,
    steering: SteeringConfig | None = None,
    circuits: CircuitConfig | None = None,
    device: str = "cpu",
    force: bool = False,
    figures: bool = True,
    progress: bool = True,
    sparse_probing: SparseProbingConfig | None = None,
    absorption: AbsorptionConfig | None = None,
    autointerp: AutointerpConfig | None = None,
    judge: JudgeConfig | None = None,
) -> BenchResult:
    """Evaluate every SAE folder with every eval, resuming from cached results; write table + figures.

    Args:
        sae_dirs: SAE folders, glob patterns, or folders holding SAE folders.
        evals: any of ``core`` (alias ``reconstruction``), ``dead``, ``steering``, ``circuits``, ``compat``.
        model: a loaded model, a model name/folder, or None (each SAE's ``cfg.model_name``).
        eval_tokens: tokens for the core metrics; ``dead_tokens`` (default = ``eval_tokens``) for the
            dead-latent window. Both come from the held-out split of ``corpus`` unless ``tokens``
            [n_seq, ctx] are given.
        steering, circuits, sparse_probing, absorption: their configs (defaults: ``SteeringConfig()``, ...).
        force: recompute even when a cached result exists.
    """
    t_start = time.time()
    evals = [ALIASES.get(e, e) for e in evals]
    unknown = [e for e in evals if e not in EVALS]
    if unknown:
        raise ValueError(f"unknown eval(s) {unknown}; choose from {list(EVALS)} (or aliases {sorted(ALIASES)})")
    evals = list(dict.fromkeys(evals))
    steering = steering or SteeringConfig()
    circuits = circuits or CircuitConfig()
    sparse_probing = sparse_probing or SparseProbingConfig()
    absorption = absorption or AbsorptionConfig()
    autointerp, judge = autointerp or AutointerpConfig(), judge or JudgeConfig()
    dead_tokens = dead_tokens or eval_tokens
    out = Path(out_dir)
    dirs = expand_sae_dirs(sae_dirs)
    checksums = {str(d): sae_checksum(d) for d in dirs}
    tokens_id = None if tokens is None else config_hash(tokens.tolist())

    def eval_config(ev: str, model_id: str) -> dict[str, Any]:
        base = {"version": CACHE_VERSION, "model": model_id}
        data = {"corpus": corpus, "context_size": context_size, "tokens": tokens_id}
        if ev == "core":
            return base | data | {"eval_tokens": eval_tokens}
        if ev == "dead":
            return base | data | {"dead_tokens": dead_tokens, "windows": list(windows)}
        if ev == "steering":
            return base | data | steering.to_dict()
        if ev == "circuits":
            return base | circuits.to_dict()
        if ev == "sparse_probing":
            return base | sparse_probing.to_dict()
        if ev == "absorption":
            return base | absorption.to_dict()
        if ev == "autointerp":
            return base | autointerp.to_dict() | {"judge": judge.to_dict()}
        return {"version": CACHE_VERSION}

    def cache_path(d: str, ev: str, model_id: str) -> Path:
        return out / "cache" / checksums[d][:16] / f"{ev}-{config_hash(eval_config(ev, model_id))}.json"

    # Model identity for cache keys without loading anything: the given name/object, else cfg.model_name.
    cfg_model = {str(d): _cfg_model_name(d) for d in dirs}
    results: dict[str, dict[str, Any]] = {str(d): {} for d in dirs}
    times: dict[str, dict[str, dict[str, Any]]] = {str(d): {} for d in dirs}  # sae dir -> eval -> job timing record
    res = BenchResult([], results, timings={"model_load_seconds": 0.0, "tokens_seconds": 0.0, "jobs": []})
    pending: dict[str, list[str]] = defaultdict(list)  # eval -> sae dirs
    for d in dirs:
        d = str(d)
        mid = _model_key(model, cfg_model[d])
        for ev in evals:
            path = cache_path(d, ev, mid)
            if path.exists() and not force:
                cached = read_json(path, f"cached {ev} result")
                results[d][ev] = cached["result"]
                times[d][ev] = _timing_record(cached, ev)
                res.cached.append((d, ev))
            else:
                pending[ev].append(d)

    if pending:
        _compute(pending, results, times, res, model=model, cache_path=cache_path, cfg_model=cfg_model, checksums=checksums, corpus=corpus,
                 eval_tokens=eval_tokens, dead_tokens=dead_tokens, context_size=context_size, batch_size=batch_size, tokens=tokens,
                 windows=windows, steering=steering, circuits=circuits, device=device, progress=progress, eval_config=eval_config,
                 sparse_probing=sparse_probing, absorption=absorption, autointerp=autointerp, judge=judge)

    labels = sae_labels(dirs)
    res.rows = [_row(d, results[str(d)], labels[str(d)]) | _timing_columns(times[str(d)]) for d in dirs]
    res.files |= write_table(res.rows, out)
    if figures:
        res.files |= _figures(res.rows, {labels[d]: r for d, r in results.items()}, out)
    res.timings["total_seconds"] = time.time() - t_start
    res.timings["jobs"] = [j | {"saes": [labels[s] for s in j["saes"]]} for j in res.timings["jobs"]]
    res.files["timings"] = out / "timings.json"
    write_json(res.files["timings"], res.timings)
    return res


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


def _compute(pending, results, times, res, *, model, cache_path, cfg_model, checksums, corpus, eval_tokens, dead_tokens, context_size, batch_size,
             tokens, windows, steering, circuits, device, progress, eval_config, sparse_probing, absorption, autointerp=None, judge=None) -> None:
    from saebench import models as model_lib

    def save(d: str, ev: str, mid: str, result: dict, job: dict[str, Any]) -> None:
        timing = {"job": job["job"], "seconds": job["seconds"] / len(job["saes"]), "job_seconds": job["seconds"], "job_saes": len(job["saes"])}
        write_json(cache_path(d, ev, mid), {"eval": ev, "sae_dir": d, "sae_checksum": checksums[d], "config": eval_config(ev, mid),
                                            **timing, "result": result})
        results[d][ev] = result
        times[d][ev] = timing
        res.computed.append((d, ev))

    def job(name: str, saes: list[str], evals: list[str], t0: float, hook: str | None = None) -> dict[str, Any]:
        j = {"job": name, "hook": hook, "saes": saes, "evals": evals, "seconds": time.time() - t0}
        res.timings["jobs"].append(j)
        return j

    # SAEBench compatibility needs no model.
    for d in pending.pop("compat", []):
        t = time.time()
        r = check_saebench_compat(SAE.load(d, device=device))
        save(d, "compat", "", r, job("compat", [d], ["compat"], t))
    if not pending:
        return

    # One model at a time: the given one, or each distinct cfg.model_name.
    by_model: dict[str, set[str]] = defaultdict(set)
    for ev, ds in pending.items():
        for d in ds:
            by_model["__given__" if model is not None else (cfg_model[d] or "")].add(d)
    for key, dset in by_model.items():
        if model is not None and not isinstance(model, str):
            lm = model
        else:
            t = time.time()
            lm = model_lib.load_model(model if isinstance(model, str) else (key or None), device=device)
            res.timings["model_load_seconds"] += time.time() - t
        mid = _model_key(model, key)
        saes = {d: SAE.load(d, device=device) for d in sorted(dset)}
        special = special_ids_of(lm.tokenizer)
        need_core = [d for d in pending.get("core", []) if d in saes]
        need_dead = [d for d in pending.get("dead", []) if d in saes]
        toks = tokens
        if toks is None and (need_core or need_dead or "steering" in pending):
            n = max(eval_tokens if need_core else 0, dead_tokens if need_dead else 0, steering.max_act_tokens if "steering" in pending else 0)
            t = time.time()
            toks = load_eval_tokens(lm, corpus, n, context_size)
            res.timings["tokens_seconds"] += time.time() - t

        # Core + dead: one shared pass per hook.
        groups: dict[tuple, list[str]] = defaultdict(list)
        for d in dict.fromkeys(need_core + need_dead):
            groups[Site.of_sae(saes[d])].append(d)
        for site, ds in groups.items():
            t = time.time()
            n_rows = max(dead_tokens if any(d in need_dead for d in ds) else 0, eval_tokens if any(d in need_core for d in ds) else 0)
            sub = toks[: max(1, n_rows // toks.shape[1])]
            out = evaluate_hook_group([saes[d] for d in ds], lm, sub, special_ids=special, core=[d in need_core for d in ds],
                                      dead=[d in need_dead for d in ds], core_tokens=eval_tokens, windows=windows, batch_size=batch_size,
                                      progress=progress)
            group_evals = [ev for ev in ("core", "dead") if any(ev in r for r in out)]
            j = job("+".join(group_evals), list(ds), group_evals, t, hook=site[0] if site[1] is None else f"{site[0]}:{site[1]}")
            for d, r in zip(ds, out):
                for ev in ("core", "dead"):
                    if ev in r:
                        save(d, ev, mid, r[ev] | {"corpus": corpus if tokens is None else "given tokens", "context_size": int(toks.shape[1])}, j)

        for d in tqdm([d for d in pending.get("steering", []) if d in saes], desc="steering evals", disable=not progress):
            t = time.time()
            sae = saes[d]
            max_tok = toks[: max(1, steering.max_act_tokens // toks.shape[1])]
            neutral = toks[: max(1, steering.neutral_tokens // steering.neutral_context), : steering.neutral_context]
            per = {c: evaluate_steering(lm, sae, concept=c, config=steering, max_act_tokens=max_tok, neutral_tokens=neutral, special_ids=special,
                                        progress=progress) for c in steering.concepts}
            save(d, "steering", mid, _steering_summary(per), job("steering", [d], ["steering"], t))

        for d in tqdm([d for d in pending.get("circuits", []) if d in saes], desc="circuit evals", disable=not progress):
            t = time.time()
            per = {}
            for task in circuits.tasks:
                per[task] = evaluate_circuit(lm, saes[d], task, n_examples=circuits.n_examples, method=circuits.method, ig_steps=circuits.ig_steps,
                                             train_fraction=circuits.train_fraction, n_patch_check=circuits.n_patch_check,
                                             batch_size=circuits.batch_size, seed=circuits.seed, max_curve_points=circuits.max_curve_points,
                                             progress=progress)
            save(d, "circuits", mid, {"tasks": per}, job("circuits", [d], ["circuits"], t))

        # Sparse probing and absorption: one job per hook; the model forwards (and probes) are shared by its SAEs.
        for ev, fn, cfg in (("sparse_probing", evaluate_sparse_probing, sparse_probing), ("absorption", evaluate_absorption, absorption)):
            by_site: dict[tuple, list[str]] = defaultdict(list)
            for d in pending.get(ev, []):
                if d in saes:
                    by_site[Site.of_sae(saes[d])].append(d)
            for site, ds in by_site.items():
                t = time.time()
                out = fn([saes[d] for d in ds], lm, cfg, progress=progress)
                j = job(ev, list(ds), [ev], t, hook=site[0] if site[1] is None else f"{site[0]}:{site[1]}")
                for d, r in zip(ds, out):
                    save(d, ev, mid, r, j)

        # Autointerp: one job per SAE; examples from its dashboards when built, else a bounded harvest with this model.
        if pending.get("autointerp"):
            llm = judge.make(device)  # one judge (and reply cache) for all SAEs
            for d in [d for d in pending["autointerp"] if d in saes]:
                t = time.time()
                r = evaluate_autointerp_sae(d, saes[d], lm, autointerp, llm, progress=progress, device=device)
                save(d, "autointerp", mid, r, job("autointerp", [d], ["autointerp"], t))
            if progress:
                print(llm.usage.summary())


def _steering_summary(per: dict[str, dict]) -> dict[str, Any]:
    def mean(key):
        vals = [r[key] for r in per.values() if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        return sum(vals) / len(vals) if vals else math.nan

    return {"score": mean("score"), "random_score": mean("random_score"), "opposite_sign_score": mean("opposite_sign_score"), "concepts": per}


# --------------------------------------------------------------------------- table and figures

_CORE_COLS = ("l0", "l1", "fvu", "fvu_without_outliers", "n_outlier_tokens", "explained_variance", "mse", "cossim", "l2_ratio",
              "relative_reconstruction_bias", "ce_loss_score", "kl_div_score", "ce_loss_without_sae", "ce_loss_with_sae", "ce_loss_with_ablation",
              "kl_div_with_sae", "kl_div_with_ablation",
              # SAEBench 0.6's definitions under their own names (evals/core.py): compare these with SAEBench tables
              "explained_variance_saebench", "relative_reconstruction_bias_saebench", "mse_saebench")
_DEAD_COLS = ("dead_fraction", "dead_window_tokens", "frac_alive", "dense_fraction_1pct", "dense_fraction_10pct", "special_only_fraction",
              "n_special_only")


def _row(d: Path, res: dict[str, Any], label: str) -> dict[str, Any]:
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
    core = res.get("core")
    if core:
        row |= {c: core.get(c) for c in _CORE_COLS}
        row |= {c: core.get(c) for c in _DEAD_COLS if c in core}
        row["core_tokens"] = core.get("n_tokens")
    dead = res.get("dead")
    if dead:  # the dead eval's window is the stated one: it overrides core's counts
        row |= {c: dead.get(c) for c in _DEAD_COLS}
        for w, v in dead.get("dead_fraction_by_window", {}).items():
            row[f"dead_fraction_{_short(int(w))}"] = v
    st = res.get("steering")
    if st:
        row |= {"steering_score": st.get("score"), "steering_random_score": st.get("random_score"),
                "steering_opposite_sign_score": st.get("opposite_sign_score")}
        for c, r in st.get("concepts", {}).items():
            row[f"steering_score[{c}]"] = r.get("score")
            row[f"steering_best_strength[{c}]"] = r.get("best_strength")
            row[f"steering_latent[{c}]"] = r.get("latent")
    circ = res.get("circuits")
    if circ:
        for task, r in circ.get("tasks", {}).items():
            row[f"circuit_nodes_f80[{task}]"] = r.get("nodes_for_faithfulness_0.8")
            row[f"circuit_error_ie_share[{task}]"] = r.get("error_ie_share")
            row[f"circuit_patch_pearson[{task}]"] = r.get("patch_check", {}).get("pearson")
    if "compat" in res:
        row["saebench_compatible"] = res["compat"].get("ok")
    row |= _interp_columns(res)
    return row


_AFA_COLS = ("afa_norm_ratio", "afa_rel_error", "afa_abs_rel_error", "afa_over_activated_fraction", "afa_eps_lbo_median")
_ABSORPTION_COLS = ("mean_absorption_fraction_score", "mean_full_absorption_score", "mean_num_split_features", "n_usable_letters",
                    "mean_probe_f1")


def _interp_columns(res: dict[str, Any]) -> dict[str, Any]:
    """AFA (from core), sparse-probing and absorption columns."""
    row: dict[str, Any] = {}
    core = res.get("core") or {}
    row |= {c: core[c] for c in _AFA_COLS if c in core}
    sp = res.get("sparse_probing")
    if sp:
        row |= {k: v for k, v in sp.items() if k.endswith("_test_accuracy")}
        for name, d in sp.get("datasets", {}).items():
            for k in ("llm_test_accuracy", "sae_top_1_test_accuracy", "sae_top_5_test_accuracy"):
                if k in d:
                    row[f"{k}[{name}]"] = d[k]
    ab = res.get("absorption")
    if ab:
        row |= {c: ab.get(c) for c in _ABSORPTION_COLS}
        row["absorption_enough_letters"] = ab.get("enough_letters")
    ai = res.get("autointerp")
    if ai:
        row |= {"autointerp_score": ai.get("autointerp_score"), "autointerp_std_dev": ai.get("autointerp_std_dev"),
                "autointerp_n_scored": ai.get("n_latents_scored"), "autointerp_n_unparsed": ai.get("n_unparsed"),
                "autointerp_judge": f"{ai.get('judge', {}).get('backend')}:{ai.get('judge', {}).get('model')}"}
    return row


def _short(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)


def _figures(rows, results, out: Path) -> dict[str, Path]:
    from saebench.evals import plots

    figs = {}
    if any(r.get("ce_loss_score") is not None for r in rows):
        figs["pareto_ce_loss_vs_l0"] = plots.pareto_figure(rows, "l0", "ce_loss_score", higher_is_better=True, title="CE loss recovered vs L0")
    if any(r.get("fvu") is not None for r in rows):
        figs["pareto_fvu_vs_l0"] = plots.pareto_figure(rows, "l0", "fvu", higher_is_better=False, title="FVU vs L0 (lower is better)")
    if any(r.get("dead_fraction") is not None for r in rows):
        figs["dead_latents"] = plots.dead_latents_figure(rows)
    steer = {f"{name}/{c}": r for name, res in results.items() for c, r in res.get("steering", {}).get("concepts", {}).items()}
    if steer:
        figs["steering_curves"] = plots.steering_figure(steer)
    circ = {f"{name}/{t}": r for name, res in results.items() for t, r in res.get("circuits", {}).get("tasks", {}).items()}
    if circ:
        figs["circuit_curves"] = plots.circuit_figure(circ)
    figs |= plots.interp_figures(rows, results)
    return {f"figure:{k}": v for k, v in plots.write_figures(figs, out / "figures").items()}


# --------------------------------------------------------------------------- CLI


def build_parser(prog: str = "saebench bench") -> argparse.ArgumentParser:
    """The argument parser of ``saebench bench`` (exposed so the CLI can embed it)."""
    from saebench.cli import HelpFormatter

    p = argparse.ArgumentParser(prog=prog, description="Evaluate SAE folders with a set of evals; resumable; writes a table and figures.",
                                formatter_class=HelpFormatter)
    p.add_argument("sae_dirs", nargs="+", help="SAE folders, glob patterns (quoted), or folders holding SAE folders")
    p.add_argument("--evals", nargs="+", default=["core", "dead"], help=f"evals to run: {', '.join(EVALS)} (alias: reconstruction = core)")
    p.add_argument("--model", default=None, help="model name or local HF folder (default: each SAE's cfg.model_name)")
    p.add_argument("--out", default="bench", help="output folder (table, figures, cache/)")
    p.add_argument("--corpus", default="default", help="text source; its held-out 'eval' split is used")
    p.add_argument("--eval-tokens", type=int, default=65_536, help="tokens for the core metrics")
    p.add_argument("--dead-tokens", type=int, default=None, help="tokens for the dead-latent window (default: --eval-tokens)")
    p.add_argument("--windows", type=int, nargs="*", default=list(DEFAULT_WINDOWS), help="dead-fraction windows in tokens")
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per model forward")
    p.add_argument("--steer-strengths", type=float, nargs="+", default=list(SteeringConfig.strengths), help="strengths in units of max activation")
    p.add_argument("--steer-concepts", nargs="+", default=list(SteeringConfig.concepts), help="concepts from evals/tasks.py")
    p.add_argument("--steer-scope", choices=["prompt", "generated", "all"], default="all")
    p.add_argument("--steer-prompts", type=int, default=SteeringConfig.n_prompts)
    p.add_argument("--steer-tokens", type=int, default=SteeringConfig.max_new_tokens, help="new tokens per steered generation")
    p.add_argument("--circuit-tasks", nargs="+", default=list(CircuitConfig.tasks), choices=["ioi", "sva", "greater_than"])
    p.add_argument("--circuit-method", choices=["atp", "ig"], default=CircuitConfig.method)
    p.add_argument("--circuit-examples", type=int, default=CircuitConfig.n_examples)
    p.add_argument("--probe-datasets", nargs="+", default=list(SparseProbingConfig.datasets),
                   help="sparse probing: offline task names, hf:NAME (SAEBench's datasets) or labelled files")
    p.add_argument("--probe-train-size", type=int, default=SparseProbingConfig.train_size, help="sparse probing: texts per binary task (train)")
    p.add_argument("--probe-test-size", type=int, default=SparseProbingConfig.test_size, help="sparse probing: texts per binary task (test)")
    p.add_argument("--probe-ks", type=int, nargs="+", default=list(SparseProbingConfig.ks), help="sparse probing: k values")
    p.add_argument("--absorption-words", type=int, default=AbsorptionConfig.max_words, help="absorption: vocabulary words sampled")
    p.add_argument("--autointerp-backend", choices=["hf", "openai", "keyword"], default=JudgeConfig.backend,
                   help="autointerp judge: hf (local; default SmolLM2-135M-Instruct, very weak), openai (--autointerp-url/-model), keyword")
    p.add_argument("--autointerp-model", default=None, help="autointerp: judge model (hf folder/hub name, or the served model name)")
    p.add_argument("--autointerp-url", default=None, help="autointerp: OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--autointerp-latents", type=int, default=AutointerpConfig.n_latents, help="autointerp: latents sampled per SAE")
    p.add_argument("--device", default="cpu")
    p.add_argument("--force", action="store_true", help="recompute cached results")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def bench_main(argv: list[str] | None = None) -> BenchResult:
    """Entry point for ``saebench bench``: parse ``argv``, run, print a short table."""
    a = build_parser().parse_args(argv)
    steering = SteeringConfig(strengths=tuple(a.steer_strengths), concepts=tuple(a.steer_concepts), scope=a.steer_scope,
                              n_prompts=a.steer_prompts, max_new_tokens=a.steer_tokens)
    circuits = CircuitConfig(tasks=tuple(a.circuit_tasks), method=a.circuit_method, n_examples=a.circuit_examples)
    probing = SparseProbingConfig(datasets=tuple(a.probe_datasets), train_size=a.probe_train_size, test_size=a.probe_test_size,
                                  ks=tuple(a.probe_ks), batch_size=a.batch_size)
    absorption = AbsorptionConfig(max_words=a.absorption_words, batch_size=a.batch_size)
    res = run_bench(a.sae_dirs, a.evals, a.model, out_dir=a.out, corpus=a.corpus, eval_tokens=a.eval_tokens, dead_tokens=a.dead_tokens,
                    context_size=a.context_size, batch_size=a.batch_size, windows=a.windows, steering=steering, circuits=circuits,
                    device=a.device, force=a.force, figures=not a.no_figures, progress=not a.no_progress, sparse_probing=probing,
                    absorption=absorption, autointerp=AutointerpConfig(n_latents=a.autointerp_latents),
                    judge=JudgeConfig(a.autointerp_backend, a.autointerp_model, a.autointerp_url))
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
