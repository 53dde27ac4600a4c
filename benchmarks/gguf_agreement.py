"""Held-out sentiment predictions of a saved adapter: lorakit against llama.cpp running the GGUF files.

    python -m benchmarks.gguf_agreement runs/demo/adapter [--n 100]

Takes the adapter's recipe (`lorakit_train.json`, e.g. `make demo`'s), the first N examples of its
held-out test split, and scores each the way `lorakit eval` does (the label words' next-token
log-likelihood after the prompt; argmax). Forms:

- `lorakit`: the adapter on the float32 model converted from the base GGUF (the reference);
- `llama.cpp adapter`: the base GGUF file (SmolLM2: Q4_1) plus the adapter exported with
  `export_gguf_adapter`, run by llama.cpp (llama-cpp-python);
- `llama.cpp merged <type>`: the merged model exported with `export_gguf_merged`, run alone;
- `lorakit base` / `llama.cpp base`: the base model without the adapter (zero-shot), for scale.

Prints JSON: per form the accuracy, the number of predictions that differ from lorakit's, and the
max / mean |difference| of the two answer logits against lorakit's (the same form's base for the
base rows). About 2 minutes on 2 CPU cores. Needs llama-cpp-python (`make llama-cpp`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def answer_logits(logits_at_last, answers):
    return np.array([row[answers] for row in logits_at_last], dtype=np.float64)


def summary(scores: np.ndarray, reference: np.ndarray, gold: list[int]) -> dict:
    pred, ref_pred = scores.argmax(1), reference.argmax(1)
    diff = np.abs(scores - reference)
    return {"accuracy": float(np.mean(pred == np.array(gold))), "differ_from_reference": int((pred != ref_pred).sum()),
            "answer_logit_max_abs_diff": float(diff.max()), "answer_logit_mean_abs_diff": float(diff.mean())}


def main(argv=None) -> dict:
    import lorakit as lk
    from lorakit.export import export_gguf_adapter, export_gguf_merged
    from lorakit.train.prepare import Prepared
    from lorakit.train.saved import recipe_for_adapter
    from lorakit.train.models import resolve_model
    from lorakit.verify.llamacpp import LlamaCpp

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("adapter", help="adapter folder written by lorakit train")
    ap.add_argument("--n", type=int, default=100, help="held-out test examples (the first N of the recipe's test split)")
    ap.add_argument("--merged", default="f16,q8_0", help="merged GGUF types to run (comma-separated; empty: none)")
    args = ap.parse_args(argv)
    start = time.time()
    recipe, _ = recipe_for_adapter(args.adapter, None, {})
    prep = Prepared(recipe, lambda msg: None)
    task, model = prep.task, prep.model
    examples = prep.splits.test[: args.n]
    gold = [task.index[e["label"]] for e in examples]
    prompts = [task.prompt_ids(e["text"]) for e in examples]
    answers = [a[0] for a in task.answer_ids]
    source = resolve_model(recipe.model)
    if not source.gguf:
        raise SystemExit(f"{recipe.model} is not a GGUF model")

    def torch_scores():
        with torch.no_grad():
            return answer_logits([model(torch.tensor([p])).logits[0, -1].numpy() for p in prompts], answers)

    def cpp_scores(path, lora=None):
        with LlamaCpp(path, lora) as llm:
            return answer_logits([llm.logits(p)[-1] for p in prompts], answers)

    base_lk = torch_scores()
    lk.load_adapter(model, args.adapter, trainable=False)
    ref = torch_scores()
    out = {"adapter": str(args.adapter), "n": len(examples), "base_gguf": str(source.path), "forms": {}}
    forms = out["forms"]
    forms["lorakit"] = summary(ref, ref, gold)
    forms["lorakit base"] = summary(base_lk, base_lk, gold)
    with tempfile.TemporaryDirectory() as tmp:
        adapter_file = Path(tmp) / "adapter.gguf"
        export_gguf_adapter(args.adapter, adapter_file, base_gguf=source.path)
        forms["llama.cpp base"] = summary(cpp_scores(source.path), base_lk, gold)
        forms["llama.cpp adapter"] = summary(cpp_scores(source.path, adapter_file), ref, gold)
        for outtype in [t for t in args.merged.split(",") if t]:
            merged = Path(tmp) / f"merged-{outtype}.gguf"
            export_gguf_merged(model, merged, source_gguf=source.path, outtype=outtype)
            forms[f"llama.cpp merged {outtype}"] = summary(cpp_scores(merged), ref, gold)
    out["seconds"] = round(time.time() - start, 1)
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
