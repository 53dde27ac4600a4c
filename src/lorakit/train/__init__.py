"""The training job behind `lorakit train | eval | merge`.

    from lorakit.train import load_recipe, run_train
    report = run_train(load_recipe("sentiment", {"steps": 10, "out": "runs/try"}))

Modules, one job each: `recipe` (fields, presets, files), `flags` (the command-line flags
that set recipe fields), `models` (built-in models, GGUF conversion cache, device), `data`
(built-in sets, user files, splits), `tasks` (tensors, losses, scoring), `prepare` (a recipe's
model, data and LoraConfig), `loop` (the optimiser loop), `checkpoint` (resumable state),
`distributed` (torchrun, DDP, FSDP2), `report` (json/md/png), `job` (the pipeline in
stages), `saved` (`lorakit eval` / `merge` from a saved run).
"""

from .errors import DataError, ModelLoadError, RecipeError
from .job import run_train
from .recipe import PRESETS, Recipe, load_recipe, preset
from .saved import evaluate_adapter, merge_adapter

__all__ = ["Recipe", "PRESETS", "preset", "load_recipe", "run_train", "evaluate_adapter", "merge_adapter",
           "RecipeError", "DataError", "ModelLoadError"]
