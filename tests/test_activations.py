"""Activation sources: hooked harvesting, the disk cache and the shuffled batch stream."""

import pytest
import torch

from saebench.activations import Batch, CachedSource, HookedSource, Position, SyntheticSource, stop_layer_for, write_cache
from saebench.io import ArtifactError

SPECIAL = torch.tensor([0, 1, 2])


def _tokens(n_seq=6, ctx=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(3, 5000, (n_seq, ctx), generator=g)
    t[:, 0] = 1  # BOS
    t[2, 7] = 2  # an EOS inside a row
    return t


def test_several_hooks_in_one_forward_match_a_full_cache(tiny_model):
    hooks = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "blocks.1.attn.hook_z:2", "blocks.0.hook_mlp_out"]
    toks = _tokens()
    src = HookedSource(tiny_model, hooks, toks, special_ids=SPECIAL, shuffle_buffer_tokens=64, model_batch_size=2)
    assert src.stop_at_layer == 2
    assert src.d_in == {"blocks.0.hook_resid_post": 64, "blocks.1.attn.hook_z": 64, "blocks.1.attn.hook_z:2": 16, "blocks.0.hook_mlp_out": 64}
    chunk = src.chunk(0)  # rows 0..3 (64 tokens / 16)
    _, cache = tiny_model.run_with_cache(toks[:4])
    keep = ~torch.isin(toks[:4].flatten(), SPECIAL)
    assert len(chunk) == int(keep.sum()) == 4 * 16 - 4 - 1
    torch.testing.assert_close(chunk.acts["blocks.0.hook_resid_post"], cache["blocks.0.hook_resid_post"].flatten(0, 1)[keep])
    z = cache["blocks.1.attn.hook_z"]
    torch.testing.assert_close(chunk.acts["blocks.1.attn.hook_z"], z.flatten(2).flatten(0, 1)[keep])
    torch.testing.assert_close(chunk.acts["blocks.1.attn.hook_z:2"], z[:, :, 2].flatten(0, 1)[keep])
    assert torch.equal(chunk.token_ids, toks[:4].flatten()[keep])


def test_training_harvests_the_first_chunk_once(tiny_model, tmp_path):
    """The initialisation sample and the stream's first chunk (and g-SAE's gradient check) share one harvest."""
    from saebench.config import TrainConfig
    from saebench.trainers.loop import train

    hook = "blocks.0.hook_resid_post"
    src = HookedSource(tiny_model, [hook], _tokens(n_seq=8), special_ids=SPECIAL, shuffle_buffer_tokens=256, with_grads=True)
    harvested = []
    real = src._harvest
    src._harvest = lambda i: harvested.append(i) or real(i)
    assert src.n_chunks == 1
    cfg = TrainConfig(method="gsae", hook_name=hook, d_sae=32, k=2, batch_size_tokens=32, training_tokens=64, out_dir=str(tmp_path),
                      normalize_activations="none", checkpoint_every_steps=10**6)
    train(cfg, source=src, model=tiny_model, progress=False)
    assert harvested == [0]
    again = src.chunk(0)
    assert src.chunk(0) is again and harvested == [0]


def test_stop_layer_runs_no_further_than_needed():
    assert stop_layer_for(["blocks.3.hook_resid_post", "blocks.0.hook_mlp_out"]) == 4
    assert stop_layer_for(["hook_embed"]) == 1
    assert stop_layer_for(["ln_final.hook_normalized"]) is None


def test_outlier_tokens_are_masked(tiny_model):
    toks = _tokens(n_seq=4)
    hook = "blocks.0.hook_resid_post"
    plain = HookedSource(tiny_model, [hook], toks, special_ids=SPECIAL, shuffle_buffer_tokens=64).chunk(0)
    norms = plain.acts[hook].norm(dim=-1)
    factor = float((norms.max() / norms.median()) * 0.99)  # the largest-norm token(s) become outliers
    expected_dropped = int((norms > factor * norms.median()).sum())
    masked = HookedSource(tiny_model, [hook], toks, special_ids=SPECIAL, shuffle_buffer_tokens=64, outlier_norm_factor=factor).chunk(0)
    assert expected_dropped >= 1 and len(masked) == len(plain) - expected_dropped
    assert masked.acts[hook].norm(dim=-1).max() <= factor * norms.median()


def test_cache_round_trip_keeps_tokens_and_order(tiny_model, tmp_path):
    toks = _tokens(n_seq=8)
    src = HookedSource(tiny_model, ["blocks.1.hook_resid_post"], toks, special_ids=SPECIAL, shuffle_buffer_tokens=32)
    cache = write_cache(src, tmp_path / "c", progress=False)
    assert cache.n_chunks == src.n_chunks == 4
    for i in range(4):
        a, b = src.chunk(i), cache.chunk(i)
        assert torch.equal(a.acts["blocks.1.hook_resid_post"], b.acts["blocks.1.hook_resid_post"]) and torch.equal(a.token_ids, b.token_ids)
    # a cache for a different run is refused rather than mixed in
    other = HookedSource(tiny_model, ["blocks.0.hook_resid_post"], toks, special_ids=SPECIAL, shuffle_buffer_tokens=32)
    with pytest.raises(ArtifactError, match="written for a different run"):
        write_cache(other, tmp_path / "c", progress=False)


def test_batch_stream_is_a_function_of_position():
    src = SyntheticSource(d=8, m=16, chunk_tokens=1000, seed=1)
    stream = src.batches(128, seed=5)
    items = [next(stream) for _ in range(20)]
    assert items[6][1] == Position(0, 7) and items[7][1] == Position(1, 1)  # 1000 // 128 = 7 batches per chunk
    restarted = src.batches(128, seed=5, start=items[9][1])
    b, pos = next(restarted)
    assert torch.equal(b.acts["synthetic"], items[10][0].acts["synthetic"]) and pos == items[10][1]
    # every token of a chunk appears at most once per epoch (a shuffle, not sampling with replacement)
    seen = torch.cat([it[0].acts["synthetic"] for it in items[:7]])
    assert torch.unique(seen, dim=0).shape[0] == seen.shape[0]


def test_cached_epochs_reshuffle_shard_order(tmp_path):
    src = SyntheticSource(d=8, m=16, chunk_tokens=256, seed=2)
    cache = write_cache(src, tmp_path / "c", n_chunks=6, progress=False)
    assert cache.chunk_order(0, seed=0) == list(range(6))
    assert sorted(cache.chunk_order(1, seed=0)) == list(range(6)) and cache.chunk_order(1, seed=0) != list(range(6))
