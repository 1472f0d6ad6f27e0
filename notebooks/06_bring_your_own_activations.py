# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 6. Bring your own activations: train and evaluate SAEs on tensors, arrays and files
#
# You already have activations (from another library, another modality, or planted data) and want
# SAEs on them: no model, no corpus, no hook names to fake. This notebook makes a data set with
# *planted* features (so we can check that the SAEs find them), stores it the ways activations
# usually arrive (a tensor, a `.npy` memmap, a folder of safetensors/npy shards, a `DataLoader`),
# trains one SAE from each with `train_and_evaluate(cfg, source=...)`, evaluates them on held-out
# rows with `evaluate_activations`, and shows what `cfg.json` records about where the data came from.
#
# No language model is loaded. `SIZE = "smoke"` (CI) takes seconds; `"full"` trains on 1M rows.

# %% tags=["parameters"]
RUN_DIR = "runs/notebooks"  # the SAEs go to RUN_DIR/byo/<source>/, the data files to RUN_DIR/byo/data/
SIZE = "full"  # "full" (1M rows per SAE) or "smoke" (CI: 16k rows)
D_IN = 64  # width of the activations
N_FEATURES = 256  # planted features
N_ACTIVE = 4  # features active per row
TRAIN_ROWS = None  # None: 1,048,576 (full) / 16,384 (smoke)

# %%
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

import saebench
from saebench import ArraySource, IteratorSource, ShardFolderSource, TensorSource, TrainConfig, evaluate_activations, load_sae, train_and_evaluate
from saebench.activations import SyntheticSource

TRAIN_ROWS = TRAIN_ROWS or {"full": 1 << 20, "smoke": 1 << 14}[SIZE]
HELD_ROWS = 8_192
CHUNK = {"full": 65_536, "smoke": 4_096}[SIZE]  # rows per chunk: the unit read from disk and shuffled
root = Path(RUN_DIR) / "byo"
data_dir = root / "data"
shutil.rmtree(root, ignore_errors=True)  # a fresh start each run (the SAEs below would otherwise resume)
data_dir.mkdir(parents=True)

# %% [markdown]
# ## The data: planted features, stored four ways
#
# Each row is a sum of `N_ACTIVE` of `N_FEATURES` unit vectors with random magnitudes (the synthetic
# source's generator). We write the training rows chunk by chunk into a `.npy` file opened as a
# memmap (so the set never has to be in memory at once) and as a folder of shards of uneven sizes,
# alternately safetensors and npy. The held-out rows come from chunks the training rows never use.

# %%
planted = SyntheticSource(d=D_IN, m=N_FEATURES, n_active=N_ACTIVE, seed=0, chunk_tokens=4_096)
n_blocks = TRAIN_ROWS // 4_096
memmap = np.lib.format.open_memmap(data_dir / "train.npy", mode="w+", dtype=np.float32, shape=(TRAIN_ROWS, D_IN))
shard_dir = data_dir / "shards"
shard_dir.mkdir()
for i in range(n_blocks):
    block = planted.chunk(i).acts["synthetic"]
    memmap[i * 4_096 : (i + 1) * 4_096] = block.numpy()
    # two shards per block, of 1,000 and 3,096 rows: a chunk read spans shard boundaries
    save_file({"x": block[:1_000].contiguous()}, str(shard_dir / f"part_{2 * i:05d}.safetensors"))
    np.save(shard_dir / f"part_{2 * i + 1:05d}.npy", block[1_000:].numpy())
memmap.flush()
held_out = torch.cat([planted.chunk(n_blocks + 10 + j).acts["synthetic"] for j in range(HELD_ROWS // 4_096)])
print(f"train.npy: {TRAIN_ROWS:,} x {D_IN} float32 = {(data_dir / 'train.npy').stat().st_size / 2**20:.1f} MiB; "
      f"{len(list(shard_dir.iterdir()))} shards; held-out {tuple(held_out.shape)}")

# %% [markdown]
# ## One source per way the data arrives
#
# - `TensorSource(x)`: a tensor in memory (here the memmap read back, only for the demo);
# - `ArraySource("train.npy")`: opened memory-mapped, read `chunk_tokens` rows at a time;
# - `ShardFolderSource(folder)`: the shards as one concatenation of rows, read slice by slice;
# - `IteratorSource(factory)`: a function returning a new iterator (here a `DataLoader` whose
#   shuffle generator is seeded *inside* the factory, so every pass is the same and resume is exact).
#
# Each declares its own site name (`hook_name`, default `"activations"`) and, if you say so, the
# `model` / `corpus` it came from; the `TrainConfig` leaves those unset and adopts them.

# %%
def loader():
    rows = torch.from_numpy(np.array(np.load(data_dir / "train.npy", mmap_mode="r")[: TRAIN_ROWS // 4]))  # a quarter, cycled
    return iter(DataLoader(TensorDataset(rows), batch_size=1_024, shuffle=True, generator=torch.Generator().manual_seed(0)))


sources = {
    "tensor": TensorSource(torch.from_numpy(np.load(data_dir / "train.npy")), chunk_tokens=CHUNK),
    "memmap": ArraySource(data_dir / "train.npy", chunk_tokens=CHUNK),
    "shards": ShardFolderSource(shard_dir, chunk_tokens=CHUNK, description="planted features, written as uneven shards"),
    "dataloader": IteratorSource(loader, chunk_tokens=CHUNK),
}
pd.DataFrame([{"source": name} | {k: s.provenance.get(k) for k in ("kind", "n_tokens", "d_in", "hook_name", "model", "description")}
              for name, s in sources.items()])

# %% [markdown]
# ## Train and evaluate
#
# `train_and_evaluate(cfg, source=..., eval_source=...)` trains (checkpointing in `out_dir`; an
# interrupted run resumes exactly where it stopped) and evaluates on the held-out rows with the core
# eval's definitions. `lr` is set explicitly here: for these small SAEs the default scaling rule gives
# a rate too low for a short run.

# %%
cfg = TrainConfig(method="topk", d_sae=4 * N_FEATURES, k=N_ACTIVE, training_tokens=TRAIN_ROWS, batch_size_tokens=1_024, lr=2e-3,
                  lr_warmup_steps=10, dead_window_tokens=TRAIN_ROWS // 4, checkpoint_every_steps=100, eval_tokens=HELD_ROWS)


def recovery(sae) -> float:
    """Fraction of planted features whose closest decoder row has cosine > 0.9."""
    cos = torch.nn.functional.normalize(planted.features, dim=-1) @ sae.W_dec.detach().T
    return (cos.max(1).values > 0.9).float().mean().item()


rows = []
for name, src in sources.items():
    result, m = train_and_evaluate(cfg.model_copy(update={"out_dir": str(root / name)}), source=src, eval_source=held_out, progress=False)
    rows.append({"source": name, "steps": result.steps, "seconds": round(result.seconds, 1), "held-out FVU": m["fvu"],
                 "FVU w/o outliers": m["fvu_without_outliers"], "L0": m["l0"], "cosine": m["cossim"], "dead": m["dead_fraction"],
                 "dead window (tokens)": m["dead_window_tokens"], "dense >1%": m["dense_fraction_1pct"], "planted recovered": recovery(result.sae)})
pd.DataFrame(rows)

# %% [markdown]
# Planted features recovered is the fraction of the `N_FEATURES` planted directions matched by a
# decoder row at cosine > 0.9. The SAE has 4x as many latents as planted features, so most of the
# others never fire on held-out rows: the dead fraction (over the stated window) says so. The
# tensor, memmap and shard sources hold the same rows in the same order and give the same stream,
# so their SAEs are identical; the `DataLoader` shuffles differently.

# %% [markdown]
# ## What `cfg.json` records
#
# No model was involved, so `model_name` is `"none"` (not the default model's name), the site is the
# source's, and `metadata.activation_source` says what the rows were.

# %%
saved = json.loads((root / "shards" / "cfg.json").read_text())
{k: saved[k] for k in ("model_name", "hook_name", "hook_layer", "d_in", "d_sae", "k")} | {"metadata.corpus": saved["metadata"]["corpus"],
                                                                                        "metadata.activation_source": saved["metadata"]["activation_source"]}

# %% [markdown]
# ## Evaluate any SAE on any activations
#
# `evaluate_activations(sae, data)` takes a tensor, an array, a path, a shard folder, an iterator
# factory or a source, and returns FVU (with and without outlier-norm rows), explained variance,
# cosine, L0/L1, dead and dense fractions over the stated window (all evaluated rows), and, with
# `windows=`, the dead fraction over the first N rows. A loaded SAE works the same.

# %%
sae = load_sae(root / "memmap")
m = evaluate_activations(sae, data_dir / "train.npy", max_tokens=2 * CHUNK, windows=(CHUNK,), split="train (first rows)")
{k: m[k] for k in ("n_tokens", "fvu", "explained_variance", "fvu_without_outliers", "n_outlier_tokens", "cossim", "l0", "dead_fraction",
                   "dead_window_tokens", "dead_fraction_by_window", "dense_fraction_1pct", "split")}
