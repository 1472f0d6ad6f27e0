"""Canaries for the library behaviours saebench relies on (saebench.compat), and their fallbacks.

Each break is simulated the way a library release would cause it, and the product must stay correct:
a clear LibraryBehaviourWarning naming the versions and the fallback, never silently wrong output.

Versions checked by hand with this file and tests/test_steering.py (see saebench/compat.py):
torch 2.13.0, transformer-lens 4.3.0 with transformers 5.23.0 (the lock: every canary passes) and
with transformers 5.24.0 (its `cache=` rename breaks transformer-lens 4.3's KV cache; the shim
repairs it, and without the shim the canary falls back to uncached generation).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from saebench import compat
from saebench import steering as st
from saebench.models import load_model, make_tiny_model

PROMPT = "Write a short story about a walk in the park"


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"tiny_{request.param}")
    make_tiny_model(path, arch=request.param)
    return path


def _fresh(model_dir, dtype=torch.float32):
    """A model of its own: the canaries record their answers on the model object."""
    return load_model(str(model_dir), dtype=dtype)


def _drop_layer_cache(module, args, kwargs):
    """What transformers 5.24 + transformer-lens 4.3 amount to: attention never sees the layer cache."""
    kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "layer_past")}
    return args, kwargs


def test_canaries_pass_on_the_installed_versions(model_dir):
    model = _fresh(model_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error", compat.LibraryBehaviourWarning)
        assert compat.kv_cache_ok(model)
    report = compat.canary_report(model)
    assert report["kv_cache"]["ok"] and report["stop_at_layer"]["ok"], report
    assert "torch" in compat.library_versions() and "transformers" in compat.library_versions()


def test_generation_emits_no_deprecation_noise(model_dir):
    model = _fresh(model_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        st.generate(model, PROMPT, 4, seed=0, temperature=0)


def test_broken_kv_cache_warns_and_generation_falls_back_to_the_full_forward(model_dir, monkeypatch):
    model = _fresh(model_dir)
    monkeypatch.setattr(compat, "install_shims", lambda m: None)  # no repair: the raw break
    handles = [m.register_forward_pre_hook(_drop_layer_cache, with_kwargs=True) for m in model.modules()
               if hasattr(type(m), "_update_kv_cache")]
    assert handles, "no attention bridge found to break"
    # fast_decode=False: the bridge's own cached path (the fast decoder never uses the bridge's cache;
    # tests/test_fastgen.py checks it stays right under this break)
    reference = st.generate(model, PROMPT, 10, seed=3, temperature=0.5, use_kv_cache=False)
    with pytest.warns(compat.LibraryBehaviourWarning, match=r"KV-cached decoding .* differs .*transformers .*without the KV cache"):
        cached = st.generate(model, PROMPT, 10, seed=3, temperature=0.5, use_kv_cache=True, fast_decode=False)
    assert torch.equal(cached.tokens, reference.tokens)
    assert compat.canary_report(model)["kv_cache"]["ok"] is False
    with warnings.catch_warnings():  # warned once per model, not per generation
        warnings.simplefilter("error", compat.LibraryBehaviourWarning)
        st.generate(model, PROMPT, 3, seed=3, fast_decode=False)


def test_the_shim_maps_the_renamed_cache_argument():
    cache = object()
    assert compat._cache_kwarg_shim(None, (), {"hidden_states": 1}) is None  # nothing to do
    args, kw = compat._cache_kwarg_shim(None, (1,), {"cache": cache})
    assert args == (1,) and kw["past_key_values"] is cache and kw["cache"] is cache
    assert compat._cache_kwarg_shim(None, (), {"cache": cache, "past_key_values": cache}) is None


def test_kv_canary_catches_a_cached_path_that_raises(model_dir, monkeypatch):
    model = _fresh(model_dir)

    def broken(model, inp, past=None, **kw):
        raise TypeError("unexpected keyword argument 'past_key_values'")

    monkeypatch.setattr(compat, "cached_forward", broken)
    monkeypatch.setattr(st, "cached_forward", broken)
    with pytest.warns(compat.LibraryBehaviourWarning, match="raised TypeError"):
        out = st.generate(model, PROMPT, 5, seed=1, temperature=0, fast_decode=False)  # the bridge's cached path
    assert out.tokens.shape[1] == out.prompt_len + 5


def _site(model, toks, stop=None):
    kw = {} if stop is None else {"stop_at_layer": stop}
    _, cache = model.run_with_cache(toks, names_filter=["blocks.0.hook_resid_post"], **kw)
    return cache["blocks.0.hook_resid_post"]


def test_stop_at_layer_with_wrong_activations_falls_back_to_full_forwards(model_dir):
    model = _fresh(model_dir)
    model.__dict__.pop(compat._REPORT_ATTR, None)
    toks = model.to_tokens(PROMPT)
    clean = _site(model, toks)
    real = model.run_with_cache

    def corrupt(*args, stop_at_layer=None, **kwargs):
        out, cache = real(*args, stop_at_layer=stop_at_layer, **kwargs)
        if stop_at_layer is not None:
            for k in list(cache.keys()):
                cache.cache_dict[k] = cache[k] + 1.0
        return out, cache

    model.run_with_cache = corrupt
    with pytest.warns(compat.LibraryBehaviourWarning, match=r"stop_at_layer=1\) returns activations that differ.*whole model"):
        assert compat.check_stop_at_layer(model) is False
    torch.testing.assert_close(_site(model, toks, stop=1), clean)  # stop_at_layer is now ignored: right values


def test_stop_at_layer_that_does_not_stop_is_reported_but_kept(model_dir):
    model = _fresh(model_dir)
    model.__dict__.pop(compat._REPORT_ATTR, None)
    real = model.run_with_cache
    model.run_with_cache = lambda *a, stop_at_layer=None, **kw: real(*a, **kw)  # never stops
    with pytest.warns(compat.LibraryBehaviourWarning, match="does not stop"):
        assert compat.check_stop_at_layer(model) is True
    assert "does not stop" in compat.canary_report(model)["stop_at_layer"]["detail"]


def test_float64_kv_cache_equals_full_forward_logits(model_dir):
    """Teacher-forced logits, cached vs full, in float64. HF computes the rotary angles in float32 even
    then, so the two paths differ by ~6e-8 (AVX2 kernels); a broken cache differs by ~0.6."""
    model = _fresh(model_dir, torch.float64)
    toks = model.to_tokens(PROMPT)
    with torch.no_grad():
        full = model(toks)
        logits, past = compat.cached_forward(model, toks[:, :4])
        steps = [logits[:, -1]]
        for p in range(4, toks.shape[1]):
            logits, past = compat.cached_forward(model, toks[:, p : p + 1], past)
            steps.append(logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1)[:, :-1], full[:, 3:-1], rtol=0, atol=1e-6)
