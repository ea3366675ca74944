"""compose/: rank-wise units (split, select, assemble) and multi-step recipes.

* :mod:`lorakit.compose.units`: an adapter as rank-one units per module; split, select, drop,
  reorder, combine and assemble them (sums and concatenations stay exact).
* :mod:`lorakit.compose.recipe`: YAML recipes of named steps, validated as a whole before running;
  :mod:`lorakit.compose.steps` runs them (``lorakit run RECIPE.yaml``).

Example ("keep the 4 strongest units of each module of adapter A plus all of B's units in the
attention layers"):
    >>> from lorakit.compose import assemble, combine, select, split
    >>> units = combine(select(split(a, source=0), top=4),                  # doctest: +SKIP
    ...                 select(split(b, source=1), module_regex=r"attn"))
    >>> composed = assemble(units, like=a)                                  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from lorakit.compose.units import (
    Unit,
    UnitOrder,
    Units,
    assemble,
    canonical,
    combine,
    count,
    drop,
    reorder,
    select,
    split,
    unit_module,
)

# The recipe modules import the merge package, which imports compose.units (LoRA-LEGO): they are
# loaded on first use so that import order never matters.
_LAZY = {"Recipe": "recipe", "Step": "recipe", "StepKind": "recipe", "Problem": "recipe",
         "load_recipe": "recipe", "parse_recipe": "recipe", "run_recipe": "steps",
         "RecipeResult": "steps"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f"lorakit.compose.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'lorakit.compose' has no attribute {name!r}")


__all__ = ["Unit", "Units", "UnitOrder", "split", "canonical", "select", "drop", "reorder",
           "combine", "count", "unit_module", "assemble", *_LAZY]
