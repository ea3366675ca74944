"""The exact factored route shared by ``linear``, ``task_arithmetic`` and ``svd``.

``sum_i c_i B_i A_i`` has rank at most ``R = sum_i r_i``; its SVD comes from the factors (lowrank
engine) in ``O((out + in) R^2)``, never from the dense ``out x in`` update. A rank policy then
keeps ``k`` singular triplets per module (a global budget is allocated across modules).

Example:
    >>> import torch
    >>> from lorakit.adapter import LoraModule
    >>> from lorakit.merge.align import Term
    >>> t = [Term(0, 1.0, LoraModule(torch.eye(1, 3), torch.eye(2, 1), alpha=1))]
    >>> svd = exact_svd(t)
    >>> [round(x, 6) for x in svd.S.tolist()]
    [1.0]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from lorakit.adapter import LoraModule, ModuleKind

if TYPE_CHECKING:
    from lorakit.lowrank import RankPolicy
from lorakit.merge.align import Term
from lorakit.merge.build import shape_factors
from lorakit.merge.options import MergeContext

NULL_RTOL = 1e-12


def exact_svd(terms: Sequence[Term], device: str | None = None):
    """Exact SVD (U, S, Vh) of ``sum_i weight_i * scale_i * B_i @ A_i`` for one module."""
    from lorakit.lowrank import factored_svd
    from lorakit.lowrank.device import resolve_device

    dev = resolve_device(device or "auto")
    ups = [t.module.up_matrix() for t in terms]  # (out, r_i)
    downs = [t.module.down_matrix() for t in terms]  # (r_i, in*k)
    return factored_svd(ups, downs, [t.coeff for t in terms], device=dev)


def numerical_rank(s: torch.Tensor) -> int:
    """Singular values above ``NULL_RTOL * s_max`` (at least 1)."""
    if s.numel() == 0 or float(s[0]) <= 0:
        return 1
    return max(1, int((s > NULL_RTOL * s[0]).sum()))


def _is_conv(m: LoraModule) -> bool:
    return m.kind is ModuleKind.CONV and m.kernel != (1, 1)


def truncate(aligned: dict[str, list[Term]], policy: RankPolicy | None, ctx: MergeContext
             ) -> dict[str, LoraModule]:
    """Exact merge of every module, truncated by ``policy`` (None keeps the exact sum).

    Runs through the batched engine (:func:`lorakit.lowrank.batched.truncated_sums`): modules of
    equal shape and term ranks are decomposed together, and only the kept factors are stored.
    """
    from lorakit.lowrank.batched import truncated_sums
    from lorakit.lowrank.device import resolve_device

    dev = resolve_device(ctx.device)
    items = {k: [(t.module.up_matrix(), t.module.down_matrix(), t.coeff) for t in terms]
             for k, terms in aligned.items()}
    likes = {k: t[0].module for k, t in aligned.items()}
    if policy is not None and policy.is_budget:
        spectra = {k: v.S for k, v in truncated_sums(items, None, device=dev).items()}
        fixed = choose_ranks(spectra, likes, policy)

        def rank_of(key, s):
            return fixed[key]
    else:
        def rank_of(key, s):
            return choose_ranks({key: s}, {key: likes[key]}, policy)[key]

    res = truncated_sums(items, rank_of, device=dev,
                         out_dtype=lambda key: ctx.out_dtype(aligned[key]), progress=ctx.tick)
    out = {}
    for key, r in res.items():
        up, down = shape_factors(r.up, r.down, likes[key])
        out[key] = LoraModule(down=down, up=up, alpha=float(down.shape[0]), kind=likes[key].kind)
    return out


def choose_ranks(spectra: dict[str, torch.Tensor], likes: dict[str, LoraModule],
                 policy: RankPolicy | None) -> dict[str, int]:
    """Rank per module: the numerical rank without a policy, else what the policy selects."""
    from lorakit.lowrank.policy import allocate_budget, select_rank

    if policy is None:
        return {k: numerical_rank(s) for k, s in spectra.items()}
    if policy.is_budget:
        costs = {k: m.out_features + m.down_matrix().shape[1] for k, m in likes.items()}
        total = sum(m.num_params() for m in likes.values())
        return allocate_budget(spectra, costs, policy.budget_params(total))
    out = {}
    for k, s in spectra.items():
        p = policy.for_conv() if _is_conv(likes[k]) else policy
        out[k] = max(1, min(select_rank(s, p), s.numel()))
    return out
