"""Dashboard precompute cost vs harvesting + encoding the same tokens, and app query latency.

The target (issue 5): ``build_dashboards`` costs at most 1.25× a plain pass that runs the model to
the SAE's hook and encodes every token (no storage). Both are timed in one process on the same
model, SAE and tokens; the plain pass runs before and after the build and their mean is the
baseline. Three ratios are reported: wall clock, process CPU time (much less sensitive to other
jobs on a shared machine), and the build's total over its own harvest + encode phase. Then the
app's queries are timed on the result.

    python benchmarks/bench_dashboards.py                         # SmolLM2-135M, 16k-latent random TopK SAE, 131k tokens
    python benchmarks/bench_dashboards.py --tiny --n-tokens 8192  # seconds, for a smoke run

Writes ``benchmarks/results/bench_dashboards.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch


def plain_pass(model, sae, tokens, special, batch_size: int) -> tuple[float, float]:
    """(wall, process CPU) seconds to run the model to the hook and encode every non-special token (nothing kept)."""
    from saebench.activations import token_mask
    from saebench.site import Site

    hook = sae.cfg.hook_name
    stop = Site(hook).stop_layer
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for s in range(0, tokens.shape[0], batch_size):
            toks = tokens[s : s + batch_size]
            _, cache = model.run_with_cache(toks, names_filter=lambda n: n == hook, stop_at_layer=stop)
            x = Site(hook).flatten(cache[hook])[token_mask(toks, special)].float()
            sae.encode_sparse(x)
    return time.perf_counter() - t0, time.process_time() - c0


def time_queries(db_dir: Path, n: int = 50) -> dict[str, float]:
    """Median milliseconds of what one feature page / search needs (fresh Dashboard, no app cache)."""
    from saebench.dashboards import Dashboard

    db = Dashboard(db_dir)
    rng = random.Random(0)
    ids = [rng.randrange(db.d_sae) for _ in range(n)]
    db.vocab()  # loaded once per app process
    db.tokens()

    def med(fn) -> float:
        ts = []
        for i in ids:
            t = time.perf_counter()
            fn(i)
            ts.append((time.perf_counter() - t) * 1e3)
        return round(statistics.median(ts), 3)

    words = ["the", "of", "python", "function", "love", "time", "error", "return"]
    return {
        "open_dashboard_ms": round(_timed(lambda: Dashboard(db_dir)) * 1e3, 3),
        "feature_ms": med(db.feature),
        "examples_ms": med(db.examples),
        "next_live_ms": med(lambda i: db.step(i, 1, live_only=True)),
        "random_live_ms": med(lambda i: db.random_feature(rng, live_only=True)),
        "search_text_ms": med(lambda i: db.search_text(words[i % len(words)])),
        "search_token_ms": med(lambda i: db.search_token(words[i % len(words)])),
        "label_ms": med(db.label),
        "counts_ms": med(lambda i: db.counts()),
    }


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny random model (d_model 64) instead of SmolLM2-135M")
    ap.add_argument("--hook", default=None, help="hook (default blocks.15.hook_resid_post; blocks.1 for --tiny)")
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--n-tokens", type=int, default=131_072, help="positions scanned (default: build_dashboards' own default)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--context-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--feature-batch-size", type=int, default=1024)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_dashboards.json"))
    args = ap.parse_args()

    from saebench import dashboards as D
    from saebench.text import special_ids
    from saebench import models, text
    from saebench.sae import SAE, SAEConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="bench_dashboards_"))
    if args.tiny:
        model = models.make_tiny_model(work / "model", n_layers=2)
        model_name, hook = str(work / "model"), args.hook or "blocks.1.hook_resid_post"
    else:
        model = models.load_model(None, device=args.device)
        model_name, hook = models.DEFAULT_MODEL, args.hook or "blocks.15.hook_resid_post"
    d_in = models.model_d_in(model, hook)
    cfg = SAEConfig(architecture="topk", d_in=d_in, d_sae=args.d_sae, k=args.k, model_name=model_name, hook_name=hook,
                    hook_layer=models.hook_layer(hook), context_size=args.context_size, metadata={"corpus": "default"})
    sae = SAE(cfg)
    sae.init_tied(torch.Generator().manual_seed(0))
    sae_dir = sae.save(work / "sae")
    sae = sae.to(args.device).requires_grad_(False)

    tokens = text.load_tokens("default", model.tokenizer, args.context_size, args.n_tokens, split="eval")  # warms the corpus cache
    special = special_ids(model.tokenizer)
    plain_pass(model, sae, tokens[: args.batch_size], special, args.batch_size)  # warm-up

    (base1, cpu1) = plain_pass(model, sae, tokens, special, args.batch_size)
    t0, c0 = time.perf_counter(), time.process_time()
    out = D.build_dashboards(sae_dir, model=model, n_tokens=args.n_tokens, batch_size=args.batch_size, progress=False,
                             feature_batch_size=args.feature_batch_size, context_size=args.context_size, device=args.device)
    build, build_cpu = time.perf_counter() - t0, time.process_time() - c0
    (base2, cpu2) = plain_pass(model, sae, tokens, special, args.batch_size)
    baseline, baseline_cpu = (base1 + base2) / 2, (cpu1 + cpu2) / 2
    db = D.Dashboard(out)
    phases = db.meta["timings"]
    queries = time_queries(out)
    size_mb = sum(p.stat().st_size for p in out.iterdir()) / 2**20
    result = {
        "model": model_name, "hook": hook, "d_in": d_in, "d_sae": args.d_sae, "k": args.k,
        "n_positions": int(tokens.numel()), "n_tokens_scanned": db.provenance["n_tokens"], "context_size": args.context_size,
        "device": args.device, "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "baseline_harvest_encode_s": [round(base1, 2), round(base2, 2)],
        "build_dashboards_s": round(build, 2),
        "ratio_build_over_harvest_encode": round(build / baseline, 3),
        "baseline_harvest_encode_cpu_s": [round(cpu1, 2), round(cpu2, 2)],
        "build_dashboards_cpu_s": round(build_cpu, 2),
        "ratio_cpu_time": round(build_cpu / baseline_cpu, 3),
        "ratio_within_build": round(phases["total_s"] / phases["harvest_encode_s"], 3),
        "target_ratio": 1.25,
        "build_phases_s": {k: round(v, 2) for k, v in phases.items()},
        "latents_per_s_in_feature_batches": round(args.d_sae / max(phases["feature_batches_s"], 1e-9), 1),
        "dashboard_size_mb": round(size_mb, 1),
        "query_latency": queries,
        "load_average_1min": _loadavg(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"\nratio (wall) {result['ratio_build_over_harvest_encode']:.3f}, (process CPU time) {result['ratio_cpu_time']:.3f}, "
          f"(build total / its own harvest+encode phase) {result['ratio_within_build']:.3f}; target ≤ 1.25. Build {build:.1f} s "
          f"vs harvest+encode {baseline:.1f} s (mean of {base1:.1f} and {base2:.1f}); written to {args.out}")


def _loadavg() -> float | None:
    try:
        import os

        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


if __name__ == "__main__":
    main()
