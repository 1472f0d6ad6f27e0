"""Circuits: a planted mechanism at a linear site is found exactly; decomposition, faithfulness and heads on a tiny model."""

from __future__ import annotations

import pytest
import torch

from helpers_evals import orthonormal_sae, random_topk_sae
from saebench.evals import circuits as C
from saebench.evals.tasks import CircuitTask, greater_than_task, ioi_task, make_task, reference_heads, sva_task
from saebench.models import make_tiny_model



@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny_circ"))


def _fixed_answer_task(model, n=6, length=8, seed=0) -> CircuitTask:
    """Random clean/corrupt prompts, all scored by logit(' Mary') − logit(' John')."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(3, 20_000, (n, length), generator=g)
    corrupt = clean.clone()
    corrupt[:, 2:] = torch.randint(3, 20_000, (n, length - 2), generator=g)
    clean[:, 0] = corrupt[:, 0] = model.tokenizer.bos_token_id
    a = model.tokenizer(" Mary", add_special_tokens=False)["input_ids"][0]
    b = model.tokenizer(" John", add_special_tokens=False)["input_ids"][0]
    return CircuitTask("planted", clean, corrupt, [(a,)] * n, [(b,)] * n, [{}] * n)


def test_planted_latent_at_a_linear_site_is_the_whole_circuit(tiny):
    """At the unembedding input the metric is linear, so attribution = IG = patching exactly, and the
    latent along W_U[:, Mary] − W_U[:, John] carries the entire effect."""
    task = _fixed_answer_task(tiny)
    w = (tiny.W_U[:, task.answers[0][0]] - tiny.W_U[:, task.wrongs[0][0]]).detach().float()
    sae = orthonormal_sae(w, "unembed.hook_in")
    for method in ("atp", "ig"):
        r = C.evaluate_circuit(tiny, sae, task, method=method, ig_steps=4, n_patch_check=6, max_curve_points=None, progress=False)
        assert r["top_nodes"][0]["node"] == "unembed.hook_in/0"
        top = abs(r["top_nodes"][0]["ie"])
        assert top > 1e-3
        assert all(abs(n["ie"]) < 1e-4 * top for n in r["top_nodes"][1:])  # every other latent and the error node ≈ 0
        pc = r["patch_check"]
        assert pc["max_abs_error"] < 1e-4 * top and pc["nodes"][0]["patching"] == pytest.approx(pc["nodes"][0]["attribution"], rel=1e-4)
        assert r["m_full"] == pytest.approx(r["m_clean"], abs=1e-5)  # SAE + error node = the model
        sizes, f, comp = r["curve"]["sizes"], r["curve"]["faithfulness"], r["curve"]["complement_faithfulness"]
        assert sizes[0] == 0 and f[0] == 0.0 and comp[0] == 1.0  # empty circuit 0, full model 1
        assert sizes[-1] == r["n_nodes_total"] == 65 and f[-1] == 1.0 and comp[-1] == 0.0
        assert sizes[1] == 1 and f[1] == pytest.approx(1.0, abs=1e-4) and comp[1] == pytest.approx(0.0, abs=1e-4)  # one node is enough
        assert r["nodes_for_faithfulness_0.9"] == 1


def test_attribution_decomposes_the_site_gradient_exactly(tiny):
    """Σ over a site's latents + error node of ∇·Δ = ∇ₓm · Δx (the error node makes the split exact)."""
    task = ioi_task(tiny.tokenizer, n=4)
    saes = [random_topk_sae(64, 96, 6, "blocks.0.hook_resid_post", seed=0), random_topk_sae(64, 96, 6, "blocks.1.hook_resid_post", seed=1)]
    sites = [C.SAESite(s) for s in saes]
    ie = C.attribution(tiny, sites, task, method="atp", progress=False)
    assert ie.shape == (4, 2 * 97)
    w = task.metric_weights(tiny.cfg.d_vocab)
    grads = C._grads(tiny, task.clean, w, [(s.hook, None) for s in sites])
    clean, corrupt = C._states(tiny, sites, task.clean), C._states(tiny, sites, task.corrupt)
    for i in range(2):
        direct = (grads[i] * (corrupt[i]["x"] - clean[i]["x"])).sum((1, 2))
        torch.testing.assert_close(ie[:, i * 97 : (i + 1) * 97].sum(1), direct, rtol=1e-4, atol=1e-6)


def test_feature_circuit_on_tiny_model_ig_tracks_patching(tiny):
    saes = [random_topk_sae(64, 96, 6, "blocks.0.hook_resid_post", seed=2), random_topk_sae(64, 96, 6, "blocks.1.hook_resid_post", seed=3)]
    task = make_task("sva", tiny.tokenizer, n=8)
    r = C.evaluate_circuit(tiny, saes, task, method="ig", ig_steps=5, n_patch_check=6, max_curve_points=6, progress=False)
    assert r["m_full"] == pytest.approx(r["m_clean"], abs=1e-4)
    assert r["n_discovery"] == 4 and r["n_test"] == 4
    assert r["patch_check"]["pearson"] > 0.8
    assert set(r["error_node_ie"]) == {"blocks.0.hook_resid_post", "blocks.1.hook_resid_post"}
    assert 0 <= r["error_ie_share"] <= 1
    assert r["curve"]["faithfulness"][0] == 0.0 and r["curve"]["faithfulness"][-1] == 1.0
    assert len(r["curve"]["sizes"]) <= 6


def test_head_mode_ranks_heads_and_compares_with_a_reference(tiny):
    task = sva_task(tiny.tokenizer, n=6)
    r = C.evaluate_head_circuit(tiny, task, method="atp", reference={(0, 1), (1, 2)}, n_patch_check=4, progress=False)
    assert r["n_nodes_total"] == tiny.cfg.n_layers * tiny.cfg.n_heads == 8
    assert all(h.startswith("L") and ".H" in h for h in r["heads_ranked"])
    assert r["patch_check"]["pearson"] > 0.8
    cmp_ = r["reference_comparison"]
    assert cmp_["n_reference"] == 2 and cmp_["n_found"] == 2 and 0 <= cmp_["precision"] <= 1


def test_compare_heads():
    r = C.compare_heads([(9, 9), (10, 0), (1, 1)], reference_heads("ioi"))
    assert r["precision"] == pytest.approx(2 / 3) and r["recall"] == pytest.approx(2 / 26)
    assert (9, 9) in reference_heads("ioi") and (6, 9) in reference_heads("greater_than") and reference_heads("sva") == set()


def test_task_generators_make_equal_length_pairs_with_flipped_answers(tiny):
    tok = tiny.tokenizer
    ioi = ioi_task(tok, n=8)
    assert ioi.clean.shape == ioi.corrupt.shape and ioi.clean.shape[0] == 8
    m = ioi.meta[0]
    assert m["clean"].endswith(" to") and tok.decode(list(ioi.answers[0])) == " " + m["io"] and tok.decode(list(ioi.wrongs[0])) == " " + m["s"]
    assert m["corrupt"].count(m["io"]) == 2  # the IO is repeated in the corrupt prompt
    sva = sva_task(tok, n=8)
    assert tok.decode(list(sva.answers[0])) == " is" and tok.decode(list(sva.wrongs[0])) == " are"
    gt = greater_than_task(tok, n=8)
    m = gt.meta[0]
    tens = m["yy"] // 10
    assert sorted(int(tok.decode([t])) for t in gt.answers[0]) == list(range(tens + 1, 10))  # SmolLM2 splits digits
    assert (gt.clean[:, :-1] != gt.corrupt[:, :-1]).any()
    w = gt.metric_weights(tiny.cfg.d_vocab)
    assert w[0].sum().abs() < 1e-5 and w.shape == (8, tiny.cfg.d_vocab)
    a, b = gt.split(0.5)
    assert len(a) == 4 and len(b) == 4
    with pytest.raises(ValueError, match="unknown circuit task"):
        make_task("nope", tok)
