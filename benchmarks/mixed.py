"""Benchmark 5: mixed-adapter batches (one adapter per row) vs the base model and vs PEFT.

SmolLM2-135M architecture, LoRA r=16 on q/k/v/o, 8 or 64 adapters, rows assigned
round-robin. Forward: 16 x 64 tokens. Decode: 16 x 1 token with a KV cache of 64.
lorakit: `with lk.mixed_batch(model, names)` held open around the timed calls, as one
would around `generate` (the one-off cost of entering it, which stacks the adapters,
is reported separately as `mixed_batch_entry_s`); PEFT: `model(..., adapter_names=names)`.
"""

from __future__ import annotations

import copy
import json
import time

import torch

from .common import build_model, medians, paired, ratio

R, BATCH, LENGTH = 16, 16, 64
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _fill(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)


def run(rounds: int = 5, counts=(8, 64)) -> dict:
    import lorakit as lk
    import peft

    base = build_model().eval()
    ids = torch.randint(0, base.config.vocab_size, (BATCH, LENGTH), generator=torch.Generator().manual_seed(1))
    out: dict = {"r": R, "targets": TARGETS, "batch": BATCH, "length": LENGTH}
    for n in counts:
        names = [f"a{i}" for i in range(n)]
        rows = [names[i % n] for i in range(BATCH)]
        ours = copy.deepcopy(base)
        for name in names:
            lk.inject(ours, lk.LoraConfig(r=R, alpha=2 * R, target_modules=TARGETS), adapter=name)
        _fill(ours, 1)
        cfg = peft.LoraConfig(r=R, lora_alpha=2 * R, target_modules=TARGETS)
        theirs = peft.get_peft_model(copy.deepcopy(base), cfg, adapter_name=names[0])
        for name in names[1:]:
            theirs.add_adapter(name, cfg)
        theirs.eval()
        _fill(theirs, 1)

        caches = {}
        with torch.no_grad():
            caches["base"] = base(ids, use_cache=True).past_key_values
            with lk.mixed_batch(ours, rows):
                caches["lorakit"] = ours(ids, use_cache=True).past_key_values
            caches["peft"] = theirs(input_ids=ids, use_cache=True, adapter_names=rows).past_key_values
        nxt = ids[:, -1:]

        def fwd_base():
            with torch.no_grad():
                base(ids, use_cache=False)

        def fwd_ours():
            with torch.no_grad():
                ours(ids, use_cache=False)

        def fwd_theirs():
            with torch.no_grad():
                theirs(input_ids=ids, use_cache=False, adapter_names=rows)

        def dec(kind):
            def call():
                with torch.no_grad():
                    if kind == "base":
                        base(nxt, past_key_values=caches["base"], use_cache=True)
                    elif kind == "lorakit":
                        ours(nxt, past_key_values=caches["lorakit"], use_cache=True)
                    else:
                        theirs(input_ids=nxt, past_key_values=caches["peft"], use_cache=True, adapter_names=rows)
                caches[kind].crop(-1)

            return call

        res = {}
        t0 = time.perf_counter()
        with lk.mixed_batch(ours, rows):
            res["mixed_batch_entry_s"] = round(time.perf_counter() - t0, 4)
            times = paired({"base": fwd_base, "lorakit": fwd_ours, "peft": fwd_theirs}, rounds)
            res["forward"] = {"seconds": medians(times), "lorakit/base": ratio(times, "lorakit", "base"), "peft/base": ratio(times, "peft", "base")}
            times = paired({k: dec(k) for k in ("base", "lorakit", "peft")}, rounds, inner=10)
            res["decode"] = {"seconds": medians(times), "lorakit/base": ratio(times, "lorakit", "base"), "peft/base": ratio(times, "peft", "base")}
        out[f"{n}_adapters"] = res
    return out


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
