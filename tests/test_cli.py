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
    (out / "sae.safetensors").write_bytes(b"garbage")
    assert main(["verify", str(out)]) == 1
    assert "sae.safetensors: size" in capsys.readouterr().out


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
    assert "corpus too short" in capsys.readouterr().err


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


def test_methods_prints_each_option_with_its_meaning_and_the_default_that_runs_in_each_mode(capsys):
    """Issue #20.4: every option is described, and a mode's own defaults are printed as they are applied."""
    from saebench.trainers import METHODS

    assert main(["methods"]) == 0
    printed = capsys.readouterr().out
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
    assert "theta_init_mode=...  (default 'constant'; sparsity_mode='target_l0': 'quantile')" in jr
