"""Batch-wide top-(k·B) selection: ``sparse.batch_topk_select`` against a batch-wide sort + ``mask_to_indices``.

Side by side in one process on the methods benchmark's shape (B = 4,096 tokens, n = 4,608 latents,
k = 32) with ReLU'd Gaussian scores, with and without "heavy" rows (tokens that take hundreds of the
winners, as high-norm tokens do early in training). Checks that both select the same entries, then
times each (median of ``--repeats``). Writes benchmarks/results/batch_select.json.

    OMP_NUM_THREADS=1 python benchmarks/bench_batch_select.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from saebench import sparse

HERE = Path(__file__).resolve().parent


def _selected(idx: torch.Tensor, valid: torch.Tensor, shape) -> torch.Tensor:
    out = torch.zeros(shape, dtype=torch.bool)
    out[torch.arange(shape[0])[:, None].expand_as(idx)[valid], idx[valid]] = True
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(HERE / "results" / "batch_select.json"))
    a = p.parse_args(argv)
    k_total = a.k * a.batch
    rows = []
    for heavy in (0, 3):
        g = torch.Generator().manual_seed(0)
        scores = torch.randn(a.batch, a.d_sae, generator=g)
        scores[:heavy] += 4.0
        scores = scores.clamp_min(0)
        fns = {"sort_then_mask_to_indices": lambda: sparse.mask_to_indices(sparse.batch_topk_mask(scores, k_total), scores),
               "batch_topk_select": lambda: sparse.batch_topk_select(scores, k_total)}
        same = torch.equal(_selected(*fns["sort_then_mask_to_indices"](), scores.shape), _selected(*fns["batch_topk_select"](), scores.shape))
        times = {name: [] for name in fns}
        for _ in range(a.repeats):  # alternate, so both see the same machine load
            for name, fn in fns.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        med = {name: statistics.median(v) for name, v in times.items()}
        rows.append({"heavy_rows": heavy, "same_selection": same, "median_seconds": med,
                     "speedup": med["sort_then_mask_to_indices"] / med["batch_topk_select"]})
        print(f"heavy rows {heavy}: sort {med['sort_then_mask_to_indices']:.3f} s, select {med['batch_topk_select']:.3f} s, "
              f"{rows[-1]['speedup']:.2f}x, same selection: {same}")
    out = {"batch": a.batch, "d_sae": a.d_sae, "k": a.k, "threads": torch.get_num_threads(), "loadavg": os.getloadavg(), "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
