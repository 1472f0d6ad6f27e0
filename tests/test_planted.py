"""Planted ground truth beyond one shape (issue #15.9): every activation method, at its defaults and the
library's default learning rate, on planted families that vary d, width, sparsity, magnitude law and
correlation; the fraction of planted features recovered (best decoder row at cos >= 0.9) must be >= 90%,
except for the measured gaps in FLOORS (each held at what it reaches now, so none can get worse unseen).

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

SHAPES = {name: bp.SHAPES[name] for name in bp.TEST_SHAPES}  # vary d, width, sparsity, magnitude law, correlated pairs
METHODS = list(bp.METHODS)
# Where a method's defaults do not reach 90% at this budget (measured, docs/METHODS_IMPLEMENTED.md "Planted recovery"),
# the floor is what it reaches, less a margin: a regression test, and the list of open gaps.
FLOORS = {
    ("batchtopk", "uniform_sparse"): 0.8,  # 84%
    ("batchtopk", "wide_dense"): 0.8,  # 86%
    ("mutual_choice", "wide_dense"): 0.85,  # 90.0% (just under)
    ("abstopk_batch", "lognormal_pairs"): 0.8,  # 85%
    ("abstopk_batch", "wide_dense"): 0.6,  # 65%
    ("vsae", "uniform_sparse"): 0.75,  # 81%
    ("vsae_det", "uniform_sparse"): 0.75,  # 81%
    # JumpReLU (target L0): about half its latents stop firing; reviving them does not raise recovery.
    ("jumprelu", "lognormal_pairs"): 0.65,  # 73%
    ("jumprelu", "uniform_sparse"): 0.35,  # 44%
    ("jumprelu", "wide_dense"): 0.2,  # 28%
}


@pytest.fixture(scope="module")
def sources():
    return {name: bp.PlantedSource(shape, chunk_tokens=8192) for name, shape in SHAPES.items()}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("method", METHODS)
def test_planted_recovery_at_defaults(method, shape, sources, tmp_path):
    r = bp.run_one(method, SHAPES[shape], 300 * 1024, tmp_path, batch=1024, source=sources[shape])
    assert r["recovery"] >= FLOORS.get((method, shape), 0.9), r
    assert r["fvu"] < 0.3 and abs(r["l0"] - SHAPES[shape].k) < 0.3 * SHAPES[shape].k, r  # at the common sparsity
