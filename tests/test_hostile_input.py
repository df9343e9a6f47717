"""Bad input gets one line, not a traceback or a hang: data cells, the tokenized cache, stage
folders, chat templates, YAML, JSON, rotation that cannot delete, ``--resume`` misuse."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import pytest
from tests.runs import OUT, changed, cli, one_line_error, train, tree

from sftrun import constants as C
from sftrun import fs, integrity

BIG = "x" * ((16 << 20) + 10)  # one cell just over the 16 MiB record limit


def _table(path: Path, rows: list[dict]) -> None:
    import datasets

    ds = datasets.Dataset.from_list(rows)
    if path.suffix == ".parquet":
        ds.to_parquet(str(path))
    elif path.suffix == ".csv":
        ds.to_csv(str(path), index=False)
    else:
        shard = path.with_suffix("")
        ds.save_to_disk(str(shard))
        shutil.copy(next(shard.glob("*.arrow")), path)


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".arrow"])
def test_a_table_cell_over_the_record_limit_is_one_line(
    tiny_config, workdir: Path, capsys, suffix: str
) -> None:
    data = workdir / f"train{suffix}"
    _table(data, [{"text": "a fine record"}, {"text": BIG}])
    code, out, _ = cli(capsys, "data", "validate", str(data))
    assert code == 1
    assert f"{data}:row 1: a record of 16 MiB of text is over the 16 MiB limit" in out
    tiny_config(train_file=str(data), eval_file=None)
    code, _, err = train(capsys)
    assert code == 3 and "row 1: a record of 16 MiB of text is over" in one_line_error(err)


def _cache_file(workdir: Path) -> Path:
    files = sorted((workdir / "outputs/1_data/cache").glob("*.safetensors"))
    assert len(files) == 1
    return files[0]


def _tokens(cache: Path) -> tuple[dict, dict]:
    import safetensors

    with safetensors.safe_open(str(cache), framework="pt") as fh:
        return fh.metadata(), {k: fh.get_tensor(k).tolist() for k in fh.keys()}  # noqa: SIM118


@pytest.mark.parametrize("damage", ["bit flip", "another data set's cache"])
def test_a_changed_tokenized_cache_is_rebuilt_never_trained_on(
    tiny_config, workdir: Path, sample_dir: Path, capsys, damage: str
) -> None:
    tiny_config(eval_file=None)
    assert cli(capsys, "data", "prepare", "--config", "config.yaml")[0] == 0
    cache = _cache_file(workdir)
    good = _tokens(cache)
    if damage == "bit flip":
        raw = bytearray(cache.read_bytes())
        raw[-9] ^= 0x04  # inside the last tensor's data
        cache.write_bytes(bytes(raw))
    else:  # valid safetensors with the same name, other tokens (a copied outputs/ folder)
        import safetensors.torch
        import torch

        tensors = {
            "lengths": torch.tensor([2]),
            "input_ids": torch.tensor([5, 6]),
            "labels": torch.tensor([5, 6]),
        }
        meta = {"fingerprint": "0" * 64, "counts": "{}", "sha256": "0" * 64}
        safetensors.torch.save_file(tensors, cache, metadata=meta)
    code, out, _ = cli(capsys, "data", "prepare", "--config", "config.yaml")
    assert code == 0 and "train: 24 examples" in out
    assert _tokens(cache) == good  # rebuilt: the same tokens as a fresh tokenization
    assert train(capsys)[0] == 0
    log = next((workdir / "outputs/logs").glob("sft_trainer_*.log")).read_text()
    assert "tokenized cache hit" in log  # the rebuilt cache, not the damaged one


@pytest.mark.parametrize(
    ("blocker", "what"),
    [
        ("outputs/3_training/runs", "TensorBoard's runs folder"),
        ("outputs/1_data", "the tokenized data cache folder"),
    ],
)
def test_an_unusable_stage_folder_is_found_before_anything_is_loaded(
    tiny_config, workdir: Path, capsys, blocker: str, what: str
) -> None:
    tiny_config()
    (workdir / blocker).parent.mkdir(parents=True, exist_ok=True)
    (workdir / blocker).write_text("a file where a folder should be")
    before = tree(workdir)
    code, _, err = train(capsys)
    assert code == 2
    assert f"{what} {blocker}: {blocker} is a file, not a folder" in one_line_error(err)
    assert changed(before, tree(workdir), ignore=("outputs/logs",)) == set()


def test_a_working_folder_without_room_for_logs_is_one_line(tiny_config, workdir, capsys):
    tiny_config()
    (workdir / "outputs").write_text("not a folder")
    code, _, err = train(capsys)
    assert code == 1
    assert "cannot write the run's log in outputs/logs" in one_line_error(err)


def test_a_chat_template_with_a_typo_is_one_line_naming_it(tiny_config, workdir, capsys):
    (workdir / "broken.jinja").write_text(
        "{% for message in messages %}{{ message['content'] }}\n{% if %}"
    )
    tiny_config(chat_template="broken.jinja")
    code, _, err = train(capsys)
    assert code == 5
    assert "chat template broken.jinja: line 2:" in one_line_error(err)


def test_a_chat_template_that_raises_names_the_record(tiny_config, workdir, capsys):
    (workdir / "strict.jinja").write_text(
        "{% for message in messages %}{% if message['role'] == 'assistant' %}"
        "{{ raise_exception('assistants may not speak') }}{% endif %}"
        "{{ message['content'] }}{% endfor %}"
    )
    tiny_config(chat_template="strict.jinja", eval_file=None)
    code, _, err = train(capsys)
    assert code == 3
    line = one_line_error(err)
    assert "train.jsonl:1: the chat template refused this record" in line
    assert "assistants may not speak" in line


LAUGHS = "\n".join(
    [
        'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]',
        *(
            f"{n}: &{n} [{', '.join([f'*{p}'] * 10)}]"
            for p, n in zip("abcdefgh", "bcdefghi", strict=True)
        ),
        "report_to: *i",
    ]
)


def test_a_yaml_alias_bomb_is_refused(workdir: Path, capsys) -> None:
    (workdir / "config.yaml").write_text(LAUGHS + "\n")
    code, _, err = train(capsys)
    assert code == 2
    assert "its YAML aliases (*name) expand to more than 100,000 values" in one_line_error(err)
    (workdir / "config.yaml").write_text("a: &a [*a]\n")
    assert "refers to the node that holds it" in one_line_error(train(capsys)[2])
    levels = ["&a [" + ", ".join(["1"] * 10) + "]"]
    levels += [
        f"&{n} [{', '.join([f'*{p}'] * 10)}]" for p, n in zip("abcdef", "bcdefg", strict=True)
    ]
    (workdir / "config.yaml").write_text("seed: 1\n")
    code, _, err = train(capsys, f"report_to=[{', '.join(levels)}]")
    assert code == 2 and "override report_to: its YAML aliases" in one_line_error(err)
    code, _, err = train(capsys, "report_to=[*undefined]")
    assert code == 2 and "value is not valid YAML (found undefined alias" in one_line_error(err)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"messages": ' + "[" * 5000 + "]" * 5000 + "}", "JSON nested too deeply"),
        ('{"text": "hi", "n": ' + "9" * 5000 + "}", "a JSON number is too long"),
    ],
)
def test_deep_json_or_a_huge_integer_in_data_is_one_line(
    tiny_config, workdir: Path, capsys, line: str, problem: str
) -> None:
    (workdir / "bad.jsonl").write_text(line + "\n")
    tiny_config(train_file="bad.jsonl", eval_file=None)
    code, _, err = train(capsys)
    assert code == 3 and f"bad.jsonl:1: {problem}" in one_line_error(err)
    code, out, _ = cli(capsys, "data", "validate", "bad.jsonl")
    assert code == 1 and problem in out


@pytest.mark.parametrize("name", [C.MANIFEST_FILE, C.TRAINER_STATE_FILE])
def test_deep_json_in_a_checkpoint_is_invalid_not_a_traceback(run: Path, capsys, name: str):
    ckpt = run / "checkpoint-12"
    deep = ("[" * 5000 + "]" * 5000).encode()
    if name == C.TRAINER_STATE_FILE:  # listed in the manifest with its true size and hash
        manifest = json.loads((ckpt / C.MANIFEST_FILE).read_text())
        manifest["files"][name] = {"size": len(deep), "sha256": hashlib.sha256(deep).hexdigest()}
        (ckpt / C.MANIFEST_FILE).write_text(json.dumps(manifest))
    (ckpt / name).write_bytes(deep)
    problem = integrity.verify(ckpt)
    assert problem is not None and ("damaged" in problem or "malformed" in problem)
    code, out, _ = cli(capsys, "ckpt", "list", str(run))
    assert code == 0 and "INVALID" in out


def test_rotation_that_cannot_delete_warns_once_and_training_goes_on(
    tiny_config, workdir: Path, capsys, monkeypatch
) -> None:
    def denied(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    tiny_config(eval_file=None, save_total_limit=1)
    with fs.replaced(rmtree=denied):
        code, out, _ = train(capsys)
    assert code == 0
    assert out.count("could not delete") == 1
    assert "training goes on and keeps the extra checkpoints" in out
    assert sorted(p.name for p in OUT.glob("checkpoint-*")) == [
        "checkpoint-12",
        "checkpoint-3",
        "checkpoint-6",
        "checkpoint-9",
    ]


def test_resume_of_a_run_folder_says_so(run: Path, capsys) -> None:
    code, _, err = train(capsys, "--resume", str(OUT))
    assert code == 4
    line = one_line_error(err)
    assert f"--resume {OUT}: that is a run folder; use --resume latest" in line
    assert f"--resume {OUT}/checkpoint-12" in line
