"""g-SAE's β sweep against TopK: plain and gradient-aware selection at eval, and the spliced-loss gap (issue #15.5).

    .venv/bin/python benchmarks/bench_gsae.py --tiny --out /tmp/bg --runs-dir /tmp/bg_runs      # seconds, tiny random model
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_gsae.py --tokens 100000 --eval-tokens 8192 --out benchmarks/results/gsae_cpu_100k
    .venv/bin/python benchmarks/bench_gsae.py --device cuda --tokens 2500000 --seeds 0 1 2 --eval-tokens 65536 --out benchmarks/results/gsae

What it does, per seed:

- **Training.** g-SAEs at β ∈ ``--betas`` (default 0.1, 1, 10) and a TopK reference, same k, width,
  lr, schedule, seed and batches: the library's ``train_many`` trains the four from one gradient harvest
  (the default model at ``blocks.15.hook_resid_post``, ∇ₓ of the LM loss harvested with the
  activations; TopK ignores the gradients), so every SAE sees the same tokens in the same order.
- **Evaluation** on the same held-out tokens (``--eval-tokens``) with the core eval
  (``evals/core.py``): every SAE with its inference rule (*plain*: activation-only TopK), and every
  g-SAE again with ``selection="gradient"`` (its training rule, with g = ∇ₓ of the LM loss from the
  eval's clean forward; ``evals/gsae.py``). Metrics: L0, FVU, FVU without outlier tokens, CE with the
  SAE spliced in, ΔCE = CE_SAE − CE_clean (nats), CE loss recovered, KL(p_clean ‖ p_SAE), KL score.
- **Spliced-loss gap** (METHODS.md §6, "fall back to plain TopK and report the gap"): per g-SAE,
  ΔCE(plain) − ΔCE(gradient-aware) in nats per token (> 0: the fall-back costs that much), and the
  same for mean per-token |ΔCE| and for KL (``evals.gsae.spliced_loss_gap``).

With several ``--seeds`` the table shows mean ± sd (sample sd over seeds) per SAE; the JSON has every
seed's row. Resumable: a (SAE, seed) row already in ``<out>/gsae.json`` is not redone (``--force``
redoes the seeds named); a finished SAE folder (``<runs-dir>/saes/<name>_seed<s>``) is evaluated
without retraining, an interrupted one resumes from its checkpoint. Every tensor follows ``--device``
(model, SAEs, harvest and eval); timings are each SAE's own training steps plus the harvest
(``harvest_seconds``: the group's wall time minus its SAEs' steps, i.e. the LM forward + backward).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_methods as bm  # noqa: E402  (benchmarks/ is not a package: the shared machine description)

RESULT_STEM = "gsae"
METRICS = ("l0", "fvu", "fvu_without_outliers", "ce_loss_with_sae", "delta_ce", "ce_loss_abs_diff", "ce_loss_score", "kl_div_with_sae",
           "kl_div_score", "dead_fraction")
GAP_KEYS = ("spliced_loss_gap", "abs_spliced_loss_gap", "kl_gap")
TABLE = [("l0", "L0", ".1f"), ("fvu", "FVU", ".4f"), ("fvu_without_outliers", "FVU w/o outliers", ".4f"), ("delta_ce", "ΔCE (nats)", ".4f"),
         ("ce_loss_with_sae", "CE with SAE", ".4f"), ("ce_loss_score", "CE loss recovered", ".4f"), ("kl_div_with_sae", "KL", ".4f"),
         ("dead_fraction", "dead", ".4f")]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the model, the SAEs, the harvest and the eval run")
    p.add_argument("--tokens", type=int, default=2_500_000, help="training tokens per SAE")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--betas", type=float, nargs="+", default=[0.1, 1.0, 10.0], help="g-SAE β values (g at unit RMS per token)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="several seeds: mean ± sd in the table")
    p.add_argument("--eval-tokens", type=int, default=65_536, help="held-out tokens every SAE is evaluated on (both selections)")
    p.add_argument("--expansion-factor", type=int, default=8)
    p.add_argument("--batch-size-tokens", type=int, default=4_096)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--hook", default="blocks.15.hook_resid_post")
    p.add_argument("--corpus", default="default")
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--model-batch-size", type=int, default=None, help="sequences per harvest forward (default 16 on cpu, 64 on cuda)")
    p.add_argument("--eval-batch-size", type=int, default=None, help="sequences per eval forward (default 8 on cpu, 32 on cuda)")
    p.add_argument("--out", default="benchmarks/results/gsae", help="folder for gsae.json and gsae.md")
    p.add_argument("--runs-dir", default="runs/bench_gsae", help="where the SAE folders go")
    p.add_argument("--force", action="store_true", help="redo the named seeds: retrain their SAEs and re-evaluate")
    p.add_argument("--tiny", action="store_true", help="smoke mode: a tiny random model, a few hundred tokens, seconds")
    p.add_argument("--quiet", action="store_true")
    return p


def sae_names(betas: list[float]) -> list[str]:
    return ["topk"] + [f"gsae_beta{b:g}" for b in betas]


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """TrainConfig fields shared by every SAE (method, options, seed and out_dir set per SAE)."""
    cuda = args.device == "cuda"
    if args.tiny:
        from saebench.models import make_tiny_model

        path = Path(args.runs_dir) / "tiny_model"
        if not (path / "config.json").is_file():
            make_tiny_model(path)
        return {"model": str(path), "hook_name": "blocks.0.hook_resid_post", "corpus": args.corpus, "context_size": 16, "k": 4, "expansion_factor": 2,
                    "training_tokens": 512, "batch_size_tokens": 128, "lr": args.lr, "lr_warmup_steps": 1, "dead_window_tokens": 128,
                    "checkpoint_every_steps": 2, "log_every_steps": 1, "model_batch_size": 8, "eval_tokens": 0, "device": args.device}
    steps = max(1, args.tokens // args.batch_size_tokens)
    return {"model": args.model, "hook_name": args.hook, "corpus": args.corpus, "context_size": args.context_size, "k": args.k,
                "expansion_factor": args.expansion_factor, "training_tokens": args.tokens, "batch_size_tokens": args.batch_size_tokens, "lr": args.lr,
                "lr_warmup_steps": max(1, min(100, steps // 20)),
                # A fifth of the run (bench_methods.dead_window): a window as long as the run never lets AuxK fire.
                "dead_window_tokens": max(args.batch_size_tokens, args.tokens // 5),
                "checkpoint_every_steps": max(10, steps // 10), "log_every_steps": max(1, steps // 100),
                "model_batch_size": args.model_batch_size or (64 if cuda else 16), "eval_tokens": 0, "device": args.device}


def train_config(base: dict[str, Any], name: str, seed: int, args: argparse.Namespace):
    from saebench.config import TrainConfig

    if name == "topk":
        method, opts = "topk", {}
    else:
        method, opts = "gsae", {"beta": float(name.removeprefix("gsae_beta"))}
    return TrainConfig(**base, method=method, method_options=opts, seed=seed,
                       out_dir=bm.tagged_dir(Path(args.runs_dir) / "saes", f"{name}_seed{seed}", bm.resolved_options(method, opts)))


class StepTimer:
    """Times each SAE's own steps inside ``train_many`` (wraps ``trainers.loop._train_step``), synchronising
    CUDA before and after each step so that the GPU's queued work is charged to the step that queued it."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __enter__(self):
        from saebench.trainers import loop

        self._loop, self._orig = loop, loop._train_step

        def timed(r, *a, **kw):
            _sync()
            t = time.perf_counter()
            try:
                return self._orig(r, *a, **kw)
            finally:
                _sync()
                self.seconds[str(r.cfg.out_dir)] = self.seconds.get(str(r.cfg.out_dir), 0.0) + time.perf_counter() - t

        loop._train_step = timed
        return self

    def __exit__(self, *exc):
        self._loop._train_step = self._orig


def train(cfgs: list, model, progress: bool) -> tuple[dict[str, float], float]:
    """Train ``cfgs`` together (one gradient harvest); (own training seconds per out_dir, harvest seconds)."""
    from saebench.trainers.loop import train_many

    t = time.perf_counter()
    with StepTimer() as timer, torch.enable_grad():
        train_many(cfgs, source=None, model=model, progress=progress)
    _sync()
    wall = time.perf_counter() - t
    return timer.seconds, wall - sum(timer.seconds.values())


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def evaluate(dirs: dict[str, Path], model, base: dict[str, Any], eval_tokens: int, batch_size: int, device: str,
             progress: bool) -> dict[str, dict[str, Any]]:
    """Per SAE name: ``plain`` core metrics, and for g-SAEs ``gradient`` metrics and the spliced-loss ``gap``."""
    from saebench.evals.common import load_eval_tokens, special_ids_of
    from saebench.evals.core import evaluate_hook_group
    from saebench.evals.gsae import spliced_loss_gap

    from saebench.sae import SAE

    tokens = load_eval_tokens(model, base["corpus"], eval_tokens, base["context_size"])
    special = special_ids_of(model.tokenizer)
    names = list(dirs)
    saes = [SAE.load(dirs[n], device=device) for n in names]
    out: dict[str, dict[str, Any]] = {}
    t = time.perf_counter()
    plain = evaluate_hook_group(saes, model, tokens, special_ids=special, core=True, downstream=True, batch_size=batch_size, progress=progress)
    _sync()
    plain_s = time.perf_counter() - t
    for n, r in zip(names, plain):
        out[n] = {"plain": _metrics(r["core"])}
    g_names = [n for n in names if n != "topk"]
    if g_names:
        t = time.perf_counter()
        grad = evaluate_hook_group([saes[names.index(n)] for n in g_names], model, tokens, special_ids=special, core=True, downstream=True,
                                   batch_size=batch_size, progress=progress, selection="gradient")
        _sync()
        grad_s = time.perf_counter() - t
        for n, r in zip(g_names, grad):
            out[n]["gradient"] = _metrics(r["core"])
            out[n]["gap"] = spliced_loss_gap(plain[names.index(n)]["core"], r["core"])
            out[n]["eval_seconds_gradient_pass"] = grad_s
    for n in names:
        out[n]["eval_seconds_plain_pass"] = plain_s
        out[n]["eval_tokens"] = plain[names.index(n)]["core"]["n_tokens"]
    return out


def _metrics(core: dict[str, Any]) -> dict[str, Any]:
    m = {k: core.get(k) for k in METRICS if k != "delta_ce"}
    m["delta_ce"] = core["ce_loss_with_sae"] - core["ce_loss_without_sae"]
    m["ce_loss_without_sae"] = core["ce_loss_without_sae"]
    m["ce_loss_with_ablation"] = core["ce_loss_with_ablation"]
    return m


# ----------------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------------


def load_rows(out: Path) -> dict[str, dict[str, Any]]:
    path = out / f"{RESULT_STEM}.json"
    if not path.is_file():
        return {}
    return {r["key"]: r for r in json.loads(path.read_text()).get("rows", [])}


def earlier_runs(out: Path) -> list[dict[str, Any]]:
    """The runs that wrote ``<out>/gsae.json`` before this one (their command, machine, date and wall time), oldest first.

    A resumed or extended sweep (e.g. ``--seeds 1 2`` after ``--seeds 0``) keeps the earlier rows; this keeps the record of
    how they were made, which the new run's ``command`` would otherwise replace.
    """
    path = out / f"{RESULT_STEM}.json"
    if not path.is_file():
        return []
    meta = json.loads(path.read_text()).get("meta", {})
    if not meta:
        return []
    prev = {k: v for k, v in meta.items() if k != "earlier_runs"}
    return [*meta.get("earlier_runs", []), prev]


def _cell(values: list[float], fmt: str) -> str:
    m, sd = bm.mean_sd(values)
    if m is None:
        return "—"
    return f"{m:{fmt}}" + (f" ± {sd:{fmt}}" if sd is not None else "")


def summarise(rows: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """One entry per (SAE, selection): metric -> list over seeds (and the gaps per g-SAE)."""
    out = []
    for n in names:
        rs = [r for r in rows if r["name"] == n]
        if not rs:
            continue
        for sel in ("plain", "gradient"):
            if sel not in rs[0]:
                continue
            out.append({"name": n, "selection": sel, "seeds": [r["seed"] for r in rs],
                        **{k: [r[sel].get(k) for r in rs] for k in METRICS}})
        if "gap" in rs[0]:
            out[-1]["gap"] = {k: [r["gap"][k] for r in rs] for k in GAP_KEYS}
            # Paired by seed (same tokens, init seed and batches): the g-SAE's ΔCE minus the TopK reference's.
            ref = {r["seed"]: r["plain"]["delta_ce"] for r in rows if r["name"] == "topk"}
            out[-1]["vs_topk"] = {sel: [r[sel]["delta_ce"] - ref[r["seed"]] for r in rs if r["seed"] in ref] for sel in ("plain", "gradient")}
    return out


def markdown(rows: list[dict[str, Any]], names: list[str], meta: dict[str, Any]) -> str:
    summ = summarise(rows, names)
    n_seeds = max((len(s["seeds"]) for s in summ), default=0)
    title = (f"## g-SAE vs TopK ({meta['model']}, {meta['hook_name']}, k = {meta['k']}, d_sae = {meta['expansion_factor']}·d_in, "
             f"{meta['training_tokens']:,} training tokens, {meta['eval_tokens']:,} eval tokens, "
             f"{n_seeds} seed{'s' if n_seeds != 1 else ''}{': mean ± sd' if n_seeds > 1 else ''})")
    lines = [title, "",
             "| SAE | selection | " + " | ".join(lbl for _, lbl, _ in TABLE) + " |", "|---|---|" + "---|" * len(TABLE)]
    for s in summ:
        lines.append(f"| {s['name']} | {s['selection']} | " + " | ".join(_cell(s[k], f) for k, _, f in TABLE) + " |")
    lines += ["", "### Spliced-loss gap (METHODS.md §6): plain TopK inference minus gradient-aware inference, per g-SAE", "",
              ("| g-SAE | ΔCE plain (nats) | ΔCE gradient (nats) | gap ΔCE (nats) | gap mean per-token abs ΔCE | gap KL "
               "| ΔCE plain − ΔCE TopK | ΔCE gradient − ΔCE TopK |"), "|---|---|---|---|---|---|---|---|"]
    for s in summ:
        if "gap" in s:
            plain = next(p for p in summ if p["name"] == s["name"] and p["selection"] == "plain")
            lines.append(f"| {s['name']} | {_cell(plain['delta_ce'], '.4f')} | {_cell(s['delta_ce'], '.4f')} | "
                         f"{_cell(s['gap']['spliced_loss_gap'], '.4f')} | {_cell(s['gap']['abs_spliced_loss_gap'], '.4f')} | "
                         f"{_cell(s['gap']['kl_gap'], '.4f')} | {_cell(s['vs_topk']['plain'], '.4f')} | "
                         f"{_cell(s['vs_topk']['gradient'], '.4f')} |")
    note = ("ΔCE = CE with the SAE spliced in − clean CE (L(x̂) − L(x), nats per predicted token). Gap > 0: gradient-aware "
            "selection (the g-SAE's training rule, g = ∇ₓ LM loss from the eval's clean forward) is more faithful than the plain "
            "TopK fall-back. TopK is evaluated plain only (gradient selection is the g-SAE's rule). The last two columns are "
            "paired by seed: < 0 means the g-SAE is more faithful than the TopK reference at the same k (the paper's headline).")
    lines += ["", note, "",
              "### Cost", "", "| seed | harvest (LM fwd+bwd) s | " + " | ".join(f"{n} train s" for n in names) + " |",
              "|---|---|" + "---|" * len(names)]
    for seed in sorted({r["seed"] for r in rows}):
        rs = {r["name"]: r for r in rows if r["seed"] == seed}
        h = next((r.get("harvest_seconds") for r in rs.values() if r.get("harvest_seconds") is not None), None)
        lines.append(f"| {seed} | {_num(h)} | " + " | ".join(_num(rs.get(n, {}).get("train_seconds")) for n in names) + " |")
    lines += ["", *(f"- {k}: {v}" for k, v in meta.items() if k not in ("machine", "earlier_runs")), f"- machine: {meta.get('machine')}"]
    lines += [f"- earlier run ({h.get('date')}, {h.get('device')}): {h.get('command')}" for h in meta.get("earlier_runs", [])]
    return "\n".join(lines) + "\n"


def _num(v) -> str:
    return "—" if v is None else f"{v:,.1f}"


def figure(rows: list[dict[str, Any]], names: list[str], meta: dict[str, Any]):
    """Each g-SAE's ΔCE minus TopK's (paired by seed, mean ± sd) against β, one line per selection, and the zero line (TopK)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    summ = [s for s in summarise(rows, names) if "vs_topk" in s]
    for sel, dash in (("plain", "solid"), ("gradient", "dash")):
        pts = [(float(s["name"].removeprefix("gsae_beta")), *bm.mean_sd(s["vs_topk"][sel])) for s in summ]
        pts = sorted(p for p in pts if p[1] is not None)
        fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers", name=f"{sel} selection",
                                 line=dict(dash=dash), error_y=dict(type="data", array=[p[2] or 0.0 for p in pts], visible=True)))
    fig.add_hline(y=0, line=dict(color="black", dash="dot"), annotation_text="TopK (same seed)")
    n = len({r["seed"] for r in rows})
    fig.update_layout(title=(f"g-SAE minus TopK, ΔCE at k = {meta.get('k')} ({meta.get('model')}, {meta.get('training_tokens', 0):,} tokens, "
                             f"{n} seed{'s' if n != 1 else ''}: mean ± sd)"),
                      xaxis_title="β (g-SAE's gradient weight)", yaxis_title="ΔCE − TopK's ΔCE (nats; < 0: more faithful than TopK)",
                      template="plotly_white")
    fig.update_xaxes(type="log")
    return fig


def write_results(out: Path, rows: list[dict[str, Any]], names: list[str], meta: dict[str, Any]) -> dict[str, Path]:
    from saebench.io import write_json

    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{RESULT_STEM}.json", "md": out / f"{RESULT_STEM}.md"}
    write_json(paths["json"], {"meta": meta, "summary": summarise(rows, names), "rows": rows})
    paths["md"].write_text(markdown(rows, names, meta))
    try:
        from saebench.evals.plots import write_figures
    except ImportError:  # plotly missing (a bare GPU machine): the tables are written; the figure with plotly elsewhere
        return paths
    if any(r["name"] != "topk" for r in rows):
        paths["html"] = write_figures({"gsae_vs_topk": figure(rows, names, meta)}, out)["gsae_vs_topk"]
    return paths


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the sweep; return every (SAE, seed) row."""
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here")
    from saebench import models
    from saebench.notebook import is_trained

    t_start = time.perf_counter()
    log = (lambda *_: None) if args.quiet else (lambda msg: print(f"[bench_gsae {time.strftime('%H:%M:%S')}] {msg}", flush=True))
    progress = not args.quiet
    out = Path(args.out)
    base = settings(args)
    names = sae_names(args.betas)
    eval_tokens = 256 if args.tiny else args.eval_tokens
    eval_bs = args.eval_batch_size or (32 if args.device == "cuda" else 8)
    rows = bm.drop_stale(load_rows(out), log, (f"{n}/seed{seed}" for n in names for seed in args.seeds))
    history = earlier_runs(out)
    if rows:
        old = next(iter(rows.values()))
        if old.get("train_tokens") != base["training_tokens"] or old.get("eval_tokens_requested") != eval_tokens:
            raise SystemExit(f"{out / (RESULT_STEM + '.json')} holds rows of another budget (training {old.get('train_tokens')}, eval "
                             f"{old.get('eval_tokens_requested')} tokens); give another --out")
    if args.force:
        rows = {k: v for k, v in rows.items() if v["seed"] not in args.seeds}
    model = None
    for seed in args.seeds:
        todo = [n for n in names if f"{n}/seed{seed}" not in rows]
        if not todo:
            log(f"seed {seed}: every row is in the table")
            continue
        if model is None:
            model = models.load_model(base["model"], device=args.device)
        cfgs = {n: train_config(base, n, seed, args) for n in todo}
        if args.force:
            cfgs = {n: c.model_copy(update={"resume": False}) for n, c in cfgs.items()}
        need = [c for c in cfgs.values() if args.force or not is_trained(c.out_dir)]
        seconds, harvest_s = {}, None
        if need:
            log(f"seed {seed}: training {', '.join(Path(c.out_dir).name for c in need)} from one gradient harvest "
                f"({base['training_tokens']:,} tokens, {args.device})")
            seconds, harvest_s = train(need, model, progress)
        log(f"seed {seed}: evaluating {', '.join(todo)} on {eval_tokens:,} held-out tokens (plain, and gradient-aware for g-SAEs)")
        res = evaluate({n: Path(cfgs[n].out_dir) for n in todo}, model, base, eval_tokens, eval_bs, args.device, progress)
        for n in todo:
            d = Path(cfgs[n].out_dir)
            secs = seconds.get(str(d))
            rows[f"{n}/seed{seed}"] = {"key": f"{n}/seed{seed}", "name": n, "seed": seed, "method": cfgs[n].method,
                                      "method_options": dict(cfgs[n].method_options),
                                      "resolved_options": bm.resolved_options(cfgs[n].method, dict(cfgs[n].method_options)), "train_tokens": base["training_tokens"],
                                      "eval_tokens_requested": eval_tokens, "train_seconds": secs if secs is not None else bm._logged_seconds(d),
                                      "harvest_seconds": harvest_s, "sae_dir": str(d), **res[n]}
        write_results(out, _ordered(rows, names), names, _meta(args, base, eval_tokens, t_start, argv, history))  # after every seed: resumable
    table = _ordered(rows, names)
    paths = write_results(out, table, names, _meta(args, base, eval_tokens, t_start, argv, history))
    log(f"wrote {', '.join(map(str, paths.values()))} in {time.perf_counter() - t_start:.0f} s")
    if not args.quiet:
        print(paths["md"].read_text())
    return table


def _ordered(rows: dict[str, dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    order = {n: i for i, n in enumerate(names)}
    return sorted(rows.values(), key=lambda r: (order.get(r["name"], len(order)), r["seed"]))


def _meta(args, base, eval_tokens, t_start, argv, history: list[dict[str, Any]]) -> dict[str, Any]:
    return {"model": base["model"] if not args.tiny else "tiny random llama", "hook_name": base["hook_name"], "k": base["k"],
            "expansion_factor": base["expansion_factor"], "training_tokens": base["training_tokens"], "batch_size_tokens": base["batch_size_tokens"],
            "lr": base["lr"], "context_size": base["context_size"], "corpus": base["corpus"], "eval_tokens": eval_tokens, "betas": args.betas,
            "device": args.device, "command": " ".join(["benchmarks/bench_gsae.py", *(argv if argv is not None else sys.argv[1:])]),
            "this_run_wall_seconds": round(time.perf_counter() - t_start, 1), "machine": bm.machine_info(args.device),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "earlier_runs": history}


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    main()
