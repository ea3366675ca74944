"""Every tensor accounted for, and what an adapter covers per component and block type.

:func:`account` runs after a layout has read a file: keys no role of the layout fits, and modules
whose paths the family does not have (in any of its namings), are an error that names the first
of them, or, with ``ignore_unknown``, are dropped and listed in the adapter's metadata
(``lorakit.ignored``). :func:`coverage` says per component and block type how many blocks are
adapted, e.g. ``double blocks 19/19, single blocks 4/38 (proj_out only), text encoder none``.

Example:
    >>> import torch
    >>> from lorakit.adapter import Adapter, LoraModule
    >>> from lorakit.formats.families import FLUX1
    >>> m = LoraModule(torch.zeros(1, 2), torch.zeros(2, 1), alpha=1.0)
    >>> a = Adapter(modules={"transformer.single_transformer_blocks.7.proj_out": m},
    ...             component_prefix=True)
    >>> coverage_line(coverage(a, FLUX1))
    'double blocks 0/19, single blocks 1/38 (proj_out only), text encoder none, text encoder 2 (T5) none'
"""

from __future__ import annotations

import json
from typing import Any

from lorakit.adapter import Adapter
from lorakit.errors import UnknownLayoutError
from lorakit.formats.families.base import Family

IGNORED_KEY = "lorakit.ignored"
_SHOW = 3


def unknown_modules(adapter: Adapter, family: Family | None) -> list[str]:
    """Module keys whose component or path the family does not have."""
    if family is None:
        return []
    out = []
    for key in adapter.modules:
        comp, path = adapter.split_key(key)
        if comp is None:
            comp = family.denoiser.name
        if not family.knows(comp, path):
            out.append(key)
    return out


def account(adapter: Adapter, unknown_keys: list[str], family: Family | None, *,
            ignore_unknown: bool = False) -> Adapter:
    """Raise for unmapped keys and unknown modules, or drop and list them (``ignore_unknown``).

    Example:
        >>> account(Adapter(), [], None).modules
        {}
    """
    bad_mods = unknown_modules(adapter, family)
    problems = list(unknown_keys) + [f"{k} (module)" for k in bad_mods]
    if not problems:
        return adapter
    if not ignore_unknown:
        raise UnknownLayoutError(_message(unknown_keys, bad_mods, adapter, family),
                                 path=adapter.source, key=(unknown_keys or bad_mods)[0],
                                 hint="pass --ignore-unknown to read the rest and list these")
    mods = {k: m for k, m in adapter.modules.items() if k not in set(bad_mods)}
    out = adapter.copy(modules=mods)
    out.metadata[IGNORED_KEY] = json.dumps(sorted(problems))
    return out


def _first(items: list[str]) -> str:
    more = f", ... ({len(items)} in all)" if len(items) > _SHOW else ""
    return ", ".join(items[:_SHOW]) + more


def _message(keys: list[str], mods: list[str], adapter: Adapter, family: Family | None) -> str:
    parts = []
    if keys:
        layout = adapter.layout or adapter.source_format or "adapter"
        parts.append(f"{len(keys)} key(s) that do not fit the {layout} layout: {_first(keys)}"
                     if len(keys) > 1 else f"key does not fit the {layout} layout: {keys[0]}")
    if mods:
        title = family.title if family else "the model"
        parts.append(f"{len(mods)} module(s) that {title} does not have: {_first(mods)}")
    return "; ".join(parts)


def ignored(adapter: Adapter) -> list[str]:
    """The keys the reader ignored (``--ignore-unknown``), if any."""
    try:
        value = json.loads(adapter.metadata.get(IGNORED_KEY) or "[]")
    except json.JSONDecodeError:
        return []
    return [str(v) for v in value] if isinstance(value, list) else []


def coverage(adapter: Adapter, family: Family) -> list[dict[str, Any]]:
    """Per component: per block type, blocks adapted of the family's count, and which layers
    of a block when not all; components without blocks count their modules.

    Keys are read in the diffusers naming (native modules count as their parts).
    """
    from lorakit.formats.rename import to_naming

    plain = to_naming(adapter, family, "diffusers")
    by_comp: dict[str, list[str]] = {}
    for key in plain.modules:
        comp, path = plain.split_key(key)
        by_comp.setdefault(comp or family.denoiser.name, []).append(path)
    out = []
    for comp in family.components:
        paths = by_comp.get(comp.name, [])
        entry: dict[str, Any] = {"component": comp.name, "label": comp.label,
                                 "modules": len(paths), "blocks": []}
        for bt in comp.blocks:
            seen: dict[int, set[str]] = {}
            for p in paths:
                if (hit := bt.index(p)) is not None:
                    seen.setdefault(hit[0], set()).add(hit[1])
            subs = sorted(set().union(*seen.values())) if seen else []
            entry["blocks"].append({"label": bt.label, "adapted": len(seen),
                                    "count": bt.count_for(seen),
                                    "layers": subs,
                                    # a block type that lists no layers prints no detail
                                    "all_layers": not bt.subs or set(bt.subs) <= set(subs)})
        out.append(entry)
    return out


def _block_text(b: dict[str, Any]) -> str:
    text = f"{b['label']} {b['adapted']}/{b['count']}"
    if b["adapted"] and b["layers"] and not b["all_layers"]:
        layers = b["layers"]
        text += f" ({', '.join(layers)} only)" if len(layers) <= 3 else \
            f" ({len(layers)} layer kinds)"
    return text


def coverage_line(entries: list[dict[str, Any]]) -> str:
    """One line of :func:`coverage` for ``inspect``: the denoiser's block types, then the other
    components."""
    parts = []
    for n, e in enumerate(entries):
        if not e["modules"]:
            parts.append(f"{e['label']} none")
        elif e["blocks"] and n == 0:
            parts.extend(_block_text(b) for b in e["blocks"])
        elif e["blocks"] and len(e["blocks"]) > 1:  # another denoiser (MiniMax-H3's reference)
            parts.append(f"{e['label']}: " + ", ".join(_block_text(b) for b in e["blocks"]))
        elif e["blocks"]:
            parts.append(_block_text(e["blocks"][0]))
        else:
            parts.append(f"{e['label']} {e['modules']} modules")
    return ", ".join(parts)


def notes(adapter: Adapter, family: Family | None) -> list[str]:
    """What a file holds beyond plain LoRA pairs, for ``inspect``: the family's known extra
    tensors (a Flux.1 control LoRA's norm scales), ``lora_B`` biases, and base layers whose
    input the LoRA widens (its ``img_in`` takes 128 channels, Flux.1's ``x_embedder`` 64).

    Example:
        >>> import torch
        >>> from lorakit.adapter import LoraModule
        >>> from lorakit.formats.families import FLUX1
        >>> m = LoraModule(torch.zeros(2, 128), torch.zeros(3072, 2), alpha=2.0)
        >>> notes(Adapter(modules={"transformer.img_in": m}, component_prefix=True),
        ...       FLUX1)[0].split(":")[0]
        'x_embedder takes 128 input channels, Flux.1 64'
    """
    out = []
    if family is None:
        return out
    from lorakit.formats.rename import to_naming

    known = [k for k in adapter.extras if family.extra_name(adapter.split_key(k)[1], "native")]
    if known:
        out.append(f"{len(known)} norm scales (full tensors that replace the base's query/key "
                   "RMSNorm weights; written back by bflcontrol, diffusers and PEFT only)")
    biased = sum(m.bias is not None for m in adapter.modules.values())
    if biased:
        out.append(f"{biased} modules with a lora_B bias")
    plain = to_naming(adapter, family, "diffusers")
    for path, width in family.base_inputs:
        m = plain.modules.get(f"{family.denoiser.name}.{path}") or plain.modules.get(path)
        if m is not None and m.in_features > width:
            out.append(f"{path} takes {m.in_features} input channels, {family.title} {width}: a "
                       "LoRA of an input-widened model (Flux.1 Canny/Depth control); loaders "
                       f"widen the base layer with zero columns (diffusers expands {path})")
    return out
