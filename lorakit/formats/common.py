"""Helpers shared by the format modules: grouping tensors into LoRA pairs, alphas, dtypes.

Example:
    >>> import torch
    >>> parts = {"q": {"down": torch.ones(2, 3), "up": torch.ones(4, 2)}}
    >>> mods = build_modules(parts, alphas={}, path="x.safetensors")
    >>> mods["q"].alpha   # no alpha stored: alpha = r
    2.0
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch

from lorakit.adapter import LoraModule, ModuleKind, check_finite
from lorakit.errors import (
    ConfigMismatchError,
    CorruptFileError,
    UnsupportedVariantError,
)

# Key fragments of adapter variants that are not plain LoRA: refused by name, never misread.
VARIANT_MARKERS: tuple[tuple[str, str], ...] = (
    ("hada_w1", "LoHa (hada_* tensors)"),
    ("hada_t1", "LoHa (hada_* tensors)"),
    ("lokr_w1", "LoKr (lokr_* tensors)"),
    ("lokr_t1", "LoKr (lokr_* tensors)"),
    ("oft_blocks", "OFT (oft_blocks tensors)"),
    ("oft_r", "OFT (oft_r tensors)"),
    ("boft_", "BOFT"),
    ("lora_mid", "LoCon/Tucker (lora_mid tensors)"),
    ("ia3_l", "IA3"),
    ("vera_lambda", "VeRA"),
    (".diff_b", "full bias diff (LyCORIS diff_b)"),
    (".w_norm", "LyCORIS norm weights (w_norm)"),
    (".b_norm", "LyCORIS norm biases (b_norm)"),
    ("lora_embedding_A.weight_scale", "quantised LoRA"),
)


def check_variants(keys: list[str], path: Path | str) -> None:
    """Raise UnsupportedVariantError if any key belongs to a non-LoRA adapter variant."""
    for k in keys:
        for marker, name in VARIANT_MARKERS:
            if marker in k:
                raise UnsupportedVariantError(
                    f"{name} is not a LoRA; lorakit reads LoRA, DoRA and AdaLoRA only",
                    path=path, key=k)


def build_modules(parts: dict[str, dict[str, torch.Tensor]], alphas: dict[str, float],
                  path: Path | str, *, rslora: bool = False, dora: str = "peft",
                  finite: bool = True) -> dict[str, LoraModule]:
    """Turn ``{key: {"down", "up", ["magnitude"], ["bias"], ["embedding"]}}`` into modules.

    A module with only one factor is an error naming the missing one. ``alphas`` maps keys to
    alpha; a missing alpha means ``alpha = r`` (kohya and diffusers convention). ``dora`` is the
    magnitude convention of the file (``"peft"`` or ``"lycoris"`` for kohya ``dora_scale``,
    :mod:`lorakit.formats.dora`); ``finite=False`` leaves the NaN/Inf scan to the caller.
    """
    from lorakit.formats.dora import magnitude_axis

    modules: dict[str, LoraModule] = {}
    for key, p in parts.items():
        if "down" not in p or "up" not in p:
            missing = "lora_A/lora_down" if "down" not in p else "lora_B/lora_up"
            raise ConfigMismatchError(f"{missing} tensor is missing for this module", path=path,
                                      key=key)
        down, up = p["down"], p["up"]
        if not (down.is_floating_point() and up.is_floating_point()):
            raise CorruptFileError(f"LoRA factors must be floating point, got {down.dtype}",
                                   path=path, key=key)
        kind = ModuleKind.LINEAR
        if "embedding" in p:
            kind = ModuleKind.EMBEDDING
        elif down.ndim == 4:
            kind = ModuleKind.CONV
        r = int(down.shape[0]) if down.ndim >= 1 else 0
        alpha = alphas.get(key)
        mod = LoraModule(down=down, up=up, alpha=float(r if alpha is None else alpha),
                         rslora=rslora, magnitude=p.get("magnitude"), bias=p.get("bias"),
                         kind=kind)
        mod.validate(key, str(path), finite=False)
        if mod.magnitude is not None:  # hook (issue 16b): which norm the DoRA magnitude replaces
            mod.magnitude_axis = magnitude_axis(mod, dora, key, path)
        modules[key] = mod
    if finite:
        check_finite(modules, str(path))
    return modules


def scalar_value(t: torch.Tensor, key: str, path: Path | str) -> float:
    """Read a one-element tensor (kohya ``.alpha``) as a float, with a named error otherwise."""
    if t.numel() != 1:
        raise CorruptFileError(f"alpha must hold one value, got shape {tuple(t.shape)}",
                               path=path, key=key)
    if t.is_complex():
        raise CorruptFileError(f"alpha must be a real number, got {t.dtype}", path=path, key=key)
    v = float(t.reshape(()).to(torch.float64).item())
    if v != v or v in (float("inf"), float("-inf")):
        from lorakit.errors import NonFiniteError

        raise NonFiniteError(f"alpha is {v}", path=path, key=key)
    return v


def common_value(values: list, default=None):
    """The most common value (first seen on ties)."""
    if not values:
        return default
    return Counter(values).most_common(1)[0][0]


def target_name(key: str) -> str:
    """PEFT ``target_modules`` entry for a module path: its last segment, or the last two when the
    last is a ModuleList index (``to_out.0``; a bare ``"0"`` would match every ``*.0`` block).

    Example:
        >>> target_name("unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0")
        'to_out.0'
    """
    parts = key.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def exact_patterns(values: dict[str, Any], default: Any) -> dict[str, Any]:
    """``rank_pattern`` / ``alpha_pattern`` with exact module paths for the modules whose value is
    not ``default``, which resolve to ``values`` both by lorakit's rule (exact key first) and by
    PEFT's (the first ``(.*\\.)?(pattern)$`` match in order): a module whose path ends with
    ``.<written path>`` is listed too, and deeper paths come first.

    Example:
        >>> exact_patterns({"a.q": 4, "x.a.q": 8, "b.q": 8}, 8)
        {'x.a.q': 8, 'a.q': 4}
    """
    out = {k: v for k, v in values.items() if v != default}
    for k, v in values.items():
        if k not in out and any(k.endswith("." + p) for p in out):
            out[k] = v
    return dict(sorted(out.items(), key=lambda kv: -kv[0].count(".")))


def number(x: float) -> int | float:
    """JSON-friendly number: ints stay ints."""
    return int(x) if float(x).is_integer() else float(x)


def cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t if dtype is None or not t.is_floating_point() else t.to(dtype)


def refuse_embedding_lora(modules: dict[str, LoraModule], fmt: str) -> None:
    """Embedding LoRA (PEFT ``lora_embedding_A/B``) has no form in diffusers or kohya files:
    written there it would read back as a linear LoRA with the factors' roles swapped.

    Example:
        >>> refuse_embedding_lora({}, "kohya")  # nothing to refuse
    """
    for key, m in modules.items():
        if m.kind is ModuleKind.EMBEDDING:
            raise UnsupportedVariantError(f"embedding LoRA cannot be written as {fmt}", key=key,
                                          hint="write PEFT instead")
