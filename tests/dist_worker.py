"""Worker for tests/test_distributed.py, launched by ``torchrun --nproc-per-node 2`` (gloo, CPU).

Runs every distributed scenario of the test in one launch (start-up is the slow part) and leaves the
trained SAEs in OUT/<scenario>/...; the test compares them with single-process runs.

    torchrun --standalone --nproc-per-node 2 tests/dist_worker.py OUT
"""

import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

from saebench.trainers.loop import train_many  # noqa: E402

from saebench import distributed  # noqa: E402
from saebench.activations import SyntheticSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from dist_common import SOURCE, configs  # noqa: E402


def main(out: Path) -> None:
    rank, world = distributed.init_from_env("cpu")
    assert world == 2, world
    src = SyntheticSource(**SOURCE)
    # data parallel: every rank holds every SAE and reads half of each global batch
    train_many(configs(out / "dp"), source=src, progress=False)
    # distribute_modules: SAE i lives on rank i % 2
    res = train_many(configs(out / "dm"), source=src, progress=False, distribute_modules=True)
    assert [r is not None for r in res] == [i % world == rank for i in range(len(res))]
    # Both ranks reach the end before either tears gloo down: a rank that destroys its group while the other still
    # talks to it can abort the other ("terminate called without an active exception"), seen once under load in CI.
    distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
