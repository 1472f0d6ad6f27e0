"""One TopK training step of saebench vs SAELens 6.x and EleutherAI sparsify, side by side.

Each library runs in its own interpreter (SAELens needs transformer-lens<4, so it cannot share
saebench's venv; create the venvs with ``bash benchmarks/make_anchor_envs.sh``) through
``anchors_worker.py``: identical shapes, thread count, data (``torch.randn`` from one seed, the same
torch 2.13.0 everywhere) and AuxK off. Every worker times its step interleaved with the dense encoder
matmul on the same weights, so ``step_over_matmul`` is comparable across processes even on a loaded
machine; the rounds alternate libraries, and the medians over rounds are reported.

- saebench: ``Method.step`` + the training loop's optimizer (fused Adam), decoder-gradient projection,
  clipping and renormalisation;
- SAELens: ``SAETrainer.step(batch)`` (its public per-batch seam used by ``fit``) on a
  ``TopKTrainingSAE``, both with its default dense activations and with ``use_sparse_activations=True``;
- sparsify: ``SparseCoder`` forward (its fused encoder and eager sparse decoder on CPU) + FVU loss,
  backward, ``remove_gradient_parallel_to_decoder_directions``, ``torch.optim.Adam``, unit-norm decoder
  (the body of ``sparsify.Trainer.fit`` for a local loss, without the LM forward).

Writes benchmarks/results/vs_anchors.json.

    python benchmarks/bench_vs_anchors.py [--rounds 2 --repeats 3 --threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
LIBS = {
    "saebench": Path(sys.executable),
    "saelens": HERE / "envs" / "saelens" / "bin" / "python",
    "saelens_sparse": HERE / "envs" / "saelens" / "bin" / "python",
    "sparsify": HERE / "envs" / "sparsify" / "bin" / "python",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per worker run")
    ap.add_argument("--rounds", type=int, default=2, help="worker runs per library, alternating libraries")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--libs", nargs="*", default=list(LIBS))
    ap.add_argument("--out", default=str(HERE / "results" / "vs_anchors.json"))
    args = ap.parse_args()
    shape = ["--d-in", str(args.d_in), "--n", str(args.n), "--k", str(args.k), "--batch", str(args.batch),
             "--repeats", str(args.repeats), "--threads", str(args.threads)]
    runs: dict[str, list[dict]] = {lib: [] for lib in args.libs}
    errors: dict[str, str] = {}
    for r in range(args.rounds):
        for lib in args.libs:
            py = LIBS[lib]
            if lib in errors:
                continue
            if not py.exists():
                errors[lib] = f"{py} does not exist: run `bash benchmarks/make_anchor_envs.sh` (see its install log under benchmarks/envs/)"
                continue
            proc = subprocess.run([str(py), str(HERE / "anchors_worker.py"), lib, *shape], capture_output=True, text=True, env=_env())
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode or not lines:
                errors[lib] = _exception_line(proc.stderr or proc.stdout)
                continue
            runs[lib].append(json.loads(lines[-1]))
            print(f"round {r}: {lib:15s} step {runs[lib][-1]['median_seconds']['step']:.3f} s = {runs[lib][-1]['step_over_matmul']:.2f}x its matmul",
                  flush=True)
    summary = {}
    for lib, rs in runs.items():
        if not rs:
            continue
        summary[lib] = {
            "version": rs[0].get("version"),
            "step_seconds_median": statistics.median(s for r in rs for s in r["all_seconds"]["step"]),
            "matmul_seconds_median": statistics.median(s for r in rs for s in r["all_seconds"]["matmul"]),
            "step_over_matmul_median": statistics.median(r["step_over_matmul"] for r in rs),
        }
    if "saebench" in summary:
        ours = summary["saebench"]["step_over_matmul_median"]
        for lib, s in summary.items():
            s["over_saebench"] = s["step_over_matmul_median"] / ours
    report = {"shapes": {"d_in": args.d_in, "n_latents": args.n, "k": args.k, "batch_tokens": args.batch, "dtype": "float32", "auxk": "off"},
              "threads": args.threads, "platform": platform.platform(), "command": " ".join(sys.argv),
              "summary": summary, "runs": runs, "errors": errors}
    print()
    for lib, s in summary.items():
        print(f"{lib:15s} {s['version']!s:10s} step {s['step_seconds_median']:.3f} s   {s['step_over_matmul_median']:.2f}x the matmul   "
              f"{s.get('over_saebench', float('nan')):.2f}x saebench's step")
    for lib, e in errors.items():
        print(f"{lib}: FAILED: {e}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


def _exception_line(text: str) -> str:
    """The worker's exception (``SomeError: message``, first 600 characters), or the output's tail."""
    import re

    found = [ln for ln in text.splitlines() if re.match(r"^[A-Za-z_.]*(Error|Exception): ", ln)]
    return found[-1][:600] if found else text[-600:]


def _env() -> dict:
    import os

    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    env.pop("PYTHONPATH", None)
    return env


if __name__ == "__main__":
    main()
