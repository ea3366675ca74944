"""Batched text generation shared by synthesis (sampling) and labelling (greedy).

Prompts are left-padded so every row ends at the same position; the continuation of each row is
decoded without special tokens and cut at ``stop`` (a newline by default).

Example:
    >>> texts = generate(model, tok, ["2+2="], GenerateOptions(max_new_tokens=4))  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class GenerateOptions:
    """How to continue prompts: greedy unless ``sample``; ``stop`` cuts each continuation."""

    max_new_tokens: int = 32
    sample: bool = False
    temperature: float = 1.0
    top_p: float = 0.95
    batch_size: int = 16
    stop: str = "\n"


def cut(text: str, stop: str) -> str:
    """``text`` up to the first ``stop`` (whole text when ``stop`` is empty), stripped.

    Example:
        >>> cut(" 42\\nQ: next", "\\n")
        '42'
    """
    if stop and stop in text:
        text = text.split(stop, 1)[0]
    return text.strip()


class _StopOnText:
    """Stopping criterion: a row is finished once its new text contains ``stop``."""

    def __init__(self, tok, start: int, stop: str) -> None:
        self.tok, self.start, self.stop = tok, start, stop

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        texts = self.tok.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)
        return torch.tensor([self.stop in t for t in texts], device=input_ids.device)


def generate(model, tok, prompts: list[str], options: GenerateOptions, *,
             add_special_tokens: bool = True,
             advance: Callable[[int], None] = lambda n: None) -> list[str]:
    """Continue every prompt; returns one decoded, cut continuation per prompt.

    Example:
        >>> generate(model, tok, ["Q: 1+1\\nA:"], GenerateOptions())   # doctest: +SKIP
        ['2']
    """
    import torch

    out: list[str] = []
    tok.padding_side = "left"
    eos = tok.eos_token_id
    for i in range(0, len(prompts), options.batch_size):
        chunk = prompts[i:i + options.batch_size]
        enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
        kwargs = dict(max_new_tokens=options.max_new_tokens, pad_token_id=tok.pad_token_id,
                      eos_token_id=eos)
        if options.stop:  # rows stop at their first stop text, not at max_new_tokens
            from transformers import StoppingCriteriaList

            kwargs["stopping_criteria"] = StoppingCriteriaList(
                [_StopOnText(tok, enc["input_ids"].shape[1], options.stop)])
        if options.sample:
            kwargs.update(do_sample=True, temperature=options.temperature, top_p=options.top_p,
                          top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            ids = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                 **kwargs)  # (batch, prompt_len + new)
        new = ids[:, enc["input_ids"].shape[1]:]  # (batch, new)
        for row in new:
            out.append(cut(tok.decode(row, skip_special_tokens=True), options.stop))
        advance(len(chunk))
    return out
