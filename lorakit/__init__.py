"""lorakit: an offline toolkit for LoRA adapter files.

Example:
    >>> import lorakit
    >>> a = lorakit.load("../shared/real_adapters/gpt2_r4_jhess")   # doctest: +SKIP
    >>> lorakit.save(lorakit.convert(a, "kohya"), "out.safetensors")  # doctest: +SKIP
"""

# callable packages: lorakit.merge(...) runs merge.merge(...), lorakit.transfer(...) runs
# transfer.transfer(...) (transformers is imported only when a transfer runs)
from lorakit import merge, transfer
from lorakit.adapter import Adapter, LoraModule, ModuleKind
from lorakit.api import convert, load, save
from lorakit.errors import LorakitError
from lorakit.formats import Format
from lorakit.hub import pull, push  # hf:// pull (to the shared HF cache) and push with a card


def resize(*args, **kwargs):
    """Resize an adapter by a rank policy (see :func:`lorakit.compress.resize.resize`)."""
    from lorakit.compress.resize import resize as _resize

    return _resize(*args, **kwargs)


def squeeze(*args, **kwargs):
    """LoRA-Squeeze: post-hoc compression (see :func:`lorakit.compress.squeeze.squeeze`)."""
    from lorakit.compress.squeeze import squeeze as _squeeze

    return _squeeze(*args, **kwargs)


def extract(*args, **kwargs):
    """A LoRA from a fine-tuned checkpoint (see :func:`lorakit.compress.extract.extract`)."""
    from lorakit.compress.extract import extract as _extract

    return _extract(*args, **kwargs)


__version__ = "0.1.0"

__all__ = ["Adapter", "LoraModule", "ModuleKind", "Format", "LorakitError", "load", "save",
           "convert", "merge", "resize", "squeeze", "extract", "transfer", "pull", "push", "__version__"]
