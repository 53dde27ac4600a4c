"""Errors of `lorakit.analysis`. All derive from `lorakit.LoraError`."""

from __future__ import annotations

from ..errors import LoraError


class AnalysisError(LoraError, ValueError):
    """An analysis cannot run on this input (bad matrix shapes, no LoRA tensors, bad option)."""


class NoCommonModulesError(AnalysisError):
    """Two adapters compared by `subspace_similarity` adapt no module in common."""


class BaseModelError(AnalysisError):
    """A `--base` / `--full-finetune` checkpoint is missing, unreadable, lacks a module's
    weight, or holds a weight whose shape does not fit the adapter."""
