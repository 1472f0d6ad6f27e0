"""Transcoders and skip-transcoders (issue #18.7): planted sparse maps, the SAELens transcoder layout, the splice eval."""

import json

import pytest
import torch
import torch.nn.functional as F
from saebench.trainers.loop import train
from safetensors.torch import load_file, save_file

from saebench.config import ConfigError, TrainConfig
from saebench.pairs import PlantedPairSource, recovery
from saebench.sae import SAE, SAEConfig, load_sae
from interrupt_helper import run_cut_short


def cfg(tmp_path, name, steps, **kw):
    base = dict(hook_name="in", target_hook="out", method="topk", d_sae=128, k=3, training_tokens=steps * 1024, batch_size_tokens=1024,
                out_dir=str(tmp_path / name), resume=False, eval_tokens=0, checkpoint_every_steps=100_000, dead_window_tokens=20_000)
    return TrainConfig(**(base | kw))


def raw_fvu(sae, src, chunk=99):
    b = src.chunk(chunk)
    x, y = b.acts["in"], b.acts["out"]
    with torch.no_grad():
        y_hat = sae(x)
    return float((y - y_hat).square().sum() / (y - y.mean(0)).square().sum())


def test_topk_transcoder_recovers_a_planted_sparse_map_between_widths(tmp_path):
    src = PlantedPairSource(d_in=32, d_out=24, m=64, n_active=3, seed=1)
    r = train(cfg(tmp_path, "tc", 600), source=src, progress=False)
    sae = load_sae(r.out_dir)  # the saved artifact, scales folded in: raw x -> raw y
    assert sae.W_dec.shape == (128, 24) and sae.W_enc.shape == (32, 128) and sae.cfg.d_out == 24
    assert recovery(sae.W_dec, src.out_features) >= 0.9
    fvu = raw_fvu(sae, src)
    assert fvu < 0.15 and abs(fvu - r.history[-1]["fvu"]) < 0.02  # the folded artifact predicts what training measured


def test_skip_transcoder_recovers_the_sparse_map_and_the_linear_skip(tmp_path):
    # y = D c + W* x with dense noise in x: only W_skip = W* can carry W* n (see saebench.pairs)
    src = PlantedPairSource(d_in=32, d_out=24, m=64, n_active=3, skip_rank=16, skip_scale=2.0, noise=1.0, seed=1)
    skip = load_sae(train(cfg(tmp_path, "skip", 1200, skip_transcoder=True), source=src, progress=False).out_dir)
    assert recovery(skip.W_dec, src.out_features) >= 0.9
    assert float((skip.W_skip - src.W_skip).norm() / src.W_skip.norm()) < 0.3
    plain = load_sae(train(cfg(tmp_path, "plain", 600), source=src, progress=False).out_dir)
    assert raw_fvu(skip, src) < 0.1 and raw_fvu(plain, src) > 0.2  # without the skip term the linear part is left over


@pytest.mark.parametrize("method,skip,arch", [("topk", False, "topk_transcoder"), ("topk", True, "topk_skip_transcoder"),
                                              ("standard", False, "transcoder"), ("standard", True, "skip_transcoder"),
                                              ("jumprelu", True, "jumprelu_skip_transcoder"), ("batchtopk", False, "jumprelu_transcoder")])
def test_artifacts_in_saelens_transcoder_layout(tmp_path, method, skip, arch):
    src = PlantedPairSource(d_in=16, d_out=12, m=32, n_active=2, skip_rank=4 if skip else 0, chunk_tokens=2048, seed=2)
    r = train(cfg(tmp_path, "a", 20, method=method, skip_transcoder=skip, d_sae=48, k=2, batch_size_tokens=256,
                  training_tokens=20 * 256), source=src, progress=False)
    raw = json.loads((r.out_dir / "cfg.json").read_text())
    assert raw["architecture"] == arch and raw["d_in"] == 16 and raw["d_out"] == 12 and raw["d_sae"] == 48
    assert raw["hook_name"] == "in" and raw["hook_name_out"] == "out" and raw["apply_b_dec_to_input"] is False
    t = load_file(str(r.out_dir / "sae_weights.safetensors"))
    assert t["W_enc"].shape == (16, 48) and t["W_dec"].shape == (48, 12) and t["b_dec"].shape == (12,)
    assert ("W_skip" in t) == skip and (not skip or t["W_skip"].shape == (12, 16))
    back = load_sae(r.out_dir)
    x = src.chunk(5).acts["in"][:64]
    torch.testing.assert_close(back(x), r.sae(x))
    assert back.cfg.architecture == r.sae.cfg.architecture and back.cfg.skip_connection == r.sae.cfg.skip_connection


def test_a_saelens_skip_transcoder_folder_loads_and_computes_saelens_function(tmp_path):
    g = torch.Generator().manual_seed(0)
    d_in, d_sae, d_out = 8, 20, 6
    W_enc, b_enc = torch.randn(d_in, d_sae, generator=g), torch.randn(d_sae, generator=g) * 0.3
    W_dec, b_dec, W_skip = torch.randn(d_sae, d_out, generator=g), torch.randn(d_out, generator=g), torch.randn(d_out, d_in, generator=g)
    save_file({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "W_skip": W_skip}, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "skip_transcoder", "d_in": d_in, "d_sae": d_sae, "d_out": d_out,
                                                   "apply_b_dec_to_input": False, "dtype": "float32", "metadata": {
                                                       "hook_name": "blocks.1.ln2.hook_normalized", "hook_name_out": "blocks.1.hook_mlp_out"}}))
    sae = load_sae(tmp_path)
    assert sae.cfg.hook_name_out == "blocks.1.hook_mlp_out" and sae.cfg.hook_layer_out == 1 and sae.cfg.skip_connection
    x = torch.randn(16, d_in, generator=g)
    want = F.relu(x @ W_enc + b_enc) @ W_dec + b_dec + x @ W_skip.T  # SAELens' SkipTranscoder.forward
    torch.testing.assert_close(sae(x), want, atol=1e-5, rtol=1e-5)


def test_transcoder_configs_that_cannot_work_are_refused(tmp_path):
    with pytest.raises(ValueError, match="skip_transcoder=true needs target_hook"):
        TrainConfig(skip_transcoder=True)
    with pytest.raises(ValueError, match="target_hook equals hook_name"):
        TrainConfig(hook_name="blocks.1.hook_mlp_out", target_hook="blocks.1.hook_mlp_out")
    src = PlantedPairSource(d_in=16, d_out=12, m=32, chunk_tokens=2048)
    with pytest.raises(ConfigError, match="cannot train a transcoder"):
        train(cfg(tmp_path, "m", 4, method="matryoshka_batchtopk", batch_size_tokens=256, training_tokens=1024), source=src, progress=False)
    with pytest.raises(ConfigError, match="target_hook 'nowhere'"):
        train(cfg(tmp_path, "n", 4, target_hook="nowhere", batch_size_tokens=256, training_tokens=1024), source=src, progress=False)
    with pytest.raises(ValueError, match="apply_b_dec_to_input"):
        SAE(SAEConfig(architecture="topk", k=2, d_in=4, d_sae=8, d_out=3))


def test_transcoder_trains_from_one_harvest_and_is_evaluated_spliced_at_its_target(tiny_model, text_file, tmp_path):
    from saebench.evals.core import evaluate_core

    from saebench.text import load_tokens, special_ids

    c = TrainConfig(model="tiny", corpus=str(text_file), hook_name="blocks.1.ln2.hook_normalized", target_hook="blocks.1.hook_mlp_out",
                    skip_transcoder=True, k=8, expansion_factor=2, training_tokens=4096, batch_size_tokens=512, context_size=32,
                    shuffle_buffer_tokens=2048, lr=3e-3, lr_warmup_steps=1, eval_tokens=0, out_dir=str(tmp_path / "tc"))
    r = train(c, model=tiny_model, progress=False)
    sae = load_sae(r.out_dir)
    assert sae.cfg.hook_name == "blocks.1.ln2.hook_normalized" and sae.cfg.hook_name_out == "blocks.1.hook_mlp_out" and sae.cfg.hook_layer_out == 1
    tokens = load_tokens(str(text_file), tiny_model.tokenizer, 32, 512, split="eval")
    special = special_ids(tiny_model.tokenizer)
    m = evaluate_core(sae, tiny_model, tokens, special_ids=special, batch_size=8, progress=False)
    assert m["hook_name_out"] == "blocks.1.hook_mlp_out" and 0 <= m["fvu"] < 1 and m["l0"] <= 8
    # the zero ablation is of the target hook (the MLP's output), at every position, as for SAEs
    from saebench.evals.core import ce_from_logprobs, splice_hook

    every = torch.ones(tokens.shape, dtype=torch.bool)
    lp = F.log_softmax(tiny_model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_mlp_out", splice_hook(None, None, every))]).float(), -1)
    keep = ~torch.isin(tokens, special)
    ce_zero = ce_from_logprobs(lp, tokens)[keep[:, :-1] & keep[:, 1:]].mean().item()
    assert m["ce_loss_with_ablation"] == pytest.approx(ce_zero, rel=1e-4)
    assert torch.isfinite(torch.tensor([m["ce_loss_with_sae"], m["kl_div_with_sae"]])).all()  # (a random model: no CE ordering to expect)


_SAELENS_TRANSCODER_CHECK = """
import json, sys, torch
from safetensors.torch import load_file
from sae_lens import SAE
out = {}
for d in sys.argv[1:]:
    sae = SAE.load_from_disk(d, device="cpu")
    t = load_file(d + "/io.safetensors")
    with torch.no_grad():
        out[d] = [type(sae).__name__, (sae.encode(t["x"]) - t["z"]).abs().max().item(), (sae(t["x"]) - t["y_hat"]).abs().max().item(),
                  getattr(sae.cfg.metadata, "hook_name_out", None)]
print(json.dumps(out))
"""


def test_saelens_loads_the_transcoders_and_predicts_identically(tmp_path):
    """In SAELens' own environment (skipped where there is none): ``SAE.load_from_disk`` on our (skip-)transcoder folders."""
    import os
    import subprocess
    from pathlib import Path

    py = next((str(p) for p in (os.environ.get("SAEBENCH_SAELENS_PYTHON"), Path(__file__).parents[1] / "benchmarks" / "envs" / "saelens" / "bin" / "python")
               if p and Path(p).is_file()), None)
    if py is None:
        pytest.skip("no SAELens environment (bash benchmarks/make_anchor_envs.sh saelens, or SAEBENCH_SAELENS_PYTHON)")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g)
    folders = {}
    for arch, skip, cls in [("relu", False, "Transcoder"), ("relu", True, "SkipTranscoder"), ("jumprelu", False, "JumpReLUTranscoder")]:
        sae = SAE(SAEConfig(architecture=arch, d_in=16, d_sae=40, d_out=12, hook_name="blocks.0.ln2.hook_normalized", hook_layer=0,
                            hook_name_out="blocks.0.hook_mlp_out", hook_layer_out=0, skip_connection=skip or None, apply_b_dec_to_input=False))
        sae.init_tied(g)
        with torch.no_grad():
            for p in sae.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
            z, y_hat = sae.encode(x), sae(x)
        d = sae.save(tmp_path / f"{arch}{skip}")
        save_file({"x": x, "z": z, "y_hat": y_hat}, str(d / "io.safetensors"))
        folders[str(d)] = cls
    res = subprocess.run([py, "-c", _SAELENS_TRANSCODER_CHECK, *folders], capture_output=True, text=True, timeout=300, check=False,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    for d, cls in folders.items():
        assert got[d][0] == cls and got[d][1] < 1e-4 and got[d][2] < 1e-4 and got[d][3] == "blocks.0.hook_mlp_out", (d, got[d])


def test_skip_transcoder_resumes_bit_identically(tmp_path):
    """The target's scale is checkpointed: an interrupted run resumed equals the uninterrupted one, W_skip included."""
    src = PlantedPairSource(d_in=16, d_out=12, m=32, n_active=2, skip_rank=4, noise=0.5, chunk_tokens=2048, seed=4)
    kw = dict(method="topk", skip_transcoder=True, d_sae=48, k=2, batch_size_tokens=256, training_tokens=30 * 256, checkpoint_every_steps=10,
              resume=True)
    full = train(cfg(tmp_path, "full", 30, **kw), source=src, progress=False)

    run_cut_short(lambda: train(cfg(tmp_path, "cut", 30, **kw), source=src, progress=False), src, after=15)
    resumed = train(cfg(tmp_path, "cut", 30, **kw), source=src, progress=False)
    for name in ("W_dec", "encoder_weight", "b_enc", "b_dec", "W_skip"):
        assert torch.equal(getattr(resumed.sae, name), getattr(full.sae, name)), name


def test_single_hook_evals_and_steering_refuse_a_transcoder(tiny_model):
    """Same widths in and out (64 -> 64): splicing the prediction at the input hook would run, silently wrong; it is refused."""
    from saebench.evals.circuits import SAESite
    from saebench.evals.reconstruction import evaluate_reconstruction

    from saebench.steering import steer

    tc = SAE(SAEConfig(architecture="topk", k=4, d_in=64, d_sae=128, d_out=64, hook_name="blocks.0.ln2.hook_normalized",
                       hook_name_out="blocks.0.hook_mlp_out", apply_b_dec_to_input=False))
    toks = torch.randint(100, 1000, (2, 8))
    with pytest.raises(ValueError, match="this is a transcoder"):
        evaluate_reconstruction(tc, tiny_model, toks, progress=False)
    with pytest.raises(ValueError, match="this is a transcoder"):
        steer(tiny_model, tc, "hello", latent=0, strength=1.0, max_act=1.0)
    with pytest.raises(ValueError, match="this is a transcoder"):
        SAESite(tc)


def test_evaluate_activations_scores_a_transcoder_against_its_target_on_a_pair_source(tmp_path):
    from saebench.evals.core import evaluate_activations

    src = PlantedPairSource(d_in=32, d_out=24, m=64, n_active=3, seed=1, chunk_tokens=4096)
    r = train(cfg(tmp_path, "tc", 200), source=src, progress=False)
    m = evaluate_activations(r.sae, src, max_tokens=6000, batch_size=1000)
    # by hand on the same 6,000 rows (chunk 0 and the first 1,904 of chunk 1)
    x = torch.cat([src.chunk(0).acts["in"], src.chunk(1).acts["in"][:1904]])
    y = torch.cat([src.chunk(0).acts["out"], src.chunk(1).acts["out"][:1904]])
    with torch.no_grad():
        want = float((y - r.sae(x)).square().sum() / (y - y.mean(0)).square().sum())
    assert m["n_tokens"] == 6000 and m["hook_name_out"] == "out" and m["fvu"] == pytest.approx(want, rel=1e-4)
    with pytest.raises(ValueError, match="must hold"):
        evaluate_activations(r.sae, torch.randn(100, 32))


def test_cli_trains_and_evaluates_a_skip_transcoder(tiny_model_dir, text_file, tmp_path, capsys):
    from saebench.cli import main

    out = tmp_path / "tc"
    rc = main(["train", "--model", str(tiny_model_dir), "--corpus", str(text_file), "--hook-name", "blocks.0.ln2.hook_normalized",
               "--target-hook", "blocks.0.hook_mlp_out", "--skip-transcoder", "--k", "4", "--expansion-factor", "2", "--training-tokens", "2048",
               "--batch-size-tokens", "512", "--context-size", "32", "--eval-tokens", "256", "--out-dir", str(out), "--quiet"])
    assert rc == 0
    raw = json.loads((out / "cfg.json").read_text())
    assert raw["architecture"] == "topk_skip_transcoder" and raw["hook_name_out"] == "blocks.0.hook_mlp_out"
    metrics = json.loads((out / "eval_core.json").read_text())
    assert metrics["hook_name_out"] == "blocks.0.hook_mlp_out" and "ce_loss_score" in metrics
    assert main(["verify", str(out)]) == 0
