"""PEFT format on small synthetic adapters, with exact expected values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import lorakit
from lorakit.adapter import Adapter, LoraModule, ModuleKind
from lorakit.errors import ConfigMismatchError, CorruptFileError, LorakitError
from lorakit.formats.peft import pattern_value

from ._raw import module_delta, peft_rule, read_peft
from .helpers import peft_pair, randn, read_config, read_keys, write_peft

L0, L1 = "model.layers.0.self_attn.", "model.layers.1.self_attn."

# --------------------------------------------------------------- rank_pattern / alpha_pattern


def test_pattern_value_exact_key_then_regex_in_order_then_default():
    pats = {"q_proj": 2, f"{L0}q_proj": 16, r"layers\.1\.self_attn\.(k|v)_proj": 6, "v_proj": 3}
    assert pattern_value(pats, f"{L0}q_proj", 4, path="", field="") == 16  # exact beats "q_proj"
    assert pattern_value(pats, f"{L1}q_proj", 4, path="", field="") == 2
    assert pattern_value(pats, f"{L1}v_proj", 4, path="", field="") == 6  # first regex in order
    assert pattern_value(pats, f"{L0}v_proj", 4, path="", field="") == 3
    assert pattern_value(pats, f"{L0}k_proj", 4, path="", field="") == 4  # default
    assert pattern_value({}, f"{L0}k_proj", 7, path="", field="") == 7
    assert pattern_value(None, f"{L0}k_proj", 7, path="", field="") == 7


def test_pattern_matches_whole_trailing_segments_only():
    assert pattern_value({"proj": 1}, "x.q_proj", 9, path="", field="") == 9
    assert pattern_value({"q_proj": 1}, "q_proj", 9, path="", field="") == 1
    assert pattern_value({"q_proj": 1}, "a.b.q_proj", 9, path="", field="") == 1
    assert pattern_value({"q_proj": 1}, "a.q_proj.lin", 9, path="", field="") == 9
    assert pattern_value({"q_proj": 1}, "a.xq_proj", 9, path="", field="") == 9


def test_pattern_order_decides_between_regexes():
    key = f"{L0}q_proj"
    a = {"q_proj": 2, r"layers\.0\.self_attn\.q_proj": 3}
    b = {r"layers\.0\.self_attn\.q_proj": 3, "q_proj": 2}
    assert pattern_value(a, key, 4, path="", field="") == 2
    assert pattern_value(b, key, 4, path="", field="") == 3


def test_invalid_regex_in_pattern_is_named(tmp_path):
    t = peft_pair(f"{L0}q_proj", 4, 6, 6, 0)
    folder = write_peft(tmp_path / "a", {"r": 4, "rank_pattern": {"(": 2}}, t)
    with pytest.raises(ConfigMismatchError, match="not a valid regex") as e:
        lorakit.load(folder)
    assert "rank_pattern" in str(e.value) and "adapter_config.json" in str(e.value)


# module -> (rank, alpha) for the config below
EXPECTED = {
    f"{L0}q_proj": (16, 8.0),   # exact rank key beats the earlier "q_proj" regex
    f"{L0}k_proj": (4, 12.0),   # default rank, alpha from "k_proj"
    f"{L0}v_proj": (3, 8.0),    # "v_proj"
    f"{L1}q_proj": (2, 8.0),    # "q_proj"
    f"{L1}k_proj": (6, 1.5),    # layers.1 regex; exact alpha key beats "k_proj"
    f"{L1}v_proj": (6, 8.0),    # layers.1 regex comes before "v_proj"
}
PATTERN_CONFIG = {
    "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj"],
    "rank_pattern": {"q_proj": 2, f"{L0}q_proj": 16, r"layers\.1\.self_attn\.(k|v)_proj": 6,
                     "v_proj": 3},
    "alpha_pattern": {"k_proj": 12, f"{L1}k_proj": 1.5},
}


def _pattern_folder(tmp_path, **changes):
    tensors = {}
    for i, (key, (r, _)) in enumerate(EXPECTED.items()):
        tensors.update(peft_pair(key, r, 12, 10, seed=i))
    return write_peft(tmp_path / "patterns", {**PATTERN_CONFIG, **changes}, tensors)


def test_rank_and_alpha_patterns_resolve_per_module(tmp_path):
    a = lorakit.load(_pattern_folder(tmp_path))
    assert list(a.modules) == sorted(EXPECTED)
    for key, (r, alpha) in EXPECTED.items():
        m = a.modules[key]
        assert (m.rank, m.alpha, m.rslora) == (r, alpha, False), key
        assert m.scale == alpha / r
    assert a.modules[f"{L0}q_proj"].scale == 0.5
    assert a.modules[f"{L1}k_proj"].scale == 0.25


def test_rslora_scale_is_alpha_over_sqrt_r(tmp_path):
    a = lorakit.load(_pattern_folder(tmp_path, use_rslora=True))
    for key, (r, alpha) in EXPECTED.items():
        assert a.modules[key].rslora
        assert a.modules[key].scale == alpha / math.sqrt(r), key
    assert a.modules[f"{L0}q_proj"].scale == 2.0  # 8 / sqrt(16)
    assert a.modules[f"{L0}k_proj"].scale == 6.0  # 12 / sqrt(4)


@pytest.mark.parametrize("rslora", [False, True])
def test_patterns_survive_every_format(tmp_path, rslora):
    """PEFT (original config kept) -> diffusers -> kohya -> PEFT (config rebuilt with exact-path
    patterns): ranks, scales and factors unchanged, and PEFT's own in-order rule agrees."""
    src = _pattern_folder(tmp_path, use_rslora=rslora)
    a = lorakit.load(src)
    p1 = lorakit.save(a, tmp_path / "p1")
    assert read_config(p1) == read_config(src)  # nothing changed: the user's config is kept
    d = lorakit.save(lorakit.convert(a, "diffusers"), tmp_path / "d.safetensors", "diffusers")
    k = lorakit.save(lorakit.convert(lorakit.load(d), "kohya"), tmp_path / "k.safetensors",
                     "kohya")
    p2 = lorakit.save(lorakit.convert(lorakit.load(k), "peft"), tmp_path / "p2", "peft")
    for path in (p1, d, k, p2):
        b = lorakit.load(path)
        assert sorted(b.modules) == sorted(a.modules), path
        for key, m in a.modules.items():
            assert b.modules[key].rank == m.rank
            assert b.modules[key].scale == pytest.approx(m.scale, rel=1e-15), (path, key)
            assert torch.equal(b.modules[key].down, m.down)
    cfg = read_config(p2)
    for key, m in a.modules.items():
        r = peft_rule(cfg["rank_pattern"], key, cfg["r"])
        alpha = peft_rule(cfg["alpha_pattern"], key, cfg["lora_alpha"])
        assert r == m.rank, key
        scale = alpha / (math.sqrt(r) if cfg["use_rslora"] else r)
        assert scale == pytest.approx(m.scale, rel=1e-15), key


def test_rank_in_tensors_must_match_config(tmp_path):
    folder = write_peft(tmp_path / "a", {"r": 8}, peft_pair(f"{L0}q_proj", 4, 6, 6, 0))
    with pytest.raises(ConfigMismatchError, match="config gives rank 8 but lora_A has rank 4") as e:
        lorakit.load(folder)
    assert f"{L0}q_proj" in str(e.value) and "adapter_config.json" in str(e.value)


def _mixed_adapter() -> Adapter:
    mods = {
        "encoder.layer.0.q": (4, 4.0), "model.encoder.layer.0.q": (8, 8.0),
        "encoder.layer.1.q": (8, 8.0), "model.encoder.layer.1.q": (2, 8.0),
        "decoder.layer.0.q": (8, 16.0), "decoder.layer.0.mlp.0": (8, 8.0),
    }
    return Adapter(modules={k: LoraModule(randn(r, 6, seed=i), randn(5, r, seed=50 + i), alpha=al)
                            for i, (k, (r, al)) in enumerate(mods.items())})


def test_mixed_ranks_written_with_exact_patterns(tmp_path):
    a = _mixed_adapter()
    out = lorakit.save(a, tmp_path / "p", "peft")
    cfg = read_config(out)
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 8
    # non-default modules, plus the module whose path ends with a listed one, deepest first
    assert cfg["rank_pattern"] == {"model.encoder.layer.0.q": 8, "model.encoder.layer.1.q": 2,
                                   "encoder.layer.0.q": 4}
    assert list(cfg["rank_pattern"])[-1] == "encoder.layer.0.q"
    assert cfg["alpha_pattern"] == {"model.encoder.layer.0.q": 8, "encoder.layer.0.q": 4,
                                    "decoder.layer.0.q": 16}
    assert sorted(cfg["target_modules"]) == ["mlp.0", "q"]  # never a bare "0"
    b = lorakit.load(out)
    for key, m in a.modules.items():
        assert (b.modules[key].rank, b.modules[key].alpha) == (m.rank, m.alpha), key
        # PEFT resolves the written patterns (first regex hit in order) to the same values
        assert peft_rule(cfg["rank_pattern"], key, cfg["r"]) == m.rank, key
        assert peft_rule(cfg["alpha_pattern"], key, cfg["lora_alpha"]) == m.alpha, key
    # and the independent reader agrees on every scale
    raw = read_peft(out)
    for key, m in a.modules.items():
        assert raw[key.replace(".", "_")].scale == m.scale


# -------------------------------------------------------------------------------------- DoRA


def _dora_tensors(with_weight_suffix: bool = True):
    key = f"{L0}q_proj"
    t = peft_pair(key, 4, 6, 5, 0)
    suffix = ".lora_magnitude_vector.weight" if with_weight_suffix else ".lora_magnitude_vector"
    mag = torch.linspace(0.5, 1.5, 5)
    t[f"base_model.model.{key}{suffix}"] = mag
    return key, t, mag


@pytest.mark.parametrize("suffix", [True, False], ids=["weight", "bare"])
def test_dora_magnitude_round_trip(tmp_path, suffix):
    key, t, mag = _dora_tensors(suffix)
    src = write_peft(tmp_path / "dora", {"r": 4, "lora_alpha": 8, "use_dora": True}, t)
    a = lorakit.load(src)
    assert a.is_dora and torch.equal(a.modules[key].magnitude, mag)
    out = lorakit.save(a, tmp_path / "out")
    keys, _ = read_keys(out / "adapter_model.safetensors")
    assert f"base_model.model.{key}.lora_magnitude_vector.weight" in keys
    assert read_config(out)["use_dora"] is True
    b = lorakit.load(out)
    assert torch.equal(b.modules[key].magnitude, mag)
    assert torch.equal(b.modules[key].down, a.modules[key].down)
    # PEFT -> kohya (dora_scale) -> PEFT keeps the magnitude values
    k = lorakit.save(lorakit.convert(a, "kohya"), tmp_path / "k.safetensors", "kohya")
    kkeys, _ = read_keys(k)
    assert "lora_model_layers_0_self_attn_q_proj.dora_scale" in kkeys
    p = lorakit.save(lorakit.convert(lorakit.load(k), "peft"), tmp_path / "p", "peft")
    c = lorakit.load(p)
    assert torch.equal(c.modules[key].magnitude.reshape(-1), mag)
    assert read_config(p)["use_dora"] is True


def test_dora_flag_and_tensors_must_agree(tmp_path):
    key, t, _ = _dora_tensors()
    with pytest.raises(ConfigMismatchError, match="use_dora is not set"):
        lorakit.load(write_peft(tmp_path / "a", {"r": 4}, t))
    plain = peft_pair(key, 4, 6, 5, 0)
    with pytest.raises(ConfigMismatchError, match="no magnitude vector"):
        lorakit.load(write_peft(tmp_path / "b", {"r": 4, "use_dora": True}, plain))


# ---------------------------------------------------------------------- conv, embedding, bias


def test_conv_lora_4d_factors(tmp_path):
    key = "down_blocks.0.resnets.0.conv1"
    a_t, b_t = randn(4, 3, 3, 3, seed=1), randn(5, 4, 1, 1, seed=2)
    src = write_peft(tmp_path / "conv", {"r": 4, "lora_alpha": 8, "target_modules": ["conv1"]},
                     {f"base_model.model.{key}.lora_A.weight": a_t,
                      f"base_model.model.{key}.lora_B.weight": b_t})
    a = lorakit.load(src)
    m = a.modules[key]
    assert m.kind is ModuleKind.CONV and m.rank == 4 and m.scale == 2.0
    assert m.kernel == (3, 3) and m.delta_shape == (5, 3, 3, 3)
    expected = 2.0 * np.einsum("or,rikl->oikl", b_t[:, :, 0, 0].double().numpy(),
                               a_t.double().numpy())
    np.testing.assert_allclose(m.delta(torch.float64).numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(module_delta(m).reshape(5, 3, 3, 3), expected, rtol=1e-12)
    b = lorakit.load(lorakit.save(a, tmp_path / "p"))
    assert b.modules[key].kind is ModuleKind.CONV
    assert torch.equal(b.modules[key].down, a_t) and torch.equal(b.modules[key].up, b_t)
    # and through kohya, which stores conv factors the same way
    k = lorakit.save(lorakit.convert(a, "kohya"), tmp_path / "k.safetensors", "kohya")
    c = lorakit.load(k)  # a prefix-less UNet module gains its component (lora_unet_)
    assert c.modules[f"unet.{key}"].kind is ModuleKind.CONV
    assert torch.equal(c.modules[f"unet.{key}"].down, a_t)
    assert torch.equal(c.modules[f"unet.{key}"].up, b_t) and c.modules[f"unet.{key}"].scale == 2.0


def test_embedding_lora(tmp_path):
    key = "model.embed_tokens"
    a_t, b_t = randn(4, 10, seed=3), randn(6, 4, seed=4)  # A (r, num_embeddings), B (dim, r)
    src = write_peft(tmp_path / "emb", {"r": 4, "lora_alpha": 4, "target_modules": ["embed_tokens"]},
                     {f"base_model.model.{key}.lora_embedding_A": a_t,
                      f"base_model.model.{key}.lora_embedding_B": b_t})
    a = lorakit.load(src)
    m = a.modules[key]
    assert m.kind is ModuleKind.EMBEDDING and m.rank == 4 and m.scale == 1.0
    assert m.delta_shape == (6, 10)
    np.testing.assert_allclose(module_delta(m), (b_t.double() @ a_t.double()).numpy(), rtol=1e-12)
    out = lorakit.save(a, tmp_path / "out")
    keys, _ = read_keys(out / "adapter_model.safetensors")
    assert keys == {f"base_model.model.{key}.lora_embedding_A",
                    f"base_model.model.{key}.lora_embedding_B"}
    b = lorakit.load(out)
    assert b.modules[key].kind is ModuleKind.EMBEDDING
    assert torch.equal(b.modules[key].down, a_t) and torch.equal(b.modules[key].up, b_t)


def test_lora_b_bias(tmp_path):
    key = f"{L0}q_proj"
    t = peft_pair(key, 4, 6, 5, 0)
    bias = torch.arange(5, dtype=torch.float32)
    t[f"base_model.model.{key}.lora_B.bias"] = bias
    a = lorakit.load(write_peft(tmp_path / "b", {"r": 4, "lora_bias": True}, t))
    assert torch.equal(a.modules[key].bias, bias)
    out = lorakit.save(a, tmp_path / "out")
    assert f"base_model.model.{key}.lora_B.bias" in read_keys(out / "adapter_model.safetensors")[0]
    assert torch.equal(lorakit.load(out).modules[key].bias, bias)
    d = lorakit.save(lorakit.convert(a, "diffusers"), tmp_path / "d.safetensors", "diffusers")
    assert torch.equal(lorakit.load(d).modules[key].bias, bias)
    with pytest.raises(ConfigMismatchError, match="bias"):
        lorakit.save(lorakit.convert(a, "kohya"), tmp_path / "k.safetensors", "kohya")
    assert not (tmp_path / "k.safetensors").exists()


# ------------------------------------------------------------------------------ .bin weights


def test_bin_weights_read_with_weights_only(tmp_path):
    tensors = {}
    for i, key in enumerate([f"{L0}q_proj", f"{L0}v_proj"]):
        tensors.update(peft_pair(key, 4, 6, 5, seed=i))
    tensors["base_model.model.score.weight"] = randn(2, 6, seed=9)
    cfg = {"r": 4, "lora_alpha": 16}
    a = lorakit.load(write_peft(tmp_path / "bin", cfg, tensors, bin_file=True))
    s = lorakit.load(write_peft(tmp_path / "st", cfg, tensors))
    assert list(a.modules) == list(s.modules) and a.scales() == s.scales() == {
        f"{L0}q_proj": 4.0, f"{L0}v_proj": 4.0}
    for key in a.modules:
        assert torch.equal(a.modules[key].down, s.modules[key].down)
        assert torch.equal(a.modules[key].up, s.modules[key].up)
    assert torch.equal(a.extras["score.weight"], tensors["base_model.model.score.weight"])
    out = lorakit.save(a, tmp_path / "out")
    assert (out / "adapter_model.safetensors").exists()


class _NotATensor:  # pickled by reference: weights_only loading must refuse it
    def __reduce__(self):
        return (print, ("this must never run",))


def test_bin_with_arbitrary_objects_is_refused(tmp_path, capsys):
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    torch.save({"base_model.model.x.lora_A.weight": _NotATensor()}, folder / "adapter_model.bin")
    with pytest.raises(CorruptFileError, match="weights-only") as e:
        lorakit.load(folder)
    assert "adapter_model.bin" in str(e.value)
    assert "this must never run" not in capsys.readouterr().out


# ---------------------------------------------------------------------------------- AdaLoRA


@pytest.mark.parametrize("lora_alpha", [4.0, 0.0])
def test_adalora_folds_into_equivalent_lora(tmp_path, lora_alpha):
    key = "roberta.encoder.layer.0.attention.self.query"
    a_t, b_t = randn(2, 3, seed=5), randn(4, 2, seed=6)
    e_t = torch.tensor([[2.0], [0.5]])
    p = f"base_model.model.{key}"
    src = write_peft(tmp_path / "ada", {"peft_type": "ADALORA", "r": 8, "init_r": 2,
                                        "target_r": 1, "lora_alpha": lora_alpha,
                                        "target_modules": ["query"]},
                     {f"{p}.lora_A": a_t, f"{p}.lora_B": b_t, f"{p}.lora_E": e_t})
    a = lorakit.load(src)
    m = a.modules[key]
    assert a.layout == "peft_adalora" and m.rank == 2
    assert torch.equal(m.down, a_t * e_t)
    scaling = lora_alpha if lora_alpha > 0 else 2.0
    ranknum = float(np.float32(2.0) + np.float32(1e-5))  # PEFT's float32 ranknum buffer + 1e-5
    assert m.alpha == pytest.approx(scaling * 2 / ranknum, rel=1e-15)
    assert m.scale == pytest.approx(scaling / ranknum, rel=1e-15)
    # PEFT's AdaLoRA forward: x @ (A * E)^T @ B^T * scaling / (ranknum + 1e-5)
    x = randn(3, 3, seed=7).double()
    ada = (x @ (a_t * e_t).double().T @ b_t.double().T) * scaling / ranknum
    ours = x @ torch.from_numpy(module_delta(m)).T
    torch.testing.assert_close(ours, ada, rtol=1e-12, atol=0)
    out = lorakit.save(a, tmp_path / "out")
    cfg = read_config(out)
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 2
    assert not {"init_r", "target_r"} & set(cfg)
    b = lorakit.load(out)
    assert b.layout == "peft" and torch.equal(b.modules[key].down, m.down)
    assert b.modules[key].scale == m.scale


def test_adalora_e_shape_is_checked(tmp_path):
    p = "base_model.model.q"
    src = write_peft(tmp_path / "ada", {"peft_type": "ADALORA", "r": 2, "lora_alpha": 2},
                     {f"{p}.lora_A": randn(2, 3), f"{p}.lora_B": randn(4, 2),
                      f"{p}.lora_E": randn(3, 1)})
    with pytest.raises(LorakitError, match="lora_E has shape"):
        lorakit.load(src)
