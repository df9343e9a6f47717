"""Train or resume the LoRA adapter: ``python run_model_training.py [-y] [--resume DIR]``.

The same as ``sftrun train``; see ``python run_model_training.py --help``.
"""

import sys
from pathlib import Path

# Work from a plain checkout too (before `pip install -e .`).
sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from sftrun.cli import train_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_main())
