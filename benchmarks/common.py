"""Shared pieces of the benchmarks: machine facts, the SmolLM2-135M architecture, paired timing."""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

# SmolLM2-135M (the default recipe's model): Llama architecture, 30 layers, hidden 576,
# 9 heads / 3 KV heads, MLP 1536, vocabulary 49,152, tied embeddings. Timing does not
# depend on the weights' values, so benchmarks use random weights of this shape.
SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5,
    rope_theta=100000.0,
)
LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32)
LLAMA2_70B = dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                  num_attention_heads=64, num_key_value_heads=8)
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def machine() -> dict:
    return {
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def build_model(arch: dict | None = None, seed: int = 0, device: str = "cpu"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**(arch or SMOLLM2_135M))
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model


def timed(fn: Callable[[], object]) -> float:
    gc.collect()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def paired(contenders: dict[str, Callable[[], object]], rounds: int, warmup: int = 1, inner: int = 1) -> dict[str, list[float]]:
    """Run the contenders interleaved (A B C A B C ...), `rounds` times; seconds per call, per round."""
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            times[name].append(timed(lambda: [fn() for _ in range(inner)]) / inner)
    return times


def ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of the per-round ratio num/den."""
    return round(statistics.median(a / b for a, b in zip(times[num], times[den])), 3)


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {k: round(statistics.median(v), 4) for k, v in times.items()}


def peak_rss_subprocess(module: str, *args: str) -> dict:
    """Run `python -m benchmarks.<module> args` in a fresh process; it prints one JSON line."""
    out = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (see `lorakit.train.loop.peak_memory_bytes`)."""
    import torch

    from lorakit.train.loop import peak_memory_bytes

    return peak_memory_bytes(torch.device("cpu")) / 2**20
