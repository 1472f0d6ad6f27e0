"""Where a training step's time goes, per method, on any device (torch.profiler).

    python benchmarks/profile_train_step.py --device cuda --methods topk jumprelu batchtopk --out benchmarks/results/profile_train_step_cuda.txt
    python benchmarks/profile_train_step.py --small                      # CPU, small shapes, seconds

For each method (``topk`` is the library's TopK step as ``bench_train_step.py`` times it; the others are
``bench_train_step.METHOD_VARIANTS``) it warms up, then profiles ``--steps`` steps and prints:
the wall time per step, the top operators by self CPU time and by self device time, and the host-device
synchronisations (``cudaStreamSynchronize``/``cudaDeviceSynchronize`` and device-to-host copies, each of
which stalls the CPU until the GPU catches up, e.g. a ``.item()`` or a ``nonzero``). On a GPU a step of these
shapes is a few hundred microseconds of matrix work, so kernel launches and synchronisations decide its speed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train_step as bts  # noqa: E402

SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "cudaMemcpy", "aten::item", "aten::_local_scalar_dense",
               "aten::nonzero")


def step_fn(name: str, args):
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.d_in, device=args.device)
    if name == "topk":
        cfg, method, sae, x = bts.build(args)
        opt = bts.make_optimizer(sae.parameters(), cfg, 1e-4)
        return bts.our_step(cfg, method, sae, x, opt, False)
    return bts.method_step(name, args, x)


def profile_one(name: str, args) -> str:
    fn = step_fn(name, args)
    for _ in range(3):
        fn()
    bts.bm.sync(args.device)
    t = time.perf_counter()
    for _ in range(args.steps):
        fn()
    bts.bm.sync(args.device)
    per_step = (time.perf_counter() - t) / args.steps
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        for _ in range(args.steps):
            fn()
        bts.bm.sync(args.device)
    ka = prof.key_averages()
    lines = [f"### {name}: {per_step * 1e3:.2f} ms per step (unprofiled, mean of {args.steps})"]
    lines.append(ka.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if args.device.startswith("cuda"):
        lines.append(ka.table(sort_by="self_device_time_total", row_limit=args.rows))
    syncs = {e.key: e.count // args.steps for e in ka if e.key in SYNC_EVENTS}
    lines.append(f"per step: {syncs}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", default=["topk", *bts.METHOD_VARIANTS], choices=["topk", *bts.METHOD_VARIANTS])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--small", action="store_true", help="d_in 192, 4,096 latents, batch 1,024")
    ap.add_argument("--out", default=None, help="also write the report to this file")
    args = ap.parse_args()
    if args.small:
        args.d_in, args.n, args.batch = 192, 4096, 1024
    report = "\n\n".join(profile_one(m, args) for m in args.methods)
    print(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report + "\n")


if __name__ == "__main__":
    main()
