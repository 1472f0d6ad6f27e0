"""The eval registry: an eval defined in one module (here, inside this test) runs through ``run_bench``
(cached, tabulated, with a figure), gets its ``saebench bench`` flags from its config and its own
``saebench`` command, with no other file touched."""

from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass

import plotly.graph_objects as go
import pytest
import torch
from helpers_evals import random_topk_sae
from pydantic import BaseModel, ConfigDict, Field
from saebench.evals import registry
from saebench.evals.bench import BenchConfig, run_bench
from saebench.evals.registry import Command, ConfigSpec, EvalSpec, register

HOOK = "blocks.0.hook_resid_post"


# --------------------------------------------------------------------------- the toy eval module


@dataclass(frozen=True)
class ToyConfig:
    """A dataclass config: ``--toy-scale`` and ``--toy-label`` in ``saebench bench``."""

    scale: float = 1.0
    label: str = "plain"

    def to_dict(self):
        return {"scale": self.scale, "label": self.label}


class ToyHookConfig(BaseModel):
    """A pydantic config: ``--toy-hook-rows`` in ``saebench bench``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    rows: int = Field(2, gt=0, description="Token rows the toy hook eval reads.")


def decoder_norm(sae, cfg: ToyConfig) -> dict:
    return {"dec_norm": float(sae.W_dec.detach().norm(dim=-1).mean()) * cfg.scale, "label": cfg.label}


def toy_main(argv):
    p = argparse.ArgumentParser(prog="saebench toy-eval")
    p.add_argument("sae_dir")
    a = p.parse_args(argv)
    from saebench.sae import SAE

    print(f"toy dec_norm {decoder_norm(SAE.load(a.sae_dir), ToyConfig())['dec_norm']:.6f}")
    return 0


def _hook_eval(ctx, saes, sae_dirs):
    """Per hook: how many SAEs shared the job, and the tokens it was given (the bench's, cut to the config's rows)."""
    rows = ctx.config("toy_hook").rows
    return [{"group_size": len(saes), "n_tokens": int(ctx.tokens[:rows].numel()), "d_sae": s.d_sae} for s in saes]


TOY = EvalSpec(
    name="toy", aliases=("toy_alias",), scope="sae", needs_model=False, order=200,
    configs=(ConfigSpec("toy", ToyConfig, prefix="toy", helps={"scale": "multiplies the decoder norm"}),),
    compute=lambda ctx, sae, sae_dir: decoder_norm(sae, ctx.config("toy")),
    cache_key=lambda cfgs, data: cfgs["toy"].to_dict(),
    columns=lambda r: {"toy_dec_norm": r["dec_norm"], "toy_label": r["label"]},
    figures=lambda rows, results: {"toy": go.Figure(go.Bar(y=[r["toy_dec_norm"] for r in rows if "toy_dec_norm" in r]))},
    command=Command("toy-eval", "The toy eval of tests/test_registry.py.", f"{__name__}:toy_main"),
)
TOY_HOOK = EvalSpec(
    name="toy_hook", scope="hook", order=201, compute=_hook_eval,
    configs=(ConfigSpec("toy_hook", ToyHookConfig, prefix="toy-hook"),),
    cache_key=lambda cfgs, data: registry.data_key(data) | {"rows": cfgs["toy_hook"].rows},
    tokens_needed=lambda cfgs, data: 64,
    columns=lambda r: {"toy_group_size": r["group_size"], "toy_n_tokens": r["n_tokens"]},
)


# --------------------------------------------------------------------------- tests


@pytest.fixture
def toy_registered():
    from saebench import cli

    register(TOY)
    register(TOY_HOOK)
    yield
    registry.unregister("toy")
    registry.unregister("toy_hook")
    cli._PASSTHROUGH.pop("toy-eval", None)


@pytest.fixture
def two_saes(tmp_path):
    for k in (4, 8):
        random_topk_sae(64, 128, k, HOOK, seed=k).save(tmp_path / "saes" / f"topk{k}")
    return tmp_path / "saes"


def _norm(folder) -> float:
    from saebench.sae import SAE

    return float(SAE.load(folder).W_dec.detach().norm(dim=-1).mean())


def test_a_registered_eval_runs_caches_and_tabulates(toy_registered, two_saes, tmp_path):
    out = tmp_path / "bench"
    res = run_bench(str(two_saes / "*"), ["toy_alias"], out_dir=out, toy=ToyConfig(scale=2.0, label="x"), progress=False)
    assert sorted(ev for _, ev in res.computed) == ["toy", "toy"] and not res.cached
    for row in res.rows:
        assert row["toy_dec_norm"] == pytest.approx(2.0 * _norm(row["sae_dir"])) and row["toy_label"] == "x"
        assert row["seconds[toy]"] >= 0
    assert res.files["figure:toy"].exists()
    assert [j["job"] for j in res.timings["jobs"]] == ["toy", "toy"]  # one job per SAE, no model loaded
    assert res.timings["model_load_seconds"] == 0.0
    # the same config: every result from the cache; another config: recomputed (the cache key is the config's)
    cfg = BenchConfig(out_dir=str(out), progress=False, configs={"toy": ToyConfig(2.0, "x")})
    again = run_bench(str(two_saes / "*"), ["toy"], config=cfg)
    assert again.computed == [] and len(again.cached) == 2 and again.rows == res.rows
    other = run_bench(str(two_saes / "*"), ["toy"], out_dir=out, scale=3.0, progress=False)  # a field of one config, by name
    assert len(other.computed) == 2
    assert other.rows[0]["toy_dec_norm"] == pytest.approx(3.0 * _norm(other.rows[0]["sae_dir"])) and other.rows[0]["toy_label"] == "plain"


def test_a_registered_hook_eval_shares_one_job_per_hook(toy_registered, two_saes, tmp_path, tiny_model):
    toks = torch.randint(3, 20_000, (4, 16), generator=torch.Generator().manual_seed(0))
    res = run_bench(str(two_saes / "*"), ["toy_hook", "compat"], tiny_model, out_dir=tmp_path / "b", tokens=toks,
                    toy_hook=ToyHookConfig(rows=3), progress=False)
    assert [r["toy_group_size"] for r in res.rows] == [2, 2] and [r["toy_n_tokens"] for r in res.rows] == [48, 48]
    jobs = [j for j in res.timings["jobs"] if j["job"] == "toy_hook"]
    assert len(jobs) == 1 and jobs[0]["hook"] == HOOK and sorted(jobs[0]["saes"]) == ["topk4", "topk8"]
    assert all(r["saebench_compatible"] for r in res.rows)  # registered evals and the toy ones in one run


def test_a_registered_eval_gets_bench_flags_and_a_command(toy_registered, two_saes, tmp_path, capsys):
    from saebench.evals.bench import build_parser as bench_parser

    from saebench.cli import build_parser, main

    bp = bench_parser()
    text = bp.format_help()
    assert "--toy-scale" in text and "--toy-label" in text and "multiplies the decoder norm" in text and "--toy-hook-rows" in text
    evals_help = next(a.help for a in bp._actions if "--evals" in a.option_strings)
    assert "toy, toy_hook" in evals_help and "toy_alias = toy" in evals_help  # listed among the evals
    out = tmp_path / "cli"
    assert main(["bench", str(two_saes), "--evals", "toy", "--toy-scale", "4", "--toy-label", "cli", "--out", str(out), "--no-progress",
                 "--no-figures"]) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert "toy_dec_norm" in rows[0] and {r["toy_label"] for r in rows} == {"cli"}
    for r in rows:
        assert float(r["toy_dec_norm"]) == pytest.approx(4.0 * _norm(r["sae_dir"]), rel=1e-6)
    with pytest.raises(SystemExit):  # the flag has the field's type
        main(["bench", str(two_saes), "--evals", "toy", "--toy-scale", "oops", "--out", str(out)])
    assert "--toy-scale: invalid float value: 'oops'" in capsys.readouterr().err
    # its own command, registered from the spec
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert "toy-eval" in sub
    assert main(["toy-eval", str(two_saes / "topk4")]) == 0
    assert f"toy dec_norm {_norm(two_saes / 'topk4'):.6f}" in capsys.readouterr().out


def test_registry_refuses_clashes_and_unknown_evals(toy_registered, tmp_path):
    with pytest.raises(ValueError, match="taken by 'toy'"):
        register(EvalSpec(name="other", aliases=("toy_alias",), compute=lambda c, s, d: {}, cache_key=lambda c, d: {},
                          columns=lambda r: {}))
    with pytest.raises(ValueError, match="config key 'toy' .* taken by 'toy'"):
        register(EvalSpec(name="other", configs=(ConfigSpec("toy", ToyConfig),), compute=lambda c, s, d: {}, cache_key=lambda c, d: {},
                          columns=lambda r: {}))
    with pytest.raises(ValueError, match="either compute or shared"):
        EvalSpec(name="x", cache_key=lambda c, d: {}, columns=lambda r: {})
    with pytest.raises(ValueError, match=r"unknown eval.*'toy'"):
        registry.resolve(["nope"])
    with pytest.raises(TypeError, match="unexpected keyword 'bogus'"):
        run_bench(str(tmp_path), ["toy"], bogus=1)
    assert {"core", "dead", "steering", "circuits", "compat", "sparse_probing", "absorption", "autointerp"} <= set(registry.names())


def test_eval_commands_take_flags_generated_from_their_config(tiny_model_dir, tmp_path, capsys):
    """``saebench sparse-probing`` / ``absorption``: one flag per config field (as ``saebench bench``'s, without the prefix)."""
    import json
    import random

    from saebench.cli import main

    for cmd, expect in (("sparse-probing", ("--train-size", "(default: 200)", "--ks", "--context-length")),
                        ("absorption", ("--max-words", "(default: 2000)", "--min-letters", "--l1-iters"))):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        assert all(x in text for x in expect), (cmd, text)
    rng = random.Random(0)
    words = {"fruit": ["apple", "banana", "cherry", "grape", "lemon", "mango"],
             "place": ["river", "mountain", "forest", "desert", "valley"]}
    data = tmp_path / "task.jsonl"
    data.write_text("\n".join(json.dumps({"text": " ".join(rng.choice(w) for _ in range(12)), "label": lab}) for lab, w in words.items()
                              for _ in range(12)))
    random_topk_sae(64, 128, 4, HOOK).save(tmp_path / "sae")
    out = tmp_path / "sp.json"
    assert main(["sparse-probing", str(tmp_path / "sae"), "--model", str(tiny_model_dir), "--datasets", str(data), "--train-size", "12",
                 "--test-size", "8", "--ks", "1", "3", "--context-length", "16", "--no-progress", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert "sae_top_3_test_accuracy" in res and "sae_top_5_test_accuracy" not in res  # --ks reached the config
    # Without --out the result lands in the SAE folder, under the eval's own file name.
    assert main(["sparse-probing", str(tmp_path / "sae"), "--model", str(tiny_model_dir), "--datasets", str(data), "--train-size", "12",
                 "--test-size", "8", "--ks", "1", "--context-length", "16", "--no-progress"]) == 0
    assert "sae_top_1_test_accuracy" in json.loads((tmp_path / "sae" / "eval_sparse_probing.json").read_text())


def test_steering_and_circuit_commands_build_their_config_from_the_flags(tiny_model_dir, tmp_path):
    """``saebench steering-eval`` / ``circuits``: the generated flags reach the config the eval runs with (recorded in its JSON)."""
    import json

    from saebench.cli import main

    random_topk_sae(64, 128, 4, HOOK).save(tmp_path / "sae")
    out = tmp_path / "steer.json"
    assert main(["steering-eval", str(tmp_path / "sae"), "--latent", "3", "--model", str(tiny_model_dir), "--strengths", "1.5",
                 "--n-prompts", "2", "--max-new-tokens", "2", "--no-random-control", "--no-opposite-sign", "--no-progress",
                 "--out", str(out)]) == 0
    cfg = json.loads(out.read_text())["config"]
    assert cfg["strengths"] == [1.5] and cfg["n_prompts"] == 2 and cfg["max_new_tokens"] == 2 and cfg["random_control"] is False
    assert cfg["scope"] == "all" and cfg["seed"] == 0  # the config's defaults for flags not given
    out = tmp_path / "circ.json"
    assert main(["circuits", str(tmp_path / "sae"), "--model", str(tiny_model_dir), "--n-examples", "4", "--method", "atp",
                 "--n-patch-check", "2", "--max-curve-points", "4", "--no-progress", "--out", str(out)]) == 0
    cfg = json.loads(out.read_text())["config"]
    assert cfg["n_examples"] == 4 and cfg["method"] == "atp" and cfg["max_curve_points"] == 4 and cfg["tasks"] == ["ioi"]


def test_every_registered_eval_config_is_validated():
    """Each eval's config is a pydantic model (BaseModel or pydantic dataclass): a wrong type is refused
    with a ValidationError naming the field, not stored and used later."""
    import dataclasses

    from pydantic import ValidationError

    seen = 0
    for key, spec in registry.config_specs().items():
        cls = spec.cls
        assert issubclass(cls, BaseModel) or hasattr(cls, "__pydantic_validator__"), f"{key}: {cls} is not a pydantic model"
        fields = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else list(cls.model_fields)
        ints = [n for n in fields if isinstance(getattr(cls(), n), int) and not isinstance(getattr(cls(), n), bool)]
        if not ints:
            continue
        with pytest.raises(ValidationError, match=ints[0]):
            cls(**{ints[0]: "not a number"})
        seen += 1
    assert seen >= 6  # core/dead, steering, circuits, sparse probing, absorption, autointerp (+ its judge)
