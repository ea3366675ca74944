"""``linear`` / ``task_arithmetic``: the weighted sum of the full updates.

``delta = sum_i w_i * scale_i * B_i @ A_i`` (negative weights allowed, e.g. task negation), computed
exactly through the factored SVD; without a rank policy the result keeps the numerical rank of the
sum (at most ``sum_i r_i``), so it equals the sum to float precision. A rank policy truncates it
optimally (Eckart-Young). Unlike PEFT's ``linear`` there are no cross terms: A and B are never
averaged separately (that is ``factor_linear``).

Reference: Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023.

Example:
    >>> import lorakit                                                         # doctest: +SKIP
    >>> lorakit.merge([a, b], method="task_arithmetic", weights=[1, -0.5])     # doctest: +SKIP
"""

from __future__ import annotations

from lorakit.adapter import LoraModule
from lorakit.merge.align import Term
from lorakit.merge.exact import truncate
from lorakit.merge.options import LinearOptions, MergeContext


def merge_linear(aligned: dict[str, list[Term]], options: LinearOptions, ctx: MergeContext
                 ) -> dict[str, LoraModule]:
    """Weighted sum of every module's updates, truncated only if ``ctx.policy`` is set."""
    return truncate(aligned, ctx.policy, ctx)
