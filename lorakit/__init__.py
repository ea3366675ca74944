"""lorakit: an offline toolkit for LoRA adapter files.

Example:
    >>> import lorakit
    >>> a = lorakit.load("../shared/real_adapters/gpt2_r4_jhess")   # doctest: +SKIP
    >>> lorakit.save(lorakit.convert(a, "kohya"), "out.safetensors")  # doctest: +SKIP
"""

from lorakit.adapter import Adapter, LoraModule, ModuleKind
from lorakit.api import convert, load, save
from lorakit.errors import LorakitError
from lorakit.formats import Format

__version__ = "0.1.0"

__all__ = ["Adapter", "LoraModule", "ModuleKind", "Format", "LorakitError", "load", "save",
           "convert", "__version__"]
