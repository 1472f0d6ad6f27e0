"""Comparing latents across SAEs on the same hook: decoder directions, co-activation over the same tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import Tensor

from saebench.dashboards.config import TOKEN_CODES_FILE, TOKENS_FILE
from saebench.io import ArtifactError
from saebench.layout import weights_file


def decoder_directions(sae_dir: str | Path) -> Tensor:
    """Unit-norm decoder rows [d_sae, d_in] of the SAE in ``sae_dir`` (only ``W_dec`` is read)."""
    from safetensors import safe_open

    f = weights_file(sae_dir)
    if f is None:
        raise ArtifactError(f"{sae_dir} holds no SAE weights")
    with safe_open(str(f), framework="pt") as fh:
        W = fh.get_tensor("W_dec").float()
    return W / W.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def cosine_matches(direction: Tensor, W_unit: Tensor, k: int = 5) -> list[tuple[int, float]]:
    """The ``k`` rows of ``W_unit`` closest in cosine to ``direction`` (a unit vector): (latent, cosine)."""
    cos = W_unit @ direction.float()
    top = cos.topk(min(k, len(cos)))
    return [(int(j), float(v)) for j, v in zip(top.indices, top.values)]


class TokenCodes:
    """The sparse codes a dashboard build kept (``token_codes.safetensors``), token-major."""

    def __init__(self, folder: str | Path):
        from safetensors.torch import load_file

        self.folder = Path(folder)
        t = load_file(str(self.folder / TOKEN_CODES_FILE))
        self.row_ptr = t["row_ptr"].numpy()
        self.feat = t["feat"].numpy()
        self.val = t["val"].numpy().astype(np.float64)
        self.n_valid = max(int(t["n_valid"]), 1)
        self.n_positions = len(self.row_ptr) - 1
        d = int(self.feat.max()) + 1 if len(self.feat) else 0
        s1 = np.bincount(self.feat, weights=self.val, minlength=d)
        s2 = np.bincount(self.feat, weights=self.val * self.val, minlength=d)
        self.mean = s1 / self.n_valid
        self.std = np.sqrt(np.clip(s2 / self.n_valid - self.mean**2, 0, None))

    @staticmethod
    def available(folder: str | Path) -> bool:
        return (Path(folder) / TOKEN_CODES_FILE).is_file()

    def latent(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(positions, values) where latent ``i`` is non-zero."""
        entries = np.flatnonzero(self.feat == i)
        return np.searchsorted(self.row_ptr, entries, side="right") - 1, self.val[entries]

    def _stat(self, arr: np.ndarray, i: int) -> float:
        return float(arr[i]) if i < len(arr) else 0.0

    def coactivation(self, pos: np.ndarray, vals: np.ndarray, mean_a: float, std_a: float, k: int = 5) -> list[tuple[int, float]]:
        """Latents of THIS SAE most correlated (Pearson, over the same valid tokens) with activations
        ``vals`` at ``pos`` of another SAE's latent (mean ``mean_a``, std ``std_a`` over those tokens)."""
        if len(pos) == 0 or std_a <= 0:
            return []
        starts, stops = self.row_ptr[pos], self.row_ptr[pos + 1]
        lens = stops - starts
        owner = np.repeat(np.arange(len(pos)), lens)
        idx = np.repeat(starts - np.cumsum(lens) + lens, lens) + np.arange(lens.sum())
        j = self.feat[idx]
        cross = np.bincount(j, weights=self.val[idx] * vals[owner], minlength=len(self.mean))
        cand = np.flatnonzero(cross)
        den = std_a * self.std[cand]
        r = np.where(den > 0, (cross[cand] / self.n_valid - mean_a * self.mean[cand]) / np.where(den > 0, den, 1), 0.0)
        order = np.argsort(-r, kind="stable")[:k]
        return [(int(cand[o]), float(r[o])) for o in order if r[o] > 0]


def same_tokens(folder_a: str | Path, folder_b: str | Path) -> bool:
    """Whether two dashboard folders scanned exactly the same token set (co-activation needs that)."""
    a, b = Path(folder_a) / TOKENS_FILE, Path(folder_b) / TOKENS_FILE
    if not (a.is_file() and b.is_file()):
        return False
    ta, tb = np.load(a, mmap_mode="r"), np.load(b, mmap_mode="r")
    return ta.shape == tb.shape and bool(np.array_equal(ta, tb))


def same_site(cfg_a: dict, cfg_b: dict) -> bool:
    """Whether two SAE configs read the same hook of the same width (so their decoder rows compare)."""
    return bool(cfg_a.get("hook_name")) and cfg_a.get("hook_name") == cfg_b.get("hook_name") and cfg_a.get("d_in") == cfg_b.get("d_in")
