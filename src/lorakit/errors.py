"""Exception hierarchy. Every error lorakit raises on bad input derives from `LoraError`."""

from __future__ import annotations


class LoraError(Exception):
    """Base class of all lorakit errors."""


class ConfigError(LoraError, ValueError):
    """A `LoraConfig` field (or a field of an `adapter_config.json`) is invalid.

    The message starts with the field's name.
    """

    def __init__(self, field: str, message: str):
        self.field = field
        self.detail = message
        super().__init__(f"{field}: {message}")


class TargetNotFoundError(LoraError, ValueError):
    """`target_modules` (or a pattern key) matched no module of the model."""


class UnsupportedModuleError(LoraError, TypeError):
    """A matched module has a type lorakit cannot adapt."""


class AdapterNotFoundError(LoraError, KeyError):
    """An adapter name that the model does not have."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class AdapterExistsError(LoraError, ValueError):
    """An adapter name that the model already has."""


class AdapterLoadError(LoraError):
    """An adapter file or folder cannot be loaded into this model.

    Raised before anything in the model changes; the message names the file and,
    where one is at fault, the first bad tensor key.
    """


class MergeError(LoraError):
    """A merge-state operation that would corrupt the base weights."""


class QuantError(LoraError, ValueError):
    """Quantization asked for but impossible: bitsandbytes missing, a bad option, an unsupported weight."""


class UsageError(LoraError, ValueError):
    """A command-line argument or option that cannot be used (the message names it)."""
