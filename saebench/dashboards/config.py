"""What a dashboard build computes (``DashboardConfig``) and the files of ``SAE_DIR/dashboards/``."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from saebench.layout import DASHBOARD_DB_FILE, DASHBOARD_DIR

__all__ = [
    "CODES_FILE", "DASHBOARD_DIR", "DB_FILE", "FORMAT_VERSION", "LABELS_FILE", "STATS_FILE", "TOKENS_FILE", "TOKEN_CODES_FILE",
    "DashboardConfig", "build_command", "dashboard_dir",
]

DB_FILE = DASHBOARD_DB_FILE
LABELS_FILE = "labels.sqlite"
TOKENS_FILE = "tokens.npy"
STATS_FILE = "feature_stats.npz"
CODES_FILE = "codes.safetensors"
TOKEN_CODES_FILE = "token_codes.safetensors"  # the sparse codes, kept for co-activation across SAEs
# 2: fire_words (text search where the latent fires), summaries (+ FTS), token_codes.safetensors
FORMAT_VERSION = 2


class DashboardConfig(BaseModel):
    """What a dashboard precompute computes and on which tokens (recorded as provenance)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_tokens: int = Field(131_072, gt=0, description="Tokens (positions, special tokens included) to scan for examples.")
    corpus: str | None = Field(None, description="Text source (default: the corpus the SAE was trained on, per its cfg metadata).")
    split: Literal["train", "eval"] = Field("eval", description="Corpus split; 'eval' is held out from SAE training.")
    context_size: int | None = Field(None, gt=1, description="Tokens per sequence (default: the SAE's context size, else 128).")
    exclude_special_tokens: bool = Field(True, description="Mask BOS/EOS/pad positions: they never count as activations.")
    outlier_norm_factor: float | None = Field(10.0, gt=1, description=(
        "Mask tokens whose activation norm exceeds this multiple of the median of their model batch (attention sinks, as in "
        "training): on SmolLM2 the first token after BOS has a norm of ~1,000x the rest and every latent would peak there. None keeps all."))
    model_batch_size: int = Field(16, gt=0, description="Sequences per model forward while harvesting.")
    feature_batch_size: int = Field(256, gt=0, description="Latents processed (and committed) together; the unit of resume.")
    n_top: int = Field(20, gt=0, description="Top-activating examples stored per latent (and most negative ones for signed SAEs).")
    n_intervals: int = Field(5, gt=0, description="Equal-width activation intervals sampled per latent (per sign for signed SAEs).")
    per_interval: int = Field(5, gt=0, description="Random examples stored per interval.")
    window_before: int = Field(16, ge=0, description="Context tokens stored before each example's peak token.")
    window_after: int = Field(6, ge=0, description="Context tokens stored after each example's peak token.")
    n_logits: int = Field(10, gt=0, description="Top positive and negative logit-effect tokens stored per latent.")
    n_hist_bins: int = Field(50, gt=1, description="Bins of the activation and logit-effect histograms.")
    n_neighbours: int = Field(10, gt=0, description="Nearest latents stored by decoder cosine and by activation correlation.")
    dense_threshold: float = Field(0.1, gt=0, le=1, description="A latent active on more than this fraction of tokens is flagged dense.")
    seed: int = Field(0, description="Seed for the interval samples.")
    device: str = Field("cpu", description="Device for the model, the SAE and the matrix products.")


def dashboard_dir(sae_dir: str | Path) -> Path:
    """Where the dashboards of the SAE in ``sae_dir`` live."""
    return Path(sae_dir) / DASHBOARD_DIR


def build_command(sae_dir: str | Path) -> str:
    """The shell command that builds the dashboards of ``sae_dir`` (shown by the app when missing)."""
    return f"saebench dashboards {shlex.quote(str(sae_dir))}"
