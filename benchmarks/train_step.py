"""Benchmark 1: one training step (forward + backward + AdamW), LoRA r=16 on all linear layers.

Contenders, on the SmolLM2-135M architecture with batch 8 x 128 tokens:
- `floor`: the frozen base, forward + backward to the input embeddings (no adapter):
  the physical limit for a LoRA step;
- `lorakit` and `peft`: LoRA r=16, alpha=32 on all linear layers, dropout 0 or 0.05;
- `full`: full fine-tuning step.
Time: paired rounds in one process. Peak memory: each contender in a fresh process
(`python -m benchmarks.train_step --memory KIND DROPOUT`), peak RSS after two steps.
"""

from __future__ import annotations

import argparse
import json

import torch

from .common import ALL_LINEAR, build_model, paired, peak_rss_mb, peak_rss_subprocess, ratio, medians

BATCH, LENGTH, R = 8, 128, 16


def make_step(kind: str, dropout: float, seed: int = 0):
    """A zero-argument function running one training step of `kind`."""
    model = build_model(seed=seed)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (BATCH, LENGTH), generator=torch.Generator().manual_seed(1))
    if kind == "floor":
        model.requires_grad_(False)
        embed = model.get_input_embeddings()

        def step():
            x = embed(ids).detach().requires_grad_(True)
            model(inputs_embeds=x, labels=ids).loss.backward()

        return step
    if kind == "lorakit":
        import lorakit as lk

        lk.inject(model, lk.LoraConfig(r=R, alpha=2 * R, dropout=dropout, target_modules="all-linear"))
    elif kind == "peft":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=2 * R, lora_dropout=dropout, target_modules=ALL_LINEAR))
    elif kind != "full":
        raise ValueError(kind)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def run(rounds: int = 5, memory: bool = True) -> dict:
    results: dict = {"batch": [BATCH, LENGTH], "r": R, "targets": "all-linear"}
    steps = {"floor": make_step("floor", 0.0), "full": make_step("full", 0.0)}
    for p in (0.0, 0.05):
        steps[f"lorakit_p{p}"] = make_step("lorakit", p)
        steps[f"peft_p{p}"] = make_step("peft", p)
    times = paired(steps, rounds)
    results["seconds"] = medians(times)
    for p in (0.0, 0.05):
        results[f"dropout_{p}"] = {
            "lorakit/floor": ratio(times, f"lorakit_p{p}", "floor"),
            "peft/floor": ratio(times, f"peft_p{p}", "floor"),
            "lorakit/peft": ratio(times, f"lorakit_p{p}", f"peft_p{p}"),
        }
    results["full/floor"] = ratio(times, "full", "floor")
    del steps
    if memory:
        mem = {}
        for kind, p in (("floor", 0.0), ("full", 0.0), ("lorakit", 0.0), ("peft", 0.0), ("lorakit", 0.05), ("peft", 0.05)):
            mem[f"{kind}_p{p}"] = peak_rss_subprocess("train_step", "--memory", kind, str(p))["peak_rss_mb"]
        results["peak_rss_mb"] = mem
        for p in (0.0, 0.05):
            results[f"dropout_{p}"]["lorakit_mem/full"] = round(mem[f"lorakit_p{p}"] / mem["full_p0.0"], 3)
            results[f"dropout_{p}"]["peft_mem/full"] = round(mem[f"peft_p{p}"] / mem["full_p0.0"], 3)
        results["floor_mem/full"] = round(mem["floor_p0.0"] / mem["full_p0.0"], 3)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--memory", nargs=2, metavar=("KIND", "DROPOUT"))
    args = parser.parse_args()
    if args.memory:
        step = make_step(args.memory[0], float(args.memory[1]))
        step()
        step()
        print(json.dumps({"peak_rss_mb": round(peak_rss_mb(), 1)}))
    else:
        print(json.dumps(run(), indent=2))
