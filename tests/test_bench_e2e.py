"""benchmarks/bench_e2e.py: the local-vs-e2e L0-at-matched-CE benchmark (smoke mode, resume, the analysis)."""

from __future__ import annotations

import json
import math

import pytest
from bench_loader import load_benchmark


def _bench():
    return load_benchmark("bench_e2e")


def test_tiny_mode_trains_every_family_and_resumes(tmp_path, monkeypatch):
    bench = _bench()
    out, runs = tmp_path / "out", tmp_path / "runs"
    argv = ["--tiny", "--quiet", "--out", str(out), "--runs-dir", str(runs)]
    rows = bench.main(argv)
    keys = [r["key"] for r in rows]
    assert keys == ["standard_c1_s0", "standard_c5_s0", "e2e_c0.5_s0", "e2e_c5_s0", "e2e_ds_c0.5_s0", "e2e_ds_c5_s0",
                    "topk_tokens_s0", "topk_compute_s0"]
    by = {r["key"]: r for r in rows}
    for r in rows:
        for k in ("l0", "delta_ce", "ce_loss_score", "train_seconds", "seconds_per_step"):
            assert isinstance(r[k], float) and math.isfinite(r[k]), (r["key"], k)
        assert r["l0"] > 0 and r["steps"] == r["train_tokens"] // 64
        assert r["delta_ce"] == pytest.approx(r["ce_loss_with_sae"] - r["ce_loss_without_sae"])
    # The ReLU families got their coefficient; the local one is the standard method, e2e the paper's ReLU SAE.
    assert by["e2e_c5_s0"]["method_options"] == {"sparsity_coef": 5.0} and by["standard_c1_s0"]["method"] == "standard"
    from saebench.sae import SAE

    assert SAE.load(by["e2e_c5_s0"]["sae_dir"]).cfg.architecture == "relu"
    assert by["topk_tokens_s0"]["l0"] <= 4.0 and by["topk_tokens_s0"]["train_tokens"] == 512
    # TopK at equal compute: e2e's tokens times an e2e step over a TopK step with its harvest, timed side by side in the
    # run (the breakdown it wrote), mean of e2e and e2e_ds, whole batches.
    cm = by["topk_compute_s0"]["compute_match"]
    timing = json.loads((out / "e2e_step_breakdown.json").read_text())
    ratio = (timing["e2e_step_over_topk_step_with_harvest"] + timing["e2e_ds_step_over_topk_step_with_harvest"]) / 2
    assert cm["e2e_over_topk_step_with_harvest"] == pytest.approx(ratio) and ratio > 1  # an e2e step runs the model twice and backward
    assert by["topk_compute_s0"]["train_tokens"] == max(64, min(50 * 512, int(ratio * 512) // 64 * 64))
    saved = json.loads((out / "e2e_axes.json").read_text())
    assert [r["key"] for r in saved["rows"]] == keys and set(saved["analysis"]["matched"]) == {"e2e", "e2e_ds"}
    assert "verdict" in saved["analysis"]["matched"]["e2e"] and (out / "e2e_ce_vs_l0.html").stat().st_size > 1000
    assert "at matched delta-CE" in (out / "e2e_axes.md").read_text()

    # Resumable: finished rows are skipped; a finished SAE folder whose row is missing is evaluated, not trained.
    import saebench.trainers.loop as loop

    def refuse(*a, **kw):
        raise AssertionError("trained again")

    monkeypatch.setattr(loop, "train", refuse)
    again = bench.main(argv)
    assert [r["key"] for r in again] == keys and again[2]["l0"] == rows[2]["l0"]
    saved["rows"] = [r for r in saved["rows"] if r["key"] != "e2e_c5_s0"]
    (out / "e2e_axes.json").write_text(json.dumps(saved))
    again = {r["key"]: r for r in bench.main(argv)}
    assert again["e2e_c5_s0"]["l0"] == pytest.approx(by["e2e_c5_s0"]["l0"]) and again["e2e_c5_s0"]["train_seconds"] == by["e2e_c5_s0"]["train_seconds"]
    monkeypatch.undo()

    # A default of the local ReLU + L1 method changes. A run that does not train that family keeps its rows as they are
    # (nothing is deleted that the run will not redo); a run that does retrains them alone, into new folders.
    real_resolve = bench.bm.resolved_options
    monkeypatch.setattr(bench.bm, "resolved_options", lambda m, o=None: real_resolve(m, o) | ({"lr_scale": 2} if m == "standard" else {}))
    trained = []
    real_train = loop.train
    monkeypatch.setattr(loop, "train", lambda cfg, *a, **kw: (trained.append(cfg.method), real_train(cfg, *a, **kw))[1])
    only_e2e = {r["key"]: r for r in bench.main([*argv, "--families", "e2e"])}
    assert trained == [] and only_e2e["standard_c1_s0"] == by["standard_c1_s0"] | {"resolved_options": only_e2e["standard_c1_s0"]["resolved_options"]}
    redone = {r["key"]: r for r in bench.main(argv)}
    assert trained == ["standard", "standard"]
    assert redone["standard_c1_s0"]["resolved_options"]["lr_scale"] == 2 and redone["standard_c1_s0"]["sae_dir"] != by["standard_c1_s0"]["sae_dir"]
    assert redone["e2e_c5_s0"]["sae_dir"] == by["e2e_c5_s0"]["sae_dir"]


def test_interrupted_sae_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    """An e2e run killed mid-way picks up from its checkpoint in the SAE folder (the loop's resume)."""
    import saebench.trainers.loop as loop

    from saebench import models

    bench = _bench()
    args = bench.build_parser().parse_args(["--tiny", "--out", str(tmp_path / "out"), "--runs-dir", str(tmp_path / "runs"), "--families", "e2e"])
    cfg = bench.train_config(args, bench.plan(args)[0], 512)
    model = models.load_model(cfg.model)
    steps = []
    original = loop._train_step

    def dies_at_step_5(r, *a, **kw):
        if r.step == 5:
            raise KeyboardInterrupt
        steps.append(r.step)
        return original(r, *a, **kw)

    monkeypatch.setattr(loop, "_train_step", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        bench.train_one(cfg, model, progress=False)
    monkeypatch.setattr(loop, "_train_step", lambda r, *a, **kw: (steps.append(r.step), original(r, *a, **kw))[1])
    clock = bench.train_one(cfg, model, progress=False)
    assert clock["steps"] == 8 and steps == [0, 1, 2, 3, 4, 4, 5, 6, 7]  # checkpoint after step 4 (every 2): resumed there


def test_matched_ce_analysis_interpolates_and_gives_a_verdict():
    bench = _bench()

    def row(fam, coef, dce, l0, seed=0):
        return {"key": f"{fam}_{coef}_{seed}", "family": fam, "coef": coef, "delta_ce": dce, "l0": l0, "seed": seed, "train_tokens": 1}

    local = [row("standard", 1, 0.10, 100.0), row("standard", 5, 0.20, 25.0)]
    # e2e at delta-CE 0.15: local's log-L0 midway between 100 and 25 is 50; e2e has 20 -> 2.5x fewer.
    e2e = [row("e2e", 1, 0.15, 20.0), row("e2e", 5, 0.30, 5.0)]  # the second lies outside local's range: not matched
    worse = [row("e2e_ds", 1, 0.12, 90.0, 0), row("e2e_ds", 1, 0.12, 160.0, 1)]  # two seeds: geometric mean L0 120
    a = bench.analyse(local + e2e + worse + [row("topk_tokens", None, 0.15, 32.0)])
    m = a["matched"]["e2e"]
    assert len(m["points"]) == 1 and m["points"][0]["local_l0"] == pytest.approx(50.0)
    assert m["verdict"].startswith("reproduced") and "2.50x fewer" in m["verdict"]
    d = a["matched"]["e2e_ds"]["points"][0]
    assert d["l0"] == pytest.approx(120.0) and a["matched"]["e2e_ds"]["verdict"].startswith("refuted")
    t = a["topk"]["topk_tokens_None_0"]
    assert t["standard_l0_at_same_ce"] == pytest.approx(50.0) and t["e2e_l0_at_same_ce"] == pytest.approx(20.0)
    assert bench.analyse(local + [row("e2e", 1, 0.5, 3.0)])["matched"]["e2e"]["verdict"].startswith("no overlap")


def test_bad_flags_are_refused_with_a_clear_message():
    bench = _bench()
    with pytest.raises(SystemExit, match="FAMILY=C1"):
        bench.parse_coefs(["e2e:1,2"], False)
    with pytest.raises(SystemExit, match="numbers"):
        bench.parse_coefs(["e2e=a,b"], False)
    assert bench.parse_coefs(["e2e=5,1"], False)["e2e"] == [1.0, 5.0]
    with pytest.raises(SystemExit, match="expected cpu, cuda"):
        bench.check_device("tpu")


def test_breakdown_times_every_part_and_both_step_paths(tmp_path):
    bench = _bench()
    rep = bench.main(["--breakdown", "--tiny", "--quiet", "--repeats", "1", "--out", str(tmp_path), "--runs-dir", str(tmp_path / "runs")])[0]
    med = rep["median_seconds"]
    for k in ("prefix", "clean_full", "clean_rest", "sae", "spliced_forward", "kl", "spliced_forward_kl_backward",
              "spliced_forward_chunked_kl_backward", "e2e_step_plain", "e2e_step", "e2e_ds_step_plain", "e2e_ds_step", "topk_step",
              "topk_step_with_harvest"):
        assert math.isfinite(med[k]) and med[k] > 0, k
    assert set(rep["fast_over_plain"]) == {"e2e_step", "e2e_ds_step", "spliced_forward_chunked_kl_backward"}
    assert rep["tokens_per_step"] == 64 and rep["e2e_step_over_topk_step"] > 0
    assert json.loads((tmp_path / "e2e_step_breakdown.json").read_text())["median_seconds"] == med


def test_the_normalised_e2e_ds_family_is_opt_in_and_gets_its_own_verdict(tmp_path):
    """e2e_ds_norm trains e2e_ds with downstream_normalize (each downstream MSE an FVU) under its own keys, only when asked."""
    bench = _bench()
    default = bench.build_parser().parse_args([])
    assert "e2e_ds_norm" not in default.families and "e2e_ds_norm" not in {e["family"] for e in bench.plan(default)}
    rows = bench.main(["--tiny", "--quiet", "--families", "standard", "e2e_ds_norm", "--out", str(tmp_path / "o"), "--runs-dir", str(tmp_path / "r")])
    norm = [r for r in rows if r["family"] == "e2e_ds_norm"]
    assert [r["key"] for r in norm] == ["e2e_ds_norm_c0.5_s0", "e2e_ds_norm_c5_s0"]
    assert all(r["method"] == "e2e_ds" and r["method_options"] == {"downstream_normalize": True, "sparsity_coef": r["coef"]} for r in norm)
    analysis = json.loads((tmp_path / "o" / "e2e_axes.json").read_text())["analysis"]
    assert analysis["matched"]["e2e_ds_norm"]["verdict"] != "not run" and analysis["matched"]["e2e"]["verdict"] == "not run"


def test_loss_terms_records_each_e2e_familys_terms_at_its_first_step(tmp_path):
    """--loss-terms: one step of each family through the loop; e2e has no downstream term, e2e_ds_norm's is e2e_ds's normalised."""
    bench = _bench()
    rep = bench.main(["--tiny", "--quiet", "--loss-terms", "--families", "e2e", "e2e_ds", "e2e_ds_norm", "--out", str(tmp_path),
                      "--runs-dir", str(tmp_path / "r")])[0]
    terms = rep["terms"]
    assert set(terms) == {"e2e", "e2e_ds", "e2e_ds_norm"} and "downstream_loss" not in terms["e2e"]
    assert terms["e2e_ds_norm"]["method_options"] == {"downstream_normalize": True, "sparsity_coef": 0.5}
    for t in terms.values():
        assert all(math.isfinite(t[k]) for k in ("kl_loss", "sparsity_loss", "mse_loss")) and t["l0"] > 0
    # Same initialisation and batch: only the downstream term differs between the raw and the normalised form.
    assert terms["e2e_ds"]["sparsity_loss"] == pytest.approx(terms["e2e_ds_norm"]["sparsity_loss"])
    assert terms["e2e_ds"]["downstream_loss"] != pytest.approx(terms["e2e_ds_norm"]["downstream_loss"], rel=0.1)
    assert json.loads((tmp_path / "e2e_loss_terms.json").read_text())["terms"] == terms


def test_e2e_topk_family_compares_the_objective_with_local_topk_at_the_same_l0(tmp_path):
    bench = _bench()
    out = tmp_path / "out"
    rows = {r["key"]: r for r in bench.main(["--tiny", "--quiet", "--out", str(out), "--runs-dir", str(tmp_path / "runs"),
                                             "--families", "e2e_topk", "topk"])}
    assert list(rows) == ["e2e_topk_s0", "topk_tokens_s0", "topk_compute_s0"]
    e = rows["e2e_topk_s0"]
    assert e["method"] == "e2e" and e["method_options"] == {"activation": "topk", "sparsity_coef": 0.0}
    assert e["l0"] <= 4.0 and e["train_tokens"] == rows["topk_tokens_s0"]["train_tokens"]  # same k and tokens as the local TopK
    from saebench.sae import SAE

    assert SAE.load(e["sae_dir"]).cfg.architecture == "topk"
    a = json.loads((out / "e2e_axes.json").read_text())["analysis"]["e2e_topk"]["e2e_topk_s0"]
    assert a["minus_topk_tokens"] == pytest.approx(e["delta_ce"] - rows["topk_tokens_s0"]["delta_ce"])
    assert a["minus_topk_compute"] == pytest.approx(e["delta_ce"] - rows["topk_compute_s0"]["delta_ce"])
    assert "**e2e_topk_s0** (e2e objective, TopK activation" in (out / "e2e_axes.md").read_text()
