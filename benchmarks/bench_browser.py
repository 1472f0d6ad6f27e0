"""Page render times of the feature browser (Streamlit AppTest, the whole script per rerun) and the
latency of the queries behind them.

Each page is opened by deep link in a fresh AppTest session (cold: the session's first run, with the
process-wide caches already warm from an earlier session) and rerun (warm); medians of ``--repeats``.
The searches include the bounded worst case, a pasted ``"cat " * 50000``.

    python benchmarks/bench_browser.py                     # builds the tiny test fixture root in a temp folder
    python benchmarks/bench_browser.py --root ROOT --sae REL --feature 7

Writes ``benchmarks/results/bench_browser.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def fixture_root(tmp: Path) -> tuple[Path, str, int]:
    sys.path.insert(0, str(REPO / "tests"))
    import dashboard_fixture as F

    from saebench.models import load_model, make_tiny_model

    model_dir = tmp / "model"
    make_tiny_model(model_dir)
    model = load_model(str(model_dir))
    return F.build_root(tmp / "root", model_dir, model), "saes/topk", F.PLANTED


def med_ms(f, n: int) -> float:
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append((time.perf_counter() - t) * 1000)
    return round(statistics.median(ts), 2)


def page_times(root: Path, sae: str, feature: int, repeats: int) -> dict[str, dict[str, float]]:
    from streamlit.testing.v1 import AppTest

    from saebench.app import launch

    os.environ[launch.APP_ROOT_ENV] = str(root)
    app = str(REPO / "app" / "main.py")
    pages = {
        "SAE": {"page": "SAE"},
        "Feature": {"page": "Feature", "feature": feature},
        "Search (empty)": {"page": "Search"},
        "Compare": {"page": "Compare", "feature": feature},
        "Evals": {"page": "Evals"},
    }
    out: dict[str, dict[str, float]] = {}

    def open_(params):
        at = AppTest.from_file(app, default_timeout=120)
        for k, v in ({"sae": sae} | params).items():
            at.query_params[k] = str(v)
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        return at

    open_(pages["Feature"])  # load modules and process-wide caches once
    for name, params in pages.items():
        cold, warm = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            at = open_(params)
            cold.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            at.run()
            warm.append((time.perf_counter() - t) * 1000)
        out[name] = {"first_run_ms": round(statistics.median(cold), 1), "rerun_ms": round(statistics.median(warm), 1)}
    # searches, through the page (query typed, Search clicked): the rerun that shows the results
    for mode, q in (("Text in top examples", "the"), ("Token", "the"), ("Label / explanation", "the"), ("Text in top examples", "cat " * 50_000)):
        ts = []
        for _ in range(repeats):
            at = open_(pages["Search (empty)"])
            at.radio(key="search_mode").set_value(mode).run()
            at.text_input(key="search_query").input(q)
            t = time.perf_counter()
            next(b for b in at.button if b.label == "Search").click().run()
            ts.append((time.perf_counter() - t) * 1000)
            assert not at.exception
        name = f"Search: {mode} '{q[:12]}…' ({len(q):,} chars)" if len(q) > 20 else f"Search: {mode} '{q}'"
        out[name] = {"rerun_ms": round(statistics.median(ts), 1)}
    return out


def query_times(root: Path, sae: str, feature: int, n: int) -> dict[str, float]:
    from saebench import dashboards as D

    entries = {e.rel: e for e in D.find_saes(root)}
    db = D.Dashboard(entries[sae].path / D.DASHBOARD_DIR)
    out = {
        "feature_ms": med_ms(lambda: db.feature(feature), n),
        "examples_ms": med_ms(lambda: db.examples(feature), n),
        "summary_ms": med_ms(lambda: db.summary(feature), n),
        "search_fires_the_ms": med_ms(lambda: db.search_fires("the"), n),
        "search_fires_50000_words_ms": med_ms(lambda: db.search_fires("cat " * 50_000), n),
        "search_token_the_ms": med_ms(lambda: db.search_token("the"), n),
        "search_summaries_the_ms": med_ms(lambda: db.search_summaries("the"), n),
        "search_labels_50000_words_ms": med_ms(lambda: db.search_labels("cat " * 50_000), n),
    }
    others = [e for r, e in entries.items() if r != sae and D.same_site(entries[sae].cfg, e.cfg)]
    if others:
        W = D.decoder_directions(entries[sae].path)
        Wo = D.decoder_directions(others[0].path)
        out["compare_cosine_ms"] = med_ms(lambda: D.cosine_matches(W[feature], Wo, 5), n)
        a = db.folder
        b = others[0].path / D.DASHBOARD_DIR
        if D.TokenCodes.available(a) and D.TokenCodes.available(b):
            ca, cb = D.TokenCodes(a), D.TokenCodes(b)

            def coact():
                pos, vals = ca.latent(feature)
                cb.coactivation(pos, vals, ca.mean[feature], ca.std[feature], 5)

            out["compare_coactivation_ms"] = med_ms(coact, n)
            out["token_codes_load_ms"] = med_ms(lambda: D.TokenCodes(b), max(3, n // 10))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, help="browse root (default: build the tiny test fixture in a temp folder)")
    ap.add_argument("--sae", default=None, help="SAE folder relative to the root (default: saes/topk of the fixture)")
    ap.add_argument("--feature", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--query-repeats", type=int, default=30)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_browser.json")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with tempfile.TemporaryDirectory() as tmp:
        if args.root is None:
            root, sae, feature = fixture_root(Path(tmp))
            what = "tiny test fixture (tests/dashboard_fixture.py): 2-layer d_model 64 llama, TopK SAE 96 latents, 2,048 tokens"
        else:
            root, sae, feature = args.root, args.sae, args.feature if args.feature is not None else 0
            what = str(args.root)
        sae = args.sae or sae
        feature = args.feature if args.feature is not None else feature
        t0 = time.perf_counter()
        pages = page_times(root, sae, feature, args.repeats)
        queries = query_times(root, sae, feature, args.query_repeats)
    res = {"root": what, "sae": sae, "feature": feature, "repeats": args.repeats, "pages": pages, "queries": queries,
           "seconds": round(time.perf_counter() - t0, 1), "torch_threads": torch.get_num_threads(),
           "load_average_start": os.getloadavg(), "machine": platform.machine(), "cpus": os.cpu_count(),
           "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    for name, v in pages.items():
        print(f"{name:<55} " + "  ".join(f"{k} {x:8.1f}" for k, x in v.items()))
    for name, v in queries.items():
        print(f"{name:<55} {v:8.2f} ms")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
