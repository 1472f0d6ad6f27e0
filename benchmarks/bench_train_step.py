"""TopK training-step speed: our sparse step vs the unavoidable dense encoder matmul, side by side.

Measures, in one process on identical shapes and threads (interleaved rounds, so that load from other
processes hits every variant alike; medians reported):
- ``matmul``: the dense encoder forward ``F.linear(x, W_enc, b_enc)`` (the work no TopK trainer can avoid);
- ``matmul_into_buffer``: the same product written into a reused output (``torch.addmm(..., out=)``), as our
  step does: a fresh [B, n] output page-faults every call (~0.25 s at the default shape on CPU);
- ``saebench``: a full training step of the `topk` method as the training loop runs it (encode, sparse
  decode, AuxK off, backward, decoder-gradient projection, the loop's Adam, renormalisation);
- ``saebench_autocast`` (``--autocast``): the same step under bf16 autocast (fp32 master weights);
- ``dense_reference``: the same step written the usual dense way (scatter codes into a [B, n]
  tensor, dense decode, dense autograd, plain ``torch.optim.Adam``), as SAELens and dictionary_learning do.

- ``method:<name>``: a full training step of every other activation method (``--methods``, default all of
  them: batchtopk, mutual_choice, jumprelu (target-L0 mode, thresholds initialised at the target L0), abstopk
  (token and batch variants), vsae, vsae_det, feature_choice, gsae (with random ∇ₓ), the ReLU-code methods standard,
  gated and jumprelu_paper (at initialisation, where their codes are densest), matryoshka_batchtopk, and the
  iterative encoders matching_pursuit, itda (k sequential residual projections a step) and top_afa), each on its own
  SAE initialised by its own ``init_sae``, past any warm-up (threshold EMAs active), including its ``after_step``;
  each reported as a ratio to ``matmul`` measured in the same rounds. e2e runs the language model and has its own
  breakdown (``benchmarks/bench_e2e.py --breakdown``).

- ``floor:<name>`` (with the methods): the dense work a method's math cannot avoid, timed alone in the same rounds:
  ``floor:kl_products`` the encoder product into a buffer, its ReLU in place and the second product of the same
  size that vsae's KL weight gradient Rᵀ(x − b_dec) is (R = ReLU(pre), ~50% dense); ``floor:kl_products_noise`` that
  plus B·n Gaussians into a buffer (vsae's sampled z); ``floor:gsae_products`` the encoder product and g-SAE's
  scores g·W_decᵀ, both into buffers.

On ``--device cuda`` every tensor lives on the GPU, each timed call is bracketed by ``torch.cuda.synchronize()``,
TF32 matmuls are on (as in training; recorded in the JSON), and the peak memory is ``torch.cuda.max_memory_allocated``.

Then, in a fresh subprocess that runs only our step, the peak memory of a training step (max RSS on CPU,
``torch.cuda.max_memory_allocated`` on CUDA) with what it is made of.

Prints the ratios and writes benchmarks/results/train_step.json. Default shapes are the issue's:
d_in 576, 16,384 latents, k 32, batch 4,096, fp32.

    python benchmarks/bench_train_step.py [--d-in 576 --n 16384 --k 32 --batch 4096 --repeats 5 --device cpu --autocast]
    python benchmarks/bench_train_step.py --small            # d_in 192, 4,096 latents, batch 1,024: seconds
    python benchmarks/bench_train_step.py --methods jumprelu vsae --skip-memory
    OMP_NUM_THREADS=1 python benchmarks/bench_train_step.py --skip-memory --no-reference --repeats 5 --out benchmarks/results/train_step_methods.json
    python benchmarks/bench_train_step.py --device cuda --skip-memory --no-reference --repeats 20 --out benchmarks/results/train_step_methods_cuda.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from saebench.trainers import get_method
from saebench.trainers.base import StepInput
from saebench.trainers.loop import make_optimizer

from saebench.config import TrainConfig
from saebench.precision import autocast, configure_matmul_precision
from saebench.sae import SAE

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_methods as bm  # noqa: E402  (benchmarks/ is not a package: the shared interleaved timer)


def build(args):
    torch.manual_seed(0)
    dev = args.device
    configure_matmul_precision(dev, True)
    cfg = TrainConfig(hook_name="bench", d_sae=args.n, k=args.k, training_tokens=args.batch * 10, batch_size_tokens=args.batch,
                      method_options={"auxk_coef": 0.0}, device=dev)
    method = get_method("topk")(cfg)
    sae = SAE(method.sae_config(args.d_in)).to(dev)
    sae.init_tied(torch.Generator().manual_seed(0))
    x = torch.randn(args.batch, args.d_in, device=dev)
    return cfg, method, sae, x


def our_step(cfg, method, sae, x, opt, use_autocast: bool):
    def step():
        with autocast(use_autocast, cfg.device):
            out = method.step(sae, StepInput(x=x, dead_mask=None, step=0))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.project_decoder_grad()
        opt.step()
        sae.normalize_decoder()

    return step


# Every activation method, with the options that put it at the common L0 k (as benchmarks/bench_methods.py).
METHOD_VARIANTS: dict[str, tuple[str, dict]] = {
    "batchtopk": ("batchtopk", {}),
    "mutual_choice": ("mutual_choice", {}),
    "jumprelu": ("jumprelu", {"sparsity_mode": "target_l0"}),
    "abstopk": ("abstopk", {}),
    "abstopk_batch": ("abstopk", {"variant": "batch"}),
    "vsae": ("vsae", {}),
    "vsae_det": ("vsae_det", {}),
    "feature_choice": ("feature_choice", {}),
    "gsae": ("gsae", {}),
    # ReLU codes: dense at initialisation (about half the latents fire), so these time the dense-code path.
    "standard": ("standard", {}),
    "gated": ("gated", {}),
    "jumprelu_paper": ("jumprelu", {"form": "paper"}),
    "matryoshka_batchtopk": ("matryoshka_batchtopk", {}),
    "matching_pursuit": ("matching_pursuit", {}),
    "itda": ("itda", {}),
    "top_afa": ("top_afa", {}),
}


def method_step(name: str, args, x: torch.Tensor):
    """A closure running one full training step of method ``name`` as the loop does (AuxK-style losses on, a few dead latents)."""
    from saebench.trainers.loop import _count_firing  # noqa: F401  (the loop's firing count is not method work; not timed)

    method_name, opts = METHOD_VARIANTS[name]
    dev = args.device
    steps = 10_000
    cfg = TrainConfig(hook_name="bench", d_sae=args.n, k=args.k, training_tokens=args.batch * steps, batch_size_tokens=args.batch,
                      method=method_name, method_options=opts, device=dev, lr=1e-4)
    method = get_method(method_name)(cfg)
    sae = SAE(method.sae_config(args.d_in)).to(dev)
    groups = method.param_groups(sae, 1e-4)  # as the loop: first, so training-only parameters (standard's free decoder) exist
    method.init_sae(sae, x, torch.Generator().manual_seed(0))
    opt = make_optimizer(groups, cfg, 1e-4)
    # 1% of latents dead: AuxK / the Zipf loss's dead branch run, as in a real run.
    dead = torch.zeros(args.n, dtype=torch.bool, device=dev)
    dead[:: 100] = True
    grads = torch.randn_like(x) if method.needs_grads else None
    # Past warm-ups (TopK warm starts end at 50-70% of the run; JumpReLU's hand-over step itself is not timed):
    # threshold EMAs update, sparsity/KL coefficients at full weight.
    step_no = int(0.9 * steps)

    def step():
        inp = StepInput(x=x, dead_mask=dead, step=step_no, grads=grads)
        out = method.step(sae, inp)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.project_decoder_grad()
        opt.step()
        sae.normalize_decoder()
        method.after_step(sae, inp, out, step_no)

    return step


def floor_steps(args, x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor) -> dict:
    """The dense work some methods' math needs, alone: the measured floor of their step / matmul ratio."""
    dev = args.device
    pre = torch.empty(args.batch, args.n, device=dev)
    noise = torch.empty(args.batch, args.n, device=dev)
    gen = torch.Generator(device=dev).manual_seed(0)

    def two_products():
        with torch.no_grad():
            torch.addmm(b_enc, x, W_enc.t(), out=pre)  # the encoder forward
            torch.mm(pre.clamp_min_(0).t(), x)  # [n, B]·[B, d]: vsae's KL weight gradient; g·W_decᵀ has the same size

    def two_products_noise():
        two_products()
        torch.randn(pre.shape, generator=gen, device=dev, out=noise)  # vsae: ε for every latent

    g, W_dec = torch.randn_like(x), W_enc.t().contiguous().t()  # a [n, d] decoder-shaped weight

    def encoder_and_scores():
        with torch.no_grad():
            torch.addmm(b_enc, x, W_enc.t(), out=pre)
            torch.mm(g, W_dec.t(), out=noise)  # g-SAE: |d_i·g| for every latent

    return {"floor:kl_products": two_products, "floor:kl_products_noise": two_products_noise, "floor:gsae_products": encoder_and_scores}


def memory_only(args) -> None:
    """Subprocess mode: run our step only and print its peak memory as JSON."""
    cfg, method, sae, x = build(args)
    opt = make_optimizer(sae.parameters(), cfg, 1e-4)
    step = our_step(cfg, method, sae, x, opt, args.autocast)
    step()  # Adam state and gradients now exist
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        print(json.dumps({"kind": "cuda_max_memory_allocated", "resident_MB": resident / 2**20, "peak_MB": torch.cuda.max_memory_allocated() / 2**20}))
        return
    resident = _status_mb("VmRSS")
    try:  # reset the kernel's peak-RSS mark so that the peak is that of the steps alone (Linux)
        Path("/proc/self/clear_refs").write_text("5")
        kind = "cpu_peak_rss_of_steady_steps (VmHWM after reset)"
    except OSError:
        kind = "cpu_max_rss_of_process"
    for _ in range(2):
        step()
    peak = _status_mb("VmHWM") if kind.startswith("cpu_peak") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"kind": kind, "resident_MB": resident, "peak_MB": peak, "import_and_setup_MB": _import_baseline_mb}))


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


_import_baseline_mb = _status_mb("VmRSS") if sys.platform == "linux" else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--autocast", action="store_true", help="also time the step under bf16 autocast")
    ap.add_argument("--small", action="store_true", help="small shapes (d_in 192, 4,096 latents, batch 1,024) for a quick look")
    ap.add_argument("--methods", nargs="*", default=list(METHOD_VARIANTS), choices=list(METHOD_VARIANTS), metavar="METHOD",
                    help=f"other activation methods to time (default all: {' '.join(METHOD_VARIANTS)}); none: TopK only")
    ap.add_argument("--skip-memory", action="store_true", help="skip the peak-memory subprocess")
    ap.add_argument("--no-reference", action="store_true", help="skip the dense-reference TopK step (5x a step; not needed for the methods table)")
    ap.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_step.json"))
    args = ap.parse_args()
    if args.small:
        args.d_in, args.n, args.batch = 192, 4096, 1024
    if args.memory_only:
        memory_only(args)
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    cfg, method, sae, x = build(args)
    dev = args.device
    opt = make_optimizer(sae.parameters(), cfg, 1e-4)
    plain_adam = torch.optim.Adam(sae.parameters(), lr=1e-4)

    def matmul():
        with torch.no_grad():
            F.linear(x, sae.encoder_weight, sae.b_enc)

    pre_buffer = torch.empty(args.batch, args.n, device=dev)

    def matmul_into_buffer():
        with torch.no_grad():
            torch.addmm(sae.b_enc, x, sae.encoder_weight.t(), out=pre_buffer)

    def dense_reference():
        pre = F.linear(x - sae.b_dec, sae.encoder_weight, sae.b_enc)
        top = pre.topk(args.k, dim=-1)
        z = torch.zeros_like(pre).scatter(1, top.indices, F.relu(top.values))
        x_hat = z @ sae.W_dec + sae.b_dec
        loss = (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        plain_adam.zero_grad(set_to_none=True)
        loss.backward()
        sae.project_decoder_grad()
        plain_adam.step()
        sae.normalize_decoder()

    fns = {"matmul": matmul, "matmul_into_buffer": matmul_into_buffer, "saebench": our_step(cfg, method, sae, x, opt, False)}
    if args.autocast:
        fns["saebench_autocast"] = our_step(cfg, method, sae, x, opt, True)
    if not args.no_reference:
        fns["dense_reference"] = dense_reference
    for name in args.methods:
        fns[f"method:{name}"] = method_step(name, args, x)
    if args.methods:
        fns |= floor_steps(args, x, sae.encoder_weight.detach(), sae.b_enc.detach())
    res = bm.timed_interleaved(fns, args.repeats, dev)
    load = {"before": load_before, "after": os.getloadavg() if hasattr(os, "getloadavg") else None, "cores": os.cpu_count()}
    med = {k: statistics.median(v) for k, v in res.items()}
    # Each round's ratio to that round's matmul, then the median: robust to load that shifts between rounds.
    ratios = {k: statistics.median(t / m for t, m in zip(v, res["matmul"])) for k, v in res.items()}
    methods_report = {"topk": {"seconds": med["saebench"], "over_matmul": ratios["saebench"]}} | {
        (k.split(":", 1)[1] if k.startswith("method:") else k): {"seconds": med[k], "over_matmul": ratios[k]}
        for k in res if k.startswith(("method:", "floor:"))}
    print(f"{'method':<26}{'step s':>9}{'x matmul':>10}   (target <= 1.6x; matmul {med['matmul']:.3f} s; load {load})")
    for k, v in methods_report.items():
        print(f"{k:<26}{v['seconds']:>9.3f}{v['over_matmul']:>10.2f}")
    device_name = dev if dev == "cpu" else torch.cuda.get_device_name()
    tf32 = dev.startswith("cuda") and torch.backends.cuda.matmul.allow_tf32
    if args.skip_memory:
        report = {"shapes": {"d_in": args.d_in, "n_latents": args.n, "k": args.k, "batch_tokens": args.batch, "dtype": "float32"},
                  "device": device_name, "tf32": tf32, "threads": torch.get_num_threads(), "load_average": load,
                  "torch": torch.__version__, "command": " ".join(sys.argv), "median_seconds": med, "all_seconds": res,
                  "methods_step_over_matmul": methods_report}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
        return

    cmd = [sys.executable, __file__, "--memory-only", "--d-in", str(args.d_in), "--n", str(args.n), "--k", str(args.k), "--batch", str(args.batch), "--device", dev]
    mem = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    params = sum(p.numel() for p in sae.parameters()) * 4
    B, n, k, d = args.batch, args.n, args.k, args.d_in
    components = {
        "parameters": params / 2**20,
        "gradients": params / 2**20,
        "adam_state (exp_avg, exp_avg_sq)": 2 * params / 2**20,
        "batch x [B, d]": B * d * 4 / 2**20,
        "dense pre-activations [B, n] (no autograd)": B * n * 4 / 2**20,
        "topk workspace / indices [B, k]": B * k * 12 / 2**20,
        "sparse backward: COO code [B·k] + x̂, residual [B, d]": (B * k * 20 + 3 * B * d * 4) / 2**20,
    }
    report = {
        "shapes": {"d_in": d, "n_latents": n, "k": k, "batch_tokens": B, "dtype": "float32"},
        "device": device_name, "tf32": tf32, "threads": torch.get_num_threads(), "load_average": load, "platform": platform.platform(),
        "torch": torch.__version__, "command": " ".join(sys.argv),
        "median_seconds": med, "all_seconds": res,
        "saebench_step_over_matmul": med["saebench"] / med["matmul"],
        "saebench_step_over_matmul_into_buffer": med["saebench"] / med["matmul_into_buffer"],
        "dense_reference_over_saebench": med["dense_reference"] / med["saebench"] if "dense_reference" in med else None,
        "methods_step_over_matmul": methods_report,
        "memory": {"peak_of_a_training_step": mem, "components_MB": components, "components_total_MB": sum(components.values())},
    }
    if args.autocast:
        report["saebench_autocast_over_saebench"] = med["saebench_autocast"] / med["saebench"]
    print(f"dense encoder matmul          {med['matmul']:.3f} s")
    print(f"  same, into a reused buffer  {med['matmul_into_buffer']:.3f} s   (no page faults for a fresh [B, n] output)")
    print(f"saebench TopK step            {med['saebench']:.3f} s   = {report['saebench_step_over_matmul']:.2f}x the matmul (target <= 1.5x), "
          f"{report['saebench_step_over_matmul_into_buffer']:.2f}x the buffered matmul")
    if args.autocast:
        print(f"saebench TopK step, bf16 ac.  {med['saebench_autocast']:.3f} s   = {report['saebench_autocast_over_saebench']:.2f}x the fp32 step")
    if "dense_reference" in med:
        print(f"dense-reference TopK step     {med['dense_reference']:.3f} s   = {report['dense_reference_over_saebench']:.2f}x slower than saebench")
    print(f"peak memory of a training step ({mem['kind']}): {mem['peak_MB']:.0f} MB; resident between steps {mem['resident_MB']:.0f} MB, "
          f"of which {mem.get('import_and_setup_MB', float('nan')):.0f} MB is the process after importing torch and saebench")
    print("  made of: " + ", ".join(f"{k} {v:.0f} MB" for k, v in components.items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
