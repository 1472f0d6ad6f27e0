"""Injected faults: SIGKILL mid-training and mid-write, a killed cache writer, a full disk.

Each fault runs in a child process that really dies (SIGKILL) or hits a real write error
(RLIMIT_FSIZE), then the parent checks that nothing written before is lost or corrupted and that
resuming gives exactly what an uninterrupted run gives.
"""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from saebench.activations import CachedSource, SyntheticSource, write_cache
from saebench.config import TrainConfig
from saebench.io import ArtifactError
from saebench.sae import SAE
from saebench.trainers.checkpoint import load_checkpoint
from saebench.trainers.loop import train

CHILD_PRELUDE = textwrap.dedent(
    """
    import os, signal, sys, torch
    torch.set_num_threads(1)
    from saebench.activations import SyntheticSource
    from saebench.config import TrainConfig
    from saebench.trainers.loop import train
    import saebench.trainers.checkpoint as ck
    """
)


def _cfg(out, **kw):
    base = dict(hook_name="synthetic", d_sae=64, k=2, training_tokens=256 * 40, batch_size_tokens=256, lr=3e-3, out_dir=str(out),
                checkpoint_every_steps=5, dead_window_tokens=1024, lr_warmup_steps=3)
    base.update(kw)
    return TrainConfig(**base)


def _source():
    return SyntheticSource(d=16, m=32, n_active=2, seed=7, chunk_tokens=2048)


def _run_child(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD_PRELUDE + textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    return train(_cfg(out / "run"), source=_source(), progress=False)


@pytest.mark.parametrize("kill_at_batch", [3, 12, 27])
def test_sigkill_between_steps_then_resume_is_exact(tmp_path, reference, kill_at_batch):
    out = tmp_path / "run"
    child = _run_child(f"""
        src = SyntheticSource(d=16, m=32, n_active=2, seed=7, chunk_tokens=2048)
        orig = src.batches
        def dying(*a, **kw):
            for i, item in enumerate(orig(*a, **kw)):
                if i == {kill_at_batch}:
                    os.kill(os.getpid(), signal.SIGKILL)
                yield item
        src.batches = dying
        train(TrainConfig(**{_cfg(out).model_dump()!r}), source=src, progress=False)
    """)
    assert child.returncode == -signal.SIGKILL, child.stderr
    resumed = train(_cfg(out), source=_source(), progress=False)
    for (name, a), (_, b) in zip(reference.sae.state_dict().items(), resumed.sae.state_dict().items()):
        assert torch.equal(a, b), name
    assert [h["fvu"] for h in reference.history] == [h["fvu"] for h in resumed.history]


def test_sigkill_in_the_middle_of_a_checkpoint_write(tmp_path, reference):
    """Killed after the new checkpoint's tensors are written but before the pointer moves."""
    out = tmp_path / "run"
    child = _run_child(f"""
        real = ck.write_json
        def dying_write_json(path, obj):
            if str(path).endswith("state.json") and obj.get("step") == 15:
                os.kill(os.getpid(), signal.SIGKILL)
            real(path, obj)
        ck.write_json = dying_write_json
        src = SyntheticSource(d=16, m=32, n_active=2, seed=7, chunk_tokens=2048)
        train(TrainConfig(**{_cfg(out).model_dump()!r}), source=src, progress=False)
    """)
    assert child.returncode == -signal.SIGKILL, child.stderr
    tensors, meta = load_checkpoint(out)
    assert meta["step"] == 10  # the previous checkpoint is intact and still the latest
    resumed = train(_cfg(out), source=_source(), progress=False)
    for (name, a), (_, b) in zip(reference.sae.state_dict().items(), resumed.sae.state_dict().items()):
        assert torch.equal(a, b), name


def test_cache_writer_killed_mid_shard_resumes_and_reader_never_sees_partial(tmp_path):
    folder = tmp_path / "cache"
    child = _run_child(f"""
        from saebench.activations import write_cache
        import saebench.io as io
        real = io.atomic_write_bytes
        calls = []
        def dying(path, data):
            if str(path).endswith("shard_00002.safetensors"):
                # write half of the shard under its temporary name, then die
                import tempfile
                fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix="." + os.path.basename(path) + ".", suffix=".tmp")
                os.write(fd, data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            real(path, data)
        io.atomic_write_bytes = dying
        src = SyntheticSource(d=16, m=32, n_active=2, seed=7, chunk_tokens=2048)
        write_cache(src, {str(folder)!r}, n_chunks=4, progress=False)
    """)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert not (folder / "shard_00002.safetensors").exists()
    with pytest.raises(ArtifactError, match=r"incomplete \(2/4 shards\)"):
        CachedSource(folder)
    cache = write_cache(_source(), folder, n_chunks=4, progress=False)  # resumes at shard 2
    fresh = write_cache(_source(), tmp_path / "fresh", n_chunks=4, progress=False)
    for i in range(4):
        assert torch.equal(cache.chunk(i).acts["synthetic"], fresh.chunk(i).acts["synthetic"])
    CachedSource(folder, verify=True)


def test_disk_full_during_checkpoint_keeps_previous_and_says_so(tmp_path):
    """RLIMIT_FSIZE makes writes past a size fail with EFBIG, like a full disk."""
    out = tmp_path / "run"
    child = _run_child(f"""
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        src = SyntheticSource(d=16, m=32, n_active=2, seed=7, chunk_tokens=2048)
        cfg = TrainConfig(**{_cfg(out).model_dump()!r})
        real = ck.save_tensors
        def limited(path, tensors, metadata=None):
            if "step_00000015" in str(path):
                resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
            real(path, tensors, metadata)
        ck.save_tensors = limited
        try:
            train(cfg, source=src, progress=False)
        except OSError as e:
            print("ERROR:", e)
            sys.exit(3)
    """)
    assert child.returncode == 3, child.stderr
    assert "File too large" in child.stdout and "the previous version of the file is intact" in child.stdout
    tensors, meta = load_checkpoint(out)
    assert meta["step"] == 10 and torch.isfinite(tensors["sae.W_dec"]).all()
    assert not list((out / "checkpoints").rglob("*.tmp"))  # no temporary files left behind


def test_disk_full_while_saving_the_sae_keeps_the_old_artifact(tmp_path):
    sae = SAE.load(_small_sae().save(tmp_path / "sae"))
    child = _run_child(f"""
        import resource
        from saebench.sae import SAE
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        sae = SAE.load({str(tmp_path / 'sae')!r})
        with torch.no_grad():
            sae.W_dec.mul_(-1)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))
        try:
            sae.save({str(tmp_path / 'sae')!r})
        except OSError as e:
            print("ERROR:", e)
            sys.exit(3)
    """)
    assert child.returncode == 3, child.stderr
    assert "nothing was replaced" in child.stdout
    again = SAE.load(tmp_path / "sae")
    assert torch.equal(again.W_dec, sae.W_dec)


def _small_sae():
    from saebench.sae import SAEConfig

    sae = SAE(SAEConfig(architecture="topk", d_in=32, d_sae=256, k=4))
    sae.init_tied(torch.Generator().manual_seed(0))
    return sae
