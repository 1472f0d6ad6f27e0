"""The SAELens side of ``bench_saelens_load.py``: runs in ``benchmarks/envs/saelens`` and imports nothing from saebench.

1. ``SAE.load_from_disk(folder)`` on each saebench folder **as saebench wrote it** (no alias, no copy), with
   every warning recorded; encode and decode the given inputs; write the latents and reconstructions.
2. Build SAELens' own TopK and AbsTopK SAEs with ``rescale_acts_by_decoder_norm=True`` and decoder rows of
   norms 0.05-4, save them with SAELens (``save_model``), reload them with ``load_from_disk`` and write
   their encode/decode of the same inputs, for saebench to load and compare.

    benchmarks/envs/saelens/bin/python benchmarks/saelens_load_worker.py --inputs X.safetensors --out OUT_DIR SAE_DIR...
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def encode_decode(sae, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        z = sae.encode(x.to(sae.dtype))
        return {"z": z.float().contiguous(), "x_hat": sae.decode(z).float().contiguous()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sae_dirs", nargs="*")
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--d-sae", type=int, default=256)
    args = ap.parse_args()
    import sae_lens
    from sae_lens import SAE
    from sae_lens.saes.abstopk_sae import AbsTopKSAE, AbsTopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x = load_file(args.inputs)["x"]
    report: dict = {"sae_lens_version": sae_lens.__version__, "torch": torch.__version__, "loaded": {}, "written": {}}
    for d in args.sae_dirs:
        name = Path(d).name
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                sae = SAE.load_from_disk(d, device="cpu")
            except Exception as e:  # noqa: BLE001 - reported, not fatal: the point is to see what loads
                report["loaded"][name] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
                continue
        save_file(encode_decode(sae, x), str(out / f"loaded_{name}.safetensors"))
        report["loaded"][name] = {"ok": True, "class": type(sae).__name__, "warnings": [str(w.message)[:200] for w in caught],
                                  "rescale_acts_by_decoder_norm": getattr(sae.cfg, "rescale_acts_by_decoder_norm", None)}

    g = torch.Generator().manual_seed(1)
    d_in, d_sae = x.shape[-1], args.d_sae
    for cls, cfg_cls in ((TopKSAE, TopKSAEConfig), (AbsTopKSAE, AbsTopKSAEConfig)):
        cfg = cfg_cls(d_in=d_in, d_sae=d_sae, k=16, rescale_acts_by_decoder_norm=True, dtype="float32",
                      metadata=SAEMetadata(hook_name="blocks.0.hook_resid_post", model_name="synthetic"))
        sae = cls(cfg)
        with torch.no_grad():
            sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=g) / d_in**0.5)
            w_dec = torch.randn(d_sae, d_in, generator=g)
            norms = torch.empty(d_sae).uniform_(0.05, 4.0, generator=g)
            sae.W_dec.copy_(w_dec / w_dec.norm(dim=-1, keepdim=True) * norms[:, None])
            sae.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.1)
            sae.b_dec.copy_(torch.randn(d_in, generator=g) * 0.1)
        folder = out / f"saelens_{cfg.architecture()}_rescaled"
        sae.save_model(folder)
        reloaded = SAE.load_from_disk(str(folder), device="cpu")
        save_file(encode_decode(reloaded, x), str(out / f"written_{folder.name}.safetensors"))
        report["written"][folder.name] = {"class": type(reloaded).__name__, "folder": str(folder),
                                          "decoder_norm_range": [float(norms.min()), float(norms.max())]}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
