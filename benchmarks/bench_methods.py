"""Every training method on the same data, at the same budget and target L0, scored by the core eval.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_methods.py                 # the documented run
    .venv/bin/python benchmarks/bench_methods.py --tiny --out /tmp/bm              # seconds, tiny random model
    .venv/bin/python benchmarks/bench_methods.py --methods topk jumprelu --force    # redo two rows

What it does:

- **Activation methods** (everything except ``gsae``/``e2e``/``e2e_ds``) are trained together by the
  library's ``train_many`` from one pass over the activation cache of the default model at
  ``blocks.15.hook_resid_post`` (``--cache``, default ``runs/demo/activations``, the cache
  ``configs/demo.toml`` harvests). The cache is opened as it is when it is complete and was written for
  these settings (model, hook, corpus, context, special-token and outlier rules); otherwise the loop
  harvests (or finishes harvesting) it first.
- **Model methods** get their own sources from ``Method.make_source``: ``gsae`` harvests activations
  *with* ∇ₓ of the LM loss online (same corpus, same token order), ``e2e``/``e2e_ds`` read whole token
  sequences and run the model every step. They cost 4-6x a harvest per token on a CPU, so they may be
  given a smaller budget (``--model-tokens``); a TopK trained from the cache at that same budget is
  then added as their equal-budget reference (row ``topk@<tokens>``).
- Every SAE has d_sae = 8·d_in, k = 32 (BatchTopK/Mutual Choice/Feature Choice spend the same k·B per
  batch, JumpReLU runs in target-L0 mode at 32, AbsTopK per token; the ReLU e2e SAEs have no k, so
  their L0 is whatever their L1 coefficient gives) and the same optimiser, schedule and batch size.
- All SAEs are evaluated on the same held-out tokens with the core metrics of ``evals/core.py``
  (``CoreAccumulator`` via ``evals.reconstruction.evaluate_hook_group``, which shares the clean
  forward and the zero-ablation terms between SAEs and computes exactly ``evaluate_core``'s numbers).
- Training time per SAE is the time spent in its own steps (``trainers.loop._train_step``, timed here),
  so SAEs trained together in one pass are not charged for each other; the shared data reading is
  reported once (``data_seconds``). tokens/s = training tokens / training seconds.

Resumable: a method whose row is in ``<out>/methods_comparison.json`` is skipped (``--force`` redoes
it); a finished SAE folder is evaluated without retraining; an interrupted training resumes from its
checkpoint. Writes ``methods_comparison.{json,csv,md}`` and ``methods_ce_vs_l0.html`` (and ``.png`` if
kaleido is installed) into ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
ALL_METHODS = ["topk", "batchtopk", "mutual_choice", "jumprelu", "abstopk", "vsae", "vsae_det", "feature_choice",
               "standard", "standard_constrained", "gated", "matryoshka_batchtopk", "matching_pursuit", "top_afa", "itda",
               "gsae", "e2e", "e2e_ds"]
MODEL_METHODS = ("gsae", "e2e", "e2e_ds")  # sources of their own (gradients / token sequences)
# Options that put each method at the common target L0 (k); everything else is the method's default.
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    # c = 1 as dictionary_learning's target-L0 form; θ starts at the target L0 (a constant θ₀ = 0.1 cannot reach it in 60 steps).
    "jumprelu": {"sparsity_mode": "target_l0", "sparsity_coef": 1.0, "theta_init_mode": "quantile"},
    # The paper's ReLU + L1 e2e SAEs have no k: their L0 is whatever the L1 term reaches (thousands after 60 steps from the tied
    # init). The TopK form keeps their losses (KL, and the downstream MSE for e2e_ds) at the common k.
    "e2e": {"activation": "topk", "sparsity_coef": 0.0},
    "e2e_ds": {"activation": "topk", "sparsity_coef": 0.0},
}
TABLE_COLUMNS = [("method", "method"), ("train_tokens", "training tokens"), ("l0", "L0"), ("fvu", "FVU"),
                 ("fvu_without_outliers", "FVU w/o outlier tokens"), ("ce_loss_score", "CE loss recovered"),
                 ("kl_div_score", "KL score"), ("dead_fraction", "dead fraction"), ("train_seconds", "training time (s)"),
                 ("tokens_per_second", "tokens/s")]
RESULT_STEM = "methods_comparison"
FIGURE_STEM = "methods_ce_vs_l0"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=ALL_METHODS, choices=ALL_METHODS, metavar="METHOD", help=f"methods to run (default all: {' '.join(ALL_METHODS)})")
    p.add_argument("--tokens", type=int, default=245_760, help="training tokens per activation method (default 60 steps of 4,096)")
    p.add_argument("--model-tokens", type=int, default=None, help="training tokens for gsae/e2e/e2e_ds (default --tokens); a TopK at this budget is added as their reference when it differs")
    p.add_argument("--eval-tokens", type=int, default=8_192, help="held-out tokens every SAE is evaluated on")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--expansion-factor", type=int, default=8)
    p.add_argument("--batch-size-tokens", type=int, default=4_096)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--cache", default="runs/demo/activations", help="activation cache of the default model at the hook (configs/demo.toml's)")
    p.add_argument("--harvest-tokens", type=int, default=250_000, help="the cache's harvest size (must match the cache: configs/demo.toml's)")
    p.add_argument("--runs-dir", default="runs/bench_methods", help="where the SAE folders go")
    p.add_argument("--out", default="benchmarks/results", help="where the table and the figure go")
    p.add_argument("--force", action="store_true", help="redo the named methods even if their rows exist (their SAEs are retrained)")
    p.add_argument("--tiny", action="store_true", help="smoke mode: a tiny random model, a few hundred tokens, seconds")
    p.add_argument("--reeval", action="store_true", help=(
        "evaluate the named methods' trained SAEs again (e.g. after the core eval gained a metric), keeping their rows' training "
        "times; nothing already trained is retrained"))
    p.add_argument("--train-only", action="store_true", help="train the SAEs that are missing and stop (a later run evaluates them): lets a second process train the model methods alongside")
    p.add_argument("--import-rows", nargs="+", default=[], metavar="JSON", help=(
        "rows from other runs' methods_comparison.json (e.g. parts run side by side on a busy machine, each with its own --out) "
        "to put in this table; they must have been evaluated on as many held-out tokens"))
    p.add_argument("--quiet", action="store_true")
    return p


# ----------------------------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------------------------


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """TrainConfig fields shared by every SAE (method, budget, out_dir and cache set per SAE)."""
    if args.tiny:
        return dict(model=str(_tiny_model_dir(args)), hook_name="blocks.0.hook_resid_post", corpus="default", context_size=16, k=4, expansion_factor=2,
                    batch_size_tokens=128, lr=args.lr, lr_warmup_steps=1, dead_window_tokens=dead_window(512, 128), checkpoint_every_steps=2,
                    log_every_steps=1,
                    harvest_tokens=1_024, model_batch_size=8, eval_tokens=0, seed=0)
    return dict(model="smollm2-135m", hook_name="blocks.15.hook_resid_post", corpus="default", context_size=128, k=args.k,
                expansion_factor=args.expansion_factor, batch_size_tokens=args.batch_size_tokens, lr=args.lr,
                lr_warmup_steps=max(1, min(10, args.tokens // args.batch_size_tokens // 5)),
                dead_window_tokens=dead_window(args.tokens, args.batch_size_tokens), checkpoint_every_steps=10, log_every_steps=5, harvest_tokens=args.harvest_tokens,
                model_batch_size=16, eval_tokens=0, seed=0)


def dead_window(tokens: int, batch: int) -> int:
    """The dead-latent window of a benchmark run: a fifth of its tokens (at least one batch).

    A latent is dead (AuxK, the Zipf loss's dead branch) after ``dead_window_tokens`` without firing. A window
    as long as the run (this benchmark's setting until issue #15.1) can never be reached: a latent that
    last fired at step 0 has gone ``tokens - batch`` tokens without firing by the last step, so AuxK never
    fired. A fifth of a 60-step run is 12 steps (49,152 tokens at batch 4,096).
    """
    return max(batch, tokens // 5)


def _tiny_model_dir(args) -> Path:
    from saebench.models import make_tiny_model

    path = Path(args.runs_dir) / "tiny_model"
    if not (path / "config.json").is_file():
        make_tiny_model(path, n_layers=3)  # 3 blocks: e2e_ds at blocks.0's output has block 1 downstream (Apollo's default skips the last)
    return path


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One entry per SAE to report: key, method, budget, and whether it reads the cache."""
    tokens = args.tokens if not args.tiny else 512
    model_tokens = args.model_tokens or tokens if not args.tiny else 256
    out = [{"key": m, "method": m, "tokens": model_tokens if m in MODEL_METHODS else tokens, "cached": m not in MODEL_METHODS} for m in args.methods]
    if model_tokens != tokens and any(m in MODEL_METHODS for m in args.methods):
        out.append({"key": f"topk@{model_tokens}", "method": "topk", "tokens": model_tokens, "cached": True, "reference_for": list(MODEL_METHODS)})
    return out


def train_config(base: dict[str, Any], entry: dict[str, Any], args: argparse.Namespace):
    from saebench.config import TrainConfig

    fields = base | {"method": entry["method"], "training_tokens": entry["tokens"], "method_options": METHOD_OPTIONS.get(entry["method"], {}),
                     "out_dir": tagged_dir(Path(args.runs_dir) / "saes", entry["key"].replace("@", "_at_"),
                                           resolved_options(entry["method"], METHOD_OPTIONS.get(entry["method"], {})))}
    if entry["cached"]:
        fields["activation_cache"] = str(Path(args.runs_dir) / "tiny_cache") if args.tiny else args.cache
    return TrainConfig(**fields)


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------


class StepTimer:
    """Times each SAE's own steps inside ``train_many`` (wraps ``trainers.loop._train_step``)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __enter__(self):
        import saebench.trainers.loop as loop

        self._loop, self._orig = loop, loop._train_step

        def timed(r, *a, **kw):
            t = time.perf_counter()
            try:
                return self._orig(r, *a, **kw)
            finally:
                self.seconds[str(r.cfg.out_dir)] = self.seconds.get(str(r.cfg.out_dir), 0.0) + time.perf_counter() - t

        loop._train_step = timed
        return self

    def __exit__(self, *exc):
        self._loop._train_step = self._orig


def open_cache(cfg, log) -> Any:
    """The activation cache as it is, if complete and written for ``cfg``'s data settings; None otherwise (the loop then harvests)."""
    from saebench.activations import CachedSource

    index = Path(cfg.activation_cache) / "cache.json"
    if not index.is_file():
        log(f"no activation cache at {cfg.activation_cache}: the loop will harvest it")
        return None
    info = json.loads(index.read_text())
    prov = info.get("provenance", {})
    want = {"model": cfg.model, "corpus": cfg.corpus, "context_size": cfg.context_size, "exclude_special_tokens": cfg.exclude_special_tokens,
            "outlier_norm_factor": cfg.outlier_norm_factor, "with_grads": False}
    wrong = {k: (prov.get(k), v) for k, v in want.items() if prov.get(k) != v}
    if info.get("hook_names") != [cfg.hook_name]:
        wrong["hook_names"] = (info.get("hook_names"), [cfg.hook_name])
    if wrong:
        raise SystemExit(f"activation cache {cfg.activation_cache} was written for other settings ({wrong}: cache vs wanted); "
                         "pass another --cache folder")
    if not info.get("complete"):
        log(f"activation cache {cfg.activation_cache} is incomplete ({len(info.get('shards', {}))}/{info.get('n_chunks')} shards): "
            "the loop finishes the harvest first")
        return None
    src = CachedSource(cfg.activation_cache)
    log(f"activation cache accepted as it is: {cfg.activation_cache}, {src.n_tokens:,} tokens in {src.n_chunks} shards, no harvest")
    return src


def train_group(cfgs, model, source, progress: bool) -> tuple[dict[str, float], float]:
    """Train ``cfgs`` with ``train_many``; return (training seconds per out_dir, wall seconds)."""
    from saebench.trainers.loop import train_many

    t = time.perf_counter()
    with StepTimer() as timer, torch.enable_grad():
        train_many(cfgs, source=source, model=model, progress=progress)
    return timer.seconds, time.perf_counter() - t


# ----------------------------------------------------------------------------------------------
# evaluation and the table
# ----------------------------------------------------------------------------------------------


def evaluate(dirs: list[Path], model, base: dict[str, Any], eval_tokens: int, progress: bool, batch_size: int = 8) -> list[dict[str, Any]]:
    """Core metrics of every SAE in ``dirs`` on the same held-out tokens (one shared clean/zero pass), on the model's device."""
    from saebench.evals.common import load_eval_tokens, special_ids_of
    from saebench.evals.reconstruction import evaluate_hook_group
    from saebench.sae import SAE

    tokens = load_eval_tokens(model, base["corpus"], eval_tokens, base["context_size"])
    saes = [SAE.load(d, device=model.cfg.device) for d in dirs]
    res = evaluate_hook_group(saes, model, tokens, special_ids=special_ids_of(model.tokenizer), core=True, dead=False, downstream=True,
                              batch_size=batch_size, progress=progress)
    return [r["core"] for r in res]


def load_rows(out: Path) -> dict[str, dict[str, Any]]:
    path = out / f"{RESULT_STEM}.json"
    if not path.is_file():
        return {}
    return {r["key"]: r for r in json.loads(path.read_text()).get("rows", [])}


def write_results(out: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Path]:
    """methods_comparison.{json,csv,md} and the CE-recovered-vs-L0 figure (HTML; PNG when kaleido is there)."""
    from saebench.evals.plots import pareto_figure, write_figures
    from saebench.io import write_json

    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{RESULT_STEM}.json", "csv": out / f"{RESULT_STEM}.csv", "md": out / f"{RESULT_STEM}.md"}
    write_json(paths["json"], {"meta": meta, "rows": rows})
    keys = ["key"] + [k for k, _ in TABLE_COLUMNS] + ["explained_variance", "cossim", "ce_loss_without_sae", "ce_loss_with_sae", "ce_loss_with_ablation",
                                                      "architecture", "d_sae", "eval_tokens", "sae_dir"]
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    paths["md"].write_text(markdown_table(rows) + "\n\n" + _meta_lines(meta) + "\n")
    fig = pareto_figure([r | {"sae": r["key"], "method": r["key"]} for r in rows], x="l0", y="ce_loss_score", color_by="method",
                        title=f"CE loss recovered vs L0 ({meta.get('model')}, {meta.get('hook_name')}, k = {meta.get('k')})")
    paths |= {"html": write_figures({FIGURE_STEM: fig}, out)[FIGURE_STEM]}
    try:
        import kaleido  # noqa: F401

        fig.write_image(str(out / f"{FIGURE_STEM}.png"))
        paths["png"] = out / f"{FIGURE_STEM}.png"
    except Exception:  # kaleido missing (or unable to start): the HTML is the figure
        pass
    return paths


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(label for _, label in TABLE_COLUMNS) + " |"
    lines = [head, "|" + "---|" * len(TABLE_COLUMNS)]
    for r in rows:
        cells = []
        for k, _ in TABLE_COLUMNS:
            v = r["key"] if k == "method" else r.get(k)
            cells.append(_fmt(k, v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(key: str, v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if key in ("train_seconds", "tokens_per_second"):
            return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"
        return f"{v:.1f}" if key == "l0" else f"{v:.3f}" if key != "dead_fraction" else f"{v:.4f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _meta_lines(meta: dict[str, Any]) -> str:
    return "\n".join(f"- {k}: {v}" for k, v in meta.items())


def mean_sd(values) -> tuple[float | None, float | None]:
    """Mean and sample sd over the seeds of the finite values (None skipped); sd None with fewer than 2, both None with none."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def resolved_options(method: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every option of ``method`` as this code resolves ``options`` (its defaults filled in), JSON-ready.

    Stored with each benchmark row and compared on resume and in reports: a row trained under other defaults (e.g. a
    warm start added since) is not taken for this code's, so a default change reruns its cells instead of leaving
    stale figures in a table.
    """
    from saebench.trainers import get_method

    return json.loads(get_method(method).Options(**(options or {})).model_dump_json())


def options_tag(resolved: dict[str, Any]) -> str:
    """8 hex digits naming one resolved option set (an SAE folder suffix: a folder trained under other defaults is not reused)."""
    import hashlib

    return hashlib.sha1(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:8]


def is_stale(row: dict[str, Any], options_field: str = "method_options", current: dict[str, Any] | None = None) -> bool:
    """Whether ``row`` was trained under other options than this code resolves its method and options to (a default
    changed since). ``current``: the resolution to compare with (default: the row's own method and ``options_field``).
    Rows from before resolved options were recorded are taken as they are."""
    if "resolved_options" not in row:
        return False
    if current is None:
        try:
            current = resolved_options(row["method"], row.get(options_field))
        except (KeyError, ValueError):  # a method or an option this code no longer has
            return True
    return row["resolved_options"] != current


def stale_reason(row: dict[str, Any], options_field: str = "method_options") -> str:
    """The options on which ``row``'s record differs from this code's resolution, as "name stored -> now"."""
    try:
        now = resolved_options(row["method"], row.get(options_field))
    except (KeyError, ValueError) as exc:
        return f"not resolvable now ({exc})"
    old = row["resolved_options"]
    return ", ".join(f"{k} {old.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(old) | set(now)) if old.get(k) != now.get(k))


def drop_stale(rows: dict[str, dict[str, Any]], log, keys, options_field: str = "method_options") -> dict[str, dict[str, Any]]:
    """``rows`` without the stale ones among ``keys`` (the SAEs this run would train; logged with the differing options):
    a resumed run retrains those. Rows outside ``keys`` are kept as they are: a run never deletes what it will not redo."""
    keys = set(keys)
    old = [k for k, r in rows.items() if k in keys and is_stale(r, options_field)]
    if old:
        log(f"{len(old)} rows were trained under other options than this code's defaults resolve to; retraining them: "
            + "; ".join(f"{k} ({stale_reason(rows[k], options_field)})" for k in old))
    return {k: r for k, r in rows.items() if k not in old}


def tagged_dir(root: Path | str, name: str, resolved: dict[str, Any]) -> str:
    """An SAE folder named by the SAE's name and its resolved options, so a folder trained under other defaults is never reused."""
    return str(Path(root) / f"{name}_{options_tag(resolved)}")


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """The machine a benchmark ran on (shared by the benchmark scripts): platform, CPUs, threads, torch, load, device (and GPU)."""
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": sys.version.split()[0], "loadavg_1_5_15": [round(x, 2) for x in load] if load else None, "device": str(device)}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def sync(device: str) -> None:
    """Wait for the device's queued work (CUDA); nothing on CPU."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed_interleaved(fns: dict, repeats: int, device: str = "cpu") -> dict[str, list[float]]:
    """Seconds of each variant per round (shared by the benchmark scripts): one warm-up call each, then ``repeats``
    rounds that run every variant once, so load from other processes hits all alike; CUDA is synchronised around each call."""
    for fn in fns.values():
        fn()
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            out[name].append(time.perf_counter() - t)
    return out


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark; return the table's rows (one per method, plus the reference TopK if any)."""
    args = build_parser().parse_args(argv)
    from saebench import models
    from saebench.notebook import is_trained

    t_start = time.perf_counter()
    log = (lambda *_: None) if args.quiet else (lambda msg: print(f"[bench_methods {time.strftime('%H:%M:%S')}] {msg}", flush=True))
    progress = not args.quiet
    out = Path(args.out)
    base = settings(args)
    entries = plan(args)
    rows = drop_stale(load_rows(out), log, (e["key"] for e in entries))
    for path in args.import_rows:
        for key, r in load_rows(Path(path).parent if Path(path).suffix == ".json" else Path(path)).items():
            if r.get("eval_tokens") is not None and rows and any(x.get("eval_tokens") not in (None, r["eval_tokens"]) for x in rows.values()):
                raise SystemExit(f"row {key} of {path} was evaluated on {r['eval_tokens']} tokens, the table's rows on a different number")
            rows.setdefault(key, r | {"imported_from": str(path)})
    if args.force and args.reeval:
        raise SystemExit("--force retrains and --reeval keeps the training: give one of them")
    named = {e["key"] for e in entries}
    previous = {k: v for k, v in rows.items() if k in named} if args.reeval else {}
    if args.force or args.reeval:
        rows = {k: v for k, v in rows.items() if k not in named}
    todo = [e for e in entries if e["key"] not in rows]
    log(f"{len(entries)} SAEs, {len(entries) - len(todo)} already in the table, {len(todo)} to do: {', '.join(e['key'] for e in todo) or '-'}")
    model = models.load_model(base["model"]) if todo else None
    cfgs = {e["key"]: train_config(base, e, args) for e in todo}
    if args.force:
        cfgs = {k: c.model_copy(update={"resume": False}) for k, c in cfgs.items()}
    need = {k: c for k, c in cfgs.items() if args.force or not is_trained(c.out_dir)}
    seconds: dict[str, float] = {}
    data_seconds: dict[str, float] = {}
    # 1. Everything that reads the activation cache: one train_many pass.
    cached = [need[e["key"]] for e in todo if e["cached"] and e["key"] in need]
    if cached:
        source = open_cache(cached[0], log)
        log(f"training {len(cached)} SAEs from one pass over the cache: {', '.join(c.method for c in cached)}")
        per, wall = train_group(cached, model, source, progress)
        seconds |= per
        data_seconds["cache_pass"] = wall - sum(per.values())
    # 2. The methods with sources of their own, one at a time (each source is built by its method).
    for e in todo:
        c = need.get(e["key"])
        if c is None or e["cached"]:
            continue
        log(f"training {e['key']} from its own source ({c.training_tokens:,} tokens)")
        per, wall = train_group([c], model, None, progress)
        seconds |= per
        data_seconds[e["key"]] = wall - sum(per.values())
    if args.train_only:
        log(f"trained {', '.join(need) or 'nothing'} (--train-only: no evaluation, no table)")
        return []
    # 3. One evaluation pass over every SAE that has no row yet.
    if todo:
        dirs = [Path(cfgs[e["key"]].out_dir) for e in todo]
        log(f"core eval of {len(dirs)} SAEs on {args.eval_tokens if not args.tiny else 256:,} held-out tokens")
        metrics = evaluate(dirs, model, base, args.eval_tokens if not args.tiny else 256, progress)
        for e, d, m in zip(todo, dirs, metrics):
            before = previous.get(e["key"], {})
            secs = seconds.get(str(d), before.get("train_seconds"))
            if secs is None:  # trained by an earlier, interrupted run of this script: its own training log
                secs = _logged_seconds(d)
            rows[e["key"]] = {
                "key": e["key"], "method": e["method"], "train_tokens": e["tokens"], "l0": m["l0"], "fvu": m["fvu"], "fvu_without_outliers": m.get("fvu_without_outliers"),
                "n_outlier_tokens": m.get("n_outlier_tokens"), "ce_loss_score": m.get("ce_loss_score"),
                "kl_div_score": m.get("kl_div_score"), "dead_fraction": m["dead_fraction"], "train_seconds": secs,
                "tokens_per_second": e["tokens"] / secs if secs else None, "explained_variance": m["explained_variance"], "cossim": m["cossim"],
                "ce_loss_without_sae": m.get("ce_loss_without_sae"), "ce_loss_with_sae": m.get("ce_loss_with_sae"),
                "ce_loss_with_ablation": m.get("ce_loss_with_ablation"), "architecture": m["architecture"], "d_sae": m["d_sae"],
                "eval_tokens": m["n_tokens"], "dead_window_tokens": m["dead_window_tokens"], "method_options": METHOD_OPTIONS.get(e["method"], {}),
                "resolved_options": resolved_options(e["method"], METHOD_OPTIONS.get(e["method"], {})), "sae_dir": str(d), "source_seconds": data_seconds.get(e["key"], before.get("source_seconds")),
            }
    order = {e["key"]: i for i, e in enumerate(plan(argparse.Namespace(**(vars(args) | {"methods": ALL_METHODS}))))}
    table = sorted(rows.values(), key=lambda r: order.get(r["key"], len(order)))
    meta = {"model": base["model"] if not args.tiny else "tiny random llama", "hook_name": base["hook_name"], "k": base["k"],
            "expansion_factor": base["expansion_factor"], "batch_size_tokens": base["batch_size_tokens"], "lr": base["lr"],
            "activation_cache": args.cache if not args.tiny else "(tiny)", "command": " ".join(["benchmarks/bench_methods.py", *(argv if argv is not None else sys.argv[1:])]),
            "this_run_wall_seconds": round(time.perf_counter() - t_start, 1), "cache_pass_data_seconds": data_seconds.get("cache_pass"),
            "machine": machine_info(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    paths = write_results(out, table, meta)
    log(f"wrote {', '.join(str(p) for p in paths.values())} in {meta['this_run_wall_seconds']:.0f} s")
    if not args.quiet:
        print(markdown_table(table))
    return table


def _logged_seconds(sae_dir: Path) -> float | None:
    """Training seconds from an SAE folder's training log (None when it has none)."""
    from saebench.folders import read_training_log

    secs = read_training_log(sae_dir, missing_ok=True).get("seconds")
    return float(secs) if secs is not None else None


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    main()
