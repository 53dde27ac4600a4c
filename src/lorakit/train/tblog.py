"""TensorBoard event files for `lorakit train --tensorboard`: `OUT/tensorboard/`.

Written with `torch.utils.tensorboard.SummaryWriter` (needs the `tensorboard` package:
`pip install 'lorakit[tensorboard]'`), alongside the plain log: per step `train/loss`, `train/lr`,
`train/grad_norm`, `train/tokens`; per validation `val/<metric>`; at the end `test/<metric>` for
the base model (step 0) and the trained one (last step). View with `tensorboard --logdir OUT/tensorboard`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import RecipeError


class TensorBoardLog:
    def __init__(self, folder: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter  # optional, heavy (tensorboard, protobuf)
        except ImportError:
            raise RecipeError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
        self.folder = Path(folder)
        self.writer = SummaryWriter(log_dir=str(self.folder))
        self.last_step = 0

    def step(self, record: dict[str, Any]) -> None:
        """One training step's record (`loop.LoopResult.history` entry)."""
        self.last_step = int(record["step"])
        for key in ("loss", "lr", "grad_norm", "tokens"):
            if key in record:
                self.writer.add_scalar(f"train/{key}", float(record[key]), self.last_step)
        self.writer.flush()

    def metrics(self, prefix: str, metrics: dict[str, Any] | None, step: int | None = None) -> None:
        """Numeric entries of `metrics` as `prefix/<name>` at `step` (default: the last training step)."""
        for key, value in (metrics or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "n":
                self.writer.add_scalar(f"{prefix}/{key}", float(value), self.last_step if step is None else step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
