"""The TopK trainer on planted features: recovery, AuxK, resume, and its error paths."""

import math

import pytest
import torch

from saebench.activations import Batch, SyntheticSource
from saebench.activations import recovery as planted_recovery
from saebench.config import ConfigError, TrainConfig, build_config, load_config
from saebench.sae import SAE
from saebench.trainers.loop import NonFiniteError, lr_factor, train
from interrupt_helper import run_cut_short


def _cfg(tmp_path, **kw):
    base = dict(hook_name="synthetic", method="topk", d_sae=128, k=3, training_tokens=512 * 800, batch_size_tokens=512, lr=4e-3,
                out_dir=str(tmp_path / "run"), lr_warmup_steps=20, dead_window_tokens=20_000, checkpoint_every_steps=10_000,
                normalize_activations="none", log_every_steps=50)
    base.update(kw)
    return TrainConfig(**base)


def recovery(features: torch.Tensor, sae: SAE, signed: bool = False) -> float:
    """Fraction of planted features whose best decoder row has cos >= 0.9 (|cos| if signed): the library's rule."""
    return planted_recovery(sae.W_dec, features, signed)


def test_topk_recovers_planted_features(tmp_path):
    src = SyntheticSource(d=32, m=64, n_active=3, seed=0)
    res = train(_cfg(tmp_path), source=src, progress=False)
    assert recovery(src.features, res.sae) >= 0.9
    assert res.history[-1]["l0"] == pytest.approx(3.0)
    assert res.history[-1]["fvu"] < 0.15
    torch.testing.assert_close(res.sae.W_dec.norm(dim=-1), torch.ones(128))
    # the artifact on disk is the same SAE
    loaded = SAE.load(res.out_dir)
    x = src.chunk(99).acts["synthetic"][:64]
    assert torch.equal(loaded(x), res.sae(x))
    assert loaded.cfg.metadata["training_tokens"] == 512 * 800


def _dead_after(tmp_path, coef, bias=-1.0):
    """Train with a block of latents forced dead at init; return how many stay dead (never fire)."""
    src = SyntheticSource(d=32, m=64, n_active=3, seed=1)
    from saebench.trainers.topk import TopK

    class ForcedDead(TopK):
        name = "topk_forced_dead_test"

        def init_sae(self, sae, sample, generator):
            super().init_sae(sae, sample, generator)
            with torch.no_grad():
                sae.b_enc[:32] = bias  # these 32 latents lose every top-k contest at init

    from saebench.trainers.base import METHODS

    METHODS[ForcedDead.name] = ForcedDead
    try:
        cfg = _cfg(tmp_path / str(coef), method=ForcedDead.name, d_sae=64, training_tokens=512 * 300, dead_window_tokens=2048,
                   method_options={"auxk_coef": coef})
        res = train(cfg, source=src, progress=False)
    finally:
        METHODS.pop(ForcedDead.name)
    x = torch.cat([src.chunk(50 + i).acts["synthetic"] for i in range(2)])
    fired = torch.zeros(64, dtype=torch.bool)
    acts = res.sae.encode_sparse(x)
    fired[acts.indices[acts.values != 0]] = True
    return int((~fired[:32]).sum())


def test_auxk_revives_dead_latents_and_only_when_enabled(tmp_path):
    dead_without = _dead_after(tmp_path, 0.0)
    dead_with = _dead_after(tmp_path, 1 / 32)
    assert dead_without >= 24  # forced-dead latents mostly stay dead without AuxK
    assert dead_with <= 4  # AuxK brings them back


def test_resume_matches_uninterrupted_run(tmp_path):
    src = SyntheticSource(d=16, m=32, n_active=2, seed=3, chunk_tokens=4096)
    common = dict(d_sae=64, k=2, training_tokens=256 * 60, batch_size_tokens=256, checkpoint_every_steps=10, dead_window_tokens=1024,
                  normalize_activations="expected_average_only_in")
    full = train(_cfg(tmp_path, out_dir=str(tmp_path / "full"), **common), source=src, progress=False)

    cut = _cfg(tmp_path, out_dir=str(tmp_path / "cut"), **common)
    # Stop the stream after 35 batches: checkpoints at steps 10, 20, 30 exist.
    run_cut_short(lambda: train(cut, source=src, progress=False), src, after=35)
    resumed = train(cut, source=src, progress=False)
    for (n, a), (_, b) in zip(full.sae.state_dict().items(), resumed.sae.state_dict().items()):
        assert torch.equal(a, b), n
    assert [h["fvu"] for h in full.history] == [h["fvu"] for h in resumed.history]


def test_nan_activations_stop_with_report_and_keep_checkpoint(tmp_path):
    src = SyntheticSource(d=16, m=32, n_active=2, seed=4, chunk_tokens=2048)
    orig_chunk = src.chunk

    def poisoned(i):
        b = orig_chunk(i)
        if i >= 2:
            b.acts["synthetic"][5, 3] = math.nan
        return b

    src.chunk = poisoned
    cfg = _cfg(tmp_path, d_sae=64, k=2, training_tokens=256 * 40, batch_size_tokens=256, checkpoint_every_steps=5)
    with pytest.raises(NonFiniteError, match=r"step \d+, hook synthetic: NaN/inf in activations .*1 of \d+ values non-finite") as err:
        train(cfg, source=src, progress=False)
    from saebench.trainers.checkpoint import load_checkpoint

    failed_at = int(str(err.value).split()[1].rstrip(","))
    assert failed_at >= 16  # chunks 0 and 1 (8 batches each) are clean
    tensors, meta = load_checkpoint(tmp_path / "run")
    assert meta["step"] == failed_at // 5 * 5 and torch.isfinite(tensors["sae.W_dec"]).all()  # the last checkpoint before it
    # with on_nonfinite=skip the run completes and reports the skipped steps
    res = train(cfg.model_copy(update={"on_nonfinite": "skip", "out_dir": str(tmp_path / "skip")}), source=src, progress=False)
    assert res.sae.cfg.metadata["skipped_steps"] > 0 and torch.isfinite(res.sae.W_dec).all()


def test_lr_schedule_shape():
    f = [lr_factor(s, 100, 10, 0.2) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[50] == 1.0 and f[80] == 1.0
    assert f[99] == pytest.approx(0.05) and all(a >= b for a, b in zip(f[80:], f[81:]))


def test_config_unknown_key_suggests_close_match(tmp_path):
    with pytest.raises(ConfigError, match="'trainig_tokens' \\(did you mean 'training_tokens'\\?\\)"):
        build_config(TrainConfig, {"trainig_tokens": 10})
    p = tmp_path / "c.toml"
    p.write_text('k = "lots"\n')
    with pytest.raises(ConfigError, match="k: Input should be a valid integer"):
        load_config(TrainConfig, p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(TrainConfig, tmp_path / "missing.toml")


def test_unknown_method_and_bad_method_option(tmp_path):
    from saebench.trainers import get_method

    with pytest.raises(ConfigError, match="unknown method 'topq'; available: .*topk"):
        get_method("topq")
    with pytest.raises(ConfigError, match="known options: auxk_coef, k_aux"):
        get_method("topk")(_cfg(tmp_path, method_options={"auxk": 1}))


def test_resume_refuses_a_different_run(tmp_path):
    src = SyntheticSource(d=16, m=32, n_active=2, seed=3, chunk_tokens=2048)
    cfg = _cfg(tmp_path, d_sae=64, k=2, training_tokens=256 * 12, batch_size_tokens=256, checkpoint_every_steps=5)
    orig = src.batches

    def dying(*a, **kw):
        for i, item in enumerate(orig(*a, **kw)):
            if i == 7:
                raise KeyboardInterrupt
            yield item

    src.batches = dying
    with pytest.raises(KeyboardInterrupt):
        train(cfg, source=src, progress=False)
    src.batches = orig
    with pytest.raises(ConfigError, match="fields differ: k"):
        train(cfg.model_copy(update={"k": 3}), source=src, progress=False)


def test_wandb_logging_uses_saelens_keys(tmp_path, monkeypatch):
    """wandb is optional and off by default; when on, keys follow SAELens conventions."""
    import sys
    import types

    logged, inits = [], []

    class Run:
        def log(self, data, step):
            logged.append((step, data))

        def finish(self):
            pass

    fake = types.SimpleNamespace(init=lambda **kw: inits.append(kw) or Run(), Histogram=lambda values: ("hist", len(values)))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    src = SyntheticSource(d=16, m=32, n_active=2, seed=3, chunk_tokens=2048)
    cfg = _cfg(tmp_path, d_sae=64, k=2, training_tokens=256 * 20, batch_size_tokens=256, log_every_steps=1, wandb=True, wandb_project="p")
    train(cfg, source=src, progress=False)
    assert inits and inits[0]["project"] == "p"
    keys = set().union(*(d.keys() for _, d in logged))
    assert {"losses/mse_loss", "losses/overall_loss", "metrics/l0", "metrics/explained_variance", "sparsity/dead_features",
            "details/current_learning_rate", "plots/feature_density_line_chart"} <= keys
    # off by default: no wandb import needed at all
    logged.clear()
    train(cfg.model_copy(update={"wandb": False, "out_dir": str(tmp_path / "off")}), source=src, progress=False)
    assert not logged


def test_firing_counts_match_the_dense_codes_for_padded_and_all_latent_rows():
    """The loop's dead-latent tracking counts a latent once per token it fires on: padding (value 0 at latent 0) and
    the all-latents rows of a dense code (sparse.all_latents) count exactly as the dense [B, n] code does."""
    from types import SimpleNamespace

    from saebench import sparse
    from saebench.sparse import SparseActs
    from saebench.trainers.loop import _count_firing

    g = torch.Generator().manual_seed(0)
    B, n = 32, 20
    dense = torch.relu(torch.randn(B, n, generator=g)) * (torch.rand(B, n, generator=g) < 0.3)
    idx, valid = sparse.mask_to_indices(dense != 0)  # padded rows, padding at latent 0
    padded = SparseActs(dense.gather(1, idx) * valid, idx)
    full = SparseActs(dense, sparse.all_latents(B, n, "cpu"))
    want = (dense != 0).sum(0)
    for acts in (padded, full):
        r = SimpleNamespace(fire_counts=torch.zeros(n, dtype=torch.long), since_fired=torch.full((n,), 7, dtype=torch.long))
        _count_firing(r, SimpleNamespace(acts=acts), B)
        assert torch.equal(r.fire_counts, want)
        assert torch.equal(r.since_fired, torch.where(want > 0, 0, 7 + B))
