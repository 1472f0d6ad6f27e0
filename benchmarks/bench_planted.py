"""Planted ground truth: the fraction of true features each method recovers (best decoder row at cos >= 0.9).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_planted.py                      # the documented sweep
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_planted.py --shapes issue --methods topk batchtopk --samples 1000000
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_planted.py --shapes lognormal_pairs uniform_sparse wide_dense \
        --samples 307200 --batch 1024 --chunk-tokens 8192                                 # the unit-test family's table
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_planted.py --shapes lognormal_pairs uniform_sparse wide_dense \
        --samples 307200 --batch 1024 --chunk-tokens 8192 --methods jumprelu --options '{"topk_warmup_fraction": 0.3}'  # a grid cell

Data (``PlantedSource``): m unit-norm random features in d dimensions; each sample activates each feature
independently with probability n_active/m, with a magnitude drawn from a log-normal (σ = 0.5, median 1) or
Uniform[0.5, 1.5] law; ``pairs`` correlated pairs (feature 2j+1 fires with probability 0.5 whenever 2j fires,
besides its own rate); ``signed`` features take a random sign; Gaussian noise of std ``noise`` per coordinate
relative to the signal's RMS. Every method runs at its defaults, at the common sparsity k = target L0
(JumpReLU in target-L0 mode, AbsTopK per token and per batch), with the library's default learning rate
(``TrainConfig.lr`` unset) unless ``--lr`` is given, and is scored on its exported (inference) form: recovery
(|cos| for the signed methods), FVU and L0 on held-out samples, and the fraction of latents that never fire on them.

Shapes (``SHAPES``): the issue's (d 80, 640 features, ~6 active, log-normal, 20 correlated pairs, d_sae 1,280,
k 8) and variations of d, width, sparsity, magnitude law and correlation; ``hierarchy``, parents whose children fire
only with them (feature absorption's setting), where rows also give ``recovery_parents`` and ``recovery_children``:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_planted.py --shapes hierarchy hierarchy_tight --samples 614400 \
        --batch 1024 --chunk-tokens 8192 --seeds 0 1 2      # mean ± sd over seeds (features, samples and init)
Resumable: finished (shape, method) cells are read back from ``--out``/planted_recovery.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from saebench.activations import ActivationSource, Batch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package: bench_methods' shared helpers

HOOK = "planted"


@dataclass(frozen=True)
class Shape:
    d: int = 80
    m: int = 640  # planted features
    n_active: float = 6.0  # expected active features per sample
    law: str = "lognormal"  # or "uniform"
    pairs: int = 20  # correlated pairs
    signed: bool = False
    noise: float = 0.02
    d_sae: int = 1280
    k: int = 8
    # > 0: a hierarchy instead of independent features: the first P = m // (children + 1) features are parents, each with
    # ``children`` children (features P + p·children ...); a child fires only with its parent (one of them, with probability
    # CHILD_PROB given the parent), as "starts with S" and "short" in feature-absorption studies (Chanin et al. 2024).
    children: int = 0


SHAPES: dict[str, Shape] = {
    # The unit-test family (tests/test_planted.py; run with --samples 307200 --batch 1024):
    # d 24, 48 features, ~3 active (log-normal magnitudes), 4 correlated pairs, 2x latents
    "lognormal_pairs": Shape(d=24, m=48, n_active=3.0, law="lognormal", pairs=4, d_sae=96, k=4),
    # smaller d, uniform magnitudes, no correlation, sparser
    "uniform_sparse": Shape(d=16, m=32, n_active=2.0, law="uniform", pairs=0, d_sae=64, k=3),
    # wider: more features than 2x d, denser codes, log-normal, more pairs
    "wide_dense": Shape(d=32, m=80, n_active=5.0, law="lognormal", pairs=10, d_sae=160, k=6),
    # The shape and larger variations (the default --samples 3M):
    "issue": Shape(),
    "uniform": Shape(law="uniform", pairs=0),
    "wide": Shape(d=64, m=1024, n_active=5.0, d_sae=2048, k=6),
    "dense": Shape(d=48, m=256, n_active=10.0, d_sae=512, k=12, pairs=10),
    "small": Shape(d=32, m=96, n_active=3.0, d_sae=192, k=4, pairs=8),
    # Parents and children (feature absorption's setting): 8 parents with 4 children each, ~3 active features per sample.
    "hierarchy": Shape(d=32, m=40, n_active=3.0, law="lognormal", pairs=0, d_sae=80, k=3, children=4),
    # The same data with k = 2 under the ~3 active features: the sparsity pressure under which merging parent + child
    # into one latent pays (absorption), where Matryoshka's claim applies.
    "hierarchy_tight": Shape(d=32, m=40, n_active=3.0, law="lognormal", pairs=0, d_sae=80, k=2, children=4),
}
TEST_SHAPES = ["lognormal_pairs", "uniform_sparse", "wide_dense"]
CHILD_PROB = 0.8  # P(one of a parent's children fires | the parent fires), hierarchical shapes
LARGE_SHAPES = [s for s in SHAPES if s not in TEST_SHAPES and not SHAPES[s].children]


class PlantedSource(ActivationSource):
    """Unbounded planted-feature stream; chunk i is a pure function of (seed, i)."""

    def __init__(self, shape: Shape, seed: int = 0, chunk_tokens: int = 16_384):
        self.shape, self.seed, self.chunk_tokens = shape, seed, chunk_tokens
        g = torch.Generator().manual_seed(seed)
        self.features = F.normalize(torch.randn(shape.m, shape.d, generator=g), dim=-1)
        self.hook_names, self.d_in = [HOOK], {HOOK: shape.d}

    def chunk_size(self, i: int) -> int:
        return self.chunk_tokens

    def coefficients(self, i: int) -> torch.Tensor:
        s, n = self.shape, self.chunk_tokens
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i + 1)
        if s.children:
            return self._hierarchical(n, g)
        active = torch.rand(n, s.m, generator=g) < s.n_active / s.m
        if s.pairs:
            lead = torch.arange(0, 2 * s.pairs, 2)
            follow = active[:, lead] & (torch.rand(n, s.pairs, generator=g) < 0.5)
            active[:, lead + 1] |= follow
        if s.law == "lognormal":
            mags = torch.exp(0.5 * torch.randn(n, s.m, generator=g))
        else:
            mags = torch.rand(n, s.m, generator=g) + 0.5
        if s.signed:
            mags = mags * torch.where(torch.rand(n, s.m, generator=g) < 0.5, -1.0, 1.0)
        return active * mags

    @property
    def parents(self) -> int:
        """How many of the features are parents (hierarchical shapes; 0 otherwise)."""
        return self.shape.m // (self.shape.children + 1) if self.shape.children else 0

    def _hierarchical(self, n: int, g: torch.Generator) -> torch.Tensor:
        s, P, C = self.shape, self.parents, self.shape.children
        if P * (C + 1) != s.m:
            raise ValueError(f"hierarchical shape: m = {s.m} is not parents x (children + 1) = {P} x {C + 1}")
        parent = torch.rand(n, P, generator=g) < s.n_active / (P * (1 + CHILD_PROB))  # E[active] = n_active
        has_child = parent & (torch.rand(n, P, generator=g) < CHILD_PROB)
        which = torch.randint(0, C, (n, P, 1), generator=g)
        child = torch.zeros(n, P, C, dtype=torch.bool).scatter_(2, which, has_child.unsqueeze(-1))
        active = torch.cat([parent, child.reshape(n, P * C)], 1)
        mags = torch.exp(0.5 * torch.randn(n, s.m, generator=g)) if s.law == "lognormal" else torch.rand(n, s.m, generator=g) + 0.5
        return active * mags

    def chunk(self, i: int) -> Batch:
        c = self.coefficients(i)
        x = c @ self.features
        if self.shape.noise:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + i + 10**9)
            rms = x.pow(2).mean().sqrt()
            x = x + self.shape.noise * rms * torch.randn(x.shape, generator=g)
        return Batch({HOOK: x}, torch.zeros(len(x), dtype=torch.long))


# Every method at the common sparsity k (its target L0), otherwise its defaults.
METHODS: dict[str, tuple[str, dict]] = {
    "topk": ("topk", {}),
    "batchtopk": ("batchtopk", {}),
    "mutual_choice": ("mutual_choice", {}),
    "jumprelu": ("jumprelu", {"sparsity_mode": "target_l0"}),
    # The paper's recipe (form="paper": λ·L0, θ₀ = ε = 0.001·√d, threshold lr = lr, Adam β1 = 0); its L0 is what λ gives.
    "jumprelu_paper": ("jumprelu", {"form": "paper", "sparsity_coef": 0.03}),
    "abstopk": ("abstopk", {}),
    "abstopk_batch": ("abstopk", {"variant": "batch"}),
    "vsae": ("vsae", {}),
    "vsae_det": ("vsae_det", {}),
    "vsae_learned": ("vsae", {"variance": "learned"}),  # the authors' var_flag = 1: learned log σ² (init −2)
    "feature_choice": ("feature_choice", {}),
    "feature_choice_zipf": ("feature_choice", {"capacity": "zipf"}),
    "matryoshka_batchtopk": ("matryoshka_batchtopk", {}),
    "matching_pursuit": ("matching_pursuit", {}),
    "itda": ("itda", {}),
    "top_afa": ("top_afa", {}),
    # The L1 family: its L0 is what λ gives (each method's default λ).
    "standard": ("standard", {}),
    "standard_constrained": ("standard_constrained", {}),
    "gated": ("gated", {}),
}
SIGNED = {"abstopk", "abstopk_batch"}
FREE_L0 = {"jumprelu_paper", "standard", "standard_constrained", "gated", "top_afa"}  # L0 set by a penalty or a rule, not held at k


def run_one(key: str, shape: Shape, samples: int, out_dir: Path, *, lr: float | None = None, batch: int = 4096, seed: int = 0,
            options: dict | None = None, source: PlantedSource | None = None) -> dict:
    """Train ``key`` (a METHODS entry) on ``shape`` for ``samples`` samples; score its exported SAE on held-out samples."""
    from saebench.config import TrainConfig
    from saebench.trainers.loop import train

    method, opts = METHODS[key]
    src = source or PlantedSource(shape, seed=seed)
    cfg = TrainConfig(method=method, hook_name=HOOK, model="none", d_sae=shape.d_sae, k=shape.k, batch_size_tokens=batch,
                      training_tokens=samples, lr=lr, method_options=opts | (options or {}), out_dir=str(out_dir), eval_tokens=0,
                      log_every_steps=10**6, checkpoint_every_steps=10**6, resume=False, seed=seed,
                      lr_warmup_steps=min(100, max(1, samples // batch // 10)), dead_window_tokens=min(1_000_000, max(batch, samples // 5)))
    t = time.perf_counter()
    res = train(cfg, source=src, progress=False)
    seconds = time.perf_counter() - t
    sae = res.sae
    x = torch.cat([src.chunk(10**6 + j).acts[HOOK] for j in range(2)])
    with torch.no_grad():
        z = sae.encode(x)
        x_hat = sae.decode(z)
    fvu = ((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    # Recovery: the fraction of planted features whose best decoder row has cos >= 0.9 (|cos| for signed SAEs).
    from saebench.activations import best_cos

    found = (best_cos(sae.W_dec, src.features, signed=key in SIGNED) >= 0.9).float()
    split = {}
    if src.parents:  # hierarchical: parents and children apart (absorption shows as children not recovered)
        split = {"recovery_parents": found[:src.parents].mean().item(), "recovery_children": found[src.parents:].mean().item()}
    return split | {"method": key, "resolved_options": resolved_options(key, options), "shape": asdict(shape), "samples": samples,
                    "lr": lr or _default_lr(shape.d_sae, shape.d), "seed": seed,
                    "recovery": found.mean().item(), "fvu": fvu,
                    "l0": (z != 0).sum(-1).float().mean().item(), "never_fired_fraction": ((z != 0).sum(0) == 0).float().mean().item(),
                    "train_seconds": seconds, "options": opts | (options or {})}


def resolved_options(key: str, options: dict | None = None) -> dict:
    """Every option of ``key``'s method as this code resolves them (defaults included), JSON-ready.

    Stored with each row and compared when a run is resumed: a row trained under another default (e.g. a changed warm
    start) is not taken for this code's, so a default change reruns its cells instead of reporting stale figures.
    """
    from bench_methods import resolved_options as resolve

    method, opts = METHODS[key]
    return resolve(method, opts | (options or {}))


def _default_lr(d_sae: int, d_in: int) -> float:
    from saebench.trainers.loop import default_lr

    return default_lr(d_sae, d_in)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=LARGE_SHAPES, choices=list(SHAPES), help=f"default: {' '.join(LARGE_SHAPES)}")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--samples", type=int, default=3_000_000, help="training samples per run (the issue's 3M)")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=None, help="learning rate (default: the library's default)")
    ap.add_argument("--seed", type=int, default=0, help="one seed (of the planted features, the samples and the SAE)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="several seeds: each cell is run per seed and the table "
                    "shows mean ± sd over them (and each seed's value)")
    ap.add_argument("--options", type=json.loads, default=None, metavar="JSON",
                    help="method options on top of each method's (e.g. '{\"topk_warmup_fraction\": 0.3}'): the diagnostic grids "
                         "of docs/METHODS_IMPLEMENTED.md 'Planted recovery'; kept apart from the defaults' rows in the results")
    ap.add_argument("--chunk-tokens", type=int, default=16_384, help="samples per generated chunk (the tests use 8,192)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--figure", default=None, metavar="STEM", help=(
        "also write <out>/STEM.html: a heatmap of the table (methods x shapes, recovery %%; children's recovery as its own "
        "column on hierarchical shapes; mean over the seeds)"))
    ap.add_argument("--runs-dir", default="runs/bench_planted")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--dense-codes", choices=["library", "never", "always"], default="library", help=(
        "the sparse core's dense-code path (saebench.sparse.DENSE_CODE_MIN_DENSITY): the library's threshold, or forced off or "
        "on. The same math in another float summation order: how much of a recovery figure is round-off"))
    args = ap.parse_args(argv)
    if args.dense_codes != "library":
        from saebench import sparse

        sparse.DENSE_CODE_MIN_DENSITY["cpu"] = sparse.DENSE_CODE_MIN_DENSITY["cuda"] = 2.0 if args.dense_codes == "never" else 0.0
    dense_arg = None if args.dense_codes == "library" else args.dense_codes
    out = Path(args.out) / "planted_recovery.json"
    rows = json.loads(out.read_text())["rows"] if out.is_file() else []

    current = {key: resolved_options(key, args.options) for key in args.methods}

    from bench_methods import is_stale

    def stale(r) -> bool:  # trained under other defaults than this code's (rows from before resolved_options: taken as they are)
        return r["method"] in current and is_stale(r, current=current[r["method"]])

    seeds = args.seeds if args.seeds is not None else [args.seed]
    for seed, shape_name in ((seed, shape) for seed in seeds for shape in args.shapes):
        src = PlantedSource(SHAPES[shape_name], seed=seed, chunk_tokens=args.chunk_tokens)
        for key in args.methods:
            want = (shape_name, key, args.samples, args.lr, seed, args.options, dense_arg)
            if not args.force and any(_cell_key(r) == want and not stale(r) for r in rows):
                continue
            r = run_one(key, SHAPES[shape_name], args.samples, Path(args.runs_dir) / f"{shape_name}-{key}", lr=args.lr, batch=args.batch,
                        seed=seed, source=src, options=args.options) | {"shape_name": shape_name, "lr_arg": args.lr,
                                                                         "options_arg": args.options, "dense_codes_arg": dense_arg}
            rows = [x for x in rows if _cell_key(x) != want] + [r]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"command": "benchmarks/bench_planted.py", "rows": rows}, indent=1))
            print(f"{shape_name:<8} seed {seed} {key:<15} recovery {r['recovery']:.3f}  fvu {r['fvu']:.3f}  l0 {r['l0']:.2f}  "
                  f"never fired {r['never_fired_fraction']:.3f}  ({r['train_seconds']:.0f} s)", flush=True)
    current_rows = [r for r in rows if not stale(r)]
    print(table(current_rows, args.shapes, args.methods, args.samples, args.lr, seeds, args.options, dense_arg))
    if args.figure:
        from saebench.evals.plots import write_figures

        fig = recovery_figure(current_rows, args.shapes, args.methods, args.samples, args.lr, seeds, args.options, dense_arg)
        print(f"figure: {write_figures({args.figure: fig}, Path(args.out))[args.figure]}")
    return rows


def _cell_key(r: dict) -> tuple:
    """What identifies a row's cell: (shape, method, samples, lr argument, seed, options argument, dense-codes argument)."""
    return (r["shape_name"], r["method"], r["samples"], r["lr_arg"], r["seed"], r.get("options_arg"), r.get("dense_codes_arg"))


def _cells(rows: list[dict], shape: str, key: str, samples: int, lr, seeds: list[int], options, dense_codes) -> list[dict]:
    """The rows of one (shape, method) cell, one per seed found."""
    return [r for seed in seeds for r in rows if _cell_key(r) == (shape, key, samples, lr, seed, options, dense_codes)][:len(seeds)]


def recovery_figure(rows: list[dict], shapes: list[str], methods: list[str], samples: int, lr, seeds: list[int], options=None,
                    dense_codes=None):
    """Plotly heatmap of recovery (%): methods down, shapes across (a hierarchical shape adds its children's column)."""
    import plotly.graph_objects as go
    from bench_methods import mean_sd

    cols = [(s, "recovery") for s in shapes] + [(s, "recovery_children") for s in shapes if SHAPES[s].children]
    z, text = [], []
    for key in methods:
        z.append([])
        text.append([])
        for s, metric in cols:
            found = _cells(rows, s, key, samples, lr, seeds, options, dense_codes)
            m, sd = mean_sd([100 * r[metric] for r in found]) if found else (None, None)
            z[-1].append(m)
            text[-1].append("" if m is None else f"{m:.0f}" + (f" ± {sd:.0f}" if sd is not None else ""))
    labels = [s if metric == "recovery" else f"{s}: children" for s, metric in cols]
    n_seeds = f", mean over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else ""
    fig = go.Figure(go.Heatmap(z=z, x=labels, y=methods, text=text, texttemplate="%{text}", colorscale="RdYlGn", zmin=0, zmax=100,
                               colorbar={"title": "recovered (%)"}, hovertemplate="%{y} on %{x}: %{text}%<extra></extra>"))
    fig.update_layout(title=f"Planted features recovered at cos ≥ 0.9 ({samples:,} samples{n_seeds})", yaxis={"autorange": "reversed"},
                      height=120 + 28 * len(methods), width=260 + 150 * len(cols), margin={"l": 200})
    return fig


def table(rows: list[dict], shapes: list[str], methods: list[str], samples: int, lr, seeds: list[int], options: dict | None = None,
          dense_codes: str | None = None) -> str:
    """Markdown: recovery per method (rows) and shape (columns); over several ``seeds``, mean ± sd (%) and each seed's value.

    Hierarchical shapes add the parents' and the children's recovery.
    """
    from bench_methods import mean_sd

    lines = ["| method | " + " | ".join(shapes) + " |", "|---" * (len(shapes) + 1) + "|"]

    def pct(values: list[float]) -> str:
        m, sd = mean_sd(values)
        if len(values) == 1:
            return f"{100 * m:.0f}%"
        return f"{100 * m:.0f} ± {100 * (sd or 0):.0f}% ({' / '.join(f'{100 * v:.0f}' for v in values)})"

    for key in methods:
        cells = []
        for s in shapes:
            found = _cells(rows, s, key, samples, lr, seeds, options, dense_codes)
            if not found:
                cells.append("")
                continue
            cell = pct([r["recovery"] for r in found])
            if "recovery_parents" in found[0]:
                cell += f"; parents {pct([r['recovery_parents'] for r in found])}, children {pct([r['recovery_children'] for r in found])}"
            if len(found) < len(seeds):
                cell += f" [{len(found)} of {len(seeds)} seeds]"
            cells.append(cell)
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
