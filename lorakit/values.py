"""Checks for numbers and config values where they enter lorakit (configs, the CLI, recipes).

Every value is checked for type, finiteness and range at the point it is read, and a bad one is
named (file, field, the value in short) instead of surfacing later as a traceback from the
linear algebra. Bounds:

* a module's scale (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA) and a merge weight must
  be finite with ``|value| <= MAX_FACTOR`` (1e6): far beyond any real adapter (alphas are at most
  a few times the rank), and small enough that ``scale * B @ A`` and its Gram matrices stay
  finite in float32;
* PEFT ``adapter_config.json`` fields that change what an adapter means are typed as PEFT's
  ``LoraConfig`` types them (``r`` an integer >= 1, ``lora_alpha`` a finite number,
  ``use_rslora`` / ``use_dora`` / ``fan_in_fan_out`` / ``lora_bias`` booleans,
  ``layers_to_transform`` an integer or a list of them, ``target_modules`` a list of names or a
  valid regular expression, ...). Fields lorakit does not interpret are left as they are.

Example:
    >>> check_weight(0.5, "weights")
    0.5
    >>> brief("x" * 100)
    "'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx...'"
"""

from __future__ import annotations

import math
import re
import reprlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigMismatchError, OptionError

MAX_FACTOR = 1e6

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple = 2, 4, 4, 4
_REPR.maxset = _REPR.maxfrozenset = _REPR.maxdeque = _REPR.maxarray = 4
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 44, 44, 40


def brief(value: Any) -> str:
    """A short repr that never formats a whole value: containers show a few items and a few
    levels (shared or deeply nested YAML values cost the same as small ones), strings and
    numbers are cut.

    Example:
        >>> brief(list(range(100)))
        '[0, 1, 2, 3, ...]'
    """
    try:
        return _REPR.repr(value)
    except Exception:  # noqa: BLE001 - a value whose repr fails is still named
        return f"<{type(value).__name__}>"


def is_number(v: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_weight(w: Any, name: str) -> float:
    """A merge weight: a finite number with ``|w| <= MAX_FACTOR``; raises OptionError naming it.

    Example:
        >>> check_weight(float("nan"), "weights")
        Traceback (most recent call last):
        ...
        lorakit.errors.OptionError: key 'weights': must be a finite number with |value| <= 1e+06, got nan
    """
    if not is_number(w) or abs(w) > MAX_FACTOR:
        raise OptionError(f"must be a finite number with |value| <= {MAX_FACTOR:g}, got "
                          f"{brief(w)}", key=name)
    return float(w)


def check_scale(alpha: float, rank: int, rslora: bool) -> str | None:
    """Why a module's alpha gives an unusable scale, or None when it is fine."""
    if not is_number(alpha):
        return f"alpha is {brief(alpha)}, not a finite number"
    if rank < 1:
        return None
    scale = alpha / (math.sqrt(rank) if rslora else rank)
    if abs(scale) > MAX_FACTOR:
        return (f"alpha {alpha:g} gives scale {scale:.3g}, beyond the |scale| <= "
                f"{MAX_FACTOR:g} lorakit computes with")
    return None


def check_options(cls: type, values: dict[str, Any]) -> None:
    """Check option values against the field types of an options dataclass before it is built
    (``float``: a finite number with ``|v| <= MAX_FACTOR``; ``int``: an integer; ``bool``: true or
    false; an enum: one of its values; ``X | None`` also takes None); raise
    :class:`OptionError` naming the option.

    Example:
        >>> from lorakit.merge.options import TiesOptions
        >>> check_options(TiesOptions, {"lam": float("inf")})
        Traceback (most recent call last):
        ...
        lorakit.errors.OptionError: key 'lam': must be a finite number with |value| <= 1e+06, got inf
    """
    import dataclasses
    import typing

    if not dataclasses.is_dataclass(cls):
        return
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - unresolvable annotations: the dataclass checks alone
        return
    for name, v in values.items():
        if name in hints:
            _check_typed(name, v, hints[name])


def _check_typed(name: str, v: Any, hint: Any) -> None:
    import enum
    import typing

    args = typing.get_args(hint) or (hint,)
    if v is None and type(None) in args:
        return
    kinds = [a for a in args if a is not type(None)]
    if float in kinds and not (is_number(v) and abs(v) <= MAX_FACTOR):
        raise OptionError(f"must be a finite number with |value| <= {MAX_FACTOR:g}, got "
                          f"{brief(v)}", key=name)
    if int in kinds and float not in kinds and (isinstance(v, bool) or not isinstance(v, int)):
        raise OptionError(f"must be an integer, got {brief(v)}", key=name)
    if kinds == [bool] and not isinstance(v, bool):
        raise OptionError(f"must be true or false, got {brief(v)}", key=name)
    enums = [a for a in kinds if isinstance(a, type) and issubclass(a, enum.Enum)]
    if enums and len(kinds) == 1:
        try:
            enums[0](v)
        except (ValueError, TypeError):
            choices = ", ".join(str(m.value) for m in enums[0])
            raise OptionError(f"must be one of {choices}, got {brief(v)}", key=name) from None


# --------------------------------------------------------------------------- PEFT configs


def _whole(v: Any, low: int) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        v = int(v)
    return isinstance(v, int) and v >= low


def _flag(v: Any) -> bool:
    return v is None or isinstance(v, bool)


def _names(v: Any) -> bool:
    return v is None or isinstance(v, str) or (
        isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v))


def _layers(v: Any) -> bool:
    return v is None or _whole(v, 0) or (
        isinstance(v, (list, tuple)) and all(_whole(x, 0) for x in v))


def _dropout(v: Any) -> bool:
    return v is None or (is_number(v) and 0 <= v <= 1)


def _text(v: Any) -> bool:
    return v is None or isinstance(v, str)


def _patterns(value_ok: Callable[[Any], bool]) -> Callable[[Any], bool]:
    def check(v: Any) -> bool:
        return v is None or (isinstance(v, dict) and all(
            isinstance(k, str) and value_ok(x) for k, x in v.items()))
    return check


# field -> (check, what it must be)
PEFT_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "peft_type": (_text, "a string"),
    "r": (lambda v: _whole(v, 1), "an integer >= 1"),
    "lora_alpha": (is_number, "a finite number"),
    "use_rslora": (_flag, "true or false"),
    "use_dora": (_flag, "true or false"),
    "fan_in_fan_out": (_flag, "true or false"),
    "lora_bias": (_flag, "true or false"),
    "inference_mode": (_flag, "true or false"),
    "lora_dropout": (_dropout, "a number in [0, 1]"),
    "layers_to_transform": (_layers, "an integer >= 0 or a list of them"),
    "layers_pattern": (_names, "a string or a list of strings"),
    "target_modules": (_names, "a list of module names or a regular expression"),
    "modules_to_save": (_names, "a list of module names"),
    "rank_pattern": (_patterns(lambda x: _whole(x, 1)), "a mapping of patterns to ranks >= 1"),
    "alpha_pattern": (_patterns(is_number), "a mapping of patterns to finite numbers"),
    "base_model_name_or_path": (_text, "a string"),
    "task_type": (_text, "a string"),
}


def check_peft_config(config: dict[str, Any], path: Path | str) -> None:
    """Type-check the fields of a PEFT ``adapter_config.json`` that lorakit reads or that change
    what the adapter means; raise :class:`ConfigMismatchError` naming the field and value.

    Example:
        >>> check_peft_config({"r": 8, "use_rslora": "yes"}, "adapter_config.json")
        Traceback (most recent call last):
        ...
        lorakit.errors.ConfigMismatchError: adapter_config.json: key 'use_rslora': must be true or false, got 'yes'
    """
    for name, (ok, what) in PEFT_FIELDS.items():
        if name in config and not ok(config[name]):
            raise ConfigMismatchError(f"must be {what}, got {brief(config[name])}", path=path,
                                      key=name)
    targets = config.get("target_modules")
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except (re.error, RecursionError, OverflowError) as e:
            raise ConfigMismatchError(f"{brief(targets)} is not a valid regex ({e})",
                                      path=path, key="target_modules") from None
    for name in ("rank_pattern", "alpha_pattern"):
        for pat in config.get(name) or {}:
            try:
                re.compile(pat)
            except (re.error, RecursionError, OverflowError) as e:
                raise ConfigMismatchError(f"entry {brief(pat)} is not a valid regex ({e})",
                                          path=path, key=name) from None


__all__ = ["MAX_FACTOR", "brief", "is_number", "check_weight", "check_scale", "check_options",
           "check_peft_config", "PEFT_FIELDS"]
