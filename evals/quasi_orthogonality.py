"""Approximate Feature Activation (AFA): does the sparse code have the norm the dense input predicts?

Lee, Davies, Canby & Hockenmaier, "Evaluating and Designing Sparse Autoencoders by Approximating
Quasi-Orthogonality" (arXiv 2503.24277; code github.com/SewoongLee/top-afa-sae,
``visualization/zf-plot.ipynb``). If the input is a sparse combination of ε-quasi-orthogonal unit
directions, z = Σ_i f̃_i w_i with |w_i·w_j| ≤ ε, then
‖z‖² = ‖f̃‖² + Σ_{i≠j} f̃_i f̃_j w_i·w_j and |‖z‖² − ‖f̃‖²| ≤ ε(h − 1)‖f̃‖²: the closed-form expected
norm of the code is the norm of the dense input, **AFA = ‖z‖**, with that error bound.

Per token (the core pass's non-special tokens), as in the authors' ZF-plot code:

- z = the activation fed to the SAE (raw, before ``b_dec`` is subtracted);
- f̃ = (f_i·‖W_dec[i]‖)_i followed by ‖b_dec‖ (the decoder bias is the always-on feature), so that
  x̂ = Σ_i f̃_i (W_dec[i]/‖W_dec[i]‖) + ‖b_dec‖·(b_dec/‖b_dec‖) exactly;
- ``rel_error`` r = (‖f̃‖ − ‖z‖)/‖z‖: > 0 the code is over-activated, < 0 under-activated;
- ε_LBO = |‖z‖² − ‖f̃‖²| / ((h − 1)‖f̃‖²) with h = d_sae (the authors' ``elbo`` column; their ``h`` is
  the dictionary size): the smallest quasi-orthogonality ε that the bound above allows for this token.

Per SAE: ``afa_norm_ratio`` = mean ‖f̃‖/‖z‖; ``afa_rel_error`` = mean r; ``afa_abs_rel_error`` =
mean |r|; ``afa_over_activated_fraction`` = fraction of tokens with r > 0; ``afa_eps_lbo_median`` (the
per-layer summary of the authors' violin plots) and ``afa_eps_lbo_mean``. The median is exact up to
``MEDIAN_SAMPLE`` tokens and beyond them the median of a uniform random sample of that many (reservoir sampling,
seeded): memory stays bounded (4 MiB) however many tokens are evaluated, as the sources promise. Per latent
(``afa_per_latent``): ``mean_rel_error[i]`` = mean r over the tokens on which latent i is active
(None if it never is), and ``n_tokens[i]``, which latents sit on over- or under-activated tokens.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def code_norm(values: Tensor, indices: Tensor, dec_norms: Tensor, b_dec_norm: float) -> Tensor:
    """‖f̃‖ per token from a sparse code (values [N, K], indices [N, K]): sqrt(Σ (f_i‖W_dec[i]‖)² + ‖b_dec‖²)."""
    scaled = values.double() * dec_norms[indices]
    return (scaled.pow(2).sum(-1) + b_dec_norm**2).sqrt()


def eps_lbo(z_norm: Tensor, f_norm: Tensor, h: int) -> Tensor:
    """|‖z‖² − ‖f̃‖²| / ((h − 1)‖f̃‖²) per token."""
    return (z_norm.pow(2) - f_norm.pow(2)).abs() / ((h - 1) * f_norm.pow(2))


MEDIAN_SAMPLE = 1 << 20  # ε_LBO values kept for the median (exact up to this many tokens, a uniform sample beyond)


class EpsReservoir:
    """The first ``size`` values added, then a uniform random sample of ``size`` of all of them (Algorithm R, vectorised)."""

    def __init__(self, size: int = MEDIAN_SAMPLE, seed: int = 0):
        self.size, self.seen = size, 0
        self.parts: list[Tensor] = []
        self.sample: Tensor | None = None  # [size] once more than ``size`` values were seen
        self.gen = torch.Generator().manual_seed(seed)

    def add(self, values: Tensor) -> None:
        values = values.float().cpu()
        if self.sample is None:
            room = self.size - self.seen
            self.parts.append(values[:room])
            self.seen += min(room, values.numel())
            values = values[room:]
            if self.seen < self.size or values.numel() == 0:
                return
            self.sample, self.parts = torch.cat(self.parts), []
        # Value number t (0-based) replaces a random slot with probability size / (t + 1).
        t = torch.arange(self.seen, self.seen + values.numel(), dtype=torch.float64)
        take = torch.rand(values.numel(), generator=self.gen, dtype=torch.float64) < self.size / (t + 1)
        slots = torch.randint(self.size, (int(take.sum()),), generator=self.gen)
        self.sample[slots] = values[take]
        self.seen += values.numel()

    def median(self) -> float:
        vals = self.sample if self.sample is not None else torch.cat(self.parts) if self.parts else torch.zeros(0)
        return float(vals.median()) if vals.numel() else math.nan


class AFAAccumulator:
    """Running AFA sums for one SAE, fed the core pass's tokens (``CoreAccumulator`` calls it)."""

    def __init__(self, sae):
        self.h = sae.d_sae
        self.dec_norms = sae.W_dec.detach().double().norm(dim=-1).cpu()
        self.b_dec_norm = float(sae.b_dec.detach().double().norm())
        self.n = 0
        self.ratio = self.rel = self.abs_rel = 0.0
        self.over = 0
        self.eps = EpsReservoir()
        self.eps_sum = 0.0
        self.lat_sum = torch.zeros(self.h, dtype=torch.float64)
        self.lat_n = torch.zeros(self.h, dtype=torch.long)

    @torch.no_grad()
    def add(self, x: Tensor, acts) -> None:
        """``x`` [N, d_in] (the SAE's input) and its ``SparseActs``."""
        if x.shape[0] == 0:
            return
        z = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float64).cpu()  # no float64 copy of the batch
        vals, idx = acts.values.detach().cpu(), acts.indices.detach().cpu()
        f = code_norm(vals, idx, self.dec_norms, self.b_dec_norm)
        ok = z > 0
        z, f, vals, idx = z[ok], f[ok], vals[ok], idx[ok]
        r = (f - z) / z
        self.n += int(z.numel())
        self.ratio += float((f / z).sum())
        self.rel += float(r.sum())
        self.abs_rel += float(r.abs().sum())
        self.over += int((r > 0).sum())
        e = eps_lbo(z, f, self.h)
        self.eps_sum += float(e.sum())
        self.eps.add(e)  # for the median: at most MEDIAN_SAMPLE values kept
        active = vals != 0
        rows = r[:, None].expand_as(idx)[active]
        self.lat_sum.index_add_(0, idx[active], rows)
        self.lat_n.index_add_(0, idx[active], torch.ones_like(idx[active]))

    def result(self) -> dict[str, Any]:
        if self.n == 0:
            return {}
        mean_lat = torch.where(self.lat_n > 0, self.lat_sum / self.lat_n.clamp_min(1), torch.nan)
        return {
            "afa_norm_ratio": self.ratio / self.n,
            "afa_rel_error": self.rel / self.n,
            "afa_abs_rel_error": self.abs_rel / self.n,
            "afa_over_activated_fraction": self.over / self.n,
            "afa_eps_lbo_median": self.eps.median(),
            "afa_eps_lbo_mean": self.eps_sum / self.n,
            "afa_per_latent": {"mean_rel_error": [None if math.isnan(v) else round(v, 6) for v in mean_lat.tolist()],
                               "n_tokens": self.lat_n.tolist()},
        }
