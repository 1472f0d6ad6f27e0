"""Typed, validated, frozen configs. A typo is an error, not a silent default.

Configs load from TOML/YAML/JSON files plus ``--field value`` overrides; the CLI's ``--help`` is
generated from the field descriptions here, so documentation and behaviour cannot drift apart.
"""

from __future__ import annotations

import difflib
import json
import tomllib
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config file or flag is invalid; the message says which field and why."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrainConfig(_Frozen):
    """Everything that defines an SAE training run."""

    # what to train on
    model: str = Field("smollm2-135m", description="Model: 'smollm2-135m' (embedded, offline), a local HF folder, or a hub name.")
    hook_name: str = Field("blocks.15.hook_resid_post", description="TransformerLens hook point, e.g. blocks.6.hook_resid_post, blocks.6.hook_mlp_out, blocks.6.attn.hook_z (add ':H' for one head).")
    corpus: str = Field("default", description="Text: 'default' (offline English), a .txt/.jsonl/.parquet file or folder, or 'hf:NAME[:CONFIG]'.")
    context_size: int = Field(128, gt=1, description="Tokens per packed sequence (BOS included).")
    prepend_bos: bool = Field(True, description="Start each packed sequence with BOS.")
    exclude_special_tokens: bool = Field(True, description="Drop BOS/EOS/pad positions from training and evaluation.")
    outlier_norm_factor: float | None = Field(10.0, gt=1, description="Drop tokens whose activation norm exceeds this multiple of the median (attention sinks); null keeps all.")

    # the SAE
    method: str = Field("topk", description="Training method: topk, batchtopk, jumprelu, abstopk, ... (see `saebench methods`).")
    d_sae: int | None = Field(None, gt=0, description="Number of latents; default expansion_factor * d_in.")
    expansion_factor: int = Field(8, gt=0, description="d_sae = expansion_factor * d_in when d_sae is not given.")
    k: int = Field(32, gt=0, description="Active latents per token (mean per token for batch methods).")
    method_options: dict[str, Any] = Field(default_factory=dict, description="Method-specific options (validated by the method; see `saebench methods`).")
    normalize_activations: Literal["expected_average_only_in", "none"] = Field("expected_average_only_in", description="Scale inputs so E||x|| = sqrt(d_in) during training; folded into the weights at save time.")

    # optimisation
    training_tokens: int = Field(2_000_000, gt=0, description="Tokens the SAE is trained on (epochs over a cache count each time).")
    batch_size_tokens: int = Field(4096, gt=0, description="Tokens per optimizer step.")
    lr: float | None = Field(None, gt=0, description="Adam learning rate; default 2e-4 / sqrt(d_sae / 2^14) (Gao et al. scaling).")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas.")
    adam_eps: float = Field(1e-8, gt=0, description="Adam epsilon.")
    lr_warmup_steps: int = Field(100, ge=0, description="Linear learning-rate warmup steps.")
    lr_decay_fraction: float = Field(0.2, ge=0, le=1, description="Fraction of training at the end over which the LR decays linearly to 0.")
    grad_clip_norm: float | None = Field(1.0, gt=0, description="Gradient-norm clip; null disables.")
    dead_window_tokens: int = Field(1_000_000, gt=0, description="A latent is dead after this many tokens without firing (drives AuxK and dead_fraction).")
    seed: int = Field(0, description="Seed for initialisation and data order.")

    # data pipeline
    activation_cache: str | None = Field(None, description="Folder for a disk cache of activations; harvested once, reused across runs and epochs.")
    harvest_tokens: int | None = Field(None, gt=0, description="Unique tokens to harvest into the cache (default: training_tokens).")
    shuffle_buffer_tokens: int = Field(65_536, gt=0, description="Tokens shuffled together (one cache shard / one harvested chunk).")
    model_batch_size: int = Field(16, gt=0, description="Sequences per model forward while harvesting.")
    device: str = Field("cpu", description="Device: cpu, cuda, cuda:1, ...")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="SAE parameter dtype.")
    on_nonfinite: Literal["stop", "skip"] = Field("stop", description="What to do with a NaN/inf batch or loss: stop with a report (keeping the last checkpoint) or skip the step.")

    # output
    out_dir: str = Field("runs/sae", description="Folder the trained SAE (sae.safetensors, cfg.json) is written to.")
    checkpoint_every_steps: int = Field(200, gt=0, description="Steps between checkpoints (resume picks up the latest).")
    resume: bool = Field(True, description="Resume from out_dir's latest checkpoint if there is one.")
    log_every_steps: int = Field(10, gt=0, description="Steps between progress-bar and wandb updates.")
    wandb: bool = Field(False, description="Log to Weights & Biases (SAELens-style keys); off by default.")
    wandb_project: str = Field("saebench", description="wandb project name.")
    eval_tokens: int = Field(65_536, ge=0, description="Held-out tokens for the core eval after training; 0 skips it.")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.d_sae is not None and self.k > self.d_sae:
            raise ValueError(f"k={self.k} must be <= d_sae={self.d_sae}")
        if self.batch_size_tokens > self.training_tokens:
            raise ValueError(f"batch_size_tokens={self.batch_size_tokens} exceeds training_tokens={self.training_tokens}")
        return self

    @property
    def total_steps(self) -> int:
        return self.training_tokens // self.batch_size_tokens


class EvalConfig(_Frozen):
    """Core evaluation of trained SAEs on held-out tokens."""

    sae: str = Field(..., description="SAE folder to evaluate.")
    model: str | None = Field(None, description="Model (default: the one recorded in the SAE's cfg.json).")
    corpus: str | None = Field(None, description="Text (default: the SAE's training corpus, held-out split).")
    eval_tokens: int = Field(65_536, gt=0, description="Held-out tokens to evaluate on.")
    context_size: int | None = Field(None, gt=1, description="Sequence length (default: the SAE's).")
    model_batch_size: int = Field(16, gt=0, description="Sequences per model forward.")
    exclude_special_tokens: bool = Field(True, description="Exclude BOS/EOS/pad from all metrics.")
    device: str = Field("cpu", description="Device.")
    out: str | None = Field(None, description="Where to write the metrics JSON (default: SAE_DIR/eval_core.json).")


C = TypeVar("C", bound=BaseModel)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML, YAML or JSON config file into a dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"config file {path}: unknown extension {path.suffix!r}; use .toml, .yaml or .json")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"config file {path} does not parse: {e}") from None
    except Exception as e:  # yaml.YAMLError and friends
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"config file {path} does not parse: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table/mapping of fields, got {type(data).__name__}")
    return data


def build_config(cls: type[C], data: dict[str, Any]) -> C:
    """Validate ``data`` into ``cls``, turning pydantic errors into one readable ``ConfigError``."""
    unknown = [key for key in data if key not in cls.model_fields]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, list(cls.model_fields), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"unknown config field(s) for {cls.__name__}: {', '.join(hints)}")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        msgs = [f"{'.'.join(map(str, err['loc'])) or cls.__name__}: {err['msg']}" for err in e.errors()]
        raise ConfigError("invalid config: " + "; ".join(msgs)) from None


def load_config(cls: type[C], path: str | Path | None = None, **overrides: Any) -> C:
    """Load ``cls`` from an optional file, then apply keyword overrides (None values are ignored)."""
    data = read_config_file(path) if path else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    return build_config(cls, data)
