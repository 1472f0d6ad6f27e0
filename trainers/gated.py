"""Gated SAE (Rajamanoharan et al. 2024, arXiv 2404.16014): a gate chooses which latents fire, a magnitude path how much.

π_gate = W_enc(x − b_dec) + b_gate;  f = 1[π_gate > 0] ⊙ ReLU(e^{r_mag} ⊙ W_enc(x − b_dec) + b_mag);  x̂ = W_dec f + b_dec.

The two paths share W_enc (tied, the magnitude rows scaled by e^{r_mag}); b_gate is the SAE's ``b_enc``.
The L1 penalty acts on the gate only, so it no longer shrinks the magnitudes (the paper's point), and the
gate, which gets no gradient through the Heaviside step, learns from an auxiliary reconstruction through a
frozen copy of the decoder:

L = FVU(x̂, x) + λ_t·mean_b‖ReLU(π_gate)‖₁ / V + FVU(x̂_frozen(ReLU(π_gate)), x),
x̂_frozen(z) = sg(W_dec) z + sg(b_dec),

with V the batch's per-token variance, so the loss is the paper's ‖x − x̂‖² + λ‖ReLU(π_gate)‖₁ + ‖x − x̂_frozen‖²
divided by V (the same optimum; λ in the paper's units). Decoder rows are unit-norm (the loop's
constraint; the paper's L1 is then on ReLU(π_gate) as is). λ_t warms up linearly as for ``standard``.
Everything is sparse: f, the penalty and the auxiliary term are all zero off the gate's support
{π_gate > 0}, so only those entries are gathered (with the sparse backward).
Initialisation: tied W_enc = W_decᵀ (unit rows), b_gate = b_mag = r_mag = 0 (SAELens), b_dec at the geometric median.
Inference form: SAELens ``gated`` (W_enc, b_gate, r_mag, b_mag, W_dec, b_dec).
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from saebench.trainers.base import Method, StepInput, StepOutput, normalized_mse, register
from saebench.trainers.standard import L1Options, per_token_variance, sparsity_coef
from torch import Tensor

from saebench import sparse
from saebench.sae import SAE
from saebench.sparse import SparseActs


class GatedOptions(L1Options):
    # λ on mean_b ‖ReLU(π_gate)‖₁, in the paper's units (its loss ‖x − x̂‖² + λ‖ReLU(π_gate)‖₁ + aux, divided by V).
    sparsity_coef: float = Field(5.0, ge=0, description=(
        "λ on ‖ReLU(π_gate)‖₁, in the paper's units (loss ‖x − x̂‖² + λ‖ReLU(π_gate)‖₁ + ‖x − x̂_frozen‖² on inputs "
        "scaled to E‖x‖ = √d); the trained loss is that divided by the batch's per-token variance."))
    # Weight of the frozen-decoder auxiliary reconstruction of ReLU(π_gate) (1 in the paper).
    aux_coef: float = Field(1.0, ge=0, description="Weight of the auxiliary reconstruction from ReLU(π_gate) through the frozen decoder (1 in the paper).")


@register
class Gated(Method):
    """Gating and magnitude paths with tied weights; L1 on the gate plus a frozen-decoder auxiliary loss."""

    name = "gated"
    architecture = "gated"
    Options = GatedOptions

    def select(self, pre: Tensor, batch: StepInput, sae: SAE | None = None) -> tuple[Tensor, Tensor | None]:
        return sparse.mask_to_indices(pre > 0, pre, dense_ok=True)  # the gate: π_gate > 0

    def step(self, sae: SAE, inp: StepInput) -> StepOutput:
        x = inp.x
        x_c = sae.center(x)
        pre = self.pre_acts(sae, x_c)  # π_gate (b_enc is b_gate)
        idx, valid = self.select(pre, inp, sae)
        gate = sparse.gather_pre(x_c, sae.encoder_weight, sae.b_enc, pre, idx)
        f = sae.gated_magnitudes(gate, idx) * valid
        acts = SparseActs(f, idx)
        x_hat = sparse.decode(acts, sae.W_dec, sae.b_dec)
        gate_relu = F.relu(gate) * valid
        l1 = gate_relu.sum(-1).mean() / per_token_variance(x)
        x_aux = sparse.decode(SparseActs(gate_relu, idx), sae.W_dec.detach(), sae.b_dec.detach())
        losses = {"mse_loss": normalized_mse(x_hat, x), "l1_loss": sparsity_coef(self, inp.step) * l1}
        if self.opts.aux_coef:
            losses["auxiliary_reconstruction_loss"] = self.opts.aux_coef * normalized_mse(x_aux, x)
        return StepOutput(losses, acts, x_hat)
