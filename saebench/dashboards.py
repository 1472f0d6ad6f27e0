"""Feature dashboards: one precompute pass over held-out tokens, stored for fast queries.

``build_dashboards(sae_dir)`` harvests and encodes a token set once, keeping only the sparse codes
(token, latent, value) of non-special positions, then walks the latents in feature batches and
stores, per latent: the top activating examples (and, for signed SAEs, the most negative ones),
random samples from equal-width activation intervals, density and a histogram of non-zero values,
top ± logit effects (``W_dec · W_U``) with their histogram, nearest latents by decoder cosine and
by activation (Pearson) correlation, and dead/dense flags.

Layout of ``SAE_DIR/dashboards/``:

- ``features.sqlite``: tables ``meta`` (provenance, JSON values), ``vocab``, ``features`` (one row
  per latent), ``examples`` (window of token values around each example), ``feature_tokens`` (the
  token at each top example's peak, for search by token), ``batches`` (finished feature batches)
  and ``examples_fts`` (FTS5 over top-example text);
- ``tokens.npy``: the token set ``[n_seq, context_size]`` (int32) the examples point into;
- ``feature_stats.npz``: ``density``, ``max_act``, ``min_act``, ``n_active`` per latent, for
  whole-SAE views without touching SQLite;
- ``labels.sqlite``: user labels/explanations with FTS5; never touched by a rebuild;
- ``codes.safetensors``: the harvested sparse codes while a build is unfinished (for resume).

Every feature batch is written in one SQLite transaction together with its row in ``batches``, so
a killed build resumes at the first unfinished batch and produces the same database.
"""

from __future__ import annotations

import contextlib
import html
import json
import math
import os
import random
import re
import sqlite3
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor
from tqdm.auto import tqdm

from saebench.io import ArtifactError, atomic_write_bytes, read_json, save_tensors, sha256_file
from saebench.layout import WEIGHTS_FILES, is_sae_folder
from saebench.sae import CFG_FILE, SAE

DASHBOARD_DIR = "dashboards"
DB_FILE = "features.sqlite"
LABELS_FILE = "labels.sqlite"
TOKENS_FILE = "tokens.npy"
STATS_FILE = "feature_stats.npz"
CODES_FILE = "codes.safetensors"
TOKEN_CODES_FILE = "token_codes.safetensors"  # the sparse codes, kept for co-activation across SAEs
# 2: fire_words (text search where the latent fires), summaries (+ FTS), token_codes.safetensors
FORMAT_VERSION = 2

__all__ = [
    "Dashboard",
    "DashboardConfig",
    "Example",
    "FeatureData",
    "PromptActs",
    "browse",
    "build_command",
    "build_dashboards",
    "dashboard_dir",
    "find_saes",
    "load_eval_results",
    "prompt_activations",
    "resolve_sae",
    "top_latents_per_token",
]


# =============================================================================================
# Configuration
# =============================================================================================


class DashboardConfig(BaseModel):
    """What a dashboard precompute computes and on which tokens (recorded as provenance)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_tokens: int = Field(131_072, gt=0, description="Tokens (positions, special tokens included) to scan for examples.")
    corpus: str | None = Field(None, description="Text source (default: the corpus the SAE was trained on, per its cfg metadata).")
    split: Literal["train", "eval"] = Field("eval", description="Corpus split; 'eval' is held out from SAE training.")
    context_size: int | None = Field(None, gt=1, description="Tokens per sequence (default: the SAE's context size, else 128).")
    exclude_special_tokens: bool = Field(True, description="Mask BOS/EOS/pad positions: they never count as activations.")
    outlier_norm_factor: float | None = Field(10.0, gt=1, description=(
        "Mask tokens whose activation norm exceeds this multiple of the median of their model batch (attention sinks, as in "
        "training): on SmolLM2 the first token after BOS has a norm of ~1,000x the rest and every latent would peak there. None keeps all."))
    model_batch_size: int = Field(16, gt=0, description="Sequences per model forward while harvesting.")
    feature_batch_size: int = Field(256, gt=0, description="Latents processed (and committed) together; the unit of resume.")
    n_top: int = Field(20, gt=0, description="Top-activating examples stored per latent (and most negative ones for signed SAEs).")
    n_intervals: int = Field(5, gt=0, description="Equal-width activation intervals sampled per latent (per sign for signed SAEs).")
    per_interval: int = Field(5, gt=0, description="Random examples stored per interval.")
    window_before: int = Field(16, ge=0, description="Context tokens stored before each example's peak token.")
    window_after: int = Field(6, ge=0, description="Context tokens stored after each example's peak token.")
    n_logits: int = Field(10, gt=0, description="Top positive and negative logit-effect tokens stored per latent.")
    n_hist_bins: int = Field(50, gt=1, description="Bins of the activation and logit-effect histograms.")
    n_neighbours: int = Field(10, gt=0, description="Nearest latents stored by decoder cosine and by activation correlation.")
    dense_threshold: float = Field(0.1, gt=0, le=1, description="A latent active on more than this fraction of tokens is flagged dense.")
    seed: int = Field(0, description="Seed for the interval samples.")
    device: str = Field("cpu", description="Device for the model, the SAE and the matrix products.")


def dashboard_dir(sae_dir: str | Path) -> Path:
    """Where the dashboards of the SAE in ``sae_dir`` live."""
    return Path(sae_dir) / DASHBOARD_DIR


def build_command(sae_dir: str | Path) -> str:
    """The shell command that builds the dashboards of ``sae_dir`` (shown by the app when missing)."""
    return f"saebench dashboards {_shell_quote(str(sae_dir))}"


def _shell_quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


# =============================================================================================
# SQLite helpers
# =============================================================================================

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS vocab(id INTEGER PRIMARY KEY, token TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS batches(batch INTEGER PRIMARY KEY, first INTEGER NOT NULL, stop INTEGER NOT NULL, seconds REAL);
CREATE TABLE IF NOT EXISTS features(
    feature INTEGER PRIMARY KEY,
    n_active INTEGER NOT NULL,
    density REAL NOT NULL,
    max_act REAL, min_act REAL, mean_act REAL,
    dead INTEGER NOT NULL, dense INTEGER NOT NULL,
    act_hist TEXT, intervals TEXT,
    logits_pos TEXT, logits_neg TEXT, logit_hist TEXT,
    cos_neighbours TEXT, corr_neighbours TEXT
);
CREATE INDEX IF NOT EXISTS features_live ON features(dead, feature);
CREATE TABLE IF NOT EXISTS examples(
    feature INTEGER NOT NULL, kind TEXT NOT NULL, rank INTEGER NOT NULL, bin INTEGER NOT NULL,
    seq INTEGER NOT NULL, pos INTEGER NOT NULL, value REAL NOT NULL, start INTEGER NOT NULL, acts BLOB NOT NULL,
    PRIMARY KEY(feature, kind, rank)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS feature_tokens(
    token_id INTEGER NOT NULL, feature INTEGER NOT NULL, n INTEGER NOT NULL, max_value REAL NOT NULL,
    PRIMARY KEY(token_id, feature)
) WITHOUT ROWID;
CREATE VIRTUAL TABLE IF NOT EXISTS examples_fts USING fts5(tokens, contexts);
CREATE TABLE IF NOT EXISTS fire_words(
    word TEXT NOT NULL, feature INTEGER NOT NULL, value REAL NOT NULL, rel REAL NOT NULL, kind TEXT NOT NULL, rank INTEGER NOT NULL,
    PRIMARY KEY(word, feature)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS summaries(feature INTEGER PRIMARY KEY, summary TEXT NOT NULL, text TEXT NOT NULL);
CREATE VIRTUAL TABLE IF NOT EXISTS summary_fts USING fts5(text);
"""

_LABELS_SCHEMA = """
CREATE TABLE IF NOT EXISTS labels(
    feature INTEGER PRIMARY KEY, label TEXT NOT NULL DEFAULT '', explanation TEXT NOT NULL DEFAULT '',
    source TEXT NOT NULL DEFAULT 'user', updated_at TEXT NOT NULL
);
CREATE VIRTUAL TABLE IF NOT EXISTS labels_fts USING fts5(label, explanation, content='labels', content_rowid='feature');
CREATE TRIGGER IF NOT EXISTS labels_ai AFTER INSERT ON labels BEGIN
  INSERT INTO labels_fts(rowid, label, explanation) VALUES (new.feature, new.label, new.explanation);
END;
CREATE TRIGGER IF NOT EXISTS labels_ad AFTER DELETE ON labels BEGIN
  INSERT INTO labels_fts(labels_fts, rowid, label, explanation) VALUES('delete', old.feature, old.label, old.explanation);
END;
CREATE TRIGGER IF NOT EXISTS labels_au AFTER UPDATE ON labels BEGIN
  INSERT INTO labels_fts(labels_fts, rowid, label, explanation) VALUES('delete', old.feature, old.label, old.explanation);
  INSERT INTO labels_fts(rowid, label, explanation) VALUES (new.feature, new.label, new.explanation);
END;
"""


def _connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30, check_same_thread=False)
    else:
        con = sqlite3.connect(path, timeout=30, check_same_thread=False)
    con.execute("PRAGMA busy_timeout=30000")
    return con


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[sqlite3.Connection]:
    """A short-lived read-only connection (one per query keeps the app thread-safe)."""
    con = _connect(path, readonly=True)
    try:
        yield con
    finally:
        con.close()


def _get_meta(con: sqlite3.Connection) -> dict[str, Any]:
    return {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta")}


def _set_meta(con: sqlite3.Connection, **items: Any) -> None:
    con.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", [(k, json.dumps(v)) for k, v in items.items()])


def _fts_query(text: str) -> str | None:
    """User text → an FTS5 query matching all its words as literal strings (no FTS syntax).

    Bounded like every search: at most ``MAX_QUERY_CHARS`` characters and ``MAX_QUERY_WORDS`` distinct words.
    """
    words, _ = query_words(text)
    if not words:
        return None
    return " ".join('"' + w.replace('"', '""') + '"' for w in words)


# ---- bounds on user searches (issue: a pasted 50,000-word query kept the server busy for hours) ----
MAX_QUERY_CHARS = 1000  # characters of a query that are read; the rest is ignored (and said so)
MAX_QUERY_WORDS = 16  # distinct words used
SEARCH_TIME_LIMIT_S = 2.0  # SQLite work per search; a longer one is interrupted (progress handler)
PROGRESS_STEPS = 2000  # SQLite VM steps between two checks of the deadline
SEARCH_SLOTS = 2  # searches running at once in this process; others wait up to the time limit
_search_slots = threading.BoundedSemaphore(SEARCH_SLOTS)


def query_words(text: str) -> tuple[list[str], list[str]]:
    """The distinct (casefolded) words of a user query, bounded; and notes saying what was cut."""
    notes = []
    text = str(text)
    if len(text) > MAX_QUERY_CHARS:
        notes.append(f"The query was cut to its first {MAX_QUERY_CHARS:,} characters (of {len(text):,}).")
        text = text[:MAX_QUERY_CHARS]
    words = list(dict.fromkeys(w.casefold() for w in _WORD.findall(text) if len(w) <= MAX_WORD_CHARS))
    if len(words) > MAX_QUERY_WORDS:
        notes.append(f"Only the first {MAX_QUERY_WORDS} of its {len(words)} distinct words were searched.")
        words = words[:MAX_QUERY_WORDS]
    return words, notes


class SearchBusy(RuntimeError):
    """Every search slot stayed taken for the whole time limit."""


@contextlib.contextmanager
def _bounded_search(con: sqlite3.Connection, seconds: float | None = None) -> Iterator[list[bool]]:
    """Hold one of ``SEARCH_SLOTS`` and interrupt the connection's SQLite work after ``seconds``.

    Yields a one-element list that is True once the deadline passed (the query then raises
    ``sqlite3.OperationalError: interrupted``). Raises :class:`SearchBusy` if no slot frees up in time.
    """
    seconds = SEARCH_TIME_LIMIT_S if seconds is None else seconds
    if not _search_slots.acquire(timeout=seconds):
        raise SearchBusy("other searches are running; try again in a moment")
    deadline = time.monotonic() + seconds
    hit = [False]

    def check() -> int:
        if time.monotonic() > deadline:
            hit[0] = True
            return 1
        return 0

    con.set_progress_handler(check, PROGRESS_STEPS)
    try:
        yield hit
    finally:
        con.set_progress_handler(None, 0)
        _search_slots.release()


def _time_note(seconds: float | None = None) -> str:
    return (f"The search was stopped after {SEARCH_TIME_LIMIT_S if seconds is None else seconds:g} s "
            "(the time limit per search): results may be incomplete.")


# =============================================================================================
# Precompute
# =============================================================================================


def _special_ids(tokenizer) -> Tensor:
    from saebench import text

    if hasattr(text, "special_ids"):
        return text.special_ids(tokenizer)
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids |= {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    ids.discard(None)
    return torch.tensor(sorted(ids), dtype=torch.long)


def _sae_hook(sae: SAE) -> tuple[str, int | None]:
    from saebench.activations import parse_hook

    name = sae.cfg.hook_name
    if not name:
        raise ArtifactError("the SAE's cfg.json has no hook_name; cannot run it on a model")
    if ":" in name:
        return parse_hook(name)
    return name, sae.cfg.hook_head_index


def _sae_fingerprint(sae_dir: Path) -> str:
    """sha256 of the SAE weights (from its manifest when present: hashing is then free)."""
    for weights in WEIGHTS_FILES:
        path = sae_dir / weights
        if not path.exists():
            continue
        manifest = sae_dir / "manifest.json"
        if manifest.exists():
            try:
                entry = read_json(manifest, "manifest")["files"][weights]
                if entry.get("bytes") == path.stat().st_size:
                    return entry["sha256"]
            except (ArtifactError, KeyError, TypeError):
                pass
        return sha256_file(path)
    raise ArtifactError(f"{sae_dir} holds no SAE weights")


def _vocab_strings(tokenizer) -> list[str]:
    """Each vocabulary id decoded on its own (how a token is shown in the browser)."""
    n = len(tokenizer)
    return [tokenizer.decode([i]) for i in range(n)]


@torch.no_grad()
def harvest_codes(model, sae: SAE, tokens: Tensor, special_ids: Tensor | None, batch_size: int = 16, progress: bool = True,
                  outlier_norm_factor: float | None = None, counts: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Run the model and the SAE over ``tokens`` [n_seq, ctx] once; return the non-zero codes.

    Returns ``(tok, feat, val)``: flat position ``seq * ctx + pos`` (int64), latent (int32) and value
    (float32) of every non-zero activation, sorted by position. Special positions are never encoded, nor
    (with ``outlier_norm_factor``) positions whose activation norm exceeds that multiple of the median
    over the batch's other kept positions. ``counts`` (if given) receives ``n_valid`` (positions encoded)
    and ``n_outliers`` (positions masked as outliers).
    """
    from saebench.activations import _flatten_site, hook_layer_of, token_mask
    from saebench.models import validate_hook_name

    hook, head = _sae_hook(sae)
    validate_hook_name(model, hook)
    stop = hook_layer_of(hook) + 1 if hook.startswith("blocks.") else None
    n_seq, ctx = tokens.shape
    device = sae.device
    toks_out, feats_out, vals_out = [], [], []
    n_kept = n_out = 0
    positions = torch.arange(n_seq * ctx).view(n_seq, ctx)
    t0 = time.perf_counter()
    for start in tqdm(range(0, n_seq, batch_size), desc="harvest + encode", disable=not progress, leave=False):
        toks = tokens[start : start + batch_size]
        _, cache = model.run_with_cache(toks.to(device), names_filter=lambda n: n == hook, stop_at_layer=stop)
        x = _flatten_site(cache[hook], head)
        if x.shape[-1] != sae.d_in:
            raise ArtifactError(f"SAE d_in={sae.d_in} does not match the width {x.shape[-1]} of hook {hook} in this model")
        keep = token_mask(toks, special_ids).to(x.device)
        if outlier_norm_factor is not None:
            norms = x.float().norm(dim=-1)
            ref = norms[keep & torch.isfinite(norms)]
            if ref.numel():
                ok = norms <= outlier_norm_factor * ref.median()
                n_out += int((keep & ~ok).sum())
                keep &= ok
        n_kept += int(keep.sum())
        acts = sae.encode_sparse(x[keep].float())
        keep = keep.cpu()
        nz = acts.values != 0
        pos = positions[start : start + toks.shape[0]][keep]
        toks_out.append(pos[:, None].expand(-1, acts.indices.shape[1])[nz.cpu()])
        feats_out.append(acts.indices[nz].to("cpu", torch.int32))
        vals_out.append(acts.values[nz].to("cpu", torch.float32))
        del cache
    if progress:  # the bar is transient; say what it did
        sec = time.perf_counter() - t0
        tqdm.write(f"harvest + encode: {n_seq * ctx:,} tokens ({n_seq:,} sequences × {ctx}) through the model and the SAE "
                   f"in {sec:.1f} s ({n_seq * ctx / max(sec, 1e-9):,.0f} tokens/s)", file=sys.stderr)
    if counts is not None:
        counts.update(n_valid=n_kept, n_outliers=n_out)
    return torch.cat(toks_out), torch.cat(feats_out), torch.cat(vals_out)


@dataclass
class _Codes:
    """Sparse codes in both orders: token-major (for co-occurrence) and feature-major (examples)."""

    n_positions: int
    n_valid: int  # non-special, non-outlier positions (the density denominator)
    tok: Tensor  # [nnz] int64, token-major
    feat: Tensor  # [nnz] int32
    val: Tensor  # [nnz] float32
    row_ptr: Tensor = field(init=False)  # [n_positions + 1]
    f_tok: Tensor = field(init=False)  # feature-major copies (tokens ascending within a latent)
    f_val: Tensor = field(init=False)
    f_key: Tensor = field(init=False)  # latent * n_positions + token, ascending: a sorted lookup key
    col_ptr: Tensor = field(init=False)  # [d_sae + 1]
    pad_feat: Tensor | None = field(init=False)  # [n_positions, K_max] latent ids (-1 = none), if compact
    pad_val: Tensor | None = field(init=False)
    mean: Tensor = field(init=False)  # per-latent E[f] over valid tokens (float64)
    std: Tensor = field(init=False)
    n_outliers: int = 0  # positions masked as activation-norm outliers

    def index(self, d_sae: int) -> _Codes:
        counts = torch.bincount(self.tok, minlength=self.n_positions)
        self.row_ptr = torch.zeros(self.n_positions + 1, dtype=torch.long)
        self.row_ptr[1:] = counts.cumsum(0)
        order = torch.argsort(self.feat, stable=True)  # stable: tokens stay ascending within a latent
        self.f_tok, self.f_val = self.tok[order], self.val[order]
        self.f_key = self.feat[order].long() * self.n_positions + self.f_tok
        fcounts = torch.bincount(self.feat.long(), minlength=d_sae)
        self.col_ptr = torch.zeros(d_sae + 1, dtype=torch.long)
        self.col_ptr[1:] = fcounts.cumsum(0)
        # A padded token-major copy makes co-occurrence a plain gather; skip it when a few tokens
        # with a huge L0 would make it much larger than the codes themselves (ReLU/JumpReLU).
        k_max = int(counts.max()) if len(counts) else 0
        self.pad_feat = self.pad_val = None
        if 0 < k_max and self.n_positions * k_max <= 4 * len(self.tok) + 1024:
            slot = torch.arange(len(self.tok)) - self.row_ptr[self.tok]
            self.pad_feat = torch.full((self.n_positions, k_max), -1, dtype=torch.int32)
            self.pad_val = torch.zeros(self.n_positions, k_max)
            self.pad_feat[self.tok, slot] = self.feat
            self.pad_val[self.tok, slot] = self.val
        v = self.val.double()
        s1 = torch.zeros(d_sae, dtype=torch.float64).index_add_(0, self.feat.long(), v)
        s2 = torch.zeros(d_sae, dtype=torch.float64).index_add_(0, self.feat.long(), v * v)
        n = max(self.n_valid, 1)
        self.mean = s1 / n
        self.std = (s2 / n - self.mean**2).clamp_min(0).sqrt()
        return self


def _provenance_key(sae_dir: Path, sae: SAE, model_name: str, cfg: DashboardConfig, corpus: str, ctx: int) -> dict[str, Any]:
    """What decides the contents of the dashboards: a resumed build must match it exactly."""
    return {
        "format_version": FORMAT_VERSION,
        "sae_sha256": _sae_fingerprint(sae_dir),
        "model": model_name,
        "hook_name": sae.cfg.hook_name,
        "corpus": corpus,
        "context_size": ctx,
        "options": cfg.model_dump(exclude={"device", "model_batch_size", "corpus", "context_size"}),
    }


def build_dashboards(
    sae_dir: str | Path,
    *,
    model=None,
    n_tokens: int = 131_072,
    batch_size: int = 16,
    resume: bool = True,
    progress: bool = True,
    out_dir: str | Path | None = None,
    **options: Any,
) -> Path:
    """Precompute the feature dashboards of the SAE in ``sae_dir``; return the dashboard folder.

    Args:
        sae_dir: an SAE folder (saebench or SAELens format).
        model: a loaded model, a model name/folder, or None for the one in the SAE's cfg.json.
        n_tokens: positions to scan (``n_tokens // context_size`` sequences of the held-out split).
        batch_size: sequences per model forward.
        resume: continue an unfinished build with the same settings (a finished one is returned as
            is); with False, derived files are deleted and rebuilt (labels are kept).
        progress: show progress bars.
        out_dir: dashboard folder (default ``SAE_DIR/dashboards``).
        **options: any other :class:`DashboardConfig` field (``corpus``, ``split``, ``context_size``,
            ``feature_batch_size``, ``n_top``, ``device``, ...).

    Raises:
        ArtifactError: an existing build used other settings and ``resume`` is True.
    """
    cfg = DashboardConfig(n_tokens=n_tokens, model_batch_size=batch_size, **options)
    sae_dir = Path(sae_dir)
    out = Path(out_dir) if out_dir is not None else dashboard_dir(sae_dir)
    t_start = time.perf_counter()
    sae = SAE.load(sae_dir, device=cfg.device)
    sae.requires_grad_(False)
    model, model_name = _resolve_model(model, sae, cfg.device)
    corpus = cfg.corpus or sae.cfg.metadata.get("corpus") or "default"
    ctx = cfg.context_size or sae.cfg.context_size or 128
    key = _provenance_key(sae_dir, sae, model_name, cfg, corpus, ctx)

    out.mkdir(parents=True, exist_ok=True)
    db_path = out / DB_FILE
    if db_path.exists():
        with contextlib.closing(_connect(db_path)) as con:
            try:
                old = _get_meta(con).get("key")
            except sqlite3.DatabaseError:
                old = None
        if old == key and resume:
            pass
        elif resume and old is not None:
            raise ArtifactError(
                f"{out} holds dashboards built with other settings; the options that differ: {'; '.join(_key_differences(old, key))}. "
                "Rebuild them with resume=False (CLI: --no-resume; labels are kept), write these elsewhere with "
                "out_dir=DIR (CLI: --out-dir DIR), or keep the existing build by asking for its settings"
            )
        else:
            _remove_derived(out)

    con = _connect(db_path)
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.executescript(_SCHEMA)
        meta = _get_meta(con)
        d_sae = sae.d_sae
        fb = cfg.feature_batch_size
        n_batches = math.ceil(d_sae / fb)
        done = {b for (b,) in con.execute("SELECT batch FROM batches")}
        if meta.get("complete") and len(done) == n_batches:
            return out

        tokenizer = model.tokenizer
        if "key" not in meta:
            with con:
                con.executemany("INSERT OR REPLACE INTO vocab(id, token) VALUES (?, ?)", enumerate(_vocab_strings(tokenizer)))
                _set_meta(con, key=key, d_sae=d_sae, n_batches=n_batches, complete=False, provenance=_provenance(sae, model_name, cfg, corpus, ctx),
                          special_ids=_special_ids(tokenizer).tolist())
        vocab = np.array([t for (t,) in con.execute("SELECT token FROM vocab ORDER BY id")], dtype=object)

        t0 = time.perf_counter()
        tokens, codes = _load_or_harvest(out, model, sae, cfg, corpus, ctx, tokenizer, progress)
        harvest_seconds = time.perf_counter() - t0
        codes.index(d_sae)
        n_seq = tokens.shape[0]
        with con:
            _set_meta(con, n_sequences=n_seq, n_positions=codes.n_positions, n_valid_tokens=codes.n_valid,
                      provenance=_provenance(sae, model_name, cfg, corpus, ctx) | {"n_sequences": n_seq, "n_positions": codes.n_positions, "n_tokens": codes.n_valid,
                                                                                   "n_outlier_tokens": codes.n_outliers})

        W_dec = sae.W_dec.detach().float()
        W_dec_unit = W_dec / W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        W_U = _unembedding(model, sae.d_in)
        todo = [b for b in range(n_batches) if b not in done]
        t1 = time.perf_counter()
        scratch = torch.zeros(min(fb, d_sae) * d_sae, dtype=torch.float64)
        for b in tqdm(todo, desc="feature batches", disable=not progress):
            tb = time.perf_counter()
            lo, hi = b * fb, min(d_sae, (b + 1) * fb)
            rows = _compute_batch(b, lo, hi, codes, tokens, W_dec, W_dec_unit, W_U, cfg, sae.cfg.signed, vocab, scratch)
            _write_batch(con, b, lo, hi, rows, time.perf_counter() - tb)
        batches_seconds = time.perf_counter() - t1

        _finish(out, con, codes, d_sae, timings={"harvest_encode_s": harvest_seconds, "feature_batches_s": batches_seconds,
                                                 "total_s": time.perf_counter() - t_start})
    finally:
        con.close()
    return out


_CLI_FLAGS = {"n_tokens": "--n-tokens", "model": "--model"}


def _key_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``'n_tokens (--n-tokens): built with 131072, asked for 1024'`` for every setting that differs."""
    out = []

    def say(name: str, a: Any, b: Any) -> None:
        flag = f" ({_CLI_FLAGS[name]})" if name in _CLI_FLAGS else ""
        out.append(f"{name}{flag}: built with {a!r}, asked for {b!r}")

    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if k == "sae_sha256":
            out.append("the SAE's weights changed since the build (sha256 " + f"{str(a)[:12]}… → {str(b)[:12]}…)")
        elif k == "options" and isinstance(a, dict) and isinstance(b, dict):
            for o in sorted(set(a) | set(b)):
                if a.get(o) != b.get(o):
                    say(o, a.get(o), b.get(o))
        else:
            say(k, a, b)
    return out


def _resolve_model(model, sae: SAE, device: str):
    from saebench.models import load_model

    if model is None or isinstance(model, (str, os.PathLike)):
        name = str(model) if model is not None else (sae.cfg.model_name or None)
        return load_model(name, device=device), name or "smollm2-135m"
    # A loaded model is taken to be the SAE's own (its cfg names it); TransformerLens' cfg.model_name is
    # only a path, which would make the same build look different when resumed from the CLI.
    name = sae.cfg.model_name or getattr(getattr(model, "cfg", None), "model_name", None) or type(model).__name__
    return model, str(name)


def _provenance(sae: SAE, model_name: str, cfg: DashboardConfig, corpus: str, ctx: int) -> dict[str, Any]:
    return {
        "model": model_name,
        "hook_name": sae.cfg.hook_name,
        "architecture": sae.cfg.architecture,
        "method": sae.cfg.method,
        "d_sae": sae.d_sae,
        "d_in": sae.d_in,
        "signed": sae.cfg.signed,
        "corpus": corpus,
        "split": cfg.split,
        "context_size": ctx,
        "exclude_special_tokens": cfg.exclude_special_tokens,
        "outlier_norm_factor": cfg.outlier_norm_factor,
        "requested_tokens": cfg.n_tokens,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _remove_derived(out: Path) -> None:
    for name in (DB_FILE, DB_FILE + "-wal", DB_FILE + "-shm", TOKENS_FILE, STATS_FILE, CODES_FILE, TOKEN_CODES_FILE):
        (out / name).unlink(missing_ok=True)


def _load_or_harvest(out: Path, model, sae: SAE, cfg: DashboardConfig, corpus: str, ctx: int, tokenizer, progress: bool) -> tuple[Tensor, _Codes]:
    """The token set and its sparse codes: from the resume cache when present, else computed once."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    codes_path = out / CODES_FILE
    if codes_path.exists() and (out / TOKENS_FILE).exists():
        try:
            t = load_file(str(codes_path))
            tokens = torch.from_numpy(np.load(out / TOKENS_FILE).astype(np.int64))
            codes = _Codes(tokens.numel(), int(t["n_valid"].item()), t["tok"], t["feat"], t["val"])
            codes.n_outliers = int(t["n_outliers"].item()) if "n_outliers" in t else 0
            return tokens, codes
        except (SafetensorError, OSError, KeyError, ValueError):
            codes_path.unlink(missing_ok=True)  # a corrupted cache is recomputed, never trusted
    from saebench import text

    tokens = text.load_tokens(corpus, tokenizer, ctx, cfg.n_tokens, split=cfg.split)
    special = _special_ids(tokenizer) if cfg.exclude_special_tokens else None
    counts: dict[str, int] = {}
    tok, feat, val = harvest_codes(model, sae, tokens, special, batch_size=cfg.model_batch_size, progress=progress,
                                   outlier_norm_factor=cfg.outlier_norm_factor, counts=counts)
    n_valid = counts["n_valid"]
    buf = _npy_bytes(tokens.numpy().astype(np.int32))
    atomic_write_bytes(out / TOKENS_FILE, buf)
    save_tensors(codes_path, {"tok": tok, "feat": feat, "val": val, "n_valid": torch.tensor(n_valid),
                              "n_outliers": torch.tensor(counts["n_outliers"])})
    codes = _Codes(tokens.numel(), n_valid, tok, feat, val)
    codes.n_outliers = counts["n_outliers"]
    return tokens, codes


def _npy_bytes(arr: np.ndarray) -> bytes:
    import io

    f = io.BytesIO()
    np.save(f, arr)
    return f.getvalue()


def _unembedding(model, d_in: int) -> Tensor | None:
    """``W_U`` [d_model, vocab] when the SAE reads a d_model-wide stream, else None (no logit effects)."""
    W_U = getattr(model, "W_U", None)
    if W_U is None or W_U.shape[0] != d_in:
        return None
    return W_U.detach().float()


class _BatchRows(NamedTuple):
    features: list[tuple]
    examples: list[tuple]
    feature_tokens: list[tuple]
    fts: list[tuple]
    stats: dict[str, np.ndarray]
    fire_words: list[tuple] = []  # noqa: RUF012 - NamedTuple defaults, never mutated
    summaries: list[tuple] = []  # noqa: RUF012


_WORD = re.compile(r"\w+", flags=re.UNICODE)
MAX_WORD_CHARS = 64
SUMMARY_TOP = 5


def _window_words(tok_strs: list[str], vals: np.ndarray) -> dict[str, float]:
    """Words of a window (found in the joined text, so a word split into several tokens is one word)
    mapped to the largest |activation| on the tokens it overlaps; words where the latent is 0 are left out."""
    starts, pos = [], 0
    for t in tok_strs:
        starts.append(pos)
        pos += len(t)
    text = "".join(tok_strs)
    out: dict[str, float] = {}
    import bisect

    for m in _WORD.finditer(text):
        a, b = m.span()
        w = m.group().casefold()
        if len(w) > MAX_WORD_CHARS:
            continue
        j0 = max(bisect.bisect_right(starts, a) - 1, 0)
        j1 = max(bisect.bisect_left(starts, b), j0 + 1)
        v = float(np.abs(vals[j0:j1]).max()) if j1 > j0 else 0.0
        if v > 0 and v > out.get(w, 0.0):
            out[w] = v
    return out


class _VocabWords(NamedTuple):
    """Per vocabulary id: its (casefolded) words, and whether it starts / ends with a word character
    (then a word may continue into the neighbouring token)."""

    words: list[tuple[str, ...]]
    starts_w: list[bool]
    ends_w: list[bool]

    @classmethod
    def of(cls, vocab) -> _VocabWords:
        words, sw, ew = [], np.zeros(len(vocab), bool), np.zeros(len(vocab), bool)
        for i, t in enumerate(vocab):
            words.append(tuple(w.casefold() for w in _WORD.findall(t)))
            sw[i] = not t or bool(_WORD.match(t[0]))  # an empty token is transparent: a word may run through it
            ew[i] = not t or bool(_WORD.match(t[-1]))
        return cls(words, sw.tolist(), ew.tolist())


_VOCAB_WORDS: dict[int, tuple[Any, _VocabWords]] = {}


def _vocab_words(vocab) -> _VocabWords:
    hit = _VOCAB_WORDS.get(id(vocab))
    if hit is None or hit[0] is not vocab:
        _VOCAB_WORDS.clear()
        hit = _VOCAB_WORDS[id(vocab)] = (vocab, _VocabWords.of(vocab))
    return hit[1]


def _firing_words(ids: np.ndarray, vals: np.ndarray, vocab, vw: _VocabWords) -> dict[str, float]:
    """Same result as :func:`_window_words` on the window's token strings, but only looks at the tokens
    where the latent fires: a token whose words cannot continue into its neighbours contributes its
    own words; a run of tokens joined inside a word is split into words on its joined text."""
    out: dict[str, float] = {}
    ids_l, vals_l = ids.tolist(), vals.tolist()
    sw, ew, words = vw.starts_w, vw.ends_w, vw.words
    n = len(ids_l)
    done_to = -1
    for j, v in enumerate(vals_l):
        if v == 0 or j <= done_to:
            continue
        a = b = j
        while a > 0 and sw[ids_l[a]] and ew[ids_l[a - 1]]:
            a -= 1
        while b < n - 1 and ew[ids_l[b]] and sw[ids_l[b + 1]]:
            b += 1
        if a == b:
            v = abs(v)
            for w in words[ids_l[j]]:
                if v > out.get(w, 0.0) and len(w) <= MAX_WORD_CHARS:
                    out[w] = v
            continue
        # tokens a..b are joined inside words: merge the last word of each token with the first of the next
        cur, cur_v, pending, is_open = "", 0.0, 0.0, False
        for t in range(a, b + 1):
            tid, tv = ids_l[t], abs(vals_l[t])
            ws = words[tid]
            if not ws:  # an empty token: counts for a word only if the word goes on after it
                if is_open and not vocab[tid]:
                    pending = max(pending, tv)
                continue
            for k, w in enumerate(ws):
                if k == 0 and is_open and sw[tid]:
                    cur, cur_v = cur + w, max(cur_v, pending, tv)
                else:
                    if cur and cur_v > 0 and cur_v > out.get(cur, 0.0) and len(cur) <= MAX_WORD_CHARS:
                        out[cur] = cur_v
                    cur, cur_v = w, tv
                pending = 0.0
            is_open = ew[tid]
        if cur and cur_v > 0 and cur_v > out.get(cur, 0.0) and len(cur) <= MAX_WORD_CHARS:
            out[cur] = cur_v
        done_to = b
    return out


def _top_by_mass(local: Tensor, ids: Tensor, w: Tensor, B: int, V: int, k: int) -> list[list[list]]:
    """Per latent (``local`` in [0, B)), the ``k`` ids carrying most of its activation mass ``w``, as
    [id, share of the latent's total mass] pairs, largest first."""
    out: list[list[list]] = [[] for _ in range(B)]
    keep = ids >= 0
    local, ids, w = local[keep], ids[keep], w[keep].double()
    if len(local) == 0:
        return out
    total = torch.zeros(B, dtype=torch.float64).index_add_(0, local, w)
    uniq, inv = torch.unique(local.long() * V + ids.long(), return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, w)
    ul, ut = uniq // V, uniq % V
    order = torch.argsort((ul << 32) | _desc_order_bits(sums.float()), stable=True)
    ul, ut, sums = ul[order], ut[order], sums[order]
    first = torch.zeros(B, dtype=torch.long)
    first[1:] = torch.bincount(ul, minlength=B).cumsum(0)[:-1]
    sel = (torch.arange(len(ul)) - first[ul]) < k
    tot = total.tolist()
    for a, t, v in zip(ul[sel].tolist(), ut[sel].tolist(), sums[sel].tolist()):
        out[a].append([t, round(v / tot[a], 4) if tot[a] > 0 else 0.0])
    return out


def _hist(values: Tensor, group: Tensor, lo: Tensor, hi: Tensor, n_groups: int, n_bins: int) -> Tensor:
    """Per-group equal-width histograms of ``values`` over [lo_g, hi_g]: [n_groups, n_bins] counts."""
    width = (hi - lo).clamp_min(1e-12)
    b = ((values - lo[group]) / width[group] * n_bins).floor().long().clamp_(0, n_bins - 1)
    return torch.bincount(group * n_bins + b, minlength=n_groups * n_bins).view(n_groups, n_bins)


def _desc_order_bits(v: Tensor) -> Tensor:
    """int64 keys in [0, 2^32) whose ascending order is the *descending* order of float32 ``v``."""
    bits = v.float().contiguous().view(torch.int32).long()
    # IEEE-754 → unsigned order-preserving integer: flip all bits of negatives, the sign bit of positives
    ordered = torch.where(bits < 0, ~bits & 0xFFFFFFFF, bits | 0x80000000)
    return 0xFFFFFFFF - ordered


def _row_hist(x: Tensor, lo: Tensor, hi: Tensor, n_bins: int) -> Tensor:
    """Equal-width histogram of every row of ``x`` [R, C] over its own [lo_r, hi_r]: [R, n_bins].

    Values at ``hi_r`` fall in the last bin; a row with ``lo_r == hi_r`` has everything in bin 0.
    One ``histc`` pass per row: several times faster than binning the whole matrix elementwise.
    """
    out = torch.zeros(x.shape[0], n_bins, dtype=torch.long)
    xf = x.float()
    for r, (a, b) in enumerate(zip(lo.tolist(), hi.tolist())):
        if b > a:
            out[r] = torch.histc(xf[r], bins=n_bins, min=a, max=b).long()
        else:
            out[r, 0] = x.shape[1]
    return out


def _logit_effects(W_dec: Tensor, W_U: Tensor, n_logits: int, n_bins: int, rows_per_chunk: int = 256) -> tuple:
    """Top/bottom ``n_logits`` of ``W_dec[r] @ W_U`` per row and a histogram of each row over the vocabulary.

    Row chunks keep the [chunk, vocab] effect matrix small (one reused allocation instead of a
    [rows, vocab] one per feature batch). Returns (top, bottom, lo, hi, hist) with top/bottom as
    ``torch.return_types.topk``-like (values, indices) pairs, sorted.
    """
    k = min(n_logits, W_U.shape[1])
    tv, ti, bv, bi, hs = [], [], [], [], []
    for s in range(0, W_dec.shape[0], rows_per_chunk):
        eff = W_dec[s : s + rows_per_chunk] @ W_U
        tp, bt = eff.topk(k, dim=1), eff.topk(k, dim=1, largest=False)
        tv.append(tp.values.cpu()), ti.append(tp.indices.cpu()), bv.append(bt.values.cpu()), bi.append(bt.indices.cpu())
        hs.append(_row_hist(eff.cpu(), bt.values[:, 0].cpu(), tp.values[:, 0].cpu(), n_bins))
        del eff
    top_v, bot_v = torch.cat(tv), torch.cat(bv)
    return (top_v, torch.cat(ti)), (bot_v, torch.cat(bi)), bot_v[:, 0].contiguous(), top_v[:, 0].contiguous(), torch.cat(hs)


def _compute_batch(b: int, lo: int, hi: int, codes: _Codes, tokens: Tensor, W_dec: Tensor, W_dec_unit: Tensor,
                   W_U: Tensor | None, cfg: DashboardConfig, signed: bool, vocab: np.ndarray, scratch: Tensor | None = None) -> _BatchRows:
    """Everything stored for latents [lo, hi); pure function of its inputs (so resume is exact).

    ``scratch``: an all-zero float64 buffer of at least ``(hi - lo) * d_sae`` elements, reused across
    batches (it is all zero again on return); allocated here when None.
    """
    B = hi - lo
    ctx = tokens.shape[1]
    s0, s1 = int(codes.col_ptr[lo]), int(codes.col_ptr[hi])
    counts = (codes.col_ptr[lo + 1 : hi + 1] - codes.col_ptr[lo:hi]).long()
    local = torch.repeat_interleave(torch.arange(B), counts)
    ft, fv = codes.f_tok[s0:s1], codes.f_val[s0:s1]
    # Sort each latent's entries by value, descending; one stable sort of (latent, -value) keys,
    # so ties keep token order and the result is deterministic.
    perm = torch.argsort((local << 32) | _desc_order_bits(fv), stable=True)
    ft, fv = ft[perm], fv[perm]
    starts = torch.zeros(B, dtype=torch.long)
    starts[1:] = counts.cumsum(0)[:-1]
    alive = counts > 0
    last = (starts + counts - 1).clamp_min(0)
    max_act = torch.where(alive, fv[starts.clamp_max(max(len(fv) - 1, 0))] if len(fv) else torch.zeros(B), torch.zeros(B))
    min_act = torch.where(alive, fv[last] if len(fv) else torch.zeros(B), torch.zeros(B))
    sums = torch.zeros(B, dtype=torch.float64).index_add_(0, local, fv.double())
    mean_act = torch.where(alive, sums / counts.clamp_min(1), torch.zeros(B, dtype=torch.float64))
    n_pos = torch.bincount(local[fv > 0], minlength=B)
    n_neg = torch.bincount(local[fv < 0], minlength=B)
    density = counts.double() / max(codes.n_valid, 1)

    # ---- examples: top, bottom (signed), interval samples ------------------------------------
    ar = torch.arange(cfg.n_top)
    picks: list[tuple[Tensor, Tensor, str, Tensor, Tensor]] = []  # (latent, entry, kind, rank, bin)
    top_idx = starts[:, None] + ar
    top_ok = ar[None, :] < n_pos[:, None]
    fl, rk = top_ok.nonzero(as_tuple=True)
    picks.append((fl, top_idx[fl, rk], "top", rk, torch.full_like(rk, -1)))
    if signed:
        bot_idx = (starts + counts - 1)[:, None] - ar
        bot_ok = ar[None, :] < n_neg[:, None]
        fl, rk = bot_ok.nonzero(as_tuple=True)
        picks.append((fl, bot_idx[fl, rk], "bottom", rk, torch.full_like(rk, -1)))
    nb = cfg.n_intervals
    intervals: list[list[dict]] = [[] for _ in range(B)]
    if len(fv):
        pos_mask = fv > 0
        mx = max_act[local].clamp_min(1e-12)
        mn = min_act[local].clamp_max(-1e-12)
        # Positive interval j holds values in (max·j/n, max·(j+1)/n]; negative interval j (stored as
        # bin n+j) holds [min·(j+1)/n, min·j/n). Equal width from zero, as in sae_vis/Neuronpedia.
        bin_pos = (torch.ceil(fv / mx * nb) - 1).clamp(0, nb - 1)
        bin_neg = nb + (torch.ceil(fv / mn * nb) - 1).clamp(0, nb - 1)
        bins = torch.where(pos_mask, bin_pos, bin_neg).long()
        group = local * (2 * nb) + bins
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + b)
        noise = torch.randint(0, 1 << 31, (len(fv),), generator=gen, dtype=torch.int64)
        order = torch.argsort((group << 31) | noise, stable=True)  # random order within each interval
        gcount = torch.bincount(group, minlength=B * 2 * nb)
        gstart = torch.zeros_like(gcount)
        gstart[1:] = gcount.cumsum(0)[:-1]
        rank_in = torch.arange(len(fv)) - gstart[group[order]]
        sel = rank_in < cfg.per_interval
        chosen = order[sel]
        picks.append((local[chosen], chosen, "interval", rank_in[sel] + bins[chosen] * cfg.per_interval, bins[chosen]))
        gc = gcount.view(B, 2 * nb).tolist()
        for i, (c, mxi, mni, npos, nneg) in enumerate(zip(counts.tolist(), max_act.tolist(), min_act.tolist(), n_pos.tolist(), n_neg.tolist())):
            if npos:
                intervals[i] += [{"bin": j, "lo": mxi * j / nb, "hi": mxi * (j + 1) / nb, "count": gc[i][j], "fraction": gc[i][j] / c}
                                 for j in range(nb)]
            if nneg:
                intervals[i] += [{"bin": nb + j, "lo": mni * (j + 1) / nb, "hi": mni * j / nb, "count": gc[i][nb + j],
                                  "fraction": gc[i][nb + j] / c} for j in range(nb)]

    # ---- window values around every picked example -------------------------------------------
    ex_latent = torch.cat([p[0] for p in picks])
    ex_entry = torch.cat([p[1] for p in picks])
    ex_kind = [k for p in picks for k in [p[2]] * len(p[0])]
    ex_rank = torch.cat([p[3] for p in picks])
    ex_bin = torch.cat([p[4] for p in picks])
    ex_tok = ft[ex_entry] if len(ex_entry) else torch.zeros(0, dtype=torch.long)
    ex_val = fv[ex_entry] if len(ex_entry) else torch.zeros(0)
    seq, pos = ex_tok // ctx, ex_tok % ctx
    wb, wa = cfg.window_before, cfg.window_after
    start = (pos - wb).clamp_min(0)
    stop = (pos + wa + 1).clamp_max(ctx)
    W = wb + wa + 1
    offs = torch.arange(W)
    wpos = start[:, None] + offs  # [E, W]
    wvalid = wpos < stop[:, None]
    wtok = (seq[:, None] * ctx + wpos.clamp_max(ctx - 1))
    window_vals = _window_values(codes, wtok, (ex_latent + lo).int(), wvalid)

    # ---- logit effects and neighbours -----------------------------------------------------------
    dev = W_dec.device
    logits_pos = logits_neg = logit_hist = None
    if W_U is not None:
        # topk is sorted: the first bottom and first top values are each row's min and max
        (pv, pi), (nv, ni), elo, ehi, ehist = _logit_effects(W_dec[lo:hi], W_U.to(dev), cfg.n_logits, cfg.n_hist_bins)
        pi, pv, ni, nv = pi.tolist(), pv.tolist(), ni.tolist(), nv.tolist()
        logits_pos = [[[t, round(v, 5)] for t, v in zip(pi[r], pv[r])] for r in range(B)]
        logits_neg = [[[t, round(v, 5)] for t, v in zip(ni[r], nv[r])] for r in range(B)]
        lo_l, hi_l = elo.tolist(), ehi.tolist()
        logit_hist = [{"lo": lo_l[r], "hi": hi_l[r], "counts": ehist[r].tolist()} for r in range(B)]
    cos = (W_dec_unit[lo:hi] @ W_dec_unit.T).cpu()
    cos[torch.arange(B), torch.arange(lo, hi)] = -math.inf
    kn = min(cfg.n_neighbours, max(cos.shape[1] - 1, 0))
    cos_top = cos.topk(kn, dim=1) if kn else None
    cos_lists = [[[j, round(v, 5)] for j, v in zip(ji, vi)] for ji, vi in zip(cos_top.indices.tolist(), cos_top.values.tolist())] if kn else [[] for _ in range(B)]
    corr_top = _correlation_neighbours(codes, lo, hi, ft, local, fv, kn, scratch)

    # ---- activation histograms ---------------------------------------------------------------------
    # Unsigned: [0, max]; signed: [min(min, 0), max(max, 0)] so both tails are visible.
    hlo = torch.minimum(min_act, torch.zeros(B)) if signed else torch.zeros(B)
    hhi = torch.maximum(max_act, torch.zeros(B)) if signed else max_act
    ahist = _hist(fv, local, hlo, hhi, B, cfg.n_hist_bins) if len(fv) else torch.zeros(B, cfg.n_hist_bins, dtype=torch.long)

    # ---- rows ------------------------------------------------------------------------------------------
    features = []
    ah, hlo_l, hhi_l = ahist.tolist(), hlo.tolist(), hhi.tolist()
    rows = zip(counts.tolist(), density.tolist(), max_act.tolist(), min_act.tolist(), mean_act.tolist())
    for i, (c, dens, mx, mn, mean) in enumerate(rows):
        features.append((
            lo + i, c, dens, mx if c else None, mn if c else None, mean if c else None, int(c == 0), int(dens > cfg.dense_threshold),
            json.dumps({"lo": hlo_l[i], "hi": hhi_l[i], "counts": ah[i]}) if c else None,
            json.dumps(intervals[i]) if c else None,
            json.dumps(logits_pos[i]) if logits_pos else None,
            json.dumps(logits_neg[i]) if logits_neg else None,
            json.dumps(logit_hist[i]) if logit_hist else None,
            json.dumps(cos_lists[i]),
            json.dumps(corr_top[i]),
        ))
    examples = []
    ex_latent_l, ex_rank_l, ex_bin_l = ex_latent.tolist(), ex_rank.tolist(), ex_bin.tolist()
    seq_l, pos_l, start_l, stop_l = seq.tolist(), pos.tolist(), start.tolist(), stop.tolist()
    val_l = ex_val.tolist()
    wv = window_vals.numpy().astype(np.float32)
    for e in range(len(ex_latent_l)):
        n = stop_l[e] - start_l[e]
        examples.append((lo + ex_latent_l[e], ex_kind[e], ex_rank_l[e], ex_bin_l[e], seq_l[e], pos_l[e], val_l[e], start_l[e], wv[e, :n].tobytes()))
    # Search rows from the top examples: the peak tokens and the window text.
    toks_np = tokens.numpy()
    peak_counter: dict[int, Counter] = {}
    peak_max: dict[tuple[int, int], float] = {}
    texts: dict[int, list[str]] = {}
    for e in range(len(ex_latent_l)):
        if ex_kind[e] == "interval":
            continue
        f = lo + ex_latent_l[e]
        tid = int(toks_np[seq_l[e], pos_l[e]])
        peak_counter.setdefault(f, Counter())[tid] += 1
        peak_max[(tid, f)] = max(peak_max.get((tid, f), -math.inf), abs(val_l[e]))
        texts.setdefault(f, []).append("".join(vocab[toks_np[seq_l[e], start_l[e] : stop_l[e]]]))
    feature_tokens = [(tid, f, n, peak_max[(tid, f)]) for f, cnt in peak_counter.items() for tid, n in cnt.items()]
    fts = [(f, " ".join(dict.fromkeys(vocab[t].strip() for t in peak_counter[f])), "\n".join(texts[f])) for f in texts]
    stats = {"density": density.numpy(), "max_act": max_act.numpy(), "min_act": min_act.numpy(), "n_active": counts.numpy()}

    # ---- words where the latent fires, in every stored example (text search ranks by these) ------
    max_abs = torch.maximum(max_act.abs(), min_act.abs()).tolist()
    best_word: dict[tuple[str, int], tuple] = {}
    vw = _vocab_words(vocab)
    for e in range(len(ex_latent_l)):
        n = stop_l[e] - start_l[e]
        f = ex_latent_l[e]
        for w, v in _firing_words(toks_np[seq_l[e], start_l[e] : stop_l[e]], wv[e, :n], vocab, vw).items():
            cur = best_word.get((w, f))
            if cur is None or v > cur[0]:
                best_word[(w, f)] = (v, ex_kind[e], ex_rank_l[e])
    fire_words = [(w, lo + f, v, v / max_abs[f] if max_abs[f] > 0 else 0.0, kind, rank) for (w, f), (v, kind, rank) in best_word.items()]

    # ---- automatic statistical summary: tokens at and just before the activations, top logits ----
    flat = tokens.reshape(-1)
    V = len(vocab)
    at_ids = flat[ft] if len(ft) else torch.zeros(0, dtype=torch.long)
    prev_ids = torch.where(ft % ctx > 0, flat[(ft - 1).clamp_min(0)], torch.full_like(ft, -1)) if len(ft) else at_ids
    mass = fv.abs()
    at_top = _top_by_mass(local, at_ids, mass, B, V, SUMMARY_TOP)
    before_top = _top_by_mass(local, prev_ids, mass, B, V, SUMMARY_TOP)
    summaries = []
    for r in range(B):
        if not at_top[r]:
            continue
        promotes = [t for t, _ in logits_pos[r][:SUMMARY_TOP]] if logits_pos else []
        summ = {"at": at_top[r], "before": before_top[r], "promotes": promotes}
        words = [vocab[t].strip() for t, _ in at_top[r]] + [vocab[t].strip() for t, _ in before_top[r]] + [vocab[t].strip() for t in promotes]
        summaries.append((lo + r, json.dumps(summ), " ".join(w for w in words if w)))
    return _BatchRows(features, examples, feature_tokens, fts, stats, fire_words, summaries)


def _window_values(codes: _Codes, wtok: Tensor, latent: Tensor, wvalid: Tensor) -> Tensor:
    """Activation of ``latent[e]`` at every window position ``wtok[e, w]``: [E, W] (0 where invalid).

    A binary search in the sorted (latent, token) keys: O(E·W·log nnz), independent of L0.
    """
    if wtok.numel() == 0 or len(codes.f_key) == 0:
        return torch.zeros(wtok.shape)
    q = latent.long()[:, None] * codes.n_positions + wtok
    idx = torch.searchsorted(codes.f_key, q).clamp_max_(len(codes.f_key) - 1)
    hit = (codes.f_key[idx] == q) & wvalid
    return torch.where(hit, codes.f_val[idx], torch.zeros((), dtype=codes.f_val.dtype))


def _correlation_neighbours(codes: _Codes, lo: int, hi: int, ft: Tensor, local: Tensor, fv: Tensor, k: int,
                            scratch: Tensor | None = None) -> list[list]:
    """Top-``k`` co-occurring latents by Pearson correlation of activations (over valid tokens), for [lo, hi).

    For ReLU-type latents only co-occurring pairs can correlate positively; for signed ones a pair
    that never co-occurs has r = −μ_i μ_j / σ_i σ_j, which says nothing about the latents, so
    neighbours are drawn from co-occurring latents in both cases. The sums Σ_t f_i f_j are gathered
    from the codes of the tokens where each latent is active: O(nnz · L0) work in all.
    """
    B = hi - lo
    d_sae = len(codes.mean)
    if k == 0 or len(ft) == 0:
        return [[] for _ in range(B)]
    # A fresh [B·d_sae] buffer per batch costs more (page faults + memset) than the sums themselves,
    # so a caller-owned zero buffer is reused and only its touched entries are reset below.
    cross = scratch[: B * d_sae] if scratch is not None and scratch.numel() >= B * d_sae else torch.zeros(B * d_sae, dtype=torch.float64)
    if codes.pad_feat is not None:
        step = max(1, (1 << 22) // codes.pad_feat.shape[1])
        for s in range(0, len(ft), step):
            t = ft[s : s + step]
            j = codes.pad_feat[t].long()
            w = codes.pad_val[t] * fv[s : s + step, None]
            idx = local[s : s + step, None] * d_sae + j.clamp_min(0)
            cross.index_add_(0, idx.flatten(), w.flatten().double())  # padding has value 0
    else:
        lens = codes.row_ptr[ft + 1] - codes.row_ptr[ft]
        csum = lens.cumsum(0)
        s = 0
        while s < len(ft):
            base = int(csum[s - 1]) if s else 0
            e = max(int(torch.searchsorted(csum, base + (1 << 22), right=True)), s + 1)
            rep = lens[s:e]
            owner = torch.repeat_interleave(torch.arange(s, e), rep)
            within = torch.arange(len(owner)) - torch.repeat_interleave(torch.cumsum(rep, 0) - rep, rep)
            idx = codes.row_ptr[ft[owner]] + within
            w = fv[owner].double() * codes.val[idx].double()
            cross.index_add_(0, local[owner] * d_sae + codes.feat[idx].long(), w)
            s = e
    # Pearson r only where Σ f_i f_j ≠ 0 (co-occurring pairs): no dense [B, d_sae] arithmetic.
    nz = cross.nonzero().squeeze(1)
    vals = cross[nz]
    cross[nz] = 0  # entries that summed to exactly zero are zero already: the buffer is clean again
    row, j = nz // d_sae, nz % d_sae
    i = row + lo
    n = max(codes.n_valid, 1)
    mu, sd = codes.mean, codes.std
    den = sd[i] * sd[j]
    r = torch.where(den > 0, (vals / n - mu[i] * mu[j]) / den.clamp_min(1e-300), torch.zeros_like(den))
    keep = (r > 0) & (j != i)
    row, j, r = row[keep], j[keep], r[keep]
    order = torch.argsort((row << 32) | _desc_order_bits(r.float()), stable=True)
    row, j, r = row[order], j[order], r[order]
    start = torch.zeros(B, dtype=torch.long)
    start[1:] = torch.bincount(row, minlength=B).cumsum(0)[:-1]
    sel = (torch.arange(len(row)) - start[row]) < k
    out: list[list] = [[] for _ in range(B)]
    for a, b, v in zip(row[sel].tolist(), j[sel].tolist(), r[sel].tolist()):
        out[a].append([b, round(v, 5)])
    return out


def _write_batch(con: sqlite3.Connection, b: int, lo: int, hi: int, rows: _BatchRows, seconds: float) -> None:
    """Commit one feature batch (and its ``batches`` row) atomically."""
    with con:
        con.execute("DELETE FROM features WHERE feature >= ? AND feature < ?", (lo, hi))
        con.execute("DELETE FROM examples WHERE feature >= ? AND feature < ?", (lo, hi))
        con.execute("DELETE FROM feature_tokens WHERE feature >= ? AND feature < ?", (lo, hi))
        con.execute("DELETE FROM examples_fts WHERE rowid >= ? AND rowid < ?", (lo, hi))
        con.execute("DELETE FROM fire_words WHERE feature >= ? AND feature < ?", (lo, hi))
        con.execute("DELETE FROM summaries WHERE feature >= ? AND feature < ?", (lo, hi))
        con.execute("DELETE FROM summary_fts WHERE rowid >= ? AND rowid < ?", (lo, hi))
        con.executemany("INSERT INTO fire_words VALUES (?,?,?,?,?,?)", rows.fire_words)
        con.executemany("INSERT INTO summaries VALUES (?,?,?)", rows.summaries)
        con.executemany("INSERT INTO summary_fts(rowid, text) VALUES (?,?)", [(f, t) for f, _, t in rows.summaries])
        con.executemany("INSERT INTO features VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows.features)
        con.executemany("INSERT INTO examples VALUES (?,?,?,?,?,?,?,?,?)", rows.examples)
        con.executemany("INSERT INTO feature_tokens VALUES (?,?,?,?)", rows.feature_tokens)
        con.executemany("INSERT INTO examples_fts(rowid, tokens, contexts) VALUES (?,?,?)", rows.fts)
        con.execute("INSERT OR REPLACE INTO batches VALUES (?,?,?,?)", (b, lo, hi, seconds))


def _finish(out: Path, con: sqlite3.Connection, codes: _Codes, d_sae: int, timings: dict[str, float]) -> None:
    """Write the per-latent numpy stats, mark the build complete and drop the resume cache."""
    stats = {name: np.zeros(d_sae, dtype=dt) for name, dt in (("density", np.float64), ("max_act", np.float32), ("min_act", np.float32), ("n_active", np.int64))}
    for f, n, d, mx, mn in con.execute("SELECT feature, n_active, density, max_act, min_act FROM features"):
        stats["density"][f], stats["n_active"][f] = d, n
        stats["max_act"][f], stats["min_act"][f] = mx or 0.0, mn or 0.0
    import io

    buf = io.BytesIO()
    np.savez(buf, **stats)
    atomic_write_bytes(out / STATS_FILE, buf.getvalue())
    # The codes stay (token-major, 8 bytes per non-zero) so latents of SAEs whose dashboards scanned the
    # same tokens can be compared by co-activation (see TokenCodes).
    save_tensors(out / TOKEN_CODES_FILE, {"row_ptr": codes.row_ptr, "feat": codes.feat.to(torch.int32), "val": codes.val.float(),
                                          "n_valid": torch.tensor(codes.n_valid)})
    with con:
        _set_meta(con, complete=True, timings=timings, n_live=int((stats["n_active"] > 0).sum()))
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.execute("PRAGMA journal_mode=DELETE")  # a single self-contained file once finished
    (out / CODES_FILE).unlink(missing_ok=True)


# =============================================================================================
# Query layer (what the app uses)
# =============================================================================================


@dataclass
class Example:
    """One stored example: a window of tokens around the peak position and the latent's values."""

    kind: str  # top | bottom | interval
    rank: int
    bin: int
    seq: int
    pos: int
    value: float
    start: int
    token_ids: list[int]
    tokens: list[str]
    acts: list[float]
    special: list[bool]  # BOS/EOS/pad positions (masked: never active)

    @property
    def peak_index(self) -> int:
        return self.pos - self.start


@dataclass
class FeatureData:
    """Everything stored about one latent."""

    feature: int
    n_active: int
    density: float
    max_act: float | None
    min_act: float | None
    mean_act: float | None
    dead: bool
    dense: bool
    act_hist: dict | None
    intervals: list[dict]
    logits_pos: list[tuple[str, float]]
    logits_neg: list[tuple[str, float]]
    logit_hist: dict | None
    cos_neighbours: list[tuple[int, float]]
    corr_neighbours: list[tuple[int, float]]

    @property
    def max_abs_act(self) -> float:
        """The largest |activation| seen (the unit of steering strength)."""
        return max(abs(self.max_act or 0.0), abs(self.min_act or 0.0))


class TextHit(NamedTuple):
    """A latent that fires on every word of a text query."""

    feature: int
    score: float  # min over the query's words of (activation at the word / the latent's max |activation|)
    total: float  # summed activation at the words
    words: dict[str, tuple[float, float]]  # word -> (activation, fraction of max)
    kind: str  # the stored example where it fires most on a query word
    rank: int
    density: float


class TokenHit(NamedTuple):
    """A latent whose top examples peak on the searched token (one hit per latent)."""

    feature: int
    tokens: list[str]  # the vocabulary tokens it peaks on that match (e.g. " love" and "Love")
    n: int  # top examples peaking on one of them
    max_value: float
    density: float


@dataclass
class SearchPage:
    """All hits of a search (the app pages them) and notes on what was cut or stopped."""

    hits: list
    total: int
    notes: list[str] = field(default_factory=list)


def word_tokens(tokens: list[str], words) -> set[int]:
    """Indices of the tokens that are part of one of ``words`` (casefolded, found in the joined text, so a
    word split into several tokens marks all of them)."""
    import bisect

    want = {w.casefold() for w in words}
    starts, pos = [], 0
    for t in tokens:
        starts.append(pos)
        pos += len(t)
    out: set[int] = set()
    for m in _WORD.finditer("".join(tokens)):
        if m.group().casefold() in want:
            a, b = m.span()
            j0 = max(bisect.bisect_right(starts, a) - 1, 0)
            out.update(range(j0, max(bisect.bisect_left(starts, b), j0 + 1)))
    return out


def mark_words(ex: Example, words) -> str:
    """The example's text with the tokens of ``words`` where the latent fires wrapped in ⟦ ⟧."""
    hit = {j for j in word_tokens(ex.tokens, words) if ex.acts[j] != 0}
    return "".join(f"\u27e6{t}\u27e7" if j in hit else t for j, t in enumerate(ex.tokens))


class Dashboard:
    """Read access to one SAE's dashboards (plus its writable labels store)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.db_path = self.folder / DB_FILE
        self.labels_path = self.folder / LABELS_FILE
        if not self.db_path.is_file():
            raise ArtifactError(f"no dashboards in {self.folder}: {DB_FILE} is missing")
        with _reading(self.db_path) as con:
            try:
                self.meta = _get_meta(con)
            except sqlite3.DatabaseError as e:
                raise ArtifactError(f"{self.db_path} is not a readable dashboard database ({e})") from None
            self.done_batches = con.execute("SELECT COUNT(*) FROM batches").fetchone()[0]
        self.d_sae = int(self.meta.get("d_sae", 0))
        self._tokens: np.ndarray | None = None
        self._vocab: list[str] | None = None
        self._density: np.ndarray | None = None
        self._tok_index: dict[str, list[int]] | None = None
        self._peak_ids: frozenset[int] | None = None  # token ids some top example peaks on
        self.special_ids = frozenset(int(t) for t in self.meta.get("special_ids", []))

    # ---- whole-SAE facts -------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))

    @property
    def provenance(self) -> dict[str, Any]:
        return dict(self.meta.get("provenance", {}))

    @property
    def version(self) -> str:
        """Changes whenever the database is rewritten (a cache key for the app)."""
        st = self.db_path.stat()
        return f"{st.st_mtime_ns}-{st.st_size}-{self.done_batches}"

    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = np.load(self.folder / TOKENS_FILE, mmap_mode="r")
        return self._tokens

    def vocab(self) -> list[str]:
        if self._vocab is None:
            with _reading(self.db_path) as con:
                self._vocab = [t for (t,) in con.execute("SELECT token FROM vocab ORDER BY id")]
        return self._vocab

    def token_str(self, token_id: int) -> str:
        v = self.vocab()
        return v[token_id] if 0 <= token_id < len(v) else f"<{token_id}>"

    def stats(self) -> dict[str, np.ndarray]:
        """Per-latent density / max / min / count arrays (from ``feature_stats.npz`` once complete)."""
        path = self.folder / STATS_FILE
        if path.exists():
            with np.load(path) as z:
                return {k: z[k] for k in z.files}
        out = {"density": np.zeros(self.d_sae), "max_act": np.zeros(self.d_sae, np.float32), "min_act": np.zeros(self.d_sae, np.float32), "n_active": np.zeros(self.d_sae, np.int64)}
        with _reading(self.db_path) as con:
            for f, n, d, mx, mn in con.execute("SELECT feature, n_active, density, max_act, min_act FROM features"):
                out["density"][f], out["n_active"][f], out["max_act"][f], out["min_act"][f] = d, n, mx or 0, mn or 0
        return out

    def counts(self) -> dict[str, int]:
        with _reading(self.db_path) as con:
            n, live, dense = con.execute("SELECT COUNT(*), COALESCE(SUM(1 - dead), 0), COALESCE(SUM(dense), 0) FROM features").fetchone()
        return {"computed": n, "live": live, "dead": n - live, "dense": dense}

    # ---- one latent --------------------------------------------------------------------------------
    def feature(self, i: int) -> FeatureData | None:
        """The stored data of latent ``i``, or None if its batch has not been computed."""
        with _reading(self.db_path) as con:
            row = con.execute("SELECT * FROM features WHERE feature = ?", (int(i),)).fetchone()
        if row is None:
            return None
        (f, n, dens, mx, mn, mean, dead, dense, ah, iv, lp, ln, lh, cn, rn) = row
        tok = self.token_str
        return FeatureData(
            f, n, dens, mx, mn, mean, bool(dead), bool(dense),
            json.loads(ah) if ah else None, json.loads(iv) if iv else [],
            [(tok(t), v) for t, v in json.loads(lp)] if lp else [], [(tok(t), v) for t, v in json.loads(ln)] if ln else [],
            json.loads(lh) if lh else None,
            [tuple(x) for x in json.loads(cn or "[]")], [tuple(x) for x in json.loads(rn or "[]")],
        )

    def examples(self, i: int, kind: str | None = None) -> list[Example]:
        """Stored examples of latent ``i`` (all kinds, or one), in rank order."""
        q = "SELECT kind, rank, bin, seq, pos, value, start, acts FROM examples WHERE feature = ?"
        args: tuple = (int(i),)
        if kind is not None:
            q += " AND kind = ?"
            args += (kind,)
        with _reading(self.db_path) as con:
            rows = con.execute(q + " ORDER BY kind, rank", args).fetchall()
        return [self._example(r) for r in rows]

    def neighbour_stats(self, ids: list[int]) -> dict[int, tuple[float, float | None]]:
        """(density, max_act) of a few latents, for neighbour tables."""
        if not ids:
            return {}
        with _reading(self.db_path) as con:
            q = f"SELECT feature, density, max_act FROM features WHERE feature IN ({','.join('?' * len(ids))})"
            return {f: (d, m) for f, d, m in con.execute(q, [int(x) for x in ids])}

    # ---- navigation ---------------------------------------------------------------------------------
    def step(self, i: int, direction: int, live_only: bool = False) -> int:
        """The next (``direction`` = 1) or previous (-1) latent from ``i``, wrapping around."""
        if not live_only:
            return (i + direction) % max(self.d_sae, 1)
        with _reading(self.db_path) as con:
            if direction > 0:
                r = con.execute("SELECT MIN(feature) FROM features WHERE dead = 0 AND feature > ?", (i,)).fetchone()[0]
                if r is None:
                    r = con.execute("SELECT MIN(feature) FROM features WHERE dead = 0").fetchone()[0]
            else:
                r = con.execute("SELECT MAX(feature) FROM features WHERE dead = 0 AND feature < ?", (i,)).fetchone()[0]
                if r is None:
                    r = con.execute("SELECT MAX(feature) FROM features WHERE dead = 0").fetchone()[0]
        return i if r is None else int(r)

    def random_feature(self, rng: random.Random, live_only: bool = False) -> int:
        with _reading(self.db_path) as con:
            where = "WHERE dead = 0" if live_only else ""
            n = con.execute(f"SELECT COUNT(*) FROM features {where}").fetchone()[0]
            if n == 0:
                return rng.randrange(max(self.d_sae, 1))
            return int(con.execute(f"SELECT feature FROM features {where} ORDER BY feature LIMIT 1 OFFSET ?", (rng.randrange(n),)).fetchone()[0])

    # ---- search ------------------------------------------------------------------------------------------
    def example(self, i: int, kind: str, rank: int) -> Example | None:
        """One stored example of latent ``i``."""
        with _reading(self.db_path) as con:
            row = con.execute("SELECT kind, rank, bin, seq, pos, value, start, acts FROM examples WHERE feature = ? AND kind = ? AND rank = ?",
                              (int(i), kind, int(rank))).fetchone()
        return self._example(row) if row else None

    def _example(self, row) -> Example:
        kind_, rank, bin_, seq, pos, value, start, blob = row
        acts = np.frombuffer(blob, dtype=np.float32).tolist()
        ids = [int(t) for t in self.tokens()[seq, start : start + len(acts)]]
        return Example(kind_, rank, bin_, seq, pos, value, start, ids, [self.token_str(t) for t in ids], acts, [t in self.special_ids for t in ids])

    def densities(self) -> np.ndarray:
        if self._density is None:
            self._density = self.stats()["density"]
        return self._density

    def search_fires(self, query: str) -> SearchPage:
        """Latents that FIRE on every word of ``query`` in their stored examples, best first.

        A word matches where the latent is non-zero on a token of that word (a word split into several
        tokens counts once). Hits are ranked by the smallest, over the query's words, activation at the
        word relative to the latent's max (then by the summed activation); each hit says where it fires
        most (the example to show) and the latent's density. Bounded: see :func:`query_words` and
        ``SEARCH_TIME_LIMIT_S``. Dashboards built before format 2 fall back to matching words anywhere
        in the top examples' contexts, with a note.
        """
        words, notes = query_words(query)
        if not words:
            return SearchPage([], 0, notes)
        per_word: list[dict[int, tuple]] = []
        with _reading(self.db_path) as con:
            try:
                with _bounded_search(con) as timed_out:
                    try:
                        for w in words:
                            rows = con.execute("SELECT feature, value, rel, kind, rank FROM fire_words WHERE word = ?", (w,)).fetchall()
                            per_word.append({int(f): (v, r, k, rk) for f, v, r, k, rk in rows})
                            if not per_word[-1]:
                                break
                    except sqlite3.OperationalError as e:
                        if "no such table" in str(e):
                            return self._search_contexts(words, notes)
                        if not timed_out[0]:
                            raise
                        notes.append(_time_note())
            except SearchBusy as e:
                return SearchPage([], 0, notes + [f"Search is busy: {e}."])
        if len(per_word) < len(words) and notes and notes[-1].startswith("The search was stopped"):
            return SearchPage([], 0, notes)
        common = set(per_word[0]) if per_word else set()
        for d in per_word[1:]:
            common &= set(d)
        dens = self.densities()
        hits = []
        for f in common:
            at = {w: d[f] for w, d in zip(words, per_word)}
            best_w = max(at, key=lambda w: at[w][0])
            _, _, kind, rank = at[best_w]
            hits.append(TextHit(f, min(x[1] for x in at.values()), sum(x[0] for x in at.values()),
                                {w: (x[0], x[1]) for w, x in at.items()}, kind, rank, float(dens[f]) if f < len(dens) else 0.0))
        hits.sort(key=lambda h: (-h.score, -h.total, h.feature))
        return SearchPage(hits, len(hits), notes)

    def _search_contexts(self, words: list[str], notes: list[str]) -> SearchPage:
        notes = [*notes, ("These dashboards predate activation-ranked search: words are matched anywhere in the top examples' "
                          "text. Rebuild them (saebench dashboards SAE_DIR --no-resume) to match where latents fire.")]
        q = " ".join('"' + w.replace('"', '""') + '"' for w in words)
        dens = self.densities()
        with _reading(self.db_path) as con:
            try:
                with _bounded_search(con) as timed_out:
                    try:
                        rows = con.execute("SELECT rowid FROM examples_fts WHERE examples_fts MATCH ? ORDER BY bm25(examples_fts, 4.0, 1.0) LIMIT 2000",
                                           (q,)).fetchall()
                    except sqlite3.OperationalError:
                        if not timed_out[0]:
                            raise
                        return SearchPage([], 0, notes + [_time_note()])
            except SearchBusy as e:
                return SearchPage([], 0, notes + [f"Search is busy: {e}."])
        hits = [TextHit(int(f), 0.0, 0.0, {}, "top", 0, float(dens[f]) if f < len(dens) else 0.0) for (f,) in rows]
        return SearchPage(hits, len(hits), notes)

    def search_text(self, query: str, limit: int = 20) -> list[tuple[int, str]]:
        """(latent, snippet) of the best ``limit`` hits of :meth:`search_fires`; the snippet is the example
        window where the latent fires most on a query word, with that word's tokens marked ⟦ ⟧."""
        page = self.search_fires(query)
        out = []
        for h in page.hits[:limit]:
            ex = self.example(h.feature, h.kind, h.rank)
            out.append((h.feature, mark_words(ex, h.words) if ex is not None else ""))
        return out

    def _token_index(self) -> dict[str, list[int]]:
        if self._tok_index is None:
            idx: dict[str, list[int]] = {}
            for i, t in enumerate(self.vocab()):
                idx.setdefault(t.strip().casefold(), []).append(i)
            self._tok_index = idx
        return self._tok_index

    def search_token(self, token: str, limit: int | None = None) -> list[TokenHit]:
        """Latents whose top examples peak on a token equal to ``token`` (ignoring case and edge spaces).

        One hit per latent (a latent peaking on both " love" and "Love" is one hit listing both), best
        first: most top examples peaking on one of the tokens, then largest |value|.
        """
        if len(token) > MAX_QUERY_CHARS:
            return []
        want = token.strip().casefold()
        if not want:
            return []
        if self._peak_ids is None:
            with _reading(self.db_path) as con:
                self._peak_ids = frozenset(t for (t,) in con.execute("SELECT DISTINCT token_id FROM feature_tokens"))
        ids = [t for t in self._token_index().get(want, []) if t in self._peak_ids]
        if not ids:
            return []
        with _reading(self.db_path) as con:
            q = (f"SELECT feature, SUM(n), MAX(max_value), group_concat(token_id) FROM feature_tokens "
                 f"WHERE token_id IN ({','.join('?' * len(ids))}) GROUP BY feature ORDER BY SUM(n) DESC, MAX(max_value) DESC, feature")
            rows = con.execute(q + (" LIMIT ?" if limit else ""), (*ids, limit) if limit else tuple(ids)).fetchall()
        dens = self.densities()
        return [TokenHit(int(f), [self.token_str(int(t)) for t in dict.fromkeys(str(ts).split(","))], int(n), float(v),
                         float(dens[f]) if f < len(dens) else 0.0) for f, n, v, ts in rows]

    # ---- automatic statistical summaries ---------------------------------------------------------------
    def summary(self, i: int) -> dict | None:
        """The automatic statistical summary of latent ``i``: tokens at its activations (``at``), tokens just
        before them (``before``), each as (token, share of the latent's |activation| mass), and the
        tokens it promotes most (``promotes``, top logit effects). None for dead latents or old dashboards."""
        return self.summaries([i]).get(int(i))

    def summaries(self, ids: list[int]) -> dict[int, dict]:
        if not ids:
            return {}
        with _reading(self.db_path) as con:
            try:
                q = f"SELECT feature, summary FROM summaries WHERE feature IN ({','.join('?' * len(ids))})"
                rows = con.execute(q, [int(x) for x in ids]).fetchall()
            except sqlite3.OperationalError:
                return {}
        tok = self.token_str
        out = {}
        for f, js in rows:
            d = json.loads(js)
            out[int(f)] = {"at": [(tok(t), s) for t, s in d.get("at", [])], "before": [(tok(t), s) for t, s in d.get("before", [])],
                           "promotes": [tok(t) for t in d.get("promotes", [])]}
        return out

    def search_summaries(self, query: str, limit: int = 2000) -> SearchPage:
        """Latents whose automatic summary contains all words of ``query`` (bounded like every search)."""
        words, notes = query_words(query)
        if not words:
            return SearchPage([], 0, notes)
        q = " ".join('"' + w.replace('"', '""') + '"' for w in words)
        with _reading(self.db_path) as con:
            try:
                with _bounded_search(con) as timed_out:
                    try:
                        rows = con.execute("SELECT rowid FROM summary_fts WHERE summary_fts MATCH ? ORDER BY bm25(summary_fts) LIMIT ?",
                                           (q, limit)).fetchall()
                    except sqlite3.OperationalError as e:
                        if timed_out[0]:
                            return SearchPage([], 0, notes + [_time_note()])
                        if "no such table" in str(e):
                            return SearchPage([], 0, notes)
                        raise
            except SearchBusy as e:
                return SearchPage([], 0, notes + [f"Search is busy: {e}."])
        return SearchPage([int(f) for (f,) in rows], len(rows), notes)

    # ---- labels ------------------------------------------------------------------------------------------
    def _labels_con(self) -> sqlite3.Connection:
        con = _connect(self.labels_path)
        con.executescript(_LABELS_SCHEMA)
        return con

    def label(self, i: int) -> tuple[str, str]:
        """(label, explanation) of latent ``i`` ('' when unlabelled)."""
        if not self.labels_path.exists():
            return "", ""
        with _reading(self.labels_path) as con:
            try:
                row = con.execute("SELECT label, explanation FROM labels WHERE feature = ?", (int(i),)).fetchone()
            except sqlite3.OperationalError:
                return "", ""
        return (row[0], row[1]) if row else ("", "")

    def labels(self, ids: list[int]) -> dict[int, str]:
        if not ids or not self.labels_path.exists():
            return {}
        with _reading(self.labels_path) as con:
            try:
                q = f"SELECT feature, label FROM labels WHERE feature IN ({','.join('?' * len(ids))}) AND label != ''"
                return {int(f): lab for f, lab in con.execute(q, [int(x) for x in ids])}
            except sqlite3.OperationalError:
                return {}

    def all_labels(self, limit: int = 200) -> list[tuple[int, str]]:
        """(latent, label) of labelled latents, by latent index."""
        if not self.labels_path.exists():
            return []
        with _reading(self.labels_path) as con:
            try:
                return [(int(f), lab) for f, lab in con.execute("SELECT feature, label FROM labels WHERE label != '' ORDER BY feature LIMIT ?", (limit,))]
            except sqlite3.OperationalError:
                return []

    def set_label(self, i: int, label: str, explanation: str = "", source: str = "user") -> None:
        """Create, update or (both empty) delete the label of latent ``i``."""
        if not 0 <= int(i) < self.d_sae:
            raise ValueError(f"latent {i} is out of range (d_sae={self.d_sae})")
        with contextlib.closing(self._labels_con()) as con, con:
            if not label.strip() and not explanation.strip():
                con.execute("DELETE FROM labels WHERE feature = ?", (int(i),))
            else:
                con.execute(
                    "INSERT INTO labels(feature, label, explanation, source, updated_at) VALUES (?,?,?,?,?) "
                    "ON CONFLICT(feature) DO UPDATE SET label=excluded.label, explanation=excluded.explanation, "
                    "source=excluded.source, updated_at=excluded.updated_at",
                    (int(i), label.strip(), explanation.strip(), source, time.strftime("%Y-%m-%dT%H:%M:%S%z")))

    def search_labels(self, query: str, limit: int = 20) -> list[tuple[int, str, str]]:
        """Latents whose label or explanation contains all words of ``query``: (latent, label, explanation)."""
        q = _fts_query(query)
        if q is None or not self.labels_path.exists():
            return []
        with _reading(self.labels_path) as con:
            try:
                with _bounded_search(con):
                    rows = con.execute(
                        "SELECT l.feature, l.label, l.explanation FROM labels_fts JOIN labels l ON l.feature = labels_fts.rowid "
                        "WHERE labels_fts MATCH ? ORDER BY bm25(labels_fts, 2.0, 1.0) LIMIT ?", (q, limit)).fetchall()
            except (sqlite3.OperationalError, SearchBusy):
                return []
        return [(int(f), lab, exp) for f, lab, exp in rows]

    # ---- automatic explanations (autointerp; evals/autointerp.py writes them) -----------------------------
    # In features.sqlite (they describe this build's examples; a rebuild drops them, the LLM reply cache
    # makes re-running cheap). One contiguous block: the table, its FTS index and four methods.
    _EXPLANATIONS_SCHEMA = """
    CREATE TABLE IF NOT EXISTS explanations(feature INTEGER PRIMARY KEY, text TEXT NOT NULL, score REAL, explainer TEXT NOT NULL,
        scorer TEXT NOT NULL, created TEXT NOT NULL, details TEXT);
    CREATE VIRTUAL TABLE IF NOT EXISTS explanations_fts USING fts5(text, content='explanations', content_rowid='feature');
    CREATE TRIGGER IF NOT EXISTS explanations_ai AFTER INSERT ON explanations BEGIN
      INSERT INTO explanations_fts(rowid, text) VALUES (new.feature, new.text); END;
    CREATE TRIGGER IF NOT EXISTS explanations_ad AFTER DELETE ON explanations BEGIN
      INSERT INTO explanations_fts(explanations_fts, rowid, text) VALUES('delete', old.feature, old.text); END;
    CREATE TRIGGER IF NOT EXISTS explanations_au AFTER UPDATE ON explanations BEGIN
      INSERT INTO explanations_fts(explanations_fts, rowid, text) VALUES('delete', old.feature, old.text);
      INSERT INTO explanations_fts(rowid, text) VALUES (new.feature, new.text); END;
    """

    def write_explanations(self, rows: list[tuple]) -> None:
        """Insert or replace ``(feature, text, score, explainer, scorer, details_dict)`` rows in one transaction."""
        bad = [r[0] for r in rows if not 0 <= int(r[0]) < self.d_sae]
        if bad:
            raise ValueError(f"latents {bad[:5]} are out of range (d_sae={self.d_sae})")
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        with contextlib.closing(_connect(self.db_path)) as con, con:
            con.executescript(self._EXPLANATIONS_SCHEMA)
            con.executemany("INSERT INTO explanations(feature, text, score, explainer, scorer, created, details) VALUES (?,?,?,?,?,?,?) "
                            "ON CONFLICT(feature) DO UPDATE SET text=excluded.text, score=excluded.score, explainer=excluded.explainer, "
                            "scorer=excluded.scorer, created=excluded.created, details=excluded.details",  # an UPDATE: keeps the FTS index in step
                            [(int(f), str(t), None if s is None else float(s), str(e), str(sc), now, json.dumps(d or {}))
                             for f, t, s, e, sc, d in rows])

    def explanation(self, i: int) -> dict | None:
        """The automatic explanation of latent ``i`` (text, score, explainer, scorer, created, details), or None."""
        return self.explanations([i]).get(int(i))

    def explanations(self, ids: list[int]) -> dict[int, dict]:
        if not ids:
            return {}
        with _reading(self.db_path) as con:
            try:
                q = f"SELECT feature, text, score, explainer, scorer, created, details FROM explanations WHERE feature IN ({','.join('?' * len(ids))})"
                rows = con.execute(q, [int(x) for x in ids]).fetchall()
            except sqlite3.OperationalError:  # no autointerp run yet
                return {}
        return {int(f): {"text": t, "score": s, "explainer": e, "scorer": sc, "created": c, "details": json.loads(d or "{}")}
                for f, t, s, e, sc, c, d in rows}

    def search_explanations(self, query: str, limit: int = 2000) -> SearchPage:
        """Latents whose automatic explanation contains all words of ``query`` (best match first)."""
        words, notes = query_words(query)
        if not words:
            return SearchPage([], 0, notes)
        q = " ".join('"' + w.replace('"', '""') + '"' for w in words)
        with _reading(self.db_path) as con:
            try:
                with _bounded_search(con) as timed_out:
                    try:
                        rows = con.execute("SELECT rowid FROM explanations_fts WHERE explanations_fts MATCH ? ORDER BY bm25(explanations_fts) LIMIT ?",
                                           (q, limit)).fetchall()
                    except sqlite3.OperationalError as e:
                        if timed_out[0]:
                            return SearchPage([], 0, notes + [_time_note()])
                        if "no such table" in str(e):
                            return SearchPage([], 0, notes)
                        raise
            except SearchBusy as e:
                return SearchPage([], 0, notes + [f"Search is busy: {e}."])
        return SearchPage([int(f) for (f,) in rows], len(rows), notes)


# =============================================================================================
# Live activations on a user's prompt
# =============================================================================================


class PromptActs(NamedTuple):
    token_ids: list[int]
    tokens: list[str]
    special: list[bool]  # masked positions (BOS/EOS/pad): values are zeroed
    values: Tensor  # [T, K]
    indices: Tensor  # [T, K]
    n_prompt_tokens: int = 0  # tokens of the whole prompt (BOS included); > len(tokens) when it was cut

    @property
    def truncated(self) -> bool:
        return self.n_prompt_tokens > len(self.tokens)

    def latent(self, i: int) -> list[float]:
        """Activation of latent ``i`` at every position."""
        return ((self.indices == i) * self.values).sum(-1).tolist()


PROMPT_MAX_TOKENS = 512


@torch.no_grad()
def prompt_activations(model, sae: SAE, prompt: str, max_tokens: int = PROMPT_MAX_TOKENS) -> PromptActs:
    """Run ``prompt`` (BOS prepended) through the model and the SAE; special positions are zeroed.

    Holds the model's :func:`saebench.steering.model_lock` for the forward pass, so a model shared by
    threads (the browser's sessions) is never run with another thread's hooks attached.
    """
    from saebench.activations import _flatten_site, hook_layer_of
    from saebench.steering import model_lock

    hook, head = _sae_hook(sae)
    all_toks = model.to_tokens(prompt)
    toks = all_toks[:, :max_tokens]
    stop = hook_layer_of(hook) + 1 if hook.startswith("blocks.") else None
    with model_lock(model):
        _, cache = model.run_with_cache(toks.to(sae.device), names_filter=lambda n: n == hook, stop_at_layer=stop)
    x = _flatten_site(cache[hook], head)[0].float()
    acts = sae.encode_sparse(x)
    ids = toks[0].tolist()
    special = torch.isin(toks[0], _special_ids(model.tokenizer)).tolist()
    values = acts.values.cpu() * ~torch.tensor(special)[:, None]
    return PromptActs(ids, [model.tokenizer.decode([t]) for t in ids], special, values, acts.indices.cpu(), int(all_toks.shape[1]))


def top_latents_per_token(acts: PromptActs, n: int = 5) -> list[list[tuple[int, float]]]:
    """For each position, the ``n`` latents with the largest |activation| (non-zero only)."""
    out = []
    for vals, idx in zip(acts.values, acts.indices):
        order = vals.abs().argsort(descending=True)[:n]
        out.append([(int(idx[j]), float(vals[j])) for j in order if vals[j] != 0])
    return out


# =============================================================================================
# Comparing latents across SAEs on the same hook
# =============================================================================================


def decoder_directions(sae_dir: str | Path) -> Tensor:
    """Unit-norm decoder rows [d_sae, d_in] of the SAE in ``sae_dir`` (only ``W_dec`` is read)."""
    from safetensors import safe_open

    p = Path(sae_dir)
    f = p / "sae.safetensors" if (p / "sae.safetensors").is_file() else p / "sae_weights.safetensors"
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


# =============================================================================================
# A folder of SAEs: discovery, safe path resolution, eval results
# =============================================================================================

_SKIP_DIRS = {DASHBOARD_DIR, ".git", ".venv", "node_modules", "__pycache__", "checkpoints", "wandb"}


@dataclass
class SaeEntry:
    rel: str  # path relative to the root, '/'-separated ('.' for the root itself)
    path: Path
    cfg: dict[str, Any]

    @property
    def has_dashboard(self) -> bool:
        return (self.path / DASHBOARD_DIR / DB_FILE).is_file()


def _is_sae_dir(p: Path) -> bool:
    return is_sae_folder(p)


MAX_CFG_BYTES = 1_000_000


def _read_sae_cfg(d: Path) -> dict[str, Any]:
    """The folder's cfg.json, checked enough for the browser to list it; raises ValueError with a one-line reason."""
    f = d / CFG_FILE
    size = f.stat().st_size
    if size > MAX_CFG_BYTES:
        raise ValueError(f"cfg.json is {size:,} bytes (more than {MAX_CFG_BYTES:,})")
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except RecursionError:
        raise ValueError("cfg.json is nested too deeply to read") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"cfg.json is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"cfg.json holds a {type(cfg).__name__}, not an object")  # noqa: TRY004 - one error type for "unreadable"
    for key in ("d_in", "d_sae"):
        v = cfg.get(key)
        if v is None and key == "d_in":
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{key} is {_short(v)}, not a positive integer")
    return cfg


def _short(v: Any, n: int = 40) -> str:
    try:
        r = repr(v)
    except RecursionError:
        r = f"<deeply nested {type(v).__name__}>"
    return r if len(r) <= n else r[: n - 1] + "…"


@dataclass
class SkippedSae:
    rel: str
    reason: str  # one line, no paths outside the root


def scan_saes(root: str | Path, max_depth: int = 6) -> tuple[list[SaeEntry], list[SkippedSae]]:
    """Every SAE folder under ``root``, and the SAE-looking folders skipped because they cannot be read.

    Any error reading one folder (a cfg.json nested 200,000 levels deep, ``"d_sae": "abc"``, an
    unreadable file) skips that folder with a one-line reason; it never stops the scan. Symlinks
    leading outside the root are not followed.
    """
    root = Path(root).resolve()
    out: list[SaeEntry] = []
    skipped: list[SkippedSae] = []
    if not root.is_dir():
        return out, skipped

    def walk(d: Path, depth: int) -> None:
        try:
            is_sae = _is_sae_dir(d)
        except OSError:
            is_sae = False
        if is_sae:
            rel = d.relative_to(root).as_posix() or "."
            try:
                out.append(SaeEntry(rel, d, _read_sae_cfg(d)))
            except Exception as e:  # noqa: BLE001 - any failure skips this folder only
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                skipped.append(SkippedSae(rel, reason.replace(str(root), "<root>")[:200]))
        if depth >= max_depth:
            return
        try:
            children = sorted(p for p in d.iterdir() if p.is_dir() and p.name not in _SKIP_DIRS and not p.name.startswith("."))
        except OSError:
            return
        for c in children:
            real = c.resolve()
            if real == root or root in real.parents:
                walk(c, depth + 1)

    walk(root, 0)
    return out, skipped


def find_saes(root: str | Path, max_depth: int = 6) -> list[SaeEntry]:
    """Every readable SAE folder under ``root`` (see :func:`scan_saes`, which also says what was skipped)."""
    return scan_saes(root, max_depth)[0]


def resolve_sae(root: str | Path, rel: str | None) -> SaeEntry | None:
    """The SAE at ``rel`` under ``root`` if ``rel`` names one exactly; never a path outside the root."""
    if not rel:
        return None
    for e in find_saes(root):
        if e.rel == rel:
            return e
    return None


def load_eval_results(root: str | Path) -> list[dict[str, Any]]:
    """Eval metrics of the SAEs under ``root``: each ``eval_core.json`` plus bench results files.

    Bench results (``evals/bench.py``) are read from ``*results*.json`` / ``*results*.csv`` files
    under the root (a JSON list of records, or an object with a ``results`` list; CSV with a
    header); of a ``results.json`` + ``results.csv`` pair only the JSON is read. Each record gets
    ``source`` (file, relative to the root) and ``eval`` (``core`` or ``bench``); SAE records get ``sae``
    (folder relative to the root), bench rows too when their ``sae_dir`` is an SAE under the root.
    Every source is kept: an SAE with both an eval_core.json and a bench row appears twice, each row
    saying where its numbers come from (its ``n_tokens`` and ``dead_window_tokens`` when recorded),
    never one silently replacing the other.
    """
    root_p = Path(root).resolve()
    saes = find_saes(root_p)
    by_path = {str(e.path.resolve()): e.rel for e in saes}
    bench: list[dict[str, Any]] = []
    for f in _bench_files(root_p):
        bench.extend(_read_bench_file(f, root_p))
    for r in bench:
        r.setdefault("eval", "bench")
        d = r.get("sae_dir")
        if isinstance(d, str) and d:
            try:
                p = (Path(d) if Path(d).is_absolute() else root_p / d).resolve()
            except (OSError, RuntimeError, ValueError):
                continue
            if str(p) in by_path:
                r["bench_sae"] = r.get("sae")
                r["sae"] = by_path[str(p)]
    records: list[dict[str, Any]] = []
    for e in saes:
        f = e.path / "eval_core.json"
        if not f.is_file():
            continue
        try:
            m = json.loads(f.read_text())
        except (OSError, ValueError, RecursionError):
            continue
        if isinstance(m, dict):
            rec = {"sae": e.rel, "source": f.relative_to(root_p).as_posix(), "eval": "core",
                   "method": e.cfg.get("method") or e.cfg.get("architecture", "")}
            rec |= {k: v for k, v in m.items() if isinstance(v, (int, float, str, bool)) or v is None}
            records.append(rec)
    return records + bench


def _bench_files(root: Path, max_depth: int = 4) -> list[Path]:
    out = []

    def walk(d: Path, depth: int) -> None:
        try:
            entries = sorted(d.iterdir())
        except OSError:
            return
        for p in entries:
            if p.name.startswith(".") or p.name in _SKIP_DIRS:
                continue
            real = p.resolve()
            if not (real == root or root in real.parents):
                continue
            if p.is_file() and "results" in p.name and p.suffix in (".json", ".csv") and p.stat().st_size < 50_000_000:
                if p.suffix == ".csv" and p.with_suffix(".json").is_file():
                    continue  # the bench writes the same rows as .json and .csv
                out.append(p)
            elif p.is_dir() and depth < max_depth:
                walk(p, depth + 1)

    walk(root, 0)
    return out


def _read_bench_file(f: Path, root: Path) -> list[dict[str, Any]]:
    rel = f.relative_to(root).as_posix()
    try:
        if f.suffix == ".csv":
            import csv

            with f.open(newline="") as fh:
                rows = [dict(r) for r in csv.DictReader(fh)]
            rows = [{k: _num(v) for k, v in r.items() if k} for r in rows]
        else:
            data = json.loads(f.read_text())
            rows = data.get("results") if isinstance(data, dict) else data
            if isinstance(data, dict) and rows is None and any(k in data for k in ("l0", "fvu")):
                rows = [data]
    except (OSError, ValueError, RecursionError):
        return []
    if not isinstance(rows, list):
        return []
    out = []
    for r in rows:
        if isinstance(r, dict) and any(k in r for k in ("l0", "fvu", "ce_loss_score")):
            out.append({k: v for k, v in r.items() if isinstance(v, (int, float, str, bool)) or v is None} | {"source": rel})
    return out


def _num(v: str) -> Any:
    try:
        return int(v)
    except (TypeError, ValueError):
        pass
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


# =============================================================================================
# Launching the app
# =============================================================================================

APP_ROOT_ENV = "SAEBENCH_BROWSE_ROOT"
APP_MODEL_ENV = "SAEBENCH_BROWSE_MODEL"
APP_DEVICE_ENV = "SAEBENCH_BROWSE_DEVICE"


def app_main_path() -> Path:
    """The Streamlit entry script (``app/main.py``, importable as ``saebench.app``)."""
    import saebench.app

    return Path(saebench.app.__file__).with_name("main.py")


def browse_command(root: str | Path, host: str = "127.0.0.1", port: int = 8501, model: str | None = None, device: str = "cpu") -> list[str]:
    """The ``streamlit run`` command line that serves the browser for ``root``."""
    import sys

    cmd = [sys.executable, "-m", "streamlit", "run", str(app_main_path()),
           "--server.address", host, "--server.port", str(port), "--server.headless", "true",
           "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none", "--client.toolbarMode", "viewer",
           "--", "--root", str(Path(root).resolve())]
    if model:
        cmd += ["--model", model]
    if device != "cpu":
        cmd += ["--device", device]
    return cmd


def browse(root: str | Path, host: str = "127.0.0.1", port: int = 8501, model: str | None = None, device: str = "cpu") -> int:
    """Serve the feature browser for every SAE under ``root`` (blocks; returns streamlit's exit code).

    Binds to ``host`` (localhost by default). ``model`` overrides the model named in each SAE's
    cfg.json (e.g. a local folder when the SAE was trained elsewhere).
    """
    import subprocess

    root = Path(root)
    if not root.is_dir():
        from saebench.config import ConfigError  # a path the user typed: bad input (CLI exit code 2), not the environment

        raise ConfigError(f"browse root {root} is not a directory: pass the folder that holds your SAE folders (e.g. runs)")
    env = os.environ | {APP_ROOT_ENV: str(root.resolve())}
    # OpenMP threads that sleep instead of spinning between parallel regions: on a machine with other
    # work running, spinning threads wait for descheduled siblings and one steering request took
    # 41-45 s instead of 6 s (2 threads, load 6.5; docs/PERFORMANCE.md §6). A user's own setting wins.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if model:
        env[APP_MODEL_ENV] = model
    env[APP_DEVICE_ENV] = device
    print(f"saebench browser for {root.resolve()} at http://{host}:{port}  (Ctrl-C to stop)")
    try:
        return subprocess.call(browse_command(root, host, port, model, device), env=env)
    except KeyboardInterrupt:
        return 0


def escape(text: str) -> str:
    """HTML-escape corpus text (quotes included)."""
    return html.escape(text, quote=True)



# =============================================================================================
# Steering's unit: a latent's max |activation| from the dashboards (no model pass)
# =============================================================================================


@dataclass(frozen=True)
class DashboardMax:
    """A latent's largest |activation| as the dashboards recorded it, and over how many tokens."""

    value: float
    n_tokens: int  # non-special tokens scanned by the build
    dead: bool
    folder: Path


def max_abs_activation(sae_dir: str | Path, latent: int) -> DashboardMax | None:
    """Latent ``latent``'s max |activation| from ``SAE_DIR/dashboards``, or None when it cannot be trusted.

    None when there are no readable dashboards, when they were built from other weights (the SAE
    was retrained since: the weights' sha256 differs from the build's) or when the latent's feature
    batch is not computed yet. One indexed query; no model is loaded.
    """
    sae_dir = Path(sae_dir)
    try:
        db = Dashboard(dashboard_dir(sae_dir))
        built_for = (db.meta.get("key") or {}).get("sae_sha256")
        if not built_for or built_for != _sae_fingerprint(sae_dir):
            return None
        f = db.feature(int(latent))
    except (ArtifactError, sqlite3.DatabaseError, OSError):
        return None
    if f is None:
        return None
    n = int(db.meta.get("n_valid_tokens") or db.provenance.get("n_tokens") or 0)
    return DashboardMax(float(f.max_abs_act), n, bool(f.dead), db.folder)
