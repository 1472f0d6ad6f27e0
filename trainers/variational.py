"""Variational SAE with TopK (Baker & Li, arXiv 2509.22994), in the paper's and the code's form.

``vsae`` (the paper's text): μ = ReLU(pre) with σ fixed to ``noise_std`` (1 in the paper, in raw units;
our default 0.1 in unit-RMS scaled units, see the option);
z = μ + σ·ε, ε ~ N(0, I) by reparameterisation; the k largest z per token are decoded (values z, no
ReLU after the noise); KL(N(μ, σ²I) ‖ N(0, I)) = ½‖μ‖² + const for σ = 1.

``vsae`` with ``variance="learned"`` (the authors' ``var_flag = 1``): a second linear encoder gives log σ² per latent
and token (bias −2, clamped to [−6, 2]), z = μ + σε, and the KL is the full ½Σ(μ² + σ² − 1 − log σ²); its weights
(``W_logvar``, ``b_logvar``) are training-only parameters, dropped on export.

``vsae_det`` (the authors' code default, ``var_flag = 0``): no noise, z = μ, TopK on z, and the "KL"
½‖μ‖² is an L2 penalty on the dense encoder output.

Loss = FVU(x̂, x) + β_t·Σ_b ½‖μ_b‖² / Σ_b ‖x_b − x̄‖² + α·AuxK: the KL is divided by the same total
variance as the FVU, so β is the paper's β for the summed squared error (‖x − x̂‖²) and does not depend
on the input scale: the authors' code also sums over dimensions, so their kl_coeff = 500 is β = 500 here,
but with their unconstrained decoder (codes shrink as columns grow); with our unit-norm decoder rows that
kills every latent, and the default is β = 0.03 (0.01 with the learned variance), from planted recovery. β_t warms up linearly over ``kl_warmup_steps`` (default 10% of training, as the
authors). The KL gradient reaches every latent: ``_HalfSquaredReLU`` computes it from the step's no-grad
pre-activations with one dense product (dense autograd through the encoder took two); the reconstruction's
gradient stays sparse (the selected entries only), as for TopK.

Noise comes from a ``torch.Generator`` seeded from the config seed and checkpointed with the run, so a
resumed run draws the same noise. Inference is deterministic, z = μ with TopK: the ``topk`` architecture.
The method name and options (hence which form) are recorded in cfg.json by the training loop.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from saebench.trainers.base import Method, Options, SparseActs, StepInput, register, total_variance
from torch import Tensor, nn

from saebench import distributed, sparse
from saebench.sae import SAE


class VSAEDetOptions(Options):
    kl_coef: float = Field(0.03, ge=0, description=(
        "β, the weight of KL(q(z|x) ‖ N(0, I)) against the squared error summed over dimensions (both divided by the batch's "
        "total variance). Default 0.03 (0.01 with variance='learned'), from planted recovery (docs/METHODS_IMPLEMENTED.md). The "
        "authors' kl_coeff = 500 is this β (their reconstruction is summed over dimensions too), but their decoder is "
        "unconstrained (init norm 0.1), so codes shrink as decoder columns grow; with unit-norm decoder rows 500 collapses every latent."))
    kl_warmup_steps: int | None = Field(None, ge=0, description="Linear warmup of β; default 10% of training.")


class VSAEOptions(VSAEDetOptions):
    mode_defaults = {"variance": {"learned": {"kl_coef": 0.01}}}

    variance: Literal["fixed", "learned"] = Field("fixed", description=(
        "'fixed': σ = noise_std for every latent (the paper's text). 'learned': the authors' var_flag = 1: a second linear "
        "encoder gives log σ² per latent and token (bias initialised to log_var_init, clamped to [-6, 2]), z = μ + σε, and the "
        "KL is the full ½Σ(μ² + σ² − 1 − log σ²). Its weights exist only while training (inference is z = μ)."))
    log_var_init: float = Field(-2.0, description="variance='learned': initial bias of the log σ² encoder (the authors' −2, σ ≈ 0.37).")
    noise_std: float = Field(0.1, gt=0, description=(
        "Fixed posterior σ of the sampled form, in scaled-input units (each input coordinate has RMS 1, so a latent's "
        "activation is O(1)). The paper's σ = 1 is in the authors' raw activation units, small against their activations; "
        "here σ = 1 drowns them (planted recovery 0%, 99% of latents dead; σ = 0.3: 73%; σ = 0.1: 96%)."))


def gaussian_kl(mu: Tensor, std: float = 1.0) -> Tensor:
    """KL(N(μ, σ²I) ‖ N(0, I)) summed over the last dimension: ½Σ(μ² + σ² − 1 − log σ²)."""
    var = std**2
    return 0.5 * (mu.pow(2) + var - 1.0 - torch.log(torch.tensor(var, dtype=mu.dtype, device=mu.device))).sum(-1)


def reparameterize(mu: Tensor, std: float, generator: torch.Generator | None = None) -> Tensor:
    """z = μ + σ·ε with ε ~ N(0, I) drawn from ``generator`` (gradient flows to μ only)."""
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + std * eps


class _HalfSquaredReLU(torch.autograd.Function):
    """½·Σ ReLU(pre)² with pre = (x − b_dec)·W_encᵀ + b_enc given (computed without autograd).

    ``pre`` is *consumed*: it is the step's scratch buffer (``Method.pre_acts``), the KL is its last use in the
    step, and the forward rectifies it in place into R = ReLU(pre) [B, n], which the backward reads as is: no
    [B, n] copy (two fresh 256 MB ReLU'd copies, one per pass, cost ~0.15 s a step at the benchmark shape).

    Backward, with upstream g: ∂/∂W_enc = g·Rᵀ(x − b_dec) (the one dense product: R is ~50% dense, so this is
    the math's floor, not a missed sparsity), ∂/∂b_enc = g·Σ_b R_b, ∂/∂b_dec = −g·(Σ_b R_b)·W_enc (a
    vector-matrix product: b_dec is shared by every token, so the [B, d] input gradient R·W_enc is never formed),
    ∂/∂x = g·R·W_enc only when x needs it. Autograd through a dense F.linear would cost two dense products.
    """

    @staticmethod
    def forward(ctx, x: Tensor, b_dec: Tensor, weight: Tensor, bias: Tensor, pre: Tensor) -> Tensor:
        if pre.requires_grad:
            raise ValueError("_HalfSquaredReLU rectifies pre in place: pass the step's no-grad pre-activations")
        r = pre.clamp_min_(0)
        ctx.save_for_backward(x, b_dec, weight, r)
        # summed in at least fp32 (bf16 pre under autocast)
        return (0.5 * torch.linalg.vector_norm(r.to(torch.promote_types(r.dtype, torch.float32))).pow(2)).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, b_dec, weight, r = ctx.saved_tensors
        r = r.to(weight.dtype)  # no copy in fp32; under autocast pre is bf16
        grad_x = grad_bdec = grad_w = grad_b = None
        col = r.sum(0) if (ctx.needs_input_grad[1] or ctx.needs_input_grad[3]) else None
        if ctx.needs_input_grad[2]:
            grad_w = torch.mm(r.t(), x - b_dec).mul_(grad)
        if ctx.needs_input_grad[3]:
            grad_b = grad * col
        if ctx.needs_input_grad[1]:
            grad_bdec = -grad * (col @ weight)
        if ctx.needs_input_grad[0]:
            grad_x = grad * (r @ weight)
        return grad_x, grad_bdec, grad_w, grad_b, None


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

    def _generator(self, device: torch.device) -> torch.Generator:
        if self._gen is None:
            self._gen = torch.Generator(device=device).manual_seed(self.cfg.seed + 0x5EED)
            if self._gen_state is not None:
                self._gen.set_state(self._gen_state)
        return self._gen

    @property
    def learned_variance(self) -> bool:
        return self.sampled and self.opts.variance == "learned"

    def add_training_parameters(self, sae: SAE) -> None:
        if self.learned_variance:  # the log σ² encoder: [d_sae, d_in] weight and [d_sae] bias
            sae.register_parameter("W_logvar", nn.Parameter(torch.zeros_like(sae.encoder_weight)))
            sae.register_parameter("b_logvar", nn.Parameter(torch.zeros_like(sae.b_enc)))

    def init_sae(self, sae: SAE, sample: Tensor, generator: torch.Generator) -> None:
        super().init_sae(sae, sample, generator)
        if self.learned_variance:  # the authors: Kaiming-uniform weight (a = 0.01), constant bias log_var_init
            with torch.no_grad():
                bound = math.sqrt(6.0 / ((1 + 0.01**2) * sae.d_in))
                w = torch.rand(sae.W_logvar.shape, generator=generator, dtype=torch.float32) * 2 - 1
                sae.W_logvar.copy_((w * bound).to(sae.W_logvar))
                sae.b_logvar.fill_(self.opts.log_var_init)

    def export(self, sae: SAE) -> SAE:
        """The inference SAE (z = μ, TopK), without the training-only log σ² encoder."""
        if not self.learned_variance:
            return sae
        out = SAE(sae.cfg).to(device=sae.device)
        for name in ("encoder_weight", "W_dec", "b_enc", "b_dec"):
            getattr(out, name).data.copy_(getattr(sae, name).data)
        return out

    def step(self, sae: SAE, inp: StepInput):
        if self.learned_variance:  # log σ² [B, n], dense and differentiable (the KL's σ terms reach every latent)
            self._log_var = F.linear(sae.center(inp.x), sae.W_logvar, sae.b_logvar).clamp(-6.0, 2.0)
        return super().step(sae, inp)

    def select(self, pre: Tensor, batch: StepInput, sae: SAE | None = None) -> tuple[Tensor, Tensor | None]:
        with torch.no_grad():
            if not self.sampled:  # TopK of ReLU(pre) = TopK of pre (ReLU is monotone; activate rectifies)
                return sparse.topk_select(pre, self.cfg.k), None
            # Scratch for this step's activate: the noise of the selected entries is added there.
            noise = self.buffer("_noise", pre.shape, pre)
            torch.randn(pre.shape, generator=self._generator(pre.device), dtype=pre.dtype, device=pre.device, out=noise)
            # z = ReLU(pre) + σε into a second reused buffer (a fresh [B, n] tensor page-faults every step); pre
            # stays intact for the gather, AuxK and the KL.
            z = self.buffer("_z", pre.shape, pre)
            torch.clamp_min(pre, 0, out=z)
            if self.learned_variance:  # keep ε: σ (differentiable) multiplies it in activate
                z.addcmul_(self._noise, self._log_var.detach().mul(0.5).exp())
                return sparse.topk_select(z, self.cfg.k), None
            if self.opts.noise_std != 1:
                self._noise.mul_(self.opts.noise_std)
            return sparse.topk_select(z.add_(self._noise), self.cfg.k), None

    def activate(self, values: Tensor, indices: Tensor, sae: SAE) -> Tensor:
        mu = F.relu(values)
        if not self.sampled:
            return mu
        eps = self._noise.gather(1, indices)
        if self.learned_variance:  # z = μ + σε: the reconstruction's gradient reaches log σ² of the selected entries
            return mu + eps * self._log_var.gather(1, indices).mul(0.5).exp()
        return mu + eps

    def extra_losses(self, sae: SAE, inp: StepInput, pre: Tensor, acts: SparseActs, x_hat: Tensor) -> dict[str, Tensor]:
        # ½Σ_b‖μ_b‖², μ = ReLU(pre), from the step's no-grad pre-activations; its gradient reaches every latent
        # (a dense term by definition) through one dense product in ``_HalfSquaredReLU.backward``.
        half_sq = _HalfSquaredReLU.apply(inp.x, sae.b_dec, sae.encoder_weight, sae.b_enc, pre)
        if self.learned_variance:  # + ½Σ(σ² − 1 − log σ²) over every latent and token
            lv = self._log_var
            half_sq = half_sq + 0.5 * (lv.exp() - 1.0 - lv).sum()
        # Like normalized_mse: the global batch's sums in a data-parallel step (ranks' mean = global value).
        kl = half_sq * distributed.dp_world_size() / total_variance(inp.x)
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
