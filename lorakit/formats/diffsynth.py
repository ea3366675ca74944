"""DiffSynth-Studio LoRA files: a PEFT state dict saved without ``base_model.model.``, so every key
carries PEFT's adapter name (``blocks.0.attn.qkv_proj.lora_A.default.weight``). Read only.

The ``.default`` infix is dropped and the rest is read as a diffusers file (prefix-less keys of a
known family get its component). MiniMax-H3 files (its original names: ``blocks.N.`` /
``token_refiner.blocks.N.``) hold the raw checkpoint's fused ``attn.qkv_proj`` with its rows
interleaved per head (``[head0: q k v, head1: q k v, ...]``) where every other producer (and
lorakit's native naming) stacks ``[q; k; v]``; ``lora_B``'s rows are reordered exactly to the
stacked order. The head width is 128 (every released MiniMax-H3 partition, and what diffusers
assumes); a qkv whose rows are not a multiple of ``3 * 128`` is an error naming the key.

Example:
    >>> classify(["blocks.0.attn.qkv_proj.lora_A.default.weight"])
    'diffsynth'
    >>> deinterleave_rows(torch.arange(6.0).reshape(6, 1), head_dim=1).flatten().tolist()
    [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from lorakit.adapter import Adapter
from lorakit.errors import ShapeMismatchError, UnsupportedVariantError

_KEY = re.compile(r"^(?P<mod>.+)\.(?P<role>lora_[AB])\.default\.(?P<tail>weight|bias)$")
_INTERLEAVED = re.compile(r"^(?:transformer\.)?(?:token_refiner\.)?blocks\.\d+\.attn\.qkv_proj$")
HEAD_DIM = 128  # MiniMax-H3's head width


def classify(keys: list[str]) -> str | None:
    """``"diffsynth"`` when keys carry PEFT's ``.default`` infix and no ``base_model.model.``."""
    if any(_KEY.match(k) for k in keys) and not any(k.startswith("base_model.model.")
                                                    for k in keys):
        return "diffsynth"
    return None


def deinterleave_rows(up: torch.Tensor, head_dim: int = HEAD_DIM) -> torch.Tensor:
    """Rows ``[h0: q k v, h1: q k v, ...]`` -> ``[q_h0 q_h1 ..; k_..; v_..]``; ``up`` (3 H d, r)."""
    heads = up.shape[0] // (3 * head_dim)
    grouped = up.reshape(heads, 3, head_dim, up.shape[1])  # (H, 3, d, r)
    return grouped.transpose(0, 1).reshape(up.shape).contiguous()  # (3, H, d, r) -> (3 H d, r)


def load_diffsynth(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]
                   ) -> tuple[Adapter, list[str]]:
    """Build an Adapter from a DiffSynth-Studio state dict; also returns the keys that fit no
    role (under their names in the file)."""
    from lorakit.formats.diffusers import load_diffusers

    plain: dict[str, torch.Tensor] = {}
    original: dict[str, str] = {}
    for k, t in tensors.items():
        m = _KEY.match(k)
        new = f"{m['mod']}.{m['role']}.{m['tail']}" if m else k
        plain[new] = t
        original[new] = k
    adapter, unknown = load_diffusers(path, plain, meta, "diffusers")
    for key, mod in list(adapter.modules.items()):
        if not _INTERLEAVED.match(key):
            continue
        if mod.up.shape[0] % (3 * HEAD_DIM):
            raise ShapeMismatchError(
                f"DiffSynth-Studio's fused qkv_proj has {mod.up.shape[0]} output rows, not a "
                f"multiple of 3 x {HEAD_DIM} (MiniMax-H3's per-head interleaved q, k, v)",
                path=path, key=f"{key.removeprefix('transformer.')}.lora_B.default.weight")
        if mod.bias is not None or mod.magnitude is not None:
            raise UnsupportedVariantError("a lora_B bias or DoRA magnitude on DiffSynth-Studio's "
                                          "interleaved qkv_proj is not read", path=path, key=key)
        adapter.modules[key] = mod.with_factors(mod.down, deinterleave_rows(mod.up))
    adapter.layout = "diffsynth"
    return adapter, [original.get(k, k) for k in unknown]
