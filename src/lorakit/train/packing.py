"""Packing: short examples into rows of up to `max_length` tokens, each attending only to itself.

A padded batch of chat examples is mostly padding (chatterbot in SmolLM2's chat template: see
docs/long-context.md); packing puts several examples in one row instead:

- rows are filled by best-fit decreasing (longest example first, into the row it fills best;
  within 11/9 of the fewest rows possible, Johnson 1973), deterministically;
- `position_ids` restart at 0 for every example, so rotary positions are those of the example
  alone;
- attention stays inside each example. transformers >= 4.57 (`masking_utils.create_causal_mask`)
  reads restarting `position_ids` as packed sequences and builds a block-diagonal causal mask
  for eager and sdpa attention (flash-attention-2 uses them as `cu_seqlens`) -- but only when
  no 2-D `attention_mask` and no KV cache are given: the forward must run with
  `use_cache=False` (`lorakit.ops.loss.causal_lm_loss` does), otherwise a fresh `DynamicCache`
  makes transformers skip the detection and every example attends to the ones before it.
  `attention="mask"` passes an explicit 4-D block-diagonal causal mask instead (boolean for
  sdpa, additive for eager), for older transformers or other attention code;
- the first token of each example predicts nothing (its label is -100): in the packed row it
  would be predicted from the previous example's last token;
- `loss_weights` (`weighting="example"`) make the mean over supervised tokens equal to the mean
  of the per-example mean losses, which is what training on the examples one at a time and
  averaging gives; they average 1 over the supervised tokens of a batch. `weighting="token"`
  gives the plain mean over supervised tokens (what a padded batch's loss is).
"""

from __future__ import annotations

import bisect
import random
from typing import Sequence

import torch

from ..errors import LoraError

IGNORE = -100
WEIGHTINGS = ("example", "token")
ATTENTION = ("position_ids", "mask")


class PackingError(LoraError, ValueError):
    """An example that does not fit a row, an empty example, or an unknown option."""


def pack(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Indices of the examples in each row: best-fit decreasing bin packing.

    Args:
        lengths: tokens per example (each 1..max_length).
        max_length: the row capacity in tokens.
    Returns:
        Rows as lists of example indices (every index exactly once), in the order they were
        opened (longest first example first); the same lengths give the same rows.
    Raises:
        PackingError: an example longer than `max_length` or empty.
    """
    bad = next((i for i, n in enumerate(lengths) if not 0 < n <= max_length), None)
    if bad is not None:
        raise PackingError(f"example {bad} has {lengths[bad]} tokens; packing needs 1..{max_length} (truncate first)")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        k = bisect.bisect_left(free, (lengths[i], -1))  # the fullest row that still has room
        if k == len(free):
            rows.append([i])
            bisect.insort(free, (max_length - lengths[i], len(rows) - 1))
        else:
            room, r = free.pop(k)
            rows[r].append(i)
            bisect.insort(free, (room - lengths[i], r))
    return rows


def padding_fraction(batches: Sequence[Sequence[int]]) -> float:
    """Share of padding when each batch (a list of row lengths) is padded to its longest row:
    `1 - sum(lengths) / sum(len(batch) * max(batch))`."""
    total = sum(len(b) * max(b) for b in batches if b)
    return 1.0 - sum(sum(b) for b in batches) / total if total else 0.0


def padding_report(lengths: Sequence[int], max_length: int, batch_size: int, seed: int = 0) -> dict:
    """Padding before packing (batches of `batch_size` examples) and after (batches of `batch_size`
    packed rows), both in a `random.Random(seed)` shuffled order as a training stream takes them,
    each batch padded to its longest; plus the rows' count and fill (tokens / (rows x max_length))."""
    rows = pack(lengths, max_length)
    row_lengths = [sum(lengths[i] for i in r) for r in rows]
    rng = random.Random(seed)
    before, after = list(lengths), list(row_lengths)
    rng.shuffle(before)
    rng.shuffle(after)
    chunks = lambda xs: [xs[i:i + batch_size] for i in range(0, len(xs), batch_size)]  # noqa: E731
    return {"examples": len(lengths), "tokens": int(sum(lengths)), "rows": len(rows),
            "padding_before": round(padding_fraction(chunks(before)), 4),
            "padding_after": round(padding_fraction(chunks(after)), 4),
            "row_fill": round(sum(row_lengths) / (len(rows) * max_length), 4),
            "batches_before": -(-len(lengths) // batch_size), "batches_after": -(-len(rows) // batch_size)}


def _row(examples: Sequence[tuple[list[int], list[int]]]) -> tuple[list[int], list[int], list[int], list[int]]:
    """`(ids, labels, positions, example number)` of one packed row; each example's first label -> -100."""
    ids, labels, pos, seg = [], [], [], []
    for e, (x, y) in enumerate(examples):
        if len(x) != len(y) or not x:
            raise PackingError(f"an example needs as many labels as tokens (>= 1), got {len(x)} tokens and {len(y)} "
                               "labels")
        ids += x
        labels += [IGNORE] + list(y[1:])
        pos += range(len(x))
        seg += [e] * len(x)
    return ids, labels, pos, seg


def block_causal_mask(segments: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`(B, 1, T, T)` mask letting token q see token k iff k <= q in the same segment.

    Args:
        segments: `(B, T)` integer segment of each token (padding: a segment of its own).
        dtype: None for a boolean mask (True = attend; for sdpa), or a float dtype for an additive
            mask (0 / the dtype's most negative value; for eager attention).
    """
    t = segments.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()
    mask = (segments[:, :, None] == segments[:, None, :]) & causal
    mask = mask[:, None]
    if dtype is None:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def collate_packed(rows: Sequence[Sequence[tuple[list[int], list[int]]]], pad_id: int, *, weighting: str = "example",
                   attention: str = "position_ids", mask_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """One training batch from packed rows, for `lorakit.ops.loss.causal_lm_loss(model, **batch)`.

    Args:
        rows: each row a list of `(input_ids, labels)` examples (labels -100 where no loss is taken),
            e.g. `[[examples[i] for i in row] for row in pack(...)]`.
        pad_id: the padding token (rows are padded to the longest; padding is a segment of its own).
        weighting: `"example"` (mean of per-example means) or `"token"` (mean over supervised tokens).
        attention: `"position_ids"` (transformers builds the block-diagonal mask) or `"mask"`
            (an explicit `(B, 1, T, T)` `attention_mask`, see `block_causal_mask`).
        mask_dtype: with `"mask"`: None (boolean, sdpa) or a float dtype (additive, eager).
    Returns:
        `input_ids`, `labels`, `position_ids` `(B, T)` long; `loss_weights` `(B, T)` float32 with
        `"example"`; `attention_mask` with `"mask"`. Examples without a supervised token get no
        weight and do not count in the mean.
    Raises:
        PackingError: an unknown option, or an example whose labels do not match its tokens.
    """
    if weighting not in WEIGHTINGS or attention not in ATTENTION:
        raise PackingError(f"weighting must be one of {WEIGHTINGS} and attention one of {ATTENTION}, "
                           f"got {weighting!r}, {attention!r}")
    built = [_row(r) for r in rows]
    width = max(len(b[0]) for b in built)
    fill = lambda xs, v: [x + [v] * (width - len(x)) for x in xs]  # noqa: E731
    pad_pos = [p + list(range(width - len(p))) for _, _, p, _ in built]
    batch = {"input_ids": torch.tensor(fill([b[0] for b in built], pad_id)),
             "labels": torch.tensor(fill([b[1] for b in built], IGNORE)),
             "position_ids": torch.tensor(pad_pos)}
    segments = torch.tensor(fill([b[3] for b in built], -1))
    if weighting == "example":
        batch["loss_weights"] = _example_weights(batch["labels"], segments)
    if attention == "mask":
        segments = torch.where(segments < 0, torch.iinfo(torch.long).max, segments)  # padding: its own segment
        batch["attention_mask"] = block_causal_mask(segments, mask_dtype)
    return batch


def _example_weights(labels: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """`N / (E * n_e)` on the supervised labels of example e (`n_e` of them, `E` examples with any,
    `N` supervised labels in the batch): averages 1, and the weighted mean is the mean of the
    examples' means."""
    supervised = labels != IGNORE
    key = segments + (segments.max() + 1) * torch.arange(len(labels))[:, None]  # unique per (row, example)
    _, inverse, counts = torch.unique(key[supervised], return_inverse=True, return_counts=True)
    weights = torch.zeros(labels.shape, dtype=torch.float32)
    n, e = int(supervised.sum()), len(counts)
    weights[supervised] = n / (e * counts[inverse].float())
    return weights
