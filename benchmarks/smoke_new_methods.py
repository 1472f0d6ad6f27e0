"""A short run of methods on real activations from an activation cache, with a held-out split; prints one JSON line per method.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/smoke_new_methods.py --cache runs/demo/activations \\
        topk standard 'standard:{"sparsity_coef": 1.0}' gated matryoshka_batchtopk matching_pursuit top_afa itda

The first ``--held-out`` tokens of the cache's first chunk are never trained on and score every SAE (FVU, L0);
the rest of that chunk is the training stream (epochs cycle). d_sae = 4·d_in, k = 32, batches of 1,024 tokens,
``--steps`` steps (default 60), each method's defaults unless options are given as ``name:{json}``. A smoke check
that a method trains on real activations, not a comparison at a converged budget (``bench_methods.py`` is that).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from saebench.trainers.loop import train

from saebench.activations import ActivationSource, CachedSource
from saebench.config import TrainConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("methods", nargs="+", help="method or method:{json options}")
    ap.add_argument("--cache", required=True, help="an activation cache folder (cache.json + shards)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--held-out", type=int, default=4096)
    ap.add_argument("--out", default="/tmp/smoke_new_methods")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cache = CachedSource(args.cache)
    hook = cache.hook_names[0]
    first = cache.chunk(0)
    x = first.acts[hook][: args.held_out].float()
    train_part = first.index(torch.arange(args.held_out, len(first)))

    class TrainPart(ActivationSource):
        hook_names, d_in = [hook], {hook: cache.d_in[hook]}

        @property
        def n_chunks(self) -> int:
            return 1

        def chunk(self, i: int):
            return train_part

    for spec in args.methods:
        name, opts = spec.split(":", 1) if ":" in spec else (spec, "{}")
        cfg = TrainConfig(method=name, hook_name=hook, d_sae=4 * cache.d_in[hook], k=32, batch_size_tokens=1024, training_tokens=1024 * args.steps,
                          out_dir=f"{args.out}/{name}", log_every_steps=10, checkpoint_every_steps=10**6, method_options=json.loads(opts), resume=False)
        t = time.time()
        r = train(cfg, source=TrainPart(), progress=False)
        with torch.no_grad():
            z, x_hat = r.sae.encode(x), r.sae(x)
        fvu = ((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
        print(json.dumps({"method": name, "options": json.loads(opts), "held_out_fvu": round(fvu, 4), "l0": round((z != 0).sum(-1).float().mean().item(), 1),
                          "seconds": round(time.time() - t, 1), "train_l0_every_10_steps": [round(h["l0"], 1) for h in r.history]}), flush=True)


if __name__ == "__main__":
    main()
