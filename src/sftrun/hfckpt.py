"""Reading a Hugging Face Trainer checkpoint folder (TRL, Unsloth and LLaMA-Factory write the
same layout) without trusting it.

Owns what such a folder is and what in it is read: the adapter (safetensors), JSON files, and
``optimizer.pt``/``scheduler.pt``/``rng_state.pth`` through ``torch.load(weights_only=True)``.
``training_args.bin`` is a pickle of the trainer's arguments and is never unpickled: its opcodes
are walked by :func:`pickle_fields` (stdlib ``pickletools``), which builds plain values only and
never imports or calls anything. Layouts sftrun cannot continue (DeepSpeed and FSDP shards, a
full fine-tune, packed data) are refused here, one line each, before anything is written.
``hfimport`` checks the folder against a run and converts it.
"""

from __future__ import annotations

import io
import json
import pickletools
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sftrun import constants as C
from sftrun.errors import CheckpointError, ConfigError
from sftrun.integrity import parse_adapter

# Caps on what is read from a folder that may lie: the JSON and pickle files are small.
MAX_JSON_BYTES = 64 << 20
MAX_ARGS_BYTES = 16 << 20
MAX_TORCH_BYTES = 8 << 30

FORMAT = "hf-trainer"  # the name an import records (trainer_state.json's imported_from)


@dataclass
class HfCheckpoint:
    """What an HF Trainer checkpoint holds, read and shape-checked (not yet against a run)."""

    path: Path
    step: int
    epoch: float
    max_steps: int | None
    train_batch_size: int | None  # per process
    log_history: list[dict[str, Any]]
    adapter: dict[str, torch.Tensor]
    adapter_config: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any] | None  # None when it does not load without unpickling objects
    args: dict[str, Any]  # plain values from training_args.bin ({} when unreadable)
    ignored: list[str] = field(default_factory=list)  # what was not taken, and why

    @property
    def data_seed(self) -> int | None:
        """The seed of the trainer's data order: ``data_seed``, else ``seed``."""
        seed = self.args.get("data_seed")
        seed = self.args.get("seed") if seed is None else seed
        return seed if isinstance(seed, int) else None


def refuse_output_inside(output_dir: str, source: Path, what: str) -> None:
    """A folder that is only read (an imported checkpoint, a starting adapter) never becomes
    the run's folder or holds it: refused before the run lock or anything else is made."""
    out, src = Path(output_dir).resolve(), source.resolve()
    if out == src or src in out.parents:
        raise ConfigError(
            f"output_dir {output_dir} is inside {what} ({source}), which sftrun only reads; "
            "set output_dir to a folder of its own"
        )


def _refuse(path: Path, what: str, fix: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}; {fix}")


def check_layout(path: Path) -> None:
    """Refuse, one line each, the folders sftrun cannot continue, naming their format."""
    if not path.is_dir():
        raise _refuse(path, "not a folder", "pass an HF Trainer checkpoint-<step> folder")
    if (path / C.MANIFEST_FILE).exists():
        raise _refuse(path, "already an sftrun checkpoint", "continue it with --resume")
    names = {p.name for p in path.iterdir()}
    init = f"start a new run from its adapter instead (init_adapter: {path})"
    if zero := sorted(n for n in names if n.startswith("global_step")):
        raise _refuse(
            path, f"a DeepSpeed ZeRO checkpoint ({zero[0]}/ holds its optimizer in shards)", init
        )
    fsdp = sorted(n for n in names if n.startswith(("pytorch_model_fsdp", "optimizer_0")))
    if fsdp or any(n.endswith(".distcp") for n in names):
        raise _refuse(path, f"an FSDP-sharded checkpoint ({(fsdp or ['*.distcp'])[0]})", init)
    if C.ADAPTER_WEIGHTS_FILE not in names:
        if "adapter_model.bin" in names:
            raise _refuse(
                path,
                "its adapter is adapter_model.bin, a pickle sftrun never loads",
                "save it as adapter_model.safetensors (PEFT's save_pretrained does by default)",
            )
        full = sorted(n for n in names if n.startswith(("model", "pytorch_model")))
        if full:
            raise _refuse(
                path,
                f"a full fine-tune checkpoint ({full[0]}, no LoRA adapter)",
                "sftrun continues LoRA runs only",
            )
        raise _refuse(path, f"no {C.ADAPTER_WEIGHTS_FILE}", "this is not a LoRA checkpoint")
    for name in (C.ADAPTER_CONFIG_FILE, C.OPTIMIZER_FILE, C.SCHEDULER_FILE, C.TRAINER_STATE_FILE):
        if name not in names:
            raise _refuse(path, f"{name} is missing, so the run cannot be continued", init)


def _read(path: Path, name: str, limit: int) -> bytes:
    """Not ``integrity.read_small``: that one refuses links, rightly for sftrun's own folders;
    a source that is only read may be a hub-cache snapshot, whose files are links."""
    file = path / name
    if not file.is_file():
        raise _refuse(path, f"{name} is not a regular file", "pass the checkpoint folder itself")
    if file.stat().st_size > limit:
        raise _refuse(
            path, f"{name} is larger than {limit >> 20} MiB", "it is not a checkpoint file"
        )
    return file.read_bytes()


def _json(path: Path, name: str) -> dict[str, Any]:
    try:
        data = json.loads(_read(path, name, MAX_JSON_BYTES))
    except (ValueError, RecursionError):
        raise _refuse(path, f"{name} is not valid JSON", "the checkpoint is damaged") from None
    if not isinstance(data, dict):
        raise _refuse(path, f"{name} is not a JSON object", "the checkpoint is damaged")
    return data


def _torch(path: Path, name: str) -> Any:
    try:
        return torch.load(
            io.BytesIO(_read(path, name, MAX_TORCH_BYTES)), weights_only=True, map_location="cpu"
        )
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - every refusal of the safe loader is one answer
        raise _refuse(
            path,
            f"{name} holds more than tensors and numbers ({type(exc).__name__}), so it was not "
            "loaded",
            "sftrun loads checkpoint files with torch.load(weights_only=True) only",
        ) from None


def read(path: Path) -> HfCheckpoint:
    """The checkpoint at ``path``, each file read once; refusals name the file and the fix."""
    check_layout(path)
    state = _json(path, C.TRAINER_STATE_FILE)
    step, epoch = state.get("global_step"), state.get("epoch")
    if not isinstance(step, int) or step < 1 or not isinstance(epoch, int | float):
        raise _refuse(
            path,
            f"{C.TRAINER_STATE_FILE} has no global_step >= 1 and epoch",
            "the checkpoint is damaged",
        )
    adapter = parse_adapter(path, _read(path, C.ADAPTER_WEIGHTS_FILE, MAX_TORCH_BYTES))
    optimizer, scheduler = _torch(path, C.OPTIMIZER_FILE), _torch(path, C.SCHEDULER_FILE)
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("param_groups"), list):
        raise _refuse(path, f"{C.OPTIMIZER_FILE} is not an optimizer state", "it is damaged")
    if not isinstance(scheduler, dict) or "last_epoch" not in scheduler:
        raise _refuse(
            path,
            f"{C.SCHEDULER_FILE} is not a torch LR scheduler's state",
            "sftrun continues runs with transformers' built-in schedules",
        )
    ignored: list[str] = []
    rng = None
    if (path / C.RNG_STATE_FILE).is_file():
        try:
            rng = _torch(path, C.RNG_STATE_FILE)
        except CheckpointError:
            ignored.append(
                f"{C.RNG_STATE_FILE}: holds numpy objects that load only by unpickling; the "
                "random states are re-seeded from (seed, step) instead"
            )
    args: dict[str, Any] = {}
    if (path / C.TRAINING_ARGS_FILE).is_file():
        try:
            args = pickle_fields(_read(path, C.TRAINING_ARGS_FILE, MAX_ARGS_BYTES))
        except ValueError as exc:
            ignored.append(f"{C.TRAINING_ARGS_FILE}: not read ({exc})")
    if args:
        ignored.append(
            f"{C.TRAINING_ARGS_FILE}: read without unpickling; only the batch, seed, schedule, "
            "optimizer and data-order settings are used, the config gives the rest"
        )
    _refuse_unreproducible_order(path, args)
    history = state.get("log_history")
    return HfCheckpoint(
        path=path,
        step=step,
        epoch=float(epoch),
        max_steps=state.get("max_steps") if isinstance(state.get("max_steps"), int) else None,
        train_batch_size=state.get("train_batch_size")
        if isinstance(state.get("train_batch_size"), int)
        else None,
        log_history=[h for h in history if isinstance(h, dict)]
        if isinstance(history, list)
        else [],
        adapter=adapter,
        adapter_config=_json(path, C.ADAPTER_CONFIG_FILE),
        optimizer=optimizer,
        scheduler=scheduler,
        rng=rng if isinstance(rng, dict) else None,
        args=args,
        ignored=ignored,
    )


def _refuse_unreproducible_order(path: Path, args: dict[str, Any]) -> None:
    """Packing, length grouping and an unseeded sampler make the data order unrecoverable."""
    why = None
    if args.get("packing") is True:
        why = "the source run packed its data (packing=True), so its batches cannot be rebuilt"
    elif args.get("group_by_length") is True or args.get("train_sampling_strategy") not in (
        None,
        "random",
    ):
        why = "the source run did not sample at random (length grouping or a custom sampler)"
    elif (args.get("accelerator_config") or {}).get("use_seedable_sampler") is False:
        why = "the source run's sampler was not seeded (use_seedable_sampler=False)"
    if why is not None:
        raise _refuse(
            path,
            why,
            f"its data order cannot be continued; start a new run from its adapter "
            f"(init_adapter: {path})",
        )


def lora_problems(adapter_config: dict[str, Any], lora: Any) -> list[str]:
    """How a PEFT adapter_config.json differs from the config's ``lora`` settings, by name."""
    problems = []
    for key, theirs, ours in (
        ("lora.r", adapter_config.get("r"), lora.r),
        ("lora.alpha", adapter_config.get("lora_alpha"), lora.alpha),
        ("lora.dropout", adapter_config.get("lora_dropout"), lora.dropout),
    ):
        if theirs != ours:
            problems.append(f"{key}: the adapter has {theirs!r}, the config says {ours!r}")
    for key in ("use_dora", "use_rslora", "modules_to_save", "layers_to_transform"):
        if adapter_config.get(key):
            problems.append(f"the adapter uses PEFT's {key}, which sftrun does not train")
    if (
        adapter_config.get("peft_type", "LORA") != "LORA"
        or adapter_config.get("bias", "none") != "none"
    ):
        problems.append("the adapter is not a plain LoRA adapter (peft_type, bias)")
    return problems


def fit_problems(
    adapter_config: dict[str, Any], tensors: dict[str, torch.Tensor], peft_model: Any
) -> list[str]:
    """How an adapter's target modules, tensor names and shapes differ from the adapter
    ``peft_model`` carries (the one this config builds)."""
    from peft import get_peft_model_state_dict

    theirs = adapter_config.get("target_modules")
    theirs = sorted(theirs) if isinstance(theirs, list) else theirs
    ours = sorted(peft_model.peft_config["default"].target_modules)
    if theirs != ours:
        return [f"lora.target_modules: the adapter has {theirs!r}, the config gives {ours!r}"]
    expected = get_peft_model_state_dict(peft_model)
    if set(expected) != set(tensors):
        return ["the adapter's tensor names do not match this model's LoRA layers (base model?)"]
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            return [
                f"adapter tensor {name} is {tuple(tensor.shape)}, this model's is "
                f"{tuple(expected[name].shape)} (another base model?)"
            ]
    return []


def read_adapter(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A PEFT adapter folder's config and tensors (safetensors only; finite values)."""
    if not folder.is_dir():
        raise _refuse(folder, "not a folder", "give a PEFT adapter folder")
    for name in (C.ADAPTER_CONFIG_FILE, C.ADAPTER_WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise _refuse(folder, f"{name} is missing", "give a PEFT adapter folder")
    tensors = parse_adapter(folder, _read(folder, C.ADAPTER_WEIGHTS_FILE, MAX_TORCH_BYTES))
    return _json(folder, C.ADAPTER_CONFIG_FILE), tensors


# --- training_args.bin, read without unpickling ----------------------------------------------


class _Object:
    """A stand-in for an object the pickle would build: the class's name, its constructor
    arguments and its state. Nothing is imported or called."""

    def __init__(self, name: str, args: Any = ()) -> None:
        self.name, self.args, self.state = name, args, None

    def plain(self) -> Any:
        """An enum-like object (one plain argument) as that value, else its state dict."""
        if self.state is None and isinstance(self.args, tuple) and len(self.args) == 1:
            return self.args[0]
        return self.state if isinstance(self.state, dict) else None


_MARK = object()
_CONSTANTS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}
_VALUE_OPS = {"INT", "LONG", "BININT", "BININT1", "BININT2", "LONG1", "LONG4", "FLOAT", "BINFLOAT"}
_VALUE_OPS |= {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE"}
_VALUE_OPS |= {"SHORT_BINUNICODE", "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8"}


def _pop_mark(stack: list[Any]) -> list[Any]:
    """The items above the topmost mark (removing them and the mark)."""
    for i in range(len(stack) - 1, -1, -1):
        if stack[i] is _MARK:
            items = stack[i + 1 :]
            del stack[i:]
            return items
    raise ValueError("no MARK on the stack")


def _step(op: str, arg: Any, stack: list[Any], memo: dict[Any, Any]) -> None:
    """One opcode on the value stack (plain values, containers and stand-ins only)."""
    if op in _VALUE_OPS:
        stack.append(arg)
    elif op in _CONSTANTS:
        stack.append(_CONSTANTS[op])
    elif op == "MARK":
        stack.append(_MARK)
    elif op in ("EMPTY_DICT", "EMPTY_LIST", "EMPTY_TUPLE", "EMPTY_SET"):
        stack.append({"EMPTY_DICT": {}, "EMPTY_LIST": [], "EMPTY_TUPLE": ()}.get(op, []))
    elif op in ("TUPLE", "LIST", "DICT", "FROZENSET"):
        items = _pop_mark(stack)
        pairs = zip(items[::2], items[1::2], strict=True)
        made = {"TUPLE": tuple(items), "LIST": items, "FROZENSET": items}
        stack.append(made[op] if op != "DICT" else {_key(k): v for k, v in pairs})
    elif op in ("TUPLE1", "TUPLE2", "TUPLE3"):
        n = int(op[-1])
        stack[-n:] = [tuple(stack[-n:])]
    elif op in ("SETITEM", "SETITEMS"):
        items = [stack.pop(), stack.pop()][::-1] if op == "SETITEM" else _pop_mark(stack)
        if isinstance(stack[-1], dict):
            stack[-1].update({_key(k): v for k, v in zip(items[::2], items[1::2], strict=True)})
    elif op in ("APPEND", "APPENDS", "ADDITEMS"):
        items = [stack.pop()] if op == "APPEND" else _pop_mark(stack)
        if isinstance(stack[-1], list):
            stack[-1].extend(items)
    elif op in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
        memo[len(memo) if op == "MEMOIZE" else arg] = stack[-1]
    elif op in ("GET", "BINGET", "LONG_BINGET"):
        stack.append(memo[arg])
    elif op == "GLOBAL":
        stack.append(_Object(str(arg).replace(" ", ".")))
    elif op == "STACK_GLOBAL":
        name, module = stack.pop(), stack.pop()
        stack.append(_Object(f"{module}.{name}"))
    elif op in ("REDUCE", "NEWOBJ"):
        args, cls = stack.pop(), stack.pop()
        stack.append(_Object(getattr(cls, "name", "?"), args))
    elif op == "NEWOBJ_EX":
        stack.pop()  # keyword arguments
        args, cls = stack.pop(), stack.pop()
        stack.append(_Object(getattr(cls, "name", "?"), args))
    elif op == "BUILD":
        state = stack.pop()
        if isinstance(stack[-1], _Object):
            stack[-1].state = state[0] if isinstance(state, tuple) and state else state
    elif op == "BINPERSID":  # a tensor stored beside the pickle: not a plain value
        stack[-1] = _Object("persistent", ())
    elif op == "POP":
        stack.pop()
    elif op == "POP_MARK":
        _pop_mark(stack)
    elif op == "DUP":
        stack.append(stack[-1])
    elif op not in ("PROTO", "FRAME", "STOP"):
        raise ValueError(f"pickle opcode {op} is not read")


def _key(key: Any) -> Any:
    return key if isinstance(key, str | int | float | bool) or key is None else repr(key)


def _pickle_bytes(raw: bytes) -> bytes:
    """The pickle inside ``torch.save``'s zip container (``*/data.pkl``), or ``raw`` itself."""
    if not zipfile.is_zipfile(io.BytesIO(raw)):
        return raw
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        entries = [i for i in archive.infolist() if i.filename.endswith("/data.pkl")]
        if len(entries) != 1 or entries[0].file_size > MAX_ARGS_BYTES:
            raise ValueError("a zip file without one small data.pkl")
        return archive.read(entries[0])


def pickle_fields(raw: bytes) -> dict[str, Any]:
    """The plain fields of the object a pickle holds (a trainer's arguments, as ``torch.save``
    or ``pickle`` wrote it), found by walking its opcodes: numbers, strings, booleans, None,
    enum values and nested objects' fields. Nothing is imported or called, so a hostile file
    can at worst make this raise ValueError.
    """
    try:
        raw = _pickle_bytes(raw)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ValueError(f"not a readable torch.save file ({exc})") from None
    stack: list[Any] = []
    memo: dict[Any, Any] = {}
    try:
        for opcode, arg, _pos in pickletools.genops(io.BytesIO(raw)):
            _step(opcode.name, arg, stack, memo)
            if opcode.name == "STOP":
                break
    except (IndexError, KeyError, TypeError, ValueError, RecursionError, UnicodeError) as exc:
        raise ValueError(f"not a pickle this reader follows ({type(exc).__name__})") from None
    top = stack[-1] if stack else None
    fields = top.plain() if isinstance(top, _Object) else top
    if not isinstance(fields, dict):
        raise ValueError("it does not hold an object with fields")
    return {str(k): _plain(v) for k, v in fields.items()}


def _plain(value: Any, depth: int = 0) -> Any:
    if isinstance(value, _Object):
        inner = value.plain()
        return _plain(inner, depth + 1) if depth < 4 else None
    if isinstance(value, dict):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()} if depth < 4 else None
    if isinstance(value, list | tuple):
        return [_plain(v, depth + 1) for v in value] if depth < 4 else None
    return value
