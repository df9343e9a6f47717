"""docs/resume.md's policy table and the config file's "[resume: ...]" comments, generated
from sftrun.resume's groups. ``python -m tests.helpers.policy_docs`` rewrites both;
tests/test_structure.py holds the files equal to what this generates."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from sftrun.resume import config_rule, policy_table

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs/resume.md"
CONFIG = REPO / "configs/training_config.yaml"
BEGIN, END = "<!-- policy table: generated from src/sftrun/resume.py -->", "<!-- end of table -->"
KEY_LINE = re.compile(r"^(?P<key>[a-z_0-9]+):(?P<value>[^#]*?)\s*(?:#\s*(?P<comment>.*))?$")
TAG = re.compile(r"\[resume: [^\]]*\]\s*")
COLUMN = 38  # where the comments of the config file start


def doc_text(text: str) -> str:
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{policy_table()}{END}{tail}"


def config_text(text: str) -> str:
    lines = []
    for line in text.splitlines():
        match = KEY_LINE.match(line)
        if match:
            key, value = match["key"], match["value"].rstrip()
            comment = TAG.sub("", match["comment"] or "").strip()
            code = f"{key}:{value}"
            tag = f"[resume: {config_rule(key)}]"
            line = f"{code.ljust(COLUMN - 1)} # {tag}{' ' + comment if comment else ''}"
        lines.append(line)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    DOC.write_text(doc_text(DOC.read_text()))
    CONFIG.write_text(config_text(CONFIG.read_text()))
    print(f"wrote {DOC} and {CONFIG}", file=sys.stderr)
