"""Text corpora and token packing for SAE training and evaluation.

A *source* names where documents come from:

* ``"default"``: real human-written English that installs offline from Debian: the ``fortunes``
  quotations (``/usr/share/games/fortunes``, one document per ``%``-separated entry) and the
  Python 3.11 reStructuredText docs from ``python3.11-doc`` (one document per file). About 15 MB of
  text, a few million SmolLM2 tokens. Documents come in a fixed seeded shuffle, so any prefix mixes
  both kinds of text.
* a local file: ``.txt``/``.md``/``.rst`` (one document per paragraph; paragraphs are separated by
  blank lines), ``.jsonl`` (one JSON object per line, text in ``text_field``), or ``.parquet``
  (column ``text_field``, read with pyarrow).
* a local directory: every such file under it, recursively, in sorted path order.
* ``"hf:NAME"`` or ``"hf:NAME:CONFIG"``: a Hugging Face dataset's ``train`` split, streamed with
  ``datasets.load_dataset(..., streaming=True)`` (needs ``pip install datasets`` and a network).

Every source is split the same way: a document whose text hashes into bucket 0 of
:data:`EVAL_BUCKETS` (about 5%) belongs to ``"eval"``, every other one to ``"train"``. Hashing the
content (not the position) keeps the split stable when files are added or reordered, and puts
duplicate documents on the same side, so eval never sees training text.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import warnings
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from saebench.config import SaebenchWarning

DEFAULT_CORPUS = "default"
FORTUNES_DIR = Path("/usr/share/games/fortunes")
PYTHON_DOCS_DIR = Path("/usr/share/doc/python3.11/html/_sources")
APT_COMMAND = "apt-get update && apt-get install -y fortunes python3.11-doc"
EVAL_BUCKETS = 20
SPLITS = ("train", "eval")
TEXT_SUFFIXES = (".txt", ".md", ".rst")
FILE_SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".parquet")
# Fortune files that are pictures rather than prose.
_SKIP_FORTUNES = {"ascii-art"}

__all__ = [
    "DEFAULT_CORPUS",
    "CorpusError",
    "CorpusWarning",
    "check_splits",
    "is_eval_document",
    "iter_documents",
    "load_tokens",
    "special_token_mask",
    "tokenize_and_pack",
]


class CorpusError(ValueError):
    """A corpus is missing, unreadable, or too short; the message says how to fix it."""


class CorpusWarning(SaebenchWarning):
    """A corpus is usable but not what it seems (invalid UTF-8 read as U+FFFD, control bytes)."""


# --------------------------------------------------------------------------- splitting


def is_eval_document(text: str) -> bool:
    """True when ``text`` belongs to the held-out eval split (~1 in :data:`EVAL_BUCKETS`)."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % EVAL_BUCKETS == 0


# --------------------------------------------------------------------------- readers


_OVERSTRIKE = re.compile("[^\b]\b")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")


def _strip_overstrike(text: str) -> str:
    # Some fortunes underline or embolden with terminal overstrike ("_\bX", "____\b\b\b\bword").
    while "\b" in text:
        cleaned = _OVERSTRIKE.sub("", text)
        if cleaned == text:
            return text.replace("\b", "")
        text = cleaned
    return text


def _read_fortunes(folder: Path) -> list[str]:
    docs = []
    for path in sorted(folder.iterdir()):
        # .dat are strfile indexes, .u8 are symlinks to the same text; subdirs (off/) are offensive.
        if not path.is_file() or path.is_symlink() or path.suffix in (".dat", ".u8"):
            continue
        if path.name in _SKIP_FORTUNES:
            continue
        text = _strip_overstrike(path.read_text(encoding="utf-8", errors="replace"))
        docs.extend(d.strip() for d in re.split(r"^%$", text, flags=re.MULTILINE))
    return [d for d in docs if d]


def _read_python_docs(folder: Path) -> list[str]:
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".txt", ".rst"))
    docs = (p.read_text(encoding="utf-8", errors="replace").strip() for p in paths)
    return [d for d in docs if d]


@lru_cache(maxsize=1)
def _default_documents() -> tuple[str, ...]:
    docs: list[str] = []
    if FORTUNES_DIR.is_dir():
        docs += _read_fortunes(FORTUNES_DIR)
    if PYTHON_DOCS_DIR.is_dir():
        docs += _read_python_docs(PYTHON_DOCS_DIR)
    if not docs:
        raise CorpusError(
            f"The default corpus needs Debian's text packages, and neither {FORTUNES_DIR} nor "
            f"{PYTHON_DOCS_DIR} exists. Install them with:\n    {APT_COMMAND}\n"
            "or pass another corpus (a .txt/.jsonl/.parquet file, a directory, or hf:NAME)."
        )
    # Fixed seed: the same order on every machine, and any prefix mixes quotations and prose.
    random.Random(0).shuffle(docs)
    return tuple(docs)


# Bytes that never occur in text: C0 controls other than \t \n \v \f \r, and DEL.
_CONTROL_BYTES = bytes([*range(9), *range(14, 32), 127])
_REPLACEMENT_UTF8 = "\ufffd".encode()
BINARY_FRACTION = 0.3  # above this fraction of invalid-UTF-8 characters and control bytes a file is refused as binary


class _Utf8Stats:
    """Decodes a file's bytes as UTF-8 (invalid bytes become U+FFFD) and counts what was replaced."""

    def __init__(self, path: Path):
        self.path, self.chars, self.bad, self.control, self.lines = path, 0, 0, 0, 0

    def decode(self, raw: bytes) -> str:
        self.lines += 1
        self.control += len(raw) - len(raw.translate(None, _CONTROL_BYTES))
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("utf-8", errors="replace")
            self.bad += text.count("\ufffd") - raw.count(_REPLACEMENT_UTF8)
        self.chars += len(text)
        return text

    def check_binary(self) -> None:
        frac = (self.bad + self.control) / max(self.chars, 1)
        if frac > BINARY_FRACTION:
            raise CorpusError(
                f"{self.path} looks like a binary file, not text: {frac:.0%} of its {self.chars:,} characters are invalid UTF-8 "
                f"or control bytes. Pass UTF-8 text (.txt/.md/.rst, .jsonl or .parquet)."
            )

    def warn(self, partial: bool = False) -> None:
        if not self.bad and self.control <= self.chars // 1000:
            return
        what = []
        if self.bad:
            what.append(f"{self.bad:,} of {self.chars:,} characters ({self.bad / max(self.chars, 1):.2%}) are not valid UTF-8 and are "
                        "read as U+FFFD (\ufffd)")
        if self.control > self.chars // 1000:
            what.append(f"{self.control:,} control bytes ({self.control / max(self.chars, 1):.2%})")
        where = f" (in the first {self.lines:,} lines read)" if partial else ""
        warnings.warn(
            f"corpus file {self.path}: {' and '.join(what)}{where}; the SAE trains on them as text. "
            "Convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8) or remove the binary parts.",
            CorpusWarning, stacklevel=3,
        )


def _read_text_file(path: Path) -> Iterator[str]:
    stats = _Utf8Stats(path)
    text = stats.decode(path.read_bytes())
    stats.check_binary()
    stats.warn()
    for para in _PARAGRAPH_BREAK.split(text):
        if para.strip():
            yield para.strip()


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    stats = _Utf8Stats(path)
    try:
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                line = stats.decode(raw)
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[text_field]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise CorpusError(
                        f"{path}:{lineno}: expected a JSON object with a {text_field!r} string field "
                        f"({type(e).__name__}: {e}). Pass text_field=... if the text is under another key."
                    ) from e
                if isinstance(text, str) and text.strip():
                    yield text
    except GeneratorExit:  # the reader stopped early (enough tokens): report what it read
        stats.warn(partial=True)
        raise
    stats.warn()


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise CorpusError(f"{path} is not a readable Parquet file ({e})") from None
    if text_field not in pf.schema_arrow.names:
        raise CorpusError(
            f"{path} has no column {text_field!r} (columns: {pf.schema_arrow.names}). Pass text_field=... to name the text column."
        )
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str) and text.strip():
                yield text


def _read_file(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix == ".jsonl":
        return _read_jsonl(path, text_field)
    if path.suffix == ".parquet":
        return _read_parquet(path, text_field)
    return _read_text_file(path)


def _read_hf(spec: str, text_field: str) -> Iterator[str]:
    name, _, config = spec.partition(":")
    if not name:
        raise CorpusError(f"hf: source needs a dataset name, as in 'hf:NAME' or 'hf:NAME:CONFIG', not {spec!r}")
    try:
        import datasets
    except ImportError as e:
        raise CorpusError(
            f"The source 'hf:{spec}' streams a Hugging Face dataset, which needs the 'datasets' package: pip install datasets"
        ) from e
    from saebench.models import _hub_reachable

    if not _hub_reachable():
        raise CorpusError(
            f"The source 'hf:{spec}' streams from the Hugging Face hub, which is not reachable "
            "(offline?). Use a local .txt/.jsonl/.parquet file or directory, or the offline "
            f"{DEFAULT_CORPUS!r} corpus."
        )
    try:
        ds = datasets.load_dataset(name, config or None, split="train", streaming=True)
    except Exception as e:
        raise CorpusError(
            f"Could not open Hugging Face dataset {name!r}"
            + (f" (config {config!r})" if config else "")
            + f": {type(e).__name__}: {e}. Check the name, the config and your access to it."
        ) from e
    return _hf_rows(ds, name, text_field)


def _hf_rows(ds, name: str, text_field: str) -> Iterator[str]:
    for row in ds:
        text = row.get(text_field)
        if text is None:
            raise CorpusError(
                f"Hugging Face dataset {name!r} has no field {text_field!r} (fields: {sorted(row)}). "
                "Pass text_field=... to name the text field."
            )
        if isinstance(text, str) and text.strip():
            yield text


def _source_documents(source: str | Path, text_field: str) -> Iterator[str]:
    """All documents of ``source``, before splitting. Checks the source exists up front."""
    if str(source) == DEFAULT_CORPUS:
        return iter(_default_documents())
    if isinstance(source, str) and source.startswith("hf:"):
        return _read_hf(source[3:], text_field)
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix not in FILE_SUFFIXES:
            raise CorpusError(f"Don't know how to read {path}: supported files end in {', '.join(FILE_SUFFIXES)}.")
        return _read_file(path, text_field)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES)
        if not files:
            raise CorpusError(f"Directory {path} holds no {'/'.join(FILE_SUFFIXES)} files to read text from.")
        return (doc for f in files for doc in _read_file(f, text_field))
    raise CorpusError(
        f"Corpus source {str(source)!r} not found. Pass {DEFAULT_CORPUS!r} (offline English text; "
        f"needs `{APT_COMMAND}`), a path to a .txt/.jsonl/.parquet file or a directory of them, "
        "or 'hf:NAME[:CONFIG]' for a Hugging Face dataset."
    )


def iter_documents(source: str | Path = DEFAULT_CORPUS, split: str = "train", text_field: str = "text") -> Iterator[str]:
    """Iterate over the documents of one split of a corpus, in a deterministic order.

    Args:
        source: ``"default"``, a file or directory path, or ``"hf:NAME[:CONFIG]"`` (see module doc).
        split: ``"train"`` (~95% of documents) or ``"eval"`` (the held-out ~5%).
        text_field: key of the text in ``.jsonl`` rows, ``.parquet`` columns and HF datasets.

    Raises:
        CorpusError: on the call when the source does not exist or is unusable (missing path,
            unsupported file type, no ``datasets`` package, hub unreachable); while iterating when
            a file's content is malformed (bad JSON line, missing text field or column).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    docs = _source_documents(source, text_field)
    want_eval = split == "eval"
    return (d for d in docs if is_eval_document(d) == want_eval)


def _split_rule(source) -> str:
    return (f"documents go to the held-out 'eval' split by a hash of their text (about 1 in {EVAL_BUCKETS}), so a corpus "
            f"needs many documents for both splits to get text; a .txt/.md/.rst file is cut into documents at blank lines, "
            f".jsonl at rows, .parquet at rows")


def check_splits(source: str | Path, train: bool = True, eval: bool = True, text_field: str = "text") -> None:
    """Raise ``CorpusError`` (before any model is loaded) when a split a run needs gets no document of ``source``.

    Local files and folders only (``default`` always has both splits; ``hf:`` sources are streamed).
    Reads documents until each needed split has one, so a normal corpus costs a few documents.
    """
    if str(source) == DEFAULT_CORPUS or (isinstance(source, str) and source.startswith("hf:")) or not (train or eval):
        return
    n = n_eval = 0
    for doc in _source_documents(source, text_field):
        n += 1
        n_eval += is_eval_document(doc)
        if (not train or n > n_eval) and (not eval or n_eval):
            return
    if n == 0:
        raise CorpusError(f"corpus {str(source)!r} holds no text (no non-empty document). Use a corpus with text in it.")
    docs = f"{n:,} document{'s' if n != 1 else ''}"
    if train and n == n_eval:
        raise CorpusError(
            f"corpus {str(source)!r} has {docs}, and all of them fall in the held-out 'eval' split, leaving nothing to train on: "
            f"{_split_rule(source)}. Split the text into more documents (blank lines between paragraphs) or use a larger corpus."
        )
    raise CorpusError(
        f"corpus {str(source)!r} has {docs}, and none falls in the held-out 'eval' split, so the evaluation would find 0 tokens: "
        f"{_split_rule(source)}. Split the text into more documents (blank lines between paragraphs), use a larger corpus, "
        "evaluate later on another corpus (saebench eval --corpus ...), or skip the eval after training (--eval-tokens 0)."
    )


# --------------------------------------------------------------------------- tokens


def _batches(docs: Iterable[str], max_chars: int = 200_000, max_docs: int = 256) -> Iterator[list[str]]:
    # Bounded by characters so a small max_tokens never tokenises much more text than it needs.
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if chars >= max_chars or len(batch) >= max_docs:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def tokenize_and_pack(
    docs: Iterable[str],
    tokenizer,
    context_size: int,
    max_tokens: int | None = None,
    prepend_bos: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """Tokenise documents and pack them into fixed-length rows.

    Documents are tokenised in batches (the fast tokenizer's batched call, no special tokens added),
    each followed by EOS, and the resulting stream is cut into rows. With ``prepend_bos`` every row
    is BOS + ``context_size - 1`` stream tokens, so each row reads like the start of a context. The
    last partial row is dropped.

    Args:
        docs: document strings.
        tokenizer: a Hugging Face tokenizer with ``eos_token_id`` (and ``bos_token_id``, or EOS is
            used as BOS, GPT-2 style).
        context_size: tokens per row, BOS included.
        max_tokens: stop once ``max_tokens // context_size`` rows are packed (None: all documents).
        prepend_bos: start every row with BOS.
        progress: a tqdm bar of the tokens packed (with an ETA when ``max_tokens`` is given).

    Returns:
        LongTensor ``[n_seq, context_size]``.

    Raises:
        CorpusError: the documents give less than one full row.
    """
    if context_size < 2:
        raise ValueError(f"context_size must be at least 2, not {context_size}")
    if max_tokens is not None and max_tokens < context_size:
        raise ValueError(f"max_tokens ({max_tokens}) must be at least context_size ({context_size})")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id to separate documents with")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    body = context_size - 1 if prepend_bos else context_size
    rows_wanted = None if max_tokens is None else max_tokens // context_size

    rows: list[np.ndarray] = []
    n_rows, n_stream = 0, 0
    carry = np.empty(0, dtype=np.int64)
    from tqdm.auto import tqdm

    bar = tqdm(total=None if rows_wanted is None else rows_wanted * context_size, desc="tokenise", unit="tok", unit_scale=True,
               disable=not progress, leave=False)
    for batch in _batches(docs):
        ids = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
        flat = np.full(int(lengths.sum()), eos, dtype=np.int64)
        # Scatter each document's ids in front of its EOS slot.
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        for start, x in zip(starts, ids):
            flat[start : start + len(x)] = x
        n_stream += len(flat)
        stream = np.concatenate((carry, flat))
        k = len(stream) // body
        if rows_wanted is not None:
            k = min(k, rows_wanted - n_rows)
        rows.append(stream[: k * body].reshape(k, body))
        carry = stream[k * body :]
        n_rows += k
        bar.update(k * context_size)
        if rows_wanted is not None and n_rows >= rows_wanted:
            break
    bar.close()
    if n_rows == 0:
        raise CorpusError(
            f"corpus too short: {n_stream} tokens, need at least context_size={context_size} "
            f"({body} text tokens{' + BOS' if prepend_bos else ''}) for one row. "
            "Use a larger corpus or a smaller context_size."
        )
    packed = torch.from_numpy(np.concatenate(rows))
    if prepend_bos:
        packed = torch.cat((torch.full((n_rows, 1), bos, dtype=torch.long), packed), dim=1)
    return packed


def special_ids(tokenizer) -> torch.Tensor:
    """Ids of BOS, EOS, pad and the tokenizer's other special tokens, as a LongTensor."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids |= {getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None), getattr(tokenizer, "pad_token_id", None)}
    ids.discard(None)
    return torch.tensor(sorted(ids), dtype=torch.long)


def special_token_mask(tokens: torch.Tensor, tokenizer) -> torch.Tensor:
    """Bool tensor shaped like ``tokens``: True at BOS/EOS/pad and any other special token.

    These positions are excluded from SAE training and evaluation by default: their activations
    (attention sinks, separators) are outliers that say nothing about the text.
    """
    return torch.isin(tokens, special_ids(tokenizer).to(tokens.device, tokens.dtype))


def load_tokens(
    source: str | Path,
    tokenizer,
    context_size: int,
    n_tokens: int | None,
    split: str = "train",
    text_field: str = "text",
    prepend_bos: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """Pack up to ``n_tokens`` tokens of one split of ``source`` into ``[n_seq, context_size]`` rows.

    Shorthand for ``tokenize_and_pack(iter_documents(source, split, text_field), tokenizer,
    context_size, max_tokens=n_tokens)``; see those for the details and errors.
    """
    seen = [0]

    def counted(docs: Iterable[str]) -> Iterator[str]:
        for doc in docs:
            seen[0] += 1
            yield doc

    try:
        return tokenize_and_pack(counted(iter_documents(source, split=split, text_field=text_field)), tokenizer, context_size,
                                 max_tokens=n_tokens, prepend_bos=prepend_bos, progress=progress)
    except CorpusError as e:
        if seen[0] or not str(e).startswith("corpus too short"):
            raise
        raise CorpusError(f"the {split!r} split of corpus {str(source)!r} is empty (0 documents): {_split_rule(source)}. "
                          "Use a corpus with more documents (for a .txt file: blank lines between paragraphs).") from None
