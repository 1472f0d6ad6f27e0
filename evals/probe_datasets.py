"""Labelled text datasets for the sparse-probing eval: offline tasks from Debian packages, SAEBench's HF sets.

A probing dataset is ``{class name: [texts]}`` for a train and a test split; the eval turns every class
into a one-vs-rest binary task (as SAEBench does). Names:

Offline (real human-written text from Debian packages; ``scripts/setup.sh`` installs them):

* ``fortunes_language`` -- language identification (like SAEBench's ``Helsinki-NLP/europarl``):
  one fortune-cookie entry per text, classes ``en`` (``fortunes``), ``de``, ``es``, ``it``, ``pl``,
  ``ru``, ``cs`` (``fortunes-de`` ... ``fortunes-cs``, the sub-folders of ``/usr/share/games/fortunes``;
  the ``off/`` collections are left out).
* ``fortunes_topic`` -- topic (like ``fancyzhx/ag_news``): the English fortune files are topical
  collections; classes ``computers``, ``science``, ``politics``, ``art``, ``work`` (the files with
  enough entries for the default sizes).
* ``python_code_prose`` -- code vs prose (like ``codeparrot/github-code``, which separates programming
  languages): the literal/code blocks of the Python 3.11 reStructuredText docs (``python3.11-doc``)
  against their prose paragraphs.

Texts shorter than ``MIN_CHARS`` are dropped and duplicates removed (a text that occurs in two
classes is dropped from both). Each class is shuffled with ``random.Random(seed)``; the first
``n_train`` texts are train and the next ``n_test`` are test.

Online: ``hf:NAME`` for SAEBench's sparse-probing datasets (``SAEBENCH_HF``: bias_in_bios class
sets 1-3, amazon reviews category and sentiment, ag_news, europarl), read with
``datasets.load_dataset`` and the classes SAEBench's ``dataset_info.chosen_classes_per_dataset``
lists; a local folder of the same name (``NAME/train.parquet`` + ``NAME/test.parquet``, as
``load_dataset`` reads local folders) stands in for the hub. ``codeparrot/github-code`` needs
``trust_remote_code`` and is not supported.

Files: a ``.jsonl`` / ``.parquet`` / ``.csv`` file (or ``train`` + ``test`` files in a folder) with a
``text`` and a ``label`` column: the user's own task.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saebench.text import FORTUNES_DIR, PYTHON_DOCS_DIR, CorpusError, _read_fortunes, _strip_overstrike

MIN_CHARS = 60
LANGUAGES = ("en", "de", "es", "it", "pl", "ru", "cs")
TOPICS = ("computers", "science", "politics", "art", "work")
OFFLINE = ("fortunes_language", "fortunes_topic", "python_code_prose")
APT_LANGUAGES = "apt-get install -y fortunes fortunes-de fortunes-es fortunes-it fortunes-pl fortunes-ru fortunes-cs"

# SAEBench's datasets (sae_bench/evals/sparse_probing/eval_config.py and sae_bench_utils/dataset_info.py).
SAEBENCH_HF: dict[str, dict[str, Any]] = {
    **{f"LabHC/bias_in_bios_class_set{i}": {"path": "LabHC/bias_in_bios", "text": "hard_text", "label": "profession", "balance": "gender",
                                            "classes": c}
       for i, c in ((1, ["0", "1", "2", "6", "9"]), (2, ["11", "13", "14", "18", "19"]), (3, ["20", "21", "22", "25", "26"]))},
    "canrager/amazon_reviews_mcauley_1and5": {"path": "canrager/amazon_reviews_mcauley_1and5", "text": "text", "label": "category",
                                              "balance": "rating", "classes": ["1", "2", "3", "5", "6"]},
    "canrager/amazon_reviews_mcauley_1and5_sentiment": {"path": "canrager/amazon_reviews_mcauley_1and5", "text": "text", "label": "rating",
                                                        "classes": ["1.0", "5.0"]},
    "fancyzhx/ag_news": {"path": "fancyzhx/ag_news", "text": "text", "label": "label", "classes": ["0", "1", "2", "3"]},
    "Helsinki-NLP/europarl": {"path": "Helsinki-NLP/europarl", "europarl": {"en": "en-fr", "fr": "fr-it", "de": "de-en", "es": "es-fr",
                                                                             "nl": "nl-pt"}, "classes": ["en", "fr", "de", "es", "nl"]},
}


@dataclass
class ProbeDataset:
    """``train`` / ``test``: class name -> texts; ``source`` says where they came from."""

    name: str
    train: dict[str, list[str]]
    test: dict[str, list[str]]
    source: str = ""

    @property
    def classes(self) -> list[str]:
        return list(self.train)


# --------------------------------------------------------------------------- offline texts


def _fortune_folder_docs(folder: Path) -> list[str]:
    docs = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder)
        if path.is_symlink() or path.suffix in (".dat", ".u8") or "off" in rel.parts[:-1]:
            continue
        text = _strip_overstrike(path.read_text(encoding="utf-8", errors="replace"))
        docs += [d.strip() for d in re.split(r"^%$", text, flags=re.MULTILINE)]
    return [d for d in docs if d]


def _language_texts() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    missing = []
    for lang in LANGUAGES:
        folder = FORTUNES_DIR if lang == "en" else FORTUNES_DIR / lang
        if not folder.is_dir():
            missing.append(lang)
            continue
        out[lang] = _read_fortunes(folder) if lang == "en" else _fortune_folder_docs(folder)
    if missing:
        raise CorpusError(f"fortunes_language needs the fortune collections for {missing} (no {FORTUNES_DIR}/<lang>). "
                          f"Install them with:\n    {APT_LANGUAGES}")
    return out


def _topic_texts() -> dict[str, list[str]]:
    out = {}
    for topic in TOPICS:
        path = FORTUNES_DIR / topic
        if not path.is_file():
            raise CorpusError(f"fortunes_topic needs {path} (Debian's 'fortunes'). Install it with:\n    apt-get install -y fortunes")
        text = _strip_overstrike(path.read_text(encoding="utf-8", errors="replace"))
        out[topic] = [d.strip() for d in re.split(r"^%$", text, flags=re.MULTILINE) if d.strip()]
    return out


_CODE_DIRECTIVE = re.compile(r"^\.\. (code-block|testcode|doctest|sourcecode|code)::")
_HEADING = re.compile(r"^([=\-~^*#+\"'`])\1{3,}\s*$")


def split_rst(text: str) -> tuple[list[str], list[str]]:
    """``(code blocks, prose paragraphs)`` of one reStructuredText file.

    Code: the indented block after a line ending in ``::`` (a literal block) or after a
    ``.. code-block::`` / ``testcode`` / ``doctest`` directive, de-indented. Prose: blank-line
    separated paragraphs at indentation 0 that are not directives (``..``), headings, tables, field
    lists or list items; a paragraph that opens a literal block keeps its text, with the ``::`` read
    as ``:`` (as rendered).
    """
    lines = text.splitlines()
    code, prose = [], []
    i, n = 0, len(lines)
    para: list[str] = []

    def flush_para():
        if para:
            p = " ".join(s.strip() for s in para)
            if not re.match(r"^([-*+|:]|\d+\.)\s", p) and not p.startswith(".."):
                prose.append(p)
            para.clear()

    while i < n:
        line = lines[i]
        opens_code = line.rstrip().endswith("::") and not line.lstrip().startswith(".. ") or _CODE_DIRECTIVE.match(line.lstrip())
        if opens_code:
            base = len(line) - len(line.lstrip())
            if not _CODE_DIRECTIVE.match(line.lstrip()) and line[:1] not in " \t" and line.strip() != "::":
                para.append(line.rstrip()[:-1])  # "For example::" reads "For example:"
            flush_para()
            j = i + 1
            if _CODE_DIRECTIVE.match(line.lstrip()):  # skip directive options (:linenos:) and the blank line after them
                while j < n and (not lines[j].strip() or (lines[j][:1] in " \t" and lines[j].strip().startswith(":"))):
                    j += 1
            block = []
            while j < n and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > base):
                block.append(lines[j])
                j += 1
            body = "\n".join(block).strip("\n")
            if body.strip():
                indent = min(len(b) - len(b.lstrip()) for b in block if b.strip())
                code.append("\n".join(b[indent:] for b in block).strip())
            i = j
            continue
        stripped = line.strip()
        if not stripped:
            flush_para()
        elif line[0] in " \t" or stripped.startswith(("..", "+-", "|")) or _HEADING.match(stripped):
            flush_para()
            if i + 1 < n and _HEADING.match(lines[i + 1].strip() or "x"):
                i += 1
        elif i + 1 < n and _HEADING.match(lines[i + 1].strip() or "x"):
            flush_para()  # a title line
            i += 1
        else:
            para.append(line)
        i += 1
    flush_para()
    return code, prose


def _code_prose_texts() -> dict[str, list[str]]:
    if not PYTHON_DOCS_DIR.is_dir():
        raise CorpusError(f"python_code_prose needs {PYTHON_DOCS_DIR} (Debian's 'python3.11-doc'). Install it with:\n"
                          "    apt-get install -y python3.11-doc")
    code, prose = [], []
    for path in sorted(p for p in PYTHON_DOCS_DIR.rglob("*") if p.is_file() and p.suffix in (".txt", ".rst")):
        c, p = split_rst(path.read_text(encoding="utf-8", errors="replace"))
        code += c
        prose += p
    return {"code": code, "prose": prose}


def _split(texts_by_class: dict[str, list[str]], n_train: int, n_test: int, seed: int, name: str) -> tuple[dict, dict]:
    """Length filter, cross-class de-duplication, seeded shuffle, train/test split per class."""
    seen: dict[str, set[str]] = {}
    for c, texts in texts_by_class.items():
        for t in texts:
            seen.setdefault(t, set()).add(c)
    train, test = {}, {}
    for c, texts in texts_by_class.items():
        kept = sorted({t for t in texts if len(t) >= MIN_CHARS and len(seen[t]) == 1})
        random.Random(f"{seed}:{c}").shuffle(kept)
        if len(kept) < n_train + n_test:
            raise CorpusError(f"{name}: class {c!r} has {len(kept)} usable texts (>= {MIN_CHARS} chars, unique), fewer than "
                              f"{n_train} train + {n_test} test; lower train_size/test_size.")
        train[c], test[c] = kept[:n_train], kept[n_train : n_train + n_test]
    return train, test


# --------------------------------------------------------------------------- HF and files


def _hf_frames(path: str, split: str):
    import datasets

    return datasets.load_dataset(path, split=split)


def _hf_dataset(name: str, n_train: int, n_test: int, seed: int) -> tuple[dict, dict, str]:
    if name not in SAEBENCH_HF:
        raise CorpusError(f"hf:{name} is not one of SAEBench's sparse-probing datasets this loader knows: {sorted(SAEBENCH_HF)}")
    try:
        import datasets  # noqa: F401
    except ImportError as e:
        raise CorpusError(f"hf:{name} needs the 'datasets' package: pip install datasets") from e
    spec = SAEBENCH_HF[name]
    local = Path(spec["path"]).is_dir()
    if not local:
        from saebench.models import _hub_reachable

        if not _hub_reachable():
            raise CorpusError(f"hf:{name} is read from the Hugging Face hub, which is not reachable (offline?). Use an offline dataset "
                              f"({', '.join(OFFLINE)}), a local .jsonl/.parquet/.csv file with text and label columns, or a local "
                              f"folder {spec['path']}/ holding train.parquet and test.parquet.")
    if "europarl" in spec:
        return (*_europarl(spec, n_train, n_test, seed, local), "local folder" if local else "hub")
    out = []
    for split, n in (("train", n_train), ("test", n_test)):
        ds = _hf_frames(spec["path"], split)
        rows: dict[str, dict[str, list[str]]] = {}
        for r in ds:
            lab = str(r[spec["label"]])
            if lab in spec["classes"]:
                rows.setdefault(lab, {}).setdefault(str(r.get(spec.get("balance"), "")), []).append(r[spec["text"]])
        by_class = {}
        for c in spec["classes"]:
            groups = rows.get(c, {})
            per = n // max(1, len(groups))
            texts = []
            for g in sorted(groups):  # SAEBench balances bias_in_bios by gender, amazon categories by rating
                pool = groups[g]
                if len(pool) < per:
                    raise CorpusError(f"hf:{name} {split}: class {c!r} group {g!r} has {len(pool)} texts, fewer than {per}")
                texts += random.Random(f"{seed}:{c}:{g}").sample(pool, per)
            if not texts:
                raise CorpusError(f"hf:{name} {split}: no rows of class {c!r} (column {spec['label']!r})")
            by_class[c] = texts
        out.append(by_class)
    return out[0], out[1], "local folder" if local else "hub"


def _europarl(spec, n_train, n_test, seed, local):
    import datasets

    by_lang: dict[str, list[str]] = {}
    for lang, pair in spec["europarl"].items():
        ds = datasets.load_dataset(spec["path"], pair, split="train", streaming=not local)
        texts = by_lang.setdefault(lang, [])
        for r in ds:
            texts.append(r["translation"][lang])
            if len(texts) > n_train + n_test:
                break
    train, test = {}, {}
    for lang in spec["classes"]:
        t = list(by_lang[lang])
        random.Random(f"{seed}:{lang}").shuffle(t)
        if len(t) < n_train + n_test:
            raise CorpusError(f"europarl: {lang!r} has {len(t)} texts, fewer than {n_train + n_test}")
        train[lang], test[lang] = t[:n_train], t[n_train : n_train + n_test]
    return train, test


def _read_rows(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix == ".csv":
        import csv

        with path.open(newline="") as f:
            return list(csv.DictReader(f))
    raise CorpusError(f"{path}: a probing file must be .jsonl, .parquet or .csv with 'text' and 'label' columns")


def _file_dataset(path: Path) -> dict[str, list[str]]:
    rows = _read_rows(path)
    if rows and not {"text", "label"} <= set(rows[0]):
        raise CorpusError(f"{path}: needs 'text' and 'label' columns, has {sorted(rows[0])}")
    out: dict[str, list[str]] = {}
    for r in rows:
        out.setdefault(str(r["label"]), []).append(str(r["text"]))
    if len(out) < 2:
        raise CorpusError(f"{path}: a probing dataset needs at least 2 labels, found {sorted(out)}")
    return out


# --------------------------------------------------------------------------- entry point


def load_probe_dataset(name: str, train_size: int = 200, test_size: int = 100, seed: int = 42) -> ProbeDataset:
    """Load one probing dataset; ``train_size`` / ``test_size`` are per binary task, as in SAEBench.

    SAEBench's sizes (4000 / 1000) are per binary task: half positives (so ``size // 2`` texts per
    class) and half negatives drawn from the other classes. The same holds here.
    """
    n_train, n_test = train_size // 2, test_size // 2
    if n_train < 1 or n_test < 1:
        raise ValueError(f"train_size and test_size must be at least 2 (got {train_size}, {test_size})")
    if name.startswith("hf:"):
        train, test, src = _hf_dataset(name[3:], n_train, n_test, seed)
        return ProbeDataset(name, train, test, f"hf ({src})")
    if name in OFFLINE:
        texts = {"fortunes_language": _language_texts, "fortunes_topic": _topic_texts, "python_code_prose": _code_prose_texts}[name]()
        train, test = _split(texts, n_train, n_test, seed, name)
        return ProbeDataset(name, train, test, "debian packages")
    path = Path(name).expanduser()
    if path.is_file():
        train, test = _split(_file_dataset(path), n_train, n_test, seed, name)
        return ProbeDataset(name, train, test, str(path))
    if path.is_dir():
        files = {s: [p for p in sorted(path.iterdir()) if p.stem == s and p.suffix in (".jsonl", ".parquet", ".csv")] for s in ("train", "test")}
        if not (files["train"] and files["test"]):
            raise CorpusError(f"{path}: a probing folder needs train.(jsonl|parquet|csv) and test.(jsonl|parquet|csv)")
        tr, te = _file_dataset(files["train"][0]), _file_dataset(files["test"][0])
        train, _ = _split(tr, n_train, 0, seed, name)
        test, _ = _split(te, n_test, 0, seed, name)
        return ProbeDataset(name, train, test, str(path))
    raise CorpusError(f"unknown probing dataset {name!r}: use one of {list(OFFLINE)}, hf:NAME for {sorted(SAEBENCH_HF)}, or a "
                      ".jsonl/.parquet/.csv file (or a folder with train/test files) with 'text' and 'label' columns")
