"""Matryoshka BatchTopK (Bussmann et al. 2025, arXiv 2503.17547; Nabeshima 2024): nested prefixes of the dictionary each reconstruct x.

Selection, activation, AuxK and the inference threshold are BatchTopK's (``trainers/batchtopk.py``): the
k·B largest ReLU(π) over the batch, exported as ``jumprelu`` with one learned global θ. On top, for every
inner prefix width m₁ < m₂ < … < d_sae, the latents with index < m_g alone reconstruct the input:

x̂_{<m} = b_dec + Σ_{i < m} f_i d_i,   L = FVU(x̂, x) + Σ_{g inner} FVU(x̂_{<m_g}, x) + α·AuxK,

i.e. SAELens' form (the full reconstruction is the base loss, plus one unweighted term per inner width;
dictionary_learning takes a weighted mean over the groups instead: a different scale of the same terms
relative to AuxK). Early latents must reconstruct on their own, so they learn the general, frequent
directions, and later ones add detail instead of absorbing their parents.

Widths: fixed (``widths``; default d_sae/16, /8, /4, /2), or, with ``random_widths`` = r > 0, r widths
drawn afresh each step, log-uniformly in [``min_width``, d_sae) (Nabeshima's sampled prefixes, a
heavy-tailed distribution over lengths; his exact one is not reproduced). Draws are a function of
(seed, step), so a resumed run draws the same widths.
"""

from __future__ import annotations

import itertools

import torch
from pydantic import Field, field_validator
from saebench.trainers.base import StepInput, normalized_mse, register
from saebench.trainers.batchtopk import BatchTopK, ThresholdOptions
from torch import Tensor

from saebench import sparse
from saebench.config import ConfigError
from saebench.sae import SAE
from saebench.sparse import SparseActs


class MatryoshkaOptions(ThresholdOptions):
    # Inner prefix widths (latent counts, increasing, each < d_sae); None = d_sae/16, d_sae/8, d_sae/4, d_sae/2.
    widths: list[int] | None = Field(None, description="Inner prefix widths (increasing, each < d_sae; d_sae itself is implied); default d_sae/16, /8, /4, /2.")
    # > 0: draw this many inner widths at random every step instead of the fixed ``widths``.
    random_widths: int = Field(0, ge=0, description="If > 0, draw this many inner widths every step, log-uniformly in [min_width, d_sae), instead of the fixed widths.")
    # Smallest width a random draw can give.
    min_width: int = Field(1, ge=1, description="Smallest randomly drawn width (random_widths > 0).")

    @field_validator("widths")
    @classmethod
    def _increasing(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(w <= 0 for w in v) or any(a >= b for a, b in itertools.pairwise(v))):
            raise ValueError("widths must be a non-empty, strictly increasing list of positive latent counts")
        return v


@register
class MatryoshkaBatchTopK(BatchTopK):
    """BatchTopK whose nested dictionary prefixes each reconstruct the input (fixed or random widths)."""

    name = "matryoshka_batchtopk"
    Options = MatryoshkaOptions

    def sae_config(self, d_in: int, **fields):
        cfg = super().sae_config(d_in, **fields)
        if self.opts.widths is not None and self.opts.widths[-1] >= cfg.d_sae:
            raise ConfigError(f"method {self.name!r}: widths {self.opts.widths} must all be below d_sae={cfg.d_sae} (d_sae is implied)")
        return cfg

    def inner_widths(self, d_sae: int, step: int) -> list[int]:
        """The inner prefix widths used at ``step`` (sorted, distinct, each < d_sae)."""
        o = self.opts
        if o.random_widths:
            gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
            lo = min(o.min_width, d_sae - 1)
            u = torch.rand(o.random_widths, generator=gen, dtype=torch.float64)
            w = torch.exp(torch.log(torch.tensor(float(lo))) + u * (torch.log(torch.tensor(float(d_sae))) - torch.log(torch.tensor(float(lo)))))
            return sorted({min(d_sae - 1, max(lo, int(v))) for v in w.tolist()})
        if o.widths is not None:
            return list(o.widths)
        return sorted({max(1, d_sae // f) for f in (16, 8, 4, 2)} - {d_sae})

    def extra_losses(self, sae: SAE, inp: StepInput, pre: Tensor, acts: SparseActs, x_hat: Tensor) -> dict[str, Tensor]:
        widths = self.inner_widths(sae.d_sae, inp.step)
        if not widths:
            return {}
        loss = 0.0
        for m in widths:
            keep = (acts.indices < m).to(acts.values.dtype)
            loss = loss + normalized_mse(sparse.decode(SparseActs(acts.values * keep, acts.indices), sae.W_dec, sae.b_dec), inp.x)
        return {"matryoshka_inner_loss": loss}
