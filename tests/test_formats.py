"""Data beyond JSONL: Parquet, CSV, Arrow, save_to_disk folders and lists of them, through
the `datasets` library; prompt-completion (plain and conversational) and text-only records.

Every fixture is written here from the sample task, some with deliberate bad rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from tests.conftest import tiny_settings, write_config
from tests.runs import adapter, assert_same_tensors, run_sftrun
from transformers import AutoTokenizer

from sftrun.cli import main
from sftrun.constants import IGNORE_INDEX
from sftrun.data import read_conversations, validate_file
from sftrun.encoding import data_fingerprint, file_sha256, tokenize_file
from sftrun.errors import DataError

RENDER = {"max_seq_length": 160, "overlong": "truncate", "train_on": "assistant"}


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):
    return AutoTokenizer.from_pretrained(tiny_model)


def _rows(sample_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (sample_dir / "train.jsonl").read_text().splitlines()]


def _csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _prompt_completion(rows: list[dict]) -> list[dict]:
    """The sample task as TRL's conversational prompt-completion records."""
    return [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows]


@pytest.fixture(scope="module")
def sample_as(tmp_path_factory, sample_dir: Path) -> dict[str, Path]:
    """The sample training data in every format the reader takes, the same records."""
    out = tmp_path_factory.mktemp("formats")
    rows = _rows(sample_dir)
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(out / "train.parquet"))
    ds.save_to_disk(str(out / "saved"))
    arrow = next((out / "saved").glob("*.arrow"))
    cells = [[json.dumps(r["messages"])] for r in rows]
    pc = out / "pc.jsonl"
    pc.write_text("\n".join(json.dumps(r) for r in _prompt_completion(rows)) + "\n")
    return {
        "jsonl": sample_dir / "train.jsonl",
        "parquet": out / "train.parquet",
        "saved": out / "saved",
        "arrow": arrow,
        "csv": _csv(out / "train.csv", ["messages"], cells),
        "prompt-completion": pc,
    }


@pytest.mark.parametrize("fmt", ["parquet", "csv", "saved", "arrow", "prompt-completion"])
def test_every_format_of_the_sample_task_gives_the_same_tokens_as_jsonl(
    fmt: str, sample_as: dict[str, Path], tokenizer, workdir: Path
) -> None:
    from sftrun.datastage import load_or_tokenize

    ref, _ = load_or_tokenize(
        tokenizer, "tok", str(sample_as["jsonl"]), 160, "truncate", "assistant"
    )
    got, cached = load_or_tokenize(
        tokenizer, "tok", str(sample_as[fmt]), 160, "truncate", "assistant"
    )
    assert not cached
    assert got.input_ids == ref.input_ids and got.labels == ref.labels
    again, cached = load_or_tokenize(
        tokenizer, "tok", str(sample_as[fmt]), 160, "truncate", "assistant"
    )
    assert cached and again.input_ids == ref.input_ids  # the tokenized cache serves it next time
    expected = "prompt-completion" if fmt == "prompt-completion" else "messages"
    assert got.counts[f"format_{expected}"] == len(ref)


def test_a_list_of_files_reads_them_in_order(sample_as: dict[str, Path], tokenizer) -> None:
    both = [str(sample_as["parquet"]), str(sample_as["jsonl"])]
    data = tokenize_file(tokenizer, both, 160)
    one = tokenize_file(tokenizer, sample_as["jsonl"], 160)
    assert data.input_ids == one.input_ids * 2
    convs = read_conversations(both)
    assert convs[0].source == f"{sample_as['parquet']}:row 0"
    assert convs[len(one)].source == f"{sample_as['jsonl']}:1"


def test_conversational_prompt_completion_learns_only_the_completion(tokenizer) -> None:
    from sftrun.data import normalise
    from sftrun.encoding import encode

    turns = [
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "Again."},
    ]
    reply = [{"role": "assistant", "content": "Hi again!"}]
    pc = normalise({"prompt": turns, "completion": reply}, "x:1")
    chat = normalise({"messages": turns + reply}, "x:2")
    ids_pc, labels_pc = encode(tokenizer, pc, "assistant")
    ids_chat, labels_chat = encode(tokenizer, chat, "assistant")
    assert ids_pc == ids_chat
    trained_pc = [t for t in labels_pc if t != IGNORE_INDEX]
    trained_chat = [t for t in labels_chat if t != IGNORE_INDEX]
    # Messages learn both replies; prompt-completion only the last one.
    assert len(trained_pc) < len(trained_chat)
    assert tokenizer.decode(trained_pc).startswith("Hi again!")
    assert "Hi!" in tokenizer.decode(trained_chat)


def test_plain_prompt_completion_and_text_learn_their_text_and_the_end(tokenizer) -> None:
    from sftrun.data import normalise
    from sftrun.encoding import encode

    eos = tokenizer.eos_token_id
    pc = normalise({"prompt": "Capital of France:", "completion": " Paris"}, "x:1")
    ids, labels = encode(tokenizer, pc, "assistant")
    assert ids[-1] == eos and labels[-1] == eos
    trained = [t for t in labels if t != IGNORE_INDEX]
    assert tokenizer.decode(trained[:-1]).strip() == "Paris"
    assert labels[0] == IGNORE_INDEX  # the prompt carries no loss
    text = normalise({"text": "Paris is the capital."}, "x:2")
    ids, labels = encode(tokenizer, text, "assistant")
    assert ids == labels and ids[-1] == eos  # loss on everything


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("parquet", ":row 1: a prompt-completion record has no 'completion'"),
        ("csv", ":row 2: the 'messages' cell is not valid JSON"),
        ("saved", ":row 0: 'text' is empty, so there is nothing to learn from"),
        ("mixed", ":2: 'prompt' and 'completion' must both be text or both lists"),
        ("truncated", ": cannot be read as PARQUET"),
    ],
)
def test_a_bad_row_is_named_by_file_and_row_before_training(
    kind: str,
    expected: str,
    tmp_path: Path,
    tiny_model: Path,
    sample_dir: Path,
    workdir: Path,
    capsys,
) -> None:
    ok = _rows(sample_dir)[0]["messages"]
    if kind == "parquet":
        path = tmp_path / "d.parquet"
        rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": None}]
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif kind == "csv":
        path = _csv(tmp_path / "d.csv", ["messages"], [[json.dumps(ok)]] * 2 + [["[{oops"]])
    elif kind == "saved":
        path = tmp_path / "saved"
        datasets.Dataset.from_list([{"text": ""}, {"text": "fine"}]).save_to_disk(str(path))
    elif kind == "mixed":  # a table column has one type, so this mistake is a JSONL one
        path = tmp_path / "m.jsonl"
        rows = [{"prompt": "a", "completion": "b"}, {"prompt": ok[:-1], "completion": "text"}]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path = tmp_path / "t.parquet"
        datasets.Dataset.from_list(_rows(sample_dir)).to_parquet(str(path))
        path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DataError) as err:
        read_conversations(path)
    assert str(err.value).startswith(str(path)) and expected in str(err.value)
    # The same one line from `sftrun train`, before any model loads (exit 3).
    settings = tiny_settings(tiny_model, sample_dir, train_file=str(path), eval_file=None)
    write_config(workdir / "config.yaml", settings)
    assert main(["train", "-y", "--config", "config.yaml"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert not (workdir / "checkpoints").exists()


def test_data_validate_lists_every_bad_row_of_a_table(tmp_path: Path, capsys) -> None:
    path = tmp_path / "d.parquet"
    rows = [
        {"prompt": "a", "completion": "b"},
        {"prompt": "c", "completion": None},
        {"prompt": "d", "completion": "e"},
        {"prompt": None, "completion": "f"},
    ]
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    assert main(["data", "validate", str(path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"{path}:row 1: a prompt-completion record has no 'completion'",
        f"{path}:row 3: a prompt-completion record has no 'prompt'",
        f"{path}: 2 good records (prompt-completion 2); 2 bad",
    ]
    good, errors = validate_file(path)
    assert len(good) == 2 and len(errors) == 2


def test_folders_that_are_not_one_saved_dataset_are_refused(tmp_path: Path) -> None:
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "a"}])})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"holds several splits \(train\); name one of them"):
        read_conversations(tmp_path / "dd")
    assert len(read_conversations(tmp_path / "dd" / "train")) == 1
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not one written by Dataset.save_to_disk"):
        read_conversations(tmp_path / "plain")


def test_the_fingerprint_sees_a_changed_table_and_keeps_the_old_one_file_formula(
    tmp_path: Path, sample_as: dict[str, Path]
) -> None:
    jsonl = sample_as["jsonl"]
    old_formula = json.dumps({"sha256": file_sha256(jsonl), "render": RENDER}, sort_keys=True)
    import hashlib

    assert data_fingerprint(str(jsonl), RENDER) == hashlib.sha256(old_formula.encode()).hexdigest()
    rows = [{"text": "one"}, {"text": "two"}]
    path = tmp_path / "d.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    before = data_fingerprint(str(path), RENDER)
    datasets.Dataset.from_list([*rows[:1], {"text": "twO"}]).to_parquet(str(path))
    assert data_fingerprint(str(path), RENDER) != before
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    before = data_fingerprint(str(folder), RENDER)
    datasets.Dataset.from_list([{"text": "one"}, {"text": "three"}]).save_to_disk(str(folder))
    assert data_fingerprint(str(folder), RENDER) != before
    assert data_fingerprint([str(path), str(jsonl)], RENDER) != data_fingerprint(
        [str(jsonl), str(path)], RENDER
    )


@pytest.mark.slow
def test_prompt_completion_trains_the_same_adapter_as_messages(
    tmp_path: Path, sample_as: dict[str, Path], tiny_model: Path, sample_dir: Path
) -> None:
    """The same tokens in the same order: the same adapter, so the same accuracy."""
    runs = {}
    for fmt in ("jsonl", "prompt-completion", "parquet"):
        cwd = tmp_path / fmt
        cwd.mkdir()
        settings = tiny_settings(
            tiny_model, sample_dir, train_file=str(sample_as[fmt]), eval_file=None, max_steps=3
        )
        write_config(cwd / "config.yaml", settings)
        proc = run_sftrun(["train", "-y", "--config", "config.yaml"], cwd)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[fmt] = adapter(cwd / "checkpoints/sft_model/checkpoint-3")
    assert_same_tensors(runs["jsonl"], runs["prompt-completion"])
    assert_same_tensors(runs["jsonl"], runs["parquet"])
