"""The bench with the interpretability evals: sparse probing and absorption as jobs per hook, AFA columns
from the core pass, their figures, and resuming from the cache."""

from __future__ import annotations

import json
import math
import random

import pytest
from helpers_evals import random_topk_sae
from saebench.evals.absorption import AbsorptionConfig
from saebench.evals.bench import bench_main, run_bench
from saebench.evals.sparse_probing import SparseProbingConfig

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture
def labelled_file(tmp_path):
    rng = random.Random(0)
    words = {"fruit": ["apple", "banana", "cherry", "grape", "lemon", "mango", "melon", "peach"], "place": ["river", "mountain", "forest", "desert", "valley", "ocean"]}
    rows = [{"text": " ".join(rng.choice(w) for _ in range(16)), "label": lab} for lab, w in words.items() for _ in range(12)]
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_bench_runs_interp_evals_with_columns_figures_and_cache(tiny_model, labelled_file, tmp_path):
    import torch

    for k in (4, 8):
        random_topk_sae(64, 128, k, HOOK, seed=k, method=f"topk-k{k}").save(tmp_path / "saes" / f"topk{k}")
    toks = torch.randint(3, 20_000, (4, 16), generator=torch.Generator().manual_seed(0))
    toks[:, 0] = 1
    kw = {"out_dir": tmp_path / "bench", "tokens": toks, "batch_size": 4, "progress": False,
          "sparse_probing": SparseProbingConfig(datasets=(str(labelled_file),), train_size=12, test_size=8, ks=(1, 2), context_length=24),
          "absorption": AbsorptionConfig(max_words=80, min_letters=1, l1_iters=50)}
    res = run_bench(str(tmp_path / "saes" / "*"), ["core", "sparse_probing", "absorption"], tiny_model, **kw)
    assert len(res.computed) == 6
    jobs = sorted((j["job"], len(j["saes"])) for j in res.timings["jobs"])
    assert jobs == [("absorption", 2), ("core", 2), ("sparse_probing", 2)]  # one shared job per hook each
    for r in res.rows:
        for c in ("afa_norm_ratio", "afa_eps_lbo_median", "llm_test_accuracy", "sae_top_1_test_accuracy", "sae_top_2_test_accuracy",
                  f"sae_top_1_test_accuracy[{labelled_file}]", "mean_absorption_fraction_score", "mean_full_absorption_score",
                  "n_usable_letters", "seconds[sparse_probing]", "seconds[absorption]"):
            assert c in r, c
        assert 0 <= r["sae_top_1_test_accuracy"] <= 1 and r["afa_norm_ratio"] > 0
    for name in ("figure:sparse_probing", "figure:absorption", "figure:afa_norm_ratio"):
        assert res.files[name].exists(), name
    again = run_bench(str(tmp_path / "saes" / "*"), ["core", "sparse_probing", "absorption"], tiny_model, **kw)
    assert again.computed == []
    same = lambda a, b: a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))  # NaN: no usable letter
    assert all(r1.keys() == r2.keys() and all(same(r1[k], r2[k]) for k in r1) for r1, r2 in zip(again.rows, res.rows))
    # another probing config is another cache entry
    kw["sparse_probing"] = SparseProbingConfig(datasets=(str(labelled_file),), train_size=12, test_size=8, ks=(1,), context_length=24)
    third = run_bench(str(tmp_path / "saes" / "*"), ["sparse_probing"], tiny_model, **kw)
    assert len(third.computed) == 2 and "sae_top_2_test_accuracy" not in third.rows[0]


def test_bench_cli_knows_the_new_evals(tmp_path):
    with pytest.raises(ValueError, match="sparse_probing"):
        run_bench(str(tmp_path), ["nope"], out_dir=tmp_path / "out")
    random_topk_sae(16, 32, 4, HOOK).save(tmp_path / "runs" / "a")
    res = bench_main([str(tmp_path / "runs"), "--evals", "compat", "--probe-datasets", "fortunes_topic", "--probe-ks", "1", "2",
                      "--absorption-words", "50", "--out", str(tmp_path / "out"), "--no-progress"])
    assert res.rows[0]["saebench_compatible"]
