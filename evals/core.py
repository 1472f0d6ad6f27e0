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
- ``ce_loss_score`` (CE loss recovered) = (CE_zero − CE_sae) / (CE_zero − CE_clean).
- ``kl_div_score`` = (KL_zero − KL_sae) / KL_zero with KL = Σ_v p_clean (log p_clean − log p_new).
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from saebench.activations import _flatten_site, parse_hook, token_mask
from saebench.sae import SAE


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

    def fn(act: Tensor, hook) -> Tensor:
        site = act[:, :, head] if (head is not None and act.dim() == 4) else act
        shaped = site.flatten(2) if site.dim() == 4 else site
        new = torch.zeros_like(shaped) if replace is None else replace.to(shaped.dtype).view_as(shaped)
        mixed = torch.where(keep[..., None], new, shaped).view_as(site)
        if head is not None and act.dim() == 4:
            act = act.clone()
            act[:, :, head] = mixed
            return act
        return mixed

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
    fires: Tensor | None = None
    ce: dict[str, float] = field(default_factory=lambda: {"clean": 0.0, "sae": 0.0, "zero": 0.0})
    kl: dict[str, float] = field(default_factory=lambda: {"sae": 0.0, "zero": 0.0})
    n_pred: int = 0


@torch.no_grad()
def evaluate_core(
    sae: SAE,
    model,
    tokens: Tensor,
    *,
    special_ids: Tensor | None = None,
    batch_size: int = 16,
    downstream: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """All core metrics for ``sae`` at its hook on ``tokens`` [n_seq, ctx]; returns a JSON-able dict."""
    hook, head = parse_hook(sae.cfg.hook_name) if ":" in sae.cfg.hook_name else (sae.cfg.hook_name, sae.cfg.hook_head_index)
    if not hook:
        raise ValueError("the SAE's cfg has no hook_name; cannot evaluate it on a model")
    from saebench.models import validate_hook_name

    validate_hook_name(model, hook)
    device = sae.device
    acc = CoreAccumulator(sae)
    zero = ZeroAblation(model, hook, head)
    for start in tqdm(range(0, tokens.shape[0], batch_size), desc="core eval", disable=not progress):
        toks = tokens[start : start + batch_size].to(device)
        keep = token_mask(toks, special_ids)
        logits_clean, cache = model.run_with_cache(toks, names_filter=lambda n: n == hook)
        x_full = _flatten_site(cache[hook], head).float()
        if x_full.shape[-1] != sae.d_in:
            raise ValueError(f"SAE d_in={sae.d_in} does not match the width {x_full.shape[-1]} of hook {hook} in this model")
        x = x_full[keep]
        acts = sae.encode_sparse(x)
        x_hat = sae.decode_sparse(acts).float()
        acc.add_reconstruction(x, x_hat, acts)
        if downstream:
            recon = x_full.clone()
            recon[keep] = x_hat
            site = x_full if head is None else None
            lp_clean = F.log_softmax(logits_clean.float(), -1)
            clean = clean_terms(lp_clean)
            ce_zero, kl_zero = zero_terms(zero.logprobs(toks, site, logits_clean), toks, keep, clean)
            logits_sae = spliced_logits(model, hook, head, toks, site, recon, keep, logits_clean)
            acc.add_downstream(toks, keep, logits_sae, logprobs_clean=lp_clean, clean=clean, ce_zero=ce_zero, kl_zero=kl_zero)
    return acc.result(downstream)


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
                       clean: tuple[Tensor, Tensor] | None = None, ce_clean: float | None = None) -> None:
        """One batch of spliced-forward logits [b, pos, V]; ``keep`` [b, pos] marks non-special positions.

        The terms that do not depend on the SAE come precomputed, so a group of SAEs computes them
        once per batch: ``logprobs_clean`` (log-softmax of the clean logits), ``clean``
        (``clean_terms(logprobs_clean)``), ``ce_zero`` / ``kl_zero`` (:func:`zero_terms`) and
        optionally ``ce_clean`` (summed CE over the batch's predicted positions). The SAE's logits are
        log-softmaxed once; CE and KL are read from the log-probabilities.
        """
        s = self.sums
        pred_mask = keep[:, :-1] & keep[:, 1:]
        p_clean, neg_h = clean if clean is not None else clean_terms(logprobs_clean)
        s.ce["clean"] += ce_clean if ce_clean is not None else ce_from_logprobs(logprobs_clean, toks)[pred_mask].sum().item()
        lq = F.log_softmax(logits_sae.float(), -1)
        s.ce["sae"] += ce_from_logprobs(lq, toks)[pred_mask].sum().item()
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
    sq = x.double().pow(2).sum(-1)
    s.sse += err.sum().item()
    s.sum_sq += sq.sum().item()
    s.sum_x += x.double().sum(0)
    if x.shape[0]:
        norms = sq.sqrt()
        inl = norms <= OUTLIER_NORM_FACTOR * norms.median()
        s.n_out += int((~inl).sum())
        s.sse_in += err[inl].sum().item()
        s.sum_sq_in += sq[inl].sum().item()
        s.sum_x_in += x[inl].double().sum(0)
    s.cos += F.cosine_similarity(x, x_hat, dim=-1).sum().item()
    s.l2_ratio += (x_hat.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)).sum().item()
    s.xhat_sq += x_hat.pow(2).sum().item()
    s.x_dot_xhat += (x * x_hat).sum().item()
    nz = acts.values != 0
    s.l0 += nz.sum().item()
    s.l1 += acts.values.abs().sum().item()
    idx = acts.indices[nz]
    s.fires.index_add_(0, idx.cpu(), torch.ones_like(idx, device="cpu"))


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
        "l0": s.l0 / s.n,
        "l1": s.l1 / s.n,
        "dead_fraction": 1 - alive.double().mean().item(),
        "dead_window_tokens": s.n,
        "frac_alive": alive.double().mean().item(),
        "dense_fraction_1pct": (density > 0.01).double().mean().item(),
        "dense_fraction_10pct": (density > 0.10).double().mean().item(),
        "log10_density_histogram": {"counts": hist_counts.tolist(), "edges": hist_edges.tolist()},
    }
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
        }
    return out


SUMMARY_KEYS = [
    ("l0", "L0"), ("fvu", "FVU"), ("fvu_without_outliers", "FVU w/o outlier tokens"), ("explained_variance", "explained variance"), ("cossim", "cosine"),
    ("ce_loss_score", "CE loss recovered"), ("kl_div_score", "KL score"), ("ce_loss_without_sae", "CE clean"),
    ("ce_loss_with_sae", "CE with SAE"), ("ce_loss_with_ablation", "CE zero-ablated"), ("dead_fraction", "dead fraction"),
    ("dense_fraction_1pct", "dense >1%"), ("dense_fraction_10pct", "dense >10%"), ("relative_reconstruction_bias", "shrinkage (rel. bias)"),
]


def format_table(metrics: dict[str, Any]) -> str:
    """A two-column text table of the headline metrics."""
    lines = [f"{'metric':<24}{'value':>12}", "-" * 36]
    for key, label in SUMMARY_KEYS:
        if key in metrics:
            v = metrics[key]
            lines.append(f"{label:<24}{v:>12.4f}" if isinstance(v, float) else f"{label:<24}{v!s:>12}")
    lines.append(f"{'tokens (dead window)':<24}{metrics['n_tokens']:>12,}")
    return "\n".join(lines)


def run_core_eval(sae_dir: str | Path, model=None, *, corpus: str | None = None, eval_tokens: int = 65_536, context_size: int | None = None,
                  batch_size: int = 16, exclude_special_tokens: bool = True, device: str = "cpu", out: str | Path | None = None,
                  progress: bool = True, model_name: str | None = None) -> dict[str, Any]:
    """Load an SAE folder, evaluate it on held-out text, and write ``eval_core.json`` next to it."""
    from saebench import models, text
    from saebench.io import write_json

    sae = SAE.load(sae_dir, device=device)
    if model is None:
        model = models.load_model(model_name or sae.cfg.model_name or None, device=device)
    ctx = context_size or sae.cfg.context_size or 128
    corpus = corpus or sae.cfg.metadata.get("corpus", "default")
    tokens = text.load_tokens(corpus, model.tokenizer, ctx, eval_tokens, split="eval", prepend_bos=sae.cfg.prepend_bos)
    special = text.special_ids(model.tokenizer) if exclude_special_tokens else None
    metrics = evaluate_core(sae, model, tokens, special_ids=special, batch_size=batch_size, progress=progress)
    metrics |= {"corpus": corpus, "split": "eval", "context_size": ctx}
    write_json(Path(out) if out else Path(sae_dir) / "eval_core.json", metrics)
    return metrics
