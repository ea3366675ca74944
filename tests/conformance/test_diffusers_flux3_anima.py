"""diffusers 0.42 as the real client of Flux.3 and Anima files, both directions (as
:mod:`tests.conformance.test_diffusers_clients`): lorakit's diffusers and ComfyUI files load through
``Flux3ModularPipeline`` / ``AnimaModularPipeline``'s ``lora_state_dict`` + ``load_lora_into_*``
with the update equal to lorakit's, and hand-built ComfyUI files (original names, the published
scheme) give lorakit the updates diffusers applies.

Known limits of diffusers 0.42 itself, asserted here: its Flux.3 reader of original names renames
only the blocks (``content_mode_blocks.``, ``single_blocks.``, ``q_proj``...): the top-level
modules (``emb_in.``, ``txt_in``, ``time_in.``, ``ref_time_in.``, ``*_modulations.*.lin``,
``final_layer.image.``) stay unrenamed and are dropped ("unexpected keys", a warning). Its
Flux.3 and Anima readers of ``diffusion_model.`` files take ``lora_A``/``lora_B`` only (a
``lora_down``/``lora_up`` file fails to load) and no alpha (``.alpha`` keys are ignored, every
module applied at scale 1), so lorakit writes both ComfyUI layouts as ``lora_A``/``lora_B``,
scales folded.
"""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import lorakit  # noqa: E402
from lorakit.formats import adapter_family  # noqa: E402
from lorakit.formats.rename import to_naming  # noqa: E402
from tests.conformance import _diffusion as D  # noqa: E402
from tests.conformance.test_diffusers_clients import (  # noqa: E402
    RTOL,
    _delta,
    _rand,
    build,
    expected,
    judge,
)

pytestmark = pytest.mark.conformance

# Flux.3 top-level modules diffusers 0.42 leaves unrenamed in ComfyUI files (dropped)
FLUX3_TOP = ("x_embedders.", "context_embedder", "timestep_embedder.", "target_timestep_embedder.",
             "early_stream_modulations.", "single_stream_modulations.", "proj_out",
             "norm_out.linear")


def _flux3():
    return {"transformer": D.flux3()}


WRITE_CASES = [  # (family, layout, models, dropped by diffusers)
    ("flux3", "diffusers", _flux3, ()),
    ("flux3", "bfl", _flux3, FLUX3_TOP),
    ("anima", "diffusers", D.anima, ()),
    ("anima", "bfl", D.anima, ()),
]


@pytest.mark.parametrize("family,layout,models,dropped", WRITE_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in WRITE_CASES])
def test_diffusers_applies_what_lorakit_writes(family, layout, models, dropped, tmp_path):
    ms = models()
    src = build(ms)
    assert adapter_family(src).name == family
    file = lorakit.save(src, tmp_path / f"{layout}.safetensors", layout)
    judge(family, file, models(), expected(src, ms), dropped)
    back = to_naming(lorakit.load(file), adapter_family(src), "diffusers")
    assert sorted(back.modules) == sorted(src.modules)  # and lorakit reads its own file


_FLUX3_SUBS = {"attn.to_q": "q_proj", "attn.to_k": "k_proj", "attn.to_v": "v_proj",
               "attn.to_out.0": "attn_out", "ff.linear_in": "mlp_in", "ff.linear_out": "mlp_out"}
_FLUX3_TOP = {"x_embedders.image": "emb_in.image", "x_embedders.image_cond": "emb_in.image_cond",
              "context_embedder": "txt_in", "timestep_embedder.linear_1": "time_in.in_layer",
              "timestep_embedder.linear_2": "time_in.out_layer",
              "target_timestep_embedder.linear_1": "ref_time_in.in_layer",
              "target_timestep_embedder.linear_2": "ref_time_in.out_layer",
              "proj_out": "final_layer.image.linear"}


def _flux3_native(name: str) -> str:
    """The original (BFL) name of a Flux.3 diffusers layer, from the published checkpoint scheme."""
    if name in _FLUX3_TOP:
        return _FLUX3_TOP[name]
    if m := re.match(r"^((early|single)_stream_modulations\.\w+)\.linear$", name):
        return f"{m[1]}.lin"
    if name == "norm_out.linear":
        return "final_layer.image.adaLN_modulation.1"
    m = re.match(r"^(mode_blocks\.|txt_mode_blocks\.|single_transformer_blocks\.)(.*\d+)\.(.+)$",
                 name)
    block = {"mode_blocks.": "content_mode_blocks.", "txt_mode_blocks.": "txt_mode_blocks.",
             "single_transformer_blocks.": "single_blocks."}[m[1]]
    return f"{block}{m[2]}.{_FLUX3_SUBS[m[3]]}"


def _flux3_original_state(model, g, top=False) -> dict[str, torch.Tensor]:
    """A ComfyUI Flux.3 file (``diffusion_model.`` + original names + ``lora_A``/``lora_B``, no
    alpha): every block layer, and with ``top`` the top-level layers too."""
    out = {}
    for name, (o, i) in D.linears(model).items():
        if not top and not re.match(r"^(mode_blocks|txt_mode_blocks|single_transformer_blocks)\.",
                                    name):
            continue
        native = _flux3_native(name)
        out[f"diffusion_model.{native}.lora_A.weight"] = _rand(g, 2, i)
        out[f"diffusion_model.{native}.lora_B.weight"] = _rand(g, o, 2)
    return out


_ANIMA_ATTN = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out.0": "output_proj"}
_ANIMA_TOP = {"norm_out.linear_1": "final_layer.adaln_modulation.1",
              "norm_out.linear_2": "final_layer.adaln_modulation.2",
              "proj_out": "final_layer.linear", "patch_embed.proj": "x_embedder.proj.1",
              "time_embed.t_embedder.linear_1": "t_embedder.1.linear_1",
              "time_embed.t_embedder.linear_2": "t_embedder.1.linear_2"}
_ANIMA_NORM = {"1": "self_attn", "2": "cross_attn", "3": "mlp"}


def _anima_native(name: str) -> str:
    """The original name of an Anima transformer layer (Cosmos Predict2's checkpoint scheme)."""
    if name in _ANIMA_TOP:
        return _ANIMA_TOP[name]
    i, sub = re.match(r"^transformer_blocks\.(\d+)\.(.+)$", name).groups()
    if m := re.match(r"^attn([12])\.(.+)$", sub):
        return f"blocks.{i}.{'self_attn' if m[1] == '1' else 'cross_attn'}.{_ANIMA_ATTN[m[2]]}"
    if m := re.match(r"^norm([123])\.linear_([12])$", sub):
        return f"blocks.{i}.adaln_modulation_{_ANIMA_NORM[m[1]]}.{m[2]}"
    return f"blocks.{i}.mlp.{'layer1' if sub == 'ff.net.0.proj' else 'layer2'}"


def _anima_original_state(models, g, style="ab", alpha=None) -> dict[str, torch.Tensor]:
    """A ComfyUI Anima file: every transformer layer under its original name and every LLM
    adapter layer under ``diffusion_model.llm_adapter.``; ``lora_A``/``lora_B`` (``style="ab"``)
    or ``lora_down``/``lora_up``, with ``alpha`` a ``.alpha`` per module (sd-scripts' converter)."""
    d, u = ("lora_A", "lora_B") if style == "ab" else ("lora_down", "lora_up")
    out = {}
    for comp, model in models.items():
        for name, (o, i) in D.linears(model).items():
            native = _anima_native(name) if comp == "transformer" else f"llm_adapter.{name}"
            out[f"diffusion_model.{native}.{d}.weight"] = _rand(g, 2, i)
            out[f"diffusion_model.{native}.{u}.weight"] = _rand(g, o, 2)
            if alpha is not None:
                out[f"diffusion_model.{native}.alpha"] = torch.tensor(float(alpha))
    return out


READ_CASES = {  # name: (family, models, state builder)
    "flux3-comfyui": ("flux3", _flux3, lambda ms, g: _flux3_original_state(ms["transformer"], g)),
    "anima-comfyui": ("anima", D.anima, lambda ms, g: _anima_original_state(ms, g)),
}


def _lorakit_updates(file) -> dict[tuple[str, str], torch.Tensor]:
    a = lorakit.load(file)
    out = {}
    for key, m in to_naming(a, adapter_family(a), "diffusers").modules.items():
        comp, _, path = key.partition(".")
        out[(comp, path)] = _delta(m)
    return out


@pytest.mark.parametrize("case", list(READ_CASES))
def test_lorakit_reads_what_diffusers_applies(case, tmp_path):
    family, models, make = READ_CASES[case]
    ms = models()
    file = tmp_path / f"{case}.safetensors"
    save_file(make(ms, torch.Generator().manual_seed(1)), str(file))
    D.diffusers_load(family, file, ms)
    got = {(comp, n): d for comp, model in ms.items() for n, d in D.applied(model).items()}
    assert adapter_family(lorakit.load(file)).name == family
    mine = _lorakit_updates(file)
    assert set(mine) == set(got) and got, sorted(set(mine) ^ set(got))[:4]
    if family == "anima":
        assert any(c == "text_conditioner" for c, _ in got)  # the LLM adapter is applied too
    for k, ref in got.items():
        err = float((mine[k] - ref).norm() / ref.norm())
        assert err < RTOL, (k, err)


def test_flux3_limits_of_diffusers(tmp_path):
    """diffusers 0.42's Flux.3 reader drops the top-level modules of a ComfyUI file (left
    unrenamed: "unexpected keys"); lorakit reads them all (``final_layer.image.adaLN_modulation.1``
    as ``norm_out.linear`` with shift and scale swapped) and agrees on the blocks."""
    model = D.flux3()
    layers = set(D.linears(model))  # before diffusers injects its LoRA layers
    file = tmp_path / "top.safetensors"
    save_file(_flux3_original_state(model, torch.Generator().manual_seed(2), top=True), str(file))
    D.diffusers_load("flux3", file, {"transformer": model})
    got = D.applied(model)
    mine = _lorakit_updates(file)
    assert set(mine) == {("transformer", n) for n in layers}
    assert {n for _, n in mine if n.startswith(FLUX3_TOP)} and \
        not [n for n in got if n.startswith(FLUX3_TOP)]
    assert set(got) == {n for _, n in mine if not n.startswith(FLUX3_TOP)}
    for n, ref in got.items():
        assert float((mine[("transformer", n)] - ref).norm() / ref.norm()) < RTOL
    # an alpha is ignored (scale 1) and a lora_down/lora_up file fails, as Anima's (below)
    g = torch.Generator().manual_seed(5)
    p = "diffusion_model.single_blocks.0.q_proj"
    t = {f"{p}.lora_A.weight": _rand(g, 2, 16), f"{p}.lora_B.weight": _rand(g, 16, 2),
         f"{p}.alpha": torch.tensor(1.0)}
    save_file(t, str(tmp_path / "alpha.safetensors"))
    model = D.flux3()
    D.diffusers_load("flux3", tmp_path / "alpha.safetensors", {"transformer": model})
    ref = D.applied(model)["single_transformer_blocks.0.attn.to_q"]
    mine = _lorakit_updates(tmp_path / "alpha.safetensors")
    assert float((2 * mine[("transformer", "single_transformer_blocks.0.attn.to_q")] - ref).norm()
                 / ref.norm()) < RTOL
    save_file({k.replace("lora_A", "lora_down").replace("lora_B", "lora_up"): v
               for k, v in t.items()}, str(tmp_path / "down.safetensors"))
    with pytest.raises(Exception):  # noqa: B017 - diffusers' own failure (an IndexError)
        D.diffusers_load("flux3", tmp_path / "down.safetensors", {"transformer": D.flux3()})
    assert len(_lorakit_updates(tmp_path / "down.safetensors")) == 1


def test_anima_limits_of_diffusers(tmp_path):
    """diffusers 0.42's Anima reader ignores ``.alpha`` (every module at scale 1, where
    sd-scripts' ComfyUI files mean ``alpha / r``) and fails on a ``lora_down``/``lora_up`` file;
    lorakit reads both with their alphas."""
    ms = D.anima()
    file = tmp_path / "alpha.safetensors"
    save_file(_anima_original_state(ms, torch.Generator().manual_seed(3), alpha=1.0), str(file))
    D.diffusers_load("anima", file, ms)
    got = {(c, n): d for c, m in ms.items() for n, d in D.applied(m).items()}
    mine = _lorakit_updates(file)  # alpha 1, rank 2: scale 0.5
    assert set(mine) == set(got) and got
    for k, ref in got.items():
        assert float((2 * mine[k] - ref).norm() / ref.norm()) < RTOL, k
    down = tmp_path / "down.safetensors"
    save_file(_anima_original_state(D.anima(), torch.Generator().manual_seed(4), style="du",
                                    alpha=1.0), str(down))
    with pytest.raises(Exception):  # noqa: B017 - diffusers' own failure (an IndexError)
        D.diffusers_load("anima", down, D.anima())
    assert len(_lorakit_updates(down)) == len(got)
