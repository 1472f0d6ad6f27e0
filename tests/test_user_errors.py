"""Errors a user hits are one line, checked before the model loads (issue 14, point 9), and quiet surprises are said
out loud (point 10): a capped eval, non-UTF-8 or binary corpora, an empty held-out split, time over resumes."""

import errno
import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from saebench import models
from saebench.activations import SyntheticSource
from saebench.cli import main
from saebench.config import ConfigError, TrainConfig
from saebench.layout import WEIGHTS_FILE
from saebench.text import CorpusError, CorpusWarning, is_eval_document, iter_documents, load_tokens
from interrupt_helper import run_cut_short

ROOT = Path(__file__).resolve().parents[1]


def _train_args(model_dir, corpus, out, *extra):
    return ["train", "--quiet", "--model", str(model_dir), "--hook-name", "blocks.1.hook_resid_post", "--corpus", str(corpus),
            "--context-size", "32", "--k", "4", "--expansion-factor", "2", "--training-tokens", "2048", "--batch-size-tokens", "512",
            "--eval-tokens", "512", "--out-dir", str(out), "--lr-warmup-steps", "2", *extra]


def _set(args, flag, value):
    args = list(args)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    return args


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading a model fails the test: the error must come before it."""

    def refuse(*a, **kw):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(models, "load_model", refuse)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "sae"
    assert main(_train_args(tiny_model_dir, text_file, out)) == 0
    return out


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("saebench ") and ": error: " in lines[0]
    return lines[0]


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}


# ----------------------------------------------------------------------------- point 9: arguments checked before the model loads


@pytest.mark.parametrize("flags, message", [
    (["--hook-name", "blocks.0.attn.hook_z:99"], "head 99 does not exist; this model has 4 heads at attn.hook_z, so valid heads are 0-3"),
    (["--hook-name", "blocks.7.hook_resid_post"], "block 7 does not exist; this model has 2 blocks (blocks.0 to blocks.1)"),
    (["--hook-name", "blocks.1.hook_resid_post:2"], "':2' selects one attention head, which only per-head hooks have"),
    (["--hook-name", "blocks.0.attn.hook_z:x"], "the part after ':' must be a head index"),
    (["--k", "1000"], "k=1000 exceeds the number of latents (d_sae = expansion_factor 2 x d_in 64 at blocks.1.hook_resid_post = 128)"),
    (["--eval-tokens", "16"], "eval_tokens=16 is less than one sequence (context_size=32)"),
])
def test_train_arguments_are_checked_before_the_model_loads(tiny_model_dir, text_file, tmp_path, capsys, no_model_load, flags, message):
    args = _set(_train_args(tiny_model_dir, text_file, tmp_path / "x"), *flags)
    assert main(args) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert message in line, line
    assert not (tmp_path / "x").exists()  # nothing written


def test_head_index_is_checked_on_the_loaded_model_when_its_config_is_unreadable(tiny_model):
    from saebench import preflight

    with pytest.raises(ConfigError, match="valid heads are 0-3"):
        preflight.check_hook_on_model(tiny_model, "blocks.0.attn.hook_z:99")
    assert preflight.check_hook_on_model(tiny_model, "blocks.0.attn.hook_z:3") == 16  # d_head
    assert preflight.check_hook_on_model(tiny_model, "blocks.0.attn.hook_z") == 64  # all heads concatenated


def test_model_shape_is_read_from_config_json_without_weights(tmp_path):
    from saebench import preflight

    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 12, "n_head": 12, "n_embd": 768, "n_inner": None}))
    shape = preflight.model_shape(str(gpt2))
    assert shape == {"n_layers": 12, "n_heads": 12, "n_kv_heads": 12, "d_model": 768, "d_head": 64, "d_mlp": 3072}
    assert preflight.hook_width("blocks.3.attn.hook_z", None, shape) == 768 and preflight.hook_width("blocks.3.attn.hook_z", 5, shape) == 64
    assert preflight.hook_width("blocks.3.hook_mlp_out", None, shape) == 768 and preflight.hook_width("blocks.3.mlp.hook_post", None, shape) == 3072
    assert preflight.hook_width("blocks.3.attn.hook_k", None, shape) is None  # grouped-query keys: only the loaded model knows
    with pytest.raises(ConfigError, match="block 12 does not exist; this model has 12 blocks"):
        preflight.check_hook_offline("blocks.12.hook_resid_pre", str(gpt2))
    assert preflight.model_shape(str(tmp_path / "missing")) is None and preflight.model_shape("not a repo id!") is None


def test_a_user_error_in_a_real_process_is_one_line_and_debug_shows_the_traceback(tiny_model_dir, text_file, tmp_path):
    args = _set(_train_args(tiny_model_dir, text_file, tmp_path / "x"), "--hook-name", "blocks.0.attn.hook_z:99")
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("SAEBENCH_DEBUG", None)
    run = subprocess.run([sys.executable, "-m", "saebench.cli", *args], capture_output=True, text=True, timeout=300, env=env, check=False)
    assert run.returncode == 2
    assert "valid heads are 0-3" in _one_error_line(run.stderr)
    debug = subprocess.run([sys.executable, "-m", "saebench.cli", "--debug", *args], capture_output=True, text=True, timeout=300, env=env, check=False)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr


def test_eval_arguments_are_checked_before_the_model_loads(trained, tmp_path, capsys, no_model_load):
    assert main(["eval", str(trained), "--eval-tokens", "8", "--quiet"]) == 2
    assert "eval_tokens=8 is less than one sequence (context_size=32)" in _one_error_line(capsys.readouterr().err)
    assert main(["eval", str(tmp_path / "nothing-here"), "--quiet"]) == 2
    assert "does not exist" in _one_error_line(capsys.readouterr().err)
    # An SAE trained on another model (its width does not match the hook's here).
    other = tmp_path / "other"
    other.mkdir()
    for f in trained.iterdir():
        if f.is_file():
            (other / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((other / "cfg.json").read_text())
    (other / "cfg.json").write_text(json.dumps(cfg | {"d_in": 576}))
    assert main(["eval", str(other), "--quiet"]) == 2
    assert "the SAE reads 576-wide activations at blocks.1.hook_resid_post, but that hook is 64 wide" in _one_error_line(capsys.readouterr().err)
    # A head that the model does not have.
    (other / "cfg.json").write_text(json.dumps(cfg | {"hook_name": "blocks.1.attn.hook_z", "hook_head_index": 9, "d_in": 16}))
    assert main(["eval", str(other), "--quiet"]) == 2
    assert "head 9 does not exist" in _one_error_line(capsys.readouterr().err)


# ----------------------------------------------------------------------------- point 9: a full disk


def _fail_writes_of(monkeypatch, name: str, err: int = errno.ENOSPC):
    """Writes of the temporary file behind ``name`` fail half way with ``err``, as a full disk does."""
    real = os.fdopen

    class Failing:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise OSError(err, os.strerror(err))

        def __getattr__(self, attr):
            return getattr(self.f, attr)

    def fdopen(fd, *a, **kw):
        f = real(fd, *a, **kw)
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return f
        return Failing(f) if os.path.basename(path).startswith(f".{name}.") else f

    monkeypatch.setattr(os, "fdopen", fdopen)


def test_disk_full_while_saving_is_one_line_and_the_old_sae_is_intact(tiny_model_dir, text_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "sae"
    assert main(_train_args(tiny_model_dir, text_file, out)) == 0
    before = _digests(out)
    capsys.readouterr()
    _fail_writes_of(monkeypatch, WEIGHTS_FILE)
    assert main(_train_args(tiny_model_dir, text_file, out, "--seed", "1", "--no-resume")) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "No space left on device" in line and "nothing was replaced, the previous version of the file is intact" in line
    assert "The disk (or your quota) is full" in line
    assert _digests(out) == before  # weights, cfg, manifest, training log and eval metrics of the old SAE
    assert not list(out.glob(".*.tmp"))
    monkeypatch.undo()
    assert main(["verify", str(out)]) == 0


def test_too_little_free_space_is_refused_before_writing(tiny_model_dir, text_file, tmp_path, capsys, monkeypatch):
    import shutil

    out = tmp_path / "sae"
    assert main(_train_args(tiny_model_dir, text_file, out)) == 0
    before = _digests(out)
    capsys.readouterr()
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    assert main(_train_args(tiny_model_dir, text_file, out, "--seed", "1", "--no-resume")) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "not enough disk space for the step-" in line or "not enough disk space for the trained SAE" in line
    assert "nothing was written" in line
    assert _digests(out) == before


def test_a_vanished_folder_is_not_reported_as_a_full_disk(tmp_path, monkeypatch):
    from saebench.io import atomic_write_bytes

    def gone(src, dst):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(dst))

    monkeypatch.setattr(os, "replace", gone)
    with pytest.raises(OSError) as e:
        atomic_write_bytes(tmp_path / "a" / "f.json", b"{}")
    assert "disappeared while the file was written" in str(e.value) and "another process deleted it" in str(e.value)
    assert "Free disk space" not in str(e.value) and "full" not in str(e.value)


# ----------------------------------------------------------------------------- point 10: quiet surprises


def test_eval_tokens_beyond_the_held_out_split_warn_with_the_numbers(trained, text_file, tiny_model, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["eval", str(trained), "--eval-tokens", "100000000", "--quiet", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    held_out = load_tokens(str(text_file), tiny_model.tokenizer, 32, None, split="eval").numel()
    assert f"warning: eval_tokens=100,000,000 asked for more than the held-out 'eval' split of corpus {str(text_file)!r} holds: " \
           f"it gives {held_out:,} tokens" in err
    metrics = json.loads(out.read_text())
    assert metrics["eval_tokens_requested"] == 100_000_000 and metrics["eval_tokens_used"] == held_out
    assert main(["eval", str(trained), "--eval-tokens", "256", "--quiet", "--out", str(out)]) == 0
    assert "warning" not in capsys.readouterr().err  # no warning when the split has enough


def test_invalid_utf8_warns_with_the_fraction_and_binary_is_refused(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("Caf\u00e9 au lait. ".encode("latin-1") * 10 + b"\n\n" + b"plain text " * 100)
    with pytest.warns(CorpusWarning, match=r"latin1.txt: 10 of 1,2\d\d characters \(0.\d\d%\) are not valid UTF-8 and are read as U\+FFFD"):
        docs = list(iter_documents(str(bad), split="train")) + list(iter_documents(str(bad), split="eval"))
    assert sum(d.count("\ufffd") for d in docs) == 10
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_bytes(b'{"text": "ok"}\n' + '{"text": "na\u00efve"}\n'.encode("latin-1"))
    with pytest.warns(CorpusWarning, match=r"rows.jsonl: 1 of 33 characters \(3.03%\)"):
        list(iter_documents(str(jsonl), split="train")) + list(iter_documents(str(jsonl), split="eval"))
    blob = tmp_path / "model.txt"
    blob.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(CorpusError, match=r"model.txt looks like a binary file, not text: \d+% of its"):
        list(iter_documents(str(blob)))
    good = tmp_path / "utf8.txt"
    good.write_text("Caf\u00e9 \ufffd literal replacement characters are text too.\n\nSecond paragraph.")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(iter_documents(str(good)))


def test_training_on_non_utf8_text_says_so_before_anything_loads(tiny_model_dir, text_file, tmp_path, capsys, no_model_load):
    bad = tmp_path / "mixed.txt"
    bad.write_bytes(text_file.read_bytes() + b"\n\nna\xefve caf\xe9\n")
    with pytest.raises(AssertionError, match="the model was loaded"):
        main(_train_args(tiny_model_dir, bad, tmp_path / "x"))
    assert "warning: corpus file " in capsys.readouterr().err


def _one_document(path: Path, chars: int = 200_000) -> Path:
    """A one-line corpus (one document) whose text falls in the training split."""
    for salt in range(100):
        text = f"{salt} " + " ".join(f"word{i % 97}" for i in range(chars // 7))
        if not is_eval_document(text):
            path.write_text(text)
            return path
    raise AssertionError("no salt put the document in the training split")


def test_a_one_document_corpus_is_explained_before_training(tiny_model_dir, tmp_path, capsys, no_model_load):
    corpus = _one_document(tmp_path / "one_line.txt")
    assert main(_train_args(tiny_model_dir, corpus, tmp_path / "x")) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"corpus {str(corpus)!r} has 1 document, and none falls in the held-out 'eval' split" in line
    assert "a .txt/.md/.rst file is cut into documents at blank lines" in line and "--eval-tokens 0" in line
    assert not (tmp_path / "x").exists()
    # Without the eval, training may go ahead (here it reaches the model load).
    with pytest.raises(AssertionError, match="the model was loaded"):
        main(_set(_train_args(tiny_model_dir, corpus, tmp_path / "x"), "--eval-tokens", "0"))


def test_eval_on_a_corpus_with_an_empty_held_out_split_says_why(trained, tmp_path, tiny_model, capsys, no_model_load):
    corpus = _one_document(tmp_path / "one_line.txt", chars=5_000)
    assert main(["eval", str(trained), "--corpus", str(corpus), "--quiet"]) == 2
    assert "has 1 document, and none falls in the held-out 'eval' split" in _one_error_line(capsys.readouterr().err)
    with pytest.raises(CorpusError, match=r"the 'eval' split of corpus .* is empty \(0 documents\): documents go to the held-out"):
        load_tokens(str(corpus), tiny_model.tokenizer, 32, 1024, split="eval")


def test_training_seconds_add_up_over_resumes(tmp_path):
    from saebench.trainers.loop import train

    src = SyntheticSource(d=16, m=32, n_active=2, seed=3, chunk_tokens=4096)
    cfg = TrainConfig(hook_name="synthetic", d_sae=64, k=2, training_tokens=256 * 30, batch_size_tokens=256, checkpoint_every_steps=10,
                      dead_window_tokens=1024, lr_warmup_steps=3, out_dir=str(tmp_path / "run"))

    # 0.1 s before each batch: the first process spends >= 2 s on its 20 checkpointed steps
    run_cut_short(lambda: train(cfg, source=src, progress=False), src, after=25, delay=0.1)
    result = train(cfg, source=src, progress=False)
    log = json.loads((tmp_path / "run" / "training_log.json").read_text())
    first, second = log["processes"]
    assert first["steps"] == [0, 20] and second["steps"] == [20, 30]  # resumed from the step-20 checkpoint
    assert first["seconds"] >= 2.0 and first["pid"] == second["pid"] == os.getpid()
    assert log["seconds_this_process"] == second["seconds"] < first["seconds"]  # the second took no naps
    assert log["seconds"] == pytest.approx(first["seconds"] + second["seconds"]) and result.seconds == pytest.approx(log["seconds"])
