"""top-AFA SAE (Lee et al. 2025, seed paper "Evaluating and Designing Sparse Autoencoders by Approximating Quasi-Orthogonality").

With a quasi-orthogonal decoder, ‖x − b_dec‖ ≈ ‖Σ_i f_i d_i‖ ≈ √(Σ_i (f_i‖d_i‖)²): the input's norm (the
"approximate feature activation" norm) says how much activation the code should carry. top-AFA turns this
into the selection rule, with no k: per token, sort s_i = ReLU(π_i)·‖d_i‖ in descending order and keep the k
largest, k = argmin_k |√(Σ_{j≤k} s_(j)²) − ‖x − b_dec‖| (``saebench.encoders.top_afa_select``; the authors'
``TopAFASAE.forward``). The code's L0 therefore varies per token with the input's norm.

Loss (authors' ``get_loss_dict``): FVU(x̂, x) + α·AuxK + afa_coef·(d/V)·mean_b(‖z_b‖₂ − ‖x_b‖₂)², with V the
batch's per-token variance. Their loss is mean-squared error per element plus afa_coeff·mean_b(‖z‖ − ‖x‖)²;
ours is that times d/V, so afa_coef keeps their meaning. Like their code, π = W_enc(x − b_dec) has no encoder
bias: b_enc stays 0 (it is left out of the optimizer) unless ``encoder_bias``. Inference form ``top_afa``
(saebench only: SAELens has no such architecture), which applies the same rule.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from saebench.trainers.base import Method, Options, StepInput, register
from saebench.trainers.standard import per_token_variance
from torch import Tensor

from saebench.sae import SAE
from saebench.sparse import SparseActs


class TopAFAOptions(Options):
    # Weight of the norm-matching loss (‖z‖ − ‖x‖)², in the authors' units (their code's default is 0; 1/16 unverified).
    afa_coef: float = Field(1 / 16, ge=0, description=(
        "Weight of the norm-matching loss mean_b(‖z‖₂ − ‖x‖₂)², in the authors' units (their loss: per-element MSE + "
        "afa_coeff·that). 1/16 is a third-party port's reading of the paper; the authors' config defaults to 0."))
    # Which input norm the loss matches: the input itself (the authors' code) or x − b_dec (what the selection uses).
    afa_target: Literal["input", "centered"] = Field("input", description=(
        "Norm the loss matches ‖z‖ to: 'input' ‖x‖ (the authors' code) or 'centered' ‖x − b_dec‖ (the selection's target)."))
    # Train an encoder bias (the authors' top-AFA has none).
    encoder_bias: bool = Field(False, description="Train an encoder bias b_enc (the authors' top-AFA has none: it stays 0).")


@register
class TopAFA(Method):
    """Per-token k from the approximate feature activation norm ‖x − b_dec‖ (no fixed k), plus a norm-matching loss."""

    name = "top_afa"
    architecture = "top_afa"
    Options = TopAFAOptions

    def param_groups(self, sae: SAE, lr: float) -> list[dict]:
        self.add_training_parameters(sae)
        return [{"params": [p for p in sae.parameters() if self.opts.encoder_bias or p is not sae.b_enc]}]

    def select(self, pre: Tensor, batch: StepInput, sae: SAE | None = None) -> tuple[Tensor, Tensor | None]:
        return sae.top_afa_select(pre, sae.center(batch.x))

    def extra_losses(self, sae: SAE, inp: StepInput, pre: Tensor, acts: SparseActs, x_hat: Tensor) -> dict[str, Tensor]:
        if not self.opts.afa_coef:
            return {}
        x = inp.x if self.opts.afa_target == "input" else sae.center(inp.x).detach()
        gap = acts.values.norm(dim=-1) - x.norm(dim=-1)
        return {"afa_loss": self.opts.afa_coef * gap.square().mean() * x.shape[-1] / per_token_variance(inp.x)}
