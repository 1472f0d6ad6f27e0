"""Steering: vectors, position-scoped hooks, exact seeded generation (KV cache or not), the steering eval."""

from __future__ import annotations

import pytest
import torch

from helpers_evals import hand_sae, plant_token
from saebench import steering as st
from saebench.evals.steering import SteeringConfig, evaluate_steering, sweep_strengths
from saebench.models import make_tiny_model


SITE = "blocks.1.hook_resid_post"  # the last residual of the 2-layer tiny model


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A tiny model whose logit for ' ocean' is driven by the last-residual direction u (planted by scaling W_U[:, t])."""
    model = make_tiny_model(tmp_path_factory.mktemp("tiny_steer"))
    token = model.tokenizer(" ocean", add_special_tokens=False)["input_ids"][0]
    u = plant_token(model, token)
    resid = st.site_activations(model, SITE, None, model.to_tokens("Tell me about the weather today please"))
    norm = float(resid[0, 1:].norm(dim=-1).median())
    g = torch.Generator().manual_seed(1)
    W = torch.randn(8, u.numel(), generator=g)
    W[0] = u
    W = W / W.norm(dim=1, keepdim=True)
    sae = hand_sae(W, SITE)
    return model, sae, token, norm


def test_steering_vector_is_strength_times_max_act_times_decoder_row(planted):
    _, sae, _, _ = planted
    v = st.steering_vector(sae, 3, -2.5, 4.0)
    torch.testing.assert_close(v, -10.0 * sae.W_dec[3].detach())
    assert not v.requires_grad
    with pytest.raises(IndexError, match="out of range"):
        st.steering_vector(sae, 8, 1.0, 1.0)


def test_hook_adds_only_in_scope_and_tracks_kv_cache_positions():
    d, vec = 4, torch.ones(4)
    act = torch.zeros(1, 5, d)
    for scope, expect in (("prompt", [1, 1, 1, 0, 0]), ("generated", [0, 0, 0, 1, 1]), ("all", [1, 1, 1, 1, 1])):
        out = st.steering_hook(vec, scope, prompt_len=3)(act, None)
        assert out[0, :, 0].tolist() == expect, scope
    # KV-cache decoding: a full prompt pass, then one position per call; positions continue at 3, 4, ...
    h = st.steering_hook(vec, "generated", prompt_len=3)
    assert h(torch.zeros(1, 3, d))[0, :, 0].tolist() == [0, 0, 0]
    assert h(torch.zeros(1, 1, d))[0, 0, 0] == 1  # position 3 is generated
    h.reset()
    assert h(torch.zeros(1, 1, d))[0, 0, 0] == 0  # a fresh 1-token prompt: position 0
    # per-row vectors and one head of hook_z
    rows = st.SteeringHook(torch.tensor([[1.0] * d, [-1.0] * d]), "all", 2)(torch.zeros(2, 2, d))
    assert rows[:, 0, 0].tolist() == [1.0, -1.0]
    z = st.SteeringHook(torch.ones(3), "all", 1, head=1)(torch.zeros(1, 2, 2, 3))
    assert z[0, :, 1].eq(1).all() and z[0, :, 0].eq(0).all()


@pytest.fixture(scope="module")
def planted64(tmp_path_factory):
    """The planted model in float64: cached and uncached logits then agree to ~1e-15, so sampled tokens
    can only differ on an exact tie (float32 noise would depend on the CPU's kernels)."""
    from saebench.models import load_model

    path = tmp_path_factory.mktemp("tiny_steer64")
    make_tiny_model(path)
    model = load_model(str(path), dtype=torch.float64)
    token = model.tokenizer(" ocean", add_special_tokens=False)["input_ids"][0]
    plant_token(model, token)
    resid = st.site_activations(model, SITE, None, model.to_tokens("Tell me about the weather today please"))
    return model, token, float(resid[0, 1:].norm(dim=-1).median())


@pytest.mark.parametrize("scope", ["all", "prompt", "generated"])
def test_generation_identical_with_and_without_kv_cache(planted64, scope):
    model, token, norm = planted64
    # Steer at layer 0 so prompt-position steering reaches later tokens through attention's K/V.
    g = torch.Generator().manual_seed(0)
    vec = torch.randn(64, generator=g) * 4 * norm
    prompt = "Write a short story about a walk"
    outs = {}
    for steered in (False, True):
        for cache in (True, False):
            kw = dict(vector=vec, hook_name="blocks.0.hook_resid_post", scope=scope) if steered else {}
            outs[steered, cache] = st.generate(model, prompt, 12, seed=5, temperature=0.3, top_p=0.95, use_kv_cache=cache, **kw)
    for steered in (False, True):
        assert torch.equal(outs[steered, True].tokens, outs[steered, False].tokens), (scope, steered)
    res = outs[True, True]
    assert res.prompt_len == model.to_tokens(prompt).shape[1]
    assert res.tokens.shape == (1, res.prompt_len + 12)
    assert res.text.startswith(prompt) and res.text.endswith(res.new_text)
    if scope == "all":
        assert not torch.equal(outs[True, True].tokens, outs[False, True].tokens), "the steering vector should change the sample"


def test_generation_is_seeded(planted):
    model, _, _, _ = planted
    a = st.generate(model, "Once upon a time", 8, seed=1)
    b = st.generate(model, "Once upon a time", 8, seed=1)
    c = st.generate(model, "Once upon a time", 8, seed=2)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    greedy = st.generate(model, model.to_tokens("Once upon a time")[0], 4, temperature=0)
    assert greedy.tokens.shape[1] == greedy.prompt_len + 4


def test_steered_pair_and_logprob_diff_follow_the_planted_direction(planted):
    model, sae, token, norm = planted
    default, steered = st.steered_pair(model, sae, "Tell me about your day.", 0, 4.0, norm, max_new_tokens=6, seed=3)
    assert default.prompt_len == steered.prompt_len
    assert steered.tokens[0, steered.prompt_len:].eq(token).all()
    up = st.next_token_logprob_diff(model, sae, "Tell me about your day.", 0, 2.0, norm, top_n=5)
    assert len(up) == 10 and up[0][0] == " ocean" and up[0][1] > 0
    assert [v for _, v in up[:5]] == sorted([v for _, v in up[:5]], reverse=True)
    down = st.next_token_logprob_diff(model, sae, "Tell me about your day.", 0, -2.0, norm, top_n=5)
    assert down[5][0] == " ocean" and down[5][1] < 0  # negative strength: the planted token falls most
    none = st.next_token_logprob_diff(model, sae, "Tell me about your day.", 0, 2.0, norm, scope="generated", top_n=3)
    assert all(v == 0 for _, v in none)


def test_max_activation_matches_a_direct_encoding(planted):
    model, sae, _, _ = planted
    toks = model.to_tokens(["the sea and the waves", "a quiet street at dawn"])
    x = st.site_activations(model, SITE, None, toks)
    expect = sae.encode(x)[..., 2].abs().max().item()
    assert st.max_activation(sae, model, toks, 2) == pytest.approx(expect, rel=1e-5)


def test_steering_eval_planted_latent_beats_random_and_negative_lowers(planted):
    model, sae, token, norm = planted
    cfg = SteeringConfig(strengths=(0.02, 0.1, 0.5), max_new_tokens=5, n_prompts=4, neutral_tokens=96, concept_metric="lexicon")
    res = evaluate_steering(model, sae, latent=0, target_tokens=[token], max_act=norm, config=cfg, progress=False)
    assert res["strengths"] == sweep_strengths(cfg) == [-0.5, -0.1, -0.02, 0.0, 0.02, 0.1, 0.5]
    curve = {(e["condition"], e["strength"]): e for e in res["curve"]}
    eff = [curve["sae", s]["delta_target_logprob"] for s in (0.02, 0.1, 0.5)]
    assert 0 < eff[0] < eff[1] < eff[2], eff  # the effect grows with strength
    assert curve["sae", -0.1]["delta_target_logprob"] < 0 and curve["sae", -0.5]["delta_target_logprob"] < curve["sae", -0.02]["delta_target_logprob"]
    for s in (0.1, 0.5):  # random direction of equal norm: smaller effect
        assert abs(curve["random", s]["delta_target_logprob"]) < curve["sae", s]["delta_target_logprob"]
        assert curve["random", s]["vector_norm"] == pytest.approx(curve["sae", s]["vector_norm"], rel=1e-5)
    assert curve["sae", 0.5]["lexicon_rate"] == 1.0
    assert curve["sae", 0.0]["kl_neutral"] == 0.0 and curve["sae", 0.5]["kl_neutral"] > 0
    assert res["best_strength"] in (0.02, 0.1, 0.5) and 0 <= res["score"] <= 1
    assert set(res["split"]["select"]).isdisjoint(res["split"]["test"])
    assert "sae" in res["pareto_strengths"] and res["effect_key"] == "delta_target_logprob"


def test_steering_eval_needs_a_latent_or_concept(planted):
    model, sae, _, _ = planted
    with pytest.raises(ValueError, match="latent index or a concept"):
        evaluate_steering(model, sae, config=SteeringConfig(n_prompts=2), progress=False)
    with pytest.raises(ValueError, match="unknown concept"):
        evaluate_steering(model, sae, concept="nope", progress=False)


def test_threads_sharing_a_model_never_run_with_each_others_hooks(planted):
    """The browser's sessions share one cached model, and TransformerLens hooks live on the model.

    A steering generation is paused in its first forward pass (its hook attached) while two other
    threads run an unsteered generation and a live-prompt encoding on the same model. They must wait
    for the model (``model_lock``) and then give exactly what they give alone; without the lock they
    ran through the steering hook and came out steered (or died on another run's stop_at_layer)."""
    import threading

    from saebench import dashboards as D

    model, sae, token, norm = planted
    prompt = "Tell me about your day."
    alone_gen = st.generate(model, prompt, 6, seed=3)
    alone_acts = D.prompt_activations(model, sae, prompt)
    attached, release = threading.Event(), threading.Event()
    results: dict[str, object] = {}

    class PausingHook(st.SteeringHook):
        def __call__(self, act, hook=None):
            if threading.current_thread().name == "steerer" and not attached.is_set():
                attached.set()
                release.wait(20)
            return super().__call__(act, hook)

    def steer():
        toks = model.to_tokens(prompt)
        hook = PausingHook(st.steering_vector(sae, 0, 8.0, norm), "all", toks.shape[1])
        results["steered"] = st.generate_tokens(model, toks, 6, hooks=[(SITE, hook)], seed=3)

    def run(name, fn):
        try:
            results[name] = fn()
        except Exception as e:  # noqa: BLE001 - reported by the assertions below
            results[name] = e

    steerer = threading.Thread(target=steer, name="steerer")
    steerer.start()
    assert attached.wait(20), "the steering run never reached its hook"
    others = [threading.Thread(target=run, args=("gen", lambda: st.generate(model, prompt, 6, seed=3))),
              threading.Thread(target=run, args=("acts", lambda: D.prompt_activations(model, sae, prompt)))]
    for t in others:
        t.start()
    for t in others:
        t.join(1.0)  # with the lock they are still waiting; without it they have run through the hook
    waited = [t.is_alive() for t in others]
    release.set()
    for t in [steerer, *others]:
        t.join(30)
        assert not t.is_alive()
    assert results["steered"][0, alone_gen.prompt_len:].eq(token).all()  # the steering run itself was steered
    assert not isinstance(results["gen"], Exception) and torch.equal(results["gen"].tokens, alone_gen.tokens)
    assert not isinstance(results["acts"], Exception)
    assert torch.equal(results["acts"].values, alone_acts.values) and torch.equal(results["acts"].indices, alone_acts.indices)
    assert waited == [True, True], "the unsteered runs did not wait for the model while another thread's hook was attached"
    assert st.model_lock(model) is st.model_lock(model) and not st.model_lock(model)._is_owned()


# --------------------------------------------------------------------------- batched default + steered, streaming


def _greedy_margins(model, toks, n, hooks=()):
    """Tokens of a one-row greedy run and the gap between the top two logits at every step."""
    gaps = []

    def rec(step, nxt, logits):
        top = logits.float().topk(2, -1).values
        gaps.append(float((top[:, 0] - top[:, 1]).min()))

    out = st.generate_tokens(model, toks, n, hooks=hooks, temperature=0, on_token=rec)
    return out, gaps


@pytest.mark.parametrize("scope", ["all", "prompt", "generated"])
def test_batched_steer_equals_a_default_and_a_steered_run(planted, scope):
    """steer() runs both rows in one batch; each row equals its own one-row run (greedy, where the
    top two logits are not tied to float rounding) and the log-prob changes equal next_token_logprob_diff."""
    model, sae, _, norm = planted
    prompt = "Tell me about your day."
    run = st.steer(model, sae, prompt, 0, 1.5, norm, scope, max_new_tokens=10, temperature=0, stop_at_eos=False)
    toks = model.to_tokens(prompt)
    plen = toks.shape[1]
    alone_default, gaps_d = _greedy_margins(model, toks, 10)
    hook = st.SteeringHook(st.steering_vector(sae, 0, 1.5, norm), scope, plen)
    alone_steered, gaps_s = _greedy_margins(model, toks, 10, hooks=[(SITE, hook)])
    assert min(gaps_d + gaps_s) > 1e-3, "a near-tie: the comparison would test float rounding, not the code"
    assert torch.equal(run.default.tokens, alone_default.cpu()) and torch.equal(run.steered.tokens, alone_steered.cpu())
    assert run.default.prompt_len == run.steered.prompt_len == plen
    expect = dict(st.next_token_logprob_diff(model, sae, prompt, 0, 1.5, norm, scope=scope, top_n=10))
    got = dict(run.logprob_diff)
    assert len(run.logprob_diff) == 20
    for tok_str, v in got.items():
        if tok_str in expect:
            assert v == pytest.approx(expect[tok_str], abs=1e-4)
    if scope != "generated":
        assert run.logprob_diff[0][0] == " ocean"
    else:
        assert all(abs(v) < 1e-6 for _, v in run.logprob_diff)
    assert run.seconds > 0
    # steered_pair is the same batched run
    d, s = st.steered_pair(model, sae, prompt, 0, 1.5, norm, scope, max_new_tokens=10, temperature=0, stop_at_eos=False)
    assert torch.equal(d.tokens, run.default.tokens) and torch.equal(s.tokens, run.steered.tokens)


def test_steer_streams_text_after_every_token(planted):
    model, sae, _, norm = planted
    seen = []
    run = st.steer(model, sae, "Once upon a time", 0, 4.0, norm, max_new_tokens=7, seed=2, stop_at_eos=False,
                   on_text=lambda a, b: seen.append((a, b)))
    assert len(seen) == 7
    assert seen[-1] == (run.default.new_text, run.steered.new_text)
    ids = run.steered.tokens[0, run.steered.prompt_len:]
    for n, (_, b) in enumerate(seen, 1):  # every update is the decoded prefix of the steered row so far
        assert b == model.tokenizer.decode(ids[:n].tolist())
    steps = []
    st.generate_tokens(model, model.to_tokens("Hi"), 4, stop_at_eos=False, on_token=lambda t, nxt, lg: steps.append((t, nxt.shape, lg.shape)))
    vocab = model.W_U.shape[1]
    assert steps == [(t, torch.Size([1]), torch.Size([1, vocab])) for t in range(4)]


def test_steer_cuts_each_row_at_its_own_eos(tmp_path):
    """A row that emits EOS stops there (as a one-row run would), while the other row goes on."""
    model = make_tiny_model(tmp_path / "eos_model")
    eos = model.tokenizer.eos_token_id
    u = plant_token(model, eos)
    sae = hand_sae(torch.stack([u, torch.roll(u, 1)]) / 1.0, SITE)
    norm = float(st.site_activations(model, SITE, None, model.to_tokens("A walk in the park"))[0, 1:].norm(dim=-1).median())
    run = st.steer(model, sae, "A walk in the park", 0, 6.0, norm, max_new_tokens=8, seed=0)
    new_steered = run.steered.tokens[0, run.steered.prompt_len:]
    assert new_steered[-1] == eos and int((new_steered == eos).sum()) == 1 and len(new_steered) < 8
    assert run.default.tokens.shape[1] == run.default.prompt_len + 8 and eos not in run.default.tokens[0, run.default.prompt_len:]
    alone = st.generate(model, "A walk in the park", 8, vector=st.steering_vector(sae, 0, 6.0, norm), hook_name=SITE, seed=0)
    assert torch.equal(alone.tokens, run.steered.tokens) and alone.new_text == run.steered.new_text


def test_steer_with_zero_new_tokens_still_gives_the_logprob_changes(planted):
    model, sae, _, norm = planted
    run = st.steer(model, sae, "Tell me about your day.", 0, 2.0, norm, max_new_tokens=0)
    assert run.default.new_text == run.steered.new_text == ""
    assert run.logprob_diff[0][0] == " ocean" and run.logprob_diff[0][1] > 0


def test_max_activation_reports_progress(planted):
    model, sae, _, _ = planted
    toks = model.to_tokens(["the sea and the waves", "a quiet street at dawn", "one more line of text"])
    calls = []
    value = st.max_activation(sae, model, toks, 2, batch_size=2, on_progress=lambda d, t: calls.append((d, t)))
    assert value == st.max_activation(sae, model, toks, 2)
    n = toks.numel()
    assert calls == [(2 * toks.shape[1], n), (n, n)]


def test_steer_refuses_a_hook_that_never_runs(planted):
    """``hook_pos_embed`` is registered on a rotary model but never fires: say so instead of returning an unsteered 'steered' text."""
    model, _, _, _ = planted
    silent = hand_sae(torch.eye(64)[:4], "hook_pos_embed")
    with pytest.raises(ValueError, match="never ran in the forward pass"):
        st.steer(model, silent, "Hi there", 0, 1.0, 1.0, max_new_tokens=2)
