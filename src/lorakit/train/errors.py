"""Errors of the training job. All derive from `lorakit.LoraError` (and `ValueError`),
so the command line turns each into a one-line message."""

from __future__ import annotations

from ..errors import LoraError


class RecipeError(LoraError, ValueError):
    """A recipe field (from a file, a flag or a preset) is unknown or invalid; the message names it."""


class RecipeFileNotFound(RecipeError, FileNotFoundError):
    """A recipe file that does not exist."""


class DataError(LoraError, ValueError):
    """A data file is missing, empty, unreadable, lacks a named field, or has unusable labels."""


class ModelLoadError(LoraError, ValueError):
    """A model name or path that is neither a built-in model nor a loadable model folder or GGUF file."""


class CheckpointError(LoraError, ValueError):
    """`--resume` found no checkpoint, a corrupt or truncated one, or one that does not fit the run."""


class TrainingDiverged(LoraError, ValueError):
    """The loss, the gradients or the trainable tensors became NaN or infinite; the message names the step."""
