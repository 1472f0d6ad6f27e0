"""TopK training-step speed: our sparse step vs the unavoidable dense encoder matmul, side by side.

Measures, in one process on identical shapes and threads:
- ``matmul``: the dense encoder forward x @ W_encᵀ (the work no TopK trainer can avoid);
- ``saebench``: a full training step of the `topk` method (encode, sparse decode, AuxK off, backward,
  decoder-gradient projection, Adam, renormalisation);
- ``dense_reference``: the same step written the usual dense way (scatter codes into a [B, n]
  tensor, dense decode, dense autograd), as SAELens and dictionary_learning do.

Prints the ratios and writes benchmarks/results/train_step.json. Default shapes are the issue's:
d_in 576, 16,384 latents, k 32, batch 4,096, fp32.

    python benchmarks/bench_train_step.py [--d-in 576 --n 16384 --k 32 --batch 4096 --repeats 5 --device cpu]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from saebench.config import TrainConfig
from saebench.sae import SAE
from saebench.trainers import get_method
from saebench.trainers.base import StepInput


def timed(fn, repeats: int, device: str) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_step.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = args.device
    cfg = TrainConfig(hook_name="bench", d_sae=args.n, k=args.k, training_tokens=args.batch * 10, batch_size_tokens=args.batch,
                      method_options={"auxk_coef": 0.0})
    method = get_method("topk")(cfg)
    sae = SAE(method.sae_config(args.d_in)).to(dev)
    sae.init_tied(torch.Generator().manual_seed(0))
    x = torch.randn(args.batch, args.d_in, device=dev)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)

    def matmul():
        with torch.no_grad():
            F.linear(x, sae.encoder_weight, sae.b_enc)

    def ours():
        out = method.step(sae, StepInput(x=x, dead_mask=None, step=0))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.project_decoder_grad()
        opt.step()
        sae.normalize_decoder()

    def dense_reference():
        pre = F.linear(x - sae.b_dec, sae.encoder_weight, sae.b_enc)
        top = pre.topk(args.k, dim=-1)
        z = torch.zeros_like(pre).scatter(1, top.indices, F.relu(top.values))
        x_hat = z @ sae.W_dec + sae.b_dec
        loss = (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.project_decoder_grad()
        opt.step()
        sae.normalize_decoder()

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res = {name: timed(fn, args.repeats, dev) for name, fn in (("matmul", matmul), ("saebench", ours), ("dense_reference", dense_reference))}
    med = {k: statistics.median(v) for k, v in res.items()}
    params = sum(p.numel() for p in sae.parameters()) * 4
    report = {
        "shapes": {"d_in": args.d_in, "n_latents": args.n, "k": args.k, "batch_tokens": args.batch, "dtype": "float32"},
        "device": dev if dev == "cpu" else torch.cuda.get_device_name(), "threads": torch.get_num_threads(), "platform": platform.platform(),
        "median_seconds": med, "all_seconds": res,
        "saebench_step_over_matmul": med["saebench"] / med["matmul"],
        "dense_reference_over_saebench": med["dense_reference"] / med["saebench"],
        "memory": {
            "parameters_MB": params / 2**20, "adam_state_MB": 2 * params / 2**20, "gradients_MB": params / 2**20,
            "dense_pre_activations_MB": args.batch * args.n * 4 / 2**20,
            "process_peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_rss_before_steps_MB": rss0 / 1024,
        },
    }
    print(f"dense encoder matmul          {med['matmul']:.3f} s")
    print(f"saebench TopK step            {med['saebench']:.3f} s   = {report['saebench_step_over_matmul']:.2f}x the matmul (target <= 1.5x)")
    print(f"dense-reference TopK step     {med['dense_reference']:.3f} s   = {report['dense_reference_over_saebench']:.2f}x slower than saebench")
    print(f"memory: params {report['memory']['parameters_MB']:.0f} MB, Adam {report['memory']['adam_state_MB']:.0f} MB, grads "
          f"{report['memory']['gradients_MB']:.0f} MB, dense pre-acts {report['memory']['dense_pre_activations_MB']:.0f} MB; "
          f"peak RSS {report['memory']['process_peak_rss_MB']:.0f} MB")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
