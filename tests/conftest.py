"""Shared fixtures: a tiny Llama model and tokenizer built in code, sample data, configs.

The tiny model (2 layers, hidden 32) makes a full train -> save -> resume cycle run on the
CPU in seconds, with no network.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

# Several xdist workers share the machine's cores: each test process (and every sftrun process
# a test starts, which inherits this) gets its share. torch's default, a thread per core in
# every process, oversubscribes them and OpenMP's spinning threads slow everything down:
# the two bundled-model tests side by side took 136 s with 2 threads each, 56 s with 1 (2
# cores). Set before torch is imported, which reads it; an explicit OMP_NUM_THREADS wins.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

import torch  # noqa: E402
import yaml  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "OMP_NUM_THREADS" in os.environ:  # in case a plugin imported torch first
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Heaviest test files first, each file's tests kept together and in order.

    ``make test`` hands whole files to its two workers (``--dist loadfile``), so a file's
    module and session fixtures are built once, not once per worker; starting with the files
    that hold the most slow tests keeps a long file from being the last one left running.
    """
    weight: dict[str, int] = {}
    for item in items:
        file = item.nodeid.split("::")[0]
        weight[file] = weight.get(file, 0) + (20 if item.get_closest_marker("slow") else 1)
    items.sort(key=lambda item: -weight[item.nodeid.split("::")[0]])  # stable: order kept


CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer(sample_texts: list[str]) -> Any:
    """A byte-level BPE tokenizer trained on ``sample_texts``, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sample_texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
    )
    fast.chat_template = CHATML
    return fast


# Tiny configs per architecture family (2 layers, hidden 32); the rest is each family's own.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {"num_key_value_heads": 2}),
    "qwen2": ("Qwen2Config", {"num_key_value_heads": 2, "attention_dropout": 0.1}),
    "mistral": ("MistralConfig", {"num_key_value_heads": 2, "sliding_window": None}),
    "gemma2": (
        "Gemma2Config",
        {"num_key_value_heads": 2, "head_dim": 8, "query_pre_attn_scalar": 8},
    ),
    "phi3": ("Phi3Config", {"num_key_value_heads": 2}),
    "gpt_neox": (
        "GPTNeoXConfig",
        {"rotary_pct": 0.5, "attention_dropout": 0.1, "hidden_dropout": 0.1},
    ),
}


def build_tiny_model(
    out: Path, sample_texts: list[str], family: str = "llama", **sizes: Any
) -> Path:
    """A random 2-layer model of ``family`` with the tiny tokenizer (``sizes`` override the
    config: hidden_size=256, ...)."""
    import transformers
    from transformers import AutoModelForCausalLM

    fast = tiny_tokenizer(sample_texts)
    name, extra = FAMILIES[family]
    shape = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 512,
        **sizes,
    }
    config = getattr(transformers, name)(
        vocab_size=len(fast),
        tie_word_embeddings=True,
        pad_token_id=fast.pad_token_id,
        eos_token_id=fast.eos_token_id,
        bos_token_id=fast.bos_token_id,
        **shape,
        **extra,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sftrun.sample_task import write_sample_data

    out = tmp_path_factory.mktemp("data")
    write_sample_data(out, n_train=24, n_eval=6, seed=7)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, sample_dir: Path) -> Path:
    texts = (sample_dir / "train.jsonl").read_text().splitlines()
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", texts)


def tiny_settings(tiny_model: Path, sample_dir: Path, **overrides: Any) -> dict[str, Any]:
    """Config for a 12-step run: 24 examples, global batch 4 (2 x 2), 2 epochs."""
    settings: dict[str, Any] = {
        "model_name_or_path": str(tiny_model),
        "train_file": str(sample_dir / "train.jsonl"),
        "eval_file": str(sample_dir / "eval.jsonl"),
        "output_dir": "checkpoints/sft_model",
        "max_seq_length": 160,
        "num_train_epochs": 2,
        "learning_rate": 5e-3,
        "warmup_steps": 2,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "logging_steps": 1,
        "save_steps": 3,
        "eval_steps": 6,
        "eval_accuracy": "none",
        "seed": 11,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
    }
    settings.update(overrides)
    return settings


def write_config(path: Path, settings: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run inside an empty folder: checkpoints/ and outputs/ land there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def tiny_config(workdir: Path, tiny_model: Path, sample_dir: Path):
    """Factory: write a tiny config (with overrides) and return its path."""

    def make(name: str = "config.yaml", **overrides: Any) -> Path:
        return write_config(workdir / name, tiny_settings(tiny_model, sample_dir, **overrides))

    return make


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.use_deterministic_algorithms(True)


PYTHON = sys.executable


def main_in(cwd: Path, *runs: list[str]) -> Path:
    """Run the CLI in-process inside ``cwd``, once per argument list; each must exit 0."""
    from sftrun.cli import main

    old = os.getcwd()
    os.chdir(cwd)
    try:
        for argv in runs:
            assert main(argv) == 0, argv
    finally:
        os.chdir(old)
    return cwd


@pytest.fixture
def copy_into_workdir(workdir: Path):
    """Factory: copy a finished run's folder into this test's working directory."""
    import shutil

    def copy(source: Path) -> Path:
        shutil.copytree(source, workdir, dirs_exist_ok=True)
        return workdir

    return copy


# A finished 12-step run (checkpoints 3, 6, 9, 12 of one run), built once per session.
@pytest.fixture(scope="session")
def finished(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, sample_dir: Path) -> Path:
    cwd = tmp_path_factory.mktemp("finished")
    settings = tiny_settings(tiny_model, sample_dir, eval_file=None)
    write_config(cwd / "config.yaml", settings)
    return main_in(cwd, ["train", "-y", "--config", "config.yaml"])


@pytest.fixture
def run(finished: Path, copy_into_workdir) -> Path:
    """A private copy of the finished run as the working directory; returns the run folder."""
    return copy_into_workdir(finished) / "checkpoints/sft_model"
