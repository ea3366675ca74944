"""kohya sd-scripts / musubi-tuner / A1111 LoRA files.

Keys are ``<name>.<suffix>``: ``lora_down.weight``, ``lora_up.weight``, ``alpha`` (missing means
``alpha = r``) and ``dora_scale`` (DoRA). The name is a kohya prefix (``lora_unet_``, ``lora_te_``,
``lora_te1_``/``lora_te2_``/``lora_te3_``, ``lora_transformer_``, plain ``lora_`` for LLMs) and a
module path with ``_`` for ``.``. :data:`SUFFIXES` maps suffixes to slots; grouping is by name
(the stem) and suffix, so more suffixes (LyCORIS) plug in there.

Names resolve through the model family (:mod:`lorakit.formats.families`): Flux.1, SD3 and Wan
kohya files use the native checkpoint names (``lora_unet_double_blocks_0_img_attn_qkv``), SDXL's
the SGM UNet's (``lora_unet_input_blocks_4_1_...``) or diffusers', SD 1.x diffusers'. The family
also says which component each prefix is (Flux: ``lora_unet_`` is the transformer,
``lora_te1_`` CLIP-L, ``lora_te3_`` T5). Without a family, names map back to dotted paths with a
vocabulary of multi-word segment names (:mod:`lorakit.naming`).

Hand-made "kohya-like" files are read too: ``_lora_down.weight`` joined with ``_`` instead of
``.``, and a doubled ``lora_unet_unet_`` prefix. They are written back in the standard layout.

Writing emits the standard layout with an ``.alpha`` tensor per module, in the naming the
family's kohya trainer writes (native for Flux.1, SD3, Wan; as read for SD/SDXL), and the
metadata kohya writes: ``ss_network_module``, ``ss_network_dim`` / ``ss_network_alpha``
(``Dynamic`` when modules differ, as kohya's resize writes), ``ss_base_model_version``, ``ss_v2``,
``modelspec.*`` (SAI model spec 1.0), plus ``lorakit.*`` provenance keys.

Example:
    >>> from lorakit.formats.kohya import kohya_module_key
    >>> kohya_module_key("lora_unet_mid_block_attentions_0_proj_in")
    'unet.mid_block.attentions.0.proj_in'
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from lorakit.adapter import Adapter
from lorakit.errors import ConfigMismatchError
from lorakit.formats import lycoris
from lorakit.formats.common import (
    build_modules,
    cast,
    check_variants,
    common_value,
    number,
    refuse_embedding_lora,
    scalar_value,
)
from lorakit.formats.dora import lycoris_dora_scale
from lorakit.formats.families import Family, detect_family
from lorakit.io import write_safetensors
from lorakit.naming import KOHYA_PREFIXES, dotted_to_kohya, kohya_to_dotted, split_kohya_name

# file suffix -> slot of the module's parts ("alpha" is read as a number)
SUFFIXES: dict[str, str] = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha",
                            "dora_scale": "magnitude"}
_KEY = re.compile(r"^(?P<name>lora_[A-Za-z0-9_-]+?)(?P<sep>[._])(?P<role>"
                  + "|".join(re.escape(s) for s in SUFFIXES) + r")$")

SDXL_TE_KEY = "lorakit.kohya_te_prefix"  # metadata key: the text-encoder prefix read


def classify(keys: list[str]) -> str | None:
    """``"kohya"``, ``"kohya_like"`` (underscore-joined suffixes) or None."""
    hits = [m for k in keys if (m := _KEY.match(k))]
    if not hits:
        return None
    if any(m["sep"] == "_" for m in hits):
        return "kohya_like"
    return "kohya"


def kohya_module_key(name: str, components: bool = True) -> str:
    """Dotted module key (with component) for a kohya name, by the vocabulary alone.

    Example:
        >>> kohya_module_key("lora_te_text_model_encoder_layers_0_self_attn_q_proj")
        'text_encoder.text_model.encoder.layers.0.self_attn.q_proj'
    """
    comp, rest = split_kohya_name(name) if components else (None, name[len("lora_"):])
    if comp == "unet" and rest.startswith("unet_"):
        rest = rest[len("unet_"):]  # kohya-like files repeat the component: lora_unet_unet_...
    dotted = kohya_to_dotted(rest)
    return f"{comp}.{dotted}" if comp else dotted


def _prefix(name: str) -> str:
    return next((p for p, _ in KOHYA_PREFIXES if name.startswith(p)), "lora_")


def family_key(name: str, family: Family | None) -> str:
    """The adapter key of a kohya name: component from the family's prefixes, native paths from
    its rules, anything else from the vocabulary.

    Example:
        >>> from lorakit.formats.families import FLUX1
        >>> family_key("lora_unet_final_layer_adaLN_modulation_1", FLUX1)
        'transformer.final_layer.adaLN_modulation.1'
    """
    generic = kohya_module_key(name)
    if family is None:
        return generic
    prefix = _prefix(name)
    comp = family.component_of_kohya(prefix)
    if comp is None:
        return generic
    rest = name[len(prefix):]
    if prefix == "lora_unet_" and rest.startswith("unet_"):
        rest = rest[len("unet_"):]
    if comp is family.denoiser:
        for rule in family.rules:
            if (dotted := rule.native_of_kohya(rest)) is not None:
                return f"{comp.name}.{dotted}"
    return f"{comp.name}.{kohya_to_dotted(rest)}"


def group_keys(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]],
                                                          list[str]]:
    """``{kohya name: {slot: tensor}}`` and the keys that fit no kohya suffix."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for k, t in tensors.items():
        m = _KEY.match(k)
        if not m:
            unknown.append(k)
            continue
        groups.setdefault(m["name"], {})[SUFFIXES[m["role"]]] = t
    return groups, unknown


def _shapes(groups: dict[str, dict[str, torch.Tensor]]) -> dict[str, tuple[int, int]]:
    out = {}
    for name, g in groups.items():
        if "down" in g and "up" in g and g["down"].ndim >= 2:
            out[kohya_module_key(name)] = (int(g["up"].shape[0]), int(g["down"].shape[1]))
    return out


def load_kohya(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str],
               layout: str) -> tuple[Adapter, list[str]]:
    """Build an Adapter from a kohya state dict read from ``path``; also returns the keys that
    fit no kohya suffix (the caller accounts for them). A LyCORIS file (``layout == "lycoris"``)
    is read into exact LoRA forms by :mod:`lorakit.formats.lycoris`; its names then resolve
    through the family like any kohya name."""
    recorded = meta.get("lorakit.components")
    with_comp = recorded != "[]"
    meta = dict(meta)
    if layout == lycoris.LAYOUT:
        known, unknown = lycoris.split_known(tensors)
        built = lycoris.read_lycoris(known, path, meta)  # {kohya name: exact LoraModule}
        stems = list(built)
        shapes = {kohya_module_key(n): (m.out_features, m.in_features) for n, m in built.items()
                  if not n.startswith("lycoris_")}
    else:
        check_variants(list(tensors), path)
        groups, unknown = group_keys(tensors)
        stems = list(groups)
        shapes = _shapes(groups)
    if any(n.startswith("lora_te1_") for n in stems):
        meta[SDXL_TE_KEY] = "lora_te1_"  # written back, so a te1-only SDXL file keeps its prefix
    family = None
    if with_comp:
        family = detect_family([kohya_module_key(n) for n in stems
                                if not n.startswith("lycoris_")], meta, shapes)
    names: dict[str, str] = {}
    for name in stems:
        if name.startswith("lycoris_"):  # LyCORIS's own wrapper prefix: no component
            key = lycoris.module_key(name, with_comp)
        else:
            key = family_key(name, family) if with_comp else kohya_module_key(name, False)
        if names.setdefault(key, name) != name:
            raise ConfigMismatchError(f"two kohya names map to module {key}", path=path, key=name)
    if layout == lycoris.LAYOUT:
        modules = {key: built[name] for key, name in names.items()}
    else:
        modules = build_modules(*_parts(groups, names, path), path, dora="lycoris")
    base = meta.get("ss_sd_model_name") or meta.get("modelspec.architecture") or None
    prefixed = with_comp and any(split_kohya_name(n)[0] for n in names.values()
                                 if not n.startswith("lycoris_"))
    adapter = Adapter(modules=modules, source_format="kohya", layout=layout, metadata=meta,
                      base_model=base, source=str(path), component_prefix=prefixed)
    return adapter, unknown


def _parts(groups: dict[str, dict[str, torch.Tensor]], names: dict[str, str], path: Path
           ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, float]]:
    """``({key: {slot: tensor}}, {key: alpha})`` of the grouped kohya tensors."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    for key, name in names.items():
        g = groups[name]
        if "alpha" in g:
            alphas[key] = scalar_value(g["alpha"], f"{name}.alpha", path)
        slots = {s: t for s, t in g.items() if s != "alpha"}
        if not slots:
            raise ConfigMismatchError("alpha without LoRA factors", path=path, key=name)
        parts[key] = slots
    return parts, alphas


def is_sdxl(adapter: Adapter) -> bool:
    """Whether the text encoder is SDXL's first one (``lora_te1_``), even when the adapter has no
    ``text_encoder_2`` modules: from kohya's ``ss_base_model_version``, the modelspec
    architecture, or the prefix the file was read with.

    Example:
        >>> is_sdxl(Adapter(metadata={"ss_base_model_version": "sdxl_base_v1-0"}))
        True
    """
    meta = adapter.metadata
    return ("text_encoder_2" in adapter.components()
            or str(meta.get("ss_base_model_version", "")).startswith("sdxl")
            or "-xl-" in str(meta.get("modelspec.architecture", ""))
            or meta.get(SDXL_TE_KEY) == "lora_te1_")


def _kohya_name(adapter: Adapter, key: str, comps: list[str], family: Family | None) -> str:
    comp, rest = adapter.split_key(key)
    if family is not None and (c := family.component(comp)) is not None:
        if not c.kohya:
            raise ConfigMismatchError(f"kohya files have no prefix for {family.title}'s "
                                      f"component {comp!r}", key=key,
                                      hint="write diffusers or peft instead")
        return c.kohya + rest.replace(".", "_")
    return dotted_to_kohya(comp, rest, comps)


def _alpha_tensor(alpha: float, dtype: torch.dtype) -> torch.Tensor:
    for dt in (dtype, torch.float32, torch.float64):  # the narrowest dtype that holds it exactly
        t = torch.tensor(alpha, dtype=dt)
        if float(t.item()) == alpha:
            return t
    return t


def kohya_tensors(adapter: Adapter, dtype: torch.dtype | None,
                  family: Family | None = None) -> dict[str, torch.Tensor]:
    """The kohya state dict of ``adapter`` (keys already in the naming to write)."""
    refuse_embedding_lora(adapter.modules, "kohya")
    comps = adapter.components()
    if is_sdxl(adapter) and "text_encoder_2" not in comps:
        comps = [*comps, "text_encoder_2"]  # SDXL's first text encoder is lora_te1_
    if adapter.extras:  # named before any module (a control LoRA's norm scales)
        keys = sorted(adapter.extras)
        more = f", ... ({len(keys)} in all)" if len(keys) > 3 else ""
        raise ConfigMismatchError("kohya files cannot hold extra (non-LoRA) tensors: "
                                  + ", ".join(keys[:3]) + more, key=next(iter(adapter.extras)),
                                  hint="write PEFT or diffusers instead, or convert with "
                                       "--ignore-unknown to drop them")
    out: dict[str, torch.Tensor] = {}
    for key, m in adapter.modules.items():
        name = _kohya_name(adapter, key, comps, family)
        down, up = cast(m.down, dtype), cast(m.up, dtype)
        if m.bias is not None:
            raise ConfigMismatchError("kohya files cannot hold a lora_B bias", key=key,
                                      hint="write PEFT or diffusers instead")
        alpha = float(m.alpha)
        if m.rslora:  # kohya has no rsLoRA flag: store the alpha that gives the same scale
            alpha = m.scale * m.rank
        if f"{name}.lora_down.weight" in out:
            raise ConfigMismatchError(f"two modules have the kohya name {name}", key=key)
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.lora_up.weight"] = up
        out[f"{name}.alpha"] = _alpha_tensor(alpha, down.dtype)
        if m.magnitude is not None:  # (out, 1) / (1, in) as LyCORIS stores it
            out[f"{name}.dora_scale"] = cast(lycoris_dora_scale(m, key), dtype)
    return out


def _dynamic(values: list) -> str:
    """kohya's ``ss_network_dim``/``alpha``: the common value, or ``Dynamic`` when they differ."""
    distinct = set(values)
    if len(distinct) > 1:
        return "Dynamic"
    return str(number(values[0])) if values else "0"


_IMPLEMENTATION = {"flux1": "https://github.com/black-forest-labs/flux",
                   "sd3": "https://github.com/Stability-AI/sd3.5",
                   "sdxl": "https://github.com/Stability-AI/generative-models",
                   "sd15": "diffusers", "wan": "https://github.com/Wan-Video/Wan2.1",
                   "hunyuanvideo": "https://github.com/Tencent/HunyuanVideo",
                   "flux2": "https://github.com/black-forest-labs/flux2"}


def _family_metadata(adapter: Adapter, family: Family | None, meta: dict[str, str]) -> None:
    if family is None and is_sdxl(adapter):
        from lorakit.formats.families import SDXL

        family = SDXL
    if family is None:
        return
    meta["lorakit.family"] = family.name
    meta.setdefault("ss_base_model_version", family.base_version)
    meta["ss_v2"] = "True" if meta.get("ss_base_model_version", "").startswith("sd_v2") \
        else "False"
    meta.setdefault("modelspec.sai_model_spec", "1.0.0")
    meta.setdefault("modelspec.architecture", family.modelspec)
    meta.setdefault("modelspec.implementation", _IMPLEMENTATION.get(family.name, "diffusers"))
    title = Path(adapter.source).stem if adapter.source else "lora"
    meta.setdefault("modelspec.title", title)


def kohya_metadata(adapter: Adapter, provenance: dict[str, Any] | None,
                   family: Family | None = None) -> dict[str, str]:
    meta = dict(adapter.metadata) if adapter.source_format == "kohya" else {}
    meta = lycoris.lora_metadata(meta)  # a LyCORIS source is written as plain LoRA
    mods = list(adapter.modules.values())
    alphas = [m.scale * m.rank for m in mods]
    conv = [m.rank for m in mods if m.kernel and m.kernel != (1, 1)]
    meta.update({
        "ss_network_module": meta.get("ss_network_module", "networks.lora"),
        "ss_network_dim": _dynamic([m.rank for m in mods if not (m.kernel and m.kernel != (1, 1))]
                                   or [m.rank for m in mods]),
        "ss_network_alpha": _dynamic(alphas),
    })
    if conv:
        meta["ss_network_args"] = json.dumps({"conv_dim": str(common_value(conv, 0))})
    if adapter.base_model:
        meta.setdefault("ss_sd_model_name", adapter.base_model)
    _family_metadata(adapter, family, meta)
    meta["lorakit.components"] = json.dumps(adapter.components())
    if provenance:
        meta["lorakit.provenance"] = json.dumps(provenance, sort_keys=True)
    return meta


def save_kohya(adapter: Adapter, file: Path, *, dtype: torch.dtype | None = None,
               provenance: dict[str, Any] | None = None, family: Family | None = None) -> None:
    """Write ``adapter`` (keys in the naming to write) as a kohya LoRA safetensors file."""
    write_safetensors(file, kohya_tensors(adapter, dtype, family),
                      kohya_metadata(adapter, provenance, family))
