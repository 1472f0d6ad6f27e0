"""Latency of one steering request (default + steered continuations) after the model is loaded.

Target (issue 19.1): on 2 idle cores, a request for default and steered continuations of 30 new
tokens returns in <= 2 s once the model is loaded, in the library, the CLI and the app; the max
activation comes from the dashboards (no model pass).

What is timed, on SmolLM2-135M (``load_model('smollm2-135m')``) with a random-init TopK SAE
(4,608 latents, k = 32) on ``blocks.15.hook_resid_post`` (latency does not depend on the SAE's
training; its decoder row is what is added):

- ``library``: :func:`saebench.steering.steer` (one batched run of two rows, the log-prob changes
  from the same pass);
- ``library_before``: what the code did before (two one-row ``generate`` calls, then
  ``next_token_logprob_diff``'s two forwards), for comparison;
- ``library_bridge`` (with ``--compare``): the same batched request with ``fast_decode=False``, i.e.
  every decode step through the TransformerBridge's hook points (the path before
  :mod:`saebench.fastgen`); run interleaved with ``library`` in this process, and the summary gives
  ``fast_vs_bridge``, the ratio of the medians (CPU seconds and wall), which moves much less with the
  load of a shared machine than either time;
- ``cli_in_process``: ``saebench steer`` through :func:`saebench.cli.main`, in this process, with
  ``load_model`` returning the already-loaded model (so: everything after the model load: argument
  checks, SAE load, dashboards lookup of the max activation, the run, printing);
- ``cli_subprocess``: the real command in a fresh process; ``after_model_s`` is the time from its
  "loading model ...: done" line to its exit, ``total_s`` includes Python start-up and the load;
- ``app_request``: the Steer page's request function :func:`saebench.app.page_steer.steer_request`
  with a streaming callback (the page's cached payload gives the max activation).

Every variant runs ``--repeats`` times, interleaved; medians are reported, with the load average
(the development machine is shared: wall times move with the load; CPU seconds are recorded too).

    python benchmarks/bench_steering.py                      # -> benchmarks/results/bench_steering.json
    python benchmarks/bench_steering.py --repeats 3 --threads 2 --dashboard-tokens 1024
    python benchmarks/bench_steering.py --compare --repeats 5 --cli-runs 1 --dashboard-tokens 256
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

HOOK = "blocks.15.hook_resid_post"
PROMPT = "The weather today is"


def _timed(fn):
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def _cli_subprocess(args: list[str], threads: int) -> dict:
    """Run ``saebench steer`` in a fresh process; timestamps of its output lines as they arrive."""
    env = os.environ | {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}  # OMP_WAIT_POLICY passes through
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "saebench.cli", "steer", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[tuple[float, str]] = []

    def pump(stream):
        for line in stream:
            lines.append((time.perf_counter() - t0, line.rstrip()))

    threads_ = [threading.Thread(target=pump, args=(s,)) for s in (proc.stdout, proc.stderr)]
    for t in threads_:
        t.start()
    rc = proc.wait()
    total = time.perf_counter() - t0
    for t in threads_:
        t.join()
    loaded = next((t for t, line in lines if line.startswith("loading model") and "done in" in line), None)
    if rc != 0 or loaded is None:
        raise RuntimeError(f"saebench steer failed (rc {rc}):\n" + "\n".join(line for _, line in lines))
    gen = next((line for _, line in lines if "generated together in" in line), "")
    return {"total_s": total, "after_model_s": total - loaded, "generation_line": gen}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=30, help="new tokens per continuation")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the target is for 2 cores)")
    ap.add_argument("--dashboard-tokens", type=int, default=1024,
                    help="tokens for the small dashboards built so the max activation comes from them (0: pass --max-act instead)")
    ap.add_argument("--cli-runs", type=int, default=2, help="fresh-process runs of the real command")
    ap.add_argument("--compare", action="store_true", help="also time the bridge path (fast_decode=False) side by side: library_bridge")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_steering.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from saebench.app import page_steer

    from saebench import dashboards as D
    from saebench import models, steering
    from saebench.sae import SAE, SAEConfig

    load_avg = {"start": os.getloadavg()}
    model, load_s, _ = _timed(lambda: models.load_model("smollm2-135m"))
    tmp = Path(tempfile.mkdtemp(prefix="bench_steering_"))
    sae = SAE(SAEConfig(architecture="topk", d_in=576, d_sae=4608, k=32, hook_name=HOOK, hook_layer=15, model_name="smollm2-135m",
                        context_size=128, metadata={"corpus": "default"}))
    sae.init_tied(torch.Generator().manual_seed(0))
    sae.requires_grad_(False)
    folder = sae.save(tmp / "sae")
    latent, strength = 0, 4.0
    dash_s = None
    if a.dashboard_tokens:
        _, dash_s, _ = _timed(lambda: D.build_dashboards(folder, model=model, n_tokens=a.dashboard_tokens, progress=False))
        found = D.max_abs_activation(folder, 0)
        live = next(i for i in range(sae.d_sae) if not D.Dashboard(D.dashboard_dir(folder)).feature(i).dead)
        latent, found = live, D.max_abs_activation(folder, live)
        max_act = found.value
    else:
        max_act = 10.0
    _, lookup_s, _ = _timed(lambda: D.max_abs_activation(folder, latent))

    steering.generate(model, "Hi", 2)  # warm-up (first-call allocations)
    from saebench import compat

    variants = ("library", "library_bridge", "library_before", "cli_in_process", "app_request") if a.compare else \
        ("library", "library_before", "cli_in_process", "app_request")
    results: dict[str, list[dict]] = {k: [] for k in variants}

    def library():
        return steering.steer(model, sae, PROMPT, latent, strength, max_act, max_new_tokens=a.tokens, stop_at_eos=False)

    def bridge():
        return steering.steer(model, sae, PROMPT, latent, strength, max_act, max_new_tokens=a.tokens, stop_at_eos=False, fast_decode=False)

    if a.compare:  # the two paths must give the same request (same tokens), else the comparison is meaningless
        f, b = library(), bridge()
        same = torch.equal(f.default.tokens, b.default.tokens) and torch.equal(f.steered.tokens, b.steered.tokens)
        print(f"fast and bridge paths give the same tokens: {same}", flush=True)

    def before():
        vec = steering.steering_vector(sae, latent, strength, max_act)
        d = steering.generate(model, PROMPT, a.tokens, stop_at_eos=False)
        s = steering.generate(model, PROMPT, a.tokens, vector=vec, hook_name=HOOK, stop_at_eos=False)
        steering.next_token_logprob_diff(model, sae, PROMPT, latent, strength, max_act)
        return d, s

    def cli():
        from unittest import mock

        from saebench import cli as C

        args = ["steer", str(folder), "--latent", str(latent), "--strength", str(strength), "--prompt", PROMPT, "--tokens", str(a.tokens), "--quiet"]
        if not a.dashboard_tokens:
            args += ["--max-act", str(max_act)]
        with mock.patch.object(models, "load_model", lambda *x, **k: model), open(os.devnull, "w") as null, \
                mock.patch.object(sys, "stdout", null):
            assert C.main(args) == 0

    def app():
        return page_steer.steer_request(model, sae, HOOK, PROMPT, latent, strength, max_act, "all", n_new=a.tokens, on_text=lambda x, y: None)

    for rep in range(a.repeats):
        fns = {"library": library, "library_bridge": bridge, "library_before": before, "cli_in_process": cli, "app_request": app}
        for name, fn in ((k, fns[k]) for k in variants):
            la = os.getloadavg()[0]
            out, wall, cpu = _timed(fn)
            rec = {"wall_s": wall, "cpu_s": cpu, "load_1min": la}
            if name in ("library", "library_bridge"):
                rec["n_new"] = int(out.default.tokens.shape[1] - out.default.prompt_len)
            results[name].append(rec)
            print(f"rep {rep} {name:<15} {wall:6.2f} s wall  {cpu:6.2f} s CPU  (load {la:.1f})", flush=True)

    cli_args = ["--latent", str(latent), "--strength", str(strength), "--prompt", PROMPT, "--tokens", str(a.tokens), str(folder)]
    if not a.dashboard_tokens:
        cli_args += ["--max-act", str(max_act)]
    sub = []
    for _ in range(a.cli_runs):
        la = os.getloadavg()[0]
        r = _cli_subprocess(cli_args, a.threads) | {"load_1min": la}
        sub.append(r)
        print(f"cli subprocess: {r['after_model_s']:.2f} s after the model load, {r['total_s']:.2f} s in all (load {la:.1f}); {r['generation_line']}",
              flush=True)
    load_avg["end"] = os.getloadavg()

    summary = {k: {"median_wall_s": statistics.median(r["wall_s"] for r in v), "min_wall_s": min(r["wall_s"] for r in v),
                   "median_cpu_s": statistics.median(r["cpu_s"] for r in v)} for k, v in results.items()}
    if a.compare:
        f, b = summary["library"], summary["library_bridge"]
        summary["fast_vs_bridge"] = {"cpu_ratio": f["median_cpu_s"] / b["median_cpu_s"], "wall_ratio": f["median_wall_s"] / b["median_wall_s"]}
    if sub:
        summary["cli_subprocess"] = {"median_after_model_s": statistics.median(r["after_model_s"] for r in sub),
                                     "median_total_s": statistics.median(r["total_s"] for r in sub)}
    out = {
        "what": f"default + steered continuations of {a.tokens} new tokens, SmolLM2-135M, TopK SAE 4608 latents on {HOOK}",
        "target_s": 2.0,
        "threads": a.threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "repeats": a.repeats, "prompt": PROMPT, "latent": latent, "strength": strength, "max_act": max_act,
        "max_act_source": "dashboards" if a.dashboard_tokens else "--max-act",
        "model_load_s": load_s, "dashboards_build_s": dash_s, "dashboards_lookup_s": lookup_s,
        "summary": summary, "canaries": compat.canary_report(model), "same_tokens_fast_vs_bridge": same if a.compare else None,
        "runs": results, "cli_subprocess_runs": sub, "load_average": load_avg,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__, "python": platform.python_version()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(f"\nmodel load {load_s:.1f} s; max activation from the dashboards in {lookup_s * 1000:.1f} ms")
    for k, v in summary.items():
        print(f"{k:<16} " + "  ".join(f"{m} {x:.2f}" for m, x in v.items()))
    print(f"load average start {load_avg['start']}, end {load_avg['end']}; written to {a.out}")


if __name__ == "__main__":
    main()
