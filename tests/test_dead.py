"""Dead / dense / special-token-only latents: counted by hand, then end to end on a tiny model."""

from __future__ import annotations

import pytest
import torch

from helpers_evals import hand_sae
from saebench.evals.common import special_ids_of
from saebench.evals.dead import DeadLatentCounter, evaluate_dead, main
from saebench.models import make_tiny_model
from saebench.sparse import SparseActs


BOS, EOS = 1, 2


def _stream():
    """10 tokens (BOS … EOS …), 6 latents, written densely as SparseActs with K = 6."""
    ids = torch.tensor([BOS, 10, 11, 12, 13, EOS, 14, 15, 16, 17])
    vals = torch.zeros(10, 6)
    vals[:, 0] = 1.0  # fires everywhere
    vals[8, 1] = 2.0  # fires once, late: 7th non-special token (index 6)
    # latent 2 never fires
    vals[0, 3] = vals[5, 3] = 0.7  # only on BOS and EOS: special-token-only
    vals[0, 4] = vals[2, 4] = 0.3  # on BOS and on a normal token: alive
    vals[3, 5] = vals[9, 5] = -0.5  # signed: negative values are firings too
    acts = SparseActs(vals, torch.arange(6).expand(10, 6).clone())
    return ids, acts


def test_counter_by_hand_across_batches():
    ids, acts = _stream()
    c = DeadLatentCounter(6, windows=(4, 8, 100))
    special = torch.isin(ids, torch.tensor([0, BOS, EOS]))
    for sl in (slice(0, 5), slice(5, 10)):  # two batches: the stream order must carry over
        c.update(SparseActs(acts.values[sl], acts.indices[sl]), ids[sl], special[sl])
    r = c.result()
    assert r["n_tokens"] == 8 and r["n_special_tokens"] == 2
    assert r["dead_fraction"] == pytest.approx(2 / 6) and r["dead_window_tokens"] == 8  # latents 2 and 3
    assert r["frac_alive"] == pytest.approx(4 / 6) and r["n_dead"] == 2
    # first 4 non-special tokens: latents 0, 4 (2nd token), 5 (3rd) fired; 1 only fires at the 7th
    assert r["dead_fraction_by_window"] == {"4": pytest.approx(3 / 6), "8": pytest.approx(2 / 6)}
    assert r["windows_unavailable"] == [100]
    # densities 1, 1/8, 1/8, 2/8 for latents 0, 1, 4, 5
    assert r["dense_fraction_1pct"] == pytest.approx(4 / 6) and r["dense_fraction_10pct"] == pytest.approx(4 / 6)
    assert r["dense_mass_10pct"] == pytest.approx(1.0)
    assert r["max_density"] == 1.0
    assert r["special_only_latents"] == [3] and r["n_special_only"] == 1
    assert r["special_only_fraction"] == pytest.approx(1 / 6)
    assert r["special_only_by_token"] == {f"{BOS}:{BOS}": 1, f"{EOS}:{EOS}": 1}
    assert sum(r["log10_density_histogram"]["counts"]) == 4  # live latents only


def test_counter_rejects_empty_stream():
    with pytest.raises(ValueError, match="no non-special tokens"):
        DeadLatentCounter(3).result()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny_dead"))


def _embed_sae(model):
    """At hook_embed: latent 0 fires only on BOS, 1 always, 2 never, 3 on roughly half the tokens."""
    e_bos = model.W_E[BOS].detach().float()
    g = torch.Generator().manual_seed(0)
    w = torch.stack([e_bos / e_bos.norm(), torch.zeros_like(e_bos), torch.zeros_like(e_bos), torch.randn(e_bos.numel(), generator=g)])
    w[3] /= w[3].norm()
    b = torch.tensor([-0.9 * e_bos.norm().item(), 1.0, -1.0, 0.0])
    dec = torch.randn(4, e_bos.numel(), generator=g)
    return hand_sae(dec / dec.norm(dim=1, keepdim=True), "hook_embed", W_enc=w.T, b_enc=b)


def test_evaluate_dead_end_to_end_finds_the_bos_only_latent(tiny):
    sae = _embed_sae(tiny)
    toks = torch.randint(3, 20_000, (6, 16), generator=torch.Generator().manual_seed(0))
    toks[:, 0] = BOS
    toks[2, 7] = EOS
    r = evaluate_dead(sae, tiny, toks, special_ids=special_ids_of(tiny.tokenizer), windows=(20, 1_000_000), batch_size=4, progress=False)
    assert r["n_tokens"] == 6 * 16 - 7 and r["n_special_tokens"] == 7
    assert r["special_only_latents"] == [0]
    assert r["dead_fraction"] == pytest.approx(0.5)  # latent 2, and latent 0 never fires on a normal token
    assert r["dead_fraction_by_window"]["20"] >= r["dead_fraction"]
    assert r["windows_unavailable"] == [1_000_000]
    assert r["dense_fraction_10pct"] >= 0.25 and r["max_density"] == 1.0  # latent 1


def test_dead_cli_writes_json(tmp_path, tiny, monkeypatch):
    sae = _embed_sae(tiny)
    sae.save(tmp_path / "sae")
    toks = torch.randint(3, 20_000, (4, 16), generator=torch.Generator().manual_seed(1))
    toks[:, 0] = BOS
    monkeypatch.setattr("saebench.models.load_model", lambda *a, **k: tiny)
    monkeypatch.setattr("saebench.evals.common.load_eval_tokens", lambda *a, **k: toks)
    res = main([str(tmp_path / "sae"), "--eval-tokens", "64", "--context-size", "16", "--no-progress", "--windows", "10"])
    assert (tmp_path / "sae" / "eval_dead.json").exists()
    assert res["dead_window_tokens"] == 60 and "10" in res["dead_fraction_by_window"]
