"""lorakit: Low-Rank Adaptation (Hu et al. 2021, arXiv:2106.09685) for PyTorch models.

    import lorakit as lk
    cfg = lk.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"])
    model = lk.inject(model, cfg)          # in place; base frozen; outputs unchanged at step 0
    lk.save_adapter(model, "out/adapter")  # PEFT layout
    plain = lk.merge_and_unload(model)     # base architecture, adapter folded in
"""

from .config import LoraConfig
from .errors import (
    AdapterExistsError,
    AdapterLoadError,
    AdapterNotFoundError,
    ConfigError,
    LoraError,
    MergeError,
    TargetNotFoundError,
    UnsupportedModuleError,
)
from .combine import CombineReport, combine
from .inject import active_adapters, adapter_names, delete_adapter, disabled, inject, set_active, set_trainable, unload
from .io import (
    adapter_state_dict, convert_pissa_to_lora, load_adapter, load_adapters, pissa_to_lora, read_adapter, read_config,
    save_adapter, save_adapters,
)
from .layers import LoraConv, LoraEmbedding, LoraLayer, LoraLinear, LoraLinear4bit, ModulesToSave
from .loraplus import loraplus_param_groups
from .merge import count_parameters, merge, merge_and_unload, unmerge
from .mixed import mixed_batch
from .scale import adapter_scale, set_scale
from . import quant
from .quant import quantize
from .export import export_gguf_adapter, export_gguf_merged
from .verify import VerifyReport, verify
from .version import __version__

__all__ = [
    "__version__",
    "LoraConfig",
    "LoraError", "ConfigError", "TargetNotFoundError", "UnsupportedModuleError", "AdapterLoadError",
    "AdapterNotFoundError", "AdapterExistsError", "MergeError",
    "inject", "set_active", "set_trainable", "active_adapters", "adapter_names", "disabled", "delete_adapter", "unload",
    "merge", "unmerge", "merge_and_unload", "count_parameters", "set_scale", "adapter_scale",
    "combine", "CombineReport", "mixed_batch",
    "save_adapter", "save_adapters", "load_adapter", "load_adapters", "read_adapter", "read_config",
    "adapter_state_dict",
    "LoraLayer", "LoraLinear", "LoraLinear4bit", "LoraEmbedding", "LoraConv", "ModulesToSave",
    "loraplus_param_groups", "convert_pissa_to_lora", "pissa_to_lora",
    "quantize", "quant",
    "export_gguf_adapter", "export_gguf_merged", "verify", "VerifyReport",
]
