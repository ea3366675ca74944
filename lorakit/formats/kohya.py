"""kohya sd-scripts / A1111 LoRA files.

Keys ``lora_unet_<path>.lora_down.weight``, ``.lora_up.weight``, ``.alpha`` (missing means
``alpha = r``) and ``.dora_scale`` (DoRA), with prefixes ``lora_unet_``, ``lora_te_``,
``lora_te1_``/``lora_te2_`` (SDXL), ``lora_transformer_`` and plain ``lora_`` (LLMs). Conv LoRA has
``lora_down (r, in, kh, kw)`` and ``lora_up (out, r, 1, 1)``. LyCORIS variants (LoHa, LoKr, ...)
are refused by name.

Hand-made "kohya-like" files are read too: ``_lora_down.weight`` joined with ``_`` instead of
``.``, and a doubled ``lora_unet_unet_`` prefix. They are written back in the standard layout.

Writing emits the standard layout with an ``.alpha`` tensor per module and the ``ss_*`` metadata
kohya writes (``ss_network_module``, ``ss_network_dim``, ``ss_network_alpha``, ...), plus
``lorakit.*`` provenance keys.

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
from lorakit.errors import ConfigMismatchError, UnknownLayoutError
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
from lorakit.io import write_safetensors
from lorakit.naming import dotted_to_kohya, kohya_to_dotted, split_kohya_name

_KEY = re.compile(r"^(?P<name>lora_[A-Za-z0-9_]+?)(?P<sep>[._])(?P<role>lora_down\.weight|"
                  r"lora_up\.weight|alpha|dora_scale)$")


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
    """Dotted module key (with component) for a kohya module name.

    Example:
        >>> kohya_module_key("lora_te_text_model_encoder_layers_0_self_attn_q_proj")
        'text_encoder.text_model.encoder.layers.0.self_attn.q_proj'
    """
    comp, rest = split_kohya_name(name) if components else (None, name[len("lora_"):])
    if comp == "unet" and rest.startswith("unet_"):
        rest = rest[len("unet_"):]  # kohya-like files repeat the component: lora_unet_unet_...
    dotted = kohya_to_dotted(rest)
    return f"{comp}.{dotted}" if comp else dotted


def load_kohya(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str],
               layout: str) -> Adapter:
    """Build an Adapter from a kohya state dict already read from ``path``."""
    recorded = meta.get("lorakit.components")
    with_comp = recorded != "[]"
    if layout == lycoris.LAYOUT:  # hook (issue 16b): LyCORIS modules in their exact LoRA form
        modules, names = lycoris.read_modules(tensors, path, meta, with_comp)
        return _adapter(path, modules, names, meta, layout, with_comp)
    check_variants(list(tensors), path)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    names: dict[str, str] = {}
    for k, t in tensors.items():
        m = _KEY.match(k)
        if not m:
            raise UnknownLayoutError("key does not fit the kohya layout", path=path, key=k)
        key = kohya_module_key(m["name"], with_comp)
        if names.setdefault(key, m["name"]) != m["name"]:
            raise ConfigMismatchError(f"two kohya names map to module {key}", path=path, key=k)
        role = m["role"]
        if role == "alpha":
            alphas[key] = scalar_value(t, k, path)
            continue
        slot = {"lora_down.weight": "down", "lora_up.weight": "up",
                "dora_scale": "magnitude"}[role]
        parts.setdefault(key, {})[slot] = t
    stray = [k for k in alphas if k not in parts]
    if stray:
        raise ConfigMismatchError("alpha without LoRA factors", path=path, key=names[stray[0]])
    modules = build_modules(parts, alphas, path, dora="lycoris")
    return _adapter(path, modules, names, meta, layout, with_comp)


def _adapter(path: Path, modules: dict, names: dict[str, str], meta: dict[str, str], layout: str,
             with_comp: bool) -> Adapter:
    base = meta.get("ss_sd_model_name") or meta.get("modelspec.architecture") or None
    meta = dict(meta)
    if any(n.startswith("lora_te1_") for n in names.values()):
        meta[SDXL_TE_KEY] = "lora_te1_"  # written back, so a te1-only SDXL file keeps its prefix
    prefixed = with_comp and any(split_kohya_name(n)[0] for n in names.values())
    return Adapter(modules=modules, source_format="kohya", layout=layout, metadata=dict(meta),
                   base_model=base, source=str(path), component_prefix=prefixed)


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


def kohya_tensors(adapter: Adapter, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    refuse_embedding_lora(adapter.modules, "kohya")
    comps = adapter.components()
    if is_sdxl(adapter) and "text_encoder_2" not in comps:
        comps = [*comps, "text_encoder_2"]  # SDXL's first text encoder is lora_te1_
    out: dict[str, torch.Tensor] = {}
    for key, m in adapter.modules.items():
        comp, rest = adapter.split_key(key)
        name = dotted_to_kohya(comp, rest, comps)
        down, up = cast(m.down, dtype), cast(m.up, dtype)
        if m.bias is not None:
            raise ConfigMismatchError("kohya files cannot hold a lora_B bias", key=key,
                                      hint="write PEFT or diffusers instead")
        alpha = float(m.alpha)
        if m.rslora:  # kohya has no rsLoRA flag: store the alpha that gives the same scale
            alpha = m.scale * m.rank
        wd = down.dtype
        alpha_t = torch.tensor(alpha, dtype=wd)
        if float(alpha_t.item()) != alpha:
            alpha_t = torch.tensor(alpha, dtype=torch.float32)
        if float(alpha_t.item()) != alpha:  # e.g. a folded AdaLoRA or rsLoRA alpha: keep it exact
            alpha_t = torch.tensor(alpha, dtype=torch.float64)
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.lora_up.weight"] = up
        out[f"{name}.alpha"] = alpha_t
        if m.magnitude is not None:  # hook (issue 16b): (out, 1) / (1, in) as LyCORIS stores it
            out[f"{name}.dora_scale"] = cast(lycoris_dora_scale(m, key), dtype)
    if adapter.extras:
        key = next(iter(adapter.extras))
        raise ConfigMismatchError("kohya files cannot hold extra (non-LoRA) tensors", key=key,
                                  hint="write PEFT instead, or drop the extras")
    return out


def kohya_metadata(adapter: Adapter, provenance: dict[str, Any] | None) -> dict[str, str]:
    meta = dict(adapter.metadata) if adapter.source_format == "kohya" else {}
    meta = lycoris.lora_metadata(meta)  # hook (issue 16b): a LyCORIS source is written as LoRA
    ranks = [m.rank for m in adapter.modules.values()]
    alphas = [m.scale * m.rank for m in adapter.modules.values()]
    conv = [m.rank for m in adapter.modules.values() if m.kernel and m.kernel != (1, 1)]
    meta.update({
        "ss_network_module": meta.get("ss_network_module", "networks.lora"),
        "ss_network_dim": str(common_value(ranks, 0)),
        "ss_network_alpha": str(number(common_value(alphas, 0.0))),
    })
    if conv:
        meta["ss_network_args"] = json.dumps({"conv_dim": str(common_value(conv, 0))})
    if adapter.base_model:
        meta.setdefault("ss_sd_model_name", adapter.base_model)
    meta["lorakit.components"] = json.dumps(adapter.components())
    if provenance:
        meta["lorakit.provenance"] = json.dumps(provenance, sort_keys=True)
    return meta


def save_kohya(adapter: Adapter, file: Path, *, dtype: torch.dtype | None = None,
               provenance: dict[str, Any] | None = None) -> None:
    """Write ``adapter`` as a kohya LoRA safetensors file at ``file``."""
    write_safetensors(file, kohya_tensors(adapter, dtype), kohya_metadata(adapter, provenance))
