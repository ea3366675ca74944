"""The Python API behind the CLI: load, save, convert (later: merge, resize, extract, transfer).

Example:
    >>> import lorakit
    >>> a = lorakit.load("../shared/real_adapters/gpt2_r4_jhess")         # doctest: +SKIP
    >>> lorakit.save(lorakit.convert(a, "kohya"), "gpt2.safetensors")     # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lorakit.adapter import Adapter
from lorakit.formats import Format, convert, load_adapter, save_adapter


def load(source: str | Path, format: Format | str | None = None) -> Adapter:
    """Load one adapter from a path (PEFT folder, diffusers/kohya file or a folder holding one).

    Example:
        >>> load("../shared/real_adapters/smollm135m_medai_5ep").ranks()   # doctest: +SKIP
    """
    from lorakit.outputs import note_input

    if not str(source).startswith("hf://"):
        note_input(source)  # inside guard_inputs (the CLI), no output may touch it
    return load_adapter(source, format)


def save(adapter: Adapter, out: str | Path, format: Format | str | None = None, *,
         force: bool = False, dtype: torch.dtype | None = None,
         provenance: dict[str, Any] | None = None) -> Path:
    """Write an adapter atomically (``format`` defaults to the one it was read from).

    Example:
        >>> save(adapter, "out_dir", force=True)   # doctest: +SKIP
    """
    written = save_adapter(adapter, out, format, force=force, dtype=dtype, provenance=provenance)
    from lorakit.hub import note_written

    note_written(written, provenance)  # the CLI pushes what a command wrote (--push-to)
    return written


__all__ = ["load", "save", "convert", "Format"]
