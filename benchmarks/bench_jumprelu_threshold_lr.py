"""JumpReLU in target-L0 mode: how its training L0 follows the target for several threshold learning rates.

Trains one JumpReLU SAE per ``threshold_lr_scale`` side by side (``train_many``, one pass over the same
cached activations, the same seed and data order) with ``benchmarks/bench_methods.py``'s settings for
``jumprelu`` (SmolLM2 layer 15, 4,608 latents, target L0 = k = 32, quantile θ init, 60 steps of 4,096
tokens, lr 1e-3), and records the training L0 and batch FVU every 5 steps. Writes
benchmarks/results/jumprelu_threshold_lr.json (+ .md). docs/METHODS_IMPLEMENTED.md (``jumprelu``) reads it.

    OMP_NUM_THREADS=2 python benchmarks/bench_jumprelu_threshold_lr.py [--scales 1 10 30 100 --tokens 245760]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main(argv: list[str] | None = None) -> dict:
    import bench_methods as bm

    from saebench.config import TrainConfig
    from saebench.io import write_json
    from saebench.trainers.loop import train_many

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 10.0, 30.0, 100.0])
    p.add_argument("--tokens", type=int, default=245_760)
    p.add_argument("--cache", default="runs/demo/activations")
    p.add_argument("--runs-dir", default="runs/bench_jumprelu_threshold_lr")
    p.add_argument("--out", default=str(HERE / "results"))
    a = p.parse_args(argv)
    args = bm.build_parser().parse_args(["--tokens", str(a.tokens), "--cache", a.cache])
    base = bm.settings(args) | {"training_tokens": a.tokens, "activation_cache": a.cache, "method": "jumprelu", "checkpoint_every_steps": 10**6,
                                "resume": False}
    opts = bm.METHOD_OPTIONS["jumprelu"]
    cfgs = [TrainConfig(**base | {"out_dir": str(Path(a.runs_dir) / f"scale_{s:g}"), "method_options": opts | {"threshold_lr_scale": s}})
            for s in a.scales]
    source = bm.open_cache(cfgs[0], print)
    t = time.perf_counter()
    results = train_many(cfgs, source=source, progress=True)
    wall = time.perf_counter() - t
    rows = [{"threshold_lr_scale": s, "steps": [h["step"] for h in r.history], "l0": [round(h["l0"], 2) for h in r.history],
             "fvu": [round(h["fvu"], 4) for h in r.history]} for s, r in zip(a.scales, results)]
    out = {"settings": {k: base[k] for k in ("model", "hook_name", "k", "expansion_factor", "batch_size_tokens", "lr", "training_tokens")}
           | {"method_options": opts, "target_l0": base["k"]}, "rows": rows, "wall_seconds": round(wall, 1), "machine": bm.machine_info(),
           "command": " ".join(["benchmarks/bench_jumprelu_threshold_lr.py", *(argv if argv is not None else sys.argv[1:])])}
    Path(a.out).mkdir(parents=True, exist_ok=True)
    write_json(Path(a.out) / "jumprelu_threshold_lr.json", out)
    steps = rows[0]["steps"]
    lines = ["| threshold_lr_scale | " + " | ".join(f"L0 @ {s}" for s in steps) + " | FVU @ end |", "|---|" + "---|" * (len(steps) + 1)]
    lines += [f"| {r['threshold_lr_scale']:g} | " + " | ".join(f"{v:.1f}" for v in r["l0"]) + f" | {r['fvu'][-1]:.3f} |" for r in rows]
    md = "\n".join(lines) + f"\n\nTarget L0 {base['k']}; {wall:.0f} s wall for all; machine {out['machine']}.\n"
    (Path(a.out) / "jumprelu_threshold_lr.md").write_text(md)
    print(md)
    return out


if __name__ == "__main__":
    main()
