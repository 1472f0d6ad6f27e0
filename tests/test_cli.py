"""The command line end to end on a tiny model, and the errors a user actually hits."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from saebench.cli import main


def _train_args(tiny_model_dir, text_file, out, *extra):
    return ["train", "--quiet", "--model", str(tiny_model_dir), "--hook-name", "blocks.1.hook_resid_post", "--corpus", str(text_file),
            "--context-size", "32", "--k", "4", "--expansion-factor", "2", "--training-tokens", "4096", "--batch-size-tokens", "512",
            "--eval-tokens", "512", "--out-dir", str(out), "--lr-warmup-steps", "2", *extra]


def test_train_eval_verify_round_trip(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "sae"
    assert main(_train_args(tiny_model_dir, text_file, out, "--method-options", "auxk_coef=0.05")) == 0
    printed = capsys.readouterr().out
    assert "SAE written to" in printed and "CE loss recovered" in printed and "FVU" in printed
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["d_sae"] == 128 and cfg["k"] == 4 and cfg["hook_name"] == "blocks.1.hook_resid_post"
    assert cfg["metadata"]["method_options"] == {"auxk_coef": 0.05} and cfg["metadata"]["training_tokens"] == 4096
    metrics = json.loads((out / "eval_core.json").read_text())
    assert metrics["l0"] <= 4 and 0 <= metrics["fvu"] < 2
    assert main(["eval", str(out), "--eval-tokens", "256", "--quiet", "--out", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["n_tokens"] > 0
    assert main(["verify", str(out)]) == 0
    (out / "sae_weights.safetensors").write_bytes(b"garbage")
    assert main(["verify", str(out)]) == 1
    assert "sae_weights.safetensors: size" in capsys.readouterr().out


def test_config_file_plus_flag_override(tiny_model_dir, text_file, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tiny_model_dir}\nhook_name: blocks.0.hook_resid_post\ncorpus: {text_file}\ncontext_size: 32\nk: 8\n"
                   "expansion_factor: 2\ntraining_tokens: 2048\nbatch_size_tokens: 512\neval_tokens: 0\n")
    assert main(["train", "--quiet", "--config", str(cfg), "--k", "3", "--out-dir", str(tmp_path / "o")]) == 0
    assert json.loads((tmp_path / "o" / "cfg.json").read_text())["k"] == 3


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model", "no-such-org/no-such-model-xyz"], "Could not load model 'no-such-org/no-such-model-xyz'"),
        (["--hook-name", "blocks.1.hook_resid_pots"], "Did you mean one of: blocks.1.hook_resid_post"),
        (["--method", "topq"], "unknown method 'topq'"),
        (["--k", "lots"], "k: Input should be a valid integer"),
        (["--method-options", "auxk"], "expects KEY=VALUE"),
    ],
)
def test_user_errors_are_one_clear_line(tiny_model_dir, text_file, tmp_path, capsys, flags, message):
    args = _train_args(tiny_model_dir, text_file, tmp_path / "x")
    for i in range(0, len(flags), 2):  # replace the flag's value if present, else append
        if flags[i] in args:
            args[args.index(flags[i]) + 1] = flags[i + 1]
        else:
            args += flags[i : i + 2]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_empty_corpus_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(_train_args(tiny_model_dir, empty, tmp_path / "x")) == 2
    assert "holds no text" in capsys.readouterr().err


def test_help_documents_every_field():
    from saebench.config import TrainConfig

    out = subprocess.run([sys.executable, "-m", "saebench.cli", "train", "--help"], capture_output=True, text=True, check=True).stdout
    for name in TrainConfig.model_fields:
        assert "--" + name.replace("_", "-") in out


def test_wheel_and_editable_import_the_same_layout(tmp_path):
    """trainers/ and evals/ import as saebench.trainers / saebench.evals from a built wheel too."""
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(root)],
                   check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("saebench-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site"), str(wheel)], check=True, capture_output=True)
    code = ("import saebench, saebench.trainers, saebench.evals.core, saebench.trainers.loop; "
            "print(saebench.__file__); print(sorted(saebench.trainers.METHODS))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"}).stdout
    assert str(tmp_path / "site") in out.splitlines()[0]
    editable = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert out.splitlines()[1] == editable.splitlines()[1]


def test_steer_command_prints_both_generations(tiny_model_dir, tmp_path, capsys):
    import torch

    from saebench.sae import SAE, SAEConfig

    sae = SAE(SAEConfig(architecture="topk", d_in=64, d_sae=32, k=4, hook_name="blocks.1.hook_resid_post", model_name=str(tiny_model_dir)))
    sae.init_tied(torch.Generator().manual_seed(0))
    sae.save(tmp_path / "sae")
    assert main(["steer", str(tmp_path / "sae"), "--latent", "3", "--strength", "-4", "--max-act", "2.0", "--prompt", "The cat", "--tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert "DEFAULT  | The cat" in out and "STEERED  | The cat" in out and "strength -4" in out and "log-prob change" in out


def test_passthrough_commands_have_their_own_help(capsys):
    for cmd in ("bench", "dead", "steering-eval", "circuits"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
    assert "sae_dirs" in capsys.readouterr().out


def test_sweep_trains_several_saes_from_one_harvest_then_dashboards(tiny_model_dir, text_file, tmp_path, capsys):
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(f"""
[base]
model = "{tiny_model_dir}"
corpus = "{text_file}"
context_size = 32
expansion_factor = 2
k = 4
training_tokens = 2048
batch_size_tokens = 512
eval_tokens = 256
out_dir = "{tmp_path}/runs/{{hook_name}}-{{method}}"
[grid]
hook_name = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
method = ["topk", "batchtopk"]
""")
    assert main(["train", "--quiet", "--sweep", str(sweep), "--lr-warmup-steps", "1"]) == 0
    dirs = sorted((tmp_path / "runs").iterdir())
    assert len(dirs) == 4 and all((d / "eval_core.json").exists() for d in dirs)
    assert json.loads((dirs[0] / "cfg.json").read_text())["metadata"]["train_config"]["lr_warmup_steps"] == 1
    assert main(["dashboards", str(dirs[0]), "--n-tokens", "512", "--quiet"]) == 0
    assert "dashboards written to" in capsys.readouterr().out
    assert (dirs[0] / "dashboards" / "features.sqlite").exists()


# --------------------------------------------------------------------------- steer: validation, max activation, concepts


def _steer_sae(tmp_path, tiny_model_dir, hook="blocks.1.hook_resid_post", name="sae", corpus=None):
    import torch

    from saebench.sae import SAE, SAEConfig

    sae = SAE(SAEConfig(architecture="topk", d_in=64, d_sae=32, k=4, hook_name=hook, model_name=str(tiny_model_dir), context_size=32,
                        metadata={"corpus": str(corpus)} if corpus else {}))
    sae.init_tied(torch.Generator().manual_seed(0))
    return sae.save(tmp_path / name)


def _no_model(monkeypatch):
    """Make loading a model fail loudly: the checks under test must come before it."""
    import saebench.models

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(saebench.models, "load_model", boom)


def test_steer_latent_out_of_range_is_one_line_before_the_model_loads(tiny_model_dir, tmp_path, capsys, monkeypatch):
    folder = _steer_sae(tmp_path, tiny_model_dir)
    _no_model(monkeypatch)
    assert main(["steer", str(folder), "--latent", "999999", "--strength", "2", "--prompt", "The cat"]) == 2
    err = capsys.readouterr().err
    assert "--latent 999999 is out of range: this SAE has latents 0-31" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("hook, message, before_model", [
    ("blocks.7.hook_resid_post", "block 7 does not exist; the model", True),  # from config.json, no model needed
    ("blocks.1.hook_resid_pots", "Did you mean one of: blocks.1.hook_resid_post", False),
    ("blocks.0.attn.hook_z:99", "head 99 does not exist; the model has heads 0-3", True),
])
def test_steer_hook_errors_name_the_cfg_and_suggest(tiny_model_dir, tmp_path, capsys, monkeypatch, hook, message, before_model):
    d_in = 64
    import torch

    from saebench.sae import SAE, SAEConfig

    if hook.endswith(":99"):
        d_in = 16  # one head of hook_z
    sae = SAE(SAEConfig(architecture="topk", d_in=d_in, d_sae=32, k=4, hook_name=hook, model_name=str(tiny_model_dir)))
    sae.init_tied(torch.Generator().manual_seed(0))
    folder = sae.save(tmp_path / "typo")
    if before_model:
        _no_model(monkeypatch)
    assert main(["steer", str(folder), "--latent", "1", "--strength", "2", "--max-act", "1", "--prompt", "The cat"]) == 2
    err = capsys.readouterr().err
    assert message in err and f"the SAE's hook {hook!r} (cfg.json)" in err and "Traceback" not in err and "KeyError" not in err


def test_steer_takes_max_act_from_the_dashboards_without_a_scan(tiny_model_dir, tiny_model, text_file, tmp_path, capsys, monkeypatch):
    from saebench import dashboards as D
    from saebench import steering

    folder = _steer_sae(tmp_path, tiny_model_dir, corpus=text_file)
    D.build_dashboards(folder, model=tiny_model, n_tokens=512, feature_batch_size=16, progress=False)
    db = D.Dashboard(D.dashboard_dir(folder))
    latent = next(i for i in range(32) if not db.feature(i).dead)
    expect = db.feature(latent).max_abs_act

    def no_scan(*a, **k):
        raise AssertionError("scanned although the dashboards have the value")

    monkeypatch.setattr(steering, "max_activation", no_scan)
    assert main(["steer", str(folder), "--latent", str(latent), "--strength", "3", "--prompt", "The cat", "--tokens", "4", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"max |activation| of latent {latent}: {expect:.4g} (from the dashboards, {db.meta['n_valid_tokens']:,} held-out tokens)" in out
    assert "generated together in" in out and "DEFAULT  | The cat" in out
    assert D.max_abs_activation(folder, latent).value == expect
    # weights changed since the build: the dashboards' value is not used
    from saebench.sae import SAE

    sae = SAE.load(folder)
    with __import__("torch").no_grad():
        sae.W_dec.mul_(2)
    sae.save(folder)
    assert D.max_abs_activation(folder, latent) is None


def test_steer_scans_with_a_progress_bar_when_there_are_no_dashboards(tiny_model_dir, text_file, tmp_path, capsys):
    folder = _steer_sae(tmp_path, tiny_model_dir, corpus=text_file)
    code = main(["steer", str(folder), "--latent", "0", "--strength", "3", "--prompt", "The cat", "--tokens", "3", "--max-act-tokens", "256"])
    captured = capsys.readouterr()
    assert "loading model" in captured.err and "done in" in captured.err
    assert "max activation of latent 0" in captured.err  # the tqdm bar (stderr)
    if code == 0:
        assert "scanned 256 held-out tokens" in captured.out and "saebench dashboards" in captured.out
    else:  # latent 0 never fired on those tokens: a clear way out, not a zero vector
        assert code == 2 and "never fired" in captured.err and "--max-act VALUE" in captured.err


def test_steer_lists_the_steering_concepts(capsys):
    from saebench.evals.tasks import CONCEPTS

    assert main(["steer", "--list-concepts"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in CONCEPTS)
    help_out = subprocess.run([sys.executable, "-m", "saebench.cli", "steer", "--help"], capture_output=True, text=True, check=True).stdout
    assert "steering concepts" in help_out and all(f"  {name} " in help_out for name in CONCEPTS)
    assert main(["steer", "x"]) == 2 and "missing --strength, --prompt, --latent or --concept" in capsys.readouterr().err


def test_steer_with_a_concept_picks_its_latent(tiny_model_dir, tmp_path, capsys):
    folder = _steer_sae(tmp_path, tiny_model_dir)
    assert main(["steer", str(folder), "--concept", "food", "--strength", "2", "--max-act", "1.5", "--prompt", "The cat", "--tokens", "3",
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "concept 'food': latent" in out and "STEERED  | The cat" in out


# --------------------------------------------------------------------------- help, dashboards, browse, eval progress


def test_help_shows_the_default_of_every_option():
    import argparse

    from saebench.cli import HelpFormatter, build_parser
    from saebench.evals.bench import build_parser as bench_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    checked = 0
    for name, p in [*subs.items(), ("bench", bench_parser())]:
        if not p.add_help:
            continue  # passthrough placeholders: their own parser is checked (bench here, the rest below)
        assert p.formatter_class is HelpFormatter, name
        for a in p._actions:
            if not a.option_strings or a.default in (None, argparse.SUPPRESS) or isinstance(a.default, bool):
                continue
            shown = " ".join(p._get_formatter()._format_action(a).split())  # the option's lines in --help
            assert str(a.default) in shown, (name, a.option_strings, shown)
            checked += 1
    assert checked > 20  # config-field flags (default None, "[default: X]" in their help) come on top
    dash = subprocess.run([sys.executable, "-m", "saebench.cli", "dashboards", "--help"], capture_output=True, text=True, check=True).stdout
    assert "(default: 131072)" in dash and "--out-dir" in dash
    ev = " ".join(subprocess.run([sys.executable, "-m", "saebench.cli", "eval", "--help"], capture_output=True, text=True, check=True).stdout.split())
    assert "[default: 65536]" in ev
    bench = " ".join(bench_parser().format_help().split())
    assert "output folder (table, figures, cache/) (default: bench)" in bench


def test_passthrough_help_shows_defaults(capsys):
    for cmd, expect in (("steering-eval", "(default: all)"), ("dead", "(default: cpu)"), ("circuits", "(default: ['ioi'])")):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert expect in " ".join(capsys.readouterr().out.split()), cmd


def test_dashboards_with_other_settings_names_them_and_the_real_flags(tiny_model_dir, tiny_model, text_file, tmp_path, capsys):
    folder = _steer_sae(tmp_path, tiny_model_dir, corpus=text_file)
    assert main(["dashboards", str(folder), "--n-tokens", "512", "--model", str(tiny_model_dir)]) == 0
    err = capsys.readouterr().err
    assert "harvest + encode: 512 tokens (16 sequences × 32)" in err  # the bar is transient; the summary stays
    assert main(["dashboards", str(folder), "--n-tokens", "256", "--model", str(tiny_model_dir), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "n_tokens (--n-tokens): built with 512, asked for 256" in err and "--no-resume" in err and "--out-dir DIR" in err
    assert "differences: options" not in err and "Traceback" not in err
    other = tmp_path / "elsewhere"
    assert main(["dashboards", str(folder), "--n-tokens", "256", "--model", str(tiny_model_dir), "--quiet", "--out-dir", str(other)]) == 0
    assert (other / "features.sqlite").exists()


def test_browse_a_missing_root_fails_before_saying_it_serves(tmp_path, capsys):
    assert main(["browse", str(tmp_path / "nope")]) == 2
    captured = capsys.readouterr()
    assert "serving" not in captured.out and "http://" not in captured.out
    assert "is not a directory" in captured.err and "Traceback" not in captured.err


def test_eval_says_what_it_is_doing(tiny_model_dir, text_file, tmp_path, capsys):
    folder = _steer_sae(tmp_path, tiny_model_dir, corpus=text_file)
    assert main(["eval", str(folder), "--eval-tokens", "256", "--out", str(tmp_path / "m.json")]) == 0
    err = capsys.readouterr().err
    assert f"loading model {tiny_model_dir}" in err and "model loaded in" in err
    assert "256 held-out tokens of" in err and "tokenised in" in err
    assert main(["eval", str(folder), "--eval-tokens", "256", "--out", str(tmp_path / "m.json"), "--quiet"]) == 0
    assert "loading model" not in capsys.readouterr().err


def test_browse_runs_streamlit_with_sleeping_openmp_threads(tmp_path, monkeypatch):
    """Spinning OpenMP threads made steering 7x slower on a busy machine; browse() asks for passive waits
    unless the user set a policy."""
    import subprocess as sp

    from saebench.app import launch

    seen = {}
    monkeypatch.setattr(sp, "call", lambda cmd, env: seen.update(env=env, cmd=cmd) or 0)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert launch.browse(tmp_path) == 0
    assert seen["env"]["OMP_WAIT_POLICY"] == "PASSIVE" and seen["env"][launch.APP_ROOT_ENV] == str(tmp_path.resolve())
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    launch.browse(tmp_path)
    assert seen["env"]["OMP_WAIT_POLICY"] == "ACTIVE"


def test_methods_prints_each_option_with_its_meaning_and_the_default_that_runs_in_each_mode(capsys):
    """Issue #20.4: every option is described, and a mode's own defaults are printed as they are applied."""
    from saebench.trainers import METHODS

    assert main(["methods"]) == 0
    printed = capsys.readouterr().out
    printed, trailer = printed.split("\n\n", 1)  # after the methods: transcoders and ITDA similarity (issue #18.7, #18.6)
    assert "--target-hook" in trailer and "topk, batchtopk, jumprelu" in trailer and "itda-similarity" in trailer
    blocks = {}
    for line in printed.splitlines():
        if line and not line.startswith(" "):
            name = line.split()[0]
            blocks[name] = []
        else:
            blocks[name].append(line)
    assert set(blocks) == set(METHODS)
    for name, cls in METHODS.items():
        text = "\n".join(blocks[name])
        for opt in cls.Options.describe():
            assert opt["description"], f"{name}.{opt['name']} has no description"
            head = next(l for l in blocks[name] if f"--method-options {opt['name']}=..." in l)
            # The printed defaults are what an Options built with only that mode set holds.
            assert f"(default {cls.Options().__getattribute__(opt['name'])!r}" in head, (name, head)
            for mode, value in opt["mode_defaults"].items():
                field, raw = mode.split("=", 1)
                built = cls.Options(**{field: raw.strip("'")})
                assert f"{mode}: {getattr(built, opt['name'])!r}" in head and getattr(built, opt["name"]) == value, (name, head)
            assert opt["description"].split()[0] in text
    jr = "\n".join(blocks["jumprelu"])
    assert "sparsity_coef=...  (default 0.001; sparsity_mode='target_l0': 1.0)" in jr
    assert "theta_init_mode=...  (default 'constant'; form='paper': 'constant'; sparsity_mode='target_l0': 'quantile')" in jr
    assert "topk_warmup_fraction=...  (default 0.0; form='paper': 0.0; sparsity_mode='target_l0': 0.5)" in jr
