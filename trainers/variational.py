"""Variational SAE with TopK (Baker & Li, arXiv 2509.22994), in the paper's and the code's form.

``vsae`` (the paper's text): μ = ReLU(pre) with σ fixed to ``noise_std`` (1 in the paper);
z = μ + σ·ε, ε ~ N(0, I) by reparameterisation; the k largest z per token are decoded (values z, no
ReLU after the noise); KL(N(μ, σ²I) ‖ N(0, I)) = ½‖μ‖² + const for σ = 1.

``vsae_det`` (the authors' code default, ``var_flag = 0``): no noise, z = μ, TopK on z, and the "KL"
½‖μ‖² is an L2 penalty on the dense encoder output.

Loss = FVU(x̂, x) + β_t·Σ_b ½‖μ_b‖² / Σ_b ‖x_b − x̄‖² + α·AuxK: the KL is divided by the same total
variance as the FVU, so β is the paper's β for the summed squared error (‖x − x̂‖²) and does not depend
on the input scale. β_t warms up linearly over ``kl_warmup_steps`` (default 10% of training, as the
authors). The KL gradient reaches every latent, so ``pre_acts`` keeps autograd for this method.

Noise comes from a ``torch.Generator`` seeded from the config seed and checkpointed with the run, so a
resumed run draws the same noise. Inference is deterministic, z = μ with TopK: the ``topk`` architecture.
The method name and options (hence which form) are recorded in cfg.json by the training loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from saebench import distributed, sparse
from saebench.sae import SAE
from saebench.trainers.base import Method, Options, SparseActs, StepInput, register, total_variance


class VSAEDetOptions(Options):
    kl_coef: float = Field(1.0, ge=0, description="β, the weight of KL(q(z|x) ‖ N(0, I)) relative to the squared error.")
    kl_warmup_steps: int | None = Field(None, ge=0, description="Linear warmup of β; default 10% of training.")


class VSAEOptions(VSAEDetOptions):
    noise_std: float = Field(1.0, gt=0, description="Fixed posterior σ of the sampled form, in scaled-input units (the paper uses 1).")


def gaussian_kl(mu: Tensor, std: float = 1.0) -> Tensor:
    """KL(N(μ, σ²I) ‖ N(0, I)) summed over the last dimension: ½Σ(μ² + σ² − 1 − log σ²)."""
    var = std**2
    return 0.5 * (mu.pow(2) + var - 1.0 - torch.log(torch.tensor(var, dtype=mu.dtype, device=mu.device))).sum(-1)


def reparameterize(mu: Tensor, std: float, generator: torch.Generator | None = None) -> Tensor:
    """z = μ + σ·ε with ε ~ N(0, I) drawn from ``generator`` (gradient flows to μ only)."""
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + std * eps


@register
class VariationalTopK(Method):
    """vSAE, sampled form: z = ReLU(pre) + σε, TopK on z, β·KL."""

    name = "vsae"
    architecture = "topk"
    Options = VSAEOptions
    sampled = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self._gen: torch.Generator | None = None
        self._gen_state: Tensor | None = None

    def pre_acts(self, sae: SAE, x_c: Tensor) -> Tensor:
        # Dense autograd: the KL term needs the gradient of every latent's μ.
        return F.linear(x_c, sae.encoder_weight, sae.b_enc)

    def _generator(self, device: torch.device) -> torch.Generator:
        if self._gen is None:
            self._gen = torch.Generator(device=device).manual_seed(self.cfg.seed + 0x5EED)
            if self._gen_state is not None:
                self._gen.set_state(self._gen_state)
        return self._gen

    def select(self, pre: Tensor, batch: StepInput, sae: SAE | None = None) -> tuple[Tensor, Tensor | None]:
        with torch.no_grad():
            mu = pre.clamp_min(0)
            if self.sampled:
                # Scratch for this step's activate: the noise of the selected entries is added there.
                self._noise = reparameterize(torch.zeros_like(mu), self.opts.noise_std, self._generator(pre.device))
                mu = mu + self._noise
            return sparse.topk_select(mu, self.cfg.k), None

    def activate(self, values: Tensor, indices: Tensor, sae: SAE) -> Tensor:
        mu = F.relu(values)
        return mu + self._noise.gather(1, indices) if self.sampled else mu

    def extra_losses(self, sae: SAE, inp: StepInput, pre: Tensor, acts: SparseActs, x_hat: Tensor) -> dict[str, Tensor]:
        mu = F.relu(pre)
        # Like normalized_mse: the global batch's sums in a data-parallel step (ranks' mean = global value).
        kl = 0.5 * mu.pow(2).sum() * distributed.dp_world_size() / total_variance(inp.x)
        warm = self.opts.kl_warmup_steps
        warm = int(0.1 * self.cfg.total_steps) if warm is None else warm
        beta = self.opts.kl_coef * (min(1.0, (inp.step + 1) / warm) if warm else 1.0)
        return {"kl_loss": beta * kl}

    def state(self) -> dict[str, Tensor]:
        return {} if self._gen is None else {"noise_rng": self._gen.get_state()}

    def load_state(self, state: dict[str, Tensor]) -> None:
        if "noise_rng" in state:
            self._gen_state = state["noise_rng"]
            self._gen = None


@register
class VariationalTopKDeterministic(VariationalTopK):
    """vSAE as in the authors' code default: no sampling, KL = ½‖μ‖² as an L2 penalty."""

    name = "vsae_det"
    Options = VSAEDetOptions
    sampled = False
