"""Gradient SAE, g-SAE (Olmo et al., arXiv 2411.10397): TopK whose support also weighs the LM-loss gradient.

With z = ReLU(pre) and g = ∇ₓ L_LM at the hooked activation (harvested with the activations; the loop
passes it in scaled-input units), the support is the top k of score_i = z_i·(1 + β|d_i·g|), computed
as π_i + β·z_i·|d_i·g| so that non-positive pre-activations rank exactly as in TopK. The *un-augmented*
z_i are decoded at those indices (METHODS.md's recommended reading; the paper only says the gradient is
used "when selecting"). Latents whose decoder direction moves the loss most are preferred even when small.

g is normalised to unit RMS per token before use (the paper's normalisation is unconfirmed; this makes β
independent of the loss scale and of the activation scaling), and is only ever read under no_grad, so
the SAE loss never back-propagates through it. β = 0 is TopK bit for bit. Everything else (FVU, AuxK,
unit-norm decoder) is TopK. Inference uses plain TopK (the ``topk`` architecture): at inference g needs
next tokens, which only offline analysis has.
"""

from __future__ import annotations

import torch
from pydantic import Field
from saebench.sparse import GSAE_DEFAULT_BETA, gradient_scores  # noqa: F401 (public here too)
from saebench.trainers.base import Method, Options, StepInput, register
from torch import Tensor

from saebench import sparse
from saebench.config import ConfigError
from saebench.sae import SAE


class GSAEOptions(Options):
    beta: float = Field(GSAE_DEFAULT_BETA, ge=0, description="Weight of the gradient term |d_i·g| (g at unit RMS per token) in the selection score.")


@register
class GradientTopK(Method):
    """TopK on z(1 + β|W_dec g|), decoding the plain z."""

    name = "gsae"
    architecture = "topk"
    Options = GSAEOptions
    needs_grads = True

    def select(self, pre: Tensor, batch: StepInput, sae: SAE | None = None) -> tuple[Tensor, Tensor | None]:
        if batch.grads is None:
            raise ConfigError("method 'gsae' needs ∇ₓ of the LM loss with every batch; the activation source gave none")
        with torch.no_grad():
            buf = self.buffer("_scores", pre.shape, pre)
            scores = gradient_scores(pre, batch.grads.detach().to(pre.dtype), sae.W_dec.detach().to(pre.dtype), self.opts.beta, out=buf)
        return sparse.topk_select(scores, self.cfg.k), None
