"""Shipping adapters and merged models to other engines: llama.cpp's GGUF files.

    from lorakit.export import export_gguf_adapter, export_gguf_merged
    export_gguf_adapter("runs/demo/adapter", "adapter.gguf", base_gguf="SmolLM2-135M-Instruct.Q4_1.gguf")
    export_gguf_merged(model, "merged.gguf", source_gguf="SmolLM2-135M-Instruct.Q4_1.gguf", outtype="q8_0")

`llama-cli -m SmolLM2-135M-Instruct.Q4_1.gguf --lora adapter.gguf` then runs the base with the
adapter, and `llama-cli -m merged.gguf` the merged model. Layouts, scaling and what cannot be
represented: `lorakit.export.adapter`, `lorakit.export.merged`, docs/export.md.
"""

from .adapter import AdapterExport, export_gguf_adapter
from .arch import GGUFArch, GGUFExportError
from .merged import MergedExport, export_gguf_merged

__all__ = ["export_gguf_adapter", "export_gguf_merged", "AdapterExport", "MergedExport", "GGUFArch", "GGUFExportError"]
