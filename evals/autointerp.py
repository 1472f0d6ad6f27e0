"""Autointerp: explain latents with an LLM, then score the explanations by detection.

Definition (SAEBench's ``autointerp``, after Bills et al. 2023 "Language models can explain neurons in
language models"; EleutherAI's delphi calls the scoring "detection"), implemented here from the
description in SAEBench's paper/code, with our own prompts:

1. **Latents.** ``n_latents`` drawn at random (seed ``seed``) from the latents with more than
   ``dead_latent_threshold`` (15) non-zero activations on the token set.
2. **Windows.** Every example is a window of ``2·buffer + 1`` (21) tokens centred on a position
   ``buffer ≤ pos < ctx − buffer`` of one sequence. *Top*: the 12 highest-activation positions whose
   windows do not overlap. *Importance-weighted* (IW): 7 positions drawn without replacement with
   probability ∝ activation among the positions below the smallest top peak (windows disjoint from the
   top windows and from each other: stricter than SAEBench, so no text is shared between the
   explainer's and the scorer's examples). *Random*: 10 uniformly random windows, redrawn until the
   latent is inactive in them (SAEBench labels random windows negative without looking; for dense
   latents some are active, which would penalise a correct judge).
3. **Split.** A seeded permutation splits the top windows 10 (explain) / 2 (score) and the IW windows
   5 / 2. The explainer sees its 15 windows (top first, by activation), with every token whose
   activation exceeds ``act_threshold_frac`` (1%) of the top window maximum wrapped in ``<<…>>``, and
   answers with an explanation of at most ``max_tokens_in_explanation`` (30) tokens.
4. **Detection.** The scorer gets the explanation and the 14 scoring windows (2 top + 2 IW + 10
   random), unmarked, in a seeded random order, and returns the numbers of the windows where the
   latent should be active. A window's truth is "some token above the 1% threshold".
   ``score = (#correctly predicted active + #correctly predicted inactive) / 14``.
5. ``autointerp_score`` = the mean over latents, ``autointerp_std_dev`` its sample sd (ddof = 1).
   Latents whose scorer answer has no number in range and no "None" are dropped from the mean (as
   SAEBench does) and counted in ``n_unparsed``.

Baselines on 4 active + 10 inactive windows: a judge that always answers "None" scores exactly
10/14 = 0.714 (the "random" level quoted for SAEBench); one that picks 4 windows uniformly at random
scores 0.592 in expectation; a coin flip per window 0.5.

Data: the SAE's built dashboards (``SAE_DIR/dashboards``: ``tokens.npy`` + the sparse codes in
``token_codes.safetensors``, held-out text) when they exist, otherwise a bounded harvest of
``harvest_tokens`` held-out tokens through the model and the SAE. Explanations and scores can be
written into the dashboards' database, where the browser shows and searches them.
"""

from __future__ import annotations

import argparse
import math
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from pydantic.dataclasses import dataclass as pydantic_dataclass  # validated configs; registry flags come from their fields
from saebench.llm import LLM, Backend, Messages, Reply, ReplyCache, Usage, default_cache_path
from saebench.llm import make_backend as _make_llm_backend

from saebench.evals import plots
from saebench.evals.registry import Command, ConfigSpec, EvalSpec, register

PROMPT_VERSION = 1
RESULT_FILE = "eval_autointerp.json"


@pydantic_dataclass(frozen=True)
class AutointerpConfig:
    n_latents: int = 50  # SAEBench: 1000 (with gpt-4o-mini); 0 = every latent above the threshold
    latents: tuple[int, ...] | None = None  # explicit latents (overrides n_latents)
    dead_latent_threshold: int = 15
    seed: int = 42
    buffer: int = 10
    n_top_ex_for_generation: int = 10
    n_iw_sampled_ex_for_generation: int = 5
    n_top_ex_for_scoring: int = 2
    n_iw_sampled_ex_for_scoring: int = 2
    n_random_ex_for_scoring: int = 10
    act_threshold_frac: float = 0.01
    max_tokens_in_explanation: int = 30
    max_tokens_in_prediction: int = 40
    temperature: float = 0.0
    source: str = "auto"  # auto (dashboards if built, else harvest) | dashboards | harvest
    harvest_tokens: int = 131_072
    context_size: int = 128
    corpus: str = "default"
    batch_size: int = 16

    def __post_init__(self):
        if self.source not in ("auto", "dashboards", "harvest"):
            raise ValueError(f"source must be auto, dashboards or harvest, not {self.source!r}")
        for name in ("n_top_ex_for_generation", "n_top_ex_for_scoring", "n_random_ex_for_scoring", "max_tokens_in_explanation",
                     "max_tokens_in_prediction", "harvest_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_latents < 0 or self.buffer < 0 or self.n_iw_sampled_ex_for_generation < 0 or self.n_iw_sampled_ex_for_scoring < 0:
            raise ValueError("n_latents, buffer and the importance-weighted counts must be >= 0")
        if not 0 <= self.act_threshold_frac < 1:
            raise ValueError(f"act_threshold_frac must be in [0, 1), got {self.act_threshold_frac}")

    @property
    def n_top(self) -> int:
        return self.n_top_ex_for_generation + self.n_top_ex_for_scoring

    @property
    def n_iw(self) -> int:
        return self.n_iw_sampled_ex_for_generation + self.n_iw_sampled_ex_for_scoring

    @property
    def n_scoring(self) -> int:
        return self.n_top_ex_for_scoring + self.n_iw_sampled_ex_for_scoring + self.n_random_ex_for_scoring

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["latents"] = list(self.latents) if self.latents is not None else None
        d.pop("batch_size")
        return d


# --------------------------------------------------------------------------- the token set and its codes


@dataclass
class CodeTable:
    """Tokens ``[n_seq, ctx]`` and the sparse codes over them, indexed by latent."""

    tokens: np.ndarray
    pos: np.ndarray  # flat positions (seq * ctx + p), latent-major, ascending within a latent
    val: np.ndarray  # float32
    col_ptr: np.ndarray  # [d_sae + 1]
    vocab: list[str]
    special_ids: frozenset[int]
    origin: dict[str, Any]

    @classmethod
    def from_flat(cls, tokens: np.ndarray, tok: np.ndarray, feat: np.ndarray, val: np.ndarray, d_sae: int, vocab: list[str],
                  special_ids, origin: dict[str, Any]) -> CodeTable:
        feat = np.asarray(feat, dtype=np.int64)
        if len(feat) and (feat.min() < 0 or feat.max() >= d_sae):
            raise ValueError(f"codes name latents outside [0, {d_sae})")
        order = np.lexsort((np.asarray(tok), feat))
        col_ptr = np.zeros(d_sae + 1, dtype=np.int64)
        col_ptr[1:] = np.cumsum(np.bincount(feat, minlength=d_sae))
        return cls(np.asarray(tokens), np.asarray(tok, dtype=np.int64)[order], np.asarray(val, dtype=np.float32)[order], col_ptr,
                   vocab, frozenset(int(t) for t in special_ids), origin)

    @property
    def d_sae(self) -> int:
        return len(self.col_ptr) - 1

    def n_active(self) -> np.ndarray:
        return np.diff(self.col_ptr)

    def dense(self, latent: int) -> np.ndarray:
        """The latent's activation at every position, ``[n_seq, ctx]`` (float32)."""
        a = np.zeros(self.tokens.size, dtype=np.float32)
        s, e = self.col_ptr[latent], self.col_ptr[latent + 1]
        a[self.pos[s:e]] = self.val[s:e]
        return a.reshape(self.tokens.shape)

    def token_str(self, t: int) -> str:
        if t in self.special_ids:
            return ""
        s = self.vocab[t] if 0 <= t < len(self.vocab) else f"<{t}>"
        return s.replace("\ufffd", "").replace("\r", "").replace("\n", "↵")


def codes_from_dashboards(sae_dir: str | Path) -> CodeTable:
    """The held-out token set and sparse codes a finished dashboard build kept."""
    from safetensors.torch import load_file

    from saebench import dashboards as D
    from saebench.io import ArtifactError

    folder = D.dashboard_dir(sae_dir)
    db = D.Dashboard(folder)
    if not db.complete:
        raise ArtifactError(f"the dashboards in {folder} are unfinished; finish them ({D.build_command(sae_dir)}) or use --source harvest")
    if not D.TokenCodes.available(folder):
        raise ArtifactError(f"the dashboards in {folder} predate the stored sparse codes ({D.TOKEN_CODES_FILE}); rebuild them "
                            f"({D.build_command(sae_dir)} --no-resume) or use --source harvest")
    t = load_file(str(folder / D.TOKEN_CODES_FILE))
    row_ptr = t["row_ptr"].numpy()
    tok = np.repeat(np.arange(len(row_ptr) - 1, dtype=np.int64), np.diff(row_ptr))
    tokens = np.load(folder / D.TOKENS_FILE)
    prov = db.provenance
    return CodeTable.from_flat(tokens, tok, t["feat"].numpy(), t["val"].numpy(), db.d_sae, db.vocab(), db.special_ids,
                               {"source": "dashboards", "folder": str(folder), "corpus": prov.get("corpus"), "split": prov.get("split"),
                                "n_tokens": int(tokens.size), "context_size": int(tokens.shape[1]), "model": prov.get("model")})


def dashboards_usable(sae_dir: str | Path) -> bool:
    """Finished dashboards that kept their sparse codes (the ``auto`` source uses them, else it harvests)."""
    from saebench import dashboards as D
    from saebench.io import ArtifactError

    folder = D.dashboard_dir(sae_dir)
    if not ((folder / D.DB_FILE).is_file() and D.TokenCodes.available(folder)):
        return False
    try:
        return D.Dashboard(folder).complete
    except ArtifactError:
        return False


def codes_from_harvest(model, sae, cfg: AutointerpConfig, progress: bool = True) -> CodeTable:
    """A bounded harvest: ``cfg.harvest_tokens`` held-out tokens through the model and the SAE."""

    from saebench import dashboards as D
    from saebench import text
    from saebench.dashboards.build import _vocab_strings

    tokens = text.load_tokens(_corpus_of(sae, cfg.corpus), model.tokenizer, cfg.context_size, cfg.harvest_tokens, split="eval")
    special = text.special_ids(model.tokenizer)
    tok, feat, val = D.harvest_codes(model, sae, tokens, special, batch_size=cfg.batch_size, progress=progress, outlier_norm_factor=10.0)
    return CodeTable.from_flat(tokens.numpy(), tok.numpy(), feat.numpy(), val.numpy(), sae.d_sae, _vocab_strings(model.tokenizer),
                               special.tolist(), {"source": "harvest", "corpus": _corpus_of(sae, cfg.corpus), "split": "eval",
                                                  "n_tokens": int(tokens.numel()), "context_size": int(tokens.shape[1]),
                                                  "outlier_norm_factor": 10.0})


def _corpus_of(sae, corpus: str) -> str:
    if corpus != "default":
        return corpus
    meta = getattr(sae.cfg, "metadata", None) or {}
    return meta.get("corpus") or "default"


# --------------------------------------------------------------------------- example selection


@dataclass
class Window:
    kind: str  # top | iw | random
    seq: int
    pos: int  # centre
    token_ids: list[int]
    acts: list[float]
    active: bool = False  # any token above the latent's threshold (the truth the scorer is judged on)


@dataclass
class LatentExamples:
    latent: int
    threshold: float  # act_threshold_frac x the top windows' max
    explain: list[Window]  # top (by activation) then IW
    score: list[Window]  # shuffled
    n_active: int


def _windows_disjoint(pos_flat: int, ctx: int, taken: dict[int, list[int]], buffer: int) -> bool:
    s, p = divmod(pos_flat, ctx)
    return all(abs(p - q) > 2 * buffer for q in taken.get(s, ()))


def _free(pool: np.ndarray, ctx: int, taken: dict[int, list[int]], buffer: int) -> np.ndarray:
    """The flat positions of ``pool`` whose windows overlap none of ``taken`` (vectorised)."""
    keep = np.ones(len(pool), dtype=bool)
    s, p = pool // ctx, pool % ctx
    for seq, ps in taken.items():
        for q in ps:
            keep &= ~((s == seq) & (np.abs(p - q) <= 2 * buffer))
    return pool[keep]


def select_examples(codes: CodeTable, latent: int, cfg: AutointerpConfig) -> LatentExamples | str:
    """The explanation and scoring windows of one latent, or a reason why it cannot be scored."""
    rng = np.random.default_rng([cfg.seed, latent])  # per latent: independent of which other latents are drawn
    a = codes.dense(latent)
    n_seq, ctx = a.shape
    b = cfg.buffer
    if ctx < 2 * b + 1:
        raise ValueError(f"context size {ctx} is shorter than a window of 2*buffer+1 = {2 * b + 1} tokens; lower --buffer")
    inner = np.zeros_like(a, dtype=bool)
    inner[:, b : ctx - b] = True
    flat = a.reshape(-1)
    cand = np.flatnonzero((flat > 0) & inner.reshape(-1))
    cand = cand[np.lexsort((cand, -flat[cand]))]  # by activation desc, then position: deterministic ties
    taken: dict[int, list[int]] = {}
    top: list[int] = []
    for f in cand:
        if _windows_disjoint(int(f), ctx, taken, b):
            top.append(int(f))
            taken.setdefault(int(f) // ctx, []).append(int(f) % ctx)
            if len(top) == cfg.n_top:
                break
    if len(top) < cfg.n_top:
        return f"fewer than {cfg.n_top} non-overlapping activating windows"
    peak_min = flat[top].min()
    iw: list[int] = []
    if cfg.n_iw:
        pool = _free(cand[(flat[cand] < peak_min)], ctx, taken, b)
        while len(iw) < cfg.n_iw and len(pool):
            w = flat[pool].astype(np.float64)
            f = int(pool[rng.choice(len(pool), p=w / w.sum())])
            iw.append(f)
            taken.setdefault(f // ctx, []).append(f % ctx)
            pool = _free(pool, ctx, {f // ctx: [f % ctx]}, b)
        if len(iw) < cfg.n_iw:
            return f"fewer than {cfg.n_iw} importance-weighted windows below the top peaks"

    def window(kind: str, f: int) -> Window:
        s, p = divmod(f, ctx)
        return Window(kind, s, p, [int(t) for t in codes.tokens[s, p - b : p + b + 1]], [float(v) for v in a[s, p - b : p + b + 1]])

    tops = [window("top", f) for f in top]
    threshold = cfg.act_threshold_frac * max(max(w.acts) for w in tops)
    rand: list[Window] = []
    tries = 0
    while len(rand) < cfg.n_random_ex_for_scoring:
        tries += 1
        if tries > 200 * cfg.n_random_ex_for_scoring:
            return "no inactive random windows (the latent is active almost everywhere)"
        s, p = int(rng.integers(n_seq)), int(rng.integers(b, ctx - b))
        w = window("random", s * ctx + p)
        if max(w.acts) <= threshold and all(not (x.seq == s and abs(x.pos - p) <= 2 * b) for x in rand):
            rand.append(w)
    iws = [window("iw", f) for f in iw]
    for w in tops + iws + rand:
        w.active = max(w.acts) > threshold
    top_perm = rng.permutation(len(tops))
    iw_perm = rng.permutation(len(iws))
    g_top = sorted((tops[i] for i in top_perm[: cfg.n_top_ex_for_generation]), key=lambda w: -max(w.acts))
    s_top = [tops[i] for i in top_perm[cfg.n_top_ex_for_generation :]]
    g_iw = sorted((iws[i] for i in iw_perm[: cfg.n_iw_sampled_ex_for_generation]), key=lambda w: -max(w.acts))
    s_iw = [iws[i] for i in iw_perm[cfg.n_iw_sampled_ex_for_generation :]]
    scoring = s_top + s_iw + rand
    scoring = [scoring[i] for i in rng.permutation(len(scoring))]
    return LatentExamples(latent, threshold, g_top + g_iw, scoring, int(codes.col_ptr[latent + 1] - codes.col_ptr[latent]))


def window_text(codes: CodeTable, w: Window, threshold: float | None) -> str:
    """The window as text; with ``threshold``, tokens above it are wrapped in ``<<…>>``."""
    out = []
    for t, v in zip(w.token_ids, w.acts):
        s = codes.token_str(t)
        out.append(f"<<{s}>>" if threshold is not None and v > threshold and s else s)
    return "".join(out)


def sample_latents(codes: CodeTable, cfg: AutointerpConfig) -> tuple[list[int], int]:
    """(latents to evaluate, number of latents above the activation-count threshold)."""
    alive = np.flatnonzero(codes.n_active() > cfg.dead_latent_threshold)
    if cfg.latents is not None:
        bad = [i for i in cfg.latents if not 0 <= i < codes.d_sae]
        if bad:
            raise ValueError(f"latents {bad[:5]} are out of range (d_sae = {codes.d_sae})")
        return list(dict.fromkeys(int(i) for i in cfg.latents)), len(alive)
    if cfg.n_latents == 0 or cfg.n_latents >= len(alive):
        return [int(i) for i in alive], len(alive)
    rng = random.Random(cfg.seed)
    return sorted(int(i) for i in rng.sample(list(alive), cfg.n_latents)), len(alive)


# --------------------------------------------------------------------------- prompts and parsing

EXPLAIN_SYSTEM = (
    "You interpret one feature of a neural network. The feature is active on some tokens of short text excerpts. "
    "You see excerpts where it is active, strongest first; the tokens where it is active are wrapped in << and >>. "
    "Say in one short phrase (at most 20 words) what the feature responds to: a word, part of a word, a symbol, "
    "or a kind of context or topic. Cover most of the marked tokens, not just one. Answer with the phrase only, for example: "
    "the word \"because\" in explanations; the suffix \"ing\"; years in dates; text about cooking."
)
SCORE_SYSTEM = (
    "You check an explanation of a neural network feature. You get the explanation and {n} numbered text excerpts. "
    "Decide in which excerpts the feature is active on at least one token, judging by the explanation. "
    "Answer only with the numbers of those excerpts separated by commas, for example \"{example}\", or with \"None\" if there are none."
)


def explain_messages(codes: CodeTable, ex: LatentExamples) -> Messages:
    body = "\n".join(f"{i + 1}. {window_text(codes, w, ex.threshold)}" for i, w in enumerate(ex.explain))
    return [{"role": "system", "content": EXPLAIN_SYSTEM},
            {"role": "user", "content": f"Excerpts:\n\n{body}\n\nWhat does the feature respond to? Answer with one short phrase."}]


def score_messages(codes: CodeTable, ex: LatentExamples, explanation: str, rng: random.Random) -> Messages:
    n = len(ex.score)
    k = min(n, sum(w.active for w in ex.score))
    example = ", ".join(str(i) for i in sorted(rng.sample(range(1, n + 1), max(k, 1))))
    body = "\n".join(f"{i + 1}. {window_text(codes, w, None)}" for i, w in enumerate(ex.score))
    return [{"role": "system", "content": SCORE_SYSTEM.format(n=n, example=example)},
            {"role": "user", "content": f"Explanation: the feature responds to {explanation}.\n\nExcerpts:\n\n{body}\n\n"
                                        "Numbers of the excerpts where it is active:"}]


_PREFIXES = re.compile(r"^(?:the feature (?:responds|is active|activates|fires)(?: to| on)?|this (?:neuron|feature) (?:activates|fires|responds)"
                       r"(?: on| to)?|it (?:responds|activates)(?: to| on)?|explanation|answer)\s*[:,-]?\s*", re.IGNORECASE)


def parse_explanation(text: str, max_words: int = 30) -> str | None:
    """The first line with content once a restated prefix ("The feature responds to: ...") and quotes are removed."""
    for line in text.splitlines():
        line = line.strip().strip("*").strip()
        for _ in range(2):
            line = _PREFIXES.sub("", line).strip().strip("*").strip()
        if len(line) >= 2 and line[0] == line[-1] and line[0] in "'`" and line.count(line[0]) == 2:
            line = line[1:-1].strip()
        line = line.rstrip(".").strip()
        if line:
            return " ".join(line.split()[:max_words])
    return None


_NUM = re.compile(r"(\d+)\s*(?:-|–|to)\s*(\d+)|(\d+)")
# Words a list-of-numbers answer may contain besides numbers and separators ("Excerpts 3 and 7", "None of them").
_ANSWER_WORDS = frozenset(["and", "or", "none", "of", "them", "the", "excerpts", "excerpt", "examples", "example", "numbers", "number", "answer", "active", "are", "is", "in", "it", "fires", "on", "where", "feature"])


def parse_predictions(text: str, n: int) -> list[int] | None:
    """Numbers 1..n the scorer named (ranges like ``3-5`` expanded), ``[]`` for "None", ``None`` if unreadable.

    Only the first line with content counts, and it must be a list of numbers (or "None"), possibly with a
    few glue words ("Excerpts 3 and 7"), markdown or a final full stop: a model that echoes the numbered
    excerpts ("1. some text ...") or writes prose is unreadable, not a prediction of excerpt 1.
    """
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = re.sub(r"[*`_\"']", "", line).strip().rstrip(".").strip()
    rest = re.sub(r"\d+|[,;:&/\-–.()\[\]]", " ", line.casefold()).split()
    if not line or any(w not in _ANSWER_WORDS for w in rest):
        return None
    found: set[int] = set()
    for m in _NUM.finditer(line):
        if m.group(3) is not None:
            found.add(int(m.group(3)))
        else:
            lo, hi = int(m.group(1)), int(m.group(2))
            found.update(range(lo, hi + 1) if 0 < hi - lo < n else (lo, hi))
    valid = sorted(x for x in found if 1 <= x <= n)
    if valid:
        return valid
    if re.search(r"\bnone\b", line, re.IGNORECASE) and not found:
        return []
    return None


def score_predictions(predicted: Sequence[int], truth: Sequence[bool]) -> float:
    """Detection accuracy: the fraction of windows whose predicted state (named or not) equals the truth."""
    if not truth:
        raise ValueError("no scoring windows")
    pred = set(predicted)
    return sum((i + 1 in pred) == bool(t) for i, t in enumerate(truth)) / len(truth)


def baselines(n_active: int, n: int) -> dict[str, float]:
    """Expected scores of explanation-free judges on ``n_active`` active windows of ``n``."""
    neg = n - n_active
    return {"always_none": neg / n, "random_pick_k": (n_active * n_active + neg * neg) / (n * n) if n else math.nan, "coin_flip": 0.5}


# --------------------------------------------------------------------------- the keyword judge (rule-based)


class KeywordBackend(Backend):
    """A rule-based judge for these prompts. Explain: the most frequent marked token, as ``the token "X"``.
    Score: the excerpts containing that token (casefolded, whole word when it is alphanumeric).

    A lexical baseline ("the latent is its top token") and the planted oracle of the tests: on a latent
    that fires on exactly one token it scores 1.
    """

    kind = "keyword"
    model = "marked-token-match"

    def describe(self) -> dict[str, Any]:
        return {"backend": self.kind, "model": self.model, "source": "rule-based (saebench.evals.autointerp.KeywordBackend)"}

    def chat(self, messages: Messages, max_tokens: int, temperature: float = 0.0, seed: int = 0, usage: Usage | None = None) -> Reply:
        user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        prompt_tokens = sum(len(m["content"].split()) for m in messages)
        if "<<" in user:
            marked = [m.strip() for m in re.findall(r"<<(.*?)>>", user) if m.strip()]
            if not marked:
                return Reply("unknown", prompt_tokens, 1)
            counts = Counter(m.casefold() for m in marked)
            best = max(counts.values())
            word = next(m for m in marked if counts[m.casefold()] == best)
            answer = f'the token "{word}"'
        else:
            m = re.search(r'Explanation:.*?"(.+?)"', user)
            hits = []
            if m:
                word = m.group(1).casefold()
                pat = re.compile(rf"(?<!\w){re.escape(word)}(?!\w)" if word[:1].isalnum() and word[-1:].isalnum() else re.escape(word))
                for line in user.splitlines():
                    lm = re.match(r"^(\d+)\. (.*)$", line)
                    if lm and pat.search(lm.group(2).casefold()):
                        hits.append(lm.group(1))
            answer = ", ".join(hits) if hits else "None"
        return Reply(answer, prompt_tokens, len(answer.split()))


def make_backend(kind: str, model: str | None = None, url: str | None = None, **kw) -> Backend:
    """``hf`` / ``openai`` (:func:`saebench.llm.make_backend`) or ``keyword`` (the rule-based judge above, for tests and servers)."""
    if kind == "keyword":
        return KeywordBackend()
    return _make_llm_backend(kind, model, url, **kw)


# --------------------------------------------------------------------------- the eval


def evaluate_autointerp(codes: CodeTable, llm: LLM, cfg: AutointerpConfig = AutointerpConfig(), progress: bool = True) -> dict[str, Any]:
    """Explain and detection-score the sampled latents; the results dict (also the JSON written to disk)."""
    t0 = time.time()
    latents, n_alive = sample_latents(codes, cfg)
    per: dict[str, dict[str, Any]] = {}
    skipped: Counter = Counter()
    skipped_latents: dict[str, str] = {}
    unparsed: list[int] = []
    for latent in tqdm(latents, desc="autointerp (explain + score)", disable=not progress, unit="latent"):
        ex = select_examples(codes, latent, cfg)
        if isinstance(ex, str):
            skipped[ex] += 1
            skipped_latents[str(latent)] = ex
            continue
        raw_expl = llm.chat(explain_messages(codes, ex), cfg.max_tokens_in_explanation, cfg.temperature, cfg.seed).text
        explanation = parse_explanation(raw_expl)
        rec: dict[str, Any] = {"n_active": ex.n_active, "threshold": ex.threshold, "raw_explanation": raw_expl, "explanation": explanation,
                               "kinds": [w.kind for w in ex.score], "truth": [w.active for w in ex.score],
                               "windows": [[w.seq, w.pos] for w in ex.score]}
        if explanation is None:
            skipped["empty explanation"] += 1
            per[str(latent)] = rec | {"score": None}
            continue
        msgs = score_messages(codes, ex, explanation, random.Random(cfg.seed * 1_000_003 + latent))
        raw_pred = llm.chat(msgs, cfg.max_tokens_in_prediction, cfg.temperature, cfg.seed).text
        pred = parse_predictions(raw_pred, len(ex.score))
        rec |= {"raw_prediction": raw_pred, "predictions": pred}
        if pred is None:
            unparsed.append(latent)
            rec["score"] = None
        else:
            rec["score"] = score_predictions(pred, rec["truth"])
        per[str(latent)] = rec
    scores = [r["score"] for r in per.values() if r.get("score") is not None]
    n_act = cfg.n_top_ex_for_scoring + cfg.n_iw_sampled_ex_for_scoring
    result = {
        "eval": "autointerp",
        "autointerp_score": float(np.mean(scores)) if scores else math.nan,
        "autointerp_std_dev": float(np.std(scores, ddof=1)) if len(scores) > 1 else math.nan,
        "n_latents_scored": len(scores),
        "n_latents_requested": len(latents),
        "n_alive": n_alive,
        "n_unparsed": len(unparsed),
        "unparsed_latents": unparsed,
        "skipped": dict(skipped),
        "skipped_latents": skipped_latents,
        "baselines": baselines(n_act, cfg.n_scoring),
        "judge": llm.describe(),
        "prompts": {"version": PROMPT_VERSION, "explain_system": EXPLAIN_SYSTEM, "score_system": SCORE_SYSTEM},
        "seeds": {"seed": cfg.seed, "temperature": cfg.temperature, "latent_sample": "random.Random(seed).sample(alive, n_latents)",
                  "windows": "numpy default_rng([seed, latent])"},
        "config": cfg.to_dict(),
        "data": codes.origin,
        "usage": llm.usage.to_dict(),
        "seconds": time.time() - t0,
        "latents": per,
    }
    return result


def write_to_dashboards(sae_dir: str | Path, result: dict[str, Any]) -> int:
    """Store every explanation of ``result`` (with its score) in the SAE's dashboards; returns how many."""
    from saebench import dashboards as D

    db = D.Dashboard(D.dashboard_dir(sae_dir))
    judge = result["judge"]
    who = f"{judge.get('backend')}:{judge.get('model')}"
    rows = [(int(k), r["explanation"], r.get("score"), who, who, {"n_scoring": len(r.get("truth", [])), "prompt_version": PROMPT_VERSION,
                                                                    "seed": result["config"]["seed"], "data": result["data"].get("source")})
            for k, r in result["latents"].items() if r.get("explanation")]
    db.write_explanations(rows)
    return len(rows)


def make_llm(backend: str = "hf", model: str | None = None, url: str | None = None, *, cache: str | Path | None | bool = True,
             api_key_env: str | None = "OPENAI_API_KEY", timeout: float = 60.0, max_retries: int = 4, backoff: float = 1.0,
             device: str = "cpu", price_in: float = 0.0, price_out: float = 0.0) -> LLM:
    """A judge: ``cache=True`` uses ``~/.cache/saebench/llm_cache.sqlite``, a path uses that file, False/None none."""
    b = make_backend(backend, model, url, device=device, api_key_env=api_key_env, timeout=timeout, max_retries=max_retries, backoff=backoff)
    c = None if cache in (None, False) else ReplyCache(default_cache_path() if cache is True else cache)
    return LLM(b, c, Usage(price_in=price_in, price_out=price_out))


@pydantic_dataclass(frozen=True)
class JudgeConfig:
    """Which LLM explains and scores (for ``saebench bench``; part of its cache key, the API key excluded)."""

    backend: str = "hf"
    model: str | None = None
    url: str | None = None
    api_key_env: str | None = "OPENAI_API_KEY"
    timeout: float = 60.0
    max_retries: int = 4
    cache: str | None = None  # reply cache file (None: the default one)
    write_dashboards: bool = True  # store explanations in the SAE's dashboards when they were the data source

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "model": self.model, "url": self.url}

    def make(self, device: str = "cpu") -> LLM:
        return make_llm(self.backend, self.model, self.url, cache=self.cache or True, api_key_env=self.api_key_env, timeout=self.timeout,
                        max_retries=self.max_retries, device=device)


def evaluate_sae(sae_dir: str | Path, sae, model, cfg: AutointerpConfig, judge: JudgeConfig | LLM, progress: bool = True,
                 device: str = "cpu") -> dict[str, Any]:
    """One SAE: examples from its dashboards when built (``cfg.source`` auto), else a bounded harvest with ``model``."""

    source = ("dashboards" if dashboards_usable(sae_dir) else "harvest") if cfg.source == "auto" else cfg.source
    codes = codes_from_dashboards(sae_dir) if source == "dashboards" else codes_from_harvest(model, sae, cfg, progress=progress)
    llm = judge if isinstance(judge, LLM) else judge.make(device)
    result = evaluate_autointerp(codes, llm, cfg, progress=progress)
    note = weakness_note(result)
    if note:
        result["warning"] = note
    if source == "dashboards" and (isinstance(judge, LLM) or judge.write_dashboards):
        result["explanations_written"] = write_to_dashboards(sae_dir, result)
    return result


def weakness_note(result: dict[str, Any]) -> str | None:
    """A plain warning when the judge is the tiny offline model."""
    j = result.get("judge", {})
    if j.get("backend") == "hf" and "135M" in str(j.get("model")):
        return ("the judge is SmolLM2-135M-Instruct, a 135M-parameter model: measured, its explanations echo the prompt and "
                "its detection answers echo the excerpts instead of naming them (unparsed), so this score says nothing about the SAE. Point --backend openai at a strong model "
                "(vLLM, llama.cpp, ollama or a hosted API) for a meaningful number; see docs/EVALS_IMPLEMENTED.md")
    return None


# --------------------------------------------------------------------------- CLI


def build_parser(prog: str = "saebench autointerp") -> argparse.ArgumentParser:
    from saebench.config import HelpFormatter

    p = argparse.ArgumentParser(prog=prog, formatter_class=HelpFormatter,
                                description="Explain latents with an LLM and score the explanations by detection (SAEBench's autointerp).")
    p.add_argument("sae_dir", help="SAE folder")
    p.add_argument("--backend", choices=["hf", "openai", "keyword"], default="hf",
                   help="hf: a local transformers chat model (without --model: the offline SmolLM2-135M-Instruct, a very weak judge); "
                        "openai: any OpenAI-compatible endpoint (--url, --model); keyword: rule-based marked-token matcher (a baseline)")
    p.add_argument("--model", default=None, help="hf: local folder or hub name; openai: the model name the server serves")
    p.add_argument("--url", default=None, help="openai: base URL, e.g. http://127.0.0.1:8000/v1 (vLLM), :8080/v1 (llama.cpp), :11434/v1 (ollama)")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="openai: environment variable holding the API key (optional for local servers)")
    p.add_argument("--timeout", type=float, default=60.0, help="openai: seconds per request")
    p.add_argument("--retries", type=int, default=4, help="openai: retries after a failed request (exponential backoff)")
    p.add_argument("--price-in", type=float, default=0.0, help="$ per 1M prompt tokens (for the cost line)")
    p.add_argument("--price-out", type=float, default=0.0, help="$ per 1M completion tokens (for the cost line)")
    p.add_argument("--cache", default=None, help="reply cache file (default: ~/.cache/saebench/llm_cache.sqlite)")
    p.add_argument("--no-cache", action="store_true", help="ask the backend every time")
    p.add_argument("--n-latents", type=int, default=AutointerpConfig.n_latents, help="latents sampled (0: every latent above --dead-threshold)")
    p.add_argument("--latents", type=int, nargs="+", default=None, help="explicit latents (overrides --n-latents)")
    p.add_argument("--dead-threshold", type=int, default=AutointerpConfig.dead_latent_threshold, help="latents need more activations than this")
    p.add_argument("--seed", type=int, default=AutointerpConfig.seed)
    p.add_argument("--temperature", type=float, default=AutointerpConfig.temperature)
    p.add_argument("--source", choices=["auto", "dashboards", "harvest"], default="auto",
                   help="examples from the SAE's built dashboards, or from a bounded harvest (auto: dashboards when built)")
    p.add_argument("--harvest-tokens", type=int, default=AutointerpConfig.harvest_tokens, help="harvest: held-out tokens")
    p.add_argument("--corpus", default="default", help="harvest: text source (default: the SAE's training corpus, eval split)")
    p.add_argument("--model-name", default=None, help="harvest: the language model (default: the SAE's cfg.model_name)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help=f"results JSON (default: SAE_DIR/{RESULT_FILE})")
    p.add_argument("--write-dashboards", action=argparse.BooleanOptionalAction, default=None,
                   help="store the explanations in the SAE's dashboards for the browser (default: yes when the dashboards are built)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from saebench import dashboards as D
    from saebench.io import write_json
    from saebench.sae import SAE

    a = build_parser().parse_args(argv)
    cfg = AutointerpConfig(n_latents=a.n_latents, latents=tuple(a.latents) if a.latents else None, dead_latent_threshold=a.dead_threshold,
                           seed=a.seed, temperature=a.temperature, source=a.source, harvest_tokens=a.harvest_tokens, corpus=a.corpus)
    sae_dir = Path(a.sae_dir)
    source = ("dashboards" if dashboards_usable(sae_dir) else "harvest") if cfg.source == "auto" else cfg.source
    llm = make_llm(a.backend, a.model, a.url, cache=False if a.no_cache else (a.cache or True), api_key_env=a.api_key_env, timeout=a.timeout,
                   max_retries=a.retries, device=a.device, price_in=a.price_in, price_out=a.price_out)
    if source == "dashboards":
        codes = codes_from_dashboards(sae_dir)
    else:
        from saebench.models import load_model

        sae = SAE.load(sae_dir, device=a.device)
        print(f"no dashboards used: harvesting {cfg.harvest_tokens:,} held-out tokens", file=sys.stderr)
        codes = codes_from_harvest(load_model(a.model_name or sae.cfg.model_name or None, device=a.device), sae, cfg, progress=not a.quiet)
    result = evaluate_autointerp(codes, llm, cfg, progress=not a.quiet)
    result["sae_dir"] = str(sae_dir)
    note = weakness_note(result)
    if note:
        result["warning"] = note
    out = Path(a.out) if a.out else sae_dir / RESULT_FILE
    write_json(out, result)
    write = a.write_dashboards if a.write_dashboards is not None else (source == "dashboards")
    if write:
        n = write_to_dashboards(sae_dir, result)
        print(f"{n} explanations written to {D.dashboard_dir(sae_dir) / D.DB_FILE}", file=sys.stderr)
    sd = result["autointerp_std_dev"]
    print(f"autointerp_score {result['autointerp_score']:.4f} ± {sd:.4f} (sd over {result['n_latents_scored']} latents; "
          f"{result['n_unparsed']} unparsed answers, skipped {result['skipped'] or 'none'}); always-'None' baseline "
          f"{result['baselines']['always_none']:.3f}; judge {result['judge']['backend']}:{result['judge']['model']}")
    if note:
        print(f"warning: {note}", file=sys.stderr)
    print(llm.usage.summary())
    print(f"results: {out}")
    return result


# --------------------------------------------------------------------------- the bench's autointerp eval: one job per SAE, one judge


def _bench_autointerp(ctx, sae, sae_dir: str) -> dict[str, Any]:
    """Examples from the SAE's dashboards when built, else a bounded harvest with the bench's model; one judge (and reply cache) per run."""
    if "llm" not in ctx.memo:
        ctx.memo["llm"] = ctx.config("judge").make(ctx.device)
    return evaluate_sae(sae_dir, sae, ctx.model, ctx.config("autointerp"), ctx.memo["llm"], progress=ctx.progress, device=ctx.device)


def _autointerp_finish(ctx) -> None:
    if ctx.progress and "llm" in ctx.memo:
        print(ctx.memo["llm"].usage.summary())


def _autointerp_figures(rows, results) -> dict[str, Any]:
    ai = {name: r["autointerp"] for name, r in results.items() if r.get("autointerp")}
    return {"autointerp": plots.autointerp_figure(ai)} if ai else {}


register(EvalSpec(
    name="autointerp", scope="sae", compute=_bench_autointerp, finish=_autointerp_finish, order=70,
    configs=(ConfigSpec("autointerp", AutointerpConfig, prefix="autointerp",
                        flags={"n_latents": ["--autointerp-latents", "--autointerp-n-latents"], "latents": ["--autointerp-latent-ids"]},
                        helps={"n_latents": "autointerp: latents sampled per SAE"},
                        choices={"source": ["auto", "dashboards", "harvest"]}),
             ConfigSpec("judge", JudgeConfig, prefix="autointerp",
                        helps={"backend": "autointerp judge: hf (local; default SmolLM2-135M-Instruct, very weak), openai (--autointerp-url/-model), keyword",
                               "model": "autointerp: judge model (hf folder/hub name, or the served model name)",
                               "url": "autointerp: OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1"},
                        choices={"backend": ["hf", "openai", "keyword"]})),
    cache_key=lambda cfgs, data: cfgs["autointerp"].to_dict() | {"judge": cfgs["judge"].to_dict()},
    columns=lambda ai: {"autointerp_score": ai.get("autointerp_score"), "autointerp_std_dev": ai.get("autointerp_std_dev"),
                        "autointerp_n_scored": ai.get("n_latents_scored"), "autointerp_n_unparsed": ai.get("n_unparsed"),
                        "autointerp_judge": f"{ai.get('judge', {}).get('backend')}:{ai.get('judge', {}).get('model')}"},
    figures=_autointerp_figures,
    command=Command("autointerp", "Explain latents with an LLM judge and score them by detection (SAEBench autointerp); local or OpenAI-compatible.",
                    "saebench.evals.autointerp:main"),
))


if __name__ == "__main__":
    main()
