"""LyCORIS modules (LoHa, LoKr, LoCon-Tucker, full diff) read into exact LoRA forms.

Synthetic files follow the published key schemes (kohya ``lora_unet_`` / ``lora_te_`` names,
LyCORIS suffixes, the wrapper's ``lycoris_`` prefix); every update is checked against numpy
computed from LyCORIS's definitions (tests/formats/_lycoris_ref.py), never against lorakit.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.adapter import ModuleKind
from lorakit.errors import (
    ConfigMismatchError,
    NonFiniteError,
    ShapeMismatchError,
    UnknownLayoutError,
    UnsupportedVariantError,
)
from lorakit.formats.lycoris import conv_kernel, module_from_group
from lorakit.lowrank import RankPolicy

from . import _lycoris_ref as ref

TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"  # a 3x3 conv by its kohya name
OUT, IN = 24, 40  # linear test shape
CO, CI, K = 8, 6, (3, 3)  # conv test shape


def rnd(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed * 7919 + sum(shape))
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def alpha(v):
    return torch.tensor(float(v))


# name -> (kohya stem, {suffix: tensor}, base weight shape)
CASES = {
    "loha": (TE, {"hada_w1_a": rnd(OUT, 4), "hada_w1_b": rnd(4, IN, seed=1),
                  "hada_w2_a": rnd(OUT, 4, seed=2), "hada_w2_b": rnd(4, IN, seed=3),
                  "alpha": alpha(2)}, (OUT, IN)),
    "loha_dense_form": (TE, {"hada_w1_a": rnd(OUT, 8), "hada_w1_b": rnd(8, IN, seed=1),
                             "hada_w2_a": rnd(OUT, 8, seed=2), "hada_w2_b": rnd(8, IN, seed=3),
                             "alpha": alpha(8)}, (OUT, IN)),
    "loha_conv_2d_product": (CONV, {"hada_w1_a": rnd(CO, 2), "hada_w1_b": rnd(2, CI * 9, seed=1),
                                    "hada_w2_a": rnd(CO, 2, seed=2),
                                    "hada_w2_b": rnd(2, CI * 9, seed=3), "alpha": alpha(1)},
                             (CO, CI, *K)),
    "loha_conv_4d": (CONV, {"hada_w1_a": rnd(CO, 2, 1, 1), "hada_w1_b": rnd(2, CI, *K, seed=1),
                            "hada_w2_a": rnd(CO, 2, 1, 1, seed=2),
                            "hada_w2_b": rnd(2, CI, *K, seed=3)}, (CO, CI, *K)),
    "loha_tucker": (CONV, {"hada_t1": rnd(2, 2, *K), "hada_w1_a": rnd(2, CO, seed=1),
                           "hada_w1_b": rnd(2, CI, seed=2), "hada_t2": rnd(2, 2, *K, seed=3),
                           "hada_w2_a": rnd(2, CO, seed=4), "hada_w2_b": rnd(2, CI, seed=5),
                           "alpha": alpha(3)}, (CO, CI, *K)),
    "lokr_both_factored": (TE, {"lokr_w1_a": rnd(4, 2), "lokr_w1_b": rnd(2, 5, seed=1),
                                "lokr_w2_a": rnd(6, 2, seed=2), "lokr_w2_b": rnd(2, 8, seed=3),
                                "alpha": alpha(1)}, (OUT, IN)),
    "lokr_w1_larger": (TE, {"lokr_w1_a": rnd(8, 2), "lokr_w1_b": rnd(2, 10, seed=1),
                            "lokr_w2_a": rnd(3, 2, seed=2), "lokr_w2_b": rnd(2, 4, seed=3),
                            "alpha": alpha(4)}, (OUT, IN)),
    "lokr_w1_full": (TE, {"lokr_w1": rnd(4, 5), "lokr_w2_a": rnd(6, 2, seed=2),
                          "lokr_w2_b": rnd(2, 8, seed=3), "alpha": alpha(3)}, (OUT, IN)),
    "lokr_w2_full": (TE, {"lokr_w1_a": rnd(4, 2), "lokr_w1_b": rnd(2, 5, seed=1),
                          "lokr_w2": rnd(6, 8, seed=2), "alpha": alpha(3)}, (OUT, IN)),
    "lokr_both_full": (TE, {"lokr_w1": rnd(4, 5), "lokr_w2": rnd(6, 8, seed=2),
                            "alpha": alpha(7)}, (OUT, IN)),  # scale 1: alpha has no effect
    "lokr_no_alpha": (TE, {"lokr_w1": rnd(2, 2), "lokr_w2_a": rnd(12, 2, seed=2),
                           "lokr_w2_b": rnd(2, 20, seed=3)}, (OUT, IN)),
    "lokr_conv_2d_product": (CONV, {"lokr_w1_a": rnd(2, 1), "lokr_w1_b": rnd(1, 6, seed=1),
                                    "lokr_w2_a": rnd(4, 1, seed=2), "lokr_w2_b": rnd(1, 9, seed=3),
                                    "alpha": alpha(1)}, (CO, CI, *K)),
    "lokr_conv_w2_4d": (CONV, {"lokr_w1": rnd(2, 2), "lokr_w2": rnd(4, 3, *K, seed=1)},
                        (CO, CI, *K)),
    "lokr_conv_w2b_4d": (CONV, {"lokr_w1": rnd(2, 2), "lokr_w2_a": rnd(4, 2, seed=1),
                                "lokr_w2_b": rnd(2, 3, *K, seed=2), "alpha": alpha(5)},
                         (CO, CI, *K)),
    "lokr_tucker": (CONV, {"lokr_w1": rnd(2, 2), "lokr_w2_a": rnd(2, 4, seed=1),
                           "lokr_w2_b": rnd(2, 3, seed=2), "lokr_t2": rnd(2, 2, *K, seed=3),
                           "alpha": alpha(1)}, (CO, CI, *K)),
    "locon_tucker": (CONV, {"lora_down.weight": rnd(4, CI, 1, 1), "lora_mid.weight": rnd(4, 4, *K),
                            "lora_up.weight": rnd(CO, 4, 1, 1, seed=2), "alpha": alpha(2)},
                     (CO, CI, *K)),
    "diff": (TE, {"diff": rnd(OUT, IN), "diff_b": rnd(OUT, seed=1)}, (OUT, IN)),
    "diff_conv": (CONV, {"diff": rnd(CO, CI, *K)}, (CO, CI, *K)),
    "lycoris_prefix": ("lycoris_model_layers_0_self_attn_q_proj",
                       {"lokr_w1": rnd(4, 5), "lokr_w2_a": rnd(6, 1, seed=2),
                        "lokr_w2_b": rnd(1, 8, seed=3), "alpha": alpha(1)}, (OUT, IN)),
    "lokr_fp16": (TE, {k: v.half() for k, v in {
        "lokr_w1_a": rnd(4, 2), "lokr_w1_b": rnd(2, 5, seed=1), "lokr_w2_a": rnd(6, 2, seed=2),
        "lokr_w2_b": rnd(2, 8, seed=3), "alpha": alpha(2)}.items()}, (OUT, IN)),
    "loha_bf16": (TE, {k: v.bfloat16() for k, v in {
        "hada_w1_a": rnd(OUT, 3), "hada_w1_b": rnd(3, IN, seed=1), "hada_w2_a": rnd(OUT, 3, seed=2),
        "hada_w2_b": rnd(3, IN, seed=3), "alpha": alpha(3)}.items()}, (OUT, IN)),
}


def write(path, modules: dict[str, dict[str, torch.Tensor]], meta=None):
    save_file({f"{stem}.{s}": t.contiguous() for stem, g in modules.items() for s, t in g.items()},
              str(path), metadata=meta)
    return path


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def origin_of(g: dict) -> str:
    if "hada_w1_a" in g:
        return "loha-tucker" if "hada_t1" in g else "loha"
    if "diff" in g:
        return "diff"
    if "lora_mid.weight" in g:
        return "locon-tucker"
    return "lokr-tucker" if "lokr_t2" in g else "lokr"


def key_of(a, stem):
    """The adapter key of a kohya stem (the one module of a one-module file)."""
    assert len(a.modules) == 1, list(a.modules)
    return next(iter(a.modules))


@pytest.mark.parametrize("case", list(CASES))
def test_exact_form_equals_lycoris_definition(tmp_path, case):
    stem, g, shape = CASES[case]
    a = lorakit.load(write(tmp_path / "l.safetensors", {stem: g}))
    assert a.layout == "lycoris" and a.source_format == "kohya"
    m = a.modules[key_of(a, stem)]
    want = ref.delta(g, shape)
    got = m.delta(torch.float64).numpy()
    assert got.shape == shape  # the conv kernel is restored
    assert rel(got, want) < 1e-6, case
    assert m.kind is (ModuleKind.CONV if len(shape) == 4 else ModuleKind.LINEAR)
    assert m.origin == origin_of(g)
    file_dtype = next(t.dtype for s, t in g.items() if s != "alpha")
    assert m.dtype == file_dtype  # outputs default to the file's dtype
    if "diff_b" in g:
        assert torch.equal(m.bias, g["diff_b"]) and m.scale == 1.0


def test_form_ranks_are_the_smaller_exact_forms(tmp_path):
    ranks = {}
    for case in ("loha", "loha_dense_form", "lokr_both_factored", "lokr_w1_full", "lokr_w2_full",
                 "lokr_both_full", "lokr_tucker", "locon_tucker", "diff"):
        stem, g, _ = CASES[case]
        ranks[case] = module_from_group(stem, g, "x.safetensors", kernel=conv_kernel(stem, {})).rank
    assert ranks == {
        "loha": 16,  # r1 * r2 (face-splitting)
        "loha_dense_form": OUT,  # 64 > min(24, 40): the dense form
        "lokr_both_factored": 4,  # kron(w1a, w2a) @ kron(w1b, w2b): 2 * 2
        "lokr_w1_full": 8,  # kron(w1, w2a) @ kron(I, w2b): min(4, 5) * 2
        "lokr_w2_full": 12,  # kron(w1a, I) @ kron(w1b, w2): 2 * min(6, 8)
        "lokr_both_full": 24,  # min(4, 5) * min(6, 8): kron(I_4, I_6) @ kron(w1, w2), dense
        "lokr_tucker": 4,  # min(2, 2) * 2
        "locon_tucker": 4,
        "diff": OUT,
    }


def test_true_rank_in_inspect(tmp_path):
    """LoHa with w2 = w1: (PQ) * (PQ) has rank r(r+1)/2 = 10 < the form's r^2 = 16."""
    p, q = rnd(OUT, 4), rnd(4, IN, seed=1)
    g = {"hada_w1_a": p, "hada_w1_b": q, "hada_w2_a": p.clone(), "hada_w2_b": q.clone()}
    f = write(tmp_path / "l.safetensors", {TE: g, CONV: CASES["lokr_tucker"][1]})
    from lorakit.inspect import inspect_adapter

    info = inspect_adapter(lorakit.load(f))
    mods = {m["key"]: m for m in info["modules"]}
    te = mods["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"]
    assert (te["lycoris_type"], te["rank"], te["effective_rank"]) == ("loha", 16, 10)
    assert te["effective_rank"] == np.linalg.matrix_rank(ref.delta(g, (OUT, IN)))
    s = np.linalg.svd(ref.delta(g, (OUT, IN)), compute_uv=False)
    assert np.allclose(te["singular_values"][:10], s[:10], rtol=1e-6)
    conv = mods["unet.down_blocks.0.resnets.0.conv1"]
    assert conv["lycoris_type"] == "lokr-tucker" and conv["shape"] == [CO, CI, *K]
    assert info["lycoris_types"] == ["loha", "lokr-tucker"]
    out = subprocess.run([sys.executable, "-m", "lorakit.cli", "inspect", str(f)],
                         capture_output=True, text=True, env={"COLUMNS": "200", "PATH": ""},
                         check=True).stdout
    assert "LyCORIS types" in out and "loha" in out and "type" in out


@pytest.mark.parametrize("case", ["loha", "lokr_both_factored", "lokr_w2_full", "lokr_tucker",
                                  "loha_tucker", "locon_tucker", "diff_conv", "lokr_fp16"])
def test_fixed_rank_truncation_reaches_eckart_young(tmp_path, case):
    stem, g, shape = CASES[case]
    a = lorakit.load(write(tmp_path / "l.safetensors", {stem: g}))
    k = 3
    small, _ = lorakit.resize(a, RankPolicy.fixed(k))
    m = next(iter(small.modules.values()))
    assert m.rank == k
    d = ref.delta(g, shape)
    dk, err = ref.truncated(d, k)
    got = m.delta(torch.float64).numpy().reshape(d.shape[0], -1)
    got_err = float(np.linalg.norm(d.reshape(d.shape[0], -1) - got))
    tol = 1e-3 if case == "lokr_fp16" else 1e-6  # fp16 output: the written factors round
    assert abs(got_err / err - 1) < tol, (got_err, err)
    assert rel(got, dk) < (1e-2 if case == "lokr_fp16" else 1e-6)


def _cli(*args):
    r = subprocess.run([sys.executable, "-m", "lorakit.cli", *args], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    return r


def _shifted(group):
    return {k: v if k == "alpha" else v * 0.5 + 0.1 for k, v in group.items()}


# per kind: file A's (linear, conv) modules and file B's
CLI_KINDS = {
    "loha": (("loha", "loha_tucker"), ("loha*", "loha_conv_2d_product")),
    "lokr": (("lokr_both_factored", "lokr_tucker"), ("lokr_w2_full", "lokr_conv_2d_product")),
    # LoCon-Tucker is a conv form: the linear module beside it is a plain kohya LoRA pair
    "locon_tucker": (("plain", "locon_tucker"), ("plain*", "locon_tucker*")),
}
PLAIN = {"lora_down.weight": rnd(3, IN, seed=11), "lora_up.weight": rnd(OUT, 3, seed=12),
         "alpha": alpha(3)}


def _group(name):
    shifted = name.endswith("*")
    name = name.rstrip("*")
    g = PLAIN if name == "plain" else CASES[name][1]
    return _shifted(g) if shifted else g


def optimal(e: float, err: float, d: np.ndarray) -> bool:
    """The error ``e`` is the Eckart-Young optimum ``err`` (rel 1e-6), up to the float32 rounding
    of the written factors where the optimum is 0 (the update's rank is within the target)."""
    return abs(e - err) <= 1e-6 * err + 1e-6 * float(np.linalg.norm(d))


@pytest.mark.parametrize("kind", list(CLI_KINDS))
def test_cli_resize_and_svd_merge_on_lycoris_files(tmp_path, kind):
    (a_lin, a_conv), (b_lin, b_conv) = CLI_KINDS[kind]
    mods_a = {TE: _group(a_lin), CONV: _group(a_conv)}
    mods_b = {TE: _group(b_lin), CONV: _group(b_conv)}
    fa, fb = write(tmp_path / "a.safetensors", mods_a), write(tmp_path / "b.safetensors", mods_b)
    shapes = {TE: (OUT, IN), CONV: (CO, CI, *K)}
    keys = {TE: "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
            CONV: "unet.down_blocks.0.resnets.0.conv1"}
    _cli("resize", str(fa), "--rank", "3", "-o", str(tmp_path / "r.safetensors"), "--quiet")
    r = lorakit.load(tmp_path / "r.safetensors")
    assert r.layout == "kohya"  # written back as plain kohya LoRA pairs
    for stem, shape in shapes.items():
        d = ref.delta(mods_a[stem], shape)
        dk, err = ref.truncated(d, 3)
        got = r.modules[keys[stem]].delta(torch.float64).numpy()
        assert got.shape == shape
        e = float(np.linalg.norm(d.reshape(shape[0], -1) - got.reshape(shape[0], -1)))
        assert optimal(e, err, d), (stem, e, err)
    _cli("merge", str(fa), str(fb), "--method", "svd", "--weights", "1,-0.5", "--rank", "6",
         "-o", str(tmp_path / "m.safetensors"), "--quiet")
    mg = lorakit.load(tmp_path / "m.safetensors")
    for stem, shape in shapes.items():
        d = ref.delta(mods_a[stem], shape) - 0.5 * ref.delta(mods_b[stem], shape)
        dk, err = ref.truncated(d, 6)
        got = mg.modules[keys[stem]].delta(torch.float64).numpy().reshape(shape[0], -1)
        e = float(np.linalg.norm(d.reshape(shape[0], -1) - got))
        assert optimal(e, err, d), (stem, e, err)
        assert rel(got, dk) < 1e-6


def test_convert_to_lora_formats_is_exact(tmp_path):
    mods = {TE: CASES["lokr_w1_full"][1], CONV: CASES["lokr_conv_2d_product"][1],
            "lora_unet_mid_block_attentions_0_proj_out": {  # a plain LoRA module beside them
                "lora_down.weight": rnd(2, 16), "lora_up.weight": rnd(16, 2, seed=1),
                "alpha": alpha(1)}}
    meta = {"ss_network_module": "lycoris.kohya",
            "ss_network_args": json.dumps({"algo": "lokr", "conv_dim": "4"}), "ss_v2": "False"}
    a = lorakit.load(write(tmp_path / "l.safetensors", mods, meta))
    kf = lorakit.save(a, tmp_path / "k.safetensors", "kohya")
    with open(kf, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        meta_out = json.loads(fh.read(n))["__metadata__"]
    assert meta_out["ss_network_module"] == "networks.lora"
    assert "algo" not in meta_out.get("ss_network_args", "")
    assert meta_out["lorakit.lycoris_network_module"] == "lycoris.kohya"
    keys = set(load_file(str(kf)))
    assert all(k.rsplit(".", 2)[-2] in ("lora_down", "lora_up") or k.endswith(".alpha")
               for k in keys)
    for fmt in ("kohya", "diffusers", "peft"):
        src = a if fmt != "peft" else lorakit.formats.convert(a, "peft", component="unet")
        out = lorakit.save(src, tmp_path / f"o_{fmt}", fmt)
        b = lorakit.load(out)
        for k, m in src.modules.items():
            assert torch.allclose(b.modules[k].delta(torch.float64), m.delta(torch.float64),
                                  rtol=0, atol=1e-12), (fmt, k)
    proj = a.modules["unet.mid_block.attentions.0.proj_out"]
    assert proj.kind is ModuleKind.LINEAR and proj.origin is None


def test_conv_kernel_rule():
    sd1 = {"ss_v2": "False"}
    assert conv_kernel("lora_unet_up_blocks_1_resnets_2_conv2", {}) == (3, 3)
    assert conv_kernel("lora_unet_down_blocks_1_downsamplers_0_conv", {}) == (3, 3)
    assert conv_kernel("lora_unet_conv_in", {}) == (3, 3)
    assert conv_kernel("lora_unet_up_blocks_1_resnets_0_conv_shortcut", {}) == (1, 1)
    assert conv_kernel("lora_unet_up_blocks_1_attentions_0_proj_in", sd1) == (1, 1)
    sdxl = {"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False"}
    assert conv_kernel("lora_unet_up_blocks_1_attentions_0_proj_in", sdxl) is None
    assert conv_kernel("lora_unet_down_blocks_0_resnets_0_time_emb_proj", sd1) is None
    assert conv_kernel("lora_te_text_model_encoder_layers_0_mlp_fc1", sd1) is None


def test_dora_scale_on_a_lokr_module(tmp_path):
    stem, g, shape = CASES["lokr_both_factored"]
    out_axis = dict(g, dora_scale=rnd(OUT, 1, seed=9).abs())
    a = lorakit.load(write(tmp_path / "o.safetensors", {stem: out_axis}))
    m = next(iter(a.modules.values()))
    assert m.magnitude_axis.value == "out" and a.is_dora
    assert rel(m.delta(torch.float64).numpy(), ref.delta(g, shape)) < 1e-6


# ---- named errors -------------------------------------------------------------------------------


def test_unknown_key_in_a_lycoris_file_is_named(tmp_path):
    mods = {TE: dict(CASES["loha"][1]), CONV: dict(CASES["lokr_tucker"][1])}
    mods[CONV]["lokr_w3"] = rnd(2, 2)
    f = write(tmp_path / "l.safetensors", mods)
    with pytest.raises(UnknownLayoutError) as e:
        lorakit.load(f)
    assert e.value.key == f"{CONV}.lokr_w3" and "l.safetensors" in str(e.value)
    r = subprocess.run([sys.executable, "-m", "lorakit.cli", "inspect", str(f)],
                       capture_output=True, text=True)
    assert r.returncode != 0 and f"{CONV}.lokr_w3" in r.stderr and len(
        r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("name, tensors, err, words", [
    ("ranks_differ", {"lokr_w1_a": rnd(4, 2), "lokr_w1_b": rnd(2, 5), "lokr_w2_a": rnd(6, 3),
                      "lokr_w2_b": rnd(3, 8)}, UnsupportedVariantError, ["inner ranks", "lokr_w2_b"]),
    ("lokr_t1", {"lokr_w1": rnd(2, 2), "lokr_t1": rnd(2, 2, 3, 3), "lokr_w2": rnd(2, 2)},
     UnsupportedVariantError, ["lokr_t1"]),
    ("alpha_zero", {"lokr_w1_a": rnd(4, 2), "lokr_w1_b": rnd(2, 5), "lokr_w2": rnd(6, 8),
                    "alpha": alpha(0)}, ConfigMismatchError, ["alpha is 0", ".alpha"]),
    ("w1_twice", {"lokr_w1": rnd(4, 5), "lokr_w1_a": rnd(4, 2), "lokr_w1_b": rnd(2, 5),
                  "lokr_w2": rnd(6, 8)}, ConfigMismatchError, ["both full and factored"]),
    ("missing", {"hada_w1_a": rnd(4, 2), "hada_w1_b": rnd(2, 5), "hada_w2_a": rnd(4, 2)},
     ConfigMismatchError, ["hada_w2_b is missing"]),
    ("loha_shapes", {"hada_w1_a": rnd(4, 2), "hada_w1_b": rnd(2, 5), "hada_w2_a": rnd(4, 2),
                     "hada_w2_b": rnd(2, 6)}, ShapeMismatchError, ["differ in shape"]),
    ("tucker_half", {"hada_w1_a": rnd(2, 4), "hada_w1_b": rnd(2, 5), "hada_w2_a": rnd(2, 4),
                     "hada_w2_b": rnd(2, 5), "hada_t1": rnd(2, 2, 3, 3)}, ConfigMismatchError,
     ["hada_t1 and hada_t2"]),
    ("mixed", {"lora_down.weight": rnd(2, 5), "lora_up.weight": rnd(4, 2),
               "hada_w1_a": rnd(4, 2)}, UnsupportedVariantError, ["mixes LoHa and LoRA",
                                                                  ".hada_w1_a"]),
    ("diff_alpha", {"diff": rnd(4, 5), "alpha": alpha(1)}, ConfigMismatchError, ["alpha beside"]),
    ("glora", {"a1.weight": rnd(2, 5), "a2.weight": rnd(4, 2)}, UnsupportedVariantError,
     ["GLoRA"]),
    ("oft", {"oft_blocks": rnd(2, 2, 2), "alpha": alpha(1)}, UnsupportedVariantError, ["OFT"]),
    ("ia3", {"weight": rnd(4), "on_input": torch.tensor(True)}, UnsupportedVariantError, ["IA3"]),
    ("norm", {"w_norm": rnd(4), "b_norm": rnd(4)}, UnsupportedVariantError, ["norm layer"]),
    ("left_kernel", {"hada_w1_a": rnd(4, 2, 3, 3), "hada_w1_b": rnd(2, 5),
                     "hada_w2_a": rnd(4, 2), "hada_w2_b": rnd(2, 5)}, ShapeMismatchError,
     ["must end in 1x1", ".hada_w1_a"]),
    ("conv_kernel", {"lokr_w1": rnd(2, 2), "lokr_w2_a": rnd(4, 1), "lokr_w2_b": rnd(1, 10)},
     ShapeMismatchError, ["3x3 kernel"]),
    ("nan", {"lokr_w1": rnd(2, 2), "lokr_w2_a": torch.full((4, 1), float("nan")),
             "lokr_w2_b": rnd(1, 9)}, NonFiniteError, [".lokr_w2_a", "NaN"]),
])
def test_lycoris_errors_are_named(tmp_path, name, tensors, err, words):
    stem = CONV if name in ("conv_kernel", "nan") else TE
    f = write(tmp_path / f"{name}.safetensors", {stem: tensors})
    with pytest.raises(err) as e:
        lorakit.load(f)
    msg = str(e.value)
    assert f"{name}.safetensors" in msg and stem in msg, msg
    for w in words:
        assert w in msg, msg


def test_lycoris_inputs_are_not_modified(tmp_path):
    f = write(tmp_path / "l.safetensors", {TE: CASES["loha"][1]})
    before = f.read_bytes()
    lorakit.save(lorakit.load(f), tmp_path / "o.safetensors", "kohya")
    assert f.read_bytes() == before


def test_peft_applies_the_exact_forms(tmp_path):
    """PEFT as the client: LoHa (linear) and Tucker LoKr (3x3 conv) files written as PEFT change a
    model's outputs by exactly the LyCORIS updates (numpy, from the definitions)."""
    peft = pytest.importorskip("peft")

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.q = torch.nn.Linear(IN, OUT)
            self.conv = torch.nn.Conv2d(CI, CO, 3, padding=1)

    mods = {"lycoris_q": CASES["loha"][1], "lycoris_conv": CASES["lokr_tucker"][1]}
    a = lorakit.load(write(tmp_path / "l.safetensors", mods))
    assert set(a.modules) == {"q", "conv"}
    out = lorakit.save(a, tmp_path / "peft", "peft")
    model = peft.PeftModel.from_pretrained(Tiny(), str(out)).eval()
    base = Tiny().eval()
    g = torch.Generator().manual_seed(4)
    x, img = torch.randn(3, IN, generator=g), torch.randn(2, CI, 5, 5, generator=g)
    dq = torch.from_numpy(ref.delta(mods["lycoris_q"], (OUT, IN))).float()
    dc = torch.from_numpy(ref.delta(mods["lycoris_conv"], (CO, CI, *K))).float()
    with torch.no_grad():
        got_q = model.base_model.model.q(x)
        got_c = model.base_model.model.conv(img)
        want_q = base.q(x) + x @ dq.T
        want_c = base.conv(img) + torch.nn.functional.conv2d(img, dc, padding=1)
    assert torch.allclose(got_q, want_q, rtol=1e-5, atol=1e-5)
    assert torch.allclose(got_c, want_c, rtol=1e-5, atol=1e-5)
