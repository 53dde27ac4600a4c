"""How far the 4-bit model is from the original, with and without a low-rank correction of the NF4 error.

    python -m benchmarks.nf4_error [--rank 8] [--calibration 128] [--heldout 64]

On the default recipe's model and data (SmolLM2-135M, rotten-tomatoes prompts), every linear
layer but the head in NF4 (double quantization). Prints, as JSON, the mean per-token KL
divergence of the next-token distribution to the original model's, on held-out *training*
examples (not the calibration ones, never the test split), and the zero-shot test accuracy, for:

- `nf4`: the plain QLoRA base;
- `nf4+svd`: plus the rank-k truncated SVD of the weight error `W - dequant(Q)` (one LoftQ step,
  arXiv:2310.08659);
- `nf4+qera`: plus the rank-k correction that minimises the layers' output error on the
  calibration examples (`lorakit.quant.qera`, arXiv:2410.06040).

The corrections are applied as float32 weights `dequant(Q) + C` in plain `nn.Linear` layers
(the same function as the 4-bit layer plus a pinned adapter, to float rounding). About 4 minutes
on 2 CPU cores. Not part of `make bench`: it measures accuracy, not speed.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main(argv=None) -> dict:
    from lorakit.ops.nf4 import dequantize_weight, quantize_weight
    from lorakit.quant import select_linear_layers
    from lorakit.quant.qera import error_corrections
    from lorakit.train.job import Prepared
    from lorakit.train.recipe import load_recipe

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--calibration", type=int, default=128, help="training examples that calibrate the qera correction")
    ap.add_argument("--heldout", type=int, default=64, help="training examples (after the calibration ones) for the KL")
    args = ap.parse_args(argv)

    recipe = load_recipe(None)
    prep = Prepared(recipe, log=lambda m: None)
    model, task = prep.model.eval(), prep.task
    train = prep.splits.train
    calib = [task.batch(train[i:i + 16], prep.device) for i in range(0, args.calibration, 16)]
    start = args.calibration + 1000
    heldout = [task.batch(train[i:i + 16], prep.device) for i in range(start, start + args.heldout, 16)]
    layers = select_linear_layers(model)
    original = {p: m.weight.detach().clone() for p, m in layers}
    dequant = {p: dequantize_weight(quantize_weight(w)) for p, w in original.items()}

    @torch.no_grad()
    def log_probs():
        out = []
        for b in heldout:
            lp = torch.log_softmax(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float(), -1)
            out.append((lp, b["attention_mask"].bool()))
        return out

    reference = log_probs()

    def measure(weights) -> dict:
        with torch.no_grad():
            for p, m in layers:
                m.weight.copy_(weights[p])
        total, tokens = 0.0, 0
        for (ref, mask), (lp, _) in zip(reference, log_probs()):
            total += float((ref.exp() * (ref - lp)).sum(-1)[mask].sum())
            tokens += int(mask.sum())
        metrics, _ = prep.evaluate(model, prep.splits.test)
        return {"kl_per_token": total / tokens, "test_accuracy": metrics["accuracy"], "test_loss": metrics["loss"]}

    t = time.perf_counter()
    corrections, report = error_corrections(model, calib, rank=args.rank)  # on the original weights
    svd = {}
    for p, w in original.items():
        U, S, Vh = torch.linalg.svd(w.double() - dequant[p].double(), full_matrices=False)
        svd[p] = (U[:, :args.rank] * S[:args.rank]) @ Vh[:args.rank]
    results = {
        "model": recipe.model, "layers": len(layers), "rank": args.rank, "calibration_tokens": report.tokens,
        "heldout_tokens": sum(int(b["attention_mask"].sum()) for b in heldout),
        "original": measure(original),
        "nf4": measure(dequant),
        "nf4+svd": measure({p: (dequant[p].double() + svd[p]).float() for p in original}),
        "nf4+qera": measure({p: (dequant[p].double() + c.B0 @ c.A0).float() for p, c in corrections.items()}),
        "qera_output_error_remaining_mean": report.remaining,
        "seconds": time.perf_counter() - t,
    }
    print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
