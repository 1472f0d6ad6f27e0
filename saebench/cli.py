"""The ``saebench`` command. Flags are generated from the pydantic configs, so ``--help`` documents
every field and a config file plus flag overrides always validate the same way."""

from __future__ import annotations

import argparse
import functools
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

from saebench.config import (  # noqa: F401  (HelpFormatter, add_config_flags, collect: re-exported, they lived here)
    ConfigError, EvalConfig, HelpFormatter, TrainConfig, _kv, _parse_value, _unwrap, add_config_flags, build_config, collect, read_config_file,
)


def cmd_train(args) -> int:
    from saebench.api import train_and_evaluate

    if args.sweep:
        return _train_sweep(args)
    cfg = collect(args, TrainConfig)
    result, metrics = train_and_evaluate(cfg, progress=not args.quiet)
    if not _is_main_rank():
        return 0  # under torchrun only rank 0 reports
    print(f"\nSAE written to {result.out_dir.resolve()}  ({result.steps} steps, {result.seconds:.0f} s of training)")
    if metrics is not None:
        from saebench.evals.core import format_table

        print(format_table(metrics))
        print(f"metrics: {(result.out_dir / 'eval_core.json').resolve()}")
    return 0


def _train_sweep(args) -> int:
    """Several SAEs from one harvest: a sweep file plus flags that apply to every SAE."""
    from saebench.api import train_and_evaluate_many
    from saebench.config import load_sweep
    from saebench.evals.core import format_table

    if args.config:
        raise ConfigError("use either --config (one SAE) or --sweep (several SAEs), not both")
    flags = {name: getattr(args, name) for name in TrainConfig.model_fields if getattr(args, name, None) is not None}
    if "method_options" in flags:
        flags["method_options"] = _kv(flags["method_options"])
    cfgs = load_sweep(args.sweep, **flags)
    results = train_and_evaluate_many(cfgs, progress=not args.quiet, distribute_modules=args.distribute_modules)
    if not _is_main_rank() and not args.distribute_modules:
        return 0  # data parallel: rank 0 wrote and reports every SAE
    for item in results:
        if item is None:
            continue
        result, metrics = item
        print(f"\nSAE written to {result.out_dir.resolve()}  ({result.steps} steps)")
        if metrics is not None:
            print(format_table(metrics))
    return 0


def _is_main_rank() -> bool:
    from saebench.distributed import rank

    return rank() == 0


def cmd_dashboards(args) -> int:
    import contextlib

    from saebench.dashboards import build_dashboards, dashboard_dir
    from saebench.lock import folder_lock

    # One builder per dashboard folder (a folder that is no SAE is left to build_dashboards to report, creating nothing).
    target = Path(args.out_dir) if args.out_dir else dashboard_dir(args.sae_dir)
    lock = folder_lock(target, "dashboards build", hint="Wait for that build to finish (or stop it: a build "
                       "resumes where it stopped), then rerun.") if (Path(args.sae_dir) / "cfg.json").is_file() else contextlib.nullcontext()
    with lock:
        folder = build_dashboards(args.sae_dir, model=args.model, n_tokens=args.n_tokens, batch_size=args.batch_size, resume=not args.no_resume,
                                  progress=not args.quiet, device=args.device, out_dir=args.out_dir)
    print(f"dashboards written to {Path(folder).resolve()}\nbrowse them with: saebench browse {Path(args.sae_dir).resolve().parent}")
    return 0


def cmd_browse(args) -> int:
    from saebench.app.launch import browse

    # browse() checks the root before it says anything (it prints the address once it starts).
    return browse(args.root, host=args.host, port=args.port, model=args.model, device=args.device)


def _sae_site(sae_dir: str) -> dict[str, Any]:
    """What an SAE folder's cfg.json says about where it reads (hook, model, context, d_in, corpus), without its weights.

    A missing or unreadable cfg.json raises ``ArtifactError``; odd fields are left out (the loader reports them)."""
    from saebench.io import read_json

    try:
        raw = read_json(Path(sae_dir) / "cfg.json", "SAE config")
    except RecursionError:
        return {}
    if not isinstance(raw, dict):
        return {}
    meta = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}

    def pick(key, kind):
        for src in (raw, meta):
            v = src.get(key)
            if isinstance(v, kind) and not isinstance(v, bool):
                return v
        return None

    out: dict[str, Any] = {"model_name": pick("model_name", str), "context_size": pick("context_size", int), "d_in": pick("d_in", int),
                           "corpus": pick("corpus", str)}
    hook, head = pick("hook_name", str), pick("hook_head_index", int)
    if hook:
        out["hook"] = hook if (":" in hook or head is None) else f"{hook}:{head}"
    return out


def cmd_eval(args) -> int:
    from saebench import models, preflight, text
    from saebench.evals.core import format_table, run_core_eval

    cfg = collect(args, EvalConfig, {"sae": args.sae_dir})
    # Everything that can be wrong with the arguments is checked before the model loads.
    site = _sae_site(cfg.sae)
    model_name = cfg.model or site.get("model_name") or None
    ctx = cfg.context_size or site.get("context_size") or 128
    if cfg.eval_tokens < ctx:
        raise ConfigError(f"eval_tokens={cfg.eval_tokens} is less than one sequence (context_size={ctx}); raise --eval-tokens")
    shape = None
    if site.get("hook"):
        shape = preflight.check_hook_offline(site["hook"], model_name)
        hook, head = preflight.split_hook(site["hook"])
        width = preflight.hook_width(hook, head, shape) if shape else None
        if width is not None and site.get("d_in") is not None and width != site["d_in"]:
            raise ConfigError(f"the SAE reads {site['d_in']}-wide activations at {site['hook']}, but that hook is {width} wide in model "
                              f"{model_name or models.DEFAULT_MODEL!r}; pass the model it was trained on with --model")
    text.check_splits(cfg.corpus or site.get("corpus") or "default", train=False, eval=True)
    model = None
    if site.get("hook") and shape is None:  # the model's shape was not readable offline: check on the loaded model
        model = models.load_model(model_name, device=cfg.device)
        preflight.check_hook_on_model(model, site["hook"])
    metrics = run_core_eval(cfg.sae, model, corpus=cfg.corpus, eval_tokens=cfg.eval_tokens, context_size=cfg.context_size, batch_size=cfg.model_batch_size,
                            exclude_special_tokens=cfg.exclude_special_tokens, device=cfg.device, out=cfg.out, progress=not args.quiet,
                            model_name=cfg.model)
    print(format_table(metrics))
    print(f"metrics: {Path(cfg.out or Path(cfg.sae) / 'eval_core.json').resolve()}")
    return 0


def cmd_methods(args) -> int:
    from saebench.trainers import METHODS

    for name, cls in sorted(METHODS.items()):
        doc = (sys.modules[cls.__module__].__doc__ or cls.__doc__ or "").strip().splitlines()
        print(f"{name:<16} architecture={cls.architecture:<13} {doc[0] if doc else ''}")
        for opt in cls.Options.describe():
            modes = "".join(f"; {mode}: {value!r}" for mode, value in opt["mode_defaults"].items())
            print(f"{'':<18}--method-options {opt['name']}=...  (default {opt['default']!r}{modes})")
            if opt["description"]:
                print(textwrap.fill(opt["description"], width=120, initial_indent=" " * 22, subsequent_indent=" " * 22))
    from saebench.trainers.transcoder import TRANSCODER_METHODS

    print(f"\ntranscoders (read --hook-name, predict --target-hook; add --skip-transcoder for a linear skip W_skip x) with: "
          f"{', '.join(TRANSCODER_METHODS)}")
    print("  e.g. saebench train --hook-name blocks.5.ln2.hook_normalized --target-hook blocks.5.hook_mlp_out --skip-transcoder")
    print("ITDA's cross-layer/model Jaccard similarity: saebench itda-similarity --build OUT --hooks H1 H2 ...  (see --help)")
    return 0


def cmd_verify(args) -> int:
    from pathlib import Path

    from saebench.activations import CACHE_INDEX, verify_cache
    from saebench.io import verify_folder
    from saebench.sae import SAE

    if (Path(args.folder) / CACHE_INDEX).is_file():  # an activation cache: every shard against cache.json
        problems = verify_cache(args.folder)
        ok = f"{args.folder}: OK (activation cache: every shard matches its sha256 in {CACHE_INDEX})"
    else:
        problems = verify_folder(args.folder)
        if not problems:
            try:
                SAE.load(args.folder, verify="size")  # the hashes were just checked
            except Exception as e:  # report, don't trace back
                problems.append(str(e))
        ok = f"{args.folder}: OK (all files match manifest.json; SAE loads)"
    if problems:
        print(f"{args.folder}: PROBLEMS")
        for p in problems:
            print(f"  - {p}")
        return 1
    print(ok)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saebench", description="Train, evaluate, browse and steer sparse autoencoders.",
                                     epilog="Errors print one line; add --debug (anywhere) or set SAEBENCH_DEBUG=1 for the traceback.",
                                     formatter_class=HelpFormatter)
    # every subcommand shows its defaults
    sub = parser.add_subparsers(dest="command", required=True, parser_class=functools.partial(argparse.ArgumentParser, formatter_class=HelpFormatter))

    p = sub.add_parser("train", help="Train an SAE (then run the core eval).")
    p.add_argument("--config", help="TOML/YAML/JSON file of TrainConfig fields; flags override it.")
    p.add_argument("--sweep", help="Sweep file (base / grid / sae tables): several SAEs trained from one harvest; flags apply to every SAE.")
    p.add_argument("--distribute-modules", action="store_true", help="Under torchrun with --sweep: each SAE lives on one rank (stored once).")
    p.add_argument("--quiet", action="store_true", help="No progress bars.")
    add_config_flags(p, TrainConfig)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("eval", help="Core evaluation of an SAE folder on held-out tokens.")
    p.add_argument("sae_dir", help="SAE folder (saebench or SAELens format).")
    p.add_argument("--config", help="TOML/YAML/JSON file of EvalConfig fields.")
    p.add_argument("--quiet", action="store_true", help="No progress bars or step messages.")
    add_config_flags(p, EvalConfig, skip=("sae",))
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("dashboards", help="Precompute an SAE's feature dashboards for the browser (resumable).")
    p.add_argument("sae_dir")
    p.add_argument("--n-tokens", type=int, default=131_072, help="Held-out token positions to scan.")
    p.add_argument("--batch-size", type=int, default=16, help="Sequences per model forward.")
    p.add_argument("--model", default=None, help="Model (default: the SAE's cfg.json model_name).")
    p.add_argument("--device", default="cpu", help="Torch device.")
    p.add_argument("--no-resume", action="store_true", help="Rebuild from scratch (labels are kept).")
    p.add_argument("--out-dir", default=None, help="Write the dashboards here (default: SAE_DIR/dashboards, the only place the browser reads).")
    p.add_argument("--quiet", action="store_true", help="No progress bars.")
    p.set_defaults(fn=cmd_dashboards)

    p = sub.add_parser("browse", help="Serve the Streamlit feature browser for every SAE folder under ROOT (localhost).")
    p.add_argument("root")
    p.add_argument("--host", default="127.0.0.1", help="Bind address (localhost: only this machine can connect).")
    p.add_argument("--port", type=int, default=8501, help="Port.")
    p.add_argument("--model", default=None, help="Model for every SAE (default: each SAE's cfg.json model_name).")
    p.add_argument("--device", default="cpu")
    p.set_defaults(fn=cmd_browse)

    p = sub.add_parser("methods", help="List training methods and their options.")
    p.set_defaults(fn=cmd_methods)

    p = sub.add_parser("verify", help="Check an SAE folder against its manifest, or an activation cache against its "
                       "checksums, and say what is wrong.")
    p.add_argument("folder")
    p.set_defaults(fn=cmd_verify)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


_PASSTHROUGH: dict[str, str] = {}


def _passthrough(sub, name: str, target: str, help_text: str) -> None:
    """A subcommand whose arguments are parsed by another module's own parser (``module:function``)."""
    _PASSTHROUGH[name] = target
    sub.add_parser(name, help=help_text, add_help=False)


def _run_passthrough(name: str, argv: list[str]) -> int:
    import contextlib
    import importlib

    module, fn = _PASSTHROUGH[name].split(":")
    lock = contextlib.nullcontext()
    if name == "bench" and argv and "-h" not in argv and "--help" not in argv:
        from saebench.evals.bench import build_parser as bench_parser
        from saebench.lock import folder_lock

        try:
            out = bench_parser().parse_known_args(argv)[0].out
        except SystemExit:  # bench's own parser reports the usage error below
            out = None
        if out:  # one bench run per output folder (its table, figures and result cache)
            lock = folder_lock(out, "bench run", hint="Wait for it to finish (its results are cached and reused), or pass another --out.")
    with lock:
        getattr(importlib.import_module(module), fn)(argv or ["--help"])
    return 0


class _Step:
    """``with _Step("loading model x", quiet):`` prints the step to stderr, then how long it took."""

    def __init__(self, what: str, quiet: bool = False):
        self.what, self.quiet = what, quiet

    def __enter__(self):
        import time

        self.t0 = time.perf_counter()
        if not self.quiet:
            print(f"{self.what} ...", file=sys.stderr, flush=True)
        return self

    def __exit__(self, exc_type, *_):
        import time

        if not self.quiet and exc_type is None:
            print(f"{self.what}: done in {time.perf_counter() - self.t0:.1f} s", file=sys.stderr, flush=True)
        return False


def _model_config(name: str | None) -> dict | None:
    """The HF config.json of a local model (the default one included) without loading it; None if unknown."""
    from saebench import models

    folder = models.default_model_dir() if name in (None, models.DEFAULT_MODEL) else Path(name).expanduser()
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) else None


def _check_steer_site(sae, model_name: str | None, model=None) -> None:
    """The SAE's hook on this model: its block and head in range, then (with ``model``) a hook that fires.

    Without ``model`` only what the model's config.json tells (cheap, before loading it); with it,
    :func:`saebench.models.validate_hook_name` (suggestions for a typo) and the head count.
    """
    from saebench.site import Site

    site = Site.of_sae(sae)
    hook, head = site
    where = f"the SAE's hook {sae.cfg.hook_name!r} (cfg.json)"
    if model is None:
        cfg = _model_config(model_name) or {}
        n_layers = cfg.get("num_hidden_layers", cfg.get("n_layer"))
        n_heads = cfg.get("num_attention_heads", cfg.get("n_head"))
    else:
        from saebench.models import validate_hook_name

        if hook not in model.hook_dict:  # a registered name passes at once; the full check (one forward) only finds suggestions
            try:
                validate_hook_name(model, hook)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
        n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    if site.block is not None and isinstance(n_layers, int) and site.block >= n_layers:
        raise ValueError(f"{where}: block {site.block} does not exist; the model {model_name or 'smollm2-135m'!r} has blocks 0-{n_layers - 1}")
    if head is not None and isinstance(n_heads, int) and not 0 <= head < n_heads:
        raise ValueError(f"{where}: head {head} does not exist; the model has heads 0-{n_heads - 1}")


def _list_concepts() -> str:
    from saebench.evals.tasks import CONCEPTS

    lines = []
    for name, c in sorted(CONCEPTS.items()):
        lines.append(f"  {name:<12} {len(c.positive)} texts; target words: {', '.join(c.target_words[:6])}, ...")
    return "\n".join(lines)


def cmd_steer(args) -> int:
    """Default vs steered generation side by side, and the next-token log-prob shifts.

    Everything that can be checked without the model is checked first (latent range, strength,
    block and head of the SAE's hook); the max activation comes from the dashboards when they
    exist (no model pass), else from a capped scan with a progress bar.
    """
    import math
    import time

    if args.list_concepts:
        print("Steering concepts (the steering eval's; --concept NAME steers with the latent that separates its texts best):")
        print(_list_concepts())
        return 0
    missing = [f for f, v in (("sae_dir", args.sae_dir), ("--strength", args.strength), ("--prompt", args.prompt)) if v is None]
    if args.latent is None and args.concept is None:
        missing.append("--latent or --concept")
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (see saebench steer --help)")
    if args.latent is not None and args.concept is not None:
        raise ValueError("give --latent or --concept, not both")
    if not math.isfinite(args.strength):
        raise ValueError(f"--strength must be a finite number, got {args.strength}")
    if args.max_act is not None and not (math.isfinite(args.max_act) and args.max_act > 0):
        raise ValueError(f"--max-act must be a positive number, got {args.max_act}")
    if args.tokens < 0:
        raise ValueError(f"--tokens must be >= 0, got {args.tokens}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.max_act_tokens < 1:
        raise ValueError(f"--max-act-tokens must be >= 1, got {args.max_act_tokens}")
    if not args.prompt.strip():
        raise ValueError("--prompt is empty")

    from saebench import dashboards, models, steering, text
    from saebench.sae import SAE

    quiet = args.quiet
    sae = SAE.load(args.sae_dir, device=args.device)
    sae.requires_grad_(False)
    model_name = args.model or sae.cfg.model_name or None
    if args.latent is not None and not 0 <= args.latent < sae.cfg.d_sae:
        raise ValueError(f"--latent {args.latent} is out of range: this SAE has latents 0-{sae.cfg.d_sae - 1} (d_sae={sae.cfg.d_sae})")
    _check_steer_site(sae, model_name)

    with _Step(f"loading model {model_name or models.DEFAULT_MODEL}", quiet):
        model = models.load_model(model_name, device=args.device)
    _check_steer_site(sae, model_name, model)

    latent = args.latent
    if latent is None:
        from saebench.evals.steering import select_concept_latent
        from saebench.evals.tasks import CONCEPTS

        with _Step(f"choosing the latent for concept {args.concept!r}", quiet):
            info = select_concept_latent(model, sae, CONCEPTS[args.concept])
        latent = info["latent"]
        print(f"concept {args.concept!r}: latent {latent} (DiffMean score {info['diffmean_score']:.3g}, "
              f"detection AUROC {info['detection_auroc']:.2f})")

    max_act = args.max_act
    if max_act is None:
        found = dashboards.max_abs_activation(args.sae_dir, latent)
        if found is not None:
            max_act = found.value
            print(f"max |activation| of latent {latent}: {max_act:.4g} (from the dashboards, {found.n_tokens:,} held-out tokens)")
        else:
            corpus = sae.cfg.metadata.get("corpus", "default")
            ctx = sae.cfg.context_size or 128
            with _Step(f"reading {args.max_act_tokens:,} held-out tokens of {corpus!r}", quiet):
                toks = text.load_tokens(corpus, model.tokenizer, ctx, max(args.max_act_tokens, ctx), split="eval", prepend_bos=sae.cfg.prepend_bos,
                                        progress=not quiet)
            t_scan = time.perf_counter()
            max_act = steering.max_activation(sae, model, toks, latent, special_ids=text.special_ids(model.tokenizer), progress=not quiet)
            print(f"max |activation| of latent {latent}: {max_act:.4g} (scanned {toks.numel():,} held-out tokens in "
                  f"{time.perf_counter() - t_scan:.1f} s; "
                  f"no dashboards for these weights, so not exact: `saebench dashboards {args.sae_dir}` records it over 131,072 tokens)")
        if max_act <= 0:
            raise ValueError(f"latent {latent} never fired on those tokens, so it has no max activation to scale by; "
                             "give one with --max-act VALUE to steer with it anyway")
    run = steering.steer(model, sae, args.prompt, latent, args.strength, max_act, scope=args.scope, max_new_tokens=args.tokens, seed=args.seed,
                         temperature=args.temperature, top_p=args.top_p, use_kv_cache=not args.no_kv_cache)
    print(f"\nDEFAULT  | {run.default.text}\nSTEERED  | {run.steered.text}   (latent {latent}, strength {args.strength:+g} x max_act "
          f"{max_act:.4g}, scope {args.scope})")
    n_new = max(run.default.tokens.shape[1], run.steered.tokens.shape[1]) - run.default.prompt_len
    print(f"(default + steered, {n_new} new tokens, generated together in {run.seconds:.2f} s)")
    print("\nnext-token log-prob change under steering:")
    for tok, delta in run.logprob_diff:
        print(f"  {tok!r:>20}  {delta:+.3f}")
    return 0


def _register_steer(sub) -> None:
    p = sub.add_parser("steer", help="Steer generation with one latent: default vs steered, same seed.",
                       description="Default and steered continuations of a prompt, side by side (same seed, so the same sampling noise), "
                                   "plus the next-token log-prob changes. Strength is in units of the latent's max |activation|.",
                       epilog="steering concepts (--concept NAME):\n" + _list_concepts())
    p.add_argument("sae_dir", nargs="?", help="SAE folder.")
    p.add_argument("--latent", type=int, default=None, help="Latent index (or give --concept).")
    p.add_argument("--concept", choices=sorted(_concept_names()), default=None,
                   help="Steer with the latent that best separates this concept's texts (DiffMean, as the steering eval); see below.")
    p.add_argument("--list-concepts", action="store_true", help="List the steering concepts and exit.")
    p.add_argument("--strength", type=float, default=None, help="In units of the latent's max activation; negative allowed. Required.")
    p.add_argument("--prompt", default=None, help="Text to continue. Required.")
    p.add_argument("--max-act", type=float, default=None,
                   help="Max activation (default: from the SAE's dashboards when built, else measured on --max-act-tokens held-out tokens).")
    p.add_argument("--max-act-tokens", type=int, default=8_192, help="Cap on the held-out tokens scanned for the max activation when there are no dashboards.")
    p.add_argument("--scope", choices=["prompt", "generated", "all"], default="all", help="Positions steered.")
    p.add_argument("--tokens", type=int, default=30, help="New tokens to generate.")
    p.add_argument("--seed", type=int, default=0, help="Sampling seed, shared by the default and the steered run.")
    p.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature; 0 is greedy.")
    p.add_argument("--top-p", type=float, default=None, help="Nucleus sampling mass (default: none, the whole distribution).")
    p.add_argument("--no-kv-cache", action="store_true", help="Recompute the whole sequence every step (slow; for checking).")
    p.add_argument("--model", default=None, help="Model (default: the SAE's cfg.json model_name).")
    p.add_argument("--device", default="cpu", help="Torch device.")
    p.add_argument("--quiet", action="store_true", help="No progress bars or step messages.")
    p.set_defaults(fn=cmd_steer)


def _concept_names() -> list[str]:
    from saebench.evals.tasks import CONCEPTS

    return list(CONCEPTS)


def _register_evals(sub) -> None:
    """Every eval's own ``saebench <name>`` command, as its spec in ``evals/registry.py`` declares it (``main(argv)`` of the eval module)."""
    from saebench.evals import registry

    for cmd in registry.commands():
        _passthrough(sub, cmd.name, cmd.target, cmd.help)


_EXTRA_COMMANDS: list = [
    _register_steer,
    lambda sub: _passthrough(sub, "bench", "saebench.evals.bench:bench_main", "Evaluate many SAE folders with many evals; table + figures (resumable)."),
    _register_evals,
    lambda sub: _passthrough(sub, "itda-similarity", "saebench.trainers.itda_similarity:main", "Jaccard similarity of ITDA dictionaries (atom data positions) across layers/models."),
]


def _one_line(e: BaseException) -> str:
    import re

    return re.sub(r"\s*\n\s*", " ", str(e)).strip() or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one command. Known errors (bad config or arguments, broken artifacts or corpora, a busy folder, a failed
    write) print one ``saebench CMD: error: ...`` line and return 2 (user input) or 1 (environment: disk, files, a
    folder in use); ``--debug`` (anywhere) or ``SAEBENCH_DEBUG=1`` re-raises them with the traceback."""
    import os
    import warnings

    from saebench.config import SaebenchWarning
    from saebench.lock import FolderInUseError

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = bool(os.environ.get("SAEBENCH_DEBUG")) or "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if argv and argv[0] in _PASSTHROUGH:
        args = argparse.Namespace(command=argv[0], fn=lambda a: _run_passthrough(argv[0], argv[1:]))
    else:
        args = parser.parse_args(argv)
    show = warnings.showwarning

    def show_warning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, SaebenchWarning):  # our own warnings: one line, like the errors
            print(f"saebench {args.command}: warning: {_one_line(message)}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_warning
            return args.fn(args)
    except (ConfigError, ValueError, RuntimeError, OSError) as e:
        # Known user-facing errors: one clear line, no traceback.
        if debug:
            raise
        print(f"saebench {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 1 if isinstance(e, (OSError, FolderInUseError)) else 2
    except KeyboardInterrupt:
        print("\ninterrupted; a training run resumes from its last checkpoint when restarted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
