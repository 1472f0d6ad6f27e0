"""Several SAEs from one activation stream (``train_many``): same result as alone, one harvest, resume."""

import pytest
import torch
from saebench.trainers.loop import train, train_many

from saebench.activations import HookedSource, SyntheticSource
from saebench.config import ConfigError, TrainConfig, load_sweep
from saebench.sae import SAE
from interrupt_helper import run_cut_short


def _cfg(root, name, **kw):
    base = dict(hook_name="synthetic", method="topk", d_sae=64, k=2, training_tokens=256 * 30, batch_size_tokens=256, lr=4e-3,
                out_dir=str(root / name), lr_warmup_steps=5, dead_window_tokens=1024, checkpoint_every_steps=1000, log_every_steps=5,
                normalize_activations="expected_average_only_in")
    return TrainConfig(**(base | kw))


def _same(a: SAE, b: SAE) -> None:
    for (n, ta), (_, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(ta, tb), n


def test_many_equals_each_alone(tmp_path):
    """Methods and seeds on one hook: each SAE is bit-identical to training it alone with its stored config."""
    src = SyntheticSource(d=16, m=32, n_active=2, seed=0, chunk_tokens=2048)
    cfgs = [_cfg(tmp_path, "a"), _cfg(tmp_path, "b", seed=7), _cfg(tmp_path, "c", method="batchtopk", training_tokens=256 * 20,
                                                                      method_options={"threshold_start_step": 5})]
    many = train_many(cfgs, source=src, progress=False)
    assert [r.steps for r in many] == [30, 30, 20]  # lengths may differ
    stored = many[1].sae.cfg.metadata["train_config"]
    assert stored["seed"] == 7 and stored["data_seed"] == 0  # the shared data order is recorded
    for i, res in enumerate(many):
        alone_cfg = TrainConfig(**(res.sae.cfg.metadata["train_config"] | {"out_dir": str(tmp_path / f"alone{i}")}))
        alone = train(alone_cfg, source=src, progress=False)
        _same(res.sae, alone.sae)
        assert [h["fvu"] for h in res.history] == [h["fvu"] for h in alone.history]
    assert not torch.equal(many[0].sae.W_dec, many[1].sae.W_dec)  # different init seeds really differ


def test_several_hooks_share_one_harvest(tiny_model, tmp_path):
    """Two hook points of the tiny model train from one forward per sequence block."""
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
    tokens = torch.randint(5, 1000, (64, 32))
    src = HookedSource(tiny_model, hooks, tokens, shuffle_buffer_tokens=1024, model_batch_size=16)
    forwards = []
    orig = src._forward
    src._forward = lambda toks: (forwards.append(toks.shape[0]), orig(toks))[1]
    cfgs = [TrainConfig(hook_name=h, model="tiny", d_sae=128, k=4, training_tokens=256 * 12, batch_size_tokens=256, lr_warmup_steps=2,
                        out_dir=str(tmp_path / h.replace(".", "_")), log_every_steps=4) for h in hooks]
    res = train_many(cfgs, source=src, progress=False)
    assert [r.sae.cfg.hook_name for r in res] == hooks and all(r.steps == 12 for r in res)
    # 12 batches of 256 = 3 chunks of 1024 tokens, 2 forwards each; the initialisation's chunk 0 is the stream's first, harvested once
    assert sum(forwards) == 3 * 32
    for r, h in zip(res, hooks):
        loaded = SAE.load(r.out_dir)
        assert loaded.cfg.hook_name == h and loaded.d_in == 64


def test_many_resume_matches_uninterrupted(tmp_path):
    """Runs with different checkpoint intervals and lengths resume to exactly the uninterrupted result."""
    src = SyntheticSource(d=16, m=32, n_active=2, seed=3, chunk_tokens=2048)

    def cfgs(root):
        return [_cfg(root, "a", checkpoint_every_steps=7), _cfg(root, "b", method="batchtopk", seed=2, checkpoint_every_steps=10,
                                                              training_tokens=256 * 24, method_options={"threshold_start_step": 3})]

    full = train_many(cfgs(tmp_path / "full"), source=src, progress=False)

    run_cut_short(lambda: train_many(cfgs(tmp_path / "cut"), source=src, progress=False), src, after=25)  # a checkpointed at 21, b at 20
    resumed = train_many(cfgs(tmp_path / "cut"), source=src, progress=False)
    for f, r in zip(full, resumed):
        _same(f.sae, r.sae)
        assert [h["fvu"] for h in f.history] == [h["fvu"] for h in r.history]


def test_many_config_errors(tmp_path):
    src = SyntheticSource(d=16, m=32, seed=0)
    with pytest.raises(ConfigError, match="batch_size_tokens must agree"):
        train_many([_cfg(tmp_path, "a"), _cfg(tmp_path, "b", batch_size_tokens=128)], source=src, progress=False)
    with pytest.raises(ConfigError, match="distinct out_dir"):
        train_many([_cfg(tmp_path, "a"), _cfg(tmp_path, "a", seed=1)], source=src, progress=False)
    with pytest.raises(ConfigError, match="data_seed=3 .* differs from 0"):
        train_many([_cfg(tmp_path, "a"), _cfg(tmp_path, "b", data_seed=3)], source=src, progress=False)
    with pytest.raises(ConfigError, match="must agree on corpus"):
        train_many([_cfg(tmp_path, "a"), _cfg(tmp_path, "b", corpus="other.txt")], progress=False)
    with pytest.raises(ConfigError, match="hook 'nope' is not provided"):
        train_many([_cfg(tmp_path, "a"), _cfg(tmp_path, "b", hook_name="nope")], source=src, progress=False)


def test_sweep_file_expands_grid_and_sae_list(tmp_path):
    p = tmp_path / "sweep.toml"
    p.write_text(
        '[base]\ntraining_tokens = 100000\nout_dir = "runs/{hook_name}/{method}-k{k}"\n'
        '[grid]\nhook_name = ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]\nk = [16, 32]\n'
        '[[sae]]\nmethod = "topk"\n[[sae]]\nmethod = "batchtopk"\n'
    )
    cfgs = load_sweep(p, batch_size_tokens=2048)
    assert len(cfgs) == 8 and all(c.batch_size_tokens == 2048 for c in cfgs)
    assert cfgs[0].out_dir == "runs/blocks.1.hook_resid_post/topk-k16" and cfgs[-1].out_dir == "runs/blocks.2.hook_resid_post/batchtopk-k32"
    p.write_text('[base]\nk = 8\n[grid]\nseed = [0, 1]\n')
    with pytest.raises(ConfigError, match="same out_dir"):
        load_sweep(p)
    p.write_text('[bse]\nk = 8\n')
    with pytest.raises(ConfigError, match="unknown top-level key"):
        load_sweep(p)


def test_train_and_evaluate_many_from_a_sweep_file(tiny_model, tiny_model_dir, text_file, tmp_path):
    """The API path the CLI uses: a sweep file → one harvest of two hooks → two SAEs, each core-evaluated."""
    from saebench.api import train_and_evaluate_many

    sweep = tmp_path / "sweep.toml"
    sweep.write_text(
        f'[base]\nmodel = "{tiny_model_dir}"\ncorpus = "{text_file}"\ncontext_size = 32\nk = 4\nexpansion_factor = 2\n'
        f'training_tokens = 2048\nbatch_size_tokens = 512\neval_tokens = 512\nlr_warmup_steps = 2\nout_dir = "{tmp_path}/{{hook_name}}-{{method}}"\n'
        '[grid]\nhook_name = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]\n[[sae]]\nmethod = "topk"\n[[sae]]\nmethod = "batchtopk"\n'
    )
    results = train_and_evaluate_many(sweep, model=tiny_model, progress=False)
    assert len(results) == 4
    for (res, metrics), (hook, method) in zip(results, [(h, m) for h in ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")
                                                         for m in ("topk", "batchtopk")]):
        assert res.out_dir.name == f"{hook}-{method}" and res.steps == 4
        assert res.sae.cfg.hook_name == hook and res.sae.cfg.method == method
        assert metrics is not None and metrics["n_tokens"] > 0 and (res.out_dir / "eval_core.json").exists()
