"""Where one steering request's time goes: the TransformerBridge path against the fast decoder, by parts.

The request is bench_steering.py's (default + steered continuations of 30 new tokens, SmolLM2-135M,
an edit at ``blocks.15.hook_resid_post``). Three decoders, interleaved in this process:

- ``bridge``: every decode step through the TransformerBridge's hook points (``fast_decode=False``);
- ``plain``: the plain Hugging Face model with one torch hook, ``nn.Linear`` unchanged
  (:class:`saebench.fastgen.FastDecoder` with ``gemv_rows=0``);
- ``fast``: what ``steering.steer`` runs: the plain model with :class:`saebench.fastgen.GemvLinear`.

For each: the median CPU seconds of ``--repeats`` requests (1 torch thread by default, so CPU time is
what a quiet core would need), then one request under ``torch.profiler`` split into the linear
layers' matrix products, attention's products and softmax, the other tensor ops, and what is outside
any tensor op (Python, module calls, dispatch). The profiler adds its own overhead to every op, so its
split is a share, not a time; the unprofiled CPU seconds are the times.

    python benchmarks/profile_steering.py            # -> benchmarks/results/profile_steering.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

HOOK = "blocks.15.hook_resid_post"
PROMPT = "The weather today is"
LINEAR_OPS = {"aten::mm", "aten::addmm", "aten::linear", "aten::matmul", "aten::t"}
ATTN_OPS = {"aten::bmm", "aten::_softmax", "aten::softmax", "aten::baddbmm"}


def _split(prof, wall_s: float) -> dict:
    events = prof.key_averages()
    self_ms = {e.key: e.self_cpu_time_total / 1e3 for e in events}
    total = sum(self_ms.values())
    lin = sum(v for k, v in self_ms.items() if k in LINEAR_OPS)
    attn = sum(v for k, v in self_ms.items() if k in ATTN_OPS)
    top = sorted(((k, round(v, 1), next(e.count for e in events if e.key == k)) for k, v in self_ms.items()), key=lambda x: -x[1])[:10]
    wall_ms = wall_s * 1e3
    return {"profiled_wall_ms": wall_ms, "linear_matmul_ms": lin, "attention_ms": attn, "other_ops_ms": total - lin - attn,
            "outside_ops_ms": max(0.0, wall_ms - total), "n_ops": int(sum(e.count for e in events)),
            "top_ops": [{"op": k, "self_ms": v, "calls": n} for k, v, n in top]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=30)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "profile_steering.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from torch.profiler import ProfilerActivity, profile

    from saebench import compat, fastgen, models, steering
    from saebench.sae import SAE, SAEConfig

    model = models.load_model("smollm2-135m")
    sae = SAE(SAEConfig(architecture="topk", d_in=576, d_sae=4608, k=32, hook_name=HOOK, hook_layer=15, model_name="smollm2-135m", context_size=128))
    sae.init_tied(torch.Generator().manual_seed(0))
    sae.requires_grad_(False)
    assert fastgen.fast_decode_ok(model), compat.canary_report(model)
    fast = model.__dict__[fastgen._ATTR]
    plain = fastgen.FastDecoder(model, gemv_rows=0)

    def request(decoder):
        fd = decoder is not None
        if fd:
            model.__dict__[fastgen._ATTR] = decoder
        try:
            return steering.steer(model, sae, PROMPT, 0, 4.0, 16.0, max_new_tokens=a.tokens, stop_at_eos=False, fast_decode=fd)
        finally:
            model.__dict__[fastgen._ATTR] = fast

    variants = {"bridge": None, "plain": plain, "fast": fast}
    ref = {k: request(d) for k, d in variants.items()}  # warm-up, and the three must agree
    same = all(torch.equal(ref[k].steered.tokens, ref["bridge"].steered.tokens) and torch.equal(ref[k].default.tokens, ref["bridge"].default.tokens)
               for k in variants)
    print(f"same tokens on all three paths: {same}", flush=True)
    runs: dict[str, list[dict]] = {k: [] for k in variants}
    for rep in range(a.repeats):
        for k, d in variants.items():
            la = os.getloadavg()[0]
            t, c = time.perf_counter(), time.process_time()
            request(d)
            runs[k].append({"wall_s": time.perf_counter() - t, "cpu_s": time.process_time() - c, "load_1min": la})
            print(f"rep {rep} {k:<7} {runs[k][-1]['wall_s']:6.2f} s wall {runs[k][-1]['cpu_s']:6.2f} s CPU (load {la:.1f})", flush=True)
    summary = {k: {"median_cpu_s": statistics.median(r["cpu_s"] for r in v), "median_wall_s": statistics.median(r["wall_s"] for r in v),
                   "cpu_ms_per_step": 1e3 * statistics.median(r["cpu_s"] for r in v) / a.tokens} for k, v in runs.items()}
    for k in ("plain", "fast"):
        summary[k]["cpu_ratio_vs_bridge"] = summary[k]["median_cpu_s"] / summary["bridge"]["median_cpu_s"]
    profiles = {}
    for k, d in variants.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            request(d)
            wall = time.perf_counter() - t
        profiles[k] = _split(prof, wall)
    out = {"what": f"one steering request (default + steered, {a.tokens} new tokens, SmolLM2-135M, edit at {HOOK})",
           "threads": a.threads, "repeats": a.repeats, "same_tokens": same, "summary": summary, "profile": profiles, "runs": runs,
           "canaries": compat.canary_report(model),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__},
           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print()
    for k, v in summary.items():
        print(f"{k:<7} " + "  ".join(f"{m} {x:.3f}" for m, x in v.items()))
    for k, p in profiles.items():
        print(f"{k:<7} profiled {p['profiled_wall_ms']:.0f} ms: linear {p['linear_matmul_ms']:.0f}, attention {p['attention_ms']:.0f}, "
              f"other ops {p['other_ops_ms']:.0f}, outside ops {p['outside_ops_ms']:.0f} ({p['n_ops']} ops)")
    print(f"written to {a.out}")


if __name__ == "__main__":
    main()
