"""Precompute: harvest an SAE's sparse codes over held-out tokens once, then write every latent's
dashboard, one feature batch per SQLite transaction (the unit of resume).

``build_dashboards`` is the entry point; ``_compute_batch`` is a pure function of its batch and the
build's fixed inputs (:class:`_BuildInputs`), so a resumed build produces the same database."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sqlite3
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from saebench.dashboards.config import (
    CODES_FILE,
    DB_FILE,
    FORMAT_VERSION,
    STATS_FILE,
    TOKEN_CODES_FILE,
    TOKENS_FILE,
    DashboardConfig,
    dashboard_dir,
)
from saebench.dashboards.store import _SCHEMA, _WORD, MAX_WORD_CHARS, _connect, _get_meta, _set_meta
from saebench.folders import weights_sha256
from saebench.io import ArtifactError, atomic_write_bytes, save_tensors
from saebench.sae import SAE
from saebench.site import Site
from saebench.text import special_ids


def _sae_site(sae: SAE) -> Site:
    if not sae.cfg.hook_name:
        raise ArtifactError("the SAE's cfg.json has no hook_name; cannot run it on a model")
    return Site.of_sae(sae)


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
    from saebench.activations import token_mask
    from saebench.models import validate_hook_name

    site = _sae_site(sae)
    hook = site.hook
    validate_hook_name(model, hook)
    stop = site.stop_layer
    n_seq, ctx = tokens.shape
    device = sae.device
    toks_out, feats_out, vals_out = [], [], []
    n_kept = n_out = 0
    positions = torch.arange(n_seq * ctx).view(n_seq, ctx)
    t0 = time.perf_counter()
    for start in tqdm(range(0, n_seq, batch_size), desc="harvest + encode", disable=not progress, leave=False):
        toks = tokens[start : start + batch_size]
        _, cache = model.run_with_cache(toks.to(device), names_filter=lambda n: n == hook, stop_at_layer=stop)
        x = site.flatten(cache[hook])
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
        "sae_sha256": weights_sha256(sae_dir),
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
                          special_ids=special_ids(tokenizer).tolist())
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
        inputs = _BuildInputs(codes, tokens, W_dec, W_dec_unit, W_U, cfg, bool(sae.cfg.signed), vocab,
                              scratch=torch.zeros(min(fb, d_sae) * d_sae, dtype=torch.float64))
        for b in tqdm(todo, desc="feature batches", disable=not progress):
            tb = time.perf_counter()
            lo, hi = b * fb, min(d_sae, (b + 1) * fb)
            rows = _compute_batch(b, lo, hi, inputs)
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
    special = special_ids(tokenizer) if cfg.exclude_special_tokens else None
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


@dataclass(frozen=True)
class _BuildInputs:
    """What every feature batch of one build reads; fixed for the whole build."""

    codes: _Codes  # the harvested sparse codes, indexed
    tokens: Tensor  # [n_seq, ctx] the token set the examples point into
    W_dec: Tensor  # [d_sae, d_in] float32
    W_dec_unit: Tensor  # unit-norm rows of W_dec (decoder-cosine neighbours)
    W_U: Tensor | None  # [d_in, vocab] unembedding, or None (no logit effects)
    cfg: DashboardConfig
    signed: bool  # the SAE's latents take both signs (bottom examples, signed histograms)
    vocab: np.ndarray  # token strings, by id
    # an all-zero float64 buffer of at least feature_batch_size * d_sae elements, reused across batches
    # (all zero again after each one); allocated per batch when None
    scratch: Tensor | None = None


def _compute_batch(b: int, lo: int, hi: int, inp: _BuildInputs) -> _BatchRows:
    """Everything stored for latents [lo, hi) of feature batch ``b``; a pure function of its inputs (so resume is exact)."""
    codes, tokens, W_dec, W_dec_unit, W_U = inp.codes, inp.tokens, inp.W_dec, inp.W_dec_unit, inp.W_U
    cfg, signed, vocab, scratch = inp.cfg, inp.signed, inp.vocab, inp.scratch
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
