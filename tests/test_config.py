"""Config: defaults < YAML < CLI, unknown keys and bad values named with file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from sftrun.config import TrainingConfig, load_config
from sftrun.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_shipped_config_is_valid_and_uses_the_seed_names() -> None:
    cfg = load_config(REPO / "configs/training_config.yaml")
    assert cfg.model_name_or_path == "model/models"
    assert cfg.output_dir == "checkpoints/sft_model"
    assert cfg.num_train_epochs == 3
    assert cfg.learning_rate == pytest.approx(2.0e-4)


def test_defaults_then_yaml_then_cli(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1.0e-4\nlogging_steps: 7\nlora:\n  r: 8\n")
    cfg = load_config(path, ["logging_steps=3", "lora.alpha=4", "eval_file=null"])
    assert cfg.learning_rate == pytest.approx(1e-4)  # YAML over default
    assert cfg.logging_steps == 3  # CLI over YAML
    assert cfg.lora.r == 8 and cfg.lora.alpha == 4  # nested, YAML and CLI
    assert cfg.eval_file is None
    assert cfg.save_steps == TrainingConfig().save_steps  # untouched default


def test_unknown_key_names_file_line_and_allowed_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1.0e-4\nlora:\n  r: 8\n  rank: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert f"{path}:4: unknown key 'lora.rank'" in msg
    assert "allowed keys: alpha, dropout, r, target_modules" in msg


def test_bad_value_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("per_device_train_batch_size: 0\n")
    with pytest.raises(
        ConfigError, match=r"c.yaml:1: per_device_train_batch_size: .*greater than 0"
    ):
        load_config(path)


def test_cli_override_errors_point_at_the_command_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="command line: unknown key 'learning_rat'"):
        load_config(None, ["learning_rat=1"])
    with pytest.raises(ConfigError, match="is not KEY=VALUE"):
        load_config(None, ["learning_rate"])


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_max_steps_zero_is_rejected() -> None:
    with pytest.raises(ConfigError, match="max_steps must be -1"):
        load_config(None, ["max_steps=0"])


def test_a_tracker_listed_twice_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("report_to: [tensorboard, wandb, wandb]\n")
    with pytest.raises(ConfigError, match="report_to lists wandb more than once"):
        load_config(str(cfg), [])
