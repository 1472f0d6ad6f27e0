"""Screenshots of the browser's main pages (feature, search, compare) in headless Chromium, for the docs.

    python scripts/browser_screenshots.py --root ROOT --sae REL --feature 7 --query "the" --out docs/screenshots

Starts ``saebench browse ROOT`` on a free localhost port, opens each page by deep link, waits until
Streamlit has finished rerunning, and saves ``feature.png``, ``search.png``, ``compare.png``.
Needs Debian's chromium (``/usr/bin/chromium`` or ``$SAEBENCH_CHROMIUM``) and the ``playwright`` package.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlencode

from saebench.app import launch

CHROMIUM = os.environ.get("SAEBENCH_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
IDLE_JS = ("() => !document.querySelector('[data-testid=stStatusWidgetRunningIcon]')"
           " && !document.querySelector('[data-testid=stSkeleton]') && !document.querySelector('[data-testid=stSpinner]')")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def settle(pg) -> None:
    time.sleep(0.3)
    pg.wait_for_function(IDLE_JS, timeout=120_000)
    time.sleep(0.8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--sae", required=True, help="SAE folder relative to the root")
    ap.add_argument("--feature", type=int, required=True)
    ap.add_argument("--query", default="the", help="text search query for search.png")
    ap.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    ap.add_argument("--width", type=int, default=1440)
    ap.add_argument("--height", type=int, default=1300)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = os.environ | {launch.APP_ROOT_ENV: str(args.root.resolve())}
    proc = subprocess.Popen(launch.browse_command(args.root, port=port), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=1).read() == b"ok":
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit("the app did not start")
            time.sleep(0.3)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
            pg = browser.new_page(viewport={"width": args.width, "height": args.height})
            pg.set_default_timeout(120_000)

            def open_(**params):
                pg.goto(f"{url}/?{urlencode({'sae': args.sae} | params)}")
                pg.get_by_test_id("stSidebar").wait_for()
                settle(pg)

            open_(feature=args.feature, page="Feature")
            pg.locator("#top-examples").wait_for()
            settle(pg)
            pg.screenshot(path=str(args.out / "feature.png"))
            open_(page="Search")
            pg.get_by_label("Query", exact=True).fill(args.query)
            pg.get_by_role("button", name="Search", exact=True).click()
            pg.get_by_text("results").first.wait_for()
            settle(pg)
            pg.screenshot(path=str(args.out / "search.png"))
            open_(feature=args.feature, page="Compare")
            settle(pg)
            pg.screenshot(path=str(args.out / "compare.png"))
            browser.close()
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
    print(f"wrote {args.out}/feature.png, search.png, compare.png")


if __name__ == "__main__":
    main()
