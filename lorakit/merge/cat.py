"""``cat``: exact concatenation of the updates (rank = sum of ranks).

Each term ``c_i * B_i @ A_i`` (``c_i = weight_i * scale_i``, any alpha, rsLoRA or not) is folded
into its factors as ``(sign(c_i) sqrt|c_i| B_i, sqrt|c_i| A_i)`` and the factors are stacked, so
``B_cat @ A_cat = sum_i c_i B_i A_i`` exactly and the result has ``alpha = R`` (scale 1). This is
PEFT's ``cat`` combination done on the full update rather than with each adapter's own alpha.

Example:
    >>> import torch
    >>> from lorakit.adapter import LoraModule
    >>> from lorakit.merge.align import Term
    >>> t = [Term(0, 1.0, LoraModule(torch.ones(1, 2), torch.ones(3, 1), alpha=2)),
    ...      Term(1, -1.0, LoraModule(torch.ones(2, 2), torch.ones(3, 2), alpha=2))]
    >>> merge_cat_module(t, torch.float32).delta()[0, 0].item()
    0.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lorakit.adapter import LoraModule
from lorakit.merge.align import Term
from lorakit.merge.build import shape_factors
from lorakit.merge.options import CatOptions, MergeContext


def merge_cat_module(terms: Sequence[Term], dtype: torch.dtype) -> LoraModule:
    ups, downs = [], []
    for t in terms:
        c = t.coeff
        root = math.sqrt(abs(c))
        ups.append(t.module.up_matrix(torch.float64) * (root if c >= 0 else -root))  # (out, r_i)
        downs.append(t.module.down_matrix(torch.float64) * root)  # (r_i, in*k)
    up = torch.cat(ups, dim=1).to(dtype)  # (out, R)
    down = torch.cat(downs, dim=0).to(dtype)  # (R, in*k)
    like = terms[0].module
    up, down = shape_factors(up, down, like)
    return LoraModule(down=down, up=up, alpha=float(down.shape[0]), kind=like.kind)


def merge_cat(aligned: dict[str, list[Term]], options: CatOptions, ctx: MergeContext
              ) -> dict[str, LoraModule]:
    """Concatenate every module's terms (see the module docstring)."""
    out = {}
    for key, terms in aligned.items():
        ctx.tick(key)
        out[key] = merge_cat_module(terms, ctx.out_dtype(terms))
    return out
