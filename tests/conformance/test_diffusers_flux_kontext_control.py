"""diffusers 0.42 as the real client of two Flux.1 layouts, both directions: fal Kontext
(``base_model.model.`` + BFL names) and BFL's control LoRA (Flux.1 Canny/Depth: bare BFL names,
``lora_B.bias``, norm scales, ``img_in`` widened to 128 channels).

Both of diffusers' readers (``_convert_fal_kontext_lora_to_diffusers``,
``_convert_bfl_flux_control_lora_to_diffusers``) hard-code Flux.1-dev: 19 double and 38 single
blocks at width 3072, every layer of every block present (a missing one is a ``KeyError``), no
alpha and nothing else (a leftover key is a ``ValueError``). So these cases run on Flux.1's real
config without memory (:func:`tests.conformance._diffusion.flux1_full`: stride-0 base weights)
at rank 2, and the applied updates are compared through random probes (``scaling * B @ (A @ X)``,
the full update applied to ``X``, never materialised), with every ``lora_B`` bias and norm scale.

Limits of diffusers asserted here: the fal reader takes no top-level module but
``final_layer.linear`` (``img_in``, ``txt_in``, ... and ``final_layer.adaLN_modulation.1`` are
left over: ``ValueError``), no alpha, and no file that lacks a layer; the control reader swaps
the halves of ``final_layer.adaLN_modulation.1``'s ``lora_A`` rows as well as B's (a wrong update
of ``norm_out.linear``; at rank 1 it fails). The control LoRA's norm scales reach the model only
through ``load_lora_weights`` (which this test follows step by step), which also widens
``x_embedder`` to the LoRA's 128 input channels.
"""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import lorakit  # noqa: E402
from lorakit.formats.families import FLUX1  # noqa: E402
from lorakit.formats.rename import to_naming  # noqa: E402
from tests.conformance import _diffusion as D  # noqa: E402

pytestmark = pytest.mark.conformance
RTOL = 1e-5
H = 3072
NORM_KEYS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")
_DOUBLE = {"img_attn.qkv": (3 * H, H), "img_attn.proj": (H, H), "txt_attn.qkv": (3 * H, H),
           "txt_attn.proj": (H, H), "img_mlp.0": (4 * H, H), "img_mlp.2": (H, 4 * H),
           "txt_mlp.0": (4 * H, H), "txt_mlp.2": (H, 4 * H), "img_mod.lin": (6 * H, H),
           "txt_mod.lin": (6 * H, H)}
_SINGLE = {"linear1": (7 * H, H), "linear2": (H, 5 * H), "modulation.lin": (3 * H, H)}
_CONTROL_TOP = {"img_in": (H, 128), "txt_in": (H, 4096), "time_in.in_layer": (H, 256),
                "time_in.out_layer": (H, H), "vector_in.in_layer": (H, 768),
                "vector_in.out_layer": (H, H), "guidance_in.in_layer": (H, 256),
                "guidance_in.out_layer": (H, H), "final_layer.linear": (64, H),
                "final_layer.adaLN_modulation.1": (2 * H, H)}


def _bfl_modules(top: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    mods = {f"double_blocks.{i}.{k}": s for i in range(19) for k, s in _DOUBLE.items()}
    mods.update({f"single_blocks.{i}.{k}": s for i in range(38) for k, s in _SINGLE.items()})
    mods.update(top)
    return mods


def fal_state(g, r: int = 2) -> dict[str, torch.Tensor]:
    """fal's Kontext trainer file (published scheme): every block layer and
    ``final_layer.linear`` under ``base_model.model.``, no alphas."""
    out = {}
    for name, (o, i) in _bfl_modules({"final_layer.linear": (64, H)}).items():
        out[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, i, generator=g)
        out[f"base_model.model.{name}.lora_B.weight"] = torch.randn(o, r, generator=g)
    return out


def control_state(g, r: int = 2) -> dict[str, torch.Tensor]:
    """BFL's Flux.1 Canny/Depth dev LoRA (published scheme): bare BFL names, a ``lora_B.bias``
    per module, ``img_in`` over 128 channels, the query/key norm scales of every block."""
    out = {}
    for name, (o, i) in _bfl_modules(_CONTROL_TOP).items():
        out[f"{name}.lora_A.weight"] = torch.randn(r, i, generator=g)
        out[f"{name}.lora_B.weight"] = torch.randn(o, r, generator=g)
        out[f"{name}.lora_B.bias"] = torch.randn(o, generator=g)
    for i in range(19):
        for s in ("img", "txt"):
            for q in ("query", "key"):
                out[f"double_blocks.{i}.{s}_attn.norm.{q}_norm.scale"] = torch.randn(128, generator=g)
    for i in range(38):
        for q in ("query", "key"):
            out[f"single_blocks.{i}.norm.{q}_norm.scale"] = torch.randn(128, generator=g)
    return out


def diffusers_load(file, control: bool = False):
    """Flux.1 loaded by FluxPipeline's ``lora_state_dict`` + ``load_lora_into_transformer``;
    for a control LoRA the steps ``load_lora_weights`` adds too (widen ``x_embedder``, pad the
    LoRA, load the norm scales into the transformer)."""
    from diffusers import FluxPipeline

    model = D.flux1_full()
    state, meta = FluxPipeline.lora_state_dict(str(file), return_lora_metadata=True)
    if control:
        lora = {k: v for k, v in state.items() if k.startswith("transformer.") and "lora" in k}
        norms = {k: state.pop(k) for k in list(state) if k.startswith("transformer.")
                 and any(n in k for n in FluxPipeline._control_lora_supported_norm_keys)}
        FluxPipeline._maybe_expand_transformer_param_shape_or_error_(model, lora, norms)
        state.update(FluxPipeline._maybe_expand_lora_state_dict(model, lora))
    FluxPipeline.load_lora_into_transformer(state, None, transformer=model, metadata=meta,
                                            low_cpu_mem_usage=True)
    if control and norms:
        FluxPipeline._load_norm_into_transformer(norms, model)
    return model


def applied(model) -> dict[str, tuple[float, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """``{path: (scaling, A, B, bias)}`` of every LoRA layer diffusers injected."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer) and m.lora_A:
            ad = next(iter(m.lora_A))
            b = m.lora_B[ad]
            out[name] = (m.scaling[ad], m.lora_A[ad].weight.detach(), b.weight.detach(),
                         None if b.bias is None else b.bias.detach())
    return out


def _probe(n: int) -> torch.Tensor:
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(n), dtype=torch.float64)


def _apply(scale: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``scale * B @ (A @ X)``: the full update applied to the probe ``X`` (in, 3)."""
    return scale * (b.double() @ (a.double() @ _probe(a.shape[1])))


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def want_of(adapter) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """lorakit's updates in diffusers names: ``{path: (update on the probe, bias)}``."""
    plain = to_naming(adapter, FLUX1, "diffusers")
    return {k[len("transformer."):]: (_apply(m.scale, m.down, m.up), m.bias)
            for k, m in plain.modules.items()}


def judge(model, want, wrong=()) -> None:
    got = applied(model)
    assert set(got) == set(want), (sorted(set(want) - set(got))[:4],
                                   sorted(set(got) - set(want))[:4])
    for k, (upd, bias) in want.items():
        scale, a, b, b_bias = got[k]
        if k not in wrong:
            assert _rel(_apply(scale, a, b), upd) < RTOL, k
        assert (bias is None) == (b_bias is None), k
        if bias is not None:
            assert _rel(b_bias, bias) < RTOL, k


def _norms_set(model, adapter) -> None:
    """Each norm weight of the model is lorakit's norm scale, bit for bit."""
    plain = to_naming(adapter, FLUX1, "diffusers")
    params = dict(model.named_parameters())
    names = [k for k in params if re.search(r"\.attn\.norm_(q|k|added_q|added_k)\.weight$", k)]
    assert len(names) == 19 * 4 + 38 * 2
    for k in names:
        assert torch.equal(params[k], plain.extras[f"transformer.{k}"]), k


# ------------------------------------------------------------------ diffusers reads, lorakit too

def test_fal_kontext_file_read_by_both(tmp_path):
    file = tmp_path / "fal.safetensors"
    save_file(fal_state(torch.Generator().manual_seed(0)), str(file))
    a = lorakit.load(file)
    assert a.layout == "falkontext" and len(a.modules) == 19 * 10 + 38 * 3 + 1
    judge(diffusers_load(file), want_of(a))


def test_control_lora_file_read_by_both(tmp_path):
    """Every factor, bias and norm scale; ``x_embedder`` widened to 128 inputs. diffusers swaps
    ``final_layer.adaLN_modulation.1``'s A halves too (see the limits test)."""
    file = tmp_path / "control.safetensors"
    save_file(control_state(torch.Generator().manual_seed(1)), str(file))
    a = lorakit.load(file)
    assert a.layout == "bflcontrol" and len(a.extras) == 19 * 4 + 38 * 2
    model = diffusers_load(file, control=True)
    assert model.x_embedder.in_features == 128
    judge(model, want_of(a), wrong=("norm_out.linear",))
    _norms_set(model, a)


def test_control_lora_limit_of_diffusers_final_layer(tmp_path):
    """diffusers swaps the row halves of ``final_layer.adaLN_modulation.1``'s A as well as B's:
    at rank 2 the update it applies is ``B' @ A'`` with A's two rows swapped (wrong); lorakit's is
    right; at rank 1 diffusers fails."""
    g = torch.Generator().manual_seed(2)
    file = tmp_path / "control.safetensors"
    save_file(control_state(g), str(file))
    model = diffusers_load(file, control=True)
    scale, a_got, b_got, _ = applied(model)["norm_out.linear"]
    m = to_naming(lorakit.load(file), FLUX1, "diffusers").modules["transformer.norm_out.linear"]
    assert torch.equal(b_got, m.up)  # B's halves swapped, as they should be
    assert torch.equal(a_got, torch.cat([m.down[1:], m.down[:1]]))  # A's rows swapped too
    assert _rel(_apply(scale, a_got, b_got), _apply(m.scale, m.down, m.up)) > 0.1
    save_file(control_state(g, r=1), str(tmp_path / "r1.safetensors"))
    with pytest.raises(ValueError):
        diffusers_load(tmp_path / "r1.safetensors", control=True)


def test_fal_kontext_limits_of_diffusers(tmp_path):
    """diffusers' fal reader fails on a file without one of its layers, with an alpha or with a
    top-level module other than ``final_layer.linear``; lorakit reads all three."""
    g = torch.Generator().manual_seed(3)
    base = fal_state(g)
    cases = {
        "missing": ({k: v for k, v in base.items() if ".double_blocks.3.txt_mlp.2." not in k},
                    KeyError),
        "alpha": ({**base, "base_model.model.double_blocks.0.img_attn.proj.alpha":
                   torch.tensor(1.0)}, ValueError),
        "top-level": ({**base, "base_model.model.img_in.lora_A.weight": torch.randn(2, 64),
                       "base_model.model.img_in.lora_B.weight": torch.randn(H, 2)}, ValueError),
    }
    for name, (state, error) in cases.items():
        file = tmp_path / f"{name}.safetensors"
        save_file(state, str(file))
        with pytest.raises(error):
            diffusers_load(file)
        a = lorakit.load(file)
        assert a.layout == "falkontext", name
    assert lorakit.load(tmp_path / "alpha.safetensors").modules[
        "transformer.double_blocks.0.img_attn.proj"].scale == 0.5


# ------------------------------------------------------------------ lorakit writes, diffusers reads

def test_diffusers_applies_lorakit_fal_kontext(tmp_path):
    """A diffusers-named adapter (q, k, v with their own A; scale 1.5) over every layer the fal
    reader takes, written as fal Kontext: fused exactly (block-diagonal B), scales folded."""
    model = D.flux1_full()
    g = torch.Generator().manual_seed(4)
    keep = re.compile(r"^(transformer_blocks\.\d+\.(attn\.(to_[qkv]|add_[qkv]_proj|to_out\.0|"
                      r"to_add_out)|ff(_context)?\.net\.(0\.proj|2)|norm1(_context)?\.linear)|"
                      r"single_transformer_blocks\.\d+\.(attn\.to_[qkv]|proj_mlp|proj_out|"
                      r"norm\.linear)|proj_out)$")
    from lorakit.adapter import Adapter, LoraModule

    mods = {f"transformer.{n}": LoraModule(torch.randn(2, i, generator=g),
                                           torch.randn(o, 2, generator=g), alpha=3.0)
            for n, (o, i) in D.linears(model, keep.match).items()}
    src = Adapter(modules=mods, component_prefix=True)
    file = lorakit.save(src, tmp_path / "fal.safetensors", "falkontext")
    assert lorakit.load(file).layout == "falkontext"
    judge(diffusers_load(file), want_of(src))


def test_diffusers_applies_lorakit_control_lora(tmp_path):
    """A control LoRA converted by lorakit to diffusers and back to bflcontrol: both files load
    into diffusers with every factor, bias and norm scale (``x_embedder`` widened)."""
    file = tmp_path / "control.safetensors"
    save_file(control_state(torch.Generator().manual_seed(5)), str(file))
    a = lorakit.load(file)
    d = lorakit.save(a, tmp_path / "d.safetensors", "diffusers")
    c = lorakit.save(lorakit.load(d), tmp_path / "c.safetensors", "bflcontrol")
    for out, control in ((d, True), (c, True)):
        model = diffusers_load(out, control=control)
        assert model.x_embedder.in_features == 128
        # diffusers' bflcontrol reader gets norm_out.linear wrong (its limit); its diffusers
        # reader applies lorakit's (already swapped) module as it is
        judge(model, want_of(a), wrong=("norm_out.linear",) if out == c else ())
        _norms_set(model, a)
