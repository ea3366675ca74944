"""LoKr files under ``diffusion_model.`` (ai-toolkit's Z-Image and Flux.2 LoKr files) against
diffusers 0.42's own LoKr readers (``_convert_non_diffusers_lokr_to_diffusers``,
``_convert_non_diffusers_flux2_lokr_to_diffusers``), which inject PEFT's LoKr layers.

lorakit reads each LoKr module in its exact LoRA form; the test compares that form's full update
``scale * B @ A`` with ``get_delta_weight`` of the LoKr layer diffusers injected (rel 1e-5), and
checks that lorakit's diffusers file of the same adapter (plain LoRA factors) is applied by
diffusers with the same update. The files are built here from the published key scheme.
"""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import lorakit  # noqa: E402
from lorakit.formats import adapter_family  # noqa: E402
from lorakit.formats.families import FLUX2, ZIMAGE  # noqa: E402
from lorakit.formats.rename import to_naming  # noqa: E402
from tests.conformance import _diffusion as D  # noqa: E402

RTOL = 1e-5


def _lokr(sd: dict, stem: str, out: int, inp: int, g, *, split_w1: bool = False) -> None:
    """One LoKr module: ``w1`` (2, 2) (or ``w1_a @ w1_b``, rank 2), ``w2 = w2_a @ w2_b`` of rank
    2, alpha 1 (LyCORIS scale alpha / rank)."""
    if split_w1:
        sd[f"{stem}.lokr_w1_a"] = torch.randn(2, 2, generator=g)
        sd[f"{stem}.lokr_w1_b"] = torch.randn(2, 2, generator=g)
    else:
        sd[f"{stem}.lokr_w1"] = torch.randn(2, 2, generator=g)
    sd[f"{stem}.lokr_w2_a"] = torch.randn(out // 2, 2, generator=g)
    sd[f"{stem}.lokr_w2_b"] = torch.randn(2, inp // 2, generator=g)
    sd[f"{stem}.alpha"] = torch.tensor(1.0)


def _full(m) -> torch.Tensor:
    r = m.down.shape[0]
    return m.scale * (m.up.double().reshape(m.up.shape[0], r) @ m.down.double().reshape(r, -1))


def _injected(model) -> dict[str, torch.Tensor]:
    """``{module path: delta}`` of every PEFT LoKr layer diffusers injected."""
    from peft.tuners.lokr.layer import LoKrLayer

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoKrLayer) and (mod.lokr_w1 or mod.lokr_w1_a):
            out[name] = mod.get_delta_weight(next(iter(mod.active_adapters))).double()
    return out


def _close(got: torch.Tensor, ref: torch.Tensor, key: str) -> None:
    err = float((got - ref).norm() / ref.norm())
    assert err < RTOL, (key, err)


def _zimage_file(path, g):
    model = D.zimage()
    sd: dict[str, torch.Tensor] = {}
    for name, (out, inp) in D.linears(model).items():
        if name.startswith("layers.0.") and out % 2 == 0 and inp % 2 == 0:
            _lokr(sd, f"diffusion_model.{name}", out, inp, g)
    save_file(sd, str(path))
    return model


def test_zimage_lokr_reads_as_diffusers_applies(tmp_path):
    file = tmp_path / "zimage_lokr.safetensors"
    model = _zimage_file(file, torch.Generator().manual_seed(0))
    a = lorakit.load(file)
    assert a.layout == "bfl" and {m.origin for m in a.modules.values()} == {"lokr"}
    assert adapter_family(a) is ZIMAGE
    D.diffusers_load("zimage", file, {"transformer": model})
    got = _injected(model)
    assert len(got) == len(a.modules) >= 7
    ours = to_naming(a, ZIMAGE, "diffusers")
    for name, delta in got.items():
        _close(_full(ours.modules[f"transformer.{name}"]), delta, name)


def test_zimage_lokr_written_as_diffusers_lora_is_applied_alike(tmp_path):
    file = tmp_path / "zimage_lokr.safetensors"
    _zimage_file(file, torch.Generator().manual_seed(1))
    a = lorakit.load(file)
    out = lorakit.save(a, tmp_path / "as_lora.safetensors", "diffusers")
    fresh = D.zimage()
    D.diffusers_load("zimage", out, {"transformer": fresh})
    applied = D.applied(fresh)
    ours = to_naming(a, ZIMAGE, "diffusers")
    assert set(applied) == {k.partition(".")[2] for k in ours.modules}
    for name, delta in applied.items():
        _close(delta, _full(ours.modules[f"transformer.{name}"]), name)


def test_flux2_bfl_lokr_reads_as_diffusers_applies(tmp_path):
    """diffusers maps a BFL fused ``img_attn.qkv`` LoKr onto the fused ``attn.to_qkv`` (a
    Kronecker update does not split into q, k, v factors in LoKr form); lorakit's exact LoRA
    form of it is one module whose update is the same."""
    g = torch.Generator().manual_seed(2)
    model = D.flux2()
    w = D.linears(model)["transformer_blocks.0.attn.to_q"][1]
    sd: dict[str, torch.Tensor] = {}
    _lokr(sd, "diffusion_model.double_blocks.0.img_attn.qkv", 3 * w, w, g)
    _lokr(sd, "diffusion_model.double_blocks.0.img_attn.proj", w, w, g)
    file = tmp_path / "flux2_lokr.safetensors"
    save_file(sd, str(file))
    a = lorakit.load(file, family="flux2")  # its BFL names are Flux.1's; LoKr factors give
    # no layer shapes to tell them apart by, so --family (or metadata) decides
    assert sorted(a.modules) == ["transformer.double_blocks.0.img_attn.proj",
                                 "transformer.double_blocks.0.img_attn.qkv"]
    assert adapter_family(a) is FLUX2
    D.diffusers_load("flux2", file, {"transformer": model})
    got = _injected(model)
    assert set(got) == {"transformer_blocks.0.attn.to_qkv", "transformer_blocks.0.attn.to_out.0"}
    _close(_full(a.modules["transformer.double_blocks.0.img_attn.qkv"]),
           got["transformer_blocks.0.attn.to_qkv"], "qkv")
    _close(_full(a.modules["transformer.double_blocks.0.img_attn.proj"]),
           got["transformer_blocks.0.attn.to_out.0"], "proj")
    # split into diffusers' q, k, v LoRAs exactly: B's row blocks of the fused update
    split = to_naming(a, FLUX2, "diffusers")
    fused = got["transformer_blocks.0.attn.to_qkv"]
    for j, part in enumerate(("to_q", "to_k", "to_v")):
        _close(_full(split.modules[f"transformer.transformer_blocks.0.attn.{part}"]),
               fused[j * w:(j + 1) * w], part)


def test_split_w1_lokr_limit_of_diffusers(tmp_path):
    """diffusers 0.42 drops a LoKr's split ``lokr_w1_a``/``lokr_w1_b`` (an "unexpected keys"
    warning) and applies a zero update; lorakit reads the module exactly: its update equals
    ``alpha / r * kron(w1_a @ w1_b, w2_a @ w2_b)`` computed here in numpy."""
    g = torch.Generator().manual_seed(4)
    model = D.zimage()
    out, inp = D.linears(model)["layers.0.attention.to_q"]
    sd: dict[str, torch.Tensor] = {}
    stem = "diffusion_model.layers.0.attention.to_q"
    _lokr(sd, stem, out, inp, g, split_w1=True)
    file = tmp_path / "split_w1.safetensors"
    save_file(sd, str(file))
    D.diffusers_load("zimage", file, {"transformer": model})
    assert float(_injected(model)["layers.0.attention.to_q"].norm()) == 0.0
    w1 = sd[f"{stem}.lokr_w1_a"].double().numpy() @ sd[f"{stem}.lokr_w1_b"].double().numpy()
    w2 = sd[f"{stem}.lokr_w2_a"].double().numpy() @ sd[f"{stem}.lokr_w2_b"].double().numpy()
    ref = torch.from_numpy(np.kron(w1, w2)) * (1.0 / 2)  # alpha 1, rank 2
    m = lorakit.load(file).modules["transformer.layers.0.attention.to_q"]
    _close(_full(m), ref, "to_q")


def test_lokr_under_an_unknown_prefix_is_still_refused_by_name(tmp_path):
    sd: dict[str, torch.Tensor] = {}
    _lokr(sd, "model.layers.0.attention.to_q", 4, 4, torch.Generator().manual_seed(3))
    file = tmp_path / "odd.safetensors"
    save_file(sd, str(file))
    with pytest.raises(lorakit.errors.LorakitError, match="LoKr"):
        lorakit.load(file)


def test_unknown_key_in_a_lokr_file_is_named_and_ignore_unknown_lists_it(tmp_path):
    from lorakit.formats.coverage import ignored

    sd: dict[str, torch.Tensor] = {}
    _lokr(sd, "diffusion_model.layers.0.attention.to_q", 24, 24, torch.Generator().manual_seed(5))
    sd["diffusion_model.layers.0.attention.to_q.lokr_w9"] = torch.zeros(2, 2)
    file = tmp_path / "odd_suffix.safetensors"
    save_file(sd, str(file))
    with pytest.raises(lorakit.errors.UnknownLayoutError, match="lokr_w9"):
        lorakit.load(file)
    a = lorakit.load(file, ignore_unknown=True)
    assert "diffusion_model.layers.0.attention.to_q.lokr_w9" in ignored(a)
    assert list(a.modules) == ["transformer.layers.0.attention.to_q"]


def test_flux2_lycoris_wrapper_lokr_reads_as_diffusers_applies(tmp_path):
    """The LyCORIS wrapper's Flux.2 names (``lycoris_transformer_blocks_0_attn_to_q.lokr_w1``,
    diffusers' ``_convert_lycoris_flux2_lokr_to_diffusers``)."""
    g = torch.Generator().manual_seed(6)
    model = D.flux2()
    lin = D.linears(model)
    names = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff.linear_in",
             "single_transformer_blocks.0.attn.to_qkv_mlp_proj")
    sd: dict[str, torch.Tensor] = {}
    for name in names:
        _lokr(sd, "lycoris_" + name.replace(".", "_"), *lin[name], g)
    file = tmp_path / "flux2_lycoris.safetensors"
    save_file(sd, str(file))
    a = lorakit.load(file)
    assert a.layout == "lycoris" and adapter_family(a) is FLUX2
    D.diffusers_load("flux2", file, {"transformer": model})
    got = _injected(model)
    assert set(got) == set(names)
    for name in names:
        _close(_full(a.modules[name]), got[name], name)
