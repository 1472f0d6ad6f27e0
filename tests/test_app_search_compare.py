"""AppTest: token search over many words, activation-ranked text search with paging, bounded queries,
automatic summaries, compare across SAEs, reading comfort, eval sources side by side, unreadable SAE folders."""

from __future__ import annotations

import json
import shutil
import time

import dashboard_fixture as F
import pytest

from saebench import dashboards as D

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest

from dashboard_fixture import html, open_app  # noqa: E402


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_model_dir, tiny_model):
    return F.build_root(tmp_path_factory.mktemp("app19") / "root", tiny_model_dir, tiny_model)


def search(at: AppTest, mode: str, query: str) -> AppTest:
    if at.radio(key="search_mode").value != mode:
        at.radio(key="search_mode").set_value(mode).run()
    at.text_input(key="search_query").input(query)
    next(b for b in at.button if b.label == "Search").click().run()
    assert not at.exception, (query, [e.value for e in at.exception])
    return at


def hits(at: AppTest) -> list:
    return [b for b in at.button if b.key and b.key.startswith("hit_")]


def test_token_search_over_every_peak_token_and_more(monkeypatch, root):
    """Every token some latent peaks on (and their other spellings), in one session: no duplicate keys,
    one button per latent, the counts the query layer gives."""
    db = D.Dashboard(root / "saes" / "topk" / D.DASHBOARD_DIR)
    import sqlite3

    with sqlite3.connect(db.db_path) as con:
        peak_ids = [t for (t,) in con.execute("SELECT DISTINCT token_id FROM feature_tokens")]
    words = sorted({db.token_str(t) for t in peak_ids} | {db.token_str(t).strip().upper() for t in peak_ids} | {"love", "the", "python", "import"})
    assert len(words) > 60
    at = open_app(monkeypatch, root, sae="saes/topk", page="Search")
    n_multi = 0
    for w in words:
        search(at, "Token", w)
        got = [int(b.label[1:]) for b in hits(at)]
        want = [h.feature for h in db.search_token(w)]
        assert got == want[:20] and len(set(got)) == len(got), w
        n_multi += html(at).count('class="q"') > len(got)  # some latent lists two spellings
    assert n_multi > 0


def test_text_search_pages_and_shows_where_it_fires(monkeypatch, root):
    db = D.Dashboard(root / "saes" / "topk" / D.DASHBOARD_DIR)
    total = db.search_fires("the").total
    assert total > 20
    at = open_app(monkeypatch, root, sae="saes/topk", page="Search")
    search(at, "Text in top examples", "the")
    assert f"{total} results · showing 1–20" in at.caption[0].value
    first = [b.label for b in hits(at)]
    assert first == [f"#{h.feature}" for h in db.search_fires("the").hits[:20]]
    body = html(at)
    assert body.count("fires on") >= 20 and body.count("% of max)") >= 20 and body.count("density") >= 20 and "tok match" in body
    at.button(key="search_next").click().run()
    assert f"showing 21–{min(40, total)}" in at.caption[0].value
    assert [b.label for b in hits(at)] == [f"#{h.feature}" for h in db.search_fires("the").hits[20:40]]
    at.button(key="search_prev").click().run()
    assert [b.label for b in hits(at)] == first


def test_pasted_50000_word_query_returns_promptly_with_a_message(monkeypatch, root):
    at = open_app(monkeypatch, root, sae="saes/topk", page="Search")
    for mode in ("Text in top examples", "Label / explanation", "Token"):
        t = time.perf_counter()
        search(at, mode, "cat " * 50_000)
        assert time.perf_counter() - t < 20
        warnings = " ".join(w.value for w in at.warning)
        assert ("cut to its first 1,000 characters" in warnings) if mode != "Token" else ("at most 1,000 characters" in warnings)


def test_feature_page_summary_neighbours_and_gapless_tokens(monkeypatch, root):
    at = open_app(monkeypatch, root, sae="saes/topk", feature=F.PLANTED)
    body = html(at)
    assert 'id="auto-summary"' in body and "Automatic statistical summary, not an explanation" in body
    summary = body.split('id="auto-summary"')[1].split("</div></div>")[0]
    assert "fires on" in summary and "&#x27;" not in summary.split("fires on")[0]
    assert '<span class="q"> fox</span>' in summary and "just after" in summary and "promotes" in summary
    # tokens: no margins or padding between them, adjacent spans (words read as words), escaped
    assert ".sb-examples .tok {margin: 0; padding: 0;" in body
    top = body.split('id="top-examples"')[1]
    assert "</span> <span" not in top and "</span><span class=\"tok" in top
    # neighbour buttons say what each neighbour is (its top tokens) instead of a bare id
    nb = [b.label for b in at.button if b.key and b.key.startswith("nb_cos_")]
    assert len(nb) == 10 and all(lab.count(" · ") >= 2 and "'" in lab for lab in nb)


def test_test_a_prompt_says_when_it_is_cut(monkeypatch, root):
    at = open_app(monkeypatch, root, sae="saes/topk", feature=F.PLANTED)
    at.text_area(key="test_prompt_text").input("fox " * 700)
    next(b for b in at.button if b.label == "Run on my text").click().run()
    assert not at.exception
    assert any("only the first 512 were run" in w.value for w in at.warning)


def test_label_search_includes_automatic_summaries(monkeypatch, root):
    at = open_app(monkeypatch, root, sae="saes/topk", page="Search")
    search(at, "Label / explanation", "fox")
    labels = [b.label for b in hits(at)]
    assert f"#{F.PLANTED}" in labels
    assert "automatic summary" in html(at)
    next(b for b in hits(at) if b.label == f"#{F.PLANTED}").click().run()
    assert at.session_state["feature"] == F.PLANTED and at.session_state["page"] == "Feature"


def test_compare_page_jumps_to_the_same_latent_in_the_other_sae(monkeypatch, root):
    at = open_app(monkeypatch, root, sae="saes/topk", feature=F.PLANTED, page="Compare")
    assert at.header[0].value.startswith(f"Latent {F.PLANTED} across SAEs")
    j = int(F.PERM_INV[F.PLANTED])
    cos = at.button(key=f"cmp_saes/topk_perm_cos_{j}")
    r = at.button(key=f"cmp_saes/topk_perm_r_{j}")
    assert cos.label.startswith(f"#{j} · cos +1.000") and r.label.startswith(f"#{j} · r +1.000")
    assert "fox" in cos.label  # the match says what it is (its top tokens)
    keys = [b.key for b in at.button if b.key and b.key.startswith("cmp_")]
    assert any(k.startswith("cmp_saes/abstopk_r_") for k in keys) and any(k.startswith("cmp_saes/nodash_cos_") for k in keys)
    assert any("Needs the dashboards of both SAEs" in c.value for c in at.caption)  # nodash: cosine only, says why
    r.click().run()
    assert not at.exception
    assert at.session_state["sae"] == "saes/topk_perm" and at.session_state["feature"] == j and at.session_state["page"] == "Feature"
    assert at.header[0].value.startswith(f"Latent {j}")
    # and the feature page links to the compare view
    at.button(key="to_compare").click().run()
    assert at.session_state["page"] == "Compare" and not at.exception


def test_compare_with_no_other_sae_on_the_hook(monkeypatch, root, tmp_path):
    r = tmp_path / "one"
    shutil.copytree(root / "saes" / "nodash", r / "only")
    at = open_app(monkeypatch, r, page="Compare", feature=1)
    assert "No other SAE under the browse root reads" in at.info[0].value


def test_eval_numbers_say_where_they_come_from(monkeypatch, root, tmp_path):
    r = tmp_path / "evals"
    shutil.copytree(root / "saes" / "topk", r / "saes" / "topk", ignore=shutil.ignore_patterns(D.DASHBOARD_DIR))
    core = json.loads((r / "saes" / "topk" / "eval_core.json").read_text())
    core.update(fvu=0.171, dead_fraction=0.0015, n_tokens=8192, dead_window_tokens=8192)
    (r / "saes" / "topk" / "eval_core.json").write_text(json.dumps(core))
    (r / "bench").mkdir()
    (r / "bench" / "results.json").write_text(json.dumps([{"sae": "topk", "sae_dir": str(r / "saes" / "topk"), "method": "topk", "l0": 6.0,
                                                           "fvu": 0.271, "dead_fraction": 0.0091, "n_tokens": 65536, "ce_loss_score": 0.8}]))
    at = open_app(monkeypatch, r, page="Evals")
    df = at.dataframe[0].value
    assert sorted(df["source"]) == ["bench/results.json", "saes/topk/eval_core.json"] and sorted(df["fvu"]) == [0.171, 0.271]
    assert {"eval", "n_tokens", "dead_window_tokens"} <= set(df.columns)
    assert "Several sources for `saes/topk`" in at.info[0].value
    at.sidebar.radio(key="page").set_value("SAE").run()
    assert not at.exception
    assert {m.label: m.value for m in at.metric}["FVU"] == "0.171"  # eval_core.json's own number, not replaced
    assert any("from `eval_core.json` · eval `core` · 8,192 tokens · dead = never fired in a 8,192-token window" in c.value for c in at.caption)
    table = next(h.proto.body for h in at.html if 'id="eval-sources"' in h.proto.body)
    assert "bench/results.json" in table and "0.271" in table and "0.171" in table and "fvu ⚠ differs" in table
    assert "dead_fraction ⚠ differs" in table and "65536" in table.replace(",", "")


def test_unreadable_sae_folders_never_bring_pages_down(monkeypatch, root, tmp_path):
    from test_dashboards import _bad_root

    r = _bad_root(root, tmp_path)
    at = open_app(monkeypatch, r, feature=1)
    note = at.warning[0].value
    assert note.startswith("Skipped 5 SAE folders that cannot be read")
    for name, why in (("deep", "nested too deeply"), ("dabc", "d\\_sae is 'abc'"), ("dtrue", "d\\_sae is True"), ("listcfg", "holds a list")):
        assert f"`{name}`" in note and why in note, (name, note)
    assert "Traceback" not in note and str(tmp_path) not in note
    assert at.sidebar.selectbox(key="sae").options == ["good · topk · 32 latents · no dashboards"]
    for page in ("SAE", "Feature", "Search", "Compare", "Evals"):
        at.sidebar.radio(key="page").set_value(page).run()
        assert not at.exception, (page, [e.value for e in at.exception])
        assert len(at.warning) >= 1 and at.warning[0].value.startswith("Skipped 5")


def test_labels_in_buttons_are_markdown_escaped(monkeypatch, root):
    db = D.Dashboard(root / "saes" / "topk_perm" / D.DASHBOARD_DIR)
    j = int(F.PERM_INV[F.PLANTED])
    db.set_label(j, "**bold** [link](http://example.com) <b>x</b>")
    try:
        at = open_app(monkeypatch, root, sae="saes/topk", feature=F.PLANTED, page="Compare")
        label = at.button(key=f"cmp_saes/topk_perm_cos_{j}").label
        assert "\\*\\*bold\\*\\* \\[link\\]\\(http://example\\.com\\) \\<b\\>x\\</b\\>" in label
        at = open_app(monkeypatch, root, sae="saes/topk_perm", page="SAE")
        assert any(b.key == f"lab_{j}" and "\\*\\*bold" in b.label for b in at.button)
    finally:
        db.set_label(j, "", "")
