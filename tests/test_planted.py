"""Planted ground truth beyond one shape (issue #15.9): every activation method, at its defaults and the
library's default learning rate, recovers >= 90% of the planted features (best decoder row at cos >= 0.9)
on planted families that vary d, width, sparsity, magnitude law and correlation.

The data and scoring are benchmarks/bench_planted.py's (whose sweep runs the same methods at the issue's
larger shapes); the runs here are small (300 steps of 1,024 samples).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_planted", ROOT / "benchmarks" / "bench_planted.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


bp = _bench()

SHAPES = {
    # d 24, 48 features, ~3 active (log-normal magnitudes), 4 correlated pairs, 2x latents
    "lognormal_pairs": bp.Shape(d=24, m=48, n_active=3.0, law="lognormal", pairs=4, d_sae=96, k=4),
    # smaller d, uniform magnitudes, no correlation, sparser
    "uniform_sparse": bp.Shape(d=16, m=32, n_active=2.0, law="uniform", pairs=0, d_sae=64, k=3),
    # wider: more features than 2x d, denser codes, log-normal, more pairs
    "wide_dense": bp.Shape(d=32, m=80, n_active=5.0, law="lognormal", pairs=10, d_sae=160, k=6),
}
METHODS = ["topk", "batchtopk", "mutual_choice", "abstopk", "abstopk_batch", "vsae", "vsae_det", "feature_choice", "jumprelu"]
KNOWN_GAPS = {
    # Not fixed (docs/METHODS_IMPLEMENTED.md, "Planted recovery"): about half of JumpReLU's latents stop firing and
    # get no gradient again (the STE only sees pre-activations near θ); 67-73% on lognormal_pairs whatever
    # the threshold learning rate, bandwidth, initialisation or AuxK.
    "jumprelu": "JumpReLU (target L0) recovers ~70%: latents that stop firing never return",
}


@pytest.fixture(scope="module")
def sources():
    return {name: bp.PlantedSource(shape, chunk_tokens=8192) for name, shape in SHAPES.items()}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("method", METHODS)
def test_planted_recovery_at_defaults(method, shape, sources, tmp_path, request):
    if method in KNOWN_GAPS:
        request.applymarker(pytest.mark.xfail(reason=KNOWN_GAPS[method], strict=True))
    r = bp.run_one(method, SHAPES[shape], 300 * 1024, tmp_path, batch=1024, source=sources[shape])
    assert r["recovery"] >= 0.9, r
    assert r["fvu"] < 0.3 and abs(r["l0"] - SHAPES[shape].k) < 0.3 * SHAPES[shape].k, r  # at the common sparsity
