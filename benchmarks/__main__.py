"""Run the benchmarks, print JSON, and append a summary row to benchmarks/RESULTS.md."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from . import inference, inject_meta, longctx, mixed, moe, train_step
from .common import machine

SUITES = {"train": train_step.run, "inference": inference.run, "inject": inject_meta.run, "mixed": mixed.run,
          "longctx": longctx.run, "moe": moe.run}
RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = (
    "| date | cores / threads | torch | load avg (start) | train step / floor (p=0, p=0.05) | PEFT same | "
    "peak mem / full FT (p=0, p=0.05) | PEFT same | prefill / base | decode / base | PEFT prefill, decode | "
    "merged prefill, decode / base | inject 70B lorakit / PEFT | mixed decode / base (8, 64 adapters) | PEFT same | "
    "long context 2 x 2048: lorakit peak, time / PEFT + GC | MoE train step / floor: lorakit, PEFT | "
    "MoE unmerged decode / base: lorakit, PEFT |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return "-"
        d = d[k]
    return d


def summary_row(m: dict, r: dict) -> str:
    t, i, j, x = r.get("train", {}), r.get("inference", {}), r.get("inject", {}), r.get("mixed", {})
    cells = [
        m["date"], f'{m["cpu_cores"]} / {m["torch_threads"]}', m["torch"], str(m["load_average"][0]),
        f'{_get(t, "dropout_0.0", "lorakit/floor")}, {_get(t, "dropout_0.05", "lorakit/floor")}',
        f'{_get(t, "dropout_0.0", "peft/floor")}, {_get(t, "dropout_0.05", "peft/floor")}',
        f'{_get(t, "dropout_0.0", "lorakit_mem/full")}, {_get(t, "dropout_0.05", "lorakit_mem/full")}',
        f'{_get(t, "dropout_0.0", "peft_mem/full")}, {_get(t, "dropout_0.05", "peft_mem/full")}',
        str(_get(i, "prefill", "lorakit/base")), str(_get(i, "decode", "lorakit/base")),
        f'{_get(i, "prefill", "peft/base")}, {_get(i, "decode", "peft/base")}',
        f'{_get(i, "merged_prefill", "lorakit/base")}, {_get(i, "merged_decode", "lorakit/base")}',
        str(_get(j, "llama2_70b", "lorakit/peft")),
        f'{_get(x, "8_adapters", "decode", "lorakit/base")}, {_get(x, "64_adapters", "decode", "lorakit/base")}',
        f'{_get(x, "8_adapters", "decode", "peft/base")}, {_get(x, "64_adapters", "decode", "peft/base")}',
        f'{_get(r.get("longctx", {}), "2048", "lorakit", "peak/peft_gc")}, {_get(r.get("longctx", {}), "2048", "lorakit", "time/peft_gc")}',
        f'{_get(r.get("moe", {}), "train", "lorakit/floor")}, {_get(r.get("moe", {}), "train", "peft/floor")}',
        f'{_get(r.get("moe", {}), "decode", "lorakit/base")}, {_get(r.get("moe", {}), "decode", "peft/base")}',
    ]
    return "| " + " | ".join(cells) + " |\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", default=",".join(SUITES), help=f"comma-separated subset of {list(SUITES)}")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    m = machine()
    results: dict = {"machine": m}
    for name in args.only.split(","):
        t0 = time.perf_counter()
        results[name] = SUITES[name]()
        results[name]["wall_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps({name: results[name]}), flush=True)
    results["machine"]["load_average_end"] = [round(x, 2) for x in __import__("os").getloadavg()]
    print(json.dumps(results, indent=2))
    if not args.no_record:
        if not RESULTS.exists():
            RESULTS.write_text("# Benchmark results\n\nOne row per `make bench` run; ratios are medians of paired per-round ratios "
                               "(see benchmarks/*.py for what each measures). Full JSON is printed by the run.\n\n" + HEADER)
        with RESULTS.open("a") as f:
            f.write(summary_row(m, results))


if __name__ == "__main__":
    main()
