"""App configuration, cached loaders, and the navigation state (session state ⇄ URL query params).

The state the user navigates is three session-state keys, mirrored in the URL so that any view is a
deep link: ``sae`` (the SAE folder relative to the root), ``feature`` (latent index) and ``page``.
URL values are validated against what exists under the root: a ``sae`` parameter is only ever
matched against the discovered SAE folders, so no path from a URL is ever opened.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import streamlit as st
from saebench.app import launch

from saebench import dashboards as D

PAGES = ("SAE", "Feature", "Search", "Compare", "Steer", "Evals")


@dataclass(frozen=True)
class AppConfig:
    root: Path
    model: str | None  # overrides the model named in each SAE's cfg.json
    device: str


def app_config() -> AppConfig:
    """Root, model override and device: from ``-- --root R`` script args, else env vars, else cwd."""
    args = sys.argv[1:]
    root = model = device = None
    if "--root" in args:
        p = argparse.ArgumentParser(add_help=False)
        p.add_argument("--root")
        p.add_argument("--model")
        p.add_argument("--device")
        ns, _ = p.parse_known_args(args)
        root, model, device = ns.root, ns.model, ns.device
    root = root or os.environ.get(launch.APP_ROOT_ENV) or os.getcwd()
    model = model or os.environ.get(launch.APP_MODEL_ENV) or None
    device = device or os.environ.get(launch.APP_DEVICE_ENV) or "cpu"
    return AppConfig(Path(root).resolve(), model, device)


# ---------------------------------------------------------------------------------------------
# cached loaders
# ---------------------------------------------------------------------------------------------


@st.cache_data(ttl=20, show_spinner=False)
def list_saes(root: str) -> tuple[list[tuple[str, str, dict, bool]], list[tuple[str, str]]]:
    """(rel, abs path, cfg, has dashboard) of every SAE under ``root``, and (rel, one-line reason) of the
    SAE folders skipped because they cannot be read (re-scanned every 20 s)."""
    saes, skipped = D.scan_saes(root)
    return [(e.rel, str(e.path), e.cfg, e.has_dashboard) for e in saes], [(s.rel, s.reason) for s in skipped]


@st.cache_resource(show_spinner="Loading the language model…", max_entries=2)
def get_model(name: str | None, device: str):
    from saebench.models import load_model

    return load_model(name, device=device)


@st.cache_resource(show_spinner="Loading the SAE…", max_entries=8)
def get_sae(path: str, device: str, mtime: float):
    """The SAE in ``path`` (``mtime`` of its weights is part of the cache key: a retrained SAE reloads)."""
    from saebench.sae import SAE

    sae = SAE.load(path, device=device)
    sae.requires_grad_(False)
    return sae


def sae_for(cfg: AppConfig, path: str):
    """The (cached) SAE of the folder ``path``."""
    p = Path(path)
    from saebench.layout import weights_file

    weights = weights_file(p)
    return get_sae(path, cfg.device, weights.stat().st_mtime if weights is not None else 0.0)


def _db_version(folder: Path) -> str:
    db = folder / D.DB_FILE
    if not db.exists():
        return ""
    st_ = db.stat()
    wal = folder / (D.DB_FILE + "-wal")
    w = wal.stat().st_mtime_ns if wal.exists() else 0
    return f"{st_.st_mtime_ns}-{st_.st_size}-{w}"


@st.cache_resource(show_spinner=False, max_entries=16)
def _dashboard(folder: str, version: str) -> D.Dashboard:
    return D.Dashboard(folder)


def get_dashboard(sae_path: str) -> D.Dashboard | None:
    """The SAE's dashboards, or None when there are none (or they cannot be read)."""
    folder = D.dashboard_dir(sae_path)
    version = _db_version(folder)
    if not version:
        return None
    try:
        return _dashboard(str(folder), version)
    except Exception:  # noqa: BLE001 - an unreadable DB is shown as "missing"
        return None


@st.cache_data(max_entries=512, show_spinner=False)
def feature_payload(folder: str, version: str, i: int):
    """(FeatureData or None, examples) of one latent; cached per dashboard version."""
    db = _dashboard(folder, version)
    f = db.feature(i)
    return f, (db.examples(i) if f is not None else [])


def payload(db: D.Dashboard, i: int):
    return feature_payload(str(db.folder), _db_version(db.folder), int(i))


def model_for(cfg: AppConfig, sae) -> tuple[object | None, str | None]:
    """(model, None) or (None, error message) for the SAE's model (or the app-wide override)."""
    name = cfg.model or sae.cfg.model_name or None
    try:
        return get_model(name, cfg.device), None
    except Exception as e:  # noqa: BLE001 - shown to the user; the precomputed pages still work
        return None, f"Could not load the model {name or 'smollm2-135m'!r}: {e}"


# ---------------------------------------------------------------------------------------------
# navigation state
# ---------------------------------------------------------------------------------------------


def init_from_url(sae_rels: list[str]) -> list[str]:
    """On a session's first run, seed the navigation state from the URL; returns warnings to show."""
    warnings: list[str] = []
    if st.session_state.get("_url_loaded"):
        return warnings
    st.session_state["_url_loaded"] = True
    qp = st.query_params
    sae = qp.get("sae")
    if sae is not None:
        if sae in sae_rels:
            st.session_state["sae"] = sae
        else:
            warnings.append(f"No SAE {sae!r} under the browse root; showing another one.")
    feat = qp.get("feature")
    if feat is not None:
        try:
            st.session_state["feature"] = max(0, int(feat))
        except ValueError:
            warnings.append(f"Ignoring feature={feat!r} in the URL (not a latent index).")
    page = qp.get("page")
    if page is not None:
        if page in PAGES:
            st.session_state["page"] = page
        else:
            warnings.append(f"Unknown page {page!r} in the URL.")
    elif feat is not None:
        st.session_state["page"] = "Feature"
    return warnings


def sync_url() -> None:
    """Mirror the navigation state into the URL (only what changed, to avoid needless reruns)."""
    want = {}
    for key in ("sae", "feature", "page"):
        v = st.session_state.get(key)
        if v is not None:
            want[key] = str(v)
    current = {k: st.query_params.get(k) for k in want}
    if current != want:
        for k, v in want.items():
            st.query_params[k] = v


def go_to_sae(rel: str, feature: int, page: str = "Feature") -> None:
    """Button callback: open latent ``feature`` of another SAE (``rel`` is one of the discovered folders)."""
    st.session_state["sae"] = rel
    go_to(feature, page)


def feature_link(rel: str, feature: int, page: str = "Feature") -> str:
    """A relative deep link (query string only) to a latent's page; the values are URL-encoded."""
    from urllib.parse import urlencode

    return "?" + urlencode({"sae": rel, "feature": int(feature), "page": page})


@st.cache_resource(show_spinner=False, max_entries=16)
def _decoder_directions(path: str, mtime: float):
    return D.decoder_directions(path)


def decoder_directions(path: str):
    """Unit decoder rows of the SAE in ``path`` (cached; a retrained SAE reloads)."""
    from saebench.layout import weights_file

    w = weights_file(path)
    return _decoder_directions(path, w.stat().st_mtime if w is not None else 0.0)


@st.cache_resource(show_spinner="Loading the sparse codes…", max_entries=4)
def _token_codes(folder: str, version: str):
    return D.TokenCodes(folder)


def token_codes(db: D.Dashboard):
    """The dashboard's kept sparse codes (None when the build did not keep them: format 1)."""
    if not D.TokenCodes.available(db.folder):
        return None
    return _token_codes(str(db.folder), _db_version(db.folder))


def go_to(feature: int, page: str = "Feature") -> None:
    """Button callback: open a latent (runs before widgets are rebuilt, so it may set their state)."""
    st.session_state["feature"] = int(feature)
    st.session_state["page"] = page


def nav_step(db: D.Dashboard | None, d_sae: int, direction: int) -> None:
    i = int(st.session_state.get("feature", 0))
    live = bool(st.session_state.get("live_only", False))
    st.session_state["feature"] = db.step(i, direction, live) if db is not None else (i + direction) % max(d_sae, 1)


def nav_random(db: D.Dashboard | None, d_sae: int) -> None:
    rng = random.Random(time.time_ns())
    live = bool(st.session_state.get("live_only", False))
    st.session_state["feature"] = db.random_feature(rng, live) if db is not None else rng.randrange(max(d_sae, 1))
