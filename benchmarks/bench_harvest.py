"""Activation-harvest throughput vs a bare model forward to the hooked layer, on the same tokens.

Measures, interleaved in one process (medians of ``--repeats`` rounds):
- ``bare_forward``: ``model(tokens, stop_at_layer=L+1, return_type=None)`` under no_grad, model batch by
  model batch: the work no harvester can avoid;
- ``harvest``: ``HookedSource.chunk`` over the same token rows: the hooked forward (``run_with_cache``
  with a names filter and the same ``stop_at_layer``), flattening, the copy to CPU, special-token and
  outlier masking, concatenation: everything the training loop gets a chunk from;
- ``harvest_2_hooks``: the same with a second, earlier hook in the same forward (several SAEs from one
  harvest), against the same bare forward.

Target: harvest <= 1.1x the bare forward. Writes benchmarks/results/harvest_<model>.json.

    python benchmarks/bench_harvest.py                        # tiny random llama (4 layers, d 256)
    python benchmarks/bench_harvest.py --model smollm2-135m --tokens 4096 --layer 15
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from saebench import models, text
from saebench.activations import HookedSource


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", help="'tiny' (a random 4-layer llama, d_model 256) or a load_model name such as smollm2-135m")
    ap.add_argument("--layer", type=int, default=None, help="hooked block (default: the middle one)")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--model-batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    if args.model == "tiny":
        folder = Path(tempfile.mkdtemp(prefix="bench_tiny_"))
        models.make_tiny_model(folder, n_layers=4, d_model=256, n_heads=4, d_mlp=1024)
        model = models.load_model(str(folder), device=args.device)
    else:
        model = models.load_model(args.model, device=args.device)
    n_layers = model.cfg.n_layers
    layer = args.layer if args.layer is not None else n_layers // 2
    hook = f"blocks.{layer}.hook_resid_post"
    early = f"blocks.{max(0, layer - 1)}.hook_mlp_out"
    tokens = text.load_tokens("default", model.tokenizer, args.context, args.tokens, split="train")
    tokens = tokens.clamp_max(model.cfg.d_vocab - 1)  # the tiny model's vocabulary may be smaller than the tokenizer's
    special = text.special_ids(model.tokenizer)
    n_tok = tokens.numel()
    one = HookedSource(model, [hook], tokens, special_ids=special, shuffle_buffer_tokens=n_tok, model_batch_size=args.model_batch_size,
                       outlier_norm_factor=10.0)
    two = HookedSource(model, [early, hook], tokens, special_ids=special, shuffle_buffer_tokens=n_tok, model_batch_size=args.model_batch_size,
                       outlier_norm_factor=10.0)
    assert one.n_chunks == 1 and one.stop_at_layer == layer + 1

    def bare_forward():
        with torch.no_grad():
            for s in range(0, tokens.shape[0], args.model_batch_size):
                model(tokens[s : s + args.model_batch_size].to(args.device), stop_at_layer=layer + 1, return_type=None)

    fns = {"bare_forward": bare_forward, "harvest": lambda: one.chunk(0), "harvest_2_hooks": lambda: two.chunk(0)}
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    report = {
        "model": args.model, "n_layers": n_layers, "d_model": model.cfg.d_model, "hook": hook, "second_hook": early,
        "tokens": n_tok, "context": args.context, "model_batch_size": args.model_batch_size, "device": args.device,
        "threads": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__, "command": " ".join(sys.argv),
        "median_seconds": med, "all_seconds": times,
        "tokens_per_second": {k: n_tok / v for k, v in med.items()},
        "harvest_over_bare_forward": med["harvest"] / med["bare_forward"],
        "harvest_2_hooks_over_bare_forward": med["harvest_2_hooks"] / med["bare_forward"],
        # Each round times the variants back to back, so a round's ratio sees one load level; their
        # median is the robust figure on a shared machine.
        "paired_median_ratio": {k: statistics.median(a / b for a, b in zip(times[k], times["bare_forward"])) for k in ("harvest", "harvest_2_hooks")},
    }
    print(f"model {args.model}: {n_tok} tokens, hook {hook}, stop_at_layer {layer + 1} of {n_layers}")
    print(f"bare forward to the layer   {med['bare_forward']:.3f} s  ({n_tok / med['bare_forward']:,.0f} tokens/s)")
    paired = report["paired_median_ratio"]
    print(f"harvest (1 hook)            {med['harvest']:.3f} s  = {report['harvest_over_bare_forward']:.3f}x the bare forward "
          f"(median of per-round ratios {paired['harvest']:.3f}x; target <= 1.1x)")
    print(f"harvest (2 hooks, 1 pass)   {med['harvest_2_hooks']:.3f} s  = {report['harvest_2_hooks_over_bare_forward']:.3f}x the bare forward "
          f"(per-round {paired['harvest_2_hooks']:.3f}x)")
    out = Path(args.out or Path(__file__).parent / "results" / f"harvest_{args.model.replace('/', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
