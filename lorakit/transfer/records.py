"""Examples and the JSONL files every transfer stage reads and writes.

A seed file is JSON Lines with one ``{"input": ..., "output": ...}`` object a line (extra fields are
kept). Stage files (``synthetic.jsonl``, ``filtered.jsonl``, ``labelled.jsonl``) use the same
shape, with ``output`` empty before labelling and a discriminator ``score`` after filtering.

Example:
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "seeds.jsonl"
    >>> _ = p.write_text('{"input": "2+2=", "output": "4"}\\n')
    >>> read_examples(p)[0].input
    '2+2='
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import CorruptFileError, InputNotFoundError, OptionError
from lorakit.io import atomic_output


@dataclass
class Example:
    """One task example: the prompt text ``input`` and the answer ``output``."""

    input: str
    output: str = ""
    score: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = {"input": self.input, "output": self.output}
        if self.score is not None:
            d["score"] = self.score
        d.update(self.extra)
        return d


def _parse_line(line: str, path: Path, lineno: int, need_output: bool) -> Example:
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise CorruptFileError(f"line {lineno}: not valid JSON ({e})", path=path,
                               hint='each line must be {"input": ..., "output": ...}') from e
    if not isinstance(obj, dict):
        raise CorruptFileError(f"line {lineno}: expected a JSON object, got "
                               f"{type(obj).__name__}", path=path)
    for key in ("input", "output") if need_output else ("input",):
        if not isinstance(obj.get(key), str):
            what = "missing" if key not in obj else f"not a string ({type(obj[key]).__name__})"
            raise CorruptFileError(f"line {lineno}: field {key!r} is {what}", path=path,
                                   hint='each line must be {"input": ..., "output": ...}')
    score = obj.pop("score", None)
    inp, out = obj.pop("input"), obj.pop("output", "")
    return Example(inp, out if isinstance(out, str) else "",
                   float(score) if isinstance(score, (int, float)) else None, obj)


def read_examples(path: str | Path, *, need_output: bool = True,
                  min_count: int | None = None) -> list[Example]:
    """Read a JSONL file of examples; every bad line is named by file and line number.

    ``min_count`` raises :class:`OptionError` when the file holds fewer examples than asked.

    Example:
        >>> read_examples("seeds.jsonl", min_count=5)   # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError("no such file" if not path.exists() else "is not a file",
                                 path=path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CorruptFileError(f"not UTF-8 text ({e.reason} at byte {e.start})", path=path) from e
    examples = [_parse_line(line, path, i, need_output)
                for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    if min_count is not None and len(examples) < min_count:
        raise OptionError(f"holds {len(examples)} examples but {min_count} were asked for",
                          path=path, hint="lower --num-seeds or add examples")
    return examples


def write_examples(path: str | Path, examples: list[Example], *, force: bool = True) -> Path:
    """Write ``examples`` as JSONL atomically (a stage file is complete or absent).

    Example:
        >>> write_examples("out.jsonl", [Example("a", "b")])   # doctest: +SKIP
    """
    path = Path(path)
    with atomic_output(path, force=force) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for ex in examples:
                f.write(json.dumps(ex.to_json(), ensure_ascii=False) + "\n")
    return path


def as_dicts(examples: list[Example]) -> list[dict[str, Any]]:
    """Plain dicts (for JSON reports)."""
    return [asdict(e) for e in examples]
