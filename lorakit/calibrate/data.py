"""Calibration prompts: a few unlabelled texts per input adapter.

A calibration set is given per adapter, aligned with the merge inputs, in one of these forms:

* in the API, a list of prompt lists (``[["347 + 58 =", ...], [...]]``) or a list of files;
* a comma-separated list of files, one per adapter (``add.jsonl,date.txt``);
* a folder holding one file per adapter, named after the adapter (its folder or file stem,
  ``add.jsonl`` or ``add.txt`` for ``adapters_zoo/add``).

Only the text is read. A ``.jsonl`` file has one JSON value per line: a string, or an object whose
first present field of :data:`TEXT_FIELDS` is the text (labels and other fields are ignored).
Any other file is plain text with one prompt per non-empty line. An empty or missing set for any
adapter is a :class:`~lorakit.errors.OptionError` naming the adapter and the file.

Example:
    >>> read_prompts_text("a b\\n\\n c \\n")
    ['a b', 'c']
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from lorakit.errors import CorruptFileError, InputNotFoundError, OptionError

TEXT_FIELDS = ("text", "prompt", "input", "question", "instruction", "content")
SUFFIXES = (".jsonl", ".txt", ".json", "")

Calibration = Sequence[Sequence[str]] | Sequence[str | Path] | str | Path


def read_prompts_text(text: str) -> list[str]:
    """One prompt per non-empty line (stripped)."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def _jsonl(path: Path, text: str) -> list[str]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as e:
            raise CorruptFileError(f"line {n} is not JSON ({e})", path=path) from e
        if isinstance(value, dict):
            value = next((value[k] for k in TEXT_FIELDS if isinstance(value.get(k), str)), None)
        if not isinstance(value, str):
            raise CorruptFileError(f"line {n} has no text (a JSON string, or an object with one "
                                   f"of the fields {', '.join(TEXT_FIELDS)})", path=path)
        if value.strip():
            out.append(value)
    return out


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of one calibration file (``.jsonl``: text fields; else one per line).

    Example:
        >>> read_prompts("calib/add.jsonl")   # doctest: +SKIP
        ['347 + 58 =', ...]
    """
    p = Path(path)
    if not p.is_file():
        raise InputNotFoundError("no such calibration file", path=p)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"cannot read the calibration file ({e})", path=p) from e
    return _jsonl(p, text) if p.suffix == ".jsonl" else read_prompts_text(text)


def adapter_name(source: str | None, index: int) -> str:
    """The name a calibration folder's file is looked up by: the adapter's folder or file stem."""
    if not source:
        return f"adapter{index}"
    p = Path(source.rstrip("/"))
    return p.stem if p.suffix in (".safetensors", ".bin", ".pt") else p.name


def _from_folder(folder: Path, names: Sequence[str]) -> list[list[str]]:
    out = []
    for name in names:
        hit = next((folder / f"{name}{s}" for s in SUFFIXES if (folder / f"{name}{s}").is_file()),
                   None)
        if hit is None:
            raise OptionError(f"no calibration file for adapter {name!r} in {folder} (looked for "
                              f"{name}.jsonl, {name}.txt, {name}.json, {name})", key="calibration")
        out.append(read_prompts(hit))
    return out


def resolve_calibration(calibration: Calibration | None, names: Sequence[str]
                        ) -> list[list[str]]:
    """Prompts per adapter (aligned with ``names``), from any of the forms in the module doc.

    Example:
        >>> resolve_calibration([["1 + 2 ="], ["France"]], ["add", "capital"])
        [['1 + 2 ='], ['France']]
    """
    if calibration is None:
        raise OptionError("regmean needs calibration prompts: --calibration FILE,FILE,... (one "
                          "per adapter) or a folder with one file per adapter", key="calibration")
    if isinstance(calibration, (str, Path)):
        p = Path(calibration)
        if p.is_dir():
            sets = _from_folder(p, names)
        else:
            items = [s.strip() for s in str(calibration).split(",") if s.strip()]
            sets = [read_prompts(s) for s in _aligned(items, names)]
    else:
        items = list(calibration)
        _aligned(items, names)
        sets = [read_prompts(x) if isinstance(x, (str, Path)) else [str(t) for t in x]
                for x in items]
    for name, prompts in zip(names, sets, strict=True):
        if not any(t.strip() for t in prompts):
            raise OptionError(f"the calibration set of adapter {name!r} is empty",
                              key="calibration")
    return [[t for t in s if t.strip()] for s in sets]


def _aligned(items: list, names: Sequence[str]) -> list:
    if len(items) != len(names):
        raise OptionError(f"{len(items)} calibration sets for {len(names)} adapters (give one "
                          "per adapter, in the order of the inputs, or a folder)",
                          key="calibration")
    return items
