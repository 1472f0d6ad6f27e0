"""The dashboards' store: the SQLite schema, bounded user searches and the query layer the app reads
(:class:`Dashboard`, :class:`FeatureData`, :class:`Example`, search hits).

To add a table: put its ``CREATE TABLE IF NOT EXISTS`` in ``_SCHEMA`` (or a schema of its own, as
``_LABELS_SCHEMA`` for the user's labels, when a rebuild must not touch it), write it from the build
(``build._write_batch``) or from its own producer, and read it with a :class:`Dashboard` method that
opens a short-lived connection with ``_reading`` (one per query keeps the app thread-safe)."""

from __future__ import annotations

import contextlib
import json
import random
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from saebench.dashboards.config import DB_FILE, LABELS_FILE, STATS_FILE, TOKENS_FILE, dashboard_dir
from saebench.folders import weights_sha256
from saebench.io import ArtifactError

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


_WORD = re.compile(r"\w+", flags=re.UNICODE)
MAX_WORD_CHARS = 64


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

    def _search_fts(self, fts: str, query: str, limit: int) -> SearchPage:
        """Feature ids whose row in the FTS5 table ``fts`` (one of ours, keyed by feature) holds all words of
        ``query``, best match first; bounded like every search (word cap, time limit, busy slots)."""
        words, notes = query_words(query)
        if not words:
            return SearchPage([], 0, notes)
        q = " ".join('"' + w.replace('"', '""') + '"' for w in words)
        with _reading(self.db_path) as con:
            try:
                with _bounded_search(con) as timed_out:
                    try:
                        rows = con.execute(f"SELECT rowid FROM {fts} WHERE {fts} MATCH ? ORDER BY bm25({fts}) LIMIT ?",
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

    def search_summaries(self, query: str, limit: int = 2000) -> SearchPage:
        """Latents whose automatic summary contains all words of ``query`` (bounded like every search)."""
        return self._search_fts("summary_fts", query, limit)

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
        return self._search_fts("explanations_fts", query, limit)


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
        if not built_for or built_for != weights_sha256(sae_dir):
            return None
        f = db.feature(int(latent))
    except (ArtifactError, sqlite3.DatabaseError, OSError):
        return None
    if f is None:
        return None
    n = int(db.meta.get("n_valid_tokens") or db.provenance.get("n_tokens") or 0)
    return DashboardMax(float(f.max_abs_act), n, bool(f.dead), db.folder)
