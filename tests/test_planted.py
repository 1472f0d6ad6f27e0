"""Planted ground truth beyond one shape (issue #15.9): every activation method (and the option forms JumpReLU
form='paper', vsae variance='learned'), at its defaults and the library's default learning rate, on planted
families that vary d, width, sparsity, magnitude law and correlation; the fraction of planted features recovered (best decoder row at cos >= 0.9) must be >= 90%,
except for the measured gaps in FLOORS (each held at what it reaches now, so none can get worse unseen).

The data and scoring are benchmarks/bench_planted.py's (whose sweep runs the same methods at the issue's
larger shapes); the runs here are small (300 steps of 1,024 samples).
"""

from __future__ import annotations


import pytest
from bench_loader import load_benchmark


def _bench():
    return load_benchmark("bench_planted")


bp = _bench()

SHAPES = {name: bp.SHAPES[name] for name in bp.TEST_SHAPES}  # vary d, width, sparsity, magnitude law, correlated pairs
# JumpReLU's paper form cannot at 300 steps: log θ moves at most ~lr per Adam step, so θ₀ = 0.001·√d (0.004-0.006 here)
# reaches at most θ₀·e^(300·lr) (0.3-0.6 at these shapes' lr), under the ~1 the planted codes need; it has its own test below.
METHODS = [m for m in bp.METHODS if m != "jumprelu_paper"]
# Where a method's defaults do not reach 90% at this budget (measured, docs/METHODS_IMPLEMENTED.md "Planted recovery"),
# the floor is what it reaches, less a margin: a regression test, and the list of open gaps.
FLOORS = {
    ("batchtopk", "wide_dense"): 0.85,  # 90.0% (72 of 80: at the bar, no margin)
    # JumpReLU (target L0 k, TopK warm start for half the run): 91%; at a target above the data's L0 (3 vs 2) its loss
    # prefers latents that also cover a planted neighbour at cosine ~0.6 and fire on a quarter of the tokens.
    ("jumprelu", "uniform_sparse"): 0.85,  # 91%
    # vsae with the learned variance (β 0.01): the KL pulls every σ towards 1 (activation-sized in scaled units).
    ("vsae_learned", "uniform_sparse"): 0.8,  # 84%
}


# Recovery is a float32 fraction: 72 of 80 features is 0.89999998, under a literal 0.9. The floors are meant in features.
FRACTION_SLACK = 1e-6


@pytest.fixture(scope="module")
def sources():
    return {name: bp.PlantedSource(shape, chunk_tokens=8192) for name, shape in SHAPES.items()}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("method", METHODS)
def test_planted_recovery_at_defaults(method, shape, sources, tmp_path):
    r = bp.run_one(method, SHAPES[shape], 300 * 1024, tmp_path, batch=1024, source=sources[shape])
    assert r["recovery"] >= FLOORS.get((method, shape), 0.9) - FRACTION_SLACK, r
    assert r["fvu"] < 0.3, r
    if method not in bp.FREE_L0:
        assert abs(r["l0"] - SHAPES[shape].k) < 0.3 * SHAPES[shape].k, r  # at the common sparsity


# uniform_sparse: one latent may cover two features with cosine 0.62 (see the table's notes), and which ones do is
# decided by float round-off: at 1,600 steps the same run recovers 25-30 of 32 features depending on the summation
# order alone (the dense-code path of saebench.sparse never / as the library / always taken, equal to 1e-12 in float64:
# benchmarks/bench_planted.py --dense-codes, benchmarks/results/planted_roundoff; the CPU's kernels move it too).
# The floor sits under that spread (24 of 32), so it catches a broken method, not a different rounding.
PAPER_FLOORS = {"uniform_sparse": 0.75}
PAPER_STEPS = {"uniform_sparse": 1600}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_jumprelu_paper_form_recovers_given_the_steps_its_thresholds_need(shape, sources, tmp_path):
    """form='paper' (λ·L0 with λ 0.03, θ₀ = ε = 0.001·√d, threshold lr = lr, Adam β1 = 0) at 4x the budget above (1,200 steps; 1,600 on uniform_sparse):
    its L0 is what λ gives (below k here), and it recovers the planted features."""
    r = bp.run_one("jumprelu_paper", SHAPES[shape], PAPER_STEPS.get(shape, 1200) * 1024, tmp_path, batch=1024, source=sources[shape])
    assert r["recovery"] >= PAPER_FLOORS.get(shape, 0.9) - FRACTION_SLACK, r
    assert r["fvu"] < 0.3 and 0.3 * SHAPES[shape].k < r["l0"] < SHAPES[shape].k, r
