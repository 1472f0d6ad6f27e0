"""(input, target) activation pairs with a planted sparse map, for transcoders (issue #18.7).

A real pair comes from one forward of the model at two hooks (``HookedSource`` with both hooks; the training
loop harvests ``hook_name`` and ``target_hook`` together). ``PlantedPairSource`` is the ground truth for
tests: m planted features, each with an input direction e_i (in d_in) and an output direction d_i (in d_out),

    x = Σ_i c_i e_i + n,     y = Σ_i c_i d_i (+ W_skip* x),

with the sparse coefficients of ``SyntheticSource`` (``n_active`` per token, magnitudes Uniform[0.5, 1.5]) and
optional dense Gaussian noise n (``noise``: E‖n‖² = noise²). A transcoder that recovers the map has decoder
rows at the d_i. The skip part is identifiable only with the noise: without it, any linear L could stand in
for W_skip* (y = L x + Σ c_i (d_i + (W_skip* − L) e_i) is just as sparse), but the dense n spans every
direction and no k-sparse code can carry W_skip* n, so only W_skip = W_skip* explains y.
"""

from __future__ import annotations

import torch

from saebench.activations import Batch, SyntheticSource, recovery  # noqa: F401  (recovery: the planted-recovery rule, re-exported)


class PlantedPairSource(SyntheticSource):
    """Two hooks, ``in_hook`` (x) and ``out_hook`` (y = D f(x) (+ skip)), sharing one sparse code per token."""

    def __init__(self, d_in: int = 32, d_out: int = 24, m: int = 64, n_active: int = 3, *, skip_rank: int = 0, skip_scale: float = 1.0,
                 noise: float = 0.0, chunk_tokens: int = 8192, seed: int = 0, in_hook: str = "in", out_hook: str = "out"):
        super().__init__(d=d_in, m=m, n_active=n_active, chunk_tokens=chunk_tokens, seed=seed, hook_name=in_hook)
        gen = torch.Generator().manual_seed(seed + 104_729)
        self.out_features = torch.nn.functional.normalize(torch.randn(m, d_out, generator=gen), dim=-1)  # d_i
        # W_skip* [d_out, d_in]: a dense low-rank linear part (0 = none), of operator norm ~skip_scale
        self.W_skip = torch.zeros(d_out, d_in)
        if skip_rank:
            u = torch.linalg.qr(torch.randn(d_out, skip_rank, generator=gen))[0]
            v = torch.linalg.qr(torch.randn(d_in, skip_rank, generator=gen))[0]
            self.W_skip = skip_scale * u @ v.T
        self.noise = noise
        self.hook_names = [in_hook, out_hook]
        self.d_in = {in_hook: d_in, out_hook: d_out}

    @property
    def provenance(self) -> dict:
        return super().provenance | {"kind": "synthetic_pairs", "hook_names": self.hook_names,
                                     "description": f"planted map x -> y: m={self.m}, n_active={self.n_active}, seed={self.seed}, "
                                                    f"skip rank {int(torch.linalg.matrix_rank(self.W_skip)) if self.W_skip.any() else 0}"}

    def chunk(self, i: int) -> Batch:
        c = self.coefficients(i)
        x = c @ self.features
        if self.noise:
            gen = torch.Generator().manual_seed(self.seed * 7919 + i + 1_000_003)
            x = x + torch.randn(x.shape, generator=gen) * (self.noise / x.shape[1] ** 0.5)
        y = c @ self.out_features + x @ self.W_skip.T
        return Batch({self.hook_names[0]: x, self.hook_names[1]: y}, torch.zeros(len(x), dtype=torch.long))



