"""The multi-seed Pareto benchmark's smoke mode: grid, seed aggregates, resume, and parts run side by side."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
from bench_loader import load_benchmark


def _bench():
    return load_benchmark("bench_pareto")


def test_grid_names_one_sae_per_variant_setting_and_seed():
    bench = _bench()
    args = bench.build_parser().parse_args(["--variants", "topk", "standard", "jumprelu", "--ks", "16", "32", "64", "--seeds", "0", "1"])
    g = bench.grid(args)
    keys = [e["key"] for e in g]
    assert len(keys) == len(set(keys)) == 2 * (3 + 3 + len(bench.COEF_VARIANTS["standard"][3]))
    assert {e["k"] for e in g if e["variant"] == "standard"} == {32}  # the middle k; the coefficient moves it along L0
    assert {e["options"]["sparsity_coef"] for e in g if e["variant"] == "standard"} == set(bench.COEF_VARIANTS["standard"][3])
    assert all(e["options"] == bench.JUMPRELU_TARGET for e in g if e["variant"] == "jumprelu")  # target L0 = k
    # the core group's passes come before the variants' (an interruption loses the least important work)
    assert [e["group"] for e in g] == sorted((e["group"] for e in g), key=list(bench.GROUPS).index)


def test_tiny_grid_aggregates_seeds_resumes_and_merges_parts(tmp_path, monkeypatch):
    bench = _bench()
    runs = tmp_path / "runs"
    common = ["--tiny", "--quiet", "--runs-dir", str(runs), "--seeds", "0", "1"]
    assert bench.main([*common, "--harvest-only", "--out", str(tmp_path / "unused")]) == []
    assert json.loads((runs / "activations" / "cache.json").read_text())["complete"]
    # Two parts side by side (as on a GPU machine), each with its own --out, from the one cache.
    core = bench.main([*common, "--groups", "core", "--variants", "topk", "batchtopk", "--out", str(tmp_path / "core")])
    var = bench.main([*common, "--groups", "variants", "--variants", "standard", "--out", str(tmp_path / "variants")])
    assert len(core) == 2 * 2 * 2 and len(var) == 2 * len(bench.COEF_VARIANTS["standard"][3])
    for r in core + var:
        for k in ("l0", "fvu", "fvu_without_outliers", "delta_ce", "ce_loss_score", "dead_fraction", "train_seconds"):
            assert isinstance(r[k], float) and math.isfinite(r[k]), (r["key"], k)
        assert r["delta_ce"] == pytest.approx(r["ce_loss_with_sae"] - r["ce_loss_without_sae"])
    topk = {r["seed"]: r for r in core if r["variant"] == "topk" and r["k"] == 4}
    assert topk[0]["l0"] == topk[1]["l0"] == 4.0 and topk[0]["fvu"] != topk[1]["fvu"]  # two seeds, two SAEs

    # Resume: every row is there, so nothing is trained or evaluated again.
    import saebench.trainers.loop as loop

    monkeypatch.setattr(loop, "train_many", lambda *a, **kw: (_ for _ in ()).throw(AssertionError("trained again")))
    again = bench.main([*common, "--groups", "core", "--variants", "topk", "batchtopk", "--out", str(tmp_path / "core")])
    assert sorted(r["key"] for r in again) == sorted(r["key"] for r in core)
    monkeypatch.undo()
    assert all(r["resolved_options"] == bench.bm.resolved_options(r["method"], r["options"]) for r in core)

    # A default changes (here: BatchTopK's options resolve differently from when its rows were trained). Its rows are
    # stale: retrained, each into a new folder (SAE folders are named by the resolved options too, so the SAE trained
    # under the old default is not reused); TopK's rows are not touched. On a copy, so the parts merged below stay as trained.
    import shutil

    shutil.copytree(tmp_path / "core", tmp_path / "core_copy")
    real_resolve = bench.bm.resolved_options
    monkeypatch.setattr(bench.bm, "resolved_options", lambda m, o=None: real_resolve(m, o) | ({"topk_warmup_steps": 3} if m == "batchtopk" else {}))
    trained = []
    real_train = bench.bm.train_group
    monkeypatch.setattr(bench.bm, "train_group", lambda cfgs, *a, **kw: (trained.extend(c.out_dir for c in cfgs), real_train(cfgs, *a, **kw))[1])
    redone = {r["key"]: r for r in bench.main([*common, "--groups", "core", "--variants", "topk", "batchtopk", "--out", str(tmp_path / "core_copy")])}
    monkeypatch.undo()
    before = {r["key"]: r for r in core}
    assert sorted(Path(d).name.rsplit("_", 1)[0] for d in trained) == sorted(k.replace("|", "_") for k in before if k.startswith("batchtopk"))
    for k, r in redone.items():
        if k.startswith("batchtopk"):
            assert r["resolved_options"]["topk_warmup_steps"] == 3 and r["sae_dir"] != before[k]["sae_dir"]
        else:
            assert r == before[k]

    # The report merges the parts: mean ± sample sd over the seeds.
    merged = tmp_path / "merged"
    bench.main(["--report-only", "--quiet", "--out", str(merged), "--rows-from", str(tmp_path / "core"), str(tmp_path / "variants")])
    agg = json.loads((merged / "pareto.json").read_text())["aggregates"]
    assert len(agg) == 2 * 2 + len(bench.COEF_VARIANTS["standard"][3])
    a = next(x for x in agg if x["variant"] == "topk" and x["setting"] == "k=4")
    assert a["n"] == 2 and a["fvu"] == pytest.approx(statistics.fmean([topk[0]["fvu"], topk[1]["fvu"]]))
    assert a["fvu_sd"] == pytest.approx(statistics.stdev([topk[0]["fvu"], topk[1]["fvu"]]))
    md = (merged / "pareto.md").read_text()
    assert "| topk | k=4 | 2 |" in md and "ΔCE (nats)" in md
    for name in ("pareto_delta_ce.html", "pareto_fvu.html"):
        assert (merged / name).stat().st_size > 1000
    assert len(json.loads((merged / "pareto_rows.json").read_text())["rows"]) == len(core) + len(var)
    meta = json.loads((merged / "pareto_rows.json").read_text())["meta"]
    assert meta["seeds"] == [0, 1] and meta["ks"] == [2, 4] and set(meta["machines_by_part"]) == {str(tmp_path / "core"), str(tmp_path / "variants")}
    # Merging one more part later keeps the earlier parts in the record.
    extra = tmp_path / "extra"
    extra.mkdir()
    row = dict(topk[0], key="topk|k4|s7", seed=7)
    old_default = dict(topk[0], key="topk|k4|s8", seed=8, resolved_options=topk[0]["resolved_options"] | {"auxk_coef": 0.5})
    (extra / "pareto_rows.json").write_text(json.dumps({"meta": {"machine": {"gpu": "some GPU"}}, "rows": [row, old_default]}))
    bench.main(["--report-only", "--quiet", "--out", str(merged), "--rows-from", str(extra)])
    meta = json.loads((merged / "pareto_rows.json").read_text())["meta"]
    assert meta["parts"][-3:] == [str(tmp_path / "core"), str(tmp_path / "variants"), str(extra)] and meta["seeds"] == [0, 1, 7, 8]
    assert meta["machines_by_part"][str(extra)] == "some GPU" and "command" not in meta
    # The row trained under another default stays in the record but not in the table, which says why.
    report = json.loads((merged / "pareto.json").read_text())
    a = next(x for x in report["aggregates"] if x["variant"] == "topk" and x["setting"] == "k=4")
    assert a["seeds"] == [0, 1, 7] and set(report["left_out_stale"]) == {"topk|k4|s8"}
    assert "auxk_coef 0.5 -> " in report["left_out_stale"]["topk|k4|s8"] and "topk|k4|s8: auxk_coef" in (merged / "pareto.md").read_text()


def test_report_refuses_parts_evaluated_on_different_held_out_tokens(tmp_path):
    bench = _bench()
    for name, n in (("a", 256), ("b", 512)):
        row = {"key": f"topk|k4|s{n}", "variant": "topk", "setting": "k=4", "seed": 0, "eval_tokens": n}
        (tmp_path / name).mkdir()
        (tmp_path / name / "pareto_rows.json").write_text(json.dumps({"meta": {}, "rows": [row]}))
    with pytest.raises(SystemExit, match="another number of held-out tokens"):
        bench.main(["--report-only", "--quiet", "--out", str(tmp_path / "m"), "--rows-from", str(tmp_path / "a"), str(tmp_path / "b")])


def test_pareto_figures_take_a_log_y_axis_only_when_every_value_is_positive():
    from saebench.evals.plots import pareto_curves_figure, pareto_figure

    agg = [{"variant": "topk", "setting": "k=16", "l0": 16.0, "delta_ce": 0.16, "n": 3},
           {"variant": "standard", "setting": "λ=30", "l0": 98.0, "delta_ce": 6.1, "n": 3}]
    assert pareto_curves_figure(agg, log_y=True).layout.yaxis.type == "log"
    assert pareto_curves_figure(agg).layout.yaxis.type != "log"  # opt-in
    assert pareto_curves_figure(agg + [{"variant": "x", "setting": "k=1", "l0": 1.0, "delta_ce": -0.01, "n": 1}], log_y=True).layout.yaxis.type != "log"
    rows = [dict(a, family=a["variant"]) for a in agg]
    assert pareto_figure(rows, y="delta_ce", color_by="family", higher_is_better=False, log_y=True).layout.yaxis.type == "log"
    assert pareto_figure(rows, y="delta_ce", color_by="family", higher_is_better=False).layout.xaxis.type == "log"
