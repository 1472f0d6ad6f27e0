"""AbsTopK SAE (Zhu, Khalili, Zhu, arXiv 2510.00404): hard thresholding H_k that keeps signs.

z = H_k(pre): the k entries of largest |pre| with their signs, no ReLU, so one latent can encode a
concept and its opposite. Loss = FVU + α·AuxK, AuxK taking the top-k_aux dead latents by |pre| with
signed values (``Method.auxk_loss`` does this for signed architectures).

``variant="token"`` selects per token and exports ``abstopk``. ``variant="batch"`` (the authors'
default, ``BatchAbsoluteKSAE``) keeps the top-(k·B) |pre| over the batch and exports ``abs_jumprelu``
with a symmetric threshold |pre| > θ, θ a bias-corrected EMA of the batch's smallest selected |value|
(METHODS.md's recommendation by analogy with BatchTopK; not in the authors' code). Unlike the authors'
code we keep b_enc (their forward has none).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from saebench.trainers.base import Method, StepInput, StepOutput, register
from saebench.trainers.batchtopk import ThresholdMixin, ThresholdOptions
from torch import Tensor

from saebench import sparse
from saebench.sae import SAE


class AbsTopKOptions(ThresholdOptions):
    variant: Literal["token", "batch"] = Field("token", description=(
        "'token': the k largest |pre| of each token, exported as abstopk. 'batch' (the authors' default): the k·B largest |pre| "
        "of the batch, with a learned symmetric threshold at inference (abs_jumprelu)."))
    topk_warmup_fraction: float = Field(0.7, ge=0, le=1, description=(
        "Batch variant: per-token selection for this fraction of training when topk_warmup_steps is not given (planted recovery "
        "on lognormal_pairs 35% without, 75% with 10%, 85% with 30%; 96-100% on three shapes with 70%, where 50% leaves "
        "wide_dense at 88%: docs/METHODS_IMPLEMENTED.md)."))


@register
class AbsTopK(ThresholdMixin, Method):
    """Top-k by |pre| with signs kept; per token (``abstopk``) or per batch (``abs_jumprelu``)."""

    name = "abstopk"
    architecture = "abstopk"
    Options = AbsTopKOptions

    def __init__(self, cfg):
        super().__init__(cfg)
        # The exported architecture follows the variant (an instance attribute shadows the class one).
        self.architecture = "abstopk" if self.opts.variant == "token" else "abs_jumprelu"

    def select(self, pre: Tensor, batch: StepInput, sae: SAE | None = None) -> tuple[Tensor, Tensor | None]:
        if self.opts.variant == "token" or self._warming_up(batch):
            return sparse.topk_select(pre.abs(), self.cfg.k), None
        return sparse.batch_topk_select(pre, self.cfg.k * pre.shape[0], absolute=True)

    def after_step(self, sae: SAE, inp: StepInput, out: StepOutput, step: int) -> None:
        if self.opts.variant != "batch":
            return
        mags = out.acts.values.detach().abs()
        nz = mags > 0
        if nz.any():
            self._set_threshold(sae, mags[nz].min(), None, step)

    def state(self):
        return super().state() if self.opts.variant == "batch" else {}
