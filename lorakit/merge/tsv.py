"""``tsv``: TSV-Merge, task singular vectors decorrelated, then summed.

Per module and task, ``D_t = U_t S_t V_t^T`` (``D_t = w_t s_t B_t A_t``) keeps its top
``k = floor(sv_reduction * min(out, in))`` singular triplets (default ``sv_reduction = 1/T``),
capped at ``D_t``'s numerical rank (beyond it singular vectors are arbitrary; a LoRA update has
rank ``r_t``). The kept vectors are stacked, ``U = [U_1 .. U_T]``, ``V = [V_1 .. V_T]``, and
replaced by their nearest orthonormal matrices ``U_perp = P Q^T`` (orthogonal Procrustes, the
paper's whitening), giving the merge ``alpha * U_perp diag(S_1 .. S_T) V_perp^T``. Computed
exactly in Core Space (:mod:`lorakit.merge.subspace`).

Reference: Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model
Merging", CVPR 2025 (TSV-M).

Evidence (``bench/quality.py``, six zoo adapters, SmolLM2-135M, all weights 1; mean normalised
score, 0 = base model, 1 = each task's own adapter; ``bench/results/quality.md``):
alpha 1 (the paper): 0.09, 0.3: 0.48, 0.2: 0.41, so ``alpha=0.3`` is the default (six
full-strength updates summed break the language-modelling tasks, as for ``linear``).

Example:
    >>> lorakit.merge([a, b, c], "tsv", alpha=1.0)   # doctest: +SKIP
"""

from __future__ import annotations

import math

import torch

from lorakit.adapter import LoraModule
from lorakit.merge.align import Space, Term
from lorakit.merge.options import MergeContext, TsvOptions
from lorakit.merge.spaces import stack_merge
from lorakit.merge.subspace import procrustes, top_svd


def tsv_core(cores: torch.Tensor, k: int, alpha: float) -> torch.Tensor:
    """TSV-M of the stack ``cores (n, p, q)`` keeping ``k`` triplets per task -> ``(p, q)``."""
    us, ss, vs = [], [], []
    for m in cores:
        u, s, vh = top_svd(m, k)
        us.append(u)
        ss.append(s)
        vs.append(vh.T)
    u, v = torch.cat(us, dim=1), torch.cat(vs, dim=1)  # (p, K), (q, K)
    s = torch.cat(ss)  # (K,)
    return alpha * (procrustes(u) * s) @ procrustes(v).T


def merge_tsv(aligned: dict[str, list[Term]], options: TsvOptions, ctx: MergeContext
              ) -> dict[str, LoraModule]:
    """TSV-M over every module (see the module docstring)."""
    n = 1 + max(t.index for terms in aligned.values() for t in terms)
    frac = options.sv_reduction if options.sv_reduction is not None else 1.0 / n

    def keyed(key: str):
        like = aligned[key][0].module
        k = max(1, math.floor(frac * min(like.out_features, like.down_matrix().shape[1])))
        return lambda stack, cuts, gen: tsv_core(stack, k, options.alpha)

    return stack_merge(aligned, ctx, keyed, 1.0, Space.CORE, keyed=True)
