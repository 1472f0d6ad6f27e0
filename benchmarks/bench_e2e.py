"""Braun et al.'s axis: at equal CE loss, do ReLU + L1 end-to-end SAEs use fewer active latents than local ones?

    python benchmarks/bench_e2e.py --tiny --out /tmp/be2e --runs-dir /tmp/be2e_runs       # seconds, tiny random model
    python benchmarks/bench_e2e.py --device cuda                                          # the real run (SmolLM2-135M)
    python benchmarks/bench_e2e.py --breakdown [--device cuda]                            # where an e2e step's time goes
    python benchmarks/bench_e2e.py --loss-terms [--families e2e e2e_ds e2e_ds_norm]      # each loss term at the first step

What it trains, per seed (``--seeds``), all at the default model's ``blocks.15.hook_resid_post`` (the methods
benchmark's site), context 128, d_sae = 8·d_in, batches of 4,096 tokens, Adam lr 1e-3:

- (a) ``standard``: the local ReLU + L1 SAE (MSE + λ·Σ f‖d‖), one per coefficient of ``--coefs standard=...``;
- (b) ``e2e`` and ``e2e_ds``: the paper's ReLU + L1 SAEs trained through the frozen model (KL, plus the
  downstream MSE at Apollo's layers for e2e_ds), one per coefficient of ``--coefs e2e=... e2e_ds=...``;
  so each family has a CE-vs-L0 curve;
- (c) TopK (k = 32) local baselines: ``topk_tokens`` at the same training tokens as everyone, and
  ``topk_compute`` given the same compute as an e2e run: e2e's tokens times how many TopK steps with their
  online harvest one e2e step costs (mean of e2e and e2e_ds), timed side by side in this process right
  before it trains (``--breakdown``'s interleaved rounds; also written to ``e2e_step_breakdown.json``),
  rounded down to whole batches. Not from training clocks, which another machine or a shared GPU would skew;
- (d) opt-in (``--families e2e_topk``): the e2e objective with a TopK activation at the same k (our extension,
  ``activation="topk"``, ``sparsity_coef`` 0), at e2e's tokens. At a fixed L0 it separates what the e2e objective
  buys from what the ReLU + L1 activation costs: its ΔCE is compared with ``topk_tokens`` (same tokens) and
  ``topk_compute`` (same compute) of the same seed.

Every SAE is evaluated with the core eval (``evals/core.py``) on the same ``--eval-tokens`` held-out
tokens. delta-CE = CE with the SAE spliced in − clean CE, in nats. The verdict interpolates each curve's
log L0 linearly in delta-CE (points averaged over seeds per coefficient) and compares the families at the
e2e points' delta-CE where the local curve covers it: L0(e2e) / L0(local) < 1 everywhere = reproduced.

Resumable: a row in ``<out>/e2e_axes.json`` is skipped; a finished SAE folder is only evaluated; an
interrupted training resumes from its checkpoint (``<runs-dir>/saes/<key>``). Writes ``e2e_axes.{json,md}``
and ``e2e_ce_vs_l0.html`` into ``--out``. Every tensor follows ``--device`` (model, SAEs, batches).

``--breakdown``: times the parts of one e2e step on the model (forward to the hook, the rest of the clean
forward, the SAE, the spliced forward from the hook, the KL, the backward) next to a TopK step with its
harvest, old and new KL paths side by side in the same process; writes ``<out>/e2e_step_breakdown.json``.

``--loss-terms``: the size of each loss term (KL, sparsity, downstream) at the first training step of each e2e
family in ``--families`` at its first ``--coefs`` value: one step through the training loop (its initialisation and
activation scale), read from the run's history; writes ``<out>/e2e_loss_terms.json``. It shows whether a
family's λ can act at all: on SmolLM2, e2e_ds's raw-unit downstream MSE dwarfs its sparsity term.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_methods as bm  # noqa: E402  (benchmarks/ is not a package: the shared machine description)

RESULT_STEM = "e2e_axes"
FAMILIES = ("standard", "e2e", "e2e_ds", "e2e_ds_norm")
E2E_FAMILIES = ("e2e", "e2e_ds", "e2e_ds_norm")  # compared with the local curve
# e2e_ds_norm (opt-in, not run by default): e2e_ds with downstream_normalize, each downstream MSE an FVU. On SmolLM2 Apollo's
# raw-unit MSE is ~41,000 at the first step against a sparsity term of ~1-12 for λ 0.5-5 (--loss-terms), so e2e_ds's λ
# barely moves its L0.
FAMILY_METHOD = {"standard": ("standard", {}), "e2e": ("e2e", {}), "e2e_ds": ("e2e_ds", {}), "e2e_ds_norm": ("e2e_ds", {"downstream_normalize": True})}
DEFAULT_COEFS = {"standard": [2.0, 5.0, 12.0], "e2e": [0.5, 1.5, 5.0], "e2e_ds": [0.5, 1.5, 5.0], "e2e_ds_norm": [0.5, 1.5, 5.0]}
TINY_COEFS = {"standard": [1.0, 5.0], "e2e": [0.5, 5.0], "e2e_ds": [0.5, 5.0], "e2e_ds_norm": [0.5, 5.0]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N: the model, the SAEs and every batch live there")
    p.add_argument("--tokens", type=int, default=4_096_000, help="training tokens per SAE (default 1,000 steps of 4,096)")
    p.add_argument("--coefs", nargs="+", default=[], metavar="FAMILY=C1,C2,...", help=(
        "sparsity coefficients per family (standard's λ in Anthropic's units; e2e/e2e_ds's sparsity_coef); "
        f"default {' '.join(f'{k}=' + ','.join(map(str, v)) for k, v in DEFAULT_COEFS.items())}"))
    p.add_argument("--families", nargs="+", default=["standard", "e2e", "e2e_ds", "topk"], choices=list(FAMILIES) + ["topk", "e2e_topk"],
                   help=("families to train (default standard e2e e2e_ds topk; e2e_ds_norm is e2e_ds with each downstream MSE "
                         "normalised; e2e_topk is the e2e objective with a TopK activation at --k)"))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--eval-tokens", type=int, default=16_384, help="held-out tokens every SAE is evaluated on")
    p.add_argument("--k", type=int, default=32, help="k of the TopK baselines")
    p.add_argument("--expansion-factor", type=int, default=8)
    p.add_argument("--batch-size-tokens", type=int, default=4_096)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--hook-name", default="blocks.15.hook_resid_post")
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--max-compute-factor", type=float, default=50.0, help="cap on topk_compute's tokens, as a multiple of --tokens")
    p.add_argument("--out", default="benchmarks/results/e2e_axes")
    p.add_argument("--runs-dir", default="runs/bench_e2e")
    p.add_argument("--tiny", action="store_true", help="smoke mode: a tiny random 3-block model, a few hundred tokens, seconds")
    p.add_argument("--breakdown", action="store_true", help="time the parts of one e2e step instead (see the module docstring)")
    p.add_argument("--repeats", type=int, default=3, help="--breakdown: timed rounds (medians reported)")
    p.add_argument("--loss-terms", action="store_true", help="record each loss term at the first step of each e2e family instead")
    p.add_argument("--quiet", action="store_true")
    return p


def parse_coefs(items: list[str], tiny: bool) -> dict[str, list[float]]:
    coefs = dict(TINY_COEFS if tiny else DEFAULT_COEFS)
    for item in items:
        fam, sep, vals = item.partition("=")
        if not sep or fam not in FAMILIES:
            raise SystemExit(f"--coefs {item!r}: expected FAMILY=C1,C2,... with FAMILY one of {', '.join(FAMILIES)}")
        try:
            coefs[fam] = sorted(float(v) for v in vals.split(",") if v.strip())
        except ValueError:
            raise SystemExit(f"--coefs {item!r}: the coefficients must be numbers") from None
        if not coefs[fam] or any(c < 0 for c in coefs[fam]):
            raise SystemExit(f"--coefs {item!r}: give at least one coefficient, none negative")
    return coefs


def check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: torch sees no CUDA device here (torch {torch.__version__}); use --device cpu")
    if not (device == "cpu" or device.startswith("cuda")):
        raise SystemExit(f"--device {device!r}: expected cpu, cuda or cuda:N")


# ----------------------------------------------------------------------------------------------
# settings and the plan
# ----------------------------------------------------------------------------------------------


def base_fields(args) -> dict[str, Any]:
    """TrainConfig fields every SAE shares."""
    if args.tiny:
        return dict(model=str(tiny_model_dir(args)), hook_name="blocks.0.hook_resid_post", corpus="default", context_size=16, k=4,
                    expansion_factor=2, batch_size_tokens=64, lr=3e-3, lr_warmup_steps=1, checkpoint_every_steps=2, log_every_steps=1,
                    model_batch_size=8, shuffle_buffer_tokens=256, eval_tokens=0, device=args.device)
    steps = max(1, args.tokens // args.batch_size_tokens)
    return dict(model=args.model, hook_name=args.hook_name, corpus="default", context_size=args.context_size, k=args.k,
                expansion_factor=args.expansion_factor, batch_size_tokens=args.batch_size_tokens, lr=args.lr,
                lr_warmup_steps=max(1, min(50, steps // 20)), checkpoint_every_steps=max(10, steps // 10), log_every_steps=max(1, steps // 50),
                model_batch_size=32, eval_tokens=0, device=args.device)


def tiny_model_dir(args) -> Path:
    from saebench.models import make_tiny_model

    path = Path(args.runs_dir) / "tiny_model"
    if not (path / "config.json").is_file():
        make_tiny_model(path, n_layers=3)  # 3 blocks: e2e_ds at block 0's output has block 1 downstream (Apollo's default skips the last)
    return path


def tokens_of(args) -> int:
    return 512 if args.tiny else args.tokens


def plan(args) -> list[dict[str, Any]]:
    """Every SAE to report, in training order (topk_compute last: its budget is measured from the others)."""
    coefs = parse_coefs(args.coefs, args.tiny)
    out = []
    for seed in args.seeds:
        for fam in FAMILIES:
            if fam in args.families:
                out += [{"key": f"{fam}_c{c:g}_s{seed}", "family": fam, "method": FAMILY_METHOD[fam][0], "coef": c, "seed": seed}
                        for c in coefs[fam]]
        if "e2e_topk" in args.families:
            out.append({"key": f"e2e_topk_s{seed}", "family": "e2e_topk", "method": "e2e", "coef": None, "seed": seed})
        if "topk" in args.families:
            out.append({"key": f"topk_tokens_s{seed}", "family": "topk_tokens", "method": "topk", "coef": None, "seed": seed})
            out.append({"key": f"topk_compute_s{seed}", "family": "topk_compute", "method": "topk", "coef": None, "seed": seed})
    return out


def train_config(args, entry: dict[str, Any], tokens: int):
    from saebench.config import TrainConfig

    opts: dict[str, Any] = {}
    if entry["method"] == "standard":
        opts = {"sparsity_coef": entry["coef"]}
    elif entry["family"] == "e2e_topk":
        opts = {"activation": "topk", "sparsity_coef": 0.0}  # L0 fixed at the config's k: the objective alone differs from TopK
    elif entry["method"] in ("e2e", "e2e_ds"):
        # the paper's ReLU SAE (activation = "relu", the default), plus the family's own options
        opts = FAMILY_METHOD[entry["family"]][1] | {"sparsity_coef": entry["coef"]}
    fields = base_fields(args) | {"method": entry["method"], "training_tokens": tokens, "method_options": opts, "seed": entry["seed"],
                                  "dead_window_tokens": max(1, tokens // 5),
                                  "out_dir": bm.tagged_dir(Path(args.runs_dir) / "saes", entry["key"], bm.resolved_options(entry["method"], opts))}
    return TrainConfig(**fields)


# ----------------------------------------------------------------------------------------------
# training and evaluation of one SAE
# ----------------------------------------------------------------------------------------------


def train_one(cfg, model, progress: bool) -> dict[str, Any]:
    """Train (or resume, or find finished) ``cfg``'s SAE; return its loop clock (training seconds, steps)."""
    from saebench.notebook import is_trained
    from saebench.trainers.loop import train

    if not is_trained(cfg.out_dir):
        with torch.enable_grad():
            train(cfg, model=model, progress=progress)  # the method builds its own source (e2e: token sequences; local: online harvest)
    log = json.loads((Path(cfg.out_dir) / "training_log.json").read_text())
    return {"train_seconds": float(log["seconds"]), "steps": int(log["steps"])}


def evaluate(sae_dir: str, model, eval_tokens, special, device: str, progress: bool) -> dict[str, Any]:
    from saebench.evals.reconstruction import evaluate_hook_group
    from saebench.sae import SAE

    sae = SAE.load(sae_dir, device=device)
    return evaluate_hook_group([sae], model, eval_tokens, special_ids=special, core=True, dead=False, downstream=True, batch_size=8,
                               progress=progress)[0]["core"]


def make_row(entry, cfg, clock, m) -> dict[str, Any]:
    ce_clean, ce_sae = m.get("ce_loss_without_sae"), m.get("ce_loss_with_sae")
    return {"key": entry["key"], "family": entry["family"], "method": entry["method"], "coef": entry["coef"], "seed": entry["seed"],
            "train_tokens": cfg.training_tokens, "steps": clock["steps"], "train_seconds": clock["train_seconds"],
            "seconds_per_step": clock["train_seconds"] / max(1, clock["steps"]), "l0": m["l0"],
            "delta_ce": (ce_sae - ce_clean) if ce_clean is not None and ce_sae is not None else None,
            "ce_loss_with_sae": ce_sae, "ce_loss_without_sae": ce_clean, "ce_loss_score": m.get("ce_loss_score"),
            "kl_div_score": m.get("kl_div_score"), "fvu": m["fvu"], "fvu_without_outliers": m.get("fvu_without_outliers"),
            "dead_fraction": m["dead_fraction"], "eval_tokens": m["n_tokens"], "method_options": dict(cfg.method_options),
            "resolved_options": bm.resolved_options(cfg.method, dict(cfg.method_options)), "sae_dir": str(cfg.out_dir)}


def compute_matched_tokens(timing: dict[str, Any], args) -> tuple[int, dict[str, Any]]:
    """topk_compute's budget from a side-by-side timing (``breakdown``'s report): an e2e run's tokens times how many
    TopK steps with their harvest one e2e step costs (the mean of e2e's and e2e_ds's ratios), in whole batches.

    The ratio is measured in this process, interleaved, right before topk_compute trains, never from training clocks:
    the e2e rows may have been trained on another machine or beside other jobs (the H200 run of
    ``benchmarks/results/e2e_axes_h200`` shared its GPU with four other processes), which would skew a clock ratio.
    """
    ratios = {"e2e": timing["e2e_step_over_topk_step_with_harvest"], "e2e_ds": timing["e2e_ds_step_over_topk_step_with_harvest"]}
    ratio = statistics.mean(ratios.values())
    batch = base_fields(args)["batch_size_tokens"]
    cap = int(args.max_compute_factor * tokens_of(args))
    tokens = max(batch, min(cap, int(ratio * tokens_of(args)) // batch * batch))
    return tokens, {"e2e_over_topk_step_with_harvest": ratio, "by_family": ratios, "e2e_tokens": tokens_of(args), "capped": tokens == cap,
                    "measured": "side by side in this process (bench_e2e --breakdown's interleaved rounds)", "device": timing["device"]}


# ----------------------------------------------------------------------------------------------
# the analysis: L0 at matched delta-CE
# ----------------------------------------------------------------------------------------------


def curve(rows: list[dict], family: str) -> list[tuple[float, float, float]]:
    """(delta_ce, L0, coef) per coefficient of ``family``, averaged over seeds, sorted by delta_ce."""
    by: dict[Any, list[dict]] = {}
    for r in rows:
        if r["family"] == family and _finite(r.get("delta_ce")) and _finite(r.get("l0")) and r["l0"] > 0:
            by.setdefault(r["coef"], []).append(r)
    pts = [(statistics.mean(r["delta_ce"] for r in rs), math.exp(statistics.mean(math.log(r["l0"]) for r in rs)), c) for c, rs in by.items()]
    return sorted(pts)


def l0_at(pts: list[tuple[float, float, float]], delta_ce: float) -> float | None:
    """log-L0 interpolated linearly in delta-CE along the curve (None outside its delta-CE range)."""
    for (c0, l0a, _), (c1, l0b, _) in zip(pts, pts[1:]):
        if c0 <= delta_ce <= c1:
            t = 0.0 if c1 == c0 else (delta_ce - c0) / (c1 - c0)
            return math.exp((1 - t) * math.log(l0a) + t * math.log(l0b))
    if len(pts) == 1 and pts[0][0] == delta_ce:
        return pts[0][1]
    return None


def analyse(rows: list[dict]) -> dict[str, Any]:
    local = curve(rows, "standard")
    out: dict[str, Any] = {"curves": {f: curve(rows, f) for f in FAMILIES}, "matched": {}, "topk": {}}
    for fam in E2E_FAMILIES:
        pts = out["curves"][fam]
        if not pts and fam == "e2e_ds_norm":
            continue  # opt-in: no verdict line unless it ran
        matched = []
        for dce, l0, coef in pts:
            ref = l0_at(local, dce)
            if ref is not None:
                matched.append({"coef": coef, "delta_ce": dce, "l0": l0, "local_l0": ref, "ratio": l0 / ref})
        if not pts or not local:
            verdict = "not run"
        elif not matched:
            lo, hi = (min(p[0] for p in local), max(p[0] for p in local)) if local else (None, None)
            verdict = (f"no overlap: {fam}'s delta-CE {[round(p[0], 4) for p in pts]} lies outside the local curve's "
                       f"[{lo:.4f}, {hi:.4f}] nats; widen --coefs")
        elif all(m["ratio"] < 1 for m in matched):
            verdict = f"reproduced: {fam} uses {1 / statistics.mean(m['ratio'] for m in matched):.2f}x fewer active latents at equal CE"
        elif all(m["ratio"] > 1 for m in matched):
            verdict = f"refuted at this budget: {fam} uses {statistics.mean(m['ratio'] for m in matched):.2f}x more active latents at equal CE"
        else:
            verdict = "mixed: fewer active latents at some matched CEs, more at others"
        out["matched"][fam] = {"points": matched, "verdict": verdict}
    out["e2e_topk"] = {}
    for r in rows:
        if r["family"] == "e2e_topk" and _finite(r.get("delta_ce")):
            refs = {x["family"]: x["delta_ce"] for x in rows if x["seed"] == r["seed"] and x["family"] in ("topk_tokens", "topk_compute")
                    and _finite(x.get("delta_ce"))}
            out["e2e_topk"][r["key"]] = {"delta_ce": r["delta_ce"], "l0": r["l0"], "train_tokens": r["train_tokens"],
                                         **{f"minus_{f}": r["delta_ce"] - v for f, v in refs.items()}}
    for r in rows:
        if r["family"].startswith("topk") and _finite(r.get("delta_ce")):
            out["topk"][r["key"]] = {"delta_ce": r["delta_ce"], "l0": r["l0"], "train_tokens": r["train_tokens"],
                                     **{f"{f}_l0_at_same_ce": l0_at(out["curves"][f], r["delta_ce"]) for f in FAMILIES}}
    return out


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def markdown(rows: list[dict], analysis: dict, meta: dict) -> str:
    cols = [("key", "SAE"), ("train_tokens", "tokens"), ("l0", "L0"), ("delta_ce", "delta-CE (nats)"), ("ce_loss_score", "CE recovered"),
            ("fvu_without_outliers", "FVU w/o outliers"), ("dead_fraction", "dead"), ("seconds_per_step", "s/step")]
    lines = ["| " + " | ".join(c for _, c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for k, _ in cols:
            v = r.get(k)
            cells.append("—" if v is None else f"{v:,}" if isinstance(v, int) else f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for fam, m in analysis["matched"].items():
        lines.append(f"- **{fam} vs standard at matched delta-CE**: {m['verdict']}")
        for p in m["points"]:
            lines.append(f"  - coef {p['coef']:g}: delta-CE {p['delta_ce']:.4f}, L0 {p['l0']:.1f} vs local {p['local_l0']:.1f} (ratio {p['ratio']:.2f})")
    for key, t in analysis["topk"].items():
        others = ", ".join(f"{f} {v:.1f}" for f in FAMILIES if (v := t.get(f"{f}_l0_at_same_ce")) is not None) or "no curve covers its CE"
        lines.append(f"- **{key}** ({t['train_tokens']:,} tokens): delta-CE {t['delta_ce']:.4f} at L0 {t['l0']:.1f}; L0 of the ReLU curves there: {others}")
    for key, t in analysis.get("e2e_topk", {}).items():
        vs = "; ".join(f"{t[f'minus_{f}']:+.4f} against {f} (same {'tokens' if f == 'topk_tokens' else 'compute'})"
                       for f in ("topk_tokens", "topk_compute") if f"minus_{f}" in t) or "no local TopK baseline of its seed"
        lines.append(f"- **{key}** (e2e objective, TopK activation; {t['train_tokens']:,} tokens): delta-CE {t['delta_ce']:.4f} at L0 "
                     f"{t['l0']:.1f}; {vs} (negative: the e2e objective is more faithful at this L0)")
    lines += [""] + [f"- {k}: {v}" for k, v in meta.items()]
    return "\n".join(lines) + "\n"


def write_results(out: Path, rows: list[dict], meta: dict) -> dict[str, Path]:
    from saebench.evals.plots import pareto_figure, write_figures
    from saebench.io import write_json

    out.mkdir(parents=True, exist_ok=True)
    analysis = analyse(rows)
    write_json(out / f"{RESULT_STEM}.json", {"meta": meta, "rows": rows, "analysis": analysis})
    (out / f"{RESULT_STEM}.md").write_text(markdown(rows, analysis, meta))
    fig = pareto_figure([r | {"sae": r["key"]} for r in rows], x="l0", y="delta_ce", color_by="family", higher_is_better=False, log_y=True,
                        title=f"delta-CE (nats) vs L0: local vs end-to-end ReLU+L1 SAEs ({meta.get('model')}, {meta.get('hook_name')})")
    html = write_figures({"e2e_ce_vs_l0": fig}, out)["e2e_ce_vs_l0"]
    return {"json": out / f"{RESULT_STEM}.json", "md": out / f"{RESULT_STEM}.md", "html": html}


def load_rows(out: Path) -> dict[str, dict]:
    path = out / f"{RESULT_STEM}.json"
    return {r["key"]: r for r in json.loads(path.read_text())["rows"]} if path.is_file() else {}


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = build_parser().parse_args(argv)
    check_device(args.device)
    if args.breakdown:
        return [breakdown(args)]
    if args.loss_terms:
        return [loss_terms(args)]
    from saebench import models, text
    from saebench.evals.common import load_eval_tokens

    log = (lambda *_: None) if args.quiet else (lambda msg: print(f"[bench_e2e {time.strftime('%H:%M:%S')}] {msg}", flush=True))
    progress = not args.quiet
    out = Path(args.out)
    t0 = time.perf_counter()
    entries = plan(args)
    rows = bm.drop_stale(load_rows(out), log, (e["key"] for e in entries))
    todo = [e for e in entries if e["key"] not in rows]
    log(f"{len(entries)} SAEs, {len(entries) - len(todo)} already done, to do: {', '.join(e['key'] for e in todo) or '-'}")
    base = base_fields(args)
    meta = {"model": base["model"] if not args.tiny else "tiny random llama (3 blocks)", "hook_name": base["hook_name"],
            "context_size": base["context_size"], "expansion_factor": base["expansion_factor"], "k": base["k"],
            "batch_size_tokens": base["batch_size_tokens"], "lr": base["lr"], "tokens": tokens_of(args), "device": args.device,
            "command": " ".join(["benchmarks/bench_e2e.py", *(argv if argv is not None else sys.argv[1:])])}
    if todo:
        model = models.load_model(base["model"], device=args.device)
        n_eval = 256 if args.tiny else args.eval_tokens
        eval_tokens = load_eval_tokens(model, base["corpus"], n_eval, base["context_size"])
        special = text.special_ids(model.tokenizer)
        timing = None  # topk_compute's side-by-side step timing, measured once when it is first needed
        for e in todo:
            tokens = tokens_of(args)
            if e["family"] == "topk_compute":
                if timing is None:
                    log("timing an e2e step against a TopK step with its harvest, side by side, for topk_compute's budget")
                    timing = breakdown(argparse.Namespace(**(vars(args) | {"quiet": True})), model)
                tokens, calib = compute_matched_tokens(timing, args)
                log(f"{e['key']}: an e2e step costs {calib['e2e_over_topk_step_with_harvest']:.2f}x a TopK step with its harvest, "
                    f"so TopK gets {tokens:,} tokens for e2e's {tokens_of(args):,}")
            cfg = train_config(args, e, tokens)
            log(f"training {e['key']} ({tokens:,} tokens, {cfg.method}, options {cfg.method_options})")
            clock = train_one(cfg, model, progress)
            row = make_row(e, cfg, clock, evaluate(cfg.out_dir, model, eval_tokens, special, args.device, progress))
            if e["family"] == "topk_compute":
                row["compute_match"] = calib
            rows[e["key"]] = row
            meta_now = meta | {"machine": bm.machine_info(args.device), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                               "this_run_wall_seconds": round(time.perf_counter() - t0, 1)}
            order = {x["key"]: i for i, x in enumerate(entries)}
            write_results(out, sorted(rows.values(), key=lambda r: order.get(r["key"], len(order))), meta_now)  # after every SAE: resumable
            log(f"{e['key']}: L0 {row['l0']:.1f}, delta-CE {row['delta_ce']:.4f} nats, {row['seconds_per_step']:.3f} s/step")
    order = {x["key"]: i for i, x in enumerate(entries)}
    table = sorted(rows.values(), key=lambda r: order.get(r["key"], len(order)))
    if not todo and table:
        prev = json.loads((out / f"{RESULT_STEM}.json").read_text())["meta"]
        write_results(out, table, prev)
    if not args.quiet and table:
        print((out / f"{RESULT_STEM}.md").read_text())
    return table


def loss_terms(args) -> dict[str, Any]:
    """Each e2e family's loss terms at its first training step (through the loop), at its first coefficient."""
    import tempfile

    from saebench import models
    from saebench.trainers.loop import train

    coefs = parse_coefs(args.coefs, args.tiny)
    model = models.load_model(base_fields(args)["model"], device=args.device)
    batch = base_fields(args)["batch_size_tokens"]
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as runs:
        for fam in (f for f in E2E_FAMILIES if f in args.families):
            e = {"key": fam, "family": fam, "method": FAMILY_METHOD[fam][0], "coef": coefs[fam][0], "seed": args.seeds[0]}
            cfg = train_config(argparse.Namespace(**(vars(args) | {"runs_dir": runs})), e, batch)
            rec = train(cfg.model_copy(update={"log_every_steps": 1}), model=model, progress=False).history[0]
            out[fam] = {"coef": e["coef"], "method_options": dict(cfg.method_options), "l0": rec["l0"],
                        **{k.removeprefix("loss/"): v for k, v in rec.items() if k.startswith("loss/")}}
    report = {"model": base_fields(args)["model"], "hook": base_fields(args)["hook_name"], "tokens": batch, "terms": out,
              "machine": bm.machine_info(args.device), "command": " ".join(["benchmarks/bench_e2e.py", *sys.argv[1:]])}
    path = Path(args.out) / "e2e_loss_terms.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    if not args.quiet:
        for fam, t in out.items():
            print(f"{fam:<12} " + "  ".join(f"{k} {v:.4g}" for k, v in t.items() if isinstance(v, float)))
        print(f"wrote {path}")
    return report


# ----------------------------------------------------------------------------------------------
# --breakdown: where an e2e step's time goes
# ----------------------------------------------------------------------------------------------


def breakdown(args, model=None) -> dict[str, Any]:
    """Time the parts of one e2e training step and a TopK step with its harvest, interleaved rounds, medians.

    Parts (each timed alone; a round runs every variant once, so load from other processes hits all alike):
    ``prefix`` the forward to the hook (no grad); ``clean_full`` the whole clean forward with the downstream
    hooks (no grad, what the step runs); ``clean_rest`` the clean forward resumed at the hook (no grad);
    ``sae`` the SAE's own forward and backward (encode, select, decode, its share of the gradient);
    ``spliced_forward`` the forward resumed at the hook with grad (to the logits); ``kl`` the KL on given
    logits; ``spliced_backward`` = (spliced forward + KL + backward) − spliced_forward − kl; and the whole
    step (method.step + backward) of e2e (and e2e_ds), next to a TopK step alone and with its harvest.
    """
    from saebench import models
    from saebench.config import TrainConfig
    from saebench.models import resume_forward
    from saebench.sae import SAE
    from saebench.trainers import get_method
    from saebench.trainers.base import StepInput
    from saebench.models import unembedding
    from saebench.trainers.e2e import kl_clean_to_spliced, kl_from_residuals

    base = base_fields(args)
    dev = args.device
    n_seq = max(1, base["batch_size_tokens"] // base["context_size"])
    model = model if model is not None else models.load_model(base["model"], device=dev)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(100, min(40_000, model.cfg.d_vocab), (n_seq, base["context_size"]), generator=gen)
    tokens[:, 0] = model.tokenizer.bos_token_id
    tokens = tokens.to(dev)

    def method_and_sae(name: str, opts: dict):
        cfg = TrainConfig(**(base | {"method": name, "training_tokens": base["batch_size_tokens"] * 1000, "method_options": opts}))
        m = get_method(name)(cfg)
        if getattr(m, "needs_model", False):
            m.attach_model(model)
        sae = SAE(m.sae_config(model.cfg.d_model)).to(dev)
        sae.init_tied(torch.Generator().manual_seed(0))
        return m, sae

    e2e, sae = method_and_sae("e2e", {})
    e2e_ds, sae_ds = method_and_sae("e2e_ds", {})
    e2e_plain, sae_plain = method_and_sae("e2e", {})
    e2e_plain.fast_path = False  # the step before the fast path: whole clean forward to the logits, KL on full logits
    e2e_ds_plain, sae_ds_plain = method_and_sae("e2e_ds", {})
    e2e_ds_plain.fast_path = False
    topk, sae_topk = method_and_sae("topk", {"auxk_coef": 0.0})
    site = e2e.site
    with torch.no_grad():
        logits_clean, _, x_clean = e2e.run(tokens)
    x = x_clean.reshape(-1, x_clean.shape[-1]).to(sae.dtype)
    rest = resume_forward(model, site.hook)
    if rest is None:
        raise SystemExit(f"--breakdown needs a model whose forward resumes at {site.hook} (Llama-family residual hook)")

    def step_input(m):
        return StepInput(x=torch.zeros(1, device=dev), dead_mask=None, step=0, token_ids=tokens)

    def prefix():
        with torch.no_grad():
            model.run_with_hooks(tokens, fwd_hooks=[], stop_at_layer=site.stop_layer)

    def clean_full():
        with torch.no_grad():
            e2e.run(tokens)

    def clean_rest():
        with torch.no_grad():
            rest(x_clean)

    def sae_part():
        out = super(type(e2e), e2e).step(sae, StepInput(x=x, dead_mask=None, step=0))
        (out.x_hat.sum() + out.acts.values.abs().sum()).backward()
        sae.zero_grad(set_to_none=True)

    def spliced_forward():
        with torch.enable_grad():
            rest(x_clean.clone().requires_grad_(True))

    logits_new = rest(x_clean + 0.01)

    def kl():
        with torch.no_grad():
            kl_clean_to_spliced(logits_clean, logits_new).mean()

    def spliced_all():
        h = x_clean.clone().requires_grad_(True)
        kl_clean_to_spliced(logits_clean, rest(h)).mean().backward()

    def full(m, s):
        with torch.enable_grad():
            m.step(s, step_input(m)).loss.backward()  # the first step decides the resume (plain path); later ones are timed
        s.zero_grad(set_to_none=True)

        def fn():
            with torch.enable_grad():
                m.step(s, step_input(m)).loss.backward()
            s.zero_grad(set_to_none=True)
        return fn

    def topk_step():
        out = topk.step(sae_topk, StepInput(x=x, dead_mask=None, step=0))
        out.loss.backward()
        sae_topk.zero_grad(set_to_none=True)

    def topk_with_harvest():
        prefix()
        topk_step()

    def fast_kl_all():
        h = x_clean.clone().requires_grad_(True)
        hid, _ = rest_hidden(h)
        kl_from_residuals(hid_clean, hid, *unembedding(model)).mean().backward()

    rest_hidden = resume_forward(model, site.hook, record=[], head=False)
    with torch.no_grad():
        hid_clean, _ = rest_hidden(x_clean)
    fns = {"prefix": prefix, "clean_full": clean_full, "clean_rest": clean_rest, "sae": sae_part, "spliced_forward": spliced_forward,
           "kl": kl, "spliced_forward_kl_backward": spliced_all, "spliced_forward_chunked_kl_backward": fast_kl_all,
           "e2e_step_plain": full(e2e_plain, sae_plain), "e2e_step": full(e2e, sae),
           "e2e_ds_step_plain": full(e2e_ds_plain, sae_ds_plain), "e2e_ds_step": full(e2e_ds, sae_ds),
           "topk_step": topk_step, "topk_step_with_harvest": topk_with_harvest}
    res = bm.timed_interleaved(fns, args.repeats, dev)
    med = {k: statistics.median(v) for k, v in res.items()}
    med["spliced_backward"] = med["spliced_forward_kl_backward"] - med["spliced_forward"] - med["kl"]
    # Per-round ratios, then the median: robust to load that shifts between rounds.
    ratio = {k: statistics.median(a / b for a, b in zip(res[k], res[ref])) for k, ref in
             [("e2e_step", "e2e_step_plain"), ("e2e_ds_step", "e2e_ds_step_plain"),
              ("spliced_forward_chunked_kl_backward", "spliced_forward_kl_backward")]}
    peak = {}
    if dev.startswith("cuda"):
        for k in ("e2e_step_plain", "e2e_step"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fns[k]()
            torch.cuda.synchronize()
            peak[k] = (torch.cuda.max_memory_allocated() - before) / 2**20
    report = {"model": base["model"], "hook": site.hook, "tokens_per_step": int(tokens.numel()), "device": bm.machine_info(dev), "repeats": args.repeats,
              "median_seconds": med, "all_seconds": res, "fast_over_plain": ratio, "cuda_peak_MB_above_resident": peak or None,
              "e2e_step_over_topk_step": med["e2e_step"] / med["topk_step"],
              "e2e_step_over_topk_step_with_harvest": med["e2e_step"] / med["topk_step_with_harvest"],
              "e2e_ds_step_over_topk_step_with_harvest": med["e2e_ds_step"] / med["topk_step_with_harvest"],
              "e2e_step_plain_over_topk_step": med["e2e_step_plain"] / med["topk_step"],
              "command": " ".join(["benchmarks/bench_e2e.py", *sys.argv[1:]])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "e2e_step_breakdown.json").write_text(json.dumps(report, indent=2))
    if not args.quiet:
        for k in ("prefix", "clean_full", "clean_rest", "sae", "spliced_forward", "kl", "spliced_backward", "spliced_forward_kl_backward",
                  "spliced_forward_chunked_kl_backward", "e2e_step_plain", "e2e_step", "e2e_ds_step_plain", "e2e_ds_step",
                  "topk_step", "topk_step_with_harvest"):
            print(f"{k:<38}{med[k]:>9.3f} s   {med[k] / med['e2e_step_plain']:>6.1%} of a plain e2e step")
        print("fast / plain (median of per-round ratios): " + ", ".join(f"{k} {v:.3f}" for k, v in ratio.items()))
        if peak:
            print("CUDA peak MB above resident: " + ", ".join(f"{k} {v:.0f}" for k, v in peak.items()))
        print(f"e2e step = {report['e2e_step_over_topk_step']:.1f}x a TopK step, {report['e2e_step_over_topk_step_with_harvest']:.2f}x a TopK "
              f"step with its harvest; wrote {out / 'e2e_step_breakdown.json'}")
    return report


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    main()
