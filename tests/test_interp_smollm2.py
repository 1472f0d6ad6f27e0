"""Sparse probing and absorption on the real SmolLM2-135M (slow): the offline language task is easy for the
model's residual stream, and an exact SAE (an orthonormal basis containing the dense probe's mean-difference
direction) carries it in one latent; the absorption pipeline keeps real single-token words."""

import pytest
import torch

pytestmark = pytest.mark.slow

HOOK = "blocks.6.hook_resid_post"


def test_probing_and_absorption_on_smollm2():
    from helpers_evals import orthonormal_sae
    from saebench.evals.absorption import AbsorptionConfig, evaluate_absorption
    from saebench.evals.probe_datasets import load_probe_dataset
    from saebench.evals.sparse_probing import SparseProbingConfig, evaluate_sparse_probing, pooled_activations

    from saebench.models import load_model

    model = load_model()
    ds = load_probe_dataset("fortunes_language", train_size=24, test_size=12)
    en = ds.train["en"]
    other = [t for c in ds.classes if c != "en" for t in ds.train[c]]
    x, _ = pooled_activations(model, [], en + other, hook=HOOK, head=None, context_length=64)
    d = x[: len(en)].mean(0) - x[len(en) :].mean(0)
    sae = orthonormal_sae(d, HOOK)
    r = evaluate_sparse_probing(sae, model, SparseProbingConfig(ks=(1, 5), context_length=64), datasets=[ds], progress=False)
    assert r["llm_test_accuracy"] >= 0.9
    en_task = r["datasets"]["fortunes_language"]["tasks"]["en"]
    assert en_task["top_1_latent"] == 0 and en_task["sae_top_1_test_accuracy"] >= 0.8
    ab = evaluate_absorption(orthonormal_sae(torch.randn(576), HOOK), model, AbsorptionConfig(max_words=150, min_letters=1), progress=False)
    assert ab["n_words"] >= 140 and ab["n_vocab_alpha_tokens"] > 40_000
