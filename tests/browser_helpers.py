"""Shared by the real-browser tests (not a test module): Chromium location and flags, the app server.

Needs Debian's chromium at /usr/bin/chromium (``apt-get install -y chromium``; ``$SAEBENCH_CHROMIUM``
overrides the path) and the ``playwright`` package (its own browser download is not needed).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from saebench.app import launch

CHROMIUM = os.environ.get("SAEBENCH_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS_ROOT = Path(__file__).resolve().parents[1] / "test-artifacts"
HEADLESS_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
# Wait until a Streamlit rerun has finished: no running indicator, skeleton or spinner left.
IDLE_JS = ("() => !document.querySelector('[data-testid=stStatusWidgetRunningIcon]')"
           " && !document.querySelector('[data-testid=stSkeleton]') && !document.querySelector('[data-testid=stSpinner]')")


def require_browser() -> None:
    """Skip the calling test module (call it at import time) when Chromium or playwright is missing."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"chromium not found at {CHROMIUM} (apt-get install -y chromium)", allow_module_level=True)
    pytest.importorskip("playwright", reason="python playwright is not installed (pip install playwright)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A running ``saebench browse`` app: its URL, browse root, process and log files."""

    url: str
    root: Path
    proc: subprocess.Popen
    stdout_path: Path
    stderr_path: Path

    def logs(self) -> str:
        return f"--- stdout ---\n{self.stdout_path.read_text()}\n--- stderr ---\n{self.stderr_path.read_text()}"


@contextlib.contextmanager
def serve(root: Path, log_dir: Path, start_timeout_s: float = 90.0) -> Iterator[Server]:
    """Start the app for ``root`` on a free localhost port, wait until it answers its health check,
    and stop it on exit. Fails the test (with the server's logs) if it does not come up in time."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_dir / "streamlit.stdout.log", log_dir / "streamlit.stderr.log"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        # One torch thread, as in the test process (conftest): the numbers the pages show can then be
        # compared exactly with the same computation done in the test.
        env = os.environ | {launch.APP_ROOT_ENV: str(root), "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(launch.browse_command(root, port=port), stdout=out, stderr=err, env=env)
        server = Server(f"http://127.0.0.1:{port}", root, proc, out_path, err_path)
        try:
            deadline = time.time() + start_timeout_s
            while True:
                try:
                    if urllib.request.urlopen(f"{server.url}/_stcore/health", timeout=1).read() == b"ok":
                        break
                except OSError:
                    pass
                if proc.poll() is not None or time.time() > deadline:
                    out.flush()
                    err.flush()
                    pytest.fail(f"streamlit did not start (exit code {proc.poll()}):\n{server.logs()[-3000:]}")
                time.sleep(0.3)
            yield server
        finally:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
