"""The ``saebench`` command. Flags are generated from the pydantic configs, so ``--help`` documents
every field and a config file plus flag overrides always validate the same way."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from saebench.config import ConfigError, EvalConfig, TrainConfig, build_config, read_config_file


def _parse_value(text: str) -> Any:
    """Interpret a flag value as JSON when it is one (numbers, null, lists), else as a string."""
    if text.lower() in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _unwrap(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _unwrap(args[0]) if len(args) == 1 else tp
    return tp


def add_config_flags(parser: argparse.ArgumentParser, cls: type[BaseModel], skip: tuple[str, ...] = ()) -> None:
    """One ``--field`` flag per config field, with its description and default as help."""
    group = parser.add_argument_group(f"{cls.__name__} fields (also settable in --config)")
    for name, field in cls.model_fields.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        default = field.default if field.default_factory is None else field.default_factory()
        help_text = f"{field.description or ''} [default: {default!r}]"
        tp = _unwrap(field.annotation)
        if tp is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(tp) is typing.Literal:
            group.add_argument(flag, dest=name, choices=typing.get_args(tp), default=None, help=help_text)
        elif typing.get_origin(tp) is dict or tp is dict:
            group.add_argument(flag, dest=name, action="append", metavar="KEY=VALUE", default=None, help=help_text + " (repeatable)")
        elif typing.get_origin(tp) is tuple:
            group.add_argument(flag, dest=name, nargs=len(typing.get_args(tp)), type=float, default=None, help=help_text)
        else:
            group.add_argument(flag, dest=name, type=_parse_value, metavar=name.upper(), default=None, help=help_text)


def collect(args: argparse.Namespace, cls: type[BaseModel], base: dict[str, Any] | None = None) -> Any:
    """Merge a config file's fields with the flags the user set, then validate."""
    data = dict(base or {})
    if getattr(args, "config", None):
        data.update(read_config_file(args.config))
    for name, field in cls.model_fields.items():
        val = getattr(args, name, None)
        if val is None:
            continue
        if isinstance(val, list) and (typing.get_origin(_unwrap(field.annotation)) is dict):
            val = dict(data.get(name) or {}) | _kv(val)
        data[name] = val
    return build_config(cls, data)


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


def _kv(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--method-options expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k] = _parse_value(v)
    return out


def cmd_dashboards(args) -> int:
    from saebench.dashboards import build_dashboards

    folder = build_dashboards(args.sae_dir, model=args.model, n_tokens=args.n_tokens, batch_size=args.batch_size, resume=not args.no_resume,
                              progress=not args.quiet, device=args.device)
    print(f"dashboards written to {Path(folder).resolve()}\nbrowse them with: saebench browse {Path(args.sae_dir).resolve().parent}")
    return 0


def cmd_browse(args) -> int:
    from saebench.dashboards import browse

    print(f"serving the feature browser for SAEs under {Path(args.root).resolve()} on http://{args.host}:{args.port}")
    return browse(args.root, host=args.host, port=args.port, model=args.model, device=args.device)


def cmd_eval(args) -> int:
    from saebench.evals.core import format_table, run_core_eval

    cfg = collect(args, EvalConfig, {"sae": args.sae_dir})
    metrics = run_core_eval(cfg.sae, corpus=cfg.corpus, eval_tokens=cfg.eval_tokens, context_size=cfg.context_size, batch_size=cfg.model_batch_size,
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
    return 0


def cmd_verify(args) -> int:
    from saebench.io import verify_folder
    from saebench.sae import SAE

    problems = verify_folder(args.folder)
    if not problems:
        try:
            SAE.load(args.folder)
        except Exception as e:  # report, don't trace back
            problems.append(str(e))
    if problems:
        print(f"{args.folder}: PROBLEMS")
        for p in problems:
            print(f"  - {p}")
        return 1
    print(f"{args.folder}: OK (all files match manifest.json; SAE loads)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saebench", description="Train, evaluate, browse and steer sparse autoencoders.")
    sub = parser.add_subparsers(dest="command", required=True)

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
    p.add_argument("--quiet", action="store_true")
    add_config_flags(p, EvalConfig, skip=("sae",))
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("dashboards", help="Precompute an SAE's feature dashboards for the browser (resumable).")
    p.add_argument("sae_dir")
    p.add_argument("--n-tokens", type=int, default=131_072, help="Held-out token positions to scan.")
    p.add_argument("--batch-size", type=int, default=16, help="Sequences per model forward.")
    p.add_argument("--model", default=None, help="Model (default: the SAE's cfg.json model_name).")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-resume", action="store_true", help="Rebuild from scratch (labels are kept).")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=cmd_dashboards)

    p = sub.add_parser("browse", help="Serve the Streamlit feature browser for every SAE folder under ROOT (localhost).")
    p.add_argument("root")
    p.add_argument("--host", default="127.0.0.1", help="Bind address (default localhost only).")
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="cpu")
    p.set_defaults(fn=cmd_browse)

    p = sub.add_parser("methods", help="List training methods and their options.")
    p.set_defaults(fn=cmd_methods)

    p = sub.add_parser("verify", help="Check an artifact folder against its manifest and say what is wrong.")
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
    import importlib

    module, fn = _PASSTHROUGH[name].split(":")
    getattr(importlib.import_module(module), fn)(argv or ["--help"])
    return 0


def cmd_steer(args) -> int:
    """Default vs steered generation side by side, and the next-token log-prob shifts."""
    from saebench import models, steering, text
    from saebench.sae import SAE

    sae = SAE.load(args.sae_dir, device=args.device)
    model = models.load_model(args.model or sae.cfg.model_name or None, device=args.device)
    max_act = args.max_act
    if max_act is None:
        toks = text.load_tokens(sae.cfg.metadata.get("corpus", "default"), model.tokenizer, sae.cfg.context_size or 128, args.max_act_tokens,
                                split="eval", prepend_bos=sae.cfg.prepend_bos)
        max_act = steering.max_activation(sae, model, toks, args.latent, special_ids=text.special_ids(model.tokenizer))
        print(f"max activation of latent {args.latent} over {toks.numel():,} held-out tokens: {max_act:.4g}")
    gen = dict(max_new_tokens=args.tokens, seed=args.seed, temperature=args.temperature, top_p=args.top_p, use_kv_cache=not args.no_kv_cache)
    default, steered = steering.steered_pair(model, sae, args.prompt, args.latent, args.strength, max_act, scope=args.scope, **gen)
    print(f"\nDEFAULT  | {default.text}\nSTEERED  | {steered.text}   (latent {args.latent}, strength {args.strength:+g} x max_act, scope {args.scope})")
    print("\nnext-token log-prob change under steering:")
    for tok, delta in steering.next_token_logprob_diff(model, sae, args.prompt, args.latent, args.strength, max_act, scope=args.scope):
        print(f"  {tok!r:>20}  {delta:+.3f}")
    return 0


def _register_steer(sub) -> None:
    p = sub.add_parser("steer", help="Steer generation with one latent: default vs steered, same seed.")
    p.add_argument("sae_dir")
    p.add_argument("--latent", type=int, required=True)
    p.add_argument("--strength", type=float, required=True, help="In units of the latent's max activation; negative allowed.")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-act", type=float, default=None, help="Max activation (default: measured on held-out text).")
    p.add_argument("--max-act-tokens", type=int, default=16_384, help="Held-out tokens used to measure the max activation.")
    p.add_argument("--scope", choices=["prompt", "generated", "all"], default="all")
    p.add_argument("--tokens", type=int, default=30, help="New tokens to generate.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--no-kv-cache", action="store_true")
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="cpu")
    p.set_defaults(fn=cmd_steer)


_EXTRA_COMMANDS: list = [
    _register_steer,
    lambda sub: _passthrough(sub, "bench", "saebench.evals.bench:bench_main", "Evaluate many SAE folders with many evals; table + figures (resumable)."),
    lambda sub: _passthrough(sub, "dead", "saebench.evals.dead:main", "Dead/dense-latent eval of one SAE over stated token windows."),
    lambda sub: _passthrough(sub, "steering-eval", "saebench.evals.steering:main", "Quantified steering sweep with controls and a Pareto curve."),
    lambda sub: _passthrough(sub, "circuits", "saebench.evals.circuits:main", "Feature circuits (attribution patching / IG) with faithfulness and completeness."),
]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in _PASSTHROUGH:
        args = argparse.Namespace(command=argv[0], fn=lambda a: _run_passthrough(argv[0], argv[1:]))
    else:
        args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as e:
        # Known user-facing errors: one clear line, no traceback (SAEBENCH_DEBUG=1 shows it).
        import os

        if os.environ.get("SAEBENCH_DEBUG"):
            raise
        print(f"saebench {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; a training run resumes from its last checkpoint when restarted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
