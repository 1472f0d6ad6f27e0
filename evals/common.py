"""Shared plumbing for the eval modules: special tokens, eval tokens, SAE identity, CLI arguments."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

from torch import Tensor

from saebench.io import sha256_file
from saebench.layout import describe as describe_sae_layout
from saebench.layout import weights_file
from saebench.sae import SAE
from saebench.site import Site
from saebench.text import load_tokens, special_ids

DEFAULT_EVAL_TOKENS = 65_536
DEFAULT_BATCH_SIZE = 16  # sequences per forward of the core metrics (SAEBench's per-batch variants depend on it)


special_ids_of = special_ids  # ids of BOS/EOS/pad and every other special token (saebench.text.special_ids)


def load_eval_tokens(model, corpus: str = "default", n_tokens: int = DEFAULT_EVAL_TOKENS, context_size: int = 128) -> Tensor:
    """``[n_seq, context_size]`` tokens from the held-out ``eval`` split of ``corpus`` (BOS-prefixed rows)."""
    return load_tokens(corpus, model.tokenizer, context_size, n_tokens, split="eval", prepend_bos=True)


def sae_weights_file(sae_dir: str | Path) -> Path:
    """The weights file of an SAE folder (saebench or SAELens layout)."""
    found = weights_file(sae_dir)
    if found is None:
        raise FileNotFoundError(f"{sae_dir} holds no SAE weights file (an SAE folder holds {describe_sae_layout()})")
    return found


def sae_checksum(sae_dir: str | Path) -> str:
    """sha256 of the SAE's weights and config: the identity results are cached under."""
    folder = Path(sae_dir)
    h = hashlib.sha256(sha256_file(sae_weights_file(folder)).encode())
    cfg = folder / "cfg.json"
    if cfg.exists():
        h.update(cfg.read_bytes())
    return h.hexdigest()


def config_hash(obj: Any) -> str:
    """A short stable hash of a JSON-able configuration."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def add_common_args(p: argparse.ArgumentParser, *, many: bool = False, own_text: bool = False) -> None:
    """Arguments every eval CLI shares: SAE folder(s), model, corpus and token budget, device, output.

    ``own_text``: the corpus and context size default to the SAE's own and the batch to the core metrics'
    (``saebench eval``'s defaults); otherwise ``default``, 128 and 8.
    """
    if many:
        p.add_argument("sae_dirs", nargs="+", help="SAE folders or glob patterns (quote globs)")
    else:
        p.add_argument("sae_dir", help=f"SAE folder ({describe_sae_layout()})")
    p.add_argument("--model", default=None, help="model name or local HF folder (default: the SAE's cfg.model_name)")
    if own_text:
        p.add_argument("--corpus", default=None, help="text source for eval tokens (held-out 'eval' split; default: the SAE's training corpus)")
    else:
        p.add_argument("--corpus", default="default", help="text source for eval tokens (held-out 'eval' split)")
    p.add_argument("--eval-tokens", type=int, default=DEFAULT_EVAL_TOKENS, help="tokens to evaluate on")
    p.add_argument("--context-size", type=int, default=None if own_text else 128, help="tokens per row" + (" (default: the SAE's)" if own_text else ""))
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE if own_text else 8, help="sequences per model forward")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="output JSON (default: eval_<name>.json in the SAE folder)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def load_sae_and_model(sae_dir: str | Path, model_name: str | None, device: str):
    """Load an SAE folder and the model it belongs to (or ``model_name``)."""
    from saebench import models

    sae = SAE.load(sae_dir, device=device)
    model = models.load_model(model_name or sae.cfg.model_name or None, device=device)
    return sae, model


def one_site(model, saes, who: str) -> tuple[str, int | None]:
    """``(hook, head)`` shared by every SAE in ``saes``, checked against ``model``; ``who`` names the caller in the error."""
    from saebench.models import validate_hook_name

    sites = {Site.of_sae(s) for s in saes}
    if len(sites) != 1:
        raise ValueError(f"{who} needs SAEs at one hook, got {sorted(map(str, sites))}")
    hook, head = sites.pop()
    validate_hook_name(model, hook)
    return hook, head
