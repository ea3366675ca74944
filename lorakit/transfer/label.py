"""Labelling: the teacher (source model + source adapter) answers every input greedily.

Only the decoded answer text is kept, so the student may use another tokenizer.

Example:
    >>> labelled = label(teacher, tok, inputs, PromptFormat())   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from lorakit.transfer.generate import GenerateOptions, generate
from lorakit.transfer.prompts import PromptFormat
from lorakit.transfer.records import Example


def label(model, tok, examples: list[Example], fmt: PromptFormat,
          options: GenerateOptions | None = None, *,
          advance: Callable[[int], None] = lambda n: None) -> list[Example]:
    """Copies of ``examples`` whose ``output`` is the teacher's greedy answer.

    Example:
        >>> label(teacher, tok, [Example("2+2=")], PromptFormat())[0].output  # doctest: +SKIP
        '4'
    """
    options = options or GenerateOptions()
    prompts = [fmt.render(e.input) for e in examples]
    answers = generate(model, tok, prompts, replace(options, sample=False),
                       add_special_tokens=fmt.special_tokens, advance=advance)
    return [replace(e, output=a) for e, a in zip(examples, answers, strict=True)]
