"""Train 2 steps in this process and print, as JSON, how much the anonymous resident memory
grew during training (its peak, sampled every millisecond from step 1 on, over its size then)
and what ``sftrun.memory.estimate`` expected on top of the loaded weights.

Anonymous memory (``RssAnon``) is where tensors live. The whole resident size also counts
file-backed pages: the code of torch's libraries, faulted in when training first runs a
kernel, or again after the kernel reclaimed them (this VM runs DAMON reclaim), which made the
whole-RSS growth vary with the machine's load (1.08 of the estimate alone, 1.42 once in the
full suite). ``grown_rss`` (the old measure, VmHWM over the resident size) is printed beside it.

    python peak.py MODEL DATA MICRO CHECKPOINTING(0|1)
"""

import json
import os
import sys
import threading
import time
from pathlib import Path

import torch

from sftrun import memory
from sftrun.cli import main
from sftrun.config import LoraSettings
from sftrun.hooks import RunHooks
from sftrun.modeling import load_lora_model, select_backend

model, data, micro, checkpointing = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
start = {}


def _hwm() -> int:
    """The peak resident size (VmHWM) in bytes."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _anon() -> int:
    """The anonymous resident size (RssAnon) in bytes."""
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


peak_anon = [0]
done = threading.Event()


def _sample() -> None:
    while not done.is_set():
        peak_anon[0] = max(peak_anon[0], _anon())
        time.sleep(0.001)


def on_step_start(step):
    if step == 0:
        start["anon"] = _anon()
        threading.Thread(target=_sample, daemon=True).start()
        # Forget the peak of loading (freed memory still counts in it, and how much of it was
        # returned to the system varies with the machine's load): from here on, the peak is
        # training's. "5" resets VmHWM (Linux, proc(5)).
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        pages = int(open("/proc/self/statm").read().split()[1])
        start["rss"] = pages * os.sysconf("SC_PAGE_SIZE")


settings = [
    f"model_name_or_path={model}",
    f"train_file={data}",
    "eval_file=null",
    "max_seq_length=512",
    "max_steps=2",
    f"per_device_train_batch_size={micro}",
    "gradient_accumulation_steps=1",
    "save_steps=1000",
    f"gradient_checkpointing={'true' if checkpointing else 'false'}",
    "report_to=[]",
    "eval_accuracy=none",
    "lora.r=8",
]
config = Path(__file__).resolve().parents[2] / "configs/training_config.yaml"
assert (
    main(
        ["train", "-y", "--config", str(config), *settings],
        hooks=RunHooks(on_step_start=on_step_start),
    )
    == 0
)
done.set()
grown_rss = _hwm() - start["rss"]
grown = max(peak_anon[0], _anon()) - start["anon"]
lora = LoraSettings(r=8, alpha=32, dropout=0.05)
peft = load_lora_model(model, lora, select_backend("plain", True), torch.float32, 512)
e = memory.estimate(
    peft,
    micro_batch=micro,
    seq_len=512,
    compute_bytes=4,
    checkpointing=checkpointing,
    device=torch.device("cpu"),
)
print(json.dumps({"grown": grown, "grown_rss": grown_rss, "expected": e.total - e.weights}))
