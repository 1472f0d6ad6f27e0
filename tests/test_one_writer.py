"""One writer per output folder (issue 14, point 6): a second writer is refused at once, naming the first;
a writer killed with SIGKILL leaves a lock file behind that never blocks the next run."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from saebench.trainers.loop import train

from saebench.activations import SyntheticSource
from saebench.cli import main
from saebench.config import TrainConfig
from saebench.layout import WEIGHTS_FILE
from saebench.lock import LOCK_FILE, FolderInUseError, folder_lock, holder_of

ROOT = Path(__file__).resolve().parents[1]


def _cfg(out, **kw):
    base = {"hook_name": "synthetic", "d_sae": 64, "k": 2, "training_tokens": 256 * 40, "batch_size_tokens": 256, "lr": 3e-3,
            "out_dir": str(out), "checkpoint_every_steps": 5, "dead_window_tokens": 1024, "lr_warmup_steps": 3}
    return TrainConfig(**(base | kw))


def _start(code: str) -> subprocess.Popen:
    """A child process that prints READY once it holds what it should, then waits to be killed."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    if "READY" not in line:
        proc.kill()
        raise AssertionError(f"holder did not start: {line!r} {proc.stderr.read()}")
    return proc


def _hold(folder, what="harvest") -> subprocess.Popen:
    return _start(f"""
        import time
        from saebench.lock import folder_lock
        with folder_lock({str(folder)!r}, {what!r}):
            print("READY", flush=True)
            time.sleep(600)
    """)


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stdout.close()
    proc.stderr.close()


def test_second_train_into_the_same_out_dir_is_refused_then_runs_after_the_first_is_killed(tmp_path):
    out = tmp_path / "run"
    # The first writer: a real training process, held mid-run while the second one starts.
    holder = _start(f"""
        import time, torch
        torch.set_num_threads(1)
        from saebench.activations import SyntheticSource
        from saebench.config import TrainConfig
        from saebench.trainers.loop import train
        src = SyntheticSource(d=16, m=32, n_active=2, seed=7, chunk_tokens=2048)
        orig = src.batches
        def slow(*a, **kw):
            for i, item in enumerate(orig(*a, **kw)):
                if i == 12:  # checkpoints of steps 5 and 10 are on disk; stay mid-run until killed
                    print("READY", flush=True)
                    time.sleep(600)
                yield item
        src.batches = slow
        train(TrainConfig(**{_cfg(out).model_dump()!r}), source=src, progress=False)
    """)
    try:
        # The second writer, as a user starts it: the refusal comes before the model loads (this model path does not
        # even exist: without the lock check first, the error would be about the model).
        second = subprocess.run([sys.executable, "-m", "saebench.cli", "train", "--quiet", "--model", str(tmp_path / "no-such-model"),
                                 "--hook-name", "blocks.0.hook_resid_post", "--out-dir", str(out)],
                                capture_output=True, text=True, timeout=300, env=os.environ | {"PYTHONPATH": str(ROOT)}, check=False)
        assert second.returncode == 1, second.stderr
        err = second.stderr.strip()
        assert "Traceback" not in err and len(err.splitlines()) == 1, err
        assert f"{out} is in use by another saebench process (pid {holder.pid} on " in err
        assert "training since" in err and "command: " in err and "another --out-dir" in err
        assert "Free disk space" not in err
        # In-process API users are refused the same way, and the holder's checkpoints are untouched.
        with pytest.raises(FolderInUseError, match=f"pid {holder.pid}"):
            train(_cfg(out), source=SyntheticSource(d=16, m=32, n_active=2, seed=7, chunk_tokens=2048), progress=False)
        assert (out / "checkpoints" / "latest.json").is_file()
    finally:
        _kill(holder)
    # SIGKILL leaves the lock file with the dead holder's details; it must not block the next run.
    assert holder_of(out)["pid"] == holder.pid
    result = train(_cfg(out), source=SyntheticSource(d=16, m=32, n_active=2, seed=7, chunk_tokens=2048), progress=False)
    assert result.steps == 40 and (out / WEIGHTS_FILE).is_file()
    assert (out / LOCK_FILE).read_text() == ""  # released: no stale details left for the next reader


def test_lock_is_reentrant_in_its_thread_and_refused_to_other_threads(tmp_path):
    folder = tmp_path / "f"
    with folder_lock(folder, "training"):
        info = holder_of(folder)
        assert info["pid"] == os.getpid() and info["what"] == "training"
        with folder_lock(folder, "training"):  # the API locks, then the training loop again inside
            pass
        errors = []

        def other():
            try:
                with folder_lock(folder):
                    pass
            except FolderInUseError as e:
                errors.append(str(e))

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert errors and "another thread of this process" in errors[0]
    with folder_lock(folder):  # released
        pass


def test_activation_cache_harvest_is_refused_while_another_process_harvests(tmp_path, tiny_model, text_file):
    from saebench.trainers.loop import make_source

    cache = tmp_path / "cache"
    holder = _hold(cache, "harvest")
    try:
        cfg = TrainConfig(model="unused", hook_name="blocks.0.hook_resid_post", corpus=str(text_file), context_size=32, training_tokens=2048,
                          batch_size_tokens=512, activation_cache=str(cache), out_dir=str(tmp_path / "o"))
        with pytest.raises(FolderInUseError, match=rf"pid {holder.pid} .*harvest since.*this run will reuse the cache"):
            make_source(cfg, tiny_model, progress=False)
        assert not (cache / "cache.json").exists()
    finally:
        _kill(holder)
    src = make_source(cfg, tiny_model, progress=False)  # the stale lock file does not block
    assert json.loads((cache / "cache.json").read_text())["complete"] and src.n_chunks >= 1


def test_dashboards_and_bench_refuse_a_folder_in_use(tmp_path, capsys):
    sae_dir = tmp_path / "sae"
    sae_dir.mkdir()
    (sae_dir / "cfg.json").write_text("{}")
    holder = _hold(sae_dir / "dashboards", "dashboards build")
    try:
        assert main(["dashboards", str(sae_dir), "--quiet"]) == 1
        err = capsys.readouterr().err
        assert f"pid {holder.pid}" in err and "dashboards build since" in err and "Traceback" not in err
    finally:
        _kill(holder)
    bench_out = tmp_path / "bench"
    holder = _hold(bench_out, "bench run")
    try:
        assert main(["bench", str(sae_dir), "--out", str(bench_out), "--no-progress"]) == 1
        err = capsys.readouterr().err
        assert f"pid {holder.pid}" in err and "pass another --out" in err and "Traceback" not in err
    finally:
        _kill(holder)
