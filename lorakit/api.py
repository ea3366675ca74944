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
from lorakit.formats import Format, convert, save_adapter


def load(source: str | Path, format: Format | str | None = None, *, family: str | None = None,
         ignore_unknown: bool = False) -> Adapter:
    """Load one adapter from a path (PEFT folder, a weights file in any layout lorakit reads, or
    a folder holding one) or an ``hf://`` source. The source resolves to local files first
    (:mod:`lorakit.sources`), then :func:`lorakit.formats.load_adapter` reads them.

    Example:
        >>> load("../shared/real_adapters/smollm135m_medai_5ep").ranks()   # doctest: +SKIP
    """
    from lorakit.outputs import note_input
    from lorakit.sources import load_source

    if not str(source).startswith("hf://"):
        note_input(source)  # inside guard_inputs (the CLI), no output may touch it
    return load_source(str(source), format, family=family, ignore_unknown=ignore_unknown)


def save(adapter: Adapter, out: str | Path, format: Format | str | None = None, *,
         force: bool = False, dtype: torch.dtype | None = None,
         provenance: dict[str, Any] | None = None, family: str | None = None) -> Path:
    """Write an adapter atomically (``format``, a layout name, defaults to the one it was read
    from; ``family`` overrides the detected model family).

    Example:
        >>> save(adapter, "out_dir", force=True)   # doctest: +SKIP
    """
    written = save_adapter(adapter, out, format, force=force, dtype=dtype, provenance=provenance,
                           family=family)
    from lorakit.hub import note_written

    note_written(written, provenance)  # the CLI pushes what a command wrote (--push-to)
    return written


__all__ = ["load", "save", "convert", "Format"]
