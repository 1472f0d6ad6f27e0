"""saebench's core eval vs SAEBench's core eval, side by side: same SAE, same model, same tokens.

SAEBench needs transformer-lens < 4, so it runs in its own venv (``bash benchmarks/make_anchor_envs.sh
saebench``) through ``saebench_worker.py``; saebench runs in this interpreter's venv through this file's
``--ours-worker`` mode. Every measurement is a fresh process with the same thread count
(``--threads``, also ``OMP_NUM_THREADS``), and the rounds alternate the tools:

- ``saebench_core``: SAEBench 0.6 ``sae_bench.evals.core.main.run_evals`` with the settings of its
  ``multiple_evals`` (CE loss and KL, L2 norms, sparsity, variance, featurewise density; special
  tokens excluded), its reconstruction pass and its sparsity/variance pass each over all the rows;
- ``ours_core``: ``evals/core.evaluate_core`` (what ``saebench eval`` runs);
- ``ours_bench``: ``evals/reconstruction.evaluate_hook_group`` with core and dead latents (what
  ``saebench bench --evals core dead`` runs for one SAE);
- ``ours_bench2`` (with ``--second-sae``): the same for two SAEs at the hook in one shared pass,
  reported per SAE (half the wall time). Not the single-SAE comparison the target is about: it shows
  what the shared pass gives a sweep.

The tokens are the held-out split of the default corpus (``load_eval_tokens``), written once to a
file both tools read. Each worker also times one plain forward of its model over the same rows
(``forward_seconds``), so an eval's cost can be read in model forwards. The shared metrics are
compared and their differences explained (``comparison`` in the JSON). Writes
benchmarks/results/vs_saebench.json (+ .md).

    OMP_NUM_THREADS=1 python benchmarks/bench_vs_saebench.py [--sae-dir runs/bench_suite/topk --tokens 8192 --rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SAEBENCH_PY = HERE / "envs" / "saebench" / "bin" / "python"

# Metrics both tools report under one name, and why they may differ (checked against the two sources).
SHARED = {
    "l0": "same definition (mean #non-zero latents over non-special tokens); should agree to float precision",
    "l1": "same definition for a non-negative SAE (SAEBench sums signed values, we sum |values|)",
    "cossim": "same definition (mean cos(x, x̂) over non-special tokens)",
    "l2_ratio": "same definition (mean ‖x̂‖/‖x‖); SAEBench clamps ‖x‖ < 1e-4 to 1",
    "relative_reconstruction_bias": "SAEBench: mean over batches of E‖x̂‖²/E⟨x,x̂⟩ per batch; ours: one ratio over all tokens",
    "explained_variance": "different formulas: ours 1 − Σ‖x−x̂‖²/Σ‖x−x̄‖²; SAEBench's 'new' EV subtracts (mean of all x²)² as the "
                          "'mean' term (EVALS.md §1.3), so it is not 1 − FVU",
    "mse": "different normalisation: ours SSE/(N·d_in); SAEBench's per-token SSE / (tokens in the batch), averaged: batch-size dependent",
    "ce_loss_without_sae": "SAEBench averages CE over positions whose *input* token is not special (it keeps predictions of EOS); we also "
                           "drop positions whose *target* is special; and the two models are different implementations "
                           "(TransformerLens HookedTransformer vs the TL 4 bridge over the HF model)",
    "ce_loss_with_sae": "as ce_loss_without_sae",
    "ce_loss_with_ablation": "as ce_loss_without_sae; both zero-ablate every position, BOS included (for SmolLM2 the logits are then "
                             "all 0, so CE = ln 49152 = 10.8027 in both)",
    "ce_loss_score": "ratio of the three CE terms: inherits their small differences",
    "kl_div_with_sae": "same definition (KL(p_clean‖p_sae) per non-special token); model implementation differences only",
    "kl_div_with_ablation": "same definition (both zero-ablate every position); model implementation differences only",
    "kl_div_score": "same definition; inherits the KL terms' small differences",
    "frac_alive": "same definition (latents with non-zero density over the non-special tokens seen)",
}

# SAEBench's definitions that our core eval also reports under their own names (evals/core.py): should agree.
VARIANTS = {
    "explained_variance": ("explained_variance_saebench", "SAEBench 0.6's formula, as evals/core.py reproduces it (1 − R/(S − (S/d)²), per-batch means)"),
    "relative_reconstruction_bias": ("relative_reconstruction_bias_saebench", "SAEBench's per-batch ratios, averaged"),
    "mse": ("mse_saebench", "SAEBench's per-token SSE / tokens in its batch, averaged"),
}


# --------------------------------------------------------------------------- our worker (this venv)


def ours_worker(args) -> None:
    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(args.threads)
    from saebench.evals.common import special_ids_of
    from saebench.evals.core import evaluate_core
    from saebench.evals.reconstruction import evaluate_hook_group

    from saebench import models
    from saebench.sae import SAE

    tokens = load_file(args.tokens_file)["tokens"].long()
    t = time.time()
    model = models.load_model("smollm2-135m")
    model_load_s = time.time() - t
    sae = SAE.load(args.sae_dir)
    special = special_ids_of(model.tokenizer)
    forward_s = _time_forward(model, tokens, args.batch_size)
    t = time.time()
    n_saes = 1
    if args.ours_worker == "core":
        metrics = evaluate_core(sae, model, tokens, special_ids=special, batch_size=args.batch_size, progress=False)
    else:
        saes = [sae] + ([SAE.load(args.second_sae)] if args.ours_worker == "bench2" else [])
        n_saes = len(saes)
        out = evaluate_hook_group(saes, model, tokens, special_ids=special, core=True, dead=True, batch_size=args.batch_size, progress=False)[0]
        metrics = out["core"] | {"dead_fraction_dead_eval": out["dead"]["dead_fraction"]}
    eval_s = (time.time() - t) / n_saes  # per SAE
    metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    print(json.dumps({"tool": f"ours_{args.ours_worker}", "n_saes": n_saes, "threads": torch.get_num_threads(), "tokens": int(tokens.numel()),
                      "batch_size": args.batch_size, "model_load_seconds": model_load_s, "forward_seconds": forward_s, "eval_seconds": eval_s,
                      "metrics": metrics | {"frac_alive": 1 - metrics["dead_fraction"]}}))


def _time_forward(model, tokens, batch_size: int) -> float:
    import torch

    with torch.no_grad():
        t = time.time()
        for i in range(0, tokens.shape[0], batch_size):
            model(tokens[i : i + batch_size], return_type="logits")
        return time.time() - t


# --------------------------------------------------------------------------- driver


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sae-dir", default=str(ROOT / "runs" / "bench_suite" / "topk"))
    ap.add_argument("--tokens", type=int, default=8192, help="eval tokens (rows of --context), a multiple of batch size x context")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per forward (SAEBench's default batch_size_prompts)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--second-sae", default=str(ROOT / "runs" / "bench_suite" / "batchtopk"),
                    help="second SAE at the same hook for ours_bench2 (skipped if missing)")
    ap.add_argument("--tools", nargs="+", default=["saebench_core", "ours_core", "ours_bench", "ours_bench2"])
    ap.add_argument("--work-dir", default=str(ROOT / "runs" / "bench_suite" / "vs_saebench"))
    ap.add_argument("--out", default=str(HERE / "results" / "vs_saebench.json"))
    ap.add_argument("--ours-worker", choices=["core", "bench", "bench2"], help=argparse.SUPPRESS)
    ap.add_argument("--tokens-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ours_worker:
        return ours_worker(args)

    rows = args.tokens // args.context
    if rows % args.batch_size or rows == 0:
        raise SystemExit(f"--tokens {args.tokens} gives {rows} rows of {args.context}: make it a multiple of batch size x context")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    tokens_file = work / f"tokens_{rows}x{args.context}.safetensors"
    if not tokens_file.exists():
        _write_tokens(tokens_file, rows * args.context, args.context)

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false",
               WANDB_MODE="disabled", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    cmds = {
        "saebench_core": [str(SAEBENCH_PY), str(HERE / "saebench_worker.py"), "--sae-dir", args.sae_dir, "--tokens", str(tokens_file),
                          "--batch-size", str(args.batch_size), "--threads", str(args.threads)],
        "ours_core": [sys.executable, __file__, "--ours-worker", "core"],
        "ours_bench": [sys.executable, __file__, "--ours-worker", "bench"],
        "ours_bench2": [sys.executable, __file__, "--ours-worker", "bench2", "--second-sae", args.second_sae],
    }
    for k in ("ours_core", "ours_bench", "ours_bench2"):
        cmds[k] += ["--sae-dir", args.sae_dir, "--tokens-file", str(tokens_file), "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    tools = [t for t in args.tools if t != "ours_bench2" or (Path(args.second_sae) / "cfg.json").exists()]

    runs: dict[str, list[dict]] = {t: [] for t in tools}
    errors: dict[str, str] = {}
    loads = [os.getloadavg()]
    for r in range(args.rounds):
        for tool in tools:
            if tool in errors:
                continue
            if tool == "saebench_core" and not SAEBENCH_PY.exists():
                errors[tool] = f"{SAEBENCH_PY} does not exist: run `bash benchmarks/make_anchor_envs.sh saebench`"
                continue
            t = time.time()
            proc = subprocess.run(cmds[tool], capture_output=True, text=True, env=env, cwd=ROOT, check=False)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode or not lines:
                errors[tool] = _exception_line(proc.stderr or proc.stdout)
                print(f"{tool}: FAILED: {errors[tool]}", flush=True)
                continue
            res = json.loads(lines[-1]) | {"process_seconds": time.time() - t, "load_average": os.getloadavg()}
            runs[tool].append(res)
            loads.append(res["load_average"])
            print(f"round {r}: {tool:14s} eval {res['eval_seconds']:.1f} s, forward {res.get('forward_seconds', float('nan')):.1f} s, "
                  f"model load {res['model_load_seconds']:.1f} s (load avg {res['load_average'][0]:.1f})", flush=True)

    summary = {}
    for tool, rs in runs.items():
        if rs:
            summary[tool] = {"eval_seconds_median": statistics.median(x["eval_seconds"] for x in rs),
                             "eval_seconds_all": [x["eval_seconds"] for x in rs],
                             "model_load_seconds_median": statistics.median(x["model_load_seconds"] for x in rs)}
            if all("forward_seconds" in x for x in rs):
                summary[tool]["forward_seconds_median"] = statistics.median(x["forward_seconds"] for x in rs)
                summary[tool]["eval_over_forward_median"] = statistics.median(x["eval_seconds"] / x["forward_seconds"] for x in rs)
            if tool == "saebench_core":
                summary[tool]["weight_metrics_seconds_median"] = statistics.median(x["weight_metrics_seconds"] for x in rs)
    if "saebench_core" in summary:
        ref = summary["saebench_core"]["eval_seconds_median"]
        for tool, s in summary.items():
            s["speedup_vs_saebench"] = ref / s["eval_seconds_median"]
    comparison = _compare(runs)
    report = {
        "what": __doc__.split("\n\n")[0], "command": " ".join([Path(sys.executable).name, *sys.argv]), "threads": args.threads,
        "platform": platform.platform(), "cpu_count": os.cpu_count(), "load_average_min_max_1min": [min(x[0] for x in loads), max(x[0] for x in loads)],
        "sae_dir": args.sae_dir, "sae_cfg": _sae_cfg(args.sae_dir), "second_sae_dir": args.second_sae if "ours_bench2" in tools else None, "tokens": rows * args.context, "rows": rows, "context": args.context,
        "batch_size": args.batch_size, "tokens_file": str(tokens_file), "rounds": args.rounds,
        "summary": summary, "comparison": comparison, "errors": errors, "runs": runs,
        "saebench_versions": next((x.get("versions") for x in runs.get("saebench_core", [])), None),
        "saebench_sae_loader": next((x.get("sae_loader") for x in runs.get("saebench_core", [])), None),
        "saebench_sae_lens_refused": next((x.get("sae_lens_refused") for x in runs.get("saebench_core", [])), None),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out} and {out.with_suffix('.md')}")


def _write_tokens(path: Path, n_tokens: int, context: int) -> None:
    from types import SimpleNamespace

    from saebench.evals.common import load_eval_tokens
    from safetensors.torch import save_file

    from saebench.models import get_default_tokenizer

    toks = load_eval_tokens(SimpleNamespace(tokenizer=get_default_tokenizer()), "default", n_tokens, context)
    save_file({"tokens": toks.contiguous()}, str(path))


def _sae_cfg(sae_dir: str) -> dict:
    raw = json.loads((Path(sae_dir) / "cfg.json").read_text())
    return {k: raw.get(k) for k in ("architecture", "d_in", "d_sae", "k", "hook_name", "model_name", "apply_b_dec_to_input")}


def _compare(runs: dict[str, list[dict]]) -> dict:
    """Shared metrics: SAEBench's value, ours (core eval), the difference, and why they may differ."""
    sb = next(iter(runs.get("saebench_core", [])), None)
    ours = next(iter(runs.get("ours_core", []) or runs.get("ours_bench", [])), None)
    if not sb or not ours:
        return {}
    out = {}
    for k, why in SHARED.items():
        a, b = sb["metrics"].get(k), ours["metrics"].get(k)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            out[k] = {"saebench": a, "ours": b, "difference": b - a, "relative": (b - a) / abs(a) if a else None, "why": why}
    for k, (ours_name, why) in VARIANTS.items():
        a, b = sb["metrics"].get(k), ours["metrics"].get(ours_name)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            out[f"{k} vs our {ours_name}"] = {"saebench": a, "ours": b, "difference": b - a, "relative": (b - a) / abs(a) if a else None, "why": why}
    if "ours_core" in runs and "ours_bench" in runs and runs["ours_bench"]:
        a, b = runs["ours_core"][0]["metrics"], runs["ours_bench"][0]["metrics"]
        out["_ours_core_vs_bench_max_abs_diff"] = max(abs(a[k] - b[k]) for k in a if k in b and isinstance(a[k], float))
    return out


def markdown(r: dict) -> str:
    s = r["summary"]
    lines = [(f"SAE: `{r['sae_dir']}` ({r['sae_cfg']['architecture']}, d_sae {r['sae_cfg']['d_sae']}, k {r['sae_cfg']['k']}, "
             f"{r['sae_cfg']['hook_name']}); {r['tokens']:,} held-out tokens ({r['rows']} rows x {r['context']}), batch {r['batch_size']}; "
             f"{r['threads']} thread(s); load average (1 min) {r['load_average_min_max_1min'][0]:.1f}-{r['load_average_min_max_1min'][1]:.1f} "
             f"on {r['cpu_count']} CPUs; {r['rounds']} alternating rounds, medians."), "",
             "| tool | eval s (median) | all runs | model forward s | eval / forward | speedup vs SAEBench |", "|---|---|---|---|---|---|"]
    for tool, v in s.items():
        lines.append(f"| {tool} | {v['eval_seconds_median']:.1f} | {', '.join(f'{x:.1f}' for x in v['eval_seconds_all'])} | "
                     f"{v.get('forward_seconds_median', float('nan')):.1f} | {v.get('eval_over_forward_median', float('nan')):.2f} | "
                     f"{v.get('speedup_vs_saebench', float('nan')):.2f}x |")
    if "saebench_core" in s:
        lines.append(f"\nSAEBench's featurewise weight-based metrics (no counterpart here, not in the eval time): "
                     f"{s['saebench_core']['weight_metrics_seconds_median']:.1f} s.")
    if r["comparison"]:
        lines += ["", "| metric | SAEBench | ours | ours − SAEBench | why they differ |", "|---|---|---|---|---|"]
        for k, v in r["comparison"].items():
            if not k.startswith("_"):
                lines.append(f"| {k} | {v['saebench']:.5g} | {v['ours']:.5g} | {v['difference']:+.3g} | {v['why']} |")
    for tool, e in r["errors"].items():
        lines.append(f"\n{tool} FAILED: {e}")
    return "\n".join(lines) + "\n"


def _exception_line(text: str) -> str:
    import re

    found = [ln for ln in text.splitlines() if re.match(r"^[A-Za-z_.]*(Error|Exception|Exit): ", ln)]
    return found[-1][:600] if found else text[-600:]


if __name__ == "__main__":
    main()
