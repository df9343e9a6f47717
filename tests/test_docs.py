"""Docs match the code: every config key is documented, and the README's commands exist."""

from __future__ import annotations

import re

from tests.conftest import REPO

from sftrun.cli import build_parser
from sftrun.config import LoraSettings, TrainingConfig


def test_every_config_key_is_documented_once() -> None:
    text = (REPO / "docs/configuration.md").read_text()
    documented = re.findall(r"^\| `([a-z_.0-9]+)` \|", text, flags=re.M)
    keys = [k for k in TrainingConfig.model_fields if k != "lora"]
    keys += [f"lora.{k}" for k in LoraSettings.model_fields]
    assert sorted(documented) == sorted(keys)


def test_readme_flags_exist() -> None:
    text = (REPO / "README.md").read_text()
    train = build_parser().parse_args(["train"])
    for flag in re.findall(r"`(--[a-z-]+)", text):
        if flag in ("--logdir", "--port", "--bind_all", "--out", "--force"):
            continue
        assert hasattr(train, flag[2:].replace("-", "_")), flag


def test_ci_runs_the_readme_test_command() -> None:
    assert "make test" in (REPO / "README.md").read_text()
    assert "make test" in (REPO / ".ci/run").read_text()
