"""Trans-LoRA: move a LoRA adapter to a new base model without its training data.

Needs the ``transfer`` extra (transformers, peft); importing this package does not import them.

Example:
    >>> from lorakit.transfer import transfer, TransferOptions      # doctest: +SKIP
    >>> transfer("src", "adapter", "tgt", "seeds.jsonl", "out",
    ...          discriminator="disc", options=TransferOptions(task="add"))  # doctest: +SKIP
"""

import importlib
import sys
import types
from typing import Any

# name -> submodule; imported on first use (PEP 562), so that the CLI, which registers the
# transfer command, does not pay for the pipeline's modules at every start (40-60 ms)
_EXPORTS = {
    "Discriminator": "discriminator", "DiscriminatorOptions": "discriminator",
    "train_discriminator": "discriminator", "GenerateOptions": "generate",
    "Baseline": "pipeline", "FilterOptions": "pipeline", "TransferOptions": "pipeline",
    "TransferResult": "pipeline", "UnfilteredSize": "pipeline", "select": "pipeline",
    "transfer": "pipeline", "PromptFormat": "prompts", "Example": "records",
    "read_examples": "records", "write_examples": "records",
    "build_discriminator": "source_side", "SynthOptions": "synth", "StudentOptions": "train",
}

__all__ = ["transfer", "TransferOptions", "TransferResult", "FilterOptions", "Baseline",
           "SynthOptions", "StudentOptions", "GenerateOptions", "PromptFormat", "Example",
           "read_examples", "write_examples", "Discriminator", "DiscriminatorOptions",
           "train_discriminator", "build_discriminator", "select", "UnfilteredSize"]


def __getattr__(name: str) -> Any:
    where = _EXPORTS.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{where}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _CallableModule(types.ModuleType):
    """``lorakit.transfer(...)`` is :func:`lorakit.transfer.pipeline.transfer`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from lorakit.transfer.pipeline import transfer

        return transfer(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
