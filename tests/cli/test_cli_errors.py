"""The command line's error contract: exit 2 and one specific message for wrong input, never a
traceback (unless DLTRAIN_DEBUG=1); plus the commands that need no training, and fast --help.

Anything about exit codes of a real process or tracebacks runs `python -m dltrain` as a
subprocess. Checks of output only use typer's CliRunner in-process, which is faithful for them
and spares a torch import per case. Everything runs in tmp_path: nothing is written to the repo.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from dltrain.config.loading import load_recipe
from dltrain.config.schema import resolve

from helpers.cli import HELP_PROBE, QUICKSTART, assert_user_error, dltrain

COMMANDS = ["fit", "eval", "devices", "check", "list"]


# -- wrong input: exit 2, one message, no traceback -------------------------------------------


def test_fit_with_a_typo_in_an_override_suggests_the_key(tmp_path):
    proc = dltrain("fit", str(QUICKSTART), "optimizer.lrr=0.1", f"output={tmp_path}", cwd=tmp_path)
    assert_user_error(proc, "optimizer.lrr", "Did you mean 'lr'")
    assert list(tmp_path.iterdir()) == []  # refused before any run folder was made


def test_fit_with_an_unknown_model_suggests_the_nearest(invoke, tmp_path):
    result = invoke("fit", str(QUICKSTART), "model.name=resnet81", f"output={tmp_path}")
    assert result.exit_code == 2
    assert "model.name" in result.stderr
    assert "Did you mean 'resnet18'" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_square_brackets_in_messages_are_printed_not_eaten_as_markup(invoke, tmp_path):
    result = invoke("check", str(QUICKSTART), "data.augment=[hfilp]")
    assert result.exit_code == 2
    assert "override 'data.augment=[hfilp]'" in " ".join(result.output.split())
    assert "Did you mean 'hflip'" in result.output


def test_normalize_in_augment_points_to_data_normalize(invoke):
    result = invoke("check", str(QUICKSTART), "data.augment=[normalize]")
    assert result.exit_code == 2
    assert "data.normalize" in result.output


def test_check_of_malformed_yaml_names_the_line(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("name: x\ndata:\n  name: digits\n  batch_size: 32: 64\nmodel: mlp\n")
    proc = dltrain("check", "broken.yaml", cwd=tmp_path)
    assert_user_error(proc, "broken.yaml:4:17", "invalid YAML")


@pytest.mark.parametrize("command", ["fit", "check"])
def test_missing_recipe_file_exits_2(tmp_path, command):
    proc = dltrain(command, "no_such_recipe.yaml", cwd=tmp_path)
    assert_user_error(proc, "no_such_recipe.yaml", "not found")


def test_malformed_override_exits_2(tmp_path):
    proc = dltrain("check", str(QUICKSTART), "epochs", cwd=tmp_path)
    assert_user_error(proc, "override 'epochs'", "KEY=VALUE")


def test_eval_of_a_missing_checkpoint_exits_2(invoke):
    result = invoke("eval", "missing.pt")
    assert result.exit_code == 2
    assert "missing.pt" in result.stderr
    assert "not found" in result.stderr


def test_eval_of_random_bytes_exits_2_without_traceback(tmp_path):
    (tmp_path / "noise.pt").write_bytes(os.urandom(4096))
    proc = dltrain("eval", "noise.pt", cwd=tmp_path)
    assert_user_error(proc, "noise.pt")
    assert not (tmp_path / "eval-test").exists()


def test_eval_of_a_torch_file_that_is_not_a_checkpoint_exits_2(invoke, tmp_path):
    import torch

    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    result = invoke("eval", "other.pt")
    assert result.exit_code == 2
    assert "not a dltrain checkpoint" in result.stderr


@pytest.mark.parametrize("args", [["list", "nonsense"], ["fit"], ["eval", "x.pt", "--split", "x"]])
def test_bad_cli_arguments_exit_2(tmp_path, args):
    proc = dltrain(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("debug", [False, True])
def test_dltrain_debug_shows_the_traceback_of_a_user_error(tmp_path, debug):
    proc = dltrain("check", "no_such_recipe.yaml", cwd=tmp_path, debug=debug)
    assert proc.returncode != 0 if debug else proc.returncode == 2  # debug: Python's own exit
    assert ("Traceback" in proc.stderr) is debug
    assert ("dltrain.errors.UserError: recipe file not found" in proc.stderr) is debug


# -- commands that read no data -----------------------------------------------------------------


def test_check_prints_the_resolved_recipe_as_yaml_and_exits_0(invoke):
    long_name = "r" * 120  # longer than a console line: must not be cropped or wrapped
    result = invoke("check", str(QUICKSTART), f"name={long_name}", "train.epochs=3")
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.stdout)  # stdout is the YAML alone, ready to save
    expected = load_recipe(QUICKSTART, [f"name={long_name}", "train.epochs=3"])
    assert resolve(printed) == expected
    assert printed["optimizer"]["betas"] == [0.9, 0.999]  # defaults are filled in
    assert "is valid" in result.stderr


def test_check_error_goes_to_stderr_not_into_the_yaml(invoke):
    result = invoke("check", str(QUICKSTART), "optimizer.lr=0")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert "override 'optimizer.lr=0'" in result.stderr


def test_list_models_names_every_model_with_a_description(invoke):
    result = invoke("list", "models")
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if "│" in line}
    for name in ("seed_cnn", "mlp", "resnet18", "torchvision:<name>"):
        assert name in rows, result.stdout
        description = rows[name].split("│")[2].strip()
        assert description, f"{name} has no description"
    assert "torchvision" in rows["torchvision:<name>"].split("│")[2]


def test_list_without_a_kind_lists_every_registry(invoke):
    result = invoke("list")
    assert result.exit_code == 0, result.output
    for title in ("models", "datasets", "losses", "optimizers", "schedulers", "augmentations"):
        assert title in result.stdout
    for name in ("digits", "cross_entropy", "adamw", "cosine", "hflip"):
        assert name in result.stdout


def test_list_offers_exactly_the_registries():
    from dltrain.commands.inspection import Kind
    from dltrain.config.registry import REGISTRIES

    assert [kind.value for kind in Kind] == list(REGISTRIES)


def test_a_fresh_process_finds_every_component_without_loading_anything_first(tmp_path):
    """Registries import their own modules on first lookup (no load_all to call first)."""
    code = (
        "from dltrain.config.registry import DATASETS, MODELS, LOSSES, OPTIMIZERS, SCHEDULERS, "
        "AUGMENTATIONS\n"
        "assert 'seed_cnn' in MODELS and 'csv' in DATASETS and 'text_csv' in DATASETS\n"
        "assert 'cross_entropy' in LOSSES and 'adamw' in OPTIMIZERS and 'cosine' in SCHEDULERS\n"
        "assert 'hflip' in AUGMENTATIONS\n"
        "print(len(MODELS.names()) + len(DATASETS.names()))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) > 15


def test_devices_json_is_valid_json_with_auto(invoke):
    result = invoke("devices", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["auto"] in {d["type"] for d in info["devices"]} | {
        f"{d['type']}:{d['index']}" for d in info["devices"]
    }
    assert any(d["type"] == "cpu" for d in info["devices"])


# -- help: works, fast, shows examples ------------------------------------------------------


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_does_not_import_torch(tmp_path, command):
    args = [command] if command else []
    proc = subprocess.run(
        [sys.executable, "-c", HELP_PROBE, *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Usage: dltrain" in proc.stdout
    assert "TORCH_IMPORTED=False" in proc.stderr
    if command:
        assert "Example" in proc.stdout, f"`dltrain {command} --help` shows no example"


def test_a_recipe_that_needs_no_torchvision_does_not_import_it(tmp_path):
    """torchvision's, timm's and transformers' imports cost a second or more each: naming
    their datasets and models in the registries must not pay them; a table recipe resolves
    without any of them."""
    (tmp_path / "t.csv").write_text("a,b,label\n1,2,x\n3,4,y\n")
    probe = (
        "import sys\n"
        "from dltrain.config.loading import load_recipe\n"
        "load_recipe(sys.argv[1], [])\n"
        "print('TORCHVISION_IMPORTED=' + str('torchvision' in sys.modules))\n"
        "print('TIMM_IMPORTED=' + str('timm' in sys.modules))\n"
        "print('TRANSFORMERS_IMPORTED=' + str('transformers' in sys.modules))\n"
        "print('PEFT_IMPORTED=' + str('peft' in sys.modules))\n"
        "print('OPACUS_IMPORTED=' + str('opacus' in sys.modules))\n"
        "print('CAPTUM_IMPORTED=' + str('captum' in sys.modules))\n"
    )
    (tmp_path / "t.yaml").write_text("data: {name: csv, path: t.csv, label: label}\nmodel: mlp\n")
    proc = subprocess.run(
        [sys.executable, "-c", probe, "t.yaml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "TORCHVISION_IMPORTED=False" in proc.stdout
    assert "TIMM_IMPORTED=False" in proc.stdout
    assert "TRANSFORMERS_IMPORTED=False" in proc.stdout
    assert "PEFT_IMPORTED=False" in proc.stdout
    assert "OPACUS_IMPORTED=False" in proc.stdout and "CAPTUM_IMPORTED=False" in proc.stdout


def test_python_m_dltrain_help_lists_every_command(tmp_path):
    proc = dltrain("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for command in COMMANDS:
        assert command in proc.stdout


# -- conventions: --version, shell completion -------------------------------------------------


def test_version_names_dltrain_torch_and_python(invoke):
    import torch

    from dltrain import __version__

    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.startswith(f"dltrain {__version__} · torch {torch.__version__} (")
    assert "Python 3." in result.stdout


def test_shell_completion_completes_commands_and_options(tmp_path):
    def complete(words: str) -> list[str]:
        env = {**os.environ, "_DLTRAIN_COMPLETE": "complete_bash", "COMP_WORDS": words}
        env["COMP_CWORD"] = str(len(words.split()) - 1)
        proc = subprocess.run(
            [sys.executable, "-m", "dltrain"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split()

    assert complete("dltrain e") == ["eval", "export", "explain"]
    assert "--resume" in complete("dltrain fit --re")
    shown = dltrain("--help", cwd=tmp_path).stdout
    assert "--install-completion" in shown and "--version" in shown
