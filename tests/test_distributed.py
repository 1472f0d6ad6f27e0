"""Data-parallel training (torchrun, 2 gloo processes) equals one process on the same global batches.

One torchrun launch trains, on 2 ranks, a TopK SAE (AuxK active) and a BatchTopK SAE (global top-k·B,
threshold EMA) twice: data parallel, and with ``distribute_modules``. Each is compared with a
single-process run fed the same global batches (the ranks' slices concatenated). Also: the sharded
stream reads disjoint chunks, and the single-process reductions are no-ops.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from saebench.trainers.base import normalized_mse
from saebench.trainers.loop import load_training_log, train_many

from saebench import distributed, sparse
from saebench.activations import SyntheticSource
from saebench.sae import SAE

sys.path.insert(0, str(Path(__file__).parent))
from dist_common import SOURCE, WORLD, GlobalBatches, configs  # noqa: E402


@pytest.fixture(scope="module")
def torchrun_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parent))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}", str(Path(__file__).parent / "dist_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same SAEs trained by one process on the concatenated global batches."""
    root = tmp_path_factory.mktemp("single")
    train_many(configs(root), source=GlobalBatches(SyntheticSource(**SOURCE)), progress=False)
    return root


def _assert_same_sae(a_dir: Path, b_dir: Path, atol: float = 1e-6) -> None:
    a, b = SAE.load(a_dir), SAE.load(b_dir)
    for (name, ta), (_, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(ta, tb, rtol=1e-5, atol=atol, msg=lambda m: f"{a_dir.name}.{name}: {m}")
    ha, hb = load_training_log(a_dir)["history"], load_training_log(b_dir)["history"]
    assert [h["step"] for h in ha] == [h["step"] for h in hb]
    for ra, rb in zip(ha, hb):
        for key in ("fvu", "l0", "dead_fraction", "loss"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), (a_dir.name, ra["step"], key)


@pytest.mark.parametrize("mode", ["dp", "dm"])
@pytest.mark.parametrize("method", ["topk", "batchtopk", "jumprelu"])
def test_two_ranks_equal_one_process_on_the_global_batch(torchrun_out, reference, mode, method):
    _assert_same_sae(torchrun_out / mode / method, reference / method)
    meta = SAE.load(torchrun_out / mode / method).cfg.metadata
    assert meta["world_size"] == WORLD
    if method == "topk":  # AuxK was live, so its global normaliser was exercised
        assert any("loss/auxiliary_reconstruction_loss" in h for h in load_training_log(reference / method)["history"])
    else:  # the global threshold EMA ran, and matches
        assert torch.isfinite(SAE.load(reference / method).threshold).all()


def test_sharded_stream_reads_disjoint_chunks_in_rounds():
    src = SyntheticSource(**SOURCE)
    seen = {r: [] for r in range(2)}
    for r in range(2):
        orig = src.chunk
        src.chunk = lambda i, r=r, orig=orig: (seen[r].append(i), orig(i))[1]
        stream = src.batches(128, seed=0, rank=r, world=2)
        positions = [next(stream)[1] for _ in range(17)]  # 8 batches per chunk: 3 rounds touched
        src.chunk = orig
        assert positions[7].chunk == 0 and positions[8].chunk == 2 and positions[16].chunk == 4
    assert seen[0] == [0, 2, 4] and seen[1] == [1, 3, 5]


def test_reductions_are_no_ops_without_a_process_group():
    x, x_hat = torch.randn(32, 8), torch.randn(32, 8)
    with distributed.data_parallel():
        assert not distributed.active()
        torch.testing.assert_close(normalized_mse(x_hat, x), (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
        assert int(sparse.batch_topk_mask(torch.randn(8, 20), 13).sum()) == 13
    assert distributed.init_from_env() == (0, 1)
