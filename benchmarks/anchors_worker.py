"""One library's TopK training step, timed against the dense encoder matmul in the same process.

Run by bench_vs_anchors.py with each library's own interpreter (SAELens and sparsify live in their own
venvs under benchmarks/envs/); depends only on torch and the library. Prints one JSON line.

    python anchors_worker.py {saebench,saelens,saelens_sparse,sparsify} --d-in 576 --n 16384 --k 32 --batch 4096
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def saebench_step(x, args):
    from saebench.trainers import get_method
    from saebench.trainers.base import StepInput
    from saebench.trainers.loop import make_optimizer

    from saebench.config import TrainConfig
    from saebench.sae import SAE

    cfg = TrainConfig(hook_name="bench", d_sae=args.n, k=args.k, training_tokens=args.batch * 10, batch_size_tokens=args.batch,
                      method_options={"auxk_coef": 0.0}, lr=1e-4)
    method = get_method("topk")(cfg)
    sae = SAE(method.sae_config(args.d_in))
    sae.init_tied(torch.Generator().manual_seed(0))
    opt = make_optimizer(sae.parameters(), cfg, 1e-4)

    def step():
        out = method.step(sae, StepInput(x=x, dead_mask=None, step=0))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.project_decoder_grad()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        sae.normalize_decoder()

    import saebench

    return step, (sae.encoder_weight, sae.b_enc), {"version": getattr(saebench, "__version__", "dev")}


def saelens_step(x, args, sparse: bool = False):
    import sae_lens
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=args.d_in, d_sae=args.n, k=args.k, aux_loss_coefficient=0.0, use_sparse_activations=sparse,
                                                device="cpu", dtype="float32"))
    trainer = SAETrainer(SAETrainerConfig(total_training_samples=args.batch * 1000, train_batch_size_samples=args.batch, lr=1e-4, lr_end=1e-4, device="cpu"),
                         sae, data_provider=iter(()))

    def step():
        # SAETrainer.step is SAELens's public per-batch seam (fit() calls it): forward, loss, backward,
        # grad clipping, Adam, LR schedule, firing statistics.
        trainer.step(x)

    return step, (sae.W_enc.T, sae.b_enc), {"version": sae_lens.__version__, "use_sparse_activations": sparse}


def sparsify_step(x, args):
    import importlib.metadata

    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(args.d_in, SparseCoderConfig(num_latents=args.n, k=args.k), device="cpu", dtype=torch.float32)
    adam = torch.optim.Adam(sae.parameters(), lr=1e-4)  # what sparsify.Trainer uses for optimizer="adam" without bitsandbytes

    def step():
        # The body of sparsify.Trainer.fit for one local (FVU) step, minus the LM forward and hooks.
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x, dead_mask=None)
        loss = out.fvu + 0.0 * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        adam.step()
        adam.zero_grad()

    return step, (sae.encoder.weight, sae.encoder.bias), {"version": importlib.metadata.version("eai-sparsify")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("lib", choices=["saebench", "saelens", "saelens_sparse", "sparsify"])
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, args.d_in, generator=torch.Generator().manual_seed(0))  # identical data in every venv (same torch)
    t0 = time.perf_counter()
    if args.lib == "saebench":
        step, (w, b), info = saebench_step(x, args)
    elif args.lib.startswith("saelens"):
        step, (w, b), info = saelens_step(x, args, sparse=args.lib == "saelens_sparse")
    else:
        step, (w, b), info = sparsify_step(x, args)
    setup = time.perf_counter() - t0

    def matmul():
        with torch.no_grad():
            F.linear(x, w, b)

    fns = {"matmul": matmul, "step": step}
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"lib": args.lib, "torch": torch.__version__, "threads": torch.get_num_threads(), "setup_seconds": setup,
                      "median_seconds": med, "all_seconds": times, "step_over_matmul": med["step"] / med["matmul"]} | info))


if __name__ == "__main__":
    main()
