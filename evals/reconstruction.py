"""Reconstruction eval: the core metrics of ``evals/core.py`` with a cheaper downstream pass.

The metrics and their definitions are exactly ``evaluate_core``'s (FVU, EV, MSE, cossim, L0, L1,
CE loss recovered, KL score, ...). What changes is the cost when several SAEs sit at one hook:
``evaluate_core`` runs two forwards per batch and SAE (clean, spliced); here a batch gets **one**
clean forward (activations + logits) shared by every SAE at that hook, then one spliced forward per
SAE (resumed at the hook where the model allows). The zero-ablation terms are shared too (at a
residual hook they cost one single-sequence pass per eval, see ``core.ZeroAblation``). For N SAEs
that is N + 1 forwards per batch instead of 2N. The same pass also feeds the dead-latent counters
of ``evals/dead.py`` (every position encoded, special ones kept apart), and can run further than
the downstream window on cheap truncated forwards (``stop_at_layer``) when the dead-latent window
is longer.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from saebench.evals.common import one_site
from saebench.evals.core import CoreAccumulator, ZeroAblation, ce_from_logprobs, clean_terms, format_table, spliced_logits, zero_terms
from saebench.evals.dead import DEFAULT_WINDOWS, DeadLatentCounter
from torch import Tensor
from tqdm.auto import tqdm

from saebench.activations import token_mask
from saebench.sae import SAE
from saebench.sparse import SparseActs
from saebench.steering import _flatten, sae_site, stop_layer


@torch.no_grad()
def evaluate_hook_group(
    saes: Sequence[SAE],
    model,
    tokens: Tensor,
    *,
    special_ids: Tensor | None = None,
    core: Sequence[bool] | bool = True,
    dead: Sequence[bool] | bool = False,
    downstream: bool = True,
    core_tokens: int | None = None,
    windows: Sequence[int] = DEFAULT_WINDOWS,
    batch_size: int = 8,
    progress: bool = True,
) -> list[dict[str, dict[str, Any]]]:
    """Core and/or dead-latent metrics for several SAEs at one hook, sharing the model forwards.

    Args:
        saes: SAEs with the same hook (and head).
        tokens: [n_seq, ctx] eval tokens, in stream order.
        core, dead: which evals to run, for all SAEs or per SAE.
        core_tokens: evaluate the core metrics on the first ``core_tokens`` tokens only (the dead
            counters use all of ``tokens``); None = all.

    Returns:
        One ``{"core": metrics, "dead": metrics}`` dict per SAE (only the evals asked for).
    """
    from saebench.evals.transcoder import refuse_transcoders

    refuse_transcoders(saes, "the shared-forward core/dead eval (bench, evaluate_reconstruction)")
    if not saes:
        return []
    hook, head = one_site(model, saes, "evaluate_hook_group")
    n = len(saes)
    core = [core] * n if isinstance(core, bool) else list(core)
    dead = [dead] * n if isinstance(dead, bool) else list(dead)
    accs = [CoreAccumulator(s) if c else None for s, c in zip(saes, core)]
    counters = [DeadLatentCounter(s.d_sae, windows) if d else None for s, d in zip(saes, dead)]
    special_ids = special_ids if special_ids is not None else torch.empty(0, dtype=torch.long)
    core_rows = tokens.shape[0] if core_tokens is None else max(1, core_tokens // tokens.shape[1])
    device = model.cfg.device
    stop = stop_layer(hook)
    zero = ZeroAblation(model, hook, head)
    for start in tqdm(range(0, tokens.shape[0], batch_size), desc=f"shared pass {hook}" + (f":{head}" if head is not None else ""),
                      disable=not progress):
        toks = tokens[start : start + batch_size].to(device)
        in_core = any(core) and start < core_rows
        if in_core and start + toks.shape[0] > core_rows:
            toks = toks[: core_rows - start]  # the core window ends inside this batch: split it
            _shared_batch(saes, model, hook, head, toks, special_ids, accs, counters, downstream, True, stop, zero)
            toks = tokens[start + toks.shape[0] : start + batch_size].to(device)
            in_core = False
        _shared_batch(saes, model, hook, head, toks, special_ids, accs, counters, downstream, in_core, stop, zero)
    out = []
    tok = getattr(model, "tokenizer", None)
    for s, acc, ctr in zip(saes, accs, counters):
        r: dict[str, dict[str, Any]] = {}
        if acc is not None:
            r["core"] = acc.result(downstream)
        if ctr is not None:
            r["dead"] = ctr.result(tok) | {"hook_name": s.cfg.hook_name, "d_sae": s.d_sae}
        out.append(r)
    return out


def _shared_batch(saes, model, hook, head, toks, special_ids, accs, counters, downstream, in_core, stop, zero) -> None:
    if toks.shape[0] == 0:
        return
    need_down = in_core and downstream
    keep = token_mask(toks, special_ids)
    if need_down:
        logits_clean, cache = model.run_with_cache(toks, names_filter=lambda nm: nm == hook)
    else:
        _, cache = model.run_with_cache(toks, names_filter=lambda nm: nm == hook, stop_at_layer=stop)
    x_full = _flatten(cache[hook], head).float()
    del cache
    ce_zero = kl_zero = ce_clean = 0.0
    lp_clean = clean = None
    if need_down:
        # The clean and zero-ablation terms do not depend on the SAE: computed once for the whole group.
        lp_clean = F.log_softmax(logits_clean.float(), -1)
        pred = keep[:, :-1] & keep[:, 1:]
        ce_clean = ce_from_logprobs(lp_clean, toks)[pred].sum().item()
        clean = clean_terms(lp_clean)  # shared by the zero-ablation term and every SAE's KL
        ce_zero, kl_zero = zero_terms(zero.logprobs(toks, x_full if head is None else None, logits_clean), toks, keep, clean)
    flat = x_full.flatten(0, 1)
    keep_flat = keep.flatten()
    special_flat = torch.isin(toks.flatten(), special_ids.to(toks.device))
    for sae, acc, ctr in zip(saes, accs, counters):
        if x_full.shape[-1] != sae.d_in:
            raise ValueError(f"SAE d_in={sae.d_in} does not match the width {x_full.shape[-1]} of hook {hook} in this model")
        acts_all = sae.encode_sparse(flat.to(sae.device))
        if ctr is not None:
            ctr.update(acts_all, toks.flatten(), special_flat)
        if acc is None or not in_core:
            continue
        kf = keep_flat.to(acts_all.values.device)
        x_hat_all = sae.decode_sparse(acts_all).float().to(flat.device)
        acc.add_reconstruction(flat[keep_flat], x_hat_all[keep_flat], SparseActs(acts_all.values[kf], acts_all.indices[kf]))
        if need_down:
            recon = x_hat_all.view_as(x_full)
            logits_sae = spliced_logits(model, hook, head, toks, x_full if head is None else None, recon, keep, logits_clean)
            acc.add_downstream(toks, keep, logits_sae, logprobs_clean=lp_clean, clean=clean, ce_zero=ce_zero, kl_zero=kl_zero, ce_clean=ce_clean)
            del logits_sae


def evaluate_reconstruction(
    saes: SAE | Sequence[SAE],
    model,
    tokens: Tensor,
    *,
    special_ids: Tensor | None = None,
    batch_size: int = 8,
    downstream: bool = True,
    progress: bool = True,
) -> dict[str, Any] | list[dict[str, Any]]:
    """Core metrics (``evaluate_core``'s definitions) for one SAE or several, sharing forwards per hook."""
    single = isinstance(saes, SAE)
    sae_list = [saes] if single else list(saes)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, s in enumerate(sae_list):
        groups[sae_site(s)].append(i)
    results: list[dict[str, Any] | None] = [None] * len(sae_list)
    for idx in groups.values():
        res = evaluate_hook_group([sae_list[i] for i in idx], model, tokens, special_ids=special_ids, core=True, dead=False,
                                  downstream=downstream, batch_size=batch_size, progress=progress)
        for i, r in zip(idx, res):
            results[i] = r["core"]
    return results[0] if single else results


def run_reconstruction_eval(sae_dir: str | Path, model=None, *, corpus: str = "default", eval_tokens: int = 65_536, context_size: int = 128,
                            batch_size: int = 8, device: str = "cpu", out: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Load an SAE folder, evaluate the core metrics on held-out text, write ``eval_reconstruction.json``."""
    from saebench.evals.common import load_eval_tokens, special_ids_of

    from saebench import models
    from saebench.io import write_json

    sae = SAE.load(sae_dir, device=device)
    if model is None:
        model = models.load_model(sae.cfg.model_name or None, device=device)
    tokens = load_eval_tokens(model, corpus, eval_tokens, context_size)
    res = evaluate_reconstruction(sae, model, tokens, special_ids=special_ids_of(model.tokenizer), batch_size=batch_size, progress=progress)
    res |= {"corpus": corpus, "split": "eval", "context_size": context_size}
    write_json(Path(out) if out else Path(sae_dir) / "eval_reconstruction.json", res)
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI: ``python -m saebench.evals.reconstruction SAE_DIR [--eval-tokens N]``."""
    from saebench.evals.common import add_common_args

    from saebench.cli import HelpFormatter

    p = argparse.ArgumentParser(prog="saebench.evals.reconstruction", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    add_common_args(p)
    a = p.parse_args(argv)
    res = run_reconstruction_eval(a.sae_dir, None, corpus=a.corpus, eval_tokens=a.eval_tokens, context_size=a.context_size,
                                  batch_size=a.batch_size, device=a.device, out=a.out, progress=not a.no_progress)
    print(format_table(res))
    return res


if __name__ == "__main__":
    main()
