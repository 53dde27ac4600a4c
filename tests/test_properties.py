"""Property tests (hypothesis) over random shapes, ranks, dtypes and scalings for the layer math:
step-0 identity, merged == unmerged, unmerge restores bit for bit, merging is idempotent."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lorakit as lk

DTYPES = {"float32": (torch.float32, 1e-5), "float64": (torch.float64, 1e-12), "bfloat16": (torch.bfloat16, None)}


def _layer(kind, in_f, out_f, groups, dtype, seed):
    torch.manual_seed(seed)
    if kind == "linear":
        m, x = nn.Linear(in_f, out_f), torch.randn(3, 2, in_f)
    elif kind == "embedding":
        m, x = nn.Embedding(in_f, out_f), torch.randint(0, in_f, (3, 5))
    elif kind == "conv1d":
        m, x = nn.Conv1d(in_f * groups, out_f * groups, 3, padding=1, groups=groups), torch.randn(2, in_f * groups, 7)
    else:
        m, x = nn.Conv2d(in_f * groups, out_f * groups, 2, stride=2, groups=groups), torch.randn(2, in_f * groups, 6, 6)
    m = m.to(dtype)
    return nn.Sequential(m), (x.to(dtype) if x.is_floating_point() else x)


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(["linear", "embedding", "conv1d", "conv2d"]),
    in_f=st.integers(1, 12),
    out_f=st.integers(1, 12),
    groups=st.sampled_from([1, 2]),
    r=st.integers(1, 6),
    alpha=st.floats(0.1, 64),
    rslora=st.booleans(),
    dtype=st.sampled_from(list(DTYPES)),
    seed=st.integers(0, 10_000),
)
def test_layer_math_properties(kind, in_f, out_f, groups, r, alpha, rslora, dtype, seed):
    torch_dtype, tol = DTYPES[dtype]
    if kind.startswith("conv"):
        r *= groups
    else:
        groups = 1
    model, x = _layer(kind, in_f, out_f, groups, torch_dtype, seed)
    with torch.no_grad():
        base = model(x)
    lk.inject(model, lk.LoraConfig(r=r, alpha=alpha, use_rslora=rslora, target_modules=["0"]))
    layer = model[0]
    with torch.no_grad():
        assert torch.equal(model(x), base)  # step 0: B = 0 (A = 0 for embeddings)
        g = torch.Generator().manual_seed(seed)
        for t in (layer.lora_A["default"], layer.lora_B["default"]):
            t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype))
        w0 = layer.weight.detach().clone()
        unmerged = model(x)
        lk.merge(model)
        merged_w = layer.weight.detach().clone()
        merged = model(x)
        lk.merge(model)
        assert torch.equal(layer.weight, merged_w)  # idempotent
        # the merged weight is the base plus delta, computed wide and rounded once
        acc = torch.float64 if torch_dtype == torch.float64 else torch.float32
        assert torch.equal(merged_w, (w0.to(acc) + layer.delta_weight("default", acc)).to(torch_dtype))
        lk.unmerge(model)
        assert torch.equal(layer.weight, w0)  # unmerge restores bit for bit
    if tol is not None:
        scale = unmerged.abs().max().clamp_min(1.0)
        assert ((merged - unmerged).abs().max() / scale) <= tol
