"""The user-journey notebooks (notebooks/*.py, jupytext percent format, paired with .ipynb).

- every ``.ipynb`` holds the same cells as its ``.py`` and is stored without outputs, and every
  notebook has a ``parameters``-tagged cell (papermill convention);
- ``-m slow``: every notebook runs top to bottom in a fresh kernel with the smoke parameters injected
  after its parameters cell (as papermill does), in a temporary working directory, so nothing is
  written into the repository. The notebooks share one working directory, in order, as a user would
  run them (notebook 1 trains, 2-5 read its SAEs); run alone (``-k 03``) a notebook trains what it
  needs itself.

``SAEBENCH_NOTEBOOK_OUT=DIR`` also saves the executed notebooks (with outputs) to DIR.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.py"))
IDS = [p.stem for p in NOTEBOOKS]

# What CI injects after each notebook's parameters cell: the smoke size (tiny token counts, early
# layers; every size-dependent parameter left at None follows SIZE).
SMOKE_PARAMETERS = {"SIZE": "smoke", "RUN_DIR": "runs/notebooks"}
CELL_TIMEOUT_S = 420


def _sources(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def test_there_are_six_notebooks():
    assert [p.stem[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06"], IDS


@pytest.mark.parametrize("py", NOTEBOOKS, ids=IDS)
def test_ipynb_in_sync_without_outputs(py: Path):
    ipynb = py.with_suffix(".ipynb")
    assert ipynb.exists(), f"{ipynb.name} is missing: run `jupytext --sync {py.relative_to(ROOT)}`"
    text_nb = jupytext.read(py)
    stored = nbformat.read(ipynb, as_version=4)
    assert _sources(text_nb) == _sources(stored), f"{ipynb.name} differs from {py.name}: run `jupytext --sync {py.relative_to(ROOT)}`"
    for cell in stored.cells:
        if cell.cell_type == "code":
            assert not cell.get("outputs") and cell.get("execution_count") is None, f"{ipynb.name} is stored with outputs; clear them"
    tagged = [c for c in stored.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1 and tagged[0].cell_type == "code", f"{ipynb.name} needs exactly one code cell tagged 'parameters'"
    names = {line.split("=")[0].strip() for line in tagged[0].source.splitlines() if "=" in line and not line.startswith("#")}
    assert set(SMOKE_PARAMETERS) <= names, f"{py.name}: the parameters cell must define {sorted(SMOKE_PARAMETERS)}"


def inject_parameters(nb, params: dict) -> object:
    """A copy of ``nb`` with a cell assigning ``params`` right after the ``parameters``-tagged cell (papermill style)."""
    nb = nbformat.from_dict(json.loads(json.dumps(nb)))
    idx = next(i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", []))
    src = "# Injected parameters\n" + "\n".join(f"{k} = {v!r}" for k, v in params.items())
    nb.cells.insert(idx + 1, nbformat.v4.new_code_cell(src, metadata={"tags": ["injected-parameters"]}))
    return nb


def execute_notebook(py: Path, workdir: Path, params: dict, timeout: int = CELL_TIMEOUT_S):
    """Run the notebook in a fresh kernel in ``workdir``; fail with the failing cell and its traceback."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    nb = inject_parameters(jupytext.read(py), params)
    client = NotebookClient(nb, timeout=timeout, kernel_name=KERNEL_NAME, resources={"metadata": {"path": str(workdir)}})
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError) as e:
        pytest.fail(f"{py.name} failed:\n{e}", pytrace=False)
    finally:
        out = os.environ.get("SAEBENCH_NOTEBOOK_OUT")
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, Path(out) / f"{py.stem}.ipynb")
    return nb


@pytest.fixture(scope="module")
def notebook_workdir(tmp_path_factory):
    """One working directory for all notebooks in this module (notebook 1's SAEs are reused by 2-5)."""
    return tmp_path_factory.mktemp("notebooks")


KERNEL_NAME = "saebench-notebook-test"


def write_kernelspec(folder: Path) -> Path:
    """A kernelspec running this interpreter (so the kernel sees this environment's saebench, whatever other specs exist)."""
    import sys

    spec = folder / "kernels" / KERNEL_NAME
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                                                  "display_name": "saebench tests", "language": "python"}))
    return folder


@pytest.fixture
def kernel_env(monkeypatch, tmp_path_factory):
    # JUPYTER_PATH comes first in the kernelspec search: our spec wins over any installed "python3".
    monkeypatch.setenv("JUPYTER_PATH", str(write_kernelspec(tmp_path_factory.mktemp("jupyter"))))
    # The kernel inherits this environment: offline, no wandb, and one thread (tests run two at a
    # time on two cores; more threads per process make torch several times slower there).
    for k, v in {"WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                 "TQDM_DISABLE": "1", "PYDEVD_DISABLE_FILE_VALIDATION": "1"}.items():
        monkeypatch.setenv(k, v)


@pytest.mark.slow
@pytest.mark.parametrize("py", NOTEBOOKS, ids=IDS)
def test_notebook_executes_in_smoke_mode(py: Path, notebook_workdir: Path, kernel_env):
    t0 = time.time()
    nb = execute_notebook(py, notebook_workdir, SMOKE_PARAMETERS)
    seconds = time.time() - t0
    print(f"{py.stem}: {seconds:.1f} s")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    timings = notebook_workdir / "timings.json"
    data = json.loads(timings.read_text()) if timings.exists() else {}
    data[py.stem] = round(seconds, 1)
    timings.write_text(json.dumps(data, indent=1))
    out = os.environ.get("SAEBENCH_NOTEBOOK_OUT")
    if out:
        shutil.copy(timings, Path(out) / "timings.json")


# --------------------------------------------------------------------------- the library helpers the notebooks call (tiny model, fast)

TINY = dict(size="smoke", d_sae=32, k=4, context_size=32, harvest_tokens=512, training_tokens=1024, batch_size_tokens=128, dead_window_tokens=512)
HOOK0 = "blocks.0.hook_resid_post"


def test_comparison_configs_share_one_cache_and_lay_out_folders(tmp_path):
    from saebench import notebook as api
    from saebench.config import ConfigError

    cfgs = api.comparison_configs(tmp_path, ["topk", "jumprelu"], hooks=[HOOK0, "blocks.1.hook_resid_post"], size="smoke")
    assert [(c.hook_name, c.method) for c in cfgs] == [(HOOK0, "topk"), (HOOK0, "jumprelu"), ("blocks.1.hook_resid_post", "topk"),
                                                       ("blocks.1.hook_resid_post", "jumprelu")]
    assert len({c.activation_cache for c in cfgs}) == 1
    assert cfgs[0].out_dir == str(tmp_path / "saes" / HOOK0 / "topk")
    assert cfgs[1].method_options == {"sparsity_mode": "target_l0"}  # the preset's JumpReLU options
    # The cache is keyed by what decides the activations: other hooks or token counts get another folder.
    other = api.comparison_configs(tmp_path, ["topk"], hooks=[HOOK0], size="smoke")[0]
    more = api.comparison_configs(tmp_path, ["topk"], hook_name=HOOK0, size="smoke", harvest_tokens=4096)[0]
    same = api.comparison_configs(tmp_path, ["topk"], hook_name=HOOK0, size="smoke", k=8)[0]
    assert len({cfgs[0].activation_cache, other.activation_cache, more.activation_cache}) == 3
    assert same.activation_cache == other.activation_cache and same.k == 8
    with pytest.raises(ConfigError, match="unknown size"):
        api.comparison_configs(tmp_path, size="huge")
    with pytest.raises(ValueError, match="not both"):
        api.comparison_configs(tmp_path, hooks=[HOOK0], hook_name=HOOK0)


def test_ensure_comparison_saes_trains_only_what_is_missing(tmp_path, tiny_model, text_file):
    from saebench import notebook as api

    import torch

    kw = TINY | {"corpus": str(text_file), "hooks": [HOOK0], "model": tiny_model, "progress": False}
    with torch.no_grad():  # a notebook may have turned gradients off; training still works
        dirs = api.ensure_comparison_saes(tmp_path, ["topk", "abstopk"], **kw)
    assert dirs == [tmp_path / "saes" / HOOK0 / "topk", tmp_path / "saes" / HOOK0 / "abstopk"]
    assert all(api.is_trained(d) for d in dirs)
    stamps = {d: (d / "sae_weights.safetensors").stat().st_mtime_ns for d in dirs}
    # Again: nothing is trained. methods=None: the SAEs found, the preset's order first.
    assert api.ensure_comparison_saes(tmp_path, ["topk", "abstopk"], **kw) == dirs
    assert api.ensure_comparison_saes(tmp_path, **kw) == dirs
    # A new method: only it is trained, from the same cache.
    more = api.ensure_comparison_saes(tmp_path, ["batchtopk", "topk"], **kw)
    assert api.is_trained(more[0]) and more[1] == dirs[0]
    assert {d: (d / "sae_weights.safetensors").stat().st_mtime_ns for d in dirs} == stamps
    assert len(list((tmp_path / "activations").iterdir())) == 1


def test_analysis_helpers(tmp_path, tiny_model, text_file):
    import torch

    from saebench import notebook as api
    from saebench.evals.common import load_eval_tokens
    from saebench.sae import load_sae
    from saebench.steering import generate

    dirs = api.ensure_comparison_saes(tmp_path, ["topk", "abstopk"], **(TINY | {"corpus": str(text_file), "hooks": [HOOK0]}), model=tiny_model,
                                      progress=False)
    rows = api.reconstruction_rows(dirs, tiny_model, eval_tokens=256, corpus=str(text_file), progress=False)
    assert [r["method"] for r in rows] == ["topk", "abstopk"]
    for r in rows:
        assert r["l0"] == pytest.approx(4) and 0 <= r["fvu"] < 1.5 and 0 <= r["dead_fraction"] <= 1 and r["dead_window_tokens"] > 0
        assert r["train_tokens"] == 1024 and r["train_seconds"] > 0
    fig = api.training_curves_figure(dirs)
    assert len(fig.data) == 2 * 3

    sae = load_sae(dirs[0])
    gens = api.steering_generations(tiny_model, sae, "The quick brown fox", 3, (0, 2.0, 0), 5.0, max_new_tokens=5, seed=1)
    assert [g["strength"] for g in gens] == [0.0, 2.0, 0.0] and gens[0] == gens[2]
    assert gens[0]["text"] == generate(tiny_model, "The quick brown fox", max_new_tokens=5, seed=1).text

    tokens = load_eval_tokens(tiny_model, str(text_file), 256, 32)
    abs_sae = load_sae(dirs[1])
    latent = int(abs_sae.encode(torch.randn(8, abs_sae.d_in)).abs().sum(0).argmax())
    ext = api.latent_extremes(tiny_model, abs_sae, latent, tokens, n=3)
    pos, neg = [e["value"] for e in ext["positive"]], [e["value"] for e in ext["negative"]]
    assert pos == sorted(pos, reverse=True) and all(v > 0 for v in pos) and all(v < 0 for v in neg)
    assert all("«" in e["context"] and "»" in e["context"] for e in ext["positive"] + ext["negative"])
    assert pos or neg


def test_readme_describes_every_notebook():
    readme = (NOTEBOOK_DIR / "README.md").read_text()
    for py in NOTEBOOKS:
        assert py.stem in readme, f"notebooks/README.md does not describe {py.stem}"
