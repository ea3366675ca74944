"""How a task example becomes text for the teacher (labelling) and the student (training).

A template holds ``{input}``; the answer follows it directly. The teacher and the student may use
different templates (their models were tuned on different formats), which is what sequence-level
distillation allows: only text crosses between the models, never token ids.

Example:
    >>> fmt = PromptFormat("Q: {input}\\nA:", answer_prefix=" ", answer_suffix="\\n")
    >>> fmt.render("2+2"), fmt.full("2+2", "4")
    ('Q: 2+2\\nA:', 'Q: 2+2\\nA: 4\\n')
"""

from __future__ import annotations

from dataclasses import dataclass

from lorakit.errors import OptionError


@dataclass(frozen=True)
class PromptFormat:
    """``template`` with one ``{input}`` field. In training text the answer follows as
    ``answer_prefix + output + answer_suffix``; generation starts right after the template.
    ``special_tokens``: let the tokenizer add its special tokens (e.g. BOS) to prompts."""

    template: str = "{input}\n"
    answer_prefix: str = ""
    answer_suffix: str = ""
    special_tokens: bool = True

    def __post_init__(self) -> None:
        if "{input}" not in self.template:
            raise OptionError(f"prompt template {self.template!r} has no {{input}} field",
                              key="--prompt-template")
        try:
            self.template.format(input="x")
        except (KeyError, IndexError, ValueError) as e:
            raise OptionError(f"prompt template {self.template!r} is not a valid format string "
                              f"({e}); write literal braces as {{{{ }}}}",
                              key="--prompt-template") from e

    def render(self, text: str) -> str:
        """The prompt for one input (what generation continues)."""
        return self.template.format(input=text)

    def full(self, text: str, answer: str) -> str:
        """Prompt and answer, as the student is trained on them."""
        return self.render(text) + self.answer_prefix + answer + self.answer_suffix
