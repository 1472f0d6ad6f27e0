"""Feature Choice and Mutual Choice SAEs (Ayonrinde 2024, arXiv 2411.02124) with a Zipf auxiliary loss.

Feature Choice selection: with affinities S = ReLU(pre) [B, n], every latent (column) takes its m_i
highest-affinity tokens (only those with S > 0), so the total budget is about k·B and per-token L0
varies (the SAE analogue of expert-choice routing). Capacities are uniform by default, m_i = round(k·B/n);
``capacity="zipf"`` makes them Zipf-shaped, m_i ∝ r_i^(−s) over the latents' current density ranks r_i
(as a reviewer of the paper describes), normalised to k·B and clamped to [1, B].

Mutual Choice selection: the unconstrained top-(k·B) of S over the batch (BatchTopK's rule), trained with
the same Zipf auxiliary loss instead of AuxK, as the paper trains it (before, ``mutual_choice`` was a
second name for ``batchtopk`` and bit-identical to it).

Inference: Feature Choice has per-latent thresholds, θ_i = bias-corrected EMA of latent i's smallest selected
activation (its m-th largest affinity) per batch; Mutual Choice one global θ as BatchTopK; both export
as ``jumprelu``. A latent that never fired keeps θ = +inf.

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

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from saebench.trainers.base import Method, StepInput, StepOutput, normalized_mse, register
from saebench.trainers.batchtopk import WARMUP_WHY, BatchTopK, ThresholdEMA, ThresholdMixin, ThresholdOptions
from torch import Tensor

from saebench import sparse
from saebench.sae import SAE
from saebench.sparse import SparseActs


class ZipfOptions(ThresholdOptions):
    """Options of the methods trained with aux_zipf_loss (Feature Choice, Mutual Choice)."""

    auxk_coef: float = Field(1 / 32, ge=0, description=(
        "Weight α of aux_zipf_loss (AuxK over the dead and under-used latents, each latent's gradient scaled by its gap); 0 disables."))
    density_beta: float = Field(0.99, gt=0, lt=1, description="EMA decay of each latent's firing frequency (for aux_zipf_loss).")
    zipf_fit_fraction: float = Field(0.8, gt=0, le=1, description="Fraction of top-ranked latents the Zipf law is fitted to.")
    zipf_tolerance: float = Field(0.1, ge=0, lt=1, description="Relative shortfall below the fitted density that counts as under-used.")


class FeatureChoiceOptions(ZipfOptions):
    topk_warmup_fraction: float = Field(0.3, ge=0, le=1, description=(
        "Per-token TopK warm start as a fraction of training when topk_warmup_steps is not given (default 0.3). "
        "On planted features in heavy superposition (issue #15.9's shape: 640 features in 80 dimensions) Feature Choice from "
        "the first step recovered 67%, with this warm start 99.7%; on the small planted shapes 96-100% either way."))
    capacity: Literal["uniform", "zipf"] = Field("uniform", description=(
        "Tokens per latent per batch: 'uniform' m = round(k·B/n) for every latent; 'zipf' m_i ∝ r_i^(−s) over the latents' "
        "density ranks (the running firing-frequency EMA), normalised to k·B and clamped to [1, B]."))
    capacity_zipf_exponent: float = Field(1.0, gt=0, description="Exponent s of the Zipf-shaped capacities (capacity='zipf').")


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
    """Boolean [B, n]: each column's top-m entries of ``affinity`` [B, n] that are positive (dense reference)."""
    m = max(1, min(m, affinity.shape[0]))
    top = affinity.topk(m, dim=0, sorted=False).indices
    mask = torch.zeros_like(affinity, dtype=torch.bool).scatter_(0, top, True)
    return mask & (affinity > 0)


def feature_choice_select(affinity: Tensor, capacity: Tensor | int, scratch: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Padded rows ``(indices, valid)`` of each column's top-``capacity`` positive entries of ``affinity`` [B, n].

    ``capacity``: one m for every column, or m_i per column [n]. The same selection as
    ``mask_to_indices(feature_choice_mask(...))`` (up to ties) without a dense [B, n] mask: the columns'
    top-m_max from a contiguous transposed copy (``scratch`` [n, B], reused between steps if given: a
    top-k along the strided batch dimension costs ~1.7x as much), then the chosen (token, latent) pairs
    grouped by token (``sparse.pairs_to_rows``).
    """
    B, n = affinity.shape
    cols_first = scratch.copy_(affinity.t()) if scratch is not None else affinity.t().contiguous()
    if isinstance(capacity, int):
        m_max = max(1, min(capacity, B))
        vals, rows = cols_first.topk(m_max, dim=-1, sorted=False)
        keep = vals > 0
    else:
        capacity = capacity.clamp(1, B)
        m_max = int(capacity.max())
        vals, rows = cols_first.topk(m_max, dim=-1, sorted=True)
        keep = (vals > 0) & (torch.arange(m_max, device=affinity.device)[None, :] < capacity[:, None])
    cols = torch.arange(n, device=affinity.device)[:, None].expand(n, m_max)
    return sparse.pairs_to_rows(rows[keep], cols[keep], B)


def zipf_capacities(density: Tensor, k_total: int, batch: int, exponent: float) -> Tensor:
    """m_i ∝ r_i^(−s) (r_i = rank of ``density`` [n], descending, 1-based), summing to about ``k_total``, in [1, batch]."""
    n = density.numel()
    ranks = torch.empty(n, dtype=torch.long, device=density.device)
    ranks[density.argsort(descending=True, stable=True)] = torch.arange(1, n + 1, device=density.device)
    w = ranks.double().pow(-exponent)
    return (w * (k_total / w.sum())).round().clamp(1, batch).long()


def _scale_grad(t: Tensor, w: Tensor) -> Tensor:
    """Same value as ``t``, gradient multiplied by ``w`` (elementwise)."""
    return t * w + (t * (1 - w)).detach()


class ZipfAuxMixin:
    """aux_zipf_loss in place of AuxK, from an EMA of each latent's firing frequency (kept in ``after_step``)."""

    def _density(self, n: int, device) -> ThresholdEMA:
        if getattr(self, "_density_ema", None) is None:
            self._density_ema = ThresholdEMA(n, self.opts.density_beta, device)
            if getattr(self, "_pending_state", None):
                self._density_ema.load_state(self._pending_state, "density")
        return self._density_ema

    def densities(self, n: int, device) -> Tensor | None:
        """The firing-frequency EMA [n], None before the first estimate."""
        ema = self._density(n, device)
        return ema.avg / ema.weight.clamp_min(1e-300) if (ema.weight > 0).any() else None

    def underuse(self, n: int, device, dead: Tensor | None) -> Tensor:
        """Gap weights w [n] from the density EMA (zeros before any estimate), dead latents at 1."""
        rho = self.densities(n, device)
        if rho is not None:
            w = zipf_underuse(rho, self.opts.zipf_fit_fraction, self.opts.zipf_tolerance).float()
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
        under_idx = under.nonzero().squeeze(1)
        k_aux = min(self.opts.k_aux or sae.d_in // 2, under_idx.numel())
        # Top-k_aux among the under-used columns only: a [B, n_under] slice, not a masked [B, n] copy.
        idx = under_idx[sparse.row_topk(pre.index_select(1, under_idx), k_aux)]
        vals = F.relu(sparse.gather_pre(x_c, sae.encoder_weight, sae.b_enc, pre, idx))
        vals = _scale_grad(vals, gap.to(vals.dtype)[idx])
        e = residual.detach()
        e_hat = sparse.decode(SparseActs(vals, idx), sae.W_dec)
        return self.opts.auxk_coef * torch.nan_to_num(normalized_mse(e_hat, e), 0.0)

    @torch.no_grad()
    def _fired(self, out: StepOutput, n: int) -> Tensor:
        """Per-latent firing counts [n] of this step's codes, folded into the density EMA."""
        vals = out.acts.values
        fired = out.acts.firing_counts(n).float()  # Feature/Mutual Choice codes are ReLU'd: non-zero = positive
        self._density(n, vals.device).update(fired / vals.shape[0])
        return fired

    def state(self) -> dict[str, Tensor]:
        out = super().state()
        dens = getattr(self, "_density_ema", None)
        return out if dens is None else out | dens.state("density")

    def load_state(self, state: dict[str, Tensor]) -> None:
        super().load_state(state)
        self._density_ema = None


@register
class FeatureChoice(ZipfAuxMixin, ThresholdMixin, Method):
    """Each latent picks its top-m tokens per batch; Zipf aux loss; per-latent thresholds at inference."""

    name = "feature_choice"
    architecture = "jumprelu"
    Options = FeatureChoiceOptions

    def capacity(self, batch_tokens: int, n_latents: int) -> int:
        """m: tokens per latent per batch, spending the TopK budget k·B (uniform capacities)."""
        return max(1, round(self.cfg.k * batch_tokens / n_latents))

    def capacities(self, batch_tokens: int, n_latents: int, device) -> Tensor | int:
        """m_i per latent: ``capacity`` for all (uniform), or Zipf-shaped over the density ranks."""
        rho = self.densities(n_latents, device) if self.opts.capacity == "zipf" else None
        if rho is None:
            return self.capacity(batch_tokens, n_latents)
        return zipf_capacities(rho, self.cfg.k * batch_tokens, batch_tokens, self.opts.capacity_zipf_exponent)

    def select(self, pre: Tensor, batch: StepInput, sae: SAE | None = None) -> tuple[Tensor, Tensor | None]:
        if self._warming_up(batch):
            return sparse.topk_select(pre, self.cfg.k), None
        scratch = self.buffer("_scratch", pre.shape[::-1], pre)
        # Only positive entries are taken, so pre needs no ReLU'd copy.
        return feature_choice_select(pre, self.capacities(*pre.shape, pre.device), scratch)

    @torch.no_grad()
    def after_step(self, sae: SAE, inp: StepInput, out: StepOutput, step: int) -> None:
        fired = self._fired(out, sae.d_sae)
        vals, idx = out.acts.values.detach(), out.acts.indices
        pos = vals > 0
        # θ_i statistic: latent i's smallest selected activation in this batch.
        mins = torch.full((sae.d_sae,), torch.inf, device=vals.device, dtype=vals.dtype)
        mins = mins.scatter_reduce(0, idx[pos], vals[pos], reduce="amin")
        self._set_threshold(sae, mins, fired > 0, step)


class MutualChoiceOptions(ZipfOptions):
    topk_warmup_fraction: float = Field(0.5, ge=0, le=1, description=(
        "The TopK warm start as a fraction of training when topk_warmup_steps is not given (default 0.5, as BatchTopK). " + WARMUP_WHY))


@register
class MutualChoice(ZipfAuxMixin, BatchTopK):
    """Mutual Choice SAE (Ayonrinde 2024): the unconstrained top-(k·B) allocation with aux_zipf_loss; a global θ at inference."""

    name = "mutual_choice"
    Options = MutualChoiceOptions

    @torch.no_grad()
    def after_step(self, sae: SAE, inp: StepInput, out: StepOutput, step: int) -> None:
        self._fired(out, sae.d_sae)
        super().after_step(sae, inp, out, step)
