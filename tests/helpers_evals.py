"""Hand-built SAEs and planted tiny models shared by the eval tests (steering, circuits, bench, dead)."""

from __future__ import annotations

import torch
from torch import Tensor

from saebench.sae import SAE, SAEConfig


def hand_sae(W_dec: Tensor, hook: str, *, arch: str = "relu", W_enc: Tensor | None = None, b_enc: Tensor | None = None,
             b_dec: Tensor | None = None, k: int | None = None, model_name: str = "tiny", method: str = "hand") -> SAE:
    """An SAE with the given decoder rows (encoder = decoderᵀ unless given, zero biases unless given)."""
    d_sae, d_in = W_dec.shape
    sae = SAE(SAEConfig(architecture=arch, d_in=d_in, d_sae=d_sae, k=k, hook_name=hook, model_name=model_name, method=method,
                        hook_layer=int(hook.split(".")[1]) if hook.startswith("blocks.") else -1))
    with torch.no_grad():
        sae.W_dec.copy_(W_dec)
        sae.encoder_weight.copy_(W_dec if W_enc is None else W_enc.T)
        if b_enc is not None:
            sae.b_enc.copy_(b_enc)
        if b_dec is not None:
            sae.b_dec.copy_(b_dec)
    return sae


def identity_sae(d: int, hook: str) -> SAE:
    """x̂ = x exactly: W_enc = W_dec = I, signed (AbsTopK) with k = d keeps every coordinate."""
    return hand_sae(torch.eye(d), hook, arch="abstopk", k=d)


def orthonormal_sae(first_row: Tensor, hook: str, seed: int = 0) -> SAE:
    """An exact (x̂ = x) SAE whose decoder is an orthonormal basis with ``first_row`` (normalised) as row 0."""
    d = first_row.numel()
    g = torch.Generator().manual_seed(seed)
    m = torch.cat([first_row[None].float(), torch.randn(d - 1, d, generator=g)])
    q, _ = torch.linalg.qr(m.T)  # columns orthonormal, first ∝ first_row
    basis = q.T.contiguous()
    if torch.dot(basis[0], first_row.float()) < 0:
        basis[0] = -basis[0]
    return hand_sae(basis, hook, arch="abstopk", k=d)


def random_topk_sae(d_in: int, d_sae: int, k: int, hook: str, seed: int = 0, method: str = "topk") -> SAE:
    sae = SAE(SAEConfig(architecture="topk", d_in=d_in, d_sae=d_sae, k=k, hook_name=hook, model_name="tiny", method=method,
                        hook_layer=int(hook.split(".")[1]) if hook.startswith("blocks.") else -1))
    sae.init_tied(torch.Generator().manual_seed(seed))
    return sae


def plant_token(model, token: int, scale: float = 40.0) -> Tensor:
    """Scale the unembedding row of ``token`` so the residual direction W_U[:, token] controls its logit; returns that unit direction."""
    with torch.no_grad():
        model.original_model.lm_head.weight[token] *= scale
    u = model.W_U[:, token].detach().float()
    return u / u.norm()
