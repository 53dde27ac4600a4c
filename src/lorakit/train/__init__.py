"""The training job behind `lorakit train | eval | merge`.

    from lorakit.train import load_recipe, run_train
    report = run_train(load_recipe("sentiment", {"steps": 10, "out": "runs/try"}))

Modules, one job each: `recipe` (fields, presets, files), `models` (built-in models, GGUF
conversion cache, device), `data` (built-in sets, user files, splits), `tasks` (tensors,
losses, scoring), `loop` (the optimiser loop), `report` (json/md/png), `job` (the pipeline).
"""

from .errors import DataError, ModelLoadError, RecipeError
from .job import evaluate_adapter, merge_adapter, run_train
from .recipe import PRESETS, Recipe, load_recipe, preset

__all__ = ["Recipe", "PRESETS", "preset", "load_recipe", "run_train", "evaluate_adapter", "merge_adapter",
           "RecipeError", "DataError", "ModelLoadError"]
