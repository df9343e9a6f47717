"""Docs match the code: every config key is documented, and the README's commands exist."""

from __future__ import annotations

import argparse
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


def _all_flags(parser: argparse.ArgumentParser) -> set[str]:
    flags: set[str] = set()
    for action in parser._actions:
        flags.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= _all_flags(sub)
    return flags


def test_every_flag_in_the_readme_exists() -> None:
    text = (REPO / "README.md").read_text()
    known = _all_flags(build_parser()) | {"--logdir", "--port", "--host", "--no-deps"}
    known |= {"--standalone", "--nproc_per_node", "--multi_gpu"}  # the launchers'
    known |= {"--dist"}  # pytest-xdist's, in the test command
    known |= {"--enable-lora", "--lora-modules"}  # vLLM's, in "Export and serve"
    mentioned = set(re.findall(r"(?<![\w-])(--[a-z][a-z_-]*)", text))
    assert mentioned - known == set()


def test_ci_runs_the_readme_test_command() -> None:
    assert "make test" in (REPO / "README.md").read_text()
    assert "make test" in (REPO / ".ci/run").read_text()
