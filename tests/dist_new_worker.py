"""Worker for tests/test_new_methods.py's data-parallel test, launched by ``torchrun --nproc-per-node 2`` (gloo, CPU).

    torchrun --standalone --nproc-per-node 2 tests/dist_new_worker.py OUT
"""

import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

from saebench.trainers.loop import train_many  # noqa: E402

from saebench import distributed  # noqa: E402
from saebench.activations import SyntheticSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from dist_common import SOURCE  # noqa: E402
from test_new_methods import dp_configs  # noqa: E402


def main(out: Path) -> None:
    _, world = distributed.init_from_env("cpu")
    assert world == 2, world
    train_many(dp_configs(out), source=SyntheticSource(**SOURCE), progress=False)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
