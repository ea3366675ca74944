"""diffusers 0.42 as the real client, both directions (issue 16, Deliver 5).

* lorakit writes: for each family and each layout lorakit writes that diffusers reads, diffusers'
  own ``lora_state_dict`` + ``load_lora_into_*`` load the file into a model built from config
  (tiny widths, the family's real block structure and names); every module is applied and the
  applied update ``scaling * B @ A`` equals the adapter's (rel 1e-5).
* diffusers reads: for each layout diffusers' converters read, a file built here by hand from the
  published key scheme (no lorakit) is applied by diffusers, and lorakit reads the same updates.

Families: Flux.1, SD3, SDXL, SD 1.x, Wan 2.x, Qwen-Image, LTX-Video, HunyuanVideo,
Lumina-Image 2.0, HiDream-I1, Flux.2, Z-Image, LTX-2 (transformer and text connectors; more in
test_diffusers_ltx2.py), Ideogram 4, Krea 2 (whose reading cases and limits are in
``test_diffusers_ideokrea.py``).

Known limits of diffusers 0.42 itself, asserted so that a fix upstream shows up here:
kohya/ComfyUI Flux files lose their top-level modules (``img_in``, ``txt_in``, ``time_in``,
``vector_in``, ``guidance_in``, ``final_layer``: the converter leaves them without the
``transformer.`` prefix), and its kohya Flux reader splits ``linear1`` only at Flux.1's real width
(3072), so that case runs on a real-width single block. HunyuanVideo's original-names reader
(``_convert_hunyuan_video_lora_to_diffusers``) likewise splits ``linear1`` only at 3072, splits
the token refiner's ``self_attn_qkv`` A as if it were B (the load fails), swaps the halves of
``final_layer.adaLN_modulation.1``'s A as well as B's (a wrong update), reads ``lora_A``/``lora_B``
only and no file without a double block's ``img_attn_qkv``; it has no reader for musubi-tuner's
kohya files (it fails on them). Its Lumina 2 reader of original names splits ``attention.qkv``
only at the real width (2304 : 768 : 768, so those cases run on real-width blocks), needs every
layer of every block it sees (qkv, out, w1-w3 and the modulation), takes no top-level module and
no alpha (it fails on all of these). Its HiDream reader only strips ``diffusion_model.``: a
ComfyUI file spelled ``lora_down``/``lora_up`` + ``.alpha`` fails to load (lorakit writes
``lora_A``/``lora_B``, scales folded). Its Flux.2 kohya reader drops ``guidance_in``, the shared
modulations and ``final_layer.adaLN_modulation.1`` (a warning, nothing applied); its Flux.2
ComfyUI reader reads ``final_layer.adaLN_modulation.1`` without the shift/scale swap (a wrong
update), takes no alpha and takes a ``lora_down``/``lora_up`` file for a kohya one (nothing is
applied), so lorakit writes Flux.2 ComfyUI files as ``lora_A``/``lora_B``, scales folded. Neither
Flux.2 reader depends on the width (``linear1`` stays one fused layer), so tiny models suffice.
Its Z-Image reader splits a fused ``attention.qkv`` only in the dotted ``.lora.down.weight``
spelling: a ComfyUI ``lora_down``/``lora_up`` (or ``lora_A``/``lora_B``) file's qkv is dropped
("unexpected keys", a warning), so lorakit's Z-Image ComfyUI files reach diffusers without q, k, v.
Its LTX-2 reader (like HiDream's) fails on a ComfyUI ``lora_down``/``lora_up`` file, with or
without ``.alpha`` (lorakit writes ``lora_A``/``lora_B``, scales folded), and sends connector
blocks under ``diffusion_model.`` (``video_embeddings_connector.``) to the transformer, which has
no such layer (see test_diffusers_ltx2.py).
"""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import lorakit  # noqa: E402
from lorakit.adapter import Adapter, LoraModule  # noqa: E402
from lorakit.formats import adapter_family  # noqa: E402
from lorakit.formats.families import FLUX2  # noqa: E402
from lorakit.formats.rename import to_naming  # noqa: E402
from tests.conformance import _diffusion as D  # noqa: E402

pytestmark = pytest.mark.conformance
RTOL = 1e-5
# Flux top-level modules diffusers 0.42 drops from kohya / ComfyUI files (see the docstring)
FLUX_TOP = ("x_embedder", "context_embedder", "proj_out", "norm_out.linear", "time_text_embed.")


# Flux.2 modules diffusers 0.42's kohya reader drops (with a warning): guidance_in, the shared
# modulations and final_layer.adaLN_modulation.1 (see the docstring)
FLUX2_KOHYA_DROPPED = ("time_guidance_embed.guidance_embedder.", "double_stream_modulation_",
                       "single_stream_modulation.", "norm_out.linear")


def _model_path(comp: str, key_path: str, models=None) -> str:
    """transformers 5 names ``CLIPTextModel``'s layers ``encoder.layers.N`` (no
    ``text_model.``; ``CLIPTextModelWithProjection`` keeps it)."""
    if not (comp.startswith("text_encoder") and key_path.startswith("text_model.")):
        return key_path
    names = dict(models[comp].named_modules()) if models else {}
    return key_path if key_path in names else key_path[len("text_model."):]


def _delta(m: LoraModule) -> torch.Tensor:
    """``scale * B @ A`` in float64 from the raw factors (the test's own reference)."""
    r = m.down.shape[0]
    b = m.up.detach().double().reshape(m.up.shape[0], r)
    a = m.down.detach().double().reshape(r, -1)
    return (m.alpha / r) * (b @ a)


def build(models: dict[str, torch.nn.Module], keep=lambda comp, name: True, *, rank=2,
          ranks=None, seed=0) -> Adapter:
    """A LoRA on every kept Linear layer of ``models``, keys ``<component>.<diffusers path>``
    (CLIP paths spelled ``text_model.encoder...`` as files spell them); alpha 3 (scale 1.5)."""
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for comp, model in models.items():
        for name, (out, inp) in D.linears(model, lambda n, c=comp: keep(c, n)).items():
            r = ranks(name) if ranks else rank
            path = f"text_model.{name}" if comp.startswith("text_encoder") and \
                not name.startswith("text_model.") else name
            mods[f"{comp}.{path}"] = LoraModule(torch.randn(r, inp, generator=g),
                                                torch.randn(out, r, generator=g), alpha=1.5 * r)
    return Adapter(modules=mods, component_prefix=True)


def expected(adapter: Adapter, models) -> dict[tuple[str, str], torch.Tensor]:
    out = {}
    for key, m in adapter.modules.items():
        comp, _, path = key.partition(".")
        out[(comp, _model_path(comp, path, models))] = _delta(m)
    return out


def judge(family: str, file, models, want: dict[tuple[str, str], torch.Tensor],
          dropped=()) -> None:
    """diffusers applies exactly ``want`` (minus the modules it is known to drop)."""
    D.diffusers_load(family, file, models)
    got = {(comp, n): d for comp, model in models.items() for n, d in D.applied(model).items()}
    want = {k: v for k, v in want.items() if not any(k[1].startswith(p) for p in dropped)}
    assert set(got) == set(want), (sorted(set(want) - set(got))[:4], sorted(set(got) - set(want))[:4])
    for k, ref in want.items():
        err = float((got[k] - ref).norm() / ref.norm())
        assert err < RTOL, (k, err)


def _flux_models():
    return {"transformer": D.flux(), "text_encoder": D.clip()}


def _not_single_linear1(comp: str, name: str) -> bool:
    # tiny width: diffusers' kohya reader only splits linear1 at 3072 (tested apart below)
    return not re.match(r"single_transformer_blocks\.\d+\.(attn\.to_[qkv]|proj_mlp)$", name)


def _hv_bfl_keep(comp: str, name: str) -> bool:
    # what diffusers' HunyuanVideo reader gets wrong is tested apart (test_hunyuan_video_limits)
    return not (re.match(r"single_transformer_blocks\.\d+\.(attn\.to_[qkv]|proj_mlp)$", name)
                or re.search(r"refiner_blocks\.\d+\.attn\.to_[qkv]$", name)
                or name == "norm_out.linear")


WRITE_CASES = [  # (family, layout, models, keep, dropped by diffusers)
    ("flux1", "diffusers", _flux_models, None, ()),
    ("flux1", "aitoolkit", _flux_models, None, ()),
    ("flux1", "simpletuner", _flux_models, None, ()),
    ("flux1", "kohya", _flux_models, _not_single_linear1, FLUX_TOP),
    ("flux1", "bfl", _flux_models, _not_single_linear1, FLUX_TOP),
    ("flux1", "xlabs", lambda: {"transformer": D.flux()},
     lambda c, n: bool(re.search(r"attn\.(to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)$|"
                                 r"single_transformer_blocks\.\d+\.proj_out$", n)), ()),
    ("sd3", "diffusers", lambda: {"transformer": D.sd3()}, None, ()),
    ("sdxl", "diffusers", lambda: {"unet": D.unet(True), "text_encoder": D.clip(),
                                   "text_encoder_2": D.clip(True)}, None, ()),
    ("sdxl", "kohya", lambda: {"unet": D.unet(True), "text_encoder": D.clip(),
                               "text_encoder_2": D.clip(True)}, None, ()),
    ("sd15", "diffusers", lambda: {"unet": D.unet(False), "text_encoder": D.clip()}, None, ()),
    ("sd15", "kohya", lambda: {"unet": D.unet(False), "text_encoder": D.clip()}, None, ()),
    ("wan", "diffusers", lambda: {"transformer": D.wan()}, None, ()),
    ("wan", "kohya", lambda: {"transformer": D.wan()},
     lambda c, n: bool(re.match(r"blocks\.\d+\.(attn[12]\.(to_[qkv]|to_out\.0)|ffn\.net)", n)), ()),
    ("wan", "bfl", lambda: {"transformer": D.wan()}, None, ()),
    ("qwenimage", "diffusers", lambda: {"transformer": D.qwen()}, None, ()),
    ("qwenimage", "kohya", lambda: {"transformer": D.qwen()}, None, ()),
    ("qwenimage", "bfl", lambda: {"transformer": D.qwen()}, None, ()),
    ("ltxvideo", "diffusers", lambda: {"transformer": D.ltx()}, None, ()),
    ("ltxvideo", "bfl", lambda: {"transformer": D.ltx()}, None, ()),
    ("hunyuanvideo", "diffusers", lambda: {"transformer": D.hunyuan()}, None, ()),
    ("hunyuanvideo", "bfl", lambda: {"transformer": D.hunyuan()}, _hv_bfl_keep, ()),
    ("lumina2", "diffusers", lambda: {"transformer": D.lumina2()}, None, ()),
    ("lumina2", "bfl", lambda: {"transformer": D.lumina2(real=True)},
     lambda c, n: n.startswith(("layers.", "noise_refiner.", "context_refiner.")), ()),
    ("hidream", "diffusers", lambda: {"transformer": D.hidream()}, None, ()),
    ("hidream", "bfl", lambda: {"transformer": D.hidream()}, None, ()),
    ("flux2", "diffusers", lambda: {"transformer": D.flux2()}, None, ()),
    ("flux2", "kohya", lambda: {"transformer": D.flux2()}, None, FLUX2_KOHYA_DROPPED),
    ("flux2", "bfl", lambda: {"transformer": D.flux2()}, lambda c, n: n != "norm_out.linear", ()),
    ("zimage", "diffusers", lambda: {"transformer": D.zimage()}, None, ()),
    ("zimage", "kohya", lambda: {"transformer": D.zimage()}, None, ()),
    # diffusers splits no fused attention.qkv of a lora_down/lora_A file (test_zimage_limits)
    ("zimage", "bfl", lambda: {"transformer": D.zimage()},
     lambda c, n: not re.search(r"attention\.to_[qkv]$", n), ()),
    ("ltx2", "diffusers", lambda: {"transformer": D.ltx2(), "connectors": D.ltx2_connectors()},
     None, ()),
    ("ltx2", "bfl", lambda: {"transformer": D.ltx2(), "connectors": D.ltx2_connectors()}, None, ()),
    ("ideogram4", "diffusers", lambda: {"transformer": D.ideogram4()}, None, ()),
    # diffusers takes no top-level module from an original-names file (test_diffusers_ideokrea)
    ("ideogram4", "bfl", lambda: {"transformer": D.ideogram4()},
     lambda c, n: n.startswith("layers."), ()),
    ("krea2", "diffusers", lambda: {"transformer": D.krea2()}, None, ()),
    ("krea2", "bfl", lambda: {"transformer": D.krea2()}, None, ()),
]


def _keep_lora_able(keep):
    def inner(comp, name):
        if comp.startswith("text_encoder") and "layers" not in name:
            return False  # CLIP's projection is not a LoRA target of the diffusers loaders
        return keep(comp, name) if keep else True
    return inner


@pytest.mark.parametrize("family,layout,models,keep,dropped", WRITE_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in WRITE_CASES])
def test_diffusers_applies_what_lorakit_writes(family, layout, models, keep, dropped, tmp_path):
    ms = models()
    src = build(ms, _keep_lora_able(keep))
    assert adapter_family(src).name == family
    file = lorakit.save(src, tmp_path / f"{layout}.safetensors", layout)
    judge(family, file, models(), expected(src, ms), dropped)
    back = to_naming(lorakit.load(file), adapter_family(src), "diffusers")
    assert sorted(back.modules) == sorted(src.modules)  # and lorakit reads its own file


def test_flux_kohya_linear1_at_real_width(tmp_path):
    """A single block at Flux.1's width: q, k, v and proj_mlp fuse into kohya ``linear1`` (rank
    4 x 4 = 16, block-diagonal B) and diffusers splits it back exactly."""
    models = {"transformer": D.flux(width=3072, double=0, single=1)}
    src = build(models, lambda c, n: n.startswith("single_transformer_blocks.0.")
                and not n.endswith("norm.linear"), rank=4)
    file = lorakit.save(src, tmp_path / "k.safetensors", "kohya")
    fused = lorakit.load(file).modules["transformer.single_blocks.0.linear1"]
    assert fused.rank == 16 and fused.up.shape == (7 * 3072, 16)
    judge("flux1", file, models, expected(src, models))


def test_hunyuan_video_linear1_at_real_width(tmp_path):
    """HunyuanVideo's width: the single block's q, k, v and proj_mlp fuse into ``linear1`` (rank
    4 x 4, block-diagonal B) in the ComfyUI file and diffusers splits it back exactly (its reader
    needs a double block's ``img_attn_qkv`` to recognise the file: one is adapted too)."""
    targets = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
               "transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.attn.to_q",
               "single_transformer_blocks.0.attn.to_k", "single_transformer_blocks.0.attn.to_v",
               "single_transformer_blocks.0.proj_mlp")
    models = {"transformer": D.hunyuan_real(targets)}
    src = build(models, lambda c, n: n in targets, rank=4)
    src.metadata["lorakit.family"] = "hunyuanvideo"  # shared names: Flux.1's otherwise
    file = lorakit.save(src, tmp_path / "c.safetensors", "bfl")
    fused = lorakit.load(file).modules["transformer.single_blocks.0.linear1"]
    assert fused.rank == 16 and fused.up.shape == (7 * 3072, 16)
    judge("hunyuanvideo", file, {"transformer": D.hunyuan_real(targets)}, expected(src, models))


def test_hunyuan_video_limits_of_diffusers(tmp_path):
    """diffusers 0.42's HunyuanVideo reader: musubi-tuner kohya files and the token refiner's
    ``self_attn_qkv`` fail to load; ``final_layer.adaLN_modulation.1`` gets A's halves swapped
    too. lorakit reads all three exactly."""
    models = {"transformer": D.hunyuan()}
    qkv = r"transformer_blocks\.0\.attn\.to_[qkv]$"  # diffusers' reader needs img_attn_qkv
    src = build(models)
    kohya = lorakit.save(src, tmp_path / "k.safetensors", "kohya")
    with pytest.raises(RuntimeError):
        D.diffusers_load("hunyuanvideo", kohya, {"transformer": D.hunyuan()})
    back = to_naming(lorakit.load(kohya), adapter_family(src), "diffusers")
    assert sorted(back.modules) == sorted(src.modules)
    for k, m in back.modules.items():
        assert float((_delta(m) - _delta(src.modules[k])).norm()) < 1e-9 * float(
            _delta(src.modules[k]).norm()), k
    refiner = build(models, lambda c, n: bool(re.match(qkv, n) or re.search(
        r"refiner_blocks\.0\.attn\.to_[qkv]$", n)))
    file = lorakit.save(refiner, tmp_path / "r.safetensors", "bfl")
    with pytest.raises(RuntimeError, match="size mismatch"):
        D.diffusers_load("hunyuanvideo", file, {"transformer": D.hunyuan()})
    final = build(models, lambda c, n: bool(re.match(qkv, n)) or n == "norm_out.linear")
    file = lorakit.save(final, tmp_path / "f.safetensors", "bfl", family="hunyuanvideo")
    ms = {"transformer": D.hunyuan()}
    D.diffusers_load("hunyuanvideo", file, ms)
    got = D.applied(ms["transformer"])["norm_out.linear"]
    m = final.modules["transformer.norm_out.linear"]
    assert lorakit.load(file).modules["transformer.final_layer.adaLN_modulation.1"].up.shape == \
        m.up.shape  # (2h, r): the swapped B, A as is
    a, b = m.down.double(), m.up.double()  # A (r, in), B (2h, r)
    wrong = m.scale * b @ torch.cat([a[1:], a[:1]])  # rank 2: A's two rows swapped back as well
    assert float((got - wrong).norm()) < RTOL * float(wrong.norm())
    assert float((got - _delta(m)).norm()) > 0.1 * float(_delta(m).norm())


def test_lumina2_limits_of_diffusers(tmp_path):
    """diffusers 0.42's Lumina 2 reader fails on a ComfyUI file below the real width, with a
    top-level module, with a block missing a layer, or with alphas; lorakit reads each exactly."""
    blocks = ("layers.", "noise_refiner.", "context_refiner.")
    real = {"transformer": D.lumina2(real=True)}
    full = build(real, lambda c, n: n.startswith(blocks))
    cases = {  # name: (adapter, layout, error diffusers raises)
        "tiny": (build({"transformer": D.lumina2()}, lambda c, n: n.startswith(blocks)), "bfl",
                 RuntimeError),
        "top-level": (build(real, lambda c, n: n.startswith(blocks) or n.startswith(
            "time_caption_embed.")), "bfl", ValueError),
        "missing-layer": (full.copy(modules={k: m for k, m in full.modules.items()
                                             if "layers.0.feed_forward.linear_2" not in k}),
                          "bfl", KeyError),
    }
    for name, (adapter, layout, error) in cases.items():
        file = lorakit.save(adapter, tmp_path / f"{name}.safetensors", layout)
        with pytest.raises(error):
            D.diffusers_load("lumina2", file, {"transformer": D.lumina2()})
        back = to_naming(lorakit.load(file), adapter_family(adapter), "diffusers")
        assert sorted(back.modules) == sorted(adapter.modules), name
        for k, m in back.modules.items():
            ref = _delta(adapter.modules[k])
            assert float((_delta(m) - ref).norm()) < RTOL * float(ref.norm()), (name, k)
    g = torch.Generator().manual_seed(3)
    state = _lumina2_original_state(real["transformer"], g)
    state["diffusion_model.layers.0.attention.out.alpha"] = torch.tensor(1.0)
    file = tmp_path / "alpha.safetensors"
    save_file(state, str(file))
    with pytest.raises(ValueError):
        D.diffusers_load("lumina2", file, {"transformer": D.lumina2()})
    assert lorakit.load(file).modules["transformer.layers.0.attention.out"].scale == 0.5


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_prefixless_unet_file_reaches_diffusers(fmt, tmp_path):
    """Defect 1: ``get_peft_model_state_dict(unet)`` keys carry no ``unet.``; as kohya
    (``lora_unet_...``) and as diffusers every layer reaches diffusers' UNet."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    cfg = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                     target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out",
                                     "ff.net.0.proj", "ff.net.2"])
    peft_unet = inject_adapter_in_model(cfg, D.unet(True))
    state = get_peft_model_state_dict(peft_unet)
    assert not any(k.startswith("unet.") for k in state)
    bare = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(bare))
    a = lorakit.load(bare)
    assert a.components() == ["unet"]
    file = lorakit.save(lorakit.convert(a, fmt), tmp_path / f"o_{fmt}.safetensors", fmt)
    if fmt == "kohya":
        from safetensors import safe_open

        with safe_open(str(file), "pt") as f:
            assert all(k.startswith("lora_unet_") for k in f.keys())  # noqa: SIM118
    want = {("unet", k[len("unet."):]): _delta(m) for k, m in a.modules.items()}
    assert len(want) == sum(k.endswith("lora_A.weight") for k in state)  # every layer
    judge("sdxl", file, {"unet": D.unet(True)}, want)


def test_text_encoder_rank_pattern_matches_transformers5_names(tmp_path):
    """Defect 2: a mixed-rank text-encoder file written as diffusers loads into transformers 5's
    CLIP (``encoder.layers.N``) with every rank and scale right."""
    models = {"text_encoder": D.clip(), "text_encoder_2": D.clip(True)}
    src = build(models, _keep_lora_able(None), ranks=lambda n: 2 if "q_proj" in n else 4)
    file = lorakit.save(src, tmp_path / "te.safetensors", "diffusers")
    judge("sdxl", file, models, expected(src, models))


# ------------------------------------------------------------------ layouts diffusers converts

def _rand(g, *shape):
    return torch.randn(*shape, generator=g)


def _flux_bfl_state(width: int, style: str, g) -> dict[str, torch.Tensor]:
    """BFL names for a 1-double, 1-single tiny Flux (published sd-scripts / ComfyUI scheme)."""
    h = width
    mods = {"double_blocks.0.img_attn.qkv": (3 * h, h), "double_blocks.0.img_attn.proj": (h, h),
            "double_blocks.0.txt_attn.qkv": (3 * h, h), "double_blocks.0.txt_attn.proj": (h, h),
            "double_blocks.0.img_mlp.0": (4 * h, h), "double_blocks.0.img_mlp.2": (h, 4 * h),
            "double_blocks.0.txt_mlp.0": (4 * h, h), "double_blocks.0.txt_mlp.2": (h, 4 * h),
            "double_blocks.0.img_mod.lin": (6 * h, h), "double_blocks.0.txt_mod.lin": (6 * h, h),
            "single_blocks.0.linear2": (h, 5 * h), "single_blocks.0.modulation.lin": (3 * h, h)}
    out = {}
    for name, (o, i) in mods.items():
        r = 4
        if style == "kohya":
            stem = "lora_unet_" + name.replace(".", "_")
            out[f"{stem}.lora_down.weight"] = _rand(g, r, i)
            out[f"{stem}.lora_up.weight"] = _rand(g, o, r)
            out[f"{stem}.alpha"] = torch.tensor(2.0)
        else:  # ComfyUI: diffusion_model. + dotted BFL names
            out[f"diffusion_model.{name}.lora_down.weight"] = _rand(g, r, i)
            out[f"diffusion_model.{name}.lora_up.weight"] = _rand(g, o, r)
            out[f"diffusion_model.{name}.alpha"] = torch.tensor(8.0)
    return out


def _xlabs_state(h: int, g) -> dict[str, torch.Tensor]:
    out = {}
    for name, (o, i) in {"double_blocks.0.processor.qkv_lora1": (3 * h, h),
                         "double_blocks.0.processor.proj_lora1": (h, h),
                         "double_blocks.0.processor.qkv_lora2": (3 * h, h),
                         "double_blocks.0.processor.proj_lora2": (h, h),
                         "single_blocks.0.processor.qkv_lora": (3 * h, h),
                         "single_blocks.0.processor.proj_lora": (h, 5 * h)}.items():
        out[f"{name}.down.weight"] = _rand(g, 4, i)
        out[f"{name}.up.weight"] = _rand(g, o, 4)
    return out


def _mixture_state(model, g) -> dict[str, torch.Tensor]:
    """ai-toolkit's kohya-style file with diffusers names (``lora_transformer_...``); diffusers
    0.42 maps only the attention layers of blocks in this layout."""
    out = {}
    for name, (o, i) in D.linears(model, lambda n: "blocks" in n and ".attn." in n).items():
        stem = "lora_transformer_" + name.replace(".", "_")
        out[f"{stem}.lora_down.weight"] = _rand(g, 2, i)
        out[f"{stem}.lora_up.weight"] = _rand(g, o, 2)
        out[f"{stem}.alpha"] = torch.tensor(4.0)
    return out


_WAN_NATIVE = {"attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
               "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q",
               "attn2.to_k": "cross_attn.k", "attn2.to_v": "cross_attn.v",
               "attn2.to_out.0": "cross_attn.o", "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2"}


def _wan_state(model, style: str, g) -> dict[str, torch.Tensor]:
    out = {}
    for name, (o, i) in D.linears(model, lambda n: n.startswith("blocks.")).items():
        m = re.match(r"blocks\.(\d+)\.(.+)$", name)
        native = f"blocks.{m[1]}.{_WAN_NATIVE[m[2]]}"
        if style == "musubi":
            stem = "lora_unet_" + native.replace(".", "_")
            out[f"{stem}.lora_down.weight"] = _rand(g, 2, i)
            out[f"{stem}.lora_up.weight"] = _rand(g, o, 2)
            out[f"{stem}.alpha"] = torch.tensor(1.0)
        else:
            out[f"diffusion_model.{native}.lora_A.weight"] = _rand(g, 2, i)
            out[f"diffusion_model.{native}.lora_B.weight"] = _rand(g, o, 2)
    return out


_SGM = {"down_blocks.1.attentions.0": "input_blocks.4.1", "down_blocks.1.attentions.1":
        "input_blocks.5.1", "down_blocks.2.attentions.0": "input_blocks.7.1",
        "down_blocks.2.attentions.1": "input_blocks.8.1", "mid_block.attentions.0":
        "middle_block.1", "up_blocks.0.attentions.0": "output_blocks.0.1",
        "up_blocks.0.attentions.1": "output_blocks.1.1", "up_blocks.0.attentions.2":
        "output_blocks.2.1", "up_blocks.1.attentions.0": "output_blocks.3.1",
        "up_blocks.1.attentions.1": "output_blocks.4.1", "up_blocks.1.attentions.2":
        "output_blocks.5.1"}


def _sgm_state(model, g) -> dict[str, torch.Tensor]:
    """sd-scripts' SDXL names (SGM UNet blocks, diffusers-like attention insides)."""
    out = {}
    for name, (o, i) in D.linears(model, lambda n: "attentions" in n).items():
        head = re.match(r"^((?:down|up)_blocks\.\d+\.attentions\.\d+|mid_block\.attentions\.0)",
                        name)[1]
        stem = "lora_unet_" + (_SGM[head] + name[len(head):]).replace(".", "_")
        out[f"{stem}.lora_down.weight"] = _rand(g, 2, i)
        out[f"{stem}.lora_up.weight"] = _rand(g, o, 2)
        out[f"{stem}.alpha"] = torch.tensor(1.0)
    return out


def _same_names_state(model, style: str, g, blocks=("transformer_blocks.",)
                      ) -> dict[str, torch.Tensor]:
    """Qwen-Image / LTX-Video / HiDream files outside diffusers: ``diffusion_model.`` + diffusers
    names (``lora_down``/``lora_up`` + ``.alpha``, or ``lora_A``/``lora_B``) of the blocks."""
    out = {}
    for name, (o, i) in D.linears(model, lambda n: n.startswith(blocks)).items():
        if style == "down_up":
            out[f"diffusion_model.{name}.lora_down.weight"] = _rand(g, 2, i)
            out[f"diffusion_model.{name}.lora_up.weight"] = _rand(g, o, 2)
            out[f"diffusion_model.{name}.alpha"] = torch.tensor(3.0)
        else:
            out[f"diffusion_model.{name}.lora_A.weight"] = _rand(g, 2, i)
            out[f"diffusion_model.{name}.lora_B.weight"] = _rand(g, o, 2)
    return out


_HV_ORIGINAL = {  # diffusers path below a block -> the original checkpoint's (published scheme)
    "double": {"attn.to_out.0": "img_attn_proj", "attn.to_add_out": "txt_attn_proj",
               "ff.net.0.proj": "img_mlp.fc1", "ff.net.2": "img_mlp.fc2",
               "ff_context.net.0.proj": "txt_mlp.fc1", "ff_context.net.2": "txt_mlp.fc2",
               "norm1.linear": "img_mod.linear", "norm1_context.linear": "txt_mod.linear"},
    "single": {"proj_out": "linear2", "norm.linear": "modulation.linear"},
    "refiner": {"attn.to_out.0": "self_attn_proj", "ff.net.0.proj": "mlp.fc1",
                "ff.net.2": "mlp.fc2", "norm_out.linear": "adaLN_modulation.1"},
    "top": {"context_embedder.proj_in": "txt_in.input_embedder",
            "context_embedder.time_text_embed.timestep_embedder.linear_1": "txt_in.t_embedder.mlp.0",
            "context_embedder.time_text_embed.timestep_embedder.linear_2": "txt_in.t_embedder.mlp.2",
            "context_embedder.time_text_embed.text_embedder.linear_1": "txt_in.c_embedder.linear_1",
            "context_embedder.time_text_embed.text_embedder.linear_2": "txt_in.c_embedder.linear_2",
            "time_text_embed.timestep_embedder.linear_1": "time_in.mlp.0",
            "time_text_embed.timestep_embedder.linear_2": "time_in.mlp.2",
            "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
            "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
            "time_text_embed.guidance_embedder.linear_1": "guidance_in.mlp.0",
            "time_text_embed.guidance_embedder.linear_2": "guidance_in.mlp.2",
            "proj_out": "final_layer.linear"},
}


def _hv_original_state(model, g) -> dict[str, torch.Tensor]:
    """A ComfyUI / original-names HunyuanVideo file (``diffusion_model.`` + ``lora_A``/``lora_B``,
    the spelling diffusers reads): double blocks' fused ``img_attn_qkv``/``txt_attn_qkv`` and every
    layer diffusers maps right (not ``linear1`` below width 3072, the refiner's qkv or
    ``final_layer.adaLN_modulation.1``: see the limits test)."""
    shapes = D.linears(model)
    h = shapes["transformer_blocks.0.attn.to_q"][1]
    mods = {"double_blocks.0.img_attn_qkv": (3 * h, h), "double_blocks.0.txt_attn_qkv": (3 * h, h)}
    for name, (o, i) in shapes.items():
        if m := re.match(r"transformer_blocks\.(\d+)\.(.+)$", name):
            native = _HV_ORIGINAL["double"].get(m[2])
            native = native and f"double_blocks.{m[1]}.{native}"
        elif m := re.match(r"single_transformer_blocks\.(\d+)\.(.+)$", name):
            native = _HV_ORIGINAL["single"].get(m[2])
            native = native and f"single_blocks.{m[1]}.{native}"
        elif m := re.match(r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.(.+)$", name):
            native = _HV_ORIGINAL["refiner"].get(m[2])
            native = native and f"txt_in.individual_token_refiner.blocks.{m[1]}.{native}"
        else:
            native = _HV_ORIGINAL["top"].get(name)
        if native:
            mods[native] = (o, i)
    out = {}
    for native, (o, i) in mods.items():
        out[f"diffusion_model.{native}.lora_A.weight"] = _rand(g, 2, i)
        out[f"diffusion_model.{native}.lora_B.weight"] = _rand(g, o, 2)
    return out


_LUMINA2_ORIGINAL = {"attn.to_out.0": "attention.out", "feed_forward.linear_1": "feed_forward.w1",
                     "feed_forward.linear_2": "feed_forward.w2",
                     "feed_forward.linear_3": "feed_forward.w3",
                     "norm1.linear": "adaLN_modulation.1"}


def _lumina2_original_state(model, g) -> dict[str, torch.Tensor]:
    """A ComfyUI / original-names Lumina 2 file of every block layer (what diffusers reads:
    ``diffusion_model.layers.0.attention.qkv.lora_A.weight``, fused qkv of rows q + k + v)."""
    out = {}
    for name, (o, i) in D.linears(model, lambda n: n.startswith(
            ("layers.", "noise_refiner.", "context_refiner."))).items():
        block, _, sub = re.match(r"^(\w+\.\d+)\.(attn\.to_[qkv]$)?(.*)$", name).groups()
        if sub == "":  # attn.to_q/k/v: one fused qkv per block, its rows q, k and v
            native = f"{block}.attention.qkv"
            if f"diffusion_model.{native}.lora_A.weight" in out:
                continue
            o = sum(D.linears(model)[f"{block}.attn.to_{c}"][0] for c in "qkv")
        else:
            native = f"{block}.{_LUMINA2_ORIGINAL[sub]}"
        out[f"diffusion_model.{native}.lora_A.weight"] = _rand(g, 2, i)
        out[f"diffusion_model.{native}.lora_B.weight"] = _rand(g, o, 2)
    return out


_FLUX2_ORIGINAL = {  # diffusers path (below a block) -> BFL name (published scheme)
    "double": {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
               "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
               "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2"},
    "single": {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"},
    "top": {"x_embedder": "img_in", "context_embedder": "txt_in",
            "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
            "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
            "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
            "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
            "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
            "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
            "single_stream_modulation.linear": "single_stream_modulation.lin",
            "proj_out": "final_layer.linear"},
}
# what diffusers 0.42's kohya Flux.2 reader maps (the rest it drops)
_FLUX2_KOHYA_TOP = ("img_in", "txt_in", "time_in.in_layer", "time_in.out_layer",
                    "final_layer.linear")


def _flux2_original_state(model, style: str, g) -> dict[str, torch.Tensor]:
    """A Flux.2 file of BFL names: ComfyUI (``diffusion_model.`` + ``lora_A``/``lora_B``, no
    alpha: what diffusers reads) or kohya (``lora_unet_`` + ``lora_down``/``lora_up`` +
    ``.alpha``), the double blocks' fused ``img_attn.qkv``/``txt_attn.qkv`` and every layer
    diffusers maps right (not ``final_layer.adaLN_modulation.1``; kohya: only the layers its
    kohya reader maps). Ranks 4 (qkv: not a multiple of 3, so A is shared, as trainers write)."""
    shapes = D.linears(model)
    h = shapes["transformer_blocks.0.attn.to_q"][1]
    mods = {}
    for name, (o, i) in shapes.items():
        if m := re.match(r"transformer_blocks\.(\d+)\.attn\.(to_q|add_q_proj)$", name):
            stream = "img" if m[2] == "to_q" else "txt"
            mods[f"double_blocks.{m[1]}.{stream}_attn.qkv"] = (3 * h, h)
        elif m := re.match(r"transformer_blocks\.(\d+)\.(.+)$", name):
            if native := _FLUX2_ORIGINAL["double"].get(m[2]):
                mods[f"double_blocks.{m[1]}.{native}"] = (o, i)
        elif m := re.match(r"single_transformer_blocks\.(\d+)\.(.+)$", name):
            mods[f"single_blocks.{m[1]}.{_FLUX2_ORIGINAL['single'][m[2]]}"] = (o, i)
        elif native := _FLUX2_ORIGINAL["top"].get(name):
            if style == "comfy" or native in _FLUX2_KOHYA_TOP:
                mods[native] = (o, i)
    out = {}
    for native, (o, i) in mods.items():
        if style == "kohya":
            stem = "lora_unet_" + native.replace(".", "_")
            out[f"{stem}.lora_down.weight"] = _rand(g, 4, i)
            out[f"{stem}.lora_up.weight"] = _rand(g, o, 4)
            out[f"{stem}.alpha"] = torch.tensor(2.0)
        else:
            out[f"diffusion_model.{native}.lora_A.weight"] = _rand(g, 4, i)
            out[f"diffusion_model.{native}.lora_B.weight"] = _rand(g, o, 4)
    return out


def test_flux2_limits_of_diffusers(tmp_path):
    """diffusers 0.42's Flux.2 readers: the kohya one drops ``guidance_in``, the shared
    modulations and ``final_layer.adaLN_modulation.1`` (a warning); the BFL one reads
    ``final_layer.adaLN_modulation.1`` without the shift/scale swap (a wrong update), and takes a
    ComfyUI file spelled ``lora_down``/``lora_up`` + ``.alpha`` for a kohya one (nothing is
    applied). lorakit reads all of these exactly and writes files diffusers applies right."""
    models = {"transformer": D.flux2()}
    src = build(models)
    kohya = lorakit.save(src, tmp_path / "k.safetensors", "kohya")
    ms = {"transformer": D.flux2()}
    D.diffusers_load("flux2", kohya, ms)
    got = D.applied(ms["transformer"])
    lost = {k[len("transformer."):] for k in src.modules} - set(got)
    assert lost and all(p.startswith(FLUX2_KOHYA_DROPPED) for p in lost), sorted(lost)
    assert {p for p in lost if not p.startswith("time_guidance")} == {
        "double_stream_modulation_img.linear", "double_stream_modulation_txt.linear",
        "single_stream_modulation.linear", "norm_out.linear"}
    back = to_naming(lorakit.load(kohya), adapter_family(src), "diffusers")
    assert sorted(back.modules) == sorted(src.modules)
    for k, m in back.modules.items():
        ref = _delta(src.modules[k])
        assert float((_delta(m) - ref).norm()) < RTOL * float(ref.norm()), k
    final = build(models, lambda c, n: n in ("norm_out.linear", "transformer_blocks.0.attn.to_q"))
    file = lorakit.save(final, tmp_path / "f.safetensors", "bfl", family="flux2")
    ms = {"transformer": D.flux2()}
    D.diffusers_load("flux2", file, ms)
    got = D.applied(ms["transformer"])["norm_out.linear"]
    m = final.modules["transformer.norm_out.linear"]
    a, b = m.down.double(), m.up.double()
    h = b.shape[0] // 2
    wrong = m.scale * torch.cat([b[h:], b[:h]]) @ a  # the file's (shift, scale) B, unswapped
    assert float((got - wrong).norm()) < RTOL * float(wrong.norm())
    assert float((got - _delta(m)).norm()) > 0.1 * float(_delta(m).norm())
    back = to_naming(lorakit.load(file), FLUX2, "diffusers")
    ref = _delta(m)
    assert float((_delta(back.modules["transformer.norm_out.linear"]) - ref).norm()) < \
        RTOL * float(ref.norm())
    g = torch.Generator().manual_seed(4)
    state = {}
    for k, v in _flux2_original_state(models["transformer"], "comfy", g).items():
        k = k.replace("lora_A", "lora_down").replace("lora_B", "lora_up")
        state[k] = v
        if k.endswith("lora_down.weight"):
            state[k.replace("lora_down.weight", "alpha")] = torch.tensor(8.0)  # scale 2
    comfy = tmp_path / "c.safetensors"
    save_file(state, str(comfy))
    ms = {"transformer": D.flux2()}
    D.diffusers_load("flux2", comfy, ms)
    assert D.applied(ms["transformer"]) == {}
    a = lorakit.load(comfy)
    assert adapter_family(a).name == "flux2" and all(m.scale == 2.0 for m in a.modules.values())
    out = lorakit.save(a, tmp_path / "ab.safetensors", "bfl")
    judge("flux2", out, {"transformer": D.flux2()},
          {("transformer", k[len("transformer."):]): _delta(m)
           for k, m in to_naming(a, FLUX2, "diffusers").modules.items()})


_HIDREAM = ("double_stream_blocks.", "single_stream_blocks.", "caption_projection.")


def test_hidream_comfyui_down_up_alpha_is_lorakits_alone(tmp_path):
    """A HiDream ComfyUI file spelled ``lora_down``/``lora_up`` + ``.alpha``: diffusers 0.42 fails
    on it (its reader only strips ``diffusion_model.``); lorakit reads it and writes the
    ``lora_A``/``lora_B`` file diffusers applies exactly."""
    ms = {"transformer": D.hidream()}
    state = _same_names_state(ms["transformer"], "down_up", torch.Generator().manual_seed(2),
                              _HIDREAM)
    file = tmp_path / "c.safetensors"
    save_file(state, str(file))
    with pytest.raises(IndexError):
        D.diffusers_load("hidream", file, {"transformer": D.hidream()})
    a = lorakit.load(file)
    assert adapter_family(a).name == "hidream" and a.modules  # alpha 3, rank 2: scale 1.5
    assert all(m.scale == 1.5 for m in a.modules.values())
    out = lorakit.save(a, tmp_path / "ab.safetensors", "bfl")
    judge("hidream", out, ms, {("transformer", k[len("transformer."):]): _delta(m)
                               for k, m in a.modules.items()})


READ_CASES = {  # name: (family, models, state builder)
    "flux-kohya": ("flux1", lambda: {"transformer": D.flux()},
                   lambda ms, g: _flux_bfl_state(16, "kohya", g)),
    "flux-comfyui": ("flux1", lambda: {"transformer": D.flux()},
                     lambda ms, g: _flux_bfl_state(16, "comfy", g)),
    "flux-xlabs": ("flux1", lambda: {"transformer": D.flux()}, lambda ms, g: _xlabs_state(16, g)),
    "flux-aitoolkit-kohya-names": ("flux1", lambda: {"transformer": D.flux()},
                                   lambda ms, g: _mixture_state(ms["transformer"], g)),
    "wan-comfyui": ("wan", lambda: {"transformer": D.wan()},
                    lambda ms, g: _wan_state(ms["transformer"], "comfy", g)),
    "wan-musubi": ("wan", lambda: {"transformer": D.wan()},
                   lambda ms, g: _wan_state(ms["transformer"], "musubi", g)),
    "sdxl-kohya-sgm": ("sdxl", lambda: {"unet": D.unet(True)},
                       lambda ms, g: _sgm_state(ms["unet"], g)),
    "qwenimage-comfyui": ("qwenimage", lambda: {"transformer": D.qwen()},
                          lambda ms, g: _same_names_state(ms["transformer"], "down_up", g)),
    "ltxvideo-comfyui": ("ltxvideo", lambda: {"transformer": D.ltx()},
                         lambda ms, g: _same_names_state(ms["transformer"], "ab", g)),
    "hunyuanvideo-comfyui": ("hunyuanvideo", lambda: {"transformer": D.hunyuan()},
                             lambda ms, g: _hv_original_state(ms["transformer"], g)),
    "lumina2-comfyui": ("lumina2", lambda: {"transformer": D.lumina2(real=True)},
                        lambda ms, g: _lumina2_original_state(ms["transformer"], g)),
    "hidream-comfyui": ("hidream", lambda: {"transformer": D.hidream()},
                        lambda ms, g: _same_names_state(ms["transformer"], "ab", g, _HIDREAM)),
    "flux2-comfyui": ("flux2", lambda: {"transformer": D.flux2()},
                      lambda ms, g: _flux2_original_state(ms["transformer"], "comfy", g)),
    "flux2-kohya": ("flux2", lambda: {"transformer": D.flux2()},
                    lambda ms, g: _flux2_original_state(ms["transformer"], "kohya", g)),
    "zimage-comfyui": ("zimage", lambda: {"transformer": D.zimage()},
                       lambda ms, g: _zimage_original_state(ms["transformer"], g)),
    "zimage-kohya": ("zimage", lambda: {"transformer": D.zimage()},
                     lambda ms, g: _zimage_kohya_state(ms["transformer"], g)),
    "ltx2-comfyui": ("ltx2", lambda: {"transformer": D.ltx2(), "connectors": D.ltx2_connectors()},
                     lambda ms, g: ltx2_original_state(ms, g)),
    # the other spellings of diffusers' Z-Image reader (_convert_non_diffusers_z_image_lora_...)
    "zimage-comfyui-dotted": ("zimage", lambda: {"transformer": D.zimage()},
                              lambda ms, g: _zimage_spelled(ms["transformer"], g, qkv=True,
                                                            suffixes=ZIMAGE_DOTTED)),
    "zimage-kohya-fused": ("zimage", lambda: {"transformer": D.zimage()},
                           lambda ms, g: _zimage_spelled(ms["transformer"], g, "lora_unet_",
                                                         qkv=True)),
    "zimage-peft-default": ("zimage", lambda: {"transformer": D.zimage()},
                            lambda ms, g: _zimage_spelled(ms["transformer"], g, out=False,
                                                          suffixes=ZIMAGE_DEFAULT, alpha=False)),
    "zimage-bare-down-up": ("zimage", lambda: {"transformer": D.zimage()},
                            lambda ms, g: _zimage_spelled(ms["transformer"], g, "")),
}

ZIMAGE_DOTTED = ("lora.down.weight", "lora.up.weight")  # diffusers' dotted spelling
ZIMAGE_DEFAULT = ("lora_A.default.weight", "lora_B.default.weight")  # PEFT's adapter name kept


def _zimage_spelled(model, g, prefix="diffusion_model.", *, qkv=False, out=True,
                    suffixes=("lora_down.weight", "lora_up.weight"), alpha=True
                    ) -> dict[str, torch.Tensor]:
    """A Z-Image file in one of the spellings diffusers' reader takes: ``prefix`` (kohya's
    ``lora_unet_`` spells the path with underscores: ``lora_unet_layers_0_attention_qkv``, what
    musubi-tuner's ``convert_z_image_lora_to_comfy`` writes; ``""`` for none) + every layer's
    path, ``attention.out`` for ``to_out.0`` when ``out``, q, k, v as one fused
    ``attention.qkv`` (rows q + k + v) when ``qkv``; ``suffixes`` (down, up), ``.alpha`` 3."""
    res = {}
    lin = D.linears(model)
    for name, (o, i) in lin.items():
        native = name.replace("attention.to_out.0", "attention.out") if out else name
        if qkv and (m := re.match(r"^(.*)\.attention\.to_([qkv])$", name)):
            if m[2] != "q":
                continue
            native = f"{m[1]}.attention.qkv"
            o = sum(lin[f"{m[1]}.attention.to_{c}"][0] for c in "qkv")
        stem = prefix + (native.replace(".", "_") if prefix == "lora_unet_" else native)
        res[f"{stem}.{suffixes[0]}"] = _rand(g, 2, i)
        res[f"{stem}.{suffixes[1]}"] = _rand(g, o, 2)
        if alpha:
            res[f"{stem}.alpha"] = torch.tensor(3.0)
    return res


# LTX-2's top-level layers in the original checkpoint (the published scheme diffusers' reader
# renames): diffusers' first path segment -> the original's; the blocks keep their names
LTX2_ORIGINAL = {
    "transformer": {"proj_in": "patchify_proj", "audio_proj_in": "audio_patchify_proj",
                    "time_embed": "adaln_single", "audio_time_embed": "audio_adaln_single",
                    "av_cross_attn_video_scale_shift": "av_ca_video_scale_shift_adaln_single",
                    "av_cross_attn_audio_scale_shift": "av_ca_audio_scale_shift_adaln_single",
                    "av_cross_attn_video_a2v_gate": "av_ca_a2v_gate_adaln_single",
                    "av_cross_attn_audio_v2a_gate": "av_ca_v2a_gate_adaln_single",
                    "prompt_adaln": "prompt_adaln_single",
                    "audio_prompt_adaln": "audio_prompt_adaln_single"},
    "connectors": {"text_proj_in": "aggregate_embed", "video_text_proj_in": "video_aggregate_embed",
                   "audio_text_proj_in": "audio_aggregate_embed"},
}


def ltx2_original_state(models, g, style: str = "ab") -> dict[str, torch.Tensor]:
    """A ComfyUI / original-names LTX-2 file: the transformer under ``diffusion_model.``, the
    connectors under ``text_embedding_projection.``, top-level layers renamed as the original
    checkpoint names them; ``lora_A``/``lora_B`` (what diffusers' reader takes), or with
    ``style="down_up"`` ``lora_down``/``lora_up`` + ``.alpha`` 3 (scale 1.5)."""
    prefix = {"transformer": "diffusion_model.", "connectors": "text_embedding_projection."}
    a, b = ("lora_down", "lora_up") if style == "down_up" else ("lora_A", "lora_B")
    out = {}
    for comp, model in models.items():
        for name, (o, i) in D.linears(model).items():
            head, dot, rest = name.partition(".")
            k = prefix[comp] + LTX2_ORIGINAL[comp].get(head, head) + dot + rest
            out[f"{k}.{a}.weight"] = _rand(g, 2, i)
            out[f"{k}.{b}.weight"] = _rand(g, o, 2)
            if style == "down_up":
                out[f"{k}.alpha"] = torch.tensor(3.0)
    return out


def _zimage_original_state(model, g, qkv=False) -> dict[str, torch.Tensor]:
    """A ComfyUI / original-names Z-Image file (``diffusion_model.`` + ``lora_down``/
    ``lora_up`` + ``.alpha``, what diffusers' reader takes): every layer under its original name,
    ``attention.out`` for ``attention.to_out.0``; with ``qkv`` the attention's q, k, v as one
    fused ``attention.qkv``, else split (``attention.to_q``...)."""
    out = {}
    lin = D.linears(model)
    for name, (o, i) in lin.items():
        native = name.replace("attention.to_out.0", "attention.out")
        if qkv and (m := re.match(r"^(.*)\.attention\.to_([qkv])$", name)):
            if m[2] != "q":
                continue
            native = f"{m[1]}.attention.qkv"
            o = sum(lin[f"{m[1]}.attention.to_{c}"][0] for c in "qkv")
        out[f"diffusion_model.{native}.lora_down.weight"] = _rand(g, 2, i)
        out[f"diffusion_model.{native}.lora_up.weight"] = _rand(g, o, 2)
        out[f"diffusion_model.{native}.alpha"] = torch.tensor(3.0)
    return out


def _zimage_kohya_state(model, g) -> dict[str, torch.Tensor]:
    """A kohya Z-Image file: ``lora_unet_`` + the diffusers path with underscores
    (``lora_unet_layers_0_attention_to_q``, ``lora_unet_all_x_embedder_2-1``), ``lora_down``/
    ``lora_up`` + ``.alpha`` (what diffusers' reader takes)."""
    out = {}
    for name, (o, i) in D.linears(model).items():
        k = "lora_unet_" + name.replace(".", "_")
        out[f"{k}.lora_down.weight"] = _rand(g, 2, i)
        out[f"{k}.lora_up.weight"] = _rand(g, o, 2)
        out[f"{k}.alpha"] = torch.tensor(3.0)
    return out


def test_zimage_limits_of_diffusers(tmp_path):
    """diffusers 0.42's Z-Image reader splits a fused ``attention.qkv`` only in its dotted
    ``.lora.down.weight`` spelling: a ComfyUI ``lora_down``/``lora_up`` file's qkv is left fused
    and dropped ("unexpected keys", nothing applied to q, k, v; the other layers are); lorakit
    reads it, split exactly, so lorakit's ComfyUI files load in diffusers without q, k, v."""
    g = torch.Generator().manual_seed(3)
    state = _zimage_original_state(D.zimage(), g, qkv=True)
    file = tmp_path / "qkv.safetensors"
    save_file(state, str(file))
    a = lorakit.load(file)
    assert adapter_family(a).name == "zimage"
    d = to_naming(a, adapter_family(a), "diffusers").modules
    assert "transformer.layers.0.attention.to_v" in d
    model = D.zimage()
    D.diffusers_load("zimage", file, {"transformer": model})
    got = D.applied(model)
    assert not [n for n in got if re.search(r"attention\.to_[qkv]$", n)]
    assert {n for n in got} == {k[len("transformer."):] for k in d
                                if not re.search(r"attention\.to_[qkv]$", k)}


@pytest.mark.parametrize("case", list(READ_CASES))
def test_lorakit_reads_what_diffusers_applies(case, tmp_path):
    family, models, make = READ_CASES[case]
    ms = models()
    state = make(ms, torch.Generator().manual_seed(1))
    file = tmp_path / f"{case}.safetensors"
    save_file(state, str(file))
    D.diffusers_load(family, file, ms)
    got = {(comp, n): d for comp, model in ms.items() for n, d in D.applied(model).items()}
    a = lorakit.load(file)
    assert adapter_family(a).name == family
    mine = {}
    for key, m in to_naming(a, adapter_family(a), "diffusers").modules.items():
        comp, _, path = key.partition(".")
        mine[(comp, path)] = _delta(m)
    assert set(mine) == set(got) and got, (sorted(set(mine) ^ set(got))[:4])
    for k, ref in got.items():
        err = float((mine[k] - ref).norm() / ref.norm())
        assert err < RTOL, (k, err)


@pytest.mark.real
@pytest.mark.parametrize("layout", ["original", "kohya"])
def test_real_flux_aitoolkit_file_in_diffusers(layout, tmp_path):
    """Deliver 6: the real ai-toolkit Flux.1 LoRA (single blocks 7, 12, 16, 20, proj_out, real
    width 3072 + 12288 -> 3072), as published and as lorakit's kohya file (``linear2``): diffusers
    applies the four updates lorakit reads. Only the adapted layers of the model exist."""
    from tests.conftest import require_real

    src = require_real("flux1_aitoolkit_leighwoods") / "lora.safetensors"
    a = lorakit.load(src)
    file = src if layout == "original" else lorakit.save(a, tmp_path / "k.safetensors", "kohya")
    model = D.flux_real_single(21, (7, 12, 16, 20))
    judge("flux1", file, {"transformer": model},
          {("transformer", k[len("transformer."):]): _delta(m) for k, m in a.modules.items()})
