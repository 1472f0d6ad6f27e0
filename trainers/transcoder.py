"""Transcoders (Dunefsky et al. 2024) and skip-transcoders (Paulo et al. 2025): read one hook, predict another.

A transcoder is not a method of its own: any method whose step is the shared sparse pipeline (its selection,
activation and losses) becomes one by config. ``TrainConfig.target_hook`` names the hook to predict; the
harvest reads ``hook_name`` and ``target_hook`` in the same forward, the step encodes x (the input hook),
decodes into the target's width and takes its losses against y (the target hook):

    ŷ = W_dec f(x) + b_dec (+ W_skip x with ``skip_transcoder``),   mse_loss = Σ‖y − ŷ‖² / Σ‖y − ȳ‖²

AuxK (TopK family) reconstructs the target's residual y − ŷ, and the L1 of ``standard`` is normalised by
the target's variance. x and y are scaled separately to E‖·‖ = √d (``normalize_activations``); both factors
are folded in at export (``SAE.fold_activation_scale(scale, out_scale)``), so the saved transcoder maps raw
input activations to raw output activations. W_skip starts at zero (as SAELens and sparsify), b_dec at the
geometric median of the scaled targets.

Saved in SAELens' transcoder layout: ``W_enc`` [d_in, d_sae], ``W_dec`` [d_sae, d_out], ``b_dec`` [d_out],
``W_skip`` [d_out, d_in]; cfg.json has ``d_out``, ``hook_name_out``, ``hook_layer_out``,
``apply_b_dec_to_input: false`` and architecture ``transcoder`` / ``skip_transcoder`` (ReLU: ``standard``
methods), ``jumprelu_transcoder`` / ``jumprelu_skip_transcoder`` (JumpReLU and BatchTopK, whose inference
form is JumpReLU), else ``<architecture>_transcoder`` (TopK, AbsTopK: no SAELens class).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from saebench.config import ConfigError, TrainConfig

if TYPE_CHECKING:
    from saebench.trainers.base import Method

    from saebench.sae import SAE

# Methods whose step reconstructs ``StepInput.y`` and adds the skip term (the base pipeline, and standard's).
# Others compare extra terms with the input itself (Matryoshka's prefixes, top-AFA's norm target, the
# variational KL), encode by pursuit on the decoder (MP, ITDA), share encoder and decoder (gated), or run the
# model (e2e): they are refused rather than silently trained against the wrong activation.
TRANSCODER_METHODS = ("topk", "batchtopk", "jumprelu", "abstopk", "standard", "standard_constrained")


def check_method(cfg: TrainConfig, method: Method) -> None:
    """Refuse a transcoder config whose method cannot predict another hook."""
    if cfg.target_hook is not None and cfg.method not in TRANSCODER_METHODS:
        raise ConfigError(f"method {cfg.method!r} cannot train a transcoder (target_hook={cfg.target_hook!r}); "
                          f"methods that can: {', '.join(TRANSCODER_METHODS)}")


def hooks_to_harvest(cfgs: list[TrainConfig]) -> list[str]:
    """Every hook the configs read or predict, in order, once: one forward harvests them all."""
    return list(dict.fromkeys(h for c in cfgs for h in (c.hook_name, c.target_hook) if h))


def sae_fields(cfg: TrainConfig, d_out: int) -> dict:
    """The SAEConfig fields that make an SAE a transcoder of ``cfg`` (none for an SAE)."""
    if cfg.target_hook is None:
        return {}
    from saebench.site import Site

    hook, head = Site.parse(cfg.target_hook)
    if head is not None:
        raise ConfigError(f"target_hook {cfg.target_hook!r}: a transcoder predicts a whole hook, not one head")
    return {"d_out": d_out, "hook_name_out": hook, "hook_layer_out": Site(hook).layer or 0, "skip_connection": cfg.skip_transcoder or None,
            "apply_b_dec_to_input": False}


def target(cfg: TrainConfig, batch, scale: float, dtype: torch.dtype) -> Tensor | None:
    """The scaled target activations of a batch (None for an SAE)."""
    if cfg.target_hook is None:
        return None
    return batch.acts[cfg.target_hook].to(cfg.device).to(dtype) * scale


@torch.no_grad()
def init_output_bias(sae: SAE, target_sample: Tensor) -> None:
    """b_dec at the geometric median of the (scaled) targets; W_skip at zero."""
    from saebench.trainers.base import geometric_median

    sae.b_dec.copy_(geometric_median(target_sample.float()).to(sae.dtype))
    if sae.cfg.skip_connection:
        sae.W_skip.zero_()
