"""Benchmark: LoRA on mixture-of-experts expert weights (issue 17), lorakit against PEFT's `target_parameters`.

Model: a Mixtral-shaped causal LM with random weights (timing does not depend on the values): hidden
512, 8 layers, 8 heads / 2 KV heads, 8 experts of intermediate size 1024, top-2 routing, vocabulary
32,000, float32, transformers' default experts implementation (`grouped_mm`).
Adapters: r=16, alpha=32, dropout 0 on q/k/v/o and on both expert weights of every layer
(`target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]`, one pair per expert).

- train: one step (forward + backward + AdamW) on 2 x 256 tokens for `floor` (the frozen base,
  forward + backward to the input embeddings: the physical limit of a LoRA step), `peft` and
  `lorakit`. Time: the three run interleaved in one process for `rounds` rounds, ratios are medians
  of per-round ratios. Memory: each in a fresh process (`python -m benchmarks.moe --one KIND`): the
  process's `VmHWM` above its RSS just before a step (reset through `/proc/self/clear_refs`; freed
  blocks >= 1 MiB go back to the system in every configuration, `release_large_frees`), with the
  adapters' own share (parameters, gradients, AdamW's two moments) and the expert inputs the
  LoRA terms keep for backward computed from the shapes.
- decode: one token with a KV cache of 128 tokens (cropped back after each call), eval mode, no
  grad, for the base, lorakit unmerged and PEFT unmerged (B random, so the adapters are not zero).

    python -m benchmarks.moe              # prints JSON (one torch thread; --threads 0 for torch's default)
    python -m benchmarks --only moe       # part of `make bench`
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import subprocess
import sys

import torch

from .common import machine, medians, paired, ratio

MIXTRAL_SMALL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                     num_attention_heads=8, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                     max_position_embeddings=1024)
R, BATCH, LENGTH, CACHE = 16, 2, 256, 128
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
KINDS = ("floor", "peft", "lorakit")


def build_base(seed: int = 0):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(**MIXTRAL_SMALL)
    config._attn_implementation = "sdpa"
    return MixtralForCausalLM(config)


def adapt(model, kind: str):
    """`model` with `kind`'s adapters (r=16 on attention and both expert weights); the floor: none."""
    if kind == "lorakit":
        import lorakit as lk

        lk.inject(model, lk.LoraConfig(r=R, alpha=2 * R, target_modules=ATTENTION, target_parameters=EXPERTS))
    elif kind == "peft":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=2 * R, target_modules=ATTENTION,
                                                           target_parameters=EXPERTS))
    else:
        model.requires_grad_(False)
    return model


def make_step(kind: str, seed: int = 0):
    """A zero-argument training step of `kind` and the model it trains."""
    model = adapt(build_base(seed), kind)
    model.train()
    ids = torch.randint(0, MIXTRAL_SMALL["vocab_size"], (BATCH, LENGTH), generator=torch.Generator().manual_seed(1))
    if kind == "floor":
        embed = model.get_input_embeddings()

        def step():
            x = embed(ids).detach().requires_grad_(True)
            model(inputs_embeds=x, labels=ids).loss.backward()

        return step, model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, model


def _status(field: str, path: str = "/proc/self/status") -> int:
    with open(path) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def one(kind: str) -> dict:
    """Peak memory of one step of `kind` above the RSS before it, in this (fresh) process."""
    from lorakit.train.memory import release_large_frees

    release_large_frees()
    step, model = make_step(kind)
    step()  # warm-up: kernel set-up, AdamW's state
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    before = _status("VmRSS")
    step()
    peak = _status("VmHWM") - before
    return {"kind": kind, "peak_above_start_mb": round(peak / 2**20, 1), "rss_before_mb": round(before / 2**20, 1),
            "peak_reset": reset, **adapter_budget(model, kind)}


def adapter_budget(model, kind: str) -> dict:
    """What the adapters may add to the floor's peak: their parameters, gradients and AdamW's two moments
    (16 bytes per float32 parameter), and the expert inputs kept for dL/dA (float32 rows of the routed
    `(token, expert)` pairs: hidden for gate_up_proj, intermediate for down_proj, per layer)."""
    if kind == "floor":
        return {}
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rows = BATCH * LENGTH * MIXTRAL_SMALL["num_experts_per_tok"]
    kept = rows * (MIXTRAL_SMALL["hidden_size"] + MIXTRAL_SMALL["intermediate_size"]) * 4 \
        * MIXTRAL_SMALL["num_hidden_layers"]
    return {"adapter_params": params, "adapter_state_mb": round(16 * params / 2**20, 1),
            "kept_expert_inputs_mb": round(kept / 2**20, 1)}


def _fresh(kind: str, threads: int | None) -> dict:
    argv = [sys.executable, "-m", "benchmarks.moe", "--one", kind] + (["--threads", str(threads)] if threads else [])
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"kind": kind, "failed": proc.stderr.strip().splitlines()[-3:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _randomize_b(model, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)


def _decoder(model, ids):
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    nxt = ids[:, -1:]

    def decode():
        with torch.no_grad():
            model(nxt, past_key_values=cache, use_cache=True)
        cache.crop(-1)

    return decode


def decode(rounds: int) -> dict:
    base = build_base().eval()
    ours = adapt(copy.deepcopy(base), "lorakit").eval()
    theirs = adapt(copy.deepcopy(base), "peft").eval()
    _randomize_b(ours)
    _randomize_b(theirs)
    ids = torch.randint(0, MIXTRAL_SMALL["vocab_size"], (1, CACHE), generator=torch.Generator().manual_seed(1))
    times = paired({"base": _decoder(base, ids), "lorakit": _decoder(ours, ids), "peft": _decoder(theirs, ids)},
                   4 * rounds, inner=5)  # many short rounds: a load change hits the three alike
    return {"kv_cache": CACHE, "seconds": medians(times), "lorakit/base": ratio(times, "lorakit", "base"),
            "peft/base": ratio(times, "peft", "base")}


def train(rounds: int) -> dict:
    steps = {kind: make_step(kind)[0] for kind in KINDS}
    times = paired(steps, rounds)
    return {"batch": [BATCH, LENGTH], "seconds": medians(times), "lorakit/floor": ratio(times, "lorakit", "floor"),
            "peft/floor": ratio(times, "peft", "floor"), "lorakit/peft": ratio(times, "lorakit", "peft")}


def run(rounds: int = 9, memory: bool = True, threads: int | None = 1) -> dict:
    """Every measurement; `threads`: torch's intra-op threads while timing (default 1: on a shared 2-core
    machine, OpenMP's spin-waiting under another process's load made 2-thread steps 2-5x slower and the
    ratios meaningless; None keeps torch's default)."""
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    out: dict = {"model": MIXTRAL_SMALL, "r": R, "targets": {"modules": ATTENTION, "parameters": EXPERTS},
                 "torch_threads": torch.get_num_threads(), "load_average_start": [round(x, 2) for x in os.getloadavg()]}
    try:
        out["train"] = train(rounds)
        gc.collect()
        out["decode"] = decode(rounds)
        gc.collect()
    finally:
        torch.set_num_threads(saved)
    if memory:
        mem = {kind: _fresh(kind, threads) for kind in KINDS}
        floor = mem["floor"].get("peak_above_start_mb")
        for kind in ("peft", "lorakit"):
            row = mem[kind]
            if floor is not None and "peak_above_start_mb" in row:
                row["above_floor_mb"] = round(row["peak_above_start_mb"] - floor, 1)
                row["budget_mb"] = round(row["adapter_state_mb"] + row["kept_expert_inputs_mb"], 1)
        out["memory"] = mem
    out["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    out["ratios"] = {f"{phase} {name}": out[phase][name] for phase, names in
                     (("train", ("lorakit/floor", "peft/floor")), ("decode", ("lorakit/base", "peft/base")))
                     for name in names}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", choices=KINDS, help="(internal) one configuration's peak memory, in this process")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads while timing (0: torch's default)")
    args = parser.parse_args()
    if args.one:
        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(one(args.one)))
        return
    print(json.dumps({"machine": machine(), **run(args.rounds, not args.no_memory, args.threads or None)}, indent=2))


if __name__ == "__main__":
    main()

