"""DoRA magnitudes across layouts: PEFT ``lora_magnitude_vector`` and LyCORIS/kohya ``dora_scale``.

PEFT is the real client: a model trained-like with ``use_dora=True`` is saved by PEFT, read by
lorakit, written as kohya and back as PEFT, and PEFT's forward pass on the result matches. The
LyCORIS convention is checked with numpy from its published ``apply_weight_decompose``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.adapter import DoraAxis
from lorakit.errors import ShapeMismatchError, UnsupportedVariantError
from lorakit.inspect import inspect_adapter
from lorakit.lowrank import RankPolicy

peft = pytest.importorskip("peft")


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(5, 7)
        self.conv = torch.nn.Conv2d(4, 6, 3, padding=1)

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lin(x), self.conv(img)


def _peft_dora(folder):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(Tiny(), LoraConfig(r=2, lora_alpha=4, target_modules=["lin", "conv"],
                                              use_dora=True))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # trained-like: B nonzero, magnitudes moved off the base norms
                p.copy_(p + 0.3 * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(folder))
    return model


def _inputs():
    g = torch.Generator().manual_seed(2)
    return torch.randn(3, 5, generator=g), torch.randn(2, 4, 6, 6, generator=g)


def _run(model):
    with torch.no_grad():
        return model(*_inputs())


def test_peft_dora_to_kohya_and_back_is_exact_for_peft(tmp_path):
    from peft import PeftModel

    model = _peft_dora(tmp_path / "peft")
    a = lorakit.load(tmp_path / "peft")
    assert a.is_dora and {m.magnitude_axis for m in a.modules.values()} == {DoraAxis.OUT}
    k = lorakit.save(a, tmp_path / "k.safetensors", "kohya")
    t = load_file(str(k))
    assert tuple(t["lora_lin.dora_scale"].shape) == (7, 1)  # LyCORIS wd_on_out shapes
    assert tuple(t["lora_conv.dora_scale"].shape) == (6, 1, 1, 1)
    back = lorakit.save(lorakit.convert(lorakit.load(k), "peft"), tmp_path / "p2", "peft")
    again = PeftModel.from_pretrained(Tiny(), str(back))
    for want, got in zip(_run(model), _run(again), strict=True):
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)


def test_lycoris_wd_on_out_agrees_with_peft(tmp_path):
    """LyCORIS ``W' = (W + delta) * dora_scale / ||W + delta||_row`` with the written dora_scale
    equals PEFT's merged DoRA weight (the conventions agree on the output axis)."""
    model = _peft_dora(tmp_path / "peft")
    a = lorakit.load(lorakit.save(lorakit.load(tmp_path / "peft"), tmp_path / "k.safetensors",
                                  "kohya"))
    t = load_file(str(tmp_path / "k.safetensors"))
    base = Tiny()
    merged = model.merge_and_unload()
    for name in ("lin", "conv"):
        w = getattr(base, name).weight.detach().double().numpy()
        d = a.modules[name].delta(torch.float64).numpy().reshape(w.shape)
        ds = t[f"lora_{name}.dora_scale"].double().numpy()
        wd = w + d
        norm = np.linalg.norm(wd.reshape(wd.shape[0], -1), axis=1).reshape(ds.shape)
        lyco = wd * (ds / (norm + np.finfo(np.float32).eps))
        peft_w = getattr(merged, name).weight.detach().double().numpy()
        assert np.allclose(lyco, peft_w, rtol=1e-5, atol=1e-6), name


def _kohya_dora(path, scale):
    g = torch.Generator().manual_seed(3)
    save_file({"lora_unet_a_q.lora_down.weight": torch.randn(2, 5, generator=g),
               "lora_unet_a_q.lora_up.weight": torch.randn(7, 2, generator=g),
               "lora_unet_a_q.alpha": torch.tensor(2.0), "lora_unet_a_q.dora_scale": scale},
              str(path))
    return path


def test_input_axis_dora_scale_stays_kohya_and_is_refused_as_peft(tmp_path):
    scale = torch.rand(1, 5) + 0.5  # LyCORIS wd_on_out=False
    f = _kohya_dora(tmp_path / "in.safetensors", scale)
    a = lorakit.load(f)
    m = a.modules["unet.a.q"]
    assert m.magnitude_axis is DoraAxis.IN
    info = inspect_adapter(a)["modules"][0]
    assert info["dora"] and info["dora_axis"] == "in"
    out = lorakit.save(a, tmp_path / "k.safetensors", "kohya")
    assert torch.equal(load_file(str(out))["lora_unet_a_q.dora_scale"], scale)
    for fmt in ("peft", "diffusers"):
        target = tmp_path / f"o_{fmt}"
        with pytest.raises(UnsupportedVariantError, match="wd_on_out=False") as e:
            lorakit.save(lorakit.convert(a, fmt, component="unet") if fmt == "peft" else a,
                         target, fmt)
        assert e.value.key and "q" in e.value.key
        assert not target.exists()


def test_output_axis_dora_scale_converts_to_diffusers_exactly(tmp_path):
    scale = torch.rand(7, 1) + 0.5
    a = lorakit.load(_kohya_dora(tmp_path / "out.safetensors", scale))
    assert a.modules["unet.a.q"].magnitude_axis is DoraAxis.OUT
    d = lorakit.save(a, tmp_path / "d.safetensors", "diffusers")
    t = load_file(str(d))
    assert torch.equal(t["unet.a.q.lora_magnitude_vector.weight"], scale.reshape(-1))
    k = lorakit.save(lorakit.load(d), tmp_path / "k.safetensors", "kohya")
    assert torch.equal(load_file(str(k))["lora_unet_a_q.dora_scale"], scale)


@pytest.mark.parametrize("shape", [(5, 7), (2, 7), (7, 2), (3,)])
def test_dora_scale_of_no_axis_is_named(tmp_path, shape):
    f = _kohya_dora(tmp_path / "bad.safetensors", torch.ones(shape))
    with pytest.raises(ShapeMismatchError, match="DoRA magnitude has shape") as e:
        lorakit.load(f)
    assert "bad.safetensors" in str(e.value) and "(7, 1)" in str(e.value)


def test_operations_needing_the_base_stay_refused(tmp_path):
    a = lorakit.load(_kohya_dora(tmp_path / "k.safetensors", torch.rand(7, 1) + 0.5))
    with pytest.raises(UnsupportedVariantError, match="DoRA"):
        lorakit.resize(a, RankPolicy.fixed(1))
    with pytest.raises(UnsupportedVariantError, match="DoRA"):
        lorakit.merge([a, a], method="linear")
