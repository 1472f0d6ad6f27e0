"""The fast steering decoder (saebench.fastgen) equals the TransformerBridge path, and falls back when it does not.

Float64 tiny random models (llama and gpt2): the two paths compute the same sums, so logits agree
to ~1e-12 and sampled tokens agree exactly unless two candidates tie, which the margins check rules out.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from helpers_evals import hand_sae
from saebench import compat, fastgen
from saebench import steering as st
from saebench.models import load_model, make_tiny_model

PROMPT = "Tell me about the weather on a walk"


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"fast_{request.param}")
    make_tiny_model(path, arch=request.param)
    return path


def _fresh(model_dir, dtype=torch.float64):
    return load_model(str(model_dir), dtype=dtype)


@pytest.fixture(scope="module")
def model64(model_dir):
    return _fresh(model_dir)


@pytest.fixture
def used(monkeypatch):
    """One entry per generation: whether it ran on the fast decoder (True) or the bridge (False)."""
    calls: list[bool] = []
    real = fastgen.fast_decoder

    def spy(model, hook_names):
        fast = real(model, hook_names)
        calls.append(fast is not None)
        return fast

    monkeypatch.setattr(fastgen, "fast_decoder", spy)
    return calls


def _vectors(model, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = int(model.cfg.d_model)
    norm = float(st.site_activations(model, "blocks.0.hook_resid_post", None, model.to_tokens(PROMPT))[0, 1:].norm(dim=-1).median())
    return torch.randn(d, generator=g, dtype=torch.float64) / d**0.5 * scale * norm


def _run(model, hook_name, vec, scope, fast, **kw):
    """A batched default + steered generation; tokens [2, n] and the logits of every step [T, 2, V]."""
    toks = model.to_tokens(PROMPT).expand(2, -1).contiguous()
    hook = st.SteeringHook(torch.stack([torch.zeros_like(vec), vec]), scope, toks.shape[1])
    seen = []
    out = st.generate_tokens(model, toks, 10, hooks=[(hook_name, hook)], seed=4, temperature=0.7, top_p=0.95, stop_at_eos=False,
                             on_token=lambda t, nxt, lg: seen.append(lg.clone()), fast_decode=fast, **kw)
    return out, torch.stack(seen)


@pytest.mark.parametrize("site", ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"])
@pytest.mark.parametrize("scope", ["all", "prompt", "generated"])
def test_fast_path_equals_the_bridge_token_for_token_and_in_logits(model64, used, site, scope):
    model = model64
    vec = _vectors(model)
    fast_out, fast_logits = _run(model, site, vec, scope, True)
    slow_out, slow_logits = _run(model, site, vec, scope, False)
    assert used == [True], "the fast run did not take the fast path (the reference never asks)"
    assert compat.canary_report(model)["fast_decode"]["ok"]
    torch.testing.assert_close(fast_logits, slow_logits, rtol=0, atol=1e-9)
    assert torch.equal(fast_out, slow_out)
    assert not torch.equal(fast_logits[:, 0], fast_logits[:, 1]), "the edit changed nothing: the comparison would be vacuous"


@pytest.mark.parametrize("scope", ["all", "generated"])
def test_steer_fast_equals_bridge_including_logprob_changes_and_streaming(model64, used, scope):
    model = model64
    W = torch.nn.functional.normalize(torch.randn(4, int(model.cfg.d_model), generator=torch.Generator().manual_seed(2), dtype=torch.float64), dim=1)
    sae = hand_sae(W.float(), "blocks.1.hook_resid_pre")
    norm = float(st.site_activations(model, "blocks.1.hook_resid_pre", None, model.to_tokens(PROMPT))[0, 1:].norm(dim=-1).median())
    texts = {True: [], False: []}
    runs = {fast: st.steer(model, sae, PROMPT, 0, 3.0, norm, scope, max_new_tokens=9, seed=1, top_p=0.9,
                           on_text=lambda a, b, fast=fast: texts[fast].append((a, b)), fast_decode=fast) for fast in (True, False)}
    assert used == [True]
    for part in ("default", "steered"):
        assert torch.equal(getattr(runs[True], part).tokens, getattr(runs[False], part).tokens)
    assert [t for t, _ in runs[True].logprob_diff] == [t for t, _ in runs[False].logprob_diff]
    for (_, a), (_, b) in zip(runs[True].logprob_diff, runs[False].logprob_diff):
        assert a == pytest.approx(b, abs=1e-6)
    assert texts[True] == texts[False] and len(texts[True]) == 9


def test_sites_the_fast_path_does_not_serve_use_the_bridge(model64, used):
    """An attention-head site, an MLP output, uncached generation: the bridge path, same results as before."""
    model = model64
    d_head = int(model.cfg.d_head)
    toks = model.to_tokens(PROMPT)
    for name, head, vec in (("blocks.0.attn.hook_z", 1, torch.randn(d_head, dtype=torch.float64)),
                            ("blocks.0.hook_mlp_out", None, _vectors(model))):
        hook = st.SteeringHook(vec, "all", toks.shape[1], head)
        out = st.generate_tokens(model, toks, 4, hooks=[(name, hook)], seed=0, stop_at_eos=False)
        assert hook._seen > 0 and out.shape[1] == toks.shape[1] + 4
    st.generate(model, PROMPT, 4, vector=_vectors(model), hook_name="blocks.1.hook_resid_post", use_kv_cache=False)
    assert used == [False, False]  # the uncached run never asks


def test_a_hook_attached_to_the_bridge_keeps_generation_on_the_bridge(model64, used):
    """The plain model would not run a hook the caller attached to the bridge, so the bridge runs."""
    model = model64
    vec = _vectors(model, seed=5)
    add = lambda act, hook=None: act + vec  # noqa: E731
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", add)]):
        hooked = st.generate(model, PROMPT, 6, seed=2, temperature=0)
    plain = st.generate(model, PROMPT, 6, seed=2, temperature=0)
    assert used[:2] == [False, True]
    reference = st.generate(model, PROMPT, 6, seed=2, temperature=0, vector=vec, hook_name="blocks.0.hook_resid_post", scope="all")
    assert torch.equal(hooked.tokens, reference.tokens) and not torch.equal(hooked.tokens, plain.tokens)


def test_canary_failure_warns_once_and_falls_back_to_the_bridge(model_dir, used, monkeypatch):
    """As if a release moved the bridge's hook point: the plain hook edits the layer before the one the bridge edits."""
    model = _fresh(model_dir)
    real = fastgen.FastDecoder.module_for

    def shifted(self, model, hook_name):
        found = real(self, model, hook_name)
        if found is not None and hook_name == "blocks.1.hook_resid_post":
            return real(self, model, "blocks.1.hook_resid_pre")
        return found

    monkeypatch.setattr(fastgen.FastDecoder, "module_for", shifted)
    vec = _vectors(model)
    reference, ref_logits = _run(model, "blocks.1.hook_resid_post", vec, "all", False)
    with pytest.warns(compat.LibraryBehaviourWarning, match=r"plain model with edits at blocks.1.hook_resid_pre and blocks.1.hook_resid_post differs.*TransformerBridge hooks"):
        out, logits = _run(model, "blocks.1.hook_resid_post", vec, "all", True)
    assert used == [False] and compat.canary_report(model)["fast_decode"]["ok"] is False
    assert torch.equal(out, reference) and torch.equal(logits, ref_logits)
    with warnings.catch_warnings():  # once per model
        warnings.simplefilter("error", compat.LibraryBehaviourWarning)
        _run(model, "blocks.0.hook_resid_post", vec, "all", True)
    assert used == [False, False]


def test_canary_catches_a_fast_path_that_raises(model_dir, used, monkeypatch):
    """A weight the plain model expects but the bridge does not hold (a renamed parameter)."""
    model = _fresh(model_dir)
    real = fastgen._slots

    def renamed(root):
        return {(kind, key.replace("layers.1.", "layers.one.").replace("h.1.", "h.one.")): v for (kind, key), v in real(root).items()}

    monkeypatch.setattr(fastgen, "_slots", renamed)
    with pytest.warns(compat.LibraryBehaviourWarning, match=r"fast decoding path raised KeyError"):
        out = st.generate(model, PROMPT, 5, seed=1, temperature=0, vector=_vectors(model), hook_name="blocks.0.hook_resid_post")
    assert used == [False] and out.tokens.shape[1] == out.prompt_len + 5


def test_fast_decoder_shares_the_weights_and_follows_rebinding(model_dir, used):
    model = _fresh(model_dir)
    st.generate(model, PROMPT, 3, seed=0)
    fast = model.__dict__[fastgen._ATTR]
    hf = model.original_model
    plain_params = {id(p) for p in fast.plain.parameters()}
    assert plain_params <= {id(p) for p in hf.parameters()}, "the plain model must share the bridge's parameters, not copy them"
    assert any(isinstance(m, fastgen.GemvLinear) for m in fast.plain.modules())
    assert not any(type(m) is torch.nn.Linear for m in fast.plain.modules())
    # an in-place weight edit is seen at once (the final norm's gain negated: the logits change sign)
    before = st.generate(model, PROMPT, 4, seed=0, temperature=0)
    final_norm = [p for n, p in hf.named_parameters() if fastgen._strip(n) in ("model.norm.weight", "transformer.ln_f.weight")]
    assert len(final_norm) == 1
    with torch.no_grad():
        final_norm[0].mul_(-1)
    flipped = st.generate(model, PROMPT, 4, seed=0, temperature=0)
    assert torch.equal(flipped.tokens, st.generate(model, PROMPT, 4, seed=0, temperature=0, fast_decode=False).tokens)
    assert not torch.equal(before.tokens, flipped.tokens)
    # a rebound buffer or parameter (what model.to(...) does to buffers) makes a new decoder, checked again
    mod, kind, name, owner, oname = fast._links[0]
    getattr(owner, kind)[oname] = torch.nn.Parameter(getattr(owner, kind)[oname].detach().clone()) if kind == "_parameters" \
        else getattr(owner, kind)[oname].clone()
    assert not fast.current()
    st.generate(model, PROMPT, 2, seed=0)
    assert model.__dict__[fastgen._ATTR] is not fast and model.__dict__[fastgen._ATTR].current()


def test_a_broken_bridge_kv_cache_does_not_touch_the_fast_path(model_dir, used):
    """The fast decoder keeps its own cache and is checked against the bridge's full forward, so the
    transformers 5.24-style break of the bridge's cache (tests/test_compat.py) leaves it right, and silent."""
    from test_compat import _drop_layer_cache

    model = _fresh(model_dir)
    vec = _vectors(model)
    reference = st.generate(model, PROMPT, 8, seed=3, temperature=0.5, use_kv_cache=False, vector=vec, hook_name="blocks.0.hook_resid_post")
    for m in model.modules():
        if hasattr(type(m), "_update_kv_cache"):
            m.register_forward_pre_hook(_drop_layer_cache, with_kwargs=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", compat.LibraryBehaviourWarning)
        out = st.generate(model, PROMPT, 8, seed=3, temperature=0.5, vector=vec, hook_name="blocks.0.hook_resid_post")
    assert used == [True] and torch.equal(out.tokens, reference.tokens)  # the uncached reference never asks
    assert "kv_cache" not in compat.canary_report(model)  # never needed


def test_gemv_linear_equals_linear():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(7, 5, dtype=torch.float64)
    fast = fastgen.GemvLinear(lin, max_rows=4)
    assert fast.weight is lin.weight and fast.bias is lin.bias
    for shape in ((7,), (1, 7), (2, 1, 7), (2, 2, 7), (3, 3, 7), (0, 7)):
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        torch.testing.assert_close(fast(x), lin(x), rtol=0, atol=1e-12)
        assert fast(x).shape == lin(x).shape
    nobias = torch.nn.Linear(7, 5, bias=False, dtype=torch.float64)
    x = torch.randn(2, 7, generator=g, dtype=torch.float64)
    torch.testing.assert_close(fastgen.GemvLinear(nobias)(x), nobias(x), rtol=0, atol=1e-12)


def test_float32_canary_passes_without_warnings(model_dir):
    model = _fresh(model_dir, torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fastgen.fast_decode_ok(model)
        st.generate(model, PROMPT, 4, seed=0, vector=_vectors(model).float(), hook_name="blocks.1.hook_resid_post")
    assert compat.canary_report(model)["fast_decode"]["ok"]
