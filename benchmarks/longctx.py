"""Benchmark: the memory wall (issue 16). One long-context LoRA training step, fresh process each.

Configurations (SmolLM2-135M architecture, random weights, float32, LoRA r=16 alpha=32 on the 7
projections, sdpa attention, labels = inputs, no padding):
- `peft`: PEFT defaults, `model(input_ids, labels=...).loss` (full logits);
- `peft_gc`: the same plus `gradient_checkpointing_enable(use_reentrant=False)` (what a PEFT +
  Trainer user turns on): the reference of the ratios;
- `lorakit_plain`: `lorakit.inject`, plain loss, no checkpointing (the training job before issue 16);
- `lorakit_nogc`: `inject` + the chunked loss (`lorakit.ops.loss.causal_lm_loss`), no checkpointing;
- `lorakit`: `inject` + per-layer checkpointing (`lorakit.train.memory.enable_checkpointing`) +
  the chunked loss: what `lorakit train` runs from 2,048 tokens per micro-batch (its `TaskLoss`
  calls `causal_lm_loss`; `gradient_checkpointing: auto` switches checkpointing on there);
- `lorakit_keepattn`: the same with selective checkpointing that keeps the attention outputs;
- `peft_gc_mmap`: `peft_gc` with the allocator setting the lorakit configurations use.

Every `lorakit*` configuration starts with `lorakit.train.memory.release_large_frees()` (glibc
serves tensors >= 1 MiB with mmap, so freed activations leave the resident set; the training
job does the same on the CPU); `peft` and `peft_gc` run with glibc's defaults, as a PEFT user's do.

One step = forward + backward + AdamW. Peak = the process's `VmHWM` minus its RSS just before the
step (the high-water mark is reset there through `/proc/self/clear_refs` where the kernel allows);
on CUDA the allocator's peak minus what was allocated before. Each configuration runs in its own
process (`python -m benchmarks.longctx --one CONFIG LENGTH BATCH`); a configuration whose
estimated peak exceeds the memory available is skipped and reported as such.

    python -m benchmarks.longctx                      # 512 and 2048 tokens
    python -m benchmarks.longctx --lengths 512,2048,8192
    python -m benchmarks.longctx --sweep              # checkpointing on/off vs length (the auto threshold)
    python -m benchmarks.longctx --device cuda        # allocator peaks, bf16 autocast
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Sequence

import torch

from .common import ALL_LINEAR, SMOLLM2_135M, machine

CONFIGS = ("peft", "peft_gc", "peft_gc_mmap", "lorakit_plain", "lorakit_nogc", "lorakit", "lorakit_keepattn")
DEFAULT_CONFIGS = ("peft", "peft_gc", "lorakit_plain", "lorakit_nogc", "lorakit")  # what issue 16's targets compare
BATCH = {512: 2, 2048: 2, 8192: 1}
R = 16
# rough peak per token (MB, float32, measured on the CPU at 2 x 2048) to skip what cannot fit
MB_PER_TOKEN = {"peft": 3.0, "peft_gc": 1.6, "peft_gc_mmap": 1.6, "lorakit_plain": 2.5, "lorakit_nogc": 1.8,
                "lorakit": 0.5, "lorakit_keepattn": 0.5}
BASE_MB = 1500  # weights, optimizer state, allocator slack


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def build(config: str, device: str):
    """`(model, optimizer, loss_fn)` for `config` on the SmolLM2-135M architecture."""
    from .common import build_model

    if _uses_mmap(config):
        from lorakit.train.memory import release_large_frees

        release_large_frees()
    model = build_model(dict(SMOLLM2_135M, max_position_embeddings=8192), device=device)
    model.train()
    if config.startswith("peft"):
        import peft

        if config.startswith("peft_gc"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=2 * R, target_modules=ALL_LINEAR))
    else:
        import lorakit as lk
        from lorakit.train.memory import enable_checkpointing

        lk.inject(model, lk.LoraConfig(r=R, alpha=2 * R, target_modules="all-linear"))
        if config in ("lorakit", "lorakit_keepattn"):
            enable_checkpointing(model, keep_attention=config == "lorakit_keepattn")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if config.startswith("peft") or config == "lorakit_plain":
        return model, opt, lambda m, ids: m(input_ids=ids, labels=ids).loss
    from lorakit.ops.loss import causal_lm_loss

    return model, opt, lambda m, ids: causal_lm_loss(m, ids, ids)


def one(config: str, length: int, batch: int, device: str) -> dict:
    """Run one step of `config` in this process; returns peak and time."""
    model, opt, loss_fn = build(config, device)
    ids = torch.randint(0, SMOLLM2_135M["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(1)).to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    with autocast:  # warm-up on 32 tokens: kernel set-up and AdamW's state stay out of the measured step
        loss_fn(model, ids[:1, :32]).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        reset = _reset_peak()
        before = _status("VmRSS")
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    with autocast:
        loss = loss_fn(model, ids)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - before if device == "cuda" else _status("VmHWM") - before
    out = {"config": config, "length": length, "batch": batch, "peak_mb": round(peak / 2**20, 1),
           "step_s": round(seconds, 2), "loss": round(float(loss.detach()), 4), "load_start": round(load, 2),
           "load_end": round(os.getloadavg()[0], 2), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    if device != "cuda":
        out["rss_before_mb"] = round(before / 2**20, 1)
        out["peak_reset"] = reset
    return out


def _available_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0] / 2**20
    return _status_meminfo("MemAvailable") / 2**20


def _status_meminfo(field: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _fresh(config: str, length: int, batch: int, device: str) -> dict:
    need = BASE_MB + MB_PER_TOKEN[config] * batch * length * (0.5 if device == "cuda" else 1.0)
    have = _available_mb(device)
    if need > 0.9 * have:
        return {"config": config, "length": length, "batch": batch, "skipped": f"needs ~{need:.0f} MB, {have:.0f} MB available"}
    cmd = [sys.executable, "-m", "benchmarks.longctx", "--one", config, str(length), str(batch), "--device", device]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    if proc.returncode != 0:
        return {"config": config, "length": length, "batch": batch, "failed": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _env() -> dict:
    """With another CPU-heavy process about (load >= half the cores), OpenMP's spin-waiting slows
    steps 2-5x (DATA.md): the child runs with OMP_WAIT_POLICY=PASSIVE, recorded in its row."""
    env = dict(os.environ)
    if "OMP_WAIT_POLICY" not in env and os.getloadavg()[0] >= max(1, (os.cpu_count() or 1) / 2):
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


def _ratios(rows: dict, ref: str = "peft_gc") -> None:
    base = rows.get(ref, {})
    for row in rows.values():
        if "peak_mb" in row and "peak_mb" in base:
            row["peak/peft_gc"] = round(row["peak_mb"] / base["peak_mb"], 3)
            row["time/peft_gc"] = round(row["step_s"] / base["step_s"], 3)


def run(lengths=(512, 2048), configs=DEFAULT_CONFIGS, device: str = "cpu", log=None) -> dict:
    """Every configuration at every length, each in a fresh process; ratios to `peft_gc`."""
    results: dict = {"device": device, "r": R, "configs": list(configs)}
    for length in lengths:
        rows = {}
        for config in configs:
            rows[config] = _fresh(config, length, BATCH.get(length, 1), device)
            if log:
                log(json.dumps(rows[config]))
        _ratios(rows)
        if "lorakit" in rows and "step_s" in rows["lorakit"] and "step_s" in rows.get("lorakit_plain", {}):
            rows["lorakit"]["time/lorakit_plain"] = round(rows["lorakit"]["step_s"] / rows["lorakit_plain"]["step_s"], 3)
        results[str(length)] = rows
    return results


def sweep(lengths=(256, 512, 1024, 2048, 4096), device: str = "cpu", log=None) -> dict:
    """Checkpointing on (`lorakit`) vs off (`lorakit_nogc`) at batch 1: where `auto` should switch
    (peak memory; for time ratios use `paired`, fresh processes drift with the machine's load)."""
    out = {}
    for length in lengths:
        rows = {c: _fresh(c, length, 1, device) for c in ("lorakit_nogc", "lorakit")}
        if log:
            log(json.dumps(rows))
        off = rows["lorakit_nogc"]
        for row in rows.values():
            if "peak_mb" in row and "peak_mb" in off:
                row["peak/off"] = round(row["peak_mb"] / off["peak_mb"], 3)
                row["time/off"] = round(row["step_s"] / off["step_s"], 3)
        out[str(length)] = rows
    return out


def _uses_mmap(config: str) -> bool:
    return config.startswith("lorakit") or config.endswith("_mmap")


def paired(configs: Sequence[str], length: int, batch: int, rounds: int = 3, device: str = "cpu") -> dict:
    """Step times of `configs` in one process, interleaved for `rounds` rounds (A B C A B C ...):
    median per-round ratios to the first configuration, robust to the machine's load drifting
    between the fresh processes of `run`. Memory is not measured here. The allocator setting is
    switched per configuration (glibc's threshold 1 MiB for lorakit's, 32 MiB -- where glibc's
    dynamic threshold ends up -- for PEFT's)."""
    from lorakit.train.memory import release_large_frees

    built = {c: build(c, device) for c in configs}
    ids = torch.randint(0, SMOLLM2_135M["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(1)).to(device)
    times: dict[str, list[float]] = {c: [] for c in configs}
    for r in range(rounds + 1):  # round 0 warms up on 32 tokens
        for c, (model, opt, loss_fn) in built.items():
            release_large_frees(1 << 20 if _uses_mmap(c) else 32 << 20)
            t0 = time.perf_counter()
            loss_fn(model, ids if r else ids[:1, :32]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if r:
                times[c].append(time.perf_counter() - t0)
                print(json.dumps({"round": r, "config": c, "step_s": round(times[c][-1], 2),
                                  "load": round(os.getloadavg()[0], 2)}), file=sys.stderr, flush=True)
    ref = configs[0]
    return {"length": length, "batch": batch, "rounds": rounds, "load_end": round(os.getloadavg()[0], 2),
            "seconds": {c: [round(t, 2) for t in v] for c, v in times.items()},
            f"time/{ref}": {c: round(statistics.median(a / b for a, b in zip(v, times[ref])), 3) for c, v in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="512,2048")
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help=f"comma-separated subset of {CONFIGS}")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sweep", action="store_true", help="checkpointing on/off vs length, batch 1")
    parser.add_argument("--paired", metavar="CONFIGS", help="time ratios in one process, interleaved, e.g. lorakit_nogc,lorakit")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--one", nargs=3, metavar=("CONFIG", "LENGTH", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), int(args.one[2]), args.device)))
        return
    lengths = tuple(int(x) for x in args.lengths.split(","))
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    result = {"machine": machine()}
    if args.paired:
        for length in lengths:
            result[f"paired_{length}"] = paired(args.paired.split(","), length, BATCH.get(length, 1), args.rounds, args.device)
            log(json.dumps(result[f"paired_{length}"]))
    elif args.sweep:
        result["sweep"] = sweep(device=args.device, log=log) if args.lengths == "512,2048" else sweep(lengths, args.device, log)
    else:
        result.update(run(lengths, args.configs.split(","), args.device, log))
    result["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
