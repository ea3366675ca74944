"""``svd``: the exact weighted sum, truncated to a rank policy (default: the largest input rank).

What PEFT's ``svd`` combination computes, without forming the dense update: the SVD of
``sum_i w_i * scale_i * B_i @ A_i`` comes from the factors, so the truncation error is exactly the
Eckart-Young optimum for the kept rank.

Example:
    >>> lorakit.merge([a, b], method="svd", policy=RankPolicy.fixed(16))   # doctest: +SKIP
"""

from __future__ import annotations

from lorakit.adapter import LoraModule
from lorakit.merge.align import Term
from lorakit.merge.exact import truncate
from lorakit.merge.options import MergeContext, SvdOptions


def merge_svd(aligned: dict[str, list[Term]], options: SvdOptions, ctx: MergeContext
              ) -> dict[str, LoraModule]:
    """Exact sum truncated by ``ctx.policy`` or, if none, by the largest input rank."""
    from lorakit.lowrank import RankPolicy

    policy = ctx.policy
    if policy is None:
        r = max(t.module.rank for terms in aligned.values() for t in terms)
        policy = RankPolicy.from_options(rank=r)
    return truncate(aligned, policy, ctx)
