"""The Streamlit browser under ``streamlit.testing.v1.AppTest``: every page, with widget interactions."""

from __future__ import annotations

import json

import dashboard_fixture as F
import pytest

from saebench import dashboards as D
from saebench.app import launch

pytest.importorskip("streamlit")

from dashboard_fixture import html, open_app  # noqa: E402


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_model_dir, tiny_model):
    return F.build_root(tmp_path_factory.mktemp("app") / "root", tiny_model_dir, tiny_model)


def texts(elements) -> list[str]:
    return [e.value for e in elements]


def test_empty_root_says_what_to_do(monkeypatch, tmp_path):
    at = open_app(monkeypatch, tmp_path)
    assert texts(at.main.title) == ["No SAEs here yet"]
    assert "no SAE folder under" in at.info[0].value
    at.sidebar.radio(key="page").set_value("Evals").run()
    assert not at.exception and "No eval results" in at.info[0].value


# Widgets inside a form keep their new values only until the form is submitted: set them, then
# click the submit button, with no run() in between.


def test_feature_page_deep_link(monkeypatch, root):
    at = open_app(monkeypatch, root, sae="saes/topk", feature=F.PLANTED)
    assert texts(at.header) == [f"Latent {F.PLANTED}"]
    assert at.sidebar.selectbox(key="sae").value == "saes/topk" and at.sidebar.number_input(key="feature").value == F.PLANTED
    metrics = {m.label: m.value for m in at.metric}
    db = D.Dashboard(root / "saes" / "topk" / D.DASHBOARD_DIR)
    f = db.feature(F.PLANTED)
    assert metrics["Active on"] == f"{f.n_active:,} tokens" and metrics["Max activation"] == f"{f.max_act:.4g}"
    body = html(at)
    assert 'id="top-examples"' in body and body.count('class="row"') >= 20 + 5
    assert "Interval" in body and "contains" in body
    assert 'title="&#x27; fox&#x27; = ' in body  # hover value on the peak token
    assert "2048" not in at.caption[0].value and "tokens (64 sequences × 32)" in at.caption[0].value
    charts = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    assert len(charts) == 2  # activation histogram and logit-effect histogram
    assert "density" in charts[0]["layout"]["title"]["text"]
    assert any(b.label.startswith("#") and "cos" in b.label for b in at.button)  # decoder neighbours
    assert any(b.label.startswith("#") and " r " in b.label for b in at.button)  # correlated latents
    assert at.query_params["feature"] == [str(F.PLANTED)] or at.query_params["feature"] == str(F.PLANTED)


def test_corpus_html_is_escaped(monkeypatch, root):
    db = D.Dashboard(root / "saes" / "topk" / D.DASHBOARD_DIR)
    feature = next(f for f, _ in db.search_text("script alert") if any("script" in "".join(e.tokens) for e in db.examples(f, "top")))
    at = open_app(monkeypatch, root, sae="saes/topk", feature=feature)
    body = html(at)
    assert "script" in body and "&lt;" in body and "&gt;" in body
    assert "<script" not in body and "</script" not in body and "<b>" not in body


def test_navigation_and_live_only(monkeypatch, root):
    at = open_app(monkeypatch, root, sae="saes/topk", feature=F.DEAD - 1)
    at.sidebar.button(key="nav_next").click().run()
    assert at.session_state["feature"] == F.DEAD and "is dead" in at.warning[0].value
    assert {m.label: m.value for m in at.metric}["Flags"] == "dead"
    at.sidebar.button(key="nav_prev").click().run()
    assert at.session_state["feature"] == F.DEAD - 1
    at.sidebar.checkbox(key="live_only").check().run()
    at.sidebar.button(key="nav_next").click().run()
    assert at.session_state["feature"] == F.DEAD + 1
    assert at.query_params["feature"] in (str(F.DEAD + 1), [str(F.DEAD + 1)])
    db = D.Dashboard(root / "saes" / "topk" / D.DASHBOARD_DIR)
    for _ in range(5):
        at.sidebar.button(key="nav_random").click().run()
        assert not db.feature(at.session_state["feature"]).dead
    at.sidebar.number_input(key="feature").set_value(95).run()
    at.sidebar.button(key="nav_next").click().run()
    assert at.session_state["feature"] == 0 and texts(at.header) == ["Latent 0"]


def test_bad_url_params_never_leave_the_root(monkeypatch, root):
    at = open_app(monkeypatch, root, sae="../../etc", feature="abc", page="Nope")
    warnings = " ".join(texts(at.warning))
    assert "No SAE '../../etc'" in warnings and "Ignoring feature='abc'" in warnings and "Unknown page" in warnings
    assert at.session_state["sae"] == "saes/abstopk"
    at = open_app(monkeypatch, root, sae=str(root / "saes" / "topk"), feature=10_000)
    assert at.session_state["sae"] == "saes/abstopk" and at.session_state["feature"] == 0


def test_missing_dashboard_shows_the_build_command(monkeypatch, root):
    at = open_app(monkeypatch, root, sae="saes/nodash", feature=3)
    assert "No dashboards" in at.info[0].value
    assert at.code[0].value == D.build_command(root / "saes" / "nodash")
    for page in ("SAE", "Search"):
        at.sidebar.radio(key="page").set_value(page).run()
        assert not at.exception and at.code[0].value.startswith("saebench dashboards ")


def test_signed_sae_shows_both_tails(monkeypatch, root):
    db = D.Dashboard(root / "saes" / "abstopk" / D.DASHBOARD_DIR)
    feature = next(i for i in range(db.d_sae) if db.examples(i, "bottom") and db.examples(i, "top"))
    at = open_app(monkeypatch, root, sae="saes/abstopk", feature=feature)
    body = html(at)
    assert 'id="top-examples"' in body and 'id="bottom-examples"' in body
    assert "Min activation" in {m.label for m in at.metric}
    assert "rgba(30,110,255" in body  # negative values coloured blue


def test_test_a_prompt_marks_the_histogram(monkeypatch, root):
    at = open_app(monkeypatch, root, sae="saes/topk", feature=F.PLANTED)
    at.text_area(key="test_prompt_text").input("the quick brown fox jumps")
    next(b for b in at.button if b.label == "Run on my text").click().run()
    assert not at.exception
    body = html(at)
    assert 'id="test-prompt-result"' in body and "fox" in body
    chart = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert any("your prompt" in a.get("text", "") for a in chart["layout"].get("annotations", []))
    assert any(s.get("type") == "line" for s in chart["layout"].get("shapes", []))


def test_label_editing_and_label_search(monkeypatch, root):
    at = open_app(monkeypatch, root, sae="saes/topk", feature=F.PLANTED)
    at.text_input(key=f"label_saes/topk_{F.PLANTED}").input("Fox detector")
    at.text_area(key=f"expl_saes/topk_{F.PLANTED}").input("Fires on the word fox")
    next(b for b in at.button if b.label == "Save label").click().run()
    assert not at.exception and texts(at.header) == [f"Latent {F.PLANTED} · Fox detector"]
    assert "Label saved." in texts(at.success)
    assert D.Dashboard(root / "saes" / "topk" / D.DASHBOARD_DIR).label(F.PLANTED) == ("Fox detector", "Fires on the word fox")
    at.sidebar.radio(key="page").set_value("Search").run()
    at.radio(key="search_mode").set_value("Label / explanation").run()
    at.text_input(key="search_query").input("detector")
    next(b for b in at.button if b.label == "Search").click().run()
    hits = [b for b in at.button if b.key and b.key.startswith("hit_")]
    assert [b.label for b in hits] == [f"#{F.PLANTED}"]
    hits[0].click().run()
    assert at.session_state["page"] == "Feature" and at.session_state["feature"] == F.PLANTED


@pytest.mark.parametrize("mode,query", [("Text in top examples", "fox"), ("Token", "fox")])
def test_search_opens_a_latent(monkeypatch, root, mode, query):
    at = open_app(monkeypatch, root, sae="saes/topk", page="Search")
    at.radio(key="search_mode").set_value(mode).run()
    at.text_input(key="search_query").input(query)
    next(b for b in at.button if b.label == "Search").click().run()
    hits = [b for b in at.button if b.key and b.key.startswith("hit_")]
    assert len(hits) >= 3 and f"#{F.PLANTED}" in [b.label for b in hits]
    if mode == "Token":
        assert hits[0].label == f"#{F.PLANTED}"
    body = html(at)
    if mode.startswith("Text"):  # the example where it fires on the word, the word marked, the density
        assert "fires on" in body and "tok match" in body and "density" in body and "tok peak" in body
    else:
        assert "peaks on" in body and "density" in body
    target = next(b for b in hits if b.label == f"#{F.PLANTED}")
    target.click().run()
    assert at.session_state["page"] == "Feature" and texts(at.header)[0].startswith(f"Latent {F.PLANTED}")


def test_prompt_to_top_latents(monkeypatch, root):
    at = open_app(monkeypatch, root, sae="saes/topk", page="Search")
    at.radio(key="search_mode").set_value("Prompt → top latents").run()
    at.text_area(key="prompt_search_text").input("a lazy fox")
    next(b for b in at.button if b.label == "Find latents").click().run()
    assert not at.exception
    table = next(h.proto.body for h in at.html if 'id="prompt-top-latents"' in h.proto.body)
    rows = table.split("<tr>")[2:]  # a full-height table, not a 10-row scroll box
    assert len(rows) == 4 and "&#x27;&lt;|im_start|&gt;&#x27;" in rows[0] and "special token, masked" in rows[0]
    assert "&#x27; fox&#x27;" in rows[3]
    # every latent id is a deep link to its feature page
    assert f'<a href="?sae=saes%2Ftopk&amp;feature={F.PLANTED}&amp;page=Feature" target="_self">#{F.PLANTED}</a>' in rows[3]
    at.selectbox(key="prompt_search_pick").set_value(F.PLANTED).run()
    at.button(key="prompt_search_open").click().run()
    assert at.session_state["page"] == "Feature" and at.session_state["feature"] == F.PLANTED


def test_steering_side_by_side(monkeypatch, root, tiny_model):
    from saebench import steering
    from saebench.sae import SAE

    at = open_app(monkeypatch, root, sae="saes/topk", feature=F.PLANTED, page="Steer")
    assert texts(at.header)[0].startswith(f"Steer with latent {F.PLANTED}")
    assert at.selectbox(key="steer_hook").options[0] == F.HOOK and "blocks.1.hook_resid_post" in at.selectbox(key="steer_hook").options
    at.text_area(key="steer_prompt").input("The fox")
    at.slider(key="steer_strength").set_value(-8.0)
    at.slider(key="steer_tokens").set_value(8)
    at.selectbox(key="steer_scope").set_value("prompt")
    next(b for b in at.button if b.label == "Generate").click().run()
    assert not at.exception, [e.value for e in at.exception]
    body = html(at)
    assert 'id="steer-default"' in body and 'id="steer-steered"' in body
    sae = SAE.load(root / "saes" / "topk")
    max_act = D.Dashboard(root / "saes" / "topk" / D.DASHBOARD_DIR).feature(F.PLANTED).max_abs_act
    default, steered = steering.steered_pair(tiny_model, sae, "The fox", F.PLANTED, -8.0, max_act, scope="prompt", max_new_tokens=8, seed=0)
    from saebench.app.render import esc

    assert esc(default.new_text) in body.split('id="steer-default"')[1].split("</div>")[0]
    assert esc(steered.new_text) in body.split('id="steer-steered"')[1].split("</div>")[0]
    assert default.new_text != steered.new_text
    chart = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert "log-prob" in chart["layout"]["title"]["text"] and len(chart["data"][0]["x"]) == 20
    assert any("-8 × " in m.value for m in at.markdown)
    # streamed: one page update per generated token, and the request's latency is shown
    res = at.session_state["steer_result"]
    n_new = max(default.tokens.shape[1], steered.tokens.shape[1]) - default.prompt_len
    assert res["updates"] == res["n_new"] == n_new and res["seconds"] > 0
    assert any(f"{n_new} new tokens each, generated together in {res['seconds']:.2f} s" in c.value and f"streamed in {n_new} steps" in c.value
               for c in at.caption)


def test_steer_page_streams_into_the_page_token_by_token(monkeypatch, root):
    """The text boxes are updated after every token, each time with the decoded prefix so far."""
    from saebench.app import page_steer

    frames = []
    real = page_steer._text_html
    monkeypatch.setattr(page_steer, "_text_html", lambda css, prompt, text: frames.append((css, text)) or real(css, prompt, text))
    at = open_app(monkeypatch, root, sae="saes/topk", feature=F.PLANTED, page="Steer")
    at.text_area(key="steer_prompt").input("The fox")
    at.slider(key="steer_tokens").set_value(6)
    next(b for b in at.button if b.label == "Generate").click().run()
    assert not at.exception, [e.value for e in at.exception]
    res = at.session_state["steer_result"]
    steered = [t for css, t in frames if css == "steer-steered"]
    assert len(steered) >= res["n_new"] + 1  # one per token while generating, then the final render
    assert steered[res["n_new"] - 1] == res["steered"] and steered[0] != res["steered"]
    assert all(steered[k + 1].startswith(steered[k].rstrip("\ufffd")) for k in range(res["n_new"] - 1))


def test_steer_without_dashboards_measures_the_max_activation(monkeypatch, root, tiny_model):
    from saebench import steering, text
    from saebench.app import page_steer
    from saebench.sae import SAE

    at = open_app(monkeypatch, root, sae="saes/nodash", feature=3, page="Steer")
    assert any("no dashboards" in i.value for i in at.info)
    measure = next(b for b in at.button if b.label.startswith("Measure it on"))
    measure.click().run()
    assert not at.exception, [e.value for e in at.exception]
    sae = SAE.load(root / "saes" / "nodash")
    toks = text.load_tokens(sae.cfg.metadata["corpus"], tiny_model.tokenizer, sae.cfg.context_size, page_steer.MEASURE_TOKENS, split="eval")
    expect = steering.max_activation(sae, tiny_model, toks, 3, special_ids=text.special_ids(tiny_model.tokenizer))
    if expect > 0:
        assert any(f"over {toks.numel():,} held-out tokens: **{expect:.4g}**" in c.value and "measured here" in c.value for c in at.caption)
        next(b for b in at.button if b.label == "Generate").click().run()
        assert not at.exception and 'id="steer-steered"' in html(at)
    else:
        assert any("never fired" in w.value for w in at.warning)


def test_evals_and_overview_pages(monkeypatch, root):
    at = open_app(monkeypatch, root, page="Evals")
    df = at.dataframe[0].value
    assert len(df) == 4 and {"l0", "fvu", "ce_loss_score"} <= set(df.columns)
    titles = [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in at.get("plotly_chart")]
    assert titles == ["CE loss recovered vs L0", "FVU vs L0"]
    at.sidebar.radio(key="page").set_value("SAE").run()
    at.sidebar.selectbox(key="sae").set_value("saes/topk").run()
    assert not at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["L0"] == "6" and metrics["Dead"] == "1" and metrics["Latents computed"] == "96 / 96"
    assert "architecture" in html(at)


def test_render_helpers_escape_and_pareto():
    from saebench.app import render as R

    html_ = R.examples_html([(1.0, ["<script>", "a\n", ""], [1.0, -0.5, 0.0], 0, [False, False, True])], scale=1.0, css_id='x"y')
    assert "<script>" not in html_ and "&lt;script&gt;" in html_ and 'id="x&quot;y"' in html_
    assert "↵" in html_ and "∅" in html_ and "tok peak" in html_ and "tok special" in html_
    assert R.md("*bold* <b> $x$ [l](u)") == "\\*bold\\* \\<b\\> \\$x\\$ \\[l\\]\\(u\\)"
    assert R.code("a`b") == "`a'b`"
    assert R.fmt_density(0.5) == "50.00%" and R.fmt_density(1.234e-4) == "0.0123%" and R.fmt_density(0) == "0%"
    # lower L0 is better; higher CE recovered is better: (1, .5) and (2, .9) are the front, (3, .8) is dominated
    assert R.pareto_front([1, 2, 3, float("nan")], [0.5, 0.9, 0.8, 1.0], maximize=True) == [0, 1]
    assert R.pareto_front([1, 2, 3], [0.5, 0.4, 0.6], maximize=False) == [0, 1]


def test_browse_refuses_a_missing_root(tmp_path):
    from saebench.config import ConfigError

    with pytest.raises(ConfigError, match="is not a directory: pass the folder that holds your SAE folders"):
        launch.browse(tmp_path / "missing")


def test_figures_never_see_a_half_imported_pandas():
    """plotly looks pandas up in ``sys.modules`` without importing it, so one session building a figure
    while another session's first ``st.dataframe`` is still importing pandas got "partially initialized
    module 'pandas' has no attribute 'Series'" (found by tests/test_browser_sessions.py). The app's
    render module imports pandas itself; run in a fresh interpreter, racing a pandas import."""
    import subprocess
    import sys

    code = """
import threading
from saebench.app import render as R
importer = threading.Thread(target=lambda: __import__("pandas"))
importer.start()
n = 0
while importer.is_alive() or n < 3:
    R.histogram_figure({"lo": 0.0, "hi": 1.0, "counts": [1, 2, 3]}, "t", marks=[(0.5, "m")])
    n += 1
importer.join()
print("figures", n)
"""
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "figures" in out.stdout, out.stderr[-2000:]
