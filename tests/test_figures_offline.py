"""The figure pages ``evals.plots.write_figures`` writes, opened in a real Chromium.

A results folder keeps its pages in git but not the 4.8 MB ``plotly.min.js`` beside them (``.gitignore``), so a
page opened from a fresh clone has no library next to it. Each page then loads the same plotly.js version from
the CDN. Here the CDN is a route that serves the library's own bytes, so the test runs offline and proves both
paths: the local file when it is there (no CDN request), the CDN when it is not (and the plot is drawn).
"""

from __future__ import annotations

import tempfile

import browser_helpers as B
import plotly.graph_objects as go
import pytest
from saebench.evals.plots import write_figures

B.require_browser()
from playwright import sync_api  # noqa: E402  (after the skip check)


@pytest.fixture(scope="module")
def browser():
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    with sync_api.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(profile, executable_path=B.CHROMIUM, headless=True, args=B.HEADLESS_FLAGS)
        yield ctx
        ctx.close()


def _open(ctx, path, library: bytes) -> tuple[list[str], bool]:
    """Open ``path``; the CDN answers with ``library``. Returns the CDN URLs requested and whether a plot was drawn."""
    cdn_hits: list[str] = []

    def cdn(route):
        cdn_hits.append(route.request.url)
        route.fulfill(status=200, body=library, headers={"content-type": "application/javascript"})

    pg = ctx.new_page()
    pg.route("https://cdn.plot.ly/**", cdn)
    try:
        pg.goto(path.as_uri())
        pg.wait_for_selector(".main-svg", timeout=30_000)
        drawn = pg.evaluate("() => !!window.Plotly && document.querySelectorAll('.scatterlayer .trace').length > 0")
    finally:
        pg.close()
    return cdn_hits, drawn


def test_a_figure_page_draws_from_the_local_library_and_from_the_cdn_when_the_library_is_missing(browser, tmp_path):
    from plotly.offline import get_plotlyjs_version

    page = write_figures({"curve": go.Figure(go.Scatter(x=[1, 2, 3], y=[3, 1, 2]))}, tmp_path)["curve"]
    library = (tmp_path / "plotly.min.js").read_bytes()

    hits, drawn = _open(browser, page, library)
    assert drawn and hits == []  # offline: the library beside the page, no network

    (tmp_path / "plotly.min.js").unlink()  # as in a fresh clone of a results folder
    hits, drawn = _open(browser, page, library)
    assert drawn and hits == [f"https://cdn.plot.ly/plotly-{get_plotlyjs_version()}.min.js"]
