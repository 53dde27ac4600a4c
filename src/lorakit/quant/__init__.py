"""QLoRA: LoRA on a frozen 4-bit NormalFloat (NF4) base (Dettmers et al. 2023, arXiv:2305.14314).

    import lorakit as lk
    lk.quantize(model, "nf4")                 # every nn.Linear but the LM head -> 4-bit NF4, double quantization
    lk.inject(model, lk.LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    ...train...
    merged, report = lk.quant.merge_quantized(model)   # dequantize + delta in float32 -> a dense model
    print(report.max_abs_error)

With `lk.quant.qera_quantize(model, calibration_batches)` instead of `lk.quantize`, a frozen
low-rank correction of the NF4 error sits beside every 4-bit layer (QERA; see `lorakit.quant.qera`).

The engine is bitsandbytes (`pip install 'lorakit[qlora]'`); see `lorakit.ops.nf4`
(the format) for why, and docs/qlora.md. This package is the model level: which layers
(`quantize`), what they store (`bits_per_param`, `base_weight_memory`), merging (`merge`),
the NF4 error correction (`qera`). Importing this package does not import bitsandbytes:
lorakit works without it, and asking for quantization without it raises `QuantError`.
"""

from ..errors import QuantError
from ..ops.nf4 import ENGINES, dequantize_weight, guard_cpu_repack, is_quantized_linear, quantized_layers
from .quantize import QuantReport, base_weight_memory, bits_per_param, quantize, select_linear_layers
from .merge import MergeReport, merge_quantized
from .qera import QeraReport, add_corrections, error_corrections, fold_corrections, qera_quantize

__all__ = [
    "quantize", "QuantError", "QuantReport", "bits_per_param", "base_weight_memory", "dequantize_weight",
    "is_quantized_linear", "quantized_layers", "guard_cpu_repack", "merge_quantized", "MergeReport", "ENGINES",
    "select_linear_layers", "qera_quantize", "error_corrections", "add_corrections", "fold_corrections", "QeraReport",
]
