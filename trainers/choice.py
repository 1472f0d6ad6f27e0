"""Feature Choice SAE (Ayonrinde 2024, arXiv 2411.02124) with a Zipf auxiliary loss.

Selection: with affinities S = ReLU(pre) [B, n], every latent (column) takes its m = round(k·B/n)
highest-affinity tokens (only those with S > 0), so the total budget is about k·B and per-token L0
varies (the SAE analogue of expert-choice routing). Mutual Choice, the unconstrained top-(k·B), is
``batchtopk``/``mutual_choice``.

Inference: per-latent thresholds, θ_i = bias-corrected EMA of latent i's smallest selected activation
(its m-th largest affinity) per batch; exported as ``jumprelu``. A latent that never fired keeps θ = +inf.

aux_zipf_loss (the paper's formula was not retrievable; this is our reconstruction, see
docs/METHODS_IMPLEMENTED.md). Let ρ_i be an EMA (β = ``density_beta``) of latent i's firing frequency.
Sort ρ descending, rank r(i) = 1..n. Fit a Zipf law log ρ_(r) ≈ a − s·log r by least squares over the
head of the ranking (the top ``zipf_fit_fraction`` of ranks with ρ > 0), where the paper reports that
feature densities follow Zipf except at the low end. The target of latent i is p_i = exp(a − s·log r(i)).
Its under-use gap is w_i = clamp(1 − ρ_i/p_i, 0, 1), counted only if w_i > ``zipf_tolerance``; dead
latents (per the loop's dead mask) have w_i = 1. Then, exactly as AuxK but over the under-used set U:
ê = Σ_{j ∈ top-k_aux(U)} ReLU(π_j)·d_j reconstructs the residual e = x − x̂ (detached), and
L_zipf = α·‖e − ê‖²/‖e − ē‖², α = 1/32, with each latent's gradient scaled by its gap w_j. When only
dead latents are under-used this is AuxK; when the densities follow the fitted law it is 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from saebench import sparse
from saebench.sae import SAE
from saebench.trainers.base import Method, StepInput, StepOutput, normalized_mse, register
from saebench.trainers.batchtopk import ThresholdEMA, ThresholdMixin, ThresholdOptions
from saebench.sparse import SparseActs


class FeatureChoiceOptions(ThresholdOptions):
    density_beta: float = Field(0.99, gt=0, lt=1, description="EMA decay of each latent's firing frequency (for aux_zipf_loss).")
    zipf_fit_fraction: float = Field(0.8, gt=0, le=1, description="Fraction of top-ranked latents the Zipf law is fitted to.")
    zipf_tolerance: float = Field(0.1, ge=0, lt=1, description="Relative shortfall below the fitted density that counts as under-used.")


def zipf_underuse(density: Tensor, fit_fraction: float = 0.8, tolerance: float = 0.1) -> Tensor:
    """Under-use gap w [n] in [0, 1] of each latent relative to a Zipf law fitted to the densities' head.

    ``density`` [n] are firing frequencies. w_i = clamp(1 − ρ_i/p_i, 0, 1) where p is the fitted law at
    latent i's rank, zeroed where w_i ≤ ``tolerance``; latents with ρ = 0 get w = 1.
    """
    n = density.numel()
    rho = density.double()
    order = rho.argsort(descending=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(n, device=rho.device)
    sorted_rho = rho[order]
    head = max(2, int(round(fit_fraction * n)))
    log_r = torch.arange(1, n + 1, device=rho.device, dtype=torch.float64).log()
    use = torch.zeros(n, dtype=torch.bool, device=rho.device)
    use[:head] = True
    use &= sorted_rho > 0
    if use.sum() < 2:
        return (rho == 0).to(density.dtype)
    xs, ys = log_r[use], sorted_rho[use].log()
    slope = ((xs - xs.mean()) * (ys - ys.mean())).sum() / (xs - xs.mean()).pow(2).sum().clamp_min(1e-12)
    intercept = ys.mean() - slope * xs.mean()
    target = (intercept + slope * log_r[ranks]).exp()
    gap = (1 - rho / target).clamp(0, 1)
    gap = torch.where(gap > tolerance, gap, torch.zeros_like(gap))
    return torch.where(rho == 0, torch.ones_like(gap), gap).to(density.dtype)


def feature_choice_mask(affinity: Tensor, m: int) -> Tensor:
    """Boolean [B, n]: each column's top-m entries of ``affinity`` [B, n] that are positive."""
    m = max(1, min(m, affinity.shape[0]))
    top = affinity.topk(m, dim=0, sorted=False).indices
    mask = torch.zeros_like(affinity, dtype=torch.bool).scatter_(0, top, True)
    return mask & (affinity > 0)


def _scale_grad(t: Tensor, w: Tensor) -> Tensor:
    """Same value as ``t``, gradient multiplied by ``w`` (elementwise)."""
    return t * w + (t * (1 - w)).detach()


@register
class FeatureChoice(ThresholdMixin, Method):
    """Each latent picks its top-m tokens per batch; Zipf aux loss; per-latent thresholds at inference."""

    name = "feature_choice"
    architecture = "jumprelu"
    Options = FeatureChoiceOptions

    def capacity(self, batch_tokens: int, n_latents: int) -> int:
        """m: tokens per latent per batch, spending the TopK budget k·B."""
        return max(1, round(self.cfg.k * batch_tokens / n_latents))

    def select(self, pre: Tensor, batch: StepInput, sae: SAE | None = None) -> tuple[Tensor, Tensor | None]:
        if self._warming_up(batch):
            return sparse.topk_select(pre, self.cfg.k), None
        mask = feature_choice_mask(pre.clamp_min(0), self.capacity(*pre.shape))
        return sparse.mask_to_indices(mask, pre)

    # ----- aux_zipf_loss ------------------------------------------------------------------------
    def _density(self, n: int, device) -> ThresholdEMA:
        if getattr(self, "_density_ema", None) is None:
            self._density_ema = ThresholdEMA(n, self.opts.density_beta, device)
            if getattr(self, "_pending_state", None):
                self._density_ema.load_state(self._pending_state, "density")
        return self._density_ema

    def underuse(self, n: int, device, dead: Tensor | None) -> Tensor:
        """Gap weights w [n] from the density EMA (zeros before any estimate), dead latents at 1."""
        ema = self._density(n, device)
        if (ema.weight > 0).any():
            w = zipf_underuse(ema.avg / ema.weight.clamp_min(1e-300), self.opts.zipf_fit_fraction, self.opts.zipf_tolerance).float()
        else:
            w = torch.zeros(n, device=device)
        return w if dead is None else torch.where(dead, torch.ones_like(w), w)

    def auxk_loss(self, sae: SAE, x_c: Tensor, pre: Tensor, residual: Tensor, dead: Tensor | None) -> Tensor | None:
        return self.zipf_loss(sae, x_c, pre, residual, self.underuse(sae.d_sae, pre.device, dead))

    def zipf_loss(self, sae: SAE, x_c: Tensor, pre: Tensor, residual: Tensor, gap: Tensor) -> Tensor | None:
        """AuxK over the latents with gap w > 0, each latent's gradient scaled by w."""
        under = gap > 0
        if not self.opts.auxk_coef or not under.any():
            return None
        k_aux = min(self.opts.k_aux or sae.d_in // 2, int(under.sum()))
        idx = pre.masked_fill(~under, -torch.inf).topk(k_aux, dim=-1, sorted=False).indices
        vals = F.relu(sparse.gather_pre(x_c, sae.encoder_weight, sae.b_enc, pre, idx))
        vals = _scale_grad(vals, gap.to(vals.dtype)[idx])
        e = residual.detach()
        e_hat = sparse.decode(SparseActs(vals, idx), sae.W_dec)
        return self.opts.auxk_coef * torch.nan_to_num(normalized_mse(e_hat, e), 0.0)

    # ----- EMAs ----------------------------------------------------------------------------------
    @torch.no_grad()
    def after_step(self, sae: SAE, inp: StepInput, out: StepOutput, step: int) -> None:
        vals, idx = out.acts.values.detach(), out.acts.indices
        pos = vals > 0
        n = sae.d_sae
        fired = torch.zeros(n, device=vals.device).index_add_(0, idx[pos], torch.ones_like(vals[pos]))
        self._density(n, vals.device).update(fired / vals.shape[0])
        # θ_i statistic: latent i's smallest selected activation in this batch.
        mins = torch.full((n,), torch.inf, device=vals.device, dtype=vals.dtype)
        mins = mins.scatter_reduce(0, idx[pos], vals[pos], reduce="amin")
        self._set_threshold(sae, mins, fired > 0, step)

    def state(self) -> dict[str, Tensor]:
        out = super().state()
        dens = getattr(self, "_density_ema", None)
        return out if dens is None else out | dens.state("density")

    def load_state(self, state: dict[str, Tensor]) -> None:
        super().load_state(state)
        self._density_ema = None
