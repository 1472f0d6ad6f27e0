"""The method benchmark's smoke mode: every method trained, evaluated and tabulated on the tiny model."""

from __future__ import annotations

import json
import math

from bench_loader import load_benchmark


def _bench():
    return load_benchmark("bench_methods")


def test_tiny_mode_gives_one_finite_row_per_method_and_resumes(tmp_path, monkeypatch):
    bench = _bench()
    out, runs = tmp_path / "out", tmp_path / "runs"
    rows = bench.main(["--tiny", "--quiet", "--out", str(out), "--runs-dir", str(runs)])
    keys = [r["key"] for r in rows]
    # Every method once, plus the TopK reference at the model methods' (smaller) budget.
    assert keys == bench.ALL_METHODS + ["topk@256"]
    for r in rows:
        for k in ("l0", "fvu", "ce_loss_score", "kl_div_score", "dead_fraction", "train_seconds", "tokens_per_second"):
            assert isinstance(r[k], float) and math.isfinite(r[k]), (r["key"], k, r[k])
        assert r["l0"] > 0 and 0 <= r["dead_fraction"] <= 1 and r["eval_tokens"] > 0
    by = {r["key"]: r for r in rows}
    assert by["topk"]["l0"] == 4.0 and by["gsae"]["train_tokens"] == 256
    assert by["e2e"]["architecture"] == by["e2e_ds"]["architecture"] == "topk" and by["e2e"]["l0"] <= 4.0  # their TopK form, at the common k
    saved = json.loads((out / "methods_comparison.json").read_text())
    assert [r["key"] for r in saved["rows"]] == keys and saved["meta"]["machine"]["cpu_count"]
    csv_lines = (out / "methods_comparison.csv").read_text().strip().splitlines()
    assert len(csv_lines) == len(keys) + 1 and csv_lines[0].startswith("key,method,train_tokens,l0,fvu,fvu_without_outliers,ce_loss_score")
    md = (out / "methods_comparison.md").read_text()
    assert md.count("\n| ") >= len(keys) and "CE loss recovered" in md
    assert (out / "methods_ce_vs_l0.html").stat().st_size > 1000

    # Resumable: with every row present nothing is trained or evaluated again ...
    import saebench.trainers.loop as loop

    def refuse(*a, **kw):
        raise AssertionError("trained again")

    monkeypatch.setattr(loop, "train_many", refuse)
    again = bench.main(["--tiny", "--quiet", "--out", str(out), "--runs-dir", str(runs)])
    assert [r["key"] for r in again] == keys and again[0]["fvu"] == rows[0]["fvu"]
    # --reeval evaluates named SAEs again (new metrics) and keeps their training times, training nothing.
    for r in saved["rows"]:
        r.pop("fvu_without_outliers", None)
    (out / "methods_comparison.json").write_text(json.dumps(saved))
    reeval = bench.main(["--tiny", "--quiet", "--out", str(out), "--runs-dir", str(runs), "--methods", "topk", "gsae", "--reeval"])
    by_re = {r["key"]: r for r in reeval}
    for key in ("topk", "gsae"):
        assert math.isfinite(by_re[key]["fvu_without_outliers"]) and by_re[key]["fvu"] == by[key]["fvu"]
        assert by_re[key]["train_seconds"] == by[key]["train_seconds"] and by_re[key]["source_seconds"] == by[key]["source_seconds"]
    assert "fvu_without_outliers" not in by_re["abstopk"]  # not named: its row is kept as it was
    monkeypatch.undo()
    # ... and --force redoes only the named methods.
    redo = bench.main(["--tiny", "--quiet", "--out", str(out), "--runs-dir", str(runs), "--methods", "topk", "--force"])
    assert [r["key"] for r in redo] == keys
    # A default changes (AbsTopK's options now resolve differently): its row is stale, so AbsTopK alone is retrained, into a
    # new folder (folders are named by the resolved options), and the other rows are kept.
    real_resolve = bench.resolved_options
    monkeypatch.setattr(bench, "resolved_options", lambda m, o=None: real_resolve(m, o) | ({"auxk_coef": 0.25} if m == "abstopk" else {}))
    trained = []
    real_train_many = loop.train_many
    monkeypatch.setattr(loop, "train_many", lambda cfgs, *a, **kw: (trained.extend(c.method for c in cfgs), real_train_many(cfgs, *a, **kw))[1])
    after = {r["key"]: r for r in bench.main(["--tiny", "--quiet", "--out", str(out), "--runs-dir", str(runs)])}
    assert trained == ["abstopk"] and after["abstopk"]["resolved_options"]["auxk_coef"] == 0.25
    assert after["abstopk"]["sae_dir"] != by["abstopk"]["sae_dir"] and after["batchtopk"]["fvu"] == by["batchtopk"]["fvu"]


def test_auxk_and_the_zipf_dead_branch_fire_in_a_benchmark_shaped_run(tmp_path):
    """Issue #15.1: the benchmark's dead window must be reachable, so AuxK (TopK) and the Zipf loss's
    dead branch (Mutual Choice; Feature Choice's capacities leave no latent dead) act. The bench's own settings, scaled down (60 steps, batch 256), on planted data."""
    import torch
    from saebench.trainers.loop import train

    from saebench.activations import SyntheticSource
    from saebench.config import TrainConfig

    bench = _bench()
    args = bench.build_parser().parse_args(["--tokens", str(60 * 256), "--batch-size-tokens", "256", "--k", "4", "--expansion-factor", "16"])
    base = bench.settings(args)
    assert base["dead_window_tokens"] <= args.tokens - 2 * args.batch_size_tokens  # reachable before the last step
    src = SyntheticSource(d=16, m=24, n_active=3, chunk_tokens=4096)
    fields = base | {"hook_name": "synthetic", "model": "none", "training_tokens": args.tokens, "eval_tokens": 0, "log_every_steps": 1,
                     "checkpoint_every_steps": 10**6, "activation_cache": None, "harvest_tokens": None}
    for method in ("topk", "mutual_choice"):  # AuxK; aux_zipf_loss, whose dead latents have gap 1
        torch.manual_seed(0)
        cfg = TrainConfig(**fields | {"method": method, "out_dir": str(tmp_path / method)})
        hist = train(cfg, source=src, progress=False).history
        dead_steps = [h for h in hist if h["dead_fraction"] > 0]
        assert dead_steps, f"{method}: no latent was ever dead: its dead-latent loss never ran"
        assert any(h.get("loss/auxiliary_reconstruction_loss", 0.0) > 0 for h in dead_steps), f"{method}: dead latents but no auxiliary loss"
    # The old setting (window = the run's tokens) left every latent alive at every step.
    cfg = TrainConfig(**fields | {"method": "topk", "out_dir": str(tmp_path / "old"), "dead_window_tokens": args.tokens})
    assert all(h["dead_fraction"] == 0 and "loss/auxiliary_reconstruction_loss" not in h for h in train(cfg, source=src, progress=False).history)
