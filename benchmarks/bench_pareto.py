"""Multi-seed Pareto curves of every activation method at a long budget (issue #15.2).

    # the documented run (an H100 takes ~15 min; see docs/METHODS_REPORT.md for the exact figures and machine):
    python benchmarks/bench_pareto.py --device cuda --tokens 2500000 --seeds 0 1 2 --ks 16 32 64
    # seconds, a tiny random model on the CPU (what the tests run):
    python benchmarks/bench_pareto.py --tiny --out /tmp/pareto
    # tables and figures again from the rows already measured (no model, no training):
    python benchmarks/bench_pareto.py --report-only --out benchmarks/results/pareto_2500k

Each *variant* is a method with its options and the knob that moves it along the L0 axis:

- k-variants (TopK, BatchTopK, JumpReLU in target-L0 mode, AbsTopK, vsae, Mutual/Feature Choice, ...)
  are trained at every ``--ks`` (JumpReLU's target L0 is the k);
- coefficient variants (the L1 methods, and JumpReLU's paper form with λ·L0) have no k: they are
  trained at every coefficient of their own sweep, and land wherever on the L0 axis the coefficient
  puts them. That is how they get a curve rather than a point at an arbitrary L0.

Every SAE of one seed is trained from **one pass over one activation cache** by ``train_many`` (one
data order per seed: ``data_seed = seed``), in groups (``GROUPS``: the core methods first) so that an
interruption loses at most one group's pass; finished SAEs are never retrained and an interrupted one
resumes from its checkpoint. After each group's pass its SAEs are evaluated on the same held-out tokens
(``evaluate_hook_group``: one shared clean and zero-ablated forward) and their rows are written to
``<out>/pareto_rows.json`` at once. Rows already there are skipped, so re-running the same command
resumes the grid.

The report (``pareto.{json,md}`` and ``pareto.html``) aggregates the seeds: per variant and setting, the
mean ± sample sd (n = the number of seeds) of L0, FVU, FVU without outlier tokens, ΔCE in nats (CE with
the SAE spliced in minus the clean CE; SmolLM2's zero-ablation baseline is a near-uniform output, so
CE loss recovered is squeezed and comes second), CE loss recovered, KL score and the dead fraction.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_methods as bm  # noqa: E402  (benchmarks/ is not a package)

ROOT = Path(__file__).resolve().parents[1]
ROWS_FILE = "pareto_rows.json"
REPORT_STEM = "pareto"

JUMPRELU_TARGET = bm.METHOD_OPTIONS["jumprelu"]
# name -> (method, options). k-variants are trained at every --ks.
K_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "topk": ("topk", {}),
    "batchtopk": ("batchtopk", {}),
    "jumprelu": ("jumprelu", JUMPRELU_TARGET),
    "abstopk": ("abstopk", {}),
    "vsae": ("vsae", {}),
    "vsae_learned": ("vsae", {"variance": "learned"}),
    "vsae_det": ("vsae_det", {}),
    "mutual_choice": ("mutual_choice", {}),
    "feature_choice": ("feature_choice", {}),
    "feature_choice_zipf": ("feature_choice", {"capacity": "zipf"}),
    "matryoshka_batchtopk": ("matryoshka_batchtopk", {}),
    "matching_pursuit": ("matching_pursuit", {}),
    "itda": ("itda", {}),
}
# name -> (method, options, coefficient option, the sweep). k stays at the run's middle k (unused by these methods' selection).
COEF_VARIANTS: dict[str, tuple[str, dict[str, Any], str, list[float]]] = {
    "standard": ("standard", {}, "sparsity_coef", [2.0, 5.0, 12.0, 30.0]),
    "standard_constrained": ("standard_constrained", {}, "sparsity_coef", [2.0, 5.0, 12.0, 30.0]),
    "gated": ("gated", {}, "sparsity_coef", [2.0, 5.0, 12.0, 30.0]),
    "jumprelu_paper": ("jumprelu", {"form": "paper"}, "sparsity_coef", [1e-3, 1e-2, 3e-2]),
    # top-AFA has no k: its per-token L0 follows the input's norm; the norm-matching weight is its knob.
    "top_afa": ("top_afa", {}, "afa_coef", [0.0, 1 / 16, 0.25]),
}
# Training groups, in order: each is one pass over the cache per seed. The core comparison comes first.
GROUPS: dict[str, list[str]] = {
    "core": ["topk", "batchtopk", "jumprelu", "abstopk", "vsae", "vsae_det", "mutual_choice", "feature_choice", "matryoshka_batchtopk"],
    "variants": ["vsae_learned", "feature_choice_zipf", "standard", "standard_constrained", "gated", "jumprelu_paper"],
    "slow": ["matching_pursuit", "itda", "top_afa"],
}
ALL_VARIANTS = [v for g in GROUPS.values() for v in g]
METRICS = ["l0", "fvu", "fvu_without_outliers", "delta_ce", "ce_loss_score", "kl_div_score", "dead_fraction", "train_seconds"]
TABLE = [("l0", "L0"), ("fvu_without_outliers", "FVU w/o outliers"), ("delta_ce", "ΔCE (nats)"), ("fvu", "FVU"),
         ("ce_loss_score", "CE loss recovered"), ("kl_div_score", "KL score"), ("dead_fraction", "dead fraction")]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=ALL_VARIANTS, choices=ALL_VARIANTS, metavar="VARIANT",
                   help=f"variants to run (default all: {' '.join(ALL_VARIANTS)})")
    p.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS), help="training groups to run, in this order")
    p.add_argument("--ks", nargs="+", type=int, default=[16, 32, 64], help="k (target L0) of the k-variants")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (initialisation and data order)")
    p.add_argument("--tokens", type=int, default=2_500_000, help="training tokens per SAE (= the harvest: one epoch)")
    p.add_argument("--eval-tokens", type=int, default=32_768, help="held-out tokens every SAE is evaluated on")
    p.add_argument("--expansion-factor", type=int, default=8)
    p.add_argument("--batch-size-tokens", type=int, default=4_096)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--model-batch-size", type=int, default=None, help="sequences per model forward (default 16 on cpu, 64 on cuda)")
    p.add_argument("--cache", default=None, help="activation cache folder (default <runs-dir>/activations; harvested when missing)")
    p.add_argument("--runs-dir", default="runs/pareto", help="where the SAE folders and the cache go")
    p.add_argument("--out", default="benchmarks/results/pareto", help="where the rows, the tables and the figures go")
    p.add_argument("--report-only", action="store_true", help="write the tables and figures from the rows in --out; train nothing")
    p.add_argument("--rows-from", nargs="+", default=[], metavar="DIR", help=(
        "with --report-only: also read the rows of these folders (parts of the grid run side by side, each with its own --out); "
        "the merged rows are written to --out"))
    p.add_argument("--harvest-only", action="store_true", help=(
        "fill the activation cache and stop (then several processes, one per --groups, can train from it side by side)"))
    p.add_argument("--tiny", action="store_true", help="smoke mode: a tiny random model, a few hundred tokens, seconds")
    p.add_argument("--quiet", action="store_true")
    return p


# ----------------------------------------------------------------------------------------------
# the grid
# ----------------------------------------------------------------------------------------------


def grid(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every SAE to train: key, variant, method, options, k, coefficient, seed, group."""
    mid_k = sorted(args.ks)[len(args.ks) // 2]
    out = []
    for group in args.groups:
        for seed in args.seeds:
            for v in GROUPS[group]:
                if v not in args.variants:
                    continue
                if v in K_VARIANTS:
                    method, opts = K_VARIANTS[v]
                    for k in args.ks:
                        out.append({"key": f"{v}|k{k}|s{seed}", "variant": v, "method": method, "options": dict(opts), "k": k, "coef": None,
                                    "seed": seed, "group": group, "setting": f"k={k}"})
                else:
                    method, opts, name, coefs = COEF_VARIANTS[v]
                    for c in coefs:
                        out.append({"key": f"{v}|c{c:g}|s{seed}", "variant": v, "method": method, "options": dict(opts) | {name: c}, "k": mid_k,
                                    "coef": c, "seed": seed, "group": group, "setting": f"{name}={c:g}"})
    for e in out:
        e["resolved_options"] = bm.resolved_options(e["method"], e["options"])
    return out


def stale(row: dict[str, Any]) -> bool:
    """Whether ``row`` was trained under other options than this code resolves (``bench_methods.is_stale``)."""
    return bm.is_stale(row, "options")


def _differing(row: dict[str, Any]) -> str:
    return bm.stale_reason(row, "options")


def base_settings(args: argparse.Namespace) -> dict[str, Any]:
    """TrainConfig fields shared by every SAE of the grid."""
    if args.tiny:
        base = bm.settings(argparse.Namespace(**(vars(args) | {"runs_dir": args.runs_dir, "lr": args.lr})))
        return base | {"device": args.device, "harvest_tokens": args.tokens}
    mbs = args.model_batch_size or (64 if str(args.device).startswith("cuda") else 16)
    return dict(model="smollm2-135m", hook_name="blocks.15.hook_resid_post", corpus="default", context_size=128,
                expansion_factor=args.expansion_factor, batch_size_tokens=args.batch_size_tokens, lr=args.lr,
                lr_warmup_steps=max(1, min(50, args.tokens // args.batch_size_tokens // 20)),
                dead_window_tokens=bm.dead_window(args.tokens, args.batch_size_tokens), checkpoint_every_steps=100, log_every_steps=25,
                harvest_tokens=args.tokens, model_batch_size=mbs, eval_tokens=0, device=args.device)


def train_config(base: dict[str, Any], e: dict[str, Any], args: argparse.Namespace):
    from saebench.config import TrainConfig

    cache = args.cache or str(Path(args.runs_dir) / "activations")
    return TrainConfig(**(base | {"method": e["method"], "k": e["k"], "seed": e["seed"], "training_tokens": args.tokens,
                                  "method_options": e["options"], "activation_cache": cache,
                                  "out_dir": bm.tagged_dir(Path(args.runs_dir) / "saes", e["key"].replace("|", "_"), e["resolved_options"])}))


# ----------------------------------------------------------------------------------------------
# rows
# ----------------------------------------------------------------------------------------------


def load_rows(out: Path) -> dict[str, dict[str, Any]]:
    path = out / ROWS_FILE
    return {r["key"]: r for r in json.loads(path.read_text())["rows"]} if path.is_file() else {}


def save_rows(out: Path, rows: dict[str, dict[str, Any]], meta: dict[str, Any]) -> None:
    from saebench.io import write_json

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / ROWS_FILE, {"meta": meta, "rows": list(rows.values())})


def row_of(e: dict[str, Any], m: dict[str, Any], secs: float | None, tokens: int, sae_dir: Path) -> dict[str, Any]:
    ce, clean = m.get("ce_loss_with_sae"), m.get("ce_loss_without_sae")
    return {k: e[k] for k in ("key", "variant", "method", "options", "resolved_options", "k", "coef", "seed", "group", "setting")} | {
        "l0": m["l0"], "fvu": m["fvu"], "fvu_without_outliers": m.get("fvu_without_outliers"),
        "delta_ce": ce - clean if ce is not None and clean is not None else None, "ce_loss_score": m.get("ce_loss_score"),
        "kl_div_score": m.get("kl_div_score"), "dead_fraction": m["dead_fraction"], "dead_window_tokens": m["dead_window_tokens"],
        "ce_loss_without_sae": clean, "ce_loss_with_sae": ce, "ce_loss_with_ablation": m.get("ce_loss_with_ablation"),
        "explained_variance": m["explained_variance"], "eval_tokens": m["n_tokens"], "train_tokens": tokens, "train_seconds": secs,
        "d_sae": m["d_sae"], "sae_dir": str(sae_dir)}


# ----------------------------------------------------------------------------------------------
# aggregation and the report
# ----------------------------------------------------------------------------------------------


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (variant, setting): mean and sample sd of every metric over the seeds, sorted by variant then mean L0."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["variant"], r["setting"]), []).append(r)
    out = []
    for (variant, setting), rs in groups.items():
        a = {"variant": variant, "method": rs[0]["method"], "setting": setting, "k": rs[0]["k"], "coef": rs[0]["coef"], "n": len(rs),
             "seeds": sorted(r["seed"] for r in rs)}
        for m in METRICS:
            a[m], a[f"{m}_sd"] = bm.mean_sd(r.get(m) for r in rs)
        out.append(a)
    order = {v: i for i, v in enumerate(ALL_VARIANTS)}
    return sorted(out, key=lambda a: (order.get(a["variant"], len(order)), a["l0"] if a["l0"] is not None else math.inf))


def _cell(a: dict[str, Any], m: str) -> str:
    v, sd = a.get(m), a.get(f"{m}_sd")
    if v is None:
        return "—"
    fmt = (lambda x: f"{x:.1f}") if m == "l0" else (lambda x: f"{x:.4f}") if m in ("dead_fraction", "delta_ce") else (lambda x: f"{x:.3f}")
    return fmt(v) + (f" ± {fmt(sd)}" if sd is not None else "")


def markdown(agg: list[dict[str, Any]]) -> str:
    head = "| variant | setting | n | " + " | ".join(label for _, label in TABLE) + " |"
    lines = [head, "|" + "---|" * (3 + len(TABLE))]
    for a in agg:
        lines.append(f"| {a['variant']} | {a['setting']} | {a['n']} | " + " | ".join(_cell(a, m) for m, _ in TABLE) + " |")
    return "\n".join(lines)


def against_reference(agg: list[dict[str, Any]], reference: str = "topk", metrics: tuple[str, ...] = ("delta_ce", "fvu_without_outliers")) -> str:
    """Markdown: each k-variant minus ``reference`` at the same k, with the standard error of the difference.

    se = sqrt(sd_a²/n_a + sd_b²/n_b) (Welch) where both have ≥ 2 seeds; "single seed" otherwise. A difference
    within 2 se is not a separation.
    """
    ref = {a["setting"]: a for a in agg if a["variant"] == reference}
    head = "| variant | setting | " + " | ".join(f"{dict(TABLE)[m]} − {reference} (± se)" for m in metrics) + " |"
    lines = [head, "|" + "---|" * (2 + len(metrics))]
    for a in agg:
        r = ref.get(a["setting"])
        if a["variant"] == reference or r is None or a["coef"] is not None:
            continue
        cells = []
        for m in metrics:
            if a.get(m) is None or r.get(m) is None:
                cells.append("—")
                continue
            d = a[m] - r[m]
            if a["n"] > 1 and r["n"] > 1 and a.get(f"{m}_sd") is not None and r.get(f"{m}_sd") is not None:
                se = math.sqrt(a[f"{m}_sd"] ** 2 / a["n"] + r[f"{m}_sd"] ** 2 / r["n"])
                cells.append(f"{d:+.4f} ± {se:.4f}" + (" *" if se > 0 and abs(d) > 2 * se else ""))
            else:
                cells.append(f"{d:+.4f} (single seed)")
        lines.append(f"| {a['variant']} | {a['setting']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n* : the difference exceeds 2 standard errors (negative is better for both columns)."


def write_report(out: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Path]:
    """pareto.{json,md} (seed aggregates) and pareto.html (ΔCE and FVU w/o outliers against L0, mean ± sd)."""
    from saebench.evals.plots import pareto_curves_figure, write_figures
    from saebench.io import write_json

    old, fresh = [], []
    for r in rows:
        (old if stale(r) else fresh).append(r)
    agg = aggregate(fresh)
    left_out = {r["key"]: _differing(r) for r in old}
    paths = {"json": out / f"{REPORT_STEM}.json", "md": out / f"{REPORT_STEM}.md"}
    write_json(paths["json"], {"meta": meta, "aggregates": agg, "left_out_stale": left_out})
    note = ("\n\nLeft out: rows trained under other options than this code's defaults resolve to (rerun them to include them):\n"
            + "\n".join(f"- {k}: {why}" for k, why in left_out.items())) if left_out else ""
    paths["md"].write_text(markdown(agg) + "\n\n" + against_reference(agg) + note + "\n\nMean ± sample sd over the seeds (n). "
                           + "; ".join(f"{k}: {v}" for k, v in meta.items() if k != "machine") + "\n")
    title = f"{meta.get('model')} {meta.get('hook_name')}, {meta.get('tokens'):,} tokens, seeds {meta.get('seeds')}"
    # log y: ΔCE and FVU span 0.03-7 across collapsed and good SAEs; on a linear axis the methods' differences are flat
    figs = {f"{REPORT_STEM}_delta_ce": pareto_curves_figure(agg, y="delta_ce", higher_is_better=False, log_y=True, title=f"ΔCE (nats) vs L0: {title}"),
            f"{REPORT_STEM}_fvu": pareto_curves_figure(agg, y="fvu_without_outliers", higher_is_better=False, log_y=True,
                                                       title=f"FVU without outlier tokens vs L0: {title}")}
    paths |= write_figures(figs, out)
    return paths


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Train and evaluate the missing SAEs of the grid, then write the report; return the rows."""
    args = build_parser().parse_args(argv)
    if args.tiny:
        args.tokens, args.eval_tokens, args.ks = 512, 256, [2, 4]
    out = Path(args.out)
    log = (lambda *_: None) if args.quiet else (lambda msg: print(f"[bench_pareto {time.strftime('%H:%M:%S')}] {msg}", flush=True))
    rows = load_rows(out)
    base = base_settings(args)
    meta = {"model": "tiny random llama" if args.tiny else base["model"], "hook_name": base["hook_name"], "tokens": args.tokens,
            "ks": args.ks, "seeds": args.seeds, "expansion_factor": base["expansion_factor"], "batch_size_tokens": base["batch_size_tokens"],
            "lr": base["lr"], "eval_tokens": args.eval_tokens, "device": args.device,
            "command": " ".join(["benchmarks/bench_pareto.py", *(argv if argv is not None else sys.argv[1:])]), "machine": bm.machine_info(args.device)}
    if args.report_only:
        stored = json.loads((out / ROWS_FILE).read_text())["meta"] if rows else None
        earlier = (stored.get("parts") or [str(out)]) if stored else []
        machines = dict(stored.get("machines_by_part", {})) if stored else {}
        for d in args.rows_from:
            part = load_rows(Path(d))
            if not part:
                raise SystemExit(f"no rows in {Path(d) / ROWS_FILE}")
            evals = {r["eval_tokens"] for r in [*rows.values(), *part.values()]}
            if len(evals) > 1:
                raise SystemExit(f"the rows of {d} were evaluated on another number of held-out tokens ({sorted(evals)}): they cannot share a table")
            rows |= part
            part_meta = json.loads((Path(d) / ROWS_FILE).read_text())["meta"]
            stored = stored or part_meta
            m = part_meta.get("machine") or {}
            machines[str(d)] = m.get("gpu") or part_meta.get("gpu") or m.get("platform") or part_meta.get("device")
        if not rows:
            raise SystemExit(f"no rows in {out / ROWS_FILE}: run the grid first (without --report-only)")
        if args.rows_from:
            # A merged table describes all its parts: their union of k and seeds, every part, and the machine each ran on.
            parts = [*earlier, *(d for d in args.rows_from if d not in earlier)]
            stored = {k: v for k, v in stored.items() if k not in ("command", "wall_seconds_this_run", "machine", "gpu")} | {
                "ks": sorted({r["k"] for r in rows.values() if r.get("coef") is None}), "seeds": sorted({r["seed"] for r in rows.values()}),
                "parts": parts, "machines_by_part": machines}
        save_rows(out, rows, stored)
        paths = write_report(out, list(rows.values()), stored)
        log(f"wrote {', '.join(str(p) for p in paths.values())}")
        return list(rows.values())
    entries = grid(args)
    if args.harvest_only:
        from saebench import models
        from saebench.activations import make_source

        cfg = train_config(base, entries[0], args)
        if bm.open_cache(cfg, log) is None:
            t0 = time.perf_counter()
            make_source(cfg, models.load_model(base["model"], device=args.device), progress=not args.quiet)
            log(f"harvested {args.tokens:,} tokens into {cfg.activation_cache} in {time.perf_counter() - t0:.0f} s")
        return []
    rows = bm.drop_stale(rows, log, [e["key"] for e in entries], "options")
    todo = [e for e in entries if e["key"] not in rows]
    log(f"{len(entries)} SAEs in the grid, {len(entries) - len(todo)} already measured, {len(todo)} to do")
    if todo:
        from saebench import models
        from saebench.notebook import is_trained

        model = models.load_model(base["model"], device=args.device)
        t0 = time.perf_counter()
        passes: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for e in todo:
            passes.setdefault((e["group"], e["seed"]), []).append(e)
        for (group, seed), es in passes.items():
            cfgs = {e["key"]: train_config(base, e, args) for e in es}
            need = [c for c in cfgs.values() if not is_trained(c.out_dir)]
            seconds: dict[str, float] = {}
            if need:
                source = bm.open_cache(need[0], log)
                log(f"group {group}, seed {seed}: training {len(need)} SAEs from one pass ({args.tokens:,} tokens)")
                seconds, wall = bm.train_group(need, model, source, not args.quiet)
                log(f"group {group}, seed {seed}: trained in {wall:.0f} s")
            dirs = [Path(cfgs[e["key"]].out_dir) for e in es]
            log(f"group {group}, seed {seed}: core eval of {len(dirs)} SAEs on {args.eval_tokens:,} held-out tokens")
            metrics = bm.evaluate(dirs, model, base, args.eval_tokens, not args.quiet, batch_size=base["model_batch_size"])
            for e, d, m in zip(es, dirs, metrics):
                secs = seconds.get(str(d)) or bm._logged_seconds(d)
                rows[e["key"]] = row_of(e, m, secs, args.tokens, d)
            meta["wall_seconds_this_run"] = round(time.perf_counter() - t0, 1)
            save_rows(out, rows, meta)
            log(f"group {group}, seed {seed}: {len(es)} rows written to {out / ROWS_FILE}")
    try:
        paths = write_report(out, list(rows.values()), meta)
        log(f"wrote {', '.join(str(p) for p in paths.values())}")
    except ImportError as exc:  # plotly missing (e.g. a bare GPU machine): the rows are written; make the report elsewhere with --report-only
        log(f"report skipped ({exc}); run --report-only where plotly is installed")
    if not args.quiet:
        print(markdown(aggregate([r for r in rows.values() if not stale(r)])))
    return list(rows.values())


if __name__ == "__main__":
    main()
