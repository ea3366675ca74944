"""Trans-LoRA: move a LoRA adapter to a new base model without its training data.

Needs the ``transfer`` extra (transformers, peft); importing this package does not import them.

Example:
    >>> from lorakit.transfer import transfer, TransferOptions      # doctest: +SKIP
    >>> transfer("src", "adapter", "tgt", "seeds.jsonl", "out",
    ...          discriminator="disc", options=TransferOptions(task="add"))  # doctest: +SKIP
"""

import sys
import types
from typing import Any

from lorakit.transfer.discriminator import Discriminator, DiscriminatorOptions, train_discriminator
from lorakit.transfer.generate import GenerateOptions
from lorakit.transfer.pipeline import (
    Baseline,
    FilterOptions,
    TransferOptions,
    TransferResult,
    UnfilteredSize,
    select,
    transfer,
)
from lorakit.transfer.prompts import PromptFormat
from lorakit.transfer.records import Example, read_examples, write_examples
from lorakit.transfer.source_side import build_discriminator
from lorakit.transfer.synth import SynthOptions
from lorakit.transfer.train import StudentOptions

__all__ = ["transfer", "TransferOptions", "TransferResult", "FilterOptions", "Baseline",
           "SynthOptions", "StudentOptions", "GenerateOptions", "PromptFormat", "Example",
           "read_examples", "write_examples", "Discriminator", "DiscriminatorOptions",
           "train_discriminator", "build_discriminator", "select", "UnfilteredSize"]


class _CallableModule(types.ModuleType):
    """``lorakit.transfer(...)`` is :func:`lorakit.transfer.pipeline.transfer`."""

    def __call__(self, *args: Any, **kwargs: Any) -> TransferResult:
        return transfer(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
