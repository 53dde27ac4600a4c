"""Packing without cross-contamination (issue 16, item 4): `lorakit.train.packing`.

On a tiny Llama, for eager and sdpa attention and for both masking mechanisms (restarting
`position_ids` read by transformers, or an explicit block-diagonal mask), the packed loss equals
the mean of the per-example unpacked losses and every example's logits equal its logits alone.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_llama

import lorakit as lk
from lorakit.ops.loss import causal_lm_loss
from lorakit.train.packing import (
    PackingError,
    block_causal_mask,
    collate_packed,
    pack,
    padding_fraction,
    padding_report,
)

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


def _examples(n=7, seed=0, vocab=128):
    """(input_ids, labels) pairs of 3..15 tokens; most have a prompt (labels -100) and an answer."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(3, 15)
        ids = [rng.randrange(vocab) for _ in range(length)]
        prompt = rng.randint(0, length - 2) if i % 3 else 0  # every third example: loss on all tokens
        out.append((ids, [-100] * prompt + ids[prompt:]))
    return out


def test_pack_puts_every_example_once_into_rows_that_fit():
    lengths = [random.Random(1).randint(1, 40) for _ in range(300)]
    rows = pack(lengths, 64)
    assert sorted(i for r in rows for i in r) == list(range(300))
    assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
    lower = -(-sum(lengths) // 64)
    assert lower <= len(rows) <= 11 * lower // 9 + 1  # best-fit decreasing's guarantee
    assert pack(lengths, 64) == rows  # deterministic
    assert pack([5, 3, 3, 2, 7], 10) == [[4, 1], [0, 2, 3]]
    with pytest.raises(PackingError, match="example 1 has 11 tokens"):
        pack([3, 11], 10)
    with pytest.raises(PackingError, match="example 0 has 0"):
        pack([0], 10)


def test_padding_fraction_and_report():
    assert padding_fraction([[2, 4], [3]]) == pytest.approx(1 - 9 / 11)
    report = padding_report([5, 3, 3, 2, 7], max_length=10, batch_size=5)
    # before: one batch of 5 padded to 7 -> 20 tokens in 35; after: two full rows of 10
    assert report["padding_before"] == pytest.approx(round(1 - 20 / 35, 4))
    assert report["padding_after"] == 0.0 and report["rows"] == 2 and report["row_fill"] == 1.0
    assert report["batches_before"] == 1 and report["batches_after"] == 1


def test_block_causal_mask():
    seg = torch.tensor([[0, 0, 1, 1, 1, 9]])
    m = block_causal_mask(seg)[0, 0]
    expected = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0],
                             [0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(m, expected)
    add = block_causal_mask(seg, torch.float32)[0, 0]
    assert torch.equal(add == 0, expected) and float(add.min()) == torch.finfo(torch.float32).min


def test_collated_rows():
    ex = [([1, 2, 3], [-100, 2, 3]), ([4, 5], [4, 5]), ([6], [6])]
    b = collate_packed([ex[:2], ex[2:]], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 0, 0, 0, 0]]
    assert b["labels"].tolist() == [[-100, 2, 3, -100, 5], [-100] * 5]  # first labels: nothing predicts them
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]  # padding restarts: a segment of its own
    # example 0 has 2 supervised labels, example 1 one, example 2 none: N=3, E=2
    assert b["loss_weights"].tolist() == [[0, 0.75, 0.75, 0, 1.5], [0] * 5]
    with pytest.raises(PackingError, match="weighting"):
        collate_packed([ex], 0, weighting="rows")
    with pytest.raises(PackingError, match="as many labels"):
        collate_packed([[([1, 2], [1])]], 0)


def _model(attn):
    model = tiny_llama(seed=0, num_hidden_layers=2, attn_implementation=attn)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2, generator=torch.Generator().manual_seed(3))
    return model.eval()


def _alone(model, ids, labels):
    ids, labels = torch.tensor([ids]), torch.tensor([labels])
    out = model(input_ids=ids)
    return out.logits[0], F.cross_entropy(out.logits[0, :-1], labels[0, 1:])


CASES = [("sdpa", "position_ids", None), ("eager", "position_ids", None), ("sdpa", "mask", None),
         ("eager", "mask", torch.float32)]


@pytest.mark.parametrize("attn,attention,mask_dtype", CASES)
def test_packed_loss_is_the_mean_of_the_unpacked_losses(attn, attention, mask_dtype):
    model, examples = _model(attn), _examples()
    rows = [[examples[i] for i in r] for r in pack([len(e[0]) for e in examples], 24)]
    assert len(rows) < len(examples) and max(len(r) for r in rows) >= 2
    batch = collate_packed(rows, pad_id=0, attention=attention, mask_dtype=mask_dtype)
    packed = causal_lm_loss(model, **batch)
    alone = [_alone(model, *e) for e in examples]
    assert abs(float(packed) - float(torch.stack([a[1] for a in alone]).mean())) <= 1e-5

    kwargs = {k: v for k, v in batch.items() if k not in ("labels", "loss_weights")}
    logits = model(**kwargs, use_cache=False).logits
    for row_i, r in enumerate(pack([len(e[0]) for e in examples], 24)):
        offset = 0
        for i in r:  # each example's logits in its row are its logits alone
            n = len(examples[i][0])
            assert float((logits[row_i, offset:offset + n] - alone[i][0]).abs().max()) <= 1e-5
            offset += n


def test_token_weighting_is_the_padded_batch_loss():
    model, examples = _model("sdpa"), _examples()
    rows = [[examples[i] for i in r] for r in pack([len(e[0]) for e in examples], 24)]
    packed = causal_lm_loss(model, **collate_packed(rows, pad_id=0, weighting="token"))
    width = max(len(e[0]) for e in examples)
    ids = torch.tensor([e[0] + [0] * (width - len(e[0])) for e in examples])
    labels = torch.tensor([e[1] + [-100] * (width - len(e[1])) for e in examples])
    mask = torch.tensor([[1] * len(e[0]) + [0] * (width - len(e[0])) for e in examples])
    padded = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert abs(float(packed) - float(padded)) <= 1e-5


def test_with_a_kv_cache_transformers_ignores_the_packing():
    """Why `causal_lm_loss` runs with use_cache=False: with the config's default (a DynamicCache in
    the forward), transformers does not read the restarting position ids, and the second example
    of a row attends to the first."""
    model, examples = _model("sdpa"), _examples()
    batch = collate_packed([examples[:2]], pad_id=0)
    n0 = len(examples[0][0])
    second_alone = _alone(model, *examples[1])[0]
    kwargs = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
    clean = model(**kwargs, use_cache=False).logits[0, n0:]
    leaky = model(**kwargs).logits[0, n0:]
    assert model.config.use_cache
    assert float((clean - second_alone).abs().max()) <= 1e-5
    assert float((leaky - second_alone).abs().max()) > 1e-2
