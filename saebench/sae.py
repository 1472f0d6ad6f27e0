"""The SAE: one module for every method at inference, saved as SAELens does (``sae_weights.safetensors`` + ``cfg.json``).

Training methods (``saebench.trainers``) differ in how they *select* latents during training; at
inference every SAE is one of a few architectures:

- ``topk``: ReLU of the k largest pre-activations per token;
- ``abstopk``: the k largest |pre-activations| per token, signs kept;
- ``jumprelu``: ``pre · 1[pre > θ_i]`` (JumpReLU; also BatchTopK, Mutual and Feature Choice export);
- ``abs_jumprelu``: ``pre · 1[|pre| > θ_i]`` (the batch AbsTopK variant);
- ``relu``: plain ReLU (end-to-end and ``standard`` L1 SAEs); written to cfg.json as SAELens' ``standard``, so SAELens loads it;
- ``gated``: ``1[π_gate > 0] · ReLU(e^{r_mag} ⊙ (W_enc(x − b_dec)) + b_mag)`` with π_gate = W_enc(x − b_dec) + b_gate
  (Rajamanoharan et al. 2024; saved as SAELens' ``gated``: ``b_gate``, ``r_mag``, ``b_mag``, no ``b_enc``);
- ``matching_pursuit``: the encoder is greedy matching pursuit on the decoder rows (tied; no encoder weights
  are used), saved with SAELens' ``residual_threshold`` / ``max_iterations`` / ``stop_on_duplicate_support``;
- ``itda``: signed matching pursuit (argmax |⟨r, d_i⟩|, signed coefficients) for ``max_iterations`` steps on a
  dictionary of normalised real activations, no biases (ITDA, Leask et al. 2025; not a SAELens architecture);
- ``top_afa``: ReLU of the k(x) largest pre-activations, k(x) chosen per token so that the selected code's norm
  best matches ‖x − b_dec‖ (top-AFA, Lee et al. 2025; no fixed k; not a SAELens architecture).

Transcoders (``d_out`` set): any of the encoders above reading ``hook_name`` and a decoder writing the
``d_out``-wide activation at ``hook_name_out``; ``skip_connection`` adds a linear term ``W_skip x``
(skip-transcoders). See "Transcoders" below and ``saebench.trainers.transcoder``.

Weights follow SAELens/SAEBench conventions: ``W_enc`` [d_in, d_sae], ``W_dec`` [d_sae, d_in] with
unit-norm rows, ``b_enc`` [d_sae], ``b_dec`` [d_in], ``threshold`` [d_sae]. Internally the encoder is
stored latent-major (``encoder_weight`` [d_sae, d_in]) so the sparse backward reads contiguous rows.
"""

from __future__ import annotations

import math
import typing
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_serializer
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from saebench import sparse
from saebench.io import ArtifactError, check_against_manifest, read_json, save_tensors, write_json, write_manifest
from saebench.layout import CFG_FILE, LEGACY_WEIGHTS_FILE, MANIFEST_FILE, WEIGHTS_FILE, weights_file
from saebench.site import Site
from saebench.sparse import SparseActs

TRANSCODER_FIELDS = ("d_out", "hook_name_out", "hook_layer_out", "skip_connection")
Architecture = Literal["topk", "abstopk", "jumprelu", "abs_jumprelu", "relu", "gated", "matching_pursuit", "top_afa", "itda"]
THRESHOLD_ARCHS = ("jumprelu", "abs_jumprelu")
SIGNED_ARCHS = ("abstopk", "abs_jumprelu")
FORMAT_VERSION = 1
__all__ = ["SAE", "SAEConfig", "load_sae", "WEIGHTS_FILE", "LEGACY_WEIGHTS_FILE", "CFG_FILE"]


class SAEConfig(BaseModel):
    """What an SAE is and where it came from; written to ``cfg.json`` with SAELens field names."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    architecture: Architecture
    d_in: int = Field(gt=0)
    d_sae: int = Field(gt=0)
    k: int | None = Field(default=None, gt=0, description="Latents per token for topk/abstopk.")
    model_name: str = ""
    hook_name: str = ""
    hook_layer: int = -1
    hook_head_index: int | None = None
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    dtype: str = "float32"
    device: str = "cpu"
    context_size: int | None = None
    prepend_bos: bool = True
    method: str = ""
    # matching_pursuit only (SAELens names): stop a token once its residual norm is below this (0: never)...
    residual_threshold: float | None = Field(default=None, ge=0)
    # ...or after this many pursuit steps (None: d_in, SAELens' default)...
    max_iterations: int | None = Field(default=None, gt=0)
    # ...or once a step leaves the token's set of active latents unchanged.
    stop_on_duplicate_support: bool | None = None
    # transcoders only (SAELens names; written only when set): the output's width and hook, and a linear skip W_skip x
    d_out: int | None = Field(default=None, gt=0)
    hook_name_out: str | None = None
    hook_layer_out: int | None = None
    skip_connection: bool | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @model_serializer(mode="wrap")
    def _drop_unset_mp_fields(self, handler) -> dict[str, Any]:
        """The matching-pursuit fields are written only when set (every other architecture's cfg.json is unchanged)."""
        from saebench.encoders import MP_FIELDS

        data = handler(self)
        return {k: v for k, v in data.items() if not (k in MP_FIELDS + TRANSCODER_FIELDS and v is None)}

    @property
    def is_transcoder(self) -> bool:
        return self.d_out is not None

    @property
    def signed(self) -> bool:
        """Whether latents can be negative (count a latent active when non-zero, not when positive)."""
        return self.architecture in SIGNED_ARCHS or self.architecture == "itda"


class SAE(nn.Module):
    """A sparse autoencoder with a sparse (values, indices) encode/decode and dense helpers."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        if cfg.architecture in ("topk", "abstopk") and cfg.k is None:
            raise ValueError(f"architecture {cfg.architecture!r} needs k (latents per token)")
        if cfg.k is not None and cfg.k > cfg.d_sae:
            raise ValueError(f"k={cfg.k} exceeds d_sae={cfg.d_sae}")
        if cfg.is_transcoder and (cfg.apply_b_dec_to_input or cfg.architecture in ("matching_pursuit", "itda", "gated")):
            raise ValueError(f"a transcoder (d_out set) cannot be architecture {cfg.architecture!r} or subtract b_dec from its input "
                             "(b_dec lives in the output space): set apply_b_dec_to_input=false")
        if cfg.skip_connection and not cfg.is_transcoder:
            raise ValueError("skip_connection needs a transcoder (set d_out and hook_name_out)")
        self.cfg = cfg
        dtype = getattr(torch, cfg.dtype)
        d_out = cfg.d_out or cfg.d_in
        self.encoder_weight = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_in, dtype=dtype))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, d_out, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_out, dtype=dtype))
        if cfg.skip_connection:
            self.W_skip = nn.Parameter(torch.zeros(d_out, cfg.d_in, dtype=dtype))  # [d_out, d_in], SAELens' layout; zero init
        if cfg.architecture in THRESHOLD_ARCHS:
            # log θ keeps θ positive; JumpReLU trains it, BatchTopK-style methods set it by EMA.
            self.log_threshold = nn.Parameter(torch.full((cfg.d_sae,), -math.inf, dtype=dtype))
        if cfg.architecture == "gated":
            # b_enc is the gate's bias (SAELens' b_gate); the magnitude path shares W_enc, scaled by e^{r_mag}.
            self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
            self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))

    # ----- SAEBench / SAELens interface -------------------------------------------------------
    @property
    def W_enc(self) -> Tensor:
        """Encoder weights [d_in, d_sae] (a view of ``encoder_weight``)."""
        return self.encoder_weight.T

    @property
    def threshold(self) -> Tensor | None:
        return self.log_threshold.exp() if hasattr(self, "log_threshold") else None

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def d_out(self) -> int:
        """Width of the output: ``d_in`` for an SAE, the target hook's width for a transcoder."""
        return self.cfg.d_out or self.cfg.d_in

    def add_skip(self, out: Tensor, x: Tensor) -> Tensor:
        """``out + W_skip x`` for a skip-transcoder; ``out`` otherwise."""
        return out + F.linear(x.to(self.dtype), self.W_skip) if self.cfg.skip_connection else out

    # ----- forward ---------------------------------------------------------------------------
    def center(self, x: Tensor) -> Tensor:
        """The encoder input: ``x - b_dec`` (the "pre-bias") unless disabled."""
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def pre_acts(self, x: Tensor) -> Tensor:
        """Dense pre-activations ``W_encᵀ(x − b_dec) + b_enc``: [B, d_in] → [B, d_sae]."""
        return F.linear(self.center(x), self.encoder_weight, self.b_enc)

    def select(self, pre: Tensor) -> tuple[Tensor, Tensor | None]:
        """Inference selection: ``(indices [B, K], valid [B, K] or None)`` from pre-activations."""
        arch = self.cfg.architecture
        if arch == "topk":
            return sparse.topk_select(pre, self.cfg.k), None
        if arch == "abstopk":
            return sparse.topk_select(pre.abs(), self.cfg.k), None
        if arch in ("relu", "gated"):  # gated: the gate π_gate > 0 selects
            return sparse.mask_to_indices(pre > 0, pre)
        score = pre.abs() if arch == "abs_jumprelu" else pre
        return sparse.mask_to_indices(score > self.threshold, pre)

    def top_afa_select(self, pre: Tensor, x_c: Tensor) -> tuple[Tensor, Tensor]:
        """top-AFA's selection for this SAE: scores ReLU(π_i)·‖d_i‖, target ‖x − b_dec‖ (see ``top_afa_select``)."""
        from saebench.encoders import top_afa_select

        with torch.no_grad():
            return top_afa_select(F.relu(pre) * self.W_dec.norm(dim=-1), x_c.norm(dim=-1))

    def activate(self, values: Tensor) -> Tensor:
        """Rectify selected values, except for signed architectures."""
        return values if self.cfg.signed else F.relu(values)

    def gated_magnitudes(self, gate_values: Tensor, indices: Tensor) -> Tensor:
        """Gated SAE: ReLU(e^{r_mag}·(π_gate − b_gate) + b_mag) at the selected entries (π_gate values [B, K])."""
        mag = sparse.take(self.r_mag.exp(), indices) * (gate_values - sparse.take(self.b_enc, indices)) + sparse.take(self.b_mag, indices)
        return F.relu(mag)

    def encode_sparse(self, x: Tensor) -> SparseActs:
        """Encode [B, d_in] to ``SparseActs`` (values [B, K], indices [B, K])."""
        x = self._check_input(x)
        x_c = self.center(x)
        if self.cfg.architecture in ("matching_pursuit", "itda"):
            from saebench.encoders import matching_pursuit

            c = self.cfg
            return matching_pursuit(x_c, self.W_dec, c.max_iterations or c.d_in, c.residual_threshold or 0.0,
                                    bool(c.stop_on_duplicate_support), signed=c.architecture == "itda")
        with torch.no_grad():
            pre = F.linear(x_c, self.encoder_weight, self.b_enc)
        idx, valid = self.top_afa_select(pre, x_c) if self.cfg.architecture == "top_afa" else self.select(pre)
        gathered = sparse.gather_pre(x_c, self.encoder_weight, self.b_enc, pre, idx)
        vals = self.gated_magnitudes(gathered, idx) if self.cfg.architecture == "gated" else self.activate(gathered)
        if valid is not None:
            vals = vals * valid
        return SparseActs(vals, idx)

    def decode_sparse(self, acts: SparseActs) -> Tensor:
        """Decode ``SparseActs`` to [B, d_in]."""
        if self.cfg.architecture == "matching_pursuit" and not self.cfg.apply_b_dec_to_input:
            return sparse.decode(acts, self.W_dec)
        return sparse.decode(acts, self.W_dec, self.b_dec)

    def encode(self, x: Tensor) -> Tensor:
        """Dense latent activations [..., d_sae] (SAELens/SAEBench interface)."""
        lead = x.shape[:-1]
        acts = self.encode_sparse(x.reshape(-1, x.shape[-1]))
        return acts.to_dense(self.cfg.d_sae).reshape(*lead, self.cfg.d_sae)

    def decode(self, z: Tensor) -> Tensor:
        """Reconstruct from dense latents [..., d_sae] → [..., d_in]."""
        if self.cfg.architecture == "matching_pursuit" and not self.cfg.apply_b_dec_to_input:
            return z @ self.W_dec  # SAELens: a tied MP SAE adds b_dec only where it subtracted it
        return z @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction x̂ of x [..., d_in] through the sparse path (a transcoder's prediction [..., d_out], skip term included)."""
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])
        return self.add_skip(self.decode_sparse(self.encode_sparse(flat)), flat).reshape(*lead, self.d_out)

    def _check_input(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(
                f"SAE expects activations of width d_in={self.cfg.d_in} (hook {self.cfg.hook_name or '?'}), "
                f"got shape {tuple(x.shape)}; was it trained on a different hook or model?"
            )
        return x if x.dtype == self.dtype else x.to(self.dtype)

    # ----- decoder constraint and initialisation -----------------------------------------------
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Set every decoder row to unit norm."""
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the component of each decoder row's gradient parallel to the row (keeps ‖d_i‖ = 1)."""
        if self.W_dec.grad is None:
            return
        # g ← g − (g·d / ‖d‖²)·d per row, in place: two row reductions and one fused update, no [n, d] temporaries.
        dots = torch.einsum("nd,nd->n", self.W_dec.grad, self.W_dec)
        sq = self.W_dec.norm(dim=-1).square().clamp_min(1e-16)
        self.W_dec.grad.addcmul_(self.W_dec, (dots / sq).unsqueeze(-1), value=-1)

    @torch.no_grad()
    def init_tied(self, generator: torch.Generator | None = None) -> None:
        """Kaiming-uniform decoder with unit-norm rows, encoder = decoderᵀ, zero biases."""
        w = torch.empty(self.cfg.d_sae, self.cfg.d_in, dtype=torch.float32)
        bound = math.sqrt(6.0 / self.cfg.d_in)
        w.uniform_(-bound, bound, generator=generator)
        w /= w.norm(dim=-1, keepdim=True)
        self.encoder_weight.copy_(w)
        if self.d_out != self.cfg.d_in:  # a transcoder between widths: its own random unit-norm decoder rows
            w = torch.empty(self.cfg.d_sae, self.d_out, dtype=torch.float32).uniform_(-1, 1, generator=generator)
            w /= w.norm(dim=-1, keepdim=True)
        self.W_dec.copy_(w)
        self.b_enc.zero_()
        self.b_dec.zero_()

    @torch.no_grad()
    def fold_activation_scale(self, scale: float, out_scale: float | None = None) -> None:
        """Fold an input scaling ``x_train = scale · x`` into the weights, keeping W_dec unit-norm.

        Activations come out in raw units (divided by ``scale``): b_enc, b_dec and θ divide by
        ``scale``; W_enc and W_dec are unchanged. Outputs on raw inputs then equal the trained SAE's
        outputs on scaled inputs, divided by ``scale``.

        A transcoder's target was scaled by its own ``out_scale`` (y_train = out_scale · y). With r = scale/out_scale
        the encoder rows and W_skip are multiplied by r, and b_enc, b_dec and θ divide by ``out_scale``: the
        latents come out in output units (for the positively homogeneous activations a transcoder may use,
        act(r·π) = r·act(π) with θ scaled alike), W_dec stays unit-norm, and the raw prediction is the trained
        one divided by ``out_scale``.
        """
        out = scale if out_scale is None else out_scale
        if out != scale:
            self.encoder_weight.mul_(scale / out)
            if self.cfg.skip_connection:
                self.W_skip.mul_(scale / out)
        self.b_enc.div_(out)
        self.b_dec.div_(out)
        if hasattr(self, "log_threshold"):
            self.log_threshold.sub_(math.log(out))
        if hasattr(self, "b_mag"):  # gated: the magnitude path's bias (r_mag is a ratio of scales: unchanged)
            self.b_mag.div_(scale)
        if self.cfg.residual_threshold:  # matching pursuit: compared with the residual norm, in input units
            self.cfg = self.cfg.model_copy(update={"residual_threshold": self.cfg.residual_threshold / scale})

    # ----- save / load -------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, Tensor]:
        """Tensors in the on-disk (SAELens) layout."""
        if self.cfg.architecture in ("matching_pursuit", "itda"):  # tied: SAELens reads only the decoder
            return {"W_dec": self.W_dec, "b_dec": self.b_dec}
        out = {"W_enc": self.W_enc, "W_dec": self.W_dec, "b_enc": self.b_enc, "b_dec": self.b_dec}
        if self.threshold is not None:
            out["threshold"] = self.threshold
        if self.cfg.architecture == "gated":  # SAELens' names: the gate's bias is b_gate, there is no b_enc
            out["b_gate"] = out.pop("b_enc")
            out |= {"r_mag": self.r_mag, "b_mag": self.b_mag}
        if self.cfg.skip_connection:
            out["W_skip"] = self.W_skip
        return out


    def save(self, folder: str | Path, extra_files: list[str] = ()) -> Path:
        """Write ``sae_weights.safetensors``, ``cfg.json`` and a checksum manifest into ``folder`` atomically.

        The layout is SAELens' (``sae_lens.SAE.load_from_disk`` loads the folder). A weights file of
        the old name (``sae.safetensors``) left from an earlier save is removed once the new
        manifest is written (until then the loader reads the file the manifest lists).
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_tensors(folder / WEIGHTS_FILE, self.state_tensors(), metadata={"format": "saebench"})
        dump = self.cfg.model_dump()
        if self.cfg.is_transcoder:
            dump["architecture"] = transcoder_architecture_name(self.cfg.architecture, bool(self.cfg.skip_connection))
        elif dump["architecture"] == "relu":
            dump["architecture"] = "standard"  # SAELens' name for a plain ReLU SAE, so SAELens loads it (read back as "relu")
        write_json(folder / CFG_FILE, dump)
        write_manifest(folder, [WEIGHTS_FILE, CFG_FILE, *extra_files])
        (folder / LEGACY_WEIGHTS_FILE).unlink(missing_ok=True)
        return folder

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu", verify: bool | str | None = None) -> "SAE":
        """Load an SAE folder written by saebench (either weights file name) or by SAELens; never unpickles anything.

        ``verify``: a saebench folder's files are checked against its ``manifest.json`` first: sizes
        always, sha256 hashes too by default (``"sha256"`` / True); ``"size"`` skips the hashes (huge
        files), False / ``"none"`` skips the check. None (default) reads ``$SAEBENCH_VERIFY``, else
        ``"sha256"``. A folder without a manifest (SAELens) is loaded unchecked. Raises
        ``ArtifactError`` naming the file and what to do.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise ArtifactError(f"SAE folder {folder} does not exist")
        raw = read_json(folder / CFG_FILE, "SAE config")
        if not isinstance(raw, dict):
            raise ArtifactError(f"{folder / CFG_FILE} is not a JSON object; not an SAE config")
        listed = _manifest_names(folder)
        weights = weights_file(folder, listed)
        if weights is None:
            raise ArtifactError(
                f"{folder} is not an SAE folder: expected {CFG_FILE} + {WEIGHTS_FILE} "
                f"(or {LEGACY_WEIGHTS_FILE}, written by saebench before 2026-11-25)"
            )
        if "format_version" in raw:
            cfg, rescale = _parse_cfg(raw, folder), False
        else:
            cfg, rescale = _cfg_from_saelens(raw, folder)
        check_against_manifest(folder, [weights.name, CFG_FILE], verify)
        try:
            tensors = load_file(str(weights))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ArtifactError(f"{weights} cannot be read ({e}); the file is truncated or corrupted") from None
        try:
            sae = cls(cfg)
        except (ValueError, TypeError, AttributeError) as e:  # k > d_sae, an unknown dtype, ...
            raise ArtifactError(f"{folder / CFG_FILE} describes no valid SAE: {e}") from None
        sae._load_tensors(tensors, weights)
        if rescale:
            sae._fold_decoder_norms()
        return sae.to(device)

    @torch.no_grad()
    def _fold_decoder_norms(self) -> None:
        """SAELens' ``rescale_acts_by_decoder_norm``, folded in: unit decoder rows, same encode/decode.

        SAELens (TopK/AbsTopK) encodes ``act((W_encᵀ(x − b_dec) + b_enc) · ‖d_i‖)`` and decodes
        ``Σ_i f_i / ‖d_i‖ · d_i + b_dec``. With ``W_enc[:, i] · ‖d_i‖``, ``b_enc[i] · ‖d_i‖`` and
        ``d_i / ‖d_i‖`` (SAELens' own ``fold_W_dec_norm``, norms clamped at 1e-8 as there) the plain
        forward gives the same latents and the same reconstruction.
        """
        norms = self.W_dec.norm(dim=-1).clamp_min(1e-8)
        self.encoder_weight.mul_(norms[:, None])
        self.b_enc.mul_(norms)
        self.W_dec.div_(norms[:, None])

    @torch.no_grad()
    def _load_tensors(self, tensors: dict[str, Tensor], where: Path) -> None:
        c = self.cfg
        expected = {"W_enc": (c.d_in, c.d_sae), "W_dec": (c.d_sae, self.d_out), "b_enc": (c.d_sae,), "b_dec": (self.d_out,)}
        if c.skip_connection:
            expected["W_skip"] = (self.d_out, c.d_in)
        if c.architecture in THRESHOLD_ARCHS:
            expected["threshold"] = (c.d_sae,)
        if c.architecture == "gated":
            del expected["b_enc"]
            expected |= {"b_gate": (c.d_sae,), "r_mag": (c.d_sae,), "b_mag": (c.d_sae,)}
        if c.architecture in ("matching_pursuit", "itda"):  # tied: the encoder is the decoder (W_enc/b_enc are not read)
            del expected["W_enc"], expected["b_enc"]
        for name, shape in expected.items():
            if name not in tensors:
                raise ArtifactError(f"{where} has no tensor {name!r} (has {sorted(tensors)})")
            t = tensors[name]
            if tuple(t.shape) != shape:
                raise ArtifactError(f"{where}: {name} has shape {tuple(t.shape)}, cfg.json implies {shape}")
            if not t.is_floating_point():
                raise ArtifactError(f"{where}: {name} has dtype {t.dtype}, expected a float tensor")
            if not torch.isfinite(t).all() and name != "threshold":
                raise ArtifactError(f"{where}: {name} contains NaN or inf values")
        self.W_dec.copy_(tensors["W_dec"])
        self.b_dec.copy_(tensors["b_dec"])
        if c.architecture in ("matching_pursuit", "itda"):
            self.encoder_weight.copy_(tensors["W_dec"])  # unused by the pursuit; kept tied for W_enc readers
            self.b_enc.zero_()
            return
        self.encoder_weight.copy_(tensors["W_enc"].T)
        self.b_enc.copy_(tensors["b_gate" if c.architecture == "gated" else "b_enc"])
        if c.architecture == "gated":
            self.r_mag.copy_(tensors["r_mag"])
            self.b_mag.copy_(tensors["b_mag"])
        if c.architecture in THRESHOLD_ARCHS:
            self.log_threshold.copy_(tensors["threshold"].clamp_min(0).log())
        if c.skip_connection:
            self.W_skip.copy_(tensors["W_skip"])


def _manifest_names(folder: Path) -> set[str] | None:
    """The file names a readable ``manifest.json`` lists (None without one; the check itself reports a bad one)."""
    if not (folder / MANIFEST_FILE).is_file():
        return None
    try:
        files = read_json(folder / MANIFEST_FILE, "manifest").get("files")
    except (ArtifactError, AttributeError):
        return None
    return set(files) if isinstance(files, dict) else None


_INT_FIELDS = ("d_in", "d_sae", "k", "hook_layer", "hook_head_index", "context_size", "format_version")


def _check_ints(raw: dict, folder: Path, fields=_INT_FIELDS) -> None:
    """JSON booleans are not sizes: ``"d_sae": true`` would otherwise read as 1 (Python's bool is an int)."""
    for name in fields:
        v = raw.get(name)
        if isinstance(v, bool) or (v is not None and not isinstance(v, int)):
            raise ArtifactError(f"{folder / CFG_FILE}: field {name!r} is {v!r} ({type(v).__name__}); it must be an integer")


def _parse_cfg(raw: dict, folder: Path) -> SAEConfig:
    from pydantic import ValidationError

    _check_ints(raw, folder)
    if raw.get("architecture") == "standard":  # what save() writes for "relu" (SAELens' name)
        raw = raw | {"architecture": "relu"}
    elif isinstance(raw.get("architecture"), str) and raw["architecture"] in _TRANSCODER_ARCH_INV:  # what save() writes for transcoders
        inner, skip = _TRANSCODER_ARCH_INV[raw["architecture"]]
        if raw.get("d_out") is None:
            raise ArtifactError(f"{folder / CFG_FILE}: architecture {raw['architecture']!r} (a transcoder) needs 'd_out'")
        raw = raw | {"architecture": inner, "skip_connection": skip or None}
    try:
        return SAEConfig.model_validate(raw)
    except ValidationError as e:
        msgs = "; ".join(f"field {'.'.join(map(str, err['loc']))!r}: {err['msg']}" for err in e.errors())
        raise ArtifactError(f"{folder / CFG_FILE} is not a valid saebench SAE config: {msgs}") from None


_SAELENS_ARCH = {"standard": "relu", "topk": "topk", "abstopk": "abstopk", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}
_SAELENS_RESCALES = ("topk", "abstopk")  # the SAELens inference classes that apply rescale_acts_by_decoder_norm (6.54)


def _cfg_from_saelens(raw: dict, folder: Path) -> tuple[SAEConfig, bool]:
    """Translate a SAELens (v5 or v6) cfg.json into our config; also whether decoder norms must be folded in."""
    where = folder / CFG_FILE
    meta = raw.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    arch = raw.get("architecture", "standard")
    transcoder = _TRANSCODER_ARCH_INV.get(arch) if arch in _SAELENS_TRANSCODERS.values() else None
    if transcoder is not None:  # SAELens' transcoders: a ReLU/JumpReLU encoder, a d_out-wide decoder, maybe W_skip
        arch = {"relu": "standard", "jumprelu": "jumprelu"}[transcoder[0]]
    if not isinstance(arch, str) or arch not in _SAELENS_ARCH:
        raise ArtifactError(f"SAELens architecture {arch!r} in {where} is not supported (supported: {sorted(_SAELENS_ARCH)})")
    norm = raw.get("normalize_activations", "none") or "none"
    if norm not in ("none", None):
        raise ArtifactError(
            f"{folder} was saved with normalize_activations={norm!r}; fold the scaling into the weights "
            "with SAELens (sae.fold_activation_norm_scaling_factor) before loading"
        )
    k = raw.get("k")
    if k is None and isinstance(raw.get("activation_fn_kwargs"), dict):  # SAELens < 6 kept k there
        k = raw["activation_fn_kwargs"].get("k")
    _check_ints({"d_in": raw.get("d_in"), "d_sae": raw.get("d_sae"), "hook_layer": raw.get("hook_layer")}
                | ({"k": k} if arch in ("topk", "abstopk") else {}), folder)
    for name in ("d_in", "d_sae"):
        if raw.get(name) is None:
            raise ArtifactError(f"{where}: field {name!r} is missing; not a SAELens SAE config")
    rescale = raw.get("rescale_acts_by_decoder_norm", False)
    if not isinstance(rescale, bool):
        raise ArtifactError(f"{where}: field 'rescale_acts_by_decoder_norm' is {rescale!r}; it must be true or false")
    hook_name = raw.get("hook_name") or meta.get("hook_name", "")
    if not isinstance(hook_name, str):
        raise ArtifactError(f"{where}: field 'hook_name' is {hook_name!r}; it must be a string")
    try:
        cfg = SAEConfig(
            architecture=_SAELENS_ARCH[arch],
            d_in=raw["d_in"],
            d_sae=raw["d_sae"],
            k=k if arch in ("topk", "abstopk") else None,
            model_name=str(raw.get("model_name") or meta.get("model_name", "")),
            hook_name=hook_name,
            hook_layer=_layer_of(hook_name, raw.get("hook_layer", meta.get("hook_layer"))),
            apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
            dtype=str(raw.get("dtype", "float32")).replace("torch.", ""),
            context_size=raw.get("context_size") or meta.get("context_size"),
            method=f"saelens:{arch}",
            **({"residual_threshold": float(raw.get("residual_threshold", 1e-2)), "max_iterations": raw.get("max_iterations"),
                "stop_on_duplicate_support": bool(raw.get("stop_on_duplicate_support", True))} if arch == "matching_pursuit" else {}),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{where} is not a valid SAELens config ({e!r})") from None
    if transcoder is not None:
        out_hook = raw.get("hook_name_out") or meta.get("hook_name_out") or ""
        _check_ints({"d_out": raw.get("d_out")}, folder, ("d_out",))
        if raw.get("d_out") is None:
            raise ArtifactError(f"{where}: a SAELens {raw['architecture']!r} needs 'd_out'")
        cfg = cfg.model_copy(update={"d_out": raw["d_out"], "hook_name_out": str(out_hook), "hook_layer_out": _layer_of(str(out_hook), None),
                                     "skip_connection": transcoder[1] or None, "apply_b_dec_to_input": False,
                                     "method": f"saelens:{raw['architecture']}"})
    return cfg, rescale and arch in _SAELENS_RESCALES


def _layer_of(hook_name: str, given: Any) -> int:
    """A SAELens cfg's ``hook_layer``: as given, else the hook's block, else -1 (unknown)."""
    if isinstance(given, int):
        return given
    block = Site(hook_name).block
    return -1 if block is None else block

# SAELens architectures whose folders load too (issue #18's inference forms).
_SAELENS_ARCH.update({"gated": "gated", "matching_pursuit": "matching_pursuit"})


# ----- Transcoders: cfg.json architecture names ----------------------------------------------------------------
# SAELens (6.x) has ReLU transcoders ("transcoder", "skip_transcoder") and JumpReLU ones ("jumprelu_transcoder",
# "jumprelu_skip_transcoder"); saebench writes those names for those activations, so SAELens' load_from_disk
# builds the same function. A transcoder with another activation (TopK, BatchTopK's thresholds are JumpReLU,
# AbsTopK...) is written as "<architecture>_transcoder" / "<architecture>_skip_transcoder": saebench reads it;
# SAELens has no such class and refuses it by name.
_SAELENS_TRANSCODERS = {("relu", False): "transcoder", ("relu", True): "skip_transcoder",
                        ("jumprelu", False): "jumprelu_transcoder", ("jumprelu", True): "jumprelu_skip_transcoder"}


def transcoder_architecture_name(architecture: str, skip: bool) -> str:
    """The cfg.json ``architecture`` of a transcoder with this encoder (SAELens' names where SAELens has one)."""
    return _SAELENS_TRANSCODERS.get((architecture, skip)) or f"{architecture}_{'skip_' if skip else ''}transcoder"


_TRANSCODER_ARCH_INV = {transcoder_architecture_name(a, skip): (a, skip) for a in typing.get_args(Architecture)
                        for skip in (False, True) if a not in ("matching_pursuit", "itda", "gated")}


def load_sae(folder: str | Path, device: str | torch.device = "cpu", verify: bool | str | None = None) -> SAE:
    """Load an SAE folder (saebench or SAELens format), checked against its manifest (see ``SAE.load``)."""
    return SAE.load(folder, device, verify=verify)


def refuse_transcoders(saes, what: str) -> None:
    """A clear error where an eval or tool that reads and writes one hook is given a transcoder (it would splice
    the prediction of ``hook_name_out`` in at ``hook_name``: silently wrong when the widths agree)."""
    for s in [saes] if isinstance(saes, SAE) else saes:
        if s.cfg.is_transcoder:
            raise ValueError(f"{what} works on SAEs (one hook, read and written); this is a transcoder ({s.cfg.hook_name} -> "
                             f"{s.cfg.hook_name_out}). Evaluate it with `saebench eval` / evaluate_core (spliced at {s.cfg.hook_name_out})")
