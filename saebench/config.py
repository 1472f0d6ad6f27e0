"""Typed, validated, frozen configs. A typo is an error, not a silent default.

Configs load from TOML/YAML/JSON files plus ``--field value`` overrides; the CLI's ``--help`` is
generated from the field descriptions here, so documentation and behaviour cannot drift apart.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from saebench.layout import CFG_FILE, MANIFEST_FILE, WEIGHTS_FILE


class ConfigError(ValueError):
    """A config file or flag is invalid; the message says which field and why."""


class SaebenchWarning(UserWarning):
    """Something the user should know that does not stop the run (the CLI prints it as one ``warning:`` line)."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrainConfig(_Frozen):
    """Everything that defines an SAE training run."""

    # what to train on
    model: str = Field("smollm2-135m", description="Model: 'smollm2-135m' (embedded, offline), a local HF folder, or a hub name.")
    hook_name: str = Field("blocks.15.hook_resid_post", description="TransformerLens hook point, e.g. blocks.6.hook_resid_post, blocks.6.hook_mlp_out, blocks.6.attn.hook_z (add ':H' for one head).")
    corpus: str = Field("default", description="Text: 'default' (offline English), a .txt/.jsonl/.parquet file or folder, or 'hf:NAME[:CONFIG]'.")
    context_size: int = Field(128, gt=1, description="Tokens per packed sequence (BOS included).")
    prepend_bos: bool = Field(True, description="Start each packed sequence with BOS.")
    exclude_special_tokens: bool = Field(True, description="Drop BOS/EOS/pad positions from training and evaluation.")
    outlier_norm_factor: float | None = Field(10.0, gt=1, description="Drop tokens whose activation norm exceeds this multiple of the median (attention sinks); null keeps all.")

    # the SAE
    method: str = Field("topk", description="Training method: topk, batchtopk, jumprelu, abstopk, ... (see `saebench methods`).")
    d_sae: int | None = Field(None, gt=0, description="Number of latents; default expansion_factor * d_in.")
    expansion_factor: int = Field(8, gt=0, description="d_sae = expansion_factor * d_in when d_sae is not given.")
    k: int = Field(32, gt=0, description="Active latents per token (mean per token for batch methods).")
    method_options: dict[str, Any] = Field(default_factory=dict, description="Method-specific options (validated by the method; see `saebench methods`).")
    # transcoders (issue #18.7): read hook_name, predict target_hook
    target_hook: str | None = Field(None, description=(
        "Train a transcoder: read hook_name and predict the activation at this hook (e.g. hook_name=blocks.5.ln2.hook_normalized, "
        "target_hook=blocks.5.hook_mlp_out); both come from one forward. Any method whose step is the shared sparse pipeline "
        "(topk, batchtopk, jumprelu, abstopk, standard, ...) works; null trains an SAE."))
    skip_transcoder: bool = Field(False, description="With target_hook: add a learned linear skip term W_skip x (skip-transcoder, Paulo et al. 2025).")
    normalize_activations: Literal["expected_average_only_in", "none"] = Field("expected_average_only_in", description="Scale inputs so E||x|| = sqrt(d_in) during training; folded into the weights at save time.")

    # optimisation
    training_tokens: int = Field(2_000_000, gt=0, description="Tokens the SAE is trained on (epochs over a cache count each time).")
    batch_size_tokens: int = Field(4096, gt=0, description="Tokens per optimizer step.")
    lr: float | None = Field(None, gt=0, description=(
        "Adam learning rate; default 2e-4 / sqrt(d_sae / 2^14) * sqrt(768 / d_in): Gao et al.'s width scaling (fitted at d_in 768) "
        "carried to other input sizes, e.g. 4.4e-4 at d_in 576, d_sae 4608; 2.2e-3 at d_in 80, d_sae 1280. Raise it (2-3x) for short "
        "runs (under ~1,000 steps) or when features are learned slowly (FVU still falling at the end); lower it if the loss spikes "
        "or latents die early. Methods share it (JumpReLU's thresholds take threshold_lr_scale times it)."))
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas.")
    adam_eps: float = Field(1e-8, gt=0, description="Adam epsilon.")
    lr_warmup_steps: int = Field(100, ge=0, description="Linear learning-rate warmup steps.")
    lr_decay_fraction: float = Field(0.2, ge=0, le=1, description="Fraction of training at the end over which the LR decays linearly to 0.")
    grad_clip_norm: float | None = Field(1.0, gt=0, description="Gradient-norm clip; null disables.")
    dead_window_tokens: int = Field(1_000_000, gt=0, description="A latent is dead after this many tokens without firing (drives AuxK and dead_fraction).")
    seed: int = Field(0, description="Seed for initialisation and data order.")
    data_seed: int | None = Field(None, description="Seed for the data order when it should differ from `seed` (SAEs trained together share one data order); default `seed`.")

    # data pipeline
    activation_cache: str | None = Field(None, description="Folder for a disk cache of activations; harvested once, reused across runs and epochs.")
    harvest_tokens: int | None = Field(None, gt=0, description="Unique tokens to harvest into the cache (default: training_tokens).")
    shuffle_buffer_tokens: int = Field(65_536, gt=0, description="Tokens shuffled together (one cache shard / one harvested chunk).")
    model_batch_size: int = Field(16, gt=0, description="Sequences per model forward while harvesting.")
    device: str = Field("cpu", description="Device: cpu, cuda, cuda:1, ...")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="SAE parameter dtype.")
    autocast: bool = Field(False, description="Run the SAE forward and loss under bfloat16 autocast (the dense encoder product in bf16), keeping float32 master weights, gradients and Adam state.")
    tf32: bool = Field(True, description="On CUDA, let float32 matmuls use TF32 tensor cores (torch.set_float32_matmul_precision('high')); ignored on CPU.")
    on_nonfinite: Literal["stop", "skip"] = Field("stop", description="What to do with a NaN/inf batch or loss: stop with a report (keeping the last checkpoint) or skip the step.")

    # output
    out_dir: str = Field("runs/sae", description=f"Folder the trained SAE ({WEIGHTS_FILE}, {CFG_FILE}, {MANIFEST_FILE}: SAELens' layout) is written to.")
    checkpoint_every_steps: int = Field(200, gt=0, description="Steps between checkpoints (resume picks up the latest).")
    resume: bool = Field(True, description="Resume from out_dir's latest checkpoint if there is one.")
    log_every_steps: int = Field(10, gt=0, description="Steps between progress-bar and wandb updates.")
    wandb: bool = Field(False, description="Log to Weights & Biases (SAELens-style keys); off by default.")
    wandb_project: str = Field("saebench", description="wandb project name.")
    eval_tokens: int = Field(65_536, ge=0, description="Held-out tokens for the core eval after training; 0 skips it.")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.d_sae is not None and self.k > self.d_sae:
            raise ValueError(f"k={self.k} must be <= d_sae={self.d_sae}")
        if self.skip_transcoder and not self.target_hook:
            raise ValueError("skip_transcoder=true needs target_hook (the hook the transcoder predicts)")
        if self.target_hook is not None and self.target_hook == self.hook_name:
            raise ValueError(f"target_hook equals hook_name ({self.hook_name!r}): a transcoder predicts another hook; leave target_hook unset for an SAE")
        if self.batch_size_tokens > self.training_tokens:
            raise ValueError(f"batch_size_tokens={self.batch_size_tokens} exceeds training_tokens={self.training_tokens}")
        if 0 < self.eval_tokens < self.context_size:
            raise ValueError(f"eval_tokens={self.eval_tokens} is less than one sequence (context_size={self.context_size}); "
                             "raise it, or set it to 0 to skip the eval after training")
        return self

    @property
    def total_steps(self) -> int:
        return self.training_tokens // self.batch_size_tokens

    @property
    def effective_data_seed(self) -> int:
        """The seed of the data order: ``data_seed`` if set, else ``seed``."""
        return self.seed if self.data_seed is None else self.data_seed


class EvalConfig(_Frozen):
    """Core evaluation of trained SAEs on held-out tokens."""

    sae: str = Field(..., description="SAE folder to evaluate.")
    model: str | None = Field(None, description="Model (default: the one recorded in the SAE's cfg.json).")
    corpus: str | None = Field(None, description="Text (default: the SAE's training corpus, held-out split).")
    eval_tokens: int = Field(65_536, gt=0, description="Held-out tokens to evaluate on.")
    context_size: int | None = Field(None, gt=1, description="Sequence length (default: the SAE's).")
    model_batch_size: int = Field(16, gt=0, description="Sequences per model forward.")
    exclude_special_tokens: bool = Field(True, description="Exclude BOS/EOS/pad from all metrics.")
    device: str = Field("cpu", description="Device.")
    out: str | None = Field(None, description="Where to write the metrics JSON (default: SAE_DIR/eval_core.json).")


C = TypeVar("C", bound=BaseModel)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML, YAML or JSON config file into a dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"config file {path}: unknown extension {path.suffix!r}; use .toml, .yaml or .json")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"config file {path} does not parse: {e}") from None
    except Exception as e:  # yaml.YAMLError and friends
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"config file {path} does not parse: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table/mapping of fields, got {type(data).__name__}")
    return data


def build_config(cls: type[C], data: dict[str, Any]) -> C:
    """Validate ``data`` into ``cls``, turning pydantic errors into one readable ``ConfigError``."""
    unknown = [key for key in data if key not in cls.model_fields]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, list(cls.model_fields), n=1) if isinstance(key, str) else []
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"unknown config field(s) for {cls.__name__}: {', '.join(hints)}")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        msgs = [f"{'.'.join(map(str, err['loc'])) or cls.__name__}: {err['msg']}" for err in e.errors()]
        raise ConfigError("invalid config: " + "; ".join(msgs)) from None


def load_config(cls: type[C], path: str | Path | None = None, **overrides: Any) -> C:
    """Load ``cls`` from an optional file, then apply keyword overrides (None values are ignored)."""
    data = read_config_file(path) if path else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    return build_config(cls, data)


def load_sweep(path: str | Path, **overrides: Any) -> list[TrainConfig]:
    """Several TrainConfigs (SAEs trained together from one activation stream) from one file.

    The file has a ``base`` table of fields shared by every SAE, an optional ``grid`` table of lists
    (one SAE per combination), and an optional ``sae`` list of tables (one SAE each, on top of every
    grid combination). ``out_dir`` may name fields in braces, e.g. ``"runs/{hook_name}-{method}-s{seed}"``;
    ``overrides`` (e.g. CLI flags) apply to every SAE. In TOML::

        [base]
        training_tokens = 2_000_000
        out_dir = "runs/{hook_name}/{method}-k{k}"
        [grid]
        hook_name = ["blocks.6.hook_resid_post", "blocks.10.hook_resid_post"]
        k = [32, 64]
        [[sae]]
        method = "topk"
        [[sae]]
        method = "batchtopk"
    """
    import itertools

    data = read_config_file(path)
    unknown = set(data) - {"base", "grid", "sae"}
    if unknown:
        raise ConfigError(f"sweep file {path}: unknown top-level key(s) {sorted(unknown)}; expected 'base', 'grid' and/or 'sae'")
    base = dict(data.get("base") or {})
    grid = data.get("grid") or {}
    saes = data.get("sae") or [{}]
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"sweep file {path}: 'grid' must map field names to non-empty lists of values")
    if not isinstance(saes, list) or not all(isinstance(v, dict) for v in saes):
        raise ConfigError(f"sweep file {path}: 'sae' must be a list of tables of fields")
    out: list[TrainConfig] = []
    keys = list(grid)
    for combo in itertools.product(*(grid[k] for k in keys)):
        for sae in saes:
            fields = base | dict(zip(keys, combo)) | sae | {k: v for k, v in overrides.items() if v is not None}
            if isinstance(fields.get("out_dir"), str):
                try:
                    fields["out_dir"] = fields["out_dir"].format(**{k: str(v).replace("/", "_") for k, v in fields.items()})
                except (KeyError, IndexError, ValueError) as e:
                    raise ConfigError(f"sweep file {path}: out_dir {fields['out_dir']!r} names an unknown field ({e})") from None
            out.append(build_config(TrainConfig, fields))
    dirs = [c.out_dir for c in out]
    dup = sorted({d for d in dirs if dirs.count(d) > 1})
    if dup:
        raise ConfigError(f"sweep file {path}: several SAEs would be written to the same out_dir {dup}; put fields in braces in out_dir, e.g. 'runs/{{hook_name}}-{{method}}'")
    return out


# --------------------------------------------------------------------------- command-line flags from configs


class HelpFormatter(argparse.HelpFormatter):
    """``--help`` shows every option's default: ``(default: X)`` unless the help already says it.

    Flags whose default is None or a boolean switch say what happens when they are left out in
    their own help text instead (``None`` alone tells a user nothing). A description or epilog
    with line breaks (a list) is printed as written; one without is wrapped.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or "(default" in text or "[default" in text or action.default in (None, argparse.SUPPRESS)
                or isinstance(action.default, bool)):
            return text
        return f"{text} (default: %(default)s)".strip()

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and action.option_strings and action.default not in (None, argparse.SUPPRESS) and not isinstance(action.default, bool):
            action = copy.copy(action)  # an option without help text still shows its default
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


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


def config_fields(cls: type) -> list[tuple[str, Any, Any, str]]:
    """``(name, type, default, description)`` of every field of a pydantic model or a dataclass config."""
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return [(n, f.annotation, f.default if f.default_factory is None else f.default_factory(), f.description or "")
                for n, f in cls.model_fields.items()]
    if dataclasses.is_dataclass(cls):
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            out.append((f.name, hints.get(f.name, Any), default, f.metadata.get("help", "")))
        return out
    raise TypeError(f"{cls!r} is neither a pydantic model nor a dataclass")


def _optional(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _typed(kind, optional: bool):
    """An argparse ``type=`` that converts to ``kind`` ('none'/'null' gives None when the field is optional)."""

    def convert(text: str):
        if optional and text.lower() in ("none", "null"):
            return None
        return kind(text)

    convert.__name__ = getattr(kind, "__name__", "value")  # argparse names the type in its errors
    return convert


def add_config_flags(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (), *, prefix: str = "", dest_prefix: str = "",
                     flags: dict[str, list[str]] | None = None, helps: dict[str, str] | None = None,
                     choices: dict[str, list[Any]] | None = None, title: str | None = None, show_defaults: bool = False,
                     unset: tuple[str, ...] = ()) -> dict[str, str]:
    """One ``--field`` flag per config field (a pydantic model or a dataclass), with its description and default as help.

    ``prefix`` names the flags ``--PREFIX-FIELD``; ``dest_prefix`` the parsed attributes; ``flags`` gives a field
    its own option strings (e.g. older spellings), ``helps`` and ``choices`` add what a dataclass field cannot
    say itself. Every flag defaults to None (unset), so a config file or the config's own default applies; with
    ``show_defaults`` the flags default to the fields' defaults instead (but those named in ``unset``), shown
    as ``(default: X)`` by :class:`HelpFormatter`.
    Returns ``{field: dest}``.
    """
    group = parser.add_argument_group(title or f"{cls.__name__} fields (also settable in --config)")
    typed = not (isinstance(cls, type) and issubclass(cls, BaseModel))  # dataclass fields: convert to the declared type
    dests = {}
    for name, annotation, default, description in config_fields(cls):
        if name in skip:
            continue
        names = (flags or {}).get(name) or ["--" + (f"{prefix}-" if prefix else "") + name.replace("_", "-")]
        dest = dest_prefix + name
        dests[name] = dest
        tp = _unwrap(annotation)
        args = typing.get_args(tp)
        shown = show_defaults and name not in unset and tp is not bool and default is not None
        # a flag that defaults to the field's value shows it as argparse does, "(default: X)" (HelpFormatter); one left unset says it
        help_text = (helps or {}).get(name) or description
        help_text = help_text if shown else f"{help_text} [default: {default!r}]".strip()
        kw: dict[str, Any] = {"dest": dest, "default": (list(default) if isinstance(default, tuple) else default) if shown else None,
                              "help": help_text}
        if name in (choices or {}):
            kw |= {"choices": choices[name], "metavar": None}  # the choices are the metavar
        if tp is bool:
            group.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(tp) is typing.Literal:
            group.add_argument(*names, **({"choices": args} | kw))
        elif typing.get_origin(tp) is dict or tp is dict:
            group.add_argument(*names, action="append", metavar="KEY=VALUE", **(kw | {"help": help_text + " (repeatable)"}))
        elif typing.get_origin(tp) is tuple and len(args) == 2 and args[1] is Ellipsis:
            group.add_argument(*names, nargs="+", type=args[0] if args[0] in (int, float, str) else _parse_value, **({"metavar": name.upper()} | kw))
        elif typing.get_origin(tp) is tuple:
            group.add_argument(*names, nargs=len(args), type=float, **kw)
        elif typed and tp in (int, float, str):
            group.add_argument(*names, type=_typed(tp, _optional(annotation)), **({"metavar": name.upper()} | kw))
        else:
            group.add_argument(*names, type=_parse_value, metavar=name.upper(), **kw)
    return dests


def flag_values(args: argparse.Namespace, cls: type, dests: dict[str, str]) -> dict[str, Any]:
    """The fields of ``cls`` whose flags (from :func:`add_config_flags`) were given, lists as tuples for tuple fields."""
    out = {}
    types_ = {name: _unwrap(tp) for name, tp, _, _ in config_fields(cls)}
    for name, dest in dests.items():
        val = getattr(args, dest, None)
        if val is None:
            continue
        if isinstance(val, list) and typing.get_origin(types_[name]) is tuple:
            val = tuple(val)
        out[name] = val
    return out


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


def _kv(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--method-options expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k] = _parse_value(v)
    return out


