"""The one place where lorakit's errors live.

Every error names the file, the key and the problem, and where possible the fix. The CLI turns a
``LorakitError`` into one line (``lorakit: error: ...``); ``LORAKIT_DEBUG=1`` shows the traceback.

Example:
    >>> from lorakit.errors import ShapeMismatchError
    >>> str(ShapeMismatchError("lora_A is (8, 768) but lora_B is (768, 4)", path="a.safetensors",
    ...                        key="layer.0.q"))
    "a.safetensors: key 'layer.0.q': lora_A is (8, 768) but lora_B is (768, 4)"
"""

from __future__ import annotations

import re
from pathlib import Path

# ANSI escapes and control characters (newlines included) that would break the one-line contract:
# a message may quote text from a file (keys, JSON errors, torch's multi-line pickle errors).
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_CONTROL = re.compile(r"\s*[\x00-\x1f\x7f\x85\u2028\u2029]+\s*")


def one_line(text: str) -> str:
    r"""``text`` without ANSI escapes, with each run of control characters (newlines, tabs)
    collapsed to one space.

    Example:
        >>> one_line("bad header\n\tline 2\x1b[1m!\x1b[0m")
        'bad header line 2!'
    """
    return _CONTROL.sub(" ", _ANSI.sub("", text)).strip()


class LorakitError(Exception):
    """Base class: a problem with a user's input, option or output that lorakit reports cleanly.

    Fields are structured so callers (batch reports, JSON output) can use them without parsing.
    """

    def __init__(
        self,
        problem: str,
        *,
        path: str | Path | None = None,
        key: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.problem = problem
        self.path = str(path) if path is not None else None
        self.key = key
        self.hint = hint
        super().__init__(self.message)

    @property
    def message(self) -> str:
        parts = []
        if self.path:
            parts.append(self.path)
        if self.key:
            parts.append(f"key {self.key!r}")
        parts.append(self.problem)
        text = ": ".join(parts)
        if self.hint:
            text += f" ({self.hint})"
        return one_line(text)

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, str | None]:
        """Machine-readable form used by ``--json`` and batch reports."""
        return {
            "error": type(self).__name__,
            "path": self.path,
            "key": self.key,
            "problem": self.problem,
            "hint": self.hint,
        }


class InputNotFoundError(LorakitError):
    """A path that does not exist, or a folder/file that holds nothing usable."""


class LfsPointerError(LorakitError):
    """A Git LFS pointer file where the real weights were expected."""


class CorruptFileError(LorakitError):
    """A truncated, malformed or otherwise unreadable weights or config file."""


class ConfigMismatchError(LorakitError):
    """The adapter config and the weights disagree (rank, targets, missing tensors)."""


class ShapeMismatchError(LorakitError):
    """Factor shapes that cannot form a LoRA update (A/B ranks differ, wrong ndim)."""


class NonFiniteError(LorakitError):
    """A tensor holds NaN or Inf."""


class UnknownLayoutError(LorakitError):
    """Keys that match no adapter layout lorakit knows (or that would be silently misread)."""


class UnsupportedVariantError(LorakitError):
    """A known adapter variant that this operation cannot honour (LoHa, LoKr, DoRA in a merge, ...)."""


class OutputExistsError(LorakitError):
    """The output exists and ``--force`` was not given."""


class OutputWriteError(LorakitError):
    """The output could not be written (disk full, permissions, tensors the writer refuses)."""


class OptionError(LorakitError):
    """Invalid or conflicting options."""


class IncompatibleAdaptersError(LorakitError):
    """Adapters that cannot be combined (different shapes for the same module, different extras)."""


class MissingDependencyError(LorakitError):
    """An optional extra (transformers, peft, ray) is needed and not installed."""


class HubError(LorakitError):
    """A Hugging Face Hub problem (``hf://`` sources, ``push``): access, revision, upload."""


class HubNotFoundError(HubError):
    """A Hub repository, revision or file that does not exist (or is private to this token)."""


class GatedRepoAccessError(HubError):
    """A gated Hub repository whose conditions this account has not accepted."""


class HubOfflineError(HubError):
    """The Hub cannot be reached (``HF_HUB_OFFLINE=1`` or no network) and nothing is cached."""


class BatchError(LorakitError):
    """A batch run with failed jobs (the summary and ``--report`` list each one)."""


class ClusterError(LorakitError):
    """A Ray cluster that cannot be reached, refuses the job, or lost the nodes a batch needs."""


class RecipeError(LorakitError):
    """A recipe with problems; ``problems`` lists every one (step, field, message) found before
    anything ran. The message joins them, each naming its step and field."""

    def __init__(self, problems: list, *, path: str | Path | None = None) -> None:
        self.problems = list(problems)
        n = len(self.problems)
        text = f"{n} problem{'s' if n != 1 else ''} in the recipe: " + \
            "; ".join(f"({i}) {p}" for i, p in enumerate(self.problems, 1))
        super().__init__(text, path=path)

    def __reduce__(self):  # picklable (process pools, Ray) with its problems intact
        return (_recipe_error, (self.problems, self.path))

    def to_dict(self) -> dict:
        out: dict = dict(super().to_dict())
        out["problems"] = [p.to_dict() if hasattr(p, "to_dict") else str(p)
                           for p in self.problems]
        return out


def _recipe_error(problems: list, path: str | None) -> RecipeError:
    return RecipeError(problems, path=path)
