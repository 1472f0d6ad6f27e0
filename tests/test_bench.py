"""Reconstruction (identity SAE, shared pass = core eval), SAEBench compatibility, and the resumable bench runner."""

from __future__ import annotations

import json

import pytest
import torch

from helpers_evals import hand_sae, identity_sae, random_topk_sae
from saebench.evals.bench import bench_main, check_saebench_compat, expand_sae_dirs, run_bench
from saebench.evals.circuits import CircuitConfig
from saebench.evals.common import special_ids_of
from saebench.evals.core import evaluate_core
from saebench.evals.reconstruction import evaluate_hook_group, evaluate_reconstruction
from saebench.evals.steering import SteeringConfig
from saebench.models import make_tiny_model


HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny_bench"))


@pytest.fixture(scope="module")
def toks():
    t = torch.randint(3, 20_000, (8, 24), generator=torch.Generator().manual_seed(0))
    t[:, 0] = 1
    t[3, 11] = 2  # an EOS inside a row
    return t


def test_identity_sae_recovers_all_loss(tiny, toks):
    sae = identity_sae(64, HOOK)
    special = special_ids_of(tiny.tokenizer)
    for r in (evaluate_core(sae, tiny, toks, special_ids=special, batch_size=4, progress=False),
              evaluate_reconstruction(sae, tiny, toks, special_ids=special, batch_size=4, progress=False)):
        assert r["ce_loss_score"] == pytest.approx(1.0, abs=1e-9)
        assert r["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-9) and r["kl_div_score"] == pytest.approx(1.0, abs=1e-9)
        assert r["fvu"] == pytest.approx(0.0, abs=1e-12) and r["l0"] == 64
        assert r["ce_loss_with_ablation"] != r["ce_loss_without_sae"]


def test_shared_pass_matches_the_core_eval(tiny, toks):
    special = special_ids_of(tiny.tokenizer)
    a, b = random_topk_sae(64, 128, 4, HOOK, seed=0), random_topk_sae(64, 128, 16, HOOK, seed=1)
    shared = evaluate_reconstruction([a, b], tiny, toks, special_ids=special, batch_size=3, progress=False)
    for sae, got in zip((a, b), shared):
        ref = evaluate_core(sae, tiny, toks, special_ids=special, batch_size=4, progress=False)
        for k, v in ref.items():
            # The ratios are ill-conditioned on a random model (CE_zero ≈ CE_clean); their parts are compared.
            # SAEBench's variants average per batch, so they depend on the batching (compared below with equal batches).
            if isinstance(v, float) and k not in ("ce_loss_score", "kl_div_score") and not k.endswith("_saebench"):
                assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-9), k
    same_batches = evaluate_reconstruction(a, tiny, toks, special_ids=special, batch_size=4, progress=False)
    ref = evaluate_core(a, tiny, toks, special_ids=special, batch_size=4, progress=False)
    assert same_batches["saebench_batches"] == ref["saebench_batches"] == 2
    for k in ("explained_variance_saebench", "relative_reconstruction_bias_saebench", "mse_saebench"):
        assert same_batches[k] == pytest.approx(ref[k], rel=1e-5), k
    # the core window can stop before the dead-latent window
    out = evaluate_hook_group([a], tiny, toks, special_ids=special, dead=True, core_tokens=5 * 24, batch_size=3, progress=False)[0]
    assert out["core"]["n_tokens"] == 5 * 24 - 5 - 1 and out["dead"]["n_tokens"] == 8 * 24 - 8 - 1


def test_saebench_compat_check():
    good = random_topk_sae(16, 32, 4, HOOK)
    r = check_saebench_compat(good)
    assert r["ok"], {k: v for k, v in r["checks"].items() if not v["ok"]}
    for name in ("W_enc [d_in, d_sae]", "W_dec [d_sae, d_in]", "W_dec rows unit norm", "b_enc [d_sae]", "b_dec [d_in]", "device", "dtype",
                 "encode/decode/forward on [batch, pos, d_in]", "cfg.model_name", "cfg.d_in", "cfg.d_sae", "cfg.hook_layer", "cfg.hook_name"):
        assert r["checks"][name]["ok"], name
    assert tuple(good.W_enc.shape) == (16, 32) and tuple(good.W_dec.shape) == (32, 16)
    bad = hand_sae(torch.randn(32, 16) * 3, HOOK, model_name="")
    r = check_saebench_compat(bad)
    assert not r["ok"] and not r["checks"]["W_dec rows unit norm"]["ok"] and not r["checks"]["cfg.model_name"]["ok"]
    assert check_saebench_compat(object())["ok"] is False  # never raises


def _cache_files(out):
    return {p: p.stat().st_mtime_ns for p in (out / "cache").rglob("*.json")}


def test_bench_two_saes_all_evals_then_resume(tiny, toks, tmp_path):
    for k in (4, 16):
        random_topk_sae(64, 128, k, HOOK, seed=k, method=f"topk-k{k}").save(tmp_path / "saes" / f"topk{k}")
    out = tmp_path / "bench"
    steering = SteeringConfig(strengths=(1.0,), n_prompts=2, max_new_tokens=3, neutral_tokens=48, neutral_context=12, max_act_tokens=96)
    circuits = CircuitConfig(n_examples=4, method="atp", n_patch_check=3, max_curve_points=4)
    evals = ["reconstruction", "dead", "steering", "circuits", "compat"]
    kw = dict(out_dir=out, tokens=toks, steering=steering, circuits=circuits, batch_size=4, progress=False)
    first = run_bench(str(tmp_path / "saes" / "*"), evals, tiny, **kw)
    assert len(first.computed) == 10 and not first.cached
    for name in ("csv", "parquet", "json", "figure:pareto_ce_loss_vs_l0", "figure:pareto_fvu_vs_l0", "figure:dead_latents",
                 "figure:steering_curves", "figure:circuit_curves"):
        assert first.files[name].exists(), name
    assert (out / "figures" / "plotly.min.js").exists()
    rows = json.loads((out / "results.json").read_text())
    assert [r["sae"] for r in rows] == ["topk16", "topk4"]
    assert rows[1]["l0"] == 4 and rows[0]["l0"] == 16 and rows[0]["saebench_compatible"] is True
    assert rows[0]["dead_window_tokens"] == 8 * 24 - 9 and "steering_score" in rows[0] and "circuit_nodes_f80[ioi]" in rows[0]
    assert (out / "results.csv").read_text().splitlines()[0].startswith("sae,sae_dir,method")
    import pyarrow.parquet as pq

    assert pq.read_table(out / "results.parquet").num_rows == 2

    # timings: one shared core+dead job for both SAEs, one steering/circuits/compat job per SAE, shares in the rows
    tm = first.timings
    assert sorted(j["job"] for j in tm["jobs"]) == ["circuits"] * 2 + ["compat"] * 2 + ["core+dead"] + ["steering"] * 2
    shared = next(j for j in tm["jobs"] if j["job"] == "core+dead")
    assert sorted(shared["saes"]) == ["topk16", "topk4"] and shared["hook"] == HOOK and shared["seconds"] > 0
    assert tm["total_seconds"] >= sum(j["seconds"] for j in tm["jobs"]) and tm["model_load_seconds"] == 0.0  # the model was given
    assert json.loads((out / "timings.json").read_text())["jobs"] == tm["jobs"]
    for r in rows:
        assert r["seconds[core+dead]"] == pytest.approx(shared["seconds"] / 2)
        mine = [j["seconds"] for j in tm["jobs"] if j["saes"] == [r["sae"]]]
        assert r["seconds_total"] == pytest.approx(shared["seconds"] / 2 + sum(mine))
        assert {"seconds[steering]", "seconds[circuits]", "seconds[compat]"} <= set(r)

    mtimes = _cache_files(out)
    assert len(mtimes) == 10
    second = run_bench(str(tmp_path / "saes" / "*"), evals, tiny, **kw)
    assert second.computed == [] and len(second.cached) == 10
    assert _cache_files(out) == mtimes  # nothing rewritten
    assert second.rows == first.rows  # incl. the seconds columns, read back from the cache
    assert second.timings["jobs"] == []

    # an interrupted run: one result missing is the only one recomputed
    victim = next(p for p in mtimes if p.name.startswith("dead-"))
    victim.unlink()
    third = run_bench(str(tmp_path / "saes" / "*"), evals, tiny, **kw)
    assert len(third.computed) == 1 and third.computed[0][1] == "dead"


def test_bench_cli_compat_needs_no_model(tmp_path, capsys):
    random_topk_sae(16, 32, 4, HOOK).save(tmp_path / "runs" / "a" / "sae")
    random_topk_sae(16, 32, 8, HOOK).save(tmp_path / "runs" / "b")
    assert [p.name for p in expand_sae_dirs([str(tmp_path / "runs")])] == ["sae", "b"]
    res = bench_main([str(tmp_path / "runs"), "--evals", "compat", "--out", str(tmp_path / "out"), "--no-progress"])
    assert len(res.computed) == 2 and all(r["saebench_compatible"] for r in res.rows)
    assert [r["sae"] for r in res.rows] == ["a/sae", "b"]
    assert "saebench_compatible" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown eval"):
        run_bench(str(tmp_path / "runs"), ["nope"], out_dir=tmp_path / "out")
    with pytest.raises(FileNotFoundError):
        expand_sae_dirs([str(tmp_path / "missing")])
