"""Synthetic task inputs written by a model from a few seed examples.

Each prompt lists ``shots`` seed inputs in a shuffled order, one per ``Input:`` line, and ends with
an open ``Input:`` line; the model samples one more line. Results are deduplicated (whitespace and
case folded), and empty lines or copies of a seed are dropped. The same routine writes the target
model's candidates at transfer time and the source model's negatives for the discriminator.

Example:
    >>> few_shot_prompt(["2+3=", "7+1="], "Inputs:")
    'Inputs:\\nInput: 2+3=\\nInput: 7+1=\\nInput:'
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from lorakit.transfer.generate import GenerateOptions, generate
from lorakit.transfer.records import Example

DEFAULT_HEADER = "Examples of inputs for the same task, one per line:"


@dataclass(frozen=True)
class SynthOptions:
    """``count`` distinct inputs wanted; at most ``max_rounds`` batches of prompts are tried."""

    count: int = 200
    shots: int = 5
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 0.95
    batch_size: int = 16
    max_rounds: int = 4
    seed: int = 0
    header: str = DEFAULT_HEADER


def _one_line(text: str) -> str:
    return " ".join(text.split())


def norm_key(text: str) -> str:
    """The deduplication key: whitespace collapsed, case folded."""
    return _one_line(text).casefold()


def few_shot_prompt(inputs: list[str], header: str) -> str:
    """A prompt listing ``inputs`` one per line and asking for one more."""
    lines = [header] + [f"Input: {_one_line(x)}" for x in inputs] + ["Input:"]
    return "\n".join(lines)


def synthesize(model, tok, seeds: list[Example], options: SynthOptions, *,
               advance: Callable[[int], None] = lambda n: None) -> list[Example]:
    """Up to ``options.count`` new, distinct inputs in the style of ``seeds``.

    Example:
        >>> synthesize(model, tok, seeds, SynthOptions(count=50))   # doctest: +SKIP
    """
    import torch

    rng = random.Random(options.seed)
    torch.manual_seed(options.seed)
    seen = {norm_key(s.input) for s in seeds}
    gen = GenerateOptions(max_new_tokens=options.max_new_tokens, sample=True,
                          temperature=options.temperature, top_p=options.top_p,
                          batch_size=options.batch_size, stop="\n")
    out: list[Example] = []
    shots = max(1, min(options.shots, len(seeds)))
    for _ in range(options.max_rounds):
        missing = options.count - len(out)
        if missing <= 0:
            break
        # ask for a little more than missing: duplicates and empty lines are dropped
        n = max(missing + missing // 4, 1)
        prompts = [few_shot_prompt([s.input for s in rng.sample(seeds, shots)], options.header)
                   for _ in range(n)]
        before = len(out)
        for text in generate(model, tok, prompts, gen):
            key = norm_key(text)
            if key and key not in seen and len(out) < options.count:
                seen.add(key)
                out.append(Example(_one_line(text)))
        advance(len(out) - before)
    return out
