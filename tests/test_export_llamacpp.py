"""Proof against llama.cpp itself: exported GGUF files run by llama.cpp (llama-cpp-python, built once
by `make llama-cpp`) give the logits lorakit computes.

Tolerances, measured on this machine (docs/export.md):
- float32 GGUF with llama.cpp's attention cache in float32 (`kv_f32`): llama.cpp computes what a
  float32 PyTorch forward computes, up to float rounding: 1e-6 (tiny Llama) to 6e-5 (SmolLM2) of
  logits up to 36 (GPT-2: 4e-4, llama.cpp's GELU is a table). Tolerance `1e-3 * max(1, max |logit|)`.
- merged files in f16 / bf16 / q8_0: one rounding of every weight; tolerances 1e-2 / 4e-2 / 0.15
  of the logit scale (measured 7e-4 / 5e-3 / 4e-2).
- SmolLM2's Q4_1 file: llama.cpp multiplies Q4_1 weights with activations rounded to 8 bits, so even
  the base model differs from lorakit's float32 forward of the same (dequantized) weights by up to
  1.2-1.6 logits (mean 0.2; the next-token argmax agrees at 88-100% of positions). Tolerance 2.0 for
  the base; with the adapter, twice the base's gap plus 0.05, and the adapted logits must lie nearer
  lorakit's adapted logits than lorakit's base logits (`lorakit.verify.forms.judge_llama_cpp`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import lorakit as lk
from lorakit import cli
from lorakit.export import export_gguf_adapter, export_gguf_merged
from lorakit.verify.forms import judge_llama_cpp

from helpers import randomize_lora, tiny_gpt2, tiny_llama

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make llama-cpp builds it)")
from lorakit.verify.llamacpp import LlamaCpp  # noqa: E402

pytestmark = pytest.mark.slow
F32_RTOL = 1e-3
MERGED_RTOL = {"f32": F32_RTOL, "f16": 1e-2, "bf16": 4e-2, "q8_0": 0.15}
Q4_BASE_TOL = 2.0


def scale(ref: np.ndarray) -> float:
    return max(1.0, float(np.abs(ref).max()))


@torch.no_grad()
def torch_logits(model, ids) -> np.ndarray:
    return model(torch.tensor([ids])).logits[0].float().numpy()


@pytest.fixture(scope="module")
def source_gguf():
    from lorakit.train.errors import ModelLoadError
    from lorakit.train.models import resolve_model

    try:
        return resolve_model("smollm2").path
    except ModelLoadError as exc:
        pytest.skip(str(exc))


# ---------------------------------------------------------------------- tiny models, every module kind
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def tiny_moe(family: str, seed: int = 0):
    """A tiny mixture-of-experts model of vocabulary 49,152, routers and experts large enough that the tokens
    spread over the experts and the adapters show."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=49152, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2, tie_word_embeddings=False)
    model = {
        "mixtral": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
            **common, intermediate_size=64, num_local_experts=4)),
        "qwen3_moe": lambda: transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            **common, intermediate_size=96, moe_intermediate_size=32, num_experts=4, head_dim=32, norm_topk_prob=True)),
        "qwen2_moe": lambda: transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
            **common, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=4)),
        "olmoe": lambda: transformers.OlmoeForCausalLM(transformers.OlmoeConfig(
            **{**common, "num_key_value_heads": 4}, intermediate_size=32, num_experts=4, eos_token_id=1, pad_token_id=0)),
    }[family]()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "experts" in name or name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.2 if "experts" in name else 1.0)
    return model.eval()


TINY = {
    "llama": (lambda: tiny_llama(vocab_size=49152, hidden_size=64, intermediate_size=128, tie_word_embeddings=False),
              lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                           "down_proj", "lm_head", "embed_tokens"],
                            rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3})),
    "llama-rslora": (lambda: tiny_llama(vocab_size=49152, hidden_size=64, intermediate_size=128),
                     lk.LoraConfig(r=4, alpha=8, target_modules="all-linear", use_rslora=True, rank_pattern={"q_proj": 8})),
    "gpt2-slices": (lambda: tiny_gpt2(vocab_size=49152, n_embd=64, n_positions=128),
                    lk.LoraConfig(r=4, alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fused_slices={"c_attn": [True, False, True]})),
    # mixture-of-experts: one LoRA pair per expert on the 3-D expert stacks, beside the router and attention
    "mixtral": (lambda: tiny_moe("mixtral"),
                lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj", "o_proj", "lm_head"],
                              target_parameters=EXPERTS, rank_pattern={r"experts\.\w+": 2}, alpha_pattern={r"experts\.\w+": 3})),
    "qwen3_moe": (lambda: tiny_moe("qwen3_moe"), lk.LoraConfig(r=4, alpha=8, target_modules="all", use_rslora=True)),
    "qwen2_moe": (lambda: tiny_moe("qwen2_moe"), lk.LoraConfig(r=4, alpha=8, target_modules="all")),
    "olmoe": (lambda: tiny_moe("olmoe"), lk.LoraConfig(r=4, alpha=8, target_modules=["v_proj"],
                                                       target_parameters=["mlp.experts.down_proj"])),
}
TOKENS = list(range(1000, 1024))


@pytest.fixture(scope="module", params=list(TINY))
def tiny(request, source_gguf, tmp_path_factory):
    """`(model with adapter, base GGUF, adapter GGUF, lorakit base logits, lorakit adapted logits)`: a tiny
    model of vocabulary 49,152 written as a float32 GGUF with SmolLM2's tokenizer, and its adapter."""
    make, config = TINY[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    model = make()
    base_logits = torch_logits(model, TOKENS)
    export_gguf_merged(model, folder / "base.gguf", source_gguf=source_gguf, outtype="f32")
    lk.inject(model, config)
    randomize_lora(model, std=0.1)
    export_gguf_adapter(model, folder / "adapter.gguf")
    return model, folder / "base.gguf", folder / "adapter.gguf", base_logits, torch_logits(model, TOKENS)


def test_tiny_adapters_compute_in_llama_cpp_what_they_compute_in_lorakit(tiny):
    model, base_file, adapter_file, base, ref = tiny
    with LlamaCpp(base_file, kv_f32=True) as llm:
        assert np.abs(llm.logits(TOKENS) - base).max() <= F32_RTOL * scale(base)
    with LlamaCpp(base_file, adapter_file, kv_f32=True) as llm:
        got = llm.logits(TOKENS)
    assert np.abs(ref - base).max() > 0.5  # the adapter matters
    assert np.abs(got - ref).max() <= F32_RTOL * scale(ref)
    with LlamaCpp(base_file, adapter_file, lora_scale=0.0, kv_f32=True) as llm:  # control: the same file, switched off
        assert np.abs(llm.logits(TOKENS) - ref).max() > 10 * F32_RTOL * scale(ref)


def test_llama_cpp_refusing_a_file_is_a_lora_error_with_its_reason(tiny, tmp_path):
    _, base_file, adapter_file, _, _ = tiny
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(adapter_file.read_bytes()[:4096])  # a truncated adapter file
    with pytest.raises(lk.LoraError, match="refused the adapter file .*not within the file bounds"):
        LlamaCpp(base_file, broken)  # llama-cpp-python alone would run the base model without a word


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_tiny_merged_files_run_alone_in_llama_cpp(tiny, tmp_path, source_gguf, outtype):
    model, _, _, base, ref = tiny
    export_gguf_merged(model, tmp_path / "m.gguf", source_gguf=source_gguf, outtype=outtype)
    with LlamaCpp(tmp_path / "m.gguf", kv_f32=True) as llm:
        got = llm.logits(TOKENS)
    # a router's near-tie can pick another expert once its weights are rounded (measured on these models: up to 0.03
    # in f16, 0.13 in bf16, 0.4 in q8_0), so a rounded mixture-of-experts file is held to the direction test alone
    if outtype == "f32" or not getattr(model.config, "num_experts_per_tok", None):
        assert np.abs(got - ref).max() <= MERGED_RTOL[outtype] * scale(ref)
    assert np.linalg.norm(got - ref) < 0.5 * np.linalg.norm(got - base)


# ---------------------------------------------------------------------- SmolLM2-135M (Q4_1) itself
CHAT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
STORY = "Once upon a time, in a small village,"


@pytest.fixture(scope="module")
def smol(source_gguf, smollm2_folder, smollm2_tokenizer, tmp_path_factory):
    """SmolLM2 with a clearly non-zero adapter on every linear module (rank and alpha patterns), its
    folder and GGUF files, and lorakit's logits on a chat prompt."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("smol")
    model = AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32).eval()
    export_gguf_merged(model, folder / "base-f32.gguf", source_gguf=source_gguf, outtype="f32")
    lk.inject(model, lk.LoraConfig(r=8, alpha=16, target_modules="all-linear", rank_pattern={"v_proj": 4},
                                   alpha_pattern={"down_proj": 8}))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lk.state.lora_layers(model):
            layer.lora_B["default"].copy_(torch.randn(layer.lora_B["default"].shape, generator=g) * 0.02)
    lk.save_adapter(model, folder / "adapter")
    export_gguf_adapter(folder / "adapter", folder / "adapter.gguf", base_gguf=source_gguf)
    ids = smollm2_tokenizer(CHAT).input_ids
    ref = torch_logits(model, ids)
    with lk.disabled(model):
        base = torch_logits(model, ids)
    return dict(model=model, folder=folder, gguf=source_gguf, ids=ids, ref=ref, base=base, tokenizer=smollm2_tokenizer)


@pytest.mark.realmodel
def test_smollm2_exported_without_adapter_is_the_source_file_dequantized(smol):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    source, ours = GGUFReader(smol["gguf"]), GGUFReader(smol["folder"] / "base-f32.gguf")
    theirs = {t.name: t for t in source.tensors}
    assert len(theirs) == 272 and {t.name for t in ours.tensors} == set(theirs)
    for t in ours.tensors:  # Q4_1 / Q8_0 / F32 in the source, float32 here: equal bit for bit
        want = dequantize(theirs[t.name].data, theirs[t.name].tensor_type).reshape(t.data.shape)
        assert np.array_equal(t.data, want), t.name
    assert set(source.fields) == set(ours.fields)
    for key in source.fields:
        if key not in ("general.file_type", "GGUF.tensor_count", "GGUF.kv_count"):
            assert source.fields[key].contents() == ours.fields[key].contents(), key


@pytest.mark.realmodel
def test_smollm2_base_in_llama_cpp_against_lorakit(smol):
    with LlamaCpp(smol["gguf"]) as llm:
        q4 = llm.logits(smol["ids"])
    gap = np.abs(q4 - smol["base"])
    assert 0.1 < gap.max() <= Q4_BASE_TOL and gap.mean() < 0.3  # the Q4_1 x Q8_1 kernels, not a layout error
    assert np.mean(q4.argmax(1) == smol["base"].argmax(1)) >= 0.85
    with LlamaCpp(smol["folder"] / "base-f32.gguf", kv_f32=True) as llm:
        assert np.abs(llm.logits(smol["ids"]) - smol["base"]).max() <= F32_RTOL * scale(smol["base"])


@pytest.mark.realmodel
def test_smollm2_adapter_in_llama_cpp_on_the_float32_base(smol):
    with LlamaCpp(smol["folder"] / "base-f32.gguf", smol["folder"] / "adapter.gguf", kv_f32=True) as llm:
        got = llm.logits(smol["ids"])
    assert np.abs(smol["ref"] - smol["base"]).max() > 1.0
    assert np.abs(got - smol["ref"]).max() <= F32_RTOL * scale(smol["ref"])


@pytest.mark.realmodel
def test_smollm2_adapter_in_llama_cpp_on_the_q4_1_base(smol):
    with LlamaCpp(smol["gguf"]) as llm:
        cpp_base = llm.logits(smol["ids"])
    with LlamaCpp(smol["gguf"], smol["folder"] / "adapter.gguf") as llm:
        cpp = llm.logits(smol["ids"])
    check = judge_llama_cpp("llama.cpp", cpp, cpp_base, smol["ref"], smol["base"])
    assert check.ok and check.max_abs_diff <= 2 * Q4_BASE_TOL + 0.05, check
    assert np.linalg.norm(cpp - smol["ref"]) < np.linalg.norm(cpp - smol["base"])
    lost = judge_llama_cpp("llama.cpp", cpp_base, cpp_base, smol["ref"], smol["base"])  # an adapter that got lost
    assert "nearer the adapted" in check.note and not lost.ok


@pytest.mark.realmodel
def test_smollm2_greedy_generation_changes_where_lorakit_changes(smol):
    model, ids = smol["model"], smol["tokenizer"](STORY).input_ids

    @torch.no_grad()
    def greedy(n=24):
        seq = list(ids)
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
        return seq[len(ids):]

    ours = greedy()
    with lk.disabled(model):
        ours_base = greedy()
    first = next(i for i, (a, b) in enumerate(zip(ours, ours_base)) if a != b)  # the adapter changes the story
    with LlamaCpp(smol["gguf"]) as llm:
        theirs_base = llm.greedy(ids, 24)
    with LlamaCpp(smol["gguf"], smol["folder"] / "adapter.gguf") as llm:
        theirs = llm.greedy(ids, 24)
    assert theirs_base[: first + 1] == ours_base[: first + 1] and theirs[: first + 1] == ours[: first + 1]
    with LlamaCpp(smol["folder"] / "base-f32.gguf", smol["folder"] / "adapter.gguf", kv_f32=True) as llm:
        assert llm.greedy(ids, 24) == ours  # on the float32 base, every token


@pytest.mark.realmodel
def test_smollm2_merged_gguf_runs_alone(smol, tmp_path):
    result = export_gguf_merged(smol["model"], tmp_path / "merged.gguf", source_gguf=smol["gguf"], outtype="f32")
    assert result.metadata_from == "source" and len(result.merged) == 30 * 7
    with LlamaCpp(tmp_path / "merged.gguf", kv_f32=True) as llm:
        got = llm.logits(smol["ids"])
    assert np.abs(got - smol["ref"]).max() <= F32_RTOL * scale(smol["ref"])


README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[list[str]]:
    """The `lorakit ...` lines of the README's "Run it in llama.cpp / ollama" section, as argv lists."""
    section = README.read_text().split("## Run it in llama.cpp / ollama")[1].split("\n## ")[0]
    return [line.split("#")[0].split()[1:] for line in section.splitlines() if line.strip().startswith("lorakit ")]


@pytest.mark.realmodel
def test_readme_commands_write_files_that_llama_cpp_runs(smol, tmp_path, monkeypatch, capsys):
    demo = tmp_path / "runs" / "demo" / "adapter"
    shutil.copytree(smol["folder"] / "adapter", demo)
    (demo / "lorakit_train.json").write_text(json.dumps({"recipe": {"model": "smollm2"}}))  # as `lorakit train` records it
    monkeypatch.chdir(tmp_path)
    commands = readme_commands()
    assert [c[0] for c in commands] == ["export", "export", "verify"]
    printed = []
    for argv in commands:
        code = cli.main(argv)
        printed.append(capsys.readouterr().out)
        assert code == 0, (argv, printed[-1])
    assert "210 LoRA weight pairs for llama" in printed[0] and f"llama-cli -m {smol['gguf']} --lora adapter.gguf" in printed[0]
    with LlamaCpp(smol["folder"] / "base-f32.gguf", tmp_path / "adapter.gguf", kv_f32=True) as llm:
        assert np.abs(llm.logits(smol["ids"]) - smol["ref"]).max() <= F32_RTOL * scale(smol["ref"])
    with LlamaCpp(tmp_path / "merged.gguf", kv_f32=True) as llm:  # float16, run alone
        merged = llm.logits(smol["ids"])
    assert np.abs(merged - smol["ref"]).max() <= MERGED_RTOL["f16"] * scale(smol["ref"])
    rows = {line.split()[0] + (" f32" if " f32 " in line else ""): line for line in printed[2].splitlines() if line.startswith("  ")}
    for form in ("merged", "reloaded", "peft", "llama.cpp", "llama.cpp f32"):
        assert rows[form].split("  (")[0].rstrip().endswith("ok"), printed[2]
    assert printed[2].splitlines()[0].endswith(": OK") and "100.0%" in rows["attention"] and "100.0%" in rows["mlp"]


def test_cli_verify_runs_a_moe_adapter_in_llama_cpp_on_the_base_gguf_given(tmp_path, source_gguf, capsys):
    model = tiny_moe("qwen3_moe")
    model.save_pretrained(tmp_path / "base")  # an HF folder: a mixture-of-experts GGUF cannot be --model
    export_gguf_merged(model, tmp_path / "base.gguf", source_gguf=source_gguf, outtype="f32")
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules="all"))
    randomize_lora(model, std=0.1)
    lk.save_adapter(model, tmp_path / "ad")
    capsys.readouterr()
    code = cli.main(["verify", str(tmp_path / "ad"), "--model", str(tmp_path / "base"), "--base-gguf",
                     str(tmp_path / "base.gguf"), "--no-peft", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["ok"], report
    llama = [f for f in report["forms"] if f["form"].startswith("llama.cpp")]
    assert llama and all(f.get("max_abs_diff") is not None for f in llama), llama
