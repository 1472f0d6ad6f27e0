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

pytestmark = pytest.mark.browser
B.require_browser()
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect
ARTIFACTS = B.ARTIFACTS_ROOT / "browser"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir, tiny_model):
    root = F.build_root(tmp_path_factory.mktemp("browser") / "root", tiny_model_dir, tiny_model)
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
    assert [o.split(" · ")[0] for o in options] == ["saes/abstopk", "saes/nodash", "saes/topk"]
    pg.get_by_role("option").filter(has_text="saes/topk").click()
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
    pg.get_by_label("Query", exact=True).fill("fox")
    pg.get_by_role("button", name="Search", exact=True).click()
    hit = pg.get_by_role("button", name=f"#{F.PLANTED}", exact=True)
    hit.wait_for()
    settle(pg)
    assert pg.locator(".sb-snippet mark").count() >= 1
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

    # 7. evals page, and a dead latent
    pg.goto(f"{url}/?page=Evals")
    heading(pg, "Evals")
    assert pg.locator(".js-plotly-plot").count() == 2
    shot(pg, "07-evals")
    pg.goto(f"{url}/?sae=saes/topk&feature={F.DEAD}")
    heading(pg, f"Latent {F.DEAD}")
    assert pg.get_by_text(re.compile(f"Latent {F.DEAD} is dead")).count() == 1
    shot(pg, "08-dead-latent")
