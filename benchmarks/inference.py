"""Benchmarks 2 and 3: inference with unmerged and merged adapters vs the base model, and merge time.

SmolLM2-135M architecture, LoRA r=16 on all linear layers, eval mode, no grad.
- prefill: one forward of 1 x 128 tokens;
- decode: one forward of 1 token with a KV cache of 128 tokens (the cache is cropped
  back after each call, so every call sees the same state).
Contenders: the base model, lorakit unmerged, PEFT unmerged; then lorakit merged,
PEFT merged. Also `merge_and_unload` time, lorakit vs PEFT.
"""

from __future__ import annotations

import copy
import json
import time

import torch

from .common import ALL_LINEAR, build_model, medians, paired, ratio

R, LENGTH = 16, 128


def _randomize(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)


def _callers(model, ids):
    """(prefill, decode) zero-argument functions for `model`."""
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    nxt = ids[:, -1:]

    def prefill():
        with torch.no_grad():
            model(ids, use_cache=False)

    def decode():
        with torch.no_grad():
            model(nxt, past_key_values=cache, use_cache=True)
        cache.crop(-1)

    return prefill, decode


def run(rounds: int = 7) -> dict:
    import lorakit as lk
    import peft

    base = build_model().eval()
    ours = copy.deepcopy(base)
    lk.inject(ours, lk.LoraConfig(r=R, alpha=2 * R, target_modules="all-linear"))
    _randomize(ours)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=R, lora_alpha=2 * R, target_modules=ALL_LINEAR)).eval()
    _randomize(theirs)
    ids = torch.randint(0, base.config.vocab_size, (1, LENGTH), generator=torch.Generator().manual_seed(1))
    calls = {"base": _callers(base, ids), "lorakit": _callers(ours, ids), "peft": _callers(theirs, ids)}

    out: dict = {"r": R, "targets": "all-linear", "prefill_tokens": LENGTH, "kv_cache": LENGTH}
    for phase, index, inner in (("prefill", 0, 3), ("decode", 1, 20)):
        times = paired({k: v[index] for k, v in calls.items()}, rounds, inner=inner)
        out[phase] = {"seconds": medians(times), "lorakit/base": ratio(times, "lorakit", "base"),
                      "peft/base": ratio(times, "peft", "base")}

    lk.merge(ours)
    theirs.merge_adapter()
    calls = {"base": _callers(base, ids), "lorakit_merged": _callers(ours, ids), "peft_merged": _callers(theirs, ids)}
    for phase, index, inner in (("prefill", 0, 3), ("decode", 1, 20)):
        times = paired({k: v[index] for k, v in calls.items()}, rounds, inner=inner)
        out[f"merged_{phase}"] = {"seconds": medians(times), "lorakit/base": ratio(times, "lorakit_merged", "base"),
                                  "peft/base": ratio(times, "peft_merged", "base")}
    lk.unmerge(ours)
    theirs.unmerge_adapter()

    ours_t, theirs_t = [], []
    for _ in range(3):
        a, b = copy.deepcopy(ours), copy.deepcopy(theirs)
        t0 = time.perf_counter()
        lk.merge_and_unload(a)
        ours_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        b.merge_and_unload()
        theirs_t.append(time.perf_counter() - t0)
        del a, b
    out["merge_and_unload_seconds"] = {"lorakit": round(sorted(ours_t)[1], 4), "peft": round(sorted(theirs_t)[1], 4),
                                       "lorakit/peft": round(sorted(x / y for x, y in zip(ours_t, theirs_t))[1], 3)}
    return out


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
