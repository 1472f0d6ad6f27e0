"""What tests/test_distributed.py and its torchrun worker share: the data and the SAEs to train."""

from pathlib import Path

import torch

from saebench.activations import ActivationSource, Batch, Position
from saebench.config import TrainConfig

WORLD = 2
SOURCE = dict(d=16, m=32, n_active=2, seed=5, chunk_tokens=1024)


def configs(root: Path) -> list[TrainConfig]:
    """TopK with AuxK active (tiny dead window), BatchTopK with its threshold EMA running, JumpReLU past its warm start."""
    common = dict(hook_name="synthetic", d_sae=64, k=2, training_tokens=512 * 24, batch_size_tokens=512, lr=4e-3, lr_warmup_steps=4,
                  dead_window_tokens=1024, checkpoint_every_steps=1000, log_every_steps=4, normalize_activations="expected_average_only_in")
    return [
        TrainConfig(method="topk", out_dir=str(root / "topk"), seed=0, **common),
        TrainConfig(method="batchtopk", out_dir=str(root / "batchtopk"), seed=1, method_options={"threshold_start_step": 4}, **common),
        # Target-L0 JumpReLU: its TopK warm start hands over at step 12, with thresholds from the global batch.
        TrainConfig(method="jumprelu", out_dir=str(root / "jumprelu"), seed=2, method_options={"sparsity_mode": "target_l0"}, **common),
    ]


class GlobalBatches(ActivationSource):
    """One process's view of what WORLD data-parallel ranks read together: their slices, concatenated."""

    def __init__(self, inner: ActivationSource, world: int = WORLD):
        self.inner, self.world = inner, world
        self.hook_names, self.d_in = inner.hook_names, inner.d_in

    @property
    def n_chunks(self):
        return self.inner.n_chunks

    def chunk(self, i: int) -> Batch:
        return self.inner.chunk(i)

    def batches(self, batch_size: int, seed: int = 0, start: Position = Position()):
        streams = [self.inner.batches(batch_size // self.world, seed, start, rank=r, world=self.world) for r in range(self.world)]
        for parts in zip(*streams):
            batches = [b for b, _ in parts]
            acts = {h: torch.cat([b.acts[h] for b in batches]) for h in self.hook_names}
            yield Batch(acts, torch.cat([b.token_ids for b in batches])), parts[0][1]
