"""sftrun: LoRA supervised fine-tuning with crash-safe checkpoints and exact resume."""

__version__ = "0.1.0"
