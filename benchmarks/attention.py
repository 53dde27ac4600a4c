"""Benchmark: what each attention backend costs on the CPU at 2k and 8k tokens (issue 16, item 3).

Two SmolLM2-135M decoder layers (hidden 576, 9 heads / 3 KV heads, head dim 64), float32, LoRA
r=16 on the 7 projections (lorakit), the chunked loss, no checkpointing: one forward + backward,
in a fresh process per case, for `attn_implementation` eager and sdpa, and for three inputs:
- `causal`: full rows, no mask;
- `padding`: the last quarter of the last row is padding (a 2-D `attention_mask`);
- `packed`: 8 examples per row, `position_ids` restarting, no `attention_mask` (transformers
  builds the block-diagonal mask);
- `packed_mask`: the same rows with an explicit additive float32 `(B, 1, T, T)` block-diagonal
  mask (`lorakit.train.packing.block_causal_mask`), built once and shared by the layers.
Batch 2 at 2048, batch 1 at 8192. Peak = `VmHWM` minus RSS before the step; the 30-layer model
without checkpointing keeps 15x the per-2-layer activations, with checkpointing one layer's.
Before the timed case, a 256-token probe of the same case (batch 1, both layers, forward and
backward) records which aten attention kernels ran and every op that created a `(..., T, T)`
tensor (op, dtype, elements in units of T x T, count).

    python -m benchmarks.attention                # 2048 and 8192
    python -m benchmarks.attention --lengths 2048
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .common import SMOLLM2_135M, machine
from .longctx import _env, _reset_peak, _status

CASES = [(a, i) for i in ("causal", "padding", "packed", "packed_mask") for a in ("eager", "sdpa")]
LAYERS = 2


def build(attn: str):
    import lorakit as lk
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**dict(SMOLLM2_135M, num_hidden_layers=LAYERS, max_position_embeddings=8192))
    cfg._attn_implementation = attn
    model = LlamaForCausalLM(cfg).train()
    lk.inject(model, lk.LoraConfig(r=16, alpha=32, target_modules="all-linear"))
    return model


def inputs(kind: str, batch: int, length: int) -> dict:
    ids = torch.randint(0, SMOLLM2_135M["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(1))
    out = {"input_ids": ids, "labels": ids.clone()}
    if kind == "padding":
        mask = torch.ones_like(ids)
        mask[-1, length - length // 4:] = 0
        out["attention_mask"] = mask
        out["labels"] = ids.masked_fill(mask == 0, -100)
    elif kind.startswith("packed"):
        piece = length // 8
        out["position_ids"] = (torch.arange(length) % piece).expand(batch, -1).contiguous()
        if kind == "packed_mask":  # one explicit float mask shared by the layers (lorakit.train.packing)
            from lorakit.train.packing import block_causal_mask

            out["attention_mask"] = block_causal_mask((torch.arange(length) // piece).expand(batch, -1), torch.float32)
    return out


class _Watch(TorchDispatchMode):
    """Records the attention kernels that run and every op that creates a `(..., T, T)` tensor."""

    def __init__(self, length: int):
        super().__init__()
        self.length, self.kernels, self.square = length, set(), {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket).replace("aten.", "")
        if "scaled_dot_product" in name or "softmax" in name:
            self.kernels.add(name)
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor) and o.dim() >= 2 and tuple(o.shape[-2:]) == (self.length, self.length):
                key = f"{name} {str(o.dtype).replace('torch.', '')} {o.numel() // self.length**2}xTxT"
                self.square[key] = self.square.get(key, 0) + 1
        return out


def _step(model, batch) -> None:
    from lorakit.ops.loss import causal_lm_loss

    causal_lm_loss(model, **batch).backward()


def probe(attn: str, kind: str, length: int = 256) -> dict:
    model = build(attn)
    with _Watch(length) as watch:
        _step(model, inputs(kind, 1, length))
    return {"kernels": sorted(watch.kernels), "TxT_tensors (op dtype size: count)": watch.square}


def one(attn: str, kind: str, length: int, batch: int) -> dict:
    from lorakit.train.memory import release_large_frees

    release_large_frees()  # freed tensors leave the resident set: the peak is what the step holds
    info = probe(attn, kind)
    model, data = build(attn), inputs(kind, batch, length)
    _step(model, inputs(kind, 1, 64))  # warm-up
    model.zero_grad(set_to_none=True)
    gc.collect()
    reset, before, load = _reset_peak(), _status("VmRSS"), os.getloadavg()[0]
    t0 = time.perf_counter()
    _step(model, data)
    seconds = time.perf_counter() - t0
    return {"attn": attn, "input": kind, "length": length, "batch": batch, **info,
            "peak_mb": round((_status("VmHWM") - before) / 2**20, 1), "step_s": round(seconds, 2),
            "load_start": round(load, 2), "peak_reset": reset, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}


def run(lengths=(2048, 8192), log=None) -> dict:
    out: dict = {"layers": LAYERS}
    for length in lengths:
        batch = 2 if length <= 2048 else 1
        for attn, kind in CASES:
            cmd = [sys.executable, "-m", "benchmarks.attention", "--one", attn, kind, str(length), str(batch)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=_env())
            row = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else \
                {"attn": attn, "input": kind, "length": length, "failed": proc.stderr.strip().splitlines()[-1:]}
            out[f"{length}_{attn}_{kind}"] = row
            if log:
                log(json.dumps(row))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="2048,8192")
    parser.add_argument("--one", nargs=4, metavar=("ATTN", "INPUT", "LENGTH", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], args.one[1], int(args.one[2]), int(args.one[3]))))
        return
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    result = {"machine": machine(), **run(tuple(int(x) for x in args.lengths.split(",")), log)}
    result["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
