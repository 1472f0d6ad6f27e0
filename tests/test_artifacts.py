"""SAE folders and activation caches you can trust (issue 14, points 1, 2, 4, 5 and the cfg.json checks).

- the folder layout is SAELens' (``sae_weights.safetensors`` + ``cfg.json``), and folders of the old
  layout (``sae.safetensors``) still load;
- SAELens folders with ``rescale_acts_by_decoder_norm`` encode and decode as SAELens does;
- the manifest is checked on load (sizes always, sha256 by default, with an opt-out);
- activation-cache shards are checked against ``cache.json`` when first read;
- hostile ``cfg.json`` files give an ``ArtifactError`` naming the file (and the field).

The real SAELens loading a fresh saebench folder is ``benchmarks/bench_saelens_load.py`` (its own environment).
"""

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from saebench.activations import CachedSource, SyntheticSource, verify_cache, write_cache
from saebench.cli import main
from saebench.config import TrainConfig
from saebench.io import ArtifactError, write_manifest
from saebench.layout import LEGACY_WEIGHTS_FILE, WEIGHTS_FILE, is_sae_folder, weights_file
from saebench.sae import SAE, SAEConfig, load_sae
from saebench.trainers.loop import train

HOOK = "blocks.3.hook_resid_post"


def _sae(arch="topk", d_in=8, d_sae=24, k=3, seed=0, dtype="float32") -> SAE:
    sae = SAE(SAEConfig(architecture=arch, d_in=d_in, d_sae=d_sae, k=k if arch in ("topk", "abstopk") else None, hook_name=HOOK,
                        model_name="m", dtype=dtype))
    g = torch.Generator().manual_seed(seed)
    sae.init_tied(g)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(d_in, generator=g) * 0.1)
        if sae.threshold is not None:
            sae.log_threshold.copy_(torch.full((d_sae,), 0.05).log())
    return sae


def _same(a: SAE, b: SAE) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


# --------------------------------------------------------------------------- 1. SAELens' file names


def test_saved_folder_has_the_saelens_layout(tmp_path):
    """What sae_lens.SAE.load_from_disk reads: sae_weights.safetensors (W_enc [d_in, d_sae], ...) + cfg.json with its fields."""
    for arch in ("topk", "jumprelu"):
        sae = _sae(arch)
        folder = sae.save(tmp_path / arch)
        assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "manifest.json", "sae_weights.safetensors"]
        t = load_file(str(folder / "sae_weights.safetensors"))
        want = {"W_enc": (8, 24), "W_dec": (24, 8), "b_enc": (24,), "b_dec": (8,)} | ({"threshold": (24,)} if arch == "jumprelu" else {})
        assert {k: tuple(v.shape) for k, v in t.items()} == want
        assert torch.allclose(t["W_dec"].norm(dim=-1), torch.ones(24), atol=1e-6)
        cfg = json.loads((folder / "cfg.json").read_text())
        assert cfg["architecture"] == arch and cfg["d_in"] == 8 and cfg["d_sae"] == 24 and cfg["dtype"] == "float32"
        assert cfg["hook_name"] == HOOK and cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
        assert (cfg["k"] == 3) if arch == "topk" else cfg["k"] is None
        assert set(json.loads((folder / "manifest.json").read_text())["files"]) == {"sae_weights.safetensors", "cfg.json"}
        assert weights_file(folder) == folder / WEIGHTS_FILE and is_sae_folder(folder)
        _same(SAE.load(folder), sae)


def test_a_relu_sae_is_written_as_saelens_standard_and_read_back_as_relu(tmp_path):
    sae = _sae("relu")
    folder = sae.save(tmp_path / "relu")
    assert json.loads((folder / "cfg.json").read_text())["architecture"] == "standard"  # SAELens' StandardSAE
    loaded = load_sae(folder)
    assert loaded.cfg.architecture == "relu" and loaded.cfg == sae.cfg
    _same(loaded, sae)
    cfg = json.loads((folder / "cfg.json").read_text())  # folders written before: "relu"
    cfg["architecture"] = "relu"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    assert load_sae(folder, verify=False).cfg.architecture == "relu"


def test_folders_written_the_old_way_still_load(tmp_path):
    """A folder of saebench before 2026-11-25 (sae.safetensors, listed in its manifest) loads, checked, unchanged."""
    sae = _sae("jumprelu")
    folder = sae.save(tmp_path / "old")
    (folder / WEIGHTS_FILE).rename(folder / LEGACY_WEIGHTS_FILE)
    write_manifest(folder, [LEGACY_WEIGHTS_FILE, "cfg.json"])
    assert is_sae_folder(folder) and weights_file(folder) == folder / LEGACY_WEIGHTS_FILE
    _same(load_sae(folder), sae)
    # the old layout is checked against its manifest like the new one
    p = folder / LEGACY_WEIGHTS_FILE
    p.write_bytes(p.read_bytes()[:-4])
    with pytest.raises(ArtifactError, match="sae.safetensors"):
        load_sae(folder)


def test_an_old_folder_with_an_alias_reads_the_file_its_manifest_lists(tmp_path):
    """The issue's workaround (sae_weights.safetensors aliasing sae.safetensors) and a crash between writing the new
    weights and removing the old file: the manifest says which file is the SAE."""
    old, new = _sae(seed=1), _sae(seed=2)
    folder = old.save(tmp_path / "s")
    (folder / WEIGHTS_FILE).rename(folder / LEGACY_WEIGHTS_FILE)
    write_manifest(folder, [LEGACY_WEIGHTS_FILE, "cfg.json"])
    save_file({k: v.contiguous() for k, v in new.state_tensors().items()}, str(folder / WEIGHTS_FILE))  # not in the manifest
    _same(load_sae(folder), old)


def test_saving_over_an_old_folder_replaces_its_weights_file(tmp_path):
    folder = _sae(seed=1).save(tmp_path / "s")
    (folder / WEIGHTS_FILE).rename(folder / LEGACY_WEIGHTS_FILE)
    write_manifest(folder, [LEGACY_WEIGHTS_FILE, "cfg.json"])
    new = _sae(seed=2)
    new.save(folder)
    assert not (folder / LEGACY_WEIGHTS_FILE).exists() and (folder / WEIGHTS_FILE).exists()
    _same(load_sae(folder), new)


# --------------------------------------------------------------------------- 2. rescale_acts_by_decoder_norm


def _saelens_folder(root: Path, arch: str, rescale: bool, seed: int = 0, d_in=10, d_sae=32, k=4) -> tuple[Path, dict]:
    """A SAELens-style folder (no manifest) with decoder rows of norms 0.05-4 (float64)."""
    g = torch.Generator().manual_seed(seed)
    w = {
        "W_enc": torch.randn(d_in, d_sae, generator=g, dtype=torch.float64) / d_in**0.5,
        "W_dec": torch.randn(d_sae, d_in, generator=g, dtype=torch.float64),
        "b_enc": torch.randn(d_sae, generator=g, dtype=torch.float64) * 0.2,
        "b_dec": torch.randn(d_in, generator=g, dtype=torch.float64) * 0.2,
    }
    norms = torch.empty(d_sae, dtype=torch.float64).uniform_(0.05, 4.0, generator=g)
    w["W_dec"] = w["W_dec"] / w["W_dec"].norm(dim=-1, keepdim=True) * norms[:, None]
    if arch == "jumprelu":
        w["threshold"] = torch.full((d_sae,), 0.1, dtype=torch.float64)
    cfg = {"architecture": arch, "d_in": d_in, "d_sae": d_sae, "dtype": "float64", "device": "cpu", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "reshape_activations": "none", "rescale_acts_by_decoder_norm": rescale,
           "metadata": {"hook_name": HOOK, "model_name": "m", "sae_lens_version": "6.54.12"}}
    if arch in ("topk", "abstopk"):
        cfg["k"] = k
    folder = root / f"{arch}_{rescale}"
    folder.mkdir()
    save_file(w, str(folder / WEIGHTS_FILE))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder, w


def _saelens_formula(w: dict, x: torch.Tensor, arch: str, rescale: bool, k: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens 6.54's TopKSAE / AbsTopKSAE / JumpReLUSAE encode and decode (sae_lens/saes/topk_sae.py, abstopk_sae.py)."""
    norms = w["W_dec"].norm(dim=-1)
    hidden = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    if rescale and arch in ("topk", "abstopk"):  # only these inference classes read the flag
        hidden = hidden * norms
    z = torch.zeros_like(hidden)
    if arch == "topk":
        idx = hidden.topk(k, dim=-1).indices
        z.scatter_(-1, idx, hidden.gather(-1, idx).relu())
    elif arch == "abstopk":
        idx = hidden.abs().topk(k, dim=-1).indices
        z.scatter_(-1, idx, hidden.gather(-1, idx))
    else:  # jumprelu
        z = hidden.relu() * (hidden > w["threshold"])
    zd = z / norms if (rescale and arch in ("topk", "abstopk")) else z
    return z, zd @ w["W_dec"] + w["b_dec"]


@pytest.mark.parametrize("arch", ["topk", "abstopk", "jumprelu"])
@pytest.mark.parametrize("rescale", [True, False])
def test_rescale_acts_by_decoder_norm_encodes_as_saelens(tmp_path, arch, rescale):
    """Our encode/decode of a SAELens folder equal SAELens' formulas, with and without the flag (decoder norms 0.05-4)."""
    folder, w = _saelens_folder(tmp_path, arch, rescale)
    sae = load_sae(folder)
    x = torch.randn(64, 10, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * 2
    z_ref, x_hat_ref = _saelens_formula(w, x, arch, rescale)
    with torch.no_grad():
        z, x_hat = sae.encode(x), sae(x)
    assert torch.allclose(z, z_ref, rtol=1e-9, atol=1e-12)
    assert torch.allclose(x_hat, x_hat_ref, rtol=1e-9, atol=1e-12)
    if rescale and arch != "jumprelu":
        assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(32, dtype=torch.float64))  # folded: unit rows
        # without the fold the latents differ: the test can fail
        _, x_hat_plain = _saelens_formula(w, x, arch, rescale=False)
        assert not torch.allclose(x_hat_plain, x_hat_ref, atol=1e-3)


def test_rescale_flag_must_be_a_boolean(tmp_path):
    folder, _ = _saelens_folder(tmp_path, "topk", True)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["rescale_acts_by_decoder_norm"] = "yes"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match="rescale_acts_by_decoder_norm"):
        load_sae(folder)


# --------------------------------------------------------------------------- 4. the manifest is checked on load


def _flip_exponent_bit(path: Path, tensor: str = "W_dec", element: int = 5) -> None:
    """Flip the top exponent bit of one float32 of ``tensor`` in a safetensors file (the issue's fault)."""
    data = bytearray(path.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    start = json.loads(data[8 : 8 + n])[tensor]["data_offsets"][0]
    data[8 + n + start + 4 * element + 3] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_W_dec_is_refused_on_load(tmp_path, monkeypatch):
    sae = _sae()
    folder = sae.save(tmp_path / "s")
    p = folder / WEIGHTS_FILE
    _flip_exponent_bit(p)
    with pytest.raises(ArtifactError, match=r"sae_weights\.safetensors does not match its sha256.*saebench verify") as e:
        load_sae(folder)
    assert str(p) in str(e.value) and "verify=False" in str(e.value)
    # the opt-outs: sizes only (the flip keeps the size) or no check; the corrupted weights are what they load
    for verify in ("size", False, "none"):
        bad = load_sae(folder, verify=verify)
        assert not torch.equal(bad.W_dec, sae.W_dec)
    monkeypatch.setenv("SAEBENCH_VERIFY", "size")  # the default for command-line runs on huge files
    load_sae(folder)
    monkeypatch.setenv("SAEBENCH_VERIFY", "sha256")
    with pytest.raises(ArtifactError, match="sha256"):
        load_sae(folder)
    with pytest.raises(ValueError, match="verify must be"):
        load_sae(folder, verify="md5")


def test_a_truncated_file_is_refused_even_with_sizes_only(tmp_path):
    folder = _sae().save(tmp_path / "s")
    p = folder / WEIGHTS_FILE
    p.write_bytes(p.read_bytes()[:-8])
    for verify in (True, "size"):
        with pytest.raises(ArtifactError, match=r"bytes but manifest.json says .*truncated"):
            load_sae(folder, verify=verify)


def test_an_edited_cfg_json_is_refused_and_a_bad_manifest_is_reported(tmp_path):
    folder = _sae().save(tmp_path / "s")
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["hook_name"] = "blocks.4.hook_resid_post"
    (folder / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")
    with pytest.raises(ArtifactError, match=r"cfg\.json .*manifest\.json"):
        load_sae(folder)
    assert load_sae(folder, verify=False).cfg.hook_name == "blocks.4.hook_resid_post"
    (folder / "manifest.json").write_text('{"files": [1, 2]}')
    with pytest.raises(ArtifactError, match="manifest.json is corrupted"):
        load_sae(folder)


def test_folders_without_a_manifest_load(tmp_path):
    """SAELens folders have no manifest: loaded unchecked (and the rest of the loader's checks still apply)."""
    sae = _sae()
    folder = sae.save(tmp_path / "s")
    (folder / "manifest.json").unlink()
    _same(load_sae(folder), sae)
    folder, _ = _saelens_folder(tmp_path, "topk", False)
    assert load_sae(folder).cfg.method == "saelens:topk"


# --------------------------------------------------------------------------- 5. activation-cache shards


def _cfg(out, **kw):
    return TrainConfig(**dict(hook_name="synthetic", d_sae=32, k=2, training_tokens=256 * 12, batch_size_tokens=256, lr=3e-3, out_dir=str(out),
                              checkpoint_every_steps=100, dead_window_tokens=512, lr_warmup_steps=2, eval_tokens=0) | kw)


def _source():
    return SyntheticSource(d=16, m=32, n_active=2, seed=3, chunk_tokens=1024)


def _flip_payload_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-37] ^= 0x40  # inside the last tensor's data, far from the header
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_a_cache_shard_stops_training_clearly(tmp_path, capsys):
    folder = tmp_path / "cache"
    write_cache(_source(), folder, n_chunks=3, progress=False)
    reference = train(_cfg(tmp_path / "ref"), source=CachedSource(folder), progress=False)
    shard = folder / "shard_00001.safetensors"
    _flip_payload_bit(shard)
    with pytest.raises(ArtifactError, match=r"shard_00001\.safetensors is corrupted.*delete it .*rerun") as e:
        train(_cfg(tmp_path / "bad"), source=CachedSource(folder), progress=False)
    assert str(shard) in str(e.value)
    assert weights_file(tmp_path / "bad") is None  # no SAE was written from damaged data
    # saebench verify names the shard; deleting it and rerunning the harvest repairs the cache exactly
    assert verify_cache(folder) and "shard_00001.safetensors: checksum mismatch" in verify_cache(folder)[0]
    assert main(["verify", str(folder)]) == 1 and "shard_00001.safetensors: checksum mismatch" in capsys.readouterr().out
    shard.unlink()
    write_cache(_source(), folder, n_chunks=3, progress=False)
    assert verify_cache(folder) == [] and main(["verify", str(folder)]) == 0
    again = train(_cfg(tmp_path / "again"), source=CachedSource(folder), progress=False)
    _same(again.sae, reference.sae)


def test_each_shard_is_hashed_on_first_read_and_again_when_it_changes(tmp_path, monkeypatch):
    import hashlib

    import saebench.activations as acts

    folder = tmp_path / "cache"
    write_cache(_source(), folder, n_chunks=2, progress=False)
    calls = []
    real = hashlib.sha256
    monkeypatch.setattr(acts.hashlib, "sha256", lambda *a: calls.append(1) or real(*a))
    src = CachedSource(folder)
    first = src.chunk(0)
    src.chunk(0), CachedSource(folder).chunk(0)  # epoch 2, another reader in the same process: no second hash
    assert len(calls) == 1
    _flip_payload_bit(folder / "shard_00000.safetensors")  # a changed file (new mtime) is checked again
    with pytest.raises(ArtifactError, match="shard_00000.safetensors is corrupted"):
        src.chunk(0)
    assert torch.equal(CachedSource(folder).chunk(1).token_ids, _source().chunk(1).token_ids)
    assert first.acts["synthetic"].shape[0] == 1024


def test_verify_checks_a_whole_cache(tmp_path):
    folder = tmp_path / "cache"
    write_cache(_source(), folder, n_chunks=2, progress=False)
    assert verify_cache(folder) == []
    CachedSource(folder, verify=True)
    (folder / "shard_00000.safetensors").unlink()
    assert verify_cache(folder) == ["shard_00000.safetensors: missing; rerun the harvest to write it again"]
    with pytest.raises(ArtifactError, match="shard_00000.safetensors: missing"):
        CachedSource(folder, verify=True)


# --------------------------------------------------------------------------- cfg.json validation


@pytest.mark.parametrize("kind", ["saebench", "saelens"])
def test_a_deeply_nested_cfg_json_names_the_file(tmp_path, kind):
    if kind == "saebench":
        folder = _sae().save(tmp_path / "s")
    else:
        folder, _ = _saelens_folder(tmp_path, "topk", False)
    (folder / "cfg.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ArtifactError, match=r"cfg\.json is nested too deeply") as e:
        load_sae(folder)
    assert str(folder / "cfg.json") in str(e.value)
    (folder / "cfg.json").write_text('{"a": ' * 200_000 + "1" + "}" * 200_000)
    with pytest.raises(ArtifactError, match="nested too deeply"):
        load_sae(folder, verify=False)


@pytest.mark.parametrize("kind", ["saebench", "saelens"])
@pytest.mark.parametrize("field, value", [("d_sae", "abc"), ("d_sae", True), ("d_in", 8.5), ("k", False), ("d_in", None)])
def test_bad_sizes_in_cfg_json_name_the_file_and_field(tmp_path, kind, field, value):
    if kind == "saebench":
        folder = _sae().save(tmp_path / "s")
    else:
        folder, _ = _saelens_folder(tmp_path, "topk", False)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg[field] = value
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match=field) as e:
        load_sae(folder, verify=False)
    assert str(folder / "cfg.json") in str(e.value)


def test_k_larger_than_d_sae_names_the_file(tmp_path):
    folder, _ = _saelens_folder(tmp_path, "topk", False)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["k"] = 40
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match=r"cfg\.json describes no valid SAE: k=40 exceeds d_sae=32"):
        load_sae(folder)
