"""Core evaluation of a transcoder: its prediction spliced in at the target hook (issue #18.7).

One clean forward gives both the input x (``hook_name``) and the target y (``hook_name_out``); the
transcoder predicts ŷ = W_dec f(x) + b_dec (+ W_skip x). The metrics are the core eval's (``evals/core.py``)
with y in the place of x:

- ``fvu`` etc.: Σ‖y − ŷ‖² / Σ‖y − ȳ‖² over non-special tokens (FVU *against the target*);
- ``ce_loss_score`` = (CE_zero − CE_tc) / (CE_zero − CE_clean) and ``kl_div_score`` with the target hook
  replaced by ŷ (CE_tc) or zeroed at every position (CE_zero), e.g. the MLP's output replaced by the
  transcoder's: how much of what the replaced component contributes to the next-token loss the transcoder
  carries. Special positions keep their clean activation, as for SAEs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from saebench.activations import token_mask
from saebench.site import Site
from saebench.sae import SAE, refuse_transcoders  # noqa: F401 (public here too)


@torch.no_grad()
def evaluate_transcoder_core(sae: SAE, model, tokens: Tensor, *, special_ids: Tensor | None = None, batch_size: int = 16,
                             downstream: bool = True, progress: bool = True) -> dict[str, Any]:
    """All core metrics of transcoder ``sae`` on ``tokens`` [n_seq, ctx], its output spliced at ``hook_name_out``."""
    from saebench.evals.core import ZeroAblation, clean_terms, spliced_logits, zero_terms

    from saebench.models import validate_hook_name

    if not sae.cfg.is_transcoder or not sae.cfg.hook_name_out:
        raise ValueError("not a transcoder: its cfg has no d_out / hook_name_out")
    hook_in, head_in = Site.of_sae(sae)
    hook_out = sae.cfg.hook_name_out
    for h in (hook_in, hook_out):
        validate_hook_name(model, h)
    names = {hook_in, hook_out}
    acc = target_accumulator(sae)
    zero = ZeroAblation(model, hook_out, None)
    for start in tqdm(range(0, tokens.shape[0], batch_size), desc="transcoder eval", disable=not progress):
        toks = tokens[start : start + batch_size].to(sae.device)
        keep = token_mask(toks, special_ids)
        logits_clean, cache = model.run_with_cache(toks, names_filter=lambda n: n in names)
        x_full = Site(hook_in, head_in).flatten(cache[hook_in]).float()
        y_full = Site(hook_out).flatten(cache[hook_out]).float()
        if x_full.shape[-1] != sae.d_in or y_full.shape[-1] != sae.d_out:
            raise ValueError(f"transcoder {sae.d_in} -> {sae.d_out} does not match this model's widths {x_full.shape[-1]} ({hook_in}) -> "
                             f"{y_full.shape[-1]} ({hook_out})")
        x, y = x_full[keep], y_full[keep]
        acts = sae.encode_sparse(x)
        y_hat = sae.add_skip(sae.decode_sparse(acts), x).float()
        acc.add_reconstruction(y, y_hat, acts)
        if downstream:
            recon = y_full.clone()
            recon[keep] = y_hat
            site = y_full
            lp_clean = F.log_softmax(logits_clean.float(), -1)
            clean = clean_terms(lp_clean)
            ce_zero, kl_zero = zero_terms(zero.logprobs(toks, site, logits_clean), toks, keep, clean)
            logits_tc = spliced_logits(model, hook_out, None, toks, site, recon, keep, logits_clean)
            acc.add_downstream(toks, keep, logits_tc, logprobs_clean=lp_clean, clean=clean, ce_zero=ce_zero, kl_zero=kl_zero)
    out = acc.result(downstream)
    return out | {"hook_name_out": hook_out, "d_out": sae.d_out, "skip_connection": bool(sae.cfg.skip_connection),
                  "fvu_target": "hook_name_out (the transcoder's prediction against the target activation)"}


@torch.no_grad()
def evaluate_transcoder_activations(sae: SAE, source, *, max_tokens: int | None = None, batch_size: int = 4096, split: str | None = None,
                                    progress: bool = False) -> dict[str, Any]:
    """``evaluate_activations`` for a transcoder: FVU etc. of its prediction against the target, on a source that holds both
    hooks (``hook_name`` and ``hook_name_out``, e.g. a two-hook harvest or cache); no model, so no CE/KL."""
    from saebench.sources import source_provenance

    need = [sae.cfg.hook_name, sae.cfg.hook_name_out]
    missing = [h for h in need if h not in source.hook_names]
    if missing:
        raise ValueError(f"a transcoder is evaluated on (input, target) pairs: the source must hold {need}, it has {source.hook_names}")
    if source.n_chunks is None and max_tokens is None:
        raise ValueError(f"{type(source).__name__} is unbounded; pass max_tokens")
    acc = target_accumulator(sae)
    seen, i = 0, 0
    bar = tqdm(total=max_tokens, desc="evaluate transcoder", disable=not progress)
    while (source.n_chunks is None or i < source.n_chunks) and (max_tokens is None or seen < max_tokens):
        chunk = source.chunk(i)
        i += 1
        xs, ys = chunk.acts[need[0]], chunk.acts[need[1]]
        for s in range(0, xs.shape[0], batch_size):
            n = batch_size if max_tokens is None else min(batch_size, max_tokens - seen)
            if n <= 0:
                break
            x, y = xs[s : s + n].to(sae.device).float(), ys[s : s + n].to(sae.device).float()
            if not x.shape[0]:
                break
            acts = sae.encode_sparse(x)
            acc.add_reconstruction(y, sae.add_skip(sae.decode_sparse(acts), x).float(), acts)
            seen += x.shape[0]
            bar.update(x.shape[0])
    bar.close()
    if seen == 0:
        raise ValueError("no activations to evaluate (the source is empty)")
    prov = source_provenance(source)
    return acc.result(downstream=False) | {"evaluated_hook_name": need[0], "hook_name_out": need[1], "outlier_batch_tokens": batch_size,
                                           "split": split, "source": prov if prov is not None else {"description": type(source).__name__}}


class _NoAFA:
    """The approximate-feature-activation metrics compare a code with the input it reconstructs; a transcoder has none."""

    def add(self, *_):
        pass

    def result(self) -> dict:
        return {}


def target_accumulator(sae: SAE):
    """The core eval's running sums, sized for the transcoder's output (d_out) instead of its input."""
    from types import SimpleNamespace

    from saebench.evals.core import CoreAccumulator, _Sums

    acc = CoreAccumulator(sae)
    acc.sae = SimpleNamespace(cfg=sae.cfg, d_in=sae.d_out, d_sae=sae.d_sae)  # the summary's widths: the target's
    acc.sums = _Sums(sum_x=torch.zeros(sae.d_out, dtype=torch.float64), sum_x_in=torch.zeros(sae.d_out, dtype=torch.float64),
                     fires=torch.zeros(sae.d_sae, dtype=torch.long))
    acc.afa = _NoAFA()
    return acc


