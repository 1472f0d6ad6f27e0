"""Shared fixtures: a tiny random TransformerBridge model (booted once per session)."""

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tests run two at a time (pytest -n 2); one thread each keeps the 2 cores busy without contention.
# OMP_NUM_THREADS, when set, wins: scripts/test_kernels.sh runs the suite at 1 and 2 threads.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 1))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Folder of a tiny 2-layer llama (d_model 64) with the SmolLM2 tokenizer."""
    from saebench.models import make_tiny_model

    path = tmp_path_factory.mktemp("tiny_model")
    make_tiny_model(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from saebench.models import load_model

    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="session")
def tiny_model64(tiny_model_dir):
    """The same tiny model in float64: for tests that compare two compute paths for equality.

    In float32 two paths (resumed vs full forward, cached vs uncached) differ by kernel noise that
    depends on the CPU (AVX2 vs AVX-512/AMX) and thread count; in float64 that noise is ~1e-15.
    """
    from saebench.models import load_model

    return load_model(str(tiny_model_dir), dtype=torch.float64)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """A small plain-text corpus file (paragraphs of real-ish English)."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    words = ("the quick brown fox jumps over the lazy dog while a curious cat watches from the old wooden fence "
             "and birds sing in the tall green trees near the quiet river bank").split()
    paras = []
    for i in range(400):
        paras.append(" ".join(words[(i + j) % len(words)] for j in range(40 + i % 17)) + ".")
    path.write_text("\n\n".join(paras))
    return path
