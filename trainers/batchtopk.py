"""BatchTopK (Bussmann et al. 2024, arXiv 2412.06410) and Mutual Choice (Ayonrinde 2024, arXiv 2411.02124).

Training: keep the k·B largest entries of ReLU(pre) over the whole batch of B tokens, so per-token
L0 varies and only its mean is k; loss = FVU + α·AuxK as TopK. Mutual Choice (the unconstrained
token–feature allocation of Ayonrinde) is the same selection rule trained with the paper's auxiliary
Zipf loss instead of AuxK: ``mutual_choice`` in ``trainers/choice.py``.

Inference must not depend on the batch, so a global threshold θ is learned alongside: a
bias-corrected EMA (β = 0.999) of the batch's smallest selected activation, updated from step
min(threshold_start_step, total_steps // 2) on (dictionary_learning starts at step 1000 with a raw EMA
initialised at the first value; the bias correction gives the same average without the first-value
weight, and the cap gives short runs a threshold). The first ``topk_warmup_steps`` (default 50% of
training) select per token (TopK): a warm start without which batch selection locks in merged latents on
planted data (recovery 85% → 96% with 10%, and 1% → 82% at the shape of issue #15.9; 84-86% → 90-98% on the
other planted shapes with 50%). θ lives in the SAE's ``log_threshold`` (broadcast to
every latent), so the SAE exports as ``jumprelu``: z = pre·1[pre > θ].
"""

from __future__ import annotations

import torch
from pydantic import Field
from saebench.trainers.base import Method, Options, StepInput, StepOutput, register
from torch import Tensor

from saebench import sparse
from saebench.sae import SAE


class ThresholdOptions(Options):
    """Options of the batch-selection methods (BatchTopK/Mutual Choice, batch AbsTopK, Feature Choice)."""

    threshold_beta: float = Field(0.999, gt=0, lt=1, description="EMA decay of the inference-threshold statistic.")
    threshold_start_step: int = Field(1000, ge=0, description="First step that updates the threshold EMA (capped at total_steps // 2).")
    topk_warmup_steps: int | None = Field(None, ge=0, description=(
        "Select per token (TopK) for this many steps before the batch rule: a warm start that keeps early batch "
        "allocation from locking in merged latents. Default: topk_warmup_fraction of the run's steps."))
    topk_warmup_fraction: float = Field(0.1, ge=0, le=1, description=(
        "The TopK warm start as a fraction of training when topk_warmup_steps is not given. On planted features "
        "(docs/METHODS_IMPLEMENTED.md, 'Planted recovery') batch selection from step 0 recovered 85% (BatchTopK) and "
        "1% at the issue's shape; 10% of TopK first, 96%."))


WARMUP_WHY = (
    "On planted features (docs/METHODS_IMPLEMENTED.md, 'Planted recovery', 300 steps) batch selection with a 10% warm start "
    "recovered 84-86% on two of three shapes: free to spend L0 unevenly, it lets one latent cover two planted features with "
    "cosine ~0.6 and fire on a quarter of the tokens (lower FVU, fewer features); with 50%, 90-98%.")


class BatchTopKOptions(ThresholdOptions):
    topk_warmup_fraction: float = Field(0.5, ge=0, le=1, description=(
        "The TopK warm start as a fraction of training when topk_warmup_steps is not given (default 0.5). " + WARMUP_WHY))


class ThresholdEMA:
    """Bias-corrected EMA of a per-latent (or broadcast global) statistic, skipping absent entries.

    ``avg / weight`` is the EMA average of the values seen so far (Adam-style bias correction); entries
    never updated read as +inf (the latent never fires at inference).
    """

    def __init__(self, size: int, beta: float, device: torch.device | str = "cpu"):
        self.beta = beta
        self.avg = torch.zeros(size, dtype=torch.float64, device=device)
        self.weight = torch.zeros(size, dtype=torch.float64, device=device)

    def update(self, value: Tensor, present: Tensor | None = None) -> None:
        """Fold in ``value`` [size] (or a scalar) where ``present`` [size] is True."""
        value = value.to(self.avg).expand_as(self.avg)
        present = torch.ones_like(self.avg, dtype=torch.bool) if present is None else present.expand_as(self.avg)
        b = self.beta
        self.avg = torch.where(present, b * self.avg + (1 - b) * value, self.avg)
        self.weight = torch.where(present, b * self.weight + (1 - b), self.weight)

    def value(self) -> Tensor:
        return torch.where(self.weight > 0, self.avg / self.weight.clamp_min(1e-300), torch.inf)

    def state(self, prefix: str) -> dict[str, Tensor]:
        return {f"{prefix}_avg": self.avg, f"{prefix}_weight": self.weight}

    def load_state(self, state: dict[str, Tensor], prefix: str) -> None:
        if f"{prefix}_avg" in state:
            self.avg = state[f"{prefix}_avg"].to(self.avg)
            self.weight = state[f"{prefix}_weight"].to(self.weight)


class ThresholdMixin:
    """Shared by the batch-selection methods: keep an EMA threshold and write it into ``log_threshold``."""

    def _ema(self, size: int, device) -> ThresholdEMA:
        if getattr(self, "_threshold_ema", None) is None:
            self._threshold_ema = ThresholdEMA(size, self.opts.threshold_beta, device)
            if getattr(self, "_pending_state", None):
                self._threshold_ema.load_state(self._pending_state, "threshold")
        return self._threshold_ema

    @property
    def topk_warmup(self) -> int:
        """Steps of per-token TopK before the batch rule: the option, or its fraction of the run."""
        if self.opts.topk_warmup_steps is not None:
            return self.opts.topk_warmup_steps
        return int(self.opts.topk_warmup_fraction * self.cfg.total_steps)

    def _threshold_active(self, step: int) -> bool:
        start = min(self.opts.threshold_start_step, self.cfg.total_steps // 2)
        return step >= max(start, self.topk_warmup)

    def _warming_up(self, batch: StepInput | None) -> bool:
        """Whether this step still uses the per-token TopK warm start."""
        return batch is not None and batch.step < self.topk_warmup

    @torch.no_grad()
    def _set_threshold(self, sae: SAE, value: Tensor, present: Tensor | None, step: int) -> None:
        """Fold one batch's statistic into the EMA and store log θ in the SAE (θ = +inf: never fires)."""
        if not self._threshold_active(step):
            return
        ema = self._ema(value.numel() if value.dim() else 1, sae.device)
        ema.update(value, present)
        sae.log_threshold.copy_(ema.value().log().to(sae.dtype).expand_as(sae.log_threshold))

    def state(self) -> dict[str, Tensor]:
        ema = getattr(self, "_threshold_ema", None)
        return {} if ema is None else ema.state("threshold")

    def load_state(self, state: dict[str, Tensor]) -> None:
        self._pending_state = state
        self._threshold_ema = None


@register
class BatchTopK(ThresholdMixin, Method):
    """Top-(k·B) of ReLU(pre) over the batch in training; a learned global threshold at inference."""

    name = "batchtopk"
    architecture = "jumprelu"
    Options = BatchTopKOptions

    def select(self, pre: Tensor, batch: StepInput, sae: SAE | None = None) -> tuple[Tensor, Tensor | None]:
        if self._warming_up(batch):
            return sparse.topk_select(pre, self.cfg.k), None
        # The top k·B of pre, not of ReLU(pre): the same entries whenever k·B of them are positive, and no
        # dense [B, n] copy; selected non-positive entries (a batch with fewer positives) activate to 0.
        return sparse.batch_topk_select(pre, self.cfg.k * pre.shape[0])

    def after_step(self, sae: SAE, inp: StepInput, out: StepOutput, step: int) -> None:
        vals = out.acts.values.detach()
        pos = vals > 0
        if pos.any():  # θ statistic: the batch's smallest selected (positive) activation
            self._set_threshold(sae, vals[pos].min(), None, step)
