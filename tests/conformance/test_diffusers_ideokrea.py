"""diffusers 0.42 as the real client for Ideogram 4 and Krea 2, lorakit reading: files built here
by hand from the published key schemes (no lorakit) are applied by diffusers' own
``lora_state_dict`` + ``load_lora_into_transformer``, and lorakit reads the same updates. The
writing direction is in ``test_diffusers_clients.WRITE_CASES``.

Limits of diffusers 0.42 asserted here (so that a fix upstream shows up): its Ideogram 4 reader of
original names maps only the layers' modules (a top-level module such as ``input_proj`` or
``final_layer.linear`` makes it fail) and takes a ``conditional_transformer.`` file for a
diffusers one unless it holds a fused ``attention.qkv`` (nothing is applied, a warning). Its
Krea 2 reader takes ``lora_A``/``lora_B`` only: an ``.alpha`` or a ``lora_down``/``lora_up`` file
fails, and so does a module it cannot map (it never drops one silently); lorakit reads alphas and
``lora_down`` and writes Krea 2 ComfyUI files as ``lora_A``/``lora_B`` with scales folded.
"""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import lorakit  # noqa: E402
from lorakit.errors import UnknownLayoutError  # noqa: E402
from lorakit.formats import adapter_family  # noqa: E402
from lorakit.formats.rename import to_naming  # noqa: E402
from tests.conformance import _diffusion as D  # noqa: E402
from tests.conformance.test_diffusers_clients import RTOL, _delta, build, judge  # noqa: E402

pytestmark = pytest.mark.conformance


def _rand(g, *shape):
    return torch.randn(*shape, generator=g)


def _pair(out, stem, o, i, g, spelling, alpha):
    down, up = ("lora_down", "lora_up") if spelling == "kohya" else ("lora_A", "lora_B")
    out[f"{stem}.{down}.weight"] = _rand(g, 2, i)
    out[f"{stem}.{up}.weight"] = _rand(g, o, 2)
    if alpha is not None:
        out[f"{stem}.alpha"] = torch.tensor(float(alpha))


def ideogram4_state(model, g, *, prefix="diffusion_model.", spelling="kohya", alpha=3.0,
                    top=False) -> dict[str, torch.Tensor]:
    """An original-names Ideogram 4 file: every layer module under its original name, q, k, v
    fused into ``attention.qkv`` (rows q | k | v), ``attention.o`` for ``to_out.0``; the
    top-level modules only with ``top``."""
    out: dict[str, torch.Tensor] = {}
    lin = D.linears(model)
    for name, (o, i) in lin.items():
        if not name.startswith("layers.") and not top:
            continue
        native = name.replace("attention.to_out.0", "attention.o")
        if m := re.match(r"^(.*)\.attention\.to_([qkv])$", name):
            if m[2] != "q":
                continue
            native = f"{m[1]}.attention.qkv"
            o = sum(lin[f"{m[1]}.attention.to_{c}"][0] for c in "qkv")
        _pair(out, prefix + native, o, i, g, spelling, alpha)
    return out


# diffusers' Krea 2 names -> the original checkpoint's, written out from krea-ai/krea-2's scheme
_KREA2_TOP = {"img_in": "first", "time_embed.linear_1": "tmlp.0", "time_embed.linear_2": "tmlp.2",
              "time_mod_proj": "tproj.1", "txt_in.linear_1": "txtmlp.1",
              "txt_in.linear_2": "txtmlp.3", "text_fusion.projector": "txtfusion.projector",
              "final_layer.linear": "last.linear"}
_KREA2_SUB = {"attn.to_q": "attn.wq", "attn.to_k": "attn.wk", "attn.to_v": "attn.wv",
              "attn.to_out.0": "attn.wo", "attn.to_gate": "attn.gate", "ff.gate": "mlp.gate",
              "ff.up": "mlp.up", "ff.down": "mlp.down"}


def krea2_original(name: str) -> str:
    if name in _KREA2_TOP:
        return _KREA2_TOP[name]
    m = re.match(r"^(transformer_blocks|text_fusion\.(?:layerwise|refiner)_blocks)\.(\d+)\.(.+)$",
                 name)
    block = {"transformer_blocks": "blocks"}.get(m[1], m[1].replace("text_fusion.", "txtfusion."))
    return f"{block}.{m[2]}.{_KREA2_SUB[m[3]]}"


def krea2_state(model, g, *, prefix="diffusion_model.", spelling="ab",
                alpha=None) -> dict[str, torch.Tensor]:
    """An original-names Krea 2 file (reference trainer / ComfyUI ``diffusion_model.``, ai-toolkit
    ``base_model.model.``): every Linear layer, ``lora_A``/``lora_B``, no alphas."""
    out: dict[str, torch.Tensor] = {}
    for name, (o, i) in D.linears(model).items():
        _pair(out, prefix + krea2_original(name), o, i, g, spelling, alpha)
    return out


READ_CASES = {  # name: (family, model builder, state builder)
    "ideogram4-comfyui": ("ideogram4", D.ideogram4, lambda m, g: ideogram4_state(m, g)),
    "ideogram4-aitoolkit": ("ideogram4", D.ideogram4,
                            lambda m, g: ideogram4_state(m, g, spelling="ab", alpha=None)),
    "ideogram4-conditional": ("ideogram4", D.ideogram4, lambda m, g: ideogram4_state(
        m, g, prefix="conditional_transformer.", spelling="ab", alpha=1.0)),
    "krea2-comfyui": ("krea2", D.krea2, lambda m, g: krea2_state(m, g)),
    "krea2-aitoolkit": ("krea2", D.krea2,
                        lambda m, g: krea2_state(m, g, prefix="base_model.model.")),
}


@pytest.mark.parametrize("case", list(READ_CASES))
def test_lorakit_reads_what_diffusers_applies(case, tmp_path):
    family, make_model, make_state = READ_CASES[case]
    model = make_model()
    file = tmp_path / f"{case}.safetensors"
    save_file(make_state(model, torch.Generator().manual_seed(1)), str(file))
    D.diffusers_load(family, file, {"transformer": model})
    got = D.applied(model)
    a = lorakit.load(file)
    assert adapter_family(a).name == family
    mine = {k[len("transformer."):]: _delta(m)
            for k, m in to_naming(a, adapter_family(a), "diffusers").modules.items()}
    assert set(mine) == set(got) and got, sorted(set(mine) ^ set(got))[:4]
    for k, ref in got.items():
        assert float((mine[k] - ref).norm() / ref.norm()) < RTOL, k


def _lorakit_matches(file, want: dict[str, torch.Tensor]) -> None:
    a = lorakit.load(file)
    mine = {k[len("transformer."):]: _delta(m)
            for k, m in to_naming(a, adapter_family(a), "diffusers").modules.items()}
    assert set(mine) == set(want)
    for k, ref in want.items():
        assert float((mine[k] - ref).norm() / ref.norm()) < RTOL, k


def test_ideogram4_limits_of_diffusers(tmp_path):
    """diffusers 0.42's Ideogram 4 reader fails on a top-level module of an original-names file
    and applies nothing of a ``conditional_transformer.`` file without a fused qkv; lorakit
    reads both exactly (and its own ComfyUI file with top-level modules)."""
    g = torch.Generator().manual_seed(2)
    file = tmp_path / "top.safetensors"
    save_file(ideogram4_state(D.ideogram4(), g, top=True), str(file))
    with pytest.raises(ValueError, match="unsupported Ideogram4"):
        D.diffusers_load("ideogram4", file, {"transformer": D.ideogram4()})
    assert "transformer.input_proj" in lorakit.load(file).modules
    ms = {"transformer": D.ideogram4()}
    src = build(ms)  # lorakit's ComfyUI file of every layer: diffusers fails on it as well
    mine = lorakit.save(src, tmp_path / "mine.safetensors", "bfl")
    with pytest.raises(ValueError, match="unsupported Ideogram4"):
        D.diffusers_load("ideogram4", mine, {"transformer": D.ideogram4()})
    _lorakit_matches(mine, {k[len("transformer."):]: _delta(m) for k, m in src.modules.items()})
    cond = {k: v for k, v in ideogram4_state(D.ideogram4(), g, prefix="conditional_transformer.",
                                             spelling="ab", alpha=None).items()
            if ".attention.qkv." not in k}
    file = tmp_path / "cond.safetensors"
    save_file(cond, str(file))
    model = D.ideogram4()
    D.diffusers_load("ideogram4", file, {"transformer": model})
    assert D.applied(model) == {}  # read as a diffusers file: no transformer. key, nothing applied
    assert adapter_family(lorakit.load(file)).name == "ideogram4"
    want = {}
    for k, b in cond.items():
        if k.endswith(".lora_B.weight"):
            stem = k[len("conditional_transformer."):-len(".lora_B.weight")]
            a = cond[k.replace(".lora_B.", ".lora_A.")]
            want[stem.replace("attention.o", "attention.to_out.0")] = b.double() @ a.double()
    _lorakit_matches(file, want)


@pytest.mark.parametrize("variant", ["alpha", "lora_down", "unmapped"])
def test_krea2_limits_of_diffusers(variant, tmp_path):
    """diffusers 0.42's Krea 2 reader fails (ValueError) on an ``.alpha``, on the ``lora_down``/
    ``lora_up`` spelling and on a module it cannot map: it never drops one silently. lorakit
    reads the first two exactly and names the unmapped module."""
    g = torch.Generator().manual_seed(4)
    kw = {"alpha": {"alpha": 1.0}, "lora_down": {"spelling": "kohya"}, "unmapped": {}}[variant]
    state = krea2_state(D.krea2(), g, **kw)
    if variant == "unmapped":
        state["diffusion_model.blocks.0.attn.wx.lora_A.weight"] = _rand(g, 2, 32)
        state["diffusion_model.blocks.0.attn.wx.lora_B.weight"] = _rand(g, 32, 2)
    file = tmp_path / f"{variant}.safetensors"
    save_file(state, str(file))
    with pytest.raises(ValueError, match="should be empty"):
        D.diffusers_load("krea2", file, {"transformer": D.krea2()})
    if variant == "unmapped":
        with pytest.raises(UnknownLayoutError, match="Krea 2 does not have") as info:
            lorakit.load(file)
        assert info.value.key == "transformer.blocks.0.attn.wx"
        return
    a = lorakit.load(file)
    down, up = ("lora_down", "lora_up") if variant == "lora_down" else ("lora_A", "lora_B")
    scale = 0.5 if variant == "alpha" else 1.0  # alpha 1 over rank 2
    want = {}
    for name in D.linears(D.krea2()):
        stem = f"diffusion_model.{krea2_original(name)}"
        want[name] = scale * state[f"{stem}.{up}.weight"].double() @ \
            state[f"{stem}.{down}.weight"].double()
    assert adapter_family(a).name == "krea2"
    _lorakit_matches(file, want)
    mine = lorakit.save(a, tmp_path / "mine.safetensors", "bfl")  # lora_A/lora_B, scale folded
    model = D.krea2()
    judge("krea2", mine, {"transformer": model}, {("transformer", k): v for k, v in want.items()})
