"""Core evaluation: reconstruction, sparsity and downstream fidelity on held-out tokens.

Definitions (EVALS.md §1.3; SAEBench names where they exist):

- ``fvu`` = Σ‖x − x̂‖² / Σ‖x − x̄‖² over all evaluated tokens (x̄: their mean); ``explained_variance`` = 1 − fvu.
- ``fvu_without_outliers``: the same without the ``n_outlier_tokens`` tokens whose norm exceeds
  ``OUTLIER_NORM_FACTOR`` (10, the harvest's default ``outlier_norm_factor``) times the median norm of
  their batch. Training drops such tokens (attention-sink-like positions with norms 10–100x the
  rest); a handful of them can dominate the eval's FVU, most of all for threshold SAEs, which fire
  hundreds of latents on them. ``fvu`` keeps them, as SAEBench does.
- ``mse`` = Σ‖x − x̂‖² / (N·d_in); ``cossim`` = mean cos(x, x̂); ``l2_ratio`` = mean ‖x̂‖/‖x‖;
  ``relative_reconstruction_bias`` = E‖x̂‖² / E⟨x, x̂⟩ (1 = no shrinkage).
- ``l0`` = mean #{i: f_i ≠ 0} (non-zero, so signed SAEs count correctly); ``l1`` = mean Σ|f_i|.
- SAEBench 0.6's own definitions of three of these, under their own names (``sae_bench/evals/core/main.py``,
  ``get_sparsity_and_variance_metrics``), so a number copied from a SAEBench table compares like with like.
  They are averages over the eval's batches (b = one batch of ``batch_size`` sequences, its N_b
  non-special tokens; B batches), so they depend on the batching, as SAEBench's do:

  * ``explained_variance_saebench`` = 1 − R / (S − (S/d_in)²) with S = mean_b mean_t ‖x_t‖² and
    R = mean_b mean_t ‖x_t − x̂_t‖². SAEBench's "mean" term is the mean of x² over tokens and
    dimensions, squared (not ‖x̄‖²), so this is not 1 − ``fvu``.
  * ``relative_reconstruction_bias_saebench`` = mean_b [mean_t ‖x̂_t‖² / mean_t ⟨x_t, x̂_t⟩]
    (SAELens and SAEBench: one ratio per batch, averaged; ours is one ratio over all tokens).
  * ``mse_saebench`` = (1/N) Σ_b Σ_t ‖x_t − x̂_t‖² / N_b (per-token squared error divided by the
    tokens of its batch, averaged; ours divides by N·d_in).
  ``saebench_batches`` is B. A batch whose every position is special is skipped (SAEBench's would give NaN).
- ``ce_loss_score`` (CE loss recovered) = (CE_zero − CE_sae) / (CE_zero − CE_clean).
- ``kl_div_score`` = (KL_zero − KL_sae) / KL_zero with KL = Σ_v p_clean (log p_clean − log p_new).
- ``ce_loss_abs_diff`` = mean over predicted tokens of |CE_sae,t − CE_clean,t| (the per-token spliced loss;
  ``ce_loss_with_sae − ce_loss_without_sae`` is its signed mean). ``evals/gsae.py`` reads both for g-SAE's gap.
- ``selection="gradient"`` (g-SAEs only): the latents are chosen by the g-SAE's training rule with g = ∇ₓ
  of the LM loss from the clean forward (``evals/gsae.py``); every metric above is then computed as usual.
- ``dead_fraction``: latents that never fired in the ``window_tokens`` evaluated tokens;
  ``dense_fraction_1pct`` / ``_10pct``: latents firing on more than 1% / 10% of them.

BOS/EOS/pad positions are excluded from every metric. The SAE is spliced in at every other position
(special positions keep their clean activation, matching training); the zero ablation, as in SAEBench,
zeroes the site at *every* position, BOS included, so ``ce_loss_with_ablation``, ``ce_loss_score`` and
``kl_div_score`` are SAEBench's numbers. At a residual-stream hook the zero-ablated model sees nothing
of the tokens (the rest of the network reads only the residual stream and the positions), so its
logits are one row per position: computed once per eval for a single sequence and broadcast
(:class:`ZeroAblation`), not once per batch.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from saebench.activations import token_mask
from saebench.evals.common import DEFAULT_BATCH_SIZE, one_site
from saebench.evals.dead import DEFAULT_WINDOWS, DeadLatentCounter
from saebench.layout import EVAL_CORE_FILE
from saebench.sae import SAE
from saebench.site import Site
from saebench.sparse import SparseActs


def fvu(sse: float, sum_sq: float, sum_x: Tensor, n: int) -> float:
    """Fraction of variance unexplained from running sums: SSE / (Σ‖x‖² − n‖x̄‖²)."""
    total_var = sum_sq - (sum_x.double().pow(2).sum().item() / n)
    return sse / total_var if total_var > 0 else math.nan


def ce_loss_recovered(ce_clean: float, ce_sae: float, ce_zero: float) -> float:
    """(CE_zero − CE_sae) / (CE_zero − CE_clean): 1 = SAE as good as the model, 0 = as bad as zero-ablation."""
    denom = ce_zero - ce_clean
    return (ce_zero - ce_sae) / denom if denom != 0 else math.nan


def kl_score(kl_sae: float, kl_zero: float) -> float:
    """(KL_zero − KL_sae) / KL_zero."""
    return (kl_zero - kl_sae) / kl_zero if kl_zero != 0 else math.nan


def kl_per_token(logits_clean: Tensor, logits_new: Tensor) -> Tensor:
    """KL(p_clean ‖ p_new) per position, in float32 via log_softmax (no NaN from log(0))."""
    lq = F.log_softmax(logits_new.float(), -1)
    return kl_from_logprobs(*clean_terms(F.log_softmax(logits_clean.float(), -1)), lq)


def ce_from_logprobs(lp: Tensor, tokens: Tensor) -> Tensor:
    """Next-token cross-entropy [b, pos-1] from log-probabilities [b, pos, V] (no second softmax)."""
    return -lp[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)


def clean_terms(lp_clean: Tensor) -> tuple[Tensor, Tensor]:
    """(p_clean, Σ_v p log p) per position: the parts of KL(p_clean ‖ q) shared by every q."""
    p = lp_clean.exp()
    return p, _rowdot(p, lp_clean)


def kl_from_logprobs(p_clean: Tensor, neg_entropy: Tensor, lq: Tensor) -> Tensor:
    """KL(p_clean ‖ q) per position = Σ p log p − Σ p log q, with no [b, pos, V] temporaries."""
    return neg_entropy - _rowdot(p_clean, lq)


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Σ_v a[..., v] · b[..., v] as a batched matrix product (no elementwise-product tensor)."""
    shape = a.shape[:-1]
    return (a.reshape(-1, 1, a.shape[-1]) @ b.reshape(-1, b.shape[-1], 1)).view(shape)


def splice_hook(replace: Tensor | None, head: int | None, keep: Tensor):
    """A hook that substitutes ``replace`` (zeros if None) at positions where ``keep`` [b, pos] is True."""

    at = Site("", head)  # only the head matters for reshaping

    def fn(act: Tensor, hook) -> Tensor:
        shaped = at.flatten(act)
        new = torch.zeros_like(shaped) if replace is None else replace.to(shaped.dtype).view_as(shaped)
        return at.unflatten(act, torch.where(keep[..., None], new, shaped))

    return fn


def spliced_logits(model, hook: str, head: int | None, toks: Tensor, site: Tensor, replace: Tensor | None, keep: Tensor,
                   logits_clean: Tensor | None = None) -> Tensor:
    """Logits with the activations at ``hook`` replaced by ``replace`` (zeros if None) where ``keep``.

    ``site`` [b, pos, d] are the clean activations at the hook (already computed by the clean pass).
    At a residual-stream hook of a supported model the forward resumes from the hook's layer
    (``saebench.models.resume_forward``), so the blocks before it are not run again; the resumed pass
    is checked once per model and hook against ``logits_clean`` (the full forward's) and not used if
    it disagrees. Anywhere else the whole model runs with a splice hook.
    """
    from saebench.models import resume_forward, resume_matches

    if head is None and logits_clean is not None and resume_matches(model, hook, site, logits_clean):
        new = torch.zeros_like(site) if replace is None else replace.to(site.dtype).view_as(site)
        return resume_forward(model, hook)(torch.where(keep[..., None], new, site))
    return model.run_with_hooks(toks, fwd_hooks=[(hook, splice_hook(replace, head, keep))])


class ZeroAblation:
    """Log-probabilities of the model with the SAE's site zeroed at every position (SAEBench's zero ablation).

    ``logprobs`` returns [b, pos, V], or [1, pos, V] to broadcast. Where the forward resumes at a
    residual-stream hook (:func:`saebench.models.resume_forward`, checked against the full forward),
    the resumed function reads only the residual stream and the positions, so zeroing the stream at
    every position leaves nothing that depends on the tokens: one row of zeros is run once per
    sequence length and reused for every batch of this eval (one object per eval, so a model whose
    weights change between evals is never served stale rows). Elsewhere (hooks inside a block, heads,
    models that do not resume) every batch runs the whole model with the site zeroed.
    """

    def __init__(self, model, hook: str, head: int | None):
        self.model, self.hook, self.head = model, hook, head
        self._rows: dict[tuple[int, str], Tensor] = {}

    def logprobs(self, toks: Tensor, site: Tensor | None, logits_clean: Tensor | None) -> Tensor:
        from saebench.models import resume_forward, resume_matches

        if self.head is None and site is not None and logits_clean is not None and resume_matches(self.model, self.hook, site, logits_clean):
            key = (site.shape[1], str(site.device))
            if key not in self._rows:
                self._rows[key] = F.log_softmax(resume_forward(self.model, self.hook)(torch.zeros_like(site[:1])).float(), -1)
            return self._rows[key]
        every = torch.ones(toks.shape, dtype=torch.bool, device=toks.device)
        return F.log_softmax(self.model.run_with_hooks(toks, fwd_hooks=[(self.hook, splice_hook(None, self.head, every))]).float(), -1)


def zero_terms(lp_zero: Tensor, toks: Tensor, keep: Tensor, clean: tuple[Tensor, Tensor]) -> tuple[float, float]:
    """(Σ CE over predicted positions, Σ KL(p_clean ‖ p_zero) over kept positions) for one batch.

    ``lp_zero`` [b or 1, pos, V] from :class:`ZeroAblation`; a single row is broadcast without copying.
    """
    pred = keep[:, :-1] & keep[:, 1:]
    ce = ce_from_logprobs(lp_zero.expand(toks.shape[0], -1, -1), toks)[pred].sum().item()
    p_clean, neg_h = clean
    if lp_zero.shape[0] == 1 and toks.shape[0] > 1:  # Σ_v p[b, t, v]·lq[t, v] as one matmul per position
        cross = torch.bmm(p_clean.transpose(0, 1), lp_zero[0].unsqueeze(-1)).squeeze(-1).T
    else:
        cross = _rowdot(p_clean, lp_zero)
    return ce, (neg_h - cross)[keep].sum().item()


OUTLIER_NORM_FACTOR = 10.0


@dataclass
class _Sums:
    n: int = 0
    sse: float = 0.0
    sum_sq: float = 0.0
    sum_x: Tensor | None = None
    n_out: int = 0  # outlier-norm tokens, and the FVU sums without them
    sse_in: float = 0.0
    sum_sq_in: float = 0.0
    sum_x_in: Tensor | None = None
    cos: float = 0.0
    l2_ratio: float = 0.0
    xhat_sq: float = 0.0
    x_dot_xhat: float = 0.0
    l0: float = 0.0
    l1: float = 0.0
    # SAEBench's per-batch variants (sums over batches of per-batch means)
    sb_batches: int = 0
    sb_mean_sq: float = 0.0  # Σ_b mean_t ‖x‖²
    sb_mean_sse: float = 0.0  # Σ_b mean_t ‖x − x̂‖²
    sb_rrb: float = 0.0  # Σ_b mean_t ‖x̂‖² / mean_t ⟨x, x̂⟩
    fires: Tensor | None = None
    ce: dict[str, float] = field(default_factory=lambda: {"clean": 0.0, "sae": 0.0, "zero": 0.0})
    kl: dict[str, float] = field(default_factory=lambda: {"sae": 0.0, "zero": 0.0})
    n_pred: int = 0
    ce_abs_diff: float = 0.0  # Σ |CE_sae − CE_clean| per predicted token (evals/gsae.py's spliced-loss gap)


def evaluate_core(
    sae: SAE,
    model,
    tokens: Tensor,
    *,
    special_ids: Tensor | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    downstream: bool = True,
    progress: bool = True,
    selection: str = "plain",
) -> dict[str, Any]:
    """All core metrics for ``sae`` at its hook on ``tokens`` [n_seq, ctx]; returns a JSON-able dict.

    ``selection="gradient"`` selects a g-SAE's latents with its training rule (``evals/gsae.py``).

    The group eval (:func:`evaluate_hook_group`) with a group of one: one code path computes the core
    metrics for one SAE or for many at a hook. A transcoder (``sae.cfg.d_out`` set) is evaluated by
    ``evals/transcoder.py``: FVU against its target, CE/KL with its prediction spliced in at ``hook_name_out``.
    """
    if sae.cfg.is_transcoder:
        from saebench.evals.transcoder import evaluate_transcoder_core

        if selection != "plain":
            from saebench.config import ConfigError

            raise ConfigError(f"selection={selection!r} is g-SAE's gradient-aware rule; a transcoder is evaluated with selection='plain'")

        return evaluate_transcoder_core(sae, model, tokens, special_ids=special_ids, batch_size=batch_size, downstream=downstream,
                                        progress=progress)
    return evaluate_hook_group([sae], model, tokens, special_ids=special_ids, core=True, dead=False, downstream=downstream,
                               batch_size=batch_size, progress=progress, selection=selection)[0]["core"]


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
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
    selection: str = "plain",
) -> list[dict[str, dict[str, Any]]]:
    """Core and/or dead-latent metrics for several SAEs at one hook, sharing the model forwards.

    Args:
        saes: SAEs with the same hook (and head).
        tokens: [n_seq, ctx] eval tokens, in stream order.
        core, dead: which evals to run, for all SAEs or per SAE.
        core_tokens: evaluate the core metrics on the first ``core_tokens`` tokens only (the dead
            counters use all of ``tokens``); None = all.
        selection: ``"plain"`` (each SAE's inference rule) or ``"gradient"``: g-SAE's training rule,
            top k of z(1 + β|d_i·g|) with g = ∇ₓ of the LM loss from a clean forward with a backward
            (``evals/gsae.py``). Every SAE must then be a g-SAE (a ``ConfigError`` otherwise).

    Returns:
        One ``{"core": metrics, "dead": metrics}`` dict per SAE (only the evals asked for).
    """
    from saebench.evals.transcoder import refuse_transcoders

    refuse_transcoders(saes, "the shared-forward core/dead eval (bench, evaluate_reconstruction)")
    if not saes:
        return []
    hook, head = one_site(model, saes, "evaluate_hook_group")
    n = len(saes)
    # g-SAE's gradient-aware selection (evals/gsae.py): one β per SAE, None for each SAE's own rule.
    from saebench.evals.gsae import check_selection, gsae_beta

    betas = [gsae_beta(s) for s in saes] if check_selection(selection) == "gradient" else None
    core = [core] * n if isinstance(core, bool) else list(core)
    dead = [dead] * n if isinstance(dead, bool) else list(dead)
    accs = [CoreAccumulator(s) if c else None for s, c in zip(saes, core)]
    counters = [DeadLatentCounter(s.d_sae, windows) if d else None for s, d in zip(saes, dead)]
    special_ids = special_ids if special_ids is not None else torch.empty(0, dtype=torch.long)
    core_rows = tokens.shape[0] if core_tokens is None else max(1, core_tokens // tokens.shape[1])
    device = model.cfg.device
    stop = Site(hook, head).stop_layer
    zero = ZeroAblation(model, hook, head)
    for start in tqdm(range(0, tokens.shape[0], batch_size), desc=f"shared pass {hook}" + (f":{head}" if head is not None else ""),
                      disable=not progress):
        toks = tokens[start : start + batch_size].to(device)
        in_core = any(core) and start < core_rows
        if in_core and start + toks.shape[0] > core_rows:
            toks = toks[: core_rows - start]  # the core window ends inside this batch: split it
            _shared_batch(saes, model, hook, head, toks, special_ids, accs, counters, downstream, True, stop, zero, betas)
            toks = tokens[start + toks.shape[0] : start + batch_size].to(device)
            in_core = False
        _shared_batch(saes, model, hook, head, toks, special_ids, accs, counters, downstream, in_core, stop, zero, betas)
    out = []
    tok = getattr(model, "tokenizer", None)
    for i, (s, acc, ctr) in enumerate(zip(saes, accs, counters)):
        r: dict[str, dict[str, Any]] = {}
        if acc is not None:
            r["core"] = acc.result(downstream)
            if betas is not None:
                r["core"] |= {"selection": "gradient", "gsae_beta": betas[i]}
        if ctr is not None:
            r["dead"] = ctr.result(tok) | {"hook_name": s.cfg.hook_name, "d_sae": s.d_sae}
        out.append(r)
    return out


def _shared_batch(saes, model, hook, head, toks, special_ids, accs, counters, downstream, in_core, stop, zero, betas=None) -> None:
    if toks.shape[0] == 0:
        return
    need_down = in_core and downstream
    keep = token_mask(toks, special_ids)
    g_flat = None
    if betas is not None:  # gradient-aware selection: the clean forward also gives ∇ₓ of the LM loss (evals/gsae.py)
        from saebench.evals.gsae import lm_loss_grad

        logits_clean, act, grad = lm_loss_grad(model, toks, hook)
        cache = {hook: act}
        g_flat = Site(hook, head).flatten(grad).flatten(0, 1)
        del grad
    elif need_down:
        logits_clean, cache = model.run_with_cache(toks, names_filter=lambda nm: nm == hook)
    else:
        _, cache = model.run_with_cache(toks, names_filter=lambda nm: nm == hook, stop_at_layer=stop)
    x_full = Site(hook, head).flatten(cache[hook]).float()
    del cache
    ce_zero = kl_zero = 0.0
    lp_clean = clean = ce_clean = None
    if need_down:
        # The clean and zero-ablation terms do not depend on the SAE: computed once for the whole group.
        lp_clean = F.log_softmax(logits_clean.float(), -1)
        pred = keep[:, :-1] & keep[:, 1:]
        ce_clean = ce_from_logprobs(lp_clean, toks)[pred]  # per predicted token
        clean = clean_terms(lp_clean)  # shared by the zero-ablation term and every SAE's KL
        ce_zero, kl_zero = zero_terms(zero.logprobs(toks, x_full if head is None else None, logits_clean), toks, keep, clean)
    flat = x_full.flatten(0, 1)
    keep_flat = keep.flatten()
    special_flat = torch.isin(toks.flatten(), special_ids.to(toks.device))
    for i, (sae, acc, ctr) in enumerate(zip(saes, accs, counters)):
        if x_full.shape[-1] != sae.d_in:
            raise ValueError(f"SAE d_in={sae.d_in} does not match the width {x_full.shape[-1]} of hook {hook} in this model")
        if betas is None:
            acts_all = sae.encode_sparse(flat.to(sae.device))
        else:
            from saebench.evals.gsae import gradient_encode_sparse

            acts_all = gradient_encode_sparse(sae, flat.to(sae.device), g_flat.to(sae.device), betas[i])
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


class CoreAccumulator:
    """Running sums of the core metrics for one SAE, fed batch by batch.

    ``evaluate_core`` uses it for one SAE; the bench runner (``evals/reconstruction.py``) feeds several
    SAEs at one hook from a single clean forward and one set of zero-ablation terms per batch.
    """

    def __init__(self, sae: SAE):
        self.sae = sae
        self.sums = _Sums(sum_x=torch.zeros(sae.d_in, dtype=torch.float64), sum_x_in=torch.zeros(sae.d_in, dtype=torch.float64),
                          fires=torch.zeros(sae.d_sae, dtype=torch.long))
        from saebench.evals.quasi_orthogonality import AFAAccumulator  # AFA / quasi-orthogonality (afa_* keys)

        self.afa = AFAAccumulator(sae)

    def add_reconstruction(self, x: Tensor, x_hat: Tensor, acts) -> None:
        """Non-special activations ``x`` [N, d_in], their reconstruction and the ``SparseActs``."""
        _accumulate(self.sums, x, x_hat, acts)
        self.afa.add(x, acts)

    def add_downstream(self, toks: Tensor, keep: Tensor, logits_sae: Tensor, *, logprobs_clean: Tensor, ce_zero: float, kl_zero: float,
                       clean: tuple[Tensor, Tensor] | None = None, ce_clean: Tensor | None = None) -> None:
        """One batch of spliced-forward logits [b, pos, V]; ``keep`` [b, pos] marks non-special positions.

        The terms that do not depend on the SAE come precomputed, so a group of SAEs computes them
        once per batch: ``logprobs_clean`` (log-softmax of the clean logits), ``clean``
        (``clean_terms(logprobs_clean)``), ``ce_zero`` / ``kl_zero`` (:func:`zero_terms`) and
        optionally ``ce_clean`` (the clean CE at each of the batch's predicted positions). The SAE's logits are
        log-softmaxed once; CE and KL are read from the log-probabilities.
        """
        s = self.sums
        pred_mask = keep[:, :-1] & keep[:, 1:]
        p_clean, neg_h = clean if clean is not None else clean_terms(logprobs_clean)
        if ce_clean is None:
            ce_clean = ce_from_logprobs(logprobs_clean, toks)[pred_mask]
        s.ce["clean"] += ce_clean.sum().item()
        lq = F.log_softmax(logits_sae.float(), -1)
        ce_sae = ce_from_logprobs(lq, toks)[pred_mask]
        s.ce["sae"] += ce_sae.sum().item()
        s.ce_abs_diff += (ce_sae - ce_clean).abs().sum().item()
        s.kl["sae"] += kl_from_logprobs(p_clean, neg_h, lq)[keep].sum().item()
        del lq
        s.ce["zero"] += float(ce_zero)
        s.kl["zero"] += float(kl_zero)
        s.n_pred += int(pred_mask.sum())

    def result(self, downstream: bool = True) -> dict[str, Any]:
        """The metrics dict (as ``evaluate_core`` returns it)."""
        if self.sums.n == 0:
            raise ValueError("no tokens to evaluate (every position was a special token?)")
        return _summarise(self.sums, self.sae, downstream) | self.afa.result()


def _accumulate(s: _Sums, x: Tensor, x_hat: Tensor, acts) -> None:
    s.n += x.shape[0]
    err = (x - x_hat).pow(2).sum(-1)
    # Sums accumulate in float64 without float64 copies of [B, d] tensors (memory stays ~one batch).
    sq = x.pow(2).sum(-1, dtype=torch.float64)
    s.sse += err.sum().item()
    s.sum_sq += sq.sum().item()
    s.sum_x += x.sum(0, dtype=torch.float64).cpu()  # the sums live on the CPU whatever the eval device
    if x.shape[0]:
        norms = sq.sqrt()
        inl = norms <= OUTLIER_NORM_FACTOR * norms.median()
        s.n_out += int((~inl).sum())
        s.sse_in += err[inl].sum().item()
        s.sum_sq_in += sq[inl].sum().item()
        s.sum_x_in += x[inl].sum(0, dtype=torch.float64).cpu()
    s.cos += F.cosine_similarity(x, x_hat, dim=-1).sum().item()
    s.l2_ratio += (x_hat.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)).sum().item()
    xhat_sq = x_hat.pow(2).sum(dtype=torch.float64)
    x_dot_xhat = (x * x_hat).sum(dtype=torch.float64)
    s.xhat_sq += xhat_sq.item()
    s.x_dot_xhat += x_dot_xhat.item()
    if x.shape[0]:  # one SAEBench batch (sae_bench/evals/core/main.py, get_sparsity_and_variance_metrics)
        s.sb_batches += 1
        s.sb_mean_sq += sq.mean().item()
        s.sb_mean_sse += err.double().mean().item()
        s.sb_rrb += (xhat_sq / x_dot_xhat).item() if x_dot_xhat != 0 else math.nan
    nz = acts.values != 0
    s.l0 += nz.sum().item()
    s.l1 += acts.values.abs().sum().item()
    s.fires += acts.firing_counts(s.fires.shape[0]).cpu()


def _saebench_variants(s: _Sums, d_in: int) -> dict[str, float]:
    """SAEBench 0.6's explained variance, relative reconstruction bias and MSE (module docstring)."""
    if not s.sb_batches:
        return {"explained_variance_saebench": math.nan, "relative_reconstruction_bias_saebench": math.nan, "mse_saebench": math.nan,
                "saebench_batches": 0}
    mean_sq = s.sb_mean_sq / s.sb_batches
    total_variance = mean_sq - (mean_sq / d_in) ** 2
    return {
        "explained_variance_saebench": 1 - (s.sb_mean_sse / s.sb_batches) / total_variance if total_variance else math.nan,
        "relative_reconstruction_bias_saebench": s.sb_rrb / s.sb_batches,
        "mse_saebench": s.sb_mean_sse / s.n,
        "saebench_batches": s.sb_batches,
    }


def _warn_outlier_blowup(m: dict[str, Any]) -> None:
    """Warn when the reconstruction is worse than the mean on all tokens (FVU > 1) only because of outlier-norm tokens.

    Seen on SmolLM2 with every threshold-inference SAE (BatchTopK, JumpReLU, Mutual/Feature Choice, Matryoshka:
    FVU 1-13 against 0.13-0.24 without outliers, docs/METHODS_REPORT.md): training excludes tokens whose norm
    exceeds 10x the median, and on such a token hundreds of latents pass their thresholds. The codes there
    are meaningless, which no averaged metric shows on its own.
    """
    f, f_in, n_out = m["fvu"], m["fvu_without_outliers"], m["n_outlier_tokens"]
    if n_out and math.isfinite(f) and math.isfinite(f_in) and f > 1 and f_in < 1:
        from saebench.config import SaebenchWarning

        warnings.warn(
            f"SAE at {m['hook_name']} ({m['architecture']}): FVU is {f:.3g} on all tokens but {f_in:.3g} without the {n_out:,} "
            f"outlier-norm tokens (norm > {OUTLIER_NORM_FACTOR:g}x the batch median): its reconstruction blows up on them. "
            "Threshold-inference SAEs fire many latents on tokens far outside their training data (outliers are excluded "
            "from training). Do not read its codes at those positions: drop tokens above that norm, as training did.",
            SaebenchWarning, stacklevel=3)


def _summarise(s: _Sums, sae: SAE, downstream: bool) -> dict[str, Any]:
    f = fvu(s.sse, s.sum_sq, s.sum_x, s.n)
    density = s.fires.double() / s.n
    alive = density > 0
    hist_counts, hist_edges = np.histogram(np.log10(density[alive].numpy()), bins=40, range=(-8, 0)) if alive.any() else (np.zeros(40, int), np.linspace(-8, 0, 41))
    out: dict[str, Any] = {
        "hook_name": sae.cfg.hook_name,
        "model_name": sae.cfg.model_name,
        "architecture": sae.cfg.architecture,
        "method": sae.cfg.method,
        "d_sae": sae.d_sae,
        "n_tokens": s.n,
        "fvu": f,
        "explained_variance": 1 - f,
        "fvu_without_outliers": fvu(s.sse_in, s.sum_sq_in, s.sum_x_in, s.n - s.n_out) if s.n > s.n_out else math.nan,
        "n_outlier_tokens": s.n_out,
        "mse": s.sse / (s.n * sae.d_in),
        "cossim": s.cos / s.n,
        "l2_ratio": s.l2_ratio / s.n,
        "relative_reconstruction_bias": s.xhat_sq / s.x_dot_xhat if s.x_dot_xhat else math.nan,
        **_saebench_variants(s, sae.d_in),
        "l0": s.l0 / s.n,
        "l1": s.l1 / s.n,
        "dead_fraction": 1 - alive.double().mean().item(),
        "dead_window_tokens": s.n,
        "frac_alive": alive.double().mean().item(),
        "dense_fraction_1pct": (density > 0.01).double().mean().item(),
        "dense_fraction_10pct": (density > 0.10).double().mean().item(),
        "log10_density_histogram": {"counts": hist_counts.tolist(), "edges": hist_edges.tolist()},
    }
    _warn_outlier_blowup(out)
    if downstream and s.n_pred:
        ce = {k: v / s.n_pred for k, v in s.ce.items()}
        kl = {k: v / s.n for k, v in s.kl.items()}
        out |= {
            "ce_loss_without_sae": ce["clean"],
            "ce_loss_with_sae": ce["sae"],
            "ce_loss_with_ablation": ce["zero"],
            "ce_loss_score": ce_loss_recovered(ce["clean"], ce["sae"], ce["zero"]),
            "kl_div_with_sae": kl["sae"],
            "kl_div_with_ablation": kl["zero"],
            "kl_div_score": kl_score(kl["sae"], kl["zero"]),
            "ce_loss_abs_diff": s.ce_abs_diff / s.n_pred,  # mean |CE_sae − CE_clean| per predicted token
        }
    return out


@torch.no_grad()
def evaluate_activations(sae: SAE, data, *, max_tokens: int | None = None, batch_size: int = 4096, hook_name: str | None = None,
                         windows: tuple[int, ...] = (), split: str | None = None, progress: bool = False) -> dict[str, Any]:
    """The core reconstruction and sparsity metrics of ``sae`` on activations you bring (no model, so no CE/KL terms).

    Args:
        sae: the SAE (its ``d_in`` must match the data's width).
        data: a tensor or NumPy array ``[n_tokens, d_in]``, a ``.npy`` path, a shard folder, an iterator
            factory, or any ``ActivationSource`` (``saebench.sources.as_source``).
        max_tokens: evaluate the first ``max_tokens`` rows (in the data's own order, unshuffled);
            default all of a bounded source, one pass of an iterator. Required for other unbounded
            sources (the synthetic one).
        batch_size: rows encoded at once. The outlier rule of ``fvu_without_outliers`` (norm above
            ``OUTLIER_NORM_FACTOR`` x the median) uses each batch's median, as the core eval uses each
            model batch's; the batch is recorded as ``outlier_batch_tokens``.
        hook_name: the source's hook to read when it has several (default: the SAE's, or the only one).
        windows: also report ``dead_fraction_by_window`` for these token windows (``evals.dead``).
        split: a label stored with the metrics (e.g. ``"held-out"``).

    Returns the metrics of :func:`evaluate_core` without its downstream (CE/KL) entries, computed by
    the same accumulator (same definitions; see this module's docstring): ``fvu``,
    ``explained_variance``, ``fvu_without_outliers`` / ``n_outlier_tokens``, ``mse``, ``cossim``,
    ``l2_ratio``, ``relative_reconstruction_bias``, ``l0``, ``l1``, ``dead_fraction`` over
    ``dead_window_tokens`` (= ``n_tokens``, every evaluated token), ``dense_fraction_1pct`` /
    ``_10pct``, the density histogram; plus ``source`` (the data's provenance) and ``split``.
    """
    from saebench.evals.dead import DeadLatentCounter
    from saebench.sources import IteratorSource, as_source, source_provenance

    if max_tokens is not None and max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    source = as_source(data)
    if sae.cfg.is_transcoder:  # (input, target) pairs from a two-hook source: evals/transcoder.py
        from saebench.evals.transcoder import evaluate_transcoder_activations

        return evaluate_transcoder_activations(sae, source, max_tokens=max_tokens, batch_size=batch_size, split=split, progress=progress)
    hook = hook_name or (sae.cfg.hook_name if sae.cfg.hook_name in source.hook_names else None)
    if hook is None:
        if len(source.hook_names) != 1:
            raise ValueError(f"the source has hooks {source.hook_names} and none is the SAE's ({sae.cfg.hook_name!r}); pass hook_name=")
        hook = source.hook_names[0]
    if hook not in source.hook_names:
        raise ValueError(f"hook {hook!r} is not provided by the source (it has {source.hook_names})")
    if source.d_in[hook] != sae.d_in:
        raise ValueError(f"the SAE expects d_in={sae.d_in} (trained on {sae.cfg.hook_name or '?'}), but the activations ({hook}) have width "
                         f"{source.d_in[hook]}; evaluate it on activations of the site it was trained on")

    def blocks():
        if isinstance(source, IteratorSource):
            yield from source.one_pass()
            return
        n = source.n_chunks
        if n is None and max_tokens is None:
            raise ValueError(f"{type(source).__name__} is unbounded; pass max_tokens")
        i = 0
        while n is None or i < n:
            yield source.chunk(i).acts[hook]
            i += 1

    acc = CoreAccumulator(sae)
    counter = DeadLatentCounter(sae.d_sae, windows) if windows else None
    seen = 0
    bar = tqdm(total=max_tokens, desc="evaluate activations", disable=not progress)
    for block in blocks():
        for s in range(0, block.shape[0], batch_size):
            x = block[s : s + batch_size]
            if max_tokens is not None:
                x = x[: max_tokens - seen]
            if not x.shape[0]:
                break
            x = x.to(sae.device).float()
            acts = sae.encode_sparse(x)
            acc.add_reconstruction(x, sae.decode_sparse(acts).float(), acts)
            if counter is not None:
                counter.update(acts, torch.zeros(x.shape[0], dtype=torch.long), torch.zeros(x.shape[0], dtype=torch.bool))
            seen += x.shape[0]
            bar.update(x.shape[0])
        if max_tokens is not None and seen >= max_tokens:
            break
    bar.close()
    if seen == 0:
        raise ValueError("no activations to evaluate (the source is empty)")
    out = acc.result(downstream=False)
    if counter is not None:
        dead = counter.result()
        out |= {k: dead[k] for k in ("dead_fraction_by_window", "windows_unavailable", "n_dead", "dense_mass_1pct", "dense_mass_10pct", "max_density")}
    prov = source_provenance(source)
    return out | {"evaluated_hook_name": hook, "outlier_batch_tokens": batch_size, "split": split,
                  "source": prov if prov is not None else {"description": getattr(source, "description", type(source).__name__)}}


SUMMARY_KEYS = [
    ("l0", "L0"), ("fvu", "FVU"), ("fvu_without_outliers", "FVU w/o outlier tokens"), ("explained_variance", "explained var (1-FVU)"), ("cossim", "cosine"),
    ("ce_loss_score", "CE loss recovered"), ("kl_div_score", "KL score"), ("ce_loss_without_sae", "CE clean"),
    ("ce_loss_with_sae", "CE with SAE"), ("ce_loss_with_ablation", "CE zero-ablated"), ("dead_fraction", "dead fraction"),
    ("dense_fraction_1pct", "dense >1%"), ("dense_fraction_10pct", "dense >10%"), ("relative_reconstruction_bias", "shrinkage (rel. bias)"),
    ("mse", "MSE (per element)"),
    # SAEBench 0.6's definitions of the same three quantities (module docstring): compare these with SAEBench tables
    ("explained_variance_saebench", "explained var [SAEBench]"), ("relative_reconstruction_bias_saebench", "shrinkage [SAEBench]"),
    ("mse_saebench", "MSE [SAEBench]"),
]


def format_table(metrics: dict[str, Any]) -> str:
    """A two-column text table of the headline metrics."""
    lines = [f"{'metric':<26}{'value':>12}", "-" * 38]
    for key, label in SUMMARY_KEYS:
        if key in metrics:
            v = metrics[key]
            lines.append(f"{label:<26}{v:>12.4f}" if isinstance(v, float) else f"{label:<26}{v!s:>12}")
    lines.append(f"{'tokens (dead window)':<26}{metrics['n_tokens']:>12,}")
    if "explained_variance_saebench" in metrics:
        lines.append(f"[SAEBench]: SAEBench 0.6's definitions, averaged over {metrics.get('saebench_batches', '?')} batches as SAEBench does "
                     "(its EV is not 1-FVU); the rows above them are ours. Definitions: docs/EVALS_IMPLEMENTED.md")
    return "\n".join(lines)


def held_out_tokens(sae: SAE, model, corpus: str | None, eval_tokens: int, context_size: int | None,
                    progress: bool = True) -> tuple[Tensor, str, int]:
    """``(tokens, corpus, context_size)``: held-out ``eval``-split tokens for ``sae``, by default from the corpus and
    context size it was trained with (its cfg; else ``default`` and 128), BOS-prefixed as in its training.

    Warns (``SaebenchWarning``) when the split holds fewer than ``eval_tokens``.
    """
    from saebench import text

    ctx = context_size or sae.cfg.context_size or 128
    corpus = corpus or sae.cfg.metadata.get("corpus", "default")
    t0 = time.perf_counter()
    tokens = text.load_tokens(corpus, model.tokenizer, ctx, eval_tokens, split="eval", prepend_bos=sae.cfg.prepend_bos, progress=progress)
    if progress:
        tqdm.write(f"{tokens.numel():,} held-out tokens of {corpus!r} ({tokens.shape[0]:,} sequences × {ctx}) tokenised in "
                   f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if tokens.numel() + ctx <= eval_tokens:  # fewer rows than asked for: the held-out split ran out
        import warnings

        from saebench.config import SaebenchWarning

        warnings.warn(f"eval_tokens={eval_tokens:,} asked for more than the held-out 'eval' split of corpus {corpus!r} holds: it gives "
                      f"{tokens.numel():,} tokens ({tokens.shape[0]:,} sequences of {ctx}); evaluating on those. For more, use a larger "
                      "corpus (its eval split is the ~5% of documents whose text hashes there).", SaebenchWarning, stacklevel=3)
    return tokens, corpus, ctx


def run_core_eval(sae_dir: str | Path, model=None, *, corpus: str | None = None, eval_tokens: int = 65_536, context_size: int | None = None,
                  batch_size: int = DEFAULT_BATCH_SIZE, exclude_special_tokens: bool = True, device: str = "cpu", out: str | Path | None = None,
                  progress: bool = True, model_name: str | None = None) -> dict[str, Any]:
    """Load an SAE folder, evaluate it on held-out text, and write ``eval_core.json`` next to it."""
    from saebench import models, text
    from saebench.io import write_json

    sae = SAE.load(sae_dir, device=device)
    if model is None:
        name = model_name or sae.cfg.model_name or None
        t0 = time.perf_counter()
        if progress:  # step messages next to the bars (stderr), only with progress
            tqdm.write(f"loading model {name or models.DEFAULT_MODEL} ...", file=sys.stderr)
        model = models.load_model(name, device=device)
        if progress:
            tqdm.write(f"model loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    tokens, corpus, ctx = held_out_tokens(sae, model, corpus, eval_tokens, context_size, progress=progress)
    special = text.special_ids(model.tokenizer) if exclude_special_tokens else None
    metrics = evaluate_core(sae, model, tokens, special_ids=special, batch_size=batch_size, progress=progress)
    metrics |= {"corpus": corpus, "split": "eval", "context_size": ctx, "eval_tokens_requested": eval_tokens, "eval_tokens_used": tokens.numel()}
    write_json(Path(out) if out else Path(sae_dir) / EVAL_CORE_FILE, metrics)
    return metrics
