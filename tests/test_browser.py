"""The browser in a real Chromium: the main journey, driven with Python playwright.

Needs Debian's chromium and the ``playwright`` package (see ``browser_helpers``). Screenshots of every
step go to ``test-artifacts/browser/``.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time

import browser_helpers as B
import dashboard_fixture as F
import pytest

from saebench import dashboards as D
from saebench.layout import WEIGHTS_FILE

pytestmark = pytest.mark.browser
B.require_browser()
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect
ARTIFACTS = B.ARTIFACTS_ROOT / "browser"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir, tiny_model):
    root = F.build_root(tmp_path_factory.mktemp("browser") / "root", tiny_model_dir, tiny_model)
    # hostile SAE folders under the root: skipped with a note, never a traceback (issue 14.8)
    for name, cfg in (("deep", '{"d_sae": ' + "[" * 200_000 + "]" * 200_000 + "}"), ("dabc", '{"d_in": 64, "d_sae": "abc"}')):
        (root / "bad" / name).mkdir(parents=True)
        shutil.copy(root / "saes" / "nodash" / WEIGHTS_FILE, root / "bad" / name / WEIGHTS_FILE)
        (root / "bad" / name / "cfg.json").write_text(cfg)
    with B.serve(root, tmp_path_factory.mktemp("log")) as srv:
        yield srv.url, root


@pytest.fixture(scope="module")
def page(server):
    if ARTIFACTS.exists():
        shutil.rmtree(ARTIFACTS)
    ARTIFACTS.mkdir(parents=True)
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    with sync_api.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(profile, executable_path=B.CHROMIUM, headless=True, args=B.HEADLESS_FLAGS,
                                                   viewport={"width": 1400, "height": 1800})
        pg = ctx.new_page()
        pg.set_default_timeout(45_000)
        dialogs: list[str] = []
        pg.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        pg.dialogs = dialogs
        yield pg
        ctx.close()
    shutil.rmtree(profile, ignore_errors=True)


def settle(pg) -> None:
    """Wait until the rerun has finished: the URL mirrors the state at the very end of each run, and
    no running indicator, skeleton or spinner is left."""
    time.sleep(0.2)
    pg.wait_for_function(B.IDLE_JS)
    time.sleep(0.4)


_T0 = [time.perf_counter()]


def shot(pg, name: str) -> None:
    pg.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    print(f"{name}: {time.perf_counter() - _T0[0]:.1f}s", flush=True)
    _T0[0] = time.perf_counter()


def heading(pg, text: str) -> None:
    pg.get_by_role("heading", name=re.compile(re.escape(text))).first.wait_for()
    settle(pg)


def test_main_journey(server, page):
    url, root = server
    pg = page
    # 1. open the browser: SAE picker lists every SAE under the root
    pg.goto(url)
    pg.get_by_test_id("stSidebar").wait_for()
    heading(pg, "Latent 0")
    pg.get_by_test_id("stSelectbox").first.click()
    options = pg.get_by_role("option").all_inner_texts()
    assert [o.split(" · ")[0] for o in options] == ["saes/abstopk", "saes/nodash", "saes/topk", "saes/topk_perm"]
    pg.keyboard.press("Escape")
    note = pg.get_by_text(re.compile("Skipped 2 SAE folders that cannot be read")).first
    expect(note).to_be_visible()
    assert "nested too deeply" in pg.get_by_test_id("stAlert").first.inner_text() and "Traceback" not in pg.content()
    pg.get_by_test_id("stSelectbox").first.click()
    pg.get_by_role("option").filter(has_text=re.compile("^saes/topk ·")).click()
    heading(pg, "Latent 0")
    expect(pg).to_have_url(re.compile("sae=saes(%2F|/)topk"))
    shot(pg, "01-sae-picked")

    # 2. open a feature by number; examples render with heat colours and hover values
    box = pg.get_by_label(re.compile("Latent \\(0 – 95\\)"))
    box.fill(str(F.PLANTED))
    box.press("Enter")
    heading(pg, f"Latent {F.PLANTED}")
    expect(pg).to_have_url(re.compile(f"feature={F.PLANTED}&"))
    peak = pg.locator("#top-examples .tok.peak").first
    expect(peak).to_have_text(" fox")
    assert re.search(r"= 0\.\d+", peak.get_attribute("title"))
    assert pg.locator("#top-examples .row").count() >= 20
    assert pg.locator(".js-plotly-plot").count() >= 2  # activation + logit histograms
    # automatic summary; tokens read as text (no gaps between token spans)
    expect(pg.locator("#auto-summary")).to_contain_text("fires on")
    row = pg.locator("#top-examples .row .ctx").first
    toks = row.locator(".tok")
    gaps = pg.evaluate("""() => { const t = [...document.querySelectorAll('#top-examples .row .ctx')[0].querySelectorAll('.tok')];
        let g = 0; for (let i = 1; i < t.length; i++) { const a = t[i-1].getBoundingClientRect(), b = t[i].getBoundingClientRect();
        if (Math.abs(a.top - b.top) < 2) g = Math.max(g, b.left - a.right); } return g; }""")
    assert toks.count() > 5 and gaps < 0.5, gaps
    nb = pg.get_by_role("button", name=re.compile(r"^#\d+ · cos .+ · '"))
    assert nb.count() >= 5  # neighbours show their top tokens
    shot(pg, "02-feature")

    # 3. corpus text with HTML in it is shown as text, never run
    db = D.Dashboard(root / "saes" / "topk" / D.DASHBOARD_DIR)
    script_feature = next(f for f, _ in db.search_text("script alert") if any("script" in "".join(e.tokens) for e in db.examples(f, "top")))
    pg.goto(f"{url}/?sae=saes/topk&feature={script_feature}")
    heading(pg, f"Latent {script_feature}")
    text = pg.locator("#top-examples").inner_text()
    assert "script" in text and "<" in text and ">" in text
    assert pg.locator("#top-examples script, #top-examples b").count() == 0 and pg.dialogs == []
    shot(pg, "03-escaped-html")

    # 4. search by text in top examples, open a hit
    pg.get_by_test_id("stSidebar").get_by_text("Search", exact=True).click()
    heading(pg, "Search latents")
    pg.get_by_label("Query", exact=True).fill("the")
    pg.get_by_role("button", name="Search", exact=True).click()
    pg.get_by_text(re.compile(r"results · showing 1–20")).wait_for()
    settle(pg)
    assert pg.locator(".tok.match").count() >= 20 and pg.get_by_text(re.compile("of max\\)")).count() >= 20
    pg.get_by_role("button", name="Next page ▶").click()
    pg.get_by_text(re.compile(r"results · showing 21–")).wait_for()
    settle(pg)
    # token search for words a latent peaks on in two spellings ("in" / " in"): no duplicate-key crash
    pg.get_by_text("Token", exact=True).click()
    settle(pg)
    for word in ("in", "the", "love", "fox"):
        pg.get_by_label("Query", exact=True).fill(word)
        pg.get_by_role("button", name="Search", exact=True).click()
        settle(pg)
        assert pg.get_by_test_id("stException").count() == 0 and "DuplicateElementKey" not in pg.content(), word
    # a pasted 50,000-word query comes back promptly, saying it was cut
    pg.get_by_text("Text in top examples", exact=True).click()
    settle(pg)
    t0 = time.perf_counter()
    pg.get_by_label("Query", exact=True).fill("cat " * 50_000)
    pg.get_by_role("button", name="Search", exact=True).click()
    pg.get_by_text(re.compile("cut to its first 1,000 characters")).wait_for()
    assert time.perf_counter() - t0 < 30
    pg.get_by_label("Query", exact=True).fill("fox")
    pg.get_by_role("button", name="Search", exact=True).click()
    settle(pg)  # until the rerun ends, the token search's "#7" hit can still be on the page (a stale element)
    hit = pg.get_by_role("button", name=f"#{F.PLANTED}", exact=True).first
    hit.wait_for()
    settle(pg)
    assert pg.get_by_role("button", name=f"#{F.PLANTED}", exact=True).count() == 1
    shot(pg, "04-search")
    hit.click()
    heading(pg, f"Latent {F.PLANTED}")

    # 5. test a prompt: live activations, marked on the histogram
    pg.get_by_label("Test a prompt", exact=True).fill("the quick brown fox jumps")
    pg.get_by_role("button", name="Run on my text").click()
    pg.locator("#test-prompt-result").wait_for()
    settle(pg)
    result = pg.locator("#test-prompt-result")
    assert "fox" in result.inner_text() and result.locator(".tok.peak").inner_text().strip() == "fox"
    assert pg.get_by_text(re.compile("your prompt: 0\\.")).count() >= 1
    shot(pg, "05-test-prompt")

    # 6. steer: default and steered side by side, same seed
    pg.get_by_role("button", name="Steer with this latent →").click()
    heading(pg, f"Steer with latent {F.PLANTED}")
    pg.get_by_label("Prompt", exact=True).fill("The fox")
    new_tokens = pg.get_by_role("slider", name="New tokens")
    new_tokens.focus()
    for _ in range(22):  # 30 → 8 new tokens: keeps the test quick
        new_tokens.press("ArrowLeft")
    t_click = time.perf_counter()
    pg.get_by_role("button", name="Generate").click()
    pg.locator("#steer-steered").wait_for()  # the first streamed token
    t_first = time.perf_counter() - t_click
    # the request is over at the page's final caption: between two streamed updates the page can look
    # idle (no running icon) while the texts are still partial
    pg.get_by_text(re.compile(r"generated together in \d")).wait_for()
    settle(pg)
    default, steered = pg.locator("#steer-default").inner_text(), pg.locator("#steer-steered").inner_text()
    assert default.startswith("The fox") and steered.startswith("The fox") and default != steered
    # the page reports the request's latency; keep it (and the time to the first streamed text) with the screenshots
    caption = pg.get_by_text(re.compile(r"new tokens each, generated together in [0-9.]+ s")).inner_text()
    seconds = float(re.search(r"generated together in ([0-9.]+) s", caption).group(1))
    (ARTIFACTS / "steer_latency.json").write_text(f'{{"request_s": {seconds}, "first_text_after_click_s": {t_first:.3f}}}\n')
    assert pg.get_by_text("DEFAULT", exact=True).count() == 1 and pg.get_by_text("STEERED", exact=True).count() == 1
    assert pg.locator(".js-plotly-plot").count() == 1  # next-token log-prob changes
    shot(pg, "06-steer")

    # 7. compare across SAEs: the permuted copy holds the same latent; jump to it
    pg.goto(f"{url}/?sae=saes/topk&feature={F.PLANTED}&page=Compare")
    heading(pg, f"Latent {F.PLANTED} across SAEs")
    j = int(F.PERM_INV[F.PLANTED])
    match = pg.get_by_role("button", name=re.compile(f"^#{j} · r \\+1\\.000"))
    expect(match).to_be_visible()
    shot(pg, "06b-compare")
    match.click()
    heading(pg, f"Latent {j}")
    expect(pg).to_have_url(re.compile("sae=saes(%2F|/)topk_perm"))

    # 8. prompt -> top latents: ids are deep links
    pg.goto(f"{url}/?sae=saes/topk&page=Search")
    heading(pg, "Search latents")
    pg.get_by_text("Prompt → top latents", exact=True).click()
    settle(pg)
    pg.get_by_label("Prompt", exact=True).fill("a lazy fox")
    pg.get_by_role("button", name="Find latents").click()
    link = pg.locator("#prompt-top-latents a", has_text=f"#{F.PLANTED}").first
    link.wait_for()
    settle(pg)
    link.click()
    heading(pg, f"Latent {F.PLANTED}")

    # 9. evals page, and a dead latent
    pg.goto(f"{url}/?page=Evals")
    heading(pg, "Evals")
    assert pg.locator(".js-plotly-plot").count() == 2
    shot(pg, "07-evals")
    pg.goto(f"{url}/?sae=saes/topk&feature={F.DEAD}")
    heading(pg, f"Latent {F.DEAD}")
    assert pg.get_by_text(re.compile(f"Latent {F.DEAD} is dead")).count() == 1
    shot(pg, "08-dead-latent")
