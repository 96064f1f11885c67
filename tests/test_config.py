"""Named configs, command-line overrides, and the errors that say what is valid."""

import os
import re
import subprocess
import sys

import pytest
import torch

import common
from helpers import REPO, SCRIPT_STAGES, stage_module

CONFIG = """
default:
  data_preset: small
  out_dir: null
  batch_size: 64
  lr: 2.0e-3
  shuffle: true
quick:
  data_preset: tiny
  batch_size: 8
"""


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    return path


def test_default_config(config_file):
    cfg = common.load_config(config_file, [])
    assert (cfg.config, cfg.data_preset, cfg.batch_size, cfg.lr, cfg.out_dir) == ("default", "small", 64, 2e-3, None)


def test_named_config_and_overrides(config_file):
    cfg = common.load_config(config_file, ["--config", "quick", "--lr", "1e-3", "--shuffle", "false"])
    assert (cfg.data_preset, cfg.batch_size, cfg.lr, cfg.shuffle) == ("tiny", 8, 1e-3, False)
    assert common.load_config(config_file, ["--out_dir", "/tmp/x"]).out_dir == "/tmp/x"


def test_unknown_config_names_the_valid_ones(config_file):
    with pytest.raises(common.UserError, match="unknown config 'fast'.*default, quick"):
        common.load_config(config_file, ["--config", "fast"])


def test_unknown_key_names_the_valid_ones(config_file):
    with pytest.raises(common.UserError, match=r"unknown option '--learning_rate'.*--lr"):
        common.load_config(config_file, ["--learning_rate", "0.1"])


@pytest.mark.parametrize(
    ("key", "value", "kind"), [("batch_size", "1.5", "int"), ("lr", "fast", "float"), ("shuffle", "maybe", "bool")]
)
def test_wrong_type_is_an_error(config_file, key, value, kind):
    with pytest.raises(common.UserError, match=f"--{key} expects a {kind}"):
        common.load_config(config_file, [f"--{key}", value])


def test_named_config_with_unknown_key_is_an_error(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG + "broken:\n  batchsize: 3\n")
    with pytest.raises(common.UserError, match="sets unknown key 'batchsize'"):
        common.load_config(path, ["--config", "broken"])


def test_none_is_a_word_for_text_keys_and_no_value_for_paths(config_file, tmp_path):
    """`--resume none` must stay the word 'none'; `--out_dir none` means no folder given."""
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG.replace("  shuffle: true\n", "  shuffle: true\n  resume: auto\n"))
    cfg = common.load_config(path, ["--resume", "none", "--out_dir", "none"])
    assert cfg.resume == "none" and cfg.out_dir is None


LIMITS = {"batch_size": ">= 1", "lr": "> 0", "data_preset": ["tiny", "small"]}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--batch_size", "0"], "--batch_size must be >= 1; got 0"),
        (["--batch_size", "-3"], "--batch_size must be >= 1; got -3"),
        (["--lr", "0"], "--lr must be > 0; got 0.0"),
        (["--lr", "nan"], "--lr must be a finite number"),
        (["--lr", "inf"], "--lr must be a finite number"),
        (["--data_preset", "huge"], "--data_preset must be one of tiny, small; got 'huge'"),
    ],
)
def test_values_out_of_range_are_errors(config_file, arguments, message):
    with pytest.raises(common.UserError, match=re.escape(message)):
        common.load_config(config_file, arguments, LIMITS)


def test_limits_apply_to_the_yaml_file_too(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG + "broken:\n  batch_size: 0\n")
    with pytest.raises(common.UserError, match="--batch_size must be >= 1; got 0"):
        common.load_config(path, ["--config", "broken"], LIMITS)


@pytest.mark.parametrize(
    ("yaml_line", "key", "expected"),
    [("lr: 1e-3", "lr", 1e-3), ("lr: 1", "lr", 1.0), ("batch_size: '16'", "batch_size", 16)],
)
def test_yaml_values_are_read_as_the_type_of_the_default(tmp_path, yaml_line, key, expected):
    """YAML reads 1e-3 (no dot) as text: it must still be the number a learner meant."""
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG + f"edited:\n  {yaml_line}\n")
    value = getattr(common.load_config(path, ["--config", "edited"]), key)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    ("yaml_line", "message"),
    [
        ("batch_size: 1.5", "--batch_size expects a int"),
        ("shuffle: sometimes", "--shuffle expects a bool"),
        ("data_preset: 3", "--data_preset expects a str"),
        ("data_preset: no", "--data_preset expects a str"),  # YAML 1.1 reads `no` as false
        ("batch_size:", "--batch_size needs a value"),
    ],
)
def test_yaml_values_of_another_type_are_errors(tmp_path, yaml_line, message):
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG + f"edited:\n  {yaml_line}\n")
    with pytest.raises(common.UserError, match=message):
        common.load_config(path, ["--config", "edited"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (CONFIG + "quick:\n  lr: [1\n", r"not valid YAML at line \d+"),
        ("just some words\n", "must hold named configs"),
        ("quick:\n  lr: 1.0\n", "must hold named configs"),
        (CONFIG + "broken: 3\n", "config 'broken' .* must be a list of `key: value` lines"),
    ],
)
def test_broken_yaml_files_are_errors_that_say_what_to_do(tmp_path, text, message):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(common.UserError, match=message):
        common.load_config(path, [])


def test_a_named_config_with_every_line_commented_out_changes_nothing(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG + "empty:\n  # batch_size: 3\n")
    assert common.load_config(path, ["--config", "empty"]).batch_size == 64


def test_home_and_variables_in_paths_are_expanded(config_file, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SCRATCH", str(tmp_path / "scratch"))
    assert common.load_config(config_file, ["--out_dir", "~/runs"]).out_dir == str(tmp_path / "home" / "runs")
    assert common.load_config(config_file, ["--out_dir", "$SCRATCH/x"]).out_dir == str(tmp_path / "scratch" / "x")
    monkeypatch.delenv("SCRATCH")
    with pytest.raises(common.UserError, match="names an environment variable that is not set here"):
        common.load_config(config_file, ["--out_dir", "$SCRATCH/x"])


@pytest.mark.parametrize("name", ["gpu", "cuda0", "CPU", "cuda:x"])
def test_unknown_device_names_are_errors(name):
    with pytest.raises(common.UserError, match="is not one of auto, cpu, cuda, cuda:N"):
        common.choose_device(name)


def test_one_run_per_output_folder(tmp_path):
    """The folder is locked for this process: another process is refused, this one may ask again."""
    folder = common.run_dir("stage", "config", tmp_path / "run")
    assert common.run_dir("stage", "config", tmp_path / "run") == folder
    other = subprocess.run(
        [sys.executable, "-c", f"import common; common.run_dir('stage', 'config', {str(folder)!r})"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "stages")},
    )  # fmt: skip
    assert other.returncode != 0 and "is in use by another run (pid" in other.stderr, other.stderr


def test_abbreviated_options_are_refused(config_file):
    """argparse would read --batch as --batch_size: a typo that trains something else. Options are spelled out."""
    with pytest.raises(common.UserError, match=r"unknown option '--batch' \(options are spelled out in full\)"):
        common.load_config(config_file, ["--batch", "16"])
    with pytest.raises(common.UserError, match=r"unknown option '--shuf=1'"):
        common.load_config(config_file, ["--shuf=1"])


@pytest.mark.parametrize("stage", SCRIPT_STAGES, ids=[stage.name for stage in SCRIPT_STAGES])
def test_every_stage_refuses_an_abbreviation_and_names_a_renamed_key(stage):
    """`--num_epoch 2` ran as --num_epochs; in stage 07, `--lr 1e-3` was read as --lr_scaling. Now each is refused;
    a key that an earlier stage named otherwise is named in the error."""
    train = stage_module(stage)
    renamed = getattr(train, "RENAMED", {})
    with pytest.raises(common.UserError, match="unknown option '--num_epoch'"):
        common.load_config(stage / "config.yaml", ["--num_epoch", "2"], renamed=renamed)
    for old, new in renamed.items():
        with pytest.raises(common.UserError, match=f"--{old} is named --{new} in this stage"):
            common.load_config(stage / "config.yaml", [f"--{old}", "1"], renamed=renamed)
    if (stage / "batch_scaling.py").exists():  # stage 07 on: the learning rate is base_lr
        assert renamed == {"lr": "base_lr", "batch_size": "global_batch_size"}


def test_environment_variables_set_settings_below_the_command_line(config_file, monkeypatch):
    """The precedence W&B's own variables get in stage 08: the command line, then the variable, then config.yaml.
    A value the setting cannot take names the variable it came from."""
    names = {"data_preset": "TEST_PRESET"}
    assert common.load_config(config_file, [], environment=names).data_preset == "small"
    monkeypatch.setenv("TEST_PRESET", "tiny")
    assert common.load_config(config_file, ["--config", "default"], environment=names).data_preset == "tiny"
    assert common.load_config(config_file, ["--data_preset", "small"], environment=names).data_preset == "small"
    monkeypatch.setenv("TEST_PRESET", "huge")
    with pytest.raises(common.UserError, match="TEST_PRESET=huge in the environment sets --data_preset: "):
        common.load_config(config_file, [], limits={"data_preset": ["tiny", "small"]}, environment=names)


def test_the_cpu_thread_rule_is_fixed_and_follows_only_omp_num_threads(monkeypatch):
    """One thread per process unless OMP_NUM_THREADS says otherwise, whatever the machine's load or core count
    (the count is part of a bit-exact resume); a value that is no count is refused with one line."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert common.cpu_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert common.cpu_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "all")
    with pytest.raises(common.UserError, match="OMP_NUM_THREADS='all' is not a number of threads"):
        common.cpu_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    before = torch.get_num_threads()
    try:
        common.choose_device("cpu")
        assert torch.get_num_threads() == 2, "choose_device applies the rule"
    finally:
        torch.set_num_threads(before)
