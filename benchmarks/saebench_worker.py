"""SAEBench's core eval on one saebench SAE folder and a fixed token tensor; prints one JSON line.

Runs inside ``benchmarks/envs/saebench`` (sae-bench 0.6 with sae-lens 6 and transformer-lens < 4; make
it with ``bash benchmarks/make_anchor_envs.sh saebench``), driven by ``bench_vs_saebench.py``. It
imports nothing from saebench.

- Model: the de-quantised SmolLM2-135M checkpoint saebench caches (``~/.cache/saebench/models/
  smollm2-135m``), loaded offline with ``AutoModelForCausalLM`` and handed to TransformerLens'
  ``HookedTransformer.from_pretrained_no_processing(<checkpoint dir>, hf_model=..., tokenizer=...)``,
  the loader SAEBench's own ``multiple_evals`` uses (no weight processing). TransformerLens 3 has no
  official name for SmolLM2, but its config converter reads a local checkpoint directory; only its
  official-name lookup is told to let that directory stand for itself.
- SAE: loaded by sae-lens (``SAE.load_from_disk``, on a temporary folder holding the cfg.json and the
  weights as ``sae_weights.safetensors``: saebench writes that name since 2026-11-25, older folders
  hold ``sae.safetensors``), the path SAEBench takes for SAELens SAEs; if
  sae-lens refuses it, the weights go into SAEBench's own ``custom_saes`` TopK / JumpReLU class.
  Either way ``general_utils.load_and_format_sae`` standardises it as SAEBench does.
- Tokens: SAEBench's ``run_evals`` takes an ``ActivationsStore`` and only calls
  ``get_batch_tokens(n)`` / ``reset_input_dataset()`` on it (and reads ``context_size``); a small
  stand-in serves the given rows in order, so both tools see exactly the same tokens. The
  reconstruction (CE/KL) pass and the sparsity/variance pass each read all the rows.
- Settings as SAEBench's ``multiple_evals`` (its CLI): every scalar metric on, featurewise density
  statistics on, ``exclude_special_tokens_from_reconstruction`` on, ``ignore_tokens`` = {pad, eos,
  bos}. Its featurewise weight-based metrics (max encoder/decoder cosine per latent) have no
  counterpart in our eval: they are timed apart and kept out of ``eval_seconds``.

    python saebench_worker.py --sae-dir runs/bench_suite/topk --tokens tokens.safetensors --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


class FixedTokenStore:
    """The part of sae_lens' ActivationsStore that SAEBench's core eval uses, serving fixed rows in order."""

    def __init__(self, tokens, batch_size: int):
        self.tokens = tokens
        self.context_size = int(tokens.shape[1])
        self.store_batch_size_prompts = batch_size
        self.pos = 0
        self.served = 0

    def get_batch_tokens(self, batch_size: int | None = None, **_):
        n = batch_size or self.store_batch_size_prompts
        if self.pos + n > self.tokens.shape[0]:
            raise RuntimeError(f"asked for rows {self.pos}..{self.pos + n} of {self.tokens.shape[0]}; pass a multiple of the batch size")
        out = self.tokens[self.pos : self.pos + n]
        self.pos += n
        self.served += n
        return out

    def reset_input_dataset(self):
        self.pos = 0


def load_model(model_dir: Path, tl_name: str, device: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    raw = json.loads((model_dir / "config.json").read_text())
    hf_cfg = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    # A checkpoint saved by transformers 5 keeps rope_theta under rope_parameters; transformers 4 would
    # silently fall back to its default (10,000) and give a different model.
    theta = (raw.get("rope_parameters") or {}).get("rope_theta", raw.get("rope_theta"))
    if theta is not None and getattr(hf_cfg, "rope_theta", theta) != theta:
        hf_cfg.rope_theta = theta
    if "quantization_config" in raw and raw["quantization_config"] is None:
        # saebench's de-quantised checkpoint records quantization_config: null; TransformerLens 3 reads it
        # with .get() and would crash on None. Not quantised: drop the field.
        delattr(hf_cfg, "quantization_config")
    hf = AutoModelForCausalLM.from_pretrained(model_dir, config=hf_cfg, torch_dtype=torch.float32, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)

    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer

    # TransformerLens 3 has no official name for SmolLM2; its config converter reads a local checkpoint
    # directory (config.json) offline, but from_pretrained first maps the name to an official one.
    # Let a local directory stand for itself there; everything else is TransformerLens' own loading.
    official = loading.get_official_model_name

    def local_or_official(name: str) -> str:
        return name if (Path(name) / "config.json").exists() else official(name)

    loading.get_official_model_name = local_or_official
    try:
        model = HookedTransformer.from_pretrained_no_processing(tl_name, hf_model=hf, tokenizer=tok, device=device, dtype=torch.float32)
    finally:
        loading.get_official_model_name = official
    model.eval()
    return model, {"rope": getattr(hf_cfg, "rope_parameters", None) or getattr(hf_cfg, "rope_theta", None)}


def load_sae(sae_dir: Path, device: str):
    """(sae, how it was loaded, why sae-lens was not used or None)."""
    import torch

    cfg = json.loads((sae_dir / "cfg.json").read_text())
    # saebench.layout's names (not imported: this worker runs in SAEBench's environment): SAELens' name, then the old one.
    weights = next((sae_dir / n for n in ("sae_weights.safetensors", "sae.safetensors") if (sae_dir / n).is_file()), sae_dir / "sae_weights.safetensors")
    tmp = Path(tempfile.mkdtemp(prefix="sae_saelens_"))
    try:
        shutil.copy(sae_dir / "cfg.json", tmp / "cfg.json")
        os.symlink(weights.resolve(), tmp / "sae_weights.safetensors")
        from sae_lens import SAE

        sae = SAE.load_from_disk(str(tmp), device=device)
        return sae, "sae_lens.SAE.load_from_disk", None
    except Exception as e:  # noqa: BLE001 - any refusal by sae-lens falls back to SAEBench's own custom-SAE classes
        why = f"{type(e).__name__}: {str(e)[:400]}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    from safetensors.torch import load_file

    w = load_file(str(weights))
    arch, layer = cfg["architecture"], int(cfg.get("hook_layer", cfg["hook_name"].split(".")[1]))
    common = {"d_in": cfg["d_in"], "d_sae": cfg["d_sae"], "model_name": cfg.get("model_name", ""), "hook_layer": layer,
              "device": torch.device(device), "dtype": torch.float32, "hook_name": cfg["hook_name"]}
    if arch == "topk":
        from sae_bench.custom_saes.topk_sae import TopKSAE

        sae = TopKSAE(k=int(cfg["k"]), **common)
    elif arch == "jumprelu":
        from sae_bench.custom_saes.jumprelu_sae import JumpReluSAE

        sae = JumpReluSAE(**common)
    else:
        raise SystemExit(f"no SAEBench class for architecture {arch!r}")
    b_enc = w["b_enc"]
    if not cfg.get("apply_b_dec_to_input", True):  # SAEBench's classes always encode x − b_dec: fold b_dec into b_enc
        b_enc = b_enc + w["b_dec"] @ w["W_enc"]
    state = {"W_enc": w["W_enc"], "W_dec": w["W_dec"], "b_enc": b_enc, "b_dec": w["b_dec"]}
    if "threshold" in w:
        state["threshold"] = w["threshold"]
    missing = sae.load_state_dict(state, strict=False)
    return sae, f"sae_bench.custom_saes ({type(sae).__name__})", why + (f"; load_state_dict: {missing}" if missing.missing_keys else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sae-dir", required=True)
    ap.add_argument("--tokens", required=True, help="safetensors file with 'tokens' [n_rows, context]")
    ap.add_argument("--model-dir", default=str(Path("~/.cache/saebench/models/smollm2-135m").expanduser()))
    ap.add_argument("--tl-name", default=None, help="name given to HookedTransformer.from_pretrained_no_processing (default: --model-dir)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from sae_bench.evals.core.eval_config import CoreEvalConfig
    from sae_bench.evals.core.main import get_featurewise_weight_based_metrics, run_evals
    from sae_bench.sae_bench_utils import general_utils
    from safetensors.torch import load_file

    tokens = load_file(args.tokens)["tokens"].long()
    if tokens.shape[0] % args.batch_size:
        raise SystemExit(f"{tokens.shape[0]} rows is not a multiple of --batch-size {args.batch_size}")
    n_batches = tokens.shape[0] // args.batch_size

    t = time.time()
    model, model_info = load_model(Path(args.model_dir), args.tl_name or args.model_dir, args.device)
    model_load_s = time.time() - t
    t = time.time()
    sae, loader, fallback_reason = load_sae(Path(args.sae_dir), args.device)
    _, sae, _ = general_utils.load_and_format_sae("saebench", sae, args.device)
    sae = sae.to(device=args.device, dtype=torch.float32)
    sae_load_s = time.time() - t

    cfg = CoreEvalConfig(
        model_name=sae.cfg.model_name, batch_size_prompts=args.batch_size, n_eval_reconstruction_batches=n_batches,
        n_eval_sparsity_variance_batches=n_batches, exclude_special_tokens_from_reconstruction=True, dataset="fixed tokens",
        context_size=int(tokens.shape[1]), compute_kl=True, compute_ce_loss=True, compute_l2_norms=True, compute_sparsity_metrics=True,
        compute_variance_metrics=True, compute_featurewise_density_statistics=True, compute_featurewise_weight_based_metrics=False,
        llm_dtype="float32",
    )
    with torch.no_grad():  # one plain forward over the same rows: the eval's cost in model forwards
        t = time.time()
        for i in range(0, tokens.shape[0], args.batch_size):
            model(tokens[i : i + args.batch_size], return_type="logits")
        forward_s = time.time() - t
    tk = model.tokenizer
    ignore = {tk.pad_token_id, tk.eos_token_id, tk.bos_token_id}
    store = FixedTokenStore(tokens, args.batch_size)
    t = time.time()
    metrics, feature_metrics = run_evals(sae=sae, activation_store=store, model=model, eval_config=cfg, ignore_tokens=ignore)
    eval_s = time.time() - t
    t = time.time()
    weight_metrics = get_featurewise_weight_based_metrics(sae)
    weight_s = time.time() - t

    density = torch.tensor(feature_metrics["feature_density"])
    flat = {k: v for group in metrics.values() for k, v in group.items()}
    flat["frac_alive"] = float((density > 0).float().mean())
    flat["freq_over_1_percent"] = float((density > 0.01).float().mean())
    flat["freq_over_10_percent"] = float((density > 0.1).float().mean())
    from importlib.metadata import version

    print(json.dumps({
        "tool": "saebench", "versions": {p: version(p) for p in ("sae-bench", "sae-lens", "transformer-lens", "transformers", "torch")},
        "sae_loader": loader, "sae_lens_refused": fallback_reason, "model": args.tl_name or args.model_dir, "model_info": model_info,
        "ignore_tokens": sorted(i for i in ignore if i is not None), "rows": int(tokens.shape[0]), "context": int(tokens.shape[1]),
        "tokens": int(tokens.numel()), "batch_size": args.batch_size, "n_batches": n_batches, "rows_served": store.served,
        "threads": torch.get_num_threads(), "model_load_seconds": model_load_s, "sae_load_seconds": sae_load_s, "forward_seconds": forward_s, "eval_seconds": eval_s,
        "weight_metrics_seconds": weight_s, "metrics": flat,
        "weight_metrics_summary": {k: float(torch.tensor(v).mean()) for k, v in weight_metrics.items()},
    }))


if __name__ == "__main__":
    sys.exit(main())
