"""diffusers LoRA files (``pytorch_lora_weights.safetensors`` and friends).

Layouts read (module keys come out as ``<component>.<path>``):

* ``diffusers``: ``unet.<path>.lora_A.weight`` / ``lora_B.weight`` (also ``text_encoder.``,
  ``text_encoder_2.``, ``transformer.`` prefixes, or no prefix at all for model-level saves).
* ``diffusers_lora_down_up``: ``unet.<path>.lora.down.weight`` / ``lora.up.weight``, the text
  encoder's ``<path>.lora_linear_layer.down.weight`` and prefix-less ``<path>.lora_down.weight``
  (+ ``.alpha``; kohya suffixes on dotted paths, which diffusers' Z-Image reader takes).
  Prefix-less keys with PEFT's adapter name (``lora_A.default.weight``) are DiffSynth-Studio's
  (:mod:`lorakit.formats.diffsynth`).
* ``diffusers_legacy_processor``: attention processors,
  ``<block>.attn1.processor.to_q_lora.down.weight`` (no component prefix; the UNet is implied;
  ``to_out_lora`` is ``to_out.0``).

Alphas: ``<path>.alpha`` tensors, else the ``lora_adapter_metadata`` JSON that diffusers writes
(``{"unet.r": .., "unet.lora_alpha": .., "unet.alpha_pattern": {..}}`` or unprefixed), else
``alpha = r`` (scale 1), which is what diffusers assumes.

Writing uses the current layout (``lora_A``/``lora_B`` under component prefixes) and stores every
component's ``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern`` and ``use_rslora`` in
``lora_adapter_metadata``, as diffusers' own ``save_lora_weights`` does, so scales survive exactly.

Example:
    >>> from lorakit.formats.diffusers import module_key_for   # doctest: +SKIP
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from lorakit.adapter import Adapter
from lorakit.errors import ConfigMismatchError, CorruptFileError, UnknownLayoutError
from lorakit.formats.common import (
    build_modules,
    cast,
    check_variants,
    common_value,
    exact_patterns,
    number,
    refuse_embedding_lora,
    scalar_value,
    target_name,
)
from lorakit.formats.dora import peft_magnitude
from lorakit.io import write_safetensors
from lorakit.naming import COMPONENTS, split_component

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"

_LEGACY = re.compile(r"^(?P<mod>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out|add_q_proj|add_k_proj"
                     r"|add_v_proj|to_add_out)_lora\.(?P<role>down|up)\.weight$")
_DOWN_UP = re.compile(r"^(?P<mod>.+)\.(?:lora\.|lora_linear_layer\.|lora_)(?P<role>down|up)"
                      r"\.weight$")
_PEFT = re.compile(r"^(?P<mod>.+)\.lora_(?P<role>A|B)\.weight$")
_ALPHA = re.compile(r"^(?P<mod>.+)\.alpha$")
_MAG = re.compile(r"^(?P<mod>.+)\.lora_magnitude_vector(?:\.weight)?$")
_BIAS = re.compile(r"^(?P<mod>.+)\.lora_B\.bias$")


def classify(keys: list[str]) -> str | None:
    """Which diffusers layout these keys use, or None."""
    if any(_LEGACY.match(k) for k in keys):
        return "diffusers_legacy_processor"
    if any(_DOWN_UP.match(k) for k in keys):
        return "diffusers_lora_down_up"
    if any(_PEFT.match(k) for k in keys) and not any(k.startswith("base_model.model.")
                                                      for k in keys):
        return "diffusers"
    return None


def _legacy_key(m: re.Match) -> str:
    proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
    mod = m["mod"]
    comp, _ = split_component(mod)
    return f"{mod}.{proj}" if comp else f"unet.{mod}.{proj}"


def _parse(tensors: dict[str, torch.Tensor], layout: str, path: Path):
    parts: dict[str, dict[str, torch.Tensor]] = {}
    alpha_t: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for k, t in tensors.items():
        m = None
        if m := _LEGACY.match(k):
            key, role = _legacy_key(m), m["role"]
        elif m := _DOWN_UP.match(k):
            key, role = m["mod"], m["role"]
        elif m := _PEFT.match(k):
            key, role = m["mod"], "down" if m["role"] == "A" else "up"
        elif m := _BIAS.match(k):
            key, role = m["mod"], "bias"
        elif m := _MAG.match(k):
            key, role = m["mod"], "magnitude"
        elif m := _ALPHA.match(k):
            alpha_t[m["mod"]] = t
            continue
        else:
            unknown.append(k)
            continue
        slot = parts.setdefault(key, {})
        if role in slot:
            raise ConfigMismatchError(f"two tensors give this module's {role}", path=path, key=k)
        slot[role] = t
    return parts, alpha_t, unknown


def _has_components(meta: dict[str, str], keys: list[str]) -> bool:
    """Whether the first key segment is a pipeline component (lorakit records it in metadata)."""
    recorded = meta.get("lorakit.components")
    if recorded is not None:
        try:
            comps = json.loads(recorded)
        except (json.JSONDecodeError, RecursionError):
            comps = None
        if isinstance(comps, list):  # anything else (null, a number) was not written by lorakit
            return bool(comps)
    return any(split_component(k)[0] for k in keys)


def _metadata_alphas(meta: dict[str, str], keys: list[str], path: Path,
                     prefixed: bool) -> dict[str, float]:
    raw = meta.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CorruptFileError(f"{METADATA_KEY} metadata is not valid JSON ({e})", path=path,
                               key=METADATA_KEY) from e
    if not isinstance(cfg, dict):
        raise CorruptFileError(f"{METADATA_KEY} metadata is not a JSON object", path=path,
                               key=METADATA_KEY)
    from lorakit.formats.peft import pattern_value

    out: dict[str, float] = {}
    for key in keys:
        comp, rest = split_component(key) if prefixed else (None, key)
        pre = f"{comp}." if comp and f"{comp}.lora_alpha" in cfg else ""
        sub = rest if pre else key
        alpha = cfg.get(f"{pre}lora_alpha")
        if alpha is None:
            continue
        pattern = cfg.get(f"{pre}alpha_pattern") or {}
        val = pattern_value(pattern, sub, alpha, path=path, field=f"{pre}alpha_pattern")
        if not isinstance(val, (int, float)):
            raise CorruptFileError(f"alpha {val!r} is not a number", path=path, key=key)
        out[key] = float(val)
    return out


def _metadata_rslora(meta: dict[str, str]) -> bool:
    try:
        cfg = json.loads(meta.get(METADATA_KEY) or "{}")
    except json.JSONDecodeError:
        return False
    return isinstance(cfg, dict) and any(
        k.endswith("use_rslora") and v is True for k, v in cfg.items())


def _recorded_extras(meta: dict[str, str]) -> list[str]:
    """Keys of non-LoRA tensors lorakit stored in the file (``lorakit.extras`` metadata)."""
    try:
        keys = json.loads(meta.get("lorakit.extras") or "[]")
    except json.JSONDecodeError:
        return []
    return [k for k in keys if isinstance(k, str)] if isinstance(keys, list) else []


def _family_extra(key: str) -> bool:
    """Whether ``<component>.<path>`` is a full tensor a family's files carry in diffusers names
    (Flux.1 control LoRAs' ``transformer.transformer_blocks.0.attn.norm_q.weight``)."""
    from lorakit.formats.families import FAMILIES

    comp, path = split_component(key)
    return comp is not None and any(f.denoiser.name == comp and f.extra_name(path, "diffusers")
                                    == path for f in FAMILIES.values())


def _add_components(parts: dict, alpha_t: dict, meta: dict[str, str]) -> bool:
    """Prefix-less keys (``get_peft_model_state_dict(unet)``) of a known family get the family's
    component (``unet.``, ``transformer.``; ``text_model.`` paths ``text_encoder.``), in place.
    Returns whether the keys now carry components."""
    from lorakit.formats.families import detect_family

    shapes = {k: (int(p["up"].shape[0]), int(p["down"].shape[1])) for k, p in parts.items()
              if "up" in p and "down" in p and p["down"].ndim >= 2}
    family = detect_family(list(parts), meta, shapes, component_prefix=False)
    if family is None:
        return False
    for d in (parts, alpha_t):
        for k in list(d):
            comp = "text_encoder" if k.startswith("text_model.") else family.denoiser.name
            d[f"{comp}.{k}"] = d.pop(k)
    return True


def load_diffusers(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str],
                   layout: str) -> tuple[Adapter, list[str]]:
    """Build an Adapter from a diffusers state dict already read from ``path``; also returns the
    keys that fit no diffusers role (the caller accounts for them)."""
    check_variants(list(tensors), path)
    extras = {k: tensors[k] for k in _recorded_extras(meta) if k in tensors}
    tensors = {k: t for k, t in tensors.items() if k not in extras}
    parts, alpha_t, unknown = _parse(tensors, layout, path)
    for k in [k for k in unknown if _family_extra(k)]:  # a control LoRA's norm scales
        extras[k] = tensors[k]
        unknown.remove(k)
    if not parts:
        raise UnknownLayoutError("no LoRA tensors found", path=path,
                                 key=unknown[0] if unknown else None)
    prefixed = _has_components(meta, list(parts))
    if not prefixed and meta.get("lorakit.components") is None:
        prefixed = _add_components(parts, alpha_t, meta)
    alphas = _metadata_alphas(meta, list(parts), path, prefixed)
    for key, t in alpha_t.items():
        alphas[key] = scalar_value(t, key + ".alpha", path)
    stray = [k for k in alpha_t if k not in parts]
    if stray:
        raise ConfigMismatchError("alpha tensor for a module without LoRA factors", path=path,
                                  key=stray[0] + ".alpha")
    modules = build_modules(parts, alphas, path, rslora=_metadata_rslora(meta))
    base = meta.get("lorakit.base_model") or None
    if "ai-toolkit" in str(meta.get("software", "")):
        layout = "aitoolkit"  # diffusers keys; source_format stays diffusers
    adapter = Adapter(modules=modules, extras=extras, source_format="diffusers",
                      layout=layout, base_model=base,
                      metadata=dict(meta), source=str(path), component_prefix=prefixed)
    return adapter, unknown


def pattern_path(path: str) -> str:
    """A text encoder's module path as a PEFT pattern that matches both transformers namings:
    ``text_model.encoder.layers.N...`` (transformers 4) and ``encoder.layers.N...`` (5).

    Example:
        >>> pattern_path("text_model.encoder.layers.0.self_attn.q_proj")
        'encoder.layers.0.self_attn.q_proj'
    """
    return path[len("text_model."):] if path.startswith("text_model.encoder.") else path


def _component_config(adapter: Adapter, keys: list[str], strip: bool) -> dict[str, Any]:
    mods = [adapter.modules[k] for k in keys]
    sub = [pattern_path(adapter.split_key(k)[1]) if strip else pattern_path(k) for k in keys]
    ranks = [m.rank for m in mods]
    rslora = all(m.rslora for m in mods)
    alphas = [float(m.alpha) if m.rslora == rslora else
              m.scale * (m.rank ** 0.5 if rslora else m.rank) for m in mods]
    r, alpha = common_value(ranks, 4), common_value(alphas, 4.0)
    return {
        "r": int(r), "lora_alpha": number(alpha),
        "rank_pattern": exact_patterns(dict(zip(sub, ranks, strict=True)), r),
        "alpha_pattern": {s: number(a) for s, a in
                          exact_patterns(dict(zip(sub, alphas, strict=True)), alpha).items()},
        "target_modules": sorted({target_name(s) for s in sub}),
        "use_rslora": rslora, "use_dora": any(m.magnitude is not None for m in mods),
        "lora_bias": any(m.bias is not None for m in mods),
    }


def diffusers_metadata(adapter: Adapter) -> dict[str, Any]:
    """The ``lora_adapter_metadata`` dict: per component, prefixed like diffusers does."""
    groups: dict[str | None, list[str]] = {}
    for k in adapter.modules:
        groups.setdefault(adapter.split_key(k)[0], []).append(k)
    out: dict[str, Any] = {}
    for comp, keys in groups.items():
        cfg = _component_config(adapter, keys, strip=comp is not None)
        if comp is None:
            out.update(cfg)
        else:
            out.update({f"{comp}.{k}": v for k, v in cfg.items()})
    return out


def diffusers_tensors(adapter: Adapter, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    refuse_embedding_lora(adapter.modules, "diffusers")
    out: dict[str, torch.Tensor] = {}
    for key, m in adapter.modules.items():
        out[f"{key}.lora_A.weight"] = cast(m.down, dtype)
        out[f"{key}.lora_B.weight"] = cast(m.up, dtype)
        if m.bias is not None:
            out[f"{key}.lora_B.bias"] = cast(m.bias, dtype)
        if m.magnitude is not None:  # hook (issue 16b): PEFT's shape; wd_on_out=False refused
            out[f"{key}.lora_magnitude_vector.weight"] = cast(peft_magnitude(m, key), dtype)
    for key, t in adapter.extras.items():
        out[key] = t
    return out


AITOOLKIT_SOFTWARE = {"name": "lorakit (ai-toolkit layout)", "repo": "https://github.com/ostris/ai-toolkit"}


def _fold_scales(adapter: Adapter) -> Adapter:
    """Every module at scale 1 (``up <- scale * up`` in float32, stored in up's dtype): for
    layouts whose readers assume ``alpha = r`` (ai-toolkit)."""
    mods = {}
    for k, m in adapter.modules.items():
        if m.scale == 1.0 and not m.rslora:
            mods[k] = m
            continue
        up = (m.up.to(torch.float32) * m.scale).to(m.up.dtype)  # (out, r)
        mods[k] = m.with_factors(m.down, up, alpha=float(m.rank), rslora=False)
    return adapter.copy(modules=mods)


def save_diffusers(adapter: Adapter, file: Path, *, dtype: torch.dtype | None = None,
                   provenance: dict[str, Any] | None = None, flavour: str = "diffusers",
                   family: str | None = None) -> None:
    """Write ``adapter`` as a diffusers LoRA safetensors file at ``file``.

    ``flavour`` ``aitoolkit`` writes what ostris ai-toolkit writes: the same keys with every
    scale folded into ``lora_B`` (its readers assume ``alpha = r``) and its ``software`` record
    instead of ``lora_adapter_metadata``; ``simpletuner`` is the diffusers file SimpleTuner
    writes through diffusers' ``save_lora_weights``.
    """
    meta: dict[str, str] = {"format": "pt"}
    if adapter.source_format in ("diffusers", "aitoolkit", "simpletuner"):
        meta.update({k: v for k, v in adapter.metadata.items() if not k.startswith("lorakit.")})
    if flavour == "aitoolkit":
        adapter = _fold_scales(adapter)
        meta.pop(METADATA_KEY, None)
        meta.setdefault("software", json.dumps(AITOOLKIT_SOFTWARE))
    else:
        if "ai-toolkit" in meta.get("software", ""):
            meta.pop("software")  # read back as diffusers, not as ai-toolkit
        # top-level keys sorted; pattern dicts keep their order (PEFT matches them in order)
        meta[METADATA_KEY] = json.dumps(dict(sorted(diffusers_metadata(adapter).items())),
                                        indent=2)
    meta["lorakit.components"] = json.dumps(adapter.components())
    if family:
        meta["lorakit.family"] = family
    if adapter.extras:  # non-LoRA tensors (heads): named so the reader keeps them as extras
        meta["lorakit.extras"] = json.dumps(sorted(adapter.extras))
    if provenance:
        meta["lorakit.provenance"] = json.dumps(provenance, sort_keys=True)
    if adapter.base_model:
        meta["lorakit.base_model"] = adapter.base_model
    write_safetensors(file, diffusers_tensors(adapter, dtype), meta)


def known_components() -> tuple[str, ...]:
    return COMPONENTS
