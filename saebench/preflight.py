"""Argument checks that run before a model is loaded or a harvest starts, so a typo costs a second, not a harvest.

Two stages:

- :func:`check_hook_offline` reads the model's ``config.json`` (a local folder, the cached default
  model, or a hub model already in the Hugging Face cache; nothing is downloaded and no weights are
  read) and checks the block index of a hook, the head index of ``blocks.L.attn.hook_z:H`` and, for a
  training config, ``k`` against the ``d_sae`` it implies.
- :func:`check_hook_on_model` does the same against the loaded model with a one-token forward that
  stops after the hook's block (the final word for models whose config could not be read), before
  any harvest.

:func:`check_train_config` runs the first stage for a ``TrainConfig`` together with the corpus
split check of :func:`saebench.text.check_splits`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from saebench.config import ConfigError
from saebench.site import Site

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
# Per-head attention hooks ([batch, pos, heads, d_head]) and the head count that applies to each. Keys and values have
# n_kv_heads in grouped-query models or n_heads where the bridge repeats them: checked on the loaded model only.
_PER_HEAD = {"attn.hook_z": "n_heads", "attn.hook_q": "n_heads", "attn.hook_result": "n_heads", "attn.hook_k": "kv", "attn.hook_v": "kv"}
_D_MODEL_HOOKS = {"hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_mlp_out", "hook_attn_out", "hook_in", "hook_out", "mlp.hook_out"}


def _first(d: dict, *keys: str) -> Any:
    for k in keys:
        if isinstance(d.get(k), int) and not isinstance(d.get(k), bool):
            return d[k]
    return None


def _config_json(model: str | None) -> Path | None:
    from saebench import models

    if model in (None, models.DEFAULT_MODEL):
        p = models.default_model_dir() / "config.json"
        return p if p.is_file() else None
    path = Path(str(model)).expanduser()
    if path.is_dir():
        return path / "config.json" if (path / "config.json").is_file() else None
    try:  # a hub model already in the local HF cache; never a download
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(str(model), "config.json")
        return Path(found) if isinstance(found, str) else None
    except (ImportError, ValueError, OSError):  # e.g. a name that is not a valid repo id
        return None


def model_shape(model: str | None) -> dict[str, int] | None:
    """``n_layers``, ``n_heads``, ``n_kv_heads``, ``d_model``, ``d_head``, ``d_mlp`` from the model's config.json, or None if unknown."""
    path = _config_json(model)
    if path is None:
        return None
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict):
        return None
    if isinstance(raw.get("text_config"), dict) and _first(raw, "num_hidden_layers", "n_layer") is None:
        raw = raw["text_config"]
    n_layers = _first(raw, "num_hidden_layers", "n_layer", "num_layers", "n_layers")
    n_heads = _first(raw, "num_attention_heads", "n_head", "n_heads")
    d_model = _first(raw, "hidden_size", "n_embd", "d_model")
    if not (n_layers and n_heads and d_model):
        return None
    d_head = _first(raw, "head_dim") or d_model // n_heads
    return {"n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": _first(raw, "num_key_value_heads") or n_heads, "d_model": d_model,
            "d_head": d_head, "d_mlp": _first(raw, "intermediate_size", "n_inner") or 4 * d_model}


def split_hook(spec: str) -> Site:
    """:meth:`Site.parse <saebench.site.Site.parse>` with a ``ConfigError`` that says what a head suffix looks like."""
    if ":" in spec:
        head = spec.rsplit(":", 1)[1]
        if not head.isdigit():
            raise ConfigError(f"hook {spec!r}: the part after ':' must be a head index (as in blocks.0.attn.hook_z:3), not {head!r}")
    return Site.parse(spec) if spec else Site(spec)


def _check_head(spec: str, hook: str, head: int | None, counts: dict[str, int] | None) -> None:
    m = _BLOCK.match(hook)
    site = m.group(2) if m else hook
    if head is None:
        return
    if site not in _PER_HEAD:
        raise ConfigError(f"hook {spec!r}: ':{head}' selects one attention head, which only per-head hooks have "
                          f"({', '.join('blocks.L.' + s for s in _PER_HEAD)}); drop ':{head}' or use blocks.L.attn.hook_z:{head}")
    n = (counts or {}).get(_PER_HEAD[site])
    if n is not None and head >= n:
        raise ConfigError(f"hook {spec!r}: head {head} does not exist; this model has {n} heads at {site}, so valid heads are 0-{n - 1} "
                          f"(or leave out ':H' for all heads concatenated)")


def hook_width(hook: str, head: int | None, shape: dict[str, int]) -> int | None:
    """d_in of an SAE at ``hook`` (head ``head``) from the model's shape numbers, or None if not known without the model."""
    m = _BLOCK.match(hook)
    site = m.group(2) if m else hook
    if site in _PER_HEAD:
        if _PER_HEAD[site] == "kv" and head is None:
            return None
        return shape["d_head"] * (1 if head is not None else shape["n_heads"])
    if site in _D_MODEL_HOOKS or hook in ("hook_embed", "ln_final.hook_normalized"):
        return shape["d_model"]
    if site in ("mlp.hook_post", "mlp.hook_pre"):
        return shape["d_mlp"]
    return None


def check_k(k: int, d_sae: int | None, expansion_factor: int, d_in: int, hook: str) -> None:
    """``k`` must not exceed the number of latents (given, or ``expansion_factor * d_in``)."""
    n = d_sae or expansion_factor * d_in
    if k > n:
        how = f"d_sae={d_sae}" if d_sae else f"d_sae = expansion_factor {expansion_factor} x d_in {d_in} at {hook} = {n}"
        raise ConfigError(f"k={k} exceeds the number of latents ({how}); lower k, or raise d_sae / expansion_factor")


def check_hook_offline(spec: str, model: str | None) -> dict[str, int] | None:
    """Check ``spec``'s block and head indices against ``model``'s config.json (if readable); return its shape numbers."""
    hook, head = split_hook(spec)
    shape = model_shape(model)
    m = _BLOCK.match(hook)
    if shape is not None and m and int(m.group(1)) >= shape["n_layers"]:
        n = shape["n_layers"]
        raise ConfigError(f"hook {spec!r}: block {m.group(1)} does not exist; this model has {n} blocks (blocks.0 to blocks.{n - 1})")
    _check_head(spec, hook, head, shape)
    return shape


def check_hook_on_model(model, spec: str) -> int:
    """Check ``spec`` on a loaded model (name, block, head) with a one-token forward; return the SAE's d_in there."""
    import torch

    from saebench.models import validate_hook_name

    hook, head = split_hook(spec)
    validate_hook_name(model, hook)
    _check_head(spec, hook, head, None)
    tokens = torch.tensor([[model.tokenizer.bos_token_id or 0]], device=model.cfg.device)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[hook], stop_at_layer=Site(hook).stop_layer)
    shape = tuple(cache[hook].shape[2:])
    if head is not None:
        _check_head(spec, hook, head, {_PER_HEAD[_BLOCK.match(hook).group(2)]: shape[0]} if len(shape) == 2 else None)
        return int(shape[-1])
    return int(math.prod(shape))


def check_train_config(cfg, corpus: bool = True) -> None:
    """Everything about a TrainConfig that can be checked without loading the model (fast; reads config.json and, if
    ``corpus``, the corpus until both splits it needs have a document)."""
    from saebench import text

    hook, head = split_hook(cfg.hook_name)
    shape = check_hook_offline(cfg.hook_name, cfg.model)
    width = hook_width(hook, head, shape) if shape else None
    if width is not None:
        check_k(cfg.k, cfg.d_sae, cfg.expansion_factor, width, hook)
    if corpus:
        text.check_splits(cfg.corpus, train=True, eval=cfg.eval_tokens > 0)
