"""saebench folders loaded by the real SAELens, and SAELens' rescaled folders loaded by saebench (issue 14, points 1-2).

1. Trains tiny SAEs with saebench (topk, jumprelu, batchtopk, abstopk; synthetic activations, d_in 64,
   256 latents, 200 steps) and saves them as saebench does, plus a random plain-ReLU SAE (the e2e
   methods' inference form; they need a language model to train).
2. In SAELens' own environment (``bash benchmarks/make_anchor_envs.sh saelens``: sae-lens 6.x with
   transformer-lens < 4), ``saelens_load_worker.py`` loads each folder with ``sae_lens.SAE.load_from_disk``
   exactly as written (no alias, no copy) and encodes/decodes 4,096 fresh inputs; it also writes
   SAELens TopK / AbsTopK SAEs with ``rescale_acts_by_decoder_norm=True`` and decoder norms 0.05-4.
3. Back here, saebench's ``load_sae`` loads all of them and encodes/decodes the same inputs; the
   latents and reconstructions are compared (max |Δ|, relative to the largest value, and the
   fraction of tokens whose active-latent set is identical).

Writes ``benchmarks/results/saelens_load.json`` and ``.md``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_saelens_load.py
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
SAELENS_PY = HERE / "envs" / "saelens" / "bin" / "python"
HOOK = "blocks.0.hook_resid_post"
METHODS = ("topk", "jumprelu", "batchtopk", "abstopk")


def train_saes(root: Path, d_in: int, d_sae: int, k: int, steps: int) -> dict[str, Path]:
    from saebench.activations import SyntheticSource
    from saebench.config import TrainConfig
    from saebench.trainers.loop import train

    out = {}
    for method in METHODS:
        src = SyntheticSource(d=d_in, m=2 * d_sae, n_active=6, bidirectional=2 * d_sae if method == "abstopk" else 0, seed=5,
                              chunk_tokens=8192, hook_name=HOOK)
        cfg = TrainConfig(hook_name=HOOK, method=method, d_sae=d_sae, k=k, training_tokens=512 * steps, batch_size_tokens=512, lr=3e-3,
                          out_dir=str(root / method), checkpoint_every_steps=10_000, dead_window_tokens=4096, eval_tokens=0, resume=False)
        train(cfg, source=src, progress=False)
        out[method] = root / method
    # a plain ReLU SAE (the inference form of the e2e methods, which need a language model to train): random weights
    from saebench.sae import SAE, SAEConfig

    relu = SAE(SAEConfig(architecture="relu", d_in=d_in, d_sae=d_sae, hook_name=HOOK))
    relu.init_tied(torch.Generator().manual_seed(3))
    with torch.no_grad():
        relu.b_enc.uniform_(-0.5, 0.1, generator=torch.Generator().manual_seed(4))
    out["relu"] = relu.save(root / "relu")
    return out


def compare(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> dict[str, float]:
    z, zt, xh, xht = ours["z"], theirs["z"], ours["x_hat"], theirs["x_hat"]
    return {
        "max_abs_dz": float((z - zt).abs().max()),
        "max_abs_z": float(zt.abs().max()),
        "max_abs_dx_hat": float((xh - xht).abs().max()),
        "max_abs_x_hat": float(xht.abs().max()),
        "same_active_set_fraction": float(((z != 0) == (zt != 0)).all(-1).float().mean()),
        "mean_l0": float((zt != 0).sum(-1).float().mean()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d-in", type=int, default=64)
    ap.add_argument("--d-sae", type=int, default=256)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--work", default=str(HERE / "cache" / "saelens_load"))
    ap.add_argument("--out", default=str(HERE / "results" / "saelens_load.json"))
    args = ap.parse_args()
    if not SAELENS_PY.exists():
        sys.exit(f"{SAELENS_PY} is missing: run `bash benchmarks/make_anchor_envs.sh saelens` first")
    from saebench.sae import load_sae

    torch.set_num_threads(1)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    dirs = train_saes(work / "saebench", args.d_in, args.d_sae, args.k, args.steps)
    train_s = time.perf_counter() - t0
    x = torch.randn(args.tokens, args.d_in, generator=torch.Generator().manual_seed(11)) * 1.5
    save_file({"x": x}, str(work / "inputs.safetensors"))
    t1 = time.perf_counter()
    proc = subprocess.run([str(SAELENS_PY), str(HERE / "saelens_load_worker.py"), "--inputs", str(work / "inputs.safetensors"),
                           "--out", str(work / "saelens"), "--d-sae", str(args.d_sae), *map(str, dirs.values())],
                          capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    if proc.returncode != 0:
        sys.exit(f"the SAELens worker failed:\n{proc.stderr[-3000:]}")
    worker = json.loads(proc.stdout.strip().splitlines()[-1])
    worker_s = time.perf_counter() - t1

    rows = {}
    for method, d in dirs.items():
        info = worker["loaded"][d.name]
        row = {"direction": "saebench folder -> sae_lens.SAE.load_from_disk", "files": sorted(p.name for p in d.iterdir()), **info}
        if info["ok"]:
            sae = load_sae(d)
            with torch.no_grad():
                ours = {"z": sae.encode(x), "x_hat": sae(x)}
            row |= compare(ours, load_file(str(work / "saelens" / f"loaded_{d.name}.safetensors")))
        rows[f"saebench_{method}"] = row
    for name, info in worker["written"].items():
        sae = load_sae(info["folder"])
        theirs = load_file(str(work / "saelens" / f"written_{name}.safetensors"))
        with torch.no_grad():
            ours = {"z": sae.encode(x), "x_hat": sae(x)}
            norms = sae.W_dec.norm(dim=-1)
            # the control: the same folder read as before the fold (flag ignored), i.e. what the issue measured
            plain = load_sae(info["folder"])
            plain_w = load_file(str(Path(info["folder"]) / "sae_weights.safetensors"))
            plain.encoder_weight.copy_(plain_w["W_enc"].T)
            plain.W_dec.copy_(plain_w["W_dec"])
            plain.b_enc.copy_(plain_w["b_enc"])
            unfolded = plain(x)
        rows[name] = {"direction": "SAELens folder (rescale_acts_by_decoder_norm) -> saebench.load_sae", "class": info["class"],
                      "decoder_norm_range": info["decoder_norm_range"], "our_decoder_row_norms_after_fold": [float(norms.min()), float(norms.max())],
                      **compare(ours, theirs), "control_max_abs_dx_hat_without_fold": float((unfolded - theirs["x_hat"]).abs().max())}
    result = {"sae_lens_version": worker["sae_lens_version"], "torch_saelens_env": worker["torch"], "torch": torch.__version__,
              "python": platform.python_version(), "d_in": args.d_in, "d_sae": args.d_sae, "k": args.k, "steps": args.steps,
              "tokens": args.tokens, "train_seconds": round(train_s, 1), "worker_seconds": round(worker_s, 1), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"SAELens {result['sae_lens_version']} (its own venv) vs saebench, {args.tokens:,} random inputs, d_in {args.d_in}, "
             f"{args.d_sae} latents, k {args.k}; float32 on CPU.", "",
             "| folder | direction | SAELens class | loads | warnings | same active set | max abs dz / max abs z | max abs dx_hat / max abs x_hat |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if r.get("ok", True):
            lines.append(f"| {name} | {r['direction']} | {r.get('class', '')} | yes | {len(r.get('warnings', []))} | "
                         f"{r['same_active_set_fraction']:.4f} | {r['max_abs_dz']:.2e} / {r['max_abs_z']:.3g} | "
                         f"{r['max_abs_dx_hat']:.2e} / {r['max_abs_x_hat']:.3g} |")
        else:
            lines.append(f"| {name} | {r['direction']} | | **no**: {r['error']} | | | | |")
    for name, r in rows.items():
        if "control_max_abs_dx_hat_without_fold" in r:
            lines.append(f"\nControl, {name}: read without folding the decoder norms (the flag ignored, as before issue 14), "
                         f"max abs dx_hat = {r['control_max_abs_dx_hat_without_fold']:.3g} (of {r['max_abs_x_hat']:.3g}).")
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
