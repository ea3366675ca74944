"""merge/: combine several adapters into one, on the full update ``sum_i w_i s_i B_i A_i``.

Example:
    >>> import lorakit
    >>> merged = lorakit.merge([a, b], method="svd", weights=[1, 1])   # doctest: +SKIP
"""

from __future__ import annotations

import sys
import types
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lorakit.adapter import Adapter
from lorakit.errors import OptionError

if TYPE_CHECKING:
    from lorakit.lowrank import RankPolicy
from lorakit.merge.align import ExtrasPolicy, align, merge_extras, parse_weights
from lorakit.merge.options import MergeContext
from lorakit.merge.registry import METHODS, get_method


def merge(adapters: Sequence[Adapter], method: str = "linear",
          weights: Sequence[float] | str | None = None, *, options: Any = None,
          policy: RankPolicy | None = None, intersect: bool = False,
          extras: ExtrasPolicy | str = ExtrasPolicy.ERROR, device: str = "auto",
          dtype: torch.dtype | None = None, seed: int = 0, progress=None,
          model: Any = None, calibration: Any = None, grams: str | Path | None = None,
          **option_values: Any) -> Adapter:
    """Merge ``adapters`` with a registered method; returns a new Adapter (inputs untouched).

    ``options`` is the method's options dataclass; keyword arguments set its fields instead.
    Calibrated methods (``regmean``) also take ``model`` (a model folder, ``.gguf`` file, Hub id,
    or a loaded ``(model, tokenizer)`` pair), ``calibration`` (prompts per adapter: lists of
    texts, files, ``"a.jsonl,b.txt"`` or a folder; :mod:`lorakit.calibrate.data`) and ``grams``
    (a cache folder for the captured Grams, :mod:`lorakit.calibrate`).

    Example:
        >>> lorakit.merge([a, b], "ties", weights=[1, 1], density=0.2)   # doctest: +SKIP
        >>> lorakit.merge([a, b], "regmean", model="model_dir",
        ...               calibration=["a.jsonl", "b.jsonl"], shrink=0.5)  # doctest: +SKIP
    """
    spec = get_method(method)
    if options is None:
        known = {f.name for f in fields(spec.options)}
        bad = sorted(set(option_values) - known)
        if bad:
            raise OptionError(f"method {method} has no option {bad[0]!r} "
                              f"(options: {', '.join(sorted(known)) or 'none'})", key=bad[0])
        from lorakit.values import check_options

        check_options(spec.options, option_values)  # types, finite, in range: named
        options = spec.options(**option_values)
    ws = parse_weights(weights, len(adapters))
    from lorakit.formats.rename import align as one_naming

    # files of one family from different trainers (kohya Flux qkv, diffusers to_q) in one naming
    aligned = align(one_naming(list(adapters)), ws, intersect=intersect, method=method)
    ctx = MergeContext(policy=policy, device=device, dtype=dtype, seed=seed, progress=progress,
                       weights=ws)
    if not spec.calibrated and (model is not None or calibration is not None or grams is not None):
        raise OptionError(f"method {method} takes no model, calibration or grams (only "
                          f"{', '.join(n for n, m in METHODS.items() if m.calibrated)} do)",
                          key="model")
    spill = None
    try:
        if spec.calibrated:
            from lorakit.calibrate import prepare_grams

            ctx.grams, spill = prepare_grams(adapters, model, calibration, grams,
                                             options.capture(), list(aligned),
                                             options.max_prompts, progress)
        modules = spec.fn(aligned, options, ctx)
    finally:
        if spill is not None:
            from lorakit.calibrate import remove_spill

            remove_spill(spill)
    first = adapters[0]
    out = first.copy(modules=modules, extras=merge_extras(adapters, ExtrasPolicy(extras)))
    out.metadata = {}
    out.config = {k: v for k, v in first.config.items()
                  if k not in ("rank_pattern", "alpha_pattern", "r", "lora_alpha")}
    return out


class _CallableModule(types.ModuleType):
    """``lorakit.merge`` is both this package and the :func:`merge` function: calling the
    package calls the function, so ``lorakit.merge([a, b], "svd")`` and
    ``import lorakit.merge.registry`` both work."""

    def __call__(self, *args: Any, **kwargs: Any) -> Adapter:
        return merge(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["merge", "METHODS", "ExtrasPolicy", "get_method"]
