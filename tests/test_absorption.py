"""Feature absorption: a planted absorbing latent is found (and only it), the k-sparse split rule, the L1
probe, and the prompt/position pipeline on the tiny model."""

from __future__ import annotations

import torch
from helpers_evals import hand_sae
from saebench.evals.absorption import (
    LETTERS,
    AbsorptionConfig,
    absorption_for_sae,
    alpha_vocab,
    evaluate_absorption,
    ground_truth_probes,
    icl_prompt,
    l1_multi_probe,
)

HOOK = "blocks.0.hook_resid_post"
D = 16


def _words(g, letter: int, n: int, n_special: int) -> torch.Tensor:
    x = torch.zeros(n, D)
    x[:, 4:] = 0.3 * torch.randn(n, D - 4, generator=g)  # noise only in dims the letter latents do not read
    x[:, letter] = 3.0
    x[:n_special, 3] = 3.0  # "special" words (say, one token family) carry an extra direction e3
    return x


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x_tr = torch.cat([_words(g, 0, 100, 3), _words(g, 1, 100, 0), _words(g, 2, 100, 0)])
    x_te = torch.cat([_words(g, 0, 100, 2), _words(g, 1, 100, 0), _words(g, 2, 100, 0)])
    y = torch.arange(3).repeat_interleave(100)
    words_te = [f"{LETTERS[i // 100]}word{i}" for i in range(300)]
    return x_tr, y, x_te, y.clone(), words_te


def _sae(absorbing: bool):
    E = torch.eye(D)
    W_enc, W_dec, b_enc = E.clone(), E.clone(), torch.zeros(D)
    if absorbing:
        W_enc[:, 0] = E[0] - 2 * E[3]  # the main "starts with a" latent is switched off on the special words ...
        W_enc[:, 3] = 2 * E[3]  # ... and latent 3 fires on them instead,
        b_enc[3] = -1.0
        W_dec[3] = (E[0] + E[3]) / 2**0.5  # writing the "a" direction along with its own
    return hand_sae(W_dec, HOOK, arch="relu", W_enc=W_enc, b_enc=b_enc)


def test_planted_absorbing_latent_is_found():
    x_tr, y_tr, x_te, y_te, words = _data()
    cfg = AbsorptionConfig(min_letters=1)
    probes = ground_truth_probes(x_tr, y_tr, x_te, y_te, [0, 1, 2])
    assert all(p["f1_probe"] == 1.0 for p in probes.values())
    r = absorption_for_sae(_sae(True), x_tr, y_tr, x_te, y_te, words, probes, cfg)
    a = r["letters"]["a"]
    assert a["split_feats"] == [0] and a["num_probe_true_positives"] == 100
    assert a["k_sparse_f1"][0] < 1.0 and a["k_sparse_f1"][0] > 0.97  # the absorber's 2% gain is below the 0.03 jump
    assert [(w["word"], w["absorbing_latent"]) for w in a["absorbed_words"]] == [("aword0", 3), ("aword1", 3)]
    assert a["full_absorption_rate"] == 0.02 and a["mean_absorption_fraction"] == 0.02
    for other in ("b", "c"):
        assert r["letters"][other]["full_absorption_rate"] == 0 and r["letters"][other]["mean_absorption_fraction"] == 0
    assert abs(r["mean_full_absorption_score"] - 0.02 / 3) < 1e-12 and r["enough_letters"] and r["n_usable_letters"] == 3
    clean = absorption_for_sae(_sae(False), x_tr, y_tr, x_te, y_te, words, probes, cfg)
    assert clean["mean_full_absorption_score"] == 0 and clean["mean_absorption_fraction_score"] == 0
    assert not absorption_for_sae(_sae(False), x_tr, y_tr, x_te, y_te, words, probes, AbsorptionConfig())["enough_letters"]  # 3 < 20


def test_l1_probe_picks_the_predictive_feature_and_zeroes_noise():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(400, 30, generator=g)
    y = torch.randint(0, 3, (400,), generator=g)
    x[:, 7] += 2.0 * (y == 1)
    x[:, 21] += 2.0 * (y == 2)
    W = l1_multi_probe(x.to_sparse(), y, [1, 2], l1=0.01, iters=800)
    assert int(W[:, 0].argmax()) == 7 and int(W[:, 1].argmax()) == 21
    assert (W[:, 0] != 0).sum() < 10  # the L1 term makes it sparse


def test_prompts_and_word_positions_on_the_tiny_model(tiny_model):
    tok = tiny_model.tokenizer
    vocab = alpha_vocab(tok)
    assert len(vocab) > 40_000 and all(w.strip().isalpha() and w.strip().isascii() for w, _ in vocab[:500])
    import random

    p = icl_prompt(" cat", [" dog", " apple", "Zebra"], random.Random(0), AbsorptionConfig(n_icl=2))
    assert p.startswith("\n") and p.endswith("\n cat has the first letter:") and p.count("has the first letter:") == 3
    assert " cat" not in p[: -len(" cat has the first letter:")]
    r = evaluate_absorption(hand_sae(torch.eye(64), HOOK, arch="relu"), tiny_model, AbsorptionConfig(max_words=120, min_letters=1),
                            progress=False)
    assert r["n_words"] >= 100 and r["n_words"] + r["n_dropped_prompts"] == 120  # most words are one token after "\n"
    assert set(r["letters"]) <= set(LETTERS) and all(0 <= v["f1_probe"] <= 1 for v in r["letters"].values())
