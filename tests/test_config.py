"""Named configs, command-line overrides, and the errors that say what is valid."""

import pytest

import common

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
