"""Generated PEFT adapters for batch tests (GPT-2-like names, small shapes)."""

from __future__ import annotations

from pathlib import Path

import torch

from lorakit.adapter import Adapter, LoraModule
from lorakit.formats import save_adapter


def make_adapter(seed: int, *, rank: int = 4, dim: int = 32, layers: int = 2) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for i in range(layers):
        for name in ("q_proj", "v_proj"):
            mods[f"model.layers.{i}.self_attn.{name}"] = LoraModule(
                down=torch.randn(rank, dim, generator=g),  # A (r, in)
                up=torch.randn(dim, rank, generator=g) * 0.1,  # B (out, r)
                alpha=2.0 * rank)
    return Adapter(modules=mods, base_model="gen/base")


def make_collection(root: Path, n: int, *, start: int = 0, **kw) -> list[Path]:
    """``n`` PEFT folders ``root/gen_XXX`` (seeds ``start ..``)."""
    out = []
    for i in range(start, start + n):
        out.append(save_adapter(make_adapter(i, **kw), root / f"gen_{i:03d}", "peft"))
    return out


def write_corrupt(path: Path) -> Path:
    """A truncated safetensors file: a header that claims more bytes than the file holds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((4096).to_bytes(8, "little") + b'{"a": {')
    return path


def visible_files(root: Path) -> dict[str, bytes]:
    """Every non-hidden file under ``root`` (relative path -> bytes)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)}


def leftovers(root: Path) -> list[str]:
    """Temporaries or staging folders a run left behind."""
    return [p.relative_to(root).as_posix() for p in root.rglob("*")
            if p.name.endswith(".tmp") or p.name == "staging"]
