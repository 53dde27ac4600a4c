"""Benchmark 4: `inject` time on Llama-2-7B and Llama-2-70B configs built on the meta device.

LoRA r=16 on all seven linear projections of every layer; no weights are allocated
(meta device), so this measures target selection and module replacement alone.
"""

from __future__ import annotations

import json
import statistics
import time

from .common import ALL_LINEAR, LLAMA2_7B, LLAMA2_70B, build_model


def _time_inject(kind: str, arch: dict) -> float:
    model = build_model(arch, device="meta")
    t0 = time.perf_counter()
    if kind == "lorakit":
        import lorakit as lk

        lk.inject(model, lk.LoraConfig(r=16, alpha=32, target_modules=ALL_LINEAR))
    else:
        import peft

        peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=ALL_LINEAR))
    return time.perf_counter() - t0


def run(rounds: int = 3) -> dict:
    out = {}
    for name, arch in (("llama2_7b", LLAMA2_7B), ("llama2_70b", LLAMA2_70B)):
        _time_inject("lorakit", arch), _time_inject("peft", arch)  # warm-up (imports)
        ours, theirs = [], []
        for _ in range(rounds):
            ours.append(_time_inject("lorakit", arch))
            theirs.append(_time_inject("peft", arch))
        out[name] = {"lorakit_s": round(statistics.median(ours), 4), "peft_s": round(statistics.median(theirs), 4),
                     "lorakit/peft": round(statistics.median(a / b for a, b in zip(ours, theirs)), 3)}
    return out


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
