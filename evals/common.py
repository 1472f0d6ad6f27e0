"""Shared plumbing for the eval modules: special tokens, eval tokens, SAE identity, CLI arguments."""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saebench.io import sha256_file
from saebench.layout import describe as describe_sae_layout
from saebench.layout import weights_file
from saebench.sae import SAE

DEFAULT_EVAL_TOKENS = 65_536


def special_ids_of(tokenizer) -> Tensor:
    """Ids of BOS/EOS/pad and every other special token of ``tokenizer`` (LongTensor)."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids |= {getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None), getattr(tokenizer, "pad_token_id", None)}
    ids.discard(None)
    return torch.tensor(sorted(ids), dtype=torch.long)


def load_eval_tokens(model, corpus: str = "default", n_tokens: int = DEFAULT_EVAL_TOKENS, context_size: int = 128) -> Tensor:
    """``[n_seq, context_size]`` tokens from the held-out ``eval`` split of ``corpus`` (BOS-prefixed rows)."""
    from saebench import text

    kwargs: dict[str, Any] = {"split": "eval"}
    if "prepend_bos" in inspect.signature(text.load_tokens).parameters:
        kwargs["prepend_bos"] = True
    return text.load_tokens(corpus, model.tokenizer, context_size, n_tokens, **kwargs)


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


def add_common_args(p: argparse.ArgumentParser, *, many: bool = False) -> None:
    """Arguments every eval CLI shares: SAE folder(s), model, corpus and token budget, device, output."""
    if many:
        p.add_argument("sae_dirs", nargs="+", help="SAE folders or glob patterns (quote globs)")
    else:
        p.add_argument("sae_dir", help="SAE folder (cfg.json + sae_weights.safetensors, as SAELens writes; sae.safetensors in older saebench folders)")
    p.add_argument("--model", default=None, help="model name or local HF folder (default: the SAE's cfg.model_name)")
    p.add_argument("--corpus", default="default", help="text source for eval tokens (held-out 'eval' split)")
    p.add_argument("--eval-tokens", type=int, default=DEFAULT_EVAL_TOKENS, help="tokens to evaluate on")
    p.add_argument("--context-size", type=int, default=128, help="tokens per row")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per model forward")
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
    from saebench.steering import sae_site

    sites = {sae_site(s) for s in saes}
    if len(sites) != 1:
        raise ValueError(f"{who} needs SAEs at one hook, got {sorted(map(str, sites))}")
    hook, head = sites.pop()
    validate_hook_name(model, hook)
    return hook, head
