"""Training configuration: one validated pydantic model, built from defaults < YAML < CLI.

Owns the schema, its documentation (``Field(description=...)``), the YAML loading and the
``KEY=VALUE`` overrides. Never touches checkpoints or models. Unknown keys are errors that
name the key, its file and line, and the keys that are allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sftrun import constants as C
from sftrun.errors import ConfigError

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoraSettings(BaseModel):
    """LoRA adapter shape; part of the model's identity (must not change on resume)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: int = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: list(ALL_LINEAR),
        min_length=1,
        description="Names of the linear layers that get an adapter, or all-linear (every "
        "linear layer but the output head, resolved per architecture by PEFT).",
    )


class QuantizationSettings(BaseModel):
    """A k-bit frozen base (QLoRA) through bitsandbytes; part of the model's identity."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    bits: Literal[4, 8] = Field(4, description="4 (QLoRA) or 8.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Also quantize the 4-bit scales.")
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="Dtype of the 4-bit matmuls; null: the run's compute precision."
    )


class TrainingConfig(BaseModel):
    """Everything a training run reads. See docs/configuration.md for each key."""

    # No NaN or infinity anywhere: `learning_rate=.inf` would train NaN into every weight.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    # model and data
    model_name_or_path: str = Field(C.DEFAULT_MODEL_DIR, description="Local HF causal-LM folder.")
    train_file: str | list[str] = Field(
        "data/sample/train.jsonl",
        min_length=1,
        description="Training data: .jsonl/.json/.parquet/.csv/.arrow, a save_to_disk "
        "folder, or a list of them.",
    )
    eval_file: str | list[str] | None = Field(
        "data/sample/eval.jsonl", min_length=1, description="Held-out data (as train_file) or null."
    )
    chat_template: str | None = Field(
        None,
        description="Replace the tokenizer's chat template: a known name (chatml) or a path "
        "to a Jinja file; null: the tokenizer's own.",
    )
    output_dir: str = Field(C.DEFAULT_OUTPUT_DIR, description="Where checkpoint-<step>/ go.")
    max_seq_length: int = Field(512, gt=8, description="Longest tokenized example.")
    overlong: Literal["truncate", "drop"] = Field(
        "truncate", description="What to do with examples longer than max_seq_length."
    )
    train_on: Literal["assistant", "all"] = Field(
        "assistant", description="Which tokens carry loss: assistant replies only, or all."
    )

    # length and schedule
    num_train_epochs: float = Field(3.0, gt=0, description="Epochs (may be fractional).")
    max_steps: int = Field(-1, description="Optimizer steps; -1 means use num_train_epochs.")
    learning_rate: float = Field(2.0e-4, gt=0, description="Peak learning rate.")
    lr_scheduler_type: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Decay after warm-up."
    )
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Warm-up as a share of all steps.")
    warmup_steps: int = Field(0, ge=0, description="Warm-up steps; wins over warmup_ratio if > 0.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping; 0 turns it off.")

    # batch
    per_device_train_batch_size: int = Field(4, gt=0, description="Micro-batch per process.")
    gradient_accumulation_steps: int = Field(2, gt=0, description="Micro-batches per step.")
    per_device_eval_batch_size: int = Field(8, gt=0, description="Batch for eval and generation.")
    oom: Literal["auto", "adapt", "stop"] = Field(
        "auto",
        description="Out of memory in a step: adapt = halve the micro-batch, double the "
        "accumulation and redo the step (the same samples and global batch); stop = exit with "
        "the fix; auto = adapt on CUDA in one process, stop otherwise.",
    )

    # intervals
    logging_steps: int = Field(10, gt=0, description="Log metrics every N optimizer steps.")
    report_to: list[
        Literal[
            "tensorboard",
            "wandb",
            "mlflow",
            "aim",
            "clearml",
            "comet_ml",
            "dvclive",
            "swanlab",
            "trackio",
        ]
    ] = Field(
        ["tensorboard"],  # pydantic copies a mutable default for every config
        description="Dashboards: tensorboard, wandb, mlflow (or another accelerate tracker).",
    )
    save_steps: int = Field(500, gt=0, description="Commit a checkpoint every N steps.")
    eval_steps: int = Field(0, ge=0, description="Held-out loss every N steps; 0 = at end only.")
    save_total_limit: int | None = Field(None, gt=0, description="Keep at most N checkpoints.")
    metric_for_best_model: Literal["eval_loss"] | None = Field(
        None, description="Track the best checkpoint by this metric and never rotate it away."
    )

    # held-out generation accuracy (before and after training)
    eval_accuracy: Literal["exact", "json", "none"] = Field(
        "exact", description="Scorer for generated replies: exact text, JSON equality, or off."
    )
    eval_max_new_tokens: int = Field(64, gt=0, description="Generation length for accuracy.")
    eval_max_samples: int | None = Field(None, gt=0, description="Cap held-out examples scored.")

    # numerics and backend
    seed: int = Field(
        42, ge=0, lt=2**32, description="Seeds LoRA init, data order and dropout (0 to 2^32-1)."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Compute precision: auto = bf16 autocast on CUDA and on CPUs with native bf16 "
        "(AVX512-BF16, AMX, Arm BF16), fp32 on other CPUs; a resume keeps the checkpoint's.",
    )
    mirror_to: str | None = Field(
        None,
        description="Also copy every checkpoint here (a path or URL such as s3://bucket/run).",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute each layer's activations in backward (non-reentrant): less "
        "memory, about a third more compute, the same numbers.",
    )
    ddp_timeout: int = Field(
        600, gt=0, description="Seconds a multi-process launch waits for every process."
    )
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="Several processes: ddp = every process holds the whole base model; "
        "fsdp = each holds 1/N of every decoder layer's frozen weights.",
    )
    backend: Literal["auto", "unsloth", "plain"] = Field(
        "auto", description="Model backend: Unsloth where it imports and CUDA is there."
    )
    lora: LoraSettings = Field(default_factory=lambda: LoraSettings())
    init_adapter: str | None = Field(
        None,
        description="Start a new run from this PEFT LoRA adapter folder (adapter_model."
        "safetensors + adapter_config.json) instead of a fresh adapter; null: fresh.",
    )
    quantization: QuantizationSettings | None = Field(
        None, description="A k-bit frozen base (QLoRA); null: the base in the compute dtype."
    )

    @model_validator(mode="after")
    def _check_length(self) -> TrainingConfig:
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError("max_steps must be -1 (use num_train_epochs) or a positive count")
        twice = sorted({t for t in self.report_to if self.report_to.count(t) > 1})
        if twice:  # two runs of one tracker under one id would interleave their points
            raise ValueError(f"report_to lists {', '.join(twice)} more than once")
        return self


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping (YAML would keep the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(
                    f"{self.name}:{line}: key {key!r} is given twice (first at line "
                    f"{seen[key]}); keep one"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


# A config holds a few hundred values; YAML aliases (*name) can make a tiny file stand for
# billions of them (the "billion laughs"), which validation would then walk one by one.
MAX_CONFIG_VALUES = 100_000


def _check_expanded_size(root: yaml.Node | None, path: Path) -> None:
    """Refuse a document whose aliases expand to more than MAX_CONFIG_VALUES values, or
    that refers to itself; counted on the node graph (each shared node once), in no time."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise ConfigError(f"{path}: a YAML alias refers to the node that holds it; remove it")
        open_nodes.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        open_nodes.discard(key)
        sizes[key] = min(total, MAX_CONFIG_VALUES + 1)
        return sizes[key]

    if root is not None and size(root) > MAX_CONFIG_VALUES:
        raise ConfigError(
            f"{path}: its YAML aliases (*name) expand to more than {MAX_CONFIG_VALUES:,} values; "
            "a config needs a few hundred: write the values out without aliases"
        )


def _key_lines(text: str) -> dict[str, int]:
    """Map dotted keys of a YAML mapping to their 1-based line numbers (best effort)."""
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = f"{prefix}{key_node.value}"
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, key + ".")

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, "")
    return lines


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return []
    return sorted(model.model_fields)


def parse_override(item: str) -> tuple[str, Any]:
    """Split ``KEY=VALUE`` (VALUE parsed as YAML) or raise ConfigError."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not KEY=VALUE; write e.g. learning_rate=1e-4")
    if raw == "":
        return key.strip(), ""
    try:
        loader = yaml.SafeLoader(raw)
        try:
            node = loader.get_single_node()
            _check_expanded_size(node, Path(f"override {key.strip()}"))
            value = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except RecursionError:
        raise ConfigError(f"override {key.strip()}: the value is nested too deeply") from None
    except yaml.YAMLError as exc:
        why = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"override {item!r}: value is not valid YAML ({why})") from None
    return key.strip(), value


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainingConfig:
    """Build the config from defaults, then the YAML file (if given), then overrides.

    Raises ConfigError naming the file, line and key of the first problem found, with
    every other problem listed after it.
    """
    data: dict[str, Any] = {}
    text = ""
    source = "<defaults>"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}; pass --config PATH to an existing file")
        try:
            text = p.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"{p}: not UTF-8 text (byte at offset {exc.start}); save the config as UTF-8"
            ) from None
        try:
            loader = _UniqueKeyLoader(text)
            loader.name = str(p)
            try:
                node = loader.get_single_node()
                _check_expanded_size(node, p)
                loaded = loader.construct_document(node) if node is not None else None
            finally:
                loader.dispose()
        except RecursionError:
            raise ConfigError(
                f"{p}: nested too deeply to be a config; a config is a few levels of key: value"
            ) from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
            raise ConfigError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of key: value")
        data = loaded
    cli_keys: set[str] = set()
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(data, key, value)
        cli_keys.add(key)
    try:
        return TrainingConfig.model_validate(data)
    except ValidationError as exc:
        lines = _key_lines(text)
        messages = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            key = ".".join(str(x) for x in loc)
            origin = "command line" if key in cli_keys else source
            line = lines.get(key)
            where = f"{origin}:{line}" if line and origin == source else origin
            if err["type"] == "extra_forbidden":
                allowed = ", ".join(_allowed_keys(TrainingConfig, loc))
                messages.append(f"{where}: unknown key {key!r}; allowed keys: {allowed}")
            else:
                messages.append(f"{where}: {key}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError("; ".join(messages)) from None


def config_to_dict(cfg: TrainingConfig) -> dict[str, Any]:
    """Plain-data view of the config (JSON/YAML/torch-safe types only)."""
    return cfg.model_dump(mode="json")
