"""Worker for tests/test_new_methods.py's data-parallel test, launched by ``torchrun --nproc-per-node 2`` (gloo, CPU).

    torchrun --standalone --nproc-per-node 2 tests/dist_new_worker.py OUT
"""

import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

from saebench.trainers.loop import train_many

from saebench import distributed
from saebench.activations import SyntheticSource

sys.path.insert(0, str(Path(__file__).parent))
from dist_common import SOURCE
from test_new_methods import dp_configs


def main(out: Path) -> None:
    _, world = distributed.init_from_env("cpu")
    assert world == 2, world
    train_many(dp_configs(out), source=SyntheticSource(**SOURCE), progress=False)
    # Both ranks reach the end before either tears gloo down: a rank that destroys its group while the other still
    # talks to it can abort the other ("terminate called without an active exception"), seen once under load in CI.
    distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
