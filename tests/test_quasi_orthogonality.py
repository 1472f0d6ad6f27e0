"""AFA / quasi-orthogonality in the core pass: the formula by hand, and the exact cases the theory gives
(an orthonormal dictionary has ‖f̃‖ = ‖z‖; scaling the code by 2 doubles the ratio)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers_evals import hand_sae
from saebench.evals.common import special_ids_of
from saebench.evals.core import evaluate_core
from saebench.evals.quasi_orthogonality import AFAAccumulator
from saebench.evals.reconstruction import evaluate_reconstruction

from saebench.sparse import SparseActs

HOOK = "blocks.0.hook_resid_post"


def test_afa_terms_match_the_formula_by_hand():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(5, 3, generator=g) * torch.tensor([[1.0], [2.0], [0.5], [3.0], [1.0]])  # non-unit rows: the norms must enter
    b = torch.tensor([0.3, -0.4, 0.0])  # ‖b_dec‖ = 0.5
    sae = hand_sae(W, HOOK, b_dec=b)
    x = torch.tensor([[1.0, 2.0, 2.0], [0.0, 3.0, 4.0]])  # ‖z‖ = 3, 5
    acts = SparseActs(torch.tensor([[1.0, 2.0], [0.5, 0.0]]), torch.tensor([[0, 3], [1, 4]]))
    acc = AFAAccumulator(sae)
    acc.add(x, acts)
    r = acc.result()
    n = W.double().norm(dim=1)
    f = torch.tensor([math.sqrt((1 * n[0]) ** 2 + (2 * n[3]) ** 2 + 0.25), math.sqrt((0.5 * n[1]) ** 2 + 0.25)], dtype=torch.float64)
    z = torch.tensor([3.0, 5.0], dtype=torch.float64)
    rel = (f - z) / z
    eps = (z**2 - f**2).abs() / (4 * f**2)  # h − 1 = d_sae − 1 = 4
    assert r["afa_norm_ratio"] == pytest.approx(float((f / z).mean()))
    assert r["afa_rel_error"] == pytest.approx(float(rel.mean())) and r["afa_abs_rel_error"] == pytest.approx(float(rel.abs().mean()))
    assert r["afa_over_activated_fraction"] == pytest.approx(float((rel > 0).double().mean()))
    assert r["afa_eps_lbo_mean"] == pytest.approx(float(eps.mean()), rel=1e-6)
    assert r["afa_eps_lbo_median"] == pytest.approx(float(eps.min()), rel=1e-6)  # torch's median of 2 values is the lower one
    per = r["afa_per_latent"]
    assert per["n_tokens"] == [1, 1, 0, 1, 0]  # the zero value at latent 4 is not a firing
    assert per["mean_rel_error"][0] == pytest.approx(float(rel[0]), abs=1e-6) and per["mean_rel_error"][1] == pytest.approx(float(rel[1]), abs=1e-6)
    assert per["mean_rel_error"][2] is None


def _orthonormal(d: int, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed)))
    return q.T.contiguous()


def test_orthonormal_dictionary_meets_afa_exactly_and_a_doubled_code_is_flagged(tiny_model):
    toks = torch.randint(3, 20_000, (4, 16), generator=torch.Generator().manual_seed(1))
    toks[:, 0] = 1
    special = special_ids_of(tiny_model.tokenizer)
    basis = _orthonormal(64)
    exact = hand_sae(basis, HOOK, arch="abstopk", k=64)  # ε = 0: ‖f̃‖ = ‖z‖ for every token
    r = evaluate_core(exact, tiny_model, toks, special_ids=special, batch_size=2, downstream=False, progress=False)
    assert r["afa_norm_ratio"] == pytest.approx(1.0, abs=1e-6) and r["afa_abs_rel_error"] < 1e-6 and r["afa_eps_lbo_median"] < 1e-8
    doubled = hand_sae(basis, HOOK, arch="abstopk", k=64, W_enc=2 * basis.T)  # f doubled, decoder unchanged
    r2 = evaluate_reconstruction(doubled, tiny_model, toks, special_ids=special, batch_size=3, downstream=False, progress=False)
    assert r2["afa_norm_ratio"] == pytest.approx(2.0, abs=1e-5) and r2["afa_rel_error"] == pytest.approx(1.0, abs=1e-5)
    assert r2["afa_over_activated_fraction"] == 1.0
    assert r2["afa_eps_lbo_median"] == pytest.approx(3 / (4 * 63), rel=1e-4)  # |1 − 4| / ((h − 1)·4), h = 64
    assert r2["afa_per_latent"]["n_tokens"][0] == r2["n_tokens"]  # abstopk with k = d: every latent on every token


def test_eps_median_memory_is_bounded_exact_below_the_cap_and_close_above_it():
    """The ε_LBO median keeps at most ``size`` values: exact while fewer were seen, a uniform sample's median after."""
    from saebench.evals.quasi_orthogonality import EpsReservoir

    g = torch.Generator().manual_seed(1)
    values = torch.rand(50_000, generator=g) ** 3  # skewed: median 0.125
    exact = EpsReservoir(size=50_000)
    sampled = EpsReservoir(size=4_096)
    for chunk in values.split(1_000):
        exact.add(chunk)
        sampled.add(chunk)
    assert exact.sample is None and exact.median() == float(values.median())  # the cap not passed: every value kept
    assert sampled.sample.numel() == 4_096 and sampled.seen == 50_000 and not sampled.parts
    # A uniform sample of 4,096: the median's rank error is ~1/(2·sqrt(4096)) = 0.8%; in value, ~3%.
    assert abs((values < sampled.median()).float().mean().item() - 0.5) < 0.03
    # The sample draws on every part of the stream, not only its start.
    late = torch.isin(sampled.sample, values[25_000:])
    assert 0.4 < late.float().mean().item() < 0.6
    assert math.isnan(EpsReservoir().median())
