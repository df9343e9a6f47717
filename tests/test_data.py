"""Data: three input formats, file:line errors, assistant-only loss mask, over-long handling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from sftrun.constants import IGNORE_INDEX
from sftrun.data import read_conversations
from sftrun.encoding import collate, tokenize_file
from sftrun.errors import DataError

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Say hi to Ana."},
    {"role": "assistant", "content": "Hi Ana!"},
]


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):
    return AutoTokenizer.from_pretrained(tiny_model)


def test_three_formats_normalise_to_the_same_messages(tmp_path: Path) -> None:
    rows = [
        {"messages": MESSAGES},
        {
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "Say hi to Ana."},
                {"from": "gpt", "value": "Hi Ana!"},
            ]
        },
        {"system": "Be brief.", "instruction": "Say hi to Ana.", "input": "", "output": "Hi Ana!"},
    ]
    convs = read_conversations(write_jsonl(tmp_path / "d.jsonl", rows))
    assert [c.fmt for c in convs] == ["messages", "sharegpt", "alpaca"]
    assert all(c.messages == MESSAGES for c in convs)
    assert [c.source for c in convs] == [f"{tmp_path / 'd.jsonl'}:{n}" for n in (1, 2, 3)]


def test_alpaca_input_is_appended_to_the_instruction(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "a.jsonl", [{"instruction": "Sum", "input": "1 2", "output": "3"}]
    )
    assert read_conversations(path)[0].messages[0] == {"role": "user", "content": "Sum\n\n1 2"}


def test_json_array_file(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"messages": MESSAGES}] * 2))
    assert len(read_conversations(path)) == 2


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"messages": [', "not valid JSON"),
        ('{"txt": "x"}', "unknown record format (keys: txt)"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "unknown role 'robot'"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant turn"),
        (
            '{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}',
            "'content' must be a string",
        ),
        ('{"instruction": "x"}', "Alpaca record has no 'output'"),
        ("[1, 2]", "must be a JSON object"),
    ],
)
def test_bad_line_is_named_by_file_and_line(tmp_path: Path, line: str, expected: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": MESSAGES}) + "\n\n" + line + "\n")
    with pytest.raises(DataError) as err:
        read_conversations(path)
    assert str(err.value).startswith(f"{path}:3: ")
    assert expected in str(err.value)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data file not found"):
        read_conversations(tmp_path / "none.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no records"):
        read_conversations(tmp_path / "empty.jsonl")


def test_loss_only_on_assistant_tokens(tmp_path: Path, tokenizer) -> None:
    two_turns = MESSAGES + [
        {"role": "user", "content": "And Bo?"},
        {"role": "assistant", "content": "Hi Bo!"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": two_turns}])
    data = tokenize_file(tokenizer, path, 512)
    ids, labels = data.input_ids[0], data.labels[0]
    learned = tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
    assert learned == "Hi Ana!<|im_end|>\nHi Bo!<|im_end|>\n"
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(two_turns, tokenize=False)

    everything = tokenize_file(tokenizer, path, 512, train_on="all")
    assert everything.labels[0] == everything.input_ids[0]
    assert everything.fingerprint != data.fingerprint  # rendering settings are part of it


def test_overlong_examples_are_truncated_or_dropped_and_counted(tmp_path: Path, tokenizer) -> None:
    long_reply = {"role": "assistant", "content": "word " * 200}
    rows = [{"messages": MESSAGES}, {"messages": MESSAGES[:2] + [long_reply]}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cut = tokenize_file(tokenizer, path, 64, overlong="truncate")
    assert cut.counts["truncated"] == 1 and cut.counts["dropped"] == 0
    assert max(len(x) for x in cut.input_ids) == 64
    dropped = tokenize_file(tokenizer, path, 64, overlong="drop")
    assert dropped.counts["dropped"] == 1 and len(dropped) == 1


def test_truncation_that_leaves_no_assistant_token_drops(tmp_path: Path, tokenizer) -> None:
    long_prompt = [{"role": "user", "content": "word " * 200}, MESSAGES[2]]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": MESSAGES}, {"messages": long_prompt}])
    data = tokenize_file(tokenizer, path, 64)
    assert data.counts["dropped"] == 1 and len(data) == 1


def test_fingerprint_follows_file_content(tmp_path: Path, tokenizer) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": MESSAGES}])
    before = tokenize_file(tokenizer, path, 128).fingerprint
    assert tokenize_file(tokenizer, path, 128).fingerprint == before
    write_jsonl(path, [{"messages": MESSAGES}, {"messages": MESSAGES}])
    assert tokenize_file(tokenizer, path, 128).fingerprint != before


def test_collate_pads_right_and_masks(tmp_path: Path, tokenizer) -> None:
    rows = [
        {"messages": MESSAGES},
        {"messages": MESSAGES[:2] + [{"role": "assistant", "content": "Hello there Ana, hi!"}]},
    ]
    data = tokenize_file(tokenizer, write_jsonl(tmp_path / "d.jsonl", rows), 128)
    batch = collate(data, [0, 1], pad_token_id=0)
    short = len(data.input_ids[0])
    assert batch["input_ids"].shape[1] == max(len(x) for x in data.input_ids)
    assert batch["attention_mask"][0, short:].sum() == 0
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all()
