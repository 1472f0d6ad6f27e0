"""Launching the feature browser: the ``streamlit run`` command line and the environment that passes
the root, model and device to ``app/main.py``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

APP_ROOT_ENV = "SAEBENCH_BROWSE_ROOT"
APP_MODEL_ENV = "SAEBENCH_BROWSE_MODEL"
APP_DEVICE_ENV = "SAEBENCH_BROWSE_DEVICE"


def app_main_path() -> Path:
    """The Streamlit entry script (``app/main.py``, importable as ``saebench.app``)."""
    import saebench.app

    return Path(saebench.app.__file__).with_name("main.py")


def browse_command(root: str | Path, host: str = "127.0.0.1", port: int = 8501, model: str | None = None, device: str = "cpu") -> list[str]:
    """The ``streamlit run`` command line that serves the browser for ``root``."""
    cmd = [sys.executable, "-m", "streamlit", "run", str(app_main_path()),
           "--server.address", host, "--server.port", str(port), "--server.headless", "true",
           "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none", "--client.toolbarMode", "viewer",
           "--", "--root", str(Path(root).resolve())]
    if model:
        cmd += ["--model", model]
    if device != "cpu":
        cmd += ["--device", device]
    return cmd


def browse(root: str | Path, host: str = "127.0.0.1", port: int = 8501, model: str | None = None, device: str = "cpu") -> int:
    """Serve the feature browser for every SAE under ``root`` (blocks; returns streamlit's exit code).

    Binds to ``host`` (localhost by default). ``model`` overrides the model named in each SAE's
    cfg.json (e.g. a local folder when the SAE was trained elsewhere).
    """
    import subprocess

    root = Path(root)
    if not root.is_dir():
        from saebench.config import ConfigError  # a path the user typed: bad input (CLI exit code 2), not the environment

        raise ConfigError(f"browse root {root} is not a directory: pass the folder that holds your SAE folders (e.g. runs)")
    env = os.environ | {APP_ROOT_ENV: str(root.resolve())}
    # OpenMP threads that sleep instead of spinning between parallel regions: on a machine with other
    # work running, spinning threads wait for descheduled siblings and one steering request took
    # 41-45 s instead of 6 s (2 threads, load 6.5; docs/PERFORMANCE.md §6). A user's own setting wins.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if model:
        env[APP_MODEL_ENV] = model
    env[APP_DEVICE_ENV] = device
    print(f"saebench browser for {root.resolve()} at http://{host}:{port}  (Ctrl-C to stop)")
    try:
        return subprocess.call(browse_command(root, host, port, model, device), env=env)
    except KeyboardInterrupt:
        return 0
