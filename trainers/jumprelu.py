"""JumpReLU SAE (Rajamanoharan et al. 2024, arXiv 2407.14435; Gemma Scope, arXiv 2408.05147).

f = JumpReLU_θ(π) = π·H(π − θ) with a learned per-latent θ > 0 stored as log θ (the SAE's
``log_threshold``); loss = FVU(x̂, x) + λ_t·mean_b Σ_i H(π_i − θ_i), λ warmed up linearly over
``sparsity_warmup_steps``; or, with ``sparsity_mode="target_l0"``, c·(L0/L0_target − 1)² (dictionary_learning).

Straight-through estimators with the rectangle kernel K(u) = 1[|u| < ½] and bandwidth ε:

- ∂/∂θ JumpReLU_θ(π) := −(θ/ε)·K((π − θ)/ε);  ∂/∂π JumpReLU_θ(π) := 1[π > θ];
- ∂/∂θ H(π − θ) := −(1/ε)·K((π − θ)/ε);        ∂/∂π H(π − θ) := 0 (no STE to x).

The L0 is taken on π (the paper), not on f (dictionary_learning), so both halves of the kernel window
give the threshold gradient. To stay sparse, training selects only entries with π > θ − ε/2 (outside
that window every pseudo-derivative and value is 0, so this is exact); those below θ decode as 0.

Scale of θ₀ and ε: the paper's θ₀ = ε = 0.001 assume E‖x‖² = 1. Inputs here are scaled so that
E‖x‖ = √d (unit RMS per coordinate), which multiplies every pre-activation by about √d: 0.001·√d is
0.02–0.05 for d = 512–2304. We default to ε = 0.05 (SAELens) and θ₀ = 0.1 (Anthropic's recipe at this
scale), which puts the initial threshold within a few hundred Adam steps of its final value.

``form="paper"`` selects the paper's recipe in one option: λ·L0, constant θ₀ = ε = 0.001·√d_in (the paper's
0.001 at E‖x‖² = 1), threshold lr = lr, no warm start, and Adam(β1 = 0) for this SAE's parameter groups.

In target-L0 mode the first half of training is TopK (``topk_warmup_fraction``, our addition): JumpReLU latents
fire independently of each other, so without a phase where they compete for tokens they merge planted features
and die (planted recovery 28-73% → 91-94%, docs/METHODS_IMPLEMENTED.md "Planted recovery"). At the hand-over
each latent's θ makes it fire as often as TopK selected it (``usage_thresholds``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from saebench.trainers.base import Method, Options, SparseActs, StepInput, register
from torch import Tensor

from saebench import distributed, sparse
from saebench.sae import SAE


class JumpReLUOptions(Options):
    # "form" first: the paper form fixes sparsity_mode before that mode's own defaults apply.
    mode_defaults = {
        "form": {"paper": {"sparsity_mode": "l0", "theta_init_mode": "constant", "threshold_lr_scale": 1.0, "topk_warmup_fraction": 0.0}},
        "sparsity_mode": {"target_l0": {"sparsity_coef": 1.0, "theta_init_mode": "quantile", "topk_warmup_fraction": 0.5}},
    }

    form: Literal["default", "paper"] = Field("default", description=(
        "'paper': Rajamanoharan et al.'s recipe as written: λ·L0 (sparsity_mode 'l0'), a constant θ₀ and ε of 0.001 in the "
        "paper's units (E‖x‖² = 1), i.e. 0.001·√d_in here, threshold lr = lr, no TopK warm start, and Adam β1 = 0 for this "
        "SAE's parameters (the config's β2). Any option given explicitly still wins. 'default': this library's defaults."))

    auxk_coef: float = Field(0.0, ge=0, description="Weight of AuxK on dead latents; 0 as the paper (which has no dead-latent loss); e.g. 1/32.")
    bandwidth: float | None = Field(None, gt=0, description=(
        "KDE bandwidth ε of the rectangle-kernel STE (scaled-input units); default 0.05, or 0.001·√d_in with form='paper'."))
    theta_init: float | None = Field(None, gt=0, description=(
        "Initial threshold θ₀ for every latent (theta_init_mode='constant'); default 0.1, or 0.001·√d_in with form='paper'."))
    theta_init_mode: Literal["constant", "quantile"] = Field("constant", description=(
        "Default 'constant' in l0 mode, 'quantile' in target_l0 mode. 'quantile': each latent's θ starts where it fires on L0_target/d_sae of the initialisation batch (L0_target = target_l0 or k), "
        "so training starts at the target L0. For short runs: log θ moves about lr per Adam step, so a constant θ₀ far from its "
        "final value takes thousands of steps to get there."))
    threshold_lr_scale: float = Field(10.0, gt=0, description=(
        "Learning rate of log θ as a multiple of the run's lr (1 = the paper). Adam moves log θ by about its lr per step whatever "
        "the size of its gradient, so at lr 1e-3 and scale 1 a threshold changes ~0.1% a step: too slow to follow the encoder in a "
        "run of hundreds of steps (measured in docs/METHODS_IMPLEMENTED.md: target L0 32 ends at 18.7 after 60 steps with scale 1, "
        "31.5 with 10)."))
    sparsity_mode: Literal["l0", "target_l0"] = Field("l0", description=(
        "'l0': the paper's λ·L0 penalty (L0 is whatever λ gives). 'target_l0': c·(L0/target_l0 − 1)² (dictionary_learning), "
        "which holds the mean L0 near target_l0; it changes the defaults of sparsity_coef and theta_init_mode."))
    sparsity_coef: float = Field(1e-3, ge=0, description=(
        "λ (l0 mode, default 1e-3) or c (target_l0 mode, default 1 as dictionary_learning). In l0 mode it is the FVU a latent must "
        "save per token to be worth firing."))
    sparsity_warmup_steps: int | None = Field(None, ge=0, description="Linear warmup of the sparsity coefficient; default 10% of training.")
    target_l0: float | None = Field(None, gt=0, description="Target mean L0 for target_l0 mode; default the config's k.")
    revive_dead: bool = Field(False, description=(
        "After each step, move the threshold of every dead latent (no firing for dead_window_tokens) to where it would fire "
        "on L0_target/d_sae of the batch, as the quantile initialisation does: a latent below θ − ε/2 everywhere gets no "
        "gradient at all and would stay dead (our addition)."))
    topk_warmup_fraction: float = Field(0.0, ge=0, lt=1, description=(
        "Train the first fraction of steps as TopK (per-token top-k of ReLU(π), k = round(L0_target), no sparsity loss), then "
        "set each latent's θ so that it fires on that step's batch as often as TopK selects it, and go on with the JumpReLU "
        "loss (our addition; default 0.5 in target_l0 mode, 0 otherwise). Without it, latents that fire on every token above "
        "their own threshold do not compete for tokens, merge correlated features and die (planted recovery 28-73%, "
        "docs/METHODS_IMPLEMENTED.md 'Planted recovery')."))


def rectangle(u: Tensor) -> Tensor:
    """The rectangle kernel K(u) = 1[−½ < u < ½]."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLUFunction(torch.autograd.Function):
    """π·H(π − θ) with the pseudo-derivatives of Rajamanoharan et al. (elementwise; θ broadcast)."""

    @staticmethod
    def forward(ctx, pi: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pi, theta)
        ctx.bandwidth = bandwidth
        return pi * (pi > theta).to(pi.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pi, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pi = grad * (pi > theta).to(grad.dtype)
        grad_theta = -(theta / eps) * rectangle((pi - theta) / eps) * grad
        return grad_pi, _sum_to(grad_theta, theta.shape), None


class StepFunction(torch.autograd.Function):
    """H(π − θ) with ∂/∂θ := −(1/ε)K((π − θ)/ε) and no gradient to π."""

    @staticmethod
    def forward(ctx, pi: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pi, theta)
        ctx.bandwidth = bandwidth
        return (pi > theta).to(pi.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pi, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = -(1.0 / eps) * rectangle((pi - theta) / eps) * grad
        return torch.zeros_like(pi), _sum_to(grad_theta, theta.shape), None


def _sum_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """Reduce a broadcast gradient back to ``shape`` (θ may be per-latent [n] against π [B, n])."""
    while grad.dim() > len(shape):
        grad = grad.sum(0)
    for i, s in enumerate(shape):
        if s == 1 and grad.shape[i] != 1:
            grad = grad.sum(i, keepdim=True)
    return grad


def jumprelu(pi: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
    return JumpReLUFunction.apply(pi, theta, bandwidth)


def step_fn(pi: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
    return StepFunction.apply(pi, theta, bandwidth)


@torch.no_grad()
def quantile_thresholds(sae: SAE, sample: Tensor, target_l0: float) -> Tensor:
    """θ [d_sae]: latent i's θ_i is exceeded by round(B·target_l0/d_sae) of the B sample pre-activations (so L0 ≈ target_l0).

    Floored at 1e-3 (θ must stay positive: it is stored as log θ).
    """
    pre = F.linear(sae.center(sample.to(sae.dtype)), sae.encoder_weight, sae.b_enc)
    n_fire = min(pre.shape[0] - 1, max(1, round(pre.shape[0] * target_l0 / pre.shape[1])))
    return pre.topk(n_fire + 1, dim=0).values[-1].clamp_min(1e-3)


@torch.no_grad()
def usage_thresholds(pre: Tensor, k: int) -> Tensor:
    """θ [n] from a batch's pre-activations [B, n]: latent i fires (π > θ_i) on as many tokens as per-token TopK-k selects it
    (at least one), θ_i halfway between its c_i-th and (c_i + 1)-th largest π. Floored at 1e-3."""
    B = pre.shape[0]
    counts = torch.bincount(pre.topk(k, dim=-1, sorted=False).indices.flatten(), minlength=pre.shape[1]).clamp(1, B - 1)
    top = pre.topk(int(counts.max()) + 1, dim=0).values  # [c_max + 1, n], descending
    theta = 0.5 * (top.gather(0, (counts - 1)[None]) + top.gather(0, counts[None]))[0]
    return theta.clamp_min(1e-3)


@register
class JumpReLU(Method):
    """Per-latent learned thresholds trained through kernel-density straight-through estimators."""

    name = "jumprelu"
    architecture = "jumprelu"
    Options = JumpReLUOptions

    def _paper_unit(self, d_in: int) -> float:
        """0.001 in the paper's units (E‖x‖² = 1) in ours (E‖x‖ = √d_in, so pre-activations are ~√d_in times larger)."""
        return 0.001 * math.sqrt(d_in)

    def theta_init(self, d_in: int) -> float:
        if self.opts.theta_init is not None:
            return self.opts.theta_init
        return self._paper_unit(d_in) if self.opts.form == "paper" else 0.1

    def bandwidth_for(self, d_in: int) -> float:
        if self.opts.bandwidth is not None:
            return self.opts.bandwidth
        return self._paper_unit(d_in) if self.opts.form == "paper" else 0.05

    def init_sae(self, sae: SAE, sample: Tensor, generator: torch.Generator) -> None:
        super().init_sae(sae, sample, generator)
        with torch.no_grad():
            if self.opts.theta_init_mode == "quantile":
                sae.log_threshold.copy_(quantile_thresholds(sae, sample, self.opts.target_l0 or float(self.cfg.k)).log())
            else:
                sae.log_threshold.fill_(math.log(self.theta_init(sae.d_in)))

    @torch.no_grad()
    def after_step(self, sae: SAE, inp: StepInput, out, step: int) -> None:
        if not self.opts.revive_dead or inp.dead_mask is None or not inp.dead_mask.any():
            return
        dead = inp.dead_mask.nonzero().squeeze(1)
        pre = F.linear(sae.center(inp.x), sae.encoder_weight[dead], sae.b_enc[dead])  # [B, n_dead]: the dead columns only
        n_fire = min(pre.shape[0] - 1, max(1, round(pre.shape[0] * (self.opts.target_l0 or float(self.cfg.k)) / sae.d_sae)))
        theta = pre.topk(n_fire + 1, dim=0).values[-1].clamp_min(1e-3)
        sae.log_threshold[dead] = theta.log().to(sae.dtype)

    def param_groups(self, sae: SAE, lr: float) -> list[dict]:
        rest = [p for p in sae.parameters() if p is not sae.log_threshold]
        groups = [{"params": rest}, {"params": [sae.log_threshold], "lr": lr * self.opts.threshold_lr_scale}]
        if self.opts.form == "paper":  # Adam(β1 = 0, β2) for this SAE only: per-group betas
            for g in groups:
                g["betas"] = (0.0, self.cfg.adam_betas[1])
        return groups

    @property
    def topk_warmup(self) -> int:
        return int(self.opts.topk_warmup_fraction * self.cfg.total_steps)

    def _l0_target(self) -> float:
        return self.opts.target_l0 or float(self.cfg.k)

    def select(self, pre: Tensor, batch: StepInput, sae: SAE | None = None) -> tuple[Tensor, Tensor | None]:
        warm = self.topk_warmup
        self._warm = batch is not None and batch.step < warm
        if self._warm:
            self._valid = None
            return sparse.topk_select(pre, max(1, round(self._l0_target()))), None
        if batch is not None and warm and batch.step == warm:  # the hand-over, on the global batch under data parallelism
            with torch.no_grad():
                pre_all = distributed.all_gather_cat(pre)  # the input itself outside a data-parallel step
                sae.log_threshold.copy_(usage_thresholds(pre_all, max(1, round(self._l0_target()))).log().to(sae.dtype))
        theta = sae.log_threshold.detach().exp()
        self._eps = self.bandwidth_for(sae.d_in)
        idx, valid = sparse.mask_to_indices(pre > theta - self._eps / 2, pre, dense_ok=True)
        # Scratch for this step's activate/extra_losses: which padded entries are real.
        self._valid = valid
        return idx, valid

    def activate(self, values: Tensor, indices: Tensor, sae: SAE) -> Tensor:
        if getattr(self, "_warm", False):
            return F.relu(values)
        theta = sparse.take(sae.log_threshold.exp(), indices)  # differentiable: the STE reaches log θ
        return jumprelu(values, theta, self._eps)

    def extra_losses(self, sae: SAE, inp: StepInput, pre: Tensor, acts: SparseActs, x_hat: Tensor) -> dict[str, Tensor]:
        if getattr(self, "_warm", False):
            return {}
        theta = sparse.take(sae.log_threshold.exp(), acts.indices)
        pi = pre.gather(1, acts.indices)  # the step passes no gradient to π, so no need for gather_pre
        l0 = (step_fn(pi, theta, self._eps) * self._valid).sum(-1).mean()
        if distributed.active():
            # Data parallel: the value is the global batch's mean L0 and the gradient this rank's share of it (the ranks'
            # mean of gradients is then the global one), so a non-linear penalty of L0 (target_l0) is the global batch's.
            l0 = distributed.all_reduce_mean(l0.detach()) + (l0 - l0.detach())
        warm = self.opts.sparsity_warmup_steps
        warm = int(0.1 * self.cfg.total_steps) if warm is None else warm
        coef = self.opts.sparsity_coef * (min(1.0, (inp.step + 1) / warm) if warm else 1.0)
        if self.opts.sparsity_mode == "target_l0":
            target = self.opts.target_l0 or float(self.cfg.k)
            return {"l0_loss": coef * (l0 / target - 1) ** 2}
        return {"l0_loss": coef * l0}
