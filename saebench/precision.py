"""Mixed precision for SAE training: bf16 autocast over fp32 master weights, and TF32 on CUDA.

The SAE's one dense product (the encoder's ``x @ W_encᵀ``, see ``saebench.sparse``) dominates a TopK step
once decoding and the backward pass are sparse, so running it in bf16 is where autocast pays ("almost
2x" in sparsify). The parameters, their gradients and Adam's state stay float32: ``gather_pre`` carries the
selected pre-activations back at the weights' precision, and the sparse decode, the losses and the
O(B·K·d) backward run in float32. The same code runs on CPU (bf16 autocast is supported there, which is
how the tests check it), where it saves memory traffic but rarely time.
"""

from __future__ import annotations

import contextlib

import torch


def device_type(device: str | torch.device) -> str:
    """``'cuda'`` for ``cuda:1`` etc.; the autocast device type."""
    return torch.device(device).type


def configure_matmul_precision(device: str | torch.device, tf32: bool = True) -> bool:
    """Allow TF32 float32 matmuls (and cuDNN convolutions) on CUDA; returns whether TF32 is now on.

    Global to the process, as in PyTorch itself. No-op (returns False) for other devices.
    """
    if device_type(device) != "cuda" or not tf32:
        return False
    torch.set_float32_matmul_precision("high")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def autocast(enabled: bool, device: str | torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when ``enabled`` (the training step's forward and loss), else a no-op."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type(device), dtype=torch.bfloat16)
