"""Why a vSAE's inference L0 is below k: how many latents have a positive mean per held-out token.

Inference keeps the top k of μ = ReLU(pre), so a token with fewer than k positive pre-activations
fires fewer than k latents. For each SAE folder given, on the first ``--tokens`` held-out tokens of
the default corpus at the SAE's hook: positive pre-activations per token (mean, p10/p50/p90), the
fraction of tokens with fewer than k, the k-th and the largest pre-activation (medians) and the L0.
Writes benchmarks/results/vsae_positive_means.json. docs/METHODS_IMPLEMENTED.md reads it.

    OMP_NUM_THREADS=2 python benchmarks/diag_vsae_positive_means.py runs/bench_methods_s3/saes/vsae runs/bench_methods_s3/saes/vsae_det
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> dict:
    from saebench import models, text
    from saebench.evals.common import load_eval_tokens
    from saebench.sae import SAE

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sae_dirs", nargs="+")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--out", default=str(HERE / "results" / "vsae_positive_means.json"))
    a = p.parse_args(argv)
    saes = {d: SAE.load(d) for d in a.sae_dirs}
    first = next(iter(saes.values()))
    model = models.load_model(first.cfg.model_name or None)
    toks = load_eval_tokens(model, "default", a.tokens, first.cfg.context_size or 128)
    hook = first.cfg.hook_name
    with torch.no_grad():
        _, cache = model.run_with_cache(toks, names_filter=lambda n: n == hook, stop_at_layer=first.cfg.hook_layer + 1)
    keep = ~torch.isin(toks.flatten(), text.special_ids(model.tokenizer))
    x = cache[hook].flatten(0, 1)[keep].float()
    out = {"tokens": int(x.shape[0]), "hook": hook, "saes": {}}
    for d, sae in saes.items():
        with torch.no_grad():
            pre = F.linear(sae.center(x), sae.encoder_weight, sae.b_enc)
            n_pos = (pre > 0).sum(-1).float()
            top = pre.topk(sae.cfg.k, -1).values
            l0 = (sae.encode(x) != 0).sum(-1).float().mean().item()
        q = torch.quantile(n_pos, torch.tensor([0.1, 0.5, 0.9])).tolist()
        r = {"method": sae.cfg.method, "k": sae.cfg.k, "positive_per_token_mean": n_pos.mean().item(), "positive_p10_p50_p90": q,
             "fraction_of_tokens_below_k": (n_pos < sae.cfg.k).float().mean().item(), "kth_pre_median": top[:, -1].median().item(),
             "top1_pre_median": top[:, 0].median().item(), "l0": l0}
        out["saes"][d] = r
        print(f"{d}: {r}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
