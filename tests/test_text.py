"""Tests for saebench.text: corpora, splits and token packing (real SmolLM2 tokenizer, tiny texts)."""

import json
import sys
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from saebench import text
from saebench.models import get_default_tokenizer
from saebench.text import CorpusError


@pytest.fixture(scope="module")
def tok():
    return get_default_tokenizer()


DOCS = [f"Document number {i} talks about topic {i % 7} at some length." for i in range(60)]


def test_pack_shape_bos_and_eos_between_docs(tok):
    packed = text.tokenize_and_pack(DOCS, tok, context_size=16)
    assert packed.dtype == torch.long and packed.shape[1] == 16
    assert (packed[:, 0] == tok.bos_token_id).all()
    assert (packed[:, 1:] != tok.bos_token_id).all()
    # The rows without their BOS are the token stream: doc0 EOS doc1 EOS ..., last partial row dropped.
    expected = []
    for doc in DOCS:
        expected += tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    stream = packed[:, 1:].reshape(-1).tolist()
    assert packed.shape[0] == len(expected) // 15
    assert stream == expected[: len(stream)]


def test_pack_without_bos(tok):
    packed = text.tokenize_and_pack(DOCS, tok, context_size=16, prepend_bos=False)
    first = tok(DOCS[0], add_special_tokens=False)["input_ids"]
    assert packed[0, : len(first)].tolist() == first
    assert packed[0, len(first)] == tok.eos_token_id


def test_pack_respects_max_tokens(tok):
    packed = text.tokenize_and_pack(iter(DOCS * 50), tok, context_size=32, max_tokens=200)
    assert packed.shape == (6, 32)  # 200 // 32 full rows, never more than max_tokens
    with pytest.raises(ValueError):
        text.tokenize_and_pack(DOCS, tok, context_size=32, max_tokens=10)


def test_pack_too_short_corpus(tok):
    with pytest.raises(CorpusError, match="corpus too short"):
        text.tokenize_and_pack(["Just a few words."], tok, context_size=128)
    with pytest.raises(CorpusError, match="corpus too short: 0 tokens"):
        text.tokenize_and_pack([], tok, context_size=8)


def test_special_token_mask(tok):
    packed = text.tokenize_and_pack(DOCS, tok, context_size=16)
    mask = text.special_token_mask(packed, tok)
    assert mask.dtype == torch.bool and mask.shape == packed.shape
    assert mask[:, 0].all()
    assert torch.equal(
        mask,
        (packed == tok.bos_token_id)
        | (packed == tok.eos_token_id)
        | (packed == tok.pad_token_id)
        | torch.isin(packed, torch.tensor(tok.all_special_ids)),
    )
    assert 0 < mask[:, 1:].sum() < mask[:, 1:].numel()  # the EOS separators, nothing else


def test_txt_reader_splits_paragraphs(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("First para\nstill first.\n\nSecond para.\n  \n\n\nThird para.\n")
    docs = list(text._source_documents(path, "text"))
    assert docs == ["First para\nstill first.", "Second para.", "Third para."]


def test_jsonl_and_parquet_readers(tmp_path):
    rows = [{"body": f"row {i}", "id": i} for i in range(5)]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert list(text._source_documents(jsonl, "body")) == [f"row {i}" for i in range(5)]
    with pytest.raises(CorpusError, match="'text'"):
        list(text._source_documents(jsonl, "text"))

    parquet = tmp_path / "data.parquet"
    pq.write_table(pa.table({"text": [f"pq {i}" for i in range(5)] + [None], "n": list(range(6))}), parquet)
    assert list(text._source_documents(parquet, "text")) == [f"pq {i}" for i in range(5)]
    with pytest.raises(CorpusError, match="no column"):
        list(text._source_documents(parquet, "body"))


def test_directory_source_reads_supported_files_in_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("alpha one\n\nalpha two")
    (tmp_path / "b" / "c.jsonl").write_text(json.dumps({"text": "from jsonl"}) + "\n")
    pq.write_table(pa.table({"text": ["from parquet"]}), tmp_path / "b" / "d.parquet")
    (tmp_path / "notes.csv").write_text("a,b\n")  # unsupported: skipped
    assert list(text._source_documents(tmp_path, "text")) == ["alpha one", "alpha two", "from jsonl", "from parquet"]

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CorpusError, match="holds no"):
        text.iter_documents(empty)


def test_missing_or_unsupported_source(tmp_path):
    with pytest.raises(CorpusError, match="not found") as err:
        text.iter_documents(tmp_path / "nope.txt")  # raised on the call, not on first next()
    assert "hf:NAME" in str(err.value)
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(CorpusError, match="supported files"):
        text.iter_documents(tmp_path / "x.csv")
    with pytest.raises(ValueError, match="split"):
        text.iter_documents(tmp_path, split="test")


def test_train_eval_splits_are_disjoint_and_cover(tmp_path):
    paras = [f"Paragraph {i} about the number {i * i}." for i in range(400)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paras + paras[:50]))  # duplicates must land on the same side
    train = list(text.iter_documents(path, "train"))
    evals = list(text.iter_documents(path, "eval"))
    assert not set(train) & set(evals)
    assert set(train) | set(evals) == set(paras)
    assert 5 <= len(set(evals)) <= 40  # ~5% of 400
    assert list(text.iter_documents(path, "eval")) == evals  # deterministic


def test_load_tokens_from_file(tmp_path, tok):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(DOCS * 10))
    tokens = text.load_tokens(path, tok, context_size=32, n_tokens=320)
    assert tokens.shape == (10, 32) and (tokens[:, 0] == tok.bos_token_id).all()
    eval_tokens = text.load_tokens(path, tok, context_size=8, n_tokens=None, split="eval")
    assert eval_tokens.shape[1] == 8


@pytest.mark.skipif(
    not (text.FORTUNES_DIR.is_dir() or text.PYTHON_DOCS_DIR.is_dir()), reason="Debian fortunes / python3.11-doc not installed"
)
def test_default_corpus(tok):
    head = [d for _, d in zip(range(200), text.iter_documents("default"))]
    assert head == [d for _, d in zip(range(200), text.iter_documents("default"))]
    assert all(isinstance(d, str) and d.strip() == d and d for d in head)
    assert not any("\b" in d for d in head)  # fortune overstrike cleaned up
    evals = set(text.iter_documents("default", "eval"))
    assert evals and not evals & set(head)
    tokens = text.load_tokens("default", tok, context_size=64, n_tokens=64 * 20)
    assert tokens.shape == (20, 64)


def test_default_corpus_missing_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(text, "FORTUNES_DIR", tmp_path / "no-fortunes")
    monkeypatch.setattr(text, "PYTHON_DOCS_DIR", tmp_path / "no-docs")
    text._default_documents.cache_clear()
    try:
        with pytest.raises(CorpusError, match="apt-get install -y fortunes python3.11-doc"):
            text.iter_documents("default")
    finally:
        text._default_documents.cache_clear()


def test_fortune_parsing(tmp_path):
    (tmp_path / "quotes").write_text("One.\n%\nTwo _\bu_\bn_\bd_\be_\br lines\n\t-- Someone\n%\n%\nThree\n")
    (tmp_path / "quotes.dat").write_bytes(b"\x00\x01")
    (tmp_path / "off").mkdir()
    assert text._read_fortunes(tmp_path) == ["One.", "Two under lines\n\t-- Someone", "Three"]
    assert text._strip_overstrike("*____\b\b\b\bonly*") == "*only*"


def test_hf_source_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(CorpusError, match="pip install datasets"):
        text.iter_documents("hf:some/dataset")  # raised on the call


def test_hf_source_streams_and_splits(monkeypatch):
    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return iter([{"text": d} for d in DOCS] + [{"text": ""}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setattr("saebench.models._hub_reachable", lambda: True)
    docs = list(text.iter_documents("hf:org/corpus:en", "train")) + list(text.iter_documents("hf:org/corpus:en", "eval"))
    assert sorted(docs) == sorted(DOCS)
    assert calls[0] == ("org/corpus", "en", "train", True)

    monkeypatch.setattr("saebench.models._hub_reachable", lambda: False)
    with pytest.raises(CorpusError, match="not reachable"):
        text.iter_documents("hf:org/corpus")
