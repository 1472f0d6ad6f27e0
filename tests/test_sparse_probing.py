"""Sparse probing: the probe solver, SAEBench's task construction, the offline datasets, the hf: path
(a local stand-in folder read by the real ``datasets.load_dataset``), and a planted SAE whose latent is
the probe direction (top-1 accuracy ~1, found at its index)."""

from __future__ import annotations

import random

import pytest
import torch
from helpers_evals import hand_sae, random_topk_sae
from saebench.evals.probe_datasets import LANGUAGES, ProbeDataset, load_probe_dataset, split_rst
from saebench.evals.probes import fit_logistic, logistic_objective, top_k_mean_diff
from saebench.evals.sparse_probing import SparseProbingConfig, binary_task, evaluate_sparse_probing, pooled_activations

from saebench.text import CorpusError

HOOK = "blocks.0.hook_resid_post"


def test_fit_logistic_reaches_the_optimum_of_sklearns_objective():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=g) * torch.tensor([1.0, 5.0, 0.1, 2.0, 1.0, 30.0])
    y = ((x[:, 0] + 0.3 * x[:, 1] + torch.randn(300, generator=g)) > 0).long()
    p = fit_logistic(x, y, C=1.0)
    assert p.grad_norm < 1e-4, p.grad_norm
    w, b = p.w.clone().requires_grad_(True), torch.tensor(p.b, dtype=torch.float64, requires_grad=True)
    f0 = logistic_objective(w, b, x.double(), y, 1.0)
    f0.backward()
    assert w.grad.abs().max() < 1e-4 and abs(float(b.grad)) < 1e-4  # stationary, hence the global optimum (strictly convex)
    for _ in range(5):  # and no nearby point is better
        d = torch.randn(6, generator=g, dtype=torch.float64) * 1e-2
        assert logistic_objective(p.w + d, torch.tensor(p.b), x.double(), y, 1.0) > f0.detach()
    assert p.accuracy(x, y) > 0.7
    # separable data in one feature: that feature is chosen and classifies perfectly
    x2 = torch.randn(200, 20, generator=g)
    y2 = (torch.arange(200) % 2).long()
    x2[:, 13] += 4 * (2 * y2 - 1)
    assert top_k_mean_diff(x2, y2, 1).tolist() == [13]
    assert fit_logistic(x2[:, [13]], y2).accuracy(x2[:, [13]], y2) == 1.0


def test_binary_task_follows_saebench_prepare_probe_data():
    n_by = {"a": 10, "b": 7, "c": 30}
    offs = {"a": 0, "b": 10, "c": 17}
    idx, y = binary_task(n_by, offs, "a", torch.Generator().manual_seed(0))
    assert y.sum() == 10 and len(y) == 20 and idx[:10].tolist() == list(range(10))
    neg = idx[10:]
    assert len(set(neg.tolist())) == 10 and all(10 <= i < 47 for i in neg.tolist())
    # ceil(10 / 2) = 5 drawn from each other class, then 10 of those 10
    assert sum(10 <= i < 17 for i in neg.tolist()) == 5 and sum(17 <= i < 47 for i in neg.tolist()) == 5


def test_split_rst_separates_code_from_prose():
    rst = """Title
=====

This paragraph explains what the function does, in plain English words
that continue on a second line.  For example::

   >>> f(1)
   2

.. code-block:: python
   :linenos:

   def f(x):
       return x + 1

* a list item is not prose
.. note:: a directive is not prose

Another paragraph of prose here.
"""
    code, prose = split_rst(rst)
    assert code == [">>> f(1)\n2", "def f(x):\n    return x + 1"]
    first = "This paragraph explains what the function does, in plain English words that continue on a second line.  For example:"
    assert prose == [first, "Another paragraph of prose here."]


def test_offline_datasets_are_real_and_disjoint():
    d = load_probe_dataset("fortunes_language", train_size=20, test_size=10)
    assert d.classes == list(LANGUAGES) and all(len(d.train[c]) == 10 and len(d.test[c]) == 5 for c in d.classes)
    assert any(ch in "äöüß" for t in d.train["de"] for ch in t) and any("\u0400" <= ch <= "\u04ff" for t in d.train["ru"] for ch in t)
    allt = [t for split in (d.train, d.test) for v in split.values() for t in v]
    assert len(allt) == len(set(allt))  # no text twice, so train and test are disjoint
    cp = load_probe_dataset("python_code_prose", train_size=20, test_size=10)
    assert sum(("(" in t or "=" in t) for t in cp.train["code"]) >= 7
    with pytest.raises(CorpusError, match="fewer than"):
        load_probe_dataset("fortunes_topic", train_size=100_000, test_size=10)
    with pytest.raises(CorpusError, match="unknown probing dataset"):
        load_probe_dataset("nope")


def test_hf_name_reads_a_local_stand_in_with_datasets(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "fancyzhx" / "ag_news"
    folder.mkdir(parents=True)
    for split, n in (("train", 40), ("test", 20)):
        rows = [{"text": f"story {i} about subject {i % 4} " * 4, "label": i % 4} for i in range(n)] + [{"text": "other", "label": 9}]
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{split}.parquet")
    monkeypatch.chdir(tmp_path)
    d = load_probe_dataset("hf:fancyzhx/ag_news", train_size=8, test_size=4)
    assert d.classes == ["0", "1", "2", "3"] and d.source == "hf (local folder)"
    assert all(len(d.train[c]) == 4 and len(d.test[c]) == 2 for c in d.classes)
    assert all(f"subject {c} " in t for c in d.classes for t in d.train[c] + d.test[c])
    with pytest.raises(CorpusError, match="not one of SAEBench"):
        load_probe_dataset("hf:someone/else")


def _two_class_dataset(n_train: int = 30, n_test: int = 20) -> ProbeDataset:
    rng = random.Random(0)
    a = ["apple", "banana", "cherry", "grape", "lemon", "mango", "melon", "peach", "pear", "plum"]
    b = ["river", "mountain", "forest", "desert", "valley", "ocean", "island", "canyon", "meadow", "lake"]
    make = lambda words, n: [" ".join(rng.choice(words) for _ in range(rng.randint(12, 24))) for _ in range(n)]
    return ProbeDataset("planted", {"fruit": make(a, n_train), "place": make(b, n_train)}, {"fruit": make(a, n_test), "place": make(b, n_test)})


def test_planted_latent_on_the_probe_direction_gets_top1_accuracy_one(tiny_model):
    ds = _two_class_dataset()
    texts = ds.train["fruit"] + ds.train["place"]
    x, _ = pooled_activations(tiny_model, [], texts, hook=HOOK, head=None, context_length=32)
    d = x[:30].mean(0) - x[30:].mean(0)  # the probe (difference-of-means) direction on the train set
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.cat([d[None], torch.randn(63, 64, generator=g)]).T)
    basis = q.T.contiguous()
    perm = torch.randperm(64, generator=g)  # put the direction at some index other than 0
    basis = basis[perm]
    where = int((perm == 0).nonzero())
    planted = hand_sae(basis, HOOK, arch="abstopk", k=64)  # exact SAE: every latent a projection
    control = random_topk_sae(64, 128, 4, HOOK, seed=3)
    cfg = SparseProbingConfig(ks=(1, 2, 5), context_length=32, batch_size=16)
    r_plant, r_ctrl = evaluate_sparse_probing([planted, control], tiny_model, cfg, datasets=[ds], progress=False)
    t = r_plant["datasets"]["planted"]["tasks"]["fruit"]
    assert t["top_1_latent"] == where
    assert r_plant["sae_top_1_test_accuracy"] >= 0.95 and r_plant["llm_test_accuracy"] >= 0.95
    assert set(r_plant) >= {"llm_top_1_test_accuracy", "sae_top_5_test_accuracy", "sae_test_accuracy", "datasets"}
    # the dense baseline is shared: both SAEs report the same LLM numbers
    assert r_plant["llm_test_accuracy"] == r_ctrl["llm_test_accuracy"]
    # pooled latents are the pooled code of each token (not the code of the pooled activation)
    _, (lat,) = pooled_activations(tiny_model, [control], texts[:3], hook=HOOK, head=None, context_length=32)
    rows = [[tiny_model.tokenizer.bos_token_id] + tiny_model.tokenizer(t, add_special_tokens=False)["input_ids"][:31] for t in texts[:3]]
    _, cache = tiny_model.run_with_cache(torch.tensor([rows[0]]), names_filter=lambda n: n == HOOK)
    ref = control.encode(cache[HOOK][0, 1:].float()).mean(0)
    assert torch.allclose(lat[0], ref, atol=1e-5)
