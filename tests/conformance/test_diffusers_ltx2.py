"""LTX-2 with diffusers 0.42 as the real client, beyond the shared cases of
test_diffusers_clients.py: LTX-2.3's names (gated attention ``to_gate_logits``, the prompt
modulations ``prompt_adaln``, one text projection per stream) both directions, and diffusers'
limits on ComfyUI files, asserted so that a fix upstream shows up here:

* a ``lora_down``/``lora_up`` file (with or without ``.alpha``) fails in diffusers' reader,
  which only strips the prefixes (lorakit reads it; its ComfyUI files are ``lora_A``/``lora_B``
  with scales folded, which diffusers applies exactly);
* connector blocks under ``diffusion_model.`` with the original checkpoint's names
  (``video_embeddings_connector.transformer_1d_blocks.N``) are sent to the transformer, which has
  no such layer: nothing reaches the connectors. lorakit names them as modules LTX-2 does not
  have (``--ignore-unknown`` reads the rest).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import lorakit  # noqa: E402
from lorakit.errors import UnknownLayoutError  # noqa: E402
from lorakit.formats import adapter_family  # noqa: E402
from lorakit.formats.families import LTX2  # noqa: E402
from lorakit.formats.rename import to_naming  # noqa: E402
from tests.conformance import _diffusion as D  # noqa: E402
from tests.conformance.test_diffusers_clients import (  # noqa: E402
    RTOL,
    _delta,
    build,
    expected,
    judge,
    ltx2_original_state,
)

pytestmark = pytest.mark.conformance


def _v23():
    return {"transformer": D.ltx2(v23=True), "connectors": D.ltx2_connectors(v23=True)}


@pytest.mark.parametrize("layout", ["diffusers", "bfl"])
def test_ltx23_names_written_by_lorakit_applied_by_diffusers(layout, tmp_path):
    ms = _v23()
    src = build(ms)
    assert adapter_family(src) is LTX2
    assert "transformer.transformer_blocks.0.audio_to_video_attn.to_gate_logits" in src.modules
    assert "connectors.audio_text_proj_in" in src.modules
    file = lorakit.save(src, tmp_path / f"{layout}.safetensors", layout)
    judge("ltx2", file, _v23(), expected(src, ms))
    back = to_naming(lorakit.load(file), LTX2, "diffusers")
    assert sorted(back.modules) == sorted(src.modules)


def test_ltx23_comfyui_file_read_by_both(tmp_path):
    ms = _v23()
    state = ltx2_original_state(ms, torch.Generator().manual_seed(5))
    assert "diffusion_model.audio_prompt_adaln_single.linear.lora_A.weight" in state
    assert "text_embedding_projection.video_aggregate_embed.lora_B.weight" in state
    file = tmp_path / "c.safetensors"
    save_file(state, str(file))
    D.diffusers_load("ltx2", file, ms)
    got = {(c, n): d for c, m in ms.items() for n, d in D.applied(m).items()}
    a = lorakit.load(file)
    assert a.source_format == "bfl" and adapter_family(a) is LTX2
    mine = {tuple(k.split(".", 1)): _delta(m)
            for k, m in to_naming(a, LTX2, "diffusers").modules.items()}
    assert set(mine) == set(got) and len(got) == len(state) // 2
    for k, ref in got.items():
        assert float((mine[k] - ref).norm()) < RTOL * float(ref.norm()), k


def test_ltx2_comfyui_down_up_alpha_is_lorakits_alone(tmp_path):
    ms = {"transformer": D.ltx2(), "connectors": D.ltx2_connectors()}
    state = ltx2_original_state(ms, torch.Generator().manual_seed(6), style="down_up")
    for name, st in (("alpha", state),
                     ("no-alpha", {k: v for k, v in state.items() if not k.endswith(".alpha")})):
        file = tmp_path / f"{name}.safetensors"
        save_file(st, str(file))
        with pytest.raises(IndexError):
            D.diffusers_load("ltx2", file,
                             {"transformer": D.ltx2(), "connectors": D.ltx2_connectors()})
    a = lorakit.load(tmp_path / "alpha.safetensors")
    assert adapter_family(a) is LTX2 and all(m.scale == 1.5 for m in a.modules.values())
    assert "connectors.aggregate_embed" in a.modules
    out = lorakit.save(a, tmp_path / "ab.safetensors", "bfl")
    judge("ltx2", out, {"transformer": D.ltx2(), "connectors": D.ltx2_connectors()},
          {tuple(k.split(".", 1)): _delta(m)
           for k, m in to_naming(a, LTX2, "diffusers").modules.items()})


def test_original_connector_blocks_under_diffusion_model(tmp_path):
    """``diffusion_model.video_embeddings_connector.transformer_1d_blocks.0.attn1.to_q``:
    diffusers applies nothing of it (it lands in the transformer, which has no such layer);
    lorakit names it as a module LTX-2 does not have."""
    g = torch.Generator().manual_seed(7)
    bad = "diffusion_model.video_embeddings_connector.transformer_1d_blocks.0.attn1.to_q"
    good = "diffusion_model.transformer_blocks.0.audio_attn1.to_q"
    state = {f"{good}.lora_A.weight": torch.randn(2, 8, generator=g),
             f"{good}.lora_B.weight": torch.randn(8, 2, generator=g),
             f"{bad}.lora_A.weight": torch.randn(2, 16, generator=g),
             f"{bad}.lora_B.weight": torch.randn(16, 2, generator=g)}
    file = tmp_path / "c.safetensors"
    save_file(state, str(file))
    ms = {"transformer": D.ltx2(), "connectors": D.ltx2_connectors()}
    D.diffusers_load("ltx2", file, ms)
    assert set(D.applied(ms["transformer"])) == {"transformer_blocks.0.audio_attn1.to_q"}
    assert D.applied(ms["connectors"]) == {}
    with pytest.raises(UnknownLayoutError, match="LTX-2 does not have") as info:
        lorakit.load(file)
    assert info.value.key == "transformer.video_embeddings_connector.transformer_1d_blocks.0." \
                             "attn1.to_q"
    a = lorakit.load(file, ignore_unknown=True)
    assert list(a.modules) == ["transformer.transformer_blocks.0.audio_attn1.to_q"]
