"""Standard SAEs, ReLU + L1: Anthropic's April 2024 update and the original unit-norm-decoder form.

f = ReLU(W_enc(x − b_dec) + b_enc), x̂ = W_dec f + b_dec, trained on every latent with f > 0 (no fixed k).

- ``standard`` (Anthropic, "Circuits Updates - April 2024"): the decoder is **unconstrained**, and the
  penalty is λ·Σ_i f_i‖d_i‖. The decoder is initialised with rows of norm ``decoder_init_norm`` (0.1) in
  random directions, with W_enc = W_decᵀ. The loop keeps the SAE's own ``W_dec`` at unit norm, so this
  method trains a separate, free decoder registered on the SAE (``W_dec_free``, a training-only parameter).
  ``export`` folds the norms nᵢ = ‖dᵢ‖ into the encoder (W_enc rows and b_enc times nᵢ, W_dec rows divided
  by nᵢ): the same x̂, with activations nᵢfᵢ (the penalised quantity); architecture ``relu``, which cfg.json
  names SAELens' ``standard``.
- ``standard_constrained`` ("Sparse Autoencoders Find Highly Interpretable Features in Language Models",
  Cunningham et al. 2023; Bricken et al. 2023): unit-norm decoder rows (the loop's projection and
  renormalisation) and a plain L1 penalty λ·Σ_i f_i.

Loss = FVU(x̂, x) + λ_t·mean_b(Σ_i f_i‖d_i‖) / V, where V = Σ_b‖x_b − x̄‖²/B is the batch's per-token variance,
so the whole loss is Anthropic's E‖x − x̂‖² + λ·E Σ f‖d‖ divided by V: the same optimum, and λ in their
units (default λ = 5 for ``standard``, 2 for ``standard_constrained``, whose λ = 5 keeps an L0 of 1-3; inputs
scaled to E‖x‖ = √d, our default normalisation). λ_t rises linearly from 0 over
``sparsity_warmup_steps`` (default 5% of training, as Anthropic). No dead-latent loss (the papers resample
or nothing; AuxK is not offered here).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from saebench.trainers.base import Method, OptionsBase, StepInput, StepOutput, normalized_mse, register, total_variance
from torch import Tensor, nn

from saebench import distributed, sparse
from saebench.sae import SAE
from saebench.sparse import SparseActs


class L1Options(OptionsBase):
    """Options of the L1-penalised methods (standard, standard_constrained, gated)."""


    # λ: weight of the L1 penalty, in units of Anthropic's loss E‖x − x̂‖² + λ·E Σ f‖d‖ (see the module docstring).
    sparsity_coef: float = Field(5.0, ge=0, description=(
        "λ, the L1 coefficient, in Anthropic's units (loss E‖x − x̂‖² + λ·E Σ_i f_i‖d_i‖ on inputs scaled to E‖x‖ = √d); "
        "the trained loss is that divided by the batch's per-token variance."))
    # Linear warm-up of λ from 0; None = 5% of training steps.
    sparsity_warmup_steps: int | None = Field(None, ge=0, description="Linear warm-up of λ from 0 over this many steps; default 5% of training.")


class StandardOptions(L1Options):
    # Initial norm of every decoder row (random directions), encoder = decoderᵀ; Anthropic's "heuristic" 0.1.
    decoder_init_norm: float = Field(0.1, gt=0, description="Initial norm of each decoder row (random directions; W_enc = W_decᵀ); Anthropic/SAELens use 0.1.")


def sparsity_coef(method: Method, step: int) -> float:
    """λ_t: the option's λ, warmed up linearly from 0 over ``sparsity_warmup_steps`` (default 5% of training)."""
    warm = method.opts.sparsity_warmup_steps
    warm = int(0.05 * method.cfg.total_steps) if warm is None else warm
    return method.opts.sparsity_coef * (min(1.0, (step + 1) / warm) if warm else 1.0)


def per_token_variance(x: Tensor) -> Tensor:
    """V = Σ_b‖x_b − x̄‖² / B over the (global, under data parallelism) batch; no gradient."""
    world = distributed.dp_world_size() if distributed.active() else 1
    return total_variance(x) / (x.shape[0] * world)


@register
class Standard(Method):
    """ReLU + L1 of f_i‖d_i‖ with an unconstrained decoder (Anthropic's April 2024 update)."""

    name = "standard"
    architecture = "relu"  # saved as SAELens' "standard"
    Options = StandardOptions
    constrained: ClassVar[bool] = False  # unit-norm decoder rows (the loop's) and a plain L1

    def add_training_parameters(self, sae: SAE) -> None:
        if not self.constrained:
            sae.register_parameter("W_dec_free", nn.Parameter(torch.zeros_like(sae.W_dec)))

    def decoder(self, sae: SAE) -> Tensor:
        """The decoder the step trains: the free one, or the SAE's unit-norm ``W_dec``."""
        return sae.W_dec if self.constrained else sae.W_dec_free

    def init_sae(self, sae: SAE, sample: Tensor, generator: torch.Generator) -> None:
        super().init_sae(sae, sample, generator)  # unit-norm random rows, W_enc = W_decᵀ, b_dec at the median
        if not self.constrained:
            with torch.no_grad():
                sae.W_dec_free.copy_(sae.W_dec * self.opts.decoder_init_norm)
                if sae.d_out == sae.d_in:  # tied start (a transcoder between widths keeps its own encoder rows)
                    sae.encoder_weight.copy_(sae.W_dec_free)
                else:
                    sae.encoder_weight.mul_(self.opts.decoder_init_norm)

    def select(self, pre: Tensor, batch: StepInput, sae: SAE | None = None) -> tuple[Tensor, Tensor | None]:
        return sparse.mask_to_indices(pre > 0, pre, dense_ok=True)  # every latent with f > 0

    def step(self, sae: SAE, inp: StepInput) -> StepOutput:
        x = inp.x
        x_c = sae.center(x)
        pre = self.pre_acts(sae, x_c)
        idx, valid = self.select(pre, inp, sae)
        f = F.relu(sparse.gather_pre(x_c, sae.encoder_weight, sae.b_enc, pre, idx)) * valid
        W = self.decoder(sae)
        acts = SparseActs(f, idx)
        x_hat = sae.add_skip(sparse.decode(acts, W, sae.b_dec), x)  # a (skip-)transcoder predicts inp.y
        penalty = f if self.constrained else f * sparse.take(W.norm(dim=-1), idx)
        l1 = penalty.sum(-1).mean() / per_token_variance(inp.y)
        losses = {"mse_loss": normalized_mse(x_hat, inp.y), "l1_loss": sparsity_coef(self, inp.step) * l1}
        return StepOutput(losses, acts, x_hat)

    @torch.no_grad()
    def export(self, sae: SAE) -> SAE:
        """The inference SAE (unit-norm decoder rows, norms folded into the encoder), without ``W_dec_free``."""
        out = SAE(sae.cfg).to(device=sae.device)
        for name in ("encoder_weight", "W_dec", "b_enc", "b_dec") + (("W_skip",) if sae.cfg.skip_connection else ()):
            getattr(out, name).copy_(getattr(sae, name))
        if not self.constrained:
            n = sae.W_dec_free.norm(dim=-1).clamp_min(1e-12)
            out.W_dec.copy_(sae.W_dec_free / n[:, None])
            out.encoder_weight.mul_(n[:, None])
            out.b_enc.mul_(n)
        return out


class StandardConstrainedOptions(L1Options):
    # λ = 2, not the April form's 5: with unit-norm rows λ = 5 leaves almost nothing active (measured: SmolLM2-135M L15,
    # 2.5M tokens: L0 2.5, ΔCE 5.3 nats, against L0 28 at λ = 2; planted families: L0 0.8-1.8 where 3-6 features are
    # active, 2.5-12.5% recovered, against 59-100% at λ = 2 in 300 steps and 100% in 1,200; docs/METHODS_REPORT.md).
    sparsity_coef: float = Field(2.0, ge=0, description=(
        "λ, the L1 coefficient, in Anthropic's units (loss E‖x − x̂‖² + λ·E Σ_i f_i on inputs scaled to E‖x‖ = √d, unit-norm "
        "decoder rows); the trained loss is that divided by the batch's per-token variance. Default 2: at the April form's 5 "
        "this form keeps an L0 of 1-3 on SmolLM2 and on planted data."))


@register
class StandardConstrained(Standard):
    """ReLU + plain L1 with unit-norm decoder rows (Cunningham et al. 2023; Bricken et al. 2023)."""

    name = "standard_constrained"
    Options = StandardConstrainedOptions
    constrained = True
