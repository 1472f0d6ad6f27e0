"""Matching pursuit SAE (MP-SAE; Costa et al. 2025, "From Flat to Hierarchical: Extracting Sparse Representations with Matching Pursuit").

The encoder is k steps of greedy, residual-guided pursuit on the (unit-norm) decoder rows, from
r₀ = x − b_dec:

    i_t = argmax_i ReLU(⟨r_t, d_i⟩),   v_t = ReLU(⟨r_t, d_{i_t}⟩),   z_{i_t} += v_t,   r_{t+1} = r_t − v_t·d_{i_t},

and x̂ = W_dec z + b_dec = x − r_k. Each step explains away what the chosen atom accounts for, so a latent
correlated with an already chosen one is scored on what is left (the method's point: a linear encoder
scores every latent on x itself). Weights are tied (there is no encoder matrix; the SAE's W_enc is
unused and not saved). Loss = FVU(x̂, x) only (SAELens has no auxiliary loss for it either); gradients
reach W_dec and b_dec through the values v_t and the decode (not through the choices).

Nonnegative pursuit (ReLU on the scores) and the update follow SAELens 6.54's ``_encode_matching_pursuit``.
Training runs exactly k = ``cfg.k`` steps per token; the saved SAE is SAELens' ``matching_pursuit`` with
max_iterations = k, residual_threshold = 0 and stop_on_duplicate_support = false, so SAELens and
``load_sae`` encode exactly as training did. A step that re-selects a latent adds to its value (SAELens
does the same); the code's repeated entries are merged, so L0 ≤ k.
"""

from __future__ import annotations

import torch
from saebench.trainers.base import Method, OptionsBase, StepInput, StepOutput, normalized_mse, register

from saebench.encoders import matching_pursuit
from saebench.sae import SAE, SAEConfig


class MPOptions(OptionsBase):
    """No options: k (the number of pursuit steps) is the config's ``k``."""



@register
class MatchingPursuit(Method):
    """k steps of greedy residual pursuit on the decoder rows as the encoder (tied)."""

    name = "matching_pursuit"
    architecture = "matching_pursuit"
    Options = MPOptions

    def sae_config(self, d_in: int, **fields) -> SAEConfig:
        return super().sae_config(d_in, residual_threshold=0.0, max_iterations=self.cfg.k, stop_on_duplicate_support=False, **fields)

    @torch.no_grad()
    def export(self, sae: SAE) -> SAE:
        """Tie the unused encoder to the decoder (W_enc = W_decᵀ, b_enc = 0), as a loaded MP SAE has it."""
        sae.encoder_weight.copy_(sae.W_dec)
        sae.b_enc.zero_()
        return sae

    def step(self, sae: SAE, inp: StepInput) -> StepOutput:
        x = inp.x
        acts = matching_pursuit(sae.center(x), sae.W_dec, self.cfg.k)
        x_hat = sae.decode_sparse(acts)
        return StepOutput({"mse_loss": normalized_mse(x_hat, x)}, acts, x_hat)
