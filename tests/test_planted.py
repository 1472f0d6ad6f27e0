"""Planted ground truth beyond one shape (issue #15.9): every activation method (and the option forms JumpReLU
form='paper', vsae variance='learned'), at its defaults and the library's default learning rate, on planted
families that vary d, width, sparsity, magnitude law and correlation; the fraction of planted features recovered (best decoder row at cos >= 0.9) must be >= 90%,
except for the measured gaps in FLOORS (each held at what it reaches now, so none can get worse unseen) and the methods
in BY_CONSTRUCTION, whose objective or selection rule does not aim at these features (each with the reason).

The data and scoring are benchmarks/bench_planted.py's (whose sweep runs the same methods at the issue's
larger shapes); the runs here are small (300 steps of 1,024 samples; 1,200 where STEPS says). The hierarchical
families (parents and children) have their own tests: at k = the planted L0 TopK absorbs and BatchTopK does not;
at a k below it both absorb, and Matryoshka and matching pursuit, whose papers claim to resist absorption, do.
"""

from __future__ import annotations

import json

import pytest
from bench_loader import load_benchmark


def _bench():
    return load_benchmark("bench_planted")


bp = _bench()

SHAPES = {name: bp.SHAPES[name] for name in bp.TEST_SHAPES}  # vary d, width, sparsity, magnitude law, correlated pairs
# JumpReLU's paper form cannot at 300 steps: log θ moves at most ~lr per Adam step, so θ₀ = 0.001·√d (0.004-0.006 here)
# reaches at most θ₀·e^(300·lr) (0.3-0.6 at these shapes' lr), under the ~1 the planted codes need; it has its own test below.
# Methods whose planted recovery is low by construction, not by a default we could fix (measured: benchmarks/bench_planted.py,
# docs/METHODS_REPORT.md "Planted ground truth"); the table reports them, these tests do not hold them to 90%:
BY_CONSTRUCTION = {
    # Nested prefixes must reconstruct alone, so early latents learn composite, frequent directions and later ones
    # corrections to them: 17-34% at 300 and 1,200 steps, 55% on the hierarchical family (BatchTopK 90-98%, 95%).
    # Where its claim applies (absorption under sparsity pressure) it does better: the last test below.
    "matryoshka_batchtopk": "prefix losses",
    # Atoms are whole input samples (several planted features each, plus noise): 10-42%.
    "itda": "atoms are samples",
    # The per-token k that matches ‖x − b_dec‖ assumes a quasi-orthogonal decoder; 2x-4x overcomplete dictionaries in
    # d 16-32 are not, and training spreads each input over 20-56 small activations (L0 5-10x the planted one): 0%.
    "top_afa": "quasi-orthogonality",
    # Zipf-shaped capacities on features of equal frequency: most latents get capacities unlike their feature's: 51-59%.
    "feature_choice_zipf": "capacity law",
}
METHODS = [m for m in bp.METHODS if m != "jumprelu_paper" and m not in BY_CONSTRUCTION]
# The L1 family's codes start dense (half the latents fire at initialisation) and λ warms up over 5% of the run: gated and
# the unit-norm ReLU + L1 reach 75-94% / 59-100% in 300 steps and 100% on every shape in 1,200 (measured).
STEPS = {"gated": 1200, "standard_constrained": 1200}
# ReLU + L1 shrinks every activation (the gated paper's motivation): the April form at its λ = 5 recovers every direction
# but reconstructs with FVU 0.49-0.58 at an L0 under the planted one; gated, at the same λ, 0.15-0.21 (measured).
FVU_MAX = {"standard": 0.6}
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
    r = bp.run_one(method, SHAPES[shape], STEPS.get(method, 300) * 1024, tmp_path, batch=1024, source=sources[shape])
    assert r["recovery"] >= FLOORS.get((method, shape), 0.9) - FRACTION_SLACK, r
    assert r["fvu"] < FVU_MAX.get(method, 0.3), r
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


def test_hierarchical_family_makes_per_token_topk_absorb_children_into_parents(tmp_path):
    """The hierarchical family (children fire only with their parent) is feature absorption's setting: TopK, whose fixed
    k per token rewards one latent for parent + child, recovers every parent but few children (62% measured), while
    BatchTopK, whose per-token L0 varies, recovers both (parents 100%, children 94%)."""
    shape = bp.SHAPES["hierarchy"]
    src = bp.PlantedSource(shape, chunk_tokens=8192)
    c = src.coefficients(0)
    parents, children = c[:, :src.parents] != 0, (c[:, src.parents:] != 0).view(len(c), src.parents, shape.children)
    assert not (children.any(-1) & ~parents).any() and children.sum(-1).max() <= 1  # a child only with its parent, one at most
    assert abs((c != 0).sum(-1).float().mean().item() - shape.n_active) < 0.1
    top = bp.run_one("topk", shape, 600 * 1024, tmp_path / "topk", batch=1024, source=src)
    batch = bp.run_one("batchtopk", shape, 600 * 1024, tmp_path / "batchtopk", batch=1024, source=src)
    assert top["recovery_parents"] == 1.0 and top["recovery_children"] < 0.8, top  # 20 of 32 measured
    assert batch["recovery_parents"] == 1.0 and batch["recovery_children"] >= 0.8, batch  # 30 of 32 measured


def test_under_sparsity_pressure_matryoshka_and_matching_pursuit_resist_absorption(tmp_path):
    """k = 2 under the ~3 active features ("hierarchy_tight"): merging parent + child pays, and TopK and BatchTopK absorb
    (19% / 31% of the children measured). The two papers that claim to resist it do: Matryoshka's early prefix must
    reconstruct the parent on every token (62%), and matching pursuit explains the parent away first (81%)."""
    shape = bp.SHAPES["hierarchy_tight"]
    src = bp.PlantedSource(shape, chunk_tokens=8192)
    children = {m: bp.run_one(m, shape, 600 * 1024, tmp_path / m, batch=1024, source=src)["recovery_children"]
                for m in ("topk", "batchtopk", "matryoshka_batchtopk", "matching_pursuit")}
    assert children["topk"] < 0.45 and children["batchtopk"] < 0.45, children
    assert children["matryoshka_batchtopk"] >= children["batchtopk"] + 0.15, children
    assert children["matching_pursuit"] >= 0.7, children


def test_bench_planted_runs_seeds_resumes_and_tabulates_mean_and_sd(tmp_path, capsys, monkeypatch):
    """The benchmark's own entry point: --seeds runs each cell per seed, a second call trains nothing, and the table gives
    mean ± sd with each seed's value (parents and children apart on a hierarchical shape)."""
    argv = ["--shapes", "hierarchy", "--methods", "topk", "--samples", "2048", "--batch", "1024", "--chunk-tokens", "1024",
            "--seeds", "0", "1", "--out", str(tmp_path / "out"), "--runs-dir", str(tmp_path / "runs")]
    rows = bp.main([*argv, "--figure", "fig"])
    fig = bp.recovery_figure(rows, ["hierarchy"], ["topk"], 2048, None, [0, 1])
    assert list(fig.data[0].x) == ["hierarchy", "hierarchy: children"]  # the children's column on a hierarchical shape
    mean = 100 * sum(r["recovery"] for r in rows) / 2
    assert fig.data[0].z[0][0] == pytest.approx(mean) and fig.data[0].text[0][0].startswith(f"{mean:.0f} ± ")
    assert "Heatmap" in type(fig.data[0]).__name__ and (tmp_path / "out" / "fig.html").stat().st_size > 1000
    assert sorted(r["seed"] for r in rows) == [0, 1] and all("recovery_children" in r for r in rows)
    assert rows[0]["recovery"] != rows[1]["recovery"] or rows[0]["fvu"] != rows[1]["fvu"]  # the seeds are different runs
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| topk |"))
    values = " / ".join(f"{100 * r['recovery']:.0f}" for r in sorted(rows, key=lambda r: r["seed"]))
    assert " ± " in line and f"({values})" in line and "children" in line, line
    real_run_one = bp.run_one
    monkeypatch.setattr(bp, "run_one", lambda *a, **k: pytest.fail("a finished cell ran again"))
    again = bp.main(argv)
    assert [r["recovery"] for r in again] == [r["recovery"] for r in rows]
    # A row trained under another default (as if a default changed since) is rerun, not reported as this code's.
    saved = json.loads((tmp_path / "out" / "planted_recovery.json").read_text())
    saved["rows"][0]["resolved_options"]["auxk_coef"] = 0.5
    (tmp_path / "out" / "planted_recovery.json").write_text(json.dumps(saved))
    ran = []
    monkeypatch.setattr(bp, "run_one", lambda *a, **k: ran.append(k["seed"]) or real_run_one(*a, **k))
    redone = bp.main(argv)
    assert ran == [saved["rows"][0]["seed"]] and len(redone) == 2
    assert all(r["resolved_options"]["auxk_coef"] == bp.resolved_options("topk")["auxk_coef"] for r in redone)
