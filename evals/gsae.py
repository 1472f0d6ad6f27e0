"""g-SAE at evaluation time: gradient-aware selection and the spliced-loss gap (METHODS.md §6).

A g-SAE (``trainers/gsae.py``) is trained choosing its k latents by score_i = z_i(1 + β|d_i·g|), with
g = ∇ₓ of the LM's next-token loss at the hooked activation. At inference it is a plain TopK SAE
(``architecture = "topk"``), but an eval knows the next tokens, so it can select with the training rule
too. This module holds that rule's eval side; the core eval (:func:`saebench.evals.core.evaluate_hook_group`,
``selection="gradient"``) uses it, so the metrics are exactly the core eval's (FVU, FVU without outlier
tokens, CE with the SAE spliced in, CE loss recovered, KL), only the latents differ:

- :func:`lm_loss_grad`: one clean forward with the hook's activation made a leaf, the mean next-token
  cross-entropy over every position of the batch (as the training harvest, ``HookedSource`` with
  ``with_grads``, computes it) and ``autograd.grad`` to that leaf. The selection normalises g to unit RMS
  per token, so the loss's reduction (mean vs sum, batch size) and the SAE's folded activation scale do
  not change which latents are chosen.
- :func:`gradient_encode_sparse`: the training rule, ``gradient_scores`` of ``trainers/gsae.py`` (one
  function for both), top k of the scores, the un-augmented ReLU(π) decoded at those indices.
- :func:`gsae_beta`: the β the SAE was trained with (its ``cfg.json``); an SAE that is not a g-SAE is
  refused with a ``ConfigError``, as gradient selection is not its inference rule.
- :func:`spliced_loss_gap`: METHODS.md §6 asks, where g is not available at inference, to "fall back to
  plain TopK and report the gap". With L(x̂) − L(x) the spliced loss (CE with the reconstruction spliced
  in minus clean CE, nats per predicted token; the §6 toy test's quantity), the gap is
  ``ΔCE(plain TopK inference) − ΔCE(gradient-aware inference)``: the loss the fall-back costs
  (positive: gradient selection is more faithful).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from saebench import sparse
from saebench.config import ConfigError
from saebench.sae import SAE
from saebench.sparse import SparseActs

SELECTIONS = ("plain", "gradient")
__all__ = ["SELECTIONS", "check_selection", "gradient_encode_sparse", "gsae_beta", "lm_loss_grad", "spliced_loss_gap"]


def check_selection(selection: str) -> str:
    if selection not in SELECTIONS:
        raise ConfigError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    return selection


def gsae_beta(sae: SAE) -> float:
    """The β of a g-SAE's selection (its training option); a ``ConfigError`` for any other SAE."""
    cfg = sae.cfg
    where = f"the SAE at {cfg.hook_name or '?'} (method {cfg.method or 'unrecorded'!r}, architecture {cfg.architecture!r})"
    if cfg.method != "gsae":
        raise ConfigError(f"gradient-aware selection is the g-SAE's rule (method 'gsae'), but {where} is not a g-SAE; "
                          "evaluate it with selection='plain'")
    if cfg.architecture != "topk" or cfg.k is None:
        raise ConfigError(f"{where} is marked as a g-SAE but is not a TopK SAE with a k; gradient-aware selection needs one")
    opts = (cfg.metadata or {}).get("method_options") or {}
    beta = float(opts.get("beta", sparse.GSAE_DEFAULT_BETA))
    if not beta >= 0:
        raise ConfigError(f"{where} records beta={beta!r}; a g-SAE's beta must be >= 0")
    return beta


def lm_loss_grad(model, toks: Tensor, hook: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(logits, act, g)`` of one clean forward: act [b, pos, ...] at ``hook`` and g = ∂ mean CE / ∂ act.

    The loss is the mean next-token cross-entropy over every position of ``toks`` (the training
    harvest's). Model parameters get no gradient (the activation is a fresh leaf); the returned tensors
    are detached and on the model's device.
    """
    captured: dict[str, Tensor] = {}

    def grab(act, hook):
        act = act.detach().requires_grad_(True)
        captured["act"] = act
        return act

    with torch.enable_grad():
        logits = model.run_with_hooks(toks, fwd_hooks=[(hook, grab)])
        if "act" not in captured:
            raise ValueError(f"hook {hook!r} did not fire in the model's forward")
        lg = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
        loss = F.cross_entropy(lg[:, :-1].flatten(0, 1), toks[:, 1:].flatten())
        (g,) = torch.autograd.grad(loss, [captured["act"]])
    return logits.detach(), captured["act"].detach(), g.detach()


@torch.no_grad()
def gradient_encode_sparse(sae: SAE, x: Tensor, g: Tensor, beta: float) -> SparseActs:
    """Encode x [B, d_in] with g-SAE's training selection: top k of π + β·ReLU(π)·|W_dec ĝ|, ReLU(π) kept.

    ``g`` [B, d_in] is ∇ₓ of the LM loss at x (any positive scale per token: it is normalised to unit
    RMS). β = 0 is ``sae.encode_sparse`` exactly.
    """
    x = sae._check_input(x)
    if g.shape != x.shape:
        raise ValueError(f"the gradient must have the activations' shape {tuple(x.shape)}, got {tuple(g.shape)}")
    x_c = sae.center(x)
    pre = F.linear(x_c, sae.encoder_weight, sae.b_enc)
    scores = sparse.gradient_scores(pre, g.to(device=pre.device, dtype=pre.dtype), sae.W_dec.to(pre.dtype), beta)
    idx = sparse.topk_select(scores, sae.cfg.k)
    return SparseActs(sae.activate(sparse.gather_pre(x_c, sae.encoder_weight, sae.b_enc, pre, idx)), idx)


def spliced_loss_gap(plain: dict[str, Any], gradient: dict[str, Any]) -> dict[str, float]:
    """METHODS.md §6's gap from one SAE's two core results (plain and gradient-aware selection, same tokens).

    Returns ``delta_ce_plain`` / ``delta_ce_gradient`` (L(x̂) − L(x): CE with the SAE minus clean CE,
    nats per predicted token), ``spliced_loss_gap`` = delta_ce_plain − delta_ce_gradient (> 0: the
    fall-back to plain TopK costs that much loss), and the same for the per-token absolute differences
    (``abs_delta_ce_*``, mean |L_t(x̂) − L_t(x)|) and for KL(p_clean ‖ p_SAE) (``kl_gap``).
    """
    if plain.get("n_tokens") != gradient.get("n_tokens"):
        raise ValueError(f"the two results were computed on different tokens ({plain.get('n_tokens')} vs {gradient.get('n_tokens')})")
    for r, name in ((plain, "plain"), (gradient, "gradient")):
        if r.get("ce_loss_with_sae") is None:
            raise ValueError(f"the {name} result has no downstream (CE) terms: evaluate with downstream=True")
    dp = plain["ce_loss_with_sae"] - plain["ce_loss_without_sae"]
    dg = gradient["ce_loss_with_sae"] - gradient["ce_loss_without_sae"]
    ap, ag = plain.get("ce_loss_abs_diff", math.nan), gradient.get("ce_loss_abs_diff", math.nan)
    return {"delta_ce_plain": dp, "delta_ce_gradient": dg, "spliced_loss_gap": dp - dg,
            "abs_delta_ce_plain": ap, "abs_delta_ce_gradient": ag, "abs_spliced_loss_gap": ap - ag,
            "kl_gap": plain["kl_div_with_sae"] - gradient["kl_div_with_sae"]}
