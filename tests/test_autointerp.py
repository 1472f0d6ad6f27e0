"""Autointerp: answer parsing, the score formula, example selection, the planted oracle, and the HTTP
client against a real OpenAI-compatible server process on 127.0.0.1 (saebench.evals.llm_server)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager

import numpy as np
import pytest
from saebench.evals import autointerp as A

from saebench.llm import LLM, Backend, LLMError, LLMTimeout, OpenAIBackend, Reply, ReplyCache, Usage, chat_endpoint

WORDS = [" the", " quick", " brown", " fox", " jumps", " over", " lazy", " dog", " cat", " tree", ".", " and"]
FOX = 3


def synthetic_codes(n_seq: int = 64, ctx: int = 64, seed: int = 0) -> A.CodeTable:
    """Latent 0 fires on every " fox" (and nothing else); latent 1 fires at random on 5% of tokens;
    latent 2 fires 10 times (below the 15-activation threshold); latent 3 never fires."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, len(WORDS), (n_seq, ctx))
    tok, feat, val = [], [], []
    for f in range(tokens.size):
        if tokens.flat[f] == FOX:
            tok.append(f), feat.append(0), val.append(1 + rng.random())
        if rng.random() < 0.05:
            tok.append(f), feat.append(1), val.append(rng.random())
        if f < 10:
            tok.append(f), feat.append(2), val.append(1.0)
    return A.CodeTable.from_flat(tokens, np.array(tok), np.array(feat), np.array(val), 4, WORDS, [], {"source": "synthetic"})


# --------------------------------------------------------------------------- parsing and the formula


@pytest.mark.parametrize("text,expected", [
    ("2, 5, 11", [2, 5, 11]),
    ("2,5,11.", [2, 5, 11]),
    ("Examples 3 and 7", [3, 7]),
    ("  None  ", []),
    ("none of them", []),
    ("None.", []),
    ("3-5, 9", [3, 4, 5, 9]),
    ("4 – 6", [4, 5, 6]),
    ("1, 1, 2, 99, 0", [1, 2]),  # duplicates merged, out-of-range numbers dropped
    ("The feature fires on 'cat'.", None),  # no number, no None: unreadable
    ("", None),
    ("15, 20", None),  # only out-of-range numbers
    ("**1**, **14**\n\nBecause they mention foxes.", [1, 14]),
    ("Excerpts 2, 9 and 12 are active.", [2, 9, 12]),
    ("[3, 4]", [3, 4]),
    # a small model echoing the numbered excerpts, or prose with numbers in it, is not a prediction
    ("1.  04430.CF9@ohioee.com↵↵↵Why don't my signal handlers work?\n2.  do two things", None),
    ("The feature responds to the token \"fox\".\n\nExcerpts:\n\n1.  dog the jumps", None),
    ("I think 3 is about foxes", None),
])
def test_parse_predictions(text, expected):
    assert A.parse_predictions(text, 14) == expected


@pytest.mark.parametrize("text,expected", [
    ("the word \"fox\" in animal lists.", "the word \"fox\" in animal lists"),
    ("The feature responds to: numbers in dates", "numbers in dates"),
    ("This neuron activates on the suffix 'ing'.", "the suffix 'ing'"),
    ("\n\n  **years in dates**\nMore text on a second line", "years in dates"),
    ("'fox'", "fox"),
    ("The feature responds to:\n\nThe feature responds to:\n\nnumbers", "numbers"),  # a small model echoing the question
    ("The feature responds to:\n\nThe feature responds to:", None),
    ("   \n  ", None),
])
def test_parse_explanation(text, expected):
    assert A.parse_explanation(text) == expected


def test_parse_explanation_caps_words():
    assert len(A.parse_explanation(" ".join(["w"] * 50), max_words=30).split()) == 30


def test_score_formula_by_hand():
    truth = [True, False, False, True, False]  # windows 1 and 4 active
    assert A.score_predictions([1, 4], truth) == 1.0
    assert A.score_predictions([], truth) == 3 / 5  # misses 2 positives
    assert A.score_predictions([1, 2, 3, 4, 5], truth) == 2 / 5  # 3 false positives
    assert A.score_predictions([2], truth) == 2 / 5  # 1 fp + 2 fn
    assert A.score_predictions([4, 5], truth) == 3 / 5
    with pytest.raises(ValueError):
        A.score_predictions([1], [])
    b = A.baselines(4, 14)
    assert b["always_none"] == pytest.approx(10 / 14) and round(b["always_none"], 3) == 0.714
    assert b["random_pick_k"] == pytest.approx((16 + 100) / 196)
    # the random-pick expectation, checked by enumeration over which 4 of 14 are picked
    from itertools import combinations

    truth14 = [True] * 4 + [False] * 10
    scores = [A.score_predictions([i + 1 for i in c], truth14) for c in combinations(range(14), 4)]
    assert np.mean(scores) == pytest.approx(b["random_pick_k"])


# --------------------------------------------------------------------------- selection


def test_selection_counts_truth_and_no_leakage():
    codes = synthetic_codes()
    cfg = A.AutointerpConfig()
    for latent in (0, 1):
        ex = A.select_examples(codes, latent, cfg)
        assert isinstance(ex, A.LatentExamples)
        kinds = [w.kind for w in ex.explain]
        assert kinds == ["top"] * 10 + ["iw"] * 5
        assert sorted(w.kind for w in ex.score) == sorted(["top"] * 2 + ["iw"] * 2 + ["random"] * 10)
        assert all(len(w.token_ids) == 21 and len(w.acts) == 21 for w in ex.explain + ex.score)
        # truth: top and IW windows active, random ones inactive (redrawn until inactive)
        assert all(w.active for w in ex.score if w.kind != "random") and not any(w.active for w in ex.score if w.kind == "random")
        # the explainer's windows: top ones by activation, then IW; the top-12 split 10 / 2 (SAEBench)
        peaks = [max(w.acts) for w in ex.explain[:10]]
        assert peaks == sorted(peaks, reverse=True)
        top_all = sorted([max(w.acts) for w in ex.explain + ex.score if w.kind == "top"], reverse=True)
        assert len(top_all) == 12
        assert min(top_all) >= max(max(w.acts) for w in ex.explain + ex.score if w.kind == "iw")
        # no text shared between the explainer's windows and the scorer's positives (no leakage)
        for s in ex.score:
            if s.kind == "random":
                continue
            assert all(not (s.seq == e.seq and abs(s.pos - e.pos) <= 2 * cfg.buffer) for e in ex.explain)
        # the window's centre is the activation it was picked for
        for w in ex.explain + ex.score:
            dense = codes.dense(latent)
            assert w.acts[cfg.buffer] == dense[w.seq, w.pos] and w.token_ids == codes.tokens[w.seq, w.pos - 10 : w.pos + 11].tolist()


def test_selection_is_seeded():
    codes = synthetic_codes()
    a = A.select_examples(codes, 1, A.AutointerpConfig(seed=1))
    b = A.select_examples(codes, 1, A.AutointerpConfig(seed=1))
    c = A.select_examples(codes, 1, A.AutointerpConfig(seed=2))
    key = lambda ex: [(w.kind, w.seq, w.pos) for w in ex.score]
    assert key(a) == key(b) and key(a) != key(c)
    # the order the scorer sees is shuffled (not top, iw, random blocks)
    orders = {tuple(w.kind for w in A.select_examples(codes, 1, A.AutointerpConfig(seed=s)).score) for s in range(5)}
    assert len(orders) > 1


def test_latent_sampling_threshold_and_reasons():
    codes = synthetic_codes()
    latents, n_alive = A.sample_latents(codes, A.AutointerpConfig(n_latents=0))
    assert latents == [0, 1] and n_alive == 2  # latent 2 has 10 activations (<= 15), latent 3 none
    assert A.sample_latents(codes, A.AutointerpConfig(n_latents=1, seed=3)) == A.sample_latents(codes, A.AutointerpConfig(n_latents=1, seed=3))
    assert A.sample_latents(codes, A.AutointerpConfig(latents=(3, 2)))[0] == [3, 2]
    with pytest.raises(ValueError, match="out of range"):
        A.sample_latents(codes, A.AutointerpConfig(latents=(9,)))
    assert "fewer than 12" in A.select_examples(codes, 2, A.AutointerpConfig())
    with pytest.raises(ValueError, match="source"):
        A.AutointerpConfig(source="web")


def test_prompts_mark_active_tokens_only_for_the_explainer():
    codes = synthetic_codes()
    ex = A.select_examples(codes, 0, A.AutointerpConfig())
    explain = A.explain_messages(codes, ex)[1]["content"]
    assert explain.count("\n") >= 15 and "<< fox>>" in explain
    assert set(__import__("re").findall(r"<<(.*?)>>", explain)) == {" fox"}
    score = A.score_messages(codes, ex, 'the token "fox"', random.Random(0))
    assert "<<" not in score[1]["content"] and "14 numbered" in score[0]["content"]
    assert [ln.split(".")[0] for ln in score[1]["content"].splitlines() if ln[:1].isdigit()] == [str(i) for i in range(1, 15)]


# --------------------------------------------------------------------------- planted judges


class NoneJudge(Backend):
    kind, model = "test", "always-none"

    def chat(self, messages, max_tokens, temperature=0.0, seed=0, usage=None):
        return Reply("Some explanation" if "<<" in messages[-1]["content"] else "None", 1, 1)


class RandomPickJudge(Backend):
    kind, model = "test", "random-4"

    def __init__(self, seed):
        self.rng = random.Random(seed)

    def chat(self, messages, max_tokens, temperature=0.0, seed=0, usage=None):
        if "<<" in messages[-1]["content"]:
            return Reply("anything", 1, 1)
        return Reply(", ".join(str(i) for i in self.rng.sample(range(1, 15), 4)), 1, 1)


def test_planted_oracle_scores_one_and_blind_judges_score_the_baselines():
    codes = synthetic_codes()
    r = A.evaluate_autointerp(codes, LLM(A.KeywordBackend()), A.AutointerpConfig(latents=(0,)), progress=False)
    assert r["latents"]["0"]["explanation"] == 'the token "fox"' and r["latents"]["0"]["score"] == 1.0
    assert r["autointerp_score"] == 1.0 and r["n_latents_scored"] == 1
    none = A.evaluate_autointerp(codes, LLM(NoneJudge()), A.AutointerpConfig(n_latents=0), progress=False)
    assert none["autointerp_score"] == pytest.approx(10 / 14) and none["autointerp_std_dev"] == 0.0
    # a judge that picks 4 windows at random: 0.592 in expectation (many latents: the fox latent, seeds)
    scores = []
    for s in range(40):
        rr = A.evaluate_autointerp(codes, LLM(RandomPickJudge(s)), A.AutointerpConfig(latents=(0, 1), seed=s), progress=False)
        scores += [v["score"] for v in rr["latents"].values()]
    assert np.mean(scores) == pytest.approx(116 / 196, abs=0.03)
    assert A.baselines(4, 14)["random_pick_k"] < 10 / 14 < 1.0


def test_unparsed_answers_are_dropped_and_counted():
    class Junk(Backend):
        kind, model = "test", "junk"

        def chat(self, messages, max_tokens, temperature=0.0, seed=0, usage=None):
            return Reply("foxes" if "<<" in messages[-1]["content"] else "I cannot tell.", 1, 1)

    r = A.evaluate_autointerp(synthetic_codes(), LLM(Junk()), A.AutointerpConfig(n_latents=0), progress=False)
    assert r["n_unparsed"] == 2 and r["n_latents_scored"] == 0 and np.isnan(r["autointerp_score"])
    assert r["latents"]["0"]["raw_prediction"] == "I cannot tell." and r["latents"]["0"]["score"] is None


# --------------------------------------------------------------------------- the HTTP path, against a real server


@contextmanager
def llm_server(*args: str, backend: str = "keyword", timeout: float = 120.0):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "saebench.evals.llm_server", "--backend", backend, "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        if not line.startswith("listening on "):
            proc.kill()
            raise RuntimeError(f"server did not start: {line!r} {proc.stderr.read()[-2000:]}")
        yield line.split()[2]
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def server_stats(url: str) -> dict:
    with urllib.request.urlopen(url.rsplit("/v1", 1)[0] + "/stats", timeout=10) as r:
        return json.loads(r.read())


def test_chat_endpoint_forms():
    assert chat_endpoint("http://h:1") == "http://h:1/v1/chat/completions"
    assert chat_endpoint("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert chat_endpoint("https://h/v1/chat/completions") == "https://h/v1/chat/completions"
    with pytest.raises(ValueError, match="http"):
        chat_endpoint("h:1/v1")


def test_http_eval_matches_direct_and_second_run_is_served_from_cache(tmp_path):
    codes = synthetic_codes()
    cfg = A.AutointerpConfig(n_latents=0)
    direct = A.evaluate_autointerp(codes, LLM(A.KeywordBackend()), cfg, progress=False)
    with llm_server() as url:
        cache = ReplyCache(tmp_path / "cache.sqlite")
        first = LLM(OpenAIBackend(url, "marked-token-match"), cache)
        r1 = A.evaluate_autointerp(codes, first, cfg, progress=False)
        assert first.usage.http_calls == 4 and first.usage.cache_hits == 0 and len(cache) == 4
        assert server_stats(url)["requests"] == 4
        second = LLM(OpenAIBackend(url, "marked-token-match"), ReplyCache(tmp_path / "cache.sqlite"))
        r2 = A.evaluate_autointerp(codes, second, cfg, progress=False)
        assert second.usage.http_calls == 0 and second.usage.cache_hits == 4 and second.usage.backend_calls == 0
        assert server_stats(url)["requests"] == 4  # the server saw nothing new
        # another sampling parameter is another cache key
        third = LLM(OpenAIBackend(url, "marked-token-match"), ReplyCache(tmp_path / "cache.sqlite"))
        A.evaluate_autointerp(codes, third, A.AutointerpConfig(n_latents=0, temperature=0.5), progress=False)
        assert third.usage.http_calls == 4
    for r in (r1, r2):
        assert {k: v["score"] for k, v in r["latents"].items()} == {k: v["score"] for k, v in direct["latents"].items()}
    assert r1["latents"]["0"]["score"] == 1.0
    assert first.usage.prompt_tokens > 0 and "4 answered by the backend (4 HTTP calls" in first.usage.summary()
    assert r1["judge"]["url"].endswith("/v1/chat/completions") and r1["judge"]["backend"] == "openai"


def test_retries_with_backoff_after_two_failures():
    with llm_server("--fail-first", "2") as url:
        llm = LLM(OpenAIBackend(url, "m", max_retries=3, backoff=0.01))
        r = llm.chat([{"role": "user", "content": "Explanation: \"fox\"\n\n1. a fox\n2. a dog"}], 10)
        assert r.text == "1"
        assert llm.usage.http_calls == 3 and llm.usage.retries == 2 and llm.usage.backend_calls == 1
        assert server_stats(url) == {"requests": 3, "answered": 1}


def test_retries_exhausted_and_refused_requests_say_why():
    with llm_server("--fail-first", "10") as url:
        b = OpenAIBackend(url, "m", max_retries=1, backoff=0.01)
        with pytest.raises(LLMError, match=r"failed 2 times \(last: HTTP 503"):
            b.chat([{"role": "user", "content": "hi"}], 5)
    with llm_server("--fail-first", "1", "--fail-status", "401") as url:
        usage = Usage()
        with pytest.raises(LLMError, match=r"refused the request: HTTP 401.*OPENAI_API_KEY"):
            OpenAIBackend(url, "m", max_retries=3, backoff=0.01).chat([{"role": "user", "content": "hi"}], 5, usage=usage)
        assert usage.http_calls == 1  # 4xx other than 408/409/425/429 is not retried
    with llm_server() as url, pytest.raises(LLMError, match="404.*check --url"):
        OpenAIBackend(url.replace("/v1", "/nope"), "m", max_retries=0).chat([{"role": "user", "content": "hi"}], 5)


def test_timeout_gives_a_clear_error():
    with llm_server("--delay", "3") as url:
        b = OpenAIBackend(url, "m", timeout=0.4, max_retries=1, backoff=0.01)
        t = time.time()
        with pytest.raises(LLMTimeout, match=r"did not answer within 0.4 s on any of 2 tries; raise --timeout"):
            b.chat([{"role": "user", "content": "hi"}], 5)
        assert time.time() - t < 3


def test_connection_refused_is_an_error_not_a_hang():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(LLMError, match="cannot connect"):
        OpenAIBackend(f"http://127.0.0.1:{port}/v1", "m", max_retries=1, backoff=0.01, timeout=2).chat([{"role": "user", "content": "hi"}], 5)


def test_api_key_is_sent_and_never_recorded(monkeypatch):
    monkeypatch.setenv("SAEBENCH_TEST_KEY", "sk-secret")
    b = OpenAIBackend("http://127.0.0.1:1/v1", "m", api_key_env="SAEBENCH_TEST_KEY")
    assert b._request(b"{}").get_header("Authorization") == "Bearer sk-secret"
    assert "sk-secret" not in json.dumps(b.describe()) and b.describe()["api_key_set"] is True


# --------------------------------------------------------------------------- dashboards, CLI, bench and the app (tiny model)


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_model_dir, tiny_model):
    import dashboard_fixture as F

    return F.build_root(tmp_path_factory.mktemp("autointerp") / "root", tiny_model_dir, tiny_model)


def test_dashboard_codes_equal_a_fresh_harvest(root, tiny_model):
    import dashboard_fixture as F

    from saebench import dashboards as D
    from saebench.sae import SAE

    sae_dir = root / "saes" / "topk"
    dash = A.codes_from_dashboards(sae_dir)
    db = D.Dashboard(D.dashboard_dir(sae_dir))
    assert dash.tokens.shape == (F.N_TOKENS // F.CTX, F.CTX) and dash.origin["source"] == "dashboards"
    assert np.array_equal(dash.n_active(), db.stats()["n_active"])
    top = db.examples(F.PLANTED, "top")[0]
    assert dash.dense(F.PLANTED).max() == pytest.approx(top.value) and dash.dense(F.PLANTED)[top.seq, top.pos] == pytest.approx(top.value)
    fresh = A.codes_from_harvest(tiny_model, SAE.load(sae_dir), A.AutointerpConfig(harvest_tokens=F.N_TOKENS, context_size=F.CTX), progress=False)
    assert fresh.origin["source"] == "harvest" and np.array_equal(fresh.tokens, dash.tokens)
    assert np.array_equal(fresh.n_active(), dash.n_active())
    np.testing.assert_allclose(fresh.dense(F.PLANTED), dash.dense(F.PLANTED), rtol=1e-5, atol=1e-6)


def test_explanations_in_dashboards_are_stored_updated_and_searchable(root):
    import dashboard_fixture as F

    from saebench import dashboards as D

    sae_dir = root / "saes" / "abstopk"
    db = D.Dashboard(D.dashboard_dir(sae_dir))
    assert db.explanation(3) is None and db.search_explanations("fox").hits == []  # no table yet: no error
    db.write_explanations([(3, 'the token "fox"', 0.93, "keyword:m", "keyword:m", {"n_scoring": 14}), (4, "numbers in dates", None, "a", "b", {})])
    e = db.explanation(3)
    assert e["text"] == 'the token "fox"' and e["score"] == 0.93 and e["details"] == {"n_scoring": 14} and e["explainer"] == "keyword:m"
    assert db.search_explanations("fox").hits == [3] and db.search_explanations("dates numbers").hits == [4]
    db.write_explanations([(3, "a cat on a fence", 0.5, "x", "x", None)])  # replaces: the search index follows
    assert db.search_explanations("fox").hits == [] and db.search_explanations("fence").hits == [3]
    assert set(db.explanations([3, 4, 5])) == {3, 4}
    with pytest.raises(ValueError, match="out of range"):
        db.write_explanations([(F.N_TOKENS, "x", None, "a", "a", {})])


def scorable(root, n: int = 2) -> list[int]:
    """Latents of the fixture's TopK SAE that have enough windows (its planted latent is too dense at ctx 32)."""
    codes = A.codes_from_dashboards(root / "saes" / "topk")
    return [i for i in range(codes.d_sae) if isinstance(A.select_examples(codes, i, A.AutointerpConfig()), A.LatentExamples)][:n]


def test_cli_autointerp_on_dashboards_writes_json_and_explanations(root, capsys):
    import dashboard_fixture as F

    from saebench import cli
    from saebench import dashboards as D

    sae_dir = root / "saes" / "topk"
    out = root / "ai.json"
    good = scorable(root)
    assert len(good) == 2
    assert cli.main(["autointerp", str(sae_dir), "--backend", "keyword", "--latents", str(F.PLANTED), *map(str, good), "--no-cache",
                     "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr()
    r = json.loads(out.read_text())
    assert r["skipped_latents"] == {str(F.PLANTED): "no inactive random windows (the latent is active almost everywhere)"}
    assert set(r["latents"]) == {str(i) for i in good} and r["data"]["source"] == "dashboards" and r["n_latents_scored"] == 2
    assert r["judge"]["backend"] == "keyword" and r["prompts"]["version"] == A.PROMPT_VERSION and r["seeds"]["seed"] == 42
    assert "autointerp_score" in text.out and "LLM usage: 4 requests" in text.out and "2 explanations written" in text.err
    db = D.Dashboard(D.dashboard_dir(sae_dir))
    for i in good:
        e = db.explanation(i)
        assert e["text"] == r["latents"][str(i)]["explanation"] and e["text"].startswith("the token")
        assert e["score"] == r["latents"][str(i)]["score"] and e["explainer"] == "keyword:marked-token-match"
    # a clear one-line error for a bad backend configuration
    assert cli.main(["autointerp", str(sae_dir), "--backend", "openai", "--model", "m", "--quiet"]) == 2
    assert "needs --url" in capsys.readouterr().err


def test_cli_autointerp_harvests_without_dashboards(root, capsys):
    from saebench import cli

    out = root / "ai_nodash.json"
    assert cli.main(["autointerp", str(root / "saes" / "nodash"), "--backend", "keyword", "--n-latents", "3", "--harvest-tokens", "2048",
                     "--no-cache", "--out", str(out), "--quiet"]) == 0
    r = json.loads(out.read_text())
    assert r["data"]["source"] == "harvest" and r["data"]["n_tokens"] == 2048 and "explanations written" not in capsys.readouterr().err


def test_bench_autointerp_column_figure_and_cache(root, tiny_model, tmp_path):

    from saebench.evals.bench import run_bench

    kw = {"model": tiny_model, "out_dir": tmp_path / "bench", "progress": False, "autointerp": A.AutointerpConfig(latents=tuple(scorable(root))),
              "judge": A.JudgeConfig("keyword", cache=str(tmp_path / "c.sqlite"))}
    res = run_bench([root / "saes" / "topk"], ["autointerp"], **kw)
    row = res.rows[0]
    assert row["autointerp_score"] == res.results[str(root / "saes" / "topk")]["autointerp"]["autointerp_score"]
    assert row["autointerp_judge"] == "keyword:marked-token-match" and row["autointerp_n_scored"] >= 1
    fig = (tmp_path / "bench" / "figures" / "autointerp.html").read_text()
    assert "detection score" in fig and res.files["figure:autointerp"].exists()
    again = run_bench([root / "saes" / "topk"], ["autointerp"], **kw)
    assert again.computed == [] and again.rows[0]["autointerp_score"] == row["autointerp_score"]


def test_app_shows_and_searches_automatic_explanations(root, monkeypatch):
    import dashboard_fixture as F

    from saebench import dashboards as D

    pytest.importorskip("streamlit")
    db = D.Dashboard(D.dashboard_dir(root / "saes" / "topk"))
    db.write_explanations([(F.PLANTED, 'the token "fox" <script>x</script>', 0.857, "hf:SmolLM2-135M-Instruct", "hf:SmolLM2-135M-Instruct",
                            {"n_scoring": 14})])
    at = F.open_app(monkeypatch, root, sae="saes/topk", feature=F.PLANTED)
    body = F.html(at)
    assert 'id="auto-explanation"' in body and "Automatic explanation (autointerp" in body and "detection score 0.86 on 14 windows" in body
    assert "hf:SmolLM2-135M-Instruct" in body and "&lt;script&gt;" in body and "<script>x" not in body
    assert 'id="auto-summary"' in body  # next to the statistical summary
    # a latent without an explanation says how to get one
    other = next(i for i in range(1, 96) if i not in (F.PLANTED, F.DEAD) and db.explanation(i) is None)
    at.sidebar.number_input(key="feature").set_value(other).run()
    assert any("saebench autointerp" in c.value and f"--latents {other}" in c.value for c in at.caption)
    # the search page finds it by the explanation's words
    at.sidebar.radio(key="page").set_value("Search").run()
    at.radio(key="search_mode").set_value("Label / explanation").run()
    at.text_input(key="search_query").input("fox")
    at.button[0].click().run()
    assert not at.exception
    body = "\n".join(h.proto.body for h in at.html)
    assert 'data-hit="explanation"' in body and "the token &quot;fox&quot;" in body
    assert any(b.label == f"#{F.PLANTED}" for b in at.button)


# --------------------------------------------------------------------------- the HF backend


def test_hf_backend_on_the_tiny_model_is_deterministic_and_bounded(tiny_model_dir):
    from saebench.llm import HFBackend

    b = HFBackend(str(tiny_model_dir))
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Excerpts:\n\n1. a <<fox>> ran"}]
    r1, r2 = b.chat(msgs, 7), b.chat(msgs, 7)
    assert r1.text == r2.text and r1.completion_tokens <= 7 and r1.prompt_tokens > 10  # greedy at temperature 0
    assert b.chat(msgs, 7, temperature=1.0, seed=3).text == b.chat(msgs, 7, temperature=1.0, seed=3).text  # seeded sampling
    assert b.describe()["n_parameters"] > 0
    with pytest.raises(ValueError, match="chat message"):
        b.chat([{"role": "robot", "content": "x"}], 5)


@pytest.mark.slow
def test_hf_judge_behind_the_local_server_answers_real_prompts():
    """The real SmolLM2-135M-Instruct served over HTTP by saebench.evals.llm_server: one explanation and one detection answer."""
    codes = synthetic_codes()
    ex = A.select_examples(codes, 0, A.AutointerpConfig())
    with llm_server(backend="hf") as url:
        llm = LLM(OpenAIBackend(url, "SmolLM2-135M-Instruct", timeout=300, max_retries=0))
        e = llm.chat(A.explain_messages(codes, ex), 30)
        s = llm.chat(A.score_messages(codes, ex, 'the token "fox"', random.Random(0)), 40)
    assert e.text and 0 < e.completion_tokens <= 30 and e.prompt_tokens > 300
    assert s.text and 0 < s.completion_tokens <= 40
    assert llm.usage.http_calls == 2 and llm.usage.prompt_tokens == e.prompt_tokens + s.prompt_tokens


def test_cli_help_shows_defaults(capsys):
    from saebench import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["autointerp", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: hf)" in out and "(default: 50)" in out and "very weak judge" in out and "ollama" in out
