"""Bring your own activations: ready ``ActivationSource``s for tensors, arrays, shard folders and iterators.

Every source here yields rows ``[n_tokens, d_in]`` of one *site* (its ``hook_name``, default
``"activations"``; no token ids are needed) and is cut into *chunks* of ``chunk_tokens`` consecutive
rows. As for every ``ActivationSource`` (``saebench.activations``), training visits the chunks in a
seeded order per epoch and shuffles the rows within a chunk with a generator seeded by the stream
position, so the data of step ``s`` is a pure function of ``(seed, s)``: a run interrupted and resumed
from its checkpoint sees exactly the batches an uninterrupted run sees.

- :class:`TensorSource`: an in-memory ``torch.Tensor``.
- :class:`ArraySource`: a NumPy array, a ``np.memmap`` or a ``.npy`` file opened memory-mapped; only
  the chunk being read is copied into memory, so the file may be larger than RAM.
- :class:`ShardFolderSource`: a folder (or list) of ``.safetensors`` / ``.npy`` shards, read as one
  concatenation of rows, one chunk at a time (file headers only at construction).
- :class:`IteratorSource`: batches from an iterator or ``DataLoader``. Resume is exact only if the
  data can be produced again identically: pass a *factory* (a function returning a fresh iterator
  over the same data) or a re-iterable object (a list, a ``DataLoader`` without unseeded shuffling).
  See its docstring for what happens otherwise.

``as_source`` picks the right one for a tensor, array, path or iterable; ``train``,
``train_and_evaluate`` and ``evaluate_activations`` call it for you.

Provenance: each source has a ``provenance`` dict (kind, description, rows, width, files, and the
``model`` / ``corpus`` the activations came from: ``None`` unless you say so). Training adopts it: a
``TrainConfig`` that leaves ``hook_name`` / ``model`` / ``corpus`` unset takes the source's
(``model`` and ``corpus`` become ``"none"`` when the source names none), and the SAE's ``cfg.json``
records the provenance under ``metadata.activation_source``. A config that sets a different model or
hook than the source declares is an error.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saebench.activations import ActivationSource, Batch

DEFAULT_HOOK = "activations"
DEFAULT_CHUNK_TOKENS = 65_536
NO_MODEL = "none"  # model / corpus recorded when the activations came from no (named) model

_TORCH_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ST_FLOATS = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


class SourceError(ValueError):
    """Activations given to a source are unusable (dtype, shape, NaN/inf, missing files); the message says how to fix it."""


# --------------------------------------------------------------------------------------------
# Shared checks
# --------------------------------------------------------------------------------------------


def _check_shape(shape: Sequence[int], what: str) -> int:
    """``d_in`` of a ``[n_tokens, d_in]`` shape, or a SourceError that says how to get one."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2:
        hint = " Flatten the leading axes first, e.g. x.reshape(-1, x.shape[-1])." if len(shape) > 2 else \
            " A single vector is one token: use x[None]." if len(shape) == 1 else ""
        raise SourceError(f"{what}: activations must be 2-D [n_tokens, d_in], got shape {shape}.{hint}")
    if shape[1] == 0:
        raise SourceError(f"{what}: activations have width d_in=0 (shape {shape})")
    return shape[1]


def _check_dtype(dtype: Any, what: str) -> None:
    ok = dtype in _TORCH_FLOATS if isinstance(dtype, torch.dtype) else np.issubdtype(np.dtype(dtype), np.floating)
    if not ok:
        raise SourceError(f"{what}: activations must be floating point (float16/bfloat16/float32/float64), got {dtype}; "
                          "token ids or labels are not activations")


def _check_finite(x: Tensor, first_row: int, what: str) -> None:
    bad = ~torch.isfinite(x)
    if bad.any():
        rows = bad.any(-1).nonzero().flatten()
        raise SourceError(f"{what}: {int(bad.sum())} NaN/inf value(s) in {rows.numel()} row(s), the first at row {first_row + int(rows[0])}. "
                          "Remove or repair those rows, or pass check_finite=False to leave them to training's on_nonfinite policy "
                          "('stop' reports them, 'skip' skips their batches)")


def _fingerprint(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _chunk_tokens(n: int) -> int:
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n <= 0:
        raise SourceError(f"chunk_tokens must be a positive integer, got {n!r}")
    return int(n)


# --------------------------------------------------------------------------------------------
# Row sources: data addressable by row range (tensor, array/memmap, shard folder)
# --------------------------------------------------------------------------------------------


class _RowSource(ActivationSource):
    """``n_rows`` rows of width ``d`` read by contiguous ranges; chunk ``i`` is rows ``[i·C, (i+1)·C)``.

    Chunks are visited in a seeded random order each epoch (``shuffle=True``; the epoch-0 order too,
    so data stored sorted, by class or by document, is mixed at chunk level) and the rows of a chunk
    are shuffled by the shared ``batches``. Within a chunk a batch's rows are a uniform sample, so
    ``chunk_tokens`` should be many batches long; a chunk's last ``chunk_tokens mod batch_size_tokens``
    rows (after shuffling) are not used in that epoch.

    ``max_rows_read`` / ``rows_read`` record the largest single read and the total rows read.
    """

    kind = "rows"

    def __init__(self, n_rows: int, d_in: int, *, hook_name: str | None, chunk_tokens: int, shuffle: bool, check_finite: bool,
                 model: str | None, corpus: str | None, description: str | None, what: str):
        if n_rows <= 0:
            raise SourceError(f"{what}: no activations (0 rows)")
        self.hook_name = hook_name or DEFAULT_HOOK
        self.hook_names = [self.hook_name]
        self.d_in = {self.hook_name: int(d_in)}
        self.n_rows = int(n_rows)
        self.chunk_tokens = _chunk_tokens(chunk_tokens)
        self.shuffle = shuffle
        self.check_finite = check_finite
        self.what = what
        self.model, self.corpus = model, corpus
        self.description = description or what
        self.max_rows_read = 0
        self.rows_read = 0

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.n_rows / self.chunk_tokens)

    def chunk_size(self, i: int) -> int:
        return min(self.chunk_tokens, self.n_rows - i * self.chunk_tokens)

    def chunk_order(self, epoch: int, seed: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n_chunks))
        gen = torch.Generator().manual_seed(seed * 1_000_003 + 7_919 * (epoch + 1))
        return torch.randperm(self.n_chunks, generator=gen).tolist()

    def chunk(self, i: int) -> Batch:
        if not 0 <= i < self.n_chunks:
            raise IndexError(f"{self.what}: chunk {i} out of range (0..{self.n_chunks - 1})")
        lo, hi = i * self.chunk_tokens, min((i + 1) * self.chunk_tokens, self.n_rows)
        x = self.read_rows(lo, hi)
        return Batch({self.hook_name: x}, torch.zeros(x.shape[0], dtype=torch.long))

    def read_rows(self, lo: int, hi: int) -> Tensor:
        """Rows ``[lo, hi)`` as a float32 tensor (checked for NaN/inf unless ``check_finite=False``)."""
        x = self._read(lo, hi)
        self.max_rows_read = max(self.max_rows_read, hi - lo)
        self.rows_read += hi - lo
        if x.dtype != torch.float32:
            x = x.float()
        if self.check_finite:
            _check_finite(x, lo, self.what)
        return x

    def _read(self, lo: int, hi: int) -> Tensor:
        raise NotImplementedError

    def _where(self) -> dict[str, Any]:
        return {}

    @property
    def provenance(self) -> dict[str, Any]:
        """What the activations are, for ``cfg.json``. ``fingerprint`` hashes the stream's layout (rows, width, hook,
        chunking, shuffling): training refuses to resume a checkpoint written with another one."""
        layout = {"n_tokens": self.n_rows, "d_in": self.d_in[self.hook_name], "hook_name": self.hook_name, "chunk_tokens": self.chunk_tokens,
                  "shuffle": self.shuffle}
        return {"kind": self.kind} | layout | self._where() | {"description": self.description, "model": self.model, "corpus": self.corpus,
                                                               "fingerprint": _fingerprint(layout)}


class TensorSource(_RowSource):
    """Activations in a ``torch.Tensor`` ``[n_tokens, d_in]`` (any float dtype, any device).

    Example::

        src = TensorSource(x, hook_name="blocks.6.hook_resid_post", model="gpt2")   # or TensorSource(x) for non-LM data
        train(TrainConfig(training_tokens=1_000_000, k=32), source=src)

    ``model`` / ``corpus``: what produced the activations, recorded in the SAE's ``cfg.json`` (default
    none). The tensor is read in place (no copy), one chunk at a time.
    """

    kind = "tensor"

    def __init__(self, x: Tensor, *, hook_name: str | None = None, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, shuffle: bool = True,
                 check_finite: bool = True, model: str | None = None, corpus: str | None = None, description: str | None = None):
        what = "TensorSource"
        if not isinstance(x, Tensor):
            raise SourceError(f"{what} needs a torch.Tensor, got {type(x).__name__} (use ArraySource for NumPy arrays, or as_source)")
        d = _check_shape(x.shape, what)
        _check_dtype(x.dtype, what)
        self.x = x.detach()
        super().__init__(x.shape[0], d, hook_name=hook_name, chunk_tokens=chunk_tokens, shuffle=shuffle, check_finite=check_finite,
                         model=model, corpus=corpus, description=description or f"in-memory tensor {tuple(x.shape)} {str(x.dtype).replace('torch.', '')}",
                         what=what)

    def _read(self, lo: int, hi: int) -> Tensor:
        return self.x[lo:hi]


class ArraySource(_RowSource):
    """Activations in a NumPy array ``[n_tokens, d_in]``: in memory, a ``np.memmap``, or a ``.npy`` path.

    A path is opened with ``np.load(path, mmap_mode="r")``: nothing is read until a chunk is asked
    for, and each chunk (``chunk_tokens`` rows) is copied into memory on its own, so the file can be
    far larger than RAM; memory holds about one chunk (plus its shuffled copy) at a time. Example::

        mm = np.memmap("acts.f32", dtype=np.float32, mode="r", shape=(n_tokens, 768))
        train(TrainConfig(training_tokens=50_000_000), source=ArraySource(mm, chunk_tokens=262_144))
    """

    kind = "array"

    def __init__(self, array: np.ndarray | str | Path, *, hook_name: str | None = None, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                 shuffle: bool = True, check_finite: bool = True, model: str | None = None, corpus: str | None = None,
                 description: str | None = None):
        self.path: str | None = None
        if isinstance(array, (str, Path)):
            path = Path(array)
            if not path.is_file() or path.suffix != ".npy":
                raise SourceError(f"ArraySource: {path} is not a .npy file (for a folder of shards use ShardFolderSource)")
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as e:
                raise SourceError(f"ArraySource: {path} cannot be read as a .npy array ({e})") from None
            self.path = str(path.resolve())
        elif isinstance(array, np.memmap) and isinstance(getattr(array, "filename", None), str):
            self.path = array.filename
        if not isinstance(array, np.ndarray):
            raise SourceError(f"ArraySource needs a NumPy array, np.memmap or .npy path, got {type(array).__name__}")
        what = f"ArraySource({self.path})" if self.path else "ArraySource"
        d = _check_shape(array.shape, what)
        _check_dtype(array.dtype, what)
        self.array = array
        kind = "memmap" if (isinstance(array, np.memmap) or self.path) else "in-memory array"
        super().__init__(array.shape[0], d, hook_name=hook_name, chunk_tokens=chunk_tokens, shuffle=shuffle, check_finite=check_finite,
                         model=model, corpus=corpus, description=description or f"{kind} {tuple(array.shape)} {array.dtype}"
                         + (f" at {self.path}" if self.path else ""), what=what)

    def _read(self, lo: int, hi: int) -> Tensor:
        return torch.from_numpy(np.array(self.array[lo:hi], copy=True))  # one chunk in memory, not a view of the file

    def _where(self) -> dict[str, Any]:
        return {"path": self.path} if self.path else {}


def _natural_key(p: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


class ShardFolderSource(_RowSource):
    """A folder (or a list of files) of ``.safetensors`` and/or ``.npy`` shards, each ``[n_i, d_in]``.

    The shards, in natural name order (``shard_2`` before ``shard_10``), are read as one concatenation
    of rows; chunk ``i`` is rows ``[i·C, (i+1)·C)`` of it, read slice by slice (a chunk may span
    shards, a shard may span many chunks), so neither the folder nor one shard has to fit in memory.
    Only headers are read at construction. A safetensors file must hold one tensor, or name it with
    ``key`` (a saebench activation cache, ``acts.<hook>`` + ``token_ids``, is recognised: the hook
    name is taken from the key). Example::

        train(TrainConfig(training_tokens=10_000_000), source=ShardFolderSource("my_acts/", hook_name="layer6"))
    """

    kind = "shards"

    def __init__(self, folder: str | Path | Sequence[str | Path], *, key: str | None = None, hook_name: str | None = None,
                 chunk_tokens: int = DEFAULT_CHUNK_TOKENS, shuffle: bool = True, check_finite: bool = True, model: str | None = None,
                 corpus: str | None = None, description: str | None = None):
        if isinstance(folder, (str, Path)):
            root = Path(folder)
            if root.is_dir():
                files = sorted((p for p in root.iterdir() if p.suffix in (".safetensors", ".npy") and not p.name.startswith(".")), key=_natural_key)
                if not files:
                    raise SourceError(f"ShardFolderSource: {root} holds no .safetensors or .npy files")
            elif root.is_file():
                files = [root]
            else:
                raise SourceError(f"ShardFolderSource: {root} does not exist")
            label = str(root.resolve())
        else:
            files = [Path(f) for f in folder]
            if not files:
                raise SourceError("ShardFolderSource: the list of shard files is empty")
            label = f"{len(files)} files"
        what = f"ShardFolderSource({label})"
        self.label = label
        self.files: list[Path] = []
        self.keys: list[str | None] = []
        self.rows: list[int] = []
        d_in = None
        for f in files:
            if not f.is_file():
                raise SourceError(f"{what}: shard {f} does not exist")
            if f.suffix not in (".safetensors", ".npy"):
                raise SourceError(f"{what}: {f} is neither .safetensors nor .npy")
            k, shape, dtype = self._header(f, key, what)
            if k is not None and k.startswith("acts.") and hook_name is None and key is None:
                hook_name = k[5:]
            d = _check_shape(shape, f"{what}, shard {f.name}")
            _check_dtype(dtype, f"{what}, shard {f.name}")
            if d_in is not None and d != d_in:
                raise SourceError(f"{what}: shard {f.name} has width {d}, the earlier shards {d_in}; every shard must have the same d_in")
            d_in = d
            self.files.append(f)
            self.keys.append(k)
            self.rows.append(shape[0])
        self.offsets = np.cumsum([0] + self.rows)
        super().__init__(int(self.offsets[-1]), d_in, hook_name=hook_name, chunk_tokens=chunk_tokens, shuffle=shuffle, check_finite=check_finite,
                         model=model, corpus=corpus, description=description or f"{len(self.files)} shard(s) in {label}, {int(self.offsets[-1])} x {d_in}",
                         what=what)

    @staticmethod
    def _header(f: Path, key: str | None, what: str) -> tuple[str | None, tuple[int, ...], Any]:
        """(tensor key, shape, dtype) without reading the data."""
        if f.suffix == ".npy":
            try:
                a = np.load(f, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as e:
                raise SourceError(f"{what}: {f} cannot be read as a .npy array ({e})") from None
            return None, a.shape, a.dtype
        header, _ = _safetensors_header(f, what)
        names = [n for n in header if n != "__metadata__"]
        if key is not None:
            if key not in names:
                raise SourceError(f"{what}: {f.name} has no tensor {key!r} (it has {names})")
            k = key
        elif len(names) == 1:
            k = names[0]
        else:
            acts = [n for n in names if n.startswith("acts.")]
            if len(acts) != 1:
                raise SourceError(f"{what}: {f.name} holds several tensors {names}; say which with key=")
            k = acts[0]
        dtype, shape = header[k].get("dtype"), tuple(header[k].get("shape", ()))
        if dtype not in _ST_FLOATS:
            raise SourceError(f"{what}, shard {f.name}: activations must be floating point (F16/BF16/F32/F64), got {dtype}")
        return k, shape, getattr(torch, _ST_FLOATS[dtype])

    def _read(self, lo: int, hi: int) -> Tensor:
        parts = []
        first = int(np.searchsorted(self.offsets, lo, side="right")) - 1
        for s in range(first, len(self.files)):
            if self.offsets[s] >= hi:
                break
            a, b = max(lo, int(self.offsets[s])) - int(self.offsets[s]), min(hi, int(self.offsets[s + 1])) - int(self.offsets[s])
            if a >= b:  # an empty shard
                continue
            f = self.files[s]
            if f.suffix == ".npy":
                parts.append(torch.from_numpy(np.array(np.load(f, mmap_mode="r")[a:b], copy=True)))
            else:
                parts.append(_safetensors_rows(f, self.keys[s], a, b, self.what))
        parts = [p if p.dtype == torch.float32 else p.float() for p in parts]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    MAX_LISTED_FILES = 16

    def _where(self) -> dict[str, Any]:
        """Where the rows are: the folder, the number of shards and the first ``MAX_LISTED_FILES`` (path, rows)."""
        listed = [[str(f.resolve()), r] for f, r in zip(self.files[: self.MAX_LISTED_FILES], self.rows)]
        return {"folder": self.label, "n_files": len(self.files), "files": listed}


def _safetensors_header(f: Path, what: str) -> tuple[dict[str, Any], int]:
    """(header, offset of the data) of a safetensors file, read with plain file reads.

    Shards are read without ``safe_open``: it memory-maps the whole file, and a private mapping
    counts against a process's data limit (``RLIMIT_DATA``) however little of it is touched.
    """
    try:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 2 <= n <= 100_000_000:
                raise ValueError(f"header length {n}")
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as e:
        raise SourceError(f"{what}: {f} cannot be read as safetensors ({e})") from None
    if not isinstance(header, dict):
        raise SourceError(f"{what}: {f} cannot be read as safetensors (its header is not a JSON object)")
    return header, 8 + n


_ST_NUMPY = {"F16": np.float16, "BF16": np.uint16, "F32": np.float32, "F64": np.float64}


def _safetensors_rows(f: Path, key: str, a: int, b: int, what: str) -> Tensor:
    """Rows ``[a, b)`` of tensor ``key`` of a safetensors file: one seek and one read of exactly those bytes."""
    header, start = _safetensors_header(f, what)
    info = header[key]
    shape, dt = info["shape"], _ST_NUMPY[info["dtype"]]
    row = int(np.prod(shape[1:])) * np.dtype(dt).itemsize
    begin, end = info["data_offsets"]
    if end - begin != shape[0] * row:
        raise SourceError(f"{what}: {f} is corrupted (tensor {key!r} has {end - begin} bytes, its shape needs {shape[0] * row})")
    buf = bytearray((b - a) * row)
    with open(f, "rb") as fh:
        fh.seek(start + begin + a * row)
        if fh.readinto(buf) != len(buf):
            raise SourceError(f"{what}: {f} is truncated (rows {a}..{b} of {key!r} cannot be read)")
    x = torch.frombuffer(buf, dtype=torch.int16 if info["dtype"] == "BF16" else getattr(torch, np.dtype(dt).name)).view(b - a, *shape[1:])
    return x.view(torch.bfloat16) if info["dtype"] == "BF16" else x


# --------------------------------------------------------------------------------------------
# Iterators and DataLoaders
# --------------------------------------------------------------------------------------------


class IteratorSource(ActivationSource):
    """Activations from an iterator, generator or ``DataLoader`` yielding batches ``[b, d_in]``.

    ``data`` is one of:

    - a **factory**: a function with no arguments returning a new iterator over the data;
    - a **re-iterable** object (a list of tensors, a ``DataLoader``): ``iter(data)`` is called again
      whenever the stream must start over;
    - a **one-shot iterator** (a generator object): read once, never restarted.

    Items may be tensors or arrays, tuples/lists (the first element, e.g. a ``DataLoader``'s
    ``(x, y)``) or dicts (the ``key`` entry). The stream is the items' rows concatenated, pass after
    pass (when the iterator ends, a new one is made: the next epoch), cut into chunks of
    ``chunk_tokens`` rows; rows are shuffled within a chunk as for every source.

    **Resume semantics.** A checkpoint stores the stream position (chunk, batch). Resuming makes a
    new iterator and reads and discards the rows before that chunk (the cost of re-reading them, no
    training), then continues. This is exact when every new iterator yields the same rows in the same
    order: a deterministic factory, or a ``DataLoader`` without shuffling or whose shuffle
    ``generator`` is re-seeded inside the factory. Otherwise (an unseeded ``shuffle=True``, data that
    changes, random augmentation) the resumed run trains on *different* rows from that point: a valid
    run, but not the one an uninterrupted run would have made, and this cannot be detected here. A
    one-shot iterator cannot go back or start another pass: asking for an earlier chunk, or for more
    rows than it holds, is an error (pass a factory instead); after an interruption, hand the new
    process a fresh iterator over the same data and it is skipped forward like a factory's.
    """

    kind = "iterator"

    def __init__(self, data: Callable[[], Iterable] | Iterable, *, hook_name: str | None = None, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                 key: Any = None, check_finite: bool = True, model: str | None = None, corpus: str | None = None, description: str | None = None):
        self.what = "IteratorSource"
        if isinstance(data, (Tensor, np.ndarray)):
            raise SourceError(f"{self.what}: got a {type(data).__name__}; use TensorSource / ArraySource (or as_source) for a whole array")
        if callable(data) and not hasattr(data, "__iter__"):
            if any(p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                   for p in _signature_params(data)):
                raise SourceError(f"{self.what}: the factory must take no arguments and return a new iterator")
            self._factory, self.restartable, form = data, True, "factory"
        elif hasattr(data, "__iter__"):
            it = iter(data)
            if it is data:
                self._factory, self.restartable, form = None, False, "one-shot iterator"
                self._oneshot: Iterator | None = it
            else:
                self._factory, self.restartable, form = (lambda: iter(data)), True, f"re-iterable {type(data).__name__}"
        else:
            raise SourceError(f"{self.what} needs a factory, an iterable or an iterator, got {type(data).__name__}")
        self.form = form
        self.key = key
        self.chunk_tokens = _chunk_tokens(chunk_tokens)
        self.check_finite = check_finite
        self.model, self.corpus = model, corpus
        self.hook_name = hook_name or DEFAULT_HOOK
        self.hook_names = [self.hook_name]
        self._it: Iterator | None = None
        self._pos = 0  # stream row index of the next row the open iterator (plus _pending) gives
        self._pending: Tensor | None = None
        self._pass_rows = 0
        self._last: tuple[int, Batch] | None = None
        self.passes = 0
        self.rows_read = 0
        # The first batch fixes d_in (and is kept for the stream when the iterator is one-shot).
        self._open()
        first = self._next_item()
        if first is None:
            raise SourceError(f"{self.what}: the {form} yielded no rows")
        self._pending = first
        self.d_in = {self.hook_name: first.shape[1]}
        self.description = description or f"{form} of [*, {first.shape[1]}] batches"

    # ----- reading ----------------------------------------------------------------------------
    def _open(self) -> None:
        if self.restartable:
            self._it = iter(self._factory())
        else:
            if self._oneshot is None:
                raise SourceError(f"{self.what}: the one-shot iterator is exhausted and cannot start another pass; pass a factory "
                                  "(a function returning a new iterator over the data), or ask for fewer training_tokens")
            self._it, self._oneshot = self._oneshot, None
        self.passes += 1
        self._pass_rows = 0

    def _to_rows(self, item: Any) -> Tensor:
        if self.key is not None:
            item = item[self.key]
        elif isinstance(item, (tuple, list)):
            if not item:
                raise SourceError(f"{self.what}: the iterator yielded an empty {type(item).__name__}")
            item = item[0]
        elif isinstance(item, dict):
            if len(item) != 1:
                raise SourceError(f"{self.what}: the iterator yields dicts with keys {list(item)}; say which holds the activations with key=")
            item = next(iter(item.values()))
        if isinstance(item, np.ndarray):
            _check_dtype(item.dtype, self.what)
            item = torch.from_numpy(np.ascontiguousarray(item))
        if not isinstance(item, Tensor):
            raise SourceError(f"{self.what}: the iterator yielded a {type(item).__name__}; expected a tensor or array [batch, d_in]")
        _check_shape(item.shape, f"{self.what}, a yielded batch")
        _check_dtype(item.dtype, self.what)
        width = getattr(self, "d_in", {}).get(self.hook_name)
        if width is not None and item.shape[1] != width:
            raise SourceError(f"{self.what}: a batch has width {item.shape[1]}, the first had {width}; every batch must have the same d_in")
        return item.detach()

    def _next_item(self) -> Tensor | None:
        """The next non-empty batch of the open iterator, or None when it is exhausted."""
        for item in self._it:
            rows = self._to_rows(item)
            if rows.shape[0]:
                self._pass_rows += rows.shape[0]
                return rows
        return None

    def _take(self, n: int) -> Tensor | None:
        """The next ``n`` rows of the stream (fewer only at the end of a one-shot iterator; None if none left)."""
        parts, got = [], 0
        while got < n:
            if self._pending is None:
                self._pending = self._next_item()
                if self._pending is None:
                    if self._pass_rows == 0:
                        raise SourceError(f"{self.what}: a new pass of the {self.form} yielded no rows (was the data consumed elsewhere?)")
                    if not self.restartable:
                        if got:
                            break
                        self._open()  # raises: a one-shot iterator cannot restart
                    self._open()
                    continue
            p = self._pending
            use = min(n - got, p.shape[0])
            parts.append(p[:use])
            self._pending = p[use:] if use < p.shape[0] else None
            got += use
        self._pos += got
        self.rows_read += got
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def chunk(self, i: int) -> Batch:
        """Rows ``[i·C, (i+1)·C)`` of the stream; going back re-creates the iterator (or fails for a one-shot one)."""
        if self._last is not None and self._last[0] == i:
            return self._last[1]
        target = i * self.chunk_tokens
        if target < self._pos:
            if not self.restartable:
                raise SourceError(f"{self.what}: chunk {i} (row {target}) was already read from the one-shot iterator, which cannot go back; "
                                  "pass a factory (a function returning a new iterator over the same data)")
            self._it, self._pending, self._pos, self.passes = None, None, 0, 0
            self._open()
        while self._pos < target:  # skip forward (resume): read and discard
            if self._take(min(self.chunk_tokens, target - self._pos)) is None:
                raise SourceError(f"{self.what}: the one-shot iterator ended before row {target}")
        x = self._take(self.chunk_tokens)
        if x is None:
            raise SourceError(f"{self.what}: the one-shot iterator ended after {self._pos} rows; chunk {i} has none. Pass a factory so that "
                              "a new pass can start, or ask for fewer training_tokens")
        if x.dtype != torch.float32:
            x = x.float()
        if self.check_finite:
            _check_finite(x, target, self.what)
        batch = Batch({self.hook_name: x}, torch.zeros(x.shape[0], dtype=torch.long))
        self._last = (i, batch)
        return batch

    def one_pass(self) -> Iterator[Tensor]:
        """The rows of one pass over the data as validated float32 batches, from a fresh iterator (evaluation reads
        this; a one-shot iterator gives what it has left). Does not move the training stream's position."""
        if self.restartable:
            it = iter(self._factory())
        else:
            if self._oneshot is None and self._it is None:
                raise SourceError(f"{self.what}: the one-shot iterator is exhausted")
            it = self._it if self._it is not None else self._oneshot
            if self._pending is not None:
                yield self._pending.float()
                self._pending = None
        start = 0
        for item in it:
            x = self._to_rows(item).float()
            if self.check_finite:
                _check_finite(x, start, self.what)
            start += x.shape[0]
            if x.shape[0]:
                yield x

    @property
    def provenance(self) -> dict[str, Any]:
        return {"kind": self.kind, "form": self.form, "hook_name": self.hook_name, "d_in": self.d_in[self.hook_name],
                "description": self.description, "model": self.model, "corpus": self.corpus, "chunk_tokens": self.chunk_tokens,
                "fingerprint": _fingerprint({"d_in": self.d_in[self.hook_name], "hook_name": self.hook_name, "chunk_tokens": self.chunk_tokens})}


def _signature_params(fn) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return []


# --------------------------------------------------------------------------------------------
# Dispatch, and what training adopts from a source
# --------------------------------------------------------------------------------------------


def as_source(data: Any, **kwargs: Any) -> ActivationSource:
    """The source for ``data``: an ``ActivationSource`` as is; a tensor → :class:`TensorSource`; a NumPy
    array / memmap / ``.npy`` path → :class:`ArraySource`; a folder, ``.safetensors`` file or list of
    shard paths → :class:`ShardFolderSource`; a factory, iterable or iterator → :class:`IteratorSource`.
    ``kwargs`` go to the chosen class (``hook_name``, ``chunk_tokens``, ``model``...)."""
    if isinstance(data, ActivationSource):
        if kwargs:
            raise SourceError(f"as_source: {type(data).__name__} is already a source; options {sorted(kwargs)} cannot be applied to it")
        return data
    if isinstance(data, Tensor):
        return TensorSource(data, **kwargs)
    if isinstance(data, np.ndarray):
        return ArraySource(data, **kwargs)
    if isinstance(data, (str, Path)):
        p = Path(data)
        if p.is_file() and p.suffix == ".npy":
            return ArraySource(p, **kwargs)
        if p.is_dir() or (p.is_file() and p.suffix == ".safetensors"):
            return ShardFolderSource(p, **kwargs)
        raise SourceError(f"as_source: {p} is neither a folder of shards, a .npy file nor a .safetensors file")
    if isinstance(data, (list, tuple)) and data and all(isinstance(d, (str, Path)) for d in data):
        return ShardFolderSource(list(data), **kwargs)
    if callable(data) or hasattr(data, "__iter__"):
        return IteratorSource(data, **kwargs)
    raise SourceError(f"as_source: cannot make activations out of a {type(data).__name__}")


def adopt_source_fields(cfg, source: ActivationSource, model: Any = None):
    """``cfg`` with what it leaves unset taken from ``source``; a ConfigError where they disagree.

    "Unset" means not given or given with its default value (a config re-created from a dump sets
    every field), so an explicit default cannot contradict a source.

    - ``hook_name`` unset, the source has one hook and not the default one: the source's;
    - ``model`` / ``corpus``, when the source's ``provenance`` declares them (every source in this
      module, the synthetic one and an activation cache do): unset → the declared value, or
      ``"none"`` if the source names none; set to another value than a declared one → error;
    - a source that declares no provenance (your own ``ActivationSource`` subclass), holds no model
      (no ``model`` attribute, as harvesting sources have) and is trained with no ``model`` given:
      ``model`` / ``corpus`` unset → ``"none"`` (not the default model's name).
    """
    from saebench.config import ConfigError

    update: dict[str, Any] = {}

    def unset(field: str) -> bool:
        return field not in cfg.model_fields_set or getattr(cfg, field) == type(cfg).model_fields[field].default

    if unset("hook_name") and len(source.hook_names) == 1:
        update["hook_name"] = source.hook_names[0]
    prov = getattr(source, "provenance", None)
    if not isinstance(prov, dict) and model is None and getattr(source, "model", None) is None:
        prov = {"model": None, "corpus": None}
    if isinstance(prov, dict):
        for field in ("model", "corpus"):
            if field not in prov:
                continue
            declared = prov[field]
            if unset(field):
                update[field] = str(declared) if declared else NO_MODEL
            elif declared and getattr(cfg, field) != declared:
                raise ConfigError(f"the config says {field}={getattr(cfg, field)!r} but the activation source says its activations come from "
                                  f"{field} {declared!r}; leave {field} unset to record the source's, or fix one of them")
    return cfg.model_copy(update=update) if update else cfg


def source_provenance(source: ActivationSource, model: Any = None) -> dict[str, Any] | None:
    """The JSON-able provenance of a source; for one that declares none and holds no model (and no
    ``model`` is given) a stub naming its class; None for model-backed sources (harvesting)."""
    prov = getattr(source, "provenance", None)
    if not isinstance(prov, dict):
        if model is not None or getattr(source, "model", None) is not None:
            return None
        name = type(source).__name__
        prov = {"kind": name, "hook_names": list(source.hook_names), "d_in": dict(source.d_in), "model": None, "corpus": None,
                "description": f"{name} (declares no provenance: give it a `provenance` dict to record where its activations came from)"}
    return json.loads(json.dumps(prov, default=str))


__all__ = ["TensorSource", "ArraySource", "ShardFolderSource", "IteratorSource", "as_source", "adopt_source_fields", "source_provenance",
           "SourceError", "DEFAULT_HOOK", "NO_MODEL"]
