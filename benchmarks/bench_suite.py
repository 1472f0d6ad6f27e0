"""The whole eval suite (``saebench bench``) on SAEs trained on the default model: wall time per eval and per SAE.

1. Trains the SAEs if they are not there yet (``runs/bench_suite/<method>``): TopK and BatchTopK,
   4,608 latents, k = 32, at ``blocks.15.hook_resid_post`` of SmolLM2-135M, from the demo's
   activation cache (``runs/demo/activations``, ``configs/demo.toml``'s model, hook, corpus, context
   and harvest size, so the cache is reused, or completed where a harvest was interrupted, never
   re-harvested). Quality is secondary here: a short run (``--training-tokens``).
2. Loads the model once and runs ``evals.bench.run_bench`` over all of them with every eval the
   runner offers (core, dead, steering, circuits, compat), ``force=True`` so nothing comes from the
   cache; the runner's own timings (``BenchResult.timings``: model load, tokens, each job, and each
   SAE's share) are the figures reported.
3. Shared-pass savings: the same core + dead evals once per SAE alone (one run_bench per SAE), against
   the shared pass of step 2 (one clean forward and the zero-ablation terms per batch for all SAEs
   at the hook, then one spliced forward per SAE).

Writes benchmarks/results/bench_suite.json and bench_suite.md.

    OMP_NUM_THREADS=1 python benchmarks/bench_suite.py [--eval-tokens 16384 --threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def train_saes(args) -> dict[str, dict]:
    """Train the SAEs that are not there yet (one activation stream feeds all of them); return what was done per method."""
    from saebench.trainers.loop import train_many

    from saebench.notebook import is_trained
    from saebench.config import TrainConfig

    cfgs, info = [], {}
    for m in args.methods:
        out = Path(args.run_dir) / m
        if is_trained(out):
            info[m] = {"sae_dir": str(out), "trained_now": False}
            continue
        cfgs.append(TrainConfig(
            # The demo's data fields (configs/demo.toml), so the same activation cache is found and reused.
            model="smollm2-135m", hook_name="blocks.15.hook_resid_post", corpus="default", context_size=128,
            activation_cache=str(args.cache), harvest_tokens=250_000,
            method=m, k=args.k, d_sae=args.d_sae, training_tokens=args.training_tokens, batch_size_tokens=4096, lr=1e-3,
            lr_warmup_steps=5, dead_window_tokens=args.training_tokens, checkpoint_every_steps=10, out_dir=str(out), eval_tokens=0,
        ))
    if cfgs:
        t = time.time()
        results = train_many(cfgs, progress=not args.no_progress)
        secs = time.time() - t
        for c, r in zip(cfgs, results):
            info[c.method] = {"sae_dir": c.out_dir, "trained_now": True, "steps": r.steps, "train_loop_seconds": r.seconds,
                              "train_many_wall_seconds_all": secs, "training_tokens": c.training_tokens}
    return info


def shared_vs_alone(sae_dirs: list[str], args, model, kw: dict) -> dict | None:
    """core + dead for all SAEs in one shared pass vs one SAE at a time, alternating, ``--shared-rounds`` rounds; medians."""
    import statistics

    from saebench.evals.bench import run_bench

    pair = [e for e in ("core", "dead") if e in args.evals]
    if not pair:
        return None
    shared, alone, loads = [], {Path(d).name: [] for d in sae_dirs}, []
    for r in range(args.shared_rounds):
        loads.append(os.getloadavg())
        tm = run_bench(sae_dirs, pair, model, out_dir=Path(args.run_dir) / "bench_shared", figures=False, **kw).timings
        shared.append(sum(j["seconds"] for j in tm["jobs"]))
        for d in sae_dirs:
            tm = run_bench([d], pair, model, out_dir=Path(args.run_dir) / "bench_alone" / Path(d).name, figures=False, **kw).timings
            alone[Path(d).name].append(sum(j["seconds"] for j in tm["jobs"]))
        print(f"round {r}: shared {shared[-1]:.1f} s, alone " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in alone.items()), flush=True)
    out = {"evals": pair, "rounds": args.shared_rounds, "eval_tokens": args.eval_tokens, "shared_seconds_all": shared,
           "alone_seconds_all": alone, "load_average_per_round": loads,
           "shared_pass_seconds": statistics.median(shared),
           "per_sae_alone_seconds": {k: statistics.median(v) for k, v in alone.items()}}
    out["sum_alone_seconds"] = sum(out["per_sae_alone_seconds"].values())
    out["saved_fraction"] = 1 - out["shared_pass_seconds"] / out["sum_alone_seconds"]
    out["speedup"] = out["sum_alone_seconds"] / out["shared_pass_seconds"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", default=["topk", "batchtopk"])
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--training-tokens", type=int, default=163_840, help="40 steps of 4,096 tokens")
    ap.add_argument("--run-dir", default=str(ROOT / "runs" / "bench_suite"))
    ap.add_argument("--cache", default=str(ROOT / "runs" / "demo" / "activations"), help="the demo's activation cache")
    ap.add_argument("--evals", nargs="+", default=["core", "dead", "steering", "circuits", "compat"])
    ap.add_argument("--eval-tokens", type=int, default=16_384, help="core and dead-latent tokens")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per model forward in the shared pass")
    ap.add_argument("--steer-prompts", type=int, default=4, help="steering prompts (SteeringConfig default 8)")
    ap.add_argument("--steer-strengths", type=float, nargs="+", default=[1.0, 4.0], help="(default config: 0.5 1 2 4 8)")
    ap.add_argument("--steer-tokens", type=int, default=16, help="new tokens per steered generation (default config 24)")
    ap.add_argument("--steer-max-act-tokens", type=int, default=4096, help="tokens for the latent's max activation (default config 16,384)")
    ap.add_argument("--circuit-examples", type=int, default=16, help="IOI prompt pairs (CircuitConfig default 32)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-separate", action="store_true", help="skip the per-SAE core+dead runs (shared-pass savings)")
    ap.add_argument("--shared-rounds", type=int, default=2, help="alternating rounds of shared pass vs one SAE at a time")
    ap.add_argument("--shared-only", action="store_true",
                    help="rerun only the shared-pass comparison and merge it into the existing --out file")
    ap.add_argument("--train-only", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results" / "bench_suite.json"))
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from saebench.evals.bench import run_bench

    from saebench import models

    load_before = os.getloadavg()
    training = train_saes(args)
    if args.train_only:
        print(json.dumps(training, indent=2))
        return
    sae_dirs = [training[m]["sae_dir"] for m in args.methods]

    t = time.time()
    model = models.load_model("smollm2-135m")
    model_load_s = time.time() - t
    kw = {"eval_tokens": args.eval_tokens, "batch_size": args.batch_size, "force": True, "progress": not args.no_progress}
    if args.shared_only:
        out = Path(args.out)
        report = json.loads(out.read_text())
        report["shared_pass"] = shared_vs_alone(sae_dirs, args, model, kw)
        report["shared_pass_command"] = " ".join([Path(sys.executable).name, *sys.argv])
        out.write_text(json.dumps(report, indent=2, default=str))
        out.with_suffix(".md").write_text(markdown(report))
        print(markdown(report))
        return

    load_suite = os.getloadavg()
    t = time.time()
    from saebench.evals.circuits import CircuitConfig
    from saebench.evals.steering import SteeringConfig

    steering = SteeringConfig(n_prompts=args.steer_prompts, strengths=tuple(args.steer_strengths), max_new_tokens=args.steer_tokens,
                              max_act_tokens=args.steer_max_act_tokens)
    circuits = CircuitConfig(n_examples=args.circuit_examples)
    suite = run_bench(sae_dirs, args.evals, model, out_dir=Path(args.run_dir) / "bench", steering=steering, circuits=circuits, **kw)
    suite_wall = time.time() - t
    print(f"suite: {suite_wall:.1f} s wall")

    separate = None if args.no_separate else shared_vs_alone(sae_dirs, args, model, kw)
    per_sae = {}
    for row in suite.rows:
        per_sae[row["sae"]] = {k: row[k] for k in row if k.startswith("seconds")}
    headline = {r["sae"]: {k: r.get(k) for k in ("l0", "fvu", "explained_variance", "ce_loss_score", "kl_div_score", "dead_fraction",
                                                   "dead_window_tokens", "steering_score", "circuit_nodes_f80[ioi]", "saebench_compatible")}
                for r in suite.rows}
    report = {
        "what": "saebench bench (evals/bench.run_bench) over SAEs trained on SmolLM2-135M blocks.15.hook_resid_post; force=True (no cached results)",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "threads": args.threads, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "load_average": {"before_training": load_before, "before_suite": load_suite, "end": os.getloadavg()},
        "settings": {"evals": args.evals, "eval_tokens": args.eval_tokens, "batch_size": args.batch_size,
                     "steering": steering.to_dict(), "circuits": circuits.to_dict()},
        "saes": training, "model_load_seconds": model_load_s, "suite_wall_seconds": suite_wall,
        "runner_timings": suite.timings, "per_sae_seconds": per_sae, "metrics": headline, "shared_pass": separate,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out} and {out.with_suffix('.md')}")


STEER_KEYS = ("concepts", "strengths", "n_prompts", "max_new_tokens", "max_act_tokens", "neutral_tokens")
CIRCUIT_KEYS = ("tasks", "method", "ig_steps", "n_examples", "n_patch_check")


def _brief(cfg: dict, keys) -> str:
    return ", ".join(f"{k}={cfg[k]}" for k in keys if k in cfg)


def markdown(r: dict) -> str:
    """The report's tables as markdown."""
    tm = r["runner_timings"]
    lines = [f"Command: `{r['command']}`  ",
             f"Threads: {r['threads']}; load average (1/5/15 min) before the suite: "
             + " / ".join(f"{x:.2f}" for x in r["load_average"]["before_suite"]) + f"; {r['cpu_count']} CPUs  ",
             (f"Eval tokens (core and dead window): {r['settings']['eval_tokens']:,}; steering: {_brief(r['settings']['steering'], STEER_KEYS)}; "
             f"circuits: {_brief(r['settings']['circuits'], CIRCUIT_KEYS)}"), "",
             "| job | SAEs | seconds | per SAE |", "|---|---|---|---|",
             f"| model load | all | {r['model_load_seconds']:.1f} | |",
             f"| eval tokens | all | {tm.get('tokens_seconds', 0.0):.1f} | |"]
    for j in tm["jobs"]:
        n = len(j["saes"])
        lines.append(f"| {j['job']} | {n} | {j['seconds']:.1f} | {j['seconds'] / n:.1f} |")
    lines.append(f"| **suite total (wall)** | {len(r['per_sae_seconds'])} | **{r['suite_wall_seconds']:.1f}** | |")
    cols = sorted({k for v in r["per_sae_seconds"].values() for k in v}, key=lambda k: (k == "seconds_total", k))
    lines += ["", "Per SAE (its share of shared jobs):", "", "| SAE | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for sae, v in r["per_sae_seconds"].items():
        lines.append(f"| {sae} | " + " | ".join(f"{v.get(c, 0.0):.1f}" for c in cols) + " |")
    mcols = ["l0", "fvu", "ce_loss_score", "kl_div_score", "dead_fraction", "steering_score", "circuit_nodes_f80[ioi]", "saebench_compatible"]
    lines += ["", "| SAE | " + " | ".join(mcols) + " |", "|---" * (len(mcols) + 1) + "|"]
    for sae, m in r["metrics"].items():
        lines.append(f"| {sae} | " + " | ".join(f"{m[c]:.4g}" if isinstance(m.get(c), float) else str(m.get(c)) for c in mcols) + " |")
    s = r.get("shared_pass")
    if s:
        lines += ["", (f"Shared pass ({'+'.join(s['evals'])}, {s.get('eval_tokens', '?')} tokens, {s.get('rounds', 1)} alternating rounds, medians; "
                      f"command `{r.get('shared_pass_command', r['command'])}`): {s['shared_pass_seconds']:.1f} s for all SAEs together vs "
                      f"{s['sum_alone_seconds']:.1f} s one SAE at a time ({', '.join(f'{k} {v:.1f} s' for k, v in s['per_sae_alone_seconds'].items())}): "
                      f"{s['speedup']:.2f}x, {100 * s['saved_fraction']:.0f}% saved.")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
