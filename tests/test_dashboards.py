"""Dashboard precompute and query layer: checked against brute force on a tiny model and SAE."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import dashboard_fixture as F
import numpy as np
import pytest
import torch
from saebench.app import launch
from saebench.evals.results import load_eval_results

from saebench import dashboards as D
from saebench.dashboards import build as DB
from saebench.dashboards import store as DS
from saebench.io import ArtifactError
from saebench.layout import WEIGHTS_FILE
from saebench.sae import SAE
from saebench.text import special_ids


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_model_dir, tiny_model):
    return F.build_root(tmp_path_factory.mktemp("browse") / "root", tiny_model_dir, tiny_model)


@pytest.fixture(scope="module", params=["topk", "abstopk"])
def case(request, root, tiny_model):
    """(Dashboard, SAE, dense activations [n_seq*ctx, d_sae] with special positions zeroed)."""
    folder = root / "saes" / request.param
    db = D.Dashboard(folder / D.DASHBOARD_DIR)
    sae = SAE.load(folder)
    toks = torch.from_numpy(np.asarray(db.tokens()).astype(np.int64))
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(toks, names_filter=lambda n: n == F.HOOK, stop_at_layer=1)
        dense = sae.encode(cache[F.HOOK].float()).reshape(-1, sae.d_sae)
    special = special_ids(tiny_model.tokenizer)
    dense[torch.isin(toks.flatten(), special)] = 0
    return db, sae, dense


def test_provenance_recorded(case):
    db, sae, dense = case
    p = db.provenance
    assert p["hook_name"] == F.HOOK and p["context_size"] == F.CTX and p["split"] == "eval"
    assert p["corpus"].endswith("corpus.txt") and p["model"]
    assert p["n_positions"] == dense.shape[0] == F.N_TOKENS
    assert p["n_tokens"] < F.N_TOKENS  # BOS/EOS positions were masked
    assert db.complete and not (db.folder / D.CODES_FILE).exists()
    assert p["signed"] == sae.cfg.signed


def test_density_counts_and_flags(case):
    db, sae, dense = case
    n_valid = db.provenance["n_tokens"]
    active = (dense != 0).sum(0)
    stats = db.stats()
    for i in range(sae.d_sae):
        f = db.feature(i)
        assert f.n_active == int(active[i]) == stats["n_active"][i]
        assert f.density == pytest.approx(int(active[i]) / n_valid)
        assert f.dead == (active[i] == 0)
        assert f.dense == (f.density > 0.1)
        if not f.dead:
            assert sum(f.act_hist["counts"]) == f.n_active
            nz = dense[:, i][dense[:, i] != 0]
            assert f.max_act == pytest.approx(float(nz.max()), rel=1e-5)
            assert f.min_act == pytest.approx(float(nz.min()), rel=1e-5)
    if sae.cfg.architecture == "topk":
        f = db.feature(F.DEAD)
        assert f.dead and f.n_active == 0 and db.examples(F.DEAD) == [] and f.logits_pos  # decoder facts still there


def test_top_examples_are_the_true_top(case):
    db, sae, dense = case
    ctx = F.CTX
    for i in range(sae.d_sae):
        col = dense[:, i]
        top = db.examples(i, "top")
        pos_vals = col[col > 0]
        want = torch.sort(pos_vals, descending=True).values[: len(top)]
        assert len(top) == min(20, len(pos_vals))
        got = torch.tensor([e.value for e in top])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for e in top:
            assert col[e.seq * ctx + e.pos].item() == pytest.approx(e.value, rel=1e-5)
            # the stored window is the latent's activation on the neighbouring tokens
            window = col[e.seq * ctx + e.start : e.seq * ctx + e.start + len(e.acts)]
            torch.testing.assert_close(torch.tensor(e.acts), window, rtol=1e-5, atol=1e-6)
            assert e.start <= e.pos < e.start + len(e.acts) and e.tokens[e.peak_index] == db.token_str(e.token_ids[e.peak_index])
        if sae.cfg.signed:
            bottom = db.examples(i, "bottom")
            neg = torch.sort(col[col < 0]).values[: len(bottom)]
            assert len(bottom) == min(20, int((col < 0).sum()))
            torch.testing.assert_close(torch.tensor([e.value for e in bottom]), neg, rtol=1e-5, atol=1e-6)


def test_interval_samples_lie_in_their_bins(case):
    db, sae, _ = case
    n_with_neg = 0
    for i in range(sae.d_sae):
        f = db.feature(i)
        if f.dead:
            continue
        assert sum(iv["count"] for iv in f.intervals) == f.n_active
        assert sum(iv["fraction"] for iv in f.intervals) == pytest.approx(1.0)
        bins = {iv["bin"]: iv for iv in f.intervals}
        assert sum(1 for b in bins if b < 5) in (0, 5)
        n_with_neg += any(b >= 5 for b in bins)
        inter = db.examples(i, "interval")
        per_bin: dict[int, int] = {}
        for e in inter:
            iv = bins[e.bin]
            assert iv["lo"] - 1e-6 <= e.value <= iv["hi"] + 1e-6, (i, e.value, iv)
            assert (e.value > 0) == (iv["hi"] > 0)
            per_bin[e.bin] = per_bin.get(e.bin, 0) + 1
        for b, iv in bins.items():
            assert per_bin.get(b, 0) == min(5, iv["count"])
    assert (n_with_neg > 0) == sae.cfg.signed


def test_logit_effects_and_neighbours_match_brute_force(case, tiny_model):
    db, sae, dense = case
    W_dec = sae.W_dec.detach()
    eff = W_dec @ tiny_model.W_U.detach().float()
    unit = W_dec / W_dec.norm(dim=-1, keepdim=True)
    cos = unit @ unit.T
    cos.fill_diagonal_(-math.inf)
    toks = torch.from_numpy(np.asarray(db.tokens()).astype(np.int64)).flatten()
    x = dense[~torch.isin(toks, special_ids(tiny_model.tokenizer))].double()  # the non-special tokens
    with np.errstate(invalid="ignore", divide="ignore"):  # dead latents have zero variance
        corr = torch.from_numpy(np.nan_to_num(np.corrcoef(x.T.numpy()), nan=-np.inf))
    cooc = ((x != 0).double().T @ (x != 0).double()) > 0
    corr[~cooc] = -math.inf  # neighbours are drawn from latents that fire together
    corr.fill_diagonal_(-math.inf)
    for i in (0, 3, 7, sae.d_sae - 1):
        f = db.feature(i)
        want = eff[i].topk(10)
        assert [v for _, v in f.logits_pos] == pytest.approx(want.values.tolist(), abs=1e-4)
        assert [t for t, _ in f.logits_pos] == [db.token_str(int(j)) for j in want.indices]
        assert [v for _, v in f.logits_neg] == pytest.approx((-(-eff[i]).topk(10).values).tolist(), abs=1e-4)
        assert sum(f.logit_hist["counts"]) == eff.shape[1]
        assert [j for j, _ in f.cos_neighbours] == cos[i].topk(10).indices.tolist()
        if not f.dead:
            top = corr[i].topk(10)
            want_corr = [(int(j), float(v)) for j, v in zip(top.indices, top.values) if v > 0]
            assert [j for j, _ in f.corr_neighbours] == [j for j, _ in want_corr]
            assert [v for _, v in f.corr_neighbours] == pytest.approx([v for _, v in want_corr], abs=1e-4)


def _dump(folder: Path) -> dict:
    con = sqlite3.connect(folder / D.DB_FILE)
    out = {}
    for t in ("vocab", "features", "examples", "feature_tokens", "fire_words", "summaries"):
        out[t] = con.execute(f"SELECT * FROM {t} ORDER BY 1, 2, 3").fetchall() if t != "vocab" else con.execute("SELECT * FROM vocab").fetchall()
    out["fts"] = con.execute("SELECT rowid, tokens, contexts FROM examples_fts ORDER BY rowid").fetchall()
    out["summary_fts"] = con.execute("SELECT rowid, text FROM summary_fts ORDER BY rowid").fetchall()
    from safetensors.torch import load_file

    out["token_codes"] = {k: v.tolist() for k, v in load_file(str(folder / D.TOKEN_CODES_FILE)).items()}
    out["batches"] = con.execute("SELECT batch, first, stop FROM batches ORDER BY batch").fetchall()
    meta = dict(con.execute("SELECT key, value FROM meta"))
    for k in ("timings", "provenance"):
        meta.pop(k)
    out["meta"] = meta
    con.close()
    with np.load(folder / D.STATS_FILE) as z:
        out["stats"] = {k: z[k].tolist() for k in z.files}
    out["tokens"] = np.load(folder / D.TOKENS_FILE).tolist()
    return out


def test_interrupted_build_resumes_to_the_same_database(root, tiny_model, tmp_path, monkeypatch):
    sae_dir = root / "saes" / "topk"
    reference = _dump(sae_dir / D.DASHBOARD_DIR)
    out = tmp_path / "dash"
    real_write = DB._write_batch
    written = []

    def crash_after_two(con, b, *a, **k):
        if len(written) == 2:
            raise KeyboardInterrupt("simulated kill")
        real_write(con, b, *a, **k)
        written.append(b)

    monkeypatch.setattr(DB, "_write_batch", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        D.build_dashboards(sae_dir, model=tiny_model, n_tokens=F.N_TOKENS, feature_batch_size=32, progress=False, out_dir=out)
    partial = D.Dashboard(out)
    assert not partial.complete and partial.done_batches == 2 and (out / D.CODES_FILE).exists()
    assert partial.feature(0) is not None and partial.feature(95) is None

    computed = []
    real_compute = DB._compute_batch
    monkeypatch.setattr(DB, "_write_batch", real_write)
    monkeypatch.setattr(DB, "_compute_batch", lambda b, *a, **k: computed.append(b) or real_compute(b, *a, **k))
    monkeypatch.setattr(DB, "harvest_codes", lambda *a, **k: pytest.fail("resume must reuse the harvested codes"))
    D.build_dashboards(sae_dir, model=tiny_model, n_tokens=F.N_TOKENS, feature_batch_size=32, progress=False, out_dir=out)
    assert computed == [2]  # only the unfinished batch
    assert _dump(out) == reference
    # a finished build is returned as is
    computed.clear()
    D.build_dashboards(sae_dir, model=tiny_model, n_tokens=F.N_TOKENS, feature_batch_size=32, progress=False, out_dir=out)
    assert computed == []


def test_other_settings_refuse_to_resume_and_rebuild_keeps_labels(root, tiny_model, tmp_path):
    sae_dir = root / "saes" / "abstopk"
    out = tmp_path / "dash"
    D.build_dashboards(sae_dir, model=tiny_model, n_tokens=1024, feature_batch_size=48, progress=False, out_dir=out)
    D.Dashboard(out).set_label(3, "kept label")
    with pytest.raises(ArtifactError, match="other settings.*options"):
        D.build_dashboards(sae_dir, model=tiny_model, n_tokens=2048, feature_batch_size=48, progress=False, out_dir=out)
    D.build_dashboards(sae_dir, model=tiny_model, n_tokens=2048, feature_batch_size=48, progress=False, out_dir=out, resume=False)
    db = D.Dashboard(out)
    assert db.provenance["n_positions"] == 2048 and db.label(3) == ("kept label", "")


def test_search_text_token_and_labels(root):
    db = D.Dashboard(root / "saes" / "topk" / D.DASHBOARD_DIR)
    hits = db.search_token(" Fox ")
    assert hits and hits[0].feature == F.PLANTED and [t.strip() for t in hits[0].tokens] == ["fox"]
    for f, _, n, _, _ in hits:
        peaks = [e.tokens[e.peak_index].strip().lower() for e in db.examples(f, "top")]
        assert peaks.count("fox") == n
    text_hits = db.search_text("fox")
    assert F.PLANTED in [f for f, _ in text_hits] and all("⟦" in s for _, s in text_hits)
    # FTS syntax in user input is treated as plain words, never as an error
    for q in ['"', "fox AND", "NEAR(", "*", "<script>", "fox OR -dog", ""]:
        db.search_text(q)
        db.search_labels(q)
    assert db.search_token("no-such-token-xyz") == []

    db.set_label(11, "Animal words", "Fires on foxes and dogs")
    db.set_label(12, "River", "")
    assert [f for f, *_ in db.search_labels("foxes")] == [11]
    assert [f for f, *_ in db.search_labels("animal")] == [11]
    db.set_label(11, "Canines", "dogs")
    assert db.search_labels("animal") == [] and db.label(11) == ("Canines", "dogs")
    assert db.labels([11, 12, 13]) == {11: "Canines", 12: "River"}
    db.set_label(12, "", "")
    assert db.label(12) == ("", "") and db.search_labels("river") == []
    with pytest.raises(ValueError):
        db.set_label(10_000, "x")
    db.set_label(11, "", "")


def test_navigation_only_live(root):
    db = D.Dashboard(root / "saes" / "topk" / D.DASHBOARD_DIR)
    assert db.step(F.DEAD - 1, 1, live_only=True) == F.DEAD + 1
    assert db.step(F.DEAD + 1, -1, live_only=True) == F.DEAD - 1
    assert db.step(F.DEAD - 1, 1) == F.DEAD
    assert db.step(95, 1) == 0 and db.step(0, -1) == 95
    import random

    rng = random.Random(0)
    assert all(not db.feature(db.random_feature(rng, live_only=True)).dead for _ in range(30))


def test_prompt_activations_match_the_sae(root, tiny_model):
    sae = SAE.load(root / "saes" / "topk")
    acts = D.prompt_activations(tiny_model, sae, "the quick brown fox")
    assert acts.special[0] and not any(acts.special[1:]) and acts.tokens[0] == "<|im_start|>"
    toks = tiny_model.to_tokens("the quick brown fox")
    _, cache = tiny_model.run_with_cache(toks, names_filter=lambda n: n == F.HOOK)
    dense = sae.encode(cache[F.HOOK][0].float())
    assert acts.latent(F.PLANTED)[1:] == pytest.approx(dense[1:, F.PLANTED].tolist(), abs=1e-5)
    assert acts.latent(F.PLANTED)[0] == 0
    top = D.top_latents_per_token(acts, 3)
    assert top[0] == [] and all(len(t) == 3 for t in top[1:])
    assert top[-1][0][0] == F.PLANTED  # " fox"


def test_find_saes_stays_inside_the_root(root, tmp_path):
    rels = [e.rel for e in D.find_saes(root)]
    assert rels == ["saes/abstopk", "saes/nodash", "saes/topk", "saes/topk_perm"]
    assert D.resolve_sae(root, "saes/topk").path == (root / "saes" / "topk").resolve()
    for bad in ("../root/saes/topk", "/etc", str(root / "saes" / "topk"), "saes/../saes/topk", "", None):
        assert D.resolve_sae(root, bad) is None
    # a symlink leading outside the root is not followed
    outside = tmp_path / "outside"
    SAE.load(root / "saes" / "nodash").save(outside / "secret")
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "link").symlink_to(outside)
    assert D.find_saes(inner) == []


def test_eval_results_and_commands(root):
    recs = load_eval_results(root)
    assert {r.get("sae") for r in recs if "sae" in r} == {"saes/topk", "saes/abstopk"}
    assert {r["name"] for r in recs if "name" in r} == {"bench-a", "bench-b"}
    assert all("source" in r and "l0" in r for r in recs)
    assert D.build_command("/x/my sae") == "saebench dashboards '/x/my sae'"
    cmd = launch.browse_command(root, port=8600)
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1" and cmd[-1] == str(root.resolve())
    assert load_eval_results(root / "saes" / "nodash") == []


def test_eval_results_read_bench_tables_once(root, tmp_path):
    import json as _json
    import shutil

    r = tmp_path / "r"
    shutil.copytree(root / "saes" / "topk", r / "saes" / "topk", ignore=shutil.ignore_patterns(D.DASHBOARD_DIR))
    rows = [{"sae": "topk", "sae_dir": str(r / "saes" / "topk"), "method": "topk", "l0": 6.0, "fvu": 0.3, "ce_loss_score": 0.8}]
    (r / "bench").mkdir()
    (r / "bench" / "results.json").write_text(_json.dumps(rows))
    (r / "bench" / "results.csv").write_text("sae,sae_dir,method,l0,fvu,ce_loss_score\ntopk,x,topk,6.0,0.3,0.8\n")
    recs = load_eval_results(r)
    # both sources of the same SAE are kept, each naming its file: never one silently replacing the other
    assert sorted(x["source"] for x in recs) == ["bench/results.json", "saes/topk/eval_core.json"]
    assert {x["sae"] for x in recs} == {"saes/topk"} and {x["eval"] for x in recs} == {"bench", "core"}
    (r / "bench" / "results.json").unlink()
    recs = load_eval_results(r)
    assert sorted(x["source"] for x in recs) == ["bench/results.csv", "saes/topk/eval_core.json"]
    assert next(x for x in recs if x["source"] == "bench/results.csv")["l0"] == 6.0


# ---- issue 19 / 14: search, summaries, compare, discovery ---------------------------------------------


def _expected_token_hits(db):
    """Brute force from the stored top examples: normalised token -> {latent: top examples peaking on it}."""
    out: dict[str, dict[int, int]] = {}
    for f in range(db.d_sae):
        for e in db.examples(f, "top"):
            key = e.tokens[e.peak_index].strip().casefold()
            out.setdefault(key, {}).setdefault(f, 0)
            out[key][f] += 1
    return out


def test_token_search_over_the_whole_vocabulary(root):
    """Every token of the vocabulary: one hit per latent (no duplicates, which crashed the app with
    StreamlitDuplicateElementKey), counts equal to the stored top examples."""
    db = D.Dashboard(root / "saes" / "topk" / D.DASHBOARD_DIR)
    expected = _expected_token_hits(db)
    vocab = db.vocab()
    assert len(vocab) > 40_000
    seen_keys = set()
    for tok in vocab:
        key = tok.strip().casefold()
        if key in seen_keys:
            continue
        seen_keys.add(key)
        hits = db.search_token(tok)
        feats = [h.feature for h in hits]
        assert len(feats) == len(set(feats)), tok
        assert {h.feature: h.n for h in hits} == expected.get(key, {}) if key else hits == [], tok
        assert [(-h.n, -h.max_value) for h in hits] == sorted((-h.n, -h.max_value) for h in hits)
    # the case that crashed: one latent peaking on two spellings of the same word is one hit listing both
    multi = [(k, h) for k in expected for h in db.search_token(k) if len(h.tokens) > 1]
    assert multi and all(len({t.strip().casefold() for t in h.tokens}) == 1 for _, h in multi)


def test_text_search_ranks_where_the_latent_fires(root):
    db = D.Dashboard(root / "saes" / "topk" / D.DASHBOARD_DIR)
    for q in ("fox", "Quick FOX", "the"):
        words = q.lower().split()
        expected = {}
        for f in range(db.d_sae):
            fd = db.feature(f)
            if fd.dead:
                continue
            exs = db.examples(f)
            per = [max((abs(e.acts[j]) for e in exs for j in D.word_tokens(e.tokens, [w])), default=0.0) for w in words]
            if all(v > 0 for v in per):
                expected[f] = min(v / fd.max_abs_act for v in per)
        page = db.search_fires(q)
        assert page.total == len(page.hits) == len(expected) > 0 and page.notes == []
        assert {h.feature: round(h.score, 5) for h in page.hits} == {f: round(v, 5) for f, v in expected.items()}
        assert [h.score for h in page.hits] == sorted((h.score for h in page.hits), reverse=True)
        for h in page.hits:  # the example shown is one where it fires on a query word
            ex = db.example(h.feature, h.kind, h.rank)
            assert any(ex.acts[j] != 0 for j in D.word_tokens(ex.tokens, words)), (q, h)
            assert h.density == pytest.approx(db.feature(h.feature).density)
    # a word that never appears where a latent fires matches nothing, even if it is in the context
    assert db.search_fires("zebra").hits == []


def test_search_is_bounded(root, monkeypatch):
    import time

    db = D.Dashboard(root / "saes" / "topk" / D.DASHBOARD_DIR)
    t = time.perf_counter()
    page = db.search_fires("cat " * 50_000)
    assert time.perf_counter() - t < 2.0
    assert page.hits and any("first 1,000 characters (of 200,000)" in n for n in page.notes)
    page = db.search_fires(" ".join(f"w{i}" for i in range(100)))
    assert any("first 16 of its 100 distinct words" in n for n in page.notes)
    t = time.perf_counter()
    assert db.search_labels("cat " * 50_000) == [] and db.search_summaries(" ".join(f"w{i}" for i in range(50_000))).notes
    assert db.search_token("cat " * 50_000) == [] and time.perf_counter() - t < 2.0
    # the time limit interrupts SQLite itself (a query that would run for minutes stops at the limit) ...
    con = DS._connect(db.db_path, readonly=True)
    monkeypatch.setattr(DS, "SEARCH_TIME_LIMIT_S", 0.3)
    t = time.perf_counter()
    with pytest.raises(sqlite3.OperationalError, match="interrupted"), DS._bounded_search(con) as stopped:
        con.execute("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT COUNT(*) FROM c").fetchone()
    assert stopped == [True] and time.perf_counter() - t < 1.5
    con.close()
    # ... and a search cut by it says so
    monkeypatch.setattr(DS, "SEARCH_TIME_LIMIT_S", 0.0)
    monkeypatch.setattr(DS, "PROGRESS_STEPS", 1)
    page = db.search_fires("the fox")
    assert page.hits == [] and any("stopped after 0 s" in n for n in page.notes)
    # while every search slot is taken, a search waits at most the limit and says why; pages still load
    monkeypatch.setattr(DS, "SEARCH_TIME_LIMIT_S", 0.2)
    monkeypatch.setattr(DS, "PROGRESS_STEPS", 2000)
    held = [DS._search_slots.acquire(timeout=5) for _ in range(D.SEARCH_SLOTS)]
    try:
        assert all(held)
        t = time.perf_counter()
        page = db.search_fires("fox")
        assert page.hits == [] and any("busy" in n for n in page.notes) and time.perf_counter() - t < 1.0
        assert db.feature(F.PLANTED) is not None and db.examples(F.PLANTED)
    finally:
        for _ in held:
            DS._search_slots.release()
    assert db.search_fires("fox").hits


def test_summary_matches_brute_force(case):
    db, sae, dense = case
    toks = torch.from_numpy(np.asarray(db.tokens()).astype(np.int64)).flatten()
    ctx = db.tokens().shape[1]
    checked = 0
    for i in range(sae.d_sae):
        a = dense[:, i]
        nz = (a != 0).nonzero().squeeze(1)
        summ = db.summary(i)
        if len(nz) == 0:
            assert summ is None
            continue
        mass = a[nz].abs().double()
        for key, ids, keep in (("at", toks[nz], torch.ones(len(nz), dtype=torch.bool)), ("before", toks[(nz - 1).clamp_min(0)], nz % ctx > 0)):
            share = torch.zeros(len(db.vocab()), dtype=torch.float64).index_add_(0, ids[keep], mass[keep]) / mass[keep].sum()
            want = share.sort(descending=True).values[: len(summ[key])].tolist()
            assert [s for _, s in summ[key]] == pytest.approx(want, abs=2e-4)
            for tok, s in summ[key]:
                assert share[[t for t, v in enumerate(db.vocab()) if v == tok]].max().item() == pytest.approx(s, abs=2e-4)
        assert summ["promotes"] == [t for t, _ in db.feature(i).logits_pos[:5]]
        checked += 1
        if checked >= 8:
            break
    assert checked == 8


def test_summaries_are_searchable(root):
    db = D.Dashboard(root / "saes" / "topk" / D.DASHBOARD_DIR)
    word = db.summary(F.PLANTED)["at"][0][0].strip()
    assert word == "fox"
    page = db.search_summaries(word)
    assert F.PLANTED in page.hits and all(word in " ".join(t for t, _ in db.summary(f)["at"] + db.summary(f)["before"]) + " ".join(db.summary(f)["promotes"])
                                          for f in page.hits)


def test_compare_finds_the_same_latent_in_a_permuted_sae(root):
    a, b = root / "saes" / "topk", root / "saes" / "topk_perm"
    Wa, Wb = D.decoder_directions(a), D.decoder_directions(b)
    ca, cb = D.TokenCodes(a / D.DASHBOARD_DIR), D.TokenCodes(b / D.DASHBOARD_DIR)
    assert D.same_tokens(a / D.DASHBOARD_DIR, b / D.DASHBOARD_DIR) and D.same_site(SAE.load(a).cfg.model_dump(), SAE.load(b).cfg.model_dump())
    live = 0
    for i in range(96):
        j = int(F.PERM_INV[i])
        (top, cos), *_ = D.cosine_matches(Wa[i], Wb, 3)
        assert top == j and cos == pytest.approx(1.0, abs=1e-5)
        pos, vals = ca.latent(i)
        matches = cb.coactivation(pos, vals, ca.mean[i], ca.std[i], 3)
        if i == F.DEAD:
            assert len(pos) == 0 and matches == []
            continue
        live += 1
        assert matches[0][0] == j and matches[0][1] == pytest.approx(1.0, abs=1e-6)
    assert live == 95
    # co-activation equals a brute-force Pearson r over the dashboard tokens (against the signed SAE)
    c2 = D.TokenCodes(root / "saes" / "abstopk" / D.DASHBOARD_DIR)
    pos, vals = ca.latent(F.PLANTED)
    got = c2.coactivation(pos, vals, ca.mean[F.PLANTED], ca.std[F.PLANTED], 3)
    def dense_of(c, d):
        m = np.zeros((c.n_positions, d))
        rows = np.repeat(np.arange(c.n_positions), np.diff(c.row_ptr))
        m[rows, c.feat] = c.val
        return m
    valid = ~np.isin(np.asarray(D.Dashboard(a / D.DASHBOARD_DIR).tokens()).reshape(-1), list(D.Dashboard(a / D.DASHBOARD_DIR).special_ids))
    A, B2 = dense_of(ca, 96)[valid], dense_of(c2, 48)[valid]
    r = [(np.corrcoef(A[:, F.PLANTED], B2[:, j])[0, 1] if B2[:, j].std() > 0 else 0.0) for j in range(48)]
    for j, v in got:
        assert v == pytest.approx(r[j], abs=1e-6)
    assert got[0][0] == int(np.nanargmax(r))


def _bad_root(root, tmp_path):
    import shutil

    r = tmp_path / "bad_root"
    shutil.copytree(root / "saes" / "nodash", r / "good")
    for name, cfg in (("deep", '{"d_sae": ' + "[" * 200_000 + "]" * 200_000 + "}"), ("dabc", '{"d_in": 64, "d_sae": "abc"}'),
                      ("dtrue", '{"d_in": 64, "d_sae": true}'), ("listcfg", "[1, 2]"), ("notjson", "{nope")):
        (r / name).mkdir()
        shutil.copy(root / "saes" / "nodash" / WEIGHTS_FILE, r / name / WEIGHTS_FILE)
        (r / name / "cfg.json").write_text(cfg)
        (r / name / "eval_core.json").write_text(cfg)
    return r


def test_unreadable_sae_folders_are_skipped_with_a_reason(root, tmp_path):
    r = _bad_root(root, tmp_path)
    saes, skipped = D.scan_saes(r)
    assert [e.rel for e in saes] == ["good"] and [e.rel for e in D.find_saes(r)] == ["good"]
    reasons = {s.rel: s.reason for s in skipped}
    assert reasons == {"dabc": "d_sae is 'abc', not a positive integer", "deep": "cfg.json is nested too deeply to read",
                       "dtrue": "d_sae is True, not a positive integer", "listcfg": "cfg.json holds a list, not an object",
                       "notjson": reasons["notjson"]}
    assert reasons["notjson"].startswith("cfg.json is not valid JSON") and "\n" not in reasons["notjson"]
    assert [x["sae"] for x in load_eval_results(r)] == []  # good has no eval; the bad ones never raise


def test_rank_plausible_changes_ignores_junk_subwords():
    from saebench.steering import rank_plausible_changes

    base = torch.full((1000,), 0.01 / 997)
    base[:3] = torch.tensor([0.6, 0.3, 0.09])
    steered = base.clone()
    steered[:3] = torch.tensor([0.3, 0.6, 0.085])
    steered[500] = 0.005  # a junk token: from 1e-5 to 5e-3, the largest log-prob change in the vocabulary
    lb, ls = base.log(), steered.log()
    assert int((ls - lb).argmax()) == 500
    out = rank_plausible_changes(lb, ls, top_n=10)
    assert [t for t, _ in out] == [1, 2, 0, 0, 2, 1]  # only the nucleus of either run: rises, then falls
    assert out[0][1] == pytest.approx(math.log(2)) and out[3][1] == pytest.approx(-math.log(2))


def test_firing_words_equal_the_window_words():
    """The build's fast path (only the tokens where the latent fires) gives the same words and values as
    splitting the whole window's text, including words split over several tokens and empty tokens."""
    rng = np.random.default_rng(0)
    vocab = np.array([" the", " quick", "FOR", "M", "AL", "DE", " fox", ".", "\n", " over", "'s", "_x", "a-b", "<|im_start|>", "", " ", "é", "x1",
                      "ab cd", "ß", "Σ", "x" * 40, "-", "a.b.c"], dtype=object)
    vw = DB._vocab_words(vocab)
    for _ in range(20_000):
        ids = rng.integers(0, len(vocab), 23)
        vals = rng.standard_normal(23).astype(np.float32)
        vals[np.abs(vals) < rng.uniform(0, 2.5)] = 0
        assert DB._firing_words(ids, vals, vocab, vw) == DB._window_words(list(vocab[ids]), vals)
    assert DB._window_words(["FOR", "M", "AL", " de"], np.array([0, 2.0, 0, 0], np.float32)) == {"formal": 2.0}


def test_outlier_norm_tokens_are_masked(root, tiny_model, tmp_path):
    """Tokens whose activation norm exceeds factor x the batch median are never encoded (as in training):
    on SmolLM2 the first token after BOS has ~1,000x the norm and every latent would peak on it."""
    sae_dir = root / "saes" / "topk"
    out = tmp_path / "dash"
    D.build_dashboards(sae_dir, model=tiny_model, n_tokens=F.N_TOKENS, feature_batch_size=48, progress=False, out_dir=out,
                       outlier_norm_factor=1.15)
    db = D.Dashboard(out)
    toks = torch.from_numpy(np.asarray(db.tokens()).astype(np.int64))
    special = special_ids(tiny_model.tokenizer)
    masked = torch.zeros(toks.shape, dtype=torch.bool)
    for s in range(0, toks.shape[0], 16):  # the model batches of the build
        with torch.no_grad():
            _, cache = tiny_model.run_with_cache(toks[s : s + 16], names_filter=lambda n: n == F.HOOK, stop_at_layer=1)
        norms = cache[F.HOOK].float().norm(dim=-1)
        keep = ~torch.isin(toks[s : s + 16], special)
        masked[s : s + 16] = keep & (norms > 1.15 * norms[keep].median())
    n_special = int(torch.isin(toks, special).sum())
    assert 0 < int(masked.sum()) == db.provenance["n_outlier_tokens"]
    assert db.provenance["n_tokens"] == toks.numel() - n_special - int(masked.sum()) and db.provenance["outlier_norm_factor"] == 1.15
    for i in range(db.d_sae):
        f = db.feature(i)
        assert f.density == pytest.approx(f.n_active / db.provenance["n_tokens"])
        for e in db.examples(i):
            assert not masked[e.seq, e.pos]
            assert all(v == 0 for v, m in zip(e.acts, masked[e.seq, e.start : e.start + len(e.acts)].tolist()) if m)
