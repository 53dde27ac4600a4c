"""The math alone, on tensors: no model surgery, no files, no state.

- `lora`: the LoRA equation (`delta_weight`, the low-rank term of every layer kind, dropout,
  per-row terms of mixed batches, the accumulation dtype);
- `fused`: the fast path's autograd node (base + LoRA in one node, a 1-byte dropout mask);
- `nf4`: the 4-bit NormalFloat format through bitsandbytes (quantize / dequantize one weight);
- `loss`: the cross-entropy over an LM head in chunks of tokens (no full `(tokens, vocab)` logits).
"""
