"""Execute the notebooks top to bottom (papermill style) and record each one's wall time.

    python notebooks/run_notebooks.py --size full --workdir /tmp/nb-full --out /tmp/nb-full/executed
    python notebooks/run_notebooks.py --size smoke --only 03        # one notebook, in a fresh folder

Each notebook runs in a fresh kernel with ``SIZE`` (and ``RUN_DIR``) injected after its
``parameters`` cell; all run in ``--workdir`` (so notebooks 2-5 reuse notebook 1's SAEs). The
executed notebooks (with outputs) and ``timings.json`` go to ``--out``. This is how the wall times
in notebooks/README.md were measured. Extra parameters: ``--param NAME=PYTHON_LITERAL``.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent


def inject(nb, params: dict):
    idx = next(i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", []))
    src = "# Injected parameters\n" + "\n".join(f"{k} = {v!r}" for k, v in params.items())
    nb.cells.insert(idx + 1, nbformat.v4.new_code_cell(src, metadata={"tags": ["injected-parameters"]}))
    return nb


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="smoke", choices=["smoke", "full"])
    p.add_argument("--workdir", default=".", help="working directory of the kernels (RUN_DIR is relative to it)")
    p.add_argument("--run-dir", default="runs/notebooks")
    p.add_argument("--out", default=None, help="folder for the executed notebooks and timings.json (default WORKDIR/executed)")
    p.add_argument("--only", nargs="*", default=None, help="notebook number prefixes, e.g. 01 02")
    p.add_argument("--param", action="append", default=[], help="NAME=PYTHON_LITERAL, injected into every notebook")
    p.add_argument("--timeout", type=int, default=None, help="per-cell timeout in seconds (default none)")
    a = p.parse_args(argv)
    work = Path(a.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = Path(a.out) if a.out else work / "executed"
    out.mkdir(parents=True, exist_ok=True)
    params = {"SIZE": a.size, "RUN_DIR": a.run_dir}
    for item in a.param:
        name, value = item.split("=", 1)
        params[name] = ast.literal_eval(value)
    # A kernelspec for this interpreter, found first (JUPYTER_PATH), so the kernels see this environment.
    spec = Path(tempfile.mkdtemp()) / "kernels" / "saebench-notebooks"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                                                  "display_name": "saebench", "language": "python"}))
    os.environ["JUPYTER_PATH"] = str(spec.parents[1]) + os.pathsep + os.environ.get("JUPYTER_PATH", "")
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    for py in sorted(HERE.glob("[0-9][0-9]_*.py")):
        if a.only and not any(py.stem.startswith(o) for o in a.only):
            continue
        nb = inject(jupytext.read(py), params)
        t0 = time.time()
        print(f"{py.stem}: running ({a.size})", flush=True)
        try:
            NotebookClient(nb, timeout=a.timeout, kernel_name="saebench-notebooks", resources={"metadata": {"path": str(work)}}).execute()
        finally:
            nbformat.write(nb, out / f"{py.stem}.ipynb")
        timings[py.stem] = {"size": a.size, "seconds": round(time.time() - t0, 1), "params": params}
        timings_path.write_text(json.dumps(timings, indent=1))
        print(f"{py.stem}: {timings[py.stem]['seconds']} s", flush=True)
    return timings


if __name__ == "__main__":
    main()
