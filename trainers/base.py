"""What a training method is: a selection rule, an activation, and loss terms.

``Method.step`` runs the shared sparse pipeline: dense pre-activations without autograd →
``select`` (the method's rule) → differentiable gather of the selected entries (sparse backward) →
``activate`` → sparse decode → normalised MSE + AuxK + ``extra_losses``. A new method subclasses
``Method``, overrides what differs, and registers itself with ``@register``; the training loop
never changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import Tensor

from saebench import activations, distributed, sparse
from saebench.config import ConfigError, TrainConfig
from saebench.sae import SAE, SAEConfig
from saebench.sparse import SparseActs

if TYPE_CHECKING:
    from saebench.activations import ActivationSource

METHODS: dict[str, type["Method"]] = {}


def register(cls: type["Method"]) -> type["Method"]:
    """Class decorator: make a method selectable by its ``name``."""
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type["Method"]:
    """Look a method up by name, with the list of known ones in the error."""
    import saebench.trainers  # noqa: F401  (importing the package registers every method)

    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


class OptionsBase(BaseModel):
    """What every method's options are: frozen, no unknown fields, each described.

    Every option has a ``description`` (printed by ``saebench methods``). An option whose default depends on
    another option (a "mode") is declared in ``mode_defaults``: ``{mode_option: {mode_value: {option: default}}}``;
    those defaults apply where the user did not set the option, and ``saebench methods`` prints them per mode.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    mode_defaults: ClassVar[dict[str, dict[Any, dict[str, Any]]]] = {}

    @model_validator(mode="before")
    @classmethod
    def _apply_mode_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for mode, per_value in cls.mode_defaults.items():
            value = data.get(mode, cls.model_fields[mode].default)
            data = per_value.get(value, {}) | data
        return data

    @classmethod
    def describe(cls) -> list[dict[str, Any]]:
        """Each option: name, description, default, and its default in each mode that changes it (what actually runs)."""
        out = []
        for name, f in cls.model_fields.items():
            per_mode = {f"{mode}={value!r}": d[name] for mode, vals in cls.mode_defaults.items() for value, d in vals.items() if name in d}
            out.append({"name": name, "default": f.default, "description": f.description or "", "mode_defaults": per_mode})
        return out


class Options(OptionsBase):
    """Method-specific options shared by the TopK family (AuxK)."""

    auxk_coef: float = Field(1 / 32, ge=0, description=(
        "Weight α of AuxK: the top-k_aux dead latents (no firing for dead_window_tokens) reconstruct the residual; 0 disables."))
    k_aux: int | None = Field(None, gt=0, description="Dead latents AuxK may use per token; default d_in // 2.")


@dataclass
class StepOutput:
    """What one training step produced: named loss terms and the code used for the reconstruction."""

    losses: dict[str, Tensor]
    acts: SparseActs
    x_hat: Tensor
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def loss(self) -> Tensor:
        return sum(self.losses.values())


def normalized_mse(x_hat: Tensor, x: Tensor) -> Tensor:
    """Σ‖x − x̂‖² / Σ‖x − x̄‖² over the batch (the batch FVU); scale-free.

    In a data-parallel step the sums run over the global batch: the denominator is reduced across
    ranks and the rank's numerator is scaled by the number of ranks, so the ranks' mean (what gradient
    averaging computes) is the global FVU.
    """
    sse = F.mse_loss(x_hat, x, reduction="sum")  # one fused kernel each way, no [B, d] temporaries
    if distributed.active():
        return sse * distributed.dp_world_size() / total_variance(x)
    return sse / total_variance(x)


def total_variance(x: Tensor) -> Tensor:
    """Σ_b ‖x_b − x̄‖² over the batch [B, d] (over the global batch in a data-parallel step); no gradient.

    The denominator of every FVU-normalised loss term; methods whose loss divides by the batch's
    variance should call this so that they stay exact under data parallelism.
    """
    if not distributed.active():
        with torch.no_grad():  # B·Σ_d Var_d(x), one pass per column (Welford), no [B, d] temporaries
            return (x.var(0, correction=0).sum() * x.shape[0]).clamp_min(1e-12)
    x = x.detach()
    stats = distributed.all_reduce_sum(torch.cat([x.double().sum(0), x.new_tensor([x.shape[0]], dtype=torch.float64)]))
    mean = (stats[:-1] / stats[-1]).to(x.dtype)
    return distributed.all_reduce_sum((x - mean).pow(2).sum()).clamp_min(1e-12)


class Method:
    """The base every method extends; its defaults are TopK (Gao et al. 2024) with AuxK."""

    name: ClassVar[str] = "topk"
    architecture: ClassVar[str] = "topk"  # inference architecture of the exported SAE
    Options: ClassVar[type[BaseModel]] = Options
    needs_grads: ClassVar[bool] = False  # the source must provide ∇ₓ of the LM loss (g-SAE)
    needs_model: ClassVar[bool] = False  # the method runs the model itself (end-to-end)

    @classmethod
    def make_source(cls, cfg: TrainConfig, model, *, hook_names: list[str], with_grads: bool = False,
                    progress: bool = True) -> "ActivationSource":
        """The data source the loop builds for this method when it is given none.

        Default: activations harvested at ``hook_names`` (into ``cfg.activation_cache`` when set), with
        ∇ₓ of the LM loss when ``with_grads`` (some method of the run ``needs_grads``). A method that
        trains on something else overrides this classmethod (e2e: whole token sequences, no harvest);
        the loop asks the methods and never changes. When SAEs trained together disagree on their
        source, the loop builds this default one, so an override must still train from it.
        """
        return activations.make_source(cfg, model, progress, with_grads=with_grads, hook_names=hook_names)

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        try:
            self.opts = self.Options(**cfg.method_options)
        except ValidationError as e:
            msgs = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            known = ", ".join(self.Options.model_fields)
            raise ConfigError(f"method {self.name!r} options: {msgs} (known options: {known})") from None

    # ----- construction ----------------------------------------------------------------------
    def sae_config(self, d_in: int, **fields: Any) -> SAEConfig:
        cfg = self.cfg
        d_sae = cfg.d_sae or cfg.expansion_factor * d_in
        if cfg.k > d_sae:
            raise ConfigError(f"k={cfg.k} exceeds d_sae={d_sae}")
        return SAEConfig(
            architecture=self.architecture,
            d_in=d_in,
            d_sae=d_sae,
            k=cfg.k if self.architecture in ("topk", "abstopk") else None,
            dtype=cfg.dtype,
            method=self.name,
            **fields,
        )

    def init_sae(self, sae: SAE, sample: Tensor, generator: torch.Generator) -> None:
        """Tied init and b_dec at the geometric median of a sample of (scaled) inputs."""
        sae.init_tied(generator)
        if sae.cfg.is_transcoder:
            return  # b_dec lives in the output space: the loop sets it from the targets (trainers/transcoder.py)
        with torch.no_grad():
            sae.b_dec.copy_(geometric_median(sample.float()).to(sae.dtype))

    def param_groups(self, sae: SAE, lr: float) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: one group at the run's ``lr`` unless a method needs more
        (JumpReLU's thresholds take their own learning rate). The schedule scales every group alike.

        The loop calls this once, right after building the SAE and before it initialises it or loads a
        checkpoint into it; the base first lets the method add its training-only parameters
        (``add_training_parameters``)."""
        self.add_training_parameters(sae)
        return [{"params": list(sae.parameters())}]

    def add_training_parameters(self, sae: SAE) -> None:
        """Register parameters that exist only while training on ``sae`` itself (default: none).

        Registered on the module, they are optimised, averaged over data-parallel ranks, broadcast and
        checkpointed with the SAE's own parameters. ``export`` must return an SAE without them (e.g. the
        ``standard`` method's unconstrained decoder, folded into unit-norm rows on export). Called from
        ``param_groups``; a method that overrides ``param_groups`` and has such parameters calls it too.
        """

    # ----- the training step -----------------------------------------------------------------
    def select(self, pre: Tensor, batch: "StepInput", sae: SAE | None = None) -> tuple[Tensor, Tensor | None]:
        """Training-time selection: (indices [B, K], valid mask or None).

        ``sae`` is there for rules that read the SAE's weights or thresholds (JumpReLU, g-SAE).
        """
        return sparse.topk_select(pre, self.cfg.k), None

    @property
    def signed(self) -> bool:
        return self.architecture in ("abstopk", "abs_jumprelu")

    def activate(self, values: Tensor, indices: Tensor, sae: SAE) -> Tensor:
        return values if self.signed else F.relu(values)

    def pre_acts(self, sae: SAE, x_c: Tensor) -> Tensor:
        """Dense pre-activations; computed without autograd unless a loss needs all of them.

        Written into a buffer the method keeps between steps (valid until its next step): a fresh
        [B, n] tensor costs page faults every step (~250 ms for 4096 x 16384 fp32 on CPU) on top of the
        product itself. Under autocast the product is left to autocast (bf16), into a fresh tensor.
        """
        with torch.no_grad():
            if torch.is_autocast_enabled(x_c.device.type):
                return F.linear(x_c, sae.encoder_weight, sae.b_enc)
            buf = self.buffer("_pre_buffer", (x_c.shape[0], sae.encoder_weight.shape[0]), x_c)
            return torch.addmm(sae.b_enc, x_c, sae.encoder_weight.t(), out=buf)

    def buffer(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """Scratch of ``shape`` with ``like``'s dtype and device, kept on the method as ``name`` between steps and
        remade when those change; its contents are whatever the last step left (a fresh [B, n] tensor page-faults
        every step)."""
        buf = getattr(self, name, None)
        if buf is None or buf.shape != tuple(shape) or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(shape, dtype=like.dtype, device=like.device)
            setattr(self, name, buf)
        return buf

    def step(self, sae: SAE, inp: "StepInput") -> StepOutput:
        x = inp.x
        x_c = sae.center(x)
        pre = self.pre_acts(sae, x_c)
        idx, valid = self.select(pre, inp, sae=sae)
        vals = self.activate(sparse.gather_pre(x_c, sae.encoder_weight, sae.b_enc, pre, idx), idx, sae)
        if valid is not None:
            vals = vals * valid
        acts = SparseActs(vals, idx)
        x_hat = sae.add_skip(sparse.decode(acts, sae.W_dec, sae.b_dec), x)  # a skip-transcoder adds W_skip x
        y = inp.y  # what is reconstructed: x, or a transcoder's target
        losses = {"mse_loss": normalized_mse(x_hat, y)}
        aux = self.auxk_loss(sae, x_c, pre, y - x_hat, inp.dead_mask)
        if aux is not None:
            losses["auxiliary_reconstruction_loss"] = aux
        losses |= self.extra_losses(sae, inp, pre, acts, x_hat)
        return StepOutput(losses, acts, x_hat)

    def auxk_loss(self, sae: SAE, x_c: Tensor, pre: Tensor, residual: Tensor, dead: Tensor | None) -> Tensor | None:
        """AuxK (Gao et al.): the top-k_aux *dead* latents reconstruct the residual; normalised MSE."""
        coef = getattr(self.opts, "auxk_coef", 0.0)
        if not coef or dead is None or not dead.any():
            return None
        dead_idx = dead.nonzero().squeeze(1)
        k_aux = min(getattr(self.opts, "k_aux", None) or sae.d_in // 2, dead_idx.numel())
        # Top-k_aux among the dead columns only: a [B, n_dead] slice rather than a masked [B, n] copy.
        score = pre.index_select(1, dead_idx)
        score = score.abs() if self.signed else score
        idx = dead_idx[sparse.row_topk(score, k_aux)]  # k_aux up to d_in/2: a candidate search beats torch.topk
        vals = sparse.gather_pre(x_c, sae.encoder_weight, sae.b_enc, pre, idx)
        vals = vals if self.signed else F.relu(vals)
        e = residual.detach()
        e_hat = sparse.decode(SparseActs(vals, idx), sae.W_dec)
        return coef * torch.nan_to_num(normalized_mse(e_hat, e), 0.0)

    def extra_losses(self, sae: SAE, inp: "StepInput", pre: Tensor, acts: SparseActs, x_hat: Tensor) -> dict[str, Tensor]:
        """Method-specific loss terms (none for TopK)."""
        return {}

    def after_step(self, sae: SAE, inp: "StepInput", out: StepOutput, step: int) -> None:
        """Hook after the optimizer step (threshold EMAs, schedules)."""

    def export(self, sae: SAE) -> SAE:
        """Turn the trained SAE into its inference form (default: unchanged)."""
        return sae

    def state(self) -> dict[str, Tensor]:
        """Method state to checkpoint (tensors)."""
        return {}

    def load_state(self, state: dict[str, Tensor]) -> None:
        pass


@dataclass
class StepInput:
    """One training batch, as seen by a method: scaled activations plus context."""

    x: Tensor  # [B, d_in], scaled by the normalisation factor
    dead_mask: Tensor | None  # [d_sae] bool
    step: int
    grads: Tensor | None = None  # [B, d_in] ∇ₓ LM loss, in scaled units (g-SAE)
    token_ids: Tensor | None = None
    scale: float = 1.0
    target: Tensor | None = None  # [B, d_out] a transcoder's target (scaled by its own factor); None for an SAE

    @property
    def y(self) -> Tensor:
        """What the step reconstructs: the transcoder's target, or x itself."""
        return self.x if self.target is None else self.target


def geometric_median(points: Tensor, max_iter: int = 100, tol: float = 1e-5) -> Tensor:
    """Weiszfeld iteration from the mean: argmin_y Σ‖x_i − y‖ for points [N, d]."""
    y = points.mean(0)
    for _ in range(max_iter):
        w = 1.0 / (points - y).norm(dim=-1).clamp_min(1e-8)
        y_new = (w[:, None] * points).sum(0) / w.sum()
        if (y_new - y).norm() <= tol * y.norm().clamp_min(1e-8):
            return y_new
        y = y_new
    return y

