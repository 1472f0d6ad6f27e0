"""One interface for activations: harvested online, read from a disk cache, or synthetic.

An ``ActivationSource`` produces *chunks*: all valid tokens (special tokens and norm outliers
removed) of a block of sequences, as a ``Batch`` of per-hook activations plus token ids. The shared
``batches`` method shuffles tokens within a chunk (a block shuffle buffer of ``shuffle_buffer_tokens``)
with a generator seeded by (seed, chunk), so the stream is a pure function of the position
``(chunk, batch)``: a resumed run sees exactly the data an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saebench.distributed import rank
from saebench.io import ArtifactError, read_json, save_tensors, sha256_file, write_json
from saebench.lock import folder_lock
from saebench.site import Site, stop_layer_for

if TYPE_CHECKING:
    from saebench.config import TrainConfig


class Batch(NamedTuple):
    """Activations of a set of tokens at one or more hooks."""

    acts: dict[str, Tensor]  # hook -> [N, d_in]
    token_ids: Tensor  # [N]
    grads: dict[str, Tensor] | None = None  # hook -> [N, d_in], ∇ₓ of the LM loss (g-SAE)

    def __len__(self) -> int:
        return self.token_ids.shape[0]

    def index(self, idx: Tensor) -> "Batch":
        grads = None if self.grads is None else {h: g[idx] for h, g in self.grads.items()}
        return Batch({h: a[idx] for h, a in self.acts.items()}, self.token_ids[idx], grads)

    def to(self, device: str | torch.device) -> "Batch":
        grads = None if self.grads is None else {h: g.to(device) for h, g in self.grads.items()}
        return Batch({h: a.to(device) for h, a in self.acts.items()}, self.token_ids.to(device), grads)


@dataclass(frozen=True)
class Position:
    """Where a data stream is: the next batch is batch ``batch`` of global chunk ``chunk``."""

    chunk: int = 0
    batch: int = 0


class ActivationSource(ABC):
    """Produces chunks of activations for one or more hooks."""

    hook_names: list[str]
    d_in: dict[str, int]

    @property
    def n_chunks(self) -> int | None:
        """Number of distinct chunks, or None if unbounded (synthetic)."""
        return None

    @abstractmethod
    def chunk(self, i: int) -> Batch:
        """All valid tokens of chunk ``i`` (0 <= i < n_chunks)."""

    def chunk_order(self, epoch: int, seed: int) -> list[int]:
        """Chunk visiting order for an epoch (identity by default)."""
        return list(range(self.n_chunks or 0))

    def chunk_size(self, i: int) -> int | None:
        """Tokens in chunk ``i`` if known without producing it (cache index, synthetic), else None."""
        return None

    def _chunk_at(self, g: int, seed: int) -> Batch:
        """The chunk at global stream index ``g`` (epochs cycle over bounded sources)."""
        n = self.n_chunks
        if n is None:
            return self.chunk(g)
        if n == 0:
            raise ArtifactError("activation source has no chunks")
        return self.chunk(self.chunk_order(g // n, seed)[g % n])

    def _size_at(self, g: int, seed: int) -> int | None:
        n = self.n_chunks
        if n is None:
            return self.chunk_size(g)
        return self.chunk_size(self.chunk_order(g // n, seed)[g % n]) if n else None

    def batches(
        self, batch_size: int, seed: int = 0, start: Position = Position(), *, rank: int = 0, world: int = 1
    ) -> Iterator[tuple[Batch, Position]]:
        """Yield ``(batch, position_after)`` forever (cycling epochs over bounded sources).

        Tokens are shuffled within each chunk; a chunk's leftover < batch_size tokens are dropped so
        that positions stay a pure function of (chunk, batch).

        Data parallelism (``world`` > 1 readers, this one ``rank``): the stream advances in rounds of
        ``world`` chunks and rank r reads only chunk ``g + r`` of the round starting at ``g`` (disjoint
        cache shards, disjoint harvested sequences), yielding ``batch_size`` tokens per step (its slice
        of a global batch of ``world · batch_size``). Every rank yields the same number of batches per
        round (the smallest chunk's count; taken from ``chunk_size`` when known, else agreed by an
        all-reduce), so ranks never wait on each other. ``Position.chunk`` is the round's first chunk,
        the same on every rank; with ``world`` = 1 this is the plain stream.
        """
        g = start.chunk
        first = start.batch
        while True:
            data = self._chunk_at(g + rank, seed)
            gen = torch.Generator().manual_seed(seed * 1_000_003 + g + rank)
            perm = torch.randperm(len(data), generator=gen)
            n_batches = len(data) // batch_size
            if world > 1:
                n_batches = self._round_batches(g, world, batch_size, seed, n_batches)
            for b in range(first, n_batches):
                yield data.index(perm[b * batch_size : (b + 1) * batch_size]), Position(g, b + 1)
            g, first = g + world, 0

    def _round_batches(self, g: int, world: int, batch_size: int, seed: int, mine: int) -> int:
        """Batches every rank can give in the round starting at chunk ``g``: the minimum over its chunks."""
        sizes = [self._size_at(g + r, seed) for r in range(world)]
        if all(s is not None for s in sizes):
            return min(s // batch_size for s in sizes)
        from saebench import distributed

        return distributed.min_over_ranks(mine)


# --------------------------------------------------------------------------------------------
# Online harvesting from a TransformerLens model
# --------------------------------------------------------------------------------------------


def token_mask(tokens: Tensor, special_ids: Tensor | None) -> Tensor:
    """True for tokens to keep (not BOS/EOS/pad)."""
    if special_ids is None or special_ids.numel() == 0:
        return torch.ones_like(tokens, dtype=torch.bool)
    return ~torch.isin(tokens, special_ids.to(tokens.device))


class HookedSource(ActivationSource):
    """Harvests activations at several hooks in one forward, stopping after the last hooked block.

    With ``with_grads`` it also returns g = ∇ₓ of the mean next-token cross-entropy at each hook
    (one extra backward of the frozen model, which then must run to the logits).
    """

    def __init__(
        self,
        model,
        hook_names: list[str],
        tokens: Tensor,
        *,
        special_ids: Tensor | None = None,
        shuffle_buffer_tokens: int = 65_536,
        model_batch_size: int = 16,
        outlier_norm_factor: float | None = None,
        with_grads: bool = False,
        progress: bool = False,
    ):
        from saebench.models import validate_hook_name

        if tokens.dim() != 2 or tokens.shape[0] == 0:
            raise ValueError(f"tokens must be a non-empty [n_seq, context] tensor, got {tuple(tokens.shape)}")
        self.model = model
        self.hook_names = list(hook_names)
        self.sites = [Site.parse(h) for h in self.hook_names]
        for name, _ in self.sites:
            validate_hook_name(model, name)
        self.tokens = tokens
        self.special_ids = special_ids
        self.rows_per_chunk = max(1, shuffle_buffer_tokens // tokens.shape[1])
        self.model_batch_size = model_batch_size
        self.outlier_norm_factor = outlier_norm_factor
        self.with_grads = with_grads
        self.progress = progress
        self.stop_at_layer = None if with_grads else stop_layer_for([n for n, _ in self.sites])
        self._last: tuple[int, Batch] | None = None
        probe = self._forward(tokens[:1, :2])
        self.d_in = {h: a.shape[-1] for h, a in zip(self.hook_names, probe[0])}

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.tokens.shape[0] / self.rows_per_chunk)

    @property
    def device(self):
        return next(iter(self.model.parameters())).device

    def _forward(self, toks: Tensor) -> tuple[list[Tensor], list[Tensor] | None]:
        """Activations (and gradients) at every site for a token block: lists of [b, pos, d]."""
        names = {n for n, _ in self.sites}
        toks = toks.to(self.device)
        if not self.with_grads:
            with torch.no_grad():
                _, cache = self.model.run_with_cache(toks, names_filter=lambda n: n in names, stop_at_layer=self.stop_at_layer)
            return [site.flatten(cache[site.hook]).float() for site in self.sites], None
        captured: dict[str, Tensor] = {}

        def grab(name: str):
            # Keyed by the name asked for: a TransformerBridge reports its own alias (blocks.L.hook_out) as hook.name.
            def fn(act, hook):
                # A fresh leaf so autograd.grad gives ∂loss/∂act without touching model parameters.
                act = act.detach().requires_grad_(True)
                captured[name] = act
                return act

            return fn

        with torch.enable_grad():
            logits = self.model.run_with_hooks(toks, fwd_hooks=[(n, grab(n)) for n in names])
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), toks[:, 1:].flatten())
            order = sorted(names)
            grads = torch.autograd.grad(loss, [captured[n] for n in order])
        gmap = dict(zip(order, grads))
        acts = [site.flatten(captured[site.hook].detach()).float() for site in self.sites]
        gs = [site.flatten(gmap[site.hook]).float() for site in self.sites]
        return acts, gs

    def chunk(self, i: int) -> Batch:
        """Chunk ``i``, harvested; the last chunk is kept, so the trainer's initialisation sample (chunk 0)
        is not harvested again when the stream starts with it (it is released when another is asked for)."""
        if self._last is not None and self._last[0] == i:
            return self._last[1]
        self._last = None
        batch = self._harvest(i)
        self._last = (i, batch)
        return batch

    def _harvest(self, i: int) -> Batch:
        rows = self.tokens[i * self.rows_per_chunk : (i + 1) * self.rows_per_chunk]
        acts: list[list[Tensor]] = [[] for _ in self.sites]
        grads: list[list[Tensor]] = [[] for _ in self.sites]
        it = range(0, rows.shape[0], self.model_batch_size)
        for s in tqdm(it, desc=f"harvest chunk {i}", leave=False, disable=not self.progress):
            a, g = self._forward(rows[s : s + self.model_batch_size])
            for j in range(len(self.sites)):
                acts[j].append(a[j].flatten(0, 1).cpu())
                if g is not None:
                    grads[j].append(g[j].flatten(0, 1).cpu())
        flat_tokens = rows.flatten()
        keep = token_mask(flat_tokens, self.special_ids)
        cat = [torch.cat(a) for a in acts]
        if self.outlier_norm_factor is not None:
            for a in cat:
                norms = a.norm(dim=-1)
                finite = torch.isfinite(norms)
                ref = norms[keep & finite]
                if ref.numel():
                    # Non-finite rows stay in so the trainer can report them instead of hiding them.
                    keep &= ~finite | (norms <= self.outlier_norm_factor * ref.median())
        out_grads = None if not self.with_grads else {h: torch.cat(g)[keep] for h, g in zip(self.hook_names, grads)}
        return Batch({h: a[keep] for h, a in zip(self.hook_names, cat)}, flat_tokens[keep], out_grads)


# --------------------------------------------------------------------------------------------
# Disk cache
# --------------------------------------------------------------------------------------------

CACHE_INDEX = "cache.json"


def _shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


def write_cache(source: ActivationSource, folder: str | Path, n_chunks: int | None = None, provenance: dict | None = None, progress: bool = True) -> "CachedSource":
    """Harvest ``source`` chunk by chunk into ``folder``, one atomically written shard per chunk.

    ``cache.json`` lists completed shards with checksums and is rewritten after each shard, so a
    killed writer resumes at the first missing shard and a reader never sees a partial one.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n_chunks = n_chunks if n_chunks is not None else source.n_chunks
    if n_chunks is None:
        raise ValueError("write_cache needs n_chunks for an unbounded source")
    index_path = folder / CACHE_INDEX
    index = read_json(index_path, "cache index") if index_path.exists() else None
    header = {"hook_names": source.hook_names, "d_in": source.d_in, "n_chunks": n_chunks, "provenance": provenance or {}}
    if index is not None and any(index.get(k) != v for k, v in header.items()):
        raise ArtifactError(
            f"activation cache {folder} was written for a different run ({index.get('hook_names')}, "
            f"{index.get('n_chunks')} chunks, provenance {index.get('provenance')}); use another folder or delete it"
        )
    shards: dict[str, dict] = (index or {}).get("shards", {})
    for i in tqdm(range(n_chunks), desc="harvest activations", disable=not progress):
        name = _shard_name(i)
        if name in shards and (folder / name).exists():
            continue
        data = source.chunk(i)
        tensors = {f"acts.{h}": a for h, a in data.acts.items()} | {"token_ids": data.token_ids}
        if data.grads is not None:
            tensors |= {f"grads.{h}": g for h, g in data.grads.items()}
        save_tensors(folder / name, tensors)
        shards[name] = {"tokens": len(data), "sha256": sha256_file(folder / name)}
        write_json(index_path, header | {"shards": shards, "complete": len(shards) == n_chunks})
    return CachedSource(folder)


_REHARVEST = "delete it (rm {path}) and rerun the same training or harvest command: it harvests only the missing shards again"
_verified_shards: set[tuple[str, str, int, int]] = set()  # (path, sha256, size, mtime_ns) checked by this process


def _read_shard(path: Path, sha256: str | None) -> dict[str, Tensor]:
    """A shard's tensors, checked against the sha256 of ``cache.json`` the first time this process reads it.

    The bytes are read once, hashed, and parsed from memory, so what is checked is what is used.
    Later reads of the same unchanged file (same size and mtime: epochs 2, 3, ...) skip the hash.
    """
    from safetensors.torch import load as st_load
    from safetensors.torch import load_file

    st = path.stat()
    key = (str(path.resolve()), str(sha256), st.st_size, st.st_mtime_ns)
    if key in _verified_shards:
        return load_file(str(path))
    data = path.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ArtifactError(
            f"activation cache shard {path} is corrupted: its sha256 does not match the one recorded in "
            f"{path.parent / CACHE_INDEX} when it was written, so training on it would use damaged activations; "
            + _REHARVEST.format(path=path)
        )
    tensors = st_load(data)
    _verified_shards.add(key)
    return tensors


def verify_cache(folder: str | Path) -> list[str]:
    """Check every shard of an activation cache against ``cache.json``; a list of problems (empty = OK)."""
    folder = Path(folder)
    try:
        index = read_json(folder / CACHE_INDEX, "activation cache index")
        shards = index["shards"]
        assert isinstance(shards, dict) and all(isinstance(m, dict) for m in shards.values())
    except (ArtifactError, KeyError, TypeError, AssertionError) as e:
        return [f"{folder / CACHE_INDEX} is unreadable or corrupted ({e}); delete the cache folder and rerun the harvest"]
    problems = []
    if not index.get("complete"):
        problems.append(f"incomplete: {len(shards)}/{index.get('n_chunks')} shards; rerun the harvest to finish it")
    for name in sorted(shards):
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: missing; rerun the harvest to write it again")
        elif sha256_file(path) != shards[name].get("sha256"):
            problems.append(f"{name}: checksum mismatch (corrupted); " + _REHARVEST.format(path=path))
    return problems


class CachedSource(ActivationSource):
    """Reads a cache written by ``write_cache``; shard order is reshuffled every epoch."""

    def __init__(self, folder: str | Path, verify: bool = False):
        self.folder = Path(folder)
        index = read_json(self.folder / CACHE_INDEX, "activation cache index")
        if not index.get("complete"):
            done = len(index.get("shards", {}))
            raise ArtifactError(f"activation cache {self.folder} is incomplete ({done}/{index.get('n_chunks')} shards); rerun the harvest to finish it")
        self.hook_names = index["hook_names"]
        self.d_in = index["d_in"]
        self.provenance = index.get("provenance", {})
        self.shards = sorted(index["shards"])
        self.meta = index["shards"]
        self.n_tokens = sum(m["tokens"] for m in self.meta.values())
        if verify:
            problems = verify_cache(self.folder)
            if problems:
                raise ArtifactError(f"activation cache {self.folder}: " + "; ".join(problems))

    @property
    def n_chunks(self) -> int:
        return len(self.shards)

    def chunk_size(self, i: int) -> int:
        return self.meta[self.shards[i]]["tokens"]

    def chunk_order(self, epoch: int, seed: int) -> list[int]:
        if epoch == 0:
            return list(range(self.n_chunks))
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return torch.randperm(self.n_chunks, generator=gen).tolist()

    def chunk(self, i: int) -> Batch:
        from safetensors import SafetensorError

        path = self.folder / self.shards[i]
        try:
            t = _read_shard(path, self.meta[self.shards[i]].get("sha256"))
        except (SafetensorError, OSError) as e:
            raise ArtifactError(f"activation cache shard {path} cannot be read ({e}); {_REHARVEST.format(path=path)}") from None
        grads = {h: t[f"grads.{h}"] for h in self.hook_names if f"grads.{h}" in t} or None
        return Batch({h: t[f"acts.{h}"] for h in self.hook_names}, t["token_ids"], grads)


# --------------------------------------------------------------------------------------------
# Synthetic data with planted features
# --------------------------------------------------------------------------------------------


def best_cos(W_dec: torch.Tensor, features: torch.Tensor, signed: bool = False) -> torch.Tensor:
    """Per planted feature [m], the cosine of its best-matching decoder row (rows and features normalised first;
    |cos| with ``signed``, for SAEs whose latents carry both signs). The one rule every planted-recovery test,
    benchmark and report uses."""
    cos = torch.nn.functional.normalize(features.float(), dim=-1) @ torch.nn.functional.normalize(W_dec.detach().float(), dim=-1).T
    return (cos.abs() if signed else cos).max(-1).values


def recovery(W_dec: torch.Tensor, features: torch.Tensor, signed: bool = False, threshold: float = 0.9) -> float:
    """Fraction of planted features [m, d] whose best-matching decoder row has cosine >= ``threshold`` (see ``best_cos``)."""
    return float((best_cos(W_dec, features, signed) >= threshold).float().mean())


class SyntheticSource(ActivationSource):
    """x = Σ_j c_j D*_j with planted unit-norm features D* [m, d] (METHODS.md §0 harness).

    Each token activates ``n_active`` features (or a uniform number in ``n_active_range``) with
    magnitudes Uniform[0.5, 1.5]; features in ``bidirectional`` get a random sign.
    """

    def __init__(
        self,
        d: int = 32,
        m: int = 64,
        n_active: int = 3,
        *,
        n_active_range: tuple[int, int] | None = None,
        bidirectional: int = 0,
        chunk_tokens: int = 8192,
        seed: int = 0,
        hook_name: str = "synthetic",
        feature_scales: Tensor | None = None,
    ):
        gen = torch.Generator().manual_seed(seed)
        self.features = torch.nn.functional.normalize(torch.randn(m, d, generator=gen), dim=-1)
        self.m, self.n_active, self.n_active_range = m, n_active, n_active_range
        self.bidirectional = bidirectional
        self.chunk_tokens, self.seed = chunk_tokens, seed
        self.feature_scales = feature_scales if feature_scales is not None else torch.ones(m)
        self.hook_names = [hook_name]
        self.d_in = {hook_name: d}

    def coefficients(self, i: int) -> Tensor:
        """The planted coefficients [chunk_tokens, m] of chunk ``i``."""
        gen = torch.Generator().manual_seed(self.seed * 7919 + i + 1)
        n = self.chunk_tokens
        lo, hi = self.n_active_range or (self.n_active, self.n_active)
        counts = torch.randint(lo, hi + 1, (n,), generator=gen)
        ranks = torch.rand(n, self.m, generator=gen).argsort(-1).argsort(-1)
        active = ranks < counts[:, None]
        mags = torch.rand(n, self.m, generator=gen) + 0.5
        signs = torch.ones(n, self.m)
        if self.bidirectional:
            flip = torch.rand(n, self.bidirectional, generator=gen) < 0.5
            signs[:, : self.bidirectional] = torch.where(flip, -1.0, 1.0)
        return active * mags * signs * self.feature_scales

    def chunk_size(self, i: int) -> int:
        return self.chunk_tokens

    @property
    def provenance(self) -> dict:
        """What training records in cfg.json: planted data, no model or corpus (``saebench.sources``)."""
        return {"kind": "synthetic", "model": None, "corpus": None, "hook_name": self.hook_names[0], "d_in": self.features.shape[1],
                "description": f"planted features: m={self.m}, n_active={self.n_active_range or self.n_active}, seed={self.seed}"}

    def chunk(self, i: int) -> Batch:
        c = self.coefficients(i)
        x = c @ self.features
        return Batch({self.hook_names[0]: x}, torch.zeros(len(x), dtype=torch.long))


# --------------------------------------------------------------------------- the source a training config asks for


def make_source(cfg: TrainConfig, model=None, progress: bool = True, with_grads: bool = False, hook_names: list[str] | None = None) -> ActivationSource:
    """The activation source a config asks for: online harvest, or a disk cache filled once.

    ``hook_names`` (default ``[cfg.hook_name]``) are all harvested in one forward per sequence block.
    Under ``torchrun`` rank 0 fills a cache while the other ranks wait, then every rank reads it.
    """
    if cfg.activation_cache and rank() == 0 and not _cache_complete(cfg.activation_cache):
        # One harvester per cache folder; a complete cache is only read, by any number of runs.
        with folder_lock(cfg.activation_cache, "harvest", hint=CACHE_HINT):
            return _make_source(cfg, model, progress, with_grads, hook_names)
    return _make_source(cfg, model, progress, with_grads, hook_names)


CACHE_HINT = ("Wait for its harvest to finish, then rerun: this run will reuse the cache (a killed harvest resumes where it stopped); "
              "or give this run another activation_cache folder.")


def _cache_complete(folder: str) -> bool:
    try:
        return bool(json.loads((Path(folder) / "cache.json").read_text()).get("complete"))
    except (OSError, ValueError, AttributeError):
        return False


def _make_source(cfg: TrainConfig, model, progress: bool, with_grads: bool, hook_names: list[str] | None) -> ActivationSource:
    from saebench import models, text  # models pulls in transformer_lens: only when a harvest is built

    if model is None:
        model = models.load_model(cfg.model, device=cfg.device)
    tokenizer = model.tokenizer
    n_tokens = (cfg.harvest_tokens or cfg.training_tokens) if cfg.activation_cache else cfg.training_tokens
    # Masked special tokens and outliers shrink the usable count; harvest a little more.
    tokens = text.load_tokens(cfg.corpus, tokenizer, cfg.context_size, int(n_tokens * 1.05) + cfg.context_size, split="train", prepend_bos=cfg.prepend_bos)
    special = text.special_ids(tokenizer) if cfg.exclude_special_tokens else None
    source = HookedSource(
        model, list(hook_names or [cfg.hook_name]), tokens, special_ids=special, shuffle_buffer_tokens=cfg.shuffle_buffer_tokens,
        model_batch_size=cfg.model_batch_size, outlier_norm_factor=cfg.outlier_norm_factor, with_grads=with_grads,
        progress=progress and not cfg.activation_cache,
    )
    if not cfg.activation_cache:
        return source
    provenance = {"model": cfg.model, "corpus": cfg.corpus, "context_size": cfg.context_size, "tokens": tokens.shape[0] * tokens.shape[1],
                  "exclude_special_tokens": cfg.exclude_special_tokens, "outlier_norm_factor": cfg.outlier_norm_factor, "with_grads": with_grads}
    if rank() != 0:  # rank 0 fills the cache; the others wait for it (polling: a harvest outlasts collective timeouts)
        return _wait_for_cache(cfg.activation_cache)
    return write_cache(source, cfg.activation_cache, provenance=provenance, progress=progress)


def _wait_for_cache(folder: str, poll_seconds: float = 5.0) -> CachedSource:
    """The cache rank 0 is writing into ``folder`` (on a filesystem every rank sees), once complete."""
    index = Path(folder) / "cache.json"
    while True:
        try:
            if index.exists() and json.loads(index.read_text()).get("complete"):
                return CachedSource(folder)
        except (OSError, ValueError):
            pass  # caught mid-replace; look again
        time.sleep(poll_seconds)
