"""`ModulesToSave`: a trainable per-adapter copy of a whole module (e.g. a classification head)."""

from __future__ import annotations

import copy

from torch import nn


class ModulesToSave(nn.Module):
    """Holds `original_module` and, per adapter, a trainable deep copy in `modules_to_save[name]`.

    The forward runs the copy of the first active adapter that has one, else the
    original. Attribute names follow PEFT's `ModulesToSaveWrapper`, and the file
    keys are the module's own parameter names (`<path>.weight`), as in PEFT files.
    """

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False

    def add_adapter(self, name: str) -> None:
        module = copy.deepcopy(self.original_module)
        for p in module.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = module

    def delete_adapter(self, name: str) -> None:
        del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    @property
    def adapter_names(self) -> tuple[str, ...]:
        return tuple(self.modules_to_save.keys())

    def set_active(self, names) -> None:
        self.active_adapter = next((n for n in names if n in self.modules_to_save), None)

    def current(self) -> nn.Module:
        if self.disabled or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args, **kwargs):
        return self.current()(*args, **kwargs)
