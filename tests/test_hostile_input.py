"""Property-based tests: broken or hostile input only ever produces clean, specific errors.

For the config loader, the artifact loader (truncated, bit-flipped, wrong shapes/dtypes, foreign
JSON) and the corpus readers: either the input is accepted, or a ConfigError / ArtifactError /
CorpusError with a message is raised; never a raw traceback from deep inside torch, never a
partially loaded SAE.
"""

import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from saebench.config import ConfigError, TrainConfig, build_config, read_config_file
from saebench.io import ArtifactError
from saebench.sae import SAE, SAEConfig
from saebench.text import CorpusError, iter_documents

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=10,
)


@SETTINGS
@given(st.dictionaries(st.sampled_from(list(TrainConfig.model_fields) + ["typo_field", "kk"]), json_values, max_size=6))
def test_config_loader_accepts_or_raises_config_error(data):
    try:
        cfg = build_config(TrainConfig, data)
    except ConfigError as e:
        assert str(e)
        return
    assert isinstance(cfg, TrainConfig)


@SETTINGS
@given(st.binary(max_size=300))
@example(b"?")  # YAML: {None: None}, a non-string key (found by hypothesis in CI)
@example(b"1: 2\n")  # an integer key
def test_config_files_with_garbage_raise_config_error(tmp_path_factory, blob):
    d = tmp_path_factory.mktemp("cfg")
    for suffix in (".toml", ".yaml", ".json"):
        p = d / f"c{suffix}"
        p.write_bytes(blob)
        try:
            data = read_config_file(p)
            build_config(TrainConfig, data)
        except ConfigError as e:
            assert str(e)


def _good_folder(root: Path) -> Path:
    sae = SAE(SAEConfig(architecture="jumprelu", d_in=6, d_sae=10, hook_name="blocks.0.hook_resid_post"))
    sae.init_tied(torch.Generator().manual_seed(0))
    return sae.save(root / "sae")


def _assert_clean_load(folder: Path, changed: bool | None = None):
    """The manifest check refuses any change to a listed file; without it the parser still fails cleanly or loads a whole SAE."""
    if changed:
        with pytest.raises(ArtifactError, match="manifest.json"):
            SAE.load(folder)
    try:
        sae = SAE.load(folder, verify=False)
    except ArtifactError as e:
        assert str(e)
        return None
    # Accepted: the SAE must be whole and usable.
    out = sae(torch.randn(3, sae.cfg.d_in))
    assert out.shape == (3, sae.cfg.d_in)
    return sae


@SETTINGS
@given(cut=st.integers(min_value=0, max_value=2000), flips=st.lists(st.integers(min_value=0, max_value=10_000), max_size=8))
def test_damaged_weights_never_load_partially(tmp_path_factory, cut, flips):
    folder = _good_folder(tmp_path_factory.mktemp("art"))
    p = folder / "sae_weights.safetensors"
    original = p.read_bytes()
    data = bytearray(original)
    for f in flips:
        data[f % len(data)] ^= 0xA5
    p.write_bytes(bytes(data[: len(data) - cut]))
    _assert_clean_load(folder, changed=p.read_bytes() != original)


@SETTINGS
@given(cfg=st.dictionaries(st.sampled_from(list(SAEConfig.model_fields) + ["foo", "layers"]), json_values, max_size=8))
def test_foreign_or_mangled_cfg_json(tmp_path_factory, cfg):
    folder = _good_folder(tmp_path_factory.mktemp("art"))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError):  # a broken config is reported as such; one that parses fails the manifest check
        SAE.load(folder)
    _assert_clean_load(folder)


@SETTINGS
@given(
    name=st.sampled_from(["W_enc", "W_dec", "b_enc", "b_dec", "threshold"]),
    shape=st.lists(st.integers(min_value=0, max_value=12), min_size=0, max_size=3),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bool, torch.bfloat16]),
)
def test_wrong_shapes_and_dtypes(tmp_path_factory, name, shape, dtype):
    folder = _good_folder(tmp_path_factory.mktemp("art"))
    from safetensors.torch import load_file

    original = (folder / "sae_weights.safetensors").read_bytes()
    tensors = load_file(str(folder / "sae_weights.safetensors"))
    tensors[name] = torch.zeros(shape, dtype=dtype)
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    sae = _assert_clean_load(folder, changed=(folder / "sae_weights.safetensors").read_bytes() != original)
    if sae is not None:  # only acceptable if the replacement happened to have the right shape and a float dtype
        assert dtype.is_floating_point


@SETTINGS
@given(blob=st.binary(max_size=400), suffix=st.sampled_from([".txt", ".jsonl", ".parquet"]))
def test_corpus_readers_raise_only_corpus_errors(tmp_path_factory, blob, suffix):
    p = tmp_path_factory.mktemp("corpus") / f"c{suffix}"
    p.write_bytes(blob)
    try:
        docs = list(iter_documents(str(p)))
    except CorpusError as e:
        assert str(e)
        return
    assert all(isinstance(d, str) for d in docs)


def test_pickle_is_never_loaded(tmp_path):
    """A weights file that is a pickle (the classic attack vector) is refused, not executed."""
    folder = _good_folder(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    import pickle

    (folder / "sae_weights.safetensors").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ArtifactError):
        SAE.load(folder)
    with pytest.raises(ArtifactError):
        SAE.load(folder, verify=False)  # the parser refuses it too
    assert not marker.exists()
