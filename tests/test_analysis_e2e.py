"""End to end: tiny random transformers models, adapters saved by lorakit, analysed by the API and the CLI."""

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import lorakit as lk
from lorakit.analysis import amplification, analyze_adapter, cli, subspace_similarity, write_report
from lorakit.analysis.errors import AnalysisError, BaseModelError, NoCommonModulesError
from lorakit.state import lora_layers

transformers = pytest.importorskip("transformers")

LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)


def llama(dtype=torch.float32, **over):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA, **over})).to(dtype).eval()


def gpt2(dtype=torch.float64):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg).to(dtype).eval()


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for name in layer.adapter_names:
                for t in (layer.lora_A[name], layer.lora_B[name]):
                    t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype))


def adapted(model, r, seed, targets, alpha=None):
    lk.inject(model, lk.LoraConfig(r=r, alpha=alpha or 2 * r, target_modules=targets))
    randomize(model, seed)
    return model


@pytest.fixture(scope="module")
def llama_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    base = llama()
    base.save_pretrained(root / "base")
    targets = ["q_proj", "v_proj", "embed_tokens"]
    m4 = adapted(llama(), 4, 1, targets)
    m8 = adapted(llama(), 8, 2, targets)
    lk.save_adapter(m4, root / "r4")
    lk.save_adapter(m8, root / "r8")
    llama(hidden_size=16, intermediate_size=24).save_pretrained(root / "small_base")  # shapes do not fit
    lk.save_adapter(adapted(llama(), 2, 3, ["o_proj"]), root / "other_modules")  # no module in common
    return root, base, m4, m8


def canonical(layer, name="default"):
    """(scaling * B @ A) as (out, in) from the live layer, float64."""
    return (layer.scaling[name] * (layer.lora_B[name].double() @ layer.lora_A[name].double())).detach()


def test_api_spectrum_similarity_amplification_match_direct_computation(llama_setup):
    root, base, m4, m8 = llama_setup
    res = analyze_adapter(root / "r4", root / "r8", base=root / "base", random_trials=3)
    json.dumps(res, allow_nan=False)
    a4, a8 = res["adapters"]
    expected_paths = ["model.embed_tokens"] + [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert list(a4["modules"]) == expected_paths and a4["r"] == 4 and a8["r"] == 8
    layers4, layers8 = dict(lora_layers(m4)), dict(lora_layers(m8))
    base_sd = base.state_dict()
    for path in expected_paths:
        for entry, layers, r in ((a4, layers4, 4), (a8, layers8, 8)):
            m = entry["modules"][path]
            delta = canonical(layers[path])
            # delta_weight of the live layer (in the base layout) has the same spectrum
            assert torch.allclose(delta if path.endswith("proj") else delta.T, layers[path].delta_weight("default", torch.float64), rtol=1e-12, atol=1e-12)
            ref = np.linalg.svd(delta.numpy(), compute_uv=False)[:r]
            np.testing.assert_allclose(m["spectrum"]["singular_values"], ref, rtol=1e-10)
            assert m["spectrum"]["numerical_rank"] == r and m["spectrum"]["energy_top_k"][str(r)] == pytest.approx(1.0, abs=1e-12)
            assert m["shape"] == list(delta.shape) and m["kind"] == ("embedding" if "embed" in path else "linear")
            W0 = base_sd[path + ".weight"].double()
            W0 = W0.T if "embed" in path else W0  # embedding table (num, dim) vs update (dim, num)
            direct = amplification(delta, W0, r, random_trials=3, seed=0)
            got = m["amplification"]
            for key in ("delta_fro", "w0_fro", "proj_delta", "proj_w0", "amplification", "random_expected_rms"):
                assert got[key] == pytest.approx(direct[key], rel=1e-9), (path, key)
            assert got["r"] == r
        sim = res["similarity"]["modules"][path]
        l4, l8 = layers4[path], layers8[path]
        np.testing.assert_allclose(sim["phi_A"], subspace_similarity(l4.lora_A["default"].detach(), l8.lora_A["default"].detach()).numpy(), atol=1e-12)
        np.testing.assert_allclose(sim["phi_B"], subspace_similarity(l4.lora_B["default"].detach(), l8.lora_B["default"].detach(), "left").numpy(), atol=1e-12)
        assert np.array(sim["phi_A"]).shape == (4, 8) and sim["r1"] == 4 and sim["r2"] == 8
        # delta's own subspaces: full-rank B, so delta's row space is A's row space
        d4, d8 = canonical(l4), canonical(l8)
        np.testing.assert_allclose(sim["phi_delta_in"], subspace_similarity(d4, d8, "right").numpy()[:4, :8], atol=1e-10)
        np.testing.assert_allclose(sim["phi_delta_out"], subspace_similarity(d4, d8, "left").numpy()[:4, :8], atol=1e-10)
        assert sim["summary_delta_in"]["phi_full"] == pytest.approx(sim["summary_A"]["phi_full"], abs=1e-10)
    assert res["similarity"]["labels"] == ["r4", "r8"]


def test_same_adapter_twice_is_fully_similar(llama_setup):
    root, *_ = llama_setup
    res = analyze_adapter(root / "r4", root / "r4")
    for m in res["similarity"]["modules"].values():
        np.testing.assert_allclose(m["phi_A"], np.ones((4, 4)), atol=1e-12)
        np.testing.assert_allclose(m["phi_B"], np.ones((4, 4)), atol=1e-12)
        np.testing.assert_allclose(m["phi_delta_in"], np.ones((4, 4)), atol=1e-10)
        np.testing.assert_allclose(m["phi_delta_out"], np.ones((4, 4)), atol=1e-10)
    assert res["similarity"]["labels"][0] != res["similarity"]["labels"][1]


def test_gpt2_conv1d_layout_and_full_finetune_equal_to_merged_adapter(tmp_path):
    # Conv1D stores (in, out): c_attn (32 -> 96) and the square attn.c_proj (32 -> 32)
    base = gpt2()
    sd = {k[len("transformer."):]: v.clone() for k, v in base.state_dict().items() if k.startswith("transformer.")}
    save_file(sd, tmp_path / "gpt2_base.safetensors")  # keys without "transformer.", as the original gpt2 checkpoint
    model = adapted(gpt2(), 4, 5, ["c_attn", "attn.c_proj"])
    lk.save_adapter(model, tmp_path / "ad")
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    deltas = {path: canonical(layer) for path, layer in lora_layers(model)}
    merged = lk.merge_and_unload(model)  # float64 merge: W_ft = W0 + delta to rounding
    save_file({k: v.clone() for k, v in merged.state_dict().items() if k.startswith("transformer.")}, tmp_path / "ft.safetensors")

    res = analyze_adapter(tmp_path / "ad", base=tmp_path / "gpt2_base.safetensors",
                          full_finetune=tmp_path / "ft.safetensors", random_trials=2)
    mods = res["adapters"][0]["modules"]
    assert set(mods) == {"transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"}
    assert res["adapters"][0]["fan_in_fan_out"] is True
    for path, m in mods.items():
        conv = base.get_submodule(path)
        delta = deltas[path]
        assert m["shape"] == [conv.weight.shape[1], conv.weight.shape[0]] and m["kind"] == "conv1d_gpt2"
        direct = amplification(delta, conv.weight.double().T, 4, random_trials=2)
        for key in ("proj_delta", "proj_w0", "amplification", "proj_random"):
            assert m["amplification"][key] == pytest.approx(direct[key], rel=1e-9), (path, key)
        # the wrong orientation would give a different projection on the square c_proj
        if conv.weight.shape[0] == conv.weight.shape[1]:
            wrong = amplification(delta, conv.weight.double(), 4, random_trials=0)
            assert abs(wrong["proj_delta"] - m["amplification"]["proj_delta"]) > 1e-6
        ft = res["full_finetune"]["modules"][path]
        assert ft["energy_at_adapter_rank"] == pytest.approx(1.0, abs=1e-12)
        assert ft["spectrum"]["numerical_rank"] == 4
        np.testing.assert_allclose(ft["spectrum"]["singular_values"][:4], m["spectrum"]["singular_values"], rtol=1e-10)


def test_full_finetune_of_known_rank(tmp_path, llama_setup):
    root, base, *_ = llama_setup
    g = torch.Generator().manual_seed(9)
    sd = {k: v.clone() for k, v in base.state_dict().items()}
    key = "model.layers.1.self_attn.q_proj.weight"
    sd[key] = (sd[key].double() + torch.randn(32, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 32, generator=g, dtype=torch.float64)).float()
    save_file(sd, tmp_path / "ft.safetensors")
    res = analyze_adapter(root / "r4", base=root / "base", full_finetune=tmp_path / "ft.safetensors",
                          modules=r"q_proj$", random_trials=0)
    ft = res["full_finetune"]["modules"]
    assert list(ft) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert ft["model.layers.0.self_attn.q_proj"]["spectrum"]["numerical_rank"] == 0  # unchanged weight
    s = ft["model.layers.1.self_attn.q_proj"]["spectrum"]
    ref = np.linalg.svd(sd[key].double().numpy() - base.state_dict()[key].double().numpy(), compute_uv=False)
    np.testing.assert_allclose(s["singular_values"], ref, rtol=1e-10, atol=1e-12 * ref[0])
    assert s["energy_top_k"]["4"] == pytest.approx(1.0, abs=1e-9)  # rank 3 up to float32 rounding of W_ft
    assert s["rank_99"] == 3
    assert any("W_ft - W0 is zero" in w for w in res["warnings"])


def test_report_files_and_markdown(tmp_path, llama_setup):
    root, *_ = llama_setup
    res = analyze_adapter(root / "r4", root / "r8", base=root / "base", random_trials=2)
    written = write_report(res, tmp_path / "rep", max_heatmaps=2)
    names = set(written)
    assert {"analysis.json", "analysis.md", "spectrum_r4.png", "spectrum_r8.png", "amplification_r4.png",
            "similarity_model.embed_tokens.png", "similarity_model.layers.0.self_attn.q_proj.png"} <= names
    assert sum(n.startswith("similarity_") for n in names) == 2
    for p in written.values():
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    back = json.loads((tmp_path / "rep" / "analysis.json").read_text())
    assert back["adapters"][0]["modules"]["model.layers.0.self_attn.q_proj"]["spectrum"] == \
        res["adapters"][0]["modules"]["model.layers.0.self_attn.q_proj"]["spectrum"]
    md = (tmp_path / "rep" / "analysis.md").read_text()
    assert "## Subspace similarity" in md and "### Amplification" in md and "![spectrum r4](spectrum_r4.png)" in md


def test_cli_run_json_and_out(tmp_path, llama_setup, capsys):
    root, *_ = llama_setup
    parser = argparse.ArgumentParser(prog="lorakit analyze")
    cli.add_arguments(parser)
    args = parser.parse_args([str(root / "r4"), str(root / "r8"), "--base", str(root / "base"), "--json",
                              "--out", str(tmp_path / "o"), "--no-plots", "--random-trials", "1"])
    assert cli.run(args) == 0
    out = capsys.readouterr().out
    res = json.loads(out)
    assert res["similarity"]["labels"] == ["r4", "r8"]
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["analysis.json", "analysis.md"]


@pytest.mark.parametrize("argv_tail,message", [
    (["MISSING"], "does not exist"),
    (["r4", "--full-finetune", "base"], "needs --base"),
    (["r4", "--modules", "nothing_matches"], "matches none"),
    (["r4", "--base", "small_base"], "has shape"),
    (["r4", "--base", "MISSING"], "does not exist"),
    (["r4", "other_modules"], "no adapted module in common"),
])
def test_cli_bad_input_prints_one_line_and_exits_2(tmp_path, llama_setup, capsys, argv_tail, message):
    root, *_ = llama_setup
    capsys.readouterr()
    argv = [str(root / a) if a in ("r4", "base", "small_base", "other_modules", "MISSING") else a for a in argv_tail]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m lorakit.analysis: error:") and message in lines[0]


def test_api_errors_are_lora_errors(llama_setup):
    root, *_ = llama_setup
    with pytest.raises(NoCommonModulesError):
        analyze_adapter(root / "r4", root / "other_modules")
    with pytest.raises(BaseModelError, match="no weight for adapted module"):
        analyze_adapter(root / "r4", base={"unrelated.weight": torch.zeros(2, 2)})
    with pytest.raises(AnalysisError, match="random_trials"):
        analyze_adapter(root / "r4", random_trials=-1)
    with pytest.raises(lk.LoraError):
        analyze_adapter(root / "nope")


def test_python_dash_m_entry_point(llama_setup):
    root, *_ = llama_setup
    proc = subprocess.run([sys.executable, "-m", "lorakit.analysis", str(root / "r4"), "--modules", "q_proj"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| `model.layers.0.self_attn.q_proj` | 32×32 | 4 |" in proc.stdout


def test_weight_source_key_matching_and_errors(tmp_path):
    from lorakit.analysis import WeightSource

    w = torch.zeros(3, 2)
    src = WeightSource({"model.layers.0.q_proj.weight": w, "h.0.attn.c_attn.weight": w,
                        "enc.layers.1.k.weight": w, "dec.layers.1.k.weight": w})
    assert src.key_for("model.layers.0.q_proj") == "model.layers.0.q_proj.weight"  # exact
    assert src.key_for("layers.0.q_proj") == "model.layers.0.q_proj.weight"  # checkpoint has a longer prefix
    assert src.key_for("transformer.h.0.attn.c_attn") == "h.0.attn.c_attn.weight"  # adapter has a longer prefix
    with pytest.raises(BaseModelError, match="ambiguous"):
        src.key_for("layers.1.k")
    with pytest.raises(BaseModelError, match="no weight"):
        src.key_for("model.layers.0.v_proj")
    (tmp_path / "pt").mkdir()
    (tmp_path / "pt" / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(BaseModelError, match="pickle"):
        WeightSource(tmp_path / "pt")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(BaseModelError, match="not a readable safetensors"):
        WeightSource(tmp_path / "bad.safetensors")
