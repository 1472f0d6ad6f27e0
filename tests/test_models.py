"""Tests for saebench.models: tiny random models for everything, the real SmolLM2 once."""

import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from saebench import models
from saebench.models import HookNameError, ModelLoadError


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_llama")


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return models.make_tiny_model(tiny_dir)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tiny_model_logits_match_hf(tmp_path, arch):
    start = time.perf_counter()
    bridge = models.make_tiny_model(tmp_path, arch=arch, n_layers=2, d_model=64, n_heads=4, d_mlp=128)
    assert time.perf_counter() - start < 5  # well under 1 s on an idle machine
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    tokens = bridge.to_tokens(["The capital of France is Paris", "Hello world"])
    with torch.no_grad():
        assert torch.allclose(bridge(tokens), hf(tokens).logits, atol=1e-4)
    assert bridge.cfg.n_layers == 2 and bridge.cfg.d_model == 64 and bridge.cfg.d_vocab == 49152


def test_tiny_model_is_frozen_and_deterministic(tiny, tmp_path):
    assert not tiny.training
    assert not any(p.requires_grad for p in tiny.parameters())
    again = models.make_tiny_model(tmp_path)  # same seed, same weights
    tokens = tiny.to_tokens("same seed")
    with torch.no_grad():
        assert torch.equal(tiny(tokens), again(tokens))


def test_classic_hook_names_work(tiny):
    tokens = tiny.to_tokens("The cat sat on the mat")
    names = [
        "blocks.1.hook_resid_pre",
        "blocks.1.hook_resid_post",
        "blocks.1.hook_mlp_out",
        "blocks.1.mlp.hook_out",
        "blocks.1.attn.hook_z",
    ]
    with torch.no_grad():
        _, cache = tiny.run_with_cache(tokens, names_filter=names, stop_at_layer=2)
    n = tokens.shape[1]
    for name in names[:4]:
        assert cache[name].shape == (1, n, 64)
    assert cache["blocks.1.attn.hook_z"].shape == (1, n, 4, 16)
    assert torch.equal(cache["blocks.1.hook_mlp_out"], cache["blocks.1.mlp.hook_out"])

    with torch.no_grad():
        base = tiny(tokens)
        zero = lambda x, hook: torch.zeros_like(x)
        ablated = tiny.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_post", zero)])
        with tiny.hooks(fwd_hooks=[("blocks.1.attn.hook_z", zero)]):
            ablated_z = tiny(tokens)
        after = tiny(tokens)
    assert not torch.allclose(base, ablated) and not torch.allclose(base, ablated_z)
    assert torch.equal(base, after)  # hooks() removed its hook on exit


def test_load_model_from_local_dir(tiny, tiny_dir):
    loaded = models.load_model(str(tiny_dir))
    tokens = tiny.to_tokens("reload me")
    with torch.no_grad():
        assert torch.equal(loaded(tokens), tiny(tokens))
    assert not any(p.requires_grad for p in loaded.parameters())


def test_hook_names_and_validation(tiny):
    names = models.hook_names(tiny)
    for name in ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "hook_embed", "blocks.1.mlp.hook_post"]:
        assert name in names
        assert models.validate_hook_name(tiny, name) == name
    assert "blocks.0.hook_mlp_in" not in names  # gated off until set_use_hook_mlp_in(True)

    with pytest.raises(HookNameError) as err:
        models.validate_hook_name(tiny, "blocks.1.hook_resid_pst")
    assert "blocks.1.hook_resid_post" in str(err.value)
    assert isinstance(err.value, ValueError)
    with pytest.raises(HookNameError, match="set_use_hook_mlp_in"):
        models.validate_hook_name(tiny, "blocks.0.hook_mlp_in")
    with pytest.raises(HookNameError):
        models.validate_hook_name(tiny, "blocks.7.hook_resid_post")


def test_hook_layer():
    assert models.hook_layer("blocks.6.hook_resid_post") == 6
    assert models.hook_layer("blocks.12.attn.hook_z") == 12
    with pytest.raises(HookNameError):
        models.hook_layer("hook_embed")


def test_model_d_in(tiny):
    assert models.model_d_in(tiny, "blocks.1.hook_resid_post") == 64
    assert models.model_d_in(tiny, "blocks.0.attn.hook_z") == 64  # 4 heads x 16, flattened
    assert models.model_d_in(tiny, "blocks.1.mlp.hook_post") == 128
    assert models.model_d_in(tiny, "hook_embed") == 64


def test_unknown_model_fails_fast_with_advice(tmp_path):
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as err:
        models.load_model("no-such-org/no-such-model-xyz")
    assert time.perf_counter() - start < 15
    message = str(err.value)
    assert "no-such-org/no-such-model-xyz" in message and "local directory" in message

    with pytest.raises(ModelLoadError, match="not a directory"):
        models.load_model(str(tmp_path / "missing" / "model"))
    with pytest.raises(ModelLoadError, match="config.json"):
        models.load_model(str(tmp_path))  # exists, but is not a checkpoint


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "cache" / "thing"
    with pytest.raises(RuntimeError), models._atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("interrupted")
    assert not target.exists() and list(target.parent.iterdir()) == []
    with models._atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("{}")
    assert (target / "config.json").exists() and list(target.parent.iterdir()) == [target]


def test_default_model_knows_paris():
    """Integration: the bundled SmolLM2-135M (de-quantised and cached on first use)."""
    model = models.load_model()
    assert model.cfg.n_layers == 30 and model.cfg.d_model == 576
    tokens = model.to_tokens("The capital of France is")
    with torch.no_grad():
        next_token = model(tokens)[0, -1].argmax()
    assert "Paris" in model.tokenizer.decode(next_token)
    assert not any(p.requires_grad for p in model.parameters())
