"""GGUF export (lorakit.export) read back with the `gguf` package's reader, against independent
float64 references: tensor names and layouts, the Llama q/k row order, one alpha for every
module's scaling, what is refused, the merged model file, and the `lorakit export` command line.

That llama.cpp itself computes the same thing from these files: tests/test_export_llamacpp.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import lorakit as lk
from lorakit import cli
from lorakit.export import GGUFExportError, export_gguf_adapter, export_gguf_merged
from lorakit.fileio import atomic_output
from lorakit.state import lora_layers

from helpers import assert_same_state, randomize_lora, state_snapshot, tiny_gpt2, tiny_llama

gguf = pytest.importorskip("gguf")


def read(path):
    """`({key: value}, {tensor name: float64 array in numpy order})` of a GGUF file."""
    from gguf.quants import dequantize

    r = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {}
    for t in r.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        tensors[t.name] = dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float64)
    return meta, tensors


def llama_cpp_order(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a q/k projection in llama.cpp's order, written independently of lorakit: within each
    head of size d, llama.cpp row 2*i + c is transformers' row c*d/2 + i."""
    d = rows.shape[0] // n_heads
    index = [h * d + c * (d // 2) + i for h in range(n_heads) for i in range(d // 2) for c in range(2)]
    return rows[index]


def effective_deltas(path):
    """What llama.cpp adds to each weight, `alpha / r * B @ A`, from the file alone (numpy order (out, in))."""
    meta, t = read(path)
    alpha = meta["adapter.lora.alpha"]
    out = {}
    for name in {n.rsplit(".", 1)[0] for n in t}:
        a, b = t[name + ".lora_a"], t[name + ".lora_b"]
        if name == "token_embd.weight":
            out[name] = (alpha / b.shape[1]) * (b @ a.T)  # (dim, num_embeddings)
        else:
            out[name] = (alpha / b.shape[-1]) * (b @ a)  # expert stacks: (experts, out, in)
    return meta, out


LLAMA_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def expected_llama(model, adapter="default"):
    """lorakit's delta_weight of every adapted module, in float64, under llama.cpp's names and row order."""
    cfg = model.config
    out = {}
    for path, layer in lora_layers(model):
        delta = layer.delta_weight(adapter, torch.float64).detach().numpy()
        if path == "lm_head":
            out["output.weight"] = delta
        elif path == "model.embed_tokens":
            out["token_embd.weight"] = delta.T  # nn.Embedding's delta is (num, dim)
        else:
            block, rest = path.split(".")[2], ".".join(path.split(".")[3:])
            name = f"blk.{block}.{LLAMA_NAMES[rest]}.weight"
            if rest == "self_attn.q_proj":
                delta = llama_cpp_order(delta, cfg.num_attention_heads)
            elif rest == "self_attn.k_proj":
                delta = llama_cpp_order(delta, cfg.num_key_value_heads)
            out[name] = delta
    return out


def adapted_llama(config: lk.LoraConfig, **model_args):
    model = tiny_llama(**model_args)
    lk.inject(model, config)
    randomize_lora(model)
    return model


EVERY_LLAMA_KIND = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head", "embed_tokens"]


def test_adapter_file_holds_llama_cpp_names_layouts_and_values(tmp_path):
    model = adapted_llama(lk.LoraConfig(r=4, alpha=8, target_modules=EVERY_LLAMA_KIND), tie_word_embeddings=False)
    result = export_gguf_adapter(model, tmp_path / "a.gguf")
    meta, deltas = effective_deltas(tmp_path / "a.gguf")
    assert meta["general.architecture"] == "llama" and meta["general.type"] == "adapter"
    assert meta["adapter.type"] == "lora" and meta["adapter.lora.alpha"] == 8.0 and result.rescaled == []
    expected = expected_llama(model)
    assert set(deltas) == set(expected) and len(expected) == 2 * 7 + 2
    for name, want in expected.items():
        np.testing.assert_allclose(deltas[name], want, rtol=1e-6, atol=1e-7, err_msg=name)
    _, raw = read(tmp_path / "a.gguf")
    q = next(p for p, layer in lora_layers(model) if p.endswith("layers.0.self_attn.q_proj"))
    layer = dict(lora_layers(model))[q]
    np.testing.assert_array_equal(raw["blk.0.attn_q.weight.lora_a"], layer.lora_A["default"].detach().double().numpy())
    embed = dict(lora_layers(model))["model.embed_tokens"]  # llama.cpp gathers rows of A.T by token id
    np.testing.assert_array_equal(raw["token_embd.weight.lora_a"], embed.lora_A["default"].detach().double().numpy().T)


@pytest.mark.parametrize("config", [
    lk.LoraConfig(r=4, alpha=8, target_modules="all-linear", rank_pattern={"v_proj": 2, "down_proj": 6},
                  alpha_pattern={"o_proj": 3, "up_proj": 40}),
    lk.LoraConfig(r=4, alpha=8, target_modules="all-linear", use_rslora=True, rank_pattern={"q_proj": 8}),
], ids=["rank-alpha-patterns", "rslora"])
def test_one_alpha_serves_every_modules_scaling(tmp_path, config):
    model = adapted_llama(config)
    result = export_gguf_adapter(model, tmp_path / "a.gguf")
    meta, deltas = effective_deltas(tmp_path / "a.gguf")
    expected = expected_llama(model)
    for name, want in expected.items():
        np.testing.assert_allclose(deltas[name], want, rtol=1e-6, atol=1e-7, err_msg=name)
    shared = [p for p, layer in lora_layers(model) if abs(layer.scaling["default"] * layer.r["default"] - meta["adapter.lora.alpha"]) < 1e-6]
    assert sorted(result.rescaled) == sorted(p for p, _ in lora_layers(model) if p not in shared) and result.rescaled


def test_folder_and_model_export_the_same_tensors(tmp_path):
    model = adapted_llama(lk.LoraConfig(r=4, alpha=16, target_modules=["q_proj", "k_proj", "down_proj"]))
    lk.save_adapter(model, tmp_path / "ad")
    export_gguf_adapter(model, tmp_path / "from_model.gguf")
    export_gguf_adapter(tmp_path / "ad", tmp_path / "from_folder.gguf", model=tiny_llama())
    (m1, t1), (m2, t2) = read(tmp_path / "from_model.gguf"), read(tmp_path / "from_folder.gguf")
    assert m1["adapter.lora.alpha"] == m2["adapter.lora.alpha"] == 16.0
    assert list(t1) == list(t2) and all(np.array_equal(t1[k], t2[k]) for k in t1)


def test_half_precision_outtypes_round_once(tmp_path):
    model = adapted_llama(lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    export_gguf_adapter(model, tmp_path / "f32.gguf")
    for outtype, dtype in (("f16", np.float16), ("bf16", None)):
        export_gguf_adapter(model, tmp_path / f"{outtype}.gguf", outtype=outtype)
        _, t32 = read(tmp_path / "f32.gguf")
        _, t16 = read(tmp_path / f"{outtype}.gguf")
        for k in t32:
            rel = np.abs(t16[k] - t32[k]).max() / np.abs(t32[k]).max()
            assert 0 < rel < (2 ** -10 if outtype == "f16" else 2 ** -7), (outtype, k, rel)


def test_gpt2_conv1d_adapters_keep_the_common_orientation(tmp_path):
    model = tiny_gpt2()
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["c_attn", "c_proj", "c_fc"]))
    randomize_lora(model)
    export_gguf_adapter(model, tmp_path / "g.gguf")
    meta, deltas = effective_deltas(tmp_path / "g.gguf")
    assert meta["general.architecture"] == "gpt2"
    names = {"attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    for path, layer in lora_layers(model):
        block, rest = path.split(".")[2], ".".join(path.split(".")[3:])
        want = layer.delta_weight("default", torch.float64).detach().numpy().T  # Conv1D keeps (in, out); GGUF (out, in)
        np.testing.assert_allclose(deltas[f"blk.{block}.{names[rest]}.weight"], want, rtol=1e-6, atol=1e-7)


REFUSED = {
    "dora": (dict(config=lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj"], use_dora=True)), "magnitude"),
    "modules_to_save": (dict(config=lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])),
                        "lm_head: tensor"),
    "trained bias": (dict(config=lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj"], bias="all"), attention_bias=True),
                     "trained base bias"),
    "tied head": (dict(config=lk.LoraConfig(r=4, alpha=8, target_modules=["lm_head"]), tie_word_embeddings=True),
                  "lm_head: the output head shares"),
    "tied embedding": (dict(config=lk.LoraConfig(r=4, alpha=8, target_modules=["embed_tokens"]), tie_word_embeddings=True),
                       "model.embed_tokens: the output head shares"),
    "pissa": (dict(config=lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj"], init="pissa")), "convert_pissa_to_lora"),
}


@pytest.mark.parametrize("case", REFUSED, ids=list(REFUSED))
def test_what_llama_cpp_cannot_represent_is_refused_naming_it(tmp_path, case):
    args, message = REFUSED[case]
    model = adapted_llama(**args)
    with pytest.raises(GGUFExportError, match=message):
        export_gguf_adapter(model, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists() and list(tmp_path.iterdir()) == []


def test_unsupported_architecture_and_missing_base_are_refused(tmp_path):
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    lk.inject(bert, lk.LoraConfig(r=2, alpha=4, target_modules=["query"]))
    with pytest.raises(GGUFExportError, match="model type 'bert' is not supported"):
        export_gguf_adapter(bert, tmp_path / "b.gguf")
    model = adapted_llama(lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    lk.save_adapter(model, tmp_path / "ad")
    with pytest.raises(GGUFExportError, match="the base model is unknown"):
        export_gguf_adapter(tmp_path / "ad", tmp_path / "a.gguf")


@pytest.mark.realmodel
def test_base_gguf_checks_every_tensor_as_llama_cpp_does(tmp_path):
    from safetensors.torch import save_file

    from lorakit.train.errors import ModelLoadError
    from lorakit.train.models import resolve_model

    try:
        base = resolve_model("smollm2").path
    except ModelLoadError as exc:
        pytest.skip(str(exc))

    def folder(name, shapes):
        (tmp_path / name).mkdir()
        cfg = lk.LoraConfig(r=8, alpha=16, target_modules=["q_proj"])
        (tmp_path / name / "adapter_config.json").write_text(cfg.to_json())
        g = torch.Generator().manual_seed(0)
        save_file({f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{ab}.weight": torch.randn(s, generator=g)
                   for i, (a_shape, b_shape) in shapes.items() for ab, s in (("A", a_shape), ("B", b_shape))},
                  tmp_path / name / "adapter_model.safetensors")
        return tmp_path / name

    good = export_gguf_adapter(folder("good", {0: ((8, 576), (576, 8)), 29: ((8, 576), (576, 8))}), tmp_path / "g.gguf", base_gguf=base)
    assert sorted(good.tensors) == ["blk.0.attn_q.weight", "blk.29.attn_q.weight"]
    with pytest.raises(GGUFExportError, match=r"model.layers.3.self_attn.q_proj: the adapter fits a weight of shape \(512, 576\)"):
        export_gguf_adapter(folder("narrow", {3: ((8, 576), (512, 8))}), tmp_path / "n.gguf", base_gguf=base)
    with pytest.raises(GGUFExportError, match="model.layers.30.self_attn.q_proj"):
        export_gguf_adapter(folder("deep", {30: ((8, 576), (576, 8))}), tmp_path / "d.gguf", base_gguf=base)
    with pytest.raises(GGUFExportError, match="different models"):
        export_gguf_adapter(folder("other", {0: ((8, 576), (576, 8))}), tmp_path / "o.gguf", base_gguf=base, model=tiny_llama().config)


# ---------------------------------------------------------------------- merged model files
@pytest.fixture(scope="module")
def tokenizer_gguf():
    """SmolLM2's GGUF file: its tokenizer (49,152 tokens) serves the tiny test models below."""
    from lorakit.train.errors import ModelLoadError
    from lorakit.train.models import resolve_model

    try:
        return resolve_model("smollm2").path
    except ModelLoadError as exc:
        pytest.skip(str(exc))


@pytest.mark.realmodel
def test_merged_file_holds_the_merged_weights_and_the_tokenizer(tmp_path, tokenizer_gguf):
    model = adapted_llama(lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj", "down_proj", "lm_head"]),
                          vocab_size=49152, tie_word_embeddings=True)
    before = state_snapshot(model)
    result = export_gguf_merged(model, tmp_path / "m.gguf", source_gguf=tokenizer_gguf, outtype="f32")
    assert_same_state(model, before)
    meta, t = read(tmp_path / "m.gguf")
    assert result.metadata_from == "config" and meta["general.type"] == "model" and meta["general.file_type"] == 0
    assert meta["llama.block_count"] == 2 and meta["llama.attention.head_count_kv"] == 2 and meta["llama.embedding_length"] == 32
    assert len(meta["tokenizer.ggml.tokens"]) == 49152 and "tokenizer.chat_template" in meta
    with pytest.warns(UserWarning, match="tied"):
        reference = lk.merge_and_unload(model)  # the library's own merge, as the file must hold it
    sd = {k: v.double().numpy() for k, v in reference.state_dict().items()}
    np.testing.assert_array_equal(t["blk.1.attn_q.weight"], llama_cpp_order(sd["model.layers.1.self_attn.q_proj.weight"], 4))
    np.testing.assert_array_equal(t["blk.0.attn_k.weight"], llama_cpp_order(sd["model.layers.0.self_attn.k_proj.weight"], 2))
    np.testing.assert_array_equal(t["blk.0.ffn_down.weight"], sd["model.layers.0.mlp.down_proj.weight"])
    # the adapted head is its own tensor now; the embedding keeps the base weight
    np.testing.assert_array_equal(t["output.weight"], sd["lm_head.weight"])
    np.testing.assert_array_equal(t["token_embd.weight"], sd["model.embed_tokens.weight"])
    assert not np.array_equal(t["output.weight"], t["token_embd.weight"])
    assert set(result.merged) == {"blk.0.attn_q.weight", "blk.1.attn_q.weight", "blk.0.attn_k.weight", "blk.1.attn_k.weight",
                                  "blk.0.ffn_down.weight", "blk.1.ffn_down.weight", "output.weight"}


@pytest.mark.realmodel
def test_merged_q8_0_and_tied_head(tmp_path, tokenizer_gguf):
    model = adapted_llama(lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj"]), vocab_size=49152, tie_word_embeddings=True)
    export_gguf_merged(model, tmp_path / "q.gguf", source_gguf=tokenizer_gguf, outtype="q8_0")
    meta, t = read(tmp_path / "q.gguf")
    assert "output.weight" not in t and meta["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    types = {x.name: x.tensor_type.name for x in gguf.GGUFReader(tmp_path / "q.gguf").tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    merged = lk.merge_and_unload(model).model.layers[0].self_attn.q_proj.weight.double().numpy()
    want = llama_cpp_order(merged, 4)
    scale = np.abs(want).reshape(-1, 32).max(axis=1, keepdims=True) / 127  # Q8_0: one scale per block of 32
    err = np.abs(t["blk.0.attn_q.weight"] - want).reshape(-1, 32)
    assert (err <= 0.6 * scale).all() and err.max() > 0  # half a step, and the float16 rounding of the scale


@pytest.mark.realmodel
def test_merged_embedding_adapter_on_a_tied_model_unties_the_head(tmp_path, tokenizer_gguf):
    model = adapted_llama(lk.LoraConfig(r=4, alpha=8, target_modules=["embed_tokens"]), vocab_size=49152, tie_word_embeddings=True)
    export_gguf_merged(model, tmp_path / "m.gguf", source_gguf=tokenizer_gguf, outtype="f32")
    _, t = read(tmp_path / "m.gguf")
    with pytest.warns(UserWarning, match="tied"):
        reference = lk.merge_and_unload(model)  # lorakit unties: the head keeps the base weight
    np.testing.assert_array_equal(t["token_embd.weight"], reference.model.embed_tokens.weight.double().numpy())
    np.testing.assert_array_equal(t["output.weight"], reference.lm_head.weight.double().numpy())
    assert not np.array_equal(t["output.weight"], t["token_embd.weight"])


@pytest.mark.realmodel
def test_merged_refuses_a_tokenizer_of_another_size(tmp_path, tokenizer_gguf):
    model = adapted_llama(lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))  # vocabulary 128
    with pytest.raises(GGUFExportError, match="49152 tokens, the model's vocabulary 128"):
        export_gguf_merged(model, tmp_path / "m.gguf", source_gguf=tokenizer_gguf)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- command line, files
def run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def hf_folder_and_adapter(tmp_path):
    """A tiny Llama saved as an HF folder, and a q/v adapter for it."""
    model = tiny_llama()
    model.save_pretrained(tmp_path / "base")
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_lora(model)
    lk.save_adapter(model, tmp_path / "ad")
    return tmp_path / "base", tmp_path / "ad", model


def test_cli_exports_an_adapter(tmp_path, capsys, hf_folder_and_adapter):
    base, adapter, model = hf_folder_and_adapter
    capsys.readouterr()
    code, out, err = run(["export", str(adapter), "--format", "gguf", "--model", str(base), "--out", str(tmp_path / "a.gguf")], capsys)
    assert code == 0, err
    assert "wrote" in out and "4 LoRA weight pairs for llama, adapter.lora.alpha=8" in out
    _, deltas = effective_deltas(tmp_path / "a.gguf")
    for name, want in expected_llama(model).items():
        np.testing.assert_allclose(deltas[name], want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", ["missing adapter", "not .gguf", "q8_0 adapter", "merged without gguf", "no model", "dora",
                                  "source-gguf missing", "source-gguf without merged"])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, hf_folder_and_adapter, case):
    base, adapter, model = hf_folder_and_adapter
    capsys.readouterr()  # the fixture's progress bars
    out = str(tmp_path / "x.gguf")
    if case == "dora":
        dora = tiny_llama()
        lk.inject(dora, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj"], use_dora=True))
        lk.save_adapter(dora, tmp_path / "dora")
    argv = {
        "missing adapter": ["export", str(tmp_path / "nope"), "--model", str(base), "--out", out],
        "not .gguf": ["export", str(adapter), "--model", str(base), "--out", str(tmp_path / "x.bin")],
        "q8_0 adapter": ["export", str(adapter), "--model", str(base), "--out", out, "--outtype", "q8_0"],
        "merged without gguf": ["export", str(adapter), "--model", str(base), "--out", out, "--merged"],
        "no model": ["export", str(adapter), "--out", out],
        "dora": ["export", str(tmp_path / "dora"), "--model", str(base), "--out", out],
        "source-gguf missing": ["export", str(adapter), "--model", str(base), "--out", out, "--merged",
                                "--source-gguf", str(tmp_path / "none.gguf")],
        "source-gguf without merged": ["export", str(adapter), "--model", str(base), "--out", out,
                                       "--source-gguf", str(tmp_path / "none.gguf")],
    }[case]
    if case == "no model":  # no --model, no lorakit_train.json, no base_model_name_or_path
        assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    code, stdout, err = run(argv, capsys)
    assert code == 2 and stdout == ""
    assert err.startswith("lorakit export: error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "x.gguf").exists()


def test_atomic_output_leaves_the_old_file_on_failure(tmp_path):
    target = tmp_path / "f.gguf"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.gguf"]
    with atomic_output(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["f.gguf"]


# ---------------------------------------------------------------------- mixture-of-experts
def tiny_moe(family: str = "mixtral", **overrides):
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2)
    make = {"mixtral": (transformers.MixtralForCausalLM, transformers.MixtralConfig,
                        dict(intermediate_size=24, num_local_experts=4)),
            "qwen3_moe": (transformers.Qwen3MoeForCausalLM, transformers.Qwen3MoeConfig,
                          dict(intermediate_size=40, moe_intermediate_size=16, num_experts=4, norm_topk_prob=True)),
            "qwen2_moe": (transformers.Qwen2MoeForCausalLM, transformers.Qwen2MoeConfig,
                          dict(intermediate_size=40, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                               num_experts=4)),
            "olmoe": (transformers.OlmoeForCausalLM, transformers.OlmoeConfig,
                      dict(intermediate_size=16, num_experts=4, eos_token_id=1, pad_token_id=0)),
            "gpt_oss": (transformers.GptOssForCausalLM, transformers.GptOssConfig,
                        dict(intermediate_size=16, num_local_experts=4, head_dim=8, layer_types=["full_attention"] * 2))}
    model_cls, config_cls, args = make[family]
    return model_cls(config_cls(**{**common, **args, **overrides}))


EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def test_expert_adapters_are_one_pair_per_expert_with_gate_up_split_in_halves(tmp_path):
    model = tiny_moe()
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj"], target_parameters=EXPERTS,
                                   rank_pattern={r"experts\.\w+": 2}, alpha_pattern={r"experts\.\w+": 3}))
    randomize_lora(model)
    result = export_gguf_adapter(model, tmp_path / "a.gguf")
    meta, deltas = effective_deltas(tmp_path / "a.gguf")
    _, raw = read(tmp_path / "a.gguf")
    ff = model.config.intermediate_size
    for block in range(2):
        layer = dict(lora_layers(model))[f"model.layers.{block}.mlp.experts"]
        A, B = {}, {}
        for p in ("gate_up_proj", "down_proj"):  # float64 reference: scaling * B_e @ A_e per expert (out, in)
            A[p], B[p] = (layer.lora_A["default"][p].detach().double().numpy(),
                          layer.lora_B["default"][p].detach().double().numpy())
        s = layer.scaling["default"]
        want = {"ffn_gate_exps": s * B["gate_up_proj"][:, :ff] @ A["gate_up_proj"],
                "ffn_up_exps": s * B["gate_up_proj"][:, ff:] @ A["gate_up_proj"],
                "ffn_down_exps": s * B["down_proj"] @ A["down_proj"]}
        for kind, delta in want.items():
            name = f"blk.{block}.{kind}.weight"
            assert raw[name + ".lora_a"].shape == (4, 2, A["down_proj" if kind == "ffn_down_exps" else "gate_up_proj"]
                                                   .shape[-1])  # (experts, r, in)
            np.testing.assert_allclose(deltas[name], delta, rtol=1e-6, atol=1e-9, err_msg=name)
        assert result.tensors[f"blk.{block}.ffn_gate_exps.weight"].endswith("experts.gate_up_proj (gate half)")
    # six expert pairs at scaling * r = 3, two q_proj at 8: the file's alpha is 3 and q_proj's B is rescaled
    assert meta["adapter.lora.alpha"] == 3.0
    assert sorted(result.rescaled) == [f"model.layers.{b}.self_attn.q_proj" for b in range(2)]


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "qwen2_moe"])
def test_expert_adapter_from_its_folder_is_the_file_written_from_the_model(tmp_path, family):
    model = tiny_moe(family)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules="all"))  # resolved in the file: PEFT's nesting
    randomize_lora(model)
    lk.save_adapter(model, tmp_path / "ad")
    export_gguf_adapter(model, tmp_path / "from_model.gguf")
    export_gguf_adapter(tmp_path / "ad", tmp_path / "from_folder.gguf", model=tiny_moe(family).config)
    (m1, t1), (m2, t2) = read(tmp_path / "from_model.gguf"), read(tmp_path / "from_folder.gguf")
    assert m1 == m2 and list(t1) == list(t2) and all(np.array_equal(t1[k], t2[k]) for k in t1)
    assert {"blk.1.ffn_gate_exps.weight.lora_a", "blk.1.ffn_up_exps.weight.lora_b",
            "blk.1.ffn_down_exps.weight.lora_b"} <= set(t1)


@pytest.mark.parametrize("family, overrides, match", [
    ("qwen3_moe", {"norm_topk_prob": False}, "norm_topk_prob=False: llama.cpp's qwen3moe model always renormalises"),
    ("qwen2_moe", {"norm_topk_prob": True}, "norm_topk_prob=True: llama.cpp's qwen2moe model never renormalises"),
    ("olmoe", {}, "num_key_value_heads=2 < num_attention_heads=4: llama.cpp's olmoe model has no grouped-query"),
    ("qwen3_moe", {"mlp_only_layers": [1]}, r"layers \[1\] are dense \(mlp_only_layers \[1\], decoder_sparse_step 1"),
    ("qwen3_moe", {"decoder_sparse_step": 2}, r"layers \[0\] are dense \(mlp_only_layers \[\], decoder_sparse_step 2"),
    ("mixtral", {"sliding_window": 16}, "sliding_window=16: llama.cpp's llama model attends to the whole context"),
    ("gpt_oss", {}, "model type 'gpt_oss' is not supported"),
], ids=["qwen3-unnormalised", "qwen2-normalised", "olmoe-gqa", "qwen3-dense-layers", "qwen3-sparse-step",
        "mixtral-window", "gpt-oss"])
def test_moe_models_llama_cpp_would_compute_differently_are_refused_before_writing(tmp_path, family, overrides, match):
    model = tiny_moe(family, **overrides)
    with pytest.raises(GGUFExportError, match=match):
        export_gguf_merged(model, tmp_path / "m.gguf", source_gguf=tmp_path / "never-read.gguf")
    assert not (tmp_path / "m.gguf").exists()


def _saved_moe(tmp_path, family="qwen3_moe", **config):
    model = tiny_moe(family)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, **(config or {"target_modules": "all"})))
    randomize_lora(model)
    lk.save_adapter(model, tmp_path / "ad")
    return tmp_path / "ad"


def _edit(folder, config=None, tensors=None):
    from safetensors.torch import load_file, save_file

    if config:
        data = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**data, **config}))
    if tensors:
        t = load_file(folder / "adapter_model.safetensors")
        tensors(t)
        save_file(t, folder / "adapter_model.safetensors")


@pytest.mark.parametrize("case, match", [
    ("config-r", r"lora_A \(16, 32\) is not 4 experts x rank 8: .* or of rank 4 \(adapter_config.json's r"),
    ("expert-rank-pattern", r"experts.gate_up_proj: lora_A \(16, 32\) is not 4 experts x rank 2: the adapter was "
                            r"made for 8 experts \(the base model has 4\) or of rank 4 \(adapter_config.json's r / "
                            r"rank_pattern say 2\)"),
    ("expert-B-cut", r"experts.gate_up_proj: lora_B \(32, 12\) is not 4 experts x rank 4: the adapter was made for "
                     r"3 experts .* or of rank 3"),
    ("expert-A-ragged", r"experts.gate_up_proj: lora_A \(13, 32\) is not 4 experts x rank 4$"),
    ("more-experts", r"lora_A \(16, 32\) is not 8 experts x rank 4: the adapter was made for 4 experts \(the base "
                     r"model has 8\)"),
    ("another-model", r"the adapter fits a weight of shape .* but the base model's .* has shape"),
])
def test_folder_export_checks_the_tensors_against_the_config_and_the_model(tmp_path, case, match):
    folder = _saved_moe(tmp_path)
    key = "base_model.model.model.layers.0.mlp.experts.base_layer.lora_{}.weight"  # gate_up_proj (nested once)
    model = tiny_moe("qwen3_moe").config
    if case == "config-r":
        _edit(folder, config={"r": 8})
    elif case == "expert-rank-pattern":
        _edit(folder, config={"rank_pattern": {r"experts\.\w+": 2}})
    elif case == "expert-B-cut":
        _edit(folder, tensors=lambda t: t.__setitem__(key.format("B"), t[key.format("B")][:, :12].contiguous()))
    elif case == "expert-A-ragged":
        _edit(folder, tensors=lambda t: t.__setitem__(key.format("A"), t[key.format("A")][:13].contiguous()))
    elif case == "more-experts":
        model = tiny_moe("qwen3_moe", num_experts=8).config
    else:
        model = tiny_moe("qwen3_moe", moe_intermediate_size=24).config
    with pytest.raises(GGUFExportError, match=match):
        export_gguf_adapter(folder, tmp_path / "a.gguf", model=model)
    assert not (tmp_path / "a.gguf").exists()


def test_adapter_export_refuses_routing_llama_cpp_computes_differently(tmp_path):
    folder = _saved_moe(tmp_path)
    with pytest.raises(GGUFExportError, match="norm_topk_prob=False: llama.cpp's qwen3moe model always"):
        export_gguf_adapter(folder, tmp_path / "a.gguf", model=tiny_moe("qwen3_moe", norm_topk_prob=False).config)


@pytest.mark.realmodel
def test_cli_merges_a_moe_folder_with_a_gguf_tokenizer_and_refuses_a_moe_gguf_as_model(tmp_path, capsys,
                                                                                         tokenizer_gguf):
    model = tiny_moe("qwen3_moe", vocab_size=49152)
    model.save_pretrained(tmp_path / "base")
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules="all"))
    randomize_lora(model)
    lk.save_adapter(model, tmp_path / "ad")
    capsys.readouterr()
    base_args = ["export", str(tmp_path / "ad"), "--model", str(tmp_path / "base"), "--merged"]
    code, out, err = run([*base_args, "--source-gguf", str(tokenizer_gguf), "--outtype", "f32",
                          "--out", str(tmp_path / "m.gguf")], capsys)
    assert code == 0, err
    meta, tensors = read(tmp_path / "m.gguf")
    assert meta["general.architecture"] == "qwen3moe" and meta["qwen3moe.expert_count"] == 4
    merged = dict(lora_layers(model))["model.layers.1.mlp.experts"].merged_weight(["default"], "gate_up_proj")
    np.testing.assert_array_equal(tensors["blk.1.ffn_up_exps.weight"], merged[:, 16:].detach().double().numpy())
    # the merged model's GGUF cannot come back through transformers (it would read another model): refused by name
    code, out, err = run(["export", str(tmp_path / "ad"), "--model", str(tmp_path / "m.gguf"), "--merged",
                          "--out", str(tmp_path / "again.gguf")], capsys)
    assert code == 2 and "is a mixture-of-experts GGUF (qwen3moe, 4 experts)" in err and err.count("\n") == 1
    assert not (tmp_path / "again.gguf").exists()


def test_a_dense_adapter_whose_json_rank_disagrees_with_its_tensors_is_refused(tmp_path):
    model = adapted_llama(lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    lk.save_adapter(model, tmp_path / "ad")
    _edit(tmp_path / "ad", config={"r": 8})  # llama.cpp would load it with alpha / 4 where lorakit means alpha / 8
    with pytest.raises(GGUFExportError, match=r"q_proj: rank 4 in the tensors, 8 in adapter_config.json"):
        export_gguf_adapter(tmp_path / "ad", tmp_path / "a.gguf", model=tiny_llama().config)


def test_export_says_when_the_json_was_edited_against_the_saved_config(tmp_path):
    model = adapted_llama(lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    lk.save_adapter(model, tmp_path / "ad")
    _edit(tmp_path / "ad", config={"lora_alpha": 16})  # the json is what counts (PEFT, vLLM), but say so
    with pytest.warns(UserWarning, match=r"alpha=16.* in adapter_config.json, 8.* saved with the tensors\); exporting"):
        result = export_gguf_adapter(tmp_path / "ad", tmp_path / "a.gguf", model=tiny_llama().config)
    assert result.alpha == 16.0
