"""Layouts spelled as ``<component prefix><module path>.<suffix>``: BFL/ComfyUI and XLabs files.

* ``bfl`` (alias ``comfyui``): the original checkpoint's names under ``diffusion_model.``
  (``diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight`` with ``.alpha``, or
  ``lora_A``/``lora_B``), CLIP-L under ``text_encoders.clip_l.transformer.``, T5 under
  ``text_encoders.t5xxl.transformer.``, LTX-2's text connectors under
  ``text_embedding_projection.``. Flux.1 is written with ``lora_down``/``lora_up`` and
  ``.alpha``, as ComfyUI saves and reads it; Wan 2.x with ``lora_A``/``lora_B`` and no alphas
  (scales folded into ``lora_B``), as Wan files in the field are. Ideogram 4's
  ``conditional_transformer.`` prefix is read as ``diffusion_model.``.
  Also read: diffusers' dotted ``lora.down.weight``/``lora.up.weight`` and PEFT's
  ``lora_A.default.weight`` (the adapter name left in the key), as diffusers' Z-Image reader takes.
* ``aitoolkit`` (read only, as ``bfl``): ai-toolkit's PEFT state dict of Krea 2's original model,
  ``base_model.model.blocks.0.attn.wq.lora_A.weight`` with no adapter_config.json and no alphas.
* ``falkontext`` (alias ``fal-kontext``): fal's Flux.1 Kontext trainer, PEFT keys over the BFL
  checkpoint (``base_model.model.double_blocks.0.img_attn.qkv.lora_A.weight``), no alphas:
  written with every scale folded into ``lora_B``.
* ``bflcontrol`` (alias ``bfl-control``): BFL's Flux.1 Canny/Depth control LoRAs, bare BFL names
  (``double_blocks.0.img_attn.qkv.lora_A.weight``) with a ``lora_B.bias`` per module, no alphas,
  and the full query/key norm scales of every block (``double_blocks.0.img_attn.norm.query_norm
  .scale``), kept as the adapter's extras and written back verbatim.
* ``xlabs``: XLabs' Flux attention processors, ``double_blocks.0.processor.qkv_lora1.down.weight``
  (optionally under ``diffusion_model.``). XLabs files hold no alpha (scale 1): written, every
  module's scale is folded into ``up`` (in float32, stored in the factors' dtype).

Keys are grouped by module path (the stem) and :attr:`Spelling.suffixes` (the roles).

Example:
    >>> BFL.split_key("diffusion_model.blocks.0.self_attn.q.lora_A.weight")
    ('transformer', 'blocks.0.self_attn.q', 'down')
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorakit.adapter import Adapter, LoraModule, check_finite
from lorakit.errors import ConfigMismatchError, UnknownLayoutError
from lorakit.formats.common import (
    build_modules,
    cast,
    check_variants,
    refuse_embedding_lora,
    scalar_value,
)
from lorakit.io import write_safetensors


@dataclass(frozen=True)
class Spelling:
    """How one layout spells keys: component prefixes, suffix roles and what it writes."""

    name: str
    prefixes: tuple[tuple[str, str], ...]  # (key prefix, component), longest prefix first
    suffixes: tuple[tuple[str, str], ...]  # (file suffix, slot: down/up/alpha/magnitude)
    write: tuple[str, str, str | None]  # down, up, alpha suffix (None: scale folded into up)
    naming: str  # the family naming its paths use (rename.NAMINGS)
    bias: str | None = None  # suffix a lora_B bias is written with (None: refused)
    extras: bool = False  # the family's known extra tensors (norm scales) are read and written

    def split_key(self, key: str) -> tuple[str, str, str] | None:
        """``(component, module path, slot)`` of a key, or None when it does not fit."""
        for prefix, comp in self.prefixes:
            if not key.startswith(prefix):
                continue
            body = key[len(prefix):]
            for suffix, slot in self.suffixes:
                if body.endswith("." + suffix) and len(body) > len(suffix) + 1:
                    return comp, body[:-len(suffix) - 1], slot
            return None
        return None

    def prefix_of(self, component: str | None) -> str | None:
        return next((p for p, c in self.prefixes if c == component), None)


_LORA = (("lora_down.weight", "down"), ("lora_up.weight", "up"), ("lora_A.weight", "down"),
         ("lora_B.weight", "up"), ("alpha", "alpha"), ("dora_scale", "magnitude"),
         ("lora_B.bias", "bias"),
         # diffusers' dotted spelling and PEFT's adapter name in the key (Z-Image files)
         ("lora.down.weight", "down"), ("lora.up.weight", "up"),
         ("lora_A.default.weight", "down"), ("lora_B.default.weight", "up"))

BFL = Spelling("bfl", (("text_encoders.clip_l.transformer.", "text_encoder"),
                       ("text_encoders.t5xxl.transformer.", "text_encoder_2"),
                       ("diffusion_model.llm_adapter.", "text_conditioner"),  # Anima's
                       ("diffusion_model.", "transformer"),
                       ("text_embedding_projection.", "connectors"),  # LTX-2's connectors
                       ("conditional_transformer.", "transformer")),  # Ideogram 4's, read only
               _LORA, ("lora_down.weight", "lora_up.weight", "alpha"), "native")
XLABS = Spelling("xlabs", (("diffusion_model.", "transformer"), ("", "transformer")),
                 (("down.weight", "down"), ("up.weight", "up")),
                 ("down.weight", "up.weight", None), "xlabs")
# ComfyUI's Wan, LTX-Video, HunyuanVideo, Lumina 2, HiDream, Flux.2, LTX-2, Krea 2, Flux.3 and
# Anima files: lora_A/lora_B and no alphas (diffusers' Wan reader takes alphas in blocks only,
# the others none), so scales are folded
BFL_AB = Spelling("bfl", BFL.prefixes, _LORA, ("lora_A.weight", "lora_B.weight", None), "native")
# ai-toolkit's Krea 2 files: its PEFT state dict of the original model (``base_model.model.`` +
# original names, lora_A/lora_B, no alphas) with no adapter_config.json beside it; read only
# (lorakit's ``aitoolkit`` layout is diffusers' keys): read as bfl, the layout of original names
AITOOLKIT_NATIVE = Spelling("aitoolkit", (("base_model.model.", "transformer"),), _LORA,
                            ("lora_A.weight", "lora_B.weight", None), "native")
PEFT_NATIVE_FAMILIES = ("krea2",)  # families whose ai-toolkit files are AITOOLKIT_NATIVE
FORMAT_OF = {"aitoolkit": "bfl"}  # a layout read by a spelling -> the format it reads as
FAL_KONTEXT = Spelling("falkontext", (("base_model.model.", "transformer"),), _LORA,
                       ("lora_A.weight", "lora_B.weight", None), "native")
BFL_CONTROL = Spelling("bflcontrol", (("", "transformer"),), _LORA,
                       ("lora_A.weight", "lora_B.weight", None), "native", bias="lora_B.bias",
                       extras=True)
SPELLINGS = {"bfl": BFL, "xlabs": XLABS, "aitoolkit": AITOOLKIT_NATIVE,
             "falkontext": FAL_KONTEXT, "bflcontrol": BFL_CONTROL}
# BFL names a fal Kontext file holds after ``base_model.model.``
_FAL_STEM = re.compile(r"^base_model\.model\.(double_blocks|single_blocks)\.\d+\.|"
                       r"^base_model\.model\.(final_layer|img_in|txt_in|time_in|vector_in|guidance_in)\.")
WRITE_SPELLING = {("bfl", "wan"): BFL_AB, ("bfl", "ltxvideo"): BFL_AB,
                  ("bfl", "hunyuanvideo"): BFL_AB, ("bfl", "lumina2"): BFL_AB,
                  ("bfl", "hidream"): BFL_AB, ("bfl", "flux2"): BFL_AB, ("bfl", "ltx2"): BFL_AB,
                  ("bfl", "krea2"): BFL_AB, ("bfl", "flux3"): BFL_AB, ("bfl", "anima"): BFL_AB,
                  ("bfl", "minimaxh3"): BFL_AB}  # MiniMax-H3: ai-toolkit's spelling


# LyCORIS tensors (LoHa, LoKr) of a module spelled with a BFL prefix (ai-toolkit's Z-Image and
# Flux.2 LoKr files: ``diffusion_model.layers.0.attention.to_q.lokr_w1``), read in their exact
# LoRA form (:func:`lorakit.formats.lycoris.module_from_group`)
_LYCO = re.compile(r"^(?P<stem>.+)\.(?P<suffix>lokr_(?:w1|w1_a|w1_b|w2|w2_a|w2_b|t2)|"
                   r"hada_(?:w1_a|w1_b|w2_a|w2_b|t1|t2))$")

_LYCO_ANY = re.compile(r"\.(lokr|hada)_\w+$")


def is_prefixed_lycoris(keys: list[str]) -> bool:
    """Whether ``keys`` hold LyCORIS tensors, all under a BFL prefix (``diffusion_model.``).

    Example:
        >>> is_prefixed_lycoris(["diffusion_model.layers.0.attention.to_q.lokr_w1"])
        True
        >>> is_prefixed_lycoris(["lora_unet_layers_0_attention_to_q.lokr_w1"])
        False
    """
    stems = [m["stem"] for k in keys if (m := _LYCO.match(k))]
    heads = tuple(p for p, _ in BFL.prefixes)
    return bool(stems) and all(s.startswith(heads) for s in stems)


def classify(keys: list[str]) -> str | None:
    """``"xlabs"``, ``"bfl"``, ``"falkontext"``, ``"bflcontrol"``, ``"aitoolkit"`` (original
    names under ``base_model.model.`` of a family in :data:`PEFT_NATIVE_FAMILIES`) or None. A
    control LoRA is told by its norm scales (``query_norm.scale``, as diffusers does), a fal
    Kontext file by BFL names under ``base_model.model.``."""
    if any(k.endswith(".query_norm.scale") and k.startswith(("double_blocks.", "single_blocks."))
           for k in keys):
        return "bflcontrol"
    if any(_FAL_STEM.match(k) for k in keys):
        return "falkontext"
    if any(re.search(r"(^|\.)(double|single)_blocks\.\d+\.processor\.(qkv|proj)_lora", k)
           and k.endswith((".down.weight", ".up.weight")) for k in keys):
        return "xlabs"
    if any(k.startswith(("diffusion_model.", "text_encoders.clip_l.transformer.",
                         "text_embedding_projection.", "conditional_transformer."))
           for k in keys):
        return "bfl"
    if any(k.startswith("base_model.model.") for k in keys):
        from lorakit.formats.families import detect_family

        paths = [hit[1] for k in keys if (hit := AITOOLKIT_NATIVE.split_key(k)) is not None]
        fam = detect_family(paths, component_prefix=False)
        if fam is not None and fam.name in PEFT_NATIVE_FAMILIES and \
                any(fam.is_native(p) for p in paths):
            return "aitoolkit"
    return None


def load_prefixed(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str],
                  layout: str) -> tuple[Adapter, list[str]]:
    """Build an Adapter from a BFL/ComfyUI or XLabs state dict; also returns the keys that fit
    no role (the caller accounts for them)."""
    spelling = SPELLINGS[layout]
    lyco_ok = layout == "bfl"
    # LoKr/LoHa tensors are read below (a suffix LyCORIS does not have is an unknown key)
    check_variants([k for k in tensors if not (lyco_ok and _LYCO_ANY.search(k))], path)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    lyco: dict[str, dict[str, torch.Tensor]] = {}  # module key -> {LyCORIS suffix: tensor}
    stems: dict[str, str] = {}  # module key -> its name in the file (for errors)
    alphas: dict[str, float] = {}
    unknown: list[str] = []
    extras: dict[str, torch.Tensor] = {}
    for k, t in tensors.items():
        if spelling.extras and (extra := _known_extra(spelling, k)):
            extras[extra] = t  # a full tensor (norm scale), kept verbatim
            continue
        if lyco_ok and (m := _LYCO.match(k)) and \
                (hit := spelling.split_key(f"{m['stem']}.alpha")) is not None:
            lyco.setdefault(f"{hit[0]}.{hit[1]}", {})[m["suffix"]] = t
            stems[f"{hit[0]}.{hit[1]}"] = m["stem"]
            continue
        hit = spelling.split_key(k)
        if hit is None:
            unknown.append(k)
            continue
        comp, mod, slot = hit
        key = f"{comp}.{mod}"
        if slot == "alpha":
            alphas[key] = scalar_value(t, k, path)
            continue
        p = parts.setdefault(key, {})
        if slot in p:
            raise ConfigMismatchError(f"two tensors give this module's {slot}", path=path, key=k)
        p[slot] = t
    if not parts and not lyco:
        raise UnknownLayoutError(f"no LoRA tensors in the {layout} layout", path=path,
                                 key=unknown[0] if unknown else None)
    stray = [k for k in alphas if k not in parts and k not in lyco]
    if stray:
        raise ConfigMismatchError("alpha without LoRA factors", path=path, key=stray[0])
    if both := sorted(set(parts) & set(lyco)):
        raise ConfigMismatchError("LoRA and LyCORIS tensors for one module", path=path,
                                  key=both[0])
    modules = build_modules(parts, {k: a for k, a in alphas.items() if k in parts}, path)
    modules.update(_lycoris_modules(lyco, alphas, stems, path))
    adapter = Adapter(modules=modules, extras=extras, source_format=FORMAT_OF.get(layout, layout),
                      layout=layout, metadata=dict(meta), source=str(path), component_prefix=True)
    return adapter, unknown


def _lycoris_modules(lyco: dict[str, dict[str, torch.Tensor]], alphas: dict[str, float],
                     stems: dict[str, str], path: Path) -> dict[str, LoraModule]:
    """The exact LoRA form of each LyCORIS module (``alpha`` as LyCORIS scales it); errors name
    the key as the file spells it."""
    from lorakit.formats.lycoris import module_from_group

    out = {}
    for key, group in lyco.items():
        if key in alphas:
            group = {**group, "alpha": torch.tensor(alphas[key])}
        out[key] = module_from_group(stems[key], group, path)
    check_finite(out, str(path))
    return out


def _known_extra(spelling: Spelling, key: str) -> str | None:
    """``<component>.<native path>`` of a file key that is a known extra tensor of a family
    (a Flux.1 control LoRA's norm scale), or None."""
    from lorakit.formats.families import FAMILIES

    for prefix, comp in spelling.prefixes:
        if key.startswith(prefix):
            body = key[len(prefix):]
            if any(f.extra_name(body, "native") == body for f in FAMILIES.values()):
                return f"{comp}.{body}"
            return None
    return None


def _named(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:3]) + (f", ... ({len(keys)} in all)" if len(keys) > 3 else "")


def prefixed_tensors(adapter: Adapter, spelling: Spelling,
                     dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The state dict of ``adapter`` (keys already in ``spelling.naming``)."""
    refuse_embedding_lora(adapter.modules, spelling.name)
    down_s, up_s, alpha_s = spelling.write
    out: dict[str, torch.Tensor] = {}
    if adapter.extras and not spelling.extras:
        raise ConfigMismatchError(f"the {spelling.name} layout cannot hold extra (non-LoRA) "
                                  f"tensors: {_named(adapter.extras)}",
                                  key=next(iter(adapter.extras)),
                                  hint="write diffusers or PEFT instead" + (
                                      ", or bflcontrol" if any("_norm.scale" in k for k in
                                                               adapter.extras) else "")
                                  + ", or convert with --ignore-unknown to drop them")
    for key, m in adapter.modules.items():
        comp, rest = adapter.split_key(key)
        prefix = spelling.prefix_of(comp)
        if prefix is None:
            raise ConfigMismatchError(f"the {spelling.name} layout has no place for component "
                                      f"{comp!r}", key=key)
        if (m.bias is not None and spelling.bias is None) or m.magnitude is not None:
            raise ConfigMismatchError(f"the {spelling.name} layout cannot hold a lora_B bias or "
                                      "DoRA magnitude", key=key, hint="write diffusers instead")
        down, up = cast(m.down, dtype), cast(m.up, dtype)
        bias = None if m.bias is None else cast(m.bias, dtype)
        if alpha_s is None and m.scale != 1.0:
            up = (m.up.to(torch.float32) * m.scale).to(up.dtype)  # (out, r): scale 1
            if bias is not None:  # PEFT scales lora_B's output, its bias included: (out,)
                bias = (m.bias.to(torch.float32) * m.scale).to(bias.dtype)
        out[f"{prefix}{rest}.{down_s}"] = down
        out[f"{prefix}{rest}.{up_s}"] = up
        if bias is not None:
            out[f"{prefix}{rest}.{spelling.bias}"] = bias
        if alpha_s is not None:
            alpha = m.scale * m.rank
            t = torch.tensor(alpha, dtype=down.dtype)
            out[f"{prefix}{rest}.{alpha_s}"] = t if float(t) == alpha else \
                torch.tensor(alpha, dtype=torch.float32)
    for key, t in adapter.extras.items():
        comp, rest = adapter.split_key(key)
        prefix = spelling.prefix_of(comp)
        if prefix is None or not any(f.extra_name(rest, "native") == rest
                                     for f in _families()):
            raise ConfigMismatchError(f"the {spelling.name} layout cannot hold this extra tensor "
                                      "(only a family's known ones: norm scales)", key=key)
        out[f"{prefix}{rest}"] = t  # verbatim
    if spelling.extras and not adapter.extras:
        raise ConfigMismatchError(
            f"a {spelling.name} file holds the control LoRA's norm scales and this adapter has "
            "none (it is no control LoRA)", key=next(iter(adapter.modules), None),
            hint="write bfl (ComfyUI) or kohya for a plain Flux.1 LoRA")
    return out


def _families():
    from lorakit.formats.families import FAMILIES

    return FAMILIES.values()


def save_prefixed(adapter: Adapter, file: Path, spelling: Spelling, *,
                  dtype: torch.dtype | None = None, provenance: dict[str, Any] | None = None,
                  family: str | None = None) -> None:
    """Write ``adapter`` in a prefixed layout (keys already in ``spelling.naming``)."""
    meta = {"format": "pt", "lorakit.components": json.dumps(adapter.components())}
    if family:
        meta["lorakit.family"] = family
    if provenance:
        meta["lorakit.provenance"] = json.dumps(provenance, sort_keys=True)
    if adapter.base_model:
        meta["lorakit.base_model"] = adapter.base_model
    write_safetensors(file, prefixed_tensors(adapter, spelling, dtype), meta)
