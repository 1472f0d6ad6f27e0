"""Run-time checks ("canaries") of the library behaviours saebench relies on, with safe fallbacks.

A new ``transformers`` or ``transformer-lens`` release can change a behaviour we depend on without
raising anything: transformers 5.24.0 renamed the per-layer cache argument of its attention modules
from ``past_key_values`` to ``cache``; transformer-lens 4.3.0's attention bridge only reads
``past_key_values``, so it never filled the KV cache, every cached decode step attended to itself
alone at position 0, and generation silently produced garbage. Each behaviour is therefore checked
once per model, on a few tokens, against the plain full forward:

* :func:`kv_cache_ok`: a prefix pass with ``use_cache=True`` followed by teacher-forced one-token
  steps gives the full forward's logits, with and without a hook attached, and the hook fires in
  the cached steps. On a mismatch generation runs without the KV cache (slower, correct).
* :func:`check_stop_at_layer`: ``run_with_cache(..., stop_at_layer=L)`` returns the same activations
  as a full forward and really stops (a hook in a later block does not fire). Wrong activations make
  the model ignore ``stop_at_layer`` from then on (a full forward: slower, correct); a run that does
  not stop only costs time and is reported.
* resuming a forward at a residual hook: :func:`saebench.models.resume_matches` (the same idea, in
  the evaluations).

Every failed check emits a :class:`LibraryBehaviourWarning` naming the installed versions and the
fallback taken; :func:`canary_report` lists what was checked on a model. :func:`install_shims` maps
transformers >= 5.24's ``cache=`` argument back onto the ``past_key_values`` that transformer-lens
4.3 reads, which makes the KV cache correct on 5.24 again (the canary still verifies it).

Checked combinations (``bash scripts/latest_deps.sh`` re-checks the newest releases):
torch 2.13.0 with transformer-lens 4.3.0 and transformers 5.23.0 (all canaries pass) or 5.24.0
(KV cache broken without the shim, correct with it).
"""

from __future__ import annotations

import functools
import importlib.metadata
import warnings
from typing import Any

import torch

__all__ = [
    "LibraryBehaviourWarning",
    "library_versions",
    "install_shims",
    "kv_cache_ok",
    "check_stop_at_layer",
    "canary_report",
    "cached_forward",
]

# Attribute on the model holding the results: {check name: {"ok": bool, "detail": str}}.
_REPORT_ATTR = "_saebench_canaries"
_PROBE_LEN = 8


class LibraryBehaviourWarning(UserWarning):
    """A library behaviour saebench relies on changed; the message says which and the fallback taken."""


def library_versions() -> str:
    """``'torch 2.13.0+cpu, transformers 5.23.0, transformer-lens 4.3.0'`` (what is installed now)."""
    out = []
    for dist in ("torch", "transformers", "transformer-lens"):
        try:
            out.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{dist} (not installed)")
    return ", ".join(out)


def _record(model, name: str, ok: bool, detail: str) -> None:
    model.__dict__.setdefault(_REPORT_ATTR, {})[name] = {"ok": bool(ok), "detail": detail}


def canary_report(model) -> dict[str, dict[str, Any]]:
    """What was checked on ``model`` so far: ``{check: {"ok": bool, "detail": str}}``."""
    return dict(model.__dict__.get(_REPORT_ATTR, {}))


def _warn(what: str, fallback: str) -> None:
    warnings.warn(
        f"saebench: {what} with {library_versions()}. {fallback} The versions saebench was tested with are "
        "pinned in requirements/lock.txt: `bash scripts/setup.sh` installs them.",
        LibraryBehaviourWarning,
        stacklevel=3,
    )


def _probe_tokens(model) -> torch.Tensor:
    """A fixed, ordinary token sequence [1, _PROBE_LEN] (BOS first when the tokenizer has one)."""
    vocab = int(model.cfg.d_vocab)
    g = torch.Generator().manual_seed(1234)
    toks = torch.randint(min(100, vocab - 1), max(min(vocab, 5000), 101), (1, _PROBE_LEN), generator=g) % vocab
    bos = getattr(getattr(model, "tokenizer", None), "bos_token_id", None)
    if bos is not None:
        toks[0, 0] = bos
    return toks.to(model.cfg.device)


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-3) -> tuple[bool, float]:
    """Agreement within ``rtol`` of the reference's largest magnitude (float noise is ~1e-6 of it)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if a.shape != b.shape:
        return False, float("inf")
    diff = float((a - b).abs().max()) if a.numel() else 0.0
    return diff <= rtol * max(1.0, float(b.abs().max())), diff


# --------------------------------------------------------------------------- shims


def _cache_kwarg_shim(module, args, kwargs):
    # transformers >= 5.24 hands attention the layer cache as `cache=`; transformer-lens 4.3 reads `past_key_values`.
    if kwargs.get("cache") is not None and kwargs.get("past_key_values") is None:
        kwargs = dict(kwargs)
        kwargs["past_key_values"] = kwargs["cache"]
        return args, kwargs
    return None


def install_shims(model) -> None:
    """Adapt ``model`` (a TransformerBridge) to known argument renames; idempotent and a no-op where not needed."""
    if model.__dict__.get("_saebench_shims"):
        return
    for mod in model.modules():
        if hasattr(type(mod), "_update_kv_cache"):
            mod.register_forward_pre_hook(_cache_kwarg_shim, with_kwargs=True)
    model.__dict__["_saebench_shims"] = True


# --------------------------------------------------------------------------- the KV cache


def cached_forward(model, inp: torch.Tensor, past=None, **kwargs):
    """One forward that starts (``past`` None) or extends a KV cache: ``(logits, cache)``.

    The single place saebench calls the cached path, so the canary checks exactly what generation runs.
    """
    with warnings.catch_warnings():
        # transformers >= 5.24 deprecates the name the bridge passes the cache under; the canary
        # checks that the cache still works, so the per-step notice is noise here.
        warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
        if past is None:
            return model(inp, return_type="logits_and_cache", use_cache=True, **kwargs)
        return model(inp, return_type="logits_and_cache", past_key_values=past, **kwargs)


def _kv_mismatch(model) -> str | None:
    """None when cached decoding reproduces the full forward (plain and hooked); else what differed."""
    toks = _probe_tokens(model)
    n_prefix = _PROBE_LEN - 3
    hook_name = "blocks.0.hook_resid_post"
    g = torch.Generator().manual_seed(7)
    vec = torch.randn(int(model.cfg.d_model), generator=g)
    calls: list[int] = []

    def add(act, hook=None):
        calls.append(act.shape[1])
        return act + vec.to(act.device, act.dtype)  # the same at every position, as a steering vector

    for hooked in (False, True):
        ctx = model.hooks(fwd_hooks=[(hook_name, add)]) if hooked else _null()
        with torch.no_grad(), ctx:
            full = model(toks)
            calls.clear()
            logits, past = cached_forward(model, toks[:, :n_prefix])
            steps = [logits[:, -1]]
            for p in range(n_prefix, _PROBE_LEN - 1):
                logits, past = cached_forward(model, toks[:, p : p + 1], past)
                steps.append(logits[:, -1])
        got = torch.stack(steps, 1)
        want = full[:, n_prefix - 1 : _PROBE_LEN - 1]
        ok, diff = _close(got, want)
        label = "with a hook attached" if hooked else "without hooks"
        if not ok:
            return f"KV-cached decoding {label} differs from the full forward by up to {diff:.3g} in the logits"
        if hooked and calls[1:] != [1] * (len(steps) - 1):
            return f"a hook did not fire in the KV-cached decode steps (positions seen per call: {calls})"
    return None


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def kv_cache_ok(model) -> bool:
    """Whether KV-cached generation on ``model`` equals the uncached forward (checked once per model).

    Run it with no hooks attached. A failure warns once and makes callers generate without the cache.
    """
    report = model.__dict__.get(_REPORT_ATTR, {})
    if "kv_cache" in report:
        return report["kv_cache"]["ok"]
    install_shims(model)
    try:
        problem = _kv_mismatch(model)
    except Exception as e:  # noqa: BLE001 - any failure of the cached path means: do not use it
        problem = f"the KV-cached forward raised {type(e).__name__}: {e}"
    _record(model, "kv_cache", problem is None, problem or "cached decoding equals the full forward (plain and hooked)")
    if problem:
        _warn(problem, "Generating without the KV cache from now on (slower, correct).")
    return problem is None


# --------------------------------------------------------------------------- stop_at_layer


def _ignore_stop_at_layer(fn):
    @functools.wraps(fn)
    def run(*args, stop_at_layer=None, **kwargs):
        return fn(*args, **kwargs)

    run._saebench_ignores_stop = True
    return run


def check_stop_at_layer(model) -> bool:
    """Check ``stop_at_layer`` on ``model`` once; on wrong activations make the model ignore it (full forwards).

    Returns whether activations under ``stop_at_layer`` are right. A run that is right but does not
    stop early is only reported (a warning): it costs time, not correctness.
    """
    report = model.__dict__.get(_REPORT_ATTR, {})
    if "stop_at_layer" in report:
        return report["stop_at_layer"]["ok"]
    n_layers = int(model.cfg.n_layers)
    if n_layers < 2:
        _record(model, "stop_at_layer", True, "one block: nothing to stop early")
        return True
    hook, later = "blocks.0.hook_resid_post", f"blocks.{n_layers - 1}.hook_resid_post"
    toks = _probe_tokens(model)
    fired: list[str] = []
    problem, slow = None, None
    try:
        with torch.no_grad():
            _, full = model.run_with_cache(toks, names_filter=[hook])
            with model.hooks(fwd_hooks=[(later, lambda act, hook=None: fired.append("x"))]):
                _, early = model.run_with_cache(toks, names_filter=[hook], stop_at_layer=1)
        ok, diff = _close(early[hook], full[hook], rtol=1e-5)
        if not ok:
            problem = f"run_with_cache(stop_at_layer=1) returns activations that differ from the full forward by {diff:.3g}"
        elif fired:
            slow = "run_with_cache(stop_at_layer=1) does not stop: a hook in the last block fired"
    except Exception as e:  # noqa: BLE001
        problem = f"run_with_cache(stop_at_layer=1) raised {type(e).__name__}: {e}"
    if problem:
        for name in ("run_with_cache", "run_with_hooks"):
            fn = getattr(model, name, None)
            if fn is not None and not getattr(fn, "_saebench_ignores_stop", False):
                setattr(model, name, _ignore_stop_at_layer(fn))
        _warn(problem, "saebench now runs the whole model instead of stopping early (slower, correct).")
    elif slow:
        _warn(slow, "Results are right; harvesting is slower than it should be.")
    _record(model, "stop_at_layer", problem is None, problem or slow or "stops early with the same activations")
    return problem is None
