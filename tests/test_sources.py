"""Bring your own activations (issue 20): every source type trains through the public API and resumes
exactly; a memmap larger than the memory budget is read in chunks; ``evaluate_activations`` against
its formulas; provenance in cfg.json; input validation."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import saebench
from saebench.activations import SyntheticSource
from saebench.config import ConfigError, TrainConfig
from saebench.sources import ArraySource, IteratorSource, ShardFolderSource, SourceError, TensorSource, as_source
from interrupt_helper import run_cut_short

D = 16
N = 3000  # rows; with CHUNK = 512: five full chunks and one of 440 (3 batches of 128, 56 rows unused per epoch)
CHUNK = 512
BATCH = 128
STEPS = 40  # 23 batches per epoch: the runs cross an epoch boundary (a new chunk order)


@pytest.fixture(scope="module")
def planted():
    src = SyntheticSource(d=D, m=32, n_active=2, seed=5, chunk_tokens=1000)
    return torch.cat([src.chunk(i).acts["synthetic"] for i in range(3)])  # [3000, 16]


def _cfg(out_dir, **kw):
    base = dict(d_sae=48, k=2, training_tokens=BATCH * STEPS, batch_size_tokens=BATCH, lr=3e-3, lr_warmup_steps=5, checkpoint_every_steps=10,
                dead_window_tokens=1024, log_every_steps=5, out_dir=str(out_dir), eval_tokens=0)
    return TrainConfig(**(base | kw))


def _write_shards(folder, x: torch.Tensor, sizes=(700, 1000, 300, 1000)):
    """Uneven shards (chunks span shard boundaries), alternately .safetensors (with token_ids, as saebench caches) and .npy."""
    folder.mkdir(parents=True, exist_ok=True)
    start = 0
    for i, n in enumerate(sizes):
        part = x[start : start + n].contiguous()
        if i % 2 == 0:
            save_file({"acts.layer": part, "token_ids": torch.zeros(n, dtype=torch.long)}, str(folder / f"part_{i}.safetensors"))
        else:
            np.save(folder / f"part_{i}.npy", part.numpy())
        start += n
    assert start == x.shape[0]
    return folder


def _factory(x):
    return lambda: (x[i : i + 100] for i in range(0, x.shape[0], 100))


def _make(kind, x, tmp_path):
    """A fresh source object of ``kind`` over ``x`` (a resumed run builds its own, as a new process would)."""
    if kind == "tensor":
        return TensorSource(x, chunk_tokens=CHUNK)
    if kind == "array":
        return ArraySource(x.numpy().copy(), chunk_tokens=CHUNK)
    if kind == "npy_memmap":
        path = tmp_path / "acts.npy"
        if not path.exists():
            np.save(path, x.numpy())
        return ArraySource(path, chunk_tokens=CHUNK)
    if kind == "raw_memmap":
        path = tmp_path / "acts.f16"
        if not path.exists():
            x.numpy().astype(np.float16).tofile(path)
        return ArraySource(np.memmap(path, dtype=np.float16, mode="r", shape=(x.shape[0], D)), chunk_tokens=CHUNK)
    if kind == "shards":
        folder = tmp_path / "shards"
        if not folder.exists():
            _write_shards(folder, x)
        return ShardFolderSource(folder, chunk_tokens=CHUNK)
    if kind == "factory":
        return IteratorSource(_factory(x), chunk_tokens=CHUNK)
    if kind == "dataloader":
        from torch.utils.data import DataLoader, TensorDataset

        return IteratorSource(DataLoader(TensorDataset(x), batch_size=96), chunk_tokens=CHUNK)
    if kind == "seeded_shuffle_factory":
        from torch.utils.data import DataLoader, TensorDataset

        return IteratorSource(lambda: iter(DataLoader(TensorDataset(x), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(1))),
                              chunk_tokens=CHUNK)
    if kind == "one_shot":
        def endless():  # a generator object: one-shot, never restarted; a new process makes a new one
            while True:
                yield from (x[i : i + 100].numpy() for i in range(0, x.shape[0], 100))

        return IteratorSource(endless(), chunk_tokens=CHUNK)
    raise ValueError(kind)


KINDS = ["tensor", "array", "npy_memmap", "raw_memmap", "shards", "factory", "dataloader", "seeded_shuffle_factory", "one_shot"]


@pytest.mark.parametrize("kind", KINDS)
def test_source_trains_and_resumes_exactly(kind, planted, tmp_path):
    full = saebench.train(_cfg(tmp_path / "full"), source=_make(kind, planted, tmp_path), progress=False)
    assert full.steps == STEPS and full.history[-1]["l0"] == pytest.approx(2.0)
    assert full.history[-1]["fvu"] < full.history[0]["fvu"]  # it learns
    cut = _cfg(tmp_path / "cut")
    src = _make(kind, planted, tmp_path)
    run_cut_short(lambda: saebench.train(cut, source=src, progress=False), src, after=25)
    ckpt = json.loads((tmp_path / "cut" / "checkpoints" / "latest.json").read_text())
    assert ckpt["step"] == 20 and not (tmp_path / "cut" / "cfg.json").exists()
    resumed = saebench.train(cut, source=_make(kind, planted, tmp_path), progress=False)
    # Same process, same compute path as tests/test_training.py's resume test: bit-equal.
    for (name, a), (_, b) in zip(full.sae.state_dict().items(), resumed.sae.state_dict().items()):
        assert torch.equal(a, b), name
    assert [h["fvu"] for h in full.history] == [h["fvu"] for h in resumed.history]
    cfg = json.loads((tmp_path / "cut" / "cfg.json").read_text())
    assert cfg["hook_name"] == ("layer" if kind == "shards" else "activations")  # the source's, adopted
    assert cfg["model_name"] == "none" and cfg["metadata"]["activation_source"]["model"] is None


def test_row_sources_stream_is_a_pure_function_of_position(planted, tmp_path):
    """Chunks are read whole-row-range by row range; every source over the same rows gives the same batches."""
    streams = {}
    for kind in ("tensor", "npy_memmap", "shards"):
        src = _make(kind, planted, tmp_path)
        streams[kind] = [b.acts[src.hook_names[0]] for b, _ in _take(src.batches(BATCH, seed=3), 30)]
    for k in ("npy_memmap", "shards"):
        assert all(torch.equal(a, b) for a, b in zip(streams["tensor"], streams[k])), k
    # Starting at a stored position gives the rest of the same stream.
    src = _make("shards", planted, tmp_path)
    stream = list(_take(src.batches(BATCH, seed=3), 30))
    pos = stream[11][1]
    again = [b.acts["layer"] for b, _ in _take(_make("shards", planted, tmp_path).batches(BATCH, seed=3, start=pos), 18)]
    assert all(torch.equal(a, b.acts["layer"]) for a, (b, _) in zip(again, stream[12:]))
    # Chunk order is shuffled per epoch (the epoch-0 order too), rows within a chunk by position.
    t = _make("tensor", planted, tmp_path)
    orders = [t.chunk_order(e, 3) for e in range(3)]
    assert all(sorted(o) == list(range(6)) for o in orders) and len({tuple(o) for o in orders}) > 1
    assert t.max_rows_read <= CHUNK


def _take(it, n):
    for i, item in enumerate(it):
        if i == n:
            return
        yield item


def test_memmap_larger_than_memory_budget_is_read_in_chunks(tmp_path):
    """A 128 MiB .npy trained on, resumed and fully evaluated (and the same rows as shards evaluated) in a process whose heap may grow by only 60 MiB.

    RLIMIT_DATA caps the process's private memory (heap and anonymous mappings) while the read-only
    file mapping does not count, so reading the whole file into memory fails (checked first), and
    the source must read chunk by chunk.
    """
    resource = pytest.importorskip("resource")
    n, d = 1 << 20, 32  # 128 MiB of float32
    path = tmp_path / "big.npy"
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    planted = SyntheticSource(d=d, m=64, n_active=3, seed=0, chunk_tokens=1 << 15)
    for i in range(n >> 15):
        mm[i << 15 : (i + 1) << 15] = planted.chunk(i).acts["synthetic"].numpy()
    mm.flush()
    # The same rows as four 32 MiB shards, two safetensors and two npy, for a shard-folder read under the cap.
    shards = tmp_path / "shards"
    shards.mkdir()
    for j in range(4):
        part = torch.from_numpy(np.array(mm[j * (n // 4) : (j + 1) * (n // 4)]))
        if j % 2:
            np.save(shards / f"s{j}.npy", part.numpy())
        else:
            save_file({"x": part}, str(shards / f"s{j}.safetensors"))
    del mm, part
    script = textwrap.dedent(f"""
        import json, resource, numpy as np, torch
        import saebench
        from saebench import ArraySource, TrainConfig, evaluate_activations
        from saebench.evals.dead import DeadLatentCounter  # imported before the cap (imports are not what is measured)
        import saebench.trainers.topk, saebench.api  # noqa

        def vmdata():
            return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmData"))

        # Warm-up on 2,048 in-memory rows, so that lazy imports (torch._dynamo by Adam...) happen before the cap.
        saebench.train(TrainConfig(out_dir={str(tmp_path / "warm")!r}, d_sae=64, k=3, training_tokens=512, batch_size_tokens=256, eval_tokens=0),
                       source=torch.randn(2048, {d}), progress=False)
        evaluate_activations(saebench.load_sae({str(tmp_path / "warm")!r}), torch.randn(64, {d}))
        # Under half the file: reading it whole must fail; chunks fit. The run's own growth (two trainings, three evaluations)
        # is ~10 MiB with the fixed mmap threshold set below (19-37 MiB of mostly allocator slack without it, which once broke
        # a 28 MiB budget on a 64 MiB file).
        budget = 60 << 20
        resource.setrlimit(resource.RLIMIT_DATA, (vmdata() + budget, resource.RLIM_INFINITY))
        out = {{"budget": budget, "file_bytes": {n * d * 4}}}
        try:
            np.load({str(path)!r})
            out["full_read"] = "succeeded"
        except MemoryError:
            out["full_read"] = "MemoryError"
        CHUNK = 8192
        common = dict(d_sae=64, k=3, training_tokens=256 * 80, batch_size_tokens=256, lr=3e-3, lr_warmup_steps=5, checkpoint_every_steps=20,
                      dead_window_tokens=4096, eval_tokens=0)
        full = saebench.train(TrainConfig(out_dir={str(tmp_path / "full")!r}, **common), source=ArraySource({str(path)!r}, chunk_tokens=CHUNK),
                              progress=False)
        src = ArraySource({str(path)!r}, chunk_tokens=CHUNK)
        orig = src.batches
        def dying(*a, **kw):
            for i, item in enumerate(orig(*a, **kw)):
                if i == 50:
                    raise KeyboardInterrupt
                yield item
        src.batches = dying
        cfg = TrainConfig(out_dir={str(tmp_path / "cut")!r}, **common)
        try:
            saebench.train(cfg, source=src, progress=False)
        except KeyboardInterrupt:
            pass
        fresh = ArraySource({str(path)!r}, chunk_tokens=CHUNK)
        resumed = saebench.train(cfg, source=fresh, progress=False)
        out["bit_equal"] = all(torch.equal(a, b) for a, b in zip(full.sae.state_dict().values(), resumed.sae.state_dict().values()))
        out["train_max_rows_read"] = fresh.max_rows_read
        ev = ArraySource({str(path)!r}, chunk_tokens=CHUNK)
        m = evaluate_activations(full.sae, ev, batch_size=4096)
        out |= {{"eval_tokens": m["n_tokens"], "eval_rows_read": ev.rows_read, "eval_max_rows_read": ev.max_rows_read, "fvu": m["fvu"], "l0": m["l0"]}}
        sh = saebench.ShardFolderSource({str(shards)!r}, chunk_tokens=CHUNK)
        ms = evaluate_activations(full.sae, sh, batch_size=4096)
        out |= {{"shard_eval_tokens": ms["n_tokens"], "shard_max_rows_read": sh.max_rows_read, "shard_fvu": ms["fvu"]}}
        out["vmdata_growth"] = vmdata() - (resource.getrlimit(resource.RLIMIT_DATA)[0] - budget)
        print(json.dumps(out))
    """)
    import os

    # A fixed mmap threshold: glibc's dynamic one lets freed 1 MiB chunks stay in a fragmented heap, which VmData (and the
    # cap) count although nothing holds them (repeated evals of the same data retained 0-40 MiB at random without it).
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
                        "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(out)  # the figures docs/README cite (pytest -s)
    assert out["file_bytes"] > 2 * out["budget"]
    assert out["full_read"] == "MemoryError"  # the cap is real: the file does not fit under it
    assert out["bit_equal"]  # interrupted + resumed under the cap == uninterrupted
    assert out["train_max_rows_read"] <= 8192
    assert out["eval_tokens"] == n and out["eval_rows_read"] == n and out["eval_max_rows_read"] == 8192  # every row, one chunk at a time
    assert out["l0"] == pytest.approx(3.0) and out["fvu"] < 0.9
    assert out["shard_eval_tokens"] == n and out["shard_max_rows_read"] == 8192 and out["shard_fvu"] == pytest.approx(out["fvu"], rel=1e-6)
    assert out["vmdata_growth"] < out["budget"]


# --------------------------------------------------------------------------- iterator semantics


def test_one_shot_iterator_limits_are_clear_errors(planted):
    gen = (planted[i : i + 100] for i in range(0, 1000, 100))  # 1,000 rows, once
    src = IteratorSource(gen, chunk_tokens=400)
    assert src.chunk(0).acts["activations"].shape[0] == 400 and src.chunk(1).acts["activations"].shape[0] == 400
    with pytest.raises(SourceError, match="already read from the one-shot iterator.*pass a factory"):
        src.chunk(0)
    assert src.chunk(2).acts["activations"].shape[0] == 200  # what is left
    with pytest.raises(SourceError, match="cannot start another pass; pass a factory"):
        src.chunk(3)
    # A factory starts another pass: the stream is the data, pass after pass.
    fac = IteratorSource(_factory(planted[:1000]), chunk_tokens=400)
    assert torch.equal(fac.chunk(2).acts["activations"], torch.cat([planted[800:1000], planted[:200]]))
    assert torch.equal(fac.chunk(0).acts["activations"], planted[:400]) and fac.passes == 1  # went back: a new iterator


def test_iterator_items_and_errors(planted):
    d = IteratorSource([{"x": planted[:50], "y": torch.zeros(50)}], key="x", chunk_tokens=64)  # a list: re-iterable
    assert torch.equal(d.chunk(0).acts["activations"], torch.cat([planted[:50], planted[:14]]))
    with pytest.raises(SourceError, match="say which holds the activations with key="):
        IteratorSource([{"x": planted[:5], "y": planted[:5]}])
    with pytest.raises(SourceError, match="every batch must have the same d_in"):
        IteratorSource(lambda: iter([planted[:5], planted[:5, :3]]), chunk_tokens=8).chunk(0)
    with pytest.raises(SourceError, match="must take no arguments"):
        IteratorSource(lambda start: iter([]))
    with pytest.raises(SourceError, match="yielded no rows"):
        IteratorSource(lambda: iter([]))
    with pytest.raises(SourceError, match="floating point"):
        IteratorSource([torch.arange(10).view(5, 2)])


# --------------------------------------------------------------------------- validation


def test_inputs_are_validated_with_actionable_errors(planted, tmp_path):
    with pytest.raises(SourceError, match=r"2-D \[n_tokens, d_in\].*reshape\(-1, x.shape\[-1\]\)"):
        TensorSource(torch.zeros(2, 3, 4))
    with pytest.raises(SourceError, match=r"single vector is one token"):
        TensorSource(torch.zeros(4))
    with pytest.raises(SourceError, match="floating point.*int64"):
        TensorSource(torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(SourceError, match="floating point"):
        ArraySource(np.zeros((4, 3), dtype=np.int32))
    with pytest.raises(SourceError, match="0 rows"):
        ArraySource(np.zeros((0, 3), dtype=np.float32))
    bad = planted.clone()
    bad[777, 3] = math.inf
    src = TensorSource(bad, chunk_tokens=CHUNK)
    src.chunk(0)
    with pytest.raises(SourceError, match=r"1 NaN/inf value\(s\) in 1 row\(s\), the first at row 777.*check_finite=False"):
        src.chunk(1)
    assert torch.isinf(TensorSource(bad, chunk_tokens=CHUNK, check_finite=False).chunk(1).acts["activations"]).any()
    # shards: widths must agree, several tensors need key=, non-float refused
    folder = tmp_path / "mixed"
    folder.mkdir()
    np.save(folder / "a.npy", np.zeros((4, 3), np.float32))
    np.save(folder / "b.npy", np.zeros((4, 5), np.float32))
    with pytest.raises(SourceError, match="shard b.npy has width 5, the earlier shards 3"):
        ShardFolderSource(folder)
    save_file({"x": torch.zeros(4, 3), "y": torch.zeros(4, 3)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(SourceError, match=r"several tensors \['x', 'y'\]; say which with key="):
        ShardFolderSource(tmp_path / "two.safetensors")
    assert ShardFolderSource(tmp_path / "two.safetensors", key="y").d_in == {"activations": 3}
    save_file({"ids": torch.zeros(4, 3, dtype=torch.long)}, str(tmp_path / "ints.safetensors"))
    with pytest.raises(SourceError, match="floating point.*I64"):
        ShardFolderSource(tmp_path / "ints.safetensors")
    # half-precision shards are read exactly (plain file reads of the rows asked for), and a truncated shard is reported
    for dt in (torch.bfloat16, torch.float16, torch.float64):
        folder = tmp_path / str(dt)
        folder.mkdir()
        save_file({"x": planted[:300].to(dt)}, str(folder / "a.safetensors"))
        save_file({"x": planted[300:500].to(dt)}, str(folder / "b.safetensors"))
        got = ShardFolderSource(folder, chunk_tokens=256)
        assert torch.equal(got.chunk(1).acts["activations"], planted[256:500].to(dt).float()), dt
    data = (tmp_path / str(torch.float16) / "b.safetensors").read_bytes()
    (tmp_path / str(torch.float16) / "b.safetensors").write_bytes(data[:-10])
    with pytest.raises(SourceError, match="b.safetensors is truncated"):
        ShardFolderSource(tmp_path / str(torch.float16), chunk_tokens=256).chunk(1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no .safetensors or .npy files"):
        ShardFolderSource(tmp_path / "empty")
    with pytest.raises(SourceError, match="cannot make activations"):
        as_source(3.0)
    with pytest.raises(SourceError, match="chunk_tokens must be a positive integer"):
        TensorSource(planted, chunk_tokens=0)


def test_nan_rows_can_be_left_to_the_trainers_policy(planted, tmp_path):
    bad = planted.clone()
    bad[700:710] = math.nan
    with pytest.raises(SourceError, match="first at row 700"):
        saebench.train(_cfg(tmp_path / "a"), source=TensorSource(bad, chunk_tokens=CHUNK), progress=False)
    res = saebench.train(_cfg(tmp_path / "b", on_nonfinite="skip"), source=TensorSource(bad, chunk_tokens=CHUNK, check_finite=False), progress=False)
    assert res.sae.cfg.metadata["skipped_steps"] > 0 and torch.isfinite(res.sae.W_dec).all()


# --------------------------------------------------------------------------- hook / model / provenance


def test_hook_and_provenance_are_adopted_or_refused(planted, tmp_path):
    # Nothing set: the source's site, no model, no corpus, no layer or context.
    res = saebench.train(_cfg(tmp_path / "plain"), source=planted, progress=False)  # a bare tensor: as_source
    cfg = json.loads((tmp_path / "plain" / "cfg.json").read_text())
    assert cfg["hook_name"] == "activations" and cfg["model_name"] == "none" and cfg["hook_layer"] == -1 and cfg["context_size"] is None
    meta = cfg["metadata"]
    assert meta["corpus"] == "none" and meta["train_config"]["model"] == "none" and meta["train_config"]["corpus"] == "none"
    assert meta["activation_source"]["description"] == "in-memory tensor (3000, 16) float32" and meta["activation_source"]["n_tokens"] == N
    assert res.sae.cfg.model_name == "none"
    # The source says what the activations came from: recorded.
    src = TensorSource(planted, hook_name="blocks.6.hook_resid_post", model="gpt2", corpus="hf:Skylion007/openwebtext", chunk_tokens=CHUNK)
    saebench.train(_cfg(tmp_path / "gpt2"), source=src, progress=False)
    cfg = json.loads((tmp_path / "gpt2" / "cfg.json").read_text())
    assert (cfg["model_name"], cfg["hook_name"], cfg["hook_layer"]) == ("gpt2", "blocks.6.hook_resid_post", 6)
    assert cfg["metadata"]["corpus"] == "hf:Skylion007/openwebtext"
    # A config that contradicts the source is an error, not a silent relabel.
    with pytest.raises(ConfigError, match=r"hook 'blocks.3.hook_resid_post' is not provided by the activation source.*leave it unset"):
        saebench.train(_cfg(tmp_path / "x", hook_name="blocks.3.hook_resid_post"), source=TensorSource(planted), progress=False)
    with pytest.raises(ConfigError, match=r"model='gpt2-medium' but the activation source says .* 'gpt2'"):
        saebench.train(_cfg(tmp_path / "y", model="gpt2-medium"), source=src, progress=False)
    # Fields given at their defaults (a config rebuilt from a dump gives every field) count as unset.
    rebuilt = TrainConfig(**_cfg(tmp_path / "rebuilt").model_dump())
    assert {"model", "hook_name", "corpus"} <= rebuilt.model_fields_set
    saebench.train(rebuilt, source=src, progress=False)
    cfg = json.loads((tmp_path / "rebuilt" / "cfg.json").read_text())
    assert (cfg["model_name"], cfg["hook_name"]) == ("gpt2", "blocks.6.hook_resid_post")
    # A model named only in the config (the source names none) is the user's statement: kept.
    saebench.train(_cfg(tmp_path / "named", model="my-vision-net"), source=TensorSource(planted, chunk_tokens=CHUNK), progress=False)
    assert json.loads((tmp_path / "named" / "cfg.json").read_text())["model_name"] == "my-vision-net"
    # The synthetic source declares itself too.
    saebench.train(_cfg(tmp_path / "syn"), source=SyntheticSource(d=D, m=32, seed=0, chunk_tokens=1024), progress=False)
    cfg = json.loads((tmp_path / "syn" / "cfg.json").read_text())
    assert cfg["model_name"] == "none" and cfg["hook_name"] == "synthetic" and cfg["metadata"]["activation_source"]["kind"] == "synthetic"


def test_own_subclass_without_provenance_records_no_model(planted, tmp_path):
    """The issue's case: a hand-written ActivationSource. Its SAE no longer claims the default model."""
    from saebench.activations import ActivationSource, Batch

    class Mine(ActivationSource):
        hook_names = ["mine"]
        d_in = {"mine": D}
        n_chunks = 3

        def chunk(self, i):
            x = planted[i * 1000 : (i + 1) * 1000]
            return Batch({"mine": x}, torch.zeros(len(x), dtype=torch.long))

    saebench.train(_cfg(tmp_path / "mine"), source=Mine(), progress=False)
    cfg = json.loads((tmp_path / "mine" / "cfg.json").read_text())
    assert (cfg["model_name"], cfg["hook_name"], cfg["metadata"]["corpus"]) == ("none", "mine", "none")
    assert cfg["metadata"]["activation_source"]["kind"] == "Mine" and "declares no provenance" in cfg["metadata"]["activation_source"]["description"]
    # With a model object given, the config's model stands (the activations may well be that model's).
    saebench.train(_cfg(tmp_path / "with_model"), source=Mine(), model=object(), progress=False)
    cfg = json.loads((tmp_path / "with_model" / "cfg.json").read_text())
    assert cfg["model_name"] == "smollm2-135m" and "activation_source" not in cfg["metadata"]
    # A method that runs the model cannot train on activations from no named model.
    with pytest.raises(ConfigError, match="method 'e2e' runs the language model the activations came from, and none is named"):
        saebench.train(_cfg(tmp_path / "e2e", method="e2e"), source=TensorSource(planted), progress=False)


def test_resume_refuses_another_stream(planted, tmp_path):
    cfg = _cfg(tmp_path / "r")
    src = TensorSource(planted, chunk_tokens=CHUNK)
    run_cut_short(lambda: saebench.train(cfg, source=src, progress=False), src, after=15)
    with pytest.raises(ConfigError, match=r"another activation stream \(chunk_tokens: 512 then, 1024 now\)"):
        saebench.train(cfg, source=TensorSource(planted, chunk_tokens=1024), progress=False)
    with pytest.raises(ConfigError, match=r"another activation stream \(n_tokens: 3000 then, 2000 now\)"):
        saebench.train(cfg, source=TensorSource(planted[:2000], chunk_tokens=CHUNK), progress=False)
    with pytest.raises(ConfigError, match=r"d_in=16 activations, but the source gives d_in=8"):
        saebench.train(cfg, source=TensorSource(planted[:, :8].contiguous(), chunk_tokens=CHUNK), progress=False)


# --------------------------------------------------------------------------- evaluate_activations


def _hand_topk1():
    """d_in 2, three latents: e1, e2 and a third that never wins (b_enc −100); TopK with k = 1."""
    from saebench.sae import SAE, SAEConfig

    sae = SAE(SAEConfig(architecture="topk", d_in=2, d_sae=3, k=1, hook_name="activations"))
    with torch.no_grad():
        w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
        sae.W_dec.copy_(w)
        sae.encoder_weight.copy_(w)
        sae.b_enc.copy_(torch.tensor([0.0, 0.0, -100.0]))
    return sae


def test_evaluate_activations_matches_hand_computed_metrics():
    sae = _hand_topk1()
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 2.0], [0.0, -1.0]])
    # By hand: x̂ = [1,0], [0,2], [3,0], [0,0] (the last row's top latent has value 0: no latent fires).
    m = saebench.evaluate_activations(sae, x)
    assert m["n_tokens"] == 4 and m["dead_window_tokens"] == 4
    assert m["fvu"] == pytest.approx(5 / 12.75)  # SSE 0+0+4+1; Σ‖x − x̄‖² with x̄ = (1, 0.75)
    assert m["explained_variance"] == pytest.approx(1 - 5 / 12.75)
    assert m["mse"] == pytest.approx(5 / 8)
    assert m["cossim"] == pytest.approx((1 + 1 + 3 / math.sqrt(13) + 0) / 4)
    assert m["l2_ratio"] == pytest.approx((1 + 1 + 3 / math.sqrt(13) + 0) / 4)
    assert m["relative_reconstruction_bias"] == pytest.approx(14 / 14)
    assert m["l0"] == pytest.approx(3 / 4) and m["l1"] == pytest.approx(6 / 4)
    assert m["dead_fraction"] == pytest.approx(1 / 3) and m["frac_alive"] == pytest.approx(2 / 3)  # latent 2 never fires
    assert m["dense_fraction_1pct"] == pytest.approx(2 / 3) and m["dense_fraction_10pct"] == pytest.approx(2 / 3)  # densities 1/2, 1/4, 0
    assert m["n_outlier_tokens"] == 0 and m["fvu_without_outliers"] == pytest.approx(m["fvu"])
    assert "ce_loss_score" not in m and m["source"]["kind"] == "tensor"


def test_evaluate_activations_outliers_and_windows():
    sae = _hand_topk1()
    x = torch.tensor([[2.0, 1.0], [0.0, 1.0], [1.0, 0.0], [2.0, 0.0], [40.0, 30.0]])
    # Norms √5, 1, 1, 2, 50: median 2, so [40, 30] (50 > 10 x 2) is the outlier. x̂ = [2,0], [0,1], [1,0], [2,0], [40,0].
    m = saebench.evaluate_activations(sae, x, windows=(2, 5, 10))
    xd = x.double()
    assert m["fvu"] == pytest.approx((1 + 900) / (xd - xd.mean(0)).pow(2).sum().item())
    assert m["n_outlier_tokens"] == 1
    assert m["fvu_without_outliers"] == pytest.approx(1 / 3.75)  # SSE 1; x̄ = (1.25, 0.5): 0.8125 + 1.8125 + 0.3125 + 0.8125
    assert m["dead_fraction_by_window"] == {"2": pytest.approx(1 / 3), "5": pytest.approx(1 / 3)} and m["windows_unavailable"] == [10]
    # The outlier rule uses each batch's median (as the core eval uses each model batch's), recorded with the metrics.
    m2 = saebench.evaluate_activations(sae, x, batch_size=2)
    assert m2["outlier_batch_tokens"] == 2 and m2["n_outlier_tokens"] == 0 and m2["fvu"] == pytest.approx(m["fvu"])
    assert saebench.evaluate_activations(sae, x, max_tokens=3)["n_tokens"] == 3


def test_evaluate_activations_equals_the_core_eval_on_the_same_tokens(tiny_model):
    """Same definitions, same code: on the activations the core eval sees, every shared metric is identical."""
    from saebench.evals.core import evaluate_core
    from saebench.sae import SAE, SAEConfig

    hook = "blocks.0.hook_resid_post"
    torch.manual_seed(0)
    tokens = torch.randint(3, 1000, (4, 12))
    tokens[:, 0] = 1
    sae = SAE(SAEConfig(architecture="topk", d_in=64, d_sae=96, k=5, hook_name=hook))
    sae.init_tied(torch.Generator().manual_seed(0))
    core = evaluate_core(sae, tiny_model, tokens, special_ids=torch.tensor([0, 1, 2]), batch_size=16, downstream=False, progress=False)
    _, cache = tiny_model.run_with_cache(tokens, names_filter=lambda n: n == hook)
    x = cache[hook][:, 1:].reshape(-1, 64)
    mine = saebench.evaluate_activations(sae, x, batch_size=x.shape[0])
    for k, v in core.items():
        if isinstance(v, float):
            assert mine[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
        else:
            assert mine[k] == v, k


def test_evaluate_activations_same_result_from_every_source(planted, tmp_path):
    from saebench.sae import SAE, SAEConfig

    sae = SAE(SAEConfig(architecture="topk", d_in=D, d_sae=40, k=3, hook_name="activations"))
    sae.init_tied(torch.Generator().manual_seed(1))
    ref = saebench.evaluate_activations(sae, planted, batch_size=500)
    for kind in ("array", "npy_memmap", "factory", "dataloader"):
        m = saebench.evaluate_activations(sae, _make(kind, planted, tmp_path), batch_size=500)
        assert m["n_tokens"] == N and m["fvu"] == pytest.approx(ref["fvu"], rel=1e-5) and m["l0"] == pytest.approx(ref["l0"]), kind
    shards = _make("shards", planted, tmp_path)  # hook "layer": the SAE's is "activations"; a one-hook source is read anyway
    assert saebench.evaluate_activations(sae, shards, batch_size=500)["fvu"] == pytest.approx(ref["fvu"], rel=1e-5)
    with pytest.raises(ValueError, match=r"SAE expects d_in=16.*have width 8"):
        saebench.evaluate_activations(sae, planted[:, :8])
    with pytest.raises(ValueError, match="unbounded; pass max_tokens"):
        saebench.evaluate_activations(sae, SyntheticSource(d=D, hook_name="activations"))
    with pytest.raises(SourceError, match="first at row 5"):
        saebench.evaluate_activations(sae, torch.cat([planted[:5], torch.full((1, D), math.nan)]))


def test_train_and_evaluate_with_a_source(planted, tmp_path):
    train_x, held = planted[:2500], planted[2500:]
    cfg = _cfg(tmp_path / "te", eval_tokens=400)
    result, metrics = saebench.train_and_evaluate(cfg, source=ArraySource(train_x.numpy(), chunk_tokens=CHUNK), eval_source=held)
    assert metrics["split"] == "held-out" and metrics["n_tokens"] == 400 and metrics["l0"] == pytest.approx(2.0)
    assert metrics["fvu"] == pytest.approx(saebench.evaluate_activations(result.sae, held[:400])["fvu"])
    assert json.loads((tmp_path / "te" / "eval_activations.json").read_text())["fvu"] == pytest.approx(metrics["fvu"])
    # without eval_source: the training data, labelled as such
    _, m2 = saebench.train_and_evaluate(_cfg(tmp_path / "te2", eval_tokens=300), source=train_x)
    assert m2["split"] == "train" and m2["n_tokens"] == 300
    with pytest.raises(ValueError, match="eval_source is for training on a source you give"):
        saebench.train_and_evaluate(_cfg(tmp_path / "te3"), eval_source=held)
