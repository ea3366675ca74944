"""``factor_linear``: PEFT/kohya/LoraHub's weighted sum of A and B *separately* (inexact).

``A = sum_i sqrt(|w_i| s_i) A_i`` and ``B = sum_i sign(w_i) sqrt(|w_i| s_i) B_i``, which multiplies
out to the wanted ``sum_i w_i s_i B_i A_i`` **plus cross terms** ``B_i A_j`` (i != j). It only
exists so users can reproduce results made with those tools; prefer ``linear``/``svd``/``cat``.
All inputs of a module must have the same rank.

Reference: PEFT ``add_weighted_adapter(combination_type="linear")``; LoraHub (Huang et al., 2023).

Example:
    >>> lorakit.merge([a, b], method="factor_linear")   # doctest: +SKIP
"""

from __future__ import annotations

import math

import torch

from lorakit.adapter import LoraModule
from lorakit.errors import IncompatibleAdaptersError
from lorakit.merge.align import Term
from lorakit.merge.build import shape_factors
from lorakit.merge.options import FactorLinearOptions, MergeContext


def merge_factor_linear(aligned: dict[str, list[Term]], options: FactorLinearOptions,
                        ctx: MergeContext) -> dict[str, LoraModule]:
    """Sum A and B separately with ``sqrt(|w| s)`` on each side (cross terms included)."""
    out = {}
    for key, terms in aligned.items():
        ctx.tick(key)
        ranks = {t.module.rank for t in terms}
        if len(ranks) != 1:
            raise IncompatibleAdaptersError(
                f"factor_linear needs equal ranks, got {sorted(ranks)}", key=key,
                hint="use linear, svd or cat, which accept any ranks")
        up = sum(t.module.up_matrix(torch.float64) * math.copysign(math.sqrt(abs(t.coeff)),
                                                                    t.coeff) for t in terms)
        down = sum(t.module.down_matrix(torch.float64) * math.sqrt(abs(t.coeff)) for t in terms)
        dtype = ctx.out_dtype(terms)
        up, down = shape_factors(up.to(dtype), down.to(dtype), terms[0].module)  # (out, r), (r, in)
        out[key] = LoraModule(down=down, up=up, alpha=float(down.shape[0]),
                              kind=terms[0].module.kind)
    return out
