"""Where dense codes should leave the sparse path: the sparse core's decode + encoder backward, sparse vs dense, by density.

A code of K of n latents per token can be decoded and back-propagated two ways (``saebench.sparse``): the sparse
path (gathered rows, O(B·K·d)) or a dense [B, n] code and GEMMs (O(B·n·d), at a GEMM's throughput).
``sparse.dense_codes`` switches at ``DENSE_CODE_MIN_DENSITY[device]``; this script times one encoder-gather +
decode + backward both ways at K from 32 to n/2, interleaved in the same process, and prints the crossover.

    python benchmarks/bench_dense_codes.py [--device cuda] [--n 4608 --d-in 576 --batch 4096 --repeats 5] [--methods standard gated]

``--methods standard gated jumprelu_paper`` also times those methods' whole training steps (``bench_train_step``'s,
at initialisation, where their masks are densest) with the dense mask's index rows as ``sparse.all_latents``
against padded rows, interleaved.

Writes benchmarks/results/dense_codes_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_methods as bm  # noqa: E402  (benchmarks/ is not a package: the shared machine description)

from saebench import sparse  # noqa: E402
from saebench.sparse import SparseActs  # noqa: E402


def step_fn(x, W, b, Wd, K: int):
    """One gather of K selected pre-activations per token, their decode, and the backward to x, W, b and Wd."""

    def step():
        with torch.no_grad():
            pre = torch.addmm(b, x, W.t())
        idx = pre.topk(K, dim=-1).indices
        f = torch.relu(sparse.gather_pre(x, W, b, pre, idx))
        sparse.decode(SparseActs(f, idx), Wd).pow(2).sum().backward()

    return step


def method_rows(args, x: torch.Tensor) -> list[dict]:
    """Each method's training step with ``mask_to_indices(dense_ok=True)`` as it is (all-latents rows for a dense mask)
    against the same step forced to padded rows, interleaved rounds, medians."""
    import bench_train_step as bts

    library = sparse.mask_to_indices

    def padded(mask, scores=None, *, dense_ok=False):
        return library(mask, scores)

    def using(impl, fn):
        def run():
            sparse.mask_to_indices = impl
            try:
                fn()
            finally:
                sparse.mask_to_indices = library
        return run

    out = []
    for name in args.methods:
        fn = bts.method_step(name, args, x)
        times = bm.timed_interleaved({"all_latents": using(library, fn), "padded": using(padded, fn)}, args.repeats, args.device)
        med = {m: statistics.median(v) for m, v in times.items()}
        out.append({"method": name, "all_latents_s": med["all_latents"], "padded_s": med["padded"],
                    "all_latents_over_padded": med["all_latents"] / med["padded"]})
        print(f"{name:<16} all-latents rows {med['all_latents']:.3f} s  padded rows {med['padded']:.3f} s  "
              f"ratio {med['all_latents'] / med['padded']:.2f}", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=4608)
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--ks", type=int, nargs="+", default=None, help="K values (default 32, 72, then doubling to n/2)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--methods", nargs="*", default=[], metavar="METHOD", help=(
        "also time these methods' full training steps (bench_train_step's, at initialisation) with a dense mask's index rows "
        "as all_latents against padded rows, interleaved (e.g. standard gated jumprelu_paper)"))
    ap.add_argument("--k", type=int, default=32, help="--methods: the SAEs' k")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as in training
    g = torch.Generator().manual_seed(0)
    B, n, d = args.batch, args.n, args.d_in
    x = torch.randn(B, d, generator=g).to(dev)
    W, Wd = (torch.randn(n, d, generator=g).to(dev).requires_grad_() for _ in range(2))
    b = torch.zeros(n, device=dev, requires_grad=True)
    ks = args.ks or [32, 72] + [n // 2 ** i for i in range(5, 0, -1)]

    saved = dict(sparse.DENSE_CODE_MIN_DENSITY)

    def at_threshold(fn, frac: float):
        """``fn`` run with the library's dense-code threshold at ``frac`` (2: never dense; 0: always)."""
        def run():
            sparse.DENSE_CODE_MIN_DENSITY[dev.type] = frac
            fn()
        return run

    rows = []
    try:
        for K in ks:
            fn = step_fn(x, W, b, Wd, K)
            times = bm.timed_interleaved({"sparse": at_threshold(fn, 2.0), "dense": at_threshold(fn, 0.0)}, args.repeats, args.device)
            med = {m: statistics.median(v) for m, v in times.items()}
            rows.append({"K": K, "density": K / n, "sparse_ms": med["sparse"] * 1e3, "dense_ms": med["dense"] * 1e3,
                         "dense_over_sparse": med["dense"] / med["sparse"]})
            print(f"K {K:>5} ({K / n:.4f} of n): sparse {med['sparse'] * 1e3:8.2f} ms  dense {med['dense'] * 1e3:8.2f} ms  "
                  f"dense/sparse {med['dense'] / med['sparse']:.2f}", flush=True)
    finally:
        sparse.DENSE_CODE_MIN_DENSITY.clear()
        sparse.DENSE_CODE_MIN_DENSITY.update(saved)
    methods = method_rows(args, x) if args.methods else []
    wins = [r["density"] for r in rows if r["dense_over_sparse"] < 1]
    report = {"shapes": {"batch": B, "n_latents": n, "d_in": d, "dtype": "float32"}, "device": args.device,
              "threshold_in_use": saved.get(dev.type), "dense_wins_from_density": min(wins) if wins else None,
              "rows": rows, "methods": methods, "command": " ".join(["benchmarks/bench_dense_codes.py", *(argv if argv is not None else sys.argv[1:])]),
              "machine": bm.machine_info(args.device)}
    print(f"dense wins from density {report['dense_wins_from_density']}; the library switches at {report['threshold_in_use']}")
    out = Path(args.out or Path(__file__).parent / "results" / f"dense_codes_{dev.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
